//! Races inside the node API that black-box tests cannot time: a datastore
//! that pauses after a write lets another change land in between.

use std::net::SocketAddr;
use std::sync::Mutex;

use sigil_identity::clock::SystemClock;
use sigil_identity::{Bundle, TrustDomain};
use sigil_proto::node::node_server::Node;
use tokio::sync::oneshot;

use super::*;
use crate::audit::chain::AuditRecord;
use crate::ca::CaConfig;
use crate::ca::keys::MemoryKeyManager;
use crate::datastore::{
    AuditChainState, AuditEvent, AuditWith, BundleEdit, Change, Datastore, DatastoreError,
    EntryBatch, EntryFilter, JoinTokenRecord, ServerId, SledDatastore, TokenHash,
};

type Gate = (oneshot::Sender<()>, oneshot::Receiver<()>);

/// Sled, except that the next `update_agent` stops after its write (once
/// it is durable, before returning) until the test lets it go, and that
/// agent updates fail as `Unavailable` while `down` is set (a database
/// outage).
#[derive(Debug)]
struct PausingStore {
    inner: SledDatastore,
    gate: Mutex<Option<Gate>>,
    down: std::sync::atomic::AtomicBool,
}

impl PausingStore {
    /// Arms the pause: returns (written, go).
    fn pause_next_update(&self) -> (oneshot::Receiver<()>, oneshot::Sender<()>) {
        let (written_tx, written_rx) = oneshot::channel();
        let (go_tx, go_rx) = oneshot::channel();
        *self.gate.lock().unwrap() = Some((written_tx, go_rx));
        (written_rx, go_tx)
    }
}

type R<T> = crate::datastore::Result<T>;

