//! SPIFFE IDs and trust domains, valid by construction.
//!
//! The rules are those of the SPIFFE-ID standard with Sigil's decisions from
//! SPEC.md: the scheme must be lowercase `spiffe://`, nothing is normalised,
//! and anything built from outside input is checked segment by segment so a
//! `/`, `..` or `%` smuggled in through a name is refused rather than cleaned.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The only accepted scheme prefix. `SPIFFE://` is rejected, not lowercased.
pub const SCHEME: &str = "spiffe://";
/// Longest trust domain name accepted, in bytes.
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;
/// Longest SPIFFE ID accepted, in bytes (scheme included).
pub const MAX_SPIFFE_ID_LEN: usize = 2048;
/// Path prefix reserved for Sigil's own identities (server and agents).
pub const RESERVED_PATH_PREFIX: &str = "/sigil/";

/// Why a string is not a valid SPIFFE ID or trust domain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdError {
    #[error("spiffe id must start with the lowercase scheme \"spiffe://\"")]
    WrongScheme,
    #[error("trust domain is empty")]
    EmptyTrustDomain,
    #[error("trust domain is longer than {MAX_TRUST_DOMAIN_LEN} bytes")]
    TrustDomainTooLong,
    #[error("trust domain must not contain a port")]
    TrustDomainPort,
    #[error("trust domain must not contain userinfo ('@')")]
    TrustDomainUserinfo,
    #[error("percent-encoding is not allowed in a spiffe id")]
    PercentEncoding,
    #[error("query and fragment are not allowed in a spiffe id")]
    QueryOrFragment,
    #[error("trust domain has character {0:?}; only a-z, 0-9, '.', '-' and '_' are allowed")]
    TrustDomainChar(char),
    #[error("path has character {0:?}; only a-z, A-Z, 0-9, '.', '-' and '_' are allowed")]
    PathChar(char),
    #[error("path has an empty segment ('//')")]
    EmptySegment,
    #[error("path has a '.' or '..' segment")]
    DotSegment,
    #[error("path must not end with '/'")]
    TrailingSlash,
    #[error("spiffe id is longer than {MAX_SPIFFE_ID_LEN} bytes")]
    TooLong,
    #[error("a path segment built from outside input contains '/', which is refused, not cleaned")]
    SlashInSegment,
}

/// Character shown in errors for a byte that is not printable ASCII.
fn shown(b: u8) -> char {
    if b.is_ascii_graphic() || b == b' ' {
        b as char
    } else {
        char::REPLACEMENT_CHARACTER
    }
}

fn check_trust_domain(td: &str) -> Result<(), IdError> {
    if td.is_empty() {
        return Err(IdError::EmptyTrustDomain);
    }
    for b in td.bytes() {
        match b {
            b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-' | b'_' => {}
            b':' => return Err(IdError::TrustDomainPort),
            b'@' => return Err(IdError::TrustDomainUserinfo),
            b'%' => return Err(IdError::PercentEncoding),
            b'?' | b'#' => return Err(IdError::QueryOrFragment),
            other => return Err(IdError::TrustDomainChar(shown(other))),
        }
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(IdError::TrustDomainTooLong);
    }
    Ok(())
}

fn check_segment(seg: &str) -> Result<(), IdError> {
    match seg {
        "" => return Err(IdError::EmptySegment),
        "." | ".." => return Err(IdError::DotSegment),
        _ => {}
    }
    for b in seg.bytes() {
        match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'.' | b'-' | b'_' => {}
            b'%' => return Err(IdError::PercentEncoding),
            b'?' | b'#' => return Err(IdError::QueryOrFragment),
            b'/' => return Err(IdError::SlashInSegment),
            other => return Err(IdError::PathChar(shown(other))),
        }
    }
    Ok(())
}

/// Checks a path (`""` or `/seg/seg`), returning nothing on success.
fn check_path(path: &str) -> Result<(), IdError> {
    if path.is_empty() {
        return Ok(());
    }
    // The caller split at the first '/', so the path starts with one.
    let rest = &path[1..];
    if rest.is_empty() || rest.ends_with('/') {
        return Err(IdError::TrailingSlash);
    }
    rest.split('/').try_for_each(check_segment)
}

