//! The conformance suite, run on every backend (`super::db()` names it): each operation's success
//! and errno paths, rename semantics, link counts, paging, data cleanup bookkeeping, sessions and
//! persistence.

use std::collections::BTreeSet;
use std::time::Duration;

use super::db;
use crate::blocking::BlockingMeta;
use crate::tests::Db;
use crate::*;

struct Fixture {
    db: Db,
    meta: BlockingMeta,
    session: SessionId,
}

fn config() -> MetaConfig {
    MetaConfig {
        deleted_data_delay: Duration::ZERO,
        sync_commits: false,
        ..MetaConfig::default()
    }
}

fn fixture_with(config: MetaConfig) -> Fixture {
    let db = db();
    let meta = db.open(config);
    let session = meta.open_session("", "test").unwrap();
    Fixture { db, meta, session }
}

fn fixture() -> Fixture {
    fixture_with(config())
}

fn node(kind: FileKind) -> NewNode {
    NewNode {
        kind,
        mode: 0o644,
        uid: 1000,
        gid: 100,
        rdev: 0,
    }
}

/// The errno of a call that must fail.
fn errno<T: std::fmt::Debug>(result: Result<T>) -> i32 {
    result.expect_err("call must fail").errno()
}

const GW: GatewayId = [7; 16];

impl Fixture {
    fn file(&self, parent: Ino, name: &str) -> Attr {
        self.meta
            .mknod(parent, name.as_bytes(), &node(FileKind::File))
            .unwrap()
    }

    fn mkdir(&self, parent: Ino, name: &str) -> Attr {
        self.meta
            .mkdir(parent, name.as_bytes(), 0o755, 1000, 100)
            .unwrap()
    }

    fn lookup(&self, parent: Ino, name: &str) -> Result<Attr> {
        self.meta.lookup(parent, name.as_bytes())
    }

    fn nlink(&self, ino: Ino) -> u32 {
        self.meta.getattr(ino).unwrap().nlink
    }

    /// Allocates a slice and records it as pending; returns it.
    fn pending(&self, offset: u32, len: u32) -> Slice {
        let id = self.meta.allocate_slice_ids(self.session, 1).unwrap().start;
        let slice = Slice {
            slice_id: id,
            offset_in_chunk: offset,
            len,
            gateway_id: GW,
        };
        self.meta
            .record_pending_slice(self.session, &slice)
            .unwrap();
        slice
    }

    /// Allocates, records and commits a slice; returns it.
    fn write(&self, ino: Ino, chunk_index: u64, offset: u32, len: u32) -> Slice {
        let slice = self.pending(offset, len);
        self.meta
            .commit_slice(
                self.session,
                ino,
                chunk_index,
                &slice,
                0,
                &CommitAttrs::at(42),
            )
            .unwrap();
        slice
    }

    fn queued(&self) -> BTreeSet<u64> {
        self.meta
            .take_due_deleted_slices(None, i64::MAX, usize::MAX)
            .unwrap()
            .iter()
            .map(|d| d.slice_id)
            .collect()
    }

    fn ids(&self, ino: Ino, chunk_index: u64) -> Vec<u64> {
        self.meta
            .read_chunk(ino, chunk_index)
            .unwrap()
            .iter()
            .map(|s| s.slice_id)
            .collect()
    }

    fn names(&self, dir: Ino) -> Vec<String> {
        let mut names: Vec<String> = self
            .meta
            .readdir(dir, 0, usize::MAX)
            .unwrap()
            .into_iter()
            .map(|e| String::from_utf8(e.name).unwrap())
            .collect();
        names.sort();
        names
    }
}

#[test]
fn within_follows_names_up_to_the_root_it_is_asked_about() {
    let f = fixture();
    let team = f.mkdir(ROOT_INO, "team");
    let deep = f.mkdir(f.mkdir(team.ino, "a").ino, "b");
    let inside = f.file(deep.ino, "f");
    let other = f.mkdir(ROOT_INO, "other");
    let outside = f.file(other.ino, "g");
    let within = |ino| f.meta.within(team.ino, ino, "team").unwrap();
    assert!(within(team.ino) && within(deep.ino) && within(inside.ino));
    assert!(!within(ROOT_INO) && !within(other.ino) && !within(outside.ino));
    assert!(f.meta.within(ROOT_INO, outside.ino, "").unwrap());
    assert_eq!(errno(f.meta.within(team.ino, 999, "team")), libc::ENOENT);

    // A second name inside the tree brings the node in; its first name leaving keeps it in.
    f.meta.link(outside.ino, deep.ino, b"g2").unwrap();
    assert!(within(outside.ino));
    f.meta.unlink(other.ino, b"g").unwrap();
    assert!(within(outside.ino));
    // Moved out, it is out; a directory moved out takes its tree with it.
    f.meta
        .rename(deep.ino, b"g2", other.ino, b"g", RenameMode::Replace)
        .unwrap();
    assert!(!within(outside.ino));
    f.meta
        .rename(team.ino, b"a", other.ino, b"a", RenameMode::Replace)
        .unwrap();
    assert!(!within(deep.ino) && !within(inside.ino));

    // Unlinked while open: in for the tenant whose session holds it, for no other.
    let open = f.file(team.ino, "open");
    let session = f.meta.open_session("team", "a mount").unwrap();
    f.meta.open(session, open.ino).unwrap();
    f.meta.unlink(team.ino, b"open").unwrap();
    assert!(within(open.ino));
    assert!(!f.meta.within(team.ino, open.ino, "stranger").unwrap());
    f.meta.release(session, &[open.ino]).unwrap();
    assert_eq!(
        errno(f.meta.within(team.ino, open.ino, "team")),
        libc::ENOENT
    );
}

#[test]
fn a_new_database_has_the_root_directory() {
    let f = fixture();
    let root = f.meta.getattr(ROOT_INO).unwrap();
    assert_eq!(
        (root.kind, root.nlink, root.mode),
        (FileKind::Dir, 2, 0o755)
    );
    assert_eq!(f.lookup(ROOT_INO, ".").unwrap().ino, ROOT_INO);
    assert_eq!(f.lookup(ROOT_INO, "..").unwrap().ino, ROOT_INO);
    assert!(f.meta.readdir(ROOT_INO, 0, 100).unwrap().is_empty());
    assert_eq!(f.meta.statfs().unwrap().files, 1);
    assert_eq!(errno(f.meta.getattr(99)), libc::ENOENT);
}

#[test]
fn bad_names_are_refused_with_linux_errnos() {
    let f = fixture();
    for bad in [&b""[..], b".", b"..", b"a/b", b"a\0b"] {
        assert_eq!(
            errno(f.meta.mkdir(ROOT_INO, bad, 0o755, 0, 0)),
            libc::EINVAL,
            "{bad:?}"
        );
    }
    let long = vec![b'x'; MAX_NAME_LEN + 1];
    assert_eq!(
        errno(f.meta.mknod(ROOT_INO, &long, &node(FileKind::File))),
        libc::ENAMETOOLONG
    );
    assert_eq!(errno(f.meta.lookup(ROOT_INO, &long)), libc::ENAMETOOLONG);
    let longest = vec![b'x'; MAX_NAME_LEN];
    f.meta
        .mknod(ROOT_INO, &longest, &node(FileKind::File))
        .unwrap();
    assert_eq!(
        f.meta.lookup(ROOT_INO, &longest).unwrap().kind,
        FileKind::File
    );
}

#[test]
fn mknod_makes_files_fifos_and_devices() {
    let f = fixture();
    let file = f.file(ROOT_INO, "file");
    assert_eq!(
        (file.kind, file.nlink, file.size, file.uid, file.gid),
        (FileKind::File, 1, 0, 1000, 100)
    );
    let fifo = f
        .meta
        .mknod(
            ROOT_INO,
            b"fifo",
            &NewNode {
                mode: 0o10600,
                ..node(FileKind::Fifo)
            },
        )
        .unwrap();
    assert_eq!(
        (fifo.kind, fifo.mode),
        (FileKind::Fifo, 0o600),
        "type bits are not kept in mode"
    );
    let dev = f
        .meta
        .mknod(
            ROOT_INO,
            b"dev",
            &NewNode {
                rdev: 0x0801,
                ..node(FileKind::BlockDevice)
            },
        )
        .unwrap();
    assert_eq!(f.meta.getattr(dev.ino).unwrap().rdev, 0x0801);
    assert_eq!(f.lookup(ROOT_INO, "fifo").unwrap(), fifo);
    assert!(
        fifo.ino > file.ino && dev.ino > fifo.ino,
        "inode numbers grow"
    );

    assert_eq!(
        errno(f.meta.mknod(ROOT_INO, b"file", &node(FileKind::File))),
        libc::EEXIST
    );
    assert_eq!(
        errno(f.meta.mknod(file.ino, b"x", &node(FileKind::File))),
        libc::ENOTDIR
    );
    assert_eq!(
        errno(f.meta.mknod(999, b"x", &node(FileKind::File))),
        libc::ENOENT
    );
    assert_eq!(
        errno(f.meta.mknod(ROOT_INO, b"d", &node(FileKind::Dir))),
        libc::EINVAL
    );
    assert_eq!(errno(f.lookup(ROOT_INO, "missing")), libc::ENOENT);
    assert_eq!(errno(f.lookup(file.ino, "x")), libc::ENOTDIR);
    assert_eq!(f.meta.statfs().unwrap().files, 4);
}

#[test]
fn create_opens_the_new_file() {
    let f = fixture();
    let attr = f
        .meta
        .create(f.session, ROOT_INO, b"new", &node(FileKind::File))
        .unwrap();
    f.meta.unlink(ROOT_INO, b"new").unwrap();
    assert_eq!(
        f.meta.getattr(attr.ino).unwrap().nlink,
        0,
        "kept alive by the handle"
    );
    f.meta.release(f.session, &[attr.ino]).unwrap();
    assert_eq!(errno(f.meta.getattr(attr.ino)), libc::ENOENT);
    assert_eq!(
        errno(f.meta.create(12345, ROOT_INO, b"x", &node(FileKind::File))),
        libc::EIO
    );
    assert_eq!(
        errno(
            f.meta
                .create(f.session, ROOT_INO, b"x", &node(FileKind::Fifo))
        ),
        libc::EINVAL
    );
}

#[test]
fn directories_count_their_subdirectories_in_nlink() {
    let f = fixture();
    let a = f.mkdir(ROOT_INO, "a");
    assert_eq!((a.kind, a.nlink), (FileKind::Dir, 2));
    assert_eq!(f.nlink(ROOT_INO), 3);
    let b = f.mkdir(a.ino, "b");
    f.file(a.ino, "file");
    assert_eq!(f.nlink(a.ino), 3, "files do not count");
    assert_eq!(f.lookup(b.ino, "..").unwrap().ino, a.ino);

    assert_eq!(errno(f.meta.rmdir(ROOT_INO, b"a")), libc::ENOTEMPTY);
    assert_eq!(errno(f.meta.rmdir(a.ino, b"file")), libc::ENOTDIR);
    assert_eq!(errno(f.meta.unlink(a.ino, b"b")), libc::EISDIR);
    assert_eq!(errno(f.meta.rmdir(a.ino, b"missing")), libc::ENOENT);
    assert_eq!(
        errno(f.meta.mkdir(ROOT_INO, b"a", 0o755, 0, 0)),
        libc::EEXIST
    );

    f.meta.rmdir(a.ino, b"b").unwrap();
    assert_eq!(f.nlink(a.ino), 2);
    assert_eq!(errno(f.meta.getattr(b.ino)), libc::ENOENT);
    f.meta.unlink(a.ino, b"file").unwrap();
    f.meta.rmdir(ROOT_INO, b"a").unwrap();
    assert_eq!(f.nlink(ROOT_INO), 2);
    assert_eq!(f.meta.statfs().unwrap().files, 1);
}

#[test]
fn directory_changes_update_parent_times() {
    let f = fixture();
    let before = f.meta.getattr(ROOT_INO).unwrap();
    std::thread::sleep(Duration::from_millis(2));
    f.file(ROOT_INO, "x");
    let after = f.meta.getattr(ROOT_INO).unwrap();
    assert!(after.mtime_ns > before.mtime_ns && after.ctime_ns > before.ctime_ns);
}

#[test]
fn symlinks_keep_their_target() {
    let f = fixture();
    let link = f
        .meta
        .symlink(ROOT_INO, b"l", b"../some/where", 5, 6)
        .unwrap();
    assert_eq!(
        (link.kind, link.size, link.mode, link.uid),
        (FileKind::Symlink, 13, 0o777, 5)
    );
    assert_eq!(f.meta.readlink(link.ino).unwrap(), b"../some/where");
    let file = f.file(ROOT_INO, "f");
    assert_eq!(errno(f.meta.readlink(file.ino)), libc::EINVAL);
    assert_eq!(
        errno(f.meta.symlink(ROOT_INO, b"e", b"", 0, 0)),
        libc::ENOENT
    );
    let long = vec![b'x'; MAX_SYMLINK_LEN + 1];
    assert_eq!(
        errno(f.meta.symlink(ROOT_INO, b"e", &long, 0, 0)),
        libc::ENAMETOOLONG
    );
    f.meta.unlink(ROOT_INO, b"l").unwrap();
    assert_eq!(errno(f.meta.readlink(link.ino)), libc::ENOENT);
}

#[test]
fn hard_links_count_names() {
    let f = fixture();
    let d = f.mkdir(ROOT_INO, "d");
    let file = f.file(ROOT_INO, "f");
    let linked = f.meta.link(file.ino, d.ino, b"g").unwrap();
    assert_eq!(linked.nlink, 2);
    assert_eq!(f.lookup(d.ino, "g").unwrap().ino, file.ino);
    assert_eq!(f.nlink(d.ino), 2, "a file link is not a subdirectory");

    assert_eq!(errno(f.meta.link(d.ino, ROOT_INO, b"d2")), libc::EPERM);
    assert_eq!(errno(f.meta.link(file.ino, ROOT_INO, b"d")), libc::EEXIST);
    assert_eq!(errno(f.meta.link(file.ino, file.ino, b"x")), libc::ENOTDIR);
    assert_eq!(errno(f.meta.link(999, ROOT_INO, b"x")), libc::ENOENT);

    f.meta.unlink(ROOT_INO, b"f").unwrap();
    assert_eq!(f.nlink(file.ino), 1);
    f.meta.unlink(d.ino, b"g").unwrap();
    assert_eq!(errno(f.meta.getattr(file.ino)), libc::ENOENT);
}

