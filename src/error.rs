//! The crate's error type.
//!
//! [`Error`] is opaque: inspect it through [`Error::kind`] and the predicates
//! ([`Error::is_retryable`], [`Error::is_compacted`], ...). Errors the etcd server sends are
//! classified from the gRPC status code and the server's `etcdserver: ...` message, the way Go's
//! `rpctypes` package does it, so the same server condition always yields the same
//! [`ErrorKind`].

use std::fmt;

/// A `Result` whose error is this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What went wrong, as a closed-for-matching but growable set of kinds.
///
/// Kinds mirror etcd's server errors (`etcdserver: ...` messages) plus client-side conditions
/// ([`ErrorKind::Deadline`], [`ErrorKind::Canceled`], [`ErrorKind::Closed`],
/// [`ErrorKind::InvalidArgument`]). New kinds may be added in minor releases.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    // ---- key-value requests ----
    /// The request named no key (`etcdserver: key is not provided`).
    EmptyKey,
    /// The key does not exist (`etcdserver: key not found`).
    KeyNotFound,
    /// `ignore_value` was set together with a value.
    ValueProvided,
    /// `ignore_lease` was set together with a lease.
    LeaseProvided,
    /// A transaction has more compares or operations than the server allows (`--max-txn-ops`).
    TooManyOps,
    /// A transaction writes the same key more than once in one branch.
    DuplicateKey,
    /// The sort options of a range request are invalid.
    InvalidSortOption,
    /// The requested revision has been compacted; see [`Error::compact_revision`].
    Compacted,
    /// The requested revision is newer than the store's current revision.
    FutureRevision,
    /// The request is larger than the server accepts (`--max-request-bytes`).
    RequestTooLarge,
    /// The server is throttling: too many requests are pending.
    TooManyRequests,
    /// The database has exceeded its space quota (NOSPACE alarm).
    NoSpace,
    /// The server reports data corruption.
    Corrupt,

    // ---- leases ----
    /// The lease does not exist (it expired or was revoked).
    LeaseNotFound,
    /// A lease with the requested ID already exists.
    LeaseExist,
    /// The requested TTL is larger than the server allows.
    TtlTooLarge,

    // ---- watch ----
    /// The server canceled a watch.
    WatchCanceled,

    // ---- cluster membership ----
    /// A member with this ID already exists.
    MemberExist,
    /// A member with these peer URLs already exists.
    PeerUrlExist,
    /// Reconfiguration refused: not enough started members.
    MemberNotEnoughStarted,
    /// The given member URLs are invalid.
    MemberBadUrls,
    /// No member with this ID exists.
    MemberNotFound,
    /// Only a learner can be promoted.
    MemberNotLearner,
    /// The learner is not yet in sync with the leader.
    LearnerNotReady,
    /// The cluster already has the maximum number of learners.
    TooManyLearners,
    /// The member belongs to another cluster.
    ClusterIdMismatch,
    /// The leader transferee is not a valid voting member.
    BadLeaderTransferee,

    // ---- auth ----
    /// The root user does not exist (auth cannot be enabled).
    RootUserNotExist,
    /// The root user lacks the root role.
    RootRoleNotExist,
    /// The user already exists.
    UserAlreadyExist,
    /// The user name is empty.
    UserEmpty,
    /// The user does not exist.
    UserNotFound,
    /// The role already exists.
    RoleAlreadyExist,
    /// The role does not exist.
    RoleNotFound,
    /// The role name is empty.
    RoleEmpty,
    /// Wrong user name or password.
    AuthFailed,
    /// A permission was required but not given.
    PermissionNotGiven,
    /// The authenticated user may not do this.
    PermissionDenied,
    /// The role is not granted to the user.
    RoleNotGranted,
    /// The permission is not granted to the role.
    PermissionNotGranted,
    /// Authentication is not enabled on the server.
    AuthNotEnabled,
    /// The auth token is invalid or expired.
    InvalidAuthToken,
    /// Invalid auth management request.
    InvalidAuthMgmt,
    /// The auth store revision the token was issued at is old.
    AuthOldRevision,

    // ---- availability ----
    /// The serving member has no leader.
    NoLeader,
    /// The serving member is not the leader.
    NotLeader,
    /// The leader changed while the request was in flight.
    LeaderChanged,
    /// The server cannot serve this request (cluster version too low).
    NotCapable,
    /// The server is stopping.
    Stopped,
    /// The server timed out processing the request (the request may or may not have been applied).
    Timeout,
    /// The cluster is unhealthy.
    Unhealthy,
    /// A learner member cannot serve this RPC.
    NotSupportedForLearner,
    /// No connection to the server could be used (transport failure, refused, reset).
    Unavailable,
    /// A serializable read answered from a revision older than one this client has already
    /// seen (the member serving it lags behind); see the client's ordering guard.
    StaleRead,
    /// The server does not implement this RPC (older etcd version).
    Unimplemented,

    // ---- downgrade ----
    /// The downgrade target version is malformed.
    WrongDowngradeVersionFormat,
    /// The downgrade target version is not valid for this cluster.
    InvalidDowngradeTargetVersion,
    /// The cluster version could not be determined.
    ClusterVersionUnavailable,
    /// A downgrade is already in progress.
    DowngradeInProcess,
    /// No downgrade is in progress.
    NoInflightDowngrade,

    // ---- election service ----
    /// The campaigner no longer leads the election (its leader key is gone or was re-created),
    /// so it cannot proclaim (`election: not leader`).
    ElectionNotLeader,

    // ---- concurrency recipes ----
    /// [`Mutex::try_lock`](crate::Mutex::try_lock) found the lock held by another session.
    Locked,
    /// The recipe's [`Session`](crate::Session) ended (its lease expired, was revoked or is no
    /// longer kept) while it waited for, or held, a lock or leadership.
    SessionExpired,
    /// A software transaction ([`stm`](crate::stm)) kept conflicting with concurrent writers
    /// and gave up after its last attempt.
    Conflict,

    // ---- client side ----
    /// The request's deadline passed before an answer arrived.
    Deadline,
    /// The request was canceled.
    Canceled,
    /// The client was closed.
    Closed,
    /// The request was rejected by the client before sending: an argument is invalid.
    InvalidArgument,
    /// A server answer could not be understood.
    Protocol,
    /// Any other failure (an unrecognised server error, an I/O error).
    Other,
}

