//! The client's own ceiling for watch events: an in-process gRPC server streams pre-encoded
//! `WatchResponse`s (1, 10 or 100 events each) to one watcher as fast as the client takes
//! them, and the client's CPU is measured on its own thread.
//!
//! The server runs on its own thread and runtime and only copies prepared bytes (each frame is
//! encoded once, before the run, without its `watch_id`; the id field is prepended when sent,
//! which protobuf merges). The client (its connection, the multiplexer and the consumer) runs
//! on the main thread on a current-thread runtime, so `getrusage(RUSAGE_THREAD)` there is the
//! client's whole cost: events per client-CPU-second is the one-core ceiling. Every event has
//! a 16-byte key and a 64-byte value, and revisions increase, so nothing is dropped by the
//! multiplexer's duplicate guard.
//!
//! ```text
//! cargo bench --bench watch_ceiling
//! EVENTS=5000000 cargo bench --bench watch_ceiling
//! ```
//!
//! Under `cargo test` (no `--bench` argument) a smoke run streams 20,000 events per size.

use std::convert::Infallible;
use std::error::Error;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::{BufMut, Bytes};
use etcdv3::Client;
use etcdv3::raw::{etcdserverpb as pb, mvccpb};
use nix::sys::resource::{UsageWho, getrusage};
use prost::Message;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::{Status, Streaming};

type BoxError = Box<dyn Error + Send + Sync>;
type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send + 'static>>;

/// What the server sends: a prefix (the encoded `watch_id` field) and a prepared body.
type Frame = (Bytes, Bytes);

/// Encodes frames by copying their bytes; decodes requests with prost.
#[derive(Clone, Copy, Default)]
struct RawCodec;

struct FrameEncoder;
struct RequestDecoder;

impl Encoder for FrameEncoder {
    type Item = Frame;
    type Error = Status;
    fn encode(&mut self, (prefix, body): Frame, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.put_slice(&prefix);
        buf.put_slice(&body);
        Ok(())
    }
}

impl Decoder for RequestDecoder {
    type Item = pb::WatchRequest;
    type Error = Status;
    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Status> {
        pb::WatchRequest::decode(buf)
            .map(Some)
            .map_err(|e| Status::internal(e.to_string()))
    }
}

impl Codec for RawCodec {
    type Encode = Frame;
    type Decode = pb::WatchRequest;
    type Encoder = FrameEncoder;
    type Decoder = RequestDecoder;
    fn encoder(&mut self) -> FrameEncoder {
        FrameEncoder
    }
    fn decoder(&mut self) -> RequestDecoder {
        RequestDecoder
    }
}

/// The Watch service: streams the prepared frames to the watcher, then idles.
#[derive(Clone)]
struct WatchService {
    frames: Arc<Vec<Bytes>>,
    per: usize,
}

impl tonic::server::NamedService for WatchService {
    const NAME: &'static str = "etcdserverpb.Watch";
}

type FrameStream = Pin<Box<dyn futures::Stream<Item = Result<Frame, Status>> + Send + 'static>>;

struct Handler {
    frames: Arc<Vec<Bytes>>,
    per: usize,
}

impl tower::Service<tonic::Request<Streaming<pb::WatchRequest>>> for Handler {
    type Response = tonic::Response<FrameStream>;
    type Error = Status;
    type Future = BoxFuture<Result<Self::Response, Status>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: tonic::Request<Streaming<pb::WatchRequest>>) -> Self::Future {
        let frames = Arc::clone(&self.frames);
        let per = self.per;
        Box::pin(async move {
            let mut inbound = req.into_inner();
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame, Status>>(64);
            // Answers every create (the client re-creates a paused watcher from its next
            // revision) and streams the frames from there; ignores everything else.
            tokio::spawn(async move {
                let mut cur: Option<(Bytes, usize)> = None;
                loop {
                    let more = cur.as_ref().is_some_and(|(_, i)| *i < frames.len());
                    tokio::select! {
                        biased;
                        m = inbound.message() => {
                            let Ok(Some(req)) = m else { return };
                            let Some(pb::watch_request::RequestUnion::CreateRequest(c)) =
                                req.request_union
                            else {
                                continue;
                            };
                            let created = pb::WatchResponse {
                                header: Some(pb::ResponseHeader::default()),
                                watch_id: c.watch_id,
                                created: true,
                                ..Default::default()
                            };
                            let created = Bytes::from(created.encode_to_vec());
                            if tx.send(Ok((Bytes::new(), created))).await.is_err() {
                                return;
                            }
                            // Field 2 (watch_id), varint: prepended to the prepared bodies.
                            let mut prefix = Vec::with_capacity(11);
                            prefix.push(0x10);
                            prost::encoding::encode_varint(c.watch_id as u64, &mut prefix);
                            let start = usize::try_from(c.start_revision.max(1) - 1).unwrap_or(0) / per;
                            cur = Some((Bytes::from(prefix), start));
                        }
                        permit = tx.reserve(), if more => {
                            let Ok(permit) = permit else { return };
                            if let Some((prefix, i)) = cur.as_mut() {
                                permit.send(Ok((prefix.clone(), frames[*i].clone())));
                                *i += 1;
                            }
                        }
                    }
                }
            });
            let body = futures::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|item| (item, rx))
            });
            Ok(tonic::Response::new(Box::pin(body) as FrameStream))
        })
    }
}

