//! The one JWK Set (RFC 7517 §5) reader, for SPIFFE bundles
//! ([`crate::bundle`]) and OIDC issuer key sets (Kubernetes service-account
//! issuers in `sigil_attestors::k8s_psat`).
//!
//! [`parse`] reads the envelope: a JSON object of at most
//! [`MAX_JWKS_BYTES`], no duplicate members at any depth (the rule of
//! [`crate::jws`]), and a `keys` array of at most the caller's number of JWK
//! objects. What a key must look like is the caller's rule: a bundle refuses
//! a bad key, an issuer key set skips keys Sigil cannot use
//! ([`signing_keys`]).

use std::collections::HashMap;

use serde_json::{Map, Value};

use crate::jws::{self, JwsError};
use crate::keys::PublicKey;

/// Largest JWK Set accepted, in bytes.
pub const MAX_JWKS_BYTES: usize = 1 << 20;
/// Longest key id accepted, in bytes.
pub const MAX_KID_LEN: usize = 128;

/// Why bytes are not a JWK Set.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JwksError {
    #[error("JWK Set is larger than {MAX_JWKS_BYTES} bytes")]
    TooLarge,
    #[error("JWK Set is not a JSON object: {0}")]
    Json(String),
    #[error("JWK Set names member {0:?} twice")]
    DuplicateMember(String),
    #[error("JWK Set has no \"keys\" array")]
    MissingKeys,
    #[error("JWK Set has more than {0} keys")]
    TooManyKeys(usize),
    #[error("key {0} of the JWK Set is not a JSON object")]
    KeyNotObject(usize),
}

/// A JWK Set's members: `keys` as objects, and the other top-level
/// members (e.g. `spiffe_sequence`).
#[derive(Debug, Clone, PartialEq)]
pub struct JwkSet {
    /// The JWKs, in document order.
    pub keys: Vec<Map<String, Value>>,
    /// Every top-level member but `keys`.
    pub members: Map<String, Value>,
}

/// Reads the JWK Set envelope, with at most `max_keys` keys.
pub fn parse(bytes: &[u8], max_keys: usize) -> Result<JwkSet, JwksError> {
    if bytes.len() > MAX_JWKS_BYTES {
        return Err(JwksError::TooLarge);
    }
    let mut members = jws::parse_json_object(bytes).map_err(|e| match e {
        JwsError::DuplicateMember(m) => JwksError::DuplicateMember(m),
        other => JwksError::Json(other.to_string()),
    })?;
    let Some(Value::Array(list)) = members.remove("keys") else {
        return Err(JwksError::MissingKeys);
    };
    if list.len() > max_keys {
        return Err(JwksError::TooManyKeys(max_keys));
    }
    let keys = list
        .into_iter()
        .enumerate()
        .map(|(i, k)| match k {
            Value::Object(m) => Ok(m),
            _ => Err(JwksError::KeyNotObject(i)),
        })
        .collect::<Result<_, _>>()?;
    Ok(JwkSet { keys, members })
}

/// The `kid` of a JWK, if it is a non-empty string of at most
/// [`MAX_KID_LEN`] bytes.
pub fn kid(key: &Map<String, Value>) -> Option<&str> {
    key.get("kid")
        .and_then(Value::as_str)
        .filter(|k| !k.is_empty() && k.len() <= MAX_KID_LEN)
}

/// An issuer's signing keys by `kid`, from a JWK Set of at most `max_keys`
/// keys. Keys Sigil cannot use for signatures are skipped: no usable `kid`,
/// a `use` other than `sig`, a type or curve Sigil does not accept.
pub fn signing_keys(
    bytes: &[u8],
    max_keys: usize,
) -> Result<HashMap<String, PublicKey>, JwksError> {
    let set = parse(bytes, max_keys)?;
    let mut out = HashMap::new();
    for key in &set.keys {
        let Some(kid) = kid(key) else { continue };
        if key.get("use").is_some_and(|u| u.as_str() != Some("sig")) {
            continue;
        }
        if let Ok(public_key) = PublicKey::from_jwk(key) {
            out.insert(kid.to_owned(), public_key);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
