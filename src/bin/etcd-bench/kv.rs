//! Key-value workloads: put, range, txn-put, txn-mixed.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use clap::Args;
use etcdv3::{Compare, CompareOp, Op};

use crate::report::{Meter, Report};
use crate::{Bench, Pacer};

/// Run `op` `--total` times (or for `--duration`) from `--clients` workers and measure it.
pub(crate) async fn drive<F, Fut>(bench: &Arc<Bench>, name: &str, op: F) -> Result<Report, String>
where
    F: Fn(Arc<Bench>, usize, u64) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = etcdv3::Result<()>> + Send,
{
    let c = &bench.common;
    let next = Arc::new(AtomicU64::new(0));
    let deadline = c.duration.map(|d| Instant::now() + d);
    let pacer = Pacer::new(c.rate);
    let meter = Meter::start();
    let mut workers = Vec::with_capacity(c.clients);
    for w in 0..c.clients {
        let (bench, next, op) = (bench.clone(), next.clone(), op.clone());
        let pacer = pacer.clone();
        workers.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0u64;
            let mut first_error = None;
            loop {
                let seq = next.fetch_add(1, Ordering::Relaxed);
                if seq >= bench.common.total || deadline.is_some_and(|d| Instant::now() >= d) {
                    break;
                }
                pacer.wait(deadline).await;
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    break;
                }
                let t = Instant::now();
                match op(bench.clone(), w, seq).await {
                    Ok(()) => lat.push(t.elapsed()),
                    Err(e) => {
                        errors += 1;
                        first_error.get_or_insert_with(|| e.to_string());
                    }
                }
                bench.tick();
            }
            (lat, errors, first_error)
        }));
    }
    let mut report = Report::new(name);
    let mut first_error = None;
    for w in workers {
        let (lat, errors, fe) = w.await.map_err(|e| format!("a worker failed: {e}"))?;
        report.latencies.extend(lat);
        report.errors += errors;
        if first_error.is_none() {
            first_error = fe;
        }
    }
    let (wall, user, sys, switches) = meter.finish();
    report.wall = wall;
    report.cpu_user = user;
    report.cpu_sys = sys;
    report.switches = switches;
    if report.latencies.is_empty() && report.errors > 0 {
        return Err(format!(
            "every request failed; first error: {}",
            first_error.unwrap_or_default()
        ));
    }
    if let Some(e) = first_error {
        eprintln!(
            "etcd-bench: {} requests failed; first error: {e}",
            report.errors
        );
    }
    Ok(report)
}

pub(crate) async fn put(bench: &Arc<Bench>) -> Result<Report, String> {
    let value = bytes::Bytes::from(bench.value());
    drive(bench, "put", move |b, w, seq| {
        let value = value.clone();
        async move {
            b.client(w).kv().put(b.pick_key(seq), value).await?;
            Ok(())
        }
    })
    .await
}

/// `range` flags.
#[derive(Args, Debug)]
pub(crate) struct RangeArgs {
    /// The key to read (default: the first key of the key space).
    key: Option<String>,
    /// Read the range [key, end) instead of one key.
    end: Option<String>,
    /// `l` for linearizable, `s` for serializable reads.
    #[arg(long, default_value = "l")]
    consistency: String,
    /// Maximum keys per read (0: no limit).
    #[arg(long, default_value_t = 0)]
    limit: i64,
    /// Only count the keys.
    #[arg(long)]
    count_only: bool,
}

pub(crate) async fn range(bench: &Arc<Bench>, a: &RangeArgs) -> Result<Report, String> {
    let serializable = match a.consistency.as_str() {
        "l" => false,
        "s" => true,
        other => return Err(format!("--consistency must be l or s, not {other:?}")),
    };
    let key: Vec<u8> = match &a.key {
        Some(k) => k.clone().into_bytes(),
        None => bench.key(0),
    };
    // Make sure there is something to read.
    bench
        .client(0)
        .kv()
        .put(key.clone(), bench.value())
        .await
        .map_err(|e| format!("seeding the key: {e}"))?;
    let end = a.end.clone();
    let (limit, count_only) = (a.limit, a.count_only);
    let name = if serializable {
        "range (serializable)"
    } else {
        "range (linearizable)"
    };
    drive(bench, name, move |b, w, _seq| {
        let (key, end) = (key.clone(), end.clone());
        async move {
            let mut g = b.client(w).kv().get(key).limit(limit);
            if let Some(e) = end {
                g = g.range(e);
            }
            if serializable {
                g = g.serializable();
            }
            if count_only {
                g = g.count_only();
            }
            g.await?;
            Ok(())
        }
    })
    .await
}

/// `txn-put` flags.
#[derive(Args, Debug)]
pub(crate) struct TxnPutArgs {
    /// Puts per transaction.
    #[arg(long, default_value_t = 1)]
    txn_ops: usize,
}

