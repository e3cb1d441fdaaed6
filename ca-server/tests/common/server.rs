//! A real `sigil-server` process in a temporary directory, and a simulated
//! agent that talks to it over the real node API.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{CertificateParams, KeyPair};
use sigil_identity::tls::{
    SharedBundle, SpiffeServerVerifier, SvidResolver, authorize_id, certified_key, client_config,
};
use sigil_identity::{Bundle, SpiffeId, TrustDomain};
use sigil_proto::admin::admin_client::AdminClient;
use sigil_proto::node::{self as pb, node_client::NodeClient};
use tonic::Status;
use tonic::transport::Channel;

pub const BIN: &str = env!("CARGO_BIN_EXE_sigil-server");

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct TestServer {
    pub dir: tempfile::TempDir,
    child: Option<Child>,
    pub admin: PathBuf,
    pub addr: String,
    pub config: PathBuf,
}

impl TestServer {
    /// Starts a server whose config is the defaults for a test plus `extra`
    /// (TOML appended at the end).
    pub async fn start(extra: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let admin = dir.path().join("admin.sock");
        let addr = format!("127.0.0.1:{}", free_port());
        let config = dir.path().join("server.toml");
        let text = format!(
            "trust_domain = \"example.org\"\ndata_dir = \"{}\"\n[server]\nbind_address = \"{addr}\"\nadmin_socket = \"{}\"\n[log]\nlevel = \"info\"\n{extra}\n",
            dir.path().join("data").display(),
            admin.display()
        );
        std::fs::write(&config, text).unwrap();
        let mut s = Self {
            dir,
            child: None,
            admin,
            addr,
            config,
        };
        s.spawn().await;
        s
    }

    /// The server's pid while it runs.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("server running").id()
    }

    /// A rustls client config trusting this server's bundle, presenting
    /// `client` if given.
    pub async fn tls(&self, client: Option<&TestAgent>) -> Arc<rustls::ClientConfig> {
        let bundle = Arc::new(SharedBundle::new(self.bundle().await));
        let server = SpiffeId::server(&TrustDomain::new("example.org").unwrap());
        let verifier = Arc::new(SpiffeServerVerifier::new(bundle, authorize_id(server)));
        let resolver = client.map(|a| {
            Arc::new(SvidResolver::new(
                certified_key(&a.chain, &a.key.serialize_der()).unwrap(),
            ))
        });
        Arc::new(client_config(verifier, resolver).unwrap())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    async fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("server.log"))
            .unwrap();
        let child = Command::new(BIN)
            .args(["run", "--config"])
            .arg(&self.config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        for _ in 0..200 {
            if let Ok(Some(status)) = self.child.as_mut().unwrap().try_wait() {
                panic!("server exited early ({status}):\n{}", self.log());
            }
            if let Ok(mut c) = sigil_server::admin_client::connect(&self.admin).await
                && c.health(sigil_proto::admin::HealthRequest {}).await.is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("server did not become healthy:\n{}", self.log());
    }

    /// Stops the server with SIGTERM and waits for it (at most 10 s).
    pub async fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("server running");
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        for _ in 0..200 {
            if let Ok(Some(status)) = child.try_wait() {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        child.kill().ok();
        panic!(
            "server did not stop within 10 s of SIGTERM:\n{}",
            self.log()
        );
    }

    /// Kills the server with SIGKILL (a crash) and reaps it.
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("server running");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// Starts the server again on the same data.
    pub async fn restart(&mut self) {
        if self.child.is_some() {
            self.stop().await;
        }
        self.spawn().await;
    }

    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(BIN)
            .arg("--admin-socket")
            .arg(&self.admin)
            .args(args)
            .output()
            .unwrap()
    }

    pub async fn admin(&self) -> AdminClient<Channel> {
        sigil_server::admin_client::connect(&self.admin)
            .await
            .unwrap()
    }

    pub async fn bundle(&self) -> Bundle {
        let b = self
            .admin()
            .await
            .get_bundle(sigil_proto::admin::GetBundleRequest {})
            .await
            .unwrap()
            .into_inner();
        Bundle::try_from(&b).unwrap()
    }

    pub async fn token(&self) -> String {
        let r = self
            .admin()
            .await
            .create_join_token(sigil_proto::admin::CreateJoinTokenRequest::default())
            .await
            .unwrap();
        r.into_inner().token
    }

    /// A node API client with no client certificate (for Attest).
    pub async fn anonymous(&self) -> NodeClient<Channel> {
        let bundle = Arc::new(SharedBundle::new(self.bundle().await));
        let server = SpiffeId::server(&TrustDomain::new("example.org").unwrap());
        let verifier = Arc::new(SpiffeServerVerifier::new(bundle, authorize_id(server)));
        let cfg = Arc::new(client_config(verifier, None).unwrap());
        NodeClient::new(
            sigil_proto::channel::node_channel(&self.addr, cfg)
                .await
                .unwrap(),
        )
    }

    /// Creates an entry through the admin API.
    pub async fn entry(&self, spiffe_id: &str, parent: &SpiffeId, selectors: &[&str]) -> pb::Entry {
        let e = pb::Entry {
            spiffe_id: spiffe_id.into(),
            parent_id: parent.to_string(),
            selectors: selectors.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        let r = self
            .admin()
            .await
            .create_entries(sigil_proto::admin::CreateEntriesRequest { entries: vec![e] })
            .await
            .unwrap();
        let r = r.into_inner().results.remove(0);
        assert_eq!(r.status.as_ref().unwrap().code, 0, "{:?}", r.status);
        r.entry.unwrap()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().ok();
            c.wait().ok();
        }
    }
}

