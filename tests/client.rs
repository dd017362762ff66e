//! The client itself: runtimes, executors, task lifetimes, connecting, credentials.

mod common;

use std::future::IntoFuture;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{client, etcd};
use etcdv3::testkit::EtcdCluster;
use etcdv3::{BoxFuture, Client, ErrorKind};

fn start_etcd_blocking() -> EtcdCluster {
    EtcdCluster::builder()
        .start()
        .unwrap_or_else(|e| panic!("could not start etcd: {e}"))
}

async fn exercise(c: &Client) {
    let kv = c.kv();
    for i in 0..20 {
        kv.put(format!("rt/{i}"), "v").await.unwrap();
    }
    let got = kv.get("rt/").prefix().count_only().await.unwrap();
    assert_eq!(got.count, 20);
    // Concurrent requests on one connection.
    let futs: Vec<_> = (0..16)
        .map(|i| c.kv().get(format!("rt/{i}")).into_future())
        .collect();
    for r in futures::future::join_all(futs).await {
        assert_eq!(r.unwrap().kvs.len(), 1);
    }
}

#[test]
fn works_on_a_current_thread_runtime() {
    let etcd = start_etcd_blocking();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let c = client(&etcd).await;
        exercise(&c).await;
    });
}

#[test]
fn works_on_a_multi_thread_runtime() {
    let etcd = start_etcd_blocking();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let c = client(&etcd).await;
        // Used from several spawned tasks at once: Client is Send + Sync + Clone.
        let handles: Vec<_> = (0..4)
            .map(|t| {
                let c = c.clone();
                tokio::spawn(async move {
                    for i in 0..10 {
                        c.kv().put(format!("mt/{t}/{i}"), "v").await.unwrap();
                    }
                })
            })
            .collect();
        for h in handles {
            h.await.unwrap();
        }
        assert_eq!(
            c.kv().get("mt/").prefix().count_only().await.unwrap().count,
            40
        );
    });
}

/// Waits (bounded) until the runtime's live task count is back at `baseline`.
async fn wait_for_tasks(baseline: usize) {
    let m = tokio::runtime::Handle::current().metrics();
    common::wait_until(Duration::from_secs(10), "background tasks to end", || {
        let n = m.num_alive_tasks();
        async move { n == baseline }
    })
    .await;
}

#[test]
fn background_tasks_end_when_the_last_handle_drops() {
    let etcd = start_etcd_blocking();
    for flavor in ["current_thread", "multi_thread"] {
        let rt = match flavor {
            "current_thread" => tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
            _ => tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap(),
        };
        rt.block_on(async {
            let metrics = tokio::runtime::Handle::current().metrics();
            let baseline = metrics.num_alive_tasks();
            let c = client(&etcd).await;
            let kv = c.kv();
            let clone = c.clone();
            exercise(&c).await;
            assert!(
                metrics.num_alive_tasks() > baseline,
                "{flavor}: the connection runs as background tasks"
            );
            drop(c);
            // Handles still alive: tasks must still be there and the client usable.
            kv.get("rt/1").await.unwrap();
            drop(kv);
            clone.kv().get("rt/1").await.unwrap();
            drop(clone);
            wait_for_tasks(baseline).await;
        });
    }
}

#[tokio::test]
async fn close_ends_background_tasks_while_clones_live() {
    let etcd = etcd().await;
    let metrics = tokio::runtime::Handle::current().metrics();
    let baseline = metrics.num_alive_tasks();
    let c = client(&etcd).await;
    let clone = c.clone();
    exercise(&c).await;
    assert!(metrics.num_alive_tasks() > baseline);
    c.close().await;
    wait_for_tasks(baseline).await;
    assert_eq!(
        clone.kv().get("x").await.unwrap_err().kind(),
        ErrorKind::Closed
    );
}

#[tokio::test]
async fn tasks_are_spawned_through_a_user_executor() {
    let etcd = etcd().await;
    let spawned = Arc::new(AtomicUsize::new(0));
    let counter = spawned.clone();
    let exec = move |fut: BoxFuture| {
        counter.fetch_add(1, Ordering::SeqCst);
        drop(tokio::spawn(fut));
    };
    let c = Client::builder(etcd.endpoints())
        .executor(exec)
        .connect()
        .await
        .unwrap();
    exercise(&c).await;
    assert!(
        spawned.load(Ordering::SeqCst) >= 1,
        "the connection's tasks went through the executor"
    );
}

