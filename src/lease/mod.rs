//! Leases: grant, revoke, inspect, and keep them alive.
//!
//! A lease is a server-side timer with a TTL (in seconds); keys attached to it
//! ([`Put::lease`](crate::Put::lease)) are deleted when it expires or is revoked. The one-shot
//! calls are builders awaited directly:
//!
//! ```no_run
//! # async fn demo(client: etcdv3::Client) -> etcdv3::Result<()> {
//! let lease = client.lease();
//! let granted = lease.grant(30).await?;
//! client.kv().put("/service/a", "10.0.0.1").lease(granted.id).await?;
//! let info = lease.time_to_live(granted.id).keys().await?;
//! println!("{} s left, keys {:?}", info.ttl, info.keys);
//! lease.revoke(granted.id).await?; // deletes /service/a
//! # Ok(()) }
//! ```
//!
//! # Keeping a lease alive
//!
//! [`Lease::keep_alive`] (an existing lease) and [`Grant::keep_alive`] (a new one) return a
//! [`KeptLease`]: the client's *lease keeper* refreshes it for as long as the handle lives.
//!
//! ```no_run
//! # async fn demo(client: etcdv3::Client) -> etcdv3::Result<()> {
//! let kept = client.lease().grant(10).keep_alive().revoke_on_drop().await?;
//! client.kv().put("/service/a", "10.0.0.1").lease(kept.id()).await?;
//! tokio::select! {
//!     reason = kept.lost() => eprintln!("lease lost ({reason:?}): stop acting as /service/a"),
//!     _ = tokio::signal::ctrl_c() => {} // dropping `kept` revokes the lease
//! }
//! # Ok(()) }
//! ```
//!
//! How the keeper works:
//!
//! - **One stream.** Every lease kept through one [`Client`] (and its clones) shares a single
//!   `LeaseKeepAlive` gRPC stream, driven by one background task with one timer queue, so
//!   keeping 10,000 leases costs one stream and one task, not 10,000.
//! - **Refresh at TTL/3.** Each lease is refreshed about a third of its TTL after its last
//!   acknowledged refresh (a little earlier, so refreshes due at nearly the same time share a
//!   network write). Requests are pipelined; answers are matched by lease ID.
//! - **Loss is never silent.** A lease's *deadline* is the time its last acknowledged refresh
//!   was sent plus the TTL the server granted, which is never later than the server's own
//!   expiry. When the server answers that the lease is gone, or no acknowledgement arrives
//!   before the deadline, the lease is reported lost through [`KeptLease::lost`] and
//!   [`KeptLease::watch`], with a [`LeaseLost`] reason, and it is never reported alive again.
//! - **Reconnects.** When the stream fails (or stalls: nothing answered for a third of a TTL)
//!   the keeper reconnects with a jittered back-off and goes on for every lease, refreshing at
//!   once those already past a third of their TTL. The stream asks for a leader
//!   (`require leader`), so a member cut off from its cluster refuses it instead of making a
//!   dead lease look alive.
//! - **Server bugs.** etcd before 3.4.38 / 3.5.23 may acknowledge a refresh of a lease that
//!   was revoked a moment earlier (etcd PR #20616). The keeper does not take one acknowledgement
//!   as proof of life beyond its deadline: a lease revoked through this client is reported
//!   [`LeaseLost::Revoked`] at once and later acknowledgements are ignored; one revoked
//!   elsewhere is reported at the next refresh (TTL 0 answer), and never later than its
//!   deadline.
//! - **Lifetime.** The keeper's task starts with the first kept lease and ends when the client
//!   and every [`KeptLease`] are dropped (after performing any pending
//!   [`revoke_on_drop`](KeepAlive::revoke_on_drop) revokes), or when the client is closed.

mod worker;

use std::future::{Future, IntoFuture};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::transport::Channel;
use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};
use tonic::metadata::AsciiMetadataValue;

