//! The bounded hand-off between the multiplexer and one watcher's consumer, or the watchers
//! of a [`WatchGroup`](super::WatchGroup) and the group's one consumer.
//!
//! A tokio channel per watcher would cost more than half a kilobyte each (cache-padded
//! halves and an eagerly allocated block of 32 slots); this is a mutex around a `VecDeque`
//! that allocates room for one batch at the first batch, plus the consumer's waker. A group
//! member keeps its own state here and passes its batches, tagged with its id, to the
//! group's queue ([`GroupQueue`]).

use std::collections::VecDeque;
use std::mem;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

use super::{Events, WatchBatch};
use crate::error::{Error, ErrorKind, Result};
use crate::types::ResponseHeader;

/// Capacity kept after the buffer drained; a larger one is released (room for one is kept).
const KEEP_CAPACITY: usize = 1;

///
/// The lock and the state fill one cache line, aligned: a batch for the watcher touches
/// that line (and the buffer's), which the multiplexer looks up in advance (`touch`), and
/// the reference counts the `Arc` puts before it are on a line of their own.
#[repr(align(64))]
pub(crate) struct WatcherQueue {
    state: Mutex<State>,
}

struct State {
    buf: Buf,
    /// The consumer (a group member's: the task awaiting its creation).
    waker: Option<Waker>,
    /// With its own buffer, the most batches it holds. A group member has none: this is the
    /// number of bytes cut from the front of every key of its batches (its namespace; 0 for
    /// none). One field for both keeps the queue in one cache line.
    cap: u32,
    /// The server confirmed the watcher.
    created: bool,
    /// Nothing more will be pushed (a terminal item was, or the watcher was cancelled).
    done: bool,
    /// The multiplexer paused the watcher because the buffer was full; the consumer sends
    /// `Resume` once it has drained half of it.
    paused: bool,
}

/// Where a watcher's items go.
enum Buf {
    /// Its own buffer, read by its own consumer.
    Own(Items),
    /// The buffer of its group; a refused creation's error waits here for the member's
    /// creation future.
    Member {
        group: Arc<GroupQueue>,
        id: u64,
        refused: Option<Box<Error>>,
    },
}

/// What a batch may use of a full buffer.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Room {
    /// Events: up to the bound; a batch that does not fit pauses its watcher.
    Events,
    /// A periodic notification: up to the bound, else dropped.
    Notification,
    /// A requested progress notification: one place beyond the bound, else dropped.
    Requested,
}

impl Room {
    fn spare(self) -> usize {
        usize::from(self == Room::Requested)
    }
}

/// Why a batch was not queued.
pub(crate) enum PushError {
    /// The buffer is full: the watcher is now marked paused.
    Full,
}

impl WatcherQueue {
    pub(crate) fn new(cap: u32) -> Self {
        WatcherQueue {
            state: Mutex::new(State {
                buf: Buf::Own(Items::default()),
                waker: None,
                cap: cap.max(1),
                created: false,
                done: false,
                paused: false,
            }),
        }
    }

    /// The queue of member `id` of a group: its batches go to `group`, with the first `strip`
    /// bytes of their keys removed (a namespace; 0 for none).
    pub(crate) fn member(group: Arc<GroupQueue>, id: u64, strip: u32) -> Self {
        WatcherQueue {
            state: Mutex::new(State {
                buf: Buf::Member {
                    group,
                    id,
                    refused: None,
                },
                waker: None,
                cap: strip,
                created: false,
                done: false,
                paused: false,
            }),
        }
    }

