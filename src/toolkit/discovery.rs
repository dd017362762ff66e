//! Discovery: snapshots, change streams and a live cache of a service's instances.

use std::collections::{BTreeMap, VecDeque};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::sync::watch;

use super::registry::ServiceInfo;
use super::{Toolkit, ToolkitError, ToolkitResult};
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
    pub async fn watch_service(&self, name: &str) -> ToolkitResult<ServiceWatch> {
        let (known, revision) = self.snapshot(name).await?;
        let prefix = self.section_key("services", name)?;
        let watcher = self
            .client
            .watch(prefix.clone())
            .prefix()
            .start_revision(revision + 1)
            .await?;
        let pending = known
            .values()
            .map(|i| ServiceEvent::Added(i.clone()))
            .collect();
        Ok(ServiceWatch {
            prefix,
            watcher,
            known,
            pending,
            revision,
            done: false,
        })
    }

    /// A live map of service `name`'s instances, kept up to date by a background task that
    /// ends when the last clone of the cache is dropped. Populated when this returns.
    pub async fn service_cache(&self, name: &str) -> ToolkitResult<ServiceCache> {
        let mut w = self.watch_service(name).await?;
        w.pending.clear();
        let (tx, rx) = watch::channel(CacheState {
            instances: Arc::new(w.known.clone()),
            revision: w.revision,
            error: None,
        });
        self.client.shared().spawn(async move {
            loop {
                let item = tokio::select! {
                    _ = tx.closed() => return,
                    item = w.next() => item,
                };
                match item {
                    None => return,
                    Some(Ok(_)) => {
                        let instances = Arc::new(w.known.clone());
                        let revision = w.revision;
                        tx.send_modify(|s| {
                            s.instances = instances;
                            s.revision = revision;
                        });
                    }
                    Some(Err(e)) => {
                        let e = Arc::new(e);
                        tx.send_modify(|s| s.error = Some(e));
                    }
                }
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
/// It ends after a terminal watch error (e.g. compaction), which it yields first.
#[derive(Debug)]
pub struct ServiceWatch {
    prefix: String,
    watcher: Watcher,
    known: BTreeMap<String, ServiceInfo>,
    pending: VecDeque<ServiceEvent>,
    revision: i64,
    done: bool,
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
            match Pin::new(&mut self.watcher).poll_next(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    self.done = true;
                    return Poll::Ready(None);
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
                    if !batch.is_progress_notify() {
                        self.revision = self.revision.max(batch.revision());
                    }
                }
            }
        }
    }
}

impl futures_core::Stream for ServiceWatch {
    type Item = ToolkitResult<ServiceEvent>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().poll_event(cx)
    }
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

    /// The error that stopped the cache's watch, if any (the map then stays as it was).
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
