//! Binding the Unix sockets of Sigil's local APIs safely: the parent
//! directory is created with a given mode if missing, a stale socket is
//! replaced, and a symlink or any other file at the path is refused.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio::net::UnixListener;

/// Why a socket could not be bound.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SocketError {
    #[error("{0} is a symlink; refusing to bind a socket through it")]
    Symlink(PathBuf),
    #[error("{0} exists and is not a socket; move it away or choose another path")]
    NotASocket(PathBuf),
    #[error("socket {0}: {1}")]
    Io(PathBuf, std::io::Error),
}

/// Binds `path`, creating a missing parent directory with `dir_mode` and
/// giving the socket `socket_mode`.
pub fn bind_unix(
    path: &Path,
    dir_mode: u32,
    socket_mode: u32,
) -> Result<UnixListener, SocketError> {
    let io = |e| SocketError::Io(path.to_path_buf(), e);
    if let Some(dir) = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty() && !d.exists())
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .create(dir)
            .map_err(io)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(dir_mode)).map_err(io)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => {
            return Err(SocketError::Symlink(path.to_path_buf()));
        }
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path).map_err(io)?,
        Ok(_) => return Err(SocketError::NotASocket(path.to_path_buf())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    let listener = UnixListener::bind(path).map_err(io)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(socket_mode)).map_err(io)?;
    Ok(listener)
}
