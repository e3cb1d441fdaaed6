//! The SPIFFE Workload API on a Unix socket.
//!
//! Every call must carry the `workload.spiffe.io: true` metadata. The caller
//! is identified by the kernel (SO_PEERCRED) and attested by the `unix`
//! workload attestor plus any configured ones (`k8s`), whose selectors are
//! merged; it receives the SVIDs of every entry whose selectors
//! are all among its own. Streams send full state at once and again on
//! every change; each stream has its own task, so a slow reader only delays
//! itself and, when it catches up, gets the latest state.
//!
//! Limits protect the agent from one process or connection, not from a busy
//! node (many containers often share one uid): connections are counted per
//! uid and in total, streams per uid and per connection, unary calls are
//! rate-limited per uid, and a frame larger than the server advertises is
//! refused before it is buffered. Attestation reads `/proc` and hashes
//! executables on a bounded pool of blocking threads, shared fairly between
//! uids, so a hung file system stalls only the callers it concerns; the
//! accept loop does no file system work and backs off when `accept` fails
//! (out of file descriptors) instead of spinning.

use std::collections::HashMap;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use sigil_attestors::unix::UnixAttestor;
use sigil_attestors::workload::WorkloadAttestor;
use sigil_identity::rate_limit::RateLimiter;
use sigil_identity::{Bundle, RegistrationEntry, SelectorSet, SpiffeId, jwt};
use sigil_proto::workload::spiffe_workload_api_server::{
    SpiffeWorkloadApi, SpiffeWorkloadApiServer,
};
use sigil_proto::workload::*;
use tokio::net::UnixListener;
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Response, Status};
use tracing::{Instrument, debug, warn};

use crate::authority::AuthorityFix;
use crate::cache::CachedSvid;
use crate::config::{
    DEFAULT_JWT_FETCHES_PER_UID_PER_SECOND, DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_CONNECTIONS_PER_UID, DEFAULT_MAX_STREAMS_PER_UID,
    DEFAULT_UNARY_CALLS_PER_UID_PER_SECOND,
};
use crate::manager::Agent;

/// Largest request accepted (a JWT to validate is the largest field).
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// Most streams open at once on one connection (an HTTP/2 setting): one
/// connection cannot take a whole uid's share.
const MAX_STREAMS_PER_CONNECTION: u32 = 256;
/// Threads that may read `/proc` and hash executables at once, and how many
/// of them one uid may hold (its callers queue behind those).
const ATTESTATION_THREADS: usize = 64;
const ATTESTATION_THREADS_PER_UID: usize = 16;
/// Wait after a failed `accept`, doubling up to the maximum while it fails.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// How many seconds' worth of JWT-SVID fetches one uid may make at once
/// (a workload starting with many audiences).
const JWT_FETCH_BURST_SECONDS: f64 = 10.0;
/// How long attestation of a caller may take.
const ATTESTATION_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a new workload waits for SVIDs of entries that match it but are
/// still being issued.
const ISSUANCE_WAIT: Duration = Duration::from_secs(10);

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

pub use sigil_proto::socket::SocketError;

/// Binds the Workload API socket: the directory is created 0755 (workloads
/// may enter, not write), a stale socket is replaced, a symlink refused;
/// the socket itself is 0777 so any local workload can connect.
pub fn bind(path: &Path) -> Result<UnixListener, SocketError> {
    sigil_proto::socket::bind_unix(path, 0o755, 0o777)
}

/// The Workload API service.
#[derive(Debug, Clone)]
pub struct WorkloadApi {
    agent: Agent,
    attestor: Arc<UnixAttestor>,
    /// Attestors run after `unix`; their selectors are added to its.
    others: Vec<Arc<dyn WorkloadAttestor>>,
    streams: Arc<Mutex<Counts>>,
    max_streams_per_uid: usize,
    /// JWT-SVID fetches from the server, per uid: one user cannot make the
    /// agent (and the server's signer) mint without end.
    jwt_fetches: Arc<RateLimiter<u32>>,
    connections: Arc<Mutex<Counts>>,
    max_connections: usize,
    max_connections_per_uid: usize,
    unary: Arc<RateLimiter<u32>>,
    pool: Arc<AttestationPool>,
    /// At most one warning a second per uid about refused connections.
    refusal_log: Arc<RateLimiter<u32>>,
}

fn jwt_fetch_limiter(per_second: f64) -> RateLimiter<u32> {
    RateLimiter::new(per_second, per_second * JWT_FETCH_BURST_SECONDS)
}

