//! The server-side lock service (etcd's `v3lockpb.Lock`): a distributed lock whose waiting and
//! queueing the server does for you.

use std::fmt;

use bytes::Bytes;

use crate::client::Client;
use crate::error::Error;
use crate::proto::v3lockpb as lockpb;
use crate::request::{Request, call_opts, unary_on};
use crate::types::{IntoBytes, ResponseHeader};

impl Client {
    /// The server-side lock service (etcd's v3lock API). See the [`LockService`] docs
    /// about keeping the lease alive.
    pub fn lock_service(&self) -> LockService {
        LockService {
            client: self.clone(),
        }
    }
}

/// etcd's server-side lock service; get it with [`Client::lock_service`]. Cheap to clone.
///
/// # The lease is yours to keep alive
///
/// A lock is a key attached to a lease **that you pass in**. The server neither creates nor
/// refreshes it: when the lease expires, the key is deleted and the lock is released — to the
/// next waiter — whether or not you still think you hold it. So:
///
/// * grant a lease and **keep it alive for as long as you hold the lock**, e.g. with the
///   client's lease keeper (`client.lease().keep_alive(id)`);
/// * check [`HeldLock::is_held`] (or guard your writes with a transaction on the lock key)
///   before acting on the assumption that you still hold it, and watch the kept lease for
///   loss;
/// * revoking the lease releases every lock attached to it.
///
/// Dropping a [`HeldLock`] does *not* release the lock (no I/O happens in `Drop`): call
/// [`HeldLock::unlock`], or let the lease go. For client-side recipes with fencing and
/// ownership checks built on a session, see the concurrency module (when available).
///
/// ```no_run
/// # async fn demo(client: etcdv3::Client, lease_id: i64) -> etcdv3::Result<()> {
/// // `lease_id`: a lease you keep alive (granted with a TTL of, say, 10 s).
/// let locks = client.lock_service();
/// let lock = locks.lock("/locks/report", lease_id).await?; // waits for its turn
/// if lock.is_held().await? {
///     // ... do the work ...
/// }
/// lock.unlock().await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct LockService {
    client: Client,
}

/// The answer to an unlock.
#[non_exhaustive]
#[derive(Debug, Clone)]
pub struct UnlockResponse {
    /// Response header.
    pub header: ResponseHeader,
}

impl LockService {
    /// Acquire the lock `name`, waiting (on the server) until every earlier holder or waiter
    /// has released it or lost its lease. The lock key is attached to `lease`, which **must
    /// exist and be kept alive by the caller** for as long as the lock is held (see the
    /// [`LockService`] docs). A lease that does not exist fails with
    /// [`ErrorKind::LeaseNotFound`](crate::ErrorKind::LeaseNotFound); lease 0 and an empty name
    /// are refused ([`ErrorKind::InvalidArgument`](crate::ErrorKind::InvalidArgument)): with no
    /// lease the server would grant a 60-second lease that nobody keeps alive.
    ///
    /// The request's deadline (default: the client's request timeout) bounds the wait; when it
    /// passes, or the future is dropped, the server withdraws the waiting key.
    pub fn lock(&self, name: impl IntoBytes, lease: i64) -> Request<HeldLock> {
        let this = self.clone();
        let name = name.into_bytes();
        Request::new(call_opts("Lock", false), move |opts| async move {
            if name.is_empty() {
                return Err(Error::invalid_argument("lock name is empty"));
            }
            if lease == 0 {
                return Err(Error::invalid_argument(
                    "lock needs a lease that the caller keeps alive (lease 0 given)",
                ));
            }
            let max = this.client.config().max_encoding_bytes();
            let resp: lockpb::LockResponse = unary_on(
                &this.client,
                None,
                lockpb::LockRequest { name, lease },
                opts,
                move |ch, r| crate::grpc::unary(ch, "/v3lockpb.Lock/Lock", r, max, usize::MAX),
            )
            .await?;
            Ok(HeldLock {
                service: this,
                header: ResponseHeader::from_pb(resp.header),
                key: resp.key,
                lease,
            })
        })
    }

    /// Release the lock whose key is `key` (as returned by [`lock`](Self::lock)). Releasing a
    /// lock that is no longer held (its key is gone) succeeds.
    pub fn unlock(&self, key: impl IntoBytes) -> Request<UnlockResponse> {
        let this = self.clone();
        let key = key.into_bytes();
        Request::new(call_opts("Unlock", false), move |opts| async move {
            let max = this.client.config().max_encoding_bytes();
            let resp: lockpb::UnlockResponse = unary_on(
                &this.client,
                None,
                lockpb::UnlockRequest { key },
                opts,
                move |ch, r| crate::grpc::unary(ch, "/v3lockpb.Lock/Unlock", r, max, usize::MAX),
            )
            .await?;
            Ok(UnlockResponse {
                header: ResponseHeader::from_pb(resp.header),
            })
        })
    }
}

/// A lock acquired through [`LockService::lock`]: its key and lease.
///
/// Holding this value does not mean holding the lock: the lock is lost when its lease
/// expires or is revoked, or when someone deletes the key. Ask [`is_held`](Self::is_held)
/// before relying on it. Dropping it does **not** release the lock; call
/// [`unlock`](Self::unlock) (or revoke the lease).
#[derive(Clone)]
pub struct HeldLock {
    service: LockService,
    header: ResponseHeader,
    key: Bytes,
    lease: i64,
}

impl fmt::Debug for HeldLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HeldLock")
            .field("key", &String::from_utf8_lossy(&self.key))
            .field("lease", &self.lease)
            .field("header", &self.header)
            .finish()
    }
}

impl HeldLock {
    /// The lock key (the lock name, `/`, and the lease ID in hex). Use it in transactions to
    /// make writes conditional on still holding the lock
    /// (`Compare::create_revision(key, CompareOp::Greater, 0)`-style guards).
    pub fn key(&self) -> &Bytes {
        &self.key
    }

    /// The lease the lock is attached to.
    pub fn lease(&self) -> i64 {
        self.lease
    }

    /// The header of the lock answer; its revision is at or after the moment the lock was
    /// acquired.
    pub fn header(&self) -> &ResponseHeader {
        &self.header
    }

    /// Whether the lock is still held: its key still exists, attached to its lease (a
    /// linearizable read). `false` once the lease has expired or was revoked, or the lock was
    /// released.
    pub fn is_held(&self) -> Request<bool> {
        let kv = self.service.client.kv();
        let key = self.key.clone();
        let lease = self.lease;
        Request::new(call_opts("Range", true), move |opts| async move {
            let mut get = kv.get(key);
            if let Some(t) = opts.timeout {
                get = get.timeout(t);
            }
            let resp = get.await?;
            Ok(resp.kvs.first().is_some_and(|kv| kv.lease() == lease))
        })
    }

    /// Release the lock (deletes its key; the lease stays).
    pub fn unlock(&self) -> Request<UnlockResponse> {
        self.service.unlock(self.key.clone())
    }
}
