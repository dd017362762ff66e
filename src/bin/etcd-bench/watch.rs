//! Watch and lease workloads: watch, watch-latency, watch-get, watch-catchup, lease-keepalive.

use std::future::IntoFuture;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Args;
use etcdv3::{Client, WatchBatch, WatchGroup, Watcher};

use crate::Bench;
use crate::report::{Meter, Report};

/// Flags of the watch workloads (etcd benchmark's names).
#[derive(Args, Debug, Clone)]
pub(crate) struct WatchArgs {
    /// Watch streams (one client connection each).
    #[arg(long, default_value_t = 1)]
    streams: usize,
    /// Watchers per stream.
    #[arg(long, default_value_t = 1000)]
    watch_per_stream: usize,
    /// Puts made while watching.
    #[arg(long, default_value_t = 1000)]
    put_total: u64,
    /// Puts per second (0: as fast as one writer goes).
    #[arg(long, default_value_t = 100)]
    put_rate: u64,
    /// `watch` only: tasks reading the watchers. 0 (the default, as etcd's Go benchmark does
    /// with goroutines): a task per watcher. N: N tasks, each reading its share of the
    /// watchers as one `WatchGroup`, which leaves out the cost of a buffer and of waking a
    /// task per watcher and response.
    #[arg(long, default_value_t = 0)]
    consumers: usize,
}

/// The endpoints the clients of this run use.
fn endpoints(b: &Bench) -> Vec<String> {
    b.clients[0].endpoints()
}

async fn new_client(b: &Bench) -> Result<Client, String> {
    Client::builder(endpoints(b))
        .request_timeout(Duration::from_secs(30))
        .connect()
        .await
        .map_err(|e| format!("cannot reach etcd: {e}"))
}

/// A watcher of the run: its own, or the index of the group it was added to.
enum Member {
    Own(Watcher),
    InGroup(usize),
}

/// The watchers of a run made without groups.
fn own(watchers: Vec<(u64, Member)>) -> Vec<(u64, Watcher)> {
    watchers
        .into_iter()
        .filter_map(|(k, m)| match m {
            Member::Own(w) => Some((k, w)),
            Member::InGroup(_) => None,
        })
        .collect()
}

/// Create `streams` × `per_stream` watchers on keys of the key space (the j-th in
/// `groups[j % groups.len()]` when there are groups); returns the watchers with the key index
/// each watches, and each creation's latency.
async fn create_watchers(
    b: &Bench,
    streams: usize,
    per_stream: usize,
    groups: &[WatchGroup],
) -> Result<(Vec<Client>, Vec<(u64, Member)>, Vec<Duration>), String> {
    let mut clients = Vec::with_capacity(streams);
    let mut watchers = Vec::with_capacity(streams * per_stream);
    let mut lat = Vec::with_capacity(streams * per_stream);
    let space = b.common.key_space_size.max(1);
    for s in 0..streams {
        let c = new_client(b).await?;
        // Pipelined: every creation of a stream is in flight at once.
        let futs = (0..per_stream).map(|j| {
            let n = s * per_stream + j;
            let k = (n as u64) % space;
            let w = c.watch(b.key(k));
            async move {
                let t = Instant::now();
                let r = match groups.len() {
                    0 => w.into_future().await.map(Member::Own),
                    g => groups[n % g].add(w).await.map(|_| Member::InGroup(n % g)),
                };
                (k, r, t.elapsed())
            }
        });
        for (k, r, d) in futures_util::future::join_all(futs).await {
            let w = r.map_err(|e| format!("creating a watcher: {e}"))?;
            watchers.push((k, w));
            lat.push(d);
        }
        clients.push(c);
    }
    Ok((clients, watchers, lat))
}

/// The events and responses all consumers of a run read.
#[derive(Default)]
struct Totals {
    events: AtomicU64,
    responses: AtomicU64,
}

/// Events and batches read by a consumer, added to the shared [`Totals`] every 64 batches:
/// two shared counters bumped per batch by 1,000 tasks on every worker thread bounce their
/// cache line between cores, a cost of the bench and not of the client. Small, since it is
/// part of every consumer task (see [`consume`]).
struct Tally {
    totals: Arc<Totals>,
    events: u32,
    batches: u32,
}

