//! The endpoint balancer: many endpoints, one pinned, failover, back-off, run-time changes.
//!
//! Every endpoint has its own lazily connected HTTP/2 channel. Requests go to the *pinned*
//! endpoint; when it fails at the connection level (refused, reset, keep-alive timeout, no
//! leader) it is marked failed with an exponential back-off (with jitter) and the next endpoint
//! in round-robin order that is not backing off is pinned instead. A failed endpoint becomes a
//! candidate again when its back-off expires; when every endpoint is backing off, the one whose
//! back-off ends first is probed. HTTP/2 keep-alive pings (while requests or streams are open)
//! detect a dead or paused member. The connections themselves are [`Channel`]s: our own
//! transport, on our own HTTP/2 client (see `crate::transport` and `crate::http2`).
//!
//! Retrying is decided per request by a [`RetryPolicy`] (see [`retry`]); this module only says
//! where a request goes.

pub(crate) mod hooks;
pub(crate) mod retry;

use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use crate::client::{Config, ExecutorAdapter};
use crate::error::{Error, ErrorKind, Result};
use crate::transport::{Channel, ConnectSettings};

pub use retry::{DefaultRetryPolicy, RetryContext, RetryPolicy};

/// One parsed endpoint: the URI the transport connects to, and the text the user gave.
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
#[cfg(test)]
pub(crate) fn parse_endpoint(s: &str) -> Result<ParsedEndpoint> {
    parse_endpoint_with(s, false)
}

