//! `meta dump` and `meta load`: a tree moved from redb to PostgreSQL (and back) is the same tree,
//! a dump taken while a writer works is a consistent file system, and bad dumps are refused.

use std::collections::BTreeMap;

use super::Db;
use crate::blocking::BlockingMeta;
use crate::dump::{dump, load};
use crate::*;

/// Everything a client can see, from the root down, plus the engine's own bookkeeping.
fn snapshot(meta: &BlockingMeta) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut dirs = vec![(ROOT_INO, "/".to_string())];
    while let Some((dir, path)) = dirs.pop() {
        for entry in meta.readdir(dir, 0, 100_000).unwrap() {
            let name = String::from_utf8_lossy(&entry.name).into_owned();
            let child = format!("{path}{name}");
            let attr = meta.getattr(entry.attr.ino).unwrap();
            let mut what = format!("{attr:?}");
            match attr.kind {
                FileKind::Dir => dirs.push((attr.ino, format!("{child}/"))),
                FileKind::Symlink => what += &format!(" -> {:?}", meta.readlink(attr.ino).unwrap()),
                FileKind::File => {
                    for chunk in 0..attr.size.div_ceil(shared::CHUNK_SIZE) {
                        what += &format!(" {:?}", meta.read_chunk(attr.ino, chunk).unwrap());
                    }
                }
                _ => {}
            }
            for xattr in meta.listxattr(attr.ino).unwrap() {
                what += &format!(" {xattr:?}={:?}", meta.getxattr(attr.ino, &xattr).unwrap());
            }
            out.insert(child, what);
        }
    }
    out.insert("statfs".into(), format!("{:?}", meta.statfs().unwrap()));
    out.insert(
        "queue".into(),
        format!(
            "{:?}",
            meta.take_due_deleted_slices(None, i64::MAX, 1000).unwrap()
        ),
    );
    let sessions: Vec<SessionId> = meta.list_sessions().unwrap().iter().map(|s| s.id).collect();
    out.insert("sessions".into(), format!("{sessions:?}"));
    out.insert(
        "gateways".into(),
        format!("{:?}", meta.list_gateways().unwrap()),
    );
    out
}

fn populate(meta: &BlockingMeta) -> SessionId {
    let session = meta.open_session("", "dumped").unwrap();
    let node = NewNode {
        kind: FileKind::File,
        mode: 0o640,
        uid: 7,
        gid: 8,
        rdev: 0,
    };
    let sub = meta.mkdir(ROOT_INO, b"sub", 0o750, 1, 2).unwrap();
    meta.symlink(sub.ino, b"link", b"../target", 0, 0).unwrap();
    let gw = [3; 16];
    meta.register_gateway(gw, "10.0.0.1:7070", false).unwrap();
    for i in 0..30u32 {
        let file = meta
            .mknod(sub.ino, format!("f{i}").as_bytes(), &node)
            .unwrap();
        meta.setxattr(file.ino, b"user.i", &i.to_le_bytes(), XattrMode::Upsert)
            .unwrap();
        let id = meta.allocate_slice_ids(session, 1).unwrap().start;
        let slice = Slice {
            slice_id: id,
            offset_in_chunk: i,
            len: 100 + i,
            gateway_id: gw,
        };
        meta.record_pending_slice(session, &slice).unwrap();
        meta.commit_slice(session, file.ino, 0, &slice, 0, &CommitAttrs::at(5))
            .unwrap();
    }
    meta.link(meta.lookup(sub.ino, b"f1").unwrap().ino, ROOT_INO, b"hard")
        .unwrap();
    meta.unlink(sub.ino, b"f2").unwrap();
    session
}

fn dump_to_vec(db: &Db) -> Vec<u8> {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let store = db.store().await.unwrap();
        let mut out = Vec::new();
        dump(store.as_ref(), &mut out).await.unwrap();
        out
    })
}

fn load_from(db: &Db, dump_bytes: &[u8]) -> Result<crate::dump::DumpSummary> {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let store = db.store().await?;
        load(store.as_ref(), dump_bytes).await
    })
}

