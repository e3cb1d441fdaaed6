//! A small HTTPS GET client for the Kubernetes attestors.
//!
//! The attestors talk to three kinds of Kubernetes endpoints: an issuer's
//! OIDC discovery document and JWKS, the API server (`GET` one pod), and
//! the kubelet (`GET /pods`). All are HTTPS GETs returning JSON, so this
//! module is one function's worth of hyper (HTTP/1.1) over tokio-rustls
//! with ring, Sigil's only TLS and crypto stack. The server certificate is
//! verified against a configured CA set unless the caller explicitly asked
//! for [`Trust::InsecureSkipVerify`]. Bodies are capped and every request
//! has a deadline. Bearer tokens are sent but never logged.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, ServerName};

/// Default deadline for one request (connect, TLS, response and body).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default largest response body accepted.
pub const DEFAULT_MAX_BODY: usize = 8 * 1024 * 1024;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HttpsError {
    #[error("bad URL {url:?}: {reason}")]
    Url { url: String, reason: &'static str },
    #[error("cannot read CA file {path}: {reason}")]
    CaFile { path: String, reason: String },
    #[error("TLS configuration: {0}")]
    Tls(String),
    #[error("cannot connect to {host}:{port}: {reason}")]
    Connect {
        host: String,
        port: u16,
        reason: String,
    },
    #[error("request to {0} timed out")]
    Timeout(String),
    #[error("HTTP exchange with {host} failed: {reason}")]
    Http { host: String, reason: String },
    #[error("response from {0} is larger than the limit")]
    TooLarge(String),
}

/// How the server certificate is checked.
#[derive(Clone)]
pub enum Trust {
    /// Verify the chain against these CA certificates (DER) and check the
    /// host name.
    Roots(Vec<Vec<u8>>),
    /// Accept any certificate (signatures over the handshake are still
    /// checked). Insecure: anyone on the path can impersonate the server.
    InsecureSkipVerify,
    /// Verify with this verifier (e.g. a SPIFFE verifier that checks the
    /// server's SVID, for SPIFFE bundle endpoints).
    Verifier(Arc<dyn rustls::client::danger::ServerCertVerifier>),
}

impl std::fmt::Debug for Trust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Trust::Roots(r) => write!(f, "Roots({} certificates)", r.len()),
            Trust::InsecureSkipVerify => f.write_str("InsecureSkipVerify"),
            Trust::Verifier(v) => write!(f, "Verifier({v:?})"),
        }
    }
}

impl Trust {
    /// The CA certificates in the PEM file at `path`.
    pub fn from_pem_file(path: &Path) -> Result<Self, HttpsError> {
        let err = |reason: String| HttpsError::CaFile {
            path: path.display().to_string(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let certs = sigil_identity::pem::decode_all("CERTIFICATE", &text)
            .map_err(|e| err(e.to_string()))?;
        Ok(Trust::Roots(certs))
    }
}

/// A response: status and body.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

/// An HTTPS client with a fixed trust setting.
#[derive(Clone)]
pub struct HttpsClient {
    connector: tokio_rustls::TlsConnector,
    timeout: Duration,
    max_body: usize,
    insecure: bool,
}

impl std::fmt::Debug for HttpsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpsClient")
            .field("timeout", &self.timeout)
            .field("max_body", &self.max_body)
            .field("insecure", &self.insecure)
            .finish_non_exhaustive()
    }
}

/// The parts of an `https://` URL a request needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub host: String,
    pub port: u16,
    pub path_and_query: String,
}

/// Parses an `https://host[:port]/path` URL; any other scheme is refused.
pub fn parse_url(url: &str) -> Result<Target, HttpsError> {
    let bad = |reason| HttpsError::Url {
        url: url.chars().take(200).collect(),
        reason,
    };
    let uri: http::Uri = url.parse().map_err(|_| bad("not a URL"))?;
    if uri.scheme_str() != Some("https") {
        return Err(bad("only https:// is allowed"));
    }
    let authority = uri.authority().ok_or_else(|| bad("no host"))?;
    if authority.as_str().contains('@') {
        return Err(bad("user information is not allowed"));
    }
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    if host.is_empty() {
        return Err(bad("no host"));
    }
    let path_and_query = uri
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "/".to_owned());
    Ok(Target {
        host,
        port: authority.port_u16().unwrap_or(443),
        path_and_query,
    })
}

