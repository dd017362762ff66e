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
use etcdv3::{Client, ErrorKind, KeptLease, LeaseLost, Op};

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
    assert_eq!(
        c.kv().get("lk/").prefix().count_only().await.unwrap().count,
        1
    );
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
    // etcd rounds the time left down to whole seconds: 0 just before a refresh is due.
    let t = checker.lease().time_to_live(kept.id()).await.unwrap();
    assert!(t.exists() && (0..=2).contains(&t.ttl), "{t:?}");

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

#[tokio::test]
async fn a_write_refused_for_a_missing_lease_reports_the_loss_at_once() {
    let etcd = etcd().await;
    let owner = client(&etcd).await;
    let other = client(&etcd).await;

    // TTL 60: the keeper's next refresh is 20 s away, so only the refused put can tell it.
    let kept = owner.lease().grant(60).keep_alive().await.unwrap();
    other.lease().revoke(kept.id()).await.unwrap();
    assert!(kept.lost_reason().is_none(), "the keeper cannot know yet");
    let err = owner
        .kv()
        .put("gone/put", "v")
        .lease(kept.id())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::LeaseNotFound);
    let reason = tokio::time::timeout(Duration::from_secs(5), kept.lost())
        .await
        .expect("the refused put reported the loss");
    assert_eq!(reason, LeaseLost::Expired);
    assert_eq!(kept.ttl(), 0);

    // The same through a transaction whose puts all use the lease (a nested one included).
    let kept = owner.lease().grant(60).keep_alive().await.unwrap();
    other.lease().revoke(kept.id()).await.unwrap();
    let err = owner
        .kv()
        .txn()
        .and_then([
            Op::from(Op::get("gone/txn")),
            Op::from(Op::txn().and_then([Op::put("gone/txn", "v").lease(kept.id())])),
        ])
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::LeaseNotFound);
    let reason = tokio::time::timeout(Duration::from_secs(5), kept.lost())
        .await
        .expect("the refused transaction reported the loss");
    assert_eq!(reason, LeaseLost::Expired);

    // A transaction with puts on two leases does not say which is gone: both stay kept
    // until their own refresh says otherwise.
    let a = owner.lease().grant(60).keep_alive().await.unwrap();
    let b = owner.lease().grant(60).keep_alive().await.unwrap();
    other.lease().revoke(a.id()).await.unwrap();
    let err = owner
        .kv()
        .txn()
        .and_then([
            Op::put("gone/a", "v").lease(a.id()),
            Op::put("gone/b", "v").lease(b.id()),
        ])
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::LeaseNotFound);
    // The keeper handles commands in order: a lease kept after the error was handled.
    let probe = owner.lease().grant(60).keep_alive().await.unwrap();
    assert!(probe.lost_reason().is_none());
    assert!(
        b.lost_reason().is_none(),
        "a lease that still exists was reported lost"
    );
    assert!(
        a.lost_reason().is_none(),
        "the keeper learns of `a` at its next refresh, not from this"
    );
}

#[tokio::test]
async fn a_lost_revoke_on_drop_handle_dropped_after_the_lease_is_kept_again_does_not_revoke_it() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let proxy = FaultProxy::start(etcd.client_addr(0)).await.unwrap();
    let pc = client_at(proxy.endpoint()).await;
    let lease = c.lease().grant(3).await.unwrap().id;
    // Kept alive on the server throughout by another client.
    let _also = c.lease().keep_alive(lease).await.unwrap();

    let first = pc.lease().keep_alive(lease).revoke_on_drop().await.unwrap();
    // Acknowledgements stop coming back: the handle is lost (not acknowledged by the
    // deadline), while the lease lives on.
    proxy.blackhole_direction(etcdv3::testkit::Direction::ServerToClient);
    let reason = tokio::time::timeout(Duration::from_secs(10), first.lost())
        .await
        .expect("the loss reported by the deadline");
    assert_eq!(reason, LeaseLost::NotAcknowledged);
    proxy.pass();
    // Kept again through the same client, by a new handle.
    let second = pc.lease().keep_alive(lease).await.unwrap();
    assert!(second.lost_reason().is_none());
    // The old handle's revoke-on-drop belonged to its keeping, which ended: dropping it now
    // must not revoke the lease the new handle keeps.
    drop(first);
    // A revoke-on-drop after it, waited for: the keeper handles the drops in order.
    let later = c.lease().grant(30).await.unwrap().id;
    let h = pc.lease().keep_alive(later).revoke_on_drop().await.unwrap();
    drop(h);
    wait_gone(&c, later, Duration::from_secs(10)).await;
    assert!(c.lease().time_to_live(lease).await.unwrap().exists());
    assert!(second.lost_reason().is_none());
}

