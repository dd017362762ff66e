//! Client-side concurrency recipes built on our own KV, watch and lease primitives, with the
//! semantics of Go's `go.etcd.io/etcd/client/v3/concurrency` package (minus its known bugs):
//!
//! - [`Session`]: a lease kept alive by the client's lease keeper; recipes attach their keys
//!   to it, so they vanish when the session ends.
//! - [`Mutex`]: a distributed lock queued by create revision, with a fencing token
//!   ([`Mutex::fencing_revision`]) and a guard compare ([`Mutex::is_owner`]) for writes that
//!   must only happen while the lock is held.
//! - [`Election`]: campaign, proclaim, leader, observe, resign.
//! - [`stm`]: software transactional memory: a closure whose reads and writes commit
//!   atomically, retried on conflict.
//!
//! Keys of a recipe on prefix `p` are `p/<lease ID in lowercase hex>` (as in Go, so Go and
//! Rust processes can share a lock or an election).
//!
//! # Cancellation
//!
//! Waiting for a lock or for leadership happens in a task spawned through the client's
//! executor, which lives only while the `lock()` / `campaign()` call is pending: if the caller
//! drops the future, the task notices and deletes the key it created, so a cancelled waiter
//! never stays in the queue (Go leaves such keys behind until the session ends).

mod election;
mod mutex;
mod session;
mod stm;

pub use election::{Election, Observer};
pub use mutex::Mutex;
pub use session::{DEFAULT_SESSION_TTL, NewSession, Session};
pub use stm::{Isolation, Stm, StmTxn, stm};

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use tokio::sync::oneshot;

use bytes::Bytes;

use crate::client::Client;
use crate::error::{Error, ErrorKind, Result};
use crate::kv::Kv;
use crate::lease::LeaseLost;
use crate::types::{KeyValue, ResponseHeader};
use crate::{EventKind, SortOrder, SortTarget};
use session::session_expired;

/// Where a recipe's keys live: a client plus a namespace prefix (empty without one). Keys
/// handed to the user are relative to the namespace; keys sent to the server are absolute.
#[derive(Debug, Clone)]
pub(crate) struct Scope {
    pub(crate) client: Client,
    pub(crate) ns: Bytes,
}

impl Scope {
    pub(crate) fn new(client: Client, ns: Bytes) -> Self {
        Scope { client, ns }
    }

    pub(crate) fn kv(&self) -> Kv {
        self.client.kv()
    }

    /// The absolute key of namespace-relative `key`.
    pub(crate) fn full(&self, key: &[u8]) -> Bytes {
        if self.ns.is_empty() {
            return Bytes::copy_from_slice(key);
        }
        let mut v = Vec::with_capacity(self.ns.len() + key.len());
        v.extend_from_slice(&self.ns);
        v.extend_from_slice(key);
        Bytes::from(v)
    }

    /// A key-value pair as the user sees it (namespace stripped).
    pub(crate) fn strip(&self, kv: KeyValue) -> KeyValue {
        kv.strip_key_prefix(self.ns.len())
    }
}

/// A recipe prefix as Go builds it: with a trailing `/`.
pub(crate) fn recipe_prefix(prefix: &[u8]) -> Bytes {
    let mut v = prefix.to_vec();
    v.push(b'/');
    Bytes::from(v)
}

/// `prefix` followed by the lease ID in lowercase hex (Go's `fmt.Sprintf("%s%x", pfx, lease)`).
pub(crate) fn lease_key(prefix: &[u8], lease: i64) -> Bytes {
    let mut v = prefix.to_vec();
    // As Go's `%x` writes an int64: a sign and the magnitude (a user-chosen negative ID
    // makes the same key as a Go process using it).
    let hex = if lease < 0 {
        format!("-{:x}", lease.unsigned_abs())
    } else {
        format!("{lease:x}")
    };
    v.extend_from_slice(hex.as_bytes());
    Bytes::from(v)
}

