//! Model-based test: random sequences of namespace and data operations run against an engine
//! (every backend, `super::db()`) and against a small in-memory reference model; after every step the two must agree on
//! results (errno), lookups, attributes, directory listings, file contents and data cleanup.
//!
//! File contents are compared through slice ids: the model remembers, per byte position, which
//! slice wrote it last; the engine's answer is resolved from `read_chunk` (later slices shadow
//! earlier ones, holes and bytes past the size read as nothing). Data cleanup is checked as an
//! accounting identity: every committed slice is either still referenced by a chunk or queued for
//! deletion, never both, and no byte that the model says is visible belongs to a queued slice.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use proptest::prelude::*;
use shared::CHUNK_SIZE;

use super::db;
use crate::blocking::BlockingMeta;
use crate::*;

const NAMES: [&[u8]; 3] = [b"a", b"b", b"c"];
/// Byte offsets used inside a chunk are below this, so contents are cheap to compare.
const SPAN: u32 = 24;
const CHUNKS: u64 = 3;
const SIZES: [u64; 7] = [
    0,
    5,
    12,
    20,
    CHUNK_SIZE + 4,
    CHUNK_SIZE + 20,
    2 * CHUNK_SIZE + 10,
];

/// Which inode a data operation works on: a path (which may be missing or a directory, for the
/// error paths), or directly the n-th existing file, so that data operations pile up on the same
/// files often enough to meet the interesting cases (write, shrink, grow, overwrite).
#[derive(Debug, Clone, Copy)]
enum Target {
    Path(usize, usize),
    File(usize),
}

fn target() -> impl Strategy<Value = Target> {
    prop_oneof![
        1 => (0..8usize, 0..NAMES.len()).prop_map(|(d, n)| Target::Path(d, n)),
        3 => (0..4usize).prop_map(Target::File),
    ]
}

#[derive(Debug, Clone)]
enum Op {
    Create(usize, usize),
    Mkdir(usize, usize),
    Unlink(usize, usize),
    Rmdir(usize, usize),
    Rename(usize, usize, usize, usize, RenameMode),
    Link(usize, usize, usize, usize),
    Truncate(Target, usize),
    Commit(Target, u64, u32, u32),
    Open(usize, usize),
    Release(usize),
}

fn op() -> impl Strategy<Value = Op> {
    let d = 0..8usize;
    let n = 0..NAMES.len();
    let mode = prop_oneof![
        3 => Just(RenameMode::Replace),
        1 => Just(RenameMode::NoReplace),
        1 => Just(RenameMode::Exchange),
    ];
    prop_oneof![
        3 => (d.clone(), n.clone()).prop_map(|(d, n)| Op::Create(d, n)),
        2 => (d.clone(), n.clone()).prop_map(|(d, n)| Op::Mkdir(d, n)),
        2 => (d.clone(), n.clone()).prop_map(|(d, n)| Op::Unlink(d, n)),
        1 => (d.clone(), n.clone()).prop_map(|(d, n)| Op::Rmdir(d, n)),
        3 => (d.clone(), n.clone(), d.clone(), n.clone(), mode)
            .prop_map(|(d, n, d2, n2, m)| Op::Rename(d, n, d2, n2, m)),
        1 => (d.clone(), n.clone(), d.clone(), n.clone()).prop_map(|(d, n, d2, n2)| Op::Link(d, n, d2, n2)),
        3 => (target(), 0..SIZES.len()).prop_map(|(t, s)| Op::Truncate(t, s)),
        5 => (target(), 0..CHUNKS, 0..SPAN - 1)
            .prop_flat_map(|(t, c, off)| (Just(t), Just(c), Just(off), 1..=SPAN - off))
            .prop_map(|(t, c, off, len)| Op::Commit(t, c, off, len)),
        1 => (d.clone(), n.clone()).prop_map(|(d, n)| Op::Open(d, n)),
        1 => (0..4usize).prop_map(Op::Release),
    ]
}

#[derive(Debug, Clone)]
struct Node {
    kind: FileKind,
    nlink: u32,
    size: u64,
    /// Directories: their parent. Other nodes: the directory whose statistics count them (`du`):
    /// where they were made or last renamed to; once that directory holds none of their names,
    /// the first (lowest-numbered) directory that does; 0 after the last name.
    parent: Ino,
    entries: BTreeMap<Vec<u8>, Ino>,
    open_handles: u32,
    /// Files: byte position -> id of the slice that wrote it last.
    content: BTreeMap<u64, u64>,
}

