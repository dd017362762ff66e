//! [`Client`] and its builder.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use crate::transport::Channel;
use tonic::metadata::AsciiMetadataValue;
use tower::ServiceExt;
use tracing::Instrument;

use crate::balancer::hooks::{DynConnector, DynLayer, RpcRequest, RpcService};
use crate::balancer::retry::{Attempt, RetryState};
use crate::balancer::{
    self, Balancer, DefaultRetryPolicy, ParsedEndpoint, Pick, RetryPolicy, SharedTransport,
};
use crate::error::{Error, ErrorKind, Result};
use crate::kv::Kv;
use crate::proto::etcdserverpb as pb;
use crate::raw::RawClients;

/// A boxed, sendable future with no output: the unit of work an [`Executor`] runs.
pub type BoxFuture = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// Runs the client's background tasks (the HTTP/2 connection driver and request buffer; later
/// the watch and lease workers).
///
/// The default is [`TokioExecutor`], which calls `tokio::spawn`. Embedders that run their own
/// executor supply theirs with [`ClientBuilder::executor`]. The client's I/O itself uses tokio's
/// reactor and timers, so a tokio runtime must be reachable from where the tasks run.
///
/// Every task the client spawns ends once the last handle that uses it ([`Client`] clones and
/// the handles derived from it) is dropped or [`Client::close`] is called.
pub trait Executor: Send + Sync + 'static {
    /// Run `fut` to completion in the background.
    fn spawn(&self, fut: BoxFuture);
}

/// The default [`Executor`]: `tokio::spawn` on the current runtime.
#[derive(Debug, Clone, Copy, Default)]
pub struct TokioExecutor;

impl Executor for TokioExecutor {
    fn spawn(&self, fut: BoxFuture) {
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn(fut)),
            // Not a panic in library code: the builder already refused to build a client
            // outside a runtime, so this is a task started from a foreign thread later on.
            Err(_) => tracing::error!(
                "etcdv3: a background task was started outside a tokio runtime and cannot run; \
                 use the client inside a tokio runtime or give the builder an executor"
            ),
        }
    }
}

impl<F> Executor for F
where
    F: Fn(BoxFuture) + Send + Sync + 'static,
{
    fn spawn(&self, fut: BoxFuture) {
        self(fut)
    }
}

/// The executor a client's background tasks (connections, workers) are spawned on.
#[derive(Clone)]
pub(crate) struct ExecutorAdapter(Arc<dyn Executor>);

impl ExecutorAdapter {
    #[allow(dead_code)] // used by unit tests and per-member connections
    pub(crate) fn new(exec: Arc<dyn Executor>) -> Self {
        ExecutorAdapter(exec)
    }
}

impl ExecutorAdapter {
    /// Run `fut` in the background.
    pub(crate) fn spawn(&self, fut: impl Future<Output = ()> + Send + 'static) {
        self.0.spawn(Box::pin(fut));
    }
}

/// Client configuration, as set on [`ClientBuilder`].
#[derive(Clone)]
pub(crate) struct Config {
    pub(crate) endpoints: Vec<String>,
    pub(crate) connect_timeout: Duration,
    pub(crate) request_timeout: Option<Duration>,
    pub(crate) keep_alive_interval: Duration,
    pub(crate) keep_alive_timeout: Duration,
    pub(crate) credentials: Option<Credentials>,
    pub(crate) max_request_bytes: usize,
    pub(crate) max_txn_ops: usize,
    pub(crate) require_leader: bool,
    pub(crate) ordering_guard: OrderingGuard,
    pub(crate) auto_sync_interval: Option<Duration>,
    pub(crate) retry_policy: Arc<dyn RetryPolicy>,
    pub(crate) connector: Option<DynConnector>,
    pub(crate) layer: Option<DynLayer>,
    #[cfg(feature = "tls")]
    pub(crate) tls: Option<crate::tls::TlsOptions>,
}

/// What the client does when a serializable read is answered from a revision older than one
/// it has already seen (which happens after switching to a member that lags behind).
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OrderingGuard {
    /// Fail the read with [`ErrorKind::StaleRead`] (the default).
    #[default]
    Error,
    /// Mark the lagging endpoint failed and read again from another one (within the deadline);
    /// [`ErrorKind::StaleRead`] if none is current.
    RetryElsewhere,
    /// Accept stale serializable reads.
    Off,
}

impl Config {
    pub(crate) fn parsed_endpoints(&self) -> Result<Vec<ParsedEndpoint>> {
        if self.endpoints.is_empty() {
            return Err(Error::invalid_argument("no endpoints given"));
        }
        self.endpoints
            .iter()
            .map(|e| balancer::parse_endpoint_with(e, self.has_tls()))
            .collect()
    }

    /// Whether TLS settings were given (then `host:port` endpoints use TLS).
    pub(crate) fn has_tls(&self) -> bool {
        #[cfg(feature = "tls")]
        return self.tls.is_some();
        #[cfg(not(feature = "tls"))]
        return false;
    }

    /// The gRPC encoder's limit: the request limit plus room for the envelope, as etcd's
    /// server allows (`--max-request-bytes` + 512 KiB).
    pub(crate) fn max_encoding_bytes(&self) -> usize {
        self.max_request_bytes.saturating_add(512 * 1024)
    }
}