impl ErrorKind {
    /// A short, stable, human-readable description.
    pub fn as_str(self) -> &'static str {
        use ErrorKind::*;
        match self {
            EmptyKey => "key is not provided",
            KeyNotFound => "key not found",
            ValueProvided => "value is provided",
            LeaseProvided => "lease is provided",
            TooManyOps => "too many operations in txn request",
            DuplicateKey => "duplicate key given in txn request",
            InvalidSortOption => "invalid sort option",
            Compacted => "required revision has been compacted",
            FutureRevision => "required revision is a future revision",
            RequestTooLarge => "request is too large",
            TooManyRequests => "too many requests",
            NoSpace => "database space exceeded",
            Corrupt => "corrupt cluster",
            LeaseNotFound => "requested lease not found",
            LeaseExist => "lease already exists",
            TtlTooLarge => "too large lease TTL",
            WatchCanceled => "watch canceled",
            MemberExist => "member ID already exists",
            PeerUrlExist => "peer URLs already exist",
            MemberNotEnoughStarted => "not enough started members",
            MemberBadUrls => "given member URLs are invalid",
            MemberNotFound => "member not found",
            MemberNotLearner => "can only promote a learner member",
            LearnerNotReady => "learner is not in sync with the leader",
            TooManyLearners => "too many learner members in cluster",
            ClusterIdMismatch => "cluster ID mismatch",
            BadLeaderTransferee => "bad leader transferee",
            RootUserNotExist => "root user does not exist",
            RootRoleNotExist => "root user does not have root role",
            UserAlreadyExist => "user name already exists",
            UserEmpty => "user name is empty",
            UserNotFound => "user name not found",
            RoleAlreadyExist => "role name already exists",
            RoleNotFound => "role name not found",
            RoleEmpty => "role name is empty",
            AuthFailed => "authentication failed, invalid user ID or password",
            PermissionNotGiven => "permission not given",
            PermissionDenied => "permission denied",
            RoleNotGranted => "role is not granted to the user",
            PermissionNotGranted => "permission is not granted to the role",
            AuthNotEnabled => "authentication is not enabled",
            InvalidAuthToken => "invalid auth token",
            InvalidAuthMgmt => "invalid auth management",
            AuthOldRevision => "revision of auth store is old",
            NoLeader => "no leader",
            NotLeader => "not leader",
            LeaderChanged => "leader changed",
            NotCapable => "not capable",
            Stopped => "server stopped",
            Timeout => "request timed out",
            Unhealthy => "unhealthy cluster",
            NotSupportedForLearner => "rpc not supported for learner",
            Unavailable => "unavailable",
            StaleRead => "stale read: the serving member is behind a revision already seen",
            Unimplemented => "not implemented by the server",
            WrongDowngradeVersionFormat => "wrong downgrade target version format",
            InvalidDowngradeTargetVersion => "invalid downgrade target version",
            ClusterVersionUnavailable => "cluster version not found during downgrade",
            DowngradeInProcess => "cluster has a downgrade job in progress",
            NoInflightDowngrade => "no inflight downgrade job",
            ElectionNotLeader => "election: not leader",
            Locked => "mutex: locked by another session",
            SessionExpired => "session: the session's lease is gone",
            Conflict => "stm: too many conflicts",
            Deadline => "deadline exceeded",
            Canceled => "canceled",
            Closed => "client closed",
            InvalidArgument => "invalid argument",
            Protocol => "protocol error",
            Other => "other error",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error of every fallible operation in this crate.
///
/// Opaque by design: match on [`Error::kind`], use the predicates, and walk
/// [`std::error::Error::source`] for the underlying cause (a gRPC status, an I/O error).
pub struct Error {
    inner: Box<Inner>,
}

struct Inner {
    kind: ErrorKind,
    /// Human-readable detail: the server's message, or the client's explanation.
    message: String,
    /// The gRPC status code number when the error came from a gRPC status.
    grpc_code: Option<i32>,
    compact_revision: Option<i64>,
    source: Option<BoxError>,
    /// True when the request may have reached a server (so a mutation may have been applied).
    maybe_sent: bool,
    /// The endpoint the failed attempt went to.
    endpoint: Option<String>,
    /// Each endpoint's own failure, when every endpoint failed.
    endpoint_errors: Vec<(String, String)>,
}

impl Error {
    /// A new error of `kind` with a detail message.
    pub(crate) fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            inner: Box::new(Inner {
                kind,
                message: message.into(),
                grpc_code: None,
                compact_revision: None,
                source: None,
                maybe_sent: false,
                endpoint: None,
                endpoint_errors: Vec::new(),
            }),
        }
    }

