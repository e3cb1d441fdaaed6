//! The audit trail: every admin mutation and every issuance, written to the
//! datastore and logged with caller, action, target and outcome. Never the
//! token, key or CSR.
//!
//! Mutations are written durably before the call returns. Issuance events
//! are logged before the credential is returned and written to the
//! datastore by a background writer, many per durable write: waiting for a
//! disk sync per credential capped JWT-SVID minting at in-flight calls ÷
//! sync time. A crash can lose the issuance events of the last batch (their
//! log lines were written); [`Audit::flush`] at shutdown loses none.

use std::sync::Arc;
use std::time::SystemTime;

use sigil_identity::clock::Clock;
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use crate::datastore::{AuditEvent, Datastore};

/// Issuance events queued for the writer before callers wait.
const QUEUE: usize = 65_536;

/// Most events in one durable write.
const MAX_BATCH: usize = 4_096;

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
        tokio::spawn(write_issued(store.clone(), rx));
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
        target: "sigil::audit",
        caller = %e.caller,
        action = %e.action,
        target_id = %e.target,
        outcome = %e.outcome,
        expires_at = e.expires_at.map(sigil_identity::clock::unix_seconds),
        "audit"
    );
}

/// Writes queued issuance events, as many per durable write as are waiting.
async fn write_issued(store: Arc<dyn Datastore>, mut rx: mpsc::Receiver<Queued>) {
    let mut flushes = Vec::new();
    while let Some(first) = rx.recv().await {
        let mut batch = Vec::new();
        let mut next = Some(first);
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
        if !batch.is_empty()
            && let Err(e) = store.append_audit(batch).await
        {
            warn!(error = %e, "could not persist issuance audit events");
        }
        for done in flushes.drain(..) {
            let _ = done.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::datastore::SledDatastore;
    use sigil_identity::clock::SystemClock;

    #[tokio::test]
    async fn queued_issuance_events_are_all_written_by_flush() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Datastore> = Arc::new(SledDatastore::open(dir.path()).unwrap());
        let audit = Audit::new(store.clone(), Arc::new(SystemClock));
        for i in 0..5_000 {
            let e = audit.issued(
                "agent",
                "svid.jwt.issue",
                &format!("w{i}"),
                SystemTime::now(),
            );
            audit.record_issued(vec![e]).await;
        }
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
}