#[test]
fn setattr_changes_what_it_is_given() {
    let f = fixture();
    let file = f.file(ROOT_INO, "f");
    let changed = f
        .meta
        .setattr(
            file.ino,
            &SetAttr {
                mode: Some(0o4755),
                uid: Some(1),
                gid: Some(2),
                atime_ns: Some(-5),
                mtime_ns: Some(7),
                ..SetAttr::default()
            },
        )
        .unwrap();
    assert_eq!((changed.mode, changed.uid, changed.gid), (0o4755, 1, 2));
    assert_eq!((changed.atime_ns, changed.mtime_ns), (-5, 7));
    assert!(changed.ctime_ns >= file.ctime_ns);
    assert_eq!(f.meta.getattr(file.ino).unwrap(), changed);

    let grown = f
        .meta
        .setattr(
            file.ino,
            &SetAttr {
                size: Some(1 << 40),
                ..SetAttr::default()
            },
        )
        .unwrap();
    assert_eq!(grown.size, 1 << 40);
    assert_eq!(f.meta.statfs().unwrap().used_bytes, 1 << 40);

    let size = |s| SetAttr {
        size: Some(s),
        ..SetAttr::default()
    };
    assert_eq!(errno(f.meta.setattr(ROOT_INO, &size(0))), libc::EISDIR);
    let fifo = f.meta.mknod(ROOT_INO, b"p", &node(FileKind::Fifo)).unwrap();
    assert_eq!(errno(f.meta.setattr(fifo.ino, &size(0))), libc::EINVAL);
    assert_eq!(
        errno(f.meta.setattr(file.ino, &size(u64::MAX))),
        libc::EFBIG
    );
    assert_eq!(
        errno(f.meta.setattr(999, &SetAttr::default())),
        libc::ENOENT
    );
}

#[test]
fn rename_moves_within_and_across_directories() {
    let f = fixture();
    let a = f.mkdir(ROOT_INO, "a");
    let b = f.mkdir(ROOT_INO, "b");
    let file = f.file(a.ino, "f");
    f.meta
        .rename(a.ino, b"f", a.ino, b"g", RenameMode::Replace)
        .unwrap();
    assert_eq!(f.names(a.ino), ["g"]);
    f.meta
        .rename(a.ino, b"g", b.ino, b"h", RenameMode::Replace)
        .unwrap();
    assert_eq!(f.lookup(b.ino, "h").unwrap().ino, file.ino);
    assert!(f.names(a.ino).is_empty());

    let sub = f.mkdir(a.ino, "sub");
    f.meta
        .rename(a.ino, b"sub", b.ino, b"sub", RenameMode::Replace)
        .unwrap();
    assert_eq!(
        (f.nlink(a.ino), f.nlink(b.ino), f.nlink(ROOT_INO)),
        (2, 3, 4)
    );
    assert_eq!(
        f.lookup(sub.ino, "..").unwrap().ino,
        b.ino,
        "a moved directory knows its new parent"
    );

    assert_eq!(
        errno(
            f.meta
                .rename(a.ino, b"nope", b.ino, b"x", RenameMode::Replace)
        ),
        libc::ENOENT
    );
    assert_eq!(
        errno(
            f.meta
                .rename(file.ino, b"x", b.ino, b"x", RenameMode::Replace)
        ),
        libc::ENOTDIR
    );
    assert_eq!(
        errno(
            f.meta
                .rename(b.ino, b"h", b.ino, b"..", RenameMode::Replace)
        ),
        libc::EINVAL
    );
    assert_eq!(
        RenameMode::from_flags(libc::RENAME_NOREPLACE | libc::RENAME_EXCHANGE)
            .unwrap_err()
            .errno(),
        libc::EINVAL
    );
    assert_eq!(
        RenameMode::from_flags(libc::RENAME_EXCHANGE).unwrap(),
        RenameMode::Exchange
    );
}

#[test]
fn rename_replaces_a_file_and_cleans_its_data() {
    let f = fixture();
    let src = f.file(ROOT_INO, "src");
    let dst = f.file(ROOT_INO, "dst");
    let slice = f.write(dst.ino, 0, 0, 100);
    f.meta
        .rename(ROOT_INO, b"src", ROOT_INO, b"dst", RenameMode::Replace)
        .unwrap();
    assert_eq!(f.lookup(ROOT_INO, "dst").unwrap().ino, src.ino);
    assert_eq!(errno(f.lookup(ROOT_INO, "src")), libc::ENOENT);
    assert_eq!(errno(f.meta.getattr(dst.ino)), libc::ENOENT);
    assert_eq!(f.queued(), BTreeSet::from([slice.slice_id]));
    assert_eq!(
        f.meta.statfs().unwrap(),
        StatFs {
            files: 2,
            used_bytes: 0,
            capacity_bytes: None,
            max_files: None
        }
    );
}

/// A rename says which inodes it changed besides the directories (a mount forgets what it knew
/// of those alone): the one moved, and the one the new name had, replaced or exchanged.
#[test]
fn rename_says_which_inodes_it_changed() {
    let f = fixture();
    let a = f.file(ROOT_INO, "a");
    let b = f.file(ROOT_INO, "b");
    let dir = f.mkdir(ROOT_INO, "d");
    let names = |r: Renamed| (r.moved, r.other);
    let moved = f
        .meta
        .rename(ROOT_INO, b"a", dir.ino, b"a", RenameMode::NoReplace)
        .unwrap();
    assert_eq!(names(moved), (a.ino, None));
    // Its attributes after the rename: a new ctime, the directories' new mtime and ctime.
    let attr = moved.attr.expect("the moved inode's attributes");
    assert_eq!(attr, f.meta.getattr(a.ino).unwrap());
    assert!(attr.ctime_ns >= a.ctime_ns);
    for parent in [ROOT_INO, dir.ino] {
        let parent = f.meta.getattr(parent).unwrap();
        assert_eq!(
            (parent.mtime_ns, parent.ctime_ns),
            (attr.ctime_ns, attr.ctime_ns)
        );
    }
    let c = f.file(ROOT_INO, "c");
    let exchanged = f
        .meta
        .rename(ROOT_INO, b"b", ROOT_INO, b"c", RenameMode::Exchange)
        .unwrap();
    assert_eq!(names(exchanged), (b.ino, Some(c.ino)));
    let replaced = f
        .meta
        .rename(dir.ino, b"a", ROOT_INO, b"b", RenameMode::Replace)
        .unwrap();
    assert_eq!(names(replaced), (a.ino, Some(c.ino)));
    assert_eq!(replaced.attr.map(|attr| attr.ino), Some(a.ino));
    // Two names of one inode: nothing changed, and none is named.
    f.meta.link(a.ino, ROOT_INO, b"also").unwrap();
    let nothing = f
        .meta
        .rename(ROOT_INO, b"b", ROOT_INO, b"also", RenameMode::Replace)
        .unwrap();
    assert_eq!(nothing, Renamed::default());
}

#[test]
fn rename_over_a_directory_needs_an_empty_directory() {
    let f = fixture();
    let a = f.mkdir(ROOT_INO, "a");
    let empty = f.mkdir(ROOT_INO, "empty");
    let full = f.mkdir(ROOT_INO, "full");
    f.file(full.ino, "x");
    let file = f.file(ROOT_INO, "file");
    assert_eq!(f.nlink(ROOT_INO), 5);

    assert_eq!(
        errno(
            f.meta
                .rename(ROOT_INO, b"a", ROOT_INO, b"full", RenameMode::Replace)
        ),
        libc::ENOTEMPTY
    );
    assert_eq!(
        errno(
            f.meta
                .rename(ROOT_INO, b"file", ROOT_INO, b"empty", RenameMode::Replace)
        ),
        libc::EISDIR
    );
    assert_eq!(
        errno(
            f.meta
                .rename(ROOT_INO, b"a", ROOT_INO, b"file", RenameMode::Replace)
        ),
        libc::ENOTDIR
    );

    f.meta
        .rename(ROOT_INO, b"a", ROOT_INO, b"empty", RenameMode::Replace)
        .unwrap();
    assert_eq!(f.lookup(ROOT_INO, "empty").unwrap().ino, a.ino);
    assert_eq!(errno(f.meta.getattr(empty.ino)), libc::ENOENT);
    assert_eq!(f.nlink(ROOT_INO), 4);
    assert_eq!(f.names(ROOT_INO), ["empty", "file", "full"]);
    assert_eq!(f.meta.getattr(file.ino).unwrap().nlink, 1);

    // Across directories: the source parent loses a subdirectory, the target keeps its count.
    let d = f.mkdir(full.ino, "d");
    let victim = f.mkdir(ROOT_INO, "victim");
    f.meta
        .rename(full.ino, b"d", ROOT_INO, b"victim", RenameMode::Replace)
        .unwrap();
    assert_eq!((f.nlink(full.ino), f.nlink(ROOT_INO)), (2, 5));
    assert_eq!(f.lookup(ROOT_INO, "victim").unwrap().ino, d.ino);
    assert_eq!(errno(f.meta.getattr(victim.ino)), libc::ENOENT);
}

#[test]
fn rename_noreplace_refuses_an_existing_target() {
    let f = fixture();
    f.file(ROOT_INO, "a");
    f.file(ROOT_INO, "b");
    assert_eq!(
        errno(
            f.meta
                .rename(ROOT_INO, b"a", ROOT_INO, b"b", RenameMode::NoReplace)
        ),
        libc::EEXIST
    );
    assert_eq!(
        errno(
            f.meta
                .rename(ROOT_INO, b"a", ROOT_INO, b"a", RenameMode::NoReplace)
        ),
        libc::EEXIST
    );
    f.meta
        .rename(ROOT_INO, b"a", ROOT_INO, b"c", RenameMode::NoReplace)
        .unwrap();
    assert_eq!(f.names(ROOT_INO), ["b", "c"]);
}

#[test]
fn rename_exchange_swaps_two_entries() {
    let f = fixture();
    let a = f.mkdir(ROOT_INO, "a");
    let b = f.mkdir(ROOT_INO, "b");
    let dir = f.mkdir(a.ino, "x");
    let file = f.file(b.ino, "y");
    f.meta
        .rename(a.ino, b"x", b.ino, b"y", RenameMode::Exchange)
        .unwrap();
    assert_eq!(f.lookup(a.ino, "x").unwrap().ino, file.ino);
    assert_eq!(f.lookup(b.ino, "y").unwrap().ino, dir.ino);
    assert_eq!(
        (f.nlink(a.ino), f.nlink(b.ino)),
        (2, 3),
        "the subdirectory moved from a to b"
    );
    assert_eq!(f.lookup(dir.ino, "..").unwrap().ino, b.ino);
    assert_eq!(f.meta.getattr(file.ino).unwrap().nlink, 1);

    assert_eq!(
        errno(
            f.meta
                .rename(a.ino, b"x", b.ino, b"none", RenameMode::Exchange)
        ),
        libc::ENOENT
    );
    // Swapping a directory with an entry inside it would detach a cycle.
    let inner = f.file(dir.ino, "inner");
    assert_eq!(
        errno(
            f.meta
                .rename(b.ino, b"y", dir.ino, b"inner", RenameMode::Exchange)
        ),
        libc::EINVAL
    );
    assert_eq!(
        errno(
            f.meta
                .rename(dir.ino, b"inner", b.ino, b"y", RenameMode::Exchange)
        ),
        libc::EINVAL
    );
    assert_eq!(f.lookup(dir.ino, "inner").unwrap().ino, inner.ino);
}

#[test]
fn rename_of_a_directory_into_its_own_subtree_is_einval() {
    let f = fixture();
    let a = f.mkdir(ROOT_INO, "a");
    let b = f.mkdir(a.ino, "b");
    let c = f.mkdir(b.ino, "c");
    assert_eq!(
        errno(
            f.meta
                .rename(ROOT_INO, b"a", c.ino, b"a", RenameMode::Replace)
        ),
        libc::EINVAL
    );
    assert_eq!(
        errno(
            f.meta
                .rename(ROOT_INO, b"a", a.ino, b"self", RenameMode::Replace)
        ),
        libc::EINVAL
    );
    // The other way round is fine: c moves up.
    f.meta
        .rename(b.ino, b"c", ROOT_INO, b"c", RenameMode::Replace)
        .unwrap();
    assert_eq!((f.nlink(ROOT_INO), f.nlink(b.ino)), (4, 2));
    // Replacing an ancestor of the source: it is not empty.
    assert_eq!(
        errno(
            f.meta
                .rename(a.ino, b"b", ROOT_INO, b"a", RenameMode::Replace)
        ),
        libc::ENOTEMPTY
    );
}

#[test]
fn rename_between_two_names_of_one_inode_does_nothing() {
    let f = fixture();
    let file = f.file(ROOT_INO, "a");
    f.meta.link(file.ino, ROOT_INO, b"b").unwrap();
    f.meta
        .rename(ROOT_INO, b"a", ROOT_INO, b"b", RenameMode::Replace)
        .unwrap();
    assert_eq!(f.names(ROOT_INO), ["a", "b"]);
    assert_eq!(f.nlink(file.ino), 2);
    f.meta
        .rename(ROOT_INO, b"a", ROOT_INO, b"a", RenameMode::Replace)
        .unwrap();
    assert_eq!(f.names(ROOT_INO), ["a", "b"]);
}

#[test]
fn rename_replacing_an_open_file_keeps_it_until_release() {
    let f = fixture();
    f.file(ROOT_INO, "new");
    let old = f.file(ROOT_INO, "old");
    let slice = f.write(old.ino, 0, 0, 10);
    f.meta.open(f.session, old.ino).unwrap();
    f.meta
        .rename(ROOT_INO, b"new", ROOT_INO, b"old", RenameMode::Replace)
        .unwrap();
    assert_eq!(f.meta.getattr(old.ino).unwrap().nlink, 0);
    assert_eq!(f.ids(old.ino, 0), [slice.slice_id]);
    assert!(f.queued().is_empty());
    f.meta.release(f.session, &[old.ino]).unwrap();
    assert_eq!(f.queued(), BTreeSet::from([slice.slice_id]));
}

