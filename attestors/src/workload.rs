//! The workload attestor trait: pid → selectors.
//!
//! The agent always runs the `unix` attestor (which also guards against pid
//! reuse, see [`crate::unix`]) and then every configured attestor of this
//! trait, and merges the selectors. An attestor that finds nothing it
//! knows about the process (e.g. `k8s` for a process outside any pod)
//! returns an empty set, not an error.

use async_trait::async_trait;
use sigil_identity::SelectorSet;

/// Why a workload attestor could not decide.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WorkloadAttestError {
    /// The process is gone.
    #[error("process {0} is gone")]
    Gone(i32),
    /// A source the attestor needs (e.g. the kubelet) failed.
    #[error("{attestor} workload attestor: {reason}")]
    Unavailable {
        attestor: &'static str,
        reason: String,
    },
}

/// A workload attestor.
#[async_trait]
pub trait WorkloadAttestor: Send + Sync + std::fmt::Debug {
    /// The selector type it produces, e.g. `k8s`.
    fn name(&self) -> &'static str;
    /// Selectors for process `pid` (empty when it knows nothing of it).
    async fn attest(&self, pid: i32) -> Result<SelectorSet, WorkloadAttestError>;
}
