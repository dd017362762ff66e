//! The multiplexer: one task per client (and stream-level option set) that owns the gRPC
//! Watch stream and every watcher's state.
//!
//! Watch ids are chosen by the client: the low 40 bits are the watcher's stable id, the high
//! bits count creations, so every (re-)creation gets an id never used before. Answers are
//! matched by id, and a late event for an id that is no longer current (a paused or cancelled
//! watcher) can never be taken for a newer incarnation's. etcd answers creates in order,
//! which the in-flight queue uses for the one answer without an id (a refused create).

use std::collections::VecDeque;
use std::mem;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use rand::Rng;
use tokio::sync::{mpsc, oneshot};
use tonic::metadata::AsciiMetadataValue;

use super::codec::{self, Response, WATCH_PATH};
use super::queue::{PushError, WatcherQueue};
use super::{BatchKind, BoxFuture, Event, Events, Flags, MAX_WATCHER_ID, Stats, WatchBatch};
use crate::balancer::WeakPick;
use crate::client::{Shared, is_endpoint_failure};
use crate::error::{Error, ErrorKind};
use crate::grpc::MessageStream;
use crate::proto::etcdserverpb as pb;
use crate::types::ResponseHeader;
use std::sync::atomic::Ordering;

/// The watch id etcd uses for answers that belong to no single watcher (a refused create,
/// a requested progress notification).
const INVALID_WATCH_ID: i64 = -1;
/// Bits of a wire watch id that count (re-)creations.
const GENERATION_MASK: u64 = (1 << 22) - 1;
/// First and largest reconnect back-off (each is jittered down to half).
const BACKOFF_BASE: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Responses handled in a row before the worker wakes the consumers it queued batches for
/// and lets other tasks (the consumers) run: on a single-threaded runtime a busy stream would
/// otherwise fill the buffers of consumers that keep pace, and pause them for nothing.
const YIELD_EVERY: u32 = 64;
/// Messages handled together at most (see `Worker::on_messages`).
const GATHER: usize = 64;
/// How long after a stream with a token obtained by a forced re-authentication starts
/// opening its creates count as sent with a surely valid token. etcd's shortest token TTL is
/// one second (`--auth-token-ttl`), and a simple token's TTL starts over at each use.
const FRESH_TOKEN: Duration = Duration::from_secs(1);

/// Messages from handles to the worker.
pub(crate) enum Cmd {
    /// Start a watcher.
    Create(Box<CreateCmd>),
    /// Stop a watcher (dropped or cancelled); `ack` is answered once the server confirmed.
    Cancel {
        id: u64,
        ack: Option<oneshot::Sender<()>>,
    },
    /// Ask the server for a progress notification for this watcher.
    Progress(u64),
    /// The consumer of a paused watcher drained half of its buffer.
    Resume(u64),
}

pub(crate) struct CreateCmd {
    pub(crate) id: u64,
    pub(crate) key: Bytes,
    pub(crate) range_end: Bytes,
    pub(crate) start_revision: i64,
    pub(crate) flags: Flags,
    pub(crate) queue: Arc<WatcherQueue>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotState {
    /// Needs a create request on the next stream.
    Unsent,
    /// Create sent, answer pending.
    Creating,
    /// Created on the current stream.
    Active,
    /// Its buffer overflowed: cancelled on the server until the consumer catches up.
    Paused,
}

/// One watcher, as the worker knows it. Kept small (there may be 100,000 of them), and in
/// one cache line: a response reads it first, at a burst from memory.
#[repr(align(64))]
struct Slot {
    /// The watcher's stable id.
    id: u64,
    queue: Arc<WatcherQueue>,
    /// The key followed by the range end.
    spec: Box<[u8]>,
    key_len: u32,
    flags: Flags,
    state: SlotState,
    /// The server confirmed the first creation (and the user's await returned).
    confirmed: bool,
    progress_wanted: bool,
    /// The next revision this watcher needs; 0 until a watcher from "now" is created.
    next_rev: i64,
    /// Wire watch id on the current stream (0: none).
    sid: i64,
    /// Fragments of a revision being reassembled (boxed: 8 bytes per watcher instead of 24,
    /// for a buffer that is almost always absent).
    #[allow(clippy::box_collection)]
    frag: Option<Box<Vec<Event>>>,
}

impl Slot {
    fn create_request(&self, sid: i64) -> pb::WatchRequest {
        let split = (self.key_len as usize).min(self.spec.len());
        let (key, end) = self.spec.split_at(split);
        let mut filters = Vec::new();
        if self.flags.has(Flags::NO_PUT) {
            filters.push(pb::watch_create_request::FilterType::Noput as i32);
        }
        if self.flags.has(Flags::NO_DELETE) {
            filters.push(pb::watch_create_request::FilterType::Nodelete as i32);
        }
        pb::WatchRequest {
            request_union: Some(pb::watch_request::RequestUnion::CreateRequest(
                pb::WatchCreateRequest {
                    key: Bytes::copy_from_slice(key),
                    range_end: Bytes::copy_from_slice(end),
                    start_revision: self.next_rev,
                    progress_notify: self.flags.has(Flags::PROGRESS_NOTIFY),
                    filters,
                    prev_kv: self.flags.has(Flags::PREV_KV),
                    watch_id: sid,
                    fragment: self.flags.has(Flags::FRAGMENT),
                },
            )),
        }
    }
}

fn cancel_request(sid: i64) -> pb::WatchRequest {
    pb::WatchRequest {
        request_union: Some(pb::watch_request::RequestUnion::CancelRequest(
            pb::WatchCancelRequest { watch_id: sid },
        )),
    }
}

fn progress_request() -> pb::WatchRequest {
    pb::WatchRequest {
        request_union: Some(pb::watch_request::RequestUnion::ProgressRequest(
            pb::WatchProgressRequest {},
        )),
    }
}

/// The wire id of creation number `n` of the watcher at `index` in the table: never 0
/// (which asks etcd to choose) nor negative.
fn wire_id(index: u32, n: u64) -> i64 {
    ((u64::from(index) + 1) | ((n & GENERATION_MASK) << 40)) as i64
}

/// The table index a wire id names (out of range when it names none).
fn slot_index(sid: i64) -> u64 {
    ((sid as u64) & MAX_WATCHER_ID).wrapping_sub(1)
}

type Slots = super::slots::Slots<Slot>;
type ReqTx = mpsc::UnboundedSender<pb::WatchRequest>;
type OpenResult = std::result::Result<(MessageStream<Bytes>, Option<u64>), (Error, Option<u64>)>;

/// The request half of the gRPC stream.
struct ReqStream(mpsc::UnboundedReceiver<pb::WatchRequest>);

impl futures_core::Stream for ReqStream {
    type Item = pb::WatchRequest;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.0.poll_recv(cx)
    }
}

