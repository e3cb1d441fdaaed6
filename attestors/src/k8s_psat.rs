//! Kubernetes projected service-account token (PSAT) node attestation.
//!
//! The agent runs in a pod (a DaemonSet) with a projected service-account
//! token whose audience is the server's. It sends that token and the name
//! of its cluster. The server checks, for the named cluster only:
//!
//! - the signature, against that cluster's service-account issuer keys
//!   (a JWKS from a file, or from the issuer's OIDC discovery document),
//!   cached, refreshed periodically and re-fetched (rate-limited) when a
//!   token names an unknown `kid`; keys of one cluster never verify tokens
//!   for another;
//! - the compact-JWS rules of [`sigil_identity::jws`] (no duplicate
//!   members, header of `alg`, `kid` and optional `typ` JWT/JOSE only,
//!   integer time claims), with `alg` one of RS256/384/512 or ES256/384 (what
//!   the API server signs with; `none`, HMAC and PS* are refused);
//! - `iss` is the cluster's issuer, `aud` contains the configured audience
//!   (default `sigil-server`), `exp` is present (legacy non-expiring secret
//!   tokens are refused) and not past, `nbf` not in the future;
//! - the pod binding: the `kubernetes.io` claim names the pod, its service
//!   account and its node (name and UID; Kubernetes 1.30 or later puts the
//!   node in projected tokens), and the pod still exists with that UID
//!   (asked through [`PodLookup`]: in production the API server, see
//!   [`ApiServerPods`]; a deleted and re-created pod has another UID);
//! - optionally, the service account is in an allow-list.
//!
//! The agent's ID is `spiffe://<td>/sigil/agent/k8s_psat/<cluster>/<node-uid>`
//! and the same node may attest again (its token is renewed by the kubelet).
//! Names taken from the token that are not valid in a SPIFFE ID are refused,
//! never cleaned. Tokens are never logged.
//!
//! Modules: `keys` (issuer keys: sources and cache), `pods` (the pod
//! lookup), `agent` (the agent half); the server half is here.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sigil_identity::attestation::{AttestError, Attestation, Challenger, ServerNodeAttestor};
use sigil_identity::clock::Clock;
use sigil_identity::jws::{self, Alg, JwsError};
use sigil_identity::{AgentId, Selector, SelectorSet, TrustDomain};
use tracing::warn;

mod agent;
mod keys;
mod pods;

pub use agent::{DEFAULT_TOKEN_PATH, K8sPsatAgent};
use keys::KeyCache;
pub use keys::KeySource;
pub use pods::{ApiServerPods, PodInfo, PodLookup};

/// The attestor name on the wire, and the selector type.
pub const NAME: &str = "k8s_psat";
/// The audience tokens must carry unless configured otherwise.
pub const DEFAULT_AUDIENCE: &str = "sigil-server";
/// Largest evidence accepted, in bytes.
pub const MAX_EVIDENCE_LEN: usize = 64 * 1024;
/// Clock skew tolerated on `exp`, `nbf` and `iat` (the JWS core's).
pub const LEEWAY: Duration = jws::LEEWAY;
/// The algorithms Kubernetes service-account issuers sign with (RSA or
/// ECDSA keys; ring verifies no P-521).
pub const ALGS: &[Alg] = &[Alg::RS256, Alg::RS384, Alg::RS512, Alg::ES256, Alg::ES384];
/// How often issuer keys are re-read by default.
pub const DEFAULT_JWKS_REFRESH: Duration = Duration::from_secs(300);
/// Least time between two key fetches caused by unknown `kid`s, so that
/// tokens with made-up key IDs cannot make the server hammer the issuer.
pub const DEFAULT_JWKS_MIN_REFETCH: Duration = Duration::from_secs(10);

/// What the agent sends.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Evidence {
    cluster: String,
    token: String,
}