use crate::client::{CallOpts, Client, Shared, with_deadline};
use crate::error::{Error, ErrorKind, Result};
use crate::kv::BoxFuture;
use crate::proto::etcdserverpb as pb;
use crate::types::ResponseHeader;

pub(crate) use worker::KeeperHandle;
use worker::{Command, Known};

impl Client {
    /// The lease API: grant, revoke, inspect and keep leases alive.
    pub fn lease(&self) -> Lease {
        Lease {
            client: self.clone(),
        }
    }
}

fn lease_client_max(ch: Channel, max_encoding: usize) -> pb::lease_client::LeaseClient<Channel> {
    pb::lease_client::LeaseClient::new(ch)
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(max_encoding)
}

/// Adds etcd's "require leader" metadata: a member without a leader refuses the stream.
pub(crate) fn require_leader<T>(request: &mut tonic::Request<T>) {
    request
        .metadata_mut()
        .insert("hasleader", AsciiMetadataValue::from_static("true"));
}

fn closed() -> Error {
    Error::new(ErrorKind::Closed, "the client was closed")
}

/// The lease API of a [`Client`]; get it with [`Client::lease`]. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Lease {
    client: Client,
}

impl Lease {
    /// Grant a lease with a TTL of `ttl` seconds (the server raises TTLs below its minimum,
    /// about 1.5 election timeouts, and refuses TTLs above 9,000,000,000 s with
    /// [`ErrorKind::TtlTooLarge`]). Set an explicit ID with [`Grant::id`]; keep the new lease
    /// alive with [`Grant::keep_alive`].
    pub fn grant(&self, ttl: i64) -> Grant {
        Grant {
            lease: self.clone(),
            req: pb::LeaseGrantRequest { ttl, id: 0 },
            opts: CallOpts::mutation("LeaseGrant"),
        }
    }

    /// Revoke lease `id`: it ends now and every key attached to it is deleted. A lease that
    /// does not exist fails with [`ErrorKind::LeaseNotFound`]. A [`KeptLease`] of this client
    /// for `id` is reported lost with [`LeaseLost::Revoked`].
    pub fn revoke(&self, id: i64) -> Revoke {
        Revoke {
            lease: self.clone(),
            id,
            opts: CallOpts::mutation("LeaseRevoke"),
        }
    }

    /// The remaining TTL of lease `id` (and, with [`TimeToLive::keys`], its keys). A lease
    /// that does not exist is not an error: its [`TimeToLiveResponse::ttl`] is -1.
    pub fn time_to_live(&self, id: i64) -> TimeToLive {
        TimeToLive {
            lease: self.clone(),
            req: pb::LeaseTimeToLiveRequest { id, keys: false },
            opts: CallOpts::read("LeaseTimeToLive"),
        }
    }

    /// The IDs of every lease that exists.
    pub fn leases(&self) -> Leases {
        Leases {
            lease: self.clone(),
            opts: CallOpts::read("LeaseLeases"),
        }
    }

    /// Refresh lease `id` once (on a stream of its own) and return its new TTL. A lease that
    /// does not exist fails with [`ErrorKind::LeaseNotFound`]. To keep a lease alive, use
    /// [`keep_alive`](Self::keep_alive) instead.
    pub fn keep_alive_once(&self, id: i64) -> KeepAliveOnce {
        KeepAliveOnce {
            lease: self.clone(),
            id,
            // Refreshing twice is harmless: safe to retry.
            opts: CallOpts::read("LeaseKeepAlive"),
        }
    }

    /// Keep the existing lease `id` alive for as long as the returned [`KeptLease`] lives.
    ///
    /// Awaiting it refreshes the lease once and returns when the server has acknowledged,
    /// so the handle starts with the lease's TTL; a lease that does not exist fails with
    /// [`ErrorKind::LeaseNotFound`]. Keeping a lease that this client already keeps shares
    /// its refreshes: every handle sees the same status.
    pub fn keep_alive(&self, id: i64) -> KeepAlive {
        KeepAlive {
            lease: self.clone(),
            source: Source::Existing(id),
            revoke_on_drop: false,
            opts: CallOpts::mutation("LeaseGrant"),
        }
    }

