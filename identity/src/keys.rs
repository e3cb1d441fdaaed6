//! Public keys as Sigil meets them: in certificates, CSRs and JWK Sets.
//!
//! Only the key types Sigil accepts exist here (EC P-256, EC P-384, RSA), so
//! a parsed [`PublicKey`] is already known to be of an allowed kind.
//! Signatures are verified with ring.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use ring::signature::{self as sig, RsaPublicKeyComponents, UnparsedPublicKey};
use serde_json::{Map, Value, json};

use crate::der;
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION,
};
use x509_parser::public_key::PublicKey as ParsedKey;
use x509_parser::x509::{AlgorithmIdentifier, SubjectPublicKeyInfo};

const OID_EC_PUBLIC_KEY: &[u8] = &[0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
const OID_P256: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const OID_P384: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];
const OID_RSA_ENCRYPTION: &[u8] = &[
    0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01,
];

/// Smallest RSA modulus accepted anywhere, in bits.
pub const MIN_RSA_BITS: usize = 2048;
/// Largest RSA modulus accepted for verification, in bits.
pub const MAX_RSA_BITS: usize = 8192;

/// Why a key or signature was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    #[error("public key is not valid DER SubjectPublicKeyInfo")]
    Malformed,
    #[error("unsupported key type; accepted are EC P-256, EC P-384 and RSA")]
    UnsupportedKeyType,
    #[error("RSA key of {0} bits is outside the accepted range")]
    RsaSize(usize),
    #[error("EC point is not an uncompressed point of the curve")]
    BadEcPoint,
    #[error("unsupported signature algorithm")]
    UnsupportedSignatureAlgorithm,
    #[error("signature algorithm does not match the key type")]
    AlgorithmKeyMismatch,
    #[error("signature does not verify")]
    BadSignature,
    #[error("invalid JWK: {0}")]
    Jwk(&'static str),
}

/// An elliptic curve Sigil accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Curve {
    /// NIST P-256 (secp256r1).
    P256,
    /// NIST P-384 (secp384r1).
    P384,
}

impl Curve {
    fn coordinate_len(self) -> usize {
        match self {
            Curve::P256 => 32,
            Curve::P384 => 48,
        }
    }

    /// The JWK `crv` name.
    pub fn jwk_name(self) -> &'static str {
        match self {
            Curve::P256 => "P-256",
            Curve::P384 => "P-384",
        }
    }
}

/// A public key of an accepted type.
#[derive(Clone, PartialEq, Eq, Hash)]
pub enum PublicKey {
    /// An EC key: the uncompressed point (`04 || x || y`).
    Ec { curve: Curve, point: Vec<u8> },
    /// An RSA key: big-endian modulus and exponent without leading zeros.
    Rsa { n: Vec<u8>, e: Vec<u8> },
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PublicKey::Ec { curve, .. } => write!(f, "PublicKey::Ec({curve:?})"),
            PublicKey::Rsa { .. } => write!(f, "PublicKey::Rsa({} bits)", self.rsa_bits()),
        }
    }
}

fn strip_leading_zeros(b: &[u8]) -> &[u8] {
    let first = b.iter().position(|&x| x != 0).unwrap_or(b.len());
    &b[first..]
}

fn bit_len(b: &[u8]) -> usize {
    let b = strip_leading_zeros(b);
    match b.first() {
        Some(&top) => (b.len() - 1) * 8 + (8 - top.leading_zeros() as usize),
        None => 0,
    }
}

