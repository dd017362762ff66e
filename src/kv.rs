//! The key-value API: get, put, delete, transactions and compaction.
//!
//! Requests are builders that are awaited directly:
//!
//! ```no_run
//! # async fn demo(client: etcdv3::Client) -> etcdv3::Result<()> {
//! use etcdv3::{SortOrder, SortTarget};
//! let kv = client.kv();
//! kv.put("/app/a", "1").await?;
//! let resp = kv
//!     .get("/app/")
//!     .prefix()
//!     .sort(SortTarget::Key, SortOrder::Descend)
//!     .limit(10)
//!     .await?;
//! for item in &resp.kvs {
//!     println!("{} = {}", item.key_str()?, item.value_str()?);
//! }
//! # Ok(()) }
//! ```

use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use prost::Message;

use crate::client::{CallOpts, Client, Config, OrderingGuard, Shared};
use crate::error::{Error, ErrorKind, Result};
use crate::proto::etcdserverpb as pb;
use crate::txn::Txn;
use crate::types::{IntoBytes, KeyValue, ResponseHeader, prefix_range_end};

pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Marker for a request built as a transaction operation (see [`Op`](crate::Op)): it has no
/// client to be sent with and cannot be awaited on its own.
#[derive(Debug, Clone, Copy, Default)]
pub struct Detached;

/// The key-value API of a [`Client`]; get it with [`Client::kv`]. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Kv {
    client: Client,
}

impl Kv {
    pub(crate) fn new(client: Client) -> Self {
        Kv { client }
    }

    /// Read `key` (or, with the builder's options, a range of keys).
    pub fn get(&self, key: impl IntoBytes) -> Get {
        Get::with(self.clone(), key.into_bytes())
    }

    /// Read every key in the store (the range `"\0"`..`"\0"`). Combine with `limit`,
    /// `keys_only`, `count_only` to keep the answer small.
    pub fn get_all(&self) -> Get {
        Get::with(self.clone(), Bytes::from_static(b"\0")).from_key()
    }

    /// Write `value` at `key`.
    pub fn put(&self, key: impl IntoBytes, value: impl IntoBytes) -> Put {
        Put::with(self.clone(), key.into_bytes(), value.into_bytes())
    }

    /// Delete `key` (or, with the builder's options, a range of keys).
    pub fn delete(&self, key: impl IntoBytes) -> Delete {
        Delete::with(self.clone(), key.into_bytes())
    }

    /// Start a transaction: `when(compares)`, `and_then(ops)`, `or_else(ops)`, then await it.
    pub fn txn(&self) -> Txn {
        Txn::with(self.clone())
    }

    /// Compact the key-value history up to `revision`: older versions of keys become
    /// unreadable, and watches from before it fail with [`ErrorKind::Compacted`].
    pub fn compact(&self, revision: i64) -> Compact {
        Compact {
            kv: self.clone(),
            req: pb::CompactionRequest {
                revision,
                physical: false,
            },
            opts: CallOpts::mutation("Compact"),
        }
    }

    pub(crate) fn config(&self) -> &Config {
        self.client.config()
    }

    pub(crate) async fn range(&self, req: pb::RangeRequest, opts: CallOpts) -> Result<GetResponse> {
        validate_range(&req)?;
        let shared = self.client.shared();
        let max = self.config().max_encoding_bytes();
        let guard = self.config().ordering_guard;
        let serializable = req.serializable;
        // Re-reads elsewhere share the first read's deadline (only this rare setting reads
        // the clock for it).
        let deadline = (serializable && guard == OrderingGuard::RetryElsewhere)
            .then(|| opts.timeout.or(self.config().request_timeout))
            .flatten()
            .and_then(|t| tokio::time::Instant::now().checked_add(t));
        let mut attempts = 0;
        loop {
            attempts += 1;
            let mut opts = opts;
            if attempts > 1
                && let Some(d) = deadline
            {
                let left = d.saturating_duration_since(tokio::time::Instant::now());
                if left.is_zero() {
                    return Err(Error::new(ErrorKind::Deadline, "request deadline exceeded"));
                }
                opts.timeout = Some(left);
            }
            let seen = shared.max_revision();
            let (resp, pick) = shared
                .unary_at(req.clone(), opts, move |ch, r| {
                    crate::grpc::unary(ch, "/etcdserverpb.KV/Range", r, max, usize::MAX)
                })
                .await?;
            let resp = GetResponse::from_pb(resp);
            let rev = resp.header.revision;
            if serializable && rev < seen && guard != OrderingGuard::Off {
                let err = Error::new(
                    ErrorKind::StaleRead,
                    format!(
                        "serializable read answered at revision {rev}, but revision {seen} was already seen"
                    ),
                )
                .at_endpoint(pick.endpoint());
                if guard == OrderingGuard::RetryElsewhere && attempts < shared_len(shared) {
                    shared.report_failure(&pick, &err);
                    continue;
                }
                return Err(err);
            }
            shared.observe_revision(rev);
            return Ok(resp);
        }
    }

