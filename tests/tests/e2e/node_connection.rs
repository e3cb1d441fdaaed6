//! The agent talks to the server over one persistent node API connection:
//! JWT-SVID cache misses do not each open a TLS connection, and the
//! connection is opened again (and keeps working) after the agent SVID
//! rotates, which retires the serial the old one presented.

use std::time::{Duration, Instant};

use sigil_tests::process::{AgentProcess, NodeAttestation, ServerOptions, ServerProcess};

use crate::common::{Deployment, retry};

/// Node API connections the server has accepted (TLS handshake done) and
/// agent SVID renewals, from its debug log.
fn counts(server: &ServerProcess) -> (usize, usize) {
    let log = server.log();
    (
        log.matches("node API connection accepted").count(),
        log.matches("agent SVID renewed").count(),
    )
}

/// Fetches JWT-SVIDs for `n` audiences the agent has not seen (each a
/// cache miss, so each a call to the server); returns how many node API
/// connections the server accepted meanwhile and how many agent SVID
/// renewals happened.
async fn misses(d: &Deployment, round: &str, n: usize) -> (usize, usize) {
    let client = d.client().await;
    let (accepted, renewed) = counts(&d.server);
    for i in 0..n {
        let aud = format!("{round}-{i}");
        client
            .fetch_jwt_token([aud.as_str()], None)
            .await
            .unwrap_or_else(|e| panic!("JWT-SVID for {aud}: {e}"));
    }
    let (a, r) = counts(&d.server);
    (a - accepted, r - renewed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_cache_misses_share_one_connection_across_agent_svid_rotation() {
    let d = Deployment::start(&ServerOptions {
        // Renewed every 4 s or so.
        agent_svid_ttl: Some(Duration::from_secs(8)),
        log_level: "info,sigil_server=debug".into(),
        ..Default::default()
    });
    d.register_me("jwt-conn", &[]);
    let client = d.client().await;
    retry(Duration::from_secs(10), || {
        client.fetch_jwt_token(["warm-up"], None)
    })
    .await
    .expect("the entry reaches the agent");

    const N: usize = 20;
    // A renewal opens one connection with the new SVID; one may also be
    // under way when counting starts. Nothing else opens one.
    let (accepted, renewed) = misses(&d, "before", N).await;
    println!("before rotation: {accepted} connections, {renewed} renewals");
    assert!(
        accepted <= renewed + 1,
        "{N} JWT-SVID cache misses opened {accepted} node API connections \
         ({renewed} agent SVID renewals meanwhile)"
    );

    // Two renewals later the SVID that opened the first connection is long
    // retired; misses still work, still without new connections.
    let (_, start) = counts(&d.server);
    let deadline = Instant::now() + Duration::from_secs(30);
    while counts(&d.server).1 < start + 2 {
        assert!(
            Instant::now() < deadline,
            "the agent SVID was not renewed twice within 30 s:\n{}",
            d.agent.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (accepted, renewed) = misses(&d, "after", N).await;
    println!("after rotation: {accepted} connections, {renewed} renewals");
    assert!(
        accepted <= renewed + 1,
        "after rotation, {N} JWT-SVID cache misses opened {accepted} node API connections \
         ({renewed} agent SVID renewals meanwhile)"
    );
}

/// A uid asking for new JWT-SVIDs (each a call to the server) past
/// `jwt_fetches_per_uid_per_second` is refused; tokens the agent has
/// cached are still served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_fetches_from_the_server_are_limited_per_uid() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(&dir.path().join("server"), &Default::default()).unwrap();
    let token = server.join_token().unwrap();
    // One fetch in a burst (ten seconds' worth), then one every 10 s.
    let agent = AgentProcess::start_with(
        &dir.path().join("agent"),
        &server,
        &NodeAttestation::JoinToken(token),
        "jwt_fetches_per_uid_per_second = 0.1",
    )
    .unwrap();
    let agent_id = server.agent_ids().unwrap().remove(0);
    let selector = format!("unix:uid:{}", sigil_tests::process::current_uid().unwrap());
    server
        .create_entry(
            "spiffe://example.org/limited",
            &agent_id,
            &["--selector", &selector],
        )
        .unwrap();
    let client = spiffe::WorkloadApiClient::connect_to(agent.endpoint())
        .await
        .unwrap();
    // Refused for want of an identity (not counted) until the entry arrives.
    let first = retry(Duration::from_secs(10), || {
        client.fetch_jwt_token(["a"], None)
    })
    .await
    .expect("the entry reaches the agent");
    let refused = client
        .fetch_jwt_token(["b"], None)
        .await
        .expect_err("a second new token within 10 s is over the limit");
    assert!(
        refused.to_string().contains("too many new JWT-SVIDs"),
        "refused for the limit: {refused}"
    );
    let again = client
        .fetch_jwt_token(["a"], None)
        .await
        .expect("a cached token is served whatever the limit");
    assert_eq!(again, first, "from the cache");
}
