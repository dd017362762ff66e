//! The server-side election service (etcd's `v3electionpb.Election`).

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use crate::transport::Channel;
use bytes::Bytes;
use futures_core::Stream;

use crate::client::Client;
use crate::error::{Error, ErrorKind, Result};
use crate::kv::BoxFuture;
use crate::proto::v3electionpb as epb;
use crate::request::{Request, call_opts, grpc_client, unary_on};
use crate::types::{IntoBytes, KeyValue, ResponseHeader};

grpc_client!(
    election_client,
    epb::election_client::ElectionClient<Channel>
);

/// What etcd's election service answers when an election has no leader.
const NO_LEADER: &str = "election: no leader";

impl Client {
    /// The server-side election service (etcd's v3election API). See [`ElectionService`]
    /// about keeping the lease alive.
    pub fn election_service(&self) -> ElectionService {
        ElectionService {
            client: self.clone(),
        }
    }
}

/// etcd's server-side election service; get it with [`Client::election_service`]. Cheap to
/// clone.
///
/// A candidate campaigns with a key attached to a lease **that it passes in and must keep
/// alive itself** (e.g. with the client's lease keeper, `client.lease().keep_alive(id)`): the
/// server neither creates nor refreshes it. When the lease expires the candidate's key is
/// deleted and leadership passes to the next candidate, whether or not the old leader noticed.
/// Check [`is_leader`](ElectionService::is_leader) (or guard writes with a transaction on the
/// leader key) before acting as leader, and watch the kept lease for loss.
///
/// ```no_run
/// # async fn demo(client: etcdv3::Client, lease_id: i64) -> etcdv3::Result<()> {
/// let elections = client.election_service();
/// // Blocks until this candidate is leader.
/// let won = elections.campaign("/election/scheduler", lease_id, "node-1").await?;
/// elections.proclaim(&won.leader, "node-1: busy").await?;
/// if let Some(current) = elections.leader("/election/scheduler").await? {
///     println!("leader value: {}", current.kv.value_str()?);
/// }
/// elections.resign(&won.leader).await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct ElectionService {
    client: Client,
}

/// Proof of leadership returned by a won campaign, needed to proclaim and resign.
#[non_exhaustive]
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct LeaderKey {
    /// The election name.
    pub name: Bytes,
    /// The leader's key (the election name, `/`, and the lease ID in hex).
    pub key: Bytes,
    /// The creation revision of the leader key (a fencing token: it grows with every new
    /// leadership).
    pub revision: i64,
    /// The lease the leader key is attached to.
    pub lease: i64,
}

impl fmt::Debug for LeaderKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeaderKey")
            .field("name", &String::from_utf8_lossy(&self.name))
            .field("key", &String::from_utf8_lossy(&self.key))
            .field("revision", &self.revision)
            .field("lease", &self.lease)
            .finish()
    }
}

impl LeaderKey {
    /// A leader key from its parts, e.g. one stored by a process that restarted and wants to
    /// resign or proclaim with the same lease.
    pub fn new(name: impl IntoBytes, key: impl IntoBytes, revision: i64, lease: i64) -> Self {
        LeaderKey {
            name: name.into_bytes(),
            key: key.into_bytes(),
            revision,
            lease,
        }
    }

    fn to_pb(&self) -> epb::LeaderKey {
        epb::LeaderKey {
            name: self.name.clone(),
            key: self.key.clone(),
            rev: self.revision,
            lease: self.lease,
        }
    }
}

/// The answer to a won [`ElectionService::campaign`].
#[non_exhaustive]
#[derive(Debug, Clone)]
pub struct CampaignResponse {
    /// Response header.
    pub header: ResponseHeader,
    /// The leadership just won.
    pub leader: LeaderKey,
}

/// The answer to [`ElectionService::proclaim`] and [`ElectionService::resign`].
#[non_exhaustive]
#[derive(Debug, Clone)]
pub struct ElectionResponse {
    /// Response header.
    pub header: ResponseHeader,
}

/// The current leader of an election: its key and proclaimed value.
#[non_exhaustive]
#[derive(Debug, Clone)]
pub struct LeaderResponse {
    /// Response header.
    pub header: ResponseHeader,
    /// The leader's key-value pair: the value is what the leader proclaimed (or campaigned
    /// with), `create_revision` orders leaderships, `lease` is the leader's lease.
    pub kv: KeyValue,
}

impl LeaderResponse {
    fn from_pb(r: epb::LeaderResponse) -> Result<Self> {
        let kv = r.kv.ok_or_else(|| {
            Error::new(
                ErrorKind::Protocol,
                "election answer without the leader's key",
            )
        })?;
        Ok(LeaderResponse {
            header: ResponseHeader::from_pb(r.header),
            kv: KeyValue::from_pb(kv),
        })
    }
}

impl ElectionService {
    fn max_encoding(&self) -> usize {
        self.client.config().max_encoding_bytes()
    }

