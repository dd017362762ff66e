//! The cluster membership API: list, add (as voting member or learner), remove, update and
//! promote members.

use std::future::IntoFuture;
use std::time::Duration;

use crate::transport::Channel;

use crate::client::{CallOpts, Client};
use crate::error::{Error, Result};
use crate::kv::BoxFuture;
use crate::proto::etcdserverpb as pb;
use crate::request::{Request, call_opts, grpc_client, unary_on};
use crate::types::ResponseHeader;

grpc_client!(cluster_client, pb::cluster_client::ClusterClient<Channel>);

impl Client {
    /// The cluster membership API.
    pub fn cluster(&self) -> Cluster {
        Cluster {
            client: self.clone(),
        }
    }
}

/// The cluster membership API of a [`Client`]; get it with [`Client::cluster`]. Cheap to clone.
///
/// Membership changes go through raft: the member answering forwards them to the leader. The
/// server refuses a change that would leave the cluster without quorum among started members
/// ([`ErrorKind::MemberNotEnoughStarted`](crate::ErrorKind::MemberNotEnoughStarted)).
///
/// ```no_run
/// # async fn demo(client: etcdv3::Client) -> etcdv3::Result<()> {
/// let cluster = client.cluster();
/// for m in cluster.member_list().linearizable().await?.members {
///     println!("{:x} {} learner={} {:?}", m.id, m.name, m.is_learner, m.client_urls);
/// }
/// // Add a learner; start its etcd process with `--initial-cluster-state existing`, then:
/// let added = cluster.member_add(["http://10.0.0.4:2380"]).as_learner().await?;
/// cluster.member_promote(added.member.id).await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Cluster {
    client: Client,
}

/// One member of the cluster.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Member {
    /// The member's ID.
    pub id: u64,
    /// The member's name; empty for a member that was added but has not started yet.
    pub name: String,
    /// The URLs the member talks to its peers on.
    pub peer_urls: Vec<String>,
    /// The URLs clients reach the member on; empty for a member that has not started yet.
    pub client_urls: Vec<String>,
    /// True for a learner: a non-voting member that receives the log but is not part of the
    /// quorum until promoted.
    pub is_learner: bool,
}

impl Member {
    pub(crate) fn from_pb(m: pb::Member) -> Self {
        Member {
            id: m.id,
            name: m.name,
            peer_urls: m.peer_ur_ls,
            client_urls: m.client_ur_ls,
            is_learner: m.is_learner,
        }
    }

    /// True once the member's process has started and joined (it has published its name).
    pub fn is_started(&self) -> bool {
        !self.name.is_empty()
    }
}

fn members(ms: Vec<pb::Member>) -> Vec<Member> {
    ms.into_iter().map(Member::from_pb).collect()
}

/// The answer to a member list, remove, update or promote: the members after the change.
#[non_exhaustive]
#[derive(Debug, Clone)]
pub struct MembersResponse {
    /// Response header.
    pub header: ResponseHeader,
    /// Every member of the cluster.
    pub members: Vec<Member>,
}

impl MembersResponse {
    /// The member with `id`, if it is in the list.
    pub fn member(&self, id: u64) -> Option<&Member> {
        self.members.iter().find(|m| m.id == id)
    }
}

/// The answer to [`Cluster::member_add`].
#[non_exhaustive]
#[derive(Debug, Clone)]
pub struct MemberAddResponse {
    /// Response header.
    pub header: ResponseHeader,
    /// The member just added (not started yet: its name and client URLs are empty).
    pub member: Member,
    /// Every member of the cluster, the new one included.
    pub members: Vec<Member>,
}

fn urls<I, S>(peer_urls: I) -> Vec<String>
where
    I: IntoIterator<Item = S>,
    S: Into<String>,
{
    peer_urls.into_iter().map(Into::into).collect()
}

fn check_urls(urls: &[String]) -> Result<()> {
    if urls.is_empty() || urls.iter().any(|u| u.trim().is_empty()) {
        return Err(Error::invalid_argument(
            "at least one non-empty peer URL is required",
        ));
    }
    Ok(())
}

impl Cluster {
    pub(crate) fn of(client: &Client) -> Cluster {
        Cluster {
            client: client.clone(),
        }
    }

    fn max_encoding(&self) -> usize {
        self.client.config().max_encoding_bytes()
    }

    /// List the members. By default the answering member replies from its local view; use
    /// [`MemberList::linearizable`] to have it confirmed through the leader.
    pub fn member_list(&self) -> MemberList {
        MemberList {
            cluster: self.clone(),
            req: pb::MemberListRequest::default(),
            opts: call_opts("MemberList", true),
        }
    }