impl Tally {
    fn new(totals: &Arc<Totals>) -> Self {
        Tally {
            totals: Arc::clone(totals),
            events: 0,
            batches: 0,
        }
    }

    fn add(&mut self, batch: &WatchBatch) {
        self.events = self
            .events
            .saturating_add(u32::try_from(batch.len()).unwrap_or(u32::MAX));
        self.batches += 1;
        if self.batches == 64 {
            self.flush();
        }
    }

    fn flush(&mut self) {
        let t = &self.totals;
        t.events
            .fetch_add(u64::from(self.events), Ordering::Relaxed);
        t.responses
            .fetch_add(u64::from(self.batches), Ordering::Relaxed);
        (self.events, self.batches) = (0, 0);
    }
}

/// Read `want` events from one watcher, adding to the shared totals.
///
/// The consumer task's state is what an application's least consumer holds (the watcher, a
/// count, a shared total): 64 bytes, so that with tokio's task header it takes one pair of
/// cache lines. (An `async fn` would keep its arguments twice, 176 bytes in all, and each
/// response would cost one more cache miss, which is the bench's and not the client's.)
#[allow(clippy::manual_async_fn)]
fn consume(
    mut watcher: Watcher,
    mut want: u64,
    mut tally: Tally,
) -> impl std::future::Future<Output = ()> {
    async move {
        while want > 0 {
            match watcher.next().await {
                Some(Ok(batch)) => {
                    want = want.saturating_sub(batch.len() as u64);
                    tally.add(&batch);
                }
                _ => break,
            }
        }
        tally.flush();
    }
}

/// Read `want` events from a group of watchers, in runs (`WatchGroup::next_many`).
async fn consume_group(mut group: WatchGroup, mut want: u64, mut tally: Tally) {
    let mut run = Vec::with_capacity(256);
    'read: while want > 0 {
        if group.next_many(&mut run, 256).await == 0 {
            break;
        }
        for (_, item) in run.drain(..) {
            match item {
                Ok(batch) => {
                    want = want.saturating_sub(batch.len() as u64);
                    tally.add(&batch);
                }
                Err(_) => break 'read,
            }
        }
    }
    tally.flush();
}

/// Wait for the put process for up to `grace` (it is done or stuck by now: the watchers have
/// their events or the run timed out), then stop it; without blocking the runtime.
async fn wait_child(
    child: &mut std::process::Child,
    grace: Duration,
) -> Result<std::process::ExitStatus, String> {
    let until = Instant::now() + grace;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Ok(status),
            Ok(None) if Instant::now() < until => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "the put process did not end within {grace:?}: stopped"
                ));
            }
            Err(e) => return Err(format!("waiting for the put process: {e}")),
        }
    }
}

/// Run this very program as a separate process doing the puts, so that the watch side's
/// CPU figures are the watch side's alone.
fn spawn_putter(b: &Bench, total: u64, rate: u64) -> Result<std::process::Child, String> {
    let exe = std::env::current_exe().map_err(|e| format!("locating etcd-bench: {e}"))?;
    std::process::Command::new(exe)
        .arg("--endpoints")
        .arg(endpoints(b).join(","))
        .args(["--key-size", &b.common.key_size.to_string()])
        .args(["--val-size", &b.common.val_size.to_string()])
        .args([
            "--key-space-size",
            &b.common.key_space_size.max(1).to_string(),
        ])
        .arg("--sequential-keys")
        .args(["--total", &total.to_string(), "--rate", &rate.to_string()])
        .arg("--json")
        .arg("put")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .map_err(|e| format!("starting the put process: {e}"))
}

