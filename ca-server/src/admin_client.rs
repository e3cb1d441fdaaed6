//! The client side of the admin API: connecting to a server's admin
//! socket (the CLI, the quickstart and tests use it).

use std::path::{Path, PathBuf};

use sigil_proto::admin::admin_client::AdminClient;
use sigil_proto::channel::ChannelError;
use tonic::transport::Channel;

/// Largest admin message the client sends or accepts: a whole registry's
/// entries come back in one `ListEntries` reply.
pub const MAX_MESSAGE_BYTES: usize = 32 * 1024 * 1024;

/// The admin socket could not be reached.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
#[error(
    "cannot reach the server's admin socket at {}; is the server running, and may this user \
     open the socket?",
    socket.display()
)]
pub struct ConnectError {
    /// The socket tried.
    pub socket: PathBuf,
    /// Why the connection failed.
    #[source]
    pub source: ChannelError,
}

/// Connects to the admin API on the Unix socket at `socket`.
pub async fn connect(socket: &Path) -> Result<AdminClient<Channel>, ConnectError> {
    let channel = sigil_proto::channel::unix_channel(socket)
        .await
        .map_err(|source| ConnectError {
            socket: socket.to_path_buf(),
            source,
        })?;
    Ok(AdminClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}
