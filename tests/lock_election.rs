//! The server-side lock and election services (v3lock, v3election) against a real etcd.
//! Leases are granted and revoked through the raw lease client, and deliberately not kept
//! alive where a test wants them to expire.

mod common;

use std::future::IntoFuture;
use std::time::{Duration, Instant};

use common::{client, etcd, wait_until};
use etcdv3::raw::etcdserverpb as pb;
use etcdv3::{Client, ErrorKind, LeaderKey};
use futures::StreamExt;

async fn grant(c: &Client, ttl: i64) -> i64 {
    c.raw()
        .unwrap()
        .lease()
        .lease_grant(pb::LeaseGrantRequest { ttl, id: 0 })
        .await
        .unwrap()
        .into_inner()
        .id
}

async fn revoke(c: &Client, id: i64) {
    c.raw()
        .unwrap()
        .lease()
        .lease_revoke(pb::LeaseRevokeRequest { id })
        .await
        .unwrap();
}

async fn key_count(c: &Client, prefix: &str) -> i64 {
    c.kv()
        .get(prefix)
        .prefix()
        .count_only()
        .await
        .unwrap()
        .count
}

/// `c2` waits for the lock `c1` holds: its waiting key is queued on the server while the
/// lock task is still pending. Returns the pending task.
async fn contend(
    c2: &Client,
    name: &'static str,
    lease: i64,
) -> tokio::task::JoinHandle<etcdv3::Result<etcdv3::HeldLock>> {
    let locks = c2.lock_service();
    let task = tokio::spawn(
        locks
            .lock(name, lease)
            .timeout(Duration::from_secs(30))
            .into_future(),
    );
    let probe = c2.clone();
    wait_until(
        Duration::from_secs(10),
        "the second locker to queue",
        || {
            let probe = probe.clone();
            async move { key_count(&probe, &format!("{name}/")).await == 2 }
        },
    )
    .await;
    task
}

#[tokio::test]
async fn second_locker_gets_the_lock_only_after_the_first_unlocks() {
    let etcd = etcd().await;
    let (c1, c2) = (client(&etcd).await, client(&etcd).await);
    let (l1, l2) = (grant(&c1, 60).await, grant(&c2, 60).await);

    let h1 = c1.lock_service().lock("mylock", l1).await.unwrap();
    assert!(h1.key().starts_with(b"mylock/"), "{h1:?}");
    assert_eq!(h1.lease(), l1);
    assert!(h1.is_held().await.unwrap());
    let k1 = c1.kv().get(h1.key()).await.unwrap();
    assert_eq!(k1.kvs[0].lease(), l1);

    let waiter = contend(&c2, "mylock", l2).await;
    // Queued, not granted: the first still holds it.
    assert!(!waiter.is_finished());
    assert!(h1.is_held().await.unwrap());

    let unlocked = h1.unlock().await.unwrap();
    let h2 = waiter.await.unwrap().unwrap();
    assert!(h2.header().revision >= unlocked.header.revision);
    assert_ne!(h2.key(), h1.key());
    assert!(h2.is_held().await.unwrap());
    assert!(!h1.is_held().await.unwrap());
    // The waiter's key was created while the first held the lock: after it in revision order.
    let k2 = c2.kv().get(h2.key()).await.unwrap();
    assert!(k2.kvs[0].create_revision() > k1.kvs[0].create_revision());
    // Unlocking twice is harmless.
    h1.unlock().await.unwrap();
    c2.lock_service().unlock(h2.key()).await.unwrap();
    assert!(!h2.is_held().await.unwrap());
    assert_eq!(key_count(&c1, "mylock/").await, 0);
}

#[tokio::test]
async fn lock_passes_on_when_the_holders_lease_is_revoked() {
    let etcd = etcd().await;
    let (c1, c2) = (client(&etcd).await, client(&etcd).await);
    let (l1, l2) = (grant(&c1, 60).await, grant(&c2, 60).await);
    let h1 = c1.lock_service().lock("rl", l1).await.unwrap();
    let waiter = contend(&c2, "rl", l2).await;
    assert!(!waiter.is_finished());
    revoke(&c1, l1).await;
    let h2 = waiter.await.unwrap().unwrap();
    assert!(h2.is_held().await.unwrap());
    // The first holder is told, not left believing it holds the lock.
    assert!(!h1.is_held().await.unwrap());
}

