//! The authority state machine on a real journal, bundle and key store,
//! with a fake clock; restarts in between.

use std::path::Path;
use std::time::Duration;

use sigil_identity::clock::{Clock, FakeClock, from_unix_seconds};

use super::*;
use crate::ca::CaConfig;
use crate::ca::keys::{DiskKeyManager, KeyManager};
use crate::datastore::{Datastore, SledDatastore};

const HOUR: u64 = 3600;

struct Harness {
    store: Arc<SledDatastore>,
    keys: Arc<dyn KeyManager>,
    clock: Arc<FakeClock>,
}

impl Harness {
    fn new(dir: &Path) -> Self {
        Self {
            store: Arc::new(SledDatastore::open(dir.join("data")).unwrap()),
            keys: Arc::new(DiskKeyManager::open(dir.join("keys")).unwrap()),
            clock: Arc::new(FakeClock::new(from_unix_seconds(1_800_000_000))),
        }
    }

    async fn start(&self) -> Arc<CaManager> {
        let cfg = CaConfig {
            ca_ttl: Duration::from_secs(24 * HOUR),
            ..CaConfig::new(sigil_identity::TrustDomain::new("example.org").unwrap())
        };
        CaManager::start(
            cfg,
            self.store.clone(),
            self.keys.clone(),
            self.clock.clone(),
            None,
        )
        .await
        .unwrap()
    }
}

fn in_state(ca: &[AuthorityView], state: SlotState) -> Vec<String> {
    ca.iter()
        .filter(|v| v.state == state)
        .map(|v| v.id.clone())
        .collect()
}

/// Prepares and activates a new authority of `kind`; returns (old, new).
async fn rotate_by_hand(ca: &CaManager, kind: AuthorityKind) -> (String, String) {
    let before = ca.authorities(kind).await;
    let old = in_state(&before, SlotState::Active).pop().unwrap();
    let new = ca.prepare_authority(kind).await.unwrap();
    assert_eq!(new.state, SlotState::Prepared);
    ca.activate_authority(kind, &new.id).await.unwrap();
    (old, new.id)
}

#[tokio::test]
async fn the_full_cycle_for_both_kinds_survives_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let h = Harness::new(dir.path());
    for kind in [AuthorityKind::X509, AuthorityKind::Jwt] {
        let ca = h.start().await;
        let (old, new) = rotate_by_hand(&ca, kind).await;
        let views = ca.authorities(kind).await;
        assert_eq!(in_state(&views, SlotState::Active), vec![new.clone()]);
        assert_eq!(in_state(&views, SlotState::Retired), vec![old.clone()]);

        ca.taint_authority(kind, &old).await.unwrap();
        let b = ca.bundle();
        match kind {
            AuthorityKind::X509 => assert_eq!(b.tainted_x509_authorities.len(), 1),
            AuthorityKind::Jwt => assert_eq!(b.tainted_jwt_kids, vec![old.clone()]),
        }
        drop(ca);

        // Restart: the taint is still there, in the journal and the bundle.
        let ca = h.start().await;
        let views = ca.authorities(kind).await;
        assert_eq!(in_state(&views, SlotState::Tainted), vec![old.clone()]);
        assert!(ca.bundle().has_taint());
        let x509_before = ca.bundle().x509_authorities.len();

        ca.revoke_authority(kind, &old).await.unwrap();
        let b = ca.bundle();
        assert!(!b.has_taint());
        match kind {
            AuthorityKind::X509 => assert_eq!(b.x509_authorities.len(), x509_before - 1),
            AuthorityKind::Jwt => assert!(b.jwt_authority(&old).is_none()),
        }
        drop(ca);

        // Restart: the revoked authority is not published again.
        let ca = h.start().await;
        let views = ca.authorities(kind).await;
        assert_eq!(in_state(&views, SlotState::Revoked), vec![old.clone()]);
        let b = ca.bundle();
        assert!(!b.has_taint());
        if kind == AuthorityKind::Jwt {
            assert!(b.jwt_authority(&old).is_none());
            assert!(b.jwt_authority(&new).is_some());
        }
    }
}

