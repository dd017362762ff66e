//! The client's own ceiling for watch events (criterion): an in-process gRPC server streams
//! `WatchResponse`s of 1, 10 or 100 events to ONE watcher as fast as the client takes them,
//! and the client's CPU is measured on its own thread.
//!
//! The server runs on its own thread and runtime (`common/watch_fixture.rs`). The client (its
//! connection, the multiplexer and the consumer) runs on the bench thread on a current-thread
//! tokio runtime, and the measurement is that thread's CPU time (`common/cpu.rs`,
//! `CLOCK_THREAD_CPUTIME_ID`): criterion's "time" is client CPU per response, and its
//! throughput (elements = events) is events per client-CPU-second, the one-core ceiling (the
//! target is at least 2 M events/s at 100 events per response). Every event has a 16-byte key
//! and a 64-byte value. Setup (server, connection, watcher) is not measured
//! (`iter_custom`); after setup the first responses are checked (sizes, keys, consecutive
//! revisions), so a broken client fails `cargo test` too. At the end of each case a line
//! gives the totals (client CPU and wall time per response, events/s, pauses).
//!
//! ```text
//! cargo bench --bench watch_ceiling
//! cargo bench --bench watch_ceiling -- --warm-up-time 1 --measurement-time 3
//! ```
//!
//! Under `cargo test --all-targets` criterion runs each case once (test mode).

#[path = "common/cpu.rs"]
mod cpu;
#[path = "common/watch_fixture.rs"]
mod watch_fixture;

use criterion::{
    BenchmarkId, Criterion, SamplingMode, Throughput, criterion_group, criterion_main,
};

use cpu::ThreadCpu;
use watch_fixture::WatchBench;

fn ceiling(c: &mut Criterion<ThreadCpu>) {
    let mut group = c.benchmark_group("watch_ceiling");
    group.sampling_mode(SamplingMode::Flat);
    for events in [1usize, 10, 100] {
        group.throughput(Throughput::Elements(events as u64));
        let mut bench = WatchBench::start(1, events).expect("start the server and the watcher");
        group.bench_function(BenchmarkId::new("events_per_response", events), |b| {
            b.iter_custom(|responses| bench.consume(responses))
        });
        bench
            .finish(&format!("watch_ceiling/{events}"))
            .expect("close the client and stop the server");
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = cpu::watch_config();
    targets = ceiling
}
criterion_main!(benches);
