//! File offsets to chunks, slices to blocks, and which slice shows which byte of a chunk: the
//! pure functions of [`shared::layout`], which the gateway's slice compaction shares.

pub use shared::layout::{
    block_count, block_len, block_pieces, chunk_pieces, range_pieces, resolve, BlockPiece,
    ChunkPiece, RangePiece, Segment, Source,
};
pub use shared::{BLOCK_SIZE, CHUNK_SIZE};
