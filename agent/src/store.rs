//! The secrets the agent serves, by SDS name, and change notification.
//!
//! `default` and `ROOTCA` come from the rotating certificate; Istio's
//! `file-cert:<cert>~<key>` and `file-root:<path>` names are read from files and
//! re-read while subscribed ([`crate::filesecret`]).

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
};

use envoy_types::pb::envoy::{
    config::core::v3::{DataSource, data_source::Specifier},
    extensions::transport_sockets::tls::v3::{
        CertificateValidationContext, Secret, TlsCertificate, secret,
    },
};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::{
    filesecret::{FileLease, FilePolicy, FileSecretError, FileSecrets},
    svid::Svid,
};

/// The name Envoy asks for the workload certificate by.
pub const DEFAULT: &str = "default";
/// The name Envoy asks for the trust bundle by.
pub const ROOTCA: &str = "ROOTCA";
/// SPIRE's name for every trust domain's bundle in one SPIFFE validator.
pub const ALL: &str = "ALL";
/// Envoy's SPIFFE certificate validator extension.
const SPIFFE_VALIDATOR: &str = "envoy.tls.cert_validator.spiffe";
const SPIFFE_VALIDATOR_TYPE: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.SPIFFECertValidatorConfig";

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
    pub fn parse(name: &str) -> Result<Self, String> {
        let unknown = || {
            format!(
                "unknown secret {name:?}: this agent serves \"default\", \"ROOTCA\", \"ALL\", \"spiffe://<trust-domain>\", \"file-cert:<cert-path>~<key-path>\" and \"file-root:<path>\""
            )
        };
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

/// A secret ready to send: its version and the Envoy message.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    /// Changes whenever the content changes.
    pub version: String,
    /// The `Secret`, named as requested.
    pub secret: Secret,
}

/// Everything the SDS server serves.
#[derive(Debug)]
pub struct SecretStore {
    svid: watch::Sender<Option<Arc<Svid>>>,
    federated: Mutex<crate::federation::Bundles>,
    files: Arc<FileSecrets>,
    generation: watch::Sender<u64>,
}

impl SecretStore {
    /// An empty store that serves no file secrets.
    pub fn new() -> Arc<Self> {
        Self::with_file_policy(FilePolicy::default())
    }

    /// An empty store serving file secrets from the directories `policy` allows.
    pub fn with_file_policy(policy: FilePolicy) -> Arc<Self> {
        Arc::new(Self {
            svid: watch::channel(None).0,
            federated: Mutex::new(Default::default()),
            files: FileSecrets::new(policy),
            generation: watch::channel(0).0,
        })
    }

    /// Publishes a new certificate; every stream holding `default` (and `ROOTCA`, if
    /// the roots changed) is told.
    pub fn set_svid(&self, svid: Arc<Svid>) {
        self.svid.send_replace(Some(svid));
        self.bump();
    }

    /// The current certificate, if any.
    pub fn svid(&self) -> Option<Arc<Svid>> {
        self.svid.borrow().clone()
    }

    /// Replaces the bundles of other trust domains; streams holding `ALL` or a
    /// changed `spiffe://<td>` are told.
    pub fn set_federated(&self, bundles: crate::federation::Bundles) {
        let mut current = self.federated.lock().unwrap_or_else(|p| p.into_inner());
        if *current != bundles {
            *current = bundles;
            drop(current);
            self.bump();
        }
    }

    /// Trust domain -> PEM bundle: our own (from the CA's answer) and the federated.
    fn bundles(&self) -> Option<crate::federation::Bundles> {
        let svid = self.svid()?;
        let mut all = self
            .federated
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        all.insert(
            svid.id.trust_domain_name().to_owned(),
            svid.roots_pem.clone(),
        );
        Some(all)
    }

    /// Watches the certificate.
    pub fn watch_svid(&self) -> watch::Receiver<Option<Arc<Svid>>> {
        self.svid.subscribe()
    }

