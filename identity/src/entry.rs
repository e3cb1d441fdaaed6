//! Registration entries: which workloads (by selectors, under which parent)
//! get which SPIFFE ID, and how their SVIDs are shaped.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::clock::{serde_opt_seconds, serde_opt_unix_seconds};
use crate::selector::SelectorSet;
use crate::spiffe_id::{ReservedIdError, SpiffeId, TrustDomain};

/// Most DNS names one entry may carry.
pub const MAX_DNS_NAMES: usize = 100;
/// Longest hint, in bytes.
pub const MAX_HINT_LEN: usize = 256;
/// Longest SVID lifetime an entry may ask for (the CA caps it further at
/// its own expiry).
pub const MAX_TTL: Duration = Duration::from_secs(366 * 24 * 3600);
/// Longest entry id, in bytes.
pub const MAX_ENTRY_ID_LEN: usize = 64;
/// Longest entry name or owner (registration files), in bytes.
pub const MAX_NAME_LEN: usize = 128;

/// Why an entry (or one of its fields) is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EntryError {
    #[error("entry id must be 1 to {MAX_ENTRY_ID_LEN} characters of a-z, A-Z, 0-9, '-' or '_'")]
    BadId,
    #[error("spiffe id {0} is not in trust domain {1}")]
    ForeignSpiffeId(SpiffeId, TrustDomain),
    #[error("parent id {0} is not in trust domain {1}")]
    ForeignParentId(SpiffeId, TrustDomain),
    #[error("spiffe id {0} cannot be given to a workload: {1}")]
    Reserved(SpiffeId, ReservedIdError),
    #[error("an entry cannot be its own parent")]
    SelfParent,
    #[error("an entry needs at least one selector")]
    NoSelectors,
    #[error("ttl must be at least one second")]
    ZeroTtl,
    #[error("ttl must be at most 366 days")]
    TtlTooLong,
    #[error("invalid dns name {0:?}: {1}")]
    DnsName(String, &'static str),
    #[error("an entry may carry at most {MAX_DNS_NAMES} dns names")]
    TooManyDnsNames,
    #[error("an entry cannot federate with its own trust domain")]
    FederatesWithSelf,
    #[error("hint must be at most {MAX_HINT_LEN} bytes without control characters")]
    BadHint,
    #[error("{0} must be 1 to {MAX_NAME_LEN} characters of a-z, A-Z, 0-9, '-', '_', '.' or '/'")]
    BadName(&'static str),
    #[error("an entry has a name only together with an owner, and the other way round")]
    NameWithoutOwner,
    #[error("admin_role is only meaningful with admin = true")]
    AdminRoleWithoutAdmin,
}

/// What an admin identity may do over the admin API's mTLS listener. Each
/// role includes the ones before it: `revoke` may also read, `admin` may
/// do everything.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdminRole {
    /// Show, list and count entries and agents; the bundle; health.
    Read,
    /// Read, and take access away: delete entries, evict and ban agents.
    Revoke,
    /// Everything the admin API offers.
    Admin,
}

impl AdminRole {
    /// Every role, weakest first.
    pub const ALL: [AdminRole; 3] = [Self::Read, Self::Revoke, Self::Admin];

    /// The role's name in config files, on the wire and in the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Revoke => "revoke",
            Self::Admin => "admin",
        }
    }
}

impl fmt::Display for AdminRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A role name that is not `read`, `revoke` or `admin`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown admin role {0:?}: expected read, revoke or admin")]
pub struct UnknownAdminRole(pub String);

impl std::str::FromStr for AdminRole {
    type Err = UnknownAdminRole;
    fn from_str(s: &str) -> Result<Self, UnknownAdminRole> {
        Self::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| UnknownAdminRole(s.to_owned()))
    }
}

/// Whether `s` is a valid entry name or owner: 1 to [`MAX_NAME_LEN`]
/// characters of a-z, A-Z, 0-9, `-`, `_`, `.` or `/`.
pub fn is_valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NAME_LEN
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/'))
}

/// An entry's identifier; random for new entries.
///
/// Shared, not copied, when cloned: servers and agents key several maps
/// and indexes by it, one clone each per entry.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct EntryId(Arc<str>);

impl EntryId {
    /// A fresh random id (128 bits, hex).
    pub fn generate() -> Self {
        Self(crate::random::hex_id().into())
    }

