//! The maintenance API against real etcd: per-member status, hashes and defragmentation by
//! endpoint, alarms, snapshots, leader transfer, downgrade, and connection lifetimes.

mod common;

use std::collections::HashSet;
use std::future::IntoFuture;
use std::time::Duration;

use common::{client, etcd, version_of, wait_until};
use etcdv3::testkit::EtcdCluster;
use etcdv3::{AlarmType, Client, ErrorKind};
use futures::StreamExt;

async fn cluster3() -> EtcdCluster {
    EtcdCluster::builder()
        .members(3)
        .start_async()
        .await
        .unwrap_or_else(|e| panic!("could not start a 3-member etcd cluster: {e}"))
}

/// Waits (bounded) until the runtime's live task count is back at `baseline`.
async fn wait_for_tasks(baseline: usize) {
    let m = tokio::runtime::Handle::current().metrics();
    wait_until(Duration::from_secs(10), "background tasks to end", || {
        let n = m.num_alive_tasks();
        async move { n == baseline }
    })
    .await;
}

#[tokio::test]
async fn status_hash_kv_and_defragment_on_each_member_by_endpoint() {
    let etcd = cluster3().await;
    let c = client(&etcd).await;
    for i in 0..50 {
        c.kv().put(format!("k/{i}"), vec![b'x'; 512]).await.unwrap();
    }
    let del = c.kv().delete("k/").prefix().await.unwrap();
    assert_eq!(del.deleted, 50);
    let rev = c.kv().put("last", "v").await.unwrap().header.revision;

    let metrics = tokio::runtime::Handle::current().metrics();
    let baseline = metrics.num_alive_tasks();

    let mut ids = HashSet::new();
    let mut leaders = HashSet::new();
    let mut hashes = HashSet::new();
    for ep in etcd.endpoints() {
        let m = c.maintenance_at(&ep).unwrap();
        assert_eq!(m.endpoint(), Some(ep.as_str()));
        let status = m.status().await.unwrap();
        assert!(status.version.starts_with("3."), "{}", status.version);
        assert!(status.db_size > 0 && status.db_size_in_use <= status.db_size);
        assert!(status.raft_index >= status.raft_applied_index.min(status.raft_index));
        assert!(!status.is_learner);
        assert!(status.errors.is_empty(), "{:?}", status.errors);
        assert!(
            ids.insert(status.header.member_id),
            "each endpoint is another member"
        );
        leaders.insert(status.leader);

        // hash_kv at a fixed revision is the same on every member, once it has applied it.
        wait_until(
            Duration::from_secs(10),
            "member to reach the revision",
            || {
                let f = m.hash_kv(rev).into_future();
                async move {
                    match f.await {
                        Ok(_) => true,
                        Err(e) if e.kind() == ErrorKind::FutureRevision => false,
                        Err(e) => panic!("{e:?}"),
                    }
                }
            },
        )
        .await;
        let hk = m.hash_kv(rev).await.unwrap();
        assert_eq!(hk.header.member_id, status.header.member_id);
        if hk.hash_revision != 0 {
            assert_eq!(hk.hash_revision, rev);
        }
        hashes.insert(hk.hash);

        let h = m.hash().await.unwrap();
        assert_eq!(h.header.member_id, status.header.member_id);

        // Defragmenting changes the file, not the data.
        let d = m
            .defragment()
            .timeout(Duration::from_secs(30))
            .await
            .unwrap();
        // etcd sends no header with this answer.
        assert_eq!(d.header.member_id, 0);
        let after = m.status().await.unwrap();
        // (The file need not shrink: 3.4 may lay the copy out in more pages.)
        assert!(after.db_size_in_use <= after.db_size, "{after:?}");
        assert_eq!(after.header.revision, status.header.revision);
        assert_eq!(m.hash_kv(rev).await.unwrap().hash, hk.hash);
    }
    assert_eq!(ids.len(), 3);
    assert_eq!(leaders.len(), 1, "every member names the same leader");
    assert!(ids.contains(leaders.iter().next().unwrap()));
    assert_eq!(hashes.len(), 1, "members agree on the key-value hash");

    // The per-member connections end with their handles.
    wait_for_tasks(baseline).await;
    c.kv().get("last").await.unwrap();
}