    pub(crate) async fn put_pb(&self, req: pb::PutRequest, opts: CallOpts) -> Result<PutResponse> {
        validate_put(&req)?;
        check_size(req.encoded_len(), self.config())?;
        let max = self.config().max_encoding_bytes();
        let lease = req.lease;
        let sent = (lease != 0).then(|| tokio::time::Instant::now().into_std());
        let resp = self
            .client
            .unary(req, opts, move |ch, r| {
                crate::grpc::unary(ch, "/etcdserverpb.KV/Put", r, max, usize::MAX)
            })
            .await
            .inspect_err(|e| {
                crate::lease::note_write_error(&self.client, e, sent.map(|t| (lease, t)))
            })?;
        let resp = PutResponse::from_pb(resp);
        self.client.shared().observe_revision(resp.header.revision);
        Ok(resp)
    }

    pub(crate) async fn delete_pb(
        &self,
        req: pb::DeleteRangeRequest,
        opts: CallOpts,
    ) -> Result<DeleteResponse> {
        validate_delete(&req)?;
        let max = self.config().max_encoding_bytes();
        let resp = self
            .client
            .unary(req, opts, move |ch, r| {
                crate::grpc::unary(ch, "/etcdserverpb.KV/DeleteRange", r, max, usize::MAX)
            })
            .await?;
        let resp = DeleteResponse::from_pb(resp);
        self.client.shared().observe_revision(resp.header.revision);
        Ok(resp)
    }

    pub(crate) async fn txn_pb(
        &self,
        req: pb::TxnRequest,
        opts: CallOpts,
    ) -> Result<crate::TxnResponse> {
        crate::txn::validate_txn(&req, self.config())?;
        let mut opts = opts;
        // The lease of the transaction's puts, when they all have the same one: a "lease not
        // found" answer is about it (etcd checks the leases of the branch it takes).
        let mut lease = 0;
        if txn_is_read_only(&req) {
            // Not proposed through raft: etcd limits it only by its gRPC receive limit.
            check_size_with(req.encoded_len(), self.config(), GRPC_OVERHEAD)?;
            // Nothing to apply twice: retried like a range even once it may have been sent
            // (Go's client retries a transaction only when it was never sent).
            opts.idempotent = true;
        } else {
            check_size(req.encoded_len(), self.config())?;
            lease = txn_lease(&req).unwrap_or(0);
        }
        let max = self.config().max_encoding_bytes();
        let sent = (lease != 0).then(|| tokio::time::Instant::now().into_std());
        let resp = self
            .client
            .unary(req, opts, move |ch, r| {
                crate::grpc::unary(ch, "/etcdserverpb.KV/Txn", r, max, usize::MAX)
            })
            .await
            .inspect_err(|e| {
                crate::lease::note_write_error(&self.client, e, sent.map(|t| (lease, t)))
            })?;
        let resp = crate::TxnResponse::from_pb(resp);
        self.client.shared().observe_revision(resp.header.revision);
        Ok(resp)
    }

