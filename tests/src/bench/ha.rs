//! High availability on PostgreSQL (issue 12): `writes` (entry creates
//! per second with eight concurrent writers, sled and PostgreSQL in the
//! same run), `ha-propagation` (agents split over two replicas; a change
//! made through replica A reaching an agent streaming from replica B) and
//! `failover` (from SIGKILL of the replica a real agent streams from to its
//! Sync stream open on the other). They need `--datastore postgres` (the
//! server named by `SIGIL_POSTGRES`, where a fresh database is created per
//! scenario).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::json;
use sigil_proto::node as pb;
use tokio::sync::mpsc;

use super::cluster::{AGENT_EXTRA, Cluster, entry, my_uid_selector, wait_for_svids};
use super::scale::{futures_join, open_sync};
use super::{Options, Report, Target, memory, mib, progress, summarize};
use crate::process::{AgentOptions, AgentProcess, NodeAttestation, ServerProcess};
use crate::sim_agent::SimAgent;

/// Agents attesting or connecting at once.
const PARALLEL: usize = 32;

/// The `[datastore]` section for a fresh database on `options`' server.
async fn fresh_postgres(options: &Options, scenario: &str) -> Result<String> {
    let Some(server) = &options.postgres else {
        bail!("{scenario} needs PostgreSQL: run with --datastore postgres and SIGIL_POSTGRES set");
    };
    let db = crate::postgres::fresh_database(server).await?;
    Ok(crate::postgres::datastore_toml(&db))
}

