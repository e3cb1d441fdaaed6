#![no_main]
use libfuzzer_sys::fuzz_target;
use sigil_identity::jwks;

fuzz_target!(|data: &[u8]| {
    // The one JWK Set reader (bundles and cluster issuer key sets): never
    // panics, and what it accepts keeps within the caller's limit.
    if let Ok(set) = jwks::parse(data, 100) {
        assert!(set.keys.len() <= 100);
        assert!(!set.members.contains_key("keys"));
    }
    if let Ok(keys) = jwks::signing_keys(data, 100) {
        assert!(keys.len() <= 100);
        assert!(keys.keys().all(|k| !k.is_empty() && k.len() <= jwks::MAX_KID_LEN));
    }
});
