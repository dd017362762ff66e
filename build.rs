//! Compiles our etcd v3 protocol definitions (proto/) into Rust with protox (a pure-Rust
//! protobuf parser, so no system `protoc` is needed) and tonic-prost-build.

use std::error::Error;

const PROTOS: &[&str] = &[
    "mvccpb/kv.proto",
    "authpb/auth.proto",
    "etcdserverpb/rpc.proto",
    "v3lockpb/v3lock.proto",
    "v3electionpb/v3election.proto",
];

fn main() -> Result<(), Box<dyn Error>> {
    for p in PROTOS {
        println!("cargo:rerun-if-changed=proto/{p}");
    }
    let fds = protox::compile(PROTOS, ["proto"])?;
    tonic_prost_build::configure()
        // Every protobuf `bytes` field becomes `bytes::Bytes`: keys and values are sliced out
        // of the receive buffer instead of copied.
        .bytes(".")
        .build_client(true)
        // Our own transport (src/transport.rs) replaces tonic's Channel: no `connect` helpers.
        .build_transport(false)
        // Servers are generated for in-process test/bench servers (e.g. the watch ceiling bench).
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
