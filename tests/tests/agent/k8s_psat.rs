//! An agent in a pod attests to a real server with its projected
//! service-account token (`k8s_psat`). The issuer is a key made here whose
//! JWKS the server reads from a file; a fake API server (HTTPS, the real Pod
//! JSON) stands in for the Kubernetes API server's pod lookup.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use crate::common::AgentTestServer as _;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use serde_json::json;
use sigil_agent::config::AgentConfig;
use sigil_agent::session::Session;
use sigil_identity::keys::{Curve, PublicKey};
use sigil_proto::admin;
use sigil_test_fakes as testserver;
use sigil_tests::process::ServerProcess;

const NODE_UID: &str = "6f1d2b8e-4c3a-4d2e-9b7a-0c5e8f9a1b2c";
const POD_UID: &str = "3a4b5c6d-7e8f-4a0b-9c1d-2e3f4a5b6c7d";
const POD_PATH: &str = "/api/v1/namespaces/sigil/pods/sigil-agent-x7k2p";
const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

fn projected_token(key: &EcdsaKeyPair) -> String {
    let now = sigil_identity::clock::unix_seconds(std::time::SystemTime::now());
    let header = json!({"alg": "ES256", "kid": "k1"});
    let claims = json!({
        "aud": ["sigil-server"], "exp": now + 3600, "iat": now, "nbf": now, "iss": ISSUER,
        "kubernetes.io": {
            "namespace": "sigil",
            "node": {"name": "node-a", "uid": NODE_UID},
            "pod": {"name": "sigil-agent-x7k2p", "uid": POD_UID},
            "serviceaccount": {"name": "sigil-agent", "uid": "9e8d7c6b-5a4f-4e3d-8c2b-1a0f9e8d7c6b"}
        },
        "sub": "system:serviceaccount:sigil:sigil-agent"
    });
    let input = format!(
        "{}.{}",
        B64URL.encode(serde_json::to_vec(&header).unwrap()),
        B64URL.encode(serde_json::to_vec(&claims).unwrap())
    );
    let sig = key.sign(&SystemRandom::new(), input.as_bytes()).unwrap();
    format!("{input}.{}", B64URL.encode(sig.as_ref()))
}

fn pod_json(uid: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "kind": "Pod", "apiVersion": "v1",
        "metadata": {"name": "sigil-agent-x7k2p", "namespace": "sigil", "uid": uid},
        "spec": {"nodeName": "node-a", "serviceAccountName": "sigil-agent"},
        "status": {"phase": "Running"}
    }))
    .unwrap()
}

fn agent_config(server: &ServerProcess, data: &Path, token: &Path) -> AgentConfig {
    AgentConfig::parse(&format!(
        "trust_domain = \"example.org\"\nserver_address = \"{}\"\ndata_dir = \"{}\"\ntrust_bundle = \"{}\"\n[node_attestor.k8s_psat]\ncluster = \"prod\"\ntoken_path = \"{}\"\n",
        server.addr,
        data.display(),
        server.dir().join("bundle.pem").display(),
        token.display()
    ))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_attests_with_its_projected_token_until_its_pod_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
    let key =
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng).unwrap();
    let mut jwk = PublicKey::ec(Curve::P256, key.public_key().as_ref().to_vec())
        .unwrap()
        .jwk_members();
    jwk.insert("kid".into(), json!("k1"));
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, serde_json::to_vec(&json!({"keys": [jwk]})).unwrap()).unwrap();

    let api = testserver::start().await;
    api.route(POD_PATH, 200, pod_json(POD_UID));
    let api_ca = dir.path().join("api-ca.pem");
    std::fs::write(
        &api_ca,
        sigil_identity::pem::encode("CERTIFICATE", &api.ca_der),
    )
    .unwrap();
    let api_token = dir.path().join("api-token");
    std::fs::write(&api_token, "server-token").unwrap();

    let server = crate::common::start(&format!(
        "[node_attestors.k8s_psat.clusters.prod]\nissuer = \"{ISSUER}\"\njwks_file = \"{}\"\nallowed_service_accounts = [\"sigil:sigil-agent\"]\napi_server = \"{}\"\napi_ca_file = \"{}\"\napi_token_file = \"{}\"\n",
        jwks.display(),
        api.base_url,
        api_ca.display(),
        api_token.display()
    ));
    server.bundle_pem(&server.dir().join("bundle.pem")).await;
    let token = dir.path().join("token");
    std::fs::write(&token, projected_token(&key)).unwrap();

    Session::start(agent_config(&server, &dir.path().join("a1"), &token))
        .await
        .unwrap();
    let agents = server
        .admin()
        .await
        .unwrap()
        .list_agents(admin::ListAgentsRequest {})
        .await
        .unwrap()
        .into_inner()
        .agents;
    assert_eq!(agents.len(), 1);
    assert_eq!(
        agents[0].id,
        format!("spiffe://example.org/sigil/agent/k8s_psat/prod/{NODE_UID}")
    );
    for s in [
        "k8s_psat:cluster:prod",
        "k8s_psat:agent_ns:sigil",
        "k8s_psat:agent_sa:sigil-agent",
        "k8s_psat:agent_node_name:node-a",
    ] {
        assert!(
            agents[0].selectors.iter().any(|x| x == s),
            "{s}: {:?}",
            agents[0].selectors
        );
    }
    assert!(agents[0].can_reattest);

    // The same node attests again (a restarted agent without its data).
    Session::start(agent_config(&server, &dir.path().join("a2"), &token))
        .await
        .unwrap();

    // The pod was deleted and re-created: its old token is refused.
    api.route(
        POD_PATH,
        200,
        pod_json("00000000-1111-4222-8333-444444444444"),
    );
    let err = Session::start(agent_config(&server, &dir.path().join("a3"), &token))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("attestation failed"), "{err}");
    // Refused at the pod lookup: the third lookup is the one that found another UID.
    // The lookups went to the API server with the server's own token.
    assert!(
        api.hits
            .lock()
            .unwrap()
            .iter()
            .all(|(p, auth)| p == POD_PATH && auth.as_deref() == Some("Bearer server-token"))
    );
    assert_eq!(api.hits(POD_PATH), 3);
}