pub(crate) async fn txn_put(bench: &Arc<Bench>, a: &TxnPutArgs) -> Result<Report, String> {
    if a.txn_ops == 0 {
        return Err("--txn-ops must be at least 1".into());
    }
    let n = a.txn_ops as u64;
    let space = bench.common.key_space_size;
    if space != 0 && space < n {
        // etcd refuses a transaction that puts one key twice.
        return Err(format!(
            "--txn-ops {n} needs --key-space-size of at least {n} (the keys of one transaction must differ)"
        ));
    }
    let value = bytes::Bytes::from(bench.value());
    drive(bench, "txn-put", move |b, w, seq| {
        let value = value.clone();
        async move {
            // Distinct keys within one txn (etcd refuses duplicate keys in a branch).
            let ops: Vec<Op> = (0..n)
                .map(|i| {
                    Op::from(Op::put(
                        b.key(seq.wrapping_mul(n).wrapping_add(i)),
                        value.clone(),
                    ))
                })
                .collect();
            b.client(w).kv().txn().and_then(ops).await?;
            Ok(())
        }
    })
    .await
}

/// `txn-mixed` flags.
#[derive(Args, Debug)]
pub(crate) struct TxnMixedArgs {
    /// Read/write ratio: reads per write (e.g. 1 = half reads, 4 = 80 % reads).
    #[arg(long, default_value_t = 1.0)]
    rw_ratio: f64,
    /// `l` for linearizable, `s` for serializable reads.
    #[arg(long, default_value = "l")]
    consistency: String,
}

pub(crate) async fn txn_mixed(bench: &Arc<Bench>, a: &TxnMixedArgs) -> Result<Report, String> {
    if !(a.rw_ratio.is_finite() && a.rw_ratio >= 0.0) {
        return Err("--rw-ratio must be a non-negative number".into());
    }
    let serializable = match a.consistency.as_str() {
        "l" => false,
        "s" => true,
        other => return Err(format!("--consistency must be l or s, not {other:?}")),
    };
    let read_share = a.rw_ratio / (a.rw_ratio + 1.0);
    let value = bytes::Bytes::from(bench.value());
    drive(bench, "txn-mixed", move |b, w, seq| {
        let value = value.clone();
        async move {
            let key = b.pick_key(seq);
            if rand::random::<f64>() < read_share {
                let mut g = b.client(w).kv().get(key);
                if serializable {
                    g = g.serializable();
                }
                g.await?;
            } else {
                b.client(w)
                    .kv()
                    .txn()
                    .when([Compare::version(key.clone(), CompareOp::Greater, -1)])
                    .and_then([Op::put(key, value)])
                    .await?;
            }
            Ok(())
        }
    })
    .await
}

/// `stm` flags (etcd benchmark's names).
#[derive(Args, Debug)]
pub(crate) struct StmArgs {
    /// Keys read and written by each transaction.
    #[arg(long, default_value_t = 1)]
    stm_keys_per_txn: u64,
    /// Isolation: `s` serializable, `ss` serializable snapshot, `r` repeatable read, `c` read
    /// committed.
    #[arg(long, default_value = "s")]
    isolation: String,
}

/// `stm`: software transactions that read `--stm-keys-per-txn` keys and write each back
/// (conflicts are retried by the STM).
pub(crate) async fn stm(bench: &Arc<Bench>, a: &StmArgs) -> Result<Report, String> {
    let isolation = match a.isolation.as_str() {
        "s" => etcdv3::Isolation::Serializable,
        "ss" => etcdv3::Isolation::SerializableSnapshot,
        "r" => etcdv3::Isolation::RepeatableRead,
        "c" => etcdv3::Isolation::ReadCommitted,
        other => return Err(format!("--isolation must be s, ss, r or c, not {other:?}")),
    };
    if a.stm_keys_per_txn == 0 {
        return Err("--stm-keys-per-txn must be at least 1".into());
    }
    let n = a.stm_keys_per_txn;
    let value = bytes::Bytes::from(bench.value());
    drive(bench, "stm", move |b, w, seq| {
        let value = value.clone();
        async move {
            let keys: Vec<Vec<u8>> = (0..n)
                .map(|i| b.pick_key(seq.wrapping_mul(n).wrapping_add(i)))
                .collect();
            etcdv3::stm(b.client(w), move |tx| {
                let (keys, value) = (keys.clone(), value.clone());
                async move {
                    for k in &keys {
                        tx.get(k.clone()).await?;
                    }
                    for k in keys {
                        tx.put(k, value.clone());
                    }
                    Ok(())
                }
            })
            .isolation(isolation)
            .await?;
            Ok(())
        }
    })
    .await
}
