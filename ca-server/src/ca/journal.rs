//! The CA journal: every CA key the server has made, its certificate, and
//! where it is in its life. Persisted in the datastore after each step so a
//! restart at any point resumes rotation where it stood.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use sigil_identity::clock::serde_unix_seconds;
use sigil_identity::keys::PublicKey;

use super::keys::{KeyAlgorithm, KeyId};
use crate::datastore::DatastoreError;

/// Where a CA key is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SlotState {
    /// Published in the bundle, not yet signing.
    Prepared,
    /// Signing new credentials.
    Active,
    /// No longer signing; kept in the bundle until it expires ("old" in
    /// the authority commands).
    Retired,
    /// Old, and marked tainted by an operator: still in the bundle, but
    /// every SVID it signed is being replaced.
    Tainted,
    /// Tainted, then revoked by an operator: out of the bundle; kept in the
    /// journal (for `authority show` and so it is never published again)
    /// until it expires.
    Revoked,
}

impl SlotState {
    /// The state's name in the authority commands.
    pub fn name(self) -> &'static str {
        match self {
            SlotState::Prepared => "prepared",
            SlotState::Active => "active",
            SlotState::Retired => "old",
            SlotState::Tainted => "tainted",
            SlotState::Revoked => "revoked",
        }
    }

    /// Whether the key may sign (now or once activated): its private key
    /// is loaded at start.
    pub fn is_live(self) -> bool {
        matches!(self, SlotState::Prepared | SlotState::Active)
    }

    /// Whether the authority belongs in the published bundle (until it
    /// expires).
    pub fn is_published(self) -> bool {
        self != SlotState::Revoked
    }
}

impl std::fmt::Display for SlotState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One X.509 CA key and its certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct X509Slot {
    pub key_id: KeyId,
    pub algorithm: KeyAlgorithm,
    pub state: SlotState,
    /// The CA certificate, DER.
    #[serde(with = "b64")]
    pub cert_der: Vec<u8>,
    #[serde(with = "serde_unix_seconds")]
    pub not_before: SystemTime,
    #[serde(with = "serde_unix_seconds")]
    pub not_after: SystemTime,
}

/// One JWT signing key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JwtSlot {
    pub key_id: KeyId,
    pub algorithm: KeyAlgorithm,
    pub state: SlotState,
    /// The `kid` published in the bundle.
    pub kid: String,
    /// The public key as JWK members, so the bundle can be rebuilt even
    /// after the private key is gone.
    pub public_key: serde_json::Map<String, serde_json::Value>,
    #[serde(with = "serde_unix_seconds")]
    pub not_before: SystemTime,
    #[serde(with = "serde_unix_seconds")]
    pub not_after: SystemTime,
}

impl JwtSlot {
    /// The public key.
    pub fn key(&self) -> Option<PublicKey> {
        PublicKey::from_jwk(&self.public_key).ok()
    }
}

/// Common view of a slot for the rotation logic.
pub trait Slot {
    fn state(&self) -> SlotState;
    fn set_state(&mut self, s: SlotState);
    fn validity(&self) -> (SystemTime, SystemTime);
    fn key_id(&self) -> &KeyId;
}

macro_rules! impl_slot {
    ($t:ty) => {
        impl Slot for $t {
            fn state(&self) -> SlotState {
                self.state
            }
            fn set_state(&mut self, s: SlotState) {
                self.state = s;
            }
            fn validity(&self) -> (SystemTime, SystemTime) {
                (self.not_before, self.not_after)
            }
            fn key_id(&self) -> &KeyId {
                &self.key_id
            }
        }
    };
}
impl_slot!(X509Slot);
impl_slot!(JwtSlot);

/// All CA keys, X.509 and JWT.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaJournal {
    pub x509: Vec<X509Slot>,
    pub jwt: Vec<JwtSlot>,
}

impl CaJournal {
    /// The journal as the datastore stores it (JSON).
    pub fn to_bytes(&self) -> Result<Vec<u8>, DatastoreError> {
        serde_json::to_vec(self)
            .map_err(|e| DatastoreError::Corrupt(format!("CA journal not encodable: {e}")))
    }

    /// A journal read back from the datastore.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, DatastoreError> {
        serde_json::from_slice(bytes)
            .map_err(|e| DatastoreError::Corrupt(format!("CA journal: {e}")))
    }

    /// A small journal for storage tests.
    #[cfg(test)]
    pub fn sample_for_tests() -> Self {
        use sigil_identity::clock::from_unix_seconds;
        CaJournal {
            x509: vec![X509Slot {
                key_id: KeyId::generate("x509"),
                algorithm: KeyAlgorithm::EcP256,
                state: SlotState::Active,
                cert_der: vec![0x30, 0x03, 1, 2, 3],
                not_before: from_unix_seconds(10),
                not_after: from_unix_seconds(20),
            }],
            jwt: vec![JwtSlot {
                key_id: KeyId::generate("jwt"),
                algorithm: KeyAlgorithm::EcP256,
                state: SlotState::Prepared,
                kid: "kid1".into(),
                public_key: serde_json::Map::new(),
                not_before: from_unix_seconds(10),
                not_after: from_unix_seconds(20),
            }],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_journal_written_before_taint_existed_still_loads() {
        // The form an earlier version stored: only prepared/active/retired.
        let old = br#"{"x509":[{"key_id":"x509-0a1b","algorithm":"ec-p256","state":"retired",
            "cert_der":"MAMBAgM=","not_before":10,"not_after":20}],
            "jwt":[{"key_id":"jwt-0a1b","algorithm":"ec-p256","state":"active","kid":"k1",
            "public_key":{},"not_before":10,"not_after":20}]}"#;
        let j = CaJournal::from_bytes(old).unwrap();
        assert_eq!(j.x509[0].state, SlotState::Retired);
        assert_eq!(j.jwt[0].state, SlotState::Active);
    }

    #[test]
    fn tainted_and_revoked_states_round_trip() {
        let mut j = CaJournal::sample_for_tests();
        j.x509[0].state = SlotState::Tainted;
        j.jwt[0].state = SlotState::Revoked;
        let back = CaJournal::from_bytes(&j.to_bytes().unwrap()).unwrap();
        assert_eq!(back, j);
        let text = String::from_utf8(j.to_bytes().unwrap()).unwrap();
        assert!(text.contains("\"tainted\"") && text.contains("\"revoked\""));
    }

    #[test]
    fn only_revoked_authorities_leave_the_bundle() {
        for s in [
            SlotState::Prepared,
            SlotState::Active,
            SlotState::Retired,
            SlotState::Tainted,
        ] {
            assert!(s.is_published(), "{s}");
        }
        assert!(!SlotState::Revoked.is_published());
        assert!(!SlotState::Tainted.is_live() && !SlotState::Retired.is_live());
    }
}

/// Serde adapter: bytes as standard base64.
mod b64 {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        STANDARD.decode(s).map_err(serde::de::Error::custom)
    }
}
