//! The toolkit's config source against a real etcd: etcd-only and hybrid (file base) modes,
//! typed reads, atomic writes, watch, bad values.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{client, etcd, wait_until};
use etcdv3::toolkit::{ToolkitError, ToolkitResult};
use serde::Deserialize;
use serde_json::json;

#[derive(Debug, Clone, PartialEq, Deserialize)]
struct Pool {
    size: u32,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
struct Db {
    host: String,
    port: u16,
    #[serde(default)]
    pool: Option<Pool>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
struct AppConfig {
    name: String,
    db: Db,
    #[serde(default)]
    debug: bool,
}

async fn next<T: Clone>(
    w: &mut etcdv3::toolkit::ConfigWatch<T>,
) -> ToolkitResult<etcdv3::toolkit::ConfigUpdate<T>> {
    tokio::time::timeout(Duration::from_secs(10), w.next())
        .await
        .expect("a config update within 10 s")
        .expect("the watch goes on")
}

#[tokio::test]
async fn etcd_only_read_set_delete_and_typed_watch() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let tk = c.toolkit().prefix("/apps/shop/");
    assert_eq!(tk.key_prefix(), "/apps/shop");
    let cfg = tk.config_source("myapp");
    assert_eq!(
        cfg.key("db.pool.size").unwrap(),
        "/apps/shop/config/myapp/db.pool.size"
    );

    // Empty config: an empty tree.
    assert_eq!(cfg.value().await.unwrap(), json!({}));

    cfg.set("name", "shop").await.unwrap();
    cfg.set("db", json!({"host": "db1", "port": 5432}))
        .await
        .unwrap();
    let rev = cfg.set("db.pool.size", 10).await.unwrap();
    // The raw keys are JSON text, one per dotted path.
    let raw = c
        .kv()
        .get("/apps/shop/config/myapp/db.pool.size")
        .await
        .unwrap();
    assert_eq!(raw.kvs[0].value_str().unwrap(), "10");
    assert_eq!(raw.kvs[0].mod_revision(), rev);

    assert_eq!(
        cfg.value().await.unwrap(),
        json!({"name": "shop", "db": {"host": "db1", "port": 5432, "pool": {"size": 10}}})
    );
    let typed: AppConfig = cfg.get().await.unwrap();
    assert_eq!(typed.db.pool, Some(Pool { size: 10 }));

    // The watch starts with the config as read, then follows every change, typed.
    let mut w = cfg.watch::<AppConfig>().await.unwrap();
    let first = next(&mut w).await.unwrap();
    assert_eq!(first.config, typed);
    assert!(first.revision >= rev);

    let rev2 = cfg.set("db.port", 6543).await.unwrap();
    let u = next(&mut w).await.unwrap();
    assert_eq!(u.config.db.port, 6543);
    assert_eq!(u.revision, rev2);

    // delete removes the path and everything below it, atomically.
    assert_eq!(cfg.delete("db.pool").await.unwrap(), 1);
    let u = next(&mut w).await.unwrap();
    assert_eq!(u.config.db.pool, None);
    assert_eq!(w.current().unwrap(), u);

    // A change made while nobody reads is not lost (the watch started at read revision + 1).
    c.kv()
        .put("/apps/shop/config/myapp/debug", "true")
        .await
        .unwrap();
    let u = next(&mut w).await.unwrap();
    assert!(u.config.debug);

    // Invalid paths are typed errors.
    for bad in ["", "a..b", ".a", "a/b"] {
        assert!(
            matches!(cfg.set(bad, 1).await, Err(ToolkitError::InvalidPath { .. })),
            "{bad:?}"
        );
    }
    assert!(matches!(
        c.toolkit().config_source("a/b").value().await,
        Err(ToolkitError::InvalidName { .. })
    ));
    assert!(matches!(
        c.toolkit().prefix("nope").config_source("x").value().await,
        Err(ToolkitError::InvalidPrefix { .. })
    ));
    // A tree that does not fit the type.
    cfg.set("db.port", "not a number").await.unwrap();
    assert!(matches!(
        cfg.get::<AppConfig>().await,
        Err(ToolkitError::Decode { .. })
    ));
}

#[tokio::test]
async fn a_bad_value_is_reported_with_its_key_and_the_last_good_config_stays() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let cfg = c.config_source("svc");
    cfg.set("name", "a").await.unwrap();
    cfg.set("db", json!({"host": "h", "port": 1}))
        .await
        .unwrap();
    let mut w = cfg.watch::<AppConfig>().await.unwrap();
    let good = next(&mut w).await.unwrap();
    assert_eq!(good.config.name, "a");

