//! The PKCS#11 key manager against SoftHSM2: issuance, CA rotation and
//! restart with CA keys in a token, and the key objects' attributes read
//! back through PKCS#11.
//!
//! Needs `SIGIL_SOFTHSM2_MODULE` (the module path); without it each test
//! prints "skipped: ..." and passes, unless `SIGIL_REQUIRE_SOFTHSM2=1`.
//! Each test makes its own token directory and runs its PKCS#11 part in a
//! child process (see `sigil_test_fakes::softhsm`).

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use rcgen::{CertificateParams, KeyPair};
use sigil_identity::clock::{Clock, FakeClock, SystemClock, from_unix_seconds};
use sigil_identity::x509 as svid;
use sigil_identity::{SpiffeId, jwt};
use sigil_server::ca::journal::SlotState;
use sigil_server::ca::keys::{KeyAlgorithm, KeyId, KeyManager};
use sigil_server::ca::pkcs11::{Pkcs11KeyManager, Pkcs11Settings, private_key_flags};
use sigil_server::ca::{CaConfig, CaManager};
use sigil_server::datastore::SledDatastore;
use sigil_test_fakes::softhsm::{self, SoftHsm};
use zeroize::Zeroizing;

/// In the child: the token. In the parent: makes a token, runs the test
/// `name` in a child against it, and returns `None` (also when skipped).
fn token(name: &str) -> Option<SoftHsm> {
    if let Some(hsm) = SoftHsm::in_child() {
        return Some(hsm);
    }
    let module = softhsm::module()?;
    let dir = tempfile::tempdir().unwrap();
    let hsm = SoftHsm::init(&module, dir.path(), "sigil-ca");
    softhsm::run_in_child(name, &hsm);
    None
}

fn manager(hsm: &SoftHsm) -> Arc<Pkcs11KeyManager> {
    Arc::new(
        Pkcs11KeyManager::open(Pkcs11Settings {
            module: hsm.module.clone(),
            token_label: hsm.label.clone(),
            pin: Zeroizing::new(hsm.pin.clone()),
        })
        .unwrap(),
    )
}

fn web() -> SpiffeId {
    SpiffeId::parse("spiffe://example.org/web").unwrap()
}

fn csr() -> Vec<u8> {
    let key = KeyPair::generate().unwrap();
    CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .der()
        .to_vec()
}

async fn start(
    dir: &std::path::Path,
    keys: Arc<Pkcs11KeyManager>,
    clock: Arc<dyn Clock>,
    ttl: Duration,
) -> Arc<CaManager> {
    let store = Arc::new(SledDatastore::open(dir).unwrap());
    let mut cfg = CaConfig::new(td());
    cfg.ca_ttl = ttl;
    cfg.x509_svid_ttl = Duration::from_secs(600);
    CaManager::start(cfg, store, keys, clock, None)
        .await
        .unwrap()
}

#[tokio::test]
async fn hsm_issuance_x509_and_jwt_verify() {
    let Some(hsm) = token("hsm_issuance_x509_and_jwt_verify") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let keys = manager(&hsm);
    let ca = start(
        dir.path(),
        keys.clone(),
        Arc::new(SystemClock),
        Duration::from_secs(86400),
    )
    .await;
    let bundle = ca.bundle();
    let now = std::time::SystemTime::now();

    let issued = ca.issue_x509_svid(&web(), &[], None, &csr()).unwrap();
    assert_eq!(
        svid::verify_svid(&issued.chain, &bundle, now).unwrap(),
        web()
    );
    let (ok, out) = openssl::openssl_verify(
        dir.path(),
        &issued.chain[0],
        &issued.chain[1..],
        &bundle.x509_authorities,
    )
    .unwrap();
    assert!(ok, "openssl verify: {out}");

    let token = ca.mint_jwt_svid(&web(), &["svc".into()], None).unwrap();
    let got = jwt::validate(&token.token, &["svc"], &*bundle, now).unwrap();
    assert_eq!(got.spiffe_id, web());

    // The CA certificate's key is the token's key: the keys of the journal
    // are in the token, and nowhere else.
    let journal = ca.journal().await;
    let active = journal
        .x509
        .iter()
        .find(|s| s.state == SlotState::Active)
        .unwrap();
    let key = keys
        .load(&active.key_id, KeyAlgorithm::EcP256)
        .unwrap()
        .expect("the active X.509 key is in the token");
    let cert = svid::parse(&active.cert_der).unwrap();
    assert_eq!(
        cert.public_key().subject_public_key.data.as_ref(),
        key.public_key()
    );
    assert!(!dir.path().join("keys").exists(), "no key files");
}

#[tokio::test]
async fn hsm_keys_are_sensitive_and_not_extractable() {
    let Some(hsm) = token("hsm_keys_are_sensitive_and_not_extractable") else {
        return;
    };
    let keys = manager(&hsm);
    for alg in [KeyAlgorithm::EcP256, KeyAlgorithm::EcP384] {
        let id = KeyId::generate("x509");
        let key = keys.generate(&id, alg).unwrap();
        let flags = private_key_flags(&keys, &id).unwrap().unwrap();
        assert!(flags.token, "{alg:?}: CKA_TOKEN");
        assert!(flags.private, "{alg:?}: CKA_PRIVATE");
        assert!(flags.sensitive, "{alg:?}: CKA_SENSITIVE");
        assert!(!flags.extractable, "{alg:?}: CKA_EXTRACTABLE is false");
        assert!(flags.ec, "{alg:?}: an EC key");

        // Its signatures verify with its public key.
        let verify_alg: &dyn ring::signature::VerificationAlgorithm = match alg {
            KeyAlgorithm::EcP256 => &ring::signature::ECDSA_P256_SHA256_FIXED,
            KeyAlgorithm::EcP384 => &ring::signature::ECDSA_P384_SHA384_FIXED,
        };
        let sig = key.sign(b"to be signed").unwrap();
        ring::signature::UnparsedPublicKey::new(verify_alg, key.public_key())
            .verify(b"to be signed", &sig)
            .unwrap();

        keys.delete(&id).unwrap();
        assert!(private_key_flags(&keys, &id).unwrap().is_none());
        assert!(keys.load(&id, alg).unwrap().is_none());
        keys.delete(&id).unwrap();
    }
}