/// Open streams or connections, per uid and in all.
#[derive(Debug, Default)]
struct Counts {
    per_uid: HashMap<u32, usize>,
    total: usize,
}

/// One open stream or connection counted against its uid; released on drop.
#[derive(Debug)]
struct Slot {
    counts: Arc<Mutex<Counts>>,
    uid: u32,
}

impl Slot {
    /// Counts one more for `uid`, unless that would pass `per_uid` for it
    /// or `total` in all.
    fn take(counts: &Arc<Mutex<Counts>>, uid: u32, per_uid: usize, total: usize) -> Option<Self> {
        let mut c = counts.lock().unwrap_or_else(|p| p.into_inner());
        let n = c.per_uid.get(&uid).copied().unwrap_or(0);
        if n >= per_uid || c.total >= total {
            return None;
        }
        c.per_uid.insert(uid, n + 1);
        c.total += 1;
        Some(Self {
            counts: counts.clone(),
            uid,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.per_uid.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                c.per_uid.remove(&self.uid);
            }
        }
    }
}

/// Runs attestation's file system work (`/proc`, `stat`, hashing) off the
/// runtime, on at most [`ATTESTATION_THREADS`] blocking threads, of which
/// one uid holds at most [`ATTESTATION_THREADS_PER_UID`]. A thread stuck on
/// a hung file system keeps its permits, so the stuck work stays bounded
/// and callers of other uids still find threads.
#[derive(Debug)]
struct AttestationPool {
    all: Arc<Semaphore>,
    per_uid: Mutex<HashMap<u32, Arc<Semaphore>>>,
}

impl AttestationPool {
    fn new() -> Self {
        Self {
            all: Arc::new(Semaphore::new(ATTESTATION_THREADS)),
            per_uid: Mutex::default(),
        }
    }

    /// Runs `f` for a caller of `uid` once a thread is free for it; `None`
    /// if `f` panicked.
    async fn run<T: Send + 'static>(
        &self,
        uid: u32,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Option<T> {
        let mine = self
            .per_uid
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(uid)
            .or_insert_with(|| Arc::new(Semaphore::new(ATTESTATION_THREADS_PER_UID)))
            .clone();
        // Neither semaphore is ever closed, so acquiring fails never.
        let uid_permit = mine.clone().acquire_owned().await.ok()?;
        let permit = self.all.clone().acquire_owned().await.ok()?;
        // The permits go with the work: released when it ends, even if the
        // caller stopped waiting.
        let out = tokio::task::spawn_blocking(move || {
            let _held = (uid_permit, permit);
            f()
        })
        .await
        .ok();
        drop(mine);
        // Forget an idle uid's semaphore (only the map still holds it).
        let mut map = self.per_uid.lock().unwrap_or_else(|p| p.into_inner());
        if map.get(&uid).is_some_and(|s| Arc::strong_count(s) == 1) {
            map.remove(&uid);
        }
        out
    }
}

/// What the server knows of a Workload API connection: the kernel's peer
/// credentials, and the connecting process as it was when it connected.
#[derive(Debug, Clone)]
pub struct WorkloadConnInfo {
    pub uds: UdsConnectInfo,
    pub origin: Option<sigil_attestors::unix::ProcessIdentity>,
}

/// A Workload API connection: the `:authority` fix around the socket, plus
/// [`WorkloadConnInfo`], counted against its uid while open.
#[derive(Debug)]
pub struct WorkloadConn {
    inner: AuthorityFix<tokio::net::UnixStream>,
    info: WorkloadConnInfo,
    _slot: Slot,
}

impl WorkloadConn {
    /// Takes the identity of the connecting process (on the attestation
    /// pool, not in the accept loop). `None` when that took too long: the
    /// connection is closed rather than served with no identity for good,
    /// so a client that keeps its connection reconnects and is looked at
    /// again.
    async fn accept(stream: tokio::net::UnixStream, slot: Slot, api: &WorkloadApi) -> Option<Self> {
        use tonic::transport::server::Connected;
        let uds = stream.connect_info();
        let pidfd = crate::peer_pidfd::peer_pidfd(&stream);
        let origin = match uds.peer_cred.and_then(|c| c.pid()) {
            Some(pid) => {
                let attestor = api.attestor.clone();
                let work = api
                    .pool
                    .run(slot.uid, move || connecting_process(&attestor, pid, pidfd));
                match tokio::time::timeout(ATTESTATION_TIMEOUT, work).await {
                    Ok(origin) => origin.flatten(),
                    Err(_) => {
                        warn!(
                            uid = slot.uid,
                            pid, "looking at a connecting process took too long; connection closed"
                        );
                        return None;
                    }
                }
            }
            None => None,
        };
        Some(Self {
            inner: AuthorityFix::new(stream),
            info: WorkloadConnInfo { uds, origin },
            _slot: slot,
        })
    }
}

