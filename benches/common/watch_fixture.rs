//! The fixture of the watch benches: an in-process gRPC server that implements only
//! `etcdserverpb.Watch`, and the real [`etcdv3::Client`] connected to it over loopback TCP,
//! with N watchers on its one Watch stream.
//!
//! The server runs on its own thread and current-thread runtime. It answers every create
//! (with the watch id the client chose: the client sends its own ids), and once it has N
//! watchers it streams `WatchResponse`s round-robin over them, each with `events` events of
//! the watcher's own key (16 bytes) and a 64-byte value, with revisions increasing by one per
//! event across the whole stream (so every watcher sees increasing revisions and the
//! multiplexer's duplicate guard drops nothing). Frames are encoded by the server with prost
//! and copied into the gRPC body as they are. The stream is endless; HTTP/2 flow control holds
//! the server back while the client is not reading. Cancels are ignored: after a pause (a full
//! watcher buffer) the client drops what arrives for the cancelled id and re-creates the
//! watcher, which the server then serves under its new id.
//!
//! The client runs on the calling (bench) thread, on a current-thread runtime that is driven
//! only inside [`WatchBench::start`], [`WatchBench::consume`] and [`WatchBench::finish`].

// Each bench uses one of the two fixtures (`WatchBench`, `BurstBench`).
#![allow(dead_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::error::Error;
use std::future::IntoFuture;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes};
use etcdv3::raw::{etcdserverpb as pb, mvccpb};
use etcdv3::{Client, WatchBatch, Watcher};
use futures::StreamExt;
use futures::stream::SelectAll;
use prost::Message;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::{Status, Streaming};

use super::cpu::thread_cpu;

pub(crate) type BoxError = Box<dyn Error + Send + Sync>;
type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send + 'static>>;

/// Bytes of every event's value.
const VALUE_LEN: usize = 64;
/// The low 40 bits of a wire watch id name the client's watcher, the same across its
/// re-creations (see `src/watch/worker.rs`).
const WATCHER_MASK: u64 = (1 << 40) - 1;
/// Longest wait for the watchers to be created and verified.
const SETUP_LIMIT: Duration = Duration::from_secs(120);

/// The key of watcher `i`: 16 bytes.
fn key(i: usize) -> Bytes {
    Bytes::from(format!("bench/w{i:09}"))
}

// ---------------------------------------------------------------------------------------------
// The server

/// Encodes frames by copying their bytes; decodes requests with prost.
#[derive(Clone, Copy, Default)]
struct RawCodec;

struct FrameEncoder;
struct RequestDecoder;

impl Encoder for FrameEncoder {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, frame: Bytes, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.put_slice(&frame);
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
    type Encode = Bytes;
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

/// Builds the responses: one prepared message whose ids, keys and revisions are set per frame.
struct Frames {
    msg: pb::WatchResponse,
    rev: i64,
}

impl Frames {
    fn new(events: usize) -> Self {
        let value = Bytes::from(vec![b'v'; VALUE_LEN]);
        let event = mvccpb::Event {
            r#type: 0,
            kv: Some(mvccpb::KeyValue {
                key: Bytes::new(),
                create_revision: 1,
                mod_revision: 0,
                version: 0,
                value,
                lease: 0,
            }),
            prev_kv: None,
        };
        let msg = pb::WatchResponse {
            header: Some(pb::ResponseHeader {
                cluster_id: 1,
                member_id: 1,
                revision: 0,
                raft_term: 2,
            }),
            events: vec![event; events],
            ..Default::default()
        };
        Frames { msg, rev: 0 }
    }

