//! Code generated from `proto/` by build.rs: the etcd v3 wire protocol.
//!
//! The only module where prost/tonic types are defined. It is private; the deliberate escape
//! hatch for low-level use is [`crate::raw`], which re-exports it.

#![allow(
    missing_docs,
    unreachable_pub,
    clippy::all,
    clippy::pedantic,
    rustdoc::all
)]

/// Multi-version concurrency control types: key-value pairs and watch events.
pub mod mvccpb {
    tonic::include_proto!("mvccpb");
}

/// Users, roles and permissions.
pub mod authpb {
    tonic::include_proto!("authpb");
}

/// The main etcd v3 services: KV, Watch, Lease, Cluster, Maintenance, Auth.
pub mod etcdserverpb {
    tonic::include_proto!("etcdserverpb");
}

/// The server-side lock service.
pub mod v3lockpb {
    tonic::include_proto!("v3lockpb");
}

/// The server-side election service.
pub mod v3electionpb {
    tonic::include_proto!("v3electionpb");
}