impl Node {
    fn new(kind: FileKind, parent: Ino) -> Self {
        Node {
            kind,
            nlink: if kind == FileKind::Dir { 2 } else { 1 },
            size: 0,
            parent,
            entries: BTreeMap::new(),
            open_handles: 0,
            content: BTreeMap::new(),
        }
    }
}

/// The reference: a tree of nodes with the POSIX rules, written as plainly as possible.
struct Model {
    nodes: BTreeMap<Ino, Node>,
    removed: BTreeSet<Ino>,
    next_ino: Ino,
    committed: BTreeSet<u64>,
    /// Slices recorded as pending whose commit failed: cleaned up when the session closes.
    uncommitted: BTreeSet<u64>,
    handles: Vec<Ino>,
}

type Outcome = Result<(), i32>;

impl Model {
    fn new() -> Self {
        Model {
            nodes: BTreeMap::from([(ROOT_INO, Node::new(FileKind::Dir, ROOT_INO))]),
            removed: BTreeSet::new(),
            next_ino: ROOT_INO + 1,
            committed: BTreeSet::new(),
            uncommitted: BTreeSet::new(),
            handles: Vec::new(),
        }
    }

    fn dir(&self, index: usize) -> Ino {
        let dirs: Vec<Ino> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.kind == FileKind::Dir)
            .map(|(&ino, _)| ino)
            .collect();
        dirs[index % dirs.len()]
    }

    fn target(&self, target: Target) -> Option<Ino> {
        match target {
            Target::Path(d, n) => self.entry(self.dir(d), NAMES[n]),
            Target::File(index) => {
                let files: Vec<Ino> = self
                    .nodes
                    .iter()
                    .filter(|(_, n)| n.kind == FileKind::File)
                    .map(|(&ino, _)| ino)
                    .collect();
                files.get(index % files.len().max(1)).copied()
            }
        }
    }

    fn entry(&self, dir: Ino, name: &[u8]) -> Option<Ino> {
        self.nodes[&dir].entries.get(name).copied()
    }

    fn node(&mut self, ino: Ino) -> &mut Node {
        self.nodes.get_mut(&ino).unwrap()
    }

    fn is_ancestor(&self, ancestor: Ino, mut ino: Ino) -> bool {
        loop {
            if ino == ancestor {
                return true;
            }
            if ino == ROOT_INO {
                return false;
            }
            ino = self.nodes[&ino].parent;
        }
    }

    fn remove(&mut self, ino: Ino) {
        self.nodes.remove(&ino);
        self.removed.insert(ino);
    }

    /// Names of `ino` in directory `dir`.
    fn names_in(&self, dir: Ino, ino: Ino) -> usize {
        self.nodes[&dir]
            .entries
            .values()
            .filter(|&&i| i == ino)
            .count()
    }

    /// The lowest-numbered directory holding a name of `ino`, or 0.
    fn first_dir_of(&self, ino: Ino) -> Ino {
        self.nodes
            .iter()
            .find(|(_, n)| n.kind == FileKind::Dir && n.entries.values().any(|&i| i == ino))
            .map_or(0, |(&dir, _)| dir)
    }

    /// A name of `ino` moved from `from` to `to` (entries already changed): the home follows
    /// when `from` holds none of its names any more.
    fn move_home(&mut self, ino: Ino, from: Ino, to: Ino) {
        if from != to && self.nodes[&ino].parent == from && self.names_in(from, ino) == 0 {
            self.node(ino).parent = to;
        }
    }

    /// The name of `ino` in `dir` is gone (its entry already removed).
    fn drop_link(&mut self, dir: Ino, ino: Ino) {
        let first = self.first_dir_of(ino);
        let left_here = self.names_in(dir, ino);
        let node = self.node(ino);
        node.nlink -= 1;
        if node.nlink == 0 {
            node.parent = 0;
        } else if node.parent == dir && left_here == 0 {
            node.parent = first;
        }
        if node.nlink == 0 && node.open_handles == 0 {
            self.remove(ino);
        }
    }

    fn create(&mut self, dir: Ino, name: &[u8], kind: FileKind) -> Result<Ino, i32> {
        if self.entry(dir, name).is_some() {
            return Err(libc::EEXIST);
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        self.nodes.insert(ino, Node::new(kind, dir));
        self.node(dir).entries.insert(name.to_vec(), ino);
        if kind == FileKind::Dir {
            self.node(dir).nlink += 1;
        }
        Ok(ino)
    }

    fn unlink(&mut self, dir: Ino, name: &[u8]) -> Outcome {
        let ino = self.entry(dir, name).ok_or(libc::ENOENT)?;
        if self.nodes[&ino].kind == FileKind::Dir {
            return Err(libc::EISDIR);
        }
        self.node(dir).entries.remove(name);
        self.drop_link(dir, ino);
        Ok(())
    }

    fn rmdir(&mut self, dir: Ino, name: &[u8]) -> Outcome {
        let ino = self.entry(dir, name).ok_or(libc::ENOENT)?;
        if self.nodes[&ino].kind != FileKind::Dir {
            return Err(libc::ENOTDIR);
        }
        if !self.nodes[&ino].entries.is_empty() {
            return Err(libc::ENOTEMPTY);
        }
        self.node(dir).entries.remove(name);
        self.node(dir).nlink -= 1;
        self.remove(ino);
        Ok(())
    }

    fn rename(
        &mut self,
        dir: Ino,
        name: &[u8],
        new_dir: Ino,
        new_name: &[u8],
        mode: RenameMode,
    ) -> Outcome {
        let src = self.entry(dir, name).ok_or(libc::ENOENT)?;
        let dst = self.entry(new_dir, new_name);
        match (mode, dst) {
            (RenameMode::NoReplace, Some(_)) => return Err(libc::EEXIST),
            (RenameMode::Exchange, None) => return Err(libc::ENOENT),
            _ => {}
        }
        if dst == Some(src) {
            return Ok(());
        }
        let src_is_dir = self.nodes[&src].kind == FileKind::Dir;
        if src_is_dir && self.is_ancestor(src, new_dir) {
            return Err(libc::EINVAL);
        }
        if mode == RenameMode::Exchange {
            let dst = dst.unwrap();
            let dst_is_dir = self.nodes[&dst].kind == FileKind::Dir;
            if dst_is_dir && self.is_ancestor(dst, dir) {
                return Err(libc::EINVAL);
            }
            self.node(dir).entries.insert(name.to_vec(), dst);
            self.node(new_dir).entries.insert(new_name.to_vec(), src);
            if src_is_dir {
                self.node(dir).nlink -= 1;
                self.node(new_dir).nlink += 1;
            }
            if dst_is_dir {
                self.node(new_dir).nlink -= 1;
                self.node(dir).nlink += 1;
            }
            for (ino, from, to) in [(src, dir, new_dir), (dst, new_dir, dir)] {
                self.move_home(ino, from, to);
            }
            return Ok(());
        }
        if let Some(dst) = dst {
            let dst_node = &self.nodes[&dst];
            match (src_is_dir, dst_node.kind == FileKind::Dir) {
                (true, false) => return Err(libc::ENOTDIR),
                (false, true) => return Err(libc::EISDIR),
                (true, true) if !dst_node.entries.is_empty() => return Err(libc::ENOTEMPTY),
                (true, true) => {
                    self.node(new_dir).nlink -= 1;
                    self.remove(dst);
                }
                (false, false) => {
                    self.node(new_dir).entries.remove(new_name);
                    self.drop_link(new_dir, dst);
                }
            }
        }
        self.node(dir).entries.remove(name);
        self.node(new_dir).entries.insert(new_name.to_vec(), src);
        if src_is_dir {
            self.node(dir).nlink -= 1;
            self.node(new_dir).nlink += 1;
        }
        self.move_home(src, dir, new_dir);
        Ok(())
    }

    fn link(&mut self, ino: Ino, new_dir: Ino, new_name: &[u8]) -> Outcome {
        if self.nodes[&ino].kind == FileKind::Dir {
            return Err(libc::EPERM);
        }
        if self.entry(new_dir, new_name).is_some() {
            return Err(libc::EEXIST);
        }
        self.node(new_dir).entries.insert(new_name.to_vec(), ino);
        let node = self.node(ino);
        node.nlink += 1;
        if node.parent == 0 {
            node.parent = new_dir;
        }
        Ok(())
    }

    fn file_check(&self, ino: Ino) -> Outcome {
        match self.nodes[&ino].kind {
            FileKind::File => Ok(()),
            FileKind::Dir => Err(libc::EISDIR),
            _ => Err(libc::EINVAL),
        }
    }

    fn truncate(&mut self, ino: Ino, size: u64) -> Outcome {
        self.file_check(ino)?;
        let node = self.node(ino);
        node.size = size;
        node.content.retain(|&pos, _| pos < size);
        Ok(())
    }

    fn commit(&mut self, ino: Ino, chunk: u64, offset: u32, len: u32, slice_id: u64) -> Outcome {
        if let Err(errno) = self.file_check(ino) {
            self.uncommitted.insert(slice_id);
            return Err(errno);
        }
        self.committed.insert(slice_id);
        let start = chunk * CHUNK_SIZE + u64::from(offset);
        let node = self.node(ino);
        for pos in start..start + u64::from(len) {
            node.content.insert(pos, slice_id);
        }
        node.size = node.size.max(start + u64::from(len));
        Ok(())
    }

    fn release(&mut self, ino: Ino) {
        if let Some(node) = self.nodes.get_mut(&ino) {
            node.open_handles -= 1;
            if node.open_handles == 0 && node.nlink == 0 {
                self.remove(ino);
            }
        }
    }
}

