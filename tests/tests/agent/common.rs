//! Helpers of the agent suites: the agent runs in this process, against a
//! real server binary (`sigil_tests::process::ServerProcess`).
#![allow(dead_code)]

use std::path::Path;
use std::time::Duration;

use sigil_agent::config::AgentConfig;
use sigil_proto::admin;
use sigil_tests::process::ServerProcess;

/// Starts a server binary in its own temporary directory with `extra` TOML.
pub fn start(extra: &str) -> ServerProcess {
    ServerProcess::start_temp(extra).unwrap()
}

/// What the agent suites do with a running server.
pub trait AgentTestServer {
    /// Writes the bundle as PEM to `path`.
    async fn bundle_pem(&self, path: &Path);
    /// Writes the bundle file and starts an in-process agent (data in
    /// `<dir>/agent`) with a fresh join token.
    async fn start_agent(&self) -> sigil_agent::session::Session;
    /// The ID of the only attested agent.
    async fn agent_id(&self) -> String;
}

impl AgentTestServer for ServerProcess {
    async fn bundle_pem(&self, path: &Path) {
        std::fs::write(path, self.bundle().await.unwrap().x509_pem()).unwrap();
    }

    async fn start_agent(&self) -> sigil_agent::session::Session {
        self.bundle_pem(&self.dir().join("bundle.pem")).await;
        let config = agent_config(
            self,
            &self.dir().join("agent"),
            &self.token().await.unwrap(),
        );
        sigil_agent::session::Session::start(config).await.unwrap()
    }

    async fn agent_id(&self) -> String {
        self.admin()
            .await
            .unwrap()
            .list_agents(admin::ListAgentsRequest {})
            .await
            .unwrap()
            .into_inner()
            .agents
            .remove(0)
            .id
    }
}

/// An agent config for `server` (trusting `<dir>/bundle.pem`, see
/// [`AgentTestServer::bundle_pem`]) with data in `data`.
pub fn agent_config(server: &ServerProcess, data: &Path, token: &str) -> AgentConfig {
    AgentConfig::parse(&format!(
        "trust_domain = \"example.org\"\nserver_address = \"{}\"\ndata_dir = \"{}\"\ntrust_bundle = \"{}\"\n[node_attestor]\njoin_token = \"{token}\"\n",
        server.addr,
        data.display(),
        server.dir().join("bundle.pem").display()
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
