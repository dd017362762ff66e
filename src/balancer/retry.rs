//! When a failed request is tried again: the [`RetryPolicy`] and its tower adapter.
//!
//! The default policy follows etcd's Go client (`retry.go`): read-only RPCs (Range, status and
//! list calls, LeaseTimeToLive, and, beyond Go, transactions whose every operation is a read)
//! are retried on transient, "unavailable"-class errors, on the next endpoint; mutations (Put,
//! DeleteRange, a Txn that writes, Compact, LeaseGrant, member and auth changes) are
//! retried only when the request certainly never reached a server (the connection could not be
//! made), so a write is never applied twice. Retries happen inside the request's deadline, with
//! exponential back-off and jitter.
//!
//! | RPC class | retried on |
//! |---|---|
//! | read-only (idempotent) | not sent, or [`Error::is_retryable`] (Unavailable, NoLeader, LeaderChanged, Timeout, Stopped, NotCapable, Unhealthy, TooManyRequests, NotSupportedForLearner) |
//! | mutation | not sent ([`Error::is_indeterminate`] is false and the kind is Unavailable) |

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::error::{Error, ErrorKind};

/// What a [`RetryPolicy`] gets to decide on.
#[non_exhaustive]
#[derive(Debug)]
pub struct RetryContext<'a> {
    /// The RPC, e.g. `"Range"`, `"Put"`.
    pub method: &'static str,
    /// True for read-only RPCs that are safe to repeat.
    pub idempotent: bool,
    /// The error of the attempt that just failed.
    pub error: &'a Error,
    /// How many attempts have been made so far (1 after the first).
    pub attempts: u32,
    /// How many endpoints the client has.
    pub endpoints: usize,
    /// Time left until the request's deadline, if it has one.
    pub remaining: Option<Duration>,
}

/// Decides whether, and after which delay, a failed request is tried again.
///
/// Install one with [`ClientBuilder::retry_policy`](crate::ClientBuilder::retry_policy). The
/// client never retries past a request's deadline, whatever the policy says: a retry happens
/// only when, after its delay, a tenth of the time left (at least 20 ms) remains for the
/// attempt. Otherwise the request fails with its last error (for example `Unavailable`,
/// listing what each endpoint did) rather than running into its deadline.
pub trait RetryPolicy: Send + Sync + fmt::Debug + 'static {
    /// `Some(delay)`: try again after `delay` (on whichever endpoint the balancer picks then);
    /// `None`: give up and return the error.
    fn retry(&self, ctx: &RetryContext<'_>) -> Option<Duration>;
}

/// The default [`RetryPolicy`] (as in etcd's Go client): read-only RPCs are retried on
/// unavailable-class errors ([`Error::is_retryable`]); every RPC, mutations included, is retried
/// when it certainly never reached a server. Back-off doubles per round of endpoints.
#[derive(Debug, Clone)]
pub struct DefaultRetryPolicy {
    /// Back-off before the second attempt; doubles per attempt (with ±20 % jitter).
    pub base_backoff: Duration,
    /// Upper bound of one back-off.
    pub max_backoff: Duration,
    /// Attempts in all when a request has no deadline (with a deadline, the deadline bounds it).
    pub max_attempts_without_deadline: u32,
}

impl Default for DefaultRetryPolicy {
    fn default() -> Self {
        DefaultRetryPolicy {
            base_backoff: Duration::from_millis(25),
            max_backoff: Duration::from_secs(1),
            max_attempts_without_deadline: 5,
        }
    }
}

impl DefaultRetryPolicy {
    /// Whether the error allows another attempt of this RPC (the classification alone).
    pub fn should_retry(idempotent: bool, error: &Error) -> bool {
        if !error.is_indeterminate() && error.kind() == ErrorKind::Unavailable {
            // Never reached a server: safe for every RPC.
            return true;
        }
        idempotent && error.is_retryable()
    }
}

impl RetryPolicy for DefaultRetryPolicy {
    fn retry(&self, ctx: &RetryContext<'_>) -> Option<Duration> {
        if !Self::should_retry(ctx.idempotent, ctx.error) {
            return None;
        }
        if ctx.remaining.is_none() {
            let cap = self
                .max_attempts_without_deadline
                .max(ctx.endpoints as u32 + 1);
            if ctx.attempts >= cap {
                return None;
            }
        }
        // The first retry goes to the next endpoint at once; after a full round of endpoints
        // back off exponentially.
        let rounds = ctx.attempts.saturating_sub(1) / (ctx.endpoints.max(1) as u32);
        if ctx.attempts <= 1 && ctx.endpoints > 1 {
            return Some(Duration::ZERO);
        }
        let exp = self
            .base_backoff
            .saturating_mul(1u32 << rounds.min(10))
            .min(self.max_backoff);
        Some(super::jitter(exp))
    }
}

/// Per-request retry state; implements [`tower::retry::Policy`], which the unary request loop
/// (`Shared::unary_at`) consults after every failed attempt.
#[derive(Clone)]
pub(crate) struct RetryState {
    pub(crate) policy: Arc<dyn RetryPolicy>,
    pub(crate) method: &'static str,
    pub(crate) idempotent: bool,
    pub(crate) deadline: Option<Instant>,
    pub(crate) endpoints: usize,
    pub(crate) attempts: u32,
    /// Each endpoint's last failure, for the all-endpoints-failed error.
    pub(crate) failures: Vec<(String, String)>,
}

/// One attempt's request: the message plus the retry bookkeeping it needs.
#[derive(Clone)]
pub(crate) struct Attempt<T> {
    pub(crate) msg: T,
    pub(crate) deadline: Option<Instant>,
}