struct Harness {
    _db: crate::tests::Db,
    meta: BlockingMeta,
    session: SessionId,
    model: Model,
}

fn outcome<T>(result: Result<T>) -> Outcome {
    result.map(|_| ()).map_err(|e| e.errno())
}

impl Harness {
    fn new() -> Self {
        let db = db();
        let config = MetaConfig {
            deleted_data_delay: Duration::ZERO,
            sync_commits: false,
            ..MetaConfig::default()
        };
        let meta = db.open(config);
        let session = meta.open_session("", "model").unwrap();
        Harness {
            _db: db,
            meta,
            session,
            model: Model::new(),
        }
    }

    /// Runs one operation on both sides and returns (engine, model) outcomes.
    fn step(&mut self, op: &Op) -> (Outcome, Outcome) {
        let (meta, model, session) = (&self.meta, &mut self.model, self.session);
        let file = |kind| NewNode {
            kind,
            mode: 0o644,
            uid: 1,
            gid: 1,
            rdev: 0,
        };
        match *op {
            Op::Create(d, n) => {
                let dir = model.dir(d);
                let got = meta.mknod(dir, NAMES[n], &file(FileKind::File));
                let want = model.create(dir, NAMES[n], FileKind::File);
                check_created(got, want)
            }
            Op::Mkdir(d, n) => {
                let dir = model.dir(d);
                let got = meta.mkdir(dir, NAMES[n], 0o755, 1, 1);
                let want = model.create(dir, NAMES[n], FileKind::Dir);
                check_created(got, want)
            }
            Op::Unlink(d, n) => {
                let dir = model.dir(d);
                (
                    outcome(meta.unlink(dir, NAMES[n])),
                    model.unlink(dir, NAMES[n]),
                )
            }
            Op::Rmdir(d, n) => {
                let dir = model.dir(d);
                (
                    outcome(meta.rmdir(dir, NAMES[n])),
                    model.rmdir(dir, NAMES[n]),
                )
            }
            Op::Rename(d, n, d2, n2, mode) => {
                let (dir, new_dir) = (model.dir(d), model.dir(d2));
                let got = meta.rename(dir, NAMES[n], new_dir, NAMES[n2], mode);
                (
                    outcome(got),
                    model.rename(dir, NAMES[n], new_dir, NAMES[n2], mode),
                )
            }
            Op::Link(d, n, d2, n2) => {
                let (dir, new_dir) = (model.dir(d), model.dir(d2));
                let Some(ino) = model.entry(dir, NAMES[n]) else {
                    return (Ok(()), Ok(()));
                };
                (
                    outcome(meta.link(ino, new_dir, NAMES[n2])),
                    model.link(ino, new_dir, NAMES[n2]),
                )
            }
            Op::Truncate(target, s) => {
                let Some(ino) = model.target(target) else {
                    return (Ok(()), Ok(()));
                };
                let changes = SetAttr {
                    size: Some(SIZES[s]),
                    ..SetAttr::default()
                };
                (
                    outcome(meta.setattr(ino, &changes)),
                    model.truncate(ino, SIZES[s]),
                )
            }
            Op::Commit(target, chunk, offset, len) => {
                let Some(ino) = model.target(target) else {
                    return (Ok(()), Ok(()));
                };
                let slice_id = meta.allocate_slice_ids(session, 1).unwrap().start;
                let slice = Slice {
                    slice_id,
                    offset_in_chunk: offset,
                    len,
                    gateway_id: [1; 16],
                };
                meta.record_pending_slice(session, &slice).unwrap();
                let got = meta.commit_slice(session, ino, chunk, &slice, 0, &CommitAttrs::at(0));
                (
                    outcome(got),
                    model.commit(ino, chunk, offset, len, slice_id),
                )
            }
            Op::Open(d, n) => {
                let dir = model.dir(d);
                let Some(ino) = model.entry(dir, NAMES[n]) else {
                    return (Ok(()), Ok(()));
                };
                model.node(ino).open_handles += 1;
                model.handles.push(ino);
                (outcome(meta.open(session, ino)), Ok(()))
            }
            Op::Release(index) => {
                if model.handles.is_empty() {
                    return (Ok(()), Ok(()));
                }
                let ino = model.handles.remove(index % model.handles.len());
                model.release(ino);
                (outcome(meta.release(session, &[ino])), Ok(()))
            }
        }
    }

