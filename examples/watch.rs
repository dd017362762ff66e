//! Watching keys: live changes, history replay, previous values, progress, cancellation and
//! the typed end of a compacted watcher.
//!
//! ```text
//! cargo run --example watch                     # starts etcd itself (scripts/install-etcd.sh installs it)
//! cargo run --example watch -- 127.0.0.1:2379   # or use a running etcd
//! ```

use std::time::Duration;

use etcdv3::testkit::EtcdCluster;
use etcdv3::{Client, ErrorKind, EventKind, Op};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The endpoints given on the command line, or a throwaway etcd started now.
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (endpoints, _cluster) = EtcdCluster::builder().endpoints_or_start(args).await?;
    let client = Client::builder(endpoints)
        .request_timeout(Duration::from_secs(5))
        .connect()
        .await?;
    let kv = client.kv();
    let first = kv.put("/demo/jobs/a", "queued").await?.header.revision;

    // A live watcher on a prefix, with previous values. Awaiting the builder returns once the
    // server created it, so every write from here on is seen.
    let mut live = client
        .watch("/demo/jobs/")
        .prefix()
        .prev_kv()
        .created_notify()
        .await?;
    let created = live.next().await.expect("created notification")?;
    println!(
        "watcher {} created at revision {}",
        live.id(),
        created.revision()
    );

    kv.put("/demo/jobs/a", "running").await?;
    // A transaction's events arrive together, in one batch.
    kv.txn()
        .and_then([
            Op::put("/demo/jobs/b", "queued"),
            Op::put("/demo/jobs/c", "queued"),
        ])
        .await?;
    kv.delete("/demo/jobs/a").await?;

    let mut seen = 0;
    while seen < 4 {
        let batch = live.next().await.expect("watcher ended")?;
        println!("batch at revision {}:", batch.revision());
        for ev in batch.events() {
            seen += 1;
            let before = ev
                .prev_kv
                .as_ref()
                .map(|p| p.value_str().unwrap_or("?").to_owned());
            match ev.kind {
                EventKind::Put => println!(
                    "  put    {} = {} (was {before:?})",
                    ev.kv.key_str()?,
                    ev.kv.value_str()?
                ),
                EventKind::Delete => println!("  delete {} (was {before:?})", ev.kv.key_str()?),
                _ => println!("  other event on {}", ev.kv.key_str()?),
            }
        }
    }

    // Replay history: from an old revision, only deletes.
    let mut replay = client
        .watch("/demo/jobs/")
        .prefix()
        .start_revision(first)
        .no_put()
        .await?;
    let batch = replay.next().await.expect("replay")?;
    for ev in batch.events() {
        println!(
            "replayed: {:?} {} at revision {}",
            ev.kind,
            ev.kv.key_str()?,
            ev.revision()
        );
    }
    replay.cancel().await;
    assert!(replay.next().await.is_none());

    // Progress: how far the store is, without events.
    live.request_progress()?;
    loop {
        let b = live.next().await.expect("progress")?;
        if b.is_progress_notify() {
            println!("progress: the store is at revision {}", b.revision());
            break;
        }
    }

    // A watcher from a compacted revision ends with a typed error.
    let now = kv.put("/demo/other", "x").await?.header.revision;
    kv.compact(now).await?;
    let mut old = client
        .watch("/demo/jobs/")
        .prefix()
        .start_revision(first)
        .await?;
    match old.next().await {
        Some(Err(e)) if e.kind() == ErrorKind::Compacted => println!(
            "as expected: {e} (history starts at {:?})",
            e.compact_revision()
        ),
        other => println!("unexpected: {other:?}"),
    }

    // Dropping a watcher cancels it on the server; closing the client ends all of them.
    drop(live);
    client.close().await;
    Ok(())
}
