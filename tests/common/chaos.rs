//! The fault schedule of the chaos tests (`tests/chaos_*.rs`): seeded steps of member faults
//! (SIGSTOP/SIGCONT, SIGKILL and SIGTERM with restarts; at most one member down at a time)
//! and fault-proxy faults (cuts, blackholes, cuts after a request or some bytes, delays), and
//! running one fault to its end.

use std::future::Future;
use std::time::{Duration, Instant};

use etcdv3::testkit::{Direction, EtcdCluster, FaultProxy};
use rand::Rng;
use rand::rngs::StdRng;

pub(crate) fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Which member a member fault hits: resolved when the fault runs.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Target {
    Leader,
    Member(usize),
}

#[derive(Debug, Clone, Copy)]
pub(crate) enum Fault {
    /// SIGSTOP the member for `d`, then SIGCONT.
    Stop { member: Target, d: Duration },
    /// SIGKILL the member (the caller's workload quiesced first), keep it down for `down`,
    /// restart it.
    Restart { member: Target, down: Duration },
    /// SIGTERM the member (it stops gracefully, with requests in flight), keep it down for
    /// `down`, restart it.
    Terminate { member: Target, down: Duration },
    /// Close every connection through proxy `proxy`.
    Cut { proxy: usize },
    /// Hold the traffic through proxy `proxy` (both directions, or one) for `d`.
    Blackhole {
        proxy: usize,
        dir: Option<Direction>,
        d: Duration,
    },
    /// Cut the connection that next carries a whole request through proxy `proxy` (the
    /// request reaches the server, its answer never the client), armed for `d`.
    CutAfterRequest { proxy: usize, d: Duration },
    /// Cut the connection after `bytes` more client bytes through proxy `proxy` (mid-frame,
    /// mostly), armed for `d`.
    CutAfterBytes {
        proxy: usize,
        bytes: u64,
        d: Duration,
    },
    /// Delay every chunk through proxy `proxy` by `delay`, for `d`.
    Delay {
        proxy: usize,
        delay: Duration,
        d: Duration,
    },
}

impl Fault {
    /// A rough length, to bound the schedule.
    pub(crate) fn planned(&self) -> Duration {
        match *self {
            Fault::Stop { d, .. } => d + ms(300),
            // Killing waits for writes in flight; restarting waits until the member is healthy.
            Fault::Restart { down, .. } | Fault::Terminate { down, .. } => down + ms(2000),
            Fault::Cut { .. } => ms(50),
            Fault::Blackhole { d, .. }
            | Fault::CutAfterRequest { d, .. }
            | Fault::CutAfterBytes { d, .. }
            | Fault::Delay { d, .. } => d,
        }
    }
}

/// One step of the schedule: a pause, then faults that run together (at most one of them
/// takes a member down).
#[derive(Debug)]
pub(crate) struct Step {
    pub(crate) pause: Duration,
    pub(crate) faults: Vec<Fault>,
}

pub(crate) fn proxy_fault(rng: &mut StdRng, proxy: usize) -> Fault {
    match rng.random_range(0..10) {
        0..=2 => Fault::Cut { proxy },
        3..=5 => Fault::Blackhole {
            proxy,
            dir: match rng.random_range(0..3) {
                0 => None,
                1 => Some(Direction::ClientToServer),
                _ => Some(Direction::ServerToClient),
            },
            d: ms(rng.random_range(300..1500)),
        },
        6 | 7 => Fault::CutAfterRequest {
            proxy,
            d: ms(rng.random_range(300..1000)),
        },
        8 => Fault::CutAfterBytes {
            proxy,
            bytes: rng.random_range(0..3000),
            d: ms(rng.random_range(300..1000)),
        },
        _ => Fault::Delay {
            proxy,
            delay: ms(rng.random_range(20..300)),
            d: ms(rng.random_range(500..1500)),
        },
    }
}

