#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(cert) = sigil_identity::x509::parse(data) {
        let _ = sigil_identity::x509::check_leaf(&cert);
        let td = sigil_identity::TrustDomain::new("example.org").unwrap();
        let _ = sigil_identity::x509::check_ca(&cert, &td);
    }
});
