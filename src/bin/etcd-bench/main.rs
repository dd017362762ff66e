//! `etcd-bench`: benchmark etcd (and this client) with the workloads of etcd's own `benchmark`
//! tool. Without `--endpoints` it starts a throwaway local etcd through the testkit (data in a
//! temp dir, removed at exit).
//!
//! ```text
//! cargo run --release --features bench --bin etcd-bench -- put --total 20000 --clients 64
//! cargo run --release --features bench --bin etcd-bench -- range foo --consistency s
//! ```

mod kv;
mod report;
mod watch;

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use etcdv3::Client;
use etcdv3::testkit::EtcdCluster;

use report::Report;

/// Benchmark etcd through the etcdv3 client.
#[derive(Parser, Debug)]
#[command(name = "etcd-bench", version, about, long_about = None)]
struct Cli {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    workload: Workload,
}

/// Flags every workload understands (etcd benchmark's names).
#[derive(Args, Debug, Clone)]
struct Common {
    /// Comma-separated etcd endpoints; without it a throwaway local etcd is started.
    #[arg(long, value_delimiter = ',', global = true)]
    endpoints: Vec<String>,
    /// The etcd binary for the throwaway server (default: ETCD_BIN, PATH, /usr/bin/etcd).
    #[arg(long, global = true)]
    etcd_bin: Option<String>,
    /// Number of gRPC connections (clients).
    #[arg(long, default_value_t = 1, global = true)]
    conns: usize,
    /// Number of concurrent workers issuing requests, spread over the connections.
    #[arg(long, default_value_t = 1, global = true)]
    clients: usize,
    /// Total number of requests.
    #[arg(long, default_value_t = 10000, global = true)]
    total: u64,
    /// Maximum requests per second in all (0: unlimited).
    #[arg(long, default_value_t = 0, global = true)]
    rate: u64,
    /// Key size in bytes.
    #[arg(long, default_value_t = 8, global = true)]
    key_size: usize,
    /// Value size in bytes.
    #[arg(long, default_value_t = 8, global = true)]
    val_size: usize,
    /// Number of distinct keys.
    #[arg(long, default_value_t = 1, global = true)]
    key_space_size: u64,
    /// Use sequential keys instead of random ones.
    #[arg(long, global = true)]
    sequential_keys: bool,
    /// Stop after this long even if `--total` is not reached (e.g. 30s, 2m).
    #[arg(long, value_parser = parse_duration, global = true)]
    duration: Option<Duration>,
    /// Print one JSON object instead of the text report.
    #[arg(long, global = true)]
    json: bool,
    /// Client runtime threads: 0 = a multi-thread tokio runtime with one worker per core,
    /// 1 = a current-thread runtime (everything on one thread), N = N worker threads.
    #[arg(long, default_value_t = 0, global = true)]
    threads: usize,
}

#[derive(Subcommand, Debug)]
enum Workload {
    /// Write keys (Put).
    Put,
    /// Read a key or range (Range).
    Range(kv::RangeArgs),
    /// Transactions of puts.
    TxnPut(kv::TxnPutArgs),
    /// Transactions mixing reads and writes.
    TxnMixed(kv::TxnMixedArgs),
    /// Many watchers on few streams while a separate process writes: creation latency,
    /// events/s, events per response, client CPU per event and per response.
    Watch(watch::WatchArgs),
    /// Put-to-event latency (the put time travels in the value).
    WatchLatency(watch::WatchArgs),
    /// Range reads while many watchers are open.
    WatchGet(watch::WatchArgs),
    /// One watcher replaying a long history.
    WatchCatchup(watch::CatchupArgs),
    /// Keep many leases alive on one keep-alive stream.
    LeaseKeepalive(watch::LeaseArgs),
    /// Software transactions (read keys, write them back; conflicts retried).
    Stm(kv::StmArgs),
}

