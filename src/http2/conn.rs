//! The HTTP/2 client connection (first version, on the `own-http2` branch): shared state
//! under one lock, callers encoding their frames straight into the write buffer, one driver
//! future (a reader loop and a writer loop joined) owning the socket.
//!
//! Not done yet (see the module plan in `mod.rs`): keep-alive pings, the peer's
//! HEADER_TABLE_SIZE below 4096, MAX_CONCURRENT_STREAMS, stream id exhaustion, wiring into
//! `transport::Channel`.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;

use super::frame::{self, Frame, code, setting};
use super::hpack;

/// Our receive window per stream, and for the connection.
const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
/// The window every stream starts with until the peer's SETTINGS say otherwise (§6.9.2).
const DEFAULT_WINDOW: i64 = 65_535;

/// How a stream (or the whole connection) failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StreamError {
    /// The connection is gone (read error, EOF, our GOAWAY, a protocol error).
    ConnectionLost(String),
    /// The peer reset the stream with this code.
    Reset(u32),
    /// The peer went away without processing this stream (GOAWAY below its id), or refused
    /// it: it was never processed and may be retried.
    NotProcessed,
}

/// The answer of a stream as it arrives.
#[derive(Debug, Default)]
struct Stream {
    /// `:status` and headers, once received.
    head: Option<(u16, HeaderMap)>,
    data: VecDeque<Bytes>,
    trailers: Option<HeaderMap>,
    /// END_STREAM received.
    recv_end: bool,
    error: Option<StreamError>,
    waker: Option<Waker>,
    /// What the peer lets us send on this stream.
    send_window: i64,
    /// Request data waiting for window, and whether the last of it ends the stream.
    pending: VecDeque<Bytes>,
    pending_end: bool,
    /// Data handed out and not yet given back with a WINDOW_UPDATE.
    unacked: u32,
}

impl Stream {
    fn wake(&mut self) {
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }
}

/// A hasher for stream ids (unique odd integers): one multiply instead of SipHash.
#[derive(Default)]
struct StreamIdHasher(u64);

impl std::hash::Hasher for StreamIdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }
    fn write_u32(&mut self, id: u32) {
        self.0 = u64::from(id).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

type StreamMap = HashMap<u32, Stream, std::hash::BuildHasherDefault<StreamIdHasher>>;

#[derive(Debug)]
struct State {
    encoder: hpack::Encoder,
    decoder: hpack::Decoder,
    out: BytesMut,
    streams: StreamMap,
    next_id: u32,
    peer_max_frame: u32,
    peer_initial_window: i64,
    conn_send_window: i64,
    conn_unacked: u32,
    /// A header block being continued: stream, the block so far, END_STREAM.
    continuation: Option<(u32, BytesMut, bool)>,
    /// New streams are refused (GOAWAY received, or the connection failed).
    closed: Option<StreamError>,
    /// The last handle is gone: the writer says GOAWAY and closes.
    shutdown: bool,
    goaway_sent: bool,
    /// The reader ended (the connection is gone): the writer ends too.
    reader_done: bool,
    scratch: Vec<u8>,
}

struct Shared {
    state: Mutex<State>,
    writer: Notify,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }
}

/// A handle to send requests on the connection (clone freely).
#[derive(Clone)]
pub(crate) struct Conn {
    shared: Arc<Shared>,
    _handle: Arc<HandleGuard>,
}

/// Tells the writer to close the connection when the last [`Conn`] is gone.
struct HandleGuard(Arc<Shared>);

impl Drop for HandleGuard {
    fn drop(&mut self) {
        self.0.lock().shutdown = true;
        self.0.writer.notify_one();
    }
}

/// Start a connection over `io` (after TCP/TLS): the preface and our SETTINGS are queued
/// at once. Returns the handle and the driver future to spawn.
pub(crate) fn handshake<T>(io: T) -> (Conn, impl std::future::Future<Output = ()> + Send)
where
    T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let mut out = BytesMut::with_capacity(4096);
    out.extend_from_slice(frame::PREFACE);
    frame::write_settings(
        &mut out,
        &[
            (setting::ENABLE_PUSH, 0),
            (setting::INITIAL_WINDOW_SIZE, STREAM_WINDOW),
        ],
    );
    frame::write_window_update(&mut out, 0, CONNECTION_WINDOW - DEFAULT_WINDOW as u32);
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            encoder: hpack::Encoder::default(),
            decoder: hpack::Decoder::new(4096),
            out,
            streams: StreamMap::default(),
            next_id: 1,
            peer_max_frame: frame::DEFAULT_MAX_FRAME_SIZE,
            peer_initial_window: DEFAULT_WINDOW,
            conn_send_window: DEFAULT_WINDOW,
            conn_unacked: 0,
            continuation: None,
            closed: None,
            shutdown: false,
            goaway_sent: false,
            reader_done: false,
            scratch: Vec::new(),
        }),
        writer: Notify::new(),
    });
    shared.writer.notify_one();
    let conn = Conn {
        shared: shared.clone(),
        _handle: Arc::new(HandleGuard(shared.clone())),
    };
    (conn, drive(shared, io))
}