#[test]
fn readdir_pages_through_10000_entries_completely() {
    let f = fixture();
    let d = f.mkdir(ROOT_INO, "big");
    for i in 0..10_000 {
        f.file(d.ino, &format!("file-{i:05}"));
    }
    let mut seen = BTreeSet::new();
    let mut cookie = 0;
    let mut pages = 0;
    loop {
        let page = f.meta.readdir(d.ino, cookie, 97).unwrap();
        if page.is_empty() {
            break;
        }
        pages += 1;
        for entry in &page {
            assert!(entry.cookie > cookie, "cookies grow");
            cookie = entry.cookie;
            assert_eq!(entry.attr.kind, FileKind::File);
            assert!(
                seen.insert(entry.name.clone()),
                "duplicate {:?}",
                entry.name
            );
        }
        // Changes between pages: entries created later come after the cursor, removed ones
        // vanish, and nothing that stayed is repeated or skipped.
        if pages == 10 {
            f.meta.unlink(d.ino, b"file-09999").unwrap();
            f.file(d.ino, "late");
        }
    }
    assert_eq!(pages, 104);
    assert_eq!(seen.len(), 10_000);
    assert!(seen.contains(&b"late"[..]) && !seen.contains(&b"file-09999"[..]));
}

#[test]
fn readdir_returns_attributes_and_checks_its_argument() {
    let f = fixture();
    let file = f.file(ROOT_INO, "f");
    let dir = f.mkdir(ROOT_INO, "d");
    let entries = f.meta.readdir(ROOT_INO, 0, 10).unwrap();
    assert_eq!(entries.len(), 2);
    assert_eq!(
        (entries[0].name.as_slice(), entries[0].attr),
        (&b"f"[..], file)
    );
    assert_eq!(entries[1].attr.ino, dir.ino);
    assert!(
        entries[0].cookie > 2,
        "cookies 1 and 2 are left for . and .."
    );
    assert_eq!(
        f.meta
            .readdir(ROOT_INO, entries[0].cookie, 10)
            .unwrap()
            .len(),
        1
    );
    assert!(f.meta.readdir(ROOT_INO, u64::MAX, 10).unwrap().is_empty());
    assert_eq!(errno(f.meta.readdir(file.ino, 0, 10)), libc::ENOTDIR);
    assert_eq!(errno(f.meta.readdir(999, 0, 10)), libc::ENOENT);
}

#[test]
fn xattrs_follow_linux_semantics() {
    let f = fixture();
    let file = f.file(ROOT_INO, "f");
    let ino = file.ino;
    f.meta
        .setxattr(ino, b"user.a", b"1", XattrMode::Upsert)
        .unwrap();
    f.meta
        .setxattr(ino, b"user.b", b"", XattrMode::Create)
        .unwrap();
    assert_eq!(f.meta.getxattr(ino, b"user.a").unwrap(), b"1");
    assert_eq!(f.meta.getxattr(ino, b"user.b").unwrap(), b"");
    assert_eq!(
        f.meta.listxattr(ino).unwrap(),
        [b"user.a".to_vec(), b"user.b".to_vec()]
    );
    assert_eq!(
        errno(f.meta.setxattr(ino, b"user.a", b"2", XattrMode::Create)),
        libc::EEXIST
    );
    assert_eq!(
        errno(f.meta.setxattr(ino, b"user.c", b"2", XattrMode::Replace)),
        libc::ENODATA
    );
    f.meta
        .setxattr(ino, b"user.a", b"2", XattrMode::Replace)
        .unwrap();
    assert_eq!(f.meta.getxattr(ino, b"user.a").unwrap(), b"2");
    f.meta.removexattr(ino, b"user.a").unwrap();
    assert_eq!(errno(f.meta.getxattr(ino, b"user.a")), libc::ENODATA);
    assert_eq!(errno(f.meta.removexattr(ino, b"user.a")), libc::ENODATA);
    assert_eq!(errno(f.meta.getxattr(ino, b"")), libc::ERANGE);
    assert_eq!(
        errno(f.meta.setxattr(ino, &[b'x'; 256], b"", XattrMode::Upsert)),
        libc::ERANGE
    );
    let big = vec![0; MAX_XATTR_VALUE_LEN + 1];
    assert_eq!(
        errno(f.meta.setxattr(ino, b"user.big", &big, XattrMode::Upsert)),
        libc::E2BIG
    );
    assert_eq!(errno(f.meta.listxattr(999)), libc::ENOENT);
    assert_eq!(XattrMode::from_flags(3).unwrap_err().errno(), libc::EINVAL);
    // Directories carry xattrs too, and a removed inode's xattrs go with it.
    f.meta
        .setxattr(ROOT_INO, b"user.root", b"r", XattrMode::Upsert)
        .unwrap();
    f.meta.unlink(ROOT_INO, b"f").unwrap();
    assert_eq!(errno(f.meta.getxattr(ino, b"user.b")), libc::ENOENT);
    assert_eq!(f.meta.listxattr(ROOT_INO).unwrap(), [b"user.root".to_vec()]);
}

#[test]
fn committed_slices_read_back_in_commit_order_and_shadowed_ones_are_queued() {
    let f = fixture();
    let file = f.file(ROOT_INO, "f");
    let first = f.write(file.ino, 0, 0, 100);
    let partly = f.write(file.ino, 0, 50, 100);
    assert_eq!(f.meta.read_chunk(file.ino, 0).unwrap(), [first, partly]);
    assert_eq!(f.meta.getattr(file.ino).unwrap().size, 150);
    assert!(f.queued().is_empty(), "a partly shadowed slice stays");

    // Two later slices together cover `first` completely.
    let cover = f.write(file.ino, 0, 0, 60);
    assert_eq!(f.ids(file.ino, 0), [partly.slice_id, cover.slice_id]);
    assert_eq!(f.queued(), BTreeSet::from([first.slice_id]));

    let second_chunk = f.write(file.ino, 1, 10, 5);
    let attr = f.meta.getattr(file.ino).unwrap();
    assert_eq!((attr.size, attr.mtime_ns), (shared::CHUNK_SIZE + 15, 42));
    assert_eq!(f.ids(file.ino, 1), [second_chunk.slice_id]);
    assert!(f.meta.read_chunk(file.ino, 2).unwrap().is_empty());
    assert_eq!(f.meta.statfs().unwrap().used_bytes, shared::CHUNK_SIZE + 15);
}

#[test]
fn commit_grows_the_file_to_the_size_the_writer_reports() {
    let f = fixture();
    let file = f.file(ROOT_INO, "f");
    let slice = f.pending(0, 10);
    let attr = f
        .meta
        .commit_slice(f.session, file.ino, 0, &slice, 5000, &CommitAttrs::at(1))
        .unwrap();
    assert_eq!(attr.size, 5000);
}

/// Mode, owner and atime a mount set while the data was uncommitted land with the commit, in
/// its transaction, as `setattr` would set them; what the commit does not name stays.
#[test]
fn commit_sets_the_attributes_it_carries() {
    let f = fixture();
    let file = f.file(ROOT_INO, "f");
    let slice = f.pending(0, 10);
    let attrs = CommitAttrs {
        mtime_ns: 7,
        mode: Some(0o100_640),
        uid: Some(1234),
        gid: None,
        atime_ns: Some(9),
    };
    let before = f.meta.getattr(file.ino).unwrap();
    let attr = f
        .meta
        .commit_slice(f.session, file.ino, 0, &slice, 10, &attrs)
        .unwrap();
    let seen = (attr.mode, attr.uid, attr.gid, attr.mtime_ns, attr.atime_ns);
    assert_eq!(
        seen,
        (0o640, 1234, before.gid, 7, 9),
        "file type bits dropped"
    );
    assert!(attr.ctime_ns >= before.ctime_ns);
    assert_eq!(f.meta.getattr(file.ino).unwrap(), attr);

    // A retry (the first answer lost) keeps the data as it is but takes attributes set since.
    let retry = CommitAttrs {
        mtime_ns: 8,
        mode: Some(0o600),
        ..CommitAttrs::default()
    };
    let again = f
        .meta
        .commit_slice(f.session, file.ino, 0, &slice, 10, &retry)
        .unwrap();
    assert_eq!((again.mode, again.uid, again.mtime_ns), (0o600, 1234, 7));
    assert_eq!(f.meta.read_chunk(file.ino, 0).unwrap(), vec![slice]);
}

#[test]
fn a_slice_id_is_leased_to_its_session_until_recorded() {
    let f = fixture();
    let ids = f.meta.allocate_slice_ids(f.session, 3).unwrap();
    let other = f.meta.open_session("", "other").unwrap();
    for id in ids.clone() {
        assert!(f.meta.slice_leased(f.session, id).unwrap(), "id {id}");
        assert!(
            !f.meta.slice_leased(other, id).unwrap(),
            "not another session's"
        );
    }
    assert!(!f.meta.slice_leased(f.session, ids.end).unwrap());
    assert!(!f.meta.slice_leased(f.session, u64::MAX).unwrap());
    // Recording the middle one takes it out of the lease; its neighbours stay leased.
    let middle = ids.start + 1;
    let slice = Slice {
        slice_id: middle,
        offset_in_chunk: 0,
        len: 10,
        gateway_id: GW,
    };
    f.meta.record_pending_slice(f.session, &slice).unwrap();
    assert!(!f.meta.slice_leased(f.session, middle).unwrap());
    assert!(f.meta.slice_leased(f.session, ids.start).unwrap());
    assert!(f.meta.slice_leased(f.session, ids.start + 2).unwrap());
}

impl Fixture {
    /// A compacted slice for bytes `offset..offset + len`, recorded as pending.
    fn merged(&self, offset: u32, len: u32) -> Slice {
        let slice = Slice {
            slice_id: self.meta.allocate_slice_ids(self.session, 1).unwrap().start,
            offset_in_chunk: offset,
            len,
            gateway_id: GW,
        };
        self.meta
            .record_pending_slice(self.session, &slice)
            .unwrap();
        slice
    }
}

#[test]
fn compaction_swaps_a_run_and_keeps_what_was_appended_since() {
    let f = fixture();
    let file = f.file(ROOT_INO, "log");
    let a = f.write(file.ino, 0, 0, 100);
    let b = f.write(file.ino, 0, 100, 100);
    let c = f.write(file.ino, 0, 200, 100);
    let read = f.meta.read_chunk(file.ino, 0).unwrap();
    let d = f.write(file.ino, 0, 300, 100);
    let before = f.meta.getattr(file.ino).unwrap();
    let merged = f.merged(100, 200);
    assert!(f
        .meta
        .swap_compacted(f.session, file.ino, 0, &read, 1, &merged)
        .unwrap());
    assert_eq!(
        f.ids(file.ino, 0),
        [a.slice_id, merged.slice_id, d.slice_id]
    );
    assert_eq!(
        f.queued(),
        BTreeSet::from([b.slice_id, c.slice_id]),
        "the replaced slices, and only they, are queued"
    );
    assert_eq!(
        f.meta.getattr(file.ino).unwrap(),
        before,
        "size and times stay"
    );
    assert!(f
        .meta
        .pending_slice(f.session, merged.slice_id)
        .unwrap()
        .is_none());
}

#[test]
fn compaction_of_the_whole_list_hides_and_queues_every_slice_before() {
    let f = fixture();
    let file = f.file(ROOT_INO, "log");
    let old: Vec<u64> = (0..4)
        .map(|i| f.write(file.ino, 0, i * 50, 50).slice_id)
        .collect();
    let read = f.meta.read_chunk(file.ino, 0).unwrap();
    let merged = f.merged(0, 200);
    assert!(f
        .meta
        .swap_compacted(f.session, file.ino, 0, &read, 0, &merged)
        .unwrap());
    assert_eq!(f.ids(file.ino, 0), [merged.slice_id]);
    assert_eq!(f.queued(), old.into_iter().collect::<BTreeSet<_>>());
}

#[test]
fn compaction_is_refused_when_the_chunk_changed_other_than_by_appends() {
    let f = fixture();
    let file = f.file(ROOT_INO, "log");
    f.write(file.ino, 0, 0, 100);
    f.write(file.ino, 0, 100, 100);
    let read = f.meta.read_chunk(file.ino, 0).unwrap();
    // A truncation that removes a slice of the run changes what its bytes must be.
    f.meta
        .setattr(
            file.ino,
            &SetAttr {
                size: Some(50),
                ..SetAttr::default()
            },
        )
        .unwrap();
    let after_truncate = f.meta.read_chunk(file.ino, 0).unwrap();
    let merged = f.merged(0, 200);
    assert!(!f
        .meta
        .swap_compacted(f.session, file.ino, 0, &read, 0, &merged)
        .unwrap());
    assert_eq!(f.meta.read_chunk(file.ino, 0).unwrap(), after_truncate);
    assert!(
        f.queued().contains(&merged.slice_id),
        "the unused merged slice is queued for deletion"
    );
    assert_eq!(
        errno(
            f.meta
                .swap_compacted(f.session, file.ino, 0, &read, 0, &merged)
        ),
        libc::EPERM,
        "its pending record is gone"
    );
}

#[test]
fn compaction_checks_the_merged_slice_and_the_run() {
    let f = fixture();
    let file = f.file(ROOT_INO, "log");
    f.write(file.ino, 0, 0, 100);
    f.write(file.ino, 0, 100, 100);
    let read = f.meta.read_chunk(file.ino, 0).unwrap();
    let merged = f.merged(0, 150);
    assert_eq!(
        errno(
            f.meta
                .swap_compacted(f.session, file.ino, 0, &read, 0, &merged)
        ),
        libc::EINVAL,
        "shorter than the run it replaces"
    );
    assert_eq!(
        errno(
            f.meta
                .swap_compacted(f.session, file.ino, 0, &read, 2, &merged)
        ),
        libc::EINVAL,
        "an empty run"
    );
    let unrecorded = Slice {
        slice_id: f.meta.allocate_slice_ids(f.session, 1).unwrap().start,
        offset_in_chunk: 0,
        len: 200,
        gateway_id: GW,
    };
    assert_eq!(
        errno(
            f.meta
                .swap_compacted(f.session, file.ino, 0, &read, 0, &unrecorded)
        ),
        libc::EPERM,
        "not pending"
    );
    assert_eq!(f.meta.read_chunk(file.ino, 0).unwrap(), read);
}

