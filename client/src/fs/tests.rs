//! Tests of the file-system core, without FUSE.
//!
//! - Block math and slice resolution on their own.
//! - [`Fs`] against the real metadata engine in-process ([`LocalMeta`] on a temporary redb
//!   file), the in-memory gateway ([`MemoryBlocks`]) and an in-memory object store: data across
//!   chunk boundaries, close-to-open between two mounts, truncation, `O_APPEND`/`O_TRUNC`,
//!   unlinked open files, blocks read back from the store, gateway failures, namespace calls.
//! - [`GrpcBlocks`] against a fake `Staging` server that acknowledges out of order.
//! - `model`: the model-based property test against an in-memory reference file system.

mod model;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use object_store::memory::InMemory;
use proto::staging::staging_server::{Staging, StagingServer};
use proto::staging::*;
use shared::BlockKey;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use super::cache::BlockCache;
use super::layout::{
    block_count, block_len, block_pieces, chunk_pieces, resolve, ChunkPiece, Segment, Source,
    BLOCK_SIZE, CHUNK_SIZE,
};
use super::meta_local::{LocalMeta, LOCAL_GATEWAY_ID};
use super::*;

/// A block of chunk 0 of inode 2, staged by `gateway_id`.
fn home_on(gateway_id: GatewayId) -> BlockHome {
    BlockHome {
        gateway_id,
        ino: 2,
        chunk_index: 0,
    }
}

const MIB: u64 = 1024 * 1024;

// --- layout ---

fn slice(slice_id: u64, offset_in_chunk: u32, len: u32) -> Slice {
    Slice {
        slice_id,
        offset_in_chunk,
        len,
        gateway_id: [1; 16],
    }
}

fn data(slice_id: u64, slice_len: u64, offset_in_slice: u64, start: u64, len: u64) -> Segment {
    Segment {
        start,
        len,
        source: Source::Slice {
            slice_id,
            slice_len,
            offset_in_slice,
            gateway_id: [1; 16],
        },
    }
}

fn zeros(start: u64, len: u64) -> Segment {
    Segment {
        start,
        len,
        source: Source::Zeros,
    }
}

#[test]
fn chunk_pieces_split_at_chunk_boundaries() {
    assert!(chunk_pieces(5, 0).is_empty());
    assert_eq!(
        chunk_pieces(CHUNK_SIZE - 10, 30),
        vec![
            ChunkPiece {
                chunk_index: 0,
                offset_in_chunk: CHUNK_SIZE - 10,
                len: 10,
                offset_in_range: 0
            },
            ChunkPiece {
                chunk_index: 1,
                offset_in_chunk: 0,
                len: 20,
                offset_in_range: 10
            },
        ]
    );
    let pieces = chunk_pieces(CHUNK_SIZE, 2 * CHUNK_SIZE + 1);
    assert_eq!(pieces.len(), 3);
    assert_eq!((pieces[2].chunk_index, pieces[2].len), (3, 1));
    // The end of the address space does not wrap.
    let last = chunk_pieces(u64::MAX - 5, 100);
    assert_eq!(last.iter().map(|p| p.len).sum::<u64>(), 5);
}

#[test]
fn blocks_of_a_slice_are_full_but_the_last() {
    assert_eq!(block_count(0), 0);
    assert_eq!(block_count(1), 1);
    assert_eq!(block_count(BLOCK_SIZE), 1);
    assert_eq!(block_count(BLOCK_SIZE + 1), 2);
    assert_eq!(block_len(BLOCK_SIZE + 1, 0), BLOCK_SIZE);
    assert_eq!(block_len(BLOCK_SIZE + 1, 1), 1);
    assert_eq!(block_len(BLOCK_SIZE + 1, 2), 0);
    assert_eq!(block_len(CHUNK_SIZE, 15), BLOCK_SIZE);
}

#[test]
fn block_pieces_cover_exactly_the_bytes_read() {
    let len = 2 * BLOCK_SIZE + 100;
    let pieces = block_pieces(42, len, BLOCK_SIZE - 10, BLOCK_SIZE + 50);
    assert_eq!(pieces.len(), 3);
    assert_eq!(
        pieces[0].key,
        BlockKey::new(42, 0, BLOCK_SIZE as u32).unwrap()
    );
    assert_eq!(pieces[0].range_in_block(), BLOCK_SIZE - 10..BLOCK_SIZE);
    assert_eq!(
        pieces[1].key,
        BlockKey::new(42, 1, BLOCK_SIZE as u32).unwrap()
    );
    assert_eq!(pieces[1].range_in_block(), 0..BLOCK_SIZE);
    assert_eq!(pieces[1].offset_in_read, 10);
    assert_eq!(pieces[2].key, BlockKey::new(42, 2, 100).unwrap());
    assert_eq!(pieces[2].range_in_block(), 0..40);
    assert_eq!(pieces[2].offset_in_read, BLOCK_SIZE + 10);
    // Past the end of the slice: nothing.
    assert!(block_pieces(42, len, len, 10).is_empty());
    assert_eq!(block_pieces(42, len, len - 5, 10)[0].len, 5);
}

#[test]
fn later_slices_shadow_earlier_ones() {
    let slices = [slice(1, 0, 100), slice(2, 50, 20), slice(3, 90, 30)];
    assert_eq!(
        resolve(&slices, 0..130),
        vec![
            data(1, 100, 0, 0, 50),
            data(2, 20, 0, 50, 20),
            data(1, 100, 70, 70, 20),
            data(3, 30, 0, 90, 30),
            zeros(120, 10),
        ]
    );
    // A range inside one slice starts at the right offset of it.
    assert_eq!(resolve(&slices, 60..65), vec![data(2, 20, 10, 60, 5)]);
}

#[test]
fn holes_and_gaps_read_as_zeros() {
    let slices = [
        slice(1, 0, 100),
        slice(Slice::HOLE_ID, 40, 60),
        slice(2, 200, 10),
    ];
    assert_eq!(
        resolve(&slices, 0..250),
        vec![
            data(1, 100, 0, 0, 40),
            zeros(40, 60),
            zeros(100, 100),
            data(2, 10, 0, 200, 10),
            zeros(210, 40),
        ]
    );
    assert_eq!(resolve(&[], 5..10), vec![zeros(5, 5)]);
    // An empty or malformed slice claims nothing.
    assert_eq!(resolve(&[slice(9, 10, 0)], 0..20), vec![zeros(0, 20)]);
}

#[test]
fn resolution_of_every_byte_matches_a_byte_map() {
    // Paint a byte map slice by slice in commit order; resolution must agree everywhere.
    let slices = [
        slice(1, 10, 50),
        slice(2, 0, 20),
        slice(Slice::HOLE_ID, 15, 10),
        slice(3, 30, 5),
        slice(4, 55, 30),
    ];
    let mut painted = [(0u64, 0u64); 100];
    for s in &slices {
        for at in s.offset_in_chunk..s.offset_in_chunk + s.len {
            painted[at as usize] = (s.slice_id, u64::from(at - s.offset_in_chunk));
        }
    }
    let segments = resolve(&slices, 0..100);
    let mut at = 0;
    for segment in segments {
        assert_eq!(segment.start, at, "segments are sorted and contiguous");
        for i in 0..segment.len {
            let expected = painted[(segment.start + i) as usize];
            let got = match segment.source {
                Source::Zeros => (0, expected.1 * u64::from(expected.0 != 0)),
                Source::Slice {
                    slice_id,
                    offset_in_slice,
                    ..
                } => (slice_id, offset_in_slice + i),
            };
            let expected = if expected.0 == 0 { (0, 0) } else { expected };
            let got = if got.0 == 0 { (0, 0) } else { got };
            assert_eq!(got, expected, "byte {}", segment.start + i);
        }
        at += segment.len;
    }
    assert_eq!(at, 100);
}

#[test]
fn cache_holds_blocks_within_its_bytes() {
    let key = |id| BlockKey::new(id, 0, 1000).unwrap();
    let block = |id: u64| Bytes::from(vec![id as u8; 1000]);
    let cache = BlockCache::new(10_000);
    for id in 0..100 {
        cache.insert(key(id), block(id));
    }
    let (blocks, bytes) = cache.usage();
    assert!(bytes <= 10_000, "{blocks} blocks, {bytes} bytes held");
    assert!(blocks > 0, "a cache with room holds something");
    // What it holds is what was put under that key.
    for id in 0..100 {
        if let Some(data) = cache.get(&key(id)) {
            assert_eq!(data, block(id));
        }
    }
    let empty = BlockCache::new(0);
    empty.insert(key(1), block(1));
    assert_eq!(empty.usage(), (0, 0));
}

// --- the core against the in-process engine ---

/// The shared world of one test: engine, gateway and store, which any number of mounts use.
pub(super) struct World {
    _dir: tempfile::TempDir,
    pub meta: LocalMeta,
    pub blocks: Arc<MemoryBlocks>,
    pub store: Arc<InMemory>,
}

impl World {
    pub async fn new() -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        World {
            meta: LocalMeta::open(dir.path()).await,
            _dir: dir,
            blocks: Arc::new(MemoryBlocks::new()),
            store: Arc::new(InMemory::new()),
        }
    }

    /// A new mount: its own session, the world's engine, gateway and store.
    pub async fn mount(&self, config: FsConfig) -> Fs {
        let grant = self.meta.open_session("test mount").await.expect("session");
        Fs::new(
            Arc::new(self.meta.for_session(grant.session_id)),
            self.blocks.clone(),
            self.store.clone(),
            &grant,
            config,
        )
    }

    /// Moves every staged block to the store, as an upload that then drops them would.
    pub async fn drain(&self) {
        self.blocks
            .drain_to(self.store.as_ref())
            .await
            .expect("drain to store");
    }
}

