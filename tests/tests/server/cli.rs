//! Every `sigil-server` subcommand against a running server, including bad
//! input, admin socket permissions and shutdown.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::process::{Command, Output};

use serde_json::Value;
use sigil_tests::sim_agent::SimAgent;

fn bin() -> std::path::PathBuf {
    sigil_tests::process::binary("sigil-server").unwrap()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn fails(out: &Output) -> String {
    assert!(
        !out.status.success(),
        "expected failure, got success: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stderr.clone()).unwrap()
}

fn json(out: &Output) -> Value {
    serde_json::from_str(&ok(out)).unwrap()
}

const AGENT: &str = "spiffe://example.org/sigil/agent/join_token/0123456789abcdef0123456789abcdef";

#[tokio::test]
async fn entry_lifecycle() {
    let s = crate::start("");
    let id = ok(&s
        .cli(&[
            "entry",
            "create",
            "--spiffe-id",
            "spiffe://example.org/web",
            "--parent-id",
            AGENT,
            "--selector",
            "unix:uid:1000",
            "--selector",
            "unix:gid:1000",
            "--x509-ttl",
            "10m",
            "--jwt-ttl",
            "90s",
            "--dns",
            "web.example.org",
            "--federates-with",
            "other.org",
            "--hint",
            "blue",
            "--expires-at",
            "2030-01-01T00:00:00Z",
        ])
        .unwrap())
    .trim()
    .to_owned();
    assert_eq!(id.len(), 32, "prints the new entry id");

    let shown = json(
        &s.cli(&["--output", "json", "entry", "show", "--id", &id])
            .unwrap(),
    );
    let e = &shown[0];
    assert_eq!(e["spiffe_id"], "spiffe://example.org/web");
    assert_eq!(e["x509_svid_ttl"], 600);
    assert_eq!(e["jwt_svid_ttl"], 90);
    assert_eq!(e["dns_names"][0], "web.example.org");
    assert_eq!(e["federates_with"][0], "other.org");
    assert_eq!(e["hint"], "blue");
    assert_eq!(e["expires_at"], 1893456000);

    let text = ok(&s
        .cli(&["entry", "show", "--spiffe-id", "spiffe://example.org/web"])
        .unwrap());
    assert!(
        text.contains("Selectors      : unix:gid:1000, unix:uid:1000"),
        "{text}"
    );
    assert_eq!(
        json(
            &s.cli(&["--output", "json", "entry", "show", "--parent-id", AGENT])
                .unwrap()
        )
        .as_array()
        .unwrap()
        .len(),
        1
    );
    assert_eq!(
        json(
            &s.cli(&[
                "--output",
                "json",
                "entry",
                "show",
                "--selector",
                "unix:uid:1000"
            ])
            .unwrap()
        )
        .as_array()
        .unwrap()
        .len(),
        1
    );
    assert_eq!(
        json(
            &s.cli(&[
                "--output",
                "json",
                "entry",
                "show",
                "--selector",
                "unix:uid:1"
            ])
            .unwrap()
        )
        .as_array()
        .unwrap()
        .len(),
        0
    );

    let updated = json(
        &s.cli(&[
            "--output",
            "json",
            "entry",
            "update",
            "--id",
            &id,
            "--hint",
            "green",
            "--x509-ttl",
            "1h",
        ])
        .unwrap(),
    );
    assert_eq!(updated["hint"], "green");
    assert_eq!(updated["x509_svid_ttl"], 3600);
    assert_eq!(
        updated["dns_names"][0], "web.example.org",
        "fields not given keep their value"
    );

    assert_eq!(ok(&s.cli(&["entry", "count"]).unwrap()).trim(), "1");
    assert_eq!(
        json(&s.cli(&["--output", "json", "entry", "count"]).unwrap())["count"],
        1
    );
    assert!(ok(&s.cli(&["entry", "delete", "--id", &id]).unwrap()).contains("deleted"));
    assert_eq!(ok(&s.cli(&["entry", "count"]).unwrap()).trim(), "0");
}

#[tokio::test]
async fn node_alias_and_batch_create() {
    let s = crate::start("");
    let id = ok(&s
        .cli(&[
            "entry",
            "create",
            "--node",
            "--spiffe-id",
            "spiffe://example.org/cluster/prod",
            "--selector",
            "k8s_psat:cluster:prod",
        ])
        .unwrap());
    let shown = json(
        &s.cli(&["--output", "json", "entry", "show", "--id", id.trim()])
            .unwrap(),
    );
    assert_eq!(shown[0]["parent_id"], "spiffe://example.org/sigil/server");

    let batch = s.dir().join("batch.json");
    std::fs::write(
        &batch,
        format!(
            r#"{{"entries": [
                {{"spiffe_id": "spiffe://example.org/a", "parent_id": "{AGENT}", "selectors": ["unix:uid:1"]}},
                {{"spiffe_id": "spiffe://example.org/b", "parent_id": "{AGENT}", "selectors": ["nocolon"]}},
                {{"spiffe_id": "spiffe://example.org/c", "parent_id": "{AGENT}", "selectors": ["unix:uid:3"], "x509_svid_ttl": 60}}
            ]}}"#
        ),
    )
    .unwrap();
    let out = s
        .cli(&[
            "--output",
            "json",
            "entry",
            "create",
            "--data",
            batch.to_str().unwrap(),
        ])
        .unwrap();
    assert!(!out.status.success(), "one bad item makes the command fail");
    let results: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(results[0]["status"]["code"], 0);
    assert_eq!(
        results[1]["status"]["code"], 3,
        "InvalidArgument for the bad selector"
    );
    assert_eq!(results[2]["status"]["code"], 0, "the others are created");
    assert_eq!(ok(&s.cli(&["entry", "count"]).unwrap()).trim(), "3");
}

