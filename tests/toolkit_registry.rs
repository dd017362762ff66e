//! The toolkit's service registry and discovery against a real etcd: registration on kept
//! leases, re-registration, deregistration, watch events (also across a member restart),
//! the live cache, validation.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::time::{Duration, Instant};

use common::{client, etcd, wait_until};
use etcdv3::Client;
use etcdv3::testkit::EtcdCluster;
use etcdv3::toolkit::{
    RegistrationEvent, ServiceEvent, ServiceInfo, ServiceWatch, Toolkit, ToolkitError,
};

async fn next_event(w: &mut ServiceWatch, within: Duration) -> ServiceEvent {
    tokio::time::timeout(within, w.next())
        .await
        .expect("a service event in time")
        .expect("the watch goes on")
        .expect("no watch error")
}

fn info(i: usize) -> ServiceInfo {
    ServiceInfo::new(
        "api",
        format!("api-{i:02}"),
        format!("127.0.0.1:{}", 9000 + i),
    )
    .metadata("version", "1")
}

#[tokio::test]
async fn twenty_instances_and_every_kind_of_change_reach_a_watcher() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let tk = c.toolkit().prefix("/reg");
    // The instance whose client will be dropped has a client of its own.
    let doomed_client = client(&etcd).await;
    let doomed_tk = doomed_client.toolkit().prefix("/reg");

    // 5 instances before the watch starts (its snapshot), 15 after.
    let mut regs = Vec::new();
    for i in 0..5 {
        regs.push(tk.register(info(i)).await.unwrap());
    }
    let mut w = tk.watch_service("api").await.unwrap();
    for i in 5..19 {
        regs.push(tk.register(info(i)).await.unwrap());
    }
    let doomed = doomed_tk
        .register(info(19))
        .ttl(Duration::from_secs(2))
        .await
        .unwrap();
    let doomed_lease = doomed.lease_id();

    let mut added = BTreeSet::new();
    for _ in 0..20 {
        match next_event(&mut w, Duration::from_secs(10)).await {
            ServiceEvent::Added(i) => assert!(added.insert(i.id.clone()), "twice: {i:?}"),
            other => panic!("expected Added, got {other:?}"),
        }
    }
    assert_eq!(added.len(), 20);
    assert_eq!(tk.discover("api").await.unwrap().len(), 20);
    // The stored record is the info as JSON, on the registration's lease.
    let raw = c.kv().get("/reg/services/api/api-03").await.unwrap();
    let stored: serde_json::Value = serde_json::from_slice(raw.kvs[0].value()).unwrap();
    assert_eq!(stored["address"], "127.0.0.1:9003");
    assert_eq!(raw.kvs[0].lease(), regs[3].lease_id());

    let cache = tk.service_cache("api").await.unwrap();
    assert_eq!(cache.len(), 20);

    // Deregister: Removed at once; a second call returns the first result.
    regs[0].deregister().await.unwrap();
    regs[0].deregister().await.unwrap();
    match next_event(&mut w, Duration::from_secs(5)).await {
        ServiceEvent::Removed(i) => assert_eq!(i.id, "api-00"),
        other => panic!("expected Removed, got {other:?}"),
    }

    // Metadata update: Modified.
    let md = BTreeMap::from([("version".to_string(), "2".to_string())]);
    regs[1].update_metadata(md.clone()).await.unwrap();
    assert_eq!(regs[1].info().metadata, md);
    match next_event(&mut w, Duration::from_secs(5)).await {
        ServiceEvent::Modified(i) => {
            assert_eq!(i.id, "api-01");
            assert_eq!(i.metadata, md);
        }
        other => panic!("expected Modified, got {other:?}"),
    }

    // The doomed instance's process "dies": registration and client dropped, no revoke. Its
    // record goes when the 2 s lease expires.
    let dropped_at = Instant::now();
    drop(doomed);
    drop(doomed_tk);
    drop(doomed_client);
    match next_event(&mut w, Duration::from_secs(10)).await {
        ServiceEvent::Removed(i) => assert_eq!(i.id, "api-19"),
        other => panic!("expected Removed, got {other:?}"),
    }
    let waited = dropped_at.elapsed();
    assert!(
        waited >= Duration::from_millis(500),
        "removed after {waited:?}: the lease must expire, not be revoked"
    );
    let ttl = c.lease().time_to_live(doomed_lease).await.unwrap();
    assert!(!ttl.exists());

    // The cache followed.
    wait_until(Duration::from_secs(5), "the cache to hold 18", || {
        let n = cache.len();
        async move { n == 18 }
    })
    .await;
    assert_eq!(cache.get("api-01").unwrap().metadata, md);
    assert!(cache.get("api-00").is_none());
    let ids: Vec<_> = tk
        .discover("api")
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.id)
        .collect();
    assert_eq!(ids.len(), 18);
    assert_eq!(
        ids,
        cache
            .instances()
            .into_iter()
            .map(|i| i.id)
            .collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn reregisters_with_a_new_lease_after_the_lease_is_lost() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let other = client(&etcd).await;
    let tk = c.toolkit();
    let reg = tk
        .register(ServiceInfo::new("db", "db-1", "127.0.0.1:5432"))
        .ttl(Duration::from_secs(5))
        .await
        .unwrap();
    let mut events = reg.events();
    let first = reg.lease_id();
    assert_eq!(
        events.next().await,
        Some(RegistrationEvent::Registered { lease_id: first })
    );

    // Another client revokes the lease: the record goes, the registration notices and
    // registers again on a new lease.
    other.lease().revoke(first).await.unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(10), events.next())
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(ev, RegistrationEvent::Lost { lease_id, .. } if lease_id == first),
        "{ev:?}"
    );
    let ev = tokio::time::timeout(Duration::from_secs(10), events.next())
        .await
        .unwrap()
        .unwrap();
    let RegistrationEvent::Reregistered { lease_id: second } = ev else {
        panic!("expected Reregistered, got {ev:?}");
    };
    assert_ne!(second, first);
    assert_eq!(reg.lease_id(), second);
    let raw = other.kv().get("/etcdv3/services/db/db-1").await.unwrap();
    assert_eq!(raw.kvs.len(), 1);
    assert_eq!(raw.kvs[0].lease(), second);

    // Deregister revokes the current lease; the events stream ends with the task.
    reg.deregister().await.unwrap();
    assert!(!other.lease().time_to_live(second).await.unwrap().exists());
    assert!(tk.discover("db").await.unwrap().is_empty());
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(5), events.next())
            .await
            .unwrap(),
        None
    );
    // Idempotent after the task ended too.
    reg.deregister().await.unwrap();
}

