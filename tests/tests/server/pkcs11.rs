//! The real server with `ca.key_manager = "pkcs11"` on a SoftHSM2 token:
//! it issues from token keys, and after a restart it signs with the same
//! keys (no new CA, no key files on disk). Needs `SIGIL_SOFTHSM2_MODULE`;
//! without it the test prints "skipped: ..." and passes, unless
//! `SIGIL_REQUIRE_SOFTHSM2=1`.

use sigil_identity::x509 as svid;
use sigil_test_fakes::softhsm::{self, SoftHsm};
use sigil_tests::process::{ServerOptions, ServerProcess};
use sigil_tests::sim_agent::SimAgent;

#[tokio::test]
async fn pkcs11_server_restart_keeps_signing_with_the_token_keys() {
    let Some(module) = softhsm::module() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let hsm = SoftHsm::init(&module, &dir.path().join("hsm"), "sigil-server");
    let options = ServerOptions {
        // SoftHSM2 finds its token directory through SOFTHSM2_CONF; the
        // PIN reaches the server through an environment variable.
        launcher: vec![
            "env".into(),
            format!("SOFTHSM2_CONF={}", hsm.conf.display()),
            format!("SIGIL_TEST_HSM_PIN={}", hsm.pin),
        ],
        extra: format!(
            "[ca]\nkey_manager = \"pkcs11\"\n\n[ca.pkcs11]\nmodule = \"{}\"\ntoken_label = \"{}\"\npin_env = \"SIGIL_TEST_HSM_PIN\"\n",
            module.display(),
            hsm.label
        ),
        ..ServerOptions::default()
    };
    let mut s = ServerProcess::start(&dir.path().join("server"), &options).unwrap();
    let before = s.bundle().await.unwrap();
    let out = s.cli(&["token", "generate"]).unwrap();
    assert!(out.status.success(), "{out:?}");
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let agent = SimAgent::join(&s, &token).await.unwrap();
    let now = std::time::SystemTime::now();
    svid::verify_svid(&agent.chain, &before, now).unwrap();

    s.restart_async().await.unwrap();
    let after = s.bundle().await.unwrap();
    assert_eq!(after.sequence, before.sequence, "no new CA after a restart");
    assert_eq!(after.x509_authorities, before.x509_authorities);
    let mut client = agent.client(&s).await.unwrap();
    let renewed = agent.renew(&mut client).await.unwrap();
    svid::verify_svid(&renewed.chain, &before, std::time::SystemTime::now())
        .expect("the restarted server signs with the same token key");
    assert!(
        !dir.path().join("server/data/keys").exists(),
        "no CA key files on disk"
    );
    let log = std::fs::read_to_string(dir.path().join("server/server.log")).unwrap();
    assert!(log.contains("PKCS#11 token logged in"), "{log}");
    assert!(!log.contains(&hsm.pin), "the PIN is never logged");
}
