//! A lean unary gRPC call: the request and response path of every unary RPC the typed API
//! sends, without tonic's streaming codec machinery.
//!
//! tonic's generated clients run a unary call as a one-message client stream: an encoding body
//! stream, a `Streaming` decoder with its state machine, and metadata conversions on both
//! sides. For a unary call all of that collapses to: encode one length-prefixed message into
//! one buffer, send it as the whole body, read the body's frames until the trailers, and decode
//! one message out of the (normally single) data frame without copying it. Status handling is
//! gRPC's: a trailers-only answer, `grpc-status` in the trailers, or the HTTP status when there
//! are none (the same mapping tonic uses). The request goes out on our own transport
//! ([`Channel::unary`]: headers and the one DATA frame from the caller's task); its failures
//! are [`tonic::Status`]es whose source says whether the request was never sent.
//!
//! Streams get the same treatment where the cost matters (the watch stream): [`streaming`]
//! sends a stream of messages as the request body and [`MessageStream`] reads the answer's
//! messages straight off the body frames, slicing each message out of the frame it arrived in
//! without a copy (only a message that spans frames is gathered into one buffer).
//!
//! The generated clients stay available for everything else (other streams, and the raw API);
//! they run on the same [`Channel`].

use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use crate::http2::conn::RequestFields;
use crate::http2::fields::Fields;
use crate::transport::{Answer, Channel, Part, RecvBody};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures_core::Stream;
use http::{HeaderName, HeaderValue, header};
use http_body::{Body, Frame};
use tonic::metadata::{AsciiMetadataValue, MetadataMap};
use tonic::{Code, Status};

/// The 5-byte gRPC message prefix: compression flag and big-endian length.
const PREFIX: usize = 5;

/// Send `request` (its message plus the metadata set on it: deadline, token, `hasleader`) as a
/// unary call of `path` on `channel`, and decode the answer.
///
/// `max_encoding` and `max_decoding` bound the message sizes (encoded request, decoded
/// response), with the codes tonic uses (`OutOfRange`).
///
/// The message is encoded at once, so the returned future holds only the encoded bytes (the
/// future is boxed per attempt: what it holds is allocated and moved with it).
pub(crate) fn unary<T, R>(
    channel: Channel,
    path: &'static str,
    call: Call<T>,
    max_encoding: usize,
    max_decoding: usize,
) -> impl Future<Output = Result<tonic::Response<R>, Status>>
where
    T: prost::Message,
    R: prost::Message + Default,
{
    let Call { msg, meta } = call;
    let body = encode_unary(&msg, max_encoding);
    drop(msg);
    async move {
        let body = body.map_err(|e| *e)?;
        let answer = channel.unary(path, &meta, &body).await?;
        drop(body);
        drop(meta);
        read_unary(answer, max_decoding).await
    }
}

/// A unary request's body: `msg` as one length-prefixed message (boxed error: it stays small
/// in the call's future).
fn encode_unary<T: prost::Message>(msg: &T, max_encoding: usize) -> Result<Bytes, Box<Status>> {
    let len = msg.encoded_len();
    if len > max_encoding {
        return Err(Box::new(Status::out_of_range(format!(
            "Error, encoded message length too large: found {len} bytes, the limit is: {max_encoding} bytes"
        ))));
    }
    let mut buf = Vec::with_capacity(PREFIX + len);
    put_message(msg, &mut buf)?;
    Ok(Bytes::from(buf))
}

