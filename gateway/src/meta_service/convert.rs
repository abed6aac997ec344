//! Conversions between the `Meta` gRPC messages and the metadata engine's types, all in one place.
//!
//! Input that the wire format allows but the engine's types cannot hold (an unknown file kind, a
//! gateway id that is not 16 bytes, a missing slice) becomes [`MetaError::Invalid`], so it reaches
//! the client as EINVAL through the same error mapping as every engine error.

use proto::meta as pb;
use proto::meta_convert::{self, WireError};

use crate::meta::{
    Attr, CommitAttrs, DirEntry, FileKind, HeldLock, Ino, LockKind, LockRequest, MetaError,
    NewNode, SetAttr, Slice, StatFs,
};

fn invalid(e: WireError) -> MetaError {
    MetaError::Invalid(e.0)
}

pub fn kind_to_proto(kind: FileKind) -> pb::FileKind {
    kind.into()
}

/// The engine's kind for a wire value; `FILE_KIND_UNSPECIFIED` and unknown numbers are EINVAL.
pub fn kind_from_proto(value: i32) -> Result<FileKind, MetaError> {
    meta_convert::file_kind(value).map_err(invalid)
}

pub fn attr_to_proto(attr: &Attr) -> pb::Attr {
    attr.into()
}

pub fn attr_response(attr: &Attr) -> pb::AttrResponse {
    pb::AttrResponse {
        attr: Some(attr_to_proto(attr)),
    }
}

/// What a commit sets on its file besides the data.
pub fn commit_attrs_from_proto(commit: &pb::CommitSliceRequest) -> CommitAttrs {
    CommitAttrs {
        mtime_ns: commit.mtime_ns,
        mode: commit.mode,
        uid: commit.uid,
        gid: commit.gid,
        atime_ns: commit.atime_ns,
    }
}

pub fn set_attr_from_proto(request: &pb::SetAttrRequest) -> SetAttr {
    SetAttr {
        mode: request.mode,
        uid: request.uid,
        gid: request.gid,
        size: request.size,
        atime_ns: request.atime_ns,
        mtime_ns: request.mtime_ns,
    }
}

/// The new inode a `Create` or `Mknod` asks for. `Create` makes regular files only, so it may
/// leave the kind unspecified; `Mknod` must name one.
pub fn new_node_from_proto(
    request: &pb::CreateRequest,
    kind_if_unspecified: Option<FileKind>,
) -> Result<NewNode, MetaError> {
    let kind = match kind_if_unspecified {
        Some(default) if request.kind == pb::FileKind::Unspecified as i32 => default,
        _ => kind_from_proto(request.kind)?,
    };
    Ok(NewNode {
        kind,
        mode: request.mode,
        uid: request.uid,
        gid: request.gid,
        rdev: request.rdev,
    })
}

pub fn dir_entry_to_proto(entry: &DirEntry) -> pb::DirEntry {
    pb::DirEntry {
        name: entry.name.clone().into(),
        cookie: entry.cookie,
        attr: Some(attr_to_proto(&entry.attr)),
        has_xattrs: entry.has_xattrs,
    }
}

pub fn statfs_to_proto(statfs: &StatFs) -> pb::StatFsResponse {
    pb::StatFsResponse {
        files: statfs.files,
        used_bytes: statfs.used_bytes,
        // The proto says 0 for unlimited.
        capacity_bytes: statfs.capacity_bytes.unwrap_or(0),
        max_files: statfs.max_files.unwrap_or(0),
    }
}

pub fn slice_to_proto(slice: &Slice) -> pb::Slice {
    slice.into()
}

/// The slice of a `RecordPendingSlice` or `CommitSlice` (see [`meta_convert::slice`]).
pub fn slice_from_proto(slice: Option<&pb::Slice>, rpc: &str) -> Result<Slice, MetaError> {
    let slice = slice.ok_or_else(|| MetaError::Invalid(format!("{rpc} without a slice")))?;
    meta_convert::slice(slice).map_err(invalid)
}

/// The session bytes, inode and lock of a lock request from the wire.
pub fn lock_from_proto(
    lock: Option<&pb::LockRequest>,
    rpc: &str,
) -> Result<(Vec<u8>, Ino, LockRequest), MetaError> {
    let lock = lock.ok_or_else(|| MetaError::Invalid(format!("{rpc} without a lock")))?;
    let kind = match pb::LockKind::try_from(lock.kind) {
        Ok(pb::LockKind::Unlock) => None,
        Ok(pb::LockKind::Read) => Some(LockKind::Read),
        Ok(pb::LockKind::Write) => Some(LockKind::Write),
        Err(_) => return Err(MetaError::Invalid(format!("lock kind {}", lock.kind))),
    };
    Ok((
        lock.session_id.to_vec(),
        lock.ino,
        LockRequest {
            owner: lock.owner,
            start: lock.start,
            end: lock.end,
            kind,
            pid: lock.pid,
        },
    ))
}