    /// An [`ErrorKind::InvalidArgument`] error.
    pub(crate) fn invalid_argument(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidArgument, message)
    }

    pub(crate) fn with_source(mut self, source: impl Into<BoxError>) -> Self {
        self.inner.source = Some(source.into());
        self
    }

    pub(crate) fn with_compact_revision(mut self, rev: i64) -> Self {
        self.inner.compact_revision = Some(rev);
        self
    }

    /// A copy without the source chain (errors are not `Clone`: sources may not be).
    pub(crate) fn summary(&self) -> Error {
        let mut e = Error::new(self.inner.kind, self.inner.message.clone());
        e.inner.grpc_code = self.inner.grpc_code;
        e.inner.compact_revision = self.inner.compact_revision;
        e.inner.maybe_sent = self.inner.maybe_sent;
        e.inner.endpoint = self.inner.endpoint.clone();
        e.inner.endpoint_errors = self.inner.endpoint_errors.clone();
        e
    }

    pub(crate) fn maybe_sent(mut self, maybe_sent: bool) -> Self {
        self.inner.maybe_sent = maybe_sent;
        self
    }

    pub(crate) fn at_endpoint(mut self, endpoint: &str) -> Self {
        self.inner.endpoint = Some(endpoint.to_owned());
        self
    }

    pub(crate) fn with_endpoint_errors(mut self, errors: Vec<(String, String)>) -> Self {
        self.inner.endpoint_errors = errors;
        self
    }

    /// The endpoint whose answer (or failure) this error reports, when known.
    pub fn endpoint(&self) -> Option<&str> {
        self.inner.endpoint.as_deref()
    }

    /// When every endpoint failed: each endpoint with its own failure, as
    /// `(endpoint, error message)`.
    pub fn endpoint_errors(&self) -> impl Iterator<Item = (&str, &str)> {
        self.inner
            .endpoint_errors
            .iter()
            .map(|(e, m)| (e.as_str(), m.as_str()))
    }

    /// True when the outcome of the request is unknown: it may have reached a server and been
    /// applied, but no answer arrived (connection lost mid-request, deadline, server-side
    /// timeout, leader change, a member stopping with the request proposed). A mutation that
    /// failed this way must not be blindly repeated if applying it twice matters; read the
    /// key to find out.
    pub fn is_indeterminate(&self) -> bool {
        use ErrorKind::*;
        self.inner.maybe_sent
            && matches!(
                self.inner.kind,
                Unavailable | Deadline | Canceled | Timeout | LeaderChanged | Stopped | Other
            )
    }

    /// An error from a reason the server sent inside a message (e.g. a watch's cancel reason),
    /// classified like a status message; `fallback` when the text is not a known server error.
    pub(crate) fn from_server_message(msg: &str, fallback: ErrorKind) -> Self {
        Self::new(kind_from_message(msg).unwrap_or(fallback), msg)
    }

    /// Which kind of error this is.
    pub fn kind(&self) -> ErrorKind {
        self.inner.kind
    }

    /// The detail message: the server's own text when the server sent the error.
    pub fn message(&self) -> &str {
        &self.inner.message
    }

    /// The gRPC status code (as its number, see the gRPC spec) when a gRPC status caused this error.
    pub fn grpc_code(&self) -> Option<i32> {
        self.inner.grpc_code
    }

    /// For [`ErrorKind::Compacted`] errors that know it: the revision the store was compacted at.
    pub fn compact_revision(&self) -> Option<i64> {
        self.inner.compact_revision
    }

    /// True for [`ErrorKind::Compacted`].
    pub fn is_compacted(&self) -> bool {
        self.inner.kind == ErrorKind::Compacted
    }

    /// True when the client's deadline passed ([`ErrorKind::Deadline`]).
    pub fn is_deadline(&self) -> bool {
        self.inner.kind == ErrorKind::Deadline
    }

    /// True for auth-token problems that a fresh token can fix: an invalid or outdated token,
    /// or no user at all ([`ErrorKind::UserEmpty`], e.g. auth was enabled after the client
    /// found it disabled; Go's client refreshes on it too when it has credentials).
    pub fn is_auth_token_error(&self) -> bool {
        matches!(
            self.inner.kind,
            ErrorKind::InvalidAuthToken | ErrorKind::AuthOldRevision | ErrorKind::UserEmpty
        )
    }

    /// True when the same request may succeed if tried again (possibly on another member):
    /// transport failures and transient server conditions (no leader, leader changed, timeouts,
    /// throttling, stopping).
    ///
    /// Note that a *mutation* that failed with a retryable error may still have been applied;
    /// this predicate says nothing about idempotence.
    pub fn is_retryable(&self) -> bool {
        use ErrorKind::*;
        matches!(
            self.inner.kind,
            Unavailable
                | NoLeader
                | LeaderChanged
                | NotCapable
                | Stopped
                | Timeout
                | Unhealthy
                | TooManyRequests
                | NotSupportedForLearner
        )
    }

    /// Classify a gRPC status the way etcd's Go client does: by the server's message first,
    /// then by the status code.
    pub(crate) fn from_status(status: tonic::Status) -> Self {
        let code = status.code();
        let msg = status.message();
        let unsent = never_sent(&status);
        let kind = kind_from_message(msg).unwrap_or_else(|| {
            if unsent {
                ErrorKind::Unavailable
            } else {
                kind_from_code(code, msg)
            }
        });
        Error {
            inner: Box::new(Inner {
                kind,
                message: msg.to_owned(),
                grpc_code: Some(code as i32),
                compact_revision: None,
                maybe_sent: !unsent,
                source: Some(Box::new(status)),
                endpoint: None,
                endpoint_errors: Vec::new(),
            }),
        }
    }
}

