//! Watch: a stream of the changes to a key or a range of keys.
//!
//! ```no_run
//! # async fn demo(client: etcdv3::Client) -> etcdv3::Result<()> {
//! let mut watcher = client.watch("/app/config/").prefix().prev_kv().await?;
//! while let Some(batch) = watcher.next().await {
//!     let batch = batch?; // a compacted start revision, a permission error, a closed client
//!     for event in batch.events() {
//!         println!(
//!             "{:?} {} at revision {}",
//!             event.kind,
//!             event.kv.key_str()?,
//!             event.kv.mod_revision()
//!         );
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! The guarantees are documented on [`Watcher`] (this module is private; its docs are for the
//! crate's developers: see `worker.rs` for how the multiplexer works).

mod codec;
mod group;
mod queue;
mod slots;
mod worker;

pub(crate) use group::sealed::Sealed as GroupWatchParts;
pub use group::{DEFAULT_GROUP_BUFFER, GroupWatch, WatchGroup};

use std::fmt;
use std::future::{Future, IntoFuture};
use std::mem;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use crate::client::{Client, Shared};
use crate::error::{Error, ErrorKind, Result};
use crate::proto::mvccpb;
use crate::types::{IntoBytes, KeyValue, ResponseHeader, prefix_range_end};

use queue::WatcherQueue;
use worker::{Cmd, CreateCmd, Worker};

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// The default buffer of a watcher, in batches (server responses).
pub const DEFAULT_WATCH_BUFFER: usize = 256;

/// The largest client-side watcher id (ids are 40 bits wide on the wire).
const MAX_WATCHER_ID: u64 = (1 << 40) - 1;

// ---------------------------------------------------------------------------------------------
// Events and batches

/// What happened to a key.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// The key was created or its value replaced.
    Put,
    /// The key was deleted.
    Delete,
}

/// One change to one key.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// A put or a delete.
    pub kind: EventKind,
    /// The key after the change. For a delete: the key, with an empty value and
    /// `mod_revision` set to the revision of the delete.
    pub kv: KeyValue,
    /// The key before the change, when the watcher asked for it with [`Watch::prev_kv`] and the
    /// key existed (and was not compacted away). Boxed: it is rarely asked for, and inline it
    /// would double the size of every event.
    pub prev_kv: Option<Box<KeyValue>>,
}

impl Event {
    fn from_pb(e: mvccpb::Event) -> Self {
        Event {
            kind: if e.r#type == mvccpb::event::EventType::Delete as i32 {
                EventKind::Delete
            } else {
                EventKind::Put
            },
            kv: KeyValue::from_pb(e.kv.unwrap_or_default()),
            prev_kv: e.prev_kv.map(|kv| Box::new(KeyValue::from_pb(kv))),
        }
    }

    /// The revision of the change (the key's `mod_revision`).
    pub fn revision(&self) -> i64 {
        self.kv.mod_revision()
    }

    /// True for a put that created the key (its first version).
    pub fn is_create(&self) -> bool {
        self.kind == EventKind::Put && self.kv.create_revision() == self.kv.mod_revision()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BatchKind {
    Events,
    Created,
    Progress,
}

/// The events of one response. Most responses carry one event, kept inline: a batch costs no
/// allocation of its own (in a burst of responses to many watchers, the allocator's slow path
/// was a tenth of a response's cost).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Events {
    One(Event),
    Many(Vec<Event>),
}

impl Default for Events {
    fn default() -> Self {
        Events::Many(Vec::new())
    }
}

impl Events {
    /// From decoded protobuf events (the general decoder's path; the straight one decodes
    /// into [`Event`]s directly).
    pub(crate) fn from_pb(events: Vec<mvccpb::Event>) -> Self {
        Events::from_vec(events.into_iter().map(Event::from_pb).collect())
    }

    pub(crate) fn from_vec(mut events: Vec<Event>) -> Self {
        if events.len() == 1
            && let Some(e) = events.pop()
        {
            return Events::One(e);
        }
        Events::Many(events)
    }