/// Bytes that depend on their position in the file, so a misplaced block shows.
pub(super) fn pattern(seed: u8, file_offset: u64, len: usize) -> Vec<u8> {
    (file_offset..file_offset + len as u64)
        .map(|p| (p as u8) ^ ((p >> 9) as u8).wrapping_mul(31) ^ ((p >> 20) as u8) ^ seed)
        .collect()
}

const RW: i32 = libc::O_RDWR;

async fn create(fs: &Fs, name: &str) -> (Attr, FileHandle) {
    fs.create(ROOT_INO, name.as_bytes(), 0o644, 0, 0, RW)
        .await
        .expect("create")
}

/// Opens `name` on `fs`, reads `len` bytes at `offset`, releases.
async fn read_path(fs: &Fs, name: &str, offset: u64, len: u32) -> Vec<u8> {
    let attr = fs.lookup(ROOT_INO, name.as_bytes()).await.expect("lookup");
    let (fh, _) = fs.open(attr.ino, libc::O_RDONLY).await.expect("open");
    let bytes = fs.read(fh, offset, len).await.expect("read");
    fs.release(fh, None).await.expect("release");
    bytes
}

fn errno<T: std::fmt::Debug>(result: FsResult<T>) -> i32 {
    result.expect_err("must fail").errno()
}

#[tokio::test]
async fn small_file_is_visible_to_another_mount_after_close() {
    let world = World::new().await;
    let a = world.mount(FsConfig::default()).await;
    let b = world.mount(FsConfig::default()).await;
    let (attr, fh) = create(&a, "f").await;
    assert_eq!(a.write(fh, 0, b"hello world").await.unwrap(), 11);
    // Not committed yet: mount A sees its own write, B does not.
    assert_eq!(a.getattr(attr.ino).await.unwrap().size, 11);
    assert_eq!(a.read(fh, 6, 100).await.unwrap(), b"world");
    assert_eq!(b.getattr(attr.ino).await.unwrap().size, 0);
    a.release(fh, None).await.unwrap();
    assert_eq!(b.getattr(attr.ino).await.unwrap().size, 11);
    assert_eq!(read_path(&b, "f", 0, 100).await, b"hello world");
    assert_eq!(world.blocks.len(), 1, "one slice, one block");
}

#[tokio::test]
async fn a_file_across_chunks_round_trips_and_no_slice_crosses_a_chunk() {
    let world = World::new().await;
    let a = world.mount(FsConfig::default()).await;
    let (attr, fh) = create(&a, "big").await;
    // 70 MiB in writes of 1 MiB + 3 bytes, so no write is aligned to blocks or chunks.
    let total = 70 * MIB;
    let step = MIB as usize + 3;
    let mut at = 0u64;
    while at < total {
        let len = step.min((total - at) as usize);
        a.write(fh, at, &pattern(1, at, len)).await.unwrap();
        at += len as u64;
    }
    a.release(fh, None).await.unwrap();
    for chunk in 0..2 {
        let slices = world.meta.read_chunk(attr.ino, chunk).await.unwrap();
        assert!(!slices.is_empty());
        for s in slices {
            assert!(s.end_in_chunk() <= CHUNK_SIZE, "{s:?} crosses a chunk");
            assert_eq!(s.gateway_id, LOCAL_GATEWAY_ID);
        }
    }
    for key in world.blocks.keys() {
        assert!(key.len() <= BLOCK_SIZE);
    }
    let b = world.mount(FsConfig::default()).await;
    assert_eq!(b.lookup(ROOT_INO, b"big").await.unwrap().size, total);
    let (fh, _) = b.open(attr.ino, libc::O_RDONLY).await.unwrap();
    // Read sequentially in 1 MiB reads, the way the kernel would.
    let mut at = 0u64;
    while at < total {
        let got = b.read(fh, at, MIB as u32).await.unwrap();
        assert_eq!(got.len() as u64, MIB.min(total - at));
        assert!(
            got == pattern(1, at, got.len()),
            "bytes at {at} differ from what was written"
        );
        at += got.len() as u64;
    }
    assert!(b.read(fh, total, 10).await.unwrap().is_empty());
    b.release(fh, None).await.unwrap();
}

