//! Watch responses in bursts with cold caches (criterion): the client's CPU per response when
//! each write reaches N watchers (100, 1,000) and each watcher is read by its own task, the
//! shape of `etcd-bench watch` (one put, one response to every watcher) without the server's
//! noise.
//!
//! An in-process gRPC server (its own thread and runtime, `common/watch_fixture.rs`) sends,
//! per burst, one response with one event to every watcher, in a fixed shuffled order. Before
//! each burst the bench thread walks 16 MiB of memory, which evicts the client's state from
//! the caches as etcd's own work does between two puts; the walk is not measured. The real
//! `etcdv3::Client` and one task per watcher run on the bench thread on a current-thread
//! tokio runtime, and the measurement is that thread's CPU time (`common/cpu.rs`):
//! criterion's "time" is client CPU per response (decode, dispatch, waking and running the
//! watcher's task), and its throughput is responses per client-CPU-second. A line at the end
//! of each case gives the totals. The first burst is checked (every watcher gets its own
//! key), so a broken client fails `cargo test` too.
//!
//! ```text
//! cargo bench --bench watch_burst
//! cargo bench --bench watch_burst -- --warm-up-time 1 --measurement-time 2
//! ```
//!
//! Under `cargo test --all-targets` criterion runs each case once (test mode).

#[path = "common/cpu.rs"]
mod cpu;
#[path = "common/watch_fixture.rs"]
mod watch_fixture;

use std::time::Duration;

use criterion::{
    BenchmarkId, Criterion, SamplingMode, Throughput, criterion_group, criterion_main,
};

use cpu::ThreadCpu;
use watch_fixture::BurstBench;

/// Memory walked before each burst: well over the L2 cache, as etcd's work between puts.
const THRASH: usize = 16 << 20;

fn bursts(c: &mut Criterion<ThreadCpu>) {
    let mut group = c.benchmark_group("watch_burst");
    group.sampling_mode(SamplingMode::Flat);
    group.throughput(Throughput::Elements(1));
    for watchers in [100usize, 1_000] {
        let mut bench =
            BurstBench::start(watchers, THRASH).expect("start the server and the watchers");
        group.bench_function(BenchmarkId::new("watchers", watchers), |b| {
            b.iter_custom(|responses| bench.measure(responses))
        });
        bench
            .finish(&format!("watch_burst/{watchers}"))
            .expect("close the client and stop the server");
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = cpu::watch_config()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2));
    targets = bursts
}
criterion_main!(benches);