    /// Campaign for leadership of election `name` with `value`, waiting (on the server) until
    /// elected. The candidate key is attached to `lease`, which **must exist and be kept alive
    /// by the caller** (see [`ElectionService`]); lease 0 and an empty name are refused
    /// ([`ErrorKind::InvalidArgument`]); a lease that does not exist fails with
    /// [`ErrorKind::LeaseNotFound`].
    ///
    /// The request's deadline (default: the client's request timeout) bounds the wait; when it
    /// passes, or the future is dropped, the server withdraws the candidate key.
    pub fn campaign(
        &self,
        name: impl IntoBytes,
        lease: i64,
        value: impl IntoBytes,
    ) -> Request<CampaignResponse> {
        let this = self.clone();
        let name = name.into_bytes();
        let value = value.into_bytes();
        Request::new(call_opts("Campaign", false), move |opts| async move {
            if name.is_empty() {
                return Err(Error::invalid_argument("election name is empty"));
            }
            if lease == 0 {
                return Err(Error::invalid_argument(
                    "campaign needs a lease that the caller keeps alive (lease 0 given)",
                ));
            }
            let max = this.max_encoding();
            let req = epb::CampaignRequest { name, lease, value };
            let resp: epb::CampaignResponse =
                unary_on(&this.client, None, req, opts, move |ch, r| {
                    crate::grpc::unary(ch, "/v3electionpb.Election/Campaign", r, max, usize::MAX)
                })
                .await?;
            let l = resp.leader.ok_or_else(|| {
                Error::new(ErrorKind::Protocol, "campaign answer without a leader key")
            })?;
            Ok(CampaignResponse {
                header: ResponseHeader::from_pb(resp.header),
                leader: LeaderKey {
                    name: l.name,
                    key: l.key,
                    revision: l.rev,
                    lease: l.lease,
                },
            })
        })
    }

    /// As the leader, publish a new `value` (observers see it). Fails with
    /// [`ErrorKind::ElectionNotLeader`] when `leader` no longer holds the leadership (its key
    /// was deleted or re-created: lease expired, resigned).
    pub fn proclaim(&self, leader: &LeaderKey, value: impl IntoBytes) -> Request<ElectionResponse> {
        let this = self.clone();
        let req = epb::ProclaimRequest {
            leader: Some(leader.to_pb()),
            value: value.into_bytes(),
        };
        Request::new(call_opts("Proclaim", false), move |opts| async move {
            let max = this.max_encoding();
            let resp: epb::ProclaimResponse =
                unary_on(&this.client, None, req, opts, move |ch, r| {
                    crate::grpc::unary(ch, "/v3electionpb.Election/Proclaim", r, max, usize::MAX)
                })
                .await?;
            Ok(ElectionResponse {
                header: ResponseHeader::from_pb(resp.header),
            })
        })
    }

    /// The current leader of election `name`, or `None` when it has none.
    pub fn leader(&self, name: impl IntoBytes) -> Request<Option<LeaderResponse>> {
        let this = self.clone();
        let name = name.into_bytes();
        Request::new(call_opts("Leader", true), move |opts| async move {
            let max = this.max_encoding();
            let result = unary_on(
                &this.client,
                None,
                epb::LeaderRequest { name },
                opts,
                move |ch, r| {
                    crate::grpc::unary(ch, "/v3electionpb.Election/Leader", r, max, usize::MAX)
                },
            )
            .await;
            match result {
                Ok(resp) => LeaderResponse::from_pb(resp).map(Some),
                Err(e) if e.message() == NO_LEADER => Ok(None),
                Err(e) => Err(e),
            }
        })
    }

    /// Whether `leader` still holds the leadership of its election: the election's current
    /// leader key is `leader.key`, created at `leader.revision` (a linearizable read).
    pub fn is_leader(&self, leader: &LeaderKey) -> Request<bool> {
        let this = self.clone();
        let leader = leader.clone();
        Request::new(call_opts("Leader", true), move |opts| async move {
            let mut req = this.leader(leader.name.clone());
            if let Some(t) = opts.timeout {
                req = req.timeout(t);
            }
            Ok(req.await?.is_some_and(|l| {
                l.kv.key() == &leader.key && l.kv.create_revision() == leader.revision
            }))
        })
    }

    /// Give up leadership (deletes the leader key, so the next candidate wins; the lease
    /// stays). Resigning a leadership that is already lost succeeds and changes nothing.
    pub fn resign(&self, leader: &LeaderKey) -> Request<ElectionResponse> {
        let this = self.clone();
        let req = epb::ResignRequest {
            leader: Some(leader.to_pb()),
        };
        Request::new(call_opts("Resign", false), move |opts| async move {
            let max = this.max_encoding();
            let resp: epb::ResignResponse =
                unary_on(&this.client, None, req, opts, move |ch, r| {
                    crate::grpc::unary(ch, "/v3electionpb.Election/Resign", r, max, usize::MAX)
                })
                .await?;
            Ok(ElectionResponse {
                header: ResponseHeader::from_pb(resp.header),
            })
        })
    }

