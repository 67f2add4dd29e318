//! The secret names Envoy asks the agent for: Istio's (`default`, `ROOTCA`,
//! `file-cert:<cert>~<key>`, `file-root:<path>`) and SPIRE's (`ALL`,
//! `spiffe://<trust-domain>`).

use std::path::PathBuf;

/// The name Envoy asks for the workload certificate by.
pub const DEFAULT: &str = "default";
/// The name Envoy asks for the trust bundle by.
pub const ROOTCA: &str = "ROOTCA";
/// SPIRE's name for every trust domain's bundle in one SPIFFE validator.
pub const ALL: &str = "ALL";
/// A secret name the agent knows how to serve.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SecretName {
    /// `default`.
    Default,
    /// `ROOTCA`.
    RootCa,
    /// `file-cert:<cert>~<key>`.
    FileCert { cert: PathBuf, key: PathBuf },
    /// `file-root:<path>`.
    FileRoot(PathBuf),
    /// `ALL`: Envoy's SPIFFE validator with every trust domain's bundle.
    All,
    /// `spiffe://<trust-domain>`: the SPIFFE validator with that one bundle.
    TrustDomain(String),
}

impl SecretName {
    /// Parses a name from an SDS request.
    pub fn parse(name: &str) -> Result<Self, UnknownSecret> {
        let unknown = || UnknownSecret(name.to_owned());
        match name {
            DEFAULT => Ok(Self::Default),
            ROOTCA => Ok(Self::RootCa),
            ALL => Ok(Self::All),
            _ => {
                if let Some(rest) = name.strip_prefix("file-cert:") {
                    let (cert, key) = rest.split_once('~').ok_or_else(unknown)?;
                    if cert.is_empty() || key.is_empty() {
                        return Err(unknown());
                    }
                    Ok(Self::FileCert {
                        cert: cert.into(),
                        key: key.into(),
                    })
                } else if let Some(td) = name.strip_prefix("spiffe://") {
                    // Exactly as written: the name is echoed back in the answer.
                    let valid = signet_spiffe::trust_domain(td)
                        .ok()
                        .filter(|t| t.as_str() == td);
                    valid
                        .map(|t| Self::TrustDomain(t.as_str().to_owned()))
                        .ok_or_else(unknown)
                } else if let Some(path) = name.strip_prefix("file-root:") {
                    if path.is_empty() {
                        return Err(unknown());
                    }
                    Ok(Self::FileRoot(path.into()))
                } else {
                    Err(unknown())
                }
            }
        }
    }
}

/// A name the agent does not serve.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown secret {0:?}: this agent serves \"default\", \"ROOTCA\", \"ALL\", \"spiffe://<trust-domain>\", \"file-cert:<cert-path>~<key-path>\" and \"file-root:<path>\""
)]
pub struct UnknownSecret(pub String);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(SecretName::parse("default").unwrap(), SecretName::Default);
        assert_eq!(SecretName::parse("ROOTCA").unwrap(), SecretName::RootCa);
        assert_eq!(
            SecretName::parse("file-cert:/a/c.pem~/a/k.pem").unwrap(),
            SecretName::FileCert {
                cert: "/a/c.pem".into(),
                key: "/a/k.pem".into()
            }
        );
        assert_eq!(
            SecretName::parse("file-root:/r.pem").unwrap(),
            SecretName::FileRoot("/r.pem".into())
        );
        assert_eq!(SecretName::parse("ALL").unwrap(), SecretName::All);
        assert_eq!(
            SecretName::parse("spiffe://b.example").unwrap(),
            SecretName::TrustDomain("b.example".into())
        );
        for bad in [
            "",
            "Default",
            "rootca",
            "file-cert:/a",
            "file-cert:~/k",
            "file-root:",
            "spiffe://x/ns/a",
            "spiffe://",
            "spiffe://A b",
        ] {
            let e = SecretName::parse(bad).unwrap_err().to_string();
            assert!(e.contains("unknown secret"), "{bad}: {e}");
        }
    }
}
