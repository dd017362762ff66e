//! `WatchGroup` against a real etcd: members' events tagged with their ids and in order,
//! options per member, a shared buffer that pauses members without losing anything, resume
//! after a cut connection, errors that end one member, removal, and the end of the stream.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{client, etcd, wait_until, watchers_on_server};
use etcdv3::testkit::FaultProxy;
use etcdv3::{Client, ErrorKind, WatchBatch, WatchGroup};

const STEP: Duration = Duration::from_secs(10);

/// The group's next item, failing the test on a timeout or the end of the stream.
async fn next(g: &mut WatchGroup) -> (u64, etcdv3::Result<WatchBatch>) {
    match tokio::time::timeout(STEP, g.next()).await {
        Ok(Some(item)) => item,
        Ok(None) => panic!("the group ended"),
        Err(_) => panic!("no batch within {STEP:?}"),
    }
}

/// Read until `want` events were seen in all; (revision, key) of each, by member.
async fn read_events(g: &mut WatchGroup, want: usize) -> BTreeMap<u64, Vec<(i64, String)>> {
    let mut seen: BTreeMap<u64, Vec<(i64, String)>> = BTreeMap::new();
    let mut n = 0;
    while n < want {
        let (id, batch) = next(g).await;
        let batch = batch.unwrap_or_else(|e| panic!("member {id} failed: {e:?}"));
        for e in batch.events() {
            seen.entry(id)
                .or_default()
                .push((e.revision(), e.kv.key_str().unwrap().to_owned()));
            n += 1;
        }
    }
    seen
}

async fn put(c: &Client, k: &str, v: &str) -> i64 {
    c.kv().put(k, v).await.unwrap().header.revision
}

#[tokio::test]
async fn members_get_their_own_events_in_order_with_their_ids() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let group = WatchGroup::new();
    let (a, p, r) = tokio::try_join!(
        group.add(c.watch("a")),
        group.add(c.watch("p/").prefix()),
        group.add(c.watch("r1").range("r3")),
    )
    .unwrap();
    assert_eq!(group.len(), 3);
    assert!(group.contains(a) && group.contains(p) && group.contains(r));
    let mut group = group;
    let mut want: BTreeMap<u64, Vec<(i64, String)>> = BTreeMap::new();
    for (k, member) in [
        ("a", Some(a)),
        ("p/1", Some(p)),
        ("r1", Some(r)),
        ("ab", None),
        ("p/2", Some(p)),
        ("r2", Some(r)),
        ("r3", None),
        ("a", Some(a)),
    ] {
        let rev = put(&c, k, "v").await;
        if let Some(id) = member {
            want.entry(id).or_default().push((rev, k.to_owned()));
        }
    }
    let seen = read_events(&mut group, 6).await;
    assert_eq!(seen, want);
    // Nothing else: the writes outside every member's range were not delivered.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), group.next())
            .await
            .is_err()
    );
}

#[tokio::test]
async fn member_options_apply_per_member() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let first = put(&c, "h", "1").await;
    put(&c, "h", "2").await;
    let group = WatchGroup::new();
    let history = group
        .add(c.watch("h").start_revision(first).prev_kv())
        .await
        .unwrap();
    let notified = group.add(c.watch("n").created_notify()).await.unwrap();
    let no_put = group.add(c.watch("h").no_put()).await.unwrap();
    let mut group = group;
    // Per member, in order (members' batches interleave in the order they came): the
    // created notification of `notified`, and the history from `first` with prev_kv where the
    // key existed before.
    let mut created = None;
    let mut values = Vec::new();
    while created.is_none() || values.len() < 2 {
        let (id, b) = next(&mut group).await;
        let b = b.unwrap();
        if id == notified {
            assert!(created.is_none(), "one created notification");
            created = Some(b.is_created());
            continue;
        }
        assert_eq!(id, history, "no_put sees no put");
        for e in b.events() {
            let prev = e
                .prev_kv
                .as_ref()
                .map(|p| p.value_str().unwrap().to_owned());
            values.push((e.kv.value_str().unwrap().to_owned(), prev));
        }
    }
    assert_eq!(created, Some(true));
    assert_eq!(
        values,
        [
            ("1".to_owned(), None),
            ("2".to_owned(), Some("1".to_owned()))
        ]
    );
    // A delete reaches `history` and `no_put`; a put only `history`.
    let del = c.kv().delete("h").await.unwrap().header.revision;
    let mut got = BTreeMap::new();
    while got.len() < 2 {
        let (id, b) = next(&mut group).await;
        let b = b.unwrap();
        got.insert(id, b.events()[0].revision());
    }
    assert_eq!(got, BTreeMap::from([(history, del), (no_put, del)]));
}

