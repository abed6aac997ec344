//! Byte encodings of the records the redb engine stores: inodes and chunk slice lists.
//!
//! Fixed little-endian layouts with a leading format version, so a record written by a newer
//! format is recognised instead of misread. A record that does not decode is reported as
//! [`MetaError::Corrupt`] (EIO), never guessed at.

use super::{Attr, FileKind, GatewayId, Ino, MetaError, Result, Slice};

/// 2 added the xattr flag (one byte at the end); records of format 1 are still read.
const INODE_FORMAT: u8 = 3;
const INODE_V1_LEN: usize = 2 + 5 * 4 + 6 * 8;
const INODE_V2_LEN: usize = INODE_V1_LEN + 1;
/// Format 3 is format 2 and the owner's name (a length byte, then the bytes).
const INODE_FIXED_LEN: usize = INODE_V2_LEN + 1;
const SLICE_LEN: usize = 8 + 4 + 4 + 16;

/// An inode as stored: its attributes plus bookkeeping that `stat` does not show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Inode {
    pub attr: Attr,
    /// Directories: the one directory that contains it (itself for the root), needed to refuse
    /// moving a directory into its own subtree and to resolve `..`.
    pub parent: Ino,
    /// Open handles over all sessions; an unlinked file lives on while this is not zero.
    pub open_handles: u64,
    /// Whether it has extended attributes; `None` for records written before this was kept
    /// (format 1). Listings pass it on, so a client need not ask for each entry's attributes.
    pub has_xattrs: Option<bool>,
    /// The tenant whose session created it (`create`), or empty: its bytes and itself count in
    /// that tenant's usage totals. Empty in records older than format 3.
    pub owner: String,
}

fn kind_code(kind: FileKind) -> u8 {
    match kind {
        FileKind::File => 1,
        FileKind::Dir => 2,
        FileKind::Symlink => 3,
        FileKind::Fifo => 4,
        FileKind::Socket => 5,
        FileKind::CharDevice => 6,
        FileKind::BlockDevice => 7,
    }
}

fn kind_from_code(code: u8) -> Option<FileKind> {
    Some(match code {
        1 => FileKind::File,
        2 => FileKind::Dir,
        3 => FileKind::Symlink,
        4 => FileKind::Fifo,
        5 => FileKind::Socket,
        6 => FileKind::CharDevice,
        7 => FileKind::BlockDevice,
        _ => return None,
    })
}

/// Reads fixed-width fields in order; callers check the total length first.
struct Fields<'a>(&'a [u8]);

impl Fields<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let (head, rest) = self.0.split_at(N);
        self.0 = rest;
        head.try_into().expect("split_at returned N bytes")
    }
    fn u8(&mut self) -> u8 {
        self.take::<1>()[0]
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take())
    }
    fn i64(&mut self) -> i64 {
        i64::from_le_bytes(self.take())
    }
}

pub(super) fn encode_inode(inode: &Inode) -> Vec<u8> {
    let a = &inode.attr;
    let owner = &inode.owner.as_bytes()[..inode.owner.len().min(u8::MAX as usize)];
    let mut out = Vec::with_capacity(INODE_FIXED_LEN + owner.len());
    out.push(INODE_FORMAT);
    out.push(kind_code(a.kind));
    for v in [a.mode, a.uid, a.gid, a.nlink, a.rdev] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.extend_from_slice(&a.size.to_le_bytes());
    for t in [a.atime_ns, a.mtime_ns, a.ctime_ns] {
        out.extend_from_slice(&t.to_le_bytes());
    }
    out.extend_from_slice(&inode.parent.to_le_bytes());
    out.extend_from_slice(&inode.open_handles.to_le_bytes());
    out.push(match inode.has_xattrs {
        None => 0,
        Some(false) => 1,
        Some(true) => 2,
    });
    out.push(owner.len() as u8);
    out.extend_from_slice(owner);
    out
}

pub(super) fn decode_inode(ino: Ino, bytes: &[u8]) -> Result<Inode> {
    let corrupt = |why: &str| MetaError::Corrupt(format!("inode {ino}: {why}"));
    let format = bytes.first().copied().unwrap_or(0);
    let expected = match format {
        1 => INODE_V1_LEN,
        2 => INODE_V2_LEN,
        INODE_FORMAT => {
            INODE_FIXED_LEN + usize::from(bytes.get(INODE_FIXED_LEN - 1).copied().unwrap_or(0))
        }
        _ => return Err(corrupt(&format!("unknown format {format}"))),
    };
    if bytes.len() != expected {
        return Err(corrupt(&format!(
            "{} bytes, expected {expected} for format {format}",
            bytes.len()
        )));
    }
    let mut f = Fields(&bytes[1..]);
    let kind = kind_from_code(f.u8()).ok_or_else(|| corrupt("unknown file kind"))?;
    let (mode, uid, gid, nlink, rdev) = (f.u32(), f.u32(), f.u32(), f.u32(), f.u32());
    let size = f.u64();
    let (atime_ns, mtime_ns, ctime_ns) = (f.i64(), f.i64(), f.i64());
    Ok(Inode {
        attr: Attr {
            ino,
            kind,
            mode,
            uid,
            gid,
            nlink,
            size,
            atime_ns,
            mtime_ns,
            ctime_ns,
            rdev,
        },
        parent: f.u64(),
        open_handles: f.u64(),
        has_xattrs: if format == 1 {
            None
        } else {
            match f.u8() {
                0 => None,
                1 => Some(false),
                2 => Some(true),
                other => return Err(corrupt(&format!("xattr flag {other}"))),
            }
        },
        owner: if format == INODE_FORMAT {
            String::from_utf8_lossy(&bytes[INODE_FIXED_LEN..]).into_owned()
        } else {
            String::new()
        },
    })
}

pub(super) fn encode_slices(slices: &[Slice]) -> Vec<u8> {
    let mut out = Vec::with_capacity(slices.len() * SLICE_LEN);
    for s in slices {
        out.extend_from_slice(&s.slice_id.to_le_bytes());
        out.extend_from_slice(&s.offset_in_chunk.to_le_bytes());
        out.extend_from_slice(&s.len.to_le_bytes());
        out.extend_from_slice(&s.gateway_id);
    }
    out
}

pub(super) fn decode_slices(ino: Ino, chunk_index: u64, bytes: &[u8]) -> Result<Vec<Slice>> {
    if !bytes.len().is_multiple_of(SLICE_LEN) {
        return Err(MetaError::Corrupt(format!(
            "chunk {chunk_index} of inode {ino}: {} bytes is not a whole number of slices",
            bytes.len()
        )));
    }
    Ok(bytes
        .chunks_exact(SLICE_LEN)
        .map(|record| {
            let mut f = Fields(record);
            Slice {
                slice_id: f.u64(),
                offset_in_chunk: f.u32(),
                len: f.u32(),
                gateway_id: f.take::<16>(),
            }
        })
        .collect())
}

/// The value of a pending or deleted slice record: its length and the gateway holding it.
pub(crate) fn encode_slice_data(len: u32, gateway_id: &GatewayId) -> Vec<u8> {
    let mut out = Vec::with_capacity(20);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(gateway_id);
    out
}

pub(super) fn decode_slice_data(slice_id: u64, bytes: &[u8]) -> Result<(u32, GatewayId)> {
    if bytes.len() != 20 {
        return Err(MetaError::Corrupt(format!(
            "slice record {slice_id}: {} bytes, expected 20",
            bytes.len()
        )));
    }
    let mut f = Fields(bytes);
    Ok((f.u32(), f.take::<16>()))
}
