//! JWT-SVIDs: minting (with a ring key, or any [`JwsKey`] such as one in
//! an HSM), and validation per
//! SPEC.md "JWT-SVIDs".
//!
//! Validation is the claim checks of SPEC.md on top of the shared
//! compact-JWS core in [`crate::jws`] (structure, header rules, duplicate
//! members, algorithms, signature, time claims): `sub` is a SPIFFE ID,
//! `aud` is non-empty and holds every expected audience, `exp` is required,
//! and the key is looked up in the bundle of the trust domain of `sub` and
//! nowhere else.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use ring::rand::SystemRandom;
use ring::signature::{self as sig, EcdsaKeyPair, KeyPair as _};
use serde_json::Value;

use crate::bundle::Bundle;
use crate::clock::{from_unix_seconds, unix_seconds};
use crate::jws::{self, Alg, JwsError};
use crate::keys::{Curve, KeyError, PublicKey};
use crate::spiffe_id::{SpiffeId, TrustDomain};

pub use crate::jws::{LEEWAY, MAX_TOKEN_LEN};

/// Default JWT-SVID lifetime.
pub const DEFAULT_TTL: Duration = Duration::from_secs(300);
/// Most audiences one token may name.
pub const MAX_AUDIENCES: usize = 32;

/// Why a JWT-SVID was refused (or could not be minted).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JwtError {
    /// The compact-JWS rules (structure, header, algorithm, signature,
    /// time claims) refused the token.
    #[error(transparent)]
    Jws(#[from] JwsError),
    #[error("token claims could not be encoded: {0}")]
    Json(String),
    #[error("claims lack sub")]
    MissingSub,
    #[error("sub is not a valid SPIFFE ID")]
    BadSub,
    #[error("claims lack aud, or aud is empty or holds an empty string")]
    BadAudience,
    #[error("token is not for audience {0:?}")]
    WrongAudience(String),
    #[error("claims lack exp or exp is not an integer NumericDate")]
    BadExp,
    #[error("no bundle for trust domain {0}")]
    NoBundle(TrustDomain),
    #[error("kid {kid:?} is not in the bundle of trust domain {trust_domain}")]
    UnknownKid {
        kid: String,
        trust_domain: TrustDomain,
    },
    #[error("no expected audience given")]
    NoExpectedAudience,
    #[error("signing key: {0}")]
    SigningKey(String),
    #[error("the signing key has expired")]
    SigningKeyExpired,
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

/// A private key that signs JWS input for a [`JwtSigner`]: ECDSA over the
/// curve's SHA-2 digest of `msg`, returned as fixed-width `r || s` (the
/// JWS form). Implemented by ring keys here and by keys held elsewhere
/// (an HSM) by the server.
pub trait JwsKey: Send + Sync {
    /// Signs `msg`; the error says what broke and what to check.
    fn sign_jws(&self, msg: &[u8]) -> Result<Vec<u8>, String>;
}

/// A ring key pair in memory.
struct RingKey {
    key: EcdsaKeyPair,
    rng: SystemRandom,
}

impl JwsKey for RingKey {
    fn sign_jws(&self, msg: &[u8]) -> Result<Vec<u8>, String> {
        self.key
            .sign(&self.rng, msg)
            .map(|s| s.as_ref().to_vec())
            .map_err(|_| "signing failed".to_owned())
    }
}

/// A JWT signing key with its header pre-encoded, so that minting costs
/// one signature and a little JSON.
pub struct JwtSigner {
    kid: String,
    alg: Alg,
    key: Arc<dyn JwsKey>,
    public_key: PublicKey,
    not_after: SystemTime,
    header_b64: String,
    /// The `iss` claim of every token, when set ([`JwtSigner::with_issuer`]).
    issuer: Option<String>,
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
    #[serde(skip_serializing_if = "Option::is_none")]
    iss: Option<&'a str>,
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
        let ring_alg = match curve {
            Curve::P256 => &sig::ECDSA_P256_SHA256_FIXED_SIGNING,
            Curve::P384 => &sig::ECDSA_P384_SHA384_FIXED_SIGNING,
        };
        let rng = SystemRandom::new();
        let key = EcdsaKeyPair::from_pkcs8(ring_alg, pkcs8, &rng)
            .map_err(|e| JwtError::SigningKey(e.to_string()))?;
        let point = key.public_key().as_ref().to_vec();
        Self::with_key(kid, curve, point, Arc::new(RingKey { key, rng }), not_after)
    }

    /// A signer whose private key is `key` (held anywhere: an HSM) and
    /// whose public key is the uncompressed EC `point` on `curve`. ES256
    /// for P-256, ES384 for P-384.
    pub fn with_key(
        kid: &str,
        curve: Curve,
        point: Vec<u8>,
        key: Arc<dyn JwsKey>,
        not_after: SystemTime,
    ) -> Result<Self, JwtError> {
        let alg = match curve {
            Curve::P256 => Alg::ES256,
            Curve::P384 => Alg::ES384,
        };
        let public_key = PublicKey::ec(curve, point)
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
            issuer: None,
        })
    }

    /// Adds `iss` = `issuer` to every token this signer mints (relying
    /// parties that find keys by OIDC discovery compare it with the
    /// discovery document's issuer); `None` mints tokens without `iss`.
    #[must_use]
    pub fn with_issuer(mut self, issuer: Option<String>) -> Self {
        self.issuer = issuer;
        self
    }

    /// The `iss` claim minted tokens carry, if any.
    pub fn issuer(&self) -> Option<&str> {
        self.issuer.as_deref()
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
            iss: self.issuer.as_deref(),
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
            .sign_jws(token.as_bytes())
            .map_err(JwtError::SigningKey)?;
        token.push('.');
        B64URL.encode_string(&signature, &mut token);
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

/// Validates a JWT-SVID: structure, header rules, signature against the
/// bundle of the trust domain of `sub`, time claims (30 s leeway) and that
/// every audience in `expected_audience` is present.
pub fn validate(
    token: &str,
    expected_audience: &[&str],
    bundles: &(impl BundleSource + ?Sized),
    now: SystemTime,
) -> Result<JwtSvid, JwtError> {
    if expected_audience.is_empty() {
        return Err(JwtError::NoExpectedAudience);
    }
    let jws = jws::parse(token, Alg::ALL)?;
    // `sub` chooses the bundle, so the claims are read before the signature
    // is checked; nothing else in them is trusted until it is.
    let claims = jws.unverified_claims()?;
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
    let expiry = claims
        .time("exp")
        .map_err(|_| JwtError::BadExp)?
        .ok_or(JwtError::BadExp)?;
    let times = claims.times()?;

    // The key comes only from the bundle of the subject's own trust domain.
    let td = spiffe_id.trust_domain();
    let bundle = bundles
        .bundle_for(&td)
        .ok_or_else(|| JwtError::NoBundle(td.clone()))?;
    let kid = jws.kid();
    let authority = bundle
        .jwt_authority(kid)
        .ok_or_else(|| JwtError::UnknownKid {
            kid: kid.chars().take(64).collect(),
            trust_domain: td.clone(),
        })?;
    jws.verify_signature(&authority.public_key)?;
    times.check(now)?;
    for want in expected_audience {
        if !audience.iter().any(|a| a == want) {
            return Err(JwtError::WrongAudience(want.chars().take(64).collect()));
        }
    }
    Ok(JwtSvid {
        spiffe_id,
        audience,
        expiry,
        issued_at: times.iat,
        token: token.to_owned(),
    })
}

#[cfg(test)]
mod tests;