/// The seeded schedule: steps until their planned lengths add up to `budget`.
pub(crate) fn schedule(rng: &mut StdRng, budget: Duration) -> Vec<Step> {
    let mut steps = Vec::new();
    let mut planned = Duration::ZERO;
    let mut restarts = 0;
    while planned < budget {
        let pause = ms(rng.random_range(150..600));
        let member = if rng.random_bool(0.4) {
            Target::Leader
        } else {
            Target::Member(rng.random_range(0..3))
        };
        let proxy = rng.random_range(0..3);
        let mut faults = vec![match rng.random_range(0..10) {
            0..=2 => Fault::Stop {
                member,
                d: ms(rng.random_range(500..2500)),
            },
            3 | 4 if restarts < 2 => {
                restarts += 1;
                let down = ms(rng.random_range(300..1500));
                if rng.random_bool(0.5) {
                    Fault::Restart { member, down }
                } else {
                    Fault::Terminate { member, down }
                }
            }
            _ => proxy_fault(rng, proxy),
        }];
        // Now and then a network fault on another proxy at the same time.
        if rng.random_bool(0.35) {
            let other = (proxy + rng.random_range(1..3)) % 3;
            faults.push(proxy_fault(rng, other));
        }
        planned += pause + faults.iter().map(Fault::planned).max().unwrap_or_default();
        steps.push(Step { pause, faults });
    }
    steps
}

/// The member `t` names now (the leader is looked up).
pub(crate) async fn member(cluster: &EtcdCluster, t: Target, ctx: &str) -> usize {
    match t {
        Target::Member(i) => i,
        Target::Leader => cluster
            .leader_async(Duration::from_secs(10))
            .await
            .unwrap_or_else(|e| panic!("{ctx}: no leader: {e}")),
    }
}

/// Runs one fault to its end (healed). `note` reports each step; `kill` takes the member
/// down for a `Restart` the caller's way (quiescing its workload first, for etcd issue
/// 13766) and says which member it killed (`None`: skipped).
pub(crate) async fn run_fault<K, KF>(
    ctx: &str,
    cluster: &EtcdCluster,
    proxies: &[FaultProxy],
    fault: Fault,
    note: &(dyn Fn(String) + Sync),
    kill: K,
) where
    K: FnOnce(Target) -> KF,
    KF: Future<Output = Option<usize>>,
{
    let restart = |m: usize| async move {
        tokio::time::timeout(Duration::from_secs(20), cluster.restart_async(m))
            .await
            .unwrap_or_else(|_| panic!("{ctx}: member {m} restart took over 20 s"))
            .unwrap_or_else(|e| panic!("{ctx}: restarting member {m}: {e}"));
        note(format!("  member {m} restarted"));
    };
    match fault {
        Fault::Stop { member: t, d } => {
            let m = member(cluster, t, ctx).await;
            note(format!("  SIGSTOP member {m}"));
            cluster.stop(m).unwrap();
            tokio::time::sleep(d).await;
            cluster.cont(m).unwrap();
            cluster
                .wait_healthy_async(m, Duration::from_secs(15))
                .await
                .unwrap_or_else(|e| panic!("{ctx}: member {m} after SIGCONT: {e}"));
        }
        Fault::Restart { member: t, down } => {
            let Some(m) = kill(t).await else {
                return;
            };
            tokio::time::sleep(down).await;
            restart(m).await;
        }
        Fault::Terminate { member: t, down } => {
            let m = member(cluster, t, ctx).await;
            let pid = cluster.pid(m).expect("a running member has a pid");
            note(format!("  SIGTERM member {m}"));
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            )
            .unwrap();
            let gone_by = Instant::now() + Duration::from_secs(15);
            while cluster.is_running(m) {
                assert!(
                    Instant::now() < gone_by,
                    "{ctx}: member {m} still runs 15 s after SIGTERM"
                );
                tokio::time::sleep(ms(20)).await;
            }
            tokio::time::sleep(down).await;
            restart(m).await;
        }
        Fault::Cut { proxy } => proxies[proxy].cut_all().await,
        Fault::Blackhole { proxy, dir, d } => {
            match dir {
                None => proxies[proxy].blackhole(),
                Some(dir) => proxies[proxy].blackhole_direction(dir),
            }
            tokio::time::sleep(d).await;
            proxies[proxy].pass();
        }
        Fault::CutAfterRequest { proxy, d } => {
            proxies[proxy].cut_after_next_request();
            tokio::time::sleep(d).await;
            proxies[proxy].pass();
        }
        Fault::CutAfterBytes { proxy, bytes, d } => {
            proxies[proxy].cut_after_client_bytes(bytes);
            tokio::time::sleep(d).await;
            proxies[proxy].pass();
        }
        Fault::Delay { proxy, delay, d } => {
            proxies[proxy].delay(delay);
            tokio::time::sleep(d).await;
            proxies[proxy].pass();
        }
    }
}
