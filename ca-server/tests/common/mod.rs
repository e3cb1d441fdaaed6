//! Helpers shared by the ca-server integration tests.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use sigil_identity::TrustDomain;
use sigil_identity::clock::SystemClock;
use sigil_server::ca::keys::{KeyManager, MemoryKeyManager};
use sigil_server::ca::x509::UpstreamCa;
use sigil_server::ca::{CaConfig, CaManager};
use sigil_server::datastore::SledDatastore;

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

/// Runs openssl with `args`, returning (success, combined output).
pub fn openssl(args: &[&str]) -> (bool, String) {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl is installed");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// An RSA key and CSR made by openssl: (csr DER, PKCS#8 key DER).
pub fn openssl_rsa_csr(dir: &Path, bits: u32) -> (Vec<u8>, Vec<u8>) {
    let key = dir.join(format!("rsa{bits}.pem"));
    let csr = dir.join(format!("rsa{bits}.csr"));
    let (ok, out) = openssl(&[
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
    ]);
    assert!(ok, "{out}");
    let key_pem = std::fs::read_to_string(&key).unwrap();
    let key_der = sigil_identity::pem::decode_all("PRIVATE KEY", &key_pem)
        .unwrap()
        .remove(0);
    (std::fs::read(&csr).unwrap(), key_der)
}

/// `openssl verify -x509_strict` of a leaf against `roots`, with `untrusted`
/// intermediates. Returns openssl's verdict and output.
pub fn openssl_verify(
    dir: &Path,
    leaf: &[u8],
    untrusted: &[Vec<u8>],
    roots: &[Vec<u8>],
) -> (bool, String) {
    let pem = |ders: &[Vec<u8>]| {
        ders.iter()
            .map(|d| sigil_identity::pem::encode("CERTIFICATE", d))
            .collect::<String>()
    };
    let n = sigil_identity::random::hex_id();
    let leaf_path = dir.join(format!("leaf-{n}.pem"));
    let roots_path = dir.join(format!("roots-{n}.pem"));
    std::fs::write(&leaf_path, pem(&[leaf.to_vec()])).unwrap();
    std::fs::write(&roots_path, pem(roots)).unwrap();
    let mut args = vec![
        "verify",
        "-x509_strict",
        "-CAfile",
        roots_path.to_str().unwrap(),
    ];
    let untrusted_path = dir.join(format!("untrusted-{n}.pem"));
    if !untrusted.is_empty() {
        std::fs::write(&untrusted_path, pem(untrusted)).unwrap();
        args.extend(["-untrusted", untrusted_path.to_str().unwrap()]);
    }
    args.push(leaf_path.to_str().unwrap());
    openssl(&args)
}
