//! Our HTTP/2 transport (src/transport.rs) against a real etcd, seen through the fault proxy's
//! connection counts: one connection per endpoint shared by every request, stream and raw
//! client; closed when the client is dropped; replaced without an error when the server went
//! away while idle; and an idle connection is not pinged (etcd closes connections that ping
//! without streams).

mod common;

use std::future::IntoFuture;
use std::time::Duration;

use etcdv3::Client;
use etcdv3::raw::etcdserverpb as pb;
use etcdv3::testkit::FaultProxy;

#[tokio::test]
async fn one_connection_for_everything_and_it_closes_with_the_client() {
    let etcd = common::etcd().await;
    let (proxy, c) = through_proxy(&etcd).await;
    c.kv().put("t/a", "1").await.unwrap();
    // A watch stream (our own streaming path), a raw unary call and a raw bidirectional
    // stream (tonic's generated clients on our channel) all share the connection.
    let mut w = c.watch("t/").prefix().await.unwrap();
    let mut raw_kv = c.raw().unwrap().kv();
    let r = raw_kv
        .range(pb::RangeRequest {
            key: "t/a".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.count, 1);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let grant = c.lease().grant(30).await.unwrap();
    tx.send(pb::LeaseKeepAliveRequest { id: grant.id }).unwrap();
    let mut raw_lease = c.raw().unwrap().lease();
    let mut answers = raw_lease
        .lease_keep_alive(tokio_stream_of(rx))
        .await
        .unwrap()
        .into_inner();
    let first = answers.message().await.unwrap().unwrap();
    assert_eq!(first.id, grant.id);
    assert!(first.ttl > 0);
    // The second request goes out on the same stream, after the first answer.
    tx.send(pb::LeaseKeepAliveRequest { id: grant.id }).unwrap();
    let second = answers.message().await.unwrap().unwrap();
    assert_eq!(second.id, grant.id);

    c.kv().put("t/b", "2").await.unwrap();
    let batch = w.next().await.unwrap().unwrap();
    assert_eq!(batch.events()[0].kv.key(), &b"t/b"[..]);
    assert_eq!(proxy.connections_total(), 1, "one connection for all of it");
    assert_eq!(proxy.connections_active(), 1);

    // Everything that holds the connection goes: it closes.
    drop((w, raw_kv, raw_lease, answers, tx, c));
    common::wait_until(Duration::from_secs(5), "the connection closed", || async {
        proxy.connections_active() == 0
    })
    .await;
}

/// A fault proxy in front of `etcd`'s member 0, and a client connected through it.
async fn through_proxy(etcd: &etcdv3::testkit::EtcdCluster) -> (FaultProxy, Client) {
    let proxy = FaultProxy::start(etcd.client_addr(0)).await.unwrap();
    let c = Client::builder([proxy.endpoint()])
        .request_timeout(Duration::from_secs(10))
        .connect()
        .await
        .unwrap();
    (proxy, c)
}

/// An mpsc receiver as a `Stream` (what the raw streaming clients take).
fn tokio_stream_of<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<T>,
) -> impl futures::Stream<Item = T> + Send + 'static {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[tokio::test]
async fn a_member_restarted_while_idle_is_reconnected_to_without_an_error() {
    let etcd = common::etcd().await;
    let (proxy, c) = through_proxy(&etcd).await;
    c.kv().put("k", "1").await.unwrap();
    etcd.kill(0).unwrap();
    common::wait_until(
        Duration::from_secs(5),
        "the proxy saw the server go",
        || async { proxy.connections_active() == 0 },
    )
    .await;
    etcd.restart_async(0).await.unwrap();
    // A put (never retried once it may have been sent) works at the first try: the dead
    // connection was noticed and a new one is made for it.
    let r = c.kv().put("k", "2").prev_kv().await.unwrap();
    assert_eq!(r.prev_kv.unwrap().value_str().unwrap(), "1");
    assert_eq!(proxy.connections_total(), 2);
}

