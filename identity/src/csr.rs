//! Reading a PKCS#10 CSR for exactly one thing: its public key. It sits
//! next to [`crate::x509`], below the server, because it parses untrusted
//! bytes (the `csr` fuzz target depends on this crate only).
//!
//! The CSR's signature is verified (proof that the caller holds the private
//! key), the key type is checked against the accepted set, and everything
//! else the CSR asks for (subject, SANs, extensions, CA bits, lifetimes) is
//! ignored. Oversized input is refused before any parsing or crypto.

use crate::der;
use crate::keys::{KeyError, PublicKey, X509SigAlg};

/// Largest CSR accepted, in bytes.
pub const MAX_CSR_LEN: usize = 16 * 1024;
/// Largest RSA workload key accepted, in bits.
pub const MAX_CSR_RSA_BITS: usize = 4096;

/// Why a CSR was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
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

/// The public key taken from a verified CSR.
#[derive(Debug, Clone)]
pub struct CsrPublicKey {
    /// The parsed key.
    pub key: PublicKey,
    /// The key's canonical SubjectPublicKeyInfo, DER.
    pub spki: Vec<u8>,
    /// The subjectPublicKey bit string contents (for the key identifier).
    pub key_bits: Vec<u8>,
}

/// The parts of a PKCS#10 request Sigil reads.
struct CsrParts<'a> {
    /// The DER CertificationRequestInfo: what the signature covers.
    info: &'a [u8],
    /// Content octets of the signature algorithm OID.
    alg_oid: &'a [u8],
    signature: &'a [u8],
    spki: &'a [u8],
}

/// Splits a PKCS#10 request into the parts above, checking the structure;
/// nothing else of the CSR is read.
fn split(der: &[u8]) -> Result<CsrParts<'_>, CsrError> {
    let m = |_| CsrError::Malformed;
    let (outer, rest) = der::expect(der, 0x30).map_err(m)?;
    if !rest.is_empty() {
        return Err(CsrError::Malformed);
    }
    let (info, rest) = der::expect(outer.content, 0x30).map_err(m)?;
    let (alg, rest) = der::expect(rest, 0x30).map_err(m)?;
    let (sig, rest) = der::expect(rest, 0x03).map_err(m)?;
    if !rest.is_empty() {
        return Err(CsrError::Malformed);
    }
    let (version, rest) = der::expect(info.content, 0x02).map_err(m)?;
    if version.content != [0] {
        return Err(CsrError::BadVersion);
    }
    let (_subject, rest) = der::expect(rest, 0x30).map_err(m)?;
    let (spki, rest) = der::expect(rest, 0x30).map_err(m)?;
    let (_attributes, rest) = der::expect(rest, 0xa0).map_err(m)?;
    if !rest.is_empty() {
        return Err(CsrError::Malformed);
    }
    let (oid, params) = der::expect(alg.content, 0x06).map_err(m)?;
    if !(params.is_empty() || params == [0x05, 0x00]) {
        return Err(CsrError::Malformed);
    }
    let signature = match sig.content.split_first() {
        Some((0, bits)) => bits,
        _ => return Err(CsrError::Malformed),
    };
    Ok(CsrParts {
        info: info.whole,
        alg_oid: oid.content,
        signature,
        spki: spki.whole,
    })
}

/// Verifies `der` and returns only its public key.
pub fn public_key_from_csr(der: &[u8]) -> Result<CsrPublicKey, CsrError> {
    if der.len() > MAX_CSR_LEN {
        return Err(CsrError::TooLarge);
    }
    let CsrParts {
        info,
        alg_oid,
        signature,
        spki,
    } = split(der)?;
    let key = PublicKey::from_spki_der(spki).map_err(|e| match e {
        KeyError::Malformed => CsrError::Malformed,
        e => CsrError::Key(e),
    })?;
    if key.rsa_bits() > MAX_CSR_RSA_BITS {
        return Err(CsrError::Key(KeyError::RsaSize(key.rsa_bits())));
    }
    let alg = X509SigAlg::from_oid_content(alg_oid)
        .ok_or(CsrError::Signature(KeyError::UnsupportedSignatureAlgorithm))?;
    key.verify_x509_alg(alg, info, signature)
        .map_err(CsrError::Signature)?;
    // Only the key itself goes on: re-encoded canonically, not copied.
    let spki = key.to_spki_der();
    let key_bits = match &key {
        PublicKey::Ec { point, .. } => point.clone(),
        PublicKey::Rsa { .. } => {
            let (outer, _) = der::read(&spki).map_err(|_| CsrError::Malformed)?;
            let (_, rest) = der::read(outer.content).map_err(|_| CsrError::Malformed)?;
            let (bits, _) = der::expect(rest, 0x03).map_err(|_| CsrError::Malformed)?;
            bits.content.get(1..).ok_or(CsrError::Malformed)?.to_vec()
        }
    };
    Ok(CsrPublicKey {
        key,
        spki,
        key_bits,
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
            assert_eq!(got.key_bits, rcgen::PublicKeyData::der_bytes(&key));
            assert_eq!(
                got.spki,
                rcgen::PublicKeyData::subject_public_key_info(&key)
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
