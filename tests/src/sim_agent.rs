//! A node agent simulated in this process, for node API tests and the
//! benchmark harness.
//!
//! It speaks the node API with the agent's own client code
//! ([`sigil_agent::node`]): attestation, and connections that present the
//! agent SVID and verify the server's. Only what a real agent keeps on disk
//! and runs in its loop (Sync, the cache, the Workload API) is left out.

use std::sync::Arc;

use sigil_agent::node::{self, Bootstrap, Connection, NodeError};
use sigil_agent::servers::{ServerAddresses, Servers, SystemResolver};
use sigil_attestors::join_token::JoinTokenAgent;
use sigil_identity::attestation::AgentNodeAttestor;
use sigil_identity::tls::{SharedBundle, SpiffeServerVerifier, SvidResolver, authorize_id};
use sigil_identity::{Bundle, SpiffeId};
use sigil_proto::node::{self as pb, node_client::NodeClient};
use tonic::Status;
use tonic::transport::Channel;

use crate::process::ServerProcess;

/// An attested agent: its SPIFFE ID, key, SVID chain and the bundle it
/// trusts.
#[derive(Clone)]
pub struct SimAgent {
    pub id: SpiffeId,
    /// PKCS#8 DER of the agent key.
    pub key: Vec<u8>,
    /// The agent SVID chain, DER, leaf first.
    pub chain: Vec<Vec<u8>>,
    /// The agent SVID's serial number (hex, as the server reports it).
    pub serial: String,
    /// The trust bundle the agent verifies the server with.
    pub bundle: Bundle,
}

// Written out so that the key never reaches a test's output.
impl std::fmt::Debug for SimAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimAgent")
            .field("id", &self.id)
            .field("serial", &self.serial)
            .finish_non_exhaustive()
    }
}

/// A node API error as the server's status: a refusal as sent, anything
/// else (connection, TLS, a bad reply) as `Unavailable` with its text.
fn status(e: NodeError) -> Status {
    match e {
        NodeError::Refused(s) => s,
        other => Status::unavailable(other.to_string()),
    }
}

/// The one server at `addr`, as the agent dials it.
fn one_server(addr: &str) -> Result<Arc<Servers>, Status> {
    let addresses =
        ServerAddresses::new(vec![addr.to_owned()]).map_err(Status::invalid_argument)?;
    Ok(Arc::new(Servers::new(
        addresses,
        Arc::new(SystemResolver),
        Arc::default(),
    )))
}

impl SimAgent {
    /// Attests to the server at `addr`, trusting `bundle`, with `attestor`
    /// (answering its challenges), exactly as `sigil-agent` does.
    pub async fn attest_at(
        addr: &str,
        bundle: &Bundle,
        attestor: &dyn AgentNodeAttestor,
    ) -> Result<Self, Status> {
        let state = node::attest(
            &one_server(addr)?,
            &bundle.trust_domain,
            &Bootstrap::Bundle(bundle.clone()),
            attestor,
        )
        .await
        .map_err(status)?;
        Self::from_chain(state.key.to_vec(), state.chain, state.bundle)
    }

    /// Attests to the server at `addr`, trusting `bundle`, with a join
    /// token.
    pub async fn join_at(addr: &str, bundle: &Bundle, token: &str) -> Result<Self, Status> {
        Self::attest_at(addr, bundle, &JoinTokenAgent::new(token)).await
    }

    /// An agent value for a chain and key obtained elsewhere (e.g. a
    /// forged certificate in a test).
    pub fn from_chain(key: Vec<u8>, chain: Vec<Vec<u8>>, bundle: Bundle) -> Result<Self, Status> {
        let leaf_der = chain
            .first()
            .ok_or_else(|| Status::internal("empty SVID chain"))?;
        let leaf = sigil_identity::x509::parse(leaf_der)
            .map_err(|e| Status::internal(format!("unparsable agent SVID: {e}")))?;
        let id = sigil_identity::x509::check_leaf(&leaf)
            .map_err(|e| Status::internal(format!("agent SVID without a SPIFFE ID: {e}")))?;
        Ok(Self {
            id,
            serial: sigil_identity::x509::serial_hex(&leaf),
            key,
            chain,
            bundle,
        })
    }