/// Why a token was refused. The detail is logged on the server; the agent
/// is told only that attestation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PsatError {
    #[error("evidence is not a k8s_psat object {{\"cluster\", \"token\"}}")]
    BadEvidence,
    #[error("no cluster named {0:?} is configured on this server")]
    UnknownCluster(String),
    /// The compact-JWS rules (structure, header, algorithm, signature,
    /// time claims) refused the token.
    #[error("token: {0}")]
    Jws(#[from] JwsError),
    #[error("no key {kid:?} in the issuer keys of cluster {cluster:?}")]
    UnknownKid { kid: String, cluster: String },
    #[error("token issuer {0:?} is not the cluster's issuer")]
    WrongIssuer(String),
    #[error("token audience does not include {0:?}")]
    WrongAudience(String),
    #[error(
        "token has no exp: legacy non-expiring service-account tokens are refused; mount a projected token"
    )]
    NoExpiry,
    #[error(
        "token has no pod binding (kubernetes.io.{0}); only projected tokens of a pod are accepted"
    )]
    NoPodBinding(&'static str),
    #[error(
        "token has no kubernetes.io.node.uid claim; it needs Kubernetes 1.30 or later (node info in projected tokens)"
    )]
    NoNodeUid,
    #[error("service account {0} is not in the cluster's allow-list")]
    ServiceAccountNotAllowed(String),
    #[error("pod {0} no longer exists")]
    PodGone(String),
    #[error("pod {0} now has another UID than the token's (deleted and re-created)")]
    PodUidMismatch(String),
    #[error("pod {0} runs on another node than the token says")]
    PodNodeMismatch(String),
    #[error("pod lookup failed: {0}")]
    PodLookup(String),
    #[error("token {0} is not usable in a SPIFFE ID or selector")]
    BadName(&'static str),
}

impl PsatError {
    /// What the agent is told: little.
    fn to_attest_error(&self) -> AttestError {
        match self {
            PsatError::BadEvidence | PsatError::Jws(JwsError::Malformed | JwsError::TooLong) => {
                AttestError::Malformed("k8s_psat evidence")
            }
            PsatError::PodLookup(_) => {
                AttestError::Internal("the pod could not be looked up; try again".into())
            }
            _ => AttestError::Rejected("k8s_psat token refused"),
        }
    }
}

/// One cluster the server accepts agents from.
#[derive(Debug)]
pub struct ClusterConfig {
    /// The name agents give (`[node_attestors.k8s_psat.clusters.<name>]`);
    /// it becomes a SPIFFE ID segment, so it must be one.
    pub name: String,
    /// The service-account issuer (`--service-account-issuer`), compared
    /// with `iss` exactly.
    pub issuer: String,
    /// The audience tokens must carry.
    pub audience: String,
    /// Where the issuer keys come from.
    pub keys: KeySource,
    /// How often keys are re-read.
    pub jwks_refresh: Duration,
    /// Least time between two fetches triggered by unknown `kid`s.
    pub jwks_min_refetch: Duration,
    /// `namespace:name` of the service accounts agents may use; required
    /// (an empty list is refused).
    pub allowed_service_accounts: Vec<String>,
    /// Confirms the pod still exists with the token's UID.
    pub pods: Arc<dyn PodLookup>,
}

impl ClusterConfig {
    /// A cluster with the default audience and refresh timings.
    pub fn new(
        name: impl Into<String>,
        issuer: impl Into<String>,
        keys: KeySource,
        pods: Arc<dyn PodLookup>,
    ) -> Self {
        Self {
            name: name.into(),
            issuer: issuer.into(),
            audience: DEFAULT_AUDIENCE.into(),
            keys,
            jwks_refresh: DEFAULT_JWKS_REFRESH,
            jwks_min_refetch: DEFAULT_JWKS_MIN_REFETCH,
            allowed_service_accounts: Vec::new(),
            pods,
        }
    }
}

#[derive(Debug)]
struct Cluster {
    name: String,
    issuer: String,
    audience: String,
    allowed: Vec<String>,
    pods: Arc<dyn PodLookup>,
    keys: KeyCache,
}

