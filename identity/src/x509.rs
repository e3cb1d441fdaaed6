//! The X509-SVID profile Sigil issues, and the validator that checks it.
//!
//! [`check_leaf`] and [`check_ca`] check one certificate's shape against
//! SPEC.md "X.509-SVIDs the CA issues"; [`check_issued`] adds the links to
//! the issuing CA (AKI, lifetime) without re-verifying the signature the CA
//! just made; [`verify_svid`] is the full check a relying party makes:
//! profile, signatures up to a bundle authority, and validity at `now`.

use std::time::SystemTime;

use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::FromDer;

use crate::bundle::Bundle;
use crate::clock::from_unix_seconds;
use crate::keys::{KeyError, PublicKey};
use crate::spiffe_id::{IdError, SpiffeId, TrustDomain};

/// Longest certificate chain accepted (leaf included).
pub const MAX_CHAIN_LEN: usize = 4;
/// Longest serial number accepted, in DER content bytes (RFC 5280: 20).
pub const MAX_SERIAL_LEN: usize = 20;

/// Which rule a certificate broke.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SvidError {
    #[error("certificate is not valid DER X.509")]
    Malformed,
    #[error("certificate is not X.509 version 3")]
    NotV3,
    #[error("certificate has duplicate or unparseable extensions")]
    BadExtensions,
    #[error("leaf must have exactly one URI SAN, found {0}")]
    UriSanCount(usize),
    #[error("URI SAN is not a valid SPIFFE ID: {0}")]
    BadSpiffeId(IdError),
    #[error("leaf may carry only URI and DNS SANs")]
    OtherSanType,
    #[error("certificate subject is empty")]
    EmptySubject,
    #[error("BasicConstraints extension is missing")]
    MissingBasicConstraints,
    #[error("leaf has cA=true")]
    LeafIsCa,
    #[error("KeyUsage extension is missing")]
    MissingKeyUsage,
    #[error("KeyUsage extension is not critical")]
    KeyUsageNotCritical,
    #[error("leaf KeyUsage lacks digitalSignature")]
    MissingDigitalSignature,
    #[error("leaf KeyUsage has keyCertSign or cRLSign")]
    LeafCanSign,
    #[error("leaf ExtendedKeyUsage must include serverAuth and clientAuth")]
    MissingEku,
    #[error("serial number must be positive and at most {MAX_SERIAL_LEN} bytes")]
    BadSerial,
    #[error("SubjectKeyIdentifier extension is missing")]
    MissingSki,
    #[error("AuthorityKeyIdentifier extension is missing")]
    MissingAki,
    #[error("AuthorityKeyIdentifier does not match the issuer's SubjectKeyIdentifier")]
    AkiMismatch,
    #[error("CA certificate lacks cA=true")]
    CaNotCa,
    #[error("CA certificate KeyUsage lacks keyCertSign")]
    CaCannotSign,
    #[error("CA certificate URI SAN must be the trust domain ID with no path")]
    CaUriSan,
    #[error("CA certificate carries name constraints")]
    NameConstraints,
    #[error("notBefore is after notAfter")]
    InvertedValidity,
    #[error("certificate outlives its issuer")]
    OutlivesIssuer,
    #[error("certificate is not yet valid")]
    NotYetValid,
    #[error("certificate has expired")]
    Expired,
    #[error("chain is empty or longer than {MAX_CHAIN_LEN}")]
    ChainLength,
    #[error("SPIFFE ID is not in trust domain {0}")]
    ForeignTrustDomain(TrustDomain),
    #[error("no authority in the bundle issued this chain")]
    UnknownAuthority,
    #[error("signature check failed: {0}")]
    Signature(KeyError),
    #[error("public key: {0}")]
    Key(KeyError),
}

/// What [`check_issued`] needs to know of the issuing CA.
#[derive(Debug, Clone)]
pub struct IssuerInfo {
    /// The issuer's SubjectKeyIdentifier.
    pub ski: Vec<u8>,
    /// The issuer's notAfter.
    pub not_after: SystemTime,
}

/// Parses DER, refusing trailing bytes.
pub fn parse(der: &[u8]) -> Result<X509Certificate<'_>, SvidError> {
    match X509Certificate::from_der(der) {
        Ok(([], cert)) => Ok(cert),
        _ => Err(SvidError::Malformed),
    }
}

