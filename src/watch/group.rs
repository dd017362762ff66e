//! Many watchers read as one stream: [`WatchGroup`].

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};

use super::queue::{GroupItems, GroupQueue, WatcherQueue};
use super::{Watch, WatchBatch, Watcher};
use crate::error::Result;

/// The default buffer of a [`WatchGroup`], in batches, shared by all its members.
pub const DEFAULT_GROUP_BUFFER: usize = 4096;

/// Many watchers read as one [`Stream`](futures_core::Stream) of `(watcher id, batch)`, in
/// the order the batches came: for a task that watches many keys or ranges (a configuration
/// tree, a service registry, thousands of keys).
///
/// Each member is a full watcher ([`Watch`] with all its options, on the client's shared
/// Watch stream) with every guarantee of a [`Watcher`]: its revisions arrive exactly once and
/// in order, across reconnects, and its end comes as an error item with its id. What
/// differs is the hand-off: all members share one bounded buffer
/// ([`with_buffer`](WatchGroup::with_buffer), in batches; a member's own [`Watch::buffer`] is not used) and
/// one consumer. A batch costs the multiplexer no wake-up of a task per watcher and no
/// buffer per watcher, so reading 1,000 watchers this way costs less CPU than a task per
/// [`Watcher`] (see the README's figures). When the shared buffer is full, the member whose
/// batch did not fit is paused (cancelled on the server) and re-created from its next
/// revision once the consumer has read half of the buffer: nothing is lost.
///
/// [`add`](WatchGroup::add) takes `&self`, so many members can be created at once (their
/// creations are pipelined); reading takes `&mut self`. The stream ends (`None`) when the
/// group has no member left (each ends with its error item, or is
/// [`remove`](WatchGroup::remove)d) and nothing is buffered. Dropping the group cancels all
/// its members on the server.
///
/// ```no_run
/// # async fn example(client: etcdv3::Client) -> etcdv3::Result<()> {
/// use etcdv3::WatchGroup;
///
/// let group = WatchGroup::new();
/// let config = group.add(client.watch("config/").prefix()).await?;
/// let leader = group.add(client.watch("election/leader")).await?;
/// let mut group = group;
/// while let Some((id, batch)) = group.next().await {
///     let batch = batch?;
///     for event in batch.events() {
///         if id == config {
///             println!("config {:?} changed", event.kv.key());
///         } else if id == leader {
///             println!("the leader is now {:?}", event.kv.value());
///         }
///     }
/// }
/// # Ok(())
/// # }
/// ```
pub struct WatchGroup {
    queue: Arc<GroupQueue>,
    members: Mutex<HashMap<u64, Watcher>>,
    /// The items taken from the shared buffer at the last visit, read from here without its
    /// lock.
    taken: GroupItems,
    /// Members to resume (scratch for the visits).
    resume: Vec<u64>,
}

impl std::fmt::Debug for WatchGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatchGroup")
            .field("members", &self.len())
            .finish_non_exhaustive()
    }
}

impl Default for WatchGroup {
    fn default() -> Self {
        WatchGroup::new()
    }
}

impl WatchGroup {
    /// An empty group with the default buffer ([`DEFAULT_GROUP_BUFFER`] batches).
    pub fn new() -> Self {
        WatchGroup::with_buffer(DEFAULT_GROUP_BUFFER)
    }

    /// An empty group whose members share a buffer of `batches` batches (at least 1).
    pub fn with_buffer(batches: usize) -> Self {
        WatchGroup {
            queue: Arc::new(GroupQueue::new(batches)),
            members: Mutex::new(HashMap::new()),
            taken: GroupItems::new(),
            resume: Vec::new(),
        }
    }

    fn members(&self) -> MutexGuard<'_, HashMap<u64, Watcher>> {
        self.members.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Create the watcher `watch` describes as a member of this group, once the server
    /// confirmed it: a [`Watch`] (from [`Client::watch`](crate::Client::watch)) or an
    /// [`NsWatch`](crate::NsWatch) (from [`Namespace::watch`](crate::Namespace::watch); that
    /// member's batches then carry keys relative to its namespace, as an
    /// [`NsWatcher`](crate::NsWatcher)'s do), with any of its options. Returns its id: the one
    /// its batches carry, and [`Watcher::id`]'s kind (unique among the client's watchers).
    ///
    /// Errors are those of creating a [`Watcher`] (a compacted start revision, a refused
    /// range, a closed client); the group is unchanged then.
    pub async fn add(&self, watch: impl GroupWatch) -> Result<u64> {
        let (watch, strip) = watch.into_parts();
        // A namespace longer than 4 GiB cannot exist (etcd keys are at most 1.5 MiB).
        let strip = u32::try_from(strip).unwrap_or(u32::MAX);
        let group = Arc::clone(&self.queue);
        let watcher = watch
            .start_on(move |id| Arc::new(WatcherQueue::member(group, id, strip)))
            .await?;
        let id = watcher.id();
        self.members().insert(id, watcher);
        Ok(id)
    }

