//! The one compact-JWS (RFC 7515) verifier under JWT-SVID validation
//! ([`crate::jwt`]) and Kubernetes projected service-account tokens
//! (`sigil_attestors::k8s_psat`). Callers add their claim checks on top.
//!
//! Rules, the same for every caller:
//! - at most [`MAX_TOKEN_LEN`] bytes, exactly three base64url (no padding)
//!   parts;
//! - header and claims are JSON objects, and no object at any depth names a
//!   member twice (RFC 7515 §5.2 lets a parser refuse them; two parsers that
//!   pick different duplicates would read different tokens);
//! - the header holds `alg`, `kid` and optionally `typ`, nothing else: no
//!   embedded keys or key references (`jwk`, `jku`, `x5u`, `x5c`), no `crit`;
//! - `alg` is in the caller's allow-list; `none` and `HS*` never are;
//! - `kid` is a non-empty string;
//! - `typ`, when present, is `JWT` or `JOSE` (SPIFFE JWT-SVID; the
//!   Kubernetes API server sends no `typ` or `JWT`);
//! - the signature is checked with ring against a key whose type suits `alg`;
//! - time claims (`exp`, `nbf`, `iat`) are NumericDates written as
//!   non-negative **integers**. RFC 7519 allows fractions, but every issuer
//!   Sigil talks to (itself, SPIRE, the Kubernetes API server) writes whole
//!   seconds, and one integer rule leaves no float rounding to reason about;
//!   a fractional or exponent-form number is refused as not a number.
//!   `exp` (when present) may be up to [`LEEWAY`] in the past, `nbf` and
//!   `iat` up to [`LEEWAY`] in the future.

use std::fmt;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use ring::signature as sig;
use serde::Deserialize;
use serde_json::{Map, Number, Value};

use crate::clock::{MAX_UNIX_SECONDS, from_unix_seconds};
use crate::keys::{Curve, PublicKey, Verifier};

/// Longest token accepted, in bytes.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;
/// Clock skew tolerated on `exp`, `nbf` and `iat`.
pub const LEEWAY: Duration = Duration::from_secs(30);