    /// The next response, for watch id `sid` and key `key`.
    fn next(&mut self, sid: i64, key: &Bytes) -> Bytes {
        self.msg.watch_id = sid;
        for e in &mut self.msg.events {
            self.rev += 1;
            if let Some(kv) = e.kv.as_mut() {
                kv.key = key.clone();
                kv.mod_revision = self.rev;
                kv.version = self.rev;
            }
        }
        if let Some(h) = self.msg.header.as_mut() {
            h.revision = self.rev;
        }
        Bytes::from(self.msg.encode_to_vec())
    }
}

/// The Watch service of one benchmark: `watchers` watchers, `events` events per response.
/// Endless round-robin streaming, or bursts on demand (`bursts`).
#[derive(Clone)]
struct WatchService {
    watchers: usize,
    events: usize,
    bursts: Option<Bursts>,
}

/// Burst mode: each `()` received asks for one burst, one response to every watcher (in a
/// fixed shuffled order, as etcd's watcher sets are unordered), like a put of a key that N
/// watchers watch. Taken by the first stream.
type Bursts = std::sync::Arc<std::sync::Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<()>>>>;

/// A fixed shuffle of `0..n` (Fisher-Yates with a small LCG: the same order every run).
fn shuffled(n: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    for i in (1..n).rev() {
        x = x
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let j = ((x >> 33) as usize) % (i + 1);
        order.swap(i, j);
    }
    order
}

impl tonic::server::NamedService for WatchService {
    const NAME: &'static str = "etcdserverpb.Watch";
}

type FrameStream = Pin<Box<dyn futures::Stream<Item = Result<Bytes, Status>> + Send + 'static>>;

impl tower::Service<tonic::Request<Streaming<pb::WatchRequest>>> for WatchService {
    type Response = tonic::Response<FrameStream>;
    type Error = Status;
    type Future = BoxFuture<Result<Self::Response, Status>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: tonic::Request<Streaming<pb::WatchRequest>>) -> Self::Future {
        let WatchService {
            watchers,
            events,
            bursts,
        } = self.clone();
        Box::pin(async move {
            let mut inbound = req.into_inner();
            let mut bursts = bursts.and_then(|b| b.lock().ok()?.take());
            let burst_mode = bursts.is_some();
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, Status>>(64);
            tokio::spawn(async move {
                // (wire id, key) of every watcher, in creation order; the index by client id.
                let mut slots: Vec<(i64, Bytes)> = Vec::new();
                let mut index: HashMap<u64, usize> = HashMap::new();
                let mut frames = Frames::new(events);
                let mut turn = 0usize;
                let order = shuffled(watchers);
                loop {
                    let streaming = slots.len() >= watchers;
                    tokio::select! {
                        biased;
                        m = inbound.message() => {
                            let Ok(Some(req)) = m else { return };
                            let Some(pb::watch_request::RequestUnion::CreateRequest(c)) =
                                req.request_union
                            else {
                                continue; // cancels and progress requests: ignored
                            };
                            let created = pb::WatchResponse {
                                header: Some(pb::ResponseHeader::default()),
                                watch_id: c.watch_id,
                                created: true,
                                ..Default::default()
                            };
                            if tx.send(Ok(Bytes::from(created.encode_to_vec()))).await.is_err() {
                                return;
                            }
                            let watcher = (c.watch_id as u64) & WATCHER_MASK;
                            match index.get(&watcher) {
                                // A re-creation (after a pause): same watcher, new wire id.
                                Some(&i) => slots[i].0 = c.watch_id,
                                None => {
                                    index.insert(watcher, slots.len());
                                    slots.push((c.watch_id, c.key));
                                }
                            }
                        }
                        go = async { bursts.as_mut()?.recv().await }, if streaming && burst_mode => {
                            if go.is_none() {
                                return;
                            }
                            for &i in &order {
                                let (sid, key) = &slots[i];
                                if tx.send(Ok(frames.next(*sid, key))).await.is_err() {
                                    return;
                                }
                            }
                        }
                        permit = tx.reserve(), if streaming && !burst_mode => {
                            let Ok(permit) = permit else { return };
                            let (sid, key) = &slots[turn];
                            permit.send(Ok(frames.next(*sid, key)));
                            turn = (turn + 1) % slots.len();
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
        let handler = self.clone();
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(RawCodec);
            Ok(grpc.streaming(handler, req).await)
        })
    }
}

/// The server thread.
struct Server {
    addr: std::net::SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<(), String>>>,
}

impl Server {
    fn start(service: WatchService) -> Result<Server, BoxError> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("watch-server".into())
            .spawn(move || -> Result<(), String> {
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
            })?;
        Ok(Server {
            addr,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    fn stop(&mut self) -> Result<(), BoxError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.thread.take() {
            Some(t) => t
                .join()
                .map_err(|_| "the server thread panicked")?
                .map_err(Into::into),
            None => Ok(()),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

// ---------------------------------------------------------------------------------------------
// The client side

/// A watcher and its index (which key it watches).
struct Tagged {
    index: usize,
    watcher: Watcher,
}

impl futures::Stream for Tagged {
    type Item = (usize, etcdv3::Result<WatchBatch>);
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let index = self.index;
        self.watcher
            .poll_next_unpin(cx)
            .map(|r| r.map(|b| (index, b)))
    }
}

/// Server, client and watchers of one benchmark.
pub(crate) struct WatchBench {
    rt: tokio::runtime::Runtime,
    server: Server,
    client: Client,
    watchers: SelectAll<Tagged>,
    events: usize,
    /// Responses consumed by [`WatchBench::consume`], with its client CPU and wall time.
    responses: u64,
    cpu: Duration,
    wall: Duration,
}

impl WatchBench {
    /// Starts the server, connects the client, creates `watchers` watchers (pipelined, on one
    /// stream) and checks the first responses: every watcher gets a batch of `events` events
    /// of its own key, with revisions increasing by one, before anything is measured.
    pub(crate) fn start(watchers: usize, events: usize) -> Result<WatchBench, BoxError> {
        let server = Server::start(WatchService {
            watchers,
            events,
            bursts: None,
        })?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let endpoint = format!("http://{}", server.addr);
        let (client, watchers) =
            rt.block_on(create_and_verify(endpoint, watchers, events, || Ok(())))?;
        Ok(WatchBench {
            rt,
            server,
            client,
            watchers,
            events,
            responses: 0,
            cpu: Duration::ZERO,
            wall: Duration::ZERO,
        })
    }

    /// Consumes `responses` responses (over all watchers) and returns the client CPU time it
    /// took (this thread's). For criterion's `iter_custom`.
    ///
    /// # Panics
    ///
    /// When a watcher fails or ends, a batch is not one whole response, or the responses do
    /// not come within a generous time limit.
    pub(crate) fn consume(&mut self, responses: u64) -> Duration {
        let limit = Duration::from_secs(60)
            + Duration::from_micros(100)
                .saturating_mul(u32::try_from(responses).unwrap_or(u32::MAX));
        let events = self.events;
        let watchers = &mut self.watchers;
        let wall = Instant::now();
        let cpu = thread_cpu();
        let run = async {
            let mut got = 0u64;
            while got < responses {
                match watchers.next().await {
                    Some((_, Ok(batch))) => {
                        assert_eq!(batch.len(), events, "a batch is one whole response");
                        got += 1;
                    }
                    Some((i, Err(e))) => panic!("watcher {i} failed: {e}"),
                    None => panic!("every watcher ended"),
                }
            }
        };
        let done = self
            .rt
            .block_on(async { tokio::time::timeout(limit, run).await });
        let cpu = thread_cpu().saturating_sub(cpu);
        let wall = wall.elapsed();
        assert!(
            done.is_ok(),
            "{responses} responses took longer than {limit:?}"
        );
        self.responses += responses;
        self.cpu += cpu;
        self.wall += wall;
        cpu
    }

    /// Closes the client, stops the server, and prints what was measured in all (client CPU
    /// and wall time per response and per event, pauses).
    pub(crate) fn finish(self, name: &str) -> Result<(), BoxError> {
        let WatchBench {
            rt,
            mut server,
            client,
            watchers,
            events,
            responses,
            cpu,
            wall,
        } = self;
        let pauses = client.watch_stats().pauses;
        rt.block_on(async move {
            drop(watchers);
            client.close().await;
        });
        // Dropping the runtime drops the connection; the server's graceful shutdown waits
        // for it.
        drop(rt);
        server.stop()?;
        // Criterion's test mode (under `cargo test`) consumes one response: nothing to report.
        if responses >= 1_000 {
            let events = responses * events as u64;
            let cpu = cpu.as_secs_f64();
            let wall = wall.as_secs_f64();
            println!(
                "{name}: {events} events in {} responses: {:.3} µs client CPU per response, \
                 {:.0} events/s per client-CPU-second, {:.0} events/s wall, {pauses} pauses",
                responses,
                cpu * 1e6 / responses as f64,
                events as f64 / cpu.max(1e-9),
                events as f64 / wall.max(1e-9),
            );
        }
        Ok(())
    }
}

/// What the watchers' tasks share: responses read by them all, the count a burst waits for,
/// whether a task failed, and the bench thread's wake-up.
pub(crate) struct Progress {
    read: std::sync::atomic::AtomicU64,
    target: std::sync::atomic::AtomicU64,
    failed: std::sync::atomic::AtomicBool,
    done: tokio::sync::Notify,
}

/// Server, client and watchers of the burst benchmark: a task per watcher, bursts of one
/// response to every watcher, and the processor's caches flushed before each burst.
pub(crate) struct BurstBench {
    rt: tokio::runtime::Runtime,
    server: Server,
    client: Client,
    go: tokio::sync::mpsc::UnboundedSender<()>,
    watchers: usize,
    progress: std::sync::Arc<Progress>,
    /// Memory walked before each burst, to evict the client's state from the caches (as the
    /// server does between two puts).
    thrash: Vec<u8>,
    bursts: u64,
    cpu: Duration,
}

impl BurstBench {
    /// Starts the server, connects the client, creates `watchers` watchers, checks a first
    /// burst (each watcher gets its own key), and gives each watcher a task that reads it.
    pub(crate) fn start(watchers: usize, thrash_bytes: usize) -> Result<BurstBench, BoxError> {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let (go, go_rx) = tokio::sync::mpsc::unbounded_channel();
        let server = Server::start(WatchService {
            watchers,
            events: 1,
            bursts: Some(Arc::new(std::sync::Mutex::new(Some(go_rx)))),
        })?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let progress = Arc::new(Progress {
            read: AtomicU64::new(0),
            target: AtomicU64::new(u64::MAX),
            failed: AtomicBool::new(false),
            done: tokio::sync::Notify::new(),
        });
        let endpoint = format!("http://{}", server.addr);
        let first = go.clone();
        let shared = Arc::clone(&progress);
        let client = rt.block_on(async move {
            // The first burst is the one verified.
            let first_burst = || first.send(()).map_err(|_| "the server is gone".into());
            let (client, all) = create_and_verify(endpoint, watchers, 1, first_burst).await?;
            // Each task holds the watcher and one reference (48 bytes): with tokio's task
            // header, one pair of cache lines, as `etcd-bench watch`'s consumers.
            for w in all {
                let (mut watcher, p) = (w.watcher, Arc::clone(&shared));
                tokio::spawn(async move {
                    while let Some(batch) = watcher.next().await {
                        if batch.map_or(true, |b| b.len() != 1) {
                            break;
                        }
                        if p.read.fetch_add(1, Ordering::Relaxed) + 1
                            == p.target.load(Ordering::Relaxed)
                        {
                            p.done.notify_one();
                        }
                    }
                    p.failed.store(true, Ordering::Relaxed);
                    p.done.notify_one();
                });
            }
            Ok::<_, BoxError>(client)
        })?;
        Ok(BurstBench {
            rt,
            server,
            client,
            go,
            watchers,
            progress,
            thrash: vec![0u8; thrash_bytes],
            bursts: 0,
            cpu: Duration::ZERO,
        })
    }

    /// Runs whole bursts for `responses` responses (at least one burst) and returns this
    /// thread's CPU time per response, times `responses` (criterion's `iter_custom`). The
    /// cache flush before each burst is not measured.
    ///
    /// # Panics
    ///
    /// When a watcher fails, or a burst does not arrive within a generous time limit.
    pub(crate) fn measure(&mut self, responses: u64) -> Duration {
        use std::sync::atomic::Ordering;
        let n = self.watchers as u64;
        let bursts = responses.div_ceil(n).max(1);
        let mut cpu = Duration::ZERO;
        for _ in 0..bursts {
            for i in (0..self.thrash.len()).step_by(64) {
                self.thrash[i] = self.thrash[i].wrapping_add(1);
            }
            std::hint::black_box(&self.thrash);
            let p = &*self.progress;
            let want = p.read.load(Ordering::Relaxed) + n;
            p.target.store(want, Ordering::Relaxed);
            let start = thread_cpu();
            assert!(self.go.send(()).is_ok(), "the server is gone");
            let arrived = self.rt.block_on(async {
                tokio::time::timeout(Duration::from_secs(60), async {
                    while p.read.load(Ordering::Relaxed) < want && !p.failed.load(Ordering::Relaxed)
                    {
                        p.done.notified().await;
                    }
                })
                .await
            });
            cpu += thread_cpu().saturating_sub(start);
            assert!(
                arrived.is_ok(),
                "a burst of {n} responses took over a minute"
            );
            assert!(
                !p.failed.load(Ordering::Relaxed),
                "a watcher failed or ended"
            );
        }
        self.bursts += bursts;
        self.cpu += cpu;
        cpu.mul_f64(responses as f64 / (bursts * n) as f64)
    }

    /// Closes the client, stops the server, prints the client CPU per response in all.
    pub(crate) fn finish(self, name: &str) -> Result<(), BoxError> {
        let BurstBench {
            rt,
            mut server,
            client,
            go,
            watchers,
            bursts,
            cpu,
            ..
        } = self;
        drop(go);
        rt.block_on(client.close());
        drop(rt);
        server.stop()?;
        let responses = bursts * watchers as u64;
        if bursts >= 10 {
            println!(
                "{name}: {bursts} bursts, {responses} responses: {:.3} µs client CPU per response",
                cpu.as_secs_f64() * 1e6 / responses as f64,
            );
        }
        Ok(())
    }
}

/// Connects a client to `endpoint`, creates `watchers` watchers (pipelined, on one stream),
/// calls `then` and checks the first responses (see `verify`), all within `SETUP_LIMIT`.
async fn create_and_verify(
    endpoint: String,
    watchers: usize,
    events: usize,
    then: impl FnOnce() -> Result<(), BoxError>,
) -> Result<(Client, SelectAll<Tagged>), BoxError> {
    let setup = async {
        let client = Client::connect([endpoint]).await?;
        let creates = (0..watchers).map(|i| client.watch(key(i)).into_future());
        let created = futures::future::try_join_all(creates).await?;
        let mut all = SelectAll::new();
        for (index, watcher) in created.into_iter().enumerate() {
            all.push(Tagged { index, watcher });
        }
        then()?;
        verify(&mut all, watchers, events).await?;
        Ok::<_, BoxError>((client, all))
    };
    tokio::time::timeout(SETUP_LIMIT, setup)
        .await
        .map_err(|_| "creating and verifying the watchers took too long")?
}

/// Reads until every watcher has had a batch; checks each batch (size, keys, values,
/// revisions increasing by one and above the watcher's previous ones).
async fn verify(
    all: &mut SelectAll<Tagged>,
    watchers: usize,
    events: usize,
) -> Result<(), BoxError> {
    let keys: Vec<Bytes> = (0..watchers).map(key).collect();
    let mut last = vec![0i64; watchers];
    let mut fresh = watchers;
    while fresh > 0 {
        let (i, batch) = all.next().await.ok_or("every watcher ended")?;
        let batch = batch?;
        if batch.len() != events {
            return Err(format!("watcher {i}: {} events, not {events}", batch.len()).into());
        }
        if last[i] == 0 {
            fresh -= 1;
        }
        let first = batch.events()[0].revision();
        if first <= last[i] {
            return Err(format!("watcher {i}: revision {first} after {}", last[i]).into());
        }
        for (k, e) in batch.events().iter().enumerate() {
            if e.kv.key() != &keys[i] || e.kv.value().len() != VALUE_LEN {
                return Err(format!("watcher {i} got an event of another watcher").into());
            }
            if e.revision() != first + k as i64 {
                return Err(format!("watcher {i}: a batch's revisions are not consecutive").into());
            }
            last[i] = e.revision();
        }
    }
    Ok(())
}
