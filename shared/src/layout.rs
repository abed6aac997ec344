//! Chunks, slices, blocks and the object key of a block (DESIGN.md, "Data model").
//!
//! A block key is `chunks/{id / 1_000_000}/{id / 1_000}/{id}_{block_index}_{block_len}`. Blocks are
//! immutable: the same key always names the same bytes, so uploads are idempotent.

use std::fmt;
use std::str::FromStr;

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
