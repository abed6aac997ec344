//! Metadata engine (issue 3): file-system transactions behind a trait, embedded default on redb.
//!
//! [`MetaEngine`] is the contract the gRPC `Meta` service and the FUSE client's file-system core are
//! written against (DESIGN.md, "Metadata"). Every method is one transaction: it either happens
//! completely or not at all, so a gateway killed mid-call never leaves a half-renamed tree.
//! [`RedbMeta`] is the embedded implementation, one redb file hosted by the gateway.
//!
//! Data model (DESIGN.md, "Data model"): a regular file is a list of 64 MiB chunks; each chunk is a
//! list of [`Slice`]s in commit order, later ones shadowing earlier ones where they overlap. A slice
//! with id 0 is a *hole*: it reads as zeros and owns no data (truncate uses it to hide bytes past a
//! cut, so growing the file again later shows zeros, not the old bytes).
//!
//! Data cleanup: whenever a slice stops being visible anywhere (its file was deleted, truncated
//! away, or every byte of it was overwritten by later slices), or a client session dies with slices
//! it staged but never committed, the slice enters the *deleted data* queue with a due time. The
//! gateway takes due entries ([`MetaEngine::take_due_deleted_slices`]), drops the staged blocks and
//! deletes uploaded objects, then acknowledges them ([`MetaEngine::ack_deleted_slices`]).
//!
//! Sessions: each client mount opens a session and heartbeats it. Open file handles and slices that
//! are staged but not committed belong to a session, so when a client dies its open-but-unlinked
//! files are finally removed and its orphaned slices cleaned up by [`MetaEngine::close_session`].

mod codec;
#[cfg(test)]
mod model_tests;
mod redb_engine;
#[cfg(test)]
mod tests;

use std::ops::Range;
use std::time::Duration;

pub use redb_engine::RedbMeta;

pub use shared::meta::{
    now_ns, Attr, DirEntry, FileKind, GatewayId, Ino, NewNode, SessionId, SetAttr, Slice, StatFs,
    TimeNs, MAX_FILE_SIZE, MAX_LINKS, MAX_NAME_LEN, MAX_SYMLINK_LEN, MAX_XATTR_NAME_LEN,
    MAX_XATTR_VALUE_LEN, ROOT_INO,
};

/// A slice whose data is no longer referenced and must be deleted from staging and the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeletedSlice {
    pub slice_id: u64,
    pub len: u32,
    pub gateway_id: GatewayId,
    /// Not to be deleted before this time (the configured delay protects in-flight readers).
    pub due_ns: TimeNs,
}

impl DeletedSlice {
    /// The object keys of this slice's blocks: cut into blocks of at most [`shared::BLOCK_SIZE`].
    pub fn block_keys(&self) -> Vec<shared::BlockKey> {
        shared::meta::slice_block_keys(self.slice_id, self.len)
    }
}

/// How `rename` treats an existing target (Linux `renameat2` flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RenameMode {
    /// Replace the target if it exists (plain `rename`).
    Replace,
    /// `RENAME_NOREPLACE`: fail with EEXIST if the target exists.
    NoReplace,
    /// `RENAME_EXCHANGE`: swap source and target atomically; both must exist.
    Exchange,
}

impl RenameMode {
    /// From the `flags` of `renameat2` as FUSE passes them; unknown flags (such as
    /// `RENAME_WHITEOUT`) and contradicting ones are EINVAL.
    pub fn from_flags(flags: u32) -> Result<Self, MetaError> {
        match flags {
            0 => Ok(RenameMode::Replace),
            libc::RENAME_NOREPLACE => Ok(RenameMode::NoReplace),
            libc::RENAME_EXCHANGE => Ok(RenameMode::Exchange),
            other => Err(MetaError::Invalid(format!(
                "unsupported rename flags {other:#x}"
            ))),
        }
    }
}

/// How `setxattr` treats an existing attribute (Linux `XATTR_CREATE` / `XATTR_REPLACE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XattrMode {
    /// Create or replace.
    Upsert,
    /// `XATTR_CREATE`: fail with EEXIST if it exists.
    Create,
    /// `XATTR_REPLACE`: fail with ENODATA if it does not exist.
    Replace,
}

