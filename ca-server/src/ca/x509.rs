//! X.509 authorities: making CA certificates (self-signed, or signed by an
//! operator-supplied upstream CA) and issuing X509-SVIDs from them.

use std::path::Path;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose as Ku,
    SanType, SerialNumber,
};
use rustls_pki_types::CertificateDer;
use sigil_identity::x509::{self as svid, IssuerInfo};
use sigil_identity::{DnsName, SpiffeId, TrustDomain};
use time::OffsetDateTime;

use super::CaError;
use super::csr::CsrPublicKey;
use super::keys::{CaKey, KeyAlgorithm};
use super::signing::{RcgenKey, sign_x509};
use sigil_identity::der;

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
    template: LeafTemplate,
    info: IssuerInfo,
}

/// The parts of every leaf that depend only on the CA, pre-encoded, and
/// the CA's key. Issuance fills in serial, validity, key, SANs.
struct LeafTemplate {
    /// AlgorithmIdentifier of the CA's signature.
    signature_algorithm: &'static [u8],
    /// The CA's subject Name, DER: the leaf's issuer.
    issuer_name: Vec<u8>,
    /// The AuthorityKeyIdentifier extension, DER.
    aki_extension: Vec<u8>,
    signer: CaKey,
}

// Fixed DER of the leaf profile (SPEC.md "X.509-SVIDs the CA issues").
const VERSION_3: &[u8] = &[0xa0, 0x03, 0x02, 0x01, 0x02];
const ECDSA_SHA256: &[u8] = &[
    0x30, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02,
];
const ECDSA_SHA384: &[u8] = &[
    0x30, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03,
];
/// Subject `O=Sigil`.
const LEAF_SUBJECT: &[u8] = &[
    0x30, 0x10, 0x31, 0x0e, 0x30, 0x0c, 0x06, 0x03, 0x55, 0x04, 0x0a, 0x0c, 0x05, b'S', b'i', b'g',
    b'i', b'l',
];
/// BasicConstraints, critical, cA=false.
const EXT_BASIC_CONSTRAINTS: &[u8] = &[
    0x30, 0x0c, 0x06, 0x03, 0x55, 0x1d, 0x13, 0x01, 0x01, 0xff, 0x04, 0x02, 0x30, 0x00,
];
/// KeyUsage, critical: digitalSignature, keyEncipherment, keyAgreement.
const EXT_KEY_USAGE: &[u8] = &[
    0x30, 0x0e, 0x06, 0x03, 0x55, 0x1d, 0x0f, 0x01, 0x01, 0xff, 0x04, 0x04, 0x03, 0x02, 0x03, 0xa8,
];
/// ExtendedKeyUsage: serverAuth, clientAuth.
const EXT_EXTENDED_KEY_USAGE: &[u8] = &[
    0x30, 0x1d, 0x06, 0x03, 0x55, 0x1d, 0x25, 0x04, 0x16, 0x30, 0x14, 0x06, 0x08, 0x2b, 0x06, 0x01,
    0x05, 0x05, 0x07, 0x03, 0x01, 0x06, 0x08, 0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x02,
];
const OID_SKI: &[u8] = &[0x06, 0x03, 0x55, 0x1d, 0x0e];
const OID_AKI: &[u8] = &[0x06, 0x03, 0x55, 0x1d, 0x23];
const OID_SAN: &[u8] = &[0x06, 0x03, 0x55, 0x1d, 0x11];

/// An extension `SEQUENCE { oid, OCTET STRING { value } }` (not critical).
fn extension(oid: &[u8], value: &[u8]) -> Vec<u8> {
    let mut content = Vec::with_capacity(oid.len() + value.len() + 4);
    content.extend_from_slice(oid);
    der::push(&mut content, 0x04, value);
    der::wrap(0x30, &content)
}

/// A key identifier: the first 20 bytes of SHA-256 over the key bits.
fn key_id(key_bits: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, key_bits).as_ref()[..20].to_vec()
}

impl LeafTemplate {
    fn new(
        ca: &x509_parser::certificate::X509Certificate<'_>,
        ski: &[u8],
        key: &CaKey,
    ) -> Result<Self, CaError> {
        let signature_algorithm = match key.algorithm() {
            KeyAlgorithm::EcP256 => ECDSA_SHA256,
            KeyAlgorithm::EcP384 => ECDSA_SHA384,
        };
        let mut aki = Vec::with_capacity(ski.len() + 2);
        der::push(&mut aki, 0x80, ski);
        let aki_extension = extension(OID_AKI, &der::wrap(0x30, &aki));
        Ok(Self {
            signature_algorithm,
            issuer_name: ca.subject().as_raw().to_vec(),
            aki_extension,
            signer: key.clone(),
        })
    }

