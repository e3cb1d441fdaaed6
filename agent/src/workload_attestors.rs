//! The workload attestors the agent runs besides `unix`, built from
//! `[workload_attestors]` in its configuration.

use std::sync::Arc;
use std::time::Duration;

use sigil_attestors::https::{HttpsClient, Trust};
use sigil_attestors::k8s::{K8sAttestor, K8sAttestorConfig};
use sigil_attestors::workload::WorkloadAttestor;
use tracing::warn;

use crate::config::{AgentConfig, ConfigError};

/// Builds every configured workload attestor (none when only `unix` runs).
pub fn from_config(config: &AgentConfig) -> Result<Vec<Arc<dyn WorkloadAttestor>>, ConfigError> {
    let mut out: Vec<Arc<dyn WorkloadAttestor>> = Vec::new();
    if let Some(k) = &config.workload_attestors.k8s {
        let trust = match &k.kubelet_ca_path {
            Some(path) => Trust::from_pem_file(path)
                .map_err(|e| ConfigError::Invalid(format!("workload_attestors.k8s: {e}")))?,
            None => {
                warn!(
                    attestor = sigil_attestors::k8s::NAME,
                    "insecure_skip_kubelet_verify: the kubelet's certificate is not verified"
                );
                Trust::InsecureSkipVerify
            }
        };
        let client = HttpsClient::new(trust)
            .map_err(|e| ConfigError::Invalid(format!("workload_attestors.k8s: {e}")))?
            .with_timeout(Duration::from_secs(2));
        let attestor = K8sAttestor::new(
            K8sAttestorConfig {
                kubelet_url: k.kubelet_url.clone(),
                token_file: Some(k.token_path.clone()),
                node_name: k.node_name.clone(),
                poll_attempts: k.max_poll_attempts,
                ..K8sAttestorConfig::default()
            },
            client,
        );
        out.push(Arc::new(attestor));
    }
    Ok(out)
}