/// A recipe's write refused because the session's lease is gone (the server answered "lease
/// not found"): the session has expired, and the error says so ([`ErrorKind::SessionExpired`],
/// as for a wait that outlives the session; the keeper was told by the write itself, see
/// `lease::note_write_error`). Other errors are returned as they are.
pub(crate) fn lease_gone(e: Error, session: &Session) -> Error {
    if e.kind() == ErrorKind::LeaseNotFound {
        session_expired(session.lease_id(), LeaseLost::Expired)
    } else {
        e
    }
}

/// What stops a wait: the caller went away, or the session ended.
pub(crate) type Stop<'a> = Pin<&'a mut (dyn Future<Output = Error> + Send + 'a)>;

/// Run `work` unless `stop` resolves first.
pub(crate) async fn unless<T>(
    stop: &mut Stop<'_>,
    work: impl Future<Output = Result<T>>,
) -> Result<T> {
    tokio::select! {
        biased;
        e = stop.as_mut() => Err(e),
        r = work => r,
    }
}

/// Go's `waitDeletes`: wait until no key under the absolute prefix `pfx` has a create
/// revision at most `max_create_rev`. Each round reads the newest such key and waits for its
/// deletion (a watch from the read's revision); `stop` ends the wait with its error.
pub(crate) async fn wait_deletes(
    scope: &Scope,
    pfx: &Bytes,
    max_create_rev: i64,
    stop: &mut Stop<'_>,
) -> Result<ResponseHeader> {
    let kv = scope.kv();
    // Bounded by the queue: each round waits for one key that never comes back (a key
    // re-created gets a newer create revision, above `max_create_rev`).
    loop {
        let resp = unless(
            stop,
            kv.get(pfx.clone())
                .prefix()
                .sort(SortTarget::Create, SortOrder::Descend)
                .max_create_revision(max_create_rev)
                .limit(1)
                .into_future(),
        )
        .await?;
        let Some(last) = resp.kvs.first() else {
            return Ok(resp.header);
        };
        wait_delete(scope, last.key().clone(), resp.header.revision, stop).await?;
    }
}

use std::future::IntoFuture;

/// Whether a failed cleanup request is worth trying again (the member or the network, not
/// the request, was the problem).
fn passing(e: &Error) -> bool {
    e.is_retryable() || e.kind() == ErrorKind::Deadline
}

/// Answer a failed attempt on `tx`, then delete its key at `rev` (if it has one to delete):
/// one try first, so the caller usually finds the queue clean; should it fail, the answer
/// goes out and the removal goes on (behind the attempt's gate, which the caller holds).
pub(crate) async fn answer_and_remove<T>(
    tx: oneshot::Sender<T>,
    answer: T,
    scope: &Scope,
    session: &Session,
    key: &Bytes,
    rev: Option<i64>,
) {
    match rev {
        Some(rev) if try_remove(scope, key, rev).await == Removal::Retry => {
            let _ = tx.send(answer);
            remove_key(scope, session, key, rev).await;
        }
        _ => {
            let _ = tx.send(answer);
        }
    }
}

/// Answer a failed enqueue on `tx`; when its outcome is unknown (`maybe_put`), then find out
/// whether it put the key, and delete it ([`remove_lost_put`]; the caller holds the gate, so
/// a retry waits for this).
pub(crate) async fn answer_failed_enqueue<T>(
    tx: oneshot::Sender<T>,
    answer: T,
    maybe_put: bool,
    scope: &Scope,
    session: &Session,
    key: &Bytes,
    floor: i64,
) {
    let _ = tx.send(answer);
    if maybe_put {
        remove_lost_put(scope, session, key, floor).await;
    }
}

/// Whether a key removal is finished ([`try_remove`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Removal {
    /// Deleted, already gone (or re-created), or impossible (a lasting error).
    Done,
    /// Failed for a passing reason: [`remove_key`] tries again.
    Retry,
}

/// One try at deleting `key` if it still has create revision `rev`.
async fn try_remove(scope: &Scope, key: &Bytes, rev: i64) -> Removal {
    match mutex::delete_if_created_at(scope, key, rev).await {
        Err(e) if passing(&e) => Removal::Retry,
        _ => Removal::Done,
    }
}

