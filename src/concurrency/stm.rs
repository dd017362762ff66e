//! [`stm`]: software transactional memory on etcd (Go's `concurrency.NewSTM`).

use std::collections::{BTreeMap, HashMap};
use std::future::{Future, IntoFuture};
use std::sync::{Arc, Mutex as StdMutex};

use bytes::Bytes;

use super::Scope;
use crate::client::Client;
use crate::error::{Error, ErrorKind, Result};
use crate::kv::BoxFuture;
use crate::txn::{Compare, CompareOp, Op};
use crate::types::IntoBytes;

/// How strongly an [`stm`] transaction is isolated from concurrent writers.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Isolation {
    /// Every read sees the store at the revision of the transaction's first read (a
    /// snapshot), and the commit fails (and the closure is retried) if any key read was
    /// modified since. Transactions appear to run one after the other. The default.
    #[default]
    Serializable,
    /// [`Serializable`](Self::Serializable), and the commit also fails if a key *written*
    /// was modified after the first read (no blind overwrite of a concurrent write).
    SerializableSnapshot,
    /// Each key is read once (at the latest revision; later reads of it return the same
    /// value), and the commit fails if any key read was modified since it was read.
    RepeatableRead,
    /// Reads see the latest committed values and the commit never conflicts: writes are
    /// applied atomically, without checks.
    ReadCommitted,
}

/// Run `apply` as a software transaction on `client`'s store (Go's `concurrency.NewSTM`):
/// await the returned [`Stm`] (set [`Stm::isolation`] and [`Stm::attempts`] first).
///
/// `apply` gets an [`StmTxn`] handle: reads through it are recorded, writes are buffered;
/// when `apply` returns `Ok`, everything is committed in one etcd transaction whose compares
/// check that nothing read has changed. On a conflict the buffered writes are dropped and
/// `apply` runs again with a fresh handle, up to [`Stm::attempts`] times (then
/// [`ErrorKind::Conflict`]). An `Err` from `apply` aborts without writing anything. The
/// answer is the value `apply` returned in the attempt that committed.
///
/// **Why an owned handle.** `apply` is an ordinary closure `FnMut(StmTxn) -> impl Future`
/// taking the handle *by value* (it is a cheap clone of shared state), so the idiomatic
/// `|tx| async move { ... }` works, the future is `Send + 'static` and the whole call can be
/// spawned, which a closure borrowing `&mut StmTxn` across an `.await` cannot offer on
/// stable Rust.
///
/// ```no_run
/// # async fn demo(client: etcdv3::Client) -> etcdv3::Result<()> {
/// use etcdv3::{Isolation, stm};
/// // Move 10 from account a to account b, atomically.
/// stm(&client, |tx| async move {
///     let a: i64 = tx.get_str("/acct/a").await?.unwrap_or_default().parse().unwrap_or(0);
///     let b: i64 = tx.get_str("/acct/b").await?.unwrap_or_default().parse().unwrap_or(0);
///     tx.put("/acct/a", (a - 10).to_string());
///     tx.put("/acct/b", (b + 10).to_string());
///     Ok(())
/// })
/// .isolation(Isolation::Serializable)
/// .await?;
/// # Ok(()) }
/// ```
pub fn stm<F, Fut, T>(client: &Client, apply: F) -> Stm<F>
where
    F: FnMut(StmTxn) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T>> + Send + 'static,
    T: Send + 'static,
{
    Stm::in_scope(Scope::new(client.clone(), Bytes::new()), apply)
}

/// Default number of attempts of an [`stm`] transaction.
const DEFAULT_ATTEMPTS: u32 = 64;

/// A software transaction to run; see [`stm`]. Await it.
#[must_use = "a request does nothing until it is awaited"]
pub struct Stm<F> {
    scope: Scope,
    apply: F,
    isolation: Isolation,
    attempts: u32,
}

