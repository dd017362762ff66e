//! The HTTP/2 transport: one connection per endpoint, straight on the `h2` crate.
//!
//! A [`Channel`] is a lazily connected, self-healing HTTP/2 connection to one endpoint. It
//! replaces tonic's `Channel` (and with it hyper's client dispatch and tonic's buffer task):
//!
//! - **Unary calls** send their headers and their one body frame from the caller's task
//!   ([`Channel::unary`]); nothing is spawned and nothing crosses to another task except what
//!   h2's connection task writes.
//! - **Streams** send their request body from a small pipe task that waits for flow-control
//!   capacity and ends when the body ends, the server resets the stream, or the caller drops
//!   the answer.
//! - It is a `tower::Service` for `http::Request<tonic::body::Body>`, so tonic's generated
//!   clients (the raw API, the admin services) run on it unchanged.
//!
//! **Connecting.** The first request connects (TCP or a unix socket, or the user's connector;
//! then TLS for `https://`; then the HTTP/2 handshake), within the connect timeout. Requests
//! that arrive meanwhile wait for the same attempt. A failed attempt fails every request that
//! waited for it, as "never sent" (the balancer then tries another endpoint); the next request
//! starts a new attempt. When an established connection is found closed, one new connection
//! is made within the same request.
//!
//! **Keep-alive.** While any request or stream is open on the connection, an HTTP/2 PING goes
//! out every keep-alive interval; when its answer takes longer than the keep-alive timeout the
//! connection is dropped, which fails its open requests and streams (a paused or unreachable
//! member is detected this way). An idle connection is not pinged: etcd (like every gRPC-Go
//! server) counts pings on a connection without streams as abuse and closes it, and Go's
//! client does not ping idle connections by default either.
//!
//! **Ownership.** The connection task belongs to the channel: when the last clone of the
//! channel and the last request or stream on it are gone, h2 closes the connection and the
//! task ends.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use h2::client::{ResponseFuture, SendRequest};
use h2::{Reason, RecvStream, SendStream};
use http::uri::{Authority, PathAndQuery, Scheme};
use http_body::{Body, Frame};
use tokio::sync::{OnceCell, oneshot};
use tonic::{Code, Status};

use crate::balancer::ParsedEndpoint;
use crate::balancer::hooks::{DynConnector, Io};
use crate::client::{Config, ExecutorAdapter};
use crate::error::{Error, Result};

type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// HTTP/2 flow-control window of each stream (what hyper, and so tonic, use by default).
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
/// HTTP/2 flow-control window of the whole connection (hyper's default too).
const CONNECTION_WINDOW: u32 = 5 * 1024 * 1024;
/// Received bytes handed out before their flow-control capacity is given back at the latest
/// (a small fraction of the stream window, so the sender never waits for it).
const RELEASE_BATCH: usize = 64 * 1024;
/// How much a connection buffers per stream before a sender waits (hyper's default).
const MAX_SEND_BUFFER: usize = 1024 * 1024;

/// How every connection of a client is made: timeouts, keep-alive, the user's connector, TLS.
#[derive(Clone)]
pub(crate) struct ConnectSettings {
    connect_timeout: Duration,
    keep_alive_interval: Duration,
    keep_alive_timeout: Duration,
    connector: Option<DynConnector>,
    #[cfg(feature = "tls")]
    tls: Arc<std::sync::OnceLock<std::result::Result<crate::tls::ClientTls, String>>>,
    #[cfg(feature = "tls")]
    tls_options: Option<crate::tls::TlsOptions>,
    exec: ExecutorAdapter,
}

impl fmt::Debug for ConnectSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectSettings")
            .field("connect_timeout", &self.connect_timeout)
            .field("keep_alive_interval", &self.keep_alive_interval)
            .field("keep_alive_timeout", &self.keep_alive_timeout)
            .finish()
    }
}

impl ConnectSettings {
    /// The connection settings of a client's configuration. The TLS configuration is built
    /// once, on the first `https://` endpoint.
    pub(crate) fn new(cfg: &Config, exec: &ExecutorAdapter) -> Self {
        ConnectSettings {
            connect_timeout: cfg.connect_timeout,
            keep_alive_interval: cfg.keep_alive_interval,
            keep_alive_timeout: cfg.keep_alive_timeout,
            connector: cfg.connector.clone(),
            #[cfg(feature = "tls")]
            tls: Arc::new(std::sync::OnceLock::new()),
            #[cfg(feature = "tls")]
            tls_options: cfg.tls.clone(),
            exec: exec.clone(),
        }
    }