    /// Parses an id given by an operator.
    pub fn new(s: &str) -> Result<Self, EntryError> {
        Self::try_from(s.to_owned())
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for EntryId {
    type Error = EntryError;
    fn try_from(s: String) -> Result<Self, EntryError> {
        let ok = !s.is_empty()
            && s.len() <= MAX_ENTRY_ID_LEN
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if ok {
            Ok(Self(s.into()))
        } else {
            Err(EntryError::BadId)
        }
    }
}

impl From<EntryId> for String {
    fn from(id: EntryId) -> String {
        id.0.as_ref().to_owned()
    }
}

impl fmt::Display for EntryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for EntryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EntryId({})", self.0)
    }
}

/// A DNS name for an SVID's DNS SANs; `*.` is allowed as the first label.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct DnsName(String);

impl DnsName {
    /// Parses a DNS name, checking RFC 1123 label syntax.
    pub fn new(s: &str) -> Result<Self, EntryError> {
        Self::try_from(s.to_owned())
    }

    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for DnsName {
    type Error = EntryError;
    fn try_from(s: String) -> Result<Self, EntryError> {
        let bad = |why| Err(EntryError::DnsName(s.clone(), why));
        if s.is_empty() || s.len() > 253 {
            return bad("must be 1 to 253 bytes");
        }
        let body = s.strip_prefix("*.").unwrap_or(&s);
        for label in body.split('.') {
            if label.is_empty() || label.len() > 63 {
                return bad("every label must be 1 to 63 bytes");
            }
            if !label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            {
                return bad("labels may only hold letters, digits and '-'");
            }
            if label.starts_with('-') || label.ends_with('-') {
                return bad("a label may not start or end with '-'");
            }
        }
        Ok(Self(s))
    }
}

impl std::str::FromStr for DnsName {
    type Err = EntryError;
    fn from_str(s: &str) -> Result<Self, EntryError> {
        Self::new(s)
    }
}

impl From<DnsName> for String {
    fn from(d: DnsName) -> String {
        d.0
    }
}

impl fmt::Display for DnsName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for DnsName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DnsName({})", self.0)
    }
}

/// A registration entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistrationEntry {
    /// Unique id.
    pub id: EntryId,
    /// The identity issued to matching workloads.
    pub spiffe_id: SpiffeId,
    /// The agent (or node alias) under which the workload must run; the
    /// server's own ID marks a node alias entry.
    pub parent_id: SpiffeId,
    /// All of these must be among the workload's (or node's) selectors.
    pub selectors: SelectorSet,
    /// X.509-SVID lifetime; `None` uses the server default.
    #[serde(with = "serde_opt_seconds", default)]
    pub x509_svid_ttl: Option<Duration>,
    /// JWT-SVID lifetime; `None` uses the server default.
    #[serde(with = "serde_opt_seconds", default)]
    pub jwt_svid_ttl: Option<Duration>,
    /// DNS SANs for the X.509-SVID.
    #[serde(default)]
    pub dns_names: Vec<DnsName>,
    /// Foreign trust domains whose bundles the workload receives.
    #[serde(default)]
    pub federates_with: BTreeSet<TrustDomain>,
    /// Whether the identity may call the admin API.
    #[serde(default)]
    pub admin: bool,
    /// With `admin`, what the identity may do; `None` is the full
    /// [`AdminRole::Admin`]. Left out of the stored record when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_role: Option<AdminRole>,
    /// Free-form hint passed to workloads to tell SVIDs apart.
    #[serde(default)]
    pub hint: String,
    /// After this time the entry no longer yields SVIDs.
    #[serde(with = "serde_opt_unix_seconds", default)]
    pub expires_at: Option<SystemTime>,
    /// Datastore revision of the last change; set by the datastore.
    #[serde(default)]
    pub revision: u64,
    /// Who manages the entry from a registration file (`entry apply
    /// --owner`); empty for entries made by hand. Left out of the stored
    /// record when empty, so records stay as they were before.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub owner: String,
    /// The entry's stable name within its owner's registration file; empty
    /// exactly when `owner` is.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
}

impl RegistrationEntry {
    /// A new entry with a random id and defaults for everything optional.
    pub fn new(spiffe_id: SpiffeId, parent_id: SpiffeId, selectors: SelectorSet) -> Self {
        Self {
            id: EntryId::generate(),
            spiffe_id,
            parent_id,
            selectors,
            x509_svid_ttl: None,
            jwt_svid_ttl: None,
            dns_names: Vec::new(),
            federates_with: BTreeSet::new(),
            admin: false,
            admin_role: None,
            hint: String::new(),
            expires_at: None,
            revision: 0,
            owner: String::new(),
            name: String::new(),
        }
    }