    /// Append an empty put event and return it, for decoding in place (`None` never happens).
    pub(crate) fn push_empty(&mut self) -> Option<&mut Event> {
        let e = Event {
            kind: EventKind::Put,
            kv: KeyValue::from_pb(mvccpb::KeyValue::default()),
            prev_kv: None,
        };
        match self {
            Events::Many(v) if v.is_empty() => *self = Events::One(e),
            _ => self.push(e),
        }
        match self {
            Events::One(e) => Some(e),
            Events::Many(v) => v.last_mut(),
        }
    }

    pub(crate) fn push(&mut self, e: Event) {
        match self {
            Events::Many(v) if !v.is_empty() => v.push(e),
            Events::Many(_) => *self = Events::One(e),
            Events::One(_) => {
                if let Events::One(first) = mem::replace(self, Events::Many(Vec::with_capacity(4)))
                    && let Events::Many(v) = self
                {
                    v.push(first);
                    v.push(e);
                }
            }
        }
    }

    pub(crate) fn as_slice(&self) -> &[Event] {
        match self {
            Events::One(e) => std::slice::from_ref(e),
            Events::Many(v) => v,
        }
    }

    fn as_mut_slice(&mut self) -> &mut [Event] {
        match self {
            Events::One(e) => std::slice::from_mut(e),
            Events::Many(v) => v,
        }
    }

    pub(crate) fn into_vec(self) -> Vec<Event> {
        match self {
            Events::One(e) => vec![e],
            Events::Many(v) => v,
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        matches!(self, Events::Many(v) if v.is_empty())
    }

    /// Keep the events `keep` accepts.
    pub(crate) fn retain(&mut self, keep: impl FnMut(&Event) -> bool) {
        let mut v = mem::take(self).into_vec();
        v.retain(keep);
        *self = Events::from_vec(v);
    }
}

/// What one server response brought a watcher: the events of one or more whole revisions (a
/// transaction's events are never split), or a notification (watcher created, progress).
#[derive(Debug, Clone)]
pub struct WatchBatch {
    header: ResponseHeader,
    events: Events,
    kind: BatchKind,
}

impl WatchBatch {
    fn events_from(header: ResponseHeader, events: Events) -> Self {
        WatchBatch {
            header,
            events,
            kind: BatchKind::Events,
        }
    }

    fn notification(header: ResponseHeader, kind: BatchKind) -> Self {
        WatchBatch {
            header,
            events: Events::default(),
            kind,
        }
    }

    /// The same batch with the first `len` bytes of every event's keys removed (a namespace).
    pub(crate) fn strip_key_prefix(mut self, len: usize) -> Self {
        for e in self.events.as_mut_slice() {
            e.kv = e.kv.clone().strip_key_prefix(len);
            e.prev_kv = e
                .prev_kv
                .take()
                .map(|kv| Box::new(kv.strip_key_prefix(len)));
        }
        self
    }

    /// The header of the server response. Its `revision` is the store revision when the
    /// response was sent, which may be newer than the last event.
    pub fn header(&self) -> &ResponseHeader {
        &self.header
    }

    /// The store revision of the response (`header().revision`).
    pub fn revision(&self) -> i64 {
        self.header.revision
    }

    /// The events, oldest first.
    pub fn events(&self) -> &[Event] {
        self.events.as_slice()
    }

    /// Take the events out. (A batch of one event keeps it inline, so this allocates the
    /// vector; iterating over the batch by value does not.)
    pub fn into_events(self) -> Vec<Event> {
        self.events.into_vec()
    }

    /// Number of events.
    pub fn len(&self) -> usize {
        self.events.as_slice().len()
    }

    /// True for a notification without events.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// True for the notification that the server created the watcher (only sent with
    /// [`Watch::created_notify`]); its revision is the one the watcher started after (for a
    /// watch from "now").
    pub fn is_created(&self) -> bool {
        self.kind == BatchKind::Created
    }

    /// True for a progress notification: no events, and the header's revision tells how far
    /// the store is (see [`Watcher`], "Progress notifications", for what it promises).
    pub fn is_progress_notify(&self) -> bool {
        self.kind == BatchKind::Progress
    }
}

/// The events of a [`WatchBatch`] taken by value, oldest first.
#[derive(Debug)]
pub struct EventsIntoIter(EventsIter);

#[derive(Debug)]
enum EventsIter {
    One(Option<Event>),
    Many(std::vec::IntoIter<Event>),
}

impl Iterator for EventsIntoIter {
    type Item = Event;

