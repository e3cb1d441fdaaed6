//! Trust bundles and their JWK Set form (SPIFFE Trust Domain and Bundle).
//!
//! A bundle holds the X.509 authorities (CA certificates) and JWT
//! authorities (public keys with a key id) of one trust domain, plus a
//! sequence number that only ever grows and a refresh hint. Bundles of
//! different trust domains are never merged: there is no API to do so.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::jwks::{self, JwksError};
use crate::keys::{KeyError, PublicKey};
use crate::spiffe_id::TrustDomain;

pub use crate::jwks::MAX_KID_LEN;

/// Largest JWK Set accepted when decoding, in bytes.
pub const MAX_BUNDLE_BYTES: usize = crate::jwks::MAX_JWKS_BYTES;
/// Most keys accepted in one bundle.
pub const MAX_BUNDLE_KEYS: usize = 1000;

/// Why a JWK Set is not an acceptable SPIFFE bundle.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BundleError {
    #[error("bundle is larger than {MAX_BUNDLE_BYTES} bytes")]
    TooLarge,
    #[error("bundle is not a JSON object: {0}")]
    Json(String),
    #[error("bundle has no \"keys\" array")]
    MissingKeys,
    #[error("bundle has more than {MAX_BUNDLE_KEYS} keys")]
    TooManyKeys,
    #[error("spiffe_sequence must be a non-negative integer")]
    BadSequence,
    #[error("spiffe_refresh_hint must be a non-negative integer number of seconds")]
    BadRefreshHint,
    #[error("key {index}: an x509-svid key must carry exactly one x5c certificate")]
    X5cCount { index: usize },
    #[error("key {index}: an x509-svid key must not carry a kid")]
    X509Kid { index: usize },
    #[error("key {index}: x5c is not base64 DER of a CA certificate")]
    BadCertificate { index: usize },
    #[error("key {index}: the JWK parameters do not match the x5c certificate's key")]
    CertificateKeyMismatch { index: usize },
    #[error(
        "key {index}: a jwt-svid key must carry a non-empty kid of at most {MAX_KID_LEN} bytes"
    )]
    MissingKid { index: usize },
    #[error("key {index}: duplicate kid")]
    DuplicateKid { index: usize },
    #[error("key {index}: {source}")]
    Key { index: usize, source: KeyError },
}

/// A JWT signing authority: key id and public key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct JwtAuthority {
    /// The `kid` tokens name.
    pub kid: String,
    /// The verification key.
    pub public_key: PublicKey,
}

/// The trust bundle of one trust domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundle {
    /// Whose bundle this is.
    pub trust_domain: TrustDomain,
    /// CA certificates, DER.
    pub x509_authorities: Vec<Vec<u8>>,
    /// JWT signing keys.
    pub jwt_authorities: Vec<JwtAuthority>,
    /// `spiffe_sequence`: grows on every change, never goes back.
    pub sequence: u64,
    /// `spiffe_refresh_hint`: how often consumers should re-fetch.
    pub refresh_hint: Option<Duration>,
    /// X.509 authorities (DER, each also in `x509_authorities`) an operator
    /// tainted: still trusted, but every SVID they signed is to be replaced.
    /// Not part of the SPIFFE JWK Set; see [`taint`].
    pub tainted_x509_authorities: Vec<Vec<u8>>,
    /// Key ids of JWT authorities an operator tainted (each also in
    /// `jwt_authorities`): cached tokens they signed are to be dropped.
    pub tainted_jwt_kids: Vec<String>,
}

impl Bundle {
    /// An empty bundle at sequence 0.
    pub fn new(trust_domain: TrustDomain) -> Self {
        Self {
            trust_domain,
            x509_authorities: Vec::new(),
            jwt_authorities: Vec::new(),
            sequence: 0,
            refresh_hint: None,
            tainted_x509_authorities: Vec::new(),
            tainted_jwt_kids: Vec::new(),
        }
    }

    /// Whether two bundles hold the same authorities (sequence and hint aside).
    pub fn same_authorities(&self, other: &Bundle) -> bool {
        self.trust_domain == other.trust_domain
            && self.x509_authorities == other.x509_authorities
            && self.jwt_authorities == other.jwt_authorities
    }

    /// The JWT authority with key id `kid`.
    pub fn jwt_authority(&self, kid: &str) -> Option<&JwtAuthority> {
        self.jwt_authorities.iter().find(|a| a.kid == kid)
    }

    /// Encodes the bundle as a SPIFFE JWK Set.
    pub fn to_jwks(&self) -> Value {
        let mut keys = Vec::with_capacity(self.x509_authorities.len() + self.jwt_authorities.len());
        for der in &self.x509_authorities {
            // Authorities enter a bundle only through `from_jwks` or the CA,
            // both of which hold parsed certificates; a key that cannot be
            // read back is left out rather than published malformed.
            let Ok(key) = cert_public_key(der) else {
                continue;
            };
            let mut m = key.jwk_members();
            m.insert("use".into(), json!("x509-svid"));
            m.insert("x5c".into(), json!([B64.encode(der)]));
            keys.push(Value::Object(m));
        }
        for a in &self.jwt_authorities {
            let mut m = a.public_key.jwk_members();
            m.insert("use".into(), json!("jwt-svid"));
            m.insert("kid".into(), json!(a.kid));
            keys.push(Value::Object(m));
        }
        let mut doc = Map::new();
        doc.insert("keys".into(), Value::Array(keys));
        doc.insert("spiffe_sequence".into(), json!(self.sequence));
        if let Some(hint) = self.refresh_hint {
            doc.insert("spiffe_refresh_hint".into(), json!(hint.as_secs()));
        }
        Value::Object(doc)
    }

