//! The watch multiplexer: creation rate and client memory per watcher, and client CPU per
//! delivered event and per response.
//!
//! 1. **Creation**: one client creates `N` watchers (10,000, then 100,000) on one stream,
//!    each on its own 16-byte key, with up to `WINDOW` creations in flight; a creation counts
//!    once the server confirmed it (the builder's await returned). Reports watchers/s, and
//!    the growth of this process's resident memory (`VmRSS` from `/proc/self/status`) per
//!    watcher while they are all alive (the `Watcher` handles in a `Vec` included). Runs on
//!    a current-thread runtime, so the figures are for one core.
//! 2. **Delivery**: 1,000 watchers on one prefix, each read by its own task, while a writer
//!    makes `RATE` revisions per second for `SECONDS` seconds, first with one event per
//!    revision (a put) and then with ten (a ten-put transaction). The client CPU of the
//!    process (`getrusage(RUSAGE_SELF)`, user + sys) minus that of the same writes without
//!    watchers, divided by the events and by the responses (batches) delivered. etcd runs in
//!    its own process, so its CPU is not counted.
//!
//! The report ends with one JSON line per phase (lines starting with `{`).
//!
//! ```text
//! cargo bench --bench watch_mux
//! ETCD_BIN=/usr/bin/etcd RATE=200 SECONDS=10 cargo bench --bench watch_mux
//! ```
//!
//! Environment: `ETCD_BIN` (see [`etcdv3::testkit::find_etcd_binary`]), `RATE` (revisions/s,
//! default 100), `SECONDS` (default 5), `WINDOW` (creations in flight, default 4096),
//! `DELIVERY_WATCHERS` (default 1000), `WORKER_THREADS` (delivery phase, default 2).
//!
//! Under `cargo test` (no `--bench` argument) a smoke version runs: 500 and 2,000 watchers,
//! 50 delivery watchers for one second.

use std::error::Error;
use std::future::IntoFuture;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use etcdv3::testkit::EtcdCluster;
use etcdv3::{Client, Op};
use futures::{StreamExt, TryStreamExt};
use nix::sys::resource::{UsageWho, getrusage};

type BoxError = Box<dyn Error + Send + Sync>;

struct Settings {
    smoke: bool,
    sizes: Vec<usize>,
    window: usize,
    delivery_watchers: usize,
    rate: u64,
    seconds: u64,
    worker_threads: usize,
}

fn env_num<T: std::str::FromStr>(
    name: &str,
    default: T,
    ok: impl Fn(&T) -> bool,
) -> Result<T, BoxError> {
    let Ok(raw) = std::env::var(name) else {
        return Ok(default);
    };
    let v: T = raw
        .trim()
        .replace('_', "")
        .parse()
        .map_err(|_| format!("{name}={raw:?} is not a number"))?;
    if !ok(&v) {
        return Err(format!("{name}={raw:?} is out of range").into());
    }
    Ok(v)
}

impl Settings {
    fn from_env() -> Result<Self, BoxError> {
        let smoke = !std::env::args().any(|a| a == "--bench");
        Ok(Settings {
            smoke,
            sizes: if smoke {
                vec![500, 2_000]
            } else {
                vec![10_000, 100_000]
            },
            window: env_num("WINDOW", 4096usize, |v| (1..=1_000_000).contains(v))?,
            delivery_watchers: if smoke {
                50
            } else {
                env_num("DELIVERY_WATCHERS", 1000usize, |v| {
                    (1..=100_000).contains(v)
                })?
            },
            rate: if smoke {
                50
            } else {
                env_num("RATE", 100u64, |v| (1..=10_000).contains(v))?
            },
            seconds: if smoke {
                1
            } else {
                env_num("SECONDS", 5u64, |v| (1..=600).contains(v))?
            },
            worker_threads: env_num("WORKER_THREADS", 2usize, |v| (1..=64).contains(v))?,
        })
    }
}

/// Resident memory of this process, in bytes.
fn rss_bytes() -> Result<u64, BoxError> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .ok_or("no VmRSS in /proc/self/status")?;
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .ok_or("bad VmRSS line")?
        .parse()?;
    Ok(kb * 1024)
}

