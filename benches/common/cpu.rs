//! A criterion [`Measurement`]: the CPU time (user + system) of the calling thread, from
//! `clock_gettime(CLOCK_THREAD_CPUTIME_ID)`.
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
use nix::time::{ClockId, clock_gettime};

/// The CPU time this thread has used so far (`CLOCK_THREAD_CPUTIME_ID`: exact to the
/// nanosecond, where `getrusage(RUSAGE_THREAD)` may lag by up to a scheduler tick, which
/// matters for short measured stretches between unmeasured work).
///
/// # Panics
///
/// When the clock cannot be read (it always can on Linux).
pub(crate) fn thread_cpu() -> Duration {
    let t = clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID).expect("CLOCK_THREAD_CPUTIME_ID");
    let secs = u64::try_from(t.tv_sec()).unwrap_or(0);
    let nanos = u32::try_from(t.tv_nsec()).unwrap_or(0);
    Duration::new(secs, nanos)
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
