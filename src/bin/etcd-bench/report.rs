//! Measurements and their report: latency summary, histogram and percentiles in the format of
//! etcd's `benchmark` tool, plus client CPU (getrusage), peak RSS and workload counters.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use nix::sys::resource::{UsageWho, getrusage};

/// Client CPU time (user, system) of this process so far.
pub(crate) fn cpu_times() -> (Duration, Duration) {
    match getrusage(UsageWho::RUSAGE_SELF) {
        Ok(u) => {
            let tv = |t: nix::sys::time::TimeVal| {
                Duration::from_secs(t.tv_sec().max(0) as u64)
                    + Duration::from_micros(t.tv_usec().max(0) as u64)
            };
            (tv(u.user_time()), tv(u.system_time()))
        }
        Err(_) => (Duration::ZERO, Duration::ZERO),
    }
}

/// Context switches of this process so far: (voluntary, involuntary). Voluntary ones are the
/// process's threads blocking (a tokio worker parking, a lock waited for); on a
/// multi-threaded runtime they explain most of the system time.
pub(crate) fn context_switches() -> (u64, u64) {
    match getrusage(UsageWho::RUSAGE_SELF) {
        Ok(u) => (
            u.voluntary_context_switches().max(0) as u64,
            u.involuntary_context_switches().max(0) as u64,
        ),
        Err(_) => (0, 0),
    }
}

/// Peak resident set size of this process, in KiB.
pub(crate) fn peak_rss_kib() -> u64 {
    getrusage(UsageWho::RUSAGE_SELF)
        .map(|u| u.max_rss().max(0) as u64)
        .unwrap_or(0)
}

/// What one benchmark run measured.
pub(crate) struct Report {
    pub(crate) name: String,
    /// Per-operation latencies.
    pub(crate) latencies: Vec<Duration>,
    pub(crate) errors: u64,
    pub(crate) wall: Duration,
    pub(crate) cpu_user: Duration,
    pub(crate) cpu_sys: Duration,
    /// Context switches of the client while measured: (voluntary, involuntary).
    pub(crate) switches: (u64, u64),
    /// Extra figures (name, value, unit), e.g. events/s for watch workloads.
    pub(crate) extra: Vec<(String, f64, String)>,
    /// What "one op" means for the CPU-per-op figure (requests, events...).
    pub(crate) ops_label: String,
    /// How many of those ops (defaults to the latency count).
    pub(crate) ops: u64,
}

/// Measures CPU and wall time between `start()` and `finish()`.
pub(crate) struct Meter {
    wall: Instant,
    cpu: (Duration, Duration),
    switches: (u64, u64),
}

impl Meter {
    pub(crate) fn start() -> Self {
        Meter {
            wall: Instant::now(),
            cpu: cpu_times(),
            switches: context_switches(),
        }
    }

    /// Wall time, user and system CPU, and context switches (voluntary, involuntary) since
    /// `start()`.
    pub(crate) fn finish(&self) -> (Duration, Duration, Duration, (u64, u64)) {
        let (u, s) = cpu_times();
        let (v, i) = context_switches();
        (
            self.wall.elapsed(),
            u.saturating_sub(self.cpu.0),
            s.saturating_sub(self.cpu.1),
            (
                v.saturating_sub(self.switches.0),
                i.saturating_sub(self.switches.1),
            ),
        )
    }
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// The `p`-th percentile (0..100) of sorted latencies.
pub(crate) fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

const PERCENTILES: [f64; 9] = [10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.9, 99.99];

impl Report {
    pub(crate) fn new(name: &str) -> Self {
        Report {
            name: name.to_owned(),
            latencies: Vec::new(),
            errors: 0,
            wall: Duration::ZERO,
            cpu_user: Duration::ZERO,
            cpu_sys: Duration::ZERO,
            switches: (0, 0),
            extra: Vec::new(),
            ops_label: "request".to_owned(),
            ops: 0,
        }
    }

    fn ops(&self) -> u64 {
        if self.ops > 0 {
            self.ops
        } else {
            self.latencies.len() as u64
        }
    }

