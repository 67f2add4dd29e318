//! Any `:authority` on the SDS socket. gRPC clients on a Unix socket send whatever
//! they like there: Envoy's `google_grpc` and stock grpcio the socket path
//! (percent-encoded or not), grpc-java the raw path, others `localhost` or nothing.
//! The h2 crate refuses every value that is not an RFC 3986 authority and resets
//! the stream (PROTOCOL_ERROR), before tonic sees the request; it has no option to
//! relax that. So each connection's bytes from the client pass through
//! [`Normalized`]: frames go through untouched, except header blocks, which are
//! decoded (HPACK, keeping the client's dynamic table), have an unparsable
//! `:authority` replaced by `localhost`, and are encoded again for h2. Frame and
//! stream limits, flow control and everything the server sends are h2's as before.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::{Buf, BytesMut};
use loona_hpack::{Decoder, Encoder};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The client connection preface.
const PREFACE_LEN: usize = 24;
const FRAME_HEADER_LEN: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// The frame size the server advertises (h2's default SETTINGS_MAX_FRAME_SIZE, which
/// the SDS server keeps). A larger header frame is a FRAME_SIZE_ERROR, as h2 would say.
const MAX_FRAME: usize = 16_384;
/// The largest header block collected, compressed. hyper lets h2 accept header lists
/// of 16 KiB; this leaves room for that and no more than four frames.
const MAX_BLOCK: usize = 64 * 1024;
/// The largest header list decoded, counted as HTTP/2 does (name + value + 32 per
/// field). HPACK can expand a small block into a huge list (a 1-byte reference to a
/// 4 KiB table entry, repeated); past this the connection is closed before anything
/// is kept. Lists between hyper's 16 KiB and this pass to h2, which refuses them as
/// before.
const MAX_LIST: usize = 64 * 1024;
/// The HPACK table size h2 advertises (SETTINGS_HEADER_TABLE_SIZE default).
const TABLE_SIZE: usize = 4096;
/// What replaces an `:authority` h2 would refuse.
const REPLACEMENT: &[u8] = b"localhost";

enum State {
    /// Passing the preface through; bytes left.
    Preface(usize),
    /// Waiting for a frame header.
    FrameHeader,
    /// Passing a frame's payload through; bytes left.
    Payload(usize),
}

/// A header block being collected across HEADERS and CONTINUATION frames.
struct Block {
    stream: u32,
    end_stream: bool,
    fragment: Vec<u8>,
}

/// A client connection whose request headers h2 will accept. Writes go straight
/// to the connection.
pub(crate) struct Normalized<S> {
    inner: S,
    state: State,
    input: BytesMut,
    output: BytesMut,
    block: Option<Block>,
    decoder: Decoder<'static>,
    encoder: Encoder<'static>,
    eof: bool,
}

impl<S> std::fmt::Debug for Normalized<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Normalized").finish_non_exhaustive()
    }
}

fn protocol(why: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("HTTP/2 from the client: {why}"),
    )
}

impl<S> Normalized<S> {
    /// Wraps a freshly accepted connection.
    pub(crate) fn new(inner: S) -> Self {
        let mut decoder = Decoder::new();
        decoder.set_max_allowed_table_size(TABLE_SIZE);
        Self {
            inner,
            state: State::Preface(PREFACE_LEN),
            input: BytesMut::with_capacity(1024),
            output: BytesMut::with_capacity(1024),
            block: None,
            decoder,
            encoder: Encoder::new(),
            eof: false,
        }
    }

    /// Moves whatever complete pieces `input` holds to `output`.
    fn process(&mut self) -> io::Result<()> {
        loop {
            match self.state {
                State::Preface(left) | State::Payload(left) => {
                    let n = left.min(self.input.len());
                    if n == 0 && left > 0 {
                        return Ok(());
                    }
                    self.output.extend_from_slice(&self.input.split_to(n));
                    self.state = match (&self.state, left - n) {
                        (_, 0) => State::FrameHeader,
                        (State::Preface(_), rest) => State::Preface(rest),
                        (_, rest) => State::Payload(rest),
                    };
                }
                State::FrameHeader => {
                    if self.input.len() < FRAME_HEADER_LEN {
                        return Ok(());
                    }
                    let h = &self.input[..FRAME_HEADER_LEN];
                    let len = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
                    let (kind, flags) = (h[3], h[4]);
                    let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
                    if kind != HEADERS && kind != CONTINUATION {
                        if self.block.is_some() {
                            return Err(protocol("a frame inside a header block"));
                        }
                        self.output
                            .extend_from_slice(&self.input.split_to(FRAME_HEADER_LEN));
                        self.state = State::Payload(len);
                        continue;
                    }
                    if len > MAX_FRAME {
                        return Err(protocol("header frame larger than SETTINGS_MAX_FRAME_SIZE"));
                    }
                    if self.input.len() < FRAME_HEADER_LEN + len {
                        return Ok(());
                    }
                    self.input.advance(FRAME_HEADER_LEN);
                    let payload = self.input.split_to(len);
                    self.header_frame(kind, flags, stream, &payload)?;
                }
            }
        }
    }

