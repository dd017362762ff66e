//! A TCP proxy that injects network faults between a client and an etcd member.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};

use super::error::TestkitError;

/// Size of the buffer of each direction of each connection.
const CHUNK: usize = 16 * 1024;
/// After [`FaultProxy::cut_after_next_request`] closed the client's side, how long
/// the server's side stays open (its answer is read and discarded).
const SERVER_LINGER: Duration = Duration::from_secs(10);

/// A direction of traffic through a [`FaultProxy`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// From the client (who connected to the proxy) to the server (the target).
    ClientToServer,
    /// From the server (the target) back to the client.
    ServerToClient,
}

/// What the proxy currently does to traffic.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Mode {
    hold_client_to_server: bool,
    hold_server_to_client: bool,
    delay: Duration,
}

impl Mode {
    fn holds(&self, dir: Direction) -> bool {
        match dir {
            Direction::ClientToServer => self.hold_client_to_server,
            Direction::ServerToClient => self.hold_server_to_client,
        }
    }
}

/// An armed one-shot cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CutPlan {
    /// Cut after the next complete client request.
    NextRequest,
    /// Cut after this many more client-to-server bytes.
    AfterBytes(u64),
}

#[derive(Debug)]
enum Command {
    CutAll(oneshot::Sender<()>),
}

#[derive(Debug)]
struct Shared {
    target: SocketAddr,
    mode: watch::Sender<Mode>,
    cut_plan: Mutex<Option<CutPlan>>,
    total: AtomicU64,
    active: AtomicU64,
}

impl Shared {
    /// Decides whether this client-to-server chunk triggers the armed cut, and
    /// where: the number of bytes of the chunk to forward before cutting.
    fn cut_point(
        &self,
        chunk_len: usize,
        tracker: &H2Tracker,
        request_end: Option<usize>,
    ) -> Option<usize> {
        let mut plan = self.cut_plan.lock().unwrap_or_else(PoisonError::into_inner);
        match *plan {
            None => None,
            Some(CutPlan::NextRequest) => {
                let at = match tracker.kind() {
                    StreamKind::Http2 => request_end,
                    StreamKind::Unknown => None,
                    StreamKind::Other => Some(chunk_len),
                };
                if at.is_some() {
                    *plan = None;
                }
                at
            }
            Some(CutPlan::AfterBytes(remaining)) => {
                let len = chunk_len as u64;
                if len >= remaining {
                    *plan = None;
                    usize::try_from(remaining).ok()
                } else {
                    *plan = Some(CutPlan::AfterBytes(remaining - len));
                    None
                }
            }
        }
    }
}

