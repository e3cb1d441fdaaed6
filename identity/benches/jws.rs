//! Criterion benchmarks: token validation next to the bare ring signature
//! check it contains, measured in the same run so that the difference (the
//! cost of our parsing and rules) means something on a noisy machine.
//! Recorded in docs/architecture.md, "JWT validation: why not jsonwebtoken".
//!
//! ECDSA signatures are randomised, so a pool of distinct tokens is cycled
//! rather than one repeated.
//!
//! Run with `cargo bench -p sigil-identity --bench jws`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use criterion::{Criterion, criterion_group, criterion_main};
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, RsaKeyPair, UnparsedPublicKey};
use sigil_identity::bundle::{Bundle, JwtAuthority};
use sigil_identity::clock::unix_seconds;
use sigil_identity::jws::{self, Alg};
use sigil_identity::jwt::{self, JwtSigner};
use sigil_identity::keys::{Curve, PublicKey};
use sigil_identity::{SpiffeId, TrustDomain};

const POOL: usize = 64;

/// `(signing input, signature)` of each token, for the bare verify.
fn split(token: &str) -> (Vec<u8>, Vec<u8>) {
    let (input, sig) = token.rsplit_once('.').unwrap();
    (input.as_bytes().to_vec(), B64URL.decode(sig).unwrap())
}

fn es256(c: &mut Criterion) {
    let rng = SystemRandom::new();
    let pkcs8 =
        EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
    let now = SystemTime::now();
    let signer = JwtSigner::from_pkcs8(
        "k1",
        Curve::P256,
        pkcs8.as_ref(),
        now + Duration::from_secs(3600),
    )
    .unwrap();
    let mut bundle = Bundle::new(TrustDomain::new("example.org").unwrap());
    bundle.jwt_authorities.push(JwtAuthority {
        kid: "k1".into(),
        public_key: signer.public_key().clone(),
    });
    let sub = SpiffeId::parse("spiffe://example.org/ns/prod/sa/web").unwrap();
    let tokens: Vec<String> = (0..POOL)
        .map(|_| {
            signer
                .mint(&sub, &["svc".into()], jwt::DEFAULT_TTL, now)
                .unwrap()
                .token
        })
        .collect();
    let raw: Vec<_> = tokens.iter().map(|t| split(t)).collect();
    let PublicKey::Ec { point, .. } = signer.public_key().clone() else {
        unreachable!("an ES256 signer has an EC key")
    };

    let mut g = c.benchmark_group("jws_es256");
    g.measurement_time(Duration::from_secs(5));
    let mut i = 0;
    g.bench_function("ring_verify_only", |b| {
        b.iter(|| {
            i = (i + 1) % POOL;
            let (input, sig) = &raw[i];
            UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, &point)
                .verify(input, sig)
                .unwrap();
        })
    });
    g.bench_function("jws_core_parse_verify_times", |b| {
        b.iter(|| {
            i = (i + 1) % POOL;
            let t = jws::parse(&tokens[i], Alg::ALL).unwrap();
            let claims = t.verify(signer.public_key()).unwrap();
            claims.times().unwrap().check(now).unwrap();
        })
    });
    // Our share alone: split, header rules, strict JSON of both parts, time
    // claims; no signature.
    g.bench_function("jws_core_without_signature", |b| {
        b.iter(|| {
            i = (i + 1) % POOL;
            let t = jws::parse(&tokens[i], Alg::ALL).unwrap();
            let claims = t.unverified_claims().unwrap();
            claims.times().unwrap().check(now).unwrap();
        })
    });
    g.bench_function("jwt_svid_validate", |b| {
        b.iter(|| {
            i = (i + 1) % POOL;
            jwt::validate(&tokens[i], &["svc"], &bundle, now).unwrap();
        })
    });
    g.finish();
}

/// RS256 over a Kubernetes-shaped claim set (what most clusters sign);
/// the RSA key comes from openssl (ring cannot generate RSA keys).
fn rs256(c: &mut Criterion) {
    let out = std::process::Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-outform",
            "DER",
        ])
        .output()
        .expect("openssl makes the RSA key");
    let key = RsaKeyPair::from_der(&out.stdout)
        .or_else(|_| RsaKeyPair::from_pkcs8(&out.stdout))
        .unwrap();
    let comps =
        ring::rsa::PublicKeyComponents::<Vec<u8>>::from(ring::signature::KeyPair::public_key(&key));
    let public = PublicKey::rsa(&comps.n, &comps.e).unwrap();
    let now = SystemTime::now();
    let t = unix_seconds(now);
    let header = B64URL.encode(r#"{"alg":"RS256","kid":"k8s-key-1"}"#);
    let claims = B64URL.encode(format!(
        r#"{{"aud":["sigil-server"],"exp":{},"iat":{t},"nbf":{t},"iss":"https://kubernetes.default.svc.cluster.local","jti":"0b6a1a2e-3f4c-4d5e-8f9a-0b1c2d3e4f5a","kubernetes.io":{{"namespace":"sigil","node":{{"name":"node-a","uid":"6f1d2b8e-4c3a-4d2e-9b7a-0c5e8f9a1b2c"}},"pod":{{"name":"sigil-agent-x7k2p","uid":"3a4b5c6d-7e8f-4a0b-9c1d-2e3f4a5b6c7d"}},"serviceaccount":{{"name":"sigil-agent","uid":"9e8d7c6b-5a4f-4e3d-8c2b-1a0f9e8d7c6b"}}}},"sub":"system:serviceaccount:sigil:sigil-agent"}}"#,
        t + 3600
    ));
    let input = format!("{header}.{claims}");
    let mut sig = vec![0; key.public().modulus_len()];
    key.sign(
        &signature::RSA_PKCS1_SHA256,
        &SystemRandom::new(),
        input.as_bytes(),
        &mut sig,
    )
    .unwrap();
    let token = format!("{input}.{}", B64URL.encode(&sig));
    let algs = &[Alg::RS256, Alg::RS384, Alg::RS512, Alg::ES256, Alg::ES384];

    let mut g = c.benchmark_group("jws_rs256_k8s");
    g.measurement_time(Duration::from_secs(5));
    g.bench_function("ring_verify_only", |b| {
        b.iter(|| {
            signature::RsaPublicKeyComponents {
                n: &comps.n,
                e: &comps.e,
            }
            .verify(
                &signature::RSA_PKCS1_2048_8192_SHA256,
                input.as_bytes(),
                &sig,
            )
            .unwrap();
        })
    });
    g.bench_function("jws_core_without_signature", |b| {
        b.iter(|| {
            let t = jws::parse(&token, algs).unwrap();
            let claims = t.unverified_claims().unwrap();
            claims.times().unwrap().check(now).unwrap();
        })
    });
    g.bench_function("jws_core_parse_verify_times", |b| {
        b.iter(|| {
            let t = jws::parse(&token, algs).unwrap();
            let claims = t.verify(&public).unwrap();
            claims.times().unwrap().check(now).unwrap();
        })
    });
    g.finish();
}

criterion_group!(benches, es256, rs256);
criterion_main!(benches);
