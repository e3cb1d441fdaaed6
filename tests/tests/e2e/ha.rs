//! High availability on PostgreSQL (issue 12): server replicas on one
//! database, real agents, a replica SIGKILLed, the database restarted.
//! Every test needs `SIGIL_POSTGRES` (see `sigil_tests::postgres`) and
//! skips without it; each uses a fresh database, and the database-restart
//! test a PostgreSQL cluster of its own.

use std::collections::{BTreeSet, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use sigil_proto::admin::{self, admin_client::AdminClient};
use sigil_proto::node as node_pb;
use sigil_tests::postgres::{self, Cluster as PgCluster};
use sigil_tests::process::{
    AgentOptions, AgentProcess, NodeAttestation, ServerOptions, ServerProcess, current_uid,
};
use sigil_tests::sim_agent::SimAgent;
use tokio_stream::StreamExt;
use tonic::transport::Channel;

use crate::common::{leaf_facts, retry, td, verify};

/// Server options for a replica on the database at `conn`.
fn on_postgres(conn: &str) -> ServerOptions {
    ServerOptions::with_extra(&postgres::datastore_toml(conn))
}

/// Two replicas, A and B, on one fresh database, each with its own data
/// directory (CA keys, server id).
struct Replicas {
    a: ServerProcess,
    b: ServerProcess,
    dir: tempfile::TempDir,
}

impl Replicas {
    fn start(db: String) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let options = on_postgres(&db);
        let a = ServerProcess::start(&dir.path().join("a"), &options).unwrap();
        let b = ServerProcess::start(&dir.path().join("b"), &options).unwrap();
        Self { a, b, dir }
    }

    fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }

    /// Waits until both replicas serve a bundle holding both replicas'
    /// X.509 CAs (each publishes its own; the other learns it from the
    /// change feed).
    async fn wait_for_union_bundle(&self) {
        for server in [&self.a, &self.b] {
            retry(Duration::from_secs(15), || async {
                let n = server
                    .bundle()
                    .await
                    .map_err(|e| e.to_string())?
                    .x509_authorities
                    .len();
                if n >= 2 {
                    Ok(())
                } else {
                    Err(format!("{n} X.509 CA(s) in the bundle"))
                }
            })
            .await
            .unwrap();
        }
    }
}

/// Starts a join-token agent (the token made on `token_from`) whose
/// `server_address` is `servers`, trusting `bundle_from`'s bundle.
fn agent(
    dir: &Path,
    token_from: &ServerProcess,
    bundle_from: &ServerProcess,
    servers: &[&ServerProcess],
) -> AgentProcess {
    let token = token_from.join_token().unwrap();
    AgentProcess::start_with_options(
        dir,
        bundle_from,
        &NodeAttestation::JoinToken(token),
        &AgentOptions {
            servers: servers.iter().map(|s| s.addr.clone()).collect(),
            ..AgentOptions::default()
        },
    )
    .unwrap()
}

fn me() -> String {
    format!("unix:uid:{}", current_uid().unwrap())
}

/// The agent ids `server` lists, waiting (10 s) until there are `n`.
async fn agent_ids(server: &ServerProcess, n: usize) -> Vec<String> {
    retry(Duration::from_secs(10), || async {
        let ids = server.agent_ids().map_err(|e| e.to_string())?;
        if ids.len() == n {
            Ok(ids)
        } else {
            Err(format!("{ids:?}"))
        }
    })
    .await
    .unwrap()
}