/// The driver: a reader loop and a writer loop on the two halves of `io`.
async fn drive<T>(shared: Arc<Shared>, io: T)
where
    T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(io);
    let reader = async {
        let mut buf = BytesMut::with_capacity(64 * 1024);
        let why = loop {
            if buf.capacity() - buf.len() < 16 * 1024 {
                buf.reserve(64 * 1024);
            }
            match rd.read_buf(&mut buf).await {
                Ok(0) => break "the server closed the connection".to_owned(),
                Ok(_) => {}
                Err(e) => break format!("read: {e}"),
            }
            let mut st = shared.lock();
            let before = st.out.len();
            let failed = loop {
                match frame::read_frame(&mut buf, frame::DEFAULT_MAX_FRAME_SIZE) {
                    Ok(Some(f)) => {
                        if let Err(e) = st.on_frame(f) {
                            break Some(e);
                        }
                    }
                    Ok(None) => break None,
                    Err(e) => break Some(e),
                }
            };
            if let Some(e) = failed {
                frame::write_goaway(&mut st.out, 0, e.code, e.why.as_bytes());
                let why = format!("protocol error: {}", e.why);
                st.fail_all(StreamError::ConnectionLost(why.clone()));
                drop(st);
                shared.writer.notify_one();
                break why;
            }
            let wrote = st.out.len() > before;
            drop(st);
            if wrote {
                shared.writer.notify_one();
            }
        };
        {
            let mut st = shared.lock();
            st.fail_all(StreamError::ConnectionLost(why));
            st.reader_done = true;
        }
        shared.writer.notify_one();
    };
    let writer = async {
        loop {
            shared.writer.notified().await;
            let (chunk, done) = {
                let mut st = shared.lock();
                let finishing = st.shutdown && st.streams.is_empty();
                if finishing && !st.goaway_sent {
                    let last = st.next_id.saturating_sub(2);
                    frame::write_goaway(&mut st.out, last, code::NO_ERROR, b"");
                    st.goaway_sent = true;
                }
                (st.out.split().freeze(), finishing || st.reader_done)
            };
            if !chunk.is_empty() && wr.write_all(&chunk).await.is_err() {
                break;
            }
            if done {
                let _ = wr.shutdown().await;
                break;
            }
        }
    };
    tokio::join!(reader, writer);
}

impl State {
    fn fail_all(&mut self, err: StreamError) {
        if self.closed.is_none() {
            self.closed = Some(err.clone());
        }
        for s in self.streams.values_mut() {
            if s.error.is_none() && !(s.recv_end && s.trailers.is_some()) {
                s.error = Some(err.clone());
            }
            s.wake();
        }
    }