    /// Attests to `server` with `attestor`, trusting its current bundle.
    pub async fn attest(
        server: &ServerProcess,
        attestor: &dyn AgentNodeAttestor,
    ) -> Result<Self, Status> {
        let bundle = server
            .bundle()
            .await
            .map_err(|e| Status::unavailable(format!("{e:#}")))?;
        Self::attest_at(&server.addr, &bundle, attestor).await
    }

    /// Attests to `server` with a join token.
    pub async fn join(server: &ServerProcess, token: &str) -> Result<Self, Status> {
        Self::attest(server, &JoinTokenAgent::new(token)).await
    }

    /// A node API client at `addr` presenting this agent's SVID, on its
    /// own connection.
    pub async fn client_at(&self, addr: &str) -> Result<NodeClient<Channel>, Status> {
        let resolver = Arc::new(SvidResolver::new(
            node::agent_key(&sigil_agent::store::AgentState {
                key: self.key.clone().into(),
                chain: self.chain.clone(),
                bundle: self.bundle.clone(),
            })
            .map_err(status)?,
        ));
        let conn = Connection::open(
            &one_server(addr)?,
            &self.bundle.trust_domain,
            Arc::new(SharedBundle::new(self.bundle.clone())),
            resolver,
        )
        .await
        .map_err(status)?;
        Ok(conn.client)
    }

    /// A node API client at `addr` presenting this agent's SVID, on its
    /// own connection from the local address `source` (e.g. `127.0.0.2`):
    /// spreading many connections over several source addresses keeps
    /// them within each address's range of ephemeral ports.
    pub async fn client_from(
        &self,
        addr: &str,
        source: std::net::IpAddr,
    ) -> Result<NodeClient<Channel>, Status> {
        let target: std::net::SocketAddr = addr
            .parse()
            .map_err(|e| Status::invalid_argument(format!("bad server address {addr:?}: {e}")))?;
        let resolver = Arc::new(SvidResolver::new(
            sigil_identity::tls::certified_key(&self.chain, &self.key)
                .map_err(|e| Status::internal(format!("bad agent SVID: {e}")))?,
        ));
        let verifier = Arc::new(SpiffeServerVerifier::new(
            Arc::new(SharedBundle::new(self.bundle.clone())),
            authorize_id(SpiffeId::server(&self.bundle.trust_domain)),
        ));
        let tls = sigil_identity::tls::client_config(verifier, Some(resolver))
            .map_err(|e| Status::internal(format!("TLS config: {e}")))?;
        let dial = move || async move {
            let socket = match target {
                std::net::SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
                std::net::SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
            };
            socket.bind(std::net::SocketAddr::new(source, 0))?;
            socket.connect(target).await
        };
        let channel = sigil_proto::channel::node_channel_via(addr, dial, Arc::new(tls))
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(NodeClient::new(channel))
    }

    /// A node API client to `server` presenting this agent's SVID.
    pub async fn client(&self, server: &ServerProcess) -> Result<NodeClient<Channel>, Status> {
        self.client_at(&server.addr).await
    }

    /// Renews the agent SVID through `client`; the renewed agent.
    pub async fn renew(&self, client: &mut NodeClient<Channel>) -> Result<Self, Status> {
        let (key, csr) = node::key_and_csr().map_err(status)?;
        let svid = client
            .renew_agent(pb::RenewAgentRequest { csr })
            .await?
            .into_inner()
            .svid
            .ok_or_else(|| Status::internal("RenewAgent returned no SVID"))?;
        Self::from_chain(key.to_vec(), svid.cert_chain, self.bundle.clone())
    }
}
