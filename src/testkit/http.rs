//! A tiny HTTP/1.1 client over plain TCP, enough for etcd's `/health` and its
//! JSON gateway. Blocking (std) and async (tokio) flavours.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The largest response read; etcd's answers here are a few hundred bytes.
const MAX_RESPONSE: u64 = 256 * 1024;

/// A parsed HTTP response.
#[derive(Debug)]
pub(crate) struct HttpResponse {
    pub(crate) status: u16,
    pub(crate) body: String,
}

fn build_request(addr: SocketAddr, method: &str, path: &str, body: Option<&str>) -> Vec<u8> {
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: etcdv3-testkit\r\n\
         Accept: application/json\r\nConnection: close\r\n"
    );
    if let Some(body) = body {
        req.push_str("Content-Type: application/json\r\n");
        req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    } else {
        req.push_str("\r\n");
    }
    req.into_bytes()
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn decode_chunked(mut data: &[u8]) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    // Bounded: every round consumes at least the size line.
    loop {
        let line_end = find(data, b"\r\n").ok_or_else(|| invalid("truncated chunk size"))?;
        let size_text = std::str::from_utf8(&data[..line_end]).map_err(|_| invalid("bad chunk"))?;
        let size_text = size_text.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16).map_err(|_| invalid("bad chunk size"))?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        if data.len() < size {
            return Err(invalid("truncated chunk"));
        }
        out.extend_from_slice(&data[..size]);
        data = data.get(size + 2..).unwrap_or(&[]);
    }
}

fn parse_response(raw: &[u8]) -> io::Result<HttpResponse> {
    let head_end = find(raw, b"\r\n\r\n").ok_or_else(|| invalid("incomplete HTTP response"))?;
    let head = String::from_utf8_lossy(&raw[..head_end]);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let mut parts = status_line.split_whitespace();
    let version = parts.next().unwrap_or("");
    if !version.starts_with("HTTP/1.") {
        return Err(invalid(format!("not an HTTP/1 response: {status_line:?}")));
    }
    let status = parts
        .next()
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| invalid(format!("bad status line: {status_line:?}")))?;
    let chunked = lines.any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body_raw = &raw[head_end + 4..];
    let body = if chunked {
        decode_chunked(body_raw)?
    } else {
        body_raw.to_vec()
    };
    Ok(HttpResponse {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// Sends one request and reads the whole response (blocking), within `timeout`
/// for each of connect, write and read.
pub(crate) fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
    timeout: Duration,
) -> io::Result<HttpResponse> {
    let timeout = timeout.max(Duration::from_millis(1));
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.write_all(&build_request(addr, method, path, body))?;
    let mut raw = Vec::new();
    stream.take(MAX_RESPONSE).read_to_end(&mut raw)?;
    parse_response(&raw)
}

/// Sends one request and reads the whole response (async), within `timeout`
/// overall.
pub(crate) async fn request_async(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
    timeout: Duration,
) -> io::Result<HttpResponse> {
    let work = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream
            .write_all(&build_request(addr, method, path, body))
            .await?;
        let mut raw = Vec::new();
        stream.take(MAX_RESPONSE).read_to_end(&mut raw).await?;
        parse_response(&raw)
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(result) => result,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no complete HTTP response from {addr} within {timeout:?}"),
        )),
    }
}

/// Interprets a `/health` response: `Ok` when etcd says it is healthy, else the
/// reason.
pub(crate) fn interpret_health(resp: io::Result<HttpResponse>) -> Result<(), String> {
    match resp {
        Ok(r) if r.status == 200 && r.body.contains("\"health\":\"true\"") => Ok(()),
        Ok(r) => Err(format!("HTTP {}: {}", r.status, r.body.trim())),
        Err(e) => Err(e.to_string()),
    }
}

/// Extracts the string value of the first `"key":"value"` in a JSON text (etcd's
/// gateway renders 64-bit integers as strings).
pub(crate) fn json_string_field<'a>(json: &'a str, key: &str) -> Option<&'a str> {
    let pattern = format!("\"{key}\":\"");
    let start = json.find(&pattern)? + pattern.len();
    let len = json[start..].find('"')?;
    Some(&json[start..start + len])
}

/// Asks the etcd member listening for clients on `addr` whether it is healthy
/// (`GET /health` answers `{"health":"true",...}`), waiting at most `timeout`.
///
/// Healthy means the member is up, sees a leader and can serve a quorum read.
/// This is a blocking call; see [`check_health_async`] for async code.
pub fn check_health(addr: SocketAddr, timeout: Duration) -> bool {
    interpret_health(request(addr, "GET", "/health", None, timeout)).is_ok()
}

/// Async flavour of [`check_health`].
pub async fn check_health_async(addr: SocketAddr, timeout: Duration) -> bool {
    interpret_health(request_async(addr, "GET", "/health", None, timeout).await).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_chunked() {
        let r =
            parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 17\r\n\r\n{\"health\":\"true\"}")
                .unwrap();
        assert_eq!(r.status, 200);
        assert!(interpret_health(Ok(r)).is_ok());
        let r = parse_response(
            b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!(r.status, 503);
        assert_eq!(r.body, "hello world");
        assert!(parse_response(b"garbage").is_err());
    }

    #[test]
    fn json_field() {
        let j = r#"{"header":{"member_id":"42","x":"y"},"leader":"7"}"#;
        assert_eq!(json_string_field(j, "member_id"), Some("42"));
        assert_eq!(json_string_field(j, "leader"), Some("7"));
        assert_eq!(json_string_field(j, "nope"), None);
    }
}
