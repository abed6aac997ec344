//! Recovery scan: rebuilds what the log holds from the device alone.
//!
//! Live segments are those with a valid header; they are read in sequence order and every record
//! is verified. Within a segment the scan stops at the first header that is not a record of this
//! segment's life (the end of what was written), or whose header checksum fails (a torn or
//! corrupt header: its length cannot be trusted). A record whose header is valid but whose data
//! checksum fails is reported as corrupt and skipped; it is never served and never uploaded.
//! Records must come in increasing lsn and non-decreasing generation order, so leftovers of an
//! earlier life that a later generation has partly overwritten are never taken for live data.
//! Recovery never writes; `inspect` uses the same scan.

use std::collections::HashSet;
use std::sync::Arc;

use crate::aligned::{AlignedBuf, ALIGN};
use crate::format::{
    RecordError, RecordHeader, RecordKind, SegmentHeader, Superblock, RECORD_HEADER_BYTES,
};
use crate::io::IoEngine;

#[derive(Debug, Clone, serde::Serialize)]
pub struct ScannedSegment {
    pub index: u64,
    pub sequence: u64,
    pub records: u64,
    /// Bytes from the segment start to the end of its last valid record.
    pub bytes: u64,
}

#[derive(Debug, Clone)]
pub struct ScannedBlock {
    pub key: String,
    pub lsn: u64,
    pub segment: usize,
    pub segment_sequence: u64,
    /// Device offset of the record header.
    pub device_offset: u64,
    pub header: RecordHeader,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct CorruptRecord {
    pub segment: u64,
    pub device_offset: u64,
    pub key: Option<String>,
    pub reason: String,
}

#[derive(Debug, Default)]
pub struct ScanReport {
    /// Live segments in sequence order (oldest first).
    pub segments: Vec<ScannedSegment>,
    pub blocks: Vec<ScannedBlock>,
    pub uploaded: HashSet<u64>,
    pub deleted: HashSet<u64>,
    pub corrupt: Vec<CorruptRecord>,
    pub max_lsn: u64,
    pub max_segment_sequence: u64,
}

/// Segments are read in chunks of this size, all in flight at once.
const READ_CHUNK: u64 = 8 << 20;

/// Scans every live segment of the device described by `sb`. The next segment is read while
/// the current one is verified, and each segment is read with all its chunks in flight, so the
/// scan runs at the device's read bandwidth rather than at one request at a time.
pub async fn scan(engine: &Arc<dyn IoEngine>, sb: &Superblock) -> std::io::Result<ScanReport> {
    let mut live = Vec::new();
    let headers = futures::future::join_all(
        (0..sb.segment_count)
            .map(|index| engine.read_at(AlignedBuf::zeroed(ALIGN), sb.segment_offset(index))),
    )
    .await;
    for (index, header) in headers.into_iter().enumerate() {
        if let Some(h) = SegmentHeader::decode(&header?) {
            if h.device_uuid == sb.device_uuid {
                live.push((h.sequence, index as u64));
            }
        }
    }
    live.sort_unstable();
    let mut report = ScanReport::default();
    let mut next = live
        .first()
        .map(|&(_, index)| tokio::spawn(read_segment(engine.clone(), sb.clone(), index)));
    for (i, &(sequence, index)) in live.iter().enumerate() {
        let segment = next
            .take()
            .expect("a read was started for every live segment");
        next = live
            .get(i + 1)
            .map(|&(_, index)| tokio::spawn(read_segment(engine.clone(), sb.clone(), index)));
        let data = segment.await.map_err(std::io::Error::other)??;
        scan_segment(&data, sb, index, sequence, &mut report);
        report.max_segment_sequence = report.max_segment_sequence.max(sequence);
    }
    Ok(report)
}

async fn read_segment(
    engine: Arc<dyn IoEngine>,
    sb: Superblock,
    index: u64,
) -> std::io::Result<Vec<AlignedBuf>> {
    let base = sb.segment_offset(index);
    let reads = (0..sb.segment_bytes.div_ceil(READ_CHUNK)).map(|c| {
        let len = READ_CHUNK.min(sb.segment_bytes - c * READ_CHUNK);
        engine.read_at(AlignedBuf::zeroed(len as usize), base + c * READ_CHUNK)
    });
    futures::future::try_join_all(reads).await
}

/// A segment's bytes, held as consecutive chunks.
struct SegmentBytes<'a>(&'a [AlignedBuf]);

impl SegmentBytes<'_> {
    /// `len` bytes from `pos`, borrowed when they lie in one chunk, copied when they straddle two.
    fn range(&self, pos: usize, len: usize) -> std::borrow::Cow<'_, [u8]> {
        let chunk = READ_CHUNK as usize;
        let (first, at) = (pos / chunk, pos % chunk);
        if at + len <= self.0[first].len() {
            return std::borrow::Cow::Borrowed(&self.0[first][at..at + len]);
        }
        let mut out = Vec::with_capacity(len);
        let mut pos = pos;
        while out.len() < len {
            let (c, at) = (pos / chunk, pos % chunk);
            let take = (self.0[c].len() - at).min(len - out.len());
            out.extend_from_slice(&self.0[c][at..at + take]);
            pos += take;
        }
        std::borrow::Cow::Owned(out)
    }
}