impl PublicKey {
    /// Parses a DER `SubjectPublicKeyInfo` (strict DER, no trailing bytes).
    pub fn from_spki_der(input: &[u8]) -> Result<Self, KeyError> {
        let m = |_| KeyError::Malformed;
        let (spki, rest) = der::expect(input, 0x30).map_err(m)?;
        let (alg, rest2) = der::expect(spki.content, 0x30).map_err(m)?;
        let (bits, rest3) = der::expect(rest2, 0x03).map_err(m)?;
        if !rest.is_empty() || !rest3.is_empty() {
            return Err(KeyError::Malformed);
        }
        let key = match bits.content.split_first() {
            Some((0, key)) => key,
            _ => return Err(KeyError::Malformed),
        };
        let (oid, params) = der::expect(alg.content, 0x06).map_err(m)?;
        if oid.whole == OID_EC_PUBLIC_KEY {
            let curve = match params {
                p if p == OID_P256 => Curve::P256,
                p if p == OID_P384 => Curve::P384,
                _ => return Err(KeyError::UnsupportedKeyType),
            };
            Self::ec(curve, key.to_vec())
        } else if oid.whole == OID_RSA_ENCRYPTION {
            if params != [0x05, 0x00] {
                return Err(KeyError::Malformed);
            }
            let (seq, rest) = der::expect(key, 0x30).map_err(m)?;
            let (n, rest2) = der::expect(seq.content, 0x02).map_err(m)?;
            let (e, rest3) = der::expect(rest2, 0x02).map_err(m)?;
            if !rest.is_empty() || !rest3.is_empty() {
                return Err(KeyError::Malformed);
            }
            Self::rsa(n.content, e.content)
        } else {
            Err(KeyError::UnsupportedKeyType)
        }
    }

    /// Converts a parsed `SubjectPublicKeyInfo`.
    pub fn from_spki(spki: &SubjectPublicKeyInfo<'_>) -> Result<Self, KeyError> {
        let alg = &spki.algorithm.algorithm;
        if *alg == OID_KEY_TYPE_EC_PUBLIC_KEY {
            let curve_oid = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .ok_or(KeyError::UnsupportedKeyType)?;
            let curve = if curve_oid == OID_EC_P256 {
                Curve::P256
            } else if curve_oid == OID_NIST_EC_P384 {
                Curve::P384
            } else {
                return Err(KeyError::UnsupportedKeyType);
            };
            Self::ec(curve, spki.subject_public_key.data.to_vec())
        } else if *alg == OID_PKCS1_RSAENCRYPTION {
            match spki.parsed() {
                Ok(ParsedKey::RSA(rsa)) => Self::rsa(rsa.modulus, rsa.exponent),
                _ => Err(KeyError::Malformed),
            }
        } else {
            Err(KeyError::UnsupportedKeyType)
        }
    }

    /// An EC key from its uncompressed point; only the encoding is checked
    /// here, ring checks the point is on the curve when verifying.
    pub fn ec(curve: Curve, point: Vec<u8>) -> Result<Self, KeyError> {
        if point.len() != 1 + 2 * curve.coordinate_len() || point[0] != 4 {
            return Err(KeyError::BadEcPoint);
        }
        Ok(PublicKey::Ec { curve, point })
    }

    /// An RSA key from modulus and exponent, refusing sizes outside
    /// [`MIN_RSA_BITS`]..=[`MAX_RSA_BITS`].
    pub fn rsa(n: &[u8], e: &[u8]) -> Result<Self, KeyError> {
        let bits = bit_len(n);
        if !(MIN_RSA_BITS..=MAX_RSA_BITS).contains(&bits) {
            return Err(KeyError::RsaSize(bits));
        }
        let e = strip_leading_zeros(e);
        if e.is_empty() || e.len() > 4 {
            return Err(KeyError::Malformed);
        }
        Ok(PublicKey::Rsa {
            n: strip_leading_zeros(n).to_vec(),
            e: e.to_vec(),
        })
    }

    /// RSA modulus size in bits, 0 for EC keys.
    pub fn rsa_bits(&self) -> usize {
        match self {
            PublicKey::Rsa { n, .. } => bit_len(n),
            PublicKey::Ec { .. } => 0,
        }
    }

    /// Verifies an X.509/PKCS#10 signature made with algorithm `alg`.
    pub fn verify_x509(
        &self,
        alg: &AlgorithmIdentifier<'_>,
        msg: &[u8],
        signature: &[u8],
    ) -> Result<(), KeyError> {
        let alg = X509SigAlg::from_oid_content(alg.algorithm.as_bytes())
            .ok_or(KeyError::UnsupportedSignatureAlgorithm)?;
        self.verify_x509_alg(alg, msg, signature)
    }