/// The facts a valid token establishes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodIdentity {
    pub cluster: String,
    pub namespace: String,
    pub service_account: String,
    pub pod_name: String,
    pub pod_uid: String,
    pub node_name: String,
    pub node_uid: String,
}

/// Server half.
#[derive(Debug)]
pub struct K8sPsatAttestor {
    trust_domain: TrustDomain,
    clusters: HashMap<String, Cluster>,
    clock: Arc<dyn Clock>,
}

fn str_at<'a>(v: &'a Value, pointer: &str) -> Option<&'a str> {
    v.pointer(pointer)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
}

impl K8sPsatAttestor {
    /// Accepts agents from `clusters`. Cluster names must be valid SPIFFE
    /// ID path segments and unique.
    pub fn new(
        trust_domain: TrustDomain,
        clusters: Vec<ClusterConfig>,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, AttestError> {
        if clusters.is_empty() {
            return Err(AttestError::Internal(
                "k8s_psat needs at least one cluster".into(),
            ));
        }
        let mut out = HashMap::new();
        for c in clusters {
            trust_domain
                .id_from_segments(&["sigil", "agent", NAME, &c.name])
                .map_err(|e| {
                    AttestError::Internal(format!(
                        "k8s_psat cluster name {:?} is not a valid SPIFFE ID segment: {e}",
                        c.name
                    ))
                })?;
            if c.issuer.is_empty() || c.audience.is_empty() {
                return Err(AttestError::Internal(format!(
                    "k8s_psat cluster {:?}: issuer and audience must not be empty",
                    c.name
                )));
            }
            // Any pod that can mount a projected token with the server's
            // audience holds a valid token naming its node; only the
            // agent's own service accounts may attest as that node.
            if c.allowed_service_accounts.is_empty() {
                return Err(AttestError::Internal(format!(
                    "k8s_psat cluster {:?}: allowed_service_accounts is empty; list the agent's \
                     service account(s) as namespace:name (e.g. \"sigil:sigil-agent\")",
                    c.name
                )));
            }
            for sa in &c.allowed_service_accounts {
                if sa
                    .split_once(':')
                    .is_none_or(|(ns, n)| ns.is_empty() || n.is_empty())
                {
                    return Err(AttestError::Internal(format!(
                        "k8s_psat cluster {:?}: allowed service account {sa:?} must read namespace:name",
                        c.name
                    )));
                }
            }
            let cluster = Cluster {
                name: c.name.clone(),
                issuer: c.issuer,
                audience: c.audience,
                allowed: c.allowed_service_accounts,
                pods: c.pods,
                keys: KeyCache::new(c.keys, c.jwks_refresh, c.jwks_min_refetch),
            };
            if out.insert(c.name.clone(), cluster).is_some() {
                return Err(AttestError::Internal(format!(
                    "k8s_psat cluster {:?} is configured twice",
                    c.name
                )));
            }
        }
        Ok(Self {
            trust_domain,
            clusters: out,
            clock,
        })
    }

    /// Checks the evidence and returns what it proves.
    pub async fn verify(&self, evidence: &[u8]) -> Result<PodIdentity, PsatError> {
        if evidence.len() > MAX_EVIDENCE_LEN {
            return Err(PsatError::BadEvidence);
        }
        let ev: Evidence = serde_json::from_slice(evidence).map_err(|_| PsatError::BadEvidence)?;
        let cluster = self
            .clusters
            .get(&ev.cluster)
            .ok_or_else(|| PsatError::UnknownCluster(ev.cluster.chars().take(64).collect()))?;

        let token = jws::parse(&ev.token, ALGS)?;
        let key = cluster.keys.key(&cluster.name, token.kid()).await?;
        // Only now, with the issuer's signature checked, read the claims.
        let claims = token.verify(&key)?;
        let iss = claims.get("iss").and_then(Value::as_str).unwrap_or("");
        if iss != cluster.issuer {
            return Err(PsatError::WrongIssuer(iss.chars().take(128).collect()));
        }
        let aud_ok = match claims.get("aud") {
            Some(Value::String(a)) => *a == cluster.audience,
            Some(Value::Array(list)) => list
                .iter()
                .any(|a| a.as_str() == Some(cluster.audience.as_str())),
            _ => false,
        };
        if !aud_ok {
            return Err(PsatError::WrongAudience(cluster.audience.clone()));
        }
        let times = claims.times()?;
        if times.exp.is_none() {
            return Err(PsatError::NoExpiry);
        }
        times.check(self.clock.now())?;
        let k8s = claims
            .get("kubernetes.io")
            .ok_or(PsatError::NoPodBinding("namespace"))?;
        let field = |p: &str, name: &'static str| {
            str_at(k8s, p)
                .map(str::to_owned)
                .ok_or(PsatError::NoPodBinding(name))
        };
        let namespace = field("/namespace", "namespace")?;
        let service_account = field("/serviceaccount/name", "serviceaccount.name")?;
        let pod_name = field("/pod/name", "pod.name")?;
        let pod_uid = field("/pod/uid", "pod.uid")?;
        let node_name = field("/node/name", "node.name").map_err(|_| PsatError::NoNodeUid)?;
        let node_uid = str_at(k8s, "/node/uid")
            .map(str::to_owned)
            .ok_or(PsatError::NoNodeUid)?;

        let sa = format!("{namespace}:{service_account}");
        if !cluster.allowed.is_empty() && !cluster.allowed.contains(&sa) {
            return Err(PsatError::ServiceAccountNotAllowed(sa));
        }
        let pod_ref = format!("{namespace}/{pod_name}");
        match cluster
            .pods
            .pod(&namespace, &pod_name)
            .await
            .map_err(PsatError::PodLookup)?
        {
            None => return Err(PsatError::PodGone(pod_ref)),
            Some(p) if p.uid != pod_uid => return Err(PsatError::PodUidMismatch(pod_ref)),
            Some(p) if p.node_name.as_ref().is_some_and(|n| *n != node_name) => {
                return Err(PsatError::PodNodeMismatch(pod_ref));
            }
            Some(_) => {}
        }
        Ok(PodIdentity {
            cluster: cluster.name.clone(),
            namespace,
            service_account,
            pod_name,
            pod_uid,
            node_name,
            node_uid,
        })
    }