    fn next(&mut self) -> Option<Event> {
        match &mut self.0 {
            EventsIter::One(e) => e.take(),
            EventsIter::Many(it) => it.next(),
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = match &self.0 {
            EventsIter::One(e) => usize::from(e.is_some()),
            EventsIter::Many(it) => it.len(),
        };
        (n, Some(n))
    }
}

impl ExactSizeIterator for EventsIntoIter {}

impl IntoIterator for WatchBatch {
    type Item = Event;
    type IntoIter = EventsIntoIter;
    fn into_iter(self) -> Self::IntoIter {
        EventsIntoIter(match self.events {
            Events::One(e) => EventsIter::One(Some(e)),
            Events::Many(v) => EventsIter::Many(v.into_iter()),
        })
    }
}

impl<'a> IntoIterator for &'a WatchBatch {
    type Item = &'a Event;
    type IntoIter = std::slice::Iter<'a, Event>;
    fn into_iter(self) -> Self::IntoIter {
        self.events().iter()
    }
}

// ---------------------------------------------------------------------------------------------
// The builder

/// Options of one watcher, as bits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Flags(u8);

impl Flags {
    pub(crate) const PREV_KV: u8 = 1;
    pub(crate) const NO_PUT: u8 = 2;
    pub(crate) const NO_DELETE: u8 = 4;
    pub(crate) const PROGRESS_NOTIFY: u8 = 8;
    pub(crate) const FRAGMENT: u8 = 16;
    pub(crate) const CREATED_NOTIFY: u8 = 32;

    pub(crate) fn has(self, bit: u8) -> bool {
        self.0 & bit != 0
    }
    fn set(&mut self, bit: u8) {
        self.0 |= bit;
    }
}

/// A watch request being built; created by [`Client::watch`], awaited to start the
/// [`Watcher`].
///
/// Awaiting it returns once the server has created the watcher (so a write made after the
/// await is seen by a watcher started at "now"), or fails with the server's reason (e.g.
/// [`ErrorKind::PermissionDenied`]). Creations from many concurrent tasks are pipelined on one
/// stream. While the server cannot be reached the await waits, reconnecting; wrap it in a
/// timeout to bound that (dropping the future cancels the watcher).
#[must_use = "a watch does nothing until awaited"]
pub struct Watch {
    client: Client,
    key: Bytes,
    range_end: Bytes,
    start_revision: i64,
    flags: Flags,
    require_leader: bool,
    buffer: usize,
}

impl fmt::Debug for Watch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Watch")
            .field("key", &String::from_utf8_lossy(&self.key))
            .field("range_end", &String::from_utf8_lossy(&self.range_end))
            .field("start_revision", &self.start_revision)
            .field("flags", &self.flags)
            .field("require_leader", &self.require_leader)
            .field("buffer", &self.buffer)
            .finish()
    }
}

impl Client {
    /// Watch `key` (or, with the builder's options, a range of keys) for changes.
    ///
    /// ```no_run
    /// # async fn demo(client: etcdv3::Client) -> etcdv3::Result<()> {
    /// let mut w = client.watch("/jobs/").prefix().start_revision(100).await?;
    /// while let Some(batch) = w.next().await {
    ///     for ev in batch?.events() {
    ///         println!("{:?} {:?}", ev.kind, ev.kv.key());
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    pub fn watch(&self, key: impl IntoBytes) -> Watch {
        Watch {
            client: self.clone(),
            key: key.into_bytes(),
            range_end: Bytes::new(),
            start_revision: 0,
            flags: Flags::default(),
            require_leader: true,
            buffer: DEFAULT_WATCH_BUFFER,
        }
    }
}

impl Watch {
    /// Watch every key that starts with the key.
    pub fn prefix(mut self) -> Self {
        self.range_end = prefix_range_end(&self.key);
        self
    }

    /// Watch every key greater than or equal to the key.
    pub fn from_key(mut self) -> Self {
        self.range_end = Bytes::from_static(b"\0");
        self
    }

    /// Watch the keys in `[key, end)`.
    pub fn range(mut self, end: impl IntoBytes) -> Self {
        self.range_end = end.into_bytes();
        self
    }

