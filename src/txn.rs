//! Transactions: compares, operations, and the [`Txn`] builder.
//!
//! ```no_run
//! # async fn demo(client: etcdv3::Client) -> etcdv3::Result<()> {
//! use etcdv3::{Compare, CompareOp, Op};
//! // Create "/cfg/x" only if it does not exist yet (version 0 means "absent").
//! let resp = client
//!     .kv()
//!     .txn()
//!     .when([Compare::version("/cfg/x", CompareOp::Equal, 0)])
//!     .and_then([Op::put("/cfg/x", "1")])
//!     .or_else([Op::get("/cfg/x")])
//!     .await?;
//! println!("created: {}", resp.succeeded);
//! # Ok(()) }
//! ```

use std::future::IntoFuture;
use std::time::Duration;

use bytes::Bytes;

use crate::client::{CallOpts, Config};
use crate::error::{Error, ErrorKind, Result};
use crate::kv::{
    BoxFuture, Delete, DeleteResponse, Detached, Get, GetResponse, Kv, Put, PutResponse,
    validate_delete, validate_put, validate_range,
};
use crate::proto::etcdserverpb as pb;
use crate::types::{IntoBytes, ResponseHeader, prefix_range_end};

/// How a [`Compare`] compares the key's field with the given operand.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CompareOp {
    /// field == operand
    Equal,
    /// field > operand
    Greater,
    /// field < operand
    Less,
    /// field != operand
    NotEqual,
}

impl CompareOp {
    fn to_pb(self) -> pb::compare::CompareResult {
        match self {
            CompareOp::Equal => pb::compare::CompareResult::Equal,
            CompareOp::Greater => pb::compare::CompareResult::Greater,
            CompareOp::Less => pb::compare::CompareResult::Less,
            CompareOp::NotEqual => pb::compare::CompareResult::NotEqual,
        }
    }
}

/// One condition of a transaction's `when` clause.
///
/// A compare over a range (`with_range`, `with_prefix`) holds when it holds for every key in
/// the range. A key that does not exist has version, create and mod revision 0 and lease 0.
#[derive(Debug, Clone, PartialEq)]
pub struct Compare {
    pub(crate) inner: pb::Compare,
}

impl Compare {
    fn new(
        key: impl IntoBytes,
        op: CompareOp,
        target: pb::compare::CompareTarget,
        u: pb::compare::TargetUnion,
    ) -> Self {
        Compare {
            inner: pb::Compare {
                result: op.to_pb() as i32,
                target: target as i32,
                key: key.into_bytes(),
                target_union: Some(u),
                range_end: Bytes::new(),
            },
        }
    }

    /// Compare the key's value.
    pub fn value(key: impl IntoBytes, op: CompareOp, value: impl IntoBytes) -> Self {
        Self::new(
            key,
            op,
            pb::compare::CompareTarget::Value,
            pb::compare::TargetUnion::Value(value.into_bytes()),
        )
    }

    /// Compare the key's version (number of writes since creation; 0 when absent).
    pub fn version(key: impl IntoBytes, op: CompareOp, version: i64) -> Self {
        Self::new(
            key,
            op,
            pb::compare::CompareTarget::Version,
            pb::compare::TargetUnion::Version(version),
        )
    }

    /// Compare the key's create revision (0 when absent).
    pub fn create_revision(key: impl IntoBytes, op: CompareOp, revision: i64) -> Self {
        Self::new(
            key,
            op,
            pb::compare::CompareTarget::Create,
            pb::compare::TargetUnion::CreateRevision(revision),
        )
    }

    /// Compare the key's last modification revision (0 when absent).
    pub fn mod_revision(key: impl IntoBytes, op: CompareOp, revision: i64) -> Self {
        Self::new(
            key,
            op,
            pb::compare::CompareTarget::Mod,
            pb::compare::TargetUnion::ModRevision(revision),
        )
    }

    /// Compare the key's lease ID (0 when none).
    pub fn lease(key: impl IntoBytes, op: CompareOp, lease_id: i64) -> Self {
        Self::new(
            key,
            op,
            pb::compare::CompareTarget::Lease,
            pb::compare::TargetUnion::Lease(lease_id),
        )
    }

    /// Apply the compare to every key in `[key, end)`.
    pub fn with_range(mut self, end: impl IntoBytes) -> Self {
        self.inner.range_end = end.into_bytes();
        self
    }

