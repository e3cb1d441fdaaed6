//! Tests against a fake issuer that mints Kubernetes-shaped projected
//! tokens with real keys, served over HTTPS with OIDC discovery, and a fake
//! API server (HTTPS, real Pod JSON) standing in for the Kubernetes API
//! server's pod lookup.

use std::time::SystemTime;

use super::keys::{MAX_STALENESS_FACTOR, origin, parse_jwks};
use super::*;
use crate::https::{HttpsClient, Trust};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair, RsaKeyPair};
use serde_json::json;
use sigil_identity::attestation::AgentNodeAttestor;
use sigil_identity::clock::{SystemClock, unix_seconds};
use sigil_identity::keys::{Curve, PublicKey};
use sigil_test_fakes::{self as testserver, FakeServer};

const NODE_UID: &str = "6f1d2b8e-4c3a-4d2e-9b7a-0c5e8f9a1b2c";
const POD_UID: &str = "3a4b5c6d-7e8f-4a0b-9c1d-2e3f4a5b6c7d";

enum SigningKey {
    Ec(EcdsaKeyPair),
    Rsa(RsaKeyPair),
}

/// A fake service-account issuer: one signing key, a `kid`, an issuer URL.
struct FakeIssuer {
    key: SigningKey,
    kid: String,
    issuer: String,
}

impl FakeIssuer {
    fn ec(kid: &str, issuer: &str) -> Self {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .unwrap();
        Self {
            key: SigningKey::Ec(key),
            kid: kid.into(),
            issuer: issuer.into(),
        }
    }

    /// An RSA issuer, as most clusters have; the key is made by openssl
    /// (ring cannot generate RSA keys).
    fn rsa(kid: &str, issuer: &str) -> Self {
        let out = std::process::Command::new("openssl")
            .args([
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-outform",
                "DER",
            ])
            .output()
            .expect("openssl is needed for the RSA issuer test (scripts/test.sh installs it)");
        assert!(out.status.success(), "openssl genpkey failed");
        // openssl 3 writes an RSA key as PKCS#1 DER here.
        let key = RsaKeyPair::from_der(&out.stdout)
            .or_else(|_| RsaKeyPair::from_pkcs8(&out.stdout))
            .unwrap();
        Self {
            key: SigningKey::Rsa(key),
            kid: kid.into(),
            issuer: issuer.into(),
        }
    }

    fn alg(&self) -> &'static str {
        match self.key {
            SigningKey::Ec(_) => "ES256",
            SigningKey::Rsa(_) => "RS256",
        }
    }

    fn public(&self) -> PublicKey {
        match &self.key {
            SigningKey::Ec(k) => {
                PublicKey::ec(Curve::P256, k.public_key().as_ref().to_vec()).unwrap()
            }
            SigningKey::Rsa(k) => {
                let c = ring::rsa::PublicKeyComponents::<Vec<u8>>::from(k.public());
                PublicKey::rsa(&c.n, &c.e).unwrap()
            }
        }
    }

    fn jwk(&self) -> Value {
        let mut m = self.public().jwk_members();
        m.insert("kid".into(), json!(self.kid));
        m.insert("use".into(), json!("sig"));
        m.insert("alg".into(), json!(self.alg()));
        Value::Object(m)
    }

    fn sign(&self, msg: &[u8]) -> Vec<u8> {
        let rng = SystemRandom::new();
        match &self.key {
            SigningKey::Ec(k) => k.sign(&rng, msg).unwrap().as_ref().to_vec(),
            SigningKey::Rsa(k) => {
                let mut sig = vec![0; k.public().modulus_len()];
                k.sign(&ring::signature::RSA_PKCS1_SHA256, &rng, msg, &mut sig)
                    .unwrap();
                sig
            }
        }
    }

    /// A token with `header` and `claims` as given, signed by this key.
    fn mint_raw(&self, header: &Value, claims: &Value) -> String {
        let h = B64URL.encode(serde_json::to_vec(header).unwrap());
        let c = B64URL.encode(serde_json::to_vec(claims).unwrap());
        let signing_input = format!("{h}.{c}");
        let s = B64URL.encode(self.sign(signing_input.as_bytes()));
        format!("{signing_input}.{s}")
    }

    /// A token from header and claims JSON text as given (so it can say
    /// things a `Value` cannot, such as a member twice).
    fn mint_text(&self, header: &str, claims: &str) -> String {
        let signing_input = format!("{}.{}", B64URL.encode(header), B64URL.encode(claims));
        let s = B64URL.encode(self.sign(signing_input.as_bytes()));
        format!("{signing_input}.{s}")
    }

    fn header(&self) -> Value {
        json!({"alg": self.alg(), "kid": self.kid})
    }

    /// The claims of a projected token as the kubelet requests it for the
    /// agent pod (shape of a Kubernetes 1.30+ token with node info).
    fn claims(&self) -> Value {
        let now = unix_seconds(SystemTime::now());
        json!({
            "aud": ["sigil-server"],
            "exp": now + 3600,
            "iat": now,
            "nbf": now,
            "iss": self.issuer,
            "jti": "0b6a1a2e-3f4c-4d5e-8f9a-0b1c2d3e4f5a",
            "kubernetes.io": {
                "namespace": "sigil",
                "node": {"name": "node-a", "uid": NODE_UID},
                "pod": {"name": "sigil-agent-x7k2p", "uid": POD_UID},
                "serviceaccount": {"name": "sigil-agent", "uid": "9e8d7c6b-5a4f-4e3d-8c2b-1a0f9e8d7c6b"}
            },
            "sub": "system:serviceaccount:sigil:sigil-agent"
        })
    }

    fn mint(&self) -> String {
        self.mint_raw(&self.header(), &self.claims())
    }

    fn mint_with(&self, edit: impl FnOnce(&mut Value)) -> String {
        let mut c = self.claims();
        edit(&mut c);
        self.mint_raw(&self.header(), &c)
    }

    fn jwks(keys: &[&FakeIssuer]) -> Vec<u8> {
        serde_json::to_vec(&json!({"keys": keys.iter().map(|k| k.jwk()).collect::<Vec<_>>()}))
            .unwrap()
    }
}

