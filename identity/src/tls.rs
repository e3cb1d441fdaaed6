//! SPIFFE authentication for rustls (TLS 1.3, ring): certificate verifiers
//! that accept a peer by its X509-SVID and an authorization rule on its
//! SPIFFE ID, and a resolver that serves a rotating SVID.
//!
//! Verification ignores DNS names entirely: the peer is who its URI SAN
//! says, if the chain verifies against the current bundle of its trust
//! domain and the caller's rule accepts the ID. A peer of another trust
//! domain is verified against that trust domain's bundle when the verifier
//! was given [`FederatedBundles`] holding it (SPIFFE federation), and
//! refused otherwise.

mod federated;

pub use self::federated::FederatedBundles;

use std::fmt;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::bundle::Bundle;
pub use crate::crl::SharedCrls;
use crate::spiffe_id::SpiffeId;
use crate::x509::{SvidError, verify_svid};

/// The crypto provider Sigil uses everywhere: ring.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A bundle that can be swapped while connections use it.
#[derive(Debug)]
pub struct SharedBundle(RwLock<Arc<Bundle>>);

impl SharedBundle {
    /// Starts with `bundle`.
    pub fn new(bundle: Bundle) -> Self {
        Self(RwLock::new(Arc::new(bundle)))
    }

    /// The current bundle.
    pub fn get(&self) -> Arc<Bundle> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Replaces the bundle.
    pub fn set(&self, bundle: Arc<Bundle>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = bundle;
    }
}

/// Who may connect: a rule on the peer's SPIFFE ID.
pub type Authorizer = Arc<dyn Fn(&SpiffeId) -> bool + Send + Sync>;

/// Accepts exactly `id`.
pub fn authorize_id(id: SpiffeId) -> Authorizer {
    Arc::new(move |peer| *peer == id)
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct PeerRejected(String);

fn reject(msg: impl fmt::Display) -> rustls::Error {
    rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
        Arc::new(PeerRejected(msg.to_string())),
    )))
}

fn to_system_time(now: UnixTime) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(now.as_secs())
}

/// Verifies a peer chain, refuses it if a certificate of it is on a CRL
/// in `crls`, and applies the authorizer.
fn verify_peer(
    bundle: &SharedBundle,
    crls: Option<&SharedCrls>,
    federated: Option<&FederatedBundles>,
    authorize: &Authorizer,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
) -> Result<SpiffeId, rustls::Error> {
    let mut chain = Vec::with_capacity(1 + intermediates.len());
    chain.push(end_entity.to_vec());
    chain.extend(intermediates.iter().map(|c| c.to_vec()));
    let trusted = federated::bundle_for(bundle.get(), federated, end_entity);
    let id =
        verify_svid(&chain, &trusted, to_system_time(now)).map_err(|e: SvidError| reject(e))?;
    if let Some(crls) = crls {
        let revoked = crls.get();
        if chain.iter().any(|c| revoked.is_revoked(c)) {
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Revoked,
            ));
        }
    }
    if !authorize(&id) {
        return Err(reject(format_args!("peer {id} is not authorized")));
    }
    Ok(id)
}

/// The handshake-signature methods every verifier here shares (both
/// rustls verifier traits require them): checked with `self.provider`.
macro_rules! handshake_signatures {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            verify_tls12_signature(
                message,
                cert,
                dss,
                &self.provider.signature_verification_algorithms,
            )
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            verify_tls13_signature(
                message,
                cert,
                dss,
                &self.provider.signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.provider
                .signature_verification_algorithms
                .supported_schemes()
        }
    };
}

/// Verifies servers by SPIFFE ID (clients use it).
pub struct SpiffeServerVerifier {
    bundle: Arc<SharedBundle>,
    federated: Option<Arc<FederatedBundles>>,
    authorize: Authorizer,
    provider: Arc<CryptoProvider>,
    crls: Option<Arc<SharedCrls>>,
}

impl fmt::Debug for SpiffeServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpiffeServerVerifier")
            .finish_non_exhaustive()
    }
}

impl SpiffeServerVerifier {
    /// Trusts `bundle`, accepts servers for which `authorize` holds.
    pub fn new(bundle: Arc<SharedBundle>, authorize: Authorizer) -> Self {
        Self {
            bundle,
            federated: None,
            authorize,
            provider: provider(),
            crls: None,
        }
    }

    /// Also refuses servers whose certificate is on a CRL of `crls`.
    pub fn with_crls(mut self, crls: Arc<SharedCrls>) -> Self {
        self.crls = Some(crls);
        self
    }

