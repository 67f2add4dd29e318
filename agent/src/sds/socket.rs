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
/// is a directory or held by a live server, replaces a stale socket file, and puts
/// the socket there with mode 0660 already set.
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
    if let Some(listener) = bind_privately(path).map_err(|e| err(e.to_string()))? {
        return Ok(listener);
    }
    // The private path would be too long for a socket address: bound in place, so
    // for a moment it has the umask's mode.
    let listener = UnixListener::bind(path).map_err(|e| err(format!("cannot listen: {e}")))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .map_err(|e| err(format!("cannot set mode 0660: {e}")))?;
    Ok(listener)
}

/// The longest socket path Linux takes (`sun_path` less its terminating NUL).
const MAX_SOCKET_PATH: usize = 107;

/// Binds in a directory of our own (mode 0700) beside `path`, sets mode 0660 there
/// and only then renames the socket into place, so nobody can connect to it while
/// it still has the umask's mode. `None` when the private path would be too long.
fn bind_privately(path: &Path) -> std::io::Result<Option<UnixListener>> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let private = dir.join(format!(".s{:08x}", rand::random::<u32>()));
    let staged = private.join("s");
    if staged.as_os_str().len() > MAX_SOCKET_PATH {
        return Ok(None);
    }
    std::fs::DirBuilder::new().mode(0o700).create(&private)?;
    let bound = (|| {
        let listener = UnixListener::bind(&staged)?;
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o660))?;
        std::fs::rename(&staged, path)?;
        Ok(listener)
    })();
    let _ = std::fs::remove_file(&staged);
    let _ = std::fs::remove_dir(&private);
    bound.map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[tokio::test]
    async fn the_socket_appears_with_its_mode_and_nothing_else_is_left() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("socket");
        let _listener = bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o660);
        assert_eq!(
            entries(dir.path()),
            ["socket"],
            "the private directory is gone"
        );
        std::os::unix::net::UnixStream::connect(&path).unwrap();
        let e = bind(&path).unwrap_err().to_string();
        assert!(e.contains("another server"), "{e}");
    }

    #[tokio::test]
    async fn a_path_too_long_for_the_private_directory_is_bound_in_place() {
        let dir = tempfile::tempdir_in("/tmp").unwrap();
        // Room for "/socket" but not for "/.sXXXXXXXX/s".
        let room = MAX_SOCKET_PATH - dir.path().as_os_str().len() - "/socket".len();
        let deep = dir.path().join("d".repeat(room.saturating_sub(1).max(1)));
        let path = deep.join("socket");
        assert!(path.as_os_str().len() <= MAX_SOCKET_PATH);
        let _listener = bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o660);
        assert_eq!(entries(&deep), ["socket"]);
    }
}
