//! Tests of the test kit itself, against a real etcd (set `ETCD_BIN` to choose
//! the binary; `scripts/install-etcd.sh` installs 3.5.1 and 3.4.23).
#![cfg(feature = "testkit")]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use etcdv3::testkit::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const HEALTH_TIMEOUT: Duration = Duration::from_secs(30);

fn assert_loopback(endpoint: &str) {
    let rest = endpoint
        .strip_prefix("http://127.0.0.1:")
        .unwrap_or_else(|| panic!("not a loopback endpoint: {endpoint}"));
    let port: u16 = rest.parse().unwrap();
    assert_ne!(port, 0);
}

fn addr_of(endpoint: &str) -> SocketAddr {
    endpoint.strip_prefix("http://").unwrap().parse().unwrap()
}

/// Blocking `GET /health` through any address, returning the raw response.
fn raw_health(addr: SocketAddr, timeout: Duration) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// Whether a process with this pid exists and mentions `needle` in its command
/// line (so a recycled pid is not mistaken for the etcd we started).
fn process_alive_with(pid: u32, needle: &str) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    String::from_utf8_lossy(&cmdline).contains(needle)
}

/// Every pid whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if process_alive_with(pid, needle) {
            found.push(pid);
        }
    }
    found
}

fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 1..].trim_start().chars().next()
}

#[test]
fn binary_and_version() {
    let bin = find_etcd_binary().unwrap();
    let version = etcd_version(&bin).unwrap();
    assert!(version.starts_with("3."), "{version}");
    eprintln!("etcd {} at {}", version, bin.display());
}

#[test]
fn single_member_is_healthy_on_loopback() {
    let started = Instant::now();
    let cluster = EtcdCluster::single().unwrap();
    eprintln!(
        "single member (etcd {}) healthy in {:?}",
        cluster.version(),
        started.elapsed()
    );
    assert_eq!(cluster.member_count(), 1);
    assert_eq!(cluster.endpoints(), vec![cluster.endpoint(0)]);
    for e in cluster.endpoints() {
        assert_loopback(&e);
    }
    let raw = raw_health(addr_of(&cluster.endpoint(0)), Duration::from_secs(5)).unwrap();
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
    assert!(raw.contains("\"health\":\"true\""), "{raw}");
    assert!(check_health(cluster.client_addr(0), Duration::from_secs(5)));
    assert!(cluster.is_running(0));
    assert!(cluster.pid(0).is_some());
    assert!(cluster.data_dir(0).join("member").is_dir());
    assert!(cluster.log_path(0).is_file());
    assert_eq!(cluster.leader(Duration::from_secs(5)).unwrap(), 0);
    assert_eq!(cluster.version(), etcd_version(cluster.binary()).unwrap());

    // A single member restarts from its data dir.
    cluster.kill(0).unwrap();
    assert!(!cluster.is_running(0));
    assert!(!check_health(
        cluster.client_addr(0),
        Duration::from_millis(200)
    ));
    assert!(matches!(
        cluster.kill(0),
        Err(TestkitError::NotRunning { index: 0 })
    ));
    cluster.restart(0).unwrap();
    assert!(check_health(cluster.client_addr(0), Duration::from_secs(5)));
    assert!(
        cluster
            .log(0)
            .unwrap()
            .contains("etcdv3-testkit: starting member 0")
    );

    // Out-of-range operations are errors.
    assert!(matches!(
        cluster.kill(5),
        Err(TestkitError::NoSuchMember { index: 5, count: 1 })
    ));

    // The temporary directory goes away with the cluster.
    let dir = cluster.dir().unwrap().to_owned();
    assert!(dir.is_dir());
    drop(cluster);
    assert!(!dir.exists());
}

