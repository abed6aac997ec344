//! Byte-range locks: the POSIX rules for one owner's locks and for conflicts between owners,
//! apart from where the engine keeps them.
//!
//! A lock owner is a session and the owner number the kernel gives (`fcntl` locks: one per
//! process's file table; `flock` locks: one per open file description, whole-file). An owner's
//! locks on an inode are a sorted list of disjoint ranges, each read or write; setting a range
//! replaces whatever the owner held there (splitting locks at its edges) and merges it with
//! adjacent ranges of the same kind, as `fcntl(F_SETLK)` does. Locks of one owner never conflict
//! with each other; a write lock conflicts with any overlapping lock of another owner.

use crate::{MetaError, Result};

pub use shared::meta::{HeldLock, LockKind, LockRequest};

/// Most separate ranges one owner may hold on one inode; past it a lock fails with ENOLCK, so
/// no client can grow a lock record without bound.
pub const MAX_RANGES_PER_OWNER: usize = 1024;

/// Most lock owners, over all sessions, holding locks on one inode: every lock call on the
/// inode reads them all. Past it a new owner's lock fails with ENOLCK.
pub const MAX_OWNERS_PER_INODE: usize = 4096;

/// The owner's locks after `request`: what it held inside the range is cut out (a lock over the
/// range's edge keeps its outside part), then the range is added with its kind and merged with
/// adjacent locks of that kind. The result is sorted and disjoint.
pub fn apply(held: &[HeldLock], request: &LockRequest) -> Vec<HeldLock> {
    let (start, end) = (request.start, request.end);
    let mut out = Vec::with_capacity(held.len() + 2);
    for lock in held {
        if lock.end < start || lock.start > end {
            out.push(*lock);
            continue;
        }
        if lock.start < start {
            out.push(HeldLock {
                end: start - 1,
                ..*lock
            });
        }
        if lock.end > end {
            out.push(HeldLock {
                start: end + 1,
                ..*lock
            });
        }
    }
    if let Some(kind) = request.kind {
        let mut new = HeldLock {
            start,
            end,
            kind,
            pid: request.pid,
        };
        out.retain(|lock| {
            let touches = lock.end.checked_add(1) == Some(new.start)
                || new.end.checked_add(1) == Some(lock.start);
            if lock.kind == kind && touches {
                new.start = new.start.min(lock.start);
                new.end = new.end.max(lock.end);
                return false;
            }
            true
        });
        out.push(new);
    }
    out.sort_by_key(|lock| lock.start);
    out
}

/// Checks a request's range: `start <= end`.
pub fn validate(request: &LockRequest) -> Result<()> {
    if request.start > request.end {
        return Err(MetaError::Invalid(format!(
            "lock range {}..={} ends before it starts",
            request.start, request.end
        )));
    }
    Ok(())
}

const LOCK_LEN: usize = 8 + 8 + 1 + 4;

/// The stored form of one owner's locks: per lock, start and end (u64), kind (1 read, 2 write)
/// and pid (u32), little-endian.
pub fn encode(locks: &[HeldLock]) -> Vec<u8> {
    let mut out = Vec::with_capacity(locks.len() * LOCK_LEN);
    for lock in locks {
        out.extend_from_slice(&lock.start.to_le_bytes());
        out.extend_from_slice(&lock.end.to_le_bytes());
        out.push(match lock.kind {
            LockKind::Read => 1,
            LockKind::Write => 2,
        });
        out.extend_from_slice(&lock.pid.to_le_bytes());
    }
    out
}

