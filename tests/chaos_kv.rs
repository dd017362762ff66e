//! Chaos: a seeded, randomized schedule of faults against a real 3-member etcd cluster while
//! writers, watchers, a reader and kept leases run, then hard invariants once all is healed.
//!
//! Faults: SIGSTOP/SIGCONT of a member (often the leader), SIGKILL and restart, SIGTERM
//! (graceful stop, GOAWAY) and restart; on the fault proxies in front of the members: cutting
//! every connection, blackholes in one or both directions, a one-shot cut after the next
//! request (it reaches the server, its answer never the client) or after some bytes (mid-frame),
//! delays. Now and then a proxy fault runs together with another fault.
//!
//! Clients: straight to every member, through every proxy, through one proxy, straight to one
//! member. Each put a unique key, one at a time (three share one client, one with a 300 ms
//! deadline, one with 1 s).
//!
//! 1. Every acknowledged put is in the store with its value at its acknowledged revision,
//!    applied once, after the writer's previous one; a put that failed with an error that is
//!    *not* indeterminate was not applied; nothing is in the store that was never attempted;
//!    no put returned (much) later than its deadline.
//! 2. Every watcher (on each client, a slow one that is paused and resumed, one that joins
//!    halfway) sees every revision from its start to the final one exactly once, in order,
//!    with the store's content, within a bounded time after the healing.
//! 3. Kept leases (through every proxy, through one), whose faults are all shorter than their
//!    TTL, are never reported lost, and their keys are still there.
//! 4. Reads (linearizable and serializable, through every proxy) count exactly the keys of
//!    their revision, a linearizable one is never older than a put acknowledged before it
//!    began, and no read goes back in revision.
//!
//! The schedule comes from `CHAOS_SEED` (a fixed default); every failure message names it.
//! Faults never take down more than one member at a time, so the cluster keeps its quorum.
//! Writes pause around each SIGKILL: etcd 3.5.0-3.5.2 can lose an applied entry when killed
//! in the middle of applying it (etcd issue 13766).

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::chaos::{self, Fault, ms};
use common::checks::{self, Attempt, Seen, failure};
use etcdv3::testkit::{EtcdCluster, FaultProxy};
use etcdv3::{Client, KeyValue, OrderingGuard};
use rand::SeedableRng;
use rand::rngs::StdRng;
use tokio::sync::RwLock;

const PREFIX: &str = "chaos/";
const DEFAULT_SEED: u64 = 20_240_613;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// Longer than any fault of the schedule plus the time to notice it and fail over.
const LEASE_TTL: i64 = 10;
const MAX_PUTS_PER_WRITER: usize = 10_000;
/// Planned length of the fault schedule (pauses, faults, restarts).
const SCHEDULE_BUDGET: Duration = Duration::from_secs(15);
/// How long the watchers may take to reach the final revision once everything is healed.
const CATCH_UP: Duration = Duration::from_secs(15);

/// Runs one fault (see `common::chaos::run_fault`); a SIGKILL waits until no put is in flight.
async fn run_fault(
    ctx: &str,
    cluster: &EtcdCluster,
    proxies: &[FaultProxy],
    gate: &RwLock<()>,
    fault: Fault,
) {
    let note = |s: String| eprintln!("{s}");
    chaos::run_fault(ctx, cluster, proxies, fault, &note, |t| async move {
        // No put in flight, and time for the backend to commit (every 100 ms).
        let _quiet = gate.write().await;
        let m = chaos::member(cluster, t, ctx).await;
        tokio::time::sleep(ms(300)).await;
        eprintln!("  SIGKILL member {m}");
        cluster.kill(m).unwrap();
        Some(m)
    })
    .await;
}

/// A client with short keep-alives (a paused member is noticed within 2 s) and deadlines.
async fn chaos_client(endpoints: Vec<String>) -> Client {
    Client::builder(endpoints)
        .request_timeout(REQUEST_TIMEOUT)
        .connect_timeout(Duration::from_secs(1))
        .keep_alive_interval(Duration::from_secs(1))
        .keep_alive_timeout(Duration::from_secs(1))
        .connect()
        .await
        .expect("connect a chaos client")
}

