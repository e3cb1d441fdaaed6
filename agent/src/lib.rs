//! The Sigil node agent: attests its node to the server, keeps the Sync
//! stream, rotates SVIDs and serves the SPIFFE Workload API on a Unix
//! socket.
//!
//! Being built: so far this crate holds the piece that lets gRPC C-core
//! and grpc-java clients reach an h2-based server on a Unix socket; the
//! rest of the agent is the subject of its own issue.
//!
//! # Layout
//! - [`authority`]: rewrites `:authority` values h2 would refuse.

#![forbid(unsafe_code)]

pub mod authority;
