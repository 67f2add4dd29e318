//! One SDS stream, state of the world or delta, under Envoy's rules: one secret per
//! response named as asked; ACKs answered with nothing; NACKs logged, never answered
//! with the same version; stale nonces ignored; a changed secret pushed.

use std::{
    collections::{BTreeMap, HashMap},
    future::Future,
};

use envoy_types::pb::{
    envoy::service::discovery::v3::{
        DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
        Resource,
    },
    google::protobuf::Any,
};
use prost::Message;
use tokio::sync::{mpsc, watch};
use tonic::{Status, Streaming};

use super::{
    SECRET_TYPE,
    service::{Sds, Subscribed},
    transport::Outbound,
};
use crate::{
    secrets::filesecret::FileLease, secrets::names::SecretName, secrets::resources::Resolved,
};

/// A request answering an older response than the last one sent is stale. Before
/// this stream has sent anything, no nonce can be stale (a client may carry one over
/// from a previous stream).
pub(super) fn is_stale(nonce: &str, last_sent: Option<&str>) -> bool {
    !nonce.is_empty() && last_sent.is_some_and(|last| last != nonce)
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

pub(super) fn any(
    secret: &envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret,
) -> Any {
    Any {
        type_url: SECRET_TYPE.to_owned(),
        value: secret.encode_to_vec(),
    }
}

pub(super) fn check_type(type_url: &str) -> Result<(), Status> {
    if type_url.is_empty() || type_url == SECRET_TYPE {
        Ok(())
    } else {
        Err(Status::invalid_argument(format!(
            "unsupported type_url {type_url:?}: this server serves only {SECRET_TYPE}"
        )))
    }
}

/// What differs between the state-of-the-world and the delta protocol; [`drive`]
/// runs either.
pub(super) trait Protocol: Send + Sized + 'static {
    type Request: Send + 'static;
    type Response: Send + 'static;
    fn sds(&self) -> &Sds;
    fn tx(&self) -> &mpsc::Sender<Outbound<Self::Response>>;
    /// Handles one request; an error ends the stream with that status.
    fn on_request(&mut self, req: Self::Request)
    -> impl Future<Output = Result<(), Status>> + Send;
    /// Sends what changed; false when the client is gone.
    fn push(&mut self) -> impl Future<Output = bool> + Send;
}

/// Runs one stream until the client leaves, the agent stops, or a request is bad.
pub(super) async fn drive<P: Protocol>(mut stream: P, mut inbound: Streaming<P::Request>) {
    let mut changes = stream.sds().store.changes();
    let mut stop = stream.sds().stop.clone();
    let tx = stream.tx().clone();
    loop {
        tokio::select! {
            _ = stopped(&mut stop) => return,
            msg = inbound.message() => match msg {
                Ok(Some(req)) => {
                    if let Err(status) = stream.on_request(req).await {
                        let _ = tx.send(Err(Box::new(status))).await;
                        return;
                    }
                }
                Ok(None) | Err(_) => return,
            },
            changed = changes.changed() => {
                if changed.is_err() || !stream.push().await {
                    return;
                }
            }
            _ = tx.closed() => return,
        }
    }
}

/// One state-of-the-world stream.
pub(super) struct SotwStream {
    pub(super) sds: Sds,
    pub(super) tx: mpsc::Sender<Outbound<DiscoveryResponse>>,
    pub(super) names: Vec<(String, SecretName)>,
    /// Keeps the file-backed names of `names` watched.
    pub(super) leases: Vec<FileLease>,
    pub(super) sent: HashMap<String, String>,
    pub(super) last_nonce: Option<String>,
}

impl Protocol for SotwStream {
    type Request = DiscoveryRequest;
    type Response = DiscoveryResponse;

    fn sds(&self) -> &Sds {
        &self.sds
    }

    fn tx(&self) -> &mpsc::Sender<Outbound<DiscoveryResponse>> {
        &self.tx
    }