/// `watch`: many watchers on one (or a few) streams while a separate process writes; measures
/// creation latency and the client's CPU per delivered event and per response.
pub(crate) async fn watch(b: &Arc<Bench>, a: &WatchArgs) -> Result<Report, String> {
    if a.streams == 0 || a.watch_per_stream == 0 {
        return Err("--streams and --watch-per-stream must be at least 1".into());
    }
    let space = b.common.key_space_size.max(1);
    let t = Instant::now();
    let groups: Vec<WatchGroup> = (0..a.consumers).map(|_| WatchGroup::new()).collect();
    let (clients, watchers, creation) =
        create_watchers(b, a.streams, a.watch_per_stream, &groups).await?;
    let created_in = t.elapsed();
    // Each put of key k reaches every watcher of k.
    let mut per_key = vec![0u64; space as usize];
    for (k, _) in &watchers {
        per_key[*k as usize] += 1;
    }
    let expected: u64 = (0..a.put_total)
        .map(|i| per_key[(i % space) as usize])
        .sum();

    let totals = Arc::new(Totals::default());
    // Each watcher with the number of events it is to receive: the puts of its key (key
    // `i % space` for put `i`), worked out before the meter starts.
    let want_of = |k: u64| {
        let (q, r) = (a.put_total / space, a.put_total % space);
        q + u64::from(k < r)
    };
    let meter = Meter::start();
    let consumers = if a.consumers == 0 {
        watchers
            .into_iter()
            .filter_map(|(k, m)| match m {
                Member::Own(w) => Some(tokio::spawn(consume(w, want_of(k), Tally::new(&totals)))),
                Member::InGroup(_) => None,
            })
            .collect::<Vec<_>>()
    } else {
        let mut wants = vec![0u64; groups.len()];
        for (k, m) in &watchers {
            if let Member::InGroup(g) = m {
                wants[*g] += want_of(*k);
            }
        }
        groups
            .into_iter()
            .zip(wants)
            .filter(|(g, _)| !g.is_empty())
            .map(|(g, want)| {
                let tally = Tally::new(&totals);
                tokio::spawn(consume_group(g, want, tally))
            })
            .collect()
    };
    let mut putter = spawn_putter(b, a.put_total, a.put_rate)?;
    let limit = b
        .common
        .duration
        .unwrap_or(Duration::from_secs(600))
        .max(Duration::from_secs(1));
    let all = futures_util::future::join_all(consumers);
    let timed_out = tokio::time::timeout(limit, all).await.is_err();
    let (wall, user, sys, switches) = meter.finish();
    let status = wait_child(&mut putter, Duration::from_secs(10)).await?;
    if !status.success() {
        return Err(format!("the put process failed: {status}"));
    }
    drop(clients);
    let ev = totals.events.load(Ordering::Relaxed);
    let resp = totals.responses.load(Ordering::Relaxed);
    if timed_out {
        eprintln!("etcd-bench: stopped after {limit:?} with {ev} of {expected} events");
    }
    let mut r = Report::new("watch");
    r.latencies = creation;
    r.wall = wall;
    r.cpu_user = user;
    r.cpu_sys = sys;
    r.switches = switches;
    r.ops = resp.max(1);
    r.ops_label = "response".into();
    let cpu_us = (user + sys).as_secs_f64() * 1e6;
    r.extra = vec![
        (
            "Watchers".into(),
            (a.streams * a.watch_per_stream) as f64,
            "".into(),
        ),
        (
            "Consumer tasks".into(),
            if a.consumers == 0 {
                (a.streams * a.watch_per_stream) as f64
            } else {
                a.consumers.min(a.streams * a.watch_per_stream) as f64
            },
            "".into(),
        ),
        (
            "Watchers created in".into(),
            created_in.as_secs_f64(),
            "s".into(),
        ),
        (
            "Watcher creation rate".into(),
            (a.streams * a.watch_per_stream) as f64 / created_in.as_secs_f64().max(1e-9),
            "watchers/s".into(),
        ),
        (
            "Events delivered".into(),
            ev as f64,
            format!("of {expected} expected"),
        ),
        ("Responses".into(), resp as f64, "".into()),
        (
            "Events per response".into(),
            ev as f64 / resp.max(1) as f64,
            "".into(),
        ),
        (
            "Events per second".into(),
            ev as f64 / wall.as_secs_f64().max(1e-9),
            "events/s".into(),
        ),
        (
            "CPU per event".into(),
            cpu_us / ev.max(1) as f64,
            "µs".into(),
        ),
        (
            "CPU per response".into(),
            cpu_us / resp.max(1) as f64,
            "µs".into(),
        ),
    ];
    if ev < expected {
        return Err(format!("only {ev} of {expected} events were delivered"));
    }
    Ok(r)
}

