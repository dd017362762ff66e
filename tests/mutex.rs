//! Session and Mutex recipes against a real etcd.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{client, etcd, wait_until};
use etcdv3::testkit::{EtcdCluster, FaultProxy};
use etcdv3::{Client, ErrorKind, LeaseLost, Mutex, Op, Session};

async fn keys_under(c: &Client, prefix: &str) -> Vec<String> {
    let r = c.kv().get(prefix).prefix().keys_only().await.unwrap();
    r.kvs
        .iter()
        .map(|kv| kv.key_str().unwrap().to_owned())
        .collect()
}

/// Waits (bounded by `timeout`) until exactly `n` keys are under `prefix`.
async fn wait_keys(c: &Client, prefix: &str, n: usize, timeout: Duration, what: &str) {
    wait_until(timeout, what, || {
        let c = c.clone();
        let prefix = prefix.to_owned();
        async move { keys_under(&c, &prefix).await.len() == n }
    })
    .await;
}

async fn wait_for_tasks(baseline: usize) {
    let m = tokio::runtime::Handle::current().metrics();
    wait_until(Duration::from_secs(10), "background tasks to end", || {
        let n = m.num_alive_tasks();
        async move { n <= baseline }
    })
    .await;
}

#[tokio::test]
async fn session_keeps_lease_orphan_and_close() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let s = Session::new(&c).ttl(3).await.unwrap();
    assert!(s.is_alive());
    let ttl = c.lease().time_to_live(s.lease_id()).await.unwrap();
    assert!(ttl.exists());
    // Kept alive past its TTL.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert!(c.lease().time_to_live(s.lease_id()).await.unwrap().exists());
    assert!(s.is_alive());

    // A session over the existing lease, then close: the lease is revoked.
    let lease = c.lease().grant(30).await.unwrap();
    let s2 = Session::new(&c).lease(lease.id).await.unwrap();
    assert_eq!(s2.lease_id(), lease.id);
    let clone = s2.clone();
    let done = clone.done();
    s2.close().await.unwrap();
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(2), done)
            .await
            .unwrap(),
        LeaseLost::Revoked
    );
    assert!(!c.lease().time_to_live(lease.id).await.unwrap().exists());
    // Closing twice is fine.
    clone.close().await.unwrap();

    // Orphan: the lease is no longer kept, but not revoked.
    let done = s.done();
    s.orphan();
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(2), done)
            .await
            .unwrap(),
        LeaseLost::Closed
    );
    assert!(!s.is_alive());
    assert!(c.lease().time_to_live(s.lease_id()).await.unwrap().exists());

    // A missing lease is a typed error.
    let err = Session::new(&c).lease(0x7777).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::LeaseNotFound);
}

