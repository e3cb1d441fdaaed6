//! `audit verify` over 1,000,000 records: the whole review (read every
//! stored record from sled, decode it, re-hash it, check the chain and a
//! signed checkpoint at the end), as `sigil-server audit verify` runs it.
//!
//! Not a criterion loop: one setup of a million records takes longer than
//! the walk, so this writes the log once and times three walks.
//!
//! Run with `cargo bench -p sigil-server --bench audit_verify`
//! (`AUDIT_RECORDS=N` for another size).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use sigil_server::audit::checkpoint::{self, AuditKey, Checkpointer};
use sigil_server::audit::review::{self, VerifyOptions};
use sigil_server::datastore::{AuditEvent, Datastore, SledDatastore};

fn main() {
    let n: u64 = std::env::var("AUDIT_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let store = Arc::new(SledDatastore::open(dir.path().join("datastore")).unwrap());
        let started = Instant::now();
        let mut written = 0u64;
        while written < n {
            // Issuance batches, as the background writer makes them.
            let batch: Vec<_> = (written..n.min(written + 4096))
                .map(|i| AuditEvent {
                    time: UNIX_EPOCH + Duration::from_secs(1_800_000_000 + i / 100),
                    caller: "spiffe://example.org/sigil/agent/join_token/node-1".into(),
                    action: "svid.x509.issue".into(),
                    target: format!("spiffe://example.org/workload/{}", i % 1000),
                    outcome: "ok".into(),
                    expires_at: Some(UNIX_EPOCH + Duration::from_secs(1_800_003_600)),
                    request_id: None,
                })
                .collect();
            written += batch.len() as u64;
            store.append_audit_unsynced(batch).await.unwrap();
        }
        store.sync().await.unwrap();
        println!("wrote {n} records in {:.1?}", started.elapsed());
        let key = AuditKey::load_or_create(dir.path(), "sigil/example.org/audit".into()).unwrap();
        let cp = Checkpointer {
            store: store.clone(),
            key,
            origin: "sigil/example.org/audit".into(),
            data_dir: dir.path().to_owned(),
            every_records: 1000,
            every: Duration::from_secs(60),
        };
        cp.checkpoint().await.unwrap();
        let vk = review::read_public_key(&dir.path().join(checkpoint::PUBLIC_KEY_FILE)).unwrap();
        let opts = VerifyOptions {
            key: Some(vk),
            checkpoint: None,
            allow_pruned: false,
        };
        for round in 1..=3 {
            let t = Instant::now();
            let report = review::verify(store.as_ref(), &opts).await.unwrap();
            let took = t.elapsed();
            assert_eq!(report.records, n);
            assert_eq!(report.checkpoints, 1);
            println!(
                "verify round {round}: {n} records in {took:.2?} ({:.0} records/s)",
                n as f64 / took.as_secs_f64()
            );
        }
    });
}
