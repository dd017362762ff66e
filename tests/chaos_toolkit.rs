//! Chaos for the application toolkit (service registry, discovery, mirror, config source)
//! against a real 3-member etcd with one fault proxy in front of each member.
//!
//! A seeded fault schedule (SIGSTOP/SIGCONT of a member or of the raft leader, SIGKILL and
//! restart, SIGTERM and restart, on the proxies: cutting every connection, blackholes in one
//! or both directions, a cut after the next request or after some client bytes, delays; now
//! and then a proxy fault together with another fault) runs while
//!
//! - service instances of `api`, each registered through a client of its own: three *stable*
//!   ones (TTL 15 s; two through one proxy, one through every proxy, the latter rewriting its
//!   metadata every half second), two *churning* ones (TTL 3 s; one through every proxy, one
//!   through one proxy) that deregister and register again (a new incarnation in their
//!   metadata) over and over, and one whose process "dies" halfway (the registration and its
//!   client dropped without deregistering; TTL 2 s);
//! - discovery observers: a [`ServiceCache`] (through every proxy), a `watch_service`
//!   consumer (through one proxy) and a second one that joins halfway (through another), and
//!   a [`Mirror`] of the services prefix (through the third proxy), sampled during the run;
//! - a config writer setting a counter (through one proxy), and two config watchers (one that
//!   reads only `current()`, one that consumes the stream too).
//!
//! Once everything is healed (bounded waits, polling with deadlines), the invariants, against
//! etcd's own content and history (a watch of the whole test prefix from its first revision):
//!
//! 1. Registry: every instance still registered is in etcd exactly once, with the record of
//!    its `info()`, on its current `lease_id()`, which is alive; every deregistered or dropped
//!    one is gone (within its TTL); `discover` finds exactly the registered ones. The stable
//!    instances, whose faults are all much shorter than their TTL, never reported a lost lease.
//! 2. Discovery: each `watch_service` stream never yielded an error nor ended; its snapshot is
//!    etcd's content at its starting revision and its events are exactly the changes etcd's
//!    history derives from there (every revision once, in order); replaying the stream onto an
//!    empty map gives the stream's own `instances()` and etcd's final content. The cache
//!    converges to etcd's final content with no error left.
//! 3. Mirror: every sampled snapshot equals etcd's content of the prefix at its revision; the
//!    revision never goes back; at the end it equals etcd's final content.
//! 4. Config: every acknowledged write is in etcd's history at its revision with its value and
//!    a write that failed with an error that is not indeterminate is not; each watcher's
//!    `current()` (sampled) never goes back in revision, each value it showed is etcd's value
//!    at that revision, and it ends at etcd's final value, which is the last acknowledged one
//!    (or a later attempt whose outcome was unknown); the stream never yields an error.
//!
//! Faults never take down more than one member at a time. The workload pauses (and the
//! members' applied indexes are made equal) around each SIGKILL: etcd 3.5.0-3.5.2 can lose an
//! applied entry when killed mid-apply (etcd issue 13766); the members' KV hashes are compared
//! at the end so that a server divergence is told apart from a client bug.
//!
//! `CHAOS_SEED=<n>` replays a schedule (the seed is printed and named in every failure);
//! `CHAOS_SECS=<n>` changes the length of the fault window (default 14 s); `CHAOS_VERBOSE=1`
//! prints every workload error and registration event.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::future::IntoFuture;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::chaos::{self, Fault, Target, ms};
use etcdv3::testkit::{EtcdCluster, FaultProxy};
use etcdv3::toolkit::{
    ConfigSource, ConfigWatch, Registration, RegistrationEvent, ServiceEvent, ServiceInfo,
    ServiceWatch, Toolkit, ToolkitError,
};
use etcdv3::{Bytes, Client, Event, EventKind};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Deserialize;

const DEFAULT_SEED: u64 = 0x7001_2025;
const DEFAULT_WINDOW_SECS: u64 = 14;

/// The toolkit prefix: everything of the test lives under it (one history watch).
const ROOT: &str = "/chaos-tk";
const ROOT_KEYS: &str = "/chaos-tk/";
const SERVICE: &str = "api";
/// The keys of service `api`'s instances.
const API_KEYS: &str = "/chaos-tk/services/api/";
/// What the mirror copies.
const MIRRORED: &str = "/chaos-tk/services/";
const CONFIG: &str = "app";
const START: &str = "/chaos-tk/~start";
const END: &str = "/chaos-tk/~end";

const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// The stable instances' TTL: far longer than any outage of their path.
const STABLE_TTL: Duration = Duration::from_secs(15);
/// The churning instances' TTL (a lingering record of theirs goes within it).
const CHURN_TTL: Duration = Duration::from_secs(3);
/// The TTL of the instance whose process dies.
const DYING_TTL: Duration = Duration::from_secs(2);
/// How long, after the healing, the registry may take to settle (a churning instance's
/// lingering record expiring, a lost lease replaced).
const SETTLE: Duration = Duration::from_secs(20);
/// How long, after the registry settled, the observers may take to show etcd's content.
const CONVERGE: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// The run's shared state.

struct Run {
    seed: u64,
    t0: Instant,
    /// The fault window is over: the workload finishes and stops.
    stop: AtomicBool,
    /// The workload's writes hold it (read); a SIGKILL takes it (write).
    gate: tokio::sync::RwLock<()>,
    verbose: bool,
    violations: Mutex<Vec<String>>,
    /// A client straight to every member, for checks.
    verify: Client,
}

impl Run {
    fn t(&self) -> f64 {
        self.t0.elapsed().as_secs_f64()
    }

