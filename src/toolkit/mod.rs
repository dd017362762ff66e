//! The application toolkit (feature `toolkit`): what application teams build on etcd every
//! day, sharing one [`Client`] and one key prefix so many applications can share a cluster.
//!
//! - **Config source** ([`ConfigSource`]): configuration values under
//!   `<prefix>/config/<name>/`, one key per dotted path (`db.pool.size`), values as JSON text;
//!   read into a [`serde_json::Value`] tree or a user type, written atomically, watched as a
//!   stream of new typed configs. Hybrid mode takes a local file (JSON; YAML and TOML with
//!   the feature `toolkit-files`) as the base and overlays the etcd values key by key.
//! - **Service registry** ([`Toolkit::register`]): a [`ServiceInfo`] stored as JSON under
//!   `<prefix>/services/<name>/<id>` on a kept lease, re-registered when the lease is lost.
//! - **Discovery** ([`Toolkit::discover`], [`Toolkit::watch_service`], [`ServiceCache`]).
//! - **Mirror** ([`Mirror`]): a local copy of a key prefix, kept in sync.
//!
//! ```no_run
//! # async fn demo(client: etcdv3::Client) -> Result<(), etcdv3::toolkit::ToolkitError> {
//! use std::time::Duration;
//! use etcdv3::toolkit::ServiceInfo;
//!
//! let tk = client.toolkit().prefix("/apps/shop");
//! tk.validate()?;
//! let reg = tk
//!     .register(ServiceInfo::new("billing", "billing-1", "127.0.0.1:8080"))
//!     .ttl(Duration::from_secs(15))
//!     .await?;
//! let peers = tk.discover("billing").await?;
//! assert!(peers.iter().any(|p| p.id == "billing-1"));
//! reg.deregister().await?;
//! # Ok(()) }
//! ```
//!
//! Locks and elections at the toolkit level are not part of this module yet.

mod config;
mod coordination;
mod discovery;
mod mirror;
mod registry;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::client::Client;
use crate::error::Error;

pub use config::{ConfigSource, ConfigUpdate, ConfigWatch};
pub use coordination::{Leadership, ToolkitLock};
pub use discovery::{ServiceCache, ServiceEvent, ServiceWatch};
pub use mirror::{Mirror, MirrorBuilder};
pub use registry::{
    DEFAULT_SERVICE_TTL, MIN_SERVICE_TTL, Register, Registration, RegistrationEvent,
    RegistrationEvents, ServiceInfo,
};

/// The default key prefix of a [`Toolkit`].
pub const DEFAULT_PREFIX: &str = "/etcdv3";

