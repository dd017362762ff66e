//! [`Namespace`]: a view of a client in which every key is prefixed (Go's `namespace`
//! package), for KV, watch, leases and the concurrency recipes.

use std::future::{Future, IntoFuture};
use std::time::Duration;

use bytes::Bytes;

use crate::client::Client;
use crate::concurrency::{Election, Mutex, Scope, Session, Stm, StmTxn};
use crate::error::{Error, ErrorKind, Result};
use crate::kv::{BoxFuture, Delete, DeleteResponse, Get, GetResponse, Kv, Put, PutResponse};
use crate::lease::{Lease, TimeToLive, TimeToLiveResponse};
use crate::proto::etcdserverpb as pb;
use crate::txn::{Txn, TxnOpResponse, TxnResponse};
use crate::types::{IntoBytes, prefix_range_end};
use crate::watch::{Watch, WatchBatch, Watcher};

impl Client {
    /// A view of this client in which every key is prefixed with `prefix` (e.g.
    /// `"/apps/x/"`): keys sent are prefixed, keys returned are stripped, and ranges stay
    /// inside the prefix (an all-keys read returns only the namespace's keys).
    pub fn with_namespace(&self, prefix: impl IntoBytes) -> Namespace {
        Namespace {
            client: self.clone(),
            ns: prefix.into_bytes(),
        }
    }
}

/// A prefixed view of a [`Client`]; see [`Client::with_namespace`]. Cheap to clone.
///
/// ```no_run
/// # async fn demo(client: etcdv3::Client) -> etcdv3::Result<()> {
/// let app = client.with_namespace("/apps/x/");
/// app.kv().put("config", "v1").await?; // writes /apps/x/config
/// let all = app.kv().get_all().await?; // only /apps/x/ keys, returned as "config"
/// assert_eq!(all.kvs[0].key().as_ref(), b"config");
/// # Ok(()) }
/// ```
///
/// Everything prefixed: get/put/delete (keys and range ends), transaction compares and
/// operations (nested too) and their answers, watches (events come back stripped), the keys
/// of [`NsLease::time_to_live`], and the recipes made here ([`Namespace::mutex`],
/// [`Namespace::election`], [`Namespace::stm`]). A range end of `"\0"` ("to the end") means
/// to the end of the namespace. Leases themselves are not namespaced (a lease is an ID, not a
/// key), so a [`Session`] works in any namespace.
#[derive(Debug, Clone)]
pub struct Namespace {
    client: Client,
    ns: Bytes,
}

impl Namespace {
    /// The prefix.
    pub fn prefix(&self) -> &Bytes {
        &self.ns
    }

    /// The underlying (un-prefixed) client.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The key-value API inside the namespace.
    pub fn kv(&self) -> NsKv {
        NsKv {
            kv: self.client.kv(),
            ns: self.ns.clone(),
        }
    }

    /// Watch `key` inside the namespace; events come back with keys relative to it.
    pub fn watch(&self, key: impl IntoBytes) -> NsWatch {
        let key = key.into_bytes();
        NsWatch {
            inner: self.client.watch(full(&self.ns, &key)),
            ns: self.ns.clone(),
        }
    }

    /// The lease API, with [`NsLease::time_to_live`] keys relative to the namespace.
    pub fn lease(&self) -> NsLease {
        NsLease {
            lease: self.client.lease(),
            ns: self.ns.clone(),
        }
    }

    /// A [`Mutex`] on `prefix` inside the namespace (its [`Mutex::key`] and
    /// [`Mutex::is_owner`] are relative to the namespace: use them with this view's
    /// transactions).
    pub fn mutex(&self, session: &Session, prefix: impl IntoBytes) -> Mutex {
        Mutex::in_scope(session, self.scope(session), prefix.into_bytes())
    }

    /// An [`Election`] on `prefix` inside the namespace (keys and values it returns are
    /// relative to the namespace).
    pub fn election(&self, session: &Session, prefix: impl IntoBytes) -> Election {
        Election::in_scope(session, self.scope(session), prefix.into_bytes())
    }

    /// A software transaction ([`stm`](crate::stm)) whose keys are inside the namespace.
    pub fn stm<F, Fut, T>(&self, apply: F) -> Stm<F>
    where
        F: FnMut(StmTxn) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T>> + Send + 'static,
        T: Send + 'static,
    {
        Stm::in_scope(Scope::new(self.client.clone(), self.ns.clone()), apply)
    }