    fn note(&self, msg: impl AsRef<str>) {
        eprintln!("[{:6.2}s] {}", self.t(), msg.as_ref());
    }

    fn detail(&self, msg: impl AsRef<str>) {
        if self.verbose {
            self.note(msg);
        }
    }

    fn violation(&self, msg: impl Into<String>) {
        let m = format!("[{:6.2}s] {}", self.t(), msg.into());
        eprintln!("VIOLATION (seed {}): {m}", self.seed);
        self.violations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(m);
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
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

fn toolkit(c: &Client) -> Toolkit {
    c.toolkit().prefix(ROOT)
}

/// Instance `id`'s record in its incarnation `inc`.
fn instance(id: &str, inc: u32) -> ServiceInfo {
    ServiceInfo::new(SERVICE, id, format!("127.0.0.1:{}", 7000 + inc))
        .metadata("inc", inc.to_string())
}

fn indeterminate(e: &ToolkitError) -> bool {
    matches!(e, ToolkitError::Etcd(e) if e.is_indeterminate())
}

// ---------------------------------------------------------------------------------------------
// The fault schedule (`common::chaos`, as chaos_kv's, with a pause of the workload around
// SIGKILL).

/// Runs one fault (see `common::chaos::run_fault`); a SIGKILL pauses the workload first
/// ([`kill_quietly`]).
async fn run_fault(run: &Run, cluster: &EtcdCluster, proxies: &[FaultProxy], fault: Fault) {
    let ctx = format!("seed {}", run.seed);
    let note = |s: String| run.note(s);
    chaos::run_fault(&ctx, cluster, proxies, fault, &note, |t| {
        kill_quietly(run, cluster, t)
    })
    .await;
}

/// SIGKILL the member with no write of the workload in flight and every member's applied
/// index equal (etcd issue 13766); `None` (no kill) if they do not converge within 10 s.
/// The registrations' own background writes (re-registering a lost lease) cannot be paused;
/// the KV hashes compared at the end tell a divergence they would cause apart.
async fn kill_quietly(run: &Run, cluster: &EtcdCluster, t: Target) -> Option<usize> {
    let Ok(quiet) = tokio::time::timeout(Duration::from_secs(25), run.gate.write()).await else {
        run.violation("the workload did not pause within 25 s for a SIGKILL (liveness)");
        return None;
    };
    let m = match t {
        Target::Member(i) => i,
        Target::Leader => cluster
            .leader_async(Duration::from_secs(10))
            .await
            .unwrap_or_else(|e| panic!("seed {}: no leader: {e}", run.seed)),
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut applied = Vec::new();
        for ep in cluster.endpoints() {
            let status = match run.verify.maintenance_at(&ep) {
                Ok(m) => tokio::time::timeout(Duration::from_secs(2), m.status().into_future())
                    .await
                    .ok()
                    .and_then(Result::ok),
                Err(_) => None,
            };
            applied.push(status.map(|s| (s.raft_index, s.raft_applied_index)));
        }
        let first = applied[0];
        if first.is_some_and(|(_, a)| a > 0) && applied.iter().all(|s| *s == first) {
            break;
        }
        if Instant::now() >= deadline {
            run.note(format!(
                "  members did not converge ({applied:?}); SIGKILL skipped (issue 13766)"
            ));
            return None;
        }
        tokio::time::sleep(ms(50)).await;
    }
    run.note(format!("  SIGKILL member {m}"));
    cluster.kill(m).unwrap();
    drop(quiet);
    Some(m)
}

// ---------------------------------------------------------------------------------------------
// The workload.

/// What a churning instance did.
#[derive(Debug, Default)]
struct ChurnLog {
    registered: usize,
    register_failed: usize,
    deregistered: usize,
    deregister_failed: usize,
}

/// Register `id`, hold it a while, deregister it, pause, register it again (a new incarnation),
/// until told to stop. Returns the registration it ends with (if any) and its incarnation.
async fn churn(
    run: Arc<Run>,
    c: Client,
    id: String,
    seed: u64,
) -> (Option<Registration>, u32, ChurnLog) {
    let tk = toolkit(&c);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut reg: Option<Registration> = None;
    let mut inc = 0;
    let mut log = ChurnLog::default();
    let started = Instant::now();
    // Bounded: the window, and a few attempts after it when a registration fails.
    while !run.stopped() && started.elapsed() < Duration::from_secs(60) {
        match reg.take() {
            Some(r) => {
                let res = {
                    let _pass = run.gate.read().await;
                    r.deregister().await
                };
                match res {
                    Ok(()) => log.deregistered += 1,
                    Err(e) => {
                        log.deregister_failed += 1;
                        run.detail(format!("{id}: deregister of incarnation {inc}: {e}"));
                    }
                }
                drop(r);
                tokio::time::sleep(ms(rng.random_range(200..1000))).await;
            }
            None => {
                inc += 1;
                let res = {
                    let _pass = run.gate.read().await;
                    tk.register(instance(&id, inc)).ttl(CHURN_TTL).await
                };
                match res {
                    Ok(r) => {
                        log.registered += 1;
                        reg = Some(r);
                        tokio::time::sleep(ms(rng.random_range(300..2000))).await;
                    }
                    Err(e) => {
                        log.register_failed += 1;
                        run.detail(format!("{id}: register of incarnation {inc}: {e}"));
                        tokio::time::sleep(ms(200)).await;
                    }
                }
            }
        }
    }
    (reg, inc, log)
}

/// Rewrite `reg`'s metadata (a growing `rev`) every half second until told to stop, then once
/// more until acknowledged (bounded). Returns the last acknowledged `rev` and the attempts.
async fn update_metadata(run: Arc<Run>, reg: Arc<Registration>) -> (u32, usize, usize) {
    let (mut n, mut acked, mut failed) = (0u32, 0u32, 0usize);
    let started = Instant::now();
    loop {
        let stopping = run.stopped();
        if stopping && (acked == n || started.elapsed() > Duration::from_secs(60)) {
            break;
        }
        n += 1;
        let md = BTreeMap::from([
            ("inc".to_owned(), "1".to_owned()),
            ("rev".to_owned(), n.to_string()),
        ]);
        let res = {
            let _pass = run.gate.read().await;
            reg.update_metadata(md).await
        };
        match res {
            Ok(()) => acked = n,
            Err(e) => {
                failed += 1;
                run.detail(format!("stable-all: metadata rev {n}: {e}"));
            }
        }
        tokio::time::sleep(ms(if stopping { 100 } else { 500 })).await;
    }
    (acked, n as usize, failed)
}

/// One config write: the counter's value and what the client said.
#[derive(Debug)]
struct ConfigWrite {
    n: u64,
    /// The acknowledged revision, or (indeterminate, message).
    outcome: Result<i64, (bool, String)>,
}

/// Set the counter to 1, 2, 3, ... until told to stop, then until one write is acknowledged
/// (bounded).
async fn config_writer(run: Arc<Run>, source: ConfigSource, first: u64) -> Vec<ConfigWrite> {
    let mut out: Vec<ConfigWrite> = Vec::new();
    let started = Instant::now();
    for n in first.. {
        let stopping = run.stopped();
        let last_acked = out.last().is_some_and(|w| w.outcome.is_ok());
        if stopping && (last_acked || started.elapsed() > Duration::from_secs(60)) {
            break;
        }
        let res = {
            let _pass = run.gate.read().await;
            source.set("counter", n).await
        };
        let failed = res.is_err();
        if let Err(e) = &res {
            run.detail(format!("config counter={n}: {e}"));
        }
        out.push(ConfigWrite {
            n,
            outcome: res.map_err(|e| (indeterminate(&e), e.to_string())),
        });
        tokio::time::sleep(ms(if failed { 100 } else { 60 })).await;
    }
    out
}

/// A mirror snapshot and the revision it reflects.
type MirrorSample = (BTreeMap<Bytes, Bytes>, i64);

#[derive(Debug, Clone, PartialEq, Deserialize)]
struct AppConfig {
    counter: u64,
}

/// What a config watcher showed: `current()` sampled (each change), and the stream's items.
#[derive(Debug, Default)]
struct ConfigSeen {
    current: Vec<(u64, i64)>,
    stream: Vec<(u64, i64)>,
    stream_errors: Vec<String>,
    stream_ended: bool,
}

/// Sample `w.current()` every 20 ms; with `consume`, read the stream too.
fn spawn_config_watcher(
    mut w: ConfigWatch<AppConfig>,
    consume: bool,
) -> (Arc<Mutex<ConfigSeen>>, tokio::task::JoinHandle<()>) {
    let seen: Arc<Mutex<ConfigSeen>> = Arc::default();
    let s = seen.clone();
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(ms(20));
        loop {
            tokio::select! {
                item = w.next(), if consume => {
                    let mut s = s.lock().unwrap();
                    match item {
                        Some(Ok(u)) => s.stream.push((u.config.counter, u.revision)),
                        Some(Err(e)) => s.stream_errors.push(e.to_string()),
                        None => {
                            s.stream_ended = true;
                            return;
                        }
                    }
                }
                _ = tick.tick() => {}
            }
            if let Some(u) = w.current() {
                let now = (u.config.counter, u.revision);
                let mut s = s.lock().unwrap();
                if s.current.last() != Some(&now) {
                    s.current.push(now);
                }
            }
        }
    });
    (seen, task)
}