/// User name and password for etcd's token authentication.
#[derive(Clone)]
pub(crate) struct Credentials {
    pub(crate) user: String,
    pub(crate) password: String,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientBuilder")
            .field("endpoints", &self.endpoints)
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("keep_alive_interval", &self.keep_alive_interval)
            .field("keep_alive_timeout", &self.keep_alive_timeout)
            .field("user", &self.credentials.as_ref().map(|c| c.user.as_str()))
            .field("password", &self.credentials.as_ref().map(|_| "<redacted>"))
            .field("max_request_bytes", &self.max_request_bytes)
            .field("max_txn_ops", &self.max_txn_ops)
            .field("require_leader", &self.require_leader)
            .field("ordering_guard", &self.ordering_guard)
            .field("auto_sync_interval", &self.auto_sync_interval)
            .field("retry_policy", &self.retry_policy)
            .finish()
    }
}

/// Configures and connects a [`Client`].
///
/// ```no_run
/// # async fn demo() -> etcdv3::Result<()> {
/// use std::time::Duration;
/// let client = etcdv3::Client::builder(["http://127.0.0.1:2379"])
///     .connect_timeout(Duration::from_secs(2))
///     .request_timeout(Duration::from_secs(5))
///     .connect()
///     .await?;
/// # Ok(()) }
/// ```
pub struct ClientBuilder {
    cfg: Config,
    executor: Arc<dyn Executor>,
    /// Whether `executor` is the default [`TokioExecutor`] (which needs a current runtime).
    tokio_executor: bool,
}

impl fmt::Debug for ClientBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.cfg.fmt(f)
    }
}

/// etcd's default `--max-request-bytes` (1.5 MiB).
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 1536 * 1024;
/// etcd's default `--max-txn-ops`.
pub const DEFAULT_MAX_TXN_OPS: usize = 128;

impl ClientBuilder {
    fn new(endpoints: Vec<String>) -> Self {
        ClientBuilder {
            cfg: Config {
                endpoints,
                connect_timeout: balancer::DEFAULT_CONNECT_TIMEOUT,
                request_timeout: None,
                keep_alive_interval: balancer::DEFAULT_KEEP_ALIVE_INTERVAL,
                keep_alive_timeout: balancer::DEFAULT_KEEP_ALIVE_TIMEOUT,
                credentials: None,
                max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
                max_txn_ops: DEFAULT_MAX_TXN_OPS,
                require_leader: false,
                ordering_guard: OrderingGuard::default(),
                auto_sync_interval: None,
                retry_policy: Arc::new(DefaultRetryPolicy::default()),
                connector: None,
                layer: None,
                #[cfg(feature = "tls")]
                tls: None,
            },
            executor: Arc::new(TokioExecutor),
            tokio_executor: true,
        }
    }

