#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // A cluster issuer's JWKS (file or OIDC discovery): never panics.
    if let Ok(keys) = sigil_attestors::k8s_psat::parse_jwks(data) {
        assert!(keys.len() <= 100);
    }
});
