//! [`Session`]: a lease kept alive by the client's lease keeper, shared by recipes.

use std::future::{Future, IntoFuture};
use std::sync::{Arc, Mutex as StdMutex};

use bytes::Bytes;

use tokio::sync::watch;

use crate::client::Client;
use crate::error::{Error, ErrorKind, Result};
use crate::kv::BoxFuture;
use crate::lease::{KeptLease, LeaseLost, LeaseStatus};

/// The TTL in seconds of a session when [`NewSession::ttl`] is not given (Go's default).
pub const DEFAULT_SESSION_TTL: i64 = 60;

/// A lease kept alive by the client's lease keeper, for the recipes built on it
/// ([`Mutex`](crate::Mutex), [`Election`](crate::Election)).
///
/// A session is a cheap, cloneable handle: every clone shares one lease, so many recipes can
/// share one session. The lease is kept for as long as a clone lives (or until
/// [`orphan`](Self::orphan) / [`close`](Self::close)); when the last clone is dropped the
/// keeper stops refreshing it and the server expires it after its TTL, deleting every key the
/// recipes attached to it.
///
/// ```no_run
/// # async fn demo(client: etcdv3::Client) -> etcdv3::Result<()> {
/// use etcdv3::Session;
/// let session = Session::new(&client).ttl(10).await?;
/// tokio::select! {
///     reason = session.done() => eprintln!("session lost: {reason:?}"),
///     _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
/// }
/// session.close().await?; // revoke: every key of the session is deleted now
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Session {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    id: i64,
    ttl: i64,
    kept: StdMutex<Option<KeptLease>>,
    status: watch::Receiver<LeaseStatus>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("lease_id", &self.inner.id)
            .field("ttl", &self.inner.ttl)
            .field("lost", &self.lost_reason())
            .finish()
    }
}

impl Session {
    /// Start a session on `client`: await the returned builder. By default a new lease with a
    /// TTL of [`DEFAULT_SESSION_TTL`] seconds is granted; see [`NewSession::ttl`] and
    /// [`NewSession::lease`].
    // Returns a builder that is awaited for `Self` (the crate's request-builder style).
    #[allow(clippy::new_ret_no_self)]
    pub fn new(client: &Client) -> NewSession {
        NewSession {
            client: client.clone(),
            ttl: DEFAULT_SESSION_TTL,
            lease: None,
        }
    }

    /// The gate of recipe key `key` (absolute): see `Client::recipe_gate` (shared by the
    /// client's sessions, since two sessions on one lease write the same keys).
    pub(crate) fn gate(&self, key: &Bytes) -> Arc<tokio::sync::Mutex<()>> {
        self.inner.client.recipe_gate(key)
    }

    /// The session's lease ID.
    pub fn lease_id(&self) -> i64 {
        self.inner.id
    }

    /// The TTL in seconds the session was created with (or the server granted).
    pub fn ttl(&self) -> i64 {
        self.inner.ttl
    }

    /// The client the session was created with.
    pub fn client(&self) -> &Client {
        &self.inner.client
    }

    /// Resolves when the session's lease is lost (it expired, was revoked, or a refresh was
    /// not acknowledged before the lease's deadline), with the reason; also, with
    /// [`LeaseLost::Closed`], once the session is orphaned or closed or the client is closed.
    /// It does not borrow the session.
    pub fn done(&self) -> impl Future<Output = LeaseLost> + Send + 'static {
        let mut rx = self.inner.status.clone();
        async move {
            let lost = rx
                .wait_for(|s| s.lost.is_some())
                .await
                .ok()
                .and_then(|s| s.lost);
            lost.or_else(|| rx.borrow().lost)
                .unwrap_or(LeaseLost::Closed)
        }
    }

    /// Whether the session's lease is lost (or no longer kept), and why.
    pub fn lost_reason(&self) -> Option<LeaseLost> {
        if let Some(reason) = self.inner.status.borrow().lost {
            return Some(reason);
        }
        let kept = self.inner.kept.lock().unwrap_or_else(|p| p.into_inner());
        if kept.is_none() || self.inner.status.has_changed().is_err() {
            return Some(LeaseLost::Closed);
        }
        None
    }

    /// Whether the session is still alive (its lease kept and not lost).
    pub fn is_alive(&self) -> bool {
        self.lost_reason().is_none()
    }

    /// Stop keeping the lease alive without revoking it: the lease (and the keys attached to
    /// it) lives on until its TTL runs out, e.g. for another process to take it over with
    /// [`NewSession::lease`]. Affects every clone. [`done`](Self::done) then resolves with
    /// [`LeaseLost::Closed`] (unless another handle of this client keeps the same lease).
    pub fn orphan(&self) {
        let kept = self
            .inner
            .kept
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        drop(kept);
    }

    /// Revoke the lease now: every key attached to it (held locks, election keys) is deleted
    /// at once. Affects every clone; [`done`](Self::done) resolves with
    /// [`LeaseLost::Revoked`].
    pub async fn close(&self) -> Result<()> {
        let kept = self
            .inner
            .kept
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let result = match &kept {
            Some(k) => k.revoke().await.map(drop),
            None => self
                .inner
                .client
                .lease()
                .revoke(self.inner.id)
                .await
                .map(drop),
        };
        match result {
            Ok(()) => Ok(()),
            // Already gone: what close wanted.
            Err(e) if e.kind() == ErrorKind::LeaseNotFound => Ok(()),
            Err(e) => {
                // Keep keeping it: the caller may retry.
                if let Some(k) = kept {
                    let mut slot = self.inner.kept.lock().unwrap_or_else(|p| p.into_inner());
                    if slot.is_none() {
                        *slot = Some(k);
                    }
                }
                Err(e)
            }
        }
    }
}

pub(crate) fn session_expired(id: i64, reason: LeaseLost) -> Error {
    Error::new(
        ErrorKind::SessionExpired,
        format!("the session's lease {id:x} is gone ({reason:?})"),
    )
}

/// A request to start a [`Session`]; await it.
#[must_use = "a request does nothing until it is awaited"]
#[derive(Debug, Clone)]
pub struct NewSession {
    client: Client,
    ttl: i64,
    lease: Option<i64>,
}

impl NewSession {
    /// The TTL in seconds of the new lease (default [`DEFAULT_SESSION_TTL`]). A session whose
    /// client is cut off loses its keys (locks, leadership) about this long after the last
    /// acknowledged refresh.
    pub fn ttl(mut self, ttl: i64) -> Self {
        self.ttl = ttl;
        self
    }

    /// Use the existing lease `id` instead of granting a new one (it is kept alive from now
    /// on; a lease that does not exist fails with [`ErrorKind::LeaseNotFound`]).
    pub fn lease(mut self, id: i64) -> Self {
        self.lease = Some(id);
        self
    }

    async fn run(self) -> Result<Session> {
        if self.lease.is_none() && self.ttl <= 0 {
            return Err(Error::invalid_argument("session TTL must be positive"));
        }
        let lease = self.client.lease();
        let kept = match self.lease {
            Some(id) => lease.keep_alive(id).await?,
            None => lease.grant(self.ttl).keep_alive().await?,
        };
        let status = kept.watch();
        Ok(Session {
            inner: Arc::new(Inner {
                client: self.client,
                id: kept.id(),
                ttl: kept.ttl(),
                kept: StdMutex::new(Some(kept)),
                status,
            }),
        })
    }
}

impl IntoFuture for NewSession {
    type Output = Result<Session>;
    type IntoFuture = BoxFuture<Result<Session>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.run())
    }
}
