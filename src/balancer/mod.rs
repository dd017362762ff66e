//! Endpoints and the connection the client's requests travel on.
//!
//! Today this module parses the endpoint list and keeps one pinned HTTP/2 connection: at
//! connect time the endpoints are tried in order and the first that answers is pinned (a lazy
//! client pins the first endpoint). Failover between endpoints at run time, retries and health
//! checking are the endpoint balancer's job, which is not built yet.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

use crate::client::{Config, ExecutorAdapter};
use crate::error::{Error, ErrorKind, Result};

/// One parsed endpoint: the URI tonic connects to, and the text the user gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ParsedEndpoint {
    /// What the user wrote.
    pub(crate) original: String,
    /// `http://host:port` or `unix:/path`.
    pub(crate) uri: String,
}

/// Parse one endpoint as etcd users write them: `http://host:port`, `host:port`,
/// `unix:///path` or `unix://name:port` (etcd's unix listener form: a socket file named
/// `name:port` in the working directory).
pub(crate) fn parse_endpoint(s: &str) -> Result<ParsedEndpoint> {
    let t = s.trim();
    if t.is_empty() {
        return Err(Error::invalid_argument("empty endpoint"));
    }
    let uri = if let Some(rest) = t.strip_prefix("unix://") {
        if rest.is_empty() {
            return Err(Error::invalid_argument(format!(
                "endpoint {s:?}: no socket path"
            )));
        }
        format!("unix:{rest}")
    } else if let Some(rest) = t.strip_prefix("unix:") {
        if rest.is_empty() {
            return Err(Error::invalid_argument(format!(
                "endpoint {s:?}: no socket path"
            )));
        }
        format!("unix:{rest}")
    } else if t.starts_with("https://") {
        return Err(Error::invalid_argument(format!(
            "endpoint {s:?}: TLS (https://) is not supported by this version of etcdv3 yet"
        )));
    } else if let Some(rest) = t.strip_prefix("http://") {
        check_host_port(s, rest.trim_end_matches('/'))?;
        format!("http://{}", rest.trim_end_matches('/'))
    } else if t.contains("://") {
        return Err(Error::invalid_argument(format!(
            "endpoint {s:?}: unsupported scheme (use http://, unix:// or host:port)"
        )));
    } else {
        check_host_port(s, t)?;
        format!("http://{t}")
    };
    Ok(ParsedEndpoint {
        original: s.to_owned(),
        uri,
    })
}

fn check_host_port(orig: &str, hp: &str) -> Result<()> {
    let bad = || Error::invalid_argument(format!("endpoint {orig:?}: expected host:port"));
    let (host, port) = hp.rsplit_once(':').ok_or_else(bad)?;
    if host.is_empty() || host.contains('/') {
        return Err(bad());
    }
    port.parse::<u16>().map_err(|_| bad())?;
    Ok(())
}

/// The pinned connection shared by every clone of a client.
pub(crate) struct Transport {
    endpoints: Vec<ParsedEndpoint>,
    pinned: usize,
    /// `None` once the client is closed.
    channel: RwLock<Option<Channel>>,
}