#[async_trait]
impl Datastore for PausingStore {
    async fn update_agent_audited(&self, agent: AgentRecord, audit: AuditWith) -> R<AgentRecord> {
        if self.down.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(DatastoreError::Unavailable("connection refused".into()));
        }
        let result = self.inner.update_agent_audited(agent, audit).await;
        let gate = self.gate.lock().unwrap().take();
        if let Some((written, go)) = gate {
            let _ = written.send(());
            let _ = go.await;
        }
        result
    }
    async fn create_entries_audited(
        &self,
        e: Vec<(RegistrationEntry, AuditWith)>,
    ) -> R<Vec<R<RegistrationEntry>>> {
        self.inner.create_entries_audited(e).await
    }
    async fn update_entry_audited(
        &self,
        e: RegistrationEntry,
        a: AuditWith,
    ) -> R<RegistrationEntry> {
        self.inner.update_entry_audited(e, a).await
    }
    async fn delete_entry_audited(&self, id: &EntryId, a: AuditWith) -> R<RegistrationEntry> {
        self.inner.delete_entry_audited(id, a).await
    }
    async fn apply_entries(&self, b: EntryBatch) -> R<Vec<Change>> {
        self.inner.apply_entries(b).await
    }
    async fn fetch_entry(&self, id: &EntryId) -> R<Option<RegistrationEntry>> {
        self.inner.fetch_entry(id).await
    }
    async fn list_entries(&self, f: &EntryFilter) -> R<Vec<RegistrationEntry>> {
        self.inner.list_entries(f).await
    }
    async fn count_entries(&self) -> R<u64> {
        self.inner.count_entries().await
    }
    async fn changes(&self, after: u64, limit: usize) -> R<Vec<Change>> {
        self.inner.changes(after, limit).await
    }
    async fn change_floor(&self) -> R<u64> {
        self.inner.change_floor().await
    }
    fn change_hint(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.change_hint()
    }
    async fn current_revision(&self) -> R<u64> {
        self.inner.current_revision().await
    }
    async fn prune_changes(&self, through: u64) -> R<usize> {
        self.inner.prune_changes(through).await
    }
    async fn create_agent_audited(&self, a: AgentRecord, e: AuditWith) -> R<AgentRecord> {
        self.inner.create_agent_audited(a, e).await
    }
    async fn fetch_agent(&self, id: &AgentId) -> R<Option<AgentRecord>> {
        self.inner.fetch_agent(id).await
    }
    async fn list_agents(&self) -> R<Vec<AgentRecord>> {
        self.inner.list_agents().await
    }
    async fn delete_agent_audited(&self, id: &AgentId, a: AuditWith) -> R<AgentRecord> {
        self.inner.delete_agent_audited(id, a).await
    }
    async fn prune_agents(&self, before: SystemTime) -> R<Vec<AgentId>> {
        self.inner.prune_agents(before).await
    }
    async fn create_join_token_audited(&self, t: JoinTokenRecord, a: AuditWith) -> R<()> {
        self.inner.create_join_token_audited(t, a).await
    }
    async fn consume_join_token(&self, h: &TokenHash, now: SystemTime) -> R<JoinTokenRecord> {
        self.inner.consume_join_token(h, now).await
    }
    async fn prune_join_tokens(&self, now: SystemTime) -> R<usize> {
        self.inner.prune_join_tokens(now).await
    }
    async fn put_bundle(&self, b: &Bundle) -> R<()> {
        self.inner.put_bundle(b).await
    }
    async fn update_bundle(&self, td: &TrustDomain, edit: BundleEdit) -> R<Bundle> {
        self.inner.update_bundle(td, edit).await
    }
    async fn fetch_bundle(&self, td: &TrustDomain) -> R<Option<Bundle>> {
        self.inner.fetch_bundle(td).await
    }
    async fn list_bundles(&self) -> R<Vec<Bundle>> {
        self.inner.list_bundles().await
    }
    async fn delete_bundle(&self, td: &TrustDomain) -> R<()> {
        self.inner.delete_bundle(td).await
    }
    async fn fetch_ca_journal(&self, server: &ServerId) -> R<Option<Vec<u8>>> {
        self.inner.fetch_ca_journal(server).await
    }
    async fn put_ca_journal(&self, server: &ServerId, j: Vec<u8>) -> R<()> {
        self.inner.put_ca_journal(server, j).await
    }
    async fn list_ca_journals(&self) -> R<Vec<(ServerId, Vec<u8>)>> {
        self.inner.list_ca_journals().await
    }
    async fn record_issuances(&self, r: Vec<crate::datastore::IssuanceRecord>) -> R<()> {
        self.inner.record_issuances(r).await
    }
    async fn fetch_issuance(&self, serial: &str) -> R<Option<crate::datastore::IssuanceRecord>> {
        self.inner.fetch_issuance(serial).await
    }
    async fn list_issuances_of(&self, id: &SpiffeId) -> R<Vec<crate::datastore::IssuanceRecord>> {
        self.inner.list_issuances_of(id).await
    }
    async fn revoke_x509(&self, r: Vec<crate::datastore::RevocationRecord>) -> R<u64> {
        self.inner.revoke_x509(r).await
    }
    async fn list_revocations(&self) -> R<Vec<crate::datastore::RevocationRecord>> {
        self.inner.list_revocations().await
    }
    async fn put_crl(&self, crl: crate::datastore::CrlRecord) -> R<()> {
        self.inner.put_crl(crl).await
    }
    async fn list_crls(&self) -> R<Vec<crate::datastore::CrlRecord>> {
        self.inner.list_crls().await
    }
    async fn prune_revocations(&self, now: std::time::SystemTime) -> R<usize> {
        self.inner.prune_revocations(now).await
    }
    async fn append_audit(&self, e: Vec<AuditEvent>) -> R<u64> {
        self.inner.append_audit(e).await
    }
    async fn append_audit_unsynced(&self, e: Vec<AuditEvent>) -> R<u64> {
        self.inner.append_audit_unsynced(e).await
    }
    async fn sync(&self) -> R<()> {
        self.inner.sync().await
    }
    async fn list_audit(&self, after: u64, limit: usize) -> R<Vec<(u64, AuditEvent)>> {
        self.inner.list_audit(after, limit).await
    }
    async fn prune_audit(&self, before: SystemTime) -> R<usize> {
        self.inner.prune_audit(before).await
    }
    async fn audit_records(&self, after: u64, limit: usize) -> R<Vec<AuditRecord>> {
        self.inner.audit_records(after, limit).await
    }
    async fn audit_chain(&self) -> R<AuditChainState> {
        self.inner.audit_chain().await
    }
    async fn put_audit_checkpoint(&self, size: u64, note: String) -> R<()> {
        self.inner.put_audit_checkpoint(size, note).await
    }
    async fn audit_checkpoints(&self) -> R<Vec<(u64, String)>> {
        self.inner.audit_checkpoints().await
    }
    async fn latest_audit_checkpoint(&self) -> R<Option<(u64, String)>> {
        self.inner.latest_audit_checkpoint().await
    }
}

fn td() -> TrustDomain {
    TrustDomain::new("example.org").unwrap()
}

fn csr() -> Vec<u8> {
    let key = rcgen::KeyPair::generate().unwrap();
    rcgen::CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .der()
        .to_vec()
}

async fn service(store: Arc<PausingStore>) -> Arc<NodeService> {
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let dyn_store: Arc<dyn Datastore> = store;
    let ca = CaManager::start(
        CaConfig::new(td()),
        dyn_store.clone(),
        Arc::new(MemoryKeyManager::default()),
        clock.clone(),
        None,
    )
    .await
    .unwrap();
    let registry = Registry::load(dyn_store.clone(), &td()).await.unwrap();
    let (_stop, shutdown) = tokio::sync::watch::channel(false);
    let audit = Audit::new(dyn_store.clone(), clock.clone());
    let revocations = crate::revocation::Revocations::start(
        dyn_store.clone(),
        ca.clone(),
        audit.clone(),
        crate::revocation::CrlPolicy::default(),
    )
    .await;
    Arc::new(NodeService {
        revocations,
        ca,
        agents: Arc::new(AgentService::new(
            dyn_store.clone(),
            registry.clone(),
            audit.clone(),
            clock.clone(),
        )),
        registry,
        attestors: HashMap::new(),
        audit,
        clock,
        agent_svid_ttl: Duration::from_secs(3600),
        attest_limit: RateLimiter::new(100.0, 100.0),
        sign_limit: RateLimiter::new(100.0, 100.0),
        shutdown,
        wire_bundle: std::sync::Mutex::default(),
        metrics: Arc::default(),
        federated: Arc::new(crate::federation::FederatedSet::new([])),
    })
}

