//! The agent's Unix sockets: the SDS socket where Envoy (and pilot-agent's check for
//! an external agent) expects it, and the Workload API's; a clear error for every
//! path that cannot work.

use std::path::Path;

use tokio::net::UnixListener;

/// Why the socket could not be served.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("{what} {path}: {problem}")]
    Path {
        what: &'static str,
        path: String,
        problem: String,
    },
}

/// Prepares the socket path and listens: creates the directory, refuses a path that
/// is a directory or held by a live server, replaces a stale socket file, and sets
/// mode 0660.
pub fn bind(path: &Path) -> Result<UnixListener, SocketError> {
    bind_as(path, "SDS socket")
}

/// [`bind`] for the socket named `what` in errors.
pub fn bind_as(path: &Path, what: &'static str) -> Result<UnixListener, SocketError> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let err = |problem: String| SocketError::Path {
        what,
        path: path.display().to_string(),
        problem,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| err(format!("cannot create its directory: {e}")))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => return Err(err("is a directory".into())),
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(err("another server is listening there (is pilot-agent or another signet-agent running?)".into()));
            }
            std::fs::remove_file(path)
                .map_err(|e| err(format!("cannot remove the stale socket: {e}")))?;
        }
        Ok(_) => return Err(err("exists and is not a socket".into())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e.to_string())),
    }
    let listener = UnixListener::bind(path).map_err(|e| err(format!("cannot listen: {e}")))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .map_err(|e| err(format!("cannot set mode 0660: {e}")))?;
    Ok(listener)
}
