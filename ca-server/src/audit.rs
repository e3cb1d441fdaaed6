//! The audit trail: every admin mutation and every issuance, written to the
//! datastore and logged with caller, action, target and outcome. Never the
//! token, key or CSR.
//!
//! An admin mutation's event is written in the same datastore write as the
//! mutation (the `*_audited` datastore calls), and refused attempts are
//! written durably before the call returns. Issuance events
//! are logged before the credential is returned and written to the
//! datastore by a background writer, as one record per batch, made durable
//! at most [`SYNC_INTERVAL`] later: waiting for a disk sync per credential
//! capped JWT-SVID minting at in-flight calls ÷ sync time, and a sync per
//! batch still cost a quarter of it. A crash can lose the issuance events
//! of the last interval (their log lines were written); [`Audit::flush`] at
//! shutdown loses none. The writer gathers events for up to [`GATHER`]
//! after the first one before it writes: each write appends to the hash
//! chain in a datastore transaction, and a sled transaction has sled's IO
//! threads write out the log buffer however little it holds. Under load,
//! writing as soon as one event was waiting cost the server about 15 %
//! more CPU per JWT-SVID minted (docs/benchmarks.md, round 2, session 4).

pub mod chain;
pub mod checkpoint;
pub mod review;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use sigil_identity::clock::Clock;
use tokio::sync::{mpsc, oneshot};
use tracing::{Instrument, info, warn};

use crate::datastore::{AuditEvent, Datastore, DatastoreError};

/// Issuance events queued for the writer before callers wait.
const QUEUE: usize = 65_536;

/// Most events in one write.
const MAX_BATCH: usize = 4_096;

/// The tracing target of audit log lines; the server's log filter always
/// enables it at `info`, whatever `log.level` says.
pub const LOG_TARGET: &str = "sigil::audit";

/// Longest time an issuance event waits for a disk sync, from when the
/// writer takes it.
pub const SYNC_INTERVAL: Duration = Duration::from_millis(100);

/// How long the writer keeps gathering issuance events after the first
/// one of a batch, unless the batch fills or a flush is asked for.
pub const GATHER: Duration = Duration::from_millis(5);

enum Queued {
    Event(AuditEvent),
    /// Answered once every event queued before it is written.
    Flush(oneshot::Sender<()>),
}

/// Records audit events.
#[derive(Debug, Clone)]
pub struct Audit {
    store: Arc<dyn Datastore>,
    clock: Arc<dyn Clock>,
    issued: mpsc::Sender<Queued>,
}

impl std::fmt::Debug for Queued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Event(_) => "Event",
            Self::Flush(_) => "Flush",
        })
    }
}

