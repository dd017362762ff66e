//! Protocol encode/decode costs (criterion): Put, Range and Txn requests encoded, and
//! WatchResponses decoded (1, 10, 100 events; 32 B, 1 KiB and 4 KiB values; with and without
//! prev_kv). Values are `bytes::Bytes` sliced out of the receive buffer, so decoding copies no
//! key or value.
//!
//! Groups: `encode` (time per request, throughput in encoded bytes) and
//! `decode_watch_response/<value size>[+prev_kv]/<events>` (time per response, including
//! freeing it; throughput in events). Measured in wall time on one thread (pure CPU work).
//! Each case is first round-tripped outside the timed loop (decoded == original), so a broken
//! codec fails `cargo test`.
//!
//! ```text
//! cargo bench --bench codec
//! cargo bench --bench codec -- --warm-up-time 1 --measurement-time 3
//! cargo bench --bench codec -- decode_watch_response/4096B
//! ```
//!
//! Under `cargo test --all-targets` criterion runs each case once (test mode).

use std::hint::black_box;
use std::time::Duration;

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use etcdv3::raw::{etcdserverpb as pb, mvccpb};
use prost::Message;

fn kv(i: i64, value: &Bytes) -> mvccpb::KeyValue {
    mvccpb::KeyValue {
        key: Bytes::from(format!("/bench/key/{i:08}")),
        create_revision: i,
        mod_revision: i,
        version: 1,
        value: value.clone(),
        lease: 0,
    }
}

fn watch_response(events: usize, value_size: usize, prev_kv: bool) -> pb::WatchResponse {
    let value = Bytes::from(vec![b'v'; value_size]);
    pb::WatchResponse {
        header: Some(pb::ResponseHeader {
            cluster_id: 1,
            member_id: 2,
            revision: 1_000_000,
            raft_term: 3,
        }),
        watch_id: 7,
        events: (0..events as i64)
            .map(|i| mvccpb::Event {
                r#type: 0,
                kv: Some(kv(i, &value)),
                prev_kv: prev_kv.then(|| kv(i, &value)),
            })
            .collect(),
        ..Default::default()
    }
}

/// Encodes `msg`, checks that it decodes back to itself, and benchmarks encoding it.
fn encode_case<M: Message + Default + PartialEq + std::fmt::Debug>(
    c: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    msg: &M,
) {
    let wire = msg.encode_to_vec();
    assert!(!wire.is_empty(), "{name}: encoded to nothing");
    assert_eq!(
        &M::decode(wire.as_slice()).expect("decode what was encoded"),
        msg,
        "{name}: round trip"
    );
    c.throughput(Throughput::Bytes(wire.len() as u64));
    let mut buf = Vec::with_capacity(wire.len() * 2);
    c.bench_function(name, |b| {
        b.iter(|| {
            buf.clear();
            black_box(msg).encode(&mut buf).expect("the buffer grows");
            black_box(&buf);
        })
    });
}

fn encode(c: &mut Criterion) {
    let value = Bytes::from(vec![b'v'; 256]);
    let put = pb::PutRequest {
        key: Bytes::from_static(b"/bench/key/00000001"),
        value: value.clone(),
        lease: 0x1234,
        prev_kv: false,
        ..Default::default()
    };
    let range = pb::RangeRequest {
        key: Bytes::from_static(b"/bench/"),
        range_end: Bytes::from_static(b"/bench0"),
        limit: 100,
        serializable: true,
        ..Default::default()
    };
    let txn = pb::TxnRequest {
        compare: vec![pb::Compare {
            result: 0,
            target: 2,
            key: Bytes::from_static(b"/bench/key/00000001"),
            target_union: Some(pb::compare::TargetUnion::ModRevision(42)),
            range_end: Bytes::new(),
        }],
        success: (0..4)
            .map(|i| pb::RequestOp {
                request: Some(pb::request_op::Request::RequestPut(pb::PutRequest {
                    key: Bytes::from(format!("/bench/key/{i:08}")),
                    value: value.clone(),
                    ..Default::default()
                })),
            })
            .collect(),
        failure: vec![pb::RequestOp {
            request: Some(pb::request_op::Request::RequestRange(range.clone())),
        }],
    };
    let mut group = c.benchmark_group("encode");
    encode_case(&mut group, "put_256B", &put);
    encode_case(&mut group, "range", &range);
    encode_case(&mut group, "txn_1cmp_4put_1range", &txn);
    group.finish();
}

fn decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode_watch_response");
    for value_size in [32usize, 1024, 4096] {
        for prev in [false, true] {
            let name = format!("{value_size}B{}", if prev { "+prev_kv" } else { "" });
            for events in [1usize, 10, 100] {
                let original = watch_response(events, value_size, prev);
                let wire = Bytes::from(original.encode_to_vec());
                let check = pb::WatchResponse::decode(wire.clone()).expect("decode");
                assert_eq!(check, original, "{name}/{events}: round trip");
                assert_eq!(check.events.len(), events);
                group.throughput(Throughput::Elements(events as u64));
                group.bench_with_input(BenchmarkId::new(&name, events), &wire, |b, wire| {
                    b.iter(|| pb::WatchResponse::decode(black_box(wire.clone())))
                });
            }
        }
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2));
    targets = encode, decode
}
criterion_main!(benches);