/// Parse `500ms`, `30s`, `2m`, `1h` or plain seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let v: f64 = num.parse().map_err(|_| format!("bad duration {s:?}"))?;
    let mult = match unit {
        "ms" => 0.001,
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        _ => return Err(format!("bad duration unit in {s:?} (use ms, s, m, h)")),
    };
    if !(v.is_finite() && v >= 0.0) {
        return Err(format!("bad duration {s:?}"));
    }
    Duration::try_from_secs_f64(v * mult).map_err(|_| format!("duration {s:?} is too long"))
}

/// What a workload runs against: the clients, and the common flags.
pub(crate) struct Bench {
    pub(crate) clients: Vec<Client>,
    pub(crate) common: Common,
    pub(crate) progress: Option<indicatif::ProgressBar>,
}

impl Bench {
    /// The client worker `i` uses.
    pub(crate) fn client(&self, i: usize) -> &Client {
        &self.clients[i % self.clients.len()]
    }

    /// Key number `i` of the key space, `key_size` bytes.
    pub(crate) fn key(&self, i: u64) -> Vec<u8> {
        let n = if self.common.key_space_size == 0 {
            i
        } else {
            i % self.common.key_space_size
        };
        key_bytes(n, self.common.key_size)
    }

    /// The key for request `seq`: sequential or random.
    pub(crate) fn pick_key(&self, seq: u64) -> Vec<u8> {
        if self.common.sequential_keys {
            self.key(seq)
        } else {
            self.key(rand::random::<u64>())
        }
    }

    /// The value payload.
    pub(crate) fn value(&self) -> Vec<u8> {
        vec![b'v'; self.common.val_size]
    }

    pub(crate) fn tick(&self) {
        if let Some(p) = &self.progress {
            p.inc(1);
        }
    }
}