/// [`parse_endpoint`], with `host:port` (no scheme) taken as `https://` when `tls` (TLS
/// settings were given, as Go's client dials such endpoints with its credentials).
pub(crate) fn parse_endpoint_with(s: &str, tls: bool) -> Result<ParsedEndpoint> {
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
    } else if let Some(rest) = t.strip_prefix("https://") {
        if !cfg!(feature = "tls") {
            return Err(Error::invalid_argument(format!(
                "endpoint {s:?}: https:// needs the `tls` feature of etcdv3"
            )));
        }
        check_host_port(s, rest.trim_end_matches('/'))?;
        format!("https://{}", rest.trim_end_matches('/'))
    } else if let Some(rest) = t.strip_prefix("http://") {
        check_host_port(s, rest.trim_end_matches('/'))?;
        format!("http://{}", rest.trim_end_matches('/'))
    } else if t.contains("://") {
        return Err(Error::invalid_argument(format!(
            "endpoint {s:?}: unsupported scheme (use http://, unix:// or host:port)"
        )));
    } else {
        check_host_port(s, t)?;
        if tls {
            format!("https://{t}")
        } else {
            format!("http://{t}")
        }
    };
    Ok(ParsedEndpoint {
        original: s.trim().to_owned(),
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

/// Health bookkeeping of one endpoint.
#[derive(Debug, Default)]
struct Health {
    /// Consecutive failures (0: healthy).
    failures: u32,
    /// While set and in the future, the endpoint is backing off.
    retry_at: Option<Instant>,
    /// The last failure, for error messages.
    last_error: Option<String>,
}

/// One endpoint with its channel.
pub(crate) struct Slot {
    pub(crate) endpoint: ParsedEndpoint,
    channel: Channel,
    /// Lock-free fast path of the request path: false while the endpoint is healthy.
    failing: AtomicBool,
    health: Mutex<Health>,
}

impl Slot {
    fn new(endpoint: ParsedEndpoint, channel: Channel) -> Self {
        Slot {
            endpoint,
            channel,
            failing: AtomicBool::new(false),
            health: Mutex::new(Health::default()),
        }
    }

    fn backing_off(&self, now: Instant) -> Option<Instant> {
        if !self.failing.load(AtomicOrdering::Acquire) {
            return None;
        }
        let h = self.health.lock().ok()?;
        h.retry_at.filter(|t| *t > now)
    }
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot")
            .field("endpoint", &self.endpoint.original)
            .finish()
    }
}

/// Where one request goes: the endpoint and its channel.
#[derive(Clone, Debug)]
pub(crate) struct Pick {
    pub(crate) slot: Arc<Slot>,
}

/// A [`Pick`] that does not keep the endpoint's connection alive: what a background worker
/// remembers about the endpoint its stream went to, to report a failure later.
#[derive(Clone, Debug, Default)]
pub(crate) struct WeakPick {
    slot: std::sync::Weak<Slot>,
}

impl Pick {
    /// A weak reference to this endpoint.
    pub(crate) fn downgrade(&self) -> WeakPick {
        WeakPick {
            slot: Arc::downgrade(&self.slot),
        }
    }

    /// The channel to send on.
    pub(crate) fn channel(&self) -> Channel {
        self.slot.channel.clone()
    }

    /// The endpoint as the user wrote it.
    pub(crate) fn endpoint(&self) -> &str {
        &self.slot.endpoint.original
    }
}

struct State {
    slots: Vec<Arc<Slot>>,
    pinned: usize,
    closed: bool,
}

/// Back-off of a failed endpoint: 100 ms doubling per consecutive failure up to 5 s, with
/// ±20 % jitter so many clients do not probe a recovering member in lockstep.
pub(crate) fn endpoint_backoff(failures: u32) -> Duration {
    let base = Duration::from_millis(100).saturating_mul(1u32 << failures.min(6).saturating_sub(1));
    jitter(base.min(Duration::from_secs(5)))
}

/// `d` scaled by a random factor in [0.8, 1.2].
pub(crate) fn jitter(d: Duration) -> Duration {
    let f: f64 = rand::random_range(0.8..1.2);
    // `mul_f64` panics past `Duration::MAX` (a user's huge back-off setting).
    Duration::try_from_secs_f64(d.as_secs_f64() * f).unwrap_or(Duration::MAX)
}

/// The set of endpoints shared by every clone of a client.
pub(crate) struct Balancer {
    state: RwLock<State>,
    settings: ConnectSettings,
    /// Becomes true on [`close`](Self::close): background workers wait on it.
    closed: tokio::sync::watch::Sender<bool>,
}

impl Balancer {
    fn slot(&self, ep: ParsedEndpoint) -> Result<Arc<Slot>> {
        let channel = Channel::new(&ep, &self.settings)?;
        Ok(Arc::new(Slot::new(ep, channel)))
    }

    fn new(cfg: &Config, exec: &ExecutorAdapter) -> Result<Balancer> {
        let endpoints = cfg.parsed_endpoints()?;
        let b = Balancer {
            state: RwLock::new(State {
                slots: Vec::new(),
                pinned: 0,
                closed: false,
            }),
            settings: ConnectSettings::new(cfg, exec),
            closed: tokio::sync::watch::Sender::new(false),
        };
        let slots = endpoints
            .into_iter()
            .map(|ep| b.slot(ep))
            .collect::<Result<Vec<_>>>()?;
        b.write().slots = slots;
        Ok(b)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        match self.state.write() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        match self.state.read() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Connect to the first endpoint that answers and pin it; the error names every
    /// endpoint's failure.
    pub(crate) async fn connect(cfg: &Config, exec: &ExecutorAdapter) -> Result<Balancer> {
        let b = Self::new(cfg, exec)?;
        let slots = b.read().slots.clone();
        let mut failures = Vec::new();
        for (i, slot) in slots.iter().enumerate() {
            match slot.channel.connect().await {
                Ok(()) => {
                    b.write().pinned = i;
                    for s in &slots[..i] {
                        b.mark_failed_slot(s, "connect failed");
                    }
                    return Ok(b);
                }
                Err(err) => {
                    failures.push((slot.endpoint.original.clone(), err.message().to_owned()))
                }
            }
        }
        Err(all_failed(&failures))
    }

    /// Build without any I/O; connections are made on first use.
    pub(crate) fn lazy(cfg: &Config, exec: &ExecutorAdapter) -> Result<Balancer> {
        Self::new(cfg, exec)
    }

    /// The endpoint for the next request: the pinned one unless it is backing off, then the
    /// next healthy one (which becomes pinned), else the one whose back-off ends first.
    pub(crate) fn pick(&self) -> Result<Pick> {
        let now = Instant::now();
        {
            let st = self.read();
            if st.closed {
                return Err(closed());
            }
            if let Some(slot) = st.slots.get(st.pinned)
                && slot.backing_off(now).is_none()
            {
                return Ok(Pick { slot: slot.clone() });
            }
        }
        let mut st = self.write();
        if st.closed {
            return Err(closed());
        }
        let n = st.slots.len();
        if n == 0 {
            return Err(Error::invalid_argument("no endpoints configured"));
        }
        let mut soonest: Option<(usize, Instant)> = None;
        for step in 0..n {
            let i = (st.pinned + step) % n;
            match st.slots[i].backing_off(now) {
                None => {
                    st.pinned = i;
                    return Ok(Pick {
                        slot: st.slots[i].clone(),
                    });
                }
                Some(t) => {
                    if soonest.is_none_or(|(_, s)| t < s) {
                        soonest = Some((i, t));
                    }
                }
            }
        }
        // Everything is backing off: probe the one that recovers first.
        let i = soonest.map(|(i, _)| i).unwrap_or(st.pinned % n);
        st.pinned = i;
        Ok(Pick {
            slot: st.slots[i].clone(),
        })
    }

    fn mark_failed_slot(&self, slot: &Slot, why: &str) {
        if let Ok(mut h) = slot.health.lock() {
            h.failures = h.failures.saturating_add(1);
            h.retry_at = Some(Instant::now() + endpoint_backoff(h.failures));
            h.last_error = Some(why.to_owned());
            slot.failing.store(true, AtomicOrdering::Release);
        }
    }

    /// The endpoint failed at the connection level: back it off and move the pin on.
    pub(crate) fn report_failure(&self, pick: &Pick, err: &Error) {
        self.mark_failed_slot(&pick.slot, &err.to_string());
        self.move_on(pick);
    }

    /// The member refused a request for a passing reason of its own (a request timed out, a
    /// leader change, too many requests): move the pin on, so a retry goes to another member
    /// (as Go's round robin would), without backing the member off.
    pub(crate) fn move_on(&self, pick: &Pick) {
        let mut st = self.write();
        let n = st.slots.len();
        if n > 1
            && let Some(cur) = st.slots.get(st.pinned)
            && Arc::ptr_eq(cur, &pick.slot)
        {
            st.pinned = (st.pinned + 1) % n;
        }
    }

    /// Like [`report_failure`](Self::report_failure), for a worker's weak reference (a
    /// no-op when the endpoint is gone from the set).
    pub(crate) fn report_failure_weak(&self, pick: &WeakPick, err: &Error) {
        if let Some(slot) = pick.slot.upgrade() {
            self.report_failure(&Pick { slot }, err);
        }
    }

    /// The endpoint answered: it is healthy.
    pub(crate) fn report_success(&self, pick: &Pick) {
        if !pick.slot.failing.load(AtomicOrdering::Acquire) {
            return;
        }
        if let Ok(mut h) = pick.slot.health.lock() {
            *h = Health::default();
            pick.slot.failing.store(false, AtomicOrdering::Release);
        }
    }

    /// Replace the endpoint set. Endpoints that stay keep their connection; the pin stays on
    /// its endpoint when that remains, else moves to the first new one.
    pub(crate) fn set_endpoints(&self, endpoints: &[String]) -> Result<()> {
        if endpoints.is_empty() {
            return Err(Error::invalid_argument("no endpoints given"));
        }
        let parsed = endpoints
            .iter()
            .map(|e| parse_endpoint_with(e, self.settings.has_tls()))
            .collect::<Result<Vec<_>>>()?;
        let old = self.read().slots.clone();
        let mut slots = Vec::with_capacity(parsed.len());
        for ep in parsed {
            if slots.iter().any(|s: &Arc<Slot>| s.endpoint.uri == ep.uri) {
                continue;
            }
            match old.iter().find(|s| s.endpoint.uri == ep.uri) {
                Some(s) => slots.push(s.clone()),
                None => slots.push(self.slot(ep)?),
            }
        }
        let mut st = self.write();
        let pinned_uri = st.slots.get(st.pinned).map(|s| s.endpoint.uri.clone());
        st.pinned = pinned_uri
            .and_then(|u| slots.iter().position(|s| s.endpoint.uri == u))
            .unwrap_or(0);
        st.slots = slots;
        Ok(())
    }

    /// The number of endpoints.
    pub(crate) fn len(&self) -> usize {
        self.read().slots.len()
    }

    /// The channel of the pinned endpoint, or `Closed`.
    pub(crate) fn channel(&self) -> Result<Channel> {
        self.pick().map(|p| p.channel())
    }

    /// Drop every connection; later calls fail with `Closed`, and workers waiting on
    /// [`closed_signal`](Self::closed_signal) are told at once.
    pub(crate) fn close(&self) {
        let slots = {
            let mut st = self.write();
            st.closed = true;
            std::mem::take(&mut st.slots)
        };
        drop(slots);
        self.closed.send_replace(true);
    }

    /// A receiver that sees `true` once the client is closed.
    pub(crate) fn closed_signal(&self) -> tokio::sync::watch::Receiver<bool> {
        self.closed.subscribe()
    }

    /// The endpoint requests currently go to.
    pub(crate) fn pinned_endpoint(&self) -> String {
        let st = self.read();
        st.slots
            .get(st.pinned)
            .map(|e| e.endpoint.original.clone())
            .unwrap_or_default()
    }

    /// All configured endpoints, as given.
    pub(crate) fn endpoints(&self) -> Vec<String> {
        self.read()
            .slots
            .iter()
            .map(|e| e.endpoint.original.clone())
            .collect()
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
    let ep = parse_endpoint_with(endpoint, cfg.has_tls())?;
    Channel::new(&ep, &ConnectSettings::new(cfg, exec))
}

fn closed() -> Error {
    Error::new(ErrorKind::Closed, "the client was closed")
}

/// The error of a request that no endpoint could serve: names each endpoint's own failure.
pub(crate) fn all_failed(failures: &[(String, String)]) -> Error {
    let list = failures
        .iter()
        .map(|(ep, e)| format!("{ep}: {e}"))
        .collect::<Vec<_>>()
        .join("; ");
    Error::new(
        ErrorKind::Unavailable,
        format!("all endpoints failed: [{list}]"),
    )
    .with_endpoint_errors(failures.to_vec())
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

/// Shared so clones of a client share one balancer.
pub(crate) type SharedTransport = Arc<Balancer>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_a_fifth_and_saturates() {
        for _ in 0..100 {
            let j = jitter(Duration::from_secs(10));
            assert!(
                j >= Duration::from_secs(8) && j <= Duration::from_secs(12),
                "{j:?}"
            );
        }
        // A user's huge back-off setting: no panic.
        let _ = jitter(Duration::MAX);
    }
    use crate::client::TokioExecutor;

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
        #[cfg(feature = "tls")]
        assert_eq!(
            parse_endpoint("https://h:1").map(|e| e.uri).ok(),
            Some("https://h:1".to_owned())
        );
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let b1 = endpoint_backoff(1);
        assert!(b1 >= Duration::from_millis(80) && b1 <= Duration::from_millis(120));
        let b3 = endpoint_backoff(3);
        assert!(b3 >= Duration::from_millis(320) && b3 <= Duration::from_millis(480));
        for f in [7, 20, u32::MAX] {
            assert!(endpoint_backoff(f) <= Duration::from_secs(6), "{f}");
        }
    }

    fn balancer(eps: &[&str]) -> Balancer {
        let cfg = crate::Client::builder(eps.iter().copied())
            .config_for_tests()
            .clone();
        Balancer::new(&cfg, &ExecutorAdapter::new(Arc::new(TokioExecutor))).unwrap()
    }

    #[tokio::test]
    async fn picking_pins_fails_over_round_robin_and_probes() {
        let b = balancer(&["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]);
        let p = b.pick().unwrap();
        assert_eq!(p.endpoint(), "127.0.0.1:1");
        // Pinned: the same endpoint again.
        assert_eq!(b.pick().unwrap().endpoint(), "127.0.0.1:1");
        let err = Error::new(ErrorKind::Unavailable, "refused");
        b.report_failure(&p, &err);
        let p2 = b.pick().unwrap();
        assert_eq!(p2.endpoint(), "127.0.0.1:2");
        b.report_failure(&p2, &err);
        let p3 = b.pick().unwrap();
        assert_eq!(p3.endpoint(), "127.0.0.1:3");
        b.report_failure(&p3, &err);
        // Second failures of 2 and 3 back them off longer (>= 160 ms) than 1 (<= 120 ms).
        b.report_failure(&p2, &err);
        b.report_failure(&p3, &err);
        // All backing off: the one whose back-off ends first is probed.
        assert_eq!(b.pick().unwrap().endpoint(), "127.0.0.1:1");
        // Success resets its health; it stays pinned.
        b.report_success(&b.pick().unwrap());
        assert_eq!(b.pick().unwrap().endpoint(), "127.0.0.1:1");
    }

    #[tokio::test]
    async fn failed_endpoint_is_retried_after_its_backoff() {
        let b = balancer(&["127.0.0.1:1", "127.0.0.1:2"]);
        let p = b.pick().unwrap();
        b.report_failure(&p, &Error::new(ErrorKind::Unavailable, "x"));
        assert_eq!(b.pick().unwrap().endpoint(), "127.0.0.1:2");
        let p2 = b.pick().unwrap();
        b.report_failure(&p2, &Error::new(ErrorKind::Unavailable, "x"));
        // After both back-offs expire (<= 120 ms for a first failure) round-robin goes on.
        std::thread::sleep(Duration::from_millis(150));
        let next = b.pick().unwrap();
        assert_eq!(next.endpoint(), "127.0.0.1:1");
    }

    #[tokio::test]
    async fn set_endpoints_keeps_surviving_connections_and_pin() {
        let b = balancer(&["127.0.0.1:1", "127.0.0.1:2"]);
        let p = b.pick().unwrap();
        b.report_failure(&p, &Error::new(ErrorKind::Unavailable, "x"));
        let pinned = b.pick().unwrap();
        assert_eq!(pinned.endpoint(), "127.0.0.1:2");
        b.set_endpoints(&[
            "127.0.0.1:3".into(),
            "127.0.0.1:2".into(),
            "127.0.0.1:2".into(),
        ])
        .unwrap();
        assert_eq!(b.len(), 2, "duplicates removed");
        let again = b.pick().unwrap();
        assert!(Arc::ptr_eq(&again.slot, &pinned.slot), "same slot kept");
        b.set_endpoints(&["127.0.0.1:4".into()]).unwrap();
        assert_eq!(b.pick().unwrap().endpoint(), "127.0.0.1:4");
        assert!(b.set_endpoints(&[]).is_err());
        b.close();
        assert_eq!(b.pick().unwrap_err().kind(), ErrorKind::Closed);
    }

    #[test]
    fn all_failed_lists_each_endpoint() {
        let e = all_failed(&[
            ("a:1".into(), "refused".into()),
            ("b:2".into(), "timeout".into()),
        ]);
        assert_eq!(e.kind(), ErrorKind::Unavailable);
        assert!(e.message().contains("a:1: refused"), "{e}");
        assert!(e.message().contains("b:2: timeout"), "{e}");
        let per: Vec<_> = e.endpoint_errors().collect();
        assert_eq!(per, vec![("a:1", "refused"), ("b:2", "timeout")]);
    }
}