/// True when the status says the request never left the client: the transport could not
/// connect, the connection was gone before the request was written, or the server refused
/// the stream (REFUSED_STREAM, or a GOAWAY that left it unprocessed).
fn never_sent(status: &tonic::Status) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    while let Some(e) = cur {
        if let Some(t) = e.downcast_ref::<crate::transport::TransportError>() {
            return t.never_sent();
        }
        cur = e.source();
    }
    false
}

/// The server's `etcdserver: ...` messages (as sent by etcd 3.4-3.6) mapped to kinds.
fn kind_from_message(msg: &str) -> Option<ErrorKind> {
    use ErrorKind::*;
    // The election service's own errors carry no "etcdserver: " prefix.
    match msg {
        "election: not leader" => return Some(ElectionNotLeader),
        // Go's context errors, returned as they are (code Unknown) by handlers such as the
        // lock and election services when the request's grpc-timeout expired on the server
        // or the request was canceled. The server's deadline is the client's plus the
        // request's flight time, so its answer can still beat the client's own timer.
        "context deadline exceeded" => return Some(Deadline),
        "context canceled" => return Some(Canceled),
        _ => {}
    }
    // Some server paths (the maintenance service's permission check, the auth store) send the
    // auth package's errors untranslated, as "auth: ..." with code Unknown.
    if let Some(rest) = msg.strip_prefix("auth: ") {
        return kind_from_auth_message(rest);
    }
    let rest = msg.strip_prefix("etcdserver: ")?;
    let kind = match rest {
        "key is not provided" => EmptyKey,
        "key not found" => KeyNotFound,
        "value is provided" => ValueProvided,
        "lease is provided" => LeaseProvided,
        "too many operations in txn request" => TooManyOps,
        "duplicate key given in txn request" => DuplicateKey,
        "invalid sort option" => InvalidSortOption,
        "mvcc: required revision has been compacted" => Compacted,
        "mvcc: required revision is a future revision" => FutureRevision,
        "mvcc: database space exceeded" => NoSpace,
        "requested lease not found" => LeaseNotFound,
        "lease already exists" => LeaseExist,
        "too large lease TTL" => TtlTooLarge,
        "watch canceled" => WatchCanceled,
        "member ID already exist" => MemberExist,
        "Peer URLs already exists" => PeerUrlExist,
        "re-configuration failed due to not enough started members" => MemberNotEnoughStarted,
        "given member URLs are invalid" => MemberBadUrls,
        "member not found" => MemberNotFound,
        "can only promote a learner member" => MemberNotLearner,
        "can only promote a learner member which is in sync with leader" => LearnerNotReady,
        "too many learner members in cluster" => TooManyLearners,
        "cluster ID mismatch" => ClusterIdMismatch,
        "request is too large" => RequestTooLarge,
        "too many requests" => TooManyRequests,
        "root user does not exist" => RootUserNotExist,
        "root user does not have root role" => RootRoleNotExist,
        "user name already exists" => UserAlreadyExist,
        "user name is empty" => UserEmpty,
        "user name not found" => UserNotFound,
        "role name already exists" => RoleAlreadyExist,
        "role name not found" => RoleNotFound,
        "role name is empty" => RoleEmpty,
        "authentication failed, invalid user ID or password" => AuthFailed,
        "permission not given" => PermissionNotGiven,
        "permission denied" => PermissionDenied,
        "role is not granted to the user" => RoleNotGranted,
        "permission is not granted to the role" => PermissionNotGranted,
        "authentication is not enabled" => AuthNotEnabled,
        "invalid auth token" => InvalidAuthToken,
        "invalid auth management" => InvalidAuthMgmt,
        "revision of auth store is old" => AuthOldRevision,
        "no leader" => NoLeader,
        "not leader" => NotLeader,
        "leader changed" => LeaderChanged,
        "not capable" => NotCapable,
        "server stopped" => Stopped,
        "request timed out"
        | "request timed out, possibly due to previous leader failure"
        | "request timed out, possibly due to connection lost"
        | "request timed out, waiting for the applied index took too long" => Timeout,
        "unhealthy cluster" => Unhealthy,
        "corrupt cluster" => Corrupt,
        "rpc not supported for learner" => NotSupportedForLearner,
        "bad leader transferee" => BadLeaderTransferee,
        "wrong downgrade target version format" => WrongDowngradeVersionFormat,
        "invalid downgrade target version" => InvalidDowngradeTargetVersion,
        "cluster version not found during downgrade" => ClusterVersionUnavailable,
        "cluster has a downgrade job in progress" => DowngradeInProcess,
        "no inflight downgrade job" => NoInflightDowngrade,
        "request canceled" => Canceled,
        "context deadline exceeded" => Deadline,
        _ => return None,
    };
    Some(kind)
}