    fn on_frame(&mut self, f: Frame) -> Result<(), frame::ConnError> {
        if let Some((id, _, _)) = &self.continuation
            && !matches!(&f, Frame::Continuation { stream, .. } if stream == id)
        {
            return Err(frame::ConnError {
                code: code::PROTOCOL_ERROR,
                why: "a header block was interrupted",
            });
        }
        match f {
            Frame::Settings { ack: false, params } => {
                for (id, value) in params {
                    match id {
                        setting::INITIAL_WINDOW_SIZE => {
                            if value > 0x7fff_ffff {
                                return Err(frame::ConnError {
                                    code: code::FLOW_CONTROL_ERROR,
                                    why: "initial window too large",
                                });
                            }
                            let delta = i64::from(value) - self.peer_initial_window;
                            self.peer_initial_window = i64::from(value);
                            for s in self.streams.values_mut() {
                                s.send_window += delta;
                            }
                        }
                        setting::MAX_FRAME_SIZE => {
                            if !(frame::DEFAULT_MAX_FRAME_SIZE..=16_777_215).contains(&value) {
                                return Err(frame::ConnError {
                                    code: code::PROTOCOL_ERROR,
                                    why: "invalid max frame size",
                                });
                            }
                            self.peer_max_frame = value;
                        }
                        _ => {}
                    }
                }
                frame::write_settings_ack(&mut self.out);
                self.flush_pending();
            }
            Frame::Settings { ack: true, .. } | Frame::Ignored => {}
            Frame::Ping { ack: false, data } => frame::write_ping(&mut self.out, data, true),
            Frame::Ping { ack: true, .. } => {}
            Frame::Headers {
                stream,
                end_stream,
                end_headers,
                block,
            } => {
                if end_headers {
                    self.on_header_block(stream, &block, end_stream)?;
                } else {
                    self.continuation = Some((stream, BytesMut::from(&block[..]), end_stream));
                }
            }
            Frame::Continuation {
                end_headers, block, ..
            } => {
                if let Some((_, acc, _)) = &mut self.continuation {
                    acc.extend_from_slice(&block);
                }
                if end_headers && let Some((stream, acc, end)) = self.continuation.take() {
                    self.on_header_block(stream, &acc, end)?;
                }
            }
            Frame::Data {
                stream,
                end_stream,
                data,
                flow_len,
            } => {
                // Padding is never handed out: its window goes back at once.
                let padding = flow_len - data.len() as u32;
                match self.streams.get_mut(&stream) {
                    Some(s) if s.error.is_none() => {
                        s.unacked += padding;
                        self.conn_unacked += padding;
                        if !data.is_empty() {
                            s.data.push_back(data);
                        }
                        if end_stream {
                            s.recv_end = true;
                        }
                        s.wake();
                    }
                    // A stream we no longer track: its window goes back now.
                    _ => self.conn_unacked += flow_len,
                }
                self.maybe_ack_connection();
            }
            Frame::WindowUpdate { stream, increment } => {
                if stream == 0 {
                    self.conn_send_window += i64::from(increment);
                } else if let Some(s) = self.streams.get_mut(&stream) {
                    if increment == 0 {
                        frame::write_rst_stream(&mut self.out, stream, code::PROTOCOL_ERROR);
                        s.error = Some(StreamError::Reset(code::PROTOCOL_ERROR));
                        s.wake();
                    } else {
                        s.send_window += i64::from(increment);
                    }
                }
                self.flush_pending();
            }
            Frame::RstStream { stream, code } => {
                if let Some(s) = self.streams.get_mut(&stream) {
                    s.error = Some(if code == code::REFUSED_STREAM {
                        StreamError::NotProcessed
                    } else {
                        StreamError::Reset(code)
                    });
                    s.wake();
                }
            }
            Frame::GoAway {
                last_stream, code, ..
            } => {
                for (&id, s) in self.streams.iter_mut() {
                    if id > last_stream {
                        s.error = Some(StreamError::NotProcessed);
                        s.wake();
                    }
                }
                if self.closed.is_none() {
                    self.closed = Some(StreamError::ConnectionLost(format!(
                        "the server went away (GOAWAY, code {code})"
                    )));
                }
            }
        }
        Ok(())
    }

