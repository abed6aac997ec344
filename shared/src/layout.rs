//! Chunks, slices, blocks and the object key of a block (DESIGN.md, "Data model"), and which
//! slice shows which byte of a chunk. Pure functions: the client's read and write paths and the
//! gateway's slice compaction are built on them, and the unit tests check them on their own.
//!
//! - A file is cut into chunks of [`CHUNK_SIZE`]; a slice never crosses a chunk boundary.
//! - Block `b` of a slice of length `len` covers bytes `[b * BLOCK_SIZE, min(len, (b + 1) *
//!   BLOCK_SIZE))` of the slice, so every block but the last is full.
//! - Slices of a chunk come in commit order: a later slice shadows earlier ones where they
//!   overlap; slice id 0 is a hole; bytes no slice covers read as zeros.
//!
//! A block key is `chunks/{id / 1_000_000}/{id / 1_000}/{id}_{block_index}_{block_len}`. Blocks are
//! immutable: the same key always names the same bytes, so uploads are idempotent.

use std::fmt;
use std::ops::Range;
use std::str::FromStr;

use crate::meta::{GatewayId, Slice};

/// A file is cut into chunks of this size.
pub const CHUNK_SIZE: u64 = 64 * 1024 * 1024;
/// A slice is cut into blocks of at most this size; each block becomes one object.
pub const BLOCK_SIZE: u64 = 4 * 1024 * 1024;

/// The identity of one block: which slice, which block of it, and its exact length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockKey {
    pub slice_id: u64,
    pub block_index: u32,
    pub block_len: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error(
        "block key {key:?} is malformed: expected chunks/<id/1000000>/<id/1000>/<id>_<index>_<len>"
    )]
    Malformed { key: String },
    #[error("block key {key:?} has directories that do not match slice id {slice_id}")]
    WrongDirectories { key: String, slice_id: u64 },
    #[error("block key {key:?} has length {len}, must be 1..={max}")]
    BadLength { key: String, len: u64, max: u64 },
}

impl BlockKey {
    pub fn new(slice_id: u64, block_index: u32, block_len: u32) -> Result<Self, KeyError> {
        let key = BlockKey {
            slice_id,
            block_index,
            block_len,
        };
        key.check_len()?;
        Ok(key)
    }

    fn check_len(&self) -> Result<(), KeyError> {
        if self.block_len == 0 || u64::from(self.block_len) > BLOCK_SIZE {
            return Err(KeyError::BadLength {
                key: self.to_string(),
                len: self.block_len.into(),
                max: BLOCK_SIZE,
            });
        }
        Ok(())
    }

    pub fn len(&self) -> u64 {
        self.block_len.into()
    }

    pub fn is_empty(&self) -> bool {
        self.block_len == 0
    }

    /// The block's object in the store: its key, as a path (the one place the two meet).
    pub fn object_path(&self) -> object_store::path::Path {
        object_store::path::Path::from(self.to_string())
    }
}

impl fmt::Display for BlockKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let id = self.slice_id;
        write!(
            f,
            "chunks/{}/{}/{}_{}_{}",
            id / 1_000_000,
            id / 1_000,
            id,
            self.block_index,
            self.block_len
        )
    }
}

impl FromStr for BlockKey {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let malformed = || KeyError::Malformed { key: s.to_string() };
        let rest = s.strip_prefix("chunks/").ok_or_else(malformed)?;
        let mut parts = rest.split('/');
        let (Some(d1), Some(d2), Some(name), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(malformed());
        };
        let mut fields = name.split('_');
        let (Some(id), Some(index), Some(len), None) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            return Err(malformed());
        };
        let number = |t: &str| -> Result<u64, KeyError> {
            // Canonical decimal only, so one block has exactly one key.
            if t.is_empty()
                || !t.bytes().all(|b| b.is_ascii_digit())
                || (t.len() > 1 && t.starts_with('0'))
            {
                return Err(malformed());
            }
            t.parse::<u64>().map_err(|_| malformed())
        };
        let slice_id = number(id)?;
        if number(d1)? != slice_id / 1_000_000 || number(d2)? != slice_id / 1_000 {
            return Err(KeyError::WrongDirectories {
                key: s.to_string(),
                slice_id,
            });
        }
        let block_index = u32::try_from(number(index)?).map_err(|_| malformed())?;
        let len = number(len)?;
        if len == 0 || len > BLOCK_SIZE {
            return Err(KeyError::BadLength {
                key: s.to_string(),
                len,
                max: BLOCK_SIZE,
            });
        }
        Ok(BlockKey {
            slice_id,
            block_index,
            block_len: len as u32,
        })
    }
}