/// The errors of the toolkit: etcd's own, plus typed validation, decoding and file errors.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum ToolkitError {
    /// An error from etcd or the client (see [`Error::kind`]).
    #[error(transparent)]
    Etcd(#[from] Error),
    /// The key prefix is unusable.
    #[error("invalid key prefix {prefix:?}: {reason}")]
    InvalidPrefix {
        /// The prefix.
        prefix: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A config or service name is unusable (it contains `/`).
    #[error("invalid name {name:?}: {reason}")]
    InvalidName {
        /// The name.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A service's name is empty.
    #[error("the service name is empty")]
    EmptyName,
    /// A service's id is empty.
    #[error("the service id is empty")]
    EmptyId,
    /// A service's address is empty.
    #[error("the service address is empty")]
    EmptyAddress,
    /// A TTL below [`MIN_SERVICE_TTL`].
    #[error("TTL {ttl:?} is below the minimum of 1 s")]
    InvalidTtl {
        /// The TTL asked for.
        ttl: Duration,
    },
    /// A dotted config path is unusable (empty, an empty segment, or a `/`).
    #[error("invalid config path {path:?}: {reason}")]
    InvalidPath {
        /// The path.
        path: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A value stored in etcd is not valid JSON (or not UTF-8).
    #[error("the value of {key} is not valid JSON: {reason}")]
    InvalidValue {
        /// The offending etcd key.
        key: String,
        /// The parser's complaint.
        reason: String,
    },
    /// The config tree does not fit the requested type.
    #[error("the config does not fit the requested type: {reason}")]
    Decode {
        /// The deserializer's complaint.
        reason: String,
    },
    /// A value could not be encoded as JSON.
    #[error("the value cannot be encoded as JSON: {reason}")]
    Encode {
        /// The serializer's complaint.
        reason: String,
    },
    /// The base config file could not be read or parsed.
    #[error("config file {}: {reason}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
}

impl ToolkitError {
    /// A copy of this error (sources of etcd errors are summarized).
    pub(crate) fn duplicate(&self) -> ToolkitError {
        use ToolkitError as E;
        match self {
            E::Etcd(e) => E::Etcd(e.summary()),
            E::InvalidPrefix { prefix, reason } => E::InvalidPrefix {
                prefix: prefix.clone(),
                reason,
            },
            E::InvalidName { name, reason } => E::InvalidName {
                name: name.clone(),
                reason,
            },
            E::EmptyName => E::EmptyName,
            E::EmptyId => E::EmptyId,
            E::EmptyAddress => E::EmptyAddress,
            E::InvalidTtl { ttl } => E::InvalidTtl { ttl: *ttl },
            E::InvalidPath { path, reason } => E::InvalidPath {
                path: path.clone(),
                reason,
            },
            E::InvalidValue { key, reason } => E::InvalidValue {
                key: key.clone(),
                reason: reason.clone(),
            },
            E::Decode { reason } => E::Decode {
                reason: reason.clone(),
            },
            E::Encode { reason } => E::Encode {
                reason: reason.clone(),
            },
            E::File { path, reason } => E::File {
                path: path.clone(),
                reason: reason.clone(),
            },
        }
    }
}

/// The result type of the toolkit.
pub type ToolkitResult<T> = std::result::Result<T, ToolkitError>;

impl Client {
    /// The application toolkit on this client, with the default prefix [`DEFAULT_PREFIX`].
    pub fn toolkit(&self) -> Toolkit {
        Toolkit::new(self.clone())
    }
}

/// A [`Client`] and a key prefix shared by the toolkit's capabilities. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Toolkit {
    client: Client,
    prefix: Arc<str>,
}

impl Toolkit {
    /// A toolkit on `client` with the default prefix [`DEFAULT_PREFIX`].
    pub fn new(client: Client) -> Self {
        Toolkit {
            client,
            prefix: Arc::from(DEFAULT_PREFIX),
        }
    }

    /// Use `prefix` as the key namespace (e.g. `/apps/myapp`). A trailing `/` is ignored;
    /// [`validate`](Self::validate) checks the rest (every operation does too).
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        let mut p: String = prefix.into();
        while p.len() > 1 && p.ends_with('/') {
            p.pop();
        }
        self.prefix = Arc::from(p);
        self
    }

    /// The key prefix.
    pub fn key_prefix(&self) -> &str {
        &self.prefix
    }

    /// The client.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Check the configuration: the prefix must be non-empty, start with `/` and be more
    /// than just `/`.
    pub fn validate(&self) -> ToolkitResult<()> {
        let bad = |reason| {
            Err(ToolkitError::InvalidPrefix {
                prefix: self.prefix.to_string(),
                reason,
            })
        };
        if self.prefix.is_empty() {
            return bad("it is empty");
        }
        if !self.prefix.starts_with('/') {
            return bad("it must start with '/'");
        }
        if &*self.prefix == "/" {
            return bad("it must name a namespace below '/'");
        }
        Ok(())
    }

    /// `<prefix>/<section>/<name>/`, after validating the prefix and the name.
    fn section_key(&self, section: &str, name: &str) -> ToolkitResult<String> {
        self.validate()?;
        validate_name(name)?;
        Ok(format!("{}/{section}/{name}/", self.prefix))
    }
}

/// A name used as one key segment: non-empty, without `/`.
fn validate_name(name: &str) -> ToolkitResult<()> {
    let bad = |reason| {
        Err(ToolkitError::InvalidName {
            name: name.to_owned(),
            reason,
        })
    };
    if name.is_empty() {
        return bad("it is empty");
    }
    if name.contains('/') {
        return bad("it must not contain '/'");
    }
    Ok(())
}

/// Back-off with jitter for retry loops: 100 ms doubling up to 2 s.
fn backoff(attempt: u32) -> Duration {
    use rand::Rng;
    let base = 100u64.saturating_mul(1 << attempt.min(5)).min(2000);
    let jitter = rand::rng().random_range(0..=base / 2);
    Duration::from_millis(base / 2 + jitter)
}
