//! Workload API connections: the accept loop, the identity of the
//! connecting process (taken once, at accept), and the per-uid and total
//! limits on connections and streams.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sigil_attestors::unix::UnixAttestor;
use tokio::net::UnixListener;
use tokio::sync::mpsc;
use tonic::Status;
use tonic::transport::server::UdsConnectInfo;
use tracing::{debug, warn};

use super::h2_authority::AuthorityFix;
use super::{ATTESTATION_TIMEOUT, WorkloadApi};

/// Wait after a failed `accept`, doubling up to the maximum while it fails.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Open streams or connections, per uid and in all.
#[derive(Debug, Default)]
pub(super) struct Counts {
    per_uid: HashMap<u32, usize>,
    pub(super) total: usize,
}

/// One open stream or connection counted against its uid; released on drop.
#[derive(Debug)]
pub(super) struct Slot {
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

impl WorkloadApi {
    /// Counts a new stream for `uid`, refusing it past the limit.
    pub(super) fn open_stream(&self, uid: u32) -> Result<Slot, Status> {
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
}

/// Accepts connections until the server stops taking them (`tx` closed):
/// counts each against its uid, refusing (closing) it past a limit, and
/// hands it to the server once the connecting process's identity is taken,
/// in a task of its own so that a slow `/proc` never holds up the loop.
pub(super) async fn accept_loop(
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