    /// Also accepts servers of the federated trust domains in `federated`,
    /// each verified against its own bundle.
    pub fn with_federated(mut self, federated: Arc<FederatedBundles>) -> Self {
        self.federated = Some(federated);
        self
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        verify_peer(
            &self.bundle,
            self.crls.as_deref(),
            self.federated.as_deref(),
            &self.authorize,
            end_entity,
            intermediates,
            now,
        )
        .map(|_| ServerCertVerified::assertion())
    }

    handshake_signatures!();
}

/// Verifies clients by SPIFFE ID (servers use it).
pub struct SpiffeClientVerifier {
    bundle: Arc<SharedBundle>,
    federated: Option<Arc<FederatedBundles>>,
    authorize: Authorizer,
    mandatory: bool,
    provider: Arc<CryptoProvider>,
    crls: Option<Arc<SharedCrls>>,
}

impl fmt::Debug for SpiffeClientVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpiffeClientVerifier")
            .field("mandatory", &self.mandatory)
            .finish_non_exhaustive()
    }
}

impl SpiffeClientVerifier {
    /// Trusts `bundle`, accepts clients for which `authorize` holds. With
    /// `mandatory` false, clients without a certificate are let through and
    /// the application decides per request.
    pub fn new(bundle: Arc<SharedBundle>, authorize: Authorizer, mandatory: bool) -> Self {
        Self {
            bundle,
            federated: None,
            authorize,
            mandatory,
            provider: provider(),
            crls: None,
        }
    }

    /// Also refuses clients whose certificate is on a CRL of `crls`.
    pub fn with_crls(mut self, crls: Arc<SharedCrls>) -> Self {
        self.crls = Some(crls);
        self
    }

    /// Also accepts clients of the federated trust domains in `federated`,
    /// each verified against its own bundle.
    pub fn with_federated(mut self, federated: Arc<FederatedBundles>) -> Self {
        self.federated = Some(federated);
        self
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        verify_peer(
            &self.bundle,
            self.crls.as_deref(),
            self.federated.as_deref(),
            &self.authorize,
            end_entity,
            intermediates,
            now,
        )
        .map(|_| ClientCertVerified::assertion())
    }

    handshake_signatures!();
}

/// Accepts any server certificate, still checking that the handshake is
/// signed by the key in the certificate presented. Only for the modes that
/// say "insecure" in their name (`insecure_bootstrap`,
/// `insecure_skip_kubelet_verify`).
#[derive(Debug)]
pub struct InsecureAnyServer {
    provider: Arc<CryptoProvider>,
}

impl InsecureAnyServer {
    /// The verifier, on Sigil's crypto provider.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            provider: provider(),
        })
    }
}

impl ServerCertVerifier for InsecureAnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    handshake_signatures!();
}

/// Serves the current SVID on both sides of a connection; swap it on
/// rotation and new handshakes pick it up.
#[derive(Debug)]
pub struct SvidResolver(RwLock<Arc<CertifiedKey>>);

impl SvidResolver {
    /// Starts with `key`.
    pub fn new(key: Arc<CertifiedKey>) -> Self {
        Self(RwLock::new(key))
    }

    /// Replaces the SVID.
    pub fn set(&self, key: Arc<CertifiedKey>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = key;
    }

    /// The SVID presented by handshakes starting now.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl rustls::server::ResolvesServerCert for SvidResolver {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

impl rustls::client::ResolvesClientCert for SvidResolver {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Builds a rustls key from a DER chain (leaf first) and a PKCS#8 key.
pub fn certified_key(chain: &[Vec<u8>], pkcs8: &[u8]) -> Result<Arc<CertifiedKey>, rustls::Error> {
    let key = provider()
        .key_provider
        .load_private_key(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            pkcs8.to_vec(),
        )))?;
    let certs = chain
        .iter()
        .map(|c| CertificateDer::from(c.clone()))
        .collect();
    Ok(Arc::new(CertifiedKey::new(certs, key)))
}

/// TLS 1.3-only server config that authenticates clients by SVID.
///
/// Session resumption is off on both sides: a resumed session carries the
/// peer certificate of its first handshake, so it would keep authenticating
/// a peer by an SVID that has since been rotated away (or has expired).
pub fn server_config(
    resolver: Arc<SvidResolver>,
    verifier: Arc<SpiffeClientVerifier>,
) -> Result<rustls::ServerConfig, rustls::Error> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(resolver);
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    Ok(cfg)
}

