//! The auth API: enable and disable authentication, manage users, roles and permissions.

use std::future::{Future, IntoFuture};
use std::time::Duration;

use crate::transport::Channel;
use bytes::Bytes;

use crate::client::{CallOpts, Client};
use crate::error::{Error, ErrorKind, Result};
use crate::kv::BoxFuture;
use crate::proto::{authpb, etcdserverpb as pb};
use crate::request::{Request, call_opts, grpc_client, unary_on};
use crate::types::{IntoBytes, ResponseHeader, prefix_range_end};

grpc_client!(auth_client, pb::auth_client::AuthClient<Channel>);

impl Client {
    /// The auth API (users, roles, permissions, enabling authentication).
    pub fn auth(&self) -> Auth {
        Auth {
            client: self.clone(),
        }
    }
}

/// The auth API of a [`Client`]; get it with [`Client::auth`]. Cheap to clone.
///
/// Once authentication is enabled, managing users and roles needs the `root` role. Errors are
/// typed: [`ErrorKind::UserAlreadyExist`], [`ErrorKind::UserNotFound`],
/// [`ErrorKind::RoleNotFound`], [`ErrorKind::RoleNotGranted`],
/// [`ErrorKind::PermissionNotGranted`], [`ErrorKind::RootUserNotExist`],
/// [`ErrorKind::PermissionDenied`], ...
///
/// A client that should *act as* a user is configured with
/// [`ClientBuilder::user`](crate::ClientBuilder::user): it authenticates, attaches its token to
/// every request and stream, and re-authenticates (once, shared by every concurrent caller) when
/// the server says the token is invalid or stale.
///
/// ```no_run
/// # async fn demo(client: etcdv3::Client) -> etcdv3::Result<()> {
/// use etcdv3::Permission;
/// let auth = client.auth();
/// auth.user_add("root", "root-password").await?;
/// auth.user_grant_role("root", "root").await?;
/// auth.role_add("reader").await?;
/// auth.role_grant_permission("reader", Permission::read("/config/").prefix())
///     .await?;
/// auth.user_add("app", "app-password").await?;
/// auth.user_grant_role("app", "reader").await?;
/// auth.enable().await?;
/// // From now on, requests need credentials:
/// let app = etcdv3::Client::builder(["http://127.0.0.1:2379"])
///     .user("app", "app-password")
///     .connect()
///     .await?;
/// app.kv().get("/config/").prefix().await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Auth {
    client: Client,
}

/// The answer to an auth request that returns nothing but its header.
#[non_exhaustive]
#[derive(Debug, Clone)]
pub struct AuthResponse {
    /// Response header.
    pub header: ResponseHeader,
}

/// The answer to [`Auth::status`].
#[non_exhaustive]
#[derive(Debug, Clone)]
pub struct AuthStatusResponse {
    /// Response header.
    pub header: ResponseHeader,
    /// Whether authentication is enabled.
    pub enabled: bool,
    /// The auth store's revision: it changes with every change to users, roles or
    /// permissions.
    pub auth_revision: u64,
}

/// The answer to [`Auth::user_get`].
#[non_exhaustive]
#[derive(Debug, Clone)]
pub struct UserGetResponse {
    /// Response header.
    pub header: ResponseHeader,
    /// The roles granted to the user.
    pub roles: Vec<String>,
}

/// The answer to [`Auth::user_list`].
#[non_exhaustive]
#[derive(Debug, Clone)]
pub struct UserListResponse {
    /// Response header.
    pub header: ResponseHeader,
    /// Every user name.
    pub users: Vec<String>,
}

/// The answer to [`Auth::role_get`].
#[non_exhaustive]
#[derive(Debug, Clone)]
pub struct RoleGetResponse {
    /// Response header.
    pub header: ResponseHeader,
    /// The role's permissions.
    pub permissions: Vec<Permission>,
}

/// The answer to [`Auth::role_list`].
#[non_exhaustive]
#[derive(Debug, Clone)]
pub struct RoleListResponse {
    /// Response header.
    pub header: ResponseHeader,
    /// Every role name.
    pub roles: Vec<String>,
}

/// What a [`Permission`] allows.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PermissionType {
    /// Reading keys (range, watch).
    Read,
    /// Writing keys (put, delete).
    Write,
    /// Both.
    ReadWrite,
}

