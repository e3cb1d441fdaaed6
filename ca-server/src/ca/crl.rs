//! Certificate revocation lists: each X.509 CA signs one CRL listing the
//! revoked serials it issued whose certificates have not yet expired. A
//! serial leaves the CRL once its certificate's NotAfter has passed: the
//! certificate is refused for its expiry from then on.
//!
//! The CRL is built by rcgen from the CA certificate as stored
//! (`Issuer::from_ca_cert_der`, so the issuer name and authority key id
//! match the certificate exactly) and signed through [`RcgenKey`], so the
//! key may live on disk, in memory or in a PKCS#11 token.

use std::time::{Duration, SystemTime};

use rcgen::{
    CertificateRevocationListParams, Issuer, KeyIdMethod, RevokedCertParams, SerialNumber,
};
use rustls_pki_types::CertificateDer;
use sigil_identity::x509 as svid;
use time::OffsetDateTime;

use super::CaError;
use super::keys::CaKey;
use super::signing::RcgenKey;
use crate::datastore::{RevocationReason, RevocationRecord};

/// A CRL as signed by one CA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedCrl {
    /// The CA's SubjectKeyIdentifier, lowercase hex.
    pub issuer: String,
    /// The CRL, DER.
    pub der: Vec<u8>,
    /// How many serials it lists.
    pub listed: usize,
}

/// The SubjectKeyIdentifier (lowercase hex) of the CA certificate `der`.
pub fn ca_key_id(der: &[u8]) -> Result<String, CaError> {
    let cert = svid::parse(der).map_err(CaError::SelfCheck)?;
    svid::subject_key_id(&cert)
        .map(|ski| sigil_identity::random::hex(&ski))
        .ok_or(CaError::SelfCheck(svid::SvidError::MissingSki))
}

/// The serials of `revoked` that CA `issuer` lists at `now`: its own, not
/// yet expired. Sorted, so equal inputs give equal CRLs.
pub fn listed<'a>(
    revoked: &'a [RevocationRecord],
    issuer: &str,
    now: SystemTime,
) -> Vec<&'a RevocationRecord> {
    let mut out: Vec<_> = revoked
        .iter()
        .filter(|r| r.issuer == issuer && r.not_after >= now)
        .collect();
    out.sort_by(|a, b| a.serial.cmp(&b.serial));
    out
}

fn reason_code(r: RevocationReason) -> rcgen::RevocationReason {
    match r {
        RevocationReason::KeyCompromise => rcgen::RevocationReason::KeyCompromise,
        RevocationReason::AffiliationChanged => rcgen::RevocationReason::AffiliationChanged,
        RevocationReason::Superseded => rcgen::RevocationReason::Superseded,
        RevocationReason::CessationOfOperation => rcgen::RevocationReason::CessationOfOperation,
        _ => rcgen::RevocationReason::Unspecified,
    }
}

/// Parses a serial as stored (lowercase hex, no leading zero bytes).
fn serial_bytes(hex: &str) -> Result<Vec<u8>, CaError> {
    let bad = || CaError::Build(format!("revoked serial {hex:?} is not hexadecimal"));
    if hex.is_empty() {
        return Err(bad());
    }
    let padded = if hex.len() % 2 == 1 {
        format!("0{hex}")
    } else {
        hex.to_owned()
    };
    (0..padded.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(padded.get(i..i + 2).ok_or_else(bad)?, 16).map_err(|_| bad()))
        .collect()
}

/// Signs the CRL of the CA whose certificate is `ca_der` with its `key`:
/// CRL number `number`, thisUpdate `now`, nextUpdate `now + validity`,
/// listing what [`listed`] selects from `revoked`. A CA certificate whose
/// KeyUsage lacks cRLSign cannot sign CRLs (verifiers would reject them):
/// that is an error naming the CA.
pub fn sign_crl(
    ca_der: &[u8],
    key: &CaKey,
    revoked: &[RevocationRecord],
    number: u64,
    now: SystemTime,
    validity: Duration,
) -> Result<SignedCrl, CaError> {
    let issuer_id = ca_key_id(ca_der)?;
    let listed = listed(revoked, &issuer_id, now);
    let revoked_certs = listed
        .iter()
        .map(|r| {
            Ok(RevokedCertParams {
                serial_number: SerialNumber::from_slice(&serial_bytes(&r.serial)?),
                revocation_time: OffsetDateTime::from(r.revoked_at.min(now)),
                reason_code: Some(reason_code(r.reason)),
                invalidity_date: None,
            })
        })
        .collect::<Result<Vec<_>, CaError>>()?;
    let this_update = OffsetDateTime::from(now);
    let params = CertificateRevocationListParams {
        this_update,
        next_update: this_update + validity,
        crl_number: SerialNumber::from_slice(&number.to_be_bytes()),
        issuing_distribution_point: None,
        revoked_certs,
        key_identifier_method: KeyIdMethod::Sha256,
    };
    let signer = RcgenKey(key.as_ref());
    let issuer = Issuer::from_ca_cert_der(&CertificateDer::from(ca_der), signer).map_err(|e| {
        CaError::Build(format!(
            "CA {issuer_id}: cannot read it as a CRL issuer: {e}"
        ))
    })?;
    let crl = params.signed_by(&issuer).map_err(|e| match e {
        rcgen::Error::IssuerNotCrlSigner => CaError::Build(format!(
            "CA {issuer_id} lacks the cRLSign key usage and cannot sign a CRL; it was made by an older Sigil: its SVIDs cannot be revoked until it is rotated out"
        )),
        e => CaError::Build(format!("CA {issuer_id}: signing its CRL failed: {e}")),
    })?;
    Ok(SignedCrl {
        issuer: issuer_id,
        der: crl.der().to_vec(),
        listed: listed.len(),
    })
}

#[cfg(test)]
mod tests;
