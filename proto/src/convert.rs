//! Conversions between wire messages and domain types. Wire input is
//! untrusted: every conversion from the wire validates and returns a
//! [`WireError`] naming the field that was wrong.

use std::time::Duration;

use sigil_identity::clock::{from_unix_seconds, unix_seconds};
use sigil_identity::{
    Bundle, DnsName, EntryId, RegistrationEntry, Selector, SpiffeId, TrustDomain,
};

use crate::node;

mod sync;
pub use sync::{SyncEvent, SyncUpdate};

/// A wire message that does not convert to a valid domain value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field}: {reason}")]
pub struct WireError {
    /// Which field.
    pub field: &'static str,
    /// What was wrong with it.
    pub reason: String,
}

impl WireError {
    /// An error for `field`.
    pub fn new(field: &'static str, reason: impl ToString) -> Self {
        Self {
            field,
            reason: reason.to_string(),
        }
    }
}

impl From<WireError> for tonic::Status {
    fn from(e: WireError) -> Self {
        tonic::Status::invalid_argument(e.to_string())
    }
}

/// Parses a SPIFFE ID field.
pub fn spiffe_id(field: &'static str, s: &str) -> Result<SpiffeId, WireError> {
    SpiffeId::parse(s).map_err(|e| WireError::new(field, format!("{s:?}: {e}")))
}

fn seconds(field: &'static str, v: i64) -> Result<Option<Duration>, WireError> {
    match v {
        0 => Ok(None),
        v if v > 0 => Ok(Some(Duration::from_secs(v as u64))),
        _ => Err(WireError::new(field, "must not be negative")),
    }
}

fn unix(t: Option<std::time::SystemTime>) -> i64 {
    t.map_or(0, |t| i64::try_from(unix_seconds(t)).unwrap_or(i64::MAX))
}

/// Unix seconds for a wire `int64` time field.
pub fn unix_i64(t: std::time::SystemTime) -> i64 {
    unix(Some(t))
}

impl From<&RegistrationEntry> for node::Entry {
    fn from(e: &RegistrationEntry) -> Self {
        let secs =
            |d: Option<Duration>| d.map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        node::Entry {
            id: e.id.to_string(),
            spiffe_id: e.spiffe_id.to_string(),
            parent_id: e.parent_id.to_string(),
            selectors: e.selectors.iter().map(ToString::to_string).collect(),
            x509_svid_ttl: secs(e.x509_svid_ttl),
            jwt_svid_ttl: secs(e.jwt_svid_ttl),
            dns_names: e.dns_names.iter().map(ToString::to_string).collect(),
            federates_with: e.federates_with.iter().map(ToString::to_string).collect(),
            admin: e.admin,
            admin_role: e.admin_role.map(|r| r.to_string()).unwrap_or_default(),
            hint: e.hint.clone(),
            expires_at: unix(e.expires_at),
            revision: e.revision,
            owner: e.owner.clone(),
            name: e.name.clone(),
        }
    }
}

impl TryFrom<node::Entry> for RegistrationEntry {
    type Error = WireError;
    /// Converts a wire entry; an empty id gets a fresh random one.
    fn try_from(e: node::Entry) -> Result<Self, WireError> {
        let id = if e.id.is_empty() {
            EntryId::generate()
        } else {
            EntryId::new(&e.id).map_err(|err| WireError::new("id", err))?
        };
        let selectors = e
            .selectors
            .iter()
            .map(|s| Selector::parse(s).map_err(|err| WireError::new("selectors", err)))
            .collect::<Result<_, _>>()?;
        let dns_names = e
            .dns_names
            .iter()
            .map(|d| DnsName::new(d).map_err(|err| WireError::new("dns_names", err)))
            .collect::<Result<_, _>>()?;
        let federates_with = e
            .federates_with
            .iter()
            .map(|t| {
                TrustDomain::from_name_or_id(t)
                    .map_err(|err| WireError::new("federates_with", format!("{t:?}: {err}")))
            })
            .collect::<Result<_, _>>()?;
        let expires_at = match e.expires_at {
            0 => None,
            t if t > 0 => Some(from_unix_seconds(t as u64)),
            _ => return Err(WireError::new("expires_at", "must not be negative")),
        };
        Ok(RegistrationEntry {
            id,
            spiffe_id: spiffe_id("spiffe_id", &e.spiffe_id)?,
            parent_id: spiffe_id("parent_id", &e.parent_id)?,
            selectors,
            x509_svid_ttl: seconds("x509_svid_ttl", e.x509_svid_ttl)?,
            jwt_svid_ttl: seconds("jwt_svid_ttl", e.jwt_svid_ttl)?,
            dns_names,
            federates_with,
            admin: e.admin,
            admin_role: (!e.admin_role.is_empty())
                .then(|| e.admin_role.parse())
                .transpose()
                .map_err(|err| WireError::new("admin_role", err))?,
            hint: e.hint,
            expires_at,
            revision: e.revision,
            owner: e.owner,
            name: e.name,
        })
    }
}