    #[cfg(feature = "tls")]
    fn tls(&self, endpoint: &ParsedEndpoint) -> Result<crate::tls::ClientTls> {
        let built = self.tls.get_or_init(|| {
            crate::tls::ClientTls::new(&self.tls_options.clone().unwrap_or_default())
                .map_err(|e| e.to_string())
        });
        built.clone().map_err(|e| {
            Error::invalid_argument(format!("TLS settings for {:?}: {e}", endpoint.original))
        })
    }
}

/// Where a channel connects to.
enum Address {
    /// `host:port`, resolved on every connect.
    Tcp(String),
    /// A unix socket path.
    Unix(String),
}

/// A lazily connected HTTP/2 connection to one etcd endpoint, shared by its clones.
///
/// The generated clients of [`raw`](crate::raw) run on it (it is a `tower::Service` for gRPC
/// requests); see the [module docs](self) for how it connects, keeps alive and reconnects.
#[derive(Clone)]
pub struct Channel {
    inner: Arc<Inner>,
}

struct Inner {
    /// The endpoint as the user wrote it.
    endpoint: String,
    /// What the user's connector is called with.
    uri: http::Uri,
    scheme: Scheme,
    authority: Authority,
    address: Address,
    #[cfg(feature = "tls")]
    tls: Option<(
        crate::tls::ClientTls,
        tokio_rustls::rustls::pki_types::ServerName<'static>,
    )>,
    settings: ConnectSettings,
    /// The current connection (or attempt). Replaced when it fails or closes.
    current: Mutex<Arc<Conn>>,
}

/// One connection attempt and, once made, the connection.
struct Conn {
    made: OnceCell<std::result::Result<SendRequest<Bytes>, Arc<TransportError>>>,
    /// Requests and streams open on this connection (keep-alive pings only while non-zero).
    open: AtomicUsize,
}

impl Conn {
    fn new() -> Arc<Conn> {
        Arc::new(Conn {
            made: OnceCell::new(),
            open: AtomicUsize::new(0),
        })
    }
}

impl fmt::Debug for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Channel")
            .field("endpoint", &self.inner.endpoint)
            .finish()
    }
}

/// Why a request failed in the transport (the source of its [`Status`]).
#[derive(Debug)]
pub(crate) struct TransportError {
    /// True when the request never reached the server: the connection could not be made, or
    /// it was gone before the request was written.
    never_sent: bool,
    message: String,
    source: Option<BoxError>,
}

impl TransportError {
    /// Whether the request never left the client.
    pub(crate) fn never_sent(&self) -> bool {
        self.never_sent
    }
}

impl fmt::Display for TransportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        if let Some(s) = &self.source {
            write!(f, ": {}", crate::balancer::source_chain(&**s))?;
        }
        Ok(())
    }
}

impl std::error::Error for TransportError {}

fn unavailable(err: Arc<TransportError>) -> Status {
    let mut status = Status::new(Code::Unavailable, err.to_string());
    status.set_source(err);
    status
}

fn closed_before_sent(e: impl Into<BoxError>) -> Status {
    unavailable(Arc::new(TransportError {
        never_sent: true,
        message: "the connection closed before the request was sent".into(),
        source: Some(e.into()),
    }))
}

/// The status of a request or stream that h2 failed, mapped as gRPC maps HTTP/2 errors. A
/// stream the server refused, or left unprocessed when it went away, was never sent.
pub(crate) fn status_from_h2(e: h2::Error) -> Status {
    let refused = e.reason() == Some(Reason::REFUSED_STREAM) || (e.is_go_away() && e.is_remote());
    let code = if refused || e.is_io() || e.is_go_away() {
        Code::Unavailable
    } else {
        match e.reason() {
            Some(Reason::CANCEL) => Code::Cancelled,
            Some(Reason::ENHANCE_YOUR_CALM) => Code::ResourceExhausted,
            Some(Reason::INADEQUATE_SECURITY) => Code::PermissionDenied,
            Some(_) => Code::Internal,
            None => Code::Unavailable,
        }
    };
    let err = Arc::new(TransportError {
        never_sent: refused,
        message: "connection error".into(),
        source: Some(Box::new(e)),
    });
    let mut status = Status::new(code, err.to_string());
    status.set_source(err);
    status
}