    /// Add a member that talks to its peers on `peer_urls` (e.g. `http://10.0.0.4:2380`).
    /// Then start its etcd process with `--initial-cluster-state existing` and an
    /// `--initial-cluster` that lists every member including the new one.
    ///
    /// A voting member added this way counts towards the quorum at once, before it has started;
    /// adding it as a [learner](MemberAdd::as_learner) and promoting it once it has caught up is
    /// safer.
    pub fn member_add<I, S>(&self, peer_urls: I) -> MemberAdd
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        MemberAdd {
            cluster: self.clone(),
            req: pb::MemberAddRequest {
                peer_ur_ls: urls(peer_urls),
                is_learner: false,
            },
            opts: call_opts("MemberAdd", false),
        }
    }

    /// Remove the member `id`. A removed member's process shuts itself down.
    pub fn member_remove(&self, id: u64) -> Request<MembersResponse> {
        let this = self.clone();
        Request::new(call_opts("MemberRemove", false), move |opts| async move {
            let max = this.max_encoding();
            let req = pb::MemberRemoveRequest { id };
            let resp = unary_on(&this.client, None, req, opts, move |ch, r| {
                let mut c = cluster_client(ch, max);
                async move { c.member_remove(r.into_request()).await }
            })
            .await?;
            Ok(MembersResponse {
                header: ResponseHeader::from_pb(resp.header),
                members: members(resp.members),
            })
        })
    }

    /// Replace the peer URLs of member `id`.
    pub fn member_update<I, S>(&self, id: u64, peer_urls: I) -> Request<MembersResponse>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let this = self.clone();
        let peer_ur_ls = urls(peer_urls);
        Request::new(call_opts("MemberUpdate", false), move |opts| async move {
            check_urls(&peer_ur_ls)?;
            let max = this.max_encoding();
            let req = pb::MemberUpdateRequest { id, peer_ur_ls };
            let resp = unary_on(&this.client, None, req, opts, move |ch, r| {
                let mut c = cluster_client(ch, max);
                async move { c.member_update(r.into_request()).await }
            })
            .await?;
            Ok(MembersResponse {
                header: ResponseHeader::from_pb(resp.header),
                members: members(resp.members),
            })
        })
    }

    /// Promote the learner `id` to a voting member. The server refuses until the learner has
    /// caught up with the leader ([`ErrorKind::LearnerNotReady`](crate::ErrorKind::LearnerNotReady),
    /// worth retrying) and for a member that is not a learner
    /// ([`ErrorKind::MemberNotLearner`](crate::ErrorKind::MemberNotLearner)).
    pub fn member_promote(&self, id: u64) -> Request<MembersResponse> {
        let this = self.clone();
        Request::new(call_opts("MemberPromote", false), move |opts| async move {
            let max = this.max_encoding();
            let req = pb::MemberPromoteRequest { id };
            let resp = unary_on(&this.client, None, req, opts, move |ch, r| {
                let mut c = cluster_client(ch, max);
                async move { c.member_promote(r.into_request()).await }
            })
            .await?;
            Ok(MembersResponse {
                header: ResponseHeader::from_pb(resp.header),
                members: members(resp.members),
            })
        })
    }
}

/// A member list request; await it.
#[must_use = "a request does nothing until it is awaited"]
#[derive(Debug, Clone)]
pub struct MemberList {
    cluster: Cluster,
    req: pb::MemberListRequest,
    opts: CallOpts,
}

impl MemberList {
    /// Have the answer confirmed through the leader (a linearizable read), so it reflects
    /// every membership change committed before the request. Servers before etcd 3.5 ignore
    /// this and answer from their local view.
    pub fn linearizable(mut self) -> Self {
        self.req.linearizable = true;
        self
    }

    /// This request's deadline, overriding the client's default request timeout.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.opts.timeout = Some(timeout);
        self
    }
}

impl IntoFuture for MemberList {
    type Output = Result<MembersResponse>;
    type IntoFuture = BoxFuture<Self::Output>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            let max = self.cluster.max_encoding();
            let resp = unary_on(
                &self.cluster.client,
                None,
                self.req,
                self.opts,
                move |ch, r| {
                    let mut c = cluster_client(ch, max);
                    async move { c.member_list(r.into_request()).await }
                },
            )
            .await?;
            Ok(MembersResponse {
                header: ResponseHeader::from_pb(resp.header),
                members: members(resp.members),
            })
        })
    }
}

/// A member add request; await it.
#[must_use = "a request does nothing until it is awaited"]
#[derive(Debug, Clone)]
pub struct MemberAdd {
    cluster: Cluster,
    req: pb::MemberAddRequest,
    opts: CallOpts,
}

impl MemberAdd {
    /// Add the member as a learner: it does not vote and does not count towards the quorum
    /// until [promoted](Cluster::member_promote).
    pub fn as_learner(mut self) -> Self {
        self.req.is_learner = true;
        self
    }

    /// This request's deadline, overriding the client's default request timeout.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.opts.timeout = Some(timeout);
        self
    }
}

impl IntoFuture for MemberAdd {
    type Output = Result<MemberAddResponse>;
    type IntoFuture = BoxFuture<Self::Output>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            check_urls(&self.req.peer_ur_ls)?;
            let max = self.cluster.max_encoding();
            let resp = unary_on(
                &self.cluster.client,
                None,
                self.req,
                self.opts,
                move |ch, r| {
                    let mut c = cluster_client(ch, max);
                    async move { c.member_add(r.into_request()).await }
                },
            )
            .await?;
            let member = resp.member.map(Member::from_pb).ok_or_else(|| {
                Error::new(
                    crate::ErrorKind::Protocol,
                    "member add answer without the new member",
                )
            })?;
            Ok(MemberAddResponse {
                header: ResponseHeader::from_pb(resp.header),
                member,
                members: members(resp.members),
            })
        })
    }
}
