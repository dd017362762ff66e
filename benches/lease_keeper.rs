//! Client cost of keeping many leases alive: CPU per kept lease per minute, memory per kept
//! lease, for 10,000 and 100,000 leases on one client (one keep-alive stream).
//!
//! For each lease count N (a fresh process and a fresh etcd each, so that one run's memory
//! does not blur the next), the bench:
//!
//! 1. grants N leases with TTL `TTL` and keeps each one (`lease().grant(ttl).keep_alive()`),
//!    256 grants in flight at a time;
//! 2. lets the keeper run for one TTL to settle (every lease refreshed at least twice);
//! 3. measures, over `MEASURE_SECS` of steady state, the CPU time of **this process** (user +
//!    sys, `getrusage(RUSAGE_SELF)`; etcd is another process and not counted), and reports it
//!    as µs of CPU per kept lease per minute and as the share of one core per 10,000 leases;
//! 4. reports memory per kept lease: the growth of this process's resident set
//!    (`/proc/self/statm`) from before the first grant to the end of the window, divided by N.
//!    It covers everything a kept lease costs the application: the `KeptLease` handle, the
//!    keeper's entry, status channel and timer, plus allocator overhead;
//! 5. checks that the keeper used one stream and that every lease is alive and was refreshed
//!    within the last third of its TTL.
//!
//! The target is one stream and at most 1% of one core per 10,000 leases at TTL 30 s.
//!
//! # Running it
//!
//! ```text
//! cargo bench --bench lease_keeper                      # 10,000 and 100,000 leases, TTL 30 s
//! LEASES=10000 MEASURE_SECS=30 cargo bench --bench lease_keeper
//! ETCD_BIN=/usr/bin/etcd cargo bench --bench lease_keeper
//! ```
//!
//! Environment: `LEASES` (comma-separated lease counts, default `10000,100000`), `TTL`
//! (seconds, default 30), `MEASURE_SECS` (default 60), `WORKER_THREADS` (default 2),
//! `ETCD_BIN` (see [`etcdv3::testkit::find_etcd_binary`]).
//!
//! Under `cargo test` (no `--bench` argument) it runs a smoke version: 200 leases, TTL 3 s,
//! a 3 s window. Each run ends with a one-line JSON summary (a line starting with `{`).

use std::error::Error;
use std::future::IntoFuture;
use std::process::Command;
use std::time::{Duration, Instant};

use etcdv3::testkit::EtcdCluster;
use etcdv3::{Client, KeptLease};
use futures::StreamExt;
use nix::sys::resource::{UsageWho, getrusage};
use nix::unistd::{SysconfVar, sysconf};

type BoxError = Box<dyn Error + Send + Sync>;

const GRANT_CONCURRENCY: usize = 256;

struct Settings {
    smoke: bool,
    leases: Vec<usize>,
    ttl: i64,
    measure: Duration,
    worker_threads: usize,
}

fn env_num(
    name: &str,
    default: u64,
    range: std::ops::RangeInclusive<u64>,
) -> Result<u64, BoxError> {
    let Ok(raw) = std::env::var(name) else {
        return Ok(default);
    };
    let v: u64 = raw
        .trim()
        .replace('_', "")
        .parse()
        .map_err(|e| format!("{name}={raw:?}: {e}"))?;
    if !range.contains(&v) {
        return Err(format!("{name}={v} is outside {}..={}", range.start(), range.end()).into());
    }
    Ok(v)
}

impl Settings {
    fn from_env() -> Result<Self, BoxError> {
        let smoke = !std::env::args().any(|a| a == "--bench");
        let worker_threads = env_num("WORKER_THREADS", 2, 1..=256)? as usize;
        if smoke {
            return Ok(Settings {
                smoke,
                leases: vec![200],
                ttl: 3,
                measure: Duration::from_secs(3),
                worker_threads,
            });
        }
        let leases = match std::env::var("LEASES") {
            Ok(v) => v
                .split(',')
                .map(|s| s.trim().replace('_', "").parse::<usize>())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("LEASES={v:?}: {e}"))?,
            Err(_) => vec![10_000, 100_000],
        };
        if leases.is_empty() || leases.iter().any(|n| !(1..=1_000_000).contains(n)) {
            return Err("LEASES: counts from 1 to 1,000,000".into());
        }
        Ok(Settings {
            smoke,
            leases,
            ttl: env_num("TTL", 30, 2..=3600)? as i64,
            measure: Duration::from_secs(env_num("MEASURE_SECS", 60, 1..=3600)?),
            worker_threads,
        })
    }
}

fn cpu_micros() -> Result<f64, BoxError> {
    let u = getrusage(UsageWho::RUSAGE_SELF)?;
    let m = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 * 1e6 + tv.tv_usec() as f64;
    Ok(m(u.user_time()) + m(u.system_time()))
}

/// Resident set size in bytes, from `/proc/self/statm` (second field, in pages).
fn rss_bytes() -> Result<u64, BoxError> {
    let statm = std::fs::read_to_string("/proc/self/statm")?;
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .ok_or("short /proc/self/statm")?
        .parse()?;
    let page = sysconf(SysconfVar::PAGE_SIZE)?.unwrap_or(4096) as u64;
    Ok(pages * page)
}