    /// Start at `revision` (inclusive): replay history from there, then go on live. The default
    /// (0) starts after the store's current revision when the watcher is created.
    pub fn start_revision(mut self, revision: i64) -> Self {
        self.start_revision = revision;
        self
    }

    /// Include each key's previous state in its events ([`Event::prev_kv`]).
    pub fn prev_kv(mut self) -> Self {
        self.flags.set(Flags::PREV_KV);
        self
    }

    /// Leave out put events (the server filters them).
    pub fn no_put(mut self) -> Self {
        self.flags.set(Flags::NO_PUT);
        self
    }

    /// Leave out delete events (the server filters them).
    pub fn no_delete(mut self) -> Self {
        self.flags.set(Flags::NO_DELETE);
        self
    }

    /// Ask the server for periodic progress notifications while the watcher is idle (every
    /// 10 minutes by default; etcd's `--experimental-watch-progress-notify-interval`).
    pub fn progress_notify(mut self) -> Self {
        self.flags.set(Flags::PROGRESS_NOTIFY);
        self
    }

    /// Let the server split a revision larger than its request limit over several responses.
    /// The client reassembles them: a batch still holds whole revisions.
    pub fn fragment(mut self) -> Self {
        self.flags.set(Flags::FRAGMENT);
        self
    }

    /// Deliver the server's creation confirmation as the first batch
    /// ([`WatchBatch::is_created`]).
    pub fn created_notify(mut self) -> Self {
        self.flags.set(Flags::CREATED_NOTIFY);
        self
    }

    /// Whether the serving member must have a raft leader (default `true`). With it, a member
    /// cut off from its cluster ends the stream and the client moves on and resumes, instead of
    /// silently serving nothing. Watchers with this turned off share a second stream.
    pub fn require_leader(mut self, require: bool) -> Self {
        self.require_leader = require;
        self
    }

    /// The most batches buffered for this watcher before it is paused (default
    /// [`DEFAULT_WATCH_BUFFER`]; at least 1). A paused watcher loses nothing: it is
    /// re-created from its next revision once the consumer has read half of its buffer.
    pub fn buffer(mut self, batches: usize) -> Self {
        self.buffer = batches;
        self
    }

    fn validate(&self) -> Result<()> {
        if self.key.is_empty() && self.range_end.is_empty() {
            return Err(Error::new(ErrorKind::EmptyKey, "key is not provided"));
        }
        let open_end = self.range_end.as_ref() == b"\0";
        if !self.range_end.is_empty() && !open_end && self.key >= self.range_end {
            return Err(Error::invalid_argument(
                "watch range is empty: the range end must be greater than the key",
            ));
        }
        if self.start_revision < 0 {
            return Err(Error::invalid_argument(
                "start revision must not be negative",
            ));
        }
        if self.buffer == 0 {
            return Err(Error::invalid_argument("watch buffer must be at least 1"));
        }
        Ok(())
    }

    async fn start(self) -> Result<Watcher> {
        let cap = u32::try_from(self.buffer).unwrap_or(u32::MAX);
        self.start_on(|_| Arc::new(WatcherQueue::new(cap))).await
    }

    /// Create the watcher with the queue `queue(id)` gives for its id (its own, or a group
    /// member's).
    async fn start_on(self, queue: impl FnOnce(u64) -> Arc<WatcherQueue>) -> Result<Watcher> {
        self.validate()?;
        let muxes = self.client.watch_muxes();
        let tx = muxes.sender(self.client.shared(), self.require_leader)?;
        // Ids start at 1: 0 is no watcher on the wire.
        let id = muxes.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        if id > MAX_WATCHER_ID {
            return Err(Error::new(
                ErrorKind::Other,
                "this client has created too many watchers",
            ));
        }
        let queue = queue(id);
        let watcher = Watcher {
            id,
            queue: Arc::clone(&queue),
            cmds: tx.clone(),
        };
        let cmd = CreateCmd {
            id,
            key: self.key,
            range_end: self.range_end,
            start_revision: self.start_revision,
            flags: self.flags,
            queue,
        };
        tx.send(Cmd::Create(Box::new(cmd))).map_err(|_| closed())?;
        // Until the server confirms; dropping this future drops `watcher`, which cancels it.
        std::future::poll_fn(|cx| watcher.queue.poll_created(cx)).await?;
        Ok(watcher)
    }
}