#[test]
fn commit_needs_a_pending_slice_of_a_live_session_and_can_be_retried() {
    let f = fixture();
    let file = f.file(ROOT_INO, "f");
    let id = f.meta.allocate_slice_ids(f.session, 3).unwrap().start;
    let slice = Slice {
        slice_id: id,
        offset_in_chunk: 0,
        len: 10,
        gateway_id: GW,
    };
    assert_eq!(
        errno(
            f.meta
                .commit_slice(f.session, file.ino, 0, &slice, 0, &CommitAttrs::at(0))
        ),
        libc::EPERM,
        "leased, but not recorded as pending: a client that skipped its blocks finds out"
    );
    assert!(f.meta.slice_leased(f.session, id).unwrap(), "still leased");
    f.meta.record_pending_slice(f.session, &slice).unwrap();
    assert_eq!(
        errno(
            f.meta
                .commit_slice(f.session, ROOT_INO, 0, &slice, 0, &CommitAttrs::at(0))
        ),
        libc::EISDIR
    );
    assert_eq!(
        errno(
            f.meta
                .commit_slice(f.session + 1, file.ino, 0, &slice, 0, &CommitAttrs::at(0))
        ),
        libc::EIO
    );
    f.meta
        .commit_slice(f.session, file.ino, 0, &slice, 0, &CommitAttrs::at(0))
        .unwrap();
    f.meta
        .commit_slice(f.session, file.ino, 0, &slice, 0, &CommitAttrs::at(0))
        .expect("a retried commit succeeds");
    assert_eq!(f.ids(file.ino, 0), [id]);

    let bad = |offset, len| Slice {
        slice_id: id + 1,
        offset_in_chunk: offset,
        len,
        gateway_id: GW,
    };
    assert_eq!(
        errno(
            f.meta
                .commit_slice(f.session, file.ino, 0, &bad(0, 0), 0, &CommitAttrs::at(0))
        ),
        libc::EINVAL
    );
    let past_chunk = bad(shared::CHUNK_SIZE as u32 - 5, 10);
    assert_eq!(
        errno(
            f.meta
                .commit_slice(f.session, file.ino, 0, &past_chunk, 0, &CommitAttrs::at(0))
        ),
        libc::EINVAL
    );
    assert_eq!(
        errno(f.meta.commit_slice(
            f.session,
            file.ino,
            u64::MAX,
            &bad(0, 1),
            0,
            &CommitAttrs::at(0)
        )),
        libc::EFBIG
    );
    let hole = Slice {
        slice_id: 0,
        ..bad(0, 1)
    };
    assert_eq!(
        errno(f.meta.record_pending_slice(f.session, &hole)),
        libc::EINVAL
    );
    let unallocated = Slice {
        slice_id: id + 100,
        ..bad(0, 1)
    };
    assert_eq!(
        errno(f.meta.record_pending_slice(f.session, &unallocated)),
        libc::EPERM
    );
    assert_eq!(
        errno(f.meta.record_pending_slice(f.session + 1, &bad(0, 1))),
        libc::EIO
    );
}

#[test]
fn truncate_drops_slices_past_the_end_and_hides_the_cut_part() {
    let f = fixture();
    let file = f.file(ROOT_INO, "f");
    let head = f.write(file.ino, 0, 0, 100);
    let tail = f.write(file.ino, 0, 200, 100);
    let far = f.write(file.ino, 2, 0, 100);
    let size = |s| SetAttr {
        size: Some(s),
        ..SetAttr::default()
    };

    f.meta.setattr(file.ino, &size(50)).unwrap();
    assert_eq!(f.queued(), BTreeSet::from([tail.slice_id, far.slice_id]));
    let hole = Slice {
        slice_id: 0,
        offset_in_chunk: 50,
        len: 50,
        gateway_id: [0; 16],
    };
    assert_eq!(
        f.meta.read_chunk(file.ino, 0).unwrap(),
        [head, hole],
        "the rest of head is hidden"
    );
    assert!(f.meta.read_chunk(file.ino, 2).unwrap().is_empty());

    // Growing again exposes zeros (the hole), not head's old bytes.
    let attr = f
        .meta
        .setattr(file.ino, &size(3 * shared::CHUNK_SIZE))
        .unwrap();
    assert_eq!(attr.size, 3 * shared::CHUNK_SIZE);
    assert_eq!(f.meta.read_chunk(file.ino, 0).unwrap(), [head, hole]);

    // A cut inside the hidden part only keeps what is still visible.
    f.meta.setattr(file.ino, &size(10)).unwrap();
    let clipped = Slice {
        offset_in_chunk: 10,
        len: 90,
        ..hole
    };
    assert_eq!(
        f.meta.read_chunk(file.ino, 0).unwrap(),
        [head, clipped],
        "one hole, not two"
    );
    f.meta.setattr(file.ino, &size(0)).unwrap();
    assert!(f.meta.read_chunk(file.ino, 0).unwrap().is_empty());
    assert_eq!(
        f.queued(),
        BTreeSet::from([head.slice_id, tail.slice_id, far.slice_id])
    );
    assert_eq!(f.meta.statfs().unwrap().used_bytes, 0);
}

#[test]
fn truncate_at_a_chunk_boundary_keeps_the_whole_chunk_before_it() {
    let f = fixture();
    let file = f.file(ROOT_INO, "f");
    let full = f.write(file.ino, 0, 0, shared::CHUNK_SIZE as u32);
    let next = f.write(file.ino, 1, 0, 10);
    f.meta
        .setattr(
            file.ino,
            &SetAttr {
                size: Some(shared::CHUNK_SIZE),
                ..SetAttr::default()
            },
        )
        .unwrap();
    assert_eq!(f.meta.read_chunk(file.ino, 0).unwrap(), [full]);
    assert_eq!(f.queued(), BTreeSet::from([next.slice_id]));
}

#[test]
fn unlink_of_an_open_file_keeps_it_until_the_last_release() {
    let f = fixture();
    let other = f.meta.open_session("", "other").unwrap();
    let file = f.file(ROOT_INO, "f");
    let slice = f.write(file.ino, 0, 0, 10);
    assert_eq!(f.meta.open(f.session, file.ino).unwrap().size, 10);
    f.meta.open(f.session, file.ino).unwrap();
    f.meta.open(other, file.ino).unwrap();
    f.meta.unlink(ROOT_INO, b"f").unwrap();
    assert_eq!(errno(f.lookup(ROOT_INO, "f")), libc::ENOENT);
    assert_eq!(f.meta.getattr(file.ino).unwrap().nlink, 0);
    assert_eq!(
        errno(f.meta.link(file.ino, ROOT_INO, b"again")),
        libc::ENOENT
    );

    f.meta.release(f.session, &[file.ino]).unwrap();
    f.meta.release(f.session, &[file.ino]).unwrap();
    assert_eq!(
        errno(f.meta.release(f.session, &[file.ino])),
        libc::EBADF,
        "one release too many is refused, and changes nothing"
    );
    assert_eq!(
        f.ids(file.ino, 0),
        [slice.slice_id],
        "still readable through the other handle"
    );
    assert!(f.queued().is_empty());
    // The other client dies: closing its session releases its handle.
    f.meta.close_session(other).unwrap();
    assert_eq!(errno(f.meta.getattr(file.ino)), libc::ENOENT);
    assert_eq!(f.queued(), BTreeSet::from([slice.slice_id]));
    assert_eq!(f.meta.statfs().unwrap().files, 1);
    assert_eq!(errno(f.meta.open(f.session, file.ino)), libc::ENOENT);
}

#[test]
fn one_release_gives_back_a_handle_per_entry_all_or_nothing() {
    let f = fixture();
    let a = f.file(ROOT_INO, "a");
    let b = f.file(ROOT_INO, "b");
    let slice = f.write(a.ino, 0, 0, 10);
    f.meta.open(f.session, a.ino).unwrap();
    f.meta.open(f.session, a.ino).unwrap();
    f.meta.open(f.session, b.ino).unwrap();
    f.meta.unlink(ROOT_INO, b"a").unwrap();
    let other = f.meta.open_session("", "other").unwrap();
    let theirs = f.file(ROOT_INO, "theirs");
    f.meta.open(other, theirs.ino).unwrap();

    match f.meta.release(f.session, &[b.ino, a.ino, a.ino, a.ino]) {
        Err(MetaError::NotOpen { session, ino }) => assert_eq!((session, ino), (f.session, a.ino)),
        answer => panic!("one entry more than held refuses the whole call: {answer:?}"),
    }
    match f.meta.release(f.session, &[a.ino, theirs.ino]) {
        Err(MetaError::NotOpen { ino, .. }) => assert_eq!(ino, theirs.ino),
        answer => panic!("another session's handle is not this one's to give back: {answer:?}"),
    }
    assert_eq!(f.ids(a.ino, 0), [slice.slice_id], "nothing was released");
    assert!(f.queued().is_empty());
    f.meta.release(other, &[theirs.ino]).unwrap();

    f.meta.release(f.session, &[a.ino, b.ino, a.ino]).unwrap();
    assert_eq!(
        errno(f.meta.getattr(a.ino)),
        libc::ENOENT,
        "both handles went in one call: the unlinked file is gone"
    );
    assert_eq!(f.queued(), BTreeSet::from([slice.slice_id]));
    assert_eq!(f.meta.getattr(b.ino).unwrap().nlink, 1);
    assert_eq!(
        errno(f.meta.release(f.session, &[b.ino])),
        libc::EBADF,
        "b's one handle went too"
    );
    f.meta.release(f.session, &[]).unwrap();
}

#[test]
fn deleted_slices_wait_for_their_delay_and_leave_when_acknowledged() {
    let f = fixture_with(MetaConfig {
        deleted_data_delay: Duration::from_secs(100),
        ..config()
    });
    let file = f.file(ROOT_INO, "f");
    let a = f.write(file.ino, 0, 0, 9 << 20);
    let b = f.write(file.ino, 1, 0, 10);
    let before = now_ns();
    f.meta.unlink(ROOT_INO, b"f").unwrap();
    assert!(f
        .meta
        .take_due_deleted_slices(None, now_ns(), 10)
        .unwrap()
        .is_empty());
    let later = before + 101_000_000_000;
    let due = f.meta.take_due_deleted_slices(None, later, 10).unwrap();
    assert_eq!(
        due.iter().map(|d| d.slice_id).collect::<Vec<_>>(),
        [a.slice_id, b.slice_id]
    );
    assert_eq!((due[0].len, due[0].gateway_id), (9 << 20, GW));
    let keys: Vec<String> = due[0].block_keys().iter().map(|k| k.to_string()).collect();
    let id = a.slice_id;
    assert_eq!(
        keys,
        [
            format!("chunks/0/0/{id}_0_4194304"),
            format!("chunks/0/0/{id}_1_4194304"),
            format!("chunks/0/0/{id}_2_1048576")
        ]
    );
    assert_eq!(
        f.meta
            .take_due_deleted_slices(None, later, 1)
            .unwrap()
            .len(),
        1,
        "limit"
    );
    assert_eq!(
        f.meta
            .take_due_deleted_slices(None, later, 10)
            .unwrap()
            .len(),
        2,
        "taking does not remove"
    );
    f.meta.ack_deleted_slices(&[a.slice_id, 12345]).unwrap();
    let left: Vec<u64> = f
        .meta
        .take_due_deleted_slices(None, later, 10)
        .unwrap()
        .iter()
        .map(|d| d.slice_id)
        .collect();
    assert_eq!(left, [b.slice_id]);
}

#[test]
fn sessions_heartbeat_expire_and_clean_up_uncommitted_slices() {
    let f = fixture();
    let dying = f.meta.open_session("team-b", "host-b:/mnt").unwrap();
    assert_ne!(dying, f.session);
    let ids = f.meta.allocate_slice_ids(dying, 2).unwrap();
    let staged = Slice {
        slice_id: ids.start,
        offset_in_chunk: 0,
        len: 5,
        gateway_id: GW,
    };
    f.meta.record_pending_slice(dying, &staged).unwrap();
    f.meta
        .record_pending_slice(dying, &Slice { len: 3, ..staged })
        .unwrap();
    let cutoff = now_ns();
    std::thread::sleep(Duration::from_millis(2));
    f.meta.heartbeat(f.session, &Default::default()).unwrap();
    assert_eq!(
        f.meta.expired_sessions(cutoff + 1_000_000).unwrap(),
        [dying]
    );
    assert!(f.meta.expired_sessions(0).unwrap().is_empty());
    let sessions = f.meta.list_sessions().unwrap();
    assert_eq!(sessions.len(), 2);
    let described = sessions.iter().find(|s| s.id == dying).unwrap();
    assert_eq!(
        (described.tenant.as_str(), described.description.as_str()),
        ("team-b", "host-b:/mnt")
    );
    assert_eq!(f.meta.session(dying).unwrap(), *described);

    f.meta.close_session(dying).unwrap();
    let due = f.meta.take_due_deleted_slices(None, i64::MAX, 10).unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!(
        (due[0].slice_id, due[0].len),
        (staged.slice_id, 5),
        "the longest recorded length"
    );
    assert_eq!(
        errno(f.meta.heartbeat(dying, &Default::default())),
        libc::EIO
    );
    assert_eq!(errno(f.meta.open(dying, ROOT_INO)), libc::EIO);
    assert_eq!(
        errno(f.meta.close_session(dying)),
        libc::EIO,
        "a closed session is gone"
    );
    assert_eq!(f.meta.list_sessions().unwrap().len(), 1);
}

