//! The agent's main loop: attest (or reuse the stored SVID), keep the Sync
//! stream open, issue and rotate SVIDs for its entries, renew its own SVID.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use sigil_attestors::join_token::JoinTokenAgent;
use sigil_attestors::k8s_psat::K8sPsatAgent;
use sigil_attestors::x509pop::X509PopAgent;
use sigil_identity::attestation::AgentNodeAttestor;
use sigil_identity::tls::{SharedBundle, SvidResolver};
use std::collections::HashMap;

use sigil_identity::{Bundle, EntryId, RegistrationEntry, rotation};
use sigil_proto::convert::{SyncEvent, SyncUpdate};
use sigil_proto::node as pb;
use tokio::sync::watch;
use tracing::{Instrument, error, info, info_span, warn};

use crate::cache::{Applied, Cache};
use crate::config::{AgentConfig, BootstrapTrust, NodeAttestor};
use crate::metrics::{AgentMetrics, Rotated};
use crate::node::{self, Bootstrap, Connection, NodeError};
use crate::servers::Servers;
use crate::store::{AgentState, Store, StoreError};
use crate::taint;

/// Most CSRs sent in one call.
const BATCH: usize = 500;

/// The first wait before the Sync stream is opened again after it was
/// lost (doubling, with jitter, while it cannot be opened).
const SYNC_BACKOFF: Duration = Duration::from_millis(200);

/// Longest sleep before the agent looks at its clock again while waiting
/// for a renewal.
const CLOCK_CHECK: Duration = Duration::from_secs(1);

/// Why the agent stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Node(#[from] NodeError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("trust bundle {0}: {1}")]
    Bundle(std::path::PathBuf, String),
    #[error(
        "the agent SVID has expired and the {0} attestor cannot attest again; give the agent a new join token"
    )]
    CannotReattest(&'static str),
    #[error("cannot serve telemetry on {0} ([telemetry] bind): {1}")]
    Telemetry(std::net::SocketAddr, std::io::Error),
}

fn attestor(config: &AgentConfig) -> Result<Box<dyn AgentNodeAttestor>, AgentError> {
    Ok(match &config.node_attestor {
        NodeAttestor::JoinToken(t) => Box::new(JoinTokenAgent::new(t.clone())),
        NodeAttestor::X509Pop(x) => {
            Box::new(X509PopAgent::from_pem_files(&x.certificate, &x.key).map_err(NodeError::from)?)
        }
        NodeAttestor::K8sPsat(k) => {
            Box::new(K8sPsatAgent::new(k.cluster.clone(), k.token_path.clone()))
        }
    })
}

fn bootstrap(config: &AgentConfig) -> Result<Bootstrap, AgentError> {
    match config.bootstrap_trust() {
        BootstrapTrust::Bundle(path) => {
            let text = std::fs::read_to_string(&path)
                .map_err(|e| AgentError::Bundle(path.clone(), e.to_string()))?;
            let certs = sigil_identity::pem::decode_all("CERTIFICATE", &text)
                .map_err(|e| AgentError::Bundle(path.clone(), e.to_string()))?;
            let mut b = Bundle::new(config.trust_domain.clone());
            b.x509_authorities = certs;
            Ok(Bootstrap::Bundle(b))
        }
        BootstrapTrust::Insecure => {
            warn!(
                "insecure_bootstrap: trusting the server this agent first reaches without verification"
            );
            Ok(Bootstrap::Insecure)
        }
    }
}

fn svid_expiry(state: &AgentState) -> Option<(SystemTime, SystemTime)> {
    let leaf = sigil_identity::x509::parse(state.chain.first()?).ok()?;
    Some(sigil_identity::x509::validity(&leaf))
}

/// The validity used to time the renewal of an agent SVID that has just
/// arrived: from now rather than the backdated NotBefore, so a short SVID
/// is not due on arrival.
fn fresh_validity(state: &AgentState, now: SystemTime) -> Option<(SystemTime, SystemTime)> {
    svid_expiry(state).map(|(nb, na)| (nb.max(now), na))
}