    async fn compact_pb(
        &self,
        req: pb::CompactionRequest,
        opts: CallOpts,
    ) -> Result<CompactResponse> {
        let max = self.config().max_encoding_bytes();
        let resp: pb::CompactionResponse = self
            .client
            .unary(req, opts, move |ch, r| {
                crate::grpc::unary(ch, "/etcdserverpb.KV/Compact", r, max, usize::MAX)
            })
            .await?;
        Ok(CompactResponse {
            header: ResponseHeader::from_pb(resp.header),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Client-side validation: reject what the server would reject anyway, with the same kind.

fn empty_key() -> Error {
    Error::new(ErrorKind::EmptyKey, "key is not provided")
}

pub(crate) fn validate_range(req: &pb::RangeRequest) -> Result<()> {
    if req.key.is_empty() {
        return Err(empty_key());
    }
    Ok(())
}

pub(crate) fn validate_put(req: &pb::PutRequest) -> Result<()> {
    if req.key.is_empty() {
        return Err(empty_key());
    }
    if req.ignore_value && !req.value.is_empty() {
        return Err(Error::new(
            ErrorKind::ValueProvided,
            "ignore_value is set and a value is given",
        ));
    }
    if req.ignore_lease && req.lease != 0 {
        return Err(Error::new(
            ErrorKind::LeaseProvided,
            "ignore_lease is set and a lease is given",
        ));
    }
    Ok(())
}

pub(crate) fn validate_delete(req: &pb::DeleteRangeRequest) -> Result<()> {
    if req.key.is_empty() {
        return Err(empty_key());
    }
    Ok(())
}

pub(crate) fn check_size(len: usize, cfg: &Config) -> Result<()> {
    check_size_with(len, cfg, 0)
}

/// What etcd's gRPC server accepts beyond `max-request-bytes` (its receive limit).
const GRPC_OVERHEAD: usize = 512 * 1024;

fn check_size_with(len: usize, cfg: &Config, extra: usize) -> Result<()> {
    let limit = cfg.max_request_bytes.saturating_add(extra);
    if len > limit {
        return Err(Error::new(
            ErrorKind::RequestTooLarge,
            format!(
                "request of {len} bytes exceeds the limit of {limit} bytes (max_request_bytes{})",
                if extra > 0 { " + gRPC's allowance" } else { "" }
            ),
        ));
    }
    Ok(())
}

/// Whether a transaction only reads (etcd serves it without raft, as `isTxnReadonly`).
fn txn_is_read_only(req: &pb::TxnRequest) -> bool {
    use pb::request_op::Request;
    req.success
        .iter()
        .chain(&req.failure)
        .all(|op| match &op.request {
            Some(Request::RequestRange(_)) => true,
            Some(Request::RequestTxn(t)) => txn_is_read_only(t),
            _ => false,
        })
}

/// The one lease the puts of a transaction (both branches, nested ones included) attach
/// keys to: `Some(0)` for no lease or no put, `None` when they use different leases.
fn txn_lease(req: &pb::TxnRequest) -> Option<i64> {
    use pb::request_op::Request;
    let mut found = 0;
    for op in req.success.iter().chain(&req.failure) {
        let lease = match &op.request {
            Some(Request::RequestPut(p)) => p.lease,
            Some(Request::RequestTxn(t)) => txn_lease(t)?,
            _ => 0,
        };
        if lease != 0 {
            if found != 0 && found != lease {
                return None;
            }
            found = lease;
        }
    }
    Some(found)
}

// ---------------------------------------------------------------------------------------------
// Sorting

/// Order of a sorted range read.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SortOrder {
    /// No sorting (keys come in key order).
    None,
    /// Lowest first.
    Ascend,
    /// Highest first.
    Descend,
}

/// What a sorted range read sorts by.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SortTarget {
    /// The key.
    Key,
    /// The key's version.
    Version,
    /// The key's create revision.
    Create,
    /// The key's last modification revision.
    Mod,
    /// The value.
    Value,
}

impl SortOrder {
    fn to_pb(self) -> pb::range_request::SortOrder {
        match self {
            SortOrder::None => pb::range_request::SortOrder::None,
            SortOrder::Ascend => pb::range_request::SortOrder::Ascend,
            SortOrder::Descend => pb::range_request::SortOrder::Descend,
        }
    }
}

impl SortTarget {
    fn to_pb(self) -> pb::range_request::SortTarget {
        match self {
            SortTarget::Key => pb::range_request::SortTarget::Key,
            SortTarget::Version => pb::range_request::SortTarget::Version,
            SortTarget::Create => pb::range_request::SortTarget::Create,
            SortTarget::Mod => pb::range_request::SortTarget::Mod,
            SortTarget::Value => pb::range_request::SortTarget::Value,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Get

/// A range read; await it (or turn a [`Detached`] one into a transaction [`Op`](crate::Op)).
#[must_use = "a request does nothing until it is awaited"]
#[derive(Debug, Clone)]
pub struct Get<C = Kv> {
    pub(crate) ctx: C,
    pub(crate) req: pb::RangeRequest,
    pub(crate) opts: CallOpts,
}

impl<C> Get<C> {
    pub(crate) fn with(ctx: C, key: Bytes) -> Self {
        Get {
            ctx,
            req: pb::RangeRequest {
                key,
                ..Default::default()
            },
            opts: CallOpts::read("Range"),
        }
    }

    /// Read every key that starts with the key. An empty key with `prefix()` reads all keys.
    pub fn prefix(mut self) -> Self {
        if self.req.key.is_empty() {
            // Go's convention: an empty prefix means every key.
            self.req.key = Bytes::from_static(b"\0");
            self.req.range_end = Bytes::from_static(b"\0");
        } else {
            self.req.range_end = prefix_range_end(&self.req.key);
        }
        self
    }

    /// Read every key greater than or equal to the key.
    pub fn from_key(mut self) -> Self {
        if self.req.key.is_empty() {
            self.req.key = Bytes::from_static(b"\0");
        }
        self.req.range_end = Bytes::from_static(b"\0");
        self
    }

    /// Read the half-open range `[key, end)`.
    pub fn range(mut self, end: impl IntoBytes) -> Self {
        self.req.range_end = end.into_bytes();
        self
    }

    /// Return at most `limit` keys (0: no limit). [`GetResponse::more`] tells whether more exist.
    pub fn limit(mut self, limit: i64) -> Self {
        self.req.limit = limit;
        self
    }

    /// Read as of `revision` (0 or unset: the latest). A compacted revision fails with
    /// [`ErrorKind::Compacted`], a future one with [`ErrorKind::FutureRevision`].
    pub fn revision(mut self, revision: i64) -> Self {
        self.req.revision = revision;
        self
    }

    /// Sort the result by `target` in `order`.
    pub fn sort(mut self, target: SortTarget, order: SortOrder) -> Self {
        self.req.sort_target = target.to_pb() as i32;
        self.req.sort_order = order.to_pb() as i32;
        self
    }

    /// Return keys without values.
    pub fn keys_only(mut self) -> Self {
        self.req.keys_only = true;
        self
    }

    /// Return only the count of matching keys ([`GetResponse::count`]), no key-value pairs.
    pub fn count_only(mut self) -> Self {
        self.req.count_only = true;
        self
    }

    /// Serve the read from the local member without consensus (faster; may be stale).
    pub fn serializable(mut self) -> Self {
        self.req.serializable = true;
        self
    }

    /// Only keys whose last modification revision is at least `rev`.
    pub fn min_mod_revision(mut self, rev: i64) -> Self {
        self.req.min_mod_revision = rev;
        self
    }

    /// Only keys whose last modification revision is at most `rev`.
    pub fn max_mod_revision(mut self, rev: i64) -> Self {
        self.req.max_mod_revision = rev;
        self
    }

    /// Only keys created at revision `rev` or later.
    pub fn min_create_revision(mut self, rev: i64) -> Self {
        self.req.min_create_revision = rev;
        self
    }

    /// Only keys created at revision `rev` or earlier.
    pub fn max_create_revision(mut self, rev: i64) -> Self {
        self.req.max_create_revision = rev;
        self
    }

    /// Ask the serving member to refuse the request when it has no leader (`hasleader`), so
    /// a member cut off from the cluster cannot answer it; overrides the client's default.
    pub fn require_leader(mut self, on: bool) -> Self {
        self.opts.require_leader = Some(on);
        self
    }

    /// This request's deadline, overriding the client's default request timeout.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.opts.timeout = Some(timeout);
        self
    }
}

impl IntoFuture for Get<Kv> {
    type Output = Result<GetResponse>;
    type IntoFuture = BoxFuture<Self::Output>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move { self.ctx.range(self.req, self.opts).await })
    }
}

/// The answer to a [`Get`].
#[non_exhaustive]
#[derive(Debug, Clone)]
pub struct GetResponse {
    /// Response header.
    pub header: ResponseHeader,
    /// The key-value pairs read (empty for `count_only`).
    pub kvs: Vec<KeyValue>,
    /// True when `limit` cut the answer short and more keys match.
    pub more: bool,
    /// How many keys match the request, regardless of `limit`.
    pub count: i64,
}

impl GetResponse {
    pub(crate) fn from_pb(r: pb::RangeResponse) -> Self {
        GetResponse {
            header: ResponseHeader::from_pb(r.header),
            kvs: r.kvs.into_iter().map(KeyValue::from_pb).collect(),
            more: r.more,
            count: r.count,
        }
    }

    /// The first key-value pair, if any (the one for a single-key read).
    pub fn first(&self) -> Option<&KeyValue> {
        self.kvs.first()
    }
}

// ---------------------------------------------------------------------------------------------
// Put

/// A write of one key; await it (or turn a [`Detached`] one into a transaction [`Op`](crate::Op)).
#[must_use = "a request does nothing until it is awaited"]
#[derive(Debug, Clone)]
pub struct Put<C = Kv> {
    pub(crate) ctx: C,
    pub(crate) req: pb::PutRequest,
    pub(crate) opts: CallOpts,
}

impl<C> Put<C> {
    pub(crate) fn with(ctx: C, key: Bytes, value: Bytes) -> Self {
        Put {
            ctx,
            req: pb::PutRequest {
                key,
                value,
                ..Default::default()
            },
            opts: CallOpts::mutation("Put"),
        }
    }

    /// Attach the key to lease `id`: the key is deleted when the lease expires.
    pub fn lease(mut self, id: i64) -> Self {
        self.req.lease = id;
        self
    }

    /// Return the key-value pair as it was before this write ([`PutResponse::prev_kv`]).
    pub fn prev_kv(mut self) -> Self {
        self.req.prev_kv = true;
        self
    }

    /// Keep the key's current value (update only its lease). The value given must be empty,
    /// else [`ErrorKind::ValueProvided`]; the key must exist, else [`ErrorKind::KeyNotFound`].
    pub fn ignore_value(mut self) -> Self {
        self.req.ignore_value = true;
        self
    }

    /// Keep the key's current lease (update only its value). No lease may be given, else
    /// [`ErrorKind::LeaseProvided`]; the key must exist, else [`ErrorKind::KeyNotFound`].
    pub fn ignore_lease(mut self) -> Self {
        self.req.ignore_lease = true;
        self
    }

    /// Ask the serving member to refuse the request when it has no leader (`hasleader`), so
    /// a member cut off from the cluster cannot answer it; overrides the client's default.
    pub fn require_leader(mut self, on: bool) -> Self {
        self.opts.require_leader = Some(on);
        self
    }

    /// This request's deadline, overriding the client's default request timeout.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.opts.timeout = Some(timeout);
        self
    }
}

impl IntoFuture for Put<Kv> {
    type Output = Result<PutResponse>;
    type IntoFuture = BoxFuture<Self::Output>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move { self.ctx.put_pb(self.req, self.opts).await })
    }
}