// One per worker: the size difference between variants does not matter.
#[allow(clippy::large_enum_variant)]
enum Conn {
    /// No stream (no watcher needs one).
    Idle,
    /// Waiting before reconnecting.
    Backoff(Pin<Box<tokio::time::Sleep>>),
    /// Stream requested; requests are already queued on `tx`.
    Opening {
        tx: ReqTx,
        fut: BoxFuture<OpenResult>,
    },
    Open {
        tx: ReqTx,
        stream: MessageStream<Bytes>,
        /// The auth token generation the stream was opened with.
        token_gen: Option<u64>,
    },
}

impl Conn {
    fn tx(&self) -> Option<&ReqTx> {
        match self {
            Conn::Opening { tx, .. } | Conn::Open { tx, .. } => Some(tx),
            _ => None,
        }
    }
}

enum ConnEvent {
    BackoffDone,
    Opened(OpenResult),
    Message(std::result::Result<Option<Bytes>, tonic::Status>),
}

async fn conn_event(conn: &mut Conn) -> ConnEvent {
    match conn {
        Conn::Idle => std::future::pending().await,
        Conn::Backoff(sleep) => {
            sleep.as_mut().await;
            ConnEvent::BackoffDone
        }
        Conn::Opening { fut, .. } => ConnEvent::Opened(fut.as_mut().await),
        Conn::Open { stream, .. } => ConnEvent::Message(stream.message().await),
    }
}

async fn open_stream(
    shared: Arc<Shared>,
    channel: crate::transport::Channel,
    stale: Option<u64>,
    require_leader: bool,
    rx: mpsc::UnboundedReceiver<pb::WatchRequest>,
) -> OpenResult {
    let (mut request, token_gen) = shared
        .stream_request(ReqStream(rx), stale)
        .await
        .map_err(|e| (e, None))?;
    if require_leader {
        // etcd's rpctypes.MetadataRequireLeaderKey
        request
            .metadata_mut()
            .insert("hasleader", AsciiMetadataValue::from_static("true"));
    }
    // The messages are read straight off the response body and decoded by the watch decoder.
    match crate::grpc::streaming(channel, WATCH_PATH, request, codec::raw).await {
        Ok(stream) => Ok((stream, token_gen)),
        Err(status) => Err((Error::from_status(status), token_gen)),
    }
}

fn backoff(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(16);
    let max = BACKOFF_BASE.saturating_mul(1 << exp).min(BACKOFF_MAX);
    let ms = u64::try_from(max.as_millis()).unwrap_or(u64::MAX).max(2);
    Duration::from_millis(rand::rng().random_range(ms / 2..=ms))
}

/// Errors after which reconnecting cannot help: they end every watcher.
fn is_terminal(e: &Error) -> bool {
    matches!(e.kind(), ErrorKind::AuthFailed | ErrorKind::Unimplemented)
}

fn copy_error(e: &Error) -> Error {
    let c = Error::new(e.kind(), e.message());
    match e.compact_revision() {
        Some(r) => c.with_compact_revision(r),
        None => c,
    }
}

