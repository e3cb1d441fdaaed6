//! Scale: many entries spread over many simulated agents, each holding a
//! Sync stream on its own mTLS connection. One entry at a time is changed
//! through the admin API; its latency is the time from just before
//! UpdateEntry was sent until the owning agent's Sync stream delivers the
//! change. Also the server's memory with all of it loaded.

use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};
use serde_json::json;
use sigil_proto::node as pb;
use tokio::sync::mpsc;

use super::cluster::{Cluster, entry};
use super::{Options, Report, Target, memory, mib, progress, summarize};
use crate::sim_agent::SimAgent;

const NAME: &str = "scale";
/// Agents attesting or connecting at once.
const PARALLEL: usize = 32;

/// Runs the scenario.
pub async fn run(options: &Options) -> Result<Report> {
    let agents = options.pick(1_000, 50);
    let per_agent = options.pick(100, 40);
    let changes = options.pick(300, 20);
    let mut report = Report::new(
        NAME,
        json!({"agents": agents, "entries": agents * per_agent, "changes": changes}),
    );
    let cluster = Cluster::start()?;
    let bundle = cluster.bundle().await?;
    let mut admin = cluster.admin().await?;

    progress(NAME, format!("attesting {agents} simulated agents"));
    let mut tokens = Vec::with_capacity(agents);
    for _ in 0..agents {
        tokens.push(cluster.token(&mut admin).await?);
    }
    let mut sims = Vec::with_capacity(agents);
    for chunk in tokens.chunks(PARALLEL) {
        let attesting = chunk
            .iter()
            .map(|t| SimAgent::join_at(&cluster.server.addr, &bundle, t));
        for r in futures_join(attesting).await {
            sims.push(r.map_err(|s| anyhow!("Attest failed: {s}"))?);
        }
    }

    progress(NAME, format!("creating {} entries", agents * per_agent));
    let mut wanted = Vec::with_capacity(agents * per_agent);
    for (a, sim) in sims.iter().enumerate() {
        for e in 0..per_agent {
            wanted.push(entry(
                format!("spiffe://example.org/bench/scale/{a}/{e}"),
                sim.id.as_str(),
                vec!["unix:uid:1".into()],
            ));
        }
    }
    let created = cluster.create_entries(&mut admin, wanted).await?;

    progress(NAME, format!("opening {agents} Sync streams"));
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel::<(String, Instant)>();
    let mut readers = Vec::with_capacity(agents);
    for chunk in sims.chunks(PARALLEL) {
        let opening = chunk.iter().map(|sim| open_sync(&cluster, sim, per_agent));
        for r in futures_join(opening).await {
            let mut stream = r?;
            let seen = seen_tx.clone();
            readers.push(tokio::spawn(async move {
                while let Ok(Some(msg)) = stream.message().await {
                    if let Some(pb::sync_response::Event::EntryUpsert(e)) = msg.event {
                        let _ = seen.send((e.id, Instant::now()));
                    }
                }
            }));
        }
    }

    progress(NAME, format!("{changes} entry changes, one at a time"));
    let mut latencies = Vec::with_capacity(changes);
    let mut calls = Vec::with_capacity(changes);
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    for i in 0..changes {
        // xorshift: a spread of entries (and so of agents), reproducibly.
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let pick = (state % created.len() as u64) as usize;
        let mut changed = created
            .get(pick)
            .cloned()
            .ok_or_else(|| anyhow!("no entry {pick}"))?;
        changed.hint = format!("change-{i}");
        let t0 = Instant::now();
        admin
            .update_entry(sigil_proto::admin::UpdateEntryRequest {
                entry: Some(changed.clone()),
            })
            .await
            .map_err(|s| anyhow!("UpdateEntry failed: {s}"))?;
        calls.push(t0.elapsed());
        let limit = Duration::from_secs(10);
        loop {
            let (id, at) = tokio::time::timeout(limit, seen_rx.recv())
                .await
                .map_err(|_| anyhow!("entry change not delivered within {limit:?}"))?
                .ok_or_else(|| anyhow!("every Sync stream ended"))?;
            if id == changed.id {
                latencies.push(at.saturating_duration_since(t0));
                break;
            }
        }
    }
    let server_pid = cluster
        .server
        .pid()
        .ok_or_else(|| anyhow!("the server is not running"))?;
    let (rss, hwm) = memory(server_pid)?;
    for r in &readers {
        r.abort();
    }

    report.add_latency("UpdateEntry call", &summarize(&calls), None);
    report.add_latency(
        "change reaches its agent",
        &summarize(&latencies),
        Some(50.0),
    );
    report.add_target("server VmRSS", mib(rss), "MiB", Target::AtMost(512.0));
    report.add("server VmHWM", mib(hwm), "MiB");
    Ok(report)
}

/// Opens a Sync stream for `sim` and checks that its snapshot holds its
/// `expected` entries.
pub(crate) async fn open_sync(
    cluster: &Cluster,
    sim: &SimAgent,
    expected: usize,
) -> Result<tonic::Streaming<pb::SyncResponse>> {
    let mut client = cluster.node_client(sim).await?;
    let mut stream = client
        .sync(pb::SyncRequest { since_revision: 0 })
        .await
        .map_err(|s| anyhow!("Sync failed: {s}"))?
        .into_inner();
    let first = stream
        .message()
        .await
        .map_err(|s| anyhow!("Sync stream failed: {s}"))?
        .ok_or_else(|| anyhow!("Sync stream ended before its snapshot"))?;
    match first.event {
        Some(pb::sync_response::Event::Snapshot(s)) if s.entries.len() == expected => Ok(stream),
        Some(pb::sync_response::Event::Snapshot(s)) => bail!(
            "agent {} got {} entries in its snapshot, expected {expected}",
            sim.id,
            s.entries.len()
        ),
        other => bail!("Sync began with {other:?}, not a snapshot"),
    }
}

/// Runs `futures` concurrently on this task; their results in order.
pub(crate) async fn futures_join<F: std::future::Future>(
    futures: impl Iterator<Item = F>,
) -> Vec<F::Output> {
    let mut pinned: Vec<_> = futures.map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = pinned.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, slot) in pinned.iter_mut().zip(out.iter_mut()) {
            if slot.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *slot = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().flatten().collect()
}
