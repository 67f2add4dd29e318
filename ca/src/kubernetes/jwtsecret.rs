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
pub struct SecretStore {
    api: Api<Secret>,
    namespace: String,
    name: String,
    /// The Secret as last read, so a write keeps what others put in it (labels,
    /// annotations, other keys).
    read: std::sync::Mutex<Option<Secret>>,
}

/// Names the Secret, never its contents (it holds the private keys).
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
            read: std::sync::Mutex::new(None),
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
                *crate::sync::lock(&self.read) = None;
                return Ok(None);
            };
            let version = secret.metadata.resource_version.clone();
            let bytes = secret
                .data
                .as_ref()
                .and_then(|d| d.get(FILE_NAME))
                .map(|b| b.0.clone());
            *crate::sync::lock(&self.read) = Some(secret);
            match bytes.map(ByteString) {
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
            let read = crate::sync::lock(&self.read).clone();
            if let (Some(mut secret), Some(_)) = (read, version) {
                // Ours to update: everything else in it kept, the write conditional
                // on the version read.
                secret.metadata.resource_version = version.map(str::to_owned);
                secret
                    .data
                    .get_or_insert_with(BTreeMap::new)
                    .insert(FILE_NAME.to_owned(), ByteString(bytes.to_vec()));
                return self
                    .api
                    .replace(&self.name, &PostParams::default(), &secret)
                    .await
                    .map(drop)
                    .map_err(|e| failed(&e));
            }
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
