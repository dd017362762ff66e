//! [`Election`]: leader election on a key prefix (Go's `concurrency.Election`).

use std::future::IntoFuture;
use std::pin::Pin;
use std::sync::Mutex as StdMutex;
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use super::mutex::{check_own_key, delete_if_created_at};
use super::session::session_expired;
use super::{
    Scope, Stop, Won, answer_and_remove, answer_failed_enqueue, lease_gone, lease_key,
    recipe_prefix, unless, wait_deletes,
};
use crate::concurrency::Session;
use crate::error::{Error, ErrorKind, Result};
use crate::txn::{Compare, CompareOp, Op};
use crate::types::{IntoBytes, KeyValue};
use crate::{EventKind, SortOrder, SortTarget};

/// Leader election on a key prefix, for one [`Session`] (Go's `concurrency.Election`).
///
/// A campaign puts `prefix/<lease ID hex>` with the candidate's value (attached to the
/// session's lease); candidates queue by create revision and the one with the lowest is the
/// leader. The leader's value is the election's current value; [`proclaim`](Self::proclaim)
/// changes it, [`observe`](Self::observe) follows it.
///
/// ```no_run
/// # async fn demo(client: etcdv3::Client) -> etcdv3::Result<()> {
/// use etcdv3::{Election, Session};
/// let session = Session::new(&client).ttl(10).await?;
/// let election = Election::new(&session, "/election/scheduler");
/// election.campaign("node-a").await?; // returns once leader
/// election.proclaim("node-a:v2").await?;
/// election.resign().await?;
/// # Ok(()) }
/// ```
///
/// Unlike Go's: a campaign that is cancelled (its future dropped) or fails deletes its key;
/// a campaign stops waiting, with [`ErrorKind::SessionExpired`], when the session ends; and a
/// [`resign`](Self::resign) that fails keeps the leadership state, so it can be retried.
#[derive(Debug)]
pub struct Election {
    session: Session,
    scope: Scope,
    pfx: Bytes,
    key_full: Bytes,
    key: Bytes,
    /// The create revision of the leader key while leader.
    leader_rev: StdMutex<Option<i64>>,
}

impl Election {
    /// An election on `prefix`, campaigning with `session`.
    pub fn new(session: &Session, prefix: impl IntoBytes) -> Election {
        let scope = Scope::new(session.client().clone(), Bytes::new());
        Election::in_scope(session, scope, prefix.into_bytes())
    }

    pub(crate) fn in_scope(session: &Session, scope: Scope, prefix: Bytes) -> Election {
        let rel = recipe_prefix(&prefix);
        let key = lease_key(&rel, session.lease_id());
        Election {
            session: session.clone(),
            pfx: scope.full(&rel),
            key_full: scope.full(&key),
            key,
            scope,
            leader_rev: StdMutex::new(None),
        }
    }

    fn set_rev(&self, rev: Option<i64>) {
        *self.leader_rev.lock().unwrap_or_else(|p| p.into_inner()) = rev;
    }