    /// Whether this is a node alias entry (parented to the server).
    pub fn is_node_alias(&self) -> bool {
        self.parent_id == SpiffeId::server(&self.spiffe_id.trust_domain())
    }

    /// The role the entry's identity holds on the admin API, if any.
    pub fn admin_access(&self) -> Option<AdminRole> {
        self.admin
            .then(|| self.admin_role.unwrap_or(AdminRole::Admin))
    }

    /// Whether the entry has expired at `now`.
    pub fn is_expired(&self, now: SystemTime) -> bool {
        self.expires_at.is_some_and(|t| t <= now)
    }

    /// Checks the entry against the rules for trust domain `td`.
    pub fn check(&self, td: &TrustDomain) -> Result<(), EntryError> {
        if !self.spiffe_id.is_member_of(td) {
            return Err(EntryError::ForeignSpiffeId(
                self.spiffe_id.clone(),
                td.clone(),
            ));
        }
        if !self.parent_id.is_member_of(td) {
            return Err(EntryError::ForeignParentId(
                self.parent_id.clone(),
                td.clone(),
            ));
        }
        self.spiffe_id
            .check_workload_id()
            .map_err(|e| EntryError::Reserved(self.spiffe_id.clone(), e))?;
        if self.spiffe_id == self.parent_id {
            return Err(EntryError::SelfParent);
        }
        if self.selectors.is_empty() {
            return Err(EntryError::NoSelectors);
        }
        let zero = |t: Option<Duration>| t.is_some_and(|t| t.as_secs() == 0);
        if zero(self.x509_svid_ttl) || zero(self.jwt_svid_ttl) {
            return Err(EntryError::ZeroTtl);
        }
        if [self.x509_svid_ttl, self.jwt_svid_ttl]
            .iter()
            .flatten()
            .any(|t| *t > MAX_TTL)
        {
            return Err(EntryError::TtlTooLong);
        }
        if self.dns_names.len() > MAX_DNS_NAMES {
            return Err(EntryError::TooManyDnsNames);
        }
        if self.federates_with.contains(td) {
            return Err(EntryError::FederatesWithSelf);
        }
        if self.hint.len() > MAX_HINT_LEN || self.hint.chars().any(char::is_control) {
            return Err(EntryError::BadHint);
        }
        match (self.owner.is_empty(), self.name.is_empty()) {
            (true, true) => {}
            (false, false) => {
                if !is_valid_name(&self.owner) {
                    return Err(EntryError::BadName("owner"));
                }
                if !is_valid_name(&self.name) {
                    return Err(EntryError::BadName("name"));
                }
            }
            _ => return Err(EntryError::NameWithoutOwner),
        }
        if self.admin_role.is_some() && !self.admin {
            return Err(EntryError::AdminRoleWithoutAdmin);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::selector::Selector;

    fn entry() -> RegistrationEntry {
        let sel = [Selector::parse("unix:uid:1000").unwrap()]
            .into_iter()
            .collect();
        RegistrationEntry::new(
            SpiffeId::parse("spiffe://example.org/web").unwrap(),
            SpiffeId::parse("spiffe://example.org/sigil/agent/join_token/abc").unwrap(),
            sel,
        )
    }

    fn td() -> TrustDomain {
        TrustDomain::new("example.org").unwrap()
    }

    #[test]
    fn valid_entry_passes_and_round_trips() {
        let mut e = entry();
        e.dns_names = vec![DnsName::new("web.example.org").unwrap()];
        e.x509_svid_ttl = Some(Duration::from_secs(600));
        e.expires_at = Some(crate::clock::from_unix_seconds(2_000_000_000));
        e.check(&td()).unwrap();
        let json = serde_json::to_string(&e).unwrap();
        let back: RegistrationEntry = serde_json::from_str(&json).unwrap();
        assert_eq!(back, e);
    }

    #[test]
    fn rejects_reserved_and_foreign_ids() {
        let mut e = entry();
        e.spiffe_id = SpiffeId::parse("spiffe://example.org/sigil/agent/x").unwrap();
        assert!(matches!(e.check(&td()), Err(EntryError::Reserved(..))));
        e.spiffe_id = SpiffeId::parse("spiffe://example.org").unwrap();
        assert!(matches!(e.check(&td()), Err(EntryError::Reserved(..))));
        e.spiffe_id = SpiffeId::parse("spiffe://other.org/web").unwrap();
        assert!(matches!(
            e.check(&td()),
            Err(EntryError::ForeignSpiffeId(..))
        ));
        let mut e = entry();
        e.parent_id = SpiffeId::parse("spiffe://other.org/agent").unwrap();
        assert!(matches!(
            e.check(&td()),
            Err(EntryError::ForeignParentId(..))
        ));
    }

    #[test]
    fn rejects_bad_fields() {
        let mut e = entry();
        e.selectors = SelectorSet::new();
        assert_eq!(e.check(&td()), Err(EntryError::NoSelectors));
        let mut e = entry();
        e.x509_svid_ttl = Some(Duration::ZERO);
        assert_eq!(e.check(&td()), Err(EntryError::ZeroTtl));
        let mut e = entry();
        e.jwt_svid_ttl = Some(MAX_TTL + Duration::from_secs(1));
        assert_eq!(e.check(&td()), Err(EntryError::TtlTooLong));
        let mut e = entry();
        e.federates_with.insert(td());
        assert_eq!(e.check(&td()), Err(EntryError::FederatesWithSelf));
        let mut e = entry();
        e.hint = "a\nb".into();
        assert_eq!(e.check(&td()), Err(EntryError::BadHint));
        let mut e = entry();
        e.parent_id = e.spiffe_id.clone();
        assert_eq!(e.check(&td()), Err(EntryError::SelfParent));
        let mut e = entry();
        e.owner = "team".into();
        assert_eq!(e.check(&td()), Err(EntryError::NameWithoutOwner));
        e.name = "web server".into();
        assert_eq!(e.check(&td()), Err(EntryError::BadName("name")));
        e.name = "payments/web-1.a_b".into();
        assert_eq!(e.check(&td()), Ok(()));
    }

    #[test]
    fn records_without_owner_and_name_read_and_write_as_before() {
        // A record stored before entries had owners and names.
        let old = serde_json::to_value(entry()).unwrap();
        assert!(old.get("owner").is_none() && old.get("name").is_none());
        let back: RegistrationEntry = serde_json::from_value(old).unwrap();
        assert_eq!(back.owner, "");
        let mut e = entry();
        e.owner = "team".into();
        e.name = "web".into();
        let back: RegistrationEntry =
            serde_json::from_str(&serde_json::to_string(&e).unwrap()).unwrap();
        assert_eq!(back, e);
    }

    #[test]
    fn admin_role_defaults_to_admin_and_needs_the_admin_flag() {
        let mut e = entry();
        assert_eq!(e.admin_access(), None);
        e.admin_role = Some(AdminRole::Read);
        assert_eq!(e.check(&td()), Err(EntryError::AdminRoleWithoutAdmin));
        assert_eq!(e.admin_access(), None, "the role alone grants nothing");
        e.admin = true;
        assert_eq!(e.check(&td()), Ok(()));
        assert_eq!(e.admin_access(), Some(AdminRole::Read));
        e.admin_role = None;
        assert_eq!(e.admin_access(), Some(AdminRole::Admin));
        // Stored records without a role read and write as before.
        assert!(
            serde_json::to_value(&e)
                .unwrap()
                .get("admin_role")
                .is_none()
        );
        e.admin_role = Some(AdminRole::Revoke);
        let json = serde_json::to_value(&e).unwrap();
        assert_eq!(json["admin_role"], "revoke");
        assert_eq!(
            serde_json::from_value::<RegistrationEntry>(json).unwrap(),
            e
        );
        assert!(AdminRole::Read < AdminRole::Revoke && AdminRole::Revoke < AdminRole::Admin);
        assert_eq!("revoke".parse::<AdminRole>(), Ok(AdminRole::Revoke));
        assert!("Admin".parse::<AdminRole>().is_err());
    }

    #[test]
    fn dns_name_rules() {
        for ok in ["a", "web.example.org", "*.example.org", "x-1.y"] {
            assert!(DnsName::new(ok).is_ok(), "{ok}");
        }
        for bad in [
            "", "-a.org", "a-.org", "a..org", "a_b.org", "*", "a.*.org", "a b",
        ] {
            assert!(DnsName::new(bad).is_err(), "{bad}");
        }
        assert!(DnsName::new(&"a".repeat(64)).is_err());
    }

    #[test]
    fn entry_ids() {
        let a = EntryId::generate();
        assert_eq!(a.as_str().len(), 32);
        assert_ne!(a, EntryId::generate());
        assert!(EntryId::new("my-entry_1").is_ok());
        assert!(EntryId::new("").is_err());
        assert!(EntryId::new("a/b").is_err());
    }

    #[test]
    fn node_alias_is_parented_to_server() {
        let mut e = entry();
        assert!(!e.is_node_alias());
        e.parent_id = SpiffeId::server(&td());
        assert!(e.is_node_alias());
    }
}
