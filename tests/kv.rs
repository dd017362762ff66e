//! The KV API against a real etcd: every option asserted on the server's answer.

mod common;

use common::{client, etcd};
use etcdv3::{Compare, CompareOp, ErrorKind, Op, SortOrder, SortTarget, TxnOpResponse};

fn keys(resp: &etcdv3::GetResponse) -> Vec<String> {
    resp.kvs
        .iter()
        .map(|kv| kv.key_str().unwrap().to_owned())
        .collect()
}

fn values(resp: &etcdv3::GetResponse) -> Vec<String> {
    resp.kvs
        .iter()
        .map(|kv| kv.value_str().unwrap().to_owned())
        .collect()
}

async fn grant_lease(c: &etcdv3::Client, ttl: i64) -> i64 {
    let mut lease = c.raw().unwrap().lease();
    lease
        .lease_grant(etcdv3::raw::etcdserverpb::LeaseGrantRequest { ttl, id: 0 })
        .await
        .unwrap()
        .into_inner()
        .id
}

#[tokio::test]
async fn put_then_get_single_key_with_metadata() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let kv = c.kv();

    let put = kv.put("k", "v1").await.unwrap();
    assert!(put.header.revision >= 2);
    assert_ne!(put.header.cluster_id, 0);
    assert_ne!(put.header.member_id, 0);
    assert!(put.header.raft_term >= 1);
    assert!(put.prev_kv.is_none());

    let got = kv.get("k").await.unwrap();
    assert_eq!(got.count, 1);
    assert!(!got.more);
    let item = got.first().unwrap();
    assert_eq!(item.key_str().unwrap(), "k");
    assert_eq!(item.value_str().unwrap(), "v1");
    assert_eq!(item.create_revision(), put.header.revision);
    assert_eq!(item.mod_revision(), put.header.revision);
    assert_eq!(item.version(), 1);
    assert_eq!(item.lease(), 0);
    assert_eq!(got.header.revision, put.header.revision);

    let put2 = kv.put("k", "v2").await.unwrap();
    assert_eq!(put2.header.revision, put.header.revision + 1);
    let got = kv.get("k").await.unwrap();
    let item = got.first().unwrap();
    assert_eq!(item.value().as_ref(), b"v2");
    assert_eq!(item.version(), 2);
    assert_eq!(item.create_revision(), put.header.revision);
    assert_eq!(item.mod_revision(), put2.header.revision);

    // Missing key: empty answer, not an error.
    let none = kv.get("nope").await.unwrap();
    assert!(none.kvs.is_empty());
    assert_eq!(none.count, 0);

    // Binary keys and values round-trip.
    kv.put(vec![0u8, 159, 146, 150], &[1u8, 2, 255])
        .await
        .unwrap();
    let bin = kv.get(&[0u8, 159, 146, 150]).await.unwrap();
    assert_eq!(bin.kvs[0].value().as_ref(), &[1u8, 2, 255]);
    assert!(bin.kvs[0].key_str().is_err());
}

#[tokio::test]
async fn get_prefix_from_key_range_and_all() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let kv = c.kv();
    for k in ["a", "a/1", "a/2", "b", "c"] {
        kv.put(k, format!("v-{k}")).await.unwrap();
    }
    assert_eq!(keys(&kv.get("a/").prefix().await.unwrap()), ["a/1", "a/2"]);
    assert_eq!(
        keys(&kv.get("a").prefix().await.unwrap()),
        ["a", "a/1", "a/2"]
    );
    assert_eq!(keys(&kv.get("b").from_key().await.unwrap()), ["b", "c"]);
    assert_eq!(
        keys(&kv.get("a").range("b").await.unwrap()),
        ["a", "a/1", "a/2"]
    );
    assert_eq!(keys(&kv.get("a/2").range("c").await.unwrap()), ["a/2", "b"]);
    assert_eq!(
        keys(&kv.get_all().await.unwrap()),
        ["a", "a/1", "a/2", "b", "c"]
    );
    // An empty key with prefix() means every key, as in Go's client.
    assert_eq!(kv.get("").prefix().count_only().await.unwrap().count, 5);
    assert_eq!(values(&kv.get("c").await.unwrap()), ["v-c"]);
}