#[test]
fn a_heartbeat_records_the_gateways_a_mount_uses_until_the_session_closes() {
    let f = fixture();
    let view = MountView {
        using: vec![[1; 16], [2; 16]],
        avoiding: vec![[3; 16]],
    };
    f.meta.heartbeat(f.session, &view).unwrap();
    assert_eq!(f.meta.session(f.session).unwrap().view, view);
    assert_eq!(f.meta.list_sessions().unwrap()[0].view, view);
    // A new view replaces the old one; an empty one clears it.
    let healed = MountView {
        using: vec![[1; 16], [2; 16], [3; 16]],
        avoiding: Vec::new(),
    };
    f.meta.heartbeat(f.session, &healed).unwrap();
    assert_eq!(f.meta.session(f.session).unwrap().view, healed);
    f.meta.heartbeat(f.session, &MountView::default()).unwrap();
    assert_eq!(
        f.meta.session(f.session).unwrap().view,
        MountView::default()
    );

    // A client cannot make the metadata hold an unbounded view.
    let huge = MountView {
        using: vec![[9; 16]; MAX_VIEW_GATEWAYS + 1],
        avoiding: Vec::new(),
    };
    assert_eq!(errno(f.meta.heartbeat(f.session, &huge)), libc::EINVAL);

    // Closing the session takes its view with it: a new session starts with none.
    f.meta.heartbeat(f.session, &view).unwrap();
    f.meta.close_session(f.session).unwrap();
    let next = f.meta.open_session("", "next").unwrap();
    let sessions = f.meta.list_sessions().unwrap();
    assert_eq!(sessions.len(), 1);
    assert_eq!(
        (sessions[0].id, &sessions[0].view),
        (next, &MountView::default())
    );
    let Fixture { db, meta, .. } = f;
    drop(meta);
    assert!(
        db.keys_with_prefix(keys::MOUNT_VIEW_PREFIX).is_empty(),
        "a closed session's view is left behind"
    );
}

#[test]
fn referenced_slices_are_those_of_chunks_pending_records_and_the_delete_queue() {
    let f = fixture_with(MetaConfig {
        deleted_data_delay: Duration::from_secs(3600),
        ..config()
    });
    let file = f.file(ROOT_INO, "f");
    let kept = f.write(file.ino, 0, 0, 10);
    let in_second_chunk = f.write(file.ino, 1, 0, 10);
    let shadowed = f.write(file.ino, 2, 0, 10);
    let over = f.write(file.ino, 2, 0, 10);
    let pending = f.meta.allocate_slice_ids(f.session, 1).unwrap().start;
    f.meta
        .record_pending_slice(
            f.session,
            &Slice {
                slice_id: pending,
                offset_in_chunk: 0,
                len: 4,
                gateway_id: GW,
            },
        )
        .unwrap();
    let leased_only = f.meta.allocate_slice_ids(f.session, 1).unwrap().start;
    let gone = f.file(ROOT_INO, "gone");
    let deleted = f.write(gone.ino, 0, 0, 10);
    f.meta.unlink(ROOT_INO, b"gone").unwrap();

    let ids = f.meta.referenced_slice_ids().unwrap();
    for (what, id) in [
        ("committed", kept.slice_id),
        ("committed in another chunk", in_second_chunk.slice_id),
        ("shadowing", over.slice_id),
        ("pending", pending),
        ("queued for deletion", deleted.slice_id),
    ] {
        assert!(ids.contains(&id), "{what} slice {id} missing from {ids:?}");
    }
    // A fully shadowed slice is dropped from its chunk and queued: still named until deleted.
    assert!(ids.contains(&shadowed.slice_id), "{ids:?}");
    assert!(
        !ids.contains(&leased_only),
        "an id never recorded names no data: {ids:?}"
    );
    assert!(!ids.contains(&0), "holes are not slices");

    // Once the queue is acknowledged, the deleted slice is named by nothing.
    let due: Vec<u64> = f
        .meta
        .take_due_deleted_slices(None, i64::MAX, usize::MAX)
        .unwrap()
        .iter()
        .map(|d| d.slice_id)
        .collect();
    f.meta.ack_deleted_slices(&due).unwrap();
    let ids = f.meta.referenced_slice_ids().unwrap();
    assert!(!ids.contains(&deleted.slice_id), "{ids:?}");
    assert!(ids.contains(&kept.slice_id), "{ids:?}");
}

#[test]
fn what_is_made_in_a_directory_takes_its_write_policy() {
    let f = fixture();
    let plain = f.meta.mkdir(ROOT_INO, b"plain", 0o755, 0, 0).unwrap();
    let ckpt = f.meta.mkdir(ROOT_INO, b"ckpt", 0o755, 0, 0).unwrap();
    f.meta
        .setxattr(ckpt.ino, WRITE_POLICY_XATTR, b"through", XattrMode::Upsert)
        .unwrap();
    let policy = |ino| f.meta.getxattr(ino, WRITE_POLICY_XATTR);
    let file = f.file(ckpt.ino, "f");
    let created = f
        .meta
        .create(f.session, ckpt.ino, b"c", &node(FileKind::File))
        .unwrap();
    let sub = f.meta.mkdir(ckpt.ino, b"sub", 0o755, 0, 0).unwrap();
    let deeper = f.file(sub.ino, "g");
    for (what, ino) in [
        ("mknod", file.ino),
        ("create", created.ino),
        ("mkdir", sub.ino),
        ("a file in the new directory", deeper.ino),
    ] {
        assert_eq!(policy(ino).unwrap(), b"through", "{what}");
        assert!(
            f.meta
                .listxattr(ino)
                .unwrap()
                .contains(&WRITE_POLICY_XATTR.to_vec()),
            "{what}: listed"
        );
    }
    let link = f.meta.symlink(ckpt.ino, b"l", b"f", 0, 0).unwrap();
    assert_eq!(errno(policy(link.ino)), libc::ENODATA, "symlinks take none");
    let elsewhere = f.file(plain.ino, "h");
    assert_eq!(errno(policy(elsewhere.ino)), libc::ENODATA);
    // A policy set later applies to what is made after, not to what exists.
    f.meta
        .setxattr(plain.ino, WRITE_POLICY_XATTR, b"gateway", XattrMode::Upsert)
        .unwrap();
    assert_eq!(errno(policy(elsewhere.ino)), libc::ENODATA);
    assert_eq!(policy(f.file(plain.ino, "later").ino).unwrap(), b"gateway");
}

#[test]
fn a_write_slice_commit_takes_the_lease_of_its_id() {
    let f = fixture();
    let file = f.file(ROOT_INO, "f");
    let ids = f.meta.allocate_slice_ids(f.session, 3).unwrap();
    let slice = |slice_id| Slice {
        slice_id,
        offset_in_chunk: 0,
        len: 10,
        gateway_id: GW,
    };
    // The middle id of the lease, so that the lease is split around it.
    let middle = slice(ids.start + 1);
    f.meta
        .check_slice_write(f.session, file.ino, &middle)
        .unwrap();
    assert_eq!(
        f.meta.pending_slice(f.session, middle.slice_id).unwrap(),
        None,
        "the check records nothing"
    );
    let attr = f
        .meta
        .commit_written_slice(f.session, file.ino, 0, &middle, 0, &CommitAttrs::at(0))
        .expect("a leased id commits without a pending record");
    assert!(!f.meta.slice_leased(f.session, middle.slice_id).unwrap());
    assert_eq!(attr.size, 10);
    assert_eq!(f.ids(file.ino, 0), [middle.slice_id]);
    // A retry whose first answer was lost: not the session's to stage again, and its commit
    // answers as the first did without committing the id twice.
    assert_eq!(
        errno(f.meta.check_slice_write(f.session, file.ino, &middle)),
        libc::EPERM
    );
    assert_eq!(
        errno(f.meta.record_pending_slice(f.session, &middle)),
        libc::EPERM,
        "a committed id cannot be recorded pending (and so queued with the session)"
    );
    f.meta
        .commit_written_slice(f.session, file.ino, 0, &middle, 0, &CommitAttrs::at(0))
        .unwrap();
    assert_eq!(f.ids(file.ino, 0), [middle.slice_id]);
    // Another file cannot take the id either: it is not leased any more.
    let other = f.file(ROOT_INO, "g");
    assert_eq!(
        errno(f.meta.commit_written_slice(
            f.session,
            other.ino,
            0,
            &middle,
            0,
            &CommitAttrs::at(0)
        )),
        libc::EPERM
    );
    // The ids on either side are still leased, once each.
    for id in [ids.start, ids.start + 2] {
        assert!(f.meta.slice_leased(f.session, id).unwrap(), "id {id}");
        f.meta
            .check_slice_write(f.session, other.ino, &slice(id))
            .unwrap();
        f.meta
            .commit_written_slice(f.session, other.ino, 0, &slice(id), 0, &CommitAttrs::at(0))
            .unwrap();
        assert!(!f.meta.slice_leased(f.session, id).unwrap(), "id {id}");
    }
    assert_eq!(
        f.ids(other.ino, 0),
        [ids.start + 2],
        "the later shadows the first"
    );
    // A session that ended has nothing to write.
    let ended = f.meta.open_session("", "ended").unwrap();
    let id = f.meta.allocate_slice_ids(ended, 1).unwrap().start;
    f.meta.close_session(ended).unwrap();
    assert!(f
        .meta
        .check_slice_write(ended, file.ino, &slice(id))
        .is_err());
}

#[test]
fn a_slice_id_belongs_to_the_session_it_was_handed_to() {
    let f = fixture();
    let victim = f.file(ROOT_INO, "victim");
    let committed = f.write(victim.ino, 0, 0, 10);
    let unused = f.meta.allocate_slice_ids(f.session, 1).unwrap().start;
    let thief = f.meta.open_session("", "thief").unwrap();
    let own = f.file(ROOT_INO, "thief's");
    let as_thief = |slice_id| Slice {
        slice_id,
        offset_in_chunk: 0,
        len: 10,
        gateway_id: GW,
    };

    for slice_id in [committed.slice_id, unused, unused + 1_000] {
        assert_eq!(
            errno(f.meta.record_pending_slice(thief, &as_thief(slice_id))),
            libc::EPERM,
            "slice {slice_id} is not the thief's to stage"
        );
        assert_eq!(
            errno(
                f.meta
                    .record_pending_slice_lazily(thief, own.ino, &as_thief(slice_id))
            ),
            libc::EPERM
        );
        assert_eq!(
            errno(
                f.meta
                    .check_slice_write(thief, own.ino, &as_thief(slice_id))
            ),
            libc::EPERM,
            "slice {slice_id} is not the thief's to write"
        );
        assert_eq!(
            errno(f.meta.commit_written_slice(
                thief,
                own.ino,
                0,
                &as_thief(slice_id),
                0,
                &CommitAttrs::at(0)
            )),
            libc::EPERM,
            "nor to commit as written"
        );
        assert_eq!(
            errno(f.meta.commit_slice(
                thief,
                own.ino,
                0,
                &as_thief(slice_id),
                0,
                &CommitAttrs::at(0)
            )),
            libc::EPERM
        );
    }
    assert_eq!(
        errno(f.meta.record_pending_slice(f.session, &committed)),
        libc::EPERM,
        "a committed id cannot be staged again, not even by its owner"
    );
    // Blocks may be staged only by the session that recorded the slice pending.
    assert_eq!(
        f.meta.pending_slice(thief, committed.slice_id).unwrap(),
        None
    );
    assert_eq!(
        f.meta.pending_slice(f.session, committed.slice_id).unwrap(),
        None,
        "committed"
    );
    f.meta.close_session(thief).unwrap();
    assert!(f.queued().is_empty(), "nothing of the owner's was queued");
    assert_eq!(f.ids(victim.ino, 0), [committed.slice_id]);

    // The owner's unused id still works, once.
    let later = Slice {
        slice_id: unused,
        ..as_thief(0)
    };
    f.meta.record_pending_slice(f.session, &later).unwrap();
    f.meta
        .record_pending_slice(f.session, &Slice { len: 20, ..later })
        .expect("growing one's own pending record");
    assert_eq!(
        f.meta.pending_slice(f.session, unused).unwrap(),
        Some((20, later.gateway_id))
    );
    let other = f.meta.open_session("", "other").unwrap();
    assert_eq!(f.meta.pending_slice(other, unused).unwrap(), None);
    f.meta
        .commit_slice(f.session, victim.ino, 0, &later, 0, &CommitAttrs::at(0))
        .unwrap();
    assert_eq!(
        f.ids(victim.ino, 0),
        [unused],
        "the later slice shadows the first"
    );
}

#[test]
fn leases_split_as_their_ids_are_staged_out_of_order() {
    let f = fixture();
    let ids = f.meta.allocate_slice_ids(f.session, 5).unwrap();
    let slice = |slice_id| Slice {
        slice_id,
        offset_in_chunk: 0,
        len: 1,
        gateway_id: GW,
    };
    for id in [
        ids.start + 2,
        ids.start,
        ids.end - 1,
        ids.start + 1,
        ids.start + 3,
    ] {
        f.meta.record_pending_slice(f.session, &slice(id)).unwrap();
    }
    assert_eq!(
        errno(f.meta.record_pending_slice(f.session, &slice(ids.end))),
        libc::EPERM,
        "past the lease"
    );
    assert_eq!(errno(f.meta.allocate_slice_ids(f.session, 0)), libc::EINVAL);
    assert_eq!(
        errno(f.meta.allocate_slice_ids(f.session, u64::MAX)),
        libc::EINVAL
    );
    f.meta.close_session(f.session).unwrap();
    let mut queued: Vec<u64> = f.queued().into_iter().collect();
    queued.sort();
    assert_eq!(
        queued,
        ids.collect::<Vec<_>>(),
        "each staged id queued once"
    );
}

