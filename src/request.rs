//! A request with no option but its deadline, shared by the administrative APIs (cluster,
//! maintenance, auth, lock and election services), and the plumbing they send through.

use std::fmt;
use std::future::{Future, IntoFuture};
use std::time::Duration;

use crate::grpc::{Call, Meta};
use crate::transport::Channel;
use tokio::time::Instant;

use crate::client::{CallOpts, Client, with_deadline};
use crate::error::{Error, ErrorKind, Result};
use crate::kv::BoxFuture;

/// A request whose only option is its deadline; await it.
///
/// ```no_run
/// # async fn demo(client: etcdv3::Client) -> etcdv3::Result<()> {
/// use std::time::Duration;
/// let users = client.auth().user_list().timeout(Duration::from_secs(2)).await?;
/// # drop(users); Ok(()) }
/// ```
#[must_use = "a request does nothing until it is awaited"]
pub struct Request<T> {
    run: Box<dyn FnOnce(CallOpts) -> BoxFuture<Result<T>> + Send>,
    opts: CallOpts,
}

impl<T> Request<T> {
    /// A request that runs `run` with the call options when awaited.
    pub(crate) fn new<F, Fut>(opts: CallOpts, run: F) -> Self
    where
        F: FnOnce(CallOpts) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T>> + Send + 'static,
    {
        Request {
            run: Box::new(move |o| Box::pin(run(o))),
            opts,
        }
    }

    /// This request's deadline, overriding the client's default request timeout.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.opts.timeout = Some(timeout);
        self
    }
}

impl<T> fmt::Debug for Request<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Request")
            .field("opts", &self.opts)
            .finish_non_exhaustive()
    }
}

impl<T: 'static> IntoFuture for Request<T> {
    type Output = Result<T>;
    type IntoFuture = BoxFuture<Result<T>>;

    fn into_future(self) -> Self::IntoFuture {
        (self.run)(self.opts)
    }
}

/// Call options of an administrative RPC: `method` names the RPC, `read_only` says whether it
/// may be retried after it may have reached a server (for the retry policy).
pub(crate) fn call_opts(method: &'static str, read_only: bool) -> CallOpts {
    if read_only {
        CallOpts::read(method)
    } else {
        CallOpts::mutation(method)
    }
}

/// Send one unary request: through the client's shared path (balancer, deadline, auth token
/// with one shared re-authentication, error classification) when `fixed` is `None`, else on
/// the `fixed` channel to a chosen member, with the same deadline and auth handling but
/// without involving the balancer (a chosen member's failure says nothing about the others).
pub(crate) async fn unary_on<T, R, F, Fut>(
    client: &Client,
    fixed: Option<Channel>,
    req: T,
    opts: CallOpts,
    call: F,
) -> Result<R>
where
    T: Clone + Send + Sync + 'static,
    R: Send + 'static,
    F: Fn(Channel, Call<T>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = std::result::Result<tonic::Response<R>, tonic::Status>> + Send + 'static,
{
    let Some(channel) = fixed else {
        return client.unary(req, opts, call).await;
    };
    let shared = client.shared();
    // `Closed` after `Client::close`, like every other request.
    shared.channel()?;
    let timeout = opts.timeout.or(shared.config().request_timeout);
    let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
    let mut stale = None;
    loop {
        let token = with_deadline(left(deadline)?, shared.token(stale)).await??;
        let remaining = left(deadline)?;
        let generation = token.as_ref().map(|(generation, _)| *generation);
        let request = Call {
            msg: req.clone(),
            meta: Meta {
                timeout: remaining,
                token: token.and_then(|(_, t)| t),
                require_leader: false,
            },
        };
        // A deadline passed with the request in flight leaves its outcome unknown.
        let answer = with_deadline(remaining, call(channel.clone(), request))
            .await
            .map_err(|e| e.maybe_sent(true))?;
        match answer {
            Ok(resp) => return Ok(resp.into_inner()),
            Err(status) => {
                let err = Error::from_status(status);
                if err.is_auth_token_error() && stale.is_none() && generation.is_some() {
                    stale = generation;
                    continue;
                }
                return Err(err);
            }
        }
    }
}

/// Time left until `deadline` (`None`: no deadline); a passed deadline is an error.
pub(crate) fn left(deadline: Option<Instant>) -> Result<Option<Duration>> {
    match deadline {
        None => Ok(None),
        Some(d) => {
            let l = d.saturating_duration_since(Instant::now());
            if l.is_zero() {
                Err(Error::new(ErrorKind::Deadline, "request deadline exceeded"))
            } else {
                Ok(Some(l))
            }
        }
    }
}

/// Generate the gRPC client constructor of a service with the client's message limits.
macro_rules! grpc_client {
    ($name:ident, $client:ty) => {
        fn $name(ch: $crate::transport::Channel, max_encoding: usize) -> $client {
            <$client>::new(ch)
                .max_decoding_message_size(usize::MAX)
                .max_encoding_message_size(max_encoding)
        }
    };
}
pub(crate) use grpc_client;