/// Why a compact JWS was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JwsError {
    #[error("token is longer than {MAX_TOKEN_LEN} bytes")]
    TooLong,
    #[error("token is not a compact JWS (three base64url parts)")]
    Malformed,
    #[error("token header or claims are not a JSON object: {0}")]
    Json(String),
    #[error("duplicate member {0:?} in token header or claims")]
    DuplicateMember(String),
    #[error("alg \"none\" is refused")]
    AlgNone,
    #[error("HMAC algorithms are refused")]
    AlgHmac,
    #[error("alg {0:?} is not accepted here")]
    UnsupportedAlg(String),
    #[error("header is missing kid")]
    MissingKid,
    #[error("header carries an embedded key or key reference ({0}), which is refused")]
    EmbeddedKey(&'static str),
    #[error("header carries crit, which is refused")]
    Crit,
    #[error("header carries unexpected member {0:?}")]
    UnexpectedHeader(String),
    #[error("header typ must be JWT or JOSE")]
    BadTyp,
    #[error("alg {0} does not match the key's type")]
    AlgKeyMismatch(&'static str),
    #[error("signature does not verify")]
    BadSignature,
    #[error("{0} is not a non-negative integer NumericDate")]
    BadNumericClaim(&'static str),
    #[error("token has expired")]
    Expired,
    #[error("token is not valid yet")]
    NotYetValid,
}

/// The JWS algorithms Sigil can verify (ring has no P-521 or EdDSA-JWS
/// verifier that Sigil uses).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alg {
    ES256,
    ES384,
    RS256,
    RS384,
    RS512,
    PS256,
    PS384,
    PS512,
}

impl Alg {
    /// Every algorithm: the JWT-SVID validation list of SPEC.md.
    pub const ALL: &'static [Alg] = &[
        Alg::ES256,
        Alg::ES384,
        Alg::RS256,
        Alg::RS384,
        Alg::RS512,
        Alg::PS256,
        Alg::PS384,
        Alg::PS512,
    ];

    /// Parses an `alg` header value (case-sensitive, as RFC 7518 names
    /// them; `none` is refused in any case).
    pub fn from_name(name: &str) -> Result<Self, JwsError> {
        Ok(match name {
            "ES256" => Self::ES256,
            "ES384" => Self::ES384,
            "RS256" => Self::RS256,
            "RS384" => Self::RS384,
            "RS512" => Self::RS512,
            "PS256" => Self::PS256,
            "PS384" => Self::PS384,
            "PS512" => Self::PS512,
            n if n.eq_ignore_ascii_case("none") => return Err(JwsError::AlgNone),
            n if n.starts_with("HS") => return Err(JwsError::AlgHmac),
            other => return Err(JwsError::UnsupportedAlg(other.chars().take(32).collect())),
        })
    }

    /// The `alg` header value.
    pub fn name(self) -> &'static str {
        match self {
            Self::ES256 => "ES256",
            Self::ES384 => "ES384",
            Self::RS256 => "RS256",
            Self::RS384 => "RS384",
            Self::RS512 => "RS512",
            Self::PS256 => "PS256",
            Self::PS384 => "PS384",
            Self::PS512 => "PS512",
        }
    }

    /// The ring verifier for this algorithm, if `key` is of the right type.
    pub fn verifier(self, key: &PublicKey) -> Result<Verifier, JwsError> {
        Ok(match (self, key) {
            (
                Self::ES256,
                PublicKey::Ec {
                    curve: Curve::P256, ..
                },
            ) => Verifier::Ecdsa(&sig::ECDSA_P256_SHA256_FIXED),
            (
                Self::ES384,
                PublicKey::Ec {
                    curve: Curve::P384, ..
                },
            ) => Verifier::Ecdsa(&sig::ECDSA_P384_SHA384_FIXED),
            (Self::RS256, PublicKey::Rsa { .. }) => Verifier::Rsa(&sig::RSA_PKCS1_2048_8192_SHA256),
            (Self::RS384, PublicKey::Rsa { .. }) => Verifier::Rsa(&sig::RSA_PKCS1_2048_8192_SHA384),
            (Self::RS512, PublicKey::Rsa { .. }) => Verifier::Rsa(&sig::RSA_PKCS1_2048_8192_SHA512),
            (Self::PS256, PublicKey::Rsa { .. }) => Verifier::Rsa(&sig::RSA_PSS_2048_8192_SHA256),
            (Self::PS384, PublicKey::Rsa { .. }) => Verifier::Rsa(&sig::RSA_PSS_2048_8192_SHA384),
            (Self::PS512, PublicKey::Rsa { .. }) => Verifier::Rsa(&sig::RSA_PSS_2048_8192_SHA512),
            _ => return Err(JwsError::AlgKeyMismatch(self.name())),
        })
    }
}

/// A header that passed the rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// `alg`, from the caller's allow-list.
    pub alg: Alg,
    /// `kid`, non-empty.
    pub kid: String,
    /// `typ`, `JWT` or `JOSE` when present.
    pub typ: Option<String>,
}

/// A token split and its header checked; the signature is not checked yet.
pub struct Jws<'a> {
    header: Header,
    /// `header.claims`, what the signature covers.
    signing_input: &'a str,
    claims_b64: &'a str,
    signature_b64: &'a str,
}

impl fmt::Debug for Jws<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The token itself is a credential: never printed.
        f.debug_struct("Jws")
            .field("header", &self.header)
            .finish_non_exhaustive()
    }
}