/// The certificate's notBefore and notAfter as `SystemTime`.
pub fn validity(cert: &X509Certificate<'_>) -> (SystemTime, SystemTime) {
    let v = cert.validity();
    let t = |ts: i64| from_unix_seconds(u64::try_from(ts).unwrap_or(0));
    (t(v.not_before.timestamp()), t(v.not_after.timestamp()))
}

/// The serial number as lowercase hex without leading zero bytes, the
/// form Sigil uses to pin and log certificates.
pub fn serial_hex(cert: &X509Certificate<'_>) -> String {
    serial_hex_of(cert.raw_serial())
}

/// Hex of serial bytes (as DER content or as generated), leading zero bytes
/// dropped so that both forms agree.
pub fn serial_hex_of(bytes: &[u8]) -> String {
    let first = bytes
        .iter()
        .position(|&b| b != 0)
        .unwrap_or(bytes.len().saturating_sub(1));
    crate::random::hex(&bytes[first..])
}

/// The SubjectKeyIdentifier, if present.
pub fn subject_key_id(cert: &X509Certificate<'_>) -> Option<Vec<u8>> {
    cert.extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(ki) => Some(ki.0.to_vec()),
            _ => None,
        })
}

/// The AuthorityKeyIdentifier's key id, if present.
pub fn authority_key_id(cert: &X509Certificate<'_>) -> Option<Vec<u8>> {
    cert.extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(aki) => {
                aki.key_identifier.as_ref().map(|k| k.0.to_vec())
            }
            _ => None,
        })
}

fn check_common(cert: &X509Certificate<'_>) -> Result<(), SvidError> {
    if cert.version().0 != 2 {
        return Err(SvidError::NotV3);
    }
    let serial = cert.raw_serial();
    let content = match serial {
        [0, rest @ ..] if rest.first().is_some_and(|b| b & 0x80 != 0) => rest,
        other => other,
    };
    let positive = serial.first().is_some_and(|b| b & 0x80 == 0) && content.iter().any(|&b| b != 0);
    if !positive || content.len() > MAX_SERIAL_LEN {
        return Err(SvidError::BadSerial);
    }
    let (nb, na) = validity(cert);
    if nb > na {
        return Err(SvidError::InvertedValidity);
    }
    PublicKey::from_spki(cert.public_key()).map_err(SvidError::Key)?;
    Ok(())
}

/// Checks a leaf X509-SVID's profile and returns its SPIFFE ID.
pub fn check_leaf(cert: &X509Certificate<'_>) -> Result<SpiffeId, SvidError> {
    check_common(cert)?;
    let bad_ext = |_| SvidError::BadExtensions;
    let bc = cert
        .basic_constraints()
        .map_err(bad_ext)?
        .ok_or(SvidError::MissingBasicConstraints)?;
    if bc.value.ca {
        return Err(SvidError::LeafIsCa);
    }
    let ku = cert
        .key_usage()
        .map_err(bad_ext)?
        .ok_or(SvidError::MissingKeyUsage)?;
    if !ku.critical {
        return Err(SvidError::KeyUsageNotCritical);
    }
    if !ku.value.digital_signature() {
        return Err(SvidError::MissingDigitalSignature);
    }
    if ku.value.key_cert_sign() || ku.value.crl_sign() {
        return Err(SvidError::LeafCanSign);
    }
    let eku = cert
        .extended_key_usage()
        .map_err(bad_ext)?
        .ok_or(SvidError::MissingEku)?;
    if !(eku.value.server_auth && eku.value.client_auth) {
        return Err(SvidError::MissingEku);
    }
    if cert.subject().iter().next().is_none() {
        return Err(SvidError::EmptySubject);
    }
    let san = cert
        .subject_alternative_name()
        .map_err(bad_ext)?
        .ok_or(SvidError::UriSanCount(0))?;
    let mut uris = Vec::new();
    for name in &san.value.general_names {
        match name {
            GeneralName::URI(u) => uris.push(*u),
            GeneralName::DNSName(_) => {}
            _ => return Err(SvidError::OtherSanType),
        }
    }
    let [uri] = uris.as_slice() else {
        return Err(SvidError::UriSanCount(uris.len()));
    };
    let id = SpiffeId::parse(uri).map_err(SvidError::BadSpiffeId)?;
    subject_key_id(cert).ok_or(SvidError::MissingSki)?;
    Ok(id)
}