#[tokio::test]
async fn sequential_reads_prefetch_the_next_block() {
    let world = World::new().await;
    let a = world.mount(FsConfig::default()).await;
    let (attr, fh) = create(&a, "seq").await;
    let len = 3 * BLOCK_SIZE as usize;
    a.write(fh, 0, &pattern(2, 0, len)).await.unwrap();
    a.release(fh, None).await.unwrap();
    let b = world
        .mount(FsConfig {
            readahead_blocks: 1,
            ..FsConfig::default()
        })
        .await;
    let (fh, _) = b.open(attr.ino, libc::O_RDONLY).await.unwrap();
    assert_eq!(
        b.read(fh, 0, 128 * 1024).await.unwrap(),
        pattern(2, 0, 128 * 1024)
    );
    // The first block was fetched whole; the second is coming in the background.
    for _ in 0..100 {
        if b.fetcher.cached_blocks() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(b.fetcher.cached_blocks(), 2);
    // A random read far away fetches only its bytes and caches nothing.
    let far = 2 * BLOCK_SIZE + 12345;
    assert_eq!(b.read(fh, far, 1000).await.unwrap(), pattern(2, far, 1000));
    assert_eq!(b.fetcher.cached_blocks(), 2);
    b.release(fh, None).await.unwrap();
}

#[tokio::test]
async fn sparse_writes_and_truncation_read_zeros_where_nothing_is() {
    let world = World::new().await;
    let a = world.mount(FsConfig::default()).await;
    let (attr, fh) = create(&a, "sparse").await;
    let far = 2 * CHUNK_SIZE + 5;
    a.write(fh, far, b"tail").await.unwrap();
    a.write(fh, 10, b"head").await.unwrap();
    a.fsync(fh, false).await.unwrap();
    assert_eq!(a.getattr(attr.ino).await.unwrap().size, far + 4);
    let hole = a.read(fh, 0, 4096).await.unwrap();
    assert_eq!(&hole[10..14], b"head");
    assert!(hole[..10].iter().chain(&hole[14..]).all(|&b| b == 0));
    assert_eq!(a.read(fh, far - 2, 10).await.unwrap(), b"\0\0tail");
    // Shrink into the head, then grow again: the cut bytes must not come back.
    let shrink = SetAttr {
        size: Some(12),
        ..SetAttr::default()
    };
    assert_eq!(a.setattr(attr.ino, &shrink).await.unwrap().size, 12);
    assert_eq!(a.read(fh, 0, 100).await.unwrap()[10..], *b"he");
    let grow = SetAttr {
        size: Some(CHUNK_SIZE * 3),
        ..SetAttr::default()
    };
    a.setattr(attr.ino, &grow).await.unwrap();
    let after = a.read(fh, 10, 8).await.unwrap();
    assert_eq!(after, b"he\0\0\0\0\0\0");
    assert_eq!(a.read(fh, far, 4).await.unwrap(), vec![0; 4]);
    a.release(fh, None).await.unwrap();
}

#[tokio::test]
async fn truncate_while_dirty_applies_after_the_writes() {
    let world = World::new().await;
    let a = world.mount(FsConfig::default()).await;
    let (attr, fh) = create(&a, "t").await;
    a.write(fh, 0, &[7; 1000]).await.unwrap();
    let shrink = SetAttr {
        size: Some(100),
        ..SetAttr::default()
    };
    a.setattr(attr.ino, &shrink).await.unwrap();
    a.write(fh, 200, &[8; 10]).await.unwrap();
    a.release(fh, None).await.unwrap();
    let b = world.mount(FsConfig::default()).await;
    let got = read_path(&b, "t", 0, 1000).await;
    assert_eq!(got.len(), 210);
    assert!(got[..100].iter().all(|&b| b == 7));
    assert!(got[100..200].iter().all(|&b| b == 0));
    assert!(got[200..].iter().all(|&b| b == 8));
}

#[tokio::test]
async fn append_and_truncating_opens() {
    let world = World::new().await;
    let a = world.mount(FsConfig::default()).await;
    let (attr, fh) = create(&a, "log").await;
    a.write(fh, 0, b"one ").await.unwrap();
    a.release(fh, None).await.unwrap();
    let (appender, _) = a
        .open(attr.ino, libc::O_WRONLY | libc::O_APPEND)
        .await
        .unwrap();
    // The offset is ignored: appends go to the end.
    a.write(appender, 0, b"two ").await.unwrap();
    a.write(appender, 1, b"three").await.unwrap();
    a.release(appender, None).await.unwrap();
    assert_eq!(read_path(&a, "log", 0, 100).await, b"one two three");
    let (reader, _) = a.open(attr.ino, libc::O_RDONLY).await.unwrap();
    assert_eq!(errno(a.write(reader, 0, b"x").await), libc::EBADF);
    let (writer, _) = a.open(attr.ino, libc::O_WRONLY).await.unwrap();
    assert_eq!(errno(a.read(writer, 0, 1).await), libc::EBADF);
    let (truncating, attr_after) = a
        .open(attr.ino, libc::O_RDWR | libc::O_TRUNC)
        .await
        .unwrap();
    assert_eq!(attr_after.size, 0);
    assert!(a.read(reader, 0, 100).await.unwrap().is_empty());
    for fh in [reader, writer, truncating] {
        a.release(fh, None).await.unwrap();
    }
    assert_eq!(errno(a.release(reader, None).await), libc::EBADF);
}

#[tokio::test]
async fn an_unlinked_file_stays_readable_through_its_open_handle() {
    let world = World::new().await;
    let a = world.mount(FsConfig::default()).await;
    let (attr, fh) = create(&a, "doomed").await;
    a.write(fh, 0, b"still here").await.unwrap();
    a.flush(fh).await.unwrap();
    a.write(fh, 10, b", and more").await.unwrap();
    a.unlink(ROOT_INO, b"doomed").await.unwrap();
    assert_eq!(errno(a.lookup(ROOT_INO, b"doomed").await), libc::ENOENT);
    assert_eq!(a.read(fh, 0, 100).await.unwrap(), b"still here, and more");
    a.fsync(fh, false).await.unwrap();
    assert_eq!(a.getattr(attr.ino).await.unwrap().nlink, 0);
    assert_eq!(a.read(fh, 0, 100).await.unwrap(), b"still here, and more");
    a.release(fh, None).await.unwrap();
    a.releases.flush().await;
    assert_eq!(errno(a.getattr(attr.ino).await), libc::ENOENT);
}

#[tokio::test]
async fn the_releases_of_a_window_go_to_the_engine_as_one_call() {
    let world = World::new().await;
    let a = world
        .mount(FsConfig {
            release_window: Duration::from_secs(3600),
            ..FsConfig::default()
        })
        .await;
    let (doomed, first) = create(&a, "doomed").await;
    let (second, _) = a.open(doomed.ino, libc::O_RDONLY).await.unwrap();
    let (kept, third) = create(&a, "kept").await;
    a.unlink(ROOT_INO, b"doomed").await.unwrap();
    for fh in [first, second, third] {
        a.release(fh, None).await.unwrap();
    }
    assert_eq!(world.meta.calls("release"), 0, "gathered for the window");
    assert_eq!(
        a.getattr(doomed.ino).await.unwrap().nlink,
        0,
        "the engine still counts the unlinked file's handles"
    );

    a.releases.flush().await;
    assert_eq!(world.meta.calls("release"), 1, "three handles, one call");
    assert_eq!(errno(a.getattr(doomed.ino).await), libc::ENOENT);
    assert_eq!(
        errno(world.meta.release(a.session(), &[kept.ino]).await),
        libc::EBADF,
        "kept's handle was given back too"
    );

    // A handle the engine does not count (an open that a gateway crash lost) refuses the
    // whole call; the others still go, one by one.
    let (other, fh) = create(&a, "other").await;
    a.unlink(ROOT_INO, b"other").await.unwrap();
    a.release(fh, None).await.unwrap();
    a.releases.give_back(kept.ino).await;
    a.releases.flush().await;
    assert_eq!(errno(a.getattr(other.ino).await), libc::ENOENT);
}

#[tokio::test]
async fn a_window_closes_by_itself() {
    let world = World::new().await;
    let a = world
        .mount(FsConfig {
            release_window: Duration::from_millis(20),
            ..FsConfig::default()
        })
        .await;
    let (doomed, fh) = create(&a, "doomed").await;
    a.unlink(ROOT_INO, b"doomed").await.unwrap();
    a.release(fh, None).await.unwrap();
    // However slow this machine is, the call comes without anything else asking for it.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while world.meta.calls("release") == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the window's call never came"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    a.releases.flush().await;
    assert_eq!(world.meta.calls("release"), 1);
    assert_eq!(errno(a.getattr(doomed.ino).await), libc::ENOENT);
}

#[tokio::test]
async fn blocks_the_gateway_dropped_are_read_from_the_store() {
    let world = World::new().await;
    let a = world.mount(FsConfig::default()).await;
    let (_, fh) = create(&a, "uploaded").await;
    let len = BLOCK_SIZE as usize + 777;
    a.write(fh, 0, &pattern(3, 0, len)).await.unwrap();
    a.release(fh, None).await.unwrap();
    world.drain().await;
    assert!(world.blocks.is_empty());
    let b = world.mount(FsConfig::default()).await;
    assert_eq!(
        read_path(&b, "uploaded", 0, len as u32 + 10).await,
        pattern(3, 0, len)
    );
}

#[tokio::test]
async fn a_block_nobody_holds_is_an_io_error() {
    let world = World::new().await;
    let a = world.mount(FsConfig::default()).await;
    let (_, fh) = create(&a, "lost").await;
    a.write(fh, 0, b"gone").await.unwrap();
    a.release(fh, None).await.unwrap();
    // Drain into a store nobody reads, so neither the gateway nor the store has the block.
    world.blocks.drain_to(&InMemory::new()).await.unwrap();
    let b = world.mount(FsConfig::default()).await;
    let attr = b.lookup(ROOT_INO, b"lost").await.unwrap();
    let (fh, _) = b.open(attr.ino, libc::O_RDONLY).await.unwrap();
    assert_eq!(errno(b.read(fh, 0, 4).await), libc::EIO);
    b.release(fh, None).await.unwrap();
}

#[tokio::test]
async fn a_failing_gateway_fails_fsync_and_keeps_the_data_for_a_retry() {
    let world = World::new().await;
    let a = world.mount(FsConfig::default()).await;
    let (_, fh) = create(&a, "retry").await;
    world.blocks.set_fail_writes(true);
    let len = BLOCK_SIZE as usize * 2 + 10;
    a.write(fh, 0, &pattern(4, 0, len)).await.unwrap();
    assert_eq!(errno(a.fsync(fh, false).await), libc::EIO);
    assert_eq!(errno(a.flush(fh).await), libc::EIO);
    // Still readable locally, not visible elsewhere.
    assert_eq!(a.read(fh, 0, 20).await.unwrap(), pattern(4, 0, 20));
    let b = world.mount(FsConfig::default()).await;
    assert_eq!(b.lookup(ROOT_INO, b"retry").await.unwrap().size, 0);
    world.blocks.set_fail_writes(false);
    a.fsync(fh, false).await.unwrap();
    assert_eq!(
        read_path(&b, "retry", 0, len as u32).await,
        pattern(4, 0, len)
    );
    a.release(fh, None).await.unwrap();
}

#[tokio::test]
async fn small_slices_go_with_their_commit_and_a_lost_answer_commits_a_fresh_copy() {
    let mut world = World::new().await;
    world.meta = world.meta.clone().with_staging(world.blocks.clone());
    let a = world.mount(FsConfig::default()).await;
    let (attr, fh) = create(&a, "log").await;
    a.write(fh, 0, b"first row\n").await.unwrap();
    a.fsync(fh, false).await.unwrap();
    assert_eq!(world.meta.slices_written(), 1);
    assert_eq!(world.blocks.len(), 1);

    // The next call commits but its answer is lost: fsync fails, and the retry commits the same
    // bytes under a fresh id, which shadows the first copy; no id is in the chunk twice.
    world.meta.lose_next_write_slice_answer();
    a.write(fh, 10, b"second row\n").await.unwrap();
    assert_eq!(errno(a.fsync(fh, false).await), libc::EIO);
    a.fsync(fh, false).await.unwrap();
    assert_eq!(world.meta.slices_written(), 3);
    let slices = world.meta.read_chunk(attr.ino, 0).await.unwrap();
    let mut ids: Vec<u64> = slices.iter().map(|s| s.slice_id).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), slices.len(), "{slices:?}");
    a.release(fh, None).await.unwrap();
    let b = world.mount(FsConfig::default()).await;
    assert_eq!(
        read_path(&b, "log", 0, 64).await,
        b"first row\nsecond row\n"
    );

    // Large slices still stream their blocks first and commit after.
    let (_, fh) = create(&a, "big").await;
    let len = BLOCK_SIZE as usize + 10;
    a.write(fh, 0, &pattern(9, 0, len)).await.unwrap();
    a.release(fh, None).await.unwrap();
    assert_eq!(world.meta.slices_written(), 3);
    assert_eq!(
        read_path(&b, "big", 0, len as u32).await,
        pattern(9, 0, len)
    );
}

#[tokio::test]
async fn a_small_file_reads_back_on_its_own_mount_without_a_fetch() {
    let mut world = World::new().await;
    world.meta = world.meta.clone().with_staging(world.blocks.clone());
    let a = world.mount(FsConfig::default()).await;
    let (attr, fh) = create(&a, "module.py").await;
    a.write(fh, 0, b"print('hello')\n").await.unwrap();
    a.release(fh, None).await.unwrap();
    assert_eq!(world.meta.slices_written(), 1);
    let (fh, _) = a.open(attr.ino, libc::O_RDONLY).await.unwrap();
    assert_eq!(a.read(fh, 0, 4096).await.unwrap(), b"print('hello')\n");
    a.release(fh, None).await.unwrap();
    assert_eq!(
        world.blocks.reads(),
        0,
        "the mount that wrote the block read it from its cache"
    );

    // Another mount has no copy: it fetches the block from the gateway.
    let b = world.mount(FsConfig::default()).await;
    assert_eq!(read_path(&b, "module.py", 0, 64).await, b"print('hello')\n");
    assert!(
        world.blocks.reads() > 0,
        "the other mount fetched the block"
    );
}