#[tokio::test]
async fn an_idle_connection_is_not_pinged() {
    // etcd's default keep-alive policy: pings at most every 5 s, none without streams.
    let etcd = common::etcd().await;
    let proxy = FaultProxy::start(etcd.client_addr(0)).await.unwrap();
    let c = Client::builder([proxy.endpoint()])
        .request_timeout(Duration::from_secs(10))
        .keep_alive_interval(Duration::from_millis(500))
        .keep_alive_timeout(Duration::from_secs(1))
        .connect()
        .await
        .unwrap();
    c.kv().put("k", "1").await.unwrap();
    // Pinging while idle at this rate would earn a GOAWAY (too many pings) within about
    // 1.5 s; a request after 4 s of idleness finds the first connection still up.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(proxy.connections_active(), 1, "still connected");
    c.kv().put("k", "2").await.unwrap();
    assert_eq!(proxy.connections_total(), 1, "no reconnect was needed");
}

#[tokio::test]
async fn answers_larger_than_the_flow_control_windows_arrive_whole() {
    // 64 values of 100 KiB: a 6.4 MiB range answer, more than the stream window (4 MiB), so
    // it only arrives if capacity is given back as it is read. A watch from revision 1 replays the same 6.4 MiB on the same connection.
    let etcd = common::etcd().await;
    let c = common::client(&etcd).await;
    let value = vec![b'v'; 100 * 1024];
    for i in 0..64 {
        c.kv()
            .put(format!("big/{i:02}"), value.clone())
            .await
            .unwrap();
    }
    for _ in 0..2 {
        let r = c.kv().get("big/").prefix().await.unwrap();
        assert_eq!(r.kvs.len(), 64);
        assert!(r.kvs.iter().all(|kv| kv.value() == &value[..]));
    }
    let mut w = c.watch("big/").prefix().start_revision(1).await.unwrap();
    let mut seen = 0;
    while seen < 64 {
        let batch = tokio::time::timeout(Duration::from_secs(10), w.next())
            .await
            .expect("the replay arrives")
            .unwrap()
            .unwrap();
        for ev in batch.events() {
            assert_eq!(ev.kv.value().len(), value.len());
            seen += 1;
        }
    }
    assert_eq!(seen, 64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_answers_that_fill_the_connection_window_all_arrive() {
    // Sixteen concurrent reads of a 1.9 MiB range on one connection: 30 MiB in all, more
    // than the connection window (16 MiB), while each answer stays under half its stream
    // window. The server interleaves the answers, so the connection window runs out while
    // every answer is still incomplete: the client must take in what has come (and give the
    // window back) although no answer has ended.
    let etcd = common::etcd().await;
    let c = common::client(&etcd).await;
    let value = vec![b'v'; 100 * 1024];
    for i in 0..19 {
        c.kv()
            .put(format!("wide/{i:02}"), value.clone())
            .await
            .unwrap();
    }
    for round in 0..2 {
        // Serializable: etcd answers them all at once (no read-index round first).
        let reads = (0..16).map(|_| c.kv().get("wide/").prefix().serializable().into_future());
        let all = tokio::time::timeout(
            Duration::from_secs(20),
            futures::future::try_join_all(reads),
        )
        .await
        .unwrap_or_else(|_| panic!("round {round}: the answers stalled"))
        .unwrap();
        for r in all {
            assert_eq!(r.kvs.len(), 19);
            assert!(r.kvs.iter().all(|kv| kv.value() == &value[..]));
        }
    }
}

#[tokio::test]
async fn a_unix_socket_endpoint_serves_requests_and_streams() {
    let etcd = etcdv3::testkit::EtcdCluster::builder()
        .unix_socket(true)
        .start_async()
        .await
        .unwrap();
    let endpoint = etcd.unix_endpoint(0).unwrap();
    assert!(endpoint.starts_with("unix:///"), "{endpoint}");
    let c = Client::builder([endpoint.as_str()])
        .request_timeout(Duration::from_secs(10))
        .connect()
        .await
        .unwrap();
    let mut w = c.watch("u/").prefix().await.unwrap();
    c.kv().put("u/1", "over a unix socket").await.unwrap();
    let got = c.kv().get("u/1").await.unwrap();
    assert_eq!(got.kvs[0].value_str().unwrap(), "over a unix socket");
    let batch = tokio::time::timeout(Duration::from_secs(10), w.next())
        .await
        .expect("the event arrives")
        .unwrap()
        .unwrap();
    assert_eq!(batch.events()[0].kv.key(), &b"u/1"[..]);
    assert_eq!(c.pinned_endpoint(), endpoint);
}
