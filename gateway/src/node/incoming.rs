//! A block arriving from a client: its key checked against its length, its bytes gathered into
//! the aligned record the log writes, and its checksum verified before anything is staged.

use shared::BlockKey;

use crate::aligned::AlignedBuf;
use crate::format::{record_len, RECORD_HEADER_BYTES};

/// Why a block a client sent is refused before it reaches the device.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BlockInputError {
    /// The request is malformed (wrong length, truncated, too long).
    #[error("{0}")]
    Invalid(String),
    /// The bytes do not match the checksum the client sent with them.
    #[error("{0}")]
    Checksum(String),
}

/// A block being received: validated key, data accumulating in its record buffer.
pub struct IncomingBlock {
    key: BlockKey,
    record: AlignedBuf,
    data_start: usize,
    received: usize,
    crc: u32,
}

impl IncomingBlock {
    /// A block whose header names `key` (text form `key_text`) and `total_len` bytes.
    pub fn start(
        key_text: &str,
        total_len: u64,
    ) -> Result<(BlockKey, IncomingBlock), BlockInputError> {
        let key: BlockKey = key_text
            .parse()
            .map_err(|e: shared::KeyError| BlockInputError::Invalid(e.to_string()))?;
        if total_len != key.len() {
            return Err(BlockInputError::Invalid(format!(
                "total_len {total_len} does not match the length {} in block key {key_text}",
                key.len(),
            )));
        }
        Ok((key, IncomingBlock::for_key(key, key_text.len())))
    }

    /// A record buffer for `key`, whose text form is `key_len` bytes long.
    pub fn for_key(key: BlockKey, key_len: usize) -> IncomingBlock {
        let total = key.len() as usize;
        let mut record = AlignedBuf::uninit(record_len(key_len, total) as usize);
        let data_start = RECORD_HEADER_BYTES + key_len;
        // A reused buffer holds an earlier record: zero the padding after this one's data.
        record[data_start + total..].fill(0);
        IncomingBlock {
            key,
            record,
            data_start,
            received: 0,
            crc: 0,
        }
    }

    pub fn append(&mut self, data: &[u8]) -> Result<(), BlockInputError> {
        let total = self.key.len() as usize;
        if self.received + data.len() > total {
            return Err(BlockInputError::Invalid(format!(
                "block {}: stream carries more than total_len {total} bytes",
                self.key
            )));
        }
        let at = self.data_start + self.received;
        self.record[at..at + data.len()].copy_from_slice(data);
        self.crc = crc32c::crc32c_append(self.crc, data);
        self.received += data.len();
        Ok(())
    }

    /// The record, once every byte arrived and the checksum matches the header's.
    pub fn finish(self, expected_crc: u32) -> Result<(AlignedBuf, u32), BlockInputError> {
        let total = self.key.len() as usize;
        if self.received != total {
            return Err(BlockInputError::Invalid(format!(
                "block {}: stream truncated, got {} of {total} bytes",
                self.key, self.received
            )));
        }
        if self.crc != expected_crc {
            return Err(BlockInputError::Checksum(format!(
                "block {}: crc32c mismatch, header says {expected_crc:#010x}, data has {:#010x}",
                self.key, self.crc
            )));
        }
        Ok((self.record, self.crc))
    }
}

/// A record buffer for `key` holding `data` where the log expects it (tests and tools; `data`
/// must be the key's length).
pub fn record_with(key: &BlockKey, data: &[u8]) -> AlignedBuf {
    let mut block = IncomingBlock::for_key(*key, key.to_string().len());
    block
        .append(data)
        .unwrap_or_else(|e| panic!("record_with: {e}"));
    block.record
}
