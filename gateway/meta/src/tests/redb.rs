//! The suite on the embedded backend, and what only redb has: a file to copy.

use super::Db;

fn db() -> Db {
    Db::redb()
}

/// Cases of the model test unless `PROPTEST_CASES` says otherwise.
const MODEL_CASES: u32 = 192;

// The same suite files are modules of every backend's test module, on purpose.
#[allow(clippy::duplicate_mod)]
#[path = "conformance.rs"]
mod conformance;
#[allow(clippy::duplicate_mod)]
#[path = "model.rs"]
mod model;

use crate::{FileKind, MetaConfig, NewNode, ROOT_INO};

/// Group commit: an operation that returned is durable even while the database stays open. A copy
/// of the file taken at that moment (what a crash would leave, page cache aside) holds every
/// entry, from every thread.
#[test]
fn concurrent_operations_are_durable_when_they_return() {
    let db = db();
    let meta = db.open(MetaConfig::default());
    let node = NewNode {
        kind: FileKind::File,
        mode: 0o644,
        uid: 1,
        gid: 1,
        rdev: 0,
    };
    std::thread::scope(|scope| {
        for thread in 0..8 {
            let (meta, node) = (&meta, &node);
            scope.spawn(move || {
                for i in 0..40 {
                    meta.mknod(ROOT_INO, format!("t{thread}-{i}").as_bytes(), node)
                        .unwrap();
                }
            });
        }
    });
    let copy_dir = tempfile::tempdir().unwrap();
    std::fs::copy(db.redb_path(), copy_dir.path().join("meta.redb")).unwrap();
    let crashed = Db::Redb(copy_dir).open(MetaConfig::default());
    for thread in 0..8 {
        for i in 0..40 {
            let name = format!("t{thread}-{i}");
            assert!(
                crashed.lookup(ROOT_INO, name.as_bytes()).is_ok(),
                "{name} returned but is not durable"
            );
        }
    }
}

#[test]
fn a_file_of_the_old_layout_is_refused_with_a_message() {
    let db = db();
    {
        let file = redb::Database::create(db.redb_path()).unwrap();
        let txn = file.begin_write().unwrap();
        txn.open_table(redb::TableDefinition::<&str, u64>::new("counters"))
            .unwrap();
        txn.commit().unwrap();
    }
    let error = match crate::redb_kv::RedbKv::open(db.redb_path()) {
        Ok(_) => panic!("an old-layout file must be refused"),
        Err(error) => error.to_string(),
    };
    assert!(error.contains("format 1"), "{error}");
}
