//! How SDS requests reach [`Sds`]: a router for the three methods with a prost codec
//! whose buffers start small, and the response stream type, framed without a buffer
//! kept per stream.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
};

use bytes::Bytes;
use http_body::Frame;

use envoy_types::pb::envoy::service::{
    discovery::v3::{DiscoveryRequest, DiscoveryResponse},
    secret::v3::secret_discovery_service_server::SecretDiscoveryService,
};
use prost::Message;
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tonic::{Request, Response, Status, Streaming, codec::Codec, metadata::MetadataMap};

use super::service::Sds;

/// What a stream task hands to the response stream. Boxed so that the channel's
/// fixed blocks of 32 slots stay small: an open stream is mostly idle, and an agent
/// may hold a hundred of them.
pub(super) type Outbound<T> = Result<Box<T>, Box<Status>>;

/// The response stream tonic reads: unboxes what the stream task sent.
#[derive(Debug)]
pub struct Unboxed<T>(pub(super) ReceiverStream<Outbound<T>>);

impl<T> Stream for Unboxed<T> {
    type Item = Result<T, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut self.0)
            .poll_next(cx)
            .map(|item| item.map(|r| r.map(|b| *b).map_err(|s| *s)))
    }
}

/// A response stream's body: each message as one gRPC frame in a buffer of exactly
/// its size, handed to HTTP/2 and freed once written; then the status as trailers.
/// tonic's own body keeps, for the life of the stream, a buffer as large as the
/// largest message it sent (a Secret with its chain: 4-8 KiB), and an open SDS
/// stream sends one message every 12 hours.
struct Framed<T> {
    stream: Unboxed<T>,
    done: bool,
}

/// `message` with the gRPC frame header (not compressed, 4-byte big-endian length).
fn frame(message: &impl Message) -> Result<Bytes, Status> {
    let len = message.encoded_len();
    let header = u32::try_from(len)
        .map_err(|_| Status::internal(format!("a response of {len} bytes is too large")))?;
    let mut out = Vec::with_capacity(5 + len);
    out.push(0);
    out.extend_from_slice(&header.to_be_bytes());
    message
        .encode(&mut out)
        .map_err(|e| Status::internal(format!("encoding a response: {e}")))?;
    Ok(Bytes::from(out))
}

/// The trailers that end a stream with `status`.
fn trailers(status: &Status) -> http::HeaderMap {
    let mut map = http::HeaderMap::new();
    if status.add_header(&mut map).is_err() {
        // Only a message or details that cannot be a header value: say INTERNAL.
        map.clear();
        map.insert("grpc-status", http::HeaderValue::from_static("13"));
    }
    map
}

impl<T: Message> http_body::Body for Framed<T> {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        let end = match ready!(Pin::new(&mut this.stream).poll_next(cx)) {
            Some(Ok(message)) => match frame(&message) {
                Ok(data) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                Err(status) => status,
            },
            Some(Err(status)) => status,
            None => Status::ok(""),
        };
        this.done = true;
        Poll::Ready(Some(Ok(Frame::trailers(trailers(&end)))))
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

/// A bidirectional streaming call: requests decoded by tonic (with [`SmallCodec`]),
/// the response stream framed by [`Framed`].
async fn streaming<B, Req, Resp, F, Fut>(
    req: http::Request<B>,
    call: F,
) -> http::Response<tonic::body::Body>
where
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<tonic::codegen::StdError> + Send + 'static,
    Req: Message + Default + Send + 'static,
    Resp: Message + Send + 'static,
    F: FnOnce(Request<Streaming<Req>>) -> Fut,
    Fut: Future<Output = Result<Response<Unboxed<Resp>>, Status>>,
{
    // Envoy does not compress SDS; nothing here decompresses.
    if let Some(encoding) = req.headers().get("grpc-encoding")
        && encoding != "identity"
    {
        return Status::unimplemented(format!(
            "request compression {encoding:?} is not supported (send uncompressed)"
        ))
        .into_http();
    }
    let (parts, body) = req.into_parts();
    let decoder = SmallCodec::<Resp, Req>::default().decoder();
    let requests = Streaming::new_request(decoder, body, None, Some(MAX_REQUEST_BYTES));
    let request = Request::from_parts(
        MetadataMap::from_headers(parts.headers),
        parts.extensions,
        requests,
    );
    match call(request).await {
        Err(status) => status.into_http(),
        Ok(response) => {
            let (metadata, stream, _) = response.into_parts();
            let mut http = http::Response::new(tonic::body::Body::new(Framed {
                stream,
                done: false,
            }));
            *http.headers_mut() = metadata.into_headers();
            http.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/grpc"),
            );
            http
        }
    }
}

/// The gRPC service as registered on the server. It routes the three SDS methods
/// to [`Sds`] like the generated `SecretDiscoveryServiceServer`, but with a decoder
/// whose buffer starts at 1 KiB instead of 8 KiB and a response body that keeps no
/// buffer ([`Framed`]): an SDS message is a few KiB at most and an open stream is
/// idle for hours, so buffers were most of what a stream cost in memory.
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
                    streaming(req, |r| async move { sds.stream_secrets(r).await }).await
                }
                Some("DeltaSecrets") => {
                    streaming(req, |r| async move { sds.delta_secrets(r).await }).await
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use http_body::Body as _;

    async fn next_frame(body: &mut Framed<DiscoveryResponse>) -> Option<Frame<Bytes>> {
        std::future::poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx))
            .await
            .map(|f| f.unwrap())
    }

    fn body(items: Vec<Outbound<DiscoveryResponse>>) -> Framed<DiscoveryResponse> {
        let (tx, rx) = tokio::sync::mpsc::channel(items.len().max(1));
        for item in items {
            tx.try_send(item).unwrap();
        }
        Framed {
            stream: Unboxed(ReceiverStream::new(rx)),
            done: false,
        }
    }

    #[tokio::test]
    async fn each_message_is_one_grpc_frame_of_its_own_size_then_status_ok() {
        let first = DiscoveryResponse {
            version_info: "v1".into(),
            nonce: "1".into(),
            ..Default::default()
        };
        let second = DiscoveryResponse {
            version_info: "v2".into(),
            nonce: "2".into(),
            ..Default::default()
        };
        let mut b = body(vec![
            Ok(Box::new(first.clone())),
            Ok(Box::new(second.clone())),
        ]);
        for sent in [first, second] {
            let data = next_frame(&mut b).await.unwrap().into_data().unwrap();
            assert_eq!(data[0], 0, "not compressed");
            let len = u32::from_be_bytes(data[1..5].try_into().unwrap()) as usize;
            assert_eq!(len, data.len() - 5);
            assert_eq!(DiscoveryResponse::decode(&data[5..]).unwrap(), sent);
        }
        // The sender is gone: the stream ends with OK.
        let trailers = next_frame(&mut b).await.unwrap().into_trailers().unwrap();
        assert_eq!(trailers["grpc-status"], "0");
        assert!(b.is_end_stream());
        assert!(next_frame(&mut b).await.is_none());
    }

    #[tokio::test]
    async fn an_error_ends_the_stream_with_its_status() {
        let mut b = body(vec![Err(Box::new(Status::invalid_argument(
            "\"Default\" is not a secret name",
        )))]);
        let trailers = next_frame(&mut b).await.unwrap().into_trailers().unwrap();
        assert_eq!(trailers["grpc-status"], "3");
        assert!(
            trailers["grpc-message"]
                .to_str()
                .unwrap()
                .contains("not%20a%20secret")
        );
        assert!(next_frame(&mut b).await.is_none());
    }
}