/// TLS 1.3-only client config: server verified by SVID; client certificate
/// from `resolver` when given.
pub fn client_config(
    verifier: Arc<SpiffeServerVerifier>,
    resolver: Option<Arc<SvidResolver>>,
) -> Result<rustls::ClientConfig, rustls::Error> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut cfg = match resolver {
        Some(r) => builder.with_client_cert_resolver(r),
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::TrustDomain;
    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
        KeyUsagePurpose, SanType,
    };

    /// A CA (as a bundle) and SVIDs for `ids` signed by it.
    fn pki(ids: &[&str]) -> (Bundle, Vec<Arc<CertifiedKey>>) {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::default();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        ca.subject_alt_names = vec![SanType::URI("spiffe://example.org".try_into().unwrap())];
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::from_params(&ca, &ca_key);
        let mut bundle = Bundle::new(TrustDomain::new("example.org").unwrap());
        bundle.x509_authorities = vec![ca_cert.der().to_vec()];
        let keys = ids
            .iter()
            .map(|id| {
                let key = KeyPair::generate().unwrap();
                let mut p = CertificateParams::default();
                p.subject_alt_names = vec![SanType::URI((*id).try_into().unwrap())];
                p.is_ca = IsCa::ExplicitNoCa;
                p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
                p.use_authority_key_identifier_extension = true;
                p.extended_key_usages = vec![
                    ExtendedKeyUsagePurpose::ServerAuth,
                    ExtendedKeyUsagePurpose::ClientAuth,
                ];
                let cert = p.signed_by(&key, &issuer).unwrap();
                certified_key(&[cert.der().to_vec()], &key.serialize_der()).unwrap()
            })
            .collect();
        (bundle, keys)
    }

    /// Runs one handshake in memory; whether it was resumed, and the
    /// client certificate the server saw.
    fn handshake(
        client: &Arc<rustls::ClientConfig>,
        server: &Arc<rustls::ServerConfig>,
    ) -> (rustls::HandshakeKind, Vec<u8>) {
        let mut c = rustls::ClientConnection::new(
            client.clone(),
            rustls::pki_types::ServerName::try_from("svid.test").unwrap(),
        )
        .unwrap();
        let mut s = rustls::ServerConnection::new(server.clone()).unwrap();
        let mut buf = Vec::new();
        for _ in 0..20 {
            buf.clear();
            while c.wants_write() {
                c.write_tls(&mut buf).unwrap();
            }
            s.read_tls(&mut buf.as_slice()).unwrap();
            s.process_new_packets().unwrap();
            buf.clear();
            while s.wants_write() {
                s.write_tls(&mut buf).unwrap();
            }
            c.read_tls(&mut buf.as_slice()).unwrap();
            c.process_new_packets().unwrap();
            if !c.is_handshaking() && !s.is_handshaking() {
                break;
            }
        }
        assert!(!c.is_handshaking() && !s.is_handshaking());
        let seen = s.peer_certificates().unwrap()[0].as_ref().to_vec();
        (c.handshake_kind().unwrap(), seen)
    }

    #[test]
    fn sessions_are_never_resumed_so_a_rotated_svid_is_presented() {
        let (bundle, keys) = pki(&[
            "spiffe://example.org/server",
            "spiffe://example.org/client",
            "spiffe://example.org/client",
        ]);
        let bundle = Arc::new(SharedBundle::new(bundle));
        let server_id = SpiffeId::parse("spiffe://example.org/server").unwrap();
        let client_id = SpiffeId::parse("spiffe://example.org/client").unwrap();
        let server = Arc::new(
            server_config(
                Arc::new(SvidResolver::new(keys[0].clone())),
                Arc::new(SpiffeClientVerifier::new(
                    bundle.clone(),
                    authorize_id(client_id),
                    true,
                )),
            )
            .unwrap(),
        );
        let client_svid = Arc::new(SvidResolver::new(keys[1].clone()));
        let client = Arc::new(
            client_config(
                Arc::new(SpiffeServerVerifier::new(bundle, authorize_id(server_id))),
                Some(client_svid.clone()),
            )
            .unwrap(),
        );
        let (kind, first) = handshake(&client, &server);
        assert_eq!(kind, rustls::HandshakeKind::Full);
        assert_eq!(first, keys[1].cert[0].as_ref());

        client_svid.set(keys[2].clone());
        let (kind, second) = handshake(&client, &server);
        assert_eq!(kind, rustls::HandshakeKind::Full, "no resumption");
        assert_eq!(
            second,
            keys[2].cert[0].as_ref(),
            "the rotated SVID was presented"
        );
    }
}