#[tokio::test]
async fn a_full_buffer_pauses_members_and_loses_nothing() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let writer = client(&etcd).await;
    // Eight members on one key share a buffer of four batches; 20 writes arrive unread.
    let group = WatchGroup::with_buffer(4);
    let mut ids = Vec::new();
    for _ in 0..8 {
        ids.push(group.add(c.watch("k")).await.unwrap());
    }
    let mut revs = Vec::new();
    for i in 0..20 {
        revs.push(put(&writer, "k", &i.to_string()).await);
    }
    let mut group = group;
    let mut seen: BTreeMap<u64, Vec<i64>> = BTreeMap::new();
    let mut n = 0;
    while n < 8 * 20 {
        let (id, b) = next(&mut group).await;
        for e in b.unwrap().events() {
            seen.entry(id).or_default().push(e.revision());
            n += 1;
        }
    }
    for id in &ids {
        assert_eq!(seen[id], revs, "member {id}: every revision once, in order");
    }
    assert!(
        c.watch_stats().pauses > 0,
        "the shared buffer paused members"
    );
}

#[tokio::test]
async fn members_resume_after_a_cut_connection() {
    let etcd = etcd().await;
    let proxy = FaultProxy::start(etcd.client_addr(0)).await.unwrap();
    let c = Client::builder([proxy.endpoint()])
        .request_timeout(STEP)
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await
        .unwrap();
    let writer = client(&etcd).await;
    let group = WatchGroup::new();
    let x = group.add(c.watch("x")).await.unwrap();
    let y = group.add(c.watch("y")).await.unwrap();
    let mut group = group;
    let x1 = put(&writer, "x", "1").await;
    assert_eq!(read_events(&mut group, 1).await[&x], [(x1, "x".to_owned())]);

    proxy.blackhole();
    proxy.cut_all().await;
    let x2 = put(&writer, "x", "2").await;
    let y1 = put(&writer, "y", "1").await;
    proxy.pass();

    let seen = read_events(&mut group, 2).await;
    assert_eq!(seen[&x], [(x2, "x".to_owned())]);
    assert_eq!(seen[&y], [(y1, "y".to_owned())]);
    assert!(
        c.watch_stats().streams_opened >= 2,
        "the client reconnected"
    );
}

#[tokio::test]
async fn errors_end_one_member_and_bad_members_are_refused() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let group = WatchGroup::new();
    // Refused before anything is sent: the group is unchanged.
    let err = group.add(c.watch("")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::EmptyKey);
    assert!(group.is_empty());
    let live = group.add(c.watch("live")).await.unwrap();
    // A compacted start revision: created, then ended by the server with its own error.
    let old = put(&c, "old", "1").await;
    let now = put(&c, "old", "2").await;
    c.kv().compact(now).await.unwrap();
    let gone = group.add(c.watch("old").start_revision(old)).await.unwrap();
    let mut group = group;
    let (id, item) = next(&mut group).await;
    assert_eq!(id, gone);
    let err = item.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Compacted);
    assert_eq!(err.compact_revision(), Some(now));
    assert!(!group.contains(gone), "an ended member leaves the group");
    // The other member goes on.
    let r = put(&c, "live", "1").await;
    assert_eq!(
        read_events(&mut group, 1).await[&live],
        [(r, "live".to_owned())]
    );
}

#[tokio::test]
async fn remove_cancels_on_the_server_and_an_empty_group_ends() {
    let etcd = etcd().await;
    let addr = etcd.client_addr(0);
    let c = client(&etcd).await;
    let base = watchers_on_server(addr).await;
    let group = WatchGroup::new();
    let a = group.add(c.watch("a")).await.unwrap();
    let b = group.add(c.watch("b")).await.unwrap();
    assert_eq!(watchers_on_server(addr).await, base + 2);
    assert!(group.remove(a));
    assert!(!group.remove(a));
    wait_until(STEP, "the server to drop the removed member", || async {
        watchers_on_server(addr).await == base + 1
    })
    .await;
    let mut group = group;
    put(&c, "a", "ignored").await;
    let r = put(&c, "b", "1").await;
    assert_eq!(
        read_events(&mut group, 1).await,
        BTreeMap::from([(b, vec![(r, "b".to_owned())])])
    );
    assert!(group.remove(b));
    let end = tokio::time::timeout(STEP, group.next())
        .await
        .expect("the end");
    assert!(end.is_none(), "no member left: the stream ends");
    // Dropping a group cancels its members.
    let group = WatchGroup::new();
    group.add(c.watch("c")).await.unwrap();
    group.add(c.watch("d")).await.unwrap();
    // (The stream closed when the last member was removed is torn down by etcd in its own
    // time: its watcher may still count for a moment.)
    wait_until(STEP, "the server to have the two new members", || async {
        watchers_on_server(addr).await == base + 2
    })
    .await;
    drop(group);
    wait_until(STEP, "the server to drop the group's members", || async {
        watchers_on_server(addr).await == base
    })
    .await;
}