    /// Read the queue's cache line without taking the lock (a plain load), so that a coming
    /// [`push_events`](Self::push_events) finds it in the cache: the multiplexer does this for
    /// a run of responses before handling any, and their cache misses overlap.
    #[inline]
    pub(crate) fn touch(&self) -> bool {
        self.state.is_poisoned()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queue a batch, or mark the watcher paused when the buffer is full.
    ///
    /// Returns the consumer's waker when the consumer waits for this batch: the caller wakes
    /// it, possibly later (the multiplexer wakes a run of consumers at once, see
    /// `Worker::flush_wakes`), which is fine since the batch is already queued.
    #[cfg(test)]
    pub(crate) fn push(&self, batch: WatchBatch) -> std::result::Result<Option<Waker>, PushError> {
        self.push_with(|| batch, Room::Events)
    }

    /// [`push`](Self::push) for a batch of events: the batch is built in the buffer, and
    /// `events` taken only when it is queued.
    #[inline]
    pub(crate) fn push_events(
        &self,
        header: ResponseHeader,
        events: &mut Events,
    ) -> std::result::Result<Option<Waker>, PushError> {
        self.push_with(
            || WatchBatch::events_from(header, mem::take(events)),
            Room::Events,
        )
    }

    /// Queue the batch `make` builds (only when there is room). A batch of events that does
    /// not fit pauses the watcher (a group member is recorded as paused in the group).
    #[inline]
    fn push_with(
        &self,
        make: impl FnOnce() -> WatchBatch,
        room: Room,
    ) -> std::result::Result<Option<Waker>, PushError> {
        let mut s = self.lock();
        if s.done {
            return Ok(None);
        }
        let cap = s.cap as usize;
        let s = &mut *s;
        match &mut s.buf {
            Buf::Own(items) => {
                if items.len() >= cap + room.spare() {
                    if room == Room::Events {
                        s.paused = true;
                    }
                    return Err(PushError::Full);
                }
                items.push_back(Ok(make()));
                Ok(s.waker.take())
            }
            Buf::Member { group, id, .. } => match cap {
                0 => group.push(*id, make, room),
                strip => group.push(*id, || make().strip_key_prefix(strip), room),
            },
        }
    }

    /// Queue a periodic progress notification when there is room; dropped otherwise (it
    /// carries no events, and the next one says as much).
    pub(crate) fn push_notification(&self, batch: WatchBatch) {
        if let Ok(Some(w)) = self.push_with(|| batch, Room::Notification) {
            w.wake();
        }
    }

    /// Queue the answer to a requested progress notification: it may take one place beyond
    /// the bound, so that a consumer that has fallen behind still gets it; it is dropped only
    /// when that place is taken too (by an earlier answer the consumer has not read yet).
    pub(crate) fn push_requested_progress(&self, batch: WatchBatch) {
        if let Ok(Some(w)) = self.push_with(|| batch, Room::Requested) {
            w.wake();
        }
    }

    /// The server confirmed the watcher; `first` is the created notification, when asked for.
    pub(crate) fn set_created(&self, first: Option<WatchBatch>) {
        let mut s = self.lock();
        s.created = true;
        let mut group_waker = None;
        if let Some(b) = first {
            match &mut s.buf {
                Buf::Own(items) => items.push_back(Ok(b)),
                Buf::Member { group, id, .. } => group_waker = group.push_always(*id, Ok(b)),
            }
        }
        let waker = s.waker.take();
        drop(s);
        for w in [waker, group_waker].into_iter().flatten() {
            w.wake();
        }
    }

    /// End the watcher, with a final error item when `err` is given.
    pub(crate) fn finish(&self, err: Option<Error>) {
        let mut s = self.lock();
        if s.done {
            return;
        }
        let created = s.created;
        let mut group_waker = None;
        if let Some(e) = err {
            match &mut s.buf {
                Buf::Own(items) => items.push_back(Err(e)),
                // Before its creation the error is the creation's answer, not an item.
                Buf::Member { refused, .. } if !created => *refused = Some(Box::new(e)),
                Buf::Member { group, id, .. } => group_waker = group.push_always(*id, Err(e)),
            }
        }
        s.done = true;
        let waker = s.waker.take();
        drop(s);
        for w in [waker, group_waker].into_iter().flatten() {
            w.wake();
        }
    }

    pub(crate) fn is_done(&self) -> bool {
        self.lock().done
    }

    /// For the future that awaits creation: `Ok` once created, the terminal error when the
    /// server refused the watcher.
    pub(crate) fn poll_created(&self, cx: &mut Context<'_>) -> Poll<Result<()>> {
        let mut s = self.lock();
        if s.created {
            return Poll::Ready(Ok(()));
        }
        if s.done {
            let refused = match &mut s.buf {
                Buf::Own(items) => match items.pop_front() {
                    Some(Err(e)) => Some(e),
                    _ => None,
                },
                Buf::Member { refused, .. } => refused.take().map(|e| *e),
            };
            return Poll::Ready(Err(
                refused.unwrap_or_else(|| Error::new(ErrorKind::Closed, "the client was closed"))
            ));
        }
        set_waker(&mut s.waker, cx);
        Poll::Pending
    }

    /// The next item (`None` at the end); calls `resume` when the consumer must now send
    /// `Resume`. (The item is returned as the consumer's poll returns it, straight from the
    /// buffer, so that it is not copied on the way: a batch is 152 bytes.)
    #[inline]
    pub(crate) fn poll_pop(
        &self,
        cx: &mut Context<'_>,
        resume: impl FnOnce(),
    ) -> Poll<Option<Result<WatchBatch>>> {
        let mut s = self.lock();
        let s = &mut *s;
        // A group member is read through its group.
        let Buf::Own(items) = &mut s.buf else {
            return Poll::Ready(None);
        };
        let len = items.len();
        if len > 0 {
            if s.paused && len - 1 <= (s.cap / 2) as usize {
                s.paused = false;
                resume();
            }
            if len == 1 && items.0.capacity() > KEEP_CAPACITY {
                // The last item of a backlog: give back the room it took.
                return Poll::Ready(items.take_last());
            }
            return Poll::Ready(items.pop_front());
        }
        if s.done {
            return Poll::Ready(None);
        }
        set_waker(&mut s.waker, cx);
        Poll::Pending
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        match &self.lock().buf {
            Buf::Own(items) => items.len(),
            Buf::Member { .. } => 0,
        }
    }
}

/// A FIFO of items. Its room is made for one item at the first push and kept: a consumer that
/// keeps pace takes each batch before the next arrives, so the room is reused from batch to
/// batch without allocating, and a watcher that never got a batch costs nothing here. (A
/// plain `VecDeque` would make room for four batches, about a kilobyte, at the first push.)
#[derive(Default)]
struct Items(VecDeque<Result<WatchBatch>>);

impl Items {
    fn len(&self) -> usize {
        self.0.len()
    }

