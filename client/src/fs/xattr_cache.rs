//! Remembers, for as long as the kernel may cache attributes, that a file has no
//! `security.capability` attribute.
//!
//! The kernel asks for that attribute before every `write(2)` to a FUSE file (to drop file
//! capabilities on write), so without this every append costs a metadata round trip. Only that
//! name and only its absence are remembered, for the attribute TTL: the kernel itself decides
//! from mode bits it caches that long, so another mount setting a capability is seen no later
//! than another mount's `chmod u+s` is. A change made through this mount forgets the file.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::meta_api::Ino;

/// The attribute the kernel probes on every write.
pub const CAPABILITY_XATTR: &[u8] = b"security.capability";

/// Entries kept before expired ones are swept out.
const SWEEP_AT: usize = 4096;

pub struct CapabilityAbsence {
    ttl: Duration,
    /// When each file was last seen without the attribute.
    seen_absent: Mutex<HashMap<Ino, Instant>>,
}

impl CapabilityAbsence {
    pub fn new(ttl: Duration) -> Self {
        CapabilityAbsence {
            ttl,
            seen_absent: Mutex::new(HashMap::new()),
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<Ino, Instant>> {
        self.seen_absent.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// True when `name` of `ino` is known to be absent, so the engine need not be asked.
    pub fn known_absent(&self, ino: Ino, name: &[u8]) -> bool {
        name == CAPABILITY_XATTR
            && self
                .map()
                .get(&ino)
                .is_some_and(|seen| seen.elapsed() < self.ttl)
    }

    /// The engine answered that `name` of `ino` does not exist.
    pub fn saw_absent(&self, ino: Ino, name: &[u8]) {
        if name != CAPABILITY_XATTR || self.ttl.is_zero() {
            return;
        }
        let mut map = self.map();
        if map.len() >= SWEEP_AT {
            map.retain(|_, seen| seen.elapsed() < self.ttl);
        }
        map.insert(ino, Instant::now());
    }

    /// This mount changed the attributes of `ino`.
    pub fn forget(&self, ino: Ino) {
        self.map().remove(&ino);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absence_is_remembered_for_the_capability_only_and_until_a_change() {
        let cache = CapabilityAbsence::new(Duration::from_secs(60));
        assert!(!cache.known_absent(5, CAPABILITY_XATTR));
        cache.saw_absent(5, CAPABILITY_XATTR);
        cache.saw_absent(5, b"user.other");
        assert!(cache.known_absent(5, CAPABILITY_XATTR));
        assert!(!cache.known_absent(5, b"user.other"));
        assert!(!cache.known_absent(6, CAPABILITY_XATTR));
        cache.forget(5);
        assert!(!cache.known_absent(5, CAPABILITY_XATTR));
    }

    #[test]
    fn absence_expires_with_the_ttl() {
        let cache = CapabilityAbsence::new(Duration::from_millis(20));
        cache.saw_absent(5, CAPABILITY_XATTR);
        std::thread::sleep(Duration::from_millis(40));
        assert!(!cache.known_absent(5, CAPABILITY_XATTR));
        let never = CapabilityAbsence::new(Duration::ZERO);
        never.saw_absent(5, CAPABILITY_XATTR);
        assert!(!never.known_absent(5, CAPABILITY_XATTR));
    }
}
