//! How SDS requests reach [`Sds`]: a router for the three methods with a prost codec
//! whose buffers start small, and the response stream type.

use std::sync::Arc;

use envoy_types::pb::envoy::service::{
    discovery::v3::{
        DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
    },
    secret::v3::secret_discovery_service_server::SecretDiscoveryService,
};
use prost::Message;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::service::Sds;

/// What a stream task hands to the response stream. Boxed so that the channel's
/// fixed blocks of 32 slots stay small: an open stream is mostly idle, and an agent
/// may hold a hundred of them.
pub(super) type Outbound<T> = Result<Box<T>, Box<Status>>;

/// The response stream tonic reads: unboxes what the stream task sent.
#[derive(Debug)]
pub struct Unboxed<T>(pub(super) ReceiverStream<Outbound<T>>);

impl<T> tokio_stream::Stream for Unboxed<T> {
    type Item = Result<T, Status>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        std::pin::Pin::new(&mut self.0)
            .poll_next(cx)
            .map(|item| item.map(|r| r.map(|b| *b).map_err(|s| *s)))
    }
}

/// The gRPC service as registered on the server. It routes the three SDS methods
/// to [`Sds`] like the generated `SecretDiscoveryServiceServer`, but with a codec
/// whose buffers start at 1 KiB instead of 8 KiB: an SDS message is a few KiB at most
/// and every open stream holds one buffer each way, so this is most of what a stream
/// costs in memory.
#[derive(Debug, Clone)]
pub struct SdsServer(pub(super) Arc<Sds>);

const SERVICE: &str = "envoy.service.secret.v3.SecretDiscoveryService";
/// Largest request accepted (a DiscoveryRequest names a few secrets).
const MAX_REQUEST_BYTES: usize = 1024 * 1024;

impl tonic::server::NamedService for SdsServer {
    const NAME: &'static str = SERVICE;
}

/// prost's codec with small initial buffers.
#[derive(Debug)]
struct SmallCodec<T, U>(std::marker::PhantomData<(T, U)>);

impl<T, U> Default for SmallCodec<T, U> {
    fn default() -> Self {
        Self(std::marker::PhantomData)
    }
}

fn buffers() -> tonic::codec::BufferSettings {
    tonic::codec::BufferSettings::new(1024, 32 * 1024)
}

impl<T, U> tonic::codec::Codec for SmallCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = <tonic_prost::ProstCodec<T, U> as tonic::codec::Codec>::Encoder;
    type Decoder = <tonic_prost::ProstCodec<T, U> as tonic::codec::Codec>::Decoder;

    fn encoder(&mut self) -> Self::Encoder {
        tonic_prost::ProstCodec::<T, U>::raw_encoder(buffers())
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstCodec::<T, U>::raw_decoder(buffers())
    }
}

struct StreamSvc(Arc<Sds>);
impl tonic::server::StreamingService<DiscoveryRequest> for StreamSvc {
    type Response = DiscoveryResponse;
    type ResponseStream = Unboxed<DiscoveryResponse>;
    type Future = tonic::codegen::BoxFuture<Response<Self::ResponseStream>, Status>;
    fn call(&mut self, request: Request<Streaming<DiscoveryRequest>>) -> Self::Future {
        let sds = self.0.clone();
        Box::pin(async move { sds.stream_secrets(request).await })
    }
}

struct DeltaSvc(Arc<Sds>);
impl tonic::server::StreamingService<DeltaDiscoveryRequest> for DeltaSvc {
    type Response = DeltaDiscoveryResponse;
    type ResponseStream = Unboxed<DeltaDiscoveryResponse>;
    type Future = tonic::codegen::BoxFuture<Response<Self::ResponseStream>, Status>;
    fn call(&mut self, request: Request<Streaming<DeltaDiscoveryRequest>>) -> Self::Future {
        let sds = self.0.clone();
        Box::pin(async move { sds.delta_secrets(request).await })
    }
}

struct FetchSvc(Arc<Sds>);
impl tonic::server::UnaryService<DiscoveryRequest> for FetchSvc {
    type Response = DiscoveryResponse;
    type Future = tonic::codegen::BoxFuture<Response<DiscoveryResponse>, Status>;
    fn call(&mut self, request: Request<DiscoveryRequest>) -> Self::Future {
        let sds = self.0.clone();
        Box::pin(async move { sds.fetch_secrets(request).await })
    }
}

impl<B> tower::Service<http::Request<B>> for SdsServer
where
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<tonic::codegen::StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = tonic::codegen::BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let sds = self.0.clone();
        let path = req.uri().path().to_owned();
        let method = path
            .strip_prefix(&format!("/{SERVICE}/"))
            .map(str::to_owned);
        Box::pin(async move {
            Ok(match method.as_deref() {
                Some("StreamSecrets") => {
                    let mut grpc = tonic::server::Grpc::new(SmallCodec::default())
                        .apply_max_message_size_config(Some(MAX_REQUEST_BYTES), None);
                    grpc.streaming(StreamSvc(sds), req).await
                }
                Some("DeltaSecrets") => {
                    let mut grpc = tonic::server::Grpc::new(SmallCodec::default())
                        .apply_max_message_size_config(Some(MAX_REQUEST_BYTES), None);
                    grpc.streaming(DeltaSvc(sds), req).await
                }
                Some("FetchSecrets") => {
                    let mut grpc = tonic::server::Grpc::new(SmallCodec::default())
                        .apply_max_message_size_config(Some(MAX_REQUEST_BYTES), None);
                    grpc.unary(FetchSvc(sds), req).await
                }
                _ => Status::unimplemented(format!("{path} is not a method of {SERVICE}"))
                    .into_http(),
            })
        })
    }
}