#[tokio::test]
async fn connect_skips_a_dead_endpoint() {
    let etcd = etcd().await;
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let c = Client::builder([dead, etcd.endpoint(0)])
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await
        .unwrap();
    c.kv().put("k", "v").await.unwrap();
    assert_eq!(c.endpoints().len(), 2);
}

#[tokio::test]
async fn lazy_client_connects_on_first_use() {
    let etcd = etcd().await;
    let c = Client::builder(etcd.endpoints()).connect_lazy().unwrap();
    c.kv().put("lazy", "yes").await.unwrap();
    let v = c.kv().get("lazy").await.unwrap();
    assert_eq!(v.kvs[0].value_str().unwrap(), "yes");
    // host:port endpoint form.
    let hp = etcd.endpoint(0).trim_start_matches("http://").to_owned();
    let c2 = Client::connect([hp]).await.unwrap();
    assert_eq!(c2.kv().get("lazy").await.unwrap().count, 1);
}

#[tokio::test]
async fn raw_clients_reach_every_service() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let raw = c.raw().unwrap();
    use etcdv3::raw::etcdserverpb as pb;
    let status = raw
        .maintenance()
        .status(pb::StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(status.version.starts_with("3."), "{}", status.version);
    let members = raw
        .cluster()
        .member_list(pb::MemberListRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(members.members.len(), 1);
    assert_eq!(members.members[0].client_ur_ls, vec![etcd.endpoint(0)]);
}

#[tokio::test]
async fn token_auth_and_wrong_password() {
    let etcd = etcd().await;
    let admin = client(&etcd).await;
    let mut auth = admin.raw().unwrap().auth();
    use etcdv3::raw::etcdserverpb as pb;
    auth.user_add(pb::AuthUserAddRequest {
        name: "root".into(),
        password: "rootpw".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    auth.user_grant_role(pb::AuthUserGrantRoleRequest {
        user: "root".into(),
        role: "root".into(),
    })
    .await
    .unwrap();
    auth.auth_enable(pb::AuthEnableRequest {}).await.unwrap();

    // Without credentials: the server refuses.
    let anon = client(&etcd).await;
    let e = anon.kv().put("k", "v").await.unwrap_err();
    assert!(
        matches!(e.kind(), ErrorKind::UserEmpty | ErrorKind::InvalidAuthToken),
        "{e:?}"
    );
    // Wrong password: typed error at connect.
    let e = Client::builder(etcd.endpoints())
        .user("root", "nope")
        .connect()
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AuthFailed, "{e:?}");
    // Right password: requests carry the token.
    let root = Client::builder(etcd.endpoints())
        .user("root", "rootpw")
        .connect()
        .await
        .unwrap();
    root.kv().put("k", "v").await.unwrap();
    assert_eq!(
        root.kv().get("k").await.unwrap().kvs[0]
            .value_str()
            .unwrap(),
        "v"
    );
    // A lazy client authenticates on first use.
    let lazy = Client::builder(etcd.endpoints())
        .user("root", "rootpw")
        .connect_lazy()
        .unwrap();
    assert_eq!(lazy.kv().get("k").await.unwrap().count, 1);
}

#[tokio::test]
async fn extreme_settings_are_taken_as_off_or_unbounded() {
    // `Duration::MAX` as a timeout is no deadline (not a panic); a zero keep-alive interval
    // turns pings off (not a ping storm, which etcd answers with GOAWAY), and a zero
    // auto-sync interval turns auto-sync off (not a member-list loop).
    let etcd = etcd().await;
    let proxy = etcdv3::testkit::FaultProxy::start(etcd.client_addr(0))
        .await
        .unwrap();
    let c = Client::builder([proxy.endpoint()])
        .request_timeout(Duration::MAX)
        .keep_alive_interval(Duration::ZERO)
        .auto_sync_interval(Duration::ZERO)
        .connect()
        .await
        .unwrap();
    c.kv().put("x", "1").await.unwrap();
    let got = c.kv().get("x").timeout(Duration::MAX).await.unwrap();
    assert_eq!(got.kvs[0].value_str().unwrap(), "1");
    // With a stream open for a while, the one connection stays up.
    let mut w = c.watch("x").await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    c.kv().put("x", "2").await.unwrap();
    let b = tokio::time::timeout(Duration::from_secs(10), w.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(b.events()[0].kv.value_str().unwrap(), "2");
    assert_eq!(proxy.connections_total(), 1, "never reconnected");
    assert_eq!(c.watch_stats().streams_opened, 1);
}