    fn rev(&self) -> Option<i64> {
        *self.leader_rev.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Campaign with `value` and wait until elected. If this session already campaigns
    /// (its key exists), the campaign continues with it (re-proclaiming `value` if it
    /// differs). Fails with [`ErrorKind::SessionExpired`] when the session ends while
    /// waiting, or its lease is found gone (the lease keeper is told, so the session usually
    /// ends at once too); a failed or cancelled (dropped) campaign deletes its key.
    pub async fn campaign(&self, value: impl IntoBytes) -> Result<()> {
        let c = Campaign {
            scope: self.scope.clone(),
            session: self.session.clone(),
            pfx: self.pfx.clone(),
            key: self.key_full.clone(),
            value: value.into_bytes(),
        };
        let (tx, rx) = oneshot::channel();
        self.scope.client.shared().spawn(c.run(tx));
        let answer = rx
            .await
            .map_err(|_| Error::new(ErrorKind::Closed, "the campaign's task ended"))?;
        match answer {
            Ok(won) => {
                self.set_rev(Some(won.take()));
                Ok(())
            }
            Err((e, removed)) => {
                // A campaign from a leader (re-proclaiming, say) that failed removes the
                // leader key: leadership is over (Go resigns too).
                if removed.is_some() && removed == self.rev() {
                    self.set_rev(None);
                }
                Err(e)
            }
        }
    }

    /// Set the election's value, only while leader (a guarded write: the leader key must
    /// still be the one elected). Otherwise fails with [`ErrorKind::ElectionNotLeader`] (and
    /// the election no longer considers itself leader).
    pub async fn proclaim(&self, value: impl IntoBytes) -> Result<()> {
        let Some(rev) = self.rev() else {
            return Err(not_leader());
        };
        let resp = self
            .scope
            .kv()
            .txn()
            .when([Compare::create_revision(
                self.key_full.clone(),
                CompareOp::Equal,
                rev,
            )])
            .and_then([Op::put(self.key_full.clone(), value).lease(self.session.lease_id())])
            .await?;
        if !resp.succeeded {
            self.set_rev(None);
            return Err(not_leader());
        }
        Ok(())
    }

    /// Give up leadership: delete the leader key (if it is still the elected one). Does
    /// nothing when not leader. If the request fails, the election still knows its key and
    /// leadership, so `resign` can be retried.
    pub async fn resign(&self) -> Result<()> {
        let Some(rev) = self.rev() else {
            return Ok(());
        };
        delete_if_created_at(&self.scope, &self.key_full, rev).await?;
        self.set_rev(None);
        Ok(())
    }

    /// The current leader's key and value (the key with the lowest create revision under the
    /// prefix), or `None` when nobody campaigns.
    pub async fn leader(&self) -> Result<Option<KeyValue>> {
        let resp = self
            .scope
            .kv()
            .get(self.pfx.clone())
            .prefix()
            .sort(SortTarget::Create, SortOrder::Ascend)
            .limit(1)
            .await?;
        Ok(resp.kvs.into_iter().next().map(|kv| self.scope.strip(kv)))
    }

    /// Whether this election won its campaign and has not resigned or lost (its session is
    /// alive and no proclaim found the key gone). Guard writes with
    /// [`is_leader_compare`](Self::is_leader_compare) to act on it safely.
    pub fn is_leader(&self) -> bool {
        self.rev().is_some() && self.session.is_alive()
    }

    /// A transaction compare that holds only while this election leads with the key it was
    /// elected with (never holds when not leader). Relative to the namespace.
    pub fn is_leader_compare(&self) -> Compare {
        Compare::create_revision(self.key.clone(), CompareOp::Equal, self.rev().unwrap_or(-1))
    }

    /// The create revision of the leader key while leader (a fencing token).
    pub fn leader_revision(&self) -> Option<i64> {
        self.rev()
    }

    /// This campaigner's key (`prefix/<lease ID hex>`, relative to the namespace).
    pub fn key(&self) -> &Bytes {
        &self.key
    }

    /// The session campaigning.
    pub fn session(&self) -> &Session {
        &self.session
    }

    /// Follow the election: a stream of the leader's key-value pair, first the current
    /// leader's (waiting for one if nobody leads), then every value it proclaims, then, when
    /// its key is deleted, the next leader's, and so on. An error item (the reads failing
    /// after the client's retries, the client closed) ends the stream.
    ///
    /// A background task (spawned through the client's executor) drives the stream; it ends
    /// when the [`Observer`] is dropped.
    pub fn observe(&self) -> Observer {
        let (tx, rx) = mpsc::channel(16);
        let o = Observe {
            scope: self.scope.clone(),
            pfx: self.pfx.clone(),
        };
        self.scope.client.shared().spawn(o.run(tx));
        Observer { rx }
    }
}

fn not_leader() -> Error {
    Error::new(ErrorKind::ElectionNotLeader, "election: not leader")
}

/// A campaign's answer: the won key, or the error and the create revision of the key the
/// attempt removed (if it removed one).
type CampaignAnswer = oneshot::Sender<std::result::Result<Won, (Error, Option<i64>)>>;

struct Campaign {
    scope: Scope,
    session: Session,
    pfx: Bytes,
    key: Bytes,
    value: Bytes,
}

impl Campaign {
    /// Behind the key's gate (see the mutex's attempt); the answer carries it to the caller,
    /// and deletes the key if dropped untaken.
    async fn run(self, mut tx: CampaignAnswer) {
        let gate = self.session.gate(&self.key);
        let gate = tokio::select! {
            _ = tx.closed() => return,
            g = gate.lock_owned() => g,
        };
        let floor = self.scope.client.shared().max_revision();
        let rev = match self.enqueue().await {
            Ok(rev) => rev,
            Err((e, Some(rev))) => {
                self.fail(tx, e, rev).await;
                return;
            }
            Err((e, None)) => {
                let maybe_put = e.is_indeterminate();
                answer_failed_enqueue(
                    tx,
                    Err((e, None)),
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
        let result = {
            let done = self.session.done();
            let id = self.session.lease_id();
            let mut stop: Stop<'_> = std::pin::pin!(async {
                tokio::select! {
                    _ = tx.closed() => Error::new(ErrorKind::Canceled, "campaign() was cancelled"),
                    reason = done => session_expired(id, reason),
                }
            });
            match wait_deletes(&self.scope, &self.pfx, rev - 1, &mut stop).await {
                Ok(_) => check_own_key(&self.scope, &self.key, rev, id, &mut stop)
                    .await
                    .map(|_| rev),
                Err(e) => Err(e),
            }
        };
        match result {
            Ok(rev) => {
                let cleanup = Some((self.scope.clone(), self.session.clone(), self.key.clone()));
                let _ = tx.send(Ok(Won::new(rev, cleanup, gate)));
            }
            Err(e) => {
                self.fail(tx, e, rev).await;
                drop(gate);
            }
        }
    }

    /// Answer `e` and delete the key at `rev` (see [`answer_and_remove`]).
    async fn fail(&self, tx: CampaignAnswer, e: Error, rev: i64) {
        let answer = Err((e, Some(rev)));
        answer_and_remove(tx, answer, &self.scope, &self.session, &self.key, Some(rev)).await;
    }

    /// Put the key with the value if absent (else re-proclaim the value on it); returns the
    /// key's create revision. On failure, the revision to clean up, if known.
    async fn enqueue(&self) -> std::result::Result<i64, (Error, Option<i64>)> {
        let lease = self.session.lease_id();
        let resp = self
            .scope
            .kv()
            .txn()
            .when([Compare::create_revision(
                self.key.clone(),
                CompareOp::Equal,
                0,
            )])
            .and_then([Op::put(self.key.clone(), self.value.clone()).lease(lease)])
            .or_else([Op::get(self.key.clone())])
            .await
            .map_err(|e| (lease_gone(e, &self.session), None))?;
        if resp.succeeded {
            return Ok(resp.header.revision);
        }
        let existing = resp
            .responses
            .first()
            .and_then(|r| r.as_get())
            .and_then(|g| g.kvs.first())
            .ok_or_else(|| {
                (
                    Error::new(
                        ErrorKind::Protocol,
                        "election key vanished inside a transaction",
                    ),
                    None,
                )
            })?;
        let rev = existing.create_revision();
        if existing.value() != &self.value {
            let p = self
                .scope
                .kv()
                .txn()
                .when([Compare::create_revision(
                    self.key.clone(),
                    CompareOp::Equal,
                    rev,
                )])
                .and_then([Op::put(self.key.clone(), self.value.clone()).lease(lease)])
                .await
                .map_err(|e| (e, Some(rev)))?;
            if !p.succeeded {
                return Err((not_leader(), Some(rev)));
            }
        }
        Ok(rev)
    }
}

struct Observe {
    scope: Scope,
    pfx: Bytes,
}

impl Observe {
    async fn run(self, tx: mpsc::Sender<Result<KeyValue>>) {
        let closed = tx.clone();
        let mut stop: Stop<'_> = std::pin::pin!(async move {
            closed.closed().await;
            Error::new(ErrorKind::Canceled, "observer dropped")
        });
        // Each round follows one leader; the stream ends on the first error or once the
        // observer is dropped. `at`: the revision that deleted the previous leader's key (0:
        // none yet), so the next leader is read as of that revision and none is skipped.
        let mut at = 0;
        loop {
            match self.round(&tx, &mut stop, at).await {
                Ok(Some(next)) => at = next,
                Ok(None) => return,
                Err(e) => {
                    if e.kind() != ErrorKind::Canceled {
                        let _ = tx.send(Err(e)).await;
                    }
                    return;
                }
            }
        }
    }

