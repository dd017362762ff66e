//! The lease keeper: one task, one `LeaseKeepAlive` stream and one timer queue for every lease
//! a client keeps.
//!
//! The task is a hand-written poll loop over four sources: commands from the handles, the
//! stream (opening or open), the timer queue, and revokes in progress. Each pass drains what is
//! ready, so answers that arrive together are handled together, and refreshes that fall due
//! together go out in one write.
//!
//! Per lease it keeps the send time of the last acknowledged refresh (`acked_sent`) and the
//! TTL that refresh got. From them follow the next refresh (`acked_sent + ttl/3`, rounded down
//! to a grid so that leases due at about the same time share a wake-up and a write) and the
//! deadline (`acked_sent + ttl`), after which the lease is reported lost unless a newer refresh
//! was acknowledged. At most one refresh per lease is in flight on the stream; answers are
//! matched by lease ID.
//!
//! A stream on which a refresh goes unanswered for a third of its TTL, with nothing else
//! answered since it was sent, counts as stalled: the next stream goes to another member. The
//! stalled stream is still read until its refreshes are answered or their deadlines pass, so
//! a server that is only slow keeps the leases it renews (`Draining`).
//!
//! Each lease has at most one entry in the timer queue (a `BTreeSet` keyed by time and lease
//! ID, driven by one `Sleep`): its next refresh when none is in flight, else the point at
//! which the stream counts as stalled, else its deadline.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_core::Stream;
use rand::Rng;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{Instant, Sleep};

use super::{LeaseLost, LeaseStatus, require_leader, revoke_pb};
use crate::balancer::WeakPick;
use crate::client::{CallOpts, Shared, is_endpoint_failure};
use crate::error::{Error, ErrorKind, Result};
use crate::grpc::MessageStream;
use crate::proto::etcdserverpb as pb;

/// First reconnect back-off; doubled per consecutive failure up to `MAX_BACKOFF`.
const BASE_BACKOFF: Duration = Duration::from_millis(50);
/// Longest reconnect back-off. Short, because leases have deadlines.
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// The shortest time a refresh may go unanswered, on a silent stream, before the stream counts
/// as stalled and is replaced.
const MIN_STALL: Duration = Duration::from_millis(500);
/// Stall time for a lease whose TTL is not known yet (waiting for its first answer).
const UNKNOWN_TTL_STALL: Duration = Duration::from_secs(3);
/// How many revokes (of `revoke_on_drop` handles) run at once.
const MAX_CONCURRENT_REVOKES: usize = 64;
/// Deadline of one revoke when the client has no request timeout.
const REVOKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Items handled per poll before the task yields to the executor.
const BUDGET: usize = 4096;

type OpenFuture = Pin<
    Box<
        dyn Future<Output = Result<(MessageStream<pb::LeaseKeepAliveResponse>, Option<u64>)>>
            + Send,
    >,
>;

/// A lease's TTL known from its grant: the keeper takes it over without a first refresh.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Known {
    pub(crate) ttl: i64,
    pub(crate) sent_at: Instant,
}

pub(crate) enum Command {
    /// A handle (with `token`) wants lease `id` kept; `reply` gets its status channel.
    Keep {
        id: i64,
        token: u64,
        known: Option<Known>,
        reply: oneshot::Sender<watch::Receiver<LeaseStatus>>,
    },
    /// Handle `token` of lease `id` was dropped.
    Release { id: i64, token: u64, revoke: bool },
    /// Lease `id` was revoked through this client.
    Revoked { id: i64 },
    /// The server answered a request sent at `sent` that attaches a key to lease `id` with
    /// "lease not found".
    NotFound { id: i64, sent: std::time::Instant },
}

/// Counters shared between the worker and the client.
#[derive(Debug, Default)]
struct Stats {
    streams_opened: AtomicU64,
    kept: AtomicU64,
}

/// The client's side of the keeper: a command channel, held by the client (in its `Inner`,
/// so a worker never keeps the client alive) and by every [`Holder`].
pub(crate) struct KeeperHandle {
    tx: mpsc::UnboundedSender<Command>,
    stats: Arc<Stats>,
    next_token: AtomicU64,
}

impl std::fmt::Debug for KeeperHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeeperHandle")
            .field("stats", &self.stats)
            .finish()
    }
}

impl KeeperHandle {
    /// Start the keeper task through the client's executor.
    pub(crate) fn spawn(shared: Arc<Shared>) -> KeeperHandle {
        let (tx, rx) = mpsc::unbounded_channel();
        let stats = Arc::new(Stats::default());
        let mut worker = Worker::new(shared.clone(), rx, stats.clone());
        shared.spawn(std::future::poll_fn(move |cx| worker.poll(cx)));
        KeeperHandle {
            tx,
            stats,
            next_token: AtomicU64::new(1),
        }
    }

