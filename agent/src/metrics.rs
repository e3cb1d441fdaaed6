//! The agent's metrics (issue 16): counters and the attestation histogram,
//! counted where things happen (one call at each site), and the gauges
//! [`crate::telemetry`] samples at scrape time. Every metric is named
//! `sigil_agent_…`.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use sigil_proto::telemetry::RpcMetrics;

/// What an SVID rotation renewed.
#[derive(Debug, Clone, Copy)]
pub enum Rotated {
    /// Workload X509-SVIDs.
    Workload,
    /// The agent's own SVID.
    Agent,
}

pub(crate) type Labels = [(&'static str, &'static str); 1];

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
    server: Family<[(&'static str, String); 1], Gauge>,
    failovers: Counter,
    // Sampled at scrape time by `crate::telemetry::AgentHealth`.
    pub(crate) connections: Gauge,
    pub(crate) streams: Gauge,
    pub(crate) cached: Gauge,
    pub(crate) expiry: Family<Labels, Gauge<f64, AtomicU64>>,
    pub(crate) revision: Gauge,
    pub(crate) ready: Gauge,
    tainted: Family<Labels, Counter>,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        Self {
            rpc: RpcMetrics::default(),
            rotations: Family::default(),
            attestation: Family::new_with_constructor(attestation_histogram),
            server_connected: Gauge::default(),
            server: Family::default(),
            failovers: Counter::default(),
            connections: Gauge::default(),
            streams: Gauge::default(),
            cached: Gauge::default(),
            expiry: Family::default(),
            revision: Gauge::default(),
            ready: Gauge::default(),
            tainted: Family::default(),
        }
    }
}

impl AgentMetrics {
    /// A registry (`sigil_agent_` prefix) holding every metric.
    /// `n` SVIDs of `kind` (`x509`, `jwt`) found signed by a tainted authority.
    pub fn tainted(&self, kind: &'static str, n: usize) {
        self.tainted
            .get_or_create(&[("type", kind)])
            .inc_by(n as u64);
    }

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
            "server",
            "1 for the server address the agent last connected to (of those in server_address)",
            self.server.clone(),
        );
        r.register(
            "server_failovers",
            "Connections made to another server than the one in use before (failovers)",
            self.failovers.clone(),
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
        r.register(
            "tainted_svids",
            "SVIDs replaced because a tainted authority signed them, by type \
             (x509: X509-SVIDs scheduled for re-issue, agent's own included; \
             jwt: cached JWT-SVIDs dropped)",
            self.tainted.clone(),
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

    /// The agent connected to the server at `address`; `failover` when it
    /// used another one before.
    pub fn connected_to(&self, address: &str, failover: bool) {
        self.server.clear();
        self.server
            .get_or_create(&[("address", address.to_owned())])
            .set(1);
        if failover {
            self.failovers.inc();
        }
    }

    /// Whether the Sync stream is open.
    pub fn server_connected(&self, connected: bool) {
        self.server_connected.set(i64::from(connected));
    }
}
