//! Reaching a server's admin API over mTLS (`[server] admin_bind_address`)
//! from another machine: the caller's X509-SVID comes from files or from
//! the local agent's Workload API, and the server must present
//! `spiffe://<td>/sigil/server`, verified against the bundle that came
//! with the SVID.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use sigil_identity::pem::PemError;
use sigil_identity::tls::{
    SharedBundle, SpiffeServerVerifier, SvidResolver, authorize_id, certified_key, client_config,
};
use sigil_identity::{Bundle, SpiffeId};
use sigil_proto::admin::admin_client::AdminClient;
use sigil_proto::channel::ChannelError;
use sigil_proto::workload::X509svidRequest;
use sigil_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use tonic::transport::Channel;
use zeroize::Zeroizing;

/// The SVID chain in an SVID directory (as `sigil-agent api fetch x509
/// --write` and `sigil-server x509 mint --write` write it).
pub const SVID_FILE: &str = "svid.pem";
/// The SVID's private key (PKCS#8 PEM) in an SVID directory.
pub const KEY_FILE: &str = "svid.key";
/// The trust bundle (PEM certificates) in an SVID directory.
pub const BUNDLE_FILE: &str = "bundle.pem";

/// The agent's Workload API socket when neither `--workload-api SOCKET`
/// nor `SPIFFE_ENDPOINT_SOCKET` names one.
pub const DEFAULT_WORKLOAD_API_SOCKET: &str = "/run/sigil/agent/api.sock";

/// The Workload API socket to take the SVID from: `flag` (when not empty),
/// then `SPIFFE_ENDPOINT_SOCKET`, then [`DEFAULT_WORKLOAD_API_SOCKET`];
/// a `unix:` or `unix://` prefix is accepted.
pub fn workload_api_socket(flag: Option<&str>) -> PathBuf {
    let raw = flag
        .filter(|f| !f.is_empty())
        .map(str::to_owned)
        .or_else(|| std::env::var("SPIFFE_ENDPOINT_SOCKET").ok())
        .unwrap_or_else(|| DEFAULT_WORKLOAD_API_SOCKET.into());
    let path = raw
        .strip_prefix("unix://")
        .or_else(|| raw.strip_prefix("unix:"))
        .unwrap_or(&raw);
    PathBuf::from(path)
}

/// Largest message sent or accepted, as on the admin socket.
const MAX_MESSAGE: usize = 32 * 1024 * 1024;

/// Where the caller's X509-SVID comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SvidSource {
    /// A directory with [`SVID_FILE`], [`KEY_FILE`] and [`BUNDLE_FILE`].
    Dir(PathBuf),
    /// The Workload API socket of the local agent (its first X509-SVID).
    WorkloadApi(PathBuf),
}

