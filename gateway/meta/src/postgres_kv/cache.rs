//! What one gateway remembers of the records its snapshot transactions read, so that the next
//! one can skip the round trip of its read.
//!
//! Why: at one client a create is two round trips, its read and then its writes with `COMMIT`,
//! where PostgreSQL's own limit (an insert and its commit) is one. The records a create reads
//! (its parent directory, its counter shards, its session, the parent's lease) are the same from
//! one create to the next, and this gateway wrote most of them last. A transaction that finds
//! everything it reads remembered here reads nothing: the values are checked inside the
//! transaction itself, by a statement pipelined ahead of its writes and `COMMIT`
//! ([`super::CHECK`]), so the whole change is one round trip, and one whose guess was wrong
//! fails as a conflict (nothing applied) and runs again, reading.
//!
//! Only ever a guess, so never a source of truth: what is remembered may be stale (another
//! gateway changed it, or two of this gateway's commits landed here out of order), and the check
//! is what makes a transaction correct. A key a check found changed is marked, so that the run
//! after reads it for real rather than guessing again.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::kv::Write;

/// How many bytes of keys and values are remembered before it all is forgotten at once (the
/// records that matter are read again at the next create: one round trip each time it fills).
const MAX_BYTES: usize = 8 << 20;

#[derive(Clone)]
enum Entry {
    /// The value last read or written (`None`: no such record).
    Known(Option<Vec<u8>>),
    /// A check found it changed: read it before guessing again.
    Refuted,
}

#[derive(Default)]
pub(super) struct ReadCache {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    entries: HashMap<Vec<u8>, Entry>,
    bytes: usize,
}

impl State {
    fn set(&mut self, key: &[u8], entry: Entry) {
        let size = |key: &[u8], entry: &Entry| {
            key.len()
                + match entry {
                    Entry::Known(Some(value)) => value.len(),
                    _ => 0,
                }
        };
        let added = size(key, &entry);
        if let Some(old) = self.entries.insert(key.to_vec(), entry) {
            self.bytes -= size(key, &old);
        }
        self.bytes += added;
        if self.bytes > MAX_BYTES {
            self.entries.clear();
            self.bytes = 0;
        }
    }
}

impl ReadCache {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The remembered values of every one of `keys`, or `None` when any is unknown (then all of
    /// them are read, in the one round trip the unknown one costs anyway). A key in `absent`
    /// that nothing is known of is guessed to be absent (a new name).
    pub(super) fn values(
        &self,
        keys: &[Vec<u8>],
        absent: &std::collections::HashSet<Vec<u8>>,
    ) -> Option<Vec<Option<Vec<u8>>>> {
        let state = self.state();
        keys.iter()
            .map(|key| match state.entries.get(key) {
                Some(Entry::Known(value)) => Some(value.clone()),
                Some(Entry::Refuted) => None,
                None => absent.contains(key).then_some(None),
            })
            .collect()
    }

    /// What a read found.
    pub(super) fn learn<'a>(&self, found: impl Iterator<Item = (&'a [u8], Option<&'a [u8]>)>) {
        let mut state = self.state();
        for (key, value) in found {
            state.set(key, Entry::Known(value.map(<[u8]>::to_vec)));
        }
    }

    /// The writes worth remembering once committed ([`ReadCache::committed`]): of keys
    /// remembered here, or that the transaction `guessed`. Keys never read are not remembered:
    /// a new inode's record is not read again by a create, but a new name is, by the next
    /// create of it (which, knowing it taken, fails without a wasted run).
    pub(super) fn remembered(
        &self,
        writes: &[Write],
        guessed: impl Fn(&[u8]) -> bool,
    ) -> Vec<Write> {
        let state = self.state();
        writes
            .iter()
            .filter(|(key, _)| state.entries.contains_key(key) || guessed(key))
            .cloned()
            .collect()
    }

    /// A commit of `writes` (from [`ReadCache::remembered`]) took effect: what they hold now.
    pub(super) fn committed(&self, writes: &[Write]) {
        let mut state = self.state();
        for (key, value) in writes {
            state.set(key, Entry::Known(value.clone()));
        }
    }

    /// A check found one of `keys` changed, or a commit of them failed: read them again.
    pub(super) fn refute<'a>(&self, keys: impl Iterator<Item = &'a [u8]>) {
        let mut state = self.state();
        for key in keys {
            state.set(key, Entry::Refuted);
        }
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.state().entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn key(n: u8) -> Vec<u8> {
        vec![n]
    }

    #[test]
    fn answers_only_when_every_key_is_known_or_guessed_absent() {
        let cache = ReadCache::default();
        cache.learn([(&[1u8][..], Some(&b"one"[..])), (&[2u8][..], None)].into_iter());
        let none = HashSet::new();
        assert_eq!(
            cache.values(&[key(1), key(2)], &none),
            Some(vec![Some(b"one".to_vec()), None])
        );
        assert_eq!(cache.values(&[key(1), key(3)], &none), None);
        let absent = HashSet::from([key(3)]);
        assert_eq!(
            cache.values(&[key(1), key(3)], &absent),
            Some(vec![Some(b"one".to_vec()), None])
        );
    }

    #[test]
    fn a_refuted_key_is_read_again_even_when_guessed_absent() {
        let cache = ReadCache::default();
        let absent = HashSet::from([key(3)]);
        cache.refute([&[3u8][..]].into_iter());
        assert_eq!(cache.values(&[key(3)], &absent), None);
        cache.learn([(&[3u8][..], Some(&b"there"[..]))].into_iter());
        assert_eq!(
            cache.values(&[key(3)], &absent),
            Some(vec![Some(b"there".to_vec())])
        );
    }

    #[test]
    fn a_commit_updates_what_is_remembered_or_guessed_and_adds_nothing_else() {
        let cache = ReadCache::default();
        cache.learn([(&[1u8][..], Some(&b"old"[..]))].into_iter());
        let writes = [
            (key(1), None),
            (key(2), Some(b"new".to_vec())),
            (key(3), Some(b"guessed".to_vec())),
        ];
        let remembered = cache.remembered(&writes, |key| key == [3u8]);
        cache.committed(&remembered);
        let none = HashSet::new();
        assert_eq!(cache.values(&[key(1)], &none), Some(vec![None]));
        assert_eq!(cache.values(&[key(2)], &none), None);
        assert_eq!(
            cache.values(&[key(3)], &none),
            Some(vec![Some(b"guessed".to_vec())])
        );
        assert_eq!(cache.len(), 2);
    }

    #[test]
    fn forgets_everything_when_full() {
        let cache = ReadCache::default();
        // Two of these and their keys fill it to the byte.
        let big = vec![0u8; MAX_BYTES / 2 - 1];
        cache.learn([(&[1u8][..], Some(&big[..]))].into_iter());
        cache.learn([(&[2u8][..], Some(&big[..]))].into_iter());
        assert_eq!(cache.len(), 2);
        cache.learn([(&[3u8][..], Some(&b"x"[..]))].into_iter());
        assert_eq!(cache.len(), 0);
    }
}
