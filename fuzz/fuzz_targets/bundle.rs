#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let td = sigil_identity::TrustDomain::new("example.org").unwrap();
    if let Ok(b) = sigil_identity::Bundle::from_jwks(td.clone(), data) {
        // What decodes re-encodes and decodes to the same bundle.
        let again = sigil_identity::Bundle::from_jwks(td, &b.to_jwks_bytes()).unwrap();
        assert!(again.same_authorities(&b));
    }
});