impl Audit {
    /// Writes to `store`, stamping events with `clock`; starts the issuance
    /// writer (so it must be called inside the Tokio runtime).
    pub fn new(store: Arc<dyn Datastore>, clock: Arc<dyn Clock>) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(
            write_issued(store.clone(), rx).instrument(tracing::info_span!("audit_writer")),
        );
        Self {
            store,
            clock,
            issued: tx,
        }
    }

    /// Returns once every issuance event recorded so far is written.
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.issued.send(Queued::Flush(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// An event stamped now.
    pub fn event(&self, caller: &str, action: &str, target: &str, outcome: &str) -> AuditEvent {
        AuditEvent {
            time: self.clock.now(),
            caller: caller.to_owned(),
            action: action.to_owned(),
            target: target.to_owned(),
            outcome: outcome.to_owned(),
            expires_at: None,
            // The call being served, if any (set by the RPC layer).
            request_id: sigil_proto::telemetry::request_id(),
        }
    }

    /// Records one event.
    pub async fn record(&self, caller: &str, action: &str, target: &str, outcome: &str) {
        self.record_all(vec![self.event(caller, action, target, outcome)])
            .await;
    }

    /// Records events with one durable write. A failure to persist is
    /// logged loudly; the action it describes has already happened.
    pub async fn record_all(&self, events: Vec<AuditEvent>) {
        for e in &events {
            log(e);
        }
        if let Err(e) = self.store.append_audit(events).await {
            warn!(error = %e, "could not persist audit events");
        }
    }

    /// Logs events that the datastore wrote in the same write as the
    /// mutation they describe (the `*_audited` datastore calls).
    pub fn log_written(&self, events: &[AuditEvent]) {
        events.iter().for_each(log);
    }

    /// Logs issuance events now and queues them for the datastore (see the
    /// module documentation). Waits only when the queue is full.
    pub async fn record_issued(&self, events: Vec<AuditEvent>) {
        for e in events {
            log(&e);
            if self.issued.send(Queued::Event(e)).await.is_err() {
                warn!("the audit writer has stopped; issuance event not persisted");
            }
        }
    }

    /// An issuance event with the credential's expiry.
    pub fn issued(
        &self,
        caller: &str,
        action: &str,
        target: &str,
        expires_at: SystemTime,
    ) -> AuditEvent {
        AuditEvent {
            expires_at: Some(expires_at),
            ..self.event(caller, action, target, "ok")
        }
    }
}

fn log(e: &AuditEvent) {
    info!(
        target: LOG_TARGET,
        caller = %e.caller,
        action = %e.action,
        target_id = %e.target,
        outcome = %e.outcome,
        expires_at = e.expires_at.map(sigil_identity::clock::unix_seconds),
        request_id = e.request_id.as_deref().map(tracing::field::display),
        "audit"
    );
}

/// Issuance events held in memory while the datastore is unavailable (a
/// database outage); beyond this the oldest are dropped (their log lines
/// were written).
const MAX_HELD: usize = 200_000;

/// Back-off between writes of held events while the datastore is
/// unavailable.
const RETRY_MIN: Duration = Duration::from_millis(250);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// Writes queued issuance events, as many per write as [`gather`] takes,
/// and makes them durable within [`SYNC_INTERVAL`] of taking the first
/// (at once for a flush). While the datastore is unavailable, events are
/// held (oldest first, at most [`MAX_HELD`]) and written once it is back.
async fn write_issued(store: Arc<dyn Datastore>, mut rx: mpsc::Receiver<Queued>) {
    let mut flushes = Vec::new();
    // When the oldest write not yet synced must be synced.
    let mut sync_by: Option<tokio::time::Instant> = None;
    let mut held = Held::default();
    loop {
        let wake = match (sync_by, held.retry_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let first = match wake {
            None => rx.recv().await,
            Some(deadline) => tokio::select! {
                q = rx.recv() => q,
                () = tokio::time::sleep_until(deadline) => {
                    let now = tokio::time::Instant::now();
                    if held.retry_at.is_some_and(|t| t <= now) {
                        held.retry_at = None;
                        if held.write(&*store).await {
                            sync_by.get_or_insert_with(|| now + SYNC_INTERVAL);
                        }
                    }
                    if sync_by.is_some_and(|t| t <= now) {
                        sync(&*store).await;
                        sync_by = None;
                    }
                    continue;
                }
            },
        };
        let Some(first) = first else {
            held.retry_at = None;
            if held.write(&*store).await || sync_by.is_some() {
                sync(&*store).await;
            }
            if !held.events.is_empty() {
                warn!(
                    events = held.events.len(),
                    "issuance audit events not persisted at shutdown: the datastore is unavailable"
                );
            }
            return;
        };
        let taken = tokio::time::Instant::now();
        // Gathering never delays a sync that is due.
        let until = sync_by.map_or(taken + GATHER, |d| d.min(taken + GATHER));
        for e in gather(first, &mut rx, until, &mut flushes).await {
            held.push(e);
        }
        if !flushes.is_empty() {
            // A flush writes now, whatever the back-off.
            held.retry_at = None;
        }
        if held.retry_at.is_none() && held.write(&*store).await {
            sync_by.get_or_insert(taken + SYNC_INTERVAL);
        }
        if !flushes.is_empty() {
            sync(&*store).await;
            sync_by = None;
            for done in flushes.drain(..) {
                let _ = done.send(());
            }
        }
    }
}

/// The events of one write: `first`, what is waiting, and what arrives
/// until `until`; less if the batch reaches [`MAX_BATCH`] or a flush is
/// queued (its sender goes to `flushes`), or if the channel closes.
async fn gather(
    first: Queued,
    rx: &mut mpsc::Receiver<Queued>,
    until: tokio::time::Instant,
    flushes: &mut Vec<oneshot::Sender<()>>,
) -> Vec<AuditEvent> {
    let mut batch = Vec::new();
    let mut next = Some(first);
    loop {
        while let Some(q) = next {
            match q {
                Queued::Event(e) => batch.push(e),
                Queued::Flush(done) => flushes.push(done),
            }
            next = if batch.len() < MAX_BATCH {
                rx.try_recv().ok()
            } else {
                None
            };
        }
        if batch.is_empty() || batch.len() >= MAX_BATCH || !flushes.is_empty() {
            return batch;
        }
        match tokio::time::timeout_at(until, rx.recv()).await {
            Ok(Some(q)) => next = Some(q),
            // Closed (the caller then syncs and stops) or gathered enough.
            Ok(None) | Err(_) => return batch,
        }
    }
}

/// Issuance events not yet written, and when to try again.
#[derive(Default)]
struct Held {
    events: std::collections::VecDeque<AuditEvent>,
    retry_at: Option<tokio::time::Instant>,
    delay: Duration,
    dropped: u64,
}

impl Held {
    fn push(&mut self, e: AuditEvent) {
        if self.events.len() == MAX_HELD {
            self.events.pop_front();
            self.dropped += 1;
            if self.dropped.is_power_of_two() {
                warn!(
                    dropped = self.dropped,
                    "the datastore is still unavailable: oldest held issuance audit events dropped (their log lines were written)"
                );
            }
        }
        self.events.push_back(e);
    }

    /// Writes the held events in batches; returns whether any was written.
    /// While the datastore is unavailable they stay held and a retry is
    /// scheduled; other failures drop the batch, as before holding.
    async fn write(&mut self, store: &dyn Datastore) -> bool {
        let mut wrote = false;
        while !self.events.is_empty() {
            let n = self.events.len().min(MAX_BATCH);
            let batch: Vec<AuditEvent> = self.events.iter().take(n).cloned().collect();
            match store.append_audit_unsynced(batch).await {
                Ok(_) => {
                    self.events.drain(..n);
                    wrote = true;
                    if !self.delay.is_zero() {
                        info!("datastore back: held issuance audit events written");
                        self.delay = Duration::ZERO;
                    }
                }
                Err(DatastoreError::Unavailable(e)) => {
                    if self.delay.is_zero() {
                        warn!(
                            error = %e,
                            held = self.events.len(),
                            "datastore unavailable: issuance audit events are held in memory until it is back"
                        );
                    }
                    self.delay = (self.delay * 2).clamp(RETRY_MIN, RETRY_MAX);
                    self.retry_at = Some(tokio::time::Instant::now() + self.delay);
                    return wrote;
                }
                Err(e) => {
                    warn!(error = %e, events = n, "could not persist issuance audit events");
                    self.events.drain(..n);
                }
            }
        }
        wrote
    }
}

async fn sync(store: &dyn Datastore) {
    if let Err(e) = store.sync().await {
        warn!(error = %e, "could not make issuance audit events durable");
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::datastore::SledDatastore;
    use sigil_identity::clock::SystemClock;

    /// Records `n` JWT-SVID issuance events, one call each.
    async fn record_jwts(audit: &Audit, n: usize) {
        for i in 0..n {
            let e = audit.issued(
                "agent",
                "svid.jwt.issue",
                &format!("w{i}"),
                SystemTime::now(),
            );
            audit.record_issued(vec![e]).await;
        }
    }

    #[tokio::test]
    async fn queued_issuance_events_are_all_written_by_flush() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Datastore> = Arc::new(SledDatastore::open(dir.path()).unwrap());
        let audit = Audit::new(store.clone(), Arc::new(SystemClock));
        record_jwts(&audit, 5_000).await;
        audit.record("admin", "entry.create", "e1", "ok").await;
        audit.flush().await;
        let events = store.list_audit(0, 10_000).await.unwrap();
        assert_eq!(events.len(), 5_001);
        let issued = events
            .iter()
            .filter(|(_, e)| e.action == "svid.jwt.issue")
            .count();
        assert_eq!(issued, 5_000);
    }

    // Paused time: the clock only moves once every task is idle, so the
    // writer has handled every queued event before each check.
    #[tokio::test(start_paused = true)]
    async fn issuance_events_are_synced_within_the_interval_without_a_flush() {
        let dir = tempfile::tempdir().unwrap();
        let sled = Arc::new(SledDatastore::open(dir.path()).unwrap());
        let audit = Audit::new(sled.clone(), Arc::new(SystemClock));
        let before = sled.syncs_requested();
        record_jwts(&audit, 100).await;
        // Written at once (one record per batch), not yet synced.
        tokio::time::sleep(SYNC_INTERVAL / 4).await;
        assert_eq!(sled.list_audit(0, 1_000).await.unwrap().len(), 100);
        assert_eq!(sled.syncs_requested(), before, "no sync per batch");
        // Synced once the interval has passed, with no flush asked for.
        tokio::time::sleep(SYNC_INTERVAL * 3).await;
        assert_eq!(sled.syncs_requested(), before + 1);
    }

    fn queued(target: &str) -> Queued {
        Queued::Event(AuditEvent {
            time: SystemTime::now(),
            caller: "agent".into(),
            action: "svid.jwt.issue".into(),
            target: target.into(),
            outcome: "ok".into(),
            expires_at: None,
            request_id: None,
        })
    }

    fn targets(batch: &[AuditEvent]) -> Vec<&str> {
        batch.iter().map(|e| e.target.as_str()).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn events_arriving_while_gathering_go_in_one_write_and_later_ones_in_the_next() {
        let (tx, mut rx) = mpsc::channel(16);
        let start = tokio::time::Instant::now();
        tokio::spawn(async move {
            for (ms, target) in [(1, "b"), (2, "c"), (4, "d"), (7, "late")] {
                tokio::time::sleep_until(start + Duration::from_millis(ms)).await;
                tx.send(queued(target)).await.unwrap();
            }
        });
        let mut flushes = Vec::new();
        let batch = gather(queued("a"), &mut rx, start + GATHER, &mut flushes).await;
        assert_eq!(targets(&batch), ["a", "b", "c", "d"]);
        assert_eq!(tokio::time::Instant::now(), start + GATHER);
        let Some(Queued::Event(late)) = rx.recv().await else {
            panic!("the late event was not left for the next write");
        };
        assert_eq!(late.target, "late");
        assert!(flushes.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_flush_or_a_full_batch_ends_gathering_at_once() {
        let (tx, mut rx) = mpsc::channel(MAX_BATCH + 1);
        let (done, _answer) = oneshot::channel();
        tx.send(Queued::Flush(done)).await.unwrap();
        let start = tokio::time::Instant::now();
        let mut flushes = Vec::new();
        let batch = gather(queued("a"), &mut rx, start + GATHER, &mut flushes).await;
        assert_eq!(targets(&batch), ["a"]);
        assert_eq!(flushes.len(), 1);
        assert_eq!(
            tokio::time::Instant::now(),
            start,
            "a flush waits for no gathering"
        );

        for i in 0..MAX_BATCH {
            tx.send(queued(&format!("e{i}"))).await.unwrap();
        }
        let mut flushes = Vec::new();
        let batch = gather(queued("first"), &mut rx, start + GATHER, &mut flushes).await;
        assert_eq!(batch.len(), MAX_BATCH);
        assert_eq!(
            tokio::time::Instant::now(),
            start,
            "a full batch is written at once"
        );
        // The one that did not fit is left for the next write.
        assert!(matches!(rx.try_recv(), Ok(Queued::Event(_))));
    }
}