/// A file opened to be read gets its first chunk with the open: the read asks nothing more.
/// The chunk is as new as the open (close-to-open), and not taken while a handle of this mount
/// is open on the file (its commits may be newer) nor by a truncating open.
#[tokio::test]
async fn an_open_brings_the_first_chunk_and_the_read_asks_no_more() {
    let world = World::new().await;
    let a = world.mount(FsConfig::default()).await;
    let b = world.mount(FsConfig::default()).await;
    let (attr, fh) = create(&a, "f").await;
    a.write(fh, 0, b"first").await.unwrap();
    a.release(fh, None).await.unwrap();
    let asked = world.meta.calls("read_chunk");
    assert_eq!(read_path(&b, "f", 0, 64).await, b"first");
    assert_eq!(
        world.meta.calls("read_chunk"),
        asked,
        "the open brought chunk 0"
    );

    // A write on a elsewhere after b's handle closed: b's next open sees it.
    let (fh, _) = a.open(attr.ino, RW).await.unwrap();
    a.write(fh, 0, b"SECOND").await.unwrap();
    a.release(fh, None).await.unwrap();
    assert_eq!(read_path(&b, "f", 0, 64).await, b"SECOND");

    // With a handle open on b, a second open takes no chunk from its answer: b's own write,
    // committed through the first handle, is what the second reads.
    let (writer, _) = b.open(attr.ino, RW).await.unwrap();
    b.write(writer, 0, b"third!").await.unwrap();
    let (reader, _) = b.open(attr.ino, libc::O_RDONLY).await.unwrap();
    b.flush(writer).await.unwrap();
    assert_eq!(b.read(reader, 0, 64).await.unwrap(), b"third!");
    b.release(reader, None).await.unwrap();
    b.release(writer, None).await.unwrap();
    assert_eq!(read_path(&a, "f", 0, 64).await, b"third!");

    // A chunk past the first is asked for as before.
    let (big, fh) = create(&a, "big").await;
    let at = shared::layout::CHUNK_SIZE;
    a.write(fh, at, b"far").await.unwrap();
    a.release(fh, None).await.unwrap();
    let asked = world.meta.calls("read_chunk");
    let (fh, _) = b.open(big.ino, libc::O_RDONLY).await.unwrap();
    assert_eq!(b.read(fh, at, 16).await.unwrap(), b"far");
    assert_eq!(b.read(fh, 0, 4).await.unwrap(), vec![0; 4]);
    b.release(fh, None).await.unwrap();
    assert_eq!(world.meta.calls("read_chunk"), asked + 1, "chunk 1 only");
}

/// A directory this mount made answers lookups of names it did not add as absent without
/// asking (its lease), names it added are asked about, and another mount's addition recalls the
/// lease first: once that file is closed, this mount finds it (close-to-open), and it asks
/// about every name of that directory from then on.
#[tokio::test]
async fn a_directory_made_here_answers_absent_names_until_another_mount_adds_one() {
    let world = World::new().await;
    let a = world.mount(FsConfig::default()).await;
    let b = world.mount(FsConfig::default()).await;
    let dir = a.mkdir(ROOT_INO, b"d", 0o755, 0, 0).await.unwrap().ino;
    let asked = world.meta.calls("lookup");
    for name in ["x", "y", "mine"] {
        assert_eq!(errno(a.lookup(dir, name.as_bytes()).await), libc::ENOENT);
    }
    assert_eq!(world.meta.calls("lookup"), asked, "answered by the lease");

    let (mine, fh) = a.create(dir, b"mine", 0o644, 0, 0, RW).await.unwrap();
    a.release(fh, None).await.unwrap();
    let sub = a.mkdir(dir, b"sub", 0o755, 0, 0).await.unwrap().ino;
    assert_eq!(a.lookup(dir, b"mine").await.unwrap().ino, mine.ino);
    assert_eq!(a.lookup(dir, b"sub").await.unwrap().ino, sub);
    assert_eq!(
        world.meta.calls("lookup"),
        asked + 2,
        "its own names are asked about"
    );
    assert_eq!(errno(a.lookup(sub, b"deeper").await), libc::ENOENT);
    assert_eq!(
        world.meta.calls("lookup"),
        asked + 2,
        "a new directory's lease"
    );

    // Another mount's create waits for the recall; a has stopped answering from the lease
    // before the file exists.
    let (theirs, fh) = b.create(dir, b"theirs", 0o644, 0, 0, RW).await.unwrap();
    b.write(fh, 0, b"from b").await.unwrap();
    b.release(fh, None).await.unwrap();
    assert_eq!(a.lookup(dir, b"theirs").await.unwrap().ino, theirs.ino);
    assert_eq!(read_path_in(&a, dir, "theirs").await, b"from b");
    let before = world.meta.calls("lookup");
    assert_eq!(errno(a.lookup(dir, b"x").await), libc::ENOENT);
    assert_eq!(world.meta.calls("lookup"), before + 1, "the lease is gone");

    // b renames a file into the other leased directory: seen there at once.
    b.rename(dir, b"theirs", sub, b"moved", 0).await.unwrap();
    assert_eq!(a.lookup(sub, b"moved").await.unwrap().ino, theirs.ino);
}

/// Opens `name` in directory `dir` on `fs`, reads it whole (up to 64 KiB), releases.
async fn read_path_in(fs: &Fs, dir: Ino, name: &str) -> Vec<u8> {
    let attr = fs.lookup(dir, name.as_bytes()).await.expect("lookup");
    let (fh, _) = fs.open(attr.ino, libc::O_RDONLY).await.expect("open");
    let data = fs.read(fh, 0, 64 * 1024).await.expect("read");
    fs.release(fh, None).await.expect("release");
    data
}

#[tokio::test]
async fn a_write_refused_at_the_dirty_limit_takes_nothing() {
    let world = World::new().await;
    let config = FsConfig {
        max_dirty_slices_per_file: 2,
        ..FsConfig::default()
    };
    let a = world.mount(config).await;
    let (attr, fh) = create(&a, "limited").await;
    world.blocks.set_fail_writes(true);
    a.write(fh, 0, b"a").await.unwrap();
    // Crosses the limit: its flush fails, but these bytes are taken, so the write succeeds.
    a.write(fh, 100, b"b").await.unwrap();
    // Over the limit already, and the flush fails again: refused before taking anything.
    assert_eq!(errno(a.write(fh, 200, b"c").await), libc::EIO);
    world.blocks.set_fail_writes(false);
    a.fsync(fh, false).await.unwrap();
    let b = world.mount(FsConfig::default()).await;
    assert_eq!(
        b.getattr(attr.ino).await.unwrap().size,
        101,
        "c was not written"
    );
    a.release(fh, None).await.unwrap();
}

#[tokio::test]
async fn too_much_dirty_data_is_committed_by_the_write_that_crosses_the_limit() {
    let world = World::new().await;
    let config = FsConfig {
        max_dirty_bytes_per_file: 2 * BLOCK_SIZE,
        max_dirty_slices_per_file: 4,
        ..FsConfig::default()
    };
    let a = world.mount(config).await;
    let b = world.mount(FsConfig::default()).await;
    let (attr, fh) = create(&a, "bounded").await;
    for i in 0..4u64 {
        // Not contiguous: every write is a slice of its own.
        a.write(fh, i * 100, b"x").await.unwrap();
    }
    assert_eq!(
        b.getattr(attr.ino).await.unwrap().size,
        301,
        "4 slices: committed"
    );
    a.write(fh, 1000, &pattern(5, 1000, 2 * BLOCK_SIZE as usize))
        .await
        .unwrap();
    assert_eq!(
        b.getattr(attr.ino).await.unwrap().size,
        1000 + 2 * BLOCK_SIZE,
        "over the byte limit: committed"
    );
    a.release(fh, None).await.unwrap();
}

#[tokio::test]
async fn overlapping_writes_shadow_in_write_order_across_commits() {
    let world = World::new().await;
    let a = world.mount(FsConfig::default()).await;
    let (_, fh) = create(&a, "layers").await;
    a.write(fh, 0, &[1; 100]).await.unwrap();
    a.write(fh, 50, &[2; 100]).await.unwrap();
    a.write(fh, 20, &[3; 10]).await.unwrap();
    a.flush(fh).await.unwrap();
    a.write(fh, 140, &[4; 20]).await.unwrap();
    let expect = |got: &[u8]| {
        assert!(got[..20].iter().all(|&b| b == 1));
        assert!(got[20..30].iter().all(|&b| b == 3));
        assert!(got[30..50].iter().all(|&b| b == 1));
        assert!(got[50..140].iter().all(|&b| b == 2));
        assert!(got[140..160].iter().all(|&b| b == 4));
        assert_eq!(got.len(), 160);
    };
    expect(&a.read(fh, 0, 1000).await.unwrap());
    a.release(fh, None).await.unwrap();
    let b = world.mount(FsConfig::default()).await;
    expect(&read_path(&b, "layers", 0, 1000).await);
}

