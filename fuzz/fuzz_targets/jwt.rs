#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(token) = std::str::from_utf8(data) {
        let bundle = sigil_identity::Bundle::new(sigil_identity::TrustDomain::new("example.org").unwrap());
        let _ = sigil_identity::jwt::validate(token, &["aud"], &bundle, std::time::SystemTime::now());
    }
});