/// 10 tasks over 5 clients increment one counter under the lock with guarded transactions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutex_counter_is_exact_and_fencing_increases() {
    let etcd = etcd().await;
    let clients: Vec<Client> = futures::future::join_all((0..5).map(|_| client(&etcd))).await;
    const PER_TASK: usize = 100;
    let fences = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for t in 0..10 {
        let c = clients[t % 5].clone();
        let fences = fences.clone();
        tasks.push(tokio::spawn(async move {
            let s = Session::new(&c).ttl(10).await.unwrap();
            let m = Mutex::new(&s, "/mutex/counter-lock");
            for _ in 0..PER_TASK {
                m.lock().await.unwrap();
                let fence = m.fencing_revision().unwrap();
                fences.lock().unwrap().push(fence);
                let cur = c.kv().get("/mutex/counter").await.unwrap();
                let n: u64 = cur
                    .kvs
                    .first()
                    .map(|kv| kv.value_str().unwrap().parse().unwrap())
                    .unwrap_or(0);
                let r = c
                    .kv()
                    .txn()
                    .when([m.is_owner()])
                    .and_then([Op::put("/mutex/counter", (n + 1).to_string())])
                    .await
                    .unwrap();
                assert!(r.succeeded, "guarded write failed while holding the lock");
                m.unlock().await.unwrap();
                assert_eq!(m.fencing_revision(), None);
            }
            s.close().await.unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let c = &clients[0];
    let r = c.kv().get("/mutex/counter").await.unwrap();
    assert_eq!(r.kvs[0].value_str().unwrap(), (10 * PER_TASK).to_string());
    let fences = fences.lock().unwrap().clone();
    assert_eq!(fences.len(), 10 * PER_TASK);
    assert!(
        fences.windows(2).all(|w| w[0] < w[1]),
        "fencing revisions must strictly increase from holder to holder"
    );
    assert!(keys_under(c, "/mutex/counter-lock/").await.is_empty());
}

#[tokio::test]
async fn next_waiter_gets_the_lock_when_the_holder_dies() {
    let etcd = etcd().await;
    let holder_client = client(&etcd).await;
    let waiter_client = client(&etcd).await;
    let hs = Session::new(&holder_client).ttl(2).await.unwrap();
    let hm = Mutex::new(&hs, "/mutex/dies");
    hm.lock().await.unwrap();
    let ws = Session::new(&waiter_client).ttl(10).await.unwrap();
    let wm = Arc::new(Mutex::new(&ws, "/mutex/dies"));
    let wm2 = wm.clone();
    let waiting = tokio::spawn(async move { wm2.lock().await });
    // The waiter is queued behind the holder.
    wait_until(Duration::from_secs(5), "waiter queued", || {
        let c = waiter_client.clone();
        async move { keys_under(&c, "/mutex/dies/").await.len() == 2 }
    })
    .await;
    assert!(!waiting.is_finished());
    // The holder "crashes": its client and session go away without unlock.
    let holder_fence = hm.fencing_revision().unwrap();
    let started = Instant::now();
    drop(hm);
    drop(hs);
    drop(holder_client);
    tokio::time::timeout(Duration::from_secs(2 + 4), waiting)
        .await
        .expect("the waiter got the lock within TTL + slack")
        .unwrap()
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(6));
    assert!(wm.fencing_revision().unwrap() > holder_fence);
    assert_eq!(
        keys_under(&waiter_client, "/mutex/dies/").await,
        vec![String::from_utf8(wm.key().to_vec()).unwrap()]
    );
}

#[tokio::test]
async fn try_lock_through_the_lease_of_a_waiting_lock_fails_at_once() {
    // A lock() through lease L waits behind another holder; a try_lock() on the same lock
    // through L (the same session, or another session on L) must not wait for it, and must
    // leave the waiting lock's key alone.
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let holder = Session::new(&c).ttl(30).await.unwrap();
    let hm = Mutex::new(&holder, "/mutex/trywait");
    hm.lock().await.unwrap();
    let s = Session::new(&c).ttl(30).await.unwrap();
    let wm = Arc::new(Mutex::new(&s, "/mutex/trywait"));
    let wm2 = wm.clone();
    let waiting = tokio::spawn(async move { wm2.lock().await });
    wait_keys(
        &c,
        "/mutex/trywait/",
        2,
        Duration::from_secs(5),
        "waiter queued",
    )
    .await;
    let same_lease = Session::new(&c).lease(s.lease_id()).await.unwrap();
    for session in [&s, &same_lease] {
        let m = Mutex::new(session, "/mutex/trywait");
        let r = tokio::time::timeout(Duration::from_secs(3), m.try_lock())
            .await
            .expect("try_lock answered without waiting");
        assert_eq!(r.unwrap_err().kind(), ErrorKind::Locked);
        assert_eq!(m.fencing_revision(), None);
    }
    // The waiter is still queued, and gets the lock when the holder lets go.
    assert_eq!(keys_under(&c, "/mutex/trywait/").await.len(), 2);
    assert!(!waiting.is_finished());
    hm.unlock().await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the waiter got the lock")
        .unwrap()
        .unwrap();
    assert!(wm.is_locked());
    assert_eq!(
        keys_under(&c, "/mutex/trywait/").await,
        vec![String::from_utf8(wm.key().to_vec()).unwrap()]
    );
}

#[tokio::test]
async fn try_lock_under_contention_returns_at_once_and_leaves_no_key() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let s1 = Session::new(&c).ttl(10).await.unwrap();
    let s2 = Session::new(&c).ttl(10).await.unwrap();
    let m1 = Mutex::new(&s1, "/mutex/try");
    let m2 = Mutex::new(&s2, "/mutex/try");
    m1.try_lock().await.unwrap();
    let started = Instant::now();
    let err = m2.try_lock().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Locked);
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(m2.fencing_revision(), None);
    assert_eq!(
        keys_under(&c, "/mutex/try/").await,
        vec![String::from_utf8(m1.key().to_vec()).unwrap()]
    );
    // Once released, try_lock succeeds.
    m1.unlock().await.unwrap();
    m2.try_lock().await.unwrap();
    assert!(m2.fencing_revision().is_some());
    m2.unlock().await.unwrap();
    assert!(keys_under(&c, "/mutex/try/").await.is_empty());
}