    /// How many `LeaseKeepAlive` streams this client's keeper has opened so far (one, unless
    /// it had to reconnect). For tests and diagnostics.
    #[doc(hidden)]
    pub fn keeper_streams_opened(&self) -> u64 {
        self.client
            .lease_keeper()
            .get()
            .map_or(0, KeeperHandle::streams_opened)
    }

    /// How many leases this client's keeper keeps now. For tests and diagnostics.
    #[doc(hidden)]
    pub fn keeper_leases(&self) -> u64 {
        self.client
            .lease_keeper()
            .get()
            .map_or(0, KeeperHandle::kept)
    }

    fn shared(&self) -> &Arc<Shared> {
        self.client.shared()
    }

    /// The keeper of this client, started on first use.
    fn keeper(&self) -> &KeeperHandle {
        self.client
            .lease_keeper()
            .get_or_init(|| KeeperHandle::spawn(self.shared().clone()))
    }

    /// Tell the keeper (when there is one) that `id` was revoked through this client.
    fn notify_revoked(&self, id: i64) {
        if let Some(k) = self.client.lease_keeper().get() {
            k.send(Command::Revoked { id });
        }
    }
}

/// A write that attaches keys to a lease (`(lease, send time)`; `None` for none) failed with
/// `e`: when the server said the lease does not exist, `client`'s keeper (if it keeps the
/// lease) reports it lost now, instead of at its next refresh (up to a third of the TTL
/// later).
pub(crate) fn note_write_error(client: &Client, e: &Error, lease: Option<(i64, Instant)>) {
    if let Some((id, sent)) = lease
        && e.kind() == ErrorKind::LeaseNotFound
        && let Some(k) = client.lease_keeper().get()
    {
        k.send(Command::NotFound { id, sent });
    }
}

// ---------------------------------------------------------------------------------------------
// The RPCs, shared by the builders and the keeper.

async fn grant_pb(
    shared: &Arc<Shared>,
    req: pb::LeaseGrantRequest,
    opts: CallOpts,
) -> Result<GrantResponse> {
    let max = shared.config().max_encoding_bytes();
    let resp: pb::LeaseGrantResponse = shared
        .unary(req, opts, move |ch, r| {
            crate::grpc::unary(ch, "/etcdserverpb.Lease/LeaseGrant", r, max, usize::MAX)
        })
        .await?;
    Ok(GrantResponse {
        header: ResponseHeader::from_pb(resp.header),
        id: resp.id,
        ttl: resp.ttl,
    })
}

pub(crate) async fn revoke_pb(
    shared: &Arc<Shared>,
    id: i64,
    opts: CallOpts,
) -> Result<RevokeResponse> {
    let max = shared.config().max_encoding_bytes();
    let resp: pb::LeaseRevokeResponse = shared
        .unary(pb::LeaseRevokeRequest { id }, opts, move |ch, r| {
            crate::grpc::unary(ch, "/etcdserverpb.Lease/LeaseRevoke", r, max, usize::MAX)
        })
        .await?;
    Ok(RevokeResponse {
        header: ResponseHeader::from_pb(resp.header),
    })
}