pub(crate) struct Worker {
    shared: Arc<Shared>,
    require_leader: bool,
    cmds: mpsc::UnboundedReceiver<Cmd>,
    slots: Slots,
    conn: Conn,
    /// Wire ids of the creates sent on the current stream and not answered yet, in order.
    inflight: VecDeque<i64>,
    /// Creations so far (the generation part of wire ids).
    creations: u64,
    /// Watchers waiting for a requested progress notification, each with the number of the
    /// progress request on the current stream that answers it (0: none sent yet).
    progress_waiters: Vec<(u64, u64)>,
    /// Progress requests sent on the current stream, and answers received: etcd answers
    /// them in order, so answer `n` is for request `n`.
    progress_sent: u64,
    progress_answered: u64,
    /// `Watcher::cancel` calls waiting for the server's confirmation, by wire id.
    cancel_acks: Vec<(i64, oneshot::Sender<()>)>,
    /// Stream failures since the last message received.
    failures: u32,
    /// The endpoint the current stream went to (reported to the balancer when it fails).
    pick: Option<WeakPick>,
    /// A token generation the server rejected: re-authenticate on the next stream.
    stale_token: Option<u64>,
    /// The stream being opened asked for a fresh token.
    forced_reauth: bool,
    /// For a stream with a fresh token: until when a create sent on it surely carries a
    /// valid token.
    fresh_token_until: Option<tokio::time::Instant>,
    /// Creates sent on the current stream; how many of the first ones were sent while its
    /// token was surely valid; creates answered. etcd answers creates in order, so the
    /// answer to create `n` tells whether a refusal can be blamed on an expired token.
    creates_sent: u64,
    fresh_creates: u64,
    creates_answered: u64,
    stats: Arc<Stats>,
    /// Consumers with a new batch queued, not woken yet: waking them in one run once the
    /// stream has nothing more ready (or before yielding, at most `YIELD_EVERY` responses
    /// later) costs far less than one wake-up per response, which on a multi-threaded runtime
    /// unparks an idle worker thread again and again (a system call each time).
    wakes: Vec<Waker>,
    header_memo: codec::HeaderMemo,
    /// Messages ready on the stream, to be handled together (see `on_messages`).
    gathered: Vec<Bytes>,
    /// Their decoded responses (kept for the room).
    decoded: Vec<Response>,
    /// Streams closed so far.
    resets: u64,
}

impl Worker {
    pub(crate) fn new(
        shared: Arc<Shared>,
        require_leader: bool,
        cmds: mpsc::UnboundedReceiver<Cmd>,
        stats: Arc<Stats>,
    ) -> Self {
        Worker {
            shared,
            require_leader,
            cmds,
            slots: Slots::default(),
            conn: Conn::Idle,
            inflight: VecDeque::new(),
            creations: 0,
            progress_waiters: Vec::new(),
            progress_sent: 0,
            progress_answered: 0,
            cancel_acks: Vec::new(),
            failures: 0,
            pick: None,
            stale_token: None,
            forced_reauth: false,
            fresh_token_until: None,
            creates_sent: 0,
            fresh_creates: 0,
            creates_answered: 0,
            stats,
            wakes: Vec::new(),
            header_memo: codec::HeaderMemo::default(),
            gathered: Vec::with_capacity(GATHER),
            decoded: Vec::with_capacity(GATHER),
            resets: 0,
        }
    }

