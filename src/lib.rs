//! # etcdv3
//!
//! A pure-Rust, protocol-level client for etcd's v3 API, built directly on gRPC
//! ([tonic](https://docs.rs/tonic)) with the protocol compiled from our own `.proto` files, so
//! building it needs no system `protoc`.
//!
//! ## Quick start
//!
//! ```no_run
//! # async fn demo() -> etcdv3::Result<()> {
//! use etcdv3::{Client, Compare, CompareOp, Op};
//!
//! let client = Client::connect(["http://127.0.0.1:2379"]).await?;
//! let kv = client.kv();
//!
//! kv.put("/app/config/port", "8080").await?;
//! let resp = kv.get("/app/config/").prefix().await?;
//! for item in &resp.kvs {
//!     println!("{} = {}", item.key_str()?, item.value_str()?);
//! }
//!
//! // Compare-and-swap in one transaction.
//! let txn = kv
//!     .txn()
//!     .when([Compare::value("/app/config/port", CompareOp::Equal, "8080")])
//!     .and_then([Op::put("/app/config/port", "9090")])
//!     .await?;
//! assert!(txn.succeeded);
//! # Ok(()) }
//! ```
//!
//! ## What works today
//!
//! | area | status |
//! |---|---|
//! | KV: get (key, prefix, from-key, range, all keys; limit, revision, sort, keys/count only, serializable, min/max mod/create revision), put (lease, prev_kv, ignore_value, ignore_lease), delete (range, prefix, prev_kv), txn (all compare targets and operators, range compares, nested txns), compact (physical) | ✅ |
//! | Watch ([`Client::watch`]): key, prefix, range, from-key; start revision, prev_kv, filters, progress (periodic and requested), fragments, created notification; one multiplexed stream per client with pipelined creates; every revision exactly once, in order, across reconnects; bounded per-watcher buffers (a slow consumer is paused and resumed, losslessly); typed compaction and cancellation | ✅ |
//! | Typed errors mapped from etcd's server errors, client-side validation | ✅ |
//! | Token auth: authenticate, attach the token to every request and stream, one re-authentication shared by all concurrent callers on an invalid/stale token | ✅ |
//! | Many endpoints: pinned endpoint, round-robin failover with back-off, `set_endpoints`, `sync`/auto-sync, keep-alive pings | ✅ |
//! | Retries inside the deadline, decided by a tower retry `Policy` over a pluggable [`RetryPolicy`] (reads on unavailable-class errors, writes only when never sent) | ✅ |
//! | Ordering guard for serializable reads ([`OrderingGuard`]), require-leader | ✅ |
//! | Cluster: member list (linearizable or not), add (voting or learner), remove, update, promote | ✅ |
//! | Maintenance, on the current member or a chosen one ([`Client::maintenance_at`]): status, alarms (list, activate, disarm), defragment, hash, hash_kv, snapshot stream and snapshot-to-file with size checks, move leader (routed to the leader), downgrade validate/enable/cancel | ✅ |
//! | Auth: enable, disable, status; users (with or without password), roles, key/range/prefix permissions | ✅ |
//! | Server-side lock and election services ([`LockService`], [`ElectionService`]; the caller keeps the lease alive) | ✅ |
//! | Leases: grant (TTL, explicit ID), revoke, time-to-live (with keys), list, keep-alive once; lease keeper (one keep-alive stream for every kept lease, refresh at TTL/3, loss reported with a reason, reconnects, revoke on drop) | ✅ |
//! | Concurrency recipes (Go semantics, without Go's open bugs): [`Session`], [`Mutex`] (fencing revision, `is_owner` guard compare, cancel-safe `lock`, `try_lock`), [`Election`] (campaign, proclaim, leader, observe, retryable resign), [`stm`] (serializable, snapshot, repeatable-read, read-committed); a prefixed [`Namespace`] view over KV, watch, leases and the recipes | ✅ |
//! | Pluggable executor; tasks end with the last handle | ✅ |
//! | Application toolkit (feature `toolkit`): config source (etcd-only or file base + etcd overlay, typed, watched), service registry with re-registration, discovery (snapshot, events, live cache), mirror | ✅ |
//! | Raw generated gRPC clients for every etcd service ([`raw`]) | ✅ |
//! | `testkit` feature: real etcd clusters on loopback, member faults, fault proxy | ✅ |
//!
//! ## Errors
//!
//! Every fallible call returns [`Result<T, Error>`](Error); match on [`Error::kind`]
//! ([`ErrorKind`]).
//!
//! ## Features
//!
//! | feature | what it adds |
//! |---|---|
//! | `tls` (default) | `https://` endpoints and mutual TLS with rustls ([`TlsOptions`]) |
//! | `dns-srv` | endpoint discovery from DNS SRV records (`SrvDiscovery`, hickory-resolver) |
//! | `testkit` | `testkit` module: start real etcd servers for tests, inject faults |
//! | `bench` | the `etcd-bench` benchmark tool (testkit, clap, indicatif) |
//! | `toolkit` | `toolkit` module: config source, service registry and discovery, mirror, locks and elections (serde, serde_json) |
//! | `toolkit-files` | YAML and TOML base files for the toolkit's hybrid config (serde_norway, toml) |

