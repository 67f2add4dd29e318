//! `--output-certs`: key.pem, cert-chain.pem and root-cert.pem on disk for workloads
//! that read files, written atomically with mode 0600, and only when they change.

use std::{io::Write, path::Path};

use crate::svid::Svid;

/// Writes the three files for `svid` into `dir`, skipping unchanged ones.
pub fn write_certs(dir: &Path, svid: &Svid) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    // Key first: a reader that sees the new chain always finds its key already there.
    for (name, content) in [
        ("key.pem", svid.key_pem.as_bytes()),
        ("cert-chain.pem", svid.chain_pem.as_bytes()),
        ("root-cert.pem", svid.roots_pem.as_bytes()),
    ] {
        let path = dir.join(name);
        if std::fs::read(&path).is_ok_and(|old| old == content) {
            continue;
        }
        write_atomic(&path, content)?;
    }
    Ok(())
}

/// Temporary file, fsync, rename: readers never see half a file.
fn write_atomic(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(contents)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path)
}