async fn keep_alive_once_pb(
    shared: &Arc<Shared>,
    id: i64,
    opts: CallOpts,
) -> Result<KeepAliveResponse> {
    let max = shared.config().max_encoding_bytes();
    let resp = shared
        .unary(pb::LeaseKeepAliveRequest { id }, opts, move |ch, r| {
            let mut c = lease_client_max(ch, max);
            async move {
                // One request on a stream of its own: the request stream ends after it, so
                // the server ends the stream after answering.
                let (metadata, extensions, msg) = r.into_request().into_parts();
                let (tx, rx) = mpsc::unbounded_channel();
                let _ = tx.send(msg);
                drop(tx);
                let mut request =
                    tonic::Request::from_parts(metadata, extensions, worker::RequestStream(rx));
                require_leader(&mut request);
                let mut answers = c.lease_keep_alive(request).await?.into_inner();
                match answers.message().await? {
                    Some(answer) => Ok(tonic::Response::new(answer)),
                    None => Err(tonic::Status::unavailable(
                        "the keep-alive stream ended without an answer",
                    )),
                }
            }
        })
        .await?;
    if resp.ttl <= 0 {
        return Err(Error::new(
            ErrorKind::LeaseNotFound,
            "requested lease not found",
        ));
    }
    Ok(KeepAliveResponse {
        header: ResponseHeader::from_pb(resp.header),
        id: resp.id,
        ttl: resp.ttl,
    })
}

// ---------------------------------------------------------------------------------------------
// Grant

/// A lease grant; await it, or chain [`keep_alive`](Self::keep_alive) to keep the new lease.
#[must_use = "a request does nothing until it is awaited"]
#[derive(Debug, Clone)]
pub struct Grant {
    lease: Lease,
    req: pb::LeaseGrantRequest,
    opts: CallOpts,
}

impl Grant {
    /// Ask for this lease ID instead of letting the server choose (0: the server chooses).
    /// An ID that is in use fails with [`ErrorKind::LeaseExist`].
    pub fn id(mut self, id: i64) -> Self {
        self.req.id = id;
        self
    }

    /// This request's deadline, overriding the client's default request timeout.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.opts.timeout = Some(timeout);
        self
    }

    /// Grant the lease and keep it alive: the lease keeper takes it over from the grant (its
    /// first refresh is due a third of the TTL after the grant was sent; no extra round trip).
    pub fn keep_alive(self) -> KeepAlive {
        KeepAlive {
            lease: self.lease,
            source: Source::Grant(self.req),
            revoke_on_drop: false,
            opts: self.opts,
        }
    }
}

impl IntoFuture for Grant {
    type Output = Result<GrantResponse>;
    type IntoFuture = BoxFuture<Self::Output>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move { grant_pb(self.lease.shared(), self.req, self.opts).await })
    }
}

/// The answer to a [`Grant`].
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantResponse {
    /// Response header.
    pub header: ResponseHeader,
    /// The lease's ID (the one asked for, or the server's choice).
    pub id: i64,
    /// The TTL in seconds the server granted.
    pub ttl: i64,
}

// ---------------------------------------------------------------------------------------------
// Revoke

/// A lease revocation; await it.
#[must_use = "a request does nothing until it is awaited"]
#[derive(Debug, Clone)]
pub struct Revoke {
    lease: Lease,
    id: i64,
    opts: CallOpts,
}

impl Revoke {
    /// This request's deadline, overriding the client's default request timeout.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.opts.timeout = Some(timeout);
        self
    }
}

impl IntoFuture for Revoke {
    type Output = Result<RevokeResponse>;
    type IntoFuture = BoxFuture<Self::Output>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            let resp = revoke_pb(self.lease.shared(), self.id, self.opts).await?;
            self.lease.notify_revoked(self.id);
            Ok(resp)
        })
    }
}

/// The answer to a [`Revoke`].
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevokeResponse {
    /// Response header; `header.revision` is the revision of the deletion of the lease's keys.
    pub header: ResponseHeader,
}

// ---------------------------------------------------------------------------------------------
// TimeToLive

/// A lease time-to-live query; await it.
#[must_use = "a request does nothing until it is awaited"]
#[derive(Debug, Clone)]
pub struct TimeToLive {
    lease: Lease,
    req: pb::LeaseTimeToLiveRequest,
    opts: CallOpts,
}

impl TimeToLive {
    /// Also return the keys attached to the lease ([`TimeToLiveResponse::keys`]).
    pub fn keys(mut self) -> Self {
        self.req.keys = true;
        self
    }

