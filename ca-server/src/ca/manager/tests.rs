//! CA rotation driven by a fake clock, and restarts at awkward moments.

use std::collections::HashMap;
use std::path::Path;

use sigil_identity::clock::{FakeClock, from_unix_seconds};
use sigil_identity::jwt;
use sigil_identity::x509 as svid;

use super::*;
use crate::ca::keys::{DiskKeyManager, KeyAlgorithm, MemoryKeyManager};
use crate::datastore::SledDatastore;

const HOUR: u64 = 3600;

fn td() -> sigil_identity::TrustDomain {
    sigil_identity::TrustDomain::new("example.org").unwrap()
}

fn config(ca_ttl: Duration) -> CaConfig {
    CaConfig {
        ca_ttl,
        ..CaConfig::new(td())
    }
}

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

    async fn start(&self, cfg: CaConfig) -> Arc<CaManager> {
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

fn csr() -> (Vec<u8>, rcgen::KeyPair) {
    let key = rcgen::KeyPair::generate().unwrap();
    let der = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .der()
        .to_vec();
    (der, key)
}

fn web() -> SpiffeId {
    SpiffeId::parse("spiffe://example.org/web").unwrap()
}

#[tokio::test]
async fn fresh_start_creates_and_publishes_keys() {
    let dir = tempfile::tempdir().unwrap();
    let h = Harness::new(dir.path());
    let ca = h.start(config(Duration::from_secs(24 * HOUR))).await;
    let bundle = ca.bundle();
    assert_eq!(bundle.sequence, 1, "one publication: first keys");
    assert_eq!(bundle.x509_authorities.len(), 1);
    assert_eq!(bundle.jwt_authorities.len(), 1);
    assert_eq!(
        h.store.fetch_bundle(&td()).await.unwrap().as_ref(),
        Some(&*bundle),
        "published durably"
    );
    let journal = ca.journal().await;
    assert_eq!(journal.x509[0].state, SlotState::Active);
    assert_eq!(journal.jwt[0].state, SlotState::Active);
}

/// Over four CA lifetimes, stepping ten minutes at a time: every CA key is
/// in the bundle a third of a lifetime before the first SVID it signs, and
/// every SVID verifies against the bundle of each later moment until it
/// expires.
#[tokio::test]
async fn rotation_over_several_lifetimes_keeps_every_svid_valid() {
    let dir = tempfile::tempdir().unwrap();
    let h = Harness::new(dir.path());
    let ca_ttl = Duration::from_secs(6 * HOUR);
    let ca = h.start(config(ca_ttl)).await;
    let start = h.clock.now();
    let step = Duration::from_secs(600);

    let mut first_in_bundle: HashMap<Vec<u8>, SystemTime> = HashMap::new();
    let mut first_signed: HashMap<Vec<u8>, SystemTime> = HashMap::new();
    let mut svids: Vec<(Vec<Vec<u8>>, SystemTime)> = Vec::new();
    let mut jwts: Vec<jwt::JwtSvid> = Vec::new();
    let mut last_sequence = 0;
    let mut activations = 0;

    for _ in 0..(4 * 6 * 6) {
        h.clock.advance(step);
        let now = h.clock.now();
        activations += ca.rotate().await.unwrap().activated;
        let bundle = ca.bundle();
        assert!(
            bundle.sequence >= last_sequence,
            "the sequence never goes back"
        );
        last_sequence = bundle.sequence;
        assert!(
            bundle.x509_authorities.len() <= 3,
            "old keys leave the bundle when they expire"
        );
        for der in &bundle.x509_authorities {
            first_in_bundle.entry(der.clone()).or_insert(now);
        }

        let (csr, _key) = csr();
        let issued = ca
            .issue_x509_svid(&web(), &[], Some(Duration::from_secs(HOUR)), &csr)
            .unwrap();
        let issuer = bundle
            .x509_authorities
            .iter()
            .find(|ca_der| {
                svid::verify_svid(&issued.chain, &bundle_with(&bundle, ca_der), now).is_ok()
            })
            .expect("the issuing CA is in the current bundle")
            .clone();
        first_signed.entry(issuer).or_insert(now);
        svids.push((issued.chain, issued.expires_at));
        jwts.push(ca.mint_jwt_svid(&web(), &["svc".into()], None).unwrap());

        for (chain, expiry) in &svids {
            if now < *expiry {
                svid::verify_svid(chain, &bundle, now)
                    .expect("an SVID validates until its own expiry");
            }
        }
        for t in &jwts {
            if now < t.expiry {
                jwt::validate(&t.token, &["svc"], &*bundle, now)
                    .expect("a JWT-SVID validates until its expiry");
            }
        }
    }

    assert!(
        activations >= 6,
        "x509 and jwt keys rotated at least three times each: {activations}"
    );
    for (ca_der, signed_at) in &first_signed {
        let published = first_in_bundle[ca_der];
        if published == first_in_bundle.values().min().copied().unwrap()
            && published <= start + step
        {
            continue; // the very first key signs as soon as it exists
        }
        let lead = signed_at.duration_since(published).unwrap();
        assert!(
            lead >= ca_ttl / 3 - step,
            "key published only {lead:?} before it signed"
        );
    }
}

fn bundle_with(b: &Bundle, ca_der: &[u8]) -> Bundle {
    let mut one = Bundle::new(b.trust_domain.clone());
    one.x509_authorities = vec![ca_der.to_vec()];
    one
}

#[tokio::test]
async fn svid_never_outlives_its_issuer_and_is_backdated() {
    let dir = tempfile::tempdir().unwrap();
    let h = Harness::new(dir.path());
    let ca = h.start(config(Duration::from_secs(2 * HOUR))).await;
    let (csr, _) = csr();
    let now = h.clock.now();
    let issued = ca
        .issue_x509_svid(&web(), &[], Some(Duration::from_secs(10 * HOUR)), &csr)
        .unwrap();
    let leaf = svid::parse(&issued.chain[0]).unwrap();
    let (nb, na) = svid::validity(&leaf);
    let bundle = ca.bundle();
    let ca_cert = svid::parse(&bundle.x509_authorities[0]).unwrap();
    assert_eq!(
        na,
        svid::validity(&ca_cert).1,
        "NotAfter = issuer NotAfter when TTL reaches past it"
    );
    assert_eq!(
        nb,
        from_unix_seconds(sigil_identity::clock::unix_seconds(now) - 10),
        "NotBefore backdated 10 s"
    );
    let short = ca
        .issue_x509_svid(&web(), &[], Some(Duration::from_secs(60)), &csr)
        .unwrap();
    assert_eq!(
        short.expires_at,
        from_unix_seconds(sigil_identity::clock::unix_seconds(now) + 60)
    );
    let default = ca.issue_x509_svid(&web(), &[], None, &csr).unwrap();
    assert_eq!(
        default.expires_at,
        from_unix_seconds(sigil_identity::clock::unix_seconds(now) + HOUR),
        "1 h default"
    );
}

#[tokio::test]
async fn restart_resumes_without_new_keys_or_sequence_regression() {
    let dir = tempfile::tempdir().unwrap();
    let h = Harness::new(dir.path());
    let cfg = config(Duration::from_secs(6 * HOUR));
    let (journal, bundle) = {
        let ca = h.start(cfg.clone()).await;
        h.clock.advance(Duration::from_secs(3 * HOUR + 60));
        let r = ca.rotate().await.unwrap();
        assert_eq!(
            r.prepared, 2,
            "x509 and jwt successors prepared at half-life"
        );
        (ca.journal().await, ca.bundle())
    };
    let ca = h.start(cfg).await;
    assert_eq!(
        ca.journal().await,
        journal,
        "a restart changes nothing that is not due"
    );
    assert_eq!(ca.bundle(), bundle, "same bundle, same sequence");
    h.clock.advance(Duration::from_secs(2 * HOUR));
    assert_eq!(
        ca.rotate().await.unwrap().activated,
        2,
        "activation resumes after the restart"
    );
    let (csr, _) = csr();
    let issued = ca.issue_x509_svid(&web(), &[], None, &csr).unwrap();
    svid::verify_svid(&issued.chain, &ca.bundle(), h.clock.now()).unwrap();
}

/// A crash after the journal recorded a prepared key but before the bundle
/// with it was published: the restart publishes it before anything else.
#[tokio::test]
async fn restart_after_unpublished_prepare_publishes_first() {
    let dir = tempfile::tempdir().unwrap();
    let h = Harness::new(dir.path());
    let cfg = config(Duration::from_secs(6 * HOUR));
    let sequence_before = {
        let ca = h.start(cfg.clone()).await;
        let mut journal = ca.journal().await;
        let key_id = KeyId::generate("x509");
        let key = h.keys.generate(&key_id, KeyAlgorithm::EcP256).unwrap();
        let now = h.clock.now();
        let a = X509Authority::create(&td(), &key, now, now + cfg.ca_ttl, None).unwrap();
        journal.x509.push(X509Slot {
            key_id,
            algorithm: KeyAlgorithm::EcP256,
            state: SlotState::Prepared,
            cert_der: a.cert_der().to_vec(),
            not_before: now,
            not_after: a.not_after(),
        });
        h.store
            .put_ca_journal(&cfg.server_id, journal.to_bytes().unwrap())
            .await
            .unwrap();
        ca.bundle().sequence
    };
    let ca = h.start(cfg).await;
    let bundle = ca.bundle();
    assert_eq!(
        bundle.x509_authorities.len(),
        2,
        "the prepared key is published on start"
    );
    assert_eq!(bundle.sequence, sequence_before + 1);
    assert_eq!(
        h.store.fetch_bundle(&td()).await.unwrap().unwrap().sequence,
        bundle.sequence
    );
}

#[tokio::test]
async fn lost_keys_are_replaced_and_old_certs_stay_until_expiry() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SledDatastore::open(dir.path()).unwrap());
    let clock = Arc::new(FakeClock::new(from_unix_seconds(1_800_000_000)));
    let cfg = config(Duration::from_secs(6 * HOUR));
    let first = {
        let keys: Arc<dyn KeyManager> = Arc::new(MemoryKeyManager::default());
        let ca = CaManager::start(cfg.clone(), store.clone(), keys, clock.clone(), None)
            .await
            .unwrap();
        ca.bundle()
    };
    // A memory key manager forgets its keys across a restart.
    let keys: Arc<dyn KeyManager> = Arc::new(MemoryKeyManager::default());
    let ca = CaManager::start(cfg, store.clone(), keys, clock.clone(), None)
        .await
        .unwrap();
    let bundle = ca.bundle();
    assert_eq!(
        bundle.x509_authorities.len(),
        2,
        "new key added, old one kept"
    );
    assert!(bundle.x509_authorities.contains(&first.x509_authorities[0]));
    assert!(bundle.sequence > first.sequence);
    let (csr, _) = csr();
    let issued = ca.issue_x509_svid(&web(), &[], None, &csr).unwrap();
    svid::verify_svid(&issued.chain, &bundle, clock.now()).unwrap();
    clock.advance(Duration::from_secs(7 * HOUR));
    ca.rotate().await.unwrap();
    assert!(
        !ca.bundle()
            .x509_authorities
            .contains(&first.x509_authorities[0]),
        "expired key pruned"
    );
}

