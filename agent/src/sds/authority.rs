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
//!
//! The work per byte received is bounded: a header block holds at most
//! [`MAX_BLOCK`] bytes in [`MAX_BLOCK_FRAMES`] frames (empty CONTINUATION frames
//! count, since h2's own flood limit never sees them), at most
//! [`hpack::MAX_FIELDS`] fields whose Huffman strings are made plain by a
//! table-driven decoder first; no more input is taken while more than
//! [`OUTPUT_HIGH`] bytes wait for h2, and large buffers are given back once drained;
//! a connection whose preface or header block stays incomplete for
//! [`INCOMPLETE_TIMEOUT`] is closed.
//!
//! Every byte here comes from any local process, so the parsing is fuzzed
//! (`fuzz/fuzz_targets/sds_authority.rs`, through [`rewrite`]). This module, its
//! `hpack` helper and that target can go once h2 lets a server accept any
//! `:authority` (or tonic hands such requests through): then h2's own parser is the
//! only one on the socket.

use std::{
    future::Future,
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
/// field): hyper's own limit for what h2 accepts (16 KiB), so a list h2 would refuse
/// closes the connection here, before it is re-encoded. HPACK can expand a small
/// block into a huge list (a 1-byte reference to a 4 KiB table entry, repeated).
const MAX_LIST: usize = 16 * 1024;
/// The HPACK table size h2 advertises (SETTINGS_HEADER_TABLE_SIZE default).
const TABLE_SIZE: usize = 4096;
/// Frames one header block may span. A client with the largest frames needs 4 for
/// [`MAX_BLOCK`]; this leaves room for small frames, and none for a flood of empty
/// CONTINUATION frames, which h2 never sees (it gets the block in one piece).
const MAX_BLOCK_FRAMES: usize = 64;
/// Bytes waiting for h2 past which no more input is read, so h2 drains them first.
const OUTPUT_HIGH: usize = 64 * 1024;
/// Buffers grown past this are given back once empty, so a burst does not stay
/// resident.
const KEEP_CAPACITY: usize = 16 * 1024;
/// Bytes read from the client at a time.
const READ_CHUNK: usize = 8 * 1024;
/// Bytes taken from the client and made for h2 before the connection's task yields
/// to the others: the agent runs on one thread, and a connection that always has
/// input must not keep the real clients' connections waiting.
const YIELD_EVERY: usize = 16 * 1024;
/// How long the preface or a header block may stay incomplete.
const INCOMPLETE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
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
    /// Frames so far, empty ones included.
    frames: usize,
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
    /// Armed while the preface or a header block is incomplete.
    incomplete: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Prefaces and header blocks finished so far, and that count when the timer
    /// was armed.
    finished: u64,
    armed_at: u64,
    /// Bytes read since this connection's task last yielded.
    since_yield: usize,
    /// The most `output` and `input` held since they were last empty: `BytesMut`
    /// says only what is left of its allocation after the bytes taken from it.
    output_peak: usize,
    input_peak: usize,
    /// Buffers given back so far.
    #[cfg(test)]
    released: usize,
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
            incomplete: None,
            finished: 0,
            armed_at: 0,
            since_yield: 0,
            output_peak: 0,
            input_peak: 0,
            #[cfg(test)]
            released: 0,
        }
    }

    /// Whether the connection is in the middle of its preface, a frame header, a
    /// header frame (collected whole before it is looked at) or a header block.
    fn is_incomplete(&self) -> bool {
        matches!(self.state, State::Preface(_))
            || self.block.is_some()
            || (matches!(self.state, State::FrameHeader) && !self.input.is_empty())
    }

    /// Moves whatever complete pieces `input` holds to `output`, stopping once
    /// `output` holds [`OUTPUT_HIGH`] bytes (the rest waits in `input`).
    fn process(&mut self) -> io::Result<()> {
        while self.output.len() < OUTPUT_HIGH {
            match self.state {
                State::Preface(left) | State::Payload(left) => {
                    let n = left.min(self.input.len());
                    if n == 0 && left > 0 {
                        return Ok(());
                    }
                    self.output.extend_from_slice(&self.input.split_to(n));
                    if matches!(self.state, State::Preface(_)) && left == n {
                        self.finished += 1;
                    }
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
        Ok(())
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
                frames: 0,
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
        block.frames += 1;
        if block.frames > MAX_BLOCK_FRAMES {
            return Err(protocol(&format!(
                "a header block in more than {MAX_BLOCK_FRAMES} frames"
            )));
        }
        block.fragment.extend_from_slice(fragment);
        if flags & END_HEADERS != 0
            && let Some(block) = self.block.take()
        {
            self.finished += 1;
            self.rewrite(block)?;
        }
        Ok(())
    }

    /// Decodes a complete header block, mends `:authority`, and writes it out again.
    fn rewrite(&mut self, block: Block) -> io::Result<()> {
        // Fields counted, literals sized and Huffman strings made plain first, so
        // the decoder's work on what is left is bounded (see `hpack`).
        let fragment =
            super::hpack::plain(&block.fragment, MAX_LIST).map_err(|e| protocol(&e.to_string()))?;
        drop(block.fragment);
        let mut headers: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let mut size = 0usize;
        let decoder = &mut self.decoder;
        // The decoder must see the whole block to keep its table in step with the
        // client's, so past the limit fields are only counted, not kept (there are
        // at most `hpack::MAX_FIELDS`, each a table entry of at most 4 KiB).
        let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            decoder.decode_with_cb(&fragment, |name, value| {
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
            return Err(protocol("header list larger than 16 KiB once decoded"));
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

/// The client's bytes `input`, as h2 would be given them had they all arrived at
/// once, or why the connection would be closed: [`Normalized`]'s parsing without its
/// I/O, for the fuzz target.
#[doc(hidden)]
pub fn rewrite(input: &[u8]) -> io::Result<Vec<u8>> {
    let mut normalized = Normalized::new(());
    normalized.input.extend_from_slice(input);
    let mut out = Vec::new();
    loop {
        normalized.process()?;
        if normalized.output.is_empty() {
            return Ok(out);
        }
        out.extend_from_slice(&normalized.output.split());
    }
}

/// Spends what is left of the task's tokio budget, so the task yields now. tokio
/// wakes a task that ran out of budget only after polling for I/O: a waker of our own
/// would let connections that always have input keep the runtime from ever looking
/// for the real clients' I/O (it does so every 61 tasks when its queue is never
/// empty). Outside a runtime there is no budget, and a wake of our own does.
fn spend_budget(cx: &mut Context<'_>) -> Poll<()> {
    for _ in 0..1024 {
        match tokio::task::coop::poll_proceed(cx) {
            Poll::Ready(progress) => progress.made_progress(),
            Poll::Pending => return Poll::Pending,
        }
    }
    cx.waker().wake_by_ref();
    Poll::Pending
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
                if self.output.is_empty() {
                    if self.output_peak > KEEP_CAPACITY {
                        self.output = BytesMut::new();
                        #[cfg(test)]
                        {
                            self.released += 1;
                        }
                    }
                    self.output_peak = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if self.since_yield >= YIELD_EVERY {
                self.since_yield = 0;
                if spend_budget(cx).is_pending() {
                    return Poll::Pending;
                }
            }
            // What is already here first: the output bound may have left some.
            let before = self.output.len();
            self.process()?;
            // What it made counts as work too: a small block can decode to 16 KiB.
            self.since_yield += self.output.len() - before;
            self.output_peak = self.output_peak.max(self.output.len());
            if !self.output.is_empty() {
                continue;
            }
            if self.input.is_empty() {
                if self.input_peak > KEEP_CAPACITY {
                    self.input = BytesMut::new();
                }
                self.input_peak = 0;
            }
            if self.eof {
                return Poll::Ready(Ok(()));
            }
            let this = &mut *self;
            // A client that leaves its preface or a header block unfinished is cut
            // after a while; one between requests may idle as long as it likes.
            if this.is_incomplete() {
                // A timer per unfinished piece: re-armed when one was finished since.
                if this.incomplete.is_none() || this.armed_at != this.finished {
                    this.incomplete = Some(Box::pin(tokio::time::sleep(INCOMPLETE_TIMEOUT)));
                    this.armed_at = this.finished;
                }
                if let Some(timer) = this.incomplete.as_mut()
                    && timer.as_mut().poll(cx).is_ready()
                {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "HTTP/2 from the client: preface or header block unfinished for 10 s",
                    )));
                }
            } else {
                this.incomplete = None;
            }
            let mut chunk = [0u8; READ_CHUNK];
            let mut read = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut read))?;
            this.since_yield += read.filled().len();
            if read.filled().is_empty() {
                this.eof = true;
                continue;
            }
            // Input is read only when what was there could make no progress, so it
            // holds at most a partial frame and one chunk.
            this.input.extend_from_slice(read.filled());
            this.input_peak = this.input_peak.max(this.input.len());
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
        // The same block in three frames passes the frame check, and is refused for
        // the list it decodes to (over hyper's 16 KiB) instead.
        let (a, b) = block.split_at(MAX_FRAME / 2);
        let (b, c) = b.split_at(MAX_FRAME / 2);
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, 0, 1, a));
        input.extend(frame(CONTINUATION, 0, 1, b));
        input.extend(frame(CONTINUATION, END_HEADERS, 1, c));
        let err = through(input).await.unwrap_err();
        assert!(err.to_string().contains("once decoded"), "{err}");
        // Its first 12 KiB of fields, in two frames, are accepted.
        let mut list = Vec::new();
        let mut decoder = Decoder::new();
        decoder
            .decode_with_cb(&block, |n, v| list.push((n.into_owned(), v.into_owned())))
            .unwrap();
        let mut encoder = Encoder::new();
        let mut fitting = Vec::new();
        let mut size = 0;
        for (n, v) in &list {
            size += n.len() + v.len() + 32;
            if size > 12 * 1024 {
                break;
            }
            fitting.push((n.as_slice(), v.as_slice()));
        }
        let small = encoder.encode(fitting.iter().copied());
        let (a, b) = small.split_at(small.len() / 2);
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, 0, 1, a));
        input.extend(frame(CONTINUATION, END_HEADERS, 1, b));
        assert!(through(input).await.is_ok());
    }

    #[tokio::test]
    async fn a_header_block_that_expands_past_the_limit_is_refused() {
        // One 4 KiB entry in the dynamic table, then 1-byte references to it.
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
        // Index 62 is the newest dynamic entry: 200 references are 200 bytes on the
        // wire and 800 KiB once decoded (5 are already past the limit).
        let entry = wire.clone();
        for _ in 0..200 {
            wire.push(0x80 | 62);
        }
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, END_HEADERS, 1, &wire));
        let err = through(input).await.unwrap_err();
        assert!(err.to_string().contains("16 KiB once decoded"), "{err}");
        // 16 KiB of them: refused for the field count before anything is decoded.
        let mut wire = entry;
        while wire.len() < MAX_FRAME {
            wire.push(0x80 | 62);
        }
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, END_HEADERS, 1, &wire));
        let err = through(input).await.unwrap_err();
        assert!(
            err.to_string().contains("header fields in one block"),
            "{err}"
        );
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

    #[tokio::test]
    async fn empty_continuation_frames_cannot_flood() {
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, 0, 1, &[0x82]));
        for _ in 0..(MAX_BLOCK_FRAMES + 10) {
            input.extend(frame(CONTINUATION, 0, 1, &[]));
        }
        let err = through(input).await.unwrap_err();
        assert!(err.to_string().contains("frames"), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn an_unfinished_preface_or_header_block_is_cut() {
        for partial in [
            PREFACE[..10].to_vec(),
            // A header block without its END_HEADERS.
            {
                let mut p = PREFACE.to_vec();
                p.extend(frame(HEADERS, 0, 1, &[0x82]));
                p
            },
            // A HEADERS frame that announces 100 bytes and sends 1.
            {
                let mut p = PREFACE.to_vec();
                let mut f = frame(HEADERS, END_HEADERS, 1, &[0x82; 100]);
                f.truncate(FRAME_HEADER_LEN + 1);
                p.extend(f);
                p
            },
            // Half a frame header.
            {
                let mut p = PREFACE.to_vec();
                p.extend(&frame(HEADERS, END_HEADERS, 1, &[0x82])[..4]);
                p
            },
        ] {
            let (mut client, server) = tokio::io::duplex(1 << 16);
            client.write_all(&partial).await.unwrap();
            // The client stays connected and silent.
            let mut normalized = Normalized::new(server);
            let mut out = Vec::new();
            let started = tokio::time::Instant::now();
            let err = normalized.read_to_end(&mut out).await.unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
            assert!(started.elapsed() >= INCOMPLETE_TIMEOUT);
            drop(client);
        }
    }

    /// The attack from the security report: small blocks that refer to a 4 KiB entry
    /// of the client's table, each with a small header the client does not index
    /// (which pushes the big entry out of the table of the re-encoding side), so each
    /// block of about 30 bytes comes out as a 4 KiB literal. Whatever the input, no
    /// more is read while the output waiting for h2 is over its bound, and the
    /// buffers are given back once drained.
    #[tokio::test]
    async fn output_waiting_for_h2_is_bounded_and_released() {
        let mut wire = PREFACE.to_vec();
        let mut first = vec![0x40, 1, b'x', 0x7f];
        let mut n = 4000 - 127;
        while n >= 128 {
            first.push((n % 128) as u8 | 0x80);
            n /= 128;
        }
        first.push(n as u8);
        first.extend(vec![b'v'; 4000]);
        wire.extend(frame(HEADERS, END_HEADERS | END_STREAM, 1, &first));
        let mut stream = 3u32;
        while wire.len() < 512 * 1024 {
            // Three references: 12 KiB, within the list limit.
            let mut block = vec![0x80 | 62; 3];
            // Literal without indexing, a name never seen before: `r<stream>: 1`.
            let name = format!("r{stream}");
            block.extend([0x00, name.len() as u8]);
            block.extend(name.as_bytes());
            block.extend([1, b'1']);
            wire.extend(frame(HEADERS, END_HEADERS | END_STREAM, stream, &block));
            stream += 2;
        }
        let total = wire.len();
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let writer = tokio::spawn(async move {
            client.write_all(&wire).await.unwrap();
            // Hung up once everything is sent: the reads end there.
        });
        let mut normalized = Normalized::new(server);
        let mut buf = vec![0u8; 16 * 1024];
        let mut out = 0usize;
        let mut most_output = 0;
        let mut most_input = 0;
        loop {
            let n = normalized.read(&mut buf).await.unwrap();
            most_output = most_output.max(normalized.output.len());
            most_input = most_input.max(normalized.input.len());
            out += n;
            if n == 0 {
                break;
            }
        }
        writer.await.unwrap();
        assert!(
            out > 10 * total,
            "the attack did not amplify: {out} out of {total}"
        );
        assert!(
            // The bound (64 KiB) plus the one block that crossed it.
            most_output <= 64 * 1024 + MAX_LIST,
            "{most_output} bytes waited for h2"
        );
        assert!(
            most_input <= READ_CHUNK + MAX_FRAME + FRAME_HEADER_LEN,
            "{most_input} bytes of input held"
        );
        // Each burst past 16 KiB was given back once drained, and what is left at
        // the end is small.
        assert!(normalized.released > 10, "{} releases", normalized.released);
        assert!(normalized.output.capacity() <= KEEP_CAPACITY);
        assert!(normalized.input.capacity() <= KEEP_CAPACITY);
    }

    /// One poll of a connection does bounded work, however much input waits: the
    /// agent's one thread goes round its connections, so a client that always has
    /// input cannot keep the others waiting.
    #[tokio::test]
    async fn one_poll_does_bounded_work_however_much_input_waits() {
        let mut encoder = Encoder::new();
        let mut input = PREFACE.to_vec();
        let mut stream = 1u32;
        while input.len() < 4 << 20 {
            let block = request(&mut encoder, format!("host-{stream}").as_bytes());
            input.extend(frame(HEADERS, END_HEADERS | END_STREAM, stream, &block));
            stream += 2;
        }
        let (mut client, server) = tokio::io::duplex(8 << 20);
        client.write_all(&input).await.unwrap();
        drop(client);
        let mut normalized = Normalized::new(server);
        let mut first_poll = 0usize;
        std::future::poll_fn(|cx| {
            let mut buf = [0u8; 4096];
            loop {
                let mut read = ReadBuf::new(&mut buf);
                match Pin::new(&mut normalized).poll_read(cx, &mut read) {
                    Poll::Ready(Ok(())) if read.filled().is_empty() => return Poll::Ready(()),
                    Poll::Ready(Ok(())) => first_poll += read.filled().len(),
                    Poll::Ready(Err(e)) => panic!("{e}"),
                    Poll::Pending => return Poll::Ready(()),
                }
            }
        })
        .await;
        // The 16 KiB slice, plus at most one read and the output bound.
        assert!(first_poll > 0);
        assert!(
            first_poll <= 16 * 1024 + READ_CHUNK + 64 * 1024 + MAX_LIST,
            "{first_poll} bytes in one poll"
        );
        // The rest still comes, over later polls.
        let mut rest = Vec::new();
        normalized.read_to_end(&mut rest).await.unwrap();
        assert!(first_poll + rest.len() >= input.len() / 2);
    }
}
