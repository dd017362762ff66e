//! The auth API and token authentication against a real etcd: users, roles, permissions,
//! enabling auth, typed errors, and token expiry under concurrency (one shared
//! re-authentication).

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::{client, etcd, etcd_with, version_of, wait_for_token_expiry};
use etcdv3::testkit::EtcdCluster;
use etcdv3::{Client, ErrorKind, Permission, PermissionType};

/// Create `root` (with the root role) and enable auth.
async fn enable_auth(admin: &Client) {
    let auth = admin.auth();
    auth.user_add("root", "rootpw").await.unwrap();
    auth.user_grant_role("root", "root").await.unwrap();
    auth.enable().await.unwrap();
}

async fn login(etcd: &EtcdCluster, user: &str, password: &str) -> etcdv3::Result<Client> {
    Client::builder(etcd.endpoints())
        .user(user, password)
        .request_timeout(Duration::from_secs(10))
        .connect()
        .await
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

#[tokio::test]
async fn user_role_permission_round_trip() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let auth = c.auth();
    let v = version_of(&etcd);

    // Auth status: 3.5 has it, 3.4 does not.
    match auth.status().await {
        Ok(s) => {
            assert!(v >= (3, 5), "{v:?}");
            assert!(!s.enabled);
        }
        Err(e) => {
            assert!(v < (3, 5), "{e:?}");
            assert_eq!(e.kind(), ErrorKind::Unimplemented, "{e:?}");
        }
    }

    // Users.
    let added = auth.user_add("alice", "alicepw").await.unwrap();
    assert!(added.header.revision >= 1);
    assert_eq!(
        auth.user_add("alice", "x").await.unwrap_err().kind(),
        ErrorKind::UserAlreadyExist
    );
    auth.user_add_no_password("svc").await.unwrap();
    assert_eq!(
        auth.user_add("", "x").await.unwrap_err().kind(),
        ErrorKind::UserEmpty
    );
    let users = auth.user_list().await.unwrap().users;
    assert_eq!(sorted(users), ["alice", "svc"]);
    assert!(auth.user_get("alice").await.unwrap().roles.is_empty());
    assert_eq!(
        auth.user_get("nobody").await.unwrap_err().kind(),
        ErrorKind::UserNotFound
    );

    // Roles and permissions: key, range, prefix, every kind.
    auth.role_add("app").await.unwrap();
    assert_eq!(
        auth.role_add("app").await.unwrap_err().kind(),
        ErrorKind::RoleAlreadyExist
    );
    auth.role_grant_permission("app", Permission::read("/app/").prefix())
        .await
        .unwrap();
    auth.role_grant_permission("app", Permission::write("/app/out"))
        .await
        .unwrap();
    auth.role_grant_permission("app", Permission::read_write("a").range("c"))
        .await
        .unwrap();
    let perms = auth.role_get("app").await.unwrap().permissions;
    assert_eq!(perms.len(), 3, "{perms:?}");
    let expect = [
        Permission::read("/app/").prefix(),
        Permission::write("/app/out"),
        Permission::read_write("a").range("c"),
    ];
    for p in &expect {
        assert!(perms.contains(p), "{p:?} not in {perms:?}");
    }
    assert_eq!(
        auth.role_get("nope").await.unwrap_err().kind(),
        ErrorKind::RoleNotFound
    );
    assert_eq!(
        auth.role_grant_permission("nope", Permission::read("k"))
            .await
            .unwrap_err()
            .kind(),
        ErrorKind::RoleNotFound
    );
    let roles = auth.role_list().await.unwrap().roles;
    assert_eq!(sorted(roles), ["app"]);

    // Grant and revoke roles.
    auth.user_grant_role("alice", "app").await.unwrap();
    auth.user_grant_role("svc", "app").await.unwrap();
    assert_eq!(auth.user_get("alice").await.unwrap().roles, ["app"]);
    assert_eq!(
        auth.user_grant_role("alice", "nope")
            .await
            .unwrap_err()
            .kind(),
        ErrorKind::RoleNotFound
    );
    auth.user_revoke_role("svc", "app").await.unwrap();
    assert!(auth.user_get("svc").await.unwrap().roles.is_empty());
    assert_eq!(
        auth.user_revoke_role("svc", "app")
            .await
            .unwrap_err()
            .kind(),
        ErrorKind::RoleNotGranted
    );

    // Revoke permissions: key and range must match exactly.
    auth.role_revoke_permission("app", "/app/")
        .prefix()
        .await
        .unwrap();
    assert_eq!(
        auth.role_revoke_permission("app", "/app/")
            .prefix()
            .await
            .unwrap_err()
            .kind(),
        ErrorKind::PermissionNotGranted
    );
    auth.role_revoke_permission("app", "a")
        .range("c")
        .await
        .unwrap();
    let perms = auth.role_get("app").await.unwrap().permissions;
    assert_eq!(perms, [Permission::write("/app/out")]);
    assert_eq!(perms[0].kind, PermissionType::Write);

    // Enabling needs root.
    assert_eq!(
        auth.enable().await.unwrap_err().kind(),
        ErrorKind::RootUserNotExist
    );
    auth.user_add("root", "rootpw").await.unwrap();
    assert_eq!(
        auth.enable().await.unwrap_err().kind(),
        ErrorKind::RootRoleNotExist
    );
    auth.user_grant_role("root", "root").await.unwrap();
    auth.enable().await.unwrap();

    // Now the anonymous client is refused, with a typed error.
    let e = c.kv().get("k").await.unwrap_err();
    assert!(
        matches!(e.kind(), ErrorKind::UserEmpty | ErrorKind::InvalidAuthToken),
        "{e:?}"
    );
    let root = login(&etcd, "root", "rootpw").await.unwrap();
    if v >= (3, 5) {
        let s = root.auth().status().await.unwrap();
        assert!(s.enabled);
        assert!(s.auth_revision > 0);
    }

    // Password change: the old one stops working, the new one works.
    login(&etcd, "alice", "alicepw").await.unwrap();
    root.auth()
        .user_change_password("alice", "newpw")
        .await
        .unwrap();
    assert_eq!(
        login(&etcd, "alice", "alicepw").await.unwrap_err().kind(),
        ErrorKind::AuthFailed
    );
    let alice = login(&etcd, "alice", "newpw").await.unwrap();
    // A user without the root role cannot manage auth.
    assert_eq!(
        alice.auth().user_list().await.unwrap_err().kind(),
        ErrorKind::PermissionDenied
    );
    // A user without a password cannot log in with one.
    let e = login(&etcd, "svc", "").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AuthFailed, "{e:?}");

    // Deletes.
    root.auth().user_delete("alice").await.unwrap();
    assert_eq!(
        root.auth().user_delete("alice").await.unwrap_err().kind(),
        ErrorKind::UserNotFound
    );
    root.auth().role_delete("app").await.unwrap();
    assert_eq!(
        root.auth().role_delete("app").await.unwrap_err().kind(),
        ErrorKind::RoleNotFound
    );
    assert_eq!(
        sorted(root.auth().user_list().await.unwrap().users),
        ["root", "svc"]
    );
    // The built-in root role is not stored, so not listed.
    assert!(root.auth().role_list().await.unwrap().roles.is_empty());

    // Disable: the anonymous client works again.
    root.auth().disable().await.unwrap();
    c.kv().put("k", "v").await.unwrap();
    if v >= (3, 5) {
        assert!(!c.auth().status().await.unwrap().enabled);
    }
}

