//! A client of signet-agent's SDS socket for the end-to-end tests: what Envoy
//! would be served, decoded.

use std::path::Path;

use envoy_types::pb::envoy::{
    config::core::v3::data_source::Specifier,
    extensions::transport_sockets::tls::v3::{Secret, secret},
    service::{
        discovery::v3::DiscoveryRequest,
        secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient,
    },
};
use prost::Message;

use crate::with_cert;

/// Envoy's secret type URL.
pub const SECRET_TYPE: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// An SDS client on the agent's socket.
pub async fn sds(socket: &Path) -> SecretDiscoveryServiceClient<tonic::transport::Channel> {
    SecretDiscoveryServiceClient::new(signet_agent::inspect::connect(socket).await.unwrap())
}

/// The inline bytes of a data source.
pub fn bytes(source: &Option<envoy_types::pb::envoy::config::core::v3::DataSource>) -> Vec<u8> {
    match source.as_ref().and_then(|s| s.specifier.as_ref()) {
        Some(Specifier::InlineBytes(b)) => b.clone(),
        other => panic!("want inline bytes, got {other:?}"),
    }
}

/// (chain PEM, key PEM) of a `default` secret.
pub fn tls(secret: &Secret) -> (String, String) {
    match &secret.r#type {
        Some(secret::Type::TlsCertificate(t)) => (
            String::from_utf8(bytes(&t.certificate_chain)).unwrap(),
            String::from_utf8(bytes(&t.private_key)).unwrap(),
        ),
        other => panic!("not a TLS certificate: {other:?}"),
    }
}

/// The trusted CA PEM of a `ROOTCA`-style secret.
pub fn roots(secret: &Secret) -> String {
    match &secret.r#type {
        Some(secret::Type::ValidationContext(v)) => {
            String::from_utf8(bytes(&v.trusted_ca)).unwrap()
        }
        other => panic!("not a validation context: {other:?}"),
    }
}

/// A state-of-the-world stream subscribed to `names`, as Envoy opens one: the
/// sender for further requests (ACKs) and the responses.
pub async fn subscribe(
    socket: &Path,
    names: &[&str],
) -> (
    tokio::sync::mpsc::Sender<DiscoveryRequest>,
    tonic::Streaming<envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse>,
) {
    let mut client = sds(socket).await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(DiscoveryRequest {
        resource_names: names.iter().map(|n| n.to_string()).collect(),
        type_url: SECRET_TYPE.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let stream = client
        .stream_secrets(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    (tx, stream)
}

/// `FetchSecrets` for `names`.
pub async fn fetch(socket: &Path, names: &[&str]) -> Vec<Secret> {
    let mut client = sds(socket).await;
    let response = client
        .fetch_secrets(DiscoveryRequest {
            resource_names: names.iter().map(|s| s.to_string()).collect(),
            type_url: SECRET_TYPE.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    response
        .resources
        .iter()
        .map(|a| Secret::decode(a.value.as_slice()).unwrap())
        .collect()
}

/// What one workload's agent served: (chain, key, roots).
pub async fn served(socket: &Path) -> (String, String, String) {
    let secrets = fetch(socket, &["default", "ROOTCA"]).await;
    let (chain, key) = tls(&secrets[0]);
    (chain, key, roots(&secrets[1]))
}

/// The trust bundles inside a SPIFFE-validator secret: trust domain -> PEM.
pub fn spiffe_bundles(secret: &Secret) -> std::collections::BTreeMap<String, String> {
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::SpiffeCertValidatorConfig;
    let Some(secret::Type::ValidationContext(v)) = &secret.r#type else {
        panic!("not a validation context")
    };
    let custom = v
        .custom_validator_config
        .as_ref()
        .expect("a custom validator");
    assert_eq!(custom.name, "envoy.tls.cert_validator.spiffe");
    let any = custom.typed_config.as_ref().unwrap();
    assert_eq!(
        any.type_url,
        "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.SPIFFECertValidatorConfig"
    );
    let config = SpiffeCertValidatorConfig::decode(any.value.as_slice()).unwrap();
    config
        .trust_domains
        .iter()
        .map(|td| {
            (
                td.name.clone(),
                String::from_utf8(bytes(&td.trust_bundle)).unwrap(),
            )
        })
        .collect()
}

/// The serial of the first certificate of a PEM chain, hex.
pub fn serial(chain_pem: &str) -> String {
    with_cert(chain_pem, |c| hex_serial(c.raw_serial()))
}

/// Bytes as lowercase hex.
pub fn hex_serial(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