    /// The JWK Set as compact JSON bytes.
    pub fn to_jwks_bytes(&self) -> Vec<u8> {
        // Serialising a `Value` to a Vec cannot fail.
        serde_json::to_vec(&self.to_jwks()).unwrap_or_default()
    }

    /// Decodes a SPIFFE JWK Set for `trust_domain`.
    ///
    /// Keys whose `use` is neither `x509-svid` nor `jwt-svid` are ignored,
    /// as the SPIFFE bundle format asks.
    pub fn from_jwks(trust_domain: TrustDomain, bytes: &[u8]) -> Result<Self, BundleError> {
        let set = jwks::parse(bytes, MAX_BUNDLE_KEYS).map_err(|e| match e {
            JwksError::TooLarge => BundleError::TooLarge,
            JwksError::MissingKeys => BundleError::MissingKeys,
            JwksError::TooManyKeys(_) => BundleError::TooManyKeys,
            other => BundleError::Json(other.to_string()),
        })?;
        let doc = &set.members;
        let sequence = match doc.get("spiffe_sequence") {
            None => 0,
            Some(v) => v.as_u64().ok_or(BundleError::BadSequence)?,
        };
        let refresh_hint = match doc.get("spiffe_refresh_hint") {
            None => None,
            Some(v) => Some(Duration::from_secs(
                v.as_u64().ok_or(BundleError::BadRefreshHint)?,
            )),
        };
        let mut bundle = Bundle {
            sequence,
            refresh_hint,
            ..Bundle::new(trust_domain)
        };
        for (index, m) in set.keys.iter().enumerate() {
            match m.get("use").and_then(Value::as_str) {
                Some("x509-svid") => bundle.x509_authorities.push(decode_x509_key(index, m)?),
                Some("jwt-svid") => {
                    let a = decode_jwt_key(index, m)?;
                    if bundle.jwt_authority(&a.kid).is_some() {
                        return Err(BundleError::DuplicateKid { index });
                    }
                    bundle.jwt_authorities.push(a);
                }
                _ => {}
            }
        }
        Ok(bundle)
    }

    /// The X.509 authorities as concatenated PEM blocks.
    pub fn x509_pem(&self) -> String {
        self.x509_authorities
            .iter()
            .map(|der| crate::pem::encode("CERTIFICATE", der))
            .collect()
    }
}

fn cert_public_key(der: &[u8]) -> Result<PublicKey, KeyError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|_| KeyError::Malformed)?;
    PublicKey::from_spki(cert.public_key())
}

fn decode_x509_key(index: usize, m: &Map<String, Value>) -> Result<Vec<u8>, BundleError> {
    if m.contains_key("kid") {
        return Err(BundleError::X509Kid { index });
    }
    let x5c = m
        .get("x5c")
        .and_then(Value::as_array)
        .ok_or(BundleError::X5cCount { index })?;
    let [only] = x5c.as_slice() else {
        return Err(BundleError::X5cCount { index });
    };
    let der = only
        .as_str()
        .and_then(|s| B64.decode(s).ok())
        .ok_or(BundleError::BadCertificate { index })?;
    let (rest, cert) =
        X509Certificate::from_der(&der).map_err(|_| BundleError::BadCertificate { index })?;
    let is_ca = matches!(cert.basic_constraints(), Ok(Some(bc)) if bc.value.ca);
    if !rest.is_empty() || !is_ca {
        return Err(BundleError::BadCertificate { index });
    }
    let cert_key = PublicKey::from_spki(cert.public_key())
        .map_err(|source| BundleError::Key { index, source })?;
    let jwk_key = PublicKey::from_jwk(m).map_err(|source| BundleError::Key { index, source })?;
    if cert_key != jwk_key {
        return Err(BundleError::CertificateKeyMismatch { index });
    }
    Ok(der)
}

fn decode_jwt_key(index: usize, m: &Map<String, Value>) -> Result<JwtAuthority, BundleError> {
    let kid = jwks::kid(m).ok_or(BundleError::MissingKid { index })?;
    let public_key = PublicKey::from_jwk(m).map_err(|source| BundleError::Key { index, source })?;
    Ok(JwtAuthority {
        kid: kid.to_owned(),
        public_key,
    })
}

/// Storage form of a bundle: the trust domain next to its JWK Set, and the
/// taint markers (absent in bundles stored before taint existed).
#[derive(Serialize, Deserialize)]
struct StoredBundle {
    trust_domain: TrustDomain,
    jwks: Value,
    /// Tainted X.509 authorities, base64 DER.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    tainted_x509: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    tainted_jwt_kids: Vec<String>,
}

impl Serialize for Bundle {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        StoredBundle {
            trust_domain: self.trust_domain.clone(),
            jwks: self.to_jwks(),
            tainted_x509: self
                .tainted_x509_authorities
                .iter()
                .map(|der| B64.encode(der))
                .collect(),
            tainted_jwt_kids: self.tainted_jwt_kids.clone(),
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for Bundle {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let stored = StoredBundle::deserialize(d)?;
        let bytes = serde_json::to_vec(&stored.jwks).map_err(serde::de::Error::custom)?;
        let mut bundle =
            Bundle::from_jwks(stored.trust_domain, &bytes).map_err(serde::de::Error::custom)?;
        let tainted = stored
            .tainted_x509
            .iter()
            .map(|b| B64.decode(b))
            .collect::<Result<Vec<_>, _>>()
            .map_err(serde::de::Error::custom)?;
        bundle.set_taint(tainted, stored.tainted_jwt_kids);
        Ok(bundle)
    }
}

pub mod taint;
#[cfg(test)]
mod tests;
