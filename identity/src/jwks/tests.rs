//! The JWK Set reader shared by bundles and issuer key sets.

use super::*;
use serde_json::json;

fn ec_jwk(kid: &str) -> Value {
    let kp = rcgen::KeyPair::generate().unwrap();
    let key =
        PublicKey::from_spki_der(&rcgen::PublicKeyData::subject_public_key_info(&kp)).unwrap();
    let mut m = key.jwk_members();
    m.insert("kid".into(), json!(kid));
    Value::Object(m)
}

#[test]
fn envelope_rules() {
    let rows: Vec<(&str, Vec<u8>, JwksError)> = vec![
        ("no keys", b"{}".to_vec(), JwksError::MissingKeys),
        (
            "keys not array",
            br#"{"keys":{}}"#.to_vec(),
            JwksError::MissingKeys,
        ),
        (
            "key not object",
            br#"{"keys":[1]}"#.to_vec(),
            JwksError::KeyNotObject(0),
        ),
        (
            "duplicate keys member",
            br#"{"keys":[],"keys":[]}"#.to_vec(),
            JwksError::DuplicateMember("keys".into()),
        ),
        (
            "duplicate member in a key",
            br#"{"keys":[{"kty":"EC","kty":"RSA"}]}"#.to_vec(),
            JwksError::DuplicateMember("kty".into()),
        ),
        (
            "too many keys",
            serde_json::to_vec(&json!({"keys": [{}, {}, {}]})).unwrap(),
            JwksError::TooManyKeys(2),
        ),
        (
            "too large",
            vec![b' '; MAX_JWKS_BYTES + 1],
            JwksError::TooLarge,
        ),
    ];
    for (name, bytes, want) in rows {
        assert_eq!(parse(&bytes, 2).err(), Some(want), "{name}");
    }
    assert!(matches!(parse(b"[", 2), Err(JwksError::Json(_))));
    assert!(matches!(parse(b"[]", 2), Err(JwksError::Json(_))));
}

#[test]
fn issuer_signing_keys_skip_what_sigil_cannot_use() {
    let good = ec_jwk("a");
    let mut sig_use = ec_jwk("b");
    sig_use["use"] = json!("sig");
    let mut enc = ec_jwk("enc");
    enc["use"] = json!("enc");
    let mut nokid = ec_jwk("x");
    nokid.as_object_mut().unwrap().remove("kid");
    let long_kid = ec_jwk(&"k".repeat(MAX_KID_LEN + 1));
    let oct = json!({"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"});
    let bytes =
        serde_json::to_vec(&json!({"keys": [good, sig_use, enc, nokid, long_kid, oct]})).unwrap();
    let keys = signing_keys(&bytes, 10).unwrap();
    let mut kids: Vec<_> = keys.keys().cloned().collect();
    kids.sort();
    assert_eq!(kids, ["a", "b"]);
}