    pub(crate) fn send(&self, cmd: Command) {
        // Fails only when the worker has ended (client closed); the caller then sees `Closed`
        // through its status channel or reply.
        let _ = self.tx.send(cmd);
    }

    /// A new holder for lease `id`; its drop releases the lease.
    pub(crate) fn holder(&self, id: i64, revoke_on_drop: bool) -> Holder {
        Holder {
            id,
            token: self.next_token.fetch_add(1, Ordering::Relaxed),
            revoke_on_drop,
            tx: self.tx.clone(),
            status: None,
        }
    }

    pub(crate) fn streams_opened(&self) -> u64 {
        self.stats.streams_opened.load(Ordering::Relaxed)
    }

    pub(crate) fn kept(&self) -> u64 {
        self.stats.kept.load(Ordering::Relaxed)
    }
}

/// One handle's claim on a kept lease. Keeps the worker alive (it holds a command sender);
/// dropping it tells the worker to stop keeping the lease for this handle.
pub(crate) struct Holder {
    id: i64,
    pub(crate) token: u64,
    revoke_on_drop: bool,
    tx: mpsc::UnboundedSender<Command>,
    pub(crate) status: Option<watch::Receiver<LeaseStatus>>,
}

impl std::fmt::Debug for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Holder")
            .field("id", &self.id)
            .field("revoke_on_drop", &self.revoke_on_drop)
            .finish()
    }
}

impl Holder {
    pub(crate) fn revoke_on_drop(&self) -> bool {
        self.revoke_on_drop
    }

    pub(crate) fn send(&self, cmd: Command) {
        let _ = self.tx.send(cmd);
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        // No revoke for a lease known to be gone already.
        let gone = self.status.as_ref().is_some_and(|s| {
            matches!(
                s.borrow().lost,
                Some(LeaseLost::Expired | LeaseLost::Revoked)
            )
        });
        let _ = self.tx.send(Command::Release {
            id: self.id,
            token: self.token,
            revoke: self.revoke_on_drop && !gone,
        });
    }
}

/// The request side of the keep-alive stream.
pub(crate) struct RequestStream(pub(crate) mpsc::UnboundedReceiver<pb::LeaseKeepAliveRequest>);

impl Stream for RequestStream {
    type Item = pb::LeaseKeepAliveRequest;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.0.poll_recv(cx)
    }
}

struct Entry {
    /// TTL (s) of the last acknowledged refresh or of the grant; 0 until the first answer.
    ttl: i64,
    /// Send time of the last acknowledged refresh (or of the grant).
    acked_sent: Instant,
    /// `acked_sent + ttl`; `None` until the TTL is known.
    deadline: Option<Instant>,
    /// Send time of the refresh in flight on the current stream.
    in_flight: Option<Instant>,
    /// This lease's entry in the timer queue.
    timer: Option<Instant>,
    /// Tokens of the handles keeping the lease.
    holders: Vec<u64>,
    status: watch::Sender<LeaseStatus>,
}

enum Conn {
    /// No stream (nothing to keep, or about to open one).
    Idle,
    /// Waiting before reconnecting.
    Backoff(Pin<Box<Sleep>>),
    /// The stream is being opened; requests already go into `tx`.
    Opening {
        tx: mpsc::UnboundedSender<pb::LeaseKeepAliveRequest>,
        fut: OpenFuture,
    },
    /// The stream is open.
    Open {
        tx: mpsc::UnboundedSender<pb::LeaseKeepAliveRequest>,
        rx: Box<MessageStream<pb::LeaseKeepAliveResponse>>,
    },
}

/// Where a stalled stream's answers come from: the stream, or the future still opening it
/// (etcd sends a keep-alive stream's response headers with its first answer).
enum DrainFrom {
    Opening(OpenFuture),
    Open(Box<MessageStream<pb::LeaseKeepAliveResponse>>),
}

/// A stream replaced because it stalled (silent for a third of a TTL after a refresh), read
/// on until the refreshes it carried are answered or their deadlines pass: a server that is
/// slow rather than gone still renews them, and an answer that comes here in time counts as
/// it would have on a live stream. Its requests stay open (`_tx`) so that it is not ended
/// under its answers.
struct Draining {
    _tx: mpsc::UnboundedSender<pb::LeaseKeepAliveRequest>,
    rx: DrainFrom,
    /// Refreshes sent on it and not answered yet: lease ID -> send time.
    pending: HashMap<i64, Instant>,
    /// The last of their deadlines: the stream is dropped then.
    until: Pin<Box<Sleep>>,
}

