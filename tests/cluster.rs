//! The cluster membership API against a real 3-member etcd cluster: list, add as learner,
//! start the new member's process, promote, update, remove; typed errors.

mod common;

use std::fs::File;
use std::future::IntoFuture;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{client, wait_until};
use etcdv3::testkit::EtcdCluster;
use etcdv3::{Client, ErrorKind, Member};

async fn cluster3() -> EtcdCluster {
    EtcdCluster::builder()
        .members(3)
        .start_async()
        .await
        .unwrap_or_else(|e| panic!("could not start a 3-member etcd cluster: {e}"))
}

fn free_ports(n: usize) -> Vec<u16> {
    let ls: Vec<_> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    ls.iter().map(|l| l.local_addr().unwrap().port()).collect()
}

/// An etcd process joining an existing testkit cluster, killed (and reaped) on drop, so no
/// process is left behind even when the test fails.
struct ExtraMember {
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl ExtraMember {
    /// Start member `name` listening for clients on `client_port` and for peers on every port
    /// of `peer_ports` (advertising the first), joining `etcd` whose members plus this one
    /// make `initial_cluster`. The flags mirror the testkit's own.
    fn spawn(
        etcd: &EtcdCluster,
        name: &str,
        client_port: u16,
        peer_ports: &[u16],
        initial_cluster: &str,
    ) -> ExtraMember {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join(format!("{name}.log"));
        let out = File::create(&log).unwrap();
        let err = out.try_clone().unwrap();
        let client_url = format!("http://127.0.0.1:{client_port}");
        let peer_urls: Vec<String> = peer_ports
            .iter()
            .map(|p| format!("http://127.0.0.1:{p}"))
            .collect();
        let mut cmd = Command::new(etcd.binary());
        cmd.arg(format!("--name={name}"))
            .arg(format!("--data-dir={}", dir.path().join("data").display()))
            .arg(format!("--listen-client-urls={client_url}"))
            .arg(format!("--advertise-client-urls={client_url}"))
            .arg(format!("--listen-peer-urls={}", peer_urls.join(",")))
            .arg(format!("--initial-advertise-peer-urls={}", peer_urls[0]))
            .arg(format!("--initial-cluster={initial_cluster}"))
            .arg("--initial-cluster-state=existing")
            .arg("--heartbeat-interval=50")
            .arg("--election-timeout=500")
            .arg("--logger=zap")
            .arg("--log-level=error")
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("ETCD_") {
                cmd.env_remove(key);
            }
        }
        let child = cmd.spawn().unwrap();
        ExtraMember {
            child,
            log,
            _dir: dir,
        }
    }

    fn has_exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }
}

impl Drop for ExtraMember {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail = &log[log.len().saturating_sub(3000)..];
            eprintln!("--- log tail of the extra member ---\n{tail}");
        }
    }
}

/// Run a membership change, retrying (bounded) while the server refuses it as
/// `Unhealthy`: with its strict reconfiguration check, etcd accepts a change only once every
/// voting member has been connected for 5 s, which a freshly started cluster is not yet.
/// A change that timed out (`Deadline`) is retried too: raft drops a configuration change
/// proposed while an earlier one is not yet applied on the leader, and etcd then waits for
/// it until the request's deadline. That is the likely cause of a `Deadline` seen once with
/// etcd 3.4.23 right after a member update.
async fn when_healthy<T, F, Fut>(mut change: F) -> etcdv3::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = etcdv3::Result<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match change().await {
            Err(e)
                if matches!(e.kind(), ErrorKind::Unhealthy | ErrorKind::Deadline)
                    && Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => return other,
        }
    }
}

async fn list(c: &Client) -> Vec<Member> {
    c.cluster().member_list().await.unwrap().members
}

#[tokio::test]
async fn member_list_describes_every_member() {
    let etcd = cluster3().await;
    let c = client(&etcd).await;
    let resp = c.cluster().member_list().await.unwrap();
    assert_ne!(resp.header.cluster_id, 0);
    assert_eq!(resp.members.len(), 3);
    for i in 0..3 {
        let m = resp
            .members
            .iter()
            .find(|m| m.name == etcd.member_name(i))
            .unwrap();
        assert!(m.is_started() && !m.is_learner);
        assert_ne!(m.id, 0);
        assert_eq!(m.client_urls, [etcd.endpoint(i)]);
        assert_eq!(m.peer_urls, [format!("http://{}", etcd.peer_addr(i))]);
        assert_eq!(resp.member(m.id), Some(m));
    }
    let lin = c.cluster().member_list().linearizable().await.unwrap();
    let mut a: Vec<u64> = resp.members.iter().map(|m| m.id).collect();
    let mut b: Vec<u64> = lin.members.iter().map(|m| m.id).collect();
    a.sort_unstable();
    b.sort_unstable();
    assert_eq!(a, b);
}

