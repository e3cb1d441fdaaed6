//! JWT-SVID minting: simulated agents call NewJwtSvid over the real mTLS
//! node API from many concurrent tasks for a fixed time. Compared with
//! the machine's cores / (one ring P-256 sign).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};
use serde_json::json;
use sigil_proto::node as pb;

use super::cluster::Cluster;
use super::raw;
use super::{Options, Report, Target, progress};

const NAME: &str = "jwt";

/// Runs the scenario.
pub async fn run(options: &Options) -> Result<Report> {
    let agents = options.pick(4, 2);
    let tasks_per_agent = options.pick(32, 4);
    let duration = Duration::from_secs(options.pick(10, 2));
    let raw_time = Duration::from_millis(options.pick(1_000, 200));
    let mut report = Report::new(
        NAME,
        json!({"agents": agents, "concurrent_calls_per_agent": tasks_per_agent,
               "seconds": duration.as_secs()}),
    );

    let cluster = Cluster::start()?;
    let bundle = cluster.bundle().await?;
    let mut clients = Vec::new();
    for (agent, entry_id) in cluster.agents_with_one_entry(NAME, agents, &bundle).await? {
        let client = agent.client(&cluster, &bundle).await?;
        mint(&mut client.clone(), &entry_id).await?; // warm-up
        clients.push((client, entry_id));
    }

    progress(NAME, "raw ring sign (before)");
    let before = raw::blocking(move || raw::sign_fixed(raw_time)).await?;
    progress(
        NAME,
        format!(
            "{} concurrent calls for {duration:?}",
            agents * tasks_per_agent
        ),
    );
    let minted = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = Vec::new();
    for (client, entry_id) in &clients {
        for _ in 0..tasks_per_agent {
            // Clones share the agent's one connection (HTTP/2 streams).
            let (mut client, entry_id, minted) = (client.clone(), entry_id.clone(), minted.clone());
            tasks.push(tokio::spawn(async move {
                while Instant::now() < deadline {
                    mint(&mut client, &entry_id).await?;
                    minted.fetch_add(1, Ordering::Relaxed);
                }
                Ok::<_, anyhow::Error>(())
            }));
        }
    }
    for t in tasks {
        t.await.map_err(|e| anyhow!("minting task failed: {e}"))??;
    }
    let elapsed = started.elapsed();
    let count = minted.load(Ordering::Relaxed);
    progress(NAME, "raw ring sign (after)");
    let after = raw::blocking(move || raw::sign_fixed(raw_time)).await?;

    let rate = count as f64 / elapsed.as_secs_f64();
    let sign = (before + after).as_secs_f64() / 2.0;
    let cores = raw::cores();
    let limit = cores as f64 / sign;
    report.add("JWT-SVIDs minted", count as f64, "");
    report.add_target("mint rate", rate, "JWTs/s", Target::AtLeast(20_000.0));
    report.add("raw sign", sign * 1e6, "µs");
    report.add(format!("raw limit {cores}/sign"), limit, "/s");
    report.add("mint / raw limit", 100.0 * rate / limit, "%");
    Ok(report)
}

async fn mint(
    client: &mut pb::node_client::NodeClient<tonic::transport::Channel>,
    entry_id: &str,
) -> Result<()> {
    let r = client
        .new_jwt_svid(pb::NewJwtSvidRequest {
            entry_id: entry_id.to_owned(),
            audience: vec!["spiffe://example.org/backend".into()],
        })
        .await
        .map_err(|s| anyhow!("NewJwtSvid failed: {s}"))?
        .into_inner();
    if r.token.is_empty() {
        bail!("NewJwtSvid returned an empty token");
    }
    Ok(())
}