#[tokio::test]
async fn lock_passes_on_when_the_holders_lease_expires() {
    let etcd = etcd().await;
    let (c1, c2) = (client(&etcd).await, client(&etcd).await);
    // Nobody keeps l1 alive: it expires after its TTL.
    let (l1, l2) = (grant(&c1, 2).await, grant(&c2, 60).await);
    let start = Instant::now();
    let h1 = c1.lock_service().lock("el", l1).await.unwrap();
    let waiter = contend(&c2, "el", l2).await;
    let h2 = waiter.await.unwrap().unwrap();
    assert!(
        start.elapsed() >= Duration::from_secs(1),
        "granted before the holder's lease could expire ({:?})",
        start.elapsed()
    );
    assert!(h2.is_held().await.unwrap());
    assert!(!h1.is_held().await.unwrap());
}

#[tokio::test]
async fn lock_errors_and_a_timed_out_wait_withdraws_its_key() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let locks = c.lock_service();
    assert_eq!(
        locks.lock("x", 0).await.unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );
    assert_eq!(
        locks.lock("", 1).await.unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );
    let e = locks.lock("x", 0x7777).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::LeaseNotFound, "{e:?}");

    let (l1, l2) = (grant(&c, 60).await, grant(&c, 60).await);
    let _h1 = locks.lock("busy", l1).await.unwrap();
    let e = locks
        .lock("busy", l2)
        .timeout(Duration::from_millis(500))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Deadline, "{e:?}");
    // The server withdraws the waiter's key when the request is canceled.
    wait_until(
        Duration::from_secs(10),
        "the withdrawn waiter key to go",
        || {
            let c = c.clone();
            async move { key_count(&c, "busy/").await == 1 }
        },
    )
    .await;
}

// ---------------------------------------------------------------------------------------------
// Election

async fn next_value(stream: &mut etcdv3::LeaderStream) -> (String, i64) {
    let item = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("an observed leader change")
        .expect("stream open")
        .unwrap();
    (
        item.kv.value_str().unwrap().to_owned(),
        item.kv.create_revision(),
    )
}

#[tokio::test]
async fn campaign_leader_observe_proclaim_and_resign_hands_over() {
    let etcd = etcd().await;
    let (ca, cb, co) = (
        client(&etcd).await,
        client(&etcd).await,
        client(&etcd).await,
    );
    let (la, lb) = (grant(&ca, 60).await, grant(&cb, 60).await);
    let es = ca.election_service();
    assert!(es.leader("elect").await.unwrap().is_none());

    let mut observer = co.election_service().observe("elect");

    let a = es.campaign("elect", la, "A").await.unwrap().leader;
    assert_eq!(&a.name[..], b"elect");
    assert!(a.key.starts_with(b"elect/"));
    assert_eq!(a.lease, la);
    let now = es.leader("elect").await.unwrap().unwrap();
    assert_eq!(now.kv.value_str().unwrap(), "A");
    assert_eq!(now.kv.key(), &a.key);
    assert_eq!(now.kv.create_revision(), a.revision);
    assert_eq!(now.kv.lease(), la);
    assert_eq!(
        next_value(&mut observer).await,
        ("A".to_owned(), a.revision)
    );

    es.proclaim(&a, "A2").await.unwrap();
    assert_eq!(
        next_value(&mut observer).await,
        ("A2".to_owned(), a.revision)
    );
    assert!(es.is_leader(&a).await.unwrap());

    // B campaigns and waits behind A.
    let b_task = tokio::spawn(
        cb.election_service()
            .campaign("elect", lb, "B")
            .timeout(Duration::from_secs(30))
            .into_future(),
    );
    wait_until(Duration::from_secs(10), "B to queue", || {
        let c = ca.clone();
        async move { key_count(&c, "elect/").await == 2 }
    })
    .await;
    assert!(!b_task.is_finished());
    assert_eq!(
        es.leader("elect")
            .await
            .unwrap()
            .unwrap()
            .kv
            .value_str()
            .unwrap(),
        "A2"
    );

    es.resign(&a).await.unwrap();
    let b = b_task.await.unwrap().unwrap().leader;
    assert!(b.revision > a.revision, "leadership revisions grow");
    assert_eq!(
        next_value(&mut observer).await,
        ("B".to_owned(), b.revision)
    );
    assert!(cb.election_service().is_leader(&b).await.unwrap());

    // A lost its leadership: proclaiming is refused, resigning again changes nothing.
    assert!(!es.is_leader(&a).await.unwrap());
    let e = es.proclaim(&a, "stale").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ElectionNotLeader, "{e:?}");
    es.resign(&a).await.unwrap();
    assert_eq!(
        es.leader("elect")
            .await
            .unwrap()
            .unwrap()
            .kv
            .value_str()
            .unwrap(),
        "B"
    );
    // A leader key rebuilt from its parts works the same.
    let b2 = LeaderKey::new("elect", b.key.clone(), b.revision, b.lease);
    es.proclaim(&b2, "B2").await.unwrap();
    assert_eq!(
        next_value(&mut observer).await,
        ("B2".to_owned(), b.revision)
    );
}