impl tower::Service<http::Request<tonic::body::Body>> for WatchService {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let handler = Handler {
            frames: Arc::clone(&self.frames),
            per: self.per,
        };
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(RawCodec);
            Ok(grpc.streaming(handler, req).await)
        })
    }
}

/// `responses` frames of `per` events each, revisions 1, 2, ... in order.
fn prepare(responses: usize, per: usize) -> Vec<Bytes> {
    let value = Bytes::from(vec![b'v'; 64]);
    let mut rev = 0i64;
    (0..responses)
        .map(|_| {
            let events = (0..per)
                .map(|_| {
                    rev += 1;
                    mvccpb::Event {
                        r#type: 0,
                        kv: Some(mvccpb::KeyValue {
                            key: Bytes::from(format!("ceiling/k{:07}", rev % 10_000_000)),
                            create_revision: 1,
                            mod_revision: rev,
                            version: rev,
                            value: value.clone(),
                            lease: 0,
                        }),
                        prev_kv: None,
                    }
                })
                .collect();
            let r = pb::WatchResponse {
                header: Some(pb::ResponseHeader {
                    cluster_id: 1,
                    member_id: 1,
                    revision: rev,
                    raft_term: 2,
                }),
                events,
                ..Default::default()
            };
            Bytes::from(r.encode_to_vec())
        })
        .collect()
}

fn thread_cpu_s() -> Result<f64, BoxError> {
    let u = getrusage(UsageWho::RUSAGE_THREAD)?;
    let s = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
    Ok(s(u.user_time()) + s(u.system_time()))
}

fn run(per: usize, events: usize, smoke: bool) -> Result<(), BoxError> {
    let responses = events.div_ceil(per);
    let frames = Arc::new(prepare(responses, per));
    let bytes: usize = frames.iter().map(Bytes::len).sum();

    // The server, on its own thread.
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    listener.set_nonblocking(true)?;
    let service = WatchService {
        frames: Arc::clone(&frames),
        per,
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = std::thread::spawn(move || -> Result<(), String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        rt.block_on(async move {
            let listener =
                tokio::net::TcpListener::from_std(listener).map_err(|e| e.to_string())?;
            let incoming = futures::stream::unfold(listener, |l| async move {
                let r = l.accept().await.map(|(s, _)| s);
                Some((r, l))
            });
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stop_rx.await;
                })
                .await
                .map_err(|e| e.to_string())
        })
    });

    // The client, on this thread.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (got, wall, cpu) = rt.block_on(async move {
        let client = Client::connect([format!("http://{addr}")]).await?;
        let mut w = client.watch("ceiling/").prefix().buffer(1024).await?;
        let cpu0 = thread_cpu_s()?;
        let start = Instant::now();
        let mut got = 0usize;
        while got < responses * per {
            match w.next().await {
                Some(Ok(b)) => got += b.len(),
                Some(Err(e)) => return Err(Box::new(e) as BoxError),
                None => return Err("watcher ended".into()),
            }
        }
        let wall = start.elapsed().as_secs_f64();
        let cpu = thread_cpu_s()? - cpu0;
        let pauses = client.watch_stats().pauses;
        if pauses > 0 {
            println!("  ({pauses} pauses: the consumer fell behind)");
        }
        drop(w);
        client.close().await;
        Ok::<_, BoxError>((got, wall, cpu))
    })?;
    let _ = stop_tx.send(());
    server.join().map_err(|_| "server thread panicked")??;

    let per_core = got as f64 / cpu;
    println!(
        "  {per:>3} events/response: {got} events in {responses} responses ({:.1} MiB): \
         {:.3} s wall, {:.3} s client CPU -> {:.0} events/s per client core, \
         {:.3} µs/event, {:.2} µs/response ({:.0} events/s wall)",
        bytes as f64 / (1024.0 * 1024.0),
        wall,
        cpu,
        per_core,
        cpu * 1e6 / got as f64,
        cpu * 1e6 / responses as f64,
        got as f64 / wall,
    );
    println!(
        "{{\"bench\":\"watch_ceiling\",\"smoke\":{smoke},\"events_per_response\":{per},\
         \"events\":{got},\"wall_s\":{wall:.4},\"client_cpu_s\":{cpu:.4},\
         \"events_per_client_cpu_s\":{per_core:.0},\"us_per_event\":{:.4}}}",
        cpu * 1e6 / got as f64
    );
    Ok(())
}

fn main() -> Result<(), BoxError> {
    let smoke = !std::env::args().any(|a| a == "--bench");
    let events: usize = if smoke {
        20_000
    } else {
        std::env::var("EVENTS")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|n| (1_000..=50_000_000).contains(n))
            .unwrap_or(2_000_000)
    };
    println!(
        "watch_ceiling{}: one watcher, in-process server streaming prepared responses",
        if smoke { " (smoke run)" } else { "" }
    );
    for per in [1, 10, 100] {
        // Fewer events for small responses: their cost is per response.
        let n = if per == 1 { events / 4 } else { events };
        run(per, n, smoke)?;
    }
    Ok(())
}
