//! Scale: many entries spread over many simulated agents, each holding a
//! Sync stream on its own mTLS connection. One entry at a time is changed
//! through the admin API; its latency is the time from just before
//! UpdateEntry was sent until the owning agent's Sync stream delivers the
//! change. Also the server's memory, per entry and per connected agent
//! apart (VmRSS before and after each step), its CPU time, and a restart:
//! how long until the server is ready again and until every agent is back
//! in sync, resuming from the revision it had (or taking a full snapshot).
//!
//! The simulated agents run in this process; only the server's own
//! memory and CPU time (read from `/proc`) are reported. Their Sync
//! connections come from several loopback source addresses
//! ([`AGENTS_PER_SOURCE`] each), so tens of thousands of them stay within
//! each address's ephemeral ports; the open-file limit is raised for this
//! process and the server it starts.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};
use serde_json::json;
use sigil_proto::node as pb;
use tokio::sync::mpsc;

use super::cluster::{Cluster, entry};
use super::{Options, Report, Target, cpu_time, memory, mib, progress, raise_fd_limit, summarize};
use crate::sim_agent::SimAgent;

const NAME: &str = "scale";
/// Agents attesting or connecting at once.
const PARALLEL: usize = 32;
/// Sync connections per loopback source address (127.0.0.2, .3, ...),
/// below the default range of ephemeral ports (28,232).
pub const AGENTS_PER_SOURCE: usize = 20_000;

/// The loopback source address of agent `i`'s Sync connection.
fn source(i: usize) -> IpAddr {
    let n = u8::try_from(2 + i / AGENTS_PER_SOURCE).unwrap_or(u8::MAX);
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, n))
}

/// Bytes per item of a VmRSS growth (0 if it shrank).
fn per(grown: u64, items: usize) -> f64 {
    grown as f64 / items.max(1) as f64
}

/// One simulated agent's Sync stream, read in the background.
struct Reader {
    /// The revision of the last message it received.
    revision: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

/// Reads `stream` until it ends: every entry upsert goes to `seen`, every
/// message's revision to `revision`.
fn read(
    mut stream: tonic::Streaming<pb::SyncResponse>,
    revision: Arc<AtomicU64>,
    seen: mpsc::UnboundedSender<(String, Instant)>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Ok(Some(msg)) = stream.message().await {
            revision.fetch_max(msg.revision, Ordering::Relaxed);
            if let Some(pb::sync_response::Event::EntryUpsert(e)) = msg.event {
                let _ = seen.send((e.id, Instant::now()));
            }
        }
    })
}

