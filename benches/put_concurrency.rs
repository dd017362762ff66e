//! Client CPU cost per put at concurrency 64 over one connection.
//!
//! One [`Client`] (so one pinned HTTP/2 connection) is shared by 64 tasks on a
//! multi-thread tokio runtime; together they issue puts of 64-byte values to
//! 16-byte keys drawn from a key space of 10,000. After a warm-up of 2,000 puts,
//! a measured run of `PUTS` puts reports:
//!
//! - wall time and puts/s;
//! - the CPU time of **this process** (user + sys, from `getrusage(RUSAGE_SELF)`)
//!   divided by the number of puts, i.e. µs of client CPU per put, with the user
//!   and sys split. The etcd server is a separate process, so its CPU is not
//!   counted.
//!
//! The report ends with a one-line JSON summary (a line starting with `{`).
//!
//! # Running it
//!
//! ```text
//! cargo bench --bench put_concurrency
//! ETCD_BIN=/path/to/etcd PUTS=100000 WORKER_THREADS=4 cargo bench --bench put_concurrency
//! ETCD_ENDPOINTS=http://127.0.0.1:2379 cargo bench --bench put_concurrency
//! ```
//!
//! Environment:
//!
//! - `ETCD_ENDPOINTS`: comma-separated endpoints of an existing etcd; without it
//!   a throwaway etcd is started through the test kit (`ETCD_BIN` picks the
//!   binary, see [`etcdv3::testkit::find_etcd_binary`]).
//! - `PUTS`: measured puts (default 50,000; 1 to 10,000,000).
//! - `WORKER_THREADS`: tokio worker threads (default 2; 1 to 256).
//!
//! Under `cargo test` (no `--bench` argument) it runs a smoke version of 200
//! puts instead, so the test-suite exercises it without paying for a full run.

use std::error::Error;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use etcdv3::testkit::EtcdCluster;
use etcdv3::{Bytes, Client, Kv};
use nix::sys::resource::{Usage, UsageWho, getrusage};

type BoxError = Box<dyn Error + Send + Sync>;

/// Concurrent tasks issuing puts.
const CONCURRENCY: usize = 64;
/// Distinct keys.
const KEY_SPACE: usize = 10_000;
/// Value size in bytes.
const VALUE_LEN: usize = 64;
/// Puts before the measured run (full run).
const WARMUP_PUTS: usize = 2_000;
/// Measured puts by default (full run).
const DEFAULT_PUTS: usize = 50_000;
/// Upper bound on `PUTS`.
const MAX_PUTS: usize = 10_000_000;
/// Warm-up and measured puts of the smoke run (under `cargo test`).
const SMOKE_WARMUP_PUTS: usize = 100;
const SMOKE_PUTS: usize = 200;
const DEFAULT_WORKER_THREADS: usize = 2;
const MAX_WORKER_THREADS: usize = 256;

struct Settings {
    smoke: bool,
    puts: usize,
    warmup: usize,
    worker_threads: usize,
    endpoints: Option<Vec<String>>,
}

impl Settings {
    fn from_env() -> Result<Self, BoxError> {
        // `cargo bench` passes `--bench`; `cargo test` does not.
        let smoke = !std::env::args().any(|a| a == "--bench");
        let worker_threads = env_usize(
            "WORKER_THREADS",
            DEFAULT_WORKER_THREADS,
            1..=MAX_WORKER_THREADS,
        )?;
        let (puts, warmup) = if smoke {
            (SMOKE_PUTS, SMOKE_WARMUP_PUTS)
        } else {
            (env_usize("PUTS", DEFAULT_PUTS, 1..=MAX_PUTS)?, WARMUP_PUTS)
        };
        let endpoints = std::env::var("ETCD_ENDPOINTS")
            .ok()
            .map(|v| {
                v.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect::<Vec<_>>()
            })
            .filter(|v| !v.is_empty());
        Ok(Self {
            smoke,
            puts,
            warmup,
            worker_threads,
            endpoints,
        })
    }
}

fn env_usize(
    name: &str,
    default: usize,
    range: std::ops::RangeInclusive<usize>,
) -> Result<usize, BoxError> {
    let Ok(raw) = std::env::var(name) else {
        return Ok(default);
    };
    let value: usize = raw
        .trim()
        .replace('_', "")
        .parse()
        .map_err(|e| format!("{name}={raw:?}: {e}"))?;
    if !range.contains(&value) {
        return Err(format!(
            "{name}={value} is outside {}..={}",
            range.start(),
            range.end()
        )
        .into());
    }
    Ok(value)
}

/// The keys: `bench/key/000000` .. `bench/key/009999`, 16 bytes each.
fn make_keys() -> Arc<[Bytes]> {
    (0..KEY_SPACE)
        .map(|i| {
            let key = format!("bench/key/{i:06}");
            debug_assert_eq!(key.len(), 16);
            Bytes::from(key)
        })
        .collect()
}