/// Splits `token`, decodes its header and applies the header rules with
/// `algs` as the algorithm allow-list.
pub fn parse<'a>(token: &'a str, algs: &[Alg]) -> Result<Jws<'a>, JwsError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(JwsError::TooLong);
    }
    let mut parts = token.split('.');
    let (Some(h), Some(c), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwsError::Malformed);
    };
    let header = decode_part(h)?;
    let mut alg = None;
    let mut kid = None;
    let mut typ = None;
    for (name, value) in &header {
        match name.as_str() {
            "alg" => {
                alg = Some(value.as_str().ok_or_else(|| {
                    JwsError::UnsupportedAlg(value.to_string().chars().take(32).collect())
                })?)
            }
            "kid" => kid = value.as_str().filter(|k| !k.is_empty()),
            "typ" => match value.as_str() {
                Some(t @ ("JWT" | "JOSE")) => typ = Some(t.to_owned()),
                _ => return Err(JwsError::BadTyp),
            },
            "jwk" => return Err(JwsError::EmbeddedKey("jwk")),
            "jku" => return Err(JwsError::EmbeddedKey("jku")),
            "x5u" => return Err(JwsError::EmbeddedKey("x5u")),
            "x5c" => return Err(JwsError::EmbeddedKey("x5c")),
            "crit" => return Err(JwsError::Crit),
            other => return Err(JwsError::UnexpectedHeader(other.chars().take(32).collect())),
        }
    }
    let alg = Alg::from_name(alg.ok_or_else(|| JwsError::UnsupportedAlg(String::new()))?)?;
    if !algs.contains(&alg) {
        return Err(JwsError::UnsupportedAlg(alg.name().to_owned()));
    }
    let kid = kid.ok_or(JwsError::MissingKid)?.to_owned();
    Ok(Jws {
        header: Header { alg, kid, typ },
        signing_input: &token[..h.len() + 1 + c.len()],
        claims_b64: c,
        signature_b64: s,
    })
}

impl Jws<'_> {
    /// The checked header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The key id the token names.
    pub fn kid(&self) -> &str {
        &self.header.kid
    }

    /// The claims, decoded with the duplicate rule, **before** the signature
    /// is checked. Only for choosing the key (JWT-SVIDs take it from the
    /// bundle of `sub`'s trust domain); trust nothing else in them until
    /// [`Jws::verify_signature`] passed.
    pub fn unverified_claims(&self) -> Result<Claims, JwsError> {
        decode_part(self.claims_b64).map(Claims)
    }

    /// Checks the signature with `key`, which must suit `alg`.
    pub fn verify_signature(&self, key: &PublicKey) -> Result<(), JwsError> {
        let verifier = self.header.alg.verifier(key)?;
        let signature = B64URL
            .decode(self.signature_b64)
            .map_err(|_| JwsError::Malformed)?;
        key.verify_with(verifier, self.signing_input.as_bytes(), &signature)
            .map_err(|_| JwsError::BadSignature)
    }

    /// Checks the signature with `key`, then decodes the claims.
    pub fn verify(&self, key: &PublicKey) -> Result<Claims, JwsError> {
        self.verify_signature(key)?;
        self.unverified_claims()
    }
}

/// A token's claims: a JSON object without duplicate members.
#[derive(Debug, Clone, PartialEq)]
pub struct Claims(Map<String, Value>);

/// The time claims of a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Times {
    pub exp: Option<SystemTime>,
    pub nbf: Option<SystemTime>,
    pub iat: Option<SystemTime>,
}

impl Claims {
    /// The claim `name`.
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.0.get(name)
    }

    /// Every claim.
    pub fn as_map(&self) -> &Map<String, Value> {
        &self.0
    }

    /// The NumericDate claim `name` (integer rule, see the module doc).
    pub fn time(&self, name: &'static str) -> Result<Option<SystemTime>, JwsError> {
        match self.0.get(name) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .filter(|s| *s <= MAX_UNIX_SECONDS)
                .map(|s| Some(from_unix_seconds(s)))
                .ok_or(JwsError::BadNumericClaim(name)),
        }
    }

    /// `exp`, `nbf` and `iat`, each checked to be a NumericDate if present.
    pub fn times(&self) -> Result<Times, JwsError> {
        Ok(Times {
            exp: self.time("exp")?,
            nbf: self.time("nbf")?,
            iat: self.time("iat")?,
        })
    }
}