    /// With the default executor a tokio runtime must be current when the client is built
    /// (its connection tasks are spawned on it): say so instead of panicking inside tokio.
    fn check_runtime(&self) -> Result<()> {
        if self.tokio_executor && tokio::runtime::Handle::try_current().is_err() {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                "no tokio runtime is running here: build the client inside a tokio runtime \
                 (or give the builder an executor with a tokio reactor reachable)",
            ));
        }
        Ok(())
    }

    /// How long to wait for a connection to an endpoint (default 5 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.cfg.connect_timeout = timeout;
        self
    }

    /// Default deadline of every unary request (default: none). Each request builder can
    /// override it with its own `timeout(..)`. A request that misses its deadline fails with
    /// [`ErrorKind::Deadline`].
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.cfg.request_timeout = Some(timeout);
        self
    }

    /// HTTP/2 keep-alive ping interval (default 10 s; etcd refuses pings more often than every
    /// 5 s by default). Pings go out while a request or stream is open on the connection (an
    /// idle connection is not pinged: etcd closes connections that ping without streams), so
    /// an open stream or a waiting request notices a dead or paused member within the interval
    /// plus the [timeout](Self::keep_alive_timeout). Zero turns the pings off.
    pub fn keep_alive_interval(mut self, interval: Duration) -> Self {
        self.cfg.keep_alive_interval = interval;
        self
    }

    /// How long a keep-alive ping may go unanswered before the connection is dropped
    /// (default 5 s).
    pub fn keep_alive_timeout(mut self, timeout: Duration) -> Self {
        self.cfg.keep_alive_timeout = timeout;
        self
    }

    /// Authenticate as `user` with `password` (etcd token auth). The password never appears in
    /// `Debug` output.
    pub fn user(mut self, user: impl Into<String>, password: impl Into<String>) -> Self {
        self.cfg.credentials = Some(Credentials {
            user: user.into(),
            password: password.into(),
        });
        self
    }

    /// The largest request the client sends (default 1.5 MiB, etcd's `--max-request-bytes`
    /// default). Larger puts and transactions fail with [`ErrorKind::RequestTooLarge`] before
    /// anything is sent. Raise it when the server's limit is raised.
    pub fn max_request_bytes(mut self, bytes: usize) -> Self {
        self.cfg.max_request_bytes = bytes;
        self
    }

    /// The most compares, or operations per branch, a transaction may have (default 128,
    /// etcd's `--max-txn-ops` default). More fail with [`ErrorKind::TooManyOps`] before sending.
    pub fn max_txn_ops(mut self, ops: usize) -> Self {
        self.cfg.max_txn_ops = ops;
        self
    }

    /// Send `hasleader` with every unary request, so a member that has lost its leader
    /// refuses it ([`ErrorKind::NoLeader`]) instead of answering from a minority partition.
    /// Read-only requests then move to another member. Default off (each request builder can
    /// ask for it); watch and keep-alive streams set it on their own.
    pub fn require_leader(mut self, on: bool) -> Self {
        self.cfg.require_leader = on;
        self
    }

    /// What to do when a serializable read answers from an older revision than this client has
    /// already seen (default [`OrderingGuard::Error`]).
    pub fn ordering_guard(mut self, guard: OrderingGuard) -> Self {
        self.cfg.ordering_guard = guard;
        self
    }

    /// Refresh the endpoint list from the cluster's member list every `interval` (client URLs
    /// of started, non-learner members). Off by default, and with zero (as in Go's client);
    /// [`Client::sync`] does it on demand.
    pub fn auto_sync_interval(mut self, interval: Duration) -> Self {
        self.cfg.auto_sync_interval = (!interval.is_zero()).then_some(interval);
        self
    }

    /// TLS settings for `https://` endpoints (CA, client certificate, server name). With
    /// them, endpoints given as `host:port` (no scheme) use TLS too, as in Go's client.
    #[cfg(feature = "tls")]
    pub fn tls(mut self, tls: crate::tls::TlsOptions) -> Self {
        self.cfg.tls = Some(tls);
        self
    }

    /// Open connections with `connector` instead of TCP: a tower service that takes the
    /// endpoint's URI and yields the byte stream (any `AsyncRead + AsyncWrite`), e.g. an
    /// in-process pipe, a SOCKS tunnel or a socket with special options. TLS (for `https://`
    /// endpoints) still runs on top of it.
    pub fn connector<C, IO>(mut self, connector: C) -> Self
    where
        C: tower::Service<http::Uri, Response = IO> + Clone + Send + Sync + 'static,
        C::Future: Send + 'static,
        C::Error: Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
    {
        self.cfg.connector = Some(DynConnector::new(connector));
        self
    }

    /// Wrap every unary RPC attempt in a tower `layer`, e.g. to record metrics (the
    /// [`RpcRequest`] names the method and endpoint; the response is `()` and the error the
    /// attempt's typed [`Error`]). A layer may also refuse an attempt by returning an error.
    pub fn layer<L>(mut self, layer: L) -> Self
    where
        L: tower::Layer<RpcService> + Send + Sync + 'static,
        L::Service: tower::Service<RpcRequest, Response = (), Error = Error>
            + Clone
            + Send
            + Sync
            + 'static,
        <L::Service as tower::Service<RpcRequest>>::Future: Send + 'static,
    {
        self.cfg.layer = Some(DynLayer::new(layer));
        self
    }

    /// Replace the [`DefaultRetryPolicy`] with `policy`.
    pub fn retry_policy(mut self, policy: impl RetryPolicy) -> Self {
        self.cfg.retry_policy = Arc::new(policy);
        self
    }

    #[cfg(test)]
    pub(crate) fn config_for_tests(&self) -> &Config {
        &self.cfg
    }

    /// Spawn the client's background tasks through `executor` instead of `tokio::spawn`.
    pub fn executor(mut self, executor: impl Executor) -> Self {
        self.executor = Arc::new(executor);
        self.tokio_executor = false;
        self
    }

    /// Connect: the endpoints are tried in order and the first that accepts a connection is
    /// used. When credentials are set, the client also authenticates now, so a wrong password
    /// fails here with [`ErrorKind::AuthFailed`].
    pub async fn connect(self) -> Result<Client> {
        self.check_runtime()?;
        let exec = ExecutorAdapter(self.executor.clone());
        let transport = Balancer::connect(&self.cfg, &exec).await?;
        let client = Client::from_parts(self.cfg, Arc::new(transport), self.executor);
        if client.shared().auth.is_some() {
            client.shared().token(None).await?;
        }
        Ok(client)
    }

    /// Build the client without any I/O: the connection (and authentication) happen on the
    /// first request. Fails only on invalid configuration.
    pub fn connect_lazy(self) -> Result<Client> {
        self.check_runtime()?;
        let exec = ExecutorAdapter(self.executor.clone());
        let transport = Balancer::lazy(&self.cfg, &exec)?;
        Ok(Client::from_parts(
            self.cfg,
            Arc::new(transport),
            self.executor,
        ))
    }
}

/// Options of one request that the generic call path understands.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CallOpts {
    /// The RPC's name, for tracing and retry decisions.
    pub(crate) method: &'static str,
    /// Read-only: safe to retry after it may have reached a server.
    pub(crate) idempotent: bool,
    pub(crate) timeout: Option<Duration>,
    /// `Some(true)`: send `hasleader`; `None`: the client's default.
    pub(crate) require_leader: Option<bool>,
}

impl CallOpts {
    /// A mutation (retried only when it never reached a server).
    pub(crate) const fn mutation(method: &'static str) -> Self {
        CallOpts {
            method,
            idempotent: false,
            timeout: None,
            require_leader: None,
        }
    }