    fn scope(&self, session: &Session) -> Scope {
        Scope::new(session.client().clone(), self.ns.clone())
    }
}

fn full(ns: &[u8], key: &[u8]) -> Bytes {
    let mut v = Vec::with_capacity(ns.len() + key.len());
    v.extend_from_slice(ns);
    v.extend_from_slice(key);
    Bytes::from(v)
}

/// Go's `prefixInterval`: the absolute `[key, end)` of a namespace-relative one. An end of
/// `"\0"` (to the end of the keyspace) becomes the end of the namespace; an empty end stays
/// empty (a single key).
fn interval(ns: &[u8], key: &[u8], end: &[u8]) -> (Bytes, Bytes) {
    let k = full(ns, key);
    let e = if end == b"\0" {
        prefix_range_end(ns)
    } else if end.is_empty() {
        Bytes::new()
    } else {
        full(ns, end)
    };
    (k, e)
}

fn range_req(ns: &[u8], r: &mut pb::RangeRequest) {
    let (k, e) = interval(ns, &r.key, &r.range_end);
    r.key = k;
    r.range_end = e;
}

fn delete_req(ns: &[u8], r: &mut pb::DeleteRangeRequest) {
    let (k, e) = interval(ns, &r.key, &r.range_end);
    r.key = k;
    r.range_end = e;
}

fn txn_req(ns: &[u8], t: &mut pb::TxnRequest) {
    for c in &mut t.compare {
        let (k, e) = interval(ns, &c.key, &c.range_end);
        c.key = k;
        c.range_end = e;
    }
    for op in t.success.iter_mut().chain(t.failure.iter_mut()) {
        match &mut op.request {
            Some(pb::request_op::Request::RequestRange(r)) => range_req(ns, r),
            Some(pb::request_op::Request::RequestPut(p)) => p.key = full(ns, &p.key),
            Some(pb::request_op::Request::RequestDeleteRange(d)) => delete_req(ns, d),
            Some(pb::request_op::Request::RequestTxn(t)) => txn_req(ns, t),
            None => {}
        }
    }
}

fn strip_get(n: usize, mut r: GetResponse) -> GetResponse {
    r.kvs = r.kvs.into_iter().map(|kv| kv.strip_key_prefix(n)).collect();
    r
}

fn strip_put(n: usize, mut r: PutResponse) -> PutResponse {
    r.prev_kv = r.prev_kv.map(|kv| kv.strip_key_prefix(n));
    r
}

fn strip_delete(n: usize, mut r: DeleteResponse) -> DeleteResponse {
    r.prev_kvs = r
        .prev_kvs
        .into_iter()
        .map(|kv| kv.strip_key_prefix(n))
        .collect();
    r
}

fn strip_txn(n: usize, mut r: TxnResponse) -> TxnResponse {
    r.responses = r
        .responses
        .into_iter()
        .map(|op| match op {
            TxnOpResponse::Get(g) => TxnOpResponse::Get(strip_get(n, g)),
            TxnOpResponse::Put(p) => TxnOpResponse::Put(strip_put(n, p)),
            TxnOpResponse::Delete(d) => TxnOpResponse::Delete(strip_delete(n, d)),
            TxnOpResponse::Txn(t) => TxnOpResponse::Txn(strip_txn(n, t)),
        })
        .collect();
    r
}

/// The key-value API inside a [`Namespace`]: the same builders as [`Kv`]'s, with keys
/// relative to the namespace.
#[derive(Debug, Clone)]
pub struct NsKv {
    kv: Kv,
    ns: Bytes,
}

impl NsKv {
    /// Read `key` (or a range, with the builder's options).
    pub fn get(&self, key: impl IntoBytes) -> Get<NsKv> {
        Get::with(self.clone(), key.into_bytes())
    }

    /// Read every key of the namespace.
    pub fn get_all(&self) -> Get<NsKv> {
        Get::with(self.clone(), Bytes::from_static(b"\0")).from_key()
    }

    /// Write `value` at `key`.
    pub fn put(&self, key: impl IntoBytes, value: impl IntoBytes) -> Put<NsKv> {
        Put::with(self.clone(), key.into_bytes(), value.into_bytes())
    }

    /// Delete `key` (or a range, with the builder's options).
    pub fn delete(&self, key: impl IntoBytes) -> Delete<NsKv> {
        Delete::with(self.clone(), key.into_bytes())
    }

