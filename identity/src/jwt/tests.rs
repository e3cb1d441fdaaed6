//! Tables for SPEC.md "JWT-SVIDs".

use super::*;
use crate::bundle::JwtAuthority;
use ring::signature::{EcdsaKeyPair, KeyPair};

const SUB: &str = "spiffe://example.org/web";

struct Fixture {
    pkcs8: Vec<u8>,
    signer: JwtSigner,
    bundles: Vec<Bundle>,
    now: SystemTime,
}

fn td(s: &str) -> TrustDomain {
    TrustDomain::new(s).unwrap()
}

fn fixture() -> Fixture {
    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&sig::ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
        .unwrap()
        .as_ref()
        .to_vec();
    let now = SystemTime::now();
    let signer =
        JwtSigner::from_pkcs8("k1", Curve::P256, &pkcs8, now + Duration::from_secs(3600)).unwrap();
    let mut own = Bundle::new(td("example.org"));
    own.jwt_authorities.push(JwtAuthority {
        kid: "k1".into(),
        public_key: signer.public_key().clone(),
    });
    // Another trust domain's bundle holds a key under kid "k2".
    let other_pkcs8 =
        EcdsaKeyPair::generate_pkcs8(&sig::ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
    let other = EcdsaKeyPair::from_pkcs8(
        &sig::ECDSA_P256_SHA256_FIXED_SIGNING,
        other_pkcs8.as_ref(),
        &rng,
    )
    .unwrap();
    let mut foreign = Bundle::new(td("other.org"));
    foreign.jwt_authorities.push(JwtAuthority {
        kid: "k2".into(),
        public_key: PublicKey::ec(Curve::P256, other.public_key().as_ref().to_vec()).unwrap(),
    });
    Fixture {
        pkcs8,
        signer,
        bundles: vec![own, foreign],
        now,
    }
}

impl Fixture {
    /// Signs raw header and claims JSON text with the fixture's P-256 key.
    fn forge(&self, header: &str, claims: &str) -> String {
        let rng = SystemRandom::new();
        let key =
            EcdsaKeyPair::from_pkcs8(&sig::ECDSA_P256_SHA256_FIXED_SIGNING, &self.pkcs8, &rng)
                .unwrap();
        let signing_input = format!("{}.{}", B64URL.encode(header), B64URL.encode(claims));
        let s = key.sign(&rng, signing_input.as_bytes()).unwrap();
        format!("{signing_input}.{}", B64URL.encode(s.as_ref()))
    }

    fn exp(&self, offset: i64) -> u64 {
        (unix_seconds(self.now) as i64 + offset) as u64
    }

    fn claims(&self) -> String {
        format!(
            r#"{{"sub":"{SUB}","aud":["svc"],"exp":{},"iat":{}}}"#,
            self.exp(300),
            self.exp(0)
        )
    }

    fn check(&self, token: &str) -> Result<JwtSvid, JwtError> {
        validate(token, &["svc"], self.bundles.as_slice(), self.now)
    }
}

#[test]
fn minted_token_validates() {
    let f = fixture();
    let t = f
        .signer
        .mint(
            &SpiffeId::parse(SUB).unwrap(),
            &["svc".into()],
            DEFAULT_TTL,
            f.now,
        )
        .unwrap();
    let got = f.check(&t.token).unwrap();
    assert_eq!(got.spiffe_id.as_str(), SUB);
    assert_eq!(got.audience, vec!["svc".to_string()]);
    assert_eq!(got.expiry, t.expiry);
}

#[test]
fn minted_header_holds_alg_kid_typ_only() {
    let f = fixture();
    let t = f
        .signer
        .mint(
            &SpiffeId::parse(SUB).unwrap(),
            &["a".into()],
            DEFAULT_TTL,
            f.now,
        )
        .unwrap();
    let header: Value =
        serde_json::from_slice(&B64URL.decode(t.token.split('.').next().unwrap()).unwrap())
            .unwrap();
    assert_eq!(
        header,
        serde_json::json!({"alg": "ES256", "kid": "k1", "typ": "JWT"})
    );
    let claims: Value =
        serde_json::from_slice(&B64URL.decode(t.token.split('.').nth(1).unwrap()).unwrap())
            .unwrap();
    let mut names: Vec<_> = claims.as_object().unwrap().keys().cloned().collect();
    names.sort();
    assert_eq!(names, ["aud", "exp", "iat", "sub"]);
}

#[test]
fn exp_is_capped_at_the_signing_key_expiry() {
    let f = fixture();
    let t = f
        .signer
        .mint(
            &SpiffeId::parse(SUB).unwrap(),
            &["a".into()],
            Duration::from_secs(86400),
            f.now,
        )
        .unwrap();
    assert_eq!(unix_seconds(t.expiry), unix_seconds(f.signer.not_after()));
    let late = f.signer.not_after() + Duration::from_secs(1);
    let err = f
        .signer
        .mint(
            &SpiffeId::parse(SUB).unwrap(),
            &["a".into()],
            DEFAULT_TTL,
            late,
        )
        .unwrap_err();
    assert_eq!(err, JwtError::SigningKeyExpired);
}

#[test]
fn mint_refuses_bad_audience() {
    let f = fixture();
    let sub = SpiffeId::parse(SUB).unwrap();
    assert_eq!(
        f.signer.mint(&sub, &[], DEFAULT_TTL, f.now).unwrap_err(),
        JwtError::BadAudience
    );
    assert_eq!(
        f.signer
            .mint(&sub, &["".into()], DEFAULT_TTL, f.now)
            .unwrap_err(),
        JwtError::BadAudience
    );
}

#[test]
fn validation_rejection_table() {
    let f = fixture();
    let ok_header = r#"{"alg":"ES256","kid":"k1","typ":"JWT"}"#;
    let claims = f.claims();
    let rows: Vec<(&str, String, JwtError)> =
        vec![
        (
            "alg none",
            f.forge(r#"{"alg":"none","kid":"k1"}"#, &claims),
            JwtError::Jws(JwsError::AlgNone),
        ),
        (
            "alg HS256",
            f.forge(r#"{"alg":"HS256","kid":"k1"}"#, &claims),
            JwtError::Jws(JwsError::AlgHmac),
        ),
        (
            "alg HS512",
            f.forge(r#"{"alg":"HS512","kid":"k1"}"#, &claims),
            JwtError::Jws(JwsError::AlgHmac),
        ),
        (
            "alg/key mismatch",
            f.forge(r#"{"alg":"RS256","kid":"k1"}"#, &claims),
            JwtError::Jws(JwsError::AlgKeyMismatch("RS256")),
        ),
        (
            "ES384 on P-256 key",
            f.forge(r#"{"alg":"ES384","kid":"k1"}"#, &claims),
            JwtError::Jws(JwsError::AlgKeyMismatch("ES384")),
        ),
        (
            "missing kid",
            f.forge(r#"{"alg":"ES256"}"#, &claims),
            JwtError::Jws(JwsError::MissingKid),
        ),
        (
            "kid from another trust domain",
            f.forge(r#"{"alg":"ES256","kid":"k2"}"#, &claims),
            JwtError::UnknownKid {
                kid: "k2".into(),
                trust_domain: td("example.org"),
            },
        ),
        (
            "kid unknown",
            f.forge(r#"{"alg":"ES256","kid":"nope"}"#, &claims),
            JwtError::UnknownKid {
                kid: "nope".into(),
                trust_domain: td("example.org"),
            },
        ),
        (
            "embedded jwk",
            f.forge(r#"{"alg":"ES256","kid":"k1","jwk":{}}"#, &claims),
            JwtError::Jws(JwsError::EmbeddedKey("jwk")),
        ),
        (
            "embedded jku",
            f.forge(r#"{"alg":"ES256","kid":"k1","jku":"x"}"#, &claims),
            JwtError::Jws(JwsError::EmbeddedKey("jku")),
        ),
        (
            "embedded x5u",
            f.forge(r#"{"alg":"ES256","kid":"k1","x5u":"x"}"#, &claims),
            JwtError::Jws(JwsError::EmbeddedKey("x5u")),
        ),
        (
            "embedded x5c",
            f.forge(r#"{"alg":"ES256","kid":"k1","x5c":[]}"#, &claims),
            JwtError::Jws(JwsError::EmbeddedKey("x5c")),
        ),
        (
            "crit",
            f.forge(r#"{"alg":"ES256","kid":"k1","crit":["exp"]}"#, &claims),
            JwtError::Jws(JwsError::Crit),
        ),
        (
            "bad typ",
            f.forge(r#"{"alg":"ES256","kid":"k1","typ":"at+jwt"}"#, &claims),
            JwtError::Jws(JwsError::BadTyp),
        ),
        (
            "duplicate header member",
            f.forge(r#"{"alg":"ES256","kid":"k1","kid":"k1"}"#, &claims),
            JwtError::Jws(JwsError::DuplicateMember("kid".into())),
        ),
        (
            "duplicate claim",
            f.forge(
                ok_header,
                &format!(
                    r#"{{"sub":"{SUB}","sub":"spiffe://example.org/admin","aud":"svc","exp":{}}}"#,
                    f.exp(60)
                ),
            ),
            JwtError::Jws(JwsError::DuplicateMember("sub".into())),
        ),
        (
            "duplicate member in a nested claim",
            f.forge(
                ok_header,
                &format!(
                    r#"{{"sub":"{SUB}","aud":"svc","exp":{},"ctx":{{"role":"a","role":"b"}}}}"#,
                    f.exp(60)
                ),
            ),
            JwtError::Jws(JwsError::DuplicateMember("role".into())),
        ),
        (
            "fractional iat",
            f.forge(
                ok_header,
                &format!(
                    r#"{{"sub":"{SUB}","aud":"svc","exp":{},"iat":{}.5}}"#,
                    f.exp(60),
                    f.exp(0)
                ),
            ),
            JwtError::Jws(JwsError::BadNumericClaim("iat")),
        ),
        (
            "missing exp",
            f.forge(ok_header, &format!(r#"{{"sub":"{SUB}","aud":"svc"}}"#)),
            JwtError::BadExp,
        ),
        (
            "string exp",
            f.forge(
                ok_header,
                &format!(r#"{{"sub":"{SUB}","aud":"svc","exp":"{}"}}"#, f.exp(60)),
            ),
            JwtError::BadExp,
        ),
        (
            "expired beyond leeway",
            f.forge(
                ok_header,
                &format!(r#"{{"sub":"{SUB}","aud":"svc","exp":{}}}"#, f.exp(-31)),
            ),
            JwtError::Jws(JwsError::Expired),
        ),
        (
            "nbf in the future",
            f.forge(
                ok_header,
                &format!(
                    r#"{{"sub":"{SUB}","aud":"svc","exp":{},"nbf":{}}}"#,
                    f.exp(600),
                    f.exp(120)
                ),
            ),
            JwtError::Jws(JwsError::NotYetValid),
        ),
        (
            "wrong audience",
            f.forge(
                ok_header,
                &format!(r#"{{"sub":"{SUB}","aud":["other"],"exp":{}}}"#, f.exp(60)),
            ),
            JwtError::WrongAudience("svc".into()),
        ),
        (
            "empty audience list",
            f.forge(
                ok_header,
                &format!(r#"{{"sub":"{SUB}","aud":[],"exp":{}}}"#, f.exp(60)),
            ),
            JwtError::BadAudience,
        ),
        (
            "empty audience string",
            f.forge(
                ok_header,
                &format!(r#"{{"sub":"{SUB}","aud":["svc",""],"exp":{}}}"#, f.exp(60)),
            ),
            JwtError::BadAudience,
        ),
        (
            "missing aud",
            f.forge(
                ok_header,
                &format!(r#"{{"sub":"{SUB}","exp":{}}}"#, f.exp(60)),
            ),
            JwtError::BadAudience,
        ),
        (
            "missing sub",
            f.forge(
                ok_header,
                &format!(r#"{{"aud":"svc","exp":{}}}"#, f.exp(60)),
            ),
            JwtError::MissingSub,
        ),
        (
            "sub not a spiffe id",
            f.forge(
                ok_header,
                &format!(r#"{{"sub":"web","aud":"svc","exp":{}}}"#, f.exp(60)),
            ),
            JwtError::BadSub,
        ),
        (
            "sub of unknown trust domain",
            f.forge(
                ok_header,
                &format!(
                    r#"{{"sub":"spiffe://nobody.org/w","aud":"svc","exp":{}}}"#,
                    f.exp(60)
                ),
            ),
            JwtError::NoBundle(td("nobody.org")),
        ),
        (
            "oversized",
            format!("{}.{}.{}", "a".repeat(MAX_TOKEN_LEN), "b", "c"),
            JwtError::Jws(JwsError::TooLong),
        ),
        ("two parts", "abc.def".into(), JwtError::Jws(JwsError::Malformed)),
        ("four parts", "a.b.c.d".into(), JwtError::Jws(JwsError::Malformed)),
        ("not base64", "!!.!!.!!".into(), JwtError::Jws(JwsError::Malformed)),
    ];
    for (name, token, want) in rows {
        assert_eq!(f.check(&token).err(), Some(want), "{name}");
    }
}

#[test]
fn tampered_signature_or_claims_fail() {
    let f = fixture();
    let t = f
        .signer
        .mint(
            &SpiffeId::parse(SUB).unwrap(),
            &["svc".into()],
            DEFAULT_TTL,
            f.now,
        )
        .unwrap()
        .token;
    let parts: Vec<&str> = t.split('.').collect();
    let forged_claims = B64URL.encode(format!(
        r#"{{"sub":"spiffe://example.org/admin","aud":"svc","exp":{}}}"#,
        f.exp(60)
    ));
    let swapped = format!("{}.{}.{}", parts[0], forged_claims, parts[2]);
    assert_eq!(
        f.check(&swapped).err(),
        Some(JwtError::Jws(JwsError::BadSignature))
    );
    let mut sig = B64URL.decode(parts[2]).unwrap();
    sig[5] ^= 1;
    let bad_sig = format!("{}.{}.{}", parts[0], parts[1], B64URL.encode(sig));
    assert_eq!(
        f.check(&bad_sig).err(),
        Some(JwtError::Jws(JwsError::BadSignature))
    );
}

#[test]
fn leeway_is_thirty_seconds() {
    let f = fixture();
    let header = r#"{"alg":"ES256","kid":"k1"}"#;
    let t = f.forge(
        header,
        &format!(r#"{{"sub":"{SUB}","aud":"svc","exp":{}}}"#, f.exp(-29)),
    );
    assert!(f.check(&t).is_ok(), "29 s past exp is within leeway");
    let t = f.forge(
        header,
        &format!(r#"{{"sub":"{SUB}","aud":"svc","exp":{}.5}}"#, f.exp(60)),
    );
    // One integer rule for NumericDates (see jws.rs): a fraction is refused.
    assert_eq!(f.check(&t).err(), Some(JwtError::BadExp), "fractional exp");
}

#[test]
fn every_expected_audience_must_be_present() {
    let f = fixture();
    let sub = SpiffeId::parse(SUB).unwrap();
    let t = f
        .signer
        .mint(&sub, &["a".into(), "b".into()], DEFAULT_TTL, f.now)
        .unwrap()
        .token;
    assert!(validate(&t, &["a", "b"], f.bundles.as_slice(), f.now).is_ok());
    assert!(validate(&t, &["a"], f.bundles.as_slice(), f.now).is_ok());
    assert_eq!(
        validate(&t, &["a", "c"], f.bundles.as_slice(), f.now).err(),
        Some(JwtError::WrongAudience("c".into()))
    );
    assert_eq!(
        validate(&t, &[], f.bundles.as_slice(), f.now).err(),
        Some(JwtError::NoExpectedAudience)
    );
}

fn openssl(args: &[&str], stdin: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut child = std::process::Command::new("openssl")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("openssl is installed");
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "openssl {args:?}");
    out.stdout
}

/// RS256, PS256 and RS512 tokens from a federated issuer validate. The RSA
/// key and signatures come from the openssl command line, an independent
/// implementation (ring cannot generate RSA keys).
#[test]
fn federated_rsa_tokens_validate() {
    let dir = std::env::temp_dir().join(format!("sigil-rsa-{}", crate::random::hex_id()));
    std::fs::create_dir_all(&dir).unwrap();
    let key_path = dir.join("k.pem");
    let key = key_path.to_str().unwrap();
    openssl(
        &[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            key,
        ],
        b"",
    );
    let spki = openssl(&["pkey", "-in", key, "-pubout", "-outform", "DER"], b"");
    let public_key = PublicKey::from_spki_der(&spki).unwrap();
    let mut b = Bundle::new(td("fed.org"));
    b.jwt_authorities.push(JwtAuthority {
        kid: "r1".into(),
        public_key,
    });
    let now = SystemTime::now();
    let claims = format!(
        r#"{{"sub":"spiffe://fed.org/w","aud":"svc","exp":{}}}"#,
        unix_seconds(now) + 60
    );
    for (alg, args) in [
        ("RS256", vec!["-sha256"]),
        ("RS512", vec!["-sha512"]),
        (
            "PS256",
            vec![
                "-sha256",
                "-sigopt",
                "rsa_padding_mode:pss",
                "-sigopt",
                "rsa_pss_saltlen:32",
            ],
        ),
    ] {
        let input = format!(
            "{}.{}",
            B64URL.encode(format!(r#"{{"alg":"{alg}","kid":"r1"}}"#)),
            B64URL.encode(&claims)
        );
        let mut cmd = vec!["dgst"];
        cmd.extend(args);
        cmd.extend(["-sign", key]);
        let s = openssl(&cmd, input.as_bytes());
        let token = format!("{input}.{}", B64URL.encode(&s));
        let got = validate(&token, &["svc"], &b, now).unwrap_or_else(|e| panic!("{alg}: {e}"));
        assert_eq!(got.spiffe_id.as_str(), "spiffe://fed.org/w");
    }
    std::fs::remove_dir_all(&dir).ok();
    // An ES256 header naming the RSA key is an alg/key mismatch.
    let input = format!(
        "{}.{}",
        B64URL.encode(r#"{"alg":"ES256","kid":"r1"}"#),
        B64URL.encode(&claims)
    );
    let token = format!("{input}.{}", B64URL.encode([0u8; 64]));
    assert_eq!(
        validate(&token, &["svc"], &b, now).err(),
        Some(JwtError::Jws(JwsError::AlgKeyMismatch("ES256")))
    );
}

#[test]
fn debug_never_shows_the_token() {
    let f = fixture();
    let t = f
        .signer
        .mint(
            &SpiffeId::parse(SUB).unwrap(),
            &["svc".into()],
            DEFAULT_TTL,
            f.now,
        )
        .unwrap();
    let shown = format!("{t:?}");
    assert!(!shown.contains(&t.token));
    assert!(!shown.contains(t.token.split('.').nth(2).unwrap()));
}

fn claims_of(token: &str) -> Value {
    serde_json::from_slice(&B64URL.decode(token.split('.').nth(1).unwrap()).unwrap()).unwrap()
}

#[test]
fn with_issuer_adds_iss_and_tokens_validate_with_and_without_it() {
    let f = fixture();
    let sub = SpiffeId::parse(SUB).unwrap();
    let issuer = "https://oidc.example.org";
    let signer = JwtSigner::from_pkcs8("k1", Curve::P256, &f.pkcs8, f.now + DEFAULT_TTL * 12)
        .unwrap()
        .with_issuer(Some(issuer.into()));
    assert_eq!(signer.issuer(), Some(issuer));
    let with = signer
        .mint(&sub, &["svc".into()], DEFAULT_TTL, f.now)
        .unwrap();
    assert_eq!(claims_of(&with.token)["iss"], issuer);
    assert_eq!(f.check(&with.token).unwrap().spiffe_id, sub);

    let without = f
        .signer
        .mint(&sub, &["svc".into()], DEFAULT_TTL, f.now)
        .unwrap();
    assert_eq!(f.signer.issuer(), None);
    assert!(
        claims_of(&without.token).get("iss").is_none(),
        "no iss unless set"
    );
    assert_eq!(f.check(&without.token).unwrap().spiffe_id, sub);

    // `None` clears it again.
    let cleared = JwtSigner::from_pkcs8("k1", Curve::P256, &f.pkcs8, f.now + DEFAULT_TTL * 12)
        .unwrap()
        .with_issuer(None)
        .mint(&sub, &["svc".into()], DEFAULT_TTL, f.now)
        .unwrap();
    assert!(claims_of(&cleared.token).get("iss").is_none());
}
