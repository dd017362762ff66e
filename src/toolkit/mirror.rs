//! Mirror: a local copy of a key prefix, kept in sync (Go's `mirror` package's job).

use std::collections::BTreeMap;
use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use tokio::sync::watch;

use super::{ToolkitError, ToolkitResult, backoff};
use crate::client::Client;
use crate::error::{Error, ErrorKind};
use crate::types::{IntoBytes, prefix_range_end};
use crate::watch::EventKind;

/// The default page size of the mirror's base snapshot.
const DEFAULT_PAGE: i64 = 1000;

impl Client {
    /// Mirror every key under `prefix` into a local map; await the builder for a [`Mirror`].
    pub fn mirror(&self, prefix: impl IntoBytes) -> MirrorBuilder {
        MirrorBuilder {
            client: self.clone(),
            prefix: prefix.into_bytes(),
            page: DEFAULT_PAGE,
        }
    }
}

/// Configures a [`Mirror`] ([`Client::mirror`]); await it.
#[must_use = "a request does nothing until it is awaited"]
#[derive(Debug, Clone)]
pub struct MirrorBuilder {
    client: Client,
    prefix: Bytes,
    page: i64,
}

impl MirrorBuilder {
    /// Keys per page of the base snapshot (default 1000; at least 1).
    pub fn page(mut self, keys: i64) -> Self {
        self.page = keys.max(1);
        self
    }

    async fn run(self) -> ToolkitResult<Mirror> {
        let state = Arc::new(RwLock::new(MirrorState::default()));
        let revision = base(&self.client, &self.prefix, self.page, &state).await?;
        let (tx, rx) = watch::channel(Progress {
            revision,
            error: None,
        });
        let task = MirrorTask {
            client: self.client.clone(),
            prefix: self.prefix,
            page: self.page,
            state: state.clone(),
            tx,
        };
        self.client.shared().spawn(task.run(revision));
        Ok(Mirror { state, rx })
    }
}

impl IntoFuture for MirrorBuilder {
    type Output = ToolkitResult<Mirror>;
    type IntoFuture = Pin<Box<dyn Future<Output = Self::Output> + Send + 'static>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.run())
    }
}

#[derive(Debug, Default)]
struct MirrorState {
    map: BTreeMap<Bytes, Bytes>,
    /// The revision `map` reflects (kept with it, under the same lock).
    revision: i64,
}

#[derive(Debug, Clone)]
struct Progress {
    revision: i64,
    error: Option<Arc<Error>>,
}

/// A local copy of every key under a prefix: a base snapshot read at one revision (in pages,
/// all at that revision), then every change from the next revision on, applied in order.
/// After a compaction overtook the watch it re-reads the base. Cheap to clone; the
/// background task ends when the last clone is dropped.
#[derive(Debug, Clone)]
pub struct Mirror {
    state: Arc<RwLock<MirrorState>>,
    rx: watch::Receiver<Progress>,
}

impl Mirror {
    /// The value of `key`, if present.
    pub fn get(&self, key: impl AsRef<[u8]>) -> Option<Bytes> {
        self.read(|s| s.map.get(key.as_ref()).cloned())
    }

    /// How many keys the mirror holds.
    pub fn len(&self) -> usize {
        self.read(|s| s.map.len())
    }

    /// Whether the mirror holds no key.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A copy of the map and the revision it reflects (taken together, consistently).
    pub fn snapshot(&self) -> (BTreeMap<Bytes, Bytes>, i64) {
        let guard = match self.state.read() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        (guard.map.clone(), guard.revision)
    }

    /// The store revision the mirror reflects.
    pub fn revision(&self) -> i64 {
        self.rx.borrow().revision
    }

    /// The last watch error while the mirror is not following changes (it retries on its
    /// own); `None` again once its watch is back.
    pub fn error(&self) -> Option<ToolkitError> {
        self.rx
            .borrow()
            .error
            .as_ref()
            .map(|e| ToolkitError::Etcd(e.summary()))
    }

    /// Wait until the mirror reflects revision `revision` or later. Only revisions that
    /// touched the prefix advance the mirror (plus the base read): to wait for a revision of
    /// another key, use one this prefix saw.
    pub async fn wait_revision(&self, revision: i64) -> ToolkitResult<()> {
        let mut rx = self.rx.clone();
        rx.wait_for(|p| p.revision >= revision)
            .await
            .map(|_| ())
            .map_err(|_| {
                ToolkitError::Etcd(Error::new(ErrorKind::Closed, "the mirror has stopped"))
            })
    }

    fn read<R>(&self, f: impl FnOnce(&MirrorState) -> R) -> R {
        match self.state.read() {
            Ok(g) => f(&g),
            Err(p) => f(&p.into_inner()),
        }
    }
}