/// What a `watch_service` consumer saw.
#[derive(Debug, Default)]
struct ServiceSeen {
    /// The stream's revision before the first event (its snapshot's).
    r0: i64,
    /// The instances of the snapshot.
    snapshot: Vec<ServiceInfo>,
    events: Vec<ServiceEvent>,
    /// The stream's own `instances()` after the last event.
    instances: Vec<ServiceInfo>,
    errors: Vec<String>,
    ended: bool,
}

fn spawn_service_watcher(
    mut w: ServiceWatch,
) -> (Arc<Mutex<ServiceSeen>>, tokio::task::JoinHandle<()>) {
    let seen = Arc::new(Mutex::new(ServiceSeen {
        r0: w.revision(),
        snapshot: w.instances(),
        instances: w.instances(),
        ..Default::default()
    }));
    let s = seen.clone();
    let task = tokio::spawn(async move {
        loop {
            let item = w.next().await;
            let mut s = s.lock().unwrap();
            match item {
                Some(Ok(ev)) => {
                    s.events.push(ev);
                    s.instances = w.instances();
                }
                Some(Err(e)) => s.errors.push(e.to_string()),
                None => {
                    s.ended = true;
                    return;
                }
            }
        }
    });
    (seen, task)
}

/// Collect a registration's events (the first is its state when subscribed).
fn spawn_events(
    run: &Arc<Run>,
    name: &str,
    reg: &Registration,
) -> (
    Arc<Mutex<Vec<RegistrationEvent>>>,
    tokio::task::JoinHandle<()>,
) {
    let seen: Arc<Mutex<Vec<RegistrationEvent>>> = Arc::default();
    let (s, run, name) = (seen.clone(), run.clone(), name.to_owned());
    let mut events = reg.events();
    let task = tokio::spawn(async move {
        while let Some(ev) = events.next().await {
            run.detail(format!("{name}: {ev:?}"));
            s.lock().unwrap().push(ev);
        }
    });
    (seen, task)
}

