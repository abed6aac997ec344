//! The on-device format of the staging log (format versions 1 and 2).
//!
//! ```text
//! offset 0        superblock copy 0   (ALIGN bytes)
//! offset ALIGN    superblock copy 1   (ALIGN bytes)
//! data_start      segment 0 .. segment N-1, each `segment_bytes` long
//! segment         [segment header: ALIGN bytes][record][record]...
//! record          [header 48 B][key][data], padded to ALIGN
//! meta_offset     version 2 only: the metadata region, `meta_bytes` long, after the segments
//!                 (its own layout: `meta::redb_region`)
//! ```
//! Version 2 is version 1 plus the metadata region's place in the superblock: the first 92 bytes
//! (fields and their crc at 88) are the same, so a version-1 gateway reads a valid superblock of
//! an unknown version and refuses the device rather than taking it for unformatted. A device
//! formatted without a region is written as version 1, which every release serves.
//! Every structure carries a crc32c. A record's header crc covers its header fields, its key and
//! the crc32c of its data, so one verified header plus a verified data crc covers every byte.
//! Superblocks are written alternately (highest valid generation wins), so a torn superblock
//! write never loses the device.

use crate::aligned::{align_up, ALIGN};

/// The newest format written (a device with a metadata region); version 1 (no region) is still
/// written without one, and both are read.
pub const FORMAT_VERSION: u32 = 2;
/// The format of a device without a metadata region, readable by every release.
pub const FORMAT_VERSION_NO_REGION: u32 = 1;
const SUPERBLOCK_MAGIC: &[u8; 8] = b"STGFSSB\x01";
const SEGMENT_MAGIC: &[u8; 8] = b"STGFSSEG";
const RECORD_MAGIC: u32 = 0x5354_5243; // "STRC"
pub const RECORD_HEADER_BYTES: usize = 48;
pub const MAX_KEY_BYTES: usize = 256;
pub const DATA_START: u64 = 2 * ALIGN as u64;

/// Little-endian field access at fixed offsets.
struct Fields<'a>(&'a [u8]);
impl Fields<'_> {
    fn u16(&self, at: usize) -> u16 {
        u16::from_le_bytes(self.0[at..at + 2].try_into().unwrap())
    }
    fn u32(&self, at: usize) -> u32 {
        u32::from_le_bytes(self.0[at..at + 4].try_into().unwrap())
    }
    fn u64(&self, at: usize) -> u64 {
        u64::from_le_bytes(self.0[at..at + 8].try_into().unwrap())
    }
    fn bytes16(&self, at: usize) -> [u8; 16] {
        self.0[at..at + 16].try_into().unwrap()
    }
}

fn put(buf: &mut [u8], at: usize, bytes: &[u8]) {
    buf[at..at + bytes.len()].copy_from_slice(bytes);
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    pub format_version: u32,
    pub device_uuid: [u8; 16],
    pub gateway_id: [u8; 16],
    pub generation: u64,
    pub device_bytes: u64,
    pub segment_bytes: u64,
    pub segment_count: u64,
}

/// Where the embedded metadata lives on the device (format version 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetaRegion {
    pub offset: u64,
    pub bytes: u64,
}

#[derive(Debug, PartialEq, Eq)]
pub enum SuperblockError {
    /// No stagefs magic: the device was never formatted (or belongs to something else).
    NotFormatted,
    /// A stagefs superblock of another format version.
    Version(u32),
    Checksum,
    /// Valid checksums, but a metadata region over the log or past the end of the device.
    BadRegion,
}

const SB_CRC_AT: usize = 88;
/// Version 2: the metadata region (offset, size) and a crc over everything before it.
const SB_META_OFFSET_AT: usize = 96;
const SB_META_BYTES_AT: usize = 104;
const SB_CRC2_AT: usize = 112;

impl Superblock {
    /// Encodes a superblock without a metadata region.
    pub fn encode(&self, buf: &mut [u8]) {
        self.encode_with(None, buf)
    }

