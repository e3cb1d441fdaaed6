//! SPIFFE federation: trusting other trust domains' bundles and serving
//! this one's.
//!
//! - [`rules`]: what a fetched foreign bundle must satisfy to replace the
//!   stored one (pure functions, one named test per rule).
//! - [`poller`]: one task per relationship fetching the foreign bundle
//!   endpoint (`https_web` or `https_spiffe`) at the bundle's refresh hint,
//!   bounded by `[federation] min_refresh`/`max_refresh`, and storing what
//!   passes the rules with the datastore's `put_bundle`.
//! - [`endpoint`]: this trust domain's bundle endpoint (`[bundle_endpoint]`),
//!   a SPIFFE JWK Set over HTTPS, with the server's own SVID
//!   (`https_spiffe`) or a configured web certificate (`https_web`).
//! - [`FederatedSet`]: the foreign bundles agents are given, read from the
//!   datastore's change feed, so every replica publishes what any replica
//!   stored; Sync streams push its changes to agents.
//!
//! Relationships come from the config (`[[federation.federates_with]]`).
//! Every replica polls every relationship: polling is idempotent, because
//! a fetched bundle is stored only when its sequence is greater than the
//! stored one (the datastore refuses a lower one, and an equal one is a
//! no-op), so replicas racing to store the same bundle leave one copy.

pub mod endpoint;
pub mod poller;
pub mod rules;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use sigil_identity::duration::serde_human;
use sigil_identity::{Bundle, SpiffeId, TrustDomain};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::datastore::{Change, Changed, Datastore};
use crate::registry::ChangeListener;

/// Default shortest wait between two polls of one bundle endpoint.
pub const DEFAULT_MIN_REFRESH: Duration = Duration::from_secs(30);
/// Default longest wait between two polls of one bundle endpoint.
pub const DEFAULT_MAX_REFRESH: Duration = Duration::from_secs(3600);
/// Wait used when a bundle carries no refresh hint (the SPIFFE default).
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(300);

/// How a bundle endpoint authenticates itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProfileKind {
    /// A Web PKI certificate, checked against the system roots (and
    /// `[federation] ca_file`), with the URL's host name.
    HttpsWeb,
    /// An X509-SVID with a configured SPIFFE ID, checked against the bundle
    /// of that ID's trust domain.
    HttpsSpiffe,
}

impl ProfileKind {
    /// The profile's name in config and CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            ProfileKind::HttpsWeb => "https_web",
            ProfileKind::HttpsSpiffe => "https_spiffe",
        }
    }
}

/// `[federation]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FederationSection {
    /// Shortest wait between two polls of one endpoint, whatever the hint.
    #[serde(with = "serde_human", default = "default_min_refresh")]
    pub min_refresh: Duration,
    /// Longest wait between two polls of one endpoint, whatever the hint.
    #[serde(with = "serde_human", default = "default_max_refresh")]
    pub max_refresh: Duration,
    /// Extra CA certificates (PEM) trusted for `https_web` endpoints,
    /// besides the system roots (`/etc/ssl/certs/ca-certificates.crt`).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// The trust domains whose bundles this server polls.
    #[serde(default)]
    pub federates_with: Vec<RelationshipSection>,
}

impl Default for FederationSection {
    fn default() -> Self {
        Self {
            min_refresh: DEFAULT_MIN_REFRESH,
            max_refresh: DEFAULT_MAX_REFRESH,
            ca_file: None,
            federates_with: Vec::new(),
        }
    }
}

fn default_min_refresh() -> Duration {
    DEFAULT_MIN_REFRESH
}

fn default_max_refresh() -> Duration {
    DEFAULT_MAX_REFRESH
}

/// `[[federation.federates_with]]`: one federation relationship.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelationshipSection {
    /// The foreign trust domain.
    pub trust_domain: TrustDomain,
    /// Its bundle endpoint, `https://host:port/path`.
    pub bundle_endpoint_url: String,
    /// How the endpoint authenticates itself.
    pub profile: ProfileKind,
    /// With `https_spiffe`: the SPIFFE ID the endpoint's SVID must have.
    #[serde(default)]
    pub endpoint_spiffe_id: Option<SpiffeId>,
    /// A SPIFFE bundle (JWK Set) of the trust domain to start from, stored
    /// when none is: `https_spiffe` needs it to authenticate the endpoint
    /// the first time.
    #[serde(default)]
    pub bundle_file: Option<PathBuf>,
}

