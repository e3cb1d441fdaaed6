//! Agent suites: the agent library runs in this process (its Workload API
//! on a real Unix socket, its node API client on real TCP) against the real
//! `sigil-server` binary (`sigil_tests::process::ServerProcess`); the CLI
//! suite runs the `sigil-agent` binary too.
//!
//! One test binary, so the suites link once and run in parallel.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

mod agent_core;
mod cli;
mod failover;
mod interop_python;
mod k8s_psat;
mod oidc_discovery;
mod sds;
mod sds_envoy;
mod workload_api;
mod workload_attestors;