    /// A read-only call (retried on unavailable-class errors).
    pub(crate) const fn read(method: &'static str) -> Self {
        CallOpts {
            method,
            idempotent: true,
            timeout: None,
            require_leader: None,
        }
    }
}

/// An auth token generation and the token to send: `None` when the server said that
/// authentication is not enabled (then requests go without one, as Go's client does, until the
/// server asks for a user again).
pub(crate) type Token = (u64, Option<AsciiMetadataValue>);

struct AuthState {
    creds: Credentials,
    /// The current token and its generation (bumped on every re-authentication).
    token: RwLock<Option<Token>>,
    /// Serialises (re-)authentication so concurrent callers share one Authenticate call.
    refresh: tokio::sync::Mutex<()>,
}

/// What every clone of a client, and every background worker, shares: configuration, the
/// transport, auth state and the executor. Workers hold an `Arc<Shared>` (not a `Client`), so
/// they never keep a client alive; they end when their own handles are gone.
pub(crate) struct Shared {
    cfg: Config,
    transport: SharedTransport,
    auth: Option<AuthState>,
    executor: Arc<dyn Executor>,
    /// The highest header revision any response has shown (for the ordering guard).
    max_revision: AtomicI64,
}

struct Inner {
    shared: Arc<Shared>,
    /// Dropping this stops the auto-sync task (it waits on the receiver).
    _auto_sync_stop: Option<tokio::sync::watch::Sender<()>>,
    /// The lease keeper's command channel, created with the first kept lease.
    lease_keeper: std::sync::OnceLock<crate::lease::KeeperHandle>,
    /// The watch multiplexers, started on first use.
    watch: crate::watch::WatchMuxes,
    /// The gates of the recipes' keys (see [`Client::recipe_gate`]).
    recipe_gates: RecipeGates,
}

/// One gate per recipe key, shared by every session of the client.
type RecipeGates =
    std::sync::Mutex<std::collections::HashMap<bytes::Bytes, Arc<tokio::sync::Mutex<()>>>>;

/// An etcd v3 client.
///
/// Cheap to clone (all clones share one connection and configuration), `Send + Sync`, and every
/// method takes `&self`. Background tasks end when the last clone is dropped, or at once on
/// [`Client::close`].
///
/// ```no_run
/// # async fn demo() -> etcdv3::Result<()> {
/// let client = etcdv3::Client::connect(["127.0.0.1:2379"]).await?;
/// client.kv().put("greeting", "hello").await?;
/// let resp = client.kv().get("greeting").await?;
/// assert_eq!(resp.kvs[0].value_str()?, "hello");
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("endpoint", &self.shared().transport.pinned_endpoint())
            .field("config", &self.shared().cfg)
            .finish()
    }
}

impl Client {
    /// Start configuring a client for `endpoints` (`http://host:port`, `host:port`,
    /// `unix:///path`).
    pub fn builder<I, S>(endpoints: I) -> ClientBuilder
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        ClientBuilder::new(endpoints.into_iter().map(Into::into).collect())
    }

    /// Connect with the default configuration; see [`ClientBuilder::connect`].
    pub async fn connect<I, S>(endpoints: I) -> Result<Client>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self::builder(endpoints).connect().await
    }

    fn from_parts(cfg: Config, transport: SharedTransport, executor: Arc<dyn Executor>) -> Client {
        let auth = cfg.credentials.clone().map(|creds| AuthState {
            creds,
            token: RwLock::new(None),
            refresh: tokio::sync::Mutex::new(()),
        });
        let auto_sync = cfg.auto_sync_interval;
        let shared = Arc::new(Shared {
            cfg,
            transport,
            auth,
            executor,
            max_revision: AtomicI64::new(0),
        });
        let stop = auto_sync.map(|interval| {
            let (tx, rx) = tokio::sync::watch::channel(());
            shared.spawn(auto_sync_task(Arc::downgrade(&shared), interval, rx));
            tx
        });
        Client {
            inner: Arc::new(Inner {
                shared,
                _auto_sync_stop: stop,
                lease_keeper: std::sync::OnceLock::new(),
                watch: crate::watch::WatchMuxes::default(),
                recipe_gates: RecipeGates::default(),
            }),
        }
    }

    /// The state shared with background workers.
    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.inner.shared
    }

    /// The gate of recipe key `key` (absolute): a lock or campaign attempt on the key holds
    /// it until it has finished, cleanup included, so a retried attempt never finds (and
    /// adopts) a key that a cancelled one is about to delete. Per client, not per session:
    /// two sessions on one lease write the same keys. Gates nobody holds are dropped as new
    /// ones are made.
    pub(crate) fn recipe_gate(&self, key: &bytes::Bytes) -> Arc<tokio::sync::Mutex<()>> {
        let mut gates = self
            .inner
            .recipe_gates
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        gates.retain(|k, g| k == key || Arc::strong_count(g) > 1);
        gates.entry(key.clone()).or_default().clone()
    }

    /// The lease keeper slot (see `crate::lease`).
    pub(crate) fn lease_keeper(&self) -> &std::sync::OnceLock<crate::lease::KeeperHandle> {
        &self.inner.lease_keeper
    }

    /// The watch multiplexers of this client (see `crate::watch`).
    pub(crate) fn watch_muxes(&self) -> &crate::watch::WatchMuxes {
        &self.inner.watch
    }

    /// The key-value API.
    pub fn kv(&self) -> Kv {
        Kv::new(self.clone())
    }

    /// The generated gRPC clients, for low-level control: every RPC of every etcd service, with
    /// the raw protocol messages. They share this client's connection but bypass its
    /// conveniences (validation, deadlines, auth token refresh).
    pub fn raw(&self) -> Result<RawClients> {
        Ok(RawClients::new(
            self.shared().transport.channel()?,
            &self.shared().cfg,
        ))
    }

    /// The endpoints requests are balanced over (as configured, or as last synced).
    pub fn endpoints(&self) -> Vec<String> {
        self.shared().transport.endpoints()
    }

    /// The endpoint requests currently go to.
    pub fn pinned_endpoint(&self) -> String {
        self.shared().transport.pinned_endpoint()
    }

    /// Replace the endpoint list at run time. Connections to endpoints that stay are kept.
    pub fn set_endpoints<I, S>(&self, endpoints: I) -> Result<()>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let eps: Vec<String> = endpoints.into_iter().map(Into::into).collect();
        self.shared().transport.set_endpoints(&eps)
    }

    /// Replace the endpoint list with the client URLs of the cluster's started, non-learner
    /// members (as Go's client does on auto-sync). Returns the new list.
    pub async fn sync(&self) -> Result<Vec<String>> {
        sync_endpoints(self.shared()).await
    }

    /// Close the client: the connection is dropped and every later request, on every clone,
    /// fails with [`ErrorKind::Closed`]. Requests already in flight finish or fail on their own.
    pub async fn close(&self) {
        self.shared().transport.close();
        tokio::task::yield_now().await;
    }

    pub(crate) fn config(&self) -> &Config {
        &self.shared().cfg
    }

    /// Send one unary request; see [`Shared::unary`].
    pub(crate) async fn unary<T, R, F, Fut>(&self, req: T, opts: CallOpts, call: F) -> Result<R>
    where
        T: Clone + Send + Sync + 'static,
        R: Send + 'static,
        F: Fn(Channel, crate::grpc::Call<T>) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<tonic::Response<R>, tonic::Status>>
            + Send
            + 'static,
    {
        self.shared().unary(req, opts, call).await
    }
}

