//! The invariant checks the KV chaos tests (`chaos_kv`, `chaos_auth`) share: every writer's
//! puts against the final store, reads at acknowledged revisions, and what each watcher saw.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcdv3::testkit::EtcdCluster;
use etcdv3::{Client, Error, ErrorKind, EventKind, KeyValue};

use super::chaos::ms;

/// How late a put may return after its deadline (a loaded 2-core box; a few ms are usual).
pub(crate) const DEADLINE_SLACK: Duration = Duration::from_secs(1);

/// An error outcome: (kind, indeterminate, message).
pub(crate) type Failure = (ErrorKind, bool, String);

pub(crate) fn failure(e: &Error) -> Failure {
    (e.kind(), e.is_indeterminate(), format!("{e:?}"))
}

/// One put of a writer and what the client said about it.
#[derive(Debug)]
pub(crate) struct Attempt {
    /// When the put started and how long it took (since the schedule's start).
    pub(crate) at: Duration,
    pub(crate) took: Duration,
    /// The put's deadline.
    pub(crate) timeout: Duration,
    pub(crate) key: String,
    pub(crate) value: String,
    /// The acknowledged revision, or the failure.
    pub(crate) outcome: Result<i64, Failure>,
}

/// What one watcher saw: (revision, kind, key, value) of every event, and how it ended.
#[derive(Debug, Default)]
pub(crate) struct Seen {
    pub(crate) events: Vec<(i64, EventKind, String, String)>,
    pub(crate) end: Option<String>,
}

impl Seen {
    pub(crate) fn last(&self) -> Option<i64> {
        self.events.last().map(|e| e.0)
    }
}

