//! Tables for SPEC.md "Trust bundles".

use super::*;
use crate::testutil;

fn td() -> TrustDomain {
    TrustDomain::new("example.org").unwrap()
}

fn jwt_key() -> PublicKey {
    let kp = rcgen::KeyPair::generate().unwrap();
    PublicKey::from_spki_der(&rcgen::PublicKeyData::subject_public_key_info(&kp)).unwrap()
}

fn sample() -> Bundle {
    let ca = testutil::ca("example.org");
    Bundle {
        trust_domain: td(),
        x509_authorities: vec![ca.der],
        jwt_authorities: vec![JwtAuthority {
            kid: "k1".into(),
            public_key: jwt_key(),
        }],
        sequence: 7,
        refresh_hint: Some(Duration::from_secs(300)),
        tainted_x509_authorities: Vec::new(),
        tainted_jwt_kids: Vec::new(),
    }
}

fn keys_of(v: &Value) -> &Vec<Value> {
    v["keys"].as_array().unwrap()
}

#[test]
fn jwks_round_trip() {
    let b = sample();
    let bytes = b.to_jwks_bytes();
    let back = Bundle::from_jwks(td(), &bytes).unwrap();
    assert_eq!(back, b);
}

#[test]
fn jwks_shape_follows_spiffe() {
    let v = sample().to_jwks();
    assert_eq!(v["spiffe_sequence"], 7);
    assert_eq!(v["spiffe_refresh_hint"], 300);
    let keys = keys_of(&v);
    let x509 = keys.iter().find(|k| k["use"] == "x509-svid").unwrap();
    assert_eq!(x509["x5c"].as_array().unwrap().len(), 1, "exactly one x5c");
    assert!(x509.get("kid").is_none(), "x509-svid keys carry no kid");
    assert_eq!(x509["kty"], "EC");
    let jwt = keys.iter().find(|k| k["use"] == "jwt-svid").unwrap();
    assert_eq!(jwt["kid"], "k1", "jwt-svid keys always carry kid");
}

#[test]
fn keys_is_present_even_when_empty() {
    let v = Bundle::new(td()).to_jwks();
    assert_eq!(v["keys"], serde_json::json!([]));
    assert_eq!(v["spiffe_sequence"], 0);
}

fn mutated(f: impl Fn(&mut Value)) -> Vec<u8> {
    let mut v = sample().to_jwks();
    f(&mut v);
    serde_json::to_vec(&v).unwrap()
}

fn x509_key(v: &mut Value) -> &mut Value {
    v["keys"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|k| k["use"] == "x509-svid")
        .unwrap()
}

fn jwt_key_of(v: &mut Value) -> &mut Value {
    v["keys"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|k| k["use"] == "jwt-svid")
        .unwrap()
}

#[test]
fn decode_rejection_table() {
    let ca2 = testutil::ca("example.org");
    let leaf = ca2.issue(&testutil::leaf_params("spiffe://example.org/w"));
    let b64 = |d: &[u8]| base64::engine::general_purpose::STANDARD.encode(d);
    let leaf_b64 = b64(&leaf);
    let other_ca_b64 = b64(&ca2.der);
    let rows: Vec<(&str, Vec<u8>, BundleError)> = vec![
        (
            "no keys",
            br#"{"spiffe_sequence":1}"#.to_vec(),
            BundleError::MissingKeys,
        ),
        (
            "not json",
            b"[1,2]".to_vec(),
            BundleError::Json(String::new()),
        ),
        (
            // The JWK Set reader's duplicate rule (identity::jwks): a second
            // spiffe_sequence must not silently win.
            "duplicate member",
            br#"{"keys":[],"spiffe_sequence":1,"spiffe_sequence":9}"#.to_vec(),
            BundleError::Json(String::new()),
        ),
        (
            "negative sequence",
            mutated(|v| v["spiffe_sequence"] = (-1).into()),
            BundleError::BadSequence,
        ),
        (
            "string hint",
            mutated(|v| v["spiffe_refresh_hint"] = "5m".into()),
            BundleError::BadRefreshHint,
        ),
        (
            "x509 with kid",
            mutated(|v| x509_key(v)["kid"] = "x".into()),
            BundleError::X509Kid { index: 0 },
        ),
        (
            "x509 no x5c",
            mutated(|v| {
                x509_key(v).as_object_mut().unwrap().remove("x5c");
            }),
            BundleError::X5cCount { index: 0 },
        ),
        (
            "x509 two x5c",
            mutated(|v| {
                let k = x509_key(v);
                let c = k["x5c"][0].clone();
                k["x5c"] = serde_json::json!([c.clone(), c]);
            }),
            BundleError::X5cCount { index: 0 },
        ),
        (
            "x509 leaf not ca",
            mutated(move |v| x509_key(v)["x5c"] = serde_json::json!([leaf_b64.clone()])),
            BundleError::BadCertificate { index: 0 },
        ),
        (
            "x509 key mismatch",
            mutated(move |v| x509_key(v)["x5c"] = serde_json::json!([other_ca_b64.clone()])),
            BundleError::CertificateKeyMismatch { index: 0 },
        ),
        (
            "jwt no kid",
            mutated(|v| {
                jwt_key_of(v).as_object_mut().unwrap().remove("kid");
            }),
            BundleError::MissingKid { index: 1 },
        ),
        (
            "jwt empty kid",
            mutated(|v| jwt_key_of(v)["kid"] = "".into()),
            BundleError::MissingKid { index: 1 },
        ),
        (
            "duplicate kid",
            mutated(|v| {
                let k = jwt_key_of(v).clone();
                v["keys"].as_array_mut().unwrap().push(k);
            }),
            BundleError::DuplicateKid { index: 2 },
        ),
        (
            "too large",
            vec![b' '; MAX_BUNDLE_BYTES + 1],
            BundleError::TooLarge,
        ),
    ];
    for (name, bytes, want) in rows {
        let got = Bundle::from_jwks(td(), &bytes);
        match (&got, &want) {
            (Err(BundleError::Json(_)), BundleError::Json(_)) => {}
            _ => assert_eq!(got.as_ref().err(), Some(&want), "{name}"),
        }
    }
}

#[test]
fn unknown_use_is_ignored() {
    let bytes = mutated(|v| jwt_key_of(v)["use"] = "enc".into());
    let b = Bundle::from_jwks(td(), &bytes).unwrap();
    assert!(b.jwt_authorities.is_empty());
    assert_eq!(b.x509_authorities.len(), 1);
}

#[test]
fn bundles_of_different_trust_domains_stay_apart() {
    let a = sample();
    let mut other = sample();
    other.trust_domain = TrustDomain::new("other.org").unwrap();
    assert!(!a.same_authorities(&other));
    use crate::jwt::BundleSource;
    let set = [a.clone(), other.clone()];
    assert_eq!(set.bundle_for(&td()), Some(&a));
    assert_eq!(a.bundle_for(&TrustDomain::new("other.org").unwrap()), None);
}

#[test]
fn serde_storage_round_trip() {
    let b = sample();
    let json = serde_json::to_string(&b).unwrap();
    let back: Bundle = serde_json::from_str(&json).unwrap();
    assert_eq!(back, b);
}

#[test]
fn pem_output_has_every_authority() {
    let b = sample();
    let pem = b.x509_pem();
    assert_eq!(
        crate::pem::decode_all("CERTIFICATE", &pem).unwrap(),
        b.x509_authorities
    );
}