/// Runs the scenario.
pub async fn run(options: &Options) -> Result<Report> {
    let agents = options.agents.unwrap_or_else(|| options.pick(1_000, 50));
    let entries = options
        .entries
        .unwrap_or_else(|| agents * options.pick(100, 40));
    let changes = options.pick(300, 20).min(entries);
    // One connection per agent here and one in the server, and some room.
    let fd_limit = raise_fd_limit(agents as u64 + 4096)?;
    let sources = agents.div_ceil(AGENTS_PER_SOURCE);
    let mut report = Report::new(
        NAME,
        json!({
            "agents": agents,
            "entries": entries,
            "changes": changes,
            "open_file_limit": fd_limit,
            "source_addresses": sources,
        }),
    );
    let mut cluster =
        Cluster::start_with_server("", "warn", &format!("max_connections = {}", agents + 1024))?;
    let pid = || {
        cluster
            .server
            .pid()
            .ok_or_else(|| anyhow!("the server is not running"))
    };
    let bundle = cluster.bundle().await?;
    let mut admin = cluster.admin().await?;
    let (rss_empty, _) = memory(pid()?)?;
    let cpu_start = cpu_time(pid()?)?;

    progress(NAME, format!("attesting {agents} simulated agents"));
    let mut sims = Vec::with_capacity(agents);
    let mut tokens = Vec::with_capacity(PARALLEL);
    while sims.len() < agents {
        tokens.clear();
        for _ in 0..PARALLEL.min(agents - sims.len()) {
            tokens.push(cluster.token(&mut admin).await?);
        }
        let attesting = tokens
            .iter()
            .map(|t| SimAgent::join_at(&cluster.server.addr, &bundle, t));
        for r in futures_join(attesting).await {
            sims.push(r.map_err(|s| anyhow!("Attest failed: {s}"))?);
        }
        if sims.len() % 10_000 == 0 {
            progress(NAME, format!("{} agents attested", sims.len()));
        }
    }
    let cpu_attested = cpu_time(pid()?)?;
    let (rss_agents, _) = memory(pid()?)?;

    progress(NAME, format!("creating {entries} entries"));
    // Entry k belongs to agent k mod agents.
    let expected = |a: usize| entries / agents + usize::from(a < entries % agents);
    let mut created = Vec::with_capacity(entries);
    let mut next = 0;
    while next < entries {
        let batch: Vec<pb::Entry> = (next..entries.min(next + 10_000))
            .map(|k| {
                let a = k % agents;
                entry(
                    format!("spiffe://example.org/bench/scale/{a}/{}", k / agents),
                    sims[a].id.as_str(),
                    vec!["unix:uid:1".into()],
                )
            })
            .collect();
        next += batch.len();
        created.extend(cluster.create_entries(&mut admin, batch).await?);
        if next % 100_000 == 0 {
            progress(NAME, format!("{next} entries created"));
        }
    }
    let (rss_entries, _) = memory(pid()?)?;
    let cpu_entries = cpu_time(pid()?)?;

    progress(
        NAME,
        format!("opening {agents} Sync streams from {sources} source address(es)"),
    );
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel::<(String, Instant)>();
    let mut readers = Vec::with_capacity(agents);
    for (c, chunk) in sims.chunks(PARALLEL).enumerate() {
        let opening = chunk.iter().enumerate().map(|(i, sim)| {
            let a = c * PARALLEL + i;
            open_sync_from(&cluster, sim, source(a), expected(a))
        });
        for r in futures_join(opening).await {
            let (stream, revision) = r?;
            let revision = Arc::new(AtomicU64::new(revision));
            let task = read(stream, revision.clone(), seen_tx.clone());
            readers.push(Reader { revision, task });
        }
        if readers.len() % 10_000 == 0 {
            progress(NAME, format!("{} Sync streams open", readers.len()));
        }
    }
    let cpu_connected = cpu_time(pid()?)?;
    let (rss_connected, _) = memory(pid()?)?;

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
    let idle = options.pick(Duration::from_secs(10), Duration::from_secs(1));
    let cpu_before_idle = cpu_time(pid()?)?;
    tokio::time::sleep(idle).await;
    let cpu_idle = cpu_time(pid()?)?.saturating_sub(cpu_before_idle);
    let (rss, hwm) = memory(pid()?)?;

    report.add_latency("UpdateEntry call", &summarize(&calls), None);
    report.add_latency(
        "change reaches its agent",
        &summarize(&latencies),
        Some(50.0),
    );
    report.add("server VmRSS, empty", mib(rss_empty), "MiB");
    report.add("server VmRSS", mib(rss), "MiB");
    report.add("server VmHWM", mib(hwm), "MiB");
    report.add_target(
        "server memory per entry",
        per(rss_entries.saturating_sub(rss_agents), entries),
        "B",
        Target::AtMost(1024.0),
    );
    let agent_records = rss_agents.saturating_sub(rss_empty);
    let connections = rss_connected.saturating_sub(rss_entries);
    report.add(
        "server memory per agent record",
        per(agent_records, agents),
        "B",
    );
    report.add(
        "server memory per Sync connection",
        per(connections, agents),
        "B",
    );
    report.add_target(
        "server memory per connected agent",
        per(agent_records + connections, agents),
        "B",
        Target::AtMost(20.0 * 1024.0),
    );
    let ms_per_agent = |d: Duration| d.as_secs_f64() * 1000.0 / agents.max(1) as f64;
    report.add(
        "server CPU per attestation",
        ms_per_agent(cpu_attested.saturating_sub(cpu_start)),
        "ms",
    );
    report.add(
        "server CPU per Sync connection",
        ms_per_agent(cpu_connected.saturating_sub(cpu_entries)),
        "ms",
    );
    report.add(
        "server CPU while idle, all connected",
        cpu_idle.as_secs_f64() * 100.0 / idle.as_secs_f64(),
        "% of a core",
    );

    restart(
        &mut cluster,
        &sims,
        readers,
        rss_empty,
        entries,
        &mut report,
    )
    .await?;
    Ok(report)
}

