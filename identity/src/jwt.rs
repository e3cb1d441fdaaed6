//! JWT-SVIDs: minting with a cached ring signer, and validation per
//! SPEC.md "JWT-SVIDs".
//!
//! Compact JWS is small enough to implement directly on ring, which lets the
//! validator enforce Sigil's rules exactly: only `alg`, `kid` and `typ` in
//! the header, no embedded keys, no `crit`, no duplicate members, and the
//! key looked up in the bundle of the trust domain of `sub` and nowhere
//! else.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use ring::rand::SystemRandom;
use ring::signature::{self as sig, EcdsaKeyPair, KeyPair as _};
use serde::Deserialize;
use serde_json::Value;

use crate::bundle::Bundle;
use crate::clock::{from_unix_seconds, unix_seconds};
use crate::keys::{Curve, KeyError, PublicKey, Verifier};
use crate::spiffe_id::{SpiffeId, TrustDomain};

/// Longest token accepted for validation, in bytes.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;
/// Clock skew tolerated on `exp`, `nbf` and `iat`.
pub const LEEWAY: Duration = Duration::from_secs(30);
/// Default JWT-SVID lifetime.
pub const DEFAULT_TTL: Duration = Duration::from_secs(300);
/// Most audiences one token may name.
pub const MAX_AUDIENCES: usize = 32;

/// Why a JWT-SVID was refused (or could not be minted).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
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
    #[error("unsupported alg {0:?}")]
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
    #[error("claims lack sub")]
    MissingSub,
    #[error("sub is not a valid SPIFFE ID")]
    BadSub,
    #[error("claims lack aud, or aud is empty or holds an empty string")]
    BadAudience,
    #[error("token is not for audience {0:?}")]
    WrongAudience(String),
    #[error("claims lack exp or exp is not a number")]
    BadExp,
    #[error("{0} is not a number")]
    BadNumericClaim(&'static str),
    #[error("token has expired")]
    Expired,
    #[error("token is not valid yet")]
    NotYetValid,
    #[error("no bundle for trust domain {0}")]
    NoBundle(TrustDomain),
    #[error("kid {kid:?} is not in the bundle of trust domain {trust_domain}")]
    UnknownKid {
        kid: String,
        trust_domain: TrustDomain,
    },
    #[error("alg {0} does not match the key's type")]
    AlgKeyMismatch(&'static str),
    #[error("signature does not verify")]
    BadSignature,
    #[error("no expected audience given")]
    NoExpectedAudience,
    #[error("signing key: {0}")]
    SigningKey(String),
    #[error("the signing key has expired")]
    SigningKeyExpired,
}

/// The JWS algorithms Sigil accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JwtAlg {
    ES256,
    ES384,
    RS256,
    RS384,
    RS512,
    PS256,
    PS384,
    PS512,
}

impl JwtAlg {
    /// Parses an `alg` header value.
    pub fn from_name(name: &str) -> Result<Self, JwtError> {
        Ok(match name {
            "ES256" => Self::ES256,
            "ES384" => Self::ES384,
            "RS256" => Self::RS256,
            "RS384" => Self::RS384,
            "RS512" => Self::RS512,
            "PS256" => Self::PS256,
            "PS384" => Self::PS384,
            "PS512" => Self::PS512,
            n if n.eq_ignore_ascii_case("none") => return Err(JwtError::AlgNone),
            n if n.starts_with("HS") => return Err(JwtError::AlgHmac),
            other => return Err(JwtError::UnsupportedAlg(other.chars().take(32).collect())),
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
    fn verifier(self, key: &PublicKey) -> Result<Verifier, JwtError> {
        let mismatch = JwtError::AlgKeyMismatch(self.name());
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
            _ => return Err(mismatch),
        })
    }
}

/// A minted or validated JWT-SVID.
#[derive(Clone, PartialEq, Eq)]
pub struct JwtSvid {
    /// The `sub` claim.
    pub spiffe_id: SpiffeId,
    /// The `aud` claim.
    pub audience: Vec<String>,
    /// The `exp` claim.
    pub expiry: SystemTime,
    /// The `iat` claim, if present.
    pub issued_at: Option<SystemTime>,
    /// The compact token. Never logged: `Debug` leaves it out.
    pub token: String,
}

impl fmt::Debug for JwtSvid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtSvid")
            .field("spiffe_id", &self.spiffe_id)
            .field("audience", &self.audience)
            .field("expiry", &self.expiry)
            .finish_non_exhaustive()
    }
}

/// Checks an audience list: non-empty, bounded, no empty strings.
pub fn check_audience(audience: &[String]) -> Result<(), JwtError> {
    if audience.is_empty()
        || audience.len() > MAX_AUDIENCES
        || audience.iter().any(String::is_empty)
    {
        return Err(JwtError::BadAudience);
    }
    Ok(())
}

/// A JWT signing key with its header pre-encoded, so that minting costs
/// one signature and a little JSON.
pub struct JwtSigner {
    kid: String,
    alg: JwtAlg,
    key: EcdsaKeyPair,
    public_key: PublicKey,
    not_after: SystemTime,
    header_b64: String,
    rng: SystemRandom,
}