    /// This request's deadline, overriding the client's default request timeout.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.opts.timeout = Some(timeout);
        self
    }
}

impl IntoFuture for TimeToLive {
    type Output = Result<TimeToLiveResponse>;
    type IntoFuture = BoxFuture<Self::Output>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            let max = self.lease.shared().config().max_encoding_bytes();
            let resp: pb::LeaseTimeToLiveResponse = self
                .lease
                .shared()
                .unary(self.req, self.opts, move |ch, r| {
                    crate::grpc::unary(
                        ch,
                        "/etcdserverpb.Lease/LeaseTimeToLive",
                        r,
                        max,
                        usize::MAX,
                    )
                })
                .await?;
            Ok(TimeToLiveResponse {
                header: ResponseHeader::from_pb(resp.header),
                id: resp.id,
                ttl: resp.ttl,
                granted_ttl: resp.granted_ttl,
                keys: resp.keys,
            })
        })
    }
}

/// The answer to a [`TimeToLive`].
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimeToLiveResponse {
    /// Response header.
    pub header: ResponseHeader,
    /// The lease asked about.
    pub id: i64,
    /// Seconds the lease has left, or -1 when it does not exist (expired or revoked).
    pub ttl: i64,
    /// The TTL in seconds the lease was granted with (0 when it does not exist).
    pub granted_ttl: i64,
    /// The keys attached to the lease, when [`TimeToLive::keys`] was asked for.
    pub keys: Vec<Bytes>,
}

impl TimeToLiveResponse {
    /// Whether the lease exists (`ttl` is not -1).
    pub fn exists(&self) -> bool {
        self.ttl >= 0
    }
}

// ---------------------------------------------------------------------------------------------
// Leases

/// A query for every lease; await it.
#[must_use = "a request does nothing until it is awaited"]
#[derive(Debug, Clone)]
pub struct Leases {
    lease: Lease,
    opts: CallOpts,
}

impl Leases {
    /// This request's deadline, overriding the client's default request timeout.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.opts.timeout = Some(timeout);
        self
    }
}

impl IntoFuture for Leases {
    type Output = Result<LeasesResponse>;
    type IntoFuture = BoxFuture<Self::Output>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            let max = self.lease.shared().config().max_encoding_bytes();
            let resp: pb::LeaseLeasesResponse = self
                .lease
                .shared()
                .unary(pb::LeaseLeasesRequest {}, self.opts, move |ch, r| {
                    crate::grpc::unary(ch, "/etcdserverpb.Lease/LeaseLeases", r, max, usize::MAX)
                })
                .await?;
            Ok(LeasesResponse {
                header: ResponseHeader::from_pb(resp.header),
                leases: resp.leases.into_iter().map(|l| l.id).collect(),
            })
        })
    }
}

/// The answer to a [`Leases`] query.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeasesResponse {
    /// Response header.
    pub header: ResponseHeader,
    /// The ID of every lease that exists.
    pub leases: Vec<i64>,
}

// ---------------------------------------------------------------------------------------------
// KeepAliveOnce

/// A single lease refresh; await it.
#[must_use = "a request does nothing until it is awaited"]
#[derive(Debug, Clone)]
pub struct KeepAliveOnce {
    lease: Lease,
    id: i64,
    opts: CallOpts,
}

impl KeepAliveOnce {
    /// This request's deadline, overriding the client's default request timeout.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.opts.timeout = Some(timeout);
        self
    }
}

impl IntoFuture for KeepAliveOnce {
    type Output = Result<KeepAliveResponse>;
    type IntoFuture = BoxFuture<Self::Output>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move { keep_alive_once_pb(self.lease.shared(), self.id, self.opts).await })
    }
}

/// The answer to a [`KeepAliveOnce`].
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeepAliveResponse {
    /// Response header.
    pub header: ResponseHeader,
    /// The lease refreshed.
    pub id: i64,
    /// Its TTL in seconds, counted from now.
    pub ttl: i64,
}

