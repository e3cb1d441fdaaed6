//! A cluster's service-account issuer keys: where they come from (a JWKS
//! file or OIDC discovery) and the cache that refreshes them.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::Value;
use sigil_identity::jwks;
use sigil_identity::keys::PublicKey;
use tracing::{info, warn};

use super::{NAME, PsatError};
use crate::https::HttpsClient;

/// Most keys read from one JWKS.
const MAX_JWKS_KEYS: usize = 100;

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

/// An issuer's signing keys by `kid`, through the one JWK Set reader
/// ([`sigil_identity::jwks`]); keys Sigil cannot use are skipped.
pub(super) fn parse_jwks(bytes: &[u8]) -> Result<HashMap<String, PublicKey>, String> {
    jwks::signing_keys(bytes, MAX_JWKS_KEYS).map_err(|e| e.to_string())
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
    pub(super) async fn fetch(&self) -> Result<HashMap<String, PublicKey>, String> {
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
pub(super) fn origin(url: &str) -> String {
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
pub(super) struct KeyCache {
    source: KeySource,
    refresh: Duration,
    min_refetch: Duration,
    state: std::sync::Mutex<KeyState>,
    fetching: tokio::sync::Mutex<()>,
}

/// Keys older than this many refresh periods are dropped.
pub(super) const MAX_STALENESS_FACTOR: u32 = 12;

impl KeyCache {
    pub(super) fn new(source: KeySource, refresh: Duration, min_refetch: Duration) -> Self {
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

    pub(super) async fn key(&self, cluster: &str, kid: &str) -> Result<PublicKey, PsatError> {
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