#[tokio::test]
async fn namespace_operations_pass_the_engine_errno_through() {
    let world = World::new().await;
    let fs = world.mount(FsConfig::default()).await;
    let dir = fs.mkdir(ROOT_INO, b"d", 0o755, 1, 2).await.unwrap();
    assert_eq!((dir.kind, dir.uid, dir.gid), (FileKind::Dir, 1, 2));
    let fifo = fs
        .mknod(dir.ino, b"pipe", FileKind::Fifo, 0o600, 0, 0, 0)
        .await
        .unwrap();
    assert_eq!(fifo.kind, FileKind::Fifo);
    assert_eq!(errno(fs.open(fifo.ino, RW).await), libc::EINVAL);
    assert_eq!(errno(fs.open(dir.ino, libc::O_RDONLY).await), libc::EISDIR);
    let plain = fs
        .mknod(dir.ino, b"plain", FileKind::File, 0o600, 0, 0, 0)
        .await
        .unwrap();
    assert_eq!(plain.kind, FileKind::File);
    let link = fs
        .symlink(dir.ino, b"ln", b"../target", 0, 0)
        .await
        .unwrap();
    assert_eq!(fs.readlink(link.ino).await.unwrap(), b"../target");
    assert_eq!(errno(fs.rmdir(ROOT_INO, b"d").await), libc::ENOTEMPTY);
    assert_eq!(
        errno(fs.mkdir(ROOT_INO, &[b'n'; 256], 0o755, 0, 0).await),
        libc::ENAMETOOLONG
    );
    assert_eq!(
        errno(fs.lookup(plain.ino, b"x").await),
        libc::ENOTDIR,
        "a path through a file"
    );
    assert_eq!(
        errno(fs.rename(ROOT_INO, b"d", dir.ino, b"inside", 0).await),
        libc::EINVAL
    );
    assert_eq!(
        errno(
            fs.rename(dir.ino, b"pipe", dir.ino, b"plain", libc::RENAME_NOREPLACE)
                .await
        ),
        libc::EEXIST
    );
    fs.rename(dir.ino, b"pipe", dir.ino, b"plain", libc::RENAME_EXCHANGE)
        .await
        .unwrap();
    assert_eq!(
        fs.lookup(dir.ino, b"plain").await.unwrap().kind,
        FileKind::Fifo
    );
    let linked = fs.link(plain.ino, ROOT_INO, b"hard").await.unwrap();
    assert_eq!(linked.nlink, 2);
    assert_eq!(errno(fs.link(dir.ino, ROOT_INO, b"x").await), libc::EPERM);

    // Listing in pages of 2 returns every entry once.
    let mut names = Vec::new();
    let mut cookie = 0;
    loop {
        let page = fs.readdir(dir.ino, cookie, 2).await.unwrap();
        names.extend(page.iter().map(|e| e.name.clone()));
        match page.last() {
            Some(last) if page.len() == 2 => cookie = last.cookie,
            _ => break,
        }
    }
    names.sort();
    assert_eq!(names, [b"ln".to_vec(), b"pipe".to_vec(), b"plain".to_vec()]);

    fs.setxattr(plain.ino, b"user.a", b"1", 0).await.unwrap();
    assert_eq!(
        errno(
            fs.setxattr(plain.ino, b"user.a", b"2", libc::XATTR_CREATE as u32)
                .await
        ),
        libc::EEXIST
    );
    assert_eq!(fs.getxattr(plain.ino, b"user.a").await.unwrap(), b"1");
    assert_eq!(fs.listxattr(plain.ino).await.unwrap(), [b"user.a".to_vec()]);
    fs.removexattr(plain.ino, b"user.a").await.unwrap();
    assert_eq!(
        errno(fs.getxattr(plain.ino, b"user.a").await),
        libc::ENODATA
    );

    let chmod = SetAttr {
        mode: Some(0o4711),
        uid: Some(9),
        ..SetAttr::default()
    };
    let changed = fs.setattr(plain.ino, &chmod).await.unwrap();
    assert_eq!((changed.mode, changed.uid), (0o4711, 9));
    assert!(fs.statfs().await.unwrap().files >= 5);
}

#[tokio::test]
async fn a_read_only_mount_refuses_changes() {
    let world = World::new().await;
    let rw = world.mount(FsConfig::default()).await;
    let (attr, fh) = create(&rw, "f").await;
    rw.write(fh, 0, b"data").await.unwrap();
    rw.release(fh, None).await.unwrap();
    let ro = world
        .mount(FsConfig {
            read_only: true,
            ..FsConfig::default()
        })
        .await;
    assert_eq!(errno(ro.open(attr.ino, RW).await), libc::EROFS);
    assert_eq!(
        errno(ro.open(attr.ino, libc::O_WRONLY | libc::O_TRUNC).await),
        libc::EROFS
    );
    assert_eq!(
        errno(ro.create(ROOT_INO, b"g", 0o644, 0, 0, RW).await),
        libc::EROFS
    );
    assert_eq!(errno(ro.unlink(ROOT_INO, b"f").await), libc::EROFS);
    assert_eq!(
        errno(ro.setattr(attr.ino, &SetAttr::default()).await),
        libc::EROFS
    );
    assert_eq!(read_path(&ro, "f", 0, 10).await, b"data");
}

/// A directory handle serves the kernel's small reads from one engine page, every entry once in
/// cookie order; a listing from the start again (rewinddir) reads the directory afresh.
#[tokio::test]
async fn listings_page_through_one_buffer_and_rewinddir_reads_afresh() {
    let world = World::new().await;
    let fs = world
        .mount(FsConfig {
            capability_absence_ttl: Duration::from_secs(60),
            ..FsConfig::default()
        })
        .await;
    for i in 0..1200 {
        let (_, fh) = create(&fs, &format!("f{i:04}")).await;
        fs.release(fh, None).await.unwrap();
    }
    let dh = fs.opendir();
    let (mut after, mut names) = (0, Vec::new());
    loop {
        let (entries, end) = fs.readdir_at(dh, ROOT_INO, after).await.unwrap();
        // The kernel takes a few entries of each answer, then asks from the last it took.
        for entry in entries.iter().take(7) {
            names.push(String::from_utf8(entry.name.clone()).unwrap());
            after = entry.cookie;
        }
        if end && entries.len() <= 7 {
            break;
        }
    }
    let want: Vec<String> = (0..1200).map(|i| format!("f{i:04}")).collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(sorted, want, "every entry once");
    let (_, fh) = create(&fs, "late").await;
    fs.release(fh, None).await.unwrap();
    let (first, _) = fs.readdir_at(dh, ROOT_INO, 0).await.unwrap();
    assert!(
        first.len() == LISTING_PAGE as usize || first.iter().any(|e| e.name == b"late"),
        "rewinddir sees the directory as it is now"
    );
    let mut all = Vec::new();
    let mut after = 0;
    loop {
        let (entries, end) = fs.readdir_at(dh, ROOT_INO, after).await.unwrap();
        all.extend(entries.iter().map(|e| e.name.clone()));
        after = entries.last().map_or(after, |e| e.cookie);
        if end {
            break;
        }
    }
    assert!(
        all.iter().any(|n| n == b"late"),
        "the new entry is listed after a rewind"
    );
    fs.releasedir(dh);
}

#[tokio::test]
async fn shutdown_commits_open_files_and_closes_the_session() {
    let world = World::new().await;
    let a = world.mount(FsConfig::default()).await;
    let (_, fh) = create(&a, "open at unmount").await;
    a.write(fh, 0, b"saved").await.unwrap();
    let (_, closed) = create(&a, "closed before").await;
    a.release(closed, None).await.unwrap();
    a.shutdown().await.unwrap();
    assert_eq!(
        world.meta.calls("release"),
        1,
        "both handles given back in one call before the session closed"
    );
    use gateway::meta::MetaEngine;
    assert!(world
        .meta
        .engine()
        .list_sessions()
        .await
        .unwrap()
        .is_empty());
    let b = world.mount(FsConfig::default()).await;
    assert_eq!(read_path(&b, "open at unmount", 0, 10).await, b"saved");
}

// --- gRPC error decoding ---

#[test]
fn meta_errors_carry_the_errno_of_the_metadata_key() {
    let mut status = Status::failed_precondition("directory 5 is not empty");
    status
        .metadata_mut()
        .insert(proto::ERRNO_METADATA_KEY, "39".parse().unwrap());
    let error = meta_grpc::status_error("rmdir", &status);
    assert_eq!(error.errno(), libc::ENOTEMPTY);
    // Without the key, the code decides; a lost connection is EIO and transient.
    assert_eq!(
        meta_grpc::status_error("lookup", &Status::not_found("x")).errno(),
        libc::ENOENT
    );
    let unreachable = meta_grpc::status_error("lookup", &Status::unavailable("refused"));
    assert_eq!(unreachable.errno(), libc::EIO);
    assert!(unreachable.is_transient());
}

// --- GrpcBlocks against a fake gateway ---

/// A `Staging` server that holds blocks in memory and acknowledges later requests sooner, so
/// acknowledgements come back out of order. Slice id 666 is refused as if the device were full.
#[derive(Clone, Default)]
struct FakeGateway {
    blocks: Arc<Mutex<HashMap<String, Bytes>>>,
}

const FULL_SLICE: u64 = 666;