    async fn on_request(&mut self, req: DiscoveryRequest) -> Result<(), Status> {
        check_type(&req.type_url)?;
        if is_stale(&req.response_nonce, self.last_nonce.as_deref()) {
            tracing::debug!(nonce = %req.response_nonce, "stale SDS request ignored");
            return Ok(());
        }
        if let Some(error) = &req.error_detail {
            // A NACK: Envoy keeps the version it had. Sending the same content
            // again would only be refused again, so nothing is resent.
            tracing::warn!(names = ?req.resource_names, version = %req.version_info, error = %error.message, "Envoy rejected a secret (NACK)");
        }
        // The whole set is replaced: only its own file-backed names count.
        let wanted = self.sds.subscribe(&req.resource_names, 0).await?;
        if wanted.is_empty() {
            self.names.clear();
            self.sent.clear();
            self.leases.clear();
            return Ok(());
        }
        self.sent
            .retain(|name, _| wanted.iter().any(|w| w.raw == *name));
        // The new leases are taken before the old ones go, so a name kept across
        // the change is never released in between.
        let mut names = Vec::with_capacity(wanted.len());
        let mut leases = Vec::new();
        for Subscribed { raw, name, lease } in wanted {
            names.push((raw, name));
            leases.extend(lease);
        }
        self.names = names;
        self.leases = leases;
        self.push().await;
        Ok(())
    }

    /// Sends every subscribed secret whose version differs from what this stream
    /// last sent. False when the client is gone.
    async fn push(&mut self) -> bool {
        for (raw, name) in &self.names {
            let Some(Resolved { version, secret }) = self.sds.store.resolve(name, raw) else {
                continue;
            };
            if self.sent.get(raw) == Some(&version) {
                continue;
            }
            let nonce = self.sds.nonce();
            let response = DiscoveryResponse {
                version_info: version.clone(),
                resources: vec![any(&secret)],
                type_url: SECRET_TYPE.to_owned(),
                nonce: nonce.clone(),
                ..Default::default()
            };
            if self.tx.send(Ok(Box::new(response))).await.is_err() {
                return false;
            }
            self.last_nonce = Some(nonce);
            self.sent.insert(raw.clone(), version);
        }
        true
    }
}

/// One delta stream.
pub(super) struct DeltaStream {
    pub(super) sds: Sds,
    pub(super) tx: mpsc::Sender<Outbound<DeltaDiscoveryResponse>>,
    pub(super) names: BTreeMap<String, SecretName>,
    /// Keeps the file-backed names of `names` watched.
    pub(super) leases: HashMap<String, FileLease>,
    pub(super) known: HashMap<String, String>,
    pub(super) last_nonce: Option<String>,
}

impl Protocol for DeltaStream {
    type Request = DeltaDiscoveryRequest;
    type Response = DeltaDiscoveryResponse;

    fn sds(&self) -> &Sds {
        &self.sds
    }

    fn tx(&self) -> &mpsc::Sender<Outbound<DeltaDiscoveryResponse>> {
        &self.tx
    }

    async fn on_request(&mut self, req: DeltaDiscoveryRequest) -> Result<(), Status> {
        check_type(&req.type_url)?;
        if self.last_nonce.is_none() {
            // First request: what the client already holds from a previous stream.
            self.known.extend(req.initial_resource_versions.clone());
        }
        if is_stale(&req.response_nonce, self.last_nonce.as_deref()) {
            return Ok(());
        }
        if let Some(error) = &req.error_detail {
            tracing::warn!(error = %error.message, "Envoy rejected a secret (delta NACK)");
        }
        // Names already held count against the stream's share of file secrets.
        // (Names this request unsubscribes are given back below: not counted.)
        let held = self
            .leases
            .keys()
            .filter(|raw| {
                !req.resource_names_subscribe.contains(raw)
                    && !req.resource_names_unsubscribe.contains(raw)
            })
            .count();
        for Subscribed { raw, name, lease } in self
            .sds
            .subscribe(&req.resource_names_subscribe, held)
            .await?
        {
            if let Some(lease) = lease {
                self.leases.insert(raw.clone(), lease);
            }
            self.names.insert(raw, name);
        }
        for raw in &req.resource_names_unsubscribe {
            self.names.remove(raw);
            self.known.remove(raw);
            self.leases.remove(raw);
        }
        self.push().await;
        Ok(())
    }