impl<T: Clone, R> tower::retry::Policy<Attempt<T>, R, Error> for RetryState {
    type Future = Pin<Box<dyn Future<Output = ()> + Send>>;

    fn retry(
        &mut self,
        _req: &mut Attempt<T>,
        result: &mut Result<R, Error>,
    ) -> Option<Self::Future> {
        let err = match result {
            Ok(_) => return None,
            Err(e) => e,
        };
        self.attempts += 1;
        if let Some(ep) = err.endpoint() {
            let msg = err.to_string();
            match self.failures.iter_mut().find(|(e, _)| e == ep) {
                Some(slot) => slot.1 = msg,
                None => self.failures.push((ep.to_owned(), msg)),
            }
        }
        let now = Instant::now();
        let remaining = self.deadline.map(|d| d.saturating_duration_since(now));
        let ctx = RetryContext {
            method: self.method,
            idempotent: self.idempotent,
            error: err,
            attempts: self.attempts,
            endpoints: self.endpoints,
            remaining,
        };
        let decision = self.policy.retry(&ctx);
        match within_deadline(decision, remaining) {
            Some(d) => Some(Box::pin(tokio::time::sleep(d))),
            None => {
                // Giving up. When more than one endpoint failed at the connection level, say
                // what each one did.
                if self.failures.len() > 1 && err.kind() == ErrorKind::Unavailable {
                    let indeterminate = err.is_indeterminate();
                    let mut all = super::all_failed(&self.failures);
                    if indeterminate {
                        all = all.maybe_sent(true);
                    }
                    *err = all;
                }
                None
            }
        }
    }

    fn clone_request(&mut self, req: &Attempt<T>) -> Option<Attempt<T>> {
        Some(req.clone())
    }
}

/// The policy's delay, when the retry it asks for fits the deadline: after the delay, a tenth
/// of the time left (at least 20 ms) must remain for the attempt.
fn within_deadline(decision: Option<Duration>, remaining: Option<Duration>) -> Option<Duration> {
    match (decision, remaining) {
        (Some(d), Some(left))
            if d.saturating_add((left / 10).max(Duration::from_millis(20))) < left =>
        {
            Some(d)
        }
        (_, Some(_)) => None,
        (d, None) => d,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retry_leaves_room_for_its_attempt_before_the_deadline() {
        let ms = Duration::from_millis;
        // Plenty of time: the policy's delay.
        assert_eq!(
            within_deadline(Some(ms(100)), Some(ms(2000))),
            Some(ms(100))
        );
        // The delay would end within the last tenth: give up now, with the real error.
        assert_eq!(within_deadline(Some(ms(1850)), Some(ms(2000))), None);
        assert_eq!(
            within_deadline(Some(ms(1790)), Some(ms(2000))),
            Some(ms(1790))
        );
        // At least 20 ms for the attempt, however short the deadline.
        assert_eq!(within_deadline(Some(ms(85)), Some(ms(100))), None);
        assert_eq!(within_deadline(Some(ms(75)), Some(ms(100))), Some(ms(75)));
        // No deadline: the policy alone decides; no retry asked: none.
        assert_eq!(within_deadline(Some(ms(5)), None), Some(ms(5)));
        assert_eq!(within_deadline(None, Some(ms(2000))), None);
        // A policy's huge delay does not overflow: it just does not fit.
        assert_eq!(within_deadline(Some(Duration::MAX), Some(ms(2000))), None);
    }

    fn ctx<'a>(idempotent: bool, error: &'a Error, attempts: u32) -> RetryContext<'a> {
        RetryContext {
            method: "Test",
            idempotent,
            error,
            attempts,
            endpoints: 3,
            remaining: Some(Duration::from_secs(10)),
        }
    }

    #[test]
    fn classification_table() {
        let p = DefaultRetryPolicy::default();
        let not_sent = Error::new(ErrorKind::Unavailable, "connect refused");
        let sent = Error::new(ErrorKind::Unavailable, "reset").maybe_sent(true);
        let no_leader = Error::new(ErrorKind::NoLeader, "").maybe_sent(true);
        let compacted = Error::new(ErrorKind::Compacted, "").maybe_sent(true);
        let deadline = Error::new(ErrorKind::Deadline, "").maybe_sent(true);
        // Reads.
        assert!(p.retry(&ctx(true, &not_sent, 1)).is_some());
        assert!(p.retry(&ctx(true, &sent, 1)).is_some());
        assert!(p.retry(&ctx(true, &no_leader, 1)).is_some());
        assert!(p.retry(&ctx(true, &compacted, 1)).is_none());
        assert!(p.retry(&ctx(true, &deadline, 1)).is_none());
        // Writes: only when never sent.
        assert!(p.retry(&ctx(false, &not_sent, 1)).is_some());
        assert!(p.retry(&ctx(false, &sent, 1)).is_none());
        assert!(p.retry(&ctx(false, &no_leader, 1)).is_none());
        assert!(p.retry(&ctx(false, &deadline, 1)).is_none());
    }

    #[test]
    fn backoff_is_immediate_then_grows_and_is_capped() {
        let p = DefaultRetryPolicy::default();
        let e = Error::new(ErrorKind::Unavailable, "x");
        assert_eq!(p.retry(&ctx(true, &e, 1)), Some(Duration::ZERO));
        let later = p.retry(&ctx(true, &e, 7)).unwrap();
        assert!(later > Duration::ZERO);
        let much_later = p.retry(&ctx(true, &e, 100)).unwrap();
        assert!(much_later <= Duration::from_millis(1200), "{much_later:?}");
        // Without a deadline the number of attempts is bounded.
        let mut c = ctx(true, &e, 5);
        c.remaining = None;
        assert!(p.retry(&c).is_none());
    }
}