impl IntoFuture for Watch {
    type Output = Result<Watcher>;
    type IntoFuture = BoxFuture<Result<Watcher>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.start())
    }
}

fn closed() -> Error {
    Error::new(ErrorKind::Closed, "the client was closed")
}

// ---------------------------------------------------------------------------------------------
// The watcher handle

/// A live watcher: a [`Stream`](futures_core::Stream) of [`WatchBatch`]es.
///
/// # Guarantees
///
/// Every watcher of a client travels on **one** gRPC Watch stream (one more when some watchers
/// turn [`require_leader`](Watch::require_leader) off), run by one background task, the
/// multiplexer. Watch creations are pipelined: many are in flight at once and the answers are
/// matched to them, so creating thousands of watchers costs no round trip each.
///
/// The multiplexer remembers, for each watcher, the next revision it needs. When the stream
/// fails (a network error, a server restart, a member that lost its leader, a new endpoint),
/// it reconnects with a jittered back-off and re-creates every live watcher from that
/// revision. Together with a guard that drops any event below it (older etcd versions may
/// repeat events or go back in time after a partition), a watcher sees **every revision in its
/// range exactly once, in order**, and a transaction's events always arrive in one
/// [`WatchBatch`]. A watcher started at "now" resumes from the revision it was created at, so
/// a write made while the client was disconnected is still delivered.
///
/// Each watcher's buffer is bounded ([`Watch::buffer`], in batches). A consumer that stops
/// reading never stalls the other watchers and never makes memory grow: when its buffer is
/// full the watcher is *paused* (cancelled on the server) and re-created from its next
/// revision once the consumer has drained half of its buffer, so it still sees every revision.
///
/// A start revision that was compacted ends that watcher with
/// [`ErrorKind::Compacted`](crate::ErrorKind::Compacted) and [`Error::compact_revision`] set; a
/// watcher the server refuses or cancels (e.g. permission denied) ends with the typed reason.
/// Other watchers are not affected. Dropping a [`Watcher`] cancels it on the server.
///
/// # Progress notifications
///
/// With [`Watch::progress_notify`] the server periodically sends an empty batch
/// ([`WatchBatch::is_progress_notify`]) carrying the current revision while the watcher is idle;
/// [`Watcher::request_progress`] asks for one at once. The periodic kind also moves the
/// watcher's resume point forward. A *requested* notification never does: on etcd before
/// 3.4.25 / 3.5.8 it may run ahead of events still in flight (etcd issue 15220).
///
/// # The end of a watcher
///
/// The stream ends (`None`) after [`cancel`](Watcher::cancel), or after a terminal error item:
/// a compacted start revision ([`ErrorKind::Compacted`], with [`Error::compact_revision`]), a
/// server-side cancellation with its reason (e.g. [`ErrorKind::PermissionDenied`]), or
/// [`ErrorKind::Closed`] after [`Client::close`]. Transient failures never reach it: the
/// multiplexer reconnects and resumes. (Only a failure that reconnecting cannot cure ends
/// every watcher with its error: [`ErrorKind::AuthFailed`] when the client's password no
/// longer works, [`ErrorKind::Unimplemented`] from a server without the Watch service.)
///
/// Dropping the watcher cancels it on the server.
pub struct Watcher {
    id: u64,
    queue: Arc<WatcherQueue>,
    cmds: mpsc::UnboundedSender<Cmd>,
}

impl fmt::Debug for Watcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Watcher").field("id", &self.id).finish()
    }
}