    /// Encodes the superblock of a device with `region` (format version 2 and later carry it;
    /// version 1 has no place for it, so `region` must be `None` there).
    pub fn encode_with(&self, region: Option<MetaRegion>, buf: &mut [u8]) {
        debug_assert!(region.is_none() || self.format_version >= 2);
        buf[..ALIGN].fill(0);
        put(buf, 0, SUPERBLOCK_MAGIC);
        put(buf, 8, &self.format_version.to_le_bytes());
        put(buf, 16, &self.device_uuid);
        put(buf, 32, &self.gateway_id);
        put(buf, 48, &self.generation.to_le_bytes());
        put(buf, 56, &self.device_bytes.to_le_bytes());
        put(buf, 64, &self.segment_bytes.to_le_bytes());
        put(buf, 72, &self.segment_count.to_le_bytes());
        put(buf, 80, &DATA_START.to_le_bytes());
        let crc = crc32c::crc32c(&buf[..SB_CRC_AT]);
        put(buf, SB_CRC_AT, &crc.to_le_bytes());
        if self.format_version >= 2 {
            let region = region.unwrap_or(MetaRegion {
                offset: 0,
                bytes: 0,
            });
            put(buf, SB_META_OFFSET_AT, &region.offset.to_le_bytes());
            put(buf, SB_META_BYTES_AT, &region.bytes.to_le_bytes());
            let crc = crc32c::crc32c(&buf[..SB_CRC2_AT]);
            put(buf, SB_CRC2_AT, &crc.to_le_bytes());
        }
    }

    pub fn decode(buf: &[u8]) -> Result<Superblock, SuperblockError> {
        Superblock::decode_with(buf).map(|(sb, _)| sb)
    }

    /// Decodes a superblock of either version, with its metadata region if it has one.
    pub fn decode_with(buf: &[u8]) -> Result<(Superblock, Option<MetaRegion>), SuperblockError> {
        if &buf[..8] != SUPERBLOCK_MAGIC {
            return Err(SuperblockError::NotFormatted);
        }
        let f = Fields(buf);
        let version = f.u32(8);
        if crc32c::crc32c(&buf[..SB_CRC_AT]) != f.u32(SB_CRC_AT) {
            return Err(SuperblockError::Checksum);
        }
        let region = match version {
            1 => None,
            2 => {
                if crc32c::crc32c(&buf[..SB_CRC2_AT]) != f.u32(SB_CRC2_AT) {
                    return Err(SuperblockError::Checksum);
                }
                let bytes = f.u64(SB_META_BYTES_AT);
                (bytes > 0).then(|| MetaRegion {
                    offset: f.u64(SB_META_OFFSET_AT),
                    bytes,
                })
            }
            _ => return Err(SuperblockError::Version(version)),
        };
        let sb = Superblock {
            format_version: version,
            device_uuid: f.bytes16(16),
            gateway_id: f.bytes16(32),
            generation: f.u64(48),
            device_bytes: f.u64(56),
            segment_bytes: f.u64(64),
            segment_count: f.u64(72),
        };
        // A region that overlaps the log or leaves the device is damage, not a layout.
        if let Some(r) = region {
            let log_end = sb.segment_offset(sb.segment_count);
            if r.offset < log_end
                || r.offset
                    .checked_add(r.bytes)
                    .is_none_or(|end| end > sb.device_bytes)
            {
                return Err(SuperblockError::BadRegion);
            }
        }
        Ok((sb, region))
    }

    pub fn segment_offset(&self, index: u64) -> u64 {
        DATA_START + index * self.segment_bytes
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    pub sequence: u64,
    pub generation: u64,
    pub device_uuid: [u8; 16],
}

const SEG_CRC_AT: usize = 40;

impl SegmentHeader {
    pub fn encode(&self, buf: &mut [u8]) {
        buf[..ALIGN].fill(0);
        put(buf, 0, SEGMENT_MAGIC);
        put(buf, 8, &self.sequence.to_le_bytes());
        put(buf, 16, &self.generation.to_le_bytes());
        put(buf, 24, &self.device_uuid);
        let crc = crc32c::crc32c(&buf[..SEG_CRC_AT]);
        put(buf, SEG_CRC_AT, &crc.to_le_bytes());
    }

    /// `None` for a free (zeroed), never-written or damaged header.
    pub fn decode(buf: &[u8]) -> Option<SegmentHeader> {
        let f = Fields(buf);
        if &buf[..8] != SEGMENT_MAGIC || crc32c::crc32c(&buf[..SEG_CRC_AT]) != f.u32(SEG_CRC_AT) {
            return None;
        }
        Some(SegmentHeader {
            sequence: f.u64(8),
            generation: f.u64(16),
            device_uuid: f.bytes16(24),
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum RecordKind {
    /// A staged block: key and data.
    Block = 1,
    /// Data is a list of little-endian u64 lsns whose blocks are now in the object store.
    Uploaded = 2,
    /// Data is a list of lsns whose blocks were deleted and must never be uploaded.
    Deleted = 3,
    /// A block fetched from the object store and kept as read cache (`--read-cache`): key and
    /// data as in `Block`, but already in the store, so never uploaded and never pinning its
    /// segment.
    Cached = 4,
}

impl RecordKind {
    fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(RecordKind::Block),
            2 => Some(RecordKind::Uploaded),
            3 => Some(RecordKind::Deleted),
            4 => Some(RecordKind::Cached),
            _ => None,
        }
    }
}

/// The fixed part of a record, as stored in its first [`RECORD_HEADER_BYTES`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordHeader {
    pub kind: RecordKind,
    pub key_len: u16,
    pub data_len: u32,
    pub segment_sequence: u64,
    pub generation: u64,
    /// Log sequence number: unique and increasing in write order within a generation.
    pub lsn: u64,
    pub data_crc: u32,
}

#[derive(Debug, PartialEq, Eq)]
pub enum RecordError {
    /// Not a record of this segment's life: the end of the written log.
    End,
    /// Looks like a record of this segment but its header checksum fails: torn or corrupt.
    HeaderChecksum,
}

impl RecordHeader {
    /// Bytes the whole record occupies on the device.
    pub fn record_len(&self) -> u64 {
        record_len(self.key_len as usize, self.data_len as usize)
    }