    /// Verifies a signature made with a known X.509 signature algorithm.
    pub fn verify_x509_alg(
        &self,
        alg: X509SigAlg,
        msg: &[u8],
        signature: &[u8],
    ) -> Result<(), KeyError> {
        use X509SigAlg::*;
        let verifier = match (alg, self) {
            (
                EcdsaSha256,
                PublicKey::Ec {
                    curve: Curve::P256, ..
                },
            ) => Verifier::Ecdsa(&sig::ECDSA_P256_SHA256_ASN1),
            (
                EcdsaSha256,
                PublicKey::Ec {
                    curve: Curve::P384, ..
                },
            ) => Verifier::Ecdsa(&sig::ECDSA_P384_SHA256_ASN1),
            (
                EcdsaSha384,
                PublicKey::Ec {
                    curve: Curve::P256, ..
                },
            ) => Verifier::Ecdsa(&sig::ECDSA_P256_SHA384_ASN1),
            (
                EcdsaSha384,
                PublicKey::Ec {
                    curve: Curve::P384, ..
                },
            ) => Verifier::Ecdsa(&sig::ECDSA_P384_SHA384_ASN1),
            (RsaPkcs1Sha256, PublicKey::Rsa { .. }) => {
                Verifier::Rsa(&sig::RSA_PKCS1_2048_8192_SHA256)
            }
            (RsaPkcs1Sha384, PublicKey::Rsa { .. }) => {
                Verifier::Rsa(&sig::RSA_PKCS1_2048_8192_SHA384)
            }
            (RsaPkcs1Sha512, PublicKey::Rsa { .. }) => {
                Verifier::Rsa(&sig::RSA_PKCS1_2048_8192_SHA512)
            }
            _ => return Err(KeyError::AlgorithmKeyMismatch),
        };
        self.verify_with(verifier, msg, signature)
    }

    /// Verifies `signature` over `msg` with `verifier`, which must suit this
    /// key's type.
    pub fn verify_with(
        &self,
        verifier: Verifier,
        msg: &[u8],
        signature: &[u8],
    ) -> Result<(), KeyError> {
        let ok = match (self, verifier) {
            // An algorithm of the other curve fails ring's point parsing, so
            // it surfaces as a bad signature.
            (PublicKey::Ec { point, .. }, Verifier::Ecdsa(alg)) => {
                UnparsedPublicKey::new(alg, point).verify(msg, signature)
            }
            (PublicKey::Rsa { n, e }, Verifier::Rsa(params)) => {
                RsaPublicKeyComponents { n, e }.verify(params, msg, signature)
            }
            _ => return Err(KeyError::AlgorithmKeyMismatch),
        };
        ok.map_err(|_| KeyError::BadSignature)
    }

    /// The canonical DER SubjectPublicKeyInfo of this key: named-curve EC
    /// or `rsaEncryption` with NULL parameters.
    pub fn to_spki_der(&self) -> Vec<u8> {
        let (alg, key) = match self {
            PublicKey::Ec { curve, point } => {
                let curve_oid = match curve {
                    Curve::P256 => OID_P256,
                    Curve::P384 => OID_P384,
                };
                ([OID_EC_PUBLIC_KEY, curve_oid].concat(), point.clone())
            }
            PublicKey::Rsa { n, e } => {
                let mut ints = Vec::with_capacity(n.len() + e.len() + 10);
                der::push_unsigned(&mut ints, n);
                der::push_unsigned(&mut ints, e);
                (
                    [OID_RSA_ENCRYPTION, &[0x05, 0x00]].concat(),
                    der::wrap(0x30, &ints),
                )
            }
        };
        let mut content = der::wrap(0x30, &alg);
        let mut bits = Vec::with_capacity(key.len() + 1);
        bits.push(0);
        bits.extend_from_slice(&key);
        der::push(&mut content, 0x03, &bits);
        der::wrap(0x30, &content)
    }

    /// The key's JWK members (`kty`, `crv`/`x`/`y` or `n`/`e`).
    pub fn jwk_members(&self) -> Map<String, Value> {
        let mut m = Map::new();
        match self {
            PublicKey::Ec { curve, point } => {
                let len = curve.coordinate_len();
                m.insert("kty".into(), json!("EC"));
                m.insert("crv".into(), json!(curve.jwk_name()));
                m.insert("x".into(), json!(B64URL.encode(&point[1..1 + len])));
                m.insert("y".into(), json!(B64URL.encode(&point[1 + len..])));
            }
            PublicKey::Rsa { n, e } => {
                m.insert("kty".into(), json!("RSA"));
                m.insert("n".into(), json!(B64URL.encode(n)));
                m.insert("e".into(), json!(B64URL.encode(e)));
            }
        }
        m
    }