impl PermissionType {
    fn to_pb(self) -> i32 {
        match self {
            PermissionType::Read => authpb::permission::Type::Read as i32,
            PermissionType::Write => authpb::permission::Type::Write as i32,
            PermissionType::ReadWrite => authpb::permission::Type::Readwrite as i32,
        }
    }

    fn from_pb(n: i32) -> Result<Self> {
        match authpb::permission::Type::try_from(n) {
            Ok(authpb::permission::Type::Read) => Ok(PermissionType::Read),
            Ok(authpb::permission::Type::Write) => Ok(PermissionType::Write),
            Ok(authpb::permission::Type::Readwrite) => Ok(PermissionType::ReadWrite),
            Err(_) => Err(Error::new(
                ErrorKind::Protocol,
                format!("unknown permission type {n}"),
            )),
        }
    }
}

/// A permission on a key, a key range or a key prefix, granted to a role.
///
/// ```
/// use etcdv3::{Permission, PermissionType};
/// let p = Permission::read("/config/").prefix();
/// assert_eq!(p.kind, PermissionType::Read);
/// assert_eq!(&p.key[..], b"/config/");
/// assert_eq!(&p.range_end[..], b"/config0");
/// let one_key = Permission::read_write("/leader");
/// assert!(one_key.range_end.is_empty());
/// ```
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Permission {
    /// What the permission allows.
    pub kind: PermissionType,
    /// The key, or the start of the range.
    pub key: Bytes,
    /// The end of the range (exclusive); empty for a single key; `"\0"` for every key from
    /// `key` on.
    pub range_end: Bytes,
}

impl Permission {
    /// A permission of `kind` on the single key `key` (see [`prefix`](Self::prefix),
    /// [`range`](Self::range), [`from_key`](Self::from_key) for more keys).
    pub fn new(kind: PermissionType, key: impl IntoBytes) -> Self {
        Permission {
            kind,
            key: key.into_bytes(),
            range_end: Bytes::new(),
        }
    }

    /// Read permission on `key`.
    pub fn read(key: impl IntoBytes) -> Self {
        Self::new(PermissionType::Read, key)
    }

    /// Write permission on `key`.
    pub fn write(key: impl IntoBytes) -> Self {
        Self::new(PermissionType::Write, key)
    }

    /// Read and write permission on `key`.
    pub fn read_write(key: impl IntoBytes) -> Self {
        Self::new(PermissionType::ReadWrite, key)
    }

    /// Extend to every key that starts with the key (an empty key: every key).
    pub fn prefix(mut self) -> Self {
        (self.key, self.range_end) = prefix_range(self.key);
        self
    }

    /// Extend to the half-open range `[key, end)`.
    pub fn range(mut self, end: impl IntoBytes) -> Self {
        self.range_end = end.into_bytes();
        self
    }

    /// Extend to every key greater than or equal to the key (an empty key: every key).
    pub fn from_key(mut self) -> Self {
        (self.key, self.range_end) = from_key_range(self.key);
        self
    }

    fn from_pb(p: authpb::Permission) -> Result<Self> {
        Ok(Permission {
            kind: PermissionType::from_pb(p.perm_type)?,
            key: p.key,
            range_end: p.range_end,
        })
    }

    fn to_pb(&self) -> authpb::Permission {
        authpb::Permission {
            perm_type: self.kind.to_pb(),
            key: self.key.clone(),
            range_end: self.range_end.clone(),
        }
    }
}

/// etcdctl's convention: an empty key with a prefix or from-key range means every key, which
/// the server spells `["\0", "\0")`.
fn prefix_range(key: Bytes) -> (Bytes, Bytes) {
    if key.is_empty() {
        (Bytes::from_static(b"\0"), Bytes::from_static(b"\0"))
    } else {
        let end = prefix_range_end(&key);
        (key, end)
    }
}

fn from_key_range(key: Bytes) -> (Bytes, Bytes) {
    let key = if key.is_empty() {
        Bytes::from_static(b"\0")
    } else {
        key
    };
    (key, Bytes::from_static(b"\0"))
}

