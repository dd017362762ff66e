//! Protocol encode/decode costs: Put, Range and Txn requests encoded, WatchResponses decoded
//! (1, 10, 100 events; 32 B, 1 KiB and 4 KiB values; with and without prev_kv). Values are
//! `bytes::Bytes` sliced out of the receive buffer, so decoding copies no key or value.
//!
//! `cargo bench --bench codec` measures; under `cargo test` a short smoke run checks that
//! every case round-trips.

use std::hint::black_box;
use std::time::{Duration, Instant};

use bytes::Bytes;
use etcdv3::raw::{etcdserverpb as pb, mvccpb};
use prost::Message;

/// Encodes one request into the buffer.
type EncodeFn<'a> = Box<dyn Fn(&mut Vec<u8>) + 'a>;

/// Average time of `f` over about `budget`, after a short warm-up.
fn time<F: FnMut()>(budget: Duration, mut f: F) -> (Duration, u64) {
    for _ in 0..100 {
        f();
    }
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < budget && n < 50_000_000 {
        for _ in 0..64 {
            f();
        }
        n += 64;
    }
    (start.elapsed() / n.max(1) as u32, n)
}

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

fn watch_response(events: usize, value_size: usize, prev_kv: bool) -> Vec<u8> {
    let value = Bytes::from(vec![b'v'; value_size]);
    let resp = pb::WatchResponse {
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
    };
    resp.encode_to_vec()
}

fn main() {
    let smoke = !std::env::args().any(|a| a == "--bench");
    let budget = if smoke {
        Duration::from_millis(5)
    } else {
        Duration::from_millis(500)
    };
    println!("codec{}", if smoke { " (smoke run)" } else { "" });

    // Encoding requests.
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
    let mut buf = Vec::with_capacity(4096);
    let cases: Vec<(&str, EncodeFn<'_>)> = vec![
        (
            "Put (256 B value)",
            Box::new(|b| put.encode(b).unwrap_or_default()),
        ),
        ("Range", Box::new(|b| range.encode(b).unwrap_or_default())),
        (
            "Txn (1 compare, 4 puts, 1 range)",
            Box::new(|b| txn.encode(b).unwrap_or_default()),
        ),
    ];
    for (name, encode) in &cases {
        let (t, _) = time(budget, || {
            buf.clear();
            encode(&mut buf);
            black_box(&buf);
        });
        println!(
            "  encode {name:<34} {:>8.1} ns ({} bytes)",
            t.as_nanos() as f64,
            buf.len()
        );
        assert!(!buf.is_empty());
    }

    // Decoding watch responses.
    for events in [1usize, 10, 100] {
        for value_size in [32usize, 1024, 4096] {
            for prev in [false, true] {
                let wire = Bytes::from(watch_response(events, value_size, prev));
                let (t, _) = time(budget, || {
                    let r = pb::WatchResponse::decode(wire.clone()).unwrap_or_default();
                    black_box(r);
                });
                let check = pb::WatchResponse::decode(wire.clone()).unwrap_or_default();
                assert_eq!(check.events.len(), events);
                assert_eq!(
                    check.events[0].kv.as_ref().map(|k| k.value.len()),
                    Some(value_size)
                );
                println!(
                    "  decode WatchResponse {events:>3} events x {value_size:>4} B{}  {:>9.1} ns ({:.1} ns/event, {} bytes)",
                    if prev { " +prev_kv" } else { "         " },
                    t.as_nanos() as f64,
                    t.as_nanos() as f64 / events as f64,
                    wire.len()
                );
            }
        }
    }
}