/// Read and decode a unary call's answer.
async fn read_unary<R: prost::Message + Default>(
    answer: Answer,
    max_decoding: usize,
) -> Result<tonic::Response<R>, Status> {
    let Answer {
        status: http_status,
        fields,
        mut body,
    } = answer;

    // A trailers-only answer carries its status in the headers.
    if let Some(status) = error_status(&fields) {
        return Err(status);
    }
    let mut data: Option<Bytes> = None;
    let mut more: Option<BytesMut> = None;
    let mut trailers = None;
    while let Some(part) = std::future::poll_fn(|cx| body.poll_part(cx)).await {
        match part? {
            Part::Data(chunk) => match (&mut data, &mut more) {
                (None, None) => data = Some(chunk),
                (Some(first), None) => {
                    let mut joined = BytesMut::with_capacity(first.len() + chunk.len());
                    joined.put_slice(first);
                    joined.put_slice(&chunk);
                    data = None;
                    more = Some(joined);
                }
                (_, Some(joined)) => joined.put_slice(&chunk),
            },
            Part::Trailers(t) => trailers = Some(t),
        }
        let have = data.as_ref().map_or(0, Bytes::len) + more.as_ref().map_or(0, BytesMut::len);
        if have > PREFIX.saturating_add(max_decoding) {
            return Err(too_large(have - PREFIX, max_decoding));
        }
    }
    match trailers.as_ref() {
        Some(t) if t.contains(GRPC_STATUS) => {
            if let Some(status) = error_status(t) {
                return Err(status);
            }
        }
        _ => {
            let http =
                http::StatusCode::from_u16(http_status).unwrap_or(http::StatusCode::BAD_GATEWAY);
            return Err(status_without_trailers(http));
        }
    }
    let mut bytes = match (data, more) {
        (_, Some(joined)) => joined.freeze(),
        (Some(one), None) => one,
        (None, None) => return Err(Status::internal("Missing response message.")),
    };
    if bytes.len() < PREFIX {
        return Err(Status::internal("truncated gRPC message prefix"));
    }
    let compressed = bytes.get_u8();
    if compressed != 0 {
        return Err(Status::internal(
            "the server sent a compressed message; compression was not negotiated",
        ));
    }
    let msg_len = bytes.get_u32() as usize;
    if msg_len > max_decoding {
        return Err(too_large(msg_len, max_decoding));
    }
    if bytes.len() != msg_len {
        return Err(Status::internal(format!(
            "gRPC message length {msg_len} does not match the {} bytes received",
            bytes.len()
        )));
    }
    let msg = R::decode(bytes).map_err(|e| Status::internal(e.to_string()))?;
    Ok(tonic::Response::new(msg))
}

/// What a request carries besides its message: the deadline (sent as `grpc-timeout`), the
/// auth token, and etcd's `hasleader`.
#[derive(Clone, Debug, Default)]
pub(crate) struct Meta {
    /// The time left for the call.
    pub(crate) timeout: Option<Duration>,
    /// The auth token.
    pub(crate) token: Option<AsciiMetadataValue>,
    /// Ask the member to answer only while it has a leader.
    pub(crate) require_leader: bool,
}

impl Meta {
    /// As tonic metadata (for tonic's generated clients).
    fn into_metadata(self) -> MetadataMap {
        let mut headers = http::HeaderMap::new();
        if let Some(t) = self.timeout {
            headers.insert(GRPC_TIMEOUT.clone(), timeout_value(t));
        }
        if let Some(t) = self.token
            && let Ok(v) = HeaderValue::from_bytes(t.as_bytes())
        {
            headers.insert(TOKEN.clone(), v);
        }
        if self.require_leader {
            headers.insert(HASLEADER.clone(), HeaderValue::from_static("true"));
        }
        MetadataMap::from_headers(headers)
    }
}

/// A request's fields straight from its [`Meta`]: no header map is built, and the
/// timeout is formatted on the stack.
impl RequestFields for Meta {
    fn each(&self, mut f: impl FnMut(&[u8], &[u8])) {
        if let Some(t) = self.timeout {
            let (buf, n) = format_timeout(t);
            f(b"grpc-timeout", &buf[..n]);
        }
        if let Some(t) = &self.token {
            f(b"token", t.as_bytes());
        }
        if self.require_leader {
            f(b"hasleader", b"true");
        }
    }

    fn grpc_constants(&self) -> bool {
        true
    }
}

/// A unary request as the shared request path hands it to a call: the message and its
/// [`Meta`]. The lean path ([`unary`]) sends it as it is; calls through tonic's generated
/// clients take [`Call::into_request`].
#[derive(Debug)]
pub(crate) struct Call<T> {
    pub(crate) msg: T,
    pub(crate) meta: Meta,
}

impl<T> Call<T> {
    /// As a tonic request with the metadata.
    pub(crate) fn into_request(self) -> tonic::Request<T> {
        tonic::Request::from_parts(
            self.meta.into_metadata(),
            tonic::Extensions::default(),
            self.msg,
        )
    }
}

