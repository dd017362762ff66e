//! The maintenance API: status, alarms, defragmentation, hashes, snapshots, leader transfer
//! and downgrades, each sent to the client's current member or to a member you choose.

use std::fmt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};

use crate::transport::Channel;
use bytes::Bytes;
use futures_core::Stream;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::client::{CallOpts, Client, with_deadline};
use crate::cluster::Cluster;
use crate::error::{Error, ErrorKind, Result};
use crate::proto::etcdserverpb as pb;
use crate::request::{Request, call_opts, grpc_client, left, unary_on};
use crate::types::ResponseHeader;

grpc_client!(
    maintenance_client,
    pb::maintenance_client::MaintenanceClient<Channel>
);

/// The length of the SHA-256 digest etcd appends to a snapshot.
const SHA256_LEN: u64 = 32;

impl Client {
    /// The maintenance API, sent to the member the client's requests currently go to.
    pub fn maintenance(&self) -> Maintenance {
        Maintenance {
            client: self.clone(),
            target: None,
        }
    }

    /// The maintenance API aimed at the member serving `endpoint` (`http://host:port`,
    /// `host:port`, `unix://...`), over a separate connection with this client's settings,
    /// executor and auth token. It need not be one of the client's endpoints. The connection
    /// is made on first use and closed when the returned handle (and its clones and snapshot
    /// streams) are dropped.
    ///
    /// Fails only on an endpoint that cannot be parsed ([`ErrorKind::InvalidArgument`]).
    pub fn maintenance_at(&self, endpoint: &str) -> Result<Maintenance> {
        let channel = self.shared().member_channel(endpoint)?;
        Ok(Maintenance {
            client: self.clone(),
            target: Some(Target {
                endpoint: endpoint.to_owned(),
                channel,
            }),
        })
    }
}

#[derive(Clone)]
struct Target {
    endpoint: String,
    channel: Channel,
}

/// The maintenance API; get it with [`Client::maintenance`] (the client's current member) or
/// [`Client::maintenance_at`] (a chosen member). Cheap to clone.
///
/// Most maintenance calls are about *one member* (its status, its database, its hash), so
/// [`Client::maintenance_at`] aims them at a chosen endpoint over a separate connection (with
/// the client's settings, executor and auth token), whichever member the client's own
/// requests go to:
///
/// ```no_run
/// # async fn demo(client: etcdv3::Client) -> etcdv3::Result<()> {
/// for endpoint in client.endpoints() {
///     let m = client.maintenance_at(&endpoint)?;
///     let status = m.status().await?;
///     println!(
///         "{endpoint}: member {:x}, leader {:x}, db {} bytes, raft index {}",
///         status.header.member_id, status.leader, status.db_size, status.raft_index
///     );
/// }
/// // Snapshot of the client's current member, written to a file and checked.
/// let info = client.maintenance().snapshot_to_file("backup.db").await?;
/// println!("saved {} bytes", info.file_size);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Maintenance {
    client: Client,
    target: Option<Target>,
}

impl fmt::Debug for Maintenance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Maintenance")
            .field("endpoint", &self.endpoint())
            .finish()
    }
}

/// An alarm a member can raise.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AlarmType {
    /// The database exceeded its space quota: the cluster refuses writes
    /// ([`ErrorKind::NoSpace`]) until space is freed (compact, defragment) and the alarm is
    /// disarmed.
    NoSpace,
    /// Data corruption was detected.
    Corrupt,
    /// An alarm this client does not know (from a newer server), by its protocol number.
    Other(i32),
}

impl AlarmType {
    fn to_pb(self) -> i32 {
        match self {
            AlarmType::NoSpace => pb::AlarmType::Nospace as i32,
            AlarmType::Corrupt => pb::AlarmType::Corrupt as i32,
            AlarmType::Other(n) => n,
        }
    }

    fn from_pb(n: i32) -> Self {
        match pb::AlarmType::try_from(n) {
            Ok(pb::AlarmType::Nospace) => AlarmType::NoSpace,
            Ok(pb::AlarmType::Corrupt) => AlarmType::Corrupt,
            _ => AlarmType::Other(n),
        }
    }
}

/// One raised alarm: which member raised which alarm.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AlarmMember {
    /// The member that raised the alarm.
    pub member_id: u64,
    /// The alarm.
    pub alarm: AlarmType,
}

