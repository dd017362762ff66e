//! The HTTP/2 client connection: shared state under one lock, callers encoding their frames
//! straight into the write buffer, one driver future (a reader loop and a writer loop)
//! owning the socket.
//!
//! - [`handshake`] gives a [`Conn`] (send requests; clone freely; the connection says
//!   GOAWAY and closes once the last clone and the last stream are gone), a [`Control`]
//!   (keep-alive pings, open-stream count, failing the connection; it does not keep the
//!   connection open) and the driver future to spawn.
//! - [`Conn::send_request`] opens a stream and gives its [`ResponseStream`]; a streaming
//!   request body goes on through [`ResponseStream::sender`].
//! - Flow control both ways: request data waits for the peer's windows (and a sender for
//!   room in its queue); our receive windows are given back as data is handed out, and a
//!   peer that sends beyond them is a flow-control error.
//! - The peer's settings are honoured: INITIAL_WINDOW_SIZE, MAX_FRAME_SIZE,
//!   HEADER_TABLE_SIZE (our encoder's table stays within it) and MAX_CONCURRENT_STREAMS
//!   (callers wait for room with [`Conn::wait_room`]). When stream ids run out the
//!   connection refuses new streams, so the transport makes a new one.

use std::collections::{HashMap, VecDeque};
use std::mem;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use super::fields::Fields;
use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;

use super::frame::{self, Frame, code, setting};
use super::hpack;

/// Our receive window per stream, and for the connection.
const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
/// Below this much connection window, the readers of answers taken whole are woken for each
/// part (see the DATA frame's handling).
const LOW_CONNECTION_WINDOW: i64 = (CONNECTION_WINDOW / 4) as i64;
/// The window every stream starts with until the peer's SETTINGS say otherwise (§6.9.2).
const DEFAULT_WINDOW: i64 = 65_535;
/// Request data queued per stream (waiting for the peer's windows) before a sender waits.
const SEND_BUFFER: usize = 1024 * 1024;
/// The largest client stream id (§5.1.1): after it, a new connection is needed.
const MAX_STREAM_ID: u32 = (1 << 31) - 1;
/// The largest header block we take (HEADERS and its CONTINUATIONs).
const MAX_HEADER_BLOCK: usize = 1024 * 1024;
/// Emptied DATA queues kept for reuse, and the largest capacity kept.
const SPARE_QUEUES: usize = 256;
const SPARE_QUEUE_CAPACITY: usize = 16;
/// How long the driver goes on writing (a GOAWAY, say) after the reading side ended.
const LAST_WRITE: Duration = Duration::from_secs(1);

/// How a stream (or the whole connection) failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StreamError {
    /// The connection is gone (read or write error, EOF, a protocol error, a keep-alive
    /// timeout). The request may or may not have been processed.
    ConnectionLost(String),
    /// The peer reset the stream with this code.
    Reset(u32),
    /// The request was never processed and may be retried: the peer refused the stream,
    /// or went away (GOAWAY) below its id, or the connection was already closed when the
    /// request came.
    NotProcessed,
    /// The peer's MAX_CONCURRENT_STREAMS is reached: wait with [`Conn::wait_room`].
    AtCapacity,
}

/// One stream: the answer as it arrives, and the request data still to send.
#[derive(Debug)]
struct Stream {
    /// `:status` and headers, once received.
    head: Option<(u16, Fields)>,
    data: VecDeque<Bytes>,
    trailers: Option<Fields>,
    /// END_STREAM received.
    recv_end: bool,
    error: Option<StreamError>,
    /// The reader of the answer.
    waker: Option<Waker>,
    /// The reader wants the answer whole (a unary call): it is woken when the answer has
    /// ended or failed, or when what it holds reaches half the stream's window, not for
    /// each part as it arrives.
    whole: bool,
    /// The sender of a streaming request body (woken for room, and when the stream ends).
    send_waker: Option<Waker>,
    /// What the peer lets us send on this stream.
    send_window: i64,
    /// What the peer may still send on this stream before we give window back.
    recv_window: i64,
    /// Request data waiting for window, its size, and whether the request ends after it.
    pending: VecDeque<Bytes>,
    pending_bytes: usize,
    pending_end: bool,
    /// END_STREAM written.
    send_end: bool,
    /// In the connection's list of streams waiting for window.
    blocked: bool,
    /// Data handed out (and padding) not yet given back with a WINDOW_UPDATE.
    unacked: u32,
}

impl Stream {
    fn new(send_window: i64) -> Self {
        Stream {
            head: None,
            data: VecDeque::new(),
            trailers: None,
            recv_end: false,
            error: None,
            waker: None,
            whole: false,
            send_waker: None,
            send_window,
            recv_window: i64::from(STREAM_WINDOW),
            pending: VecDeque::new(),
            pending_bytes: 0,
            pending_end: false,
            send_end: false,
            blocked: false,
            unacked: 0,
        }
    }

    /// Wake the reader (something arrived). The connection's reader calls this under the
    /// lock, as each answer is parsed: waking the readers only after releasing the lock was
    /// measured to nearly double the context switches on a multi-threaded runtime.
    fn wake(&mut self) {
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    /// Wake the reader and the sender (the stream ended or failed).
    fn wake_both(&mut self) {
        self.wake();
        if let Some(w) = self.send_waker.take() {
            w.wake();
        }
    }

    /// Nothing more is sent on this stream (it failed or was reset): queued data is dropped.
    fn stop_sending(&mut self) {
        self.send_end = true;
        self.pending.clear();
        self.pending_bytes = 0;
    }

    /// Fail the stream unless its answer is complete.
    fn fail(&mut self, err: &StreamError) {
        if self.error.is_none()
            && !(self.recv_end && (self.trailers.is_some() || self.head.is_some()))
        {
            self.error = Some(err.clone());
        }
        self.wake_both();
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

/// Keep-alive pings: the payload is a counter.
#[derive(Debug, Default)]
struct Pings {
    sent: u64,
    acked: u64,
    waker: Option<Waker>,
}

#[derive(Debug)]
struct State {
    encoder: hpack::Encoder,
    decoder: hpack::Decoder,
    out: BytesMut,
    streams: StreamMap,
    next_id: u32,
    peer_max_frame: u32,
    peer_initial_window: i64,
    peer_max_streams: usize,
    conn_send_window: i64,
    conn_recv_window: i64,
    conn_unacked: u32,
    /// Streams with request data waiting for window.
    blocked: Vec<u32>,
    /// A header block being continued: stream, the block so far, END_STREAM.
    continuation: Option<(u32, BytesMut, bool)>,
    /// New streams are refused (GOAWAY received, ids used up, or the connection failed).
    closed: Option<StreamError>,
    /// The last handle is gone: the writer says GOAWAY and closes once no stream is left.
    shutdown: bool,
    goaway_sent: bool,
    /// The connection is gone: the writer writes what is left and ends.
    dead: bool,
    pings: Pings,
    scratch: Vec<u8>,
    /// A request waits for room under the peer's MAX_CONCURRENT_STREAMS.
    room_wanted: bool,
    /// Emptied DATA queues of ended streams, reused by new ones (a queue's first push
    /// allocates; a unary call would pay that on every request).
    spare: Vec<VecDeque<Bytes>>,
    /// Answers to the peer's frames (PING and SETTINGS acknowledgements, resets) added to
    /// `out` since the writer last took it: bounded by [`MAX_QUEUED_CONTROL`].
    control_queued: usize,
}

/// Answers to the peer's frames that may wait in `out` at once. A peer that sends PINGs or
/// SETTINGS faster than it reads our answers would otherwise grow our buffer without bound
/// (RFC 9113 §10.5); past this the connection fails with ENHANCE_YOUR_CALM, as Go's HTTP/2
/// server does (with the same bound).
const MAX_QUEUED_CONTROL: usize = 10_000;

struct Shared {
    state: Mutex<State>,
    /// Wakes the writer: there is something to write, or it is time to close.
    writer: Notify,
    /// Wakes requests waiting for room under the peer's MAX_CONCURRENT_STREAMS.
    room: Notify,
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
/// at once. Returns the handle, the control and the driver future to spawn.
pub(crate) fn handshake<T>(io: T) -> (Conn, Control, impl std::future::Future<Output = ()> + Send)
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
            (setting::MAX_HEADER_LIST_SIZE, hpack::MAX_HEADER_LIST as u32),
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
            peer_max_streams: usize::MAX,
            conn_send_window: DEFAULT_WINDOW,
            conn_recv_window: i64::from(CONNECTION_WINDOW),
            conn_unacked: 0,
            blocked: Vec::new(),
            continuation: None,
            closed: None,
            shutdown: false,
            goaway_sent: false,
            dead: false,
            pings: Pings::default(),
            scratch: Vec::new(),
            room_wanted: false,
            spare: Vec::new(),
            control_queued: 0,
        }),
        writer: Notify::new(),
        room: Notify::new(),
    });
    shared.writer.notify_one();
    let conn = Conn {
        shared: shared.clone(),
        _handle: Arc::new(HandleGuard(shared.clone())),
    };
    let control = Control {
        shared: shared.clone(),
    };
    // However the driver ends (a panic, or dropped by its owner, even before it first ran),
    // its streams fail and new requests are refused: nothing waits on a connection that
    // nobody drives.
    let guard = FailOnDrop(shared.clone());
    let driver = async move {
        let _guard = guard;
        drive(shared, io).await;
    };
    (conn, control, driver)
}