impl Auth {
    /// One auth RPC as a [`Request`].
    fn rpc<Q, P, T, F, Fut>(
        &self,
        method: &'static str,
        read: bool,
        req: Q,
        call: F,
        map: fn(P) -> Result<T>,
    ) -> Request<T>
    where
        Q: Clone + Send + Sync + 'static,
        P: Send + 'static,
        T: Send + 'static,
        F: Fn(pb::auth_client::AuthClient<Channel>, tonic::Request<Q>) -> Fut
            + Clone
            + Send
            + Sync
            + 'static,
        Fut: Future<Output = std::result::Result<tonic::Response<P>, tonic::Status>>
            + Send
            + 'static,
    {
        let client = self.client.clone();
        Request::new(call_opts(method, read), move |opts| async move {
            let max = client.config().max_encoding_bytes();
            let resp = unary_on(&client, None, req, opts, move |ch, r| {
                call(auth_client(ch, max), r.into_request())
            })
            .await?;
            map(resp)
        })
    }

    /// Enable authentication. The `root` user must exist and have the `root` role
    /// ([`ErrorKind::RootUserNotExist`], [`ErrorKind::RootRoleNotExist`]). From then on every
    /// request needs credentials, this client's included unless it was built with
    /// [`ClientBuilder::user`](crate::ClientBuilder::user).
    pub fn enable(&self) -> Request<AuthResponse> {
        self.rpc(
            "AuthEnable",
            false,
            pb::AuthEnableRequest {},
            |mut c, r| async move { c.auth_enable(r).await },
            |r: pb::AuthEnableResponse| Ok(header(r.header)),
        )
    }

    /// Disable authentication (needs the `root` role).
    pub fn disable(&self) -> Request<AuthResponse> {
        self.rpc(
            "AuthDisable",
            false,
            pb::AuthDisableRequest {},
            |mut c, r| async move { c.auth_disable(r).await },
            |r: pb::AuthDisableResponse| Ok(header(r.header)),
        )
    }

    /// Whether authentication is enabled, and the auth store's revision. etcd 3.4 lacks this
    /// RPC: it fails there with [`ErrorKind::Unimplemented`].
    pub fn status(&self) -> Request<AuthStatusResponse> {
        self.rpc(
            "AuthStatus",
            true,
            pb::AuthStatusRequest {},
            |mut c, r| async move { c.auth_status(r).await },
            |r: pb::AuthStatusResponse| {
                Ok(AuthStatusResponse {
                    header: ResponseHeader::from_pb(r.header),
                    enabled: r.enabled,
                    auth_revision: r.auth_revision,
                })
            },
        )
    }

    /// Add user `name` with `password`.
    pub fn user_add(
        &self,
        name: impl Into<String>,
        password: impl Into<String>,
    ) -> Request<AuthResponse> {
        self.user_add_pb(pb::AuthUserAddRequest {
            name: name.into(),
            password: password.into(),
            options: Some(authpb::UserAddOptions { no_password: false }),
            hashed_password: String::new(),
        })
    }

    /// Add user `name` without a password: it cannot authenticate with a password (only by
    /// other means the server supports, such as TLS client certificates), but can be granted
    /// roles.
    pub fn user_add_no_password(&self, name: impl Into<String>) -> Request<AuthResponse> {
        self.user_add_pb(pb::AuthUserAddRequest {
            name: name.into(),
            password: String::new(),
            options: Some(authpb::UserAddOptions { no_password: true }),
            hashed_password: String::new(),
        })
    }

    fn user_add_pb(&self, req: pb::AuthUserAddRequest) -> Request<AuthResponse> {
        self.rpc(
            "UserAdd",
            false,
            req,
            |mut c, r| async move { c.user_add(r).await },
            |r: pb::AuthUserAddResponse| Ok(header(r.header)),
        )
    }

    /// The roles of user `name`.
    pub fn user_get(&self, name: impl Into<String>) -> Request<UserGetResponse> {
        self.rpc(
            "UserGet",
            true,
            pb::AuthUserGetRequest { name: name.into() },
            |mut c, r| async move { c.user_get(r).await },
            |r: pb::AuthUserGetResponse| {
                Ok(UserGetResponse {
                    header: ResponseHeader::from_pb(r.header),
                    roles: r.roles,
                })
            },
        )
    }

    /// Every user.
    pub fn user_list(&self) -> Request<UserListResponse> {
        self.rpc(
            "UserList",
            true,
            pb::AuthUserListRequest {},
            |mut c, r| async move { c.user_list(r).await },
            |r: pb::AuthUserListResponse| {
                Ok(UserListResponse {
                    header: ResponseHeader::from_pb(r.header),
                    users: r.users,
                })
            },
        )
    }

