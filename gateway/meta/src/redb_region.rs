//! redb on a byte range of a file or block device: the embedded metadata kept inside the staging
//! device (DESIGN.md, "Metadata"), so that the device alone is the whole state of a gateway.
//!
//! ```text
//! region offset 0       header copy 0   (BLOCK bytes)
//!               BLOCK   header copy 1   (BLOCK bytes)
//!               2 BLOCK table: one u64 per data block, BLOCK bytes per 512 data blocks
//!               ...     data blocks: the bytes of the redb database, BLOCK by BLOCK
//! ```
//!
//! All I/O is `O_DIRECT` (the descriptor is the device's own, opened by the gateway): whole,
//! aligned blocks, with a read-modify-write for an unaligned piece. The database's length (redb's
//! "file length") lives in the header, which is written to the two copies in turn (the higher
//! valid sequence wins), so a torn header write never loses the region.
//!
//! Checksums. redb verifies by itself only the two commit slots of its header (xxh3-128 each,
//! falling back to the other slot) and, after an unclean shutdown or on request, the checksums of
//! the B-tree pages it reaches; an ordinary read of a page is not verified. So this layer adds a
//! crc32c over (block number, block bytes) for every data block, kept in the table and checked on
//! every read: a device that returns other bytes than were written (bit rot, a lost or misdirected
//! write) fails the read with [`RegionError::Checksum`] instead of being served. Data block 0 (redb's
//! header) is exempt: redb rewrites it in place on every commit and is built to survive a torn
//! write of it (its slots carry their own checksums), which a crc here would turn into a failure.
//! Every other block redb writes is copy-on-write: it is never rewritten while a durable commit can
//! reach it, and a block written after the last `sync_data` is unreachable after a crash, so a
//! table entry that lags its block after a crash is never read.
//!
//! Durability: `write` keeps blocks in memory (`pending`); `sync_data` writes them, contiguous
//! ones in one request, with the dirty table blocks and, if the length changed, the next header
//! copy, then `fdatasync`s the device: when it returns, every block written before it and its
//! checksum are durable. Keeping the blocks until the sync is what a page cache would do for a
//! file, and it matters as much: redb writes a commit page by page, and one synchronous
//! `O_DIRECT` write per page made a durable commit three to four times slower than on a file
//! (`stagefs bench meta --backends redb,region`). Nothing before a sync was promised durable, so
//! writing a block later changes no guarantee; past `PENDING_LIMIT` bytes the blocks are written
//! early (without a sync), which bounds the memory a large transaction holds. Table entries are 8
//! bytes and aligned, so a torn table-block write (sector by sector) leaves the entries of
//! untouched blocks intact.
//!
//! Exclusion: the gateway holds the device locked (`flock`, and `O_EXCL` for a block device), so
//! no other process opens the region; inside one process a registry refuses a second open database
//! on the same region (redb's whole-storage lock, which is all it needs in its default mode).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fs::File;
use std::io;
use std::ops::Bound;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::sync::{Arc, Mutex, RwLock};

/// The unit of every I/O and of the checksums: a multiple of any logical block size in use (512
/// and 4096 bytes) and redb's page size, so a page is whole blocks.
pub const BLOCK: u64 = 4096;
const BLOCK_USIZE: usize = BLOCK as usize;
const ENTRY_BYTES: u64 = 8;
const ENTRIES_PER_BLOCK: u64 = BLOCK / ENTRY_BYTES;
const HEADER_MAGIC: &[u8; 8] = b"STGFSMRG";
const LAYOUT_VERSION: u32 = 1;
const HEADER_CRC_AT: usize = 48;
/// A table entry: this bit set means "written", the low 32 bits are the crc; 0 means never
/// written (reads as zeros without touching the device).
const WRITTEN: u64 = 1 << 32;
/// Bytes written at once when the table is zeroed at format time.
const FORMAT_CHUNK: u64 = 1 << 20;

/// Bytes of written blocks kept in memory until a sync at most; past it they are written early.
const PENDING_LIMIT: usize = 64 << 20;
/// The longest run of contiguous blocks written in one request at a sync.
const RUN_LIMIT: usize = 1 << 20;
/// Contiguous pending blocks: the first one and how many.
type Run = (u64, usize);
/// Writes in flight at once in the region's io_uring.
const RING_ENTRIES: u32 = 64;

/// The smallest region: headers, one table block and room for redb's first layout (about 1 MiB).
pub const MIN_REGION_BYTES: u64 = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum RegionError {
    #[error(
        "the metadata region of {device} is full: the metadata database needs {needed} \
         bytes and the region holds {capacity} (a region of {region} bytes, sized when the device \
         was formatted: --meta-region-size)"
    )]
    Full {
        device: String,
        needed: u64,
        capacity: u64,
        region: u64,
    },
    #[error(
        "metadata region of {device}: block {block} at device offset {device_offset} fails its \
         checksum (stored {stored:#010x}, read {found:#010x}): the device returned other bytes \
         than were written"
    )]
    Checksum {
        device: String,
        block: u64,
        device_offset: u64,
        stored: u32,
        found: u32,
    },
    #[error("metadata region of {device}: table entry {entry:#x} of block {block} is not valid")]
    BadEntry {
        device: String,
        block: u64,
        entry: u64,
    },
    #[error(
        "metadata region of {device} at device offset {offset}: no valid header (copy 0: {copy0}; \
         copy 1: {copy1}); the region was never formatted, or both copies are damaged"
    )]
    NoHeader {
        device: String,
        offset: u64,
        copy0: &'static str,
        copy1: &'static str,
    },
    #[error(
        "metadata region of {device}: its header describes {found} bytes in {found_blocks} data \
         blocks, the device says {expected} bytes: refusing to use it"
    )]
    Geometry {
        device: String,
        expected: u64,
        found: u64,
        found_blocks: u64,
    },
    #[error(
        "metadata region of {device}: offset {offset} and size {bytes} must be multiples of {BLOCK}, \
         the size at least {MIN_REGION_BYTES}"
    )]
    Layout {
        device: String,
        offset: u64,
        bytes: u64,
    },
    #[error(
        "metadata region of {device}: {len} bytes at {offset} are past the end of the database \
         ({db_len} bytes)"
    )]
    PastEnd {
        device: String,
        offset: u64,
        len: u64,
        db_len: u64,
    },
    #[error("metadata region of {device}: I/O error at device offset {device_offset}: {source}")]
    Io {
        device: String,
        device_offset: u64,
        source: io::Error,
    },
}

