//! The lease API and the lease keeper against a real etcd: every call asserted on the server's
//! answer, keep-alive under faults (blackhole, member restart, leader kills), 10,000 leases on
//! one stream, and task lifetimes.

mod common;

use std::future::IntoFuture;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{client, etcd, wait_until};
use etcdv3::testkit::{EtcdCluster, FaultProxy};
use etcdv3::{Client, ErrorKind, KeptLease, LeaseLost};

/// Waits (bounded) until the runtime's live task count is back at `baseline`.
async fn wait_for_tasks(baseline: usize) {
    let m = tokio::runtime::Handle::current().metrics();
    wait_until(Duration::from_secs(10), "background tasks to end", || {
        let n = m.num_alive_tasks();
        async move { n == baseline }
    })
    .await;
}

/// Waits until the server no longer knows lease `id`.
async fn wait_gone(c: &Client, id: i64, timeout: Duration) {
    let lease = c.lease();
    wait_until(timeout, "the lease to be gone on the server", || {
        let f = lease.time_to_live(id).into_future();
        async move { f.await.unwrap().ttl == -1 }
    })
    .await;
}

/// A client for `endpoint` with the test request timeout.
async fn client_at(endpoint: String) -> Client {
    Client::builder([endpoint])
        .request_timeout(Duration::from_secs(10))
        .connect()
        .await
        .unwrap()
}

#[tokio::test]
async fn grant_time_to_live_leases_revoke_and_errors() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let lease = c.lease();

    // Grant: the server chooses the ID and grants the TTL asked for.
    let g = lease.grant(60).await.unwrap();
    assert!(g.id > 0);
    assert_eq!(g.ttl, 60);
    assert!(g.header.revision >= 1);
    assert_ne!(g.header.member_id, 0);

    // Time to live, without and with keys.
    let t = lease.time_to_live(g.id).await.unwrap();
    assert_eq!(t.id, g.id);
    assert_eq!(t.granted_ttl, 60);
    assert!((58..=60).contains(&t.ttl), "{t:?}");
    assert!(t.keys.is_empty());
    assert!(t.exists());
    c.kv().put("lk/b", "2").lease(g.id).await.unwrap();
    c.kv().put("lk/a", "1").lease(g.id).await.unwrap();
    c.kv().put("lk/other", "x").await.unwrap();
    let t = lease.time_to_live(g.id).keys().await.unwrap();
    let mut keys: Vec<_> = t.keys.iter().map(|k| k.to_vec()).collect();
    keys.sort();
    assert_eq!(keys, [b"lk/a".to_vec(), b"lk/b".to_vec()]);
    assert_eq!(c.kv().get("lk/a").await.unwrap().kvs[0].lease(), g.id);

    // An explicit ID; the same ID again is a typed error.
    let explicit = lease.grant(30).id(0x1234_5678).await.unwrap();
    assert_eq!(explicit.id, 0x1234_5678);
    assert_eq!(explicit.ttl, 30);
    let e = lease.grant(30).id(0x1234_5678).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::LeaseExist, "{e:?}");
    // A TTL above etcd's maximum (9,000,000,000 s).
    let e = lease.grant(9_000_000_001).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::TtlTooLarge, "{e:?}");

    // The list holds exactly the two leases.
    let mut listed = lease.leases().await.unwrap().leases;
    listed.sort();
    let mut expected = vec![g.id, explicit.id];
    expected.sort();
    assert_eq!(listed, expected);

    // Keep-alive once: the TTL is back at the granted value.
    let k = lease.keep_alive_once(explicit.id).await.unwrap();
    assert_eq!(k.id, explicit.id);
    assert_eq!(k.ttl, 30);

    // Revoke: the lease's keys go, the other key stays.
    let rev = lease.revoke(g.id).await.unwrap();
    assert!(rev.header.revision > t.header.revision);
    assert_eq!(c.kv().get("lk/").prefix().count_only().await.unwrap().count, 1);
    assert_eq!(c.kv().get("lk/other").await.unwrap().count, 1);
    let t = lease.time_to_live(g.id).keys().await.unwrap();
    assert_eq!(t.ttl, -1);
    assert!(!t.exists());
    assert!(t.keys.is_empty());
    assert_eq!(lease.leases().await.unwrap().leases, vec![explicit.id]);

    // Operations on a lease that does not exist.
    let e = lease.revoke(g.id).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::LeaseNotFound, "{e:?}");
    let e = lease.keep_alive_once(g.id).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::LeaseNotFound, "{e:?}");
    let e = lease.keep_alive(g.id).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::LeaseNotFound, "{e:?}");
    let e = c.kv().put("lk/c", "3").lease(g.id).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::LeaseNotFound, "{e:?}");
}

