//! [`Client`] and its builder.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tonic::metadata::AsciiMetadataValue;
use tonic::transport::Channel;

use crate::balancer::{self, ParsedEndpoint, SharedTransport, Transport};
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
        drop(tokio::spawn(fut));
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

/// Bridges our [`Executor`] to the executor trait hyper (and so tonic) spawns through.
#[derive(Clone)]
pub(crate) struct ExecutorAdapter(Arc<dyn Executor>);

impl<F> hyper::rt::Executor<F> for ExecutorAdapter
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, fut: F) {
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
}

impl Config {
    pub(crate) fn parsed_endpoints(&self) -> Result<Vec<ParsedEndpoint>> {
        if self.endpoints.is_empty() {
            return Err(Error::invalid_argument("no endpoints given"));
        }
        self.endpoints
            .iter()
            .map(|e| balancer::parse_endpoint(e))
            .collect()
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
            },
            executor: Arc::new(TokioExecutor),
        }
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
    /// 5 s by default).
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

    /// Spawn the client's background tasks through `executor` instead of `tokio::spawn`.
    pub fn executor(mut self, executor: impl Executor) -> Self {
        self.executor = Arc::new(executor);
        self
    }

    /// Connect: the endpoints are tried in order and the first that accepts a connection is
    /// used. When credentials are set, the client also authenticates now, so a wrong password
    /// fails here with [`ErrorKind::AuthFailed`].
    pub async fn connect(self) -> Result<Client> {
        let exec = ExecutorAdapter(self.executor.clone());
        let transport = Transport::connect(&self.cfg, &exec).await?;
        let client = Client::from_parts(self.cfg, Arc::new(transport), self.executor);
        if client.shared().auth.is_some() {
            client.shared().token(None).await?;
        }
        Ok(client)
    }

    /// Build the client without any I/O: the connection (and authentication) happen on the
    /// first request. Fails only on invalid configuration.
    pub fn connect_lazy(self) -> Result<Client> {
        let exec = ExecutorAdapter(self.executor.clone());
        let transport = Transport::lazy(&self.cfg, &exec)?;
        Ok(Client::from_parts(
            self.cfg,
            Arc::new(transport),
            self.executor,
        ))
    }
}

/// Options of one request that the generic call path understands.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct CallOpts {
    pub(crate) timeout: Option<Duration>,
}

struct AuthState {
    creds: Credentials,
    /// The current token and its generation (bumped on every re-authentication).
    token: RwLock<Option<(u64, AsciiMetadataValue)>>,
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
    #[allow(dead_code)] // used by the watch and lease workers
    executor: Arc<dyn Executor>,
}