    fn header_frame(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) -> io::Result<()> {
        let fragment = if kind == HEADERS {
            if self.block.is_some() {
                return Err(protocol("HEADERS inside a header block"));
            }
            let mut body = payload;
            let mut pad = 0;
            if flags & PADDED != 0 {
                let (&n, rest) = body.split_first().ok_or_else(|| protocol("bad padding"))?;
                pad = usize::from(n);
                body = rest;
            }
            if flags & PRIORITY != 0 {
                body = body.get(5..).ok_or_else(|| protocol("bad priority"))?;
            }
            let end = body
                .len()
                .checked_sub(pad)
                .ok_or_else(|| protocol("bad padding"))?;
            self.block = Some(Block {
                stream,
                end_stream: flags & END_STREAM != 0,
                fragment: Vec::new(),
            });
            &body[..end]
        } else {
            match &self.block {
                Some(b) if b.stream == stream => payload,
                _ => return Err(protocol("CONTINUATION outside a header block")),
            }
        };
        let Some(block) = self.block.as_mut() else {
            return Err(protocol("no header block"));
        };
        if block.fragment.len() + fragment.len() > MAX_BLOCK {
            return Err(protocol("header block too large"));
        }
        block.fragment.extend_from_slice(fragment);
        if flags & END_HEADERS != 0
            && let Some(block) = self.block.take()
        {
            self.rewrite(block)?;
        }
        Ok(())
    }

