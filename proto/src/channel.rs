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

/// How long each step of connecting to the node API (TCP connection, TLS
/// handshake) may take.
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Connects to the node API at `addr` (`host:port`) with `tls`, which must
/// verify the server by SPIFFE ID (see `sigil_identity::tls`). The TLS
/// server name is not used for verification.
pub async fn node_channel(
    addr: &str,
    tls: Arc<rustls::ClientConfig>,
) -> Result<Channel, ChannelError> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|_| ChannelError::Address(addr.to_owned()))?;
    let target = addr.to_owned();
    // A server address that does not answer fails in seconds, not after
    // the kernel's TCP connect timeout (minutes).
    let dial = move || {
        let target = target.clone();
        async move {
            tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(target))
                .await
                .map_err(|_| timed_out("no TCP connection"))?
        }
    };
    connect(endpoint, addr, dial, tls).await
}

/// Connects to the node API over the TCP connections `dial` opens, with
/// `tls` as for [`node_channel`]. `dial` runs for the first connection and
/// again whenever the channel reconnects (after the server went away), so
/// it may pick another server each time (the agent's failover); it bounds
/// its own time. `servers` names what it dials, for errors.
pub async fn node_channel_via<D, F>(
    servers: &str,
    dial: D,
    tls: Arc<rustls::ClientConfig>,
) -> Result<Channel, ChannelError>
where
    D: Fn() -> F + Clone + Send + Sync + 'static,
    F: std::future::Future<Output = std::io::Result<tokio::net::TcpStream>> + Send + 'static,
{
    // The authority is only a header: which server is reached is up to
    // `dial`, and the server is verified by its SPIFFE ID.
    connect(
        Endpoint::from_static("http://sigil-server"),
        servers,
        dial,
        tls,
    )
    .await
}

fn timed_out(what: &str) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("{what} within {CONNECT_TIMEOUT:?}"),
    )
}

/// The node API channel on `endpoint` over `dial`'s connections and TLS.
async fn connect<D, F>(
    endpoint: Endpoint,
    servers: &str,
    dial: D,
    tls: Arc<rustls::ClientConfig>,
) -> Result<Channel, ChannelError>
where
    D: Fn() -> F + Clone + Send + Sync + 'static,
    F: std::future::Future<Output = std::io::Result<tokio::net::TcpStream>> + Send + 'static,
{
    let endpoint = endpoint
        .http2_keep_alive_interval(std::time::Duration::from_secs(30))
        .keep_alive_while_idle(true);
    let connector = tokio_rustls::TlsConnector::from(tls);
    endpoint
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let (dial, connector) = (dial.clone(), connector.clone());
            async move {
                let tcp = dial().await?;
                let _ = tcp.set_nodelay(true);
                let name = rustls::pki_types::ServerName::try_from("sigil-server")
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
                let tls = tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(name, tcp))
                    .await
                    .map_err(|_| timed_out("no TLS handshake"))??;
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        }))
        .await
        .map_err(|e| ChannelError::Connect(servers.to_owned(), e))
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
