//! Rotation under real clocks: 10 s X.509-SVIDs under a 60 s CA, watched
//! for 150 s through a workload's `X509Source`.

use std::collections::HashSet;
use std::time::{Duration, Instant, SystemTime};

use sigil_tests::process::ServerOptions;

use crate::common::{Deployment, leaf_facts, td, verify};

const RUN: Duration = Duration::from_secs(150);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x509_source_holds_a_valid_svid_through_two_ca_rotations() {
    let d = Deployment::start(&ServerOptions {
        ca_ttl: Some(Duration::from_secs(60)),
        // The agent's own SVID renews across the CA rotations too.
        agent_svid_ttl: Some(Duration::from_secs(30)),
        ..Default::default()
    });
    d.register_me("rotating", &["--x509-ttl", "10s"]);
    let source = spiffe::X509Source::builder()
        .endpoint(d.agent.endpoint())
        .build()
        .await
        .unwrap();

    let start = Instant::now();
    let mut checks = 0u64;
    let mut serials = HashSet::new();
    let mut issuers = HashSet::new();
    let mut worst_margin = Duration::MAX;
    while start.elapsed() < RUN {
        let svid = source.svid().expect("the source always holds an SVID");
        let bundle = source
            .try_bundle_for_trust_domain(&td())
            .expect("the source always holds the bundle");
        let facts = leaf_facts(&svid);
        let now = SystemTime::now();
        let margin = facts.not_after.duration_since(now).unwrap_or_else(|_| {
            panic!(
                "at {:?} the source held an expired SVID (serial {})",
                start.elapsed(),
                facts.serial
            )
        });
        worst_margin = worst_margin.min(margin);
        if let Err(e) = verify(&svid, &bundle) {
            panic!(
                "at {:?} the SVID (serial {}) did not verify against the current bundle: {e}",
                start.elapsed(),
                facts.serial
            );
        }
        serials.insert(facts.serial);
        issuers.insert(facts.issuer_key_id);
        checks += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "rotation: {checks} checks over {RUN:?}; {} SVIDs from {} CAs; smallest time left on a held SVID {worst_margin:?}",
        serials.len(),
        issuers.len()
    );
    assert!(
        issuers.len() >= 3,
        "SVIDs from at least three CAs (two rotations) were seen: {}",
        issuers.len()
    );
    // Half-life 5 s (±10 %) gives about 30 SVIDs in 150 s; many more would
    // mean SVIDs fall due on arrival (a backdated NotBefore counted as the
    // start of their life).
    assert!(
        (20..=45).contains(&serials.len()),
        "10 s SVIDs rotate at half-life: {} seen in 150 s",
        serials.len()
    );
    source.shutdown().await;
}