impl From<RegionError> for io::Error {
    /// redb speaks `io::Error`; the kind says what happened, the region error is kept as source.
    fn from(error: RegionError) -> io::Error {
        let kind = match &error {
            RegionError::Full { .. } => io::ErrorKind::StorageFull,
            RegionError::Checksum { .. } | RegionError::BadEntry { .. } => {
                io::ErrorKind::InvalidData
            }
            RegionError::PastEnd { .. } => io::ErrorKind::UnexpectedEof,
            RegionError::Io { source, .. } => source.kind(),
            _ => io::ErrorKind::Other,
        };
        io::Error::new(kind, error)
    }
}

/// Where the blocks of a region of `bytes` bytes go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Geometry {
    table_blocks: u64,
    data_blocks: u64,
}

impl Geometry {
    fn of(bytes: u64) -> Geometry {
        let usable = (bytes / BLOCK).saturating_sub(2);
        // Each table block serves ENTRIES_PER_BLOCK data blocks.
        let mut data_blocks = usable * ENTRIES_PER_BLOCK / (ENTRIES_PER_BLOCK + 1);
        while data_blocks > 0 && data_blocks + data_blocks.div_ceil(ENTRIES_PER_BLOCK) > usable {
            data_blocks -= 1;
        }
        Geometry {
            table_blocks: data_blocks.div_ceil(ENTRIES_PER_BLOCK),
            data_blocks,
        }
    }

    fn capacity(&self) -> u64 {
        self.data_blocks * BLOCK
    }
}

/// The bytes of the database a region of `bytes` bytes can hold (its table and headers aside).
pub fn capacity(bytes: u64) -> u64 {
    Geometry::of(bytes).capacity()
}

/// A heap buffer aligned for `O_DIRECT`.
struct Aligned {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: the buffer uniquely owns its allocation, like a Vec<u8>.
unsafe impl Send for Aligned {}

impl Aligned {
    fn zeroed(len: usize) -> Aligned {
        let layout = std::alloc::Layout::from_size_align(len.max(BLOCK_USIZE), BLOCK_USIZE)
            .expect("a valid layout");
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr =
            std::ptr::NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        Aligned { ptr, len }
    }
}

impl std::ops::Deref for Aligned {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for len initialised (zeroed at allocation) bytes.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for Aligned {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and we hold the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with this size and alignment.
        unsafe {
            std::alloc::dealloc(
                self.ptr.as_ptr(),
                std::alloc::Layout::from_size_align_unchecked(
                    self.len.max(BLOCK_USIZE),
                    BLOCK_USIZE,
                ),
            )
        }
    }
}

fn block_crc(block: u64, data: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&block.to_le_bytes()), data)
}

#[derive(Debug, Clone, Copy)]
struct Header {
    bytes: u64,
    data_blocks: u64,
    sequence: u64,
    len: u64,
}

impl Header {
    fn encode(&self) -> Aligned {
        let mut buf = Aligned::zeroed(BLOCK_USIZE);
        buf[0..8].copy_from_slice(HEADER_MAGIC);
        buf[8..12].copy_from_slice(&LAYOUT_VERSION.to_le_bytes());
        buf[16..24].copy_from_slice(&self.bytes.to_le_bytes());
        buf[24..32].copy_from_slice(&self.data_blocks.to_le_bytes());
        buf[32..40].copy_from_slice(&self.sequence.to_le_bytes());
        buf[40..48].copy_from_slice(&self.len.to_le_bytes());
        let crc = crc32c::crc32c(&buf[..HEADER_CRC_AT]);
        buf[HEADER_CRC_AT..HEADER_CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
        buf
    }

    fn decode(buf: &[u8]) -> Result<Header, &'static str> {
        let u64_at = |at: usize| u64::from_le_bytes(buf[at..at + 8].try_into().unwrap());
        if &buf[0..8] != HEADER_MAGIC {
            return Err("no region magic");
        }
        let crc = u32::from_le_bytes(buf[HEADER_CRC_AT..HEADER_CRC_AT + 4].try_into().unwrap());
        if crc != crc32c::crc32c(&buf[..HEADER_CRC_AT]) {
            return Err("checksum mismatch");
        }
        if u32::from_le_bytes(buf[8..12].try_into().unwrap()) != LAYOUT_VERSION {
            return Err("unknown layout version");
        }
        Ok(Header {
            bytes: u64_at(16),
            data_blocks: u64_at(24),
            sequence: u64_at(32),
            len: u64_at(40),
        })
    }
}

/// Regions open in this process, by (device, inode, offset): redb's whole-storage lock.
static OPEN: Mutex<Option<HashSet<(u64, u64, u64)>>> = Mutex::new(None);

/// A redb [`StorageBackend`](redb::StorageBackend) on a region of a file or block device. Clones
/// share the region (so an engine can open the database again on the same state).
#[derive(Clone)]
pub struct RegionBackend {
    region: Arc<Region>,
}

struct Region {
    file: File,
    /// Names the device in errors.
    device: String,
    /// Device offset of the region and its size.
    base: u64,
    bytes: u64,
    geometry: Geometry,
    /// The key of the in-process lock registry.
    identity: (u64, u64, u64),
    state: RwLock<State>,
    /// Whether this handle holds the in-process lock.
    locked: Mutex<bool>,
    /// Submits a sync's writes side by side; None where io_uring is unavailable.
    ring: Option<Mutex<io_uring::IoUring>>,
    /// Set once the ring failed: it is not trusted again.
    ring_failed: std::sync::atomic::AtomicBool,
    /// The owner of the device, when it writes it too ([`RegionBackend::set_shared_device`]);
    /// unset: the region writes and flushes it alone.
    shared_device: std::sync::OnceLock<Arc<dyn SharedDevice>>,
}

/// The owner of the device the region lives in, when it writes the device too (the staging
/// log): given so that a commit never reaches the device before what it may name, and so that
/// one flush covers both and a flush error is seen in one place. Both are called on a thread
/// that may block.
///
/// Only redb's header (data block 0) makes pages reachable after a crash: pages written without
/// it are unreachable until a later batch writes a header naming them. So the header is written
/// by a sync only, which waits for the owner's writes first, before it locks the region's state.
/// Nothing else may wait: redb flushes while it grows the file, holding locks that readers on
/// the runtime's workers block on (as they block on the region's state), and the owner's writes
/// need those workers to finish (a gateway deadlocked so, 2026-12-06).
pub trait SharedDevice: Send + Sync {
    /// Returns once every write of the owner's that a page about to be written may name is on
    /// the device (a block a commit among those pages points at), or says why it never will be.
    /// Called before a sync that writes redb's header: a commit on the device without its block
    /// could become durable through anyone's later flush.
    fn before_writes(&self) -> io::Result<()>;
    /// Flushes the whole device (`fdatasync`): every write completed before the call. It must
    /// not wait for other writes of the owner's (see above). `None`: the owner cannot now (it
    /// stopped); the region flushes itself.
    fn sync(&self) -> Option<io::Result<()>>;
}

