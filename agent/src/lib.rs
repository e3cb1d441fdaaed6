//! The Sigil node agent: attests its node to the server, keeps the Sync
//! stream, rotates SVIDs and serves the SPIFFE Workload API on a Unix
//! socket.
//!
//! # Layout
//! - [`run()`]: builds every part from an [`config::AgentConfig`] and runs
//!   the agent until shutdown (what `sigil-agent run` and the quickstart
//!   call).
//! - [`config`]: the agent's TOML configuration.
//! - [`store`]: the agent key, SVID and bundle on disk (restart without
//!   re-attestation).
//! - [`servers`]: which server to dial (one address, a list, or a name
//!   resolving to several), and moving to another when one goes away.
//! - [`node`]: attestation and authenticated node API connections.
//! - [`cache`]: entries from the Sync stream and the SVIDs held for them.
//! - [`crl`]: the trust domain's CRLs from the server, parsed for the
//!   Workload API, SDS and re-issuing revoked SVIDs.
//! - [`session`]: the agent's session with the server: its own SVID, the
//!   Sync stream, issuance and rotation, renewal.
//! - [`taint`]: what the session does when authorities are tainted (paced
//!   re-issue, own SVID renewal, JWT-SVID cache drop).
//! - [`workload_api`]: the SPIFFE Workload API on a Unix socket
//!   (connections, callers, streams, health, Envoy SDS on the same socket,
//!   and the HTTP/2 `:authority` rewriter for gRPC C-core and grpc-java
//!   clients).
//! - [`workload_client`]: calling it as a workload does (the CLI,
//!   quickstart).
//! - [`workload_attestors`]: the workload attestors run besides `unix`
//!   (`k8s`), from the configuration.
//! - [`peer_pidfd`]: the connecting process of a socket, by `SO_PEERPIDFD`.
//! - [`metrics`]: the agent's Prometheus metrics, counted where things happen.
//! - [`telemetry`]: readiness and the `[telemetry]` listener.

// Denied, not forbidden: `peer_pidfd` allows it for one getsockopt call.
#![deny(unsafe_code)]

pub mod cache;
pub mod config;
pub mod crl;
pub mod metrics;
pub mod node;
pub mod peer_pidfd;
mod run;
pub mod servers;
pub mod session;
pub mod store;
pub mod taint;
pub mod telemetry;
pub mod workload_api;
pub mod workload_attestors;
pub mod workload_client;

pub use run::{run, shutdown_signal};