impl XattrMode {
    pub fn from_flags(flags: u32) -> Result<Self, MetaError> {
        match flags as i32 {
            0 => Ok(XattrMode::Upsert),
            libc::XATTR_CREATE => Ok(XattrMode::Create),
            libc::XATTR_REPLACE => Ok(XattrMode::Replace),
            other => Err(MetaError::Invalid(format!(
                "unsupported xattr flags {other:#x}"
            ))),
        }
    }
}

/// A client session as the engine records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    pub id: SessionId,
    pub last_heartbeat_ns: TimeNs,
    /// Free text from the client (host, mount point, version), for `status`.
    pub description: String,
}

/// Tunables of an engine.
#[derive(Debug, Clone)]
pub struct MetaConfig {
    /// How long deleted data waits before it is due for removal, so readers that resolved a slice
    /// just before it was deleted can still fetch its blocks.
    pub deleted_data_delay: Duration,
    /// ENOSPC past this many bytes of file data.
    pub capacity_bytes: Option<u64>,
    /// ENOSPC past this many inodes.
    pub max_files: Option<u64>,
    /// Every operation is durable before it returns (the durability contract); concurrent
    /// operations share one fsync (group commit). Tests that only need one process's view may
    /// turn it off to run faster.
    pub sync_commits: bool,
}

impl Default for MetaConfig {
    fn default() -> Self {
        MetaConfig {
            deleted_data_delay: Duration::from_secs(3600),
            capacity_bytes: None,
            max_files: None,
            sync_commits: true,
        }
    }
}

/// Everything that can go wrong in the metadata engine; [`MetaError::errno`] is what the file
/// system returns to applications.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("no entry {name:?} in directory {parent}")]
    NoSuchEntry { parent: Ino, name: String },
    #[error("no inode {0}")]
    NoSuchInode(Ino),
    #[error("{name:?} already exists in directory {parent}")]
    AlreadyExists { parent: Ino, name: String },
    #[error("inode {0} is not a directory")]
    NotADirectory(Ino),
    #[error("inode {0} is a directory")]
    IsADirectory(Ino),
    #[error("directory {0} is not empty")]
    DirectoryNotEmpty(Ino),
    #[error("invalid name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },
    #[error("name of {len} bytes is longer than {max}")]
    NameTooLong { len: usize, max: usize },
    #[error("cannot move directory {0} into its own subtree")]
    MoveIntoOwnSubtree(Ino),
    #[error("invalid argument: {0}")]
    Invalid(String),
    #[error("operation not permitted: {0}")]
    NotPermitted(String),
    #[error("inode {0} has too many links")]
    TooManyLinks(Ino),
    #[error("no extended attribute {name:?} on inode {ino}")]
    NoSuchXattr { ino: Ino, name: String },
    #[error("extended attribute {name:?} already exists on inode {ino}")]
    XattrExists { ino: Ino, name: String },
    #[error("extended attribute name of {len} bytes: must be 1..={max} bytes")]
    BadXattrName { len: usize, max: usize },
    #[error("extended attribute value of {len} bytes is larger than {max}")]
    XattrValueTooLarge { len: usize, max: usize },
    #[error("file size {0} is beyond the largest supported")]
    FileTooLarge(u64),
    #[error("no space: {0}")]
    NoSpace(String),
    #[error("session {0} does not exist (expired or closed); open a new one and write again")]
    SessionGone(SessionId),
    #[error("slice {slice_id} was not recorded as pending for session {session}")]
    SliceNotPending { session: SessionId, slice_id: u64 },
    #[error("corrupt metadata record: {0}")]
    Corrupt(String),
    #[error("metadata database: {0}")]
    Database(#[from] redb::Error),
}

