//! OIDC discovery for JWT-SVIDs: the optional `[oidc_discovery]` HTTPS
//! listener, so that relying parties that find an issuer's keys by OpenID
//! Connect Discovery (cloud providers' workload identity federation, API
//! gateways, PyJWT's `PyJWKClient`) can validate Sigil's JWT-SVIDs.
//!
//! Two documents are served, under the path of the configured issuer:
//! - `<issuer path>/.well-known/openid-configuration`: the discovery
//!   document ([`discovery_document`]): `issuer`, `jwks_uri`, the signing
//!   algorithms of the current keys, and the fields relying parties expect;
//! - `<issuer path>/keys` (the `jwks_uri`): the trust domain's JWT keys as
//!   an ordinary JWK Set ([`jwks`]): public keys only, each with `kid`,
//!   `use: sig` and `alg`; X.509 authorities and SPIFFE members left out.
//!
//! Both are built once per bundle change from the CA's bundle watch (a JWT
//! key prepared by rotation is published there before it signs, so relying
//! parties that honour `Cache-Control` see it in time; see
//! [`check_config`]), and answered from memory: GET and HEAD only, small
//! bodies, bounded connections, header and handshake timeouts. The serving
//! certificate and key are re-read when their files change (renewals need
//! no restart).
//!
//! `ca.jwt_issuer` puts the same issuer into every JWT-SVID's `iss`; the
//! configuration refuses an issuer here that differs from it.

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use http_body_util::Full;
use hyper::body::Bytes;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use sigil_identity::Bundle;
use sigil_identity::duration::serde_human;
use sigil_identity::keys::{Curve, PublicKey};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::{JoinHandle, JoinSet};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::ca::CaManager;
use crate::shutdown::{wait_for_stop, within_grace};
use crate::telemetry::ServerMetrics;

/// Connections served at once; more are closed on accept.
const MAX_CONNECTIONS: usize = 1024;
/// Time for a client to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time for a client to send a request's headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request head read (hyper's smallest allowed buffer).
const MAX_REQUEST_HEAD: usize = 8192;
/// How often the serving certificate and key files are checked for change.
const CERT_RELOAD_CHECK: Duration = Duration::from_secs(60);
/// Longest issuer accepted.
pub const MAX_ISSUER_LEN: usize = 255;
/// Path of the discovery document under the issuer's path.
pub const CONFIGURATION_PATH: &str = "/.well-known/openid-configuration";
/// Path of the JWK Set under the issuer's path (the `jwks_uri`).
pub const KEYS_PATH: &str = "/keys";

/// `[oidc_discovery]`: the HTTPS listener serving the discovery document
/// and the JWT keys.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OidcDiscoverySection {
    /// TCP address to listen on, e.g. `0.0.0.0:8443`.
    pub bind_address: SocketAddr,
    /// The serving certificate chain (PEM, leaf first). Relying parties
    /// check it against the issuer's host name, usually with public CAs.
    pub cert_file: PathBuf,
    /// The serving certificate's private key (PEM: PKCS#8, SEC1 or PKCS#1).
    pub key_file: PathBuf,
    /// The issuer: `https://host[:port][/path]`, no query, fragment or
    /// trailing `/`. The documents are served under its path.
    pub issuer: String,
    /// `Cache-Control: max-age` of both documents; at most a sixth of
    /// `ca.ttl`, so a cached key set is refreshed before a new key signs.
    #[serde(with = "serde_human", default = "default_max_age")]
    pub max_age: Duration,
}

fn default_max_age() -> Duration {
    Duration::from_secs(300)
}

/// Why the listener could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OidcError {
    #[error("cannot listen on {0} for OIDC discovery (oidc_discovery.bind_address): {1}")]
    Bind(SocketAddr, std::io::Error),
    #[error("oidc_discovery.cert_file {0}: {1}")]
    Cert(PathBuf, String),
    #[error("oidc_discovery.key_file {0}: {1}")]
    Key(PathBuf, String),
    #[error(
        "oidc_discovery: the key in key_file does not belong to the certificate in cert_file: {0}"
    )]
    KeyMismatch(String),
    #[error("oidc_discovery: TLS setup: {0}")]
    Tls(#[from] rustls::Error),
}

/// Checks `ca.jwt_issuer`: a non-empty string of printable characters, at
/// most [`MAX_ISSUER_LEN`] bytes.
pub fn check_jwt_issuer(issuer: &str) -> Result<(), String> {
    if issuer.is_empty()
        || issuer.len() > MAX_ISSUER_LEN
        || issuer.chars().any(|c| c.is_control() || c.is_whitespace())
    {
        return Err(format!(
            "ca.jwt_issuer must be 1 to {MAX_ISSUER_LEN} bytes without spaces or control \
             characters, e.g. \"https://oidc.example.org\""
        ));
    }
    Ok(())
}