/// The etcd auth package's own messages (`auth: ...`), as some server paths send them.
fn kind_from_auth_message(rest: &str) -> Option<ErrorKind> {
    use ErrorKind::*;
    let kind = match rest {
        "root user does not exist" => RootUserNotExist,
        "root user does not have root role" => RootRoleNotExist,
        "user already exists" => UserAlreadyExist,
        "user name is empty" => UserEmpty,
        "user not found" => UserNotFound,
        "role already exists" => RoleAlreadyExist,
        "role not found" => RoleNotFound,
        "role name is empty" => RoleEmpty,
        "permission not given" => PermissionNotGiven,
        "authentication failed, invalid user ID or password"
        | "authentication failed, password was given for no password user" => AuthFailed,
        "permission denied" => PermissionDenied,
        "role is not granted to the user" => RoleNotGranted,
        "permission is not granted to the role" => PermissionNotGranted,
        "authentication is not enabled" => AuthNotEnabled,
        "revision in header is old" => AuthOldRevision,
        "invalid auth token" => InvalidAuthToken,
        "invalid auth management" => InvalidAuthMgmt,
        _ => return None,
    };
    Some(kind)
}

fn kind_from_code(code: tonic::Code, msg: &str) -> ErrorKind {
    use tonic::Code;
    match code {
        Code::Unavailable => ErrorKind::Unavailable,
        Code::DeadlineExceeded => ErrorKind::Deadline,
        // tonic reports its own enforcement of the request's grpc-timeout this way.
        Code::Cancelled if msg == "Timeout expired" => ErrorKind::Deadline,
        Code::Cancelled => ErrorKind::Canceled,
        Code::Unimplemented => ErrorKind::Unimplemented,
        Code::PermissionDenied => ErrorKind::PermissionDenied,
        Code::Unauthenticated => ErrorKind::InvalidAuthToken,
        // gRPC's own size limit ("message larger than max") on either side.
        Code::ResourceExhausted if msg.contains("larger than max") => ErrorKind::RequestTooLarge,
        // The client's own encoding limit (ours and tonic's): never sent.
        Code::OutOfRange if msg.contains("encoded message length too large") => {
            ErrorKind::RequestTooLarge
        }
        Code::ResourceExhausted => ErrorKind::TooManyRequests,
        Code::InvalidArgument => ErrorKind::InvalidArgument,
        Code::Internal if msg.contains("decode") => ErrorKind::Protocol,
        // Transport failures reported as Unknown (by other transports under raw clients).
        Code::Unknown if msg.contains("transport error") || msg.contains("connection") => {
            ErrorKind::Unavailable
        }
        _ => ErrorKind::Other,
    }
}