#![forbid(unsafe_code)]
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod auth;
mod balancer;
mod client;
mod cluster;
mod concurrency;
mod election;
mod error;
mod grpc;
mod http2;
mod kv;
mod lease;
mod lock;
mod maintenance;
mod namespace;
mod proto;
pub mod raw;
mod request;
#[cfg(feature = "dns-srv")]
mod srv;
#[cfg(feature = "tls")]
mod tls;
#[cfg(feature = "toolkit")]
#[cfg_attr(docsrs, doc(cfg(feature = "toolkit")))]
pub mod toolkit;
mod transport;
mod txn;
mod types;
mod watch;

#[cfg(feature = "testkit")]
pub mod testkit;

/// The README's code examples, compiled as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

pub use auth::{
    Auth, AuthResponse, AuthStatusResponse, Permission, PermissionType, RevokePermission,
    RoleGetResponse, RoleListResponse, UserGetResponse, UserListResponse,
};
pub use balancer::hooks::{RpcRequest, RpcService};
pub use balancer::{DefaultRetryPolicy, RetryContext, RetryPolicy};
pub use bytes::Bytes;
pub use client::{
    BoxFuture, Client, ClientBuilder, DEFAULT_MAX_REQUEST_BYTES, DEFAULT_MAX_TXN_OPS, Executor,
    OrderingGuard, TokioExecutor,
};
pub use cluster::{Cluster, Member, MemberAdd, MemberAddResponse, MemberList, MembersResponse};
pub use concurrency::{
    DEFAULT_SESSION_TTL, Election, Isolation, Mutex, NewSession, Observer, Session, Stm, StmTxn,
    stm,
};
pub use election::{
    CampaignResponse, ElectionResponse, ElectionService, LeaderKey, LeaderResponse, LeaderStream,
};
pub use error::{Error, ErrorKind, Result};
pub use kv::{
    Compact, CompactResponse, Delete, DeleteResponse, Detached, Get, GetResponse, Kv, Put,
    PutResponse, SortOrder, SortTarget,
};
pub use lease::{
    Grant, GrantResponse, KeepAlive, KeepAliveOnce, KeepAliveResponse, KeptLease, Lease, LeaseLost,
    LeaseStatus, Leases, LeasesResponse, Revoke, RevokeResponse, TimeToLive, TimeToLiveResponse,
};
pub use lock::{HeldLock, LockService, UnlockResponse};
pub use maintenance::{
    AlarmMember, AlarmResponse, AlarmType, DowngradeInfo, DowngradeResponse, HashKvResponse,
    HashResponse, Maintenance, MaintenanceResponse, SnapshotInfo, SnapshotStream, StatusResponse,
};
pub use namespace::{Namespace, NsKv, NsLease, NsTimeToLive, NsWatch, NsWatcher};
pub use request::Request;
#[cfg(feature = "dns-srv")]
pub use srv::SrvDiscovery;
#[cfg(feature = "tls")]
pub use tls::TlsOptions;
pub use txn::{Compare, CompareOp, Op, Txn, TxnOpResponse, TxnResponse};
pub use types::{IntoBytes, KeyValue, ResponseHeader};
pub use watch::{
    DEFAULT_GROUP_BUFFER, DEFAULT_WATCH_BUFFER, Event, EventKind, EventsIntoIter, GroupWatch,
    Watch, WatchBatch, WatchGroup, WatchStats, Watcher,
};
