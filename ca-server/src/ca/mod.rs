//! The certificate authority: keys, CA certificates, SVID issuance and CA
//! rotation.
//!
//! - [`keys`]: the `KeyManager` trait and its disk and memory versions, and
//!   `CaSigner`, through which every CA signature is made.
//! - [`pkcs11`]: the PKCS#11 key manager: CA keys generated and used inside
//!   an HSM token (non-extractable), one logged-in session pool.
//! - [`signing`]: using a `CaSigner`: X.509 signature encoding, rcgen and
//!   JWT-signer adaptors.
//! - [`csr`]: taking only the public key from a verified CSR (the reader
//!   lives in `sigil_identity::csr`, below the server; re-exported here).
//! - [`x509`]: CA certificates (self-signed or upstream) and X509-SVIDs.
//! - [`journal`]: the persisted record of every CA key and its state.
//! - [`manager`]: `CaManager`, which rotates keys on schedule, publishes the
//!   bundle and signs X.509 and JWT SVIDs with the active keys.
//! - [`crl`]: the certificate revocation list each X.509 CA signs.

pub use sigil_identity::csr;
pub mod crl;
pub mod journal;
pub mod keys;
pub mod manager;
pub mod pkcs11;
pub mod signing;
pub mod x509;

use std::time::Duration;

use sigil_identity::TrustDomain;
use sigil_identity::jwt::JwtError;
use sigil_identity::x509::SvidError;

use crate::datastore::{DatastoreError, ServerId};

pub use manager::CaManager;

/// Why the CA could not do what was asked.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaError {
    #[error("bad CSR: {0}")]
    Csr(#[from] csr::CsrError),
    #[error("CA key: {0}")]
    Key(#[from] keys::KeyManagerError),
    #[error("CA state: {0}")]
    Datastore(#[from] DatastoreError),
    #[error("building a certificate failed: {0}")]
    Build(String),
    #[error("issued credential failed Sigil's own validation ({0}); it was not handed out")]
    SelfCheck(SvidError),
    #[error("minted JWT-SVID failed Sigil's own validation ({0}); it was not handed out")]
    JwtSelfCheck(JwtError),
    #[error("JWT-SVID: {0}")]
    Jwt(#[from] JwtError),
    #[error("upstream CA: {0}")]
    Upstream(String),
    #[error("{0} is not in trust domain {1}")]
    ForeignId(String, TrustDomain),
    #[error("the CA has no active key yet; is the server still starting?")]
    NotReady,
    #[error("the active CA has expired; check the server clock and the CA rotation logs")]
    AuthorityExpired,
}

/// Defaults from SPEC.md and the foundation issue.
pub const DEFAULT_CA_TTL: Duration = Duration::from_secs(24 * 3600);
/// Default X.509-SVID lifetime.
pub const DEFAULT_X509_SVID_TTL: Duration = Duration::from_secs(3600);
/// Default JWT-SVID lifetime.
pub const DEFAULT_JWT_SVID_TTL: Duration = sigil_identity::jwt::DEFAULT_TTL;

/// How the CA is set up.
#[derive(Debug, Clone)]
pub struct CaConfig {
    /// The trust domain everything is issued in.
    pub trust_domain: TrustDomain,
    /// Lifetime of each CA key and certificate.
    pub ca_ttl: Duration,
    /// Default X.509-SVID lifetime when an entry does not set one.
    pub x509_svid_ttl: Duration,
    /// Default JWT-SVID lifetime when an entry does not set one.
    pub jwt_svid_ttl: Duration,
    /// Algorithm of the CA's own keys.
    pub key_algorithm: keys::KeyAlgorithm,
    /// `spiffe_refresh_hint` published with the bundle.
    pub refresh_hint: Option<Duration>,
    /// This replica: its CA journal is stored under this id.
    pub server_id: ServerId,
    /// `iss` of every JWT-SVID (`ca.jwt_issuer`); none when unset.
    pub jwt_issuer: Option<String>,
}

impl CaConfig {
    /// Defaults for `trust_domain`.
    pub fn new(trust_domain: TrustDomain) -> Self {
        Self {
            trust_domain,
            ca_ttl: DEFAULT_CA_TTL,
            x509_svid_ttl: DEFAULT_X509_SVID_TTL,
            jwt_svid_ttl: DEFAULT_JWT_SVID_TTL,
            key_algorithm: keys::KeyAlgorithm::EcP256,
            refresh_hint: None,
            server_id: ServerId::local(),
            jwt_issuer: None,
        }
    }
}
