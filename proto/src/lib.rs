//! Sigil's wire protocols: generated protobuf/gRPC code and the
//! conversions between wire messages and `sigil-identity` domain types.
//!
//! # Layout
//! - [`workload`]: the SPIFFE Workload API, wire-exact (no `package`, so
//!   methods are `/SpiffeWorkloadAPI/...`).
//! - [`node`]: `sigil.node.v1`, agent ↔ server.
//! - [`admin`]: `sigil.admin.v1`, CLI ↔ server.
//! - [`convert`]: proto ↔ domain conversions, the only place that maps
//!   between the two.

#![forbid(unsafe_code)]

/// The SPIFFE Workload API.
#[allow(
    missing_docs,
    clippy::all,
    clippy::pedantic,
    missing_debug_implementations
)]
pub mod workload {
    include!(concat!(env!("OUT_DIR"), "/_.rs"));
}

/// The node API between agents and the server.
#[allow(
    missing_docs,
    clippy::all,
    clippy::pedantic,
    missing_debug_implementations
)]
pub mod node {
    include!(concat!(env!("OUT_DIR"), "/sigil.node.v1.rs"));
}

/// The admin API of the server.
#[allow(
    missing_docs,
    clippy::all,
    clippy::pedantic,
    missing_debug_implementations
)]
pub mod admin {
    include!(concat!(env!("OUT_DIR"), "/sigil.admin.v1.rs"));
}

pub mod convert;
