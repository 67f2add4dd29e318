//! The JWT key set in a Kubernetes Secret (`--jwt-keys-secret`), so every replica
//! signs with the same keys: read with its `resourceVersion`, written back only at
//! that version (a replica that loses the race reads again).

use std::collections::BTreeMap;

use k8s_openapi::{ByteString, api::core::v1::Secret};
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
};
use zeroize::Zeroizing;

use crate::keys::{
    jwt::StoreError,
    jwtstore::{FILE_NAME, KeyStore, Loaded, StoreFuture},
};

/// The Secret `namespace/name`, key `jwt-keys.json`.
#[derive(Clone)]
pub struct SecretStore {
    api: Api<Secret>,
    namespace: String,
    name: String,
}

impl std::fmt::Debug for SecretStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretStore({})", self.describe())
    }
}

impl SecretStore {
    /// The Secret `namespace/name` through `client`.
    pub fn new(client: Client, namespace: &str, name: &str) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        }
    }
}

fn failed(e: &kube::Error) -> StoreError {
    match e {
        kube::Error::Api(status) if status.code == 409 => StoreError::Conflict,
        _ => StoreError::Failed(e.to_string()),
    }
}

impl KeyStore for SecretStore {
    fn describe(&self) -> String {
        format!("Secret {}/{} key {FILE_NAME}", self.namespace, self.name)
    }

    fn load(&self) -> StoreFuture<'_, Option<Loaded>> {
        Box::pin(async move {
            let Some(secret) = self.api.get_opt(&self.name).await.map_err(|e| failed(&e))? else {
                return Ok(None);
            };
            let version = secret.metadata.resource_version.clone();
            match secret.data.and_then(|mut d| d.remove(FILE_NAME)) {
                Some(ByteString(bytes)) => Ok(Some(Loaded {
                    bytes: Zeroizing::new(bytes),
                    version,
                })),
                // A Secret made by hand, empty: ours to fill, at its version.
                None => Ok(Some(Loaded {
                    bytes: Zeroizing::new(Vec::new()),
                    version,
                })),
            }
        })
    }

    fn save<'a>(&'a self, bytes: &'a [u8], version: Option<&'a str>) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let secret = Secret {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    namespace: Some(self.namespace.clone()),
                    resource_version: version.map(str::to_owned),
                    labels: Some(BTreeMap::from([(
                        "app.kubernetes.io/managed-by".to_owned(),
                        "signet-ca".to_owned(),
                    )])),
                    ..ObjectMeta::default()
                },
                type_: Some("Opaque".to_owned()),
                data: Some(BTreeMap::from([(
                    FILE_NAME.to_owned(),
                    ByteString(bytes.to_vec()),
                )])),
                ..Secret::default()
            };
            let pp = PostParams::default();
            match version {
                None => self.api.create(&pp, &secret).await,
                Some(_) => self.api.replace(&self.name, &pp, &secret).await,
            }
            .map(drop)
            .map_err(|e| failed(&e))
        })
    }
}