/// Two replicas on one fresh database.
async fn replicas(options: &Options, scenario: &str, log: &str) -> Result<(Cluster, Cluster)> {
    let section = fresh_postgres(options, scenario).await?;
    let a = Cluster::start_with(&section, log)?;
    let b = Cluster::start_with(&section, log)?;
    // Each replica publishes its CA; both serve the union once the other's
    // change has reached them.
    let deadline = Instant::now() + Duration::from_secs(30);
    for c in [&a, &b] {
        while c.bundle().await?.x509_authorities.len() < 2 {
            if Instant::now() > deadline {
                bail!("the replicas' bundles did not come to hold both CAs within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok((a, b))
}

/// Entry creates per second through `cluster`'s admin API by `writers`
/// concurrent writers, one entry per call, for `run`.
async fn creates_per_second(cluster: &Cluster, writers: usize, run: Duration) -> Result<f64> {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for w in 0..writers {
        let mut admin = cluster.admin().await?;
        let (stop, done) = (stop.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let e = entry(
                    format!("spiffe://example.org/bench/writes/{w}/{i}"),
                    "spiffe://example.org/sigil/agent/bench/writes",
                    vec![format!("unix:uid:{i}")],
                );
                let r = admin
                    .create_entries(sigil_proto::admin::CreateEntriesRequest { entries: vec![e] })
                    .await
                    .map_err(|s| anyhow!("CreateEntries failed: {s}"))?
                    .into_inner();
                match r.results.first().and_then(|r| r.status.as_ref()) {
                    Some(s) if s.code != 0 => bail!("entry not created: {}", s.message),
                    _ => {}
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    let started = Instant::now();
    tokio::time::sleep(run).await;
    let n = done.load(Ordering::Relaxed);
    let took = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.context("writer task")??;
    }
    Ok(n as f64 / took.as_secs_f64())
}

/// `writes`: sled, then PostgreSQL, eight writers each.
pub async fn writes(options: &Options) -> Result<Report> {
    const NAME: &str = "writes";
    let writers = 8;
    let run = options.pick(Duration::from_secs(10), Duration::from_secs(2));
    let mut report = Report::new(
        NAME,
        json!({"writers": writers, "seconds_each": run.as_secs()}),
    );
    let postgres = fresh_postgres(options, NAME).await?;
    for (label, section) in [("sled", String::new()), ("postgres", postgres)] {
        progress(NAME, format!("{label}: {writers} writers for {run:?}"));
        let cluster = Cluster::start_with(&section, "warn")?;
        let rate = creates_per_second(&cluster, writers, run).await?;
        report.add(format!("{label}: entry creates rate"), rate, "/s");
    }
    Ok(report)
}

/// `ha-propagation`: agents split over replicas A and B; entries changed
/// through A, one at a time, timed until the owning agent's Sync stream
/// on B delivers the change.
pub async fn propagation(options: &Options) -> Result<Report> {
    const NAME: &str = "ha-propagation";
    let agents = options.pick(1_000, 20);
    let per_agent = options.pick(100, 10);
    let changes = options.pick(300, 20);
    let mut report = Report::new(
        NAME,
        json!({"replicas": 2, "agents": agents, "entries": agents * per_agent, "changes": changes}),
    );
    let (a, b) = replicas(options, NAME, "warn").await?;
    let bundle = a.bundle().await?;
    let mut admin = a.admin().await?;

    progress(
        NAME,
        format!("attesting {agents} simulated agents, half on each replica"),
    );
    let mut tokens = Vec::with_capacity(agents);
    for _ in 0..agents {
        tokens.push(a.token(&mut admin).await?);
    }
    let mut sims = Vec::with_capacity(agents);
    for (c, chunk) in tokens.chunks(PARALLEL).enumerate() {
        let attesting = chunk.iter().enumerate().map(|(i, t)| {
            let on = if (c * PARALLEL + i).is_multiple_of(2) {
                &a
            } else {
                &b
            };
            SimAgent::join_at(&on.server.addr, &bundle, t)
        });
        for r in futures_join(attesting).await {
            sims.push(r.map_err(|s| anyhow!("Attest failed: {s}"))?);
        }
    }

    progress(
        NAME,
        format!("creating {} entries through A", agents * per_agent),
    );
    let mut wanted = Vec::with_capacity(agents * per_agent);
    for (i, sim) in sims.iter().enumerate() {
        for e in 0..per_agent {
            wanted.push(entry(
                format!("spiffe://example.org/bench/ha/{i}/{e}"),
                sim.id.as_str(),
                vec!["unix:uid:1".into()],
            ));
        }
    }
    let created = a.create_entries(&mut admin, wanted).await?;

    // The agents attested on B stream from B; B must have applied every
    // entry from the feed before their snapshots are complete.
    let on_b: Vec<&SimAgent> = sims.iter().skip(1).step_by(2).collect();
    progress(NAME, format!("opening {} Sync streams on B", on_b.len()));
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel::<(String, Instant)>();
    let mut readers = Vec::with_capacity(on_b.len());
    let deadline = Instant::now() + Duration::from_secs(120);
    for chunk in on_b.chunks(PARALLEL) {
        let streams = loop {
            let opening = chunk.iter().map(|sim| open_sync(&b, sim, per_agent));
            match futures_join(opening)
                .await
                .into_iter()
                .collect::<Result<Vec<_>>>()
            {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    progress(NAME, format!("B not caught up yet ({e:#}); again"));
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => return Err(e),
            }
        };
        for mut stream in streams {
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
    let b_ids: std::collections::HashSet<&str> = on_b.iter().map(|s| s.id.as_str()).collect();
    let candidates: Vec<&pb::Entry> = created
        .iter()
        .filter(|e| b_ids.contains(e.parent_id.as_str()))
        .collect();

    progress(
        NAME,
        format!("{changes} entry changes through A, one at a time"),
    );
    let mut latencies = Vec::with_capacity(changes);
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    for i in 0..changes {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let pick = (state % candidates.len() as u64) as usize;
        let mut changed = (*candidates[pick]).clone();
        changed.hint = format!("change-{i}");
        let t0 = Instant::now();
        admin
            .update_entry(sigil_proto::admin::UpdateEntryRequest {
                entry: Some(changed.clone()),
            })
            .await
            .map_err(|s| anyhow!("UpdateEntry failed: {s}"))?;
        let limit = Duration::from_secs(10);
        loop {
            let (id, at) = tokio::time::timeout(limit, seen_rx.recv())
                .await
                .map_err(|_| anyhow!("entry change not delivered on B within {limit:?}"))?
                .ok_or_else(|| anyhow!("every Sync stream ended"))?;
            if id == changed.id {
                latencies.push(at.saturating_duration_since(t0));
                break;
            }
        }
    }
    for r in &readers {
        r.abort();
    }
    report.add_latency(
        "change on A reaches its agent on B",
        &summarize(&latencies),
        Some(50.0),
    );
    if let Some(pid) = b.server.pid() {
        let (rss, _) = memory(pid)?;
        report.add("replica B VmRSS", mib(rss), "MiB");
    }
    Ok(report)
}

/// How many "sync stream opened" lines for `agent_id` `server` has logged.
fn syncs_opened(server: &ServerProcess, agent_id: &str) -> usize {
    server
        .log()
        .lines()
        .filter(|l| l.contains("sync stream opened") && l.contains(agent_id))
        .count()
}

/// `failover`: a real agent with both replicas in `server_address`;
/// SIGKILL of the replica it streams from, timed until its Sync stream
/// is open on the other; the killed replica then starts again, and the
/// next round kills the one in use then.
pub async fn failover(options: &Options) -> Result<Report> {
    const NAME: &str = "failover";
    let rounds = options.pick(5, 1);
    let mut report = Report::new(NAME, json!({"replicas": 2, "rounds": rounds}));
    // At info, so the replicas log each Sync stream opened.
    let (mut a, mut b) = replicas(options, NAME, "info").await?;
    let mut admin = a.admin().await?;
    let token = a.token(&mut admin).await?;
    let agent = AgentProcess::start_with_options(
        &a.dir().join("agent"),
        &a.server,
        &NodeAttestation::JoinToken(token),
        &AgentOptions {
            extra: AGENT_EXTRA.into(),
            servers: vec![a.server.addr.clone(), b.server.addr.clone()],
            ..AgentOptions::default()
        },
    )?;
    let agent_id = a
        .server
        .agent_ids()?
        .pop()
        .ok_or_else(|| anyhow!("the agent attested but no agent is listed"))?;
    a.server.create_entry(
        "spiffe://example.org/bench/failover",
        &agent_id,
        &["--selector", &my_uid_selector()?],
    )?;
    wait_for_svids(&agent.socket, 1, Duration::from_secs(20)).await?;

    // The replica the agent streams from: the one that logged its Sync
    // (at first); after a failover, the one it moved to.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut on_a = loop {
        match (
            syncs_opened(&a.server, &agent_id),
            syncs_opened(&b.server, &agent_id),
        ) {
            (n, _) if n > 0 => break true,
            (_, n) if n > 0 => break false,
            _ if Instant::now() > deadline => bail!("no Sync stream of the agent seen"),
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    let mut times = Vec::with_capacity(rounds);
    for round in 0..rounds {
        let (used, other) = if on_a { (&mut a, &b) } else { (&mut b, &a) };
        let before = syncs_opened(&other.server, &agent_id);
        let killed = Instant::now();
        used.server.kill()?;
        let limit = Duration::from_secs(30);
        loop {
            if syncs_opened(&other.server, &agent_id) > before {
                times.push(killed.elapsed());
                break;
            }
            if killed.elapsed() > limit {
                bail!(
                    "round {round}: the agent did not open Sync on the other replica within {limit:?}"
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        progress(NAME, format!("round {round}: {:?}", times[round]));
        wait_for_svids(&agent.socket, 1, Duration::from_secs(5)).await?;
        used.server.restart_async().await?;
        on_a = !on_a;
    }
    let s = summarize(&times);
    report.add("failovers", s.count as f64, "");
    report.add("SIGKILL to Sync on the other p50", s.p50, "ms");
    report.add_target(
        "SIGKILL to Sync on the other max",
        s.max,
        "ms",
        Target::AtMost(5_000.0),
    );
    drop(agent);
    Ok(report)
}
