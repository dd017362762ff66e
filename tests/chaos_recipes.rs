//! Chaos for the concurrency recipes against a real 3-member etcd (testkit, never a mock).
//!
//! A seeded fault schedule (SIGSTOP/SIGCONT of a member or of the raft leader, a member
//! restart, fault-proxy cuts, proxy blackholes longer than a session's TTL, a lock holder or
//! leader stalled behind a blackholed proxy until its session expires, a waiter that gives up
//! its `lock()` / `campaign()` just as its proxy is cut) runs while
//!
//! - Mutex contenders (separate clients, two of them reaching etcd only through a fault proxy
//!   in front of one member; sessions of 2–3 s) lock, increment a shared counter with a guarded
//!   transaction (the holder's `is_owner()` compare, then a nested compare of the counter's
//!   mod revision read under the lock) and unlock;
//! - Election campaigners (short sessions, two of them proxied) campaign, proclaim and resign,
//!   followed by an observer.
//!
//! Safety is then checked against etcd's own history of the keys (a watch from the run's first
//! revision, read once the cluster is healthy again):
//!
//! - mutex: every guarded increment that etcd applied was made while its writer's key was the
//!   owner (the lowest create revision under the prefix) and follows the previous value by one;
//!   none found the counter changed since its read under the lock; the counter ends at the
//!   acknowledged increments plus at most the indeterminate ones, every acknowledged one applied
//!   and none that the client called failed-before-sending; fencing revisions strictly increase
//!   from holding to holding; every `lock()` that returned `Ok` really was the owner at some
//!   revision (a lost session never yields a silent "locked"), and a `lock()` whose session was
//!   lost ends promptly; a `lock()` given up (its future dropped) leaves no key in the queue;
//! - election: the observer reports exactly etcd's sequence of leader states (each leader and
//!   each of its values, in order, none skipped or repeated, so no two leaders at one revision
//!   and each one really leading when reported); every won campaign and every proclamation was
//!   the leader's as etcd saw it; a leader whose session was lost no longer considers itself
//!   leader and its key stops leading; a `campaign()` given up leaves no key in the queue.
//!
//! The workload pauses (between rounds) around a member restart, and the members' applied
//! indexes are made equal first: etcd 3.5.0–3.5.2 can lose an applied entry when killed
//! mid-apply (etcd issue 13766). At the end the members' KV hashes are compared, so a server
//! divergence is told apart from a client bug.
//!
//! `CHAOS_SEED=<n>` replays a schedule (the seed is printed, and named in every failure);
//! `CHAOS_SECS=<n>` changes the length of the fault window (default 14 s; every kind of fault
//! runs at least once whatever the window); `CHAOS_VERBOSE=1` prints every workload error;
//! `CHAOS_GIVE_UP=0` leaves out the given-up `lock()` / `campaign()` calls.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use etcdv3::testkit::{EtcdCluster, FaultProxy};
use etcdv3::{
    Bytes, Client, Compare, CompareOp, Election, ErrorKind, Event, EventKind, KeyValue, Mutex, Op,
    Session,
};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

const DEFAULT_SEED: u64 = 0x5eed_2024;
const DEFAULT_WINDOW_SECS: u64 = 14;

/// Everything of the mutex workload lives under this prefix (one history watch).
const MX: &str = "/chaos/mx/";
/// The mutex's prefix: lock keys are `/chaos/mx/lock/<lease hex>`.
const LOCK: &str = "/chaos/mx/lock";
const LOCK_KEYS: &str = "/chaos/mx/lock/";
const COUNTER: &str = "/chaos/mx/counter";
const MX_END: &str = "/chaos/mx/~end";
/// Everything of the election workload lives under this prefix.
const EL: &str = "/chaos/el/";
const VOTE: &str = "/chaos/el/vote";
const VOTE_KEYS: &str = "/chaos/el/vote/";
const EL_END: &str = "/chaos/el/~end";

const TTL_DIRECT: i64 = 3;
const TTL_PROXIED: i64 = 2;
/// Longest a `lock()` / `campaign()` may wait (the longest legitimate wait is a partitioned
/// holder's TTL plus a queue of short holdings).
const WAIT_BOUND: Duration = Duration::from_secs(20);
/// How long a `lock()` / `campaign()` may go on after its session was lost.
const LOST_GRACE: Duration = Duration::from_secs(6);
/// How long the key of a given-up `lock()` / `campaign()` may stay queued while its session
/// lives (a leader pause and a new election, if the cleanup is retried).
const GIVE_UP_BOUND: Duration = Duration::from_secs(5);
/// How long an unlock / resign may keep failing while its session is alive.
const RELEASE_BOUND: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// The run's shared state.

struct Run {
    seed: u64,
    started: Instant,
    /// The fault window is over: workers finish their round and stop.
    stop: AtomicBool,
    /// Workers hold it (read) for a round; the schedule takes it (write) to restart a member
    /// with no request of the workload in flight.
    gate: tokio::sync::RwLock<()>,
    violations: StdMutex<Vec<String>>,
    /// A direct client on every member, for checks and history.
    verify: Client,
    /// `CHAOS_VERBOSE=1`: print every error of the workload.
    verbose: bool,
    /// `CHAOS_GIVE_UP=0`: no `lock()` / `campaign()` is given up (no random timeouts, no
    /// [`Fault::GiveUpWhileCut`]).
    give_ups: bool,
    /// A "slow holder" is wanted: the next proxied contender or campaigner to hold the lock or
    /// lead claims `caught` (its proxy's index + 1) and stalls there, so that a blackhole of
    /// its proxy lands while it holds (its guarded write or proclamation then goes out late).
    slow: AtomicBool,
    caught: AtomicUsize,
    /// How long the caught worker stalls, in ms.
    stall_ms: AtomicU64,
    /// [`Fault::GiveUpWhileCut`]: which recipe's next proxied waiter is picked (1 mutex, 2
    /// election, 0 none), the picked one's proxy + 1, its key, and the phase (0 idle, 1
    /// picking, 2 the schedule holds, 3 give up now).
    give_up_kind: AtomicUsize,
    give_up_proxy: AtomicUsize,
    give_up_key: StdMutex<Option<Bytes>>,
    give_up_phase: tokio::sync::watch::Sender<u8>,
}

