//! End-to-end suites that start the real `sigil-server` and `sigil-agent`
//! binaries in temporary directories, and the `sigil-bench` harness.
//!
//! Not built yet: the server's own integration tests live in
//! `ca-server/tests/` until the agent exists; the cross-binary suites and
//! the benchmark harness are the subject of their own issues.
//!
//! # Layout
//! (none yet)

#![forbid(unsafe_code)]
