//! The trust domain's CRLs as the server sends them over Sync (one per CA,
//! DER, in `Bundle.crls`): parsed once on arrival, served to workloads in
//! the Workload API `crl` fields and, as PEM `X509 CRL` blocks, in SDS
//! bundles for Envoy's SPIFFE validator.
//!
//! The bytes come from the server over an authenticated stream, but they
//! are parsed (x509-parser), so a CRL that does not parse is dropped (and
//! logged) rather than served; the `crl` fuzz target feeds arbitrary bytes
//! through [`CrlSet::parse`]. Signatures are not checked here: the
//! workload's verifier (rustls, Envoy) checks each CRL against its CA.

use std::collections::BTreeSet;

use sigil_identity::Bundle;
use x509_parser::prelude::{FromDer, ParsedExtension, X509Certificate};
use x509_parser::revocation_list::CertificateRevocationList;

/// Most CRLs one message may carry (a trust domain has a handful of CAs).
pub const MAX_CRLS: usize = 64;

/// One parsed CRL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Crl {
    /// As received, DER.
    pub der: Vec<u8>,
    /// The CRL's AuthorityKeyIdentifier: the issuing CA's SubjectKeyIdentifier.
    pub issuer_key_id: Vec<u8>,
    /// Revoked serials, big-endian without leading zero bytes.
    pub revoked: BTreeSet<Vec<u8>>,
}

/// Every CRL of the agent's trust domain.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CrlSet {
    pub crls: Vec<Crl>,
}

fn trim_serial(raw: &[u8]) -> Vec<u8> {
    let first = raw.iter().position(|&b| b != 0).unwrap_or(raw.len());
    raw[first..].to_vec()
}

fn parse_one(der: &[u8]) -> Option<Crl> {
    let (rest, crl) = CertificateRevocationList::from_der(der).ok()?;
    if !rest.is_empty() {
        return None;
    }
    let issuer_key_id = crl
        .extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(aki) => {
                aki.key_identifier.as_ref().map(|k| k.0.to_vec())
            }
            _ => None,
        })?;
    let revoked = crl
        .iter_revoked_certificates()
        .map(|r| trim_serial(r.raw_serial()))
        .collect();
    Some(Crl {
        der: der.to_vec(),
        issuer_key_id,
        revoked,
    })
}

fn subject_key_id(cert: &X509Certificate<'_>) -> Option<Vec<u8>> {
    cert.extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0.to_vec()),
            _ => None,
        })
}

fn authority_key_id(cert: &X509Certificate<'_>) -> Option<Vec<u8>> {
    cert.extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(aki) => {
                aki.key_identifier.as_ref().map(|k| k.0.to_vec())
            }
            _ => None,
        })
}

impl CrlSet {
    /// Parses the CRLs of one message; one that does not parse, or lacks
    /// an authority key id, is dropped and counted in the second value.
    /// At most [`MAX_CRLS`] are kept.
    pub fn parse(raw: &[Vec<u8>]) -> (Self, usize) {
        let mut crls = Vec::new();
        let mut rejected = 0;
        for der in raw {
            match parse_one(der) {
                Some(c) if crls.len() < MAX_CRLS => crls.push(c),
                _ => rejected += 1,
            }
        }
        (Self { crls }, rejected)
    }

    /// Every CRL, DER (the Workload API `crl` fields).
    pub fn ders(&self) -> Vec<Vec<u8>> {
        self.crls.iter().map(|c| c.der.clone()).collect()
    }

    /// Every CRL as PEM `X509 CRL` blocks.
    pub fn pem(&self) -> String {
        self.crls
            .iter()
            .map(|c| sigil_identity::pem::encode("X509 CRL", &c.der))
            .collect()
    }

    /// Whether every X.509 authority of `bundle` has a CRL here: Envoy's
    /// SPIFFE validator checks CRLs for every CA of a chain once any CRL
    /// is in the trust bundle, so CRLs are only added to a bundle they
    /// cover whole (otherwise every certificate from an uncovered CA, e.g.
    /// an upstream root, would be refused).
    pub fn covers(&self, bundle: &Bundle) -> bool {
        !self.crls.is_empty()
            && bundle.x509_authorities.iter().all(|der| {
                X509Certificate::from_der(der)
                    .ok()
                    .and_then(|(_, c)| subject_key_id(&c))
                    .is_some_and(|ski| self.crls.iter().any(|c| c.issuer_key_id == ski))
            })
    }

    /// The PEM trust bundle for SDS: the bundle's CA certificates, followed
    /// by the CRL blocks when they cover every CA (see [`CrlSet::covers`]).
    pub fn bundle_pem(&self, bundle: &Bundle) -> String {
        let mut pem = bundle.x509_pem();
        if self.covers(bundle) {
            pem.push_str(&self.pem());
        }
        pem
    }

    /// Whether the certificate `leaf_der` is on the CRL of its issuer.
    pub fn is_revoked(&self, leaf_der: &[u8]) -> bool {
        let Ok((_, cert)) = X509Certificate::from_der(leaf_der) else {
            return false;
        };
        let Some(aki) = authority_key_id(&cert) else {
            return false;
        };
        let serial = trim_serial(cert.raw_serial());
        self.crls
            .iter()
            .any(|c| c.issuer_key_id == aki && c.revoked.contains(&serial))
    }
}

/// The CRLs a Sync message carries with its bundle, if it carries one.
pub fn carried(msg: &sigil_proto::node::SyncResponse) -> Option<Vec<Vec<u8>>> {
    use sigil_proto::node::sync_response::Event;
    match &msg.event {
        Some(Event::Bundle(b)) => Some(b.crls.clone()),
        Some(Event::Snapshot(s)) => s.bundle.as_ref().map(|b| b.crls.clone()),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