    /// Compares everything observable.
    fn check(&self) -> Result<(), TestCaseError> {
        let (meta, model) = (&self.meta, &self.model);
        for (&ino, node) in &model.nodes {
            let attr = meta
                .getattr(ino)
                .map_err(|e| TestCaseError::fail(format!("getattr {ino}: {e}")))?;
            prop_assert_eq!(
                (attr.kind, attr.nlink),
                (node.kind, node.nlink),
                "inode {}",
                ino
            );
            if node.kind == FileKind::File {
                prop_assert_eq!(attr.size, node.size, "size of {}", ino);
                self.check_content(ino, node)?;
            }
            if node.kind == FileKind::Dir {
                prop_assert_eq!(meta.lookup(ino, b"..").unwrap().ino, node.parent);
                // Small pages, so paging is exercised on every listing.
                let mut listed = BTreeMap::new();
                let mut cookie = 0;
                loop {
                    let page = meta.readdir(ino, cookie, 2).unwrap();
                    let Some(last) = page.last() else { break };
                    cookie = last.cookie;
                    for entry in page {
                        let previous = listed.insert(entry.name.clone(), entry.attr.ino);
                        prop_assert!(previous.is_none(), "{:?} listed twice", entry.name);
                        prop_assert_eq!(entry.attr, meta.getattr(entry.attr.ino).unwrap());
                    }
                }
                prop_assert_eq!(&listed, &node.entries, "listing of {}", ino);
                for (name, &child) in &node.entries {
                    prop_assert_eq!(meta.lookup(ino, name).unwrap().ino, child);
                }
            }
        }
        for &ino in &model.removed {
            prop_assert_eq!(
                meta.getattr(ino).map_err(|e| e.errno()).err(),
                Some(libc::ENOENT),
                "{} is gone",
                ino
            );
        }
        self.check_cleanup()?;
        self.check_usage()?;
        let statfs = meta.statfs().unwrap();
        let used: u64 = model
            .nodes
            .values()
            .filter(|n| n.kind == FileKind::File)
            .map(|n| n.size)
            .sum();
        prop_assert_eq!(
            (statfs.files, statfs.used_bytes),
            (model.nodes.len() as u64, used)
        );
        let by_tenant = meta.tenant_usage().unwrap();
        prop_assert_eq!(
            (
                by_tenant.iter().map(|t| t.files).sum::<u64>(),
                by_tenant.iter().map(|t| t.bytes).sum::<u64>()
            ),
            (statfs.files, statfs.used_bytes),
            "the tenants' totals add up to the file system's"
        );
        Ok(())
    }

