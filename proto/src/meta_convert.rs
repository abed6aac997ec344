//! The wire form of the file-system types (`shared::meta`) in the `Meta` service, both ways, in
//! one place for the gateway and the client. Decoding refuses what the wire allows but the types
//! cannot hold; each side wraps [`WireError`] in its own error (EINVAL on the gateway, a protocol
//! error on the client).

use shared::meta::{Attr, FileKind, GatewayId, MountView, Slice, MAX_VIEW_GATEWAYS};

use crate::meta as pb;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct WireError(pub String);

impl From<FileKind> for pb::FileKind {
    fn from(kind: FileKind) -> Self {
        match kind {
            FileKind::File => pb::FileKind::File,
            FileKind::Dir => pb::FileKind::Dir,
            FileKind::Symlink => pb::FileKind::Symlink,
            FileKind::Fifo => pb::FileKind::Fifo,
            FileKind::Socket => pb::FileKind::Socket,
            FileKind::CharDevice => pb::FileKind::CharDevice,
            FileKind::BlockDevice => pb::FileKind::BlockDevice,
        }
    }
}

/// The kind a wire value names; `FILE_KIND_UNSPECIFIED` and unknown numbers are refused.
pub fn file_kind(value: i32) -> Result<FileKind, WireError> {
    match pb::FileKind::try_from(value) {
        Ok(pb::FileKind::File) => Ok(FileKind::File),
        Ok(pb::FileKind::Dir) => Ok(FileKind::Dir),
        Ok(pb::FileKind::Symlink) => Ok(FileKind::Symlink),
        Ok(pb::FileKind::Fifo) => Ok(FileKind::Fifo),
        Ok(pb::FileKind::Socket) => Ok(FileKind::Socket),
        Ok(pb::FileKind::CharDevice) => Ok(FileKind::CharDevice),
        Ok(pb::FileKind::BlockDevice) => Ok(FileKind::BlockDevice),
        Ok(pb::FileKind::Unspecified) => Err(WireError(
            "file kind is FILE_KIND_UNSPECIFIED; say what to create".into(),
        )),
        Err(_) => Err(WireError(format!("unknown file kind {value}"))),
    }
}

impl From<&Attr> for pb::Attr {
    fn from(attr: &Attr) -> Self {
        pb::Attr {
            ino: attr.ino,
            kind: pb::FileKind::from(attr.kind) as i32,
            mode: attr.mode,
            uid: attr.uid,
            gid: attr.gid,
            nlink: attr.nlink,
            size: attr.size,
            atime_ns: attr.atime_ns,
            mtime_ns: attr.mtime_ns,
            ctime_ns: attr.ctime_ns,
            rdev: attr.rdev,
        }
    }
}

/// Attributes from the wire; `mode` keeps only the permission bits.
pub fn attr(a: &pb::Attr) -> Result<Attr, WireError> {
    Ok(Attr {
        ino: a.ino,
        kind: file_kind(a.kind)?,
        mode: a.mode & 0o7777,
        uid: a.uid,
        gid: a.gid,
        nlink: a.nlink,
        size: a.size,
        atime_ns: a.atime_ns,
        mtime_ns: a.mtime_ns,
        ctime_ns: a.ctime_ns,
        rdev: a.rdev,
    })
}

impl From<&Slice> for pb::Slice {
    fn from(slice: &Slice) -> Self {
        pb::Slice {
            slice_id: slice.slice_id,
            offset_in_chunk: slice.offset_in_chunk,
            len: slice.len,
            gateway_id: bytes::Bytes::copy_from_slice(&slice.gateway_id),
        }
    }
}

/// A slice from the wire. The gateway id must be 16 bytes, except for a hole (slice id 0), which
/// owns no blocks and may leave it empty.
pub fn slice(slice: &pb::Slice) -> Result<Slice, WireError> {
    let gateway_id: GatewayId = match slice.gateway_id[..].try_into() {
        Ok(id) => id,
        Err(_) if slice.slice_id == Slice::HOLE_ID && slice.gateway_id.is_empty() => [0; 16],
        Err(_) => {
            return Err(WireError(format!(
                "slice {}: gateway_id has {} bytes, must be 16",
                slice.slice_id,
                slice.gateway_id.len()
            )))
        }
    };
    Ok(Slice {
        slice_id: slice.slice_id,
        offset_in_chunk: slice.offset_in_chunk,
        len: slice.len,
        gateway_id,
    })
}

/// A mount's view of the gateways from the wire: every id 16 bytes, at most
/// [`MAX_VIEW_GATEWAYS`] in all.
pub fn mount_view(
    using: &[bytes::Bytes],
    avoiding: &[bytes::Bytes],
) -> Result<MountView, WireError> {
    if using.len() + avoiding.len() > MAX_VIEW_GATEWAYS {
        return Err(WireError(format!(
            "a view of {} gateways: at most {MAX_VIEW_GATEWAYS}",
            using.len() + avoiding.len()
        )));
    }
    let ids = |wire: &[bytes::Bytes]| {
        wire.iter()
            .map(|id| {
                GatewayId::try_from(&id[..]).map_err(|_| {
                    WireError(format!("a gateway id of {} bytes, must be 16", id.len()))
                })
            })
            .collect::<Result<Vec<_>, _>>()
    };
    Ok(MountView {
        using: ids(using)?,
        avoiding: ids(avoiding)?,
    })
}

/// The wire form of gateway ids.
pub fn gateway_ids(ids: &[GatewayId]) -> Vec<bytes::Bytes> {
    ids.iter()
        .map(|id| bytes::Bytes::copy_from_slice(id))
        .collect()
}
