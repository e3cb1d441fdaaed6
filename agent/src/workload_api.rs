//! The SPIFFE Workload API on a Unix socket.
//!
//! Every Workload API call must carry the `workload.spiffe.io: true`
//! metadata (Envoy's SDS calls, served here too, carry none). The caller
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
//!
//! # Layout
//! - [`connection`]: the accept loop, the connecting process's identity,
//!   connection and stream limits.
//! - [`caller`]: the security header and attestation of each caller.
//! - [`streams`]: the Workload API calls (X.509 and JWT SVIDs and bundles).
//! - [`health`]: the gRPC health service next to it.
//! - [`sds`]: Envoy's Secret Discovery Service (SDS v3) next to it, for
//!   the same callers under the same limits.
//! - [`h2_authority`]: rewrites HTTP/2 `:authority` values h2 would refuse,
//!   for gRPC C-core and grpc-java clients on Unix sockets.
//! - [`x509_wire`]: `X509SVIDResponse`s as parts (the cached SVIDs), written
//!   in pieces without building the message.
//! - [`x509_route`]: the service as served, with `FetchX509SVID` answered
//!   from those parts.

use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sigil_attestors::unix::UnixAttestor;
use sigil_attestors::workload::WorkloadAttestor;
use sigil_identity::rate_limit::RateLimiter;
use sigil_identity::{RegistrationEntry, SelectorSet};
use sigil_proto::workload::spiffe_workload_api_server::SpiffeWorkloadApiServer;
use tokio::net::UnixListener;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use tracing::Instrument;

use crate::cache::CachedSvid;
use crate::config::{
    DEFAULT_JWT_FETCHES_PER_UID_PER_SECOND, DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_CONNECTIONS_PER_UID, DEFAULT_MAX_STREAMS_PER_UID,
    DEFAULT_UNARY_CALLS_PER_UID_PER_SECOND,
};
use crate::session::Session;

mod caller;
pub mod connection;
pub mod h2_authority;
mod health;
pub mod sds;
mod streams;
mod x509_route;
mod x509_wire;

use caller::AttestationPool;
use connection::Counts;
pub use connection::{WorkloadConn, WorkloadConnInfo};
pub use health::Health;

/// Largest request accepted (a JWT to validate is the largest field).
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// Most streams open at once on one connection (an HTTP/2 setting): one
/// connection cannot take a whole uid's share.
const MAX_STREAMS_PER_CONNECTION: u32 = 256;
/// Threads that may read `/proc` and hash executables at once, and how many
/// of them one uid may hold (its callers queue behind those).
const ATTESTATION_THREADS: usize = 64;
const ATTESTATION_THREADS_PER_UID: usize = 16;
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
    session: Session,
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
    /// SDS's default resource names.
    sds: Arc<sds::SdsConfig>,
}

fn jwt_fetch_limiter(per_second: f64) -> RateLimiter<u32> {
    RateLimiter::new(per_second, per_second * JWT_FETCH_BURST_SECONDS)
}

impl WorkloadApi {
    /// Open connections and streams, for metrics.
    pub fn open_counts(&self) -> (usize, usize) {
        let total = |c: &Mutex<Counts>| c.lock().unwrap_or_else(|p| p.into_inner()).total;
        (total(&self.connections), total(&self.streams))
    }

    /// Serves identities from `session`, attesting callers with `attestor`,
    /// with the default per-uid stream limit.
    pub fn new(session: Session, attestor: Arc<UnixAttestor>) -> Self {
        Self {
            session,
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
            sds: Arc::default(),
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

    /// Sets SDS's default resource names (`[sds]`).
    pub fn with_sds_names(mut self, names: sds::SdsConfig) -> Self {
        self.sds = Arc::new(names);
        self
    }

    /// Sets how many unary calls one uid may make a second (and in a burst).
    pub fn with_unary_calls_per_uid_per_second(mut self, rate: u32) -> Self {
        self.unary = Arc::new(Self::unary_limiter(rate));
        self
    }

    /// Entries matching `selectors`, and the SVIDs held for them.
    pub(super) fn identities(
        &self,
        selectors: &SelectorSet,
    ) -> (Vec<Arc<RegistrationEntry>>, Vec<Arc<CachedSvid>>) {
        self.session.cache().matching(selectors, self.session.now())
    }

    /// PermissionDenied for a caller with no identity: `why`, or that the
    /// server revoked this node's agent.
    pub(super) fn no_identity(&self, why: &'static str) -> Status {
        match self.session.cache().revoked() {
            Some(reason) => Status::permission_denied(format!(
                "this node's agent was revoked by the server ({reason}); no identities are \
                 served until it attests again"
            )),
            None => Status::permission_denied(why),
        }
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
        connection::accept_loop(listener, api.clone(), tx)
            .instrument(tracing::info_span!("workload_api_accept")),
    );
    let incoming = ReceiverStream::new(rx);
    let health = Health {
        session: api.session.clone(),
    };
    tonic::transport::Server::builder()
        // The `:authority` shim buffers at most one frame of this size.
        .max_frame_size(Some(h2_authority::MAX_FRAME_SIZE as u32))
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
        .layer(sigil_proto::telemetry::RpcLayer::new(rpc))
        .add_service(sigil_proto::grpc::health::v1::health_server::HealthServer::new(health))
        .add_service(sds::Sds::new(api.clone()).into_server())
        .add_service(x509_route::WorkloadService::new(
            api.clone(),
            SpiffeWorkloadApiServer::new(api).max_decoding_message_size(MAX_REQUEST_BYTES),
        ))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}