/// The agent's session with the server: its own SVID and key, the trust
/// bundle, the shared node API connection, and what it obtains over it (the
/// entries and X509-SVIDs in the [`Cache`], the JWT-SVIDs it caches). Its
/// loops keep the Sync stream open, issue and rotate SVIDs and renew its own.
#[derive(Debug, Clone)]
pub struct Session {
    config: AgentConfig,
    store: Store,
    cache: Arc<Cache>,
    resolver: Arc<SvidResolver>,
    bundle: Arc<SharedBundle>,
    /// The agent's own SVID validity, for renewal.
    validity: Arc<std::sync::Mutex<(SystemTime, SystemTime)>>,
    /// Moves when the agent SVID changes: connections must be reopened.
    reconnect: watch::Sender<u64>,
    /// The one node API connection every call shares, and the value of
    /// `reconnect` it was opened at (it presents the agent SVID of then).
    node: Arc<tokio::sync::Mutex<Option<(u64, Connection)>>>,
    /// The servers it may use, and which one it uses.
    servers: Arc<Servers>,
    /// JWT-SVIDs by (entry, audience).
    jwts: Arc<std::sync::Mutex<HashMap<JwtKey, CachedJwt>>>,
    /// Wakes the renewal of the agent's own SVID before its time (its
    /// authority was tainted).
    renew_now: Arc<tokio::sync::Notify>,
    metrics: Arc<AgentMetrics>,
}

/// JWT-SVIDs are cached per entry and (sorted) audience.
type JwtKey = (EntryId, u64, Vec<String>);

/// Most JWT-SVIDs cached at once.
const MAX_CACHED_JWTS: usize = 10_000;

/// A JWT-SVID held for reuse until half its lifetime has passed.
#[derive(Debug, Clone)]
struct CachedJwt {
    token: String,
    refresh_at: SystemTime,
    expires_at: SystemTime,
}

/// How long a workload waits for the server when a cached JWT-SVID could
/// still be served.
const JWT_UPSTREAM_WAIT: Duration = Duration::from_secs(1);

impl Session {
    /// Loads the stored state or attests, and prepares the agent.
    pub async fn start(config: AgentConfig) -> Result<Self, AgentError> {
        let store = Store::open(&config.data_dir)?;
        let metrics = Arc::new(AgentMetrics::default());
        let servers = Arc::new(Servers::new(
            config.server_address.clone(),
            config.resolver.clone(),
            metrics.clone(),
        ));
        let now = config.clock.now();
        let (state, fresh) = match store.load(&config.trust_domain)? {
            Some(s) if svid_expiry(&s).is_some_and(|(_, na)| na > now) => {
                info!("using the stored agent SVID; no attestation needed");
                (s, false)
            }
            stored => {
                let attestor = attestor(&config)?;
                if stored.is_some() && attestor.name() == sigil_attestors::join_token::NAME {
                    return Err(AgentError::CannotReattest(
                        sigil_attestors::join_token::NAME,
                    ));
                }
                let started = std::time::Instant::now();
                let s = node::attest(
                    &servers,
                    &config.trust_domain,
                    &bootstrap(&config)?,
                    attestor.as_ref(),
                )
                .await;
                let s = metrics.attested(started.elapsed(), s)?;
                store.save(&s)?;
                info!(attestor = attestor.name(), "node attested");
                (s, true)
            }
        };
        let validity = if fresh {
            fresh_validity(&state, now)
        } else {
            svid_expiry(&state)
        }
        .ok_or_else(|| NodeError::BadReply("agent SVID unreadable".into()))?;
        Ok(Self {
            resolver: Arc::new(SvidResolver::new(node::agent_key(&state)?)),
            bundle: Arc::new(SharedBundle::new(state.bundle.clone())),
            validity: Arc::new(std::sync::Mutex::new(validity)),
            cache: Arc::new(Cache::new(config.clock.clone())),
            reconnect: watch::channel(0).0,
            node: Arc::default(),
            servers,
            jwts: Arc::default(),
            renew_now: Arc::default(),
            metrics,
            config,
            store,
        })
    }

    /// The agent's metrics.
    pub fn metrics(&self) -> &AgentMetrics {
        &self.metrics
    }

    /// The address of the server the agent last connected to.
    pub fn server(&self) -> Option<std::net::SocketAddr> {
        self.servers.current()
    }