impl fmt::Debug for JwtSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtSigner")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

#[derive(serde::Serialize)]
struct Claims<'a> {
    aud: &'a [String],
    exp: u64,
    iat: u64,
    sub: &'a str,
}

impl JwtSigner {
    /// Loads an EC P-256 (ES256) or P-384 (ES384) PKCS#8 key.
    pub fn from_pkcs8(
        kid: &str,
        curve: Curve,
        pkcs8: &[u8],
        not_after: SystemTime,
    ) -> Result<Self, JwtError> {
        let (alg, ring_alg) = match curve {
            Curve::P256 => (JwtAlg::ES256, &sig::ECDSA_P256_SHA256_FIXED_SIGNING),
            Curve::P384 => (JwtAlg::ES384, &sig::ECDSA_P384_SHA384_FIXED_SIGNING),
        };
        let rng = SystemRandom::new();
        let key = EcdsaKeyPair::from_pkcs8(ring_alg, pkcs8, &rng)
            .map_err(|e| JwtError::SigningKey(e.to_string()))?;
        let public_key = PublicKey::ec(curve, key.public_key().as_ref().to_vec())
            .map_err(|e: KeyError| JwtError::SigningKey(e.to_string()))?;
        let header = serde_json::json!({"alg": alg.name(), "kid": kid, "typ": "JWT"});
        let header_b64 = B64URL.encode(header.to_string());
        Ok(Self {
            kid: kid.to_owned(),
            alg,
            key,
            public_key,
            not_after,
            header_b64,
            rng,
        })
    }

    /// The key id.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The verification key, for the bundle.
    pub fn public_key(&self) -> &PublicKey {
        &self.public_key
    }

    /// When the key stops being usable.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// Mints a token for `sub` and `audience`; `exp` is `now + ttl`,
    /// capped at the key's own expiry.
    pub fn mint(
        &self,
        sub: &SpiffeId,
        audience: &[String],
        ttl: Duration,
        now: SystemTime,
    ) -> Result<JwtSvid, JwtError> {
        check_audience(audience)?;
        if now >= self.not_after {
            return Err(JwtError::SigningKeyExpired);
        }
        let expiry = now
            .checked_add(ttl)
            .map_or(self.not_after, |t| t.min(self.not_after));
        let claims = Claims {
            aud: audience,
            exp: unix_seconds(expiry),
            iat: unix_seconds(now),
            sub: sub.as_str(),
        };
        let claims_json = serde_json::to_vec(&claims).map_err(|e| JwtError::Json(e.to_string()))?;
        let mut token =
            String::with_capacity(self.header_b64.len() + claims_json.len() * 4 / 3 + 100);
        token.push_str(&self.header_b64);
        token.push('.');
        B64URL.encode_string(&claims_json, &mut token);
        let signature = self
            .key
            .sign(&self.rng, token.as_bytes())
            .map_err(|_| JwtError::SigningKey("signing failed".into()))?;
        token.push('.');
        B64URL.encode_string(signature.as_ref(), &mut token);
        Ok(JwtSvid {
            spiffe_id: sub.clone(),
            audience: audience.to_vec(),
            expiry: from_unix_seconds(unix_seconds(expiry)),
            issued_at: Some(from_unix_seconds(unix_seconds(now))),
            token,
        })
    }
}

/// Where a validator finds the bundle for a trust domain.
pub trait BundleSource {
    /// The bundle of `td`, if known.
    fn bundle_for(&self, td: &TrustDomain) -> Option<&Bundle>;
}

impl BundleSource for Bundle {
    fn bundle_for(&self, td: &TrustDomain) -> Option<&Bundle> {
        (self.trust_domain == *td).then_some(self)
    }
}

impl BundleSource for std::collections::HashMap<TrustDomain, Bundle> {
    fn bundle_for(&self, td: &TrustDomain) -> Option<&Bundle> {
        self.get(td)
    }
}

impl BundleSource for [Bundle] {
    fn bundle_for(&self, td: &TrustDomain) -> Option<&Bundle> {
        self.iter().find(|b| b.trust_domain == *td)
    }
}

/// A JSON object that refuses duplicate member names.
struct UniqueObject(BTreeMap<String, Value>);

impl<'de> Deserialize<'de> for UniqueObject {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = UniqueObject;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<UniqueObject, A::Error> {
                let mut out = BTreeMap::new();
                while let Some((k, v)) = map.next_entry::<String, Value>()? {
                    if out.contains_key(&k) {
                        return Err(serde::de::Error::custom(format_args!(
                            "duplicate member:{k}"
                        )));
                    }
                    out.insert(k, v);
                }
                Ok(UniqueObject(out))
            }
        }
        d.deserialize_map(V)
    }
}

fn decode_object(part: &str) -> Result<BTreeMap<String, Value>, JwtError> {
    let bytes = B64URL.decode(part).map_err(|_| JwtError::Malformed)?;
    match serde_json::from_slice::<UniqueObject>(&bytes) {
        Ok(o) => Ok(o.0),
        Err(e) => {
            let msg = e.to_string();
            match msg.strip_prefix("duplicate member:") {
                Some(rest) => Err(JwtError::DuplicateMember(
                    rest.split(" at line").next().unwrap_or("").to_owned(),
                )),
                None => Err(JwtError::Json(msg)),
            }
        }
    }
}

