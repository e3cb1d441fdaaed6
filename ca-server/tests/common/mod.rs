//! Helpers shared by the ca-server integration tests.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Arc;

use sigil_identity::TrustDomain;
use sigil_identity::clock::SystemClock;
use sigil_server::ca::keys::{KeyManager, MemoryKeyManager};
use sigil_server::ca::x509::UpstreamCa;
use sigil_server::ca::{CaConfig, CaManager};
use sigil_server::datastore::SledDatastore;
pub use sigil_test_fakes::openssl;

pub fn td() -> TrustDomain {
    TrustDomain::new("example.org").unwrap()
}

/// A CA on a fresh sled store in `dir`, with in-memory keys and the system clock.
pub async fn ca_in(dir: &Path, upstream: Option<UpstreamCa>) -> Arc<CaManager> {
    let store = Arc::new(SledDatastore::open(dir).unwrap());
    let keys: Arc<dyn KeyManager> = Arc::new(MemoryKeyManager::default());
    CaManager::start(
        CaConfig::new(td()),
        store,
        keys,
        Arc::new(SystemClock),
        upstream,
    )
    .await
    .unwrap()
}

/// An RSA key and CSR made by openssl: (csr DER, PKCS#8 key DER).
pub fn openssl_rsa_csr(dir: &Path, bits: u32) -> (Vec<u8>, Vec<u8>) {
    let key = dir.join(format!("rsa{bits}.pem"));
    let csr = dir.join(format!("rsa{bits}.csr"));
    let (ok, out) = openssl::openssl(&[
        "req",
        "-new",
        "-newkey",
        &format!("rsa:{bits}"),
        "-nodes",
        "-keyout",
        key.to_str().unwrap(),
        "-subj",
        "/CN=ignored",
        "-outform",
        "DER",
        "-out",
        csr.to_str().unwrap(),
    ])
    .unwrap();
    assert!(ok, "{out}");
    let key_pem = std::fs::read_to_string(&key).unwrap();
    let key_der = sigil_identity::pem::decode_all("PRIVATE KEY", &key_pem)
        .unwrap()
        .remove(0);
    (std::fs::read(&csr).unwrap(), key_der)
}