impl From<tonic::Status> for Error {
    fn from(status: tonic::Status) -> Self {
        Error::from_status(status)
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Error");
        d.field("kind", &self.inner.kind);
        if !self.inner.message.is_empty() {
            d.field("message", &self.inner.message);
        }
        if let Some(code) = self.inner.grpc_code {
            d.field("grpc_code", &code);
        }
        if let Some(rev) = self.inner.compact_revision {
            d.field("compact_revision", &rev);
        }
        if let Some(ep) = &self.inner.endpoint {
            d.field("endpoint", ep);
        }
        if self.inner.maybe_sent {
            d.field("maybe_sent", &true);
        }
        if !self.inner.endpoint_errors.is_empty() {
            d.field("endpoint_errors", &self.inner.endpoint_errors);
        }
        if let Some(src) = &self.inner.source {
            d.field("source", src);
        }
        d.finish()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = self.inner.kind.as_str();
        if self.inner.message.is_empty() {
            f.write_str(kind)
        } else if self.inner.message.contains(kind) {
            // The message already says it (e.g. "etcdserver: key not found").
            f.write_str(&self.inner.message)
        } else {
            write!(f, "{}: {}", self.inner.kind, self.inner.message)
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.inner
            .source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_server_messages() {
        let cases = [
            (
                tonic::Code::InvalidArgument,
                "etcdserver: key is not provided",
                ErrorKind::EmptyKey,
            ),
            (
                tonic::Code::OutOfRange,
                "etcdserver: mvcc: required revision has been compacted",
                ErrorKind::Compacted,
            ),
            (
                tonic::Code::OutOfRange,
                "etcdserver: mvcc: required revision is a future revision",
                ErrorKind::FutureRevision,
            ),
            (
                tonic::Code::InvalidArgument,
                "etcdserver: duplicate key given in txn request",
                ErrorKind::DuplicateKey,
            ),
            (
                tonic::Code::Unavailable,
                "etcdserver: no leader",
                ErrorKind::NoLeader,
            ),
            (
                tonic::Code::Unauthenticated,
                "etcdserver: invalid auth token",
                ErrorKind::InvalidAuthToken,
            ),
            (
                tonic::Code::Unavailable,
                "connection refused",
                ErrorKind::Unavailable,
            ),
            (
                tonic::Code::ResourceExhausted,
                "trying to send message larger than max (10 vs. 5)",
                ErrorKind::RequestTooLarge,
            ),
            (
                tonic::Code::OutOfRange,
                "Error, encoded message length too large: found 9 bytes, the limit is: 5 bytes",
                ErrorKind::RequestTooLarge,
            ),
            (tonic::Code::Internal, "something odd", ErrorKind::Other),
            (
                tonic::Code::Cancelled,
                "Timeout expired",
                ErrorKind::Deadline,
            ),
            (
                tonic::Code::Unknown,
                "auth: invalid auth token",
                ErrorKind::InvalidAuthToken,
            ),
            (
                tonic::Code::Unknown,
                "auth: user name is empty",
                ErrorKind::UserEmpty,
            ),
            (
                tonic::Code::Unknown,
                "election: not leader",
                ErrorKind::ElectionNotLeader,
            ),
            (
                tonic::Code::Unknown,
                "context deadline exceeded",
                ErrorKind::Deadline,
            ),
            (
                tonic::Code::Unknown,
                "context canceled",
                ErrorKind::Canceled,
            ),
        ];
        for (code, msg, kind) in cases {
            let e = Error::from_status(tonic::Status::new(code, msg));
            assert_eq!(e.kind(), kind, "{msg}");
            assert_eq!(e.message(), msg);
            assert_eq!(e.grpc_code(), Some(code as i32));
            assert!(std::error::Error::source(&e).is_some());
        }
    }

    #[test]
    fn retryable_classification() {
        assert!(Error::new(ErrorKind::Unavailable, "").is_retryable());
        assert!(Error::new(ErrorKind::LeaderChanged, "").is_retryable());
        assert!(!Error::new(ErrorKind::Compacted, "").is_retryable());
        assert!(!Error::new(ErrorKind::PermissionDenied, "").is_retryable());
        let e = Error::new(ErrorKind::Compacted, "x").with_compact_revision(7);
        assert!(e.is_compacted());
        assert_eq!(e.compact_revision(), Some(7));
        assert_eq!(e.to_string(), "required revision has been compacted: x");
        let e = Error::new(ErrorKind::EmptyKey, "key is not provided");
        assert_eq!(e.to_string(), "key is not provided");
    }

    #[test]
    fn a_member_stopping_after_the_proposal_leaves_the_outcome_unknown() {
        // etcd answers "server stopped" also when it stops with the request already
        // proposed: the write may still commit.
        let e = Error::from_status(tonic::Status::unavailable("etcdserver: server stopped"));
        assert_eq!(e.kind(), ErrorKind::Stopped);
        assert!(e.is_indeterminate());
        assert!(!e.maybe_sent(false).is_indeterminate());
        assert!(
            !Error::new(ErrorKind::PermissionDenied, "")
                .maybe_sent(true)
                .is_indeterminate()
        );
    }
}
