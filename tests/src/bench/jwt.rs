//! JWT-SVID minting: simulated agents call NewJwtSvid over the real mTLS
//! node API from many concurrent tasks for a fixed time. Compared with
//! the machine's cores / (one ring P-256 sign), and with the rate of the
//! cheapest authenticated node API call (FetchBundle) over the same
//! connections: what the transport and authentication allow.

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
        let client = cluster.node_client(&agent).await?;
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
    let (count, elapsed) = drive(&clients, tasks_per_agent, duration, Call::Mint).await?;
    progress(NAME, "raw ring sign (after)");
    let after = raw::blocking(move || raw::sign_fixed(raw_time)).await?;
    progress(
        NAME,
        format!("node API round trips (FetchBundle) for {duration:?}"),
    );
    let (trips, trips_elapsed) =
        drive(&clients, tasks_per_agent, duration, Call::FetchBundle).await?;

    let rate = count as f64 / elapsed.as_secs_f64();
    let trip_rate = trips as f64 / trips_elapsed.as_secs_f64();
    let sign = (before + after).as_secs_f64() / 2.0;
    let cores = raw::cores();
    let limit = cores as f64 / sign;
    report.add("JWT-SVIDs minted", count as f64, "");
    report.add_target("mint rate", rate, "JWTs/s", Target::AtLeast(20_000.0));
    report.add("raw sign", sign * 1e6, "µs");
    report.add(format!("raw limit {cores}/sign"), limit, "/s");
    report.add("mint / raw limit", 100.0 * rate / limit, "%");
    report.add("node API round trips (FetchBundle)", trip_rate, "calls/s");
    report.add("mint / round trips", 100.0 * rate / trip_rate, "%");
    Ok(report)
}

/// What each task calls in a loop.
#[derive(Debug, Clone, Copy)]
enum Call {
    Mint,
    /// The cheapest authenticated node API call: the same connections,
    /// TLS, HTTP/2 and agent authentication, no signing and no audit.
    FetchBundle,
}

/// Runs `tasks_per_agent` concurrent loops of `call` on each client for
/// `duration`; returns the calls completed and the time taken.
async fn drive(
    clients: &[(
        pb::node_client::NodeClient<tonic::transport::Channel>,
        String,
    )],
    tasks_per_agent: usize,
    duration: Duration,
    call: Call,
) -> Result<(u64, Duration)> {
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = Vec::new();
    for (client, entry_id) in clients {
        for _ in 0..tasks_per_agent {
            // Clones share the agent's one connection (HTTP/2 streams).
            let (mut client, entry_id, done) = (client.clone(), entry_id.clone(), done.clone());
            tasks.push(tokio::spawn(async move {
                while Instant::now() < deadline {
                    match call {
                        Call::Mint => mint(&mut client, &entry_id).await?,
                        Call::FetchBundle => {
                            client
                                .fetch_bundle(pb::FetchBundleRequest {})
                                .await
                                .map_err(|s| anyhow!("FetchBundle failed: {s}"))?;
                        }
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
                Ok::<_, anyhow::Error>(())
            }));
        }
    }
    for t in tasks {
        t.await
            .map_err(|e| anyhow!("{call:?} task failed: {e}"))??;
    }
    Ok((done.load(Ordering::Relaxed), started.elapsed()))
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