    /// `dir_usage` of every directory: what the nodes below it count for in their homes.
    fn check_usage(&self) -> Result<(), TestCaseError> {
        let model = &self.model;
        let mut own: BTreeMap<Ino, DirUsage> = BTreeMap::new();
        for (&ino, node) in &model.nodes {
            if ino == ROOT_INO || node.parent == 0 {
                continue;
            }
            let stats = own.entry(node.parent).or_default();
            match node.kind {
                FileKind::Dir => stats.dirs += 1,
                FileKind::File => {
                    stats.files += 1;
                    stats.bytes += node.size;
                }
                _ => stats.files += 1,
            }
        }
        for (&dir, node) in &model.nodes {
            if node.kind != FileKind::Dir {
                continue;
            }
            let mut want = DirUsage::default();
            for (&ino, other) in &model.nodes {
                if other.kind == FileKind::Dir && model.is_ancestor(dir, ino) {
                    let stats = own.get(&ino).copied().unwrap_or_default();
                    want.files += stats.files;
                    want.dirs += stats.dirs;
                    want.bytes += stats.bytes;
                }
            }
            prop_assert_eq!(self.meta.dir_usage(dir).unwrap(), want, "du of {}", dir);
        }
        Ok(())
    }

    fn check_content(&self, ino: Ino, node: &Node) -> Result<(), TestCaseError> {
        for chunk in 0..CHUNKS {
            let slices = self.meta.read_chunk(ino, chunk).unwrap();
            for offset in 0..u64::from(SPAN) {
                let pos = chunk * CHUNK_SIZE + offset;
                let visible = slices
                    .iter()
                    .rev()
                    .find(|s| u64::from(s.offset_in_chunk) <= offset && offset < s.end_in_chunk())
                    .map_or(0, |s| s.slice_id);
                let got = if pos < node.size { visible } else { 0 };
                let want = node.content.get(&pos).copied().unwrap_or(0);
                prop_assert_eq!(got, want, "inode {} byte {}", ino, pos);
            }
        }
        Ok(())
    }