#[tokio::test]
async fn limit_more_count_keys_only_count_only() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let kv = c.kv();
    for i in 0..10 {
        kv.put(format!("p/{i}"), format!("value-{i}"))
            .await
            .unwrap();
    }
    let r = kv.get("p/").prefix().limit(3).await.unwrap();
    assert_eq!(keys(&r), ["p/0", "p/1", "p/2"]);
    assert!(r.more);
    assert_eq!(r.count, 10);

    let r = kv.get("p/").prefix().limit(10).await.unwrap();
    assert!(!r.more);
    assert_eq!(r.kvs.len(), 10);

    let r = kv.get("p/").prefix().keys_only().await.unwrap();
    assert_eq!(r.kvs.len(), 10);
    assert!(r.kvs.iter().all(|kv| kv.value().is_empty()));
    assert_eq!(r.kvs[3].key_str().unwrap(), "p/3");
    assert_eq!(r.kvs[3].version(), 1);

    let r = kv.get("p/").prefix().count_only().await.unwrap();
    assert!(r.kvs.is_empty());
    assert_eq!(r.count, 10);
}

#[tokio::test]
async fn read_at_revision_and_serializable() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let kv = c.kv();
    let r1 = kv.put("k", "one").await.unwrap().header.revision;
    let r2 = kv.put("k", "two").await.unwrap().header.revision;
    kv.put("k", "three").await.unwrap();
    assert_eq!(values(&kv.get("k").revision(r1).await.unwrap()), ["one"]);
    assert_eq!(values(&kv.get("k").revision(r2).await.unwrap()), ["two"]);
    assert_eq!(values(&kv.get("k").await.unwrap()), ["three"]);
    // Before the key existed.
    assert!(kv.get("k").revision(r1 - 1).await.unwrap().kvs.is_empty());

    let s = kv.get("k").serializable().await.unwrap();
    assert_eq!(values(&s), ["three"]);
    let s = kv.get("k").serializable().revision(r2).await.unwrap();
    assert_eq!(values(&s), ["two"]);
}

#[tokio::test]
async fn sort_by_every_target_and_order() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let kv = c.kv();
    // Created in the order c, a, b; values sort as b < c < a; versions a=3, b=1, c=2.
    kv.put("s/c", "2").await.unwrap();
    kv.put("s/a", "3").await.unwrap();
    kv.put("s/b", "1").await.unwrap();
    kv.put("s/a", "3").await.unwrap();
    kv.put("s/c", "2").await.unwrap();
    kv.put("s/a", "3").await.unwrap();
    let get = |t, o| kv.get("s/").prefix().sort(t, o);

    assert_eq!(
        keys(&get(SortTarget::Key, SortOrder::Ascend).await.unwrap()),
        ["s/a", "s/b", "s/c"]
    );
    assert_eq!(
        keys(&get(SortTarget::Key, SortOrder::Descend).await.unwrap()),
        ["s/c", "s/b", "s/a"]
    );
    assert_eq!(
        keys(&get(SortTarget::Value, SortOrder::Ascend).await.unwrap()),
        ["s/b", "s/c", "s/a"]
    );
    assert_eq!(
        keys(&get(SortTarget::Value, SortOrder::Descend).await.unwrap()),
        ["s/a", "s/c", "s/b"]
    );
    assert_eq!(
        keys(&get(SortTarget::Create, SortOrder::Ascend).await.unwrap()),
        ["s/c", "s/a", "s/b"]
    );
    assert_eq!(
        keys(&get(SortTarget::Create, SortOrder::Descend).await.unwrap()),
        ["s/b", "s/a", "s/c"]
    );
    // Last modified: b (rev 4) < c (rev 6) < a (rev 7).
    assert_eq!(
        keys(&get(SortTarget::Mod, SortOrder::Ascend).await.unwrap()),
        ["s/b", "s/c", "s/a"]
    );
    assert_eq!(
        keys(&get(SortTarget::Mod, SortOrder::Descend).await.unwrap()),
        ["s/a", "s/c", "s/b"]
    );
    assert_eq!(
        keys(&get(SortTarget::Version, SortOrder::Ascend).await.unwrap()),
        ["s/b", "s/c", "s/a"]
    );
    assert_eq!(
        keys(&get(SortTarget::Version, SortOrder::Descend).await.unwrap()),
        ["s/a", "s/c", "s/b"]
    );
    // Sorted and limited: the top one by version.
    let top = get(SortTarget::Version, SortOrder::Descend)
        .limit(1)
        .await
        .unwrap();
    assert_eq!(keys(&top), ["s/a"]);
    assert_eq!(top.kvs[0].version(), 3);
}

