//! The audit trail: every admin mutation and every issuance, written to the
//! datastore and logged with caller, action, target and outcome. Never the
//! token, key or CSR.

use std::sync::Arc;
use std::time::SystemTime;

use sigil_identity::clock::Clock;
use tracing::{info, warn};

use crate::datastore::{AuditEvent, Datastore};

/// Records audit events.
#[derive(Debug, Clone)]
pub struct Audit {
    store: Arc<dyn Datastore>,
    clock: Arc<dyn Clock>,
}

impl Audit {
    /// Writes to `store`, stamping events with `clock`.
    pub fn new(store: Arc<dyn Datastore>, clock: Arc<dyn Clock>) -> Self {
        Self { store, clock }
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
        if let Err(e) = self.store.append_audit(events).await {
            warn!(error = %e, "could not persist audit events");
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