impl MetaError {
    /// The Linux errno a file system returns for this error.
    pub fn errno(&self) -> i32 {
        use MetaError::*;
        match self {
            NoSuchEntry { .. } | NoSuchInode(_) => libc::ENOENT,
            AlreadyExists { .. } | XattrExists { .. } => libc::EEXIST,
            NotADirectory(_) => libc::ENOTDIR,
            IsADirectory(_) => libc::EISDIR,
            DirectoryNotEmpty(_) => libc::ENOTEMPTY,
            InvalidName { .. } | MoveIntoOwnSubtree(_) | Invalid(_) => libc::EINVAL,
            SliceNotPending { .. } => libc::EINVAL,
            NameTooLong { .. } => libc::ENAMETOOLONG,
            NotPermitted(_) => libc::EPERM,
            TooManyLinks(_) => libc::EMLINK,
            NoSuchXattr { .. } => libc::ENODATA,
            BadXattrName { .. } => libc::ERANGE,
            FileTooLarge(_) => libc::EFBIG,
            XattrValueTooLarge { .. } => libc::E2BIG,
            NoSpace(_) => libc::ENOSPC,
            SessionGone(_) | Corrupt(_) | Database(_) => libc::EIO,
        }
    }

    /// Whether the same call may succeed if tried again unchanged: only passing I/O trouble of the
    /// database. Everything else is an answer about the file system and will not change by itself.
    pub fn is_retryable(&self) -> bool {
        matches!(self, MetaError::Database(redb::Error::Io(_)))
    }
}

macro_rules! database_errors {
    ($($kind:ty),*) => {$(
        impl From<$kind> for MetaError {
            fn from(error: $kind) -> Self {
                MetaError::Database(error.into())
            }
        }
    )*};
}
database_errors!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError
);

pub type Result<T, E = MetaError> = std::result::Result<T, E>;

/// File-system metadata operations, each one transaction.
///
/// Synchronous: the embedded engine is a local redb file; async callers use `spawn_blocking`.
pub trait MetaEngine: Send + Sync {
    /// The entry `name` of directory `parent`; `.` and `..` resolve too.
    fn lookup(&self, parent: Ino, name: &[u8]) -> Result<Attr>;
    fn getattr(&self, ino: Ino) -> Result<Attr>;
    /// Changes attributes; a new `size` truncates or extends a regular file.
    fn setattr(&self, ino: Ino, changes: &SetAttr) -> Result<Attr>;
    /// Creates a regular file and opens it for `session` in the same transaction (`creat`).
    fn create(&self, session: SessionId, parent: Ino, name: &[u8], node: &NewNode) -> Result<Attr>;
    /// Creates a regular file, FIFO, socket or device node. Directories and symlinks have their
    /// own calls.
    fn mknod(&self, parent: Ino, name: &[u8], node: &NewNode) -> Result<Attr>;
    fn mkdir(&self, parent: Ino, name: &[u8], mode: u32, uid: u32, gid: u32) -> Result<Attr>;
    fn symlink(&self, parent: Ino, name: &[u8], target: &[u8], uid: u32, gid: u32) -> Result<Attr>;
    fn readlink(&self, ino: Ino) -> Result<Vec<u8>>;
    /// Removes a name of a non-directory. The inode goes when its last name is gone and no
    /// session holds it open.
    fn unlink(&self, parent: Ino, name: &[u8]) -> Result<()>;
    fn rmdir(&self, parent: Ino, name: &[u8]) -> Result<()>;
    fn rename(
        &self,
        parent: Ino,
        name: &[u8],
        new_parent: Ino,
        new_name: &[u8],
        mode: RenameMode,
    ) -> Result<()>;
    /// A new name `new_parent/new_name` for the non-directory `ino`.
    fn link(&self, ino: Ino, new_parent: Ino, new_name: &[u8]) -> Result<Attr>;
    /// Up to `limit` entries of directory `ino` after `after_cookie` (0 = from the start), without
    /// `.` and `..`.
    fn readdir(&self, ino: Ino, after_cookie: u64, limit: usize) -> Result<Vec<DirEntry>>;

    fn getxattr(&self, ino: Ino, name: &[u8]) -> Result<Vec<u8>>;
    fn setxattr(&self, ino: Ino, name: &[u8], value: &[u8], mode: XattrMode) -> Result<()>;
    fn listxattr(&self, ino: Ino) -> Result<Vec<Vec<u8>>>;
    fn removexattr(&self, ino: Ino, name: &[u8]) -> Result<()>;