/// Issues `count` puts from `CONCURRENCY` tasks sharing `kv`; returns the wall time.
async fn run_puts(
    kv: &Kv,
    keys: &Arc<[Bytes]>,
    value: &Bytes,
    count: usize,
    first: usize,
) -> Result<Duration, BoxError> {
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(CONCURRENCY);
    for _ in 0..CONCURRENCY {
        let kv = kv.clone();
        let keys = Arc::clone(keys);
        let value = value.clone();
        let next = Arc::clone(&next);
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    return Ok::<(), etcdv3::Error>(());
                }
                // Stride through the key space so that concurrent puts mostly hit
                // different keys (7,919 is prime, so coprime with 10,000).
                let key = &keys[(first + i).wrapping_mul(7_919) % KEY_SPACE];
                kv.put(key.clone(), value.clone()).await?;
            }
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(start.elapsed())
}

fn cpu_micros(usage: &Usage) -> (f64, f64) {
    let micros = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 * 1e6 + tv.tv_usec() as f64;
    (micros(usage.user_time()), micros(usage.system_time()))
}

async fn bench(settings: &Settings) -> Result<(), BoxError> {
    // Keep the cluster (if any) alive until the end; dropping it stops etcd.
    let (endpoints, cluster) = match &settings.endpoints {
        Some(endpoints) => (endpoints.clone(), None),
        None => {
            let cluster = EtcdCluster::builder().start_async().await?;
            (cluster.endpoints(), Some(cluster))
        }
    };
    let server = match &cluster {
        Some(c) => format!("etcd {} (testkit, {})", c.version(), c.binary().display()),
        None => format!("external ({})", endpoints.join(",")),
    };
    let etcd_version = cluster.as_ref().map_or("external", |c| c.version());

    let client = Client::builder(endpoints).connect().await?;
    let kv = client.kv();
    let keys = make_keys();
    let value = Bytes::from(vec![b'v'; VALUE_LEN]);

    run_puts(&kv, &keys, &value, settings.warmup, 0).await?;

    let before = getrusage(UsageWho::RUSAGE_SELF)?;
    let wall = run_puts(&kv, &keys, &value, settings.puts, settings.warmup).await?;
    let after = getrusage(UsageWho::RUSAGE_SELF)?;

    let (user0, sys0) = cpu_micros(&before);
    let (user1, sys1) = cpu_micros(&after);
    let n = settings.puts as f64;
    let user_per_put = (user1 - user0) / n;
    let sys_per_put = (sys1 - sys0) / n;
    let cpu_per_put = user_per_put + sys_per_put;
    let puts_per_s = n / wall.as_secs_f64();
    let cpu_utilisation = (user1 - user0 + sys1 - sys0) / (wall.as_secs_f64() * 1e6);
    let vcsw = after.voluntary_context_switches() - before.voluntary_context_switches();
    let ivcsw = after.involuntary_context_switches() - before.involuntary_context_switches();

    println!(
        "put_concurrency{}",
        if settings.smoke { " (smoke run)" } else { "" }
    );
    println!("  server          {server}");
    println!(
        "  workload        {} puts ({} warm-up), concurrency {CONCURRENCY}, 1 connection, \
         {} worker threads, 16 B keys / {KEY_SPACE} keys, {VALUE_LEN} B values",
        settings.puts, settings.warmup, settings.worker_threads
    );
    println!(
        "  wall            {:.3} s, {puts_per_s:.0} puts/s",
        wall.as_secs_f64()
    );
    println!(
        "  client CPU/put  {cpu_per_put:.2} µs (user {user_per_put:.2} µs, sys {sys_per_put:.2} µs)"
    );
    println!(
        "  client CPU      {:.2} cores busy on average",
        cpu_utilisation
    );
    println!(
        "  ctx switches    {:.3} voluntary/put, {:.3} involuntary/put",
        vcsw as f64 / n,
        ivcsw as f64 / n
    );
    println!(
        "{{\"bench\":\"put_concurrency\",\"smoke\":{},\"etcd\":\"{etcd_version}\",\"puts\":{},\
         \"concurrency\":{CONCURRENCY},\"worker_threads\":{},\"wall_s\":{:.4},\
         \"puts_per_s\":{puts_per_s:.0},\"cpu_us_per_put\":{cpu_per_put:.3},\
         \"user_us_per_put\":{user_per_put:.3},\"sys_us_per_put\":{sys_per_put:.3}}}",
        settings.smoke,
        settings.puts,
        settings.worker_threads,
        wall.as_secs_f64()
    );

    client.close().await;
    drop(cluster);
    Ok(())
}

fn main() -> Result<(), BoxError> {
    let settings = Settings::from_env()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(settings.worker_threads)
        .enable_all()
        .build()?;
    runtime.block_on(bench(&settings))
}