impl Channel {
    /// A channel to `endpoint`, connected on first use.
    pub(crate) fn new(endpoint: &ParsedEndpoint, settings: &ConnectSettings) -> Result<Channel> {
        let bad =
            |why: &str| Error::invalid_argument(format!("endpoint {:?}: {why}", endpoint.original));
        let (scheme, authority, address, uri) =
            if let Some(path) = endpoint.uri.strip_prefix("unix:") {
                // The :authority of requests over a unix socket (gRPC-Go's default).
                let uri = http::Uri::from_static("http://localhost");
                (
                    Scheme::HTTP,
                    Authority::from_static("localhost"),
                    Address::Unix(path.to_owned()),
                    uri,
                )
            } else {
                let uri: http::Uri = endpoint.uri.parse().map_err(|_| bad("not a valid URI"))?;
                let authority = uri.authority().cloned().ok_or_else(|| bad("no host"))?;
                let scheme = uri.scheme().cloned().unwrap_or(Scheme::HTTP);
                (
                    scheme,
                    authority.clone(),
                    Address::Tcp(authority.as_str().to_owned()),
                    uri,
                )
            };
        #[cfg(feature = "tls")]
        let tls = if scheme == Scheme::HTTPS {
            let tls = settings.tls(endpoint)?;
            let host = authority
                .host()
                .trim_start_matches('[')
                .trim_end_matches(']');
            let name = tls.domain_name().unwrap_or(host).to_owned();
            let name = tokio_rustls::rustls::pki_types::ServerName::try_from(name)
                .map_err(|e| bad(&format!("TLS server name: {e}")))?;
            Some((tls, name))
        } else {
            None
        };
        Ok(Channel {
            inner: Arc::new(Inner {
                endpoint: endpoint.original.clone(),
                uri,
                scheme,
                authority,
                address,
                #[cfg(feature = "tls")]
                tls,
                settings: settings.clone(),
                current: Mutex::new(Conn::new()),
            }),
        })
    }

    /// Connect now (if not connected yet): what [`Client::connect`](crate::Client::connect)
    /// waits for on each endpoint.
    pub(crate) async fn connect(&self) -> std::result::Result<(), Status> {
        self.ready().await.map(drop)
    }

