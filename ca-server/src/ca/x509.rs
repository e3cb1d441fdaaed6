//! X.509 authorities: making CA certificates (self-signed, or signed by an
//! operator-supplied upstream CA) and issuing X509-SVIDs from them.

use std::path::Path;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose as Eku, IsCa, Issuer,
    KeyPair, KeyUsagePurpose as Ku, SanType, SerialNumber,
};
use rustls_pki_types::CertificateDer;
use sigil_identity::x509::{self as svid, IssuerInfo};
use sigil_identity::{DnsName, SpiffeId, TrustDomain};
use time::OffsetDateTime;

use super::CaError;
use super::csr::CsrPublicKey;
use super::keys::PrivateKey;

/// How far back NotBefore is set, to absorb clock skew between machines.
pub const BACKDATE: Duration = Duration::from_secs(10);

/// Organisation name in the subject of everything Sigil issues.
const ORGANIZATION: &str = "Sigil";

fn random_serial() -> SerialNumber {
    // 128 random bits; rcgen encodes them as a positive INTEGER.
    SerialNumber::from_slice(&sigil_identity::random::bytes::<16>())
}

fn rcgen_err(e: rcgen::Error) -> CaError {
    CaError::Build(e.to_string())
}

fn to_offset(t: SystemTime) -> OffsetDateTime {
    OffsetDateTime::from(t)
}

/// Drops sub-second precision, as X.509 times do.
fn whole_seconds(t: SystemTime) -> SystemTime {
    sigil_identity::clock::from_unix_seconds(sigil_identity::clock::unix_seconds(t))
}

/// An operator-supplied CA that signs Sigil's intermediate CAs.
pub struct UpstreamCa {
    /// The upstream certificate chain: the signing CA first, the root last.
    chain: Vec<Vec<u8>>,
    issuer: Issuer<'static, KeyPair>,
    not_after: SystemTime,
}

impl std::fmt::Debug for UpstreamCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamCa")
            .field("chain_len", &self.chain.len())
            .finish_non_exhaustive()
    }
}

impl UpstreamCa {
    /// Reads the upstream CA certificate chain (PEM, signing CA first) and
    /// its PKCS#8 PEM private key from disk.
    pub fn load(cert_path: &Path, key_path: &Path, td: &TrustDomain) -> Result<Self, CaError> {
        let read = |p: &Path| {
            std::fs::read_to_string(p)
                .map_err(|e| CaError::Upstream(format!("cannot read {}: {e}", p.display())))
        };
        Self::from_pem(&read(cert_path)?, &read(key_path)?, td)
    }

    /// Builds from PEM text.
    pub fn from_pem(cert_pem: &str, key_pem: &str, td: &TrustDomain) -> Result<Self, CaError> {
        let chain = sigil_identity::pem::decode_all("CERTIFICATE", cert_pem)
            .map_err(|e| CaError::Upstream(format!("upstream certificate: {e}")))?;
        let key = KeyPair::from_pem(key_pem).map_err(|e| {
            CaError::Upstream(format!(
                "upstream key must be an unencrypted PKCS#8 PEM (BEGIN PRIVATE KEY); convert with \
                 `openssl pkcs8 -topk8 -nocrypt`: {e}"
            ))
        })?;
        let signing = svid::parse(&chain[0])
            .map_err(|e| CaError::Upstream(format!("upstream certificate: {e}")))?;
        svid::check_ca(&signing, td).map_err(|e| {
            CaError::Upstream(format!("upstream certificate is not a usable CA: {e}"))
        })?;
        if signing.public_key().subject_public_key.data.as_ref()
            != rcgen::PublicKeyData::der_bytes(&key)
        {
            return Err(CaError::Upstream(
                "upstream key does not match the upstream certificate".into(),
            ));
        }
        let not_after = svid::validity(&signing).1;
        let issuer = Issuer::from_ca_cert_der(&CertificateDer::from(chain[0].as_slice()), key)
            .map_err(|e| CaError::Upstream(format!("upstream certificate: {e}")))?;
        Ok(Self {
            chain,
            issuer,
            not_after,
        })
    }

    /// The certificates to publish in the bundle: the upstream root.
    pub fn roots(&self) -> Vec<Vec<u8>> {
        self.chain.last().cloned().into_iter().collect()
    }

    /// When the upstream CA expires; no intermediate outlives it.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }
}

/// One X.509 CA: its certificate and a signer for SVIDs.
pub struct X509Authority {
    cert_der: Vec<u8>,
    /// Certificates that follow this CA's in SVID chains.
    chain_tail: Vec<Vec<u8>>,
    /// Whether SVID chains carry this CA's certificate (intermediate mode).
    include_self: bool,
    issuer: Issuer<'static, KeyPair>,
    info: IssuerInfo,
}

impl std::fmt::Debug for X509Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("X509Authority")
            .field("not_after", &self.info.not_after)
            .finish_non_exhaustive()
    }
}

/// A freshly issued X509-SVID.
#[derive(Debug, Clone)]
pub struct IssuedSvid {
    /// DER certificates, leaf first, then any intermediates.
    pub chain: Vec<Vec<u8>>,
    /// The leaf's serial, hex.
    pub serial: String,
    /// The leaf's NotAfter.
    pub expires_at: SystemTime,
}