/// A SPIFFE trust domain name, such as `example.org`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TrustDomain(String);

impl TrustDomain {
    /// Parses a bare trust domain name (no scheme).
    pub fn new(name: &str) -> Result<Self, IdError> {
        check_trust_domain(name)?;
        Ok(Self(name.to_owned()))
    }

    /// Parses either a bare name or a `spiffe://name` ID without path.
    pub fn from_name_or_id(s: &str) -> Result<Self, IdError> {
        if s.starts_with(SCHEME) {
            let id = SpiffeId::parse(s)?;
            if !id.path().is_empty() {
                return Err(IdError::PathChar('/'));
            }
            Ok(id.trust_domain())
        } else {
            Self::new(s)
        }
    }

    /// The name, for example `example.org`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The trust domain's own ID, `spiffe://<name>`.
    pub fn id(&self) -> SpiffeId {
        SpiffeId {
            id: format!("{SCHEME}{}", self.0),
            td_end: SCHEME.len() + self.0.len(),
        }
    }

    /// Builds `spiffe://<td>/<seg>/<seg>…`, checking every segment on its own.
    ///
    /// Use this for anything derived from outside input (node names, token
    /// aliases, certificate fields): a segment containing `/`, `..` or `%` is
    /// refused instead of being split or cleaned.
    pub fn id_from_segments<S: AsRef<str>>(&self, segments: &[S]) -> Result<SpiffeId, IdError> {
        let mut id = self.id();
        for seg in segments {
            let seg = seg.as_ref();
            check_segment(seg)?;
            id.id.push('/');
            id.id.push_str(seg);
        }
        if id.id.len() > MAX_SPIFFE_ID_LEN {
            return Err(IdError::TooLong);
        }
        Ok(id)
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TrustDomain({})", self.0)
    }
}

impl TryFrom<String> for TrustDomain {
    type Error = IdError;
    fn try_from(s: String) -> Result<Self, IdError> {
        check_trust_domain(&s)?;
        Ok(Self(s))
    }
}

impl From<TrustDomain> for String {
    fn from(td: TrustDomain) -> String {
        td.0
    }
}

impl std::str::FromStr for TrustDomain {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        Self::new(s)
    }
}

/// A SPIFFE ID: `spiffe://<trust domain><path>`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SpiffeId {
    id: String,
    /// Byte offset where the trust domain ends and the path begins.
    td_end: usize,
}

impl SpiffeId {
    /// Parses a SPIFFE ID, applying every rule of SPEC.md "SPIFFE IDs".
    pub fn parse(s: &str) -> Result<Self, IdError> {
        Self::try_from(s.to_owned())
    }

    /// The trust domain name part.
    pub fn trust_domain_str(&self) -> &str {
        &self.id[SCHEME.len()..self.td_end]
    }

    /// The trust domain, as an owned value.
    pub fn trust_domain(&self) -> TrustDomain {
        TrustDomain(self.trust_domain_str().to_owned())
    }

    /// Whether this ID belongs to `td`.
    pub fn is_member_of(&self, td: &TrustDomain) -> bool {
        self.trust_domain_str() == td.as_str()
    }

    /// The path, `""` for a trust domain ID, otherwise starting with `/`.
    pub fn path(&self) -> &str {
        &self.id[self.td_end..]
    }

    /// The whole ID as a string.
    pub fn as_str(&self) -> &str {
        &self.id
    }

    /// Whether this ID may name a workload: it has a path, and the path is
    /// not under Sigil's reserved `/sigil/` prefix.
    pub fn check_workload_id(&self) -> Result<(), ReservedIdError> {
        if self.path().is_empty() {
            return Err(ReservedIdError::BareTrustDomain);
        }
        if self.path().starts_with(RESERVED_PATH_PREFIX) || self.path() == "/sigil" {
            return Err(ReservedIdError::SigilReserved);
        }
        Ok(())
    }

