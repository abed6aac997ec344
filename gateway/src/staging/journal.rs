//! The journal: where each record goes on the device, and when it counts as durable.
//!
//! Guarantees:
//! - Lsns are handed out with device offsets, in order along the ring. The *durability
//!   watermark* is the highest lsn below which every write has completed; the group commit
//!   acknowledges a record only once an `fdatasync` issued after the watermark passed it has
//!   completed (a `Wait::Queued` writer waits for nothing, and the flush it has the device
//!   given waits for the watermark first). An acknowledged record therefore never sits behind a
//!   hole, and the recovery scan, which stops at the first hole, always finds it.
//! - A write that fails stays in flight forever: the watermark never passes it, so nothing
//!   written after it is acknowledged by this process.
//! - Segments are reclaimed strictly from the tail, so a record that states an upload or a
//!   delete always outlives the block it speaks of. A block pins its segment from the moment its
//!   space is allocated until it no longer waits for upload.
//! - One free segment is kept for bookkeeping records (uploads, deletes), so the drain can always
//!   record progress, and free space, on a full device.
//! - A segment being reused takes its index entries from its previous life with it (the caller
//!   drops them from the block index: [`Allocation::evicted`]).
//! - A segment sequence is never handed out twice, not even across a crash: each process life
//!   starts its sequences at `generation << 32` ([`first_sequence`]). A dead life may have
//!   written records into a segment whose header never reached the device; were the next life
//!   to reopen that segment under the same sequence, the scan would take those leftovers (and
//!   their lsns, which the next life hands out again) for its own records.

use std::collections::BTreeSet;

use shared::BlockKey;

use crate::aligned::{AlignedBuf, ALIGN};
use crate::format::{SegmentHeader, Superblock};
use crate::recovery::ScanReport;

/// Data block records may not take the last free segment: it is kept for upload and delete
/// records.
const RESERVED_SEGMENTS: usize = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SegmentUse {
    Free,
    Live,
    /// Taken off the ring; its header is being invalidated before it may be reused.
    Reclaiming,
}

#[derive(Debug)]
struct Segment {
    use_: SegmentUse,
    sequence: u64,
    /// Blocks in this segment that still need to reach the object store.
    pending: u64,
    keys: Vec<BlockKey>,
}

/// What a record is for, which decides what space it may take and whether it pins it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum RecordUse {
    /// A staged block: may not take the reserve, pins its segment until uploaded.
    Staged,
    /// A block kept as read cache: may not take the reserve, pins nothing (it is in the store).
    Cached,
    /// An upload or delete record: may take the reserve.
    Bookkeeping,
}

/// One record (or segment header) waiting to be written.
pub(super) struct WriteJob {
    pub lsn: u64,
    pub offset: u64,
    pub buf: AlignedBuf,
}

/// Where a record goes.
pub(super) struct Allocation {
    pub lsn: u64,
    pub segment: usize,
    pub segment_sequence: u64,
    pub device_offset: u64,
    /// (lsn, device offset, header buffer) when a new segment was opened for this record.
    pub new_segment: Option<(u64, u64, AlignedBuf)>,
    /// Blocks recorded in the reused segment's previous life: (segment, old sequence, keys).
    pub evicted: Option<(usize, u64, Vec<BlockKey>)>,
}

pub(super) struct Journal {
    segments: Vec<Segment>,
    head: usize,
    tail: usize,
    live: usize,
    head_offset: u64,
    next_lsn: u64,
    next_sequence: u64,
    /// Segments opened by this life.
    opened: u64,
    /// Lsns handed out whose device write has not completed yet.
    inflight: BTreeSet<u64>,
    /// Records waiting for the write combiner.
    write_queue: Vec<WriteJob>,
}

/// The first segment sequence of the life with this superblock generation: above every sequence
/// an earlier life could have used, found on the device or not. The generation is made durable
/// before the scan, and no life opens 2^32 segments, so lives never share a sequence.
pub(super) fn first_sequence(generation: u64, max_found: u64) -> u64 {
    let floor = generation.checked_mul(1 << 32).unwrap_or(0);
    floor.max(max_found + 1)
}