/// `[bundle_endpoint]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleEndpointSection {
    /// Where to listen, e.g. `0.0.0.0:8443`.
    pub address: std::net::SocketAddr,
    /// `https_spiffe` (the server's own SVID) or `https_web` (`cert_file`
    /// and `key_file`).
    pub profile: ProfileKind,
    /// With `https_web`: the certificate chain (PEM, leaf first).
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// With `https_web`: its PKCS#8 private key (PEM).
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// `spiffe_refresh_hint` served; the bundle's own hint
    /// (`ca.bundle_refresh_hint`) when unset.
    #[serde(default, with = "opt_human")]
    pub refresh_hint: Option<Duration>,
}

mod opt_human {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|s| sigil_identity::duration::parse(&s).map_err(serde::de::Error::custom))
            .transpose()
    }
}

/// Checks the `[federation]` and `[bundle_endpoint]` sections of the
/// server `own` trust domain; the message names the setting.
pub fn validate_config(
    own: &TrustDomain,
    f: &FederationSection,
    bundle_endpoint: Option<&BundleEndpointSection>,
) -> Result<(), String> {
    if f.min_refresh.is_zero() || f.min_refresh > f.max_refresh {
        return Err(format!(
            "federation.min_refresh ({:?}) must be above zero and at most federation.max_refresh ({:?})",
            f.min_refresh, f.max_refresh
        ));
    }
    let mut seen = BTreeSet::new();
    for r in &f.federates_with {
        let td = &r.trust_domain;
        if td == own {
            return Err(format!(
                "federation.federates_with: {td} is this server's own trust domain"
            ));
        }
        if !seen.insert(td.clone()) {
            return Err(format!(
                "federation.federates_with: {td} is listed twice; keep one relationship per trust domain"
            ));
        }
        crate::federation::poller::check_url(&r.bundle_endpoint_url)
            .map_err(|e| format!("federation.federates_with {td}: bundle_endpoint_url: {e}"))?;
        match (r.profile, &r.endpoint_spiffe_id) {
            (ProfileKind::HttpsSpiffe, None) => {
                return Err(format!(
                    "federation.federates_with {td}: profile \"https_spiffe\" needs endpoint_spiffe_id (e.g. \"spiffe://{td}/sigil/server\")"
                ));
            }
            (ProfileKind::HttpsWeb, Some(_)) => {
                return Err(format!(
                    "federation.federates_with {td}: endpoint_spiffe_id is only used with profile \"https_spiffe\""
                ));
            }
            _ => {}
        }
    }
    if let Some(e) = bundle_endpoint {
        match (e.profile, &e.cert_file, &e.key_file) {
            (ProfileKind::HttpsWeb, Some(_), Some(_)) | (ProfileKind::HttpsSpiffe, None, None) => {}
            (ProfileKind::HttpsWeb, _, _) => {
                return Err(
                    "bundle_endpoint: profile \"https_web\" needs cert_file and key_file".into(),
                );
            }
            (ProfileKind::HttpsSpiffe, _, _) => {
                return Err("bundle_endpoint: cert_file and key_file are only used with profile \"https_web\" (https_spiffe serves the server's SVID)".into());
            }
        }
    }
    Ok(())
}

/// The foreign bundles of the configured relationships, as agents are
/// given them: follows the datastore's change feed (so a bundle stored by
/// any replica reaches every replica's agents) and publishes each new set.
#[derive(Debug)]
pub struct FederatedSet {
    /// The relationships' trust domains: only their bundles are published.
    federated: BTreeSet<TrustDomain>,
    tx: watch::Sender<Arc<BTreeMap<TrustDomain, Arc<Bundle>>>>,
}

impl FederatedSet {
    /// An empty set following the bundles of `federated`.
    pub fn new(federated: impl IntoIterator<Item = TrustDomain>) -> Self {
        Self {
            federated: federated.into_iter().collect(),
            tx: watch::channel(Arc::default()).0,
        }
    }

    /// The bundles published now.
    pub fn current(&self) -> Arc<BTreeMap<TrustDomain, Arc<Bundle>>> {
        self.tx.borrow().clone()
    }

    /// A receiver that sees every new set.
    pub fn subscribe(&self) -> watch::Receiver<Arc<BTreeMap<TrustDomain, Arc<Bundle>>>> {
        self.tx.subscribe()
    }

    /// Whether `td` has a relationship.
    pub fn is_federated(&self, td: &TrustDomain) -> bool {
        self.federated.contains(td)
    }