impl From<&Bundle> for node::Bundle {
    fn from(b: &Bundle) -> Self {
        node::Bundle {
            trust_domain: b.trust_domain.to_string(),
            jwks: b.to_jwks_bytes(),
            sequence: b.sequence,
            tainted_x509_authorities: b.tainted_x509_authorities.clone(),
            tainted_jwt_kids: b.tainted_jwt_kids.clone(),
            ..Default::default()
        }
    }
}

impl TryFrom<&node::Bundle> for Bundle {
    type Error = WireError;
    fn try_from(b: &node::Bundle) -> Result<Self, WireError> {
        let td =
            TrustDomain::new(&b.trust_domain).map_err(|e| WireError::new("trust_domain", e))?;
        let mut bundle = Bundle::from_jwks(td, &b.jwks).map_err(|e| WireError::new("jwks", e))?;
        // Markers of authorities the bundle does not hold are dropped.
        bundle.set_taint(
            b.tainted_x509_authorities.clone(),
            b.tainted_jwt_kids.clone(),
        );
        Ok(bundle)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> RegistrationEntry {
        let mut e = RegistrationEntry::new(
            SpiffeId::parse("spiffe://example.org/web").unwrap(),
            SpiffeId::parse("spiffe://example.org/sigil/agent/join_token/a").unwrap(),
            [Selector::parse("unix:uid:1000").unwrap()]
                .into_iter()
                .collect(),
        );
        e.x509_svid_ttl = Some(Duration::from_secs(90));
        e.dns_names = vec![DnsName::new("web.example.org").unwrap()];
        e.federates_with
            .insert(TrustDomain::new("other.org").unwrap());
        e.expires_at = Some(from_unix_seconds(2_000_000_000));
        e.hint = "blue".into();
        e.revision = 7;
        e.owner = "team".into();
        e.name = "web".into();
        e.admin = true;
        e.admin_role = Some(sigil_identity::AdminRole::Revoke);
        e
    }

    #[test]
    fn entry_round_trips() {
        let e = entry();
        let wire = node::Entry::from(&e);
        assert_eq!(RegistrationEntry::try_from(wire).unwrap(), e);
    }

    #[test]
    fn bad_wire_fields_are_named() {
        let mut wire = node::Entry::from(&entry());
        wire.admin_role = "root".into();
        assert_eq!(
            RegistrationEntry::try_from(wire).unwrap_err().field,
            "admin_role"
        );
        let mut wire = node::Entry::from(&entry());
        wire.selectors = vec!["nocolon".into()];
        assert_eq!(
            RegistrationEntry::try_from(wire).unwrap_err().field,
            "selectors"
        );
        let mut wire = node::Entry::from(&entry());
        wire.spiffe_id = "spiffe://example.org/../x".into();
        assert_eq!(
            RegistrationEntry::try_from(wire).unwrap_err().field,
            "spiffe_id"
        );
        let mut wire = node::Entry::from(&entry());
        wire.x509_svid_ttl = -1;
        assert_eq!(
            RegistrationEntry::try_from(wire).unwrap_err().field,
            "x509_svid_ttl"
        );
    }

    #[test]
    fn empty_id_gets_a_fresh_one() {
        let mut wire = node::Entry::from(&entry());
        wire.id.clear();
        assert_eq!(
            RegistrationEntry::try_from(wire).unwrap().id.as_str().len(),
            32
        );
    }
}