    c.kv()
        .put("/etcdv3/config/svc/name", "{oops")
        .await
        .unwrap();
    match next(&mut w).await {
        Err(ToolkitError::InvalidValue { key, .. }) => assert_eq!(key, "/etcdv3/config/svc/name"),
        other => panic!("expected InvalidValue, got {other:?}"),
    }
    assert_eq!(w.current().unwrap(), good, "the last good config stays");
    // A read reports it too.
    assert!(matches!(
        cfg.value().await,
        Err(ToolkitError::InvalidValue { key, .. }) if key == "/etcdv3/config/svc/name"
    ));
    // Another change while the bad value is there: still an error, still the old config.
    cfg.set("db.port", 2).await.unwrap();
    assert!(matches!(
        next(&mut w).await,
        Err(ToolkitError::InvalidValue { .. })
    ));
    assert_eq!(w.current().unwrap(), good);
    // Fixed: a new good config with both changes.
    cfg.set("name", "b").await.unwrap();
    let u = next(&mut w).await.unwrap();
    assert_eq!((u.config.name.as_str(), u.config.db.port), ("b", 2));
    assert_eq!(w.current().unwrap(), u);
}

#[tokio::test]
async fn changes_in_one_batch_are_coalesced_into_one_config() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let cfg = c.config_source("co");
    cfg.set("name", "n").await.unwrap();
    cfg.set("db", json!({"host": "h", "port": 1}))
        .await
        .unwrap();
    let mut w = cfg.watch::<AppConfig>().await.unwrap();
    next(&mut w).await.unwrap();
    // One transaction = one revision = one batch: one new config with every change.
    use etcdv3::Op;
    let r = c
        .kv()
        .txn()
        .and_then([
            Op::put("/etcdv3/config/co/db.port", "7"),
            Op::put("/etcdv3/config/co/db.host", "\"h2\""),
            Op::put("/etcdv3/config/co/debug", "true"),
        ])
        .await
        .unwrap();
    let u = next(&mut w).await.unwrap();
    assert_eq!(u.revision, r.header.revision);
    assert_eq!(
        (u.config.db.port, u.config.db.host.as_str(), u.config.debug),
        (7, "h2", true)
    );
    // Many writes while the consumer is away end as fewer (coalesced) configs, the last one
    // complete.
    let mut last = 0;
    for i in 0..50 {
        last = cfg.set("db.port", 100 + i).await.unwrap();
    }
    let mut seen = 0;
    loop {
        let u = next(&mut w).await.unwrap();
        seen += 1;
        if u.revision == last {
            assert_eq!(u.config.db.port, 149);
            break;
        }
    }
    assert!(seen <= 50, "{seen}");
}

#[tokio::test]
async fn hybrid_mode_overlays_etcd_on_yaml_toml_and_json_files() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let dir = tempfile::tempdir().unwrap();
    let files = [
        (
            "base.yaml",
            "name: from-file\ndb:\n  host: file-host\n  port: 1000\n  pool:\n    size: 4\n",
        ),
        (
            "base.toml",
            "name = \"from-file\"\n[db]\nhost = \"file-host\"\nport = 1000\n[db.pool]\nsize = 4\n",
        ),
        (
            "base.json",
            r#"{"name": "from-file", "db": {"host": "file-host", "port": 1000, "pool": {"size": 4}}}"#,
        ),
    ];
    let cfg_etcd = c.config_source("hy");
    cfg_etcd.set("db.port", 2000).await.unwrap();
    for (file, text) in files {
        let path = dir.path().join(file);
        std::fs::write(&path, text).unwrap();
        let cfg = c.config_source("hy").file(&path);
        // etcd wins at its path; everything else comes from the file.
        let v: AppConfig = cfg.get().await.unwrap();
        assert_eq!(
            v,
            AppConfig {
                name: "from-file".into(),
                db: Db {
                    host: "file-host".into(),
                    port: 2000,
                    pool: Some(Pool { size: 4 })
                },
                debug: false,
            },
            "{file}"
        );
        // A watch overlays later changes on the file too.
        let mut w = cfg.watch::<AppConfig>().await.unwrap();
        assert_eq!(next(&mut w).await.unwrap().config, v);
        cfg.set("db.pool.size", 8).await.unwrap();
        let u = next(&mut w).await.unwrap();
        assert_eq!(u.config.db.pool, Some(Pool { size: 8 }));
        assert_eq!(u.config.db.host, "file-host");
        // Deleting the etcd value brings the file's value back.
        cfg.delete("db.pool.size").await.unwrap();
        let u = next(&mut w).await.unwrap();
        assert_eq!(u.config.db.pool, Some(Pool { size: 4 }), "{file}");
    }
    // A missing file and an unknown extension are typed file errors.
    let missing = c.config_source("hy").file(dir.path().join("nope.yaml"));
    assert!(matches!(
        missing.value().await,
        Err(ToolkitError::File { .. })
    ));
    let odd = dir.path().join("base.ini");
    std::fs::write(&odd, "a=1").unwrap();
    assert!(matches!(
        c.config_source("hy").file(&odd).value().await,
        Err(ToolkitError::File { .. })
    ));
}

