//! PostgreSQL down for 30 s under a running server and agent (issue 12,
//! item 6; docs/high-availability.md "Database outage"): workloads keep
//! getting SVIDs, rotated and signed from the server's caches; mutations
//! fail at once as unavailable; once the database is back everything
//! works again without restarting anything, and the issuance events of the
//! outage reach the audit log.

use std::collections::BTreeSet;
use std::time::{Duration, Instant, SystemTime};

use sigil_tests::postgres::{self, Cluster};
use sigil_tests::process::ServerOptions;

use crate::common::{Deployment, leaf_facts, retry};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workloads_are_served_and_rotated_through_a_database_outage() {
    // Needs a PostgreSQL install; this test runs its own cluster so it can
    // stop it without disturbing the other suites' server.
    if postgres::connection().is_none() {
        return;
    }
    let cluster = Cluster::start().unwrap();
    let db = postgres::fresh_database(&cluster.connection())
        .await
        .unwrap();
    let telemetry = format!("127.0.0.1:{}", sigil_tests::process::free_port().unwrap());
    let d = Deployment::start(&ServerOptions::with_extra(&format!(
        "{}\n[telemetry]\nbind = \"{telemetry}\"\n",
        postgres::datastore_toml(&db)
    )));
    // Half-life 10 s: about three rotations fall inside the outage.
    d.register_me("steady", &["--x509-ttl", "20s"]);
    let source = spiffe::X509Source::builder()
        .endpoint(d.agent.endpoint())
        .build()
        .await
        .unwrap();
    let first = leaf_facts(&source.svid().unwrap()).serial;

    cluster.stop().unwrap();
    let down_at = SystemTime::now();
    let down = Instant::now();
    // A mutation is refused at once, saying why.
    let out = d
        .server
        .cli(&[
            "entry",
            "create",
            "--spiffe-id",
            "spiffe://example.org/refused",
            "--parent-id",
            &d.agent_id,
            "--selector",
            "unix:uid:1",
        ])
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "created while the database is down");
    assert!(stderr.contains("unavailable"), "{stderr}");
    assert!(
        down.elapsed() < Duration::from_secs(10),
        "refused after {:?}",
        down.elapsed()
    );

    // Still ready: it serves from its caches, as every replica does; a
    // readiness failure would take them all out of their Service.
    assert!(
        http_get(&telemetry, "/ready")
            .await
            .starts_with("HTTP/1.1 200"),
        "not ready during the outage"
    );

    let client = d.client().await;
    let mut serials = BTreeSet::from([first]);
    while down.elapsed() < Duration::from_secs(30) {
        let fetched = client
            .fetch_x509_svid()
            .await
            .expect("served while the database is down");
        for svid in [&fetched, &*source.svid().unwrap()] {
            let facts = leaf_facts(svid);
            assert!(facts.not_after > SystemTime::now(), "still valid");
            serials.insert(facts.serial);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        serials.len() >= 3,
        "rotation went on from the caches: {serials:?}"
    );

    // The database is back: writes work again, and reach the agent,
    // without restarting the server or the agent.
    cluster.up().unwrap();
    let up_at = SystemTime::now();
    let created = retry(Duration::from_secs(30), || async {
        let out = d.server.cli(&[
            "entry",
            "create",
            "--spiffe-id",
            "spiffe://example.org/after",
            "--parent-id",
            &d.agent_id,
            "--selector",
            &format!("unix:uid:{}", sigil_tests::process::current_uid().unwrap()),
        ]);
        match out {
            Ok(o) if o.status.success() => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    created.unwrap();
    retry(Duration::from_secs(30), || async {
        let context = client
            .fetch_x509_context()
            .await
            .map_err(|e| e.to_string())?;
        context
            .svids()
            .iter()
            .any(|s| s.spiffe_id().to_string() == "spiffe://example.org/after")
            .then_some(())
            .ok_or_else(|| "not yet".to_owned())
    })
    .await
    .unwrap();

    // Issuance during the outage was audited once the database was back.
    let config = d.server.config().to_str().unwrap().to_owned();
    retry(Duration::from_secs(30), || async {
        let shown = d
            .server
            .cli(&[
                "--output",
                "json",
                "audit",
                "show",
                "--config",
                &config,
                "--action",
                "svid.x509.issue",
            ])
            .map_err(|e| e.to_string())?;
        let rows: serde_json::Value =
            serde_json::from_slice(&shown.stdout).map_err(|e| e.to_string())?;
        let during = rows
            .as_array()
            .into_iter()
            .flatten()
            .filter(|r| {
                let t = r["event"]["time"].as_u64().unwrap_or(0);
                let t = std::time::UNIX_EPOCH + Duration::from_secs(t);
                t > down_at && t < up_at
            })
            .count();
        (during > 0)
            .then_some(())
            .ok_or_else(|| format!("no issuance event of the outage yet: {rows}"))
    })
    .await
    .unwrap();
    source.shutdown().await;
}

/// The response to a plain HTTP GET of `path`, as text.
async fn http_get(addr: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: sigil\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let mut out = String::new();
    stream.read_to_string(&mut out).await.unwrap();
    out
}