/// The answer to an alarm request.
#[non_exhaustive]
#[derive(Debug, Clone)]
pub struct AlarmResponse {
    /// Response header.
    pub header: ResponseHeader,
    /// For a list: every raised alarm. For activate/disarm: the alarms the request changed
    /// (empty when nothing changed, e.g. disarming an alarm that was not raised).
    pub alarms: Vec<AlarmMember>,
}

impl AlarmResponse {
    fn from_pb(r: pb::AlarmResponse) -> Self {
        AlarmResponse {
            header: ResponseHeader::from_pb(r.header),
            alarms: r
                .alarms
                .into_iter()
                .map(|a| AlarmMember {
                    member_id: a.member_id,
                    alarm: AlarmType::from_pb(a.alarm),
                })
                .collect(),
        }
    }
}

/// A downgrade in progress, as reported by [`Maintenance::status`] (etcd 3.6 and later).
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DowngradeInfo {
    /// Whether a downgrade is enabled.
    pub enabled: bool,
    /// The target cluster version.
    pub target_version: String,
}

/// The status of one member.
#[non_exhaustive]
#[derive(Debug, Clone)]
pub struct StatusResponse {
    /// Response header; `header.member_id` is the member that answered.
    pub header: ResponseHeader,
    /// The member's etcd version, e.g. `"3.5.1"`.
    pub version: String,
    /// The size of the member's database file, in bytes.
    pub db_size: i64,
    /// The ID of the leader as this member sees it (0: no leader).
    pub leader: u64,
    /// The member's raft index.
    pub raft_index: u64,
    /// The member's raft term.
    pub raft_term: u64,
    /// The raft index the member has applied.
    pub raft_applied_index: u64,
    /// Alarm and health messages of the member (e.g. `"memberID:... alarm:NOSPACE"`).
    pub errors: Vec<String>,
    /// The bytes of the database file in use (the rest is free pages that a defragmentation
    /// would reclaim).
    pub db_size_in_use: i64,
    /// Whether the member is a learner.
    pub is_learner: bool,
    /// The storage version (etcd 3.6 and later; empty before).
    pub storage_version: String,
    /// The backend quota in bytes (etcd 3.6 and later; 0 before).
    pub db_size_quota: i64,
    /// A downgrade in progress (etcd 3.6 and later; `None` before).
    pub downgrade_info: Option<DowngradeInfo>,
}

impl StatusResponse {
    fn from_pb(r: pb::StatusResponse) -> Self {
        StatusResponse {
            header: ResponseHeader::from_pb(r.header),
            version: r.version,
            db_size: r.db_size,
            leader: r.leader,
            raft_index: r.raft_index,
            raft_term: r.raft_term,
            raft_applied_index: r.raft_applied_index,
            errors: r.errors,
            db_size_in_use: r.db_size_in_use,
            is_learner: r.is_learner,
            storage_version: r.storage_version,
            db_size_quota: r.db_size_quota,
            downgrade_info: r.downgrade_info.map(|d| DowngradeInfo {
                enabled: d.enabled,
                target_version: d.target_version,
            }),
        }
    }

    /// True when the answering member is the leader.
    pub fn is_leader(&self) -> bool {
        self.leader != 0 && self.leader == self.header.member_id
    }
}

/// The answer to [`Maintenance::defragment`], [`Maintenance::move_leader`].
#[non_exhaustive]
#[derive(Debug, Clone)]
pub struct MaintenanceResponse {
    /// Response header (all zeros for a defragmentation: etcd sends none with it).
    pub header: ResponseHeader,
}

/// The answer to [`Maintenance::hash`].
#[non_exhaustive]
#[derive(Debug, Clone)]
pub struct HashResponse {
    /// Response header.
    pub header: ResponseHeader,
    /// Hash of the member's whole backend database (differs between members that hold the
    /// same data; use [`Maintenance::hash_kv`] to compare members).
    pub hash: u32,
}

