//! Leases end to end against a throwaway local etcd.
//!
//! ```text
//! cargo run --example lease                     # starts etcd itself (scripts/install-etcd.sh installs it)
//! cargo run --example lease -- 127.0.0.1:2379   # or use a running etcd
//! ```
//!
//! Grants a lease and inspects it, keeps a lease alive while a key attached to it serves as a
//! "service registration", watches for the loss of the lease, and shows what a revoke, an
//! expired lease and `revoke_on_drop` look like.

use std::time::Duration;

use etcdv3::testkit::EtcdCluster;
use etcdv3::{Client, ErrorKind, LeaseLost};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The endpoints given on the command line, or a throwaway etcd started now.
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (endpoints, _cluster) = EtcdCluster::builder().endpoints_or_start(args).await?;
    let client = Client::builder(endpoints)
        .request_timeout(Duration::from_secs(5))
        .connect()
        .await?;
    let lease = client.lease();
    let kv = client.kv();

    // One-shot calls: grant, attach a key, inspect, list, refresh once, revoke.
    let granted = lease.grant(60).await?;
    println!("granted lease {:x} with TTL {} s", granted.id, granted.ttl);
    kv.put("/demo/lock-holder", "me").lease(granted.id).await?;
    let info = lease.time_to_live(granted.id).keys().await?;
    println!(
        "lease {:x}: {} s left of {} s, keys {:?}",
        info.id,
        info.ttl,
        info.granted_ttl,
        info.keys
            .iter()
            .map(|k| String::from_utf8_lossy(k))
            .collect::<Vec<_>>()
    );
    println!("leases on the server: {:x?}", lease.leases().await?.leases);
    let refreshed = lease.keep_alive_once(granted.id).await?;
    println!("refreshed once: TTL {} s again", refreshed.ttl);
    lease.revoke(granted.id).await?;
    println!(
        "revoked: key still there? {}",
        kv.get("/demo/lock-holder").await?.count == 1
    );
    match lease.revoke(granted.id).await {
        Err(e) if e.kind() == ErrorKind::LeaseNotFound => println!("revoking again: {e}"),
        other => println!("unexpected: {other:?}"),
    }

    // Keep a lease alive: the client's keeper refreshes it every ~TTL/3 on one stream shared
    // by every kept lease, and tells us if it is lost.
    let kept = lease.grant(3).keep_alive().await?;
    kv.put("/demo/services/api", "10.0.0.1:8080")
        .lease(kept.id())
        .await?;
    println!(
        "keeping lease {:x} (TTL {} s) with /demo/services/api attached",
        kept.id(),
        kept.ttl()
    );
    let mut status = kept.watch();
    for _ in 0..4 {
        status.changed().await?;
        let s = *status.borrow();
        println!(
            "  refreshed: TTL {} s, certainly alive for {:?} more",
            s.ttl,
            s.deadline
                .saturating_duration_since(std::time::Instant::now())
        );
    }

    // Someone revokes it: the owner hears of it (from this client at once; from another client
    // with the next refresh).
    let lost = kept.lost();
    lease.revoke(kept.id()).await?;
    let reason = lost.await;
    assert_eq!(reason, LeaseLost::Revoked);
    println!(
        "lease lost: {reason:?}; service key still there? {}",
        kv.get("/demo/services/api").await?.count == 1
    );

    // revoke_on_drop: dropping the handle revokes the lease (and deletes its keys) at once.
    let kept = lease.grant(60).keep_alive().revoke_on_drop().await?;
    let id = kept.id();
    kv.put("/demo/ephemeral", "x").lease(id).await?;
    drop(kept);
    for _ in 0..50 {
        if !lease.time_to_live(id).await?.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "after dropping a revoke_on_drop handle: lease exists? {}, key exists? {}",
        lease.time_to_live(id).await?.exists(),
        kv.get("/demo/ephemeral").await?.count == 1
    );

    client.close().await;
    Ok(())
}
