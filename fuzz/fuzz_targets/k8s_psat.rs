#![no_main]
//! k8s_psat token verification on the server, with the fixture key as the
//! cluster issuer's key set and a fixed clock. Input: 0x00 + the evidence
//! JSON as the agent sends it, or 0x01 + header JSON NUL claims JSON,
//! which the target signs with the issuer key (cluster "demo") so the
//! claim checks are reached.
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use sigil_attestors::k8s_psat::{ClusterConfig, K8sPsatAttestor, KeySource, PodInfo, PodLookup};
use sigil_identity::attestation::{AttestError, Challenger, ServerNodeAttestor};
use sigil_identity::clock::FakeClock;

/// One pod, `sigil/sigil-agent-x1` with UID `pod-uid-1` on `node-1`.
#[derive(Debug)]
struct OnePod;

#[async_trait::async_trait]
impl PodLookup for OnePod {
    async fn pod(&self, namespace: &str, name: &str) -> Result<Option<PodInfo>, String> {
        Ok(
            (namespace == "sigil" && name == "sigil-agent-x1").then(|| PodInfo {
                uid: "pod-uid-1".into(),
                node_name: Some("node-1".into()),
            }),
        )
    }
}

struct NoChallenge;

#[async_trait::async_trait]
impl Challenger for NoChallenge {
    async fn challenge(&mut self, _challenge: Vec<u8>) -> Result<Vec<u8>, AttestError> {
        Err(AttestError::Malformed("k8s_psat sends no challenge"))
    }
}

fn attestor() -> &'static K8sPsatAttestor {
    static ATTESTOR: OnceLock<K8sPsatAttestor> = OnceLock::new();
    ATTESTOR.get_or_init(|| {
        let jwks =
            std::env::temp_dir().join(format!("sigil-fuzz-jwks-{}.json", std::process::id()));
        std::fs::write(&jwks, sigil_fuzz::issuer_jwks()).expect("the temp dir is writable");
        let mut cluster = ClusterConfig::new(
            "demo",
            "https://kubernetes.default.svc",
            KeySource::File(jwks),
            Arc::new(OnePod),
        );
        cluster.allowed_service_accounts = vec!["sigil:sigil-agent".into()];
        K8sPsatAttestor::new(
            sigil_fuzz::trust_domain(),
            vec![cluster],
            Arc::new(FakeClock::new(sigil_fuzz::now())),
        )
        .expect("the fixed cluster configuration is valid")
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let evidence = if mode & 1 == 0 {
        rest.to_vec()
    } else {
        let (header, claims) = sigil_fuzz::split_nul(rest);
        let token = sigil_fuzz::sign_jws(header, claims);
        serde_json::to_vec(&serde_json::json!({"cluster": "demo", "token": token}))
            .expect("a JSON value serialises")
    };
    let attestor = attestor();
    let verified = sigil_fuzz::block_on(attestor.verify(&evidence));
    let attested = sigil_fuzz::block_on(attestor.attest(&evidence, &mut NoChallenge));
    if let Ok(pod) = &verified {
        // Only the configured service account, only the pod that exists.
        assert_eq!(
            (pod.namespace.as_str(), pod.service_account.as_str()),
            ("sigil", "sigil-agent")
        );
        assert_eq!(pod.pod_uid, "pod-uid-1");
        assert_eq!(pod.node_name, "node-1");
    }
    if let Ok(a) = &attested {
        assert!(verified.is_ok(), "attested what does not verify");
        assert!(
            a.agent_id
                .as_str()
                .starts_with("spiffe://example.org/sigil/agent/k8s_psat/demo/")
        );
    }
});
