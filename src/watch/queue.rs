//! The bounded hand-off between the multiplexer and one watcher's consumer.
//!
//! A tokio channel per watcher would cost more than half a kilobyte each (cache-padded
//! halves and an eagerly allocated block of 32 slots); this is a mutex around a `VecDeque`
//! that allocates nothing until the first batch, plus the consumer's waker.

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

use super::WatchBatch;
use crate::error::{Error, ErrorKind, Result};

/// Capacity kept after the buffer drained; a larger one is released.
const KEEP_CAPACITY: usize = 16;

pub(crate) struct WatcherQueue {
    state: Mutex<State>,
}

struct State {
    items: VecDeque<Result<WatchBatch>>,
    waker: Option<Waker>,
    cap: u32,
    /// The server confirmed the watcher.
    created: bool,
    /// Nothing more will be pushed (a terminal item was, or the watcher was cancelled).
    done: bool,
    /// The multiplexer paused the watcher because the buffer was full; the consumer sends
    /// `Resume` once it has drained half of it.
    paused: bool,
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
                items: VecDeque::new(),
                waker: None,
                cap: cap.max(1),
                created: false,
                done: false,
                paused: false,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queue a batch of events, or mark the watcher paused when the buffer is full.
    ///
    /// Returns the consumer's waker when the consumer waits for this batch: the caller wakes
    /// it, possibly later (the multiplexer wakes a run of consumers at once, see
    /// `Worker::flush_wakes`), which is fine since the batch is already queued.
    pub(crate) fn push(&self, batch: WatchBatch) -> std::result::Result<Option<Waker>, PushError> {
        let mut s = self.lock();
        if s.done {
            return Ok(None);
        }
        if s.items.len() >= s.cap as usize {
            s.paused = true;
            return Err(PushError::Full);
        }
        s.items.push_back(Ok(batch));
        Ok(s.waker.take())
    }

    /// Queue a notification when there is room; dropped otherwise (it carries no events).
    pub(crate) fn push_notification(&self, batch: WatchBatch) {
        match self.push(batch) {
            Ok(Some(w)) => w.wake(),
            Ok(None) => {}
            Err(PushError::Full) => {
                // `push` marked it paused; a notification must not pause the watcher.
                self.lock().paused = false;
            }
        }
    }

    /// The server confirmed the watcher; `first` is the created notification, when asked for.
    pub(crate) fn set_created(&self, first: Option<WatchBatch>) {
        let mut s = self.lock();
        s.created = true;
        if let Some(b) = first {
            s.items.push_back(Ok(b));
        }
        let waker = s.waker.take();
        drop(s);
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// End the watcher, with a final error item when `err` is given.
    pub(crate) fn finish(&self, err: Option<Error>) {
        let mut s = self.lock();
        if s.done {
            return;
        }
        if let Some(e) = err {
            s.items.push_back(Err(e));
        }
        s.done = true;
        let waker = s.waker.take();
        drop(s);
        if let Some(w) = waker {
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
            return Poll::Ready(Err(match s.items.pop_front() {
                Some(Err(e)) => e,
                _ => Error::new(ErrorKind::Closed, "the client was closed"),
            }));
        }
        set_waker(&mut s.waker, cx);
        Poll::Pending
    }

    /// The next item (`None` at the end), and whether the consumer must now send `Resume`.
    pub(crate) fn poll_pop(
        &self,
        cx: &mut Context<'_>,
    ) -> Poll<(Option<Result<WatchBatch>>, bool)> {
        let mut s = self.lock();
        if let Some(item) = s.items.pop_front() {
            let mut resume = false;
            if s.paused && s.items.len() <= (s.cap / 2) as usize {
                s.paused = false;
                resume = true;
            }
            if s.items.is_empty() && s.items.capacity() > KEEP_CAPACITY {
                s.items = VecDeque::new();
            }
            return Poll::Ready((Some(item), resume));
        }
        if s.done {
            return Poll::Ready((None, false));
        }
        set_waker(&mut s.waker, cx);
        Poll::Pending
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lock().items.len()
    }
}

fn set_waker(slot: &mut Option<Waker>, cx: &mut Context<'_>) {
    match slot {
        Some(w) if w.will_wake(cx.waker()) => {}
        _ => *slot = Some(cx.waker().clone()),
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
            match q.poll_pop(&mut cx) {
                Poll::Ready((Some(Ok(_)), r)) => resumes += usize::from(r),
                _ => panic!("expected an item"),
            }
        }
        assert_eq!(resumes, 1, "exactly one resume");
        assert!(q.poll_pop(&mut cx).is_pending());
        q.finish(Some(Error::new(ErrorKind::Compacted, "x")));
        assert!(matches!(
            q.poll_pop(&mut cx),
            Poll::Ready((Some(Err(_)), false))
        ));
        assert!(matches!(q.poll_pop(&mut cx), Poll::Ready((None, false))));
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
            q.poll_pop(&mut cx),
            Poll::Ready((Some(Ok(_)), false))
        ));
    }

    fn futures_noop_waker() -> Waker {
        Waker::noop().clone()
    }
}