/// The headers of a gRPC request, as tonic would send them: the metadata (deadline, token,
/// `hasleader`), `te: trailers` and `content-type: application/grpc`.
fn grpc_headers(metadata: MetadataMap) -> http::HeaderMap {
    let mut headers = metadata.into_headers();
    headers.insert(header::TE, HeaderValue::from_static("trailers"));
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    headers
}

/// Append one message with its 5-byte gRPC prefix to `buf`.
///
/// Into a `Vec`, not a `BytesMut`: prost writes varints and tags a byte at a time, and
/// `BytesMut`'s `put_slice` is not inlined across crates, so each byte cost a call and a
/// `memcpy`; `Vec`'s inlines to a store.
fn put_message<M: prost::Message>(msg: &M, buf: &mut Vec<u8>) -> Result<(), Status> {
    let len = msg.encoded_len();
    let wire_len = u32::try_from(len)
        .map_err(|_| Status::out_of_range(format!("message of {len} bytes is too large")))?;
    buf.reserve(PREFIX + len);
    buf.push(0);
    buf.extend_from_slice(&wire_len.to_be_bytes());
    msg.encode_raw(buf);
    Ok(())
}

/// A request body that sends the messages of a stream as gRPC messages, and ends when the
/// stream ends. The stream must keep answering `None` once it has ended (an mpsc receiver
/// does): a batch may have seen the end already.
struct MessageBody<S> {
    messages: S,
}

impl<S, M> Body for MessageBody<S>
where
    S: Stream<Item = M> + Unpin,
    M: prost::Message,
{
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let Some(first) = ready!(Pin::new(&mut self.messages).poll_next(cx)) else {
            return Poll::Ready(None);
        };
        // Messages that are ready together go out in one DATA frame (many watch creates at
        // once, say), up to a bound; a pending poll has registered the waker for the rest.
        let mut buf = Vec::new();
        let mut msg = first;
        loop {
            if let Err(status) = put_message(&msg, &mut buf) {
                return Poll::Ready(Some(Err(status)));
            }
            if buf.len() >= BATCH_BYTES {
                break;
            }
            match Pin::new(&mut self.messages).poll_next(cx) {
                Poll::Ready(Some(next)) => msg = next,
                // The end (or nothing more yet) comes with the next poll.
                Poll::Ready(None) | Poll::Pending => break,
            }
        }
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(buf)))))
    }
}

/// How many bytes of ready messages one request DATA frame gathers at most.
const BATCH_BYTES: usize = 32 * 1024;

/// Open a bidirectional (or server) stream: the messages of `request` go out as they come,
/// and the answer's messages are read with `decode`. Fails with the server's status when it
/// refuses the stream at once (a trailers-only answer).
pub(crate) async fn streaming<S, M, T>(
    channel: Channel,
    path: &'static str,
    request: tonic::Request<S>,
    decode: fn(Bytes) -> Result<T, Status>,
) -> Result<MessageStream<T>, Status>
where
    S: Stream<Item = M> + Unpin + Send + 'static,
    M: prost::Message + 'static,
{
    let (metadata, _extensions, messages) = request.into_parts();
    let body = MessageBody { messages };
    let answer = channel.request(path, &grpc_headers(metadata), body).await?;
    if let Some(status) = error_status(&answer.fields) {
        return Err(status);
    }
    // A trailers-only OK answer has no messages: the stream ends at once.
    let done = answer.fields.contains(GRPC_STATUS);
    let http_status =
        http::StatusCode::from_u16(answer.status).unwrap_or(http::StatusCode::BAD_GATEWAY);
    Ok(MessageStream {
        body: AnswerBody::Recv(answer.body),
        decode,
        chunk: Bytes::new(),
        gathered: BytesMut::new(),
        http_status,
        done,
    })
}

/// Decode one message with prost (the `decode` of [`streaming`] for most streams).
pub(crate) fn decode<T: prost::Message + Default>(bytes: Bytes) -> Result<T, Status> {
    T::decode(bytes).map_err(|e| Status::internal(e.to_string()))
}

