//! The discovery document and key set, the configuration rules, request
//! answers, and the listener over real TLS against a CA under a fake clock.

use std::sync::Arc;
use std::time::Duration;

use sigil_identity::clock::{FakeClock, from_unix_seconds};
use sigil_identity::{JwtAuthority, TrustDomain};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::*;
use crate::ca::CaConfig;
use crate::ca::keys::MemoryKeyManager;
use crate::config::{Overrides, ServerConfig};
use crate::datastore::SledDatastore;

const ISSUER: &str = "https://oidc.example.org";

fn td() -> TrustDomain {
    TrustDomain::new("example.org").unwrap()
}

fn ec_key(curve: Curve) -> PublicKey {
    let alg = match curve {
        Curve::P256 => &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        Curve::P384 => &ring::signature::ECDSA_P384_SHA384_FIXED_SIGNING,
    };
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = ring::signature::EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
    let pair = ring::signature::EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).unwrap();
    use ring::signature::KeyPair as _;
    PublicKey::ec(curve, pair.public_key().as_ref().to_vec()).unwrap()
}

/// A bundle with one X.509 authority and a P-256 and a P-384 JWT key.
fn bundle() -> Bundle {
    let ca = rcgen::CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .self_signed(&rcgen::KeyPair::generate().unwrap())
        .unwrap();
    let mut b = Bundle::new(td());
    b.x509_authorities.push(ca.der().to_vec());
    b.jwt_authorities.push(JwtAuthority {
        kid: "k256".into(),
        public_key: ec_key(Curve::P256),
    });
    b.jwt_authorities.push(JwtAuthority {
        kid: "k384".into(),
        public_key: ec_key(Curve::P384),
    });
    b.sequence = 7;
    b
}

#[test]
fn issuer_must_be_https_without_user_query_fragment_or_trailing_slash() {
    assert_eq!(issuer_path("https://oidc.example.org").unwrap(), "");
    assert_eq!(
        issuer_path("https://oidc.example.org:8443/sigil/td1").unwrap(),
        "/sigil/td1"
    );
    assert_eq!(issuer_path("https://127.0.0.1:8443").unwrap(), "");
    for (bad, why) in [
        ("http://oidc.example.org", "https://"),
        ("oidc.example.org", "https://"),
        ("https://oidc.example.org/", "ends with /"),
        ("https://oidc.example.org/sigil/", "ends with /"),
        ("https://oidc.example.org?x=1", "query"),
        ("https://oidc.example.org#frag", "fragment"),
        ("https://user@oidc.example.org", "user info"),
        ("https://", "no host"),
        ("https:///path", "no host"),
        ("https://oidc.example.org/a//b", "empty"),
        ("https://oidc.example.org/a/../b", ".."),
        ("https://oidc.exa mple.org", "not a valid URL"),
    ] {
        let err = issuer_path(bad).unwrap_err();
        assert!(err.contains(why), "{bad}: {err}");
        assert!(err.contains("https://host[:port][/path]"), "{err}");
    }
    let long = format!("https://{}.org", "a".repeat(MAX_ISSUER_LEN));
    assert!(issuer_path(&long).unwrap_err().contains("longer than"));
}

#[test]
fn jwt_issuer_must_be_printable_and_bounded() {
    check_jwt_issuer(ISSUER).unwrap();
    check_jwt_issuer("sigil-td1").unwrap();
    for bad in ["", "has space", "tab\t", &"a".repeat(MAX_ISSUER_LEN + 1)] {
        assert!(
            check_jwt_issuer(bad).unwrap_err().contains("ca.jwt_issuer"),
            "{bad:?}"
        );
    }
}

fn load(toml: &str) -> Result<ServerConfig, String> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("server.toml");
    std::fs::write(&path, format!("trust_domain = \"example.org\"\n{toml}")).unwrap();
    ServerConfig::load(Some(&path), Overrides::default()).map_err(|e| e.to_string())
}

const SECTION: &str = "[oidc_discovery]\nbind_address = \"127.0.0.1:8443\"\ncert_file = \"/c.pem\"\nkey_file = \"/k.pem\"\n";

