//! A one-route-table HTTPS server on 127.0.0.1 for the fakes in Sigil's
//! tests (issuer, API server, kubelet). Certificates come from rcgen.
//! Also [`openssl`]: openssl(1) as a second, independent X.509 verifier,
//! here so that any crate's tests can use it without depending on the
//! end-to-end crate (which depends on the server and the agent).
//!
//! Test code only: crates take it as a dev-dependency, so no published
//! build contains it. It panics on any setup failure, which fails the test.
//!
//! # Layout
//! - this file: [`FakeServer`], the one-route-table HTTPS fake ([`Routes`],
//!   [`Hits`]).
//! - [`openssl`]: openssl(1) as a second, independent X.509 verifier.
//! - [`softhsm`]: a private SoftHSM2 token for PKCS#11 tests.
#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

pub mod openssl;
pub mod softhsm;

/// A route's answer: status and body.
pub type Routes = Arc<Mutex<HashMap<String, (u16, Vec<u8>)>>>;
/// Requests seen: path and `Authorization` header.
pub type Hits = Arc<Mutex<Vec<(String, Option<String>)>>>;

/// A running fake.
#[derive(Debug)]
pub struct FakeServer {
    pub base_url: String,
    pub ca_der: Vec<u8>,
    pub routes: Routes,
    pub hits: Hits,
    /// How long each answer is held back (zero unless set).
    pub delay: Arc<Mutex<Duration>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeServer {
    /// Sets the answer for `path`.
    pub fn route(&self, path: &str, status: u16, body: impl Into<Vec<u8>>) {
        self.routes
            .lock()
            .unwrap()
            .insert(path.to_owned(), (status, body.into()));
    }

    /// Holds every later answer back for `delay` (after the request was
    /// counted), so that concurrent clients overlap.
    pub fn set_delay(&self, delay: Duration) {
        *self.delay.lock().unwrap() = delay;
    }

    /// Requests seen for `path`.
    pub fn hits(&self, path: &str) -> usize {
        self.hits
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _)| p == path)
            .count()
    }
}

/// Starts a fake HTTPS server with a certificate for 127.0.0.1 and
/// `localhost`, issued by a fresh CA.
pub async fn start() -> FakeServer {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "fake CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf_params =
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .unwrap();
    let leaf = leaf_params.signed_by(&leaf_key, &issuer).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(sigil_identity::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            rustls::pki_types::PrivateKeyDer::try_from(leaf_key.serialize_der()).unwrap(),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let routes: Routes = Arc::default();
    let hits: Hits = Arc::default();
    let delay: Arc<Mutex<Duration>> = Arc::default();
    let (r, h, d) = (routes.clone(), hits.clone(), delay.clone());
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (acceptor, r, h, d) = (acceptor.clone(), r.clone(), h.clone(), d.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = hyper::service::service_fn(move |req: hyper::Request<_>| {
                    let path = req.uri().path().to_owned();
                    let auth = req
                        .headers()
                        .get("authorization")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned);
                    h.lock().unwrap().push((path.clone(), auth));
                    let (status, body) = r
                        .lock()
                        .unwrap()
                        .get(&path)
                        .cloned()
                        .unwrap_or((404, b"{\"kind\":\"Status\",\"code\":404}".to_vec()));
                    let pause = *d.lock().unwrap();
                    async move {
                        tokio::time::sleep(pause).await;
                        Ok::<_, Infallible>(
                            hyper::Response::builder()
                                .status(status)
                                .header("content-type", "application/json")
                                .body(Full::new(Bytes::from(body)))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    FakeServer {
        base_url: format!("https://127.0.0.1:{}", addr.port()),
        ca_der: ca_cert.der().to_vec(),
        routes,
        hits,
        delay,
        task,
    }
}
