//! The TLS accept loop: handshakes run concurrently under a deadline, each
//! connection admitted by the pool (see [`crate::conns`]) and wrapped in a [`Conn`]
//! that fails its reads and writes once one of its deadlines cuts it.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration as StdDuration,
};

use signet_tls::{HandshakeFailure, Negotiated, ServerConfigs};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{mpsc, watch},
};
use tokio_rustls::server::TlsStream;

use super::HANDSHAKE_TIMEOUT;
use crate::{
    conns::{ConnInfo, Deadlines, Pool, Refused},
    metrics::Metrics,
};

/// The gRPC listener's name in the TLS metrics.
const LISTENER: &str = "grpc";

/// Accepts TCP connections and completes TLS handshakes concurrently, so one slow
/// client cannot hold up the others. Each connection holds a slot of `pool` from
/// accept to close (see [`crate::conns`]); a connection still open `cut_after` its
/// handshake is cut. Each handshake is counted by the group it settled on, or by why
/// it failed.
pub(super) async fn accept_tls(
    listener: TcpListener,
    tls: Arc<ServerConfigs>,
    cut_after: StdDuration,
    pool: Arc<Pool>,
    metrics: Metrics,
    conns: mpsc::Sender<Result<Conn, std::io::Error>>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            accepted = listener.accept() => accepted,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Typically out of file descriptors: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(StdDuration::from_millis(100)).await;
                continue;
            }
        };
        let slot = match pool.admit(peer) {
            Ok(slot) => slot,
            Err(refused) => {
                let limit = match refused {
                    Refused::PeerShare(_) => "connections_per_peer",
                    Refused::Full(_) => "connections",
                };
                metrics.limit_rejections.with_label_values(&[limit]).inc();
                tracing::debug!(%peer, reason = %refused, "closing a new connection");
                continue;
            }
        };
        if slot.evicted {
            metrics
                .connections_closed
                .with_label_values(&[crate::conns::Cut::Evicted.label()])
                .inc();
        }
        let _ = tcp.set_nodelay(true);
        let tls = tls.clone();
        let conns = conns.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let evicted = Deadlines::evicted(&slot);
            let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, signet_tls::accept(&tls, tcp));
            let done = tokio::select! {
                _ = evicted => {
                    tracing::debug!(%peer, "evicted during its TLS handshake");
                    return;
                }
                done = handshake => done,
            };
            if let Some(tls) = handshake_done(done, peer, &metrics, LISTENER) {
                let _ = conns
                    .send(Ok(Conn {
                        tls,
                        deadlines: Deadlines::start(slot, cut_after),
                        closed: metrics.connections_closed.clone(),
                        counted: false,
                    }))
                    .await;
            }
        });
    }
}

/// Counts and logs a handshake's outcome on `listener`: the group and version it
/// settled on, or why it failed.
pub(super) fn handshake_done(
    done: Result<std::io::Result<TlsStream<TcpStream>>, tokio::time::error::Elapsed>,
    peer: std::net::SocketAddr,
    metrics: &Metrics,
    listener: &str,
) -> Option<TlsStream<TcpStream>> {
    let reason = match done {
        Ok(Ok(tls)) => {
            let Negotiated { group, version } = Negotiated::of(tls.get_ref().1);
            metrics
                .tls_handshakes
                .with_label_values(&[listener, group, version])
                .inc();
            tracing::debug!(%peer, %listener, %group, %version, "TLS handshake complete");
            return Some(tls);
        }
        Ok(Err(e)) => {
            let reason = HandshakeFailure::of(&e).label();
            tracing::debug!(%peer, %listener, %reason, error = %e, "TLS handshake failed");
            reason
        }
        Err(_) => {
            tracing::debug!(%peer, %listener, "TLS handshake timed out");
            "timeout"
        }
    };
    metrics
        .tls_handshake_failures
        .with_label_values(&[listener, reason])
        .inc();
    None
}

/// A TLS connection and its deadlines (with the pool slot it holds until dropped).
/// tonic closes a connection gracefully at its maximum age; one evicted, silent, idle
/// or past the grace period after its maximum age gets its reads and writes failed
/// here, which closes it.
#[derive(Debug)]
pub(super) struct Conn {
    tls: TlsStream<TcpStream>,
    deadlines: Deadlines,
    closed: prometheus::IntCounterVec,
    counted: bool,
}

impl Conn {
    fn cut(&mut self, cx: &mut Context<'_>) -> Option<std::io::Error> {
        let cut = self.deadlines.poll_cut(cx)?;
        if !self.counted {
            self.counted = true;
            // An evicted connection was counted when it was chosen.
            if cut != crate::conns::Cut::Evicted {
                self.closed.with_label_values(&[cut.label()]).inc();
            }
            if let Ok(peer) = self.tls.get_ref().0.peer_addr() {
                tracing::debug!(%peer, reason = cut.label(), "connection closed by the CA");
            }
        }
        Some(Deadlines::error(cut))
    }
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        ConnInfo {
            tls: self.tls.connect_info(),
            conn: self.deadlines.conn().clone(),
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if let Some(e) = self.cut(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.tls).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if let Some(e) = self.cut(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.tls).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        if let Some(e) = self.cut(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.tls).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tls.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tls).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tls).poll_shutdown(cx)
    }
}
