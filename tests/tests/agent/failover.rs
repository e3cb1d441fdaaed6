//! Agent failover (issue 12 item 5): `server_address` as a list or a name
//! resolving to several addresses, and an agent whose server goes away
//! moving to another with its identity, resuming Sync from its revision,
//! while its cached SVIDs keep being served and rotation goes on. The
//! "other server" is the same server restarted on another port with the
//! same data (what a replica sharing the datastore looks like to an agent).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::common::{AgentTestServer as _, wait_for};
use sigil_agent::config::AgentConfig;
use sigil_agent::servers::{Resolve, Resolving};
use sigil_agent::session::Session;
use sigil_proto::admin;
use sigil_proto::node as node_pb;
use sigil_tests::process::{ServerProcess, free_port};

/// A port where nothing listens.
fn dead_address() -> String {
    format!("127.0.0.1:{}", free_port().unwrap())
}

/// An agent config trusting `server`'s bundle file, with data in `data`
/// and `server_address = <value>` (TOML).
fn config_with_servers(
    server: &ServerProcess,
    data: &std::path::Path,
    token: &str,
    value: &str,
) -> AgentConfig {
    AgentConfig::parse(&format!(
        "trust_domain = \"example.org\"\nserver_address = {value}\ndata_dir = \"{}\"\ntrust_bundle = \"{}\"\n[node_attestor]\njoin_token = \"{token}\"\n",
        data.display(),
        server.dir().join("bundle.pem").display()
    ))
    .unwrap()
}

/// Runs `session` until the returned sender is dropped or sent to.
fn run(
    session: Session,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        session
            .run(async {
                let _ = stop_rx.await;
            })
            .await
            .unwrap();
    });
    (stop_tx, task)
}

fn metrics_text(session: &Session) -> String {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &session.metrics().registry()).unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_with_a_dead_address_connects_to_the_live_one() {
    let server = crate::common::start("");
    server.bundle_pem(&server.dir().join("bundle.pem")).await;
    let live: SocketAddr = server.addr.parse().unwrap();
    // The first server is picked at random: a few agents, so the dead one
    // comes first for some.
    for i in 0..3 {
        let value = format!("[\"{}\", \"{}\"]", dead_address(), server.addr);
        let token = server.token().await.unwrap();
        let data = server.dir().join(format!("agent-{i}"));
        let session = Session::start(config_with_servers(&server, &data, &token, &value))
            .await
            .unwrap();
        assert_eq!(session.server(), Some(live), "attested on the live server");
        let cache = session.cache();
        let (stop, task) = run(session);
        assert!(
            wait_for(|| cache.bundle().is_some()).await,
            "the agent syncs from the live server"
        );
        let _ = stop.send(());
        task.await.unwrap();
    }
}

/// Resolves one name to fixed addresses (as DNS would for a name with
/// several A records); other names fail.
#[derive(Debug)]
struct Names(HashMap<String, Vec<SocketAddr>>);