fn now_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// `watch-latency`: put-to-event latency, with the put time carried in the value.
pub(crate) async fn watch_latency(b: &Arc<Bench>, a: &WatchArgs) -> Result<Report, String> {
    let space = b.common.key_space_size.max(1);
    let (clients, watchers, _) = create_watchers(b, a.streams, a.watch_per_stream, &[]).await?;
    let watchers = own(watchers);
    let meter = Meter::start();
    let mut consumers = Vec::new();
    for (k, mut w) in watchers {
        let want = (0..a.put_total).filter(|i| i % space == k).count();
        consumers.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(want);
            while lat.len() < want {
                match w.next().await {
                    Some(Ok(batch)) => {
                        let now = now_nanos();
                        for e in batch.events() {
                            let sent: u128 =
                                e.kv.value_str()
                                    .ok()
                                    .and_then(|v| v.split(':').next()?.parse().ok())
                                    .unwrap_or(now);
                            lat.push(Duration::from_nanos(now.saturating_sub(sent) as u64));
                        }
                    }
                    _ => break,
                }
            }
            lat
        }));
    }
    let writer = b.client(0).clone();
    let pacer = crate::Pacer::new(a.put_rate);
    for i in 0..a.put_total {
        pacer.wait(None).await;
        let pad = "v".repeat(b.common.val_size);
        writer
            .kv()
            .put(b.key(i % space), format!("{}:{pad}", now_nanos()))
            .await
            .map_err(|e| format!("put: {e}"))?;
    }
    let mut r = Report::new("watch-latency (put to event)");
    let limit = b.common.duration.unwrap_or(Duration::from_secs(600));
    for c in consumers {
        let lat = tokio::time::timeout(limit, c)
            .await
            .map_err(|_| "timed out waiting for events".to_string())?
            .map_err(|e| format!("a consumer failed: {e}"))?;
        r.latencies.extend(lat);
    }
    let (wall, user, sys, switches) = meter.finish();
    drop(clients);
    r.wall = wall;
    r.cpu_user = user;
    r.cpu_sys = sys;
    r.switches = switches;
    r.ops_label = "event".into();
    Ok(r)
}

/// `watch-get`: range reads while many watchers are open.
pub(crate) async fn watch_get(b: &Arc<Bench>, a: &WatchArgs) -> Result<Report, String> {
    let (_clients, _watchers, _) = create_watchers(b, a.streams, a.watch_per_stream, &[]).await?;
    let key = b.key(0);
    b.client(0)
        .kv()
        .put(key.clone(), b.value())
        .await
        .map_err(|e| format!("seeding: {e}"))?;
    let mut r = crate::kv::drive(b, "watch-get (range while watching)", move |b, w, _| {
        let key = key.clone();
        async move {
            b.client(w).kv().get(key).await?;
            Ok(())
        }
    })
    .await?;
    r.extra.push((
        "Open watchers".into(),
        (a.streams * a.watch_per_stream) as f64,
        "".into(),
    ));
    Ok(r)
}

/// `watch-catchup` flags.
#[derive(Args, Debug, Clone)]
pub(crate) struct CatchupArgs {
    /// Revisions of history to write before the watcher starts.
    #[arg(long, default_value_t = 100_000)]
    history: u64,
}

