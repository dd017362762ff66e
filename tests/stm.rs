//! Software transactional memory against a real etcd.

mod common;

use common::{client, etcd};
use etcdv3::{ErrorKind, Isolation, stm};

const ACCOUNTS: usize = 5;
const START: i64 = 100;

async fn total(c: &etcdv3::Client) -> i64 {
    let r = c.kv().get("/bank/").prefix().await.unwrap();
    assert_eq!(r.kvs.len(), ACCOUNTS);
    r.kvs
        .iter()
        .map(|kv| kv.value_str().unwrap().parse::<i64>().unwrap())
        .sum()
}

async fn transfers_keep_the_total(isolation: Isolation) {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    for i in 0..ACCOUNTS {
        c.kv()
            .put(format!("/bank/{i}"), START.to_string())
            .await
            .unwrap();
    }
    let mut tasks = Vec::new();
    for t in 0..8usize {
        let c = client(&etcd).await;
        tasks.push(tokio::spawn(async move {
            for n in 0..10usize {
                let from = format!("/bank/{}", (t + n) % ACCOUNTS);
                let to = format!("/bank/{}", (t + n + 1 + t % 3) % ACCOUNTS);
                let amount = ((t * 7 + n) % 13) as i64 + 1;
                stm(&c, move |tx| {
                    let (from, to) = (from.clone(), to.clone());
                    async move {
                        let a: i64 = tx.get_str(from.as_str()).await?.unwrap().parse().unwrap();
                        let b: i64 = tx.get_str(to.as_str()).await?.unwrap().parse().unwrap();
                        tx.put(from.as_str(), (a - amount).to_string());
                        tx.put(to.as_str(), (b + amount).to_string());
                        Ok(())
                    }
                })
                .isolation(isolation)
                .attempts(200)
                .await
                .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(total(&c).await, START * ACCOUNTS as i64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serializable_transfers_keep_the_total() {
    transfers_keep_the_total(Isolation::Serializable).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeatable_read_transfers_keep_the_total() {
    transfers_keep_the_total(Isolation::RepeatableRead).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serializable_snapshot_transfers_keep_the_total() {
    transfers_keep_the_total(Isolation::SerializableSnapshot).await;
}

#[tokio::test]
async fn conflicts_are_retried_then_typed_and_errors_abort() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    c.kv().put("/stm/x", "0").await.unwrap();
    // A closure that makes its own read stale every time: always conflicts.
    let c2 = c.clone();
    let err = stm(&c, move |tx| {
        let c2 = c2.clone();
        async move {
            let v = tx.get_str("/stm/x").await?.unwrap();
            c2.kv().put("/stm/x", format!("{v}+")).await?;
            tx.put("/stm/y", "never");
            Ok(())
        }
    })
    .attempts(3)
    .await
    .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Conflict);
    assert_eq!(
        c.kv().get("/stm/x").await.unwrap().kvs[0]
            .value_str()
            .unwrap(),
        "0+++"
    );
    assert!(c.kv().get("/stm/y").await.unwrap().kvs.is_empty());

    // An error from the closure aborts: nothing written.
    let err = stm(&c, |tx| async move {
        tx.put("/stm/z", "1");
        Err::<(), _>(tx.abort("insufficient funds"))
    })
    .await;
    assert_eq!(err.unwrap_err().kind(), ErrorKind::Canceled);
    assert!(c.kv().get("/stm/z").await.unwrap().kvs.is_empty());

    // Reads see own writes; the value returned is the committed attempt's.
    let got = stm(&c, |tx| async move {
        tx.put("/stm/w", "7");
        tx.delete("/stm/x");
        Ok((tx.get_str("/stm/w").await?, tx.get("/stm/x").await?))
    })
    .await
    .unwrap();
    assert_eq!(got, (Some("7".to_owned()), None));
    assert!(c.kv().get("/stm/x").await.unwrap().kvs.is_empty());
}

#[tokio::test]
async fn mod_revision_is_the_stored_one_also_after_a_write() {
    // As Go's `Rev`: the stored key's mod revision, also once this transaction wrote it,
    // and the read is checked at commit.
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let stored = c.kv().put("/stm/r", "1").await.unwrap().header.revision;
    let (before, after, absent) = stm(&c, |tx| async move {
        tx.put("/stm/r", "2");
        tx.put("/stm/new", "x");
        Ok((
            tx.mod_revision("/stm/r").await?,
            tx.mod_revision("/stm/r").await?,
            tx.mod_revision("/stm/new").await?,
        ))
    })
    .await
    .unwrap();
    assert_eq!((before, after, absent), (stored, stored, 0));
    assert_eq!(
        c.kv().get("/stm/r").await.unwrap().kvs[0]
            .value_str()
            .unwrap(),
        "2"
    );
}

#[tokio::test]
async fn an_attempt_whose_snapshot_was_compacted_meanwhile_is_retried() {
    // Under serializable isolation the reads after the first are at the first one's
    // revision; compacting past it while the closure runs makes such a read fail with
    // Compacted. A fresh attempt reads a new snapshot (before, the transaction failed).
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
    let etcd = etcd().await;
    let c = client(&etcd).await;
    c.kv().put("/stm/a", "1").await.unwrap();
    c.kv().put("/stm/b", "2").await.unwrap();
    let runs = Arc::new(AtomicU32::new(0));
    let (c2, runs2) = (c.clone(), runs.clone());
    let sum = stm(&c, move |tx| {
        let (c2, runs2) = (c2.clone(), runs2.clone());
        async move {
            let a: i64 = tx.get_str("/stm/a").await?.unwrap().parse().unwrap();
            if runs2.fetch_add(1, SeqCst) == 0 {
                c2.kv().put("/stm/z", "x").await?;
                let last = c2.kv().put("/stm/z", "y").await?;
                c2.kv().compact(last.header.revision).await?;
            }
            let b: i64 = tx.get_str("/stm/b").await?.unwrap().parse().unwrap();
            tx.put("/stm/sum", (a + b).to_string());
            Ok(a + b)
        }
    })
    .isolation(Isolation::Serializable)
    .await
    .unwrap();
    assert_eq!(sum, 3);
    assert_eq!(runs.load(SeqCst), 2);
    assert_eq!(
        c.kv().get("/stm/sum").await.unwrap().kvs[0]
            .value_str()
            .unwrap(),
        "3"
    );
}
