//! Issuance rate with the CA key in SoftHSM2 next to the disk key manager,
//! in the same run: X.509-SVIDs from CSRs and JWT-SVIDs.
//!
//! Run with
//! `SIGIL_SOFTHSM2_MODULE=/usr/lib/softhsm/libsofthsm2.so cargo bench -p sigil-server --bench hsm_issuance`.
//! Without `SIGIL_SOFTHSM2_MODULE` it prints "skipped: ..." and exits. The
//! bench makes its own token directory and runs itself again with
//! `SOFTHSM2_CONF` pointing at it (SoftHSM2 reads it once per process).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use criterion::Criterion;
use rcgen::{CertificateParams, KeyPair};
use sigil_identity::clock::SystemClock;
use sigil_identity::{SpiffeId, TrustDomain};
use sigil_server::ca::keys::{DiskKeyManager, KeyManager};
use sigil_server::ca::pkcs11::{Pkcs11KeyManager, Pkcs11Settings};
use sigil_server::ca::{CaConfig, CaManager};
use sigil_server::datastore::SledDatastore;
use sigil_test_fakes::softhsm::{self, SoftHsm};
use zeroize::Zeroizing;

const POOL: usize = 64;

fn ca(dir: &std::path::Path, keys: Arc<dyn KeyManager>) -> Arc<CaManager> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let store = Arc::new(SledDatastore::open(dir).unwrap());
    let td = TrustDomain::new("example.org").unwrap();
    rt.block_on(CaManager::start(
        CaConfig::new(td),
        store,
        keys,
        Arc::new(SystemClock),
        None,
    ))
    .unwrap()
}

fn csr_pool() -> Vec<Vec<u8>> {
    (0..POOL)
        .map(|_| {
            let key = KeyPair::generate().unwrap();
            CertificateParams::default()
                .serialize_request(&key)
                .unwrap()
                .der()
                .to_vec()
        })
        .collect()
}

fn benches(c: &mut Criterion, hsm: &SoftHsm) {
    let dir = tempfile::tempdir().unwrap();
    let disk: Arc<dyn KeyManager> =
        Arc::new(DiskKeyManager::open(dir.path().join("keys")).unwrap());
    let token: Arc<dyn KeyManager> = Arc::new(
        Pkcs11KeyManager::open(Pkcs11Settings {
            module: hsm.module.clone(),
            token_label: hsm.label.clone(),
            pin: Zeroizing::new(hsm.pin.clone()),
        })
        .unwrap(),
    );
    let cas = [
        ("disk", ca(&dir.path().join("disk"), disk)),
        ("softhsm2", ca(&dir.path().join("hsm"), token)),
    ];
    let id = SpiffeId::parse("spiffe://example.org/ns/default/sa/web").unwrap();
    let csrs = csr_pool();
    let audience = vec!["svc".to_owned()];

    let mut g = c.benchmark_group("key_manager");
    g.measurement_time(Duration::from_secs(5));
    let mut i = 0;
    for (name, ca) in &cas {
        g.bench_function(format!("issue_svid_from_csr/{name}"), |b| {
            b.iter(|| {
                i = (i + 1) % POOL;
                ca.issue_x509_svid(&id, &[], None, &csrs[i]).unwrap()
            })
        });
        g.bench_function(format!("mint_jwt_svid/{name}"), |b| {
            b.iter(|| ca.mint_jwt_svid(&id, &audience, None).unwrap())
        });
    }
    g.finish();
}

fn main() {
    if let Some(hsm) = SoftHsm::in_child() {
        let mut c = Criterion::default().configure_from_args();
        benches(&mut c, &hsm);
        c.final_summary();
        return;
    }
    let Some(module) = softhsm::module() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let hsm = SoftHsm::init(&module, dir.path(), "sigil-bench");
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args(std::env::args_os().skip(1))
        .env("SOFTHSM2_CONF", &hsm.conf)
        .env("SIGIL_SOFTHSM2_CHILD_TOKEN", &hsm.label)
        .status()
        .unwrap();
    std::process::exit(status.code().unwrap_or(1));
}
