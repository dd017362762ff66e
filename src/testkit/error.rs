//! The error type of the test kit.

use std::path::PathBuf;
use std::time::Duration;

/// An error of the test kit: etcd could not be found, started, signalled or
/// reached, or a proxy could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TestkitError {
    /// No etcd binary was found.
    #[error(
        "no etcd binary found ({searched}); run scripts/install-etcd.sh from the \
         etcdv3 repository to install etcd 3.5.1 and 3.4.23, or set ETCD_BIN to an etcd binary"
    )]
    BinaryNotFound {
        /// Where the search looked.
        searched: String,
    },

    /// `etcd --version` failed or printed something unexpected.
    #[error("could not determine the version of {}: {detail}", binary.display())]
    Version {
        /// The binary that was asked.
        binary: PathBuf,
        /// What went wrong, with the output when there was some.
        detail: String,
    },

    /// An I/O operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// The cluster's configuration is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),

    /// A member index is out of range.
    #[error("no member {index}: the cluster has {count} member(s)")]
    NoSuchMember {
        /// The index asked for.
        index: usize,
        /// The number of members.
        count: usize,
    },

    /// The operation needs a running member process, and there is none.
    #[error("member {index} is not running")]
    NotRunning {
        /// The member's index.
        index: usize,
    },

    /// A member's process exited while it was expected to run.
    #[error("member {index} exited unexpectedly ({status}); log tail:\n{log_tail}")]
    Exited {
        /// The member's index.
        index: usize,
        /// The exit status, as text.
        status: String,
        /// The end of the member's log.
        log_tail: String,
    },

    /// A member did not become healthy in time.
    #[error(
        "member {index} ({endpoint}) was not healthy after {timeout:?} (last check: {last}); \
         log tail:\n{log_tail}"
    )]
    Unhealthy {
        /// The member's index.
        index: usize,
        /// The member's client URL.
        endpoint: String,
        /// How long it was waited for.
        timeout: Duration,
        /// The outcome of the last health check.
        last: String,
        /// The end of the member's log.
        log_tail: String,
    },

    /// A port picked for a member is served by another process (it was taken between being
    /// picked and the member binding it): what answered the health check was not the member.
    #[error("member {index}: {addr} is served by another process, not the member")]
    PortTaken {
        /// The member's index.
        index: usize,
        /// The address.
        addr: std::net::SocketAddr,
    },

    /// The cluster's leader could not be determined in time.
    #[error("no leader found after {timeout:?}: {detail}")]
    NoLeader {
        /// How long it was waited for.
        timeout: Duration,
        /// The outcome of the last attempt.
        detail: String,
    },
}

impl TestkitError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }
}