/// The identity of the process that connected as `pid` (SO_PEERCRED),
/// `None` if it is gone. With a pidfd for it (SO_PEERPIDFD), the process
/// must not have been reaped by the time `/proc/<pid>` was read, so the pid
/// was not reused meanwhile; without (kernels before 6.5), whatever runs
/// as `pid` now is taken to be it.
fn connecting_process(
    attestor: &UnixAttestor,
    pid: i32,
    pidfd: std::io::Result<std::os::fd::OwnedFd>,
) -> Option<sigil_attestors::unix::ProcessIdentity> {
    match pidfd {
        Ok(pidfd) => {
            let identity = attestor.identity(pid).ok()?;
            let still = crate::peer_pidfd::pid_of(&pidfd).ok()?;
            (still == Some(pid)).then_some(identity)
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOPROTOOPT) => {
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| {
                warn!(
                    "the kernel lacks SO_PEERPIDFD (Linux 6.5): a caller's pid could be reused \
                     between connect and accept"
                )
            });
            attestor.identity(pid).ok()
        }
        Err(e) => {
            debug!(pid, error = %e, "no pidfd for the connecting process");
            None
        }
    }
}

impl tonic::transport::server::Connected for WorkloadConn {
    type ConnectInfo = WorkloadConnInfo;
    fn connect_info(&self) -> WorkloadConnInfo {
        self.info.clone()
    }
}

