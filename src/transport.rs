//! The HTTP/2 transport: one connection per endpoint, on our own HTTP/2 client
//! ([`crate::http2`]).
//!
//! A [`Channel`] is a lazily connected, self-healing HTTP/2 connection to one endpoint:
//!
//! - **Unary calls** encode their headers and their one body frame into the connection's
//!   write buffer from the caller's task ([`Channel::unary`]); nothing is spawned per call.
//! - **Streams** send the rest of their request body from a small pipe task that waits for
//!   room in the stream's send queue and ends when the body ends, the server resets or ends
//!   the stream, or the caller drops the answer.
//! - It is a `tower::Service` for `http::Request<tonic::body::Body>`, so tonic's generated
//!   clients (the raw API, the admin services) run on it unchanged.
//!
//! **Connecting.** The first request connects (TCP or a unix socket, or the user's connector;
//! then TLS for `https://`; then the HTTP/2 preface), within the connect timeout. Requests
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
//! channel and the last request or stream on it are gone, the connection says GOAWAY and
//! closes, and the task ends.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http_body::{Body, Frame};
use tokio::sync::OnceCell;
use tonic::{Code, Status};

use crate::balancer::ParsedEndpoint;
use crate::balancer::hooks::{DynConnector, Io};
use crate::client::{Config, ExecutorAdapter};
use crate::error::{Error, Result};
use crate::http2::conn::{self as h2conn, RequestFields, ResponseStream, SendHandle, StreamError};
use crate::http2::fields::Fields;
use crate::http2::frame::code as reason;