    fn current(&self) -> Arc<Conn> {
        match self.inner.current.lock() {
            Ok(c) => c.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// A ready handle to send one request on, and the connection it belongs to. Connects
    /// when needed; an established connection found closed is replaced once, within the call.
    async fn ready(&self) -> std::result::Result<(SendRequest<Bytes>, Arc<Conn>), Status> {
        let mut reconnected = false;
        loop {
            let conn = self.current();
            let made = match conn.made.get() {
                Some(made) => made,
                // Boxed: connecting (TCP, TLS, the HTTP/2 handshake) is a large future that
                // would otherwise grow, and be copied with, every request's future.
                None => {
                    conn.made
                        .get_or_init(|| Box::pin(self.inner.connect(&conn)))
                        .await
                }
            };
            let mut send = match made {
                Ok(send) => send.clone(),
                Err(e) => {
                    self.inner.replace(&conn);
                    return Err(unavailable(e.clone()));
                }
            };
            match std::future::poll_fn(|cx| send.poll_ready(cx)).await {
                Ok(()) => return Ok((send, conn)),
                Err(e) => {
                    self.inner.replace(&conn);
                    if reconnected {
                        return Err(closed_before_sent(e));
                    }
                    reconnected = true;
                }
            }
        }
    }

    /// The request head h2 sends: POST to `path` on this endpoint, with `headers`.
    fn head(&self, path: PathAndQuery, headers: http::HeaderMap) -> http::Request<()> {
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(self.inner.scheme.clone());
        parts.authority = Some(self.inner.authority.clone());
        parts.path_and_query = Some(path);
        let mut head = http::Request::new(());
        *head.method_mut() = http::Method::POST;
        if let Ok(uri) = http::Uri::from_parts(parts) {
            *head.uri_mut() = uri;
        }
        *head.headers_mut() = headers;
        head
    }

    /// Send a request whose whole body is `body` (one gRPC message, already framed) from the
    /// caller's task, and wait for the answer's head.
    pub(crate) async fn unary(
        &self,
        path: &'static str,
        headers: http::HeaderMap,
        body: Bytes,
    ) -> std::result::Result<http::Response<RecvBody>, Status> {
        self.send_whole(PathAndQuery::from_static(path), headers, body)
            .await
    }

    /// [`unary`](Self::unary) for any path.
    async fn send_whole(
        &self,
        path: PathAndQuery,
        headers: http::HeaderMap,
        body: Bytes,
    ) -> std::result::Result<http::Response<RecvBody>, Status> {
        let (mut send, conn) = self.ready().await?;
        let open = OpenGuard::new(conn);
        let head = self.head(path, headers);
        let (response, mut stream) = send.send_request(head, false).map_err(closed_before_sent)?;
        stream.send_data(body, true).map_err(status_from_h2)?;
        let response = response.await.map_err(status_from_h2)?;
        Ok(response.map(|recv| RecvBody::new(recv, open, None)))
    }

    /// Send a request whose body is sent, as it comes, by a pipe task; wait for the answer's
    /// head. The pipe ends with the body, a reset, or when the answer is dropped.
    pub(crate) async fn request<B>(
        &self,
        path: PathAndQuery,
        headers: http::HeaderMap,
        body: B,
    ) -> std::result::Result<http::Response<RecvBody>, Status>
    where
        B: Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<BoxError>,
    {
        let (mut send, conn) = self.ready().await?;
        let open = OpenGuard::new(conn);
        let head = self.head(path, headers);
        let end = body.is_end_stream();
        let (response, stream) = send.send_request(head, end).map_err(closed_before_sent)?;
        let stop = if end {
            None
        } else {
            let (stop, stopped) = oneshot::channel();
            self.inner.settings.exec.spawn(pipe(body, stream, stopped));
            Some(stop)
        };
        let response = WaitHead {
            response,
            _stop: stop,
        };
        let (response, stop) = response.await?;
        Ok(response.map(|recv| RecvBody::new(recv, open, stop)))
    }
}

pin_project_lite::pin_project! {
    /// The answer's head; holds the pipe's stop signal so that dropping the wait (a deadline)
    /// also stops the pipe.
    struct WaitHead {
        #[pin]
        response: ResponseFuture,
        _stop: Option<oneshot::Sender<()>>,
    }
}

impl Future for WaitHead {
    type Output =
        std::result::Result<(http::Response<RecvStream>, Option<oneshot::Sender<()>>), Status>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = ready!(this.response.poll(cx)).map_err(status_from_h2)?;
        Poll::Ready(Ok((response, this._stop.take())))
    }
}

impl Inner {
    /// Replace `old` (failed or closed) by a fresh attempt, unless that happened already.
    fn replace(&self, old: &Arc<Conn>) {
        let mut cur = match self.current.lock() {
            Ok(c) => c,
            Err(p) => p.into_inner(),
        };
        if Arc::ptr_eq(&cur, old) {
            *cur = Conn::new();
        }
    }

    /// Make the connection of `conn` and start its task.
    async fn connect(
        self: &Arc<Self>,
        conn: &Arc<Conn>,
    ) -> std::result::Result<SendRequest<Bytes>, Arc<TransportError>> {
        let failed = |message: String, source: Option<BoxError>| {
            Arc::new(TransportError {
                never_sent: true,
                message,
                source,
            })
        };
        let timeout = self.settings.connect_timeout;
        let made = match tokio::time::timeout(timeout, self.handshake()).await {
            Ok(Ok(made)) => made,
            Ok(Err(e)) => return Err(failed("connection failed".into(), Some(e))),
            Err(_) => {
                return Err(failed(
                    format!("connection timed out after {timeout:?}"),
                    None,
                ));
            }
        };
        let (send, mut connection) = made;
        let ping = connection.ping_pong();
        let task = ConnTask {
            inner: Arc::downgrade(self),
            conn: Arc::downgrade(conn),
            interval: self.settings.keep_alive_interval,
            timeout: self.settings.keep_alive_timeout,
        };
        self.settings.exec.spawn(task.run(connection, ping));
        Ok(send)
    }