#[tokio::test]
async fn waiter_whose_session_is_revoked_stops_waiting() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let s1 = Session::new(&c).ttl(10).await.unwrap();
    let m1 = Mutex::new(&s1, "/mutex/revoked");
    m1.lock().await.unwrap();
    let s2 = Session::new(&c).ttl(10).await.unwrap();
    let m2 = Arc::new(Mutex::new(&s2, "/mutex/revoked"));
    let m2c = m2.clone();
    let waiting = tokio::spawn(async move { m2c.lock().await });
    wait_keys(
        &c,
        "/mutex/revoked/",
        2,
        Duration::from_secs(5),
        "waiter queued",
    )
    .await;
    // Revoke the waiter's lease behind the session's back (another client's revoke).
    let other = client(&etcd).await;
    other.lease().revoke(s2.lease_id()).await.unwrap();
    let err = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the waiter stopped waiting")
        .unwrap()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::SessionExpired);
    assert_eq!(m2.fencing_revision(), None);
    // The holder is unaffected.
    let r = c.kv().txn().when([m1.is_owner()]).await.unwrap();
    assert!(r.succeeded);

    // Same via close() of the session, which the keeper learns at once.
    let s3 = Session::new(&c).ttl(10).await.unwrap();
    let m3 = Arc::new(Mutex::new(&s3, "/mutex/revoked"));
    let m3c = m3.clone();
    let waiting = tokio::spawn(async move { m3c.lock().await });
    wait_keys(
        &c,
        "/mutex/revoked/",
        2,
        Duration::from_secs(5),
        "waiter queued",
    )
    .await;
    let started = Instant::now();
    s3.close().await.unwrap();
    let err = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::SessionExpired);
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn a_lock_on_a_lease_revoked_elsewhere_fails_as_session_expired() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    // TTL 60: the keeper would learn of the revoke only at its refresh, 20 s away.
    let s = Session::new(&c).ttl(60).await.unwrap();
    let other = client(&etcd).await;
    other.lease().revoke(s.lease_id()).await.unwrap();
    let m = Mutex::new(&s, "/mutex/lease-gone");
    let err = m.lock().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::SessionExpired, "{err}");
    assert_eq!(m.fencing_revision(), None);
    // The session learnt it too, from the refused enqueue.
    let reason = tokio::time::timeout(Duration::from_secs(5), s.done())
        .await
        .expect("the session ended with the refused enqueue");
    assert_eq!(reason, LeaseLost::Expired);
    assert!(!s.is_alive());
    assert!(keys_under(&c, "/mutex/lease-gone/").await.is_empty());
    // try_lock says the same.
    let err = m.try_lock().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::SessionExpired, "{err}");
}

#[tokio::test]
async fn cancelled_lock_leaves_no_key_and_no_task() {
    let etcd = etcd().await;
    let metrics = tokio::runtime::Handle::current().metrics();
    let c = client(&etcd).await;
    let s1 = Session::new(&c).ttl(10).await.unwrap();
    let m1 = Mutex::new(&s1, "/mutex/cancel");
    m1.lock().await.unwrap();
    let s2 = Session::new(&c).ttl(10).await.unwrap();
    let m2 = Mutex::new(&s2, "/mutex/cancel");
    // Start the client's watch multiplexer (it lives with the client), then count.
    drop(c.watch("/mutex/warmup").await.unwrap());
    let baseline = metrics.num_alive_tasks();
    for _ in 0..3 {
        let r = tokio::time::timeout(Duration::from_millis(300), m2.lock()).await;
        assert!(r.is_err(), "the lock is held elsewhere");
        wait_keys(
            &c,
            "/mutex/cancel/",
            1,
            Duration::from_secs(5),
            "cancelled waiter's key removed",
        )
        .await;
    }
    wait_for_tasks(baseline).await;
    assert_eq!(
        keys_under(&c, "/mutex/cancel/").await,
        vec![String::from_utf8(m1.key().to_vec()).unwrap()]
    );
    // And the next waiter still gets the lock once it is free.
    m1.unlock().await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), m2.lock())
        .await
        .unwrap()
        .unwrap();
}

