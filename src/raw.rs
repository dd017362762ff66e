//! Low-level access: the generated gRPC clients and protocol messages.
//!
//! Everything else in this crate hides prost and tonic behind its own types; this module is the
//! one deliberate exception, for callers who need an RPC or field the typed API does not cover
//! yet. Get the clients from [`Client::raw`](crate::Client::raw): they share the client's
//! connection, but requests made through them skip the client's validation, deadlines and auth
//! token handling (attach a `token` metadata entry yourself when auth is on).

use crate::client::Config;
pub use crate::proto::{authpb, etcdserverpb, mvccpb, v3electionpb, v3lockpb};
pub use crate::transport::{Channel, RecvBody};

/// The generated gRPC client of every etcd service, sharing one connection.
#[derive(Debug, Clone)]
pub struct RawClients {
    channel: Channel,
    max_encoding: usize,
}

macro_rules! raw_client {
    ($(#[$doc:meta])* $name:ident => $ty:ty, $new:path) => {
        $(#[$doc])*
        pub fn $name(&self) -> $ty {
            $new(self.channel.clone())
                .max_decoding_message_size(usize::MAX)
                .max_encoding_message_size(self.max_encoding)
        }
    };
}

impl RawClients {
    pub(crate) fn new(channel: Channel, cfg: &Config) -> Self {
        RawClients {
            channel,
            max_encoding: cfg.max_encoding_bytes(),
        }
    }

    raw_client!(
        /// The `etcdserverpb.KV` service.
        kv => etcdserverpb::kv_client::KvClient<Channel>, etcdserverpb::kv_client::KvClient::new);
    raw_client!(
        /// The `etcdserverpb.Watch` service.
        watch => etcdserverpb::watch_client::WatchClient<Channel>, etcdserverpb::watch_client::WatchClient::new);
    raw_client!(
        /// The `etcdserverpb.Lease` service.
        lease => etcdserverpb::lease_client::LeaseClient<Channel>, etcdserverpb::lease_client::LeaseClient::new);
    raw_client!(
        /// The `etcdserverpb.Cluster` service.
        cluster => etcdserverpb::cluster_client::ClusterClient<Channel>, etcdserverpb::cluster_client::ClusterClient::new);
    raw_client!(
        /// The `etcdserverpb.Maintenance` service.
        maintenance => etcdserverpb::maintenance_client::MaintenanceClient<Channel>, etcdserverpb::maintenance_client::MaintenanceClient::new);
    raw_client!(
        /// The `etcdserverpb.Auth` service.
        auth => etcdserverpb::auth_client::AuthClient<Channel>, etcdserverpb::auth_client::AuthClient::new);
    raw_client!(
        /// The `v3lockpb.Lock` service.
        lock => v3lockpb::lock_client::LockClient<Channel>, v3lockpb::lock_client::LockClient::new);
    raw_client!(
        /// The `v3electionpb.Election` service.
        election => v3electionpb::election_client::ElectionClient<Channel>, v3electionpb::election_client::ElectionClient::new);
}