/// A memory key manager restarted after half-life loses the prepared key
/// too; the server still starts, retires both lost keys and makes new ones.
#[tokio::test]
async fn restart_after_losing_a_prepared_key_still_starts() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SledDatastore::open(dir.path()).unwrap());
    let clock = Arc::new(FakeClock::new(from_unix_seconds(1_800_000_000)));
    let cfg = config(Duration::from_secs(6 * HOUR));
    {
        let keys: Arc<dyn KeyManager> = Arc::new(MemoryKeyManager::default());
        let ca = CaManager::start(cfg.clone(), store.clone(), keys, clock.clone(), None)
            .await
            .unwrap();
        clock.advance(Duration::from_secs(3 * HOUR + 60));
        assert_eq!(ca.rotate().await.unwrap().prepared, 2);
    }
    clock.advance(Duration::from_secs(2 * HOUR));
    let keys: Arc<dyn KeyManager> = Arc::new(MemoryKeyManager::default());
    let ca = CaManager::start(cfg, store, keys, clock.clone(), None)
        .await
        .unwrap();
    let journal = ca.journal().await;
    assert_eq!(
        journal
            .x509
            .iter()
            .filter(|s| s.state == SlotState::Active)
            .count(),
        1
    );
    let (csr, _) = csr();
    let issued = ca.issue_x509_svid(&web(), &[], None, &csr).unwrap();
    svid::verify_svid(&issued.chain, &ca.bundle(), clock.now()).unwrap();
    ca.mint_jwt_svid(&web(), &["a".into()], None).unwrap();
}

