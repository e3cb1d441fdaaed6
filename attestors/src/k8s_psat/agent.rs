//! The agent half: presents the pod's projected service-account token.

use std::path::PathBuf;

use sigil_identity::attestation::{AgentNodeAttestor, AttestError};

use super::{Evidence, NAME};

/// Agent half: sends the projected token, read fresh from its file each
/// time (the kubelet rotates it), and the cluster name.
#[derive(Debug, Clone)]
pub struct K8sPsatAgent {
    cluster: String,
    token_path: PathBuf,
}

/// Where the agent's projected token is mounted by default.
pub const DEFAULT_TOKEN_PATH: &str = "/var/run/secrets/tokens/sigil-agent";

impl K8sPsatAgent {
    /// Presents the token at `token_path` for `cluster`.
    pub fn new(cluster: impl Into<String>, token_path: impl Into<PathBuf>) -> Self {
        Self {
            cluster: cluster.into(),
            token_path: token_path.into(),
        }
    }
}

impl AgentNodeAttestor for K8sPsatAgent {
    fn name(&self) -> &'static str {
        NAME
    }

    fn evidence(&self) -> Result<Vec<u8>, AttestError> {
        let token = std::fs::read_to_string(&self.token_path).map_err(|e| {
            AttestError::Internal(format!(
                "cannot read the projected service-account token {}: {e} (is the projected volume mounted?)",
                self.token_path.display()
            ))
        })?;
        serde_json::to_vec(&Evidence {
            cluster: self.cluster.clone(),
            token: token.trim().to_owned(),
        })
        .map_err(|e| AttestError::Internal(e.to_string()))
    }

    fn respond(&self, _challenge: &[u8]) -> Result<Vec<u8>, AttestError> {
        Err(AttestError::Malformed(
            "k8s_psat attestation has no challenges",
        ))
    }
}