#[tokio::test]
async fn bad_input_gives_a_clear_message_and_nonzero_exit() {
    let s = crate::start("");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec![
                "entry",
                "create",
                "--spiffe-id",
                "spiffe://example.org/../x",
                "--parent-id",
                AGENT,
                "--selector",
                "unix:uid:1",
            ],
            "'..' segment",
        ),
        (
            vec![
                "entry",
                "create",
                "--spiffe-id",
                "SPIFFE://example.org/x",
                "--parent-id",
                AGENT,
                "--selector",
                "unix:uid:1",
            ],
            "scheme",
        ),
        (
            vec![
                "entry",
                "create",
                "--spiffe-id",
                "spiffe://example.org/x",
                "--parent-id",
                AGENT,
                "--selector",
                "unixuid",
            ],
            "no ':'",
        ),
        (
            vec![
                "entry",
                "create",
                "--spiffe-id",
                "spiffe://example.org/x",
                "--parent-id",
                AGENT,
            ],
            "--selector",
        ),
        (
            vec![
                "entry",
                "create",
                "--spiffe-id",
                "spiffe://example.org/x",
                "--selector",
                "unix:uid:1",
            ],
            "--parent-id",
        ),
        (
            vec![
                "entry",
                "create",
                "--spiffe-id",
                "spiffe://other.org/x",
                "--parent-id",
                AGENT,
                "--selector",
                "unix:uid:1",
            ],
            "trust domain",
        ),
        (
            vec![
                "entry",
                "create",
                "--spiffe-id",
                "spiffe://example.org/sigil/x",
                "--parent-id",
                AGENT,
                "--selector",
                "unix:uid:1",
            ],
            "reserved",
        ),
        (
            vec![
                "entry",
                "create",
                "--spiffe-id",
                "spiffe://example.org/x",
                "--parent-id",
                AGENT,
                "--selector",
                "unix:uid:1",
                "--x509-ttl",
                "10",
            ],
            "missing unit",
        ),
        (
            vec![
                "entry",
                "create",
                "--spiffe-id",
                "spiffe://example.org/x",
                "--parent-id",
                AGENT,
                "--selector",
                "unix:uid:1",
                "--expires-at",
                "tomorrow",
            ],
            "RFC 3339",
        ),
        (
            vec!["entry", "show", "--id", "0123456789abcdef0123456789abcdef"],
            "not found",
        ),
        (
            vec![
                "entry",
                "update",
                "--id",
                "0123456789abcdef0123456789abcdef",
                "--hint",
                "x",
            ],
            "not found",
        ),
        (
            vec![
                "entry",
                "delete",
                "--id",
                "0123456789abcdef0123456789abcdef",
            ],
            "not found",
        ),
        (vec!["agent", "show", "--id", AGENT], "not found"),
        (vec!["agent", "evict", "--id", AGENT], "not found"),
        (vec!["agent", "ban", "--id", "not-an-id"], "spiffe"),
        (
            vec![
                "token",
                "generate",
                "--spiffe-id",
                "spiffe://example.org/sigil/agent/x",
            ],
            "reserved",
        ),
        (
            vec!["x509", "mint", "--spiffe-id", "spiffe://other.org/x"],
            "trust domain",
        ),
        (
            vec![
                "x509",
                "mint",
                "--spiffe-id",
                "spiffe://example.org/sigil/server",
            ],
            "reserved",
        ),
        (
            vec![
                "jwt",
                "mint",
                "--spiffe-id",
                "spiffe://example.org/sigil/agent/x",
                "--audience",
                "a",
            ],
            "reserved",
        ),
        (
            vec!["jwt", "mint", "--spiffe-id", "spiffe://example.org/x"],
            "--audience",
        ),
        (vec!["bundle", "show", "--format", "der"], "der"),
    ];
    for (args, needle) in cases {
        let err = fails(&s.cli(&args).unwrap());
        assert!(
            err.to_lowercase().contains(&needle.to_lowercase()),
            "{args:?}: stderr lacks {needle:?}:\n{err}"
        );
    }
}