// ---------------------------------------------------------------------------------------------
// etcd's history.

/// Every event under the test prefix from revision `from` up to the put of [`END`].
async fn history(run: &Run, from: i64) -> Vec<Event> {
    let collect = async {
        let mut w = run
            .verify
            .watch(ROOT_KEYS)
            .prefix()
            .start_revision(from)
            .await
            .expect("history watch");
        let mut out = Vec::new();
        while let Some(batch) = w.next().await {
            let batch = batch.expect("history watch item");
            for ev in batch.events() {
                let end = ev.kv.key() == END.as_bytes();
                out.push(ev.clone());
                if end {
                    return out;
                }
            }
        }
        panic!("seed {}: the history watch ended", run.seed);
    };
    tokio::time::timeout(Duration::from_secs(15), collect)
        .await
        .unwrap_or_else(|_| panic!("seed {}: the history did not arrive in 15 s", run.seed))
}

/// The keys under `prefix` and their values as of revision `rev`, from the history.
fn content_at(history: &[Event], prefix: &str, rev: i64) -> BTreeMap<Bytes, Bytes> {
    let mut map = BTreeMap::new();
    for ev in history.iter().take_while(|e| e.kv.mod_revision() <= rev) {
        if !ev.kv.key().starts_with(prefix.as_bytes()) {
            continue;
        }
        if ev.kind == EventKind::Put {
            map.insert(ev.kv.key().clone(), ev.kv.value().clone());
        } else {
            map.remove(ev.kv.key());
        }
    }
    map
}

fn parse_info(v: &[u8]) -> ServiceInfo {
    serde_json::from_slice(v).expect("a service record is ServiceInfo JSON")
}

/// The instances of `api` by id as of revision `rev`.
fn instances_at(history: &[Event], rev: i64) -> BTreeMap<String, ServiceInfo> {
    content_at(history, API_KEYS, rev)
        .into_iter()
        .map(|(k, v)| {
            let id = String::from_utf8_lossy(&k[API_KEYS.len()..]).into_owned();
            (id, parse_info(&v))
        })
        .collect()
}

/// The service events a stream starting at revision `r0` must yield after its snapshot.
fn expected_service_events(history: &[Event], r0: i64) -> Vec<ServiceEvent> {
    let mut known = instances_at(history, r0);
    let mut out = Vec::new();
    for ev in history.iter().filter(|e| e.kv.mod_revision() > r0) {
        let Some(id) = ev.kv.key().strip_prefix(API_KEYS.as_bytes()) else {
            continue;
        };
        let id = String::from_utf8_lossy(id).into_owned();
        if ev.kind == EventKind::Put {
            let info = parse_info(ev.kv.value());
            out.push(match known.insert(id, info.clone()) {
                Some(_) => ServiceEvent::Modified(info),
                None => ServiceEvent::Added(info),
            });
        } else if let Some(old) = known.remove(&id) {
            out.push(ServiceEvent::Removed(old));
        }
    }
    out
}

/// The config counter's value as of revision `rev`.
fn counter_at(history: &[Event], key: &str, rev: i64) -> Option<u64> {
    content_at(history, key, rev)
        .get(key.as_bytes())
        .map(|v| serde_json::from_slice(v).expect("the counter is a JSON number"))
}

fn ids(infos: &[ServiceInfo]) -> Vec<&str> {
    infos.iter().map(|i| i.id.as_str()).collect()
}

