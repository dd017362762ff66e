//! Chaos under token auth: a seeded, randomized schedule of faults against a real 3-member
//! etcd cluster with auth enabled and simple tokens of a short TTL (they expire many times
//! during the run, on each member separately), while a non-root user with readwrite permission
//! on a prefix writes, watches, reads and keeps leases; then hard invariants once all is healed.
//!
//! Faults (as `chaos_kv`): SIGSTOP/SIGCONT of a member (often the leader), SIGKILL and restart
//! (a restarted member has forgotten every simple token), SIGTERM and restart; on the fault
//! proxies in front of the members: cutting every connection, blackholes in one or both
//! directions, a one-shot cut after the next request or after some client bytes, delays. Now
//! and then a proxy fault runs together with another fault. Never more than one member down.
//!
//! Workload, all as user `app` (role `app`: readwrite on `chaos/` and, until the revocation,
//! on `perm/`): writers putting unique keys one at a time (straight to every member, through
//! every proxy, through one proxy, straight to one member; one with a 300 ms deadline); a
//! "napper" that stays idle for longer than the token TTL and then puts a burst of keys
//! concurrently (every burst starts with an expired token, re-authenticated once for all);
//! watchers on the prefix (straight, through every proxy, through one, a slow one that is
//! paused and resumed, one that joins halfway, and a "dozy" one on a client that does nothing
//! else but keep a lease: it rests longer than the token TTL, so it is paused that long and
//! then resumed on a stream whose token has expired); a reader (linearizable and serializable
//! reads through every proxy); kept leases. Partway through, root revokes the role's permission
//! on `perm/` while a dedicated worker (sharing a client with two writers) puts and reads there.
//!
//! 1. No operation of any client ever fails with an auth-token error
//!    ([`etcdv3::Error::is_auth_token_error`]: invalid token, old auth revision, no user):
//!    expired and forgotten tokens are renewed transparently, by unary requests, watches and
//!    lease keepers alike. No operation on `chaos/` is ever refused with `PermissionDenied`.
//! 2. Every acknowledged put is in the store with its value at its acknowledged revision,
//!    applied once (after the writer's previous one, for a sequential writer); a put that
//!    failed with an error that is *not* indeterminate was not applied; nothing is in the store
//!    that was never attempted; every revision of the run is one such put; no put returned
//!    (much) later than its deadline.
//! 3. Every watcher sees every revision of `chaos/` from its start to the last one exactly
//!    once, in order, with the store's content, within a bounded time after the healing.
//! 4. Kept leases (faults all shorter than their TTL) are never reported lost; their keys
//!    are there and the leases alive on the server.
//! 5. Reads count exactly the keys of their revision, a linearizable one is never older than
//!    a put acknowledged before it began, and the reader never goes back in revision.
//! 6. The revocation takes effect and only there: no `perm/` operation that ended before it
//!    was sent is refused; none begun after it was acknowledged succeeds (no such put is in the
//!    store); the worker is refused with `PermissionDenied` within a bounded time.
//!
//! `CHAOS_SEED=<n>` replays a schedule (named in every failure message); `CHAOS_SECS=<n>`
//! changes the length of the fault window (default 14 s); `CHAOS_VERBOSE=1` prints every
//! workload error as it happens; `CHAOS_DOZY=0` leaves out the dozy watcher (its client
//! still keeps a lease), to check the rest while a failure of that watcher is looked into. Writes pause around each SIGKILL: etcd 3.5.0-3.5.2 can lose
//! an applied entry when killed in the middle of applying it (etcd issue 13766).

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use common::chaos::{self, Fault, Step, ms};
use common::checks::{self, Attempt, Failure, Seen, failure};
use etcdv3::testkit::{EtcdCluster, FaultProxy};
use etcdv3::{Client, Error, ErrorKind, KeyValue, OrderingGuard, Permission};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::RwLock;

const PREFIX: &str = "chaos/";
/// The prefix whose permission is revoked mid-run.
const PERM_PREFIX: &str = "perm/";
const USER: &str = "app";
const PASSWORD: &str = "apppw";
const ROLE: &str = "app";
/// The simple tokens' TTL (`--auth-token-ttl`), in seconds.
const TOKEN_TTL: u64 = 3;
const DEFAULT_SEED: u64 = 20_250_611;
const DEFAULT_WINDOW_SECS: u64 = 14;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// Longer than any fault of the schedule plus the time to notice it and fail over.
const LEASE_TTL: i64 = 10;
const MAX_PUTS_PER_WRITER: usize = 10_000;
/// The napper's bursts: how many, how many puts each.
const MAX_BURSTS: usize = 20;
const BURST: usize = 6;
const MAX_PERM_OPS: usize = 5_000;
/// How long the watchers may take to reach the last revision once everything is healed.
const CATCH_UP: Duration = Duration::from_secs(15);
/// How long after the healing the permission worker may go on waiting for its refusal.
const DENIAL_GRACE: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// The schedule (`common::chaos`, as chaos_kv's).

