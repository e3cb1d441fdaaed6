//! X.509-SVID issuance: simulated agents call BatchNewX509Svid over the
//! real mTLS node API with batches of pre-generated CSRs, concurrently, for
//! a fixed time. Compared with 2/(verify + sign) on this machine's cores:
//! each SVID needs one CSR signature verification and one signature.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};
use serde_json::json;
use sigil_proto::node as pb;

use super::cluster::{Cluster, csr_pool};
use super::raw;
use super::{Options, Report, Target, memory, mib, progress};

const NAME: &str = "issuance";

/// Runs the scenario.
pub async fn run(options: &Options) -> Result<Report> {
    let agents = options.pick(4, 2);
    let in_flight = options.pick(2, 1);
    let batch = options.pick(500, 50);
    let pool = options.pick(2_000, 100);
    let duration = Duration::from_secs(options.pick(10, 2));
    let raw_time = Duration::from_millis(options.pick(1_500, 200));
    let mut report = Report::new(
        NAME,
        json!({"agents": agents, "requests_in_flight_per_agent": in_flight, "batch": batch,
               "distinct_csrs": pool, "seconds": duration.as_secs()}),
    );

    progress(NAME, format!("pre-generating {pool} CSRs"));
    let csrs = Arc::new(raw::blocking(move || csr_pool(pool)).await?);
    let cluster = Cluster::start()?;
    let bundle = cluster.bundle().await?;
    let mut workers = Vec::new();
    for (agent, entry_id) in cluster.agents_with_one_entry(NAME, agents, &bundle).await? {
        for _ in 0..in_flight {
            workers.push((cluster.node_client(&agent).await?, entry_id.clone()));
        }
    }
    // Warm-up: one batch per connection, not counted.
    for (client, entry_id) in &mut workers {
        issue(client, entry_id, &csrs, 0, batch).await?;
    }

    progress(NAME, "raw ring verify+sign (before)");
    let before = raw::blocking(move || raw::verify_plus_sign(raw_time)).await?;
    progress(
        NAME,
        format!(
            "{} connections, batches of {batch}, for {duration:?}",
            workers.len()
        ),
    );
    let issued = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = Vec::new();
    for (w, (mut client, entry_id)) in workers.into_iter().enumerate() {
        let (csrs, issued) = (csrs.clone(), issued.clone());
        tasks.push(tokio::spawn(async move {
            let mut offset = w * batch;
            while Instant::now() < deadline {
                let n = issue(&mut client, &entry_id, &csrs, offset, batch).await?;
                issued.fetch_add(n, Ordering::Relaxed);
                offset += batch;
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    for t in tasks {
        t.await.map_err(|e| anyhow!("issuing task failed: {e}"))??;
    }
    let elapsed = started.elapsed();
    let count = issued.load(Ordering::Relaxed);
    progress(NAME, "raw ring verify+sign (after)");
    let after = raw::blocking(move || raw::verify_plus_sign(raw_time)).await?;

    let rate = count as f64 / elapsed.as_secs_f64();
    let pair = (before + after).as_secs_f64() / 2.0;
    let cores = raw::cores();
    let limit = cores as f64 / pair;
    report.add("SVIDs issued", count as f64, "");
    report.add_target("issuance rate", rate, "SVIDs/s", Target::AtLeast(12_000.0));
    report.add("raw verify+sign", pair * 1e6, "µs");
    report.add(format!("raw limit {cores}/(verify+sign)"), limit, "/s");
    report.add_target(
        "issuance / raw limit",
        100.0 * rate / limit,
        "%",
        Target::AtLeast(70.0),
    );
    if let Some(pid) = cluster.server.pid() {
        let (rss, hwm) = memory(pid)?;
        report.add("server VmRSS", mib(rss), "MiB");
        report.add("server VmHWM", mib(hwm), "MiB");
    }
    Ok(report)
}

/// Issues one batch of `batch` CSRs from `csrs` starting at `offset`
/// (wrapping); the number of SVIDs received.
async fn issue(
    client: &mut pb::node_client::NodeClient<tonic::transport::Channel>,
    entry_id: &str,
    csrs: &[Vec<u8>],
    offset: usize,
    batch: usize,
) -> Result<u64> {
    let params = (0..batch)
        .map(|i| pb::SvidParams {
            entry_id: entry_id.to_owned(),
            csr: csrs[(offset + i) % csrs.len()].clone(),
        })
        .collect();
    let results = client
        .batch_new_x509_svid(pb::BatchNewX509SvidRequest { params })
        .await
        .map_err(|s| anyhow!("BatchNewX509Svid failed: {s}"))?
        .into_inner()
        .results;
    let ok = results.iter().filter(|r| r.svid.is_some()).count();
    if ok != batch {
        let why = results
            .iter()
            .find(|r| r.svid.is_none())
            .map(|r| r.message.clone())
            .unwrap_or_else(|| format!("{} results for {batch} CSRs", results.len()));
        bail!("BatchNewX509Svid issued {ok} of {batch}: {why}");
    }
    Ok(ok as u64)
}