    /// Reads a key from JWK members.
    pub fn from_jwk(m: &Map<String, Value>) -> Result<Self, KeyError> {
        let field = |name: &'static str| -> Result<Vec<u8>, KeyError> {
            let s = m
                .get(name)
                .and_then(Value::as_str)
                .ok_or(KeyError::Jwk("missing key parameter"))?;
            B64URL
                .decode(s)
                .map_err(|_| KeyError::Jwk("key parameter is not base64url"))
        };
        match m.get("kty").and_then(Value::as_str) {
            Some("EC") => {
                let curve = match m.get("crv").and_then(Value::as_str) {
                    Some("P-256") => Curve::P256,
                    Some("P-384") => Curve::P384,
                    _ => return Err(KeyError::UnsupportedKeyType),
                };
                let (x, y) = (field("x")?, field("y")?);
                let len = curve.coordinate_len();
                if x.len() != len || y.len() != len {
                    return Err(KeyError::BadEcPoint);
                }
                let mut point = Vec::with_capacity(1 + 2 * len);
                point.push(4);
                point.extend_from_slice(&x);
                point.extend_from_slice(&y);
                Self::ec(curve, point)
            }
            Some("RSA") => Self::rsa(&field("n")?, &field("e")?),
            Some(_) => Err(KeyError::UnsupportedKeyType),
            None => Err(KeyError::Jwk("missing kty")),
        }
    }
}

/// The X.509 signature algorithms Sigil accepts on certificates and CSRs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum X509SigAlg {
    /// ecdsa-with-SHA256 (1.2.840.10045.4.3.2).
    EcdsaSha256,
    /// ecdsa-with-SHA384 (1.2.840.10045.4.3.3).
    EcdsaSha384,
    /// sha256WithRSAEncryption (1.2.840.113549.1.1.11).
    RsaPkcs1Sha256,
    /// sha384WithRSAEncryption (1.2.840.113549.1.1.12).
    RsaPkcs1Sha384,
    /// sha512WithRSAEncryption (1.2.840.113549.1.1.13).
    RsaPkcs1Sha512,
}

impl X509SigAlg {
    /// Recognises an algorithm by the content octets of its OID.
    pub fn from_oid_content(oid: &[u8]) -> Option<Self> {
        const ECDSA: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03];
        const PKCS1: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01];
        match oid.split_last() {
            Some((2, head)) if head == ECDSA => Some(Self::EcdsaSha256),
            Some((3, head)) if head == ECDSA => Some(Self::EcdsaSha384),
            Some((11, head)) if head == PKCS1 => Some(Self::RsaPkcs1Sha256),
            Some((12, head)) if head == PKCS1 => Some(Self::RsaPkcs1Sha384),
            Some((13, head)) if head == PKCS1 => Some(Self::RsaPkcs1Sha512),
            _ => None,
        }
    }
}

