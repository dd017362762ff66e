//! Watch multiplexer dispatch to 1, 10, 100, 1,000 and 10,000 watchers on one stream
//! (criterion): the client's CPU per server response when the responses (one event each) go
//! round-robin to N watchers.
//!
//! An in-process gRPC server (its own thread and runtime, `common/watch_fixture.rs`) answers
//! the client's N pipelined creates, then streams responses with ONE event each, round-robin
//! over the N watch ids, revisions increasing. The real `etcdv3::Client` runs on the bench
//! thread on a current-thread tokio runtime; its consumer reads every watcher (a `SelectAll`
//! over the N `Watcher` streams). The measurement is the bench thread's CPU time
//! (`common/cpu.rs`, `CLOCK_THREAD_CPUTIME_ID`), so criterion's "time" is client CPU per
//! response (decode, look-up of the watcher, its queue, waking and reading it) and the
//! throughput is events (= responses) per client-CPU-second. Creating the watchers is setup,
//! not measured (`iter_custom`); after it every watcher's first response is checked (its own
//! key, increasing revisions), so a broken multiplexer fails `cargo test` too.
//!
//! ```text
//! cargo bench --bench watch_dispatch
//! cargo bench --bench watch_dispatch -- --warm-up-time 1 --measurement-time 3
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

fn dispatch(c: &mut Criterion<ThreadCpu>) {
    let mut group = c.benchmark_group("watch_dispatch");
    group.sampling_mode(SamplingMode::Flat);
    // One event per response: elements are both.
    group.throughput(Throughput::Elements(1));
    for watchers in [1usize, 10, 100, 1_000, 10_000] {
        let mut bench = WatchBench::start(watchers, 1).expect("start the server and the watchers");
        group.bench_function(BenchmarkId::new("watchers", watchers), |b| {
            b.iter_custom(|responses| bench.consume(responses))
        });
        bench
            .finish(&format!("watch_dispatch/{watchers}"))
            .expect("close the client and stop the server");
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = cpu::watch_config();
    targets = dispatch
}
criterion_main!(benches);
