//! Reading a PKCS#10 CSR for exactly one thing: its public key.
//!
//! The CSR's signature is verified (proof that the caller holds the private
//! key), the key type is checked against the accepted set, and everything
//! else the CSR asks for (subject, SANs, extensions, CA bits, lifetimes) is
//! ignored. Oversized input is refused before any parsing or crypto.

use sigil_identity::keys::{Curve, KeyError, PublicKey};
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::prelude::FromDer;

/// Largest CSR accepted, in bytes.
pub const MAX_CSR_LEN: usize = 16 * 1024;
/// Largest RSA workload key accepted, in bits.
pub const MAX_CSR_RSA_BITS: usize = 4096;

/// Why a CSR was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsrError {
    #[error("CSR is larger than {MAX_CSR_LEN} bytes")]
    TooLarge,
    #[error("CSR is not valid DER PKCS#10")]
    Malformed,
    #[error("CSR version must be 1 (0)")]
    BadVersion,
    #[error("CSR key is not accepted: {0}; use EC P-256, EC P-384 or RSA 2048-4096")]
    Key(KeyError),
    #[error("CSR signature does not verify: {0}")]
    Signature(KeyError),
}

/// The public key taken from a verified CSR, ready for rcgen.
#[derive(Debug, Clone)]
pub struct CsrPublicKey {
    /// The parsed key.
    pub key: PublicKey,
    /// The subjectPublicKey bit string contents.
    raw: Vec<u8>,
    algorithm: &'static rcgen::SignatureAlgorithm,
}

impl rcgen::PublicKeyData for CsrPublicKey {
    fn der_bytes(&self) -> &[u8] {
        &self.raw
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        self.algorithm
    }
}

/// Verifies `der` and returns only its public key.
pub fn public_key_from_csr(der: &[u8]) -> Result<CsrPublicKey, CsrError> {
    if der.len() > MAX_CSR_LEN {
        return Err(CsrError::TooLarge);
    }
    let csr = match X509CertificationRequest::from_der(der) {
        Ok(([], csr)) => csr,
        _ => return Err(CsrError::Malformed),
    };
    let info = &csr.certification_request_info;
    if info.version.0 != 0 {
        return Err(CsrError::BadVersion);
    }
    let key = PublicKey::from_spki(&info.subject_pki).map_err(CsrError::Key)?;
    let algorithm = match &key {
        PublicKey::Ec {
            curve: Curve::P256, ..
        } => &rcgen::PKCS_ECDSA_P256_SHA256,
        PublicKey::Ec {
            curve: Curve::P384, ..
        } => &rcgen::PKCS_ECDSA_P384_SHA384,
        PublicKey::Rsa { .. } if key.rsa_bits() > MAX_CSR_RSA_BITS => {
            return Err(CsrError::Key(KeyError::RsaSize(key.rsa_bits())));
        }
        PublicKey::Rsa { .. } => &rcgen::PKCS_RSA_SHA256,
    };
    key.verify_x509(
        &csr.signature_algorithm,
        info.raw,
        &csr.signature_value.data,
    )
    .map_err(CsrError::Signature)?;
    Ok(CsrPublicKey {
        raw: info.subject_pki.subject_public_key.data.to_vec(),
        key,
        algorithm,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, KeyPair};

    fn csr_for(key: &KeyPair) -> Vec<u8> {
        let params = CertificateParams::new(vec!["ignored.example".to_string()]).unwrap();
        params.serialize_request(key).unwrap().der().to_vec()
    }

    #[test]
    fn accepts_p256_and_p384_and_keeps_only_the_key() {
        for alg in [
            &rcgen::PKCS_ECDSA_P256_SHA256,
            &rcgen::PKCS_ECDSA_P384_SHA384,
        ] {
            let key = KeyPair::generate_for(alg).unwrap();
            let got = public_key_from_csr(&csr_for(&key)).unwrap();
            assert_eq!(
                rcgen::PublicKeyData::der_bytes(&got),
                rcgen::PublicKeyData::der_bytes(&key)
            );
        }
    }

    #[test]
    fn refuses_oversized_before_parsing() {
        assert_eq!(
            public_key_from_csr(&vec![0x30; MAX_CSR_LEN + 1]).unwrap_err(),
            CsrError::TooLarge
        );
    }

    #[test]
    fn refuses_malformed_der() {
        for bad in [
            &[][..],
            &[0x30, 0x00],
            &[0xff; 40][..],
            b"-----BEGIN CERTIFICATE REQUEST-----",
        ] {
            assert_eq!(public_key_from_csr(bad).unwrap_err(), CsrError::Malformed);
        }
        let key = KeyPair::generate().unwrap();
        let mut der = csr_for(&key);
        der.push(0);
        assert_eq!(
            public_key_from_csr(&der).unwrap_err(),
            CsrError::Malformed,
            "trailing bytes"
        );
        let der = csr_for(&key);
        assert_eq!(
            public_key_from_csr(&der[..der.len() - 5]).unwrap_err(),
            CsrError::Malformed,
            "truncated"
        );
    }

    #[test]
    fn refuses_wrong_signature() {
        let key = KeyPair::generate().unwrap();
        let mut der = csr_for(&key);
        let n = der.len();
        der[n - 3] ^= 0x5a;
        assert!(matches!(
            public_key_from_csr(&der),
            Err(CsrError::Signature(_)) | Err(CsrError::Malformed)
        ));
        // A CSR whose key was swapped for another one: valid DER, wrong signature.
        let other = KeyPair::generate().unwrap();
        let good = csr_for(&key);
        let swapped: Vec<u8> = {
            let (a, b) = (
                rcgen::PublicKeyData::der_bytes(&key),
                rcgen::PublicKeyData::der_bytes(&other),
            );
            let at = good.windows(a.len()).position(|w| w == a).unwrap();
            let mut v = good.clone();
            v[at..at + a.len()].copy_from_slice(b);
            v
        };
        assert_eq!(
            public_key_from_csr(&swapped).unwrap_err(),
            CsrError::Signature(KeyError::BadSignature)
        );
    }

    #[test]
    fn refuses_unsupported_keys() {
        let ed = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        assert_eq!(
            public_key_from_csr(&csr_for(&ed)).unwrap_err(),
            CsrError::Key(KeyError::UnsupportedKeyType)
        );
    }
}