#[tokio::test]
async fn hsm_rotation_prepares_activates_and_deletes_keys() {
    let Some(hsm) = token("hsm_rotation_prepares_activates_and_deletes_keys") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let keys = manager(&hsm);
    let clock = Arc::new(FakeClock::new(from_unix_seconds(1_800_000_000)));
    let ttl = Duration::from_secs(6 * 3600);
    let ca = start(dir.path(), keys.clone(), clock.clone(), ttl).await;
    let first = ca.journal().await;

    let mut activations = 0;
    for _ in 0..(3 * 6 * 4) {
        clock.advance(Duration::from_secs(15 * 60));
        activations += ca.rotate().await.unwrap().activated;
        let now = clock.now();
        let bundle = ca.bundle();
        let issued = ca.issue_x509_svid(&web(), &[], None, &csr()).unwrap();
        svid::verify_svid(&issued.chain, &bundle, now).unwrap();
        let t = ca.mint_jwt_svid(&web(), &["svc".into()], None).unwrap();
        jwt::validate(&t.token, &["svc"], &*bundle, now).unwrap();
    }
    assert!(
        activations >= 4,
        "X.509 and JWT keys rotated at least twice each: {activations}"
    );
    // The first keys expired, left the journal and the token.
    let journal = ca.journal().await;
    for slot in &first.x509 {
        assert!(journal.x509.iter().all(|s| s.key_id != slot.key_id));
        assert!(private_key_flags(&keys, &slot.key_id).unwrap().is_none());
    }
    for slot in &first.jwt {
        assert!(private_key_flags(&keys, &slot.key_id).unwrap().is_none());
    }
    // Every key of the journal is in the token, non-extractable.
    for id in journal
        .x509
        .iter()
        .map(|s| &s.key_id)
        .chain(journal.jwt.iter().map(|s| &s.key_id))
    {
        let flags = private_key_flags(&keys, id).unwrap().unwrap();
        assert!(flags.sensitive && !flags.extractable);
    }
}

#[tokio::test]
async fn hsm_restart_keeps_signing_with_the_token_keys() {
    let Some(hsm) = token("hsm_restart_keeps_signing_with_the_token_keys") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let ttl = Duration::from_secs(86400);
    let (bundle, journal) = {
        let ca = start(dir.path(), manager(&hsm), Arc::new(SystemClock), ttl).await;
        (ca.bundle(), ca.journal().await)
    };
    // A new manager (a new login) over the same token and store.
    let ca = start(dir.path(), manager(&hsm), Arc::new(SystemClock), ttl).await;
    let ids = |j: &sigil_server::ca::journal::CaJournal| {
        j.x509
            .iter()
            .map(|s| (s.key_id.clone(), s.state))
            .chain(j.jwt.iter().map(|s| (s.key_id.clone(), s.state)))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        ids(&ca.journal().await),
        ids(&journal),
        "no new keys after a restart"
    );
    assert_eq!(ca.bundle().x509_authorities, bundle.x509_authorities);
    let now = std::time::SystemTime::now();
    let issued = ca.issue_x509_svid(&web(), &[], None, &csr()).unwrap();
    svid::verify_svid(&issued.chain, &bundle, now).expect("signed by the same CA key");
    let t = ca.mint_jwt_svid(&web(), &["svc".into()], None).unwrap();
    jwt::validate(&t.token, &["svc"], &*bundle, now).expect("signed by the same JWT key");
}

#[tokio::test]
async fn hsm_errors_name_the_token_and_what_to_check() {
    let Some(hsm) = token("hsm_errors_name_the_token_and_what_to_check") else {
        return;
    };
    let open = |label: &str, pin: &str| {
        Pkcs11KeyManager::open(Pkcs11Settings {
            module: hsm.module.clone(),
            token_label: label.to_owned(),
            pin: Zeroizing::new(pin.to_owned()),
        })
    };
    let err = open("no-such-token", &hsm.pin).unwrap_err().to_string();
    assert!(
        err.contains(&hsm.module.display().to_string())
            && err.contains("no-such-token")
            && err.contains(&hsm.label),
        "names the module, the label asked for and the tokens there: {err}"
    );
    let err = open(&hsm.label, "wrong-pin-0000").unwrap_err().to_string();
    assert!(
        err.contains("login") && err.contains("check the PIN"),
        "a wrong PIN says what to check: {err}"
    );
    assert!(
        !err.contains("wrong-pin-0000"),
        "the PIN is never shown: {err}"
    );
    let err = Pkcs11KeyManager::open(Pkcs11Settings {
        module: "/nonexistent/libpkcs11.so".into(),
        token_label: hsm.label.clone(),
        pin: Zeroizing::new(hsm.pin.clone()),
    })
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("/nonexistent/libpkcs11.so") && err.contains("cannot load"),
        "{err}"
    );
    // The right PIN still works after the failures.
    let keys = open(&hsm.label, &hsm.pin).unwrap();
    assert!(format!("{keys:?}").contains(&hsm.label));
}
