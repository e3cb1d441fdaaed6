//! The two CLIs behave alike where they overlap: `--output json` is one
//! compact JSON value per line in both, and both write an SVID into a
//! directory as the same three files with the same modes.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use sigil_tests::process::ServerOptions;

use crate::common::Deployment;

fn stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// Every line of `text` is one JSON value; returns them.
fn json_lines(what: &str, text: &str) -> Vec<serde_json::Value> {
    assert!(!text.trim().is_empty(), "{what}: no output");
    text.lines()
        .map(|line| {
            serde_json::from_str(line).unwrap_or_else(|e| {
                panic!("{what}: line {line:?} is not one JSON value ({e}):\n{text}")
            })
        })
        .collect()
}

/// The PEM blocks labelled `label` in `dir/name`, and the file's mode.
fn pem_file(dir: &Path, name: &str, label: &str) -> (Vec<Vec<u8>>, u32) {
    let path = dir.join(name);
    let text = std::fs::read_to_string(&path).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    let blocks = sigil_identity::pem::decode_all(label, &text).unwrap();
    (blocks, mode)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_clis_print_json_lines_and_write_the_same_svid_files() {
    let d = Deployment::start(&ServerOptions::default());
    d.register_me("cli", &[]);

    for args in [
        &["healthcheck"][..],
        &["entry", "show"],
        &["agent", "list"],
        &["entry", "count"],
    ] {
        let mut all = vec!["--output", "json"];
        all.extend_from_slice(args);
        let out = stdout(&d.server.cli(&all).unwrap());
        let values = json_lines(&format!("sigil-server {}", args.join(" ")), &out);
        assert_eq!(values.len(), 1, "one reply, one line: {out}");
    }

    // The agent: wait for the entry to reach it.
    let deadline = Instant::now() + Duration::from_secs(20);
    let fetched = loop {
        let out = d
            .agent
            .cli(&["--output", "json", "api", "fetch", "x509"])
            .unwrap();
        if out.status.success() {
            break String::from_utf8(out.stdout).unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "no SVID: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let svids = json_lines("sigil-agent api fetch x509", &fetched);
    assert_eq!(svids.len(), 1, "{fetched}");
    assert_eq!(svids[0]["spiffe_id"], "spiffe://example.org/cli");

    let files = tempfile::tempdir().unwrap();
    let (from_agent, from_server) = (files.path().join("agent"), files.path().join("server"));
    stdout(
        &d.agent
            .cli(&[
                "api",
                "fetch",
                "x509",
                "--write",
                from_agent.to_str().unwrap(),
            ])
            .unwrap(),
    );
    let minted = stdout(
        &d.server
            .cli(&[
                "--output",
                "json",
                "x509",
                "mint",
                "--spiffe-id",
                "spiffe://example.org/minted",
                "--write",
                from_server.to_str().unwrap(),
            ])
            .unwrap(),
    );
    json_lines("sigil-server x509 mint --write", &minted);
    let mut bundles = Vec::new();
    for dir in [&from_agent, &from_server] {
        let (key, key_mode) = pem_file(dir, "svid.key", "PRIVATE KEY");
        let (chain, chain_mode) = pem_file(dir, "svid.pem", "CERTIFICATE");
        let (bundle, bundle_mode) = pem_file(dir, "bundle.pem", "CERTIFICATE");
        assert_eq!(
            (key.len(), key_mode, chain_mode, bundle_mode),
            (1, 0o600, 0o600, 0o644),
            "{}",
            dir.display()
        );
        assert!(!chain.is_empty() && !bundle.is_empty(), "{}", dir.display());
        let names: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 3, "no temporary files left: {names:?}");
        bundles.push(bundle);
    }
    assert_eq!(bundles[0], bundles[1], "both wrote the server's bundle");
}