#[test]
fn sessions_are_unguessable_and_refuse_strangers() {
    let f = fixture();
    let other = f.meta.open_session("team", "other").unwrap();
    f.meta.heartbeat(other, &Default::default()).unwrap();
    assert_eq!(
        f.meta.session(other).unwrap().tenant,
        "team",
        "kept by heartbeats"
    );
    assert_eq!(errno(f.meta.session(other ^ 1)), libc::EIO);
    assert!(
        f.session.abs_diff(other) > u64::MAX as u128,
        "ids {:x} and {:x} are not sequential",
        f.session,
        other
    );
    let file = f.file(ROOT_INO, "f");
    f.meta.open(f.session, file.ino).unwrap();
    f.meta.unlink(ROOT_INO, b"f").unwrap();

    let stranger: SessionId = f.session ^ 1;
    assert_eq!(errno(f.meta.release(stranger, &[file.ino])), libc::EIO);
    assert_eq!(errno(f.meta.close_session(stranger)), libc::EIO);
    assert_eq!(
        errno(f.meta.heartbeat(stranger, &Default::default())),
        libc::EIO
    );
    assert_eq!(errno(f.meta.allocate_slice_ids(stranger, 1)), libc::EIO);
    assert_eq!(
        errno(f.meta.release(other, &[file.ino])),
        libc::EBADF,
        "another session holds no handle on it"
    );
    assert_eq!(f.meta.getattr(file.ino).unwrap().nlink, 0, "still there");
    f.meta.release(f.session, &[file.ino]).unwrap();
    assert_eq!(errno(f.meta.getattr(file.ino)), libc::ENOENT);

    assert_eq!(
        errno(
            f.meta
                .open_session("", &"x".repeat(MAX_SESSION_DESCRIPTION + 1))
        ),
        libc::EINVAL
    );
}

#[test]
fn data_is_checked_before_anything_is_staged() {
    let f = fixture();
    let ids = f.meta.allocate_slice_ids(f.session, 2).unwrap();
    let past_chunk = Slice {
        slice_id: ids.start,
        offset_in_chunk: shared::CHUNK_SIZE as u32 - 5,
        len: 10,
        gateway_id: GW,
    };
    assert_eq!(
        errno(f.meta.record_pending_slice(f.session, &past_chunk)),
        libc::EINVAL
    );
    let fits = Slice {
        offset_in_chunk: 0,
        ..past_chunk
    };
    assert_eq!(
        errno(
            f.meta
                .record_pending_slice_lazily(f.session, ROOT_INO, &fits)
        ),
        libc::EISDIR
    );
    assert_eq!(
        errno(f.meta.record_pending_slice_lazily(f.session, 999, &fits)),
        libc::ENOENT
    );
    assert_eq!(
        errno(f.meta.check_slice_write(f.session, ROOT_INO, &fits)),
        libc::EISDIR
    );
    assert_eq!(
        errno(f.meta.check_slice_write(f.session, 999, &fits)),
        libc::ENOENT
    );
    assert_eq!(
        errno(f.meta.check_slice_write(f.session, 999, &past_chunk)),
        libc::EINVAL
    );
    f.meta.close_session(f.session).unwrap();
    assert!(f.queued().is_empty(), "nothing was recorded");

    let file = f.file(ROOT_INO, "f");
    assert_eq!(
        errno(
            f.meta
                .setxattr(file.ino, b"user.a\0b", b"v", XattrMode::Upsert)
        ),
        libc::EINVAL
    );
}

fn du(files: u64, dirs: u64, bytes: u64) -> DirUsage {
    DirUsage { files, dirs, bytes }
}

impl Fixture {
    fn resize(&self, ino: Ino, size: u64) {
        self.meta
            .setattr(
                ino,
                &SetAttr {
                    size: Some(size),
                    ..SetAttr::default()
                },
            )
            .unwrap();
    }
}

#[test]
fn du_counts_files_directories_and_bytes_below_a_directory() {
    let f = fixture();
    let a = f.mkdir(ROOT_INO, "a");
    let b = f.mkdir(a.ino, "b");
    let f1 = f.file(a.ino, "f1");
    f.resize(f1.ino, 100);
    let f2 = f.file(b.ino, "f2");
    f.write(f2.ino, 0, 0, 50);
    f.meta.symlink(b.ino, b"s", b"f2", 0, 0).unwrap();
    assert_eq!(f.meta.dir_usage(ROOT_INO).unwrap(), du(3, 2, 150));
    assert_eq!(f.meta.dir_usage(a.ino).unwrap(), du(3, 1, 150));
    assert_eq!(f.meta.dir_usage(b.ino).unwrap(), du(2, 0, 50));
    assert_eq!(
        f.meta.dir_usage(f1.ino).unwrap(),
        du(1, 0, 100),
        "a file: itself"
    );

    f.meta
        .rename(b.ino, b"f2", ROOT_INO, b"f2", RenameMode::Replace)
        .unwrap();
    assert_eq!(f.meta.dir_usage(a.ino).unwrap(), du(2, 1, 100));
    assert_eq!(f.meta.dir_usage(ROOT_INO).unwrap(), du(3, 2, 150));
    f.write(f2.ino, 1, 0, 10);
    assert_eq!(
        f.meta.dir_usage(ROOT_INO).unwrap(),
        du(3, 2, 100 + shared::CHUNK_SIZE + 10),
        "a commit that grows a file counts"
    );
    f.resize(f2.ino, 50);
    f.meta.unlink(a.ino, b"f1").unwrap();
    f.meta
        .rename(a.ino, b"b", ROOT_INO, b"b", RenameMode::Replace)
        .unwrap();
    assert_eq!(f.meta.dir_usage(a.ino).unwrap(), du(0, 0, 0));
    assert_eq!(f.meta.dir_usage(ROOT_INO).unwrap(), du(2, 2, 50));
    f.meta.unlink(b.ino, b"s").unwrap();
    f.meta.rmdir(ROOT_INO, b"b").unwrap();
    assert_eq!(f.meta.dir_usage(ROOT_INO).unwrap(), du(1, 1, 50));
}

#[test]
fn du_counts_a_hard_linked_file_once() {
    let f = fixture();
    let a = f.mkdir(ROOT_INO, "a");
    let b = f.mkdir(ROOT_INO, "b");
    let file = f.file(a.ino, "f");
    f.resize(file.ino, 10);
    f.meta.link(file.ino, b.ino, b"g").unwrap();
    assert_eq!(f.meta.dir_usage(ROOT_INO).unwrap(), du(1, 2, 10));
    assert_eq!(
        f.meta.dir_usage(a.ino).unwrap(),
        du(1, 0, 10),
        "counted in its first home"
    );
    assert_eq!(f.meta.dir_usage(b.ino).unwrap(), du(0, 0, 0));
    f.meta.unlink(b.ino, b"g").unwrap();
    assert_eq!(f.meta.dir_usage(ROOT_INO).unwrap(), du(1, 2, 10));
    f.meta.link(file.ino, b.ino, b"g").unwrap();
    f.meta.link(file.ino, ROOT_INO, b"h").unwrap();
    f.meta.unlink(a.ino, b"f").unwrap();
    assert_eq!(f.meta.dir_usage(ROOT_INO).unwrap(), du(1, 2, 10));
    assert_eq!(
        f.meta.dir_usage(ROOT_INO).unwrap(),
        du(1, 2, 10),
        "the directory counting it lost the name: the first that holds one counts it"
    );
    assert_eq!(
        f.meta.dir_usage(b.ino).unwrap(),
        du(0, 0, 0),
        "the root is first"
    );
    f.meta.unlink(ROOT_INO, b"h").unwrap();
    assert_eq!(
        f.meta.dir_usage(b.ino).unwrap(),
        du(1, 0, 10),
        "its last name"
    );
    f.meta
        .rename(b.ino, b"g", a.ino, b"g", RenameMode::Replace)
        .unwrap();
    assert_eq!(
        f.meta.dir_usage(a.ino).unwrap(),
        du(1, 0, 10),
        "moved with it"
    );
    f.meta.unlink(a.ino, b"g").unwrap();
    assert_eq!(f.meta.dir_usage(ROOT_INO).unwrap(), du(0, 2, 0));
}

#[test]
fn usage_is_totalled_per_tenant_that_created_the_files() {
    let f = fixture();
    let a = f.meta.open_session("team-a", "a").unwrap();
    let b = f.meta.open_session("team-b", "b").unwrap();
    let fa = f
        .meta
        .create(a, ROOT_INO, b"fa", &node(FileKind::File))
        .unwrap();
    let fb = f
        .meta
        .create(b, ROOT_INO, b"fb", &node(FileKind::File))
        .unwrap();
    f.resize(fa.ino, 1000);
    f.resize(fb.ino, 10);
    f.mkdir(ROOT_INO, "d");
    let usage = |tenant: &str, files: u64, bytes: u64| TenantUsage {
        tenant: tenant.into(),
        files,
        bytes,
    };
    assert_eq!(
        f.meta.tenant_usage().unwrap(),
        [
            usage("", 2, 0),
            usage("team-a", 1, 1000),
            usage("team-b", 1, 10)
        ],
        "the root and the directory belong to no tenant"
    );
    // Whoever writes, the bytes are the owner's.
    let slice = f.write(fa.ino, 0, 0, 2000);
    assert_eq!(f.meta.tenant_usage().unwrap()[1], usage("team-a", 1, 2000));
    let _ = slice;
    f.meta.unlink(ROOT_INO, b"fa").unwrap();
    assert_eq!(
        f.meta.tenant_usage().unwrap()[1],
        usage("team-a", 1, 2000),
        "open: still there"
    );
    f.meta.release(a, &[fa.ino]).unwrap();
    assert_eq!(
        f.meta.tenant_usage().unwrap(),
        [usage("", 2, 0), usage("team-b", 1, 10)]
    );
}

#[test]
fn format_3_gains_directory_statistics_on_upgrade() {
    let f = fixture();
    let a = f.mkdir(ROOT_INO, "a");
    let b = f.mkdir(a.ino, "b");
    let file = f.file(b.ino, "f");
    f.resize(file.ino, 42);
    f.file(ROOT_INO, "g");
    // A hard-linked file, counted once: after the upgrade, in the first directory of its names.
    let z = f.mkdir(ROOT_INO, "z");
    f.meta.link(file.ino, z.ino, b"linked").unwrap();
    let open = f.file(a.ino, "open-unlinked");
    f.meta.open(f.session, open.ino).unwrap();
    f.meta.unlink(a.ino, b"open-unlinked").unwrap();
    let want = [
        (ROOT_INO, du(2, 3, 42)),
        (a.ino, du(1, 1, 42)),
        (b.ino, du(1, 0, 42)),
    ];
    for (ino, usage) in want {
        assert_eq!(f.meta.dir_usage(ino).unwrap(), usage);
    }
    let Fixture { db, meta, .. } = f;
    drop(meta);
    // Format 3 kept neither statistics, nor the subdirectory and names indexes, nor owners.
    let mut writes: Vec<crate::kv::Write> = [&b"D"[..], b"C", b"P", b"U"]
        .iter()
        .flat_map(|prefix| db.keys_with_prefix(prefix))
        .map(|key| (key, None))
        .collect();
    writes.push((keys::FORMAT.to_vec(), Some(keys::encode_u64(3))));
    db.write_raw(writes);
    let meta = db.open(config());
    for (ino, usage) in want {
        assert_eq!(
            meta.dir_usage(ino).unwrap(),
            usage,
            "du of {ino} after the upgrade"
        );
    }
    let statfs = meta.statfs().unwrap();
    assert_eq!(
        meta.tenant_usage().unwrap(),
        [TenantUsage {
            tenant: String::new(),
            files: statfs.files,
            bytes: statfs.used_bytes
        }],
        "what was there before owners were kept belongs to no tenant"
    );
    meta.unlink(b.ino, b"f").unwrap();
    assert_eq!(
        meta.dir_usage(z.ino).unwrap(),
        du(1, 0, 42),
        "the upgrade indexed the names of the linked file"
    );
}

#[test]
fn format_2_sessions_are_closed_by_the_upgrade() {
    let f = fixture();
    let file = f.file(ROOT_INO, "open-unlinked");
    f.meta.open(f.session, file.ino).unwrap();
    f.meta.unlink(ROOT_INO, b"open-unlinked").unwrap();
    let Fixture { db, meta, session } = f;
    drop(meta);
    // The session's records as format 2 kept them, under a sequential 64-bit id.
    let old_key = |tag: u8, numbers: &[u64]| -> Vec<u8> {
        let mut key = vec![tag];
        for n in numbers {
            key.extend_from_slice(&n.to_be_bytes());
        }
        key
    };
    db.write_raw(vec![
        (keys::FORMAT.to_vec(), Some(keys::encode_u64(2))),
        (keys::session(session), None),
        (keys::handle(session, file.ino), None),
        (
            old_key(b'S', &[5]),
            Some(keys::encode_pair(0, 0, b"host:/mnt")),
        ),
        (old_key(b'h', &[5, file.ino]), Some(keys::encode_u64(1))),
        (
            old_key(b'p', &[5, 77]),
            Some(crate::codec::encode_slice_data(10, &GW)),
        ),
        (b"nnext_session".to_vec(), Some(keys::encode_u64(6))),
    ]);
    for _ in 0..2 {
        let meta = db.open(config());
        assert!(meta.list_sessions().unwrap().is_empty());
        assert_eq!(errno(meta.getattr(file.ino)), libc::ENOENT, "purged");
        let queued = meta.take_due_deleted_slices(None, i64::MAX, 10).unwrap();
        assert_eq!(
            queued
                .iter()
                .map(|d| (d.slice_id, d.len))
                .collect::<Vec<_>>(),
            [(77, 10)]
        );
        let fresh = meta.open_session("", "new").unwrap();
        meta.close_session(fresh).unwrap();
    }
}

#[test]
fn capacity_and_inode_limits_give_enospc() {
    let f = fixture_with(MetaConfig {
        capacity_bytes: Some(1000),
        max_files: Some(3),
        ..config()
    });
    let file = f.file(ROOT_INO, "a");
    f.mkdir(ROOT_INO, "b");
    assert_eq!(
        errno(f.meta.mknod(ROOT_INO, b"c", &node(FileKind::File))),
        libc::ENOSPC
    );
    let size = |s| SetAttr {
        size: Some(s),
        ..SetAttr::default()
    };
    f.meta.setattr(file.ino, &size(1000)).unwrap();
    assert_eq!(errno(f.meta.setattr(file.ino, &size(1001))), libc::ENOSPC);
    assert_eq!(
        f.meta.statfs().unwrap(),
        StatFs {
            files: 3,
            used_bytes: 1000,
            capacity_bytes: Some(1000),
            max_files: Some(3)
        }
    );
}

