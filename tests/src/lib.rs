//! End-to-end tooling for Sigil: real `sigil-server` and `sigil-agent`
//! processes in temporary directories, driven the way an operator drives
//! them (config files, the CLIs, signals).
//!
//! The suites in `tests/` use it; so does the benchmark harness.
//!
//! # Layout
//! - [`process`]: locating the built binaries, starting, stopping and
//!   killing server and agent processes (from plain and async tests),
//!   running their CLIs, and the server's admin and node API clients.
//! - [`bench`]: the `sigil-bench` scenarios (issuance, JWT minting,
//!   Workload API latency, revocation fan-out, mass rotation, scale; on
//!   PostgreSQL: writes, propagation across replicas, failover) and their
//!   report table.
//! - [`sim_agent`]: a node agent simulated in this process with the
//!   agent's own node API client (node API tests, benchmarks).
//! - [`postgres`]: `SIGIL_POSTGRES` and its skip rule, fresh databases,
//!   throwaway clusters a test can stop, start and restart.

pub mod bench;
pub mod postgres;
pub mod process;
pub mod sim_agent;
