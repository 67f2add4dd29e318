//! Counting each connection's requests: a tower layer that takes the connection's
//! counters from tonic's connect info and holds a request open until its response
//! body ends.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use super::pool::{ConnState, InFlight};

/// What tonic puts in each request of a connection ([`tonic::transport::server::Connected`]):
/// its TLS and TCP facts, and its counters, so a request finds its connection
/// without a look-up in the pool.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// What tonic's own `peer_certs` and `remote_addr` read.
    pub tls: tonic::transport::server::TlsConnectInfo<tonic::transport::server::TcpConnectInfo>,
    /// The connection's counters.
    pub conn: Arc<ConnState>,
}

/// Counts the requests of each connection (a gRPC call is open until its response
/// body ends), from the [`ConnInfo`] tonic puts in the request, which it replaces
/// with the TLS facts alone for the services below.
#[derive(Debug, Clone, Copy, Default)]
pub struct ActivityLayer;

impl<S> tower::Layer<S> for ActivityLayer {
    type Service = Activity<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Activity { inner }
    }
}

/// See [`ActivityLayer`].
#[derive(Debug, Clone)]
pub struct Activity<S> {
    inner: S,
}

impl<S, B, R> tower::Service<http::Request<B>> for Activity<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Tracked<R>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let open = request.extensions_mut().remove::<ConnInfo>().map(|info| {
            request.extensions_mut().insert(info.tls);
            info.conn.begin()
        });
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            Ok(response.map(|body| Tracked { body, _open: open }))
        })
    }
}

/// A response body that keeps its request counted as open until it ends.
#[derive(Debug)]
pub struct Tracked<B> {
    body: B,
    _open: Option<InFlight>,
}

impl<B> http_body::Body for Tracked<B>
where
    B: http_body::Body + Unpin,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}
