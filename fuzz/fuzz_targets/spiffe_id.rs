#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(id) = sigil_identity::SpiffeId::parse(s) {
            // A parsed ID prints back exactly as given: nothing is normalised.
            assert_eq!(id.as_str(), s);
        }
        let _ = sigil_identity::Selector::parse(s);
        let _ = sigil_identity::duration::parse(s);
    }
});