#[tokio::test]
async fn leadership_passes_on_when_the_leaders_lease_expires() {
    let etcd = etcd().await;
    let (ca, cb) = (client(&etcd).await, client(&etcd).await);
    let (la, lb) = (grant(&ca, 2).await, grant(&cb, 60).await);
    let es = ca.election_service();
    let a = es.campaign("e2", la, "A").await.unwrap().leader;
    let b = cb
        .election_service()
        .campaign("e2", lb, "B")
        .timeout(Duration::from_secs(20))
        .await
        .unwrap()
        .leader;
    assert!(b.revision > a.revision);
    assert!(!es.is_leader(&a).await.unwrap());
    assert_eq!(
        es.proclaim(&a, "x").await.unwrap_err().kind(),
        ErrorKind::ElectionNotLeader
    );
    let e = es.campaign("e2", 0, "x").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    let e = es.campaign("e2", la, "again").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::LeaseNotFound, "{e:?}");
}

#[tokio::test]
async fn observer_and_waiting_calls_end_their_tasks_when_dropped() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let l = grant(&c, 60).await;
    let es = c.election_service();
    es.campaign("e3", l, "v").await.unwrap();
    let metrics = tokio::runtime::Handle::current().metrics();
    let baseline = metrics.num_alive_tasks();
    {
        let mut obs = es.observe("e3");
        assert_eq!(next_value(&mut obs).await.0, "v");
    }
    // The observer held no task of its own: nothing to wait for, the client still works.
    assert_eq!(metrics.num_alive_tasks(), baseline);
    assert_eq!(
        es.leader("e3")
            .await
            .unwrap()
            .unwrap()
            .kv
            .value_str()
            .unwrap(),
        "v"
    );
}

// ---------------------------------------------------------------------------------------------
// With authentication

/// A lease granted with `user`'s token (the raw client attaches none of its own).
async fn grant_as(anon: &Client, user: &str, password: &str, ttl: i64) -> i64 {
    let raw = anon.raw().unwrap();
    let token = raw
        .auth()
        .authenticate(pb::AuthenticateRequest {
            name: user.into(),
            password: password.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    let mut req = tonic::Request::new(pb::LeaseGrantRequest { ttl, id: 0 });
    req.metadata_mut().insert("token", token.parse().unwrap());
    raw.lease().lease_grant(req).await.unwrap().into_inner().id
}

#[tokio::test]
async fn services_carry_the_token_and_observe_survives_a_stale_one() {
    let etcd = etcd().await;
    let anon = client(&etcd).await;
    anon.auth().user_add("root", "rootpw").await.unwrap();
    anon.auth().user_grant_role("root", "root").await.unwrap();
    anon.auth().enable().await.unwrap();
    let root = Client::builder(etcd.endpoints())
        .user("root", "rootpw")
        .request_timeout(Duration::from_secs(10))
        .connect()
        .await
        .unwrap();
    let lease = grant_as(&anon, "root", "rootpw", 60).await;

    // Without a token the services refuse.
    let e = anon.lock_service().lock("l", lease).await.unwrap_err();
    assert!(
        matches!(e.kind(), ErrorKind::UserEmpty | ErrorKind::PermissionDenied),
        "{e:?}"
    );
    let held = root.lock_service().lock("l", lease).await.unwrap();
    assert!(held.is_held().await.unwrap());
    held.unlock().await.unwrap();
    let es = root.election_service();
    let won = es.campaign("e", lease, "v1").await.unwrap().leader;

    // Disabling and re-enabling auth drops every token: the client's is now stale. The server
    // ends an Observe with a stale token silently; the stream re-authenticates and goes on.
    // (No observer runs before this point on purpose: etcd's election service runs the
    // internal watches of all observers on one stream that keeps the identity of the caller
    // that opened it, so an observer started while the old token was valid can leave a later
    // one stalled once that token is dropped: a server issue, not the client's.)
    root.auth().disable().await.unwrap();
    anon.auth().enable().await.unwrap();
    let mut obs = es.observe("e");
    assert_eq!(next_value(&mut obs).await.0, "v1");
    es.proclaim(&won, "v2").await.unwrap();
    assert_eq!(next_value(&mut obs).await.0, "v2");
    let held = root.lock_service().lock("l", lease).await.unwrap();
    assert!(held.is_held().await.unwrap());
}