    /// Delete user `name`.
    pub fn user_delete(&self, name: impl Into<String>) -> Request<AuthResponse> {
        self.rpc(
            "UserDelete",
            false,
            pb::AuthUserDeleteRequest { name: name.into() },
            |mut c, r| async move { c.user_delete(r).await },
            |r: pb::AuthUserDeleteResponse| Ok(header(r.header)),
        )
    }

    /// Change the password of user `name`.
    pub fn user_change_password(
        &self,
        name: impl Into<String>,
        password: impl Into<String>,
    ) -> Request<AuthResponse> {
        self.rpc(
            "UserChangePassword",
            false,
            pb::AuthUserChangePasswordRequest {
                name: name.into(),
                password: password.into(),
                hashed_password: String::new(),
            },
            |mut c, r| async move { c.user_change_password(r).await },
            |r: pb::AuthUserChangePasswordResponse| Ok(header(r.header)),
        )
    }

    /// Grant `role` to `user`.
    pub fn user_grant_role(
        &self,
        user: impl Into<String>,
        role: impl Into<String>,
    ) -> Request<AuthResponse> {
        self.rpc(
            "UserGrantRole",
            false,
            pb::AuthUserGrantRoleRequest {
                user: user.into(),
                role: role.into(),
            },
            |mut c, r| async move { c.user_grant_role(r).await },
            |r: pb::AuthUserGrantRoleResponse| Ok(header(r.header)),
        )
    }

    /// Revoke `role` from `user` ([`ErrorKind::RoleNotGranted`] when it was not granted).
    pub fn user_revoke_role(
        &self,
        user: impl Into<String>,
        role: impl Into<String>,
    ) -> Request<AuthResponse> {
        self.rpc(
            "UserRevokeRole",
            false,
            pb::AuthUserRevokeRoleRequest {
                name: user.into(),
                role: role.into(),
            },
            |mut c, r| async move { c.user_revoke_role(r).await },
            |r: pb::AuthUserRevokeRoleResponse| Ok(header(r.header)),
        )
    }

    /// Add role `name`.
    pub fn role_add(&self, name: impl Into<String>) -> Request<AuthResponse> {
        self.rpc(
            "RoleAdd",
            false,
            pb::AuthRoleAddRequest { name: name.into() },
            |mut c, r| async move { c.role_add(r).await },
            |r: pb::AuthRoleAddResponse| Ok(header(r.header)),
        )
    }

    /// The permissions of role `name`.
    pub fn role_get(&self, name: impl Into<String>) -> Request<RoleGetResponse> {
        self.rpc(
            "RoleGet",
            true,
            pb::AuthRoleGetRequest { role: name.into() },
            |mut c, r| async move { c.role_get(r).await },
            |r: pb::AuthRoleGetResponse| {
                Ok(RoleGetResponse {
                    header: ResponseHeader::from_pb(r.header),
                    permissions: r
                        .perm
                        .into_iter()
                        .map(Permission::from_pb)
                        .collect::<Result<_>>()?,
                })
            },
        )
    }

    /// Every role.
    pub fn role_list(&self) -> Request<RoleListResponse> {
        self.rpc(
            "RoleList",
            true,
            pb::AuthRoleListRequest {},
            |mut c, r| async move { c.role_list(r).await },
            |r: pb::AuthRoleListResponse| {
                Ok(RoleListResponse {
                    header: ResponseHeader::from_pb(r.header),
                    roles: r.roles,
                })
            },
        )
    }

    /// Delete role `name` (it is also revoked from every user that had it).
    pub fn role_delete(&self, name: impl Into<String>) -> Request<AuthResponse> {
        self.rpc(
            "RoleDelete",
            false,
            pb::AuthRoleDeleteRequest { role: name.into() },
            |mut c, r| async move { c.role_delete(r).await },
            |r: pb::AuthRoleDeleteResponse| Ok(header(r.header)),
        )
    }

    /// Grant `permission` to `role`. Granting on a key or range the role already has a
    /// permission for replaces that permission's type.
    pub fn role_grant_permission(
        &self,
        role: impl Into<String>,
        permission: Permission,
    ) -> Request<AuthResponse> {
        self.rpc(
            "RoleGrantPermission",
            false,
            pb::AuthRoleGrantPermissionRequest {
                name: role.into(),
                perm: Some(permission.to_pb()),
            },
            |mut c, r| async move { c.role_grant_permission(r).await },
            |r: pb::AuthRoleGrantPermissionResponse| Ok(header(r.header)),
        )
    }

