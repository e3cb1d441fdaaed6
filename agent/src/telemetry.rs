//! The agent's metrics and readiness (issue 16), served on the
//! `[telemetry] bind` address by [`sigil_proto::telemetry::serve`].
//!
//! Counters and the attestation histogram are counted where things happen
//! (one call at each site); state (connections, cached SVIDs, expiry,
//! sync revision) is sampled at scrape time by [`AgentHealth`]. Every
//! metric is named `sigil_agent_…`.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use sigil_proto::telemetry::{Health, Readiness, RpcMetrics};

use crate::session::Session;
use crate::workload_api::WorkloadApi;

/// What an SVID rotation renewed.
#[derive(Debug, Clone, Copy)]
pub enum Rotated {
    /// Workload X509-SVIDs.
    Workload,
    /// The agent's own SVID.
    Agent,
}

type Labels = [(&'static str, &'static str); 1];

fn attestation_histogram() -> Histogram {
    // 10 ms to about 160 s.
    Histogram::new(exponential_buckets(0.01, 2.0, 15))
}

/// The agent's metrics.
#[derive(Debug)]
pub struct AgentMetrics {
    /// Workload API call durations, recorded by the layer around it.
    pub rpc: RpcMetrics,
    rotations: Family<Labels, Counter>,
    attestation: Family<Labels, Histogram, fn() -> Histogram>,
    server_connected: Gauge,
    connections: Gauge,
    streams: Gauge,
    cached: Gauge,
    expiry: Family<Labels, Gauge<f64, AtomicU64>>,
    revision: Gauge,
    ready: Gauge,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        Self {
            rpc: RpcMetrics::default(),
            rotations: Family::default(),
            attestation: Family::new_with_constructor(attestation_histogram),
            server_connected: Gauge::default(),
            connections: Gauge::default(),
            streams: Gauge::default(),
            cached: Gauge::default(),
            expiry: Family::default(),
            revision: Gauge::default(),
            ready: Gauge::default(),
        }
    }
}

impl AgentMetrics {
    /// A registry (`sigil_agent_` prefix) holding every metric.
    pub fn registry(&self) -> Registry {
        let mut r = Registry::with_prefix("sigil_agent");
        self.rpc.register(&mut r);
        r.register(
            "svid_rotations",
            "SVIDs renewed, by type (workload: X509-SVIDs stored; agent: its own SVID)",
            self.rotations.clone(),
        );
        r.register(
            "attestation_duration_seconds",
            "Node attestation duration, by outcome (ok, error)",
            self.attestation.clone(),
        );
        r.register(
            "server_connected",
            "1 while the Sync stream to the server is open, else 0",
            self.server_connected.clone(),
        );
        r.register(
            "workload_api_connections",
            "Open Workload API connections",
            self.connections.clone(),
        );
        r.register(
            "workload_api_streams",
            "Open Workload API streams (X.509, JWT bundle watches)",
            self.streams.clone(),
        );
        r.register(
            "svids_cached",
            "Workload X509-SVIDs held",
            self.cached.clone(),
        );
        r.register(
            "svid_expiry_seconds",
            "Seconds until the soonest SVID expiry, by type (agent: its own SVID; \
             workload: the soonest of the cached X509-SVIDs); negative once expired",
            self.expiry.clone(),
        );
        r.register(
            "sync_revision",
            "The server change feed revision this agent has applied (compare with \
             sigil_server_change_feed_revision for its lag)",
            self.revision.clone(),
        );
        r.register(
            "ready",
            "1 when /ready answers 200 (attested, bundle held, not revoked), else 0",
            self.ready.clone(),
        );
        r
    }

    /// Counts `n` renewed SVIDs.
    pub fn rotated(&self, what: Rotated, n: usize) {
        let what = match what {
            Rotated::Workload => "workload",
            Rotated::Agent => "agent",
        };
        self.rotations
            .get_or_create(&[("type", what)])
            .inc_by(n as u64);
    }

    /// Records one attestation of `took`, and passes its result on.
    pub fn attested<T, E>(&self, took: Duration, result: Result<T, E>) -> Result<T, E> {
        let outcome = if result.is_ok() { "ok" } else { "error" };
        self.attestation
            .get_or_create(&[("outcome", outcome)])
            .observe(took.as_secs_f64());
        result
    }

    /// Whether the Sync stream is open.
    pub fn server_connected(&self, connected: bool) {
        self.server_connected.set(i64::from(connected));
    }
}

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