impl Run {
    fn t(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    fn note(&self, msg: impl AsRef<str>) {
        eprintln!("[{:6.2}s] {}", self.t(), msg.as_ref());
    }

    fn violation(&self, msg: impl Into<String>) {
        let m = format!("[{:6.2}s] {}", self.t(), msg.into());
        eprintln!("VIOLATION (seed {}): {m}", self.seed);
        self.violations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(m);
    }

    fn detail(&self, msg: impl AsRef<str>) {
        if self.verbose {
            self.note(msg);
        }
    }

    /// Called by a proxied worker that holds the lock or leads: stall if a slow holder is
    /// wanted and this worker is the first to claim it.
    async fn maybe_stall(&self, proxy: Option<usize>, who: &str) {
        let Some(p) = proxy else { return };
        if self.slow.load(Ordering::SeqCst)
            && self
                .caught
                .compare_exchange(0, p + 1, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
        {
            let stall = Duration::from_millis(self.stall_ms.load(Ordering::SeqCst));
            self.note(format!(
                "  {who} stalls {stall:?} while holding (behind proxy {p})"
            ));
            tokio::time::sleep(stall).await;
        }
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
}

async fn contender(endpoints: Vec<String>) -> Client {
    Client::builder(endpoints)
        .request_timeout(Duration::from_secs(2))
        .connect_timeout(Duration::from_secs(1))
        .connect()
        .await
        .expect("connect a contender")
}

/// A new session, retried (bounded) while the client's member or proxy is faulty.
async fn new_session(run: &Run, c: &Client, ttl: i64, who: &str) -> Option<Session> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let attempt = Session::new(c).ttl(ttl).into_future();
        if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_secs(3), attempt).await {
            return Some(s);
        }
        if run.stopped() {
            return None;
        }
        if Instant::now() >= deadline {
            run.violation(format!("{who}: no new session within 15 s"));
            return None;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Await a `lock()` / `campaign()`: bounded by [`WAIT_BOUND`], and by [`LOST_GRACE`] once the
/// session is lost (the wait must then end with an error). `None` after a violation (the
/// future is dropped, which cancels the attempt); otherwise the result and whether the
/// session was reported lost before it came.
async fn wait_recipe<T>(
    run: &Run,
    session: &Session,
    fut: impl Future<Output = T>,
    what: &str,
) -> Option<(T, bool)> {
    let lost = session.done();
    tokio::pin!(fut);
    tokio::select! {
        r = &mut fut => Some((r, false)),
        reason = lost => match tokio::time::timeout(LOST_GRACE, &mut fut).await {
            Ok(r) => Some((r, true)),
            Err(_) => {
                run.violation(format!(
                    "{what}: still waiting {LOST_GRACE:?} after its session was lost ({reason:?})"
                ));
                None
            }
        },
        _ = tokio::time::sleep(WAIT_BOUND) => {
            run.violation(format!("{what}: no answer within {WAIT_BOUND:?}"));
            None
        }
    }
}

/// `fut`, given up (dropped) when `give_up` resolves first: `None` then.
async fn unless_given_up<T>(
    give_up: impl Future<Output = ()>,
    fut: impl Future<Output = T>,
) -> Option<T> {
    tokio::select! {
        r = fut => Some(r),
        () = give_up => None,
    }
}

/// When this worker gives up its next `lock()` / `campaign()`: if the schedule's
/// [`Fault::GiveUpWhileCut`] picks it (`kind`: 1 mutex, 2 election; it then first waits, at
/// most 5 s, until the schedule holds the lock or leads), on the schedule's signal; else
/// sometimes after a random time (as a caller with a timeout does); else never.
async fn give_up_when<'a>(
    run: &'a Run,
    w: &Worker,
    kind: usize,
    key: &Bytes,
    rng: &mut StdRng,
    chance: f64,
) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
    if let Some(p) = w.proxy
        && run.give_up_kind.load(Ordering::SeqCst) == kind
        && run
            .give_up_proxy
            .compare_exchange(0, p + 1, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    {
        *run.give_up_key.lock().unwrap_or_else(|p| p.into_inner()) = Some(key.clone());
        let mut phase = run.give_up_phase.subscribe();
        let held = phase.wait_for(|p| *p >= 2);
        let _ = tokio::time::timeout(Duration::from_secs(5), held).await;
        return Box::pin(async move {
            // Never, should the schedule skip the cut.
            if phase.wait_for(|p| *p == 3).await.is_err() {
                std::future::pending::<()>().await;
            }
        });
    }
    if run.give_ups && rng.random_bool(chance) {
        let d = Duration::from_millis(rng.random_range(1..300));
        return Box::pin(tokio::time::sleep(d));
    }
    Box::pin(std::future::pending())
}

/// After a `lock()` / `campaign()` was given up (its future dropped): the key it queued must
/// leave the queue: within [`GIVE_UP_BOUND`] while the session lives (the attempt deletes it),
/// else within the TTL and some slack (the lease takes it). False (after a violation) when the
/// key stayed: the caller then removes it itself.
async fn cancelled_key_goes(run: &Run, session: &Session, key: &Bytes, what: &str) -> bool {
    let lease_bound = Duration::from_secs(session.ttl() as u64 + 6);
    let started = Instant::now();
    let given_up_at = run.t();
    let mut rev_then = None;
    loop {
        if let Ok(r) = run.verify.kv().get(key.clone()).await {
            if r.kvs.is_empty() {
                run.detail(format!(
                    "{what}: given up; its key left the queue after {:?} (session lost: {:?})",
                    started.elapsed(),
                    session.lost_reason()
                ));
                return true;
            }
            rev_then.get_or_insert(r.header.revision);
            let alive = session.is_alive();
            let bound = if alive { GIVE_UP_BOUND } else { lease_bound };
            if started.elapsed() > bound {
                let kv = &r.kvs[0];
                run.violation(format!(
                    "{what} was given up (future dropped) at {given_up_at:.2}s but its key {} \
                     (create revision {}; the store was at revision {rev_then:?} just after \
                     the give-up) is still queued {bound:?} later (session alive: {alive})",
                    show(key),
                    kv.create_revision(),
                ));
                return false;
            }
        }
        if started.elapsed() > lease_bound + Duration::from_secs(10) {
            run.violation(format!("{what}: the check of its key kept failing"));
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Unlock / resign, retried while it fails and the session is alive (bounded). False when the
/// key was left to the lease (session lost, or the release kept failing).
async fn release<F, Fut>(run: &Run, session: &Session, what: &str, mut op: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = etcdv3::Result<()>>,
{
    let deadline = Instant::now() + RELEASE_BOUND;
    loop {
        let err = match op().await {
            Ok(()) => return true,
            Err(e) => e,
        };
        if !session.is_alive() {
            return false;
        }
        if Instant::now() >= deadline {
            run.violation(format!(
                "{what}: kept failing for {RELEASE_BOUND:?} with its session alive (liveness): {err}"
            ));
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn count(map: &mut BTreeMap<String, usize>, e: &etcdv3::Error) {
    let k = format!(
        "{:?}{}",
        e.kind(),
        if e.is_indeterminate() { "?" } else { "" }
    );
    *map.entry(k).or_default() += 1;
}

// ---------------------------------------------------------------------------------------------
// Mutex workload.

#[derive(Default)]
struct MxLog {
    acqs: Vec<Acq>,
    writes: Vec<Write>,
    lock_errors: BTreeMap<String, usize>,
    write_errors: BTreeMap<String, usize>,
    sessions: usize,
    sessions_lost: usize,
    cancelled: usize,
}

struct Acq {
    worker: usize,
    key: Bytes,
    fence: i64,
    /// `lock()` answered Ok after the session had been reported lost.
    after_loss: bool,
}

struct Write {
    worker: usize,
    tag: String,
    fence: i64,
    outcome: WriteOutcome,
}

#[derive(Debug)]
enum WriteOutcome {
    /// Applied at this revision.
    Acked(i64),
    /// The owner compare failed (evaluated at this revision): the lock was lost.
    Fenced(i64),
    /// The owner compare held but the counter had changed since the read under the lock.
    Conflict,
    /// The outcome is unknown.
    Indeterminate,
    /// Failed, and the client says it never reached a server.
    Failed(String),
}

/// A counter value: `n owner-key fence tag`.
fn counter_value(n: u64, key: &Bytes, fence: i64, tag: &str) -> String {
    format!("{n} {} {fence} {tag}", String::from_utf8_lossy(key))
}

struct CounterValue {
    n: u64,
    key: Bytes,
    fence: i64,
    tag: String,
}

fn parse_counter(v: &[u8]) -> Option<CounterValue> {
    let s = std::str::from_utf8(v).ok()?;
    let mut it = s.split(' ');
    Some(CounterValue {
        n: it.next()?.parse().ok()?,
        key: Bytes::from(it.next()?.to_owned()),
        fence: it.next()?.parse().ok()?,
        tag: it.next()?.to_owned(),
    })
}

/// One contender or campaigner: its own client, session TTL, and the proxy it goes through.
struct Worker {
    id: usize,
    client: Client,
    ttl: i64,
    proxy: Option<usize>,
}

async fn mutex_worker(run: Arc<Run>, w: Worker) -> MxLog {
    let (id, c, ttl) = (w.id, w.client.clone(), w.ttl);
    let mut rng = StdRng::seed_from_u64(run.seed.wrapping_mul(31).wrapping_add(100 + id as u64));
    let who = format!("mutex contender {id}");
    let mut log = MxLog::default();
    let mut held: Option<(Session, Mutex)> = None;
    let mut last_fence = 0;
    let mut round = 0u64;
    while !run.stopped() {
        let quiet = run.gate.read().await;
        if run.stopped() {
            break;
        }
        if held.as_ref().is_none_or(|(s, _)| !s.is_alive()) {
            if held.take().is_some() {
                log.sessions_lost += 1;
            }
            let Some(s) = new_session(&run, &c, ttl, &who).await else {
                break;
            };
            run.detail(format!("{who}: new session {:x}", s.lease_id()));
            let m = Mutex::new(&s, LOCK);
            held = Some((s, m));
            log.sessions += 1;
        }
        round += 1;
        let Some((session, mutex)) = held.as_ref() else {
            continue;
        };
        let keep = mutex_round(
            &run,
            &w,
            &who,
            round,
            session,
            mutex,
            &mut last_fence,
            &mut log,
            &mut rng,
        )
        .await;
        if !keep {
            // Left to the lease: a fresh session next round.
            if held.take().is_some_and(|(s, _)| !s.is_alive()) {
                log.sessions_lost += 1;
            }
        }
        drop(quiet);
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..15))).await;
    }
    if let Some((s, _)) = held {
        let _ = tokio::time::timeout(Duration::from_secs(5), s.close()).await;
    }
    log
}

/// One lock / guarded increment / unlock round. False when the session is to be dropped.
#[allow(clippy::too_many_arguments)]
async fn mutex_round(
    run: &Run,
    w: &Worker,
    who: &str,
    round: u64,
    session: &Session,
    mutex: &Mutex,
    last_fence: &mut i64,
    log: &mut MxLog,
    rng: &mut StdRng,
) -> bool {
    let what = format!("{who}: lock() (round {round})");
    let (id, c) = (w.id, &w.client);
    let give_up = give_up_when(run, w, 1, mutex.key(), rng, 0.2).await;
    let fut = unless_given_up(give_up, mutex.lock());
    let Some((res, after_loss)) = wait_recipe(run, session, fut, &what).await else {
        return false;
    };
    let Some(res) = res else {
        log.cancelled += 1;
        if cancelled_key_goes(run, session, mutex.key(), &what).await {
            return true;
        }
        // Unblock the others (unlock deletes the key whoever left it).
        return release(
            run,
            session,
            &format!("{who}: unlock after a give-up"),
            || mutex.unlock(),
        )
        .await;
    };
    if let Err(e) = res {
        count(&mut log.lock_errors, &e);
        run.detail(format!(
            "{what} (lease {:x}, lost: {:?}): {e}",
            session.lease_id(),
            session.lost_reason()
        ));
        if mutex.fencing_revision().is_some() {
            run.violation(format!(
                "{what} failed ({e}) but reports a fencing revision"
            ));
        }
        // The attempt may have left its key (an enqueue whose answer was lost): unlock cleans
        // up after a failed attempt.
        return release(
            run,
            session,
            &format!("{who}: unlock after a failed lock"),
            || mutex.unlock(),
        )
        .await;
    }
    let Some(fence) = mutex.fencing_revision() else {
        run.violation(format!("{what} returned Ok without a fencing revision"));
        return false;
    };
    if fence <= *last_fence {
        run.violation(format!(
            "{what}: fencing revision {fence} not above this contender's previous {}",
            *last_fence
        ));
    }
    *last_fence = fence;
    log.acqs.push(Acq {
        worker: id,
        key: mutex.key().clone(),
        fence,
        after_loss,
    });

    // Guarded read-modify-write of the counter.
    let tag = format!("m{id}-{round}");
    match c.kv().get(COUNTER).await {
        Ok(r) => {
            let Some(cur) = r.kvs.first() else {
                run.violation("the counter is missing");
                return false;
            };
            let Some(n) = parse_counter(cur.value()).map(|v| v.n) else {
                run.violation(format!("unreadable counter value {:?}", cur.value()));
                return false;
            };
            let read_mod = cur.mod_revision();
            // Sometimes dawdle between the read and the write, so that faults land there.
            if rng.random_bool(0.3) {
                tokio::time::sleep(Duration::from_millis(rng.random_range(5..60))).await;
            }
            run.maybe_stall(w.proxy, who).await;
            let value = counter_value(n + 1, mutex.key(), fence, &tag);
            let txn = c
                .kv()
                .txn()
                .when([mutex.is_owner()])
                .and_then([Op::txn()
                    .when([Compare::mod_revision(COUNTER, CompareOp::Equal, read_mod)])
                    .and_then([Op::put(COUNTER, value)])
                    .or_else([Op::get(COUNTER)])])
                .await;
            let outcome = match txn {
                Ok(t) if !t.succeeded => WriteOutcome::Fenced(t.header.revision),
                Ok(t) => match t.responses.first().and_then(|r| r.as_txn()) {
                    Some(inner) if inner.succeeded => WriteOutcome::Acked(t.header.revision),
                    Some(inner) => {
                        let now = inner
                            .responses
                            .first()
                            .and_then(|r| r.as_get())
                            .and_then(|g| g.kvs.first())
                            .map(|kv| {
                                format!(
                                    "{:?} (mod revision {})",
                                    String::from_utf8_lossy(kv.value()),
                                    kv.mod_revision()
                                )
                            })
                            .unwrap_or_else(|| "<missing>".into());
                        run.violation(format!(
                            "MUTUAL EXCLUSION: {who} holds the lock (key {}, fence {fence}; owner \
                             compare held at revision {}) but the counter changed since its read \
                             under the lock (read at mod revision {read_mod}, now {now})",
                            String::from_utf8_lossy(mutex.key()),
                            t.header.revision
                        ));
                        WriteOutcome::Conflict
                    }
                    None => {
                        run.violation(format!("{who}: a nested transaction answered {t:?}"));
                        WriteOutcome::Conflict
                    }
                },
                Err(e) => {
                    count(&mut log.write_errors, &e);
                    run.detail(format!("{who}: guarded increment {tag}: {e}"));
                    if e.is_indeterminate() {
                        WriteOutcome::Indeterminate
                    } else {
                        WriteOutcome::Failed(e.to_string())
                    }
                }
            };
            log.writes.push(Write {
                worker: id,
                tag,
                fence,
                outcome,
            });
        }
        Err(e) => {
            count(&mut log.write_errors, &e);
            run.detail(format!("{who}: reading the counter: {e}"));
        }
    }
    if rng.random_bool(0.3) {
        tokio::time::sleep(Duration::from_millis(rng.random_range(5..40))).await;
    }
    let keep = release(run, session, &format!("{who}: unlock"), || mutex.unlock()).await;
    if keep && mutex.fencing_revision().is_some() {
        run.violation(format!(
            "{who}: unlock() succeeded but the fencing revision remains"
        ));
    }
    keep
}

// ---------------------------------------------------------------------------------------------
// Election workload.

#[derive(Default)]
struct ElLog {
    wins: Vec<Win>,
    proclaims: Vec<Proclaim>,
    campaign_errors: BTreeMap<String, usize>,
    proclaim_errors: BTreeMap<String, usize>,
    sessions: usize,
    leaders_lost: usize,
    cancelled: usize,
}

struct Win {
    worker: usize,
    key: Bytes,
    rev: i64,
}

struct Proclaim {
    worker: usize,
    key: Bytes,
    value: String,
    outcome: ProclaimOutcome,
}

#[derive(Debug, PartialEq)]
enum ProclaimOutcome {
    Acked,
    NotLeader,
    Unknown,
}

async fn election_worker(run: Arc<Run>, w: Worker) -> ElLog {
    let (id, c, ttl) = (w.id, w.client.clone(), w.ttl);
    let mut rng = StdRng::seed_from_u64(run.seed.wrapping_mul(37).wrapping_add(200 + id as u64));
    let who = format!("campaigner {id}");
    let mut log = ElLog::default();
    let mut held: Option<(Session, Election)> = None;
    let mut round = 0u64;
    while !run.stopped() {
        let quiet = run.gate.read().await;
        if run.stopped() {
            break;
        }
        if held.as_ref().is_none_or(|(s, _)| !s.is_alive()) {
            held = None;
            let Some(s) = new_session(&run, &c, ttl, &who).await else {
                break;
            };
            run.detail(format!("{who}: new session {:x}", s.lease_id()));
            let e = Election::new(&s, VOTE);
            held = Some((s, e));
            log.sessions += 1;
        }
        round += 1;
        let Some((session, election)) = held.as_ref() else {
            continue;
        };
        let keep =
            election_round(&run, &w, &who, round, session, election, &mut log, &mut rng).await;
        if !keep {
            held = None;
        }
        drop(quiet);
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..30))).await;
    }
    if let Some((s, _)) = held {
        let _ = tokio::time::timeout(Duration::from_secs(5), s.close()).await;
    }
    log
}

#[allow(clippy::too_many_arguments)]
async fn election_round(
    run: &Arc<Run>,
    w: &Worker,
    who: &str,
    round: u64,
    session: &Session,
    election: &Election,
    log: &mut ElLog,
    rng: &mut StdRng,
) -> bool {
    let (id, ttl) = (w.id, w.ttl);
    let value = format!("e{id}-{round}");
    let what = format!("{who}: campaign() (round {round})");
    let deadline = Instant::now() + WAIT_BOUND;
    // Transient failures are retried with the same session: a retry continues with the key a
    // failed attempt may have left.
    loop {
        let give_up = give_up_when(run, w, 2, election.key(), rng, 0.15).await;
        let fut = unless_given_up(give_up, election.campaign(value.clone()));
        let Some((res, _)) = wait_recipe(run, session, fut, &what).await else {
            return false;
        };
        let Some(res) = res else {
            log.cancelled += 1;
            if cancelled_key_goes(run, session, election.key(), &what).await {
                return true;
            }
            // Unblock the others: only the session's end removes such a key.
            let _ = tokio::time::timeout(Duration::from_secs(5), session.close()).await;
            return false;
        };
        match res {
            Ok(()) => break,
            Err(e) => {
                count(&mut log.campaign_errors, &e);
                run.detail(format!(
                    "{what} (lease {:x}, lost: {:?}): {e}",
                    session.lease_id(),
                    session.lost_reason()
                ));
                if election.is_leader() {
                    run.violation(format!("{what} failed ({e}) but is_leader() is true"));
                }
                if !session.is_alive() || e.kind() == ErrorKind::SessionExpired {
                    return false;
                }
                if Instant::now() >= deadline {
                    run.violation(format!("{what}: kept failing for {WAIT_BOUND:?}: {e}"));
                    return false;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let Some(rev) = election.leader_revision() else {
        run.violation(format!("{what} returned Ok without a leader revision"));
        return false;
    };
    log.wins.push(Win {
        worker: id,
        key: election.key().clone(),
        rev,
    });
    run.maybe_stall(w.proxy, who).await;
    for j in 0..rng.random_range(1..=2) {
        tokio::time::sleep(Duration::from_millis(rng.random_range(20..80))).await;
        let v = format!("{value}-p{j}");
        let outcome = match election.proclaim(v.clone()).await {
            Ok(()) => ProclaimOutcome::Acked,
            Err(e) if e.kind() == ErrorKind::ElectionNotLeader => ProclaimOutcome::NotLeader,
            Err(e) => {
                count(&mut log.proclaim_errors, &e);
                ProclaimOutcome::Unknown
            }
        };
        log.proclaims.push(Proclaim {
            worker: id,
            key: election.key().clone(),
            value: v,
            outcome,
        });
    }
    let hold = Duration::from_millis(rng.random_range(50..250));
    tokio::select! {
        _ = tokio::time::sleep(hold) => {}
        _ = session.done() => {}
    }
    if let Some(reason) = session.lost_reason() {
        log.leaders_lost += 1;
        if election.is_leader() {
            run.violation(format!(
                "{who}: is_leader() is still true after its session was lost ({reason:?})"
            ));
        }
        // The server expires the lease (and so the key) within its TTL of the last refresh.
        let (run2, key) = (run.clone(), election.key().clone());
        let bound = Duration::from_secs(ttl as u64 + 8);
        let who = who.to_owned();
        tokio::spawn(async move {
            let started = Instant::now();
            loop {
                if let Ok(r) = run2.verify.kv().get(key.clone()).await
                    && r.kvs.first().is_none_or(|kv| kv.create_revision() != rev)
                {
                    return;
                }
                if started.elapsed() > bound {
                    run2.violation(format!(
                        "{who}: the leader key of a lost session (create revision {rev}) still \
                         exists {bound:?} later"
                    ));
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        return false;
    }
    release(run, session, &format!("{who}: resign"), || {
        election.resign()
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// The fault schedule.

#[derive(Debug, Clone)]
enum Fault {
    /// SIGSTOP a member (None: the raft leader) for `ms`, then SIGCONT.
    Pause { member: Option<usize>, ms: u64 },
    /// Kill and restart a member, the workload paused.
    Restart { member: usize },
    /// Close every connection through a proxy.
    Cut { proxy: usize },
    /// Hold all traffic through these proxies for `ms` (longer than the proxied TTL).
    Blackhole { proxies: Vec<usize>, ms: u64 },
    /// Wait (at most 3 s) for a proxied contender or campaigner to hold the lock or lead, stall
    /// it there, and blackhole its proxy for `ms`: its session expires while it holds. Its
    /// guarded write or proclamation then goes into the blackhole (reaching etcd when the proxy
    /// passes again, after the client gave up) or, with `outlast`, goes out once the proxy
    /// passes again (and must be refused).
    CatchHolder { ms: u64, outlast: bool },
    /// Hold the lock (or lead) from the schedule's own session, let a proxied contender (or
    /// campaigner) queue behind it, and make it give up waiting (drop its `lock()` /
    /// `campaign()` future) just as its proxy is armed to cut the connection that sends next
    /// (the give-up's cleanup fails once): the key it queued must still leave the queue.
    GiveUpWhileCut { election: bool },
}

#[derive(Debug, Clone)]
struct Step {
    gap_ms: u64,
    fault: Fault,
}

fn schedule(seed: u64, window: Duration, give_ups: bool) -> Vec<Step> {
    let mut rng = StdRng::seed_from_u64(seed);
    // Each kind once, in a seeded order, then random ones while the window lasts.
    let n_kinds = if give_ups { 8 } else { 6 };
    let mut kinds: Vec<usize> = (0..n_kinds).collect();
    kinds.shuffle(&mut rng);
    let window_ms = window.as_millis() as u64;
    let mut steps = Vec::new();
    let mut planned = 0;
    let mut restarts = 0;
    for i in 0.. {
        let kind = match kinds.get(i) {
            Some(&k) => k,
            None => rng.random_range(0..n_kinds),
        };
        let gap_ms = rng.random_range(200..700);
        let (fault, cost) = match kind {
            0 | 1 => {
                let ms = rng.random_range(800..2500);
                let member = (kind == 0).then(|| rng.random_range(0..3));
                (Fault::Pause { member, ms }, ms)
            }
            2 if restarts < 1 => {
                restarts += 1;
                let member = rng.random_range(0..3);
                (Fault::Restart { member }, 2500)
            }
            2 | 3 => (
                Fault::Cut {
                    proxy: rng.random_range(0..2),
                },
                100,
            ),
            6 | 7 => (
                Fault::GiveUpWhileCut {
                    election: kind == 7,
                },
                1000,
            ),
            5 => {
                let ms = TTL_PROXIED as u64 * 1000 + rng.random_range(1000..2000);
                let outlast = rng.random_bool(0.5);
                (Fault::CatchHolder { ms, outlast }, ms + 500)
            }
            _ => {
                let ms = TTL_PROXIED as u64 * 1000 + rng.random_range(1000..2000);
                let proxies = match rng.random_range(0..3) {
                    0 => vec![0],
                    1 => vec![1],
                    _ => vec![0, 1],
                };
                (Fault::Blackhole { proxies, ms }, ms)
            }
        };
        if i >= kinds.len() && planned + gap_ms + cost > window_ms {
            break;
        }
        planned += gap_ms + cost;
        steps.push(Step { gap_ms, fault });
    }
    steps
}

async fn run_schedule(run: &Run, cluster: &EtcdCluster, proxies: &[FaultProxy], steps: &[Step]) {
    for (i, step) in steps.iter().enumerate() {
        tokio::time::sleep(Duration::from_millis(step.gap_ms)).await;
        run.note(format!("fault {i}: {:?}", step.fault));
        match &step.fault {
            Fault::Pause { member, ms } => {
                let m = match member {
                    Some(m) => *m,
                    None => cluster
                        .leader_async(Duration::from_secs(5))
                        .await
                        .unwrap_or_else(|e| panic!("seed {}: no raft leader: {e}", run.seed)),
                };
                cluster
                    .stop(m)
                    .unwrap_or_else(|e| panic!("seed {}: SIGSTOP member {m}: {e}", run.seed));
                tokio::time::sleep(Duration::from_millis(*ms)).await;
                cluster
                    .cont(m)
                    .unwrap_or_else(|e| panic!("seed {}: SIGCONT member {m}: {e}", run.seed));
                run.note(format!("  member {m} resumed"));
            }
            Fault::Restart { member } => restart_quietly(run, cluster, *member).await,
            Fault::Cut { proxy } => proxies[*proxy].cut_all().await,
            Fault::CatchHolder { ms, outlast } => {
                let stall = if *outlast { ms + 300 } else { 800 };
                run.stall_ms.store(stall, Ordering::SeqCst);
                run.caught.store(0, Ordering::SeqCst);
                run.slow.store(true, Ordering::SeqCst);
                let deadline = Instant::now() + Duration::from_secs(3);
                let p = loop {
                    match run.caught.load(Ordering::SeqCst) {
                        0 if Instant::now() < deadline => {
                            tokio::time::sleep(Duration::from_millis(2)).await;
                        }
                        0 => break 0,
                        p => break p - 1,
                    }
                };
                run.slow.store(false, Ordering::SeqCst);
                proxies[p].blackhole();
                run.note(format!("  proxy {p} blackholed"));
                tokio::time::sleep(Duration::from_millis(*ms)).await;
                proxies[p].pass();
                run.note("  proxies pass again");
            }
            Fault::GiveUpWhileCut { election } => {
                give_up_while_cut(run, proxies, *election).await;
            }
            Fault::Blackhole { proxies: ps, ms } => {
                for &p in ps {
                    proxies[p].blackhole();
                }
                tokio::time::sleep(Duration::from_millis(*ms)).await;
                for &p in ps {
                    proxies[p].pass();
                }
                run.note("  proxies pass again");
            }
        }
    }
}

async fn give_up_while_cut(run: &Run, proxies: &[FaultProxy], election: bool) {
    let what = if election {
        "a campaigner"
    } else {
        "a mutex contender"
    };
    // A proxied worker picks itself as it starts its next attempt, and waits for the hold.
    *run.give_up_key.lock().unwrap() = None;
    run.give_up_proxy.store(0, Ordering::SeqCst);
    run.give_up_phase.send_replace(1);
    run.give_up_kind
        .store(if election { 2 } else { 1 }, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(5);
    while run.give_up_proxy.load(Ordering::SeqCst) == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    run.give_up_kind.store(0, Ordering::SeqCst);
    let p = run.give_up_proxy.swap(usize::MAX, Ordering::SeqCst);
    if p == 0 {
        run.give_up_phase.send_replace(0);
        run.note(format!(
            "  no proxied {what} started an attempt within 5 s: skipped"
        ));
        return;
    }
    let p = p - 1;
    // Hold the lock / lead from the schedule's own session (the verify client).
    let held = async {
        let s = Session::new(&run.verify).ttl(10).await?;
        let m = Mutex::new(&s, LOCK);
        let e = Election::new(&s, VOTE);
        if election {
            e.campaign("schedule").await?;
        } else {
            m.lock().await?;
        }
        Ok::<_, etcdv3::Error>((s, m, e))
    };
    let held = tokio::time::timeout(Duration::from_secs(10), held).await;
    let Ok(Ok((s, m, e))) = held else {
        run.give_up_phase.send_replace(0);
        run.note(format!(
            "  the schedule could not hold the lock / lead ({held:?}): skipped"
        ));
        return;
    };
    run.give_up_phase.send_replace(2);
    // The picked worker's key must be queued (behind the schedule's).
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut queued = None;
    while queued.is_none() && Instant::now() < deadline {
        let key = run.give_up_key.lock().unwrap().clone();
        if let Some(key) = key
            && let Ok(r) = run.verify.kv().get(key.clone()).await
            && !r.kvs.is_empty()
        {
            queued = Some(key);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    match queued {
        Some(key) => {
            // The next bytes through the proxy (normally the give-up's cleanup; else a lease
            // refresh, and the cleanup then goes out on a new connection) are dropped with
            // their connection: the request fails after it was sent.
            proxies[p].cut_after_client_bytes(0);
            run.give_up_phase.send_replace(3);
            let fired = tokio::time::timeout(Duration::from_secs(3), async {
                while proxies[p].cut_armed() {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
            .await;
            proxies[p].pass();
            run.note(format!(
                "  {what} queued behind the schedule's holder as {} gave up; proxy {p} cut the \
                 next request ({})",
                show(&key),
                if fired.is_ok() {
                    "done"
                } else {
                    "nothing came"
                }
            ));
            // No further fault before the worker's check is done (the key gone, or removed by
            // the worker after reporting it).
            let _ = tokio::time::timeout(GIVE_UP_BOUND + Duration::from_secs(2), async {
                while !matches!(run.verify.kv().get(key.clone()).await, Ok(r) if r.kvs.is_empty()) {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
            .await;
        }
        None => run.note(format!("  {what}'s key did not show within 5 s: skipped")),
    }
    run.give_up_phase.send_replace(0);
    let released = if election {
        e.resign().await
    } else {
        m.unlock().await
    };
    if let Err(err) = released {
        run.note(format!(
            "  the schedule's holder could not release ({err}); closing"
        ));
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), s.close()).await;
}

/// Restart `member` with no workload request in flight and every member's applied index
/// equal (etcd 3.5.0–3.5.2 can lose an entry applied while SIGKILLed: issue 13766).
async fn restart_quietly(run: &Run, cluster: &EtcdCluster, member: usize) {
    let Ok(quiet) = tokio::time::timeout(Duration::from_secs(25), run.gate.write()).await else {
        run.violation("the workload did not pause within 25 s for a member restart (liveness)");
        return;
    };
    let paused = Instant::now();
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
                "  members did not converge ({applied:?}); restart skipped (issue 13766)"
            ));
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cluster
        .restart_async(member)
        .await
        .unwrap_or_else(|e| panic!("seed {}: restart member {member}: {e}", run.seed));
    run.note(format!(
        "  member {member} restarted (workload paused {:?})",
        paused.elapsed()
    ));
    drop(quiet);
}

// ---------------------------------------------------------------------------------------------
// History.

/// Every event under `prefix` from revision `from` up to the put of `end_key`.
async fn history(run: &Run, prefix: &str, from: i64, end_key: &str) -> Vec<Event> {
    let collect = async {
        let mut w = run
            .verify
            .watch(prefix)
            .prefix()
            .start_revision(from)
            .await
            .map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        loop {
            match w.next().await {
                Some(Ok(batch)) => {
                    for ev in batch.into_events() {
                        let end = ev.kv.key() == end_key.as_bytes();
                        out.push(ev);
                        if end {
                            return Ok(out);
                        }
                    }
                }
                Some(Err(e)) => return Err(e.to_string()),
                None => return Err("the watch ended".to_owned()),
            }
        }
    };
    match tokio::time::timeout(Duration::from_secs(20), collect).await {
        Ok(Ok(evs)) => evs,
        Ok(Err(e)) => panic!("seed {}: reading the history of {prefix}: {e}", run.seed),
        Err(_) => panic!("seed {}: the history of {prefix} took over 20 s", run.seed),
    }
}

/// Events grouped by revision, in order.
fn by_revision(events: &[Event]) -> Vec<(i64, Vec<&Event>)> {
    let mut out: Vec<(i64, Vec<&Event>)> = Vec::new();
    for ev in events {
        let rev = ev.kv.mod_revision();
        match out.last_mut() {
            Some((r, evs)) if *r == rev => evs.push(ev),
            _ => out.push((rev, vec![ev])),
        }
    }
    out
}

fn lowest(live: &BTreeMap<Bytes, KeyValue>) -> Option<&KeyValue> {
    live.values().min_by_key(|kv| kv.create_revision())
}

fn show(key: &[u8]) -> String {
    String::from_utf8_lossy(key).into_owned()
}

// ---------------------------------------------------------------------------------------------
// Checks.

fn check_mutex(run: &Run, events: &[Event], logs: &[MxLog]) -> String {
    let mut live: BTreeMap<Bytes, KeyValue> = BTreeMap::new();
    let mut owners: HashSet<(Bytes, i64)> = HashSet::new();
    let mut applied: HashMap<String, i64> = HashMap::new();
    // Revisions at which a lock key (key, create revision) was live.
    let mut live_at: HashMap<(Bytes, i64), (i64, i64)> = HashMap::new();
    let mut counter = None;
    for (rev, evs) in by_revision(events) {
        let owner = lowest(&live).map(|kv| (kv.key().clone(), kv.create_revision()));
        for ev in evs {
            let key = ev.kv.key();
            if key.starts_with(LOCK_KEYS.as_bytes()) {
                match ev.kind {
                    EventKind::Put => {
                        let id = (key.clone(), ev.kv.create_revision());
                        live_at.entry(id).or_insert((rev, i64::MAX));
                        live.insert(key.clone(), ev.kv.clone());
                    }
                    _ => {
                        if let Some(kv) = live.remove(key)
                            && let Some(span) =
                                live_at.get_mut(&(key.clone(), kv.create_revision()))
                        {
                            span.1 = rev;
                        }
                    }
                }
            } else if key == COUNTER.as_bytes() && ev.kind == EventKind::Put {
                let Some(v) = parse_counter(ev.kv.value()) else {
                    run.violation(format!("history: unreadable counter {:?}", ev.kv.value()));
                    continue;
                };
                if v.tag == "init" {
                    counter = Some(v.n);
                    continue;
                }
                if counter.is_some_and(|c| v.n != c + 1) {
                    run.violation(format!(
                        "LOST/DUPLICATE UPDATE: counter went from {counter:?} to {} at revision \
                         {rev} ({})",
                        v.n, v.tag
                    ));
                }
                counter = Some(v.n);
                if owner.as_ref() != Some(&(v.key.clone(), v.fence)) {
                    run.violation(format!(
                        "MUTUAL EXCLUSION: increment {} at revision {rev} by lock key {} (fence {}) \
                         while etcd's owner was {:?}",
                        v.tag,
                        show(&v.key),
                        v.fence,
                        owner.as_ref().map(|(k, c)| (show(k), *c))
                    ));
                }
                applied.insert(v.tag, rev);
            } else if key == COUNTER.as_bytes() {
                run.violation(format!(
                    "history: the counter was deleted at revision {rev}"
                ));
            }
        }
        if let Some(kv) = lowest(&live) {
            owners.insert((kv.key().clone(), kv.create_revision()));
        }
    }

    let (mut acked, mut indeterminate, mut fenced, mut failed, mut acqs) = (0, 0, 0, 0, 0);
    let mut acked_writes: Vec<(i64, i64, usize)> = Vec::new();
    for log in logs {
        for a in &log.acqs {
            acqs += 1;
            if !owners.contains(&(a.key.clone(), a.fence)) {
                run.violation(format!(
                    "SILENT LOCK: contender {}'s lock() returned Ok (key {}, fence {}{}) but etcd \
                     never had that key as the owner",
                    a.worker,
                    show(&a.key),
                    a.fence,
                    if a.after_loss {
                        ", after its session was reported lost"
                    } else {
                        ""
                    }
                ));
            }
        }
        for w in &log.writes {
            let at = applied.get(&w.tag).copied();
            match &w.outcome {
                WriteOutcome::Acked(rev) => {
                    acked += 1;
                    acked_writes.push((*rev, w.fence, w.worker));
                    if at != Some(*rev) {
                        run.violation(format!(
                            "acknowledged increment {} (revision {rev}) is not in etcd's history \
                             at that revision (found: {at:?})",
                            w.tag
                        ));
                    }
                }
                WriteOutcome::Fenced(rev) => {
                    fenced += 1;
                    if at.is_some() {
                        run.violation(format!("fenced increment {} was applied at {at:?}", w.tag));
                    }
                    // The owner compare failed: the key must not have been live then.
                    let key = logs
                        .iter()
                        .flat_map(|l| &l.acqs)
                        .find(|a| a.worker == w.worker && a.fence == w.fence)
                        .map(|a| a.key.clone());
                    if let Some(key) = key
                        && let Some(&(from, to)) = live_at.get(&(key.clone(), w.fence))
                        && from <= *rev
                        && *rev < to
                    {
                        run.violation(format!(
                            "increment {} was refused at revision {rev} though its lock key {} \
                             (fence {}) was live from {from} to {to}",
                            w.tag,
                            show(&key),
                            w.fence
                        ));
                    }
                }
                WriteOutcome::Conflict => {
                    if at.is_some() {
                        run.violation(format!("conflicting increment {} was applied", w.tag));
                    }
                }
                WriteOutcome::Indeterminate => indeterminate += 1,
                WriteOutcome::Failed(e) => {
                    failed += 1;
                    if let Some(rev) = at {
                        run.violation(format!(
                            "increment {} failed with an error the client calls not sent ({e}) \
                             but etcd applied it at revision {rev}",
                            w.tag
                        ));
                    }
                }
            }
        }
    }
    let total = applied.len();
    if total < acked || total > acked + indeterminate {
        run.violation(format!(
            "COUNTER: {total} increments applied, {acked} acknowledged, {indeterminate} \
             indeterminate (want acked <= applied <= acked + indeterminate)"
        ));
    }
    if counter != Some(total as u64) {
        run.violation(format!(
            "COUNTER: final value {counter:?} but {total} increments in the history"
        ));
    }
    acked_writes.sort();
    for w in acked_writes.windows(2) {
        if w[1].1 <= w[0].1 {
            run.violation(format!(
                "FENCING: acknowledged increments at revisions {} (fence {}, contender {}) and {} \
                 (fence {}, contender {}): fences do not strictly increase",
                w[0].0, w[0].1, w[0].2, w[1].0, w[1].1, w[1].2
            ));
        }
    }
    let mut lock_errors = BTreeMap::new();
    let mut write_errors = BTreeMap::new();
    for log in logs {
        for (k, n) in &log.lock_errors {
            *lock_errors.entry(k.clone()).or_insert(0) += n;
        }
        for (k, n) in &log.write_errors {
            *write_errors.entry(k.clone()).or_insert(0) += n;
        }
    }
    let sessions: usize = logs.iter().map(|l| l.sessions).sum();
    let lost: usize = logs.iter().map(|l| l.sessions_lost).sum();
    let cancelled: usize = logs.iter().map(|l| l.cancelled).sum();
    format!(
        "mutex: {acqs} acquisitions ({cancelled} lock() given up), counter {total} = {acked} acked + {} of {indeterminate} \
         indeterminate; {fenced} fenced, {failed} failed unsent; sessions {sessions} ({lost} \
         lost); lock errors {lock_errors:?}; write errors {write_errors:?}",
        total.saturating_sub(acked)
    )
}

/// One leader state: the leader's key, create revision, and its value as of `mod_rev`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct LeaderState {
    key: Bytes,
    create: i64,
    mod_rev: i64,
    value: Bytes,
}

impl LeaderState {
    fn of(kv: &KeyValue) -> Self {
        LeaderState {
            key: kv.key().clone(),
            create: kv.create_revision(),
            mod_rev: kv.mod_revision(),
            value: kv.value().clone(),
        }
    }
}

/// Etcd's sequence of leader states, each with the revision it began at.
fn leader_states(events: &[Event]) -> Vec<(LeaderState, i64)> {
    let mut live: BTreeMap<Bytes, KeyValue> = BTreeMap::new();
    let mut states: Vec<(LeaderState, i64)> = Vec::new();
    for (rev, evs) in by_revision(events) {
        for ev in evs {
            if !ev.kv.key().starts_with(VOTE_KEYS.as_bytes()) {
                continue;
            }
            match ev.kind {
                EventKind::Put => {
                    live.insert(ev.kv.key().clone(), ev.kv.clone());
                }
                _ => {
                    live.remove(ev.kv.key());
                }
            }
        }
        if let Some(s) = lowest(&live).map(LeaderState::of)
            && states.last().is_none_or(|(last, _)| *last != s)
        {
            states.push((s, rev));
        }
    }
    states
}

fn check_election(run: &Run, events: &[Event], logs: &[ElLog], observed: &[KeyValue]) -> String {
    let states = leader_states(events);
    let mut live: BTreeMap<Bytes, KeyValue> = BTreeMap::new();
    let mut leaders: HashSet<(Bytes, i64)> = HashSet::new();
    let mut puts: HashMap<(Bytes, Bytes), i64> = HashMap::new();
    for (rev, evs) in by_revision(events) {
        for ev in &evs {
            if !ev.kv.key().starts_with(VOTE_KEYS.as_bytes()) {
                continue;
            }
            match ev.kind {
                EventKind::Put => {
                    puts.insert((ev.kv.key().clone(), ev.kv.value().clone()), rev);
                    live.insert(ev.kv.key().clone(), ev.kv.clone());
                }
                _ => {
                    live.remove(ev.kv.key());
                }
            }
        }
        let now = lowest(&live).map(LeaderState::of);
        if let Some(s) = &now {
            leaders.insert((s.key.clone(), s.create));
        }
        // A proclamation (value `…-p<j>`) is written only by the leader.
        for ev in &evs {
            let v = ev.kv.value();
            if ev.kind == EventKind::Put
                && ev.kv.version() > 1
                && v.windows(2).any(|w| w == b"-p")
                && now.as_ref().is_none_or(|s| s.key != ev.kv.key())
            {
                run.violation(format!(
                    "ELECTION: {} proclaimed {:?} at revision {rev} while etcd's leader was {:?}",
                    show(ev.kv.key()),
                    String::from_utf8_lossy(v),
                    now.as_ref().map(|s| show(&s.key))
                ));
            }
        }
    }

    for log in logs {
        for w in &log.wins {
            if !leaders.contains(&(w.key.clone(), w.rev)) {
                run.violation(format!(
                    "SILENT LEADER: campaigner {}'s campaign() returned Ok (key {}, revision {}) \
                     but etcd never had it as the leader",
                    w.worker,
                    show(&w.key),
                    w.rev
                ));
            }
        }
        for p in &log.proclaims {
            let at = puts.get(&(p.key.clone(), Bytes::from(p.value.clone())));
            match p.outcome {
                ProclaimOutcome::Acked if at.is_none() => run.violation(format!(
                    "campaigner {}'s acknowledged proclamation {:?} is not in etcd's history",
                    p.worker, p.value
                )),
                ProclaimOutcome::NotLeader if at.is_some() => run.violation(format!(
                    "campaigner {}'s proclamation {:?} was refused (not leader) but applied at {at:?}",
                    p.worker, p.value
                )),
                _ => {}
            }
        }
    }

    // The observer's reports: a contiguous run of etcd's leader states, in order.
    let index: HashMap<&LeaderState, usize> = states
        .iter()
        .enumerate()
        .map(|(i, (s, _))| (s, i))
        .collect();
    let mut prev: Option<usize> = None;
    for (n, kv) in observed.iter().enumerate() {
        let s = LeaderState::of(kv);
        let Some(&i) = index.get(&s) else {
            run.violation(format!(
                "OBSERVER: report {n} (key {}, create {}, mod {}, value {:?}) was never etcd's \
                 leader state",
                show(&s.key),
                s.create,
                s.mod_rev,
                String::from_utf8_lossy(&s.value)
            ));
            continue;
        };
        if let Some(p) = prev
            && i != p + 1
        {
            let detail = if i <= p {
                "repeated or went back"
            } else {
                "skipped leader states"
            };
            run.violation(format!(
                "OBSERVER: report {n} is etcd's leader state {i} (from revision {}) after state \
                 {p} (from revision {}): {detail}; skipped: {:?}",
                states[i].1,
                states[p].1,
                states
                    .get(p + 1..i)
                    .unwrap_or_default()
                    .iter()
                    .map(|(s, r)| (
                        show(&s.key),
                        String::from_utf8_lossy(&s.value).into_owned(),
                        *r
                    ))
                    .collect::<Vec<_>>()
            ));
        }
        prev = Some(i);
    }
    let wins: usize = logs.iter().map(|l| l.wins.len()).sum();
    let proclaims = logs
        .iter()
        .flat_map(|l| &l.proclaims)
        .filter(|p| p.outcome == ProclaimOutcome::Acked)
        .count();
    let lost: usize = logs.iter().map(|l| l.leaders_lost).sum();
    let sessions: usize = logs.iter().map(|l| l.sessions).sum();
    let cancelled: usize = logs.iter().map(|l| l.cancelled).sum();
    let mut campaign_errors = BTreeMap::new();
    for log in logs {
        for (k, n) in log.campaign_errors.iter().chain(&log.proclaim_errors) {
            *campaign_errors.entry(k.clone()).or_insert(0) += n;
        }
    }
    format!(
        "election: {wins} wins ({cancelled} campaign() given up), {proclaims} proclamations acked, {} leader states, {} observed \
         (from state {:?}); {lost} leaders lost their session; sessions {sessions}; errors \
         {campaign_errors:?}",
        states.len(),
        observed.len(),
        observed
            .first()
            .and_then(|kv| index.get(&LeaderState::of(kv)))
    )
}

// ---------------------------------------------------------------------------------------------
// The test.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recipes_keep_their_invariants_under_seeded_faults() {
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
    let give_ups = std::env::var("CHAOS_GIVE_UP").map_or(true, |v| v != "0");
    let steps = schedule(seed, window, give_ups);
    eprintln!(
        "chaos_recipes: seed {seed} (CHAOS_SEED), etcd {}, window {window:?}, give-ups {give_ups}, schedule:",
        cluster.version()
    );
    for s in &steps {
        eprintln!("  after {} ms: {:?}", s.gap_ms, s.fault);
    }
    let eps = cluster.endpoints();
    let rotated = |i: usize| -> Vec<String> { (0..3).map(|k| eps[(i + k) % 3].clone()).collect() };
    let verify = common::client(&cluster).await;
    let proxies = vec![
        FaultProxy::start(cluster.client_addr(0))
            .await
            .expect("proxy"),
        FaultProxy::start(cluster.client_addr(1))
            .await
            .expect("proxy"),
    ];
    let run = Arc::new(Run {
        seed,
        started: Instant::now(),
        stop: AtomicBool::new(false),
        gate: tokio::sync::RwLock::new(()),
        violations: StdMutex::new(Vec::new()),
        verify: verify.clone(),
        verbose: std::env::var("CHAOS_VERBOSE").is_ok_and(|v| v == "1"),
        give_ups,
        slow: AtomicBool::new(false),
        caught: AtomicUsize::new(0),
        stall_ms: AtomicU64::new(0),
        give_up_kind: AtomicUsize::new(0),
        give_up_proxy: AtomicUsize::new(0),
        give_up_key: StdMutex::new(None),
        give_up_phase: tokio::sync::watch::channel(0).0,
    });

    // The history starts here.
    let start_rev = verify
        .kv()
        .put(
            COUNTER,
            counter_value(0, &Bytes::from_static(b"-"), 0, "init"),
        )
        .await
        .expect("initialise the counter")
        .header
        .revision;

    // Observer first (on its own direct client and session), then the workload.
    let observed: Arc<StdMutex<Vec<KeyValue>>> = Arc::default();
    let observer_end: Arc<StdMutex<Option<String>>> = Arc::default();
    let observer_client = common::client(&cluster).await;
    let observer_session = Session::new(&observer_client)
        .ttl(30)
        .await
        .expect("observer session");
    let observer = {
        let election = Election::new(&observer_session, VOTE);
        let (observed, end) = (observed.clone(), observer_end.clone());
        tokio::spawn(async move {
            let mut o = election.observe();
            let why = loop {
                match o.next().await {
                    Some(Ok(kv)) => observed.lock().unwrap().push(kv),
                    Some(Err(e)) => break format!("ended with an error: {e}"),
                    None => break "ended".to_owned(),
                }
            };
            *end.lock().unwrap() = Some(why);
        })
    };

    let mut mutex_tasks = Vec::new();
    let via = |p: usize| (vec![proxies[p].endpoint()], TTL_PROXIED, Some(p));
    let mx_clients = [
        (rotated(0), TTL_DIRECT, None),
        (rotated(2), TTL_DIRECT, None),
        via(0),
        via(1),
    ];
    for (id, (endpoints, ttl, proxy)) in mx_clients.into_iter().enumerate() {
        let client = contender(endpoints).await;
        let w = Worker {
            id,
            client,
            ttl,
            proxy,
        };
        mutex_tasks.push(tokio::spawn(mutex_worker(run.clone(), w)));
    }
    let mut election_tasks = Vec::new();
    let el_clients = [(rotated(1), TTL_DIRECT, None), via(0), via(1)];
    for (id, (endpoints, ttl, proxy)) in el_clients.into_iter().enumerate() {
        let client = contender(endpoints).await;
        let w = Worker {
            id,
            client,
            ttl,
            proxy,
        };
        election_tasks.push(tokio::spawn(election_worker(run.clone(), w)));
    }

    run_schedule(&run, &cluster, &proxies, &steps).await;
    for p in &proxies {
        p.pass();
    }
    run.note("fault window over; the workload finishes its rounds");
    run.stop.store(true, Ordering::SeqCst);
    cluster
        .wait_all_healthy_async(Duration::from_secs(15))
        .await
        .unwrap_or_else(|e| panic!("seed {seed}: the cluster did not recover: {e}"));

    let join = async {
        let mut mx = Vec::new();
        for t in mutex_tasks {
            mx.push(t.await.expect("mutex contender panicked"));
        }
        let mut el = Vec::new();
        for t in election_tasks {
            el.push(t.await.expect("campaigner panicked"));
        }
        (mx, el)
    };
    let (mx_logs, el_logs) = tokio::time::timeout(Duration::from_secs(45), join)
        .await
        .unwrap_or_else(|_| panic!("seed {seed}: the workload did not stop within 45 s"));
    run.note("workload stopped");

    // Every session is closed: no lock or election key may be left.
    common::wait_until(
        Duration::from_secs(TTL_DIRECT as u64 + 8),
        "no lock or election key left after every session ended",
        || {
            let c = verify.clone();
            async move {
                let l = c.kv().get(LOCK_KEYS).prefix().count_only().await;
                let e = c.kv().get(VOTE_KEYS).prefix().count_only().await;
                matches!((l, e), (Ok(l), Ok(e)) if l.count == 0 && e.count == 0)
            }
        },
    )
    .await;

    let mx_end = verify.kv().put(MX_END, "end").await.expect("end marker");
    verify.kv().put(EL_END, "end").await.expect("end marker");
    let mx_events = history(&run, MX, start_rev, MX_END).await;
    let el_events = history(&run, EL, start_rev, EL_END).await;
    let mx_summary = check_mutex(&run, &mx_events, &mx_logs);

    // The observer must reach etcd's last leader state (nobody leads any more).
    let last_state = leader_states(&el_events).last().map(|(s, _)| s.clone());
    if let Some(last) = last_state {
        let reached = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let done = observed
                    .lock()
                    .unwrap()
                    .last()
                    .is_some_and(|kv| LeaderState::of(kv) == last);
                if done || observer_end.lock().unwrap().is_some() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        if reached.is_err() || observer_end.lock().unwrap().is_some() {
            run.violation(format!(
                "OBSERVER: did not report etcd's last leader state ({}: {:?}) within 10 s; the \
                 observer {}",
                show(&last.key),
                String::from_utf8_lossy(&last.value),
                observer_end
                    .lock()
                    .unwrap()
                    .clone()
                    .unwrap_or_else(|| "is still running".into())
            ));
        }
    }
    observer.abort();
    let observed = observed.lock().unwrap().clone();
    let el_summary = check_election(&run, &el_events, &el_logs, &observed);

    // The members agree on the history (a divergence is etcd's, not the client's).
    let rev = mx_end.header.revision;
    let mut hashes = Vec::new();
    for ep in cluster.endpoints() {
        let h = match verify.maintenance_at(&ep) {
            Ok(m) => m
                .hash_kv(rev)
                .await
                .map(|h| h.hash)
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        hashes.push(h);
    }
    if hashes.iter().any(|h| h != &hashes[0]) {
        run.violation(format!(
            "SERVER: the members' KV hashes at revision {rev} differ ({hashes:?}): etcd diverged \
             (not a client bug)"
        ));
    }

    eprintln!("chaos_recipes (seed {seed}): {mx_summary}");
    eprintln!("chaos_recipes (seed {seed}): {el_summary}");
    eprintln!(
        "chaos_recipes (seed {seed}): {} history events, {:.1} s in all",
        mx_events.len() + el_events.len(),
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
