//! Shared helpers of the integration tests: a real etcd per test, and a client for it.
#![allow(dead_code, unreachable_pub)]

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use etcdv3::Client;
use etcdv3::testkit::EtcdCluster;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub(crate) mod chaos;
pub(crate) mod checks;

/// A fresh single-member etcd (the binary from `ETCD_BIN`, PATH or /usr/bin/etcd).
pub(crate) async fn etcd() -> EtcdCluster {
    match EtcdCluster::builder().start_async().await {
        Ok(c) => c,
        Err(e) => panic!("could not start etcd (run scripts/install-etcd.sh?): {e}"),
    }
}

/// A fresh etcd started with extra flags.
pub(crate) async fn etcd_with(args: &[&str]) -> EtcdCluster {
    let b = EtcdCluster::builder().args(args.iter().copied());
    match b.start_async().await {
        Ok(c) => c,
        Err(e) => panic!("could not start etcd with {args:?}: {e}"),
    }
}

/// A connected client for `cluster`, with a 10 s request timeout so nothing hangs a test.
pub(crate) async fn client(cluster: &EtcdCluster) -> Client {
    Client::builder(cluster.endpoints())
        .request_timeout(Duration::from_secs(10))
        .connect()
        .await
        .expect("connect to test etcd")
}

/// A client of `endpoints` signed in as `user` (5 s request timeout, 2 s connect timeout).
#[allow(dead_code)] // not every test binary signs in
pub(crate) async fn user_client(endpoints: Vec<String>, user: &str, password: &str) -> Client {
    Client::builder(endpoints)
        .user(user, password)
        .request_timeout(Duration::from_secs(5))
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await
        .expect("connect to test etcd as a user")
}

/// A fault proxy in front of member 0, and a client that reaches the cluster only through
/// it (10 s request timeout, 2 s connect timeout).
pub(crate) async fn proxied_client(cluster: &EtcdCluster) -> (etcdv3::testkit::FaultProxy, Client) {
    let proxy = etcdv3::testkit::FaultProxy::start(cluster.client_addr(0))
        .await
        .expect("start the fault proxy");
    let c = Client::builder([proxy.endpoint()])
        .request_timeout(Duration::from_secs(10))
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await
        .expect("connect through the proxy");
    (proxy, c)
}

/// A fault proxy in front of member 0, and a client through it with the client layer
/// `layer` (1 s request and connect timeouts).
pub(crate) async fn proxied_client_with(
    cluster: &EtcdCluster,
    layer: AttemptLayer,
) -> (etcdv3::testkit::FaultProxy, Client) {
    let proxy = etcdv3::testkit::FaultProxy::start(cluster.client_addr(0))
        .await
        .expect("start the fault proxy");
    let c = Client::builder([proxy.endpoint()])
        .layer(layer)
        .request_timeout(Duration::from_secs(1))
        .connect_timeout(Duration::from_secs(1))
        .connect()
        .await
        .expect("connect through the proxy");
    (proxy, c)
}

/// Wait until `cond` returns true, polling every 20 ms, for at most `timeout`.
pub(crate) async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if cond().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The major.minor of the etcd under test, e.g. (3, 5).
pub(crate) fn version_of(cluster: &EtcdCluster) -> (u32, u32) {
    let v = cluster.version();
    let mut it = v.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    (it.next().unwrap_or(0), it.next().unwrap_or(0))
}

/// One value of etcd's Prometheus metrics (client URL `/metrics`), summed over label sets.
pub(crate) async fn metric(addr: SocketAddr, name: &str) -> f64 {
    let text = tokio::time::timeout(Duration::from_secs(10), async {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await.unwrap();
        String::from_utf8_lossy(&raw).into_owned()
    })
    .await
    .expect("metrics");
    let mut total = 0.0;
    let mut found = false;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix(name)
            && (rest.starts_with(' ') || rest.starts_with('{'))
        {
            let v = rest.rsplit(' ').next().unwrap();
            total += v.trim().parse::<f64>().unwrap();
            found = true;
        }
    }
    assert!(found, "metric {name} not found");
    total
}

/// etcd's count of its watchers.
pub(crate) async fn watchers_on_server(addr: SocketAddr) -> u64 {
    metric(addr, "etcd_debugging_mvcc_watcher_total").await as u64
}

/// etcd's count of its watch streams.
pub(crate) async fn streams_on_server(addr: SocketAddr) -> u64 {
    metric(addr, "etcd_debugging_mvcc_watch_stream_total").await as u64
}