    /// When the agent's own SVID expires.
    pub fn svid_not_after(&self) -> SystemTime {
        self.validity.lock().unwrap_or_else(|p| p.into_inner()).1
    }

    /// The agent's own SPIFFE ID, read from its stored SVID (`None` while
    /// it holds none, e.g. after a revocation).
    pub fn id(&self) -> Option<sigil_identity::SpiffeId> {
        let state = self.store.load(&self.config.trust_domain).ok()??;
        let leaf = sigil_identity::x509::parse(state.chain.first()?).ok()?;
        sigil_identity::x509::check_leaf(&leaf).ok()
    }

    /// The SVID cache.
    pub fn cache(&self) -> Arc<Cache> {
        self.cache.clone()
    }

    /// The current time on the agent's clock (see [`AgentConfig::clock`]).
    pub fn now(&self) -> SystemTime {
        self.config.clock.now()
    }

    /// The cache key for `entry` and `audience`. The revision is part of
    /// it: after an entry change a token for the old entry is never served.
    fn jwt_key(entry: &RegistrationEntry, audience: &[String]) -> JwtKey {
        let mut aud = audience.to_vec();
        aud.sort();
        aud.dedup();
        (entry.id.clone(), entry.revision, aud)
    }

    /// Whether [`Session::jwt_svid`] would answer from the cache without
    /// asking the server.
    pub fn has_fresh_jwt(&self, entry: &RegistrationEntry, audience: &[String]) -> bool {
        let key = Self::jwt_key(entry, audience);
        self.jwts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .is_some_and(|c| self.now() < c.refresh_at)
    }

    /// A JWT-SVID for `entry` and `audience`: from the cache until half its
    /// life has passed, then from the server; if the server does not answer
    /// within a second, the cached token is served while it is valid.
    pub async fn jwt_svid(
        &self,
        entry: &RegistrationEntry,
        audience: &[String],
    ) -> Result<String, NodeError> {
        let key = Self::jwt_key(entry, audience);
        let now = self.now();
        let cached = self
            .jwts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .cloned()
            // A token whose key was tainted is never served again.
            .filter(|c| !self.bundle.get().is_jwt_tainted(&c.token));
        if let Some(c) = &cached
            && now < c.refresh_at
        {
            return Ok(c.token.clone());
        }
        let fetch = async {
            let req = pb::NewJwtSvidRequest {
                entry_id: entry.id.to_string(),
                audience: audience.to_vec(),
            };
            let generation = *self.reconnect.borrow();
            let mut conn = self.connect().await?;
            match conn.client.new_jwt_svid(req.clone()).await {
                Ok(r) => Ok(r.into_inner()),
                // The agent SVID was renewed while the call was under way,
                // and the server may have retired the one this connection
                // presents: once more, on the new connection.
                Err(_) if generation != *self.reconnect.borrow() => {
                    let mut conn = self.connect().await?;
                    Ok(conn.client.new_jwt_svid(req).await?.into_inner())
                }
                Err(s) => Err(NodeError::from(s)),
            }
        };
        let fresh = match &cached {
            Some(c) if now < c.expires_at => {
                match tokio::time::timeout(JWT_UPSTREAM_WAIT, fetch).await {
                    Ok(Ok(r)) => r,
                    _ => return Ok(c.token.clone()),
                }
            }
            _ => fetch.await?,
        };
        let expires_at =
            sigil_identity::clock::from_unix_seconds(u64::try_from(fresh.expires_at).unwrap_or(0));
        let refresh_at = now + expires_at.duration_since(now).unwrap_or(Duration::ZERO) / 2;
        let mut jwts = self.jwts.lock().unwrap_or_else(|p| p.into_inner());
        jwts.retain(|_, c| c.expires_at > now);
        if jwts.len() >= MAX_CACHED_JWTS {
            jwts.clear();
        }
        jwts.insert(
            key,
            CachedJwt {
                token: fresh.token.clone(),
                refresh_at,
                expires_at,
            },
        );
        Ok(fresh.token)
    }

