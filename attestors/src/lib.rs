//! Sigil's built-in attestors, server and agent halves side by side.
//!
//! # Layout
//! - [`join_token`]: single-use join tokens (node attestation).
//! - [`x509pop`]: X.509 certificate with proof of possession of its key
//!   (node attestation).
//! - [`k8s_psat`]: Kubernetes projected service-account tokens (node
//!   attestation).
//! - [`unix`]: uid, gid, groups, executable path and hash of a local process
//!   (workload attestation).
//! - [`k8s`]: pod and container of a local process, from its cgroups and the
//!   kubelet (workload attestation).
//! - [`workload`]: the workload attestor trait.
//! - [`https`]: the HTTPS GET client the Kubernetes attestors share.

#![forbid(unsafe_code)]

pub mod https;
pub mod join_token;
pub mod k8s;
pub mod k8s_psat;
pub mod unix;
pub mod workload;
pub mod x509pop;

/// Lowercase hex SHA-256 of `bytes`.
pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    sigil_identity::random::hex(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}
