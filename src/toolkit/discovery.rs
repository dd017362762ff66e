//! Discovery: snapshots, change streams and a live cache of a service's instances.

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::watch;

use super::registry::ServiceInfo;
use super::{Toolkit, ToolkitError, ToolkitResult};
use crate::error::ErrorKind;
use crate::types::KeyValue;
use crate::watch::{EventKind, Watcher};

impl Toolkit {
    /// The instances of service `name` registered now, ordered by id. Records that are not
    /// valid [`ServiceInfo`] JSON are skipped (and logged).
    pub async fn discover(&self, name: &str) -> ToolkitResult<Vec<ServiceInfo>> {
        let (map, _) = self.snapshot(name).await?;
        Ok(map.into_values().collect())
    }

    /// A stream of the changes to service `name`'s instances: first one
    /// [`ServiceEvent::Added`] for every instance registered now (a snapshot at revision R),
    /// then every change from revision R + 1 on. The watch resumes exactly where it was after
    /// a reconnect, so no change is missed. A lease expiry shows as
    /// [`ServiceEvent::Removed`] like a deregistration.
    ///
    /// Should the revision to resume from have been compacted meanwhile (a reconnect after a
    /// quiet spell), the stream reads the instances again and yields the difference (what was
    /// added, modified or removed since, each instance once), then goes on from there.
    pub async fn watch_service(&self, name: &str) -> ToolkitResult<ServiceWatch> {
        let (known, revision, watcher) = self.list_and_watch(name).await?;
        let pending = known
            .values()
            .map(|i| ServiceEvent::Added(i.clone()))
            .collect();
        Ok(ServiceWatch {
            toolkit: self.clone(),
            name: name.to_owned(),
            prefix: self.section_key("services", name)?,
            watcher,
            known,
            pending,
            revision,
            relist: None,
            relist_failures: 0,
            done: false,
        })
    }

    /// The instances now, their revision, and a watch from the next revision on.
    async fn list_and_watch(
        &self,
        name: &str,
    ) -> ToolkitResult<(BTreeMap<String, ServiceInfo>, i64, Watcher)> {
        let (known, revision) = self.snapshot(name).await?;
        let prefix = self.section_key("services", name)?;
        let watcher = self
            .client
            .watch(prefix)
            .prefix()
            .start_revision(revision + 1)
            .await?;
        Ok((known, revision, watcher))
    }

    /// A live map of service `name`'s instances, kept up to date by a background task that
    /// ends when the last clone of the cache is dropped. Populated when this returns.
    ///
    /// Should its watch fail for good (not a compaction, which it handles by reading the
    /// instances again), the cache keeps the last map, reports the error
    /// ([`ServiceCache::error`]) and starts over (a new read and watch) with a growing
    /// back-off, until it succeeds or the client is closed.
    pub async fn service_cache(&self, name: &str) -> ToolkitResult<ServiceCache> {
        let mut w = self.watch_service(name).await?;
        w.pending.clear();
        let (tx, rx) = watch::channel(CacheState {
            instances: Arc::new(w.known.clone()),
            revision: w.revision,
            error: None,
        });
        let (toolkit, name) = (self.clone(), name.to_owned());
        self.client.shared().spawn(async move {
            loop {
                let item = tokio::select! {
                    _ = tx.closed() => return,
                    item = w.next() => item,
                };
                let err = match item {
                    Some(Ok(_)) => {
                        publish(&tx, &w, false);
                        continue;
                    }
                    Some(Err(e)) => e,
                    // Ends only after an error item.
                    None => return,
                };
                let mut failures = 0u32;
                let mut last = err;
                w = loop {
                    if matches!(&last, ToolkitError::Etcd(e) if e.kind() == ErrorKind::Closed) {
                        tx.send_modify(|s| s.error = Some(Arc::new(last)));
                        return;
                    }
                    tx.send_modify(|s| s.error = Some(Arc::new(last)));
                    failures = failures.saturating_add(1);
                    let pause = Duration::from_millis(100u64 << failures.min(6));
                    tokio::select! {
                        _ = tx.closed() => return,
                        () = tokio::time::sleep(crate::balancer::jitter(pause)) => {}
                    }
                    let fresh = tokio::select! {
                        _ = tx.closed() => return,
                        fresh = toolkit.watch_service(&name) => fresh,
                    };
                    match fresh {
                        Ok(mut fresh) => {
                            fresh.pending.clear();
                            break fresh;
                        }
                        Err(e) => last = e,
                    }
                };
                publish(&tx, &w, true);
            }
        });
        Ok(ServiceCache { rx })
    }

    async fn snapshot(&self, name: &str) -> ToolkitResult<(BTreeMap<String, ServiceInfo>, i64)> {
        let prefix = self.section_key("services", name)?;
        let resp = self.client.kv().get(prefix.clone()).prefix().await?;
        let mut map = BTreeMap::new();
        for kv in &resp.kvs {
            if let Some((id, info)) = parse(&prefix, kv) {
                map.insert(id, info);
            }
        }
        Ok((map, resp.header.revision))
    }
}

