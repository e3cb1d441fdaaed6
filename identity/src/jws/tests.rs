//! One test per rule of the compact-JWS core.

use super::*;
use crate::clock::unix_seconds;
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};

struct Key {
    pair: EcdsaKeyPair,
    public: PublicKey,
}

fn key() -> Key {
    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
    let pair =
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng).unwrap();
    let public = PublicKey::ec(Curve::P256, pair.public_key().as_ref().to_vec()).unwrap();
    Key { pair, public }
}

impl Key {
    /// Signs raw header and claims JSON text.
    fn sign(&self, header: &str, claims: &str) -> String {
        let input = format!("{}.{}", B64URL.encode(header), B64URL.encode(claims));
        let s = self
            .pair
            .sign(&SystemRandom::new(), input.as_bytes())
            .unwrap();
        format!("{input}.{}", B64URL.encode(s.as_ref()))
    }
}

const ES256: &[Alg] = &[Alg::ES256];

fn header_err(header: &str, algs: &[Alg]) -> Option<JwsError> {
    let token = key().sign(header, "{}");
    parse(&token, algs).err()
}

#[test]
fn a_well_formed_token_verifies_and_yields_its_claims() {
    let k = key();
    let t = k.sign(r#"{"alg":"ES256","kid":"k1"}"#, r#"{"sub":"x","exp":5}"#);
    let jws = parse(&t, ES256).unwrap();
    assert_eq!(jws.kid(), "k1");
    assert_eq!(jws.header().alg, Alg::ES256);
    let claims = jws.verify(&k.public).unwrap();
    assert_eq!(claims.get("sub"), Some(&Value::from("x")));
    // Another key's signature does not verify.
    assert_eq!(jws.verify(&key().public), Err(JwsError::BadSignature));
}

#[test]
fn duplicate_members_are_refused_at_any_depth() {
    for (what, header) in [
        ("header", r#"{"alg":"ES256","kid":"a","kid":"b"}"#),
        (
            "escaped duplicate",
            r#"{"alg":"ES256","kid":"a","k\u0069d":"b"}"#,
        ),
    ] {
        assert_eq!(
            header_err(header, ES256),
            Some(JwsError::DuplicateMember("kid".into())),
            "{what}"
        );
    }
    let k = key();
    for (what, claims, dup) in [
        ("top level", r#"{"sub":"a","sub":"b"}"#, "sub"),
        (
            "nested",
            r#"{"kubernetes.io":{"pod":{"name":"a"},"pod":{"name":"b"}}}"#,
            "pod",
        ),
        ("in an array", r#"{"aud":[{"x":1,"x":2}]}"#, "x"),
    ] {
        let t = k.sign(r#"{"alg":"ES256","kid":"k1"}"#, claims);
        let jws = parse(&t, ES256).unwrap();
        assert_eq!(
            jws.verify(&k.public),
            Err(JwsError::DuplicateMember(dup.into())),
            "{what}"
        );
    }
}

#[test]
fn alg_allow_list_is_the_callers_and_never_holds_none_or_hmac() {
    assert_eq!(
        header_err(r#"{"alg":"PS256","kid":"k"}"#, &[Alg::RS256, Alg::ES256]),
        Some(JwsError::UnsupportedAlg("PS256".into()))
    );
    assert_eq!(header_err(r#"{"alg":"PS256","kid":"k"}"#, Alg::ALL), None);
    assert_eq!(
        header_err(r#"{"alg":"none","kid":"k"}"#, Alg::ALL),
        Some(JwsError::AlgNone)
    );
    assert_eq!(
        header_err(r#"{"alg":"HS256","kid":"k"}"#, Alg::ALL),
        Some(JwsError::AlgHmac)
    );
    assert_eq!(
        header_err(r#"{"alg":"ES512","kid":"k"}"#, Alg::ALL),
        Some(JwsError::UnsupportedAlg("ES512".into()))
    );
    assert_eq!(
        header_err(r#"{"kid":"k"}"#, Alg::ALL),
        Some(JwsError::UnsupportedAlg(String::new()))
    );
}

#[test]
fn typ_is_optional_and_jwt_or_jose() {
    for ok in [
        r#"{"alg":"ES256","kid":"k"}"#,
        r#"{"alg":"ES256","kid":"k","typ":"JWT"}"#,
        r#"{"alg":"ES256","kid":"k","typ":"JOSE"}"#,
    ] {
        assert_eq!(header_err(ok, ES256), None, "{ok}");
    }
    for bad in [
        r#"{"alg":"ES256","kid":"k","typ":"at+jwt"}"#,
        r#"{"alg":"ES256","kid":"k","typ":"jwt"}"#,
        r#"{"alg":"ES256","kid":"k","typ":1}"#,
    ] {
        assert_eq!(header_err(bad, ES256), Some(JwsError::BadTyp), "{bad}");
    }
}

#[test]
fn header_holds_alg_kid_typ_only() {
    for (header, want) in [
        (r#"{"alg":"ES256"}"#, JwsError::MissingKid),
        (r#"{"alg":"ES256","kid":""}"#, JwsError::MissingKid),
        (r#"{"alg":"ES256","kid":7}"#, JwsError::MissingKid),
        (
            r#"{"alg":"ES256","kid":"k","jwk":{}}"#,
            JwsError::EmbeddedKey("jwk"),
        ),
        (
            r#"{"alg":"ES256","kid":"k","jku":"u"}"#,
            JwsError::EmbeddedKey("jku"),
        ),
        (
            r#"{"alg":"ES256","kid":"k","x5u":"u"}"#,
            JwsError::EmbeddedKey("x5u"),
        ),
        (
            r#"{"alg":"ES256","kid":"k","x5c":[]}"#,
            JwsError::EmbeddedKey("x5c"),
        ),
        (
            r#"{"alg":"ES256","kid":"k","crit":["b64"]}"#,
            JwsError::Crit,
        ),
        (
            r#"{"alg":"ES256","kid":"k","cty":"JWT"}"#,
            JwsError::UnexpectedHeader("cty".into()),
        ),
    ] {
        assert_eq!(header_err(header, ES256), Some(want), "{header}");
    }
}

#[test]
fn structure_is_three_base64url_parts_within_the_size_limit() {
    for bad in ["a.b", "a.b.c.d", "!!.!!.!!", ""] {
        assert_eq!(parse(bad, ES256).err(), Some(JwsError::Malformed), "{bad}");
    }
    let long = format!("{}.b.c", "a".repeat(MAX_TOKEN_LEN));
    assert_eq!(parse(&long, ES256).err(), Some(JwsError::TooLong));
    let not_object = format!("{}.e30.", B64URL.encode("[1]"));
    assert!(matches!(parse(&not_object, ES256), Err(JwsError::Json(_))));
}

#[test]
fn the_signature_needs_a_key_of_the_algs_type() {
    let k = key();
    let t = k.sign(r#"{"alg":"RS256","kid":"k"}"#, "{}");
    let jws = parse(&t, Alg::ALL).unwrap();
    assert_eq!(
        jws.verify(&k.public),
        Err(JwsError::AlgKeyMismatch("RS256"))
    );
}

fn claims(json: &str) -> Claims {
    Claims(parse_json_object(json.as_bytes()).unwrap())
}

#[test]
fn time_claims_are_non_negative_integers() {
    let c = claims(r#"{"exp":1700000000,"nbf":0}"#);
    assert_eq!(
        c.time("exp").unwrap().map(unix_seconds),
        Some(1_700_000_000)
    );
    assert_eq!(c.time("nbf").unwrap().map(unix_seconds), Some(0));
    assert_eq!(c.time("iat"), Ok(None));
    for bad in [
        r#"{"exp":1700000000.5}"#,
        r#"{"exp":1700000000.0}"#,
        r#"{"exp":1.7e9}"#,
        r#"{"exp":-1}"#,
        r#"{"exp":"1700000000"}"#,
        r#"{"exp":null}"#,
        r#"{"exp":253402300800}"#,
    ] {
        assert_eq!(
            claims(bad).times(),
            Err(JwsError::BadNumericClaim("exp")),
            "{bad}"
        );
    }
    assert_eq!(
        claims(r#"{"iat":1.5}"#).times(),
        Err(JwsError::BadNumericClaim("iat"))
    );
}

#[test]
fn time_window_has_thirty_seconds_of_leeway_either_side() {
    let now = from_unix_seconds(1_700_000_000);
    let at = |s: i64| Some(from_unix_seconds((1_700_000_000 + s) as u64));
    let t = |exp, nbf, iat| Times { exp, nbf, iat };
    assert_eq!(t(at(-30), None, None).check(now), Ok(()));
    assert_eq!(t(at(-31), None, None).check(now), Err(JwsError::Expired));
    assert_eq!(t(None, at(30), None).check(now), Ok(()));
    assert_eq!(t(None, at(31), None).check(now), Err(JwsError::NotYetValid));
    assert_eq!(t(None, None, at(31)).check(now), Err(JwsError::NotYetValid));
    assert_eq!(t(None, None, None).check(now), Ok(()));
}