/// The answer to [`Maintenance::hash_kv`].
#[non_exhaustive]
#[derive(Debug, Clone)]
pub struct HashKvResponse {
    /// Response header.
    pub header: ResponseHeader,
    /// Hash of the key-value history up to the requested revision: equal on every healthy
    /// member for the same revision and compaction.
    pub hash: u32,
    /// The compaction revision the hash starts from.
    pub compact_revision: i64,
    /// The revision the hash covers (sent by newer servers; 0 from etcd 3.4 and early 3.5).
    pub hash_revision: i64,
}

/// The answer to a downgrade request.
#[non_exhaustive]
#[derive(Debug, Clone)]
pub struct DowngradeResponse {
    /// Response header.
    pub header: ResponseHeader,
    /// The cluster version.
    pub version: String,
}

/// What [`Maintenance::snapshot_to_file`] wrote.
#[non_exhaustive]
#[derive(Debug, Clone)]
pub struct SnapshotInfo {
    /// The file written.
    pub path: PathBuf,
    /// The size of the database in the snapshot (the member's `db_size` when it was taken).
    pub db_size: u64,
    /// The size of the file: the database followed by its 32-byte SHA-256 digest, as
    /// `etcdctl snapshot save` writes it (and `etcdutl snapshot restore` checks it).
    pub file_size: u64,
    /// The etcd version that sent the snapshot, when the server says (etcd 3.6 and later).
    pub version: Option<String>,
    /// The header of the first snapshot message.
    pub header: Option<ResponseHeader>,
}

#[derive(Clone, Copy)]
enum DowngradeAction {
    Validate,
    Enable,
    Cancel,
}

impl Maintenance {
    /// The chosen member endpoint, or `None` for the client's current member.
    pub fn endpoint(&self) -> Option<&str> {
        self.target.as_ref().map(|t| t.endpoint.as_str())
    }

    fn fixed(&self) -> Option<Channel> {
        self.target.as_ref().map(|t| t.channel.clone())
    }

    fn max_encoding(&self) -> usize {
        self.client.config().max_encoding_bytes()
    }

    /// The member's status: version, database size, leader, raft indexes, alarms.
    pub fn status(&self) -> Request<StatusResponse> {
        let this = self.clone();
        Request::new(call_opts("Status", true), move |opts| async move {
            let max = this.max_encoding();
            let resp = unary_on(
                &this.client,
                this.fixed(),
                pb::StatusRequest {},
                opts,
                move |ch, r| {
                    let mut c = maintenance_client(ch, max);
                    async move { c.status(r.into_request()).await }
                },
            )
            .await?;
            Ok(StatusResponse::from_pb(resp))
        })
    }

    fn alarm(&self, req: pb::AlarmRequest, read: bool) -> Request<AlarmResponse> {
        let this = self.clone();
        Request::new(call_opts("Alarm", read), move |opts| async move {
            this.alarm_pb(req, opts).await
        })
    }

    async fn alarm_pb(&self, req: pb::AlarmRequest, opts: CallOpts) -> Result<AlarmResponse> {
        let max = self.max_encoding();
        let resp = unary_on(&self.client, self.fixed(), req, opts, move |ch, r| {
            let mut c = maintenance_client(ch, max);
            async move { c.alarm(r.into_request()).await }
        })
        .await?;
        Ok(AlarmResponse::from_pb(resp))
    }

    /// Every alarm raised in the cluster.
    pub fn alarms(&self) -> Request<AlarmResponse> {
        self.alarm(
            pb::AlarmRequest {
                action: pb::alarm_request::AlarmAction::Get as i32,
                member_id: 0,
                alarm: pb::AlarmType::None as i32,
            },
            true,
        )
    }

    /// Raise `alarm` for member `member_id` (mostly for tests and drills: a raised
    /// [`AlarmType::NoSpace`] makes the cluster refuse writes).
    pub fn alarm_activate(&self, member_id: u64, alarm: AlarmType) -> Request<AlarmResponse> {
        self.alarm(
            pb::AlarmRequest {
                action: pb::alarm_request::AlarmAction::Activate as i32,
                member_id,
                alarm: alarm.to_pb(),
            },
            false,
        )
    }

    /// Disarm `alarm` of member `member_id`.
    pub fn alarm_disarm(&self, member_id: u64, alarm: AlarmType) -> Request<AlarmResponse> {
        self.alarm(
            pb::AlarmRequest {
                action: pb::alarm_request::AlarmAction::Deactivate as i32,
                member_id,
                alarm: alarm.to_pb(),
            },
            false,
        )
    }