    fn cpu_per_op_us(&self) -> f64 {
        let ops = self.ops();
        if ops == 0 {
            return 0.0;
        }
        (self.cpu_user + self.cpu_sys).as_secs_f64() * 1e6 / ops as f64
    }

    /// The human-readable report (etcd benchmark's layout first).
    pub(crate) fn text(&mut self) -> String {
        self.latencies.sort_unstable();
        let l = &self.latencies;
        let mut out = String::new();
        let n = l.len();
        let _ = writeln!(out, "\n{}:\nSummary:", self.name);
        let _ = writeln!(out, "  Total:\t{:.4} secs.", secs(self.wall));
        if n > 0 {
            let sum: f64 = l.iter().map(|d| secs(*d)).sum();
            let avg = sum / n as f64;
            let var = l.iter().map(|d| (secs(*d) - avg).powi(2)).sum::<f64>() / n as f64;
            let _ = writeln!(out, "  Slowest:\t{:.4} secs.", secs(l[n - 1]));
            let _ = writeln!(out, "  Fastest:\t{:.4} secs.", secs(l[0]));
            let _ = writeln!(out, "  Average:\t{avg:.4} secs.");
            let _ = writeln!(out, "  Stddev:\t{:.4} secs.", var.sqrt());
            let _ = writeln!(
                out,
                "  Requests/sec:\t{:.4}",
                n as f64 / secs(self.wall).max(1e-9)
            );
            let _ = writeln!(out, "\nResponse time histogram:");
            // As etcd's benchmark: eleven rows labelled with their upper edge (the fastest,
            // then tenths of the way to the slowest); a row counts the latencies above the
            // row before and up to its label.
            let (lo, hi) = (secs(l[0]), secs(l[n - 1]));
            let buckets = 10;
            let width = (hi - lo) / buckets as f64;
            let mut edges: Vec<f64> = (0..buckets).map(|i| lo + width * i as f64).collect();
            edges.push(hi);
            let mut counts = vec![0usize; buckets + 1];
            let mut b = 0;
            for d in l {
                let v = secs(*d);
                while b < buckets && v > edges[b] {
                    b += 1;
                }
                counts[b] += 1;
            }
            let max = counts.iter().copied().max().unwrap_or(1).max(1);
            for (edge, c) in edges.iter().zip(&counts) {
                let bar = "∎".repeat(c * 40 / max);
                let _ = writeln!(out, "  {edge:.4} [{c}]\t|{bar}");
            }
            let _ = writeln!(out, "\nLatency distribution:");
            for p in PERCENTILES {
                let _ = writeln!(out, "  {p}% in {:.4} secs.", secs(percentile(l, p)));
            }
        }
        let _ = writeln!(out, "\nClient:");
        let _ = writeln!(
            out,
            "  CPU per {}:\t{:.2} µs (user {:.2} µs, sys {:.2} µs) over {} {}s",
            self.ops_label,
            self.cpu_per_op_us(),
            self.cpu_user.as_secs_f64() * 1e6 / self.ops().max(1) as f64,
            self.cpu_sys.as_secs_f64() * 1e6 / self.ops().max(1) as f64,
            self.ops(),
            self.ops_label
        );
        let per_op = |n: u64| n as f64 / self.ops().max(1) as f64;
        let _ = writeln!(
            out,
            "  Context switches per {}:\t{:.3} voluntary, {:.3} involuntary",
            self.ops_label,
            per_op(self.switches.0),
            per_op(self.switches.1)
        );
        let _ = writeln!(
            out,
            "  CPU busy:\t{:.2} cores",
            (self.cpu_user + self.cpu_sys).as_secs_f64() / secs(self.wall).max(1e-9)
        );
        let _ = writeln!(out, "  Peak RSS:\t{} KiB", peak_rss_kib());
        if self.errors > 0 {
            let _ = writeln!(out, "  Errors:\t{}", self.errors);
        }
        for (k, v, unit) in &self.extra {
            let _ = writeln!(out, "  {k}:\t{v:.2} {unit}");
        }
        out
    }