#[test]
fn three_members_kill_restart_stop_cont() {
    let started = Instant::now();
    let cluster = EtcdCluster::builder().members(3).start().unwrap();
    eprintln!(
        "3 members (etcd {}) healthy in {:?}",
        cluster.version(),
        started.elapsed()
    );
    let endpoints = cluster.endpoints();
    assert_eq!(endpoints.len(), 3);
    for e in &endpoints {
        assert_loopback(e);
    }
    let mut sorted = endpoints.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), 3, "distinct ports");
    let leader = cluster.leader(Duration::from_secs(10)).unwrap();
    assert!(leader < 3);

    // Kill the leader: the two others elect a new one and stay healthy.
    let killed_pid = cluster.pid(leader).unwrap();
    cluster.kill(leader).unwrap();
    assert!(!cluster.is_running(leader));
    assert!(cluster.pid(leader).is_none());
    assert!(
        !Path::new(&format!("/proc/{killed_pid}")).exists() || proc_state(killed_pid).is_none()
    );
    cluster.wait_all_healthy(HEALTH_TIMEOUT).unwrap();
    let new_leader = cluster.leader(Duration::from_secs(10)).unwrap();
    assert_ne!(new_leader, leader);

    // Restart it with its data: it rejoins.
    let t = Instant::now();
    cluster.restart(leader).unwrap();
    eprintln!("restarted member {leader} in {:?}", t.elapsed());
    assert!(cluster.is_running(leader));
    cluster.wait_all_healthy(HEALTH_TIMEOUT).unwrap();

    // Pause a follower: it stops answering; resume it: it is healthy again.
    let follower = (0..3).find(|&i| i != new_leader).unwrap();
    let pid = cluster.pid(follower).unwrap();
    cluster.stop(follower).unwrap();
    assert!(cluster.is_stopped(follower));
    assert!(cluster.is_running(follower));
    assert_eq!(proc_state(pid), Some('T'));
    assert!(!check_health(
        cluster.client_addr(follower),
        Duration::from_millis(300)
    ));
    let others: Vec<usize> = (0..3).filter(|&i| i != follower).collect();
    for &i in &others {
        cluster.wait_healthy(i, HEALTH_TIMEOUT).unwrap();
    }
    cluster.cont(follower).unwrap();
    assert!(!cluster.is_stopped(follower));
    assert_ne!(proc_state(pid), Some('T'));
    cluster.wait_healthy(follower, HEALTH_TIMEOUT).unwrap();
}

#[test]
fn no_etcd_left_behind_after_a_panic() {
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = std::thread::spawn(move || {
        let cluster = EtcdCluster::builder().members(2).start().unwrap();
        let pids: Vec<u32> = (0..2).map(|i| cluster.pid(i).unwrap()).collect();
        let dir = cluster.dir().unwrap().to_string_lossy().into_owned();
        // Leave one member stopped: Drop must still get rid of it.
        cluster.stop(1).unwrap();
        tx.send((pids, dir)).unwrap();
        panic!("deliberate panic with a live cluster");
    });
    assert!(handle.join().is_err(), "the thread must have panicked");
    let (pids, dir) = rx.recv().unwrap();
    assert_eq!(pids.len(), 2);
    for pid in &pids {
        // Killed and reaped: the pid no longer exists (or was recycled by an
        // unrelated process, which does not mention our temp dir).
        assert!(
            !process_alive_with(*pid, &dir),
            "etcd pid {pid} survived the panic"
        );
    }
    assert_eq!(processes_mentioning(&dir), Vec::<u32>::new());
    assert!(!Path::new(&dir).exists(), "temp dir {dir} not removed");
}

/// Set (to a file path) only in the child process of
/// `no_etcd_left_behind_after_an_abort`.
const ABORT_HELPER_ENV: &str = "ETCDV3_TESTKIT_ABORT_HELPER";