pub fn decode(bytes: &[u8]) -> Result<Vec<HeldLock>> {
    if !bytes.len().is_multiple_of(LOCK_LEN) {
        return Err(MetaError::Corrupt(format!(
            "lock record of {} bytes, not a whole number of {LOCK_LEN}-byte locks",
            bytes.len()
        )));
    }
    bytes
        .chunks_exact(LOCK_LEN)
        .map(|lock| {
            let u64_at = |at: usize| u64::from_le_bytes(lock[at..at + 8].try_into().expect("8"));
            let kind = match lock[16] {
                1 => LockKind::Read,
                2 => LockKind::Write,
                other => return Err(MetaError::Corrupt(format!("lock of unknown kind {other}"))),
            };
            Ok(HeldLock {
                start: u64_at(0),
                end: u64_at(8),
                kind,
                pid: u32::from_le_bytes(lock[17..21].try_into().expect("4")),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use LockKind::{Read, Write};

    fn set(held: &[HeldLock], start: u64, end: u64, kind: Option<LockKind>) -> Vec<HeldLock> {
        apply(
            held,
            &LockRequest {
                owner: 1,
                start,
                end,
                kind,
                pid: 7,
            },
        )
    }

    fn ranges(locks: &[HeldLock]) -> Vec<(u64, u64, LockKind)> {
        locks.iter().map(|l| (l.start, l.end, l.kind)).collect()
    }

    #[test]
    fn setting_a_range_splits_replaces_and_merges() {
        let whole = set(&[], 0, u64::MAX, Some(Write));
        let split = set(&whole, 100, 199, None);
        assert_eq!(
            ranges(&split),
            [(0, 99, Write), (200, u64::MAX, Write)],
            "unlocking the middle splits the lock"
        );
        let downgraded = set(&split, 50, 249, Some(Read));
        assert_eq!(
            ranges(&downgraded),
            [(0, 49, Write), (50, 249, Read), (250, u64::MAX, Write)]
        );
        let merged = set(&downgraded, 0, 49, Some(Read));
        assert_eq!(
            ranges(&merged),
            [(0, 249, Read), (250, u64::MAX, Write)],
            "adjacent locks of one kind merge"
        );
        assert!(set(&merged, 0, u64::MAX, None).is_empty());
    }

    #[test]
    fn conflicts_need_an_overlap_and_a_writer() {
        let read = HeldLock {
            start: 10,
            end: 19,
            kind: Read,
            pid: 1,
        };
        assert!(!read.conflicts(0, 100, Read), "readers share");
        assert!(read.conflicts(19, 30, Write));
        assert!(!read.conflicts(20, 30, Write), "disjoint ranges coexist");
        let write = HeldLock {
            kind: Write,
            ..read
        };
        assert!(write.conflicts(0, 10, Read));
        assert!(!write.conflicts(0, 9, Write));
    }

    #[test]
    fn records_round_trip_and_bad_ones_are_corrupt() {
        let locks = set(&set(&[], 0, 9, Some(Read)), 20, u64::MAX, Some(Write));
        assert_eq!(decode(&encode(&locks)).unwrap(), locks);
        assert!(decode(&[0; 5]).is_err());
        let mut bad = encode(&locks);
        bad[16] = 9;
        assert!(decode(&bad).is_err());
    }

    proptest! {
        /// After any sequence of changes, an owner's locks are sorted, disjoint, merged, and
        /// say for every byte exactly what the last change covering it set.
        #[test]
        fn locks_match_a_byte_map(changes in proptest::collection::vec(
            (0u64..64, 0u64..64, prop_oneof![Just(None), Just(Some(Read)), Just(Some(Write))]),
            1..40,
        )) {
            let mut held = Vec::new();
            let mut bytes = [None; 64];
            for (a, b, kind) in changes {
                let (start, end) = (a.min(b), a.max(b));
                held = set(&held, start, end, kind);
                for byte in &mut bytes[start as usize..=end as usize] {
                    *byte = kind;
                }
            }
            for pair in held.windows(2) {
                prop_assert!(pair[0].end < pair[1].start, "disjoint and sorted: {held:?}");
                prop_assert!(
                    pair[0].kind != pair[1].kind || pair[0].end + 1 < pair[1].start,
                    "adjacent locks of one kind are merged: {held:?}"
                );
            }
            for (byte, want) in bytes.iter().enumerate() {
                let got = held
                    .iter()
                    .find(|l| l.start <= byte as u64 && byte as u64 <= l.end)
                    .map(|l| l.kind);
                prop_assert_eq!(got, *want, "byte {}: {:?}", byte, held);
            }
        }
    }
}
