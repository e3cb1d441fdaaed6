//! Outages: the server down for 30 s, the agent restarted.

use std::time::{Duration, Instant, SystemTime};

use sigil_tests::process::ServerOptions;

use crate::common::{Deployment, leaf_facts, retry};

fn count(log: &str, needle: &str) -> usize {
    log.matches(needle).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workloads_are_served_through_a_server_outage_and_an_agent_restart() {
    let mut d = Deployment::start(&ServerOptions::default());
    // Half-life 20 s: one rotation falls due while the server is down.
    d.register_me("steady", &["--x509-ttl", "40s"]);
    let source = spiffe::X509Source::builder()
        .endpoint(d.agent.endpoint())
        .build()
        .await
        .unwrap();
    let before = leaf_facts(&source.svid().unwrap());
    assert_eq!(count(&d.server.log(), "agent attested"), 1);

    // 30 s without a server: new and open clients keep getting the cached,
    // still-valid SVID.
    d.server.stop().unwrap();
    let down = Instant::now();
    let client = d.client().await;
    let mut served = 0;
    while down.elapsed() < Duration::from_secs(30) {
        let fetched = client
            .fetch_x509_svid()
            .await
            .expect("served while the server is down");
        for svid in [&fetched, &*source.svid().unwrap()] {
            let facts = leaf_facts(svid);
            assert!(facts.not_after > SystemTime::now(), "still valid");
        }
        served += 1;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert!(served >= 25);

    // Server back: rotation resumes on the agent's existing identity.
    d.server.restart().unwrap();
    let mut updates = source.updated();
    let rotated = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let facts = leaf_facts(&source.svid().unwrap());
            if facts.serial != before.serial {
                return facts;
            }
            updates.changed().await.unwrap();
        }
    })
    .await
    .expect("a new SVID arrived after the server came back");
    assert!(rotated.not_after > before.not_after);
    assert_eq!(
        count(&d.server.log(), "agent attested"),
        1,
        "the agent did not attest again"
    );

    // Agent restarted: it keeps its identity and serves within a second.
    d.agent.stop().unwrap();
    let restarting = Instant::now();
    d.agent.restart().unwrap();
    let client = d.client().await;
    retry(Duration::from_secs(10), || client.fetch_x509_svid())
        .await
        .unwrap();
    let took = restarting.elapsed();
    println!("agent restart → first SVID served: {took:?}");
    assert!(
        took < Duration::from_secs(1),
        "served {took:?} after the agent was started again"
    );
    assert_eq!(count(&d.server.log(), "agent attested"), 1);
    assert!(
        d.agent.log().contains("using the stored agent SVID"),
        "{}",
        d.agent.log()
    );
    source.shutdown().await;
}