impl tokio::io::AsyncRead for WorkloadConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for WorkloadConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_flush(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// An attested caller.
struct Caller {
    uid: u32,
    selectors: SelectorSet,
    pid: i32,
    origin: sigil_attestors::unix::ProcessIdentity,
}

/// The process a stream's updates go to, attested again before each.
#[derive(Debug, Clone)]
struct Recheck {
    uid: u32,
    pid: i32,
    origin: sigil_attestors::unix::ProcessIdentity,
}

/// The kernel's credentials of the caller's connection.
fn peer_cred<T>(req: &Request<T>) -> Result<tokio::net::unix::UCred, Status> {
    req.extensions()
        .get::<WorkloadConnInfo>()
        .and_then(|c| c.uds.peer_cred)
        .ok_or_else(|| Status::unauthenticated("caller credentials unavailable"))
}

/// Checks the `workload.spiffe.io` metadata: exactly one value, `true`.
fn check_header<T>(req: &Request<T>) -> Result<(), Status> {
    let values: Vec<_> = req
        .metadata()
        .get_all("workload.spiffe.io")
        .iter()
        .collect();
    match values.as_slice() {
        [v] if v.as_bytes() == b"true" => Ok(()),
        _ => Err(Status::invalid_argument(
            "security header missing: set metadata workload.spiffe.io: true",
        )),
    }
}

fn svid_message(s: &CachedSvid, bundle: &Bundle) -> X509svid {
    X509svid {
        spiffe_id: s.entry.spiffe_id.to_string(),
        x509_svid: s.chain.concat(),
        x509_svid_key: s.key.to_vec(),
        bundle: bundle.x509_authorities.concat(),
        hint: s.entry.hint.clone(),
    }
}

impl WorkloadApi {
    /// Open connections and streams, for metrics.
    pub fn open_counts(&self) -> (usize, usize) {
        let total = |c: &Mutex<Counts>| c.lock().unwrap_or_else(|p| p.into_inner()).total;
        (total(&self.connections), total(&self.streams))
    }

    /// Serves identities from `agent`, attesting callers with `attestor`,
    /// with the default per-uid stream limit.
    pub fn new(agent: Agent, attestor: Arc<UnixAttestor>) -> Self {
        Self {
            agent,
            attestor,
            others: Vec::new(),
            streams: Arc::default(),
            max_streams_per_uid: DEFAULT_MAX_STREAMS_PER_UID,
            jwt_fetches: Arc::new(jwt_fetch_limiter(DEFAULT_JWT_FETCHES_PER_UID_PER_SECOND)),
            connections: Arc::default(),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_uid: DEFAULT_MAX_CONNECTIONS_PER_UID,
            unary: Arc::new(Self::unary_limiter(DEFAULT_UNARY_CALLS_PER_UID_PER_SECOND)),
            pool: Arc::new(AttestationPool::new()),
            refusal_log: Arc::new(RateLimiter::new(1.0, 1.0)),
        }
    }

    /// `rate` calls a second, the same in a burst.
    fn unary_limiter(rate: u32) -> RateLimiter<u32> {
        let rate = f64::from(rate.max(1));
        RateLimiter::new(rate, rate)
    }

    /// Also runs `attestors` on every caller and adds their selectors. One
    /// that fails or times out contributes nothing (logged); it never
    /// adds selectors to the wrong process, because the caller is checked
    /// to be the one that connected after they ran.
    pub fn with_workload_attestors(mut self, attestors: Vec<Arc<dyn WorkloadAttestor>>) -> Self {
        self.others = attestors;
        self
    }

    /// Sets the most streams one uid may hold open at once (at least 1).
    pub fn with_max_streams_per_uid(mut self, limit: usize) -> Self {
        self.max_streams_per_uid = limit.max(1);
        self
    }

    /// Sets how many JWT-SVIDs one uid may have the agent fetch from the
    /// server per second (cache hits are free).
    pub fn with_jwt_fetches_per_uid(mut self, per_second: f64) -> Self {
        self.jwt_fetches = Arc::new(jwt_fetch_limiter(per_second));
        self
    }

    /// Sets the most connections open at once, in all and for one uid
    /// (each at least 1).
    pub fn with_max_connections(mut self, total: usize, per_uid: usize) -> Self {
        self.max_connections = total.max(1);
        self.max_connections_per_uid = per_uid.max(1);
        self
    }

    /// Sets how many unary calls one uid may make a second (and in a burst).
    pub fn with_unary_calls_per_uid_per_second(mut self, rate: u32) -> Self {
        self.unary = Arc::new(Self::unary_limiter(rate));
        self
    }

    /// Counts a new stream for `uid`, refusing it past the limit.
    fn open_stream(&self, uid: u32) -> Result<Slot, Status> {
        Slot::take(&self.streams, uid, self.max_streams_per_uid, usize::MAX).ok_or_else(|| {
            Status::resource_exhausted(format!(
                "this user already holds {} Workload API streams; close some first",
                self.max_streams_per_uid
            ))
        })
    }

    /// Counts a new connection for `uid`; `None` past a limit.
    fn admit_connection(&self, uid: u32) -> Option<Slot> {
        let slot = Slot::take(
            &self.connections,
            uid,
            self.max_connections_per_uid,
            self.max_connections,
        );
        if slot.is_none() && self.refusal_log.try_take(&uid, 1.0, Instant::now()) {
            warn!(
                uid,
                max_connections = self.max_connections,
                max_connections_per_uid = self.max_connections_per_uid,
                "Workload API connection refused: too many open (see max_connections)"
            );
        }
        slot
    }

    /// Refuses a unary call past the caller's uid's rate.
    fn unary_allowed<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let uid = peer_cred(req)?.uid();
        if self.unary.try_take(&uid, 1.0, Instant::now()) {
            Ok(())
        } else {
            Err(Status::resource_exhausted(
                "this user makes too many Workload API calls; retry later",
            ))
        }
    }

    /// Runs `f` on the attestation pool for a caller of `uid`, within the
    /// attestation timeout.
    async fn on_pool<T: Send + 'static>(
        &self,
        uid: u32,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, Status> {
        tokio::time::timeout(ATTESTATION_TIMEOUT, self.pool.run(uid, f))
            .await
            .map_err(|_| Status::unavailable("workload attestation timed out; retry"))?
            .ok_or_else(|| Status::internal("workload attestation failed"))
    }

    /// Attests the process a stream's update goes to again: still the one
    /// that opened the stream.
    async fn recheck(&self, r: &Recheck) -> Result<(), Status> {
        let (attestor, pid, origin) = (self.attestor.clone(), r.pid, r.origin.clone());
        self.on_pool(r.uid, move || attestor.attest_as(pid, Some(&origin)))
            .await?
            .map(|_| ())
            .map_err(|_| Status::unauthenticated("the calling process changed or is gone"))
    }

    /// Checks the header and attests the caller.
    async fn caller<T>(&self, req: &Request<T>) -> Result<Caller, Status> {
        check_header(req)?;
        let cred = peer_cred(req)?;
        let conn = req.extensions().get::<WorkloadConnInfo>().cloned();
        let pid = cred
            .pid()
            .ok_or_else(|| Status::unauthenticated("caller credentials unavailable"))?;
        // The process must still be the one that connected: not gone, not
        // a reused pid, not another program after an exec.
        let origin = conn.and_then(|c| c.origin).ok_or_else(|| {
            Status::unauthenticated("the calling process is gone or could not be inspected")
        })?;
        let origin_for_later = origin.clone();
        let attestor = self.attestor.clone();
        let attested = self
            .on_pool(cred.uid(), move || attestor.attest_as(pid, Some(&origin)))
            .await?;
        let mut selectors = attested.map_err(|e| {
            debug!(pid, error = %e, "workload attestation failed");
            Status::unauthenticated("the calling process could not be attested")
        })?;
        // The kernel recorded the uid at connect(); a process that became
        // someone else since (a setuid exec) is not that caller.
        let uid_selector = sigil_identity::Selector::new("unix", &format!("uid:{}", cred.uid()))
            .map_err(|_| Status::internal("selector"))?;
        if !selectors.contains(&uid_selector) {
            return Err(Status::unauthenticated(
                "the calling process changed user since it connected",
            ));
        }
        if !self.others.is_empty() {
            for a in &self.others {
                match tokio::time::timeout(ATTESTATION_TIMEOUT, a.attest(pid)).await {
                    // Each attestor speaks only for its own selector type:
                    // none can add, say, a unix:uid the kernel did not give.
                    Ok(Ok(more)) => {
                        selectors.extend(more.into_iter().filter(|s| s.kind() == a.name()))
                    }
                    Ok(Err(e)) => {
                        warn!(pid, attestor = a.name(), error = %e, "workload attestor failed; its selectors are left out");
                    }
                    Err(_) => {
                        warn!(
                            pid,
                            attestor = a.name(),
                            "workload attestor timed out; its selectors are left out"
                        );
                    }
                }
            }
            // The slower attestors ran after the unix checks: the process
            // must still be the one that connected.
            let attestor = self.attestor.clone();
            let now = self
                .on_pool(cred.uid(), move || attestor.identity(pid))
                .await?;
            if now.ok().as_ref() != Some(&origin_for_later) {
                return Err(Status::unauthenticated(
                    "the calling process changed or is gone",
                ));
            }
        }
        Ok(Caller {
            uid: cred.uid(),
            selectors,
            pid,
            origin: origin_for_later,
        })
    }

    /// Entries matching `selectors`, and the SVIDs held for them.
    fn identities(
        &self,
        selectors: &SelectorSet,
    ) -> (Vec<Arc<RegistrationEntry>>, Vec<Arc<CachedSvid>>) {
        self.agent.cache().matching(selectors, SystemTime::now())
    }

    /// PermissionDenied for a caller with no identity: `why`, or that the
    /// server revoked this node's agent.
    fn no_identity(&self, why: &'static str) -> Status {
        match self.agent.cache().revoked() {
            Some(reason) => Status::permission_denied(format!(
                "this node's agent was revoked by the server ({reason}); no identities are \
                 served until it attests again"
            )),
            None => Status::permission_denied(why),
        }
    }

    /// The SVIDs for `selectors`, waiting briefly for ones still being issued.
    async fn x509_state(&self, selectors: &SelectorSet) -> Result<Vec<Arc<CachedSvid>>, Status> {
        let mut changes = self.agent.cache().subscribe();
        let deadline = tokio::time::Instant::now() + ISSUANCE_WAIT;
        loop {
            let (entries, svids) = self.identities(selectors);
            if entries.is_empty() {
                return Err(self.no_identity("no identity is registered for this workload"));
            }
            if svids.len() >= entries.len()
                || (!svids.is_empty() && tokio::time::Instant::now() >= deadline)
            {
                return Ok(svids);
            }
            if tokio::time::timeout_at(deadline, changes.changed())
                .await
                .is_err()
            {
                return if svids.is_empty() {
                    Err(Status::unavailable(
                        "identities are still being issued; retry",
                    ))
                } else {
                    Ok(svids)
                };
            }
        }
    }

    fn bundle(&self) -> Result<Arc<Bundle>, Status> {
        self.agent
            .cache()
            .bundle()
            .ok_or_else(|| Status::unavailable("the agent has no trust bundle yet"))
    }

    /// Streams `make()` now and whenever the cache changes and the value
    /// differs; ends with the error `make` returns. With `recheck`, the
    /// caller is attested again before each update is sent (not when
    /// nothing is sent: an unchanged value, or an error ending the stream,
    /// discloses nothing), and the stream ends if it is not the same.
    fn watch_stream<T, F>(
        &self,
        slot: Slot,
        first: T,
        make: F,
        recheck: Option<Recheck>,
    ) -> BoxStream<T>
    where
        T: PartialEq + Clone + Send + 'static,
        F: Fn(&WorkloadApi) -> Result<Option<T>, Status> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel(1);
        let this = self.clone();
        let mut changes = self.agent.cache().subscribe();
        tokio::spawn(async move {
            let _slot = slot;
            let mut last = first.clone();
            if tx.send(Ok(first)).await.is_err() {
                return;
            }
            loop {
                tokio::select! {
                    () = tx.closed() => return,
                    r = changes.changed() => if r.is_err() { return },
                }
                match make(&this) {
                    Ok(None) => {}
                    Ok(Some(next)) if next == last => {}
                    Ok(Some(next)) => {
                        if let Some(r) = &recheck
                            && let Err(status) = this.recheck(r).await
                        {
                            let _ = tx.send(Err(status)).await;
                            return;
                        }
                        last = next.clone();
                        if tx.send(Ok(next)).await.is_err() {
                            return;
                        }
                    }
                    Err(status) => {
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                }
            }
        });
        Box::pin(ReceiverStream::new(rx))
    }
}