/// The auto-sync task: refreshes the endpoint list every `interval` until the client is gone
/// (its `Inner` drops the sender, which wakes this task at once).
async fn auto_sync_task(
    shared: Weak<Shared>,
    interval: Duration,
    mut stop: tokio::sync::watch::Receiver<()>,
) {
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        let Some(shared) = shared.upgrade() else {
            return;
        };
        if shared.is_closed() {
            return;
        }
        if let Err(e) = sync_endpoints(&shared).await {
            tracing::debug!(error = %e, "endpoint auto-sync failed");
        }
    }
}

/// Member list -> client URLs of started (named), non-learner members -> the endpoint set.
async fn sync_endpoints(shared: &Arc<Shared>) -> Result<Vec<String>> {
    let max = shared.cfg.max_encoding_bytes();
    let resp = shared
        .unary(
            pb::MemberListRequest {
                linearizable: false,
            },
            CallOpts::read("MemberList"),
            move |ch, r| {
                let mut c = pb::cluster_client::ClusterClient::new(ch)
                    .max_decoding_message_size(usize::MAX)
                    .max_encoding_message_size(max);
                async move { c.member_list(r.into_request()).await }
            },
        )
        .await?;
    let eps: Vec<String> = resp
        .members
        .into_iter()
        .filter(|m| !m.name.is_empty() && !m.is_learner)
        .flat_map(|m| m.client_ur_ls)
        .collect();
    if eps.is_empty() {
        return Err(Error::new(
            ErrorKind::Unavailable,
            "member list has no started member with client URLs",
        ));
    }
    shared.transport.set_endpoints(&eps)?;
    Ok(eps)
}

#[allow(dead_code)] // stream helpers are used by the watch and lease workers
impl Shared {
    /// The client configuration.
    pub(crate) fn config(&self) -> &Config {
        &self.cfg
    }

    /// The channel to open a stream or send a request on (`Closed` after [`Client::close`]).
    pub(crate) fn channel(&self) -> Result<Channel> {
        self.transport.channel()
    }

    /// The balancer's choice for a new request or stream. Report the outcome with
    /// [`Shared::report_failure`] so a broken endpoint is left for another.
    pub(crate) fn pick(&self) -> Result<Pick> {
        self.transport.pick()
    }

    /// The endpoint of `pick` failed at the connection level: back it off, move the pin on.
    pub(crate) fn report_failure(&self, pick: &Pick, err: &Error) {
        self.transport.report_failure(pick, err);
    }

    /// Report a failed stream to the balancer (see [`Shared::report_failure`]) through a weak
    /// reference, so an idle worker never keeps a connection alive.
    pub(crate) fn report_stream_failure(&self, pick: &crate::balancer::WeakPick, err: &Error) {
        self.transport.report_failure_weak(pick, err);
    }