/// Delete the queue key `key` if it still has create revision `rev`, trying again with
/// back-off while the failure is passing: a key left behind would hold up the whole queue
/// for as long as its session lives (Go tries once). Stops when the session ends (its lease,
/// and so the key, goes with it) or the client is closed.
pub(crate) async fn remove_key(scope: &Scope, session: &Session, key: &Bytes, rev: i64) {
    let mut retry = Retry::new(session);
    loop {
        if try_remove(scope, key, rev).await == Removal::Done
            || !retry.back_off(scope, session).await
        {
            return;
        }
    }
}

/// The back-off of a cleanup's retries, and its end: one TTL of the session after the
/// start (this task holds a handle of the session, so it could otherwise keep the lease,
/// and itself, alive against a cluster that refuses writes but answers keep-alives).
struct Retry {
    wait: Duration,
    until: tokio::time::Instant,
}

impl Retry {
    fn new(session: &Session) -> Self {
        let ttl = u64::try_from(session.ttl()).unwrap_or(0).max(5);
        Retry {
            wait: Duration::from_millis(50),
            until: tokio::time::Instant::now() + Duration::from_secs(ttl.min(3600)),
        }
    }

    /// Wait before trying again (doubling, up to a second); false when there is no point:
    /// the session ended (its keys go with its lease), the client was closed, or the
    /// retries are over.
    async fn back_off(&mut self, scope: &Scope, session: &Session) -> bool {
        if !session.is_alive()
            || scope.client.shared().is_closed()
            || tokio::time::Instant::now() >= self.until
        {
            return false;
        }
        tokio::select! {
            _ = session.done() => return false,
            () = tokio::time::sleep(self.wait) => {}
        }
        self.wait = (self.wait * 2).min(Duration::from_secs(1));
        true
    }
}

/// After an enqueue whose outcome is unknown (its answer was lost): find out whether it put
/// the key, and if so delete it, retrying as [`remove_key`] does. A put of the key on this
/// session's lease at a revision above `floor` (the newest revision this client had seen
/// before sending it) is this attempt's; an older key was there before, and is not its to
/// delete.
///
/// The put may still be on its way through the server when its answer is lost, so the key's
/// history is watched from `floor`: for as long as the request could still be proposed (its
/// deadline, which the server enforces too, plus a margin; 10 s without one).
async fn remove_lost_put(scope: &Scope, session: &Session, key: &Bytes, floor: i64) {
    let window = scope
        .client
        .config()
        .request_timeout
        .unwrap_or(Duration::from_secs(10))
        .min(Duration::from_secs(60))
        + Duration::from_secs(1);
    let until = tokio::time::Instant::now() + window;
    let lease = session.lease_id();
    let ours = |kv: &KeyValue| kv.lease() == lease && kv.create_revision() > floor;
    let mut from = floor.saturating_add(1);
    let mut retry = Retry::new(session);
    loop {
        let watched = tokio::select! {
            _ = session.done() => return,
            r = tokio::time::timeout_at(until, find_put(scope, key, from, &ours)) => r,
        };
        match watched {
            Err(_elapsed) => break,
            Ok(Ok(rev)) => {
                remove_key(scope, session, key, rev).await;
                return;
            }
            // The history from `from` is gone: what is there now tells about the past, and
            // the watch goes on from there.
            Ok(Err(e)) if e.is_compacted() => match scope.kv().get(key.clone()).await {
                Ok(resp) => match resp.kvs.first() {
                    Some(kv) if ours(kv) => {
                        remove_key(scope, session, key, kv.create_revision()).await;
                        return;
                    }
                    _ => {
                        from = resp.header.revision.saturating_add(1);
                        continue;
                    }
                },
                Err(e) if !passing(&e) => return,
                Err(_) => {}
            },
            Ok(Err(e)) if !passing(&e) && e.kind() != ErrorKind::Closed => return,
            Ok(Err(_)) => {}
        }
        if tokio::time::Instant::now() >= until || !retry.back_off(scope, session).await {
            break;
        }
    }
    // The request can no longer be applied now: a read tells (the watch could not, with the
    // cluster unreachable all along, say).
    loop {
        match scope.kv().get(key.clone()).await {
            Ok(resp) => {
                if let Some(kv) = resp.kvs.first()
                    && ours(kv)
                {
                    remove_key(scope, session, key, kv.create_revision()).await;
                }
                return;
            }
            Err(e) if !passing(&e) => return,
            Err(_) => {}
        }
        if !retry.back_off(scope, session).await {
            return;
        }
    }
}