struct Worker {
    shared: Arc<Shared>,
    stats: Arc<Stats>,
    commands: mpsc::UnboundedReceiver<Command>,
    /// Every command sender (client and handles) is gone.
    commands_done: bool,
    /// The client was closed: every lease was reported lost and the task ends.
    closed: bool,
    leases: HashMap<i64, Entry>,
    timers: BTreeSet<(Instant, i64)>,
    sleep: Pin<Box<Sleep>>,
    sleep_at: Option<Instant>,
    conn: Conn,
    /// The endpoint the current stream went to (reported to the balancer when it fails).
    pick: Option<WeakPick>,
    /// Consecutive stream failures without an answer in between.
    attempt: u32,
    /// The auth token generation the server rejected, to force a fresh token.
    stale_token: Option<u64>,
    /// The auth token generation of the current stream.
    token_generation: Option<u64>,
    /// When the current stream last answered anything.
    last_answer: Option<Instant>,
    /// Refreshes in flight on the current stream for leases no longer kept (their answers
    /// are dropped).
    orphans: HashMap<i64, u32>,
    /// The last stream that stalled, read on for its answers (see [`Draining`]).
    draining: Option<Draining>,
    revoke_queue: VecDeque<i64>,
    revokes: Vec<Pin<Box<dyn Future<Output = ()> + Send>>>,
    /// Resolves when the client is closed (taken once it has).
    close_signal: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    /// The origin of the refresh grid.
    origin: Instant,
    /// Scratch buffer for due timers.
    due: Vec<i64>,
}

/// The grid refreshes are rounded down to: about TTL/30 (so refreshes move at most ~3% of
/// the TTL earlier), a power-of-two multiple of 10 ms so that the grids of different TTLs
/// line up, at most 320 ms.
fn grid(ttl: i64) -> Duration {
    let target = u64::try_from(ttl.max(0)).unwrap_or(0).saturating_mul(1000) / 30;
    let mut g = 10u64;
    while g * 2 <= target && g < 320 {
        g *= 2;
    }
    Duration::from_millis(g)
}

fn ttl_duration(ttl: i64) -> Duration {
    // etcd's largest TTL (`MaxLeaseTTL`): a larger one from a broken server must not
    // overflow the instants computed from it.
    const MAX_TTL: i64 = 9_000_000_000;
    Duration::from_secs(u64::try_from(ttl.clamp(0, MAX_TTL)).unwrap_or(0))
}

/// How long a refresh of a lease with this TTL may go unanswered on a silent stream.
fn stall_after(ttl: i64) -> Duration {
    if ttl <= 0 {
        UNKNOWN_TTL_STALL
    } else {
        (ttl_duration(ttl) / 3).max(MIN_STALL)
    }
}

/// Record an acknowledged refresh of lease `id` (`e`) sent at `sent`: its TTL, deadline
/// and status.
fn renewed(e: &mut Entry, id: i64, sent: Instant, ttl: i64, now: Instant) {
    let deadline = sent + ttl_duration(ttl);
    e.ttl = ttl;
    e.acked_sent = sent;
    e.deadline = Some(deadline);
    e.status.send_replace(LeaseStatus {
        id,
        ttl,
        acknowledged_at: now.into_std(),
        deadline: deadline.into_std(),
        lost: None,
    });
}