    /// How many endpoints the balancer has.
    pub(crate) fn endpoint_count(&self) -> usize {
        self.transport.len()
    }

    /// Record a revision seen in a response header.
    pub(crate) fn observe_revision(&self, rev: i64) {
        self.max_revision.fetch_max(rev, Ordering::Relaxed);
    }

    /// The highest revision seen in any response header so far.
    pub(crate) fn max_revision(&self) -> i64 {
        self.max_revision.load(Ordering::Relaxed)
    }

    /// A channel to one chosen member endpoint (not the balanced set); see
    /// `balancer::member_channel`.
    pub(crate) fn member_channel(&self, endpoint: &str) -> Result<Channel> {
        balancer::member_channel(&self.cfg, endpoint, &ExecutorAdapter(self.executor.clone()))
    }

    /// Resolves once [`Client::close`] is called (at once if it was).
    pub(crate) fn closed(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.transport.closed_signal();
        async move {
            // An error means the balancer is gone: the client is no more either.
            let _ = rx.wait_for(|closed| *closed).await;
        }
    }

    /// Whether [`Client::close`] was called.
    pub(crate) fn is_closed(&self) -> bool {
        self.transport.channel().is_err()
    }

    /// Run a background task through the client's executor.
    pub(crate) fn spawn(&self, fut: impl Future<Output = ()> + Send + 'static) {
        self.executor.spawn(Box::pin(fut));
    }

    /// A request for a new stream: carries the auth token (when auth is configured).
    /// `stale` names a token generation the server rejected, forcing re-authentication (shared
    /// with every concurrent caller; one that passes an older generation gets the current
    /// token without a new Authenticate). How servers reject a stale token on a stream: an
    /// error status on open, or (Watch) a canceled create, see
    /// `auth::watch_cancel_may_be_stale_token`, or (election Observe) a silent end.
    pub(crate) async fn stream_request<T>(
        &self,
        msg: T,
        stale: Option<u64>,
    ) -> Result<(tonic::Request<T>, Option<u64>)> {
        let token = self.token(stale).await?;
        let mut request = tonic::Request::new(msg);
        let generation = token.map(|(generation, t)| {
            if let Some(t) = t {
                request.metadata_mut().insert("token", t);
            }
            generation
        });
        Ok((request, generation))
    }

    /// The token to send without any I/O: `Some(None)` when the client has no credentials,
    /// `Some(Some(token))` when a token is cached and is not the `stale` generation, `None`
    /// when [`Shared::token`] must (re-)authenticate.
    pub(crate) fn cached_token(&self, stale: Option<u64>) -> Option<Option<Token>> {
        let Some(auth) = &self.auth else {
            return Some(None);
        };
        let t = auth.token.read().ok().and_then(|g| g.clone())?;
        (Some(t.0) != stale).then_some(Some(t))
    }

    /// The current auth token, authenticating first when there is none or when `stale` names
    /// the generation that the server just rejected. Concurrent callers share one
    /// Authenticate call.
    ///
    /// When the server answers that authentication is not enabled, the client goes on without
    /// a token (Go's client does the same); if the server later asks for a user
    /// ([`ErrorKind::UserEmpty`]), that generation is stale and the next call authenticates.
    pub(crate) async fn token(&self, stale: Option<u64>) -> Result<Option<Token>> {
        let Some(auth) = &self.auth else {
            return Ok(None);
        };
        let current = || auth.token.read().ok().and_then(|g| g.clone());
        if let Some(t) = current()
            && Some(t.0) != stale
        {
            return Ok(Some(t));
        }
        let _guard = auth.refresh.lock().await;
        // Someone else may have refreshed while we waited.
        let prev_gen = match current() {
            Some(t) if Some(t.0) != stale => return Ok(Some(t)),
            Some(t) => t.0,
            None => 0,
        };
        let pick = self.transport.pick()?;
        let mut client = pb::auth_client::AuthClient::new(pick.channel());
        let req = pb::AuthenticateRequest {
            name: auth.creds.user.clone(),
            password: auth.creds.password.clone(),
        };
        let mut request = tonic::Request::new(req);
        if let Some(t) = self.cfg.request_timeout {
            crate::grpc::set_timeout(&mut request, t);
        }
        let value = match with_deadline(self.cfg.request_timeout, client.authenticate(request))
            .await?
            .map_err(Error::from_status)
        {
            Ok(resp) => Some(
                AsciiMetadataValue::try_from(resp.into_inner().token.as_str()).map_err(|e| {
                    Error::new(
                        ErrorKind::Protocol,
                        "server sent an auth token that is not ASCII",
                    )
                    .with_source(e)
                })?,
            ),
            Err(e) if e.kind() == ErrorKind::AuthNotEnabled => None,
            Err(e) => {
                let e = if e.endpoint().is_some() {
                    e
                } else {
                    e.at_endpoint(pick.endpoint())
                };
                // As for any request: a member that cannot serve is left for another, so
                // the retry authenticates elsewhere.
                if is_endpoint_failure(&e) {
                    self.transport.report_failure(&pick, &e);
                }
                return Err(e);
            }
        };
        let fresh = (prev_gen + 1, value);
        if let Ok(mut g) = auth.token.write() {
            *g = Some(fresh.clone());
        }
        Ok(Some(fresh))
    }

