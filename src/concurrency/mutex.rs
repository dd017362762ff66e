//! [`Mutex`]: a distributed lock on a key prefix (Go's `concurrency.Mutex`), with fencing.

use std::future::{Future, IntoFuture};
use std::sync::Mutex as StdMutex;

use bytes::Bytes;
use tokio::sync::oneshot;

use super::{
    Scope, Stop, Won, answer_and_remove, answer_failed_enqueue, lease_gone, lease_key,
    recipe_prefix, session::session_expired, unless, wait_deletes,
};
use crate::concurrency::Session;
use crate::error::{Error, ErrorKind, Result};
use crate::lease::LeaseLost;
use crate::txn::{Compare, CompareOp, Op};
use crate::types::{IntoBytes, ResponseHeader};
use crate::{SortOrder, SortTarget, TxnOpResponse};

/// A distributed lock on a key prefix, held by a [`Session`] (Go's `concurrency.Mutex`).
///
/// Locking puts the key `prefix/<lease ID hex>` (attached to the session's lease) and queues
/// by create revision: the lock is held once every key under the prefix with a lower create
/// revision is gone. Each waiter watches only the key just before it, so an unlock wakes one
/// waiter, not all of them.
///
/// # Fencing
///
/// A lock in a distributed system can be lost while its holder still believes it holds it (a
/// long pause, a partition: the session expires and another process takes the lock). Never
/// rely on holding the lock alone: guard every write it protects with
/// [`is_owner`](Self::is_owner) in the same transaction, so the server refuses the write once
/// the lock key is gone, or pass [`fencing_revision`](Self::fencing_revision) (strictly
/// increasing from holder to holder) to the resource being protected.
///
/// ```no_run
/// # async fn demo(client: etcdv3::Client) -> etcdv3::Result<()> {
/// use etcdv3::{Mutex, Op, Session};
/// let session = Session::new(&client).ttl(10).await?;
/// let mutex = Mutex::new(&session, "/locks/job");
/// mutex.lock().await?;
/// let guarded = client
///     .kv()
///     .txn()
///     .when([mutex.is_owner()])
///     .and_then([Op::put("/job/state", "running")])
///     .await?;
/// assert!(guarded.succeeded, "the lock was lost before the write");
/// mutex.unlock().await?;
/// # Ok(()) }
/// ```
///
/// Two `Mutex` values on the same session and prefix share one key: they are the same lock.
#[derive(Debug)]
pub struct Mutex {
    session: Session,
    scope: Scope,
    /// Absolute `prefix/`.
    pfx: Bytes,
    /// Absolute own key.
    key_full: Bytes,
    /// Own key relative to the namespace.
    key: Bytes,
    /// The create revision of the held lock key, or 0.
    rev: StdMutex<i64>,
}

impl Mutex {
    /// A mutex on `prefix`, held (when locked) by `session`.
    pub fn new(session: &Session, prefix: impl IntoBytes) -> Mutex {
        let scope = Scope::new(session.client().clone(), Bytes::new());
        Mutex::in_scope(session, scope, prefix.into_bytes())
    }

    pub(crate) fn in_scope(session: &Session, scope: Scope, prefix: Bytes) -> Mutex {
        let rel = recipe_prefix(&prefix);
        let key = lease_key(&rel, session.lease_id());
        Mutex {
            session: session.clone(),
            pfx: scope.full(&rel),
            key_full: scope.full(&key),
            key,
            scope,
            rev: StdMutex::new(0),
        }
    }

    /// Wait until the lock is held. Fails with [`ErrorKind::SessionExpired`] when the session
    /// ends while waiting (the wait stops at once, it does not outlive the session), or when
    /// its lease is found gone as the key is put (the lease keeper is told, so the session
    /// usually ends at once too rather than at the keeper's next refresh).
    ///
    /// Dropping the future before it completes gives up the attempt: the key it created is
    /// deleted (by a task that lives only until then), so a cancelled waiter never blocks the
    /// queue.
    pub async fn lock(&self) -> Result<()> {
        self.acquire(false).await
    }

    /// Take the lock if nobody holds it, without waiting: fails at once with
    /// [`ErrorKind::Locked`] when another session holds it, after removing the key it put,
    /// and also (without writing anything) while a `lock()` or `try_lock()` through the same
    /// client and lease is under way on this lock (waiting for it, or removing the key of a
    /// cancelled attempt).
    pub async fn try_lock(&self) -> Result<()> {
        self.acquire(true).await
    }