/// The holder is cut off (fault proxy blackhole) past its TTL; another client takes the lock;
/// the old holder's guarded write fails and no update is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fencing_stops_a_paused_holder() {
    let cluster = EtcdCluster::builder()
        .members(3)
        .start_async()
        .await
        .unwrap();
    let proxy = FaultProxy::start(cluster.client_addr(0)).await.unwrap();
    let paused = Client::builder([proxy.endpoint()])
        .request_timeout(Duration::from_secs(2))
        .connect()
        .await
        .unwrap();
    let other = client(&cluster).await;
    paused.kv().put("/fence/counter", "0").await.unwrap();

    let ps = Session::new(&paused).ttl(2).await.unwrap();
    let pm = Mutex::new(&ps, "/fence/lock");
    pm.lock().await.unwrap();
    let old_fence = pm.fencing_revision().unwrap();
    // The holder reads the counter, then pauses before writing.
    let seen = paused.kv().get("/fence/counter").await.unwrap().kvs[0]
        .value_str()
        .unwrap()
        .to_owned();
    proxy.blackhole();

    let os = Session::new(&other).ttl(10).await.unwrap();
    let om = Mutex::new(&os, "/fence/lock");
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(10), om.lock())
        .await
        .expect("the other client got the lock after the holder's TTL")
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(2 + 5));
    let new_fence = om.fencing_revision().unwrap();
    assert!(new_fence > old_fence);
    let cur: u64 = other.kv().get("/fence/counter").await.unwrap().kvs[0]
        .value_str()
        .unwrap()
        .parse()
        .unwrap();
    let r = other
        .kv()
        .txn()
        .when([om.is_owner()])
        .and_then([Op::put("/fence/counter", (cur + 1).to_string())])
        .await
        .unwrap();
    assert!(r.succeeded);

    // The old holder wakes up and writes what it computed: refused by the fence.
    proxy.pass();
    let n: u64 = seen.parse().unwrap();
    let stale = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match paused
                .kv()
                .txn()
                .when([pm.is_owner()])
                .and_then([Op::put("/fence/counter", (n + 100).to_string())])
                .await
            {
                Ok(r) => break r,
                Err(e) => assert!(e.is_retryable() || e.kind() == ErrorKind::Deadline, "{e}"),
            }
        }
    })
    .await
    .unwrap();
    assert!(
        !stale.succeeded,
        "the paused holder's guarded write must fail"
    );
    assert!(!pm.is_locked(), "the paused holder's session is lost");
    let r = other.kv().get("/fence/counter").await.unwrap();
    assert_eq!(r.kvs[0].value_str().unwrap(), "1", "no update lost");
    om.unlock().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_cancelled_at_any_moment_then_retried_holds_its_key() {
    // Cancel `lock()` at moments around its round trip (before, during and after the
    // attempt's answer), then lock again with the same mutex: the retry must really hold
    // the lock (its key there, with the create revision it reports), and nothing is left
    // behind after unlocking. A cancelled attempt's cleanup must not delete the key the
    // retry adopted, nor may a won key be lost with an answer nobody took.
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let s = Session::new(&c).ttl(30).await.unwrap();
    let m = Mutex::new(&s, "/race");
    for i in 0..60u64 {
        let cut = Duration::from_micros((i * 97) % 3000);
        let first = tokio::time::timeout(cut, m.lock()).await;
        if !matches!(first, Ok(Ok(()))) {
            m.lock().await.unwrap();
        }
        let held = c
            .kv()
            .txn()
            .when([m.is_owner()])
            .and_then([Op::put("/race-owned", i.to_string())])
            .await
            .unwrap();
        assert!(held.succeeded, "round {i}: the lock key is gone");
        m.unlock().await.unwrap();
        wait_keys(
            &c,
            "/race/",
            0,
            Duration::from_secs(10),
            "no key left behind",
        )
        .await;
    }
}