    /// TCP (or unix socket, or the user's connector), then TLS, then the HTTP/2 preface.
    async fn handshake(
        &self,
    ) -> std::result::Result<(SendRequest<Bytes>, h2::client::Connection<Box<dyn Io>>), BoxError>
    {
        let io: Box<dyn Io> = match (&self.settings.connector, &self.address) {
            (Some(c), _) => c.connect(self.uri.clone()).await?,
            (None, Address::Tcp(addr)) => {
                let tcp = tokio::net::TcpStream::connect(addr.as_str()).await?;
                tcp.set_nodelay(true)?;
                Box::new(tcp)
            }
            (None, Address::Unix(path)) => Box::new(tokio::net::UnixStream::connect(path).await?),
        };
        #[cfg(feature = "tls")]
        let io: Box<dyn Io> = match &self.tls {
            Some((tls, name)) => Box::new(tls.connect(name.clone(), io).await?),
            None => io,
        };
        let made = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_send_buffer_size(MAX_SEND_BUFFER)
            .enable_push(false)
            .handshake(io)
            .await?;
        Ok(made)
    }
}

/// The task that drives one connection and keeps it alive.
struct ConnTask {
    inner: Weak<Inner>,
    conn: Weak<Conn>,
    interval: Duration,
    timeout: Duration,
}

impl ConnTask {
    async fn run(
        self,
        connection: h2::client::Connection<Box<dyn Io>>,
        ping: Option<h2::PingPong>,
    ) {
        tokio::select! {
            r = connection => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "connection closed");
                }
            }
            () = self.keep_alive(ping) => {
                tracing::debug!("keep-alive ping unanswered: connection dropped");
            }
        }
        // Gone (or going): the next request makes a new connection.
        if let (Some(inner), Some(conn)) = (self.inner.upgrade(), self.conn.upgrade()) {
            inner.replace(&conn);
        }
    }

    /// Returns when a ping went unanswered for the keep-alive timeout.
    async fn keep_alive(&self, ping: Option<h2::PingPong>) {
        let Some(mut ping) = ping else {
            return std::future::pending().await;
        };
        loop {
            tokio::time::sleep(self.interval).await;
            let busy = self
                .conn
                .upgrade()
                .is_some_and(|c| c.open.load(Ordering::Relaxed) > 0);
            if !busy {
                continue;
            }
            match tokio::time::timeout(self.timeout, ping.ping(h2::Ping::opaque())).await {
                Ok(Ok(_)) => {}
                // The connection failed: its own future reports that.
                Ok(Err(_)) => return std::future::pending().await,
                Err(_) => return,
            }
        }
    }
}

/// Counts a request or stream as open on its connection while it lives.
struct OpenGuard {
    conn: Arc<Conn>,
}

impl OpenGuard {
    fn new(conn: Arc<Conn>) -> Self {
        conn.open.fetch_add(1, Ordering::Relaxed);
        OpenGuard { conn }
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.conn.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Sends a streaming request's body: waits for flow-control capacity before taking the next
/// frame, and stops when the body ends or fails, the server resets the stream, or the answer
/// is dropped (`stop`).
async fn pipe<B>(mut body: B, mut send: SendStream<Bytes>, mut stop: oneshot::Receiver<()>)
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    enum Next<D, E> {
        Stop,
        Frame(Option<std::result::Result<Frame<D>, E>>),
    }
    loop {
        send.reserve_capacity(1);
        let next = std::future::poll_fn(|cx| {
            if Pin::new(&mut stop).poll(cx).is_ready() || send.poll_reset(cx).is_ready() {
                return Poll::Ready(Next::Stop);
            }
            while send.capacity() == 0 {
                match ready!(send.poll_capacity(cx)) {
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => return Poll::Ready(Next::Stop),
                }
            }
            Pin::new(&mut body).poll_frame(cx).map(Next::Frame)
        })
        .await;
        let sent = match next {
            Next::Stop => return,
            Next::Frame(None) => {
                let _ = send.send_data(Bytes::new(), true);
                return;
            }
            Next::Frame(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) => send.send_data(data, false),
                Err(frame) => match frame.into_trailers() {
                    Ok(trailers) => {
                        let _ = send.send_trailers(trailers);
                        return;
                    }
                    Err(_) => Ok(()),
                },
            },
            Next::Frame(Some(Err(e))) => {
                let e: BoxError = e.into();
                tracing::debug!(error = %e, "request body failed: stream reset");
                send.send_reset(Reason::CANCEL);
                return;
            }
        };
        if sent.is_err() {
            return;
        }
    }
}