struct State {
    /// The database's length (redb's file length).
    len: u64,
    /// Durable in the header (the last one written).
    persisted_len: u64,
    sequence: u64,
    /// One per data block; see [`WRITTEN`].
    entries: Vec<u64>,
    /// Table blocks changed since the last sync.
    dirty: BTreeSet<u64>,
    /// Data blocks written since the last sync and not yet on the device, by block number (their
    /// crcs are in `entries` already); reads take them from here.
    pending: BTreeMap<u64, Box<[u8]>>,
    /// What the device holds in data block 0, redb's header, once written: redb rewrites part of
    /// it at every commit, and reading it back first cost a device read per commit.
    written0: Option<Box<[u8]>>,
}

impl std::fmt::Debug for RegionBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegionBackend")
            .field("device", &self.region.device)
            .field("offset", &self.region.base)
            .field("bytes", &self.region.bytes)
            .finish()
    }
}

fn check_layout(device: &str, base: u64, bytes: u64) -> Result<(), RegionError> {
    if !base.is_multiple_of(BLOCK) || !bytes.is_multiple_of(BLOCK) || bytes < MIN_REGION_BYTES {
        return Err(RegionError::Layout {
            device: device.to_string(),
            offset: base,
            bytes,
        });
    }
    Ok(())
}

/// Makes `bytes` bytes at `base` of `file` an empty region: a zeroed table, then both header
/// copies, then `fdatasync`. What the range held before is gone.
pub fn format(file: &File, device: &str, base: u64, bytes: u64) -> Result<(), RegionError> {
    check_layout(device, base, bytes)?;
    let geometry = Geometry::of(bytes);
    let io = |device_offset, source| RegionError::Io {
        device: device.to_string(),
        device_offset,
        source,
    };
    let zeros = Aligned::zeroed(FORMAT_CHUNK as usize);
    let table = base + 2 * BLOCK;
    let table_end = table + geometry.table_blocks * BLOCK;
    let mut at = table;
    while at < table_end {
        let n = (table_end - at).min(FORMAT_CHUNK) as usize;
        file.write_all_at(&zeros[..n], at).map_err(|e| io(at, e))?;
        at += n as u64;
    }
    for copy in 0..2u64 {
        let header = Header {
            bytes,
            data_blocks: geometry.data_blocks,
            sequence: copy,
            len: 0,
        };
        let at = base + copy * BLOCK;
        file.write_all_at(&header.encode(), at)
            .map_err(|e| io(at, e))?;
    }
    file.sync_data().map_err(|e| io(base, e))
}

impl RegionBackend {
    /// Opens the region of `bytes` bytes at device offset `base` of `file` (opened `O_DIRECT` by
    /// the caller, who also keeps other processes out), formatted by [`format`]. `device` names it
    /// in errors.
    pub fn open(file: File, device: &str, base: u64, bytes: u64) -> Result<Self, RegionError> {
        check_layout(device, base, bytes)?;
        let io = |device_offset, source| RegionError::Io {
            device: device.to_string(),
            device_offset,
            source,
        };
        let mut headers = Aligned::zeroed(2 * BLOCK_USIZE);
        file.read_exact_at(&mut headers, base)
            .map_err(|e| io(base, e))?;
        let copies = [
            Header::decode(&headers[..BLOCK_USIZE]),
            Header::decode(&headers[BLOCK_USIZE..]),
        ];
        let Some(header) = copies
            .iter()
            .filter_map(|c| c.as_ref().ok())
            .max_by_key(|h| h.sequence)
            .copied()
        else {
            let reason = |c: &Result<Header, &'static str>| c.as_ref().err().copied().unwrap_or("");
            return Err(RegionError::NoHeader {
                device: device.to_string(),
                offset: base,
                copy0: reason(&copies[0]),
                copy1: reason(&copies[1]),
            });
        };
        let geometry = Geometry::of(bytes);
        if header.bytes != bytes
            || header.data_blocks != geometry.data_blocks
            || header.len > geometry.capacity()
        {
            return Err(RegionError::Geometry {
                device: device.to_string(),
                expected: bytes,
                found: header.bytes,
                found_blocks: header.data_blocks,
            });
        }
        let mut entries = Vec::with_capacity(geometry.data_blocks as usize);
        let table = base + 2 * BLOCK;
        let mut buf = Aligned::zeroed(FORMAT_CHUNK as usize);
        let mut read = 0u64;
        while read < geometry.table_blocks {
            let blocks = (geometry.table_blocks - read).min(FORMAT_CHUNK / BLOCK);
            let at = table + read * BLOCK;
            let chunk = &mut buf[..(blocks * BLOCK) as usize];
            file.read_exact_at(chunk, at).map_err(|e| io(at, e))?;
            for entry in chunk.chunks_exact(ENTRY_BYTES as usize) {
                if entries.len() as u64 == geometry.data_blocks {
                    break;
                }
                entries.push(u64::from_le_bytes(entry.try_into().unwrap()));
            }
            read += blocks;
        }
        let meta = file.metadata().map_err(|e| io(base, e))?;
        Ok(RegionBackend {
            region: Arc::new(Region {
                file,
                device: device.to_string(),
                base,
                bytes,
                geometry,
                identity: (meta.dev(), meta.ino(), base),
                state: RwLock::new(State {
                    len: header.len,
                    persisted_len: header.len,
                    sequence: header.sequence,
                    entries,
                    dirty: BTreeSet::new(),
                    pending: BTreeMap::new(),
                    written0: None,
                }),
                locked: Mutex::new(false),
                ring: match io_uring::IoUring::new(RING_ENTRIES) {
                    Ok(ring) => Some(Mutex::new(ring)),
                    Err(error) => {
                        tracing::info!(%device, %error, "io_uring is unavailable; the metadata region writes one block run at a time");
                        None
                    }
                },
                ring_failed: std::sync::atomic::AtomicBool::new(false),
                shared_device: std::sync::OnceLock::new(),
            }),
        })
    }

    /// From now on every batch of page writes waits for `owner`'s writes first, and a sync ends
    /// with `owner`'s flush instead of the region's own `fdatasync`; it must flush the same
    /// device. Set once.
    pub fn set_shared_device(&self, owner: Arc<dyn SharedDevice>) {
        if self.region.shared_device.set(owner).is_err() {
            tracing::warn!(device = %self.region.device, "the region's device owner was set already; kept the first");
        }
    }

    /// The bytes of database this region can hold.
    pub fn capacity(&self) -> u64 {
        self.region.geometry.capacity()
    }

    /// The database's current length.
    pub fn database_len(&self) -> u64 {
        self.region.read_state().len
    }

    /// Names the region: `device` (offset, size).
    pub fn describe(&self) -> String {
        format!(
            "{} (metadata region at offset {}, {} bytes)",
            self.region.device, self.region.base, self.region.bytes
        )
    }
}