/// Not a test on its own: in the child process of
/// `no_etcd_left_behind_after_an_abort` it starts a cluster, writes its pids
/// and directory to a file and aborts, so no destructor runs.
#[test]
fn abort_helper() {
    let Some(info) = std::env::var_os(ABORT_HELPER_ENV) else {
        return;
    };
    let cluster = EtcdCluster::builder().members(2).start().unwrap();
    cluster.stop(1).unwrap();
    let pids: Vec<String> = (0..2)
        .map(|i| cluster.pid(i).unwrap().to_string())
        .collect();
    let dir = cluster.dir().unwrap().to_string_lossy().into_owned();
    std::fs::write(&info, format!("{}\n{dir}\n", pids.join(" "))).unwrap();
    std::process::abort();
}

#[test]
fn no_etcd_left_behind_after_an_abort() {
    let info = std::env::temp_dir().join(format!("etcdv3-testkit-abort-{}", std::process::id()));
    let _ = std::fs::remove_file(&info);
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "abort_helper", "--test-threads=1", "--nocapture"])
        .env(ABORT_HELPER_ENV, &info)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(!status.success(), "the helper must have aborted");
    let text = std::fs::read_to_string(&info).unwrap();
    let _ = std::fs::remove_file(&info);
    let mut lines = text.lines();
    let pids: Vec<u32> = lines
        .next()
        .unwrap()
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    let dir = lines.next().unwrap().to_owned();
    assert_eq!(pids.len(), 2);
    // The watchdog acts as soon as the aborted process is gone.
    let deadline = Instant::now() + Duration::from_secs(15);
    for _ in 0..3000 {
        let alive: Vec<u32> = pids
            .iter()
            .copied()
            .filter(|&p| process_alive_with(p, &dir))
            .collect();
        if alive.is_empty() && processes_mentioning(&dir).is_empty() && !Path::new(&dir).exists() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "after the abort: etcd pids {alive:?} alive, dir {dir} exists: {}",
            Path::new(&dir).exists()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    panic!("gave up waiting for the watchdog");
}

#[tokio::test]
async fn async_start_and_waits() {
    let cluster = EtcdClusterBuilder::default().start_async().await.unwrap();
    cluster
        .wait_healthy_async(0, Duration::from_secs(5))
        .await
        .unwrap();
    assert!(check_health_async(cluster.client_addr(0), Duration::from_secs(5)).await);
    assert_eq!(
        cluster.leader_async(Duration::from_secs(5)).await.unwrap(),
        0
    );
    cluster.kill(0).unwrap();
    assert!(!check_health_async(cluster.client_addr(0), Duration::from_millis(200)).await);
    cluster.restart_async(0).await.unwrap();
    cluster
        .wait_all_healthy_async(Duration::from_secs(5))
        .await
        .unwrap();
}

#[test]
fn bad_configuration_is_an_error() {
    assert!(matches!(
        EtcdCluster::builder().members(0).start(),
        Err(TestkitError::Config(_))
    ));
    assert!(matches!(
        EtcdCluster::builder().binary("/nonexistent/etcd").start(),
        Err(TestkitError::Io { .. })
    ));
    // A flag etcd rejects: the start fails fast with the log in the error.
    let started = Instant::now();
    let err = EtcdCluster::builder()
        .arg("--no-such-flag-for-etcd")
        .start()
        .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    let text = err.to_string();
    assert!(text.contains("no-such-flag-for-etcd"), "{text}");
}

/// What an echo server received, per connection, in accept order.
type Received = std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>;

/// A tiny echo server on loopback that also records what it received; it ends
/// when the runtime does.
async fn echo_server() -> (SocketAddr, Received) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let received = Received::default();
    let log = received.clone();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let log = log.clone();
            let index = {
                let mut l = log.lock().unwrap();
                l.push(Vec::new());
                l.len() - 1
            };
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                loop {
                    match sock.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            log.lock().unwrap()[index].extend_from_slice(&buf[..n]);
                            if sock.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                }
            });
        }
    });
    (addr, received)
}

