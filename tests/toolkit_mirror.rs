//! The toolkit's mirror against a real etcd: a paginated base snapshot plus watched updates
//! equals a fresh range at the same revision.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{client, etcd, wait_until};
use etcdv3::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[tokio::test]
async fn mirror_equals_a_fresh_range_after_1000_random_writes() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let kv = c.kv();
    // A base larger than one page (page size 7), and neighbours outside the prefix.
    for i in 0..50 {
        kv.put(format!("/m/k{i:03}"), format!("base-{i}"))
            .await
            .unwrap();
    }
    kv.put("/m", "not under /m/").await.unwrap();
    kv.put("/n/k", "outside").await.unwrap();

    let mirror = c.mirror("/m/").page(7).await.unwrap();
    let base_rev = mirror.revision();
    assert_eq!(mirror.len(), 50);
    assert_eq!(mirror.get("/m/k007").unwrap(), Bytes::from("base-7"));
    assert!(mirror.get("/n/k").is_none());
    assert!(mirror.get("/m").is_none());

    // 1,000 random puts and deletes over 80 keys, from 10 concurrent writers, some outside
    // the prefix.
    let mut writers = Vec::new();
    for w in 0..10u64 {
        let kv = kv.clone();
        writers.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(w);
            for n in 0..100 {
                let key = format!("/m/k{:03}", rng.random_range(0..80));
                match rng.random_range(0..10) {
                    0..=5 => {
                        kv.put(key, format!("w{w}-{n}")).await.unwrap();
                    }
                    6..=8 => {
                        kv.delete(key).await.unwrap();
                    }
                    _ => {
                        kv.put(format!("/n/{n}"), "x").await.unwrap();
                    }
                }
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    // A last write under the prefix marks the end.
    let end = kv.put("/m/zz-end", "end").await.unwrap().header.revision;
    assert!(end > base_rev + 500);
    tokio::time::timeout(Duration::from_secs(10), mirror.wait_revision(end))
        .await
        .unwrap()
        .unwrap();

    let (snapshot, rev) = mirror.snapshot();
    assert_eq!(rev, end);
    let fresh = kv.get("/m/").prefix().revision(rev).await.unwrap();
    let want: BTreeMap<Bytes, Bytes> = fresh
        .kvs
        .into_iter()
        .map(|kv| kv.into_key_value())
        .collect();
    assert_eq!(snapshot.len(), want.len());
    assert_eq!(snapshot, want);
    assert_eq!(mirror.len(), want.len());
    assert!(mirror.error().is_none());
}

#[tokio::test]
async fn the_mirror_task_ends_with_the_last_handle() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    // Warm up the watch multiplexer.
    let warm = c.mirror("/warm/").await.unwrap();
    let r = c.kv().put("/warm/a", "1").await.unwrap().header.revision;
    warm.wait_revision(r).await.unwrap();
    let m = tokio::runtime::Handle::current().metrics();
    let baseline = m.num_alive_tasks();
    let mirror = c.mirror("/x/").await.unwrap();
    let clone = mirror.clone();
    assert_eq!(m.num_alive_tasks(), baseline + 1);
    let r = c.kv().put("/x/a", "1").await.unwrap().header.revision;
    clone.wait_revision(r).await.unwrap();
    assert_eq!(mirror.get("/x/a").unwrap(), Bytes::from("1"));
    drop(mirror);
    assert_eq!(clone.len(), 1);
    drop(clone);
    wait_until(Duration::from_secs(5), "the mirror task to end", || {
        let n = m.num_alive_tasks();
        async move { n == baseline }
    })
    .await;
    drop(warm);
}

#[tokio::test]
async fn an_empty_prefix_mirrors_every_key() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    c.kv().put("a", "1").await.unwrap();
    c.kv().put("/z/b", "2").await.unwrap();
    let mirror = c.mirror("").page(1).await.unwrap();
    assert_eq!(mirror.len(), 2);
    assert_eq!(mirror.get("a").unwrap(), Bytes::from("1"));
    c.kv().put("\u{1}low", "3").await.unwrap();
    wait_until(Duration::from_secs(10), "the new key in the mirror", || {
        let ok = mirror.get("\u{1}low") == Some(Bytes::from("3"));
        async move { ok }
    })
    .await;
}

/// A mirror whose watch was refused (its user lost the right to read the prefix) reports the
/// error, and clears it as soon as its watch is back, not only at the next change under the
/// prefix (which may be long in coming).
#[tokio::test]
async fn a_mirror_whose_watch_is_back_reports_no_error() {
    use etcdv3::Permission;
    use etcdv3::testkit::FaultProxy;
    let etcd = common::etcd_with(&[]).await;
    let setup = client(&etcd).await;
    let auth = setup.auth();
    auth.user_add("root", "rootpw").await.unwrap();
    auth.user_grant_role("root", "root").await.unwrap();
    auth.user_add("alice", "alicepw").await.unwrap();
    auth.role_add("reader").await.unwrap();
    auth.role_grant_permission("reader", Permission::read("/m/").prefix())
        .await
        .unwrap();
    auth.user_grant_role("alice", "reader").await.unwrap();
    setup.kv().put("/m/a", "1").await.unwrap();
    auth.enable().await.unwrap();
    let admin = common::user_client(etcd.endpoints(), "root", "rootpw").await;
    let proxy = FaultProxy::start(etcd.client_addr(0)).await.unwrap();
    let c = common::user_client(vec![proxy.endpoint()], "alice", "alicepw").await;
    let mirror = c.mirror("/m/").await.unwrap();
    assert_eq!(mirror.get("/m/a").unwrap(), Bytes::from("1"));
    assert!(mirror.error().is_none());

    // Take the right away and make the watch be created again: etcd refuses it.
    admin
        .auth()
        .role_revoke_permission("reader", "/m/")
        .prefix()
        .await
        .unwrap();
    proxy.cut_all().await;
    wait_until(
        Duration::from_secs(10),
        "the refusal to be reported",
        || {
            let refused = mirror.error().is_some();
            async move { refused }
        },
    )
    .await;

    // Give it back, and write nothing under the prefix: the error goes once the watch is
    // back.
    admin
        .auth()
        .role_grant_permission("reader", Permission::read("/m/").prefix())
        .await
        .unwrap();
    wait_until(Duration::from_secs(10), "the error to be cleared", || {
        let cleared = mirror.error().is_none();
        async move { cleared }
    })
    .await;
    // And the mirror follows changes again.
    let r = admin.kv().put("/m/b", "2").await.unwrap().header.revision;
    tokio::time::timeout(Duration::from_secs(10), mirror.wait_revision(r))
        .await
        .expect("the mirror caught up")
        .unwrap();
    assert_eq!(mirror.get("/m/b").unwrap(), Bytes::from("2"));
}