#[tokio::test]
async fn a_lock_cancelled_through_one_session_then_taken_through_another_on_its_lease_holds() {
    // Two sessions on one lease (the second made with `NewSession::lease`) write the same
    // lock key: an attempt through the second must wait for the cleanup of an attempt
    // through the first that was cancelled, or it adopts a key about to be deleted.
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let first = Session::new(&c).ttl(30).await.unwrap();
    let second = Session::new(&c).lease(first.lease_id()).await.unwrap();
    let via_first = Mutex::new(&first, "/race2");
    let via_second = Mutex::new(&second, "/race2");
    assert_eq!(via_first.key(), via_second.key());
    for i in 0..60u64 {
        let cut = Duration::from_micros((i * 97) % 3000);
        let _ = tokio::time::timeout(cut, via_first.lock()).await;
        via_second.lock().await.unwrap();
        let held = c
            .kv()
            .txn()
            .when([via_second.is_owner()])
            .and_then([Op::put("/race2-owned", i.to_string())])
            .await
            .unwrap();
        assert!(held.succeeded, "round {i}: the lock key is gone");
        via_second.unlock().await.unwrap();
        via_first.unlock().await.unwrap();
        wait_keys(
            &c,
            "/race2/",
            0,
            Duration::from_secs(10),
            "no key left behind",
        )
        .await;
    }
}

/// The waiter's side of the next two tests: a client reaching the member only through a
/// fault proxy, with a short request timeout, and a session that outlives the faults.
async fn proxied_waiter(etcd: &EtcdCluster) -> (FaultProxy, Client, Session) {
    let proxy = FaultProxy::start(etcd.client_addr(0)).await.unwrap();
    let c = Client::builder([proxy.endpoint()])
        .request_timeout(Duration::from_secs(1))
        .connect_timeout(Duration::from_secs(1))
        .connect()
        .await
        .unwrap();
    let s = Session::new(&c).ttl(60).await.unwrap();
    (proxy, c, s)
}

#[tokio::test]
async fn a_lock_whose_enqueue_answer_was_lost_leaves_no_key() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let holder = Session::new(&c).ttl(60).await.unwrap();
    let held = Mutex::new(&holder, "/mutex/lost");
    held.lock().await.unwrap();
    let (proxy, _wc, ws) = proxied_waiter(&etcd).await;
    let waiter = Mutex::new(&ws, "/mutex/lost");
    // The enqueue reaches the server (the key is put) but its answer never comes back.
    proxy.cut_after_next_request();
    let e = waiter.lock().await.unwrap_err();
    assert!(e.is_indeterminate(), "{e:?}");
    // The attempt finds out that it put the key and deletes it (before, the key stayed in
    // the queue for as long as the session lived, holding up everyone behind it).
    wait_keys(
        &c,
        "/mutex/lost/",
        1,
        Duration::from_secs(10),
        "the lost enqueue's key removed",
    )
    .await;
    // So the next contender gets the lock as soon as the holder lets go.
    let third = Session::new(&c).ttl(60).await.unwrap();
    let next = Mutex::new(&third, "/mutex/lost");
    held.unlock().await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), next.lock())
        .await
        .expect("not held up by a stale key")
        .unwrap();
    // The waiter can still queue for the lock afterwards.
    let again = tokio::spawn(async move { waiter.lock().await });
    next.unlock().await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), again)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

/// A client layer that, once `armed`, runs the next `Txn` (the server applies it), then
/// calls `after` and fails the attempt as if its answer had been lost ("request timed out").
fn lose_txn_answer(
    armed: Arc<std::sync::atomic::AtomicBool>,
    after: impl Fn() + Send + Sync + 'static,
) -> common::AttemptLayer {
    let after = Arc::new(after);
    common::AttemptLayer::new(move |req, inner| {
        use tower::Service;
        let lose = req.method == "Txn" && armed.swap(false, std::sync::atomic::Ordering::SeqCst);
        let fut = inner.call(req);
        if !lose {
            return Box::pin(fut);
        }
        let after = after.clone();
        Box::pin(async move {
            fut.await?;
            after();
            common::timed_out().await
        })
    })
}

/// A client through `proxy` whose next `Txn` after arming loses its answer (see
/// [`lose_txn_answer`]), then `after` runs.
async fn losing_client(
    proxy: &FaultProxy,
    after: impl Fn() + Send + Sync + 'static,
) -> (Client, Arc<std::sync::atomic::AtomicBool>) {
    let armed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let c = Client::builder([proxy.endpoint()])
        .layer(lose_txn_answer(armed.clone(), after))
        .request_timeout(Duration::from_secs(1))
        .connect_timeout(Duration::from_secs(1))
        .connect()
        .await
        .unwrap();
    (c, armed)
}

