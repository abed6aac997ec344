//! The suite on redb inside the metadata region of a device file (opened `O_DIRECT`), and what
//! only a region has: a fixed size, and a device that holds everything.

use super::Db;

fn db() -> Db {
    Db::region()
}

/// Cases of the model test unless `PROPTEST_CASES` says otherwise: fewer than on a redb file, as
/// every case formats a region and every commit is direct I/O.
const MODEL_CASES: u32 = 96;

// The same suite files are modules of every backend's test module, on purpose.
#[allow(clippy::duplicate_mod)]
#[path = "conformance.rs"]
mod conformance;
#[allow(clippy::duplicate_mod)]
#[path = "model.rs"]
mod model;

use crate::{FileKind, MetaConfig, NewNode, ROOT_INO};

fn file() -> NewNode {
    NewNode {
        kind: FileKind::File,
        mode: 0o644,
        uid: 1,
        gid: 1,
        rdev: 0,
    }
}

/// Group commit through the region: an operation that returned is durable while the database
/// stays open. A copy of the device file taken at that moment (what a power loss would leave)
/// holds every entry, from every thread.
#[test]
fn concurrent_operations_are_durable_when_they_return() {
    let db = db();
    let meta = db.open(MetaConfig::default());
    std::thread::scope(|scope| {
        for thread in 0..8 {
            let meta = &meta;
            scope.spawn(move || {
                for i in 0..40 {
                    meta.mknod(ROOT_INO, format!("t{thread}-{i}").as_bytes(), &file())
                        .unwrap();
                }
            });
        }
    });
    let copy = Db::region_of(super::REGION_BYTES);
    std::fs::copy(db.redb_path(), copy.redb_path()).unwrap();
    let crashed = copy.open(MetaConfig::default());
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

/// One durable change at a time, after lazy ones: each is made durable by its own commit (no
/// other writer waits, so no group flush is shared), and that commit covers the lazy changes
/// before it. A copy of the device taken as each returns (what a power loss leaves) holds it and
/// everything before it.
#[test]
fn a_lone_durable_change_is_durable_with_the_lazy_ones_before_it() {
    let db = db();
    let config = MetaConfig {
        lazy_namespace: true,
        ..MetaConfig::default()
    };
    let meta = db.open(config.clone());
    for round in 0..5 {
        for i in 0..10 {
            meta.mknod(ROOT_INO, format!("lazy-{round}-{i}").as_bytes(), &file())
                .unwrap();
        }
        // Durable whatever the namespace setting: a session.
        meta.open_session("", &format!("round {round}")).unwrap();
        let copy = Db::region_of(super::REGION_BYTES);
        std::fs::copy(db.redb_path(), copy.redb_path()).unwrap();
        let crashed = copy.open(config.clone());
        for i in 0..10 {
            let name = format!("lazy-{round}-{i}");
            assert!(
                crashed.lookup(ROOT_INO, name.as_bytes()).is_ok(),
                "{name} came before a durable change that returned, but is not durable"
            );
        }
    }
}

/// Lazy namespace changes (README, SEMANTICS): a copy of the device taken right after they
/// returned (what a power loss leaves) holds a prefix of them and everything before the last
/// sync; after `sync` it holds them all; and an inode number handed out before the crash is never
/// handed out again after it, even when the create that took it was lost.
#[test]
fn lazy_namespace_changes_are_a_prefix_after_a_crash_and_durable_after_sync() {
    let db = db();
    let config = MetaConfig {
        lazy_namespace: true,
        ..MetaConfig::default()
    };
    let meta = db.open(config.clone());
    meta.mknod(ROOT_INO, b"synced", &file()).unwrap();
    meta.sync().unwrap();
    let mut handed_out = Vec::new();
    for i in 0..50 {
        let attr = meta
            .mknod(ROOT_INO, format!("lazy-{i}").as_bytes(), &file())
            .unwrap();
        handed_out.push(attr.ino);
    }
    let crash = Db::region_of(super::REGION_BYTES);
    std::fs::copy(db.redb_path(), crash.redb_path()).unwrap();
    meta.sync().unwrap();
    let synced = Db::region_of(super::REGION_BYTES);
    std::fs::copy(db.redb_path(), synced.redb_path()).unwrap();
    drop(meta);

    let crashed = crash.open(config.clone());
    assert!(crashed.lookup(ROOT_INO, b"synced").is_ok());
    let present: Vec<bool> = (0..50)
        .map(|i| {
            crashed
                .lookup(ROOT_INO, format!("lazy-{i}").as_bytes())
                .is_ok()
        })
        .collect();
    let kept = present.iter().take_while(|p| **p).count();
    assert!(
        present[kept..].iter().all(|p| !p),
        "the changes the crash kept are not a prefix: {present:?}"
    );
    let after = crashed.mknod(ROOT_INO, b"after-crash", &file()).unwrap();
    let highest = handed_out.iter().max().unwrap();
    assert!(
        after.ino > *highest,
        "inode {} was handed out again after the crash (the highest before it: {highest}; the crash kept {kept} of 50 creates)",
        after.ino
    );

    let reopened = synced.open(config);
    for i in 0..50 {
        let name = format!("lazy-{i}");
        assert!(
            reopened.lookup(ROOT_INO, name.as_bytes()).is_ok(),
            "{name} is not durable after sync"
        );
    }
}

/// A region that fills refuses the change with an error that says so and gives the size, never
/// panics, and what was committed before is all there on the next open.
#[test]
fn a_full_region_refuses_changes_and_keeps_what_was_committed() {
    let db = Db::region_of(crate::redb_region::MIN_REGION_BYTES);
    let meta = db.open(MetaConfig::default());
    let long = "x".repeat(200);
    let mut made = 0;
    let error = loop {
        match meta.mknod(ROOT_INO, format!("{long}-{made}").as_bytes(), &file()) {
            Ok(_) => made += 1,
            Err(error) => break error,
        }
        assert!(made < 1_000_000, "a 4 MiB region never filled");
    };
    let text = error.to_string();
    eprintln!("after {made} files: {text}");
    assert_eq!(error.errno(), libc::ENOSPC, "{text}");
    assert!(
        text.contains("metadata region") && text.contains("full"),
        "{text}"
    );
    assert!(
        text.contains(&crate::redb_region::MIN_REGION_BYTES.to_string()),
        "{text}"
    );
    assert!(made > 100, "only {made} files fit: {text}");
    // The engine goes on (it opens the database again after redb stopped it): reads answer, and
    // writes go on failing the same clear way once room runs out again.
    assert!(meta
        .lookup(ROOT_INO, format!("{long}-0").as_bytes())
        .is_ok());
    let again = loop {
        match meta.mknod(ROOT_INO, format!("{long}-{made}").as_bytes(), &file()) {
            Ok(_) => made += 1,
            Err(error) => break error,
        }
        assert!(made < 1_000_000, "the region never filled again");
    };
    assert!(again.to_string().contains("full"), "{again}");
    assert!(meta
        .lookup(ROOT_INO, format!("{long}-1").as_bytes())
        .is_ok());
    drop(meta);
    let again = db.open(MetaConfig::default());
    for i in 0..made {
        assert!(
            again
                .lookup(ROOT_INO, format!("{long}-{i}").as_bytes())
                .is_ok(),
            "file {i} of {made} is gone after the region filled"
        );
    }
}