    fn attestation(&self, p: &PodIdentity) -> Result<Attestation, PsatError> {
        let agent_id = AgentId::from_segments(&self.trust_domain, &[NAME, &p.cluster, &p.node_uid])
            .map_err(|_| PsatError::BadName("node uid"))?;
        let mut selectors = SelectorSet::new();
        for (key, value, what) in [
            ("cluster", &p.cluster, "cluster"),
            ("agent_ns", &p.namespace, "namespace"),
            ("agent_sa", &p.service_account, "service account"),
            ("agent_pod_name", &p.pod_name, "pod name"),
            ("agent_pod_uid", &p.pod_uid, "pod uid"),
            ("agent_node_name", &p.node_name, "node name"),
            ("agent_node_uid", &p.node_uid, "node uid"),
        ] {
            let s = Selector::new(NAME, &format!("{key}:{value}"))
                .map_err(|_| PsatError::BadName(what))?;
            selectors.insert(s);
        }
        Ok(Attestation {
            agent_id,
            selectors,
            can_reattest: true,
        })
    }
}

#[async_trait]
impl ServerNodeAttestor for K8sPsatAttestor {
    fn name(&self) -> &'static str {
        NAME
    }

    async fn attest(
        &self,
        evidence: &[u8],
        _challenger: &mut dyn Challenger,
    ) -> Result<Attestation, AttestError> {
        let result = match self.verify(evidence).await {
            Ok(p) => self.attestation(&p),
            Err(e) => Err(e),
        };
        result.map_err(|e| {
            warn!(attestor = NAME, reason = %e, "node attestation refused");
            e.to_attest_error()
        })
    }
}

#[cfg(test)]
mod tests;