#[tokio::test]
async fn mod_and_create_revision_filters() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let kv = c.kv();
    let ra = kv.put("f/a", "1").await.unwrap().header.revision;
    let rb = kv.put("f/b", "1").await.unwrap().header.revision;
    let rc = kv.put("f/c", "1").await.unwrap().header.revision;
    let ra2 = kv.put("f/a", "2").await.unwrap().header.revision; // a: create ra, mod ra2
    assert!(ra < rb && rb < rc && rc < ra2);
    let g = || kv.get("f/").prefix();

    assert_eq!(
        keys(&g().min_mod_revision(rc).await.unwrap()),
        ["f/a", "f/c"]
    );
    assert_eq!(
        keys(&g().max_mod_revision(rc).await.unwrap()),
        ["f/b", "f/c"]
    );
    assert_eq!(
        keys(&g().min_create_revision(rb).await.unwrap()),
        ["f/b", "f/c"]
    );
    assert_eq!(
        keys(&g().max_create_revision(rb).await.unwrap()),
        ["f/a", "f/b"]
    );
    assert_eq!(
        keys(&g().min_mod_revision(rb).max_mod_revision(rc).await.unwrap()),
        ["f/b", "f/c"]
    );
}

#[tokio::test]
async fn put_with_lease_prev_kv_ignore_value_ignore_lease() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let kv = c.kv();
    let lease1 = grant_lease(&c, 60).await;
    let lease2 = grant_lease(&c, 60).await;

    kv.put("l", "v1").lease(lease1).await.unwrap();
    assert_eq!(kv.get("l").await.unwrap().kvs[0].lease(), lease1);

    let prev = kv.put("l", "v2").lease(lease1).prev_kv().await.unwrap();
    let p = prev.prev_kv.expect("prev_kv");
    assert_eq!(p.value_str().unwrap(), "v1");
    assert_eq!(p.lease(), lease1);
    // No prev_kv asked: none returned.
    assert!(
        kv.put("l", "v2")
            .lease(lease1)
            .await
            .unwrap()
            .prev_kv
            .is_none()
    );

    // ignore_value: keep the value, move the key to lease2.
    kv.put("l", "").ignore_value().lease(lease2).await.unwrap();
    let got = kv.get("l").await.unwrap();
    assert_eq!(got.kvs[0].value_str().unwrap(), "v2");
    assert_eq!(got.kvs[0].lease(), lease2);

    // ignore_lease: new value, the lease stays lease2.
    kv.put("l", "v3").ignore_lease().await.unwrap();
    let got = kv.get("l").await.unwrap();
    assert_eq!(got.kvs[0].value_str().unwrap(), "v3");
    assert_eq!(got.kvs[0].lease(), lease2);

    // A put without a lease detaches the key from its lease.
    kv.put("l", "v4").await.unwrap();
    assert_eq!(kv.get("l").await.unwrap().kvs[0].lease(), 0);

    // Server errors for these flags.
    let e = kv.put("missing", "").ignore_value().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::KeyNotFound, "{e}");
    let e = kv.put("missing", "x").ignore_lease().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::KeyNotFound, "{e}");
    let e = kv.put("l", "x").lease(0x7777_7777).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::LeaseNotFound, "{e}");

    // Client-side rejections, same kinds as the server's.
    let e = kv.put("l", "x").ignore_value().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ValueProvided);
    let e = kv
        .put("l", "x")
        .ignore_lease()
        .lease(lease1)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::LeaseProvided);
}

