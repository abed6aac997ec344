//! Remembers, for as long as the kernel may cache attributes, which extended attributes a file
//! does not have, so that the common probes cost no round trip:
//!
//! - `security.capability`: the kernel asks for it before every `write(2)` to a FUSE file (to
//!   drop file capabilities on write); without this every append costs a metadata round trip.
//! - any attribute of a file a listing reported without extended attributes: `ls -l` asks for
//!   `security.selinux` and `system.posix_acl_access` of every entry.
//!
//! - `user.stagefs.write_policy`: read when a file is opened for writing (and of the directory
//!   a file is created in, whose policy the new file takes).
//!
//! Only absence (and the write policy) is remembered, for the attribute TTL: the kernel itself decides from mode bits
//! it caches that long, so another mount setting an attribute is seen no later than another
//! mount's `chmod u+s` is. A change made through this mount forgets the file.

use std::time::Duration;

use super::meta_api::Ino;

/// The attribute the kernel probes on every write.
pub const CAPABILITY_XATTR: &[u8] = b"security.capability";

/// Files remembered at most (an entry is a few dozen bytes).
const MAX_FILES: u64 = 64 * 1024;

pub struct XattrAbsence {
    /// Files seen without `security.capability`; each entry expires after the TTL.
    seen_absent: moka::sync::Cache<Ino, ()>,
    /// Files a listing reported without any extended attribute.
    without_any: moka::sync::Cache<Ino, ()>,
    /// Files and directories whose write policy was read: whether it says `through`.
    write_through: moka::sync::Cache<Ino, bool>,
    ttl: Duration,
}

impl XattrAbsence {
    pub fn new(ttl: Duration) -> Self {
        let cache = || {
            moka::sync::Cache::builder()
                .max_capacity(MAX_FILES)
                .time_to_live(ttl.max(Duration::from_nanos(1)))
                .build()
        };
        XattrAbsence {
            seen_absent: cache(),
            without_any: cache(),
            write_through: moka::sync::Cache::builder()
                .max_capacity(MAX_FILES)
                .time_to_live(ttl.max(Duration::from_nanos(1)))
                .build(),
            ttl,
        }
    }

    /// True when `name` of `ino` is known to be absent, so the engine need not be asked.
    pub fn known_absent(&self, ino: Ino, name: &[u8]) -> bool {
        self.known_none(ino) || (name == CAPABILITY_XATTR && self.seen_absent.contains_key(&ino))
    }

    /// True when `ino` is known to have no extended attribute at all.
    pub fn known_none(&self, ino: Ino) -> bool {
        self.without_any.contains_key(&ino)
    }

    /// A listing reported `ino` without extended attributes.
    pub fn saw_none(&self, ino: Ino) {
        if !self.ttl.is_zero() {
            self.without_any.insert(ino, ());
        }
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
        self.without_any.invalidate(&ino);
        self.write_through.invalidate(&ino);
    }

    /// Whether `ino`'s write policy (`user.stagefs.write_policy`) says `through`, if known.
    pub fn write_through(&self, ino: Ino) -> Option<bool> {
        if self.known_none(ino) {
            return Some(false);
        }
        self.write_through.get(&ino)
    }

    /// The engine answered `ino`'s write policy.
    pub fn saw_write_policy(&self, ino: Ino, through: bool) {
        if !self.ttl.is_zero() {
            self.write_through.insert(ino, through);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absence_is_remembered_for_the_capability_only_and_until_a_change() {
        let cache = XattrAbsence::new(Duration::from_secs(60));
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
    fn a_file_listed_without_attributes_has_none_until_a_change() {
        let cache = XattrAbsence::new(Duration::from_secs(60));
        cache.saw_none(7);
        assert!(cache.known_absent(7, b"security.selinux"));
        assert!(cache.known_absent(7, CAPABILITY_XATTR));
        assert!(!cache.known_absent(8, b"security.selinux"));
        cache.forget(7);
        assert!(!cache.known_none(7));
    }

    #[test]
    fn absence_expires_with_the_ttl() {
        let cache = XattrAbsence::new(Duration::from_millis(20));
        cache.saw_absent(5, CAPABILITY_XATTR);
        std::thread::sleep(Duration::from_millis(40));
        assert!(!cache.known_absent(5, CAPABILITY_XATTR));
        let never = XattrAbsence::new(Duration::ZERO);
        never.saw_absent(5, CAPABILITY_XATTR);
        assert!(!never.known_absent(5, CAPABILITY_XATTR));
    }
}
