//! Shared fixtures for the fuzz targets: a fixed clock, a fixed signing key
//! (so seeds signed once stay valid), and a way to run the async attestors.
//!
//! The key and certificates in `fixtures/` exist only for fuzzing; they are
//! written by `seed.py fixtures` and never trusted anywhere else.

#![forbid(unsafe_code)]

use std::future::Future;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use ring::rand::SystemRandom;
use ring::signature::{self as sig, EcdsaKeyPair, KeyPair};
use sigil_identity::keys::{Curve, PublicKey};
use sigil_identity::{Bundle, JwtAuthority, TrustDomain};

/// P-256 PKCS#8 key: the JWT authority of the fuzz bundle and the k8s
/// service-account issuer key.
pub const SIGNING_KEY: &[u8] = include_bytes!("../fixtures/signing-key.pk8");
/// Self-signed CA certificate (DER) the x509pop target trusts.
pub const CA_CERT: &[u8] = include_bytes!("../fixtures/ca.der");
/// A leaf certificate (DER) issued by [`CA_CERT`]; also used as an SVID.
pub const LEAF_CERT: &[u8] = include_bytes!("../fixtures/leaf.der");
/// The `kid` of [`SIGNING_KEY`] everywhere.
pub const KID: &str = "fuzz-key";
/// The trust domain of every target.
pub const TRUST_DOMAIN: &str = "example.org";
/// Every target's "now": 2026-01-01T00:00:00Z, inside the fixtures' validity.
pub const NOW_UNIX: u64 = 1_767_225_600;

/// The fixed time as a `SystemTime`.
pub fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(NOW_UNIX)
}

/// The trust domain of every target.
pub fn trust_domain() -> TrustDomain {
    TrustDomain::new(TRUST_DOMAIN).expect("example.org is a valid trust domain")
}

/// The fixed signing key.
pub fn signing_key() -> &'static EcdsaKeyPair {
    static KEY: OnceLock<EcdsaKeyPair> = OnceLock::new();
    KEY.get_or_init(|| {
        EcdsaKeyPair::from_pkcs8(
            &sig::ECDSA_P256_SHA256_FIXED_SIGNING,
            SIGNING_KEY,
            &SystemRandom::new(),
        )
        .expect("fixtures/signing-key.pk8 is a P-256 PKCS#8 key")
    })
}

/// The public half of [`SIGNING_KEY`].
pub fn public_key() -> PublicKey {
    PublicKey::ec(Curve::P256, signing_key().public_key().as_ref().to_vec())
        .expect("a ring P-256 public key is an uncompressed point")
}

/// A bundle for [`TRUST_DOMAIN`] holding the CA and the signing key.
pub fn bundle() -> Bundle {
    Bundle {
        x509_authorities: vec![CA_CERT.to_vec()],
        jwt_authorities: vec![JwtAuthority {
            kid: KID.into(),
            public_key: public_key(),
        }],
        ..Bundle::new(trust_domain())
    }
}

/// A JWKS holding the signing key as `use: sig` (a k8s issuer's key set).
pub fn issuer_jwks() -> Vec<u8> {
    let mut m = public_key().jwk_members();
    m.insert("kid".into(), KID.into());
    m.insert("use".into(), "sig".into());
    m.insert("alg".into(), "ES256".into());
    serde_json::to_vec(&serde_json::json!({ "keys": [m] })).expect("a JSON value serialises")
}

/// `header.claims.signature`, base64url, signed ES256 with [`SIGNING_KEY`]:
/// lets a target reach the checks made after the signature.
pub fn sign_jws(header: &[u8], claims: &[u8]) -> String {
    let mut token = B64URL.encode(header);
    token.push('.');
    B64URL.encode_string(claims, &mut token);
    let signature = signing_key()
        .sign(&SystemRandom::new(), token.as_bytes())
        .expect("ECDSA signing with a valid key does not fail");
    token.push('.');
    B64URL.encode_string(signature.as_ref(), &mut token);
    token
}

/// Splits at the first NUL byte (the second part is empty without one).
pub fn split_nul(data: &[u8]) -> (&[u8], &[u8]) {
    match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[]),
    }
}

/// Runs `f` to completion on a shared current-thread runtime (the
/// attestors read files with `tokio::fs`).
pub fn block_on<F: Future>(f: F) -> F::Output {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a current-thread runtime builds")
    })
    .block_on(f)
}