/// The path part of an OIDC issuer (`""` for `https://host`), after
/// checking it is `https://host[:port][/path]` without user info, query,
/// fragment or trailing `/` (relying parties compare issuers as strings).
pub fn issuer_path(issuer: &str) -> Result<String, String> {
    let bad = |why: &str| {
        Err(format!(
            "oidc_discovery.issuer {issuer:?} {why}; write it as https://host[:port][/path], \
             e.g. \"https://oidc.example.org\""
        ))
    };
    if issuer.len() > MAX_ISSUER_LEN {
        return bad(&format!("is longer than {MAX_ISSUER_LEN} bytes"));
    }
    let Some(rest) = issuer.strip_prefix("https://") else {
        return bad("does not start with https:// (OIDC issuers are HTTPS URLs)");
    };
    if issuer.contains(['?', '#']) {
        return bad("has a query or fragment");
    }
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    if authority.is_empty() || authority.contains('@') {
        return bad("has no host, or has user info");
    }
    if issuer.ends_with('/') {
        return bad("ends with /");
    }
    if issuer.parse::<http::Uri>().is_err()
        || issuer
            .chars()
            .any(|c| c.is_control() || c.is_whitespace() || c == '\\')
    {
        return bad("is not a valid URL");
    }
    if path.contains("//") || path.split('/').any(|s| s == "." || s == "..") {
        return bad("has an empty, . or .. path segment");
    }
    Ok(path.to_owned())
}

/// Checks `[oidc_discovery]` against the rest of the configuration: a
/// valid issuer, equal to `ca.jwt_issuer` when that is set, and a cache
/// lifetime short enough that relying parties fetch a new JWT key before
/// it signs (rotation publishes it a third of `ca.ttl` ahead; a sixth
/// leaves a margin).
pub fn check_config(
    section: &OidcDiscoverySection,
    jwt_issuer: Option<&str>,
    ca_ttl: Duration,
) -> Result<(), String> {
    issuer_path(&section.issuer)?;
    if let Some(iss) = jwt_issuer
        && iss != section.issuer
    {
        return Err(format!(
            "oidc_discovery.issuer ({:?}) differs from ca.jwt_issuer ({iss:?}): relying parties \
             compare a token's iss with the discovery document's issuer, so set both to the \
             same URL",
            section.issuer
        ));
    }
    if section.max_age < Duration::from_secs(1) || section.max_age > ca_ttl / 6 {
        return Err(format!(
            "oidc_discovery.max_age ({}s) must be between 1s and a sixth of ca.ttl ({}s): a new \
             JWT key is published a third of ca.ttl before it signs, and relying parties must \
             have re-fetched the keys by then",
            section.max_age.as_secs(),
            (ca_ttl / 6).as_secs()
        ));
    }
    Ok(())
}

/// The JWS algorithm a key signs with.
fn alg_of(key: &PublicKey) -> &'static str {
    match key {
        PublicKey::Ec {
            curve: Curve::P256, ..
        } => "ES256",
        PublicKey::Ec {
            curve: Curve::P384, ..
        } => "ES384",
        PublicKey::Rsa { .. } => "RS256",
    }
}

/// The JWT keys of `bundle` as an OIDC JWK Set: public members, `kid`,
/// `use: sig`, `alg`.
pub fn jwks(bundle: &Bundle) -> Value {
    let keys: Vec<Value> = bundle
        .jwt_authorities
        .iter()
        .map(|a| {
            let mut m: Map<String, Value> = a.public_key.jwk_members();
            m.insert("kid".into(), json!(a.kid));
            m.insert("use".into(), json!("sig"));
            m.insert("alg".into(), json!(alg_of(&a.public_key)));
            Value::Object(m)
        })
        .collect();
    json!({ "keys": keys })
}

/// The discovery document for `issuer`, listing the algorithms of the
/// keys in `bundle` (ES256 when it has none).
pub fn discovery_document(issuer: &str, bundle: &Bundle) -> Value {
    let mut algs: BTreeSet<&str> = bundle
        .jwt_authorities
        .iter()
        .map(|a| alg_of(&a.public_key))
        .collect();
    if algs.is_empty() {
        algs.insert("ES256");
    }
    json!({
        "issuer": issuer,
        "jwks_uri": format!("{issuer}{KEYS_PATH}"),
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": algs,
        "claims_supported": ["sub", "aud", "exp", "iat", "iss"],
    })
}

/// Both documents, encoded once per bundle change.
#[derive(Debug)]
struct Documents {
    configuration: Bytes,
    keys: Bytes,
}

impl Documents {
    fn build(issuer: &str, bundle: &Bundle) -> Self {
        Self {
            configuration: Bytes::from(discovery_document(issuer, bundle).to_string()),
            keys: Bytes::from(jwks(bundle).to_string()),
        }
    }
}

