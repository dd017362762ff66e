//! The namespaced view: every operation touches only prefixed keys.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{client, etcd, wait_until};
use etcdv3::{Compare, CompareOp, EventKind, Op, Session, TxnOpResponse};

const NS: &str = "/apps/x/";

async fn all_keys(c: &etcdv3::Client) -> Vec<String> {
    let r = c.kv().get_all().keys_only().await.unwrap();
    r.kvs
        .iter()
        .map(|kv| kv.key_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_stays_inside_the_namespace() {
    let etcd = etcd().await;
    let raw = client(&etcd).await;
    // Neighbours that must never be touched or seen.
    raw.kv().put("/apps/w", "before").await.unwrap();
    raw.kv()
        .put("/apps/x", "the prefix without slash")
        .await
        .unwrap();
    raw.kv().put("/apps/y/z", "after").await.unwrap();
    raw.kv().put("\u{0}low", "low").await.unwrap();

    let ns = raw.with_namespace(NS);
    let kv = ns.kv();

    // Watch the whole namespace from now.
    let mut w = ns.watch("").prefix().prev_kv().await.unwrap();

    // Put/get/prefix/range/from-key/get_all.
    let p = kv.put("a", "1").await.unwrap();
    kv.put("b/1", "2").await.unwrap();
    kv.put("b/2", "3").await.unwrap();
    let prev = kv.put("a", "1b").prev_kv().await.unwrap();
    assert_eq!(prev.prev_kv.unwrap().key().as_ref(), b"a");
    let g = kv.get("a").await.unwrap();
    assert_eq!(g.kvs[0].key().as_ref(), b"a");
    assert_eq!(g.kvs[0].value_str().unwrap(), "1b");
    let b = kv.get("b/").prefix().await.unwrap();
    assert_eq!(b.kvs.len(), 2);
    assert_eq!(b.kvs[0].key().as_ref(), b"b/1");
    let all = kv.get_all().await.unwrap();
    let keys: Vec<&[u8]> = all.kvs.iter().map(|kv| kv.key().as_ref()).collect();
    assert_eq!(keys, [&b"a"[..], b"b/1", b"b/2"]);
    let from = kv.get("b").from_key().await.unwrap();
    assert_eq!(from.kvs.len(), 2, "from-key stops at the namespace's end");
    let range = kv.get("a").range("b/2").await.unwrap();
    assert_eq!(range.kvs.len(), 2);
    let every = kv.get("").prefix().count_only().await.unwrap();
    assert_eq!(every.count, 3);

    // Txn: compares, ops, nested txn, answers stripped.
    let t = kv
        .txn()
        .when([
            Compare::value("a", CompareOp::Equal, "1b"),
            Compare::version("b/", CompareOp::Greater, 0).with_prefix(),
        ])
        .and_then([
            Op::from(Op::put("c", "4")),
            Op::from(Op::get("b/").prefix()),
            Op::from(
                Op::txn()
                    .when([Compare::create_revision("a", CompareOp::Greater, 0)])
                    .and_then([Op::get("c")]),
            ),
        ])
        .await
        .unwrap();
    assert!(t.succeeded);
    match &t.responses[1] {
        TxnOpResponse::Get(g) => assert_eq!(g.kvs[1].key().as_ref(), b"b/2"),
        other => panic!("{other:?}"),
    }
    let nested = t.responses[2].as_txn().unwrap();
    assert!(nested.succeeded);
    assert_eq!(
        nested.responses[0].as_get().unwrap().kvs[0].key().as_ref(),
        b"c"
    );

    // Lease-attached key; time_to_live keys are relative.
    let lease = ns.lease().grant(30).await.unwrap();
    kv.put("leased", "x").lease(lease.id).await.unwrap();
    let ttl = ns.lease().time_to_live(lease.id).keys().await.unwrap();
    assert_eq!(ttl.keys, vec![bytes::Bytes::from_static(b"leased")]);

    // Delete with prev_kv, range delete.
    let d = kv.delete("b/").prefix().prev_kv().await.unwrap();
    assert_eq!(d.deleted, 2);
    assert_eq!(d.prev_kvs[0].key().as_ref(), b"b/1");

    // Watch saw every change, keys stripped.
    let mut seen = Vec::new();
    while seen.len() < 8 {
        let batch = tokio::time::timeout(Duration::from_secs(5), w.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        for ev in batch.events() {
            let k = ev.kv.key_str().unwrap().to_owned();
            if let Some(p) = &ev.prev_kv {
                assert_eq!(p.key_str().unwrap(), k);
            }
            seen.push((ev.kind, k));
        }
    }
    assert_eq!(seen[0], (EventKind::Put, "a".to_owned()));
    assert_eq!(seen[0].1, "a");
    assert!(seen.contains(&(EventKind::Delete, "b/2".to_owned())));
    assert!(p.header.revision > 0);

    // Recipes inside the namespace.
    let s = Session::new(&raw).ttl(10).await.unwrap();
    let m = ns.mutex(&s, "lock");
    m.lock().await.unwrap();
    assert!(m.key().starts_with(b"lock/"));
    let guarded = kv
        .txn()
        .when([m.is_owner()])
        .and_then([Op::put("guarded", "yes")])
        .await
        .unwrap();
    assert!(guarded.succeeded);
    let s2 = Session::new(&raw).ttl(10).await.unwrap();
    let m2 = ns.mutex(&s2, "lock");
    assert_eq!(
        m2.try_lock().await.unwrap_err().kind(),
        etcdv3::ErrorKind::Locked
    );
    m.unlock().await.unwrap();

    let e = Arc::new(ns.election(&s, "elect"));
    let mut obs = e.observe();
    e.campaign("leader-1").await.unwrap();
    let leader = e.leader().await.unwrap().unwrap();
    assert!(leader.key().starts_with(b"elect/"));
    let observed = tokio::time::timeout(Duration::from_secs(5), obs.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(observed.key(), leader.key());
    assert_eq!(observed.value_str().unwrap(), "leader-1");

    ns.stm(|tx| async move {
        let a = tx.get_str("a").await?.unwrap();
        tx.put("stm", format!("{a}+"));
        Ok(())
    })
    .await
    .unwrap();
    assert_eq!(
        kv.get("stm").await.unwrap().kvs[0].value_str().unwrap(),
        "1b+"
    );

    // The un-namespaced view: every key written above is under the prefix; neighbours intact.
    let keys = all_keys(&raw).await;
    let outside: Vec<&String> = keys.iter().filter(|k| !k.starts_with(NS)).collect();
    assert_eq!(
        outside,
        ["\u{0}low", "/apps/w", "/apps/x", "/apps/y/z"]
            .iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>()
            .iter()
            .collect::<Vec<_>>()
    );
    for k in ["a", "c", "leased", "guarded", "stm"] {
        assert!(
            keys.contains(&format!("{NS}{k}")),
            "{k} missing in {keys:?}"
        );
    }
    assert!(keys.iter().any(|k| k.starts_with(&format!("{NS}elect/"))));
    assert_eq!(
        raw.kv().get("/apps/w").await.unwrap().kvs[0]
            .value_str()
            .unwrap(),
        "before"
    );

    // A namespaced delete of everything leaves the neighbours alone.
    e.resign().await.unwrap();
    drop(obs);
    let d = kv.delete("").prefix().await.unwrap();
    assert!(d.deleted >= 5);
    wait_until(Duration::from_secs(5), "namespace empty", || {
        let raw = raw.clone();
        async move { all_keys(&raw).await.iter().all(|k| !k.starts_with(NS)) }
    })
    .await;
    assert_eq!(all_keys(&raw).await.len(), 4);
}

#[tokio::test]
async fn namespaced_watch_passes_created_notify_fragment_and_require_leader_through() {
    let etcd = etcd().await;
    let raw = client(&etcd).await;
    let ns = raw.with_namespace(NS);
    let mut w = ns
        .watch("k")
        .created_notify()
        .fragment()
        .require_leader(false)
        .await
        .unwrap();
    let first = tokio::time::timeout(Duration::from_secs(10), w.next())
        .await
        .expect("the creation notice within 10 s")
        .expect("open")
        .unwrap();
    assert!(first.is_created(), "created_notify reached the server");
    ns.kv().put("k", "v").await.unwrap();
    let batch = tokio::time::timeout(Duration::from_secs(10), w.next())
        .await
        .expect("an event within 10 s")
        .expect("open")
        .unwrap();
    assert_eq!(batch.events()[0].kv.key().as_ref(), b"k");
}
