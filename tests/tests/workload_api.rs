//! signet-agent's SPIFFE Workload API driven by rust-spiffe's client (the `spiffe`
//! crate's `WorkloadApiClient`), against the real signet-ca: the X.509-SVID with its
//! key and bundle, the bundles, a rotation and a federated bundle pushed on the open
//! stream, and the standard's refusals.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use futures::StreamExt;
use signet_e2e::{
    TestCa,
    agent::{AgentSetup, TestAgent},
};
use spiffe::{TrustDomain, WorkloadApiClient};

const ID: &str = "spiffe://cluster.local/ns/batch/sa/report";

async fn client(socket: &std::path::Path) -> WorkloadApiClient {
    WorkloadApiClient::connect_to(format!("unix:{}", socket.display()))
        .await
        .unwrap()
}

/// The next message on a watch; 30 s is only a backstop.
async fn next<S, E>(stream: &mut S) -> spiffe::X509Context
where
    S: futures::Stream<Item = Result<spiffe::X509Context, E>> + Unpin,
    E: std::fmt::Debug,
{
    tokio::time::timeout(Duration::from_secs(30), stream.next())
        .await
        .expect("no message within 30 s")
        .expect("the stream ended")
        .unwrap()
}

/// A CA and an agent of `batch/report` serving the Workload API (with `extra`
/// flags), ready; the socket's path.
async fn start(extra: &[&str]) -> (AgentSetup, TestCa, TestAgent, std::path::PathBuf) {
    let s = AgentSetup::new();
    let ca = TestCa::start(&s.ca_args()).await;
    let socket = s.dir.path().join("spiffe/api.sock");
    let socket_arg = socket.display().to_string();
    let mut flags = vec!["--workload-api-socket", &socket_arg];
    flags.extend_from_slice(extra);
    let agent = TestAgent::start(&s.agent_args(&ca, "batch", "report", &flags)).await;
    agent.wait_ready().await;
    (s, ca, agent, socket)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_spiffe_fetches_the_svid_its_key_and_the_bundles() {
    let (s, _ca, agent, socket) = start(&[]).await;

    let client = client(&socket).await;
    // rust-spiffe checks the SVID itself: the key matches the leaf, the leaf names
    // one SPIFFE ID and is no CA.
    let svid = client.fetch_x509_svid().await.unwrap();
    assert_eq!(svid.spiffe_id().to_string(), ID);
    let root_pem = std::fs::read_to_string(s.dir.path().join("state/root-cert.pem")).unwrap();
    let root_der = pem::parse(&root_pem).unwrap().into_contents();

    let bundles = client.fetch_x509_bundles().await.unwrap();
    let td = TrustDomain::new("cluster.local").unwrap();
    let ours = bundles.get(&td).expect("our trust domain's bundle");
    assert_eq!(ours.authorities().len(), 1);
    assert_eq!(ours.authorities()[0].as_ref(), root_der.as_slice());

    let context = client.fetch_x509_context().await.unwrap();
    let default = context.default_svid().unwrap();
    assert_eq!(default.leaf().as_ref(), svid.leaf().as_ref());
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_and_a_new_federated_bundle_reach_the_open_stream() {
    let federation = tempfile::tempdir().unwrap();
    let federation_arg = federation.path().display().to_string();
    let (_s, _ca, agent, socket) =
        start(&["--secret-ttl", "4s", "--federated-bundles", &federation_arg]).await;

    let client = client(&socket).await;
    let mut contexts = Box::pin(client.stream_x509_contexts().await.unwrap());
    let first = next(&mut contexts).await;
    let first_leaf = first.default_svid().unwrap().leaf().as_ref().to_vec();

    // Half of 4 s: a new certificate comes on the same stream, unasked.
    let second = next(&mut contexts).await;
    assert_ne!(second.default_svid().unwrap().leaf().as_ref(), first_leaf);

    // A bundle of another trust domain appears in the directory: pushed too.
    let other = signet_e2e::TestRoot::p256("Other Root");
    std::fs::write(federation.path().join("example.org.pem"), &other.pem).unwrap();
    let td = spiffe::TrustDomain::new("example.org").unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let context = next(&mut contexts).await;
        if let Some(bundle) = context.bundle_set().get(&td) {
            assert_eq!(bundle.authorities().len(), 1);
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the federated bundle never came"
        );
    }
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_without_the_security_header_and_jwt_calls_are_refused() {
    use signet_proto::workload::{
        JwtsvidRequest, X509svidRequest, spiffe_workload_api_client::SpiffeWorkloadApiClient,
    };
    let (_s, _ca, agent, socket) = start(&[]).await;

    let path = socket.clone();
    let channel = tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        }))
        .await
        .unwrap();
    let mut raw = SpiffeWorkloadApiClient::new(channel);
    let err = raw
        .fetch_x509svid(X509svidRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    assert!(err.message().contains("workload.spiffe.io"), "{err}");

    let mut request = tonic::Request::new(JwtsvidRequest {
        audience: vec!["minio".into()],
        spiffe_id: String::new(),
    });
    request
        .metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    let err = raw.fetch_jwtsvid(request).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unimplemented, "{err}");
    agent.stop().await;
}
