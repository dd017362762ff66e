//! Cluster, maintenance and auth administration against a throwaway local etcd cluster.
//!
//! ```text
//! cargo run --example admin                     # starts a 3-member etcd itself
//! cargo run --example admin -- 127.0.0.1:2379   # read-only tour of a running etcd
//! ```
//!
//! With a throwaway cluster it also moves the leader, raises and disarms a NOSPACE alarm, and
//! enables authentication with a read-only user; against your own etcd it only reads (members,
//! per-member status and hashes) and saves a snapshot to a temporary file.

use std::time::Duration;

use etcdv3::testkit::EtcdCluster;
use etcdv3::{AlarmType, Client, ErrorKind, Permission};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let throwaway = args.is_empty();
    // The endpoints given on the command line, or a throwaway etcd started now.
    let (endpoints, _cluster) = EtcdCluster::builder()
        .members(3)
        .endpoints_or_start(args)
        .await?;
    let client = Client::builder(endpoints.clone())
        .request_timeout(Duration::from_secs(10))
        .connect()
        .await?;

    // ---- cluster membership
    let members = client.cluster().member_list().linearizable().await?;
    println!("cluster {:x}:", members.header.cluster_id);
    for m in &members.members {
        println!(
            "  member {:x} {:<4} learner={} peers={:?} clients={:?}",
            m.id, m.name, m.is_learner, m.peer_urls, m.client_urls
        );
    }

    // ---- maintenance, member by member
    let rev = client.kv().get("x").await?.header.revision;
    let mut leader = 0;
    for m in &members.members {
        let Some(url) = m.client_urls.first() else {
            continue;
        };
        let at = client.maintenance_at(url)?;
        let status = at.status().await?;
        let hash = at.hash_kv(rev).await?;
        leader = status.leader;
        println!(
            "  {url}: etcd {}, db {} bytes ({} in use), raft index {}, leader={}, hash_kv@{rev}={:08x}",
            status.version,
            status.db_size,
            status.db_size_in_use,
            status.raft_index,
            status.is_leader(),
            hash.hash
        );
    }

    let dir = std::env::temp_dir().join(format!("etcdv3-admin-example-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let snap = client
        .maintenance()
        .snapshot_to_file(dir.join("snapshot.db"))
        .timeout(Duration::from_secs(60))
        .await?;
    println!(
        "snapshot: {} bytes (database {} + sha256) at {}",
        snap.file_size,
        snap.db_size,
        snap.path.display()
    );
    std::fs::remove_dir_all(&dir)?;

    if !throwaway {
        return Ok(());
    }

    // ---- leader transfer (sent to the leader whichever member the client talks to)
    let target = members
        .members
        .iter()
        .map(|m| m.id)
        .find(|&id| id != leader)
        .ok_or("no follower")?;
    client.maintenance().move_leader(target).await?;
    println!("moved leadership from {leader:x} to {target:x}");

    // ---- alarms
    let me = client.maintenance().status().await?.header.member_id;
    client
        .maintenance()
        .alarm_activate(me, AlarmType::NoSpace)
        .await?;
    let err = client.kv().put("k", "v").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NoSpace);
    println!("with a NOSPACE alarm raised, a put fails: {err}");
    let disarmed = client.maintenance().alarm_disarm_all().await?;
    println!("disarmed {} alarm(s)", disarmed.alarms.len());
    client.kv().put("/config/port", "8080").await?;

    // ---- auth: a root user, a read-only role on a prefix, then enable
    let auth = client.auth();
    auth.user_add("root", "root-pw").await?;
    auth.user_grant_role("root", "root").await?;
    auth.role_add("config-reader").await?;
    auth.role_grant_permission("config-reader", Permission::read("/config/").prefix())
        .await?;
    auth.user_add("app", "app-pw").await?;
    auth.user_grant_role("app", "config-reader").await?;
    auth.enable().await?;
    println!("auth enabled; users: {:?}", {
        let root = Client::builder(endpoints.clone())
            .user("root", "root-pw")
            .connect()
            .await?;
        root.auth().user_list().await?.users
    });

    let app = Client::builder(endpoints.clone())
        .user("app", "app-pw")
        .connect()
        .await?;
    let port = app.kv().get("/config/port").await?;
    println!("app reads /config/port = {}", port.kvs[0].value_str()?);
    let denied = app.kv().put("/config/port", "1").await.unwrap_err();
    println!("app may not write: {denied} ({:?})", denied.kind());
    let wrong = Client::builder(endpoints)
        .user("app", "nope")
        .connect()
        .await
        .unwrap_err();
    println!("wrong password: {wrong} ({:?})", wrong.kind());
    Ok(())
}