#[tokio::test]
async fn the_watch_task_ends_when_the_watch_is_dropped() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let cfg = c.config_source("t");
    cfg.set("x", 1).await.unwrap();
    // Warm up the client's shared workers (watch multiplexer) before taking the baseline.
    let warm = cfg.watch::<serde_json::Value>().await.unwrap();
    let m = tokio::runtime::Handle::current().metrics();
    let baseline = m.num_alive_tasks();
    let mut w = cfg.watch::<serde_json::Value>().await.unwrap();
    next(&mut w).await.unwrap();
    assert!(m.num_alive_tasks() > baseline);
    drop(w);
    wait_until(
        Duration::from_secs(10),
        "the config watch task to end",
        || {
            let n = m.num_alive_tasks();
            async move { n == baseline }
        },
    )
    .await;
    drop(warm);
}

#[tokio::test]
async fn current_follows_without_reading_and_a_compaction_is_read_again() {
    let etcd = etcd().await;
    let (proxy, watching) = common::proxied_client(&etcd).await;
    let writer = client(&etcd).await;
    let cfg = writer.config_source("app");
    cfg.set("name", "one").await.unwrap();
    cfg.set("db", json!({"host": "h", "port": 1}))
        .await
        .unwrap();
    let mut w = watching
        .config_source("app")
        .watch::<AppConfig>()
        .await
        .unwrap();
    assert_eq!(next(&mut w).await.unwrap().config.name, "one");

    // Nobody reads the stream: `current()` still follows every change.
    for i in 0..5 {
        cfg.set("name", format!("n{i}")).await.unwrap();
    }
    wait_until(Duration::from_secs(10), "current() to reach n4", || {
        let ok = w.current().is_some_and(|u| u.config.name == "n4");
        async move { ok }
    })
    .await;
    // The stream then reaches the newest config within two items (older ones were
    // replaced; one may wait ahead of it).
    let a = next(&mut w).await.unwrap().config.name;
    if a != "n4" {
        assert_eq!(next(&mut w).await.unwrap().config.name, "n4", "after {a}");
    }

    // Changes and a compaction while the watcher's connection is cut.
    proxy.blackhole();
    proxy.cut_all().await;
    cfg.set("name", "after").await.unwrap();
    let last = cfg.set("debug", true).await.unwrap();
    writer.kv().compact(last).await.unwrap();
    proxy.pass();
    let u = next(&mut w).await.unwrap();
    assert_eq!(u.config.name, "after");
    assert!(u.config.debug);
    assert!(u.revision >= last);
    // And it goes on.
    cfg.set("name", "later").await.unwrap();
    assert_eq!(next(&mut w).await.unwrap().config.name, "later");
}

#[tokio::test]
async fn a_good_config_waiting_to_be_read_is_not_lost_behind_a_bad_value() {
    // The consumer is behind: a new config waits for it; then a bad value comes. The stream
    // must still yield that newest good config, then the error (before, the error replaced
    // the config waiting to be read, and the stream never yielded it).
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let cfg = c.config_source("keep");
    cfg.set("name", "a").await.unwrap();
    cfg.set("db", json!({"host": "h", "port": 1}))
        .await
        .unwrap();
    let mut w = cfg.watch::<AppConfig>().await.unwrap();
    assert_eq!(next(&mut w).await.unwrap().config.name, "a");
    let mut seen = c
        .watch("/etcdv3/config/keep/debug")
        .await
        .expect("an observer on the same client");
    cfg.set("name", "b").await.unwrap();
    let r = cfg.set("name", "c").await.unwrap();
    wait_until(Duration::from_secs(10), "current() to reach c", || {
        let ok = w.current().is_some_and(|u| u.revision == r);
        async move { ok }
    })
    .await;
    c.kv()
        .put("/etcdv3/config/keep/debug", "{oops")
        .await
        .unwrap();
    // The client has the bad value's event (so, most likely, has the config's task).
    tokio::time::timeout(Duration::from_secs(10), seen.next())
        .await
        .expect("the observer saw the bad value")
        .unwrap()
        .unwrap();
    let mut names = Vec::new();
    loop {
        match next(&mut w).await {
            Ok(u) => names.push(u.config.name),
            Err(ToolkitError::InvalidValue { key, .. }) => {
                assert_eq!(key, "/etcdv3/config/keep/debug");
                break;
            }
            Err(e) => panic!("unexpected {e:?}"),
        }
        assert!(names.len() <= 2, "{names:?}");
    }
    assert_eq!(
        names.last().map(String::as_str),
        Some("c"),
        "the newest good config comes before the error: {names:?}"
    );
    assert_eq!(w.current().unwrap().config.name, "c");
}