/// The body of an answer: the transport's, read directly (boxing it in `tonic::body::Body`
/// added a dynamic call and an error mapping per DATA frame).
enum AnswerBody {
    Recv(RecvBody),
    #[cfg(test)]
    Test(TestBody),
}

impl AnswerBody {
    #[inline]
    fn poll_part(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Part, Status>>> {
        match self {
            AnswerBody::Recv(b) => b.poll_part(cx),
            #[cfg(test)]
            AnswerBody::Test(b) => Poll::Ready(b.0.pop()),
        }
    }
}

/// The messages of a gRPC answer, read straight off the response body: see the module docs.
pub(crate) struct MessageStream<T> {
    body: AnswerBody,
    decode: fn(Bytes) -> Result<T, Status>,
    /// The undecoded rest of the last DATA frame (messages are sliced out of it).
    chunk: Bytes,
    /// A message that spans frames, gathered (non-empty only while one is incomplete).
    gathered: BytesMut,
    http_status: http::StatusCode,
    /// The trailers (or the end, or an error) were seen: nothing more will come.
    done: bool,
}

impl<T> MessageStream<T> {
    /// The next message; `Ok(None)` when the stream ended with an OK status.
    pub(crate) async fn message(&mut self) -> Result<Option<T>, Status> {
        std::future::poll_fn(|cx| self.poll_message(cx)).await
    }

    fn poll_message(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<T>, Status>> {
        loop {
            match self.take_message() {
                Ok(Some(msg)) => return Poll::Ready((self.decode)(msg).map(Some)),
                Ok(None) => {}
                Err(status) => {
                    self.done = true;
                    return Poll::Ready(Err(status));
                }
            }
            if self.done {
                return Poll::Ready(Ok(None));
            }
            match ready!(self.body.poll_part(cx)) {
                Some(Ok(part)) => match part {
                    Part::Data(data) => self.push(data),
                    Part::Trailers(t) => {
                        self.done = true;
                        if !t.contains(GRPC_STATUS) {
                            return Poll::Ready(Err(status_without_trailers(self.http_status)));
                        }
                        if let Some(status) = error_status(&t) {
                            return Poll::Ready(Err(status));
                        }
                        if !self.chunk.is_empty() || !self.gathered.is_empty() {
                            return Poll::Ready(Err(Status::internal(
                                "the stream ended inside a gRPC message",
                            )));
                        }
                    }
                },
                Some(Err(status)) => {
                    self.done = true;
                    return Poll::Ready(Err(status));
                }
                None => {
                    self.done = true;
                    return Poll::Ready(Err(status_without_trailers(self.http_status)));
                }
            }
        }
    }

    /// Add a DATA frame's bytes.
    fn push(&mut self, data: Bytes) {
        if self.gathered.is_empty() && self.chunk.is_empty() {
            self.chunk = data;
        } else {
            if !self.chunk.is_empty() {
                // An incomplete message at the end of the previous frame: gather from here.
                let rest = std::mem::take(&mut self.chunk);
                self.gathered.extend_from_slice(&rest);
            }
            self.gathered.extend_from_slice(&data);
        }
    }

    /// The next complete message's bytes (without its prefix), if one has arrived.
    fn take_message(&mut self) -> Result<Option<Bytes>, Status> {
        if self.gathered.is_empty() {
            let Some(len) = message_len(&self.chunk)? else {
                return Ok(None);
            };
            if self.chunk.len() < PREFIX + len {
                return Ok(None);
            }
            // Servers send a message per DATA frame: then the message is the whole chunk, and
            // taking it saves a split (a reference count up, and down again with the rest).
            let mut msg = if self.chunk.len() == PREFIX + len {
                std::mem::take(&mut self.chunk)
            } else {
                self.chunk.split_to(PREFIX + len)
            };
            msg.advance(PREFIX);
            return Ok(Some(msg));
        }
        let Some(len) = message_len(&self.gathered)? else {
            return Ok(None);
        };
        if self.gathered.len() < PREFIX + len {
            return Ok(None);
        }
        let mut msg = self.gathered.split_to(PREFIX + len).freeze();
        msg.advance(PREFIX);
        Ok(Some(msg))
    }
}

#[cfg(test)]
impl<T> MessageStream<T> {
    /// A stream over these DATA frames, then an OK status.
    pub(crate) fn for_test(frames: Vec<Bytes>, decode: fn(Bytes) -> Result<T, Status>) -> Self {
        Self::for_test_with(frames, Some("0"), decode)
    }