/// Watch `key` from revision `from` for a put that `ours` recognizes; its create revision.
async fn find_put(
    scope: &Scope,
    key: &Bytes,
    from: i64,
    ours: &impl Fn(&KeyValue) -> bool,
) -> Result<i64> {
    let mut w = scope.client.watch(key.clone()).start_revision(from).await?;
    loop {
        let Some(batch) = w.next().await else {
            return Err(Error::new(ErrorKind::Closed, "the watch ended"));
        };
        if let Some(e) = batch?
            .events()
            .iter()
            .find(|e| e.kind == EventKind::Put && ours(&e.kv))
        {
            return Ok(e.kv.create_revision());
        }
    }
}

/// A key an attempt (lock or campaign) won, on its way to the caller, with the attempt's
/// gate ([`Session::gate`]). The caller takes the revision with [`take`](Self::take), which
/// opens the gate. Dropped untaken (the caller went away after the attempt answered), it
/// deletes the key it is armed with, still behind the gate.
pub(crate) struct Won {
    rev: i64,
    /// What to delete when dropped untaken: the scope, the session and the absolute key.
    cleanup: Option<(Scope, Session, Bytes)>,
    gate: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Won {
    pub(crate) fn new(
        rev: i64,
        cleanup: Option<(Scope, Session, Bytes)>,
        gate: tokio::sync::OwnedMutexGuard<()>,
    ) -> Self {
        Won {
            rev,
            cleanup,
            gate: Some(gate),
        }
    }

    /// The won key's create revision; the caller has it now.
    pub(crate) fn take(mut self) -> i64 {
        self.cleanup = None;
        self.gate = None;
        self.rev
    }
}

impl Drop for Won {
    fn drop(&mut self) {
        let (Some((scope, session, key)), gate) = (self.cleanup.take(), self.gate.take()) else {
            return;
        };
        let rev = self.rev;
        let shared = scope.client.shared().clone();
        shared.spawn(async move {
            let _gate = gate;
            remove_key(&scope, &session, &key, rev).await;
        });
    }
}

/// Wait for a delete of `key` at or after revision `rev`.
async fn wait_delete(scope: &Scope, key: Bytes, rev: i64, stop: &mut Stop<'_>) -> Result<()> {
    let mut watcher = unless(
        stop,
        scope.client.watch(key).start_revision(rev).into_future(),
    )
    .await?;
    loop {
        let batch = unless(stop, async {
            watcher
                .next()
                .await
                .unwrap_or_else(|| Err(Error::new(ErrorKind::Closed, "the watch ended")))
        })
        .await;
        match batch {
            Ok(b) => {
                if b.events().iter().any(|e| e.kind == EventKind::Delete) {
                    return Ok(());
                }
            }
            // History gone: the caller reads the queue again.
            Err(e) if e.kind() == ErrorKind::Compacted => return Ok(()),
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_keys_are_written_as_go_writes_them() {
        assert_eq!(
            &lease_key(b"/p/", 0x694d_77a2_c5a1_1f0a)[..],
            b"/p/694d77a2c5a11f0a"
        );
        assert_eq!(&lease_key(b"/p/", 31)[..], b"/p/1f");
        // Go's %x of a negative int64: a sign and the magnitude.
        assert_eq!(&lease_key(b"/p/", -31)[..], b"/p/-1f");
        assert_eq!(&lease_key(b"/p/", i64::MIN)[..], b"/p/-8000000000000000");
    }
}