/// A held lock as `GetLock` reports it (without its owner or session).
pub fn held_lock_to_proto(held: &HeldLock, ino: Ino) -> pb::LockRequest {
    pb::LockRequest {
        ino,
        start: held.start,
        end: held.end,
        kind: match held.kind {
            LockKind::Read => pb::LockKind::Read,
            LockKind::Write => pb::LockKind::Write,
        } as i32,
        pid: held.pid,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL_KINDS: [FileKind; 7] = [
        FileKind::File,
        FileKind::Dir,
        FileKind::Symlink,
        FileKind::Fifo,
        FileKind::Socket,
        FileKind::CharDevice,
        FileKind::BlockDevice,
    ];

    #[test]
    fn every_kind_round_trips_and_unspecified_or_unknown_is_einval() {
        for kind in ALL_KINDS {
            assert_eq!(kind_from_proto(kind_to_proto(kind) as i32).unwrap(), kind);
        }
        for bad in [pb::FileKind::Unspecified as i32, 8, -1] {
            let error = kind_from_proto(bad).unwrap_err();
            assert_eq!(error.errno(), libc::EINVAL, "{bad}: {error}");
        }
    }

    #[test]
    fn attr_fields_all_reach_the_wire() {
        let attr = Attr {
            ino: 42,
            kind: FileKind::CharDevice,
            mode: 0o4755,
            uid: 1000,
            gid: 100,
            nlink: 3,
            size: 1 << 40,
            atime_ns: -5,
            mtime_ns: 6,
            ctime_ns: 7,
            rdev: 0x0103,
        };
        assert_eq!(
            attr_to_proto(&attr),
            pb::Attr {
                ino: 42,
                kind: pb::FileKind::CharDevice as i32,
                mode: 0o4755,
                uid: 1000,
                gid: 100,
                nlink: 3,
                size: 1 << 40,
                atime_ns: -5,
                mtime_ns: 6,
                ctime_ns: 7,
                rdev: 0x0103,
            }
        );
    }

    #[test]
    fn set_attr_keeps_absent_fields_absent() {
        let request = pb::SetAttrRequest {
            ino: 9,
            mode: Some(0o600),
            size: Some(0),
            mtime_ns: Some(-1),
            ..Default::default()
        };
        assert_eq!(
            set_attr_from_proto(&request),
            SetAttr {
                mode: Some(0o600),
                size: Some(0),
                mtime_ns: Some(-1),
                ..SetAttr::default()
            }
        );
    }

    #[test]
    fn create_defaults_to_a_regular_file_and_mknod_needs_a_kind() {
        let mut request = pb::CreateRequest {
            mode: 0o640,
            uid: 1,
            gid: 2,
            rdev: 3,
            ..Default::default()
        };
        let node = new_node_from_proto(&request, Some(FileKind::File)).unwrap();
        assert_eq!(
            node,
            NewNode {
                kind: FileKind::File,
                mode: 0o640,
                uid: 1,
                gid: 2,
                rdev: 3
            }
        );
        assert_eq!(
            new_node_from_proto(&request, None).unwrap_err().errno(),
            libc::EINVAL
        );
        request.kind = pb::FileKind::Fifo as i32;
        assert_eq!(
            new_node_from_proto(&request, None).unwrap().kind,
            FileKind::Fifo
        );
        // An explicit kind is passed on even to Create, whose engine call refuses non-files.
        assert_eq!(
            new_node_from_proto(&request, Some(FileKind::File))
                .unwrap()
                .kind,
            FileKind::Fifo
        );
    }

    #[test]
    fn slices_round_trip_and_bad_gateway_ids_are_einval() {
        let slice = Slice {
            slice_id: 77,
            offset_in_chunk: 4096,
            len: 5 << 20,
            gateway_id: [9; 16],
        };
        let wire = slice_to_proto(&slice);
        assert_eq!(slice_from_proto(Some(&wire), "CommitSlice").unwrap(), slice);

        let short = pb::Slice {
            gateway_id: vec![1; 15].into(),
            ..wire.clone()
        };
        let error = slice_from_proto(Some(&short), "CommitSlice").unwrap_err();
        assert_eq!(error.errno(), libc::EINVAL);
        assert!(error.to_string().contains("15 bytes"), "{error}");

        let missing = slice_from_proto(None, "CommitSlice").unwrap_err();
        assert_eq!(missing.errno(), libc::EINVAL);
        assert!(missing.to_string().contains("CommitSlice"), "{missing}");

        // A hole owns no blocks, so it needs no gateway.
        let hole = pb::Slice {
            slice_id: 0,
            offset_in_chunk: 0,
            len: 10,
            gateway_id: bytes::Bytes::new(),
        };
        assert_eq!(
            slice_from_proto(Some(&hole), "CommitSlice")
                .unwrap()
                .gateway_id,
            [0; 16]
        );
        let data_without_gateway = pb::Slice {
            slice_id: 5,
            ..hole
        };
        assert!(slice_from_proto(Some(&data_without_gateway), "CommitSlice").is_err());
    }

    #[test]
    fn statfs_says_zero_for_unlimited() {
        let unlimited = StatFs {
            files: 3,
            used_bytes: 10,
            capacity_bytes: None,
            max_files: None,
        };
        assert_eq!(
            statfs_to_proto(&unlimited),
            pb::StatFsResponse {
                files: 3,
                used_bytes: 10,
                capacity_bytes: 0,
                max_files: 0
            }
        );
        let limited = StatFs {
            capacity_bytes: Some(1 << 30),
            max_files: Some(1000),
            ..unlimited
        };
        let wire = statfs_to_proto(&limited);
        assert_eq!((wire.capacity_bytes, wire.max_files), (1 << 30, 1000));
    }
}