fn numeric(
    claims: &BTreeMap<String, Value>,
    name: &'static str,
) -> Result<Option<SystemTime>, JwtError> {
    match claims.get(name) {
        None => Ok(None),
        Some(v) => {
            let secs = v
                .as_f64()
                .filter(|s| {
                    s.is_finite() && *s >= 0.0 && *s <= crate::clock::MAX_UNIX_SECONDS as f64
                })
                .ok_or(JwtError::BadNumericClaim(name))?;
            Ok(Some(from_unix_seconds(secs as u64)))
        }
    }
}

/// Validates a JWT-SVID: structure, header rules, signature against the
/// bundle of the trust domain of `sub`, time claims (30 s leeway) and that
/// every audience in `expected_audience` is present.
pub fn validate(
    token: &str,
    expected_audience: &[&str],
    bundles: &(impl BundleSource + ?Sized),
    now: SystemTime,
) -> Result<JwtSvid, JwtError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(JwtError::TooLong);
    }
    if expected_audience.is_empty() {
        return Err(JwtError::NoExpectedAudience);
    }
    let mut parts = token.split('.');
    let (Some(h), Some(c), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::Malformed);
    };
    let header = decode_object(h)?;
    let mut alg = None;
    let mut kid = None;
    for (name, value) in &header {
        match name.as_str() {
            "alg" => {
                alg = Some(
                    value
                        .as_str()
                        .ok_or(JwtError::UnsupportedAlg(value.to_string()))?,
                )
            }
            "kid" => kid = value.as_str().filter(|k| !k.is_empty()),
            "typ" => {
                if !matches!(value.as_str(), Some("JWT" | "JOSE")) {
                    return Err(JwtError::BadTyp);
                }
            }
            "jwk" => return Err(JwtError::EmbeddedKey("jwk")),
            "jku" => return Err(JwtError::EmbeddedKey("jku")),
            "x5u" => return Err(JwtError::EmbeddedKey("x5u")),
            "x5c" => return Err(JwtError::EmbeddedKey("x5c")),
            "crit" => return Err(JwtError::Crit),
            other => return Err(JwtError::UnexpectedHeader(other.chars().take(32).collect())),
        }
    }
    let alg = JwtAlg::from_name(alg.ok_or(JwtError::UnsupportedAlg(String::new()))?)?;
    let kid = kid.ok_or(JwtError::MissingKid)?;

    let claims = decode_object(c)?;
    let sub = claims.get("sub").ok_or(JwtError::MissingSub)?;
    let spiffe_id = sub
        .as_str()
        .and_then(|s| SpiffeId::parse(s).ok())
        .ok_or(JwtError::BadSub)?;
    let audience: Vec<String> = match claims.get("aud") {
        Some(Value::String(a)) => vec![a.clone()],
        Some(Value::Array(list)) => list
            .iter()
            .map(|v| v.as_str().map(str::to_owned))
            .collect::<Option<_>>()
            .ok_or(JwtError::BadAudience)?,
        _ => return Err(JwtError::BadAudience),
    };
    check_audience(&audience)?;
    let expiry = numeric(&claims, "exp")
        .map_err(|_| JwtError::BadExp)?
        .ok_or(JwtError::BadExp)?;
    let issued_at = numeric(&claims, "iat")?;
    let not_before = numeric(&claims, "nbf")?;

    // The key comes only from the bundle of the subject's own trust domain.
    let td = spiffe_id.trust_domain();
    let bundle = bundles
        .bundle_for(&td)
        .ok_or_else(|| JwtError::NoBundle(td.clone()))?;
    let authority = bundle
        .jwt_authority(kid)
        .ok_or_else(|| JwtError::UnknownKid {
            kid: kid.chars().take(64).collect(),
            trust_domain: td.clone(),
        })?;
    let verifier = alg.verifier(&authority.public_key)?;
    let signature = B64URL.decode(s).map_err(|_| JwtError::Malformed)?;
    let signed_len = h.len() + 1 + c.len();
    authority
        .public_key
        .verify_with(verifier, &token.as_bytes()[..signed_len], &signature)
        .map_err(|_| JwtError::BadSignature)?;

    if now > expiry.checked_add(LEEWAY).unwrap_or(expiry) {
        return Err(JwtError::Expired);
    }
    let now_plus_leeway = now.checked_add(LEEWAY).unwrap_or(now);
    if not_before.is_some_and(|nbf| nbf > now_plus_leeway)
        || issued_at.is_some_and(|iat| iat > now_plus_leeway)
    {
        return Err(JwtError::NotYetValid);
    }
    for want in expected_audience {
        if !audience.iter().any(|a| a == want) {
            return Err(JwtError::WrongAudience(want.chars().take(64).collect()));
        }
    }
    Ok(JwtSvid {
        spiffe_id,
        audience,
        expiry,
        issued_at,
        token: token.to_owned(),
    })
}

#[cfg(test)]
mod tests;
