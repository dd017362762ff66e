//! etcd's server-side lock and election services against a throwaway local etcd.
//!
//! ```text
//! cargo run --example lock_service                     # starts etcd itself
//! cargo run --example lock_service -- 127.0.0.1:2379   # or use a running etcd
//! ```
//!
//! Two workers contend for one lock; then two candidates run an election while an observer
//! follows the leadership. The server does not keep the leases alive: here they are granted
//! with a TTL long enough for the demo (a real program keeps them alive with the lease keeper,
//! `client.lease().keep_alive(id)`, for as long as it holds the lock or leads).

use std::future::IntoFuture;
use std::time::{Duration, Instant};

use etcdv3::Client;
use etcdv3::raw::etcdserverpb::LeaseGrantRequest;
use etcdv3::testkit::EtcdCluster;
use futures::StreamExt;

async fn grant(client: &Client, ttl: i64) -> Result<i64, Box<dyn std::error::Error>> {
    let resp = client
        .raw()?
        .lease()
        .lease_grant(LeaseGrantRequest { ttl, id: 0 })
        .await?;
    Ok(resp.into_inner().id)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // The endpoints given on the command line, or a throwaway etcd started now.
    let (endpoints, _cluster) = EtcdCluster::builder().endpoints_or_start(args).await?;
    let client = Client::builder(endpoints)
        .request_timeout(Duration::from_secs(30))
        .connect()
        .await?;

    // ---- lock: two workers, one lock
    let start = Instant::now();
    let mut workers = Vec::new();
    for worker in 0..2 {
        let client = client.clone();
        workers.push(tokio::spawn(async move {
            let lease = grant(&client, 30).await.map_err(|e| e.to_string())?;
            let locks = client.lock_service();
            let lock = locks
                .lock("/demo/locks/report", lease)
                .await
                .map_err(|e| e.to_string())?;
            println!(
                "[{:>5} ms] worker {worker} holds {}",
                start.elapsed().as_millis(),
                String::from_utf8_lossy(lock.key())
            );
            // Before acting on the lock, make sure it is still ours.
            assert!(lock.is_held().await.map_err(|e| e.to_string())?);
            tokio::time::sleep(Duration::from_millis(300)).await;
            lock.unlock().await.map_err(|e| e.to_string())?;
            println!(
                "[{:>5} ms] worker {worker} released it",
                start.elapsed().as_millis()
            );
            Ok::<_, String>(())
        }));
    }
    for w in workers {
        w.await??;
    }

    // ---- election: two candidates and an observer
    let elections = client.election_service();
    let mut observer = elections.observe("/demo/election");
    let observing = tokio::spawn(async move {
        // Every leadership change, until node-b leads.
        while let Some(seen) = observer.next().await {
            let seen = seen.map_err(|e| e.to_string())?;
            let value = seen.kv.value_str().map_err(|e| e.to_string())?.to_owned();
            println!("observer: leader value {value:?}");
            if value == "node-b" {
                break;
            }
        }
        Ok::<_, String>(())
    });
    let la = grant(&client, 30).await?;
    let lb = grant(&client, 30).await?;
    let a = elections
        .campaign("/demo/election", la, "node-a")
        .await?
        .leader;
    println!("node-a leads (revision {})", a.revision);
    let waiting = tokio::spawn(
        client
            .election_service()
            .campaign("/demo/election", lb, "node-b")
            .into_future(),
    );
    elections.proclaim(&a, "node-a: busy").await?;
    elections.resign(&a).await?;
    let b = waiting.await??.leader;
    println!(
        "node-b leads after node-a resigned (revision {})",
        b.revision
    );
    observing.await??;
    elections.resign(&b).await?;
    let leader = elections.leader("/demo/election").await?;
    println!("after both resigned, leader: {:?}", leader.map(|l| l.kv));
    Ok(())
}
