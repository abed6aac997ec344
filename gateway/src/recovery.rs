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

const READ_WINDOW: usize = 8 << 20;

/// Scans every live segment of the device described by `sb`.
pub async fn scan(engine: &Arc<dyn IoEngine>, sb: &Superblock) -> std::io::Result<ScanReport> {
    let mut live = Vec::new();
    for index in 0..sb.segment_count {
        let header = engine
            .read_at(AlignedBuf::zeroed(ALIGN), sb.segment_offset(index))
            .await?;
        if let Some(h) = SegmentHeader::decode(&header) {
            if h.device_uuid == sb.device_uuid {
                live.push((h.sequence, index));
            }
        }
    }
    live.sort_unstable();
    let mut report = ScanReport::default();
    for (sequence, index) in live {
        scan_segment(engine, sb, index, sequence, &mut report).await?;
        report.max_segment_sequence = report.max_segment_sequence.max(sequence);
    }
    Ok(report)
}

async fn scan_segment(
    engine: &Arc<dyn IoEngine>,
    sb: &Superblock,
    index: u64,
    sequence: u64,
    report: &mut ScanReport,
) -> std::io::Result<()> {
    let base = sb.segment_offset(index);
    let seg_bytes = sb.segment_bytes as usize;
    // A sliding window over the segment; a record that does not fit is re-read from its start.
    let mut window = AlignedBuf::zeroed(READ_WINDOW.min(seg_bytes));
    let mut window_start = usize::MAX;
    let mut pos = ALIGN; // past the segment header
    let (mut last_lsn, mut last_generation) = (0u64, 0u64);
    let mut records = 0;
    while pos + ALIGN <= seg_bytes {
        let wanted_prefix = ALIGN;
        if window_start == usize::MAX
            || pos + wanted_prefix > window_start + window.len()
            || pos < window_start
        {
            let len = window.len().min(seg_bytes - pos);
            window = resize(window, len.max(ALIGN));
            window = engine.read_at(window, base + pos as u64).await?;
            window_start = pos;
        }
        let at = pos - window_start;
        let header = match RecordHeader::decode(&window[at..], sequence) {
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
        if pos + rec_len > window_start + window.len() {
            let len = rec_len.max(READ_WINDOW.min(seg_bytes - pos));
            window = resize(window, len);
            window = engine.read_at(window, base + pos as u64).await?;
            window_start = pos;
        }
        let at = pos - window_start;
        let record = &window[at..at + rec_len];
        let key_bytes = &record[RECORD_HEADER_BYTES..header.data_offset()];
        let key = String::from_utf8_lossy(key_bytes).into_owned();
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
            RecordKind::Block => report.blocks.push(ScannedBlock {
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
    Ok(())
}

fn resize(buf: AlignedBuf, len: usize) -> AlignedBuf {
    let len = crate::aligned::align_up(len as u64) as usize;
    if buf.len() == len {
        buf
    } else {
        AlignedBuf::zeroed(len)
    }
}