/// Serves OIDC discovery and the JWKS for `issuer` on a fake HTTPS server;
/// returns the server (its base URL is the issuer URL).
async fn serve_issuer(fake: &FakeServer, issuer_url: &str, keys: &[&FakeIssuer]) {
    fake.route(
        "/.well-known/openid-configuration",
        200,
        serde_json::to_vec(&json!({
            "issuer": issuer_url,
            "jwks_uri": format!("{}/openid/v1/jwks", fake.base_url),
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256", "ES256"]
        }))
        .unwrap(),
    );
    fake.route("/openid/v1/jwks", 200, FakeIssuer::jwks(keys));
}

/// A Pod object as the API server returns it (trimmed to real fields).
fn pod_json(name: &str, uid: &str, node: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": {
            "name": name,
            "generateName": "sigil-agent-",
            "namespace": "sigil",
            "uid": uid,
            "resourceVersion": "48213",
            "creationTimestamp": "2026-11-28T09:00:00Z",
            "labels": {"app.kubernetes.io/name": "sigil-agent", "controller-revision-hash": "6d5f7c9b8"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "DaemonSet", "name": "sigil-agent", "uid": "1f2e3d4c-5b6a-4978-8a9b-0c1d2e3f4a5b", "controller": true, "blockOwnerDeletion": true}]
        },
        "spec": {
            "serviceAccountName": "sigil-agent",
            "nodeName": node,
            "hostPID": true,
            "containers": [{"name": "sigil-agent", "image": "ghcr.io/example/sigil-agent:0.1.0"}]
        },
        "status": {"phase": "Running", "podIP": "10.244.1.7", "hostIP": "192.0.2.10"}
    }))
    .unwrap()
}

const POD_PATH: &str = "/api/v1/namespaces/sigil/pods/sigil-agent-x7k2p";

struct Setup {
    attestor: K8sPsatAttestor,
    issuer_server: FakeServer,
    api: FakeServer,
    issuer: FakeIssuer,
}

async fn api_server() -> (FakeServer, Arc<dyn PodLookup>) {
    let api = testserver::start().await;
    api.route(
        POD_PATH,
        200,
        pod_json("sigil-agent-x7k2p", POD_UID, "node-a"),
    );
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "server-sa-token\n").unwrap();
    // Keep the token file for the test's life.
    let token = dir.keep().join("token");
    let client = HttpsClient::new(Trust::Roots(vec![api.ca_der.clone()])).unwrap();
    let pods: Arc<dyn PodLookup> = Arc::new(ApiServerPods::new(
        api.base_url.clone(),
        client,
        Some(token),
    ));
    (api, pods)
}