/// CPU time (user + sys) of process `pid` so far, in µs (from /proc, 10 ms ticks).
fn process_cpu_micros(pid: u32) -> Result<f64, BoxError> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The fields after the command (which is in parentheses and may hold spaces).
    let rest = stat.rsplit_once(')').ok_or("bad /proc stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the command.
    let ticks: u64 = fields.get(11).ok_or("no utime")?.parse::<u64>()?
        + fields.get(12).ok_or("no stime")?.parse::<u64>()?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)?.unwrap_or(100) as f64;
    Ok(ticks as f64 * 1e6 / hz)
}

/// Client CPU time so far (user, sys), in µs.
fn cpu_micros() -> Result<(f64, f64), BoxError> {
    let u = getrusage(UsageWho::RUSAGE_SELF)?;
    let micros = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 * 1e6 + tv.tv_usec() as f64;
    Ok((micros(u.user_time()), micros(u.system_time())))
}

async fn connect(endpoints: &[String]) -> Result<Client, BoxError> {
    Ok(Client::builder(endpoints.to_vec())
        .request_timeout(Duration::from_secs(30))
        .connect()
        .await?)
}

/// Phase 1, on the calling (current-thread) runtime.
async fn creation(
    settings: &Settings,
    endpoints: &[String],
    etcd: &str,
    server: Option<u32>,
) -> Result<(), BoxError> {
    for &n in &settings.sizes {
        let client = connect(endpoints).await?;
        // Warm up: start the multiplexer and its stream, grow the allocator once.
        let warm: Vec<_> = futures::stream::iter(0..1000)
            .map(|i| client.watch(format!("bench/warm/{i:05}")).into_future())
            .buffer_unordered(settings.window)
            .try_collect()
            .await?;
        drop(warm);
        tokio::time::sleep(Duration::from_millis(200)).await;

        let rss0 = rss_bytes()?;
        let stats0 = client.watch_stats();
        let (u0, s0) = cpu_micros()?;
        let server0 = server.map(process_cpu_micros).transpose()?;
        let started = Instant::now();
        let watchers: Vec<_> = futures::stream::iter(0..n)
            .map(|i| client.watch(format!("bench/w/{i:08}")).into_future())
            .buffer_unordered(settings.window)
            .try_collect()
            .await?;
        let took = started.elapsed();
        let (u1, s1) = cpu_micros()?;
        let server1 = server.map(process_cpu_micros).transpose()?;
        let rss1 = rss_bytes()?;
        let stats1 = client.watch_stats();
        let rate = n as f64 / took.as_secs_f64();
        let per_watcher = (rss1.saturating_sub(rss0)) as f64 / n as f64;
        let client_cpu = (u1 - u0 + s1 - s0) / n as f64;
        let server_cpu = match (server0, server1) {
            (Some(a), Some(b)) => (b - a) / n as f64,
            _ => f64::NAN,
        };
        println!(
            "  create {n:>7} watchers: {:.3} s, {rate:>9.0} watchers/s, RSS +{:.1} MiB = \
             {per_watcher:.0} B/watcher, {} stream(s) opened; CPU per watcher: client \
             {client_cpu:.2} µs, etcd {server_cpu:.2} µs",
            took.as_secs_f64(),
            (rss1.saturating_sub(rss0)) as f64 / (1024.0 * 1024.0),
            stats1.streams_opened - stats0.streams_opened,
        );
        println!(
            "{{\"bench\":\"watch_mux\",\"phase\":\"create\",\"smoke\":{},\"etcd\":\"{etcd}\",\
             \"watchers\":{n},\"window\":{},\"seconds\":{:.4},\"watchers_per_s\":{rate:.0},\
             \"rss_bytes_per_watcher\":{per_watcher:.0},\"client_cpu_us_per_watcher\":{client_cpu:.3},\
             \"server_cpu_us_per_watcher\":{server_cpu:.3}}}",
            settings.smoke,
            settings.window,
            took.as_secs_f64()
        );
        drop(watchers);
        client.close().await;
    }
    Ok(())
}

/// Writes `rate` revisions/s for `seconds`, each with `events` puts; returns the last revision.
async fn write(client: &Client, rate: u64, seconds: u64, events: usize) -> Result<i64, BoxError> {
    let mut tick = tokio::time::interval(Duration::from_secs(1) / rate as u32);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut last = 0;
    for r in 0..rate * seconds {
        tick.tick().await;
        last = if events == 1 {
            client
                .kv()
                .put(format!("bench/ev/{:04}", r % 1000), "0123456789abcdef")
                .await?
                .header
                .revision
        } else {
            let ops: Vec<Op> = (0..events)
                .map(|k| Op::put(format!("bench/ev/t{k:03}"), "0123456789abcdef").into())
                .collect();
            client.kv().txn().and_then(ops).await?.header.revision
        };
    }
    Ok(last)
}