type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

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

    /// Whether TLS settings were given (then `host:port` endpoints use TLS).
    pub(crate) fn has_tls(&self) -> bool {
        #[cfg(feature = "tls")]
        return self.tls_options.is_some();
        #[cfg(not(feature = "tls"))]
        return false;
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
/// requests). It connects on first use, keeps the connection alive with HTTP/2 pings while
/// requests or streams are open, and makes a new connection when the old one was found
/// closed.
#[derive(Clone)]
pub struct Channel {
    inner: Arc<Inner>,
}

struct Inner {
    /// The endpoint as the user wrote it.
    endpoint: String,
    /// What the user's connector is called with.
    uri: http::Uri,
    /// `:scheme` and `:authority` of every request.
    scheme: &'static str,
    authority: String,
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
    made: OnceCell<std::result::Result<h2conn::Conn, Arc<TransportError>>>,
}

impl Conn {
    fn new() -> Arc<Conn> {
        Arc::new(Conn {
            made: OnceCell::new(),
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
    /// True when the request never reached the server: the connection could not be made,
    /// it was closed before the request was written, or the server refused the stream or
    /// went away without processing it.
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

fn status_of(code: Code, err: TransportError) -> Status {
    let err = Arc::new(err);
    let mut status = Status::new(code, err.to_string());
    status.set_source(err);
    status
}

fn unavailable(err: Arc<TransportError>) -> Status {
    let mut status = Status::new(Code::Unavailable, err.to_string());
    status.set_source(err);
    status
}

/// The status of a failed request or stream, mapped as gRPC maps HTTP/2 errors. A stream the
/// server refused, or left unprocessed when it went away, was never sent.
pub(crate) fn status_from_stream(e: StreamError) -> Status {
    let (code, never_sent, message) = match e {
        StreamError::NotProcessed => (
            Code::Unavailable,
            true,
            "the server did not process the request (the connection was closing or closed, \
             or the server refused the stream)"
                .to_owned(),
        ),
        StreamError::AtCapacity => (
            Code::Unavailable,
            true,
            "the server's stream limit was reached".to_owned(),
        ),
        StreamError::ConnectionLost(why) => (Code::Unavailable, false, why),
        StreamError::Reset(c) => {
            let code = match c {
                reason::REFUSED_STREAM => Code::Unavailable,
                reason::CANCEL => Code::Cancelled,
                reason::ENHANCE_YOUR_CALM | reason::FLOW_CONTROL_ERROR => Code::ResourceExhausted,
                reason::INADEQUATE_SECURITY => Code::PermissionDenied,
                _ => Code::Internal,
            };
            (
                code,
                c == reason::REFUSED_STREAM,
                format!("the stream was reset (HTTP/2 error code {c})"),
            )
        }
    };
    status_of(
        code,
        TransportError {
            never_sent,
            message,
            source: None,
        },
    )
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
        let https = scheme == Scheme::HTTPS;
        if !https && scheme != Scheme::HTTP {
            return Err(bad("the scheme must be http or https"));
        }
        #[cfg(feature = "tls")]
        let tls = if https {
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
                scheme: if https { "https" } else { "http" },
                authority: authority.as_str().to_owned(),
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

    /// The connection to send on and its slot, when it is made and did not fail.
    fn ready_now(&self) -> Option<(h2conn::Conn, Arc<Conn>)> {
        let slot = self.current();
        match slot.made.get() {
            Some(Ok(conn)) => Some((conn.clone(), slot)),
            _ => None,
        }
    }

    /// The connection to send on, and its slot. Connects when needed.
    async fn ready(&self) -> std::result::Result<(h2conn::Conn, Arc<Conn>), Status> {
        let slot = self.current();
        let made = match slot.made.get() {
            Some(made) => made,
            // Boxed: connecting (TCP, TLS, the HTTP/2 preface) is a large future that would
            // otherwise grow, and be copied with, every request's future.
            None => {
                slot.made
                    .get_or_init(|| Box::pin(self.inner.connect(&slot)))
                    .await
            }
        };
        match made {
            Ok(conn) => Ok((conn.clone(), slot)),
            Err(e) => {
                let e = e.clone();
                self.inner.replace(&slot);
                Err(unavailable(e))
            }
        }
    }

    /// Open a stream for `path` with `headers` and the first (or whole, when `end`) part of
    /// the body. A connection found closed is replaced once, within the call; under the
    /// server's stream limit the call waits for room.
    ///
    /// With `whole`, the answer is to be read with [`whole_answer`], and the caller's waker
    /// is registered for it as the request is sent (in the same poll).
    async fn open(
        &self,
        path: &str,
        headers: &impl RequestFields,
        body: &Bytes,
        end: bool,
        whole: bool,
    ) -> std::result::Result<ResponseStream, Status> {
        let mut reconnected = false;
        loop {
            // The slow paths are boxed, so that they do not grow every request's future.
            let (conn, slot) = match self.ready_now() {
                Some(ready) => ready,
                None => Box::pin(self.ready()).await?,
            };
            let inner = &self.inner;
            let sent = std::future::poll_fn(|cx| {
                Poll::Ready(conn.send_request(
                    inner.scheme,
                    &inner.authority,
                    path,
                    headers,
                    body,
                    end,
                    whole.then(|| cx.waker()),
                ))
            })
            .await;
            match sent {
                Ok(stream) => return Ok(stream),
                Err(StreamError::AtCapacity) => Box::pin(conn.wait_room()).await,
                Err(StreamError::NotProcessed) if !reconnected => {
                    inner.replace(&slot);
                    reconnected = true;
                }
                Err(e) => {
                    inner.replace(&slot);
                    return Err(status_from_stream(e));
                }
            }
        }
    }

    /// A unary call: send a request whose whole body is `body` (one gRPC message, already
    /// framed) from the caller's task, and wait for the answer, which is taken whole when it
    /// has ended (one visit to the connection, one wake-up).
    ///
    /// Only for methods whose answer is one message: a streamed answer would be held back
    /// until half the stream's window is filled.
    pub(crate) async fn unary(
        &self,
        path: &str,
        headers: &impl RequestFields,
        body: &Bytes,
    ) -> std::result::Result<Answer, Status> {
        let stream = self.open(path, headers, body, true, true).await?;
        whole_answer(stream).await
    }

    /// Send a request whose whole body is `body` from the caller's task, and wait for the
    /// answer's head (the answer may be a stream).
    async fn send_whole_body(
        &self,
        path: &str,
        headers: &impl RequestFields,
        body: &Bytes,
    ) -> std::result::Result<Answer, Status> {
        let stream = self.open(path, headers, body, true, false).await?;
        answer(stream).await
    }

    /// Send a request whose body is sent, as it comes, by a pipe task; wait for the answer's
    /// head. The pipe ends with the body, when the stream ends or fails, or when the answer
    /// is dropped.
    pub(crate) async fn request<B>(
        &self,
        path: &str,
        headers: &impl RequestFields,
        body: B,
    ) -> std::result::Result<Answer, Status>
    where
        B: Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<BoxError>,
    {
        let end = body.is_end_stream();
        let stream = self.open(path, headers, &Bytes::new(), end, false).await?;
        if !end {
            self.inner.settings.exec.spawn(pipe(body, stream.sender()));
        }
        answer(stream).await
    }
}

/// An answer's head and its body still to read.
pub(crate) struct Answer {
    /// The HTTP status.
    pub(crate) status: u16,
    /// The head's fields.
    pub(crate) fields: Fields,
    /// The rest.
    pub(crate) body: RecvBody,
}

impl Answer {
    /// As an `http::Response` (for tonic's generated clients).
    fn into_response(self) -> http::Response<RecvBody> {
        let mut response = http::Response::new(self.body);
        *response.status_mut() =
            http::StatusCode::from_u16(self.status).unwrap_or(http::StatusCode::BAD_GATEWAY);
        *response.headers_mut() = self.fields.to_header_map();
        response
    }
}

/// Wait for the answer's head of `stream`; the answer's body reads the rest.
async fn answer(mut stream: ResponseStream) -> std::result::Result<Answer, Status> {
    let (status, fields) = std::future::poll_fn(|cx| stream.poll_head(cx))
        .await
        .map_err(status_from_stream)?;
    Ok(Answer::new(status, fields, stream))
}

/// Wait for the answer of `stream`, opened `whole` in the same poll: its waker is registered
/// already, so the first poll does not visit the connection.
async fn whole_answer(mut stream: ResponseStream) -> std::result::Result<Answer, Status> {
    let mut first = true;
    let (status, fields) = std::future::poll_fn(|cx| {
        if std::mem::take(&mut first) {
            return Poll::Pending;
        }
        stream.poll_whole(cx)
    })
    .await
    .map_err(status_from_stream)?;
    Ok(Answer::new(status, fields, stream))
}

impl Answer {
    fn new(status: u16, fields: Fields, stream: ResponseStream) -> Answer {
        Answer {
            status,
            fields,
            body: RecvBody {
                stream,
                state: BodyState::Data,
            },
        }
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

    /// Make the connection of `slot` and start its task.
    async fn connect(
        self: &Arc<Self>,
        slot: &Arc<Conn>,
    ) -> std::result::Result<h2conn::Conn, Arc<TransportError>> {
        let failed = |message: String, source: Option<BoxError>| {
            Arc::new(TransportError {
                never_sent: true,
                message,
                source,
            })
        };
        let timeout = self.settings.connect_timeout;
        let io = match tokio::time::timeout(timeout, self.dial()).await {
            Ok(Ok(io)) => io,
            Ok(Err(e)) => return Err(failed("connection failed".into(), Some(e))),
            Err(_) => {
                return Err(failed(
                    format!("connection timed out after {timeout:?}"),
                    None,
                ));
            }
        };
        let (conn, control, driver) = h2conn::handshake(io);
        let task = ConnTask {
            inner: Arc::downgrade(self),
            slot: Arc::downgrade(slot),
            interval: self.settings.keep_alive_interval,
            timeout: self.settings.keep_alive_timeout,
        };
        self.settings.exec.spawn(task.run(driver, control));
        Ok(conn)
    }

    /// TCP (or unix socket, or the user's connector), then TLS.
    async fn dial(&self) -> std::result::Result<Box<dyn Io>, BoxError> {
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
        Ok(io)
    }
}

/// The task that drives one connection and keeps it alive.
struct ConnTask {
    inner: Weak<Inner>,
    slot: Weak<Conn>,
    interval: Duration,
    timeout: Duration,
}

impl ConnTask {
    async fn run(self, driver: impl Future<Output = ()>, control: h2conn::Control) {
        tokio::select! {
            () = driver => tracing::debug!("connection closed"),
            () = self.keep_alive(&control) => {
                tracing::debug!("keep-alive ping unanswered: connection dropped");
                control.fail("keep-alive ping unanswered: connection dropped");
            }
        }
        // Gone (or going): the next request makes a new connection.
        if let (Some(inner), Some(slot)) = (self.inner.upgrade(), self.slot.upgrade()) {
            inner.replace(&slot);
        }
    }

    /// Returns when a ping went unanswered for the keep-alive timeout.
    async fn keep_alive(&self, control: &h2conn::Control) {
        if self.interval.is_zero() {
            // Zero turns pinging off (as in Go's client), rather than pinging nonstop.
            return std::future::pending().await;
        }
        loop {
            tokio::time::sleep(self.interval).await;
            if control.open_streams() == 0 {
                continue;
            }
            match tokio::time::timeout(self.timeout, control.ping()).await {
                Ok(Ok(())) => {}
                // The connection failed: the driver reports that.
                Ok(Err(_)) => return std::future::pending().await,
                Err(_) => return,
            }
        }
    }
}

/// Sends a streaming request's body: waits for room in the stream's send queue before taking
/// the next frame, and stops when the body ends or fails, or the stream takes no more (it
/// was reset or answered, or the answer was dropped).
async fn pipe<B>(mut body: B, send: SendHandle)
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    loop {
        let next = std::future::poll_fn(|cx| {
            if !ready!(send.poll_capacity(cx)) {
                return Poll::Ready(None);
            }
            Pin::new(&mut body).poll_frame(cx).map(Some)
        })
        .await;
        match next {
            None => return,
            Some(None) => {
                send.send_data(Bytes::new(), true);
                return;
            }
            Some(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) => send.send_data(data, false),
                // Request trailers: gRPC has none; end the request.
                Err(_) => {
                    send.send_data(Bytes::new(), true);
                    return;
                }
            },
            Some(Some(Err(e))) => {
                let e: BoxError = e.into();
                tracing::debug!(error = %e, "request body failed: stream reset");
                send.reset(reason::CANCEL);
                return;
            }
        }
    }
}

/// The body of an answer: its DATA frames, then its trailers. Flow-control capacity is
/// given back by the connection as the frames are handed out.
pub struct RecvBody {
    stream: ResponseStream,
    state: BodyState,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum BodyState {
    Data,
    Trailers,
    Done,
}

impl fmt::Debug for RecvBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecvBody").finish_non_exhaustive()
    }
}

/// A part of an answer's body.
pub(crate) enum Part {
    /// A DATA payload.
    Data(Bytes),
    /// The trailers (the body ends after them).
    Trailers(Fields),
}

impl RecvBody {
    /// The next part of the body; `None` at its end.
    pub(crate) fn poll_part(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<std::result::Result<Part, Status>>> {
        if self.state == BodyState::Data {
            match ready!(self.stream.poll_data(cx)) {
                Some(Ok(data)) => return Poll::Ready(Some(Ok(Part::Data(data)))),
                Some(Err(e)) => {
                    self.state = BodyState::Done;
                    return Poll::Ready(Some(Err(status_from_stream(e))));
                }
                None => self.state = BodyState::Trailers,
            }
        }
        if self.state == BodyState::Trailers {
            let r = ready!(self.stream.poll_trailers(cx));
            self.state = BodyState::Done;
            return Poll::Ready(match r {
                Ok(Some(t)) => Some(Ok(Part::Trailers(t))),
                Ok(None) => None,
                Err(e) => Some(Err(status_from_stream(e))),
            });
        }
        Poll::Ready(None)
    }
}

impl Body for RecvBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<std::result::Result<Frame<Bytes>, Status>>> {
        Poll::Ready(match ready!(self.poll_part(cx)) {
            Some(Ok(Part::Data(d))) => Some(Ok(Frame::data(d))),
            Some(Ok(Part::Trailers(t))) => Some(Ok(Frame::trailers(t.to_header_map()))),
            Some(Err(e)) => Some(Err(e)),
            None => None,
        })
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
            let path = path.as_str();
            let answer = match take_ready_body(body) {
                ReadyBody::Whole(data) => {
                    channel.send_whole_body(path, &parts.headers, &data).await
                }
                ReadyBody::Failed(status) => Err(status),
                ReadyBody::Streaming(body) => channel.request(path, &parts.headers, body).await,
            };
            answer.map(Answer::into_response)
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