#[tokio::test]
async fn a_lock_whose_enqueue_answer_was_lost_while_cut_off_leaves_no_key() {
    // The enqueue is applied, its answer lost, and the cluster stays out of reach for longer
    // than the request could still be applied: the attempt cannot watch for its put in time,
    // and must still find it (a read once reachable again) and delete it.
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let holder = Session::new(&c).ttl(60).await.unwrap();
    let held = Mutex::new(&holder, "/mutex/cutoff");
    held.lock().await.unwrap();
    let proxy = Arc::new(FaultProxy::start(etcd.client_addr(0)).await.unwrap());
    let p = proxy.clone();
    let (wc, armed) = losing_client(&proxy, move || p.blackhole()).await;
    let ws = Session::new(&wc).ttl(60).await.unwrap();
    let waiter = Mutex::new(&ws, "/mutex/cutoff");
    armed.store(true, std::sync::atomic::Ordering::SeqCst);
    let e = waiter.lock().await.unwrap_err();
    assert!(e.is_indeterminate(), "{e:?}");
    assert_eq!(
        keys_under(&c, "/mutex/cutoff/").await.len(),
        2,
        "the put was applied"
    );
    // Out of reach for 3 s: past the window in which the request could still be applied
    // (the request timeout, 1 s, plus 1 s).
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(keys_under(&c, "/mutex/cutoff/").await.len(), 2);
    proxy.pass();
    wait_keys(
        &c,
        "/mutex/cutoff/",
        1,
        Duration::from_secs(15),
        "the lost enqueue's key removed once reachable",
    )
    .await;
}

#[tokio::test]
async fn a_lock_whose_enqueue_answer_was_lost_on_a_compacted_history_leaves_no_key() {
    // The revisions the attempt would watch from (those after the newest it had seen) are
    // compacted away: it reads the key instead, then watches on from the read.
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let holder = Session::new(&c).ttl(60).await.unwrap();
    let held = Mutex::new(&holder, "/mutex/compacted");
    held.lock().await.unwrap();
    let proxy = FaultProxy::start(etcd.client_addr(0)).await.unwrap();
    let (wc, armed) = losing_client(&proxy, || {}).await;
    let ws = Session::new(&wc).ttl(60).await.unwrap();
    let waiter = Mutex::new(&ws, "/mutex/compacted");
    // Writes the waiter's client does not see, then a compaction of all of them.
    let mut last = 0;
    for i in 0..5 {
        last = c
            .kv()
            .put(format!("/other/{i}"), "v")
            .await
            .unwrap()
            .header
            .revision;
    }
    c.kv().compact(last).await.unwrap();
    armed.store(true, std::sync::atomic::Ordering::SeqCst);
    let e = waiter.lock().await.unwrap_err();
    assert!(e.is_indeterminate(), "{e:?}");
    wait_keys(
        &c,
        "/mutex/compacted/",
        1,
        Duration::from_secs(10),
        "the lost enqueue's key removed",
    )
    .await;
}

#[tokio::test]
async fn a_cancelled_waiter_whose_cleanup_fails_once_still_leaves_no_key() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let holder = Session::new(&c).ttl(60).await.unwrap();
    let held = Mutex::new(&holder, "/mutex/retry");
    held.lock().await.unwrap();
    let (proxy, _wc, ws) = proxied_waiter(&etcd).await;
    let waiter = Mutex::new(&ws, "/mutex/retry");
    let r = tokio::time::timeout(Duration::from_millis(500), async {
        let lock = waiter.lock();
        tokio::pin!(lock);
        // Queued: then cut off, and given up while cut off, so the first delete of its key
        // times out.
        tokio::select! {
            r = &mut lock => panic!("the lock is held elsewhere: {r:?}"),
            () = wait_until(Duration::from_secs(5), "the waiter queued", || {
                let c = c.clone();
                async move { keys_under(&c, "/mutex/retry/").await.len() == 2 }
            }) => {}
        }
        proxy.blackhole();
        std::future::pending::<()>().await
    })
    .await;
    assert!(r.is_err());
    // Longer than the request timeout: the first delete has failed.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(keys_under(&c, "/mutex/retry/").await.len(), 2);
    // Dropped with the connection, the held delete never reaches the server.
    proxy.cut_all().await;
    proxy.pass();
    wait_keys(
        &c,
        "/mutex/retry/",
        1,
        Duration::from_secs(10),
        "the given-up waiter's key removed",
    )
    .await;
}