/// A ring verification algorithm, split by the key type it needs.
#[derive(Debug, Clone, Copy)]
pub enum Verifier {
    /// ECDSA; the algorithm fixes the curve.
    Ecdsa(&'static sig::EcdsaVerificationAlgorithm),
    /// RSA PKCS#1 v1.5 or PSS.
    Rsa(&'static sig::RsaParameters),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ec_key_round_trips_through_spki_and_jwk() {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let key =
            PublicKey::from_spki_der(&rcgen::PublicKeyData::subject_public_key_info(&kp)).unwrap();
        assert!(matches!(
            key,
            PublicKey::Ec {
                curve: Curve::P256,
                ..
            }
        ));
        let back = PublicKey::from_jwk(&key.jwk_members()).unwrap();
        assert_eq!(back, key);
    }

    #[test]
    fn canonical_spki_matches_what_rcgen_and_openssl_write() {
        for alg in [
            &rcgen::PKCS_ECDSA_P256_SHA256,
            &rcgen::PKCS_ECDSA_P384_SHA384,
        ] {
            let kp = rcgen::KeyPair::generate_for(alg).unwrap();
            let spki = rcgen::PublicKeyData::subject_public_key_info(&kp);
            assert_eq!(PublicKey::from_spki_der(&spki).unwrap().to_spki_der(), spki);
        }
        let n: Vec<u8> = std::iter::once(0xc3)
            .chain(std::iter::repeat_n(0x55, 255))
            .collect();
        let rsa = PublicKey::rsa(&n, &[1, 0, 1]).unwrap();
        let der = rsa.to_spki_der();
        assert_eq!(PublicKey::from_spki_der(&der).unwrap(), rsa);
    }

    #[test]
    fn p384_key_is_accepted() {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let key =
            PublicKey::from_spki_der(&rcgen::PublicKeyData::subject_public_key_info(&kp)).unwrap();
        assert!(matches!(
            key,
            PublicKey::Ec {
                curve: Curve::P384,
                ..
            }
        ));
    }

    #[test]
    fn ed25519_is_unsupported() {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        assert_eq!(
            PublicKey::from_spki_der(&rcgen::PublicKeyData::subject_public_key_info(&kp)),
            Err(KeyError::UnsupportedKeyType)
        );
    }

    #[test]
    fn garbage_is_malformed() {
        assert_eq!(
            PublicKey::from_spki_der(&[0x30, 0x03, 0x01]),
            Err(KeyError::Malformed)
        );
        assert_eq!(PublicKey::from_spki_der(&[]), Err(KeyError::Malformed));
    }

    #[test]
    fn rsa_size_limits() {
        let n = |bits: usize| {
            let mut v = vec![0xffu8; bits / 8];
            v.insert(0, 0);
            v
        };
        assert_eq!(
            PublicKey::rsa(&n(1024), &[1, 0, 1]),
            Err(KeyError::RsaSize(1024))
        );
        assert!(PublicKey::rsa(&n(2048), &[1, 0, 1]).is_ok());
        assert_eq!(
            PublicKey::rsa(&n(8200), &[1, 0, 1]),
            Err(KeyError::RsaSize(8200))
        );
        assert_eq!(
            PublicKey::rsa(&n(2048), &[1, 0, 1]).unwrap().rsa_bits(),
            2048
        );
    }

    #[test]
    fn signature_algorithm_oids() {
        use x509_parser::oid_registry::*;
        for (oid, alg) in [
            (OID_SIG_ECDSA_WITH_SHA256, X509SigAlg::EcdsaSha256),
            (OID_SIG_ECDSA_WITH_SHA384, X509SigAlg::EcdsaSha384),
            (OID_PKCS1_SHA256WITHRSA, X509SigAlg::RsaPkcs1Sha256),
            (OID_PKCS1_SHA384WITHRSA, X509SigAlg::RsaPkcs1Sha384),
            (OID_PKCS1_SHA512WITHRSA, X509SigAlg::RsaPkcs1Sha512),
        ] {
            assert_eq!(X509SigAlg::from_oid_content(oid.as_bytes()), Some(alg));
        }
        assert_eq!(
            X509SigAlg::from_oid_content(OID_SIG_ECDSA_WITH_SHA512.as_bytes()),
            None
        );
        assert_eq!(
            X509SigAlg::from_oid_content(OID_PKCS1_SHA1WITHRSA.as_bytes()),
            None
        );
        assert_eq!(X509SigAlg::from_oid_content(&[]), None);
    }

    #[test]
    fn jwk_rejects_bad_members() {
        let mut m = Map::new();
        assert_eq!(PublicKey::from_jwk(&m), Err(KeyError::Jwk("missing kty")));
        m.insert("kty".into(), json!("oct"));
        assert_eq!(PublicKey::from_jwk(&m), Err(KeyError::UnsupportedKeyType));
        m.insert("kty".into(), json!("EC"));
        m.insert("crv".into(), json!("P-256"));
        m.insert("x".into(), json!("AAAA"));
        m.insert("y".into(), json!("AAAA"));
        assert_eq!(PublicKey::from_jwk(&m), Err(KeyError::BadEcPoint));
    }
}