/// Sends `msg` and reads the echo, within `timeout`.
async fn echo_roundtrip(
    sock: &mut tokio::net::TcpStream,
    msg: &[u8],
    timeout: Duration,
) -> Result<Vec<u8>, String> {
    let work = async {
        sock.write_all(msg).await.map_err(|e| e.to_string())?;
        let mut got = vec![0u8; msg.len()];
        sock.read_exact(&mut got).await.map_err(|e| e.to_string())?;
        Ok(got)
    };
    tokio::time::timeout(timeout, work)
        .await
        .unwrap_or_else(|_| Err("timed out".into()))
}

/// Reads until EOF or error, within `timeout`: `Ok(true)` on a clean or reset close.
async fn closed_within(sock: &mut tokio::net::TcpStream, timeout: Duration) -> bool {
    let mut buf = [0u8; 64];
    tokio::time::timeout(timeout, async {
        loop {
            match sock.read(&mut buf).await {
                Ok(0) | Err(_) => return true,
                Ok(_) => {}
            }
        }
    })
    .await
    .unwrap_or(false)
}

async fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    for _ in 0..10_000 {
        if cond() {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("gave up waiting for {what}");
}

#[tokio::test]
async fn proxy_modes_over_plain_tcp() {
    let (target, received) = echo_server().await;
    let proxy = FaultProxy::start(target).await.unwrap();
    assert_eq!(proxy.target(), target);
    assert_loopback(&proxy.endpoint());
    assert_eq!(proxy.addr().ip().to_string(), "127.0.0.1");
    let short = Duration::from_millis(300);
    let long = Duration::from_secs(5);

    // pass
    let mut a = tokio::net::TcpStream::connect(proxy.addr()).await.unwrap();
    assert_eq!(
        echo_roundtrip(&mut a, b"hello", long).await.unwrap(),
        b"hello"
    );
    wait_until("1 connection", long, || proxy.connections_total() == 1).await;
    assert_eq!(proxy.connections_active(), 1);

    // blackhole: nothing comes back, the connection stays open; pass releases
    // the held bytes.
    proxy.blackhole();
    assert_eq!(
        echo_roundtrip(&mut a, b"lost?", short).await,
        Err("timed out".into())
    );
    proxy.pass();
    let mut held = vec![0u8; 5];
    tokio::time::timeout(long, a.read_exact(&mut held))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&held, b"lost?");

    // one direction only: the request reaches the server, the answer is held.
    proxy.blackhole_direction(Direction::ServerToClient);
    assert!(echo_roundtrip(&mut a, b"one-way", short).await.is_err());
    proxy.pass();
    tokio::time::timeout(long, a.read_exact(&mut [0u8; 7]))
        .await
        .unwrap()
        .unwrap();
    proxy.blackhole_direction(Direction::ClientToServer);
    assert!(echo_roundtrip(&mut a, b"other-way", short).await.is_err());
    proxy.pass();
    tokio::time::timeout(long, a.read_exact(&mut [0u8; 9]))
        .await
        .unwrap()
        .unwrap();

    // delay: one round trip crosses the proxy twice.
    proxy.delay(Duration::from_millis(150));
    let t = Instant::now();
    assert_eq!(
        echo_roundtrip(&mut a, b"slow", long).await.unwrap(),
        b"slow"
    );
    let took = t.elapsed();
    assert!(took >= Duration::from_millis(300), "{took:?}");
    proxy.delay(Duration::ZERO);
    let t = Instant::now();
    echo_roundtrip(&mut a, b"fast", long).await.unwrap();
    assert!(
        t.elapsed() < Duration::from_millis(300),
        "{:?}",
        t.elapsed()
    );

    // cut_all closes current connections; new ones work.
    let mut b = tokio::net::TcpStream::connect(proxy.addr()).await.unwrap();
    echo_roundtrip(&mut b, b"b", long).await.unwrap();
    proxy.cut_all().await;
    assert!(closed_within(&mut a, long).await);
    assert!(closed_within(&mut b, long).await);
    assert_eq!(proxy.connections_active(), 0);
    let mut c = tokio::net::TcpStream::connect(proxy.addr()).await.unwrap();
    assert_eq!(
        echo_roundtrip(&mut c, b"again", long).await.unwrap(),
        b"again"
    );

    // cut after the next request: it is forwarded, no answer, connection closed.
    proxy.cut_after_next_request();
    assert!(proxy.cut_armed());
    c.write_all(b"last words").await.unwrap();
    assert!(closed_within(&mut c, long).await, "no answer, closed");
    assert!(!proxy.cut_armed());
    wait_until("the request to reach the server", long, || {
        received
            .lock()
            .unwrap()
            .last()
            .is_some_and(|r| r == b"againlast words")
    })
    .await;

    // cut after a number of client bytes.
    let mut d = tokio::net::TcpStream::connect(proxy.addr()).await.unwrap();
    echo_roundtrip(&mut d, b"d", long).await.unwrap();
    proxy.cut_after_client_bytes(3);
    d.write_all(b"abcdef").await.unwrap();
    assert!(closed_within(&mut d, long).await);
    wait_until("exactly 3 more bytes to reach the server", long, || {
        received
            .lock()
            .unwrap()
            .last()
            .is_some_and(|r| r == b"dabc")
    })
    .await;
    assert_eq!(proxy.connections_total(), 4);

    // Dropping the proxy closes its connections and stops accepting.
    let mut e = tokio::net::TcpStream::connect(proxy.addr()).await.unwrap();
    echo_roundtrip(&mut e, b"e", long).await.unwrap();
    let addr = proxy.addr();
    drop(proxy);
    assert!(closed_within(&mut e, long).await);
    let mut refused = false;
    for _ in 0..200 {
        match tokio::net::TcpStream::connect(addr).await {
            Err(_) => {
                refused = true;
                break;
            }
            Ok(mut s) => {
                if closed_within(&mut s, short).await {
                    refused = true;
                    break;
                }
            }
        }
    }
    assert!(refused, "the dropped proxy still forwards");
}