    fn check_cleanup(&self) -> Result<(), TestCaseError> {
        let (meta, model) = (&self.meta, &self.model);
        let queued: BTreeSet<u64> = meta
            .take_due_deleted_slices(None, i64::MAX, usize::MAX)
            .unwrap()
            .iter()
            .map(|d| d.slice_id)
            .collect();
        let mut referenced = BTreeSet::new();
        let mut visible = BTreeSet::new();
        for (&ino, node) in &model.nodes {
            if node.kind != FileKind::File {
                continue;
            }
            visible.extend(node.content.values().copied());
            for chunk in 0..CHUNKS {
                for slice in meta.read_chunk(ino, chunk).unwrap() {
                    if slice.slice_id != Slice::HOLE_ID {
                        prop_assert!(
                            referenced.insert(slice.slice_id),
                            "slice {} referenced twice",
                            slice.slice_id
                        );
                    }
                }
            }
        }
        prop_assert!(referenced.is_disjoint(&queued), "queued while referenced");
        prop_assert!(
            visible.is_subset(&referenced),
            "a visible slice is not referenced"
        );
        let accounted: BTreeSet<u64> = referenced.union(&queued).copied().collect();
        prop_assert_eq!(
            &accounted,
            &model.committed,
            "every committed slice is referenced or queued"
        );
        Ok(())
    }
}

fn check_created(got: Result<Attr>, want: Result<Ino, i32>) -> (Outcome, Outcome) {
    match (got, want) {
        (Ok(attr), Ok(ino)) if attr.ino != ino => (Ok(()), Err(-(attr.ino as i32))),
        (got, want) => (outcome(got), want.map(|_| ())),
    }
}

/// `PROPTEST_CASES`, else the backend's default (`super::MODEL_CASES`: a shared database costs
/// a fresh database and network round trips per case).
fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(super::MODEL_CASES)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn engine_matches_the_reference_model(ops in proptest::collection::vec(op(), 1..60)) {
        let mut harness = Harness::new();
        for (step, op) in ops.iter().enumerate() {
            let (got, want) = harness.step(op);
            prop_assert_eq!(got, want, "step {}: {:?}", step, op);
            harness.check()?;
        }
        // A dying client's handles go with its session; unlinked open files go with them.
        harness.meta.close_session(harness.session).unwrap();
        let model = &mut harness.model;
        for ino in std::mem::take(&mut model.handles) {
            model.release(ino);
        }
        model.committed.append(&mut model.uncommitted);
        harness.check()?;
    }
}