impl Watcher {
    /// This watcher's id: unique among the client's watchers and stable across reconnects
    /// (it is the client's, not the server's watch id, which changes on every re-creation).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The next batch, or `None` once the watcher has ended. Same as
    /// `futures::StreamExt::next`.
    ///
    /// (The future holds just the reference to the watcher: a task per watcher that awaits
    /// it stays small, which matters when many such tasks are woken in turn.)
    #[inline]
    #[allow(clippy::should_implement_trait)] // an async `next`, as `StreamExt::next`
    pub fn next(&mut self) -> impl Future<Output = Option<Result<WatchBatch>>> + '_ {
        std::future::poll_fn(move |cx| self.poll_batch(cx))
    }

    /// Cancel the watcher on the server, and wait until the server confirmed it (or the
    /// stream that carried it is gone). Batches already buffered can still be read; then the
    /// stream ends.
    pub async fn cancel(&self) {
        let (ack, done) = oneshot::channel();
        if self
            .cmds
            .send(Cmd::Cancel {
                id: self.id,
                ack: Some(ack),
            })
            .is_ok()
        {
            // An error means the multiplexer is gone, and the server-side watcher with it.
            let _ = done.await;
        }
    }

    /// Ask the server for a progress notification: a batch with
    /// [`is_progress_notify`](WatchBatch::is_progress_notify) and the store's current
    /// revision arrives on this watcher (and only on it). It is the answer to this very
    /// request (so it reflects writes made before the call), not to an earlier request still
    /// in flight. When the answer finds the watcher paused or being re-created (after a
    /// reconnect), the request is made again once the watcher is back on the server. Fails
    /// with [`ErrorKind::Closed`] once the client was closed.
    pub fn request_progress(&self) -> Result<()> {
        self.cmds.send(Cmd::Progress(self.id)).map_err(|_| closed())
    }

    #[inline]
    fn poll_batch(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<WatchBatch>>> {
        let (cmds, id) = (&self.cmds, self.id);
        self.queue.poll_pop(cx, || {
            // The buffer has room again: the multiplexer re-creates the paused watcher.
            let _ = cmds.send(Cmd::Resume(id));
        })
    }
}

impl Watcher {
    /// Ask the multiplexer to re-create this paused watcher (its buffer has room again).
    fn send_resume(&self) {
        let _ = self.cmds.send(Cmd::Resume(self.id));
    }
}

impl futures_core::Stream for Watcher {
    type Item = Result<WatchBatch>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().poll_batch(cx)
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        if !self.queue.is_done() {
            let _ = self.cmds.send(Cmd::Cancel {
                id: self.id,
                ack: None,
            });
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The multiplexers of a client

/// The watch multiplexers of one client, one per stream-level option set (require-leader on
/// or off), each started on first use. Lives in the client; its senders (and those every
/// watcher holds) keep the worker running, so the worker ends when the client and all its
/// watchers are gone.
#[derive(Default)]
pub(crate) struct WatchMuxes {
    next_id: AtomicU64,
    stats: Arc<Stats>,
    leader: OnceLock<mpsc::UnboundedSender<Cmd>>,
    plain: OnceLock<mpsc::UnboundedSender<Cmd>>,
}

impl WatchMuxes {
    fn sender(
        &self,
        shared: &Arc<Shared>,
        require_leader: bool,
    ) -> Result<mpsc::UnboundedSender<Cmd>> {
        if shared.is_closed() {
            return Err(closed());
        }
        let cell = if require_leader {
            &self.leader
        } else {
            &self.plain
        };
        let tx = cell.get_or_init(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            let worker = Worker::new(
                Arc::clone(shared),
                require_leader,
                rx,
                Arc::clone(&self.stats),
            );
            shared.spawn(worker.run());
            tx
        });
        if tx.is_closed() {
            return Err(closed());
        }
        Ok(tx.clone())
    }
}

/// Counters of the multiplexers' work (relaxed atomics, bumped per stream, create and pause;
/// never per event).
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub(crate) streams: AtomicU64,
    pub(crate) creates: AtomicU64,
    pub(crate) pauses: AtomicU64,
}

/// Counters of a client's watch multiplexers, for tests and benchmarks. Not a stable API.
#[doc(hidden)]
#[non_exhaustive]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WatchStats {
    /// gRPC Watch streams opened (reconnects included).
    pub streams_opened: u64,
    /// Create requests sent (first creations, re-creations after reconnects and pauses).
    pub creates_sent: u64,
    /// Times a watcher was paused because its buffer was full.
    pub pauses: u64,
}