/// One cluster `prod` whose keys come from OIDC discovery on a fake HTTPS
/// issuer, with the given allow-list.
/// A cluster allowing the service account the fake issuer's tokens name.
fn cluster(
    name: &str,
    issuer: impl Into<String>,
    keys: KeySource,
    pods: Arc<dyn PodLookup>,
) -> ClusterConfig {
    let mut c = ClusterConfig::new(name, issuer, keys, pods);
    c.allowed_service_accounts = vec!["sigil:sigil-agent".into()];
    c
}

async fn setup(allowed: &[&str]) -> Setup {
    let issuer_server = testserver::start().await;
    let issuer = FakeIssuer::ec("key-1", &issuer_server.base_url);
    serve_issuer(&issuer_server, &issuer_server.base_url, &[&issuer]).await;
    let (api, pods) = api_server().await;
    let client = HttpsClient::new(Trust::Roots(vec![issuer_server.ca_der.clone()])).unwrap();
    let mut cfg = cluster(
        "prod",
        issuer_server.base_url.clone(),
        KeySource::Discovery {
            issuer_url: issuer_server.base_url.clone(),
            client,
            token_file: None,
        },
        pods,
    );
    cfg.allowed_service_accounts = allowed.iter().map(|s| s.to_string()).collect();
    let attestor = K8sPsatAttestor::new(
        TrustDomain::new("example.org").unwrap(),
        vec![cfg],
        Arc::new(SystemClock),
    )
    .unwrap();
    Setup {
        attestor,
        issuer_server,
        api,
        issuer,
    }
}

fn evidence(cluster: &str, token: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({"cluster": cluster, "token": token})).unwrap()
}

struct NoChallenges;

#[async_trait]
impl Challenger for NoChallenges {
    async fn challenge(&mut self, _c: Vec<u8>) -> Result<Vec<u8>, AttestError> {
        Err(AttestError::Challenge)
    }
}

#[tokio::test]
async fn valid_projected_token_is_accepted() {
    let s = setup(&["sigil:sigil-agent"]).await;
    let got = s
        .attestor
        .attest(&evidence("prod", &s.issuer.mint()), &mut NoChallenges)
        .await
        .unwrap();
    assert_eq!(
        got.agent_id.as_str(),
        format!("spiffe://example.org/sigil/agent/k8s_psat/prod/{NODE_UID}")
    );
    for want in [
        "k8s_psat:cluster:prod".to_owned(),
        "k8s_psat:agent_ns:sigil".to_owned(),
        "k8s_psat:agent_sa:sigil-agent".to_owned(),
        "k8s_psat:agent_pod_name:sigil-agent-x7k2p".to_owned(),
        format!("k8s_psat:agent_pod_uid:{POD_UID}"),
        "k8s_psat:agent_node_name:node-a".to_owned(),
        format!("k8s_psat:agent_node_uid:{NODE_UID}"),
    ] {
        assert!(
            got.selectors.contains(&Selector::parse(&want).unwrap()),
            "missing {want}"
        );
    }
    assert_eq!(got.selectors.len(), 7);
    assert!(got.can_reattest);
    // The API server was asked about the pod, with the server's own token.
    let hits = s.api.hits.lock().unwrap().clone();
    assert_eq!(
        hits,
        vec![(
            POD_PATH.to_owned(),
            Some("Bearer server-sa-token".to_owned())
        )]
    );
}

#[tokio::test]
async fn rsa_issuer_keys_from_a_jwks_file_are_accepted() {
    let issuer = FakeIssuer::rsa("rsa-1", "https://kubernetes.default.svc.cluster.local");
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, FakeIssuer::jwks(&[&issuer])).unwrap();
    let (_api, pods) = api_server().await;
    let a = K8sPsatAttestor::new(
        TrustDomain::new("example.org").unwrap(),
        vec![cluster(
            "prod",
            "https://kubernetes.default.svc.cluster.local",
            KeySource::File(jwks),
            pods,
        )],
        Arc::new(SystemClock),
    )
    .unwrap();
    let p = a.verify(&evidence("prod", &issuer.mint())).await.unwrap();
    assert_eq!(p.node_uid, NODE_UID);
    assert_eq!(p.service_account, "sigil-agent");
}

