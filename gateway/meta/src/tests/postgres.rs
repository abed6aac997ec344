//! The suite on PostgreSQL, and what only a shared database has: several engines at once.

use super::Db;

fn db() -> Db {
    Db::postgres()
}

/// Cases of the model test unless `PROPTEST_CASES` says otherwise.
const MODEL_CASES: u32 = 48;

// The same suite files are modules of every backend's test module, on purpose.
#[allow(clippy::duplicate_mod)]
#[path = "conformance.rs"]
mod conformance;
#[allow(clippy::duplicate_mod)]
#[path = "model.rs"]
mod model;

/// A commit cancelled at any point (a client that went away) is all or nothing, and its
/// connection never carries half a transaction into the next one on it: each transaction puts
/// one key and deletes another, so "put but not deleted" is a torn commit.
#[test]
fn a_cancelled_commit_never_leaves_half_a_transaction_behind() {
    use crate::kv::Durability;
    use std::time::Duration;

    let db = db();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let store = db.store().await.unwrap();
        let key = |kind: &str, i: u32| format!("test/{kind}/{i:05}").into_bytes();
        let rounds = 300;
        let seed: Vec<_> = (0..rounds)
            .map(|i| (key("d", i), Some(b"x".to_vec())))
            .collect();
        let txn = store.begin(true).await.unwrap();
        txn.commit(seed, Durability::Durable).await.unwrap();
        for i in 0..rounds {
            let txn = store.begin(true).await.unwrap();
            let writes = vec![(key("a", i), Some(b"y".to_vec())), (key("d", i), None)];
            let wait = Duration::from_micros(u64::from(i % 40) * 50);
            let _ = tokio::time::timeout(wait, txn.commit(writes, Durability::Durable)).await;
            // Whatever was left behind on a connection would be committed by this one.
            let other = store.begin(true).await.unwrap();
            other
                .commit(
                    vec![(key("z", i), Some(b"z".to_vec()))],
                    Durability::Durable,
                )
                .await
                .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut check = store.begin(false).await.unwrap();
        for i in 0..rounds {
            let put = check.get(&key("a", i)).await.unwrap().is_some();
            let deleted = check.get(&key("d", i)).await.unwrap().is_none();
            assert_eq!(
                put, deleted,
                "round {i}: the put and the delete of one commit split"
            );
        }
    });
}