#[tokio::test]
async fn read_only_user_on_a_prefix_is_denied_writes_and_other_keys() {
    let etcd = etcd().await;
    let admin = client(&etcd).await;
    admin.kv().put("/ro/a", "1").await.unwrap();
    admin.kv().put("/other", "2").await.unwrap();
    let auth = admin.auth();
    auth.role_add("reader").await.unwrap();
    auth.role_grant_permission("reader", Permission::read("/ro/").prefix())
        .await
        .unwrap();
    auth.user_add("reader", "readerpw").await.unwrap();
    auth.user_grant_role("reader", "reader").await.unwrap();
    enable_auth(&admin).await;

    let r = login(&etcd, "reader", "readerpw").await.unwrap();
    let got = r.kv().get("/ro/").prefix().await.unwrap();
    assert_eq!(got.count, 1);
    assert_eq!(got.kvs[0].value_str().unwrap(), "1");
    // Write inside the prefix: denied.
    let e = r.kv().put("/ro/a", "x").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e:?}");
    let e = r.kv().delete("/ro/a").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e:?}");
    // Read outside the prefix: denied.
    let e = r.kv().get("/other").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e:?}");
    // A range wider than the prefix: denied.
    let e = r.kv().get("/").prefix().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e:?}");
    // Nothing was written.
    let root = login(&etcd, "root", "rootpw").await.unwrap();
    assert_eq!(
        root.kv().get("/ro/a").await.unwrap().kvs[0]
            .value_str()
            .unwrap(),
        "1"
    );
    // Granting write makes the same put succeed (the client picks up the new auth revision).
    root.auth()
        .role_grant_permission("reader", Permission::read_write("/ro/").prefix())
        .await
        .unwrap();
    r.kv().put("/ro/a", "x").await.unwrap();
}

