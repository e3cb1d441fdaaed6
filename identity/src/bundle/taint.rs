//! Taint markers: authorities an operator suspects are compromised.
//!
//! A tainted authority stays in the bundle (SVIDs it signed still verify,
//! so nothing breaks while they are replaced) but every holder of such an
//! SVID replaces it, and JWT-SVIDs whose `kid` is tainted are not served
//! from caches. The markers travel with the bundle (Sync, storage); they
//! are not part of the SPIFFE JWK Set that workloads see. Revoking an
//! authority removes it from the bundle, and its marker with it.

use x509_parser::prelude::{FromDer, X509Certificate};

use super::Bundle;
use crate::jws::{Alg, parse};
use crate::x509::{authority_key_id, subject_key_id};

impl Bundle {
    /// Sets the taint markers, keeping only authorities this bundle holds
    /// (each once, in the order given).
    pub fn set_taint(&mut self, x509: Vec<Vec<u8>>, jwt_kids: Vec<String>) {
        let mut tainted_x509: Vec<Vec<u8>> = Vec::new();
        for der in x509 {
            if self.x509_authorities.contains(&der) && !tainted_x509.contains(&der) {
                tainted_x509.push(der);
            }
        }
        let mut tainted_jwt: Vec<String> = Vec::new();
        for kid in jwt_kids {
            if self.jwt_authority(&kid).is_some() && !tainted_jwt.contains(&kid) {
                tainted_jwt.push(kid);
            }
        }
        self.tainted_x509_authorities = tainted_x509;
        self.tainted_jwt_kids = tainted_jwt;
    }

    /// Drops markers of authorities no longer in the bundle.
    pub fn retain_present_taint(&mut self) {
        let x509 = std::mem::take(&mut self.tainted_x509_authorities);
        let jwt = std::mem::take(&mut self.tainted_jwt_kids);
        self.set_taint(x509, jwt);
    }

    /// Whether any authority is tainted.
    pub fn has_taint(&self) -> bool {
        !self.tainted_x509_authorities.is_empty() || !self.tainted_jwt_kids.is_empty()
    }

    /// Whether the JWT authority `kid` is tainted.
    pub fn is_jwt_kid_tainted(&self, kid: &str) -> bool {
        self.tainted_jwt_kids.iter().any(|k| k == kid)
    }

    /// Whether `token`'s header names a tainted `kid`. A token whose header
    /// cannot be read is not called tainted (validation refuses it anyway).
    pub fn is_jwt_tainted(&self, token: &str) -> bool {
        !self.tainted_jwt_kids.is_empty()
            && parse(token, Alg::ALL).is_ok_and(|jws| self.is_jwt_kid_tainted(jws.kid()))
    }

    /// Whether the certificate chain `chain` (DER, leaf first) was signed by
    /// a tainted X.509 authority: a tainted certificate is in the chain, or
    /// a certificate in it names a tainted authority's SubjectKeyIdentifier
    /// as its AuthorityKeyIdentifier. Unreadable certificates are skipped.
    pub fn chain_uses_tainted(&self, chain: &[Vec<u8>]) -> bool {
        if self.tainted_x509_authorities.is_empty() {
            return false;
        }
        let tainted_ids: Vec<Vec<u8>> = self
            .tainted_x509_authorities
            .iter()
            .filter_map(|der| X509Certificate::from_der(der).ok())
            .filter_map(|(_, cert)| subject_key_id(&cert))
            .collect();
        chain.iter().any(|der| {
            self.tainted_x509_authorities.contains(der)
                || X509Certificate::from_der(der)
                    .ok()
                    .and_then(|(_, cert)| authority_key_id(&cert))
                    .is_some_and(|aki| tainted_ids.contains(&aki))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spiffe_id::TrustDomain;
    use crate::testutil;

    fn bundle_of(cas: &[&testutil::TestCa]) -> Bundle {
        Bundle {
            x509_authorities: cas.iter().map(|c| c.der.clone()).collect(),
            ..Bundle::new(TrustDomain::new("example.org").unwrap())
        }
    }

    #[test]
    fn a_chain_signed_by_a_tainted_authority_is_found_by_its_aki() {
        let old = testutil::ca("example.org");
        let new = testutil::ca("example.org");
        let mut b = bundle_of(&[&old, &new]);
        let leaf_old = old.issue(&testutil::leaf_params("spiffe://example.org/w"));
        let leaf_new = new.issue(&testutil::leaf_params("spiffe://example.org/w"));
        assert!(!b.chain_uses_tainted(std::slice::from_ref(&leaf_old)));
        b.set_taint(vec![old.der.clone()], vec![]);
        assert!(b.has_taint());
        assert!(b.chain_uses_tainted(std::slice::from_ref(&leaf_old)));
        assert!(!b.chain_uses_tainted(std::slice::from_ref(&leaf_new)));
    }

    #[test]
    fn a_tainted_intermediate_in_the_chain_counts() {
        let ca = testutil::ca("example.org");
        let mut b = bundle_of(&[&ca]);
        b.set_taint(vec![ca.der.clone()], vec![]);
        assert!(b.chain_uses_tainted(&[vec![1, 2, 3], ca.der.clone()]));
    }

    #[test]
    fn markers_of_absent_authorities_are_dropped() {
        let ca = testutil::ca("example.org");
        let stranger = testutil::ca("example.org");
        let mut b = bundle_of(&[&ca]);
        b.set_taint(
            vec![stranger.der.clone(), ca.der.clone(), ca.der.clone()],
            vec!["nope".into()],
        );
        assert_eq!(b.tainted_x509_authorities, vec![ca.der.clone()]);
        assert!(b.tainted_jwt_kids.is_empty());
        b.x509_authorities.clear();
        b.retain_present_taint();
        assert!(!b.has_taint());
    }

    #[test]
    fn taint_survives_storage_and_old_stored_bundles_load() {
        let ca = testutil::ca("example.org");
        let mut b = bundle_of(&[&ca]);
        b.set_taint(vec![ca.der.clone()], vec![]);
        let stored = serde_json::to_vec(&b).unwrap();
        let back: Bundle = serde_json::from_slice(&stored).unwrap();
        assert_eq!(back, b);
        // A bundle stored before taint existed has no marker members.
        let old = serde_json::json!({
            "trust_domain": "example.org",
            "jwks": bundle_of(&[&ca]).to_jwks(),
        });
        let back: Bundle = serde_json::from_value(old).unwrap();
        assert!(!back.has_taint());
        assert_eq!(back.x509_authorities, vec![ca.der.clone()]);
    }

    #[test]
    fn the_jwks_carries_no_markers() {
        let ca = testutil::ca("example.org");
        let mut b = bundle_of(&[&ca]);
        b.set_taint(vec![ca.der.clone()], vec![]);
        let jwks = String::from_utf8(b.to_jwks_bytes()).unwrap();
        assert!(!jwks.contains("taint"));
    }
}