/// A watcher of a chaos test: its name, what it saw, the task reading it.
pub(crate) type Watching = (&'static str, Arc<Mutex<Seen>>, tokio::task::JoinHandle<()>);

/// Whether the cluster's etcd can lose an entry a member was applying when it was killed
/// (etcd issue 13766: 3.5.0 to 3.5.2).
pub(crate) fn loses_applied_entries(cluster: &EtcdCluster) -> bool {
    let patch: u32 = cluster
        .version()
        .split('.')
        .nth(2)
        .and_then(|p| p.parse().ok())
        .unwrap_or(u32::MAX);
    super::version_of(cluster) == (3, 5) && patch <= 2
}

/// Waits (up to 10 s) until the three members report one revision. Should a member have lost
/// an applied entry all the same (etcd issue 13766), its revision stays behind the others'
/// for good: the server's data loss. Then this says so and returns false on an etcd with that
/// bug (3.5.0 to 3.5.2), and fails the test on any other.
pub(crate) async fn members_agree(ctx: &str, cluster: &EtcdCluster, observer: &Client) -> bool {
    let mut revisions = Vec::new();
    let agree_by = Instant::now() + Duration::from_secs(10);
    loop {
        revisions.clear();
        for i in 0..3 {
            let m = observer.maintenance_at(&cluster.endpoint(i)).unwrap();
            match m.status().await {
                Ok(s) => revisions.push(s.header.revision),
                Err(e) => panic!("{ctx}: status of member {i}: {e:?}"),
            }
        }
        if revisions.iter().all(|r| *r == revisions[0]) || Instant::now() >= agree_by {
            break;
        }
        tokio::time::sleep(ms(100)).await;
    }
    if revisions.iter().all(|r| *r == revisions[0]) {
        return true;
    }
    assert!(
        loses_applied_entries(cluster),
        "{ctx}: the members' revisions diverged ({revisions:?}) on etcd {}",
        cluster.version()
    );
    eprintln!(
        "SKIPPED the invariants: the members' revisions diverged ({revisions:?}); etcd {} \
         lost an applied entry (etcd issue 13766)",
        cluster.version()
    );
    false
}

/// The puts of writer `name` against the final `store` (key -> its key-value):
/// - each returned within its deadline (plus [`DEADLINE_SLACK`]) and was applied at most once;
/// - each acknowledged put is there, with its value, at the acknowledged revision, which no
///   other put was acknowledged at (`acked_revs` gathers them across writers) and, when the
///   writer put one at a time (`in_order`), after its previous acknowledged put;
/// - a put that failed with an error that is not indeterminate was not applied.
///
/// Every 50th acknowledged put goes to `samples` (key, value, revision) for
/// [`check_samples`]. Returns the writer's summary line.
pub(crate) fn check_writer(
    ctx: &str,
    name: &str,
    list: &[Attempt],
    in_order: bool,
    store: &HashMap<String, KeyValue>,
    acked_revs: &mut HashSet<i64>,
    samples: &mut Vec<(String, String, i64)>,
) -> String {
    let (mut acked, mut unknown, mut unknown_applied, mut refused) = (0, 0, 0, 0);
    // Per kind of error: how many, and the first message.
    let mut kinds: BTreeMap<String, (usize, String)> = BTreeMap::new();
    let mut last_acked = 0;
    let slowest = list.iter().map(|a| a.took).max().unwrap_or_default();
    for (i, a) in list.iter().enumerate() {
        assert!(
            a.took <= a.timeout + DEADLINE_SLACK,
            "{ctx}: put {} returned {:?} after its {:?} deadline: {a:?}",
            a.key,
            a.took - a.timeout,
            a.timeout
        );
        let found = store.get(&a.key);
        if let Some(kv) = found {
            assert_eq!(
                kv.version(),
                1,
                "{ctx}: {} applied more than once: {kv:?}",
                a.key
            );
        }
        match &a.outcome {
            Ok(rev) => {
                acked += 1;
                let kv = found.unwrap_or_else(|| {
                    panic!(
                        "{ctx}: acknowledged put {} at revision {rev} was lost: {a:?}",
                        a.key
                    )
                });
                assert_eq!(kv.value_str().unwrap(), a.value, "{ctx}: {}", a.key);
                assert_eq!(
                    kv.mod_revision(),
                    *rev,
                    "{ctx}: {} acknowledged at {rev}, stored at another revision",
                    a.key
                );
                if in_order {
                    assert!(
                        *rev > last_acked,
                        "{ctx}: writer {name}'s put {i} acknowledged at {rev}, not after its \
                         previous acknowledged put ({last_acked})"
                    );
                    last_acked = *rev;
                }
                assert!(
                    acked_revs.insert(*rev),
                    "{ctx}: revision {rev} acknowledged twice"
                );
                if i.is_multiple_of(50) {
                    samples.push((a.key.clone(), a.value.clone(), *rev));
                }
            }
            Err((kind, indeterminate, msg)) => {
                kinds
                    .entry(format!("{kind:?}{}", if *indeterminate { "?" } else { "" }))
                    .or_insert_with(|| (0, format!("first at {:?} ({:?}): {msg}", a.at, a.took)))
                    .0 += 1;
                if *indeterminate {
                    unknown += 1;
                    unknown_applied += usize::from(found.is_some());
                } else {
                    refused += 1;
                    assert!(
                        found.is_none(),
                        "{ctx}: put {} failed with an error that is not indeterminate, yet it \
                         was applied: {a:?}",
                        a.key
                    );
                }
            }
        }
    }
    assert!(acked > 0, "{ctx}: writer {name} never got a put through");
    format!(
        "{name}: {} puts, {acked} acked, {unknown} indeterminate ({unknown_applied} applied), \
         {refused} refused, slowest {slowest:?}; errors {kinds:?}",
        list.len()
    )
}

/// Reads at each sample's acknowledged revision see its value; just before it, nothing.
pub(crate) async fn check_samples(ctx: &str, c: &Client, samples: &[(String, String, i64)]) {
    for (key, value, rev) in samples {
        let at = c.kv().get(key.clone()).revision(*rev).await.unwrap();
        assert_eq!(
            at.kvs.first().map(|kv| kv.value_str().unwrap().to_owned()),
            Some(value.clone()),
            "{ctx}: {key} read at its acknowledged revision {rev}"
        );
        let before = c.kv().get(key.clone()).revision(rev - 1).await.unwrap();
        assert_eq!(
            before.count, 0,
            "{ctx}: {key} existed before revision {rev}"
        );
    }
}

/// Waits until every watcher saw revision `last` or ended; fails the test at `by`, with
/// `stats` (the clients' watch statistics) in the message.
pub(crate) async fn wait_caught_up(
    ctx: &str,
    watchers: &[Watching],
    last: i64,
    by: Instant,
    stats: impl Fn() -> String,
) {
    loop {
        let lagging: Vec<String> = watchers
            .iter()
            .filter_map(|(name, seen, _)| {
                let s = seen.lock().unwrap();
                (s.last().is_none_or(|r| r < last) && s.end.is_none())
                    .then(|| format!("{name} at {:?}", s.last()))
            })
            .collect();
        if lagging.is_empty() {
            return;
        }
        assert!(
            Instant::now() < by,
            "{ctx}: watchers did not reach revision {last} in time after healing: \
             {lagging:?}; watch stats: {}",
            stats()
        );
        tokio::time::sleep(ms(20)).await;
    }
}

/// What is wrong with what watcher `name` saw, if anything: it ended, or it did not see
/// exactly the revisions `want` in order, or an event differs from the store (`by_rev`:
/// revision -> the key-value put at it).
pub(crate) fn watcher_fault(
    name: &str,
    s: &Seen,
    want: &[i64],
    by_rev: &BTreeMap<i64, &KeyValue>,
) -> Option<String> {
    if let Some(end) = &s.end {
        return Some(format!(
            "watcher {name} ended after {} events (at revision {:?}): {end}",
            s.events.len(),
            s.last()
        ));
    }
    let revs: Vec<i64> = s.events.iter().map(|e| e.0).collect();
    if revs != want {
        // Name the first place it goes wrong.
        let first_bad = revs
            .iter()
            .zip(want)
            .find(|(got, want)| got != want)
            .map(|(got, want)| format!("revision {want} expected, got {got}"))
            .unwrap_or_else(|| format!("{} revisions, {} expected", revs.len(), want.len()));
        return Some(format!(
            "watcher {name} did not see every revision from {:?} to {:?} exactly once in \
             order: {first_bad}",
            want.first(),
            want.last()
        ));
    }
    s.events
        .iter()
        .find(|(rev, kind, key, value)| {
            let kv = by_rev[rev];
            !(*kind == EventKind::Put
                && key == kv.key_str().unwrap()
                && value == kv.value_str().unwrap())
        })
        .map(|(rev, kind, key, value)| {
            format!(
                "watcher {name} saw {kind:?} {key}={value} at {rev}; the store has {:?}",
                by_rev[rev]
            )
        })
}
