//! Election recipe against a real etcd.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{client, etcd, wait_until};
use etcdv3::testkit::FaultProxy;
use etcdv3::{Client, Election, ErrorKind, Session};

async fn candidates(c: &Client, prefix: &str) -> usize {
    c.kv()
        .get(prefix)
        .prefix()
        .count_only()
        .await
        .unwrap()
        .count as usize
}

async fn wait_candidates(c: &Client, prefix: &'static str, n: usize) {
    wait_until(Duration::from_secs(5), "candidates queued", || {
        let c = c.clone();
        async move { candidates(&c, prefix).await == n }
    })
    .await;
}

async fn next_value(o: &mut etcdv3::Observer) -> String {
    let kv = tokio::time::timeout(Duration::from_secs(10), o.next())
        .await
        .expect("observe produced a value")
        .expect("observe stream open")
        .unwrap();
    kv.value_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_campaigners_observe_sees_every_leader_in_order() {
    let etcd = etcd().await;
    let mut clients = Vec::new();
    let mut elections = Vec::new();
    for _ in 0..3 {
        let c = client(&etcd).await;
        let s = Session::new(&c).ttl(10).await.unwrap();
        elections.push(Arc::new(Election::new(&s, "/elect/three")));
        clients.push(c);
    }
    let watcher = client(&etcd).await;
    let observer_election = Election::new(
        &Session::new(&watcher).ttl(10).await.unwrap(),
        "/elect/three",
    );
    assert!(observer_election.leader().await.unwrap().is_none());
    // Observe before anybody campaigns: it waits for the first leader.
    let mut observer = observer_election.observe();

    elections[0].campaign("a").await.unwrap();
    assert!(elections[0].is_leader());
    let e1 = elections[1].clone();
    let b = tokio::spawn(async move { e1.campaign("b").await });
    wait_candidates(&watcher, "/elect/three/", 2).await;
    let e2 = elections[2].clone();
    let c = tokio::spawn(async move { e2.campaign("c").await });
    wait_candidates(&watcher, "/elect/three/", 3).await;
    assert!(!b.is_finished() && !c.is_finished());

    // A non-leader cannot proclaim.
    let err = elections[2].proclaim("x").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ElectionNotLeader);

    elections[0].proclaim("a2").await.unwrap();
    let leader = observer_election.leader().await.unwrap().unwrap();
    assert_eq!(leader.value_str().unwrap(), "a2");
    assert_eq!(leader.key(), elections[0].key());

    elections[0].resign().await.unwrap();
    assert!(!elections[0].is_leader());
    b.await.unwrap().unwrap();
    assert!(elections[1].is_leader());
    elections[1].resign().await.unwrap();
    c.await.unwrap().unwrap();
    elections[2].proclaim("c2").await.unwrap();

    let mut seen = Vec::new();
    for _ in 0..5 {
        seen.push(next_value(&mut observer).await);
    }
    assert_eq!(seen, ["a", "a2", "b", "c", "c2"]);
    // Resigning twice is a no-op; proclaim after resign is refused.
    elections[2].resign().await.unwrap();
    elections[2].resign().await.unwrap();
    let err = elections[2].proclaim("y").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ElectionNotLeader);
    assert!(observer_election.leader().await.unwrap().is_none());
}

#[tokio::test]
async fn killing_the_leader_session_elects_another() {
    let etcd = etcd().await;
    let lc = client(&etcd).await;
    let ls = Session::new(&lc).ttl(2).await.unwrap();
    let le = Election::new(&ls, "/elect/kill");
    le.campaign("old").await.unwrap();

    let fc = client(&etcd).await;
    let fs = Session::new(&fc).ttl(10).await.unwrap();
    let fe = Arc::new(Election::new(&fs, "/elect/kill"));
    let mut observer = fe.observe();
    assert_eq!(next_value(&mut observer).await, "old");
    let fe2 = fe.clone();
    let follower = tokio::spawn(async move { fe2.campaign("new").await });
    wait_candidates(&fc, "/elect/kill/", 2).await;

    // Kill the leader: its client and session vanish without resigning.
    let started = Instant::now();
    drop(le);
    drop(ls);
    drop(lc);
    tokio::time::timeout(Duration::from_secs(2 + 4), follower)
        .await
        .expect("a new leader within TTL + slack")
        .unwrap()
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(6));
    assert!(fe.is_leader());
    assert_eq!(next_value(&mut observer).await, "new");

    // Revoking the (new) leader's session: observe stays on it until the key is gone, and a
    // new campaigner takes over at once.
    let tc = client(&etcd).await;
    let ts = Session::new(&tc).ttl(10).await.unwrap();
    let te = Arc::new(Election::new(&ts, "/elect/kill"));
    let te2 = te.clone();
    let third = tokio::spawn(async move { te2.campaign("third").await });
    wait_candidates(&fc, "/elect/kill/", 2).await;
    fs.close().await.unwrap();
    assert!(!fe.is_leader());
    tokio::time::timeout(Duration::from_secs(5), third)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(next_value(&mut observer).await, "third");
}

