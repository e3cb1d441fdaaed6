//! Workload API latency: a workload (this process) connects to the real
//! agent's socket, calls FetchX509SVID (the agent attests it) and waits for
//! the first X509SVIDResponse; one client at a time, then 100 at once.
//! Compared with the same pattern against a bare tonic server-streaming RPC
//! over a Unix socket in this process, sending the same response.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};
use serde_json::json;

use super::cluster::{
    Cluster, entry, first_x509, my_uid_selector, wait_for_svids, workload_client,
};
use super::raw::BareServer;
use super::{Options, Report, Summary, Target, progress, summarize};

const NAME: &str = "workload-latency";

/// Runs the scenario.
pub async fn run(options: &Options) -> Result<Report> {
    let sequential = options.pick(1_000, 30);
    let clients = options.pick(100, 100);
    let rounds = options.pick(20, 2);
    let mut report = Report::new(
        NAME,
        json!({"sequential_calls": sequential, "concurrent_clients": clients, "concurrent_rounds": rounds}),
    );
    let cluster = Cluster::start()?;
    let (agent, agent_id) = cluster.start_agent("agent").await?;
    let mut admin = cluster.admin().await?;
    cluster
        .create_entries(
            &mut admin,
            vec![entry(
                "spiffe://example.org/bench/workload".into(),
                &agent_id,
                vec![my_uid_selector()?],
            )],
        )
        .await?;
    wait_for_svids(&agent.socket, 1, Duration::from_secs(30)).await?;
    let (_, response) = first_x509(&mut workload_client(&agent.socket).await?).await?;
    let bare = BareServer::start(cluster.dir(), response)?;

    progress(
        NAME,
        format!("{sequential} sequential calls (agent, then bare)"),
    );
    let agent_one = sequential_calls(&agent.socket, sequential).await?;
    let bare_one = sequential_calls(bare.socket(), sequential).await?;
    progress(
        NAME,
        format!("{rounds} rounds of {clients} concurrent calls (agent, then bare)"),
    );
    let agent_many = concurrent_calls(&agent.socket, clients, rounds).await?;
    let bare_many = concurrent_calls(bare.socket(), clients, rounds).await?;

    report.add_latency("1 client: agent", &agent_one, Some(1.0));
    report.add_latency("1 client: bare tonic", &bare_one, None);
    report.add_target(
        "1 client: p99 agent / bare",
        agent_one.p99 / bare_one.p99,
        "x",
        Target::AtMost(2.0),
    );
    report.add_latency(
        &format!("{clients} concurrent: agent"),
        &agent_many,
        Some(30.0),
    );
    report.add_latency(
        &format!("{clients} concurrent: bare tonic"),
        &bare_many,
        None,
    );
    report.add(
        format!("{clients} concurrent: p99 agent / bare"),
        agent_many.p99 / bare_many.p99,
        "x",
    );
    Ok(report)
}

/// Connect, FetchX509SVID, first response: the time it took.
pub async fn one_call(socket: &Path) -> Result<Duration> {
    let started = Instant::now();
    let mut client = workload_client(socket).await?;
    first_x509(&mut client).await?;
    Ok(started.elapsed())
}

async fn sequential_calls(socket: &Path, n: usize) -> Result<Summary> {
    let mut samples = Vec::with_capacity(n);
    one_call(socket).await?; // warm-up
    for _ in 0..n {
        samples.push(one_call(socket).await?);
    }
    Ok(summarize(&samples))
}

async fn concurrent_calls(socket: &Path, clients: usize, rounds: usize) -> Result<Summary> {
    let mut samples = Vec::with_capacity(clients * rounds);
    for _ in 0..rounds {
        let barrier = Arc::new(tokio::sync::Barrier::new(clients));
        let tasks: Vec<_> = (0..clients)
            .map(|_| {
                let (socket, barrier) = (socket.to_path_buf(), barrier.clone());
                tokio::spawn(async move {
                    barrier.wait().await;
                    one_call(&socket).await
                })
            })
            .collect();
        for t in tasks {
            samples.push(t.await.map_err(|e| anyhow!("client task failed: {e}"))??);
        }
        // Let the server notice the closed streams before the next round.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(summarize(&samples))
}