#[tokio::test]
async fn closing_the_client_ends_every_member_then_the_group() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let group = WatchGroup::new();
    let a = group.add(c.watch("a")).await.unwrap();
    let b = group.add(c.watch("b")).await.unwrap();
    let mut group = group;
    c.close().await;
    let mut ended = Vec::new();
    while let Some((id, item)) = tokio::time::timeout(STEP, group.next())
        .await
        .expect("an item or the end")
    {
        assert_eq!(item.unwrap_err().kind(), ErrorKind::Closed);
        ended.push(id);
    }
    ended.sort_unstable();
    assert_eq!(ended, [a.min(b), a.max(b)]);
    assert!(group.is_empty());
}

#[tokio::test]
async fn next_many_moves_what_has_come_in_order_and_the_stream_reads_the_same() {
    use futures::StreamExt;
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let group = WatchGroup::new();
    let a = group.add(c.watch("m/a")).await.unwrap();
    let b = group.add(c.watch("m/b")).await.unwrap();
    let mut group = group;
    let mut revs = Vec::new();
    for i in 0..6 {
        let k = if i % 2 == 0 { "m/a" } else { "m/b" };
        revs.push((if i % 2 == 0 { a } else { b }, put(&c, k, "v").await));
    }
    // Runs of at most 4, appended to what the buffer already holds.
    let mut run = vec![];
    while run.len() < 6 {
        let before = run.len();
        let n = tokio::time::timeout(STEP, group.next_many(&mut run, 4))
            .await
            .expect("a run");
        assert!((1..=4).contains(&n) && run.len() == before + n);
    }
    let got: Vec<(u64, i64)> = run
        .into_iter()
        .map(|(id, batch)| (id, batch.unwrap().events()[0].revision()))
        .collect();
    assert_eq!(got, revs);
    // The Stream reads the same items.
    let r = put(&c, "m/b", "w").await;
    let (id, batch) = tokio::time::timeout(STEP, group.next_stream_item())
        .await
        .expect("an item");
    assert_eq!((id, batch.unwrap().events()[0].revision()), (b, r));
    // The end: no member left.
    assert!(group.remove(a) && group.remove(b));
    let mut run = vec![];
    assert_eq!(group.next_many(&mut run, 4).await, 0);
    assert!(group.next().await.is_none());

    trait NextItem {
        async fn next_stream_item(&mut self) -> (u64, etcdv3::Result<WatchBatch>);
    }
    impl NextItem for WatchGroup {
        async fn next_stream_item(&mut self) -> (u64, etcdv3::Result<WatchBatch>) {
            StreamExt::next(self).await.expect("an item")
        }
    }
}

#[tokio::test]
async fn namespaced_members_get_keys_relative_to_their_namespace() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let app = c.with_namespace("app/");
    // A buffer of two batches: the twelve writes below pause and resume the members, which
    // must keep their namespaces.
    let group = WatchGroup::with_buffer(2);
    let (ns_member, plain) = tokio::try_join!(
        group.add(app.watch("cfg/").prefix().prev_kv()),
        group.add(c.watch("app/cfg/x")),
    )
    .unwrap();
    // Outside the namespace: for neither member.
    put(&c, "cfg/x", "outside").await;
    let mut revs = Vec::new();
    for i in 0..12 {
        revs.push(
            app.kv()
                .put("cfg/x", i.to_string())
                .await
                .unwrap()
                .header
                .revision,
        );
    }
    let mut group = group;
    let mut seen: BTreeMap<u64, Vec<(i64, String, Option<String>)>> = BTreeMap::new();
    let mut n = 0;
    while n < 2 * revs.len() {
        let (id, b) = next(&mut group).await;
        for e in b.unwrap().events() {
            let prev = e.prev_kv.as_ref().map(|p| p.key_str().unwrap().to_owned());
            seen.entry(id).or_default().push((
                e.revision(),
                e.kv.key_str().unwrap().to_owned(),
                prev,
            ));
            n += 1;
        }
    }
    let want_ns: Vec<_> = revs
        .iter()
        .enumerate()
        .map(|(i, r)| (*r, "cfg/x".to_owned(), (i > 0).then(|| "cfg/x".to_owned())))
        .collect();
    let want_plain: Vec<_> = revs
        .iter()
        .map(|r| (*r, "app/cfg/x".to_owned(), None))
        .collect();
    assert_eq!(seen[&ns_member], want_ns, "relative keys, prev_kv too");
    assert_eq!(
        seen[&plain], want_plain,
        "a plain member keeps absolute keys"
    );
    assert!(
        c.watch_stats().pauses > 0,
        "the small buffer paused members"
    );
}
