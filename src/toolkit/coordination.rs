//! Locks and leader elections at the toolkit level: one call each, under the toolkit's key
//! prefix (`<prefix>/locks/<name>/` and `<prefix>/elections/<name>/`), built on the
//! concurrency recipes ([`Mutex`], [`Election`]) with a session (a kept lease) of their own.
//!
//! ```no_run
//! # async fn demo(client: etcdv3::Client) -> etcdv3::toolkit::ToolkitResult<()> {
//! use std::time::Duration;
//! let tk = client.toolkit();
//! let lock = tk.lock("migrations", Duration::from_secs(10)).await?;
//! // ... guarded work; lock.is_owner() guards writes in a txn ...
//! lock.unlock().await?;
//!
//! let leadership = tk.campaign("scheduler", "node-1", Duration::from_secs(10)).await?;
//! assert!(leadership.is_leader());
//! leadership.resign().await?;
//! # Ok(()) }
//! ```

use std::future::Future;
use std::time::Duration;

use super::{Toolkit, ToolkitError, ToolkitResult};
use crate::concurrency::{Election, Mutex, Observer, Session};
use crate::lease::LeaseLost;
use crate::{Compare, KeyValue};

fn ttl_secs(ttl: Duration) -> ToolkitResult<i64> {
    // etcd's largest lease TTL (`MaxLeaseTTL`): a longer one (`Duration::MAX` as "no
    // expiry") is that.
    const MAX_TTL: u64 = 9_000_000_000;
    if ttl < Duration::from_secs(1) {
        return Err(ToolkitError::InvalidTtl { ttl });
    }
    let secs = ttl
        .as_secs()
        .saturating_add(u64::from(ttl.subsec_nanos() > 0))
        .min(MAX_TTL);
    Ok(i64::try_from(secs).unwrap_or(i64::MAX))
}

/// A lock held through [`Toolkit::lock`] or [`Toolkit::try_lock`], on a session of its own.
///
/// Dropping it without [`unlock`](Self::unlock) stops keeping its lease: the lock is released
/// when the lease expires (as if the process had died). Use [`is_owner`](Self::is_owner) in a
/// transaction to guard writes with the lock (fencing).
#[derive(Debug)]
pub struct ToolkitLock {
    mutex: Mutex,
    session: Session,
}

impl ToolkitLock {
    /// The lock's own key in etcd.
    pub fn key(&self) -> &crate::Bytes {
        self.mutex.key()
    }

    /// The lock key's create revision: a fencing token that grows with every acquisition.
    pub fn fencing_revision(&self) -> Option<i64> {
        self.mutex.fencing_revision()
    }

    /// A compare that holds only while this lock is held: put it in a txn's `when` to guard
    /// writes.
    pub fn is_owner(&self) -> Compare {
        self.mutex.is_owner()
    }

    /// The lease that holds the lock.
    pub fn lease_id(&self) -> i64 {
        self.session.lease_id()
    }

    /// Resolves when the lock's lease is lost (the lock is then no longer held).
    pub fn lost(&self) -> impl Future<Output = LeaseLost> + Send + 'static {
        self.mutex.lost()
    }

    /// Release the lock and revoke its lease. On failure the lock is kept (and its lease
    /// kept alive), so the call can be retried; drop the lock once done.
    pub async fn unlock(&self) -> ToolkitResult<()> {
        self.mutex.unlock().await?;
        self.session.close().await?;
        Ok(())
    }
}

/// Leadership won through [`Toolkit::campaign`], on a session of its own.
///
/// Dropping it without [`resign`](Self::resign) stops keeping its lease: another campaigner
/// takes over when the lease expires.
#[derive(Debug)]
pub struct Leadership {
    election: Election,
    session: Session,
    identity: String,
}

impl Leadership {
    /// The identity this campaigner proclaimed.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// True while this campaigner leads (its lease is alive and it has not resigned).
    pub fn is_leader(&self) -> bool {
        self.election.is_leader() && self.session.is_alive()
    }