/// The key of a bundle in the Workload API's bundle maps: the SPIFFE ID of
/// its trust domain (`spiffe://example.org`), as the specification says.
fn bundle_key(b: &Bundle) -> String {
    b.trust_domain.id().to_string()
}

fn x509_response(svids: &[Arc<CachedSvid>], bundle: &Bundle) -> X509svidResponse {
    X509svidResponse {
        svids: svids.iter().map(|s| svid_message(s, bundle)).collect(),
        crl: vec![],
        federated_bundles: HashMap::new(),
    }
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadApi {
    type FetchX509SVIDStream = BoxStream<X509svidResponse>;
    type FetchX509BundlesStream = BoxStream<X509BundlesResponse>;
    type FetchJWTBundlesStream = BoxStream<JwtBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        req: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        let Caller {
            uid,
            selectors,
            pid,
            origin,
        } = self.caller(&req).await?;
        let slot = self.open_stream(uid)?;
        let svids = self.x509_state(&selectors).await?;
        let first = x509_response(&svids, &*self.bundle()?);
        let make = move |api: &WorkloadApi| {
            let (entries, svids) = api.identities(&selectors);
            if entries.is_empty() {
                return Err(api.no_identity("no identity is registered for this workload any more"));
            }
            if svids.is_empty() {
                return Ok(None); // re-issuance in progress: send when it lands
            }
            Ok(Some(x509_response(&svids, &*api.bundle()?)))
        };
        // Each update goes only to the process that opened the stream: it
        // is attested again before anything is sent (and only then, so a
        // change that sends nothing, or a revocation, costs no /proc reads).
        let recheck = Recheck { uid, pid, origin };
        Ok(Response::new(self.watch_stream(
            slot,
            first,
            make,
            Some(recheck),
        )))
    }

    async fn fetch_x509_bundles(
        &self,
        req: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        let Caller { uid, selectors, .. } = self.caller(&req).await?;
        let slot = self.open_stream(uid)?;
        self.x509_state(&selectors).await?;
        let make = |api: &WorkloadApi| -> Result<X509BundlesResponse, Status> {
            let b = api.bundle()?;
            Ok(X509BundlesResponse {
                crl: vec![],
                bundles: [(bundle_key(&b), b.x509_authorities.concat())].into(),
            })
        };
        let first = make(self)?;
        Ok(Response::new(self.watch_stream(
            slot,
            first,
            move |api| make(api).map(Some),
            None,
        )))
    }

    async fn fetch_jwtsvid(
        &self,
        req: Request<JwtsvidRequest>,
    ) -> Result<Response<JwtsvidResponse>, Status> {
        check_header(&req)?;
        self.unary_allowed(&req)?;
        let Caller { uid, selectors, .. } = self.caller(&req).await?;
        let r = req.into_inner();
        if r.audience.is_empty() || r.audience.iter().any(String::is_empty) {
            return Err(Status::invalid_argument("audience is required"));
        }
        if r.audience.len() > jwt::MAX_AUDIENCES || r.audience.iter().any(|a| a.len() > 256) {
            return Err(Status::invalid_argument(
                "at most 32 audiences of at most 256 bytes",
            ));
        }
        let (entries, _) = self.identities(&selectors);
        let wanted: Vec<_> = if r.spiffe_id.is_empty() {
            entries
        } else {
            let id = SpiffeId::parse(&r.spiffe_id).map_err(|e| {
                Status::invalid_argument(format!("spiffe_id is not a valid SPIFFE ID: {e}"))
            })?;
            entries.into_iter().filter(|e| e.spiffe_id == id).collect()
        };
        if wanted.is_empty() {
            return Err(self.no_identity("no matching identity for this workload"));
        }
        let mut svids = Vec::with_capacity(wanted.len());
        for e in wanted {
            if !self.agent.has_fresh_jwt(&e, &r.audience)
                && !self.jwt_fetches.try_take(&uid, 1.0, Instant::now())
            {
                warn!(uid, "JWT-SVID fetch limit reached for this uid");
                return Err(Status::resource_exhausted(
                    "this user has asked for too many new JWT-SVIDs (audiences); retry in a few \
                     seconds or reuse the tokens already fetched",
                ));
            }
            let token = self.agent.jwt_svid(&e, &r.audience).await.map_err(|e| {
                warn!(error = %e, "JWT-SVID unavailable");
                Status::unavailable("JWT-SVID could not be obtained from the server; retry")
            })?;
            svids.push(Jwtsvid {
                spiffe_id: e.spiffe_id.to_string(),
                svid: token,
                hint: e.hint.clone(),
            });
        }
        Ok(Response::new(JwtsvidResponse { svids }))
    }

    async fn fetch_jwt_bundles(
        &self,
        req: Request<JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        let Caller { uid, selectors, .. } = self.caller(&req).await?;
        let slot = self.open_stream(uid)?;
        self.x509_state(&selectors).await?;
        let make = |api: &WorkloadApi| -> Result<JwtBundlesResponse, Status> {
            let b = api.bundle()?;
            // A JWT bundle holds the JWT authorities only: clients reject
            // x509-svid keys (which carry no kid) in it.
            let jwt_only = Bundle {
                x509_authorities: Vec::new(),
                ..(*b).clone()
            };
            Ok(JwtBundlesResponse {
                bundles: [(bundle_key(&b), jwt_only.to_jwks_bytes())].into(),
            })
        };
        let first = make(self)?;
        Ok(Response::new(self.watch_stream(
            slot,
            first,
            move |api| make(api).map(Some),
            None,
        )))
    }

    async fn validate_jwtsvid(
        &self,
        req: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        check_header(&req)?;
        self.unary_allowed(&req)?;
        let r = req.into_inner();
        if r.audience.is_empty() {
            return Err(Status::invalid_argument("audience is required"));
        }
        if r.svid.is_empty() {
            return Err(Status::invalid_argument("svid is required"));
        }
        let bundle = self.bundle()?;
        let v = jwt::validate(&r.svid, &[r.audience.as_str()], &*bundle, SystemTime::now())
            .map_err(|e| Status::invalid_argument(format!("invalid JWT-SVID: {e}")))?;
        use prost_types::value::Kind;
        let num = |t: SystemTime| prost_types::Value {
            kind: Some(Kind::NumberValue(
                sigil_identity::clock::unix_seconds(t) as f64
            )),
        };
        let text = |s: &str| prost_types::Value {
            kind: Some(Kind::StringValue(s.to_owned())),
        };
        let mut fields = std::collections::BTreeMap::new();
        fields.insert("sub".to_owned(), text(v.spiffe_id.as_str()));
        fields.insert(
            "aud".to_owned(),
            prost_types::Value {
                kind: Some(Kind::ListValue(prost_types::ListValue {
                    values: v.audience.iter().map(|a| text(a)).collect(),
                })),
            },
        );
        fields.insert("exp".to_owned(), num(v.expiry));
        if let Some(iat) = v.issued_at {
            fields.insert("iat".to_owned(), num(iat));
        }
        Ok(Response::new(ValidateJwtsvidResponse {
            spiffe_id: v.spiffe_id.to_string(),
            claims: Some(prost_types::Struct {
                fields: fields.into_iter().collect(),
            }),
        }))
    }
}

