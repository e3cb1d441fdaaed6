#![no_main]
//! The compact-JWS core (`identity::jws`) and JWT-SVID validation on top of
//! it, against a bundle that holds the fixture key. Input: 0x00 + a whole
//! token (header, claims and signature as given), or 0x01 + header JSON NUL
//! claims JSON, which the target signs with the bundle's key so the checks
//! after the signature are reached.
use libfuzzer_sys::fuzz_target;
use sigil_identity::{jws, jwt};

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
    // The core alone: what it verifies has a rule-abiding header, and its
    // time claims are integers.
    let core = jws::parse(&token, jws::Alg::ALL)
        .and_then(|t| t.verify(&sigil_fuzz::public_key()).map(|c| (t.header().clone(), c)));
    if let Ok((header, claims)) = &core {
        assert!(!header.kid.is_empty());
        assert!(matches!(header.typ.as_deref(), None | Some("JWT" | "JOSE")));
        let _ = claims.times().map(|t| t.check(now));
    }
    let r = jwt::validate(&token, &["aud"], &bundle, now);
    if let Ok(svid) = r {
        // What validates is what the rules say is valid, and the core
        // accepted it.
        assert!(core.is_ok(), "JWT-SVID validated what the JWS core refused");
        assert_eq!(svid.spiffe_id.trust_domain(), bundle.trust_domain);
        assert!(svid.audience.iter().any(|a| a == "aud"));
        assert!(svid.expiry + std::time::Duration::from_secs(30) >= now);
        assert_eq!(svid.token, token);
    }
});