    /// Disarm every raised alarm (as `etcdctl alarm disarm` does: list, then disarm each).
    /// The answer lists the alarms disarmed. The deadline applies to each request.
    pub fn alarm_disarm_all(&self) -> Request<AlarmResponse> {
        let this = self.clone();
        Request::new(call_opts("Alarm", false), move |opts| async move {
            let listed = this
                .alarm_pb(
                    pb::AlarmRequest {
                        action: pb::alarm_request::AlarmAction::Get as i32,
                        member_id: 0,
                        alarm: pb::AlarmType::None as i32,
                    },
                    opts,
                )
                .await?;
            let mut out = AlarmResponse {
                header: listed.header,
                alarms: Vec::new(),
            };
            for a in listed.alarms {
                let resp = this
                    .alarm_pb(
                        pb::AlarmRequest {
                            action: pb::alarm_request::AlarmAction::Deactivate as i32,
                            member_id: a.member_id,
                            alarm: a.alarm.to_pb(),
                        },
                        opts,
                    )
                    .await?;
                out.header = resp.header;
                out.alarms.extend(resp.alarms);
            }
            Ok(out)
        })
    }

    /// Defragment the member's database, giving the space of deleted and compacted data back
    /// to the file system. The member serves nothing else while it runs (seconds for a large
    /// database): defragment members one at a time, and give the request a generous deadline.
    pub fn defragment(&self) -> Request<MaintenanceResponse> {
        let this = self.clone();
        Request::new(call_opts("Defragment", false), move |opts| async move {
            let max = this.max_encoding();
            let resp = unary_on(
                &this.client,
                this.fixed(),
                pb::DefragmentRequest {},
                opts,
                move |ch, r| {
                    let mut c = maintenance_client(ch, max);
                    async move { c.defragment(r.into_request()).await }
                },
            )
            .await?;
            Ok(MaintenanceResponse {
                header: ResponseHeader::from_pb(resp.header),
            })
        })
    }

    /// Hash of the member's whole backend database (for debugging; to compare members use
    /// [`hash_kv`](Self::hash_kv)).
    pub fn hash(&self) -> Request<HashResponse> {
        let this = self.clone();
        Request::new(call_opts("Hash", true), move |opts| async move {
            let max = this.max_encoding();
            let resp = unary_on(
                &this.client,
                this.fixed(),
                pb::HashRequest {},
                opts,
                move |ch, r| {
                    let mut c = maintenance_client(ch, max);
                    async move { c.hash(r.into_request()).await }
                },
            )
            .await?;
            Ok(HashResponse {
                header: ResponseHeader::from_pb(resp.header),
                hash: resp.hash,
            })
        })
    }

    /// Hash of the key-value history up to `revision` (0: the latest). Members that are in
    /// sync give the same hash for the same revision, so this detects divergence.
    pub fn hash_kv(&self, revision: i64) -> Request<HashKvResponse> {
        let this = self.clone();
        Request::new(call_opts("HashKV", true), move |opts| async move {
            let max = this.max_encoding();
            let resp = unary_on(
                &this.client,
                this.fixed(),
                pb::HashKvRequest { revision },
                opts,
                move |ch, r| {
                    let mut c = maintenance_client(ch, max);
                    async move { c.hash_kv(r.into_request()).await }
                },
            )
            .await?;
            Ok(HashKvResponse {
                header: ResponseHeader::from_pb(resp.header),
                hash: resp.hash,
                compact_revision: resp.compact_revision,
                hash_revision: resp.hash_revision,
            })
        })
    }

    /// Open a snapshot of the member's database as a stream of byte chunks. The stream ends
    /// with etcd's 32-byte SHA-256 digest of the database, as `etcdctl snapshot save` stores
    /// it; a stream that ends early, or whose digest does not match the database bytes
    /// received, ends with an error. The deadline applies to opening the
    /// stream, not to reading it. See [`snapshot_to_file`](Self::snapshot_to_file) for the
    /// common case.
    pub fn snapshot(&self) -> Request<SnapshotStream> {
        let this = self.clone();
        Request::new(call_opts("Snapshot", true), move |opts| async move {
            let timeout = opts.timeout.or(this.client.config().request_timeout);
            this.open_snapshot(timeout).await
        })
    }