/// What the writers and the reader share with the schedule.
struct Ctl {
    t0: Instant,
    /// Set once everything is healed: the writers and the reader stop.
    stop: AtomicBool,
    /// Held for reading around each put, for writing around each SIGKILL.
    gate: RwLock<()>,
    /// The highest revision acknowledged to any writer so far.
    acked_max: AtomicI64,
}

/// Puts unique keys `chaos/<name>/<i>` one after the other until told to stop.
async fn write_loop(name: String, c: Client, timeout: Duration, ctl: Arc<Ctl>) -> Vec<Attempt> {
    let mut out = Vec::new();
    for i in 0..MAX_PUTS_PER_WRITER {
        if ctl.stop.load(Ordering::Relaxed) {
            break;
        }
        let key = format!("{PREFIX}{name}/{i:05}");
        let value = format!("{name}-{i}");
        let (began, r) = {
            // No put is in flight while a member is killed (see the module's doc).
            let _pass = ctl.gate.read().await;
            let began = Instant::now();
            let r = c
                .kv()
                .put(key.clone(), value.clone())
                .timeout(timeout)
                .await;
            (began, r)
        };
        if let Ok(r) = &r {
            ctl.acked_max.fetch_max(r.header.revision, Ordering::SeqCst);
        }
        let failed = r.is_err();
        out.push(Attempt {
            at: began - ctl.t0,
            took: began.elapsed(),
            timeout,
            key,
            value,
            outcome: r.map(|r| r.header.revision).map_err(|e| failure(&e)),
        });
        if failed {
            // Errors can come fast (every endpoint refused): do not spin.
            tokio::time::sleep(ms(20)).await;
        }
    }
    out
}

/// What the reader found: reads that broke an invariant, and counts of outcomes.
#[derive(Debug, Default)]
struct Reads {
    violations: Vec<String>,
    linearizable: usize,
    serializable: usize,
    errors: BTreeMap<String, usize>,
}

/// Counts the prefix, linearizable and serializable reads in turn, until told to stop. Every
/// revision from `start` on is the put of a new key under the prefix, so a read at revision
/// `r` must count `r - start + 1` keys, on whichever member. A linearizable read must not be
/// older than a put acknowledged before it began, and this client's reads never go back in
/// revision (the ordering guard sends a lagging serializable read elsewhere).
async fn read_loop(c: Client, start: i64, ctl: Arc<Ctl>) -> Reads {
    let mut out = Reads::default();
    let mut last = 0;
    let mut i = 0u64;
    while !ctl.stop.load(Ordering::Relaxed) {
        i += 1;
        let serializable = i.is_multiple_of(2);
        let floor = ctl.acked_max.load(Ordering::SeqCst);
        let began = ctl.t0.elapsed();
        let mut get = c.kv().get(PREFIX).prefix().count_only();
        if serializable {
            get = get.serializable();
        }
        match get.await {
            Ok(r) => {
                let rev = r.header.revision;
                let what = if serializable {
                    out.serializable += 1;
                    "serializable"
                } else {
                    out.linearizable += 1;
                    "linearizable"
                };
                if r.count != rev - start + 1 {
                    out.violations.push(format!(
                        "{what} read begun at {began:?} counted {} keys at revision {rev} \
                         ({} expected)",
                        r.count,
                        rev - start + 1
                    ));
                }
                if !serializable && rev < floor {
                    out.violations.push(format!(
                        "linearizable read begun at {began:?} answered at revision {rev}, \
                         before a put acknowledged earlier at {floor}"
                    ));
                }
                if rev < last {
                    out.violations.push(format!(
                        "{what} read begun at {began:?} answered at revision {rev}, after a \
                         read of this client at {last}"
                    ));
                }
                last = last.max(rev);
            }
            Err(e) => {
                *out.errors.entry(format!("{:?}", e.kind())).or_default() += 1;
            }
        }
        tokio::time::sleep(ms(5)).await;
    }
    out
}

