//! Polling foreign bundle endpoints: one task per relationship fetches the
//! bundle over HTTPS (authenticating the endpoint by its profile), checks
//! it with [`super::rules`], and stores what passes. A refused or failed
//! fetch is logged (`warn`, with the trust domain and the reason) and the
//! last good bundle stays; the next attempt comes at the usual interval.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use sigil_attestors::https::{HttpsClient, Trust};
use sigil_identity::tls::{SharedBundle, SpiffeServerVerifier, authorize_id};
use sigil_identity::{Bundle, SpiffeId, TrustDomain};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::rules::{self, Verdict};
use super::{FederationSection, ProfileKind, RelationshipSection};
use crate::ca::CaManager;
use crate::datastore::{Datastore, DatastoreError};
use crate::registry::Registry;

/// System CA certificates read for `https_web` endpoints.
pub const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";
/// Deadline of one fetch.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// Checks a bundle endpoint URL (`https://host[:port]/path`).
pub fn check_url(url: &str) -> Result<(), String> {
    sigil_attestors::https::parse_url(url)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Why one poll did not store a bundle.
#[derive(Debug, thiserror::Error)]
pub enum PollError {
    #[error("{0}")]
    Setup(String),
    #[error("fetch failed: {0}")]
    Fetch(String),
    #[error("endpoint answered HTTP {0}")]
    Status(u16),
    #[error("bundle refused: {0}")]
    Refused(#[from] rules::Refused),
    #[error("datastore: {0}")]
    Store(#[from] DatastoreError),
}

/// What the pollers share.
pub struct Poller {
    pub store: Arc<dyn Datastore>,
    pub registry: Arc<Registry>,
    pub ca: Arc<CaManager>,
    pub config: FederationSection,
}

impl std::fmt::Debug for Poller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Poller").finish_non_exhaustive()
    }
}

/// The Web PKI roots: the system's, plus `ca_file`'s.
fn web_roots(ca_file: Option<&Path>) -> Result<Vec<Vec<u8>>, String> {
    let mut roots = Vec::new();
    if let Ok(text) = std::fs::read_to_string(SYSTEM_ROOTS) {
        roots.extend(sigil_identity::pem::decode_all("CERTIFICATE", &text).unwrap_or_default());
    }
    if let Some(path) = ca_file {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read federation.ca_file {}: {e}", path.display()))?;
        let certs = sigil_identity::pem::decode_all("CERTIFICATE", &text)
            .map_err(|e| format!("federation.ca_file {}: {e}", path.display()))?;
        roots.extend(certs);
    }
    if roots.is_empty() {
        return Err(format!(
            "no CA certificates to check https_web endpoints with: {SYSTEM_ROOTS} is missing and federation.ca_file is not set"
        ));
    }
    Ok(roots)
}

impl Poller {
    /// Stores the relationship's bootstrap bundle (`bundle_file`) unless a
    /// bundle of its trust domain is stored already.
    pub async fn bootstrap(&self, r: &RelationshipSection) -> Result<(), String> {
        let Some(path) = &r.bundle_file else {
            return Ok(());
        };
        let td = &r.trust_domain;
        let body = std::fs::read(path).map_err(|e| {
            format!(
                "cannot read the bundle_file of {td} ({}): {e}",
                path.display()
            )
        })?;
        let bundle = Bundle::from_jwks(td.clone(), &body)
            .map_err(|e| format!("bundle_file of {td} ({}): {e}", path.display()))?;
        rules::check_trust_domain(td, &bundle)
            .map_err(|e| format!("bundle_file of {td} ({}): {e}", path.display()))?;
        let stored = self
            .store
            .fetch_bundle(td)
            .await
            .map_err(|e| e.to_string())?;
        if stored.is_some() {
            return Ok(());
        }
        match self.store.put_bundle(&bundle).await {
            Ok(()) | Err(DatastoreError::SequenceRegression { .. }) => {}
            Err(e) => return Err(e.to_string()),
        }
        info!(trust_domain = %td, sequence = bundle.sequence, "federated bundle bootstrapped from bundle_file");
        Ok(())
    }

    /// The bundle an `https_spiffe` endpoint with `id` is checked against:
    /// that of the ID's trust domain (this one's, or a stored one).
    async fn endpoint_bundle(&self, id: &SpiffeId) -> Result<Bundle, PollError> {
        let td = id.trust_domain();
        if td == *self.ca.trust_domain() {
            return Ok((*self.ca.bundle()).clone());
        }
        self.store.fetch_bundle(&td).await?.ok_or_else(|| {
            PollError::Setup(format!(
                "no bundle of {td} is held to authenticate the endpoint {id}: give the relationship a bundle_file (or run `sigil-server bundle set`)"
            ))
        })
    }

    async fn client(&self, r: &RelationshipSection) -> Result<HttpsClient, PollError> {
        let trust = match (r.profile, &r.endpoint_spiffe_id) {
            (ProfileKind::HttpsSpiffe, Some(id)) => {
                let bundle = self.endpoint_bundle(id).await?;
                Trust::Verifier(Arc::new(SpiffeServerVerifier::new(
                    Arc::new(SharedBundle::new(bundle)),
                    authorize_id(id.clone()),
                )))
            }
            (ProfileKind::HttpsSpiffe, None) => {
                return Err(PollError::Setup(
                    "https_spiffe needs endpoint_spiffe_id".into(),
                ));
            }
            (ProfileKind::HttpsWeb, _) => {
                Trust::Roots(web_roots(self.config.ca_file.as_deref()).map_err(PollError::Setup)?)
            }
        };
        Ok(HttpsClient::new(trust)
            .map_err(|e| PollError::Setup(e.to_string()))?
            .with_timeout(FETCH_TIMEOUT)
            .with_max_body(sigil_identity::bundle::MAX_BUNDLE_BYTES))
    }

    /// Fetches, checks and stores the bundle of `r` once; the refresh hint
    /// the endpoint served (it schedules the next poll).
    pub async fn poll_once(&self, r: &RelationshipSection) -> Result<Option<Duration>, PollError> {
        let td = &r.trust_domain;
        let stored = self.store.fetch_bundle(td).await?;
        let client = self.client(r).await?;
        let resp = client
            .get(&r.bundle_endpoint_url, None)
            .await
            .map_err(|e| PollError::Fetch(e.to_string()))?;
        if resp.status != 200 {
            return Err(PollError::Status(resp.status));
        }
        match rules::check(td, stored.as_ref(), &resp.body)? {
            Verdict::Unchanged { refresh_hint } => Ok(refresh_hint),
            Verdict::Store(bundle) => {
                match self.store.put_bundle(&bundle).await {
                    Ok(()) => {
                        info!(trust_domain = %td, sequence = bundle.sequence, x509_authorities = bundle.x509_authorities.len(), jwt_authorities = bundle.jwt_authorities.len(), "federated bundle updated");
                    }
                    // Another replica stored it (or a newer one) first.
                    Err(DatastoreError::SequenceRegression { .. }) => {
                        debug!(trust_domain = %td, "federated bundle already stored by another replica");
                    }
                    Err(e) => return Err(e.into()),
                }
                if let Err(e) = self.registry.catch_up().await {
                    debug!(error = %e, "change feed catch-up failed; the follower brings the bundle");
                }
                Ok(bundle.refresh_hint)
            }
        }
    }

    /// Polls `r` until `stop`: at the held bundle's refresh hint, within
    /// the configured bounds.
    pub async fn run(self: Arc<Self>, r: RelationshipSection, mut stop: watch::Receiver<bool>) {
        let td: TrustDomain = r.trust_domain.clone();
        if let Err(e) = self.bootstrap(&r).await {
            warn!(trust_domain = %td, error = %e, "federation bootstrap bundle not stored");
        }
        loop {
            let hint = match self.poll_once(&r).await {
                Ok(hint) => hint,
                Err(e) => {
                    warn!(trust_domain = %td, url = %r.bundle_endpoint_url, profile = r.profile.as_str(), error = %e, "federated bundle not updated; the last good bundle stays");
                    match self.store.fetch_bundle(&td).await {
                        Ok(b) => b.and_then(|b| b.refresh_hint),
                        Err(_) => None,
                    }
                }
            };
            let wait = rules::next_poll(hint, self.config.min_refresh, self.config.max_refresh);
            tokio::select! {
                _ = stop.changed() => return,
                () = tokio::time::sleep(wait) => {}
            }
        }
    }
}