impl Resolve for Names {
    fn resolve<'a>(&'a self, address: &'a str) -> Resolving<'a> {
        let found = self.0.get(address).cloned();
        Box::pin(async move {
            found.ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no such name"))
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_resolving_to_two_addresses_is_tried_in_turn() {
    let server = crate::common::start("");
    server.bundle_pem(&server.dir().join("bundle.pem")).await;
    let live: SocketAddr = server.addr.parse().unwrap();
    let dead: SocketAddr = dead_address().parse().unwrap();
    for (i, order) in [[dead, live], [live, dead]].into_iter().enumerate() {
        let token = server.token().await.unwrap();
        let data = server.dir().join(format!("agent-{i}"));
        let mut cfg = config_with_servers(&server, &data, &token, "\"sigil-servers.test:8081\"");
        cfg.resolver = std::sync::Arc::new(Names(HashMap::from([(
            "sigil-servers.test:8081".to_owned(),
            order.to_vec(),
        )])));
        let session = Session::start(cfg).await.unwrap();
        assert_eq!(session.server(), Some(live));
        let cache = session.cache();
        let (stop, task) = run(session);
        assert!(wait_for(|| cache.bundle().is_some()).await, "synced");
        let _ = stop.send(());
        task.await.unwrap();
    }
}

/// Lines of `log` holding every one of `parts`.
fn lines_with<'a>(log: &'a str, parts: &[&str]) -> Vec<&'a str> {
    log.lines()
        .filter(|l| parts.iter().all(|p| l.contains(p)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_keeps_the_identity_resumes_sync_and_serves_without_a_gap() {
    let mut server = crate::common::start("");
    server.bundle_pem(&server.dir().join("bundle.pem")).await;
    let first: SocketAddr = server.addr.parse().unwrap();
    let other_port = free_port().unwrap();
    let other: SocketAddr = format!("127.0.0.1:{other_port}").parse().unwrap();
    let token = server.token().await.unwrap();
    let value = format!("[\"{first}\", \"{other}\"]");
    let session = Session::start(config_with_servers(
        &server,
        &server.dir().join("agent"),
        &token,
        &value,
    ))
    .await
    .unwrap();
    assert_eq!(
        session.server(),
        Some(first),
        "nothing listens on the other yet"
    );
    let cache = session.cache();
    let probe = session.clone();
    let (stop, task) = run(session);
    let agent_id = server.agent_id().await;

    // A 10 s SVID: rotated at about half-life, so rotation after the
    // failover is seen within the test.
    let entry = |path: &str| node_pb::Entry {
        spiffe_id: format!("spiffe://example.org/{path}"),
        parent_id: agent_id.clone(),
        selectors: vec![format!("unix:uid:{path}")],
        x509_svid_ttl: 10,
        ..Default::default()
    };
    server
        .admin()
        .await
        .unwrap()
        .create_entries(admin::CreateEntriesRequest {
            entries: vec![entry("1000")],
        })
        .await
        .unwrap();
    assert!(wait_for(|| cache.svids().len() == 1).await, "SVID issued");
    let log_before = server.log().len();

    // Kill the server; it comes back as "the other server". Meanwhile the
    // cached SVID is served (checked every 50 ms, as a workload's source).
    let watching = {
        let cache = cache.clone();
        tokio::spawn(async move {
            let start = Instant::now();
            let mut serials = std::collections::HashSet::new();
            while start.elapsed() < Duration::from_secs(14) {
                let svids = cache.svids();
                let held = svids
                    .iter()
                    .find(|s| s.entry.spiffe_id.as_str() == "spiffe://example.org/1000")
                    .unwrap_or_else(|| panic!("at {:?} the SVID was not held", start.elapsed()));
                let leaf = sigil_identity::x509::parse(&held.chain[0]).unwrap();
                let (_, not_after) = sigil_identity::x509::validity(&leaf);
                assert!(
                    not_after > std::time::SystemTime::now(),
                    "at {:?} the held SVID had expired",
                    start.elapsed()
                );
                serials.insert(held.chain[0].clone());
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            serials.len()
        })
    };
    let killed = Instant::now();
    server.restart_on_port_async(other_port).await.unwrap();
    assert!(
        wait_for_long(|| probe.server() == Some(other)).await,
        "the agent moved to the other server"
    );
    println!(
        "failover: {:?} from SIGKILL, through the restart on another port, to the agent connected there",
        killed.elapsed()
    );

    // Sync resumed: an entry created there arrives.
    server
        .admin()
        .await
        .unwrap()
        .create_entries(admin::CreateEntriesRequest {
            entries: vec![entry("1001")],
        })
        .await
        .unwrap();
    assert!(
        wait_for_long(|| cache.svids().len() == 2).await,
        "an entry created after the failover reaches the agent"
    );
    // Rotation went on through the failover: the 10 s SVID was renewed.
    let distinct = watching.await.unwrap();
    assert!(
        distinct >= 2,
        "the first SVID rotated after the failover ({distinct} seen)"
    );

    let log = server.log();
    let after = &log[log_before..];
    assert!(
        lines_with(after, &["agent attested"]).is_empty(),
        "no second attestation:\n{after}"
    );
    let resumed = lines_with(after, &["sync stream opened", &agent_id]);
    assert!(!resumed.is_empty(), "the agent opened Sync there:\n{after}");
    for line in &resumed {
        assert!(
            !line.contains("since=0") && line.contains("full=false"),
            "Sync resumed from the agent's revision, without a snapshot: {line}"
        );
    }
    assert_eq!(
        server.agent_ids().unwrap(),
        vec![agent_id.clone()],
        "one agent, same id"
    );
    let metrics = metrics_text(&probe);
    assert!(
        metrics.contains("sigil_agent_server_failovers_total 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!("sigil_agent_server{{address=\"{other}\"}} 1")),
        "{metrics}"
    );
    let _ = stop.send(());
    task.await.unwrap();
}

/// [`wait_for`] up to 15 s.
async fn wait_for_long(mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    false
}
