//! Attributes of files this mount closed, as the engine gave them at the file's last commit (or
//! open, or `setattr`), kept for `--attr-ttl`: `pip`, `compileall` and `tar` `stat` a file right
//! after they close it, and the kernel asks again (a write drops what it had), so each such
//! `stat` was a call to the gateway. The rule is an open file's (SEMANTICS): fresh within the TTL
//! of the engine's answer, and never an answer asked for before this mount changed the file
//! (its `setattr`, a new open, a rename that moved or replaced it) or made a change whose files
//! it does not know (a removal, a link, an extended attribute, a rename an older gateway did not
//! describe). A change another mount makes shows within the TTL, as with the kernel's own
//! attribute cache.
//!
//! Changes are ordered by the mount's change count ([`super::Fs::renamed_count`]): read before
//! each engine call, and raised once each change was answered. An answer asked for at a count
//! below the one a change raised it to is older than the change.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{Attr, Ino};

/// At most this many files are remembered (and as many changed files); past it, stale entries
/// go, and a new one is not kept while every entry is still fresh (a burst of closes within one
/// TTL).
const MAX_ENTRIES: usize = 4096;

pub struct ClosedAttrs {
    ttl: Duration,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    entries: HashMap<Ino, Entry>,
    /// The change count each of this mount's changes of a file raised it to: an answer asked
    /// for below it is not kept.
    changed: HashMap<Ino, u64>,
    /// The change count at the last change whose files the mount does not know.
    changed_all: u64,
}

struct Entry {
    attr: Attr,
    read_at: Instant,
}

impl ClosedAttrs {
    pub fn new(ttl: Duration) -> ClosedAttrs {
        ClosedAttrs {
            ttl,
            state: Mutex::new(State::default()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The file's last handle on this mount closed; `attr` is what the mount saw, from an engine
    /// answer read at `read_at` and asked for at change count `asked`.
    pub fn closed(&self, attr: Attr, read_at: Instant, asked: u64) {
        if read_at.elapsed() >= self.ttl {
            return;
        }
        let mut state = self.state();
        let changed = state.changed.get(&attr.ino).copied();
        if asked < state.changed_all || changed.is_some_and(|at| asked < at) {
            return;
        }
        if state.entries.len() >= MAX_ENTRIES {
            let ttl = self.ttl;
            state
                .entries
                .retain(|_, entry| entry.read_at.elapsed() < ttl);
            if state.entries.len() >= MAX_ENTRIES {
                return;
            }
        }
        state.entries.insert(attr.ino, Entry { attr, read_at });
    }

    /// The attributes of `ino` if this mount closed it within the TTL of the engine's answer.
    pub fn get(&self, ino: Ino) -> Option<Attr> {
        let mut state = self.state();
        let entry = state.entries.get(&ino)?;
        if entry.read_at.elapsed() < self.ttl {
            metrics::counter!("stagefs_closed_file_attrs_answered_total").increment(1);
            return Some(entry.attr);
        }
        state.entries.remove(&ino);
        None
    }

    /// This mount opens `ino`: its own state answers until it closes again.
    pub fn opened(&self, ino: Ino) {
        self.state().entries.remove(&ino);
    }

    /// This mount changed `ino`, and raised the change count to `count` once it was answered.
    pub fn forget(&self, ino: Ino, count: u64) {
        let mut state = self.state();
        state.entries.remove(&ino);
        if state.changed.len() >= MAX_ENTRIES && !state.changed.contains_key(&ino) {
            // Bounded: all of them become one change of every file.
            let latest = state.changed.values().copied().max().unwrap_or(0);
            state.changed_all = state.changed_all.max(latest);
            state.changed.clear();
        }
        let at = state.changed.entry(ino).or_insert(count);
        *at = (*at).max(count);
    }

    /// This mount made a change whose files it does not know, and raised the count to `count`.
    pub fn forget_all(&self, count: u64) {
        let mut state = self.state();
        state.entries.clear();
        state.changed.clear();
        state.changed_all = state.changed_all.max(count);
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
    fn answers_within_the_ttl_and_never_what_was_asked_before_a_change() {
        let closed = ClosedAttrs::new(Duration::from_millis(200));
        closed.closed(attr(7, 10), Instant::now(), 3);
        assert_eq!(closed.get(7).map(|a| a.size), Some(10));
        assert_eq!(closed.get(8), None, "never closed here");

        // File 7 changed, the count raised to 4: gone, and an answer asked for before is not
        // kept.
        closed.forget(7, 4);
        assert_eq!(closed.get(7), None);
        closed.closed(attr(7, 11), Instant::now(), 3);
        assert_eq!(closed.get(7), None, "asked for before the change");
        closed.closed(attr(7, 12), Instant::now(), 4);
        assert_eq!(
            closed.get(7).map(|a| a.size),
            Some(12),
            "asked for after it"
        );
        // Opened again: its own state answers.
        closed.opened(7);
        assert_eq!(closed.get(7), None);
        closed.closed(attr(7, 12), Instant::now(), 4);
        // Another file's change leaves it alone; a change of unknown files does not.
        closed.forget(8, 5);
        assert_eq!(closed.get(7).map(|a| a.size), Some(12));
        closed.forget_all(6);
        assert_eq!(closed.get(7), None);
        closed.closed(attr(9, 1), Instant::now(), 5);
        assert_eq!(
            closed.get(9),
            None,
            "asked for before the change of unknown files"
        );

        closed.closed(attr(7, 13), Instant::now(), 7);
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(closed.get(7), None, "past the TTL");
        // An answer already older than the TTL is not kept; none is kept with a TTL of 0.
        closed.closed(attr(9, 1), Instant::now() - Duration::from_secs(1), 7);
        assert_eq!(closed.get(9), None);
        let none = ClosedAttrs::new(Duration::ZERO);
        none.closed(attr(9, 1), Instant::now(), 0);
        assert_eq!(none.get(9), None, "--attr-ttl 0 keeps nothing");
    }

    #[test]
    fn a_burst_of_fresh_closes_and_changes_is_bounded() {
        let closed = ClosedAttrs::new(Duration::from_secs(60));
        for ino in 0..(MAX_ENTRIES as u64 + 10) {
            closed.closed(attr(ino, ino), Instant::now(), 1);
        }
        assert_eq!(closed.state().entries.len(), MAX_ENTRIES);
        assert!(closed.get(MAX_ENTRIES as u64 + 5).is_none());
        assert_eq!(closed.get(5).map(|a| a.size), Some(5));
        for ino in 0..(MAX_ENTRIES as u64 + 10) {
            closed.forget(100_000 + ino, 2 + ino);
        }
        assert!(closed.state().changed.len() <= MAX_ENTRIES);
        // What the bound folded into one change still refuses answers asked for before it.
        closed.closed(attr(100_000, 1), Instant::now(), 1);
        assert_eq!(closed.get(100_000), None);
    }
}