    /// Runs until every handle (the client and all watchers) is gone, or the client is closed.
    pub(crate) async fn run(mut self) {
        let closed = self.shared.closed();
        tokio::pin!(closed);
        let mut in_a_row = 0u32;
        'run: loop {
            tokio::select! {
                biased;
                cmd = self.cmds.recv() => match cmd {
                    Some(cmd) => self.on_cmd(cmd),
                    None => break,
                },
                ev = conn_event(&mut self.conn) => {
                    // Handle the messages that are ready without going through the select
                    // for each (commands wait that long), in runs of up to `GATHER`.
                    let mut first = Some(ev);
                    loop {
                        let mut other = None;
                        match first.take() {
                            Some(ConnEvent::Message(Ok(Some(bytes)))) => self.gathered.push(bytes),
                            Some(ev) => other = Some(ev),
                            None => {}
                        }
                        while other.is_none() && self.gathered.len() < GATHER {
                            match self.ready_message().await {
                                Some(ConnEvent::Message(Ok(Some(bytes)))) => {
                                    self.gathered.push(bytes);
                                }
                                Some(ev) => other = Some(ev),
                                None => break,
                            }
                        }
                        let run = self.gathered.len();
                        if run > 0 && !self.on_messages() {
                            break 'run;
                        }
                        if let Some(ev) = other {
                            // Not a message: handled after the messages before it, and the
                            // end of this run.
                            if !self.on_conn_event(ev) {
                                break 'run;
                            }
                            break;
                        }
                        if run < GATHER {
                            break; // nothing more is ready
                        }
                        in_a_row += run as u32;
                        if in_a_row >= YIELD_EVERY {
                            in_a_row = 0;
                            self.flush_wakes();
                            tokio::task::yield_now().await;
                            break;
                        }
                    }
                }
                () = &mut closed => {
                    self.shutdown();
                    break;
                }
                // Last (the select is biased): nothing else is ready, the worker is about to
                // wait. Wake the consumers of the batches queued meanwhile.
                () = std::future::ready(()), if !self.wakes.is_empty() => {
                    self.flush_wakes();
                }
            }
        }
        self.flush_wakes();
    }

    /// The stream's next message when one is ready now (`None` when it is not, or there is
    /// no open stream). Polling registers the task's waker, as the select would.
    async fn ready_message(&mut self) -> Option<ConnEvent> {
        let Conn::Open { stream, .. } = &mut self.conn else {
            return None;
        };
        std::future::poll_fn(|cx| {
            Poll::Ready(
                match futures_core::Stream::poll_next(Pin::new(&mut *stream), cx) {
                    Poll::Ready(m) => Some(ConnEvent::Message(m.transpose())),
                    Poll::Pending => None,
                },
            )
        })
        .await
    }

    /// Wake the consumers held back in `wakes`.
    fn flush_wakes(&mut self) {
        for w in self.wakes.drain(..) {
            w.wake();
        }
    }

    // ---- commands ----

    fn on_cmd(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Create(c) => {
                let c = *c;
                let mut spec = Vec::with_capacity(c.key.len() + c.range_end.len());
                spec.extend_from_slice(&c.key);
                spec.extend_from_slice(&c.range_end);
                let slot = Slot {
                    id: c.id,
                    queue: c.queue,
                    spec: spec.into_boxed_slice(),
                    key_len: u32::try_from(c.key.len()).unwrap_or(u32::MAX),
                    flags: c.flags,
                    state: SlotState::Unsent,
                    confirmed: false,
                    progress_wanted: false,
                    next_rev: c.start_revision,
                    sid: 0,
                    frag: None,
                };
                self.slots.insert(c.id, slot);
                self.want_create(c.id);
            }
            Cmd::Cancel { id, mut ack } => {
                if let Some(slot) = self.slots.remove(id) {
                    slot.queue.finish(None);
                    if slot.progress_wanted {
                        self.progress_waiters.retain(|(w, _)| *w != id);
                    }
                    let on_server = matches!(slot.state, SlotState::Creating | SlotState::Active);
                    if on_server && let Some(tx) = self.conn.tx() {
                        // Creates and cancels are handled in order: a cancel right behind a
                        // pending create is fine.
                        if tx.send(cancel_request(slot.sid)).is_ok()
                            && let Some(ack) = ack.take()
                        {
                            self.cancel_acks.push((slot.sid, ack));
                        }
                    }
                }
                if let Some(ack) = ack {
                    let _ = ack.send(());
                }
                if self.slots.is_empty() {
                    // Nothing left to watch: close the stream (the server drops it all).
                    self.reset_stream();
                    self.failures = 0;
                }
            }
            Cmd::Progress(id) => {
                let Some(slot) = self.slots.get_mut(id) else {
                    return;
                };
                slot.progress_wanted = true;
                // Answered by the request sent now (a later request than any it waited for).
                match self.progress_waiters.iter_mut().find(|(w, _)| *w == id) {
                    Some(w) => w.1 = 0,
                    None => self.progress_waiters.push((id, 0)),
                }
                match &self.conn {
                    Conn::Idle => self.open(),
                    Conn::Backoff(_) => {} // sent when the stream is back
                    Conn::Opening { .. } | Conn::Open { .. } => self.send_progress_request(),
                }
            }
            Cmd::Resume(id) => {
                if let Some(slot) = self.slots.get_mut(id)
                    && slot.state == SlotState::Paused
                {
                    slot.state = SlotState::Unsent;
                    self.want_create(id);
                }
            }
        }
    }

    /// Watcher `id` is `Unsent`: create it now, or once a stream exists.
    fn want_create(&mut self, id: u64) {
        match self.conn {
            Conn::Idle => self.open(),
            Conn::Backoff(_) => {}
            Conn::Opening { .. } | Conn::Open { .. } => self.send_create(id),
        }
    }

    fn send_create(&mut self, id: u64) {
        let Some(tx) = self.conn.tx() else { return };
        let Some(index) = self.slots.index_of(id) else {
            return;
        };
        let Some(slot) = self.slots.get_mut(id) else {
            return;
        };
        self.creations = self.creations.wrapping_add(1);
        let sid = wire_id(index, self.creations);
        slot.sid = sid;
        slot.state = SlotState::Creating;
        slot.frag = None;
        if tx.send(slot.create_request(sid)).is_ok() {
            self.inflight.push_back(sid);
            self.creates_sent += 1;
            if self.fresh_creates + 1 == self.creates_sent
                && self
                    .fresh_token_until
                    .is_some_and(|t| tokio::time::Instant::now() <= t)
            {
                self.fresh_creates = self.creates_sent;
            }
            self.stats.creates.fetch_add(1, Ordering::Relaxed);
        }
        // Otherwise the stream is gone and its failure is reported next.
    }

    fn send(&self, req: pb::WatchRequest) {
        if let Some(tx) = self.conn.tx() {
            let _ = tx.send(req);
        }
    }

    // ---- the stream ----

    /// Open a stream and pipeline the creation of every watcher that needs one.
    fn open(&mut self) {
        let pick = match self.shared.pick() {
            Ok(p) => p,
            Err(e) => {
                // Closed (the worker ends) or no endpoint at all (back off and try again).
                let _ = self.stream_failed(e, None);
                return;
            }
        };
        let channel = pick.channel();
        self.pick = Some(pick.downgrade());
        let (tx, rx) = mpsc::unbounded_channel();
        let stale = self.stale_token.take();
        self.forced_reauth = stale.is_some();
        // Creates queued now go out once the stream is open (see `Opened`).
        self.fresh_token_until = self
            .forced_reauth
            .then(|| tokio::time::Instant::now() + FRESH_TOKEN);
        let fut = open_stream(
            Arc::clone(&self.shared),
            channel,
            stale,
            self.require_leader,
            rx,
        );
        self.conn = Conn::Opening {
            tx,
            fut: Box::pin(fut),
        };
        self.stats.streams.fetch_add(1, Ordering::Relaxed);
        let unsent: Vec<u64> = self
            .slots
            .iter()
            .filter(|(_, s)| s.state == SlotState::Unsent)
            .map(|(id, _)| id)
            .collect();
        for id in unsent {
            self.send_create(id);
        }
        if !self.progress_waiters.is_empty() {
            self.send_progress_request();
        }
    }

    /// Send a progress request for the waiters no request on this stream answers yet.
    fn send_progress_request(&mut self) {
        let Some(tx) = self.conn.tx() else { return };
        if tx.send(progress_request()).is_err() {
            return; // the stream is gone; its failure is reported next
        }
        self.progress_sent += 1;
        let n = self.progress_sent;
        for w in &mut self.progress_waiters {
            if w.1 == 0 {
                w.1 = n;
            }
        }
    }

    /// Drop the stream; every watcher it carried must be created again.
    fn reset_stream(&mut self) {
        self.resets = self.resets.wrapping_add(1);
        self.conn = Conn::Idle;
        self.inflight.clear();
        self.creates_sent = 0;
        self.fresh_creates = 0;
        self.creates_answered = 0;
        // Requests sent on this stream will not be answered: the next stream asks again.
        self.progress_sent = 0;
        self.progress_answered = 0;
        for w in &mut self.progress_waiters {
            w.1 = 0;
        }
        for slot in self.slots.values_mut() {
            if matches!(slot.state, SlotState::Creating | SlotState::Active) {
                slot.state = SlotState::Unsent;
                slot.sid = 0;
            }
            slot.frag = None;
        }
        // The server drops the watchers of a closed stream: their cancellation is done.
        for (_, ack) in self.cancel_acks.drain(..) {
            let _ = ack.send(());
        }
    }

    fn token_gen(&self) -> Option<u64> {
        match &self.conn {
            Conn::Open { token_gen, .. } => *token_gen,
            _ => None,
        }
    }

    /// The stream failed: reconnect after a back-off (or stop, once the client is closed).
    /// Returns false when the worker must end.
    fn stream_failed(&mut self, err: Error, token_gen: Option<u64>) -> bool {
        if err.kind() == ErrorKind::Closed || self.shared.is_closed() {
            self.shutdown();
            return false;
        }
        if err.is_auth_token_error() {
            self.stale_token = token_gen;
        }
        // A broken connection or a member without leader: the next stream goes elsewhere.
        if let Some(pick) = self.pick.take()
            && is_endpoint_failure(&err)
        {
            self.shared.report_stream_failure(&pick, &err);
        }
        self.reset_stream();
        if is_terminal(&err) {
            for slot in self.slots.drain() {
                slot.queue.finish(Some(copy_error(&err)));
            }
            self.progress_waiters.clear();
        }
        if self.slots.is_empty() {
            self.failures = 0;
            return true;
        }
        self.failures = self.failures.saturating_add(1);
        self.conn = Conn::Backoff(Box::pin(tokio::time::sleep(backoff(self.failures))));
        true
    }

    fn on_conn_event(&mut self, ev: ConnEvent) -> bool {
        match ev {
            ConnEvent::BackoffDone => {
                self.conn = Conn::Idle;
                if !self.slots.is_empty() {
                    self.open();
                }
                true
            }
            ConnEvent::Opened(Ok((stream, token_gen))) => {
                if self
                    .fresh_token_until
                    .is_some_and(|t| tokio::time::Instant::now() > t)
                {
                    // Opening took so long that the creates queued meanwhile go out with a
                    // token that may be old by now.
                    self.fresh_token_until = None;
                    self.fresh_creates = 0;
                }
                if let Conn::Opening { tx, .. } = mem::replace(&mut self.conn, Conn::Idle) {
                    self.conn = Conn::Open {
                        tx,
                        stream,
                        token_gen,
                    };
                }
                true
            }
            ConnEvent::Opened(Err((err, token_gen))) => self.stream_failed(err, token_gen),
            ConnEvent::Message(Ok(Some(bytes))) => {
                self.gathered.push(bytes);
                self.on_messages()
            }
            ConnEvent::Message(Ok(None)) => {
                let token_gen = self.token_gen();
                self.stream_failed(
                    Error::new(ErrorKind::Unavailable, "the server ended the watch stream"),
                    token_gen,
                )
            }
            ConnEvent::Message(Err(status)) => {
                let token_gen = self.token_gen();
                self.stream_failed(Error::from_status(status), token_gen)
            }
        }
    }

    /// The client was closed: end every watcher.
    fn shutdown(&mut self) {
        self.reset_stream();
        for slot in self.slots.drain() {
            slot.queue
                .finish(Some(Error::new(ErrorKind::Closed, "the client was closed")));
        }
    }

    // ---- responses ----

    /// Handle the messages in `gathered`, in order; false when the worker must end.
    ///
    /// They are decoded first, then every watcher they are for is looked up once before any
    /// is handled: each response is for another watcher, whose state is cold in the cache at
    /// a burst of responses, and these look-ups do not depend on each other, so the processor
    /// overlaps their cache misses instead of waiting for each in turn.
    fn on_messages(&mut self) -> bool {
        self.failures = 0;
        let mut msgs = mem::take(&mut self.gathered);
        let mut resps = mem::take(&mut self.decoded);
        let mut failed = None;
        // The responses are decoded in place (see `codec::decode_into`), into the ones of
        // the previous runs (a response is 192 bytes: made afresh, it would be copied in).
        let mut n = 0;
        for bytes in msgs.drain(..) {
            if resps.len() == n {
                resps.push(Response::default());
            }
            let Some(resp) = resps.get_mut(n) else { break };
            if let Err(status) = codec::decode_into(bytes, resp, &mut self.header_memo) {
                failed = Some(status);
                break;
            }
            n += 1;
        }
        msgs.clear();
        let run = resps.get_mut(..n).unwrap_or_default();
        let mut seen = 0usize;
        for r in run.iter() {
            if r.watch_id > 0
                && let Some(slot) = self.slots.at(slot_index(r.watch_id))
            {
                seen += usize::from(slot.queue.touch());
            }
        }
        std::hint::black_box(seen);
        let mut ok = true;
        let resets = self.resets;
        for r in run.iter_mut() {
            if !self.on_response(r) {
                ok = false;
                break;
            }
            if self.resets != resets {
                // The stream was closed (its messages after this one are never read).
                failed = None;
                break;
            }
        }
        // Kept for the next run; events not handed out (a run cut short) must not keep
        // received buffers alive meanwhile.
        for r in &mut resps {
            if !r.events.is_empty() {
                r.events = Events::default();
            }
        }
        self.decoded = resps;
        self.gathered = msgs;
        if ok && let Some(status) = failed {
            let token_gen = self.token_gen();
            return self.stream_failed(Error::from_status(status), token_gen);
        }
        ok
    }

    /// The server is done with wire id `sid`: a `Watcher::cancel` waiting on it returns.
    fn answer_cancel(&mut self, sid: i64) {
        if let Some(i) = self.cancel_acks.iter().position(|(s, _)| *s == sid) {
            let (_, ack) = self.cancel_acks.swap_remove(i);
            let _ = ack.send(());
        }
    }

    fn slot_mut(&mut self, sid: i64) -> Option<(u64, &mut Slot)> {
        if sid <= 0 {
            return None;
        }
        match self.slots.at_mut(slot_index(sid)) {
            Some(slot) if slot.sid == sid => Some((slot.id, slot)),
            _ => None,
        }
    }

    /// Handle one server message; false when the worker must end.
    fn on_response(&mut self, r: &mut Response) -> bool {
        let header = ResponseHeader::from_pb(Some(r.header));
        if r.created {
            return self.on_created(r, header);
        }
        if r.watch_id == INVALID_WATCH_ID {
            if !r.canceled && r.events.is_empty() {
                self.on_requested_progress(header);
            }
            return true;
        }
        if r.canceled {
            self.answer_cancel(r.watch_id);
            return self.on_canceled(r.watch_id, r.compact_revision, &r.cancel_reason);
        }
        let Some((id, slot)) = self.slot_mut(r.watch_id) else {
            // A watcher that was cancelled or paused meanwhile.
            return true;
        };
        let mut events = mem::take(&mut r.events);
        if r.fragment || slot.frag.is_some() {
            let buf = slot.frag.get_or_insert_with(Box::default);
            buf.extend(events.into_vec());
            if r.fragment {
                return true;
            }
            events = Events::from_vec(slot.frag.take().map(|all| *all).unwrap_or_default());
        }
        if events.is_empty() {
            // A periodic progress notification. It comes through the same server-side channel
            // as this watcher's events (and only once the watcher is in sync), so nothing
            // below its revision is still to come: the resume point may move up.
            if header.revision >= slot.next_rev {
                slot.next_rev = header.revision.saturating_add(1);
            }
            slot.queue
                .push_notification(WatchBatch::notification(header, BatchKind::Progress));
            return true;
        }
        // Guard against servers that repeat events or go back in time (etcd 15274, 15271,
        // 20221): nothing below the next revision is delivered.
        let next = slot.next_rev;
        if events
            .as_slice()
            .first()
            .is_some_and(|e| e.revision() < next)
        {
            events.retain(|e| e.revision() >= next);
            if events.is_empty() {
                return true;
            }
        }
        let last = events.as_slice().last().map_or(next, Event::revision);
        match slot.queue.push_events(header, &mut events) {
            Ok(waker) => {
                slot.next_rev = last.saturating_add(1);
                self.wakes.extend(waker);
            }
            Err(PushError::Full) => self.pause(id),
        }
        true
    }

    fn on_created(&mut self, r: &Response, header: ResponseHeader) -> bool {
        let head = self.inflight.pop_front();
        // Creates are answered in order: this answers create number `answered` (from 0).
        let answered = self.creates_answered;
        self.creates_answered += 1;
        if self.inflight.is_empty() && self.inflight.capacity() > 4096 {
            // Give back the room a burst of creations took.
            self.inflight = VecDeque::new();
        }
        let sid = if r.watch_id > 0 {
            if head != Some(r.watch_id) {
                // Not the oldest pending create (never seen from etcd): match it by id.
                if let Some(h) = head {
                    self.inflight.push_front(h);
                }
                if let Some(pos) = self.inflight.iter().position(|s| *s == r.watch_id) {
                    self.inflight.remove(pos);
                }
            }
            r.watch_id
        } else {
            // A refused create carries no id: it answers the oldest pending one.
            match head {
                Some(h) => h,
                None => return true,
            }
        };
        let Some((id, slot)) = self.slot_mut(sid) else {
            if r.canceled {
                // Refused, and its watcher was cancelled meanwhile: etcd does not answer a
                // cancel for a watcher it never made, so the cancel is answered here.
                self.answer_cancel(sid);
            } else {
                // Its watcher was cancelled or paused meanwhile.
                self.send(cancel_request(sid));
            }
            return true;
        };
        if r.canceled {
            let err = cancel_error(r.compact_revision, &r.cancel_reason);
            if err.kind() == ErrorKind::PermissionDenied
                && self.shared.config().credentials.is_some()
                && answered >= self.fresh_creates
            {
                // etcd 3.4 and 3.5 refuse a create whose stream carries an expired token with
                // "permission denied" (a stream's token is checked at each create, and a
                // simple token expires once unused for its TTL: a watcher resumed after a
                // long pause can meet it). Re-authenticate before believing it: a stream with
                // a fresh token re-creates every watcher at once, and a refusal of a create
                // sent with a token that fresh is final.
                let token_gen = self.token_gen();
                let stale = Error::new(
                    ErrorKind::InvalidAuthToken,
                    "watch refused: the stream's auth token may have expired",
                );
                return self.stream_failed(stale, token_gen);
            }
            return self.server_canceled(id, err);
        }
        slot.state = SlotState::Active;
        if slot.next_rev == 0 {
            // Started at "now": from here on it resumes after the creation revision.
            slot.next_rev = header.revision.saturating_add(1);
        }
        if slot.progress_wanted
            && self
                .progress_waiters
                .iter()
                .any(|&(w, n)| w == id && n == 0)
        {
            // Its progress request was answered while it was not on the server.
            self.send_progress_request();
        }
        let Some((_, slot)) = self.slot_mut(sid) else {
            return true;
        };
        if !slot.confirmed {
            slot.confirmed = true;
            let first = slot
                .flags
                .has(Flags::CREATED_NOTIFY)
                .then(|| WatchBatch::notification(header, BatchKind::Created));
            slot.queue.set_created(first);
        }
        true
    }

    fn on_canceled(&mut self, sid: i64, compact_revision: i64, reason: &str) -> bool {
        let Some((id, _)) = self.slot_mut(sid) else {
            // One we cancelled (dropped or paused).
            return true;
        };
        let err = cancel_error(compact_revision, reason);
        self.server_canceled(id, err)
    }

    /// The server ended watcher `id` with `err`.
    fn server_canceled(&mut self, id: u64, err: Error) -> bool {
        if err.is_retryable() || err.is_auth_token_error() {
            // E.g. "no leader": the member is unfit, not the watcher. Reconnect (through the
            // balancer, elsewhere) and resume; the user never sees it.
            let token_gen = self.token_gen();
            return self.stream_failed(err, token_gen);
        }
        if let Some(slot) = self.slots.remove(id) {
            if slot.progress_wanted {
                self.progress_waiters.retain(|(w, _)| *w != id);
            }
            slot.queue.finish(Some(err));
        }
        if self.slots.is_empty() {
            self.reset_stream();
            self.failures = 0;
        }
        true
    }

    fn on_requested_progress(&mut self, header: ResponseHeader) {
        // Never moves a resume point: on etcd < 3.4.25 / 3.5.8 this answer can overtake
        // events still in flight (etcd 15220).
        self.progress_answered += 1;
        let answered = self.progress_answered;
        let mut i = 0;
        while let Some(&(id, n)) = self.progress_waiters.get(i) {
            if n == 0 || n > answered {
                i += 1; // for a later request
                continue;
            }
            match self.slots.get_mut(id) {
                Some(slot) if slot.state == SlotState::Active => {
                    slot.progress_wanted = false;
                    slot.queue.push_requested_progress(WatchBatch::notification(
                        header,
                        BatchKind::Progress,
                    ));
                    self.progress_waiters.swap_remove(i);
                }
                Some(_) => {
                    // Not on the server now (paused, or being re-created): the server did not
                    // count it, so the answer says nothing of its events. It asks again once
                    // it is created (`on_created`).
                    if let Some(w) = self.progress_waiters.get_mut(i) {
                        w.1 = 0;
                    }
                    i += 1;
                }
                None => {
                    self.progress_waiters.swap_remove(i);
                }
            }
        }
    }

    /// Watcher `id`'s buffer is full: cancel it on the server until its consumer catches up.
    fn pause(&mut self, id: u64) {
        let Some(slot) = self.slots.get_mut(id) else {
            return;
        };
        let sid = slot.sid;
        let was_active = slot.state == SlotState::Active;
        slot.state = SlotState::Paused;
        slot.sid = 0;
        slot.frag = None;
        self.stats.pauses.fetch_add(1, Ordering::Relaxed);
        if was_active {
            self.send(cancel_request(sid));
        }
        // A pending create is cancelled when its answer finds no watcher.
    }
}

