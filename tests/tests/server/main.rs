//! Server suites: the real `sigil-server` binary in a temporary directory
//! (`sigil_tests::process::ServerProcess`), driven through its CLI, admin
//! API and node API; simulated agents use the agent's own node API client
//! (`sigil_tests::sim_agent::SimAgent`).
//!
//! One test binary, so the suites link once and run in parallel.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cli;
mod durability;
mod hardening;
mod node_api;
mod postgres;
mod regcode;

use rcgen::{CertificateParams, KeyPair};
use sigil_proto::node::{self as pb, node_client::NodeClient};
use sigil_tests::process::ServerProcess;
use sigil_tests::sim_agent::SimAgent;
use tonic::Status;
use tonic::transport::Channel;

/// Starts a server in its own temporary directory with `extra` TOML.
pub fn start(extra: &str) -> ServerProcess {
    ServerProcess::start_temp(extra).unwrap()
}

/// A DER PKCS#10 CSR for `key`.
pub fn csr(key: &KeyPair) -> Vec<u8> {
    CertificateParams::default()
        .serialize_request(key)
        .unwrap()
        .der()
        .to_vec()
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

/// Test conveniences on a running server.
trait TestServerExt {
    /// A node API TLS config trusting the server, presenting `agent`'s SVID.
    async fn tls(&self, agent: Option<&SimAgent>) -> std::sync::Arc<rustls::ClientConfig>;
    /// Creates an entry through the admin API (asserting success).
    async fn entry(
        &self,
        spiffe_id: &str,
        parent: &sigil_identity::SpiffeId,
        selectors: &[&str],
    ) -> pb::Entry;
}

impl TestServerExt for ServerProcess {
    async fn tls(&self, agent: Option<&SimAgent>) -> std::sync::Arc<rustls::ClientConfig> {
        self.node_tls(agent.map(|a| (a.chain.as_slice(), a.key.as_slice())))
            .await
            .unwrap()
    }

    async fn entry(
        &self,
        spiffe_id: &str,
        parent: &sigil_identity::SpiffeId,
        selectors: &[&str],
    ) -> pb::Entry {
        let e = pb::Entry {
            spiffe_id: spiffe_id.into(),
            parent_id: parent.to_string(),
            selectors: selectors.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        let r = self
            .admin()
            .await
            .unwrap()
            .create_entries(sigil_proto::admin::CreateEntriesRequest { entries: vec![e] })
            .await
            .unwrap();
        let r = r.into_inner().results.remove(0);
        assert_eq!(r.status.as_ref().unwrap().code, 0, "{:?}", r.status);
        r.entry.unwrap()
    }
}