    /// The shared node API connection: one TLS connection carries every
    /// call (HTTP/2 multiplexes them), opened again only after the agent
    /// SVID changed, because the server retires the old SVID's serial once
    /// the new one is used. Concurrent callers wait for one opening rather
    /// than each opening their own. When the server goes away, the
    /// connection itself reconnects, to the next server in
    /// `server_address` (see [`crate::servers`]), at its next call.
    async fn connect(&self) -> Result<Connection, NodeError> {
        let mut held = self.node.lock().await;
        let generation = *self.reconnect.borrow();
        if let Some((opened_at, conn)) = &*held
            && *opened_at == generation
        {
            return Ok(conn.clone());
        }
        let conn = Connection::open(
            &self.servers,
            &self.config.trust_domain,
            self.bundle.clone(),
            self.resolver.clone(),
        )
        .await?;
        *held = Some((generation, conn.clone()));
        Ok(conn)
    }

    /// Runs until `shutdown` resolves.
    ///
    /// When the server revokes the agent (ban, eviction, or a refused
    /// Sync), every identity is dropped at once so workloads get
    /// PermissionDenied, the stored SVID is deleted so a restart must
    /// attest again, and the agent keeps attesting again with backoff if its
    /// attestor allows (a banned agent is refused until an operator evicts
    /// it). A join-token agent cannot: it serves PermissionDenied until it
    /// is restarted with a new token.
    pub async fn run(
        self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), AgentError> {
        tokio::pin!(shutdown);
        loop {
            let (revoked_tx, mut revoked_rx) = watch::channel(None::<String>);
            let sync = tokio::spawn(
                self.clone()
                    .sync_loop(revoked_tx)
                    .instrument(info_span!("sync")),
            );
            let issue = tokio::spawn(self.clone().issue_loop().instrument(info_span!("issuance")));
            let renew = tokio::spawn(
                self.clone()
                    .renew_loop()
                    .instrument(info_span!("agent_renewal")),
            );
            let revoked = tokio::select! {
                () = &mut shutdown => None,
                why = async {
                    revoked_rx.wait_for(|r| r.is_some()).await.map(|r| r.clone().unwrap_or_default())
                } => Some(why),
            };
            // Wait for the loops to be gone, so none of them can store an
            // SVID or token after the identities are dropped.
            for task in [sync, issue, renew] {
                task.abort();
                let _ = task.await;
            }
            let why = match revoked {
                None => return Ok(()),
                Some(Ok(why)) => why,
                Some(Err(_)) => {
                    // The sync loop ended without a revocation: it failed.
                    error!("the sync loop stopped unexpectedly; restarting the agent's loops");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            self.forget_identities(&why);
            tokio::select! {
                () = &mut shutdown => return Ok(()),
                r = self.attest_again() => r?,
            }
        }
    }

    /// What to trust when attesting again: the last bundle the server
    /// sent plus the configured bootstrap bundle (the CA may have rotated
    /// while the agent was revoked and received nothing).
    fn reattestation_trust(&self) -> Result<Bootstrap, AgentError> {
        let mut bundle = (*self.bundle.get()).clone();
        if let Bootstrap::Bundle(configured) = bootstrap(&self.config)? {
            for ca in configured.x509_authorities {
                if !bundle.x509_authorities.contains(&ca) {
                    bundle.x509_authorities.push(ca);
                }
            }
        }
        Ok(Bootstrap::Bundle(bundle))
    }

    /// Drops every identity after a revocation.
    fn forget_identities(&self, why: &str) {
        error!(
            reason = %why,
            "the server revoked this agent; all workload identities dropped"
        );
        self.cache.revoke(why);
        self.jwts.lock().unwrap_or_else(|p| p.into_inner()).clear();
        if let Err(e) = self.store.forget_svid() {
            warn!(error = %e, "could not delete the revoked agent SVID");
        }
    }

    /// Attests again after a revocation, retrying with backoff while the
    /// server refuses. Never returns for a join-token agent.
    async fn attest_again(&self) -> Result<(), AgentError> {
        let attestor = attestor(&self.config)?;
        if attestor.name() == sigil_attestors::join_token::NAME {
            error!(
                "a join-token agent cannot attest again; restart it with a new join token \
                 (workloads get PermissionDenied until then)"
            );
            return std::future::pending().await;
        }
        let mut backoff = Duration::from_secs(1);
        loop {
            tokio::time::sleep(backoff.mul_f64(1.0 + 0.2 * sigil_identity::random::jitter_unit()))
                .await;
            let bootstrap = self.reattestation_trust()?;
            let started = std::time::Instant::now();
            let attested = node::attest(
                &self.servers,
                &self.config.trust_domain,
                &bootstrap,
                attestor.as_ref(),
            )
            .await;
            match self.metrics.attested(started.elapsed(), attested) {
                Ok(state) => {
                    self.store.save(&state)?;
                    self.resolver.set(node::agent_key(&state)?);
                    if let Some(v) = fresh_validity(&state, self.now()) {
                        *self.validity.lock().unwrap_or_else(|p| p.into_inner()) = v;
                    }
                    self.bundle.set(Arc::new(state.bundle.clone()));
                    self.cache.reinstate();
                    // The shared connection presents the revoked SVID.
                    self.reconnect.send_modify(|n| *n += 1);
                    info!(
                        attestor = attestor.name(),
                        "node attested again after revocation"
                    );
                    return Ok(());
                }
                Err(e) => {
                    warn!(error = %e, retry_in = ?backoff, "attesting again failed; retrying");
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    }

    /// Keeps one Sync stream open, reconnecting with jittered backoff.
    async fn sync_loop(self, revoked: watch::Sender<Option<String>>) {
        let mut backoff = SYNC_BACKOFF;
        let mut reconnect = self.reconnect.subscribe();
        loop {
            // Set once the stream delivers: a stream that worked and was
            // then lost starts a fresh, short backoff (another server may
            // be one step away), while one that never opens backs off
            // further each time.
            let delivered = std::sync::atomic::AtomicBool::new(false);
            let attempt = async {
                let mut conn = self.connect().await?;
                let mut stream = conn
                    .client
                    .sync(pb::SyncRequest {
                        since_revision: self.cache.revision(),
                    })
                    .await?
                    .into_inner();
                self.metrics.server_connected(true);
                loop {
                    let Some(msg) = stream.message().await? else {
                        return Ok::<_, NodeError>(());
                    };
                    delivered.store(true, std::sync::atomic::Ordering::Relaxed);
                    let crls = crate::crl::carried(&msg);
                    let update = match SyncUpdate::try_from(msg) {
                        Ok(update) => update,
                        Err(e) => {
                            // Something was not applied: start over from a
                            // full snapshot rather than build on a gap.
                            warn!(error = %e, "invalid sync message; resynchronising");
                            self.cache.reset_revision();
                            return Err(NodeError::BadReply(e.to_string()));
                        }
                    };
                    let bundle_changed = matches!(
                        update.event,
                        SyncEvent::Bundle(_) | SyncEvent::Snapshot { .. }
                    );
                    if let Applied::Revoked(why) = self.cache.apply(update) {
                        let _ = revoked.send(Some(why));
                        return Ok(());
                    }
                    if bundle_changed {
                        self.adopt_bundle();
                        self.replace_tainted();
                    }
                    if let Some(raw) = crls {
                        self.adopt_crls(&raw);
                    }
                }
            };
            tokio::select! {
                r = attempt => {
                    self.metrics.server_connected(false);
                    match r {
                        Ok(()) => backoff = SYNC_BACKOFF,
                        // The server revoked this agent (banned, or evicted).
                        // Other refusals (a superseded or expired SVID) are
                        // retried like any lost stream.
                        Err(NodeError::Refused(s))
                            if s.code() == tonic::Code::PermissionDenied
                                && s.metadata().contains_key(sigil_proto::REVOKED_METADATA) =>
                        {
                            let _ = revoked.send(Some(s.message().to_owned()));
                            return;
                        }
                        Err(e) => {
                            warn!(error = %e, retry_in = ?backoff, "sync stream lost; reconnecting");
                        }
                    }
                }
                _ = reconnect.changed() => {
                    self.metrics.server_connected(false);
                    backoff = Duration::from_millis(50);
                }
            }
            if revoked.borrow().is_some() {
                return;
            }
            if delivered.load(std::sync::atomic::Ordering::Relaxed) {
                backoff = backoff.min(SYNC_BACKOFF);
            }
            let jitter = 1.0 + 0.2 * sigil_identity::random::jitter_unit();
            tokio::time::sleep(backoff.mul_f64(jitter)).await;
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
    }

    /// Takes the CRLs the server sent with its bundle (see `crate::crl`);
    /// SVIDs held that they revoke are re-issued.
    fn adopt_crls(&self, raw: &[Vec<u8>]) {
        let (crls, rejected) = crate::crl::CrlSet::parse(raw);
        if rejected > 0 {
            warn!(
                rejected,
                "CRLs from the server that do not parse were dropped"
            );
        }
        let count = crls.crls.len();
        let reissue = self.cache.set_crls(crls);
        if reissue > 0 {
            info!(
                reissue,
                crls = count,
                "SVIDs held were revoked; re-issuing them"
            );
        }
    }

    /// Trusts the bundle the server sent and persists it.
    fn adopt_bundle(&self) {
        let Some(b) = self.cache.bundle() else { return };
        if *self.bundle.get() == *b {
            return;
        }
        self.bundle.set(b.clone());
        if let Ok(Some(mut state)) = self.store.load(&self.config.trust_domain) {
            state.bundle = (*b).clone();
            if let Err(e) = self.store.save(&state) {
                warn!(error = %e, "could not persist the new bundle");
            }
        }
    }

    /// Replaces what tainted authorities signed (see [`crate::taint`]):
    /// schedules the re-issue of affected X509-SVIDs, renews the agent's
    /// own SVID if affected, drops cached JWT-SVIDs of tainted kids.
    fn replace_tainted(&self) {
        let Some(b) = self.cache.bundle() else { return };
        if !b.has_taint() {
            return;
        }
        let svids = self.cache.svids();
        let tainted = taint::tainted_svids(svids.iter().map(|s| &**s), &b);
        if !tainted.is_empty() {
            info!(
                count = tainted.len(),
                "X509-SVIDs signed by a tainted authority; re-issuing them"
            );
            let plan = taint::batches(tainted, sigil_identity::random::jitter_unit().abs());
            let (cache, clock) = (self.cache.clone(), self.config.clock.clone());
            let metrics = self.metrics.clone();
            tokio::spawn(
                async move {
                    let started = tokio::time::Instant::now();
                    for (delay, ids) in plan {
                        tokio::time::sleep_until(started + delay).await;
                        let now = clock.now();
                        let due: Vec<_> = ids.into_iter().map(|id| (id, now)).collect();
                        // Counted once: an SVID already due does not move again.
                        metrics.tainted("x509", cache.renew_early(&due));
                    }
                }
                .instrument(info_span!("taint_reissue")),
            );
        }
        if let Ok(Some(state)) = self.store.load(&self.config.trust_domain)
            && b.chain_uses_tainted(&state.chain)
        {
            info!("the agent SVID was signed by a tainted authority; renewing it now");
            self.renew_now.notify_one();
            self.metrics.tainted("x509", 1);
        }
        let dropped = {
            let mut jwts = self.jwts.lock().unwrap_or_else(|p| p.into_inner());
            let before = jwts.len();
            jwts.retain(|_, c| !b.is_jwt_tainted(&c.token));
            before - jwts.len()
        };
        if dropped > 0 {
            info!(count = dropped, "cached JWT-SVIDs of a tainted key dropped");
            self.metrics.tainted("jwt", dropped);
        }
    }

    /// Issues SVIDs for entries that need them, in batches.
    async fn issue_loop(self) {
        let mut changes = self.cache.subscribe();
        loop {
            let due = self.cache.due(self.now());
            if !due.is_empty()
                && let Err(e) = self.issue(due).await
            {
                warn!(error = %e, "SVID issuance failed; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            tokio::select! {
                _ = changes.changed() => {}
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    async fn issue(
        &self,
        due: Vec<Arc<sigil_identity::RegistrationEntry>>,
    ) -> Result<(), NodeError> {
        let mut conn = self.connect().await?;
        for chunk in due.chunks(BATCH) {
            // A full batch of keys and CSRs takes tens of milliseconds: made
            // on the blocking pool, so the Workload API is not kept waiting.
            // (Storing stays here: an aborted loop must not store later.)
            let ids: Vec<_> = chunk.iter().map(|e| e.id.clone()).collect();
            let generated = tokio::task::spawn_blocking(move || {
                ids.into_iter()
                    .map(|id| node::key_and_csr().map(|(key, csr)| (id, key, csr)))
                    .collect::<Result<Vec<_>, _>>()
            })
            .await
            .map_err(|e| NodeError::Key(format!("key generation task failed: {e}")))??;
            let mut keys = std::collections::HashMap::new();
            let mut params = Vec::with_capacity(chunk.len());
            for (id, key, csr) in generated {
                params.push(pb::SvidParams {
                    entry_id: id.to_string(),
                    csr,
                });
                keys.insert(id, key);
            }
            let results = conn
                .client
                .batch_new_x509_svid(pb::BatchNewX509SvidRequest { params })
                .await?
                .into_inner()
                .results;
            let mut issued = Vec::with_capacity(chunk.len());
            for (entry, r) in chunk.iter().zip(results) {
                match (r.svid, keys.remove(&entry.id)) {
                    (Some(svid), Some(key)) if r.entry_id == entry.id.as_str() => {
                        issued.push((entry.clone(), key, svid.cert_chain));
                    }
                    _ => {
                        warn!(entry_id = %entry.id, code = r.code, message = %r.message, "SVID not issued")
                    }
                }
            }
            // One cache change per batch: every open stream rebuilds its
            // state on a change, so per-SVID changes cost streams × SVIDs.
            let ids: Vec<_> = issued.iter().map(|(e, _, _)| e.id.clone()).collect();
            let mut rotated = 0;
            for (id, stored) in ids.iter().zip(self.cache.store_all(issued)) {
                match stored {
                    Ok(()) => rotated += 1,
                    Err(e) => warn!(entry_id = %id, error = %e, "server sent an unreadable SVID"),
                }
            }
            self.metrics.rotated(Rotated::Workload, rotated);
        }
        Ok(())
    }

    /// Renews the agent SVID at half-life and makes connections switch.
    async fn renew_loop(self) {
        loop {
            let (nb, na) = *self.validity.lock().unwrap_or_else(|p| p.into_inner());
            let at = rotation::renewal_time(nb, na, sigil_identity::random::jitter_unit());
            // Waits in steps of at most CLOCK_CHECK, looking at the clock
            // after each: the agent's clock may be moved (a test's fake
            // clock, or the system's stepped) while it waits.
            tokio::time::sleep(Duration::from_millis(100)).await;
            while let Ok(wait) = at.duration_since(self.now())
                && !wait.is_zero()
            {
                tokio::select! {
                    () = tokio::time::sleep(wait.min(CLOCK_CHECK)) => {}
                    // Its authority was tainted: renew now.
                    () = self.renew_now.notified() => break,
                }
            }
            let mut backoff = Duration::from_secs(1);
            loop {
                match self.renew().await {
                    Ok(()) => {
                        self.metrics.rotated(Rotated::Agent, 1);
                        info!("agent SVID renewed");
                        break;
                    }
                    Err(e) => {
                        warn!(error = %e, retry_in = ?backoff, "agent SVID renewal failed; retrying");
                        tokio::time::sleep(
                            backoff.mul_f64(1.0 + 0.2 * sigil_identity::random::jitter_unit()),
                        )
                        .await;
                        backoff = (backoff * 2).min(Duration::from_secs(60));
                    }
                }
            }
        }
    }

    async fn renew(&self) -> Result<(), NodeError> {
        let mut conn = self.connect().await?;
        let (key, csr) = node::key_and_csr()?;
        let svid = conn
            .client
            .renew_agent(pb::RenewAgentRequest { csr })
            .await?
            .into_inner()
            .svid;
        let svid = svid.ok_or_else(|| NodeError::BadReply("no SVID".into()))?;
        let state = AgentState {
            key,
            chain: svid.cert_chain,
            bundle: (*self.bundle.get()).clone(),
        };
        self.store
            .save(&state)
            .map_err(|e| NodeError::Key(e.to_string()))?;
        self.resolver.set(node::agent_key(&state)?);
        if let Some(v) = fresh_validity(&state, self.now()) {
            *self.validity.lock().unwrap_or_else(|p| p.into_inner()) = v;
        }
        // The shared connection is opened again with the new SVID; its
        // first use makes the server retire the old serial.
        self.reconnect.send_modify(|n| *n += 1);
        Ok(())
    }
}
