//! Shared setup for the end-to-end suites.

use std::future::Future;
use std::time::{Duration, Instant};

use sigil_tests::process::{AgentProcess, NodeAttestation, ServerOptions, ServerProcess};

/// A server and one join-token agent, each in its own directory.
pub struct Deployment {
    pub agent: AgentProcess,
    pub server: ServerProcess,
    pub agent_id: String,
    /// Holds both processes' directories; removed on drop.
    pub _dir: tempfile::TempDir,
}

impl Deployment {
    pub fn start(options: &ServerOptions) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let server = ServerProcess::start(&dir.path().join("server"), options).unwrap();
        let token = server.join_token().unwrap();
        let agent = AgentProcess::start(
            &dir.path().join("agent"),
            &server,
            &NodeAttestation::JoinToken(token),
        )
        .unwrap();
        let agent_id = server.agent_ids().unwrap().remove(0);
        Self {
            agent,
            server,
            agent_id,
            _dir: dir,
        }
    }

    /// Registers `spiffe://example.org/<name>` for processes of this test's
    /// uid under the agent; returns the entry id.
    pub fn register_me(&self, name: &str, extra: &[&str]) -> String {
        let selector = format!("unix:uid:{}", sigil_tests::process::current_uid().unwrap());
        let mut args = vec!["--selector", selector.as_str()];
        args.extend_from_slice(extra);
        self.server
            .create_entry(
                &format!("spiffe://example.org/{name}"),
                &self.agent_id,
                &args,
            )
            .unwrap()
    }

    pub async fn client(&self) -> spiffe::WorkloadApiClient {
        spiffe::WorkloadApiClient::connect_to(self.agent.endpoint())
            .await
            .unwrap()
    }
}

/// Calls `f` until it yields `Ok`, for at most `limit`; the last error
/// otherwise.
pub async fn retry<T, E: std::fmt::Debug, F: Future<Output = Result<T, E>>>(
    limit: Duration,
    mut f: impl FnMut() -> F,
) -> Result<T, E> {
    let deadline = Instant::now() + limit;
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

pub fn td() -> spiffe::TrustDomain {
    spiffe::TrustDomain::new("example.org").unwrap()
}

/// Verifies `svid` against `bundle` now with Sigil's X509-SVID validator
/// (itself checked against openssl and the `spiffe` crate in the identity
/// crate's tests); the leaf's SPIFFE ID.
pub fn verify(svid: &spiffe::X509Svid, bundle: &spiffe::X509Bundle) -> Result<String, String> {
    let mut b =
        sigil_identity::Bundle::new(sigil_identity::TrustDomain::new("example.org").unwrap());
    b.x509_authorities = bundle
        .authorities()
        .iter()
        .map(|c| c.as_ref().to_vec())
        .collect();
    let chain: Vec<Vec<u8>> = svid
        .cert_chain()
        .iter()
        .map(|c| c.as_ref().to_vec())
        .collect();
    sigil_identity::x509::verify_svid(&chain, &b, std::time::SystemTime::now())
        .map(|id| id.to_string())
        .map_err(|e| e.to_string())
}

/// The leaf's serial (hex), NotAfter and authority key identifier.
pub struct LeafFacts {
    pub serial: String,
    pub not_after: std::time::SystemTime,
    pub issuer_key_id: Vec<u8>,
}

pub fn leaf_facts(svid: &spiffe::X509Svid) -> LeafFacts {
    use x509_parser::extensions::ParsedExtension;
    let (_, cert) = x509_parser::parse_x509_certificate(svid.leaf().as_ref()).unwrap();
    let issuer_key_id = cert
        .extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(aki) => {
                aki.key_identifier.as_ref().map(|k| k.0.to_vec())
            }
            _ => None,
        })
        .expect("SVIDs carry an authority key identifier");
    let not_after =
        std::time::UNIX_EPOCH + Duration::from_secs(cert.validity().not_after.timestamp() as u64);
    LeafFacts {
        serial: cert.raw_serial_as_string(),
        not_after,
        issuer_key_id,
    }
}