impl Worker {
    fn new(
        shared: Arc<Shared>,
        commands: mpsc::UnboundedReceiver<Command>,
        stats: Arc<Stats>,
    ) -> Self {
        let now = Instant::now();
        let close_signal =
            Some(Box::pin(shared.closed()) as Pin<Box<dyn Future<Output = ()> + Send>>);
        Worker {
            shared,
            stats,
            commands,
            commands_done: false,
            closed: false,
            leases: HashMap::new(),
            timers: BTreeSet::new(),
            sleep: Box::pin(tokio::time::sleep_until(now)),
            sleep_at: None,
            conn: Conn::Idle,
            pick: None,
            attempt: 0,
            stale_token: None,
            token_generation: None,
            last_answer: None,
            orphans: HashMap::new(),
            draining: None,
            revoke_queue: VecDeque::new(),
            revokes: Vec::new(),
            close_signal,
            origin: now,
            due: Vec::new(),
        }
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let mut budget = BUDGET;
        loop {
            let mut progress = false;
            progress |= self.poll_commands(cx, &mut budget);
            progress |= self.poll_conn(cx, &mut budget);
            progress |= self.poll_draining(cx, &mut budget);
            progress |= self.poll_timers(cx);
            progress |= self.poll_revokes(cx);
            if let Some(signal) = self.close_signal.as_mut()
                && signal.as_mut().poll(cx).is_ready()
            {
                self.close_signal = None;
                progress = true;
                self.close_all();
            }
            if self.leases.is_empty() && !matches!(self.conn, Conn::Idle) {
                // Nothing to keep: end the stream (and any back-off).
                self.conn = Conn::Idle;
                self.orphans.clear();
            }
            if self.leases.is_empty() {
                self.draining = None;
            }
            self.stats
                .kept
                .store(self.leases.len() as u64, Ordering::Relaxed);
            if self.finished() {
                return Poll::Ready(());
            }
            if !progress {
                return Poll::Pending;
            }
            if budget == 0 {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
        }
    }

    /// The task ends once nothing can ask it for anything and nothing is left to do, or when
    /// the client was closed.
    fn finished(&self) -> bool {
        self.closed
            || (self.commands_done
                && self.leases.is_empty()
                && self.revoke_queue.is_empty()
                && self.revokes.is_empty())
    }

    // ---- commands ------------------------------------------------------------------------

    fn poll_commands(&mut self, cx: &mut Context<'_>, budget: &mut usize) -> bool {
        let mut progress = false;
        while !self.commands_done && *budget > 0 {
            match self.commands.poll_recv(cx) {
                Poll::Ready(Some(cmd)) => {
                    *budget -= 1;
                    progress = true;
                    self.on_command(cmd);
                }
                Poll::Ready(None) => {
                    self.commands_done = true;
                    progress = true;
                }
                Poll::Pending => break,
            }
        }
        progress
    }

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Keep {
                id,
                token,
                known,
                reply,
            } => self.keep(id, token, known, reply),
            Command::Release { id, token, revoke } => {
                // Whether the lease is now kept for other handles only: a handle lost
                // earlier (its keeping ended) whose lease was kept again since must not
                // revoke it under the new handles.
                let mut kept_by_others = false;
                if let Some(e) = self.leases.get_mut(&id) {
                    match e.holders.iter().position(|t| *t == token) {
                        Some(pos) => {
                            e.holders.swap_remove(pos);
                            if revoke {
                                self.lose(id, LeaseLost::Revoked);
                            } else if e.holders.is_empty() {
                                self.lose(id, LeaseLost::Closed);
                            }
                        }
                        None => kept_by_others = true,
                    }
                }
                if revoke && !kept_by_others {
                    self.revoke_queue.push_back(id);
                }
            }
            Command::Revoked { id } => {
                if self.leases.contains_key(&id) {
                    self.lose(id, LeaseLost::Revoked);
                }
            }
            Command::NotFound { id, sent } => {
                // Only a request sent after the server last said the lease was alive: it was
                // applied after that, so the lease is gone since. (One sent before may have
                // been applied before a lease granted again with the same ID.)
                if self
                    .leases
                    .get(&id)
                    .is_some_and(|e| sent >= e.status.borrow().acknowledged_at)
                {
                    self.lose(id, LeaseLost::Expired);
                }
            }
        }
    }

    fn keep(
        &mut self,
        id: i64,
        token: u64,
        known: Option<Known>,
        reply: oneshot::Sender<watch::Receiver<LeaseStatus>>,
    ) {
        let now = Instant::now();
        if let Some(e) = self.leases.get_mut(&id) {
            e.holders.push(token);
            let _ = reply.send(e.status.subscribe());
            return;
        }
        if self.closed {
            // Dropping `reply` tells the caller.
            return;
        }
        let (ttl, acked_sent) = known.map_or((0, now), |k| (k.ttl, k.sent_at));
        let deadline = known.map(|k| k.sent_at + ttl_duration(k.ttl));
        let (status, rx) = watch::channel(LeaseStatus {
            id,
            ttl,
            acknowledged_at: now.into_std(),
            deadline: deadline.unwrap_or(now).into_std(),
            lost: None,
        });
        self.leases.insert(
            id,
            Entry {
                ttl,
                acked_sent,
                deadline,
                in_flight: None,
                timer: None,
                holders: vec![token],
                status,
            },
        );
        // Counted before the caller hears back, so the count never lags a returned handle.
        self.stats
            .kept
            .store(self.leases.len() as u64, Ordering::Relaxed);
        let _ = reply.send(rx);
        match deadline {
            Some(d) if now >= d || ttl <= 0 => self.lose(id, LeaseLost::NotAcknowledged),
            Some(_) => {
                let at = self.refresh_at(id);
                self.schedule(id, at);
            }
            None => self.send_or_connect(id, now),
        }
    }

    // ---- the stream ----------------------------------------------------------------------

    fn poll_conn(&mut self, cx: &mut Context<'_>, budget: &mut usize) -> bool {
        match &mut self.conn {
            Conn::Idle => false,
            Conn::Backoff(sleep) => {
                if sleep.as_mut().poll(cx).is_pending() {
                    return false;
                }
                self.conn = Conn::Idle;
                if !self.leases.is_empty() {
                    self.open();
                }
                true
            }
            Conn::Opening { fut, .. } => {
                let Poll::Ready(result) = fut.as_mut().poll(cx) else {
                    return false;
                };
                match result {
                    Ok((rx, token_generation)) => {
                        self.token_generation = token_generation;
                        let old = std::mem::replace(&mut self.conn, Conn::Idle);
                        if let Conn::Opening { tx, .. } = old {
                            self.conn = Conn::Open {
                                tx,
                                rx: Box::new(rx),
                            };
                        }
                    }
                    Err(e) => self.fail(e),
                }
                true
            }
            Conn::Open { .. } => self.poll_answers(cx, budget),
        }
    }

    fn poll_answers(&mut self, cx: &mut Context<'_>, budget: &mut usize) -> bool {
        let mut progress = false;
        let mut now = None;
        while *budget > 0 {
            let Conn::Open { rx, .. } = &mut self.conn else {
                break;
            };
            match Pin::new(&mut **rx).poll_next(cx) {
                Poll::Ready(Some(Ok(answer))) => {
                    *budget -= 1;
                    progress = true;
                    let t = *now.get_or_insert_with(Instant::now);
                    self.on_answer(answer, t);
                }
                Poll::Ready(Some(Err(status))) => {
                    self.fail(Error::from_status(status));
                    return true;
                }
                Poll::Ready(None) => {
                    self.fail(Error::new(
                        ErrorKind::Unavailable,
                        "the server ended the keep-alive stream",
                    ));
                    return true;
                }
                Poll::Pending => break,
            }
        }
        progress
    }

    fn on_answer(&mut self, answer: pb::LeaseKeepAliveResponse, now: Instant) {
        self.last_answer = Some(now);
        self.attempt = 0;
        let id = answer.id;
        if let Some(n) = self.orphans.get_mut(&id) {
            *n -= 1;
            if *n == 0 {
                self.orphans.remove(&id);
            }
            return;
        }
        let Some(e) = self.leases.get_mut(&id) else {
            return;
        };
        let Some(sent) = e.in_flight.take() else {
            return;
        };
        if answer.ttl <= 0 {
            self.lose(id, LeaseLost::Expired);
            return;
        }
        if e.deadline.is_some_and(|d| now >= d) {
            // Too late: the lease may have expired on the server in between.
            self.lose(id, LeaseLost::NotAcknowledged);
            return;
        }
        renewed(e, id, sent, answer.ttl, now);
        let at = self.refresh_at(id);
        self.schedule(id, at);
    }

    /// Read the stalled stream's answers (see [`Draining`]); drop it once it has nothing
    /// more to give.
    fn poll_draining(&mut self, cx: &mut Context<'_>, budget: &mut usize) -> bool {
        let Some(d) = self.draining.as_mut() else {
            return false;
        };
        if d.until.as_mut().poll(cx).is_ready() {
            self.draining = None;
            return true;
        }
        let mut progress = false;
        while *budget > 0 {
            let Some(d) = self.draining.as_mut() else {
                break;
            };
            let rx = match &mut d.rx {
                DrainFrom::Open(rx) => rx,
                DrainFrom::Opening(fut) => match fut.as_mut().poll(cx) {
                    Poll::Ready(Ok((rx, _))) => {
                        progress = true;
                        d.rx = DrainFrom::Open(Box::new(rx));
                        continue;
                    }
                    Poll::Ready(Err(_)) => {
                        self.draining = None;
                        return true;
                    }
                    Poll::Pending => break,
                },
            };
            match Pin::new(&mut **rx).poll_next(cx) {
                Poll::Ready(Some(Ok(answer))) => {
                    *budget -= 1;
                    progress = true;
                    let sent = d.pending.remove(&answer.id);
                    if d.pending.is_empty() {
                        self.draining = None;
                    }
                    let now = Instant::now();
                    // The server answers: a refresh sent before this on the new stream is
                    // slow, not lost, so that stream does not count as stalled for it.
                    self.last_answer = Some(now);
                    if let Some(sent) = sent {
                        self.on_late_answer(answer, sent, now);
                    }
                }
                Poll::Ready(_) => {
                    // Ended or failed: nothing more will come.
                    self.draining = None;
                    return true;
                }
                Poll::Pending => break,
            }
        }
        progress
    }

    /// An answer on the stalled stream to a refresh sent at `sent`. It renews the lease from
    /// `sent` unless it comes after the lease's deadline (the live stream decides then) or a
    /// later refresh was acknowledged already; a TTL of 0 means the lease is gone.
    fn on_late_answer(&mut self, answer: pb::LeaseKeepAliveResponse, sent: Instant, now: Instant) {
        let id = answer.id;
        let Some(e) = self.leases.get_mut(&id) else {
            return;
        };
        if answer.ttl <= 0 {
            self.lose(id, LeaseLost::Expired);
            return;
        }
        if e.deadline.is_some_and(|d| now >= d) || sent <= e.acked_sent {
            return;
        }
        renewed(e, id, sent, answer.ttl, now);
        if e.in_flight.is_none() {
            let at = self.refresh_at(id);
            self.schedule(id, at);
        }
    }

    /// Open a new stream and send every refresh that is due.
    fn open(&mut self) {
        let channel = match self.shared.pick() {
            Ok(p) => {
                let c = p.channel();
                self.pick = Some(p.downgrade());
                c
            }
            Err(e) if e.kind() == ErrorKind::Closed => {
                self.close_all();
                return;
            }
            Err(e) => {
                self.fail(e);
                return;
            }
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = self.shared.clone();
        let stale = self.stale_token.take();
        let fut: OpenFuture = Box::pin(async move {
            let (mut request, generation) = shared.stream_request(RequestStream(rx), stale).await?;
            require_leader(&mut request);
            let stream = crate::grpc::streaming(
                channel,
                "/etcdserverpb.Lease/LeaseKeepAlive",
                request,
                crate::grpc::decode::<pb::LeaseKeepAliveResponse>,
            )
            .await
            .map_err(Error::from_status)?;
            Ok((stream, generation))
        });
        self.stats.streams_opened.fetch_add(1, Ordering::Relaxed);
        self.conn = Conn::Opening { tx, fut };
        self.last_answer = None;
        self.orphans.clear();
        let now = Instant::now();
        let due: Vec<i64> = self
            .leases
            .iter()
            .filter(|(_, e)| e.in_flight.is_none() && now >= self.refresh_time(e))
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            self.send(id, now);
        }
    }

    /// The open stream stalled: replace it, and read on the old one for the answers to the
    /// refreshes it carried (see [`Draining`]).
    fn stalled(&mut self) {
        let old = std::mem::replace(&mut self.conn, Conn::Idle);
        let from = match old {
            Conn::Open { tx, rx } => Some((tx, DrainFrom::Open(rx))),
            Conn::Opening { tx, fut } => Some((tx, DrainFrom::Opening(fut))),
            other => {
                self.conn = other;
                None
            }
        };
        let draining = match from {
            Some((tx, rx)) => {
                let pending: HashMap<i64, Instant> = self
                    .leases
                    .iter()
                    .filter_map(|(id, e)| Some((*id, e.in_flight?)))
                    .collect();
                pending
                    .keys()
                    .filter_map(|id| self.leases.get(id)?.deadline)
                    .max()
                    .map(|until| Draining {
                        _tx: tx,
                        rx,
                        pending,
                        until: Box::pin(tokio::time::sleep_until(until)),
                    })
            }
            None => None,
        };
        self.fail(Error::new(
            ErrorKind::Unavailable,
            "the keep-alive stream stalled",
        ));
        if draining.is_some() {
            self.draining = draining;
        }
    }

    /// The stream failed (or stalled): drop it, forget what was in flight, back off.
    fn fail(&mut self, err: Error) {
        self.conn = Conn::Idle;
        // A broken connection, a stalled stream or a member without leader: let the balancer
        // move the next stream to another endpoint.
        if let Some(pick) = self.pick.take()
            && is_endpoint_failure(&err)
        {
            self.shared.report_stream_failure(&pick, &err);
        }
        self.orphans.clear();
        self.last_answer = None;
        if err.kind() == ErrorKind::Closed {
            self.close_all();
            return;
        }
        if err.is_auth_token_error() {
            self.stale_token = self.token_generation;
        }
        let in_flight: Vec<i64> = self
            .leases
            .iter_mut()
            .filter_map(|(id, e)| e.in_flight.take().map(|_| *id))
            .collect();
        for id in in_flight {
            // Until the new stream sends it again, the deadline is what matters.
            if let Some(d) = self.leases.get(&id).and_then(|e| e.deadline) {
                self.schedule(id, d);
            } else {
                self.unschedule(id);
            }
        }
        if self.leases.is_empty() {
            return;
        }
        let exp = BASE_BACKOFF.saturating_mul(1u32 << self.attempt.min(10));
        let cap = exp.min(MAX_BACKOFF);
        let delay = if err.is_auth_token_error() && self.attempt == 0 {
            Duration::ZERO
        } else {
            // Jitter: between half and all of the capped exponential delay.
            let ms = u64::try_from(cap.as_millis()).unwrap_or(1000).max(2);
            Duration::from_millis(rand::rng().random_range(ms / 2..=ms))
        };
        self.attempt = self.attempt.saturating_add(1);
        self.conn = Conn::Backoff(Box::pin(tokio::time::sleep(delay)));
    }

    /// Send lease `id`'s refresh now if a stream is (being) opened, or open one.
    fn send_or_connect(&mut self, id: i64, now: Instant) {
        match self.conn {
            Conn::Idle => self.open(),
            Conn::Backoff(_) => {}
            Conn::Opening { .. } | Conn::Open { .. } => {
                self.send(id, now);
            }
        }
    }

    /// Put lease `id`'s refresh on the stream. Returns false when there is no stream.
    fn send(&mut self, id: i64, now: Instant) -> bool {
        let tx = match &self.conn {
            Conn::Opening { tx, .. } | Conn::Open { tx, .. } => tx,
            Conn::Idle | Conn::Backoff(_) => return false,
        };
        if tx.send(pb::LeaseKeepAliveRequest { id }).is_err() {
            return false;
        }
        let Some(e) = self.leases.get_mut(&id) else {
            return true;
        };
        e.in_flight = Some(now);
        let stall = now + stall_after(e.ttl);
        let at = e.deadline.map_or(stall, |d| d.min(stall));
        self.schedule(id, at);
        true
    }

    // ---- timers --------------------------------------------------------------------------

    /// When lease `id` is due for its next refresh.
    fn refresh_at(&self, id: i64) -> Instant {
        self.leases
            .get(&id)
            .map_or_else(Instant::now, |e| self.refresh_time(e))
    }

    fn refresh_time(&self, e: &Entry) -> Instant {
        if e.ttl <= 0 {
            return e.acked_sent;
        }
        let ideal = e.acked_sent + ttl_duration(e.ttl) / 3;
        let g = grid(e.ttl).as_nanos();
        match ideal.checked_duration_since(self.origin) {
            Some(since) => {
                let n = since.as_nanos();
                let floored = n - n % g;
                self.origin + Duration::from_nanos(u64::try_from(floored).unwrap_or(u64::MAX))
            }
            None => ideal,
        }
    }

    fn schedule(&mut self, id: i64, at: Instant) {
        let Some(e) = self.leases.get_mut(&id) else {
            return;
        };
        if let Some(old) = e.timer.replace(at) {
            self.timers.remove(&(old, id));
        }
        self.timers.insert((at, id));
    }

    fn unschedule(&mut self, id: i64) {
        if let Some(old) = self.leases.get_mut(&id).and_then(|e| e.timer.take()) {
            self.timers.remove(&(old, id));
        }
    }

    fn poll_timers(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(&(first, _)) = self.timers.first() else {
            return false;
        };
        if self.sleep_at != Some(first) {
            self.sleep.as_mut().reset(first);
            self.sleep_at = Some(first);
        }
        if self.sleep.as_mut().poll(cx).is_pending() {
            return false;
        }
        let now = Instant::now();
        let mut due = std::mem::take(&mut self.due);
        while let Some(&(at, id)) = self.timers.first() {
            if at > now {
                break;
            }
            self.timers.pop_first();
            if let Some(e) = self.leases.get_mut(&id) {
                e.timer = None;
            }
            due.push(id);
        }
        for id in due.drain(..) {
            self.on_timer(id, now);
        }
        self.due = due;
        self.sleep_at = None;
        true
    }

    fn on_timer(&mut self, id: i64, now: Instant) {
        let Some(e) = self.leases.get(&id) else {
            return;
        };
        if e.deadline.is_some_and(|d| now >= d) {
            self.lose(id, LeaseLost::NotAcknowledged);
            return;
        }
        let (ttl, deadline) = (e.ttl, e.deadline);
        if let Some(sent) = e.in_flight {
            let stall = sent + stall_after(ttl);
            if now >= stall {
                let silent = self.last_answer.is_none_or(|a| a < sent);
                if silent {
                    self.stalled();
                    return;
                }
                // The server answers others (on this stream, or on a stalled one still read):
                // it is slow, not gone. Wait for this answer up to the deadline.
                let at = deadline.unwrap_or(now + UNKNOWN_TTL_STALL);
                self.schedule(id, at);
            } else {
                self.schedule(id, deadline.map_or(stall, |d| d.min(stall)));
            }
            return;
        }
        let at = self.refresh_time(e);
        if now < at {
            self.schedule(id, at);
            return;
        }
        let sent = match self.conn {
            Conn::Idle => {
                // `open` sends every due refresh, this one included.
                self.open();
                self.leases.get(&id).is_some_and(|e| e.in_flight.is_some())
            }
            Conn::Backoff(_) => false,
            Conn::Opening { .. } | Conn::Open { .. } => self.send(id, now),
        };
        if !sent && let Some(d) = deadline {
            // Sent once the stream is back; until then, the deadline is what matters.
            self.schedule(id, d);
        }
    }

    // ---- loss, revokes, close ------------------------------------------------------------

    /// Stop keeping lease `id` and tell its handles why. Final: the entry is gone, so nothing
    /// can report it alive again.
    fn lose(&mut self, id: i64, reason: LeaseLost) {
        let Some(e) = self.leases.remove(&id) else {
            return;
        };
        if let Some(t) = e.timer {
            self.timers.remove(&(t, id));
        }
        if e.in_flight.is_some() {
            *self.orphans.entry(id).or_insert(0) += 1;
        }
        e.status.send_modify(|s| {
            s.ttl = 0;
            s.lost = Some(reason);
        });
    }

    fn poll_revokes(&mut self, cx: &mut Context<'_>) -> bool {
        let mut progress = false;
        while self.revokes.len() < MAX_CONCURRENT_REVOKES
            && let Some(id) = self.revoke_queue.pop_front()
        {
            let shared = self.shared.clone();
            let timeout = shared.config().request_timeout.unwrap_or(REVOKE_TIMEOUT);
            let mut opts = CallOpts::mutation("LeaseRevoke");
            opts.timeout = Some(timeout);
            // Best effort: a lease that is gone already fails with LeaseNotFound, and one
            // that cannot be revoked now expires at the end of its TTL.
            self.revokes.push(Box::pin(async move {
                let _ = revoke_pb(&shared, id, opts).await;
            }));
            progress = true;
        }
        let mut i = 0;
        while i < self.revokes.len() {
            if self.revokes[i].as_mut().poll(cx).is_ready() {
                drop(self.revokes.swap_remove(i));
                progress = true;
            } else {
                i += 1;
            }
        }
        progress
    }

    /// The client was closed: every lease is lost with `Closed`, and the task ends.
    fn close_all(&mut self) {
        let ids: Vec<i64> = self.leases.keys().copied().collect();
        for id in ids {
            self.lose(id, LeaseLost::Closed);
        }
        self.conn = Conn::Idle;
        self.draining = None;
        self.revoke_queue.clear();
        self.revokes.clear();
        self.closed = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_is_a_power_of_two_multiple_of_10ms() {
        assert_eq!(grid(0), Duration::from_millis(10));
        assert_eq!(grid(1), Duration::from_millis(20));
        assert_eq!(grid(2), Duration::from_millis(40));
        assert_eq!(grid(5), Duration::from_millis(160));
        assert_eq!(grid(30), Duration::from_millis(320));
        assert_eq!(grid(i64::MAX), Duration::from_millis(320));
        for ttl in 1..100 {
            let g = grid(ttl);
            assert!(g <= ttl_duration(ttl) / 30 || g == Duration::from_millis(10));
        }
    }

    #[test]
    fn a_huge_ttl_from_the_server_does_not_overflow_the_deadline() {
        let now = Instant::now();
        for ttl in [i64::MAX, i64::MAX / 2, 9_000_000_001, -5] {
            let _ = now + ttl_duration(ttl);
        }
        assert_eq!(ttl_duration(-5), Duration::ZERO);
        assert_eq!(ttl_duration(60), Duration::from_secs(60));
    }

    #[test]
    fn stall_time() {
        assert_eq!(stall_after(0), UNKNOWN_TTL_STALL);
        assert_eq!(stall_after(1), MIN_STALL);
        assert_eq!(stall_after(30), Duration::from_secs(10));
    }
}