#[tokio::test]
async fn blackhole_reports_the_loss_by_the_deadline_and_never_alive_again() {
    const TTL: i64 = 3;
    let etcd = etcd().await;
    let proxy = FaultProxy::start(etcd.client_addr(0)).await.unwrap();
    let c = client_at(proxy.endpoint()).await;
    let direct = client(&etcd).await;

    let kept = c.lease().grant(TTL).keep_alive().await.unwrap();
    c.kv().put("bh", "v").lease(kept.id()).await.unwrap();
    // Record every status the keeper publishes, to check that nothing says "alive" after
    // the loss.
    let mut statuses = kept.watch();
    let history = tokio::spawn(async move {
        let mut seen = vec![*statuses.borrow_and_update()];
        while statuses.changed().await.is_ok() {
            seen.push(*statuses.borrow_and_update());
        }
        seen
    });
    // Two acknowledged refreshes first.
    let mut w = kept.watch();
    for _ in 0..2 {
        tokio::time::timeout(Duration::from_secs(3), w.changed())
            .await
            .unwrap()
            .unwrap();
    }

    proxy.blackhole();
    let cut_at = Instant::now();
    let reason = tokio::time::timeout(Duration::from_secs(TTL as u64 + 2), kept.lost())
        .await
        .expect("the loss must be reported by the deadline");
    let lost_at = Instant::now();
    assert_eq!(reason, LeaseLost::NotAcknowledged);
    let s = kept.status();
    assert_eq!(s.lost, Some(LeaseLost::NotAcknowledged));
    assert_eq!(s.ttl, 0);
    // Reported at the deadline, which is no later than the last acknowledgement + TTL.
    assert!(s.deadline <= s.acknowledged_at + Duration::from_secs(TTL as u64));
    assert!(lost_at >= s.deadline, "reported before the deadline");
    assert!(
        lost_at <= s.acknowledged_at + Duration::from_secs(TTL as u64) + Duration::from_secs(1),
        "reported {:?} after the last acknowledgement",
        lost_at - s.acknowledged_at
    );
    assert!(s.acknowledged_at <= cut_at);

    // Stay cut off for twice the TTL in all, then heal.
    tokio::time::sleep_until((cut_at + Duration::from_secs(2 * TTL as u64)).into()).await;
    assert_eq!(kept.lost_reason(), Some(LeaseLost::NotAcknowledged));
    proxy.pass();

    // The server expired the lease (and its key) meanwhile.
    wait_gone(&direct, kept.id(), Duration::from_secs(10)).await;
    assert_eq!(direct.kv().get("bh").await.unwrap().count, 0);
    // Through the healed path, the keeper reports it expired, and the old handle stays lost.
    let e = c.lease().keep_alive(kept.id()).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::LeaseNotFound, "{e:?}");
    assert_eq!(kept.lost_reason(), Some(LeaseLost::NotAcknowledged));
    assert_eq!(c.lease().keeper_leases(), 0);

    drop(kept);
    let seen = history.await.unwrap();
    let first_lost = seen.iter().position(|s| s.lost.is_some()).unwrap();
    assert!(
        seen[first_lost..].iter().all(|s| s.lost.is_some()),
        "alive after lost: {seen:?}"
    );
    assert!(first_lost >= 3, "{seen:?}");
}

