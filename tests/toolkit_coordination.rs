//! Toolkit-level locks and elections (on the concurrency recipes), against real etcd.

mod common;

use std::time::{Duration, Instant};

use etcdv3::toolkit::ToolkitError;
use etcdv3::{Client, ErrorKind, Op};

async fn client(etcd: &etcdv3::testkit::EtcdCluster) -> Client {
    common::client(etcd).await
}

#[tokio::test]
async fn locks_exclude_each_other_and_fence_writes() {
    let etcd = common::etcd().await;
    let (c1, c2) = (client(&etcd).await, client(&etcd).await);
    let tk1 = c1.toolkit().prefix("/apps/demo");
    let tk2 = c2.toolkit().prefix("/apps/demo");
    let ttl = Duration::from_secs(5);

    let held = tk1.lock("jobs", ttl).await.unwrap();
    assert!(held.key().starts_with(b"/apps/demo/locks/jobs/"));
    // Held elsewhere: try_lock fails at once with Locked and leaves no key.
    let t = Instant::now();
    match tk2.try_lock("jobs", ttl).await {
        Err(ToolkitError::Etcd(e)) => assert_eq!(e.kind(), ErrorKind::Locked, "{e:?}"),
        other => panic!("expected Locked, got {other:?}"),
    }
    assert!(t.elapsed() < Duration::from_secs(2));
    let keys = c1
        .kv()
        .get("/apps/demo/locks/jobs/")
        .prefix()
        .await
        .unwrap();
    assert_eq!(keys.count, 1, "only the holder's key");

    // A guarded write succeeds while held.
    let ok = c1
        .kv()
        .txn()
        .when([held.is_owner()])
        .and_then([Op::put("/apps/demo/counter", "1")])
        .await
        .unwrap();
    assert!(ok.succeeded);

    // A second locker waits until the first unlocks.
    let waiter = tokio::spawn(async move {
        let l = tk2.lock("jobs", ttl).await.unwrap();
        (Instant::now(), l)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiter.is_finished(), "the second locker waits");
    let guard = held.is_owner();
    let fence1 = held.fencing_revision().unwrap();
    let unlocked_at = Instant::now();
    held.unlock().await.unwrap();
    let (got_at, second) = waiter.await.unwrap();
    assert!(got_at >= unlocked_at);
    assert!(got_at - unlocked_at < Duration::from_secs(2));
    assert!(
        second.fencing_revision().unwrap() > fence1,
        "fencing token grows"
    );
    // The old holder's guard no longer holds.
    let stale = c1
        .kv()
        .txn()
        .when([guard])
        .and_then([Op::put("/apps/demo/counter", "2")])
        .await
        .unwrap();
    assert!(!stale.succeeded);
    second.unlock().await.unwrap();
    assert_eq!(
        c1.kv()
            .get("/apps/demo/locks/")
            .prefix()
            .await
            .unwrap()
            .count,
        0
    );
}

#[tokio::test]
async fn a_dropped_holder_releases_the_lock_when_its_lease_expires() {
    let etcd = common::etcd().await;
    let (c1, c2) = (client(&etcd).await, client(&etcd).await);
    let held = c1
        .toolkit()
        .lock("l", Duration::from_secs(2))
        .await
        .unwrap();
    drop(held);
    drop(c1);
    let t = Instant::now();
    let l = c2
        .toolkit()
        .lock("l", Duration::from_secs(2))
        .await
        .unwrap();
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    l.unlock().await.unwrap();
}

#[tokio::test]
async fn campaign_leader_observe_and_resign() {
    let etcd = common::etcd().await;
    let (c1, c2, c3) = (
        client(&etcd).await,
        client(&etcd).await,
        client(&etcd).await,
    );
    let ttl = Duration::from_secs(5);
    let a = c1.toolkit().campaign("sched", "node-a", ttl).await.unwrap();
    assert!(a.is_leader());
    assert_eq!(a.identity(), "node-a");
    assert_eq!(
        c3.toolkit().leader("sched").await.unwrap().as_deref(),
        Some("node-a")
    );
    let mut observer = a.observe();
    let first = observer.next().await.unwrap().unwrap();
    assert_eq!(first.value_str().unwrap(), "node-a");

    let b_task = tokio::spawn(async move {
        c2.toolkit()
            .campaign("sched", "node-b", Duration::from_secs(5))
            .await
            .unwrap()
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!b_task.is_finished(), "node-b waits while node-a leads");
    a.resign().await.unwrap();
    let b = tokio::time::timeout(Duration::from_secs(5), b_task)
        .await
        .unwrap()
        .unwrap();
    assert!(b.is_leader());
    let next = tokio::time::timeout(Duration::from_secs(5), observer.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(next.value_str().unwrap(), "node-b");
    assert_eq!(b.leader().await.unwrap().as_deref(), Some("node-b"));
    b.resign().await.unwrap();
    assert_eq!(c3.toolkit().leader("sched").await.unwrap(), None);
}

#[tokio::test]
async fn bad_names_and_ttls_are_typed_errors() {
    let etcd = common::etcd().await;
    let tk = client(&etcd).await.toolkit();
    assert!(matches!(
        tk.lock("x", Duration::from_millis(500)).await,
        Err(ToolkitError::InvalidTtl { .. })
    ));
    assert!(matches!(
        tk.try_lock("", Duration::from_secs(5)).await,
        Err(ToolkitError::InvalidName { .. })
    ));
    assert!(matches!(
        tk.campaign("a/b", "me", Duration::from_secs(5)).await,
        Err(ToolkitError::InvalidName { .. })
    ));
}

#[tokio::test]
async fn a_failed_resign_or_unlock_can_be_retried_and_a_huge_ttl_is_the_longest() {
    let etcd = common::etcd().await;
    let proxy = etcdv3::testkit::FaultProxy::start(etcd.client_addr(0))
        .await
        .unwrap();
    let c = etcdv3::Client::builder([proxy.endpoint()])
        .request_timeout(Duration::from_millis(500))
        .connect_timeout(Duration::from_millis(500))
        .connect()
        .await
        .unwrap();
    let observer = client(&etcd).await.toolkit();
    let tk = c.toolkit();
    // `Duration::MAX` as "no expiry": etcd's longest TTL, not a panic.
    let leadership = tk.campaign("retry", "me", Duration::MAX).await.unwrap();
    let lock = tk.lock("retry", Duration::from_secs(30)).await.unwrap();
    proxy.blackhole();
    assert!(leadership.resign().await.is_err(), "cut off: resign fails");
    assert!(lock.unlock().await.is_err(), "cut off: unlock fails");
    assert_eq!(
        observer.leader("retry").await.unwrap().as_deref(),
        Some("me")
    );
    proxy.pass();
    // Retried until they go through (the connection is being re-established).
    let deadline = Instant::now() + Duration::from_secs(20);
    while let Err(e) = leadership.resign().await {
        assert!(Instant::now() < deadline, "resign kept failing: {e:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    while let Err(e) = lock.unlock().await {
        assert!(Instant::now() < deadline, "unlock kept failing: {e:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(observer.leader("retry").await.unwrap(), None);
    let again = observer.try_lock("retry", Duration::from_secs(5)).await;
    assert!(again.is_ok(), "the lock is free: {again:?}");
}