    /// Apply the compare to every key starting with the key.
    pub fn with_prefix(mut self) -> Self {
        if self.inner.key.is_empty() {
            self.inner.key = Bytes::from_static(b"\0");
            self.inner.range_end = Bytes::from_static(b"\0");
        } else {
            self.inner.range_end = prefix_range_end(&self.inner.key);
        }
        self
    }

    /// Apply the compare to every key greater than or equal to the key (an empty key: to
    /// every key, as [`with_prefix`](Self::with_prefix) of an empty key).
    pub fn with_from_key(mut self) -> Self {
        if self.inner.key.is_empty() {
            self.inner.key = Bytes::from_static(b"\0");
        }
        self.inner.range_end = Bytes::from_static(b"\0");
        self
    }
}

/// One operation of a transaction branch: a get, put, delete, or a nested transaction.
///
/// Build it with [`Op::get`], [`Op::put`], [`Op::delete`], [`Op::txn`]; these return the same
/// builders as the plain requests (with every option), which convert into `Op`.
#[derive(Debug, Clone, PartialEq)]
pub struct Op {
    pub(crate) inner: pb::RequestOp,
}

impl Op {
    /// A range read as a transaction operation.
    pub fn get(key: impl IntoBytes) -> Get<Detached> {
        Get::with(Detached, key.into_bytes())
    }

    /// A write as a transaction operation.
    pub fn put(key: impl IntoBytes, value: impl IntoBytes) -> Put<Detached> {
        Put::with(Detached, key.into_bytes(), value.into_bytes())
    }

    /// A delete as a transaction operation.
    pub fn delete(key: impl IntoBytes) -> Delete<Detached> {
        Delete::with(Detached, key.into_bytes())
    }

    /// A nested transaction as an operation (etcd 3.3 and later).
    pub fn txn() -> Txn<Detached> {
        Txn::with(Detached)
    }
}

impl From<Get<Detached>> for Op {
    fn from(g: Get<Detached>) -> Op {
        Op {
            inner: pb::RequestOp {
                request: Some(pb::request_op::Request::RequestRange(g.req)),
            },
        }
    }
}

impl From<Put<Detached>> for Op {
    fn from(p: Put<Detached>) -> Op {
        Op {
            inner: pb::RequestOp {
                request: Some(pb::request_op::Request::RequestPut(p.req)),
            },
        }
    }
}

impl From<Delete<Detached>> for Op {
    fn from(d: Delete<Detached>) -> Op {
        Op {
            inner: pb::RequestOp {
                request: Some(pb::request_op::Request::RequestDeleteRange(d.req)),
            },
        }
    }
}

impl From<Txn<Detached>> for Op {
    fn from(t: Txn<Detached>) -> Op {
        Op {
            inner: pb::RequestOp {
                request: Some(pb::request_op::Request::RequestTxn(t.req)),
            },
        }
    }
}

/// A transaction: if every compare in `when` holds, the `and_then` operations run, else the
/// `or_else` operations; all atomically, at one new revision (when anything is written).
#[must_use = "a request does nothing until it is awaited"]
#[derive(Debug, Clone)]
pub struct Txn<C = Kv> {
    pub(crate) ctx: C,
    pub(crate) req: pb::TxnRequest,
    pub(crate) opts: CallOpts,
}

impl<C> Txn<C> {
    pub(crate) fn with(ctx: C) -> Self {
        Txn {
            ctx,
            req: pb::TxnRequest::default(),
            opts: CallOpts::mutation("Txn"),
        }
    }

    /// Add compares to the condition (all must hold).
    pub fn when<I>(mut self, compares: I) -> Self
    where
        I: IntoIterator<Item = Compare>,
    {
        self.req
            .compare
            .extend(compares.into_iter().map(|c| c.inner));
        self
    }

    /// Add operations to run when the condition holds.
    ///
    /// Any iterator of one kind of operation works (`[Op::put(..), Op::put(..)]`); to mix kinds,
    /// convert each with `Op::from`: `[Op::from(Op::put(..)), Op::from(Op::get(..))]`.
    pub fn and_then<I>(mut self, ops: I) -> Self
    where
        I: IntoIterator,
        I::Item: Into<Op>,
    {
        self.req
            .success
            .extend(ops.into_iter().map(|o| o.into().inner));
        self
    }