/// The driver: a reader loop and a writer loop on the two halves of `io`. It ends when the
/// connection fails or closes, or when the last handle and stream are gone (then it says
/// GOAWAY and shuts the socket down).
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
                break format!("protocol error: {}", e.why);
            }
            let wrote = st.out.len() > before;
            // SETTINGS may have raised the stream limit, GOAWAY closed the connection.
            let room = st.take_room();
            drop(st);
            if wrote {
                shared.writer.notify_one();
            }
            if room {
                shared.room.notify_waiters();
            }
        };
        shared.fail(StreamError::ConnectionLost(why));
    };
    let writer = async {
        loop {
            shared.writer.notified().await;
            // With other requests open, let the tasks that are ready to run add theirs first:
            // one write for all of them (a write costs as much as many requests). A lone
            // request goes out at once.
            if shared.lock().streams.len() > 1 {
                tokio::task::yield_now().await;
            }
            let (chunk, done) = {
                let mut st = shared.lock();
                let finishing = st.shutdown && st.streams.is_empty();
                if finishing && !st.goaway_sent && !st.dead {
                    let last = 0; // we accept no streams from the server
                    frame::write_goaway(&mut st.out, last, code::NO_ERROR, b"");
                    st.goaway_sent = true;
                }
                st.control_queued = 0;
                (st.out.split().freeze(), finishing || st.dead)
            };
            if !chunk.is_empty()
                && let Err(e) = wr.write_all(&chunk).await
            {
                shared.fail(StreamError::ConnectionLost(format!("write: {e}")));
                return;
            }
            if done {
                let _ = wr.shutdown().await;
                return;
            }
        }
    };
    tokio::pin!(reader, writer);
    tokio::select! {
        () = &mut reader => {
            // Write what is left (a GOAWAY after a protocol error), briefly.
            let _ = tokio::time::timeout(LAST_WRITE, writer).await;
        }
        () = &mut writer => {
            shared.fail(StreamError::ConnectionLost("the connection was closed".into()));
        }
    }
}

/// Fails the connection when dropped (see `drive`).
struct FailOnDrop(Arc<Shared>);

impl Drop for FailOnDrop {
    fn drop(&mut self) {
        self.0
            .fail(StreamError::ConnectionLost("the connection ended".into()));
    }
}

impl Shared {
    /// The connection is gone: fail its streams, refuse new ones, let the writer end.
    fn fail(&self, err: StreamError) {
        {
            let mut st = self.lock();
            st.fail_all(err);
            st.dead = true;
        }
        self.writer.notify_one();
        self.room.notify_waiters();
    }
}

fn flow_control(why: &'static str) -> frame::ConnError {
    frame::ConnError {
        code: code::FLOW_CONTROL_ERROR,
        why,
    }
}

impl State {
    /// Count one more answer to the peer's frames in `out`; a connection error when the peer
    /// has not been reading them (see [`MAX_QUEUED_CONTROL`]).
    fn queue_control(&mut self) -> Result<(), frame::ConnError> {
        self.control_queued += 1;
        if self.control_queued > MAX_QUEUED_CONTROL {
            return Err(frame::ConnError {
                code: code::ENHANCE_YOUR_CALM,
                why: "too many control frames queued: the server sends PINGs or SETTINGS \
                      faster than it reads the answers",
            });
        }
        Ok(())
    }