impl Times {
    /// Whether the token is valid at `now`, with [`LEEWAY`] either side.
    /// Whether `exp` must be present is the caller's rule.
    pub fn check(&self, now: SystemTime) -> Result<(), JwsError> {
        if let Some(exp) = self.exp
            && now > exp.checked_add(LEEWAY).unwrap_or(exp)
        {
            return Err(JwsError::Expired);
        }
        let now_plus_leeway = now.checked_add(LEEWAY).unwrap_or(now);
        if self.nbf.is_some_and(|nbf| nbf > now_plus_leeway)
            || self.iat.is_some_and(|iat| iat > now_plus_leeway)
        {
            return Err(JwsError::NotYetValid);
        }
        Ok(())
    }
}

fn decode_part(part: &str) -> Result<Map<String, Value>, JwsError> {
    let bytes = B64URL.decode(part).map_err(|_| JwsError::Malformed)?;
    parse_json_object(&bytes)
}

/// Parses a JSON object, refusing a member name that appears twice in any
/// object at any depth (names compared after unescaping). Used for token
/// parts and JWK Sets alike.
pub fn parse_json_object(bytes: &[u8]) -> Result<Map<String, Value>, JwsError> {
    match serde_json::from_slice::<Strict>(bytes) {
        Ok(Strict(Value::Object(m))) => Ok(m),
        Ok(_) => Err(JwsError::Json("not a JSON object".into())),
        Err(e) => {
            let msg = e.to_string();
            match msg.strip_prefix(DUPLICATE) {
                Some(rest) => Err(JwsError::DuplicateMember(
                    rest.split(" at line").next().unwrap_or_default().to_owned(),
                )),
                None => Err(JwsError::Json(msg)),
            }
        }
    }
}

/// Prefix of the serde error a duplicate raises, so that it can be told
/// apart from other JSON errors.
const DUPLICATE: &str = "duplicate member:";

/// A JSON value whose objects, at every depth, have unique member names.
struct Strict(Value);

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor)
    }
}

struct StrictVisitor;

impl<'de> serde::de::Visitor<'de> for StrictVisitor {
    type Value = Strict;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Strict, E> {
        Ok(Strict(Value::Bool(v)))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Strict, E> {
        Ok(Strict(Value::Number(v.into())))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Strict, E> {
        Ok(Strict(Value::Number(v.into())))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Strict, E> {
        // JSON has no NaN or infinity, so `from_f64` always succeeds here.
        Ok(Strict(
            Number::from_f64(v).map_or(Value::Null, Value::Number),
        ))
    }
    fn visit_str<E>(self, v: &str) -> Result<Strict, E> {
        Ok(Strict(Value::String(v.to_owned())))
    }
    fn visit_string<E>(self, v: String) -> Result<Strict, E> {
        Ok(Strict(Value::String(v)))
    }
    fn visit_unit<E>(self) -> Result<Strict, E> {
        Ok(Strict(Value::Null))
    }
    fn visit_none<E>(self) -> Result<Strict, E> {
        Ok(Strict(Value::Null))
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Strict, A::Error> {
        let mut out = Vec::new();
        while let Some(Strict(v)) = seq.next_element()? {
            out.push(v);
        }
        Ok(Strict(Value::Array(out)))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Strict, A::Error> {
        let mut out = Map::new();
        while let Some(k) = map.next_key::<String>()? {
            if out.contains_key(&k) {
                return Err(serde::de::Error::custom(format_args!(
                    "{DUPLICATE}{}",
                    k.chars().take(32).collect::<String>()
                )));
            }
            let Strict(v) = map.next_value()?;
            out.insert(k, v);
        }
        Ok(Strict(Value::Object(out)))
    }
}

#[cfg(test)]
mod tests;