/// Why the admin API could not be reached over mTLS.
#[derive(Debug, thiserror::Error)]
pub enum RemoteAdminError {
    #[error("cannot read {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("{0}: {1}")]
    Pem(PathBuf, PemError),
    #[error("{0} holds no {1}")]
    Empty(PathBuf, &'static str),
    #[error("the client certificate is not an X509-SVID: {0}")]
    NotSvid(String),
    #[error("the Workload API at {0}: {1}")]
    WorkloadApi(PathBuf, String),
    #[error("TLS setup: {0}")]
    Tls(#[from] rustls::Error),
    #[error(transparent)]
    Channel(#[from] ChannelError),
}

/// An X509-SVID with its key and the authorities of its trust domain.
struct ClientSvid {
    /// DER, leaf first.
    chain: Vec<Vec<u8>>,
    /// PKCS#8.
    key: Zeroizing<Vec<u8>>,
    /// DER CA certificates.
    authorities: Vec<Vec<u8>>,
}

fn read_pem(path: &Path, label: &'static str) -> Result<Vec<Vec<u8>>, RemoteAdminError> {
    let text =
        std::fs::read_to_string(path).map_err(|e| RemoteAdminError::Read(path.to_owned(), e))?;
    let blocks = sigil_identity::pem::decode_all(label, &text)
        .map_err(|e| RemoteAdminError::Pem(path.to_owned(), e))?;
    // `decode_all` refuses an empty result already; callers index [0].
    if blocks.is_empty() {
        return Err(RemoteAdminError::Empty(path.to_owned(), label));
    }
    Ok(blocks)
}

fn from_dir(dir: &Path) -> Result<ClientSvid, RemoteAdminError> {
    let key_path = dir.join(KEY_FILE);
    let mut keys = read_pem(&key_path, "PRIVATE KEY")?;
    Ok(ClientSvid {
        chain: read_pem(&dir.join(SVID_FILE), "CERTIFICATE")?,
        key: Zeroizing::new(keys.swap_remove(0)),
        authorities: read_pem(&dir.join(BUNDLE_FILE), "CERTIFICATE")?,
    })
}

/// Splits concatenated DER certificates (the Workload API's encoding).
fn split_der(mut bytes: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let (tlv, rest) =
            sigil_identity::der::read(bytes).map_err(|_| "malformed DER".to_owned())?;
        out.push(tlv.whole.to_vec());
        bytes = rest;
    }
    Ok(out)
}

async fn from_workload_api(socket: &Path) -> Result<ClientSvid, RemoteAdminError> {
    let fail = |e: String| RemoteAdminError::WorkloadApi(socket.to_owned(), e);
    let channel = sigil_proto::channel::unix_channel(socket)
        .await
        .map_err(|e| fail(format!("{e}; is the agent running?")))?;
    let mut request = tonic::Request::new(X509svidRequest {});
    request.metadata_mut().insert(
        "workload.spiffe.io",
        tonic::metadata::MetadataValue::from_static("true"),
    );
    let mut stream = SpiffeWorkloadApiClient::new(channel)
        .fetch_x509svid(request)
        .await
        .map_err(|s| fail(format!("{} ({:?})", s.message(), s.code())))?
        .into_inner();
    let message = stream
        .message()
        .await
        .map_err(|s| fail(format!("{} ({:?})", s.message(), s.code())))?
        .ok_or_else(|| fail("the agent sent no X509-SVID".into()))?;
    let svid = message
        .svids
        .into_iter()
        .next()
        .ok_or_else(|| fail("this process has no X509-SVID".into()))?;
    Ok(ClientSvid {
        chain: split_der(&svid.x509_svid).map_err(fail)?,
        key: Zeroizing::new(svid.x509_svid_key),
        authorities: split_der(&svid.bundle).map_err(fail)?,
    })
}

/// Connects to the admin API over mTLS at `address` (`host:port`) with the
/// X509-SVID from `source`.
pub async fn connect(
    address: &str,
    source: &SvidSource,
) -> Result<AdminClient<Channel>, RemoteAdminError> {
    let svid = match source {
        SvidSource::Dir(dir) => from_dir(dir)?,
        SvidSource::WorkloadApi(socket) => from_workload_api(socket).await?,
    };
    let leaf = svid
        .chain
        .first()
        .ok_or_else(|| RemoteAdminError::NotSvid("empty certificate chain".into()))?;
    let id = sigil_identity::x509::parse(leaf)
        .map_err(|e| e.to_string())
        .and_then(|c| sigil_identity::x509::check_leaf(&c).map_err(|e| e.to_string()))
        .map_err(RemoteAdminError::NotSvid)?;
    let td = id.trust_domain();
    let mut bundle = Bundle::new(td.clone());
    bundle.x509_authorities = svid.authorities;
    let verifier = Arc::new(SpiffeServerVerifier::new(
        Arc::new(SharedBundle::new(bundle)),
        authorize_id(SpiffeId::server(&td)),
    ));
    let key = certified_key(&svid.chain, &svid.key)?;
    let tls = client_config(verifier, Some(Arc::new(SvidResolver::new(key))))?;
    let channel = sigil_proto::channel::node_channel(address, Arc::new(tls)).await?;
    Ok(AdminClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_svid_dir_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let err = from_dir(dir.path()).err().unwrap().to_string();
        assert!(err.contains(KEY_FILE), "{err}");
        std::fs::write(dir.path().join(KEY_FILE), "not pem").unwrap();
        let err = from_dir(dir.path()).err().unwrap().to_string();
        assert!(err.contains("no PEM block labelled PRIVATE KEY"), "{err}");
    }
}
