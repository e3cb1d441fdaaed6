//! TLS to PostgreSQL on the rustls/ring stack of the rest of Sigil, by
//! libpq's `sslmode`: `verify-full` checks the chain to `sslrootcert` and
//! the host name; `verify-ca` (or `require` with a root) the chain only;
//! `require` and `prefer` without a root encrypt without checking the
//! certificate, as libpq does (a warning says so at startup).

use std::path::Path;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::settings::{PgSettings, SettingsError, TlsMode};

/// The connector for `settings`' TLS mode.
pub fn connector(settings: &PgSettings) -> Result<MakeRustlsConnect, SettingsError> {
    let provider = sigil_identity::tls::provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| SettingsError::Connection(format!("TLS setup: {e}")))?;
    let verifier: Arc<dyn ServerCertVerifier> = match (&settings.root_cert, settings.tls) {
        (Some(root), mode) if mode != TlsMode::Disable => {
            let roots = Arc::new(root_store(root)?);
            let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                .build()
                .map_err(|e| SettingsError::RootCert(root.clone(), e.to_string()))?;
            match mode {
                TlsMode::VerifyFull => webpki,
                _ => Arc::new(ChainOnly(webpki)),
            }
        }
        // `prefer`/`require` without a root: any certificate is accepted
        // (the handshake signature is still checked), as libpq does; risky,
        // and named so in the startup warning.
        _ => sigil_identity::tls::InsecureAnyServer::new(),
    };
    let config = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

/// Whether the mode encrypts without checking who the server is.
pub fn is_unverified(settings: &PgSettings) -> bool {
    matches!(settings.tls, TlsMode::Prefer | TlsMode::Require) && settings.root_cert.is_none()
}

fn root_store(path: &Path) -> Result<rustls::RootCertStore, SettingsError> {
    let bad = |why: String| SettingsError::RootCert(path.to_owned(), why);
    let mut store = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(path).map_err(|e| bad(e.to_string()))? {
        let cert = cert.map_err(|e| bad(e.to_string()))?;
        store.add(cert).map_err(|e| bad(e.to_string()))?;
    }
    if store.is_empty() {
        return Err(bad("no certificate in the file".into()));
    }
    Ok(store)
}

/// `verify-ca`: the chain must verify; the name is not checked.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}
