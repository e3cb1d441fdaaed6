//! The server's metrics and readiness (issue 16), served on the
//! `[telemetry] bind` address by [`sigil_proto::telemetry::serve`].
//!
//! Counters are counted where things happen (one call at each site);
//! gauges that describe state (agents, entries, CA expiry, change feed)
//! are sampled at scrape time by [`ServerHealth`]. Every metric is named
//! `sigil_server_…`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use sigil_proto::telemetry::{Health, Readiness, RpcMetrics};

use crate::ca::CaManager;
use crate::ca::journal::SlotState;
use crate::datastore::{Datastore, DatastoreError};
use crate::registry::Registry as EntryRegistry;

/// What kind of SVID an issuance produced.
#[derive(Debug, Clone, Copy)]
pub enum SvidType {
    /// A workload X509-SVID (BatchNewX509Svid).
    X509,
    /// A workload JWT-SVID.
    Jwt,
    /// An agent's own X509-SVID (attestation and renewal).
    Agent,
}

/// How an issuance request ended.
#[derive(Debug, Clone, Copy)]
pub enum Outcome {
    Ok,
    /// The caller is not authorized for the entry.
    Denied,
    /// Signing failed.
    Error,
}

/// The server's metrics. Cheap to count into whether or not telemetry is
/// served.
#[derive(Debug, Default)]
pub struct ServerMetrics {
    issued: Family<[(&'static str, &'static str); 2], Counter>,
    /// RPC durations, recorded by the layer around the gRPC services.
    pub rpc: RpcMetrics,
    sync_streams: Gauge,
    agents: Gauge,
    entries: Gauge,
    ca_expiry: Family<[(&'static str, String); 3], Gauge<f64, AtomicU64>>,
    feed_revision: Gauge,
    feed_lag: Gauge,
    feed_reloads: Gauge,
    ready: Gauge,
    oidc_requests: Family<[(&'static str, &'static str); 2], Counter>,
}

/// An open Sync stream, counted until dropped.
#[derive(Debug)]
pub struct OpenStream(Gauge);

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl ServerMetrics {
    /// A registry (`sigil_server_` prefix) holding every metric.
    pub fn registry(&self) -> Registry {
        let mut r = Registry::with_prefix("sigil_server");
        r.register(
            "svids_issued",
            "SVIDs issued, by type (x509, jwt, agent) and outcome (ok, denied, error)",
            self.issued.clone(),
        );
        self.rpc.register(&mut r);
        r.register(
            "sync_streams",
            "Open agent Sync streams",
            self.sync_streams.clone(),
        );
        r.register("agents", "Attested agents known", self.agents.clone());
        r.register("entries", "Registration entries", self.entries.clone());
        r.register(
            "ca_authority_expiry_seconds",
            "Seconds until each CA authority (X.509 CA certificate, JWT key) expires, by \
             kind, key id and state (prepared, active, retired); negative once expired",
            self.ca_expiry.clone(),
        );
        r.register(
            "change_feed_revision",
            "The datastore's change feed revision (the last change written: entries, agents, \
             join tokens, bundles, CA journals)",
            self.feed_revision.clone(),
        );
        r.register(
            "change_feed_lag_revisions",
            "Revisions of the change feed this server has not applied to its in-memory \
             registry yet (changes written by other replicas, or not caught up)",
            self.feed_lag.clone(),
        );
        r.register(
            "change_feed_full_reloads",
            "Times the in-memory registry reloaded everything because the changes it had \
             not applied yet were pruned from the change feed",
            self.feed_reloads.clone(),
        );
        r.register(
            "ready",
            "1 when /ready answers 200 (datastore reachable, an active CA), else 0",
            self.ready.clone(),
        );
        r.register(
            "oidc_discovery_requests",
            "Requests to the [oidc_discovery] listener, by document (configuration, keys, \
             other) and HTTP status",
            self.oidc_requests.clone(),
        );
        r
    }

    /// Counts one request to the OIDC discovery listener.
    pub fn oidc_request(&self, document: &'static str, status: u16) {
        let status = match status {
            200 => "200",
            404 => "404",
            405 => "405",
            _ => "other",
        };
        self.oidc_requests
            .get_or_create(&[("document", document), ("status", status)])
            .inc();
    }

    /// Counts one issuance.
    pub fn issued(&self, kind: SvidType, outcome: Outcome) {
        let kind = match kind {
            SvidType::X509 => "x509",
            SvidType::Jwt => "jwt",
            SvidType::Agent => "agent",
        };
        let outcome = match outcome {
            Outcome::Ok => "ok",
            Outcome::Denied => "denied",
            Outcome::Error => "error",
        };
        self.issued
            .get_or_create(&[("type", kind), ("outcome", outcome)])
            .inc();
    }

    /// Counts the outcome of a signing call and passes its result on.
    pub fn counted<T, E>(&self, kind: SvidType, result: Result<T, E>) -> Result<T, E> {
        let outcome = if result.is_ok() {
            Outcome::Ok
        } else {
            Outcome::Error
        };
        self.issued(kind, outcome);
        result
    }

    /// Counts an open Sync stream until the returned guard is dropped.
    pub fn sync_stream(&self) -> OpenStream {
        self.sync_streams.inc();
        OpenStream(self.sync_streams.clone())
    }
}

/// How long readiness waits for the datastore.
const DATASTORE_PROBE: Duration = Duration::from_secs(2);

/// Samples the server's state for scrapes and answers `/ready`.
#[derive(Debug)]
pub struct ServerHealth {
    pub metrics: Arc<ServerMetrics>,
    pub store: Arc<dyn Datastore>,
    pub registry: Arc<EntryRegistry>,
    pub ca: Arc<CaManager>,
}

fn secs_until(t: SystemTime, now: SystemTime) -> f64 {
    match t.duration_since(now) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    }
}

fn state_name(s: SlotState) -> &'static str {
    match s {
        SlotState::Prepared => "prepared",
        SlotState::Active => "active",
        SlotState::Retired => "retired",
        SlotState::Tainted => "tainted",
        SlotState::Revoked => "revoked",
    }
}