impl Region {
    fn read_state(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_state(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    fn data_offset(&self, block: u64) -> u64 {
        self.base + (2 + self.geometry.table_blocks + block) * BLOCK
    }

    fn io(&self, device_offset: u64, source: io::Error) -> RegionError {
        RegionError::Io {
            device: self.device.clone(),
            device_offset,
            source,
        }
    }

    fn full(&self, needed: u64) -> RegionError {
        RegionError::Full {
            device: self.device.clone(),
            needed,
            capacity: self.geometry.capacity(),
            region: self.bytes,
        }
    }

    /// Reads data blocks `first..first + count` into `buf` (whole blocks), as the table says they
    /// are: never-written blocks are zeros, written ones must match their crc (but block 0, see
    /// the module comment).
    fn read_blocks(
        &self,
        state: &State,
        first: u64,
        buf: &mut [u8],
        verify: bool,
    ) -> Result<(), RegionError> {
        let count = (buf.len() / BLOCK_USIZE) as u64;
        let span = &state.entries[first as usize..(first + count) as usize];
        let in_memory = |block: u64| {
            state
                .pending
                .get(&block)
                .or(state.written0.as_ref().filter(|_| block == 0))
        };
        if span
            .iter()
            .enumerate()
            .any(|(i, &e)| e != 0 && in_memory(first + i as u64).is_none())
        {
            let at = self.data_offset(first);
            self.file
                .read_exact_at(buf, at)
                .map_err(|e| self.io(at, e))?;
        }
        for (i, &entry) in span.iter().enumerate() {
            let block = first + i as u64;
            let data = &mut buf[i * BLOCK_USIZE..(i + 1) * BLOCK_USIZE];
            if let Some(kept) = in_memory(block) {
                data.copy_from_slice(kept);
                continue;
            }
            if entry == 0 {
                data.fill(0);
                continue;
            }
            if entry >> 32 != 1 {
                return Err(RegionError::BadEntry {
                    device: self.device.clone(),
                    block,
                    entry,
                });
            }
            if verify && block != 0 {
                let found = block_crc(block, data);
                if found != entry as u32 {
                    return Err(RegionError::Checksum {
                        device: self.device.clone(),
                        block,
                        device_offset: self.data_offset(block),
                        stored: entry as u32,
                        found,
                    });
                }
            }
        }
        Ok(())
    }

    /// Writes `data` at database offset `offset`, whole blocks at a time, into `pending`, and
    /// records their crcs.
    fn write_locked(&self, state: &mut State, offset: u64, data: &[u8]) -> Result<(), RegionError> {
        if data.is_empty() {
            return Ok(());
        }
        let end = offset + data.len() as u64;
        if end > self.geometry.capacity() {
            return Err(self.full(end));
        }
        let first = offset / BLOCK;
        let last = end.div_ceil(BLOCK);
        let mut buf = Aligned::zeroed(((last - first) * BLOCK) as usize);
        // Read-modify-write of a partly covered first and last block. redb writes whole pages but
        // for its header (block 0): verify what is kept of any other block, so a write never
        // launders corrupt bytes into a fresh crc.
        let head = (offset % BLOCK) as usize;
        if head != 0 {
            let verify = first != 0;
            self.read_blocks(state, first, &mut buf[..BLOCK_USIZE], verify)?;
        }
        let tail = (end % BLOCK) as usize;
        if tail != 0 && (last - 1 != first || head == 0) {
            let at = buf.len() - BLOCK_USIZE;
            self.read_blocks(state, last - 1, &mut buf[at..], last - 1 != 0)?;
        }
        buf[head..head + data.len()].copy_from_slice(data);
        for (i, block_data) in buf.chunks_exact(BLOCK_USIZE).enumerate() {
            let block = first + i as u64;
            state.entries[block as usize] = WRITTEN | u64::from(block_crc(block, block_data));
            state.dirty.insert(block / ENTRIES_PER_BLOCK);
            state.pending.insert(block, block_data.into());
        }
        state.len = state.len.max(end);
        if state.pending.len() * BLOCK_USIZE > PENDING_LIMIT {
            self.write_pending(state)?;
        }
        Ok(())
    }

    /// Writes the pending blocks to the device (without a sync), but for redb's header: that one
    /// waits for the sync, which waits for the owner's writes before it locks the state
    /// ([`SharedDevice`]).
    fn write_pending(&self, state: &mut State) -> Result<(), RegionError> {
        let header = state.pending.remove(&0);
        let (runs, writes) = self.pending_runs(state);
        if let Some(header) = header {
            state.pending.insert(0, header);
        }
        let outcomes = self.write_batch(&writes);
        self.settle(state, &runs, &outcomes);
        outcomes.into_iter().collect()
    }

    /// The pending blocks as runs of contiguous blocks, `(first block, count)`, and one write per
    /// run, in the same order.
    fn pending_runs(&self, state: &State) -> (Vec<Run>, Vec<(u64, Aligned)>) {
        let mut runs: Vec<Run> = Vec::new();
        for &block in state.pending.keys() {
            match runs.last_mut() {
                Some((start, n)) if *start + *n as u64 == block && *n * BLOCK_USIZE < RUN_LIMIT => {
                    *n += 1
                }
                _ => runs.push((block, 1)),
            }
        }
        let writes = runs
            .iter()
            .map(|&(start, n)| {
                let mut buf = Aligned::zeroed(n * BLOCK_USIZE);
                for (i, block_data) in buf.chunks_exact_mut(BLOCK_USIZE).enumerate() {
                    block_data.copy_from_slice(&state.pending[&(start + i as u64)]);
                }
                (self.data_offset(start), buf)
            })
            .collect();
        (runs, writes)
    }

    /// Takes the blocks of the runs written out of `pending`. A block leaves it only once its run
    /// is written, so after a failure the rest are still read from memory and written by the
    /// next sync.
    fn settle(&self, state: &mut State, runs: &[Run], outcomes: &[Result<(), RegionError>]) {
        for (&(start, n), outcome) in runs.iter().zip(outcomes) {
            if outcome.is_ok() {
                for block in start..start + n as u64 {
                    let written = state.pending.remove(&block);
                    if block == 0 {
                        state.written0 = written;
                    }
                }
            }
        }
    }

    /// Writes every `(device offset, bytes)` and says how each went. A commit's pages lie all over
    /// the database, so its runs are short and many, and each `O_DIRECT` write waits for the
    /// device: they go out side by side in one io_uring submission, one by one where io_uring
    /// cannot be used.
    fn write_batch(&self, writes: &[(u64, Aligned)]) -> Vec<Result<(), RegionError>> {
        let one_by_one = |writes: &[(u64, Aligned)]| -> Vec<Result<(), RegionError>> {
            writes
                .iter()
                .map(|(at, buf)| {
                    self.file
                        .write_all_at(buf, *at)
                        .map_err(|e| self.io(*at, e))
                })
                .collect()
        };
        let Some(ring) = self.ring.as_ref().filter(|_| writes.len() > 1) else {
            return one_by_one(writes);
        };
        let mut ring = ring.lock().unwrap_or_else(|p| p.into_inner());
        let mut outcomes = Vec::with_capacity(writes.len());
        for group in writes.chunks(RING_ENTRIES as usize) {
            match self.submit(&mut ring, group) {
                Ok(done) => outcomes.extend(done),
                // The ring itself failed (not a write): the writes it took may be in flight, so
                // it is not used again; this group goes one by one.
                Err(error) => {
                    // Said once, when it happens; later batches find it failed and say nothing.
                    if !self
                        .ring_failed
                        .swap(true, std::sync::atomic::Ordering::Relaxed)
                    {
                        tracing::warn!(device = %self.device, %error, "io_uring failed; the metadata region writes one block run at a time from now on");
                    }
                    outcomes.extend(one_by_one(group));
                }
            }
        }
        outcomes
    }

    /// One submission of `group` (at most the ring's size), waiting for every completion. A short
    /// write is finished with `pwrite`.
    fn submit(
        &self,
        ring: &mut io_uring::IoUring,
        group: &[(u64, Aligned)],
    ) -> io::Result<Vec<Result<(), RegionError>>> {
        use io_uring::{opcode, types};
        use std::os::fd::AsRawFd;
        if self.ring_failed.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(io::Error::other("io_uring failed before"));
        }
        let fd = types::Fd(self.file.as_raw_fd());
        for (i, (at, buf)) in group.iter().enumerate() {
            let entry = opcode::Write::new(fd, buf.as_ptr(), buf.len() as u32)
                .offset(*at)
                .build()
                .user_data(i as u64);
            // SAFETY: the buffers outlive the submission: this function waits for every
            // completion before it returns, and fails the ring for good if it cannot.
            unsafe { ring.submission().push(&entry) }
                .map_err(|_| io::Error::other("io_uring submission queue full"))?;
        }
        let mut results: Vec<Option<i32>> = vec![None; group.len()];
        let mut pending = group.len();
        while pending > 0 {
            ring.submit_and_wait(pending)?;
            for completion in ring.completion() {
                if let Some(slot) = results.get_mut(completion.user_data() as usize) {
                    if slot.replace(completion.result()).is_none() {
                        pending -= 1;
                    }
                }
            }
        }
        Ok(group
            .iter()
            .zip(results)
            .map(|((at, buf), result)| match result.unwrap_or(-libc::EIO) {
                n if n < 0 => Err(self.io(*at, io::Error::from_raw_os_error(-n))),
                n => {
                    let n = n as usize;
                    self.file
                        .write_all_at(&buf[n.min(buf.len())..], *at + n as u64)
                        .map_err(|e| self.io(*at, e))
                }
            })
            .collect())
    }

    fn set_len_locked(&self, state: &mut State, len: u64) -> Result<(), RegionError> {
        if len > self.geometry.capacity() {
            return Err(self.full(len));
        }
        if len < state.len {
            // Bytes past the end read as zeros when the database grows again: drop whole blocks
            // from the table, zero the rest of a partly kept one.
            let keep = len.div_ceil(BLOCK);
            let old = state.len.div_ceil(BLOCK);
            for block in keep..old {
                if state.entries[block as usize] != 0 {
                    state.entries[block as usize] = 0;
                    state.dirty.insert(block / ENTRIES_PER_BLOCK);
                }
            }
            state.pending.retain(|&block, _| block < keep);
            if keep == 0 {
                state.written0 = None;
            }
            let cut = (len % BLOCK) as usize;
            if cut != 0 && state.entries[(len / BLOCK) as usize] != 0 {
                let zeros = vec![0u8; BLOCK_USIZE - cut];
                self.write_locked(state, len, &zeros)?;
            }
        }
        state.len = len;
        Ok(())
    }

    /// Writes the pending blocks, the changed table blocks and (if the length changed) the next
    /// header copy in one batch, then `fdatasync`s: nothing before the sync was promised, so the
    /// order among them does not matter (a block or table entry written after the last sync is
    /// one no durable commit reaches).
    fn sync_locked(&self, state: &mut State) -> Result<(), RegionError> {
        let (runs, mut writes) = self.pending_runs(state);
        let table = self.base + 2 * BLOCK;
        for &table_block in &state.dirty {
            let mut buf = Aligned::zeroed(BLOCK_USIZE);
            let first = (table_block * ENTRIES_PER_BLOCK) as usize;
            let last = (first + ENTRIES_PER_BLOCK as usize).min(state.entries.len());
            for (slot, entry) in buf
                .chunks_exact_mut(ENTRY_BYTES as usize)
                .zip(&state.entries[first..last])
            {
                slot.copy_from_slice(&entry.to_le_bytes());
            }
            writes.push((table + table_block * BLOCK, buf));
        }
        let header_changed = state.len != state.persisted_len;
        if header_changed {
            let header = Header {
                bytes: self.bytes,
                data_blocks: self.geometry.data_blocks,
                sequence: state.sequence + 1,
                len: state.len,
            };
            // The copy not holding the newest header: a torn write leaves that one intact.
            writes.push((self.base + (header.sequence % 2) * BLOCK, header.encode()));
        }
        let started = std::time::Instant::now();
        let outcomes = self.write_batch(&writes);
        self.settle(state, &runs, &outcomes);
        outcomes.into_iter().collect::<Result<(), _>>()?;
        let wrote = started.elapsed();
        match self.shared_device.get().and_then(|owner| owner.sync()) {
            Some(flushed) => flushed,
            None => self.file.sync_data(),
        }
        .map_err(|e| self.io(self.base, e))?;
        // What a sync (a durable redb commit, or redb's own at open) costs in writes: redb
        // copies every page it changes, and the lazy commits since the last sync add theirs.
        // Counted once durable.
        metrics::histogram!("stagefs_meta_region_write_seconds").record(wrote.as_secs_f64());
        metrics::counter!("stagefs_meta_region_syncs_total").increment(1);
        metrics::counter!("stagefs_meta_region_writes_total").increment(writes.len() as u64);
        metrics::counter!("stagefs_meta_region_written_bytes_total")
            .increment(writes.iter().map(|(_, buf)| buf.len() as u64).sum());
        state.dirty.clear();
        if header_changed {
            state.sequence += 1;
            state.persisted_len = state.len;
        }
        Ok(())
    }

    fn lock(&self) -> bool {
        let mut held = self.locked.lock().unwrap_or_else(|p| p.into_inner());
        if *held {
            return true;
        }
        let mut open = OPEN.lock().unwrap_or_else(|p| p.into_inner());
        if !open.get_or_insert_with(HashSet::new).insert(self.identity) {
            return false;
        }
        *held = true;
        true
    }

    fn unlock(&self) {
        let mut held = self.locked.lock().unwrap_or_else(|p| p.into_inner());
        if *held {
            if let Some(open) = OPEN.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
                open.remove(&self.identity);
            }
            *held = false;
        }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        self.unlock();
    }
}

