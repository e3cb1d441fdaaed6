//! Client channels for Sigil's gRPC APIs: the node API over TLS 1.3 with
//! SPIFFE authentication, and local APIs over Unix sockets.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

/// Why a channel could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChannelError {
    #[error("invalid server address {0:?}")]
    Address(String),
    #[error("cannot connect to {0}: {1}")]
    Connect(String, tonic::transport::Error),
}

/// How long connecting to the node API (TCP and TLS handshake) may take.
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Connects to the node API at `addr` (`host:port`) with `tls`, which must
/// verify the server by SPIFFE ID (see `sigil_identity::tls`). The TLS
/// server name is not used for verification.
pub async fn node_channel(
    addr: &str,
    tls: Arc<rustls::ClientConfig>,
) -> Result<Channel, ChannelError> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|_| ChannelError::Address(addr.to_owned()))?
        .http2_keep_alive_interval(std::time::Duration::from_secs(30))
        .keep_alive_while_idle(true);
    let target = addr.to_owned();
    let connector = tokio_rustls::TlsConnector::from(tls);
    endpoint
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let (target, connector) = (target.clone(), connector.clone());
            let connect = async move {
                let tcp = tokio::net::TcpStream::connect(&target).await?;
                let _ = tcp.set_nodelay(true);
                let name = rustls::pki_types::ServerName::try_from("sigil-server")
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            };
            // A server address that does not answer fails in seconds, not
            // after the kernel's TCP connect timeout (minutes).
            async move {
                tokio::time::timeout(CONNECT_TIMEOUT, connect)
                    .await
                    .map_err(|_| {
                        std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            format!("no TCP and TLS connection within {CONNECT_TIMEOUT:?}"),
                        )
                    })?
            }
        }))
        .await
        .map_err(|e| ChannelError::Connect(addr.to_owned(), e))
}

/// Connects to a gRPC server on the Unix socket at `path`.
pub async fn unix_channel(path: &Path) -> Result<Channel, ChannelError> {
    let p: PathBuf = path.to_path_buf();
    // The URI is required by the API but unused: the connector dials the socket.
    Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let p = p.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(p).await?))
            }
        }))
        .await
        .map_err(|e| ChannelError::Connect(path.display().to_string(), e))
}

/// A call the server answered with an error status, shown to people as its
/// message and code (tonic's own `Display` adds metadata and details).
#[derive(Debug, thiserror::Error)]
#[error("{} ({:?})", .0.message(), .0.code())]
pub struct RpcError(pub tonic::Status);

impl From<tonic::Status> for RpcError {
    fn from(status: tonic::Status) -> Self {
        Self(status)
    }
}