    /// A stream over these DATA frames, then trailers with this `grpc-status` (or none).
    pub(crate) fn for_test_with(
        frames: Vec<Bytes>,
        status: Option<&'static str>,
        decode: fn(Bytes) -> Result<T, Status>,
    ) -> Self {
        let mut items: Vec<Result<Part, Status>> =
            frames.into_iter().map(|f| Ok(Part::Data(f))).collect();
        if let Some(code) = status {
            let mut t = Fields::default();
            t.push(GRPC_STATUS.as_bytes(), code.as_bytes());
            t.push(b"grpc-message", b"test%20status");
            items.push(Ok(Part::Trailers(t)));
        }
        items.reverse();
        MessageStream {
            body: AnswerBody::Test(TestBody(items)),
            decode,
            chunk: Bytes::new(),
            gathered: BytesMut::new(),
            http_status: http::StatusCode::OK,
            done: false,
        }
    }
}

/// A body that yields prepared parts (popped from the end).
#[cfg(test)]
struct TestBody(Vec<Result<Part, Status>>);

impl<T> Stream for MessageStream<T> {
    type Item = Result<T, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().poll_message(cx).map(Result::transpose)
    }
}

/// The length of the message whose prefix starts `buf`, once the prefix is complete.
fn message_len(buf: &[u8]) -> Result<Option<usize>, Status> {
    let Some(&[flag, a, b, c, d]) = buf.first_chunk::<PREFIX>() else {
        return Ok(None);
    };
    if flag != 0 {
        return Err(Status::internal(
            "the server sent a compressed message; compression was not negotiated",
        ));
    }
    let len = u32::from_be_bytes([a, b, c, d]);
    usize::try_from(len)
        .map(Some)
        .map_err(|_| Status::out_of_range(format!("message of {len} bytes is too large")))
}

/// Set the `grpc-timeout` header of `request` (the server's copy of the deadline).
///
/// Unlike tonic's `set_timeout` (microsecond precision), the value is rounded up by at most
/// about 1%, to at most 8 digits (gRPC's limit) with the coarsest unit that keeps that
/// precision, and is formatted without allocating. (The transport sends it as a literal that
/// is never indexed: it changes too often for HPACK's table.) Rounding up (never down) keeps
/// the deadline the client's own: its timer fires at the exact time and cancels the call, so
/// the server never gives up first.
pub(crate) fn set_timeout<T>(request: &mut tonic::Request<T>, timeout: Duration) {
    let headers = std::mem::take(request.metadata_mut()).into_headers();
    let mut headers = headers;
    headers.insert(GRPC_TIMEOUT.clone(), timeout_value(timeout));
    *request.metadata_mut() = MetadataMap::from_headers(headers);
}

/// The `grpc-timeout` header value for `timeout` (see [`set_timeout`]).
pub(crate) fn timeout_value(timeout: Duration) -> HeaderValue {
    let (buf, n) = format_timeout(timeout);
    // Digits and a unit letter: always a valid header value.
    HeaderValue::from_bytes(&buf[..n]).unwrap_or(HeaderValue::from_static("1M"))
}

/// The `grpc-timeout` value for `timeout` (see [`set_timeout`]), formatted on the stack:
/// the buffer and the length used.
fn format_timeout(timeout: Duration) -> ([u8; 12], usize) {
    let (value, unit) = grpc_timeout(timeout);
    let mut buf = [0u8; 12];
    let mut n = 0;
    let mut digits = [0u8; 10];
    let mut d = 0;
    let mut v = value;
    loop {
        digits[d] = b'0' + (v % 10) as u8;
        d += 1;
        v /= 10;
        if v == 0 || d == digits.len() {
            break;
        }
    }
    while d > 0 {
        d -= 1;
        buf[n] = digits[d];
        n += 1;
    }
    buf[n] = unit;
    (buf, n + 1)
}

/// Header names the request path uses, parsed once (a `&str` key is parsed on every use).
pub(crate) static GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");
/// The auth token header etcd reads.
pub(crate) static TOKEN: HeaderName = HeaderName::from_static("token");
/// etcd's "require a leader" header.
pub(crate) static HASLEADER: HeaderName = HeaderName::from_static("hasleader");

/// The `grpc-timeout` value and unit for `timeout`: at most 8 digits, rounded up by at most
/// about 1% (exact below 100 ms).
fn grpc_timeout(timeout: Duration) -> (u64, u8) {
    // In u64 (`as_millis` is u128): whole seconds times 1000 fit below 2^64 for any
    // timeout shorter than 584 million years.
    let ms = timeout
        .as_secs()
        .saturating_mul(1000)
        .saturating_add(u64::from(timeout.subsec_millis()));
    let up = |step: u64| ms.div_ceil(step) * step;
    match ms {
        0 => (u64::try_from(timeout.as_micros()).unwrap_or(0).max(1), b'u'),
        1..100 => {
            let partial = !timeout.subsec_nanos().is_multiple_of(1_000_000);
            (ms + u64::from(partial), b'm')
        }
        100..1_000 => (up(10), b'm'),
        1_000..10_000 => (up(10), b'm'),
        10_000..100_000 => (up(100), b'm'),
        100_000..99_000_000 => (up(1_000), b'm'),
        _ => ((timeout.as_secs().div_ceil(60)).min(99_999_999), b'M'),
    }
}

const GRPC_STATUS: &str = "grpc-status";

/// The error status in `fields`, if they carry a `grpc-status` other than 0. The common
/// answer ("0") is recognised without building a `Status` (which copies the headers).
fn error_status(fields: &Fields) -> Option<Status> {
    match fields.get(GRPC_STATUS) {
        None | Some(b"0") => None,
        Some(_) => {
            Status::from_header_map(&fields.to_header_map()).filter(|s| s.code() != Code::Ok)
        }
    }
}

fn too_large(len: usize, max: usize) -> Status {
    Status::out_of_range(format!(
        "Error, decoded message length too large: found {len} bytes, the limit is: {max} bytes"
    ))
}

/// The status of an answer that ended without `grpc-status`: from the HTTP status, as gRPC's
/// HTTP-to-gRPC status mapping says (and tonic does).
fn status_without_trailers(http: http::StatusCode) -> Status {
    use http::StatusCode as S;
    let code = match http {
        S::BAD_REQUEST => Code::Internal,
        S::UNAUTHORIZED => Code::Unauthenticated,
        S::FORBIDDEN => Code::PermissionDenied,
        S::NOT_FOUND => Code::Unimplemented,
        S::TOO_MANY_REQUESTS | S::BAD_GATEWAY | S::SERVICE_UNAVAILABLE | S::GATEWAY_TIMEOUT => {
            Code::Unavailable
        }
        S::OK => {
            return Status::unknown(
                "protocol error: the response ended without a grpc-status trailer",
            );
        }
        _ => Code::Unknown,
    };
    Status::new(code, format!("HTTP status {http} without a gRPC status"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_is_rounded_up_by_at_most_one_percent() {
        let ms = |v| Duration::from_millis(v);
        assert_eq!(grpc_timeout(Duration::from_micros(250)), (250, b'u'));
        assert_eq!(grpc_timeout(Duration::from_micros(57_300)), (58, b'm'));
        assert_eq!(grpc_timeout(ms(57)), (57, b'm'));
        assert_eq!(grpc_timeout(ms(451)), (460, b'm'));
        assert_eq!(grpc_timeout(ms(4_991)), (5_000, b'm'));
        assert_eq!(grpc_timeout(ms(29_901)), (30_000, b'm'));
        assert_eq!(grpc_timeout(Duration::from_secs(200_000)), (3_334, b'M'));
        for v in [
            1u64, 99, 100, 999, 1_000, 9_999, 10_000, 12_345_678, 98_999_999,
        ] {
            let (n, unit) = grpc_timeout(ms(v));
            assert_eq!(unit, b'm');
            assert!(n >= v && n * 100 <= v * 101 + 100, "{v} -> {n}");
            assert!(n <= 99_999_999);
        }
        let mut r = tonic::Request::new(());
        set_timeout(&mut r, ms(4_321));
        assert_eq!(r.metadata().get("grpc-timeout").unwrap(), "4330m");
    }

    fn raw(b: Bytes) -> Result<Bytes, Status> {
        Ok(b)
    }

    fn framed(msgs: &[&[u8]]) -> Bytes {
        let mut out = BytesMut::new();
        for m in msgs {
            out.put_u8(0);
            out.put_u32(u32::try_from(m.len()).unwrap());
            out.put_slice(m);
        }
        out.freeze()
    }

    async fn collect(mut s: MessageStream<Bytes>) -> (Vec<Bytes>, Option<Status>) {
        let mut out = Vec::new();
        loop {
            match s.message().await {
                Ok(Some(m)) => out.push(m),
                Ok(None) => return (out, None),
                Err(e) => return (out, Some(e)),
            }
        }
    }

    #[tokio::test]
    async fn message_stream_slices_gathers_and_ends_on_the_status() {
        let msgs: [&[u8]; 4] = [b"first", b"", b"a somewhat longer third message", b"4"];
        let all = framed(&msgs);
        for piece in [1usize, 2, 5, 6, 13, all.len()] {
            let frames = all.chunks(piece).map(Bytes::copy_from_slice).collect();
            let (got, err) = collect(MessageStream::for_test(frames, raw)).await;
            assert!(err.is_none(), "{err:?}");
            assert_eq!(got, msgs.to_vec(), "frames of {piece} bytes");
        }
        // Several messages in one frame are slices of it, not copies.
        let frame = all.clone();
        let (got, _) = collect(MessageStream::for_test(vec![frame], raw)).await;
        let base = all.as_ptr() as usize;
        let at = got[0].as_ptr() as usize;
        assert!(at >= base && at < base + all.len(), "zero-copy slice");
    }

    #[tokio::test]
    async fn message_stream_errors() {
        // An error status after some messages: the messages, then the status.
        let s = MessageStream::for_test_with(vec![framed(&[b"x"])], Some("9"), raw);
        let (got, err) = collect(s).await;
        assert_eq!(got.len(), 1);
        let err = err.unwrap();
        assert_eq!(err.code(), Code::FailedPrecondition);
        assert_eq!(err.message(), "test status");
        // No status at all: an error, not a clean end.
        let (_, err) = collect(MessageStream::for_test_with(vec![], None, raw)).await;
        assert_eq!(err.unwrap().code(), Code::Unknown);
        // The stream ends inside a message.
        let mut cut = framed(&[b"abcdef"]);
        cut.truncate(8);
        let (got, err) = collect(MessageStream::for_test(vec![cut], raw)).await;
        assert!(got.is_empty());
        assert_eq!(err.unwrap().code(), Code::Internal);
        // A compressed message is refused.
        let mut compressed = BytesMut::from(&framed(&[b"z"])[..]);
        compressed[0] = 1;
        let (_, err) = collect(MessageStream::for_test(vec![compressed.freeze()], raw)).await;
        assert_eq!(err.unwrap().code(), Code::Internal);
    }

    #[test]
    fn error_status_only_for_nonzero_codes() {
        let mut h = Fields::default();
        assert!(error_status(&h).is_none());
        h.push(b"grpc-status", b"0");
        assert!(error_status(&h).is_none());
        let mut h = Fields::default();
        h.push(b"grpc-status", b"9");
        h.push(b"grpc-message", b"etcdserver:%20key%20not%20found");
        let s = error_status(&h).unwrap();
        assert_eq!(s.code(), Code::FailedPrecondition);
        assert_eq!(s.message(), "etcdserver: key not found");
    }

    #[test]
    fn http_status_mapping() {
        assert_eq!(
            status_without_trailers(http::StatusCode::SERVICE_UNAVAILABLE).code(),
            Code::Unavailable
        );
        assert_eq!(
            status_without_trailers(http::StatusCode::NOT_FOUND).code(),
            Code::Unimplemented
        );
        assert_eq!(
            status_without_trailers(http::StatusCode::OK).code(),
            Code::Unknown
        );
    }
}