#[tokio::test]
async fn refuses_ids_of_other_trust_domains() {
    let dir = tempfile::tempdir().unwrap();
    let h = Harness::new(dir.path());
    let ca = h.start(config(Duration::from_secs(HOUR))).await;
    let (csr, _) = csr();
    let foreign = SpiffeId::parse("spiffe://other.org/web").unwrap();
    assert!(matches!(
        ca.issue_x509_svid(&foreign, &[], None, &csr),
        Err(CaError::ForeignId(..))
    ));
    assert!(matches!(
        ca.mint_jwt_svid(&foreign, &["a".into()], None),
        Err(CaError::ForeignId(..))
    ));
}

/// Two replicas on one datastore, each with its own keys and journal: the
/// shared bundle holds both replicas' authorities, an SVID of either
/// verifies against it, each follows the other's publications from the
/// change feed, and one replica's pruning leaves the other's authorities.
#[tokio::test]
async fn two_replicas_share_one_bundle_holding_both_replicas_authorities() {
    use crate::datastore::Datastore as _;
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SledDatastore::open(dir.path()).unwrap());
    let clock = Arc::new(FakeClock::new(from_unix_seconds(1_800_000_000)));
    let ca_ttl = Duration::from_secs(6 * HOUR);
    let replica = |name: &str| CaConfig {
        server_id: name.parse().unwrap(),
        ..config(ca_ttl)
    };
    let start = |cfg: CaConfig| {
        let keys: Arc<dyn KeyManager> = Arc::new(MemoryKeyManager::default());
        CaManager::start(cfg, store.clone(), keys, clock.clone(), None)
    };
    // A runs (its registry reading the feed for it); B starts later.
    let a = start(replica("replica-a")).await.unwrap();
    let registry = crate::registry::Registry::load(store.clone(), &td())
        .await
        .unwrap();
    registry.add_listener(a.clone());
    clock.advance(Duration::from_secs(HOUR));
    let b = start(replica("replica-b")).await.unwrap();
    registry.add_listener(b.clone());
    registry.catch_up().await.unwrap();

    let stored = store.fetch_bundle(&td()).await.unwrap().unwrap();
    assert_eq!(stored.x509_authorities.len(), 2, "{stored:?}");
    assert_eq!(stored.jwt_authorities.len(), 2);
    assert_eq!(*a.bundle(), stored, "A follows B's publication");
    assert_eq!(*b.bundle(), stored);
    let journals = store.list_ca_journals().await.unwrap();
    let ids: Vec<&str> = journals.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(ids, ["replica-a", "replica-b"]);

    let svid_of = |ca: &CaManager| {
        let (csr, _) = csr();
        ca.issue_x509_svid(&web(), &[], Some(Duration::from_secs(HOUR)), &csr)
            .unwrap()
    };
    let now = clock.now();
    for ca in [&a, &b] {
        let issued = svid_of(ca);
        svid::verify_svid(&issued.chain, &stored, now).expect("an SVID of either replica verifies");
        let token = ca.mint_jwt_svid(&web(), &["svc".into()], None).unwrap();
        jwt::validate(&token.token, &["svc"], &stored, now).expect("a JWT-SVID of either verifies");
    }

    // Only A rotates, until its first keys (made an hour before B's) have
    // expired and are pruned, while B's are still valid.
    let a_first = a.journal().await;
    let b_first = b.journal().await;
    let mut pruned = 0;
    for _ in 0..(5 * 6 + 2) {
        clock.advance(Duration::from_secs(600));
        pruned += a.rotate().await.unwrap().pruned;
    }
    assert_eq!(pruned, 2, "A's first X.509 and JWT keys expired");
    registry.catch_up().await.unwrap();
    let stored = store.fetch_bundle(&td()).await.unwrap().unwrap();
    assert!(!stored.x509_authorities.contains(&a_first.x509[0].cert_der));
    assert!(stored.jwt_authority(&a_first.jwt[0].kid).is_none());
    assert!(
        stored.x509_authorities.contains(&b_first.x509[0].cert_der),
        "B's authority stays"
    );
    assert!(stored.jwt_authority(&b_first.jwt[0].kid).is_some());
    assert_eq!(*b.bundle(), stored, "B follows A's pruning");
    let now = clock.now();
    for ca in [&a, &b] {
        svid::verify_svid(&svid_of(ca).chain, &stored, now).expect("both still verify");
    }
}

