//! The `k8s` workload attestor: which pod and container a local process
//! belongs to.
//!
//! pid → `/proc/<pid>/cgroup` → pod UID and container ID ([`cgroup`]) →
//! the kubelet's `GET /pods` over HTTPS (certificate verified against the
//! configured CA unless `insecure_skip_kubelet_verify` is set, which is
//! insecure) → the pod and container status. A container that was just
//! started may not be in the kubelet's list yet, so the list is polled a
//! bounded number of times.
//!
//! The list (up to [`crate::https::DEFAULT_MAX_BODY`] of JSON) is kept for
//! [`DEFAULT_POD_LIST_MAX_AGE`] and shared: attestations arriving together
//! wait for one request instead of each making their own (and share its
//! error if it fails; a failure is not kept), and a process whose pod or
//! container is not in the kept list makes it be asked for again (once per
//! poll, shared too). Only the fields read here are kept, and only the
//! latest list.
//!
//! Selectors:
//! `k8s:ns:<namespace>`, `k8s:sa:<service account>`, `k8s:pod-name:<name>`,
//! `k8s:pod-uid:<uid>`, `k8s:pod-label:<key>:<value>`,
//! `k8s:container-name:<name>`, `k8s:container-image:<image>`,
//! `k8s:node-name:<node>`. A process outside any pod, in two pods' or two
//! containers' cgroups, or in no container of its pod gets none.

pub mod cgroup;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;
use sigil_identity::{Selector, SelectorSet};
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::https::HttpsClient;
use crate::workload::{WorkloadAttestError, WorkloadAttestor};
use cgroup::CgroupMatch;

/// The selector type.
pub const NAME: &str = "k8s";
/// The kubelet's authenticated API on the node.
pub const DEFAULT_KUBELET_URL: &str = "https://127.0.0.1:10250";
/// How many times `/pods` is asked before giving up on a new container.
pub const DEFAULT_POLL_ATTEMPTS: u32 = 5;
/// Pause between two asks.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(300);
/// How long a pod list is reused. Short: a list older than this may miss
/// label changes (new pods and restarted containers are not missed, since a
/// miss asks again).
pub const DEFAULT_POD_LIST_MAX_AGE: Duration = Duration::from_secs(2);

/// Settings of the `k8s` workload attestor.
#[derive(Debug, Clone)]
pub struct K8sAttestorConfig {
    /// Base URL of the kubelet, e.g. `https://127.0.0.1:10250`.
    pub kubelet_url: String,
    /// Bearer token file for the kubelet (re-read on each request).
    pub token_file: Option<PathBuf>,
    /// When set, pods must be scheduled on this node.
    pub node_name: Option<String>,
    /// Asks of `/pods` before a container not listed yet is given up on.
    pub poll_attempts: u32,
    /// Pause between asks.
    pub poll_interval: Duration,
    /// Where `/proc` is (tests use fixtures).
    pub proc_root: PathBuf,
    /// How long a fetched pod list answers later attestations.
    pub pod_list_max_age: Duration,
}

impl Default for K8sAttestorConfig {
    fn default() -> Self {
        Self {
            kubelet_url: DEFAULT_KUBELET_URL.into(),
            token_file: None,
            node_name: None,
            poll_attempts: DEFAULT_POLL_ATTEMPTS,
            poll_interval: DEFAULT_POLL_INTERVAL,
            proc_root: PathBuf::from("/proc"),
            pod_list_max_age: DEFAULT_POD_LIST_MAX_AGE,
        }
    }
}

/// The `k8s` workload attestor.
#[derive(Debug)]
pub struct K8sAttestor {
    config: K8sAttestorConfig,
    client: HttpsClient,
    /// The latest pod list. The lock is held across the kubelet request, so
    /// concurrent attestations that need a list make one request between
    /// them (single flight).
    pod_list: tokio::sync::Mutex<PodListSlot>,
}

#[derive(Debug, Default)]
struct PodListSlot {
    kept: Option<CachedPodList>,
    /// When the latest request failed, and why: callers that were waiting
    /// for it share its failure instead of each trying again in turn (which
    /// would add one kubelet timeout per waiting caller).
    failed: Option<(Instant, WorkloadAttestError)>,
}