    /// Add operations to run when the condition does not hold.
    pub fn or_else<I>(mut self, ops: I) -> Self
    where
        I: IntoIterator,
        I::Item: Into<Op>,
    {
        self.req
            .failure
            .extend(ops.into_iter().map(|o| o.into().inner));
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

impl IntoFuture for Txn<Kv> {
    type Output = Result<TxnResponse>;
    type IntoFuture = BoxFuture<Self::Output>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move { self.ctx.txn_pb(self.req, self.opts).await })
    }
}

/// Client-side checks of a transaction (recursively for nested ones): op counts against
/// `max_txn_ops`, empty keys, put flag conflicts.
pub(crate) fn validate_txn(req: &pb::TxnRequest, cfg: &Config) -> Result<()> {
    let max = cfg.max_txn_ops;
    if req.compare.len() > max || req.success.len() > max || req.failure.len() > max {
        return Err(Error::new(
            ErrorKind::TooManyOps,
            format!(
                "txn has {} compares, {} success and {} failure ops; at most {max} each (max_txn_ops)",
                req.compare.len(),
                req.success.len(),
                req.failure.len()
            ),
        ));
    }
    for c in &req.compare {
        if c.key.is_empty() {
            return Err(Error::new(ErrorKind::EmptyKey, "txn compare has no key"));
        }
    }
    for op in req.success.iter().chain(&req.failure) {
        match &op.request {
            Some(pb::request_op::Request::RequestRange(r)) => validate_range(r)?,
            Some(pb::request_op::Request::RequestPut(p)) => validate_put(p)?,
            Some(pb::request_op::Request::RequestDeleteRange(d)) => validate_delete(d)?,
            Some(pb::request_op::Request::RequestTxn(t)) => validate_txn(t, cfg)?,
            None => return Err(Error::invalid_argument("txn operation without a request")),
        }
    }
    Ok(())
}

/// The answer to a [`Txn`].
#[non_exhaustive]
#[derive(Debug, Clone)]
pub struct TxnResponse {
    /// Response header; `header.revision` is the transaction's revision.
    pub header: ResponseHeader,
    /// True when the compares held and the `and_then` branch ran.
    pub succeeded: bool,
    /// One answer per operation of the branch that ran, in order.
    pub responses: Vec<TxnOpResponse>,
}

/// The answer to one operation of a transaction.
#[non_exhaustive]
#[derive(Debug, Clone)]
pub enum TxnOpResponse {
    /// Answer to [`Op::get`].
    Get(GetResponse),
    /// Answer to [`Op::put`].
    Put(PutResponse),
    /// Answer to [`Op::delete`].
    Delete(DeleteResponse),
    /// Answer to [`Op::txn`].
    Txn(TxnResponse),
}

impl TxnResponse {
    pub(crate) fn from_pb(r: pb::TxnResponse) -> Self {
        TxnResponse {
            header: ResponseHeader::from_pb(r.header),
            succeeded: r.succeeded,
            responses: r
                .responses
                .into_iter()
                .filter_map(|op| {
                    Some(match op.response? {
                        pb::response_op::Response::ResponseRange(g) => {
                            TxnOpResponse::Get(GetResponse::from_pb(g))
                        }
                        pb::response_op::Response::ResponsePut(p) => {
                            TxnOpResponse::Put(PutResponse::from_pb(p))
                        }
                        pb::response_op::Response::ResponseDeleteRange(d) => {
                            TxnOpResponse::Delete(DeleteResponse::from_pb(d))
                        }
                        pb::response_op::Response::ResponseTxn(t) => {
                            TxnOpResponse::Txn(TxnResponse::from_pb(t))
                        }
                    })
                })
                .collect(),
        }
    }
}

impl TxnOpResponse {
    /// The get answer, if this is one.
    pub fn as_get(&self) -> Option<&GetResponse> {
        match self {
            TxnOpResponse::Get(g) => Some(g),
            _ => None,
        }
    }

    /// The put answer, if this is one.
    pub fn as_put(&self) -> Option<&PutResponse> {
        match self {
            TxnOpResponse::Put(p) => Some(p),
            _ => None,
        }
    }

    /// The delete answer, if this is one.
    pub fn as_delete(&self) -> Option<&DeleteResponse> {
        match self {
            TxnOpResponse::Delete(d) => Some(d),
            _ => None,
        }
    }

    /// The nested transaction's answer, if this is one.
    pub fn as_txn(&self) -> Option<&TxnResponse> {
        match self {
            TxnOpResponse::Txn(t) => Some(t),
            _ => None,
        }
    }
}