#[test]
fn config_reads_the_section_and_the_jwt_issuer() {
    let cfg = load("").unwrap();
    assert!(cfg.oidc_discovery.is_none(), "off by default");
    assert_eq!(cfg.ca.jwt_issuer, None);

    let cfg = load(&format!(
        "[ca]\njwt_issuer = \"{ISSUER}\"\n{SECTION}issuer = \"{ISSUER}\"\nmax_age = \"2m\"\n"
    ))
    .unwrap();
    let o = cfg.oidc_discovery.unwrap();
    assert_eq!(o.issuer, ISSUER);
    assert_eq!(o.bind_address.to_string(), "127.0.0.1:8443");
    assert_eq!(o.cert_file, PathBuf::from("/c.pem"));
    assert_eq!(o.max_age, Duration::from_secs(120));
    assert_eq!(cfg.ca.jwt_issuer.as_deref(), Some(ISSUER));

    // Defaults; an issuer without the listener, and the listener without
    // an issuer in the tokens (warned about at startup), both load.
    let cfg = load(&format!("{SECTION}issuer = \"{ISSUER}\"\n")).unwrap();
    assert_eq!(
        cfg.oidc_discovery.unwrap().max_age,
        Duration::from_secs(300)
    );
    let cfg = load("[ca]\njwt_issuer = \"sigil\"\n").unwrap();
    assert_eq!(cfg.ca.jwt_issuer.as_deref(), Some("sigil"));
}

#[test]
fn config_refuses_an_issuer_that_differs_from_ca_jwt_issuer() {
    let err = load(&format!(
        "[ca]\njwt_issuer = \"https://other.example.org\"\n{SECTION}issuer = \"{ISSUER}\"\n"
    ))
    .unwrap_err();
    assert!(err.contains("differs from ca.jwt_issuer"), "{err}");
    assert!(err.contains("https://other.example.org"), "{err}");
    assert!(err.contains(ISSUER), "{err}");
}

#[test]
fn config_refuses_bad_issuers_max_age_and_unknown_keys() {
    let err = load(&format!("{SECTION}issuer = \"http://oidc.example.org\"\n")).unwrap_err();
    assert!(err.contains("oidc_discovery.issuer"), "{err}");
    let err = load(&format!("{SECTION}issuer = \"{ISSUER}/\"\n")).unwrap_err();
    assert!(err.contains("ends with /"), "{err}");
    let err = load("[ca]\njwt_issuer = \"\"\n").unwrap_err();
    assert!(err.contains("ca.jwt_issuer"), "{err}");
    // ca.ttl 24h: a sixth is 4h.
    let err = load(&format!(
        "{SECTION}issuer = \"{ISSUER}\"\nmax_age = \"5h\"\n"
    ))
    .unwrap_err();
    assert!(err.contains("a sixth of ca.ttl"), "{err}");
    load(&format!(
        "{SECTION}issuer = \"{ISSUER}\"\nmax_age = \"4h\"\n"
    ))
    .unwrap();
    let err = load(&format!(
        "{SECTION}issuer = \"{ISSUER}\"\nmax_age = \"0s\"\n"
    ))
    .unwrap_err();
    assert!(err.contains("max_age"), "{err}");
    let err = load(&format!("{SECTION}issuer = \"{ISSUER}\"\nport = 1\n")).unwrap_err();
    assert!(err.contains("port"), "{err}");
    let err = load("[oidc_discovery]\nissuer = \"https://x.org\"\n").unwrap_err();
    assert!(err.contains("bind_address"), "{err}");
}

#[test]
fn discovery_document_names_issuer_jwks_uri_and_the_keys_algorithms() {
    let doc = discovery_document("https://h.example.org:8443/td1", &bundle());
    assert_eq!(
        doc,
        json!({
            "issuer": "https://h.example.org:8443/td1",
            "jwks_uri": "https://h.example.org:8443/td1/keys",
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["ES256", "ES384"],
            "claims_supported": ["sub", "aud", "exp", "iat", "iss"],
        })
    );
    let empty = discovery_document(ISSUER, &Bundle::new(td()));
    assert_eq!(
        empty["id_token_signing_alg_values_supported"],
        json!(["ES256"])
    );
}

#[test]
fn jwks_holds_the_public_jwt_keys_only_with_kid_use_and_alg() {
    let b = bundle();
    let set = jwks(&b);
    let keys = set["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 2, "JWT keys only, no X.509 authority: {set}");
    assert_eq!(
        set.as_object().unwrap().keys().collect::<Vec<_>>(),
        ["keys"],
        "no SPIFFE members"
    );
    for (key, (authority, alg)) in keys
        .iter()
        .zip(b.jwt_authorities.iter().zip(["ES256", "ES384"]))
    {
        let m = key.as_object().unwrap();
        let mut names: Vec<_> = m.keys().map(String::as_str).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            ["alg", "crv", "kid", "kty", "use", "x", "y"],
            "public members only"
        );
        assert_eq!(m["kid"], authority.kid.as_str());
        assert_eq!(m["use"], "sig");
        assert_eq!(m["alg"], alg);
        assert_eq!(PublicKey::from_jwk(m).unwrap(), authority.public_key);
    }
    // The reader relying parties in Sigil use takes every key.
    let read = sigil_identity::jwks::signing_keys(set.to_string().as_bytes(), 10).unwrap();
    assert_eq!(read.len(), 2);
}