    /// A complete header block for `stream`: its head, or its trailers.
    fn on_header_block(
        &mut self,
        stream: u32,
        block: &[u8],
        end_stream: bool,
    ) -> Result<(), frame::ConnError> {
        let mut status: Option<u16> = None;
        let mut map = HeaderMap::new();
        let mut bad = false;
        self.decoder
            .decode(block, |name, value| {
                if name == b":status" {
                    status = std::str::from_utf8(value).ok().and_then(|v| v.parse().ok());
                } else if name.first() == Some(&b':') {
                    bad = true;
                } else if let (Ok(n), Ok(v)) =
                    (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
                {
                    map.append(n, v);
                } else {
                    bad = true;
                }
            })
            .map_err(|_| frame::ConnError {
                code: code::COMPRESSION_ERROR,
                why: "a header block could not be decoded",
            })?;
        let Some(s) = self.streams.get_mut(&stream) else {
            return Ok(()); // decoded for the table's sake only
        };
        if bad {
            frame::write_rst_stream(&mut self.out, stream, code::PROTOCOL_ERROR);
            s.error = Some(StreamError::Reset(code::PROTOCOL_ERROR));
        } else if s.head.is_none() {
            match status {
                Some(st) => s.head = Some((st, map)),
                None => {
                    frame::write_rst_stream(&mut self.out, stream, code::PROTOCOL_ERROR);
                    s.error = Some(StreamError::Reset(code::PROTOCOL_ERROR));
                }
            }
        } else {
            s.trailers = Some(map);
        }
        if end_stream {
            s.recv_end = true;
        }
        s.wake();
        Ok(())
    }

    /// Send queued request data that the windows now allow.
    fn flush_pending(&mut self) {
        let max = self.peer_max_frame as usize;
        for (&id, s) in self.streams.iter_mut() {
            while let Some(chunk) = s.pending.front_mut() {
                let allowed = s.send_window.min(self.conn_send_window).min(max as i64);
                if allowed <= 0 && !chunk.is_empty() {
                    break;
                }
                let n = chunk.len().min(allowed.max(0) as usize);
                let part = chunk.split_to(n);
                let last = chunk.is_empty();
                if last {
                    s.pending.pop_front();
                }
                let end = last && s.pending.is_empty() && s.pending_end;
                frame::write_data_header(&mut self.out, id, part.len(), end);
                self.out.extend_from_slice(&part);
                s.send_window -= n as i64;
                self.conn_send_window -= n as i64;
            }
        }
    }

    fn maybe_ack_connection(&mut self) {
        if self.conn_unacked >= CONNECTION_WINDOW / 2 {
            frame::write_window_update(&mut self.out, 0, self.conn_unacked);
            self.conn_unacked = 0;
        }
    }
}

impl Conn {
    /// Whether new requests would be refused (the connection failed or the server is going).
    pub(crate) fn is_closed(&self) -> bool {
        self.shared.lock().closed.is_some()
    }

