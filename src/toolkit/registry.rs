//! The service registry: an instance's [`ServiceInfo`] stored as JSON under
//! `<prefix>/services/<name>/<id>` on a kept lease.

use std::collections::BTreeMap;
use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{OnceCell, mpsc, oneshot};

use super::{Toolkit, ToolkitError, ToolkitResult, backoff};
use crate::client::Client;
use crate::error::{Error, ErrorKind};
use crate::lease::{KeptLease, LeaseLost};
use crate::txn::{Compare, CompareOp, Op};

/// The default TTL of a registration's lease.
pub const DEFAULT_SERVICE_TTL: Duration = Duration::from_secs(15);

/// The smallest TTL a registration accepts.
pub const MIN_SERVICE_TTL: Duration = Duration::from_secs(1);

/// One instance of a service, as stored (JSON) in the registry.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceInfo {
    /// The service's name: groups the instances.
    pub name: String,
    /// The instance's id, unique within the name.
    pub id: String,
    /// Where to reach the instance (typically `host:port`).
    pub address: String,
    /// Free-form tags (version, region, ...).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
}

impl ServiceInfo {
    /// An instance without metadata.
    pub fn new(name: impl Into<String>, id: impl Into<String>, address: impl Into<String>) -> Self {
        ServiceInfo {
            name: name.into(),
            id: id.into(),
            address: address.into(),
            metadata: BTreeMap::new(),
        }
    }

    /// Add (or replace) one metadata entry.
    pub fn metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }

    /// Check that name, id and address are set and that name and id are usable key segments.
    pub fn validate(&self) -> ToolkitResult<()> {
        if self.name.is_empty() {
            return Err(ToolkitError::EmptyName);
        }
        if self.id.is_empty() {
            return Err(ToolkitError::EmptyId);
        }
        if self.address.is_empty() {
            return Err(ToolkitError::EmptyAddress);
        }
        super::validate_name(&self.name)?;
        super::validate_name(&self.id)?;
        Ok(())
    }

    pub(crate) fn to_json(&self) -> ToolkitResult<String> {
        serde_json::to_string(self).map_err(|e| ToolkitError::Encode {
            reason: e.to_string(),
        })
    }
}

impl Toolkit {
    /// Register a service instance; await the builder for a [`Registration`]. The lease's
    /// TTL is [`DEFAULT_SERVICE_TTL`] unless set with [`Register::ttl`].
    pub fn register(&self, info: ServiceInfo) -> Register {
        Register {
            tk: self.clone(),
            info,
            ttl: DEFAULT_SERVICE_TTL,
        }
    }

    /// The etcd key of an instance: `<prefix>/services/<name>/<id>`.
    pub fn service_key(&self, name: &str, id: &str) -> ToolkitResult<String> {
        super::validate_name(id)?;
        Ok(format!("{}{id}", self.section_key("services", name)?))
    }
}

/// A registration request ([`Toolkit::register`]); await it.
#[must_use = "a request does nothing until it is awaited"]
#[derive(Debug, Clone)]
pub struct Register {
    tk: Toolkit,
    info: ServiceInfo,
    ttl: Duration,
}

impl Register {
    /// The lease TTL (at least [`MIN_SERVICE_TTL`]; rounded up to whole seconds). The instance
    /// disappears from the registry at most this long after its process stops refreshing.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    async fn run(self) -> ToolkitResult<Registration> {
        self.tk.validate()?;
        self.info.validate()?;
        if self.ttl < MIN_SERVICE_TTL {
            return Err(ToolkitError::InvalidTtl { ttl: self.ttl });
        }
        let ttl = i64::try_from(self.ttl.as_millis().div_ceil(1000)).unwrap_or(i64::MAX);
        let key = self.tk.service_key(&self.info.name, &self.info.id)?;
        let kept = put_on_new_lease(&self.tk.client, &key, &self.info, ttl).await?;
        let shared = Arc::new(RegShared {
            info: Mutex::new(self.info),
            lease_id: AtomicI64::new(kept.id()),
            subscribers: Mutex::new(Some(Subscribers {
                senders: Vec::new(),
                first: RegistrationEvent::Registered {
                    lease_id: kept.id(),
                },
            })),
        });
        let (cmds, rx) = mpsc::unbounded_channel();
        let task = RegTask {
            client: self.tk.client.clone(),
            key,
            ttl,
            shared: shared.clone(),
            cmds: rx,
        };
        self.tk.client.shared().spawn(task.run(kept));
        Ok(Registration {
            shared,
            cmds,
            deregistered: OnceCell::new(),
            pending: tokio::sync::Mutex::new(None),
        })
    }
}