    /// Cancel member `id` on the server; false when it is not a member (any more). Batches of
    /// it already buffered are still read.
    pub fn remove(&self, id: u64) -> bool {
        // Dropping the watcher cancels it.
        self.members().remove(&id).is_some()
    }

    /// Whether `id` is a member (added, and neither removed nor ended).
    pub fn contains(&self, id: u64) -> bool {
        self.members().contains_key(&id)
    }

    /// The number of members.
    pub fn len(&self) -> usize {
        self.members().len()
    }

    /// Whether the group has no member.
    pub fn is_empty(&self) -> bool {
        self.members().is_empty()
    }

    /// The next batch of any member, with the member's id; `None` once the group has no
    /// member and nothing buffered. An error item is its member's last: the member is no
    /// longer in the group then. Same as `futures::StreamExt::next`.
    pub async fn next(&mut self) -> Option<(u64, Result<WatchBatch>)> {
        std::future::poll_fn(|cx| self.poll_item(cx)).await
    }

    /// Wait for items, then move up to `limit` of them (at least 1) to the end of `buf`, in
    /// order; returns how many, 0 once the group has ended (as [`next`](WatchGroup::next)
    /// gives `None`). For a consumer that handles what has come in runs, as tokio's
    /// `Receiver::recv_many`: each item is moved once, instead of through the layers of a
    /// future per item.
    pub async fn next_many(
        &mut self,
        buf: &mut Vec<(u64, Result<WatchBatch>)>,
        limit: usize,
    ) -> usize {
        std::future::poll_fn(|cx| self.poll_many(cx, buf, limit.max(1))).await
    }

    fn poll_many(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut Vec<(u64, Result<WatchBatch>)>,
        limit: usize,
    ) -> Poll<usize> {
        if self.taken.is_empty() && self.poll_take(cx).is_pending() {
            return Poll::Pending;
        }
        let n = limit.min(self.taken.len());
        let start = buf.len();
        buf.extend(self.taken.drain(..n));
        if let Some(tail) = buf.get(start..) {
            for (id, item) in tail {
                if item.is_err() {
                    // Its last item: the member has ended.
                    self.members().remove(id);
                }
            }
        }
        Poll::Ready(n)
    }

    fn poll_item(&mut self, cx: &mut Context<'_>) -> Poll<Option<(u64, Result<WatchBatch>)>> {
        if self.taken.is_empty() && self.poll_take(cx).is_pending() {
            return Poll::Pending;
        }
        match self.taken.pop_front() {
            Some((id, item)) => {
                if item.is_err() {
                    // Its last item: the member has ended.
                    self.members().remove(&id);
                }
                Poll::Ready(Some((id, item)))
            }
            None => Poll::Ready(None),
        }
    }

    /// `taken` is read to the end: take all that has come since, in one visit. `Ready` with
    /// items in `taken`, or with none when the group has ended.
    fn poll_take(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let taken = self
            .queue
            .poll_take_all(cx, &mut self.taken, &mut self.resume);
        if !self.resume.is_empty() {
            let members = self.members.lock().unwrap_or_else(PoisonError::into_inner);
            for r in self.resume.drain(..) {
                // The buffer has room again: the multiplexer re-creates the member.
                if let Some(w) = members.get(&r) {
                    w.send_resume();
                }
            }
        }
        if taken.is_pending() && !self.is_empty() {
            return Poll::Pending;
        }
        // Items, or the end (no member left, nothing buffered).
        Poll::Ready(())
    }
}

/// What [`WatchGroup::add`] takes: a [`Watch`] or an [`NsWatch`](crate::NsWatch). Sealed:
/// implemented only by those two.
pub trait GroupWatch: sealed::Sealed {}

pub(crate) mod sealed {
    /// The watch to create, and how many bytes of each key its batches drop (its namespace).
    pub trait Sealed {
        fn into_parts(self) -> (super::Watch, usize);
    }
}

impl sealed::Sealed for Watch {
    fn into_parts(self) -> (Watch, usize) {
        (self, 0)
    }
}

impl GroupWatch for Watch {}

impl futures_core::Stream for WatchGroup {
    type Item = (u64, Result<WatchBatch>);

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().poll_item(cx)
    }
}