/// A pod list as fetched, and which fetch it came from.
#[derive(Debug, Clone)]
struct CachedPodList {
    /// Counts fetches; a caller that did not find its pod in list `n` asks
    /// for a list newer than `n`, which one refresh serves to all of them.
    generation: u64,
    fetched_at: Instant,
    pods: Arc<PodList>,
}

// The parts of the kubelet's PodList this attestor reads (field names as
// in the Kubernetes API).
#[derive(Debug, Deserialize)]
struct PodList {
    #[serde(default)]
    items: Vec<Pod>,
}

#[derive(Debug, Deserialize)]
struct Pod {
    metadata: ObjectMeta,
    #[serde(default)]
    spec: PodSpec,
    #[serde(default)]
    status: PodStatus,
}

#[derive(Debug, Deserialize)]
struct ObjectMeta {
    #[serde(default)]
    name: String,
    #[serde(default)]
    namespace: String,
    #[serde(default)]
    uid: String,
    #[serde(default)]
    labels: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodSpec {
    #[serde(default)]
    service_account_name: String,
    #[serde(default)]
    node_name: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodStatus {
    #[serde(default)]
    container_statuses: Vec<ContainerStatus>,
    #[serde(default)]
    init_container_statuses: Vec<ContainerStatus>,
    #[serde(default)]
    ephemeral_container_statuses: Vec<ContainerStatus>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ContainerStatus {
    #[serde(default)]
    name: String,
    #[serde(default)]
    image: String,
    /// `<runtime>://<id>`; absent until the container was created.
    #[serde(default, rename = "containerID")]
    container_id: Option<String>,
}

/// What the lookup in the pod list found.
enum Found {
    Selectors(SelectorSet),
    NotYet,
}

fn selectors(pod: &Pod, container: &ContainerStatus) -> SelectorSet {
    let mut values = vec![
        format!("ns:{}", pod.metadata.namespace),
        format!("sa:{}", pod.spec.service_account_name),
        format!("pod-name:{}", pod.metadata.name),
        format!("pod-uid:{}", pod.metadata.uid),
        format!("container-name:{}", container.name),
        format!("container-image:{}", container.image),
        format!("node-name:{}", pod.spec.node_name),
    ];
    for (k, v) in &pod.metadata.labels {
        values.push(format!("pod-label:{k}:{v}"));
    }
    let mut out = SelectorSet::new();
    for v in values {
        // Empty fields (e.g. no image reported yet) make no selector.
        if v.ends_with(':') {
            continue;
        }
        match Selector::new(NAME, &v) {
            Ok(s) => {
                out.insert(s);
            }
            Err(e) => {
                debug!(attestor = NAME, error = %e, "pod field unfit for a selector; skipped")
            }
        }
    }
    out
}

impl K8sAttestor {
    /// An attestor asking the kubelet through `client` (which holds the
    /// trust setting for the kubelet's certificate).
    pub fn new(config: K8sAttestorConfig, client: HttpsClient) -> Self {
        Self {
            config,
            client,
            pod_list: tokio::sync::Mutex::default(),
        }
    }

    /// The kept pod list if it is young enough and newer than generation
    /// `newer_than`; otherwise a list fetched now (and kept).
    async fn pod_list(
        &self,
        newer_than: Option<u64>,
    ) -> Result<CachedPodList, WorkloadAttestError> {
        let asked_at = Instant::now();
        let mut slot = self.pod_list.lock().await;
        if let Some(kept) = &slot.kept
            && kept.fetched_at.elapsed() < self.config.pod_list_max_age
            && newer_than.is_none_or(|g| kept.generation > g)
        {
            return Ok(kept.clone());
        }
        if let Some((failed_at, e)) = &slot.failed
            && *failed_at >= asked_at
        {
            return Err(e.clone());
        }
        let fetched_at = Instant::now();
        match self.pods().await {
            Ok(pods) => {
                let fresh = CachedPodList {
                    generation: slot.kept.as_ref().map_or(1, |k| k.generation + 1),
                    fetched_at,
                    pods: Arc::new(pods),
                };
                slot.kept = Some(fresh.clone());
                slot.failed = None;
                Ok(fresh)
            }
            Err(e) => {
                slot.failed = Some((Instant::now(), e.clone()));
                Err(e)
            }
        }
    }

    fn find(&self, list: &PodList, pod_uid: &str, container_id: &str) -> Found {
        let Some(pod) = list.items.iter().find(|p| p.metadata.uid == pod_uid) else {
            return Found::NotYet;
        };
        if let Some(node) = &self.config.node_name
            && pod.spec.node_name != *node
        {
            warn!(
                attestor = NAME,
                pod_uid, "pod is listed for another node; no k8s selectors"
            );
            return Found::Selectors(SelectorSet::new());
        }
        let container = pod
            .status
            .container_statuses
            .iter()
            .chain(&pod.status.init_container_statuses)
            .chain(&pod.status.ephemeral_container_statuses)
            .find(|c| {
                c.container_id
                    .as_deref()
                    .and_then(|id| id.split_once("://"))
                    .is_some_and(|(_, id)| id == container_id)
            });
        match container {
            Some(c) => Found::Selectors(selectors(pod, c)),
            None => Found::NotYet,
        }
    }

    async fn pods(&self) -> Result<PodList, WorkloadAttestError> {
        let unavailable = |reason: String| WorkloadAttestError::Unavailable {
            attestor: NAME,
            reason,
        };
        let token = match &self.config.token_file {
            Some(p) => Some(
                tokio::fs::read_to_string(p)
                    .await
                    .map_err(|e| {
                        unavailable(format!("cannot read kubelet token {}: {e}", p.display()))
                    })?
                    .trim()
                    .to_owned(),
            ),
            None => None,
        };
        let url = format!("{}/pods", self.config.kubelet_url.trim_end_matches('/'));
        let resp = self
            .client
            .get(&url, token.as_deref())
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        if resp.status != 200 {
            return Err(unavailable(format!(
                "kubelet answered HTTP {} for /pods (the agent's service account needs get on nodes/pods, or on nodes/proxy where the kubelet lacks fine-grained authorization: see deploy/k8s/README.md)",
                resp.status
            )));
        }
        serde_json::from_slice(&resp.body)
            .map_err(|e| unavailable(format!("kubelet /pods is not a PodList: {e}")))
    }
}

#[async_trait]
impl WorkloadAttestor for K8sAttestor {
    fn name(&self) -> &'static str {
        NAME
    }

    async fn attest(&self, pid: i32) -> Result<SelectorSet, WorkloadAttestError> {
        let path = self.config.proc_root.join(pid.to_string()).join("cgroup");
        let text = tokio::fs::read_to_string(&path).await.map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                WorkloadAttestError::Gone(pid)
            } else {
                WorkloadAttestError::Unavailable {
                    attestor: NAME,
                    reason: format!("cannot read {}: {e}", path.display()),
                }
            }
        })?;
        let (pod_uid, container_id) = match cgroup::parse(&text) {
            CgroupMatch::Container {
                pod_uid,
                container_id,
            } => (pod_uid, container_id),
            CgroupMatch::NotInPod => return Ok(SelectorSet::new()),
            CgroupMatch::PodOnly { pod_uid } => {
                debug!(
                    attestor = NAME,
                    pid, pod_uid, "process is in no container of its pod"
                );
                return Ok(SelectorSet::new());
            }
            CgroupMatch::Ambiguous(why) => {
                warn!(attestor = NAME, pid, reason = why, "no k8s selectors");
                return Ok(SelectorSet::new());
            }
        };
        let attempts = self.config.poll_attempts.max(1);
        let started = Instant::now();
        let mut seen: Option<u64> = None;
        let mut polls = 0;
        while polls < attempts {
            let list = self.pod_list(seen).await?;
            if let Found::Selectors(s) = self.find(&list.pods, &pod_uid, &container_id) {
                return Ok(s);
            }
            seen = Some(list.generation);
            // A list kept from before this attestation is not a poll: the
            // next one is asked for at once.
            if list.fetched_at >= started {
                polls += 1;
                if polls < attempts {
                    tokio::time::sleep(self.config.poll_interval).await;
                }
            }
        }
        warn!(
            attestor = NAME,
            pid,
            pod_uid,
            container_id,
            attempts,
            "the kubelet does not list the process's container; no k8s selectors"
        );
        Ok(SelectorSet::new())
    }
}

#[cfg(test)]
mod tests;
