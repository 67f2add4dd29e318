//! Bundles of other trust domains (`--federated-bundles`), for Envoy's SPIFFE
//! certificate validator: a directory of `<trust-domain>.pem` or `<trust-domain>.json`
//! (SPIFFE bundle) files, or one JSON file mapping trust domains to SPIFFE bundles.

use std::{collections::BTreeMap, path::Path};

use base64::Engine;
use serde::Deserialize;

/// Trust domain -> PEM roots.
pub type Bundles = BTreeMap<String, String>;

#[derive(Deserialize)]
struct SpiffeBundle {
    #[serde(default)]
    keys: Vec<BundleKey>,
}

#[derive(Deserialize)]
struct BundleKey {
    #[serde(rename = "use")]
    usage: Option<String>,
    #[serde(default)]
    x5c: Vec<String>,
}

/// Why a bundle could not be used.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// A file name or map key that is not a trust domain.
    #[error("{0}")]
    TrustDomain(#[from] signet_spiffe::IdentityError),
    /// Not SPIFFE bundle JSON.
    #[error("not a SPIFFE bundle: {0}")]
    NotBundle(#[source] serde_json::Error),
    /// An `x509-svid` key without a certificate.
    #[error("an x509-svid key without x5c")]
    NoX5c,
    /// `x5c` that is not base64.
    #[error("x5c is not base64: {0}")]
    Base64(#[from] base64::DecodeError),
    /// A bundle with no X.509 root.
    #[error("no x509-svid key in the bundle")]
    NoX509Key,
    /// PEM that does not parse.
    #[error("{0}")]
    Pem(#[from] ::pem::PemError),
    /// PEM without a certificate.
    #[error("no PEM certificate")]
    NoCertificate,
    /// The one-file form is not a map of trust domains to bundles.
    #[error("want {{\"<trust domain>\": <SPIFFE bundle>}}: {0}")]
    NotMap(#[source] serde_json::Error),
    /// One entry of the map is bad.
    #[error("{trust_domain}: {source}")]
    Entry {
        trust_domain: String,
        #[source]
        source: Box<BundleError>,
    },
}

/// Why `--federated-bundles` could not be read.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A file could not be read (missing, not regular, too large, ...).
    #[error("{0}")]
    Read(#[from] signet_fs::ReadError),
    /// The directory could not be listed.
    #[error("{path}: {source}")]
    Dir {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file's content is not a bundle.
    #[error("{path}: {source}")]
    Bundle {
        path: std::path::PathBuf,
        #[source]
        source: BundleError,
    },
}

fn trust_domain(name: &str) -> Result<String, BundleError> {
    Ok(signet_spiffe::trust_domain(name)?.as_str().to_owned())
}

/// The X.509 roots of a SPIFFE bundle document, as PEM.
fn bundle_pem(json: &[u8]) -> Result<String, BundleError> {
    let bundle: SpiffeBundle = serde_json::from_slice(json).map_err(BundleError::NotBundle)?;
    let mut pem = String::new();
    for key in bundle
        .keys
        .iter()
        .filter(|k| k.usage.as_deref() == Some("x509-svid"))
    {
        let der = key.x5c.first().ok_or(BundleError::NoX5c)?;
        let der = base64::engine::general_purpose::STANDARD.decode(der)?;
        pem.push_str(&signet_spiffe::pem_cert(&der));
    }
    if pem.is_empty() {
        return Err(BundleError::NoX509Key);
    }
    Ok(pem)
}

fn pem_roots(bytes: &[u8]) -> Result<String, BundleError> {
    let certs = ::pem::parse_many(bytes)?;
    let pem: String = certs
        .iter()
        .filter(|p| p.tag() == "CERTIFICATE")
        .map(|p| signet_spiffe::pem_cert(p.contents()))
        .collect();
    if pem.is_empty() {
        return Err(BundleError::NoCertificate);
    }
    Ok(pem)
}

/// One file of a bundle directory: `<trust domain>.pem|.crt` (PEM roots) or
/// `<trust domain>.json` (a SPIFFE bundle). `Ok(None)` for files that are not bundles.
pub fn parse_file(
    stem: &str,
    ext: &str,
    bytes: &[u8],
) -> Result<Option<(String, String)>, BundleError> {
    if stem.starts_with('.') {
        return Ok(None); // kubelet's ..data and friends
    }
    let pem = match ext {
        "pem" | "crt" => pem_roots(bytes)?,
        "json" => bundle_pem(bytes)?,
        _ => return Ok(None),
    };
    Ok(Some((trust_domain(stem)?, pem)))
}

/// A JSON document mapping trust domains to SPIFFE bundles.
pub fn parse_map(bytes: &[u8]) -> Result<Bundles, BundleError> {
    let map: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(bytes).map_err(BundleError::NotMap)?;
    let mut out = Bundles::new();
    for (td, bundle) in map {
        let entry = |source| BundleError::Entry {
            trust_domain: td.clone(),
            source: Box::new(source),
        };
        let pem = bundle_pem(bundle.to_string().as_bytes()).map_err(entry)?;
        out.insert(trust_domain(&td).map_err(entry)?, pem);
    }
    Ok(out)
}

/// Largest bundle file read.
const MAX_BUNDLE_BYTES: u64 = 1024 * 1024;

/// Reads `path` (a directory or a JSON file).
pub fn load(path: &Path) -> Result<Bundles, LoadError> {
    let bad = |p: &Path| {
        let path = p.to_path_buf();
        move |source| LoadError::Bundle { path, source }
    };
    let read = |p: &Path| signet_fs::read_resolved(p, MAX_BUNDLE_BYTES);
    if !path.is_dir() {
        return parse_map(&read(path)?).map_err(bad(path));
    }
    let mut out = Bundles::new();
    let entries = std::fs::read_dir(path).map_err(|source| LoadError::Dir {
        path: path.to_path_buf(),
        source,
    })?;
    for entry in entries.flatten() {
        let file = entry.path();
        let (Some(stem), Some(ext)) = (
            file.file_stem().and_then(|s| s.to_str()),
            file.extension().and_then(|s| s.to_str()),
        ) else {
            continue;
        };
        if stem.starts_with('.') || !matches!(ext, "pem" | "crt" | "json") {
            continue;
        }
        if let Some((td, pem)) = parse_file(stem, ext, &read(&file)?).map_err(bad(&file))? {
            out.insert(td, pem);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directory_and_json_forms() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec![]).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("b.example.pem"), cert.pem()).unwrap();
        let x5c = base64::engine::general_purpose::STANDARD.encode(cert.der());
        let bundle = serde_json::json!({"keys": [{"use": "x509-svid", "kty": "EC", "x5c": [x5c]}, {"use": "jwt-svid", "kty": "EC"}]});
        std::fs::write(dir.path().join("c.example.json"), bundle.to_string()).unwrap();
        std::fs::write(dir.path().join("notes.txt"), "ignored").unwrap();
        let loaded = load(dir.path()).unwrap();
        assert_eq!(
            loaded.keys().collect::<Vec<_>>(),
            ["b.example", "c.example"]
        );
        assert_eq!(loaded["b.example"], loaded["c.example"]);

        let file = dir.path().join("all.json");
        std::fs::write(&file, serde_json::json!({"d.example": bundle}).to_string()).unwrap();
        assert_eq!(
            load(&file).unwrap().keys().collect::<Vec<_>>(),
            ["d.example"]
        );

        std::fs::write(dir.path().join("bad domain.pem"), cert.pem()).unwrap();
        let e = load(dir.path()).unwrap_err();
        assert!(
            matches!(
                &e,
                LoadError::Bundle {
                    source: BundleError::TrustDomain(_),
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("bad domain"), "{e}");
    }
}