fn whole(start: Bound<u64>, end: Bound<u64>) -> bool {
    matches!(start, Bound::Unbounded | Bound::Included(0)) && matches!(end, Bound::Unbounded)
}

impl redb::StorageBackend for RegionBackend {
    fn len(&self) -> Result<u64, io::Error> {
        Ok(self.region.read_state().len)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), io::Error> {
        let region = &self.region;
        let state = region.read_state();
        let end = offset + out.len() as u64;
        if end > state.len {
            return Err(RegionError::PastEnd {
                device: region.device.clone(),
                offset,
                len: out.len() as u64,
                db_len: state.len,
            }
            .into());
        }
        if out.is_empty() {
            return Ok(());
        }
        let first = offset / BLOCK;
        let last = end.div_ceil(BLOCK);
        let mut buf = Aligned::zeroed(((last - first) * BLOCK) as usize);
        region.read_blocks(&state, first, &mut buf, true)?;
        let head = (offset % BLOCK) as usize;
        out.copy_from_slice(&buf[head..head + out.len()]);
        Ok(())
    }

    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        let mut state = self.region.write_state();
        Ok(self.region.set_len_locked(&mut state, len)?)
    }

    fn sync_data(&self) -> Result<(), io::Error> {
        // The owner's writes are waited for before the state is locked: the region's readers
        // (redb's page reads, on the runtime's workers) would wait behind the lock, and the
        // owner's writes need those workers to finish. Only redb, the caller, writes the header
        // meanwhile.
        if let Some(owner) = self.region.shared_device.get() {
            if self.region.read_state().pending.contains_key(&0) {
                owner.before_writes().map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!("metadata region of {}: {e}", self.region.device),
                    )
                })?;
            }
        }
        let mut state = self.region.write_state();
        Ok(self.region.sync_locked(&mut state)?)
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        let mut state = self.region.write_state();
        Ok(self.region.write_locked(&mut state, offset, data)?)
    }

    fn close(&self) -> Result<(), io::Error> {
        self.region.unlock();
        Ok(())
    }

    fn try_lock_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<bool, redb::BackendError> {
        if !whole(start, end) {
            return Err(redb::BackendError::Unsupported);
        }
        Ok(self.region.lock())
    }

    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), redb::BackendError> {
        if !whole(start, end) {
            return Err(redb::BackendError::Unsupported);
        }
        self.region.unlock();
        Ok(())
    }
}