async fn denied(client: &spiffe::WorkloadApiClient, limit: Duration) -> bool {
    retry(limit, || async {
        match client.fetch_x509_svid().await {
            Err(spiffe::WorkloadApiError::PermissionDenied(m)) => Ok(m),
            other => Err(format!("{other:?}")),
        }
    })
    .await
    .is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_a_ban_and_a_join_token_cross_replicas() {
    let Some(pg) = postgres::connection() else {
        return;
    };
    let r = Replicas::start(postgres::fresh_database(&pg).await.unwrap());
    r.wait_for_union_bundle().await;

    // An agent on B alone, with a join token made on A.
    let agent_on_b = agent(&r.path("agent"), &r.a, &r.b, &[&r.b]);
    let agent_id = agent_ids(&r.a, 1).await.remove(0);

    // An entry created through A reaches the agent on B and its
    // workload's open stream.
    r.a.create_entry(
        "spiffe://example.org/first",
        &agent_id,
        &["--selector", &me()],
    )
    .unwrap();
    let client = spiffe::WorkloadApiClient::connect_to(agent_on_b.endpoint())
        .await
        .unwrap();
    retry(Duration::from_secs(10), || client.fetch_x509_svid())
        .await
        .unwrap();
    let mut stream = client.stream_x509_contexts().await.unwrap();
    let first = stream.next().await.unwrap().unwrap();
    assert_eq!(first.svids().len(), 1);
    let started = Instant::now();
    r.a.create_entry(
        "spiffe://example.org/second",
        &agent_id,
        &["--selector", &me()],
    )
    .unwrap();
    let acked = started.elapsed();
    let update = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let ctx = stream.next().await.unwrap().unwrap();
            if ctx.svids().len() == 2 {
                return ctx;
            }
        }
    })
    .await
    .expect("the entry made on A reached the workload of the agent on B");
    println!(
        "cross-replica: an entry created on A reached the workload stream of the agent on B {:.1} ms \
         after `entry create` started (the CLI took {:.1} ms)",
        started.elapsed().as_secs_f64() * 1e3,
        acked.as_secs_f64() * 1e3
    );
    let bundle = update.bundle_set().get(&td()).unwrap().clone();
    for svid in update.svids() {
        verify(svid, &bundle).unwrap();
    }

    // `agent ban` through A denies the agent on B at once.
    let started = Instant::now();
    r.a.cli_ok(&["agent", "ban", "--id", &agent_id]).unwrap();
    assert!(
        denied(&client, Duration::from_secs(5)).await,
        "the agent on B was denied after the ban on A"
    );
    println!(
        "cross-replica: the agent on B denied its workload {:.1} ms after `agent ban` on A started",
        started.elapsed().as_secs_f64() * 1e3
    );

    // Eight clients race one join token, four on each replica.
    let token = r.a.join_token().unwrap();
    let bundle = r.a.bundle().await.unwrap();
    let attempts: Vec<_> = (0..8)
        .map(|i| {
            let addr = if i % 2 == 0 {
                r.a.addr.clone()
            } else {
                r.b.addr.clone()
            };
            let (bundle, token) = (bundle.clone(), token.clone());
            tokio::spawn(async move { SimAgent::join_at(&addr, &bundle, &token).await })
        })
        .collect();
    let mut won = 0;
    for a in attempts {
        match a.await.unwrap() {
            Ok(_) => won += 1,
            Err(s) => assert_ne!(s.code(), tonic::Code::Ok),
        }
    }
    assert_eq!(
        won, 1,
        "exactly one of eight racing attestations used the token"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_the_replica_in_use_moves_the_agent_without_a_gap() {
    let Some(pg) = postgres::connection() else {
        return;
    };
    let mut r = Replicas::start(postgres::fresh_database(&pg).await.unwrap());
    r.wait_for_union_bundle().await;
    let agent = agent(&r.path("agent"), &r.a, &r.a, &[&r.a, &r.b]);
    let agent_id = agent_ids(&r.a, 1).await.remove(0);
    r.a.create_entry(
        "spiffe://example.org/steady",
        &agent_id,
        &["--selector", &me(), "--x509-ttl", "10s"],
    )
    .unwrap();
    let source = retry(Duration::from_secs(10), || {
        spiffe::X509Source::builder()
            .endpoint(agent.endpoint())
            .build()
    })
    .await
    .unwrap();

    // Which replica the agent streams from: the one that logged its Sync.
    let opened = |s: &ServerProcess| {
        s.log()
            .lines()
            .filter(|l| l.contains("sync stream opened") && l.contains(&agent_id))
            .count()
    };
    retry(Duration::from_secs(10), || async {
        if opened(&r.a) + opened(&r.b) > 0 {
            Ok(())
        } else {
            Err(())
        }
    })
    .await
    .unwrap();
    let on_a = opened(&r.a) > 0;
    let (used, other) = if on_a {
        (&mut r.a, &r.b)
    } else {
        (&mut r.b, &r.a)
    };
    let before_other = opened(other);
    let other_log_before = other.log().len();

    let killed = Instant::now();
    used.kill().unwrap();
    let mut moved = None;
    let mut serials = HashSet::new();
    let mut checks = 0;
    while killed.elapsed() < Duration::from_secs(20) {
        let svid = source.svid().expect("the source always holds an SVID");
        let bundle = source
            .try_bundle_for_trust_domain(&td())
            .expect("the source always holds the bundle");
        let facts = leaf_facts(&svid);
        assert!(
            facts.not_after > SystemTime::now(),
            "at {:?} after the SIGKILL the source held an expired SVID",
            killed.elapsed()
        );
        verify(&svid, &bundle)
            .unwrap_or_else(|e| panic!("at {:?} the SVID did not verify: {e}", killed.elapsed()));
        serials.insert(facts.serial);
        if moved.is_none() && opened(other) > before_other {
            moved = Some(killed.elapsed());
        }
        checks += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let moved = moved.expect("the agent opened Sync on the other replica");
    println!(
        "failover: Sync streaming from the other replica {moved:?} after the SIGKILL; \
         {checks} checks of the X509Source every 50 ms, {} SVIDs seen",
        serials.len()
    );
    assert!(moved <= Duration::from_secs(5), "failover took {moved:?}");
    assert!(
        serials.len() >= 3,
        "the 10 s SVID rotated after the failover: {serials:?}"
    );
    let log = other.log();
    assert!(
        !log[other_log_before..].contains("agent attested"),
        "no second attestation"
    );
    source.shutdown().await;
}

/// Creates entries for `parent` through `admin` one at a time until
/// `stop`; the ids of those acknowledged, and how many failed.
async fn write_entries(
    mut admin: AdminClient<Channel>,
    parent: String,
    prefix: String,
    stop: Arc<AtomicBool>,
) -> (Vec<String>, usize) {
    let (mut acked, mut failed) = (Vec::new(), 0);
    let mut i = 0;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        let entry = node_pb::Entry {
            spiffe_id: format!("spiffe://example.org/{prefix}/{i}"),
            parent_id: parent.clone(),
            selectors: vec![format!("unix:uid:{}", 10_000 + i)],
            ..Default::default()
        };
        let result = admin
            .create_entries(admin::CreateEntriesRequest {
                entries: vec![entry],
            })
            .await
            .map(|r| r.into_inner().results);
        match result.as_deref() {
            Ok([r]) if r.status.as_ref().is_none_or(|s| s.code == 0) => {
                acked.push(r.entry.as_ref().unwrap().id.clone());
            }
            _ => {
                failed += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    (acked, failed)
}

/// Starts a writer on `server` (see [`write_entries`]).
async fn writer(
    server: &ServerProcess,
    parent: &str,
    prefix: &str,
    stop: &Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(Vec<String>, usize)> {
    let admin = server.admin().await.unwrap();
    tokio::spawn(write_entries(
        admin,
        parent.to_owned(),
        prefix.to_owned(),
        stop.clone(),
    ))
}

/// The ids of the entries `server` lists.
async fn listed(server: &ServerProcess) -> BTreeSet<String> {
    server
        .admin()
        .await
        .unwrap()
        .list_entries(admin::ListEntriesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries
        .into_iter()
        .map(|e| e.id)
        .collect()
}

/// Waits (20 s) until `server` lists every entry of `want`.
async fn lists_all(server: &ServerProcess, want: &BTreeSet<String>) {
    let missing = retry(Duration::from_secs(20), || async {
        let have = listed(server).await;
        let missing: Vec<_> = want.difference(&have).cloned().collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(missing)
        }
    })
    .await;
    if let Err(missing) = missing {
        panic!("acknowledged entries lost: {missing:?}");
    }
}

/// The entry ids an in-process agent holds.
fn held(cache: &sigil_agent::cache::Cache) -> BTreeSet<String> {
    cache.entries().iter().map(|e| e.id.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_restart_during_writes_loses_no_acknowledged_write() {
    if postgres::connection().is_none() {
        return;
    }
    let cluster = PgCluster::start().unwrap();
    let db = postgres::fresh_database(&cluster.connection())
        .await
        .unwrap();
    let r = Replicas::start(db);
    r.wait_for_union_bundle().await;

    // One in-process agent on each replica, to compare what they hold.
    let mut agents = Vec::new();
    let mut ids = Vec::new();
    for (i, server) in [&r.a, &r.b].into_iter().enumerate() {
        std::fs::write(
            r.path(&format!("bundle-{i}.pem")),
            server.bundle().await.unwrap().x509_pem(),
        )
        .unwrap();
        let cfg = sigil_agent::config::AgentConfig::parse(&format!(
            "trust_domain = \"example.org\"\nserver_address = \"{}\"\ndata_dir = \"{}\"\n\
             trust_bundle = \"{}\"\n[node_attestor]\njoin_token = \"{}\"\n",
            server.addr,
            r.path(&format!("agent-{i}")).display(),
            r.path(&format!("bundle-{i}.pem")).display(),
            server.token().await.unwrap()
        ))
        .unwrap();
        let session = sigil_agent::session::Session::start(cfg).await.unwrap();
        // Each agent's own id: the server lists agents in id order, not
        // in the order they attested.
        ids.push(
            session
                .id()
                .expect("an attested agent holds its SVID")
                .to_string(),
        );
        let cache = session.cache();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(session.run(async {
            let _ = stop_rx.await;
        }));
        agents.push((cache, stop_tx, task));
    }
    assert_eq!(agent_ids(&r.a, 2).await.len(), 2);

    let stop = Arc::new(AtomicBool::new(false));
    let writers = vec![
        writer(&r.a, &ids[0], "w0", &stop).await,
        writer(&r.b, &ids[1], "w1", &stop).await,
    ];
    tokio::time::sleep(Duration::from_secs(2)).await;
    let restarted = Instant::now();
    let cluster = tokio::task::spawn_blocking(move || {
        cluster.restart_fast().unwrap();
        cluster
    })
    .await
    .unwrap();
    println!(
        "database restarted (pg_ctl restart -m fast) in {:?}",
        restarted.elapsed()
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    let mut acked = BTreeSet::new();
    for w in writers {
        let (ids, failed) = w.await.unwrap();
        println!("writer: {} acknowledged, {failed} refused", ids.len());
        assert!(!ids.is_empty());
        acked.extend(ids);
    }
    for server in [&r.a, &r.b] {
        lists_all(server, &acked).await;
    }
    // Every agent holds exactly its entries as the database has them.
    for ((cache, _, _), id) in agents.iter().zip(&ids) {
        let want: BTreeSet<String> =
            r.a.admin()
                .await
                .unwrap()
                .list_entries(admin::ListEntriesRequest {
                    parent_id: id.clone(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .entries
                .into_iter()
                .map(|e| e.id)
                .collect();
        retry(Duration::from_secs(15), || async {
            if held(cache) == want {
                Ok(())
            } else {
                Err(held(cache).len())
            }
        })
        .await
        .unwrap_or_else(|n| panic!("agent {id} holds {n} entries, the database {}", want.len()));
    }
    for (_, stop, task) in agents {
        let _ = stop.send(());
        task.await.unwrap().unwrap();
    }
    drop(r);
    drop(cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_a_server_during_writes_loses_no_acknowledged_write() {
    let Some(pg) = postgres::connection() else {
        return;
    };
    let mut r = Replicas::start(postgres::fresh_database(&pg).await.unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    // Entries need a parent, not an attested one: any agent ID will do.
    let parent = "spiffe://example.org/sigil/agent/join_token/none";
    let on_a = writer(&r.a, parent, "a", &stop).await;
    let on_b = writer(&r.b, parent, "b", &stop).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    r.a.kill().unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut acked = BTreeSet::new();
    for w in [on_a, on_b] {
        let (ids, failed) = w.await.unwrap();
        println!("writer: {} acknowledged, {failed} refused", ids.len());
        assert!(!ids.is_empty());
        acked.extend(ids);
    }
    // B holds every acknowledged write, and so does A once restarted.
    lists_all(&r.b, &acked).await;
    r.a.restart_async().await.unwrap();
    lists_all(&r.a, &acked).await;
}
