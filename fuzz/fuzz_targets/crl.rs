#![no_main]
//! The agent's reading of the CRLs the server sends (`Bundle.crls`).
use libfuzzer_sys::fuzz_target;
use sigil_agent::crl::{CrlSet, MAX_CRLS};
use sigil_identity::Bundle;

/// Splits `data` into a count byte and length-prefixed DER items.
fn items(data: &[u8]) -> Vec<Vec<u8>> {
    let Some((&count, mut rest)) = data.split_first() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for _ in 0..(count % 4) {
        let Some((len, tail)) = rest.split_first_chunk::<2>() else {
            break;
        };
        let len = usize::from(u16::from_be_bytes(*len)).min(tail.len());
        let (item, tail) = tail.split_at(len);
        out.push(item.to_vec());
        rest = tail;
    }
    if !rest.is_empty() {
        out.push(rest.to_vec());
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let raw = items(data);
    let (set, rejected) = CrlSet::parse(&raw);
    assert_eq!(set.crls.len() + rejected, raw.len());
    assert!(set.crls.len() <= MAX_CRLS);
    let _ = set.is_revoked(sigil_fuzz::LEAF_CERT);
    let mut bundle = Bundle::new(sigil_fuzz::trust_domain());
    bundle.x509_authorities.push(sigil_fuzz::CA_CERT.to_vec());
    let pem = set.bundle_pem(&bundle);
    let blocks = pem.matches("-----BEGIN X509 CRL-----").count();
    if set.covers(&bundle) {
        assert_eq!(blocks, set.crls.len());
    } else {
        assert_eq!(blocks, 0);
    }
});