#[tokio::test]
async fn server_rejects_flag_conflicts_with_the_same_kinds() {
    // Sent through the raw client (no client-side validation): the server's answer maps to the
    // same kinds the client-side validation uses.
    let etcd = etcd().await;
    let c = client(&etcd).await;
    c.kv().put("k", "v").await.unwrap();
    let mut raw = c.raw().unwrap().kv();
    use etcdv3::raw::etcdserverpb::{PutRequest, RangeRequest};
    let err = |s: tonic::Status| etcdv3::Error::from(s).kind();
    let e = raw
        .put(PutRequest {
            key: "k".into(),
            value: "x".into(),
            ignore_value: true,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err(e), ErrorKind::ValueProvided);
    let e = raw
        .put(PutRequest {
            key: "k".into(),
            lease: 5,
            ignore_lease: true,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err(e), ErrorKind::LeaseProvided);
    let e = raw
        .put(PutRequest {
            key: "".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err(e), ErrorKind::EmptyKey);
    let e = raw
        .range(RangeRequest {
            key: "".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err(e), ErrorKind::EmptyKey);
}

#[tokio::test]
async fn delete_single_prefix_range_from_key_with_prev_kv() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let kv = c.kv();
    for k in ["d/a", "d/b", "d/c", "d/d", "e/a", "e/b", "x"] {
        kv.put(k, k).await.unwrap();
    }
    let r = kv.delete("d/a").await.unwrap();
    assert_eq!(r.deleted, 1);
    assert!(r.prev_kvs.is_empty());
    assert_eq!(kv.delete("d/a").await.unwrap().deleted, 0);

    let r = kv.delete("d/b").range("d/d").prev_kv().await.unwrap();
    assert_eq!(r.deleted, 2);
    let gone: Vec<_> = r
        .prev_kvs
        .iter()
        .map(|k| k.value_str().unwrap().to_owned())
        .collect();
    assert_eq!(gone, ["d/b", "d/c"]);

    let r = kv.delete("e/").prefix().prev_kv().await.unwrap();
    assert_eq!(r.deleted, 2);
    assert_eq!(r.prev_kvs.len(), 2);

    let r = kv.delete("d/d").from_key().await.unwrap(); // d/d and x
    assert_eq!(r.deleted, 2);
    assert_eq!(kv.get_all().count_only().await.unwrap().count, 0);
}

#[tokio::test]
async fn txn_compares_on_every_target_with_every_operator() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let kv = c.kv();
    let lease = grant_lease(&c, 60).await;
    let r1 = kv.put("t", "m").lease(lease).await.unwrap().header.revision; // version 1
    let r2 = kv.put("t", "m").lease(lease).await.unwrap().header.revision; // version 2, create r1, mod r2

    let cases: Vec<(Compare, bool)> = vec![
        (Compare::value("t", CompareOp::Equal, "m"), true),
        (Compare::value("t", CompareOp::Equal, "n"), false),
        (Compare::value("t", CompareOp::Greater, "l"), true),
        (Compare::value("t", CompareOp::Greater, "m"), false),
        (Compare::value("t", CompareOp::Less, "n"), true),
        (Compare::value("t", CompareOp::Less, "m"), false),
        (Compare::value("t", CompareOp::NotEqual, "x"), true),
        (Compare::value("t", CompareOp::NotEqual, "m"), false),
        (Compare::version("t", CompareOp::Equal, 2), true),
        (Compare::version("t", CompareOp::Greater, 1), true),
        (Compare::version("t", CompareOp::Less, 2), false),
        (Compare::version("t", CompareOp::NotEqual, 2), false),
        (Compare::version("absent", CompareOp::Equal, 0), true),
        (Compare::create_revision("t", CompareOp::Equal, r1), true),
        (Compare::create_revision("t", CompareOp::Less, r1), false),
        (
            Compare::create_revision("t", CompareOp::Greater, r1 - 1),
            true,
        ),
        (
            Compare::create_revision("t", CompareOp::NotEqual, r1),
            false,
        ),
        (Compare::mod_revision("t", CompareOp::Equal, r2), true),
        (Compare::mod_revision("t", CompareOp::Less, r2 + 1), true),
        (Compare::mod_revision("t", CompareOp::Greater, r2), false),
        (Compare::mod_revision("t", CompareOp::NotEqual, r1), true),
        (Compare::lease("t", CompareOp::Equal, lease), true),
        (Compare::lease("t", CompareOp::NotEqual, lease), false),
        (Compare::lease("t", CompareOp::Greater, 0), true),
        (Compare::lease("t", CompareOp::Less, lease), false),
    ];
    for (i, (cmp, expect)) in cases.into_iter().enumerate() {
        let r = kv
            .txn()
            .when([cmp.clone()])
            .and_then([Op::get("t")])
            .or_else([Op::get("absent")])
            .await
            .unwrap();
        assert_eq!(r.succeeded, expect, "case {i}: {cmp:?}");
        let g = r.responses[0].as_get().unwrap();
        assert_eq!(g.kvs.len(), usize::from(expect), "case {i}");
    }
}

#[tokio::test]
async fn txn_range_compares_and_branches() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let kv = c.kv();
    for k in ["r/a", "r/b", "r/c"] {
        kv.put(k, "ok").await.unwrap();
    }
    kv.put("s", "other").await.unwrap();
    // Every key under r/ has value "ok".
    let all_ok = Compare::value("r/", CompareOp::Equal, "ok").with_prefix();
    let r = kv
        .txn()
        .when([all_ok.clone()])
        .and_then([Op::put("res", "yes")])
        .await
        .unwrap();
    assert!(r.succeeded);
    kv.put("r/b", "bad").await.unwrap();
    let r = kv
        .txn()
        .when([all_ok])
        .and_then([Op::put("res", "yes2")])
        .or_else([Op::put("res", "no").prev_kv()])
        .await
        .unwrap();
    assert!(!r.succeeded);
    let p = r.responses[0].as_put().unwrap();
    assert_eq!(p.prev_kv.as_ref().unwrap().value_str().unwrap(), "yes");
    // An explicit range compare [r/a, r/b) only sees r/a.
    let r = kv
        .txn()
        .when([Compare::value("r/a", CompareOp::Equal, "ok").with_range("r/b")])
        .await
        .unwrap();
    assert!(r.succeeded);
    assert!(r.responses.is_empty());
    // from-key compare: every key >= "r/" has version >= 1.
    let r = kv
        .txn()
        .when([Compare::version("r/", CompareOp::Greater, 0).with_from_key()])
        .await
        .unwrap();
    assert!(r.succeeded);

    // Several compares: all must hold.
    let r = kv
        .txn()
        .when([
            Compare::value("s", CompareOp::Equal, "other"),
            Compare::value("r/b", CompareOp::Equal, "ok"),
        ])
        .and_then([Op::delete("s")])
        .or_else([Op::delete("r/").prefix().prev_kv(), Op::delete("nothing")])
        .await
        .unwrap();
    assert!(!r.succeeded);
    assert_eq!(r.responses.len(), 2);
    assert_eq!(r.responses[0].as_delete().unwrap().deleted, 3);
    assert_eq!(r.responses[0].as_delete().unwrap().prev_kvs.len(), 3);
    assert_eq!(r.responses[1].as_delete().unwrap().deleted, 0);
    // The txn's writes share one revision.
    let after = kv.get("res").await.unwrap();
    assert!(after.header.revision >= r.header.revision);
}

#[tokio::test]
async fn txn_mixed_ops_and_nested_txn() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let kv = c.kv();
    kv.put("n/x", "1").await.unwrap();
    let r = kv
        .txn()
        .when([Compare::version("n/x", CompareOp::Equal, 1)])
        .and_then([
            Op::from(Op::put("n/y", "2")),
            Op::from(Op::get("n/").prefix()),
            Op::from(
                Op::txn()
                    // Compares of nested txns are evaluated against the state before the
                    // outer txn ran: n/y does not exist yet.
                    .when([Compare::version("n/y", CompareOp::Equal, 0)])
                    .and_then([Op::put("n/z", "3")])
                    .or_else([Op::put("n/z", "never")]),
            ),
            Op::from(Op::delete("n/x").prev_kv()),
        ])
        .await
        .unwrap();
    assert!(r.succeeded);
    assert_eq!(r.responses.len(), 4);
    let rev = r.header.revision;
    match &r.responses[0] {
        TxnOpResponse::Put(p) => assert!(p.prev_kv.is_none()),
        other => panic!("expected put, got {other:?}"),
    }
    // The get inside the txn sees the txn's earlier put.
    let g = r.responses[1].as_get().unwrap();
    assert_eq!(keys(g), ["n/x", "n/y"]);
    let nested = r.responses[2].as_txn().unwrap();
    assert!(nested.succeeded);
    assert_eq!(nested.responses.len(), 1);
    let d = r.responses[3].as_delete().unwrap();
    assert_eq!(d.deleted, 1);
    assert_eq!(d.prev_kvs[0].value_str().unwrap(), "1");

    // All writes of the txn carry its single revision.
    let all = kv.get("n/").prefix().await.unwrap();
    assert_eq!(keys(&all), ["n/y", "n/z"]);
    assert!(all.kvs.iter().all(|kv| kv.mod_revision() == rev));
}

#[tokio::test]
async fn compact_makes_old_revisions_unreadable() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let kv = c.kv();
    let r1 = kv.put("c", "1").await.unwrap().header.revision;
    let r2 = kv.put("c", "2").await.unwrap().header.revision;
    let r3 = kv.put("c", "3").await.unwrap().header.revision;
    kv.compact(r2).physical().await.unwrap();
    let e = kv.get("c").revision(r1).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Compacted, "{e}");
    assert!(e.is_compacted());
    assert!(!e.is_retryable());
    // The compaction revision itself is still readable.
    assert_eq!(values(&kv.get("c").revision(r2).await.unwrap()), ["2"]);
    assert_eq!(values(&kv.get("c").revision(r3).await.unwrap()), ["3"]);
    // Compacting again at or below the compacted revision is itself a Compacted error.
    let e = kv.compact(r1).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Compacted, "{e}");
    // Non-physical compaction works too.
    kv.compact(r3).await.unwrap();
    let e = kv.get("c").revision(r2).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Compacted, "{e}");
    // Compacting past the head is a future revision.
    let e = kv.compact(r3 + 100).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::FutureRevision, "{e}");
}
