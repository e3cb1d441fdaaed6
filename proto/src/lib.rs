//! Sigil's wire protocols: generated protobuf/gRPC code and the
//! conversions between wire messages and `sigil-identity` domain types;
//! and what the server and the agent share beyond the wire (channels,
//! sockets, CLI output, process edges).
//!
//! # Layout
//! - [`workload`]: the SPIFFE Workload API, wire-exact (no `package`, so
//!   methods are `/SpiffeWorkloadAPI/...`).
//! - [`node`]: `sigil.node.v1`, agent ↔ server.
//! - [`admin`]: `sigil.admin.v1`, CLI ↔ server.
//! - [`grpc::health::v1`]: the standard gRPC health service.
//! - [`convert`]: proto ↔ domain conversions, the only place that maps
//!   between the two.
//! - [`channel`]: client channels (node API over SPIFFE mTLS, Unix sockets).
//! - [`socket`]: binding the Unix sockets of the local APIs safely.
//! - [`output`]: `--output text|json` and the JSON style of both CLIs.
//! - [`telemetry`]: the `/metrics` `/live` `/ready` listener and the RPC
//!   layer (request ids, spans, durations) shared by server and agent.
//! - [`process`]: what a Sigil process does at its edges: stop signals,
//!   the `[log]` section and installing logging.

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

/// Generated code, nested as the protobuf packages are (`sigil.node.v1`,
/// `sigil.admin.v1`) so cross-package references resolve.
#[allow(
    missing_docs,
    clippy::all,
    clippy::pedantic,
    missing_debug_implementations
)]
pub mod sigil {
    pub mod node {
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/sigil.node.v1.rs"));
        }
    }
    pub mod admin {
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/sigil.admin.v1.rs"));
        }
    }
}

/// The standard gRPC health checking protocol.
#[allow(
    missing_docs,
    clippy::all,
    clippy::pedantic,
    missing_debug_implementations
)]
pub mod grpc {
    pub mod health {
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/grpc.health.v1.rs"));
        }
    }
}

/// The node API between agents and the server.
pub use sigil::node::v1 as node;

/// gRPC metadata key the server sets on a PermissionDenied that revokes
/// the calling agent (banned, or evicted and so unknown). Other
/// PermissionDenied replies (an SVID superseded by a renewal, or expired)
/// are not revocations: the agent reconnects or renews.
pub const REVOKED_METADATA: &str = "sigil-revoked";

/// The admin API of the server.
pub use sigil::admin::v1 as admin;

pub mod channel;
pub mod convert;
pub mod output;
pub mod process;
pub mod socket;
pub mod telemetry;