    async fn open_snapshot(&self, timeout: Option<std::time::Duration>) -> Result<SnapshotStream> {
        let shared = self.client.shared();
        let deadline = timeout.and_then(|t| tokio::time::Instant::now().checked_add(t));
        let mut stale = None;
        loop {
            let (request, generation) = with_deadline(
                left(deadline)?,
                shared.stream_request(pb::SnapshotRequest {}, stale),
            )
            .await??;
            let channel = match self.fixed() {
                Some(ch) => {
                    shared.channel()?;
                    ch
                }
                None => shared.channel()?,
            };
            let mut client = maintenance_client(channel.clone(), self.max_encoding());
            match with_deadline(left(deadline)?, client.snapshot(request)).await? {
                Ok(resp) => {
                    return Ok(SnapshotStream {
                        inner: resp.into_inner(),
                        _channel: channel,
                        total: None,
                        received: 0,
                        version: None,
                        header: None,
                        digest: DigestCheck::default(),
                        done: false,
                    });
                }
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

    /// Take a snapshot and write it to `path` (through `path` + `.part`, renamed when complete
    /// and synced), then check it: the database size announced by the server, the bytes
    /// received, and the digest etcd appends (file size = database size + 32), which must be
    /// the SHA-256 of the database received. On any failure the partial file is removed and
    /// `path` is left untouched. The deadline, when set, covers the whole transfer.
    pub fn snapshot_to_file(&self, path: impl AsRef<Path>) -> Request<SnapshotInfo> {
        let this = self.clone();
        let path = path.as_ref().to_owned();
        Request::new(call_opts("Snapshot", true), move |opts| async move {
            let timeout = opts.timeout.or(this.client.config().request_timeout);
            let mut part = path.clone().into_os_string();
            part.push(".part");
            let part = PathBuf::from(part);
            // Removes the partial file unless the snapshot was saved: on an error, and also
            // when this future is dropped midway (a caller's timeout).
            let mut cleanup = RemoveOnDrop(Some(part.clone()));
            let result = with_deadline(timeout, this.write_snapshot(&path, &part)).await;
            let result = result.and_then(|r| r);
            if result.is_ok() {
                cleanup.0 = None;
            }
            result
        })
    }

    async fn write_snapshot(&self, path: &Path, part: &Path) -> Result<SnapshotInfo> {
        let io = |what: &str, p: &Path, e: std::io::Error| {
            Error::new(ErrorKind::Other, format!("{what} {}", p.display())).with_source(e)
        };
        let mut stream = self.open_snapshot(None).await?;
        let mut file = tokio::fs::File::create(part)
            .await
            .map_err(|e| io("creating", part, e))?;
        let mut written: u64 = 0;
        while let Some(chunk) = std::future::poll_fn(|cx| Pin::new(&mut stream).poll_next(cx)).await
        {
            let chunk = chunk?;
            file.write_all(&chunk)
                .await
                .map_err(|e| io("writing", part, e))?;
            written += chunk.len() as u64;
        }
        file.flush().await.map_err(|e| io("writing", part, e))?;
        file.sync_all().await.map_err(|e| io("syncing", part, e))?;
        drop(file);
        let db_size = stream.db_size().unwrap_or(0);
        let on_disk = tokio::fs::metadata(part)
            .await
            .map_err(|e| io("reading the size of", part, e))?
            .len();
        if on_disk != written || written != db_size + SHA256_LEN || written % 512 != SHA256_LEN {
            return Err(Error::new(
                ErrorKind::Protocol,
                format!(
                    "snapshot size mismatch: database of {db_size} bytes announced, \
                     {written} bytes received, {on_disk} bytes on disk (expected database + \
                     {SHA256_LEN}-byte digest)"
                ),
            ));
        }
        tokio::fs::rename(part, path)
            .await
            .map_err(|e| io("renaming into", path, e))?;
        Ok(SnapshotInfo {
            path: path.to_owned(),
            db_size,
            file_size: on_disk,
            version: stream.version().map(str::to_owned),
            header: stream.header(),
        })
    }

    /// Transfer raft leadership to member `target_id` (a voting member). The request must be
    /// served by the leader: on a handle from [`Client::maintenance`] the client finds the
    /// leader (status of the current member, then the member list) and sends it there over a
    /// separate connection; on a handle from [`Client::maintenance_at`] it goes to that member,
    /// and fails with [`ErrorKind::NotLeader`] unless that member is the leader. The deadline
    /// applies to each step.
    pub fn move_leader(&self, target_id: u64) -> Request<MaintenanceResponse> {
        let this = self.clone();
        Request::new(call_opts("MoveLeader", false), move |opts| async move {
            let channel = match this.fixed() {
                Some(ch) => ch,
                None => this.leader_channel(opts).await?,
            };
            let max = this.max_encoding();
            let resp = unary_on(
                &this.client,
                Some(channel),
                pb::MoveLeaderRequest { target_id },
                opts,
                move |ch, r| {
                    let mut c = maintenance_client(ch, max);
                    async move { c.move_leader(r.into_request()).await }
                },
            )
            .await?;
            Ok(MaintenanceResponse {
                header: ResponseHeader::from_pb(resp.header),
            })
        })
    }

    /// A connection to the leader: its ID from the current member's status, its client URL
    /// from the member list.
    async fn leader_channel(&self, opts: CallOpts) -> Result<Channel> {
        let mut status = self.status();
        let mut list = Cluster::of(&self.client).member_list();
        if let Some(t) = opts.timeout {
            status = status.timeout(t);
            list = list.timeout(t);
        }
        let status = status.await?;
        if status.leader == 0 {
            return Err(Error::new(
                ErrorKind::NoLeader,
                format!("member {:x} reports no leader", status.header.member_id),
            ));
        }
        let members = list.await?;
        let leader = members.member(status.leader).ok_or_else(|| {
            Error::new(
                ErrorKind::MemberNotFound,
                format!("leader {:x} is not in the member list", status.leader),
            )
        })?;
        let url = leader.client_urls.first().ok_or_else(|| {
            Error::new(
                ErrorKind::Unavailable,
                format!("leader {:x} has no client URL", status.leader),
            )
        })?;
        self.client.shared().member_channel(url)
    }

    fn downgrade(&self, action: DowngradeAction, version: String) -> Request<DowngradeResponse> {
        let this = self.clone();
        Request::new(call_opts("Downgrade", false), move |opts| async move {
            let max = this.max_encoding();
            let action = match action {
                DowngradeAction::Validate => pb::downgrade_request::DowngradeAction::Validate,
                DowngradeAction::Enable => pb::downgrade_request::DowngradeAction::Enable,
                DowngradeAction::Cancel => pb::downgrade_request::DowngradeAction::Cancel,
            };
            let req = pb::DowngradeRequest {
                action: action as i32,
                version,
            };
            let resp = unary_on(&this.client, this.fixed(), req, opts, move |ch, r| {
                let mut c = maintenance_client(ch, max);
                async move { c.downgrade(r.into_request()).await }
            })
            .await
            .map_err(no_downgrade)?;
            Ok(DowngradeResponse {
                header: ResponseHeader::from_pb(resp.header),
                version: resp.version,
            })
        })
    }

    /// Check whether the cluster can be downgraded to `version` (`"major.minor"`, e.g.
    /// `"3.5"`), without changing anything.
    ///
    /// Servers without the downgrade API (etcd 3.4) fail with [`ErrorKind::Unimplemented`];
    /// malformed or impossible targets fail with
    /// [`ErrorKind::WrongDowngradeVersionFormat`] or
    /// [`ErrorKind::InvalidDowngradeTargetVersion`].
    pub fn downgrade_validate(&self, version: impl Into<String>) -> Request<DowngradeResponse> {
        self.downgrade(DowngradeAction::Validate, version.into())
    }

    /// Start downgrading the cluster to `version` (`"major.minor"`): the cluster version is
    /// lowered so that members can then be replaced one by one with the older binary. Errors
    /// as for [`downgrade_validate`](Self::downgrade_validate), plus
    /// [`ErrorKind::DowngradeInProcess`].
    pub fn downgrade_enable(&self, version: impl Into<String>) -> Request<DowngradeResponse> {
        self.downgrade(DowngradeAction::Enable, version.into())
    }

    /// Cancel a downgrade in progress ([`ErrorKind::NoInflightDowngrade`] when there is none;
    /// [`ErrorKind::Unimplemented`] on servers without the downgrade API).
    pub fn downgrade_cancel(&self) -> Request<DowngradeResponse> {
        self.downgrade(DowngradeAction::Cancel, String::new())
    }
}

/// Make the "server lacks the Downgrade RPC" answer say so plainly.
fn no_downgrade(e: Error) -> Error {
    if e.kind() == ErrorKind::Unimplemented {
        Error::new(
            ErrorKind::Unimplemented,
            "this etcd server has no downgrade API (added in etcd 3.5)",
        )
        .with_source(e)
    } else {
        e
    }
}

/// A member's database snapshot as a stream of byte chunks; from [`Maintenance::snapshot`].
///
/// The chunks, concatenated, are the database file followed by its 32-byte SHA-256 digest
/// (what `etcdctl snapshot save` writes). The stream ends with an error, not silently, when
/// the server stops before sending everything it announced, or when the digest does not match
/// the database bytes received (checked as they arrive; Go's client leaves that to
/// `etcdutl snapshot restore`). Dropping it cancels the transfer.
pub struct SnapshotStream {
    inner: tonic::Streaming<pb::SnapshotResponse>,
    /// Keeps a chosen member's connection open while the stream is read.
    _channel: Channel,
    total: Option<u64>,
    received: u64,
    version: Option<String>,
    header: Option<ResponseHeader>,
    digest: DigestCheck,
    done: bool,
}

/// Checks the digest etcd appends to a snapshot: the SHA-256 of the database bytes before it.
#[derive(Default)]
struct DigestCheck {
    hasher: Sha256,
    /// Database bytes hashed so far.
    hashed: u64,
    /// The digest as received so far.
    digest: [u8; SHA256_LEN as usize],
    got: usize,
}

impl DigestCheck {
    /// Take the next chunk of the stream, whose database part is `db_size` bytes: what is
    /// before that is hashed, what follows is the digest (anything beyond it is ignored; the
    /// stream refuses more than it announced).
    fn feed(&mut self, chunk: &[u8], db_size: u64) {
        let db_left = usize::try_from(db_size.saturating_sub(self.hashed)).unwrap_or(usize::MAX);
        let (db, rest) = chunk.split_at(db_left.min(chunk.len()));
        self.hasher.update(db);
        self.hashed += db.len() as u64;
        let room = &mut self.digest[self.got..];
        let take = room.len().min(rest.len());
        room[..take].copy_from_slice(&rest[..take]);
        self.got += take;
    }

    /// The error when the digest received is not the SHA-256 of the database received.
    fn check(&self) -> Result<()> {
        let ours = self.hasher.clone().finalize();
        if self.got == self.digest.len() && ours[..] == self.digest[..] {
            return Ok(());
        }
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        Err(Error::new(
            ErrorKind::Protocol,
            format!(
                "snapshot digest mismatch: the SHA-256 of the {} database bytes received is {}, \
                 the server sent {}",
                self.hashed,
                hex(&ours),
                hex(&self.digest[..self.got])
            ),
        ))
    }
}

impl fmt::Debug for SnapshotStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SnapshotStream")
            .field("db_size", &self.total)
            .field("received", &self.received)
            .field("version", &self.version)
            .finish()
    }
}

impl SnapshotStream {
    /// The database size the server announced (known after the first chunk).
    pub fn db_size(&self) -> Option<u64> {
        self.total
    }