#[tokio::test]
async fn agents_tokens_bundles_and_minting() {
    let s = crate::start("");
    let token = ok(&s.cli(&["token", "generate", "--ttl", "10m"]).unwrap())
        .trim()
        .to_owned();
    assert_eq!(token.len(), 32);
    let t = json(
        &s.cli(&[
            "--output",
            "json",
            "token",
            "generate",
            "--spiffe-id",
            "spiffe://example.org/node/alias",
        ])
        .unwrap(),
    );
    assert_eq!(t["token"].as_str().unwrap().len(), 32);

    let agent = SimAgent::join(&s, &token).await.unwrap();
    let list = json(&s.cli(&["--output", "json", "agent", "list"]).unwrap());
    assert_eq!(list[0]["id"], agent.id.as_str());
    assert!(ok(&s.cli(&["agent", "list"]).unwrap()).contains(agent.id.as_str()));
    assert!(
        ok(&s
            .cli(&["agent", "show", "--id", agent.id.as_str()])
            .unwrap())
        .contains("join_token")
    );
    assert_eq!(
        json(
            &s.cli(&[
                "--output",
                "json",
                "agent",
                "ban",
                "--id",
                agent.id.as_str()
            ])
            .unwrap()
        )["banned"],
        true
    );
    assert!(
        ok(&s
            .cli(&["agent", "evict", "--id", agent.id.as_str()])
            .unwrap())
        .contains("evicted")
    );
    assert!(ok(&s.cli(&["agent", "list"]).unwrap()).contains("no agents"));

    let pem = ok(&s.cli(&["bundle", "show"]).unwrap());
    assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"));
    let jwks: Value = serde_json::from_str(&ok(&s
        .cli(&["bundle", "show", "--format", "jwks"])
        .unwrap()))
    .unwrap();
    assert!(jwks["spiffe_sequence"].as_u64().unwrap() >= 1);

    let out_dir = s.dir().join("minted");
    let text = ok(&s
        .cli(&[
            "x509",
            "mint",
            "--spiffe-id",
            "spiffe://example.org/tool",
            "--ttl",
            "5m",
            "--write",
            out_dir.to_str().unwrap(),
        ])
        .unwrap());
    assert!(text.contains("spiffe://example.org/tool"));
    let mode = std::fs::metadata(out_dir.join("svid.key"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "the key is written 0600");
    let (verify_ok, verify_out) = sigil_test_fakes::openssl::openssl_verify(
        s.dir(),
        &sigil_identity::pem::decode_all(
            "CERTIFICATE",
            &std::fs::read_to_string(out_dir.join("svid.pem")).unwrap(),
        )
        .unwrap()[0],
        &[],
        &sigil_identity::pem::decode_all(
            "CERTIFICATE",
            &std::fs::read_to_string(out_dir.join("bundle.pem")).unwrap(),
        )
        .unwrap(),
    )
    .unwrap();
    assert!(verify_ok, "{verify_out}");
    let stdout_pem = ok(&s
        .cli(&["x509", "mint", "--spiffe-id", "spiffe://example.org/tool"])
        .unwrap());
    assert!(stdout_pem.contains("BEGIN CERTIFICATE") && stdout_pem.contains("BEGIN PRIVATE KEY"));

    let token = ok(&s
        .cli(&[
            "jwt",
            "mint",
            "--spiffe-id",
            "spiffe://example.org/tool",
            "--audience",
            "db",
            "--ttl",
            "1m",
        ])
        .unwrap());
    let bundle = s.bundle().await.unwrap();
    let v =
        sigil_identity::jwt::validate(token.trim(), &["db"], &bundle, std::time::SystemTime::now())
            .unwrap();
    assert_eq!(v.spiffe_id.as_str(), "spiffe://example.org/tool");

    assert!(ok(&s.cli(&["healthcheck"]).unwrap()).contains("serving"));
    let health = json(&s.cli(&["--output", "json", "healthcheck"]).unwrap());
    assert_eq!(health["status"], "serving");
    // The replica id generated on first start, kept in the data directory.
    let stored = std::fs::read_to_string(s.dir().join("data/server_id")).unwrap();
    assert!(stored.starts_with("s-"), "{stored}");
    assert_eq!(health["server_id"], stored.trim());
}

#[tokio::test]
async fn healthcheck_fails_without_a_server() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(bin())
        .arg("--admin-socket")
        .arg(dir.path().join("none.sock"))
        .arg("healthcheck")
        .output()
        .unwrap();
    let err = fails(&out);
    assert!(err.contains("is the server running"), "{err}");
}

