//! Directories' attributes as this mount last read them, kept for the attribute TTL and brought
//! forward by the mount's own creates in them.
//!
//! With `default_permissions` the kernel checks a directory's mode before each create in it, and
//! since each create changes the directory (its mtime) the kernel has just dropped what it cached
//! and asks the mount again: one metadata round trip per file for `tar` and `pip`. The engine sets
//! a new node's ctime and its directory's mtime and ctime from one clock reading, in one
//! transaction, so the mount knows the directory's new attributes from the create's answer and can
//! answer that question itself. What it answers is never older than the attribute TTL from the
//! last time it asked the engine, the same bound the kernel's own cache gives: changes made by
//! other mounts show up within the TTL, as they do with the kernel's cache. Changes whose effect on
//! a directory the mount does not know exactly (removals, renames, links, attributes) drop what
//! it kept.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{Attr, FileKind, Ino};

/// Directories remembered at most; past it the stale ones go, and if none is stale, all.
const MAX_DIRS: usize = 4096;

pub struct DirAttrs {
    ttl: Duration,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Each directory's attributes and when the engine answered them.
    dirs: HashMap<Ino, (Attr, Instant)>,
    /// Changes the mount followed or dropped so far: an answer the engine gave before one of
    /// them (a `getattr` in flight meanwhile) is not kept over it.
    generation: u64,
}

impl DirAttrs {
    /// A TTL of zero keeps nothing: every question goes to the engine.
    pub fn new(ttl: Duration) -> DirAttrs {
        DirAttrs {
            ttl,
            state: Mutex::new(State::default()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// What [`DirAttrs::saw`] needs from before the engine is asked.
    pub fn generation(&self) -> u64 {
        self.state().generation
    }

    /// The attributes of directory `ino`, if read from the engine within the TTL.
    pub fn get(&self, ino: Ino) -> Option<Attr> {
        let state = self.state();
        let (attr, read_at) = state.dirs.get(&ino)?;
        (read_at.elapsed() < self.ttl).then_some(*attr)
    }

    /// The engine answered `attr`, asked for when [`DirAttrs::generation`] said `asked`: kept
    /// unless the mount changed or dropped a directory's attributes meanwhile.
    pub fn saw(&self, attr: &Attr, asked: u64) {
        if attr.kind != FileKind::Dir || self.ttl.is_zero() {
            return;
        }
        let mut state = self.state();
        if state.generation != asked {
            return;
        }
        let dirs = &mut state.dirs;
        if dirs.len() >= MAX_DIRS && !dirs.contains_key(&attr.ino) {
            let ttl = self.ttl;
            dirs.retain(|_, (_, read_at)| read_at.elapsed() < ttl);
            if dirs.len() >= MAX_DIRS {
                dirs.clear();
            }
        }
        dirs.insert(attr.ino, (*attr, Instant::now()));
    }

    /// This mount made `child` in `parent`: the directory's mtime and ctime are the child's
    /// ctime, and a new subdirectory adds a link. The TTL still runs from the last read.
    pub fn made_in(&self, parent: Ino, child: &Attr) {
        let mut state = self.state();
        state.generation += 1;
        if let Some((dir, _)) = state.dirs.get_mut(&parent) {
            dir.mtime_ns = dir.mtime_ns.max(child.ctime_ns);
            dir.ctime_ns = dir.ctime_ns.max(child.ctime_ns);
            if child.kind == FileKind::Dir {
                dir.nlink = dir.nlink.saturating_add(1);
            }
        }
    }

    /// Drops what is known of `ino`.
    pub fn forget(&self, ino: Ino) {
        let mut state = self.state();
        state.generation += 1;
        state.dirs.remove(&ino);
    }

    /// Drops everything (a change whose directories are not all known: a rename, a removal).
    pub fn forget_all(&self) {
        let mut state = self.state();
        state.generation += 1;
        state.dirs.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(ino: Ino, ctime_ns: i64, nlink: u32) -> Attr {
        Attr {
            ino,
            kind: FileKind::Dir,
            mode: 0o755,
            uid: 0,
            gid: 0,
            nlink,
            size: 0,
            atime_ns: 0,
            mtime_ns: ctime_ns,
            ctime_ns,
            rdev: 0,
        }
    }

    #[test]
    fn creates_bring_a_known_directory_forward_and_nothing_outlives_the_ttl() {
        let attrs = DirAttrs::new(Duration::from_millis(200));
        attrs.made_in(5, &dir(9, 50, 2));
        assert_eq!(attrs.get(5), None, "an unknown directory stays unknown");
        attrs.saw(&dir(5, 10, 2), attrs.generation());
        attrs.made_in(5, &dir(9, 50, 2));
        let mut file = dir(10, 60, 1);
        file.kind = FileKind::File;
        attrs.made_in(5, &file);
        let known = attrs.get(5).unwrap();
        assert_eq!((known.mtime_ns, known.ctime_ns, known.nlink), (60, 60, 3));
        // An answer asked for before the creates does not undo them.
        let before_the_creates = attrs.generation() - 2;
        attrs.saw(&dir(5, 10, 2), before_the_creates);
        assert_eq!(attrs.get(5).unwrap().nlink, 3);
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(attrs.get(5), None, "past the TTL the engine is asked again");
        attrs.saw(&dir(5, 70, 4), attrs.generation());
        attrs.forget(5);
        assert_eq!(attrs.get(5), None);
    }

    #[test]
    fn a_zero_ttl_keeps_nothing_and_the_table_is_bounded() {
        let off = DirAttrs::new(Duration::ZERO);
        off.saw(&dir(5, 10, 2), off.generation());
        assert_eq!(off.get(5), None);
        let attrs = DirAttrs::new(Duration::from_secs(60));
        for ino in 0..(MAX_DIRS as Ino * 2) {
            attrs.saw(&dir(ino, 1, 2), attrs.generation());
        }
        assert!(attrs.state().dirs.len() <= MAX_DIRS);
    }
}