pub fn csr(key: &KeyPair) -> Vec<u8> {
    CertificateParams::default()
        .serialize_request(key)
        .unwrap()
        .der()
        .to_vec()
}

/// A simulated agent: its key, SVID and a client presenting that SVID.
pub struct TestAgent {
    pub id: SpiffeId,
    pub key: KeyPair,
    pub chain: Vec<Vec<u8>>,
    pub serial: String,
}

impl TestAgent {
    /// Attests with `attestor`/`evidence`, answering challenges with `respond`.
    pub async fn attest(
        server: &TestServer,
        attestor: &str,
        evidence: Vec<u8>,
        respond: impl Fn(&[u8]) -> Vec<u8>,
    ) -> Result<TestAgent, Status> {
        let key = KeyPair::generate().unwrap();
        let mut client = server.anonymous().await;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let params = pb::AttestParams {
            attestor: attestor.into(),
            evidence,
            csr: csr(&key),
        };
        tx.send(pb::AttestRequest {
            step: Some(pb::attest_request::Step::Params(params)),
        })
        .await
        .unwrap();
        let mut inbound = client
            .attest(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?
            .into_inner();
        loop {
            let msg = inbound
                .message()
                .await?
                .ok_or_else(|| Status::internal("stream ended"))?;
            match msg.step {
                Some(pb::attest_response::Step::Challenge(c)) => {
                    let r = respond(&c);
                    tx.send(pb::AttestRequest {
                        step: Some(pb::attest_request::Step::ChallengeResponse(r)),
                    })
                    .await
                    .unwrap();
                }
                Some(pb::attest_response::Step::Result(r)) => {
                    let svid = r.svid.unwrap();
                    return Ok(TestAgent {
                        id: SpiffeId::parse(&svid.spiffe_id).unwrap(),
                        key,
                        chain: svid.cert_chain,
                        serial: svid.serial,
                    });
                }
                None => return Err(Status::internal("empty attest response")),
            }
        }
    }

    pub async fn join(server: &TestServer, token: &str) -> Result<TestAgent, Status> {
        Self::attest(server, "join_token", token.as_bytes().to_vec(), |_| vec![]).await
    }

    /// A node API client presenting this agent's current SVID.
    pub async fn client(&self, server: &TestServer) -> NodeClient<Channel> {
        let bundle = Arc::new(SharedBundle::new(server.bundle().await));
        let id = SpiffeId::server(&TrustDomain::new("example.org").unwrap());
        let verifier = Arc::new(SpiffeServerVerifier::new(bundle, authorize_id(id)));
        let resolver = Arc::new(SvidResolver::new(
            certified_key(&self.chain, &self.key.serialize_der()).unwrap(),
        ));
        let cfg = Arc::new(client_config(verifier, Some(resolver)).unwrap());
        NodeClient::new(
            sigil_proto::channel::node_channel(&server.addr, cfg)
                .await
                .unwrap(),
        )
    }

    /// Renews through `client`, returning the new SVID as a new agent value.
    pub async fn renew(&self, client: &mut NodeClient<Channel>) -> Result<TestAgent, Status> {
        let key = KeyPair::generate().unwrap();
        let svid = client
            .renew_agent(pb::RenewAgentRequest { csr: csr(&key) })
            .await?
            .into_inner()
            .svid
            .unwrap();
        Ok(TestAgent {
            id: self.id.clone(),
            key,
            chain: svid.cert_chain,
            serial: svid.serial,
        })
    }
}

/// Calls every authenticated node API method once and returns their
/// outcomes by name.
pub async fn every_call(
    client: &mut NodeClient<Channel>,
    entry_id: &str,
) -> Vec<(&'static str, Result<(), Status>)> {
    let key = KeyPair::generate().unwrap();
    vec![
        (
            "RenewAgent",
            client
                .renew_agent(pb::RenewAgentRequest { csr: csr(&key) })
                .await
                .map(|_| ()),
        ),
        (
            "Sync",
            client
                .sync(pb::SyncRequest { since_revision: 0 })
                .await
                .map(|_| ()),
        ),
        (
            "BatchNewX509Svid",
            client
                .batch_new_x509_svid(pb::BatchNewX509SvidRequest {
                    params: vec![pb::SvidParams {
                        entry_id: entry_id.into(),
                        csr: csr(&key),
                    }],
                })
                .await
                .map(|_| ()),
        ),
        (
            "NewJwtSvid",
            client
                .new_jwt_svid(pb::NewJwtSvidRequest {
                    entry_id: entry_id.into(),
                    audience: vec!["a".into()],
                })
                .await
                .map(|_| ()),
        ),
        (
            "FetchBundle",
            client
                .fetch_bundle(pb::FetchBundleRequest {})
                .await
                .map(|_| ()),
        ),
    ]
}

/// Asserts every call failed with `code`.
pub fn assert_all(results: &[(&'static str, Result<(), Status>)], code: tonic::Code) {
    for (name, r) in results {
        match r {
            Err(s) => assert_eq!(s.code(), code, "{name}: {s:?}"),
            Ok(()) => panic!("{name} succeeded but should fail with {code:?}"),
        }
    }
}

/// Asserts every refusal does (or does not) mark the agent revoked.
pub fn assert_revoked(results: &[(&'static str, Result<(), Status>)], revoked: bool) {
    for (name, r) in results {
        let marked = r
            .as_ref()
            .err()
            .is_some_and(|s| s.metadata().contains_key(sigil_proto::REVOKED_METADATA));
        assert_eq!(marked, revoked, "{name}: {r:?}");
    }
}