    pub fn data_offset(&self) -> usize {
        RECORD_HEADER_BYTES + self.key_len as usize
    }

    /// Writes the header for `key` into the start of `record`, whose data is already in place.
    pub fn encode(&self, record: &mut [u8], key: &[u8]) {
        assert_eq!(key.len(), self.key_len as usize);
        put(record, 0, &RECORD_MAGIC.to_le_bytes());
        record[4] = self.kind as u8;
        record[5] = 0;
        put(record, 6, &self.key_len.to_le_bytes());
        put(record, 8, &self.data_len.to_le_bytes());
        put(record, 12, &self.data_crc.to_le_bytes());
        put(record, 16, &self.segment_sequence.to_le_bytes());
        put(record, 24, &self.generation.to_le_bytes());
        put(record, 32, &self.lsn.to_le_bytes());
        put(record, 40, &[0; 8]);
        put(record, RECORD_HEADER_BYTES, key);
        let crc = header_crc(record, self.key_len as usize);
        put(record, HEADER_CRC_AT, &crc.to_le_bytes());
    }

    /// Decodes and checks the header at the start of `buf` (which must hold the header and key).
    /// `segment_sequence` is the live sequence of the segment being read.
    pub fn decode(buf: &[u8], segment_sequence: u64) -> Result<RecordHeader, RecordError> {
        let f = Fields(buf);
        if f.u32(0) != RECORD_MAGIC || f.u64(16) != segment_sequence {
            return Err(RecordError::End);
        }
        let key_len = f.u16(6);
        if key_len as usize > MAX_KEY_BYTES {
            return Err(RecordError::HeaderChecksum);
        }
        if header_crc(buf, key_len as usize) != f.u32(HEADER_CRC_AT) {
            return Err(RecordError::HeaderChecksum);
        }
        let kind = RecordKind::from_u8(buf[4]).ok_or(RecordError::HeaderChecksum)?;
        Ok(RecordHeader {
            kind,
            key_len,
            data_len: f.u32(8),
            data_crc: f.u32(12),
            segment_sequence,
            generation: f.u64(24),
            lsn: f.u64(32),
        })
    }
}

/// The header crc sits in the header's last 4 bytes and covers everything before it and the key.
const HEADER_CRC_AT: usize = RECORD_HEADER_BYTES - 4;

fn header_crc(record: &[u8], key_len: usize) -> u32 {
    let crc = crc32c::crc32c(&record[..HEADER_CRC_AT]);
    crc32c::crc32c_append(
        crc,
        &record[RECORD_HEADER_BYTES..RECORD_HEADER_BYTES + key_len],
    )
}

pub fn record_len(key_len: usize, data_len: usize) -> u64 {
    align_up((RECORD_HEADER_BYTES + key_len + data_len) as u64)
}

/// Bytes read to decode any record header plus its key.
pub const RECORD_PREFIX_BYTES: usize = ALIGN;
const _: () = assert!(RECORD_HEADER_BYTES + MAX_KEY_BYTES <= RECORD_PREFIX_BYTES);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn superblock_round_trip_and_checks() {
        let sb = Superblock {
            format_version: FORMAT_VERSION,
            device_uuid: [7; 16],
            gateway_id: [9; 16],
            generation: 3,
            device_bytes: 1 << 30,
            segment_bytes: 16 << 20,
            segment_count: 63,
        };
        let mut buf = vec![0u8; ALIGN];
        sb.encode(&mut buf);
        assert_eq!(Superblock::decode(&buf), Ok(sb.clone()));
        buf[50] ^= 1;
        assert_eq!(Superblock::decode(&buf), Err(SuperblockError::Checksum));
        assert_eq!(
            Superblock::decode(&[0u8; ALIGN]),
            Err(SuperblockError::NotFormatted)
        );
        let mut v3 = sb.clone();
        v3.format_version = 3;
        v3.encode(&mut buf);
        assert_eq!(Superblock::decode(&buf), Err(SuperblockError::Version(3)));
    }