#[tokio::test]
async fn keeper_reconnects_after_the_member_restarts() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let kept = c.lease().grant(10).keep_alive().await.unwrap();
    c.kv().put("rs", "v").lease(kept.id()).await.unwrap();
    // The grant gave the TTL: the stream opens with the first refresh, a third of a TTL on.
    assert_eq!(c.lease().keeper_streams_opened(), 0);
    let mut w = kept.watch();
    tokio::time::timeout(Duration::from_secs(5), w.changed())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(c.lease().keeper_streams_opened(), 1);

    etcd.kill(0).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    etcd.restart_async(0).await.unwrap();
    let back = Instant::now();

    // A refresh acknowledged after the restart, on a new stream.
    tokio::time::timeout(
        Duration::from_secs(8),
        w.wait_for(|s| s.acknowledged_at > back || s.lost.is_some()),
    )
    .await
    .expect("a refresh after the restart")
    .unwrap();
    assert_eq!(kept.lost_reason(), None, "{:?}", kept.status());
    assert!(kept.ttl() > 0);
    assert!(c.lease().keeper_streams_opened() >= 2);
    let checker = client(&etcd).await;
    let t = checker.lease().time_to_live(kept.id()).await.unwrap();
    assert!(t.ttl > 0, "{t:?}");
    assert_eq!(checker.kv().get("rs").await.unwrap().count, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_kept_leases_share_one_stream() {
    use futures::StreamExt;
    const N: usize = 10_000;
    const TTL: i64 = 5;
    let etcd = etcd().await;
    let metrics = tokio::runtime::Handle::current().metrics();
    let baseline = metrics.num_alive_tasks();
    let c = client(&etcd).await;
    let checker = client(&etcd).await;

    let start = Instant::now();
    let lease = c.lease();
    let kept: Vec<KeptLease> = futures::stream::iter(0..N)
        .map(|_| lease.grant(TTL).keep_alive().into_future())
        .buffer_unordered(256)
        .map(|r| r.unwrap())
        .collect()
        .await;
    let granted = Instant::now();
    println!("granted {N} kept leases in {:?}", granted - start);
    assert_eq!(c.lease().keeper_leases(), N as u64);

    // Alive for well over a TTL after the last grant: every lease was refreshed since.
    let mut lost = 0;
    let until = granted + Duration::from_secs(2 * TTL as u64);
    while Instant::now() < until {
        lost = kept.iter().filter(|k| k.lost_reason().is_some()).count();
        assert_eq!(lost, 0);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let stale = kept
        .iter()
        .filter(|k| {
            let s = k.status();
            s.lost.is_some() || s.acknowledged_at < granted + Duration::from_secs(TTL as u64)
        })
        .count();
    assert_eq!((lost, stale), (0, 0));
    assert_eq!(
        c.lease().keeper_streams_opened(),
        1,
        "one keep-alive stream"
    );
    let on_server = checker.lease().leases().await.unwrap().leases.len();
    assert_eq!(on_server, N);
    for k in kept.iter().step_by(N / 10) {
        let t = checker.lease().time_to_live(k.id()).await.unwrap();
        assert!(t.ttl > 0, "{t:?}");
    }

    drop(kept);
    wait_until(
        Duration::from_secs(5),
        "the keeper to drop every lease",
        || {
            let n = lease.keeper_leases();
            async move { n == 0 }
        },
    )
    .await;
    drop((lease, c, checker));
    wait_for_tasks(baseline).await;
}

#[tokio::test]
async fn dropping_handles_stops_keep_alives_and_ends_the_task() {
    let etcd = etcd().await;
    let metrics = tokio::runtime::Handle::current().metrics();
    let baseline = metrics.num_alive_tasks();
    let c = client(&etcd).await;
    let checker = client(&etcd).await;

    // Two handles for one lease: dropping one keeps the lease alive.
    let g = c.lease().grant(2).await.unwrap();
    c.kv().put("dr", "v").lease(g.id).await.unwrap();
    let a = c.lease().keep_alive(g.id).await.unwrap();
    let b = c.lease().keep_alive(g.id).await.unwrap();
    assert_eq!(c.lease().keeper_leases(), 1);
    let b_lost = b.lost();
    drop(b);
    // `lost()` of a dropped handle resolves once nothing keeps the lease; not yet.
    let mut w = a.watch();
    let before = a.status().acknowledged_at;
    tokio::time::timeout(
        Duration::from_secs(4),
        w.wait_for(|s| s.acknowledged_at > before + Duration::from_secs(1)),
    )
    .await
    .expect("refreshes go on for the remaining handle")
    .unwrap();
    assert_eq!(a.lost_reason(), None);
    assert_eq!(checker.kv().get("dr").await.unwrap().count, 1);

    // Dropping the last handle stops the refreshes: the server expires the lease.
    drop(a);
    assert_eq!(b_lost.await, LeaseLost::Closed);
    assert_eq!(c.lease().keeper_leases(), 0);
    wait_gone(&checker, g.id, Duration::from_secs(6)).await;
    assert_eq!(checker.kv().get("dr").await.unwrap().count, 0);

    drop((c, checker));
    wait_for_tasks(baseline).await;
}

#[tokio::test]
async fn revoke_on_drop_revokes() {
    let etcd = etcd().await;
    let metrics = tokio::runtime::Handle::current().metrics();
    let baseline = metrics.num_alive_tasks();
    let c = client(&etcd).await;
    let checker = client(&etcd).await;

    // The handle is dropped: revoked at once (the TTL would last a minute).
    let kept = c
        .lease()
        .grant(60)
        .keep_alive()
        .revoke_on_drop()
        .await
        .unwrap();
    c.kv().put("rod", "v").lease(kept.id()).await.unwrap();
    let id = kept.id();
    drop(kept);
    wait_gone(&checker, id, Duration::from_secs(3)).await;
    assert_eq!(checker.kv().get("rod").await.unwrap().count, 0);

    // Another handle of the same lease learns it was revoked.
    let g = c.lease().grant(60).await.unwrap();
    let plain = c.lease().keep_alive(g.id).await.unwrap();
    let revoking = c.lease().keep_alive(g.id).revoke_on_drop().await.unwrap();
    drop(revoking);
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(2), plain.lost())
            .await
            .unwrap(),
        LeaseLost::Revoked
    );
    wait_gone(&checker, g.id, Duration::from_secs(3)).await;
    drop(plain);

    // The client goes first; the keeper still performs the revoke before it ends.
    let kept = c
        .lease()
        .grant(60)
        .keep_alive()
        .revoke_on_drop()
        .await
        .unwrap();
    let id = kept.id();
    drop(c);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(checker.lease().time_to_live(id).await.unwrap().ttl > 0);
    drop(kept);
    wait_gone(&checker, id, Duration::from_secs(3)).await;
    drop(checker);
    wait_for_tasks(baseline).await;
}

