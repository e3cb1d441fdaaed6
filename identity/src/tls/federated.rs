//! The bundles of federated trust domains a verifier may also trust, and
//! the choice of bundle for a peer: its own trust domain's, never a merge.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use rustls::pki_types::CertificateDer;

use crate::bundle::Bundle;
use crate::spiffe_id::TrustDomain;
use crate::x509::{check_leaf, parse};

/// Bundles of federated trust domains, by trust domain, swapped whole while
/// connections use them (a workload's update replaces the set).
#[derive(Debug, Default)]
pub struct FederatedBundles(RwLock<Arc<BTreeMap<TrustDomain, Arc<Bundle>>>>);

impl FederatedBundles {
    /// An empty set: no other trust domain is trusted.
    pub fn new() -> Self {
        Self::default()
    }

    /// Replaces the set with `bundles` (each under its own trust domain).
    pub fn set(&self, bundles: impl IntoIterator<Item = Bundle>) {
        let map = bundles
            .into_iter()
            .map(|b| (b.trust_domain.clone(), Arc::new(b)))
            .collect();
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(map);
    }

    /// The bundle of `td`, if it is in the set.
    pub fn get(&self, td: &TrustDomain) -> Option<Arc<Bundle>> {
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(td)
            .cloned()
    }

    /// The trust domains in the set.
    pub fn trust_domains(&self) -> Vec<TrustDomain> {
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect()
    }
}

/// The bundle to verify a peer presenting `end_entity` against: the
/// federated bundle of the leaf's trust domain when that is not `own`'s
/// and the set holds it; `own` otherwise (whose verification then refuses
/// a foreign leaf).
pub(super) fn bundle_for(
    own: Arc<Bundle>,
    federated: Option<&FederatedBundles>,
    end_entity: &CertificateDer<'_>,
) -> Arc<Bundle> {
    let Some(federated) = federated else {
        return own;
    };
    let Some(td) = parse(end_entity)
        .ok()
        .and_then(|c| check_leaf(&c).ok())
        .map(|id| id.trust_domain())
    else {
        return own;
    };
    if td == own.trust_domain {
        return own;
    }
    federated.get(&td).unwrap_or(own)
}