#[tokio::test]
async fn killing_and_restarting_the_watchers_member_loses_no_event() {
    let cluster = EtcdCluster::builder()
        .members(3)
        .start_async()
        .await
        .unwrap();
    // The watcher's client knows only one follower; the writer only the other two members.
    // (Killing a follower keeps the writes going: killing the leader would fail writes for
    // the election's duration, which is not what this test is about.)
    let leader = cluster.leader_async(Duration::from_secs(10)).await.unwrap();
    let victim = (leader + 1) % 3;
    let others: Vec<String> = (0..3)
        .filter(|&i| i != victim)
        .map(|i| cluster.endpoint(i))
        .collect();
    let watcher_client = Client::builder([cluster.endpoint(victim)])
        .request_timeout(Duration::from_secs(10))
        .connect()
        .await
        .unwrap();
    let writer = Client::builder(others)
        .request_timeout(Duration::from_secs(10))
        .connect()
        .await
        .unwrap();
    let wtk = Toolkit::new(watcher_client.clone());
    let tk = Toolkit::new(writer.clone());

    let mut regs = Vec::new();
    for i in 0..5 {
        regs.push(tk.register(info(i)).await.unwrap());
    }
    let mut w = wtk.watch_service("api").await.unwrap();
    for _ in 0..5 {
        assert!(matches!(
            next_event(&mut w, Duration::from_secs(5)).await,
            ServiceEvent::Added(_)
        ));
    }

    cluster.kill(victim).unwrap();
    // Changes while the watcher's member is down.
    for i in 5..10 {
        regs.push(tk.register(info(i)).await.unwrap());
    }
    regs[0].deregister().await.unwrap();
    regs[1].deregister().await.unwrap();
    regs[2]
        .update_metadata(BTreeMap::from([("version".into(), "9".into())]))
        .await
        .unwrap();
    cluster.restart_async(victim).await.unwrap();

    let mut got = Vec::new();
    for _ in 0..8 {
        got.push(next_event(&mut w, Duration::from_secs(30)).await);
    }
    let want: Vec<ServiceEvent> = (5..10)
        .map(|i| ServiceEvent::Added(info(i)))
        .chain([
            ServiceEvent::Removed(info(0)),
            ServiceEvent::Removed(info(1)),
            ServiceEvent::Modified(info(2).metadata("version", "9")),
        ])
        .collect();
    assert_eq!(got, want);
    // And it keeps going after the restart.
    regs[3].deregister().await.unwrap();
    assert_eq!(
        next_event(&mut w, Duration::from_secs(10)).await,
        ServiceEvent::Removed(info(3))
    );
    assert_eq!(w.instances().len(), 7);
}