    fn set(&self, td: &TrustDomain, bundle: Option<&Bundle>) {
        if !self.federated.contains(td) {
            return;
        }
        self.tx.send_if_modified(|map| {
            let now = map.get(td);
            let changed = match (now, bundle) {
                (Some(a), Some(b)) => **a != *b,
                (None, None) => false,
                _ => true,
            };
            if changed {
                let m = Arc::make_mut(map);
                match bundle {
                    Some(b) => {
                        m.insert(td.clone(), Arc::new(b.clone()));
                    }
                    None => {
                        m.remove(td);
                    }
                }
            }
            changed
        });
    }

    /// Reads every relationship's stored bundle.
    pub async fn load(&self, store: &dyn Datastore) {
        for td in &self.federated {
            match store.fetch_bundle(td).await {
                Ok(b) => self.set(td, b.as_ref()),
                Err(e) => {
                    warn!(trust_domain = %td, error = %e, "could not read a federated bundle; the next change brings it");
                }
            }
        }
    }
}

/// A stored bundle of a federated trust domain, added, changed or removed
/// by any replica, reaches this one's agents.
pub struct SetListener {
    pub set: Arc<FederatedSet>,
    pub store: Arc<dyn Datastore>,
}

impl std::fmt::Debug for SetListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SetListener").finish_non_exhaustive()
    }
}

#[async_trait::async_trait]
impl ChangeListener for SetListener {
    async fn changed(&self, change: &Change) {
        if let Changed::Bundle {
            trust_domain,
            bundle,
        } = &change.changed
            && self.set.is_federated(trust_domain)
        {
            info!(trust_domain = %trust_domain, sequence = bundle.as_ref().map(|b| b.sequence), "federated bundle changed");
            self.set.set(trust_domain, bundle.as_ref());
        }
    }

    async fn reload(&self) {
        self.set.load(self.store.as_ref()).await;
    }
}

/// The Sync events that bring an agent holding `sent` to `now`: each new
/// or changed bundle, then each trust domain no longer federated.
pub fn sync_events(
    sent: &BTreeMap<TrustDomain, Arc<Bundle>>,
    now: &BTreeMap<TrustDomain, Arc<Bundle>>,
) -> Vec<sigil_proto::node::sync_response::Event> {
    use sigil_proto::node::sync_response::Event;
    let changed = now
        .iter()
        .filter(|(td, b)| sent.get(*td) != Some(*b))
        .map(|(_, b)| Event::FederatedBundle((&**b).into()));
    let removed = sent
        .keys()
        .filter(|td| !now.contains_key(*td))
        .map(|td| Event::FederatedBundleRemoved(td.to_string()));
    changed.chain(removed).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn td(s: &str) -> TrustDomain {
        TrustDomain::new(s).unwrap()
    }

    /// Only relationships' bundles are published; a removal withdraws one;
    /// storing the same bundle again publishes nothing new.
    #[test]
    fn the_set_publishes_only_federated_trust_domains_and_only_changes() {
        let set = FederatedSet::new([td("td2.org")]);
        let mut rx = set.subscribe();
        set.set(&td("other.org"), Some(&Bundle::new(td("other.org"))));
        assert!(!rx.has_changed().unwrap());
        let b = Bundle::new(td("td2.org"));
        set.set(&td("td2.org"), Some(&b));
        assert!(rx.has_changed().unwrap());
        rx.borrow_and_update();
        set.set(&td("td2.org"), Some(&b));
        assert!(!rx.has_changed().unwrap());
        set.set(&td("td2.org"), None);
        assert!(rx.has_changed().unwrap());
        assert!(set.current().is_empty());
    }

    #[test]
    fn sync_events_carry_new_and_changed_bundles_and_removals() {
        use sigil_proto::node::sync_response::Event;
        let b = |name: &str, seq| {
            let mut b = Bundle::new(td(name));
            b.sequence = seq;
            (td(name), Arc::new(b))
        };
        let sent: BTreeMap<_, _> = [b("a.org", 1), b("b.org", 1), b("c.org", 1)].into();
        let now: BTreeMap<_, _> = [b("a.org", 1), b("b.org", 2), b("d.org", 1)].into();
        let events = sync_events(&sent, &now);
        let names: Vec<String> = events
            .iter()
            .map(|e| match e {
                Event::FederatedBundle(b) => format!("+{}", b.trust_domain),
                Event::FederatedBundleRemoved(td) => format!("-{td}"),
                _ => "?".into(),
            })
            .collect();
        assert_eq!(names, ["+b.org", "+d.org", "-c.org"]);
        assert!(sync_events(&now, &now).is_empty());
    }
}
