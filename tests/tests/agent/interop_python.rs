//! Interop with the official Python SPIFFE library (py-spiffe on gRPC
//! C-core, which sends the percent-encoded socket path as `:authority`):
//! fetch X.509 SVID and bundles, fetch and validate a JWT-SVID, fetch JWT
//! bundles, and see an update arrive on an open stream.
//!
//! Needs the pinned client from `tests/tests/agent/interop/requirements.txt` in
//! `<workspace>/.venv` (created by `scripts/test.sh`) or at `$SIGIL_PYTHON`.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use crate::common::AgentTestServer as _;
use serde_json::Value;
use sigil_agent::workload_api::{self, WorkloadApi};
use sigil_attestors::unix::UnixAttestor;
use sigil_proto::admin;
use sigil_proto::node as node_pb;

fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("SIGIL_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    assert!(
        venv.exists(),
        "the Python SPIFFE client is not installed: run ./scripts/test.sh (it creates .venv from \
         tests/tests/agent/interop/requirements.txt), or set SIGIL_PYTHON"
    );
    venv
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_spiffe_client_works_end_to_end() {
    let server = crate::common::start("");
    let agent = server.start_agent().await;
    let agent_id = server.agent_id().await;
    let socket = server.dir().join("workload/api.sock");
    let listener = workload_api::bind(&socket).unwrap();
    tokio::spawn(workload_api::serve(
        WorkloadApi::new(agent.clone(), Arc::new(UnixAttestor::default())),
        listener,
        std::future::pending(),
    ));
    tokio::spawn(agent.run(std::future::pending()));

    let uid = std::fs::metadata("/proc/self").unwrap().uid();
    let entry = node_pb::Entry {
        spiffe_id: "spiffe://example.org/py".into(),
        parent_id: agent_id,
        selectors: vec![format!("unix:uid:{uid}")],
        ..Default::default()
    };
    let created = server
        .admin()
        .await
        .unwrap()
        .create_entries(admin::CreateEntriesRequest {
            entries: vec![entry],
        })
        .await
        .unwrap();
    let mut entry = created.into_inner().results.remove(0).entry.unwrap();

    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/agent/interop/python_client.py");
    let mut child = Command::new(python())
        .arg(&script)
        .arg(format!("unix:{}", socket.display()))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Value>();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Ok(v) = serde_json::from_str(&line) {
                let _ = tx.send(v);
            }
        }
    });
    let mut next = async || {
        tokio::time::timeout(Duration::from_secs(30), rx.recv())
            .await
            .expect("python client answered")
            .unwrap()
    };

    let x509 = next().await;
    assert_eq!(x509["event"], "x509");
    assert_eq!(x509["spiffe_id"], "spiffe://example.org/py");
    let bundles = next().await;
    assert_eq!(bundles["trust_domains"][0], "example.org");
    let jwt = next().await;
    assert_eq!(
        jwt["spiffe_id"], "spiffe://example.org/py",
        "validated by the agent"
    );
    assert_eq!(jwt["audience"][0], "db");
    let jwt_bundles = next().await;
    assert_eq!(jwt_bundles["trust_domains"][0], "example.org");
    for client in ["c-core", "java"] {
        let a = next().await;
        assert_eq!(a["event"], "authority", "{a}");
        assert_eq!(a["client"], client);
        assert_eq!(
            a["spiffe_id"], "spiffe://example.org/py",
            "served despite :authority {}",
            a["authority"]
        );
    }
    let first = next().await;
    assert_eq!(first["event"], "x509_update");

    // Change the entry: the agent re-issues, and the open stream shows the new SVID.
    entry.hint = "rotated".into();
    server
        .admin()
        .await
        .unwrap()
        .update_entry(admin::UpdateEntryRequest { entry: Some(entry) })
        .await
        .unwrap();
    let update = next().await;
    assert_eq!(update["event"], "x509_update", "{update}");
    assert_ne!(
        update["serial"], first["serial"],
        "a new SVID arrived on the open stream"
    );

    child.stdin.as_mut().unwrap().write_all(b"quit\n").unwrap();
    let done = next().await;
    assert_eq!(done["event"], "done");
    assert!(child.wait().unwrap().success());
}
