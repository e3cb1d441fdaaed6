//! Revocation fan-out: K workload streams (FetchX509SVID, 100 per
//! connection) hold an SVID from the real agent; the entry is deleted
//! through the server's admin API, and each stream's latency is the time
//! from just before DeleteEntries was sent until that stream shows the
//! loss (PermissionDenied, or an update without the SVID). Compared with
//! K streams on a bare tonic server ending all at once.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};
use serde_json::json;
use tokio::sync::{Semaphore, mpsc};

use super::cluster::{
    Cluster, entry, first_x509, my_uid_selector, wait_for_svids, workload_client,
};
use super::raw::BareServer;
use super::{Options, Report, Summary, Target, progress, summarize};

const NAME: &str = "revocation";
/// Streams multiplexed on one connection (under HTTP/2's usual limit of
/// concurrent streams).
const STREAMS_PER_CONNECTION: usize = 100;
/// Streams being opened at once.
const OPENING: usize = 200;

/// Runs the scenario.
pub async fn run(options: &Options) -> Result<Report> {
    let sizes = [100, options.pick(10_000, 1_000)];
    let mut report = Report::new(NAME, json!({"streams": sizes}));
    let cluster = Cluster::start()?;
    let (agent, agent_id) = cluster.start_agent("agent").await?;
    let mut admin = cluster.admin().await?;
    let response = {
        let probe = cluster
            .create_entries(
                &mut admin,
                vec![entry(
                    "spiffe://example.org/bench/revocation/probe".into(),
                    &agent_id,
                    vec![my_uid_selector()?],
                )],
            )
            .await?;
        wait_for_svids(&agent.socket, 1, Duration::from_secs(30)).await?;
        let (_, response) = first_x509(&mut workload_client(&agent.socket).await?).await?;
        cluster
            .delete_entries(&mut admin, probe.into_iter().map(|e| e.id).collect())
            .await?;
        response
    };
    let bare = BareServer::start(cluster.dir(), response)?;

    for k in sizes {
        let spiffe_id = format!("spiffe://example.org/bench/revocation/{k}");
        let created = cluster
            .create_entries(
                &mut admin,
                vec![entry(
                    spiffe_id.clone(),
                    &agent_id,
                    vec![my_uid_selector()?],
                )],
            )
            .await?;
        wait_for_svids(&agent.socket, 1, Duration::from_secs(30)).await?;
        progress(NAME, format!("opening {k} streams on the agent"));
        let streams = open_streams(&agent.socket, k, &spiffe_id).await?;
        progress(NAME, format!("deleting the entry with {k} streams open"));
        let ids = created.into_iter().map(|e| e.id).collect();
        let t0 = Instant::now();
        cluster.delete_entries(&mut admin, ids).await?;
        let admin_done = t0.elapsed();
        let agent_lat = collect(streams, t0).await?;

        progress(NAME, format!("opening {k} streams on the bare server"));
        bare.reset();
        let streams = open_streams(bare.socket(), k, "").await?;
        let t0 = Instant::now();
        bare.revoke();
        let bare_lat = collect(streams, t0).await?;

        report.add(
            format!("{k} streams: DeleteEntries call"),
            ms(admin_done),
            "ms",
        );
        let (p99_target, last_target) = if k <= 100 {
            (Some(100.0), None)
        } else {
            (None, Some(1_000.0))
        };
        add(
            &mut report,
            &format!("{k} streams: agent"),
            &agent_lat,
            p99_target,
            last_target,
        );
        add(
            &mut report,
            &format!("{k} streams: bare tonic"),
            &bare_lat,
            None,
            None,
        );
        report.add(
            format!("{k} streams: last agent / bare"),
            agent_lat.max / bare_lat.max,
            "x",
        );
    }
    Ok(report)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn add(report: &mut Report, prefix: &str, s: &Summary, p99: Option<f64>, last: Option<f64>) {
    report.add(format!("{prefix} streams ended"), s.count as f64, "");
    report.add(format!("{prefix} p50"), s.p50, "ms");
    match p99 {
        Some(t) => report.add_target(format!("{prefix} p99"), s.p99, "ms", Target::AtMost(t)),
        None => report.add(format!("{prefix} p99"), s.p99, "ms"),
    }
    match last {
        Some(t) => report.add_target(format!("{prefix} last"), s.max, "ms", Target::AtMost(t)),
        None => report.add(format!("{prefix} last"), s.max, "ms"),
    }
}

type Held = Vec<tokio::task::JoinHandle<Result<Instant>>>;

/// Opens `k` FetchX509SVID streams on `socket` and waits until each has
/// its first response. Each task then waits for the stream to lose
/// `spiffe_id` (or, with `""`, for any further message or its end) and
/// returns when it saw that.
async fn open_streams(socket: &Path, k: usize, spiffe_id: &str) -> Result<Held> {
    let opening = Arc::new(Semaphore::new(OPENING));
    let (ready_tx, mut ready_rx) = mpsc::channel::<Result<(), String>>(OPENING);
    let mut tasks = Vec::with_capacity(k);
    let mut client = None;
    for i in 0..k {
        if i % STREAMS_PER_CONNECTION == 0 {
            client = Some(workload_client(socket).await?);
        }
        let mut client = client
            .clone()
            .ok_or_else(|| anyhow!("no Workload API connection"))?;
        let permit = opening
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| anyhow!("semaphore closed"))?;
        let (ready, spiffe_id) = (ready_tx.clone(), spiffe_id.to_owned());
        tasks.push(tokio::spawn(async move {
            let opened = first_x509(&mut client).await;
            drop(permit);
            let mut stream = match opened {
                Ok((stream, _)) => {
                    let _ = ready.send(Ok(())).await;
                    stream
                }
                Err(e) => {
                    let _ = ready.send(Err(e.to_string())).await;
                    return Err(e);
                }
            };
            loop {
                match stream.message().await {
                    Err(_) | Ok(None) => return Ok(Instant::now()),
                    Ok(Some(m)) if !m.svids.iter().any(|s| s.spiffe_id == spiffe_id) => {
                        return Ok(Instant::now());
                    }
                    Ok(Some(_)) => {}
                }
            }
        }));
    }
    drop(ready_tx);
    for _ in 0..k {
        match ready_rx.recv().await {
            Some(Ok(())) => {}
            Some(Err(e)) => bail!("a stream could not be opened: {e}"),
            None => bail!("stream tasks ended before all streams were open"),
        }
    }
    Ok(tasks)
}

async fn collect(tasks: Held, t0: Instant) -> Result<Summary> {
    let mut samples = Vec::with_capacity(tasks.len());
    let limit = Duration::from_secs(60);
    for t in tasks {
        let seen = tokio::time::timeout(limit, t)
            .await
            .map_err(|_| anyhow!("a stream did not show the revocation within {limit:?}"))?
            .map_err(|e| anyhow!("stream task failed: {e}"))??;
        samples.push(seen.saturating_duration_since(t0));
    }
    Ok(summarize(&samples))
}