impl<F> std::fmt::Debug for Stm<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stm")
            .field("isolation", &self.isolation)
            .field("attempts", &self.attempts)
            .finish()
    }
}

impl<F> Stm<F> {
    pub(crate) fn in_scope(scope: Scope, apply: F) -> Self {
        Stm {
            scope,
            apply,
            isolation: Isolation::default(),
            attempts: DEFAULT_ATTEMPTS,
        }
    }

    /// The isolation level (default [`Isolation::Serializable`]).
    pub fn isolation(mut self, isolation: Isolation) -> Self {
        self.isolation = isolation;
        self
    }

    /// How many times to run the closure before giving up on conflicts with
    /// [`ErrorKind::Conflict`] (default 64, at least 1). An attempt whose snapshot revision
    /// was compacted while the closure ran (a read then fails with
    /// [`ErrorKind::Compacted`], and the closure passes that on) counts as a conflict too.
    pub fn attempts(mut self, attempts: u32) -> Self {
        self.attempts = attempts.max(1);
        self
    }
}

impl<F, Fut, T> IntoFuture for Stm<F>
where
    F: FnMut(StmTxn) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T>> + Send + 'static,
    T: Send + 'static,
{
    type Output = Result<T>;
    type IntoFuture = BoxFuture<Result<T>>;

    fn into_future(mut self) -> Self::IntoFuture {
        Box::pin(async move {
            for _ in 0..self.attempts {
                let tx = StmTxn {
                    scope: self.scope.clone(),
                    isolation: self.isolation,
                    state: Arc::new(StdMutex::new(State::default())),
                };
                let value = match (self.apply)(tx.clone()).await {
                    Ok(v) => v,
                    // The snapshot was compacted away while the closure ran (it took longer
                    // than the cluster keeps history): a fresh attempt reads a new one.
                    Err(e) if e.is_compacted() && tx.lock().snapshot_compacted => continue,
                    Err(e) => return Err(e),
                };
                if tx.commit().await? {
                    return Ok(value);
                }
            }
            Err(Error::new(
                ErrorKind::Conflict,
                format!(
                    "software transaction conflicted {} times in a row",
                    self.attempts
                ),
            ))
        })
    }
}

#[derive(Debug, Default)]
struct State {
    /// Key -> mod revision seen (0: absent) and value.
    reads: HashMap<Bytes, (i64, Option<Bytes>)>,
    /// Key -> new value (None: delete), in key order.
    writes: BTreeMap<Bytes, Option<Bytes>>,
    /// The revision of the first read (0 before it).
    first_rev: i64,
    /// A read at that revision failed because it was compacted.
    snapshot_compacted: bool,
}

/// The handle of one attempt of an [`stm`] transaction: read through it, buffer writes in
/// it. Cheap to clone (clones share the attempt's state); keys are relative to the
/// namespace of a [`Namespace::stm`](crate::Namespace::stm).
#[derive(Debug, Clone)]
pub struct StmTxn {
    scope: Scope,
    isolation: Isolation,
    state: Arc<StdMutex<State>>,
}

impl StmTxn {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The value of `key` as this transaction sees it: its own buffered write, else the
    /// value read (once, then remembered; at the snapshot revision under serializable
    /// isolation), or `None` when the key does not exist.
    pub async fn get(&self, key: impl IntoBytes) -> Result<Option<Bytes>> {
        let key = key.into_bytes();
        if let Some(w) = self.lock().writes.get(&key) {
            return Ok(w.clone());
        }
        Ok(self.read(key).await?.1)
    }