/// Counts a connection as active while it lives.
struct ActiveGuard(Arc<Shared>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What the client-to-server byte stream looks like so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StreamKind {
    /// Not enough bytes yet to tell.
    Unknown,
    /// HTTP/2 with prior knowledge (gRPC).
    Http2,
    /// Anything else.
    Other,
}

const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Follows HTTP/2 frame boundaries in the client-to-server stream, to find where
/// a client request ends (a DATA or HEADERS frame with the END_STREAM flag).
#[derive(Debug)]
struct H2Tracker {
    kind: StreamKind,
    preface_matched: usize,
    header: [u8; 9],
    header_len: usize,
    payload_left: usize,
    ends_stream: bool,
}

impl H2Tracker {
    fn new() -> Self {
        Self {
            kind: StreamKind::Unknown,
            preface_matched: 0,
            header: [0; 9],
            header_len: 0,
            payload_left: 0,
            ends_stream: false,
        }
    }

    fn kind(&self) -> StreamKind {
        self.kind
    }

    /// Feeds the next chunk; returns the offset just past the first frame in it
    /// that ends a client stream.
    fn feed(&mut self, data: &[u8]) -> Option<usize> {
        let mut first_end = None;
        let mut i = 0;
        while i < data.len() {
            match self.kind {
                StreamKind::Other => return first_end,
                StreamKind::Unknown => {
                    let take = (H2_PREFACE.len() - self.preface_matched).min(data.len() - i);
                    let want = &H2_PREFACE[self.preface_matched..self.preface_matched + take];
                    if &data[i..i + take] != want {
                        self.kind = StreamKind::Other;
                        return None;
                    }
                    self.preface_matched += take;
                    i += take;
                    if self.preface_matched == H2_PREFACE.len() {
                        self.kind = StreamKind::Http2;
                    }
                }
                StreamKind::Http2 => {
                    if self.header_len < self.header.len() {
                        self.header[self.header_len] = data[i];
                        self.header_len += 1;
                        i += 1;
                        if self.header_len < self.header.len() {
                            continue;
                        }
                        let h = &self.header;
                        self.payload_left = (usize::from(h[0]) << 16)
                            | (usize::from(h[1]) << 8)
                            | usize::from(h[2]);
                        let frame_type = h[3];
                        let flags = h[4];
                        // DATA (0) or HEADERS (1) with END_STREAM (0x1).
                        self.ends_stream = frame_type <= 1 && flags & 0x1 != 0;
                    } else {
                        let take = self.payload_left.min(data.len() - i);
                        i += take;
                        self.payload_left -= take;
                    }
                    if self.header_len == self.header.len() && self.payload_left == 0 {
                        if self.ends_stream && first_end.is_none() {
                            first_end = Some(i);
                        }
                        self.header_len = 0;
                        self.ends_stream = false;
                    }
                }
            }
        }
        first_end
    }
}

/// How one direction of a connection ended.
#[derive(Debug, PartialEq, Eq)]
enum PumpEnd {
    /// The reader reached end of stream; the writer was shut down.
    Eof,
    /// An armed cut fired after forwarding a request.
    Cut,
}

/// Waits until `dir` is not held.
async fn wait_open(mode: &mut watch::Receiver<Mode>, dir: Direction) {
    // An error means the proxy is being dropped; its tasks are aborted then.
    let _ = mode.wait_for(|m| !m.holds(dir)).await;
}

async fn pump<R, W>(
    reader: &mut R,
    writer: &mut W,
    dir: Direction,
    mut mode: watch::Receiver<Mode>,
    shared: &Shared,
) -> io::Result<PumpEnd>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; CHUNK];
    let mut tracker = H2Tracker::new();
    // Bounded by the peers: every round forwards at least one byte or ends.
    loop {
        wait_open(&mut mode, dir).await;
        let n = reader.read(&mut buf).await?;
        if n == 0 {
            writer.shutdown().await?;
            return Ok(PumpEnd::Eof);
        }
        let cut_at = if dir == Direction::ClientToServer {
            let request_end = tracker.feed(&buf[..n]);
            shared.cut_point(n, &tracker, request_end)
        } else {
            None
        };
        let delay = mode.borrow().delay;
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        wait_open(&mut mode, dir).await;
        writer.write_all(&buf[..cut_at.unwrap_or(n)]).await?;
        if cut_at.is_some() {
            writer.flush().await?;
            return Ok(PumpEnd::Cut);
        }
    }
}