    fn push_back(&mut self, item: Result<WatchBatch>) {
        if self.0.capacity() == 0 {
            self.0.reserve_exact(1);
        }
        self.0.push_back(item);
    }

    #[inline]
    fn pop_front(&mut self) -> Option<Result<WatchBatch>> {
        self.0.pop_front()
    }

    /// The only item, giving back the room a backlog took but for one item.
    fn take_last(&mut self) -> Option<Result<WatchBatch>> {
        let item = self.0.pop_front();
        if self.0.is_empty() && self.0.capacity() > KEEP_CAPACITY {
            self.0 = VecDeque::new();
            self.0.reserve_exact(1);
        }
        item
    }
}

fn set_waker(slot: &mut Option<Waker>, cx: &mut Context<'_>) {
    match slot {
        Some(w) if w.will_wake(cx.waker()) => {}
        _ => *slot = Some(cx.waker().clone()),
    }
}

/// The shared buffer of a [`WatchGroup`](super::WatchGroup): the batches of all its members,
/// tagged with the member's id, in the order they came; one consumer, one waker. A batch for
/// a member costs the member's own cache line and this queue's, which stays warm, instead of
/// a buffer and a task per watcher.
pub(crate) struct GroupQueue {
    state: Mutex<GroupState>,
}

struct GroupState {
    items: VecDeque<(u64, Result<WatchBatch>)>,
    waker: Option<Waker>,
    cap: usize,
    /// Items the consumer took at its last visit (see `poll_take_all`): still buffered, on
    /// its side.
    taken: usize,
    /// Members paused because the buffer was full: resumed once the consumer drained half.
    paused: Vec<u64>,
}

/// A group's items, as the consumer takes them.
pub(crate) type GroupItems = VecDeque<(u64, Result<WatchBatch>)>;

/// Room kept when the buffer drains; more is released.
const GROUP_KEEP: usize = 256;

impl GroupQueue {
    pub(crate) fn new(cap: usize) -> Self {
        GroupQueue {
            state: Mutex::new(GroupState {
                items: VecDeque::new(),
                waker: None,
                cap: cap.max(1),
                taken: 0,
                paused: Vec::new(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, GroupState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queue member `id`'s batch (built by `make` only when there is room, see [`Room`]).
    /// When the buffer is full, a member whose events did not fit is recorded as paused (a
    /// notification is just dropped).
    #[inline]
    fn push(
        &self,
        id: u64,
        make: impl FnOnce() -> WatchBatch,
        room: Room,
    ) -> std::result::Result<Option<Waker>, PushError> {
        let mut g = self.lock();
        if g.items.len() + g.taken >= g.cap + room.spare() {
            if room == Room::Events {
                g.paused.push(id);
            }
            return Err(PushError::Full);
        }
        g.items.push_back((id, Ok(make())));
        Ok(g.waker.take())
    }

    /// Queue an item whatever the room (a member's last item, or its created notification):
    /// one per member at most, so the buffer stays bounded.
    fn push_always(&self, id: u64, item: Result<WatchBatch>) -> Option<Waker> {
        let mut g = self.lock();
        g.items.push_back((id, item));
        g.waker.take()
    }

    /// Move every buffered item to `into` (which the consumer has read to the end: empty),
    /// in one visit: the two buffers are swapped. `Pending`, with the waker kept, when there
    /// is none. The items taken still count against the bound until the next visit. Members
    /// to resume (paused, and the buffer is now at most half full) are added to `resume`.
    pub(crate) fn poll_take_all(
        &self,
        cx: &mut Context<'_>,
        into: &mut GroupItems,
        resume: &mut Vec<u64>,
    ) -> Poll<()> {
        let mut g = self.lock();
        // Everything taken last time has been read.
        g.taken = 0;
        if !g.paused.is_empty() && g.items.len() <= g.cap / 2 {
            resume.append(&mut g.paused);
        }
        if g.items.is_empty() {
            set_waker(&mut g.waker, cx);
            return Poll::Pending;
        }
        into.clear();
        mem::swap(&mut g.items, into);
        g.taken = into.len();
        if g.items.capacity() > 4 * GROUP_KEEP {
            g.items.shrink_to(GROUP_KEEP);
        }
        Poll::Ready(())
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().items.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::ResponseHeader;
    use crate::watch::BatchKind;

    fn batch() -> WatchBatch {
        WatchBatch::notification(ResponseHeader::default(), BatchKind::Events)
    }

    /// The lock and the state are one cache line.
    #[test]
    fn a_queue_is_one_cache_line() {
        assert_eq!(std::mem::size_of::<WatcherQueue>(), 64);
        assert_eq!(std::mem::align_of::<WatcherQueue>(), 64);
    }

    #[test]
    fn bounded_pause_and_resume_at_half() {
        let q = WatcherQueue::new(4);
        for _ in 0..4 {
            assert!(q.push(batch()).is_ok());
        }
        assert!(matches!(q.push(batch()), Err(PushError::Full)));
        assert_eq!(q.len(), 4);
        let waker = futures_noop_waker();
        let mut cx = Context::from_waker(&waker);
        let mut resumes = 0;
        for _ in 0..4 {
            match pop(&q, &mut cx) {
                Poll::Ready((Some(Ok(_)), r)) => resumes += usize::from(r),
                _ => panic!("expected an item"),
            }
        }
        assert_eq!(resumes, 1, "exactly one resume");
        assert!(pop(&q, &mut cx).is_pending());
        q.finish(Some(Error::new(ErrorKind::Compacted, "x")));
        assert!(matches!(
            pop(&q, &mut cx),
            Poll::Ready((Some(Err(_)), false))
        ));
        assert!(matches!(pop(&q, &mut cx), Poll::Ready((None, false))));
    }

    /// Items come out in order, and a drained buffer that grew gives its room back but for
    /// one item.
    #[test]
    fn order_across_the_inline_slot_and_the_deque() {
        let q = WatcherQueue::new(64);
        let waker = futures_noop_waker();
        let mut cx = Context::from_waker(&waker);
        let mut next = 0i64;
        let mut pushed = 0i64;
        for round in [1usize, 3, 1, 40, 2] {
            for _ in 0..round {
                let b = WatchBatch::notification(
                    ResponseHeader {
                        revision: pushed,
                        ..Default::default()
                    },
                    BatchKind::Events,
                );
                assert!(q.push(b).is_ok());
                pushed += 1;
            }
            for _ in 0..round {
                match pop(&q, &mut cx) {
                    Poll::Ready((Some(Ok(b)), _)) => assert_eq!(b.revision(), next),
                    _ => panic!("expected batch {next}"),
                }
                next += 1;
            }
            assert!(pop(&q, &mut cx).is_pending());
            assert!(matches!(&q.lock().buf, Buf::Own(items) if items.0.capacity() == 1));
        }
    }

    #[test]
    fn notifications_never_pause() {
        let q = WatcherQueue::new(1);
        assert!(q.push(batch()).is_ok());
        q.push_notification(batch());
        assert_eq!(q.len(), 1);
        let waker = futures_noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(matches!(
            pop(&q, &mut cx),
            Poll::Ready((Some(Ok(_)), false))
        ));
    }

    /// A group's buffer: items of all members in order, bounded (a member whose batch does
    /// not fit is recorded as paused and resumed once half is read), with a member's last
    /// item and created notification queued whatever the room.
    #[test]
    fn a_group_buffer_is_shared_bounded_and_resumes_at_half() {
        let g = Arc::new(GroupQueue::new(4));
        let a = WatcherQueue::member(Arc::clone(&g), 1, 0);
        let b = WatcherQueue::member(Arc::clone(&g), 2, 0);
        let events = |rev: i64| {
            let mut e = Events::default();
            if let Some(ev) = e.push_empty() {
                ev.kv.pb_mut().mod_revision = rev;
            }
            e
        };
        let header = ResponseHeader::default();
        for rev in 1..=2 {
            assert!(a.push_events(header, &mut events(rev)).is_ok());
            assert!(b.push_events(header, &mut events(rev)).is_ok());
        }
        let mut full = events(3);
        assert!(matches!(
            b.push_events(header, &mut full),
            Err(PushError::Full)
        ));
        assert!(
            !full.is_empty(),
            "a batch that did not fit is left to the caller"
        );
        // A notification that does not fit is dropped; a member's end is always queued.
        b.push_notification(batch());
        a.set_created(None);
        a.finish(Some(Error::new(ErrorKind::Compacted, "x")));
        assert_eq!(g.len(), 5);
        // A member's own poll yields nothing: it is read through the group.
        let waker = futures_noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(matches!(a.poll_pop(&mut cx, || {}), Poll::Ready(None)));
        let mut resume = Vec::new();
        let mut taken = GroupItems::new();
        assert!(g.poll_take_all(&mut cx, &mut taken, &mut resume).is_ready());
        assert!(resume.is_empty(), "nothing read yet");
        assert_eq!(g.len(), 0);
        // What was taken still counts until it has been read (the next visit).
        let c = WatcherQueue::member(Arc::clone(&g), 3, 0);
        assert!(matches!(
            c.push_events(header, &mut events(3)),
            Err(PushError::Full)
        ));
        let order: Vec<_> = taken
            .drain(..)
            .map(|(id, item)| {
                let rev = item
                    .ok()
                    .and_then(|b| b.events().first().map(|e| e.revision()));
                (id, rev)
            })
            .collect();
        assert!(
            g.poll_take_all(&mut cx, &mut taken, &mut resume)
                .is_pending()
        );
        assert_eq!(resume, [2, 3], "the paused members are resumed");
        assert_eq!(
            order,
            [
                (1, Some(1)),
                (2, Some(1)),
                (1, Some(2)),
                (2, Some(2)),
                (1, None)
            ]
        );
    }

    /// A group member refused at creation: its creation's answer is the error, which is not
    /// queued in the group.
    #[test]
    fn a_refused_member_answers_its_creation() {
        let g = Arc::new(GroupQueue::new(4));
        let m = WatcherQueue::member(Arc::clone(&g), 7, 0);
        m.finish(Some(Error::new(ErrorKind::PermissionDenied, "no")));
        let waker = futures_noop_waker();
        let mut cx = Context::from_waker(&waker);
        match m.poll_created(&mut cx) {
            Poll::Ready(Err(e)) => assert_eq!(e.kind(), ErrorKind::PermissionDenied),
            _ => panic!("the refusal"),
        }
        assert_eq!(g.len(), 0);
    }

    /// `poll_pop` with the resume flag in the result.
    /// Notifications never pause a watcher, and never undo a pause (a watcher whose pause
    /// was undone would never send `Resume`); an answer to a progress request may take one
    /// place beyond the bound.
    #[test]
    fn notifications_keep_the_pause_and_a_requested_one_has_a_spare_place() {
        let progress = || WatchBatch::notification(ResponseHeader::default(), BatchKind::Progress);
        let q = WatcherQueue::new(2);
        assert!(q.push(batch()).is_ok());
        assert!(q.push(batch()).is_ok());
        // Full: a periodic notification is dropped, and pauses nothing.
        q.push_notification(progress());
        assert_eq!(q.len(), 2);
        // A requested one takes the spare place; a second one is dropped.
        q.push_requested_progress(progress());
        assert_eq!(q.len(), 3);
        q.push_requested_progress(progress());
        assert_eq!(q.len(), 3);
        // Events still pause it, and later notifications leave the pause alone.
        assert!(matches!(q.push(batch()), Err(PushError::Full)));
        q.push_notification(progress());
        q.push_requested_progress(progress());
        let waker = futures_noop_waker();
        let mut cx = Context::from_waker(&waker);
        let mut resumes = 0;
        for _ in 0..3 {
            match pop(&q, &mut cx) {
                Poll::Ready((Some(Ok(_)), r)) => resumes += usize::from(r),
                _ => panic!("expected an item"),
            }
        }
        assert_eq!(
            resumes, 1,
            "the consumer that drains the buffer resumes the watcher"
        );
        assert!(pop(&q, &mut cx).is_pending());
    }

    fn pop(q: &WatcherQueue, cx: &mut Context<'_>) -> Poll<(Option<Result<WatchBatch>>, bool)> {
        let mut resume = false;
        q.poll_pop(cx, || resume = true).map(|item| (item, resume))
    }

    fn futures_noop_waker() -> Waker {
        Waker::noop().clone()
    }
}
