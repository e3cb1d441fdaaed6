//! This trust domain's SPIFFE bundle endpoint (`[bundle_endpoint]`): HTTPS
//! `GET` answered with the current bundle as a SPIFFE JWK Set
//! (`spiffe_sequence`, `spiffe_refresh_hint`). No client authentication is
//! asked for (SPIFFE Federation). The server presents its own X509-SVID
//! (`https_spiffe`, renewed with it) or a configured Web PKI certificate
//! (`https_web`).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use rustls::server::ResolvesServerCert;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use super::{BundleEndpointSection, ProfileKind};
use crate::ca::CaManager;

/// Connections served at once; more wait in the kernel's backlog.
const MAX_CONNECTIONS: usize = 256;
/// Time for a TLS handshake and the request head.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("bundle_endpoint: cannot listen on {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
    #[error("bundle_endpoint: {0}")]
    Certificate(String),
    #[error("bundle_endpoint: TLS setup: {0}")]
    Tls(#[from] rustls::Error),
}

/// Loads the `https_web` certificate chain and PKCS#8 key.
fn web_certificate(
    cfg: &BundleEndpointSection,
) -> Result<Arc<rustls::sign::CertifiedKey>, EndpointError> {
    let (Some(cert_file), Some(key_file)) = (&cfg.cert_file, &cfg.key_file) else {
        return Err(EndpointError::Certificate(
            "profile \"https_web\" needs cert_file and key_file".into(),
        ));
    };
    let read = |p: &std::path::Path| {
        std::fs::read_to_string(p)
            .map_err(|e| EndpointError::Certificate(format!("cannot read {}: {e}", p.display())))
    };
    let chain = sigil_identity::pem::decode_all("CERTIFICATE", &read(cert_file)?)
        .map_err(|e| EndpointError::Certificate(format!("{}: {e}", cert_file.display())))?;
    if chain.is_empty() {
        return Err(EndpointError::Certificate(format!(
            "{} holds no CERTIFICATE block",
            cert_file.display()
        )));
    }
    let key = sigil_identity::pem::decode_all("PRIVATE KEY", &read(key_file)?)
        .map_err(|e| EndpointError::Certificate(format!("{}: {e}", key_file.display())))?
        .into_iter()
        .next()
        .ok_or_else(|| {
            EndpointError::Certificate(format!(
                "{} holds no PKCS#8 \"PRIVATE KEY\" block",
                key_file.display()
            ))
        })?;
    sigil_identity::tls::certified_key(&chain, &key)
        .map_err(|e| EndpointError::Certificate(format!("certificate and key: {e}")))
}

/// A resolver that always presents one certificate.
#[derive(Debug)]
struct Fixed(Arc<rustls::sign::CertifiedKey>);

impl ResolvesServerCert for Fixed {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// The TLS acceptor for `cfg`: `svid` serves `https_spiffe`.
pub fn acceptor(
    cfg: &BundleEndpointSection,
    svid: Arc<dyn ResolvesServerCert>,
) -> Result<TlsAcceptor, EndpointError> {
    let resolver: Arc<dyn ResolvesServerCert> = match cfg.profile {
        ProfileKind::HttpsSpiffe => svid,
        ProfileKind::HttpsWeb => Arc::new(Fixed(web_certificate(cfg)?)),
    };
    let mut config = rustls::ServerConfig::builder_with_provider(sigil_identity::tls::provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// The body served: the CA's current bundle as a SPIFFE JWK Set, with the
/// configured refresh hint when one is set.
fn body(ca: &CaManager, hint: Option<Duration>) -> Bytes {
    let mut bundle = (*ca.bundle()).clone();
    if hint.is_some() {
        bundle.refresh_hint = hint;
    }
    Bytes::from(bundle.to_jwks_bytes())
}

fn answer<B>(
    req: &http::Request<B>,
    ca: &CaManager,
    hint: Option<Duration>,
) -> http::Response<Full<Bytes>> {
    let (status, content_type, body) = if req.method() == http::Method::GET {
        (http::StatusCode::OK, "application/json", body(ca, hint))
    } else {
        (
            http::StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            Bytes::from_static(b"only GET is served\n"),
        )
    };
    let mut r = http::Response::new(Full::new(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    r
}

/// Binds `cfg.address`; the listener and its bound address.
pub async fn bind(cfg: &BundleEndpointSection) -> Result<TcpListener, EndpointError> {
    TcpListener::bind(cfg.address)
        .await
        .map_err(|e| EndpointError::Bind(cfg.address, e))
}

/// Serves the bundle on `listener` until `stop`.
pub async fn serve(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    ca: Arc<CaManager>,
    cfg: BundleEndpointSection,
    mut stop: watch::Receiver<bool>,
) {
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    info!(address = ?listener.local_addr().ok(), profile = cfg.profile.as_str(), "bundle endpoint serving");
    loop {
        let permit = tokio::select! {
            _ = stop.changed() => return,
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let (tcp, peer) = tokio::select! {
            _ = stop.changed() => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, "bundle endpoint: accept failed; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let (acceptor, ca, hint) = (acceptor.clone(), ca.clone(), cfg.refresh_hint);
        tokio::spawn(async move {
            let _permit = permit;
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => {
                    debug!(%peer, error = %e, "bundle endpoint: TLS handshake failed");
                    return;
                }
                Err(_) => {
                    debug!(%peer, "bundle endpoint: TLS handshake timed out");
                    return;
                }
            };
            let service = hyper::service::service_fn(move |req| {
                let ca = ca.clone();
                async move { Ok::<_, Infallible>(answer(&req, &ca, hint)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HANDSHAKE_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(tls), service);
            if let Err(e) = conn.await {
                debug!(%peer, error = %e, "bundle endpoint connection ended with an error");
            }
        });
    }
}