#[tokio::test]
async fn closing_the_client_reports_closed() {
    let etcd = etcd().await;
    let metrics = tokio::runtime::Handle::current().metrics();
    let baseline = metrics.num_alive_tasks();
    let c = client(&etcd).await;
    let kept = c.lease().grant(30).keep_alive().await.unwrap();
    let closing = std::time::Instant::now();
    c.close().await;
    let reason = tokio::time::timeout(Duration::from_secs(3), kept.lost())
        .await
        .unwrap();
    assert_eq!(reason, LeaseLost::Closed);
    // The keeper is told at once (it does not poll for the close).
    assert!(
        closing.elapsed() < Duration::from_millis(500),
        "{:?}",
        closing.elapsed()
    );
    let e = c.lease().grant(5).keep_alive().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Closed, "{e:?}");
    // The task ended although a handle and the client are still alive.
    wait_for_tasks(baseline).await;
    drop((kept, c));

    // An idle keeper (its lease gone long ago) also ends on close.
    let c = client(&etcd).await;
    let kept = c.lease().grant(30).keep_alive().await.unwrap();
    drop(kept);
    wait_until(Duration::from_secs(2), "the keeper to go idle", || {
        let n = c.lease().keeper_leases();
        async move { n == 0 }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let clone = c.clone();
    c.close().await;
    wait_for_tasks(baseline).await;
    drop(clone);
}

/// Kills the leader every 8 s for 60 s (restarting it each time) while a lease with TTL 5 s is
/// kept through a member that stays up; a second client checks the lease's key every 200 ms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_lease_survives_leader_kills() {
    use etcdv3::raw::etcdserverpb as pb;
    let cluster = EtcdCluster::builder()
        .members(3)
        .start_async()
        .await
        .unwrap();
    let leader = cluster.leader_async(Duration::from_secs(10)).await.unwrap();
    let pinned = (leader + 1) % 3;
    let c = client_at(cluster.endpoint(pinned)).await;
    let checker = client_at(cluster.endpoint(pinned)).await;
    let member_ids: Vec<(String, u64)> = c
        .raw()
        .unwrap()
        .cluster()
        .member_list(pb::MemberListRequest::default())
        .await
        .unwrap()
        .into_inner()
        .members
        .into_iter()
        .map(|m| (m.name, m.id))
        .collect();
    let id_of = |i: usize| {
        member_ids
            .iter()
            .find(|(n, _)| n == cluster.member_name(i))
            .map(|(_, id)| *id)
            .unwrap()
    };

    // Refreshes go through the follower to each new leader; a TTL with room for an election
    // on a loaded box (twice the default election timeout and then some).
    let kept = c.lease().grant(8).keep_alive().await.unwrap();
    c.kv().put("lk", "v").lease(kept.id()).await.unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let (seen, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let checker_task = {
        let (stop, seen, failed) = (stop.clone(), seen.clone(), failed.clone());
        let checker = checker.clone();
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                match checker
                    .kv()
                    .get("lk")
                    .serializable()
                    .timeout(Duration::from_secs(1))
                    .await
                {
                    Ok(r) => {
                        assert_eq!(r.count, 1, "the kept lease's key vanished");
                        seen.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(_) => {
                        failed.fetch_add(1, Ordering::SeqCst);
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };

    let start = Instant::now();
    let mut kills = 0;
    while start.elapsed() < Duration::from_secs(56) {
        let round = Instant::now();
        let mut leader = cluster.leader_async(Duration::from_secs(10)).await.unwrap();
        if leader == pinned {
            // Keep the pinned member up: hand leadership away first.
            let target = (pinned + 1) % 3;
            c.raw()
                .unwrap()
                .maintenance()
                .move_leader(pb::MoveLeaderRequest {
                    target_id: id_of(target),
                })
                .await
                .unwrap();
            leader = cluster.leader_async(Duration::from_secs(10)).await.unwrap();
            assert_ne!(leader, pinned);
        }
        cluster.kill(leader).unwrap();
        kills += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
        cluster.restart_async(leader).await.unwrap();
        assert_eq!(kept.lost_reason(), None, "{:?}", kept.status());
        tokio::time::sleep_until((round + Duration::from_secs(8)).into()).await;
    }
    stop.store(true, Ordering::SeqCst);
    checker_task.await.unwrap();

    assert!(kills >= 7, "{kills}");
    assert_eq!(kept.lost_reason(), None, "{:?}", kept.status());
    assert!(kept.ttl() > 0);
    let t = checker.lease().time_to_live(kept.id()).await.unwrap();
    assert!(t.ttl > 0, "{t:?}");
    assert_eq!(checker.kv().get("lk").await.unwrap().count, 1);
    let (seen, failed) = (seen.load(Ordering::SeqCst), failed.load(Ordering::SeqCst));
    println!(
        "{kills} leader kills; key seen {seen} times, {failed} reads failed; {} keep-alive streams",
        c.lease().keeper_streams_opened()
    );
    // About 280 reads of 200 ms each at most in 56 s; most of them see the key.
    assert!(seen >= 150, "{seen}");
}

#[tokio::test]
async fn a_cut_connection_is_replaced_and_overdue_refreshes_go_out_at_once() {
    const TTL: i64 = 3;
    let etcd = etcd().await;
    let proxy = FaultProxy::start(etcd.client_addr(0)).await.unwrap();
    let c = client_at(proxy.endpoint()).await;
    let kept = c.lease().grant(TTL).keep_alive().await.unwrap();
    let mut w = kept.watch();
    tokio::time::timeout(Duration::from_secs(3), w.changed())
        .await
        .unwrap()
        .unwrap();
    let acked = kept.status().acknowledged_at;

    // Hold everything until the lease is half-way to its deadline: its refresh (due a third
    // of the TTL after the last one) is sent and unanswered.
    proxy.blackhole();
    tokio::time::sleep_until((acked + Duration::from_millis(1500)).into()).await;
    proxy.cut_all().await;
    proxy.pass();
    let healed = Instant::now();
    let s = *tokio::time::timeout(
        Duration::from_secs(2),
        w.wait_for(|s| s.acknowledged_at > healed || s.lost.is_some()),
    )
    .await
    .expect("a refresh right after the reconnect")
    .unwrap();
    assert_eq!(s.lost, None, "{s:?}");
    assert!(
        s.acknowledged_at - healed < Duration::from_millis(1200),
        "the overdue refresh waited {:?}",
        s.acknowledged_at - healed
    );
    assert!(c.lease().keeper_streams_opened() >= 2);
    assert!(proxy.connections_total() >= 2);
    // And it goes on.
    let before = kept.status().acknowledged_at;
    tokio::time::timeout(
        Duration::from_secs(3),
        w.wait_for(|s| s.acknowledged_at > before),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(kept.lost_reason(), None);
}

/// The keep-alive stream asks for a leader: a member that lost its cluster refuses it (rather
/// than hold it), and a lease kept through it is reported lost by its deadline.
#[tokio::test]
async fn a_member_without_a_leader_cannot_keep_a_lease_alive() {
    const TTL: i64 = 3;
    let cluster = EtcdCluster::builder()
        .members(3)
        .start_async()
        .await
        .unwrap();
    let c = client_at(cluster.endpoint(0)).await;
    let kept = c.lease().grant(TTL).keep_alive().await.unwrap();
    let spare = c.lease().grant(60).await.unwrap();
    let mut w = kept.watch();
    tokio::time::timeout(Duration::from_secs(3), w.changed())
        .await
        .unwrap()
        .unwrap();

    cluster.stop(1).unwrap();
    cluster.stop(2).unwrap();
    let stopped = Instant::now();
    let reason = tokio::time::timeout(Duration::from_secs(TTL as u64 + 3), kept.lost())
        .await
        .expect("the loss is reported by the deadline");
    let lost_at = Instant::now();
    assert_eq!(reason, LeaseLost::NotAcknowledged);
    let s = kept.status();
    assert!(lost_at >= s.deadline);
    assert!(lost_at <= s.acknowledged_at + Duration::from_secs(TTL as u64 + 1));
    // A leader that lost its followers goes on renewing until it notices (CheckQuorum, one
    // election timeout of 0.5 s here): an acknowledgement may still come a little after the
    // stop, never much later.
    assert!(
        s.acknowledged_at <= stopped + Duration::from_secs(2),
        "acknowledged {:?} after the stop",
        s.acknowledged_at - stopped
    );

    // With the leader gone, the member refuses keep-alive streams at once.
    wait_until(
        Duration::from_secs(10),
        "the member to refuse with NoLeader",
        || {
            let f = c
                .lease()
                .keep_alive_once(spare.id)
                .timeout(Duration::from_secs(2))
                .into_future();
            async move {
                match f.await {
                    Err(e) if e.kind() == ErrorKind::NoLeader => true,
                    Err(e) => {
                        assert!(e.is_retryable() || e.is_deadline(), "{e:?}");
                        false
                    }
                    Ok(r) => panic!("a member without a leader refreshed a lease: {r:?}"),
                }
            }
        },
    )
    .await;

    cluster.cont(1).unwrap();
    cluster.cont(2).unwrap();
    cluster
        .wait_all_healthy_async(Duration::from_secs(20))
        .await
        .unwrap();
    // Lost stays lost, even though the cluster is back.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(kept.lost_reason(), Some(LeaseLost::NotAcknowledged));
    assert_eq!(kept.ttl(), 0);
}

#[test]
fn handles_are_send_and_sync() {
    fn check<T: Send + Sync + 'static>() {}
    check::<KeptLease>();
    check::<etcdv3::Lease>();
    check::<etcdv3::LeaseStatus>();
}

/// A server that is slow, not gone: for a while every answer comes about 2.2 s after its
/// refresh, more than a third of the TTL (2 s, when the keeper counts a silent stream as
/// stalled and opens another) but within the deadline. The answer on the replaced stream
/// still counts, so the lease is kept: never reported lost, and alive on the server.
/// (Before, the answer was dropped with the stream, and the refresh sent again on the new
/// stream came back after the deadline.)
#[tokio::test]
async fn a_slow_server_keeps_the_lease_though_the_stream_counts_as_stalled() {
    const TTL: i64 = 6;
    let etcd = etcd().await;
    let proxy = FaultProxy::start(etcd.client_addr(0)).await.unwrap();
    let c = client_at(proxy.endpoint()).await;
    let direct = client(&etcd).await;
    let kept = c.lease().grant(TTL).keep_alive().await.unwrap();
    // A first refresh acknowledged: the keeper's stream is open.
    let mut w = kept.watch();
    tokio::time::timeout(Duration::from_secs(TTL as u64), w.changed())
        .await
        .expect("a first refresh within the TTL")
        .unwrap();
    let streams = c.lease().keeper_streams_opened();
    // Every chunk now waits 1.1 s each way, until the stream has stalled once.
    proxy.delay(Duration::from_millis(1100));
    let not_lost = |what: &str| {
        assert_eq!(
            kept.lost_reason(),
            None,
            "lost under a slow server ({what}): {:?}",
            kept.status()
        );
    };
    let stalled_by = Instant::now() + Duration::from_secs(2 * TTL as u64);
    while c.lease().keeper_streams_opened() <= streams {
        not_lost("before the stall");
        assert!(
            Instant::now() < stalled_by,
            "the stream never counted as stalled: the test did not test the case"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Past the deadline the refresh sent before the stall had.
    let slow_until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < slow_until {
        not_lost("after the stall");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    proxy.delay(Duration::ZERO);
    let until = Instant::now() + Duration::from_secs(TTL as u64);
    while Instant::now() < until {
        not_lost("after the server sped up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ttl = direct.lease().time_to_live(kept.id()).await.unwrap();
    assert!(ttl.ttl > 0, "{ttl:?}");
}