/// The seeded plan: the fault steps, and when (after the start of the window) root revokes
/// the permission on `perm/`.
#[derive(Debug)]
struct Plan {
    steps: Vec<Step>,
    revoke_at: Duration,
}

fn plan(seed: u64, window: Duration) -> Plan {
    let mut rng = StdRng::seed_from_u64(seed);
    let steps = chaos::schedule(&mut rng, window);
    // Somewhere in the middle of the window, with faults before and after it.
    let revoke_at = window.mul_f64(rng.random_range(0.3..0.6));
    Plan { steps, revoke_at }
}

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

// ---------------------------------------------------------------------------------------------
// Clients and shared state.

/// A client logged in as `user`, with short keep-alives (a paused member is noticed within
/// 2 s) and deadlines.
async fn login(endpoints: Vec<String>, user: &str, password: &str, guard: bool) -> Client {
    let mut b = Client::builder(endpoints)
        .user(user, password)
        .request_timeout(REQUEST_TIMEOUT)
        .connect_timeout(Duration::from_secs(1))
        .keep_alive_interval(Duration::from_secs(1))
        .keep_alive_timeout(Duration::from_secs(1));
    if guard {
        b = b.ordering_guard(OrderingGuard::RetryElsewhere);
    }
    b.connect()
        .await
        .unwrap_or_else(|e| panic!("log in as {user}: {e:?}"))
}

async fn app_client(endpoints: Vec<String>) -> Client {
    login(endpoints, USER, PASSWORD, false).await
}

/// What the workers share with the schedule.
struct Ctl {
    t0: Instant,
    verbose: bool,
    /// Set once everything is healed: the workers stop.
    stop: AtomicBool,
    /// Held for reading around each write, for writing around each SIGKILL.
    gate: RwLock<()>,
    /// The highest revision acknowledged to any writer so far.
    acked_max: AtomicI64,
    /// When the revocation of `perm/` was first sent, and when it was acknowledged.
    revoke_sent: OnceLock<Instant>,
    revoke_acked: OnceLock<Instant>,
    /// Errors that must never happen: auth-token errors anywhere, `PermissionDenied` on
    /// `chaos/`.
    violations: Mutex<Vec<String>>,
}

impl Ctl {
    /// Looks at an error of `who` (an operation on `chaos/` when `main`): an auth-token error
    /// is a violation anywhere, a refusal on the main prefix too.
    fn saw(&self, who: &str, e: &Error, main: bool) {
        if self.verbose {
            eprintln!("[{:>7.2?}] {who}: {e:?}", self.t0.elapsed());
        }
        let bad = if e.is_auth_token_error() {
            Some("an auth-token error")
        } else if main && e.kind() == ErrorKind::PermissionDenied {
            Some("a permission refusal on the main prefix")
        } else {
            None
        };
        if let Some(what) = bad {
            self.violations.lock().unwrap().push(format!(
                "{who} failed at {:?} with {what}: {e:?}",
                self.t0.elapsed()
            ));
        }
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Sleep `d`, waking early when told to stop; false once stopped.
    async fn nap(&self, d: Duration) -> bool {
        let until = Instant::now() + d;
        while !self.stopped() {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return true;
            }
            tokio::time::sleep(left.min(ms(100))).await;
        }
        false
    }
}

// ---------------------------------------------------------------------------------------------
// Writers.

/// One put of `key`, recorded.
async fn put_once(
    who: &str,
    c: &Client,
    key: String,
    value: String,
    timeout: Duration,
    ctl: &Ctl,
) -> Attempt {
    let began = Instant::now();
    let r = c
        .kv()
        .put(key.clone(), value.clone())
        .timeout(timeout)
        .await;
    let took = began.elapsed();
    match &r {
        Ok(r) => {
            ctl.acked_max.fetch_max(r.header.revision, Ordering::SeqCst);
        }
        Err(e) => ctl.saw(&format!("writer {who} putting {key}"), e, true),
    }
    Attempt {
        at: began - ctl.t0,
        took,
        timeout,
        key,
        value,
        outcome: r.map(|r| r.header.revision).map_err(|e| failure(&e)),
    }
}