/// The part of a file range that falls into one chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkPiece {
    pub chunk_index: u64,
    pub offset_in_chunk: u64,
    pub len: u64,
    /// Where this piece starts within the whole range.
    pub offset_in_range: u64,
}

impl ChunkPiece {
    pub fn end_in_chunk(&self) -> u64 {
        self.offset_in_chunk + self.len
    }
}

/// Cuts the file range `[offset, offset + len)` at chunk boundaries.
pub fn chunk_pieces(offset: u64, len: u64) -> Vec<ChunkPiece> {
    let mut pieces = Vec::new();
    let end = offset.saturating_add(len);
    let mut at = offset;
    while at < end {
        let chunk_index = at / CHUNK_SIZE;
        let offset_in_chunk = at % CHUNK_SIZE;
        let piece_len = (CHUNK_SIZE - offset_in_chunk).min(end - at);
        pieces.push(ChunkPiece {
            chunk_index,
            offset_in_chunk,
            len: piece_len,
            offset_in_range: at - offset,
        });
        at += piece_len;
    }
    pieces
}

/// Number of blocks of a slice of `slice_len` bytes.
pub fn block_count(slice_len: u64) -> u64 {
    slice_len.div_ceil(BLOCK_SIZE)
}

/// Length of block `index` of a slice of `slice_len` bytes (0 past its end).
pub fn block_len(slice_len: u64, index: u64) -> u64 {
    slice_len
        .saturating_sub(index.saturating_mul(BLOCK_SIZE))
        .min(BLOCK_SIZE)
}

/// The part of a read of slice bytes that one block serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockPiece {
    pub key: BlockKey,
    pub offset_in_block: u64,
    pub len: u64,
    /// Where this piece starts within the bytes read from the slice.
    pub offset_in_read: u64,
}

impl BlockPiece {
    pub fn range_in_block(&self) -> Range<u64> {
        self.offset_in_block..self.offset_in_block + self.len
    }
}

/// The blocks (and ranges within them) holding bytes `[offset_in_slice, offset_in_slice + len)`
/// of slice `slice_id`, which is `slice_len` bytes long. Bytes past the slice's end are not
/// served by any block and are left out.
pub fn block_pieces(
    slice_id: u64,
    slice_len: u64,
    offset_in_slice: u64,
    len: u64,
) -> Vec<BlockPiece> {
    let end = offset_in_slice.saturating_add(len).min(slice_len);
    let mut pieces = Vec::new();
    let mut at = offset_in_slice;
    while at < end {
        let index = at / BLOCK_SIZE;
        let block_start = index * BLOCK_SIZE;
        let this_block_len = block_len(slice_len, index);
        let piece_end = (block_start + this_block_len).min(end);
        let (Ok(block_index), Ok(block_len32)) =
            (u32::try_from(index), u32::try_from(this_block_len))
        else {
            break;
        };
        pieces.push(BlockPiece {
            key: BlockKey {
                slice_id,
                block_index,
                block_len: block_len32,
            },
            offset_in_block: at - block_start,
            len: piece_end - at,
            offset_in_read: at - offset_in_slice,
        });
        at = piece_end;
    }
    pieces
}

/// Where the bytes of one stretch of a chunk come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A hole, or bytes no slice covers.
    Zeros,
    /// Bytes of a slice with data.
    Slice {
        slice_id: u64,
        slice_len: u64,
        /// Where this stretch starts within the slice.
        offset_in_slice: u64,
        gateway_id: GatewayId,
    },
}

/// A stretch `[start, start + len)` of a chunk and where its bytes come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub start: u64,
    pub len: u64,
    pub source: Source,
}

