//! Telemetry end to end (issue 16): a real Prometheus server scrapes the
//! real server and agent and the values are read back through its query
//! API; `/ready` follows a ban and an eviction; request ids tie log lines
//! to audit records.
//!
//! Prometheus is Debian's `prometheus` package: `$SIGIL_PROMETHEUS`, else
//! `prometheus` on the PATH. Without it the Prometheus test prints why and
//! returns, unless `CI` or `SIGIL_REQUIRE_PROMETHEUS=1` is set: then it
//! fails (scripts/test.sh installs the package and sets the latter).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sigil_tests::process::{
    AgentProcess, NodeAttestation, ServerOptions, ServerProcess, free_port,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `GET path` on `addr` (HTTP/1.0): status and body.
async fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

fn telemetry_toml(port: u16) -> String {
    format!("[telemetry]\nbind = \"127.0.0.1:{port}\"\n")
}

/// Polls `f` every 200 ms until it returns `Some`, for at most `limit`.
async fn wait_for<T, F: std::future::Future<Output = Option<T>>>(
    limit: Duration,
    mut f: impl FnMut() -> F,
) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The Prometheus binary, or `None` (after saying why) when the test may
/// be skipped.
fn prometheus_binary() -> Option<PathBuf> {
    let found = std::env::var_os("SIGIL_PROMETHEUS")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("PATH").and_then(|paths| {
                std::env::split_paths(&paths)
                    .map(|d| d.join("prometheus"))
                    .find(|p| p.is_file())
            })
        });
    let required = std::env::var_os("CI").is_some()
        || std::env::var("SIGIL_REQUIRE_PROMETHEUS").as_deref() == Ok("1");
    match found {
        Some(p) => Some(p),
        None if required => panic!(
            "Prometheus is required (CI or SIGIL_REQUIRE_PROMETHEUS=1) but neither \
             $SIGIL_PROMETHEUS nor `prometheus` on the PATH exists; install Debian's \
             `prometheus` package"
        ),
        None => {
            eprintln!(
                "SKIPPED: no Prometheus binary ($SIGIL_PROMETHEUS or `prometheus` on the PATH); \
                 install Debian's `prometheus` package to run this test"
            );
            None
        }
    }
}

