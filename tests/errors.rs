//! Every error kind the KV API can produce, from the client's own validation and from a real
//! etcd server, with the same kind either way.

mod common;

use std::time::{Duration, Instant};

use common::{client, etcd};
use etcdv3::testkit::FaultProxy;
use etcdv3::{Client, Compare, CompareOp, ErrorKind, Op};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test]
async fn empty_key_is_rejected_without_a_round_trip() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let kv = c.kv();
    assert_eq!(kv.get("").await.unwrap_err().kind(), ErrorKind::EmptyKey);
    assert_eq!(
        kv.put("", "v").await.unwrap_err().kind(),
        ErrorKind::EmptyKey
    );
    assert_eq!(kv.delete("").await.unwrap_err().kind(), ErrorKind::EmptyKey);
    let e = kv
        .txn()
        .when([Compare::value("", CompareOp::Equal, "x")])
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::EmptyKey);
    let e = kv.txn().and_then([Op::put("", "x")]).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::EmptyKey);
    let e = kv
        .txn()
        .or_else([Op::txn().and_then([Op::delete("")])])
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::EmptyKey);
    // Nothing was written.
    assert_eq!(kv.get_all().count_only().await.unwrap().count, 0);
}

#[tokio::test]
async fn too_many_txn_ops_client_side_and_server_side() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let ops = |n: usize| {
        (0..n)
            .map(|i| Op::put(format!("k{i}"), "v"))
            .collect::<Vec<_>>()
    };

    // Client-side, at etcd's default limit of 128.
    let e = c.kv().txn().and_then(ops(129)).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::TooManyOps);
    let compares = (0..129).map(|i| Compare::version(format!("k{i}"), CompareOp::Equal, 0));
    let e = c.kv().txn().when(compares).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::TooManyOps);
    let e = c
        .kv()
        .txn()
        .and_then([Op::txn().or_else(ops(129))])
        .await
        .unwrap_err();
    assert_eq!(
        e.kind(),
        ErrorKind::TooManyOps,
        "nested txns are checked too"
    );
    // 128 is fine.
    let ok = c.kv().txn().and_then(ops(128)).await.unwrap();
    assert_eq!(ok.responses.len(), 128);

    // Server-side: a client that allows more gets the server's TooManyOps.
    let lax = Client::builder(etcd.endpoints())
        .max_txn_ops(1000)
        .connect()
        .await
        .unwrap();
    let e = lax.kv().txn().and_then(ops(129)).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::TooManyOps, "{e}");
    assert!(e.grpc_code().is_some(), "came from the server: {e:?}");
}

#[tokio::test]
async fn request_too_large_client_side_and_server_side() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let big = vec![b'x'; 1600 * 1024]; // over etcd's default 1.5 MiB request limit

    let e = c.kv().put("big", big.clone()).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::RequestTooLarge);
    assert!(e.grpc_code().is_none(), "rejected before sending");
    let e = c
        .kv()
        .txn()
        .and_then([Op::put("big", big.clone())])
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::RequestTooLarge);

    // The server rejects it with the same kind when the client lets it through...
    let lax = Client::builder(etcd.endpoints())
        .max_request_bytes(8 * 1024 * 1024)
        .connect()
        .await
        .unwrap();
    let e = lax.kv().put("big", big).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::RequestTooLarge, "{e}");
    assert!(e.grpc_code().is_some());
    // ...and so does its gRPC layer for a message over its receive limit.
    let e = lax
        .kv()
        .put("big", vec![b'y'; 3 * 1024 * 1024])
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::RequestTooLarge, "{e}");

    // Requests the client refuses to encode (over the limit plus gRPC's 512 KiB) are the
    // same kind, and never sent: not indeterminate. A key-only request, and a call through
    // a tonic client.
    let huge = vec![b'k'; 2_200_000];
    let e = c.kv().delete(huge.clone()).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::RequestTooLarge, "{e:?}");
    assert!(!e.is_indeterminate(), "{e:?}");
    let e = c
        .auth()
        .role_grant_permission(
            "r",
            etcdv3::Permission::new(etcdv3::PermissionType::Read, huge),
        )
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::RequestTooLarge, "{e:?}");
    assert!(!e.is_indeterminate(), "{e:?}");

    // Just under the limit works, and is read back whole (no 4 MiB decode cap either).
    let fits = vec![b'z'; 1400 * 1024];
    c.kv().put("fits", fits.clone()).await.unwrap();
    assert_eq!(
        c.kv().get("fits").await.unwrap().kvs[0].value().len(),
        fits.len()
    );
    for i in 0..4 {
        c.kv().put(format!("fits{i}"), fits.clone()).await.unwrap();
    }
    let all = c.kv().get("fits").prefix().await.unwrap();
    assert_eq!(all.kvs.len(), 5, "a >4 MiB range answer is received");

    // A read-only transaction is not proposed through raft: etcd serves one over
    // max-request-bytes (up to its gRPC receive limit), and so does the client.
    let guard = vec![b'g'; 1600 * 1024];
    let r = c
        .kv()
        .txn()
        .when([Compare::value("fits", CompareOp::NotEqual, guard.clone())])
        .and_then([Op::get("fits")])
        .await
        .unwrap();
    assert!(r.succeeded);
    // With a write in it, the raft limit holds.
    let e = c
        .kv()
        .txn()
        .when([Compare::value("fits", CompareOp::NotEqual, guard)])
        .and_then([Op::put("w", "1")])
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::RequestTooLarge);
    // An empty key from-key compare is every key (as with_prefix of an empty key).
    let r = c
        .kv()
        .txn()
        .when([Compare::version("", CompareOp::Greater, 0).with_from_key()])
        .await
        .unwrap();
    assert!(r.succeeded);
}

