//! `--output-certs`: key.pem, cert-chain.pem and root-cert.pem on disk for workloads
//! that read files, written atomically with mode 0600, and only when they change.

use std::path::Path;

use crate::identity::svid::Svid;

/// Largest file compared before rewriting; anything bigger is simply rewritten.
const MAX_COMPARE: u64 = 1024 * 1024;

/// Writes the three files for `svid` into `dir`, skipping unchanged ones.
pub(crate) fn write_certs(dir: &Path, svid: &Svid) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    // Key first: a reader that sees the new chain always finds its key already there.
    for (name, content) in [
        ("key.pem", svid.key_pem.as_bytes()),
        ("cert-chain.pem", svid.chain_pem.as_bytes()),
        ("root-cert.pem", svid.roots_pem.as_bytes()),
    ] {
        let path = dir.join(name);
        // Only a regular file with the same bytes counts as unchanged: a link, FIFO
        // or device planted in a shared directory is replaced, never read through.
        if signet_fs::read_regular(&path, MAX_COMPARE).is_ok_and(|old| old == content) {
            continue;
        }
        signet_fs::write_atomic(&path, content, 0o600)?;
    }
    Ok(())
}
