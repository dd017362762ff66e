//! The endpoint balancer under faults, against real 3-member etcd clusters.

mod common;

use std::collections::HashSet;
use std::future::IntoFuture;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use etcdv3::testkit::{EtcdCluster, FaultProxy};
use etcdv3::{Client, Compare, CompareOp, ErrorKind, Op, OrderingGuard};

/// A 3-member cluster whose members accept HTTP/2 pings every 500 ms (etcd's default policy
/// closes connections that ping more often than every 5 s).
async fn cluster3() -> EtcdCluster {
    EtcdCluster::builder()
        .members(3)
        .arg("--grpc-keepalive-min-time=500ms")
        .start_async()
        .await
        .unwrap_or_else(|e| panic!("could not start a 3-member etcd cluster: {e}"))
}

fn index_of(cluster: &EtcdCluster, endpoint: &str) -> usize {
    (0..cluster.member_count())
        .find(|&i| cluster.endpoint(i) == endpoint)
        .unwrap_or_else(|| panic!("{endpoint} is not a member endpoint"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_pinned_member_fails_over_and_never_applies_a_write_twice() {
    let cluster = cluster3().await;
    let c = Client::builder(cluster.endpoints())
        .request_timeout(Duration::from_secs(5))
        .keep_alive_interval(Duration::from_secs(1))
        .keep_alive_timeout(Duration::from_secs(1))
        .connect()
        .await
        .unwrap();
    c.kv().put("seed", "x").await.unwrap();
    let pinned = index_of(&cluster, &c.pinned_endpoint());

    let stop = Arc::new(AtomicBool::new(false));
    let reads_ok = Arc::new(AtomicU64::new(0));
    let reader = {
        let (c, stop, ok) = (c.clone(), stop.clone(), reads_ok.clone());
        tokio::spawn(async move {
            let mut failures = 0u32;
            while !stop.load(Ordering::Relaxed) {
                match c.kv().get("seed").await {
                    Ok(r) => {
                        assert_eq!(r.kvs[0].value_str().unwrap(), "x");
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => failures += 1,
                }
            }
            failures
        })
    };
    let writer = {
        let (c, stop) = (c.clone(), stop.clone());
        tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut indeterminate = Vec::new();
            let mut i = 0u32;
            while !stop.load(Ordering::Relaxed) && i < 5000 {
                match c.kv().put(format!("w/{i:05}"), format!("v{i}")).await {
                    Ok(_) => acked.push(i),
                    Err(e) => {
                        assert!(
                            e.is_indeterminate()
                                || !e.is_retryable()
                                || e.kind() == ErrorKind::Unavailable,
                            "{e:?}"
                        );
                        indeterminate.push(i);
                    }
                }
                i += 1;
            }
            (acked, indeterminate, i)
        })
    };
    // Let traffic flow, then kill the member requests are pinned to.
    common::wait_until(Duration::from_secs(10), "some reads", || {
        let n = reads_ok.load(Ordering::Relaxed);
        async move { n > 20 }
    })
    .await;
    cluster.kill(pinned).unwrap();
    let killed_at = Instant::now();
    let before = reads_ok.load(Ordering::Relaxed);
    common::wait_until(
        Duration::from_secs(10),
        "reads to continue on another member",
        || {
            let n = reads_ok.load(Ordering::Relaxed);
            async move { n > before + 20 }
        },
    )
    .await;
    let failover = killed_at.elapsed();
    // Keep writing a little longer on the survivors.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let read_failures = reader.await.unwrap();
    let (acked, unknown, total) = writer.await.unwrap();
    assert!(total > 0);
    assert_ne!(c.pinned_endpoint(), cluster.endpoint(pinned), "pin moved");

    // Every write was applied at most once (version 1), and every acknowledged one exists.
    let all = c.kv().get("w/").prefix().await.unwrap();
    let present: HashSet<u32> = all
        .kvs
        .iter()
        .map(|kv| {
            assert_eq!(kv.version(), 1, "{kv:?} applied twice");
            kv.key_str().unwrap()[2..].parse().unwrap()
        })
        .collect();
    for i in &acked {
        assert!(present.contains(i), "acknowledged write {i} lost");
    }
    for i in &present {
        assert!(
            acked.contains(i) || unknown.contains(i),
            "write {i} appeared from nowhere"
        );
    }
    eprintln!(
        "kill failover: first reads on another member after {failover:?}; {} writes acked, {} indeterminate, {read_failures} read failures",
        acked.len(),
        unknown.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigstopped_pinned_member_is_left_within_keepalive_and_used_again_after_sigcont() {
    let cluster = cluster3().await;
    let interval = Duration::from_secs(1);
    let timeout = Duration::from_secs(1);
    let c = Client::builder(cluster.endpoints())
        .request_timeout(Duration::from_secs(6))
        .keep_alive_interval(interval)
        .keep_alive_timeout(timeout)
        .connect()
        .await
        .unwrap();
    c.kv().put("k", "v").await.unwrap();
    let pinned = index_of(&cluster, &c.pinned_endpoint());
    cluster.stop(pinned).unwrap();
    let stopped_at = Instant::now();

    // New reads succeed through the other members within interval + timeout + 1 s, and no
    // request waits past its own deadline.
    let mut first_ok = None;
    let mut n = 0;
    while stopped_at.elapsed() < Duration::from_secs(20) && n < 400 {
        n += 1;
        let t = Instant::now();
        let r = c.kv().get("k").timeout(Duration::from_secs(4)).await;
        assert!(
            t.elapsed() < Duration::from_millis(4500),
            "waited past its deadline"
        );
        if r.is_ok() && first_ok.is_none() {
            first_ok = Some(stopped_at.elapsed());
        }
        if first_ok.is_some() && stopped_at.elapsed() > Duration::from_secs(3) {
            break;
        }
    }
    let first_ok = first_ok.expect("reads succeeded while a member was stopped");
    // Detection (a ping at the next tick, unanswered for the timeout), then a new connection
    // and, when the stopped member led, an election on a loaded 2-core box.
    assert!(
        first_ok <= interval + timeout + Duration::from_secs(3),
        "failover took {first_ok:?}"
    );
    // Writes work on the survivors too.
    c.kv().put("k2", "v2").await.unwrap();
    assert_ne!(index_of(&cluster, &c.pinned_endpoint()), pinned);

    // Keep it stopped for 20 s in all, then resume it.
    let left = Duration::from_secs(20).saturating_sub(stopped_at.elapsed());
    tokio::time::sleep(left).await;
    cluster.cont(pinned).unwrap();
    cluster
        .wait_healthy_async(pinned, Duration::from_secs(20))
        .await
        .unwrap();

    // The resumed member is used again: kill the other two; serializable reads (no quorum
    // needed) can only be served by the resumed one.
    for i in 0..3 {
        if i != pinned {
            cluster.kill(i).unwrap();
        }
    }
    let t = Instant::now();
    let r = c
        .kv()
        .get("k2")
        .serializable()
        .timeout(Duration::from_secs(8))
        .await
        .unwrap();
    assert_eq!(r.kvs[0].value_str().unwrap(), "v2");
    assert_eq!(c.pinned_endpoint(), cluster.endpoint(pinned));
    eprintln!(
        "SIGSTOP failover: first read on another member {first_ok:?} after the stop; back on the resumed member in {:?}",
        t.elapsed()
    );
}

#[tokio::test]
async fn a_put_that_times_out_in_flight_is_indeterminate() {
    // The put leaves the client, the server answers late (after the deadline): whether it
    // was applied is unknown, and the error says so.
    let etcd = common::etcd().await;
    let (proxy, c) = common::proxied_client(&etcd).await;
    c.kv().put("late", "0").await.unwrap();
    proxy.blackhole_direction(etcdv3::testkit::Direction::ServerToClient);
    let e = c
        .kv()
        .put("late", "1")
        .timeout(Duration::from_millis(300))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Deadline, "{e:?}");
    assert!(e.is_indeterminate(), "{e:?}");
    proxy.pass();
    // It was in fact applied.
    let observer = common::client(&etcd).await;
    assert_eq!(
        observer.kv().get("late").await.unwrap().kvs[0]
            .value_str()
            .unwrap(),
        "1"
    );
}

#[tokio::test]
async fn a_cut_put_is_indeterminate_and_never_retried_but_a_cut_range_is() {
    let etcd = common::etcd().await;
    let (proxy, c) = common::proxied_client(&etcd).await;
    let observer = common::client(&etcd).await;
    let mut indeterminate = 0;
    for i in 0..15 {
        proxy.cut_after_next_request();
        let r = c.kv().put(format!("cut/{i}"), "v").await;
        match r {
            Err(e) => {
                assert!(e.is_indeterminate(), "{e:?}");
                indeterminate += 1;
            }
            Ok(_) => panic!("a put whose connection was cut cannot have an answer"),
        }
        // The put reached the server exactly once.
        common::wait_until(Duration::from_secs(5), "the cut put to be visible", || {
            let o = observer.clone();
            async move { o.kv().get(format!("cut/{i}")).await.unwrap().count == 1 }
        })
        .await;
    }
    assert_eq!(indeterminate, 15);
    let all = observer.kv().get("cut/").prefix().await.unwrap();
    assert_eq!(all.kvs.len(), 15);
    assert!(
        all.kvs.iter().all(|kv| kv.version() == 1),
        "no put applied twice"
    );

    // A range under the same fault is retried transparently.
    for _ in 0..5 {
        proxy.cut_after_next_request();
        let r = c.kv().get("cut/").prefix().count_only().await.unwrap();
        assert_eq!(r.count, 15);
    }

    // So is a read-only transaction (nested ones included) ...
    for _ in 0..5 {
        proxy.cut_after_next_request();
        let r = c
            .kv()
            .txn()
            .when([Compare::version("cut/0", CompareOp::Equal, 1)])
            .and_then([Op::from(Op::get("cut/").prefix().count_only())])
            .or_else([Op::from(Op::txn().and_then([Op::get("cut/1")]))])
            .await
            .unwrap();
        assert!(r.succeeded);
        assert_eq!(r.responses.len(), 1);
    }
    // ... but never one that writes.
    proxy.cut_after_next_request();
    let r = c
        .kv()
        .txn()
        .and_then([Op::from(Op::get("cut/0")), Op::from(Op::put("cut/w", "v"))])
        .await;
    assert!(r.as_ref().is_err_and(|e| e.is_indeterminate()), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_cluster_down_fails_by_deadline_backs_off_and_recovers_fast() {
    let cluster = cluster3().await;
    let mut proxies = Vec::new();
    for i in 0..3 {
        proxies.push(FaultProxy::start(cluster.client_addr(i)).await.unwrap());
    }
    let c = Client::builder(proxies.iter().map(|p| p.endpoint()))
        .connect_timeout(Duration::from_secs(1))
        .connect()
        .await
        .unwrap();
    c.kv().put("k", "v").await.unwrap();
    for i in 0..3 {
        cluster.kill(i).unwrap();
    }
    let conns_before: u64 = proxies.iter().map(|p| p.connections_total()).sum();
    let t = Instant::now();
    for _ in 0..3 {
        let s = Instant::now();
        let e = c
            .kv()
            .get("k")
            .timeout(Duration::from_secs(1))
            .await
            .unwrap_err();
        let took = s.elapsed();
        assert!(
            matches!(e.kind(), ErrorKind::Unavailable | ErrorKind::Deadline),
            "{e:?}"
        );
        assert!(
            took <= Duration::from_millis(2000),
            "failed by its deadline: {took:?}"
        );
        if e.kind() == ErrorKind::Unavailable {
            assert!(
                e.endpoint_errors().count() >= 2 || e.endpoint().is_some(),
                "{e:?}"
            );
        }
    }
    let elapsed = t.elapsed();
    let attempts = proxies.iter().map(|p| p.connections_total()).sum::<u64>() - conns_before;
    // Back-off, not a busy loop: a handful of connection attempts per second.
    assert!(
        (attempts as f64) / elapsed.as_secs_f64() < 40.0,
        "{attempts} connection attempts in {elapsed:?}"
    );
    // A member comes back: the first request after it is healthy succeeds within 2 s.
    // Together: one member alone has no quorum, so its health wait would run to the end.
    let (r1, r2) = tokio::join!(cluster.restart_async(1), cluster.restart_async(2));
    let _ = (r1, r2);
    cluster
        .wait_healthy_async(1, Duration::from_secs(20))
        .await
        .unwrap();
    let s = Instant::now();
    let r = c
        .kv()
        .get("k")
        .serializable()
        .timeout(Duration::from_secs(2))
        .await;
    assert!(r.is_ok(), "{r:?}");
    assert!(s.elapsed() <= Duration::from_secs(2), "{:?}", s.elapsed());
    eprintln!(
        "cluster down: {attempts} connection attempts in {elapsed:?}; recovered in {:?}",
        s.elapsed()
    );
}

#[tokio::test]
async fn all_endpoints_failing_lists_each_endpoint() {
    let dead: Vec<String> = (0..3)
        .map(|_| {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            format!("http://{}", l.local_addr().unwrap())
        })
        .collect();
    let c = Client::builder(dead.clone()).connect_lazy().unwrap();
    let e = c
        .kv()
        .get("k")
        .timeout(Duration::from_secs(2))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e:?}");
    let listed: Vec<&str> = e.endpoint_errors().map(|(ep, _)| ep).collect();
    for d in &dead {
        assert!(listed.contains(&d.as_str()), "{d} missing from {e}");
        assert!(e.message().contains(d.as_str()));
    }
    // A write that never left the client is retried too, and fails the same way.
    let e = c
        .kv()
        .put("k", "v")
        .timeout(Duration::from_secs(2))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable);
    assert!(!e.is_indeterminate(), "never sent: {e:?}");
    assert!(e.endpoint_errors().count() >= 2, "{e:?}");
}

#[tokio::test]
async fn sync_and_auto_sync_follow_the_member_list() {
    let cluster = EtcdCluster::builder()
        .members(3)
        .spare_members(1)
        .start_async()
        .await
        .unwrap();
    let c = Client::builder([cluster.endpoint(0)])
        .auto_sync_interval(Duration::from_millis(200))
        .request_timeout(Duration::from_secs(5))
        .connect()
        .await
        .unwrap();
    let set = |v: Vec<String>| v.into_iter().collect::<HashSet<String>>();
    let initial = set(cluster.endpoints());
    assert_eq!(initial.len(), 3);
    common::wait_until(
        Duration::from_secs(5),
        "auto-sync to find all members",
        || {
            let ok = set(c.endpoints()) == initial;
            async move { ok }
        },
    )
    .await;

    use etcdv3::raw::etcdserverpb as pb;
    let mut cl = c.raw().unwrap().cluster();
    // etcd refuses reconfiguration ("unhealthy cluster") until its members have been
    // connected for a few seconds after start: retry within a deadline.
    let deadline = Instant::now() + Duration::from_secs(15);
    let added = loop {
        match cl
            .member_add(pb::MemberAddRequest {
                peer_ur_ls: vec![cluster.peer_url(3)],
                is_learner: false,
            })
            .await
        {
            Ok(r) => break r.into_inner(),
            Err(s) if Instant::now() < deadline && s.message().contains("unhealthy") => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(s) => panic!("member add: {s:?}"),
        }
    };
    // Added but not started: it has no name yet, so it is not an endpoint.
    let synced = set(c.sync().await.unwrap());
    assert_eq!(synced, initial, "an unstarted member is not an endpoint");

    // Start its process: auto-sync picks it up.
    cluster.start_member(3).await.unwrap();
    let grown = set(cluster.endpoints());
    assert_eq!(grown.len(), 4);
    common::wait_until(
        Duration::from_secs(10),
        "auto-sync to add the new member",
        || {
            let ok = set(c.endpoints()) == grown;
            async move { ok }
        },
    )
    .await;

    // Remove the new member and another one: the endpoint set shrinks.
    let new_id = added.member.unwrap().id;
    let members = cl
        .member_list(pb::MemberListRequest::default())
        .await
        .unwrap()
        .into_inner();
    let victim = members
        .members
        .iter()
        .find(|m| m.id != new_id && m.client_ur_ls != vec![cluster.endpoint(0)])
        .unwrap()
        .clone();
    for id in [new_id, victim.id] {
        common::wait_until(Duration::from_secs(15), "the member to be removed", || {
            let mut cl = cl.clone();
            async move {
                cl.member_remove(pb::MemberRemoveRequest { id })
                    .await
                    .is_ok()
            }
        })
        .await;
    }
    let expected: HashSet<String> = initial
        .iter()
        .filter(|e| !victim.client_ur_ls.contains(e))
        .cloned()
        .collect();
    assert_eq!(expected.len(), 2);
    common::wait_until(
        Duration::from_secs(10),
        "auto-sync to drop the removed members",
        || {
            let ok = set(c.endpoints()) == expected;
            async move { ok }
        },
    )
    .await;
    // The shrunken cluster elects a leader if the removed member led it; then writes work.
    common::wait_until(
        Duration::from_secs(20),
        "a write on the shrunken cluster",
        || {
            let c = c.clone();
            async move {
                c.kv()
                    .put("still", "works")
                    .timeout(Duration::from_secs(2))
                    .await
                    .is_ok()
            }
        },
    )
    .await;
}

#[tokio::test]
async fn ordering_guard_refuses_a_serializable_read_from_the_past() {
    // Two independent servers: the second is "behind" the revisions the client has seen.
    let ahead = common::etcd().await;
    let behind = common::etcd().await;
    let c = Client::builder([ahead.endpoint(0)])
        .request_timeout(Duration::from_secs(5))
        .connect()
        .await
        .unwrap();
    for i in 0..10 {
        c.kv().put(format!("k{i}"), "v").await.unwrap();
    }
    c.set_endpoints([behind.endpoint(0)]).unwrap();
    let e = c.kv().get("k1").serializable().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::StaleRead, "{e:?}");
    // Linearizable reads are not guarded (the server orders them), and the guard can be off.
    c.kv().get("k1").await.unwrap();
    let off = Client::builder([ahead.endpoint(0)])
        .ordering_guard(OrderingGuard::Off)
        .connect()
        .await
        .unwrap();
    off.kv().get("k1").await.unwrap();
    off.set_endpoints([behind.endpoint(0)]).unwrap();
    off.kv().get("k1").serializable().await.unwrap();

    // RetryElsewhere: with a current endpoint available, the read moves there.
    let retry = Client::builder([ahead.endpoint(0)])
        .ordering_guard(OrderingGuard::RetryElsewhere)
        .connect()
        .await
        .unwrap();
    retry.kv().put("k1", "fresh").await.unwrap();
    retry
        .set_endpoints([behind.endpoint(0), ahead.endpoint(0)])
        .unwrap();
    for _ in 0..3 {
        let r = retry.kv().get("k1").serializable().await.unwrap();
        assert_eq!(r.kvs[0].value_str().unwrap(), "fresh");
    }

    // The re-read elsewhere shares the first read's deadline: with each read taking about
    // 0.6 s (0.3 s each way), a 1 s timeout leaves the second read 0.4 s, and the whole
    // read fails at the deadline instead of succeeding late.
    let slow_behind = FaultProxy::start(behind.client_addr(0)).await.unwrap();
    let slow_ahead = FaultProxy::start(ahead.client_addr(0)).await.unwrap();
    let timed = Client::builder([slow_ahead.endpoint()])
        .ordering_guard(OrderingGuard::RetryElsewhere)
        .connect()
        .await
        .unwrap();
    timed.kv().put("k1", "fresher").await.unwrap();
    // Pinned to the server behind (connected), the other one next.
    timed.set_endpoints([slow_behind.endpoint()]).unwrap();
    timed.kv().get("k1").await.unwrap();
    timed
        .set_endpoints([slow_behind.endpoint(), slow_ahead.endpoint()])
        .unwrap();
    assert_eq!(timed.pinned_endpoint(), slow_behind.endpoint());
    slow_behind.delay(Duration::from_millis(300));
    slow_ahead.delay(Duration::from_millis(300));
    let start = Instant::now();
    let r = timed
        .kv()
        .get("k1")
        .serializable()
        .timeout(Duration::from_secs(1))
        .await;
    let took = start.elapsed();
    assert_eq!(r.unwrap_err().kind(), ErrorKind::Deadline);
    assert!(took < Duration::from_millis(1500), "took {took:?}");
}

#[tokio::test]
async fn require_leader_refuses_reads_from_a_member_without_leader() {
    let cluster = cluster3().await;
    let c = Client::builder([cluster.endpoint(0)])
        .request_timeout(Duration::from_secs(5))
        .connect()
        .await
        .unwrap();
    c.kv().put("k", "v").await.unwrap();
    // Member 0 alone: kill the other two, it loses its leader after the election timeout.
    cluster.kill(1).unwrap();
    cluster.kill(2).unwrap();
    common::wait_until(Duration::from_secs(10), "member 0 to notice it has no leader", || {
        let c = c.clone();
        async move {
            matches!(
                c.kv().get("k").serializable().require_leader(true).timeout(Duration::from_secs(1)).into_future().await,
                Err(e) if e.kind() == ErrorKind::NoLeader
            )
        }
    })
    .await;
    // Without require_leader a serializable read is still served (stale allowed).
    let r = c.kv().get("k").serializable().await.unwrap();
    assert_eq!(r.kvs[0].value_str().unwrap(), "v");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_lease_moves_to_another_member_when_its_member_dies() {
    let cluster = cluster3().await;
    let c = Client::builder(cluster.endpoints())
        .request_timeout(Duration::from_secs(5))
        .keep_alive_interval(Duration::from_secs(1))
        .keep_alive_timeout(Duration::from_secs(1))
        .connect()
        .await
        .unwrap();
    // A TTL long enough for the failover to include an election on a loaded box.
    let kept = c.lease().grant(6).keep_alive().await.unwrap();
    c.kv().put("owned", "x").lease(kept.id()).await.unwrap();
    let pinned = index_of(&cluster, &c.pinned_endpoint());
    let opened = c.lease().keeper_streams_opened();
    cluster.kill(pinned).unwrap();

    // An observer on the surviving members checks the key for two TTLs.
    let survivors: Vec<String> = (0..3)
        .filter(|&i| i != pinned)
        .map(|i| cluster.endpoint(i))
        .collect();
    let observer = Client::builder(survivors)
        .request_timeout(Duration::from_secs(5))
        .connect()
        .await
        .unwrap();
    let until = Instant::now() + Duration::from_secs(12);
    let mut checks = 0;
    while Instant::now() < until {
        let r = observer.kv().get("owned").serializable().await.unwrap();
        assert_eq!(
            r.count, 1,
            "the key of a kept lease vanished after {checks} checks"
        );
        assert!(kept.lost_reason().is_none(), "{:?}", kept.lost_reason());
        checks += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        c.lease().keeper_streams_opened() > opened,
        "the keeper re-opened its stream"
    );
    assert_ne!(index_of(&cluster, &c.pinned_endpoint()), pinned);
}

/// Reads `n` put events from `w` (bounded by `timeout`), returning their revisions in order.
async fn watch_revisions(w: &mut etcdv3::Watcher, n: usize, timeout: Duration) -> Vec<i64> {
    let mut revs = Vec::new();
    let deadline = Instant::now() + timeout;
    while revs.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        let batch = tokio::time::timeout(left, w.next())
            .await
            .unwrap_or_else(|_| panic!("only {} of {n} events after {timeout:?}", revs.len()))
            .expect("watcher ended")
            .expect("watch error");
        revs.extend(batch.events().iter().map(|e| e.revision()));
    }
    revs
}

async fn watch_survives(fault: &str) {
    let cluster = cluster3().await;
    let c = Client::builder(cluster.endpoints())
        .request_timeout(Duration::from_secs(5))
        .keep_alive_interval(Duration::from_secs(1))
        .keep_alive_timeout(Duration::from_secs(1))
        .connect()
        .await
        .unwrap();
    let first = c.kv().put("w/0", "0").await.unwrap().header.revision;
    let mut w = c.watch("w/").prefix().start_revision(first).await.unwrap();
    assert_eq!(
        watch_revisions(&mut w, 1, Duration::from_secs(5)).await,
        vec![first]
    );
    let serving = index_of(&cluster, &c.pinned_endpoint());
    match fault {
        "stop" => cluster.stop(serving).unwrap(),
        _ => cluster.kill(serving).unwrap(),
    }
    // Writes through the surviving members while the watcher's member is gone (once they
    // have a leader, so no write is left indeterminate by an election).
    cluster.leader_async(Duration::from_secs(10)).await.unwrap();
    let survivors: Vec<String> = (0..3)
        .filter(|&i| i != serving)
        .map(|i| cluster.endpoint(i))
        .collect();
    let writer = Client::builder(survivors)
        .request_timeout(Duration::from_secs(5))
        .connect()
        .await
        .unwrap();
    let mut expected = Vec::new();
    for i in 1..=50 {
        expected.push(
            writer
                .kv()
                .put(format!("w/{i}"), "v")
                .await
                .unwrap()
                .header
                .revision,
        );
    }
    // Every revision exactly once, in order, resumed on another member.
    let got = watch_revisions(&mut w, expected.len(), Duration::from_secs(15)).await;
    assert_eq!(got, expected);
    assert_ne!(index_of(&cluster, &c.pinned_endpoint()), serving);
    if fault == "stop" {
        cluster.cont(serving).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_resumes_on_another_member_when_its_member_is_sigstopped() {
    watch_survives("stop").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_resumes_on_another_member_when_its_member_is_killed() {
    watch_survives("kill").await;
}
