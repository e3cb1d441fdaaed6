#![no_main]
//! x509pop evidence on the server side: a chain (leaf first, DER
//! concatenated) checked against the fixture CA, then the signature over
//! the server's nonce. Input: response length byte, response, chain.
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use sigil_attestors::x509pop::X509PopAttestor;
use sigil_identity::attestation::{AttestError, Challenger, ServerNodeAttestor};
use sigil_identity::clock::FakeClock;

struct Replay(Vec<u8>);

#[async_trait::async_trait]
impl Challenger for Replay {
    async fn challenge(&mut self, _challenge: Vec<u8>) -> Result<Vec<u8>, AttestError> {
        Ok(std::mem::take(&mut self.0))
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let (response, evidence) = rest.split_at(usize::from(n).min(rest.len()));
    let attestor = X509PopAttestor::new(
        sigil_fuzz::trust_domain(),
        vec![sigil_fuzz::CA_CERT.to_vec()],
        Arc::new(FakeClock::new(sigil_fuzz::now())),
    )
    .expect("the fixture CA parses");
    // The nonce is fresh each time, so a fuzzed response never proves
    // possession: anything accepted is a bug.
    let result = sigil_fuzz::block_on(attestor.attest(evidence, &mut Replay(response.to_vec())));
    assert!(result.is_err(), "accepted without proof of possession");
});