    fn fail_all(&mut self, err: StreamError) {
        if self.closed.is_none() {
            self.closed = Some(err.clone());
        }
        for s in self.streams.values_mut() {
            s.fail(&err);
        }
        if let Some(w) = self.pings.waker.take() {
            w.wake();
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
                                return Err(flow_control("initial window too large"));
                            }
                            let delta = i64::from(value) - self.peer_initial_window;
                            self.peer_initial_window = i64::from(value);
                            for s in self.streams.values_mut() {
                                s.send_window += delta;
                                // §6.9.2: a change that takes a window above 2^31-1 is a
                                // connection error.
                                if s.send_window > 0x7fff_ffff {
                                    return Err(flow_control(
                                        "initial window change overflows a stream window",
                                    ));
                                }
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
                        setting::HEADER_TABLE_SIZE => self.encoder.set_peer_limit(value),
                        setting::MAX_CONCURRENT_STREAMS => {
                            self.peer_max_streams = usize::try_from(value).unwrap_or(usize::MAX);
                        }
                        // §6.5.2: a server may only say 0 (no push), and a client must treat
                        // anything else as a connection error.
                        setting::ENABLE_PUSH if value != 0 => {
                            return Err(frame::ConnError {
                                code: code::PROTOCOL_ERROR,
                                why: "the server set SETTINGS_ENABLE_PUSH",
                            });
                        }
                        _ => {}
                    }
                }
                self.queue_control()?;
                frame::write_settings_ack(&mut self.out);
                self.flush_blocked();
            }
            Frame::Settings { ack: true, .. } | Frame::Ignored => {}
            Frame::Ping { ack: false, data } => {
                self.queue_control()?;
                frame::write_ping(&mut self.out, data, true);
            }
            Frame::Ping { ack: true, data } => {
                let n = u64::from_be_bytes(data);
                if n <= self.pings.sent && n > self.pings.acked {
                    self.pings.acked = n;
                    if let Some(w) = self.pings.waker.take() {
                        w.wake();
                    }
                }
            }
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
                let Some((_, acc, _)) = &mut self.continuation else {
                    return Err(frame::ConnError {
                        code: code::PROTOCOL_ERROR,
                        why: "a CONTINUATION without a header block",
                    });
                };
                if acc.len() + block.len() > MAX_HEADER_BLOCK {
                    return Err(frame::ConnError {
                        code: code::ENHANCE_YOUR_CALM,
                        why: "a header block too large",
                    });
                }
                acc.extend_from_slice(&block);
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
                let before = self.conn_recv_window;
                self.conn_recv_window -= i64::from(flow_len);
                if self.conn_recv_window < 0 {
                    return Err(flow_control("the server sent beyond the connection window"));
                }
                // Answers taken whole hold their data until they end. Should the connection
                // window run low while several are incomplete, they could hold all of it and
                // none could end: from then on their readers take the data as it comes.
                let low = self.conn_recv_window <= LOW_CONNECTION_WINDOW;
                // Padding is never handed out: its window goes back at once.
                let padding = flow_len - data.len() as u32;
                match self.streams.get_mut(&stream) {
                    Some(s) if s.error.is_none() && !s.recv_end => {
                        s.recv_window -= i64::from(flow_len);
                        if s.recv_window < 0 {
                            frame::write_rst_stream(
                                &mut self.out,
                                stream,
                                code::FLOW_CONTROL_ERROR,
                            );
                            s.error = Some(StreamError::Reset(code::FLOW_CONTROL_ERROR));
                            s.stop_sending();
                            s.wake_both();
                            self.conn_unacked += flow_len;
                        } else {
                            s.unacked += padding;
                            self.conn_unacked += padding;
                            if s.unacked >= STREAM_WINDOW / 2 && !end_stream {
                                // Padding alone can fill the window: give it back here.
                                frame::write_window_update(&mut self.out, stream, s.unacked);
                                s.recv_window += i64::from(s.unacked);
                                s.unacked = 0;
                            }
                            if !data.is_empty() {
                                s.data.push_back(data);
                            }
                            if end_stream {
                                s.recv_end = true;
                                s.wake_both();
                            } else if !s.whole
                                || low
                                || s.recv_window <= i64::from(STREAM_WINDOW / 2)
                            {
                                s.wake();
                            }
                        }
                    }
                    // A stream we no longer track, or failed: its window goes back now.
                    _ => self.conn_unacked += flow_len,
                }
                if low && before > LOW_CONNECTION_WINDOW {
                    for s in self.streams.values_mut() {
                        if s.whole && !s.data.is_empty() {
                            s.wake();
                        }
                    }
                }
                self.maybe_ack_connection();
            }
            Frame::WindowUpdate { stream, increment } => {
                if stream == 0 {
                    self.conn_send_window += i64::from(increment);
                    if self.conn_send_window > 0x7fff_ffff {
                        return Err(flow_control("connection window above 2^31-1"));
                    }
                    self.flush_blocked();
                } else if let Some(s) = self.streams.get_mut(&stream) {
                    if s.error.is_some() {
                        // Failed already (reset by us, or by the peer): nothing more to say.
                    } else if increment == 0 || s.send_window + i64::from(increment) > 0x7fff_ffff {
                        let c = if increment == 0 {
                            code::PROTOCOL_ERROR
                        } else {
                            code::FLOW_CONTROL_ERROR
                        };
                        self.control_queued += 1;
                        frame::write_rst_stream(&mut self.out, stream, c);
                        s.error = Some(StreamError::Reset(c));
                        s.stop_sending();
                        s.wake_both();
                    } else {
                        s.send_window += i64::from(increment);
                        if s.blocked {
                            self.flush_stream(stream);
                        }
                    }
                }
            }
            Frame::RstStream { stream, code } => {
                if let Some(s) = self.streams.get_mut(&stream) {
                    // After a complete answer a reset only stops our sending (§8.1).
                    if !s.recv_end && s.error.is_none() {
                        s.error = Some(if code == code::REFUSED_STREAM {
                            StreamError::NotProcessed
                        } else {
                            StreamError::Reset(code)
                        });
                    }
                    s.send_end = true;
                    s.pending.clear();
                    s.pending_bytes = 0;
                    s.wake_both();
                }
            }
            Frame::GoAway {
                last_stream, code, ..
            } => {
                for (&id, s) in self.streams.iter_mut() {
                    if id > last_stream {
                        s.error = Some(StreamError::NotProcessed);
                        s.stop_sending();
                        s.wake_both();
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
        let mut map = Fields::default();
        let mut bad = false;
        self.decoder
            .decode(block, |name, value| {
                if name == b":status" {
                    status = std::str::from_utf8(value).ok().and_then(|v| v.parse().ok());
                } else if !map.push(name, value) {
                    // An invalid field, or a pseudo-header other than :status (a name with
                    // a colon is not a token).
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
        if s.error.is_some() || s.recv_end {
            return Ok(());
        }
        if bad {
            frame::write_rst_stream(&mut self.out, stream, code::PROTOCOL_ERROR);
            s.error = Some(StreamError::Reset(code::PROTOCOL_ERROR));
            s.stop_sending();
        } else if s.head.is_none() {
            match status {
                // Interim answers (1xx) are skipped.
                Some(st) if (100..200).contains(&st) => {}
                Some(st) => s.head = Some((st, map)),
                None => {
                    frame::write_rst_stream(&mut self.out, stream, code::PROTOCOL_ERROR);
                    s.error = Some(StreamError::Reset(code::PROTOCOL_ERROR));
                    s.stop_sending();
                }
            }
        } else {
            s.trailers = Some(map);
        }
        if end_stream {
            s.recv_end = true;
            s.wake_both();
        } else if !s.whole || s.error.is_some() {
            s.wake();
        }
        Ok(())
    }

    /// Send `data` on the new stream `id` now when the windows and the frame size allow all
    /// of it (a unary request's one message: nothing is queued or cloned), else queue it.
    fn send_body(&mut self, id: u32, data: &Bytes, end: bool) {
        let n = data.len();
        let max = i64::from(self.peer_max_frame).min(self.conn_send_window);
        if let Some(s) = self.streams.get_mut(&id)
            && s.pending.is_empty()
            && !s.send_end
            && !s.pending_end
            && (n as i64) <= max.min(s.send_window)
        {
            frame::write_data_header(&mut self.out, id, n, end);
            self.out.extend_from_slice(data);
            s.send_window -= n as i64;
            self.conn_send_window -= n as i64;
            s.send_end = end;
            s.pending_end = end;
            return;
        }
        self.queue_data(id, data.clone(), end);
    }

    /// Queue request data on stream `id` and send what the windows allow.
    fn queue_data(&mut self, id: u32, data: Bytes, end: bool) {
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        if s.send_end || s.pending_end {
            return;
        }
        if !data.is_empty() {
            s.pending_bytes += data.len();
            s.pending.push_back(data);
        }
        s.pending_end = end;
        self.flush_stream(id);
    }

    /// Send what stream `id` has queued, as far as the windows allow; note it as blocked
    /// when data is left.
    fn flush_stream(&mut self, id: u32) {
        let max = i64::from(self.peer_max_frame);
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        while let Some(chunk) = s.pending.front_mut() {
            let allowed = s.send_window.min(self.conn_send_window).min(max);
            if allowed <= 0 {
                break;
            }
            let n = chunk.len().min(allowed as usize);
            let part = if n == chunk.len() {
                s.pending.pop_front().unwrap_or_default()
            } else {
                chunk.split_to(n)
            };
            let end = s.pending.is_empty() && s.pending_end;
            frame::write_data_header(&mut self.out, id, n, end);
            self.out.extend_from_slice(&part);
            s.send_window -= n as i64;
            self.conn_send_window -= n as i64;
            s.pending_bytes -= n;
            s.send_end |= end;
        }
        if s.pending.is_empty() && s.pending_end && !s.send_end {
            frame::write_data_header(&mut self.out, id, 0, true);
            s.send_end = true;
        }
        if !s.pending.is_empty() && !s.blocked {
            s.blocked = true;
            self.blocked.push(id);
        }
        if s.pending_bytes < SEND_BUFFER
            && let Some(w) = s.send_waker.take()
        {
            w.wake();
        }
    }

    /// The windows grew: send what blocked streams have queued.
    fn flush_blocked(&mut self) {
        let ids = std::mem::take(&mut self.blocked);
        for id in ids {
            if let Some(s) = self.streams.get_mut(&id) {
                s.blocked = false;
                self.flush_stream(id);
            }
        }
    }

    /// Whether requests waiting for room should be woken now (room was made, or the
    /// connection closed); clears the wish.
    fn take_room(&mut self) -> bool {
        let room = self.room_wanted
            && (self.streams.len() < self.peer_max_streams || self.closed.is_some());
        if room {
            self.room_wanted = false;
        }
        room
    }

    fn maybe_ack_connection(&mut self) {
        if self.conn_unacked >= CONNECTION_WINDOW / 2 {
            frame::write_window_update(&mut self.out, 0, self.conn_unacked);
            self.conn_recv_window += i64::from(self.conn_unacked);
            self.conn_unacked = 0;
        }
    }
}

impl Conn {
    /// Wait until the peer's MAX_CONCURRENT_STREAMS leaves room for a new stream (or the
    /// connection closed).
    pub(crate) async fn wait_room(&self) {
        let notified = self.shared.room.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        {
            let mut st = self.shared.lock();
            if st.streams.len() < st.peer_max_streams || st.closed.is_some() {
                return;
            }
            st.room_wanted = true;
        }
        notified.await;
    }

    /// Open a stream: `:method POST`, `scheme`, `path`, `authority`, then `headers`; then
    /// `body` (the whole request body when `end`, else its first part; more goes through
    /// [`ResponseStream::sender`]).
    ///
    /// With `whole`, the answer is read whole with [`ResponseStream::poll_whole`], and the
    /// waker given is already registered for it: it is woken once, when the answer has
    /// ended (or failed, or holds half the stream's window).
    #[allow(clippy::too_many_arguments)] // the parts of one request, each used once
    pub(crate) fn send_request(
        &self,
        scheme: &str,
        authority: &str,
        path: &str,
        headers: &impl RequestFields,
        body: &Bytes,
        end: bool,
        whole: Option<&Waker>,
    ) -> Result<ResponseStream, StreamError> {
        let mut st = self.shared.lock();
        if st.closed.is_some() {
            return Err(StreamError::NotProcessed);
        }
        if st.streams.len() >= st.peer_max_streams {
            return Err(StreamError::AtCapacity);
        }
        if st.next_id > MAX_STREAM_ID {
            st.closed = Some(StreamError::ConnectionLost("stream ids used up".into()));
            return Err(StreamError::NotProcessed);
        }
        let was_empty = st.out.is_empty();
        let id = st.next_id;
        st.next_id += 2;
        let mut block = std::mem::take(&mut st.scratch);
        block.clear();
        st.encoder.begin_block(&mut block);
        let head: [(&[u8], &[u8]); 4] = [
            (b":method", b"POST"),
            (b":scheme", scheme.as_bytes()),
            (b":path", path.as_bytes()),
            (b":authority", authority.as_bytes()),
        ];
        let grpc: [(&[u8], &[u8]); 6] = [
            head[0],
            head[1],
            head[2],
            head[3],
            (b"te", b"trailers"),
            (b"content-type", b"application/grpc"),
        ];
        if headers.grpc_constants() {
            st.encoder.fields(&grpc, &mut block);
        } else {
            st.encoder.fields(&head, &mut block);
        }
        {
            let State { encoder, .. } = &mut *st;
            headers.each(|n, v| {
                // The deadline changes from request to request: never indexed.
                if n == b"grpc-timeout" {
                    encoder.literal(n, v, &mut block);
                } else {
                    encoder.field(n, v, &mut block);
                }
            });
        }
        let max = st.peer_max_frame;
        let headers_end = end && body.is_empty();
        frame::write_headers(&mut st.out, id, &block, headers_end, max);
        st.scratch = block;
        let mut s = Stream::new(st.peer_initial_window);
        s.data = st.spare.pop().unwrap_or_default();
        s.send_end = headers_end;
        if let Some(w) = whole {
            s.whole = true;
            s.waker = Some(w.clone());
        }
        st.streams.insert(id, s);
        if !headers_end {
            st.send_body(id, body, end);
        }
        drop(st);
        if was_empty {
            self.shared.writer.notify_one();
        }
        Ok(ResponseStream {
            taken: VecDeque::new(),
            taken_bytes: 0,
            single: None,
            trailers: None,
            done: false,
            shared: self.shared.clone(),
            id,
        })
    }
}

/// The regular fields of a request's header block (after the pseudo-headers).
pub(crate) trait RequestFields {
    /// Call `f` with each field's name and value.
    fn each(&self, f: impl FnMut(&[u8], &[u8]));

    /// Whether `te: trailers` and `content-type: application/grpc` are to be sent too (they
    /// are not among [`each`](Self::each)'s): they then join the pseudo-headers in one run
    /// that the encoder copies from its memo.
    fn grpc_constants(&self) -> bool {
        false
    }
}

impl RequestFields for HeaderMap {
    fn each(&self, mut f: impl FnMut(&[u8], &[u8])) {
        for (n, v) in self {
            f(n.as_str().as_bytes(), v.as_bytes());
        }
    }
}

/// What the connection's owner needs besides sending requests: keep-alive pings, the
/// number of open streams, failing the connection. It does not keep the connection open.
pub(crate) struct Control {
    shared: Arc<Shared>,
}

impl Control {
    /// Streams open on the connection (requests not yet answered in full and dropped).
    pub(crate) fn open_streams(&self) -> usize {
        self.shared.lock().streams.len()
    }

    /// Send a PING and wait for its answer; an error when the connection failed meanwhile.
    pub(crate) async fn ping(&self) -> Result<(), StreamError> {
        let n = {
            let mut st = self.shared.lock();
            if let Some(e) = &st.closed
                && st.dead
            {
                return Err(e.clone());
            }
            st.pings.sent += 1;
            let n = st.pings.sent;
            frame::write_ping(&mut st.out, n.to_be_bytes(), false);
            n
        };
        self.shared.writer.notify_one();
        std::future::poll_fn(|cx| {
            let mut st = self.shared.lock();
            if st.pings.acked >= n {
                return Poll::Ready(Ok(()));
            }
            if st.dead {
                let e = st.closed.clone();
                return Poll::Ready(Err(
                    e.unwrap_or(StreamError::ConnectionLost("the connection failed".into()))
                ));
            }
            st.pings.waker = Some(cx.waker().clone());
            Poll::Pending
        })
        .await
    }

    /// Fail the connection (a keep-alive timeout): its streams fail, new ones are refused.
    pub(crate) fn fail(&self, why: &str) {
        self.shared
            .fail(StreamError::ConnectionLost(why.to_owned()));
    }
}

/// The answer of one request: its head, its data, its trailers. Dropping it before the
/// stream ended resets the stream (CANCEL).
pub(crate) struct ResponseStream {
    shared: Arc<Shared>,
    id: u32,
    /// DATA taken from the stream in one visit, handed out from here without the lock.
    taken: VecDeque<Bytes>,
    /// The bytes taken so far that are not yet counted as read (their window goes back at
    /// the next visit, when all of them have been handed out).
    taken_bytes: u32,
    /// A whole answer's one DATA payload (the usual case; more go to `taken`).
    single: Option<Bytes>,
    /// A whole answer's trailers.
    trailers: Option<Fields>,
    /// The answer was taken whole and the stream is finished: what is left is handed out
    /// from here, and nothing touches the connection any more.
    done: bool,
}

impl ResponseStream {
    /// The handle that sends the rest of a streaming request body.
    pub(crate) fn sender(&self) -> SendHandle {
        SendHandle {
            shared: self.shared.clone(),
            id: self.id,
        }
    }

    /// The `:status` and headers of an answer read whole (the stream was opened `whole`).
    ///
    /// When the answer has ended, its head, data and trailers are all taken in this one visit
    /// and the stream is finished: the body is then read without the lock. When the answer
    /// holds data without having ended (a large one, at half the window) or failed after its
    /// head, the head is returned and the rest is read as a stream, as after
    /// [`poll_head`](Self::poll_head).
    pub(crate) fn poll_whole(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(u16, Fields), StreamError>> {
        let mut guard = self.shared.lock();
        let st = &mut *guard;
        let Some(s) = st.streams.get_mut(&self.id) else {
            return Poll::Ready(Err(StreamError::ConnectionLost("stream gone".into())));
        };
        if s.recv_end && s.error.is_none() {
            let Some((status, fields)) = s.head.take() else {
                return Poll::Ready(Err(StreamError::Reset(code::PROTOCOL_ERROR)));
            };
            let Some(mut s) = st.streams.remove(&self.id) else {
                return Poll::Ready(Err(StreamError::ConnectionLost("stream gone".into())));
            };
            let mut held = 0;
            if s.data.len() == 1 {
                if let Some(d) = s.data.pop_front() {
                    held = d.len() as u32;
                    self.single = Some(d);
                }
            } else {
                for d in s.data.drain(..) {
                    held += d.len() as u32;
                    self.taken.push_back(d);
                }
            }
            self.trailers = s.trailers.take();
            self.done = true;
            let after = st.finish_stream(self.id, &mut s, held);
            drop(guard);
            self.shared.after_finish(after);
            s.wake_both();
            return Poll::Ready(Ok((status, fields)));
        }
        if let Some((status, map)) = &mut s.head
            && (s.error.is_some() || !s.data.is_empty())
        {
            s.whole = false;
            return Poll::Ready(Ok((*status, std::mem::take(map))));
        }
        if let Some(e) = &s.error {
            return Poll::Ready(Err(e.clone()));
        }
        if !s.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            s.waker = Some(cx.waker().clone());
        }
        Poll::Pending
    }

    /// The `:status` and headers.
    pub(crate) fn poll_head(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(u16, Fields), StreamError>> {
        let mut st = self.shared.lock();
        let Some(s) = st.streams.get_mut(&self.id) else {
            return Poll::Ready(Err(StreamError::ConnectionLost("stream gone".into())));
        };
        if let Some((status, map)) = &mut s.head {
            return Poll::Ready(Ok((*status, std::mem::take(map))));
        }
        if let Some(e) = &s.error {
            return Poll::Ready(Err(e.clone()));
        }
        if s.recv_end {
            return Poll::Ready(Err(StreamError::Reset(code::PROTOCOL_ERROR)));
        }
        s.waker = Some(cx.waker().clone());
        Poll::Pending
    }

    /// The next DATA payload; `None` at the end of the data (then read the trailers).
    ///
    /// A visit to the connection's state takes every payload that has arrived (a burst of
    /// watch responses is hundreds of frames), and hands them out one by one without the
    /// lock. Their window goes back at the next visit, once all of them were handed out: the
    /// peer is held back by what the reader has not read, as before.
    #[inline]
    pub(crate) fn poll_data(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, StreamError>>> {
        if let Some(d) = self.single.take() {
            return Poll::Ready(Some(Ok(d)));
        }
        if let Some(d) = self.taken.pop_front() {
            return Poll::Ready(Some(Ok(d)));
        }
        if self.done {
            return Poll::Ready(None);
        }
        self.visit_data(cx)
    }

    fn visit_data(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, StreamError>>> {
        let mut guard = self.shared.lock();
        let st = &mut *guard;
        let Some(s) = st.streams.get_mut(&self.id) else {
            return Poll::Ready(None);
        };
        let read = mem::take(&mut self.taken_bytes);
        let was_empty = st.out.is_empty();
        if read > 0 {
            s.unacked += read;
            st.conn_unacked += read;
            if s.unacked >= STREAM_WINDOW / 2 && !s.recv_end {
                frame::write_window_update(&mut st.out, self.id, s.unacked);
                s.recv_window += i64::from(s.unacked);
                s.unacked = 0;
            }
        }
        let poll = if let Some(d) = s.data.pop_front() {
            let mut bytes = d.len() as u32;
            for more in s.data.drain(..) {
                bytes += more.len() as u32;
                self.taken.push_back(more);
            }
            self.taken_bytes = bytes;
            Poll::Ready(Some(Ok(d)))
        } else if let Some(e) = &s.error {
            Poll::Ready(Some(Err(e.clone())))
        } else if s.recv_end {
            Poll::Ready(None)
        } else {
            if !s.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                s.waker = Some(cx.waker().clone());
            }
            Poll::Pending
        };
        if read > 0 {
            st.maybe_ack_connection();
        }
        let wrote = was_empty && !st.out.is_empty();
        drop(guard);
        if wrote {
            self.shared.writer.notify_one();
        }
        poll
    }

    /// The trailers (`None` when the stream ended without).
    pub(crate) fn poll_trailers(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<Fields>, StreamError>> {
        if self.done {
            return Poll::Ready(Ok(self.trailers.take()));
        }
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
        if self.done {
            return;
        }
        let mut st = self.shared.lock();
        let Some(mut s) = st.streams.remove(&self.id) else {
            return;
        };
        // Give back what was received and not read (or read, not yet counted).
        let held: u32 = s.data.iter().map(|d| d.len() as u32).sum::<u32>() + self.taken_bytes;
        let after = st.finish_stream(self.id, &mut s, held);
        drop(st);
        self.shared.after_finish(after);
        s.wake_both();
    }
}

/// What is to be done, out of the lock, after a stream was finished.
struct AfterFinish {
    /// Frames were queued: wake the writer (also to close, when it was the last stream).
    write: bool,
    /// Requests waiting for room may go.
    room: bool,
}

impl State {
    /// Bookkeeping for stream `id`, just removed: `held` bytes of its data are given back to
    /// the connection's window, its DATA queue is kept for a new stream, and it is reset
    /// (CANCEL) unless it ended both ways or failed.
    fn finish_stream(&mut self, id: u32, s: &mut Stream, held: u32) -> AfterFinish {
        if s.data.capacity() <= SPARE_QUEUE_CAPACITY && self.spare.len() < SPARE_QUEUES {
            s.data.clear();
            self.spare.push(mem::take(&mut s.data));
        }
        self.conn_unacked += held;
        let was_empty = self.out.is_empty();
        if !(s.recv_end && s.send_end) && s.error.is_none() && !self.dead {
            frame::write_rst_stream(&mut self.out, id, code::CANCEL);
        }
        self.maybe_ack_connection();
        let wrote = was_empty && !self.out.is_empty();
        let shutdown = self.shutdown && self.streams.is_empty();
        AfterFinish {
            write: wrote || shutdown,
            room: self.take_room(),
        }
    }
}

impl Shared {
    fn after_finish(&self, after: AfterFinish) {
        if after.write {
            self.writer.notify_one();
        }
        if after.room {
            self.room.notify_waiters();
        }
    }
}

/// Sends the rest of a streaming request body.
pub(crate) struct SendHandle {
    shared: Arc<Shared>,
    id: u32,
}

impl SendHandle {
    /// `Ready(true)` when more data may be queued, `Ready(false)` when the stream takes no
    /// more (it ended, failed, was reset or dropped). Registers the waker either way, so a
    /// sender waiting on something else still learns that the stream ended.
    pub(crate) fn poll_capacity(&self, cx: &mut Context<'_>) -> Poll<bool> {
        let mut st = self.shared.lock();
        let Some(s) = st.streams.get_mut(&self.id) else {
            return Poll::Ready(false);
        };
        if s.error.is_some() || s.send_end || s.pending_end || s.recv_end {
            return Poll::Ready(false);
        }
        if !s
            .send_waker
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            s.send_waker = Some(cx.waker().clone());
        }
        if s.pending_bytes < SEND_BUFFER {
            Poll::Ready(true)
        } else {
            Poll::Pending
        }
    }

    /// Queue `data` (and the end of the request when `end`).
    pub(crate) fn send_data(&self, data: Bytes, end: bool) {
        let mut st = self.shared.lock();
        let was_empty = st.out.is_empty();
        st.queue_data(self.id, data, end);
        let wrote = was_empty && !st.out.is_empty();
        drop(st);
        if wrote {
            self.shared.writer.notify_one();
        }
    }

    /// Reset the stream with `code` (the request body failed); its answer fails too.
    pub(crate) fn reset(&self, code: u32) {
        let mut st = self.shared.lock();
        let was_empty = st.out.is_empty();
        let dead = st.dead;
        let Some(s) = st.streams.get_mut(&self.id) else {
            return;
        };
        if s.error.is_some() || (s.recv_end && s.send_end) {
            return;
        }
        s.error = Some(StreamError::Reset(code));
        s.pending.clear();
        s.pending_bytes = 0;
        s.send_end = true;
        s.wake_both();
        if !dead {
            frame::write_rst_stream(&mut st.out, self.id, code);
        }
        let wrote = was_empty && !st.out.is_empty();
        drop(st);
        if wrote {
            self.shared.writer.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::etcdserverpb as pb;
    use bytes::{Buf, BufMut};
    use prost::Message;

    /// A single-member etcd and our connection to it (driver spawned), with its authority
    /// and gRPC's request headers.
    pub(super) async fn connect_to_etcd() -> (
        crate::testkit::EtcdCluster,
        Conn,
        tokio::task::JoinHandle<()>,
        String,
        HeaderMap,
    ) {
        let etcd = crate::testkit::EtcdCluster::builder()
            .start_async()
            .await
            .unwrap();
        let addr = etcd.client_addr(0);
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        let (conn, _control, driver) = handshake(tcp);
        let task = tokio::spawn(driver);
        let mut headers = HeaderMap::new();
        headers.insert("te", http::HeaderValue::from_static("trailers"));
        headers.insert(
            "content-type",
            http::HeaderValue::from_static("application/grpc"),
        );
        (etcd, conn, task, addr.to_string(), headers)
    }

    /// A unary gRPC Put and Range over our connection to a real etcd.
    #[tokio::test]
    async fn unary_calls_against_a_real_etcd() {
        let (_etcd, conn, task, authority, headers) = connect_to_etcd().await;
        let call = |path: &'static str, msg: Vec<u8>| {
            let mut body = BytesMut::new();
            body.put_u8(0);
            body.put_u32(msg.len() as u32);
            body.put_slice(&msg);
            conn.send_request(
                "http",
                &authority,
                path,
                &headers,
                &body.freeze(),
                true,
                None,
            )
            .unwrap()
        };
        /// Status, data, and the trailers (or, for a trailers-only answer, the head).
        async fn answer(mut s: ResponseStream) -> (u16, Bytes, Fields) {
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
            assert_eq!(trailers.get("grpc-status").unwrap(), b"0", "{trailers:?}");
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
        assert_eq!(trailers.get("grpc-status").unwrap(), b"0");
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
        assert_eq!(trailers.get("grpc-status").unwrap(), b"0", "{trailers:?}");
        // An error status: a trailers-only answer (the status in the head, END_STREAM).
        let (_, _, trailers) = answer(call(
            "/etcdserverpb.KV/Put",
            pb::PutRequest::default().encode_to_vec(),
        ))
        .await;
        assert_ne!(trailers.get("grpc-status").unwrap(), b"0");
        drop(conn);
        tokio::time::timeout(std::time::Duration::from_secs(5), task)
            .await
            .expect("the driver ends when the last handle is gone")
            .unwrap();
    }
}

/// Protocol edge cases against a real HTTP/2 server of another implementation (the `h2`
/// crate's, in memory): the peer's limits, refused streams, GOAWAY, pings.
#[cfg(test)]
mod peer {
    use super::*;
    use std::time::Duration;

    fn grpc_headers() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("te", http::HeaderValue::from_static("trailers"));
        h.insert(
            "content-type",
            http::HeaderValue::from_static("application/grpc"),
        );
        h
    }

    /// Status, data and trailers of an answer.
    async fn answer(mut s: ResponseStream) -> Result<(u16, Vec<u8>, Option<Fields>), StreamError> {
        let (status, _) = std::future::poll_fn(|cx| s.poll_head(cx)).await?;
        let mut data = Vec::new();
        while let Some(d) = std::future::poll_fn(|cx| s.poll_data(cx)).await {
            data.extend_from_slice(&d?);
        }
        let trailers = std::future::poll_fn(|cx| s.poll_trailers(cx)).await?;
        Ok((status, data, trailers))
    }

    /// Times a request found no room under the peer's stream limit.
    static WAITS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

    /// Open a stream, waiting for room under the peer's stream limit.
    async fn open(conn: &Conn, body: Bytes) -> Result<ResponseStream, StreamError> {
        for _ in 0..1000 {
            match conn.send_request(
                "http",
                "peer",
                "/echo.Len",
                &grpc_headers(),
                &body,
                true,
                None,
            ) {
                Err(StreamError::AtCapacity) => {
                    WAITS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    conn.wait_room().await;
                }
                other => return other,
            }
        }
        panic!("no room in 1000 tries");
    }

    type Server = h2::server::Connection<tokio::io::DuplexStream, Bytes>;

    /// Serve requests: the answer's data is the request body's length (8 bytes, big
    /// endian), then `grpc-status: 0`. `on_request(n)` may refuse the n-th request (reset
    /// with REFUSED_STREAM, returns true) or start a graceful shutdown.
    async fn serve(mut conn: Server, mut on_request: impl FnMut(usize, &mut Server) -> bool) {
        let mut n = 0;
        let mut tasks = Vec::new();
        while let Some(Ok((req, mut respond))) = conn.accept().await {
            n += 1;
            if on_request(n, &mut conn) {
                respond.send_reset(h2::Reason::REFUSED_STREAM);
                continue;
            }
            tasks.push(tokio::spawn(async move {
                let mut body = req.into_body();
                let mut len = 0u64;
                while let Some(d) = body.data().await {
                    let d = d.unwrap();
                    len += d.len() as u64;
                    body.flow_control().release_capacity(d.len()).unwrap();
                }
                let mut send = respond
                    .send_response(http::Response::new(()), false)
                    .unwrap();
                send.send_data(Bytes::copy_from_slice(&len.to_be_bytes()), false)
                    .unwrap();
                let mut t = HeaderMap::new();
                t.insert("grpc-status", http::HeaderValue::from_static("0"));
                send.send_trailers(t).unwrap();
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
    }

    /// The peer allows one stream at a time, a 10-byte stream window and an empty header
    /// table: concurrent requests wait for room, bodies trickle through the window, and our
    /// encoder announces and keeps the smaller table (else the peer fails to decode).
    #[tokio::test]
    async fn the_peers_stream_limit_window_and_table_size_are_honoured() {
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(async move {
            let conn = h2::server::Builder::new()
                .max_concurrent_streams(1)
                .initial_window_size(10)
                .header_table_size(0)
                .handshake(theirs)
                .await
                .unwrap();
            serve(conn, |_, _| false).await;
        });
        let (conn, control, driver) = handshake(ours);
        let driver = tokio::spawn(driver);
        // The first answer comes after the peer's SETTINGS: its limits apply from here on.
        let (status, data, trailers) = answer(open(&conn, Bytes::from_static(b"x")).await.unwrap())
            .await
            .unwrap();
        assert_eq!((status, data), (200, 1u64.to_be_bytes().to_vec()));
        assert_eq!(trailers.unwrap().get("grpc-status").unwrap(), b"0");
        assert_eq!(conn.shared.lock().encoder.table_limit(), 0);
        let calls = (0..4u64).map(|i| {
            let conn = conn.clone();
            async move {
                let len = 1000 * (i + 1);
                let s = open(&conn, Bytes::from(vec![7u8; len as usize]))
                    .await
                    .unwrap();
                let (_, data, _) = answer(s).await.unwrap();
                assert_eq!(data, len.to_be_bytes().to_vec());
            }
        });
        tokio::time::timeout(Duration::from_secs(10), futures::future::join_all(calls))
            .await
            .expect("every call answered");
        assert_eq!(control.open_streams(), 0);
        // Four at once under a limit of one: three found no room at first.
        assert!(WAITS.load(std::sync::atomic::Ordering::Relaxed) >= 3);
        tokio::time::timeout(Duration::from_secs(5), control.ping())
            .await
            .expect("the ping is answered")
            .unwrap();
        drop(conn);
        tokio::time::timeout(Duration::from_secs(5), driver)
            .await
            .expect("the driver ends when the last handle is gone")
            .unwrap();
        server.await.unwrap();
    }

    /// An answer larger than our stream window, in many small DATA frames: the reader takes
    /// what has arrived in one visit and hands it out frame by frame; the window goes back
    /// as it reads, so the whole answer comes through, and what we hold never exceeds it.
    #[tokio::test]
    async fn a_long_answer_flows_through_the_window_as_it_is_read() {
        const FRAME: usize = 16 * 1024;
        const TOTAL: usize = 3 * STREAM_WINDOW as usize;
        let (ours, theirs) = tokio::io::duplex(256 * 1024);
        let server = tokio::spawn(async move {
            let mut conn = h2::server::Builder::new().handshake(theirs).await.unwrap();
            let (_req, mut respond) = conn.accept().await.unwrap().unwrap();
            let sender = tokio::spawn(async move {
                let mut send = respond
                    .send_response(http::Response::new(()), false)
                    .unwrap();
                let chunk = Bytes::from(vec![1u8; FRAME]);
                let mut sent = 0;
                while sent < TOTAL {
                    send.reserve_capacity(FRAME);
                    let room = std::future::poll_fn(|cx| send.poll_capacity(cx))
                        .await
                        .unwrap()
                        .unwrap();
                    let n = room.min(FRAME).min(TOTAL - sent);
                    send.send_data(chunk.slice(..n), false).unwrap();
                    sent += n;
                }
                let mut t = HeaderMap::new();
                t.insert("grpc-status", http::HeaderValue::from_static("0"));
                send.send_trailers(t).unwrap();
            });
            while conn.accept().await.is_some() {}
            sender.await.unwrap();
        });
        let (conn, _control, driver) = handshake(ours);
        tokio::spawn(driver);
        let mut s = open(&conn, Bytes::from_static(b"x")).await.unwrap();
        let id = s.id;
        let (status, _) = std::future::poll_fn(|cx| s.poll_head(cx)).await.unwrap();
        assert_eq!(status, 200);
        let mut read = 0usize;
        let mut most_held = 0usize;
        tokio::time::timeout(Duration::from_secs(20), async {
            while let Some(d) = std::future::poll_fn(|cx| s.poll_data(cx)).await {
                read += d.unwrap().len();
                let queued: usize = conn
                    .shared
                    .lock()
                    .streams
                    .get(&id)
                    .map_or(0, |st| st.data.iter().map(Bytes::len).sum());
                let held = queued + s.taken.iter().map(Bytes::len).sum::<usize>();
                most_held = most_held.max(held);
            }
        })
        .await
        .expect("the whole answer comes through");
        assert_eq!(read, TOTAL);
        assert!(most_held <= STREAM_WINDOW as usize, "held {most_held}");
        let trailers = std::future::poll_fn(|cx| s.poll_trailers(cx))
            .await
            .unwrap();
        assert_eq!(trailers.unwrap().get("grpc-status").unwrap(), b"0");
        drop(s);
        drop(conn);
        server.await.unwrap();
    }

    /// Counts the wakes of a reader.
    struct Wakes(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    impl Wakes {
        fn count(&self) -> usize {
            self.0.load(std::sync::atomic::Ordering::SeqCst)
        }
    }

    /// Wait (bounded: 10 s) until `cond` holds.
    async fn until(what: &str, mut cond: impl FnMut() -> bool) {
        for _ in 0..2000 {
            if cond() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("timed out waiting until {what}");
    }

    /// A unary answer read whole: its reader is not woken for the head nor the data, only
    /// once when the answer has ended; then one visit takes it all and finishes the stream.
    /// An answer that fills half the stream window wakes the reader before its end, and the
    /// rest is read as a stream (else it would stall on the window).
    #[tokio::test]
    async fn a_whole_answer_wakes_its_reader_once_and_a_large_one_is_streamed() {
        // More than the stream window: it cannot end before it is read.
        const BIG: usize = 2 * STREAM_WINDOW as usize;
        let (ours, theirs) = tokio::io::duplex(256 * 1024);
        let (go_tx, mut go_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        let server = tokio::spawn(async move {
            let mut conn = h2::server::Builder::new().handshake(theirs).await.unwrap();
            let serving = tokio::spawn(async move {
                // The first request: head, data and trailers, each when the test says so.
                let (_req, mut respond) = conn.accept().await.unwrap().unwrap();
                let (_req2, mut respond2) = conn.accept().await.unwrap().unwrap();
                // The connection is driven until the client closes it.
                let acceptor = tokio::spawn(async move { while conn.accept().await.is_some() {} });
                go_rx.recv().await.unwrap();
                let mut send = respond
                    .send_response(http::Response::new(()), false)
                    .unwrap();
                go_rx.recv().await.unwrap();
                send.send_data(Bytes::from_static(b"answer"), false)
                    .unwrap();
                go_rx.recv().await.unwrap();
                let mut t = HeaderMap::new();
                t.insert("grpc-status", http::HeaderValue::from_static("0"));
                send.send_trailers(t.clone()).unwrap();
                // The second: BIG bytes of data, then the trailers.
                let mut send = respond2
                    .send_response(http::Response::new(()), false)
                    .unwrap();
                let chunk = Bytes::from(vec![2u8; 16 * 1024]);
                let mut sent = 0;
                while sent < BIG {
                    send.reserve_capacity(chunk.len());
                    let room = std::future::poll_fn(|cx| send.poll_capacity(cx))
                        .await
                        .unwrap()
                        .unwrap();
                    let n = room.min(chunk.len()).min(BIG - sent);
                    send.send_data(chunk.slice(..n), false).unwrap();
                    sent += n;
                }
                send.send_trailers(t).unwrap();
                acceptor.await.unwrap();
            });
            serving.await.unwrap();
        });
        let (conn, control, driver) = handshake(ours);
        tokio::spawn(driver);
        let wakes = Arc::new(Wakes(std::sync::atomic::AtomicUsize::new(0)));
        let waker = Waker::from(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        let send = |w: &Waker| {
            conn.send_request(
                "http",
                "peer",
                "/echo.Len",
                &grpc_headers(),
                &Bytes::from_static(b"x"),
                true,
                Some(w),
            )
            .unwrap()
        };
        let mut s = send(&waker);
        let big_wakes = Arc::new(Wakes(std::sync::atomic::AtomicUsize::new(0)));
        let big_waker = Waker::from(big_wakes.clone());
        let mut big = send(&big_waker);
        let stream =
            |id: u32, f: fn(&Stream) -> bool| conn.shared.lock().streams.get(&id).is_some_and(f);
        go_tx.send(()).unwrap();
        until("the head arrived", || stream(s.id, |st| st.head.is_some())).await;
        assert!(s.poll_whole(&mut cx).is_pending());
        go_tx.send(()).unwrap();
        until("the data arrived", || {
            stream(s.id, |st| !st.data.is_empty())
        })
        .await;
        assert_eq!(wakes.count(), 0, "not woken for the head nor the data");
        go_tx.send(()).unwrap();
        until("the reader is woken", || wakes.count() > 0).await;
        let Poll::Ready(Ok((status, _))) = s.poll_whole(&mut cx) else {
            panic!("the whole answer is there");
        };
        assert_eq!(status, 200);
        assert_eq!(wakes.count(), 1, "woken once");
        assert!(s.done);
        assert!(!conn.shared.lock().streams.contains_key(&s.id), "finished");
        let Poll::Ready(Some(Ok(d))) = s.poll_data(&mut cx) else {
            panic!("the data");
        };
        assert_eq!(&d[..], b"answer");
        assert!(matches!(s.poll_data(&mut cx), Poll::Ready(None)));
        let Poll::Ready(Ok(Some(t))) = s.poll_trailers(&mut cx) else {
            panic!("the trailers");
        };
        assert_eq!(t.get("grpc-status").unwrap(), b"0");
        drop(s);
        // The large answer: woken at half the window, before its end, then streamed.
        until("the large answer's reader is woken", || {
            big_wakes.count() > 0
        })
        .await;
        let (status, _) = std::future::poll_fn(|cx| big.poll_whole(cx)).await.unwrap();
        assert_eq!(status, 200);
        assert!(!big.done);
        let mut read = 0;
        tokio::time::timeout(Duration::from_secs(20), async {
            while let Some(d) = std::future::poll_fn(|cx| big.poll_data(cx)).await {
                read += d.unwrap().len();
            }
        })
        .await
        .expect("the large answer comes through");
        assert_eq!(read, BIG);
        let t = std::future::poll_fn(|cx| big.poll_trailers(cx))
            .await
            .unwrap();
        assert_eq!(t.unwrap().get("grpc-status").unwrap(), b"0");
        drop(big);
        assert_eq!(control.open_streams(), 0);
        drop(conn);
        server.await.unwrap();
    }

    /// A connection whose peer the test plays by hand (writing raw frames), with stream 1
    /// open (a one-byte request sent).
    async fn raw_peer() -> (Conn, tokio::io::DuplexStream, ResponseStream) {
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        let (conn, _control, driver) = handshake(ours);
        tokio::spawn(driver);
        let s = open(&conn, Bytes::from_static(b"x")).await.unwrap();
        (conn, theirs, s)
    }

    /// A peer breaking the protocol (here a CONTINUATION with no header block before it)
    /// fails the connection with a GOAWAY, and its open streams with it; so does a driver
    /// that is dropped (or panics) instead of ending.
    #[tokio::test]
    async fn protocol_errors_and_a_dropped_driver_fail_the_streams() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (conn, mut theirs, s) = raw_peer().await;
        // The server: its SETTINGS, then a CONTINUATION on stream 1 out of the blue.
        let mut out = BytesMut::new();
        frame::write_settings(&mut out, &[]);
        out.extend_from_slice(&[0, 0, 1, frame::kind::CONTINUATION, frame::flag::END_HEADERS]);
        out.extend_from_slice(&1u32.to_be_bytes());
        out.extend_from_slice(&[0x88]);
        theirs.write_all(&out).await.unwrap();
        match tokio::time::timeout(Duration::from_secs(5), answer(s)).await {
            Ok(Err(StreamError::ConnectionLost(why))) => {
                assert!(why.contains("CONTINUATION"), "{why}")
            }
            other => panic!("{other:?}"),
        }
        // Our GOAWAY (type 7) with PROTOCOL_ERROR is among what we wrote.
        let mut seen = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(2), theirs.read_to_end(&mut seen)).await;
        // Walk our frames (after the preface) to the GOAWAY and its error code.
        let mut pos = frame::PREFACE.len();
        let mut goaway_code = None;
        while pos + 9 <= seen.len() {
            let len = usize::from(seen[pos]) << 16
                | usize::from(seen[pos + 1]) << 8
                | usize::from(seen[pos + 2]);
            if seen[pos + 3] == frame::kind::GOAWAY && pos + 9 + 8 <= seen.len() {
                let c = &seen[pos + 9 + 4..pos + 9 + 8];
                goaway_code = Some(u32::from_be_bytes([c[0], c[1], c[2], c[3]]));
            }
            pos += 9 + len;
        }
        assert_eq!(goaway_code, Some(code::PROTOCOL_ERROR), "{seen:?}");
        assert_eq!(
            open(&conn, Bytes::new()).await.err(),
            Some(StreamError::NotProcessed)
        );

        // A driver dropped without ending.
        let (ours, _theirs) = tokio::io::duplex(64 * 1024);
        let (conn, _control, driver) = handshake(ours);
        let s = open(&conn, Bytes::from_static(b"y")).await.unwrap();
        drop(driver);
        let r = tokio::time::timeout(Duration::from_secs(5), answer(s))
            .await
            .expect("the stream fails with its driver");
        assert!(matches!(r, Err(StreamError::ConnectionLost(_))), "{r:?}");
        assert_eq!(
            open(&conn, Bytes::new()).await.err(),
            Some(StreamError::NotProcessed)
        );
    }

    /// §6.9.2: a SETTINGS_INITIAL_WINDOW_SIZE change that takes an open stream's send window
    /// above 2^31-1 is a connection error (FLOW_CONTROL_ERROR).
    #[tokio::test]
    async fn an_initial_window_change_that_overflows_a_stream_window_fails_the_connection() {
        use tokio::io::AsyncWriteExt;
        let (_conn, mut theirs, s) = raw_peer().await;
        let mut out = BytesMut::new();
        frame::write_settings(&mut out, &[]);
        // Stream 1's window: 65,535 less the request sent (a byte), plus 2^31-1 - 65,535:
        // just under 2^31-1, legal.
        frame::write_window_update(&mut out, 1, 0x7fff_ffff - 65_535);
        // Then every stream's initial window grows by 1,000: stream 1's would pass 2^31-1.
        frame::write_settings(&mut out, &[(setting::INITIAL_WINDOW_SIZE, 65_535 + 1_000)]);
        theirs.write_all(&out).await.unwrap();
        match tokio::time::timeout(Duration::from_secs(5), answer(s)).await {
            Ok(Err(StreamError::ConnectionLost(why))) => {
                assert!(why.contains("initial window"), "{why}")
            }
            other => panic!("{other:?}"),
        }
    }

    /// §6.5.2: a server that sets SETTINGS_ENABLE_PUSH (to anything but 0) breaks the
    /// protocol: the connection fails.
    #[tokio::test]
    async fn a_server_that_enables_push_fails_the_connection() {
        use tokio::io::AsyncWriteExt;
        let (_conn, mut theirs, s) = raw_peer().await;
        let mut out = BytesMut::new();
        frame::write_settings(&mut out, &[(setting::ENABLE_PUSH, 1)]);
        theirs.write_all(&out).await.unwrap();
        match tokio::time::timeout(Duration::from_secs(5), answer(s)).await {
            Ok(Err(StreamError::ConnectionLost(why))) => {
                assert!(why.contains("ENABLE_PUSH"), "{why}")
            }
            other => panic!("{other:?}"),
        }
        // Saying 0 is fine.
        let (_conn, mut theirs, s) = raw_peer().await;
        let mut out = BytesMut::new();
        frame::write_settings(&mut out, &[(setting::ENABLE_PUSH, 0)]);
        theirs.write_all(&out).await.unwrap();
        let r = tokio::time::timeout(Duration::from_millis(300), answer(s)).await;
        assert!(r.is_err(), "the stream still waits for its answer: {r:?}");
    }

    /// §10.5: a peer that floods PINGs and never reads our answers does not grow our
    /// buffer without bound: past 10,000 queued answers the connection fails with
    /// ENHANCE_YOUR_CALM.
    #[tokio::test]
    async fn a_peer_that_floods_pings_without_reading_fails_the_connection() {
        use tokio::io::AsyncWriteExt;
        let (_conn, mut theirs, s) = raw_peer().await;
        let mut out = BytesMut::new();
        frame::write_settings(&mut out, &[]);
        // Our answers fill the 64 KiB pipe after about 3,800 PINGs; the rest wait in our
        // buffer, since the test never reads.
        for i in 0..30_000u64 {
            frame::write_ping(&mut out, i.to_be_bytes(), false);
        }
        let flood = tokio::spawn(async move {
            // The write stops when the connection fails (our side closes the pipe).
            let _ = theirs.write_all(&out).await;
            theirs
        });
        match tokio::time::timeout(Duration::from_secs(10), answer(s)).await {
            Ok(Err(StreamError::ConnectionLost(why))) => {
                assert!(why.contains("too many control frames"), "{why}")
            }
            other => panic!("{other:?}"),
        }
        drop(flood);
    }

    /// A refused stream and the streams after the peer's GOAWAY are not processed (safe to
    /// retry elsewhere); failing the connection fails its open streams.
    #[tokio::test]
    async fn refused_streams_and_goaway_are_not_processed() {
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(async move {
            let conn = h2::server::handshake(theirs).await.unwrap();
            serve(conn, |n, conn| {
                if n == 2 {
                    conn.graceful_shutdown();
                }
                n == 1
            })
            .await;
        });
        let (conn, control, driver) = handshake(ours);
        tokio::spawn(driver);
        let first = answer(open(&conn, Bytes::from_static(b"a")).await.unwrap()).await;
        assert_eq!(first.unwrap_err(), StreamError::NotProcessed);
        // The second is answered; the server goes away meanwhile.
        let (_, data, _) = answer(open(&conn, Bytes::from_static(b"bb")).await.unwrap())
            .await
            .unwrap();
        assert_eq!(data, 2u64.to_be_bytes().to_vec());
        // Once its GOAWAY is in, new requests are refused at once, as never processed.
        let mut refused = false;
        for _ in 0..200 {
            match open(&conn, Bytes::from_static(b"c")).await {
                Err(e) => {
                    assert_eq!(e, StreamError::NotProcessed);
                    refused = true;
                    break;
                }
                Ok(s) => {
                    // Sent before the GOAWAY arrived: answered, or not processed.
                    if let Err(e) = answer(s).await {
                        assert_eq!(e, StreamError::NotProcessed);
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(refused, "requests after GOAWAY are refused");
        server.await.unwrap();
        // A stream open when the connection is failed (a keep-alive timeout) fails with it.
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            let mut conn = h2::server::handshake(theirs).await.unwrap();
            // Accept and never answer.
            let _held = conn.accept().await;
            std::future::pending::<()>().await;
        });
        let (conn, control2, driver) = handshake(ours);
        tokio::spawn(driver);
        let s = open(&conn, Bytes::from_static(b"d")).await.unwrap();
        drop(control);
        control2.fail("keep-alive ping unanswered");
        match answer(s).await {
            Err(StreamError::ConnectionLost(why)) => assert!(why.contains("keep-alive"), "{why}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            conn.send_request(
                "http",
                "peer",
                "/x",
                &grpc_headers(),
                &Bytes::new(),
                true,
                None
            )
            .err(),
            Some(StreamError::NotProcessed)
        );
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
            let (_etcd, conn, _task, authority, mut headers) =
                super::tests::connect_to_etcd().await;
            headers.insert("grpc-timeout", http::HeaderValue::from_static("5000m"));
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
                        &body.freeze(),
                        true,
                        None,
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
                assert_eq!(t.get("grpc-status").unwrap(), b"0");
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
