//! Selectors of the workload attestors configured besides `unix` (e.g.
//! `k8s`) are merged with the unix ones; one that fails takes nothing away
//! from the others.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::MetadataExt;
use std::sync::Arc;

use crate::common::AgentTestServer as _;
use async_trait::async_trait;
use sigil_agent::workload_api::{self, WorkloadApi};
use sigil_attestors::unix::UnixAttestor;
use sigil_attestors::workload::{WorkloadAttestError, WorkloadAttestor};
use sigil_identity::{Selector, SelectorSet};
use sigil_proto::admin;
use sigil_proto::node as node_pb;
use sigil_tests::process::ServerProcess;

/// Stands in for the `k8s` attestor: this process is in namespace `shop`.
#[derive(Debug)]
struct FakePodAttestor {
    fail: bool,
}

#[async_trait]
impl WorkloadAttestor for FakePodAttestor {
    fn name(&self) -> &'static str {
        "k8s"
    }
    async fn attest(&self, pid: i32) -> Result<SelectorSet, WorkloadAttestError> {
        if self.fail {
            return Err(WorkloadAttestError::Unavailable {
                attestor: "k8s",
                reason: "kubelet unreachable".into(),
            });
        }
        assert_eq!(pid, std::process::id() as i32, "attests the caller's pid");
        // A selector of another type is ignored by the agent.
        Ok([
            Selector::parse("k8s:ns:shop").unwrap(),
            Selector::parse(&other_uid_selector()).unwrap(),
        ]
        .into_iter()
        .collect())
    }
}

async fn serve(
    fail: bool,
) -> (
    ServerProcess,
    std::path::PathBuf,
    String,
    tokio::sync::watch::Sender<bool>,
) {
    let server = crate::common::start("");
    let agent = server.start_agent().await;
    let agent_id = server.agent_id().await;
    let socket = server.dir().join("workload/api.sock");
    let listener = workload_api::bind(&socket).unwrap();
    let api = WorkloadApi::new(agent.clone(), Arc::new(UnixAttestor::default()))
        .with_workload_attestors(vec![Arc::new(FakePodAttestor { fail })]);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut a = stop_rx.clone();
    tokio::spawn(agent.run(async move {
        let _ = a.wait_for(|s| *s).await;
    }));
    let mut b = stop_rx;
    tokio::spawn(workload_api::serve(api, listener, async move {
        let _ = b.wait_for(|s| *s).await;
    }));
    (server, socket, agent_id, stop_tx)
}

async fn register(server: &ServerProcess, agent_id: &str, path: &str, selectors: &[String]) {
    let e = node_pb::Entry {
        spiffe_id: format!("spiffe://example.org/{path}"),
        parent_id: agent_id.to_owned(),
        selectors: selectors.to_vec(),
        ..Default::default()
    };
    let r = server
        .admin()
        .await
        .unwrap()
        .create_entries(admin::CreateEntriesRequest { entries: vec![e] })
        .await
        .unwrap()
        .into_inner();
    assert!(r.results[0].entry.is_some(), "{:?}", r.results[0]);
}

/// A uid this process does not have.
fn other_uid_selector() -> String {
    format!(
        "unix:uid:{}",
        std::fs::metadata("/proc/self").unwrap().uid() + 1
    )
}

fn uid_selector() -> String {
    format!(
        "unix:uid:{}",
        std::fs::metadata("/proc/self").unwrap().uid()
    )
}

async fn fetched_ids(socket: &std::path::Path) -> Vec<String> {
    let client = spiffe::WorkloadApiClient::connect_to(format!("unix:{}", socket.display()))
        .await
        .unwrap();
    // Until the first matching entry has synced the agent denies.
    let mut ctx = client.fetch_x509_context().await;
    for _ in 0..100 {
        if ctx.is_ok() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        ctx = client.fetch_x509_context().await;
    }
    let ctx = ctx.unwrap();
    let mut ids: Vec<String> = ctx
        .svids()
        .iter()
        .map(|s| s.spiffe_id().to_string())
        .collect();
    ids.sort();
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn k8s_and_unix_selectors_are_merged() {
    let (server, socket, agent_id, _stop) = serve(false).await;
    let uid = uid_selector();
    // The entries that must not match go first: the agent receives entries
    // in order, so once shop/web is served the others are known too.
    register(&server, &agent_id, "impostor", &[other_uid_selector()]).await;
    register(
        &server,
        &agent_id,
        "other/web",
        &[uid.clone(), "k8s:ns:other".into()],
    )
    .await;
    register(&server, &agent_id, "shop/web", &[uid, "k8s:ns:shop".into()]).await;
    assert_eq!(
        fetched_ids(&socket).await,
        vec!["spiffe://example.org/shop/web".to_owned()]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_attestor_adds_nothing_and_unix_still_works() {
    let (server, socket, agent_id, _stop) = serve(true).await;
    let uid = uid_selector();
    register(
        &server,
        &agent_id,
        "shop/web",
        &[uid.clone(), "k8s:ns:shop".into()],
    )
    .await;
    register(&server, &agent_id, "plain", &[uid]).await;
    assert_eq!(
        fetched_ids(&socket).await,
        vec!["spiffe://example.org/plain".to_owned()]
    );
}
