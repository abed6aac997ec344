//! Namespace changes this mount made that may not be durable yet. The gateway acknowledges a
//! create, rename, unlink or attribute change once committed and makes it durable with its next
//! durable commit (README, SEMANTICS); `fsync`, `fsyncdir` and `close` promise more, so they end
//! with a durable commit: the slice commit of the data they flush, or else a `Sync` call.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct Unsynced {
    /// Namespace changes answered so far.
    made: AtomicU64,
    /// Every change counted up to here is covered by a durable commit that ended.
    durable: AtomicU64,
}

impl Unsynced {
    /// Counts a change once it was answered.
    pub fn changed(&self) {
        self.made.fetch_add(1, Ordering::SeqCst);
    }

    /// The changes answered so far: a durable commit that starts after this covers them.
    pub fn mark(&self) -> u64 {
        self.made.load(Ordering::SeqCst)
    }

    /// Whether changes up to `mark` still wait for a durable commit.
    pub fn pending(&self, mark: u64) -> bool {
        self.durable.load(Ordering::SeqCst) < mark
    }

    /// A durable commit that started after `mark` was taken has ended.
    pub fn covered(&self, mark: u64) {
        self.durable.fetch_max(mark, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_commit_covers_only_what_came_before_it() {
        let unsynced = Unsynced::default();
        assert!(!unsynced.pending(unsynced.mark()));
        unsynced.changed();
        let mark = unsynced.mark();
        assert!(unsynced.pending(mark));
        unsynced.changed();
        unsynced.covered(mark);
        assert!(!unsynced.pending(mark));
        assert!(
            unsynced.pending(unsynced.mark()),
            "a change after the mark is not covered"
        );
        unsynced.covered(1);
        assert!(
            unsynced.pending(unsynced.mark()),
            "an older commit ending later covers no more"
        );
    }
}