#[test]
fn slice_id_batches_never_overlap_even_across_reopen() {
    let db = db();
    let mut seen = Vec::new();
    for _ in 0..3 {
        let meta = db.open(MetaConfig::default());
        let session = meta.open_session("", "allocating").unwrap();
        for count in [1, 1000, 7] {
            let batch = meta.allocate_slice_ids(session, count).unwrap();
            assert_eq!(batch.end - batch.start, count);
            assert!(batch.start >= 1, "0 is the hole id");
            seen.push(batch);
        }
    }
    seen.sort_by_key(|r| r.start);
    for pair in seen.windows(2) {
        assert!(
            pair[0].end <= pair[1].start,
            "{:?} overlaps {:?}",
            pair[0],
            pair[1]
        );
    }
}

#[test]
fn everything_survives_a_reopen() {
    let f = fixture_with(MetaConfig {
        deleted_data_delay: Duration::ZERO,
        ..MetaConfig::default()
    });
    let sub = f.mkdir(ROOT_INO, "sub");
    let file = f.file(sub.ino, "file");
    f.meta
        .symlink(ROOT_INO, b"link", b"sub/file", 0, 0)
        .unwrap();
    f.meta
        .setxattr(file.ino, b"user.k", b"v", XattrMode::Upsert)
        .unwrap();
    let slice = f.write(file.ino, 0, 0, 4096);
    let gone = f.file(ROOT_INO, "gone");
    let gone_slice = f.write(gone.ino, 0, 0, 1);
    f.meta.unlink(ROOT_INO, b"gone").unwrap();
    assert_eq!(f.queued(), BTreeSet::from([gone_slice.slice_id]));
    f.meta.open(f.session, file.ino).unwrap();
    f.meta.unlink(sub.ino, b"file").unwrap();

    let Fixture { db, meta, session } = f;
    drop(meta);
    let meta = db.open(MetaConfig::default());
    assert_eq!(meta.getattr(ROOT_INO).unwrap().nlink, 3);
    assert_eq!(
        meta.readlink(meta.lookup(ROOT_INO, b"link").unwrap().ino)
            .unwrap(),
        b"sub/file"
    );
    let orphan = meta.getattr(file.ino).unwrap();
    assert_eq!(
        (orphan.nlink, orphan.size),
        (0, 4096),
        "the open handle survives too"
    );
    assert_eq!(meta.read_chunk(file.ino, 0).unwrap(), [slice]);
    assert_eq!(meta.getxattr(file.ino, b"user.k").unwrap(), b"v");
    assert_eq!(
        meta.take_due_deleted_slices(None, i64::MAX, 10)
            .unwrap()
            .len(),
        1
    );
    assert_eq!(meta.list_sessions().unwrap()[0].id, session);
    let next = meta.mknod(sub.ino, b"new", &node(FileKind::File)).unwrap();
    assert!(next.ino > gone.ino, "inode numbers are not reused");
    meta.close_session(session).unwrap();
    assert_eq!(errno(meta.getattr(file.ino)), libc::ENOENT);
    assert_eq!(meta.statfs().unwrap().files, 4);
    assert_eq!(meta.statfs().unwrap().used_bytes, 0);
}

#[test]
fn a_corrupt_record_is_eio_and_not_retryable() {
    let f = fixture();
    let file = f.file(ROOT_INO, "f");
    let Fixture { db, meta, .. } = f;
    drop(meta);
    db.put_raw(keys::inode(file.ino), b"garbage".to_vec());
    let meta = db.open(config());
    let error = meta.getattr(file.ino).unwrap_err();
    assert_eq!(error.errno(), libc::EIO);
    assert!(!error.is_retryable());
    assert_eq!(errno(meta.lookup(ROOT_INO, b"f")), libc::EIO);
    assert!(!MetaError::NoSuchInode(1).is_retryable());
}

#[test]
fn drop_shadowed_keeps_partly_visible_slices() {
    let s = |id, offset, len| Slice {
        slice_id: id,
        offset_in_chunk: offset,
        len,
        gateway_id: GW,
    };
    let (kept, dropped) = rules::drop_shadowed(vec![
        s(1, 0, 10),
        s(2, 10, 10),
        s(3, 5, 10),
        s(4, 0, 6),
        s(5, 14, 6),
    ]);
    assert_eq!(
        kept.iter().map(|s| s.slice_id).collect::<Vec<_>>(),
        [3, 4, 5]
    );
    assert_eq!(
        dropped.iter().map(|s| s.slice_id).collect::<BTreeSet<_>>(),
        BTreeSet::from([1, 2])
    );
    let (kept, dropped) = rules::drop_shadowed(vec![s(1, 0, 10), s(2, 0, 9), s(3, 1, 9)]);
    assert_eq!((kept.len(), dropped.len()), (2, 1));
}

#[test]
fn gateways_register_with_rising_epochs_and_a_superseded_one_is_fenced() {
    let f = fixture();
    let (a, b) = ([1; 16], [2; 16]);
    assert!(f.meta.list_gateways().unwrap().is_empty());
    assert_eq!(
        f.meta.register_gateway(a, "10.0.0.1:7070", false).unwrap(),
        1
    );
    assert_eq!(
        f.meta.register_gateway(b, "10.0.0.2:7070", false).unwrap(),
        1
    );
    let load = GatewayLoad {
        staged_blocks: 3,
        staged_bytes: 12,
        queue_len: 2,
        oldest_waiting_ms: 1500,
        healthy: false,
        mirror: true,
    };
    f.meta.gateway_heartbeat(a, 1, load).unwrap();
    // A takeover: the same id starts again elsewhere, with a higher epoch.
    assert_eq!(
        f.meta.register_gateway(a, "10.0.0.9:7070", false).unwrap(),
        2
    );
    let fenced = f.meta.gateway_heartbeat(a, 1, load).unwrap_err();
    assert!(
        matches!(
            fenced,
            MetaError::Fenced {
                epoch: 1,
                current: 2,
                ..
            }
        ),
        "{fenced}"
    );
    f.meta.gateway_heartbeat(a, 2, load).unwrap();
    let gateways = f.meta.list_gateways().unwrap();
    assert_eq!(gateways.len(), 2);
    let record = gateways.iter().find(|g| g.id == a).unwrap();
    assert_eq!(
        (
            record.address.as_str(),
            record.epoch,
            record.staged_blocks,
            record.staged_bytes,
            record.queue_len,
            record.oldest_waiting_ms,
            record.healthy,
            record.mirror,
        ),
        ("10.0.0.9:7070", 2, 3, 12, 2, 1500, false, true)
    );
    let other = gateways.iter().find(|g| g.id == b).unwrap();
    assert!(
        other.healthy && !other.mirror,
        "a gateway that did not say otherwise is healthy, and not a mirror's"
    );
    // A mirror region's gateway is one from its registration on, before any heartbeat.
    let c = [3; 16];
    assert_eq!(
        f.meta.register_gateway(c, "10.1.0.1:7070", true).unwrap(),
        1
    );
    let listed = f.meta.list_gateways().unwrap();
    assert!(listed.iter().find(|g| g.id == c).unwrap().mirror);
    assert_eq!(
        errno(f.meta.gateway_heartbeat([4; 16], 1, load)),
        libc::EINVAL,
        "an unregistered gateway cannot heartbeat"
    );
}

#[test]
fn each_gateway_takes_only_the_deleted_slices_it_staged() {
    let f = fixture();
    let file = f.file(ROOT_INO, "f");
    let mine = f.write(file.ino, 0, 0, 10);
    let theirs = {
        let id = f.meta.allocate_slice_ids(f.session, 1).unwrap().start;
        let slice = Slice {
            slice_id: id,
            offset_in_chunk: 20,
            len: 10,
            gateway_id: [8; 16],
        };
        f.meta.record_pending_slice(f.session, &slice).unwrap();
        f.meta
            .commit_slice(f.session, file.ino, 0, &slice, 0, &CommitAttrs::at(1))
            .unwrap();
        slice
    };
    f.meta.unlink(ROOT_INO, b"f").unwrap();
    let ids = |gateway| -> Vec<u64> {
        f.meta
            .take_due_deleted_slices(gateway, i64::MAX, 10)
            .unwrap()
            .iter()
            .map(|s| s.slice_id)
            .collect()
    };
    assert_eq!(ids(Some(GW)), [mine.slice_id]);
    assert_eq!(ids(Some([8; 16])), [theirs.slice_id]);
    assert_eq!(ids(None).len(), 2);
    f.meta.ack_deleted_slices(&[mine.slice_id]).unwrap();
    assert!(ids(Some(GW)).is_empty());
    assert_eq!(ids(None), [theirs.slice_id]);
}

fn lock(owner: u64, start: u64, end: u64, kind: Option<LockKind>) -> LockRequest {
    LockRequest {
        owner,
        start,
        end,
        kind,
        pid: 4242,
    }
}

#[test]
fn byte_range_locks_exclude_other_owners_and_go_with_their_session() {
    use LockKind::{Read, Write};
    let f = fixture();
    let ino = f.file(ROOT_INO, "locked").ino;
    let other = f.meta.open_session("", "other mount").unwrap();

    f.meta
        .set_lock(f.session, ino, &lock(1, 0, u64::MAX, Some(Write)))
        .unwrap();
    assert_eq!(
        errno(f.meta.set_lock(other, ino, &lock(1, 0, 0, Some(Read)))),
        libc::EAGAIN,
        "another session's owner"
    );
    assert_eq!(
        errno(
            f.meta
                .set_lock(f.session, ino, &lock(2, 10, 20, Some(Read)))
        ),
        libc::EAGAIN,
        "another owner of the same session"
    );
    let held = f
        .meta
        .get_lock(other, ino, &lock(1, 5, 5, Some(Read)))
        .unwrap()
        .expect("the write lock is reported");
    assert_eq!(
        (held.start, held.end, held.kind, held.pid),
        (0, u64::MAX, Write, 4242)
    );
    assert_eq!(
        f.meta
            .get_lock(f.session, ino, &lock(1, 0, 10, Some(Write)))
            .unwrap(),
        None,
        "an owner's own locks never conflict"
    );
    f.meta
        .set_lock(f.session, ino, &lock(1, 0, 0, Some(Read)))
        .expect("an owner changes its own lock in place");

    // Unlocking the middle splits the lock; the freed bytes can be taken, the rest cannot.
    f.meta
        .set_lock(f.session, ino, &lock(1, 100, 199, None))
        .unwrap();
    f.meta
        .set_lock(other, ino, &lock(7, 100, 199, Some(Write)))
        .unwrap();
    assert_eq!(
        errno(f.meta.set_lock(other, ino, &lock(7, 99, 100, Some(Write)))),
        libc::EAGAIN
    );
    // Read locks coexist.
    f.meta
        .set_lock(f.session, ino, &lock(1, 0, 99, Some(Read)))
        .unwrap();
    f.meta
        .set_lock(other, ino, &lock(8, 0, 99, Some(Read)))
        .unwrap();
    assert_eq!(
        errno(f.meta.set_lock(other, ino, &lock(8, 0, 0, Some(Write)))),
        libc::EAGAIN,
        "no upgrade while another owner reads"
    );
    // Releasing an owner frees what it held.
    f.meta.release_locks(other, ino, Some(7)).unwrap();
    f.meta.release_locks(other, ino, Some(7)).unwrap();
    f.meta
        .set_lock(f.session, ino, &lock(1, 100, 199, Some(Write)))
        .unwrap();
    f.meta.release_locks(other, ino, None).unwrap();
    f.meta
        .set_lock(f.session, ino, &lock(1, 0, 99, Some(Write)))
        .expect("all of the other session's owners released");

    // A closed session's locks are gone with it.
    let dying = f.meta.open_session("", "dying").unwrap();
    let second = f.file(ROOT_INO, "second").ino;
    f.meta
        .set_lock(dying, second, &lock(3, 1000, 1999, Some(Write)))
        .unwrap();
    assert_eq!(
        errno(
            f.meta
                .set_lock(other, second, &lock(1, 1500, 1500, Some(Read)))
        ),
        libc::EAGAIN
    );
    f.meta.close_session(dying).unwrap();
    f.meta
        .set_lock(other, second, &lock(1, 1500, 1500, Some(Write)))
        .unwrap();

    assert_eq!(
        errno(f.meta.set_lock(other, ino, &lock(1, 10, 9, Some(Read)))),
        libc::EINVAL
    );
    assert_eq!(
        errno(f.meta.set_lock(other, 999_999, &lock(1, 0, 9, Some(Read)))),
        libc::ENOENT
    );
    assert_eq!(
        errno(f.meta.set_lock(dying, second, &lock(1, 0, 9, Some(Read)))),
        libc::EIO,
        "a closed session"
    );
}

#[test]
fn one_owner_holds_a_bounded_number_of_lock_ranges() {
    let f = fixture();
    let ino = f.file(ROOT_INO, "fragmented").ino;
    for i in 0..locks::MAX_RANGES_PER_OWNER as u64 {
        f.meta
            .set_lock(f.session, ino, &lock(1, 2 * i, 2 * i, Some(LockKind::Read)))
            .unwrap();
    }
    let past = 2 * locks::MAX_RANGES_PER_OWNER as u64;
    assert_eq!(
        errno(
            f.meta
                .set_lock(f.session, ino, &lock(1, past, past, Some(LockKind::Read)))
        ),
        libc::ENOLCK
    );
    // Filling a gap merges three ranges into one: allowed.
    f.meta
        .set_lock(f.session, ino, &lock(1, 1, 1, Some(LockKind::Read)))
        .unwrap();
}

#[test]
fn listings_tell_which_entries_have_extended_attributes() {
    let f = fixture();
    let plain = f.file(ROOT_INO, "plain").ino;
    let tagged = f.file(ROOT_INO, "tagged").ino;
    f.meta
        .setxattr(tagged, b"user.tag", b"1", XattrMode::Upsert)
        .unwrap();
    let flags = |f: &Fixture| -> Vec<(Ino, Option<bool>)> {
        let mut entries: Vec<_> = f
            .meta
            .readdir(ROOT_INO, 0, 100)
            .unwrap()
            .into_iter()
            .map(|e| (e.attr.ino, e.has_xattrs))
            .collect();
        entries.sort();
        entries
    };
    assert_eq!(flags(&f), [(plain, Some(false)), (tagged, Some(true))]);
    f.meta.removexattr(tagged, b"user.tag").unwrap();
    assert_eq!(flags(&f), [(plain, Some(false)), (tagged, Some(false))]);
}

