//! Model-based test of the file-system core: random sequences of open, write, read, truncate,
//! rename, unlink, link, fsync, release, drain and cross-mount checks, run against [`Fs`] (the
//! real metadata engine in-process, the in-memory gateway and store) and against a reference file
//! system kept in memory. Every answer must match: bytes, sizes, link counts and errnos.
//!
//! Offsets are sparse on purpose: around the first block boundary, the 64 MiB chunk boundary and
//! the end of the second chunk, so writes cross blocks and chunks while the files stay small in
//! memory (the reference keeps extents, not whole files).
//!
//! Open handles survive unlink and rename (their reads must still see the data), and a second
//! mount checks close-to-open: after an `fsync` on the first mount, an `open` on the second sees
//! exactly the reference bytes. `PROPTEST_CASES` changes the number of cases (default below).

use std::collections::{BTreeMap, HashMap};

use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

use super::super::layout::{BLOCK_SIZE, CHUNK_SIZE};
use super::super::*;
use super::{pattern, World};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const NAMES: [&[u8]; 3] = [b"a", b"b", b"c"];
/// Cases per run unless `PROPTEST_CASES` says otherwise: enough to find the regressions found so
/// far within seconds, few enough for `cargo test` on two cores.
const DEFAULT_CASES: u32 = 48;

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_CASES)
}

#[derive(Debug, Clone)]
enum Op {
    Open {
        name: usize,
        create: bool,
        truncate: bool,
        append: bool,
    },
    Write {
        handle: usize,
        offset: Pos,
        len: usize,
        seed: u8,
    },
    Read {
        handle: usize,
        offset: Pos,
        len: u32,
    },
    Truncate {
        handle: usize,
        size: Pos,
    },
    Rename {
        from: usize,
        to: usize,
        flags: u32,
    },
    Unlink {
        name: usize,
    },
    Link {
        from: usize,
        to: usize,
    },
    Fsync {
        handle: usize,
    },
    Release {
        handle: usize,
    },
    /// The gateway uploads every staged block and drops it: reads go to the object store.
    Drain,
    /// Commit the file on mount A, then open and read it on mount B.
    CheckOtherMount {
        name: usize,
    },
}

/// A position in a file: absolute, or relative to the file's size when the operation runs, so
/// reads and truncations land where the data is (and just past it) however the file grew.
#[derive(Debug, Clone, Copy)]
enum Pos {
    At(u64),
    /// `size * sixteenths / 16 + plus`: up to 16 sixteenths inside the file, more past its end.
    Relative {
        sixteenths: u64,
        plus: u64,
    },
}

impl Pos {
    fn resolve(self, size: u64) -> u64 {
        match self {
            Pos::At(offset) => offset,
            Pos::Relative { sixteenths, plus } => size * sixteenths / 16 + plus,
        }
    }
}

fn pos() -> impl Strategy<Value = Pos> {
    prop_oneof![
        1 => offset().prop_map(Pos::At),
        1 => (0u64..24, prop_oneof![Just(0u64), 0..64 * KIB])
            .prop_map(|(sixteenths, plus)| Pos::Relative { sixteenths, plus }),
    ]
}

/// Offsets that matter: the start, the first block boundary, the chunk boundary, the end of the
/// second chunk.
fn offset() -> impl Strategy<Value = u64> {
    prop_oneof![
        3 => 0..256 * KIB,
        2 => (BLOCK_SIZE - 64 * KIB)..(BLOCK_SIZE + 64 * KIB),
        3 => (CHUNK_SIZE - 300 * KIB)..(CHUNK_SIZE + 64 * KIB),
        1 => (2 * CHUNK_SIZE - 5 * MIB)..(2 * CHUNK_SIZE + MIB),
    ]
}

fn write_len() -> impl Strategy<Value = usize> {
    prop_oneof![
        6 => 1usize..8 * 1024,
        3 => 1usize..512 * 1024,
        1 => (BLOCK_SIZE as usize - 4096)..(BLOCK_SIZE as usize + 100 * 1024),
    ]
}