#[tokio::test]
async fn failed_or_cancelled_campaign_leaves_no_key() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let s1 = Session::new(&c).ttl(10).await.unwrap();
    let e1 = Election::new(&s1, "/elect/cancel");
    e1.campaign("one").await.unwrap();
    let s2 = Session::new(&c).ttl(10).await.unwrap();
    let e2 = Arc::new(Election::new(&s2, "/elect/cancel"));
    // Cancelled campaign.
    let r = tokio::time::timeout(Duration::from_millis(300), e2.campaign("two")).await;
    assert!(r.is_err());
    wait_candidates(&c, "/elect/cancel/", 1).await;
    // A campaign whose session is revoked while waiting fails typed, and leaves nothing.
    let e2c = e2.clone();
    let waiting = tokio::spawn(async move { e2c.campaign("two").await });
    wait_candidates(&c, "/elect/cancel/", 2).await;
    s2.close().await.unwrap();
    let err = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::SessionExpired);
    wait_candidates(&c, "/elect/cancel/", 1).await;
    assert!(!e2.is_leader());
    assert!(e1.is_leader());
}

#[tokio::test]
async fn failed_resign_can_be_retried() {
    let etcd = etcd().await;
    let proxy = FaultProxy::start(etcd.client_addr(0)).await.unwrap();
    let lc = Client::builder([proxy.endpoint()])
        .request_timeout(Duration::from_secs(1))
        .connect()
        .await
        .unwrap();
    let ls = Session::new(&lc).ttl(30).await.unwrap();
    let le = Election::new(&ls, "/elect/resign");
    le.campaign("leader").await.unwrap();
    let other = client(&etcd).await;

    proxy.blackhole();
    let err = le.resign().await.unwrap_err();
    assert!(
        matches!(err.kind(), ErrorKind::Deadline | ErrorKind::Unavailable),
        "{err}"
    );
    // Still leader, and still knows its key.
    assert!(le.is_leader());
    assert_eq!(candidates(&other, "/elect/resign/").await, 1);

    proxy.pass();
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match le.resign().await {
                Ok(()) => break,
                Err(e) => assert!(e.is_retryable() || e.kind() == ErrorKind::Deadline, "{e}"),
            }
        }
    })
    .await
    .unwrap();
    assert!(!le.is_leader());
    assert_eq!(candidates(&other, "/elect/resign/").await, 0);
}