/// A server upgraded from the version without server ids keeps its CA:
/// the journal it stored is taken over under the new id, with the same
/// keys and bundle.
#[tokio::test]
async fn a_journal_stored_before_server_ids_is_taken_over() {
    use crate::datastore::Datastore as _;
    let dir = tempfile::tempdir().unwrap();
    let h = Harness::new(dir.path());
    let cfg = config(Duration::from_secs(6 * HOUR));
    let (journal, bundle) = {
        let ca = h.start(cfg.clone()).await;
        (ca.journal().await, ca.bundle())
    };
    h.store.make_ca_journal_legacy(&cfg.server_id);
    assert_eq!(h.store.list_ca_journals().await.unwrap(), vec![]);
    let upgraded = CaConfig {
        server_id: "sigil-server-0".parse().unwrap(),
        ..cfg
    };
    let ca = h.start(upgraded.clone()).await;
    assert_eq!(ca.journal().await, journal, "the same keys");
    assert_eq!(ca.bundle(), bundle, "the same bundle, no new sequence");
    let journals = h.store.list_ca_journals().await.unwrap();
    assert_eq!(journals.len(), 1);
    assert_eq!(journals[0].0, upgraded.server_id, "now under the new id");
    let other: crate::datastore::ServerId = "sigil-server-1".parse().unwrap();
    assert_eq!(
        h.store.fetch_ca_journal(&other).await.unwrap(),
        None,
        "no other replica can read it any more"
    );
    let (csr, _) = csr();
    let issued = ca.issue_x509_svid(&web(), &[], None, &csr).unwrap();
    svid::verify_svid(&issued.chain, &bundle, h.clock.now()).unwrap();
}