/// The answer to a [`Put`].
#[non_exhaustive]
#[derive(Debug, Clone)]
pub struct PutResponse {
    /// Response header; `header.revision` is the revision this write created.
    pub header: ResponseHeader,
    /// The previous key-value pair, when `prev_kv` was asked for and the key existed.
    pub prev_kv: Option<KeyValue>,
}

impl PutResponse {
    pub(crate) fn from_pb(r: pb::PutResponse) -> Self {
        PutResponse {
            header: ResponseHeader::from_pb(r.header),
            prev_kv: r.prev_kv.map(KeyValue::from_pb),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Delete

/// A delete of a key or range; await it (or turn a [`Detached`] one into an [`Op`](crate::Op)).
#[must_use = "a request does nothing until it is awaited"]
#[derive(Debug, Clone)]
pub struct Delete<C = Kv> {
    pub(crate) ctx: C,
    pub(crate) req: pb::DeleteRangeRequest,
    pub(crate) opts: CallOpts,
}

impl<C> Delete<C> {
    pub(crate) fn with(ctx: C, key: Bytes) -> Self {
        Delete {
            ctx,
            req: pb::DeleteRangeRequest {
                key,
                ..Default::default()
            },
            opts: CallOpts::mutation("DeleteRange"),
        }
    }

    /// Delete every key that starts with the key. An empty key with `prefix()` deletes all keys.
    pub fn prefix(mut self) -> Self {
        if self.req.key.is_empty() {
            // Go's convention: an empty prefix means every key.
            self.req.key = Bytes::from_static(b"\0");
            self.req.range_end = Bytes::from_static(b"\0");
        } else {
            self.req.range_end = prefix_range_end(&self.req.key);
        }
        self
    }

    /// Delete every key greater than or equal to the key.
    pub fn from_key(mut self) -> Self {
        if self.req.key.is_empty() {
            self.req.key = Bytes::from_static(b"\0");
        }
        self.req.range_end = Bytes::from_static(b"\0");
        self
    }

    /// Delete the half-open range `[key, end)`.
    pub fn range(mut self, end: impl IntoBytes) -> Self {
        self.req.range_end = end.into_bytes();
        self
    }

    /// Return the deleted key-value pairs ([`DeleteResponse::prev_kvs`]).
    pub fn prev_kv(mut self) -> Self {
        self.req.prev_kv = true;
        self
    }

    /// Ask the serving member to refuse the request when it has no leader (`hasleader`), so
    /// a member cut off from the cluster cannot answer it; overrides the client's default.
    pub fn require_leader(mut self, on: bool) -> Self {
        self.opts.require_leader = Some(on);
        self
    }

    /// This request's deadline, overriding the client's default request timeout.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.opts.timeout = Some(timeout);
        self
    }
}

impl IntoFuture for Delete<Kv> {
    type Output = Result<DeleteResponse>;
    type IntoFuture = BoxFuture<Self::Output>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move { self.ctx.delete_pb(self.req, self.opts).await })
    }
}