impl HttpsClient {
    /// A client trusting `trust`, with the default timeout and body limit.
    pub fn new(trust: Trust) -> Result<Self, HttpsError> {
        let provider = sigil_identity::tls::provider();
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| HttpsError::Tls(e.to_string()))?;
        let insecure = matches!(trust, Trust::InsecureSkipVerify);
        let config = match trust {
            Trust::Roots(roots) => {
                let mut store = rustls::RootCertStore::empty();
                for der in roots {
                    store
                        .add(CertificateDer::from(der))
                        .map_err(|e| HttpsError::Tls(format!("CA certificate: {e}")))?;
                }
                builder.with_root_certificates(store).with_no_client_auth()
            }
            Trust::InsecureSkipVerify => builder
                .dangerous()
                .with_custom_certificate_verifier(sigil_identity::tls::InsecureAnyServer::new())
                .with_no_client_auth(),
            Trust::Verifier(v) => builder
                .dangerous()
                .with_custom_certificate_verifier(v)
                .with_no_client_auth(),
        };
        Ok(Self {
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
            timeout: DEFAULT_TIMEOUT,
            max_body: DEFAULT_MAX_BODY,
            insecure,
        })
    }

    /// The same client with another per-request deadline.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The same client with another body limit.
    pub fn with_max_body(mut self, max_body: usize) -> Self {
        self.max_body = max_body;
        self
    }

    /// `GET url`, with `Authorization: Bearer <token>` when a token is given.
    pub async fn get(&self, url: &str, bearer: Option<&str>) -> Result<Response, HttpsError> {
        let target = parse_url(url)?;
        let host_for_errors = target.host.clone();
        tokio::time::timeout(self.timeout, self.exchange(target, bearer))
            .await
            .map_err(|_| HttpsError::Timeout(host_for_errors))?
    }

    async fn exchange(&self, t: Target, bearer: Option<&str>) -> Result<Response, HttpsError> {
        let tcp = tokio::net::TcpStream::connect((t.host.as_str(), t.port))
            .await
            .map_err(|e| HttpsError::Connect {
                host: t.host.clone(),
                port: t.port,
                reason: e.to_string(),
            })?;
        let name = ServerName::try_from(t.host.clone()).map_err(|_| HttpsError::Url {
            url: t.host.clone(),
            reason: "host is not a valid DNS name or IP address",
        })?;
        let http_err = |reason: String| HttpsError::Http {
            host: t.host.clone(),
            reason,
        };
        let tls = self
            .connector
            .connect(name, tcp)
            .await
            .map_err(|e| http_err(format!("TLS handshake: {e}")))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| http_err(e.to_string()))?;
        let driver = tokio::spawn(conn);
        let host_header = if t.port == 443 {
            t.host.clone()
        } else if t.host.contains(':') {
            format!("[{}]:{}", t.host, t.port)
        } else {
            format!("{}:{}", t.host, t.port)
        };
        let mut req = http::Request::get(t.path_and_query.as_str())
            .header(http::header::HOST, host_header)
            .header(http::header::ACCEPT, "application/json");
        if let Some(token) = bearer {
            req = req.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let req = req
            .body(Empty::<Bytes>::new())
            .map_err(|_| http_err("request could not be built (bad token characters?)".into()))?;
        let result = async {
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| http_err(e.to_string()))?;
            let status = resp.status().as_u16();
            let mut body = resp.into_body();
            let mut out = Vec::new();
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| http_err(e.to_string()))?;
                if let Ok(data) = frame.into_data() {
                    if out.len() + data.len() > self.max_body {
                        return Err(HttpsError::TooLarge(t.host.clone()));
                    }
                    out.extend_from_slice(&data);
                }
            }
            Ok(Response { status, body: out })
        }
        .await;
        driver.abort();
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sigil_test_fakes as testserver;

    #[test]
    fn parses_https_urls_and_refuses_others() {
        let t = parse_url("https://10.0.0.1:6443/api/v1/x?y=1").unwrap();
        assert_eq!(
            t,
            Target {
                host: "10.0.0.1".into(),
                port: 6443,
                path_and_query: "/api/v1/x?y=1".into()
            }
        );
        assert_eq!(parse_url("https://issuer.example").unwrap().port, 443);
        assert_eq!(parse_url("https://[::1]:10250/pods").unwrap().host, "::1");
        for bad in [
            "http://127.0.0.1/pods",
            "ftp://x/",
            "https://user@host/",
            "not a url",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn verifies_the_server_certificate_unless_told_not_to() {
        let fake = testserver::start().await;
        fake.route("/hello", 200, b"{}".to_vec());
        let url = format!("{}/hello", fake.base_url);

        let trusted = HttpsClient::new(Trust::Roots(vec![fake.ca_der.clone()])).unwrap();
        let r = trusted.get(&url, Some("tok")).await.unwrap();
        assert_eq!((r.status, r.body.as_slice()), (200, &b"{}"[..]));
        assert_eq!(
            fake.hits.lock().unwrap()[0].1.as_deref(),
            Some("Bearer tok")
        );

        let other_ca = testserver::start().await;
        let untrusted = HttpsClient::new(Trust::Roots(vec![other_ca.ca_der.clone()])).unwrap();
        let err = untrusted.get(&url, None).await.unwrap_err();
        assert!(err.to_string().contains("TLS handshake"), "{err}");

        let insecure = HttpsClient::new(Trust::InsecureSkipVerify).unwrap();
        assert_eq!(insecure.get(&url, None).await.unwrap().status, 200);
    }

    #[tokio::test]
    async fn bodies_over_the_limit_are_refused() {
        let fake = testserver::start().await;
        fake.route("/big", 200, vec![b'x'; 4096]);
        let c = HttpsClient::new(Trust::Roots(vec![fake.ca_der.clone()]))
            .unwrap()
            .with_max_body(1024);
        let err = c
            .get(&format!("{}/big", fake.base_url), None)
            .await
            .unwrap_err();
        assert!(matches!(err, HttpsError::TooLarge(_)));
    }
}