/// Phase 2, on a multi-thread runtime.
async fn delivery(settings: &Settings, endpoints: &[String], etcd: &str) -> Result<(), BoxError> {
    let writer = connect(endpoints).await?;
    let client = connect(endpoints).await?;
    let n = settings.delivery_watchers;
    for events in [1usize, 10] {
        // Baseline: the same writes without watchers.
        let (u0, s0) = cpu_micros()?;
        write(&writer, settings.rate, settings.seconds, events).await?;
        let (u1, s1) = cpu_micros()?;
        let baseline = (u1 - u0) + (s1 - s0);

        let watchers: Vec<_> = futures::stream::iter(0..n)
            .map(|_| client.watch("bench/ev/").prefix().into_future())
            .buffer_unordered(settings.window)
            .try_collect()
            .await?;
        let delivered = Arc::new(AtomicU64::new(0));
        let responses = Arc::new(AtomicU64::new(0));
        let lasts: Arc<Vec<AtomicI64>> = Arc::new((0..n).map(|_| AtomicI64::new(0)).collect());
        let readers: Vec<_> = watchers
            .into_iter()
            .enumerate()
            .map(|(i, mut w)| {
                let (delivered, responses, lasts) =
                    (delivered.clone(), responses.clone(), lasts.clone());
                tokio::spawn(async move {
                    while let Some(Ok(b)) = w.next().await {
                        if let Some(e) = b.events().last() {
                            delivered.fetch_add(b.len() as u64, Ordering::Relaxed);
                            responses.fetch_add(1, Ordering::Relaxed);
                            lasts[i].store(e.revision(), Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();

        let (u0, s0) = cpu_micros()?;
        let started = Instant::now();
        let last = write(&writer, settings.rate, settings.seconds, events).await?;
        let deadline = Instant::now() + Duration::from_secs(120);
        while lasts.iter().any(|l| l.load(Ordering::Relaxed) < last) {
            if Instant::now() > deadline {
                return Err("watchers did not catch up within 120 s".into());
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let wall = started.elapsed();
        let (u1, s1) = cpu_micros()?;
        let (user, sys) = (u1 - u0, s1 - s0);
        let watch_cpu = (user + sys - baseline).max(0.0);
        let ev = delivered.load(Ordering::Relaxed) as f64;
        let resp = responses.load(Ordering::Relaxed) as f64;
        println!(
            "  deliver {events:>2} event(s)/revision, {n} watchers, {} rev/s for {} s: {ev:.0} events \
             in {resp:.0} batches, {:.3} s; client CPU {:.3} s total, {:.3} s for the writes alone \
             -> {:.2} µs/event, {:.2} µs/response, {:.0} events/s",
            settings.rate,
            settings.seconds,
            wall.as_secs_f64(),
            (user + sys) / 1e6,
            baseline / 1e6,
            watch_cpu / ev,
            watch_cpu / resp,
            ev / wall.as_secs_f64(),
        );
        println!(
            "{{\"bench\":\"watch_mux\",\"phase\":\"deliver\",\"smoke\":{},\"etcd\":\"{etcd}\",\
             \"watchers\":{n},\"events_per_revision\":{events},\"rate\":{},\"seconds\":{},\
             \"events\":{ev:.0},\"responses\":{resp:.0},\"cpu_us_per_event\":{:.3},\
             \"cpu_us_per_response\":{:.3}}}",
            settings.smoke,
            settings.rate,
            settings.seconds,
            watch_cpu / ev,
            watch_cpu / resp,
        );
        for r in readers {
            r.abort();
        }
    }
    client.close().await;
    writer.close().await;
    Ok(())
}

fn main() -> Result<(), BoxError> {
    let settings = Settings::from_env()?;
    let cluster = EtcdCluster::builder().start()?;
    let endpoints = cluster.endpoints();
    let etcd = cluster.version().to_owned();
    println!(
        "watch_mux{} against etcd {etcd} ({})",
        if settings.smoke { " (smoke run)" } else { "" },
        cluster.binary().display()
    );
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(creation(&settings, &endpoints, &etcd, cluster.pid(0)))?;
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(settings.worker_threads)
        .enable_all()
        .build()?
        .block_on(delivery(&settings, &endpoints, &etcd))?;
    drop(cluster);
    Ok(())
}