#[tokio::test]
async fn keys_that_cannot_be_refreshed_stop_verifying_after_a_while() {
    let issuer = FakeIssuer::rsa("rsa-1", "https://kubernetes.default.svc.cluster.local");
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, FakeIssuer::jwks(&[&issuer])).unwrap();
    let (_api, pods) = api_server().await;
    let mut c = cluster(
        "prod",
        "https://kubernetes.default.svc.cluster.local",
        KeySource::File(jwks.clone()),
        pods,
    );
    c.jwks_refresh = Duration::from_millis(20);
    c.jwks_min_refetch = Duration::ZERO;
    let a = K8sPsatAttestor::new(
        TrustDomain::new("example.org").unwrap(),
        vec![c],
        Arc::new(SystemClock),
    )
    .unwrap();
    let token = issuer.mint();
    assert!(a.verify(&evidence("prod", &token)).await.is_ok());
    // The key source becomes unreadable: the held key is used for a while…
    std::fs::remove_file(&jwks).unwrap();
    assert!(a.verify(&evidence("prod", &token)).await.is_ok());
    // …but not beyond MAX_STALENESS_FACTOR refresh periods.
    tokio::time::sleep(Duration::from_millis(
        20 * u64::from(MAX_STALENESS_FACTOR) + 50,
    ))
    .await;
    assert!(matches!(
        a.verify(&evidence("prod", &token)).await,
        Err(PsatError::UnknownKid { .. })
    ));
}

async fn refused(s: &Setup, token: &str) -> PsatError {
    s.attestor
        .verify(&evidence("prod", token))
        .await
        .unwrap_err()
}

#[tokio::test]
async fn wrong_audience_is_refused() {
    let s = setup(&["sigil:sigil-agent"]).await;
    let t = s
        .issuer
        .mint_with(|c| c["aud"] = json!(["https://kubernetes.default.svc"]));
    assert_eq!(
        refused(&s, &t).await,
        PsatError::WrongAudience("sigil-server".into())
    );
    let t = s
        .issuer
        .mint_with(|c| c["aud"] = json!("sigil-server-other"));
    assert!(matches!(refused(&s, &t).await, PsatError::WrongAudience(_)));
}

#[tokio::test]
async fn expired_and_future_tokens_are_refused() {
    let s = setup(&["sigil:sigil-agent"]).await;
    let now = unix_seconds(SystemTime::now());
    let t = s.issuer.mint_with(|c| {
        c["iat"] = json!(now - 7200);
        c["nbf"] = json!(now - 7200);
        c["exp"] = json!(now - 3600);
    });
    assert_eq!(refused(&s, &t).await, PsatError::Jws(JwsError::Expired));
    let t = s.issuer.mint_with(|c| c["nbf"] = json!(now + 600));
    assert_eq!(refused(&s, &t).await, PsatError::Jws(JwsError::NotYetValid));
    // Within the leeway: still fine.
    let t = s.issuer.mint_with(|c| c["exp"] = json!(now - 5));
    assert!(s.attestor.verify(&evidence("prod", &t)).await.is_ok());
}

// The rules of the shared JWS core (sigil_identity::jws), as this attestor
// applies them; they were looser here before the core was shared.