/// The answer to a [`Delete`].
#[non_exhaustive]
#[derive(Debug, Clone)]
pub struct DeleteResponse {
    /// Response header; `header.revision` is the revision this delete created (when it
    /// deleted anything).
    pub header: ResponseHeader,
    /// How many keys were deleted.
    pub deleted: i64,
    /// The deleted key-value pairs, when `prev_kv` was asked for.
    pub prev_kvs: Vec<KeyValue>,
}

impl DeleteResponse {
    pub(crate) fn from_pb(r: pb::DeleteRangeResponse) -> Self {
        DeleteResponse {
            header: ResponseHeader::from_pb(r.header),
            deleted: r.deleted,
            prev_kvs: r.prev_kvs.into_iter().map(KeyValue::from_pb).collect(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Compact

/// A compaction of the key-value history; await it.
#[must_use = "a request does nothing until it is awaited"]
#[derive(Debug, Clone)]
pub struct Compact {
    kv: Kv,
    req: pb::CompactionRequest,
    opts: CallOpts,
}

impl Compact {
    /// Wait until the compaction has been physically applied to the backend, so that the space
    /// can be reclaimed (defragmentation) and the history is certainly gone.
    pub fn physical(mut self) -> Self {
        self.req.physical = true;
        self
    }

    /// Ask the serving member to refuse the request when it has no leader (`hasleader`), so
    /// a member cut off from the cluster cannot answer it; overrides the client's default.
    pub fn require_leader(mut self, on: bool) -> Self {
        self.opts.require_leader = Some(on);
        self
    }

    /// This request's deadline, overriding the client's default request timeout.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.opts.timeout = Some(timeout);
        self
    }
}

impl IntoFuture for Compact {
    type Output = Result<CompactResponse>;
    type IntoFuture = BoxFuture<Self::Output>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move { self.kv.compact_pb(self.req, self.opts).await })
    }
}

/// The answer to a [`Compact`].
#[non_exhaustive]
#[derive(Debug, Clone)]
pub struct CompactResponse {
    /// Response header.
    pub header: ResponseHeader,
}

/// How many attempts the ordering guard may make: one per endpoint.
fn shared_len(shared: &Shared) -> usize {
    shared.endpoint_count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use pb::request_op::Request;

    fn put(lease: i64) -> pb::RequestOp {
        pb::RequestOp {
            request: Some(Request::RequestPut(pb::PutRequest {
                key: b"k".to_vec().into(),
                lease,
                ..Default::default()
            })),
        }
    }

    fn nested(ops: Vec<pb::RequestOp>) -> pb::RequestOp {
        pb::RequestOp {
            request: Some(Request::RequestTxn(pb::TxnRequest {
                success: ops,
                ..Default::default()
            })),
        }
    }

    fn txn(success: Vec<pb::RequestOp>, failure: Vec<pb::RequestOp>) -> pb::TxnRequest {
        pb::TxnRequest {
            success,
            failure,
            ..Default::default()
        }
    }

    #[test]
    fn a_transaction_s_lease_is_the_one_all_its_puts_use() {
        assert_eq!(txn_lease(&txn(vec![], vec![])), Some(0));
        assert_eq!(txn_lease(&txn(vec![put(0)], vec![put(0)])), Some(0));
        assert_eq!(txn_lease(&txn(vec![put(7), put(0)], vec![put(7)])), Some(7));
        assert_eq!(
            txn_lease(&txn(vec![put(0)], vec![nested(vec![put(7)])])),
            Some(7)
        );
        assert_eq!(txn_lease(&txn(vec![put(7)], vec![put(8)])), None);
        assert_eq!(
            txn_lease(&txn(vec![put(7), nested(vec![put(8)])], vec![])),
            None
        );
    }
}