    /// A transaction; compares and operations (built with [`Op`](crate::Op) and
    /// [`Compare`](crate::Compare) on relative keys) are prefixed when sent.
    pub fn txn(&self) -> Txn<NsKv> {
        Txn::with(self.clone())
    }
}

impl IntoFuture for Get<NsKv> {
    type Output = Result<GetResponse>;
    type IntoFuture = BoxFuture<Self::Output>;

    fn into_future(mut self) -> Self::IntoFuture {
        Box::pin(async move {
            if self.req.key.is_empty() {
                return Err(Error::new(ErrorKind::EmptyKey, "key is not provided"));
            }
            let ns = self.ctx.ns.clone();
            range_req(&ns, &mut self.req);
            let r = self.ctx.kv.range(self.req, self.opts).await?;
            Ok(strip_get(ns.len(), r))
        })
    }
}

impl IntoFuture for Put<NsKv> {
    type Output = Result<PutResponse>;
    type IntoFuture = BoxFuture<Self::Output>;

    fn into_future(mut self) -> Self::IntoFuture {
        Box::pin(async move {
            if self.req.key.is_empty() {
                return Err(Error::new(ErrorKind::EmptyKey, "key is not provided"));
            }
            let ns = self.ctx.ns.clone();
            self.req.key = full(&ns, &self.req.key);
            let r = self.ctx.kv.put_pb(self.req, self.opts).await?;
            Ok(strip_put(ns.len(), r))
        })
    }
}

impl IntoFuture for Delete<NsKv> {
    type Output = Result<DeleteResponse>;
    type IntoFuture = BoxFuture<Self::Output>;

    fn into_future(mut self) -> Self::IntoFuture {
        Box::pin(async move {
            if self.req.key.is_empty() {
                return Err(Error::new(ErrorKind::EmptyKey, "key is not provided"));
            }
            let ns = self.ctx.ns.clone();
            delete_req(&ns, &mut self.req);
            let r = self.ctx.kv.delete_pb(self.req, self.opts).await?;
            Ok(strip_delete(ns.len(), r))
        })
    }
}

impl IntoFuture for Txn<NsKv> {
    type Output = Result<TxnResponse>;
    type IntoFuture = BoxFuture<Self::Output>;

    fn into_future(mut self) -> Self::IntoFuture {
        Box::pin(async move {
            // Validate relative keys first (an empty relative key is still an error).
            crate::txn::validate_txn(&self.req, self.ctx.kv.config())?;
            let ns = self.ctx.ns.clone();
            txn_req(&ns, &mut self.req);
            let r = self.ctx.kv.txn_pb(self.req, self.opts).await?;
            Ok(strip_txn(ns.len(), r))
        })
    }
}

/// A watch inside a [`Namespace`]; await it for an [`NsWatcher`], or add it to a
/// [`WatchGroup`](crate::WatchGroup) (its batches there carry relative keys too).
#[must_use = "a watch does nothing until awaited"]
#[derive(Debug)]
pub struct NsWatch {
    inner: Watch,
    ns: Bytes,
}

impl NsWatch {
    /// Watch every key that starts with the key (inside the namespace).
    pub fn prefix(mut self) -> Self {
        self.inner = self.inner.prefix();
        self
    }

    /// Watch every key from the key to the end of the namespace.
    pub fn from_key(mut self) -> Self {
        self.inner = self.inner.range(prefix_range_end(&self.ns));
        self
    }

    /// Watch `[key, end)` (`end` relative; `"\0"`: to the end of the namespace).
    pub fn range(mut self, end: impl IntoBytes) -> Self {
        let end = end.into_bytes();
        let (_, e) = interval(&self.ns, b"", &end);
        self.inner = self.inner.range(e);
        self
    }

    /// See [`Watch::start_revision`].
    pub fn start_revision(mut self, revision: i64) -> Self {
        self.inner = self.inner.start_revision(revision);
        self
    }

    /// See [`Watch::prev_kv`].
    pub fn prev_kv(mut self) -> Self {
        self.inner = self.inner.prev_kv();
        self
    }

    /// See [`Watch::no_put`].
    pub fn no_put(mut self) -> Self {
        self.inner = self.inner.no_put();
        self
    }

    /// See [`Watch::no_delete`].
    pub fn no_delete(mut self) -> Self {
        self.inner = self.inner.no_delete();
        self
    }

    /// See [`Watch::progress_notify`].
    pub fn progress_notify(mut self) -> Self {
        self.inner = self.inner.progress_notify();
        self
    }

