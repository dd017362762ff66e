//! A distributed lock with fencing, end to end against a throwaway local etcd.
//!
//! ```text
//! cargo run --example mutex                     # starts etcd itself
//! cargo run --example mutex -- 127.0.0.1:2379   # or use a running etcd
//! ```
//!
//! Four workers on four clients increment a shared counter under one lock, guarding each
//! write with the lock's `is_owner()` compare; then a `try_lock` under contention.

use std::time::Duration;

use etcdv3::testkit::EtcdCluster;
use etcdv3::{Client, ErrorKind, Mutex, Op, Session};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // The endpoints given on the command line, or a throwaway etcd started now.
    let (endpoints, _cluster) = EtcdCluster::builder().endpoints_or_start(args).await?;

    let mut workers = Vec::new();
    for w in 0..4 {
        let client = Client::builder(endpoints.clone())
            .request_timeout(Duration::from_secs(5))
            .connect()
            .await?;
        workers.push(tokio::spawn(async move {
            let session = Session::new(&client).ttl(10).await?;
            let lock = Mutex::new(&session, "/demo/locks/counter");
            for _ in 0..5 {
                lock.lock().await?;
                let fence = lock.fencing_revision().unwrap_or_default();
                let cur = client.kv().get("/demo/counter").await?;
                let n: u64 = match cur.kvs.first() {
                    Some(kv) => kv.value_str()?.parse().unwrap_or(0),
                    None => 0,
                };
                // The write only applies while the lock key is still ours.
                let r = client
                    .kv()
                    .txn()
                    .when([lock.is_owner()])
                    .and_then([Op::put("/demo/counter", (n + 1).to_string())])
                    .await?;
                println!(
                    "worker {w}: fence {fence}, counter {n} -> {} ({})",
                    n + 1,
                    r.succeeded
                );
                lock.unlock().await?;
            }
            session.close().await?;
            Ok::<_, etcdv3::Error>(())
        }));
    }
    for w in workers {
        w.await??;
    }

    let client = Client::connect(endpoints).await?;
    let counter = client.kv().get("/demo/counter").await?;
    println!("final counter: {}", counter.kvs[0].value_str()?);

    let a = Session::new(&client).ttl(10).await?;
    let b = Session::new(&client).ttl(10).await?;
    let la = Mutex::new(&a, "/demo/locks/try");
    let lb = Mutex::new(&b, "/demo/locks/try");
    la.lock().await?;
    match lb.try_lock().await {
        Err(e) if e.kind() == ErrorKind::Locked => println!("try_lock: {e}"),
        other => println!("try_lock: unexpected {other:?}"),
    }
    la.unlock().await?;
    Ok(())
}
