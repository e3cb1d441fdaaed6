#![no_main]
//! JWS/JWT-SVID parsing and validation against a bundle that holds the
//! fixture key. Input: 0x00 + a whole token (header, claims and signature
//! as given), or 0x01 + header JSON NUL claims JSON, which the target signs
//! with the bundle's key so the checks after the signature are reached.
use libfuzzer_sys::fuzz_target;
use sigil_identity::jwt;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let token = if mode & 1 == 0 {
        let Ok(t) = std::str::from_utf8(rest) else {
            return;
        };
        t.to_owned()
    } else {
        let (header, claims) = sigil_fuzz::split_nul(rest);
        sigil_fuzz::sign_jws(header, claims)
    };
    let bundle = sigil_fuzz::bundle();
    let now = sigil_fuzz::now();
    let r = jwt::validate(&token, &["aud"], &bundle, now);
    if let Ok(svid) = r {
        // What validates is what the rules say is valid.
        assert_eq!(svid.spiffe_id.trust_domain(), bundle.trust_domain);
        assert!(svid.audience.iter().any(|a| a == "aud"));
        assert!(svid.expiry + std::time::Duration::from_secs(30) >= now);
        assert_eq!(svid.token, token);
    }
});