type Answer<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl Staging for FakeGateway {
    async fn write_block(
        &self,
        _: Request<Streaming<WriteBlockRequest>>,
    ) -> Answer<WriteBlockResponse> {
        Err(Status::unimplemented("fake"))
    }

    type WriteBlocksStream =
        tokio_stream::wrappers::ReceiverStream<Result<WriteBlocksResponse, Status>>;

    async fn write_blocks(
        &self,
        request: Request<Streaming<WriteBlocksRequest>>,
    ) -> Answer<Self::WriteBlocksStream> {
        let mut requests = request.into_inner();
        let (acks, out) = tokio::sync::mpsc::channel(64);
        let blocks = self.blocks.clone();
        tokio::spawn(async move {
            let mut arrival = 0u64;
            while let Some(Ok(request)) = requests.next().await {
                arrival += 1;
                let (acks, blocks) = (acks.clone(), blocks.clone());
                tokio::spawn(async move {
                    // Later arrivals wait less: acknowledgements overtake each other.
                    let wait = 300u64.saturating_sub(arrival * 100);
                    tokio::time::sleep(Duration::from_millis(wait)).await;
                    let header = request.header.unwrap_or_default();
                    let key: BlockKey = header.key.parse().unwrap();
                    let code = if key.slice_id == FULL_SLICE {
                        tonic::Code::ResourceExhausted
                    } else if crc32c::crc32c(&request.data) != header.crc32c {
                        tonic::Code::DataLoss
                    } else {
                        blocks.lock().unwrap().insert(header.key, request.data);
                        tonic::Code::Ok
                    };
                    let _ = acks
                        .send(Ok(WriteBlocksResponse {
                            request_id: request.request_id,
                            code: code as i32,
                            message: String::new(),
                            sequence: arrival,
                        }))
                        .await;
                });
            }
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            out,
        )))
    }

    async fn read_block(&self, request: Request<ReadBlockRequest>) -> Answer<ReadBlockResponse> {
        let request = request.into_inner();
        let blocks = self.blocks.lock().unwrap();
        let Some(block) = blocks.get(&request.key) else {
            return Err(Status::not_found("not staged here"));
        };
        let end = (request.offset + request.length).min(block.len() as u64);
        let data = block.slice(request.offset as usize..end as usize);
        Ok(Response::new(ReadBlockResponse {
            crc32c: crc32c::crc32c(&data),
            data,
            state: BlockState::Staged as i32,
        }))
    }

    async fn stat_blocks(&self, _: Request<StatBlocksRequest>) -> Answer<StatBlocksResponse> {
        Err(Status::unimplemented("fake"))
    }
    async fn wait_uploaded(&self, _: Request<WaitUploadedRequest>) -> Answer<WaitUploadedResponse> {
        Err(Status::unimplemented("fake"))
    }
    async fn delete_blocks(&self, _: Request<DeleteBlocksRequest>) -> Answer<DeleteBlocksResponse> {
        Err(Status::unimplemented("fake"))
    }
    async fn drain(&self, _: Request<DrainRequest>) -> Answer<DrainResponse> {
        Err(Status::unimplemented("fake"))
    }
    async fn status(&self, _: Request<StatusRequest>) -> Answer<StatusResponse> {
        Err(Status::unimplemented("fake"))
    }
    async fn retry_quarantined(
        &self,
        _: Request<RetryQuarantinedRequest>,
    ) -> Answer<RetryQuarantinedResponse> {
        Err(Status::unimplemented("fake"))
    }
    async fn set_uploads_paused(
        &self,
        _: Request<SetUploadsPausedRequest>,
    ) -> Answer<SetUploadsPausedResponse> {
        Err(Status::unimplemented("fake"))
    }

    async fn collect_garbage(
        &self,
        _: Request<proto::staging::CollectGarbageRequest>,
    ) -> Answer<proto::staging::CollectGarbageResponse> {
        Err(Status::unimplemented("fake"))
    }

    async fn warmup(
        &self,
        _: Request<proto::staging::WarmupRequest>,
    ) -> Answer<proto::staging::WarmupResponse> {
        Err(Status::unimplemented("fake"))
    }
}

