//! The secrets the agent serves, by SDS name, and change notification.
//!
//! `default` and `ROOTCA` come from the rotating certificate; Istio's
//! `file-cert:<cert>~<key>` and `file-root:<path>` names are read from files and
//! re-read while subscribed ([`crate::secrets::filesecret`]).

use std::sync::{Arc, Mutex};

use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret;
use tokio::sync::watch;

use crate::{
    identity::svid::Svid,
    secrets::filesecret::{FileLease, FilePolicy, FileSecretError, FileSecrets},
    secrets::names::SecretName,
    secrets::resources::{Resolved, digest, roots_secret, spiffe_secret, tls_secret},
};

/// Everything the SDS server serves.
#[derive(Debug)]
pub struct SecretStore {
    svid: watch::Sender<Option<Arc<Svid>>>,
    federated: Mutex<crate::secrets::federation::Bundles>,
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
    pub fn set_federated(&self, bundles: crate::secrets::federation::Bundles) {
        let mut current = crate::sync::lock(&self.federated);
        if *current != bundles {
            *current = bundles;
            drop(current);
            self.bump();
        }
    }

    /// Trust domain -> PEM bundle: our own (from the CA's answer) and the federated.
    fn bundles(&self) -> Option<crate::secrets::federation::Bundles> {
        let svid = self.svid()?;
        let mut all = crate::sync::lock(&self.federated).clone();
        all.insert(
            svid.id.trust_domain_name().to_owned(),
            svid.roots_pem.clone(),
        );
        Some(all)
    }

    /// The certificate and the other trust domains' bundles (trust domain -> PEM), for
    /// the Workload API; `None` before the first certificate.
    pub fn x509_context(&self) -> Option<(Arc<Svid>, crate::secrets::federation::Bundles)> {
        let svid = self.svid()?;
        let federated = crate::sync::lock(&self.federated).clone();
        Some((svid, federated))
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
    /// [`crate::secrets::filesecret`]); `None` for names that are not file-backed.
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
impl crate::identity::rotation::Publish for SecretStore {
    fn publish(&self, svid: Arc<Svid>) {
        self.set_svid(svid);
    }

    fn current(&self) -> Option<Arc<Svid>> {
        self.svid()
    }
}
