//! Test helpers that run **real** etcd servers (feature `testkit`).
//!
//! This module is what the crate's own test-suite uses, and it is public so that
//! applications built on this crate can test against real etcd too. It does not
//! depend on the rest of the crate: only on `std`, `tokio`, `tempfile`, `nix` and
//! `thiserror`.
//!
//! # Finding etcd
//!
//! [`find_etcd_binary`] looks at the `ETCD_BIN` environment variable, then for
//! `etcd` on `PATH`, then for `/usr/bin/etcd`. The repository's
//! `scripts/install-etcd.sh` installs etcd 3.5.1 and 3.4.23 (the versions the
//! test-suite runs against). Point `ETCD_BIN` at one of them to choose it.
//!
//! # Clusters
//!
//! [`EtcdCluster`] starts one or more etcd members on free loopback ports
//! (`127.0.0.1`), with their data directories in a temporary directory (under
//! `/dev/shm` when possible), and waits until every member reports itself healthy.
//! It can kill, pause (`SIGSTOP`), resume and restart members to inject faults.
//! Dropping it kills every member, reaps it and removes the temporary directory,
//! also when a test panics, so no etcd process is left behind.
//!
//! ```no_run
//! # fn main() -> Result<(), etcdv3::testkit::TestkitError> {
//! use etcdv3::testkit::EtcdCluster;
//!
//! let cluster = EtcdCluster::builder().members(3).start()?;
//! let endpoints = cluster.endpoints(); // ["http://127.0.0.1:PORT", ...]
//! cluster.kill(0)?;
//! cluster.restart(0)?; // same data dir and ports, waits until healthy
//! # drop(endpoints);
//! # Ok(())
//! # }
//! ```
//!
//! # Network faults
//!
//! [`FaultProxy`] is a TCP proxy on a loopback port that forwards to one etcd
//! member and can be switched at run time between passing traffic, holding it
//! (blackhole, in one or both directions), delaying it, and cutting connections,
//! including "cut right after the next request reached the server".
//!
//! ```no_run
//! # async fn demo() -> Result<(), etcdv3::testkit::TestkitError> {
//! use etcdv3::testkit::{EtcdCluster, FaultProxy};
//!
//! let cluster = EtcdCluster::builder().start_async().await?;
//! let proxy = FaultProxy::start(cluster.client_addr(0)).await?;
//! let endpoint = proxy.endpoint(); // connect the client under test here
//! proxy.blackhole();
//! // ... the client must time out ...
//! proxy.pass();
//! # drop(endpoint);
//! # Ok(())
//! # }
//! ```

mod certs;
mod error;
mod etcd;
mod http;
mod proxy;

pub use certs::TestCerts;
pub use error::TestkitError;
pub use etcd::{EtcdCluster, EtcdClusterBuilder, etcd_version, find_etcd_binary};
pub use http::{check_health, check_health_async};
pub use proxy::{Direction, FaultProxy};