/// The body of an answer: its DATA frames, then its trailers. The flow-control capacity of
/// the frames handed out is given back in batches (every 64 KiB, and whenever
/// no more data is waiting), not frame by frame: a watch stream gets thousands of small ones.
pub struct RecvBody {
    recv: RecvStream,
    /// Bytes handed out but not yet given back to flow control (given back in batches).
    unreleased: usize,
    state: BodyState,
    _open: OpenGuard,
    /// Dropping it stops the request's pipe task.
    _stop: Option<oneshot::Sender<()>>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum BodyState {
    Data,
    Trailers,
    Done,
}

impl RecvBody {
    fn new(recv: RecvStream, open: OpenGuard, stop: Option<oneshot::Sender<()>>) -> Self {
        RecvBody {
            recv,
            unreleased: 0,
            state: BodyState::Data,
            _open: open,
            _stop: stop,
        }
    }

    /// Give the flow-control capacity of the data handed out so far back to the sender.
    fn release(&mut self) {
        if self.unreleased > 0 {
            let _ = self.recv.flow_control().release_capacity(self.unreleased);
            self.unreleased = 0;
        }
    }
}

impl fmt::Debug for RecvBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecvBody").finish_non_exhaustive()
    }
}

impl Body for RecvBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<std::result::Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        if this.state == BodyState::Data {
            match this.recv.poll_data(cx) {
                Poll::Pending => {
                    // Caught up: give back what was handed out, so the sender can go on.
                    this.release();
                    return Poll::Pending;
                }
                Poll::Ready(Some(Ok(data))) => {
                    this.unreleased += data.len();
                    if this.unreleased >= RELEASE_BATCH {
                        this.release();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Poll::Ready(Some(Err(e))) => {
                    this.state = BodyState::Done;
                    return Poll::Ready(Some(Err(status_from_h2(e))));
                }
                Poll::Ready(None) => {
                    this.release();
                    this.state = BodyState::Trailers;
                }
            }
        }
        if this.state == BodyState::Trailers {
            let r = ready!(this.recv.poll_trailers(cx));
            this.state = BodyState::Done;
            return Poll::Ready(match r {
                Ok(Some(t)) => Some(Ok(Frame::trailers(t))),
                Ok(None) => None,
                Err(e) => Some(Err(status_from_h2(e))),
            });
        }
        Poll::Ready(None)
    }

    fn is_end_stream(&self) -> bool {
        self.state == BodyState::Done
    }
}

/// tonic's generated clients send through this: the request's path and headers go out as
/// they are (scheme and authority are this endpoint's). A body that is ready whole (a unary
/// call's) is sent from the caller's task; a stream's body goes through a pipe task.
impl tower::Service<http::Request<tonic::body::Body>> for Channel {
    type Response = http::Response<RecvBody>;
    type Error = Status;
    type Future =
        Pin<Box<dyn Future<Output = std::result::Result<http::Response<RecvBody>, Status>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<std::result::Result<(), Status>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let channel = self.clone();
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            let path = parts
                .uri
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/"));
            match take_ready_body(body) {
                ReadyBody::Whole(data) => channel.send_whole(path, parts.headers, data).await,
                ReadyBody::Failed(status) => Err(status),
                ReadyBody::Streaming(body) => channel.request(path, parts.headers, body).await,
            }
        })
    }
}

/// What a request body had ready before it was sent.
enum ReadyBody {
    /// All of it (a unary call's one message): sent from the caller's task, no pipe.
    Whole(Bytes),
    /// It failed at once (e.g. tonic's encoder refusing a message over its size limit).
    Failed(Status),
    /// More is to come (a client or bidirectional stream): the frames taken, then the rest.
    Streaming(Prefixed),
}