#[tokio::test]
async fn every_refused_transition_names_its_rule() {
    let dir = tempfile::tempdir().unwrap();
    let h = Harness::new(dir.path());
    let ca = h.start().await;
    for kind in [AuthorityKind::X509, AuthorityKind::Jwt] {
        let active = in_state(&ca.authorities(kind).await, SlotState::Active)
            .pop()
            .unwrap();
        // Unknown id.
        let e = ca.activate_authority(kind, "00ff").await.unwrap_err();
        assert!(matches!(e, AuthorityError::Unknown { .. }), "{e}");
        let e = ca.taint_authority(kind, "00ff").await.unwrap_err();
        assert!(e.to_string().contains("show` lists them"), "{e}");
        // Activate a non-prepared one.
        let e = ca.activate_authority(kind, &active).await.unwrap_err();
        assert!(
            e.to_string()
                .contains("only a prepared authority can be activated"),
            "{e}"
        );
        // Taint the active one.
        let e = ca.taint_authority(kind, &active).await.unwrap_err();
        assert!(matches!(e, AuthorityError::TaintActive { .. }), "{e}");
        // Revoke an untainted one.
        let e = ca.revoke_authority(kind, &active).await.unwrap_err();
        assert!(
            e.to_string()
                .contains("only a tainted authority can be revoked"),
            "{e}"
        );
        // A prepared one cannot be tainted, and a second prepare is refused.
        let p = ca.prepare_authority(kind).await.unwrap();
        let e = ca.taint_authority(kind, &p.id).await.unwrap_err();
        assert!(matches!(e, AuthorityError::NotOld { .. }), "{e}");
        let e = ca.prepare_authority(kind).await.unwrap_err();
        assert!(matches!(e, AuthorityError::AlreadyPrepared { .. }), "{e}");
        ca.activate_authority(kind, &p.id).await.unwrap();
        // Prepare while a tainted one is not revoked.
        ca.taint_authority(kind, &active).await.unwrap();
        let e = ca.prepare_authority(kind).await.unwrap_err();
        assert!(
            matches!(&e, AuthorityError::UnrevokedTaint { id, .. } if *id == active),
            "{e}"
        );
        assert!(e.to_string().contains("revoke it"), "{e}");
        // Taint twice.
        let e = ca.taint_authority(kind, &active).await.unwrap_err();
        assert!(matches!(e, AuthorityError::NotOld { .. }), "{e}");
        ca.revoke_authority(kind, &active).await.unwrap();
        // Revoke twice.
        let e = ca.revoke_authority(kind, &active).await.unwrap_err();
        assert!(matches!(e, AuthorityError::NotTainted { .. }), "{e}");
        // Once revoked, preparing is allowed again.
        ca.prepare_authority(kind).await.unwrap();
    }
}

#[tokio::test]
async fn automatic_rotation_does_not_undo_manual_steps() {
    let dir = tempfile::tempdir().unwrap();
    let h = Harness::new(dir.path());
    let ca = h.start().await;
    let kind = AuthorityKind::X509;
    let (old, new) = rotate_by_hand(&ca, kind).await;
    ca.taint_authority(kind, &old).await.unwrap();
    // Rotation passes well before the new key's half-life: nothing moves.
    for _ in 0..3 {
        h.clock.advance(Duration::from_secs(HOUR));
        ca.rotate().await.unwrap();
    }
    let views = ca.authorities(kind).await;
    assert_eq!(in_state(&views, SlotState::Active), vec![new.clone()]);
    assert_eq!(in_state(&views, SlotState::Tainted), vec![old.clone()]);
    assert!(ca.bundle().has_taint());
    // Past the new key's half-life the next key is prepared automatically;
    // the tainted one stays tainted.
    h.clock.advance(Duration::from_secs(10 * HOUR));
    ca.rotate().await.unwrap();
    let views = ca.authorities(kind).await;
    assert_eq!(in_state(&views, SlotState::Prepared).len(), 1);
    assert_eq!(in_state(&views, SlotState::Tainted), vec![old]);
    // An SVID issued now comes from the manually activated key.
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .unwrap();
    let id = sigil_identity::SpiffeId::parse("spiffe://example.org/w").unwrap();
    let issued = ca.issue_x509_svid(&id, &[], None, csr.der()).unwrap();
    let mut b = (*ca.bundle()).clone();
    b.set_taint(b.x509_authorities.clone(), vec![]);
    assert!(b.chain_uses_tainted(&issued.chain));
    let active_cert = h
        .store
        .fetch_ca_journal(&ca.config().server_id)
        .await
        .unwrap()
        .map(|j| CaJournal::from_bytes(&j).unwrap())
        .unwrap()
        .x509
        .into_iter()
        .find(|s| s.state == SlotState::Active)
        .unwrap();
    assert_eq!(x509_id(&active_cert.cert_der), new);
    let _ = h.clock.now();
}

#[tokio::test]
async fn a_tainted_authority_leaves_the_journal_when_it_expires() {
    let dir = tempfile::tempdir().unwrap();
    let h = Harness::new(dir.path());
    let ca = h.start().await;
    let kind = AuthorityKind::Jwt;
    let (old, _) = rotate_by_hand(&ca, kind).await;
    ca.taint_authority(kind, &old).await.unwrap();
    h.clock.advance(Duration::from_secs(25 * HOUR));
    ca.rotate().await.unwrap();
    let views = ca.authorities(kind).await;
    assert!(views.iter().all(|v| v.id != old));
    assert!(!ca.bundle().is_jwt_kid_tainted(&old));
}

#[tokio::test]
async fn ids_are_matched_in_any_case_and_with_colons() {
    let dir = tempfile::tempdir().unwrap();
    let h = Harness::new(dir.path());
    let ca = h.start().await;
    let (old, _) = rotate_by_hand(&ca, AuthorityKind::X509).await;
    let typed: String = old
        .to_ascii_uppercase()
        .as_bytes()
        .chunks(2)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect::<Vec<_>>()
        .join(":");
    let v = ca
        .taint_authority(AuthorityKind::X509, &typed)
        .await
        .unwrap();
    assert_eq!(v.id, old);
}