async fn handle_connection(mut client: TcpStream, shared: Arc<Shared>) {
    let _active = ActiveGuard(Arc::clone(&shared));
    let Ok(mut server) = TcpStream::connect(shared.target).await else {
        return; // dropping the client closes it
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let cut = {
        let (mut client_read, mut client_write) = client.split();
        let (mut server_read, mut server_write) = server.split();
        let c2s = pump(
            &mut client_read,
            &mut server_write,
            Direction::ClientToServer,
            shared.mode.subscribe(),
            &shared,
        );
        let s2c = pump(
            &mut server_read,
            &mut client_write,
            Direction::ServerToClient,
            shared.mode.subscribe(),
            &shared,
        );
        tokio::pin!(c2s, s2c);
        let (mut c2s_done, mut s2c_done) = (false, false);
        loop {
            tokio::select! {
                end = &mut c2s, if !c2s_done => match end {
                    Ok(PumpEnd::Eof) => c2s_done = true,
                    Ok(PumpEnd::Cut) => break true,
                    Err(_) => break false,
                },
                end = &mut s2c, if !s2c_done => match end {
                    Ok(PumpEnd::Eof) => s2c_done = true,
                    Ok(PumpEnd::Cut) | Err(_) => break false,
                },
            }
            if c2s_done && s2c_done {
                break false;
            }
        }
    };
    if cut {
        // The request reached the server; the client never sees the answer.
        drop(client);
        let mut sink = vec![0u8; CHUNK];
        let _ = tokio::time::timeout(SERVER_LINGER, async {
            while let Ok(n) = server.read(&mut sink).await {
                if n == 0 {
                    break;
                }
            }
        })
        .await;
    }
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut commands: mpsc::UnboundedReceiver<Command>,
) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((socket, _)) => {
                    shared.total.fetch_add(1, Ordering::SeqCst);
                    shared.active.fetch_add(1, Ordering::SeqCst);
                    conns.spawn(handle_connection(socket, Arc::clone(&shared)));
                }
                // E.g. out of file descriptors: back off a little.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
            Some(command) = commands.recv() => match command {
                Command::CutAll(ack) => {
                    conns.abort_all();
                    while conns.join_next().await.is_some() {}
                    let _ = ack.send(());
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

/// A TCP proxy on a free loopback port that forwards to one target (usually an
/// etcd member's client address) and injects faults on demand.
///
/// Modes are switched at run time and apply to existing and new connections:
///
/// * [`pass`](Self::pass): forward everything (the initial mode);
/// * [`blackhole`](Self::blackhole) / [`blackhole_direction`](Self::blackhole_direction):
///   forward nothing, in both or one direction, keeping connections open. Bytes
///   are held, not dropped (the proxy stops reading, so TCP flow control pushes
///   back), and flow again after [`pass`](Self::pass), like a healed partition;
/// * [`delay`](Self::delay): hold every chunk, in both directions, that long
///   before forwarding it;
/// * [`cut_all`](Self::cut_all): close every current connection now;
/// * [`cut_after_next_request`](Self::cut_after_next_request) and
///   [`cut_after_client_bytes`](Self::cut_after_client_bytes): one-shot cuts
///   that let a request reach the server but never deliver its answer.
///
/// New connections are always accepted and connected to the target. Dropping the
/// proxy stops accepting and closes every connection (its tasks are aborted).
/// It must be created inside a tokio runtime.
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    commands: mpsc::UnboundedSender<Command>,
    task: JoinHandle<()>,
}

impl FaultProxy {
    /// Starts a proxy on `127.0.0.1:<free port>` forwarding to `target`.
    pub async fn start(target: SocketAddr) -> Result<Self, TestkitError> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .map_err(|e| TestkitError::io("binding the fault proxy", e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| TestkitError::io("reading the fault proxy's address", e))?;
        let (mode, _) = watch::channel(Mode::default());
        let shared = Arc::new(Shared {
            target,
            mode,
            cut_plan: Mutex::new(None),
            total: AtomicU64::new(0),
            active: AtomicU64::new(0),
        });
        let (commands, command_rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(accept_loop(listener, Arc::clone(&shared), command_rx));
        Ok(Self {
            addr,
            shared,
            commands,
            task,
        })
    }

    /// The proxy's own address (`127.0.0.1:PORT`); clients connect here.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The proxy's URL, `http://127.0.0.1:PORT`, to use as an etcd endpoint.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The address traffic is forwarded to.
    pub fn target(&self) -> SocketAddr {
        self.shared.target
    }

    /// Forwards everything again: clears blackholes, delay and any armed cut.
    pub fn pass(&self) {
        self.shared.mode.send_replace(Mode::default());
        *self
            .shared
            .cut_plan
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = None;
    }

    /// Forwards nothing in either direction, keeping connections open (held bytes
    /// flow again after [`pass`](Self::pass)). The delay setting is kept.
    pub fn blackhole(&self) {
        self.shared.mode.send_modify(|m| {
            m.hold_client_to_server = true;
            m.hold_server_to_client = true;
        });
    }

    /// Forwards nothing in direction `dir` and everything in the other one. The
    /// delay setting is kept.
    pub fn blackhole_direction(&self, dir: Direction) {
        self.shared.mode.send_modify(|m| {
            m.hold_client_to_server = dir == Direction::ClientToServer;
            m.hold_server_to_client = dir == Direction::ServerToClient;
        });
    }

    /// Delays every chunk, in both directions, by `delay` (zero turns delaying
    /// off). Blackholes are kept.
    pub fn delay(&self, delay: Duration) {
        self.shared.mode.send_modify(|m| m.delay = delay);
    }

    /// Closes every current connection, both sides, and returns once they are
    /// closed. New connections are accepted as usual.
    pub async fn cut_all(&self) {
        let (ack, done) = oneshot::channel();
        if self.commands.send(Command::CutAll(ack)).is_ok() {
            let _ = done.await;
        }
    }

    /// Arms a one-shot cut: the connection that next forwards a complete client
    /// request is closed right after it: the request reaches the server, the
    /// client's side is closed at once and never gets an answer (the server's side
    /// stays open for a while, its answer discarded, so the server is not told).
    ///
    /// On an HTTP/2 connection (gRPC) a request is complete with the frame that
    /// ends the client's stream (END_STREAM), so control frames (SETTINGS, PING,
    /// WINDOW_UPDATE) do not trigger it; on other connections the next chunk of
    /// client bytes does. Replaces any armed cut; [`pass`](Self::pass) disarms it.
    pub fn cut_after_next_request(&self) {
        *self
            .shared
            .cut_plan
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(CutPlan::NextRequest);
    }

    /// Arms a one-shot cut after `bytes` more client-to-server bytes (counted
    /// over all connections from now): exactly that many are forwarded, then that
    /// connection is cut as in [`cut_after_next_request`](Self::cut_after_next_request).
    /// Zero cuts the connection that next sends anything, forwarding none of it.
    pub fn cut_after_client_bytes(&self, bytes: u64) {
        *self
            .shared
            .cut_plan
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(CutPlan::AfterBytes(bytes));
    }

    /// Whether a one-shot cut is armed and has not fired yet.
    pub fn cut_armed(&self) -> bool {
        self.shared
            .cut_plan
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
    }

    /// How many connections the proxy has accepted since it started.
    pub fn connections_total(&self) -> u64 {
        self.shared.total.load(Ordering::SeqCst)
    }

    /// How many connections are open now (one cut after a request counts until
    /// its server side is closed too).
    pub fn connections_active(&self) -> u64 {
        self.shared.active.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        // Dropping the accept task's future drops its JoinSet, which aborts
        // every connection task and so closes every socket.
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(frame_type: u8, flags: u8, payload_len: usize) -> Vec<u8> {
        let mut f = vec![
            (payload_len >> 16) as u8,
            (payload_len >> 8) as u8,
            payload_len as u8,
            frame_type,
            flags,
            0,
            0,
            0,
            1,
        ];
        f.extend(std::iter::repeat_n(0xAB, payload_len));
        f
    }

    #[test]
    fn h2_tracker_finds_request_end_across_chunks() {
        let mut stream = H2_PREFACE.to_vec();
        stream.extend(frame(4, 0, 6)); // SETTINGS
        stream.extend(frame(8, 0, 4)); // WINDOW_UPDATE
        stream.extend(frame(1, 0x4, 20)); // HEADERS, END_HEADERS only
        let end = stream.len() + 9 + 30;
        stream.extend(frame(0, 0x1, 30)); // DATA, END_STREAM
        stream.extend(frame(6, 0, 8)); // PING

        // Whole stream in one chunk.
        let mut t = H2Tracker::new();
        assert_eq!(t.feed(&stream), Some(end));
        assert_eq!(t.kind(), StreamKind::Http2);

        // Byte by byte.
        let mut t = H2Tracker::new();
        let mut found = None;
        for (i, b) in stream.iter().enumerate() {
            if t.feed(std::slice::from_ref(b)).is_some() {
                found.get_or_insert(i + 1);
            }
        }
        assert_eq!(found, Some(end));
    }

    #[test]
    fn proxy_is_thread_safe() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<FaultProxy>();
    }

    #[test]
    fn h2_tracker_detects_other_protocols() {
        let mut t = H2Tracker::new();
        assert_eq!(t.feed(b"PRI"), None);
        assert_eq!(t.kind(), StreamKind::Unknown);
        let mut t = H2Tracker::new();
        assert_eq!(t.feed(b"GET / HTTP/1.1\r\n"), None);
        assert_eq!(t.kind(), StreamKind::Other);
    }
}