    /// Ticks whenever any secret may have changed.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    fn bump(&self) {
        self.generation.send_modify(|g| *g = g.wrapping_add(1));
    }

    /// The secret for `name`, or `None` while it is not available yet.
    pub fn resolve(&self, name: &SecretName, requested: &str) -> Option<Resolved> {
        match name {
            SecretName::Default => {
                let svid = self.svid()?;
                Some(Resolved {
                    version: svid.serial.clone(),
                    secret: tls_secret(
                        requested,
                        svid.chain_pem.as_bytes(),
                        svid.key_pem.as_bytes(),
                    ),
                })
            }
            SecretName::RootCa => {
                let svid = self.svid()?;
                Some(Resolved {
                    version: digest(svid.roots_pem.as_bytes()),
                    secret: roots_secret(requested, svid.roots_pem.as_bytes()),
                })
            }
            SecretName::All => {
                let bundles = self.bundles()?;
                Some(spiffe_secret(requested, &bundles))
            }
            SecretName::TrustDomain(td) => {
                let mut bundles = self.bundles()?;
                let pem = bundles.remove(td)?;
                Some(spiffe_secret(
                    requested,
                    &[(td.clone(), pem)].into_iter().collect(),
                ))
            }
            file => {
                let (version, secret) = self.files.current(file)?;
                Some(Resolved {
                    version,
                    secret: Secret {
                        name: requested.to_owned(),
                        ..secret
                    },
                })
            }
        }
    }

    /// Keeps a file-backed name watched while the lease lives (see
    /// [`crate::filesecret`]); `None` for names that are not file-backed.
    pub async fn lease_file(
        self: &Arc<Self>,
        name: &SecretName,
    ) -> Result<Option<FileLease>, FileSecretError> {
        let store = Arc::downgrade(self);
        self.files
            .lease(
                name,
                Arc::new(move || {
                    if let Some(store) = store.upgrade() {
                        store.bump();
                    }
                }),
            )
            .await
    }
}

fn inline(bytes: &[u8]) -> Option<DataSource> {
    Some(DataSource {
        specifier: Some(Specifier::InlineBytes(bytes.to_vec())),
        ..Default::default()
    })
}

/// `Secret{tls_certificate{certificate_chain, private_key}}`, inline bytes.
pub(crate) fn tls_secret(name: &str, chain: &[u8], key: &[u8]) -> Secret {
    Secret {
        name: name.to_owned(),
        r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
            certificate_chain: inline(chain),
            private_key: inline(key),
            ..Default::default()
        })),
    }
}

/// `Secret{validation_context{trusted_ca}}`, inline bytes.
pub(crate) fn roots_secret(name: &str, roots: &[u8]) -> Secret {
    Secret {
        name: name.to_owned(),
        r#type: Some(secret::Type::ValidationContext(
            CertificateValidationContext {
                trusted_ca: inline(roots),
                ..Default::default()
            },
        )),
    }
}

/// `validation_context{custom_validator_config}`: Envoy's SPIFFE validator, one
/// trust bundle per trust domain, so a peer is verified only against its own domain's
/// roots.
fn spiffe_secret(name: &str, bundles: &crate::federation::Bundles) -> Resolved {
    use envoy_types::pb::{
        envoy::{
            config::core::v3::TypedExtensionConfig,
            extensions::transport_sockets::tls::v3::{
                SpiffeCertValidatorConfig, spiffe_cert_validator_config,
            },
        },
        google::protobuf::Any,
    };
    use prost::Message;
    let config = SpiffeCertValidatorConfig {
        trust_domains: bundles
            .iter()
            .map(|(td, pem)| spiffe_cert_validator_config::TrustDomain {
                name: td.clone(),
                trust_bundle: inline(pem.as_bytes()),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    let value = config.encode_to_vec();
    Resolved {
        version: digest(&value),
        secret: Secret {
            name: name.to_owned(),
            r#type: Some(secret::Type::ValidationContext(
                CertificateValidationContext {
                    custom_validator_config: Some(TypedExtensionConfig {
                        name: SPIFFE_VALIDATOR.to_owned(),
                        typed_config: Some(Any {
                            type_url: SPIFFE_VALIDATOR_TYPE.to_owned(),
                            value,
                        }),
                    }),
                    ..Default::default()
                },
            )),
        },
    }
}

/// A short content digest, used as a secret's version.
pub(crate) fn digest(bytes: &[u8]) -> String {
    hex::encode(&Sha256::digest(bytes)[..8])
}

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
            let e = SecretName::parse(bad).unwrap_err();
            assert!(e.contains("unknown secret"), "{bad}: {e}");
        }
    }
}