fn id_of(prefix: &str, key: &[u8]) -> Option<String> {
    let rest = key.strip_prefix(prefix.as_bytes())?;
    let id = std::str::from_utf8(rest).ok()?;
    if id.is_empty() || id.contains('/') {
        return None;
    }
    Some(id.to_owned())
}

fn parse(prefix: &str, kv: &KeyValue) -> Option<(String, ServiceInfo)> {
    let id = id_of(prefix, kv.key())?;
    match serde_json::from_slice::<ServiceInfo>(kv.value()) {
        Ok(info) => Some((id, info)),
        Err(e) => {
            tracing::warn!(key = %String::from_utf8_lossy(kv.key()), error = %e, "skipping a service record that is not valid JSON");
            None
        }
    }
}

/// A change to a service's instances, from [`Toolkit::watch_service`].
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServiceEvent {
    /// A new instance (or one present in the initial snapshot).
    Added(ServiceInfo),
    /// An instance's record was rewritten (e.g. new metadata, or re-registered on a new
    /// lease).
    Modified(ServiceInfo),
    /// An instance was deregistered, or its lease expired. Carries the last known record.
    Removed(ServiceInfo),
}

impl ServiceEvent {
    /// The instance the event is about.
    pub fn info(&self) -> &ServiceInfo {
        match self {
            ServiceEvent::Added(i) | ServiceEvent::Modified(i) | ServiceEvent::Removed(i) => i,
        }
    }
}

/// The stream of [`ServiceEvent`]s of one service ([`Toolkit::watch_service`]); also readable
/// with [`next`](Self::next). No background task: the events are produced as it is polled.
/// A compacted resume point is handled by reading the instances again (see
/// [`Toolkit::watch_service`]); should that read fail for a passing reason (the cluster out
/// of reach, no leader), the failure is yielded as an error item and the read retried with
/// a growing back-off. The stream ends after any other terminal watch error (e.g. permission
/// denied, a closed client), which it yields first.
pub struct ServiceWatch {
    toolkit: Toolkit,
    name: String,
    prefix: String,
    watcher: Watcher,
    known: BTreeMap<String, ServiceInfo>,
    pending: VecDeque<ServiceEvent>,
    revision: i64,
    /// Reading the instances again after a compaction.
    relist: Option<Relist>,
    /// Failed tries of that read in a row.
    relist_failures: u32,
    done: bool,
}

type Relist = Pin<
    Box<dyn Future<Output = ToolkitResult<(BTreeMap<String, ServiceInfo>, i64, Watcher)>> + Send>,
>;

impl std::fmt::Debug for ServiceWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceWatch")
            .field("name", &self.name)
            .field("instances", &self.known.len())
            .field("revision", &self.revision)
            .finish_non_exhaustive()
    }
}

impl ServiceWatch {
    /// The next event, or `None` once the stream has ended.
    pub async fn next(&mut self) -> Option<ToolkitResult<ServiceEvent>> {
        std::future::poll_fn(|cx| self.poll_event(cx)).await
    }

    /// The instances as of the events yielded so far (including the snapshot).
    pub fn instances(&self) -> Vec<ServiceInfo> {
        self.known.values().cloned().collect()
    }

    /// The store revision the instances reflect.
    pub fn revision(&self) -> i64 {
        self.revision
    }

    fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Option<ToolkitResult<ServiceEvent>>> {
        use futures_core::Stream;
        loop {
            if let Some(ev) = self.pending.pop_front() {
                return Poll::Ready(Some(Ok(ev)));
            }
            if self.done {
                return Poll::Ready(None);
            }
            if let Some(relist) = &mut self.relist {
                match relist.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Err(ToolkitError::Etcd(e)))
                        if e.is_retryable() || e.is_deadline() =>
                    {
                        // A passing failure (the cluster out of reach, no leader): reported,
                        // and the read retried after a growing back-off.
                        self.relist_failures = self.relist_failures.saturating_add(1);
                        let pause = crate::balancer::jitter(Duration::from_millis(
                            100u64 << self.relist_failures.min(6),
                        ));
                        let (toolkit, name) = (self.toolkit.clone(), self.name.clone());
                        self.relist = Some(Box::pin(async move {
                            tokio::time::sleep(pause).await;
                            toolkit.list_and_watch(&name).await
                        }));
                        return Poll::Ready(Some(Err(ToolkitError::Etcd(e))));
                    }
                    Poll::Ready(Err(e)) => {
                        self.relist = None;
                        self.done = true;
                        return Poll::Ready(Some(Err(e)));
                    }
                    Poll::Ready(Ok((now, revision, watcher))) => {
                        self.relist = None;
                        self.relist_failures = 0;
                        self.apply_relist(now, revision, watcher);
                        continue;
                    }
                }
            }
            match Pin::new(&mut self.watcher).poll_next(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    self.done = true;
                    return Poll::Ready(None);
                }
                Poll::Ready(Some(Err(e))) if e.kind() == ErrorKind::Compacted => {
                    // Changes since the resume point are gone from the history: read the
                    // instances again and report the difference.
                    let (toolkit, name) = (self.toolkit.clone(), self.name.clone());
                    self.relist =
                        Some(Box::pin(async move { toolkit.list_and_watch(&name).await }));
                }
                Poll::Ready(Some(Err(e))) => {
                    self.done = true;
                    return Poll::Ready(Some(Err(ToolkitError::Etcd(e))));
                }
                Poll::Ready(Some(Ok(batch))) => {
                    for ev in batch.events() {
                        self.revision = self.revision.max(ev.kv.mod_revision());
                        match ev.kind {
                            EventKind::Put => {
                                let Some((id, info)) = parse(&self.prefix, &ev.kv) else {
                                    // No longer a valid record: the instance is gone, as a
                                    // read of the instances would say too.
                                    if let Some(id) = id_of(&self.prefix, ev.kv.key())
                                        && let Some(old) = self.known.remove(&id)
                                    {
                                        self.pending.push_back(ServiceEvent::Removed(old));
                                    }
                                    continue;
                                };
                                let event = match self.known.insert(id, info.clone()) {
                                    Some(_) => ServiceEvent::Modified(info),
                                    None => ServiceEvent::Added(info),
                                };
                                self.pending.push_back(event);
                            }
                            EventKind::Delete => {
                                let Some(id) = id_of(&self.prefix, ev.kv.key()) else {
                                    continue;
                                };
                                if let Some(info) = self.known.remove(&id) {
                                    self.pending.push_back(ServiceEvent::Removed(info));
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

impl ServiceWatch {
    /// Take the instances read again after a compaction: the difference with the known ones
    /// becomes the pending events (in id order), and the watch goes on from the new read.
    fn apply_relist(&mut self, now: BTreeMap<String, ServiceInfo>, revision: i64, w: Watcher) {
        for (id, old) in &self.known {
            if !now.contains_key(id) {
                self.pending.push_back(ServiceEvent::Removed(old.clone()));
            }
        }
        for (id, info) in &now {
            match self.known.get(id) {
                None => self.pending.push_back(ServiceEvent::Added(info.clone())),
                Some(old) if old != info => {
                    self.pending.push_back(ServiceEvent::Modified(info.clone()));
                }
                Some(_) => {}
            }
        }
        self.known = now;
        self.revision = self.revision.max(revision);
        self.watcher = w;
    }
}

impl futures_core::Stream for ServiceWatch {
    type Item = ToolkitResult<ServiceEvent>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().poll_event(cx)
    }
}

/// Show `w`'s instances in the cache (and clear its error when `recovered`).
fn publish(tx: &watch::Sender<CacheState>, w: &ServiceWatch, recovered: bool) {
    let instances = Arc::new(w.known.clone());
    let revision = w.revision;
    tx.send_modify(|s| {
        s.instances = instances;
        s.revision = revision;
        if recovered {
            s.error = None;
        }
    });
}

#[derive(Debug)]
struct CacheState {
    instances: Arc<BTreeMap<String, ServiceInfo>>,
    revision: i64,
    error: Option<Arc<ToolkitError>>,
}

/// A live map of one service's instances ([`Toolkit::service_cache`]). Cheap to clone; the
/// background task ends when the last clone is dropped.
#[derive(Debug, Clone)]
pub struct ServiceCache {
    rx: watch::Receiver<CacheState>,
}

impl ServiceCache {
    /// The instances now, ordered by id.
    pub fn instances(&self) -> Vec<ServiceInfo> {
        self.rx.borrow().instances.values().cloned().collect()
    }

    /// The instance `id`, if registered.
    pub fn get(&self, id: &str) -> Option<ServiceInfo> {
        self.rx.borrow().instances.get(id).cloned()
    }

    /// How many instances are registered.
    pub fn len(&self) -> usize {
        self.rx.borrow().instances.len()
    }

    /// Whether no instance is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The store revision the map reflects.
    pub fn revision(&self) -> i64 {
        self.rx.borrow().revision
    }

    /// The error that interrupted the cache's watch, while it is starting over (the map stays
    /// as it was meanwhile); `None` once it is back.
    pub fn error(&self) -> Option<ToolkitError> {
        self.rx.borrow().error.as_ref().map(|e| e.duplicate())
    }

    /// Wait until the map changes (or the cache stops: then an error). Cancel-safe.
    pub async fn changed(&mut self) -> ToolkitResult<()> {
        self.rx.changed().await.map_err(|_| {
            ToolkitError::Etcd(crate::error::Error::new(
                crate::error::ErrorKind::Closed,
                "the service cache has stopped",
            ))
        })
    }
}