#[tokio::test]
async fn validation_gives_typed_errors() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let tk = c.toolkit();
    assert!(tk.validate().is_ok());
    assert_eq!(tk.key_prefix(), "/etcdv3");
    for bad in ["", "relative", "/"] {
        assert!(
            matches!(
                c.toolkit().prefix(bad).validate(),
                Err(ToolkitError::InvalidPrefix { .. })
            ),
            "{bad:?}"
        );
    }
    assert!(matches!(
        ServiceInfo::new("", "i", "a").validate(),
        Err(ToolkitError::EmptyName)
    ));
    assert!(matches!(
        ServiceInfo::new("n", "", "a").validate(),
        Err(ToolkitError::EmptyId)
    ));
    assert!(matches!(
        ServiceInfo::new("n", "i", "").validate(),
        Err(ToolkitError::EmptyAddress)
    ));
    assert!(matches!(
        ServiceInfo::new("n", "a/b", "x").validate(),
        Err(ToolkitError::InvalidName { .. })
    ));
    assert!(matches!(
        tk.register(ServiceInfo::new("n", "", "a")).await,
        Err(ToolkitError::EmptyId)
    ));
    assert!(matches!(
        tk.register(ServiceInfo::new("n", "i", "a"))
            .ttl(Duration::from_millis(999))
            .await,
        Err(ToolkitError::InvalidTtl { .. })
    ));
    assert!(matches!(
        c.toolkit()
            .prefix("x")
            .register(ServiceInfo::new("n", "i", "a"))
            .await,
        Err(ToolkitError::InvalidPrefix { .. })
    ));
    // Nothing was written.
    assert_eq!(c.kv().get_all().count_only().await.unwrap().count, 0);
    // A TTL of 1.2 s is rounded up to 2 s.
    let reg = tk
        .register(ServiceInfo::new("n", "i", "a"))
        .ttl(Duration::from_millis(1200))
        .await
        .unwrap();
    let ttl = c.lease().time_to_live(reg.lease_id()).await.unwrap();
    assert_eq!(ttl.granted_ttl, 2);
    reg.deregister().await.unwrap();
}

#[tokio::test]
async fn background_tasks_end_with_their_handles() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let tk = c.toolkit();
    // Warm up the client's shared workers (lease keeper, watch multiplexer).
    let warm = tk
        .register(ServiceInfo::new("warm", "w", "a"))
        .await
        .unwrap();
    let warm_watch = tk.watch_service("warm").await.unwrap();
    let m = tokio::runtime::Handle::current().metrics();
    let baseline = m.num_alive_tasks();

    let reg = tk
        .register(ServiceInfo::new("t", "t-1", "a"))
        .await
        .unwrap();
    let cache = tk.service_cache("t").await.unwrap();
    let cache2 = cache.clone();
    assert_eq!(cache.len(), 1);
    assert_eq!(m.num_alive_tasks(), baseline + 2);
    drop(reg);
    drop(cache);
    wait_until(
        Duration::from_secs(5),
        "the registration task to end",
        || {
            let n = m.num_alive_tasks();
            async move { n == baseline + 1 }
        },
    )
    .await;
    drop(cache2);
    wait_until(Duration::from_secs(5), "the cache task to end", || {
        let n = m.num_alive_tasks();
        async move { n == baseline }
    })
    .await;
    drop(warm_watch);
    drop(warm);
}