/// A watcher on the prefix from `start`, read by its own task into a [`Seen`]. A `slow` one
/// has a small buffer and dawdles until its flag is set, so it is paused and resumed often.
async fn spawn_watcher(
    c: &Client,
    start: i64,
    slow: Option<Arc<AtomicBool>>,
) -> (Arc<Mutex<Seen>>, tokio::task::JoinHandle<()>) {
    let mut b = c.watch(PREFIX).prefix().start_revision(start);
    if slow.is_some() {
        b = b.buffer(4);
    }
    let mut w = b.await.expect("create a watcher");
    let seen = Arc::new(Mutex::new(Seen::default()));
    let out = seen.clone();
    let task = tokio::spawn(async move {
        let mut batches = 0u64;
        loop {
            batches += 1;
            if let Some(fast) = &slow
                && batches.is_multiple_of(16)
                && !fast.load(Ordering::Relaxed)
            {
                tokio::time::sleep(ms(20)).await;
            }
            let item = w.next().await;
            let mut s = out.lock().unwrap();
            match item {
                Some(Ok(b)) => {
                    for e in b.events() {
                        s.events.push((
                            e.revision(),
                            e.kind,
                            e.kv.key_str().unwrap_or("<not utf-8>").to_owned(),
                            e.kv.value_str().unwrap_or("<not utf-8>").to_owned(),
                        ));
                    }
                }
                Some(Err(e)) => {
                    s.end = Some(format!("failed: {e:?}"));
                    return;
                }
                None => {
                    s.end = Some("ended".into());
                    return;
                }
            }
        }
    });
    (seen, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_faults_lose_no_acknowledged_put_and_watchers_see_every_revision_once() {
    let seed = std::env::var("CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_SEED);
    let ctx = format!("chaos seed {seed} (rerun with CHAOS_SEED={seed})");
    let steps = chaos::schedule(&mut StdRng::seed_from_u64(seed), SCHEDULE_BUDGET);
    eprintln!("{ctx}: {} steps", steps.len());
    for (i, step) in steps.iter().enumerate() {
        eprintln!("  step {i}: after {:?}: {:?}", step.pause, step.faults);
    }

    let cluster = EtcdCluster::builder()
        .members(3)
        // The clients ping every second.
        .arg("--grpc-keepalive-min-time=500ms")
        .start_async()
        .await
        .unwrap_or_else(|e| panic!("could not start a 3-member etcd cluster: {e}"));
    let t0 = Instant::now();
    let mut proxies = Vec::new();
    for i in 0..3 {
        proxies.push(FaultProxy::start(cluster.client_addr(i)).await.unwrap());
    }
    let proxy_endpoints: Vec<String> = proxies.iter().map(FaultProxy::endpoint).collect();
    // Direct to every member; through every proxy; through the proxy of member 1 only.
    let direct = chaos_client(cluster.endpoints()).await;
    let proxied = chaos_client(proxy_endpoints.clone()).await;
    let single = chaos_client(vec![proxy_endpoints[1].clone()]).await;
    // Straight to member 2 alone: while it is down, puts fail without leaving the client.
    let pinned = chaos_client(vec![cluster.endpoint(2)]).await;

    // History starts here: every later revision is a put of a new key under the prefix.
    let start = direct
        .kv()
        .put(format!("{PREFIX}seed"), seed.to_string())
        .await
        .unwrap()
        .header
        .revision;
    // Kept leases, each with a key: through every proxy, and through one.
    let mut leases = Vec::new();
    for (name, c) in [("proxied", &proxied), ("single", &single)] {
        let kept = c.lease().grant(LEASE_TTL).keep_alive().await.unwrap();
        let key = format!("{PREFIX}lease-{name}");
        c.kv()
            .put(key.clone(), name)
            .lease(kept.id())
            .await
            .unwrap();
        leases.push((name, kept, key));
    }

    let mut watchers = Vec::new();
    let fast = Arc::new(AtomicBool::new(false));
    for (name, c, slow) in [
        ("direct", &direct, None),
        ("proxied", &proxied, None),
        ("single", &single, None),
        ("pinned", &pinned, None),
        ("slow", &proxied, Some(fast.clone())),
    ] {
        let (seen, task) = spawn_watcher(c, start, slow).await;
        watchers.push((name, seen, task));
    }

    // Writers: one put at a time each; three share the proxied client; "hasty" gives each put
    // 300 ms, so deadlines pass with puts in flight; "pinned" 1 s, so that it fails while its
    // member is down.
    let ctl = Arc::new(Ctl {
        t0,
        stop: AtomicBool::new(false),
        gate: RwLock::new(()),
        acked_max: AtomicI64::new(0),
    });
    let writers: Vec<_> = [
        ("direct", &direct, REQUEST_TIMEOUT),
        ("hasty", &direct, ms(300)),
        ("proxied0", &proxied, REQUEST_TIMEOUT),
        ("proxied1", &proxied, REQUEST_TIMEOUT),
        ("proxied2", &proxied, REQUEST_TIMEOUT),
        ("single", &single, REQUEST_TIMEOUT),
        ("pinned", &pinned, Duration::from_secs(1)),
    ]
    .into_iter()
    .map(|(name, c, timeout)| {
        let task = tokio::spawn(write_loop(name.to_owned(), c.clone(), timeout, ctl.clone()));
        (name, task)
    })
    .collect();
    // A reader through every proxy that sends a lagging serializable read elsewhere.
    let reader = Client::builder(proxy_endpoints.clone())
        .request_timeout(REQUEST_TIMEOUT)
        .connect_timeout(Duration::from_secs(1))
        .keep_alive_interval(Duration::from_secs(1))
        .keep_alive_timeout(Duration::from_secs(1))
        .ordering_guard(OrderingGuard::RetryElsewhere)
        .connect()
        .await
        .unwrap();
    let reader = tokio::spawn(read_loop(reader, start, ctl.clone()));

    // The faults, one step at a time; halfway, one more watcher joins from the start.
    for (i, step) in steps.iter().enumerate() {
        tokio::time::sleep(step.pause).await;
        if i == steps.len() / 2 {
            let (seen, task) = spawn_watcher(&proxied, start, None).await;
            watchers.push(("late", seen, task));
        }
        eprintln!("[{:>7.2?}] step {i}: {:?}", t0.elapsed(), step.faults);
        futures::future::join_all(
            step.faults
                .iter()
                .map(|f| run_fault(&ctx, &cluster, &proxies, &ctl.gate, *f)),
        )
        .await;
    }

    // Heal everything, then stop the writers.
    for p in &proxies {
        p.pass();
    }
    cluster
        .wait_all_healthy_async(Duration::from_secs(20))
        .await
        .unwrap_or_else(|e| panic!("{ctx}: the cluster did not heal: {e}"));
    let healed = Instant::now();
    eprintln!("[{:>7.2?}] healed", t0.elapsed());
    ctl.stop.store(true, Ordering::Relaxed);
    fast.store(true, Ordering::Relaxed);
    let mut attempts: BTreeMap<&str, Vec<Attempt>> = BTreeMap::new();
    for (name, task) in writers {
        // A put in flight ends by its deadline.
        let a = tokio::time::timeout(Duration::from_secs(15), task)
            .await
            .unwrap_or_else(|_| panic!("{ctx}: writer {name} did not stop within 15 s"))
            .unwrap();
        attempts.insert(name, a);
    }
    let reads = tokio::time::timeout(Duration::from_secs(15), reader)
        .await
        .unwrap_or_else(|_| panic!("{ctx}: the reader did not stop within 15 s"))
        .unwrap();

    let observer = chaos_client(cluster.endpoints()).await;
    if !checks::members_agree(&ctx, &cluster, &observer).await {
        return;
    }

    // ---- Invariant 1: acknowledged puts are there, at their revision, applied once. ----
    let all = observer.kv().get(PREFIX).prefix().await.unwrap();
    let final_rev = all.header.revision;
    let store: HashMap<String, KeyValue> = all
        .kvs
        .iter()
        .map(|kv| (kv.key_str().unwrap().to_owned(), kv.clone()))
        .collect();
    let mut acked_revs = HashSet::new();
    let mut samples = Vec::new();
    for (name, list) in &attempts {
        let line = checks::check_writer(
            &ctx,
            name,
            list,
            true,
            &store,
            &mut acked_revs,
            &mut samples,
        );
        eprintln!("  {line}");
    }
    // Nothing in the store that was never attempted.
    for key in store.keys() {
        let known = *key == format!("{PREFIX}seed")
            || leases.iter().any(|(_, _, k)| k == key)
            || key
                .strip_prefix(PREFIX)
                .and_then(|k| k.split_once('/'))
                .and_then(|(w, i)| Some((attempts.get(w)?, i.parse::<usize>().ok()?)))
                .is_some_and(|(list, i)| i < list.len());
        assert!(known, "{ctx}: {key} is in the store but was never written");
    }
    // Reads at the acknowledged revision see the value; just before it, nothing.
    checks::check_samples(&ctx, &observer, &samples).await;
    // Every revision of the history is one put of a new key under the prefix.
    let by_rev: BTreeMap<i64, &KeyValue> =
        store.values().map(|kv| (kv.mod_revision(), kv)).collect();
    assert_eq!(
        by_rev.keys().copied().collect::<Vec<_>>(),
        (start..=final_rev).collect::<Vec<_>>(),
        "{ctx}: the store's revisions are not exactly {start}..={final_rev}"
    );

    // ---- Invariant 4: reads were consistent and never went back in time. ----
    eprintln!(
        "  reader: {} linearizable, {} serializable reads; errors {:?}",
        reads.linearizable, reads.serializable, reads.errors
    );
    assert!(
        reads.violations.is_empty(),
        "{ctx}: {} reads broke an invariant, the first ones: {:#?}",
        reads.violations.len(),
        &reads.violations[..reads.violations.len().min(5)]
    );
    assert!(reads.linearizable > 0, "{ctx}: no read succeeded");

    // ---- Invariant 2: every watcher saw every revision once, in order, bounded. ----
    let stats = || {
        format!(
            "direct {:?}, proxied {:?}, single {:?}",
            direct.watch_stats(),
            proxied.watch_stats(),
            single.watch_stats()
        )
    };
    checks::wait_caught_up(&ctx, &watchers, final_rev, healed + CATCH_UP, stats).await;
    eprintln!(
        "[{:>7.2?}] watchers caught up to {final_rev}; watch stats: {}",
        t0.elapsed(),
        stats()
    );
    let all_revs: Vec<i64> = (start..=final_rev).collect();
    for (name, seen, task) in &watchers {
        task.abort();
        if let Some(fault) = checks::watcher_fault(name, &seen.lock().unwrap(), &all_revs, &by_rev)
        {
            panic!("{ctx}: {fault}");
        }
    }

    // ---- Invariant 3: the kept leases were never lost, their keys are there. ----
    for (name, kept, key) in &leases {
        assert_eq!(
            kept.lost_reason(),
            None,
            "{ctx}: the lease kept through {name} was reported lost: {:?}",
            kept.status()
        );
        let kv = store
            .get(key)
            .unwrap_or_else(|| panic!("{ctx}: the key of the lease kept through {name} is gone"));
        assert_eq!(kv.lease(), kept.id(), "{ctx}: {key}");
        let ttl = observer.lease().time_to_live(kept.id()).await.unwrap();
        assert!(
            ttl.ttl > 0,
            "{ctx}: the lease kept through {name} is gone on the server: {ttl:?}"
        );
    }
    eprintln!(
        "[{:>7.2?}] {ctx}: {} revisions checked; lease keeper streams opened: proxied {}, \
         single {}",
        t0.elapsed(),
        final_rev - start + 1,
        proxied.lease().keeper_streams_opened(),
        single.lease().keeper_streams_opened()
    );
}
