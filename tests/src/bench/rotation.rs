//! Mass issuance on one agent: N entries for one workload are created in
//! one admin call, so the agent finds all N due for an SVID at the same
//! moment and runs its issue loop (the same path renewal takes: due →
//! batched CSRs → store → stream update). Measured: the time until a
//! FetchX509SVID stream shows all N, and meanwhile the latency of a second
//! workload's Workload API calls (a child process running a copy of this
//! binary, so the unix attestor sees another `path` and it gets only its
//! own SVID). Also the agent's memory per cached SVID.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::json;

use super::cluster::{
    Cluster, entry, first_x509, my_uid_selector, wait_for_svids, workload_client,
};
use super::raw;
use super::workload::one_call;
use super::{Options, Report, Target, memory, mib, progress, summarize};

const NAME: &str = "rotation";

/// Runs the scenario.
pub async fn run(options: &Options) -> Result<Report> {
    let n = options.pick(10_000, 500);
    let mut report = Report::new(NAME, json!({"entries": n}));
    let cluster = Cluster::start()?;
    let (agent, agent_id) = cluster.start_agent("agent").await?;
    let agent_pid = agent
        .pid()
        .ok_or_else(|| anyhow!("the agent is not running"))?;
    let mut admin = cluster.admin().await?;

    let me = std::env::current_exe().context("cannot locate this executable")?;
    let copy = cluster.dir().join("sigil-bench-probe");
    std::fs::copy(&me, &copy)
        .with_context(|| format!("cannot copy {} to {}", me.display(), copy.display()))?;
    let uid = my_uid_selector()?;
    let mine = |path: &Path| vec![uid.clone(), format!("unix:path:{}", path.display())];
    cluster
        .create_entries(
            &mut admin,
            vec![
                entry(
                    "spiffe://example.org/bench/rotation/watch".into(),
                    &agent_id,
                    mine(&me),
                ),
                entry(
                    "spiffe://example.org/bench/rotation/probe".into(),
                    &agent_id,
                    mine(&copy),
                ),
            ],
        )
        .await?;
    wait_for_svids(&agent.socket, 1, Duration::from_secs(30)).await?;
    let (mut watch, first) = first_x509(&mut workload_client(&agent.socket).await?).await?;
    if first.svids.len() != 1 {
        bail!(
            "expected 1 SVID before the burst, got {}",
            first.svids.len()
        );
    }
    let entries: Vec<_> = (0..n)
        .map(|i| {
            entry(
                format!("spiffe://example.org/bench/rotation/{i}"),
                &agent_id,
                mine(&me),
            )
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (rss_before, _) = memory(agent_pid)?;

    progress(NAME, "starting the probe workload");
    let mut child = Command::new(&copy)
        .arg("--probe-socket")
        .arg(&agent.socket)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("cannot start {}", copy.display()))?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow!("probe has no stdout"))?;
    let (ready, mut rest) = raw::blocking(move || {
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        reader.read_line(&mut line)?;
        Ok((line, reader))
    })
    .await?;
    if ready.trim() != "ready" {
        let _ = child.kill();
        bail!("the probe workload did not start: {ready:?}");
    }

    progress(NAME, format!("creating {n} entries at once"));
    let t0 = Instant::now();
    let created = cluster.create_entries(&mut admin, entries).await;
    let create_call = t0.elapsed();
    let outcome = match created {
        Ok(_) => wait_all(&mut watch, n + 1, t0).await,
        Err(e) => Err(e),
    };
    // Keep probing a little after the burst, then stop the probe.
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(child.stdin.take());
    let (text, status) = raw::blocking(move || {
        let mut text = String::new();
        rest.read_to_string(&mut text)?;
        let status = child.wait()?;
        Ok((text, status))
    })
    .await?;
    let all_issued = outcome?;
    if !status.success() {
        bail!("the probe workload failed ({status})");
    }
    // The watching stream holds every SVID in one message (in the agent
    // too, as the last state sent); close it so that the memory measured
    // is the cache, not the harness's stream.
    drop(watch);
    let probe: Vec<Duration> = serde_json::from_str::<Vec<f64>>(text.trim())
        .with_context(|| format!("probe printed no latencies: {text:?}"))?
        .into_iter()
        .map(|us| Duration::from_secs_f64(us / 1e6))
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (rss_after, hwm) = memory(agent_pid)?;

    report.add("CreateEntries call", create_call.as_secs_f64() * 1e3, "ms");
    report.add_target(
        format!("all {n} SVIDs served"),
        all_issued.as_secs_f64() * 1e3,
        "ms",
        Target::AtMost(2_000.0),
    );
    let s = summarize(&probe);
    report.add("probe calls meanwhile", s.count as f64, "");
    report.add("probe p50", s.p50, "ms");
    report.add("probe p99", s.p99, "ms");
    report.add_target("probe slowest", s.max, "ms", Target::AtMost(20.0));
    report.add("agent VmRSS before", mib(rss_before), "MiB");
    report.add("agent VmRSS after", mib(rss_after), "MiB");
    report.add("agent VmHWM", mib(hwm), "MiB");
    report.add_target(
        "agent memory per cached SVID",
        rss_after.saturating_sub(rss_before) as f64 / n as f64,
        "B",
        Target::AtMost(2_048.0),
    );

    // The same without any workload reading the SVIDs: a second agent
    // caches N SVIDs for entries no process matches; its RSS is read once
    // it has stopped growing.
    progress(NAME, format!("second agent caching {n} SVIDs nobody reads"));
    let (idle, idle_id) = cluster.start_agent("idle-agent").await?;
    let idle_pid = idle
        .pid()
        .ok_or_else(|| anyhow!("the second agent is not running"))?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (idle_before, _) = memory(idle_pid)?;
    let unread: Vec<_> = (0..n)
        .map(|i| {
            entry(
                format!("spiffe://example.org/bench/rotation/unread/{i}"),
                &idle_id,
                vec!["unix:uid:4242424".into()],
            )
        })
        .collect();
    cluster.create_entries(&mut admin, unread).await?;
    let idle_after = settled(idle_pid, idle_before, n as u64 * 256).await?;
    report.add_target(
        "agent memory per cached SVID, no stream",
        idle_after.saturating_sub(idle_before) as f64 / n as f64,
        "B",
        Target::AtMost(1_024.0),
    );
    Ok(report)
}