/// Read the base snapshot into `state` (replacing it); returns its revision.
async fn base(
    client: &Client,
    prefix: &Bytes,
    page: i64,
    state: &RwLock<MirrorState>,
) -> ToolkitResult<i64> {
    let end = prefix_range_end(prefix);
    let kv = client.kv();
    let mut map = BTreeMap::new();
    // An empty prefix is every key (Go's convention): from the smallest key on.
    let mut from = if prefix.is_empty() {
        Bytes::from_static(b"\0")
    } else {
        prefix.clone()
    };
    let mut revision = 0;
    loop {
        let mut get = kv.get(from.clone()).range(end.clone()).limit(page);
        if revision > 0 {
            get = get.revision(revision);
        }
        let resp = get.await?;
        if revision == 0 {
            revision = resp.header.revision;
        }
        let last = resp.kvs.last().map(|kv| kv.key().clone());
        for item in resp.kvs {
            let (k, v) = item.into_key_value();
            map.insert(k, v);
        }
        match last {
            Some(last) if resp.more => {
                let mut next = last.to_vec();
                next.push(0);
                from = Bytes::from(next);
            }
            _ => break,
        }
    }
    let mut g = match state.write() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    };
    g.map = map;
    g.revision = revision;
    Ok(revision)
}

struct MirrorTask {
    client: Client,
    prefix: Bytes,
    page: i64,
    state: Arc<RwLock<MirrorState>>,
    tx: watch::Sender<Progress>,
}

impl MirrorTask {
    async fn run(self, mut revision: i64) {
        let mut attempt = 0u32;
        loop {
            let watch = self
                .client
                .watch(self.prefix.clone())
                .prefix()
                .start_revision(revision + 1);
            let mut watcher = tokio::select! {
                _ = self.tx.closed() => return,
                w = watch.into_future() => match w {
                    Ok(w) => {
                        // After an error, ask for a progress notification: etcd answers it
                        // once the watcher is synced (not when it starts below the compacted
                        // revision, which is reported instead), and any batch shows that the
                        // watch is back, also on a quiet prefix.
                        if self.tx.borrow().error.is_some() {
                            let _ = w.request_progress();
                        }
                        w
                    }
                    Err(e) => {
                        if !self.retry(e, &mut attempt).await {
                            return;
                        }
                        continue;
                    }
                },
            };
            loop {
                let item = tokio::select! {
                    _ = self.tx.closed() => return,
                    item = watcher.next() => item,
                };
                match item {
                    None => break,
                    Some(Ok(batch)) => {
                        attempt = 0;
                        if batch.events().is_empty() {
                            // The watch is back: an earlier error no longer holds.
                            self.tx.send_if_modified(|p| p.error.take().is_some());
                            continue;
                        }
                        let mut g = match self.state.write() {
                            Ok(g) => g,
                            Err(p) => p.into_inner(),
                        };
                        for ev in batch.events() {
                            match ev.kind {
                                EventKind::Put => {
                                    g.map.insert(ev.kv.key().clone(), ev.kv.value().clone());
                                }
                                EventKind::Delete => {
                                    g.map.remove(ev.kv.key());
                                }
                            }
                            revision = revision.max(ev.kv.mod_revision());
                        }
                        g.revision = revision;
                        self.tx.send_modify(|p| {
                            p.revision = revision;
                            p.error = None;
                        });
                        drop(g);
                    }
                    Some(Err(e)) if e.is_compacted() => {
                        // Changes were compacted away: read the base again.
                        loop {
                            let state = &self.state;
                            let r = tokio::select! {
                                _ = self.tx.closed() => return,
                                r = base(&self.client, &self.prefix, self.page, state) => r,
                            };
                            match r {
                                Ok(rev) => {
                                    revision = rev;
                                    self.tx.send_modify(|p| {
                                        p.revision = rev;
                                        p.error = None;
                                    });
                                    break;
                                }
                                Err(ToolkitError::Etcd(e)) => {
                                    if !self.retry(e, &mut attempt).await {
                                        return;
                                    }
                                }
                                Err(_) => return,
                            }
                        }
                        break;
                    }
                    Some(Err(e)) => {
                        if !self.retry(e, &mut attempt).await {
                            return;
                        }
                        break;
                    }
                }
            }
        }
    }

    /// Record `e`, back off; false when the mirror should stop (client closed, handles gone).
    async fn retry(&self, e: Error, attempt: &mut u32) -> bool {
        if e.kind() == ErrorKind::Closed || self.client.shared().is_closed() {
            let e = Arc::new(e);
            self.tx.send_modify(|p| p.error = Some(e));
            return false;
        }
        let e = Arc::new(e);
        self.tx.send_modify(|p| p.error = Some(e));
        let wait = backoff(*attempt);
        *attempt = attempt.saturating_add(1);
        tokio::select! {
            _ = self.tx.closed() => false,
            _ = tokio::time::sleep(wait) => true,
        }
    }
}