fn answerer(prefix: &str) -> (Answerer, watch::Sender<Arc<Documents>>, Arc<ServerMetrics>) {
    let issuer = format!("https://h{prefix}");
    let (tx, documents) = watch::channel(Arc::new(Documents::build(&issuer, &bundle())));
    let metrics = Arc::new(ServerMetrics::default());
    let a = Answerer {
        configuration_path: format!("{prefix}{CONFIGURATION_PATH}"),
        keys_path: format!("{prefix}{KEYS_PATH}"),
        cache_control: http::HeaderValue::from_static("public, max-age=300"),
        documents,
        metrics: metrics.clone(),
    };
    (a, tx, metrics)
}

fn request(method: &str, uri: &str) -> http::Request<()> {
    http::Request::builder()
        .method(method)
        .uri(uri)
        .body(())
        .unwrap()
}

async fn body_of(r: Response) -> Value {
    use http_body_util::BodyExt as _;
    let bytes = r.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&bytes).unwrap()
}

#[tokio::test]
async fn get_and_head_answer_the_documents_with_cache_headers() {
    let (a, _tx, _m) = answerer("");
    for method in ["GET", "HEAD"] {
        let r = a.answer(&request(method, CONFIGURATION_PATH));
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-type"], "application/json");
        assert_eq!(r.headers()["cache-control"], "public, max-age=300");
        assert_eq!(r.headers()["x-content-type-options"], "nosniff");
    }
    let doc = body_of(a.answer(&request("GET", CONFIGURATION_PATH))).await;
    assert_eq!(doc["issuer"], "https://h");
    let keys = body_of(a.answer(&request("GET", "/keys?ignored=1"))).await;
    assert_eq!(keys["keys"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn other_paths_are_404_and_other_methods_405() {
    let (a, _tx, m) = answerer("/td1");
    for path in [
        "/",
        "/keys",
        CONFIGURATION_PATH,
        "/td1",
        "/td1/keys/",
        "/td1/.well-known/openid-configuration/x",
        "/td1/.well-known/jwks.json",
        "/metrics",
    ] {
        let r = a.answer(&request("GET", path));
        assert_eq!(r.status(), 404, "{path}");
        assert_eq!(r.headers()["content-type"], "text/plain; charset=utf-8");
    }
    assert_eq!(a.answer(&request("GET", "/td1/keys")).status(), 200);
    for method in ["POST", "PUT", "DELETE", "OPTIONS", "PATCH"] {
        let r = a.answer(&request(method, "/td1/keys"));
        assert_eq!(r.status(), 405, "{method}");
        assert_eq!(r.headers()["allow"], "GET, HEAD");
    }
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &m.registry()).unwrap();
    assert!(
        text.contains(
            "sigil_server_oidc_discovery_requests_total{document=\"other\",status=\"404\"} 8"
        ),
        "{text}"
    );
    assert!(
        text.contains(
            "sigil_server_oidc_discovery_requests_total{document=\"keys\",status=\"405\"} 5"
        ),
        "{text}"
    );
    assert!(
        text.contains(
            "sigil_server_oidc_discovery_requests_total{document=\"keys\",status=\"200\"} 1"
        ),
        "{text}"
    );
}

/// A serving certificate for `localhost` in `dir`, and its PEM.
fn serving_cert(dir: &Path) -> (PathBuf, PathBuf, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let (c, k) = (dir.join("tls.crt"), dir.join("tls.key"));
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    (c, k, cert.pem())
}

#[test]
fn certificate_errors_name_the_file_and_a_key_mismatch() {
    let dir = tempfile::tempdir().unwrap();
    let (c, k, _) = serving_cert(dir.path());
    ServingCert::load(&c, &k).unwrap();
    let missing = dir.path().join("missing.pem");
    let err = ServingCert::load(&missing, &k).unwrap_err().to_string();
    assert!(
        err.contains("oidc_discovery.cert_file") && err.contains("missing.pem"),
        "{err}"
    );
    let err = ServingCert::load(&c, &missing).unwrap_err().to_string();
    assert!(
        err.contains("oidc_discovery.key_file") && err.contains("missing.pem"),
        "{err}"
    );
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "").unwrap();
    let err = ServingCert::load(&empty, &k).unwrap_err().to_string();
    assert!(err.contains("no PEM certificate"), "{err}");
    let other = dir.path().join("other.key");
    std::fs::write(&other, rcgen::KeyPair::generate().unwrap().serialize_pem()).unwrap();
    let err = ServingCert::load(&c, &other).unwrap_err();
    assert!(matches!(err, OidcError::KeyMismatch(_)), "{err}");
}

/// One HTTP/1.1 request over TLS to `addr`, trusting `ca_pem`; the raw
/// response.
async fn https(addr: SocketAddr, ca_pem: &str, method: &str, path: &str) -> String {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let cfg = rustls::ClientConfig::builder_with_provider(sigil_identity::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    tls.write_all(
        format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    let _ = tls.read_to_end(&mut out).await;
    String::from_utf8(out).unwrap()
}

fn json_body(response: &str) -> Value {
    let (_, body) = response.split_once("\r\n\r\n").unwrap();
    serde_json::from_str(body).unwrap()
}

fn kids(keys: &Value) -> Vec<String> {
    keys["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listener_serves_over_tls_follows_rotation_and_stops() {
    let dir = tempfile::tempdir().unwrap();
    let (cert_file, key_file, ca_pem) = serving_cert(dir.path());
    let store = Arc::new(SledDatastore::open(dir.path().join("data")).unwrap());
    let clock = Arc::new(FakeClock::new(from_unix_seconds(1_800_000_000)));
    let ca_ttl = Duration::from_secs(6 * 3600);
    let ca = CaManager::start(
        CaConfig {
            ca_ttl,
            jwt_issuer: Some("https://localhost/td1".into()),
            ..CaConfig::new(td())
        },
        store,
        Arc::new(MemoryKeyManager::default()),
        clock.clone(),
        None,
    )
    .await
    .unwrap();
    // A free port: bound and released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let section = OidcDiscoverySection {
        bind_address: addr,
        cert_file,
        key_file,
        issuer: "https://localhost/td1".into(),
        max_age: Duration::from_secs(60),
    };
    let (stop_tx, stop) = watch::channel(false);
    let metrics = Arc::new(ServerMetrics::default());
    let task = start(&section, &ca, metrics, stop, Duration::from_secs(5))
        .await
        .unwrap();

    let r = https(
        addr,
        &ca_pem,
        "GET",
        "/td1/.well-known/openid-configuration",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(r.contains("cache-control: public, max-age=60"), "{r}");
    let doc = json_body(&r);
    assert_eq!(doc["issuer"], "https://localhost/td1");
    assert_eq!(doc["jwks_uri"], "https://localhost/td1/keys");
    let r = https(addr, &ca_pem, "GET", "/td1/keys").await;
    let before = kids(&json_body(&r));
    assert_eq!(before, [ca.bundle().jwt_authorities[0].kid.clone()]);
    let token = ca.mint_jwt_svid(
        &sigil_identity::SpiffeId::parse("spiffe://example.org/w").unwrap(),
        &["a".into()],
        None,
    );
    let kid_of_token = {
        use base64::Engine as _;
        let h = token.unwrap().token.split('.').next().unwrap().to_owned();
        let h: Value = serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(h)
                .unwrap(),
        )
        .unwrap();
        h["kid"].as_str().unwrap().to_owned()
    };
    assert_eq!(before, [kid_of_token], "the served key signs the tokens");

    // HEAD: the headers, no body.
    let r = https(addr, &ca_pem, "HEAD", "/td1/keys").await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(r.ends_with("\r\n\r\n"), "no body after the headers: {r}");
    let r = https(addr, &ca_pem, "GET", "/keys").await;
    assert!(r.starts_with("HTTP/1.1 404"), "{r}");
    let r = https(addr, &ca_pem, "POST", "/td1/keys").await;
    assert!(r.starts_with("HTTP/1.1 405"), "{r}");

    // Half the CA's life later a new JWT key is prepared and published:
    // it is served before it signs.
    clock.advance(ca_ttl / 2 + Duration::from_secs(60));
    assert!(ca.rotate().await.unwrap().prepared > 0);
    let mut after = Vec::new();
    for _ in 0..100 {
        after = kids(&json_body(&https(addr, &ca_pem, "GET", "/td1/keys").await));
        if after.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(after.len(), 2, "the prepared key is served: {after:?}");
    assert_eq!(after[0], before[0]);

    // Stop: the listener closes and the task ends.
    stop_tx.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("the listener stops")
        .unwrap();
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "no longer listening"
    );
}

#[tokio::test]
async fn a_taken_address_fails_the_start_naming_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let (cert_file, key_file, _) = serving_cert(dir.path());
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let store = Arc::new(SledDatastore::open(dir.path().join("data")).unwrap());
    let ca = CaManager::start(
        CaConfig::new(td()),
        store,
        Arc::new(MemoryKeyManager::default()),
        Arc::new(FakeClock::new(from_unix_seconds(1_800_000_000))),
        None,
    )
    .await
    .unwrap();
    let section = OidcDiscoverySection {
        bind_address: taken.local_addr().unwrap(),
        cert_file,
        key_file,
        issuer: ISSUER.into(),
        max_age: Duration::from_secs(60),
    };
    let (_stop_tx, stop) = watch::channel(false);
    let err = start(
        &section,
        &ca,
        Arc::new(ServerMetrics::default()),
        stop,
        Duration::from_secs(1),
    )
    .await
    .unwrap_err();
    assert!(
        err.to_string().contains("oidc_discovery.bind_address"),
        "{err}"
    );
}
