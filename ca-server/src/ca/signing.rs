//! Using a [`CaSigner`]: X.509 signature encoding, and the adaptors that
//! let rcgen (CA certificates) and the JWT signer sign with a CA key
//! wherever it lives.

use std::sync::Arc;
use std::time::SystemTime;

use sigil_identity::der;
use sigil_identity::jwt::{JwsKey, JwtError, JwtSigner};

use super::keys::{CaKey, CaSigner, KeyManagerError};

/// Encodes a fixed-width ECDSA signature `r || s` as the X.509
/// `Ecdsa-Sig-Value ::= SEQUENCE { r INTEGER, s INTEGER }`.
pub fn ecdsa_der(fixed: &[u8]) -> Result<Vec<u8>, KeyManagerError> {
    if fixed.is_empty() || !fixed.len().is_multiple_of(2) {
        return Err(KeyManagerError::Sign(format!(
            "the signature has {} bytes; ECDSA r || s has an even, non-zero length",
            fixed.len()
        )));
    }
    let (r, s) = fixed.split_at(fixed.len() / 2);
    let mut seq = Vec::with_capacity(fixed.len() + 8);
    der::push_unsigned(&mut seq, r);
    der::push_unsigned(&mut seq, s);
    Ok(der::wrap(0x30, &seq))
}

/// Signs `msg` for X.509: the DER `Ecdsa-Sig-Value`.
pub fn sign_x509(key: &dyn CaSigner, msg: &[u8]) -> Result<Vec<u8>, KeyManagerError> {
    ecdsa_der(&key.sign(msg)?)
}

/// A CA key as an rcgen signing key (for CA certificates).
#[derive(Debug)]
pub struct RcgenKey<'a>(pub &'a dyn CaSigner);

impl rcgen::PublicKeyData for RcgenKey<'_> {
    fn der_bytes(&self) -> &[u8] {
        self.0.public_key()
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        self.0.algorithm().rcgen()
    }
}

impl rcgen::SigningKey for RcgenKey<'_> {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        sign_x509(self.0, msg).map_err(|e| {
            tracing::warn!(error = %e, "CA certificate signature failed");
            rcgen::Error::RemoteKeyError
        })
    }
}

/// A CA key as a JWS key.
struct JwsAdaptor(CaKey);

impl JwsKey for JwsAdaptor {
    fn sign_jws(&self, msg: &[u8]) -> Result<Vec<u8>, String> {
        self.0.sign(msg).map_err(|e| e.to_string())
    }
}

/// A JWT-SVID signer with `kid` whose signatures are made by `key`.
pub fn jwt_signer(kid: &str, key: &CaKey, not_after: SystemTime) -> Result<JwtSigner, JwtError> {
    JwtSigner::with_key(
        kid,
        key.algorithm().curve(),
        key.public_key().to_vec(),
        Arc::new(JwsAdaptor(key.clone())),
        not_after,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn der_encoding_pads_high_bits_and_strips_zeros() {
        let mut fixed = vec![0u8; 64];
        fixed[0] = 0x80; // r needs a 0x00 pad
        fixed[32] = 0x00; // s starts with zeros: stripped
        fixed[33] = 0x01;
        let der = ecdsa_der(&fixed).unwrap();
        assert_eq!(&der[..5], &[0x30, 0x44, 0x02, 0x21, 0x00]);
        assert_eq!(&der[37..40], &[0x02, 0x1f, 0x01]);
        assert!(ecdsa_der(&[1, 2, 3]).is_err());
    }
}