    /// Open a stream: `:method POST`, `scheme`, `authority`, `path`, then `headers`; then
    /// `body` (the whole request body when `end`, else the first part).
    pub(crate) fn send_request(
        &self,
        scheme: &str,
        authority: &str,
        path: &str,
        headers: &HeaderMap,
        body: Bytes,
        end: bool,
    ) -> Result<ResponseStream, StreamError> {
        let mut st = self.shared.lock();
        if let Some(e) = &st.closed {
            return Err(match e {
                StreamError::ConnectionLost(_) => StreamError::NotProcessed,
                other => other.clone(),
            });
        }
        let was_empty = st.out.is_empty();
        let id = st.next_id;
        st.next_id += 2;
        let mut block = std::mem::take(&mut st.scratch);
        block.clear();
        st.encoder.field(b":method", b"POST", &mut block);
        st.encoder.field(b":scheme", scheme.as_bytes(), &mut block);
        st.encoder.field(b":path", path.as_bytes(), &mut block);
        st.encoder
            .field(b":authority", authority.as_bytes(), &mut block);
        for (n, v) in headers {
            st.encoder
                .field(n.as_str().as_bytes(), v.as_bytes(), &mut block);
        }
        let max = st.peer_max_frame;
        let headers_end = end && body.is_empty();
        frame::write_headers(&mut st.out, id, &block, headers_end, max);
        st.scratch = block;
        let initial = st.peer_initial_window;
        let mut s = Stream {
            send_window: initial,
            ..Stream::default()
        };
        if !headers_end {
            s.pending.push_back(body);
            s.pending_end = end;
        }
        st.streams.insert(id, s);
        st.flush_pending();
        drop(st);
        if was_empty {
            self.shared.writer.notify_one();
        }
        Ok(ResponseStream {
            shared: self.shared.clone(),
            id,
        })
    }
}

/// The answer of one request: its head, its data, its trailers.
pub(crate) struct ResponseStream {
    shared: Arc<Shared>,
    id: u32,
}

impl ResponseStream {
    /// The `:status` and headers.
    pub(crate) fn poll_head(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(u16, HeaderMap), StreamError>> {
        let mut st = self.shared.lock();
        let Some(s) = st.streams.get_mut(&self.id) else {
            return Poll::Ready(Err(StreamError::ConnectionLost("stream gone".into())));
        };
        if let Some((status, _)) = &s.head {
            let status = *status;
            let map = s
                .head
                .as_mut()
                .map(|(_, m)| std::mem::take(m))
                .unwrap_or_default();
            return Poll::Ready(Ok((status, map)));
        }
        if let Some(e) = &s.error {
            return Poll::Ready(Err(e.clone()));
        }
        s.waker = Some(cx.waker().clone());
        Poll::Pending
    }

    /// The next DATA payload; `None` at the end of the data (then read the trailers).
    pub(crate) fn poll_data(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, StreamError>>> {
        let mut guard = self.shared.lock();
        let st = &mut *guard;
        let Some(s) = st.streams.get_mut(&self.id) else {
            return Poll::Ready(None);
        };
        if let Some(d) = s.data.pop_front() {
            s.unacked += d.len() as u32;
            st.conn_unacked += d.len() as u32;
            let mut wrote = false;
            if s.unacked >= STREAM_WINDOW / 2 && !s.recv_end {
                frame::write_window_update(&mut st.out, self.id, s.unacked);
                s.unacked = 0;
                wrote = true;
            }
            let was_empty = st.out.is_empty();
            st.maybe_ack_connection();
            wrote |= was_empty && !st.out.is_empty();
            drop(guard);
            if wrote {
                self.shared.writer.notify_one();
            }
            return Poll::Ready(Some(Ok(d)));
        }
        if let Some(e) = &s.error {
            return Poll::Ready(Some(Err(e.clone())));
        }
        if s.recv_end {
            return Poll::Ready(None);
        }
        s.waker = Some(cx.waker().clone());
        Poll::Pending
    }

    /// The trailers (`None` when the stream ended without).
    pub(crate) fn poll_trailers(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<HeaderMap>, StreamError>> {
        let mut st = self.shared.lock();
        let Some(s) = st.streams.get_mut(&self.id) else {
            return Poll::Ready(Ok(None));
        };
        if let Some(t) = s.trailers.take() {
            return Poll::Ready(Ok(Some(t)));
        }
        if let Some(e) = &s.error {
            return Poll::Ready(Err(e.clone()));
        }
        if s.recv_end {
            return Poll::Ready(Ok(None));
        }
        s.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl Drop for ResponseStream {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        let Some(s) = st.streams.remove(&self.id) else {
            return;
        };
        // Give back what was received and not handed out.
        let held: u32 = s.data.iter().map(|d| d.len() as u32).sum();
        st.conn_unacked += held;
        let mut wrote = false;
        if !(s.recv_end && s.pending.is_empty()) && s.error.is_none() && st.closed.is_none() {
            frame::write_rst_stream(&mut st.out, self.id, code::CANCEL);
            wrote = true;
        }
        let was_empty = st.out.is_empty();
        st.maybe_ack_connection();
        wrote |= was_empty && !st.out.is_empty();
        let shutdown = st.shutdown && st.streams.is_empty();
        drop(st);
        if wrote || shutdown {
            self.shared.writer.notify_one();
        }
    }
}

/// An io::Error for a failed stream (what a caller maps to its own error).
impl From<StreamError> for io::Error {
    fn from(e: StreamError) -> io::Error {
        io::Error::other(format!("{e:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::etcdserverpb as pb;
    use bytes::{Buf, BufMut};
    use prost::Message;

    /// A unary gRPC Put and Range over our connection to a real etcd.
    #[tokio::test]
    async fn unary_calls_against_a_real_etcd() {
        let etcd = crate::testkit::EtcdCluster::builder()
            .start_async()
            .await
            .unwrap();
        let addr = etcd.client_addr(0);
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        let (conn, driver) = handshake(tcp);
        let task = tokio::spawn(driver);
        let authority = addr.to_string();
        let mut headers = HeaderMap::new();
        headers.insert("te", HeaderValue::from_static("trailers"));
        headers.insert("content-type", HeaderValue::from_static("application/grpc"));
        let call = |path: &'static str, msg: Vec<u8>| {
            let mut body = BytesMut::new();
            body.put_u8(0);
            body.put_u32(msg.len() as u32);
            body.put_slice(&msg);
            conn.send_request("http", &authority, path, &headers, body.freeze(), true)
                .unwrap()
        };
        /// Status, data, and the trailers (or, for a trailers-only answer, the head).
        async fn answer(mut s: ResponseStream) -> (u16, Bytes, HeaderMap) {
            let (status, head) = std::future::poll_fn(|cx| s.poll_head(cx)).await.unwrap();
            let mut data = BytesMut::new();
            while let Some(d) = std::future::poll_fn(|cx| s.poll_data(cx)).await {
                data.extend_from_slice(&d.unwrap());
            }
            let trailers = std::future::poll_fn(|cx| s.poll_trailers(cx))
                .await
                .unwrap()
                .unwrap_or(head);
            (status, data.freeze(), trailers)
        }
        for i in 0..50u32 {
            let put = pb::PutRequest {
                key: format!("own/{i}").into(),
                value: Bytes::from(vec![b'v'; (i as usize) * 1000]),
                ..Default::default()
            };
            let (status, data, trailers) =
                answer(call("/etcdserverpb.KV/Put", put.encode_to_vec())).await;
            assert_eq!(status, 200);
            assert_eq!(trailers.get("grpc-status").unwrap(), "0", "{trailers:?}");
            let mut data = data;
            data.advance(5);
            assert!(
                pb::PutResponse::decode(data)
                    .unwrap()
                    .header
                    .unwrap()
                    .revision
                    > 0
            );
        }
        // A range answer of ~1.2 MB: more than the peer's frames, within our windows.
        let range = pb::RangeRequest {
            key: "own/".into(),
            range_end: "own0".into(),
            ..Default::default()
        };
        let (_, mut data, trailers) =
            answer(call("/etcdserverpb.KV/Range", range.encode_to_vec())).await;
        assert_eq!(trailers.get("grpc-status").unwrap(), "0");
        data.advance(5);
        let r = pb::RangeResponse::decode(data).unwrap();
        assert_eq!(r.kvs.len(), 50);
        // A request body larger than gRPC-Go's initial window (64 KiB): flow control.
        let big = pb::PutRequest {
            key: "own/big".into(),
            value: Bytes::from(vec![b'b'; 300_000]),
            ..Default::default()
        };
        let (_, _, trailers) = answer(call("/etcdserverpb.KV/Put", big.encode_to_vec())).await;
        assert_eq!(trailers.get("grpc-status").unwrap(), "0", "{trailers:?}");
        // An error status: a trailers-only answer (the status in the head, END_STREAM).
        let (_, _, trailers) = answer(call(
            "/etcdserverpb.KV/Put",
            pb::PutRequest::default().encode_to_vec(),
        ))
        .await;
        assert_ne!(trailers.get("grpc-status").unwrap(), "0");
        drop(conn);
        tokio::time::timeout(std::time::Duration::from_secs(5), task)
            .await
            .expect("the driver ends when the last handle is gone")
            .unwrap();
    }
}

#[cfg(test)]
mod floor {
    use super::*;
    use crate::proto::etcdserverpb as pb;
    use bytes::{Buf, BufMut};
    use prost::Message;

    /// `PUTS` puts at concurrency 1 over our connection, for instruction counts under
    /// callgrind (two runs with different `PUTS`): `cargo test --lib own_conn_put_floor --
    /// --ignored` (current-thread runtime, 50 warm-up puts).
    #[test]
    #[ignore]
    fn own_conn_put_floor() {
        let puts: usize = std::env::var("PUTS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1000);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let etcd = crate::testkit::EtcdCluster::builder()
                .start_async()
                .await
                .unwrap();
            let addr = etcd.client_addr(0);
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            tcp.set_nodelay(true).unwrap();
            let (conn, driver) = handshake(tcp);
            tokio::spawn(driver);
            let authority = addr.to_string();
            let mut headers = HeaderMap::new();
            headers.insert("te", HeaderValue::from_static("trailers"));
            headers.insert("content-type", HeaderValue::from_static("application/grpc"));
            headers.insert("grpc-timeout", HeaderValue::from_static("5000m"));
            for i in 0..(50 + puts) {
                let put = pb::PutRequest {
                    key: Bytes::from(format!("floor/{:010}", i % 100)),
                    value: Bytes::from_static(b"0123456789abcdef0123456789abcdef"),
                    ..Default::default()
                };
                let mut body = BytesMut::with_capacity(5 + put.encoded_len());
                body.put_u8(0);
                body.put_u32(put.encoded_len() as u32);
                put.encode_raw(&mut body);
                let mut s = conn
                    .send_request(
                        "http",
                        &authority,
                        "/etcdserverpb.KV/Put",
                        &headers,
                        body.freeze(),
                        true,
                    )
                    .unwrap();
                let (status, _) = std::future::poll_fn(|cx| s.poll_head(cx)).await.unwrap();
                assert_eq!(status, 200);
                let mut data = Bytes::new();
                while let Some(d) = std::future::poll_fn(|cx| s.poll_data(cx)).await {
                    data = d.unwrap();
                }
                let t = std::future::poll_fn(|cx| s.poll_trailers(cx))
                    .await
                    .unwrap()
                    .unwrap();
                assert_eq!(t.get("grpc-status").unwrap(), "0");
                data.advance(5);
                assert!(
                    pb::PutResponse::decode(data)
                        .unwrap()
                        .header
                        .unwrap()
                        .revision
                        > 0
                );
            }
        });
    }
}
