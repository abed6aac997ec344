//! Attributes of files this mount closed, as the engine gave them at the file's last commit (or
//! open, or `setattr`), kept for `--attr-ttl`: `pip`, `compileall` and `tar` `stat` a file right
//! after they close it, and the kernel asks again (a write drops what it had), so each such
//! `stat` was a call to the gateway. The rule is an open file's (SEMANTICS): fresh within the TTL
//! of the engine's answer, asked for again once this mount removed, renamed or linked anything
//! or changed an extended attribute since, and forgotten when this mount changes the file's
//! attributes or opens it again. A change another mount makes shows within the TTL, as with the
//! kernel's own attribute cache.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{Attr, Ino};

/// At most this many files are remembered; past it, stale entries go, and a new one is not kept
/// while every entry is still fresh (a burst of closes within one TTL).
const MAX_ENTRIES: usize = 4096;

pub struct ClosedAttrs {
    ttl: Duration,
    entries: Mutex<HashMap<Ino, Entry>>,
}

struct Entry {
    attr: Attr,
    read_at: Instant,
    /// The mount's count of removals, renames, links and xattr changes when the engine answered.
    renamed: u64,
}

impl ClosedAttrs {
    pub fn new(ttl: Duration) -> ClosedAttrs {
        ClosedAttrs {
            ttl,
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<Ino, Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The file's last handle on this mount closed; `attr` is what the mount saw, from an engine
    /// answer read at `read_at` when the rename count was `renamed`.
    pub fn closed(&self, attr: Attr, read_at: Instant, renamed: u64) {
        if read_at.elapsed() >= self.ttl {
            return;
        }
        let mut entries = self.entries();
        if entries.len() >= MAX_ENTRIES {
            entries.retain(|_, entry| entry.read_at.elapsed() < self.ttl);
            if entries.len() >= MAX_ENTRIES {
                return;
            }
        }
        entries.insert(
            attr.ino,
            Entry {
                attr,
                read_at,
                renamed,
            },
        );
    }

    /// The attributes of `ino` if this mount closed it and they are fresh with the mount's rename
    /// count now `renamed`.
    pub fn get(&self, ino: Ino, renamed: u64) -> Option<Attr> {
        let mut entries = self.entries();
        let entry = entries.get(&ino)?;
        if entry.read_at.elapsed() < self.ttl && entry.renamed == renamed {
            metrics::counter!("stagefs_closed_file_attrs_answered_total").increment(1);
            return Some(entry.attr);
        }
        entries.remove(&ino);
        None
    }

    /// This mount changes the file's attributes, or opens it.
    pub fn forget(&self, ino: Ino) {
        self.entries().remove(&ino);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::FileKind;

    fn attr(ino: Ino, size: u64) -> Attr {
        Attr {
            ino,
            kind: FileKind::File,
            mode: 0o644,
            uid: 0,
            gid: 0,
            nlink: 1,
            size,
            atime_ns: 0,
            mtime_ns: 0,
            ctime_ns: 0,
            rdev: 0,
        }
    }

    #[test]
    fn answers_within_the_ttl_and_not_after_a_rename_a_change_or_the_ttl() {
        let closed = ClosedAttrs::new(Duration::from_millis(200));
        closed.closed(attr(7, 10), Instant::now(), 3);
        assert_eq!(closed.get(7, 3).map(|a| a.size), Some(10));
        assert_eq!(closed.get(8, 3), None, "never closed here");
        assert_eq!(closed.get(7, 4), None, "a rename since");
        assert_eq!(closed.get(7, 3), None, "forgotten with it");
        closed.closed(attr(7, 11), Instant::now(), 4);
        closed.forget(7);
        assert_eq!(closed.get(7, 4), None, "an attribute change or an open");
        closed.closed(attr(7, 12), Instant::now(), 4);
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(closed.get(7, 4), None, "past the TTL");
        // An answer already older than the TTL is not kept; none is kept with a TTL of 0.
        closed.closed(attr(9, 1), Instant::now() - Duration::from_secs(1), 4);
        assert_eq!(closed.get(9, 4), None);
        let none = ClosedAttrs::new(Duration::ZERO);
        none.closed(attr(9, 1), Instant::now(), 0);
        assert_eq!(none.get(9, 0), None, "--attr-ttl 0 keeps nothing");
    }

    #[test]
    fn a_burst_of_fresh_closes_is_bounded() {
        let closed = ClosedAttrs::new(Duration::from_secs(60));
        for ino in 0..(MAX_ENTRIES as u64 + 10) {
            closed.closed(attr(ino, ino), Instant::now(), 0);
        }
        assert_eq!(closed.entries().len(), MAX_ENTRIES);
        assert!(closed.get(MAX_ENTRIES as u64 + 5, 0).is_none());
        assert_eq!(closed.get(5, 0).map(|a| a.size), Some(5));
    }
}