    /// The current leader's identity, if any.
    pub async fn leader(&self) -> ToolkitResult<Option<String>> {
        let kv: Option<KeyValue> = self.election.leader().await?;
        Ok(kv.map(|kv| String::from_utf8_lossy(kv.value()).into_owned()))
    }

    /// A stream of leader values (identities), including every change of leader.
    pub fn observe(&self) -> Observer {
        self.election.observe()
    }

    /// Resolves when the leadership's lease is lost (leadership is then gone).
    pub fn done(&self) -> impl Future<Output = LeaseLost> + Send + 'static {
        self.session.done()
    }

    /// A compare that holds only while this campaigner leads (for guarded writes).
    pub fn is_leader_compare(&self) -> Compare {
        self.election.is_leader_compare()
    }

    /// Step down (another campaigner takes over) and revoke the lease. On failure the
    /// leadership is kept (and its lease kept alive), so the call can be retried; drop the
    /// leadership once done.
    pub async fn resign(&self) -> ToolkitResult<()> {
        self.election.resign().await?;
        self.session.close().await?;
        Ok(())
    }
}

impl Toolkit {
    async fn session(&self, ttl: Duration) -> ToolkitResult<Session> {
        let ttl = ttl_secs(ttl)?;
        Ok(Session::new(&self.client).ttl(ttl).await?)
    }

    /// Acquire the lock `name` (waiting while another holds it), held by a lease of `ttl`
    /// (at least 1 s) kept alive until [`ToolkitLock::unlock`] or drop.
    pub async fn lock(&self, name: &str, ttl: Duration) -> ToolkitResult<ToolkitLock> {
        let prefix = self.section_key("locks", name)?;
        let session = self.session(ttl).await?;
        let mutex = Mutex::new(&session, prefix);
        if let Err(e) = mutex.lock().await {
            let _ = session.close().await;
            return Err(e.into());
        }
        Ok(ToolkitLock { mutex, session })
    }

    /// Take the lock `name` if it is free; fails at once with
    /// [`ErrorKind::Locked`](crate::ErrorKind::Locked) when another holds it (leaving no key).
    pub async fn try_lock(&self, name: &str, ttl: Duration) -> ToolkitResult<ToolkitLock> {
        let prefix = self.section_key("locks", name)?;
        let session = self.session(ttl).await?;
        let mutex = Mutex::new(&session, prefix);
        if let Err(e) = mutex.try_lock().await {
            let _ = session.close().await;
            return Err(e.into());
        }
        Ok(ToolkitLock { mutex, session })
    }

    /// Campaign in election `name` as `identity` (the value other campaigners and observers
    /// see), waiting until elected; leadership is held by a lease of `ttl` (at least 1 s).
    /// Cancelling the future (dropping it) withdraws the candidacy.
    pub async fn campaign(
        &self,
        name: &str,
        identity: &str,
        ttl: Duration,
    ) -> ToolkitResult<Leadership> {
        let prefix = self.section_key("elections", name)?;
        let session = self.session(ttl).await?;
        let election = Election::new(&session, prefix);
        if let Err(e) = election.campaign(identity.to_owned()).await {
            let _ = session.close().await;
            return Err(e.into());
        }
        Ok(Leadership {
            election,
            session,
            identity: identity.to_owned(),
        })
    }

    /// The current leader's identity in election `name`, without campaigning.
    pub async fn leader(&self, name: &str) -> ToolkitResult<Option<String>> {
        let prefix = self.section_key("elections", name)?;
        let resp = self
            .client
            .kv()
            .get(prefix)
            .prefix()
            .sort(crate::SortTarget::Create, crate::SortOrder::Ascend)
            .limit(1)
            .await?;
        Ok(resp
            .kvs
            .first()
            .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()))
    }
}