impl IntoFuture for Register {
    type Output = ToolkitResult<Registration>;
    type IntoFuture = Pin<Box<dyn Future<Output = Self::Output> + Send + 'static>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.run())
    }
}

/// Guarded writes of an update that may fail because another writer changed the record in
/// between, before the update writes unguarded.
const GUARDED_TRIES: usize = 8;

/// Grant a kept lease of `ttl` seconds and put the info on it; revoke it if the put fails.
///
/// A put whose outcome is unknown (its answer lost) may still be applied later, after a
/// newer registration of the same instance: it would then put the record back on this lease,
/// which nobody refreshes, and the record would vanish when the lease expires while the live
/// registration knows nothing of it. So the lease is revoked before the failure is returned,
/// retried until etcd confirms it (or says the lease is gone): from then on etcd refuses the
/// put, wherever it is.
async fn put_on_new_lease(
    client: &Client,
    key: &str,
    info: &ServiceInfo,
    ttl: i64,
) -> ToolkitResult<KeptLease> {
    let json = info.to_json()?;
    let kept = client.lease().grant(ttl).keep_alive().await?;
    if let Err(e) = client.kv().put(key.to_owned(), json).lease(kept.id()).await {
        if e.is_indeterminate() {
            revoke_until_gone(client, &kept).await;
        } else {
            let _ = kept.revoke().await;
        }
        return Err(e.into());
    }
    Ok(kept)
}

/// Revoke `lease`, retrying with back-off until etcd confirms it, says the lease is gone, or
/// the client is closed.
async fn revoke_until_gone(client: &Client, lease: &KeptLease) {
    let mut attempt = 0u32;
    loop {
        match lease.revoke().await {
            Ok(_) => return,
            Err(e) if e.kind() == ErrorKind::LeaseNotFound => return,
            Err(_) if client.shared().is_closed() => return,
            Err(_) => {
                tokio::time::sleep(backoff(attempt)).await;
                attempt = attempt.saturating_add(1);
            }
        }
    }
}

/// What happened to a [`Registration`], from [`Registration::events`].
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistrationEvent {
    /// The instance is registered on `lease_id` (the first event of every events stream).
    Registered {
        /// The lease.
        lease_id: i64,
    },
    /// The lease was lost (expired, revoked elsewhere, or not refreshed in time); the instance
    /// may have disappeared from the registry. Re-registration starts at once.
    Lost {
        /// The lost lease.
        lease_id: i64,
        /// Why.
        reason: LeaseLost,
    },
    /// A re-registration attempt failed; it is retried with back-off.
    RetryFailed {
        /// The error, as text.
        error: String,
    },
    /// The instance is registered again, on a new lease.
    Reregistered {
        /// The new lease.
        lease_id: i64,
    },
    /// The metadata was updated (the stored record was rewritten).
    Updated,
}

struct RegShared {
    info: Mutex<ServiceInfo>,
    lease_id: AtomicI64,
    /// `None` once the task has stopped: the events streams end.
    subscribers: Mutex<Option<Subscribers>>,
}

/// The events streams, and the event a new one starts with (the registration's state).
struct Subscribers {
    senders: Vec<mpsc::UnboundedSender<RegistrationEvent>>,
    /// `Registered` on the current lease, or `Lost` while the instance is being registered
    /// again.
    first: RegistrationEvent,
}

impl RegShared {
    fn emit(&self, ev: RegistrationEvent) {
        if let Ok(mut subs) = self.subscribers.lock()
            && let Some(subs) = subs.as_mut()
        {
            match ev {
                RegistrationEvent::Lost { .. } => subs.first = ev.clone(),
                RegistrationEvent::Reregistered { lease_id } => {
                    subs.first = RegistrationEvent::Registered { lease_id };
                }
                _ => {}
            }
            subs.senders.retain(|s| s.send(ev.clone()).is_ok());
        }
    }
}

enum Cmd {
    Deregister(oneshot::Sender<Result<(), Error>>),
    Update(BTreeMap<String, String>, oneshot::Sender<ToolkitResult<()>>),
}

/// A registered service instance, kept registered by a background task.
///
/// The task refreshes the lease; when the lease is lost (expired during a partition, revoked
/// by another client) it registers the instance again on a new lease, reporting both through
/// [`events`](Self::events). [`deregister`](Self::deregister) revokes the lease, removing the
/// record at once.
///
/// Dropping the handle without deregistering stops the task and the refreshes: the lease is
/// left to expire, so the record disappears within the TTL (as when the process dies).
pub struct Registration {
    shared: Arc<RegShared>,
    cmds: mpsc::UnboundedSender<Cmd>,
    deregistered: OnceCell<Result<(), Error>>,
    /// The answer to the deregistration asked for, while awaited: a call that gave up (a
    /// timeout) leaves it here for the next call.
    pending: tokio::sync::Mutex<Option<oneshot::Receiver<Result<(), Error>>>>,
}

