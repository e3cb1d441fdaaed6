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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::spiffe_id::SpiffeId;
    use crate::tls::{SharedBundle, verify_peer};
    use rcgen::{
        BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
    };
    use rustls::pki_types::UnixTime;

    /// A CA of `td` (as a bundle) and a leaf for `id` it signed (DER).
    fn pki(td: &str, id: &str) -> (Bundle, CertificateDer<'static>) {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::default();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let td_id = format!("spiffe://{td}");
        ca.subject_alt_names = vec![SanType::URI(td_id.as_str().try_into().unwrap())];
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::from_params(&ca, &ca_key);
        let mut bundle = Bundle::new(TrustDomain::new(td).unwrap());
        bundle.x509_authorities = vec![ca_cert.der().to_vec()];
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.use_authority_key_identifier_extension = true;
        p.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let leaf = p.signed_by(&key, &issuer).unwrap();
        (bundle, leaf.der().clone())
    }

    /// A peer of a federated trust domain verifies against that trust
    /// domain's bundle, and only when the verifier holds it.
    #[test]
    fn a_federated_peer_verifies_only_with_its_trust_domains_bundle() {
        let (own, _) = pki("td1.test", "spiffe://td1.test/me");
        let (td2, peer) = pki("td2.test", "spiffe://td2.test/peer");
        let (td2_other, _) = pki("td2.test", "spiffe://td2.test/x");
        let own = SharedBundle::new(own);
        let anyone: crate::tls::Authorizer = Arc::new(|_: &SpiffeId| true);
        let now = UnixTime::now();
        assert!(verify_peer(&own, None, None, &anyone, &peer, &[], now).is_err());
        let federated = FederatedBundles::new();
        assert!(verify_peer(&own, None, Some(&federated), &anyone, &peer, &[], now).is_err());
        federated.set([td2_other]);
        assert!(
            verify_peer(&own, None, Some(&federated), &anyone, &peer, &[], now).is_err(),
            "another CA of td2 does not verify the peer"
        );
        federated.set([td2]);
        let id = verify_peer(&own, None, Some(&federated), &anyone, &peer, &[], now).unwrap();
        assert_eq!(id.as_str(), "spiffe://td2.test/peer");
        assert_eq!(
            federated.trust_domains(),
            [TrustDomain::new("td2.test").unwrap()]
        );
    }
}