#[tokio::test]
async fn proxy_in_front_of_real_etcd() {
    let cluster = EtcdClusterBuilder::default().start_async().await.unwrap();
    let proxy = FaultProxy::start(cluster.client_addr(0)).await.unwrap();
    let addr = proxy.addr();
    assert!(check_health_async(addr, Duration::from_secs(5)).await);
    proxy.blackhole();
    assert!(!check_health_async(addr, Duration::from_millis(300)).await);
    proxy.pass();
    assert!(check_health_async(addr, Duration::from_secs(5)).await);
    proxy.delay(Duration::from_millis(100));
    let t = Instant::now();
    assert!(check_health_async(addr, Duration::from_secs(5)).await);
    assert!(
        t.elapsed() >= Duration::from_millis(200),
        "{:?}",
        t.elapsed()
    );
    proxy.pass();
    // The request reaches etcd but the answer never comes back.
    proxy.cut_after_next_request();
    assert!(!check_health_async(addr, Duration::from_secs(5)).await);
    assert!(check_health_async(addr, Duration::from_secs(5)).await);
    // The member itself was never affected.
    assert!(check_health_async(cluster.client_addr(0), Duration::from_secs(5)).await);
}

/// One HTTP/2 frame.
fn h2_frame(frame_type: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut f = vec![
        (len >> 16) as u8,
        (len >> 8) as u8,
        len as u8,
        frame_type,
        flags,
    ];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An HPACK "literal header field without indexing, new name" (short strings).
fn hpack_literal(out: &mut Vec<u8>, name: &str, value: &str) {
    assert!(name.len() < 127 && value.len() < 127);
    out.push(0x00);
    out.push(name.len() as u8);
    out.extend_from_slice(name.as_bytes());
    out.push(value.len() as u8);
    out.extend_from_slice(value.as_bytes());
}

/// A unary gRPC `KV/Put` over raw HTTP/2 through the proxy: the proxy cuts the
/// connection right after the request (not after the preceding control frames),
/// and etcd applies the put although the client never gets an answer.
#[tokio::test]
async fn proxy_cuts_after_a_grpc_request() {
    let cluster = EtcdClusterBuilder::default().start_async().await.unwrap();
    let proxy = FaultProxy::start(cluster.client_addr(0)).await.unwrap();
    let long = Duration::from_secs(5);
    let mut sock = tokio::net::TcpStream::connect(proxy.addr()).await.unwrap();

    // Preface and SETTINGS; wait for the server's SETTINGS to come back.
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend(h2_frame(0x4, 0, 0, &[]));
    sock.write_all(&hello).await.unwrap();
    let mut head = [0u8; 9];
    tokio::time::timeout(long, sock.read_exact(&mut head))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(head[3], 0x4, "the server starts with SETTINGS");

    proxy.cut_after_next_request();
    // Control frames do not trigger the cut: SETTINGS ack, WINDOW_UPDATE, PING.
    sock.write_all(&h2_frame(0x4, 0x1, 0, &[])).await.unwrap();
    sock.write_all(&h2_frame(0x8, 0, 0, &[0, 1, 0, 0]))
        .await
        .unwrap();
    sock.write_all(&h2_frame(0x6, 0, 0, &[7; 8])).await.unwrap();

    // HEADERS (END_HEADERS) then DATA (END_STREAM), in separate writes.
    let mut block = Vec::new();
    hpack_literal(&mut block, ":method", "POST");
    hpack_literal(&mut block, ":scheme", "http");
    hpack_literal(&mut block, ":path", "/etcdserverpb.KV/Put");
    hpack_literal(&mut block, ":authority", &proxy.addr().to_string());
    hpack_literal(&mut block, "content-type", "application/grpc");
    hpack_literal(&mut block, "te", "trailers");
    sock.write_all(&h2_frame(0x1, 0x4, 1, &block))
        .await
        .unwrap();
    // PutRequest { key: "testkit/cut", value: "applied" }.
    let mut msg = vec![0x0a, 11];
    msg.extend_from_slice(b"testkit/cut");
    msg.extend_from_slice(&[0x12, 7]);
    msg.extend_from_slice(b"applied");
    let mut grpc = vec![0u8];
    grpc.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    grpc.extend_from_slice(&msg);
    sock.write_all(&h2_frame(0x0, 0x1, 1, &grpc)).await.unwrap();

    // The client sees the connection close without a response HEADERS frame
    // for stream 1.
    let mut rest = Vec::new();
    let read = tokio::time::timeout(long, sock.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "the proxy must close the connection");
    let mut i = 0;
    while i + 9 <= rest.len() {
        let len = (usize::from(rest[i]) << 16)
            | (usize::from(rest[i + 1]) << 8)
            | usize::from(rest[i + 2]);
        let stream =
            u32::from_be_bytes([rest[i + 5], rest[i + 6], rest[i + 7], rest[i + 8]]) & 0x7fff_ffff;
        assert_ne!(stream, 1, "no answer to the request may reach the client");
        i += 9 + len;
    }
    assert!(!proxy.cut_armed());

    // etcd applied the put anyway.
    let deadline = Instant::now() + long;
    loop {
        let body = r#"{"key":"dGVzdGtpdC9jdXQ="}"#;
        let req = format!(
            "POST /v3/kv/range HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let mut s = tokio::net::TcpStream::connect(cluster.client_addr(0))
            .await
            .unwrap();
        s.write_all(req.as_bytes()).await.unwrap();
        let mut resp = String::new();
        tokio::time::timeout(long, s.read_to_string(&mut resp))
            .await
            .unwrap()
            .unwrap();
        if resp.contains("YXBwbGllZA==") {
            break;
        }
        assert!(Instant::now() < deadline, "the put was not applied: {resp}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
