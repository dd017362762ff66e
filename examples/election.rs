//! Leader election end to end against a throwaway local etcd.
//!
//! ```text
//! cargo run --example election                     # starts etcd itself
//! cargo run --example election -- 127.0.0.1:2379   # or use a running etcd
//! ```
//!
//! Three candidates campaign; an observer prints every leader value; each leader proclaims a
//! new value, then resigns, handing over to the next one.

use std::sync::Arc;
use std::time::Duration;

use etcdv3::testkit::EtcdCluster;
use etcdv3::{Client, Election, Session};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // The endpoints given on the command line, or a throwaway etcd started now.
    let (endpoints, _cluster) = EtcdCluster::builder().endpoints_or_start(args).await?;
    let client = Client::builder(endpoints)
        .request_timeout(Duration::from_secs(5))
        .connect()
        .await?;

    let watcher = Session::new(&client).ttl(10).await?;
    let mut observer = Election::new(&watcher, "/demo/election").observe();
    let printer = tokio::spawn(async move {
        for _ in 0..6 {
            match observer.next().await {
                Some(Ok(kv)) => println!("observed leader {} = {}", kv.key_str()?, kv.value_str()?),
                Some(Err(e)) => return Err(e),
                None => break,
            }
        }
        Ok::<_, etcdv3::Error>(())
    });

    let mut candidates = Vec::new();
    for name in ["alpha", "beta", "gamma"] {
        let session = Session::new(&client).ttl(10).await?;
        let election = Arc::new(Election::new(&session, "/demo/election"));
        candidates.push(tokio::spawn(async move {
            election.campaign(name).await?;
            println!("{name} is leader");
            election.proclaim(format!("{name}: ready")).await?;
            tokio::time::sleep(Duration::from_millis(200)).await;
            election.resign().await?;
            println!("{name} resigned");
            session.close().await?;
            Ok::<_, etcdv3::Error>(())
        }));
    }
    for c in candidates {
        c.await??;
    }
    printer.await??;
    Ok(())
}