/// The standard gRPC health service next to the Workload API: `SERVING`
/// once the agent holds a trust bundle from the server, and NOT_SERVING
/// while the server has revoked it. It needs no
/// security header, so stock probes work.
#[derive(Debug, Clone)]
pub struct Health {
    agent: Agent,
}

impl Health {
    fn status(&self, service: &str) -> Result<i32, Status> {
        use sigil_proto::grpc::health::v1::health_check_response::ServingStatus;
        if !(service.is_empty() || service == "SpiffeWorkloadAPI") {
            return Err(Status::not_found(format!("unknown service {service:?}")));
        }
        let cache = self.agent.cache();
        let serving = cache.bundle().is_some() && cache.revoked().is_none();
        Ok(if serving {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        } as i32)
    }
}

#[tonic::async_trait]
impl sigil_proto::grpc::health::v1::health_server::Health for Health {
    type WatchStream = BoxStream<sigil_proto::grpc::health::v1::HealthCheckResponse>;

    async fn check(
        &self,
        req: Request<sigil_proto::grpc::health::v1::HealthCheckRequest>,
    ) -> Result<Response<sigil_proto::grpc::health::v1::HealthCheckResponse>, Status> {
        let status = self.status(&req.get_ref().service)?;
        Ok(Response::new(
            sigil_proto::grpc::health::v1::HealthCheckResponse { status },
        ))
    }

