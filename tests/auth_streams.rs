//! Streams under token auth: a kept lease and a watch survive the expiry of the client's
//! token and a reconnect (the keeper and the watch worker re-authenticate before reconnecting).

mod common;

use std::time::{Duration, Instant};

use etcdv3::testkit::FaultProxy;

const TOKEN_TTL: u64 = 2;

async fn auth_etcd() -> etcdv3::testkit::EtcdCluster {
    let etcd = common::etcd_with(&[
        "--auth-token=simple",
        &format!("--auth-token-ttl={TOKEN_TTL}"),
    ])
    .await;
    let admin = common::client(&etcd).await;
    admin.auth().user_add("root", "rootpw").await.unwrap();
    admin.auth().user_grant_role("root", "root").await.unwrap();
    admin.auth().enable().await.unwrap();
    etcd
}

#[tokio::test]
async fn a_kept_lease_and_a_watch_survive_token_expiry_and_reconnects() {
    let etcd = auth_etcd().await;
    let proxy = FaultProxy::start(etcd.client_addr(0)).await.unwrap();
    let c = common::user_client(vec![proxy.endpoint()], "root", "rootpw").await;
    let observer = common::user_client(etcd.endpoints(), "root", "rootpw").await;
    let kept = c.lease().grant(4).keep_alive().await.unwrap();
    let first = c
        .kv()
        .put("a/0", "x")
        .lease(kept.id())
        .await
        .unwrap()
        .header
        .revision;
    let mut w = c.watch("a/").prefix().start_revision(first).await.unwrap();
    let streams = c.lease().keeper_streams_opened();
    let anon = common::client(&etcd).await;

    for round in 1..=2 {
        // Wait until the client's token has expired on the server, then cut every
        // connection: the keeper and the watch must reconnect with a fresh token.
        common::wait_for_token_expiry(&anon, Duration::from_secs(TOKEN_TTL)).await;
        proxy.cut_all().await;
        let rev = observer
            .kv()
            .put(format!("a/{round}"), "y")
            .await
            .unwrap()
            .header
            .revision;
        // The watch delivers the write made across the reconnect.
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut seen = Vec::new();
        while !seen.contains(&rev) {
            let left = deadline.saturating_duration_since(Instant::now());
            let b = tokio::time::timeout(left, w.next())
                .await
                .expect("event in time")
                .unwrap()
                .unwrap();
            seen.extend(b.events().iter().map(|e| e.revision()));
        }
        assert!(
            kept.lost_reason().is_none(),
            "round {round}: {:?}",
            kept.lost_reason()
        );
    }
    // Two more TTLs of the lease: still kept, the key still there.
    let until = Instant::now() + Duration::from_secs(8);
    while Instant::now() < until {
        assert!(kept.lost_reason().is_none(), "{:?}", kept.lost_reason());
        let ttl = observer.lease().time_to_live(kept.id()).await.unwrap();
        assert!(ttl.ttl > 0, "lease alive on the server: {ttl:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(observer.kv().get("a/0").await.unwrap().count, 1);
    assert!(
        c.lease().keeper_streams_opened() > streams,
        "the keeper reconnected"
    );
}

#[tokio::test]
async fn cancelling_a_watcher_whose_re_creation_is_refused_returns() {
    // A watcher is being re-created (after a cut connection) and its user lost the right to
    // read meanwhile: etcd refuses the create. A cancel sent in between must still return
    // (etcd answers no cancel for a watcher it never made).
    let etcd = auth_etcd().await;
    let admin = common::user_client(etcd.endpoints(), "root", "rootpw").await;
    let auth = admin.auth();
    auth.user_add("alice", "alicepw").await.unwrap();
    auth.role_add("reader").await.unwrap();
    auth.role_grant_permission("reader", etcdv3::Permission::read("w/").prefix())
        .await
        .unwrap();
    auth.role_grant_permission("reader", etcdv3::Permission::read("keep/").prefix())
        .await
        .unwrap();
    auth.user_grant_role("alice", "reader").await.unwrap();
    let proxy = FaultProxy::start(etcd.client_addr(0)).await.unwrap();
    let c = common::user_client(vec![proxy.endpoint()], "alice", "alicepw").await;
    let w = c.watch("w/x").await.unwrap();
    // Another watcher keeps the stream open after the cancel (an empty multiplexer closes its
    // stream, which would answer the cancel anyway).
    let _keep = c.watch("keep/x").await.unwrap();
    let creates = c.watch_stats().creates_sent;

    // Hold everything, cut the connection, take the right away.
    proxy.blackhole();
    proxy.cut_all().await;
    auth.role_revoke_permission("reader", "w/")
        .prefix()
        .await
        .unwrap();
    // The re-creation is sent (and held in the proxy)...
    let deadline = Instant::now() + Duration::from_secs(10);
    while c.watch_stats().creates_sent == creates {
        assert!(Instant::now() < deadline, "no re-creation sent");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // ...then the cancel, behind it; then let both through.
    let cancel = tokio::spawn(async move { w.cancel().await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    proxy.pass();
    tokio::time::timeout(Duration::from_secs(10), cancel)
        .await
        .expect("cancel() returned")
        .unwrap();
}

#[tokio::test]
async fn a_watcher_paused_past_the_token_ttl_again_and_again_resumes_every_time() {
    // A consumer that stops reading gets its watcher paused (taken off the server); resumed
    // after the stream's token expired unused, its re-creation is refused with "permission
    // denied". Each time, the worker must re-authenticate and go on. Before, a refusal within
    // ten seconds of a re-authentication was believed: the second pause ended the watcher.
    let etcd = auth_etcd().await;
    let c = common::user_client(etcd.endpoints(), "root", "rootpw").await;
    let writer = common::user_client(etcd.endpoints(), "root", "rootpw").await;
    let anon = common::client(&etcd).await;
    let mut w = c.watch("p/").prefix().buffer(2).await.unwrap();
    let streams = c.watch_stats().streams_opened;
    for round in 0..3 {
        // More batches than the buffer holds: the watcher is paused.
        let mut revs = Vec::new();
        for i in 0..6 {
            let put = writer
                .kv()
                .put(format!("p/{round}/{i}"), "v")
                .await
                .unwrap();
            revs.push(put.header.revision);
        }
        // Nothing else uses the stream's token meanwhile: it expires.
        common::wait_for_token_expiry(&anon, Duration::from_secs(TOKEN_TTL)).await;
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut seen = Vec::new();
        while seen.len() < revs.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            let b = tokio::time::timeout(left, w.next())
                .await
                .unwrap_or_else(|_| panic!("round {round}: events in time, saw {seen:?}"))
                .expect("the watcher goes on")
                .unwrap_or_else(|e| panic!("round {round}: {e:?}"));
            seen.extend(b.events().iter().map(|e| e.revision()));
        }
        assert_eq!(seen, revs, "round {round}: every revision once, in order");
    }
    assert!(c.watch_stats().pauses >= 3, "{:?}", c.watch_stats());
    assert!(
        c.watch_stats().streams_opened > streams,
        "re-authenticated on a new stream"
    );
}