    /// Revoke from `role` the permission on `key` (with the builder's options: on a prefix or
    /// range). Key and range must match the granted permission exactly, else
    /// [`ErrorKind::PermissionNotGranted`].
    pub fn role_revoke_permission(
        &self,
        role: impl Into<String>,
        key: impl IntoBytes,
    ) -> RevokePermission {
        RevokePermission {
            auth: self.clone(),
            req: pb::AuthRoleRevokePermissionRequest {
                role: role.into(),
                key: key.into_bytes(),
                range_end: Bytes::new(),
            },
            opts: call_opts("RoleRevokePermission", false),
        }
    }
}

fn header(h: Option<pb::ResponseHeader>) -> AuthResponse {
    AuthResponse {
        header: ResponseHeader::from_pb(h),
    }
}

/// A permission revocation; await it. See [`Auth::role_revoke_permission`].
#[must_use = "a request does nothing until it is awaited"]
#[derive(Debug, Clone)]
pub struct RevokePermission {
    auth: Auth,
    req: pb::AuthRoleRevokePermissionRequest,
    opts: CallOpts,
}

impl RevokePermission {
    /// The permission to revoke is on every key that starts with the key.
    pub fn prefix(mut self) -> Self {
        let key = std::mem::take(&mut self.req.key);
        (self.req.key, self.req.range_end) = prefix_range(key);
        self
    }

    /// The permission to revoke is on the range `[key, end)`.
    pub fn range(mut self, end: impl IntoBytes) -> Self {
        self.req.range_end = end.into_bytes();
        self
    }

    /// The permission to revoke is on every key from the key on.
    pub fn from_key(mut self) -> Self {
        let key = std::mem::take(&mut self.req.key);
        (self.req.key, self.req.range_end) = from_key_range(key);
        self
    }

    /// This request's deadline, overriding the client's default request timeout.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.opts.timeout = Some(timeout);
        self
    }
}

impl IntoFuture for RevokePermission {
    type Output = Result<AuthResponse>;
    type IntoFuture = BoxFuture<Self::Output>;

    fn into_future(self) -> Self::IntoFuture {
        let mut request = self.auth.rpc(
            "RoleRevokePermission",
            false,
            self.req,
            |mut c, r| async move { c.role_revoke_permission(r).await },
            |r: pb::AuthRoleRevokePermissionResponse| Ok(header(r.header)),
        );
        if let Some(t) = self.opts.timeout {
            request = request.timeout(t);
        }
        request.into_future()
    }
}