/// Which slice shows each byte of `range` (offsets within the chunk), given the chunk's slices in
/// commit order. The segments are sorted, disjoint and cover `range` exactly.
pub fn resolve(slices: &[Slice], range: Range<u64>) -> Vec<Segment> {
    let mut segments = Vec::new();
    // Parts of the range no later slice has claimed yet, sorted and disjoint.
    let mut uncovered = vec![range.clone()];
    for slice in slices.iter().rev() {
        if uncovered.is_empty() {
            break;
        }
        let slice_start = u64::from(slice.offset_in_chunk);
        let slice_end = slice.end_in_chunk().min(CHUNK_SIZE);
        if slice_start >= slice_end {
            continue;
        }
        let mut still_uncovered = Vec::with_capacity(uncovered.len() + 1);
        for gap in uncovered {
            let start = gap.start.max(slice_start);
            let end = gap.end.min(slice_end);
            if start >= end {
                still_uncovered.push(gap);
                continue;
            }
            if gap.start < start {
                still_uncovered.push(gap.start..start);
            }
            segments.push(Segment {
                start,
                len: end - start,
                source: if slice.slice_id == Slice::HOLE_ID {
                    Source::Zeros
                } else {
                    Source::Slice {
                        slice_id: slice.slice_id,
                        slice_len: u64::from(slice.len),
                        offset_in_slice: start - slice_start,
                        gateway_id: slice.gateway_id,
                    }
                },
            });
            if end < gap.end {
                still_uncovered.push(end..gap.end);
            }
        }
        uncovered = still_uncovered;
    }
    segments.extend(uncovered.into_iter().map(|gap| Segment {
        start: gap.start,
        len: gap.end - gap.start,
        source: Source::Zeros,
    }));
    segments.sort_by_key(|s| s.start);
    segments
}

/// The bytes of a chunk that `slices` cover at least partly: from the lowest start to the
/// highest end (empty for no slices). A compacted slice must span exactly this.
pub fn span(slices: &[Slice]) -> Range<u64> {
    let start = slices.iter().map(|s| u64::from(s.offset_in_chunk)).min();
    let end = slices.iter().map(Slice::end_in_chunk).max();
    start.unwrap_or(0)..end.unwrap_or(0)
}

/// Bytes of one block that serve a chunk range, and where they go within the range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RangePiece {
    pub block: BlockPiece,
    /// The gateway that staged the block's slice (the first place to read it from).
    pub gateway_id: GatewayId,
    pub offset_in_range: u64,
}

/// The block pieces that serve bytes `range` of a chunk whose slices are `slices` (commit
/// order). Bytes no slice with data covers are served by none: they read as zeros.
pub fn range_pieces(slices: &[Slice], range: Range<u64>) -> Vec<RangePiece> {
    let mut pieces = Vec::new();
    for segment in resolve(slices, range.clone()) {
        let Source::Slice {
            slice_id,
            slice_len,
            offset_in_slice,
            gateway_id,
        } = segment.source
        else {
            continue;
        };
        let segment_in_range = segment.start - range.start;
        for block in block_pieces(slice_id, slice_len, offset_in_slice, segment.len) {
            pieces.push(RangePiece {
                block,
                gateway_id,
                offset_in_range: segment_in_range + block.offset_in_read,
            });
        }
    }
    pieces
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn formats_the_documented_key() {
        let key = BlockKey::new(1_234_567, 3, 4096).unwrap();
        assert_eq!(key.to_string(), "chunks/1/1234/1234567_3_4096");
    }

    #[test]
    fn rejects_bad_keys() {
        for bad in [
            "",
            "chunks/0/0/1_0",
            "chunks/0/0/1_0_0",
            "chunks/0/0/1_0_4194305",
            "chunks/0/1/1_0_10",
            "chunks/0/0/01_0_10",
            "chunks/0/0/1_0_10/x",
            "blocks/0/0/1_0_10",
            "chunks/0/0/1_-1_10",
            "chunks/0/0/1_0_10_",
        ] {
            assert!(bad.parse::<BlockKey>().is_err(), "{bad:?} must be rejected");
        }
    }

    proptest! {
        #[test]
        fn round_trips(id in any::<u64>(), index in any::<u32>(), len in 1u32..=BLOCK_SIZE as u32) {
            let key = BlockKey::new(id, index, len).unwrap();
            prop_assert_eq!(key.to_string().parse::<BlockKey>().unwrap(), key);
        }
    }
}