fn scan_segment(
    chunks: &[AlignedBuf],
    sb: &Superblock,
    index: u64,
    sequence: u64,
    report: &mut ScanReport,
) {
    let bytes = SegmentBytes(chunks);
    let base = sb.segment_offset(index);
    let seg_bytes = sb.segment_bytes as usize;
    let mut pos = ALIGN; // past the segment header
                         // The segment header's generation is no floor for its records: rejecting older ones made
                         // the power-loss model fail more often (README, "Known gaps"). A duplicated lsn is caught,
                         // reported and quarantined, when the upload queue is rebuilt.
    let (mut last_lsn, mut last_generation) = (0u64, 0u64);
    let mut records = 0;
    while pos + ALIGN <= seg_bytes {
        let header = match RecordHeader::decode(&bytes.range(pos, ALIGN), sequence) {
            Ok(h) => h,
            Err(RecordError::End) => break,
            Err(RecordError::HeaderChecksum) => {
                report.corrupt.push(CorruptRecord {
                    segment: index,
                    device_offset: base + pos as u64,
                    key: None,
                    reason:
                        "record header checksum mismatch (torn or corrupt); rest of segment skipped"
                            .into(),
                });
                break;
            }
        };
        if header.lsn <= last_lsn || header.generation < last_generation {
            // Leftover of an earlier life of this segment, past what a later generation wrote.
            break;
        }
        let rec_len = header.record_len() as usize;
        if pos + rec_len > seg_bytes {
            report.corrupt.push(CorruptRecord {
                segment: index,
                device_offset: base + pos as u64,
                key: None,
                reason: format!("record of {rec_len} bytes runs past the end of its segment"),
            });
            break;
        }
        let record = bytes.range(pos, rec_len);
        let key = String::from_utf8_lossy(&record[RECORD_HEADER_BYTES..header.data_offset()])
            .into_owned();
        let data = &record[header.data_offset()..header.data_offset() + header.data_len as usize];
        last_lsn = header.lsn;
        last_generation = header.generation;
        report.max_lsn = report.max_lsn.max(header.lsn);
        let device_offset = base + pos as u64;
        pos += rec_len;
        if crc32c::crc32c(data) != header.data_crc {
            tracing::error!(segment = index, device_offset, %key, "corrupt record: data checksum mismatch; it will not be served or uploaded");
            report.corrupt.push(CorruptRecord {
                segment: index,
                device_offset,
                key: Some(key).filter(|k| !k.is_empty()),
                reason: "data checksum mismatch".into(),
            });
            continue;
        }
        records += 1;
        match header.kind {
            RecordKind::Block | RecordKind::Cached => report.blocks.push(ScannedBlock {
                key,
                lsn: header.lsn,
                segment: index as usize,
                segment_sequence: sequence,
                device_offset,
                header,
            }),
            RecordKind::Uploaded | RecordKind::Deleted => {
                let set = if header.kind == RecordKind::Uploaded {
                    &mut report.uploaded
                } else {
                    &mut report.deleted
                };
                set.extend(
                    data.chunks_exact(8)
                        .map(|c| u64::from_le_bytes(c.try_into().unwrap())),
                );
            }
        }
    }
    report.segments.push(ScannedSegment {
        index,
        sequence,
        records,
        bytes: pos as u64,
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::record_len;

    const SEGMENT: u64 = 1 << 20;

    fn superblock() -> Superblock {
        Superblock {
            format_version: 1,
            device_uuid: [3; 16],
            gateway_id: [4; 16],
            generation: 5,
            device_bytes: 4 * SEGMENT,
            segment_bytes: SEGMENT,
            segment_count: 2,
        }
    }

    /// Writes a block record of `generation` and `lsn` at `pos` of a segment image.
    fn put_block(image: &mut [u8], pos: usize, sequence: u64, generation: u64, lsn: u64) -> usize {
        let key = format!("{lsn}_0_100");
        let data = vec![lsn as u8; 100];
        let len = record_len(key.len(), data.len()) as usize;
        let record = &mut image[pos..pos + len];
        let header = RecordHeader {
            kind: RecordKind::Block,
            key_len: key.len() as u16,
            data_len: data.len() as u32,
            segment_sequence: sequence,
            generation,
            lsn,
            data_crc: crc32c::crc32c(&data),
        };
        let data_at = RECORD_HEADER_BYTES + key.len();
        record[data_at..data_at + data.len()].copy_from_slice(&data);
        header.encode(record, key.as_bytes());
        pos + len
    }

    fn scanned_lsns(image: Vec<u8>, sequence: u64) -> Vec<u64> {
        let mut chunk = AlignedBuf::zeroed(image.len());
        chunk.copy_from_slice(&image);
        let mut report = ScanReport::default();
        scan_segment(&[chunk], &superblock(), 0, sequence, &mut report);
        report.blocks.iter().map(|b| b.lsn).collect()
    }

    #[test]
    fn records_of_later_lives_after_the_header_are_read() {
        let mut image = vec![0u8; SEGMENT as usize];
        let next = put_block(&mut image, ALIGN, 9, 6, 41);
        put_block(&mut image, next, 9, 7, 42);
        assert_eq!(scanned_lsns(image, 9), [41, 42]);
    }
}