// ---------------------------------------------------------------------------------------------
// KeepAlive and KeptLease

#[derive(Debug, Clone)]
enum Source {
    Existing(i64),
    Grant(pb::LeaseGrantRequest),
}

/// A request to keep a lease alive ([`Lease::keep_alive`], [`Grant::keep_alive`]); await it
/// for a [`KeptLease`].
#[must_use = "a request does nothing until it is awaited"]
#[derive(Debug, Clone)]
pub struct KeepAlive {
    lease: Lease,
    source: Source,
    revoke_on_drop: bool,
    opts: CallOpts,
}

impl KeepAlive {
    /// Revoke the lease when the [`KeptLease`] is dropped (deleting its keys at once rather
    /// than when the TTL runs out). The client's keeper performs the revoke, also when the
    /// client itself has been dropped meanwhile; other handles keeping the same lease see it
    /// lost with [`LeaseLost::Revoked`].
    pub fn revoke_on_drop(mut self) -> Self {
        self.revoke_on_drop = true;
        self
    }

    /// How long to wait for the grant (for [`Grant::keep_alive`]) and for the first
    /// acknowledgement, overriding the client's default request timeout. Without either, the
    /// wait is unbounded (the keeper reconnects until the server answers).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.opts.timeout = Some(timeout);
        self
    }

    async fn run(self) -> Result<KeptLease> {
        let shared = self.lease.shared().clone();
        let timeout = self.opts.timeout.or(shared.config().request_timeout);
        let started = tokio::time::Instant::now();
        let (id, known) = match self.source {
            Source::Existing(id) => (id, None),
            Source::Grant(req) => {
                let sent_at = tokio::time::Instant::now();
                let granted = grant_pb(&shared, req, self.opts).await?;
                let known = Known {
                    ttl: granted.ttl,
                    sent_at,
                };
                (granted.id, Some(known))
            }
        };
        let keeper = self.lease.keeper();
        // The holder exists before the keeper hears of it: if this future is dropped from
        // here on, the holder's drop releases the lease again.
        let mut holder = keeper.holder(id, self.revoke_on_drop);
        let (reply, answer) = oneshot::channel();
        keeper.send(Command::Keep {
            id,
            token: holder.token,
            known,
            reply,
        });
        let mut status = answer.await.map_err(|_| closed())?;
        holder.status = Some(status.clone());
        let left = timeout.map(|t| t.saturating_sub(started.elapsed()));
        let lost = {
            let first =
                with_deadline(left, status.wait_for(|s| s.ttl > 0 || s.lost.is_some())).await?;
            match first {
                Ok(s) => s.lost,
                Err(_) => Some(LeaseLost::Closed),
            }
        };
        if let Some(reason) = lost {
            return Err(reason.to_error());
        }
        Ok(KeptLease {
            id,
            status,
            holder,
            shared,
        })
    }
}

impl IntoFuture for KeepAlive {
    type Output = Result<KeptLease>;
    type IntoFuture = BoxFuture<Self::Output>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.run())
    }
}

/// Why a kept lease was lost.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LeaseLost {
    /// The server answered a refresh with TTL 0, or a write attaching a key to the lease
    /// with [`ErrorKind::LeaseNotFound`]: the lease no longer exists (it expired, or another
    /// client revoked it).
    Expired,
    /// No refresh was acknowledged before the lease's deadline (the send time of the last
    /// acknowledged refresh plus the TTL). The server may have expired the lease by now, or
    /// may soon; either way the keeper stops keeping it.
    NotAcknowledged,
    /// The lease was revoked through this client ([`Lease::revoke`], [`KeptLease::revoke`],
    /// or another handle's [`revoke_on_drop`](KeepAlive::revoke_on_drop)).
    Revoked,
    /// The client was closed, or the lease is no longer kept (every handle was dropped).
    Closed,
}