/// A Prometheus server scraping `targets` every second; killed on drop.
struct Prometheus {
    child: Child,
    addr: String,
    log: PathBuf,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    fn start(binary: &Path, dir: &Path, targets: &[(&str, String)]) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let mut config =
            String::from("global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n");
        for (job, target) in targets {
            config.push_str(&format!(
                "  - job_name: {job}\n    static_configs:\n      - targets: ['{target}']\n"
            ));
        }
        let config_file = dir.join("prometheus.yml");
        std::fs::write(&config_file, config).unwrap();
        let addr = format!("127.0.0.1:{}", free_port().unwrap());
        let log = dir.join("prometheus.log");
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(binary)
            .arg(format!("--config.file={}", config_file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("prometheus starts");
        Self { child, addr, log }
    }

    /// The value of the instant query `promql`, if it has exactly one
    /// sample.
    async fn query(&self, promql: &str) -> Option<f64> {
        let encoded: String = promql
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-' | b'.' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect();
        let (status, body) = http_get(&self.addr, &format!("/api/v1/query?query={encoded}"))
            .await
            .ok()?;
        if status != 200 {
            return None;
        }
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        let result = v["data"]["result"].as_array()?;
        if result.len() != 1 {
            return None;
        }
        result[0]["value"][1].as_str()?.parse().ok()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_server_and_agent_and_sees_issuance_grow() {
    let Some(prometheus) = prometheus_binary() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (server_port, agent_port) = (free_port().unwrap(), free_port().unwrap());
    let server = ServerProcess::start(
        &dir.path().join("server"),
        &ServerOptions {
            extra: telemetry_toml(server_port),
            ..Default::default()
        },
    )
    .unwrap();
    let token = server.join_token().unwrap();
    let agent = AgentProcess::start_with(
        &dir.path().join("agent"),
        &server,
        &NodeAttestation::JoinToken(token),
        &telemetry_toml(agent_port),
    )
    .unwrap();
    let agent_id = server.agent_ids().unwrap().remove(0);
    let prom = Prometheus::start(
        &prometheus,
        &dir.path().join("prometheus"),
        &[
            ("sigil-server", format!("127.0.0.1:{server_port}")),
            ("sigil-agent", format!("127.0.0.1:{agent_port}")),
        ],
    );

    // Both targets are scraped; the agent's own SVID was issued and no
    // workload SVID yet.
    for job in ["sigil-server", "sigil-agent"] {
        let q = format!("up{{job=\"{job}\"}} == 1");
        let up = wait_for(Duration::from_secs(30), || prom.query(&q)).await;
        assert_eq!(up, Some(1.0), "{job} scraped:\n{}", prom.log());
    }
    let agent_svids = r#"sigil_server_svids_issued_total{type="agent",outcome="ok"}"#;
    assert_eq!(
        wait_for(Duration::from_secs(10), || prom.query(agent_svids)).await,
        Some(1.0),
        "the attestation counted"
    );
    let x509 = r#"sigil_server_svids_issued_total{type="x509",outcome="ok"}"#;
    assert_eq!(prom.query(x509).await, None, "no workload SVID issued yet");
    assert_eq!(
        prom.query("sigil_agent_svids_cached").await,
        Some(0.0),
        "nothing cached yet"
    );

    // A workload fetches its SVID: the counters grow, as Prometheus sees.
    let uid = sigil_tests::process::current_uid().unwrap();
    for name in ["a", "b"] {
        server
            .create_entry(
                &format!("spiffe://example.org/{name}"),
                &agent_id,
                &["--selector", &format!("unix:uid:{uid}")],
            )
            .unwrap();
    }
    let client = spiffe::WorkloadApiClient::connect_to(agent.endpoint())
        .await
        .unwrap();
    let fetched = wait_for(Duration::from_secs(15), || async {
        client
            .fetch_all_x509_svids()
            .await
            .ok()
            .filter(|s| s.len() == 2)
    })
    .await;
    assert!(fetched.is_some(), "the workload got both SVIDs");
    let issued = wait_for(Duration::from_secs(15), || async {
        prom.query(x509).await.filter(|v| *v >= 2.0)
    })
    .await;
    assert_eq!(issued, Some(2.0), "issuance counted and scraped");
    let cached = wait_for(Duration::from_secs(15), || async {
        prom.query("sigil_agent_svids_cached")
            .await
            .filter(|v| *v >= 2.0)
    })
    .await;
    assert_eq!(cached, Some(2.0));
    let rotated = r#"sigil_agent_svid_rotations_total{type="workload"}"#;
    assert_eq!(
        wait_for(Duration::from_secs(15), || async {
            prom.query(rotated).await.filter(|v| *v >= 2.0)
        })
        .await,
        Some(2.0)
    );
    // The Workload API call and the node API calls are timed.
    let calls =
        r#"sum(sigil_agent_rpc_duration_seconds_count{service="SpiffeWorkloadAPI",code="OK"})"#;
    assert!(
        wait_for(Duration::from_secs(15), || async {
            prom.query(calls).await.filter(|v| *v >= 1.0)
        })
        .await
        .is_some(),
        "Workload API calls timed"
    );
    let batch = r#"sigil_server_rpc_duration_seconds_count{service="sigil.node.v1.Node",method="BatchNewX509Svid",code="OK"}"#;
    assert!(prom.query(batch).await.is_some_and(|v| v >= 1.0));
    // State sampled at scrape time.
    for (q, want) in [
        ("sigil_server_agents", 1.0),
        ("sigil_server_entries", 2.0),
        ("sigil_server_sync_streams", 1.0),
        ("sigil_agent_server_connected", 1.0),
    ] {
        let got = wait_for(Duration::from_secs(10), || async {
            prom.query(q).await.filter(|v| *v == want)
        })
        .await;
        assert_eq!(got, Some(want), "{q}");
    }
    let ca = r#"min(sigil_server_ca_authority_expiry_seconds{kind="x509",state="active"})"#;
    assert!(
        prom.query(ca).await.is_some_and(|v| v > 3600.0),
        "CA expiry exported"
    );
    let lag = "max(sigil_server_change_feed_revision) - max(sigil_agent_sync_revision)";
    assert!(
        wait_for(Duration::from_secs(10), || async {
            prom.query(lag).await.filter(|v| *v == 0.0)
        })
        .await
        .is_some(),
        "the agent caught up with the feed"
    );
    // The alert rules shipped in deploy/monitoring parse (promtool is
    // checked in scripts/test.sh; here their expressions run against data).
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_ready_flips_to_503_when_banned_and_back_after_evict() {
    let dir = tempfile::tempdir().unwrap();
    let node = sigil_tests::process::x509pop_node_pki(&dir.path().join("pki")).unwrap();
    let server_port = free_port().unwrap();
    let server = ServerProcess::start(
        &dir.path().join("server"),
        &ServerOptions {
            extra: format!(
                "[node_attestors.x509pop]\nca_bundle = \"{}\"\n\n{}",
                dir.path().join("pki/ca.pem").display(),
                telemetry_toml(server_port)
            ),
            ..Default::default()
        },
    )
    .unwrap();
    let server_addr = format!("127.0.0.1:{server_port}");
    let agent_addr = format!("127.0.0.1:{}", free_port().unwrap());
    let agent = AgentProcess::start_with(
        &dir.path().join("agent"),
        &server,
        &node,
        &format!("[telemetry]\nbind = \"{agent_addr}\"\n"),
    )
    .unwrap();
    let agent_id = server.agent_ids().unwrap().remove(0);

    let ready_is = |addr: String, want: u16| async move {
        wait_for(Duration::from_secs(30), || {
            let addr = addr.clone();
            async move {
                http_get(&addr, "/ready")
                    .await
                    .ok()
                    .filter(|(s, _)| *s == want)
            }
        })
        .await
    };
    assert!(
        ready_is(server_addr.clone(), 200).await.is_some(),
        "server ready"
    );
    let (_, body) = ready_is(agent_addr.clone(), 200)
        .await
        .unwrap_or_else(|| panic!("agent ready:\n{}", agent.log()));
    assert_eq!(body, r#"{"status":"ready"}"#);
    assert_eq!(http_get(&agent_addr, "/live").await.unwrap().0, 200);

    server.cli_ok(&["agent", "ban", "--id", &agent_id]).unwrap();
    let (_, body) = ready_is(agent_addr.clone(), 503)
        .await
        .unwrap_or_else(|| panic!("agent not ready once banned:\n{}", agent.log()));
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["status"], "not ready", "{body}");
    let reasons = v["reasons"].to_string();
    assert!(reasons.contains("revoked"), "{body}");
    assert_eq!(
        http_get(&agent_addr, "/live").await.unwrap().0,
        200,
        "still live: it keeps trying to attest"
    );

    // Evict removes the agent record; the node attests again by itself.
    server
        .cli_ok(&["agent", "evict", "--id", &agent_id])
        .unwrap();
    assert!(
        ready_is(agent_addr.clone(), 200).await.is_some(),
        "ready again after evict and re-attestation:\n{}",
        agent.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_id_is_in_the_calls_log_lines_and_its_audit_record() {
    let dir = tempfile::tempdir().unwrap();
    let server =
        ServerProcess::start(&dir.path().join("server"), &ServerOptions::default()).unwrap();
    server.join_token().unwrap();
    // The audit line of the call: its own request_id field (the value
    // stored in the audit record) and the call's span, which carries the
    // request id every log line of that call shows.
    let log = server.log();
    let line = log
        .lines()
        .find(|l| l.contains("sigil::audit") && l.contains("token.generate"))
        .unwrap_or_else(|| panic!("no audit line for token.generate:\n{log}"));
    let field = |l: &str, key: &str| -> Option<String> {
        l.split(key)
            .nth(1)?
            .split(|c: char| !c.is_ascii_alphanumeric() && c != '-' && c != '_' && c != '.')
            .next()
            .map(str::to_owned)
    };
    let span_id = field(line, "rpc{").and(field(line, "request_id="));
    assert!(
        span_id.is_some(),
        "the line is inside the call's span: {line}"
    );
    let ids: Vec<_> = line.match_indices("request_id=").collect();
    assert_eq!(ids.len(), 2, "span and audit record each name it: {line}");
    let first = field(&line[ids[0].0..], "request_id=").unwrap();
    let second = field(&line[ids[1].0..], "request_id=").unwrap();
    assert_eq!(first, second, "{line}");
    assert_eq!(first.len(), 16, "{line}");
}