impl Health for ServerHealth {
    fn refresh(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(async move {
            let m = &self.metrics;
            m.ready.set(i64::from(self.ready().await.is_ok()));
            m.agents.set(self.registry.agent_count() as i64);
            if let Ok(n) = self.store.count_entries().await {
                m.entries.set(n as i64);
            }
            if let Ok(rev) = self.store.current_revision().await {
                m.feed_revision.set(rev as i64);
                m.feed_lag
                    .set(rev.saturating_sub(self.registry.revision()) as i64);
            }
            m.feed_reloads.set(self.registry.full_reloads() as i64);
            let journal = self.ca.journal().await;
            let now = SystemTime::now();
            // Slots come and go with rotation: only current ones are shown.
            m.ca_expiry.clear();
            for s in &journal.x509 {
                m.ca_expiry
                    .get_or_create(&[
                        ("kind", "x509".to_owned()),
                        ("key_id", s.key_id.to_string()),
                        ("state", state_name(s.state).to_owned()),
                    ])
                    .set(secs_until(s.not_after, now));
            }
            for s in &journal.jwt {
                m.ca_expiry
                    .get_or_create(&[
                        ("kind", "jwt".to_owned()),
                        ("key_id", s.key_id.to_string()),
                        ("state", state_name(s.state).to_owned()),
                    ])
                    .set(secs_until(s.not_after, now));
            }
        })
    }

    fn ready(&self) -> Pin<Box<dyn Future<Output = Readiness> + Send + '_>> {
        Box::pin(async move {
            let mut reasons = Vec::new();
            match tokio::time::timeout(DATASTORE_PROBE, self.store.current_revision()).await {
                Ok(Ok(_)) => {}
                // A shared database that is down: this replica still serves
                // agents from its caches (docs/postgres-datastore.md), and
                // so does every other; taking them all out of service
                // would stop that. Mutations say they are unavailable.
                Ok(Err(DatastoreError::Unavailable(e))) => {
                    tracing::debug!(error = %e, "ready while the datastore is unavailable");
                }
                Ok(Err(e)) => reasons.push(format!("datastore: unreachable: {e}")),
                Err(_) => reasons.push(format!("datastore: no answer within {DATASTORE_PROBE:?}")),
            }
            let journal = self.ca.journal().await;
            let now = SystemTime::now();
            let active = |(state, not_after): (SlotState, SystemTime)| {
                state == SlotState::Active && not_after > now
            };
            if !journal
                .x509
                .iter()
                .map(|s| (s.state, s.not_after))
                .any(active)
            {
                reasons.push("ca: no active, unexpired X.509 authority".into());
            }
            if !journal
                .jwt
                .iter()
                .map(|s| (s.state, s.not_after))
                .any(active)
            {
                reasons.push("ca: no active, unexpired JWT key".into());
            }
            // The registry (entries and agents) is loaded before the
            // telemetry listener starts; what can go wrong later is the
            // datastore, checked above.
            if reasons.is_empty() {
                Ok(())
            } else {
                Err(reasons)
            }
        })
    }
}
