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
//! - `alg` is RS256/384/512 or ES256/384 (`none` and HMAC are refused) and
//!   the header embeds no key;
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

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use ring::signature as sig;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sigil_identity::attestation::{
    AgentNodeAttestor, AttestError, Attestation, Challenger, ServerNodeAttestor,
};
use sigil_identity::clock::{Clock, from_unix_seconds};
use sigil_identity::keys::{Curve, PublicKey, Verifier};
use sigil_identity::{Selector, SelectorSet, TrustDomain};
use tracing::{debug, info, warn};

use crate::https::HttpsClient;

/// The attestor name on the wire, and the selector type.
pub const NAME: &str = "k8s_psat";
/// The audience tokens must carry unless configured otherwise.
pub const DEFAULT_AUDIENCE: &str = "sigil-server";
/// Largest evidence accepted, in bytes.
pub const MAX_EVIDENCE_LEN: usize = 64 * 1024;
/// Clock skew tolerated on `exp` and `nbf`.
pub const LEEWAY: Duration = Duration::from_secs(30);
/// How often issuer keys are re-read by default.
pub const DEFAULT_JWKS_REFRESH: Duration = Duration::from_secs(300);
/// Least time between two key fetches caused by unknown `kid`s, so that
/// tokens with made-up key IDs cannot make the server hammer the issuer.
pub const DEFAULT_JWKS_MIN_REFETCH: Duration = Duration::from_secs(10);
/// Most keys read from one JWKS.
const MAX_JWKS_KEYS: usize = 100;

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
pub enum PsatError {
    #[error("evidence is not a k8s_psat object {{\"cluster\", \"token\"}}")]
    BadEvidence,
    #[error("no cluster named {0:?} is configured on this server")]
    UnknownCluster(String),
    #[error("token is not a compact JWS")]
    Malformed,
    #[error("token uses alg none")]
    AlgNone,
    #[error("token uses an HMAC algorithm")]
    AlgHmac,
    #[error("token algorithm {0:?} is not accepted (RS256, RS384, RS512, ES256, ES384 are)")]
    UnsupportedAlg(String),
    #[error("token header member {0:?} is not allowed")]
    ForbiddenHeader(String),
    #[error("token header has no kid")]
    MissingKid,
    #[error("no key {kid:?} in the issuer keys of cluster {cluster:?}")]
    UnknownKid { kid: String, cluster: String },
    #[error("token algorithm does not match the type of key {0:?}")]
    AlgKeyMismatch(String),
    #[error("token signature does not verify")]
    BadSignature,
    #[error("token issuer {0:?} is not the cluster's issuer")]
    WrongIssuer(String),
    #[error("token audience does not include {0:?}")]
    WrongAudience(String),
    #[error(
        "token has no exp: legacy non-expiring service-account tokens are refused; mount a projected token"
    )]
    NoExpiry,
    #[error("token claim {0} is not a number")]
    BadNumericClaim(&'static str),
    #[error("token has expired")]
    Expired,
    #[error("token is not valid yet")]
    NotYetValid,
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
            PsatError::BadEvidence | PsatError::Malformed => {
                AttestError::Malformed("k8s_psat evidence")
            }
            PsatError::PodLookup(_) => {
                AttestError::Internal("the pod could not be looked up; try again".into())
            }
            _ => AttestError::Rejected("k8s_psat token refused"),
        }
    }
}

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
fn is_dns_subdomain(s: &str) -> bool {
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

/// Where a cluster's service-account issuer keys come from.
#[derive(Debug)]
pub enum KeySource {
    /// A JWKS file (e.g. from `kubectl get --raw /openid/v1/jwks`), re-read
    /// at each refresh.
    File(PathBuf),
    /// OIDC discovery: `<issuer>/.well-known/openid-configuration`, then its
    /// `jwks_uri`. Both over HTTPS, verified by `client`; a bearer token is
    /// sent when `token_file` is set (the API server's discovery endpoints
    /// need one unless anonymous access is granted).
    Discovery {
        issuer_url: String,
        client: HttpsClient,
        token_file: Option<PathBuf>,
    },
}

/// Reads a JWKS: keys with a `kid` that Sigil can use for signatures.
/// Keys it cannot use (other types, `use` other than `sig`) are skipped.
pub fn parse_jwks(bytes: &[u8]) -> Result<HashMap<String, PublicKey>, String> {
    let v: Value = serde_json::from_slice(bytes).map_err(|e| format!("JWKS is not JSON: {e}"))?;
    let keys = v
        .get("keys")
        .and_then(Value::as_array)
        .ok_or("JWKS has no keys array")?;
    if keys.len() > MAX_JWKS_KEYS {
        return Err(format!("JWKS has more than {MAX_JWKS_KEYS} keys"));
    }
    let mut out = HashMap::new();
    for k in keys {
        let Some(obj) = k.as_object() else { continue };
        let Some(kid) = obj.get("kid").and_then(Value::as_str) else {
            continue;
        };
        if kid.is_empty() || kid.len() > 256 {
            continue;
        }
        if obj.get("use").is_some_and(|u| u.as_str() != Some("sig")) {
            continue;
        }
        match PublicKey::from_jwk(obj) {
            Ok(key) => {
                out.insert(kid.to_owned(), key);
            }
            Err(e) => debug!(kid, error = %e, "skipping unusable JWKS key"),
        }
    }
    Ok(out)
}

async fn read_token_file(path: &Option<PathBuf>) -> Result<Option<String>, String> {
    match path {
        Some(p) => tokio::fs::read_to_string(p)
            .await
            .map(|t| Some(t.trim().to_owned()))
            .map_err(|e| format!("cannot read token file {}: {e}", p.display())),
        None => Ok(None),
    }
}

impl KeySource {
    async fn fetch(&self) -> Result<HashMap<String, PublicKey>, String> {
        match self {
            KeySource::File(path) => {
                let bytes = tokio::fs::read(path)
                    .await
                    .map_err(|e| format!("cannot read JWKS file {}: {e}", path.display()))?;
                parse_jwks(&bytes).map_err(|e| format!("{}: {e}", path.display()))
            }
            KeySource::Discovery {
                issuer_url,
                client,
                token_file,
            } => {
                let token = read_token_file(token_file).await?;
                let url = format!(
                    "{}/.well-known/openid-configuration",
                    issuer_url.trim_end_matches('/')
                );
                let resp = client
                    .get(&url, token.as_deref())
                    .await
                    .map_err(|e| e.to_string())?;
                if resp.status != 200 {
                    return Err(format!("{url} answered HTTP {}", resp.status));
                }
                let doc: Value = serde_json::from_slice(&resp.body)
                    .map_err(|e| format!("{url} is not JSON: {e}"))?;
                if doc.get("issuer").and_then(Value::as_str) != Some(issuer_url.as_str()) {
                    return Err(format!(
                        "{url} names another issuer than {issuer_url:?} (OIDC discovery requires them to match)"
                    ));
                }
                let jwks_uri = doc
                    .get("jwks_uri")
                    .and_then(Value::as_str)
                    .ok_or_else(|| format!("{url} has no jwks_uri"))?;
                // The discovery document chooses `jwks_uri`; the server's
                // token goes only where the discovery request went.
                let same_origin = origin(jwks_uri) == origin(issuer_url);
                let resp = client
                    .get(jwks_uri, token.as_deref().filter(|_| same_origin))
                    .await
                    .map_err(|e| e.to_string())?;
                if resp.status != 200 {
                    let hint = if same_origin || token.is_none() {
                        ""
                    } else {
                        " (it is on another host than the issuer, so no token was sent: allow \
                         anonymous access to it or configure jwks_file)"
                    };
                    return Err(format!("{jwks_uri} answered HTTP {}{hint}", resp.status));
                }
                parse_jwks(&resp.body).map_err(|e| format!("{jwks_uri}: {e}"))
            }
        }
    }
}

/// `scheme://authority` of `url`, lowercased.
fn origin(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    format!("{scheme}://{authority}").to_ascii_lowercase()
}

#[derive(Debug, Default)]
struct KeyState {
    keys: HashMap<String, PublicKey>,
    fetched: Option<Instant>,
    last_try: Option<Instant>,
}

/// A cluster's issuer keys, cached.
///
/// A known key from keys younger than `refresh` is answered at once, even
/// while a fetch is in flight, so a token naming an unknown `kid` cannot
/// hold up everyone else's attestation. Fetches are one at a time and at
/// most one per `min_refetch`. Keys that could not be refreshed for
/// [`MAX_STALENESS_FACTOR`] × `refresh` are no longer trusted: a key the
/// issuer removed must stop verifying even while the issuer is unreachable.
#[derive(Debug)]
struct KeyCache {
    source: KeySource,
    refresh: Duration,
    min_refetch: Duration,
    state: std::sync::Mutex<KeyState>,
    fetching: tokio::sync::Mutex<()>,
}

/// Keys older than this many refresh periods are dropped.
const MAX_STALENESS_FACTOR: u32 = 12;

impl KeyCache {
    fn new(source: KeySource, refresh: Duration, min_refetch: Duration) -> Self {
        Self {
            source,
            refresh,
            min_refetch,
            state: std::sync::Mutex::default(),
            fetching: tokio::sync::Mutex::new(()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, KeyState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The key `kid` if held and not too old.
    fn held(&self, kid: &str, now: Instant) -> Option<PublicKey> {
        let st = self.lock();
        let fetched = st.fetched?;
        if now.duration_since(fetched) >= self.refresh * MAX_STALENESS_FACTOR {
            return None;
        }
        st.keys.get(kid).cloned()
    }

    async fn key(&self, cluster: &str, kid: &str) -> Result<PublicKey, PsatError> {
        let fresh = |st: &KeyState, now: Instant| {
            st.fetched
                .is_some_and(|t| now.duration_since(t) < self.refresh)
        };
        {
            let st = self.lock();
            if fresh(&st, Instant::now())
                && let Some(k) = st.keys.get(kid)
            {
                return Ok(k.clone());
            }
        }
        let _one_fetch = self.fetching.lock().await;
        let now = Instant::now();
        let should_fetch = {
            let mut st = self.lock();
            let needed = !fresh(&st, now) || !st.keys.contains_key(kid);
            let may_try = st
                .last_try
                .is_none_or(|t| now.duration_since(t) >= self.min_refetch);
            if needed && may_try {
                st.last_try = Some(now);
            }
            needed && may_try
        };
        if should_fetch {
            match self.source.fetch().await {
                Ok(keys) => {
                    info!(
                        attestor = NAME,
                        cluster,
                        keys = keys.len(),
                        "issuer keys loaded"
                    );
                    let mut st = self.lock();
                    st.keys = keys;
                    st.fetched = Some(now);
                }
                Err(e) => warn!(
                    attestor = NAME,
                    cluster,
                    error = %e,
                    "cannot load issuer keys; keeping the ones held while they are not too old"
                ),
            }
        }
        self.held(kid, Instant::now())
            .ok_or_else(|| PsatError::UnknownKid {
                kid: kid.chars().take(64).collect(),
                cluster: cluster.to_owned(),
            })
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

fn decode_json(part: &str) -> Result<Map<String, Value>, PsatError> {
    let bytes = B64URL.decode(part).map_err(|_| PsatError::Malformed)?;
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(PsatError::Malformed),
    }
}

fn time_claim(
    claims: &Map<String, Value>,
    name: &'static str,
) -> Result<Option<SystemTime>, PsatError> {
    match claims.get(name) {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .filter(|s| *s <= sigil_identity::clock::MAX_UNIX_SECONDS)
            .map(|s| Some(from_unix_seconds(s)))
            .ok_or(PsatError::BadNumericClaim(name)),
    }
}

fn verifier(alg: &str, key: &PublicKey) -> Result<Verifier, PsatError> {
    Ok(match (alg, key) {
        ("RS256", PublicKey::Rsa { .. }) => Verifier::Rsa(&sig::RSA_PKCS1_2048_8192_SHA256),
        ("RS384", PublicKey::Rsa { .. }) => Verifier::Rsa(&sig::RSA_PKCS1_2048_8192_SHA384),
        ("RS512", PublicKey::Rsa { .. }) => Verifier::Rsa(&sig::RSA_PKCS1_2048_8192_SHA512),
        (
            "ES256",
            PublicKey::Ec {
                curve: Curve::P256, ..
            },
        ) => Verifier::Ecdsa(&sig::ECDSA_P256_SHA256_FIXED),
        (
            "ES384",
            PublicKey::Ec {
                curve: Curve::P384, ..
            },
        ) => Verifier::Ecdsa(&sig::ECDSA_P384_SHA384_FIXED),
        _ => return Err(PsatError::AlgKeyMismatch(alg.chars().take(16).collect())),
    })
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

        let mut parts = ev.token.split('.');
        let (Some(h), Some(c), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(PsatError::Malformed);
        };
        let header = decode_json(h)?;
        let mut alg = None;
        let mut kid = None;
        for (name, value) in &header {
            match name.as_str() {
                "alg" => alg = value.as_str(),
                "kid" => kid = value.as_str().filter(|k| !k.is_empty()),
                "typ" => {}
                other => return Err(PsatError::ForbiddenHeader(other.chars().take(32).collect())),
            }
        }
        let alg = alg.ok_or_else(|| PsatError::UnsupportedAlg(String::new()))?;
        if alg.eq_ignore_ascii_case("none") {
            return Err(PsatError::AlgNone);
        }
        if alg.starts_with("HS") {
            return Err(PsatError::AlgHmac);
        }
        if !matches!(alg, "RS256" | "RS384" | "RS512" | "ES256" | "ES384") {
            return Err(PsatError::UnsupportedAlg(alg.chars().take(16).collect()));
        }
        let kid = kid.ok_or(PsatError::MissingKid)?;
        let key = cluster.keys.key(&cluster.name, kid).await?;
        let verifier = verifier(alg, &key)?;
        let signature = B64URL.decode(s).map_err(|_| PsatError::Malformed)?;
        let signed = &ev.token.as_bytes()[..h.len() + 1 + c.len()];
        key.verify_with(verifier, signed, &signature)
            .map_err(|_| PsatError::BadSignature)?;

        // Only now, with the issuer's signature checked, read the claims.
        let claims = decode_json(c)?;
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
        let now = self.clock.now();
        let exp = time_claim(&claims, "exp")?.ok_or(PsatError::NoExpiry)?;
        if now > exp.checked_add(LEEWAY).unwrap_or(exp) {
            return Err(PsatError::Expired);
        }
        if time_claim(&claims, "nbf")?
            .is_some_and(|nbf| nbf > now.checked_add(LEEWAY).unwrap_or(now))
        {
            return Err(PsatError::NotYetValid);
        }
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
        let agent_id = self
            .trust_domain
            .id_from_segments(&["sigil", "agent", NAME, &p.cluster, &p.node_uid])
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

#[cfg(test)]
mod tests;