/// `watch-catchup`: one watcher replaying a long history from its start.
pub(crate) async fn watch_catchup(b: &Arc<Bench>, a: &CatchupArgs) -> Result<Report, String> {
    let c = b.client(0).clone();
    let space = b.common.key_space_size.max(1);
    let value = bytes::Bytes::from(b.value());
    let first = c
        .kv()
        .put(b.key(0), value.clone())
        .await
        .map_err(|e| format!("put: {e}"))?
        .header
        .revision;
    // Write the history with 64 writers.
    let next = Arc::new(AtomicU64::new(1));
    let mut writers = Vec::new();
    for _ in 0..64 {
        let (c, next, value, b) = (c.clone(), next.clone(), value.clone(), b.clone());
        let total = a.history;
        writers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    return Ok::<(), String>(());
                }
                c.kv()
                    .put(b.key(i % space), value.clone())
                    .await
                    .map_err(|e| format!("put: {e}"))?;
            }
        }));
    }
    for w in writers {
        w.await.map_err(|e| format!("writer: {e}"))??;
    }
    let meter = Meter::start();
    // Every key of the key space (fixed-width numbers): from the first to just past the last.
    let mut end = b.key(space - 1);
    end.push(0);
    let mut w = c
        .watch(b.key(0))
        .range(end)
        .start_revision(first)
        .await
        .map_err(|e| format!("watch: {e}"))?;
    let (mut events, mut responses) = (0u64, 0u64);
    let limit = Instant::now() + b.common.duration.unwrap_or(Duration::from_secs(600));
    while events < a.history && Instant::now() < limit {
        match tokio::time::timeout(Duration::from_secs(30), w.next()).await {
            Ok(Some(Ok(batch))) => {
                events += batch.len() as u64;
                responses += 1;
            }
            Ok(Some(Err(e))) => return Err(format!("watch: {e}")),
            _ => break,
        }
    }
    let (wall, user, sys, switches) = meter.finish();
    if events < a.history {
        return Err(format!("replayed only {events} of {} events", a.history));
    }
    let mut r = Report::new("watch-catchup");
    r.wall = wall;
    r.cpu_user = user;
    r.cpu_sys = sys;
    r.switches = switches;
    r.ops = events;
    r.ops_label = "event".into();
    r.extra = vec![
        ("Events replayed".into(), events as f64, "".into()),
        (
            "Events per second".into(),
            events as f64 / wall.as_secs_f64().max(1e-9),
            "events/s".into(),
        ),
        (
            "Events per response".into(),
            events as f64 / responses.max(1) as f64,
            "".into(),
        ),
    ];
    Ok(r)
}

/// `lease-keepalive` flags.
#[derive(Args, Debug, Clone)]
pub(crate) struct LeaseArgs {
    /// Leases kept alive.
    #[arg(long, default_value_t = 10_000)]
    leases: u64,
    /// Lease TTL in seconds.
    #[arg(long, default_value_t = 30)]
    ttl: i64,
    /// How long to keep them alive.
    #[arg(long, default_value = "60s", value_parser = crate::parse_duration)]
    keep: Duration,
}

/// `lease-keepalive`: keep many leases alive on one keep-alive stream; the client's CPU per
/// lease per minute.
pub(crate) async fn lease_keepalive(b: &Arc<Bench>, a: &LeaseArgs) -> Result<Report, String> {
    let c = b.client(0).clone();
    let mut kept = Vec::with_capacity(a.leases as usize);
    let grants = (0..a.leases).map(|_| c.lease().grant(a.ttl).keep_alive().into_future());
    // Granted in batches of 1,000 in flight.
    let mut pending = grants.collect::<Vec<_>>();
    while !pending.is_empty() {
        let rest = pending.split_off(pending.len().min(1000));
        for r in futures_util::future::join_all(pending).await {
            kept.push(r.map_err(|e| format!("grant: {e}"))?);
        }
        pending = rest;
    }
    let meter = Meter::start();
    tokio::time::sleep(a.keep).await;
    let (wall, user, sys, switches) = meter.finish();
    let lost = kept.iter().filter(|k| k.lost_reason().is_some()).count();
    let minutes = wall.as_secs_f64() / 60.0;
    let cpu = (user + sys).as_secs_f64();
    let mut r = Report::new("lease-keepalive");
    r.wall = wall;
    r.cpu_user = user;
    r.cpu_sys = sys;
    r.switches = switches;
    r.ops = a.leases;
    r.ops_label = "lease".into();
    r.extra = vec![
        (
            "Leases kept".into(),
            a.leases as f64,
            format!("TTL {} s", a.ttl),
        ),
        ("Leases lost".into(), lost as f64, "".into()),
        (
            "Keep-alive streams".into(),
            c.lease().keeper_streams_opened() as f64,
            "".into(),
        ),
        (
            "CPU per lease per minute".into(),
            cpu * 1e6 / a.leases.max(1) as f64 / minutes.max(1e-9),
            "µs".into(),
        ),
        (
            "Share of one core per 10,000 leases".into(),
            cpu / wall.as_secs_f64().max(1e-9) * 100.0 * 10_000.0 / a.leases.max(1) as f64,
            "%".into(),
        ),
    ];
    if lost > 0 {
        return Err(format!("{lost} leases were lost"));
    }
    Ok(r)
}
