//! The Sigil node agent: attests its node to the server, keeps the Sync
//! stream, rotates SVIDs and serves the SPIFFE Workload API on a Unix
//! socket.
//!
//! # Layout
//! - [`config`]: the agent's TOML configuration.
//! - [`cli`]: the `sigil-agent` command line (`run`, `api …`, `healthcheck`).
//! - [`store`]: the agent key, SVID and bundle on disk (restart without
//!   re-attestation).
//! - [`node`]: attestation and authenticated node API connections.
//! - [`cache`]: entries from the Sync stream and the SVIDs held for them.
//! - [`manager`]: the main loop: sync, issuance and rotation, renewal.
//! - [`workload_api`]: the SPIFFE Workload API on a Unix socket.
//! - [`workload_attestors`]: the workload attestors run besides `unix`
//!   (`k8s`), from the configuration.
//! - [`peer_pidfd`]: the connecting process of a socket, by `SO_PEERPIDFD`.
//! - [`telemetry`]: metrics and readiness for the `[telemetry]` listener.
//! - [`authority`]: rewrites `:authority` values h2 would refuse, for gRPC
//!   C-core and grpc-java clients on Unix sockets.

// Denied, not forbidden: `peer_pidfd` allows it for one getsockopt call.
#![deny(unsafe_code)]

pub mod authority;
pub mod cache;
pub mod cli;
pub mod config;
pub mod manager;
pub mod node;
pub mod peer_pidfd;
pub mod store;
pub mod telemetry;
pub mod workload_api;
pub mod workload_attestors;