    /// Follow the leadership of election `name`: the stream yields the current leader (once
    /// there is one), then every change: each proclaimed value and each new leader.
    ///
    /// Nothing is sent until the stream is first polled, and the stream has no deadline (the
    /// server answers only when there is a leader); drop it to stop observing. It ends when the
    /// server ends it (e.g. the member shuts down) or with an error on a broken connection;
    /// observe again to go on following.
    ///
    /// With authentication, a stale token makes the server end the stream silently; the
    /// stream then re-authenticates once and observes again. (Seen on etcd 3.4 and 3.5: the
    /// server runs the internal watches of concurrent observers on a shared stream that keeps
    /// the identity of the observer that opened it, so after auth is disabled and re-enabled
    /// an observer may stall until the older observers are gone; a server issue.)
    pub fn observe(&self, name: impl IntoBytes) -> LeaderStream {
        LeaderStream {
            open: Opener {
                client: self.client.clone(),
                name: name.into_bytes(),
            },
            state: State::Idle,
            retried: false,
        }
    }
}

/// What a [`LeaderStream`] needs to open (and, once, re-open) its gRPC stream.
#[derive(Clone)]
struct Opener {
    client: Client,
    name: Bytes,
}

type OpenFuture = BoxFuture<Result<(tonic::Streaming<epb::LeaderResponse>, Option<u64>)>>;

impl Opener {
    /// Open the Observe stream with the current token (or a fresh one when `stale` names the
    /// generation to replace); re-authenticates once when the server rejects the token.
    fn open(&self, stale: Option<u64>) -> OpenFuture {
        let this = self.clone();
        Box::pin(async move {
            let shared = this.client.shared();
            let max = this.client.config().max_encoding_bytes();
            let mut stale = stale;
            let mut refreshed = false;
            loop {
                let msg = epb::LeaderRequest {
                    name: this.name.clone(),
                };
                let (request, generation) = shared.stream_request(msg, stale).await?;
                let mut c = election_client(shared.channel()?, max);
                match c.observe(request).await {
                    Ok(resp) => return Ok((resp.into_inner(), generation)),
                    Err(status) => {
                        let err = Error::from_status(status);
                        if err.is_auth_token_error() && !refreshed && generation.is_some() {
                            refreshed = true;
                            stale = generation;
                            continue;
                        }
                        return Err(err);
                    }
                }
            }
        })
    }
}

enum State {
    Idle,
    Opening(OpenFuture),
    Open {
        stream: Box<tonic::Streaming<epb::LeaderResponse>>,
        generation: Option<u64>,
        received: bool,
    },
    Done,
}

/// The leadership of an election as it changes; from [`ElectionService::observe`].
///
/// A `Stream` of [`LeaderResponse`]s. It runs no background task: the connection is driven by
/// polling it.
#[must_use = "a stream does nothing until polled"]
pub struct LeaderStream {
    open: Opener,
    state: State,
    retried: bool,
}

impl fmt::Debug for LeaderStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.state {
            State::Idle => "idle",
            State::Opening(_) => "opening",
            State::Open { .. } => "open",
            State::Done => "done",
        };
        f.debug_struct("LeaderStream")
            .field("name", &String::from_utf8_lossy(&self.open.name))
            .field("state", &state)
            .finish()
    }
}

impl Stream for LeaderStream {
    type Item = Result<LeaderResponse>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        // Bounded: each round moves the state forward (idle -> opening -> open -> done, with
        // one re-open at most).
        loop {
            match &mut this.state {
                State::Done => return Poll::Ready(None),
                State::Idle => this.state = State::Opening(this.open.open(None)),
                State::Opening(fut) => match fut.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok((stream, generation))) => {
                        this.state = State::Open {
                            stream: Box::new(stream),
                            generation,
                            received: false,
                        };
                    }
                    Poll::Ready(Err(e)) => {
                        this.state = State::Done;
                        return Poll::Ready(Some(Err(e)));
                    }
                },
                State::Open {
                    stream,
                    generation,
                    received,
                } => match Pin::new(&mut **stream).poll_next(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(None) => {
                        // The server ends an observation whose token it rejects without an
                        // error (its internal reads fail): when that happens before any
                        // answer, re-authenticate once and observe again.
                        if !*received && generation.is_some() && !this.retried {
                            this.retried = true;
                            this.state = State::Opening(this.open.open(*generation));
                        } else {
                            this.state = State::Done;
                            return Poll::Ready(None);
                        }
                    }
                    Poll::Ready(Some(Err(status))) => {
                        this.state = State::Done;
                        return Poll::Ready(Some(Err(Error::from_status(status))));
                    }
                    Poll::Ready(Some(Ok(msg))) => {
                        *received = true;
                        let item = LeaderResponse::from_pb(msg);
                        if item.is_err() {
                            this.state = State::Done;
                        }
                        return Poll::Ready(Some(item));
                    }
                },
            }
        }
    }
}