impl Transport {
    fn endpoint(cfg: &Config, ep: &ParsedEndpoint, exec: &ExecutorAdapter) -> Result<Endpoint> {
        // No `Endpoint::timeout`: each request carries its own deadline (see `Client::unary`).
        let e = Endpoint::from_shared(ep.uri.clone())
            .map_err(|err| {
                Error::invalid_argument(format!("endpoint {:?}", ep.original)).with_source(err)
            })?
            .connect_timeout(cfg.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(cfg.keep_alive_interval)
            .keep_alive_timeout(cfg.keep_alive_timeout)
            .keep_alive_while_idle(true)
            .executor(exec.clone());
        Ok(e)
    }

    /// Connect to the first endpoint that answers; the error names every endpoint's failure.
    pub(crate) async fn connect(cfg: &Config, exec: &ExecutorAdapter) -> Result<Transport> {
        let endpoints = cfg.parsed_endpoints()?;
        let mut failures = Vec::new();
        for (i, ep) in endpoints.iter().enumerate() {
            let e = Self::endpoint(cfg, ep, exec)?;
            match e.connect().await {
                Ok(ch) => {
                    return Ok(Transport {
                        endpoints,
                        pinned: i,
                        channel: RwLock::new(Some(ch)),
                    });
                }
                Err(err) => failures.push(format!("{}: {}", ep.original, source_chain(&err))),
            }
        }
        Err(Error::new(
            ErrorKind::Unavailable,
            format!(
                "could not connect to any endpoint: [{}]",
                failures.join("; ")
            ),
        ))
    }

    /// Build the transport without any I/O; the connection is made on first use.
    pub(crate) fn lazy(cfg: &Config, exec: &ExecutorAdapter) -> Result<Transport> {
        let endpoints = cfg.parsed_endpoints()?;
        let first = endpoints
            .first()
            .ok_or_else(|| Error::invalid_argument("no endpoints given"))?;
        let ch = Self::endpoint(cfg, first, exec)?.connect_lazy();
        Ok(Transport {
            endpoints,
            pinned: 0,
            channel: RwLock::new(Some(ch)),
        })
    }

    /// The channel to send on, or `Closed`.
    pub(crate) fn channel(&self) -> Result<Channel> {
        match self.channel.read() {
            Ok(g) => g.clone().ok_or_else(closed),
            Err(_) => Err(closed()),
        }
    }

    /// Drop the connection; later calls fail with `Closed`.
    pub(crate) fn close(&self) {
        let taken = match self.channel.write() {
            Ok(mut g) => g.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        drop(taken);
    }

    /// The endpoint requests currently go to.
    pub(crate) fn pinned_endpoint(&self) -> &str {
        self.endpoints
            .get(self.pinned)
            .map(|e| e.original.as_str())
            .unwrap_or_default()
    }

    /// All configured endpoints, as given.
    pub(crate) fn endpoints(&self) -> Vec<String> {
        self.endpoints.iter().map(|e| e.original.clone()).collect()
    }
}

/// A channel to one chosen `endpoint`, outside the balanced set, for requests that must reach
/// a particular member (maintenance calls, moving the leader). Built with the client's
/// connection settings and executor, connected lazily; it lives as long as its clones.
pub(crate) fn member_channel(
    cfg: &Config,
    endpoint: &str,
    exec: &ExecutorAdapter,
) -> Result<Channel> {
    let ep = parse_endpoint(endpoint)?;
    Ok(Transport::endpoint(cfg, &ep, exec)?.connect_lazy())
}

fn closed() -> Error {
    Error::new(ErrorKind::Closed, "the client was closed")
}

/// Render an error with its causes (`a: b: c`), for messages that list per-endpoint failures.
pub(crate) fn source_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

/// Default HTTP/2 keep-alive ping interval. etcd's server rejects pings more often than every
/// 5 s (`--grpc-keepalive-min-time`), so the default stays above that.
pub(crate) const DEFAULT_KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// Default time to wait for a keep-alive ping's answer before the connection is declared dead.
pub(crate) const DEFAULT_KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Default connect timeout per endpoint.
pub(crate) const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Shared so clones of a client share one transport.
pub(crate) type SharedTransport = Arc<Transport>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_endpoint_forms() {
        assert_eq!(
            parse_endpoint("127.0.0.1:2379").map(|e| e.uri).ok(),
            Some("http://127.0.0.1:2379".to_owned())
        );
        assert_eq!(
            parse_endpoint("http://localhost:2379/").map(|e| e.uri).ok(),
            Some("http://localhost:2379".to_owned())
        );
        assert_eq!(
            parse_endpoint("unix:///tmp/etcd.sock").map(|e| e.uri).ok(),
            Some("unix:/tmp/etcd.sock".to_owned())
        );
        assert_eq!(
            parse_endpoint("unix://localhost:2379").map(|e| e.uri).ok(),
            Some("unix:localhost:2379".to_owned())
        );
        for bad in [
            "",
            "localhost",
            "ftp://x:1",
            "http://:99",
            "h:notaport",
            "unix://",
        ] {
            let err = parse_endpoint(bad).err().map(|e| e.kind());
            assert_eq!(err, Some(ErrorKind::InvalidArgument), "{bad:?}");
        }
        let tls = parse_endpoint("https://h:1").err().map(|e| e.kind());
        assert_eq!(tls, Some(ErrorKind::InvalidArgument));
    }
}