    async fn acquire(&self, try_only: bool) -> Result<()> {
        let attempt = Attempt {
            scope: self.scope.clone(),
            session: self.session.clone(),
            pfx: self.pfx.clone(),
            key: self.key_full.clone(),
            try_only,
        };
        let (tx, rx) = oneshot::channel();
        self.scope.client.shared().spawn(attempt.run(tx));
        let rev = rx
            .await
            .map_err(|_| Error::new(ErrorKind::Closed, "the lock attempt's task ended"))??
            .take();
        *self.rev.lock().unwrap_or_else(|p| p.into_inner()) = rev;
        Ok(())
    }

    /// Release the lock: delete the key (also when the lock is not held, which cleans up after
    /// an attempt that failed).
    pub async fn unlock(&self) -> Result<()> {
        self.scope.kv().delete(self.key_full.clone()).await?;
        *self.rev.lock().unwrap_or_else(|p| p.into_inner()) = 0;
        Ok(())
    }

    /// This mutex's key (`prefix/<lease ID hex>`; relative to the namespace for a mutex made
    /// by a [`Namespace`](crate::Namespace)).
    pub fn key(&self) -> &Bytes {
        &self.key
    }

    /// The create revision of the lock key while the lock is held (after a successful
    /// [`lock`](Self::lock) or [`try_lock`](Self::try_lock), until [`unlock`](Self::unlock)):
    /// a fencing token, strictly greater than that of every earlier holder.
    pub fn fencing_revision(&self) -> Option<i64> {
        let rev = *self.rev.lock().unwrap_or_else(|p| p.into_inner());
        (rev > 0).then_some(rev)
    }

    /// A transaction compare that holds only while this mutex holds the lock: the lock key
    /// still exists with the create revision it was acquired with. Guard every write the lock
    /// protects with it. When the lock is not held, the compare never holds.
    ///
    /// The key is relative to the namespace (for a namespaced mutex, use it in a transaction
    /// of the same [`Namespace`](crate::Namespace)).
    pub fn is_owner(&self) -> Compare {
        let rev = self.fencing_revision().unwrap_or(-1);
        Compare::create_revision(self.key.clone(), CompareOp::Equal, rev)
    }

    /// Whether this mutex believes it holds the lock (locked, not unlocked, session alive).
    /// Use [`is_owner`](Self::is_owner) to act on it safely.
    pub fn is_locked(&self) -> bool {
        self.fencing_revision().is_some() && self.session.is_alive()
    }

    /// Resolves when the session ends, with the reason: from then on the lock is lost (the
    /// server deletes the key when the lease is gone). Does not borrow the mutex.
    pub fn lost(&self) -> impl Future<Output = LeaseLost> + Send + 'static {
        self.session.done()
    }

    /// The session holding (or waiting for) the lock.
    pub fn session(&self) -> &Session {
        &self.session
    }
}

struct Attempt {
    scope: Scope,
    session: Session,
    pfx: Bytes,
    key: Bytes,
    try_only: bool,
}