impl Client {
    /// Counters of this client's watch multiplexers. Not a stable API.
    #[doc(hidden)]
    pub fn watch_stats(&self) -> WatchStats {
        let s = &self.watch_muxes().stats;
        WatchStats {
            streams_opened: s.streams.load(Ordering::Relaxed),
            creates_sent: s.creates.load(Ordering::Relaxed),
            pauses: s.pauses.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_convert_from_protobuf() {
        let ev = |t: i32, rev: i64, prev: bool| mvccpb::Event {
            r#type: t,
            kv: Some(mvccpb::KeyValue {
                key: Bytes::from_static(b"k"),
                mod_revision: rev,
                ..Default::default()
            }),
            prev_kv: prev.then(|| mvccpb::KeyValue {
                key: Bytes::from_static(b"k"),
                value: Bytes::from_static(b"old"),
                ..Default::default()
            }),
        };
        let b = WatchBatch::events_from(
            ResponseHeader::default(),
            Events::from_pb(vec![ev(0, 5, true), ev(1, 7, false)]),
        );
        assert_eq!(b.events().len(), 2);
        assert_eq!(b.events()[0].kind, EventKind::Put);
        assert_eq!(
            b.events()[0].prev_kv.as_ref().map(|p| p.value()),
            Some(&Bytes::from_static(b"old"))
        );
        assert_eq!(b.events()[1].kind, EventKind::Delete);
        assert_eq!(b.events()[1].revision(), 7);
        assert!(b.events()[1].prev_kv.is_none());
        let one = Events::from_pb(vec![ev(0, 9, false)]);
        assert!(matches!(one, Events::One(_)));
    }

    fn put_event(key: &'static [u8], rev: i64) -> Event {
        Event::from_pb(mvccpb::Event {
            r#type: 0,
            kv: Some(mvccpb::KeyValue {
                key: Bytes::from_static(key),
                mod_revision: rev,
                ..Default::default()
            }),
            prev_kv: None,
        })
    }

    /// A batch is moved several times between the multiplexer and its reader, and sits in
    /// the watcher's buffer: keep it small (a `prev_kv` inline would add 96 bytes to every
    /// event).
    #[test]
    fn a_batch_stays_small() {
        assert!(std::mem::size_of::<Event>() <= 112);
        assert!(std::mem::size_of::<WatchBatch>() <= 152);
        assert!(std::mem::size_of::<Result<WatchBatch>>() <= 152);
    }

    /// One event is kept inline and many in a vector; the batch reads the same either way.
    #[test]
    fn one_event_inline_many_in_a_vector() {
        let mut ev = Events::default();
        assert!(ev.is_empty() && ev.as_slice().is_empty());
        ev.push(put_event(b"ns/a", 5));
        assert!(matches!(ev, Events::One(_)));
        let one = WatchBatch::events_from(ResponseHeader::default(), ev.clone());
        assert_eq!(one.len(), 1);
        assert_eq!(one.events()[0].revision(), 5);
        // Stripping a namespace works on the inline event too.
        let stripped = one.clone().strip_key_prefix(3);
        assert_eq!(stripped.events()[0].kv.key().as_ref(), b"a");
        assert_eq!(one.clone().into_events().len(), 1);
        let it = one.into_iter();
        assert_eq!(it.len(), 1);
        assert_eq!(it.map(|e| e.revision()).collect::<Vec<_>>(), vec![5]);

        ev.push(put_event(b"ns/b", 6));
        ev.push(put_event(b"ns/c", 7));
        assert!(matches!(&ev, Events::Many(v) if v.len() == 3));
        let many = WatchBatch::events_from(ResponseHeader::default(), ev.clone());
        let revs: Vec<i64> = many.into_iter().map(|e| e.revision()).collect();
        assert_eq!(revs, vec![5, 6, 7]);

        // Filtering down to one event makes it inline again; to none, empty.
        ev.retain(|e| e.revision() >= 7);
        assert!(matches!(&ev, Events::One(e) if e.revision() == 7));
        ev.retain(|_| false);
        assert!(ev.is_empty());
        assert_eq!(Events::from_vec(vec![put_event(b"x", 1)]), {
            let mut e = Events::default();
            e.push(put_event(b"x", 1));
            e
        });
    }

    #[test]
    fn flags() {
        let mut f = Flags::default();
        f.set(Flags::PREV_KV);
        f.set(Flags::FRAGMENT);
        assert!(f.has(Flags::PREV_KV) && f.has(Flags::FRAGMENT));
        assert!(!f.has(Flags::NO_PUT));
    }
}