struct Inner {
    shared: Arc<Shared>,
    /// The watch multiplexers, started on first use.
    watch: crate::watch::WatchMuxes,
}

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
        Client {
            inner: Arc::new(Inner {
                shared: Arc::new(Shared {
                    cfg,
                    transport,
                    auth,
                    executor,
                }),
                watch: crate::watch::WatchMuxes::default(),
            }),
        }
    }

    /// The state shared with background workers.
    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.inner.shared
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

    /// The endpoints this client was configured with.
    pub fn endpoints(&self) -> Vec<String> {
        self.shared().transport.endpoints()
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
        T: Clone,
        F: Fn(Channel, tonic::Request<T>) -> Fut,
        Fut: Future<Output = std::result::Result<tonic::Response<R>, tonic::Status>>,
    {
        self.shared().unary(req, opts, call).await
    }
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

    /// Whether [`Client::close`] was called.
    pub(crate) fn is_closed(&self) -> bool {
        self.transport.channel().is_err()
    }

    /// Run a background task through the client's executor.
    pub(crate) fn spawn(&self, fut: impl Future<Output = ()> + Send + 'static) {
        self.executor.spawn(Box::pin(fut));
    }

    /// A request for a new stream: carries the auth token (when auth is configured).
    /// `stale` names a token generation the server rejected, forcing re-authentication.
    pub(crate) async fn stream_request<T>(
        &self,
        msg: T,
        stale: Option<u64>,
    ) -> Result<(tonic::Request<T>, Option<u64>)> {
        let token = self.token(stale).await?;
        let mut request = tonic::Request::new(msg);
        let generation = token.map(|(generation, t)| {
            request.metadata_mut().insert("token", t);
            generation
        });
        Ok((request, generation))
    }

    /// The current auth token, authenticating first when there is none or when `stale` names
    /// the generation that the server just rejected. Concurrent callers share one
    /// Authenticate call.
    pub(crate) async fn token(
        &self,
        stale: Option<u64>,
    ) -> Result<Option<(u64, AsciiMetadataValue)>> {
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
        let channel = self.transport.channel()?;
        let mut client = pb::auth_client::AuthClient::new(channel);
        let req = pb::AuthenticateRequest {
            name: auth.creds.user.clone(),
            password: auth.creds.password.clone(),
        };
        let mut request = tonic::Request::new(req);
        if let Some(t) = self.cfg.request_timeout {
            request.set_timeout(t);
        }
        let resp = with_deadline(self.cfg.request_timeout, client.authenticate(request))
            .await?
            .map_err(Error::from_status)?
            .into_inner();
        let value = AsciiMetadataValue::try_from(resp.token.as_str()).map_err(|e| {
            Error::new(
                ErrorKind::Protocol,
                "server sent an auth token that is not ASCII",
            )
            .with_source(e)
        })?;
        let fresh = (prev_gen + 1, value);
        if let Ok(mut g) = auth.token.write() {
            *g = Some(fresh.clone());
        }
        Ok(Some(fresh))
    }

    /// Send one unary request through the shared path: deadline, auth token (re-authenticating
    /// once when the server says the token is invalid), error classification.
    pub(crate) async fn unary<T, R, F, Fut>(&self, req: T, opts: CallOpts, call: F) -> Result<R>
    where
        T: Clone,
        F: Fn(Channel, tonic::Request<T>) -> Fut,
        Fut: Future<Output = std::result::Result<tonic::Response<R>, tonic::Status>>,
    {
        let timeout = opts.timeout.or(self.cfg.request_timeout);
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        let mut stale = None;
        loop {
            let token = self.token(stale).await?;
            let channel = self.transport.channel()?;
            let mut request = tonic::Request::new(req.clone());
            if let Some(d) = deadline {
                let left = d.saturating_duration_since(tokio::time::Instant::now());
                if left.is_zero() {
                    return Err(deadline_error());
                }
                request.set_timeout(left);
            }
            if let Some((_, t)) = &token {
                request.metadata_mut().insert("token", t.clone());
            }
            let remaining =
                deadline.map(|d| d.saturating_duration_since(tokio::time::Instant::now()));
            let result = with_deadline(remaining, call(channel, request)).await?;
            match result {
                Ok(resp) => return Ok(resp.into_inner()),
                Err(status) => {
                    let err = Error::from_status(status);
                    if err.is_auth_token_error()
                        && stale.is_none()
                        && let Some((generation, _)) = token
                    {
                        stale = Some(generation);
                        continue;
                    }
                    return Err(err);
                }
            }
        }
    }
}

fn deadline_error() -> Error {
    Error::new(ErrorKind::Deadline, "request deadline exceeded")
}

/// Await `fut` within `timeout` (if any); a missed deadline is [`ErrorKind::Deadline`].
pub(crate) async fn with_deadline<F: Future>(
    timeout: Option<Duration>,
    fut: F,
) -> Result<F::Output> {
    match timeout {
        None => Ok(fut.await),
        Some(t) => tokio::time::timeout(t, fut)
            .await
            .map_err(|_| deadline_error()),
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
    fn client_is_send_sync_clone() {
        fn check<T: Send + Sync + Clone + 'static>() {}
        check::<Client>();
    }
}