#[tokio::test]
async fn duplicate_members_are_refused_even_nested() {
    let s = setup(&["sigil:sigil-agent"]).await;
    let header = s.issuer.header().to_string();
    let claims = s.issuer.claims().to_string();
    assert!(
        s.attestor
            .verify(&evidence("prod", &s.issuer.mint_text(&header, &claims)))
            .await
            .is_ok()
    );
    // A second `iss` after the real one: a last-wins parser reads the other.
    let top = claims.replacen('{', r#"{"iss":"https://evil.example","#, 1);
    assert_eq!(
        refused(&s, &s.issuer.mint_text(&header, &top)).await,
        PsatError::Jws(JwsError::DuplicateMember("iss".into()))
    );
    // A second pod inside the kubernetes.io claim.
    let nested = claims.replacen(
        r#""namespace":"sigil","#,
        r#""namespace":"sigil","pod":{"name":"other","uid":"x"},"#,
        1,
    );
    assert_ne!(nested, claims);
    assert_eq!(
        refused(&s, &s.issuer.mint_text(&header, &nested)).await,
        PsatError::Jws(JwsError::DuplicateMember("pod".into()))
    );
    let dup_header = r#"{"alg":"ES256","kid":"key-1","alg":"ES256"}"#;
    assert_eq!(
        refused(&s, &s.issuer.mint_text(dup_header, &claims)).await,
        PsatError::Jws(JwsError::DuplicateMember("alg".into()))
    );
}

#[tokio::test]
async fn typ_may_be_absent_or_jwt_and_nothing_else() {
    let s = setup(&["sigil:sigil-agent"]).await;
    let claims = s.issuer.claims();
    for typ in ["JWT", "JOSE"] {
        let h = json!({"alg": "ES256", "kid": "key-1", "typ": typ});
        assert!(
            s.attestor
                .verify(&evidence("prod", &s.issuer.mint_raw(&h, &claims)))
                .await
                .is_ok(),
            "{typ}"
        );
    }
    for typ in [json!("at+jwt"), json!("application/jwt"), json!(1)] {
        let h = json!({"alg": "ES256", "kid": "key-1", "typ": typ});
        assert_eq!(
            refused(&s, &s.issuer.mint_raw(&h, &claims)).await,
            PsatError::Jws(JwsError::BadTyp),
            "{typ}"
        );
    }
}

#[tokio::test]
async fn pss_is_not_an_issuer_algorithm() {
    // Kubernetes signs RS256 (RSA keys) or ES256/ES384: PS* is refused
    // before any key is looked up, though JWT-SVID validation accepts it.
    let s = setup(&["sigil:sigil-agent"]).await;
    for alg in ["PS256", "PS384", "PS512"] {
        let h = json!({"alg": alg, "kid": "key-1"});
        assert_eq!(
            refused(&s, &s.issuer.mint_raw(&h, &s.issuer.claims())).await,
            PsatError::Jws(JwsError::UnsupportedAlg(alg.into())),
        );
    }
}

#[tokio::test]
async fn time_claims_must_be_integers_and_iat_not_in_the_future() {
    let s = setup(&["sigil:sigil-agent"]).await;
    let now = unix_seconds(SystemTime::now());
    for (claim, value) in [
        ("exp", json!((now + 600) as f64 + 0.5)),
        ("nbf", json!(now as f64 - 0.5)),
        ("iat", json!(now as f64 + 0.25)),
        ("exp", json!(format!("{}", now + 600))),
    ] {
        let t = s.issuer.mint_with(|c| c[claim] = value.clone());
        let name = match claim {
            "exp" => "exp",
            "nbf" => "nbf",
            _ => "iat",
        };
        assert_eq!(
            refused(&s, &t).await,
            PsatError::Jws(JwsError::BadNumericClaim(name)),
            "{claim} = {value}"
        );
    }
    let t = s.issuer.mint_with(|c| c["iat"] = json!(now + 600));
    assert_eq!(refused(&s, &t).await, PsatError::Jws(JwsError::NotYetValid));
}

#[tokio::test]
async fn legacy_non_expiring_tokens_are_refused() {
    let s = setup(&["sigil:sigil-agent"]).await;
    // A secret-based token: no exp, no pod binding, the old issuer name.
    let legacy = json!({
        "iss": s.issuer.issuer,
        "aud": ["sigil-server"],
        "kubernetes.io/serviceaccount/namespace": "sigil",
        "kubernetes.io/serviceaccount/secret.name": "sigil-agent-token-abcde",
        "kubernetes.io/serviceaccount/service-account.name": "sigil-agent",
        "sub": "system:serviceaccount:sigil:sigil-agent"
    });
    let t = s.issuer.mint_raw(&s.issuer.header(), &legacy);
    let err = refused(&s, &t).await;
    assert_eq!(err, PsatError::NoExpiry);
    assert!(err.to_string().contains("legacy non-expiring"));
}

#[tokio::test]
async fn unknown_key_is_refused_and_refetches_are_rate_limited() {
    let s = setup(&["sigil:sigil-agent"]).await;
    let stranger = FakeIssuer::ec("key-2", &s.issuer.issuer);
    let t = stranger.mint();
    assert!(matches!(
        refused(&s, &t).await,
        PsatError::UnknownKid { .. }
    ));
    assert!(matches!(
        refused(&s, &t).await,
        PsatError::UnknownKid { .. }
    ));
    // One discovery for the first token; the second unknown kid within
    // the minimum interval caused no second fetch.
    assert_eq!(s.issuer_server.hits("/openid/v1/jwks"), 1);
}

#[tokio::test]
async fn a_rotated_in_key_is_fetched_when_a_token_names_it() {
    let issuer_server = testserver::start().await;
    let old = FakeIssuer::ec("old", &issuer_server.base_url);
    serve_issuer(&issuer_server, &issuer_server.base_url, &[&old]).await;
    let (_api, pods) = api_server().await;
    let mut cfg = cluster(
        "prod",
        issuer_server.base_url.clone(),
        KeySource::Discovery {
            issuer_url: issuer_server.base_url.clone(),
            client: HttpsClient::new(Trust::Roots(vec![issuer_server.ca_der.clone()])).unwrap(),
            token_file: None,
        },
        pods,
    );
    cfg.jwks_min_refetch = Duration::ZERO;
    let a = K8sPsatAttestor::new(
        TrustDomain::new("example.org").unwrap(),
        vec![cfg],
        Arc::new(SystemClock),
    )
    .unwrap();
    assert!(a.verify(&evidence("prod", &old.mint())).await.is_ok());
    let new = FakeIssuer::ec("new", &issuer_server.base_url);
    serve_issuer(&issuer_server, &issuer_server.base_url, &[&old, &new]).await;
    assert!(a.verify(&evidence("prod", &new.mint())).await.is_ok());
    assert_eq!(issuer_server.hits("/openid/v1/jwks"), 2);
    // Cached now: no third fetch for a known key.
    assert!(a.verify(&evidence("prod", &new.mint())).await.is_ok());
    assert_eq!(issuer_server.hits("/openid/v1/jwks"), 2);
}

#[tokio::test]
async fn another_clusters_key_does_not_verify() {
    // Two clusters whose issuers both use the key ID "k1".
    let dir = tempfile::tempdir().unwrap();
    let a_key = FakeIssuer::ec("k1", "https://a.example");
    let b_key = FakeIssuer::ec("k1", "https://b.example");
    let (_api, pods) = api_server().await;
    let mut clusters = Vec::new();
    for (name, k) in [("a", &a_key), ("b", &b_key)] {
        let path = dir.path().join(format!("{name}.json"));
        std::fs::write(&path, FakeIssuer::jwks(&[k])).unwrap();
        clusters.push(cluster(
            name,
            k.issuer.clone(),
            KeySource::File(path),
            pods.clone(),
        ));
    }
    let att = K8sPsatAttestor::new(
        TrustDomain::new("example.org").unwrap(),
        clusters,
        Arc::new(SystemClock),
    )
    .unwrap();
    // Cluster b's token is fine for b ...
    assert!(att.verify(&evidence("b", &b_key.mint())).await.is_ok());
    // ... but presented as cluster a (even with a's issuer claim) it fails
    // on a's key.
    let forged = b_key.mint_with(|c| c["iss"] = json!("https://a.example"));
    assert_eq!(
        att.verify(&evidence("a", &forged)).await.unwrap_err(),
        PsatError::Jws(JwsError::BadSignature)
    );
    // And a's issuer claim is required for cluster a.
    assert!(matches!(
        att.verify(&evidence("a", &b_key.mint())).await.unwrap_err(),
        PsatError::Jws(JwsError::BadSignature) | PsatError::WrongIssuer(_)
    ));
    assert!(matches!(
        att.verify(&evidence("c", &b_key.mint())).await.unwrap_err(),
        PsatError::UnknownCluster(_)
    ));
}

#[tokio::test]
async fn alg_none_and_hmac_are_refused() {
    let s = setup(&["sigil:sigil-agent"]).await;
    let claims = B64URL.encode(serde_json::to_vec(&s.issuer.claims()).unwrap());
    for alg in ["none", "None", "NONE"] {
        let h = B64URL.encode(serde_json::to_vec(&json!({"alg": alg, "kid": "key-1"})).unwrap());
        assert_eq!(
            refused(&s, &format!("{h}.{claims}.")).await,
            PsatError::Jws(JwsError::AlgNone)
        );
    }
    // HS256 keyed with the issuer's public key: the classic confusion.
    let h = B64URL.encode(serde_json::to_vec(&json!({"alg": "HS256", "kid": "key-1"})).unwrap());
    let input = format!("{h}.{claims}");
    let mac_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &s.issuer.public().to_spki_der());
    let tag = B64URL.encode(ring::hmac::sign(&mac_key, input.as_bytes()).as_ref());
    assert_eq!(
        refused(&s, &format!("{input}.{tag}")).await,
        PsatError::Jws(JwsError::AlgHmac)
    );
    // ES256 header with the right kid but the signature of another key.
    let other = FakeIssuer::ec("key-1", &s.issuer.issuer);
    assert_eq!(
        refused(&s, &other.mint()).await,
        PsatError::Jws(JwsError::BadSignature)
    );
    // An embedded key is never used.
    let with_jwk = json!({"alg": "ES256", "kid": "key-1", "jwk": s.issuer.jwk()});
    assert_eq!(
        refused(&s, &s.issuer.mint_raw(&with_jwk, &s.issuer.claims())).await,
        PsatError::Jws(JwsError::EmbeddedKey("jwk"))
    );
    // An RS256 header over an EC key.
    let rs = json!({"alg": "RS256", "kid": "key-1"});
    assert!(matches!(
        refused(&s, &s.issuer.mint_raw(&rs, &s.issuer.claims())).await,
        PsatError::Jws(JwsError::AlgKeyMismatch(_))
    ));
}

