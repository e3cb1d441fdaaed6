//! Pruning of history that would otherwise grow without bound: old
//! changes of the change feed, old audit records and long-expired agents (see
//! [`RetentionSection`]). Runs in the server's background.

use std::sync::Arc;

use sigil_identity::clock::Clock;
use tracing::{info, warn};

use crate::audit::Audit;
use crate::config::RetentionSection;
use crate::datastore::Datastore;
use crate::registry::Registry;

/// What one pruning pass needs.
#[derive(Debug, Clone)]
pub struct Pruner {
    pub store: Arc<dyn Datastore>,
    pub registry: Arc<Registry>,
    pub audit: Audit,
    pub clock: Arc<dyn Clock>,
    pub retention: RetentionSection,
}

impl Pruner {
    /// One pass; a failed step is logged and retried at the next pass.
    pub async fn run_once(&self) {
        let r = &self.retention;
        let now = self.clock.now();
        // Only changes this replica's registry has applied go, and never
        // the newest `changes` of them.
        match self.store.current_revision().await {
            Ok(current) => {
                let through = current
                    .saturating_sub(r.changes)
                    .min(self.registry.revision());
                if through > 0 {
                    match self.store.prune_changes(through).await {
                        Ok(0) => {}
                        Ok(n) => info!(pruned = n, through, "old changes removed"),
                        Err(e) => warn!(error = %e, "change pruning failed"),
                    }
                }
            }
            Err(e) => warn!(error = %e, "change pruning failed"),
        }
        if let Some(before) = now.checked_sub(r.audit) {
            match self.store.prune_audit(before).await {
                Ok(0) => {}
                Ok(n) => info!(pruned = n, "old audit events removed"),
                Err(e) => warn!(error = %e, "audit pruning failed"),
            }
        }
        if let Some(before) = now.checked_sub(r.expired_agents) {
            match self.store.prune_agents(before).await {
                Ok(ids) if ids.is_empty() => {}
                Ok(ids) => {
                    // The removals reach the registry from the feed.
                    if let Err(e) = self.registry.catch_up().await {
                        warn!(error = %e, "registry could not catch up after pruning agents");
                    }
                    let events = ids
                        .iter()
                        .map(|id| self.audit.event("server", "agent.prune", id.as_str(), "ok"))
                        .collect();
                    self.audit.record_all(events).await;
                    info!(pruned = ids.len(), "long-expired agents removed");
                }
                Err(e) => warn!(error = %e, "expired agent pruning failed"),
            }
        }
    }

    /// Runs a pass every `retention.interval` until `stop` turns true.
    pub async fn run(self, stop: tokio::sync::watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(self.retention.interval);
        let stopped = crate::shutdown::wait_for_stop(stop);
        tokio::pin!(stopped);
        loop {
            tokio::select! {
                () = &mut stopped => return,
                _ = tick.tick() => self.run_once().await,
            }
        }
    }
}