// ---------------------------------------------------------------------------------------------
// The test.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn toolkit_keeps_its_invariants_under_seeded_faults() {
    let seed = std::env::var("CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_SEED);
    let window = Duration::from_secs(
        std::env::var("CHAOS_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(DEFAULT_WINDOW_SECS),
    );
    let started = Instant::now();
    let cluster = EtcdCluster::builder()
        .members(3)
        .start_async()
        .await
        .unwrap_or_else(|e| panic!("start a 3-member etcd (scripts/install-etcd.sh?): {e}"));
    let mut rng = StdRng::seed_from_u64(seed);
    let steps = chaos::schedule(&mut rng, window);
    eprintln!(
        "chaos_toolkit: seed {seed} (CHAOS_SEED), etcd {}, window {window:?}, schedule:",
        cluster.version()
    );
    for s in &steps {
        eprintln!("  after {:?}: {:?}", s.pause, s.faults);
    }
    let mut proxies = Vec::new();
    for i in 0..3 {
        proxies.push(
            FaultProxy::start(cluster.client_addr(i))
                .await
                .expect("start a fault proxy"),
        );
    }
    let all: Vec<String> = proxies.iter().map(FaultProxy::endpoint).collect();
    let via = |p: usize| vec![proxies[p].endpoint()];
    let verify = common::client(&cluster).await;
    let run = Arc::new(Run {
        seed,
        t0: Instant::now(),
        stop: AtomicBool::new(false),
        gate: tokio::sync::RwLock::new(()),
        verbose: std::env::var("CHAOS_VERBOSE").is_ok_and(|v| v == "1"),
        violations: Mutex::new(Vec::new()),
        verify: verify.clone(),
    });

    // The history starts here; the counter exists before the watchers start.
    let start_rev = verify
        .kv()
        .put(START, "")
        .await
        .expect("start marker")
        .header
        .revision;
    let admin = toolkit(&verify);
    admin
        .config_source(CONFIG)
        .set("counter", 0u64)
        .await
        .expect("initialise the counter");
    let counter_key = admin.config_source(CONFIG).key("counter").unwrap();

    // Stable instances: through proxy 0, through proxy 1, through every proxy.
    let mut stable = Vec::new();
    for (name, endpoints) in [
        ("stable-0", via(0)),
        ("stable-1", via(1)),
        ("stable-all", all.clone()),
    ] {
        let c = chaos_client(endpoints).await;
        let reg = toolkit(&c)
            .register(instance(name, 1))
            .ttl(STABLE_TTL)
            .await
            .expect("register a stable instance");
        let (events, task) = spawn_events(&run, name, &reg);
        stable.push((name, c, Arc::new(reg), events, task));
    }
    // The instance whose process dies halfway (through proxy 1).
    let dying_client = chaos_client(via(1)).await;
    let dying = toolkit(&dying_client)
        .register(instance("dying", 1))
        .ttl(DYING_TTL)
        .await
        .expect("register the dying instance");

    // Observers.
    let cache_client = chaos_client(all.clone()).await;
    let cache = toolkit(&cache_client)
        .service_cache(SERVICE)
        .await
        .expect("service cache");
    let watch_a_client = chaos_client(via(1)).await;
    let (watch_a, watch_a_task) = spawn_service_watcher(
        toolkit(&watch_a_client)
            .watch_service(SERVICE)
            .await
            .expect("watch_service"),
    );
    let watch_b_client = chaos_client(via(2)).await;
    let mirror_client = chaos_client(via(0)).await;
    let mirror = mirror_client
        .mirror(MIRRORED)
        .page(2)
        .await
        .expect("mirror");
    let mirror_samples: Arc<Mutex<Vec<MirrorSample>>> = Arc::default();
    let sampler = {
        let (mirror, samples) = (mirror.clone(), mirror_samples.clone());
        tokio::spawn(async move {
            for _ in 0..200 {
                samples.lock().unwrap().push(mirror.snapshot());
                tokio::time::sleep(ms(250)).await;
            }
        })
    };
    let cw_current_client = chaos_client(via(1)).await;
    let (cw_current, cw_current_task) = spawn_config_watcher(
        toolkit(&cw_current_client)
            .config_source(CONFIG)
            .watch::<AppConfig>()
            .await
            .expect("config watch"),
        false,
    );
    let cw_stream_client = chaos_client(all.clone()).await;
    let (cw_stream, cw_stream_task) = spawn_config_watcher(
        toolkit(&cw_stream_client)
            .config_source(CONFIG)
            .watch::<AppConfig>()
            .await
            .expect("config watch"),
        true,
    );

    // Workload.
    let mut churners = Vec::new();
    for (name, endpoints) in [("churn-all", all.clone()), ("churn-2", via(2))] {
        let c = chaos_client(endpoints).await;
        let task = tokio::spawn(churn(run.clone(), c, name.to_owned(), rng.random()));
        churners.push((name, task));
    }
    let updater = tokio::spawn(update_metadata(run.clone(), stable[2].2.clone()));
    let writer_client = chaos_client(via(0)).await;
    let writer = tokio::spawn(config_writer(
        run.clone(),
        toolkit(&writer_client).config_source(CONFIG),
        1,
    ));

    // The faults; halfway, the second watch_service consumer joins and the dying instance
    // dies.
    let mut dying = Some((dying, dying_client));
    let mut dropped_at = None;
    let mut watch_b = None;
    for (i, step) in steps.iter().enumerate() {
        tokio::time::sleep(step.pause).await;
        if i == steps.len() / 2 {
            drop(dying.take());
            dropped_at = Some(Instant::now());
            run.note("the dying instance's process dies (registration and client dropped)");
            let deadline = Instant::now() + Duration::from_secs(10);
            let tk = toolkit(&watch_b_client);
            watch_b = loop {
                match tk.watch_service(SERVICE).await {
                    Ok(w) => break Some(spawn_service_watcher(w)),
                    Err(e) if Instant::now() < deadline => {
                        run.detail(format!("watch_service (late): {e}"));
                        tokio::time::sleep(ms(100)).await;
                    }
                    Err(e) => {
                        run.violation(format!(
                            "the late watch_service could not start within 10 s: {e}"
                        ));
                        break None;
                    }
                }
            };
        }
        run.note(format!("step {i}: {:?}", step.faults));
        futures::future::join_all(
            step.faults
                .iter()
                .map(|f| run_fault(&run, &cluster, &proxies, *f)),
        )
        .await;
    }
    if watch_b.is_none() && !steps.is_empty() {
        run.violation("the late watch_service never started");
    }

    // Heal everything, then stop the workload.
    for p in &proxies {
        p.pass();
    }
    cluster
        .wait_all_healthy_async(Duration::from_secs(20))
        .await
        .unwrap_or_else(|e| panic!("seed {seed}: the cluster did not heal: {e}"));
    let healed = Instant::now();
    run.note("healed; the workload finishes");
    run.stop.store(true, Ordering::SeqCst);
    let mut live: Vec<(String, Arc<Registration>)> = stable
        .iter()
        .map(|(name, _, reg, _, _)| ((*name).to_owned(), reg.clone()))
        .collect();
    let mut gone: Vec<String> = vec!["dying".to_owned()];
    let mut summary = Vec::new();
    for (name, task) in churners {
        let (reg, inc, log) = tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .unwrap_or_else(|_| panic!("seed {seed}: {name} did not stop within 30 s"))
            .expect("churn task");
        summary.push(format!(
            "{name}: {inc} incarnations, ends {}; {log:?}",
            if reg.is_some() {
                "registered"
            } else {
                "deregistered"
            }
        ));
        match reg {
            Some(reg) => live.push((name.to_owned(), Arc::new(reg))),
            None => gone.push(name.to_owned()),
        }
    }
    let (md_acked, md_tries, md_failed) = tokio::time::timeout(Duration::from_secs(30), updater)
        .await
        .unwrap_or_else(|_| panic!("seed {seed}: the metadata updater did not stop in 30 s"))
        .expect("updater task");
    summary.push(format!(
        "stable-all metadata: {md_tries} updates, {md_failed} failed, last acknowledged rev {md_acked}"
    ));
    if md_acked as usize != md_tries {
        run.violation(format!(
            "the metadata updater's last update (rev {md_tries}) was never acknowledged"
        ));
    }
    let writes = tokio::time::timeout(Duration::from_secs(30), writer)
        .await
        .unwrap_or_else(|_| panic!("seed {seed}: the config writer did not stop in 30 s"))
        .expect("writer task");
    let acked_writes: Vec<(u64, i64)> = writes
        .iter()
        .filter_map(|w| w.outcome.as_ref().ok().map(|r| (w.n, *r)))
        .collect();
    summary.push(format!(
        "config writer: {} writes, {} acknowledged, {} indeterminate",
        writes.len(),
        acked_writes.len(),
        writes
            .iter()
            .filter(|w| matches!(w.outcome, Err((true, _))))
            .count()
    ));
    let last_write = writes.last().expect("the writer wrote");
    let Ok(last_rev) = last_write.outcome.clone() else {
        panic!("seed {seed}: the config writer's last write failed: {last_write:?}");
    };

    // ---- 1. The registry settles on exactly the live instances. ----
    let settle_by = healed + SETTLE;
    let settled = loop {
        let mut problems = Vec::new();
        let now = verify.kv().get(API_KEYS).prefix().await;
        match now {
            Err(e) => problems.push(format!("read: {e}")),
            Ok(resp) => {
                let stored: BTreeMap<String, _> = resp
                    .kvs
                    .iter()
                    .map(|kv| {
                        let id = String::from_utf8_lossy(&kv.key()[API_KEYS.len()..]).into_owned();
                        (id, kv.clone())
                    })
                    .collect();
                for (name, reg) in &live {
                    match stored.get(name) {
                        None => problems.push(format!("{name} is not in etcd")),
                        Some(kv) => {
                            let info = parse_info(kv.value());
                            if info != reg.info() {
                                problems.push(format!(
                                    "{name}: etcd has {info:?}, the registration {:?}",
                                    reg.info()
                                ));
                            }
                            if kv.lease() != reg.lease_id() {
                                problems.push(format!(
                                    "{name}: stored on lease {:x}, the registration's is {:x}",
                                    kv.lease(),
                                    reg.lease_id()
                                ));
                            } else {
                                match verify.lease().time_to_live(kv.lease()).await {
                                    Ok(t) if t.ttl > 0 => {}
                                    other => problems
                                        .push(format!("{name}: its lease is not alive: {other:?}")),
                                }
                            }
                        }
                    }
                }
                for name in &gone {
                    if let Some(kv) = stored.get(name) {
                        problems.push(format!(
                            "{name} is gone but etcd has it: {:?} on lease {:x}",
                            kv.value_str(),
                            kv.lease()
                        ));
                    }
                }
                let want: BTreeSet<&str> = live.iter().map(|(n, _)| n.as_str()).collect();
                let have: BTreeSet<&str> = stored.keys().map(String::as_str).collect();
                if want != have {
                    problems.push(format!("etcd has {have:?}, expected {want:?}"));
                }
            }
        }
        if problems.is_empty() {
            break true;
        }
        if Instant::now() >= settle_by {
            run.violation(format!(
                "REGISTRY: not settled {SETTLE:?} after healing: {problems:?}"
            ));
            break false;
        }
        tokio::time::sleep(ms(100)).await;
    };
    if let Some(at) = dropped_at {
        run.note(format!(
            "registry settled: {settled} (dying instance dropped {:.1?} ago)",
            at.elapsed()
        ));
    }
    let discovered = admin.discover(SERVICE).await.expect("discover");
    let want: Vec<ServiceInfo> = {
        let mut v: Vec<ServiceInfo> = live.iter().map(|(_, r)| r.info()).collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    };
    if settled && discovered != want {
        run.violation(format!(
            "REGISTRY: discover found {:?}, the live registrations are {:?}",
            discovered, want
        ));
    }
    // Stable instances: never at risk (every outage of their path is far shorter than 15 s).
    for (name, _, reg, events, _) in &stable {
        let events = events.lock().unwrap().clone();
        let bad: Vec<_> = events
            .iter()
            .filter(|e| {
                matches!(
                    e,
                    RegistrationEvent::Lost { .. }
                        | RegistrationEvent::RetryFailed { .. }
                        | RegistrationEvent::Reregistered { .. }
                )
            })
            .collect();
        if !bad.is_empty() {
            run.violation(format!(
                "REGISTRY: stable instance {name} (TTL {STABLE_TTL:?}) reported {bad:?}; lease \
                 now {:x}",
                reg.lease_id()
            ));
        }
    }

    // The end of the history; the members agree on it.
    let final_rev = verify
        .kv()
        .put(END, "")
        .await
        .expect("end marker")
        .header
        .revision;
    let mut hashes = Vec::new();
    let agree_by = Instant::now() + Duration::from_secs(10);
    loop {
        hashes.clear();
        for ep in cluster.endpoints() {
            let h = match verify.maintenance_at(&ep) {
                Ok(m) => m
                    .hash_kv(final_rev)
                    .await
                    .map(|h| h.hash)
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            hashes.push(h);
        }
        if hashes.iter().all(|h| h.is_ok() && *h == hashes[0]) || Instant::now() >= agree_by {
            break;
        }
        tokio::time::sleep(ms(100)).await;
    }
    if hashes.iter().any(|h| *h != hashes[0]) {
        assert!(
            common::checks::loses_applied_entries(&cluster),
            "seed {seed}: the members' KV hashes at revision {final_rev} differ ({hashes:?}) on \
             etcd {}: the server diverged",
            cluster.version()
        );
        eprintln!(
            "SKIPPED the invariants (seed {seed}): the members' KV hashes differ ({hashes:?}); \
             etcd {} lost an applied entry (etcd issue 13766)",
            cluster.version()
        );
        return;
    }
    let history = history(&run, start_rev).await;
    let final_api = instances_at(&history, final_rev);
    let final_mirrored = content_at(&history, MIRRORED, final_rev);
    let final_counter = counter_at(&history, &counter_key, final_rev).expect("the counter");
    let final_counter_rev = history
        .iter()
        .rev()
        .find(|e| e.kv.key() == counter_key.as_bytes())
        .map(|e| e.kv.mod_revision())
        .expect("the counter's last write");

    // ---- 2/3/4. The observers converge on etcd's final content. ----
    let final_list: Vec<ServiceInfo> = final_api.values().cloned().collect();
    let want_config = (final_counter, final_counter_rev);
    let mut watches = vec![("watch_service (proxy 1)", watch_a.clone(), watch_a_task)];
    if let Some((seen, task)) = watch_b {
        watches.push(("watch_service (late, proxy 2)", seen, task));
    }
    let converge_by = Instant::now() + CONVERGE;
    loop {
        let mut lagging = Vec::new();
        if cache.instances() != final_list {
            lagging.push(format!("cache has {:?}", ids(&cache.instances())));
        }
        if mirror.snapshot().0 != final_mirrored {
            lagging.push(format!(
                "mirror at {} ({} keys)",
                mirror.revision(),
                mirror.len()
            ));
        }
        for (name, seen, _) in &watches {
            let s = seen.lock().unwrap();
            if s.instances != final_list && !s.ended {
                lagging.push(format!("{name} has {:?}", ids(&s.instances)));
            }
        }
        for (name, seen) in [
            ("config current()", &cw_current),
            ("config stream", &cw_stream),
        ] {
            let s = seen.lock().unwrap();
            if s.current.last() != Some(&want_config) && !s.stream_ended {
                lagging.push(format!("{name} at {:?}", s.current.last()));
            }
        }
        let stream_last = cw_stream.lock().unwrap().stream.last().copied();
        if stream_last != Some(want_config) && !cw_stream.lock().unwrap().stream_ended {
            lagging.push(format!("config stream's last item {stream_last:?}"));
        }
        if lagging.is_empty() {
            break;
        }
        if Instant::now() >= converge_by {
            run.violation(format!(
                "OBSERVERS: not at etcd's final content (revision {final_rev}: {:?}, counter \
                 {want_config:?}) within {CONVERGE:?}: {lagging:?}",
                final_api.keys().collect::<Vec<_>>()
            ));
            break;
        }
        tokio::time::sleep(ms(20)).await;
    }
    if let Some(e) = cache.error() {
        run.violation(format!("CACHE: still reports an error after healing: {e}"));
    }

    // ---- 2. Each watch_service stream is etcd's history, exactly. ----
    for (name, seen, task) in &watches {
        task.abort();
        let s = seen.lock().unwrap();
        if s.ended || !s.errors.is_empty() {
            run.violation(format!(
                "DISCOVERY: {name} ended ({}) or yielded errors: {:?}",
                s.ended, s.errors
            ));
        }
        let snapshot_at_r0: Vec<ServiceInfo> = instances_at(&history, s.r0).into_values().collect();
        if s.snapshot != snapshot_at_r0 {
            run.violation(format!(
                "DISCOVERY: {name}'s snapshot {:?} is not etcd's content at its revision {} ({:?})",
                ids(&s.snapshot),
                s.r0,
                ids(&snapshot_at_r0)
            ));
        }
        let (head, tail) = s.events.split_at(s.snapshot.len().min(s.events.len()));
        let snapshot_events: Vec<ServiceEvent> = s
            .snapshot
            .iter()
            .cloned()
            .map(ServiceEvent::Added)
            .collect();
        if head != snapshot_events.as_slice() {
            run.violation(format!(
                "DISCOVERY: {name} did not start with one Added per snapshot instance: {head:?}"
            ));
        }
        let expected = expected_service_events(&history, s.r0);
        if tail != expected.as_slice() {
            let first_bad = tail
                .iter()
                .zip(&expected)
                .position(|(a, b)| a != b)
                .unwrap_or(tail.len().min(expected.len()));
            run.violation(format!(
                "DISCOVERY: {name}'s {} events after its snapshot (revision {}) are not etcd's {} \
                 changes; first difference at #{first_bad}: got {:?}, expected {:?}",
                tail.len(),
                s.r0,
                expected.len(),
                tail.get(first_bad),
                expected.get(first_bad)
            ));
        }
        // Replaying the stream onto an empty map gives its own instances and etcd's content.
        let mut replay: BTreeMap<String, ServiceInfo> = BTreeMap::new();
        for ev in &s.events {
            let ok = match ev {
                ServiceEvent::Added(i) => replay.insert(i.id.clone(), i.clone()).is_none(),
                ServiceEvent::Modified(i) => replay.insert(i.id.clone(), i.clone()).is_some(),
                ServiceEvent::Removed(i) => replay.remove(&i.id).is_some(),
                other => panic!("seed {seed}: an unknown service event {other:?}"),
            };
            if !ok {
                run.violation(format!(
                    "DISCOVERY: {name}'s {ev:?} does not fit the replay"
                ));
                break;
            }
        }
        let replayed: Vec<ServiceInfo> = replay.into_values().collect();
        if replayed != s.instances || replayed != final_list {
            run.violation(format!(
                "DISCOVERY: replaying {name}'s stream gives {:?}; its instances() {:?}; etcd {:?}",
                ids(&replayed),
                ids(&s.instances),
                ids(&final_list)
            ));
        }
        summary.push(format!(
            "{name}: from revision {}, {} snapshot + {} events",
            s.r0,
            s.snapshot.len(),
            tail.len()
        ));
    }

    // ---- 3. The mirror's samples are etcd's content at their revisions. ----
    sampler.abort();
    let samples = std::mem::take(&mut *mirror_samples.lock().unwrap());
    let mut last = 0;
    for (map, rev) in &samples {
        if *rev < last {
            run.violation(format!("MIRROR: went back from revision {last} to {rev}"));
        }
        last = *rev;
        let want = content_at(&history, MIRRORED, *rev);
        if *map != want {
            run.violation(format!(
                "MIRROR: its snapshot at revision {rev} has {:?}, etcd had {:?}",
                map.keys().collect::<Vec<_>>(),
                want.keys().collect::<Vec<_>>()
            ));
            break;
        }
    }
    summary.push(format!(
        "mirror: {} samples consistent up to revision {last}",
        samples.len()
    ));

    // ---- 4. Config. ----
    for w in &writes {
        let at = history.iter().find(|e| {
            e.kv.key() == counter_key.as_bytes() && e.kv.value() == w.n.to_string().as_bytes()
        });
        match (&w.outcome, at) {
            (Ok(rev), Some(e)) if e.kv.mod_revision() == *rev => {}
            (Ok(rev), _) => run.violation(format!(
                "CONFIG: acknowledged write counter={} at revision {rev} is not in etcd's \
                 history there (found {:?})",
                w.n,
                at.map(|e| e.kv.mod_revision())
            )),
            (Err((false, msg)), Some(e)) => run.violation(format!(
                "CONFIG: write counter={} failed with an error that is not indeterminate ({msg}), \
                 yet etcd applied it at revision {}",
                w.n,
                e.kv.mod_revision()
            )),
            (Err(_), _) => {}
        }
    }
    if (final_counter, final_counter_rev) != (last_write.n, last_rev) {
        // A write that timed out can still be applied later (its bytes held in a blackholed
        // proxy): then etcd's last value is that attempt's, and the watchers must show it.
        let late = writes
            .iter()
            .any(|w| w.n == final_counter && matches!(w.outcome, Err((true, _))));
        if late && final_counter_rev > last_rev {
            summary.push(format!(
                "config: an indeterminate write (counter={final_counter}) was applied after the \
                 last acknowledged one"
            ));
        } else {
            run.violation(format!(
                "CONFIG: etcd ends at counter={final_counter} (revision {final_counter_rev}), \
                 the last acknowledged write was counter={} at {last_rev}",
                last_write.n
            ));
        }
    }
    for (name, seen, task) in [
        (
            "config current()-only watcher (proxy 1)",
            &cw_current,
            cw_current_task,
        ),
        (
            "config stream watcher (every proxy)",
            &cw_stream,
            cw_stream_task,
        ),
    ] {
        task.abort();
        let s = seen.lock().unwrap();
        if s.stream_ended || !s.stream_errors.is_empty() {
            run.violation(format!(
                "CONFIG: {name}'s stream ended ({}) or yielded errors: {:?}",
                s.stream_ended, s.stream_errors
            ));
        }
        for (what, list, strict) in [
            ("current()", &s.current, false),
            ("stream", &s.stream, true),
        ] {
            let mut prev = 0;
            for &(counter, rev) in list {
                if rev < prev || (strict && rev == prev) {
                    run.violation(format!(
                        "CONFIG: {name}'s {what} went from revision {prev} to {rev}"
                    ));
                }
                prev = rev;
                let want = counter_at(&history, &counter_key, rev);
                if want != Some(counter) {
                    run.violation(format!(
                        "CONFIG: {name}'s {what} showed counter={counter} at revision {rev}; \
                         etcd had {want:?}"
                    ));
                    break;
                }
            }
        }
        summary.push(format!(
            "{name}: {} current() values, {} stream items",
            s.current.len(),
            s.stream.len()
        ));
    }

    for s in &summary {
        eprintln!("chaos_toolkit (seed {seed}): {s}");
    }
    eprintln!(
        "chaos_toolkit (seed {seed}): {} history events to revision {final_rev}, {:.1} s in all",
        history.len(),
        started.elapsed().as_secs_f64()
    );
    let violations = run.violations.lock().unwrap().clone();
    assert!(
        violations.is_empty(),
        "seed {seed} (rerun with CHAOS_SEED={seed}): {} invariant violation(s):\n{}",
        violations.len(),
        violations.join("\n")
    );
}