/// A fresh simple token for `user`, from a raw Authenticate call.
pub(crate) async fn raw_token(anon: &Client, user: &str, password: &str) -> String {
    anon.raw()
        .unwrap()
        .auth()
        .authenticate(etcdv3::raw::etcdserverpb::AuthenticateRequest {
            name: user.into(),
            password: password.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .token
}

/// Whether `token` is still valid (using it resets its TTL, so each token is asked once).
pub(crate) async fn token_valid(anon: &Client, token: &str) -> bool {
    let mut req = tonic::Request::new(etcdv3::raw::etcdserverpb::RangeRequest {
        key: "probe".into(),
        ..Default::default()
    });
    req.metadata_mut().insert("token", token.parse().unwrap());
    match anon.raw().unwrap().kv().range(req).await {
        Ok(_) => true,
        Err(s) => {
            assert!(
                s.message().contains("invalid auth token"),
                "unexpected answer for a probe token: {s:?}"
            );
            false
        }
    }
}

/// Wait until every simple token last used before now has expired on the server, without
/// touching them: authenticate fresh probe tokens now and ask one probe per poll (asking
/// resets only that probe's TTL); a token unused since before the probes expires no later than
/// they do, and the server drops expired tokens together.
pub(crate) async fn wait_for_token_expiry(anon: &Client, ttl: Duration) {
    let probes: Vec<String> = {
        let mut v = Vec::new();
        for _ in 0..12 {
            v.push(raw_token(anon, "root", "rootpw").await);
        }
        v
    };
    // A token cannot expire before its TTL has passed: no point asking earlier.
    tokio::time::sleep(ttl).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    for probe in &probes {
        if !token_valid(anon, probe).await {
            return;
        }
        assert!(Instant::now() < deadline, "tokens did not expire");
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    panic!("tokens did not expire after {} probes", probes.len());
}

/// The future of one RPC attempt, as a client layer returns it.
pub(crate) type AttemptFuture =
    std::pin::Pin<Box<dyn Future<Output = Result<(), etcdv3::Error>> + Send>>;

type AttemptFn = dyn Fn(etcdv3::RpcRequest, &mut etcdv3::RpcService) -> AttemptFuture + Send + Sync;

/// A client layer for fault injection: `f` gets every RPC attempt and the inner service
/// (ready), and returns the attempt's future: `inner.call(req)` to perform it, or anything
/// else (refuse it, lose its answer, send it later).
#[derive(Clone)]
pub(crate) struct AttemptLayer(std::sync::Arc<AttemptFn>);

impl AttemptLayer {
    pub(crate) fn new(
        f: impl Fn(etcdv3::RpcRequest, &mut etcdv3::RpcService) -> AttemptFuture + Send + Sync + 'static,
    ) -> Self {
        AttemptLayer(std::sync::Arc::new(f))
    }
}

impl tower::Layer<etcdv3::RpcService> for AttemptLayer {
    type Service = AttemptService;
    fn layer(&self, inner: etcdv3::RpcService) -> AttemptService {
        AttemptService {
            inner,
            f: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub(crate) struct AttemptService {
    inner: etcdv3::RpcService,
    f: std::sync::Arc<AttemptFn>,
}

impl tower::Service<etcdv3::RpcRequest> for AttemptService {
    type Response = ();
    type Error = etcdv3::Error;
    type Future = AttemptFuture;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), etcdv3::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: etcdv3::RpcRequest) -> AttemptFuture {
        (self.f)(req, &mut self.inner)
    }
}

/// An attempt that fails at once, as etcd's "request timed out" (an unknown outcome for a
/// write that was sent).
pub(crate) fn timed_out() -> AttemptFuture {
    Box::pin(async {
        Err(etcdv3::Error::from(tonic::Status::unavailable(
            "etcdserver: request timed out",
        )))
    })
}

/// A client layer that, while `refuse` is set, fails every `Range` attempt without sending
/// it.
pub(crate) fn refuse_reads(refuse: std::sync::Arc<std::sync::atomic::AtomicBool>) -> AttemptLayer {
    use tower::Service;
    AttemptLayer::new(move |req, inner| {
        if req.method == "Range" && refuse.load(std::sync::atomic::Ordering::SeqCst) {
            return Box::pin(async {
                Err(etcdv3::Error::from(tonic::Status::unavailable(
                    "test: read refused",
                )))
            });
        }
        Box::pin(inner.call(req))
    })
}
