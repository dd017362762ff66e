//! TLS and mutual TLS against real etcd clusters serving https:// endpoints.

mod common;

use std::time::Duration;

use etcdv3::testkit::{EtcdCluster, TestCerts};
use etcdv3::{Client, ErrorKind, TlsOptions};

async fn tls_cluster(members: usize, client_cert_auth: bool) -> EtcdCluster {
    EtcdCluster::builder()
        .members(members)
        .tls(client_cert_auth)
        .start_async()
        .await
        .unwrap_or_else(|e| panic!("could not start a TLS etcd cluster: {e}"))
}

#[tokio::test]
async fn three_member_tls_cluster_works_and_fails_over() {
    let cluster = tls_cluster(3, false).await;
    let eps = cluster.endpoints();
    assert!(
        eps.iter().all(|e| e.starts_with("https://127.0.0.1:")),
        "{eps:?}"
    );
    let certs = cluster.certs().unwrap();
    let c = Client::builder(eps)
        .tls(TlsOptions::new().ca_pem(&certs.ca_pem))
        .request_timeout(Duration::from_secs(5))
        .connect()
        .await
        .unwrap();
    c.kv().put("secure", "yes").await.unwrap();
    assert_eq!(
        c.kv().get("secure").await.unwrap().kvs[0]
            .value_str()
            .unwrap(),
        "yes"
    );
    // Failover between https endpoints.
    let pinned = (0..3)
        .find(|&i| cluster.endpoint(i) == c.pinned_endpoint())
        .unwrap();
    cluster.kill(pinned).unwrap();
    let r = c.kv().get("secure").await.unwrap();
    assert_eq!(r.kvs[0].value_str().unwrap(), "yes");
    assert_ne!(c.pinned_endpoint(), cluster.endpoint(pinned));

    // With TLS settings, `host:port` endpoints (no scheme) use TLS too, as in Go's client.
    let bare: Vec<String> = (0..3)
        .filter(|&i| i != pinned)
        .map(|i| cluster.client_addr(i).to_string())
        .collect();
    let c = Client::builder(bare)
        .tls(TlsOptions::new().ca_pem(&certs.ca_pem))
        .request_timeout(Duration::from_secs(5))
        .connect()
        .await
        .unwrap();
    assert_eq!(
        c.kv().get("secure").await.unwrap().kvs[0]
            .value_str()
            .unwrap(),
        "yes"
    );
}

#[tokio::test]
async fn a_wrong_ca_fails_with_a_clear_error() {
    let cluster = tls_cluster(1, false).await;
    let other = TestCerts::generate().unwrap();
    let e = Client::builder(cluster.endpoints())
        .tls(TlsOptions::new().ca_pem(&other.ca_pem))
        .connect_timeout(Duration::from_secs(3))
        .connect()
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e:?}");
    let text = e.to_string().to_lowercase();
    assert!(
        text.contains("certificate"),
        "names the certificate problem: {e}"
    );
    // Plain HTTP to a TLS port fails too, it does not hang.
    let plain = cluster.endpoint(0).replace("https://", "http://");
    let e = Client::builder([plain])
        .connect_timeout(Duration::from_secs(3))
        .request_timeout(Duration::from_secs(3))
        .connect()
        .await;
    if let Ok(c) = e {
        assert!(c.kv().get("k").await.is_err());
    }
}

#[tokio::test]
async fn mutual_tls_needs_the_client_certificate() {
    let cluster = tls_cluster(1, true).await;
    let certs = cluster.certs().unwrap().clone();
    let with_cert = Client::builder(cluster.endpoints())
        .tls(
            TlsOptions::new()
                .ca_pem(&certs.ca_pem)
                .identity(&certs.client_cert_pem, &certs.client_key_pem),
        )
        .request_timeout(Duration::from_secs(5))
        .connect()
        .await
        .unwrap();
    with_cert.kv().put("m", "tls").await.unwrap();
    assert_eq!(with_cert.kv().get("m").await.unwrap().count, 1);

    // Without a client certificate the server refuses the handshake.
    let without = Client::builder(cluster.endpoints())
        .tls(TlsOptions::new().ca_pem(&certs.ca_pem))
        .connect_timeout(Duration::from_secs(3))
        .request_timeout(Duration::from_secs(3))
        .connect()
        .await;
    match without {
        Err(e) => assert_eq!(e.kind(), ErrorKind::Unavailable, "{e:?}"),
        Ok(c) => {
            let e = c.kv().get("m").await.unwrap_err();
            assert!(
                matches!(e.kind(), ErrorKind::Unavailable | ErrorKind::Other),
                "{e:?}"
            );
        }
    }
}

#[tokio::test]
async fn server_name_override() {
    let cluster = tls_cluster(1, false).await;
    let certs = cluster.certs().unwrap();
    // The certificate is valid for "localhost": connect by IP, verify as localhost.
    let c = Client::builder(cluster.endpoints())
        .tls(
            TlsOptions::new()
                .ca_pem(&certs.ca_pem)
                .domain_name("localhost"),
        )
        .connect()
        .await
        .unwrap();
    c.kv().put("n", "1").await.unwrap();
    // A name the certificate does not have is refused.
    let e = Client::builder(cluster.endpoints())
        .tls(
            TlsOptions::new()
                .ca_pem(&certs.ca_pem)
                .domain_name("not-the-server.example"),
        )
        .connect_timeout(Duration::from_secs(3))
        .connect()
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e:?}");
}