#[test]
fn a_tree_moves_from_redb_to_postgres_and_back_unchanged() {
    let config = MetaConfig {
        deleted_data_delay: std::time::Duration::from_secs(3600),
        ..MetaConfig::default()
    };
    let source = Db::redb();
    let meta = source.open(config.clone());
    let session = populate(&meta);
    let before = snapshot(&meta);
    let next_slice = meta.allocate_slice_ids(session, 1).unwrap().start;
    drop(meta);

    let dumped = dump_to_vec(&source);
    let pg = Db::postgres();
    let summary = load_from(&pg, &dumped).unwrap();
    assert!(summary.records > 100, "{summary:?}");
    let moved = pg.open(config.clone());
    assert_eq!(snapshot(&moved), before);
    assert!(
        moved
            .allocate_slice_ids(moved.open_session("", "moved").unwrap(), 1)
            .unwrap()
            .start
            > next_slice,
        "ids handed out before the dump are never handed out again"
    );
    let node = NewNode {
        kind: FileKind::File,
        mode: 0o600,
        uid: 0,
        gid: 0,
        rdev: 0,
    };
    let new = moved.mknod(ROOT_INO, b"after-load", &node).unwrap();
    assert!(
        new.ino > 32,
        "inode numbers go on past the dumped ones: {}",
        new.ino
    );
    moved.unlink(ROOT_INO, b"after-load").unwrap();
    let after_pg = snapshot(&moved);
    drop(moved);

    // And back into a new redb file.
    let again = Db::redb();
    load_from(&again, &dump_to_vec(&pg)).unwrap();
    assert_eq!(snapshot(&again.open(config)), after_pg);
}

#[test]
fn a_dump_taken_while_a_writer_works_is_a_whole_file_system() {
    let source = Db::postgres();
    let meta = source.open(MetaConfig::default());
    let dumps = std::thread::scope(|scope| {
        let writer = scope.spawn(|| {
            let node = NewNode {
                kind: FileKind::File,
                mode: 0o644,
                uid: 0,
                gid: 0,
                rdev: 0,
            };
            for i in 0..200 {
                let name = format!("n{i}");
                meta.mknod(ROOT_INO, name.as_bytes(), &node).unwrap();
                if i % 3 == 0 {
                    meta.rename(
                        ROOT_INO,
                        name.as_bytes(),
                        ROOT_INO,
                        b"renamed",
                        RenameMode::Replace,
                    )
                    .unwrap();
                }
            }
        });
        let mut dumps = Vec::new();
        while !writer.is_finished() {
            dumps.push(dump_to_vec(&source));
        }
        dumps
    });
    assert!(!dumps.is_empty());
    for dumped in dumps {
        let target = Db::redb();
        load_from(&target, &dumped).unwrap();
        let loaded = target.open(MetaConfig::default());
        let entries = loaded.readdir(ROOT_INO, 0, 100_000).unwrap();
        // Every entry resolves, and the usage counters agree with the tree.
        for entry in &entries {
            loaded.getattr(entry.attr.ino).unwrap();
        }
        assert_eq!(loaded.statfs().unwrap().files, entries.len() as u64 + 1);
    }
}

#[test]
fn a_cut_or_foreign_dump_and_a_non_empty_target_are_refused() {
    let source = Db::redb();
    let meta = source.open(MetaConfig::default());
    populate(&meta);
    drop(meta);
    let dumped = dump_to_vec(&source);
    let text = String::from_utf8(dumped.clone()).unwrap();

    let cut: String = text.lines().take(20).map(|l| format!("{l}\n")).collect();
    let target = Db::redb();
    let error = load_from(&target, cut.as_bytes()).unwrap_err().to_string();
    assert!(error.contains("cut off"), "{error}");
    // Records without the format record (a load cut off after some batches) are not a file
    // system a gateway serves, nor one it formats over.
    let half = Db::redb();
    half.put_raw(keys::inode(5), b"whatever".to_vec());
    let refused = BlockingMeta::start(|| async {
        let engine: std::sync::Arc<dyn MetaEngine> =
            std::sync::Arc::new(KvMeta::open(half.store().await?, MetaConfig::default()).await?);
        Ok(engine)
    });
    let error = refused
        .err()
        .expect("a half-loaded database must be refused")
        .to_string();
    assert!(error.contains("no format record"), "{error}");

    let error = load_from(&Db::redb(), b"{\"hello\": 1}\n")
        .unwrap_err()
        .to_string();
    assert!(error.contains("not a stagefs metadata dump"), "{error}");

    let full = Db::redb();
    full.open(MetaConfig::default());
    let error = load_from(&full, &dumped).unwrap_err().to_string();
    assert!(error.contains("not empty"), "{error}");
}