#[tokio::test]
async fn future_and_compacted_revisions() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let kv = c.kv();
    let r1 = kv.put("a", "1").await.unwrap().header.revision;
    let r2 = kv.put("a", "2").await.unwrap().header.revision;
    let e = kv.get("a").revision(r2 + 10).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::FutureRevision, "{e}");
    kv.compact(r2).await.unwrap();
    let e = kv.get("a").revision(r1).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Compacted, "{e}");
    assert!(e.message().contains("compacted"), "{e}");
}

#[tokio::test]
async fn duplicate_key_in_txn_is_typed() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let e = c
        .kv()
        .txn()
        .and_then([Op::put("dup", "1"), Op::put("dup", "2")])
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::DuplicateKey, "{e}");
    let e = c
        .kv()
        .txn()
        .and_then([
            Op::from(Op::put("dup/a", "1")),
            Op::from(Op::delete("dup/").prefix()),
        ])
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::DuplicateKey, "{e}");
    assert_eq!(c.kv().get("dup").prefix().await.unwrap().count, 0);
}

#[tokio::test]
async fn deadline_when_the_server_does_not_answer() {
    let etcd = etcd().await;
    let proxy = FaultProxy::start(etcd.client_addr(0)).await.unwrap();
    let c = Client::builder([proxy.endpoint()])
        .request_timeout(Duration::from_millis(400))
        .connect()
        .await
        .unwrap();
    c.kv().put("k", "v").await.unwrap();
    proxy.blackhole();
    let t = Instant::now();
    let e = c.kv().get("k").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Deadline, "{e:?}");
    assert!(e.is_deadline());
    let took = t.elapsed();
    assert!(took >= Duration::from_millis(400), "{took:?}");
    assert!(took < Duration::from_secs(3), "deadline honoured: {took:?}");
    // A per-request timeout overrides the client's default.
    let t = Instant::now();
    let e = c
        .kv()
        .get("k")
        .timeout(Duration::from_millis(100))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Deadline);
    assert!(
        t.elapsed() < Duration::from_millis(390),
        "{:?}",
        t.elapsed()
    );
    proxy.pass();
    // Once traffic flows again the same client works (new or resumed connection).
    common::wait_until(
        Duration::from_secs(20),
        "client works after the blackhole",
        || {
            let c = c.clone();
            async move {
                c.kv()
                    .get("k")
                    .timeout(Duration::from_secs(2))
                    .await
                    .is_ok()
            }
        },
    )
    .await;
}

#[tokio::test]
async fn unreachable_endpoint_is_unavailable_and_named() {
    let port = free_port();
    let ep = format!("127.0.0.1:{port}");
    let e = Client::builder([ep.clone()])
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
    assert!(e.is_retryable());
    assert!(e.message().contains(&ep), "names the endpoint: {e}");

    // A lazy client fails on its first request instead.
    let lazy = Client::builder([ep]).connect_lazy().unwrap();
    let e = lazy
        .kv()
        .get("k")
        .timeout(Duration::from_secs(5))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e:?}");
}

#[tokio::test]
async fn invalid_configuration_is_rejected() {
    let none: [&str; 0] = [];
    let e = Client::builder(none).connect_lazy().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    let e = Client::builder(["not an endpoint"])
        .connect_lazy()
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    let e = Client::connect(["ftp://127.0.0.1:1"]).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
}

#[tokio::test]
async fn closed_client_fails_with_closed() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let clone = c.clone();
    let kv = c.kv();
    kv.put("k", "v").await.unwrap();
    c.close().await;
    assert_eq!(kv.get("k").await.unwrap_err().kind(), ErrorKind::Closed);
    assert_eq!(
        clone.kv().put("k", "w").await.unwrap_err().kind(),
        ErrorKind::Closed
    );
    assert_eq!(clone.raw().unwrap_err().kind(), ErrorKind::Closed);
    // The server still has the old value: nothing was sent after close.
    let other = client(&etcd).await;
    assert_eq!(
        other.kv().get("k").await.unwrap().kvs[0]
            .value_str()
            .unwrap(),
        "v"
    );
}