impl std::fmt::Debug for Registration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registration")
            .field("info", &self.info())
            .field("lease_id", &self.lease_id())
            .finish()
    }
}

impl Registration {
    /// The registered info (with the latest metadata).
    pub fn info(&self) -> ServiceInfo {
        match self.shared.info.lock() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// The current lease (it changes on re-registration).
    pub fn lease_id(&self) -> i64 {
        self.shared.lease_id.load(Ordering::SeqCst)
    }

    /// A stream of what happens to the registration, starting with its state:
    /// [`RegistrationEvent::Registered`] for the current lease, or, while a lost lease is
    /// being replaced, the [`RegistrationEvent::Lost`] that started it (then `Reregistered`
    /// follows). It ends when the registration's task stops (after
    /// [`deregister`](Self::deregister), or when the client was closed).
    pub fn events(&self) -> RegistrationEvents {
        let (tx, rx) = mpsc::unbounded_channel();
        // The state is read under the subscribers' lock, which the task holds to announce a
        // change: the stream starts with the state when it joins, and sees every later change.
        let mut subs = self
            .shared
            .subscribers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match subs.as_mut() {
            Some(subs) => {
                let _ = tx.send(subs.first.clone());
                subs.senders.push(tx);
            }
            None => {
                let _ = tx.send(RegistrationEvent::Registered {
                    lease_id: self.lease_id(),
                });
            }
        }
        drop(subs);
        RegistrationEvents { rx }
    }

    /// Replace the metadata and rewrite the stored record (watchers see it Modified).
    ///
    /// The write is guarded by the record's revision, so an earlier update that failed with
    /// an unknown outcome ([`Error::is_indeterminate`]) and reaches etcd late is refused
    /// rather than putting its older metadata back; the newest update stays.
    pub async fn update_metadata(&self, metadata: BTreeMap<String, String>) -> ToolkitResult<()> {
        let (tx, rx) = oneshot::channel();
        self.cmds
            .send(Cmd::Update(metadata, tx))
            .map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }

    /// Revoke the lease (deleting the record) and stop the task. Idempotent: later calls
    /// return the first call's result. If the revoke fails (e.g. no member reachable), the
    /// task stops all the same and the record disappears when the lease expires, within the
    /// TTL. While a lost lease is being replaced, there is no lease to revoke: the task stops
    /// (a lease granted by the interrupted attempt expires within the TTL).
    pub async fn deregister(&self) -> ToolkitResult<()> {
        let r = self
            .deregistered
            .get_or_init(|| async {
                let mut pending = self.pending.lock().await;
                if pending.is_none() {
                    let (tx, rx) = oneshot::channel();
                    self.cmds
                        .send(Cmd::Deregister(tx))
                        .map_err(|_| stopped().summary())?;
                    *pending = Some(rx);
                }
                let Some(rx) = pending.as_mut() else {
                    return Err(stopped().summary());
                };
                rx.await.map_err(|_| stopped().summary())?
            })
            .await;
        match r {
            Ok(()) => Ok(()),
            Err(e) => Err(ToolkitError::Etcd(e.summary())),
        }
    }
}

fn stopped() -> Error {
    Error::new(
        ErrorKind::Closed,
        "the registration task has stopped (the client was closed)",
    )
}

/// The stream of a [`Registration`]'s events ([`Registration::events`]). It ends when the
/// registration's task stops.
#[derive(Debug)]
pub struct RegistrationEvents {
    rx: mpsc::UnboundedReceiver<RegistrationEvent>,
}

impl RegistrationEvents {
    /// The next event, or `None` once the registration has stopped.
    pub async fn next(&mut self) -> Option<RegistrationEvent> {
        self.rx.recv().await
    }
}

impl futures_core::Stream for RegistrationEvents {
    type Item = RegistrationEvent;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().rx.poll_recv(cx)
    }
}

struct RegTask {
    client: Client,
    key: String,
    ttl: i64,
    shared: Arc<RegShared>,
    cmds: mpsc::UnboundedReceiver<Cmd>,
}

impl Drop for RegTask {
    fn drop(&mut self) {
        // The task has stopped: end every events stream.
        if let Ok(mut subs) = self.shared.subscribers.lock() {
            *subs = None;
        }
    }
}

