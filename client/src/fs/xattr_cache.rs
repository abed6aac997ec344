//! Remembers, for as long as the kernel may cache attributes, that a file has no
//! `security.capability` attribute.
//!
//! The kernel asks for that attribute before every `write(2)` to a FUSE file (to drop file
//! capabilities on write), so without this every append costs a metadata round trip. Only that
//! name and only its absence are remembered, for the attribute TTL: the kernel itself decides
//! from mode bits it caches that long, so another mount setting a capability is seen no later
//! than another mount's `chmod u+s` is. A change made through this mount forgets the file.

use std::time::Duration;

use super::meta_api::Ino;

/// The attribute the kernel probes on every write.
pub const CAPABILITY_XATTR: &[u8] = b"security.capability";

/// Files remembered at most (an entry is a few dozen bytes).
const MAX_FILES: u64 = 64 * 1024;

pub struct CapabilityAbsence {
    /// Files seen without the attribute; each entry expires after the TTL.
    seen_absent: moka::sync::Cache<Ino, ()>,
    ttl: Duration,
}

impl CapabilityAbsence {
    pub fn new(ttl: Duration) -> Self {
        CapabilityAbsence {
            seen_absent: moka::sync::Cache::builder()
                .max_capacity(MAX_FILES)
                .time_to_live(ttl.max(Duration::from_nanos(1)))
                .build(),
            ttl,
        }
    }

    /// True when `name` of `ino` is known to be absent, so the engine need not be asked.
    pub fn known_absent(&self, ino: Ino, name: &[u8]) -> bool {
        name == CAPABILITY_XATTR && self.seen_absent.contains_key(&ino)
    }

    /// The engine answered that `name` of `ino` does not exist.
    pub fn saw_absent(&self, ino: Ino, name: &[u8]) {
        if name != CAPABILITY_XATTR || self.ttl.is_zero() {
            return;
        }
        self.seen_absent.insert(ino, ());
    }

    /// This mount changed the attributes of `ino`.
    pub fn forget(&self, ino: Ino) {
        self.seen_absent.invalidate(&ino);
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