    /// Bytes received so far (digest included).
    pub fn received(&self) -> u64 {
        self.received
    }

    /// The etcd version that sent the snapshot, when the server says (etcd 3.6 and later).
    pub fn version(&self) -> Option<&str> {
        self.version.as_deref()
    }

    /// The header of the first snapshot message (known after the first chunk).
    pub fn header(&self) -> Option<ResponseHeader> {
        self.header
    }

    fn finish(&mut self) -> Option<Result<Bytes>> {
        self.done = true;
        let total = self.total.unwrap_or(0);
        if self.total.is_some() && self.received == total + SHA256_LEN {
            return self.digest.check().err().map(Err);
        }
        Some(Err(Error::new(
            ErrorKind::Protocol,
            format!(
                "snapshot stream ended after {} bytes; expected {} (database {} + digest {})",
                self.received,
                total + SHA256_LEN,
                total,
                SHA256_LEN
            ),
        )))
    }
}

impl Stream for SnapshotStream {
    type Item = Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            match Pin::new(&mut this.inner).poll_next(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => return Poll::Ready(this.finish()),
                Poll::Ready(Some(Err(status))) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(Error::from_status(status))));
                }
                Poll::Ready(Some(Ok(msg))) => {
                    let len = msg.blob.len() as u64;
                    if this.total.is_none() {
                        let Some(total) = msg.remaining_bytes.checked_add(len) else {
                            this.done = true;
                            return Poll::Ready(Some(Err(Error::new(
                                ErrorKind::Protocol,
                                "snapshot stream announced an impossible size",
                            ))));
                        };
                        this.total = Some(total);
                        this.header = Some(ResponseHeader::from_pb(msg.header));
                    }
                    if !msg.version.is_empty() && this.version.is_none() {
                        this.version = Some(msg.version);
                    }
                    this.received = this.received.saturating_add(len);
                    let cap = this.total.unwrap_or(0).saturating_add(SHA256_LEN);
                    if this.received > cap {
                        this.done = true;
                        return Poll::Ready(Some(Err(Error::new(
                            ErrorKind::Protocol,
                            format!("snapshot stream sent more than the {cap} bytes announced"),
                        ))));
                    }
                    if len > 0 {
                        this.digest.feed(&msg.blob, this.total.unwrap_or(0));
                        return Poll::Ready(Some(Ok(msg.blob)));
                    }
                }
            }
        }
    }
}

