//! The records behind per-SVID revocation: which X509-SVIDs were issued
//! (so `x509 revoke --entry` finds them), which are revoked, and the
//! signed CRL of each CA. All are kept only until the certificate (or, for
//! a CRL, its CA) expires: after NotAfter a serial no longer matters.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use sigil_identity::SpiffeId;
use sigil_identity::clock::serde_unix_seconds;

/// One issued X509-SVID (workload or agent).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuanceRecord {
    /// The leaf's serial, lowercase hex without leading zeros.
    pub serial: String,
    /// The SPIFFE ID it names.
    pub spiffe_id: SpiffeId,
    /// The issuing CA: its SubjectKeyIdentifier, lowercase hex.
    pub issuer: String,
    /// The leaf's NotAfter; the record is pruned after it.
    #[serde(with = "serde_unix_seconds")]
    pub not_after: SystemTime,
}

/// Why a certificate was revoked (RFC 5280 CRLReason; the subset an
/// operator picks from).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum RevocationReason {
    #[default]
    Unspecified,
    KeyCompromise,
    AffiliationChanged,
    Superseded,
    CessationOfOperation,
}

impl RevocationReason {
    /// Every reason, by its name on the command line.
    pub const ALL: [(&'static str, Self); 5] = [
        ("unspecified", Self::Unspecified),
        ("key-compromise", Self::KeyCompromise),
        ("affiliation-changed", Self::AffiliationChanged),
        ("superseded", Self::Superseded),
        ("cessation-of-operation", Self::CessationOfOperation),
    ];

    /// Parses a command-line name (`key-compromise`, ...).
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name) || n.replace('-', "_") == name)
            .map(|(_, r)| *r)
    }

    /// The command-line name.
    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(_, r)| *r == self)
            .map_or("unspecified", |(n, _)| n)
    }
}

/// One revoked X509-SVID.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevocationRecord {
    /// The leaf's serial, lowercase hex.
    pub serial: String,
    /// The SPIFFE ID it named.
    pub spiffe_id: SpiffeId,
    /// The issuing CA's SubjectKeyIdentifier, lowercase hex.
    pub issuer: String,
    /// The leaf's NotAfter: the serial leaves the CRL after it.
    #[serde(with = "serde_unix_seconds")]
    pub not_after: SystemTime,
    /// When the operator revoked it.
    #[serde(with = "serde_unix_seconds")]
    pub revoked_at: SystemTime,
    pub reason: RevocationReason,
}

/// The current CRL of one CA, as signed by the replica holding its key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CrlRecord {
    /// The CA's SubjectKeyIdentifier, lowercase hex.
    pub issuer: String,
    /// The CRL number (only grows for one CA).
    pub number: u64,
    /// The CA's NotAfter; the CRL is pruned after it.
    #[serde(with = "serde_unix_seconds")]
    pub not_after: SystemTime,
    /// The CRL, DER.
    pub der: Vec<u8>,
}

impl IssuanceRecord {
    /// The revocation of this certificate at `now` for `reason`.
    pub fn revoke(&self, now: SystemTime, reason: RevocationReason) -> RevocationRecord {
        RevocationRecord {
            serial: self.serial.clone(),
            spiffe_id: self.spiffe_id.clone(),
            issuer: self.issuer.clone(),
            not_after: self.not_after,
            revoked_at: now,
            reason,
        }
    }
}