/// Puts unique keys `chaos/<name>/<i>` one after the other until told to stop.
async fn write_loop(name: String, c: Client, timeout: Duration, ctl: Arc<Ctl>) -> Vec<Attempt> {
    let mut out = Vec::new();
    for i in 0..MAX_PUTS_PER_WRITER {
        if ctl.stopped() {
            break;
        }
        let a = {
            // No put is in flight while a member is killed (see the module's doc).
            let _pass = ctl.gate.read().await;
            put_once(
                &name,
                &c,
                format!("{PREFIX}{name}/{i:05}"),
                format!("{name}-{i}"),
                timeout,
                &ctl,
            )
            .await
        };
        let failed = a.outcome.is_err();
        out.push(a);
        if failed {
            // Errors can come fast (every endpoint refused): do not spin.
            tokio::time::sleep(ms(20)).await;
        }
    }
    out
}

/// Stays idle for longer than the token TTL (so its token expires on every member), then puts
/// a burst of keys `chaos/napper/<i>` concurrently, until told to stop. Returns the attempts
/// in key order.
async fn nap_loop(c: Client, seed: u64, ctl: Arc<Ctl>) -> Vec<Attempt> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x6e61_7070);
    let mut out = Vec::new();
    for burst in 0..MAX_BURSTS {
        let idle = ms(TOKEN_TTL * 1000 + rng.random_range(1200..2500));
        if !ctl.nap(idle).await {
            break;
        }
        let _pass = ctl.gate.read().await;
        let puts = (0..BURST).map(|j| {
            let i = burst * BURST + j;
            put_once(
                "napper",
                &c,
                format!("{PREFIX}napper/{i:05}"),
                format!("napper-{i}"),
                REQUEST_TIMEOUT,
                &ctl,
            )
        });
        out.extend(futures::future::join_all(puts).await);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The reader.

/// One successful read of the reader.
#[derive(Debug)]
struct Read {
    began: Duration,
    serializable: bool,
    revision: i64,
    count: i64,
}

#[derive(Debug, Default)]
struct Reads {
    reads: Vec<Read>,
    violations: Vec<String>,
    errors: BTreeMap<String, usize>,
}

/// Counts the prefix, linearizable and serializable reads in turn, until told to stop. A
/// linearizable read must not be older than a put acknowledged before it began, and this
/// client's reads never go back in revision (its ordering guard sends a lagging serializable
/// read elsewhere). The counts are checked against the final store.
async fn read_loop(c: Client, ctl: Arc<Ctl>) -> Reads {
    let mut out = Reads::default();
    let mut last = 0;
    let mut i = 0u64;
    while !ctl.stopped() {
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
                if !serializable && rev < floor {
                    out.violations.push(format!(
                        "linearizable read begun at {began:?} answered at revision {rev}, \
                         before a put acknowledged earlier at {floor}"
                    ));
                }
                if rev < last {
                    out.violations.push(format!(
                        "read begun at {began:?} (serializable: {serializable}) answered at \
                         revision {rev}, after a read of this client at {last}"
                    ));
                }
                last = last.max(rev);
                out.reads.push(Read {
                    began,
                    serializable,
                    revision: rev,
                    count: r.count,
                });
            }
            Err(e) => {
                ctl.saw("the reader", &e, true);
                *out.errors.entry(format!("{:?}", e.kind())).or_default() += 1;
            }
        }
        tokio::time::sleep(ms(10)).await;
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The permission change.

/// One operation of the permission worker on `perm/`.
#[derive(Debug)]
struct PermOp {
    began: Instant,
    ended: Instant,
    /// The key of a put; `None` for a linearizable read of the prefix.
    put: Option<String>,
    /// The revision of the answer, or the failure.
    outcome: Result<i64, Failure>,
}

/// Puts `perm/<i>` and reads the prefix (linearizable) in turn, until told to stop and, once
/// the permission is revoked, refused for it (or `DENIAL_GRACE` after the stop).
async fn perm_loop(c: Client, ctl: Arc<Ctl>) -> Vec<PermOp> {
    let mut out: Vec<PermOp> = Vec::new();
    let mut stopped_at = None;
    let mut denied = false;
    for i in 0..MAX_PERM_OPS {
        if ctl.stopped() {
            let at = *stopped_at.get_or_insert_with(Instant::now);
            if denied || at.elapsed() >= DENIAL_GRACE {
                break;
            }
        }
        let put = i.is_multiple_of(2);
        let began = Instant::now();
        let (key, r) = if put {
            let key = format!("{PERM_PREFIX}{i:05}");
            let _pass = ctl.gate.read().await;
            let r = c
                .kv()
                .put(key.clone(), "p")
                .await
                .map(|r| r.header.revision);
            (Some(key), r)
        } else {
            let r = c
                .kv()
                .get(PERM_PREFIX)
                .prefix()
                .count_only()
                .await
                .map(|r| r.header.revision);
            (None, r)
        };
        if let Err(e) = &r {
            ctl.saw(&format!("the permission worker ({key:?})"), e, false);
            if e.kind() == ErrorKind::PermissionDenied
                && ctl.revoke_acked.get().is_some_and(|t| began > *t)
            {
                denied = true;
            }
        }
        let failed = r.is_err();
        out.push(PermOp {
            began,
            ended: Instant::now(),
            put: key,
            outcome: r.map_err(|e| failure(&e)),
        });
        tokio::time::sleep(if failed { ms(40) } else { ms(15) }).await;
    }
    out
}

/// At `at` after the window's start, revoke the role's permission on `perm/` as root; retried
/// until answered (`PermissionNotGranted`: an earlier attempt whose answer was lost applied
/// it). Records when it was first sent and when acknowledged.
async fn revoke(root: Client, at: Duration, ctl: Arc<Ctl>) {
    tokio::time::sleep_until((ctl.t0 + at).into()).await;
    let give_up = Instant::now() + Duration::from_secs(30);
    loop {
        let r = {
            let _pass = ctl.gate.read().await;
            let _ = ctl.revoke_sent.set(Instant::now());
            root.auth()
                .role_revoke_permission(ROLE, PERM_PREFIX)
                .prefix()
                .await
        };
        match r {
            Ok(_) => break,
            Err(e) if e.kind() == ErrorKind::PermissionNotGranted => break,
            Err(e) => {
                ctl.saw("root revoking perm/", &e, false);
                assert!(
                    Instant::now() < give_up,
                    "the revocation did not get through in 30 s: {e:?}"
                );
                tokio::time::sleep(ms(100)).await;
            }
        }
    }
    let _ = ctl.revoke_acked.set(Instant::now());
    eprintln!("[{:>7.2?}] perm/ revoked", ctl.t0.elapsed());
}

// ---------------------------------------------------------------------------------------------
// Watchers.

/// How a watcher's consumer reads, until the `fast` flag is set (at the healing).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Pace {
    /// As fast as it can.
    Eager,
    /// A small buffer, and a short rest every 16 batches: paused and resumed often.
    Slow,
    /// A small buffer, and a rest longer than the token TTL every 8 batches: paused for
    /// that long, then resumed with a create on a stream whose token has (most likely)
    /// expired on its member meanwhile.
    Dozy,
}

