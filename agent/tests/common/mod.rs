//! A Sigil server (the library, in this process, on real sockets) for the
//! agent's tests.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use sigil_agent::config::AgentConfig;
use sigil_proto::admin::{self, admin_client::AdminClient};
use tonic::transport::Channel;

pub struct Server {
    pub dir: tempfile::TempDir,
    pub addr: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), sigil_server::server::ServerError>>>,
}

impl Server {
    pub async fn start() -> Self {
        Self::start_with("").await
    }

    /// Starts a server whose config has `extra` TOML appended.
    pub async fn start_with(extra: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "trust_domain = \"example.org\"\ndata_dir = \"{}\"\n{extra}\n",
            dir.path().join("data").display()
        );
        std::fs::write(dir.path().join("server.toml"), text).unwrap();
        let mut s = Self {
            dir,
            addr: "127.0.0.1:0".into(),
            stop: None,
            task: None,
        };
        s.launch().await;
        s
    }

    async fn launch(&mut self) {
        let node = tokio::net::TcpListener::bind(&self.addr).await.unwrap();
        self.addr = node.local_addr().unwrap().to_string();
        let admin =
            sigil_server::admin_api::bind_socket(&self.dir.path().join("admin.sock")).unwrap();
        let config = sigil_server::config::ServerConfig::load(
            Some(&self.dir.path().join("server.toml")),
            Default::default(),
        )
        .unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        self.task = Some(tokio::spawn(sigil_server::server::run(
            config,
            sigil_server::server::Listeners { node, admin },
            async {
                let _ = rx.await;
            },
        )));
        self.stop = Some(tx);
        for _ in 0..100 {
            if let Ok(mut c) = sigil_server::cli::connect(&self.dir.path().join("admin.sock")).await
                && c.health(admin::HealthRequest {}).await.is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("server did not start");
    }

    /// Stops the server and waits until it has released its data.
    pub async fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }

    /// Starts the server again on the same address and data.
    pub async fn restart(&mut self) {
        self.launch().await;
    }

    pub async fn admin(&self) -> AdminClient<Channel> {
        sigil_server::cli::connect(&self.dir.path().join("admin.sock"))
            .await
            .unwrap()
    }

    pub async fn bundle_pem(&self, path: &Path) {
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

    /// Writes the bundle file and starts an agent (data in `<dir>/agent`)
    /// with a fresh join token.
    pub async fn start_agent(&self) -> sigil_agent::session::Session {
        self.bundle_pem(&self.dir.path().join("bundle.pem")).await;
        let config = agent_config(self, &self.dir.path().join("agent"), &self.token().await);
        sigil_agent::session::Session::start(config).await.unwrap()
    }

    /// The ID of the only attested agent.
    pub async fn agent_id(&self) -> String {
        self.admin()
            .await
            .list_agents(admin::ListAgentsRequest {})
            .await
            .unwrap()
            .into_inner()
            .agents
            .remove(0)
            .id
    }

    pub async fn token(&self) -> String {
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

pub fn agent_config(server: &Server, data: &Path, token: &str) -> AgentConfig {
    AgentConfig::parse(&format!(
        "trust_domain = \"example.org\"\nserver_address = \"{}\"\ndata_dir = \"{}\"\ntrust_bundle = \"{}\"\n[node_attestor]\njoin_token = \"{token}\"\n",
        server.addr,
        data.display(),
        server.dir.path().join("bundle.pem").display()
    ))
    .unwrap()
}

pub async fn wait_for(mut f: impl FnMut() -> bool) -> bool {
    for _ in 0..200 {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    false
}

/// Raises this process's soft limit on open files to at least `want` (up
/// to the hard limit), with util-linux `prlimit`.
pub fn raise_open_file_limit(want: u64) {
    let limits = || {
        let text = std::fs::read_to_string("/proc/self/limits").unwrap();
        let line = text
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .unwrap()
            .to_owned();
        let v: Vec<u64> = line
            .split_whitespace()
            .filter_map(|w| w.parse().ok())
            .collect();
        (v[0], v[1])
    };
    let (soft, hard) = limits();
    if soft < want {
        let status = std::process::Command::new("prlimit")
            .arg("--pid")
            .arg(std::process::id().to_string())
            .arg(format!("--nofile={}:{hard}", want.min(hard)))
            .status()
            .unwrap();
        assert!(status.success(), "prlimit failed");
    }
    let (soft, _) = limits();
    assert!(
        soft >= want,
        "this test needs {want} open files; the hard limit is {hard}"
    );
}