#[tokio::test]
async fn dropped_observer_and_campaign_leave_no_task() {
    let etcd = etcd().await;
    let metrics = tokio::runtime::Handle::current().metrics();
    let c = client(&etcd).await;
    let s1 = Session::new(&c).ttl(10).await.unwrap();
    let e1 = Election::new(&s1, "/elect/tasks");
    e1.campaign("one").await.unwrap();
    // Start the client's watch multiplexer (it lives with the client), then count.
    drop(c.watch("/elect/warmup").await.unwrap());
    let baseline = metrics.num_alive_tasks();
    let mut o = e1.observe();
    assert_eq!(next_value(&mut o).await, "one");
    drop(o);
    let s2 = Session::new(&c).ttl(10).await.unwrap();
    let e2 = Election::new(&s2, "/elect/tasks");
    assert!(
        tokio::time::timeout(Duration::from_millis(300), e2.campaign("two"))
            .await
            .is_err()
    );
    wait_candidates(&c, "/elect/tasks/", 1).await;
    let m = tokio::runtime::Handle::current().metrics();
    wait_until(Duration::from_secs(10), "recipe tasks to end", || {
        let n = m.num_alive_tasks();
        async move { n <= baseline }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_campaign_cancelled_at_any_moment_then_retried_leads_with_its_key() {
    // As for the mutex: a campaign cancelled around its round trip, then retried, leads with
    // a key that exists (its create revision is the one it reports), and resigning leaves
    // nothing behind.
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let s = Session::new(&c).ttl(30).await.unwrap();
    let e = Election::new(&s, "/race-el");
    for i in 0..60u64 {
        let cut = Duration::from_micros((i * 97) % 3000);
        let first = tokio::time::timeout(cut, e.campaign("v")).await;
        if !matches!(first, Ok(Ok(()))) {
            e.campaign("v").await.unwrap();
        }
        let held = c
            .kv()
            .txn()
            .when([e.is_leader_compare()])
            .and_then([etcdv3::Op::put("/race-el-owned", i.to_string())])
            .await
            .unwrap();
        assert!(held.succeeded, "round {i}: the leader key is gone");
        e.resign().await.unwrap();
        wait_until(Duration::from_secs(10), "no key left behind", || {
            let c = c.clone();
            async move { candidates(&c, "/race-el/").await == 0 }
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn observe_goes_on_when_the_leaderless_moment_was_compacted() {
    // The observer falls behind (its buffer full of proclamations); meanwhile the leader
    // resigns, nobody leads, and the history is compacted past the resignation. Once read
    // again, the observer must go on to the next leader rather than end with Compacted.
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let sa = Session::new(&c).ttl(30).await.unwrap();
    let sb = Session::new(&c).ttl(30).await.unwrap();
    let ea = Election::new(&sa, "/obs-cmp");
    let eb = Election::new(&sb, "/obs-cmp");
    ea.campaign("a0").await.unwrap();
    let mut o = ea.observe();
    assert_eq!(next_value(&mut o).await, "a0");
    // Once a proclamation has come through, the observer's watch is live (not catching
    // up, which a compaction would cancel).
    ea.proclaim("a1").await.unwrap();
    assert_eq!(next_value(&mut o).await, "a1");
    for i in 2..=30 {
        ea.proclaim(format!("a{i}")).await.unwrap();
    }
    ea.resign().await.unwrap();
    // Two more writes: the compaction passes the revision right after the resignation.
    c.kv().put("unrelated", "x").await.unwrap();
    let rev = c.kv().put("unrelated", "y").await.unwrap().header.revision;
    c.kv().compact(rev).await.unwrap();
    for i in 2..=30 {
        assert_eq!(next_value(&mut o).await, format!("a{i}"));
    }
    eb.campaign("b").await.unwrap();
    assert_eq!(next_value(&mut o).await, "b");
}

#[tokio::test]
async fn a_campaign_whose_enqueue_answer_was_lost_leaves_no_key() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let proxy = FaultProxy::start(etcd.client_addr(0)).await.unwrap();
    let pc = Client::builder([proxy.endpoint()])
        .request_timeout(Duration::from_secs(2))
        .connect()
        .await
        .unwrap();
    let s = Session::new(&pc).ttl(60).await.unwrap();
    let e = Election::new(&s, "/elect/lost");
    // The campaign's key is put, but the answer never comes back: the campaign fails, finds
    // out that it put the key, and deletes it (before, the key stayed: a leader that nobody
    // knew about, for as long as the session lived).
    proxy.cut_after_next_request();
    let err = e.campaign("v").await.unwrap_err();
    assert!(err.is_indeterminate(), "{err:?}");
    assert!(!e.is_leader());
    wait_candidates(&c, "/elect/lost/", 0).await;
    // A campaign afterwards wins with its own key.
    tokio::time::timeout(Duration::from_secs(5), e.campaign("w"))
        .await
        .unwrap()
        .unwrap();
    assert!(e.is_leader());
    let leader = Election::new(&Session::new(&c).ttl(60).await.unwrap(), "/elect/lost")
        .leader()
        .await
        .unwrap()
        .unwrap();
    assert_eq!(leader.value_str().unwrap(), "w");
}

/// The switches of a client layer: when armed, lets `skip` Txn attempts through, then fails
/// the next one with etcd's "request timed out" and disarms.
#[derive(Clone, Default)]
struct FailTxn {
    armed: Arc<std::sync::atomic::AtomicBool>,
    skip: Arc<std::sync::atomic::AtomicUsize>,
}

impl FailTxn {
    fn layer(&self) -> common::AttemptLayer {
        let f = self.clone();
        common::AttemptLayer::new(move |req, inner| {
            use std::sync::atomic::Ordering::SeqCst;
            use tower::Service;
            if req.method == "Txn" && f.armed.load(SeqCst) {
                if f.skip.load(SeqCst) > 0 {
                    f.skip.fetch_sub(1, SeqCst);
                } else {
                    f.armed.store(false, SeqCst);
                    return common::timed_out();
                }
            }
            Box::pin(inner.call(req))
        })
    }
}

#[tokio::test]
async fn a_leader_whose_new_campaign_fails_is_no_longer_leader() {
    use std::sync::atomic::Ordering::SeqCst;
    let etcd = etcd().await;
    let fail = FailTxn::default();
    let c = Client::builder(etcd.endpoints())
        .layer(fail.layer())
        .request_timeout(Duration::from_secs(5))
        .connect()
        .await
        .unwrap();
    let s = Session::new(&c).ttl(60).await.unwrap();
    let e = Election::new(&s, "/elect/again");
    e.campaign("a").await.unwrap();
    assert!(e.is_leader());
    // Campaigning again with another value re-proclaims it: the enqueue (a Txn) finds the
    // key, the proclamation (the next Txn) fails, and the campaign gives up its key, as Go's
    // resigns. Before, the election still called itself leader, with its key gone.
    fail.skip.store(1, SeqCst);
    fail.armed.store(true, SeqCst);
    let err = e.campaign("b").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err:?}");
    wait_candidates(&client(&etcd).await, "/elect/again/", 0).await;
    assert!(!e.is_leader(), "the leader key is gone: no longer leader");
    // And it can campaign again.
    e.campaign("c").await.unwrap();
    assert!(e.is_leader());
}

#[tokio::test]
async fn a_campaign_on_a_lease_revoked_elsewhere_fails_as_session_expired() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let other = client(&etcd).await;

    // A campaign on a lease revoked behind the session's back (TTL 60: the keeper's next
    // refresh is 20 s away, so only the refused enqueue can tell the session).
    let s = Session::new(&c).ttl(60).await.unwrap();
    other.lease().revoke(s.lease_id()).await.unwrap();
    let e = Election::new(&s, "/election/lease-gone");
    let err = e.campaign("one").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::SessionExpired, "{err}");
    assert!(!e.is_leader());
    let reason = tokio::time::timeout(Duration::from_secs(5), s.done())
        .await
        .expect("the session ended with the refused campaign");
    assert_eq!(reason, etcdv3::LeaseLost::Expired);
    assert_eq!(candidates(&c, "/election/lease-gone/").await, 0);

    // A leader whose lease is revoked that way lost its key with the lease: a proclamation
    // finds no key of its own (as in Go), and the election is no longer leader.
    let s = Session::new(&c).ttl(60).await.unwrap();
    let e = Election::new(&s, "/election/lease-gone");
    e.campaign("two").await.unwrap();
    assert!(e.is_leader());
    other.lease().revoke(s.lease_id()).await.unwrap();
    let err = e.proclaim("three").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ElectionNotLeader, "{err}");
    assert!(!e.is_leader());
}

#[tokio::test]
async fn an_observer_cut_off_while_leaderless_finds_the_leader_after_a_compaction() {
    // An observer waits for a leader (nobody campaigns); cut off meanwhile, it misses a
    // leader that comes and goes and the next one, and the history is compacted past where
    // it waits from: it must look for the leader again and report the current one, not end.
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let proxy = FaultProxy::start(etcd.client_addr(0)).await.unwrap();
    let oc = Client::builder([proxy.endpoint()])
        .request_timeout(Duration::from_secs(2))
        .connect_timeout(Duration::from_secs(1))
        .connect()
        .await
        .unwrap();
    let os = Session::new(&oc).ttl(60).await.unwrap();
    let mut observer = Election::new(&os, "/elect/compacted").observe();
    // Its read found no leader, and it is watching for one.
    wait_until(Duration::from_secs(5), "the observer watching", || {
        let n = oc.watch_stats().creates_sent;
        async move { n >= 1 }
    })
    .await;
    proxy.blackhole();
    proxy.cut_all().await;

    let s1 = Session::new(&c).ttl(60).await.unwrap();
    let first = Election::new(&s1, "/elect/compacted");
    first.campaign("gone").await.unwrap();
    first.resign().await.unwrap();
    let s2 = Session::new(&c).ttl(60).await.unwrap();
    let second = Election::new(&s2, "/elect/compacted");
    second.campaign("now").await.unwrap();
    let rev = c
        .kv()
        .put("/elect-other", "v")
        .await
        .unwrap()
        .header
        .revision;
    c.kv().compact(rev).await.unwrap();

    proxy.pass();
    assert_eq!(next_value(&mut observer).await, "now");
    // And it follows that leader on.
    second.proclaim("later").await.unwrap();
    assert_eq!(next_value(&mut observer).await, "later");

    // Cut off again while following that leader: it proclaims and resigns, a third one wins,
    // and the history is compacted past where the observer follows from.
    proxy.blackhole();
    proxy.cut_all().await;
    second.proclaim("missed").await.unwrap();
    second.resign().await.unwrap();
    let s3 = Session::new(&c).ttl(60).await.unwrap();
    let third = Election::new(&s3, "/elect/compacted");
    third.campaign("third").await.unwrap();
    let rev = c
        .kv()
        .put("/elect-other", "v")
        .await
        .unwrap()
        .header
        .revision;
    c.kv().compact(rev).await.unwrap();
    proxy.pass();
    assert_eq!(next_value(&mut observer).await, "third");
}
