//! What the file-system core needs from the metadata engine: the operations of `meta.proto`, as
//! an async trait.
//!
//! [`super::meta_grpc::GrpcMeta`] is the real implementation (the gateway's `Meta` service);
//! tests run the embedded engine in-process behind the same trait. The types here mirror the
//! engine's own (`gateway::meta`) so that the client does not depend on the gateway crate.
//!
//! Every method is one transaction on the engine; errors come back as [`FsError::Meta`] carrying
//! the errno the engine chose, or as [`FsError::MetaUnavailable`] when it could not be asked.

use std::ops::Range;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use super::error::{FsError, FsResult};

pub use shared::meta::{
    now_ns, Attr, CommitAttrs, DirEntry, FileKind, GatewayId, HeldLock, Ino, LockKind, LockRequest,
    MountView, NewNode, Renamed, SessionId, SetAttr, Slice, StatFs, TimeNs, MAX_FILE_SIZE,
    ROOT_INO,
};

/// What the gateway hands a client that opens a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionGrant {
    pub session_id: SessionId,
    /// The object store the gateway drains to; clients read uploaded blocks from it directly.
    pub store_url: String,
    /// Recorded in the slices this client stages through the gateway.
    pub gateway_id: GatewayId,
    /// Where the gateway's `Staging` service listens (empty: the address already in use).
    pub gateway_address: String,
    /// Heartbeat at least this often; `None` when the engine does not expire sessions.
    pub heartbeat_interval: Option<Duration>,
    /// Blocks of a file beyond its first this many bytes go straight to the store; 0: none.
    pub direct_threshold: u64,
    /// Read uploaded blocks through the gateways and write none to the store: the tenant is
    /// confined to a directory and `store_url` is empty.
    pub read_through_gateway: bool,
    /// The gateway is a mirror of another region: metadata calls go to it (the addresses the
    /// mount was given) and never to the registry's gateways, which are in the source region.
    pub mirror: bool,
}

/// What an open answers: the file's attributes and, when asked for and given, its chunk 0 (what
/// [`MetaApi::read_chunk`] would answer next), so that reading a small file after its open
/// costs no second call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    pub attr: Attr,
    pub first_chunk: Option<Vec<Slice>>,
}