    /// Find the leader as of revision `at` (0: now; waiting for one if there is none), send
    /// it and its proclamations until its key is deleted. Ok(Some(rev)): the revision of the
    /// deletion; Ok(None): the observer is gone.
    async fn round(
        &self,
        tx: &mpsc::Sender<Result<KeyValue>>,
        stop: &mut Stop<'_>,
        at: i64,
    ) -> Result<Option<i64>> {
        let kv = self.scope.kv();
        let read = |rev: i64| {
            kv.get(self.pfx.clone())
                .prefix()
                .sort(SortTarget::Create, SortOrder::Ascend)
                .limit(1)
                .revision(rev)
                .into_future()
        };
        let (resp, as_of) = match unless(stop, read(at)).await {
            // History gone: the leader now.
            Err(e) if e.kind() == ErrorKind::Compacted => (unless(stop, read(0)).await?, 0),
            r => (r?, at),
        };
        // A read as of `at` answered as of `at` (its header is the current revision): watch
        // from just after `at`, so no leader since then is missed. A read of now: from just
        // after its header.
        let watch_from = if as_of > 0 {
            as_of + 1
        } else {
            resp.header.revision + 1
        };
        let leader = match resp.kvs.into_iter().next() {
            Some(kv) => kv,
            None => {
                let mut w = unless(
                    stop,
                    self.scope
                        .client
                        .watch(self.pfx.clone())
                        .prefix()
                        .start_revision(watch_from)
                        .into_future(),
                )
                .await?;
                let mut found = None;
                while found.is_none() {
                    let batch = match unless(stop, next_batch(&mut w)).await {
                        Ok(b) => b,
                        // History gone while waiting: look for the leader again, now.
                        Err(e) if e.kind() == ErrorKind::Compacted => return Ok(Some(0)),
                        Err(e) => return Err(e),
                    };
                    found = batch
                        .into_events()
                        .into_iter()
                        .find(|e| e.kind == EventKind::Put)
                        .map(|e| e.kv);
                }
                match found {
                    Some(kv) => kv,
                    None => return Ok(Some(0)),
                }
            }
        };
        let key = leader.key().clone();
        let from = leader.mod_revision() + 1;
        if tx.send(Ok(self.scope.strip(leader))).await.is_err() {
            return Ok(None);
        }
        let mut w = unless(
            stop,
            self.scope
                .client
                .watch(key)
                .start_revision(from)
                .into_future(),
        )
        .await?;
        loop {
            let batch = match unless(stop, next_batch(&mut w)).await {
                Ok(b) => b,
                // History gone: look for the leader again, now.
                Err(e) if e.kind() == ErrorKind::Compacted => return Ok(Some(0)),
                Err(e) => return Err(e),
            };
            for ev in batch.into_events() {
                if ev.kind == EventKind::Delete {
                    return Ok(Some(ev.kv.mod_revision()));
                }
                if tx.send(Ok(self.scope.strip(ev.kv))).await.is_err() {
                    return Ok(None);
                }
            }
        }
    }
}

async fn next_batch(w: &mut crate::Watcher) -> Result<crate::WatchBatch> {
    w.next()
        .await
        .unwrap_or_else(|| Err(Error::new(ErrorKind::Closed, "the watch ended")))
}

/// The stream of leader values of an [`Election::observe`]; also a
/// [`Stream`](futures_core::Stream). Dropping it ends the background task.
#[derive(Debug)]
pub struct Observer {
    rx: mpsc::Receiver<Result<KeyValue>>,
}

impl Observer {
    /// The next leader value, or `None` once the stream has ended.
    pub async fn next(&mut self) -> Option<Result<KeyValue>> {
        self.rx.recv().await
    }
}

impl futures_core::Stream for Observer {
    type Item = Result<KeyValue>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().rx.poll_recv(cx)
    }
}