    /// Decodes a complete header block, mends `:authority`, and writes it out again.
    fn rewrite(&mut self, block: Block) -> io::Result<()> {
        let mut headers: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let mut size = 0usize;
        let decoder = &mut self.decoder;
        // The decoder must see the whole block to keep its table in step with the
        // client's, so past the limit fields are only counted, not kept.
        let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            decoder.decode_with_cb(&block.fragment, |name, value| {
                size = size.saturating_add(name.len() + value.len() + 32);
                if size <= MAX_LIST {
                    headers.push((name.into_owned(), value.into_owned()));
                }
            })
        }));
        match decoded {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(protocol(&format!("HPACK: {e:?}"))),
            Err(_) => return Err(protocol("HPACK: undecodable header block")),
        }
        if size > MAX_LIST {
            return Err(protocol("header list larger than 64 KiB once decoded"));
        }
        for (name, value) in &mut headers {
            if name == b":authority" && http::uri::Authority::try_from(value.as_slice()).is_err() {
                tracing::debug!(authority = %String::from_utf8_lossy(value), "replacing an :authority h2 would refuse");
                *value = REPLACEMENT.to_vec();
            }
        }
        let encoded = self
            .encoder
            .encode(headers.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));
        let mut chunks = encoded.chunks(MAX_FRAME).peekable();
        let mut first = true;
        // An empty block still needs its HEADERS frame.
        let empty: &[u8] = &[];
        if chunks.peek().is_none() {
            self.frame(
                HEADERS,
                END_HEADERS | if block.end_stream { END_STREAM } else { 0 },
                block.stream,
                empty,
            );
            return Ok(());
        }
        while let Some(chunk) = chunks.next() {
            let last = chunks.peek().is_none();
            let mut flags = if last { END_HEADERS } else { 0 };
            let kind = if first {
                if block.end_stream {
                    flags |= END_STREAM;
                }
                HEADERS
            } else {
                CONTINUATION
            };
            self.frame(kind, flags, block.stream, chunk);
            first = false;
        }
        Ok(())
    }

    fn frame(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        let len = payload.len();
        self.output.extend_from_slice(&[
            (len >> 16) as u8,
            (len >> 8) as u8,
            len as u8,
            kind,
            flags,
        ]);
        self.output.extend_from_slice(&stream.to_be_bytes());
        self.output.extend_from_slice(payload);
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Normalized<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if !self.output.is_empty() {
                let n = self.output.len().min(buf.remaining());
                buf.put_slice(&self.output[..n]);
                self.output.advance(n);
                return Poll::Ready(Ok(()));
            }
            if self.eof {
                return Poll::Ready(Ok(()));
            }
            let mut chunk = [0u8; 8192];
            let mut read = ReadBuf::new(&mut chunk);
            let this = &mut *self;
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut read))?;
            if read.filled().is_empty() {
                this.eof = true;
                continue;
            }
            this.input.extend_from_slice(read.filled());
            this.process()?;
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Normalized<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for Normalized<tokio::net::UnixStream> {
    type ConnectInfo = <tokio::net::UnixStream as tonic::transport::server::Connected>::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// Frames as read back: (kind, flags, stream, payload).
    fn frames(mut bytes: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
        let mut out = Vec::new();
        while bytes.len() >= FRAME_HEADER_LEN {
            let len =
                usize::from(bytes[0]) << 16 | usize::from(bytes[1]) << 8 | usize::from(bytes[2]);
            let stream = u32::from_be_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]);
            out.push((bytes[3], bytes[4], stream, bytes[9..9 + len].to_vec()));
            bytes = &bytes[9 + len..];
        }
        out
    }

    async fn through(input: Vec<u8>) -> io::Result<Vec<u8>> {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        client.write_all(&input).await?;
        drop(client);
        let mut normalized = Normalized::new(server);
        let mut out = Vec::new();
        normalized.read_to_end(&mut out).await?;
        Ok(out)
    }

    fn request(encoder: &mut Encoder<'_>, authority: &[u8]) -> Vec<u8> {
        encoder.encode([
            (&b":method"[..], &b"POST"[..]),
            (b":scheme", b"http"),
            (
                b":path",
                b"/envoy.service.secret.v3.SecretDiscoveryService/StreamSecrets",
            ),
            (b":authority", authority),
            (b"content-type", b"application/grpc"),
        ])
    }

    fn decoded(decoder: &mut Decoder<'_>, block: &[u8]) -> Vec<(String, String)> {
        let mut out = Vec::new();
        decoder
            .decode_with_cb(block, |n, v| {
                out.push((
                    String::from_utf8_lossy(&n).into_owned(),
                    String::from_utf8_lossy(&v).into_owned(),
                ))
            })
            .unwrap();
        out
    }

    #[tokio::test]
    async fn an_unusable_authority_becomes_localhost_and_the_rest_passes_untouched() {
        let mut client = Encoder::new();
        let data = frame(0x0, 0x1, 1, b"\0\0\0\0\x02hi");
        let mut input = PREFACE.to_vec();
        input.extend(frame(0x4, 0, 0, &[])); // SETTINGS
        // Padded, with priority, split across a CONTINUATION.
        let block = request(&mut client, b"%2Ftmp%2Fsds.sock");
        let (a, b) = block.split_at(block.len() / 2);
        let mut headers = vec![3u8];
        headers.extend([0, 0, 0, 0, 16]);
        headers.extend_from_slice(a);
        headers.extend([0, 0, 0]);
        input.extend(frame(HEADERS, PADDED | PRIORITY, 1, &headers));
        input.extend(frame(CONTINUATION, END_HEADERS, 1, b));
        input.extend(&data);
        // A second request on the same connection: the client's dynamic table now
        // holds entries the second block refers to.
        let block = request(&mut client, b"/var/run/secrets/workload-spiffe-uds/socket");
        input.extend(frame(HEADERS, END_HEADERS | END_STREAM, 3, &block));
        let out = through(input).await.unwrap();
        assert_eq!(&out[..PREFACE.len()], PREFACE);
        let got = frames(&out[PREFACE.len()..]);
        assert_eq!(got.len(), 4);
        assert_eq!((got[0].0, got[0].3.len()), (0x4, 0), "SETTINGS as sent");
        let mut server = Decoder::new();
        let (kind, flags, stream, first) = &got[1];
        assert_eq!((*kind, *flags, *stream), (HEADERS, END_HEADERS, 1));
        let headers = decoded(&mut server, first);
        assert!(
            headers.contains(&(":authority".into(), "localhost".into())),
            "{headers:?}"
        );
        assert!(headers.contains(&(
            ":path".into(),
            "/envoy.service.secret.v3.SecretDiscoveryService/StreamSecrets".into()
        )));
        assert_eq!(got[2].0, 0x0);
        assert_eq!(
            frame(got[2].0, got[2].1, got[2].2, &got[2].3),
            data,
            "DATA untouched"
        );
        let (kind, flags, stream, second) = &got[3];
        assert_eq!(
            (*kind, *flags, *stream),
            (HEADERS, END_HEADERS | END_STREAM, 3)
        );
        let headers = decoded(&mut server, second);
        assert!(headers.contains(&(":authority".into(), "localhost".into())));
        assert_eq!(headers.len(), 5);
    }

    #[tokio::test]
    async fn an_empty_authority_becomes_localhost() {
        let mut client = Encoder::new();
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, END_HEADERS, 1, &request(&mut client, b"")));
        let out = through(input).await.unwrap();
        let got = frames(&out[PREFACE.len()..]);
        let headers = decoded(&mut Decoder::new(), &got[0].3);
        assert!(headers.contains(&(":authority".into(), "localhost".into())));
    }

    #[tokio::test]
    async fn a_valid_authority_is_kept() {
        let mut client = Encoder::new();
        let mut input = PREFACE.to_vec();
        input.extend(frame(
            HEADERS,
            END_HEADERS,
            1,
            &request(&mut client, b"sds-grpc"),
        ));
        let out = through(input).await.unwrap();
        let got = frames(&out[PREFACE.len()..]);
        let headers = decoded(&mut Decoder::new(), &got[0].3);
        assert!(headers.contains(&(":authority".into(), "sds-grpc".into())));
    }

    #[tokio::test]
    async fn broken_framing_closes_the_connection() {
        let mut client = Encoder::new();
        let block = request(&mut client, b"x");
        for bad in [
            // CONTINUATION with no HEADERS before it.
            frame(CONTINUATION, END_HEADERS, 1, &block),
            // A DATA frame in the middle of a header block.
            [frame(HEADERS, 0, 1, &block), frame(0x0, 0, 1, b"x")].concat(),
            // Padding longer than the frame.
            frame(HEADERS, END_HEADERS | PADDED, 1, &[200, 1, 2]),
            // Garbage HPACK.
            frame(
                HEADERS,
                END_HEADERS,
                1,
                &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
            ),
        ] {
            let mut input = PREFACE.to_vec();
            input.extend(bad);
            assert!(through(input).await.is_err());
        }
    }

    #[tokio::test]
    async fn a_header_frame_over_the_frame_size_is_refused() {
        let mut client = Encoder::new();
        let mut block = request(&mut client, b"x");
        // A legal block padded with distinct literal headers to just over 16 KiB.
        let mut i = 0;
        while block.len() <= MAX_FRAME {
            let value = format!("{i:01000}");
            block.extend(client.encode([(&b"x-filler"[..], value.as_bytes())]));
            i += 1;
        }
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, END_HEADERS, 1, &block));
        let err = through(input).await.unwrap_err();
        assert!(err.to_string().contains("SETTINGS_MAX_FRAME_SIZE"), "{err}");
        // The same block in two frames is accepted (and left to h2's list limit).
        let (a, b) = block.split_at(MAX_FRAME / 2);
        let (b, c) = b.split_at(MAX_FRAME / 2);
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, 0, 1, a));
        input.extend(frame(CONTINUATION, 0, 1, b));
        input.extend(frame(CONTINUATION, END_HEADERS, 1, c));
        assert!(through(input).await.is_ok());
    }

    #[tokio::test]
    async fn a_header_block_that_expands_past_the_limit_is_refused() {
        // One 4 KiB entry in the dynamic table, then a single frame of 1-byte
        // references to it: 16 KiB on the wire, 70 MiB once decoded.
        let mut wire = Vec::new();
        let value = vec![b'v'; 4000];
        // Literal with incremental indexing, new name.
        wire.push(0x40);
        wire.push(1);
        wire.push(b'x');
        wire.push(0x7f);
        let mut n = value.len() - 127;
        while n >= 128 {
            wire.push((n % 128) as u8 | 0x80);
            n /= 128;
        }
        wire.push(n as u8);
        wire.extend(&value);
        // Index 62 is the newest dynamic entry.
        while wire.len() < MAX_FRAME {
            wire.push(0x80 | 62);
        }
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, END_HEADERS, 1, &wire));
        let err = through(input).await.unwrap_err();
        assert!(err.to_string().contains("64 KiB once decoded"), "{err}");
    }

    #[tokio::test]
    async fn continuation_frames_that_never_end_the_block_are_refused() {
        // HEADERS then CONTINUATION frames of 16 KiB each, none with END_HEADERS:
        // without the cap on the compressed block they would be buffered forever.
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, 0, 1, &[0x82]));
        let chunk = vec![0u8; MAX_FRAME];
        for _ in 0..(MAX_BLOCK / MAX_FRAME + 2) {
            input.extend(frame(CONTINUATION, 0, 1, &chunk));
        }
        let err = through(input).await.unwrap_err();
        assert!(err.to_string().contains("header block too large"), "{err}");
    }
}