    async fn watch(
        &self,
        req: Request<sigil_proto::grpc::health::v1::HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let service = req.into_inner().service;
        let mut last = self.status(&service)?;
        let (tx, rx) = mpsc::channel(1);
        let this = self.clone();
        let mut changes = self.agent.cache().subscribe();
        tokio::spawn(async move {
            use sigil_proto::grpc::health::v1::HealthCheckResponse;
            if tx
                .send(Ok(HealthCheckResponse { status: last }))
                .await
                .is_err()
            {
                return;
            }
            loop {
                tokio::select! {
                    () = tx.closed() => return,
                    r = changes.changed() => if r.is_err() { return },
                }
                let Ok(now) = this.status(&service) else {
                    return;
                };
                if now != last {
                    last = now;
                    if tx
                        .send(Ok(HealthCheckResponse { status: now }))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Serves the Workload API on `listener` until `shutdown` resolves.
pub async fn serve(
    api: WorkloadApi,
    listener: UnixListener,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    serve_with_metrics(api, listener, shutdown, None).await
}

/// As [`serve`], recording call durations in `rpc` if given (telemetry on).
pub async fn serve_with_metrics(
    api: WorkloadApi,
    listener: UnixListener,
    shutdown: impl std::future::Future<Output = ()>,
    rpc: Option<sigil_proto::telemetry::RpcMetrics>,
) -> Result<(), tonic::transport::Error> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(
        accept_loop(listener, api.clone(), tx)
            .instrument(tracing::info_span!("workload_api_accept")),
    );
    let incoming = ReceiverStream::new(rx);
    let health = Health {
        agent: api.agent.clone(),
    };
    tonic::transport::Server::builder()
        // The `:authority` shim buffers at most one frame of this size.
        .max_frame_size(Some(crate::authority::MAX_FRAME_SIZE as u32))
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
        .layer(sigil_proto::telemetry::RpcLayer::new(rpc))
        .add_service(sigil_proto::grpc::health::v1::health_server::HealthServer::new(health))
        .add_service(SpiffeWorkloadApiServer::new(api).max_decoding_message_size(MAX_REQUEST_BYTES))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}

/// Accepts connections until the server stops taking them (`tx` closed):
/// counts each against its uid, refusing (closing) it past a limit, and
/// hands it to the server once the connecting process's identity is taken,
/// in a task of its own so that a slow `/proc` never holds up the loop.
async fn accept_loop(
    listener: UnixListener,
    api: WorkloadApi,
    tx: mpsc::Sender<Result<WorkloadConn, std::io::Error>>,
) {
    let mut backoff = ACCEPT_BACKOFF_MIN;
    loop {
        let accepted = tokio::select! {
            () = tx.closed() => return,
            r = listener.accept() => r,
        };
        let stream = match accepted {
            Ok((stream, _)) => {
                backoff = ACCEPT_BACKOFF_MIN;
                stream
            }
            Err(e) => {
                // Out of file descriptors (EMFILE, ENFILE) persists until
                // some are closed: retrying at once would spin.
                warn!(
                    error = %e,
                    retry_in_ms = backoff.as_millis() as u64,
                    "cannot accept Workload API connections (raise the open files limit if \
                     this persists); retrying"
                );
                tokio::select! {
                    () = tx.closed() => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                continue;
            }
        };
        let Ok(cred) = stream.peer_cred() else {
            debug!("Workload API connection without peer credentials closed");
            continue;
        };
        let Some(slot) = api.admit_connection(cred.uid()) else {
            continue;
        };
        let (api, tx) = (api.clone(), tx.clone());
        tokio::spawn(async move {
            if let Some(conn) = WorkloadConn::accept(stream, slot, &api).await {
                let _ = tx.send(Ok(conn)).await;
            }
        });
    }
}