    /// The ID of the Sigil server of a trust domain.
    pub fn server(td: &TrustDomain) -> SpiffeId {
        let mut id = td.id();
        id.id.push_str("/sigil/server");
        id
    }

    /// Whether this is an agent ID (`spiffe://<td>/sigil/agent/...`).
    pub fn is_agent(&self) -> bool {
        self.path().starts_with("/sigil/agent/")
    }
}

/// The SPIFFE ID of an agent, `spiffe://<td>/sigil/agent/<attestor>/...`.
/// Only such an ID can become one, so code that takes an `AgentId` cannot be
/// handed a workload's ID by mistake. It reads as the [`SpiffeId`] it is.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct AgentId(SpiffeId);

/// An ID given as an agent's is not under `/sigil/agent/`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0} is not an agent ID (spiffe://<trust domain>/sigil/agent/...)")]
pub struct NotAgentId(pub SpiffeId);

impl AgentId {
    /// `spiffe://<td>/sigil/agent/<segments...>`; each segment is checked as
    /// in [`TrustDomain::id_from_segments`] and there must be at least one.
    pub fn from_segments<S: AsRef<str>>(td: &TrustDomain, segments: &[S]) -> Result<Self, IdError> {
        if segments.is_empty() {
            return Err(IdError::EmptySegment);
        }
        let mut all: Vec<&str> = Vec::with_capacity(segments.len() + 2);
        all.extend(["sigil", "agent"]);
        all.extend(segments.iter().map(AsRef::as_ref));
        td.id_from_segments(&all).map(Self)
    }

    /// The ID as a plain SPIFFE ID.
    pub fn as_spiffe_id(&self) -> &SpiffeId {
        &self.0
    }

    /// The plain SPIFFE ID.
    pub fn into_spiffe_id(self) -> SpiffeId {
        self.0
    }
}

impl TryFrom<SpiffeId> for AgentId {
    type Error = NotAgentId;
    fn try_from(id: SpiffeId) -> Result<Self, NotAgentId> {
        if id.is_agent() {
            Ok(Self(id))
        } else {
            Err(NotAgentId(id))
        }
    }
}

impl From<AgentId> for SpiffeId {
    fn from(id: AgentId) -> SpiffeId {
        id.0
    }
}

impl std::ops::Deref for AgentId {
    type Target = SpiffeId;
    fn deref(&self) -> &SpiffeId {
        &self.0
    }
}

impl AsRef<SpiffeId> for AgentId {
    fn as_ref(&self) -> &SpiffeId {
        &self.0
    }
}

impl std::borrow::Borrow<SpiffeId> for AgentId {
    fn borrow(&self) -> &SpiffeId {
        &self.0
    }
}

impl<'de> Deserialize<'de> for AgentId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        AgentId::try_from(SpiffeId::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for AgentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl fmt::Debug for AgentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AgentId({})", self.0.as_str())
    }
}

/// Why an otherwise valid ID may not be given to a workload.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReservedIdError {
    #[error("a workload id must have a path; the bare trust domain id is reserved")]
    BareTrustDomain,
    #[error("ids under /sigil/ are reserved for the sigil server and agents")]
    SigilReserved,
}

impl TryFrom<String> for SpiffeId {
    type Error = IdError;
    fn try_from(id: String) -> Result<Self, IdError> {
        let rest = id.strip_prefix(SCHEME).ok_or(IdError::WrongScheme)?;
        let (td, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        check_trust_domain(td)?;
        check_path(path)?;
        if id.len() > MAX_SPIFFE_ID_LEN {
            return Err(IdError::TooLong);
        }
        let td_end = SCHEME.len() + td.len();
        Ok(Self { id, td_end })
    }
}

impl From<SpiffeId> for String {
    fn from(id: SpiffeId) -> String {
        id.id
    }
}

impl std::str::FromStr for SpiffeId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        Self::parse(s)
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({})", self.id)
    }
}

#[cfg(test)]
mod tests;