impl Attempt {
    /// The spawned task of one `lock()` / `try_lock()`: answers on `tx`, and deletes the key
    /// it created if the caller went away or the attempt failed. Runs behind the key's gate
    /// (an earlier attempt's cleanup finishes first), which the answer carries to the caller.
    async fn run(self, mut tx: oneshot::Sender<Result<Won>>) {
        let gate = self.session.gate(&self.key);
        let gate = if self.try_only {
            // Another attempt on this key through this client's lease is under way (waiting
            // for the lock, or removing its key): the lock is not free for this one, and
            // `try_lock` does not wait for it.
            match gate.try_lock_owned() {
                Ok(g) => g,
                Err(_) => {
                    let _ = tx.send(Err(Error::new(
                        ErrorKind::Locked,
                        "another attempt on this lock through the same lease is under way",
                    )));
                    return;
                }
            }
        } else {
            tokio::select! {
                _ = tx.closed() => return,
                g = gate.lock_owned() => g,
            }
        };
        // Not raced against cancellation: once sent, the transaction's outcome must be known
        // to clean up after it.
        let floor = self.scope.client.shared().max_revision();
        let first = self.enqueue().await;
        let (my_rev, created, owner_rev) = match first {
            Ok(v) => v,
            Err(e) => {
                let maybe_put = e.is_indeterminate();
                answer_failed_enqueue(
                    tx,
                    Err(e),
                    maybe_put,
                    &self.scope,
                    &self.session,
                    &self.key,
                    floor,
                )
                .await;
                return;
            }
        };
        let result = if owner_rev.is_none_or(|o| o == my_rev) {
            Ok(my_rev)
        } else if self.try_only {
            Err(Error::new(
                ErrorKind::Locked,
                "the lock is held by another session",
            ))
        } else {
            let done = self.session.done();
            let id = self.session.lease_id();
            let mut stop: Stop<'_> = std::pin::pin!(async {
                tokio::select! {
                    _ = tx.closed() => Error::new(ErrorKind::Canceled, "lock() was cancelled"),
                    reason = done => session_expired(id, reason),
                }
            });
            self.wait(my_rev, &mut stop).await.map(|()| my_rev)
        };
        match result {
            Ok(rev) => {
                // Should the caller be gone (now, or before it takes the answer), the key it
                // created is deleted when the answer is dropped.
                let cleanup =
                    created.then(|| (self.scope.clone(), self.session.clone(), self.key.clone()));
                let _ = tx.send(Ok(Won::new(rev, cleanup, gate)));
            }
            Err(e) => {
                let rev = created.then_some(my_rev);
                answer_and_remove(tx, Err(e), &self.scope, &self.session, &self.key, rev).await;
                drop(gate);
            }
        }
    }

    /// Put the key if absent; returns (own create revision, created now, owner's create
    /// revision).
    async fn enqueue(&self) -> Result<(i64, bool, Option<i64>)> {
        let lease = self.session.lease_id();
        let owner = Op::get(self.pfx.clone())
            .prefix()
            .sort(SortTarget::Create, SortOrder::Ascend)
            .limit(1);
        let resp = self
            .scope
            .kv()
            .txn()
            .when([Compare::create_revision(
                self.key.clone(),
                CompareOp::Equal,
                0,
            )])
            .and_then([
                Op::from(Op::put(self.key.clone(), "").lease(lease)),
                Op::from(owner.clone()),
            ])
            .or_else([Op::from(Op::get(self.key.clone())), Op::from(owner)])
            .await
            .map_err(|e| lease_gone(e, &self.session))?;
        let my_rev = if resp.succeeded {
            resp.header.revision
        } else {
            first_kv_create(resp.responses.first()).ok_or_else(|| {
                Error::new(
                    ErrorKind::Protocol,
                    "lock key vanished inside a transaction",
                )
            })?
        };
        let owner_rev = first_kv_create(resp.responses.get(1));
        Ok((my_rev, resp.succeeded, owner_rev))
    }

    /// Wait for every older key to go, then check that ours is still there.
    async fn wait(&self, my_rev: i64, stop: &mut Stop<'_>) -> Result<()> {
        wait_deletes(&self.scope, &self.pfx, my_rev - 1, stop).await?;
        check_own_key(
            &self.scope,
            &self.key,
            my_rev,
            self.session.lease_id(),
            stop,
        )
        .await?;
        Ok(())
    }
}

pub(crate) fn first_kv_create(op: Option<&TxnOpResponse>) -> Option<i64> {
    op?.as_get()?.kvs.first().map(|kv| kv.create_revision())
}

/// After waiting: the own key must still exist with the create revision we queued with,
/// or the session ended meanwhile (Go's `ErrSessionExpired`).
pub(crate) async fn check_own_key(
    scope: &Scope,
    key: &Bytes,
    my_rev: i64,
    lease: i64,
    stop: &mut Stop<'_>,
) -> Result<ResponseHeader> {
    let resp = unless(stop, scope.kv().get(key.clone()).into_future()).await?;
    match resp.kvs.first() {
        Some(kv) if kv.create_revision() == my_rev => Ok(resp.header),
        _ => Err(session_expired(lease, LeaseLost::Expired)),
    }
}

/// Delete `key` if it still has create revision `rev`.
pub(crate) async fn delete_if_created_at(scope: &Scope, key: &Bytes, rev: i64) -> Result<bool> {
    let resp = scope
        .kv()
        .txn()
        .when([Compare::create_revision(key.clone(), CompareOp::Equal, rev)])
        .and_then([Op::delete(key.clone())])
        .await?;
    Ok(resp.succeeded)
}
