//! The KV API end to end against a throwaway local etcd.
//!
//! ```text
//! cargo run --example kv                     # starts etcd itself (scripts/install-etcd.sh installs it)
//! cargo run --example kv -- 127.0.0.1:2379   # or use a running etcd
//! ```
//!
//! Puts, reads (single key, prefix, sorted, at a past revision), a compare-and-swap transaction,
//! a delete with previous values, compaction, and the typed errors of a few mistakes.

use std::time::Duration;

use etcdv3::testkit::EtcdCluster;
use etcdv3::{Client, Compare, CompareOp, ErrorKind, Op, SortOrder, SortTarget};

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

    // Writes: each put returns the revision it created.
    for (name, port) in [("api", 8080), ("web", 8081), ("db", 5432)] {
        let r = kv
            .put(format!("/demo/services/{name}"), port.to_string())
            .await?;
        println!(
            "put /demo/services/{name} = {port} at revision {}",
            r.header.revision
        );
    }

    // A single key, a prefix, sorted by value.
    let api = kv.get("/demo/services/api").await?;
    println!("api -> {}", api.kvs[0].value_str()?);
    let all = kv
        .get("/demo/services/")
        .prefix()
        .sort(SortTarget::Value, SortOrder::Descend)
        .await?;
    for item in &all.kvs {
        println!(
            "  {} = {} (version {})",
            item.key_str()?,
            item.value_str()?,
            item.version()
        );
    }

    // Read the past: the value at an earlier revision.
    let before = kv.put("/demo/services/api", "9090").prev_kv().await?;
    let old_rev = before.header.revision - 1;
    let past = kv.get("/demo/services/api").revision(old_rev).await?;
    println!("api at revision {old_rev} was {}", past.kvs[0].value_str()?);

    // Compare-and-swap: only succeeds if nobody changed the value meanwhile.
    let cas = kv
        .txn()
        .when([Compare::value(
            "/demo/services/api",
            CompareOp::Equal,
            "9090",
        )])
        .and_then([Op::put("/demo/services/api", "9091")])
        .or_else([Op::get("/demo/services/api")])
        .await?;
    println!("compare-and-swap succeeded: {}", cas.succeeded);

    // Delete a prefix, returning what was deleted.
    let del = kv.delete("/demo/services/").prefix().prev_kv().await?;
    println!(
        "deleted {} keys: {:?}",
        del.deleted,
        del.prev_kvs
            .iter()
            .map(|k| k.key_str().unwrap_or("?"))
            .collect::<Vec<_>>()
    );

    // Compact history, then reading the compacted past is a typed error.
    kv.compact(del.header.revision).physical().await?;
    match kv.get("/demo/services/api").revision(old_rev).await {
        Err(e) if e.kind() == ErrorKind::Compacted => println!("as expected after compaction: {e}"),
        other => println!("unexpected: {other:?}"),
    }
    // Client-side validation: an empty key never reaches the server.
    let err = kv.put("", "x").await.unwrap_err();
    println!("empty key: {:?} ({err})", err.kind());

    client.close().await;
    Ok(())
}