/// VmRSS of `pid` once it has grown past `before` by at least `growth`
/// bytes and then stayed within 64 KiB for 2 s (at most 60 s).
async fn settled(pid: u32, before: u64, growth: u64) -> Result<u64> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = before;
    let mut stable_since = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let (rss, _) = memory(pid)?;
        if rss.abs_diff(last) > 64 * 1024 {
            last = rss;
            stable_since = Instant::now();
        } else if rss > before + growth && stable_since.elapsed() >= Duration::from_secs(2) {
            return Ok(rss);
        }
        if Instant::now() >= deadline {
            bail!("agent memory did not settle within 60 s (VmRSS {rss} B)");
        }
    }
}

/// Reads `watch` until a response carries `count` SVIDs; the time since `t0`.
async fn wait_all(
    watch: &mut tonic::Streaming<sigil_proto::workload::X509svidResponse>,
    count: usize,
    t0: Instant,
) -> Result<Duration> {
    let limit = Duration::from_secs(120);
    loop {
        let msg = tokio::time::timeout(limit, watch.message())
            .await
            .map_err(|_| anyhow!("not all {count} SVIDs arrived within {limit:?}"))?
            .map_err(|s| anyhow!("the watching stream failed: {s}"))?
            .ok_or_else(|| anyhow!("the watching stream ended"))?;
        if msg.svids.len() >= count {
            return Ok(t0.elapsed());
        }
    }
}

/// The probe workload (`sigil-bench --probe-socket <socket>`): waits until
/// the agent serves it an SVID, prints `ready`, then calls FetchX509SVID
/// (connect, attest, first response) every 5 ms until its stdin closes,
/// and prints the latencies in µs as a JSON array.
pub async fn probe(socket: &Path) -> Result<()> {
    wait_for_svids(socket, 1, Duration::from_secs(30)).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = std::io::stdin().read_to_end(&mut sink);
        flag.store(true, Ordering::SeqCst);
    });
    let mut out = std::io::stdout();
    writeln!(out, "ready")?;
    out.flush()?;
    let mut samples = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        samples.push(one_call(socket).await?.as_secs_f64() * 1e6);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    writeln!(out, "{}", serde_json::to_string(&samples)?)?;
    Ok(())
}
