//! The `sigil-agent` binary: `run` with a config file, then every `api`
//! subcommand and `healthcheck` against it; bad input and shutdown.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::Server;
use sigil_proto::admin;
use sigil_proto::node as node_pb;

const BIN: &str = env!("CARGO_BIN_EXE_sigil-agent");

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}: {}{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_then_every_api_subcommand() {
    let server = Server::start().await;
    server
        .bundle_pem(&server.dir.path().join("bundle.pem"))
        .await;
    let socket = server.dir.path().join("agent-run/api.sock");
    let config = server.dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "trust_domain = \"example.org\"\nserver_address = \"{}\"\ndata_dir = \"{}\"\ntrust_bundle = \"{}\"\nsocket_path = \"{}\"\n[node_attestor]\njoin_token = \"{}\"\n",
            server.addr,
            server.dir.path().join("agent-data").display(),
            server.dir.path().join("bundle.pem").display(),
            socket.display(),
            server.token().await
        ),
    )
    .unwrap();
    let log = std::fs::File::create(server.dir.path().join("agent.log")).unwrap();
    let mut agent = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&config)
        .stderr(log)
        .spawn()
        .unwrap();
    let cli = |args: &[&str]| {
        Command::new(BIN)
            .arg("--socket")
            .arg(&socket)
            .args(args)
            .output()
            .unwrap()
    };
    for _ in 0..200 {
        if cli(&["healthcheck"]).status.success() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ok(&cli(&["healthcheck"])).contains("serving"));

    // No identity for this process yet: a clear error.
    let out = cli(&["api", "fetch", "x509"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no identity"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let agent_id = server
        .admin()
        .await
        .list_agents(admin::ListAgentsRequest {})
        .await
        .unwrap()
        .into_inner()
        .agents[0]
        .id
        .clone();
    let uid = std::fs::metadata("/proc/self").unwrap().uid();
    let entry = node_pb::Entry {
        spiffe_id: "spiffe://example.org/cli".into(),
        parent_id: agent_id,
        selectors: vec![format!("unix:uid:{uid}")],
        ..Default::default()
    };
    server
        .admin()
        .await
        .create_entries(admin::CreateEntriesRequest {
            entries: vec![entry],
        })
        .await
        .unwrap();

    let text = ok(&cli(&["api", "fetch", "x509"]));
    assert!(
        text.contains("SPIFFE ID : spiffe://example.org/cli"),
        "{text}"
    );
    let json: serde_json::Value = serde_json::from_str(
        ok(&cli(&["--output", "json", "api", "fetch", "x509"]))
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(json["spiffe_id"], "spiffe://example.org/cli");

    let dir = server.dir.path().join("written");
    ok(&cli(&[
        "api",
        "fetch",
        "x509",
        "--write",
        dir.to_str().unwrap(),
    ]));
    assert_eq!(
        std::fs::metadata(dir.join("svid.key"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    assert!(
        std::fs::read_to_string(dir.join("bundle.pem"))
            .unwrap()
            .contains("BEGIN CERTIFICATE")
    );

    let token = ok(&cli(&["api", "fetch", "jwt", "--audience", "db"]))
        .trim()
        .to_owned();
    assert!(
        ok(&cli(&[
            "api",
            "validate",
            "jwt",
            "--audience",
            "db",
            "--svid",
            &token
        ]))
        .contains("spiffe://example.org/cli")
    );
    let bad = cli(&[
        "api",
        "validate",
        "jwt",
        "--audience",
        "other",
        "--svid",
        &token,
    ]);
    assert!(!bad.status.success());

    // `api watch` prints the current SVID at once.
    let mut watch = Command::new(BIN)
        .arg("--socket")
        .arg(&socket)
        .args(["api", "watch"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(watch.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(
        line.starts_with("spiffe://example.org/cli serial="),
        "{line}"
    );
    watch.kill().unwrap();
    watch.wait().unwrap();

    // A 10 MB JWT is refused without the agent's memory growing by it.
    let rss = |pid: u32| -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace()
            .nth(1)
            .unwrap()
            .parse::<u64>()
            .unwrap()
            * 1024
    };
    let before = rss(agent.id());
    let channel = sigil_proto::channel::unix_channel(&socket).await.unwrap();
    let mut raw =
        sigil_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient::new(channel)
            .max_encoding_message_size(64 << 20);
    for _ in 0..3 {
        let mut req = tonic::Request::new(sigil_proto::workload::ValidateJwtsvidRequest {
            audience: "db".into(),
            svid: "a".repeat(10 * 1024 * 1024),
        });
        req.metadata_mut()
            .insert("workload.spiffe.io", "true".parse().unwrap());
        assert!(raw.validate_jwtsvid(req).await.is_err());
    }
    let after = rss(agent.id());
    println!("agent RSS before {before} B, after three 10 MB requests {after} B");
    assert!(
        after < before + 5 * 1024 * 1024,
        "RSS grew from {before} to {after}"
    );

    // SIGTERM stops the agent cleanly.
    Command::new("kill")
        .args(["-TERM", &agent.id().to_string()])
        .status()
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Some(s) = agent.try_wait().unwrap() {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap();
    assert!(
        status.success(),
        "{}",
        std::fs::read_to_string(server.dir.path().join("agent.log")).unwrap()
    );
}

#[test]
fn errors_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .arg("--socket")
        .arg(dir.path().join("none.sock"))
        .arg("healthcheck")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is the agent running"));
    let cfg = dir.path().join("a.toml");
    std::fs::write(&cfg, "trust_domain = \"example.org\"\nserver_address = \"x:1\"\n[node_attestor]\njoin_token = \"t\"\n").unwrap();
    let out = Command::new(BIN)
        .args(["run", "--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("trust_bundle"));
    let out = Command::new(BIN)
        .args(["api", "fetch", "jwt"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "--audience is required");
    let help = Command::new(BIN).arg("--help").output().unwrap();
    let text = String::from_utf8(help.stdout).unwrap();
    for sub in ["run", "api", "healthcheck"] {
        assert!(text.contains(sub));
    }
}