/// Removes the file at its path when dropped (unless the path was taken out).
struct RemoveOnDrop(Option<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            // Synchronous: this may run where no runtime is left to run a task on. Removing
            // a file is quick, and a missing file is fine.
            let _ = std::fs::remove_file(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A database of `n` bytes and the stream etcd would send for it (database + digest).
    fn snapshot_of(n: usize) -> (Vec<u8>, Vec<u8>) {
        let db: Vec<u8> = (0..n).map(|i| (i * 7 + i / 251) as u8).collect();
        let mut stream = db.clone();
        stream.extend_from_slice(&Sha256::digest(&db));
        (db, stream)
    }

    fn fed(stream: &[u8], db_size: u64, chunk: usize) -> DigestCheck {
        let mut d = DigestCheck::default();
        for c in stream.chunks(chunk) {
            d.feed(c, db_size);
        }
        d
    }

    #[test]
    fn the_digest_is_sha256_of_the_database_in_any_chunking() {
        // The known answer: SHA-256("abc").
        let mut d = DigestCheck::default();
        d.feed(b"abc", 3);
        assert_eq!(
            d.hasher.clone().finalize()[..],
            [
                0xba, 0x78, 0x16, 0xbf, 0x8f, 0x01, 0xcf, 0xea, 0x41, 0x41, 0x40, 0xde, 0x5d, 0xae,
                0x22, 0x23, 0xb0, 0x03, 0x61, 0xa3, 0x96, 0x17, 0x7a, 0x9c, 0xb4, 0x10, 0xff, 0x61,
                0xf2, 0x00, 0x15, 0xad
            ]
        );
        let (db, stream) = snapshot_of(4096);
        // Chunks that end exactly at the digest, straddle it, or split it.
        for chunk in [1, 7, 32, 100, 4096, 4100, 5000] {
            let d = fed(&stream, db.len() as u64, chunk);
            assert!(d.check().is_ok(), "chunks of {chunk}");
            assert_eq!(d.hashed, db.len() as u64);
        }
    }

    #[test]
    fn a_changed_byte_or_a_short_digest_is_a_protocol_error() {
        let (db, stream) = snapshot_of(2048);
        for at in [0, 1000, db.len() - 1, db.len(), stream.len() - 1] {
            let mut bad = stream.clone();
            bad[at] ^= 0x20;
            let e = fed(&bad, db.len() as u64, 300).check().unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Protocol, "byte {at}");
            assert!(e.to_string().contains("digest mismatch"), "{e}");
        }
        let short = &stream[..stream.len() - 1];
        assert!(fed(short, db.len() as u64, 300).check().is_err());
    }
}