async fn run_one(n: usize, settings: &Settings) -> Result<String, BoxError> {
    let cluster = EtcdCluster::builder().start_async().await?;
    let client = Client::builder(cluster.endpoints())
        .request_timeout(Duration::from_secs(30))
        .connect()
        .await?;
    let lease = client.lease();
    let ttl = settings.ttl;

    let rss0 = rss_bytes()?;
    let start = Instant::now();
    let kept: Vec<KeptLease> = futures::stream::iter(0..n)
        .map(|_| lease.grant(ttl).keep_alive().into_future())
        .buffer_unordered(GRANT_CONCURRENCY)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    let grant_time = start.elapsed();

    // Settle: one TTL, so every lease has been refreshed (at about TTL/3) at least twice.
    tokio::time::sleep(Duration::from_secs(ttl as u64)).await;
    let cpu0 = cpu_micros()?;
    let t0 = Instant::now();
    tokio::time::sleep(settings.measure).await;
    let cpu1 = cpu_micros()?;
    let window = t0.elapsed();
    let rss1 = rss_bytes()?;

    // Checks: one stream, every lease alive and refreshed within the last third of its TTL
    // (plus the refresh grid and some slack).
    let streams = lease.keeper_streams_opened();
    let now = Instant::now();
    let fresh_within = Duration::from_secs(ttl as u64) / 3 + Duration::from_secs(1);
    let lost = kept.iter().filter(|k| k.lost_reason().is_some()).count();
    let stale = kept
        .iter()
        .filter(|k| now.duration_since(k.status().acknowledged_at) > fresh_within)
        .count();

    let cpu_us = cpu1 - cpu0;
    let minutes = window.as_secs_f64() / 60.0;
    let us_per_lease_min = cpu_us / n as f64 / minutes;
    let core_share = cpu_us / (window.as_secs_f64() * 1e6);
    let core_pct_per_10k = core_share * 100.0 * 10_000.0 / n as f64;
    let refreshes_per_s = n as f64 * 3.0 / ttl as f64;
    let bytes_per_lease = rss1.saturating_sub(rss0) as f64 / n as f64;

    println!(
        "lease_keeper{}: {n} kept leases",
        if settings.smoke { " (smoke run)" } else { "" }
    );
    println!(
        "  server            etcd {} ({})",
        cluster.version(),
        cluster.binary().display()
    );
    println!(
        "  workload          TTL {ttl} s (~{refreshes_per_s:.0} refreshes/s), {} worker threads, \
         measured {:.1} s",
        settings.worker_threads,
        window.as_secs_f64()
    );
    println!(
        "  granted           in {:.2} s ({:.0} grants/s)",
        grant_time.as_secs_f64(),
        n as f64 / grant_time.as_secs_f64()
    );
    println!("  keep-alive streams {streams}; lost {lost}; not refreshed lately {stale}");
    println!(
        "  client CPU        {us_per_lease_min:.2} µs per kept lease per minute; \
         {:.3}% of one core in all, {core_pct_per_10k:.3}% per 10,000 leases; \
         {:.2} µs per refresh",
        core_share * 100.0,
        cpu_us / (refreshes_per_s * window.as_secs_f64())
    );
    println!(
        "  memory            {bytes_per_lease:.0} B per kept lease (RSS {:.1} -> {:.1} MiB)",
        rss0 as f64 / 1048576.0,
        rss1 as f64 / 1048576.0
    );
    let json = format!(
        "{{\"bench\":\"lease_keeper\",\"smoke\":{},\"etcd\":\"{}\",\"leases\":{n},\"ttl_s\":{ttl},\
         \"window_s\":{:.2},\"grant_s\":{:.3},\"streams\":{streams},\"lost\":{lost},\"stale\":{stale},\
         \"cpu_us_per_lease_min\":{us_per_lease_min:.3},\"core_pct_per_10k\":{core_pct_per_10k:.4},\
         \"bytes_per_lease\":{bytes_per_lease:.0}}}",
        settings.smoke,
        cluster.version(),
        window.as_secs_f64(),
        grant_time.as_secs_f64()
    );
    println!("{json}");
    if streams != 1 || lost != 0 || stale != 0 {
        return Err(
            format!("keeper check failed: {streams} streams, {lost} lost, {stale} stale").into(),
        );
    }
    drop(kept);
    client.close().await;
    drop(cluster);
    Ok(json)
}

fn main() -> Result<(), BoxError> {
    let settings = Settings::from_env()?;
    if settings.leases.len() > 1 {
        // One child process per lease count, so each starts from a clean heap.
        let exe = std::env::current_exe()?;
        let args: Vec<String> = std::env::args().skip(1).collect();
        for n in &settings.leases {
            let status = Command::new(&exe)
                .args(&args)
                .env("LEASES", n.to_string())
                .status()?;
            if !status.success() {
                return Err(format!("the run with {n} leases failed ({status})").into());
            }
        }
        return Ok(());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(settings.worker_threads)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        for &n in &settings.leases {
            run_one(n, &settings).await?;
        }
        Ok(())
    })
}