/// The metadata operations the file-system core uses, each one transaction on the engine.
#[async_trait]
pub trait MetaApi: Send + Sync + 'static {
    async fn open_session(&self, description: &str) -> FsResult<SessionGrant>;
    /// Keeps the session alive and reports the mount's `view` of the gateways.
    async fn heartbeat(&self, session: SessionId, view: &MountView) -> FsResult<()>;
    async fn close_session(&self, session: SessionId) -> FsResult<()>;

    async fn lookup(&self, parent: Ino, name: &[u8]) -> FsResult<Attr>;
    async fn getattr(&self, ino: Ino) -> FsResult<Attr>;
    async fn setattr(&self, ino: Ino, changes: &SetAttr) -> FsResult<Attr>;
    /// Creates a regular file, open for `session` (released with [`MetaApi::release`]).
    async fn create(
        &self,
        session: SessionId,
        parent: Ino,
        name: &[u8],
        node: &NewNode,
    ) -> FsResult<Attr>;
    /// Creates a regular file (not opened), FIFO, socket or device node.
    async fn mknod(&self, parent: Ino, name: &[u8], node: &NewNode) -> FsResult<Attr>;
    async fn mkdir(
        &self,
        parent: Ino,
        name: &[u8],
        mode: u32,
        uid: u32,
        gid: u32,
    ) -> FsResult<Attr>;
    async fn symlink(
        &self,
        parent: Ino,
        name: &[u8],
        target: &[u8],
        uid: u32,
        gid: u32,
    ) -> FsResult<Attr>;
    async fn readlink(&self, ino: Ino) -> FsResult<Vec<u8>>;
    async fn unlink(&self, parent: Ino, name: &[u8]) -> FsResult<()>;
    async fn rmdir(&self, parent: Ino, name: &[u8]) -> FsResult<()>;
    /// `flags` are Linux `renameat2` flags: 0, `RENAME_NOREPLACE` or `RENAME_EXCHANGE`.
    async fn rename(
        &self,
        parent: Ino,
        name: &[u8],
        new_parent: Ino,
        new_name: &[u8],
        flags: u32,
    ) -> FsResult<Renamed>;
    async fn link(&self, ino: Ino, new_parent: Ino, new_name: &[u8]) -> FsResult<Attr>;
    /// Up to `limit` entries after `after_cookie` (0: from the start), without `.` and `..`.
    async fn readdir(&self, ino: Ino, after_cookie: u64, limit: u32) -> FsResult<Vec<DirEntry>>;

    async fn getxattr(&self, ino: Ino, name: &[u8]) -> FsResult<Vec<u8>>;
    /// `flags`: 0, `XATTR_CREATE` or `XATTR_REPLACE`.
    async fn setxattr(&self, ino: Ino, name: &[u8], value: &[u8], flags: u32) -> FsResult<()>;
    async fn listxattr(&self, ino: Ino) -> FsResult<Vec<Vec<u8>>>;
    async fn removexattr(&self, ino: Ino, name: &[u8]) -> FsResult<()>;
    async fn statfs(&self) -> FsResult<StatFs>;
    /// Returns once every metadata change committed so far is durable (namespace changes may be
    /// acknowledged before: README, SEMANTICS).
    async fn sync(&self) -> FsResult<()>;

    /// Records an open handle of `session` (an unlinked file lives until its last release).
    /// With `first_chunk`, the answer may carry the file's chunk 0, read after the open.
    async fn open(&self, session: SessionId, ino: Ino, first_chunk: bool) -> FsResult<Opened>;
    /// Gives back one handle of `session` per entry (an inode twice for two), all in one
    /// transaction: EBADF, and nothing given back, when any is not held.
    async fn release(&self, session: SessionId, inos: &[Ino]) -> FsResult<()>;

    /// Leases the empty directory `dir` to `session`, so that the mount may answer lookups of
    /// names it did not add there itself (`fs/dir_leases.rs`); `false` when not granted.
    async fn take_dir_lease(&self, session: SessionId, dir: Ino) -> FsResult<bool>;
    /// Whether `session` still holds each lease of `keep` unrecalled; gives back `release`.
    async fn keep_dir_leases(
        &self,
        session: SessionId,
        keep: &[Ino],
        release: &[Ino],
    ) -> FsResult<Vec<bool>>;

    /// Sets a byte-range lock of one lock owner of `session` (`fcntl(F_SETLK)` semantics, held
    /// in the engine across mounts); while another owner holds a conflicting one, waits up to
    /// `wait` for it to go, then fails with EAGAIN.
    async fn set_lock(
        &self,
        session: SessionId,
        ino: Ino,
        lock: &LockRequest,
        wait: Duration,
    ) -> FsResult<()>;
    /// A lock of another owner that conflicts with `lock` (`F_GETLK`), if any.
    async fn get_lock(
        &self,
        session: SessionId,
        ino: Ino,
        lock: &LockRequest,
    ) -> FsResult<Option<HeldLock>>;
    /// Drops the locks of lock owner `owner` of `session` on `ino` (`None`: of every owner).
    async fn release_locks(&self, session: SessionId, ino: Ino, owner: Option<u64>)
        -> FsResult<()>;

    /// The slices of one chunk in commit order: later ones shadow earlier ones.
    async fn read_chunk(&self, ino: Ino, chunk_index: u64) -> FsResult<Vec<Slice>>;
    /// A batch of fresh slice ids, leased to `session` (no other session may stage them).
    async fn allocate_slice_ids(&self, session: SessionId, count: u32) -> FsResult<Range<u64>>;
    /// Records that `session` is staging `slice`; must precede its commit. A larger `len` grows
    /// the record.
    async fn record_pending_slice(&self, session: SessionId, slice: &Slice) -> FsResult<()>;
    /// Makes a slice part of the file once all its blocks are durable; grows the file to at
    /// least `new_size`. Committing the same slice again is a no-op.
    async fn commit_slice(
        &self,
        session: SessionId,
        ino: Ino,
        chunk_index: u64,
        slice: &Slice,
        new_size: u64,
        attrs: &CommitAttrs,
    ) -> FsResult<Attr>;
    /// [`MetaApi::record_pending_slice`], the slice's one block (`data`, all of it) and
    /// [`MetaApi::commit_slice`] in one call, staged on the gateway that serves the metadata.
    /// `ENOSYS` where that is not possible (the default): the caller then takes the three steps.
    /// Every gateway the metadata's registry knows, with whether it is alive.
    async fn list_gateways(&self) -> FsResult<Vec<GatewayInfo>>;

    #[allow(clippy::too_many_arguments)]
    async fn write_slice(
        &self,
        _session: SessionId,
        _ino: Ino,
        _chunk_index: u64,
        _slice: &Slice,
        _new_size: u64,
        _attrs: &CommitAttrs,
        _data: Bytes,
    ) -> FsResult<Attr> {
        Err(write_slice_unsupported(
            "this metadata service stages no blocks",
        ))
    }
}

/// A gateway as the metadata's registry knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayInfo {
    pub id: GatewayId,
    pub address: String,
    pub epoch: u64,
    pub alive: bool,
    pub staged_blocks: u64,
    pub staged_bytes: u64,
    /// A mirror region's gateway: read blocks from it, stage nothing on it from elsewhere.
    pub mirror: bool,
}

/// The ENOSYS answer of a `write_slice` the metadata service cannot take; `why` says why.
pub fn write_slice_unsupported(why: &str) -> FsError {
    FsError::Meta {
        op: "write_slice",
        errno: libc::ENOSYS,
        message: why.into(),
    }
}