    fn statfs(&self) -> Result<StatFs>;

    /// The slices of chunk `chunk_index` of file `ino`, in commit order (later shadows earlier).
    /// Bytes at or past the file's size are not part of the file, whatever a slice says.
    fn read_chunk(&self, ino: Ino, chunk_index: u64) -> Result<Vec<Slice>>;
    /// Makes a staged slice part of the file: appended to the chunk, the file's size grown to at
    /// least `new_size` and the slice's end, mtime set. The slice must have been recorded with
    /// [`MetaEngine::record_pending_slice`] by the same live session; committing it again after a
    /// success is a no-op, so a commit whose answer was lost can be retried.
    fn commit_slice(
        &self,
        session: SessionId,
        ino: Ino,
        chunk_index: u64,
        slice: &Slice,
        new_size: u64,
        mtime_ns: TimeNs,
    ) -> Result<Attr>;
    /// `count` fresh slice ids, never handed out before and never again.
    fn allocate_slice_ids(&self, count: u64) -> Result<Range<u64>>;
    /// Records that `session` is staging `slice` (before its blocks are written), so the blocks
    /// are cleaned up if the session dies before committing it. Repeating it with a larger `len`
    /// grows the record.
    fn record_pending_slice(&self, session: SessionId, slice: &Slice) -> Result<()>;
    /// Like [`MetaEngine::record_pending_slice`], but returns before the record is durable; the
    /// next durable commit carries it. Only for a caller that then stages the slice's blocks and
    /// commits it itself, without answering anyone in between (`WriteSlice`): should the engine
    /// crash first, the caller's client gets no answer and retries the whole write.
    fn record_pending_slice_lazily(&self, session: SessionId, slice: &Slice) -> Result<()>;

    fn open_session(&self, description: &str) -> Result<SessionId>;
    /// Keeps a session alive; [`MetaError::SessionGone`] once it was closed.
    fn heartbeat(&self, session: SessionId) -> Result<()>;
    /// Ends a session: releases its open handles (removing unlinked files nobody holds any more)
    /// and queues the slices it staged but never committed for deletion. Closing an unknown
    /// session is a no-op, so cleanup can be repeated.
    fn close_session(&self, session: SessionId) -> Result<()>;
    fn list_sessions(&self) -> Result<Vec<SessionInfo>>;
    /// Sessions whose last heartbeat is older than `heartbeat_before_ns`: the caller closes them.
    fn expired_sessions(&self, heartbeat_before_ns: TimeNs) -> Result<Vec<SessionId>>;

    /// Records an open handle of `session` on `ino` and returns the current attributes
    /// (close-to-open: the size a reader must honour).
    fn open(&self, session: SessionId, ino: Ino) -> Result<Attr>;
    /// Drops one handle; the last release of an unlinked file removes it.
    fn release(&self, session: SessionId, ino: Ino) -> Result<()>;

    /// Up to `limit` queued slices due at `now_ns`, oldest due first. They stay queued until
    /// acknowledged, so a crash between deleting and acknowledging only repeats the deletion.
    fn take_due_deleted_slices(&self, now_ns: TimeNs, limit: usize) -> Result<Vec<DeletedSlice>>;
    /// Removes slices from the queue once their data is gone; unknown ids are ignored.
    fn ack_deleted_slices(&self, slice_ids: &[u64]) -> Result<()>;
}

/// Checks the name of a new directory entry.
pub fn check_name(name: &[u8]) -> Result<()> {
    let invalid = |reason| {
        Err(MetaError::InvalidName {
            name: String::from_utf8_lossy(name).into_owned(),
            reason,
        })
    };
    if name.is_empty() {
        return invalid("empty");
    }
    if name == b"." || name == b".." {
        return invalid("reserved");
    }
    if name.len() > MAX_NAME_LEN {
        return Err(MetaError::NameTooLong {
            len: name.len(),
            max: MAX_NAME_LEN,
        });
    }
    if name.contains(&b'/') {
        return invalid("contains '/'");
    }
    if name.contains(&0) {
        return invalid("contains NUL");
    }
    Ok(())
}
