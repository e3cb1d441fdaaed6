//! The server on PostgreSQL: `datastore migrate` from a real server's sled
//! store, then a PostgreSQL-backed server serving what was migrated.

use sigil_tests::postgres;
use sigil_tests::process::{ServerOptions, ServerProcess};

fn entry_ids(server: &ServerProcess) -> Vec<String> {
    let list = server.cli_json(&["entry", "show"]).unwrap();
    let mut ids: Vec<String> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|e| format!("{} {}", e["id"].as_str().unwrap(), e["spiffe_id"]))
        .collect();
    ids.sort();
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sled_store_migrated_to_postgres_is_served_and_its_audit_log_verifies() {
    let Some(base) = postgres::connection() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let server_dir = dir.path().join("server");
    let mut sled = ServerProcess::start(&server_dir, &ServerOptions::default()).unwrap();
    let agent = "spiffe://example.org/sigil/agent/join_token/n1";
    for name in ["web", "db", "cache"] {
        sled.create_entry(
            &format!("spiffe://example.org/{name}"),
            agent,
            &["--selector", "unix:uid:1000"],
        )
        .unwrap();
    }
    sled.join_token().unwrap();
    let before = entry_ids(&sled);
    let bundle = sled.bundle().await.unwrap();
    sled.stop().unwrap();

    let db = postgres::fresh_database(&base).await.unwrap();
    let config = dir.path().join("pg.toml");
    std::fs::write(
        &config,
        format!(
            "trust_domain = \"example.org\"\ndata_dir = \"{}\"\n{}",
            server_dir.join("data").display(),
            postgres::datastore_toml(&db)
        ),
    )
    .unwrap();
    let data = server_dir.join("data");
    let migrate = |force: bool| {
        let mut args = vec![
            "datastore",
            "migrate",
            "--from-sled",
            data.to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
        ];
        if force {
            args.push("--force");
        }
        sled.cli(&args).unwrap()
    };
    let out = migrate(false);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("entries: 3"), "{stdout}");
    assert!(stdout.contains("join tokens: 1"), "{stdout}");
    // Run again: the target holds data now, so it is refused...
    let out = migrate(false);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("--force"), "{stderr}");
    // ...unless replaced, which gives the same result.
    let out = migrate(true);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A server on PostgreSQL with the same data directory (its CA keys).
    let mut pg = ServerProcess::start(
        &server_dir,
        &ServerOptions::with_extra(&postgres::datastore_toml(&db)),
    )
    .unwrap();
    assert_eq!(entry_ids(&pg), before);
    assert_eq!(
        pg.bundle().await.unwrap().x509_authorities,
        bundle.x509_authorities
    );
    // Writes go to PostgreSQL.
    pg.create_entry(
        "spiffe://example.org/new",
        agent,
        &["--selector", "unix:uid:1001"],
    )
    .unwrap();
    let rows = postgres::query(&db, "SELECT count(*) FROM sigil_entries")
        .await
        .unwrap();
    assert_eq!(rows, ["4"]);
    pg.stop().unwrap();
    // The audit log came along whole: the chain and checkpoints verify.
    let out = pg
        .cli(&["audit", "verify", "--config", pg.config().to_str().unwrap()])
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("audit log verified"), "{stdout}");
}