impl LeaseLost {
    fn to_error(self) -> Error {
        match self {
            LeaseLost::Expired | LeaseLost::Revoked => {
                Error::new(ErrorKind::LeaseNotFound, "requested lease not found")
            }
            LeaseLost::NotAcknowledged => Error::new(
                ErrorKind::Unavailable,
                "the lease's refresh was not acknowledged before its deadline",
            ),
            LeaseLost::Closed => closed(),
        }
    }
}

/// The keeper's view of a kept lease, as published on [`KeptLease::watch`].
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseStatus {
    /// The lease.
    pub id: i64,
    /// The TTL in seconds of the last acknowledged refresh (or of the grant); 0 once lost.
    pub ttl: i64,
    /// When the last acknowledgement (or the grant's answer) arrived.
    pub acknowledged_at: Instant,
    /// Until when the lease is certainly alive on the server: the send time of the last
    /// acknowledged refresh plus `ttl`. If no further acknowledgement arrives by then, the
    /// lease is reported lost with [`LeaseLost::NotAcknowledged`].
    pub deadline: Instant,
    /// Set once the lease is lost; after that the status never changes again.
    pub lost: Option<LeaseLost>,
}

impl LeaseStatus {
    /// Whether the lease is kept and not lost.
    pub fn is_alive(&self) -> bool {
        self.lost.is_none()
    }
}

/// A lease kept alive by the client's lease keeper, for as long as this handle lives.
///
/// Get one from [`Lease::keep_alive`] or [`Grant::keep_alive`]. Dropping it stops the
/// refreshes (and, with [`KeepAlive::revoke_on_drop`], revokes the lease). Select on
/// [`lost`](Self::lost) to learn, before the server's expiry, that the lease is gone or may
/// be.
pub struct KeptLease {
    id: i64,
    status: watch::Receiver<LeaseStatus>,
    holder: worker::Holder,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for KeptLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeptLease")
            .field("id", &self.id)
            .field("status", &*self.status.borrow())
            .field("revoke_on_drop", &self.holder.revoke_on_drop())
            .finish()
    }
}

impl KeptLease {
    /// The lease's ID (attach keys with [`Put::lease`](crate::Put::lease)).
    pub fn id(&self) -> i64 {
        self.id
    }

    /// The TTL in seconds of the last acknowledged refresh; 0 once the lease is lost.
    pub fn ttl(&self) -> i64 {
        self.status.borrow().ttl
    }

    /// The latest status (TTL, last acknowledgement, deadline, loss).
    pub fn status(&self) -> LeaseStatus {
        *self.status.borrow()
    }

    /// Whether the lease is lost, and why.
    pub fn lost_reason(&self) -> Option<LeaseLost> {
        self.status.borrow().lost
    }

    /// Resolves when the lease is lost, with the reason. It may be awaited from anywhere (it
    /// does not borrow the handle); after the handle is dropped it resolves with
    /// [`LeaseLost::Closed`] unless the lease was lost before.
    pub fn lost(&self) -> impl Future<Output = LeaseLost> + Send + 'static {
        let mut rx = self.status.clone();
        async move {
            let lost = rx
                .wait_for(|s| s.lost.is_some())
                .await
                .ok()
                .and_then(|s| s.lost);
            // A closed channel keeps its last value: the loss, if it was recorded.
            lost.or_else(|| rx.borrow().lost)
                .unwrap_or(LeaseLost::Closed)
        }
    }

    /// A watch channel of the lease's status: it changes at every acknowledged refresh and
    /// once more when the lease is lost.
    pub fn watch(&self) -> watch::Receiver<LeaseStatus> {
        self.status.clone()
    }

    /// Revoke the lease now (deleting its keys); the handle then reports
    /// [`LeaseLost::Revoked`].
    pub async fn revoke(&self) -> Result<RevokeResponse> {
        let resp = revoke_pb(&self.shared, self.id, CallOpts::mutation("LeaseRevoke")).await?;
        self.holder.send(Command::Revoked { id: self.id });
        Ok(resp)
    }
}