/// What answers requests: the paths, the current documents, the cache
/// header.
#[derive(Debug)]
pub(crate) struct Answerer {
    configuration_path: String,
    keys_path: String,
    cache_control: http::HeaderValue,
    documents: watch::Receiver<Arc<Documents>>,
    metrics: Arc<ServerMetrics>,
}

type Response = http::Response<Full<Bytes>>;

fn plain(status: http::StatusCode, text: &'static str) -> Response {
    let mut r = http::Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

impl Answerer {
    /// The response to `req` (its body is never read).
    pub(crate) fn answer<B>(&self, req: &http::Request<B>) -> Response {
        let path = req.uri().path();
        let (document, body) = if path == self.configuration_path {
            (
                "configuration",
                self.documents.borrow().configuration.clone(),
            )
        } else if path == self.keys_path {
            ("keys", self.documents.borrow().keys.clone())
        } else {
            self.metrics.oidc_request("other", 404);
            return plain(http::StatusCode::NOT_FOUND, "not found\n");
        };
        if req.method() != http::Method::GET && req.method() != http::Method::HEAD {
            self.metrics.oidc_request(document, 405);
            let mut r = plain(http::StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
            r.headers_mut().insert(
                http::header::ALLOW,
                http::HeaderValue::from_static("GET, HEAD"),
            );
            return r;
        }
        self.metrics.oidc_request(document, 200);
        let mut r = http::Response::new(Full::new(body));
        let h = r.headers_mut();
        h.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        h.insert(http::header::CACHE_CONTROL, self.cache_control.clone());
        h.insert(
            http::header::X_CONTENT_TYPE_OPTIONS,
            http::HeaderValue::from_static("nosniff"),
        );
        r
    }
}

/// The serving certificate, swapped when its files change.
#[derive(Debug)]
struct ServingCert {
    cert_file: PathBuf,
    key_file: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
    /// Modification times of the files when last loaded.
    loaded: RwLock<(Option<SystemTime>, Option<SystemTime>)>,
}

fn mtime(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// Reads the certificate chain and key files into a key rustls serves.
fn load_certified_key(cert_file: &Path, key_file: &Path) -> Result<CertifiedKey, OidcError> {
    let certs = CertificateDer::pem_file_iter(cert_file)
        .map_err(|e| OidcError::Cert(cert_file.to_owned(), e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| OidcError::Cert(cert_file.to_owned(), e.to_string()))?;
    if certs.is_empty() {
        return Err(OidcError::Cert(
            cert_file.to_owned(),
            "no PEM certificate in the file".into(),
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key_file)
        .map_err(|e| OidcError::Key(key_file.to_owned(), e.to_string()))?;
    CertifiedKey::from_der(certs, key, &sigil_identity::tls::provider()).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => OidcError::KeyMismatch(e.to_string()),
        other => OidcError::Key(key_file.to_owned(), other.to_string()),
    })
}

impl ServingCert {
    fn load(cert_file: &Path, key_file: &Path) -> Result<Self, OidcError> {
        let stamps = (mtime(cert_file), mtime(key_file));
        let key = load_certified_key(cert_file, key_file)?;
        Ok(Self {
            cert_file: cert_file.to_owned(),
            key_file: key_file.to_owned(),
            current: RwLock::new(Arc::new(key)),
            loaded: RwLock::new(stamps),
        })
    }

    /// Reloads the files if either changed since the last load; a pair
    /// that does not load is logged and the current certificate kept.
    fn reload_if_changed(&self) {
        let stamps = (mtime(&self.cert_file), mtime(&self.key_file));
        if *self.loaded.read().unwrap_or_else(|p| p.into_inner()) == stamps {
            return;
        }
        match load_certified_key(&self.cert_file, &self.key_file) {
            Ok(key) => {
                *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(key);
                *self.loaded.write().unwrap_or_else(|p| p.into_inner()) = stamps;
                info!(cert_file = %self.cert_file.display(), "OIDC discovery serving certificate reloaded");
            }
            Err(e) => {
                warn!(error = %e, "OIDC discovery serving certificate changed but does not load; keeping the previous one");
            }
        }
    }
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        )
    }
}

/// Binds `[oidc_discovery]`, loads its certificate, and serves until the
/// stop; connections still open then get `grace` to finish. Everything
/// that can fail at startup fails here.
pub async fn start(
    section: &OidcDiscoverySection,
    ca: &CaManager,
    metrics: Arc<ServerMetrics>,
    stop: watch::Receiver<bool>,
    grace: Duration,
) -> Result<JoinHandle<()>, OidcError> {
    // Checked at config load; a bad issuer here is a programming error.
    let prefix = issuer_path(&section.issuer).unwrap_or_default();
    let cert = Arc::new(ServingCert::load(&section.cert_file, &section.key_file)?);
    let mut tls = rustls::ServerConfig::builder_with_provider(sigil_identity::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_cert_resolver(cert.clone());
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = TcpListener::bind(section.bind_address)
        .await
        .map_err(|e| OidcError::Bind(section.bind_address, e))?;

    let mut bundles = ca.subscribe_bundle();
    let first = bundles.borrow_and_update().clone();
    let (documents_tx, documents) =
        watch::channel(Arc::new(Documents::build(&section.issuer, &first)));
    let cache_control =
        http::HeaderValue::from_str(&format!("public, max-age={}", section.max_age.as_secs()))
            .unwrap_or_else(|_| http::HeaderValue::from_static("public, max-age=300"));
    let answerer = Arc::new(Answerer {
        configuration_path: format!("{prefix}{CONFIGURATION_PATH}"),
        keys_path: format!("{prefix}{KEYS_PATH}"),
        cache_control,
        documents,
        metrics,
    });
    info!(
        address = %section.bind_address,
        issuer = %section.issuer,
        jwt_keys = first.jwt_authorities.len(),
        "OIDC discovery serving {prefix}{CONFIGURATION_PATH} and {prefix}{KEYS_PATH}"
    );
    let issuer = section.issuer.clone();
    let follow = tokio::spawn(
        follow_bundle(issuer, bundles, documents_tx, cert, stop.clone())
            .instrument(info_span!("oidc_discovery_keys")),
    );
    Ok(tokio::spawn(
        async move {
            serve(listener, acceptor, answerer, stop, grace).await;
            let _ = follow.await;
        }
        .instrument(info_span!("oidc_discovery")),
    ))
}

/// Rebuilds the documents on every bundle change that touches the JWT
/// keys, and reloads the serving certificate when its files change.
async fn follow_bundle(
    issuer: String,
    mut bundles: watch::Receiver<Arc<Bundle>>,
    documents: watch::Sender<Arc<Documents>>,
    cert: Arc<ServingCert>,
    mut stop: watch::Receiver<bool>,
) {
    let mut published = bundles.borrow().jwt_authorities.clone();
    let mut tick = tokio::time::interval(CERT_RELOAD_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            changed = bundles.changed() => {
                if changed.is_err() {
                    return;
                }
                let bundle = bundles.borrow_and_update().clone();
                if bundle.jwt_authorities == published {
                    continue;
                }
                published = bundle.jwt_authorities.clone();
                documents.send_replace(Arc::new(Documents::build(&issuer, &bundle)));
                let kids: Vec<&str> = published.iter().map(|a| a.kid.as_str()).collect();
                info!(bundle_sequence = bundle.sequence, ?kids, "OIDC discovery keys updated");
            }
            _ = tick.tick() => cert.reload_if_changed(),
        }
    }
}

/// Accepts connections until the stop, then lets open ones finish within
/// `grace`.
async fn serve(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    answerer: Arc<Answerer>,
    stop: watch::Receiver<bool>,
    grace: Duration,
) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut connections = JoinSet::new();
    loop {
        let (tcp, peer) = tokio::select! {
            () = wait_for_stop(stop.clone()) => break,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, "OIDC discovery listener: accept failed; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        while connections.try_join_next().is_some() {}
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            debug!(%peer, "OIDC discovery listener busy; connection closed");
            continue;
        };
        connections.spawn(connection(
            tcp,
            peer,
            acceptor.clone(),
            answerer.clone(),
            stop.clone(),
            permit,
        ));
    }
    drop(listener);
    let drained = async { while connections.join_next().await.is_some() {} };
    if within_grace(drained, stop, grace).await.is_none() {
        connections.abort_all();
    }
}

/// One connection: TLS, then HTTP/1.1 until the client closes it or the
/// server stops (then the request in flight is answered first).
async fn connection(
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    acceptor: tokio_rustls::TlsAcceptor,
    answerer: Arc<Answerer>,
    stop: watch::Receiver<bool>,
    _permit: tokio::sync::OwnedSemaphorePermit,
) {
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            debug!(%peer, error = %e, "OIDC discovery TLS handshake failed");
            return;
        }
        Err(_) => {
            debug!(%peer, "OIDC discovery TLS handshake timed out");
            return;
        }
    };
    let service = hyper::service::service_fn(move |req| {
        let answerer = answerer.clone();
        async move { Ok::<_, Infallible>(answerer.answer(&req)) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(MAX_REQUEST_HEAD)
        .serve_connection(hyper_util::rt::TokioIo::new(tls), service);
    tokio::pin!(conn);
    let ended = tokio::select! {
        r = conn.as_mut() => r,
        () = wait_for_stop(stop) => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = ended {
        debug!(%peer, error = %e, "OIDC discovery connection ended with an error");
    }
}

#[cfg(test)]
mod tests;