/// A request as it arrives from the agent `id` presenting `peer`.
fn from_agent<T>(msg: T, peer: &PeerSvid) -> Request<T> {
    let mut req = Request::new(msg);
    req.extensions_mut().insert(NodeConnInfo {
        remote: SocketAddr::from(([127, 0, 0, 1], 4000)),
        peer: Arc::new(peer.clone()),
    });
    req
}

#[tokio::test]
async fn an_eviction_during_a_renewal_is_not_undone() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(PausingStore {
        inner: SledDatastore::open(dir.path().join("data")).unwrap(),
        gate: Mutex::new(None),
        down: Default::default(),
    });
    let svc = service(store.clone()).await;
    let id = AgentId::from_segments(&td(), &["join_token", "a1"]).unwrap();
    let not_after = SystemTime::now() + Duration::from_secs(3600);
    store
        .create_agent(AgentRecord {
            id: id.clone(),
            attestor: "join_token".into(),
            serial: "01".into(),
            cert_sha256: "ab".repeat(32),
            pending_cert_sha256: None,
            expires_at: not_after,
            selectors: Default::default(),
            banned: false,
            can_reattest: false,
            created_at: SystemTime::now(),
        })
        .await
        .unwrap();
    svc.registry.catch_up().await.unwrap();
    let peer = PeerSvid::Svid {
        id: id.clone().into(),
        serial: "01".into(),
        cert_sha256: "ab".repeat(32),
        not_after,
    };

    // The renewal writes the store, then stops; the operator evicts the
    // agent (the admin API's path); then the renewal finishes.
    let (written, go) = store.pause_next_update();
    let api = NodeApi(svc.clone());
    let req = from_agent(pb::RenewAgentRequest { csr: csr() }, &peer);
    let renewal = tokio::spawn(async move { api.renew_agent(req).await });
    written.await.unwrap();
    store.delete_agent(&id).await.unwrap();
    svc.registry.catch_up().await.unwrap();
    go.send(()).unwrap();
    let outcome = renewal.await.unwrap();

    assert!(
        svc.registry.agent(&id).is_none(),
        "the evicted agent is back in the registry"
    );
    let Err(err) = outcome else {
        panic!("a renewal of an evicted agent succeeded");
    };
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    let Err(later) = NodeApi(svc.clone())
        .fetch_bundle(from_agent(pb::FetchBundleRequest {}, &peer))
        .await
    else {
        panic!("the evicted agent was served");
    };
    assert_eq!(later.code(), tonic::Code::PermissionDenied, "{later:?}");
}

#[tokio::test]
async fn a_renewed_agent_svid_is_served_while_the_datastore_is_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(PausingStore {
        inner: SledDatastore::open(dir.path().join("data")).unwrap(),
        gate: Mutex::new(None),
        down: Default::default(),
    });
    let svc = service(store.clone()).await;
    let id = AgentId::from_segments(&td(), &["join_token", "a2"]).unwrap();
    let not_after = SystemTime::now() + Duration::from_secs(3600);
    let (old, new) = ("ab".repeat(32), "cd".repeat(32));
    // Renewed just before the outage: the new SVID is the pending pin.
    store
        .create_agent(AgentRecord {
            id: id.clone(),
            attestor: "join_token".into(),
            serial: "01".into(),
            cert_sha256: old,
            pending_cert_sha256: Some(new.clone()),
            expires_at: not_after,
            selectors: Default::default(),
            banned: false,
            can_reattest: false,
            created_at: SystemTime::now(),
        })
        .await
        .unwrap();
    svc.registry.catch_up().await.unwrap();
    let renewed = PeerSvid::Svid {
        id: id.clone().into(),
        serial: "02".into(),
        cert_sha256: new.clone(),
        not_after,
    };

    store.down.store(true, std::sync::atomic::Ordering::SeqCst);
    NodeApi(svc.clone())
        .fetch_bundle(from_agent(pb::FetchBundleRequest {}, &renewed))
        .await
        .expect("the renewed SVID is served from the pending pin during the outage");
    let stored = store.fetch_agent(&id).await.unwrap().unwrap();
    assert_eq!(stored.pending_cert_sha256.as_deref(), Some(new.as_str()));

    // Back: the next call makes it the pin.
    store.down.store(false, std::sync::atomic::Ordering::SeqCst);
    NodeApi(svc.clone())
        .fetch_bundle(from_agent(pb::FetchBundleRequest {}, &renewed))
        .await
        .unwrap();
    let stored = store.fetch_agent(&id).await.unwrap().unwrap();
    assert_eq!(stored.cert_sha256, new);
    assert_eq!(stored.pending_cert_sha256, None);
}
