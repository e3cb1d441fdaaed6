//! End-to-end suites: the real `sigil-server` and `sigil-agent` binaries in
//! temporary directories, driven through their config files, CLIs and
//! signals, with workloads using the `spiffe` crate's client.
//!
//! All suites live in this one test binary so that cargo runs them in
//! parallel (the rotation and outage suites spend most of their time
//! waiting on real clocks).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

mod authority;
mod cli_output;
mod crash;
mod disk_full;
mod federation;
mod file_hygiene;
mod ha;
mod mtls;
mod node_connection;
mod outage;
mod postgres_outage;
mod quickstart;
mod regcode;
mod register;
mod remote_admin;
mod revocation;
mod rotation;
mod x509_revoke;
