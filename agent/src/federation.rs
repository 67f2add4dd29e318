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

fn trust_domain(name: &str) -> Result<String, String> {
    signet_spiffe::trust_domain(name)
        .map(|td| td.as_str().to_owned())
        .map_err(|e| e.to_string())
}

/// The X.509 roots of a SPIFFE bundle document, as PEM.
fn bundle_pem(json: &[u8]) -> Result<String, String> {
    let bundle: SpiffeBundle =
        serde_json::from_slice(json).map_err(|e| format!("not a SPIFFE bundle: {e}"))?;
    let mut pem = String::new();
    for key in bundle
        .keys
        .iter()
        .filter(|k| k.usage.as_deref() == Some("x509-svid"))
    {
        let der = key.x5c.first().ok_or("an x509-svid key without x5c")?;
        let der = base64::engine::general_purpose::STANDARD
            .decode(der)
            .map_err(|e| format!("x5c is not base64: {e}"))?;
        pem.push_str(&signet_spiffe::pem_cert(&der));
    }
    if pem.is_empty() {
        return Err("no x509-svid key in the bundle".into());
    }
    Ok(pem)
}

fn pem_roots(bytes: &[u8]) -> Result<String, String> {
    let certs = ::pem::parse_many(bytes).map_err(|e| e.to_string())?;
    let pem: String = certs
        .iter()
        .filter(|p| p.tag() == "CERTIFICATE")
        .map(|p| signet_spiffe::pem_cert(p.contents()))
        .collect();
    if pem.is_empty() {
        return Err("no PEM certificate".into());
    }
    Ok(pem)
}

/// One file of a bundle directory: `<trust domain>.pem|.crt` (PEM roots) or
/// `<trust domain>.json` (a SPIFFE bundle). `Ok(None)` for files that are not bundles.
pub fn parse_file(stem: &str, ext: &str, bytes: &[u8]) -> Result<Option<(String, String)>, String> {
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
pub fn parse_map(bytes: &[u8]) -> Result<Bundles, String> {
    let map: BTreeMap<String, serde_json::Value> = serde_json::from_slice(bytes)
        .map_err(|e| format!("want {{\"<trust domain>\": <SPIFFE bundle>}}: {e}"))?;
    let mut out = Bundles::new();
    for (td, bundle) in map {
        let pem = bundle_pem(bundle.to_string().as_bytes()).map_err(|e| format!("{td}: {e}"))?;
        out.insert(trust_domain(&td)?, pem);
    }
    Ok(out)
}

/// Largest bundle file read.
const MAX_BUNDLE_BYTES: u64 = 1024 * 1024;

/// Reads `path` (a directory or a JSON file).
pub fn load(path: &Path) -> Result<Bundles, String> {
    let err = |p: &Path, e: String| format!("{}: {e}", p.display());
    let read = |p: &Path| signet_fs::read_resolved(p, MAX_BUNDLE_BYTES).map_err(|e| e.to_string());
    if !path.is_dir() {
        return parse_map(&read(path)?).map_err(|e| err(path, e));
    }
    let mut out = Bundles::new();
    let entries = std::fs::read_dir(path).map_err(|e| err(path, e.to_string()))?;
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
        if let Some((td, pem)) = parse_file(stem, ext, &read(&file)?).map_err(|e| err(&file, e))? {
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
        assert!(load(dir.path()).unwrap_err().contains("bad domain"));
    }
}
