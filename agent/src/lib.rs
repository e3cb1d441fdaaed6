//! The Sigil node agent: attests its node to the server, keeps the Sync
//! stream, rotates SVIDs and serves the SPIFFE Workload API on a Unix
//! socket.
//!
//! Not built yet: this crate holds the place the workspace layout gives it
//! (DESIGN.md); the agent is the subject of its own issue.
//!
//! # Layout
//! (none yet)

#![forbid(unsafe_code)]