/// Checks a CA certificate of trust domain `td`.
pub fn check_ca(cert: &X509Certificate<'_>, td: &TrustDomain) -> Result<(), SvidError> {
    check_common(cert)?;
    let bad_ext = |_| SvidError::BadExtensions;
    let bc = cert
        .basic_constraints()
        .map_err(bad_ext)?
        .ok_or(SvidError::MissingBasicConstraints)?;
    if !bc.value.ca {
        return Err(SvidError::CaNotCa);
    }
    let ku = cert
        .key_usage()
        .map_err(bad_ext)?
        .ok_or(SvidError::MissingKeyUsage)?;
    if !ku.value.key_cert_sign() {
        return Err(SvidError::CaCannotSign);
    }
    if cert.name_constraints().map_err(bad_ext)?.is_some() {
        return Err(SvidError::NameConstraints);
    }
    if let Some(san) = cert.subject_alternative_name().map_err(bad_ext)? {
        for name in &san.value.general_names {
            if let GeneralName::URI(u) = name {
                let id = SpiffeId::parse(u).map_err(|_| SvidError::CaUriSan)?;
                if !id.path().is_empty() || !id.is_member_of(td) {
                    return Err(SvidError::CaUriSan);
                }
            }
        }
    }
    subject_key_id(cert).ok_or(SvidError::MissingSki)?;
    Ok(())
}

/// Checks a freshly issued leaf against the profile and its issuer: AKI
/// equals the issuer's SKI and the leaf does not outlive the issuer. The
/// signature is not re-verified; the CA just made it.
pub fn check_issued(leaf_der: &[u8], issuer: &IssuerInfo) -> Result<SpiffeId, SvidError> {
    let cert = parse(leaf_der)?;
    let id = check_leaf(&cert)?;
    match authority_key_id(&cert) {
        None => return Err(SvidError::MissingAki),
        Some(aki) if aki != issuer.ski => return Err(SvidError::AkiMismatch),
        Some(_) => {}
    }
    if validity(&cert).1 > issuer.not_after {
        return Err(SvidError::OutlivesIssuer);
    }
    Ok(id)
}

fn check_time(cert: &X509Certificate<'_>, now: SystemTime) -> Result<(), SvidError> {
    let (nb, na) = validity(cert);
    if now < nb {
        return Err(SvidError::NotYetValid);
    }
    if now > na {
        return Err(SvidError::Expired);
    }
    Ok(())
}

fn verify_signed_by(
    cert: &X509Certificate<'_>,
    issuer: &X509Certificate<'_>,
) -> Result<(), SvidError> {
    if cert.issuer() != issuer.subject() {
        return Err(SvidError::UnknownAuthority);
    }
    let key = PublicKey::from_spki(issuer.public_key()).map_err(SvidError::Key)?;
    key.verify_x509(
        &cert.signature_algorithm,
        cert.tbs_certificate.as_ref(),
        &cert.signature_value.data,
    )
    .map_err(SvidError::Signature)
}

/// Fully verifies an X509-SVID chain (leaf first) against `bundle` at
/// `now`: every profile rule, every signature up to one of the bundle's
/// authorities, every certificate's validity. Returns the leaf's ID.
pub fn verify_svid(
    chain: &[Vec<u8>],
    bundle: &Bundle,
    now: SystemTime,
) -> Result<SpiffeId, SvidError> {
    if chain.is_empty() || chain.len() > MAX_CHAIN_LEN {
        return Err(SvidError::ChainLength);
    }
    let certs = chain
        .iter()
        .map(|d| parse(d))
        .collect::<Result<Vec<_>, _>>()?;
    let id = check_leaf(&certs[0])?;
    if !id.is_member_of(&bundle.trust_domain) {
        return Err(SvidError::ForeignTrustDomain(bundle.trust_domain.clone()));
    }
    let authorities = bundle
        .x509_authorities
        .iter()
        .map(|d| parse(d))
        .collect::<Result<Vec<_>, _>>()?;
    for (i, cert) in certs.iter().enumerate() {
        if i > 0 {
            check_ca(cert, &bundle.trust_domain)?;
        }
        check_time(cert, now)?;
        // The chain ends at the first certificate an authority signed.
        for root in &authorities {
            if verify_signed_by(cert, root).is_ok() {
                return check_time(root, now).map(|()| id);
            }
        }
        match certs.get(i + 1) {
            Some(next) => verify_signed_by(cert, next)?,
            None => return Err(SvidError::UnknownAuthority),
        }
    }
    Err(SvidError::UnknownAuthority)
}

#[cfg(test)]
mod tests;