#[tokio::test]
async fn chosen_endpoint_errors_are_typed() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    assert_eq!(
        c.maintenance_at("not an endpoint").unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let e = c
        .maintenance_at(&dead)
        .unwrap()
        .status()
        .timeout(Duration::from_secs(5))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e:?}");
    // A dead chosen member does not disturb the client's own requests.
    c.kv().put("k", "v").await.unwrap();
    // After close, chosen-member calls fail like every other call.
    let m = c.maintenance_at(&etcd.endpoint(0)).unwrap();
    m.status().await.unwrap();
    c.close().await;
    assert_eq!(m.status().await.unwrap_err().kind(), ErrorKind::Closed);
    assert_eq!(
        c.maintenance().status().await.unwrap_err().kind(),
        ErrorKind::Closed
    );
}

#[tokio::test]
async fn nospace_alarm_blocks_writes_until_disarmed() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let m = c.maintenance();
    c.kv().put("k", "1").await.unwrap();
    let me = m.status().await.unwrap().header.member_id;
    assert!(m.alarms().await.unwrap().alarms.is_empty());

    let act = m.alarm_activate(me, AlarmType::NoSpace).await.unwrap();
    assert_eq!(act.alarms.len(), 1);
    assert_eq!(act.alarms[0].member_id, me);
    assert_eq!(act.alarms[0].alarm, AlarmType::NoSpace);
    let listed = m.alarms().await.unwrap().alarms;
    assert_eq!(listed, act.alarms);
    let status = m.status().await.unwrap();
    assert!(
        status.errors.iter().any(|e| e.contains("NOSPACE")),
        "{:?}",
        status.errors
    );

    let e = c.kv().put("k", "2").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NoSpace, "{e:?}");
    // Reads still work.
    assert_eq!(
        c.kv().get("k").await.unwrap().kvs[0].value_str().unwrap(),
        "1"
    );

    let off = m.alarm_disarm(me, AlarmType::NoSpace).await.unwrap();
    assert_eq!(off.alarms.len(), 1);
    assert!(m.alarms().await.unwrap().alarms.is_empty());
    c.kv().put("k", "2").await.unwrap();

    // Disarming everything at once (as etcdctl does).
    m.alarm_activate(me, AlarmType::NoSpace).await.unwrap();
    assert_eq!(
        c.kv().put("k", "3").await.unwrap_err().kind(),
        ErrorKind::NoSpace
    );
    let all = m.alarm_disarm_all().await.unwrap();
    assert_eq!(all.alarms.len(), 1);
    assert!(m.alarms().await.unwrap().alarms.is_empty());
    c.kv().put("k", "3").await.unwrap();
    assert!(m.alarm_disarm_all().await.unwrap().alarms.is_empty());
}

#[tokio::test]
async fn snapshot_to_file_matches_the_db_size() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    for i in 0..200 {
        c.kv()
            .put(format!("snap/{i}"), vec![b'v'; 1024])
            .await
            .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("backup.db");
    let m = c.maintenance();
    let info = m.snapshot_to_file(&path).await.unwrap();
    // Taking the snapshot commits the backend; with no writes since, status agrees.
    let status = m.status().await.unwrap();
    assert_eq!(info.db_size as i64, status.db_size);
    assert_eq!(info.file_size, info.db_size + 32, "database + sha256");
    assert_eq!(std::fs::metadata(&path).unwrap().len(), info.file_size);
    assert!(!dir.path().join("backup.db.part").exists());
    assert_eq!(info.path, path);
    assert!(info.header.is_some());
    let file = std::fs::read(&path).unwrap();
    // A bbolt file: the meta page's magic number at offset 16.
    assert_eq!(&file[16..20], &0xED0C_DAEDu32.to_le_bytes());
    // The last 32 bytes are the SHA-256 of the database before them (checked on the way in).
    let (db, digest) = file.split_at(file.len() - 32);
    use sha2::Digest;
    assert_eq!(sha2::Sha256::digest(db)[..], digest[..]);

    // The same as a stream, from the member chosen by endpoint.
    let mut stream = c
        .maintenance_at(&etcd.endpoint(0))
        .unwrap()
        .snapshot()
        .await
        .unwrap();
    let mut bytes = Vec::new();
    let mut chunks = 0;
    while let Some(chunk) = stream.next().await {
        bytes.extend_from_slice(&chunk.unwrap());
        chunks += 1;
    }
    assert!(chunks > 1);
    assert_eq!(stream.db_size(), Some(info.db_size));
    assert_eq!(stream.received(), bytes.len() as u64);
    assert_eq!(bytes.len() as u64, info.file_size);
    assert_eq!(&bytes[16..20], &file[16..20]);
    assert_eq!(stream.version(), info.version.as_deref());
    if version_of(&etcd) < (3, 6) {
        assert_eq!(stream.version(), None);
    }

    // A snapshot to file dropped midway (a caller's timeout) leaves no partial file.
    let cut = dir.path().join("cut.db");
    let part = dir.path().join("cut.db.part");
    let mut save = Box::pin(m.snapshot_to_file(&cut).into_future());
    let mut seen_part = false;
    for _ in 0..5000 {
        tokio::select! {
            biased;
            r = &mut save => { r.unwrap(); break; }
            () = tokio::time::sleep(Duration::from_micros(200)) => {}
        }
        if part.exists() {
            seen_part = true;
            break;
        }
    }
    // (When the save was too quick to catch midway, there is nothing to check.)
    if seen_part {
        drop(save);
        assert!(
            !part.exists(),
            "the partial file is removed when the save is dropped"
        );
        assert!(!cut.exists());
    }

    // A snapshot file into a directory that does not exist: a typed I/O error, nothing left.
    let e = m
        .snapshot_to_file(dir.path().join("no/such/dir/x.db"))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Other, "{e:?}");
}