/// Poll `body` without waiting (a no-op waker) for up to two frames: a body that is one DATA
/// frame and then its end is a unary request's and needs no pipe task.
fn take_ready_body(mut body: tonic::body::Body) -> ReadyBody {
    let mut cx = Context::from_waker(std::task::Waker::noop());
    let first = match Pin::new(&mut body).poll_frame(&mut cx) {
        Poll::Ready(None) => return ReadyBody::Whole(Bytes::new()),
        Poll::Ready(Some(Err(status))) => return ReadyBody::Failed(status),
        Poll::Ready(Some(Ok(frame))) => frame,
        Poll::Pending => return ReadyBody::Streaming(Prefixed::new(Vec::new(), body)),
    };
    let data = match first.into_data() {
        Ok(data) => data,
        Err(frame) => return ReadyBody::Streaming(Prefixed::new(vec![frame], body)),
    };
    match Pin::new(&mut body).poll_frame(&mut cx) {
        Poll::Ready(None) => ReadyBody::Whole(data),
        Poll::Ready(Some(Err(status))) => ReadyBody::Failed(status),
        Poll::Ready(Some(Ok(second))) => {
            ReadyBody::Streaming(Prefixed::new(vec![Frame::data(data), second], body))
        }
        Poll::Pending => ReadyBody::Streaming(Prefixed::new(vec![Frame::data(data)], body)),
    }
}

/// A body whose first frames were already taken: those, then the rest.
struct Prefixed {
    /// The frames taken, in reverse order (popped from the end).
    taken: Vec<Frame<Bytes>>,
    rest: tonic::body::Body,
}

impl Prefixed {
    fn new(mut taken: Vec<Frame<Bytes>>, rest: tonic::body::Body) -> Self {
        taken.reverse();
        Prefixed { taken, rest }
    }
}

impl Body for Prefixed {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<std::result::Result<Frame<Bytes>, Status>>> {
        match self.taken.pop() {
            Some(frame) => Poll::Ready(Some(Ok(frame))),
            None => Pin::new(&mut self.rest).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.taken.is_empty() && self.rest.is_end_stream()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    /// A body that yields these frames, `Pending` where a `None` is (waking itself).
    struct Script(Vec<Option<std::result::Result<Frame<Bytes>, Status>>>);

    impl Body for Script {
        type Data = Bytes;
        type Error = Status;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<std::result::Result<Frame<Bytes>, Status>>> {
            if self.0.is_empty() {
                return Poll::Ready(None);
            }
            match self.0.remove(0) {
                Some(item) => Poll::Ready(Some(item)),
                None => {
                    cx.waker().wake_by_ref();
                    Poll::Pending
                }
            }
        }
    }

    fn body(items: Vec<Option<std::result::Result<Frame<Bytes>, Status>>>) -> tonic::body::Body {
        tonic::body::Body::new(Script(items))
    }

    fn data(s: &'static str) -> Option<std::result::Result<Frame<Bytes>, Status>> {
        Some(Ok(Frame::data(Bytes::from_static(s.as_bytes()))))
    }

    /// Everything the body sends, joined.
    async fn rest(b: Prefixed) -> Bytes {
        b.collect().await.map(|c| c.to_bytes()).unwrap_or_default()
    }

    #[tokio::test]
    async fn a_ready_single_frame_body_is_sent_whole_and_others_keep_every_frame() {
        // One frame, then the end: a unary call's body.
        match take_ready_body(body(vec![data("one")])) {
            ReadyBody::Whole(b) => assert_eq!(b, "one"),
            _ => panic!("a one-frame body is sent whole"),
        }
        // Empty.
        assert!(matches!(take_ready_body(body(vec![])), ReadyBody::Whole(b) if b.is_empty()));
        // An error at once is the request's error.
        let failed = take_ready_body(body(vec![Some(Err(Status::out_of_range("too big")))]));
        assert!(matches!(failed, ReadyBody::Failed(s) if s.code() == Code::OutOfRange));
        // Two frames ready, then more later: nothing taken is lost, the order is kept.
        match take_ready_body(body(vec![data("a"), data("b"), None, data("c")])) {
            ReadyBody::Streaming(b) => assert_eq!(rest(b).await, "abc"),
            _ => panic!("a longer body streams"),
        }
        // One frame, then pending.
        match take_ready_body(body(vec![data("a"), None, data("b")])) {
            ReadyBody::Streaming(b) => assert_eq!(rest(b).await, "ab"),
            _ => panic!("a pending body streams"),
        }
        // Pending at once.
        match take_ready_body(body(vec![None, data("x")])) {
            ReadyBody::Streaming(b) => assert_eq!(rest(b).await, "x"),
            _ => panic!("a pending body streams"),
        }
    }
}
