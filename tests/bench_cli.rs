//! The etcd-bench binary end to end: workloads against a throwaway etcd, JSON output, exit
//! codes for bad flags and unreachable endpoints.
#![cfg(feature = "bench")]

use std::process::Command;
use std::time::{Duration, Instant};

fn bench() -> Command {
    Command::new(env!("CARGO_BIN_EXE_etcd-bench"))
}

fn json_field(json: &str, key: &str) -> Option<f64> {
    let pat = format!("\"{key}\":");
    let start = json.find(&pat)? + pat.len();
    let rest = &json[start..];
    let end = rest.find([',', '}']).unwrap_or(rest.len());
    rest[..end].trim().parse().ok()
}

#[test]
fn kv_workloads_run_against_a_throwaway_etcd() {
    for args in [
        vec![
            "put",
            "--total",
            "200",
            "--clients",
            "8",
            "--key-space-size",
            "50",
        ],
        vec![
            "range",
            "--total",
            "100",
            "--clients",
            "4",
            "--consistency",
            "s",
        ],
        vec![
            "txn-put",
            "--total",
            "50",
            "--txn-ops",
            "4",
            "--key-space-size",
            "1000",
        ],
        vec![
            "txn-mixed",
            "--total",
            "100",
            "--clients",
            "4",
            "--key-space-size",
            "20",
        ],
        // The whole client on one thread (a current-thread runtime).
        vec!["put", "--total", "100", "--clients", "16", "--threads", "1"],
    ] {
        let out = bench().args(&args).arg("--json").output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{args:?}: {stderr}");
        assert!(
            stderr.contains("throwaway etcd"),
            "says it started etcd: {stderr}"
        );
        let total: f64 = args[2].parse().unwrap();
        assert_eq!(json_field(&stdout, "requests"), Some(total), "{stdout}");
        assert_eq!(json_field(&stdout, "errors"), Some(0.0), "{stdout}");
        assert!(json_field(&stdout, "cpu_us_per_op").unwrap() > 0.0);
        assert!(json_field(&stdout, "p99_secs").unwrap() > 0.0);
    }
    // The text report has etcd benchmark's sections.
    let out = bench().args(["put", "--total", "50"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for s in [
        "Summary:",
        "Requests/sec:",
        "Response time histogram:",
        "Latency distribution:",
        "CPU per request",
        "Peak RSS",
    ] {
        assert!(text.contains(s), "{s} missing: {text}");
    }
}

#[test]
fn watch_and_lease_workloads_run() {
    for (args, key, want) in [
        (
            vec![
                "watch",
                "--watch-per-stream",
                "50",
                "--put-total",
                "20",
                "--put-rate",
                "0",
            ],
            "events_delivered",
            1000.0,
        ),
        (
            // Three tasks, each reading its share of the 50 watchers merged.
            vec![
                "watch",
                "--watch-per-stream",
                "50",
                "--put-total",
                "20",
                "--put-rate",
                "0",
                "--consumers",
                "3",
            ],
            "events_delivered",
            1000.0,
        ),
        (
            vec![
                "watch-latency",
                "--watch-per-stream",
                "10",
                "--put-total",
                "20",
                "--put-rate",
                "0",
            ],
            "requests",
            200.0,
        ),
        (
            vec!["watch-get", "--watch-per-stream", "10", "--total", "50"],
            "requests",
            50.0,
        ),
        (
            vec!["watch-catchup", "--history", "300"],
            "events_replayed",
            300.0,
        ),
        (
            vec![
                "lease-keepalive",
                "--leases",
                "20",
                "--ttl",
                "5",
                "--keep",
                "1s",
            ],
            "leases_lost",
            0.0,
        ),
    ] {
        let out = bench().args(&args).arg("--json").output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(json_field(&stdout, key), Some(want), "{args:?}: {stdout}");
    }
}

#[test]
fn bad_flags_exit_with_code_2() {
    let out = bench().args(["put", "--total", "lots"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--total"));
    let out = bench().args(["no-such-workload"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn unreachable_endpoints_fail_fast_naming_each() {
    let dead: Vec<String> = (0..2)
        .map(|_| {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            format!("127.0.0.1:{}", l.local_addr().unwrap().port())
        })
        .collect();
    let t = Instant::now();
    let out = bench()
        .args(["--endpoints", &dead.join(","), "put", "--total", "10"])
        .output()
        .unwrap();
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    for d in &dead {
        assert!(err.contains(d.as_str()), "{d} not named in: {err}");
    }
}

#[test]
fn a_silent_endpoint_fails_fast_and_txn_ops_beyond_the_key_space_are_refused() {
    // Accepts connections (the kernel completes them) but never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = format!("127.0.0.1:{}", silent.local_addr().unwrap().port());
    let t = Instant::now();
    let out = bench()
        .args(["--endpoints", &addr, "put", "--total", "10"])
        .output()
        .unwrap();
    assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("does not answer"), "{err}");

    // Two puts per transaction need two keys.
    let out = bench()
        .args(["txn-put", "--txn-ops", "2", "--total", "5"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--key-space-size"), "{err}");
}