#[tokio::test]
async fn a_lease_expires_without_keep_alive() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let g = c.lease().grant(1).await.unwrap();
    c.kv().put("exp", "v").lease(g.id).await.unwrap();
    wait_gone(&c, g.id, Duration::from_secs(10)).await;
    wait_until(Duration::from_secs(5), "the key to be deleted", || {
        let f = c.kv().get("exp").count_only().into_future();
        async move { f.await.unwrap().count == 0 }
    })
    .await;
}

/// Samples `key` every 200 ms through `checker` for `period`; asserts it is always there,
/// and that `kept` is never reported lost.
async fn key_stays(checker: &Client, key: &str, kept: &KeptLease, period: Duration) -> usize {
    let end = Instant::now() + period;
    let mut checks = 0;
    while Instant::now() < end {
        let got = checker.kv().get(key).await.unwrap();
        assert_eq!(got.count, 1, "the key of a kept lease vanished");
        assert_eq!(kept.lost_reason(), None, "{:?}", kept.status());
        assert!(kept.ttl() > 0);
        checks += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    checks
}

#[tokio::test]
async fn a_kept_lease_stays_alive_for_several_ttls() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let checker = client(&etcd).await;

    let kept = c.lease().grant(2).keep_alive().await.unwrap();
    assert_eq!(kept.ttl(), 2);
    c.kv().put("alive", "v").lease(kept.id()).await.unwrap();
    let first = kept.status();
    assert!(first.is_alive());
    assert!(first.deadline > first.acknowledged_at - Duration::from_secs(1));

    let checks = key_stays(&checker, "alive", &kept, Duration::from_secs(7)).await;
    assert!(checks >= 20, "{checks}");
    // Refreshed many times (about every 2/3 s) on one stream.
    let last = kept.status();
    assert!(last.acknowledged_at > first.acknowledged_at + Duration::from_secs(5));
    assert!(last.deadline > last.acknowledged_at);
    assert!(last.deadline <= last.acknowledged_at + Duration::from_secs(2));
    assert_eq!(c.lease().keeper_streams_opened(), 1);
    let t = checker.lease().time_to_live(kept.id()).await.unwrap();
    assert!((1..=2).contains(&t.ttl), "{t:?}");

    // Keep an existing lease too: the first acknowledgement gives its TTL.
    let g = c.lease().grant(3).await.unwrap();
    let kept2 = c.lease().keep_alive(g.id).await.unwrap();
    assert_eq!(kept2.ttl(), 3);
    assert_eq!(kept2.id(), g.id);
    assert_eq!(c.lease().keeper_leases(), 2);
    assert_eq!(c.lease().keeper_streams_opened(), 1);
}

#[tokio::test]
async fn revoke_reports_the_loss() {
    let etcd = etcd().await;
    let owner = client(&etcd).await;
    let other = client(&etcd).await;

    // Revoked by another client: the next refresh is answered with TTL 0.
    let kept = owner.lease().grant(3).keep_alive().await.unwrap();
    owner.kv().put("rv", "v").lease(kept.id()).await.unwrap();
    let lost = kept.lost();
    let t0 = Instant::now();
    other.lease().revoke(kept.id()).await.unwrap();
    let reason = tokio::time::timeout(Duration::from_secs(3), lost)
        .await
        .expect("loss reported within a refresh interval (+ slack)");
    assert!(
        matches!(reason, LeaseLost::Expired | LeaseLost::Revoked),
        "{reason:?}"
    );
    assert!(t0.elapsed() < Duration::from_secs(3));
    assert_eq!(kept.ttl(), 0);
    assert_eq!(kept.lost_reason(), Some(reason));
    assert_eq!(owner.lease().keeper_leases(), 0);

    // Revoked through the owner's own client: reported at once, as revoked.
    let kept = owner.lease().grant(30).keep_alive().await.unwrap();
    owner.lease().revoke(kept.id()).await.unwrap();
    let reason = tokio::time::timeout(Duration::from_secs(1), kept.lost())
        .await
        .unwrap();
    assert_eq!(reason, LeaseLost::Revoked);

    // Through the handle itself.
    let kept = owner.lease().grant(30).keep_alive().await.unwrap();
    owner.kv().put("rv2", "v").lease(kept.id()).await.unwrap();
    kept.revoke().await.unwrap();
    assert_eq!(kept.lost().await, LeaseLost::Revoked);
    assert_eq!(other.kv().get("rv2").await.unwrap().count, 0);
    let t = other.lease().time_to_live(kept.id()).await.unwrap();
    assert_eq!(t.ttl, -1);
}
