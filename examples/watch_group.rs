//! Many watchers read from one task: a `WatchGroup` of one watcher per service instance key,
//! plus one on a whole prefix, read in runs, with one member removed on the way.
//!
//! ```text
//! cargo run --example watch_group                     # starts etcd itself (scripts/install-etcd.sh installs it)
//! cargo run --example watch_group -- 127.0.0.1:2379   # or use a running etcd
//! ```

use std::collections::HashMap;
use std::time::Duration;

use etcdv3::testkit::EtcdCluster;
use etcdv3::{Client, WatchGroup};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (endpoints, _cluster) = EtcdCluster::builder().endpoints_or_start(args).await?;
    let client = Client::builder(endpoints)
        .request_timeout(Duration::from_secs(5))
        .connect()
        .await?;

    // 100 members, created together (their creations are pipelined on the client's one
    // Watch stream), and one more on the whole prefix with previous values.
    let group = WatchGroup::new();
    let keys: Vec<String> = (0..100)
        .map(|i| format!("/demo/instances/{i:03}"))
        .collect();
    let ids =
        futures::future::try_join_all(keys.iter().map(|k| group.add(client.watch(k.as_str()))))
            .await?;
    let names: HashMap<u64, &str> = ids
        .iter()
        .copied()
        .zip(keys.iter().map(String::as_str))
        .collect();
    let all = group
        .add(client.watch("/demo/instances/").prefix().prev_kv())
        .await?;
    println!("{} members", group.len());

    // Stop watching the first instance: its member is cancelled on the server.
    group.remove(ids[0]);
    let mut group = group;

    let kv = client.kv();
    for k in keys.iter().take(10) {
        kv.put(k.as_str(), "up").await?;
    }
    // Ten writes: nine reach their own member, all ten the prefix member.
    let mut per_key = 0;
    let mut on_prefix = 0;
    let mut run = Vec::new();
    while per_key + on_prefix < 19 {
        run.clear();
        if group.next_many(&mut run, 64).await == 0 {
            break;
        }
        for (id, batch) in run.drain(..) {
            let batch = batch?;
            if id == all {
                on_prefix += batch.len();
            } else {
                per_key += batch.len();
                println!("{} changed at revision {}", names[&id], batch.revision());
            }
        }
    }
    println!("{per_key} events on their own members, {on_prefix} on the prefix member");
    assert_eq!((per_key, on_prefix), (9, 10));

    // Closing the client ends every member with an error item; then the group ends.
    client.close().await;
    let mut ended = 0;
    while let Some((_, item)) = group.next().await {
        if item.is_err() {
            ended += 1;
        }
    }
    println!("{ended} members ended with the client");
    Ok(())
}