/// A change sent again after its answer was lost (a gateway killed after the commit) is answered
/// with what it did the first time, and happens once.
#[test]
fn a_tagged_change_sent_twice_happens_once() {
    use crate::once::{scope, RequestTag};
    let f = fixture();
    let engine = f.meta.engine().clone();
    let tag = |slot: u16, seq: u64, retry: bool| {
        Some(RequestTag {
            session: f.session,
            slot,
            seq,
            retry,
        })
    };
    fn run<T>(
        f: &Fixture,
        tag: Option<RequestTag>,
        work: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        f.meta.block_on(scope(tag, work))
    }

    // create: the retry answers the same inode (not EEXIST) and holds one handle.
    let name = b"once".as_slice();
    let file = node(FileKind::File);
    let first = run(
        &f,
        tag(3, 1, false),
        engine.create(f.session, ROOT_INO, name, &file),
    )
    .unwrap();
    let again = run(
        &f,
        tag(3, 1, true),
        engine.create(f.session, ROOT_INO, name, &file),
    )
    .unwrap();
    assert_eq!(again.ino, first.ino);
    // A new change in the same slot is a new change: EEXIST now.
    let next = run(
        &f,
        tag(3, 2, true),
        engine.create(f.session, ROOT_INO, name, &file),
    );
    assert_eq!(errno(next), libc::EEXIST);

    // release: the retry drops no second handle, so a second open keeps the file after unlink.
    f.meta.open(f.session, first.ino).unwrap();
    run(
        &f,
        tag(4, 1, false),
        engine.release(f.session, &[first.ino]),
    )
    .unwrap();
    run(&f, tag(4, 1, true), engine.release(f.session, &[first.ino])).unwrap();
    run(&f, tag(5, 1, false), engine.unlink(ROOT_INO, name)).unwrap();
    run(&f, tag(5, 1, true), engine.unlink(ROOT_INO, name)).unwrap();
    assert_eq!(
        f.meta.getattr(first.ino).unwrap().nlink,
        0,
        "open, so still there"
    );
    // Untagged, the same unlink is a second change.
    assert_eq!(errno(f.meta.unlink(ROOT_INO, name)), libc::ENOENT);

    // A slot never goes back: an older sequence than the one recorded is refused.
    let stale = run(&f, tag(5, 0, true), engine.unlink(ROOT_INO, name));
    assert_eq!(errno(stale), libc::EINVAL);

    // rename and mkdir too.
    f.mkdir(ROOT_INO, "a");
    let (a, b) = (b"a".as_slice(), b"b".as_slice());
    for retry in [false, true] {
        run(
            &f,
            tag(6, 9, retry),
            engine.rename(ROOT_INO, a, ROOT_INO, b, RenameMode::Replace),
        )
        .unwrap();
    }
    assert_eq!(errno(f.lookup(ROOT_INO, "a")), libc::ENOENT);
    let dir = f.lookup(ROOT_INO, "b").unwrap();
    let made = run(
        &f,
        tag(7, 1, false),
        engine.mkdir(dir.ino, b"c", 0o755, 1, 1),
    )
    .unwrap();
    let remade = run(
        &f,
        tag(7, 1, true),
        engine.mkdir(dir.ino, b"c", 0o755, 1, 1),
    )
    .unwrap();
    assert_eq!(made.ino, remade.ino);

    // The slots go with the session: after it closed, the same retry is a new change.
    f.meta.close_session(f.session).unwrap();
    let after = run(
        &f,
        tag(7, 1, true),
        engine.mkdir(dir.ino, b"c", 0o755, 1, 1),
    );
    assert_eq!(errno(after), libc::EEXIST);
}

// --- changes racing each other (on a shared database, the snapshot transactions of creates and
// slice commits; see rules::TxKind::Explicit) ---

/// Creates of one name from many tasks at once: exactly one makes it, the others find it.
#[test]
fn creates_of_one_name_at_once_make_exactly_one_file() {
    let f = fixture();
    let dir = f.meta.mkdir(ROOT_INO, b"race", 0o755, 0, 0).unwrap();
    let engine = f.meta.engine().clone();
    let session = f.session;
    let outcomes: Vec<Result<Attr>> = f.meta.block_on(async move {
        let tasks: Vec<_> = (0..16)
            .map(|i| {
                let engine = engine.clone();
                tokio::spawn(async move {
                    if i % 2 == 0 {
                        engine
                            .create(session, dir.ino, b"one", &node(FileKind::File))
                            .await
                    } else {
                        engine.mknod(dir.ino, b"one", &node(FileKind::File)).await
                    }
                })
            })
            .collect();
        let mut outcomes = Vec::new();
        for task in tasks {
            outcomes.push(task.await.unwrap());
        }
        outcomes
    });
    let made: Vec<&Attr> = outcomes.iter().filter_map(|o| o.as_ref().ok()).collect();
    assert_eq!(made.len(), 1, "{outcomes:?}");
    for outcome in &outcomes {
        if let Err(error) = outcome {
            assert_eq!(error.errno(), libc::EEXIST, "{error}");
        }
    }
    assert_eq!(f.meta.lookup(dir.ino, b"one").unwrap().ino, made[0].ino);
    assert_eq!(
        f.meta.readdir(dir.ino, 0, 100).unwrap().len(),
        1,
        "one entry"
    );
    assert_eq!(f.meta.dir_usage(dir.ino).unwrap().files, 1);
}

/// Files made in a directory while it is removed: either the removal wins (and no file was
/// made in it) or it finds the directory not empty; never a file made in a directory that is
/// gone.
#[test]
fn files_are_never_made_in_a_directory_being_removed() {
    let f = fixture();
    for round in 0..40 {
        let name = format!("doomed-{round}");
        let dir = f
            .meta
            .mkdir(ROOT_INO, name.as_bytes(), 0o755, 0, 0)
            .unwrap();
        let engine = f.meta.engine().clone();
        let (made, removed) = f.meta.block_on(async move {
            let makers: Vec<_> = (0..8)
                .map(|t| {
                    let engine = engine.clone();
                    tokio::spawn(async move {
                        // Spread over the removal's own round trips.
                        let pause = (t as u64 * 7 + round as u64 * 13) % 40 * 50;
                        tokio::time::sleep(Duration::from_micros(pause)).await;
                        engine
                            .mknod(dir.ino, format!("f{t}").as_bytes(), &node(FileKind::File))
                            .await
                            .ok()
                    })
                })
                .collect();
            let removed = engine.rmdir(ROOT_INO, name.as_bytes()).await;
            let mut made = Vec::new();
            for maker in makers {
                made.extend(maker.await.unwrap());
            }
            (made, removed)
        });
        match removed {
            Ok(()) => {
                assert!(
                    made.is_empty(),
                    "round {round}: {} files made in a directory that was removed",
                    made.len()
                );
                assert_eq!(errno(f.meta.getattr(dir.ino)), libc::ENOENT);
            }
            Err(error) => {
                assert_eq!(error.errno(), libc::ENOTEMPTY, "round {round}: {error}");
                assert!(!made.is_empty());
                assert_eq!(f.meta.readdir(dir.ino, 0, 100).unwrap().len(), made.len());
            }
        }
    }
}

/// A session closed while its mount still creates files: whatever a create answered made is
/// released by the close (no open handle outlives its session), so removing the files frees
/// their inodes; creates after the close are refused.
#[test]
fn closing_a_session_releases_every_file_its_racing_creates_made() {
    let f = fixture();
    let dir = f.meta.mkdir(ROOT_INO, b"closing", 0o755, 0, 0).unwrap();
    for round in 0..10u64 {
        let session = f.meta.open_session("", "racing").unwrap();
        let engine = f.meta.engine().clone();
        let made: Vec<(String, Ino)> = f.meta.block_on(async move {
            let creators: Vec<_> = (0..8)
                .map(|t| {
                    let engine = engine.clone();
                    tokio::spawn(async move {
                        let mut made = Vec::new();
                        for n in 0.. {
                            let name = format!("r{round}-t{t}-{n}");
                            match engine
                                .create(session, dir.ino, name.as_bytes(), &node(FileKind::File))
                                .await
                            {
                                Ok(attr) => made.push((name, attr.ino)),
                                Err(error) => {
                                    assert!(matches!(error, MetaError::SessionGone(_)), "{error}");
                                    break;
                                }
                            }
                        }
                        made
                    })
                })
                .collect();
            tokio::time::sleep(Duration::from_millis(5 + round * 3)).await;
            engine.close_session(session).await.unwrap();
            let mut made = Vec::new();
            for creator in creators {
                made.extend(creator.await.unwrap());
            }
            made
        });
        for (name, ino) in made {
            f.meta.unlink(dir.ino, name.as_bytes()).unwrap();
            assert_eq!(
                errno(f.meta.getattr(ino)),
                libc::ENOENT,
                "round {round}: {name} is still open after its session was closed"
            );
        }
    }
}

/// Directory leases (`rules/dir_leases`): granted on an empty directory only, one holder at a
/// time; the holder's own additions pass; anyone else's recalls the lease and runs once the
/// holder gave it back, so the holder's keep sees the recall before the addition is made.
#[test]
fn a_directory_lease_is_recalled_by_another_sessions_addition() {
    use crate::once::{scope, RequestTag};
    let f = fixture();
    let engine = f.meta.engine().clone();
    let dir = f.mkdir(ROOT_INO, "leased").ino;
    let full = f.mkdir(ROOT_INO, "full").ino;
    f.file(full, "x");
    let file = f.file(ROOT_INO, "plain").ino;
    let other = f.meta.open_session("", "other").unwrap();

    assert!(f.meta.take_dir_lease(f.session, dir).unwrap());
    assert!(f.meta.take_dir_lease(f.session, dir).unwrap(), "its own");
    assert!(!f.meta.take_dir_lease(other, dir).unwrap(), "one holder");
    assert!(
        !f.meta.take_dir_lease(f.session, full).unwrap(),
        "not empty"
    );
    assert_eq!(errno(f.meta.take_dir_lease(f.session, file)), libc::ENOTDIR);
    assert_eq!(
        f.meta
            .keep_dir_leases(f.session, &[dir, full], &[])
            .unwrap(),
        [true, false]
    );
    assert_eq!(f.meta.keep_dir_leases(other, &[dir], &[]).unwrap(), [false]);

    // The holder's own additions (its change tag names its session) leave the lease alone.
    let own = Some(RequestTag {
        session: f.session,
        slot: 1,
        seq: 1,
        retry: false,
    });
    let mine = f.meta.block_on(scope(
        own,
        engine.create(f.session, dir, b"mine", &node(FileKind::File)),
    ));
    assert!(mine.is_ok(), "{mine:?}");
    assert_eq!(
        f.meta.keep_dir_leases(f.session, &[dir], &[]).unwrap(),
        [true]
    );

    // Another session's addition waits for the holder: a holder that keeps its leases sees the
    // recall, stops answering from the lease, and gives it back.
    let gave_back = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|threads| {
        threads.spawn(|| loop {
            let held = f.meta.keep_dir_leases(f.session, &[dir], &[]).unwrap();
            if held == [false] {
                gave_back.store(true, std::sync::atomic::Ordering::SeqCst);
                f.meta.keep_dir_leases(f.session, &[], &[dir]).unwrap();
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        });
        f.meta.mknod(dir, b"theirs", &node(FileKind::File)).unwrap();
        assert!(
            gave_back.load(std::sync::atomic::Ordering::SeqCst),
            "the addition was made before the holder learnt of the recall"
        );
    });
    assert_eq!(
        f.meta.keep_dir_leases(f.session, &[dir], &[]).unwrap(),
        [false]
    );
    assert!(f.meta.lookup(dir, b"theirs").is_ok());
    assert!(
        !f.meta.take_dir_lease(f.session, dir).unwrap(),
        "not empty any more"
    );
}

/// A holder that neither keeps nor gives back its lease holds up another session's addition
/// for the recall wait, no less (past the term it counted on), and then loses the lease; a
/// lease goes with its directory and its session, and a call names a bounded number.
#[test]
fn an_unreturned_directory_lease_is_taken_away_after_the_recall_wait() {
    let f = fixture();
    let dir = f.mkdir(ROOT_INO, "leased").ino;
    let src = f.file(ROOT_INO, "src");
    let other = f.meta.open_session("", "other").unwrap();
    assert!(f.meta.take_dir_lease(f.session, dir).unwrap());
    let started = std::time::Instant::now();
    f.meta
        .rename(ROOT_INO, b"src", dir, b"moved", RenameMode::Replace)
        .unwrap();
    assert!(started.elapsed() >= DIR_LEASE_RECALL_WAIT);
    assert_eq!(f.meta.lookup(dir, b"moved").unwrap().ino, src.ino);
    assert_eq!(
        f.meta.keep_dir_leases(f.session, &[dir], &[]).unwrap(),
        [false]
    );

    // With its directory.
    let gone = f.mkdir(ROOT_INO, "gone").ino;
    assert!(f.meta.take_dir_lease(other, gone).unwrap());
    f.meta.rmdir(ROOT_INO, b"gone").unwrap();
    assert_eq!(
        f.meta.keep_dir_leases(other, &[gone], &[]).unwrap(),
        [false]
    );

    // With its session: another session's addition does not wait for a closed one.
    let next = f.mkdir(ROOT_INO, "next").ino;
    assert!(f.meta.take_dir_lease(other, next).unwrap());
    f.meta.close_session(other).unwrap();
    assert!(f.meta.take_dir_lease(f.session, next).unwrap());
    assert_eq!(
        errno(f.meta.keep_dir_leases(other, &[next], &[])),
        libc::EIO,
        "a closed session keeps nothing"
    );
    assert!(f
        .meta
        .keep_dir_leases(f.session, &[], &[next])
        .unwrap()
        .is_empty());
    f.file(next, "free");

    let many = vec![next; MAX_DIR_LEASES_PER_CALL + 1];
    assert_eq!(
        errno(f.meta.keep_dir_leases(f.session, &many, &[])),
        libc::EINVAL
    );
}
