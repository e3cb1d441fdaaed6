//! Taint of a CA authority with many SVIDs on one agent: N entries for
//! this process are issued by the CA, a successor is prepared and
//! activated, and the old CA is tainted. Measured: from the `taint` call to
//! the first FetchX509SVID message in which none of the N SVIDs chains to
//! the tainted CA (the agent's paced re-issue, see `sigil_agent::taint`).

use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};
use serde_json::json;
use sigil_proto::admin::{self as pb, AuthorityKind};

use super::cluster::{
    Cluster, entry, first_x509, my_uid_selector, wait_for_svids, workload_client,
};
use super::{Options, Report, Target, progress};

const NAME: &str = "taint";

/// The AuthorityKeyIdentifier (hex) of the leaf at the start of `chain`
/// (concatenated DER, as the Workload API sends it).
fn issuer(chain: &[u8]) -> Option<String> {
    let (_, rest) = sigil_identity::der::read(chain).ok()?;
    let leaf = &chain[..chain.len() - rest.len()];
    let cert = sigil_identity::x509::parse(leaf).ok()?;
    sigil_identity::x509::authority_key_id(&cert).map(|k| sigil_identity::random::hex(&k))
}

/// Runs the scenario.
pub async fn run(options: &Options) -> Result<Report> {
    let n = options.pick(10_000, 500);
    let mut report = Report::new(NAME, json!({"svids": n}));
    let cluster = Cluster::start()?;
    let (agent, agent_id) = cluster.start_agent("agent").await?;
    let mut admin = cluster.admin().await?;
    let uid = my_uid_selector()?;
    let entries: Vec<_> = (0..n)
        .map(|i| {
            entry(
                format!("spiffe://example.org/bench/taint/{i}"),
                &agent_id,
                vec![uid.clone()],
            )
        })
        .collect();
    progress(NAME, format!("issuing {n} SVIDs"));
    cluster.create_entries(&mut admin, entries).await?;
    wait_for_svids(&agent.socket, n, Duration::from_secs(300)).await?;

    let show = admin
        .authority_show(pb::AuthorityShowRequest {
            kind: AuthorityKind::X509 as i32,
        })
        .await
        .map_err(|s| anyhow!("AuthorityShow failed: {s}"))?
        .into_inner();
    let old = show
        .authorities
        .iter()
        .find(|a| a.state == "active")
        .ok_or_else(|| anyhow!("no active X.509 authority"))?
        .id
        .clone();
    let request = |id: &str| pb::AuthorityRequest {
        kind: AuthorityKind::X509 as i32,
        id: id.to_owned(),
        server_id: String::new(),
    };
    let new = admin
        .authority_prepare(request(""))
        .await
        .map_err(|s| anyhow!("AuthorityPrepare failed: {s}"))?
        .into_inner()
        .authority
        .ok_or_else(|| anyhow!("AuthorityPrepare returned no authority"))?
        .id;
    // The runbook's wait: the agent has the new bundle (one Sync push).
    tokio::time::sleep(Duration::from_secs(2)).await;
    admin
        .authority_activate(request(&new))
        .await
        .map_err(|s| anyhow!("AuthorityActivate failed: {s}"))?;

    let (mut watch, first) = first_x509(&mut workload_client(&agent.socket).await?).await?;
    let from_old = first
        .svids
        .iter()
        .filter(|s| issuer(&s.x509_svid).as_deref() == Some(old.as_str()))
        .count();
    if from_old < n {
        bail!("expected {n} SVIDs of the old CA before the taint, found {from_old}");
    }
    progress(NAME, format!("tainting {old}"));
    let t0 = Instant::now();
    admin
        .authority_taint(request(&old))
        .await
        .map_err(|s| anyhow!("AuthorityTaint failed: {s}"))?;
    let taint_call = t0.elapsed();
    let limit = Duration::from_secs(120);
    let replaced = loop {
        let msg = tokio::time::timeout(limit, watch.message())
            .await
            .map_err(|_| anyhow!("not every SVID was replaced within {limit:?}"))?
            .map_err(|s| anyhow!("the watching stream failed: {s}"))?
            .ok_or_else(|| anyhow!("the watching stream ended"))?;
        let left = msg
            .svids
            .iter()
            .filter(|s| issuer(&s.x509_svid).as_deref() != Some(new.as_str()))
            .count();
        if msg.svids.len() >= n && left == 0 {
            break t0.elapsed();
        }
    };
    report.add("AuthorityTaint call", taint_call.as_secs_f64() * 1e3, "ms");
    report.add_target(
        format!("taint → last of {n} SVIDs replaced"),
        replaced.as_secs_f64() * 1e3,
        "ms",
        Target::AtMost(10_000.0),
    );
    Ok(report)
}
