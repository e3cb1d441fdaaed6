//! Node attestation plugin traits, shared by the server and agent halves of
//! every node attestor.
//!
//! The server half receives the agent's evidence and may send challenges
//! (through a [`Challenger`]) before it decides. A verdict names the agent's
//! SPIFFE ID and its node selectors; failures say little to the caller (the
//! attestor logs the detail) so that probing learns nothing.

use std::fmt;

use async_trait::async_trait;

use crate::selector::SelectorSet;
use crate::spiffe_id::AgentId;

/// Why attestation failed. The `Display` text goes to the agent; keep it
/// short. The detail is logged by the attestor.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AttestError {
    /// The evidence was not acceptable.
    #[error("attestation failed: {0}")]
    Rejected(&'static str),
    /// The evidence could not even be read.
    #[error("malformed attestation evidence: {0}")]
    Malformed(&'static str),
    /// The challenge exchange broke off.
    #[error("challenge exchange failed")]
    Challenge,
    /// Something on the server side failed (storage, configuration).
    #[error("attestation could not be completed: {0}")]
    Internal(String),
}

/// What a successful attestation establishes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attestation {
    /// `spiffe://<td>/sigil/agent/<attestor>/...`.
    pub agent_id: AgentId,
    /// Facts about the node, used to match node alias entries.
    pub selectors: SelectorSet,
    /// Whether the same node may attest again later (and so replace its
    /// record) without operator action.
    pub can_reattest: bool,
}

/// The server's side of a challenge exchange.
#[async_trait]
pub trait Challenger: Send {
    /// Sends `challenge` to the agent and returns its response.
    async fn challenge(&mut self, challenge: Vec<u8>) -> Result<Vec<u8>, AttestError>;
}

/// Server half of a node attestor.
#[async_trait]
pub trait ServerNodeAttestor: Send + Sync + fmt::Debug {
    /// The name agents ask for, e.g. `join_token`.
    fn name(&self) -> &'static str;
    /// Verifies `evidence`, possibly after challenges, and yields the agent.
    async fn attest(
        &self,
        evidence: &[u8],
        challenger: &mut dyn Challenger,
    ) -> Result<Attestation, AttestError>;
}

/// Agent half of a node attestor.
pub trait AgentNodeAttestor: Send + Sync + fmt::Debug {
    /// The attestor name, matching the server half.
    fn name(&self) -> &'static str;
    /// The evidence to send first.
    fn evidence(&self) -> Result<Vec<u8>, AttestError>;
    /// The answer to a server challenge.
    fn respond(&self, challenge: &[u8]) -> Result<Vec<u8>, AttestError>;
}
