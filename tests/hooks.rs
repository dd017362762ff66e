//! User hooks: a custom connector that yields the byte stream, and a tower layer around every
//! RPC attempt.

mod common;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use etcdv3::{Client, Error, ErrorKind, RpcRequest, RpcService};

#[tokio::test]
async fn a_custom_connector_replaces_tcp() {
    let etcd = common::etcd().await;
    let real = etcd.client_addr(0);
    let dialed = Arc::new(Mutex::new(Vec::<String>::new()));
    let log = dialed.clone();
    // The endpoint names a host that does not exist; the connector knows where it really is.
    let connector = tower::service_fn(move |uri: http::Uri| {
        log.lock().unwrap().push(uri.to_string());
        async move { tokio::net::TcpStream::connect(real).await }
    });
    let c = Client::builder(["http://etcd.invalid:2379"])
        .connector(connector)
        .request_timeout(Duration::from_secs(5))
        .connect()
        .await
        .unwrap();
    c.kv().put("via", "connector").await.unwrap();
    assert_eq!(
        c.kv().get("via").await.unwrap().kvs[0].value_str().unwrap(),
        "connector"
    );
    let dialed = dialed.lock().unwrap().clone();
    assert!(!dialed.is_empty());
    assert!(
        dialed
            .iter()
            .all(|u| u.starts_with("http://etcd.invalid:2379")),
        "{dialed:?}"
    );

    // A connector that fails: the request was never sent, the error says why.
    let failing = tower::service_fn(|_uri: http::Uri| async {
        Err::<tokio::net::TcpStream, _>(std::io::Error::other("no route in this test"))
    });
    let c = Client::builder(["http://etcd.invalid:2379"])
        .connector(failing)
        .connect_lazy()
        .unwrap();
    let e = c
        .kv()
        .put("k", "v")
        .timeout(Duration::from_secs(2))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e:?}");
    assert!(!e.is_indeterminate(), "never sent");
}

/// Counts attempts per method and logs each one's method and endpoint; refuses RPCs named in
/// `refuse`; answers every attempt sent to `times_out_at` with etcd's "request timed out"
/// (what a member that cannot get its proposals or reads through in time says).
#[derive(Clone, Default)]
struct Metrics {
    seen: Arc<Mutex<HashMap<&'static str, usize>>>,
    attempts: Arc<Mutex<Vec<(&'static str, String)>>>,
    errors: Arc<AtomicUsize>,
    refuse: &'static str,
    times_out_at: Option<String>,
}

impl tower::Layer<RpcService> for Metrics {
    type Service = MetricsService;
    fn layer(&self, inner: RpcService) -> MetricsService {
        MetricsService {
            inner,
            m: self.clone(),
        }
    }
}

#[derive(Clone)]
struct MetricsService {
    inner: RpcService,
    m: Metrics,
}

impl tower::Service<RpcRequest> for MetricsService {
    type Response = ();
    type Error = Error;
    type Future = Pin<Box<dyn Future<Output = Result<(), Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: RpcRequest) -> Self::Future {
        *self.m.seen.lock().unwrap().entry(req.method).or_default() += 1;
        self.m
            .attempts
            .lock()
            .unwrap()
            .push((req.method, req.endpoint.clone()));
        if req.method == self.m.refuse {
            return Box::pin(async { Err(etcdv3_test_error()) });
        }
        if self.m.times_out_at.as_ref() == Some(&req.endpoint) {
            return Box::pin(async {
                Err(Error::from(tonic::Status::unavailable(
                    "etcdserver: request timed out",
                )))
            });
        }
        let fut = self.inner.call(req);
        let errors = self.m.errors.clone();
        Box::pin(async move {
            let r = fut.await;
            if r.is_err() {
                errors.fetch_add(1, Ordering::Relaxed);
            }
            r
        })
    }
}

fn etcdv3_test_error() -> Error {
    // Any typed error: borrow one from a client-side validation failure.
    futures::executor::block_on(async {
        Client::builder(["127.0.0.1:1"])
            .connect_lazy()
            .unwrap()
            .kv()
            .get("")
            .await
            .unwrap_err()
    })
}

#[tokio::test]
async fn a_tower_layer_sees_every_attempt() {
    let etcd = common::etcd().await;
    let m = Metrics {
        refuse: "Compact",
        ..Default::default()
    };
    let c = Client::builder(etcd.endpoints())
        .layer(m.clone())
        .request_timeout(Duration::from_secs(5))
        .connect()
        .await
        .unwrap();
    c.kv().put("a", "1").await.unwrap();
    c.kv().put("b", "2").await.unwrap();
    let got = c.kv().get("a").await.unwrap();
    assert_eq!(
        got.kvs[0].value_str().unwrap(),
        "1",
        "responses pass through the layer"
    );
    // A server error is seen by the layer as an error too.
    let e = c.kv().get("a").revision(1_000_000).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::FutureRevision);
    // The layer can refuse an attempt.
    let e = c.kv().compact(1).await.unwrap_err();
    assert_eq!(
        e.kind(),
        ErrorKind::EmptyKey,
        "the layer's own error: {e:?}"
    );

    let seen = m.seen.lock().unwrap().clone();
    assert_eq!(seen.get("Put"), Some(&2));
    assert_eq!(seen.get("Range"), Some(&2));
    assert_eq!(seen.get("Compact"), Some(&1));
    assert_eq!(m.errors.load(Ordering::Relaxed), 1);
    assert!(
        m.attempts
            .lock()
            .unwrap()
            .iter()
            .all(|(_, e)| *e == etcd.endpoint(0))
    );
}

#[tokio::test]
async fn a_member_that_times_out_is_left_for_another_on_retry() {
    let cluster = etcdv3::testkit::EtcdCluster::builder()
        .members(3)
        .start_async()
        .await
        .unwrap();
    let layer = Metrics {
        times_out_at: Some(cluster.endpoint(0)),
        ..Default::default()
    };
    let c = Client::builder(cluster.endpoints())
        .layer(layer.clone())
        .request_timeout(Duration::from_secs(3))
        .connect()
        .await
        .unwrap();
    let attempts = || layer.attempts.lock().unwrap().clone();
    // A read pinned to the member that times out is retried on the next member.
    layer.attempts.lock().unwrap().clear();
    let r = c.kv().get("k").await.unwrap();
    assert_eq!(r.count, 0);
    let seen = attempts();
    assert_eq!(
        seen,
        [
            ("Range", cluster.endpoint(0)),
            ("Range", cluster.endpoint(1))
        ],
        "{seen:?}"
    );
    // The pin stays there; the member is not backed off (a later read could go back to it).
    layer.attempts.lock().unwrap().clear();
    c.kv().put("k", "v").await.unwrap();
    assert_eq!(attempts(), [("Put", cluster.endpoint(1))]);
    // A write that times out is not retried (it may be applied), but the next request goes
    // to another member.
    let c2 = Client::builder(cluster.endpoints())
        .layer(layer.clone())
        .request_timeout(Duration::from_secs(3))
        .connect()
        .await
        .unwrap();
    layer.attempts.lock().unwrap().clear();
    let e = c2.kv().put("k", "w").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Timeout, "{e:?}");
    c2.kv().put("k", "w").await.unwrap();
    assert_eq!(
        attempts(),
        [("Put", cluster.endpoint(0)), ("Put", cluster.endpoint(1))]
    );
}