    /// The stored mod revision and value of `key` (0 and `None` when it does not exist),
    /// read once and remembered (the read set), whatever this transaction wrote.
    async fn read(&self, key: Bytes) -> Result<(i64, Option<Bytes>)> {
        let rev = {
            let st = self.lock();
            if let Some(read) = st.reads.get(&key) {
                return Ok(read.clone());
            }
            st.first_rev
        };
        let mut get = self.scope.kv().get(self.scope.full(&key));
        let snapshot = matches!(
            self.isolation,
            Isolation::Serializable | Isolation::SerializableSnapshot
        );
        if snapshot && rev > 0 {
            get = get.revision(rev);
        }
        let resp = match get.await {
            Ok(resp) => resp,
            Err(e) => {
                if e.is_compacted() {
                    self.lock().snapshot_compacted = true;
                }
                return Err(e);
            }
        };
        let found = resp
            .kvs
            .first()
            .map(|kv| (kv.mod_revision(), kv.value().clone()));
        let mut st = self.lock();
        if st.first_rev == 0 {
            st.first_rev = resp.header.revision;
        }
        let entry = st.reads.entry(key).or_insert_with(|| match found {
            Some((m, v)) => (m, Some(v)),
            None => (0, None),
        });
        Ok(entry.clone())
    }

    /// [`get`](Self::get) as UTF-8 text (invalid UTF-8 fails with
    /// [`ErrorKind::InvalidArgument`]).
    pub async fn get_str(&self, key: impl IntoBytes) -> Result<Option<String>> {
        match self.get(key).await? {
            None => Ok(None),
            Some(b) => String::from_utf8(b.to_vec())
                .map(Some)
                .map_err(|e| Error::invalid_argument("value is not valid UTF-8").with_source(e)),
        }
    }

    /// The mod revision of `key` as stored (read by this transaction, 0 when it does not
    /// exist), also after this transaction wrote it (as Go's `Rev`): the read is checked at
    /// commit like any other.
    pub async fn mod_revision(&self, key: impl IntoBytes) -> Result<i64> {
        Ok(self.read(key.into_bytes()).await?.0)
    }

    /// An error to return from the closure to abort the transaction without writing
    /// (kind [`ErrorKind::Canceled`], with `reason` in its message). Any `Err` aborts; this
    /// is for closures that have no etcd error to return.
    pub fn abort(&self, reason: impl std::fmt::Display) -> Error {
        Error::new(
            ErrorKind::Canceled,
            format!("software transaction aborted: {reason}"),
        )
    }

    /// Buffer a write of `value` at `key` (applied at commit).
    pub fn put(&self, key: impl IntoBytes, value: impl IntoBytes) {
        self.lock()
            .writes
            .insert(key.into_bytes(), Some(value.into_bytes()));
    }

    /// Buffer a delete of `key` (applied at commit).
    pub fn delete(&self, key: impl IntoBytes) {
        self.lock().writes.insert(key.into_bytes(), None);
    }

    /// Commit: Ok(true) when applied, Ok(false) on a conflict.
    async fn commit(&self) -> Result<bool> {
        let (compares, ops) = {
            let st = self.lock();
            let mut compares = Vec::new();
            if self.isolation != Isolation::ReadCommitted {
                for (k, (m, _)) in &st.reads {
                    compares.push(Compare::mod_revision(
                        self.scope.full(k),
                        CompareOp::Equal,
                        *m,
                    ));
                }
            }
            if self.isolation == Isolation::SerializableSnapshot && st.first_rev > 0 {
                for k in st.writes.keys() {
                    compares.push(Compare::mod_revision(
                        self.scope.full(k),
                        CompareOp::Less,
                        st.first_rev.saturating_add(1),
                    ));
                }
            }
            let ops: Vec<Op> = st
                .writes
                .iter()
                .map(|(k, v)| match v {
                    Some(v) => Op::from(Op::put(self.scope.full(k), v.clone())),
                    None => Op::from(Op::delete(self.scope.full(k))),
                })
                .collect();
            (compares, ops)
        };
        if ops.is_empty() && compares.is_empty() {
            return Ok(true);
        }
        let resp = self.scope.kv().txn().when(compares).and_then(ops).await?;
        Ok(resp.succeeded)
    }
}
