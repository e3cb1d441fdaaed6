//! The pod binding check: does the pod a token names still exist, with
//! the token's UID, on the token's node? Asked of the Kubernetes API server
//! in production ([`ApiServerPods`]).

use std::path::PathBuf;

use async_trait::async_trait;
use serde_json::Value;

use crate::https::HttpsClient;

/// A pod as the API server sees it now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    /// `metadata.uid`.
    pub uid: String,
    /// `spec.nodeName`, once scheduled.
    pub node_name: Option<String>,
}

/// How the server confirms that the pod a token is bound to still exists
/// with the token's UID.
#[async_trait]
pub trait PodLookup: Send + Sync + std::fmt::Debug {
    /// The pod `namespace/name`, or `None` if there is no such pod.
    async fn pod(&self, namespace: &str, name: &str) -> Result<Option<PodInfo>, String>;
}

/// Whether `s` is a Kubernetes DNS-1123 subdomain (the rule for namespace
/// and pod names), so it can go into a URL path as is.
pub(super) fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
}

/// [`PodLookup`] through the Kubernetes API server:
/// `GET /api/v1/namespaces/{ns}/pods/{name}` with a bearer token (the
/// server's own in-cluster service-account token, re-read on each call
/// because the kubelet rotates it). Needs RBAC `get` on `pods`.
#[derive(Debug)]
pub struct ApiServerPods {
    base_url: String,
    client: HttpsClient,
    token_file: Option<PathBuf>,
}

impl ApiServerPods {
    /// Asks the API server at `base_url` (e.g. `https://kubernetes.default.svc`).
    pub fn new(
        base_url: impl Into<String>,
        client: HttpsClient,
        token_file: Option<PathBuf>,
    ) -> Self {
        Self {
            base_url: base_url.into().trim_end_matches('/').to_owned(),
            client,
            token_file,
        }
    }
}

#[async_trait]
impl PodLookup for ApiServerPods {
    async fn pod(&self, namespace: &str, name: &str) -> Result<Option<PodInfo>, String> {
        if !is_dns_subdomain(namespace) || !is_dns_subdomain(name) {
            return Err("namespace or pod name is not a DNS-1123 name".into());
        }
        let token = match &self.token_file {
            Some(path) => Some(
                tokio::fs::read_to_string(path)
                    .await
                    .map_err(|e| format!("cannot read API token {}: {e}", path.display()))?
                    .trim()
                    .to_owned(),
            ),
            None => None,
        };
        let url = format!(
            "{}/api/v1/namespaces/{namespace}/pods/{name}",
            self.base_url
        );
        let resp = self
            .client
            .get(&url, token.as_deref())
            .await
            .map_err(|e| e.to_string())?;
        match resp.status {
            404 => Ok(None),
            200 => {
                let pod: Value = serde_json::from_slice(&resp.body)
                    .map_err(|e| format!("API server pod is not JSON: {e}"))?;
                let uid = pod
                    .pointer("/metadata/uid")
                    .and_then(Value::as_str)
                    .ok_or("API server pod has no metadata.uid")?
                    .to_owned();
                let node_name = pod
                    .pointer("/spec/nodeName")
                    .and_then(Value::as_str)
                    .map(str::to_owned);
                Ok(Some(PodInfo { uid, node_name }))
            }
            401 | 403 => Err(format!(
                "API server refused the pod lookup (HTTP {}); grant the server's service account get on pods",
                resp.status
            )),
            other => Err(format!("API server answered HTTP {other}")),
        }
    }
}