    /// Encodes and signs one leaf.
    fn sign(
        &self,
        spiffe_id: &SpiffeId,
        dns_names: &[DnsName],
        key: &CsrPublicKey,
        serial: &[u8],
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<Vec<u8>, CaError> {
        let unix = |t: SystemTime| {
            i64::try_from(sigil_identity::clock::unix_seconds(t)).unwrap_or(i64::MAX)
        };
        let mut tbs = Vec::with_capacity(512 + key.spki.len());
        tbs.extend_from_slice(VERSION_3);
        der::push_unsigned(&mut tbs, serial);
        tbs.extend_from_slice(self.signature_algorithm);
        tbs.extend_from_slice(&self.issuer_name);
        let mut validity = Vec::with_capacity(34);
        der::push_time(&mut validity, unix(not_before));
        der::push_time(&mut validity, unix(not_after));
        der::push(&mut tbs, 0x30, &validity);
        tbs.extend_from_slice(LEAF_SUBJECT);
        tbs.extend_from_slice(&key.spki);

        let mut names = Vec::with_capacity(spiffe_id.as_str().len() + 64);
        der::push(&mut names, 0x86, spiffe_id.as_str().as_bytes());
        for d in dns_names {
            der::push(&mut names, 0x82, d.as_str().as_bytes());
        }
        let mut exts = Vec::with_capacity(256 + names.len());
        exts.extend_from_slice(EXT_BASIC_CONSTRAINTS);
        exts.extend_from_slice(EXT_KEY_USAGE);
        exts.extend_from_slice(EXT_EXTENDED_KEY_USAGE);
        exts.extend_from_slice(&extension(
            OID_SKI,
            &der::wrap(0x04, &key_id(&key.key_bits)),
        ));
        exts.extend_from_slice(&self.aki_extension);
        exts.extend_from_slice(&extension(OID_SAN, &der::wrap(0x30, &names)));
        der::push(&mut tbs, 0xa3, &der::wrap(0x30, &exts));
        let tbs = der::wrap(0x30, &tbs);

        let signature = sign_x509(self.signer.as_ref(), &tbs)?;
        let mut cert = tbs;
        cert.extend_from_slice(self.signature_algorithm);
        cert.push(0x03);
        der::push_len(&mut cert, signature.len() + 1);
        cert.push(0);
        cert.extend_from_slice(&signature);
        Ok(der::wrap(0x30, &cert))
    }
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
    /// The issuing CA's SubjectKeyIdentifier, lowercase hex.
    pub issuer: String,
}

impl X509Authority {
    /// Creates a new CA certificate for `key`, valid from `not_before` to
    /// `not_after` (capped at the upstream's expiry), self-signed or signed
    /// by `upstream`.
    pub fn create(
        td: &TrustDomain,
        key: &CaKey,
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
        let signer = RcgenKey(key.as_ref());
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
        key: &CaKey,
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
        if cert.public_key().subject_public_key.data.as_ref() != key.public_key() {
            return Err(CaError::Build(
                "CA key does not match its certificate".into(),
            ));
        }
        let info = IssuerInfo {
            ski: svid::subject_key_id(&cert)
                .ok_or(CaError::SelfCheck(svid::SvidError::MissingSki))?,
            not_after: svid::validity(&cert).1,
        };
        let template = LeafTemplate::new(&cert, &info.ski, key)?;
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
            template,
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
        let not_after = whole_seconds(
            now.checked_add(ttl)
                .map_or(self.info.not_after, |t| t.min(self.info.not_after)),
        );
        let not_before = now.checked_sub(BACKDATE).unwrap_or(now);
        // 128 random bits, encoded as a positive INTEGER.
        let serial = sigil_identity::random::bytes::<16>();
        let serial_hex = svid::serial_hex_of(&serial);
        let leaf = self.template.sign(
            spiffe_id, dns_names, public_key, &serial, not_before, not_after,
        )?;
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
            issuer: sigil_identity::random::hex(&self.info.ski),
        })
    }
}
