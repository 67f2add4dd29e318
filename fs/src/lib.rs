//! Signet's file edge, shared by the CA and the agent.
//!
//! - [`write_atomic`]: the one way Signet writes a file (keys, certificates, bundles).
//! - [`read_regular`]: the one way Signet reads a file an attacker may have planted
//!   something at (a FIFO, a device, a symlink, a huge file); [`read_beneath`] the
//!   same for a path that must stay inside a directory, links included.
//! - [`watch`]: the one way Signet keeps looking at files ([`watch::Poll`],
//!   [`watch::read_off_thread`], [`watch::Reported`]).
#![forbid(unsafe_code)]

pub mod watch;

use std::{
    fs::{File, OpenOptions, Permissions},
    io::{self, Read, Write},
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

/// Why [`read_regular`] refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The file does not exist (yet).
    #[error("{0}: no such file")]
    Missing(PathBuf),
    /// Something other than a regular file is there.
    #[error("{path}: not a regular file ({kind}); only regular files are read")]
    NotRegular { path: PathBuf, kind: &'static str },
    /// The file is larger than the caller allows.
    #[error("{path}: larger than the {max}-byte limit")]
    TooLarge { path: PathBuf, max: u64 },
    /// The path, or a link on it, leads out of the directory it must stay in.
    #[error("{0}: leads out of the directory it is read from")]
    Escapes(PathBuf),
    /// Any other I/O error.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Reads a regular file of at most `max` bytes.
///
/// The last path component is opened without following a symbolic link and without
/// blocking (a FIFO or a device is refused after `fstat`, never read); the size is
/// checked on the open file and enforced again while reading, so a file that grows
/// meanwhile cannot make the read unbounded. Callers that must follow links (a
/// kubelet `..data` mount) canonicalise first and check where the path leads.
pub fn read_regular(path: &Path, max: u64) -> Result<Vec<u8>, ReadError> {
    let io_err = |source: io::Error| {
        if source.kind() == io::ErrorKind::NotFound {
            ReadError::Missing(path.to_owned())
        } else if source.raw_os_error() == Some(libc::ELOOP) {
            ReadError::NotRegular {
                path: path.to_owned(),
                kind: "symbolic link",
            }
        } else {
            ReadError::Io {
                path: path.to_owned(),
                source,
            }
        }
    };
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY)
        .open(path)
        .map_err(io_err)?;
    read_open(file, path, max)
}

/// Reads `relative` (a path inside `dir`) as [`read_regular`] does, resolved by the
/// kernel beneath an opened handle of `dir` (`openat2` with `RESOLVE_BENEATH`):
/// symbolic links are followed while they stay inside `dir` (a kubelet `..data`
/// mount), and a link, a `..` or an absolute link that would lead out of it fails the
/// open itself. Nothing is resolved first and opened after, so whoever can write
/// inside `dir` cannot swap a component for a link between the check and the read.
pub fn read_beneath(dir: &Path, relative: &Path, max: u64) -> Result<Vec<u8>, ReadError> {
    use rustix::fs::{Mode, OFlags, ResolveFlags};
    let shown = dir.join(relative);
    let io_err = |source: io::Error| match source.raw_os_error() {
        Some(libc::ENOENT) => ReadError::Missing(shown.clone()),
        Some(libc::EXDEV | libc::ELOOP) => ReadError::Escapes(shown.clone()),
        Some(libc::ENOSYS) => ReadError::Io {
            path: shown.clone(),
            source: io::Error::other("this kernel lacks openat2 (Linux 5.6 or later is needed)"),
        },
        _ => ReadError::Io {
            path: shown.clone(),
            source,
        },
    };
    let handle = rustix::fs::open(
        dir,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| io_err(e.into()))?;
    let fd = rustix::fs::openat2(
        &handle,
        relative,
        OFlags::RDONLY | OFlags::NONBLOCK | OFlags::CLOEXEC | OFlags::NOCTTY,
        Mode::empty(),
        ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS,
    )
    .map_err(|e| io_err(e.into()))?;
    read_open(File::from(fd), &shown, max)
}

/// The checks and the bounded read of [`read_regular`], on a file already open.
fn read_open(mut file: File, path: &Path, max: u64) -> Result<Vec<u8>, ReadError> {
    let io_err = |source: io::Error| ReadError::Io {
        path: path.to_owned(),
        source,
    };
    let meta = file.metadata().map_err(io_err)?;
    if !meta.is_file() {
        return Err(ReadError::NotRegular {
            path: path.to_owned(),
            kind: kind(&meta),
        });
    }
    if meta.len() > max {
        return Err(ReadError::TooLarge {
            path: path.to_owned(),
            max,
        });
    }
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    (&mut file)
        .take(max.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(io_err)?;
    if bytes.len() as u64 > max {
        return Err(ReadError::TooLarge {
            path: path.to_owned(),
            max,
        });
    }
    Ok(bytes)
}

/// [`read_regular`] of where `path` leads: symbolic links on the way are followed
/// (a kubelet-mounted ConfigMap or Secret is a chain of them), but what is read must
/// still be a regular file within `max` bytes. For paths the operator configured.
pub fn read_resolved(path: &Path, max: u64) -> Result<Vec<u8>, ReadError> {
    let resolved = std::fs::canonicalize(path).map_err(|source| {
        if source.kind() == io::ErrorKind::NotFound {
            ReadError::Missing(path.to_owned())
        } else {
            ReadError::Io {
                path: path.to_owned(),
                source,
            }
        }
    })?;
    read_regular(&resolved, max)
}

fn kind(meta: &std::fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    if t.is_dir() {
        "directory"
    } else if t.is_fifo() {
        "FIFO"
    } else if t.is_socket() {
        "socket"
    } else if t.is_block_device() || t.is_char_device() {
        "device"
    } else if t.is_symlink() {
        "symbolic link"
    } else {
        "special file"
    }
}

/// Writes `contents` to `path` so that readers see the old file or the new one, never
/// half of either, and nobody else can get at the bytes on the way.
///
/// A temporary file with an unpredictable name is created beside `path` with
/// `O_CREAT|O_EXCL|O_NOFOLLOW` (a planted file or symlink makes the create fail rather
/// than receive the secret), given `mode` before any byte is written, synced, and
/// renamed over `path` (which replaces a symlink at `path` instead of writing through
/// it). The directory is synced so the rename survives a crash.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    write_atomic_via(path, contents, mode, &mut temp_name)
}

/// A temporary name beside `path` that nobody can guess: 64 random bits.
fn temp_name(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!(".{name}.{:016x}.tmp", rand::random::<u64>()))
}

