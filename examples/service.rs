//! A small service built on the application toolkit: it reads its config (a local YAML file as
//! the base, etcd values overlaid), registers itself, discovers its peers, elects a leader among
//! the instances, and follows config and peer changes for a few seconds.
//!
//! ```text
//! cargo run --example service --features toolkit-files                    # starts etcd itself
//! cargo run --example service --features toolkit-files -- 127.0.0.1:2379  # or use a running etcd
//! ```

use std::collections::BTreeMap;
use std::time::Duration;

use etcdv3::Client;
use etcdv3::testkit::EtcdCluster;
use etcdv3::toolkit::{RegistrationEvent, ServiceEvent, ServiceInfo};
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
struct Config {
    listen: String,
    workers: u32,
    #[serde(default)]
    greeting: String,
}

const BASE_CONFIG: &str = "listen: 127.0.0.1:7000\nworkers: 2\ngreeting: hello from the file\n";

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // The endpoints given on the command line, or a throwaway etcd started now.
    let (endpoints, _cluster) = EtcdCluster::builder().endpoints_or_start(args).await?;
    let client = Client::builder(endpoints)
        .request_timeout(Duration::from_secs(5))
        .connect()
        .await?;
    let tk = client.toolkit().prefix("/demo");
    tk.validate()?;

    // Config: the file is the base, etcd overrides single paths.
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("billing.yaml");
    std::fs::write(&file, BASE_CONFIG)?;
    let source = tk.config_source("billing").file(&file);
    source.set("workers", 8).await?;
    let mut config = source.watch::<Config>().await?;
    let first = config.next().await.ok_or("config watch ended")??;
    println!(
        "config at revision {}: {:?} (workers from etcd, the rest from the file)",
        first.revision, first.config
    );

    // Register this instance and a peer; discover them.
    let me = tk
        .register(
            ServiceInfo::new("billing", "billing-1", first.config.listen.clone())
                .metadata("version", "1.0"),
        )
        .ttl(Duration::from_secs(10))
        .await?;
    let mut my_events = me.events();
    println!("registered: {:?}", my_events.next().await);
    let peer = tk
        .register(ServiceInfo::new("billing", "billing-2", "127.0.0.1:7001"))
        .await?;
    for p in tk.discover("billing").await? {
        println!("peer {} at {} {:?}", p.id, p.address, p.metadata);
    }

    // Elect a leader among the instances: the first campaigner wins; the other waits.
    let leadership = tk
        .campaign("billing-leader", "billing-1", Duration::from_secs(10))
        .await?;
    println!(
        "leader of billing: {:?} (this instance leads: {})",
        tk.leader("billing-leader").await?,
        leadership.is_leader()
    );

    // Follow the peers: the stream starts with the current ones.
    let mut peers = tk.watch_service("billing").await?;
    let cache = tk.service_cache("billing").await?;
    for _ in 0..2 {
        if let Some(ev) = peers.next().await {
            println!("peers: {:?}", ev?);
        }
    }
    me.update_metadata(BTreeMap::from([("version".into(), "1.1".into())]))
        .await?;
    peer.deregister().await?;
    for _ in 0..2 {
        match tokio::time::timeout(Duration::from_secs(5), peers.next()).await {
            Ok(Some(Ok(ServiceEvent::Modified(i)))) => {
                println!("modified: {} {:?}", i.id, i.metadata)
            }
            Ok(Some(Ok(ServiceEvent::Removed(i)))) => println!("removed: {}", i.id),
            other => println!("peers: {other:?}"),
        }
    }
    // The cache follows on its own; wait (bounded) until it reflects the removal.
    let mut cache_changes = cache.clone();
    for _ in 0..10 {
        if cache.len() == 1 {
            break;
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), cache_changes.changed()).await;
    }
    println!("cache now holds {} instance(s)", cache.len());

    // A config change made elsewhere reaches the service typed.
    source.set("greeting", "hello from etcd").await?;
    if let Ok(Some(update)) = tokio::time::timeout(Duration::from_secs(5), config.next()).await {
        let c = update?.config;
        println!(
            "config changed: {} workers, greeting {:?}",
            c.workers, c.greeting
        );
    }

    // Graceful shutdown: step down as leader, deregister (revokes the lease, the record goes
    // at once).
    leadership.resign().await?;
    me.deregister().await?;
    if let Ok(Some(RegistrationEvent::Updated)) =
        tokio::time::timeout(Duration::from_secs(1), my_events.next()).await
    {
        println!("(the metadata update was reported on the events stream)");
    }
    println!(
        "deregistered; instances left: {}",
        tk.discover("billing").await?.len()
    );
    Ok(())
}