/// Keeps the recovered ring one run from `tail` to `head`; returns how many segments it holds.
///
/// Segment writes run concurrently, so a crash can keep a newer segment's header and lose an
/// older one's (nothing in it was acknowledged: its header's lsn is below theirs). Left free,
/// such a gap inside the ring was miscounted: reclaim walked the tail through it, `live` fell
/// below the segments really in use, and the head found the next segment still live although
/// free ones were left. It stays in the ring, empty, and is reclaimed in its turn.
fn close_gaps(segments: &mut [Segment], scan: &ScanReport, tail: usize, head: usize) -> usize {
    let count = segments.len();
    let from_tail = |index: usize| (index + count - tail) % count;
    // Sequence order follows ring order (the head always opens the next segment); say so if a
    // device ever disagrees, rather than reclaim out of order.
    let ordered = scan
        .segments
        .windows(2)
        .all(|w| from_tail(w[0].index as usize) < from_tail(w[1].index as usize));
    if !ordered {
        tracing::error!(
            segments = ?scan.segments.iter().map(|s| (s.index, s.sequence)).collect::<Vec<_>>(),
            "live segments are not in ring order; reclaim follows the ring from the oldest"
        );
    }
    let mut index = tail;
    let mut held = 1;
    while index != head {
        index = (index + 1) % count;
        held += 1;
        if segments[index].use_ == SegmentUse::Free {
            segments[index].use_ = SegmentUse::Live;
        }
    }
    held
}

impl Journal {
    /// The ring as the recovery scan found it: its live segments, head and tail.
    pub fn recovered(sb: &Superblock, scan: &ScanReport) -> Journal {
        let count = sb.segment_count as usize;
        let mut segments: Vec<Segment> = (0..count)
            .map(|_| Segment {
                use_: SegmentUse::Free,
                sequence: 0,
                pending: 0,
                keys: Vec::new(),
            })
            .collect();
        for seg in &scan.segments {
            let s = &mut segments[seg.index as usize];
            s.use_ = SegmentUse::Live;
            s.sequence = seg.sequence;
        }
        let (head, tail, live, head_offset) = match (scan.segments.first(), scan.segments.last()) {
            (Some(first), Some(last)) => {
                let (head, tail) = (last.index as usize, first.index as usize);
                let live = close_gaps(&mut segments, scan, tail, head);
                (head, tail, live, last.bytes)
            }
            // Nothing live: the next segment opened will be the first of the ring.
            _ => (count - 1, 0, 0, sb.segment_bytes),
        };
        Journal {
            segments,
            head,
            tail,
            live,
            head_offset,
            next_lsn: scan.max_lsn + 1,
            next_sequence: first_sequence(sb.generation, scan.max_segment_sequence),
            opened: 0,
            inflight: BTreeSet::new(),
            write_queue: Vec::new(),
        }
    }

    /// Highest lsn below which every write has completed.
    pub fn watermark(&self) -> u64 {
        match self.inflight.first() {
            Some(first) => first - 1,
            None => self.next_lsn - 1,
        }
    }

    /// Segments opened by this life.
    #[cfg(test)]
    pub fn segments_opened(&self) -> u64 {
        self.opened
    }

    /// Blocks in `segment` that still wait for upload.
    #[cfg(test)]
    pub fn pending(&self, segment: usize) -> u64 {
        self.segments[segment].pending
    }

    fn take_lsn(&mut self) -> u64 {
        let lsn = self.next_lsn;
        self.next_lsn += 1;
        self.inflight.insert(lsn);
        lsn
    }

    /// Room for a record of `len` bytes, opening the next segment when the head one is full;
    /// `None` when the ring is full (for a block record: when only the reserve is left). A
    /// staged block pins its segment from now on.
    pub fn allocate(&mut self, len: u64, use_: RecordUse, sb: &Superblock) -> Option<Allocation> {
        let mut new_segment = None;
        let mut evicted = None;
        if self.head_offset + len > sb.segment_bytes {
            let count = self.segments.len();
            let next = (self.head + 1) % count;
            let free = self
                .segments
                .iter()
                .filter(|s| s.use_ == SegmentUse::Free)
                .count();
            let reserve = match use_ {
                RecordUse::Staged | RecordUse::Cached => RESERVED_SEGMENTS,
                RecordUse::Bookkeeping => 0,
            };
            if self.segments[next].use_ != SegmentUse::Free || free <= reserve {
                return None;
            }
            let old_sequence = self.segments[next].sequence;
            evicted = Some((
                next,
                old_sequence,
                std::mem::take(&mut self.segments[next].keys),
            ));
            let sequence = self.next_sequence;
            self.next_sequence += 1;
            self.opened += 1;
            let seg = &mut self.segments[next];
            seg.use_ = SegmentUse::Live;
            seg.sequence = sequence;
            seg.pending = 0;
            if self.live == 0 {
                self.tail = next;
            }
            self.live += 1;
            self.head = next;
            self.head_offset = ALIGN as u64;
            let mut header = AlignedBuf::zeroed(ALIGN);
            SegmentHeader {
                sequence,
                generation: sb.generation,
                device_uuid: sb.device_uuid,
            }
            .encode(&mut header);
            let header_lsn = self.take_lsn();
            new_segment = Some((header_lsn, sb.segment_offset(next as u64), header));
        }
        let lsn = self.take_lsn();
        let device_offset = sb.segment_offset(self.head as u64) + self.head_offset;
        self.head_offset += len;
        if use_ == RecordUse::Staged {
            // Pinned from now on, not from the acknowledgement: a segment must never be reclaimed
            // while a block write into it is still in flight.
            self.segments[self.head].pending += 1;
        }
        Some(Allocation {
            lsn,
            segment: self.head,
            segment_sequence: self.segments[self.head].sequence,
            device_offset,
            new_segment,
            evicted,
        })
    }

