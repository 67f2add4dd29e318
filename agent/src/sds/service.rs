//! The `SecretDiscoveryService`: subscriptions (names parsed, file-backed ones
//! leased), the two streaming protocols and `FetchSecrets`.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use envoy_types::pb::envoy::service::{
    discovery::v3::{
        DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
    },
    secret::v3::secret_discovery_service_server::SecretDiscoveryService,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::{
    SECRET_TYPE,
    protocol::{DeltaStream, SotwStream, any, check_type, drive},
    transport::SdsServer,
    transport::Unboxed,
};
use crate::{
    secrets::filesecret::{FileLease, FileSecretError, MAX_FILE_SECRETS_PER_STREAM},
    secrets::names::SecretName,
    secrets::store::SecretStore,
};

/// The SDS service.
#[derive(Debug, Clone)]
pub struct Sds {
    pub(super) store: Arc<SecretStore>,
    pub(super) nonces: Arc<AtomicU64>,
    pub(super) stop: watch::Receiver<bool>,
}

impl Sds {
    /// Serves the secrets of `store`; open streams end when `stop` turns true, so a
    /// graceful shutdown does not wait for Envoy to hang up.
    pub fn new(store: Arc<SecretStore>, stop: watch::Receiver<bool>) -> Self {
        Self {
            store,
            nonces: Arc::new(AtomicU64::new(0)),
            stop,
        }
    }

    /// The tonic service.
    pub fn into_service(self) -> SdsServer {
        SdsServer(Arc::new(self))
    }

    pub(super) fn nonce(&self) -> String {
        format!("{:x}", self.nonces.fetch_add(1, Ordering::Relaxed) + 1)
    }

    /// Parses requested names and takes a lease on each file-backed one (which
    /// checks and reads its files); the error is the stream's end status. `held` is
    /// how many file-backed names the stream keeps besides these: together at most
    /// [`MAX_FILE_SECRETS_PER_STREAM`].
    pub(super) async fn subscribe(
        &self,
        names: &[String],
        held: usize,
    ) -> Result<Vec<Subscribed>, Status> {
        let mut seen = HashSet::with_capacity(names.len());
        let mut parsed = Vec::with_capacity(names.len());
        for raw in names {
            if !seen.insert(raw.as_str()) {
                continue;
            }
            let name =
                SecretName::parse(raw).map_err(|e| Status::invalid_argument(e.to_string()))?;
            parsed.push((raw, name));
        }
        let files = parsed
            .iter()
            .filter(|(_, n)| matches!(n, SecretName::FileCert { .. } | SecretName::FileRoot(_)))
            .count();
        if held + files > MAX_FILE_SECRETS_PER_STREAM {
            return Err(Status::resource_exhausted(format!(
                "one stream may hold at most {MAX_FILE_SECRETS_PER_STREAM} file secrets; this one asks for {}",
                held + files
            )));
        }
        let mut out: Vec<Subscribed> = Vec::with_capacity(parsed.len());
        for (raw, name) in parsed {
            let lease = self
                .store
                .lease_file(&name)
                .await
                .map_err(|e| file_status(&e))?;
            out.push(Subscribed {
                raw: raw.clone(),
                name,
                lease,
            });
        }
        Ok(out)
    }
}

/// A requested name, parsed, with the lease that keeps a file-backed one watched.
#[derive(Debug)]
pub(super) struct Subscribed {
    pub(super) raw: String,
    pub(super) name: SecretName,
    pub(super) lease: Option<FileLease>,
}

fn file_status(e: &FileSecretError) -> Status {
    let message = e.to_string();
    match e {
        FileSecretError::NotAllowed { .. } => Status::permission_denied(message),
        FileSecretError::BadPath { .. } | FileSecretError::Unreadable(_) => {
            Status::invalid_argument(message)
        }
        FileSecretError::TooMany => Status::resource_exhausted(message),
    }
}

#[tonic::async_trait]
impl SecretDiscoveryService for Sds {
    type StreamSecretsStream = Unboxed<DiscoveryResponse>;
    type DeltaSecretsStream = Unboxed<DeltaDiscoveryResponse>;

    async fn stream_secrets(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamSecretsStream>, Status> {
        let (tx, rx) = mpsc::channel(8);
        let stream = SotwStream {
            sds: self.clone(),
            tx,
            names: Vec::new(),
            leases: Vec::new(),
            sent: HashMap::new(),
            last_nonce: None,
        };
        tokio::spawn(drive(stream, request.into_inner()));
        Ok(Response::new(Unboxed(ReceiverStream::new(rx))))
    }

    async fn delta_secrets(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaSecretsStream>, Status> {
        let (tx, rx) = mpsc::channel(8);
        let stream = DeltaStream {
            sds: self.clone(),
            tx,
            names: BTreeMap::new(),
            leases: HashMap::new(),
            known: HashMap::new(),
            last_nonce: None,
        };
        tokio::spawn(drive(stream, request.into_inner()));
        Ok(Response::new(Unboxed(ReceiverStream::new(rx))))
    }

    async fn fetch_secrets(
        &self,
        request: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        let req = request.into_inner();
        check_type(&req.type_url)?;
        // The leases in `names` keep file-backed names readable for this call only.
        let names = self.subscribe(&req.resource_names, 0).await?;
        if names.is_empty() {
            return Err(Status::invalid_argument(
                "FetchSecrets needs at least one resource name",
            ));
        }
        let mut resources = Vec::with_capacity(names.len());
        let mut versions = Vec::with_capacity(names.len());
        for Subscribed { raw, name, .. } in &names {
            let resolved = self.store.resolve(name, raw).ok_or_else(|| {
                Status::unavailable(format!("secret {raw:?} is not available yet"))
            })?;
            versions.push(resolved.version);
            resources.push(any(&resolved.secret));
        }
        Ok(Response::new(DiscoveryResponse {
            version_info: versions.join("/"),
            resources,
            type_url: SECRET_TYPE.to_owned(),
            nonce: self.nonce(),
            ..Default::default()
        }))
    }
}