    /// See [`Watch::fragment`].
    pub fn fragment(mut self) -> Self {
        self.inner = self.inner.fragment();
        self
    }

    /// See [`Watch::created_notify`].
    pub fn created_notify(mut self) -> Self {
        self.inner = self.inner.created_notify();
        self
    }

    /// See [`Watch::require_leader`].
    pub fn require_leader(mut self, require: bool) -> Self {
        self.inner = self.inner.require_leader(require);
        self
    }

    /// See [`Watch::buffer`].
    pub fn buffer(mut self, batches: usize) -> Self {
        self.inner = self.inner.buffer(batches);
        self
    }
}

impl crate::watch::GroupWatchParts for NsWatch {
    fn into_parts(self) -> (Watch, usize) {
        (self.inner, self.ns.len())
    }
}

impl crate::watch::GroupWatch for NsWatch {}

impl IntoFuture for NsWatch {
    type Output = Result<NsWatcher>;
    type IntoFuture = BoxFuture<Result<NsWatcher>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            let inner = self.inner.await?;
            Ok(NsWatcher {
                inner,
                strip: self.ns.len(),
            })
        })
    }
}

/// A [`Watcher`] inside a [`Namespace`]: batches whose keys are relative to it. Also a
/// [`Stream`](futures_core::Stream).
#[derive(Debug)]
pub struct NsWatcher {
    inner: Watcher,
    strip: usize,
}

impl NsWatcher {
    /// The next batch (keys stripped), or `None` once the watcher has ended.
    pub async fn next(&mut self) -> Option<Result<WatchBatch>> {
        let strip = self.strip;
        self.inner
            .next()
            .await
            .map(|r| r.map(|b| b.strip_key_prefix(strip)))
    }

    /// The underlying watcher (cancel, progress requests).
    pub fn watcher(&self) -> &Watcher {
        &self.inner
    }
}

impl futures_core::Stream for NsWatcher {
    type Item = Result<WatchBatch>;

    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        let this = self.get_mut();
        let strip = this.strip;
        std::pin::Pin::new(&mut this.inner)
            .poll_next(cx)
            .map(|o| o.map(|r| r.map(|b| b.strip_key_prefix(strip))))
    }
}

/// The lease API inside a [`Namespace`]: like [`Lease`], with the keys of
/// [`time_to_live`](Self::time_to_live) relative to the namespace.
#[derive(Debug, Clone)]
pub struct NsLease {
    lease: Lease,
    ns: Bytes,
}

impl NsLease {
    /// The plain lease API (leases are not namespaced).
    pub fn inner(&self) -> &Lease {
        &self.lease
    }

    /// See [`Lease::grant`].
    pub fn grant(&self, ttl: i64) -> crate::Grant {
        self.lease.grant(ttl)
    }

    /// See [`Lease::revoke`].
    pub fn revoke(&self, id: i64) -> crate::Revoke {
        self.lease.revoke(id)
    }

    /// See [`Lease::keep_alive`].
    pub fn keep_alive(&self, id: i64) -> crate::KeepAlive {
        self.lease.keep_alive(id)
    }

    /// See [`Lease::time_to_live`]; the keys returned are those inside the namespace,
    /// relative to it.
    pub fn time_to_live(&self, id: i64) -> NsTimeToLive {
        NsTimeToLive {
            inner: self.lease.time_to_live(id),
            ns: self.ns.clone(),
        }
    }
}

/// A lease time-to-live query inside a [`Namespace`]; await it.
#[must_use = "a request does nothing until it is awaited"]
#[derive(Debug, Clone)]
pub struct NsTimeToLive {
    inner: TimeToLive,
    ns: Bytes,
}

impl NsTimeToLive {
    /// Also return the lease's keys (those inside the namespace, relative to it).
    pub fn keys(mut self) -> Self {
        self.inner = self.inner.keys();
        self
    }

    /// This request's deadline, overriding the client's default request timeout.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.inner = self.inner.timeout(timeout);
        self
    }
}

impl IntoFuture for NsTimeToLive {
    type Output = Result<TimeToLiveResponse>;
    type IntoFuture = BoxFuture<Self::Output>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            let mut r = self.inner.await?;
            let n = self.ns.len();
            r.keys = r
                .keys
                .into_iter()
                .filter(|k| k.starts_with(&self.ns))
                .map(|k| k.slice(n..))
                .collect();
            Ok(r)
        })
    }
}