#[tokio::test]
async fn a_compacted_resume_point_is_read_again_and_the_difference_reported() {
    // The watcher's connection is down while the service changes and the history is
    // compacted past its resume point. The stream reads the instances again and yields the
    // difference; the live cache follows; both go on afterwards.
    let etcd = etcd().await;
    let (proxy, watcher_client) = common::proxied_client(&etcd).await;
    let writer = client(&etcd).await;
    let wtk = Toolkit::new(watcher_client.clone());
    let tk = Toolkit::new(writer.clone());
    let mut regs = Vec::new();
    for i in 0..3 {
        regs.push(tk.register(info(i)).await.unwrap());
    }
    let mut w = wtk.watch_service("api").await.unwrap();
    for _ in 0..3 {
        assert!(matches!(
            next_event(&mut w, Duration::from_secs(5)).await,
            ServiceEvent::Added(_)
        ));
    }
    let cache = wtk.service_cache("api").await.unwrap();
    assert_eq!(cache.len(), 3);

    proxy.blackhole();
    proxy.cut_all().await;
    regs.push(tk.register(info(3)).await.unwrap());
    regs[0].deregister().await.unwrap();
    regs[1]
        .update_metadata(BTreeMap::from([("version".into(), "2".into())]))
        .await
        .unwrap();
    let last = writer
        .kv()
        .put("unrelated", "x")
        .await
        .unwrap()
        .header
        .revision;
    writer.kv().compact(last).await.unwrap();
    proxy.pass();

    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(next_event(&mut w, Duration::from_secs(20)).await);
    }
    assert_eq!(
        got,
        [
            ServiceEvent::Removed(info(0)),
            ServiceEvent::Modified(info(1).metadata("version", "2")),
            ServiceEvent::Added(info(3)),
        ]
    );
    assert!(w.revision() >= last);
    let ids = |c: &etcdv3::toolkit::ServiceCache| {
        c.instances()
            .into_iter()
            .map(|i| i.id)
            .collect::<BTreeSet<_>>()
    };
    let want: BTreeSet<String> = ["api-01", "api-02", "api-03"].map(String::from).into();
    wait_until(Duration::from_secs(20), "the cache to follow", || {
        let ok = ids(&cache) == want && cache.error().is_none();
        async move { ok }
    })
    .await;

    // Both go on.
    regs[2].deregister().await.unwrap();
    assert_eq!(
        next_event(&mut w, Duration::from_secs(10)).await,
        ServiceEvent::Removed(info(2))
    );
    wait_until(Duration::from_secs(10), "the cache to drop api-02", || {
        let ok = cache.get("api-02").is_none() && cache.len() == 2;
        async move { ok }
    })
    .await;
}

#[tokio::test]
async fn a_deregister_that_timed_out_is_answered_to_the_next_call() {
    // The first call gives up while its revoke hangs (the connection held); the revoke goes
    // through once the connection is back, and the next call gets that outcome (before,
    // it asked a task that had already ended, and failed with Closed).
    let etcd = etcd().await;
    let (proxy, c) = common::proxied_client(&etcd).await;
    let observer = Toolkit::new(client(&etcd).await);
    let reg = Toolkit::new(c).register(info(7)).await.unwrap();
    assert_eq!(observer.discover("api").await.unwrap().len(), 1);
    proxy.blackhole();
    let first = tokio::time::timeout(Duration::from_millis(300), reg.deregister()).await;
    assert!(first.is_err(), "the first call gave up");
    proxy.pass();
    tokio::time::timeout(Duration::from_secs(10), reg.deregister())
        .await
        .expect("answered")
        .unwrap();
    assert!(observer.discover("api").await.unwrap().is_empty());
}

