//! The agent core against a real server (the server library, in this
//! process, on real sockets): attestation, entries arriving and leaving,
//! restart without re-attestation.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use sigil_agent::config::AgentConfig;
use sigil_agent::manager::Agent;
use sigil_proto::admin::{self, admin_client::AdminClient};
use sigil_proto::node as node_pb;
use tonic::transport::Channel;

struct Server {
    dir: tempfile::TempDir,
    addr: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Server {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let node = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = node.local_addr().unwrap().to_string();
        let admin = sigil_server::admin_api::bind_socket(&dir.path().join("admin.sock")).unwrap();
        let text = format!(
            "trust_domain = \"example.org\"\ndata_dir = \"{}\"\n",
            dir.path().join("data").display()
        );
        std::fs::write(dir.path().join("server.toml"), text).unwrap();
        let config = sigil_server::config::ServerConfig::load(
            Some(&dir.path().join("server.toml")),
            Default::default(),
        )
        .unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(sigil_server::server::run(
            config,
            sigil_server::server::Listeners { node, admin },
            async {
                let _ = rx.await;
            },
        ));
        let s = Self {
            dir,
            addr,
            stop: Some(tx),
        };
        for _ in 0..100 {
            if let Ok(mut c) = sigil_server::cli::connect(&s.dir.path().join("admin.sock")).await
                && c.health(admin::HealthRequest {}).await.is_ok()
            {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("server did not start");
    }

    async fn admin(&self) -> AdminClient<Channel> {
        sigil_server::cli::connect(&self.dir.path().join("admin.sock"))
            .await
            .unwrap()
    }

    async fn bundle_pem(&self, path: &Path) {
        let b = self
            .admin()
            .await
            .get_bundle(admin::GetBundleRequest {})
            .await
            .unwrap()
            .into_inner();
        let b = sigil_identity::Bundle::try_from(&b).unwrap();
        std::fs::write(path, b.x509_pem()).unwrap();
    }

    async fn token(&self) -> String {
        self.admin()
            .await
            .create_join_token(admin::CreateJoinTokenRequest::default())
            .await
            .unwrap()
            .into_inner()
            .token
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

fn agent_config(server: &Server, data: &Path, token: &str) -> AgentConfig {
    AgentConfig::parse(&format!(
        "trust_domain = \"example.org\"\nserver_address = \"{}\"\ndata_dir = \"{}\"\ntrust_bundle = \"{}\"\n[node_attestor]\njoin_token = \"{token}\"\n",
        server.addr,
        data.display(),
        server.dir.path().join("bundle.pem").display()
    ))
    .unwrap()
}

async fn wait_for(mut f: impl FnMut() -> bool) -> bool {
    for _ in 0..200 {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_attests_receives_svids_and_restarts_without_reattesting() {
    let server = Server::start().await;
    server
        .bundle_pem(&server.dir.path().join("bundle.pem"))
        .await;
    let data = server.dir.path().join("agent");
    let token = server.token().await;
    let agent = Agent::start(agent_config(&server, &data, &token))
        .await
        .unwrap();
    let cache = agent.cache();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(agent.run(async {
        let _ = stop_rx.await;
    }));

    let agents = server
        .admin()
        .await
        .list_agents(admin::ListAgentsRequest {})
        .await
        .unwrap()
        .into_inner()
        .agents;
    assert_eq!(agents.len(), 1);
    let agent_id = agents[0].id.clone();
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(data.join("agent.key"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "the agent key is stored 0600");

    let entry = node_pb::Entry {
        spiffe_id: "spiffe://example.org/web".into(),
        parent_id: agent_id.clone(),
        selectors: vec!["unix:uid:1000".into()],
        ..Default::default()
    };
    let created = server
        .admin()
        .await
        .create_entries(admin::CreateEntriesRequest {
            entries: vec![entry],
        })
        .await
        .unwrap();
    let entry_id = created.into_inner().results[0]
        .entry
        .as_ref()
        .unwrap()
        .id
        .clone();
    assert!(
        wait_for(|| cache.svids().len() == 1).await,
        "the new entry's SVID arrives"
    );
    let svid = cache.svids().remove(0);
    assert_eq!(svid.entry.spiffe_id.as_str(), "spiffe://example.org/web");
    let bundle = cache.bundle().unwrap();
    sigil_identity::x509::verify_svid(&svid.chain, &bundle, std::time::SystemTime::now()).unwrap();

    server
        .admin()
        .await
        .delete_entries(admin::DeleteEntriesRequest {
            ids: vec![entry_id],
        })
        .await
        .unwrap();
    assert!(
        wait_for(|| cache.svids().is_empty()).await,
        "a deleted entry's SVID is dropped"
    );

    let _ = stop_tx.send(());
    run.await.unwrap().unwrap();

    // The token is spent: starting again works only because the agent
    // uses its stored SVID instead of attesting.
    let again = Agent::start(agent_config(&server, &data, &token))
        .await
        .unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let cache = again.cache();
    let run = tokio::spawn(again.run(async {
        let _ = stop_rx.await;
    }));
    assert!(
        wait_for(|| cache.bundle().is_some()).await,
        "the restarted agent syncs with its stored SVID"
    );
    let agents = server
        .admin()
        .await
        .list_agents(admin::ListAgentsRequest {})
        .await
        .unwrap()
        .into_inner()
        .agents;
    assert_eq!(agents.len(), 1, "no second attestation");
    let _ = stop_tx.send(());
    run.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_banned_agent_stops() {
    let server = Server::start().await;
    server
        .bundle_pem(&server.dir.path().join("bundle.pem"))
        .await;
    let data = server.dir.path().join("agent");
    let agent = Agent::start(agent_config(&server, &data, &server.token().await))
        .await
        .unwrap();
    let cache = agent.cache();
    let run = tokio::spawn(agent.run(std::future::pending()));
    assert!(wait_for(|| cache.bundle().is_some()).await);
    let id = server
        .admin()
        .await
        .list_agents(admin::ListAgentsRequest {})
        .await
        .unwrap()
        .into_inner()
        .agents[0]
        .id
        .clone();
    server
        .admin()
        .await
        .ban_agent(admin::AgentRequest { id })
        .await
        .unwrap();
    let result = tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(result, Err(sigil_agent::manager::AgentError::Revoked(_))),
        "{result:?}"
    );
}