#[tokio::test]
async fn deleted_or_recreated_pod_is_refused() {
    let s = setup(&["sigil:sigil-agent"]).await;
    // The pod was deleted and re-created by the DaemonSet: same name, new UID.
    s.api.route(
        POD_PATH,
        200,
        pod_json(
            "sigil-agent-x7k2p",
            "00000000-1111-4222-8333-444444444444",
            "node-a",
        ),
    );
    assert_eq!(
        refused(&s, &s.issuer.mint()).await,
        PsatError::PodUidMismatch("sigil/sigil-agent-x7k2p".into())
    );
    // The pod is gone.
    s.api.route(POD_PATH, 404, &br#"{"kind":"Status","apiVersion":"v1","status":"Failure","reason":"NotFound","code":404}"#[..]);
    assert_eq!(
        refused(&s, &s.issuer.mint()).await,
        PsatError::PodGone("sigil/sigil-agent-x7k2p".into())
    );
    // The pod runs on another node than the token claims.
    s.api.route(
        POD_PATH,
        200,
        pod_json("sigil-agent-x7k2p", POD_UID, "node-b"),
    );
    assert!(matches!(
        refused(&s, &s.issuer.mint()).await,
        PsatError::PodNodeMismatch(_)
    ));
    // The API server refuses the lookup: an internal error, not a verdict.
    s.api.route(POD_PATH, 403, &b"{}"[..]);
    let err = refused(&s, &s.issuer.mint()).await;
    assert!(
        matches!(err, PsatError::PodLookup(ref m) if m.contains("get on pods")),
        "{err}"
    );
}

#[tokio::test]
async fn service_account_outside_the_allow_list_is_refused() {
    let s = setup(&["sigil:sigil-agent", "kube-system:other"]).await;
    let t = s.issuer.mint_with(|c| {
        c["kubernetes.io"]["serviceaccount"]["name"] = json!("default");
    });
    assert_eq!(
        refused(&s, &t).await,
        PsatError::ServiceAccountNotAllowed("sigil:default".into())
    );
    // No pod lookup happened for a refused service account.
    assert_eq!(s.api.hits(POD_PATH), 0);
}

#[tokio::test]
async fn tokens_without_pod_or_node_binding_are_refused() {
    let s = setup(&["sigil:sigil-agent"]).await;
    let t = s.issuer.mint_with(|c| {
        c["kubernetes.io"].as_object_mut().unwrap().remove("pod");
    });
    assert!(matches!(refused(&s, &t).await, PsatError::NoPodBinding(_)));
    let t = s.issuer.mint_with(|c| {
        c["kubernetes.io"].as_object_mut().unwrap().remove("node");
    });
    let err = refused(&s, &t).await;
    assert_eq!(err, PsatError::NoNodeUid);
    assert!(err.to_string().contains("1.30"));
    let t = s
        .issuer
        .mint_with(|c| c["iss"] = json!("https://elsewhere.example"));
    assert!(matches!(refused(&s, &t).await, PsatError::WrongIssuer(_)));
}

#[tokio::test]
async fn names_unfit_for_an_id_are_refused_not_cleaned() {
    let s = setup(&["sigil:sigil-agent"]).await;
    let t = s
        .issuer
        .mint_with(|c| c["kubernetes.io"]["node"]["uid"] = json!("../../server"));
    // The token itself is fine; the node UID cannot become an ID segment.
    let pod = s.attestor.verify(&evidence("prod", &t)).await.unwrap();
    assert_eq!(
        s.attestor.attestation(&pod).unwrap_err(),
        PsatError::BadName("node uid")
    );
    let err = s
        .attestor
        .attest(&evidence("prod", &t), &mut NoChallenges)
        .await
        .unwrap_err();
    assert_eq!(err, AttestError::Rejected("k8s_psat token refused"));
}

#[tokio::test]
async fn malformed_evidence_tells_the_agent_little() {
    let s = setup(&["sigil:sigil-agent"]).await;
    for bad in [
        &b"not json"[..],
        br#"{"cluster":"prod"}"#,
        br#"{"cluster":"prod","token":"a.b"}"#,
        &vec![b' '; MAX_EVIDENCE_LEN + 1],
    ] {
        let err = s.attestor.attest(bad, &mut NoChallenges).await.unwrap_err();
        assert_eq!(err, AttestError::Malformed("k8s_psat evidence"));
    }
}

#[test]
fn bad_cluster_configuration_is_refused() {
    let pods: Arc<dyn PodLookup> = Arc::new(ApiServerPods::new(
        "https://127.0.0.1:1",
        HttpsClient::new(Trust::InsecureSkipVerify).unwrap(),
        None,
    ));
    let td = TrustDomain::new("example.org").unwrap();
    let mk = |name: &str| cluster(name, "https://i", KeySource::File("x".into()), pods.clone());
    assert!(K8sPsatAttestor::new(td.clone(), vec![mk("a/b")], Arc::new(SystemClock)).is_err());
    assert!(
        K8sPsatAttestor::new(td.clone(), vec![mk("a"), mk("a")], Arc::new(SystemClock)).is_err()
    );
    let mut open_to_all = mk("a");
    open_to_all.allowed_service_accounts.clear();
    let err = K8sPsatAttestor::new(td.clone(), vec![open_to_all], Arc::new(SystemClock))
        .expect_err("an empty allow-list is refused");
    assert!(
        err.to_string().contains("allowed_service_accounts"),
        "{err}"
    );
    let mut bad_sa = mk("a");
    bad_sa.allowed_service_accounts = vec!["no-colon".into()];
    assert!(K8sPsatAttestor::new(td.clone(), vec![bad_sa], Arc::new(SystemClock)).is_err());
    assert!(K8sPsatAttestor::new(td, vec![mk("a")], Arc::new(SystemClock)).is_ok());
}

#[tokio::test]
async fn pod_lookup_refuses_names_that_would_escape_the_url_path() {
    let (api, pods) = api_server().await;
    assert!(pods.pod("sigil", "../../secrets").await.is_err());
    assert!(pods.pod("a/b", "x").await.is_err());
    assert_eq!(api.hits.lock().unwrap().len(), 0);
}

#[test]
fn agent_half_reads_the_token_fresh_and_hides_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("token");
    std::fs::write(&path, "first-token\n").unwrap();
    let agent = K8sPsatAgent::new("prod", &path);
    let ev: Value = serde_json::from_slice(&agent.evidence().unwrap()).unwrap();
    assert_eq!(ev, json!({"cluster": "prod", "token": "first-token"}));
    std::fs::write(&path, "rotated-token").unwrap();
    let ev: Value = serde_json::from_slice(&agent.evidence().unwrap()).unwrap();
    assert_eq!(ev["token"], "rotated-token");
    assert!(!format!("{agent:?}").contains("rotated-token"));
    std::fs::remove_file(&path).unwrap();
    let err = agent.evidence().unwrap_err();
    assert!(err.to_string().contains("projected"), "{err}");
}