#[tokio::test]
async fn an_events_stream_joining_while_the_lease_is_replaced_starts_with_the_loss() {
    let etcd = etcd().await;
    let (proxy, c) = common::proxied_client(&etcd).await;
    let reg = Toolkit::new(c)
        .register(info(8))
        .ttl(Duration::from_secs(2))
        .await
        .unwrap();
    let first = reg.lease_id();
    let mut before = reg.events();
    assert_eq!(
        before.next().await,
        Some(RegistrationEvent::Registered { lease_id: first })
    );
    // Cut off, the lease is lost by its TTL and cannot be replaced.
    proxy.blackhole();
    let ev = tokio::time::timeout(Duration::from_secs(10), before.next())
        .await
        .expect("the loss reported")
        .unwrap();
    assert!(
        matches!(ev, RegistrationEvent::Lost { lease_id, .. } if lease_id == first),
        "{ev:?}"
    );
    // A stream joining now starts with the loss, not with the lost lease as if it were
    // current (it did before).
    let mut during = reg.events();
    let ev = during.next().await.unwrap();
    assert!(
        matches!(ev, RegistrationEvent::Lost { lease_id, .. } if lease_id == first),
        "{ev:?}"
    );
    proxy.pass();
    let mut seconds = Vec::new();
    for s in [&mut before, &mut during] {
        loop {
            let ev = tokio::time::timeout(Duration::from_secs(30), s.next())
                .await
                .expect("registered again")
                .unwrap();
            match ev {
                RegistrationEvent::RetryFailed { .. } => {}
                RegistrationEvent::Reregistered { lease_id } => {
                    seconds.push(lease_id);
                    break;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    assert_eq!(seconds[0], seconds[1]);
    assert_ne!(seconds[0], first);
    // Once registered again, a new stream starts with the new lease.
    let mut after = reg.events();
    assert_eq!(
        after.next().await,
        Some(RegistrationEvent::Registered {
            lease_id: seconds[0]
        })
    );
}

/// The switches of the layer of the test below: while `lose_put` is armed, the next `Put`
/// goes through and its answer is lost (an indeterminate failure); while `refuse_revokes` is
/// set, every `LeaseRevoke` fails without being sent, counted in `refused`.
#[derive(Clone, Default)]
struct LosePutRefuseRevoke {
    lose_put: Arc<AtomicBool>,
    refuse_revokes: Arc<AtomicBool>,
    refused: Arc<AtomicU64>,
}

impl LosePutRefuseRevoke {
    fn layer(&self) -> common::AttemptLayer {
        let l = self.clone();
        common::AttemptLayer::new(move |req, inner| {
            use tower::Service;
            if req.method == "LeaseRevoke" && l.refuse_revokes.load(SeqCst) {
                l.refused.fetch_add(1, SeqCst);
                return Box::pin(async {
                    Err(etcdv3::Error::from(tonic::Status::unavailable(
                        "test: revoke refused before sending",
                    )))
                });
            }
            let lose = req.method == "Put" && l.lose_put.swap(false, SeqCst);
            let fut = inner.call(req);
            if !lose {
                return Box::pin(fut);
            }
            Box::pin(async move {
                fut.await?;
                common::timed_out().await
            })
        })
    }
}

#[tokio::test]
async fn a_register_whose_put_answer_was_lost_revokes_its_lease_before_failing() {
    // The put may still be applied later (here it was applied, its answer lost), over a newer
    // registration of the same instance, with a lease nobody refreshes: the record would
    // vanish when that lease expires. The register revokes the lease first, retried while
    // the revoke fails, so that etcd refuses such a put from then on (and deletes one that
    // landed) before the caller can register again.
    let etcd = etcd().await;
    let observer = client(&etcd).await;
    let layer = LosePutRefuseRevoke::default();
    let c = Client::builder(etcd.endpoints())
        .layer(layer.layer())
        .request_timeout(Duration::from_secs(1))
        .connect()
        .await
        .unwrap();
    let tk = Toolkit::new(c);
    let key = tk.service_key("api", "api-03").unwrap();
    layer.lose_put.store(true, SeqCst);
    layer.refuse_revokes.store(true, SeqCst);
    let mut first = tokio::spawn({
        let tk = tk.clone();
        async move { tk.register(info(3)).await }
    });
    let refused = layer.refused.clone();
    wait_until(Duration::from_secs(10), "a revoke refused", || {
        let refused = refused.clone();
        async move { refused.load(SeqCst) >= 1 }
    })
    .await;
    // The put landed, on the attempt's lease.
    let landed = observer.kv().get(key.clone()).await.unwrap();
    let lease = landed
        .kvs
        .first()
        .expect("the lost put was applied")
        .lease();
    assert_ne!(lease, 0);
    // While its lease cannot be revoked, the register does not give up (one revoke alone
    // fails within the 1 s request timeout).
    assert!(
        tokio::time::timeout(Duration::from_secs(3), &mut first)
            .await
            .is_err(),
        "the register returned while its lease could not be revoked"
    );
    assert!(layer.refused.load(SeqCst) >= 2, "the revoke is retried");
    layer.refuse_revokes.store(false, SeqCst);
    let e = tokio::time::timeout(Duration::from_secs(10), first)
        .await
        .expect("the register ends once the revoke goes through")
        .unwrap()
        .unwrap_err();
    assert!(
        matches!(&e, ToolkitError::Etcd(e) if e.is_indeterminate()),
        "{e:?}"
    );
    // The lease is gone, and the record with it.
    let leases = observer.lease().leases().await.unwrap();
    assert!(
        !leases.leases.contains(&lease),
        "the attempt's lease was revoked"
    );
    assert!(observer.kv().get(key.clone()).await.unwrap().kvs.is_empty());
    // The next register stores the record on its own lease.
    let reg = tk.register(info(3)).await.unwrap();
    let now = observer.kv().get(key.clone()).await.unwrap();
    assert_eq!(now.kvs.first().map(|kv| kv.lease()), Some(reg.lease_id()));
}

/// Where the outcome of a held-back write goes.
type Outcome = tokio::sync::oneshot::Sender<Result<(), etcdv3::Error>>;

/// The switches of the layer of the test below: while `armed`, the next `Put` or `Txn` is
/// held back (not sent) and answered at once with an indeterminate failure; it is sent once
/// `release` is notified, and its outcome goes to `done`: a write that reaches etcd late.
#[derive(Clone, Default)]
struct HoldWrite {
    armed: Arc<AtomicBool>,
    release: Arc<tokio::sync::Notify>,
    done: Arc<std::sync::Mutex<Option<Outcome>>>,
}

impl HoldWrite {
    fn layer(&self) -> common::AttemptLayer {
        let l = self.clone();
        common::AttemptLayer::new(move |req, inner| {
            use tower::Service;
            let write = req.method == "Put" || req.method == "Txn";
            let hold = write && l.armed.swap(false, SeqCst);
            let fut = inner.call(req);
            if !hold {
                return Box::pin(fut);
            }
            let (release, done) = (l.release.clone(), l.done.clone());
            tokio::spawn(async move {
                release.notified().await;
                let r = fut.await;
                if let Some(tx) = done.lock().unwrap().take() {
                    let _ = tx.send(r);
                }
            });
            common::timed_out()
        })
    }
}

#[tokio::test]
async fn an_update_that_lands_late_does_not_undo_a_newer_update() {
    // An update whose answer was lost may reach etcd after the next update (here: held back,
    // then sent); the record must keep the newer metadata.
    let etcd = etcd().await;
    let layer = HoldWrite::default();
    let c = Client::builder(etcd.endpoints())
        .layer(layer.layer())
        .request_timeout(Duration::from_secs(10))
        .connect()
        .await
        .unwrap();
    let tk = Toolkit::new(c);
    let observer = Toolkit::new(client(&etcd).await);
    let reg = tk.register(info(4)).await.unwrap();
    let version = |v: &str| BTreeMap::from([("version".to_owned(), v.to_owned())]);
    let (tx, late) = tokio::sync::oneshot::channel();
    *layer.done.lock().unwrap() = Some(tx);
    layer.armed.store(true, SeqCst);
    let e = reg.update_metadata(version("2")).await.unwrap_err();
    assert!(
        matches!(&e, ToolkitError::Etcd(e) if e.is_indeterminate()),
        "{e:?}"
    );
    reg.update_metadata(version("3")).await.unwrap();
    layer.release.notify_one();
    tokio::time::timeout(Duration::from_secs(10), late)
        .await
        .expect("the held-back write was sent")
        .unwrap()
        .expect("etcd answered the held-back write");
    let now = observer.discover("api").await.unwrap();
    assert_eq!(now.len(), 1);
    assert_eq!(
        now[0].metadata.get("version").map(String::as_str),
        Some("3"),
        "the late update put its older metadata back"
    );
    // The registration goes on: a further update is stored.
    reg.update_metadata(version("4")).await.unwrap();
    let now = observer.discover("api").await.unwrap();
    assert_eq!(
        now[0].metadata.get("version").map(String::as_str),
        Some("4")
    );
}

#[tokio::test]
async fn a_record_overwritten_with_a_bad_value_is_removed_from_watches_and_caches() {
    // A read of the instances skips a record that is not a valid `ServiceInfo`; a watch and
    // a cache must say the same (before, they kept offering the old record).
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let tk = Toolkit::new(c.clone());
    let _reg = tk.register(info(1)).await.unwrap();
    let mut w = tk.watch_service("api").await.unwrap();
    assert!(matches!(
        next_event(&mut w, Duration::from_secs(10)).await,
        ServiceEvent::Added(i) if i.id == "api-01"
    ));
    let cache = tk.service_cache("api").await.unwrap();
    assert!(cache.get("api-01").is_some());
    let key = tk.service_key("api", "api-01").unwrap();
    c.kv().put(key, "garbage").await.unwrap();
    match next_event(&mut w, Duration::from_secs(10)).await {
        ServiceEvent::Removed(i) => assert_eq!(i.id, "api-01"),
        other => panic!("expected Removed, got {other:?}"),
    }
    assert!(w.instances().is_empty());
    wait_until(Duration::from_secs(10), "the cache to drop api-01", || {
        let gone = cache.get("api-01").is_none();
        async move { gone }
    })
    .await;
    assert!(tk.discover("api").await.unwrap().is_empty());
}

#[tokio::test]
async fn a_watch_catching_up_claims_no_revision_ahead_of_its_instances() {
    // 1,500 records written while nobody reads the watch: its buffer fills, it is paused and
    // re-created behind, and etcd catches it up with responses of up to 1,000 revisions
    // whose header already names the newest revision. The watch's revision must not run
    // ahead of the instances it has applied.
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let tk = Toolkit::new(c.clone());
    let mut w = tk.watch_service("bulk").await.unwrap();
    let ids: Vec<usize> = (0..1500).collect();
    let mut last = 0;
    for chunk in ids.chunks(100) {
        let mut puts = tokio::task::JoinSet::new();
        for i in chunk {
            let info = ServiceInfo::new("bulk", format!("b{i:04}"), "127.0.0.1:1");
            let key = tk.service_key("bulk", &info.id).unwrap();
            let kv = c.kv();
            puts.spawn(async move {
                kv.put(key, serde_json::to_string(&info).unwrap())
                    .await
                    .unwrap()
                    .header
                    .revision
            });
        }
        while let Some(rev) = puts.join_next().await {
            last = last.max(rev.unwrap());
        }
    }
    for n in 1..=1500 {
        assert!(matches!(
            next_event(&mut w, Duration::from_secs(20)).await,
            ServiceEvent::Added(_)
        ));
        if w.revision() >= last {
            assert_eq!(
                w.instances().len(),
                1500,
                "revision {} claimed after {n} events",
                w.revision()
            );
        }
    }
    assert_eq!(w.revision(), last);
}

#[tokio::test]
async fn a_service_watch_whose_read_again_fails_for_a_while_goes_on() {
    // The watch resumes on a compacted revision and reads the instances again; that read
    // fails (every read refused) for a while. The stream reports it and goes on once reads
    // work, with the difference (before, it yielded the error and ended).
    use std::sync::atomic::Ordering::SeqCst;
    let etcd = etcd().await;
    let refuse = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (proxy, watching) =
        common::proxied_client_with(&etcd, common::refuse_reads(refuse.clone())).await;
    let writer = Toolkit::new(client(&etcd).await);
    let _one = writer.register(info(1)).await.unwrap();
    let mut w = Toolkit::new(watching).watch_service("api").await.unwrap();
    assert!(matches!(
        next_event(&mut w, Duration::from_secs(10)).await,
        ServiceEvent::Added(i) if i.id == "api-01"
    ));
    proxy.blackhole();
    proxy.cut_all().await;
    let _two = writer.register(info(2)).await.unwrap();
    let last = writer.client().kv().put("/elsewhere", "x").await.unwrap();
    writer
        .client()
        .kv()
        .compact(last.header.revision)
        .await
        .unwrap();
    refuse.store(true, SeqCst);
    proxy.pass();
    match tokio::time::timeout(Duration::from_secs(10), w.next()).await {
        Ok(Some(Err(ToolkitError::Etcd(e)))) => {
            assert!(e.is_retryable() || e.is_deadline(), "{e:?}");
        }
        other => panic!("expected the failed read, got {other:?}"),
    }
    refuse.store(false, SeqCst);
    let added = loop {
        match tokio::time::timeout(Duration::from_secs(10), w.next()).await {
            Ok(Some(Ok(ev))) => break ev,
            // Further failed tries may be reported before the one that succeeds.
            Ok(Some(Err(ToolkitError::Etcd(e)))) if e.is_retryable() || e.is_deadline() => {}
            other => panic!("expected the difference, got {other:?}"),
        }
    };
    assert!(matches!(added, ServiceEvent::Added(i) if i.id == "api-02"));
    assert_eq!(w.instances().len(), 2);
    // And it goes on.
    let _three = writer.register(info(3)).await.unwrap();
    assert!(matches!(
        next_event(&mut w, Duration::from_secs(10)).await,
        ServiceEvent::Added(i) if i.id == "api-03"
    ));
}