fn read_len() -> impl Strategy<Value = u32> {
    prop_oneof![
        2 => 1u32..4096,
        2 => 1u32..300 * 1024,
        1 => 1u32..2 * 1024 * 1024,
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let name = || 0..NAMES.len();
    let handle = || 0usize..4;
    prop_oneof![
        4 => (name(), prop::bool::weighted(0.7), prop::bool::weighted(0.15), prop::bool::weighted(0.2))
            .prop_map(|(name, create, truncate, append)| Op::Open { name, create, truncate, append }),
        6 => (handle(), prop_oneof![3 => offset().prop_map(Pos::At), 1 => pos()], write_len(), any::<u8>())
            .prop_map(|(handle, offset, len, seed)| Op::Write { handle, offset, len, seed }),
        5 => (handle(), pos(), read_len())
            .prop_map(|(handle, offset, len)| Op::Read { handle, offset, len }),
        2 => (handle(), prop_oneof![(0..128 * KIB).prop_map(Pos::At), pos()])
            .prop_map(|(handle, size)| Op::Truncate { handle, size }),
        1 => (name(), name(), prop_oneof![
                Just(0),
                Just(libc::RENAME_NOREPLACE),
                Just(libc::RENAME_EXCHANGE),
            ])
            .prop_map(|(from, to, flags)| Op::Rename { from, to, flags }),
        1 => name().prop_map(|name| Op::Unlink { name }),
        1 => (name(), name()).prop_map(|(from, to)| Op::Link { from, to }),
        2 => handle().prop_map(|handle| Op::Fsync { handle }),
        2 => handle().prop_map(|handle| Op::Release { handle }),
        1 => Just(Op::Drain),
        1 => name().prop_map(|name| Op::CheckOtherMount { name }),
    ]
}

/// A file's bytes as non-overlapping extents; everything else below `size` is zeros.
#[derive(Debug, Default)]
struct SparseFile {
    size: u64,
    extents: BTreeMap<u64, Vec<u8>>,
}

impl SparseFile {
    fn write(&mut self, offset: u64, data: &[u8]) {
        let end = offset + data.len() as u64;
        self.cut(offset, end);
        self.extents.insert(offset, data.to_vec());
        self.size = self.size.max(end);
    }

    /// Forgets bytes `[start, end)`, keeping the parts of extents outside it.
    fn cut(&mut self, start: u64, end: u64) {
        let overlapping: Vec<u64> = self
            .extents
            .range(..end)
            .filter(|(&s, d)| s + d.len() as u64 > start)
            .map(|(&s, _)| s)
            .collect();
        for s in overlapping {
            let Some(d) = self.extents.remove(&s) else {
                continue;
            };
            let e = s + d.len() as u64;
            if s < start {
                self.extents.insert(s, d[..(start - s) as usize].to_vec());
            }
            if e > end {
                self.extents.insert(end, d[(end - s) as usize..].to_vec());
            }
        }
    }

    fn truncate(&mut self, size: u64) {
        if size < self.size {
            self.cut(size, u64::MAX);
        }
        self.size = size;
    }

    fn read(&self, offset: u64, len: u64) -> Vec<u8> {
        if offset >= self.size {
            return Vec::new();
        }
        let end = offset.saturating_add(len).min(self.size);
        let mut out = vec![0; (end - offset) as usize];
        for (&s, d) in self.extents.range(..end) {
            let from = s.max(offset);
            let to = (s + d.len() as u64).min(end);
            if from < to {
                out[(from - offset) as usize..(to - offset) as usize]
                    .copy_from_slice(&d[(from - s) as usize..(to - s) as usize]);
            }
        }
        out
    }

    /// Ranges worth comparing: around every extent, the start and the end of the file.
    fn ranges_to_check(&self) -> Vec<(u64, u64)> {
        let mut ranges = vec![(0, 4096), (self.size.saturating_sub(4096), 4096 + 10)];
        for (&s, d) in &self.extents {
            let start = s.saturating_sub(64);
            ranges.push((start, s + d.len() as u64 + 64 - start));
        }
        ranges
    }
}

struct Node {
    ino: Ino,
    data: SparseFile,
}

struct ModelHandle {
    node: usize,
    fh: FileHandle,
    append: bool,
}

/// The reference file system: names of the root directory, files, open handles of mount A.
#[derive(Default)]
struct Model {
    names: HashMap<usize, usize>,
    nodes: Vec<Node>,
    handles: Vec<ModelHandle>,
}

impl Model {
    fn handle(&self, index: usize) -> Option<usize> {
        (!self.handles.is_empty()).then(|| index % self.handles.len())
    }

    fn nlink(&self, node: usize) -> u32 {
        self.names.values().filter(|&&n| n == node).count() as u32
    }
}

fn config() -> FsConfig {
    // Small limits, so writes also commit on their own now and then.
    FsConfig {
        max_dirty_bytes_per_file: 6 * MIB,
        max_dirty_slices_per_file: 6,
        block_cache_bytes: 16 << 20,
        ..FsConfig::default()
    }
}

fn fail(what: String) -> TestCaseError {
    TestCaseError::fail(what)
}

/// `Ok` for the errno expected, a test failure for anything else.
fn expect_errno<T: std::fmt::Debug>(result: FsResult<T>, errno: i32) -> Result<(), TestCaseError> {
    match result {
        Err(e) if e.errno() == errno => Ok(()),
        other => Err(fail(format!("expected errno {errno}, got {other:?}"))),
    }
}

fn ok<T>(result: FsResult<T>) -> Result<T, TestCaseError> {
    result.map_err(|e| fail(format!("unexpected error (errno {}): {e}", e.errno())))
}

fn same_bytes(got: &[u8], expected: &[u8], offset: u64) -> Result<(), TestCaseError> {
    if got.len() != expected.len() {
        return Err(fail(format!(
            "read at {offset}: {} bytes, expected {}",
            got.len(),
            expected.len()
        )));
    }
    if let Some(i) = got.iter().zip(expected).position(|(g, e)| g != e) {
        return Err(fail(format!(
            "read at {offset}: byte {} (file offset {}) is {}, expected {}",
            i,
            offset + i as u64,
            got[i],
            expected[i]
        )));
    }
    Ok(())
}

/// Bytes on either side of a change that are read back at once through the same handle.
const VERIFY_MARGIN: u64 = 8 * KIB;

/// Reads `[start, end)` through model handle `h` and compares it with the reference.
async fn read_back(
    a: &Fs,
    model: &Model,
    h: usize,
    start: u64,
    end: u64,
) -> Result<(), TestCaseError> {
    let handle = &model.handles[h];
    let len = (end - start).min(u64::from(u32::MAX));
    let got = ok(a.read(handle.fh, start, len as u32).await)?;
    same_bytes(&got, &model.nodes[handle.node].data.read(start, len), start)
        .map_err(|e| fail(format!("reading back: {e}")))
}

async fn apply(
    world: &World,
    a: &Fs,
    b: &Fs,
    model: &mut Model,
    op: &Op,
) -> Result<(), TestCaseError> {
    match *op {
        Op::Open {
            name,
            create,
            truncate,
            append,
        } => {
            let mut flags = libc::O_RDWR;
            if truncate {
                flags |= libc::O_TRUNC;
            }
            if append {
                flags |= libc::O_APPEND;
            }
            match model.names.get(&name).copied() {
                Some(node) => {
                    let attr = ok(a.lookup(ROOT_INO, NAMES[name]).await)?;
                    prop_assert_eq!(attr.ino, model.nodes[node].ino);
                    prop_assert_eq!(attr.size, model.nodes[node].data.size, "size by lookup");
                    prop_assert_eq!(attr.nlink, model.nlink(node));
                    let (fh, _) = ok(a.open(attr.ino, flags).await)?;
                    if truncate {
                        model.nodes[node].data.truncate(0);
                    }
                    model.handles.push(ModelHandle { node, fh, append });
                }
                None if create => {
                    let (attr, fh) = ok(a.create(ROOT_INO, NAMES[name], 0o644, 0, 0, flags).await)?;
                    model.nodes.push(Node {
                        ino: attr.ino,
                        data: SparseFile::default(),
                    });
                    let node = model.nodes.len() - 1;
                    model.names.insert(name, node);
                    model.handles.push(ModelHandle { node, fh, append });
                }
                None => expect_errno(a.lookup(ROOT_INO, NAMES[name]).await, libc::ENOENT)?,
            }
        }
        Op::Write {
            handle,
            offset,
            len,
            seed,
        } => {
            let Some(h) = model.handle(handle) else {
                return Ok(());
            };
            let (fh, node, append) = {
                let h = &model.handles[h];
                (h.fh, h.node, h.append)
            };
            let file = &mut model.nodes[node].data;
            let offset = if append {
                file.size
            } else {
                offset.resolve(file.size)
            };
            let data = pattern(seed, offset, len);
            prop_assert_eq!(ok(a.write(fh, offset, &data).await)?, len as u32);
            file.write(offset, &data);
            let end = offset + len as u64;
            read_back(
                a,
                model,
                h,
                offset.saturating_sub(VERIFY_MARGIN),
                end + VERIFY_MARGIN,
            )
            .await?;
        }
        Op::Read {
            handle,
            offset,
            len,
        } => {
            let Some(h) = model.handle(handle) else {
                return Ok(());
            };
            let h = &model.handles[h];
            let offset = offset.resolve(model.nodes[h.node].data.size);
            let got = ok(a.read(h.fh, offset, len).await)?;
            same_bytes(
                &got,
                &model.nodes[h.node].data.read(offset, u64::from(len)),
                offset,
            )?;
        }
        Op::Truncate { handle, size } => {
            let Some(h) = model.handle(handle) else {
                return Ok(());
            };
            let node = model.handles[h].node;
            let size = size.resolve(model.nodes[node].data.size);
            let changes = SetAttr {
                size: Some(size),
                ..SetAttr::default()
            };
            let old_size = model.nodes[node].data.size;
            // Read where the cut will be first, so the handle knows the file as it was.
            read_back(
                a,
                model,
                h,
                size.saturating_sub(VERIFY_MARGIN),
                size + VERIFY_MARGIN,
            )
            .await?;
            let attr = ok(a.setattr(model.nodes[node].ino, &changes).await)?;
            prop_assert_eq!(attr.size, size);
            model.nodes[node].data.truncate(size);
            // Around the cut and the old end: bytes cut off must not come back when grown.
            for at in [size, old_size] {
                read_back(
                    a,
                    model,
                    h,
                    at.saturating_sub(VERIFY_MARGIN),
                    at + VERIFY_MARGIN,
                )
                .await?;
            }
        }
        Op::Rename { from, to, flags } => {
            let result = a
                .rename(ROOT_INO, NAMES[from], ROOT_INO, NAMES[to], flags)
                .await;
            let (source, target) = (
                model.names.get(&from).copied(),
                model.names.get(&to).copied(),
            );
            match (source, target) {
                (None, _) => expect_errno(result, libc::ENOENT)?,
                (Some(_), Some(_)) if flags == libc::RENAME_NOREPLACE => {
                    expect_errno(result, libc::EEXIST)?
                }
                (Some(_), None) if flags == libc::RENAME_EXCHANGE => {
                    expect_errno(result, libc::ENOENT)?
                }
                // Two names of one file (or one name twice): nothing happens.
                (Some(s), Some(t)) if s == t => ok(result)?,
                (Some(s), Some(t)) if flags == libc::RENAME_EXCHANGE => {
                    ok(result)?;
                    model.names.insert(from, t);
                    model.names.insert(to, s);
                }
                (Some(s), _) => {
                    ok(result)?;
                    model.names.remove(&from);
                    model.names.insert(to, s);
                }
            }
        }
        Op::Unlink { name } => {
            let result = a.unlink(ROOT_INO, NAMES[name]).await;
            match model.names.remove(&name) {
                Some(_) => ok(result)?,
                None => expect_errno(result, libc::ENOENT)?,
            }
        }
        Op::Link { from, to } => {
            let Some(node) = model.names.get(&from).copied() else {
                return expect_errno(a.lookup(ROOT_INO, NAMES[from]).await, libc::ENOENT);
            };
            let result = a.link(model.nodes[node].ino, ROOT_INO, NAMES[to]).await;
            match model.names.entry(to) {
                std::collections::hash_map::Entry::Occupied(_) => {
                    expect_errno(result, libc::EEXIST)?
                }
                std::collections::hash_map::Entry::Vacant(vacant) => {
                    let attr = ok(result)?;
                    vacant.insert(node);
                    prop_assert_eq!(attr.nlink, model.nlink(node));
                }
            }
        }
        Op::Fsync { handle } => {
            if let Some(h) = model.handle(handle) {
                ok(a.fsync(model.handles[h].fh, false).await)?;
            }
        }
        Op::Release { handle } => {
            if let Some(h) = model.handle(handle) {
                let h = model.handles.remove(h);
                ok(a.release(h.fh, None).await)?;
            }
        }
        Op::Drain => world.drain().await,
        Op::CheckOtherMount { name } => check_other_mount(a, b, model, name).await?,
    }
    Ok(())
}

/// Commits the file on mount A, then mount B must see the reference's size, links and bytes.
async fn check_other_mount(
    a: &Fs,
    b: &Fs,
    model: &Model,
    name: usize,
) -> Result<(), TestCaseError> {
    let Some(node) = model.names.get(&name).copied() else {
        return expect_errno(b.lookup(ROOT_INO, NAMES[name]).await, libc::ENOENT);
    };
    for h in model.handles.iter().filter(|h| h.node == node) {
        ok(a.fsync(h.fh, false).await)?;
    }
    let file = &model.nodes[node].data;
    let attr = ok(b.lookup(ROOT_INO, NAMES[name]).await)?;
    prop_assert_eq!(attr.ino, model.nodes[node].ino);
    prop_assert_eq!(attr.size, file.size, "size on the other mount");
    prop_assert_eq!(attr.nlink, model.nlink(node));
    let (fh, _) = ok(b.open(attr.ino, libc::O_RDONLY).await)?;
    for (offset, len) in file.ranges_to_check() {
        let got = ok(b.read(fh, offset, len as u32).await)?;
        same_bytes(&got, &file.read(offset, len), offset)?;
    }
    ok(b.release(fh, None).await)
}

async fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let world = World::new().await;
    let a = world.mount(config()).await;
    let b = world.mount(config()).await;
    let mut model = Model::default();
    for (step, op) in ops.iter().enumerate() {
        apply(&world, &a, &b, &mut model, op)
            .await
            .map_err(|e| fail(format!("step {step}, {op:?}: {e}")))?;
    }
    // Close everything: then every name must read back identically on the other mount.
    for h in std::mem::take(&mut model.handles) {
        ok(a.release(h.fh, None).await)?;
    }
    for (name, text) in NAMES.iter().enumerate() {
        check_other_mount(&a, &b, &model, name)
            .await
            .map_err(|e| fail(format!("after closing everything, {text:?}: {e}")))?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        max_shrink_iters: 4096,
        ..ProptestConfig::default()
    })]

    #[test]
    fn fs_matches_the_reference_model(ops in prop::collection::vec(op(), 1..60)) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| fail(format!("runtime: {e}")))?;
        runtime.block_on(run(ops))?;
    }
}