/// A watcher on the prefix from `start`, read by its own task into a [`Seen`], at `pace`.
async fn spawn_watcher(
    c: &Client,
    start: i64,
    pace: Pace,
    fast: Arc<AtomicBool>,
) -> (Arc<Mutex<Seen>>, tokio::task::JoinHandle<()>) {
    let mut b = c.watch(PREFIX).prefix().start_revision(start);
    if pace != Pace::Eager {
        b = b.buffer(4);
    }
    let mut w = b.await.expect("create a watcher");
    let seen = Arc::new(Mutex::new(Seen::default()));
    let out = seen.clone();
    let task = tokio::spawn(async move {
        let mut batches = 0u64;
        loop {
            batches += 1;
            match pace {
                Pace::Slow if batches.is_multiple_of(16) && !fast.load(Ordering::Relaxed) => {
                    tokio::time::sleep(ms(20)).await;
                }
                Pace::Dozy if batches.is_multiple_of(8) => {
                    let until = Instant::now() + Duration::from_millis(TOKEN_TTL * 1000 + 1500);
                    while !fast.load(Ordering::Relaxed) && Instant::now() < until {
                        tokio::time::sleep(ms(50)).await;
                    }
                }
                _ => {}
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
                    s.end = Some(format!(
                        "failed with {:?} (an auth-token error: {}): {e:?}",
                        e.kind(),
                        e.is_auth_token_error()
                    ));
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

/// How many Authenticate RPCs the member at `addr` has started since it (re)started, from its
/// Prometheus metrics (for the report: tokens were renewed, many times).
async fn authenticate_calls(addr: std::net::SocketAddr) -> u64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let text = tokio::time::timeout(Duration::from_secs(5), async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        let req = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.ok()?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await.ok()?;
        Some(String::from_utf8_lossy(&raw).into_owned())
    })
    .await
    .ok()
    .flatten()
    .unwrap_or_default();
    text.lines()
        .filter(|l| {
            l.starts_with("grpc_server_started_total{")
                && l.contains("grpc_method=\"Authenticate\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.trim().parse::<f64>().ok())
        .sum::<f64>() as u64
}

// ---------------------------------------------------------------------------------------------
// The test.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_faults_under_token_auth_never_surface_an_auth_error_nor_lose_a_write() {
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
    let verbose = std::env::var("CHAOS_VERBOSE").is_ok_and(|v| v == "1");
    let with_dozy = std::env::var("CHAOS_DOZY").map_or(true, |v| v != "0");
    let ctx = format!("chaos_auth seed {seed} (rerun with CHAOS_SEED={seed})");
    let started = Instant::now();
    let plan = plan(seed, window);

    let cluster = EtcdCluster::builder()
        .members(3)
        // The clients ping every second.
        .arg("--grpc-keepalive-min-time=500ms")
        .arg("--auth-token=simple")
        .arg(format!("--auth-token-ttl={TOKEN_TTL}"))
        .start_async()
        .await
        .unwrap_or_else(|e| panic!("could not start a 3-member etcd cluster: {e}"));
    eprintln!(
        "{ctx}: etcd {}, window {window:?}, token TTL {TOKEN_TTL} s, revoke at {:?}, {} steps",
        cluster.version(),
        plan.revoke_at,
        plan.steps.len()
    );
    for (i, step) in plan.steps.iter().enumerate() {
        eprintln!("  step {i}: after {:?}: {:?}", step.pause, step.faults);
    }

    // Users and roles, then auth on.
    {
        let anon = common::client(&cluster).await;
        let auth = anon.auth();
        auth.user_add("root", "rootpw").await.unwrap();
        auth.user_grant_role("root", "root").await.unwrap();
        auth.role_add(ROLE).await.unwrap();
        for prefix in [PREFIX, PERM_PREFIX] {
            auth.role_grant_permission(ROLE, Permission::read_write(prefix).prefix())
                .await
                .unwrap();
        }
        auth.user_add(USER, PASSWORD).await.unwrap();
        auth.user_grant_role(USER, ROLE).await.unwrap();
        auth.enable().await.unwrap();
    }

    let mut proxies = Vec::new();
    for i in 0..3 {
        proxies.push(FaultProxy::start(cluster.client_addr(i)).await.unwrap());
    }
    let proxy_endpoints: Vec<String> = proxies.iter().map(FaultProxy::endpoint).collect();
    // Direct to every member; through every proxy; through the proxy of member 1 only;
    // straight to member 2 alone (while it is down, its puts fail without leaving it).
    let direct = app_client(cluster.endpoints()).await;
    let proxied = app_client(proxy_endpoints.clone()).await;
    let single = app_client(vec![proxy_endpoints[1].clone()]).await;
    let pinned = app_client(vec![cluster.endpoint(2)]).await;
    let napper = app_client(proxy_endpoints.clone()).await;
    // Only a watcher and a kept lease: nothing else uses (and so refreshes) its token.
    let dozy = app_client(proxy_endpoints.clone()).await;
    let root = login(cluster.endpoints(), "root", "rootpw", false).await;

    // History starts here: every later revision is a put of a new key under a prefix.
    let start = direct
        .kv()
        .put(format!("{PREFIX}seed"), seed.to_string())
        .await
        .unwrap()
        .header
        .revision;
    // Kept leases, each with a key.
    let mut leases = Vec::new();
    for (name, c) in [
        ("direct", &direct),
        ("proxied", &proxied),
        ("single", &single),
        ("dozy", &dozy),
    ] {
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
    for (name, c, pace) in [
        ("direct", &direct, Pace::Eager),
        ("proxied", &proxied, Pace::Eager),
        ("single", &single, Pace::Eager),
        ("pinned", &pinned, Pace::Eager),
        ("slow", &proxied, Pace::Slow),
        ("dozy", &dozy, Pace::Dozy),
    ] {
        if pace == Pace::Dozy && !with_dozy {
            continue;
        }
        let (seen, task) = spawn_watcher(c, start, pace, fast.clone()).await;
        watchers.push((name, seen, task));
    }

    let t0 = Instant::now();
    let ctl = Arc::new(Ctl {
        t0,
        verbose,
        stop: AtomicBool::new(false),
        gate: RwLock::new(()),
        acked_max: AtomicI64::new(0),
        revoke_sent: OnceLock::new(),
        revoke_acked: OnceLock::new(),
        violations: Mutex::new(Vec::new()),
    });
    // Writers, one put at a time each: two share the proxied client (with the permission
    // worker); "hasty" gives each put 300 ms (re-authentications included); "pinned" 1 s.
    let writers: Vec<_> = [
        ("direct", &direct, REQUEST_TIMEOUT),
        ("hasty", &direct, ms(300)),
        ("proxied0", &proxied, REQUEST_TIMEOUT),
        ("proxied1", &proxied, REQUEST_TIMEOUT),
        ("single", &single, REQUEST_TIMEOUT),
        ("pinned", &pinned, Duration::from_secs(1)),
    ]
    .into_iter()
    .map(|(name, c, timeout)| {
        let task = tokio::spawn(write_loop(name.to_owned(), c.clone(), timeout, ctl.clone()));
        (name, task)
    })
    .collect();
    let nap_task = tokio::spawn(nap_loop(napper.clone(), seed, ctl.clone()));
    let reader = login(proxy_endpoints.clone(), USER, PASSWORD, true).await;
    let reader = tokio::spawn(read_loop(reader, ctl.clone()));
    let perm_task = tokio::spawn(perm_loop(proxied.clone(), ctl.clone()));
    let revoker = tokio::spawn(revoke(root.clone(), plan.revoke_at, ctl.clone()));

    // The faults, one step at a time; halfway, one more watcher joins from the start.
    for (i, step) in plan.steps.iter().enumerate() {
        tokio::time::sleep(step.pause).await;
        if i == plan.steps.len() / 2 {
            let (seen, task) = spawn_watcher(&proxied, start, Pace::Eager, fast.clone()).await;
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

    // Heal everything, then stop the workers.
    for p in &proxies {
        p.pass();
    }
    cluster
        .wait_all_healthy_async(Duration::from_secs(20))
        .await
        .unwrap_or_else(|e| panic!("{ctx}: the cluster did not heal: {e}"));
    let healed = Instant::now();
    eprintln!("[{:>7.2?}] healed", t0.elapsed());
    tokio::time::timeout(Duration::from_secs(35), revoker)
        .await
        .unwrap_or_else(|_| panic!("{ctx}: the revocation did not finish"))
        .unwrap_or_else(|e| panic!("{ctx}: the revocation failed: {e}"));
    ctl.stop.store(true, Ordering::Relaxed);
    fast.store(true, Ordering::Relaxed);
    let mut attempts: BTreeMap<&str, (bool, Vec<Attempt>)> = BTreeMap::new();
    for (name, task) in writers {
        // A put in flight ends by its deadline.
        let a = tokio::time::timeout(Duration::from_secs(15), task)
            .await
            .unwrap_or_else(|_| panic!("{ctx}: writer {name} did not stop within 15 s"))
            .unwrap();
        attempts.insert(name, (false, a));
    }
    let napped = tokio::time::timeout(Duration::from_secs(15), nap_task)
        .await
        .unwrap_or_else(|_| panic!("{ctx}: the napper did not stop within 15 s"))
        .unwrap();
    attempts.insert("napper", (true, napped));
    let reads = tokio::time::timeout(Duration::from_secs(15), reader)
        .await
        .unwrap_or_else(|_| panic!("{ctx}: the reader did not stop within 15 s"))
        .unwrap();
    let perm_ops = tokio::time::timeout(DENIAL_GRACE + Duration::from_secs(10), perm_task)
        .await
        .unwrap_or_else(|_| panic!("{ctx}: the permission worker did not stop"))
        .unwrap();

    if !checks::members_agree(&ctx, &cluster, &root).await {
        return;
    }

    // ---- Invariant 1: no auth-token error, no refusal on the main prefix. ----
    {
        let v = ctl.violations.lock().unwrap();
        assert!(
            v.is_empty(),
            "{ctx}: {} operations failed with an error the client must never surface here \
             (the first ones): {:#?}",
            v.len(),
            &v[..v.len().min(8)]
        );
    }

    // ---- Invariant 2: acknowledged puts are there, at their revision, applied once. ----
    let all = root.kv().get(PREFIX).prefix().await.unwrap();
    let final_rev = all.header.revision;
    let perm_all = root
        .kv()
        .get(PERM_PREFIX)
        .prefix()
        .revision(final_rev)
        .await
        .unwrap();
    let store: HashMap<String, KeyValue> = all
        .kvs
        .iter()
        .chain(&perm_all.kvs)
        .map(|kv| (kv.key_str().unwrap().to_owned(), kv.clone()))
        .collect();
    let mut acked_revs = HashSet::new();
    let mut samples = Vec::new();
    for (name, (concurrent, list)) in &attempts {
        let line = checks::check_writer(
            &ctx,
            name,
            list,
            !concurrent,
            &store,
            &mut acked_revs,
            &mut samples,
        );
        eprintln!("  {line}");
    }
    // Nothing in the store that was never attempted.
    let attempted: HashSet<&str> = perm_ops
        .iter()
        .filter_map(|o| o.put.as_deref())
        .chain(
            attempts
                .values()
                .flat_map(|(_, l)| l.iter().map(|a| a.key.as_str())),
        )
        .chain(leases.iter().map(|(_, _, k)| k.as_str()))
        .collect();
    for key in store.keys() {
        let known = *key == format!("{PREFIX}seed") || attempted.contains(key.as_str());
        assert!(known, "{ctx}: {key} is in the store but was never written");
    }
    // Reads at the acknowledged revision see the value; just before it, nothing.
    checks::check_samples(&ctx, &root, &samples).await;
    // Every revision of the history is one put of a new key under one of the prefixes.
    let by_rev: BTreeMap<i64, &KeyValue> =
        store.values().map(|kv| (kv.mod_revision(), kv)).collect();
    assert_eq!(by_rev.len(), store.len(), "{ctx}: two keys at one revision");
    assert_eq!(
        by_rev.keys().copied().collect::<Vec<_>>(),
        (start..=final_rev).collect::<Vec<_>>(),
        "{ctx}: the store's revisions are not exactly {start}..={final_rev}"
    );
    // The revisions of the main prefix, in order.
    let main_revs: Vec<i64> = by_rev
        .iter()
        .filter(|(_, kv)| kv.key_str().unwrap().starts_with(PREFIX))
        .map(|(r, _)| *r)
        .collect();
    let last_main = *main_revs.last().unwrap();

    // ---- Invariant 5: reads were consistent and never went back in time. ----
    let mut bad_reads = reads.violations.clone();
    for r in &reads.reads {
        let want = main_revs.partition_point(|m| *m <= r.revision) as i64;
        if r.count != want {
            bad_reads.push(format!(
                "read begun at {:?} (serializable: {}) counted {} keys at revision {} ({want} \
                 expected)",
                r.began, r.serializable, r.count, r.revision
            ));
        }
    }
    let linearizable = reads.reads.iter().filter(|r| !r.serializable).count();
    eprintln!(
        "  reader: {linearizable} linearizable, {} serializable reads; errors {:?}",
        reads.reads.len() - linearizable,
        reads.errors
    );
    assert!(
        bad_reads.is_empty(),
        "{ctx}: {} reads broke an invariant, the first ones: {:#?}",
        bad_reads.len(),
        &bad_reads[..bad_reads.len().min(5)]
    );
    assert!(linearizable > 0, "{ctx}: no linearizable read succeeded");

    // ---- Invariant 6: the revocation took effect, and only from when it was made. ----
    let revoke_sent = *ctl.revoke_sent.get().unwrap();
    let revoke_acked = *ctl.revoke_acked.get().unwrap();
    let (mut before_ok, mut after_denied, mut perm_errors) = (0, 0, BTreeMap::new());
    let mut first_denial = None;
    for op in &perm_ops {
        let what = match &op.put {
            Some(k) => format!("put {k}"),
            None => "linearizable read".to_owned(),
        };
        let at = op.began - t0;
        if let Err((kind, indeterminate, _)) = &op.outcome {
            *perm_errors
                .entry(format!("{kind:?}{}", if *indeterminate { "?" } else { "" }))
                .or_insert(0) += 1;
        }
        if op.ended < revoke_sent {
            if let Err((kind, _, msg)) = &op.outcome {
                assert!(
                    *kind != ErrorKind::PermissionDenied,
                    "{ctx}: perm/ {what} begun at {at:?} refused before the revocation was \
                     sent: {msg}"
                );
            } else {
                before_ok += 1;
            }
        }
        if op.began > revoke_acked {
            match &op.outcome {
                Ok(rev) => panic!(
                    "{ctx}: perm/ {what} begun at {at:?}, after the revocation was \
                     acknowledged, succeeded at revision {rev}"
                ),
                Err((ErrorKind::PermissionDenied, ..)) => {
                    after_denied += 1;
                    first_denial.get_or_insert(op.ended);
                }
                Err(_) => {}
            }
            if let Some(k) = &op.put {
                assert!(
                    !store.contains_key(k),
                    "{ctx}: perm/ {what} begun at {at:?}, after the revocation was \
                     acknowledged, is in the store: {:?}",
                    store[k]
                );
            }
        }
        if let (Some(k), Ok(rev)) = (&op.put, &op.outcome) {
            let kv = store
                .get(k)
                .unwrap_or_else(|| panic!("{ctx}: acknowledged perm/ put {k} at {rev} was lost"));
            assert_eq!(kv.mod_revision(), *rev, "{ctx}: {k}");
        }
        if let (Some(k), Err((_, false, msg))) = (&op.put, &op.outcome) {
            assert!(
                !store.contains_key(k),
                "{ctx}: perm/ put {k} failed with an error that is not indeterminate ({msg}), \
                 yet it was applied"
            );
        }
    }
    eprintln!(
        "  permission worker: {} operations, {before_ok} succeeded before the revocation \
         (sent at {:?}, acknowledged at {:?}), {after_denied} refused after it, first refusal \
         {:?} after the acknowledgement; errors {perm_errors:?}",
        perm_ops.len(),
        revoke_sent - t0,
        revoke_acked - t0,
        first_denial.map(|d: Instant| d - revoke_acked)
    );
    assert!(
        before_ok > 0,
        "{ctx}: no perm/ operation succeeded before the revocation"
    );
    assert!(
        after_denied > 0,
        "{ctx}: the permission worker was never refused after the revocation (it ran until \
         {DENIAL_GRACE:?} after the healing)"
    );

    // ---- Invariant 3: every watcher saw every revision once, in order, bounded. ----
    let stats = || {
        format!(
            "direct {:?}, proxied {:?}, single {:?}, pinned {:?}, dozy {:?}",
            direct.watch_stats(),
            proxied.watch_stats(),
            single.watch_stats(),
            pinned.watch_stats(),
            dozy.watch_stats()
        )
    };
    checks::wait_caught_up(&ctx, &watchers, last_main, healed + CATCH_UP, stats).await;
    eprintln!(
        "[{:>7.2?}] watchers caught up to {last_main}; watch stats: {}",
        t0.elapsed(),
        stats()
    );
    // The watchers' and the leases' failures, reported together.
    let mut failed = Vec::new();
    for (name, seen, task) in &watchers {
        task.abort();
        let s = seen.lock().unwrap();
        failed.extend(checks::watcher_fault(name, &s, &main_revs, &by_rev));
    }

    // ---- Invariant 4: the kept leases were never lost, their keys are there. ----
    for (name, kept, key) in &leases {
        if let Some(lost) = kept.lost_reason() {
            failed.push(format!(
                "the lease kept through {name} was reported lost ({lost:?}): {:?}",
                kept.status()
            ));
        }
        match store.get(key) {
            Some(kv) if kv.lease() == kept.id() => {}
            other => failed.push(format!(
                "the key {key} of the lease kept through {name} is not attached to it: {other:?}"
            )),
        }
        let ttl = root.lease().time_to_live(kept.id()).await.unwrap();
        if ttl.ttl <= 0 {
            failed.push(format!(
                "the lease kept through {name} is gone on the server: {ttl:?}"
            ));
        }
    }
    let mut authentications = Vec::new();
    for i in 0..3 {
        authentications.push(authenticate_calls(cluster.client_addr(i)).await);
    }
    eprintln!("  Authenticate calls per member since its last start: {authentications:?}");
    eprintln!(
        "[{:>7.2?}] {ctx}: {} revisions checked ({} under {PREFIX}); lease keeper streams \
         opened: direct {}, proxied {}, single {}, dozy {}; whole test {:?}",
        t0.elapsed(),
        final_rev - start + 1,
        main_revs.len(),
        direct.lease().keeper_streams_opened(),
        proxied.lease().keeper_streams_opened(),
        single.lease().keeper_streams_opened(),
        dozy.lease().keeper_streams_opened(),
        started.elapsed()
    );
    assert!(failed.is_empty(), "{ctx}: {failed:#?}");
}