    /// The bytes a version-1 gateway wrote (before the metadata region existed), built by hand
    /// from its layout: they decode as they did, with no region.
    #[test]
    fn an_old_format_superblock_still_decodes() {
        let mut buf = vec![0u8; ALIGN];
        put(&mut buf, 0, b"STGFSSB\x01");
        put(&mut buf, 8, &1u32.to_le_bytes());
        put(&mut buf, 16, &[7; 16]);
        put(&mut buf, 32, &[9; 16]);
        put(&mut buf, 48, &5u64.to_le_bytes());
        put(&mut buf, 56, &(1u64 << 30).to_le_bytes());
        put(&mut buf, 64, &(16u64 << 20).to_le_bytes());
        put(&mut buf, 72, &63u64.to_le_bytes());
        put(&mut buf, 80, &8192u64.to_le_bytes());
        let crc = crc32c::crc32c(&buf[..88]);
        put(&mut buf, 88, &crc.to_le_bytes());
        let (sb, region) = Superblock::decode_with(&buf).unwrap();
        assert_eq!(region, None);
        assert_eq!(
            sb,
            Superblock {
                format_version: 1,
                device_uuid: [7; 16],
                gateway_id: [9; 16],
                generation: 5,
                device_bytes: 1 << 30,
                segment_bytes: 16 << 20,
                segment_count: 63,
            }
        );
        // And what this build writes for a device without a region is those same bytes.
        let mut again = vec![0u8; ALIGN];
        sb.encode(&mut again);
        assert_eq!(again, buf);
    }

    #[test]
    fn a_version_2_superblock_carries_the_region_and_a_version_1_reader_refuses_it() {
        let sb = Superblock {
            format_version: FORMAT_VERSION,
            device_uuid: [1; 16],
            gateway_id: [2; 16],
            generation: 4,
            device_bytes: 1 << 30,
            segment_bytes: 16 << 20,
            segment_count: 60,
        };
        let region = MetaRegion {
            offset: sb.segment_offset(60),
            bytes: (1 << 30) - sb.segment_offset(60),
        };
        let mut buf = vec![0u8; ALIGN];
        sb.encode_with(Some(region), &mut buf);
        assert_eq!(
            Superblock::decode_with(&buf),
            Ok((sb.clone(), Some(region)))
        );
        // What a version-1 build checks (its crc at 88, then the version) passes, and the
        // version is not one it knows: it refuses instead of offering to format.
        assert_eq!(
            crc32c::crc32c(&buf[..SB_CRC_AT]),
            u32::from_le_bytes(buf[SB_CRC_AT..SB_CRC_AT + 4].try_into().unwrap())
        );
        assert_eq!(u32::from_le_bytes(buf[8..12].try_into().unwrap()), 2);
        // The region's fields are covered by their own crc.
        let mut damaged = buf.clone();
        damaged[SB_META_BYTES_AT] ^= 1;
        assert_eq!(
            Superblock::decode_with(&damaged),
            Err(SuperblockError::Checksum)
        );
        // A region over the log is refused even with valid crcs.
        let overlapping = MetaRegion {
            offset: sb.segment_offset(59),
            bytes: 1 << 20,
        };
        sb.encode_with(Some(overlapping), &mut buf);
        assert_eq!(
            Superblock::decode_with(&buf),
            Err(SuperblockError::BadRegion)
        );
        // Version 2 without a region.
        sb.encode_with(None, &mut buf);
        assert_eq!(Superblock::decode_with(&buf), Ok((sb, None)));
    }

    #[test]
    fn record_header_detects_every_flipped_bit() {
        let key = b"chunks/0/0/7_0_5";
        let mut rec = vec![0u8; ALIGN];
        let header = RecordHeader {
            kind: RecordKind::Block,
            key_len: key.len() as u16,
            data_len: 5,
            segment_sequence: 4,
            generation: 2,
            lsn: 99,
            data_crc: crc32c::crc32c(b"hello"),
        };
        header.encode(&mut rec, key);
        assert_eq!(RecordHeader::decode(&rec, 4), Ok(header.clone()));
        assert_eq!(RecordHeader::decode(&rec, 5), Err(RecordError::End));
        for byte in 0..RECORD_HEADER_BYTES + key.len() {
            for bit in 0..8 {
                let mut damaged = rec.clone();
                damaged[byte] ^= 1 << bit;
                assert_ne!(
                    RecordHeader::decode(&damaged, 4).as_ref(),
                    Ok(&header),
                    "flip at {byte}:{bit} undetected"
                );
            }
        }
    }
}