/// Restarts the server under its connected agents: how long until it is
/// ready, and until every agent has opened a new Sync stream from the
/// revision it had and received its first message.
async fn restart(
    cluster: &mut Cluster,
    sims: &[SimAgent],
    readers: Vec<Reader>,
    rss_empty: u64,
    entries: usize,
    report: &mut Report,
) -> Result<()> {
    progress(NAME, "restarting the server");
    let stopping = Instant::now();
    cluster
        .server
        .stop_within_async(Duration::from_secs(120))
        .await?;
    let stopped = stopping.elapsed();
    // The streams end with the server; what each had is its revision.
    let mut revisions = Vec::with_capacity(readers.len());
    for r in readers {
        let _ = r.task.await;
        revisions.push(r.revision.load(Ordering::Relaxed));
    }
    let t0 = Instant::now();
    cluster
        .server
        .start_again_within_async(Duration::from_secs(300))
        .await?;
    let ready = t0.elapsed();
    let pid = cluster
        .server
        .pid()
        .ok_or_else(|| anyhow!("the server is not running after its restart"))?;
    let (rss_restarted, _) = memory(pid)?;
    progress(
        NAME,
        format!(
            "ready after {:.1} s; {} agents resuming",
            ready.as_secs_f64(),
            sims.len()
        ),
    );
    let mut full = 0usize;
    let mut resent = 0usize;
    let mut streams = Vec::with_capacity(sims.len());
    for (c, chunk) in sims.chunks(PARALLEL).enumerate() {
        let resuming = chunk.iter().enumerate().map(|(i, sim)| {
            let a = c * PARALLEL + i;
            resume(cluster, sim, source(a), revisions[a])
        });
        for r in futures_join(resuming).await {
            let (stream, snapshot) = r?;
            full += usize::from(snapshot.full);
            resent += snapshot.entries.len();
            streams.push(stream);
        }
    }
    let in_sync = t0.elapsed();
    let (rss_resumed, _) = memory(pid)?;
    drop(streams);
    report.add("restart: server stop", stopped.as_secs_f64(), "s");
    report.add_target(
        "restart: server ready",
        ready.as_secs_f64(),
        "s",
        Target::AtMost(10.0),
    );
    report.add_target(
        "restart: every agent back in sync",
        in_sync.as_secs_f64(),
        "s",
        Target::AtMost(30.0),
    );
    report.add_target(
        "restart: agents sent a full snapshot",
        full as f64,
        "",
        Target::AtMost(0.0),
    );
    report.add("restart: entries sent again", resent as f64, "");
    report.add(
        "restart: server memory per entry (no agents)",
        per(rss_restarted.saturating_sub(rss_empty), entries),
        "B",
    );
    report.add(
        "restart: server VmRSS, agents back",
        mib(rss_resumed),
        "MiB",
    );
    Ok(())
}

/// Opens a Sync stream for `sim` from `source` resuming after `since`:
/// the stream and its first message.
async fn resume(
    cluster: &Cluster,
    sim: &SimAgent,
    source: IpAddr,
    since: u64,
) -> Result<(tonic::Streaming<pb::SyncResponse>, pb::Snapshot)> {
    let mut client = sim
        .client_from(&cluster.server.addr, source)
        .await
        .map_err(|s| anyhow!("cannot connect to the node API: {s}"))?
        .max_decoding_message_size(super::cluster::MAX_MESSAGE);
    let mut stream = client
        .sync(pb::SyncRequest {
            since_revision: since,
        })
        .await
        .map_err(|s| anyhow!("Sync failed: {s}"))?
        .into_inner();
    let first = stream
        .message()
        .await
        .map_err(|s| anyhow!("Sync stream failed: {s}"))?
        .ok_or_else(|| anyhow!("Sync stream ended before its first message"))?;
    match first.event {
        Some(pb::sync_response::Event::Snapshot(s)) => Ok((stream, s)),
        other => bail!("Sync began with {other:?}, not a snapshot"),
    }
}

/// [`open_sync`] on a connection from `source`; the stream and the
/// revision of its snapshot.
async fn open_sync_from(
    cluster: &Cluster,
    sim: &SimAgent,
    source: IpAddr,
    expected: usize,
) -> Result<(tonic::Streaming<pb::SyncResponse>, u64)> {
    let mut client = sim
        .client_from(&cluster.server.addr, source)
        .await
        .map_err(|s| anyhow!("cannot connect to the node API: {s}"))?
        .max_decoding_message_size(super::cluster::MAX_MESSAGE);
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
        Some(pb::sync_response::Event::Snapshot(s)) if s.entries.len() == expected => {
            Ok((stream, first.revision))
        }
        Some(pb::sync_response::Event::Snapshot(s)) => bail!(
            "agent {} got {} entries in its snapshot, expected {expected}",
            sim.id,
            s.entries.len()
        ),
        other => bail!("Sync began with {other:?}, not a snapshot"),
    }
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
