//! The client's unary overhead against the protocol floor: the same Put, at concurrency 1, sent
//! (a) through [`etcdv3::Client`] and (b) over the `h2` crate directly (one HTTP/2 connection,
//! hand-built gRPC framing, no hyper, no tonic, no balancer, no retries), to one throwaway etcd.
//!
//! Both run on a current-thread runtime on the bench thread, so `getrusage(RUSAGE_THREAD)` is
//! the client's whole CPU (etcd is another process). Since the client runs on its own HTTP/2
//! implementation (`src/http2`), the whole client costs less than the bare `h2` connection:
//! 20.8k against 41.7k instructions per put on the project's 2-core box (26.8k before the
//! unary path dropped its header maps). Before, the client ran on h2 (46.6k against
//! 41-42.5k) and, earlier still, on tonic's channel and hyper's client (73.7k against 40.9k).
//!
//! ```text
//! cargo bench --bench unary_floor
//! PUTS=20000 cargo bench --bench unary_floor
//! ```
//!
//! For instruction counts, run the bench binary under callgrind twice with different `PUTS`
//! and one `ONLY` (`client` or `h2`), and divide the difference by the difference of puts:
//!
//! ```text
//! ONLY=h2 PUTS=300 valgrind --tool=callgrind target/release/deps/unary_floor-HASH --bench
//! ONLY=h2 PUTS=1300 valgrind --tool=callgrind target/release/deps/unary_floor-HASH --bench
//! ```
//!
//! Under `cargo test` (no `--bench` argument) a smoke run of 50 puts each checks both paths.

use std::error::Error;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use etcdv3::Client;
use etcdv3::raw::etcdserverpb as pb;
use etcdv3::testkit::EtcdCluster;
use nix::sys::resource::{UsageWho, getrusage};
use prost::Message;

type BoxError = Box<dyn Error + Send + Sync>;

/// This thread's CPU time so far (user + sys).
fn thread_cpu() -> Result<Duration, BoxError> {
    let u = getrusage(UsageWho::RUSAGE_THREAD)?;
    let tv = |t: nix::sys::time::TimeVal| {
        Duration::from_secs(t.tv_sec().max(0) as u64)
            + Duration::from_micros(t.tv_usec().max(0) as u64)
    };
    Ok(tv(u.user_time()) + tv(u.system_time()))
}

fn key(i: usize) -> Bytes {
    Bytes::from(format!("floor/{:010}", i % 100))
}

const VALUE: &[u8] = b"0123456789abcdef0123456789abcdef";

/// `n` puts through our client.
async fn client_puts(client: &Client, n: usize) -> Result<(), BoxError> {
    let kv = client.kv();
    for i in 0..n {
        let r = kv.put(key(i), Bytes::from_static(VALUE)).await?;
        assert!(r.header.revision > 0);
    }
    Ok(())
}

/// `n` puts over a raw h2 connection: gRPC framing by hand, one stream per put.
async fn h2_puts(
    send: &mut h2::client::SendRequest<Bytes>,
    authority: &str,
    n: usize,
) -> Result<(), BoxError> {
    let uri: http::Uri = format!("http://{authority}/etcdserverpb.KV/Put").parse()?;
    for i in 0..n {
        let req = pb::PutRequest {
            key: key(i),
            value: Bytes::from_static(VALUE),
            ..Default::default()
        };
        let len = req.encoded_len();
        let mut buf = BytesMut::with_capacity(5 + len);
        buf.put_u8(0);
        buf.put_u32(u32::try_from(len)?);
        req.encode_raw(&mut buf);
        let head = http::Request::builder()
            .method(http::Method::POST)
            .uri(uri.clone())
            .header("te", "trailers")
            .header("content-type", "application/grpc")
            .body(())?;
        let mut ready = send.clone().ready().await?;
        let (resp, mut stream) = ready.send_request(head, false)?;
        stream.send_data(buf.freeze(), true)?;
        let mut body = resp.await?.into_body();
        let mut data = BytesMut::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk?;
            let _ = body.flow_control().release_capacity(chunk.len());
            data.put_slice(&chunk);
        }
        let trailers = body.trailers().await?.ok_or("no trailers")?;
        if trailers.get("grpc-status").map(|v| v.as_bytes()) != Some(b"0") {
            return Err(format!("put failed: {trailers:?}").into());
        }
        let mut data = data.freeze();
        if data.len() < 5 {
            return Err("short gRPC message".into());
        }
        data.advance(5);
        let r = pb::PutResponse::decode(data)?;
        assert!(r.header.is_some_and(|h| h.revision > 0));
        *send = ready;
    }
    Ok(())
}

fn main() -> Result<(), BoxError> {
    let full = std::env::args().any(|a| a == "--bench");
    let puts: usize = match std::env::var("PUTS") {
        Ok(v) => v.parse::<usize>()?.clamp(1, 10_000_000),
        Err(_) if full => 10_000,
        Err(_) => 50,
    };
    let only = std::env::var("ONLY").ok();
    let run = |which: &str| only.as_deref().is_none_or(|o| o == which);
    // Fixed, so that two runs with different `PUTS` differ by exactly the measured puts.
    let warmup = if full { 200 } else { 10 };

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let etcd = EtcdCluster::builder().start_async().await?;
        let endpoint = etcd.endpoints()[0].clone();
        let authority = endpoint.trim_start_matches("http://").to_owned();
        let mut report = Vec::new();

        if run("client") {
            let client = Client::connect([endpoint.as_str()]).await?;
            client_puts(&client, warmup).await?;
            let before = thread_cpu()?;
            client_puts(&client, puts).await?;
            let cpu = thread_cpu()? - before;
            report.push(("etcdv3 Client", cpu));
        }
        if run("h2") {
            let tcp = tokio::net::TcpStream::connect(authority.as_str()).await?;
            tcp.set_nodelay(true)?;
            let (mut send, conn) = h2::client::handshake(tcp).await?;
            let driver = tokio::spawn(async move {
                let _ = conn.await;
            });
            h2_puts(&mut send, &authority, warmup).await?;
            let before = thread_cpu()?;
            h2_puts(&mut send, &authority, puts).await?;
            let cpu = thread_cpu()? - before;
            report.push(("raw h2 (floor)", cpu));
            drop(send);
            driver.abort();
        }
        println!("unary_floor: {puts} puts at concurrency 1, current-thread runtime, thread CPU");
        for (name, cpu) in &report {
            println!(
                "  {name:<16} {:>8.2} µs client CPU per put",
                cpu.as_secs_f64() * 1e6 / puts as f64
            );
        }
        Ok::<_, BoxError>(())
    })
}