impl RegTask {
    async fn run(mut self, kept: KeptLease) {
        let mut kept = Some(kept);
        let mut attempt = 0u32;
        loop {
            match kept.as_ref().map(|l| (l.id(), l.lost())) {
                Some((lease_id, lost)) => {
                    tokio::select! {
                        cmd = self.cmds.recv() => match cmd {
                            None => return,
                            Some(Cmd::Deregister(reply)) => {
                                let _ = reply.send(self.deregister(kept.take()).await);
                                return;
                            }
                            Some(Cmd::Update(md, reply)) => {
                                let r = self.update(md, Some(lease_id)).await;
                                let _ = reply.send(r);
                            }
                        },
                        reason = lost => {
                            if reason == LeaseLost::Closed && self.client.shared().is_closed() {
                                return;
                            }
                            self.shared.emit(RegistrationEvent::Lost { lease_id, reason });
                            kept = None;
                            attempt = 0;
                        }
                    }
                }
                None => {
                    let info = match self.shared.info.lock() {
                        Ok(g) => g.clone(),
                        Err(p) => p.into_inner().clone(),
                    };
                    let wait = if attempt == 0 {
                        Duration::ZERO
                    } else {
                        backoff(attempt)
                    };
                    let (client, key, ttl) = (&self.client, &self.key, self.ttl);
                    let try_again = async move {
                        tokio::time::sleep(wait).await;
                        put_on_new_lease(client, key, &info, ttl).await
                    };
                    tokio::select! {
                        cmd = self.cmds.recv() => match cmd {
                            None => return,
                            Some(Cmd::Deregister(reply)) => {
                                let _ = reply.send(Ok(()));
                                return;
                            }
                            Some(Cmd::Update(md, reply)) => {
                                let r = self.update(md, None).await;
                                let _ = reply.send(r);
                            }
                        },
                        r = try_again => match r {
                            Ok(new) => {
                                self.shared.lease_id.store(new.id(), Ordering::SeqCst);
                                self.shared.emit(RegistrationEvent::Reregistered {
                                    lease_id: new.id(),
                                });
                                kept = Some(new);
                            }
                            Err(e) => {
                                if self.client.shared().is_closed() {
                                    return;
                                }
                                self.shared.emit(RegistrationEvent::RetryFailed {
                                    error: e.to_string(),
                                });
                                attempt = attempt.saturating_add(1);
                            }
                        },
                    }
                }
            }
        }
    }

    async fn deregister(&self, kept: Option<KeptLease>) -> Result<(), Error> {
        match kept {
            Some(lease) => match lease.revoke().await {
                Ok(_) => Ok(()),
                // Gone already: the record is gone with it.
                Err(e) if e.kind() == ErrorKind::LeaseNotFound => Ok(()),
                Err(e) => Err(e),
            },
            None => Ok(()),
        }
    }

    /// Write the record on `lease`, guarded by its revision as read just before.
    ///
    /// An earlier update whose outcome is unknown (its answer lost) may reach etcd after this
    /// one; it was guarded by an older revision, so etcd then refuses it instead of putting
    /// older info back over the newer. (A guard fails only when the record changed between
    /// the read and the write: another writer. After [`GUARDED_TRIES`] such failures in a
    /// row the record is written unguarded, so that the update is not lost.)
    async fn write_record(&self, json: String, lease: i64) -> Result<(), Error> {
        let kv = self.client.kv();
        for _ in 0..GUARDED_TRIES {
            let seen = kv
                .get(self.key.clone())
                .await?
                .kvs
                .first()
                .map_or(0, |kv| kv.mod_revision());
            let written = kv
                .txn()
                .when([Compare::mod_revision(
                    self.key.clone(),
                    CompareOp::Equal,
                    seen,
                )])
                .and_then([Op::put(self.key.clone(), json.clone()).lease(lease)])
                .await?;
            if written.succeeded {
                return Ok(());
            }
        }
        kv.put(self.key.clone(), json)
            .lease(lease)
            .await
            .map(|_| ())
    }

    async fn update(
        &self,
        metadata: BTreeMap<String, String>,
        lease: Option<i64>,
    ) -> ToolkitResult<()> {
        let info = {
            let mut g = match self.shared.info.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            g.metadata = metadata;
            g.clone()
        };
        // Without a lease the new info is stored by the next re-registration.
        if let Some(id) = lease {
            self.write_record(info.to_json()?, id).await?;
        }
        self.shared.emit(RegistrationEvent::Updated);
        Ok(())
    }
}