#[tokio::test]
async fn dropping_a_snapshot_stream_midway_ends_its_connection() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    for i in 0..300 {
        c.kv()
            .put(format!("s/{i}"), vec![b'v'; 2048])
            .await
            .unwrap();
    }
    let metrics = tokio::runtime::Handle::current().metrics();
    let baseline = metrics.num_alive_tasks();
    {
        let m = c.maintenance_at(&etcd.endpoint(0)).unwrap();
        let mut stream = m.snapshot().await.unwrap();
        let first = stream.next().await.unwrap().unwrap();
        assert!(!first.is_empty());
        assert!(stream.received() < stream.db_size().unwrap());
        assert!(metrics.num_alive_tasks() > baseline);
    }
    wait_for_tasks(baseline).await;
    c.kv().get("s/1").await.unwrap();
}

#[tokio::test]
async fn move_leader_changes_the_leader() {
    let etcd = cluster3().await;
    let c = client(&etcd).await;
    let statuses = async |c: &Client| {
        let mut v = Vec::new();
        for ep in etcd.endpoints() {
            v.push(c.maintenance_at(&ep).unwrap().status().await.unwrap());
        }
        v
    };
    let before = statuses(&c).await;
    let leader = before[0].leader;
    let follower_ep = before.iter().position(|s| !s.is_leader()).unwrap();
    let target = before[follower_ep].header.member_id;

    // Sent to a follower, the request is refused.
    let e = c
        .maintenance_at(&etcd.endpoint(follower_ep))
        .unwrap()
        .move_leader(target)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotLeader, "{e:?}");
    // An unknown member is not a valid transferee.
    let e = c.maintenance().move_leader(0x1234).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::BadLeaderTransferee, "{e:?}");

    // Through the client's own connection (maybe a follower): routed to the leader.
    c.maintenance()
        .move_leader(target)
        .timeout(Duration::from_secs(10))
        .await
        .unwrap();
    wait_until(
        Duration::from_secs(10),
        "every member to see the new leader",
        || {
            let c = c.clone();
            async move { statuses(&c).await.iter().all(|s| s.leader == target) }
        },
    )
    .await;
    assert_ne!(leader, target);
    let after = statuses(&c).await;
    assert!(after[follower_ep].is_leader());
    assert!(after[follower_ep].raft_term > before[follower_ep].raft_term);
    c.kv().put("after-move", "v").await.unwrap();
}

#[tokio::test]
async fn downgrade_is_typed_on_every_version() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let m = c.maintenance();
    if version_of(&etcd) < (3, 5) {
        for e in [
            m.downgrade_validate("3.3").await.unwrap_err(),
            m.downgrade_enable("3.3").await.unwrap_err(),
            m.downgrade_cancel().await.unwrap_err(),
        ] {
            assert_eq!(e.kind(), ErrorKind::Unimplemented, "{e:?}");
            assert!(e.to_string().contains("downgrade"), "{e}");
        }
        return;
    }
    let e = m.downgrade_validate("three").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::WrongDowngradeVersionFormat, "{e:?}");
    let e = m.downgrade_validate("3.9").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidDowngradeTargetVersion, "{e:?}");
    let e = m.downgrade_cancel().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NoInflightDowngrade, "{e:?}");
    let ok = m.downgrade_validate("3.4").await.unwrap();
    assert!(ok.version.starts_with("3.5"), "{ok:?}");
}