/// Whether a watch create that the server canceled with `reason` may have been refused for a
/// stale token rather than for a real lack of permission. etcd 3.4 cancels with "...invalid
/// auth token"; etcd 3.5 before 3.5.5 says only "...permission denied" for an expired or
/// unknown token (etcd #14322 fixed the reason). A watch worker with credentials that sees
/// this for a create sent with token generation `g` should re-open its stream once with
/// `Shared::stream_request(msg, Some(g))` and create again; a second refusal is real.
#[allow(dead_code)] // used by the watch worker
pub(crate) fn watch_cancel_may_be_stale_token(reason: &str) -> bool {
    [
        "invalid auth token",
        "auth store is old",
        "revision in header is old",
        "permission denied",
        "user name is empty",
    ]
    .iter()
    .any(|s| reason.contains(s))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn permission_ranges() {
        let p = Permission::write("a").range("c");
        assert_eq!((&p.key[..], &p.range_end[..]), (&b"a"[..], &b"c"[..]));
        let p = Permission::read("").prefix();
        assert_eq!((&p.key[..], &p.range_end[..]), (&b"\0"[..], &b"\0"[..]));
        let p = Permission::read("k").from_key();
        assert_eq!((&p.key[..], &p.range_end[..]), (&b"k"[..], &b"\0"[..]));
        let p = Permission::read_write(&b"a\xff"[..]).prefix();
        assert_eq!(&p.range_end[..], b"b");
        for t in [
            PermissionType::Read,
            PermissionType::Write,
            PermissionType::ReadWrite,
        ] {
            assert_eq!(PermissionType::from_pb(t.to_pb()).ok(), Some(t));
        }
        assert!(PermissionType::from_pb(9).is_err());
    }

    #[test]
    fn stale_token_watch_cancel_reasons() {
        // As sent by etcd 3.4.23 and 3.5.1 for a watch created with a stale token.
        for r in [
            "rpc error: code = Unauthenticated desc = etcdserver: invalid auth token",
            "rpc error: code = PermissionDenied desc = etcdserver: permission denied",
        ] {
            assert!(watch_cancel_may_be_stale_token(r), "{r}");
        }
        assert!(!watch_cancel_may_be_stale_token(
            "mvcc: required revision has been compacted"
        ));
    }

    /// `Shared::stream_request` (what the watch and keep-alive workers open their streams
    /// with): a stream opened with a token the server no longer knows is refused, and asking
    /// again with that token's generation re-authenticates once, shared by every concurrent
    /// caller, and the new stream works.
    #[cfg(feature = "testkit")]
    #[tokio::test]
    async fn stream_request_reauthenticates_for_a_stale_generation() {
        use futures::StreamExt;
        use pb::watch_client::WatchClient;

        let etcd = crate::testkit::EtcdCluster::builder()
            .start_async()
            .await
            .unwrap();
        let admin = Client::builder(etcd.endpoints()).connect().await.unwrap();
        admin.auth().user_add("root", "rootpw").await.unwrap();
        admin.auth().user_grant_role("root", "root").await.unwrap();
        admin.auth().enable().await.unwrap();
        let c = Client::builder(etcd.endpoints())
            .user("root", "rootpw")
            .request_timeout(Duration::from_secs(10))
            .connect()
            .await
            .unwrap();
        let shared = c.shared().clone();

        let create = |key: &'static str| pb::WatchRequest {
            request_union: Some(pb::watch_request::RequestUnion::CreateRequest(
                pb::WatchCreateRequest {
                    key: Bytes::from_static(key.as_bytes()),
                    ..Default::default()
                },
            )),
        };
        // Open a Watch stream with `request`, create one watcher; the first answer.
        let open = |shared: std::sync::Arc<crate::client::Shared>, stale: Option<u64>| async move {
            let msgs = futures::stream::iter([create("w")]).chain(futures::stream::pending());
            let (request, generation) = shared.stream_request(msgs, stale).await?;
            let mut wc = WatchClient::new(shared.channel()?);
            let first = match wc.watch(request).await {
                Ok(resp) => {
                    let mut stream = resp.into_inner();
                    match stream.next().await {
                        Some(Ok(r)) => Ok((r, stream)),
                        Some(Err(s)) => Err(Error::from_status(s)),
                        None => Err(Error::new(ErrorKind::Other, "watch stream ended")),
                    }
                }
                Err(s) => Err(Error::from_status(s)),
            };
            Ok::<_, Error>((first, generation))
        };

        let (first, g1) = open(shared.clone(), None).await.unwrap();
        let (created, _live) = first.unwrap();
        assert!(created.created && !created.canceled, "{created:?}");
        let g1 = g1.unwrap();

        // Disabling auth drops every token on the server; enable it again: ours is stale.
        c.auth().disable().await.unwrap();
        admin.auth().enable().await.unwrap();
        let (first, g) = open(shared.clone(), None).await.unwrap();
        assert_eq!(g, Some(g1), "no refresh without a stale generation");
        let refused = match first {
            // etcd 3.4 and 3.5 before 3.5.5 accept the stream and cancel the create with
            // "permission denied" (later versions say "invalid auth token").
            Ok((r, _)) if r.canceled => r.cancel_reason,
            Ok((r, _)) => panic!("a stale token was accepted: {r:?}"),
            Err(e) => e.to_string(),
        };
        eprintln!("a stale token on a new watch stream: {refused}");
        assert!(
            refused.contains("permission denied") || refused.contains("invalid auth token"),
            "{refused}"
        );

        // Ten workers pass back the stale generation at once: one re-authentication.
        let opens: Vec<_> = (0..10).map(|_| open(shared.clone(), Some(g1))).collect();
        for r in futures::future::join_all(opens).await {
            let (first, g) = r.unwrap();
            assert_eq!(g, Some(g1 + 1), "exactly one shared re-authentication");
            let (created, _) = first.unwrap();
            assert!(created.created && !created.canceled, "{created:?}");
        }

        // And the refreshed stream delivers events.
        let (first, _) = open(shared.clone(), None).await.unwrap();
        let (_, mut stream) = first.unwrap();
        c.kv().put("w", "1").await.unwrap();
        let ev = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(ev.events.len(), 1);
        assert_eq!(&ev.events[0].kv.as_ref().unwrap().value[..], b"1");
    }
}
