//! The agent's side of the node API: attestation, and channels that
//! present the agent SVID and verify the server's.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use rcgen::{CertificateParams, KeyPair};
use sigil_identity::attestation::AgentNodeAttestor;
use sigil_identity::tls::{
    SharedBundle, SpiffeServerVerifier, SvidResolver, authorize_id, certified_key, client_config,
};
use sigil_identity::{Bundle, SpiffeId, TrustDomain};
use sigil_proto::channel::node_channel_via;
use sigil_proto::node::{self as pb, node_client::NodeClient};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use zeroize::Zeroizing;

use crate::servers::Servers;
use crate::store::AgentState;

/// Why talking to the server failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    #[error("cannot reach the server: {0}")]
    Connect(String),
    #[error("server refused: {} ({:?})", .0.message(), .0.code())]
    Refused(tonic::Status),
    #[error("node attestor: {0}")]
    Attestor(sigil_identity::attestation::AttestError),
    #[error("server sent an invalid reply: {0}")]
    BadReply(String),
    #[error("local key: {0}")]
    Key(String),
}

// Written out (not `#[from]`) so the cause is not repeated as a source
// when the error chain is printed.
impl From<tonic::Status> for NodeError {
    fn from(s: tonic::Status) -> Self {
        Self::Refused(s)
    }
}

impl From<sigil_identity::attestation::AttestError> for NodeError {
    fn from(e: sigil_identity::attestation::AttestError) -> Self {
        Self::Attestor(e)
    }
}

/// How the agent trusts the server on first contact.
#[derive(Debug, Clone)]
pub enum Bootstrap {
    /// The server's CA certificates (PEM file contents, DER).
    Bundle(Bundle),
    /// Trust on first use (`insecure_bootstrap`).
    Insecure,
}

fn server_verifier(td: &TrustDomain, bundle: Arc<SharedBundle>) -> Arc<SpiffeServerVerifier> {
    Arc::new(SpiffeServerVerifier::new(
        bundle,
        authorize_id(SpiffeId::server(td)),
    ))
}

fn tls_error(e: rustls::Error) -> NodeError {
    NodeError::Connect(e.to_string())
}

/// A new P-256 key and a CSR for it.
pub fn key_and_csr() -> Result<(Zeroizing<Vec<u8>>, Vec<u8>), NodeError> {
    let key = KeyPair::generate().map_err(|e| NodeError::Key(e.to_string()))?;
    let csr = CertificateParams::default()
        .serialize_request(&key)
        .map_err(|e| NodeError::Key(e.to_string()))?;
    Ok((Zeroizing::new(key.serialize_der()), csr.der().to_vec()))
}

/// Attests to one of `servers` and returns the new agent state.
pub async fn attest(
    servers: &Arc<Servers>,
    td: &TrustDomain,
    bootstrap: &Bootstrap,
    attestor: &dyn AgentNodeAttestor,
) -> Result<AgentState, NodeError> {
    let tls = match bootstrap {
        Bootstrap::Bundle(b) => client_config(
            server_verifier(td, Arc::new(SharedBundle::new(b.clone()))),
            None,
        ),
        Bootstrap::Insecure => {
            rustls::ClientConfig::builder_with_provider(sigil_identity::tls::provider())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .map(|b| {
                    let mut c = b
                        .dangerous()
                        // Only for `insecure_bootstrap`, which says so in its
                        // name; used for attestation alone, after which the
                        // agent trusts exactly the bundle it received.
                        .with_custom_certificate_verifier(
                            sigil_identity::tls::InsecureAnyServer::new(),
                        )
                        .with_no_client_auth();
                    c.alpn_protocols = vec![b"h2".to_vec()];
                    c
                })
        }
    }
    .map_err(tls_error)?;
    let channel = channel(servers, Arc::new(tls)).await?;
    let mut client = NodeClient::new(channel);
    let (key, csr) = key_and_csr()?;
    let (tx, rx) = mpsc::channel(4);
    let params = pb::AttestParams {
        attestor: attestor.name().into(),
        evidence: attestor.evidence()?,
        csr,
    };
    tx.send(pb::AttestRequest {
        step: Some(pb::attest_request::Step::Params(params)),
    })
    .await
    .map_err(|_| NodeError::Connect("attestation stream closed".into()))?;
    let mut inbound = client.attest(ReceiverStream::new(rx)).await?.into_inner();
    loop {
        let msg = inbound
            .message()
            .await?
            .ok_or_else(|| NodeError::BadReply("attestation ended without a result".into()))?;
        match msg.step {
            Some(pb::attest_response::Step::Challenge(c)) => {
                let r = attestor.respond(&c)?;
                tx.send(pb::AttestRequest {
                    step: Some(pb::attest_request::Step::ChallengeResponse(r)),
                })
                .await
                .map_err(|_| NodeError::Connect("attestation stream closed".into()))?;
            }
            Some(pb::attest_response::Step::Result(r)) => {
                let svid = r
                    .svid
                    .ok_or_else(|| NodeError::BadReply("no SVID".into()))?;
                let bundle = r
                    .bundle
                    .ok_or_else(|| NodeError::BadReply("no bundle".into()))?;
                let bundle =
                    Bundle::try_from(&bundle).map_err(|e| NodeError::BadReply(e.to_string()))?;
                if bundle.trust_domain != *td {
                    return Err(NodeError::BadReply(format!(
                        "bundle is for {}, not {td}",
                        bundle.trust_domain
                    )));
                }
                return Ok(AgentState {
                    key,
                    chain: svid.cert_chain,
                    bundle,
                });
            }
            None => return Err(NodeError::BadReply("empty attestation message".into())),
        }
    }
}

/// An authenticated connection to the node API.
#[derive(Debug, Clone)]
pub struct Connection {
    pub client: NodeClient<Channel>,
}

impl Connection {
    /// Connects to one of `servers` presenting the agent SVID from
    /// `resolver`, verifying the server against `bundle`. When the server
    /// goes away, the connection opens again to the next of `servers`
    /// (see [`crate::servers`]) at its next call.
    pub async fn open(
        servers: &Arc<Servers>,
        td: &TrustDomain,
        bundle: Arc<SharedBundle>,
        resolver: Arc<SvidResolver>,
    ) -> Result<Self, NodeError> {
        let tls = client_config(server_verifier(td, bundle), Some(resolver)).map_err(tls_error)?;
        let channel = channel(servers, Arc::new(tls)).await?;
        Ok(Self {
            client: NodeClient::new(channel).max_decoding_message_size(32 << 20),
        })
    }
}

/// A node API channel to one of `servers`: its first connection stays on
/// the server in use, later ones (after the server went away) move on.
async fn channel(
    servers: &Arc<Servers>,
    tls: Arc<rustls::ClientConfig>,
) -> Result<Channel, NodeError> {
    let first = Arc::new(AtomicBool::new(true));
    let dialing = servers.clone();
    let dial = move || {
        let (servers, stay) = (dialing.clone(), first.swap(false, Ordering::Relaxed));
        async move { servers.dial(stay).await }
    };
    node_channel_via(&servers.describe(), dial, tls)
        .await
        .map_err(|e| {
            servers.unusable();
            NodeError::Connect(e.to_string())
        })
}

/// A rustls key for the agent state.
pub fn agent_key(state: &AgentState) -> Result<Arc<rustls::sign::CertifiedKey>, NodeError> {
    certified_key(&state.chain, &state.key).map_err(|e| NodeError::Key(e.to_string()))
}
