//! Who is calling: the security header, the kernel's credentials, and
//! attestation of the calling process (on a bounded pool of blocking
//! threads, shared fairly between uids).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use sigil_identity::SelectorSet;
use tokio::sync::Semaphore;
use tonic::{Request, Status};
use tracing::{debug, warn};

use super::connection::WorkloadConnInfo;
use super::{ATTESTATION_THREADS, ATTESTATION_THREADS_PER_UID, ATTESTATION_TIMEOUT, WorkloadApi};

/// Runs attestation's file system work (`/proc`, `stat`, hashing) off the
/// runtime, on at most [`ATTESTATION_THREADS`] blocking threads, of which
/// one uid holds at most [`ATTESTATION_THREADS_PER_UID`]. A thread stuck on
/// a hung file system keeps its permits, so the stuck work stays bounded
/// and callers of other uids still find threads.
#[derive(Debug)]
pub(super) struct AttestationPool {
    all: Arc<Semaphore>,
    per_uid: Mutex<HashMap<u32, Arc<Semaphore>>>,
}

impl AttestationPool {
    pub(super) fn new() -> Self {
        Self {
            all: Arc::new(Semaphore::new(ATTESTATION_THREADS)),
            per_uid: Mutex::default(),
        }
    }

    /// Runs `f` for a caller of `uid` once a thread is free for it; `None`
    /// if `f` panicked.
    pub(super) async fn run<T: Send + 'static>(
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

/// An attested caller.
pub(super) struct Caller {
    pub(super) uid: u32,
    pub(super) selectors: SelectorSet,
    pub(super) pid: i32,
    pub(super) origin: sigil_attestors::unix::ProcessIdentity,
}

/// The process a stream's updates go to, attested again before each.
#[derive(Debug, Clone)]
pub(super) struct Recheck {
    pub(super) uid: u32,
    pub(super) pid: i32,
    pub(super) origin: sigil_attestors::unix::ProcessIdentity,
}

/// The kernel's credentials of the caller's connection.
fn peer_cred<T>(req: &Request<T>) -> Result<tokio::net::unix::UCred, Status> {
    req.extensions()
        .get::<WorkloadConnInfo>()
        .and_then(|c| c.uds.peer_cred)
        .ok_or_else(|| Status::unauthenticated("caller credentials unavailable"))
}

/// Checks the `workload.spiffe.io` metadata: exactly one value, `true`.
pub(super) fn check_header<T>(req: &Request<T>) -> Result<(), Status> {
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

impl WorkloadApi {
    /// Refuses a unary call past the caller's uid's rate.
    pub(super) fn unary_allowed<T>(&self, req: &Request<T>) -> Result<(), Status> {
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
    pub(super) async fn recheck(&self, r: &Recheck) -> Result<(), Status> {
        let (attestor, pid, origin) = (self.attestor.clone(), r.pid, r.origin.clone());
        self.on_pool(r.uid, move || attestor.attest_as(pid, Some(&origin)))
            .await?
            .map(|_| ())
            .map_err(|_| Status::unauthenticated("the calling process changed or is gone"))
    }

    /// Checks the header and attests the caller.
    pub(super) async fn caller<T>(&self, req: &Request<T>) -> Result<Caller, Status> {
        check_header(req)?;
        self.attest(req).await
    }

    /// Attests the caller, without the Workload API's security header (SDS
    /// requests carry none).
    pub(super) async fn attest<T>(&self, req: &Request<T>) -> Result<Caller, Status> {
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
}