#[tokio::test]
async fn admin_socket_is_0770_and_refuses_other_users() {
    let s = crate::start("");
    let mode = std::fs::metadata(&s.admin_socket)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o770);
    // The test runs as root (CI does); uid 65534 ("nobody") is neither root
    // nor the server's user. Make the path reachable so that the kernel's
    // mode check, not a directory permission, is what refuses it.
    std::fs::set_permissions(s.dir(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = Command::new(bin())
        .arg("--admin-socket")
        .arg(&s.admin_socket)
        .arg("healthcheck")
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let err = fails(&out);
    assert!(err.contains("admin socket"), "{err}");
    // Even with the socket opened up, the server checks the caller's uid.
    std::fs::set_permissions(&s.admin_socket, std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = Command::new(bin())
        .arg("--admin-socket")
        .arg(&s.admin_socket)
        .args(["entry", "count"])
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let err = fails(&out);
    assert!(err.contains("may not use the admin API"), "{err}");
}

#[tokio::test]
async fn sigterm_stops_the_server_cleanly() {
    let mut s = crate::start("");
    // An open Sync stream must not hold up shutdown.
    let agent = SimAgent::join(&s, &s.token().await.unwrap()).await.unwrap();
    let mut client = agent.client(&s).await.unwrap();
    let mut sync = client
        .sync(sigil_proto::node::SyncRequest { since_revision: 0 })
        .await
        .unwrap()
        .into_inner();
    sync.message().await.unwrap();
    let started = std::time::Instant::now();
    let status = s.stop_async().await.unwrap();
    assert!(status.success(), "exit status {status:?}\n{}", s.log());
    assert!(
        started.elapsed() < std::time::Duration::from_secs(4),
        "stopped in {:?}",
        started.elapsed()
    );
    let ended = sync.message().await;
    assert!(
        matches!(ended, Err(ref st) if st.code() == tonic::Code::Unavailable)
            || matches!(ended, Ok(None)),
        "{ended:?}"
    );
    assert!(s.log().contains("sigil-server stopped"));
}

#[tokio::test]
async fn restart_keeps_entries_bundle_and_bans() {
    let mut s = crate::start("");
    let token = ok(&s.cli(&["token", "generate"]).unwrap())
        .trim()
        .to_owned();
    let agent = SimAgent::join(&s, &token).await.unwrap();
    ok(&s.cli(&["agent", "ban", "--id", agent.id.as_str()]).unwrap());
    let id = ok(&s
        .cli(&[
            "entry",
            "create",
            "--spiffe-id",
            "spiffe://example.org/web",
            "--parent-id",
            AGENT,
            "--selector",
            "unix:uid:1",
        ])
        .unwrap());
    let before = s.bundle().await.unwrap();
    s.restart_async().await.unwrap();
    assert_eq!(
        s.bundle().await.unwrap().sequence,
        before.sequence,
        "no new keys after a restart with disk keys"
    );
    assert!(
        ok(&s.cli(&["entry", "show", "--id", id.trim()]).unwrap())
            .contains("spiffe://example.org/web")
    );
    assert_eq!(
        json(
            &s.cli(&[
                "--output",
                "json",
                "agent",
                "show",
                "--id",
                agent.id.as_str()
            ])
            .unwrap()
        )["banned"],
        true
    );
}

#[test]
fn run_refuses_bad_config_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    std::fs::write(
        &cfg,
        "trust_domain = \"example.org\"\n[ca]\nttl = \"1h\"\nbogus = 1\n",
    )
    .unwrap();
    let out = Command::new(bin())
        .args(["run", "--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    let err = fails(&out);
    assert!(err.contains("bogus"), "{err}");
    let out = Command::new(bin()).args(["run"]).output().unwrap();
    assert!(fails(&out).contains("trust_domain is required"));
}

#[test]
fn help_explains_every_subcommand() {
    let out = Command::new(bin()).arg("--help").output().unwrap();
    let text = ok(&out);
    for sub in [
        "run",
        "entry",
        "agent",
        "token",
        "bundle",
        "x509",
        "jwt",
        "healthcheck",
    ] {
        assert!(text.contains(sub), "--help lacks {sub}");
    }
    let out = Command::new(bin())
        .args(["entry", "create", "--help"])
        .output()
        .unwrap();
    assert!(ok(&out).contains("--selector <TYPE:VALUE>"));
}