    /// Send one unary request through the shared path: a retry loop driven by the configured
    /// [`RetryPolicy`] (through [`RetryState`]'s tower `Policy`) around single attempts. Each attempt goes to the balancer's pick, carries
    /// the remaining deadline, the auth token (re-authenticating once when the server says it
    /// is invalid) and `hasleader` when asked; connection-level failures move the pin on.
    pub(crate) async fn unary<T, R, F, Fut>(
        self: &Arc<Self>,
        req: T,
        opts: CallOpts,
        call: F,
    ) -> Result<R>
    where
        T: Clone + Send + Sync + 'static,
        R: Send + 'static,
        F: Fn(Channel, crate::grpc::Call<T>) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<tonic::Response<R>, tonic::Status>>
            + Send
            + 'static,
    {
        self.unary_at(req, opts, call).await.map(|(r, _)| r)
    }

    /// Like [`Shared::unary`], also returning which endpoint answered.
    pub(crate) async fn unary_at<T, R, F, Fut>(
        self: &Arc<Self>,
        req: T,
        opts: CallOpts,
        call: F,
    ) -> Result<(R, Pick)>
    where
        T: Clone + Send + Sync + 'static,
        R: Send + 'static,
        F: Fn(Channel, crate::grpc::Call<T>) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<tonic::Response<R>, tonic::Status>>
            + Send
            + 'static,
    {
        let timeout = opts.timeout.or(self.cfg.request_timeout);
        // A timeout too large for the clock (`Duration::MAX`) is no deadline.
        let deadline = timeout.and_then(|t| tokio::time::Instant::now().checked_add(t));
        let mut policy = RetryState {
            policy: self.cfg.retry_policy.clone(),
            method: opts.method,
            idempotent: opts.idempotent,
            deadline,
            endpoints: self.transport.len(),
            attempts: 0,
            failures: Vec::new(),
        };
        let mut att = Attempt { msg: req, deadline };
        // The first attempt starts now: its time left is the whole timeout (no clock read).
        let mut fresh = timeout;
        // The retry loop of tower's `Retry`, driven by hand: the same `Policy` decides, but
        // without a service clone and request clone per attempt and with a future a fraction
        // of the size (this path runs for every unary request).
        loop {
            let mut result = self.attempt(&att, fresh.take(), opts, &call).await;
            match tower::retry::Policy::retry(&mut policy, &mut att, &mut result) {
                None => return result,
                Some(wait) => wait.await,
            }
        }
    }

    /// One attempt of a unary request on the balancer's current pick. `fresh` is the time
    /// left when the attempt starts right as the deadline was set (it is read off the clock
    /// otherwise).
    async fn attempt<T, R, F, Fut>(
        &self,
        att: &Attempt<T>,
        mut fresh: Option<Duration>,
        opts: CallOpts,
        call: &F,
    ) -> Result<(R, Pick)>
    where
        T: Clone,
        R: Send + 'static,
        F: Fn(Channel, crate::grpc::Call<T>) -> Fut,
        Fut: Future<Output = std::result::Result<tonic::Response<R>, tonic::Status>>
            + Send
            + 'static,
    {
        let require_leader = opts.require_leader.unwrap_or(self.cfg.require_leader);
        let mut stale = None;
        loop {
            // (Re-)authentication counts against this request's deadline: a caller never
            // waits past it for the shared Authenticate call.
            let token = match self.cached_token(stale) {
                Some(token) => token,
                None => {
                    let left = att
                        .deadline
                        .map(|d| d.saturating_duration_since(tokio::time::Instant::now()));
                    fresh = None;
                    // Boxed: the rare slow path must not grow every request's future.
                    Box::pin(with_deadline(left, self.token(stale))).await??
                }
            };
            let pick = self.transport.pick()?;
            let remaining = match att.deadline {
                Some(_) if fresh.is_some_and(|t| !t.is_zero()) => fresh.take(),
                Some(d) => {
                    let left = d.saturating_duration_since(tokio::time::Instant::now());
                    if left.is_zero() {
                        return Err(deadline_error());
                    }
                    Some(left)
                }
                None => None,
            };
            // The metadata travels as it is; the lean gRPC path writes it straight into the
            // header block (no header map), tonic's clients take it as metadata.
            let request = crate::grpc::Call {
                msg: att.msg.clone(),
                meta: crate::grpc::Meta {
                    timeout: remaining,
                    token: token.as_ref().and_then(|(_, t)| t.clone()),
                    require_leader,
                },
            };
            let span = tracing::debug_span!(
                "etcd_request",
                method = opts.method,
                endpoint = pick.endpoint(),
                outcome = tracing::field::Empty,
            );
            // Boxed once here, so the futures around it (retry, the caller's) stay small and
            // cheap to move.
            let fut = Box::pin(with_deadline_at(
                att.deadline,
                call(pick.channel(), request),
            ));
            let outcome = match &self.cfg.layer {
                None => fut
                    .instrument(span.clone())
                    .await
                    .map(|r| r.map(|resp| resp.into_inner())),
                Some(layer) => {
                    // Run the attempt inside the user's layer; the answer comes back through
                    // a slot since the layer only sees `()`.
                    let slot = Arc::new(std::sync::Mutex::new(None));
                    let out = slot.clone();
                    let endpoint = pick.endpoint().to_owned();
                    let run = Box::pin(async move {
                        let r = match fut.await {
                            Ok(Ok(resp)) => Ok(resp.into_inner()),
                            Ok(Err(status)) => Err(Error::from_status(status)),
                            Err(deadline) => Err(deadline.maybe_sent(true)),
                        };
                        let unit = r
                            .as_ref()
                            .map(|_| ())
                            .map_err(|e| e.summary().at_endpoint(&endpoint));
                        if let Ok(mut g) = out.lock() {
                            *g = Some(r);
                        }
                        unit
                    });
                    let req = RpcRequest::new(opts.method, pick.endpoint().to_owned(), run);
                    let svc = (layer.0)(crate::balancer::hooks::innermost());
                    let layered = svc.oneshot(req).instrument(span.clone()).await;
                    let taken = slot.lock().ok().and_then(|mut g| g.take());
                    match (layered, taken) {
                        (Ok(()), Some(Ok(resp))) => Ok(Ok(resp)),
                        (_, Some(Err(e))) => Err(e),
                        // The layer refused the attempt, or answered without running it.
                        (Err(e), _) => Err(e),
                        (Ok(()), _) => Err(Error::new(
                            ErrorKind::Other,
                            "a client layer answered without performing the request",
                        )),
                    }
                }
            };
            let err = match outcome {
                Ok(Ok(resp)) => {
                    span.record("outcome", "ok");
                    self.transport.report_success(&pick);
                    return Ok((resp, pick));
                }
                Ok(Err(status)) => Error::from_status(status),
                // The deadline passed with the request sent (or being sent): its outcome is
                // unknown, as the user-layer path says too.
                Err(e) => e.maybe_sent(true),
            };
            let err = if err.endpoint().is_some() {
                err
            } else {
                err.at_endpoint(pick.endpoint())
            };
            span.record("outcome", tracing::field::display(err.kind()));
            if err.is_auth_token_error()
                && stale.is_none()
                && let Some((generation, _)) = token
            {
                stale = Some(generation);
                continue;
            }
            if is_endpoint_failure(&err) {
                self.transport.report_failure(&pick, &err);
            } else if err.is_retryable() {
                self.transport.move_on(&pick);
            }
            return Err(err);
        }
    }
}