async fn serve_fake(gateway: FakeGateway) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(
                StagingServer::new(gateway)
                    .max_decoding_message_size(proto::MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(proto::MAX_MESSAGE_BYTES),
            )
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_blocks_match_out_of_order_acknowledgements_to_their_writes() {
    let fake = FakeGateway::default();
    let addr = serve_fake(fake.clone()).await;
    let channel = connect_gateway(&addr.to_string(), &GatewayAccess::default())
        .await
        .unwrap();
    let blocks = Arc::new(GrpcBlocks::new(channel));
    let keys: Vec<BlockKey> = (1..=3)
        .map(|id| BlockKey::new(id, 0, 1000 + id as u32).unwrap())
        .collect();
    let writes = keys.iter().map(|&key| {
        let blocks = blocks.clone();
        async move {
            let data = Bytes::from(pattern(key.slice_id as u8, 0, key.len() as usize));
            blocks.write_block(7, key, data).await
        }
    });
    for result in futures::future::join_all(writes).await {
        result.unwrap();
    }
    assert_eq!(fake.blocks.lock().unwrap().len(), 3);
    for key in &keys {
        let got = blocks
            .read_block(*key, 10..20, &home_on(LOCAL_GATEWAY_ID), false)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&got[..], &pattern(key.slice_id as u8, 10, 10)[..]);
    }
    let unknown = BlockKey::new(99, 0, 10).unwrap();
    assert!(blocks
        .read_block(unknown, 0..10, &home_on(LOCAL_GATEWAY_ID), false)
        .await
        .unwrap()
        .is_none());
    let full = BlockKey::new(FULL_SLICE, 0, 10).unwrap();
    let refused = blocks
        .write_block(7, full, Bytes::from_static(&[0; 10]))
        .await
        .unwrap_err();
    assert_eq!(refused.errno(), libc::ENOSPC);
    assert!(refused.to_string().contains(&full.to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_core_works_over_grpc_blocks() {
    let fake = FakeGateway::default();
    let addr = serve_fake(fake.clone()).await;
    let channel = connect_gateway(&addr.to_string(), &GatewayAccess::default())
        .await
        .unwrap();
    let world = World::new().await;
    let meta: Arc<dyn MetaApi> = Arc::new(world.meta.clone());
    let grant = meta.open_session("grpc").await.unwrap();
    let fs = Fs::new(
        meta,
        Arc::new(GrpcBlocks::new(channel)),
        world.store.clone(),
        &grant,
        FsConfig::default(),
    );
    let (attr, fh) = create(&fs, "over grpc").await;
    let len = 2 * BLOCK_SIZE as usize + 5;
    fs.write(fh, 0, &pattern(6, 0, len)).await.unwrap();
    fs.release(fh, None).await.unwrap();
    assert_eq!(fake.blocks.lock().unwrap().len(), 3);
    let (fh, _) = fs.open(attr.ino, libc::O_RDONLY).await.unwrap();
    assert_eq!(
        fs.read(fh, 0, len as u32).await.unwrap(),
        pattern(6, 0, len)
    );
    fs.release(fh, None).await.unwrap();
}

// --- reads from the gateway that staged a block ---

#[tokio::test]
async fn a_block_is_read_from_the_gateway_that_staged_it_found_through_the_registry() {
    use super::gateways::{Connector, GatewayDirectory, RegistryDirectory};
    use gateway::meta::MetaEngine;
    use std::sync::atomic::{AtomicUsize, Ordering};

    let dir = tempfile::tempdir().unwrap();
    let meta = Arc::new(LocalMeta::open(dir.path()).await);
    let other_id = [9; 16];
    meta.engine()
        .register_gateway(other_id, "other:7070", false)
        .await
        .unwrap();
    let home = Arc::new(MemoryBlocks::new());
    let other = Arc::new(MemoryBlocks::new());
    let key = BlockKey::new(41, 0, 5).unwrap();
    other
        .write_block(7, key, Bytes::from_static(b"hello"))
        .await
        .unwrap();
    let connects = Arc::new(AtomicUsize::new(0));
    let connector: Connector = {
        let (other, connects) = (other.clone(), connects.clone());
        Arc::new(move |address: String| {
            assert_eq!(address, "other:7070");
            connects.fetch_add(1, Ordering::SeqCst);
            let other = other.clone();
            Box::pin(async move { Ok(other as Arc<dyn BlockApi>) })
        })
    };
    let directory = Arc::new(RegistryDirectory::new(
        LOCAL_GATEWAY_ID,
        home.clone(),
        meta.clone(),
        connector,
    ));
    let source = BlockSource::new(directory.clone(), Some(Arc::new(InMemory::new())));

    assert_eq!(
        source.read(key, 1..4, &home_on(other_id)).await.unwrap(),
        "ell"
    );
    assert_eq!(
        source.read(key, 0..5, &home_on(other_id)).await.unwrap(),
        "hello"
    );
    assert_eq!(connects.load(Ordering::SeqCst), 1, "one connection, kept");
    // The mount's own gateway does not hold it: the home id never goes to the registry.
    assert!(source
        .read(key, 0..5, &home_on(LOCAL_GATEWAY_ID))
        .await
        .is_err());
    // An id nobody registered: only the store could have it, and it does not.
    let unknown = source.read(key, 0..5, &home_on([1; 16])).await.unwrap_err();
    assert_eq!(unknown.errno(), libc::EIO, "{unknown}");
    // Forgotten (it failed), the gateway is resolved and connected again.
    directory.forget(&other_id);
    assert_eq!(
        source.read(key, 0..5, &home_on(other_id)).await.unwrap(),
        "hello"
    );
    assert_eq!(connects.load(Ordering::SeqCst), 2);
}

/// Two mounts: `a` answers attributes it knows for a minute, `b` always asks the engine.
async fn remembering_and_asking(world: &World) -> (Fs, Fs) {
    let a = world
        .mount(FsConfig {
            attr_ttl: Duration::from_secs(60),
            ..FsConfig::default()
        })
        .await;
    (a, world.mount(FsConfig::default()).await)
}

/// A directory's attributes after this mount's own creates in it are what the engine holds,
/// without asking it again (the kernel asks before every create); a change made elsewhere shows
/// once the mount changes the directory in a way it does not follow, or after the TTL.
#[tokio::test]
async fn a_directory_s_attributes_follow_the_mount_s_own_creates() {
    let world = World::new().await;
    let (a, b) = remembering_and_asking(&world).await;
    let dir = a.mkdir(ROOT_INO, b"d", 0o755, 0, 0).await.unwrap();
    assert_eq!(a.getattr(dir.ino).await.unwrap(), dir);
    let (_, fh) = a
        .create(dir.ino, b"f", 0o644, 0, 0, RW)
        .await
        .expect("create");
    assert_eq!(
        a.getattr(dir.ino).await.unwrap(),
        b.getattr(dir.ino).await.unwrap()
    );
    a.mkdir(dir.ino, b"sub", 0o755, 0, 0).await.unwrap();
    a.symlink(dir.ino, b"link", b"f", 0, 0).await.unwrap();
    a.mknod(dir.ino, b"fifo", FileKind::Fifo, 0o644, 0, 0, 0)
        .await
        .unwrap();
    let followed = a.getattr(dir.ino).await.unwrap();
    assert_eq!(followed, b.getattr(dir.ino).await.unwrap());
    assert_eq!(followed.nlink, 3, "the subdirectory's link");

    // Changed behind the mount's back: within the TTL it answers what it knows (as the
    // kernel's own attribute cache would) ...
    let chmod = SetAttr {
        mode: Some(0o700),
        ..SetAttr::default()
    };
    b.setattr(dir.ino, &chmod).await.unwrap();
    assert_eq!(a.getattr(dir.ino).await.unwrap().mode, 0o755);
    // ... until it changes the directory in a way it does not follow.
    a.unlink(dir.ino, b"link").await.unwrap();
    let asked = a.getattr(dir.ino).await.unwrap();
    assert_eq!(asked.mode, 0o700);
    assert_eq!(asked, b.getattr(dir.ino).await.unwrap());
    a.rename(dir.ino, b"fifo", ROOT_INO, b"fifo", 0)
        .await
        .unwrap();
    assert_eq!(
        a.getattr(dir.ino).await.unwrap(),
        b.getattr(dir.ino).await.unwrap()
    );
    a.release(fh, None).await.unwrap();
}

/// Mode, owner and times set on a file being written for the first time (as `tar` does before
/// it closes each file) cost no call: this mount answers them at once, and the data's commit at
/// close sets them, durable with the data; another mount sees them from then on. On a file with
/// committed bytes they go at once; a write after the `utimensat` moves the mtime on again.
#[tokio::test]
async fn attributes_set_on_a_file_being_written_go_with_the_data_s_commit() {
    let world = World::new().await;
    let a = world.mount(FsConfig::default()).await;
    let b = world.mount(FsConfig::default()).await;
    let (attr, fh) = create(&a, "untarred").await;
    let bytes = pattern(3, 0, 5000);
    a.write(fh, 0, &bytes).await.unwrap();
    let set = SetAttr {
        mode: Some(0o640),
        uid: Some(1234),
        gid: Some(5678),
        mtime_ns: Some(1_000_000_000),
        atime_ns: Some(2_000_000_000),
        ..SetAttr::default()
    };
    let calls = world.meta.calls("setattr");
    let answered = a.setattr(attr.ino, &set).await.unwrap();
    let expected = (0o640, 1234, 5678, 1_000_000_000, 2_000_000_000, 5000);
    let view = |a: Attr| (a.mode, a.uid, a.gid, a.mtime_ns, a.atime_ns, a.size);
    assert_eq!(
        view(answered),
        expected,
        "the kernel is told the changes, and a size that counts the dirty bytes"
    );
    assert_eq!(
        world.meta.calls("setattr"),
        calls,
        "no call before the commit"
    );
    // The engine is asked (no TTL here): the mount's own changes still show.
    assert_eq!(view(a.getattr(attr.ino).await.unwrap()), expected);
    assert_eq!(
        b.getattr(attr.ino).await.unwrap().mode,
        0o644,
        "another mount sees them with the data"
    );
    a.release(fh, None).await.unwrap();
    assert_eq!(
        world.meta.calls("setattr"),
        calls,
        "the commit carried them"
    );
    assert_eq!(view(b.getattr(attr.ino).await.unwrap()), expected);
    assert_eq!(read_path(&b, "untarred", 0, 5000).await, bytes);

    // With bytes committed (readable elsewhere), a change goes at once: one that removes
    // rights must not wait for a writer that may not close for hours.
    let fh = a.open(attr.ino, RW).await.unwrap().0;
    a.write(fh, 5000, b"more").await.unwrap();
    a.setattr(attr.ino, &set).await.unwrap();
    assert_eq!(world.meta.calls("setattr"), calls + 1, "sent at once");
    a.write(fh, 5004, b"again").await.unwrap();
    a.release(fh, None).await.unwrap();
    let seen = b.getattr(attr.ino).await.unwrap();
    assert_eq!((seen.size, seen.mode), (5009, 0o640));
    assert!(
        seen.mtime_ns > 1_000_000_000,
        "a write after utimensat sets the mtime"
    );
}

/// `close` of a handle opened for writing makes the mount's namespace changes durable (a
/// `Sync` when it had no data to commit); of one opened read-only, it costs no call. `fsync`
/// of either still does; the release after the last close (which nobody waits for) never.
#[tokio::test]
async fn only_a_writable_handle_s_close_makes_namespace_changes_durable() {
    let world = World::new().await;
    let a = world.mount(FsConfig::default()).await;
    let (attr, fh) = create(&a, "read me").await;
    a.release(fh, None).await.unwrap();
    a.mkdir(ROOT_INO, b"unsynced", 0o755, 0, 0).await.unwrap();
    let syncs = world.meta.calls("sync");
    let (reader, _) = a.open(attr.ino, libc::O_RDONLY).await.unwrap();
    a.close(reader).await.unwrap();
    assert_eq!(
        world.meta.calls("sync"),
        syncs,
        "a read-only close asks nothing"
    );
    a.fsync(reader, false).await.unwrap();
    assert_eq!(world.meta.calls("sync"), syncs + 1, "its fsync does");
    a.release(reader, None).await.unwrap();

    a.mkdir(ROOT_INO, b"unsynced too", 0o755, 0, 0)
        .await
        .unwrap();
    let (writer, _) = a.open(attr.ino, RW).await.unwrap();
    a.close(writer).await.unwrap();
    assert_eq!(
        world.meta.calls("sync"),
        syncs + 2,
        "a writable close syncs"
    );
    a.mkdir(ROOT_INO, b"left to its bound", 0o755, 0, 0)
        .await
        .unwrap();
    a.release(writer, None).await.unwrap();
    assert_eq!(
        world.meta.calls("sync"),
        syncs + 2,
        "a release asks nothing"
    );
}

/// Data a failed `close` left uncommitted is committed by the release that follows (which
/// makes nothing else durable), and reads back elsewhere.
#[tokio::test]
async fn a_release_commits_what_a_failed_close_left() {
    let mut world = World::new().await;
    world.meta = world.meta.clone().with_staging(world.blocks.clone());
    let a = world.mount(FsConfig::default()).await;
    let (_, fh) = create(&a, "retried").await;
    a.write(fh, 0, b"kept at release").await.unwrap();
    world.meta.lose_next_write_slice_answer();
    assert_eq!(errno(a.close(fh).await), libc::EIO);
    let syncs = world.meta.calls("sync");
    a.release(fh, None).await.unwrap();
    assert_eq!(world.meta.calls("sync"), syncs);
    let b = world.mount(FsConfig::default()).await;
    assert_eq!(read_path(&b, "retried", 0, 64).await, b"kept at release");
}

/// An engine answer read before the commit that carried attributes held for it, arriving
/// after that commit, is not what the mount answers: it would show the file without them.
#[tokio::test]
async fn an_answer_older_than_the_commit_of_held_attributes_is_not_served() {
    let world = World::new().await;
    let a = Arc::new(world.mount(FsConfig::default()).await);
    let (attr, fh) = create(&a, "racing").await;
    a.write(fh, 0, b"data").await.unwrap();
    let chmod = SetAttr {
        mode: Some(0o600),
        ..SetAttr::default()
    };
    a.setattr(attr.ino, &chmod).await.unwrap();
    let (answered, go) = world.meta.pause_next_getattr();
    let asking = tokio::spawn({
        let a = a.clone();
        async move { a.getattr(attr.ino).await.unwrap() }
    });
    answered.await.unwrap();
    // The engine's answer (mode 0644) is read; the commit goes before it arrives.
    a.flush(fh).await.unwrap();
    go.send(()).unwrap();
    assert_eq!(asking.await.unwrap().mode, 0o600);
    a.release(fh, None).await.unwrap();
}

/// Changes waiting for the data's commit keep their order with the changes that cannot wait:
/// a truncate commits the data (with them) first; later ones, on a file with committed bytes,
/// go at once, the last one made winning, and the data's commit keeps an mtime set meanwhile.
#[tokio::test]
async fn waiting_attribute_changes_keep_their_order() {
    let world = World::new().await;
    let a = world.mount(FsConfig::default()).await;
    let b = world.mount(FsConfig::default()).await;
    let (attr, fh) = create(&a, "mixed").await;
    a.write(fh, 0, b"some data").await.unwrap();
    let chown = SetAttr {
        mode: Some(0o600),
        uid: Some(42),
        ..SetAttr::default()
    };
    a.setattr(attr.ino, &chown).await.unwrap();
    let truncate = SetAttr {
        size: Some(4),
        ..SetAttr::default()
    };
    let calls = world.meta.calls("setattr");
    a.setattr(attr.ino, &truncate).await.unwrap();
    assert_eq!(
        world.meta.calls("setattr"),
        calls + 1,
        "a size is sent at once"
    );
    let seen = b.getattr(attr.ino).await.unwrap();
    assert_eq!((seen.mode, seen.uid, seen.size), (0o600, 42, 4));

    a.write(fh, 4, b"more").await.unwrap();
    for change in [
        SetAttr {
            mode: Some(0o755),
            ..SetAttr::default()
        },
        SetAttr {
            mtime_ns: Some(3_000_000_000),
            ..SetAttr::default()
        },
    ] {
        a.setattr(attr.ino, &change).await.unwrap();
    }
    a.release(fh, None).await.unwrap();
    assert_eq!(
        world.meta.calls("setattr"),
        calls + 3,
        "with bytes committed, each went at once"
    );
    let seen = b.getattr(attr.ino).await.unwrap();
    assert_eq!(
        (seen.mode, seen.uid, seen.mtime_ns, seen.size),
        (0o755, 42, 3_000_000_000, 8)
    );
    assert_eq!(read_path(&b, "mixed", 0, 8).await, b"somemore");
}

/// The attributes of a file this mount has open answer `getattr` from what the engine last
/// said (with the mount's own writes and attribute changes) within the TTL; a removal, rename or
/// link by this mount makes it ask again.
#[tokio::test]
async fn an_open_file_s_attributes_are_the_mount_s_own_within_the_ttl() {
    let world = World::new().await;
    let (a, b) = remembering_and_asking(&world).await;
    let (attr, fh) = create(&a, "open").await;
    a.write(fh, 0, b"twelve bytes").await.unwrap();
    let mine = a.getattr(attr.ino).await.unwrap();
    assert_eq!(mine.size, 12, "the mount's own dirty bytes count");
    // Committed, so the chmod below is sent at once rather than with the data.
    a.fsync(fh, false).await.unwrap();
    let chmod = SetAttr {
        mode: Some(0o600),
        ..SetAttr::default()
    };
    a.setattr(attr.ino, &chmod).await.unwrap();
    assert_eq!(a.getattr(attr.ino).await.unwrap().mode, 0o600);
    // Changed elsewhere: within the TTL the mount answers what it knows ...
    let chmod_elsewhere = SetAttr {
        mode: Some(0o644),
        ..SetAttr::default()
    };
    b.setattr(attr.ino, &chmod_elsewhere).await.unwrap();
    assert_eq!(a.getattr(attr.ino).await.unwrap().mode, 0o600);
    // ... until it links, renames or removes something.
    a.link(attr.ino, ROOT_INO, b"second name").await.unwrap();
    let asked = a.getattr(attr.ino).await.unwrap();
    assert_eq!((asked.mode, asked.nlink, asked.size), (0o644, 2, 12));
    a.release(fh, None).await.unwrap();
    assert_eq!(b.getattr(attr.ino).await.unwrap().size, 12);
}

/// What the kernel asks about a file while it is written for the first time (its attributes,
/// the mode, owner and times `tar` sets, the `security.capability` it checks before each
/// write) the mount answers without waiting, so the FUSE adapter answers it on the kernel's
/// thread; anything that needs the engine is not answered there.
#[tokio::test]
async fn what_the_kernel_asks_about_a_file_being_written_is_answered_without_waiting() {
    let world = World::new().await;
    let config = FsConfig {
        attr_ttl: Duration::from_secs(60),
        ..FsConfig::default()
    };
    let a = world.mount(config).await;
    let (attr, fh) = create(&a, "untarred").await;
    a.write(fh, 0, &pattern(5, 0, 3000)).await.unwrap();
    let set = SetAttr {
        mode: Some(0o600),
        mtime_ns: Some(7_000_000_000),
        ..SetAttr::default()
    };
    let calls = world.meta.calls("setattr");
    let held = a
        .setattr_here(attr.ino, &set)
        .expect("held for the commit")
        .unwrap();
    assert_eq!(
        (held.mode, held.mtime_ns, held.size),
        (0o600, 7_000_000_000, 3000)
    );
    assert_eq!(world.meta.calls("setattr"), calls, "no call");
    let seen = a.getattr_here(attr.ino).expect("an open file's attributes");
    assert_eq!((seen.mode, seen.size), (0o600, 3000));

    // A new file has no extended attributes (its create said so), until one is set.
    let capability = b"security.capability";
    assert_eq!(
        errno(a.getxattr_here(attr.ino, capability).expect("known absent")),
        libc::ENODATA
    );
    a.setxattr(attr.ino, b"user.tag", b"1", 0).await.unwrap();
    assert!(
        a.getxattr_here(attr.ino, capability).is_none(),
        "asked again"
    );
    assert_eq!(errno(a.getxattr(attr.ino, capability).await), libc::ENODATA);
    assert!(
        a.getxattr_here(attr.ino, capability).is_some(),
        "remembered absent"
    );
    a.release(fh, None).await.unwrap();

    // Bytes committed: a change goes to the engine at once, so it is not answered here.
    let fh = a.open(attr.ino, RW).await.unwrap().0;
    a.write(fh, 3000, b"more").await.unwrap();
    assert!(a.setattr_here(attr.ino, &set).is_none());
    a.release(fh, None).await.unwrap();
    assert_eq!(
        a.getattr_here(attr.ino).map(|closed| closed.size),
        Some(3004),
        "a file closed within the TTL: what its last commit returned"
    );
}

/// A `stat` right after `close` (pip, compileall) is answered from what the file's commit
/// returned, without a call, for the TTL; this mount's own changes make it ask again, and a
/// mount without an attribute TTL always asks.
#[tokio::test]
async fn a_file_closed_here_is_stat_without_a_call_within_the_ttl() {
    let world = World::new().await;
    let (a, b) = remembering_and_asking(&world).await;
    let (attr, fh) = create(&a, "f").await;
    a.write(fh, 0, b"twelve bytes").await.unwrap();
    a.flush(fh).await.unwrap();
    a.release(fh, None).await.unwrap();
    let asked = world.meta.calls("getattr");
    let here = a.getattr_here(attr.ino).expect("closed within the TTL");
    assert_eq!(here.size, 12);
    assert_eq!(
        here,
        b.getattr(attr.ino).await.unwrap(),
        "what the engine holds"
    );
    assert_eq!(world.meta.calls("getattr"), asked + 1, "only b asked");

    // This mount changes the file's attributes: asked again, and the answer is the new one.
    a.setattr(
        attr.ino,
        &SetAttr {
            mode: Some(0o600),
            ..SetAttr::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(a.getattr_here(attr.ino), None, "its own chmod");

    // Opened and closed again: kept again. A rename drops the inodes it moved or replaced (their
    // ctime, a link count) and keeps the others; a removal (the mount does not know whose link
    // count it changed) drops them all.
    let (fh, _) = a.open(attr.ino, libc::O_RDONLY).await.unwrap();
    a.release(fh, None).await.unwrap();
    assert_eq!(a.getattr_here(attr.ino).map(|a| a.mode), Some(0o600));
    let (kept, fh) = create(&a, "k").await;
    a.release(fh, None).await.unwrap();
    let (replaced, fh) = create(&a, "g").await;
    a.release(fh, None).await.unwrap();
    a.getattr(ROOT_INO).await.unwrap();
    a.rename(ROOT_INO, b"f", ROOT_INO, b"g", 0).await.unwrap();
    assert_eq!(
        a.getattr_here(attr.ino),
        Some(b.getattr(attr.ino).await.unwrap()),
        "moved: its new ctime, from the rename's answer"
    );
    assert_eq!(
        a.getattr_here(replaced.ino),
        None,
        "replaced: its link count"
    );
    assert_eq!(
        a.getattr_here(ROOT_INO),
        Some(b.getattr(ROOT_INO).await.unwrap()),
        "the directory's times follow the rename, without a call"
    );
    assert_eq!(a.getattr_here(kept.ino), Some(kept), "another file's stays");
    a.unlink(ROOT_INO, b"k").await.unwrap();
    assert_eq!(a.getattr_here(kept.ino), None, "a removal");

    // b, with no attribute TTL (FsConfig's default, `--attr-ttl 0`), keeps nothing.
    let (other, fh) = create(&b, "h").await;
    b.release(fh, None).await.unwrap();
    assert_eq!(b.getattr_here(other.ino), None, "--attr-ttl 0");
}