/// How many names [`write_atomic`] tries when one is taken (only an attacker or a
/// 1-in-2^64 chance takes one).
const TEMP_TRIES: usize = 4;

/// [`write_atomic`] with the temporary names drawn from `pick`, so tests can plant
/// things at exactly the names it will use.
fn write_atomic_via(
    path: &Path,
    contents: &[u8],
    mode: u32,
    pick: &mut dyn FnMut(&Path, &str) -> PathBuf,
) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?
        .to_string_lossy();
    // A name that exists (a planted file or link) is never opened: `O_EXCL` fails,
    // and another name is tried.
    let mut tries = 0;
    let (tmp, mut file) = loop {
        let tmp = pick(dir, &name);
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)
        {
            Ok(file) => break (tmp, file),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && tries + 1 < TEMP_TRIES => {
                tries += 1;
            }
            Err(e) => return Err(e),
        }
    };
    let result = (|| {
        // The create mode is filtered by the umask; set exactly what was asked, on
        // the open file, before the content goes in.
        file.set_permissions(Permissions::from_mode(mode))?;
        file.write_all(contents)?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
        return result;
    }
    // Durability of the rename; a directory that cannot be opened for reading (rare)
    // still has the new file in place.
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn writes_replace_planted_links_and_never_write_through_them() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "untouched").unwrap();
        let target = dir.path().join("key.pem");
        // The attack from the security report: the target itself is a link, and
        // links are planted at every temporary name the old code could pick.
        symlink(&victim, &target).unwrap();
        for pid in [std::process::id(), 1, 2] {
            symlink(&victim, dir.path().join(format!(".key.pem.tmp{pid}"))).unwrap();
        }
        write_atomic(&target, b"secret", 0o600).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "untouched");
        let meta = std::fs::symlink_metadata(&target).unwrap();
        assert!(meta.file_type().is_file(), "target is a regular file now");
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::read(&target).unwrap(), b"secret");
        // No temporary file is left behind.
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    /// The property, whatever names the code picks: a link or a file planted at the
    /// temporary name it is about to use is never written through or reused (an
    /// attacker holding the planted file open reads nothing), and the write still
    /// lands under another name.
    #[test]
    fn a_planted_temporary_name_is_never_written_through_or_reused() {
        use std::io::Read;
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "untouched").unwrap();
        let target = dir.path().join("key.pem");
        let mut picked = Vec::new();
        let mut plant = |d: &Path, n: &str| {
            let tmp = temp_name(d, n);
            match picked.len() {
                // The first two names hold a link to the victim and a file the
                // attacker keeps open; the third is free.
                0 => symlink(&victim, &tmp).unwrap(),
                1 => std::fs::write(&tmp, "").unwrap(),
                _ => {}
            }
            picked.push(tmp.clone());
            tmp
        };
        write_atomic_via(&target, b"secret", 0o600, &mut plant).unwrap();
        assert_eq!(picked.len(), 3, "{picked:?}");
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "untouched");
        let mut held = std::fs::File::open(&picked[1]).unwrap();
        let mut seen = String::new();
        held.read_to_string(&mut seen).unwrap();
        assert_eq!(seen, "", "the planted file received the secret");
        assert!(
            std::fs::symlink_metadata(&picked[0])
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(std::fs::read(&target).unwrap(), b"secret");

        // Names taken every time: an error, and still nothing written through.
        let mut always_taken = |d: &Path, n: &str| {
            let tmp = temp_name(d, n);
            symlink(&victim, &tmp).unwrap();
            tmp
        };
        assert!(write_atomic_via(&target, b"other", 0o600, &mut always_taken).is_err());
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "untouched");
        assert_eq!(std::fs::read(&target).unwrap(), b"secret");
    }

    /// The property that closes the race between a check and the open: the open
    /// itself refuses a path whose directory component is a link out, where an
    /// open that only refuses a final link follows it.
    #[test]
    fn reads_beneath_a_directory_never_follow_a_link_out_of_it() {
        let top = tempfile::tempdir().unwrap();
        let allowed = top.path().join("certs");
        let secret = top.path().join("state");
        std::fs::create_dir_all(allowed.join("..2026_12_07")).unwrap();
        std::fs::create_dir_all(&secret).unwrap();
        std::fs::write(secret.join("key.pem"), "secret").unwrap();
        std::fs::write(allowed.join("..2026_12_07/cert.pem"), "cert").unwrap();
        // A kubelet-style link that stays inside is followed.
        symlink("..2026_12_07", allowed.join("..data")).unwrap();
        assert_eq!(
            read_beneath(&allowed, Path::new("..data/cert.pem"), 1024).unwrap(),
            b"cert"
        );
        // A directory link out: read_regular follows it, read_beneath does not.
        symlink(&secret, allowed.join("sub")).unwrap();
        assert_eq!(
            read_regular(&allowed.join("sub/key.pem"), 1024).unwrap(),
            b"secret"
        );
        assert!(matches!(
            read_beneath(&allowed, Path::new("sub/key.pem"), 1024),
            Err(ReadError::Escapes(_))
        ));
        // Relative with `..`, and an absolute link: refused the same way.
        symlink("../state", allowed.join("up")).unwrap();
        assert!(matches!(
            read_beneath(&allowed, Path::new("up/key.pem"), 1024),
            Err(ReadError::Escapes(_))
        ));
        assert!(matches!(
            read_beneath(&allowed, Path::new("../state/key.pem"), 1024),
            Err(ReadError::Escapes(_))
        ));
        // Missing is missing.
        assert!(matches!(
            read_beneath(&allowed, Path::new("later.pem"), 1024),
            Err(ReadError::Missing(_))
        ));
    }

    #[test]
    fn temporary_names_are_unpredictable() {
        let dir = Path::new("/d");
        let names: std::collections::HashSet<PathBuf> =
            (0..1000).map(|_| temp_name(dir, "key.pem")).collect();
        assert_eq!(names.len(), 1000, "names repeat");
        for n in &names {
            assert_eq!(n.parent(), Some(dir), "beside the target");
        }
    }

    #[test]
    fn mode_ignores_the_umask() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("root-cert.pem");
        write_atomic(&path, b"a", 0o644).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o644
        );
        write_atomic(&path, b"b", 0o600).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(std::fs::read(&path).unwrap(), b"b");
    }

    #[test]
    fn reads_refuse_fifos_links_devices_and_large_files() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let status = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(status.success());
        // Would block forever with a plain open.
        assert!(matches!(
            read_regular(&fifo, 1024),
            Err(ReadError::NotRegular { kind: "FIFO", .. })
        ));
        assert!(matches!(
            read_regular(Path::new("/dev/zero"), 1024),
            Err(ReadError::NotRegular { kind: "device", .. })
        ));
        let file = dir.path().join("f");
        std::fs::write(&file, vec![b'x'; 2048]).unwrap();
        assert!(matches!(
            read_regular(&file, 1024),
            Err(ReadError::TooLarge { .. })
        ));
        assert_eq!(read_regular(&file, 2048).unwrap().len(), 2048);
        let link = dir.path().join("link");
        symlink(&file, &link).unwrap();
        assert!(matches!(
            read_regular(&link, 4096),
            Err(ReadError::NotRegular {
                kind: "symbolic link",
                ..
            })
        ));
        assert!(matches!(
            read_regular(&dir.path().join("nope"), 1),
            Err(ReadError::Missing(_))
        ));
        assert!(matches!(
            read_regular(dir.path(), 1),
            Err(ReadError::NotRegular {
                kind: "directory",
                ..
            })
        ));
    }
}
