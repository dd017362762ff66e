//! DNS SRV discovery against a tiny DNS server on loopback that publishes a real etcd
//! cluster's client ports (targets are `localhost.`).
#![cfg(feature = "dns-srv")]

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use etcdv3::{Client, ErrorKind, SrvDiscovery};
use tokio::net::UdpSocket;

/// One SRV answer: priority, weight, port, target.
type Srv = (u16, u16, u16, &'static str);

/// Serves SRV records for the names in `zone` (other names: NXDOMAIN) until dropped.
struct DnsServer {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn encode_name(name: &str, out: &mut Vec<u8>) {
    // (The root, ".", has no label at all.)
    for label in name
        .trim_end_matches('.')
        .split('.')
        .filter(|l| !l.is_empty())
    {
        out.push(label.len() as u8);
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
}

/// The question's name (lower-case, with a trailing dot) and where the question ends.
fn parse_question(q: &[u8]) -> Option<(String, usize)> {
    let mut i = 12;
    let mut labels = Vec::new();
    loop {
        let len = *q.get(i)? as usize;
        i += 1;
        if len == 0 {
            break;
        }
        labels.push(String::from_utf8_lossy(q.get(i..i + len)?).to_lowercase());
        i += len;
    }
    Some((labels.join(".") + ".", i + 4))
}

fn answer(query: &[u8], zone: &HashMap<String, Vec<Srv>>) -> Option<Vec<u8>> {
    let (name, qend) = parse_question(query)?;
    let records = zone.get(&name);
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(&query[0..2]); // id
    let rcode = if records.is_some() { 0 } else { 3 };
    out.extend_from_slice(&[0x81, 0x80 | rcode]); // response, recursion desired+available
    out.extend_from_slice(&[0, 1]); // one question
    let n = records.map_or(0, Vec::len) as u16;
    out.extend_from_slice(&n.to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]); // no authority, no additional
    out.extend_from_slice(&query[12..qend]);
    for &(prio, weight, port, target) in records.into_iter().flatten() {
        out.extend_from_slice(&[0xc0, 12]); // name: pointer to the question
        out.extend_from_slice(&33u16.to_be_bytes()); // SRV
        out.extend_from_slice(&1u16.to_be_bytes()); // IN
        out.extend_from_slice(&60u32.to_be_bytes()); // TTL
        let mut rdata = Vec::new();
        rdata.extend_from_slice(&prio.to_be_bytes());
        rdata.extend_from_slice(&weight.to_be_bytes());
        rdata.extend_from_slice(&port.to_be_bytes());
        encode_name(target, &mut rdata);
        out.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
        out.extend_from_slice(&rdata);
    }
    Some(out)
}

async fn dns_server(zone: HashMap<String, Vec<Srv>>) -> DnsServer {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = sock.local_addr().unwrap();
    let zone = Arc::new(zone);
    let task = tokio::spawn(async move {
        let mut buf = [0u8; 1500];
        // Bounded: a test asks a handful of questions.
        for _ in 0..1000 {
            let Ok((n, peer)) = sock.recv_from(&mut buf).await else {
                return;
            };
            if let Some(resp) = answer(&buf[..n], &zone) {
                let _ = sock.send_to(&resp, peer).await;
            }
        }
    });
    DnsServer { addr, task }
}

#[tokio::test]
async fn discovers_endpoints_from_srv_records_and_connects() {
    let cluster = etcdv3::testkit::EtcdCluster::builder()
        .members(3)
        .start_async()
        .await
        .unwrap();
    let ports: Vec<u16> = (0..3).map(|i| cluster.client_addr(i).port()).collect();
    let mut zone = HashMap::new();
    zone.insert(
        "_etcd-client._tcp.etcd.test.".to_owned(),
        vec![
            (10, 5, ports[2], "localhost."),
            (0, 10, ports[0], "localhost."),
            (0, 50, ports[1], "localhost."),
        ],
    );
    zone.insert(
        "_etcd-client-prod._tcp.etcd.test.".to_owned(),
        vec![(0, 0, ports[1], "localhost.")],
    );
    // A target of "." says the service is not available there (RFC 2782): skipped.
    zone.insert(
        "_etcd-client-partly._tcp.etcd.test.".to_owned(),
        vec![(0, 0, ports[0], "."), (0, 0, ports[2], "localhost.")],
    );
    let dns = dns_server(zone).await;

    let eps = SrvDiscovery::new("etcd.test")
        .nameserver(dns.addr)
        .discover()
        .await
        .unwrap();
    // Ordered by priority, then by weight (heavier first).
    assert_eq!(
        eps,
        vec![
            format!("http://localhost:{}", ports[1]),
            format!("http://localhost:{}", ports[0]),
            format!("http://localhost:{}", ports[2]),
        ]
    );
    let c = Client::builder(eps)
        .request_timeout(Duration::from_secs(5))
        .connect()
        .await
        .unwrap();
    c.kv().put("srv", "found").await.unwrap();
    assert_eq!(c.kv().get("srv").await.unwrap().count, 1);

    // A service name picks the `_etcd-client-<name>` records.
    let named = SrvDiscovery::new("etcd.test.")
        .service_name("prod")
        .nameserver(dns.addr)
        .discover()
        .await
        .unwrap();
    assert_eq!(named, vec![format!("http://localhost:{}", ports[1])]);
    let partly = SrvDiscovery::new("etcd.test")
        .service_name("partly")
        .nameserver(dns.addr)
        .discover()
        .await
        .unwrap();
    assert_eq!(partly, vec![format!("http://localhost:{}", ports[2])]);

    // No records: a typed error naming what was looked up.
    let e = SrvDiscovery::new("nothing.test")
        .nameserver(dns.addr)
        .discover()
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable);
    assert!(
        e.message().contains("_etcd-client._tcp.nothing.test"),
        "{e}"
    );
}

#[tokio::test]
async fn ssl_records_give_https_endpoints_first() {
    let mut zone = HashMap::new();
    zone.insert(
        "_etcd-client-ssl._tcp.tls.test.".to_owned(),
        vec![(0, 0, 2379, "m1.tls.test.")],
    );
    zone.insert(
        "_etcd-client._tcp.tls.test.".to_owned(),
        vec![(0, 0, 2380, "m2.tls.test.")],
    );
    let dns = dns_server(zone).await;
    let eps = SrvDiscovery::new("tls.test")
        .nameserver(dns.addr)
        .discover()
        .await
        .unwrap();
    assert_eq!(
        eps,
        vec!["https://m1.tls.test:2379", "http://m2.tls.test:2380"]
    );
}