    async fn push(&mut self) -> bool {
        let mut resources = Vec::new();
        for (raw, name) in &self.names {
            let Some(Resolved { version, secret }) = self.sds.store.resolve(name, raw) else {
                continue;
            };
            if self.known.get(raw) == Some(&version) {
                continue;
            }
            self.known.insert(raw.clone(), version.clone());
            resources.push(Resource {
                name: raw.clone(),
                version,
                resource: Some(any(&secret)),
                ..Default::default()
            });
        }
        if resources.is_empty() {
            return true;
        }
        let nonce = self.sds.nonce();
        let response = DeltaDiscoveryResponse {
            resources,
            type_url: SECRET_TYPE.to_owned(),
            nonce: nonce.clone(),
            ..Default::default()
        };
        self.last_nonce = Some(nonce);
        self.tx.send(Ok(Box::new(response))).await.is_ok()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::{secrets::filesecret::FilePolicy, secrets::store::SecretStore};
    use envoy_types::pb::google::rpc::Status as RpcStatus;

    const PEM: &str = "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n";

    type Rx = mpsc::Receiver<Outbound<DiscoveryResponse>>;

    fn sotw(dir: &std::path::Path) -> (SotwStream, Rx, watch::Sender<bool>) {
        let store = SecretStore::with_file_policy(FilePolicy::new(vec![dir.to_owned()]));
        let (stop_tx, stop) = watch::channel(false);
        let (tx, rx) = mpsc::channel(8);
        let stream = SotwStream {
            sds: Sds::new(store, stop),
            tx,
            names: Vec::new(),
            leases: Vec::new(),
            sent: HashMap::new(),
            last_nonce: None,
        };
        (stream, rx, stop_tx)
    }

    fn request(names: &[&str], nonce: &str, version: &str, nack: bool) -> DiscoveryRequest {
        DiscoveryRequest {
            resource_names: names.iter().map(|n| n.to_string()).collect(),
            type_url: SECRET_TYPE.into(),
            response_nonce: nonce.into(),
            version_info: version.into(),
            error_detail: nack.then(|| RpcStatus {
                code: 13,
                message: "rejected".into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn received(rx: &mut Rx) -> DiscoveryResponse {
        *rx.try_recv().unwrap().unwrap()
    }

    #[tokio::test]
    async fn ack_nack_stale_nonce_and_unsubscribe() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.pem"), PEM).unwrap();
        std::fs::write(dir.path().join("b.pem"), PEM).unwrap();
        let a = format!("file-root:{}", dir.path().join("a.pem").display());
        let b = format!("file-root:{}", dir.path().join("b.pem").display());
        let (mut s, mut rx, _stop) = sotw(dir.path());

        s.on_request(request(&[&a], "", "", false)).await.unwrap();
        let first = received(&mut rx);
        assert_eq!(first.resources.len(), 1);
        assert!(!first.nonce.is_empty() && !first.version_info.is_empty());
        // ACK: answered with nothing.
        s.on_request(request(&[&a], &first.nonce, &first.version_info, false))
            .await
            .unwrap();
        assert!(rx.try_recv().is_err());
        // NACK: logged, not answered with the same version again.
        s.on_request(request(&[&a], &first.nonce, "", true))
            .await
            .unwrap();
        assert!(rx.try_recv().is_err());
        // A request echoing an older nonce is stale: its new name is not served...
        s.on_request(request(&[&a, &b], "0", "", false))
            .await
            .unwrap();
        assert!(rx.try_recv().is_err());
        // ...and the same request with the latest nonce is, for the added name only.
        s.on_request(request(&[&a, &b], &first.nonce, &first.version_info, false))
            .await
            .unwrap();
        let second = received(&mut rx);
        assert_eq!(second.resources.len(), 1);
        assert!(rx.try_recv().is_err(), "the unchanged name was sent again");
        // Empty names: unsubscribe, which also gives back the file leases.
        s.on_request(request(&[], &second.nonce, &second.version_info, false))
            .await
            .unwrap();
        assert!(rx.try_recv().is_err());
        assert!(s.names.is_empty() && s.leases.is_empty() && s.sent.is_empty());
    }

    #[tokio::test]
    async fn bad_requests_end_the_stream_with_their_status() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, _rx, _stop) = sotw(dir.path());
        let mut wrong_type = request(&["default"], "", "", false);
        wrong_type.type_url = "type.googleapis.com/envoy.config.cluster.v3.Cluster".into();
        let e = s.on_request(wrong_type).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        let e = s
            .on_request(request(&["Default"], "", "", false))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        let e = s
            .on_request(request(&["file-root:/etc/shadow"], "", "", false))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
    }

    #[test]
    fn staleness() {
        assert!(
            !is_stale("", Some("5")),
            "no nonce: a first or fresh request"
        );
        assert!(!is_stale("3", None), "nothing sent yet on this stream");
        assert!(!is_stale("5", Some("5")));
        assert!(is_stale("4", Some("5")));
    }
}