/// Errors that say the endpoint (not the request) is the problem: its connection failed, or
/// the member cannot serve (no leader, stopping, a learner).
pub(crate) fn is_endpoint_failure(err: &Error) -> bool {
    matches!(
        err.kind(),
        ErrorKind::Unavailable
            | ErrorKind::NoLeader
            | ErrorKind::Stopped
            | ErrorKind::NotSupportedForLearner
    )
}

fn deadline_error() -> Error {
    Error::new(ErrorKind::Deadline, "request deadline exceeded")
}

/// Await `fut` within `timeout` (if any); a missed deadline is [`ErrorKind::Deadline`].
///
/// A plain future (not an `async fn`), so it is the size of `fut` plus a pointer: the timer is
/// boxed, and only made when there is a timeout.
pub(crate) fn with_deadline<F: Future>(timeout: Option<Duration>, fut: F) -> WithDeadline<F> {
    WithDeadline {
        fut,
        sleep: timeout.map(|t| Box::pin(tokio::time::sleep(t))),
    }
}

/// [`with_deadline`] with the deadline as an instant (no clock read here), and the timer
/// held inline: for a future that is boxed anyway (a request attempt), which saves the
/// timer's own allocation.
pub(crate) fn with_deadline_at<F: Future>(
    deadline: Option<tokio::time::Instant>,
    fut: F,
) -> WithDeadline<F, tokio::time::Sleep> {
    WithDeadline {
        fut,
        sleep: deadline.map(tokio::time::sleep_until),
    }
}

pin_project_lite::pin_project! {
    /// The future of [`with_deadline`] and [`with_deadline_at`]; `S` is the timer.
    pub(crate) struct WithDeadline<F, S = Pin<Box<tokio::time::Sleep>>> {
        #[pin]
        fut: F,
        #[pin]
        sleep: Option<S>,
    }
}

impl<F: Future, S: Future> Future for WithDeadline<F, S> {
    type Output = Result<F::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(out) = this.fut.poll(cx) {
            return Poll::Ready(Ok(out));
        }
        if let Some(sleep) = this.sleep.as_pin_mut()
            && sleep.poll(cx).is_ready()
        {
            return Poll::Ready(Err(deadline_error()));
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_redacts_password() {
        let b = Client::builder(["127.0.0.1:2379"]).user("root", "s3cret-pw");
        let s = format!("{b:?}");
        assert!(s.contains("root"), "{s}");
        assert!(!s.contains("s3cret-pw"), "{s}");
        assert!(s.contains("<redacted>"), "{s}");
    }

    #[test]
    fn building_outside_a_runtime_is_an_error_not_a_panic() {
        let e = Client::builder(["127.0.0.1:2379"])
            .connect_lazy()
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
        assert!(e.to_string().contains("tokio runtime"), "{e}");
    }

    #[test]
    fn client_is_send_sync_clone() {
        fn check<T: Send + Sync + Clone + 'static>() {}
        check::<Client>();
    }
}