/// `n` in decimal, right-aligned in `size` bytes (at least 1) padded with `'0'`; only the
/// low digits when it has more. Written in place: this runs for every request, inside the
/// measured CPU time.
fn key_bytes(mut n: u64, size: usize) -> Vec<u8> {
    let mut k = vec![b'0'; size.max(1)];
    for b in k.iter_mut().rev() {
        *b = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    k
}

/// Pacing for `--rate`, shared by every worker (as etcd's benchmark shares one limiter):
/// each request takes the next slot, `1/rate` after the one before, so the total rate holds
/// whatever the number of workers and no burst goes out at the start.
#[derive(Clone)]
pub(crate) struct Pacer {
    slots: Option<(Arc<std::sync::Mutex<tokio::time::Instant>>, Duration)>,
}

impl Pacer {
    pub(crate) fn new(rate: u64) -> Self {
        let slots = (rate > 0).then(|| {
            let interval = Duration::from_secs_f64(1.0 / rate as f64);
            (
                Arc::new(std::sync::Mutex::new(tokio::time::Instant::now())),
                interval,
            )
        });
        Pacer { slots }
    }

    /// Wait for this request's slot (or until `deadline`, the end of the run, if sooner).
    pub(crate) async fn wait(&self, deadline: Option<std::time::Instant>) {
        let Some((next, interval)) = &self.slots else {
            return;
        };
        let slot = {
            let mut next = next
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let slot = (*next).max(tokio::time::Instant::now());
            *next = slot + *interval;
            slot
        };
        let until = deadline.map_or(slot, |d| slot.min(tokio::time::Instant::from_std(d)));
        tokio::time::sleep_until(until).await;
    }
}

async fn run(cli: Cli) -> Result<Report, String> {
    let c = &cli.common;
    if c.conns == 0 || c.clients == 0 {
        return Err("--conns and --clients must be at least 1".into());
    }
    if c.key_size == 0 {
        return Err("--key-size must be at least 1".into());
    }
    // A throwaway etcd when no endpoints are given.
    let mut _etcd = None;
    let endpoints = if c.endpoints.is_empty() {
        let mut b = EtcdCluster::builder();
        if let Some(bin) = &c.etcd_bin {
            b = b.binary(bin);
        }
        let cluster = b
            .start_async()
            .await
            .map_err(|e| format!("could not start a throwaway etcd: {e}"))?;
        eprintln!(
            "etcd-bench: no --endpoints given: started a throwaway etcd {} at {} (data in a temp dir, removed at exit)",
            cluster.version(),
            cluster.endpoint(0)
        );
        let eps = cluster.endpoints();
        _etcd = Some(cluster);
        eps
    } else {
        c.endpoints.clone()
    };
    let mut clients = Vec::with_capacity(c.conns);
    for _ in 0..c.conns {
        let client = Client::builder(endpoints.clone())
            .connect_timeout(Duration::from_secs(3))
            .request_timeout(Duration::from_secs(30))
            .connect()
            .await
            .map_err(|e| format!("cannot reach etcd: {e}"))?;
        clients.push(client);
    }
    // A member that accepts connections but never answers (stopped, or behind a black hole)
    // would hold every request for the whole request timeout: check that etcd answers.
    if let Some(c) = clients.first() {
        c.maintenance()
            .status()
            .timeout(Duration::from_secs(5))
            .await
            .map_err(|e| format!("etcd does not answer: {e}"))?;
    }
    let counted = matches!(
        cli.workload,
        Workload::Put
            | Workload::Range(_)
            | Workload::TxnPut(_)
            | Workload::TxnMixed(_)
            | Workload::WatchGet(_)
    );
    let progress = (counted && std::io::stderr().is_terminal()).then(|| {
        let p = indicatif::ProgressBar::new(c.total);
        p.set_style(
            indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} {per_sec} eta {eta}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        p
    });
    let bench = Arc::new(Bench {
        clients,
        common: c.clone(),
        progress,
    });
    let report = match &cli.workload {
        Workload::Put => kv::put(&bench).await,
        Workload::Range(a) => kv::range(&bench, a).await,
        Workload::TxnPut(a) => kv::txn_put(&bench, a).await,
        Workload::TxnMixed(a) => kv::txn_mixed(&bench, a).await,
        Workload::Watch(a) => watch::watch(&bench, a).await,
        Workload::WatchLatency(a) => watch::watch_latency(&bench, a).await,
        Workload::WatchGet(a) => watch::watch_get(&bench, a).await,
        Workload::WatchCatchup(a) => watch::watch_catchup(&bench, a).await,
        Workload::LeaseKeepalive(a) => watch::lease_keepalive(&bench, a).await,
        Workload::Stm(a) => kv::stm(&bench, a).await,
    };
    if let Some(p) = &bench.progress {
        p.finish_and_clear();
    }
    report
}

fn main() -> ExitCode {
    // clap prints usage and exits with code 2 on bad flags.
    let cli = Cli::parse();
    let json = cli.common.json;
    let rt = match cli.common.threads {
        1 => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        0 => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build(),
        n => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build(),
    };
    let rt = match rt {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("etcd-bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(mut report) => {
            if json {
                println!("{}", report.json());
            } else {
                println!("{}", report.text());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("etcd-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_zero_padded_decimal() {
        assert_eq!(key_bytes(0, 4), b"0000");
        assert_eq!(key_bytes(42, 4), b"0042");
        assert_eq!(key_bytes(1234, 4), b"1234");
        assert_eq!(key_bytes(98765, 3), b"765");
        assert_eq!(key_bytes(7, 0), b"7");
        assert_eq!(key_bytes(u64::MAX, 20), u64::MAX.to_string().as_bytes());
        assert_eq!(key_bytes(5, 8), format!("{:0>8}", 5).as_bytes());
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("3x").is_err());
        assert!(
            parse_duration("99999999999999999999").is_err(),
            "too long: no panic"
        );
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn flags_parse_like_etcd_benchmark() {
        let cli = Cli::try_parse_from([
            "etcd-bench",
            "--endpoints",
            "127.0.0.1:1,127.0.0.1:2",
            "--conns",
            "2",
            "--clients",
            "8",
            "put",
            "--total",
            "5",
            "--key-space-size",
            "100",
            "--sequential-keys",
        ])
        .unwrap();
        assert_eq!(cli.common.endpoints.len(), 2);
        assert_eq!(cli.common.total, 5);
        assert!(cli.common.sequential_keys);
        assert!(matches!(cli.workload, Workload::Put));
        let err = Cli::try_parse_from(["etcd-bench", "put", "--total", "many"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
    }
}