fn claims_of(token: &str) -> serde_json::Value {
    use base64::Engine as _;
    let part = token.split('.').nth(1).unwrap();
    serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(part)
            .unwrap(),
    )
    .unwrap()
}

#[tokio::test]
async fn jwt_issuer_is_the_iss_of_minted_svids_and_unset_means_none() {
    let dir = tempfile::tempdir().unwrap();
    let h = Harness::new(dir.path());
    let issuer = "https://oidc.example.org";
    let ca = h
        .start(CaConfig {
            jwt_issuer: Some(issuer.into()),
            ..config(Duration::from_secs(24 * HOUR))
        })
        .await;
    let t = ca.mint_jwt_svid(&web(), &["svc".into()], None).unwrap();
    assert_eq!(claims_of(&t.token)["iss"], issuer);
    let bundle = ca.bundle();
    jwt::validate(&t.token, &["svc"], &*bundle, h.clock.now()).unwrap();
    drop(ca);

    // The same keys after a restart without an issuer: no `iss`.
    let ca = h.start(config(Duration::from_secs(24 * HOUR))).await;
    let t = ca.mint_jwt_svid(&web(), &["svc".into()], None).unwrap();
    assert!(claims_of(&t.token).get("iss").is_none());
    jwt::validate(&t.token, &["svc"], &*ca.bundle(), h.clock.now()).unwrap();
}