#[test]
fn jwks_parsing_skips_unusable_keys() {
    let a = FakeIssuer::ec("a", "i");
    let mut enc = a.jwk();
    enc["use"] = json!("enc");
    enc["kid"] = json!("enc");
    let mut nokid = a.jwk();
    nokid.as_object_mut().unwrap().remove("kid");
    let oct = json!({"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"});
    let bytes = serde_json::to_vec(&json!({"keys": [a.jwk(), enc, nokid, oct]})).unwrap();
    let keys = parse_jwks(&bytes).unwrap();
    assert_eq!(keys.keys().collect::<Vec<_>>(), vec!["a"]);
    assert!(parse_jwks(b"{}").is_err());
    assert!(parse_jwks(b"[").is_err());
}

#[test]
fn the_api_token_only_goes_to_the_issuers_origin() {
    let issuer = "https://kubernetes.default.svc.cluster.local";
    assert_eq!(
        origin("https://KUBERNETES.default.svc.cluster.local/openid/v1/jwks"),
        origin(issuer)
    );
    for other in [
        "https://10.0.0.1:6443/openid/v1/jwks",
        "http://kubernetes.default.svc.cluster.local/openid/v1/jwks",
        "https://kubernetes.default.svc.cluster.local.evil.example/jwks",
        "https://kubernetes.default.svc.cluster.local:8443/jwks",
    ] {
        assert_ne!(origin(other), origin(issuer), "{other}");
    }
}