#[tokio::test]
async fn wrong_password_is_a_typed_error_at_connect_and_on_first_use() {
    let etcd = etcd().await;
    enable_auth(&client(&etcd).await).await;
    let e = login(&etcd, "root", "wrong").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AuthFailed, "{e:?}");
    let e = login(&etcd, "ghost", "x").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AuthFailed, "{e:?}");
    let lazy = Client::builder(etcd.endpoints())
        .user("root", "wrong")
        .connect_lazy()
        .unwrap();
    let e = lazy.kv().get("k").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AuthFailed, "{e:?}");
    // Every call path carries the token: cluster, maintenance (pinned and chosen member), auth.
    let root = login(&etcd, "root", "rootpw").await.unwrap();
    assert_eq!(root.cluster().member_list().await.unwrap().members.len(), 1);
    root.maintenance().hash_kv(0).await.unwrap();
    root.maintenance_at(&etcd.endpoint(0))
        .unwrap()
        .defragment()
        .await
        .unwrap();
    assert_eq!(
        sorted(root.auth().user_list().await.unwrap().users),
        ["root"]
    );
    // Defragment needs the root role: an anonymous client is refused.
    let anon = client(&etcd).await;
    let e = anon
        .maintenance_at(&etcd.endpoint(0))
        .unwrap()
        .defragment()
        .await
        .unwrap_err();
    assert!(
        matches!(e.kind(), ErrorKind::UserEmpty | ErrorKind::PermissionDenied),
        "{e:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Token expiry

/// How many Authenticate RPCs the member at `addr` has started, from its Prometheus metrics.
fn authenticate_calls(addr: SocketAddr) -> u64 {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    let mut total = 0;
    let mut seen = false;
    for line in body.lines() {
        if line.starts_with("grpc_server_started_total{")
            && line.contains("grpc_method=\"Authenticate\"")
        {
            seen = true;
            let v = line.rsplit(' ').next().unwrap();
            total += v.parse::<f64>().unwrap() as u64;
        }
    }
    assert!(seen, "no Authenticate metric in /metrics");
    total
}

#[tokio::test]
async fn expired_token_is_refreshed_once_for_fifty_concurrent_requests() {
    let ttl = Duration::from_secs(2);
    let etcd = etcd_with(&["--auth-token=simple", "--auth-token-ttl=2"]).await;
    let anon = client(&etcd).await;
    enable_auth(&anon).await;
    let root = login(&etcd, "root", "rootpw").await.unwrap();
    root.kv().put("k", "v").await.unwrap();

    for round in 0..2 {
        // The client's token was last used just now; wait until the server has dropped it.
        wait_for_token_expiry(&anon, ttl).await;
        let before = authenticate_calls(etcd.client_addr(0));
        let futs: Vec<_> = (0..50)
            .map(|i| {
                let root = root.clone();
                async move {
                    match i % 5 {
                        0 => root.kv().put(format!("c/{i}"), "v").await.map(|_| ()),
                        1 => root.kv().get("k").await.map(|r| assert_eq!(r.count, 1)),
                        2 => root.auth().user_list().await.map(|_| ()),
                        3 => root.cluster().member_list().await.map(|_| ()),
                        _ => root.maintenance().hash_kv(0).await.map(|_| ()),
                    }
                }
            })
            .collect();
        let results = futures::future::join_all(futs).await;
        for (i, r) in results.into_iter().enumerate() {
            if let Err(e) = r {
                panic!("round {round}: request {i} failed: {e:?}");
            }
        }
        let after = authenticate_calls(etcd.client_addr(0));
        assert_eq!(
            after - before,
            1,
            "round {round}: exactly one re-authentication for 50 concurrent requests"
        );
        assert_eq!(
            root.kv()
                .get("c/")
                .prefix()
                .count_only()
                .await
                .unwrap()
                .count,
            10
        );
    }
}

#[tokio::test]
async fn tokens_dropped_by_the_server_are_refreshed_transparently() {
    // Disabling auth drops every token on the server; after enabling it again the client's
    // token is unknown, and its next request re-authenticates once.
    let etcd = etcd().await;
    let anon = client(&etcd).await;
    enable_auth(&anon).await;
    let root = login(&etcd, "root", "rootpw").await.unwrap();
    root.kv().put("k", "1").await.unwrap();
    root.auth().disable().await.unwrap();
    anon.auth().enable().await.unwrap();
    let before = authenticate_calls(etcd.client_addr(0));
    root.kv().put("k", "2").await.unwrap();
    assert_eq!(authenticate_calls(etcd.client_addr(0)) - before, 1);
    assert_eq!(
        root.kv().get("k").await.unwrap().kvs[0]
            .value_str()
            .unwrap(),
        "2"
    );
    assert_eq!(authenticate_calls(etcd.client_addr(0)) - before, 1);
}

#[tokio::test]
async fn credentials_work_while_auth_is_disabled_and_after_it_is_enabled() {
    let etcd = etcd().await;
    let admin = client(&etcd).await;
    // As Go's client does: the server says auth is not enabled, so requests go without a token.
    let c = login(&etcd, "root", "rootpw").await.unwrap();
    c.kv().put("k", "v1").await.unwrap();
    enable_auth(&admin).await;
    // Now the server asks for a user: the client authenticates and retries once.
    c.kv().put("k", "v2").await.unwrap();
    let got = c.kv().get("k").await.unwrap();
    assert_eq!(got.kvs[0].value_str().unwrap(), "v2");
    // Streams carry the fresh token too.
    let mut w = c.watch("k").await.unwrap();
    c.kv().put("k", "v3").await.unwrap();
    let batch = tokio::time::timeout(Duration::from_secs(10), w.next())
        .await
        .expect("a batch within 10 s")
        .expect("the watcher is open")
        .unwrap();
    assert_eq!(batch.events()[0].kv.value_str().unwrap(), "v3");
    // A client without credentials is refused with the server's kind.
    let e = admin.kv().get("k").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::UserEmpty, "{e:?}");
}

#[tokio::test]
async fn authentication_fails_over_from_a_dead_endpoint() {
    // The first endpoint refuses connections. Authenticating there fails as any request
    // would: the endpoint is left for the next, and the request succeeds there.
    let etcd = etcd().await;
    let admin = client(&etcd).await;
    enable_auth(&admin).await;
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let c = Client::builder([format!("http://{dead}"), etcd.endpoints()[0].clone()])
        .user("root", "rootpw")
        .request_timeout(Duration::from_secs(10))
        .connect_lazy()
        .unwrap();
    for i in 0..3 {
        c.kv().put("af", format!("{i}")).await.unwrap();
        assert_eq!(
            c.kv().get("af").await.unwrap().kvs[0].value_str().unwrap(),
            i.to_string()
        );
    }
}