/// Opens `path` as a device file would be for the region: read-write, `O_DIRECT`.
pub fn open_direct(path: &std::path::Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use redb::StorageBackend;

    const BASE: u64 = 1 << 20;
    const BYTES: u64 = 8 << 20;

    /// A device file of 16 MiB with a region of 8 MiB at 1 MiB, formatted, and its path.
    fn device() -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("device");
        File::create(&path).unwrap().set_len(16 << 20).unwrap();
        format(&open_direct(&path).unwrap(), "test", BASE, BYTES).unwrap();
        (dir, path)
    }

    fn open(path: &std::path::Path) -> RegionBackend {
        RegionBackend::open(open_direct(path).unwrap(), "test", BASE, BYTES).unwrap()
    }

    /// The first `len` bytes of the region in the device at `path`, as a crash now would leave
    /// them: read from a copy in `dir`, opened afresh.
    fn as_after_a_crash(dir: &std::path::Path, path: &std::path::Path, len: usize) -> Vec<u8> {
        let copy = dir.join("copy");
        std::fs::copy(path, &copy).unwrap();
        let mut out = vec![0u8; len];
        open(&copy).read(0, &mut out).unwrap();
        out
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[test]
    fn geometry_fits_the_region() {
        for bytes in [MIN_REGION_BYTES, 8 << 20, (1 << 30) + 3 * BLOCK, 64 << 30] {
            let g = Geometry::of(bytes);
            assert!(
                2 + g.table_blocks + g.data_blocks <= bytes / BLOCK,
                "{bytes}"
            );
            assert!(g.table_blocks * ENTRIES_PER_BLOCK >= g.data_blocks);
            // The table costs about 1/512 of the region.
            assert!(g.capacity() > bytes / 513 * 512 - 3 * BLOCK, "{bytes}");
        }
    }

    #[test]
    fn unaligned_writes_read_back_and_survive_a_reopen() {
        let (_dir, path) = device();
        let backend = open(&path);
        assert_eq!(backend.len().unwrap(), 0);
        let mut model = vec![0u8; 40_000];
        let writes = [
            (0usize, 320usize, 1u8),
            (100, 5000, 2),
            (8191, 2, 3),
            (4096, 4096, 4),
            (12_345, 20_000, 5),
            (39_999, 1, 6),
        ];
        for (offset, len, seed) in writes {
            let data = pattern(len, seed);
            backend.write(offset as u64, &data).unwrap();
            model[offset..offset + len].copy_from_slice(&data);
        }
        assert_eq!(backend.len().unwrap(), 40_000);
        let check = |backend: &RegionBackend| {
            let mut out = vec![0u8; 40_000];
            backend.read(0, &mut out).unwrap();
            assert!(out == model, "whole read differs");
            let mut piece = vec![0u8; 777];
            backend.read(8000, &mut piece).unwrap();
            assert_eq!(piece, model[8000..8777]);
        };
        check(&backend);
        backend.sync_data().unwrap();
        drop(backend);
        let backend = open(&path);
        assert_eq!(backend.len().unwrap(), 40_000);
        check(&backend);
        // Reading past the end is an error, as redb expects.
        let mut out = [0u8; 2];
        let error = backend.read(39_999, &mut out).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::UnexpectedEof);
    }

    /// Written blocks stay in memory until the sync (a crash before it finds the device as it
    /// was, which a copy of the file stands for), read back from there meanwhile, and reach the
    /// device at the sync, scattered or contiguous, through io_uring or one write at a time.
    #[test]
    fn blocks_reach_the_device_at_the_sync() {
        for ring in [true, false] {
            let (dir, path) = device();
            let backend = open(&path);
            if !ring {
                backend
                    .region
                    .ring_failed
                    .store(true, std::sync::atomic::Ordering::Relaxed);
            }
            backend.write(0, &pattern(16 * BLOCK_USIZE, 1)).unwrap();
            backend.sync_data().unwrap();
            // Scattered blocks, a contiguous run, and a partial rewrite of block 0.
            let writes = [(3, 1, 7u8), (9, 1, 8), (12, 3, 9), (1, 1, 10)];
            let mut model = pattern(16 * BLOCK_USIZE, 1);
            for (block, blocks, seed) in writes {
                let data = pattern(blocks * BLOCK_USIZE, seed);
                backend.write(block as u64 * BLOCK, &data).unwrap();
                let at = block * BLOCK_USIZE;
                model[at..at + data.len()].copy_from_slice(&data);
            }
            backend.write(10, &[0xEE; 100]).unwrap();
            model[10..110].fill(0xEE);
            let mut out = vec![0u8; model.len()];
            backend.read(0, &mut out).unwrap();
            assert!(
                out == model,
                "ring {ring}: a pending block reads back other bytes"
            );
            assert!(
                as_after_a_crash(dir.path(), &path, out.len()) == pattern(16 * BLOCK_USIZE, 1),
                "ring {ring}: a block reached the device before the sync"
            );
            backend.sync_data().unwrap();
            drop(backend);
            let reopened = open(&path);
            reopened.read(0, &mut out).unwrap();
            assert!(
                out == model,
                "ring {ring}: the sync did not write every block"
            );
        }
    }

    /// The device's owner, for the tests: refuses page writes while `refuse` is set, counts the
    /// batches it was asked about, and leaves the flush to the region.
    #[derive(Default)]
    struct Owner {
        refuse: std::sync::atomic::AtomicBool,
        asked: std::sync::atomic::AtomicU64,
    }

    impl SharedDevice for Owner {
        fn before_writes(&self) -> io::Result<()> {
            use std::sync::atomic::Ordering::SeqCst;
            self.asked.fetch_add(1, SeqCst);
            if self.refuse.load(SeqCst) {
                return Err(io::Error::other(
                    "a block the pages may name was never written",
                ));
            }
            Ok(())
        }

        fn sync(&self) -> Option<io::Result<()>> {
            None
        }
    }

    /// Every batch of page writes with redb's header asks the device's owner first; while it
    /// refuses (a block a commit names failed its write), the sync fails and no page reaches the
    /// device, so no later flush can make that commit durable; once it agrees, the next sync
    /// writes them.
    #[test]
    fn pages_wait_for_the_owners_writes_and_go_nowhere_when_it_refuses() {
        use std::sync::atomic::Ordering::SeqCst;
        let (dir, path) = device();
        let backend = open(&path);
        let owner = Arc::new(Owner::default());
        backend.set_shared_device(owner.clone());
        backend.write(0, &pattern(4 * BLOCK_USIZE, 1)).unwrap();
        backend.sync_data().unwrap();
        let asked = owner.asked.load(SeqCst);
        assert!(asked >= 1, "a sync wrote pages without asking the owner");
        owner.refuse.store(true, SeqCst);
        backend.write(0, &pattern(3 * BLOCK_USIZE, 2)).unwrap();
        let refused = backend.sync_data();
        assert!(refused.is_err(), "a sync went on past the owner's refusal");
        assert!(owner.asked.load(SeqCst) > asked);
        assert!(
            as_after_a_crash(dir.path(), &path, 4 * BLOCK_USIZE) == pattern(4 * BLOCK_USIZE, 1),
            "a page reached the device although the owner refused"
        );
        owner.refuse.store(false, SeqCst);
        backend.sync_data().unwrap();
        drop(backend);
        let mut model = pattern(4 * BLOCK_USIZE, 1);
        model[..3 * BLOCK_USIZE].copy_from_slice(&pattern(3 * BLOCK_USIZE, 2));
        let mut out = vec![0u8; 4 * BLOCK_USIZE];
        open(&path).read(0, &mut out).unwrap();
        assert!(
            out == model,
            "the pages held back were not written by the next sync"
        );
    }

    /// A sync waits for the owner's writes before it locks the region's state: those writes may
    /// need a worker thread that is reading the region meanwhile, blocked on that lock.
    #[test]
    fn a_sync_waits_for_the_owner_before_it_locks_out_readers() {
        struct NeedsAReader(std::sync::OnceLock<std::sync::Weak<RegionBackend>>);
        impl SharedDevice for NeedsAReader {
            fn before_writes(&self) -> io::Result<()> {
                let backend = self.0.get().and_then(|b| b.upgrade()).expect("the backend");
                let (read, was_read) = std::sync::mpsc::channel();
                std::thread::spawn(move || {
                    let mut out = vec![0u8; BLOCK_USIZE];
                    let _ = read.send(backend.read(0, &mut out).map(drop));
                });
                match was_read.recv_timeout(std::time::Duration::from_secs(30)) {
                    Ok(outcome) => outcome,
                    Err(_) => Err(io::Error::other(
                        "a reader of the region was locked out while the owner waited",
                    )),
                }
            }

            fn sync(&self) -> Option<io::Result<()>> {
                None
            }
        }
        let (_dir, path) = device();
        let backend = Arc::new(open(&path));
        let owner = Arc::new(NeedsAReader(std::sync::OnceLock::new()));
        let _ = owner.0.set(Arc::downgrade(&backend));
        backend.set_shared_device(owner);
        backend.write(0, &pattern(2 * BLOCK_USIZE, 1)).unwrap();
        backend.sync_data().unwrap();
    }

    /// Pages without redb's header name nothing a crash can reach, so they go to the device
    /// without asking the owner, even while it refuses: redb flushes so while it grows the file,
    /// holding locks that the owner's writes may wait behind.
    #[test]
    fn pages_without_the_header_do_not_wait_for_the_owner() {
        use std::sync::atomic::Ordering::SeqCst;
        let (dir, path) = device();
        let backend = open(&path);
        let owner = Arc::new(Owner::default());
        backend.set_shared_device(owner.clone());
        backend.write(0, &pattern(BLOCK_USIZE, 1)).unwrap();
        backend.sync_data().unwrap();
        let asked = owner.asked.load(SeqCst);
        owner.refuse.store(true, SeqCst);
        backend.write(BLOCK, &pattern(3 * BLOCK_USIZE, 2)).unwrap();
        backend.sync_data().unwrap();
        assert_eq!(
            owner.asked.load(SeqCst),
            asked,
            "pages without the header asked the owner"
        );
        let out = as_after_a_crash(dir.path(), &path, 4 * BLOCK_USIZE);
        let mut model = pattern(4 * BLOCK_USIZE, 0);
        model[..BLOCK_USIZE].copy_from_slice(&pattern(BLOCK_USIZE, 1));
        model[BLOCK_USIZE..].copy_from_slice(&pattern(3 * BLOCK_USIZE, 2));
        assert!(out == model, "the synced pages did not reach the device");
    }

    /// Past `PENDING_LIMIT` the blocks are written early (a large transaction does not hold
    /// them all in memory), and still read back and survive the sync. redb's header is left for
    /// the sync: written early, it would wait for the owner's writes with the state locked.
    #[test]
    fn a_large_transaction_writes_its_blocks_early() {
        use std::sync::atomic::Ordering::SeqCst;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("device");
        let bytes = (PENDING_LIMIT as u64) * 2;
        File::create(&path).unwrap().set_len(bytes).unwrap();
        format(&open_direct(&path).unwrap(), "test", 0, bytes).unwrap();
        let backend = RegionBackend::open(open_direct(&path).unwrap(), "test", 0, bytes).unwrap();
        let owner = Arc::new(Owner::default());
        backend.set_shared_device(owner.clone());
        let len = PENDING_LIMIT + 8 * BLOCK_USIZE;
        let data = pattern(len, 3);
        for (i, piece) in data.chunks(BLOCK_USIZE * 16).enumerate() {
            backend.write((i * BLOCK_USIZE * 16) as u64, piece).unwrap();
        }
        let held = backend.region.read_state().pending.len() * BLOCK_USIZE;
        assert!(
            held <= PENDING_LIMIT,
            "{held} bytes held, the limit is {PENDING_LIMIT}"
        );
        assert!(backend.region.read_state().pending.contains_key(&0));
        assert_eq!(
            owner.asked.load(SeqCst),
            0,
            "an early write asked the owner"
        );
        let mut out = vec![0u8; len];
        backend.read(0, &mut out).unwrap();
        assert!(out == data);
        backend.sync_data().unwrap();
        assert_eq!(
            owner.asked.load(SeqCst),
            1,
            "the sync did not ask the owner"
        );
        drop(backend);
        let reopened = RegionBackend::open(open_direct(&path).unwrap(), "test", 0, bytes).unwrap();
        reopened.read(0, &mut out).unwrap();
        assert!(out == data);
    }

    #[test]
    fn shrinking_and_growing_reads_zeros_past_the_old_end() {
        let (_dir, path) = device();
        let backend = open(&path);
        backend.write(0, &pattern(3 * BLOCK_USIZE, 9)).unwrap();
        backend.set_len(BLOCK + 100).unwrap();
        backend.set_len(3 * BLOCK).unwrap();
        let mut out = vec![0u8; 3 * BLOCK_USIZE];
        backend.read(0, &mut out).unwrap();
        assert_eq!(
            &out[..BLOCK_USIZE + 100],
            &pattern(3 * BLOCK_USIZE, 9)[..BLOCK_USIZE + 100]
        );
        assert!(out[BLOCK_USIZE + 100..].iter().all(|&b| b == 0));
        backend.sync_data().unwrap();
        drop(backend);
        let backend = open(&path);
        let mut again = vec![0u8; 3 * BLOCK_USIZE];
        backend.read(0, &mut again).unwrap();
        assert_eq!(again, out);
    }

    #[test]
    fn a_full_region_refuses_with_its_size_and_changes_nothing() {
        let (_dir, path) = device();
        let backend = open(&path);
        let capacity = backend.capacity();
        backend.set_len(capacity).unwrap();
        backend.write(capacity - 10, b"0123456789").unwrap();
        let error = backend.set_len(capacity + BLOCK).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::StorageFull);
        let text = error.to_string();
        assert!(
            text.contains("metadata region") && text.contains("full"),
            "{text}"
        );
        assert!(text.contains(&BYTES.to_string()), "{text}");
        let error = backend.write(capacity - 2, b"abcd").unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::StorageFull);
        assert_eq!(backend.len().unwrap(), capacity);
        let mut out = [0u8; 10];
        backend.read(capacity - 10, &mut out).unwrap();
        assert_eq!(&out, b"0123456789");
    }

    #[test]
    fn a_changed_block_on_the_device_fails_its_read() {
        let (_dir, path) = device();
        let backend = open(&path);
        backend.write(0, &pattern(4 * BLOCK_USIZE, 1)).unwrap();
        backend.sync_data().unwrap();
        drop(backend);
        // Flip one bit of data block 2, behind the backend's back.
        let offset = BASE + (2 + Geometry::of(BYTES).table_blocks + 2) * BLOCK + 77;
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        let mut byte = [0u8; 1];
        let reader = File::open(&path).unwrap();
        reader.read_exact_at(&mut byte, offset).unwrap();
        file.write_all_at(&[byte[0] ^ 0x10], offset).unwrap();
        file.sync_all().unwrap();
        let backend = open(&path);
        let mut out = vec![0u8; BLOCK_USIZE];
        backend.read(BLOCK, &mut out).unwrap();
        let error = backend.read(2 * BLOCK + 5, &mut out[..10]).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
        assert!(error.to_string().contains("checksum"), "{error}");
        // A partial write into the damaged block is refused too: it must not bless it.
        let error = backend.write(2 * BLOCK + 5, b"x").unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
        // A whole-block write replaces it.
        backend.write(2 * BLOCK, &vec![7u8; BLOCK_USIZE]).unwrap();
        backend.read(2 * BLOCK, &mut out).unwrap();
        assert!(out.iter().all(|&b| b == 7));
    }

    #[test]
    fn a_torn_header_copy_falls_back_to_the_other() {
        let (_dir, path) = device();
        let backend = open(&path);
        backend.write(0, &pattern(BLOCK_USIZE, 2)).unwrap();
        backend.sync_data().unwrap();
        backend.write(BLOCK, &pattern(BLOCK_USIZE, 3)).unwrap();
        backend.sync_data().unwrap();
        drop(backend);
        // The newest copy (sequence 3, copy 1) is damaged: the previous length comes back.
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(&[0xff; 16], BASE + BLOCK + 20).unwrap();
        let backend = open(&path);
        assert_eq!(backend.len().unwrap(), BLOCK);
        // Both damaged: refused, never reformatted.
        file.write_all_at(&[0xff; 16], BASE + 20).unwrap();
        drop(file);
        let error = RegionBackend::open(open_direct(&path).unwrap(), "test", BASE, BYTES)
            .expect_err("refused");
        assert!(matches!(error, RegionError::NoHeader { .. }), "{error}");
    }

    #[test]
    fn the_size_must_match_the_format() {
        let (_dir, path) = device();
        let error = RegionBackend::open(open_direct(&path).unwrap(), "test", BASE, BYTES - BLOCK)
            .expect_err("refused");
        assert!(matches!(error, RegionError::Geometry { .. }), "{error}");
    }

    #[test]
    fn one_database_per_region_in_a_process() {
        let (_dir, path) = device();
        let first = crate::redb_kv::RedbKv::open_backend(open(&path), "test", None).unwrap();
        let second = crate::redb_kv::RedbKv::open_backend(open(&path), "test", None);
        assert!(second.is_err(), "a second database on one region");
        drop(first);
        crate::redb_kv::RedbKv::open_backend(open(&path), "test", None).unwrap();
    }
}