#[tokio::test]
async fn learner_is_added_started_promoted_updated_and_removed() {
    let etcd = cluster3().await;
    let c = client(&etcd).await;
    let cl = c.cluster();
    c.kv().put("before", "1").await.unwrap();

    // Client-side and server-side validation of peer URLs.
    let no_urls: [&str; 0] = [];
    assert_eq!(
        cl.member_add(no_urls).await.unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );
    assert_eq!(
        cl.member_add(["not a url"]).await.unwrap_err().kind(),
        ErrorKind::MemberBadUrls
    );
    let taken = format!("http://{}", etcd.peer_addr(0));
    let e = when_healthy(|| cl.member_add([taken.as_str()]).into_future())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PeerUrlExist, "{e:?}");

    let ports = free_ports(3);
    let (client_port, peer_ports) = (ports[0], &ports[1..]);
    let peer1 = format!("http://127.0.0.1:{}", peer_ports[0]);
    let peer2 = format!("http://127.0.0.1:{}", peer_ports[1]);

    // Add as learner: not started yet, not voting.
    let added = when_healthy(|| cl.member_add([peer1.as_str()]).as_learner().into_future())
        .await
        .unwrap();
    let new = added.member.clone();
    assert!(new.is_learner);
    assert!(!new.is_started() && new.client_urls.is_empty());
    assert_eq!(new.peer_urls, std::slice::from_ref(&peer1));
    assert_eq!(added.members.len(), 4);
    assert!(added.members.contains(&new));
    // A learner that has not caught up cannot be promoted.
    let e = cl.member_promote(new.id).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::LearnerNotReady, "{e:?}");

    // Start its process.
    let mut initial: Vec<String> = (0..3)
        .map(|i| format!("{}=http://{}", etcd.member_name(i), etcd.peer_addr(i)))
        .collect();
    initial.push(format!("m3={peer1}"));
    let mut proc = ExtraMember::spawn(&etcd, "m3", client_port, peer_ports, &initial.join(","));
    let new_ep = format!("http://127.0.0.1:{client_port}");
    wait_until(Duration::from_secs(30), "the learner to start", || {
        let c = c.clone();
        async move {
            c.cluster().member_list().await.is_ok_and(|r| {
                r.member(new.id)
                    .is_some_and(|m| m.name == "m3" && m.client_urls.len() == 1)
            })
        }
    })
    .await;
    let started = list(&c).await.into_iter().find(|m| m.id == new.id).unwrap();
    assert!(started.is_learner);
    assert_eq!(started.client_urls, std::slice::from_ref(&new_ep));

    // A learner serves no linearizable requests.
    let learner_client = Client::builder([new_ep.as_str()])
        .request_timeout(Duration::from_secs(10))
        .connect()
        .await
        .unwrap();
    let e = learner_client.kv().get("before").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotSupportedForLearner, "{e:?}");
    let st = c.maintenance_at(&new_ep).unwrap().status().await.unwrap();
    assert!(st.is_learner);
    assert_eq!(st.header.member_id, new.id);

    // Promote, retrying while it catches up.
    let deadline = Instant::now() + Duration::from_secs(30);
    let promoted = loop {
        match cl.member_promote(new.id).await {
            Ok(r) => break r,
            Err(e) if e.kind() == ErrorKind::LearnerNotReady && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("promote failed: {e:?}"),
        }
    };
    let m = promoted.member(new.id).unwrap();
    assert!(!m.is_learner);
    assert_eq!(promoted.members.len(), 4);
    assert!(promoted.members.iter().all(|m| !m.is_learner));
    let e = cl.member_promote(new.id).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::MemberNotLearner, "{e:?}");
    // Now a voter, it serves reads.
    wait_until(
        Duration::from_secs(10),
        "the promoted member to serve",
        || {
            let lc = learner_client.clone();
            async move { lc.kv().get("before").await.is_ok_and(|r| r.count == 1) }
        },
    )
    .await;

    // Update its peer URLs (the process listens on both).
    let updated = cl
        .member_update(new.id, [peer1.as_str(), peer2.as_str()])
        .await
        .unwrap();
    let mut urls = updated.member(new.id).unwrap().peer_urls.clone();
    urls.sort();
    let mut want = vec![peer1.clone(), peer2.clone()];
    want.sort();
    assert_eq!(urls, want);
    assert_eq!(
        when_healthy(|| cl.member_update(0x4242, [peer2.as_str()]).into_future())
            .await
            .unwrap_err()
            .kind(),
        ErrorKind::MemberNotFound
    );
    c.kv().put("during", "2").await.unwrap();

    // Remove it: the member list shrinks and its process shuts itself down.
    let removed = cl.member_remove(new.id).await.unwrap();
    assert_eq!(removed.members.len(), 3);
    assert!(removed.member(new.id).is_none());
    wait_until(
        Duration::from_secs(20),
        "the removed member to exit",
        || {
            let exited = proc.has_exited();
            async move { exited }
        },
    )
    .await;
    assert_eq!(
        cl.member_remove(new.id).await.unwrap_err().kind(),
        ErrorKind::MemberNotFound
    );
    assert_eq!(list(&c).await.len(), 3);
    c.kv().put("after", "3").await.unwrap();
    assert_eq!(c.kv().get("during").await.unwrap().count, 1);
}

#[tokio::test]
async fn voting_member_add_and_remove_before_it_starts() {
    let etcd = cluster3().await;
    let c = client(&etcd).await;
    let cl = c.cluster();
    let peer = format!("http://127.0.0.1:{}", free_ports(1)[0]);
    let added = when_healthy(|| cl.member_add([peer.as_str()]).into_future())
        .await
        .unwrap();
    assert!(!added.member.is_learner);
    assert!(!added.member.is_started());
    assert_eq!(list(&c).await.len(), 4);
    // Promoting it is refused (the leader checks readiness first: an unstarted member is
    // not in sync; a started voter gets MemberNotLearner, see the learner test).
    let e = cl.member_promote(added.member.id).await.unwrap_err();
    assert!(
        matches!(
            e.kind(),
            ErrorKind::LearnerNotReady | ErrorKind::MemberNotLearner
        ),
        "{e:?}"
    );
    // Three of four voters are started: the cluster still has quorum.
    c.kv().put("k", "v").await.unwrap();
    let removed = cl.member_remove(added.member.id).await.unwrap();
    assert_eq!(removed.members.len(), 3);
    assert!(removed.members.iter().all(Member::is_started));
}