fn cancel_error(compact_revision: i64, reason: &str) -> Error {
    if compact_revision > 0 {
        return Error::new(
            ErrorKind::Compacted,
            format!("the watch start revision was compacted (compacted at {compact_revision})"),
        )
        .with_compact_revision(compact_revision);
    }
    if reason.is_empty() {
        return Error::new(ErrorKind::WatchCanceled, "the server canceled the watch");
    }
    // etcd renders some reasons as a whole gRPC error: "rpc error: code = X desc = <message>".
    let message = reason
        .split_once(" desc = ")
        .map_or(reason, |(_, desc)| desc);
    Error::from_server_message(message, ErrorKind::WatchCanceled)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_ids_are_unique_and_map_back() {
        let a = wire_id(5, 1);
        let b = wire_id(5, 2);
        assert_ne!(a, b);
        assert!(a > 0 && b > 0);
        assert_eq!(slot_index(a), 5);
        assert_eq!(slot_index(b), 5);
        // Index 0 with a generation that wrapped to 0 is still not 0 ("etcd, choose").
        let zero = wire_id(0, GENERATION_MASK + 1);
        assert!(zero > 0);
        assert_eq!(slot_index(zero), 0);
        let big = wire_id(u32::MAX, GENERATION_MASK);
        assert!(big > 0);
        assert_eq!(slot_index(big), u64::from(u32::MAX));
        // Ids no table index gives are out of range, not index 0 or a panic.
        assert_eq!(slot_index(0), u64::MAX);
        assert_eq!(slot_index(-1), MAX_WATCHER_ID - 1);
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        for f in 1..40 {
            let d = backoff(f);
            assert!(d <= BACKOFF_MAX, "{d:?}");
            assert!(d >= BACKOFF_BASE / 2 / 2, "{d:?}");
        }
        assert!(backoff(1) <= BACKOFF_BASE);
    }

    #[test]
    fn cancel_reasons_are_typed() {
        assert_eq!(
            cancel_error(0, "etcdserver: permission denied").kind(),
            ErrorKind::PermissionDenied
        );
        assert_eq!(
            cancel_error(0, "etcdserver: no leader").kind(),
            ErrorKind::NoLeader
        );
        let e = cancel_error(42, "");
        assert_eq!(e.kind(), ErrorKind::Compacted);
        assert_eq!(e.compact_revision(), Some(42));
        assert_eq!(cancel_error(0, "").kind(), ErrorKind::WatchCanceled);
        assert_eq!(
            cancel_error(
                0,
                "rpc error: code = PermissionDenied desc = etcdserver: permission denied"
            )
            .kind(),
            ErrorKind::PermissionDenied
        );
        assert_eq!(
            cancel_error(0, "mvcc: something new").kind(),
            ErrorKind::WatchCanceled
        );
    }
}
