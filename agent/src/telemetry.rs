//! The agent's readiness and the `[telemetry] bind` listener (issue 16),
//! served by [`sigil_proto::telemetry::serve`]: state (connections, cached
//! SVIDs, expiry, sync revision) is sampled at scrape time by
//! [`AgentHealth`] into the [`crate::metrics::AgentMetrics`] gauges.

use std::future::Future;
use std::pin::Pin;
use std::time::SystemTime;

use sigil_proto::telemetry::{Health, Readiness, RpcMetrics};

use crate::session::Session;
use crate::workload_api::WorkloadApi;

/// Samples the agent's state for scrapes and answers `/ready`.
#[derive(Debug)]
pub struct AgentHealth {
    pub agent: Session,
    pub api: WorkloadApi,
}

fn secs_until(t: SystemTime, now: SystemTime) -> f64 {
    match t.duration_since(now) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    }
}

impl Health for AgentHealth {
    fn refresh(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(async move {
            let m = self.agent.metrics();
            m.ready.set(i64::from(self.ready().await.is_ok()));
            let (connections, streams) = self.api.open_counts();
            m.connections.set(connections as i64);
            m.streams.set(streams as i64);
            let cache = self.agent.cache();
            let svids = cache.svids();
            m.cached.set(svids.len() as i64);
            m.revision.set(cache.revision() as i64);
            let now = SystemTime::now();
            m.expiry.clear();
            if self.agent.id().is_some() {
                m.expiry
                    .get_or_create(&[("type", "agent")])
                    .set(secs_until(self.agent.svid_not_after(), now));
            }
            if let Some(soonest) = svids.iter().map(|s| s.not_after).min() {
                m.expiry
                    .get_or_create(&[("type", "workload")])
                    .set(secs_until(soonest, now));
            }
        })
    }

    fn ready(&self) -> Pin<Box<dyn Future<Output = Readiness> + Send + '_>> {
        Box::pin(async move {
            let mut reasons = Vec::new();
            let cache = self.agent.cache();
            if let Some(why) = cache.revoked() {
                reasons.push(format!("revoked: the server revoked this agent: {why}"));
            }
            if self.agent.id().is_none() {
                reasons.push("attestation: the agent holds no SVID".to_owned());
            }
            if cache.bundle().is_none() {
                reasons.push("bundle: no trust bundle from the server yet".to_owned());
            }
            if reasons.is_empty() {
                Ok(())
            } else {
                Err(reasons)
            }
        })
    }
}

/// Starts the telemetry listener on `addr` for `agent` and its Workload
/// API, until `shutdown`; returns the RPC metrics for the Workload API.
pub async fn spawn(
    addr: std::net::SocketAddr,
    agent: &Session,
    api: &WorkloadApi,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<RpcMetrics> {
    use tracing::Instrument;
    let listener = sigil_proto::telemetry::bind(addr).await?;
    let registry = std::sync::Arc::new(agent.metrics().registry());
    let health = std::sync::Arc::new(AgentHealth {
        agent: agent.clone(),
        api: api.clone(),
    });
    tokio::spawn(
        sigil_proto::telemetry::serve(listener, registry, health, shutdown)
            .instrument(tracing::info_span!("telemetry")),
    );
    tracing::info!(address = %addr, "telemetry serving /metrics, /live, /ready");
    Ok(agent.metrics().rpc.clone())
}
