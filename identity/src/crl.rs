//! Revocation lists for Sigil's own verifiers ([`crate::tls`]): CRLs are
//! accepted only when signed by an X.509 authority of the bundle they are
//! checked with, and a peer whose leaf serial is on its issuer's CRL is
//! refused.
//!
//! A CA without a CRL is not an error (unknown revocation status is
//! allowed): federated trust domains, upstream roots and CAs made by an
//! older Sigil have none, and refusing everything they issued would turn a
//! missing CRL into an outage. The CRLs are swapped while connections use
//! them ([`SharedCrls`]), so a verifier never has to be rebuilt.

use std::collections::BTreeSet;
use std::sync::{Arc, RwLock};

use x509_parser::prelude::{FromDer, ParsedExtension, X509Certificate};
use x509_parser::revocation_list::CertificateRevocationList;

use crate::bundle::Bundle;
use crate::keys::PublicKey;

/// Why a CRL was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CrlError {
    #[error("the CRL does not parse as DER")]
    Parse,
    #[error("the CRL has no AuthorityKeyIdentifier")]
    MissingAki,
    #[error("no authority of the bundle issued this CRL")]
    UnknownIssuer,
    #[error("the CRL's signature does not verify against its CA")]
    Signature,
}

fn key_id(ext: &ParsedExtension<'_>) -> Option<Vec<u8>> {
    match ext {
        ParsedExtension::AuthorityKeyIdentifier(aki) => {
            aki.key_identifier.as_ref().map(|k| k.0.to_vec())
        }
        _ => None,
    }
}

fn trim(serial: &[u8]) -> Vec<u8> {
    let first = serial.iter().position(|&b| b != 0).unwrap_or(serial.len());
    serial[first..].to_vec()
}

/// The revoked serials of each CA, from CRLs that verified.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Revoked {
    /// (issuer SubjectKeyIdentifier, serial without leading zero bytes).
    serials: BTreeSet<(Vec<u8>, Vec<u8>)>,
    /// Issuers (SubjectKeyIdentifier) with a verified CRL.
    issuers: BTreeSet<Vec<u8>>,
}

impl Revoked {
    /// Takes each CRL of `crls` that an authority of `bundle` signed;
    /// returns the set and, for each CRL not taken, why.
    pub fn verified(crls: &[Vec<u8>], bundle: &Bundle) -> (Self, Vec<CrlError>) {
        let cas: Vec<X509Certificate<'_>> = bundle
            .x509_authorities
            .iter()
            .filter_map(|d| X509Certificate::from_der(d).ok().map(|(_, c)| c))
            .collect();
        let mut out = Self::default();
        let mut errors = Vec::new();
        for der in crls {
            match out.add(der, &cas) {
                Ok(()) => {}
                Err(e) => errors.push(e),
            }
        }
        (out, errors)
    }

    fn add(&mut self, der: &[u8], cas: &[X509Certificate<'_>]) -> Result<(), CrlError> {
        let (_, crl) = CertificateRevocationList::from_der(der).map_err(|_| CrlError::Parse)?;
        let aki = crl
            .extensions()
            .iter()
            .find_map(|e| key_id(e.parsed_extension()))
            .ok_or(CrlError::MissingAki)?;
        let ca = cas
            .iter()
            .find(|c| {
                c.extensions().iter().any(|e| {
                    matches!(e.parsed_extension(), ParsedExtension::SubjectKeyIdentifier(k) if k.0 == aki.as_slice())
                }) && c.subject() == crl.issuer()
            })
            .ok_or(CrlError::UnknownIssuer)?;
        let key = PublicKey::from_spki(ca.public_key()).map_err(|_| CrlError::Signature)?;
        key.verify_x509(
            &crl.signature_algorithm,
            crl.tbs_cert_list.as_ref(),
            &crl.signature_value.data,
        )
        .map_err(|_| CrlError::Signature)?;
        for r in crl.iter_revoked_certificates() {
            self.serials.insert((aki.clone(), trim(r.raw_serial())));
        }
        self.issuers.insert(aki);
        Ok(())
    }

    /// Whether the certificate `der` is on its issuer's CRL.
    pub fn is_revoked(&self, der: &[u8]) -> bool {
        let Ok((_, cert)) = X509Certificate::from_der(der) else {
            return false;
        };
        let Some(aki) = cert
            .extensions()
            .iter()
            .find_map(|e| key_id(e.parsed_extension()))
        else {
            return false;
        };
        self.serials.contains(&(aki, trim(cert.raw_serial())))
    }

    /// How many CAs have a verified CRL.
    pub fn issuers(&self) -> usize {
        self.issuers.len()
    }
}

/// Revocation state that can be swapped while connections use it.
#[derive(Debug, Default)]
pub struct SharedCrls(RwLock<Arc<Revoked>>);

impl SharedCrls {
    /// The current state.
    pub fn get(&self) -> Arc<Revoked> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Replaces the state (e.g. with [`Revoked::verified`] of new CRLs).
    pub fn set(&self, revoked: Revoked) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(revoked);
    }
}

#[cfg(test)]
mod tests;