    pub fn queue_write(&mut self, job: WriteJob) {
        self.write_queue.push(job);
    }

    pub fn take_writes(&mut self) -> Vec<WriteJob> {
        std::mem::take(&mut self.write_queue)
    }

    /// These lsns are on the device (not yet durable).
    pub fn written(&mut self, lsns: &[u64]) {
        for lsn in lsns {
            self.inflight.remove(lsn);
        }
    }

    /// A block recorded in `segment` (dropped from the index when the segment is reused).
    pub fn add_key(&mut self, segment: usize, key: BlockKey) {
        self.segments[segment].keys.push(key);
    }

    /// Pins `segment` for a block recovered waiting for upload.
    pub fn pin(&mut self, segment: usize) {
        self.segments[segment].pending += 1;
    }

    /// A block in `segment` no longer waits for upload.
    pub fn unpin(&mut self, segment: usize) {
        self.segments[segment].pending -= 1;
    }

    /// Takes the tail segment off the ring when nothing in it waits for upload (the newest
    /// segment is never taken: the head writes into it).
    pub fn start_reclaim(&mut self) -> Option<usize> {
        let tail = self.tail;
        if self.live <= 1 || self.segments[tail].pending > 0 {
            return None;
        }
        self.segments[tail].use_ = SegmentUse::Reclaiming;
        self.live -= 1;
        self.tail = (tail + 1) % self.segments.len();
        Some(tail)
    }

    /// The segment's header is invalidated: it may be reused.
    pub fn reclaimed(&mut self, segment: usize) {
        self.segments[segment].use_ = SegmentUse::Free;
    }

    /// Whether `segment` is among the next quarter of the ring the head moves on into (free
    /// segments are reused in ring order after the head).
    pub fn reused_soon(&self, segment: usize) -> bool {
        let count = self.segments.len();
        let distance = (segment + count - self.head - 1) % count;
        distance < (count / 4).max(1)
    }

    /// (total, free) segments.
    pub fn segment_counts(&self) -> (u64, u64) {
        let free = self
            .segments
            .iter()
            .filter(|s| s.use_ == SegmentUse::Free)
            .count();
        (self.segments.len() as u64, free as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recovery::ScannedSegment;

    #[test]
    fn a_segment_whose_header_was_lost_stays_in_the_ring() {
        let sb = Superblock {
            format_version: 2,
            device_uuid: [1; 16],
            gateway_id: [2; 16],
            generation: 3,
            device_bytes: 64 << 20,
            segment_bytes: 1 << 20,
            segment_count: 6,
        };
        // Segments 2..=5 and 0 were opened in turn; 3's and 4's headers never reached the device.
        let found = |index: u64, sequence: u64| ScannedSegment {
            index,
            sequence,
            records: 1,
            bytes: 8192,
        };
        let scan = ScanReport {
            segments: vec![found(2, 10), found(5, 13), found(0, 14)],
            max_lsn: 40,
            ..ScanReport::default()
        };
        let mut journal = Journal::recovered(&sb, &scan);
        assert_eq!(journal.segment_counts(), (6, 1), "only segment 1 is free");
        // Reclaimed oldest first through the gap, never the head (0).
        let mut reclaimed = Vec::new();
        while let Some(segment) = journal.start_reclaim() {
            journal.reclaimed(segment);
            reclaimed.push(segment);
        }
        assert_eq!(reclaimed, [2, 3, 4, 5]);
        // The head moves on into segment 1, then into the reclaimed ones in ring order.
        let opened: Vec<usize> = (0..3)
            .map(|_| {
                let at = journal
                    .allocate(sb.segment_bytes - 4096, RecordUse::Bookkeeping, &sb)
                    .expect("a free segment");
                at.segment
            })
            .collect();
        assert_eq!(opened, [1, 2, 3]);
    }
}
