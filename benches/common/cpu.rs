//! A criterion [`Measurement`]: the CPU time (user + system) of the calling thread, from
//! `getrusage(RUSAGE_THREAD)` (Linux reports it in microseconds).
//!
//! The watch benches run the whole client (its connection, the multiplexer and the consumer)
//! on the bench thread, on a current-thread tokio runtime, and the in-process server on
//! another thread: this thread's CPU time is then exactly the client's cost, whatever else the
//! machine is doing, while wall time would also count the server and waits for it.
//!
//! Shared by `watch_ceiling` and `watch_dispatch` (included with `#[path]`).

use std::time::Duration;

use criterion::measurement::{Measurement, ValueFormatter};
use criterion::{Criterion, Throughput};
use nix::sys::resource::{UsageWho, getrusage};
use nix::sys::time::TimeVal;

/// The CPU time this thread has used so far.
///
/// # Panics
///
/// When `getrusage` fails (it cannot for `RUSAGE_THREAD` on Linux).
pub(crate) fn thread_cpu() -> Duration {
    let usage = getrusage(UsageWho::RUSAGE_THREAD).expect("getrusage(RUSAGE_THREAD)");
    duration(usage.user_time()) + duration(usage.system_time())
}

fn duration(tv: TimeVal) -> Duration {
    let secs = u64::try_from(tv.tv_sec()).unwrap_or(0);
    let micros = u64::try_from(tv.tv_usec()).unwrap_or(0);
    Duration::from_secs(secs) + Duration::from_micros(micros)
}

/// This thread's CPU time, as a criterion measurement (values in nanoseconds).
pub(crate) struct ThreadCpu;

impl Measurement for ThreadCpu {
    type Intermediate = Duration;
    type Value = Duration;

    fn start(&self) -> Duration {
        thread_cpu()
    }
    fn end(&self, start: Duration) -> Duration {
        thread_cpu().saturating_sub(start)
    }
    fn add(&self, a: &Duration, b: &Duration) -> Duration {
        *a + *b
    }
    fn zero(&self) -> Duration {
        Duration::ZERO
    }
    fn to_f64(&self, value: &Duration) -> f64 {
        value.as_nanos() as f64
    }
    fn formatter(&self) -> &dyn ValueFormatter {
        &CpuFormatter
    }
}

/// Like criterion's wall-time formatter, with units that say the time is CPU time.
struct CpuFormatter;

impl ValueFormatter for CpuFormatter {
    fn scale_values(&self, typical_ns: f64, values: &mut [f64]) -> &'static str {
        let (factor, unit) = if typical_ns < 1e3 {
            (1.0, "ns cpu")
        } else if typical_ns < 1e6 {
            (1e-3, "µs cpu")
        } else if typical_ns < 1e9 {
            (1e-6, "ms cpu")
        } else {
            (1e-9, "s cpu")
        };
        for v in values {
            *v *= factor;
        }
        unit
    }

    fn scale_throughputs(
        &self,
        typical_ns: f64,
        throughput: &Throughput,
        values: &mut [f64],
    ) -> &'static str {
        let (count, units) = match *throughput {
            Throughput::Elements(n) | Throughput::ElementsAndBytes { elements: n, .. } => (
                n as f64,
                ["elem/cpu-s", "Kelem/cpu-s", "Melem/cpu-s", "Gelem/cpu-s"],
            ),
            Throughput::Bytes(n) | Throughput::BytesDecimal(n) => {
                (n as f64, ["B/cpu-s", "KB/cpu-s", "MB/cpu-s", "GB/cpu-s"])
            }
            Throughput::Bits(n) => (n as f64, ["b/cpu-s", "Kb/cpu-s", "Mb/cpu-s", "Gb/cpu-s"]),
        };
        let typical = count * 1e9 / typical_ns;
        let (divisor, unit) = if typical < 1e3 {
            (1.0, units[0])
        } else if typical < 1e6 {
            (1e3, units[1])
        } else if typical < 1e9 {
            (1e6, units[2])
        } else {
            (1e9, units[3])
        };
        for v in values {
            *v = count * 1e9 / *v / divisor;
        }
        unit
    }

    fn scale_for_machines(&self, _values: &mut [f64]) -> &'static str {
        "ns"
    }
}

/// The criterion settings of the watch benches: this thread's CPU as the measurement, 30
/// samples, 2 s warm-up, 5 s measurement.
pub(crate) fn watch_config() -> Criterion<ThreadCpu> {
    Criterion::default()
        .with_measurement(ThreadCpu)
        .sample_size(30)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(5))
}
