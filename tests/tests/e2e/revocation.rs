//! Revocation: deleting an entry ends the workload's stream; banning an
//! agent denies its workloads and keeps it out until it is evicted.

use std::time::{Duration, Instant};

use sigil_tests::process::{AgentProcess, ServerOptions, ServerProcess};
use tokio_stream::StreamExt;

use crate::common::{Deployment, retry};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entry_delete_ends_the_workload_stream() {
    let d = Deployment::start(&ServerOptions::default());
    let entry = d.register_me("doomed", &[]);
    let client = d.client().await;
    retry(Duration::from_secs(10), || client.fetch_x509_svid())
        .await
        .unwrap();
    let mut stream = client.stream_x509_contexts().await.unwrap();
    let first = stream.next().await.unwrap().unwrap();
    assert_eq!(first.svids().len(), 1);

    // The stream is read in its own task so the moment it shows the
    // deletion is taken as it happens, even before the CLI has exited.
    let watcher = tokio::spawn(async move {
        loop {
            match stream.next().await {
                Some(Ok(ctx)) if !ctx.svids().is_empty() => continue,
                other => return (Instant::now(), other),
            }
        }
    });
    let started = Instant::now();
    d.server
        .cli_ok(&["entry", "delete", "--id", &entry])
        .unwrap();
    let cli_done = Instant::now();
    let (seen, end) = tokio::time::timeout(Duration::from_secs(5), watcher)
        .await
        .expect("the stream showed the deletion within 5 s")
        .unwrap();
    match end {
        None | Some(Ok(_)) | Some(Err(spiffe::WorkloadApiError::PermissionDenied(_))) => {}
        Some(Err(e)) => panic!("unexpected stream error: {e:?}"),
    }
    println!(
        "revocation latency: stream ended {:.1} ms after `sigil-server entry delete` started \
         (the CLI process itself ran {:.1} ms)",
        (seen - started).as_secs_f64() * 1e3,
        (cli_done - started).as_secs_f64() * 1e3
    );
    let after = client.fetch_x509_svid().await;
    assert!(
        matches!(after, Err(spiffe::WorkloadApiError::PermissionDenied(_))),
        "{after:?}"
    );
}

async fn denied(client: &spiffe::WorkloadApiClient) -> bool {
    retry(Duration::from_secs(5), || async {
        match client.fetch_x509_svid().await {
            Err(spiffe::WorkloadApiError::PermissionDenied(m)) => Ok(m),
            other => Err(format!("{other:?}")),
        }
    })
    .await
    .is_ok()
}

async fn wait_log(agent: &AgentProcess, needle: &str, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if agent.log().contains(needle) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn banned_agent_is_denied_and_cannot_attest_until_evicted() {
    let dir = tempfile::tempdir().unwrap();
    let node = sigil_tests::process::x509pop_node_pki(&dir.path().join("pki")).unwrap();
    let server = ServerProcess::start(
        &dir.path().join("server"),
        &ServerOptions {
            extra: format!(
                "[node_attestors.x509pop]\nca_bundle = \"{}\"\n",
                dir.path().join("pki/ca.pem").display()
            ),
            ..Default::default()
        },
    )
    .unwrap();
    let mut agent = AgentProcess::start(&dir.path().join("agent"), &server, &node).unwrap();
    let agent_id = server.agent_ids().unwrap().remove(0);
    assert!(agent_id.contains("/sigil/agent/x509pop/"), "{agent_id}");
    let uid = sigil_tests::process::current_uid().unwrap();
    server
        .create_entry(
            "spiffe://example.org/banned-node-workload",
            &agent_id,
            &["--selector", &format!("unix:uid:{uid}")],
        )
        .unwrap();
    let client = spiffe::WorkloadApiClient::connect_to(agent.endpoint())
        .await
        .unwrap();
    retry(Duration::from_secs(10), || client.fetch_x509_svid())
        .await
        .unwrap();

    // Ban: the running agent drops everything at once and is refused when
    // it tries to attest again.
    server.cli_ok(&["agent", "ban", "--id", &agent_id]).unwrap();
    assert!(denied(&client).await, "workloads get PermissionDenied");
    assert!(
        wait_log(
            &agent,
            "agent is banned; an operator must evict it",
            Duration::from_secs(10)
        )
        .await,
        "the agent tried to attest again and was refused as banned:\n{}",
        agent.log()
    );
    assert!(
        !agent.cli(&["healthcheck"]).unwrap().status.success(),
        "a revoked agent reports NOT_SERVING"
    );
    assert!(denied(&client).await, "still denied while banned");

    // Evict: the same node attests again by itself and its workload is
    // served again.
    server
        .cli_ok(&["agent", "evict", "--id", &agent_id])
        .unwrap();
    let svid = retry(Duration::from_secs(30), || client.fetch_x509_svid())
        .await
        .unwrap();
    assert_eq!(
        svid.spiffe_id().to_string(),
        "spiffe://example.org/banned-node-workload"
    );
    assert_eq!(server.agent_ids().unwrap(), vec![agent_id.clone()]);

    // Ban again and restart the agent: its stored SVID is gone, so it must
    // attest, and the server refuses.
    server.cli_ok(&["agent", "ban", "--id", &agent_id]).unwrap();
    assert!(denied(&client).await);
    if let Some(status) = agent.exited() {
        panic!("agent exited ({status}):\n{}", agent.log());
    }
    agent.stop().unwrap();
    let restarted = agent.restart();
    let err = restarted.expect_err("a banned agent cannot attest at startup");
    assert!(err.to_string().contains("banned"), "{err:#}");

    server
        .cli_ok(&["agent", "evict", "--id", &agent_id])
        .unwrap();
    agent.restart().unwrap();
    let client = spiffe::WorkloadApiClient::connect_to(agent.endpoint())
        .await
        .unwrap();
    retry(Duration::from_secs(10), || client.fetch_x509_svid())
        .await
        .unwrap();
}