#[tokio::test]
async fn a_read_again_after_a_compaction_that_fails_for_a_while_is_retried() {
    // The watch resumes on a compacted revision and reads the config again; that read fails
    // (every read refused) for a while. The stream reports it and goes on once reads work
    // (before, it yielded the error and ended).
    use std::sync::atomic::Ordering::SeqCst;
    let etcd = etcd().await;
    let refuse = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (proxy, watching) =
        common::proxied_client_with(&etcd, common::refuse_reads(refuse.clone())).await;
    let writer = client(&etcd).await;
    let cfg = writer.config_source("retry");
    cfg.set("name", "one").await.unwrap();
    cfg.set("db", json!({"host": "h", "port": 1}))
        .await
        .unwrap();
    let mut w = watching
        .config_source("retry")
        .watch::<AppConfig>()
        .await
        .unwrap();
    assert_eq!(next(&mut w).await.unwrap().config.name, "one");
    proxy.blackhole();
    proxy.cut_all().await;
    cfg.set("name", "after").await.unwrap();
    let last = cfg.set("debug", true).await.unwrap();
    writer.kv().compact(last).await.unwrap();
    refuse.store(true, SeqCst);
    proxy.pass();
    match next(&mut w).await {
        Err(ToolkitError::Etcd(e)) => assert!(e.is_retryable() || e.is_deadline(), "{e:?}"),
        other => panic!("expected the failed read, got {other:?}"),
    }
    refuse.store(false, SeqCst);
    let u = loop {
        match next(&mut w).await {
            Ok(u) => break u,
            // Further failed tries may be reported before the one that succeeds.
            Err(ToolkitError::Etcd(e)) if e.is_retryable() || e.is_deadline() => {}
            Err(e) => panic!("unexpected {e:?}"),
        }
    };
    assert_eq!(u.config.name, "after");
    assert!(u.config.debug);
    // And it goes on.
    cfg.set("name", "later").await.unwrap();
    assert_eq!(next(&mut w).await.unwrap().config.name, "later");
}

/// A dotted path through an array: an index names the element, in the file's array (hybrid
/// mode) and in an array stored whole in etcd.
#[tokio::test]
async fn an_index_in_a_path_replaces_an_array_element() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("base.json");
    std::fs::write(
        &path,
        r#"{"servers": [{"host": "a", "port": 1}, {"host": "b", "port": 2}], "tags": ["x"]}"#,
    )
    .unwrap();
    let cfg = c.config_source("arr").file(&path);
    cfg.set("servers.1.port", 20).await.unwrap();
    cfg.set("tags.0", "y").await.unwrap();
    assert_eq!(
        cfg.value().await.unwrap(),
        json!({"servers": [{"host": "a", "port": 1}, {"host": "b", "port": 20}], "tags": ["y"]})
    );
    // An array stored whole in etcd, then one element of it; a watch sees the element change.
    cfg.set("ports", json!([80, 443])).await.unwrap();
    cfg.set("ports.1", 8443).await.unwrap();
    let mut w = cfg.watch::<serde_json::Value>().await.unwrap();
    assert_eq!(
        next(&mut w).await.unwrap().config["ports"],
        json!([80, 8443])
    );
    cfg.set("ports.0", 8080).await.unwrap();
    assert_eq!(
        next(&mut w).await.unwrap().config["ports"],
        json!([8080, 8443])
    );
    // Deleting the element's value brings back the element stored whole.
    cfg.delete("ports.1").await.unwrap();
    assert_eq!(
        next(&mut w).await.unwrap().config["ports"],
        json!([8080, 443])
    );
}
