//! The one error type of the file-system core, and the one place it becomes an errno.
//!
//! Every operation of [`super::Fs`] returns [`FsError`]; the FUSE adapter answers the kernel
//! with [`FsError::errno`]. Errors are `Clone` because one failed block fetch is shared by every
//! reader that waited for it.

use super::meta_api::Ino;

/// Everything that can go wrong in the file-system core.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FsError {
    /// The metadata service gave an answer about the file system (ENOENT, EEXIST, ENOTEMPTY...).
    /// Its errno is passed to the application unchanged.
    #[error("{op}: {message}")]
    Meta {
        op: &'static str,
        errno: i32,
        message: String,
    },
    /// The metadata service could not be reached, or did not answer in time.
    #[error("metadata service unreachable during {op}: {message}")]
    MetaUnavailable { op: &'static str, message: String },
    /// The metadata service answered something this client cannot understand.
    #[error("metadata service sent a malformed answer to {op}: {message}")]
    MetaProtocol { op: &'static str, message: String },
    /// The gateway refused a block for good (no space, conflicting bytes, bad request).
    #[error("gateway refused block {key}: {message}")]
    BlockRejected {
        key: String,
        /// The gateway's device stayed full for longer than it waits (ENOSPC).
        no_space: bool,
        message: String,
    },
    /// The gateway could not be reached, or dropped the connection, while handling a block.
    #[error("gateway unreachable for block {key}: {message}")]
    GatewayUnavailable { key: String, message: String },
    /// Neither the gateway nor the object store holds a block a committed slice names.
    #[error("block {key} is held by neither the gateway nor the object store")]
    BlockMissing { key: String },
    /// Bytes of a block came back different from what was asked for (checksum, length).
    #[error("block {key} came back damaged: {message}")]
    BlockCorrupt { key: String, message: String },
    /// The object store failed to serve a block.
    #[error("object store, block {key}: {message}")]
    Store { key: String, message: String },
    /// The gateway's device is above its high-water mark: the client is to PUT the block to
    /// the store itself and commit its slice as usual.
    #[error("gateway asks to write block {key} through: {message}")]
    WriteThrough { key: String, message: String },
    #[error("file handle {0} is not open")]
    BadHandle(u64),
    #[error("file handle {fh} is not open for {access}")]
    WrongAccess { fh: u64, access: &'static str },
    #[error("inode {0} is a directory")]
    IsDirectory(Ino),
    #[error("inode {0} is not a regular file")]
    NotRegularFile(Ino),
    #[error("the file system is mounted read-only")]
    ReadOnly,
    #[error("offset {offset} + length {len} is past the largest file size")]
    FileTooLarge { offset: u64, len: u64 },
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// A bug or a task that died: never an answer about the file system.
    #[error("internal error: {0}")]
    Internal(String),
}

impl FsError {
    /// The Linux errno the kernel gets for this error.
    pub fn errno(&self) -> i32 {
        use FsError::*;
        match self {
            Meta { errno, .. } if *errno > 0 => *errno,
            Meta { .. } => libc::EIO,
            BlockRejected { no_space: true, .. } => libc::ENOSPC,
            MetaUnavailable { .. }
            | MetaProtocol { .. }
            | BlockRejected { .. }
            | GatewayUnavailable { .. }
            | BlockMissing { .. }
            | BlockCorrupt { .. }
            | Store { .. }
            | WriteThrough { .. }
            | Internal(_) => libc::EIO,
            BadHandle(_) | WrongAccess { .. } => libc::EBADF,
            IsDirectory(_) => libc::EISDIR,
            NotRegularFile(_) | Invalid(_) => libc::EINVAL,
            ReadOnly => libc::EROFS,
            FileTooLarge { .. } => libc::EFBIG,
        }
    }

    /// Whether trying the same call again may succeed: the other side was unreachable, not
    /// unwilling.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            FsError::MetaUnavailable { .. } | FsError::GatewayUnavailable { .. }
        )
    }
}

/// [`FsError::WriteThrough`] when a gateway's refusal (`FAILED_PRECONDITION`, `message`) tells
/// the client to write the block through.
pub fn write_through_of(code: tonic::Code, message: &str, key: &str) -> Option<FsError> {
    (code == tonic::Code::FailedPrecondition && message.starts_with(proto::WRITE_THROUGH_PREFIX))
        .then(|| FsError::WriteThrough {
            key: key.to_string(),
            message: message.to_string(),
        })
}

/// Shorthand for results of the file-system core.
pub type FsResult<T> = Result<T, FsError>;
