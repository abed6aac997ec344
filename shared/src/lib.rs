//! Pieces every stagefs crate agrees on: the block layout and object keys, object store URLs,
//! and human-readable sizes.

pub mod layout;
pub mod meta;
pub mod size;
pub mod store;

pub use layout::{BlockKey, KeyError, BLOCK_SIZE, CHUNK_SIZE};