    /// One JSON object with every figure, for machines.
    pub(crate) fn json(&mut self) -> String {
        self.latencies.sort_unstable();
        let l = &self.latencies;
        let n = l.len();
        let mut fields: Vec<(String, String)> = vec![
            ("workload".into(), format!("{:?}", self.name)),
            ("total_secs".into(), format!("{:.6}", secs(self.wall))),
            ("requests".into(), n.to_string()),
            ("errors".into(), self.errors.to_string()),
            (
                "requests_per_sec".into(),
                format!("{:.3}", n as f64 / secs(self.wall).max(1e-9)),
            ),
            ("ops".into(), self.ops().to_string()),
            ("op".into(), format!("{:?}", self.ops_label)),
            (
                "cpu_us_per_op".into(),
                format!("{:.3}", self.cpu_per_op_us()),
            ),
            (
                "cpu_user_secs".into(),
                format!("{:.6}", self.cpu_user.as_secs_f64()),
            ),
            (
                "cpu_sys_secs".into(),
                format!("{:.6}", self.cpu_sys.as_secs_f64()),
            ),
            ("voluntary_switches".into(), self.switches.0.to_string()),
            ("involuntary_switches".into(), self.switches.1.to_string()),
            ("peak_rss_kib".into(), peak_rss_kib().to_string()),
        ];
        if n > 0 {
            let avg = l.iter().map(|d| secs(*d)).sum::<f64>() / n as f64;
            fields.push(("fastest_secs".into(), format!("{:.6}", secs(l[0]))));
            fields.push(("slowest_secs".into(), format!("{:.6}", secs(l[n - 1]))));
            fields.push(("average_secs".into(), format!("{avg:.6}")));
            for p in PERCENTILES {
                fields.push((
                    format!("p{}_secs", p.to_string().replace('.', "_")),
                    format!("{:.6}", secs(percentile(l, p))),
                ));
            }
        }
        for (k, v, _) in &self.extra {
            let key: String = k
                .to_lowercase()
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                .collect();
            fields.push((key, format!("{v:.3}")));
        }
        let body = fields
            .iter()
            .map(|(k, v)| format!("\"{k}\":{v}"))
            .collect::<Vec<_>>()
            .join(",");
        format!("{{{body}}}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_a_known_set() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&v, 50.0), Duration::from_millis(50));
        assert_eq!(percentile(&v, 99.0), Duration::from_millis(99));
        assert_eq!(percentile(&v, 100.0), Duration::from_millis(100));
        assert_eq!(percentile(&[], 50.0), Duration::ZERO);
    }

    #[test]
    fn histogram_rows_are_labelled_with_their_upper_edge_as_etcd_does() {
        let mut r = Report::new("put");
        // 1, 1, 2 and 11 ms: edges 1, 2, 3, ..., 10, 11 ms.
        r.latencies = [1, 1, 2, 11].map(Duration::from_millis).to_vec();
        r.wall = Duration::from_secs(1);
        let t = r.text();
        let rows: Vec<&str> = t
            .lines()
            .skip_while(|l| !l.starts_with("Response time histogram:"))
            .skip(1)
            .take(11)
            .collect();
        assert!(rows[0].trim_start().starts_with("0.0010 [2]"), "{rows:?}");
        assert!(rows[1].trim_start().starts_with("0.0020 [1]"), "{rows:?}");
        assert!(rows[2].trim_start().starts_with("0.0030 [0]"), "{rows:?}");
        assert!(rows[10].trim_start().starts_with("0.0110 [1]"), "{rows:?}");
    }

    #[test]
    fn report_has_etcd_benchmark_sections_and_valid_json_shape() {
        let mut r = Report::new("put");
        r.latencies = (1..=10).map(Duration::from_millis).collect();
        r.wall = Duration::from_secs(1);
        let t = r.text();
        for s in [
            "Summary:",
            "Requests/sec:",
            "Response time histogram:",
            "Latency distribution:",
            "99.9% in",
            "CPU per request",
            "Context switches per request",
        ] {
            assert!(t.contains(s), "{s} missing in {t}");
        }
        let j = r.json();
        assert!(j.starts_with('{') && j.ends_with('}'));
        assert!(j.contains("\"requests\":10"));
        assert!(j.contains("\"voluntary_switches\":0"));
        assert!(j.contains("\"p99_9_secs\""));
    }
}