impl X509Authority {
    /// Creates a new CA certificate for `key`, valid from `not_before` to
    /// `not_after` (capped at the upstream's expiry), self-signed or signed
    /// by `upstream`.
    pub fn create(
        td: &TrustDomain,
        key: &PrivateKey,
        not_before: SystemTime,
        not_after: SystemTime,
        upstream: Option<&UpstreamCa>,
    ) -> Result<Self, CaError> {
        let not_after = upstream.map_or(not_after, |u| not_after.min(u.not_after));
        let serial = random_serial();
        let mut p = CertificateParams::default();
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![Ku::KeyCertSign, Ku::CrlSign];
        p.distinguished_name
            .push(DnType::OrganizationName, ORGANIZATION);
        p.distinguished_name.push(
            DnType::CommonName,
            format!("Sigil CA {}", svid::serial_hex_of(serial.as_ref())),
        );
        p.subject_alt_names = vec![SanType::URI(
            td.id().as_str().try_into().map_err(rcgen_err)?,
        )];
        p.serial_number = Some(serial);
        p.not_before = to_offset(not_before);
        p.not_after = to_offset(not_after);
        p.use_authority_key_identifier_extension = true;
        let signer = key.rcgen().map_err(rcgen_err)?;
        let cert = match upstream {
            Some(u) => p.signed_by(&signer, &u.issuer),
            None => p.self_signed(&signer),
        }
        .map_err(rcgen_err)?;
        Self::load(cert.der(), key, upstream)
    }

    /// Rebuilds an authority from its certificate and key (after restart).
    pub fn load(
        cert_der: &[u8],
        key: &PrivateKey,
        upstream: Option<&UpstreamCa>,
    ) -> Result<Self, CaError> {
        let cert = svid::parse(cert_der).map_err(CaError::SelfCheck)?;
        let td = SpiffeId::parse(
            cert.subject_alternative_name()
                .ok()
                .flatten()
                .and_then(|san| {
                    san.value.general_names.iter().find_map(|n| match n {
                        x509_parser::extensions::GeneralName::URI(u) => Some(*u),
                        _ => None,
                    })
                })
                .unwrap_or_default(),
        )
        .map(|id| id.trust_domain())
        .map_err(|_| CaError::Build("CA certificate has no trust domain URI SAN".into()))?;
        svid::check_ca(&cert, &td).map_err(CaError::SelfCheck)?;
        let signer = key.rcgen().map_err(rcgen_err)?;
        if cert.public_key().subject_public_key.data.as_ref()
            != rcgen::PublicKeyData::der_bytes(&signer)
        {
            return Err(CaError::Build(
                "CA key does not match its certificate".into(),
            ));
        }
        let info = IssuerInfo {
            ski: svid::subject_key_id(&cert)
                .ok_or(CaError::SelfCheck(svid::SvidError::MissingSki))?,
            not_after: svid::validity(&cert).1,
        };
        let issuer =
            Issuer::from_ca_cert_der(&CertificateDer::from(cert_der), signer).map_err(rcgen_err)?;
        let (include_self, chain_tail) = match upstream {
            // The root is in the bundle; everything between it and us travels
            // with the SVID.
            Some(u) => (true, u.chain[..u.chain.len().saturating_sub(1)].to_vec()),
            None => (false, Vec::new()),
        };
        Ok(Self {
            cert_der: cert_der.to_vec(),
            chain_tail,
            include_self,
            issuer,
            info,
        })
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// The CA's NotAfter.
    pub fn not_after(&self) -> SystemTime {
        self.info.not_after
    }

    /// Issues an X509-SVID for `spiffe_id` with `dns_names` to `public_key`,
    /// valid for `ttl` from `now` (never past the CA's own expiry), and
    /// checks the result against the X509-SVID profile before returning it.
    pub fn issue(
        &self,
        spiffe_id: &SpiffeId,
        dns_names: &[DnsName],
        ttl: Duration,
        public_key: &CsrPublicKey,
        now: SystemTime,
    ) -> Result<IssuedSvid, CaError> {
        if now >= self.info.not_after {
            return Err(CaError::AuthorityExpired);
        }
        let not_after = whole_seconds((now + ttl).min(self.info.not_after));
        let serial = random_serial();
        let serial_hex = svid::serial_hex_of(serial.as_ref());
        let mut p = CertificateParams::default();
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![Ku::DigitalSignature, Ku::KeyEncipherment, Ku::KeyAgreement];
        p.extended_key_usages = vec![Eku::ServerAuth, Eku::ClientAuth];
        p.distinguished_name
            .push(DnType::OrganizationName, ORGANIZATION);
        let mut sans = Vec::with_capacity(1 + dns_names.len());
        sans.push(SanType::URI(
            spiffe_id.as_str().try_into().map_err(rcgen_err)?,
        ));
        for d in dns_names {
            sans.push(SanType::DnsName(d.as_str().try_into().map_err(rcgen_err)?));
        }
        p.subject_alt_names = sans;
        p.serial_number = Some(serial);
        p.not_before = to_offset(now.checked_sub(BACKDATE).unwrap_or(now));
        p.not_after = to_offset(not_after);
        p.use_authority_key_identifier_extension = true;
        let leaf = p
            .signed_by(public_key, &self.issuer)
            .map_err(rcgen_err)?
            .der()
            .to_vec();
        let id = svid::check_issued(&leaf, &self.info).map_err(CaError::SelfCheck)?;
        if id != *spiffe_id {
            return Err(CaError::Build(
                "issued certificate names another SPIFFE ID".into(),
            ));
        }
        let mut chain = Vec::with_capacity(2 + self.chain_tail.len());
        chain.push(leaf);
        if self.include_self {
            chain.push(self.cert_der.clone());
        }
        chain.extend(self.chain_tail.iter().cloned());
        Ok(IssuedSvid {
            chain,
            serial: serial_hex,
            expires_at: not_after,
        })
    }
}
