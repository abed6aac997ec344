//! The file-system data types the metadata engine (gateway) and the client share: inodes and
//! their attributes, directory entries, slices. Both sides re-export these, so a value means the
//! same thing on either end of the Meta service.

use crate::{BlockKey, BLOCK_SIZE};

/// Inode number. Never reused within one metadata database.
pub type Ino = u64;
/// The root directory, present from the moment a database is formatted.
pub const ROOT_INO: Ino = 1;
/// A client session (one per mount): 128 random bits, so that no client can guess another's, and
/// 16 bytes (big-endian) on the wire.
pub type SessionId = u128;

/// A session id as the wire carries it.
pub fn session_to_wire(session: SessionId) -> Vec<u8> {
    session.to_be_bytes().to_vec()
}

/// A session id from the wire; `None` unless it is exactly 16 bytes.
pub fn session_from_wire(bytes: &[u8]) -> Option<SessionId> {
    Some(SessionId::from_be_bytes(bytes.try_into().ok()?))
}
/// Slots one session may use at once for changes sent exactly once: the changes it can have in
/// flight (see the metadata engine's `once` module).
pub const MAX_CHANGE_SLOTS: u16 = 1024;

/// How long a directory lease answers for the mount that holds it, counted from when the mount
/// sent the call that granted or kept it (at most one heartbeat interval, see the engine's
/// `rules/dir_leases`). Another session that adds a name to a leased directory first recalls
/// the lease and waits for the holder to give it back, or for [`DIR_LEASE_RECALL_WAIT`].
pub const DIR_LEASE_TERM: std::time::Duration = std::time::Duration::from_secs(1);
/// How long an addition to a leased directory waits, after recalling the lease, for its holder
/// to give it back before it takes the lease away itself: past [`DIR_LEASE_TERM`], so a holder
/// that neither kept nor gave it back has stopped answering from it by then.
pub const DIR_LEASE_RECALL_WAIT: std::time::Duration = std::time::Duration::from_millis(1500);
/// Directories one `KeepDirLeases` call may name (kept and given back together).
pub const MAX_DIR_LEASES_PER_CALL: usize = 4096;

/// The gRPC metadata key a change's [`RequestTag`] travels in.
pub const CHANGE_TAG_HEADER: &str = "stagefs-once";

/// Which change of which session a request is, so that a change sent again after its answer was
/// lost happens once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestTag {
    pub session: SessionId,
    pub slot: u16,
    /// Grows with each change sent in `slot`; a retry repeats it.
    pub seq: u64,
    /// The client sent this change before (without an answer): look for its record first.
    pub retry: bool,
}

impl RequestTag {
    /// `SESSION.SLOT.SEQ` (session as 32 hex digits), then `.r` for a retry.
    pub fn to_header(&self) -> String {
        let retry = if self.retry { ".r" } else { "" };
        format!("{:032x}.{}.{}{retry}", self.session, self.slot, self.seq)
    }

    /// Reads [`RequestTag::to_header`]'s form.
    pub fn parse(text: &str) -> Result<RequestTag, String> {
        let invalid = || {
            format!(
                "{CHANGE_TAG_HEADER} {:?}: expected SESSION.SLOT.SEQ[.r], a 32-hex-digit session \
                 and a slot below {MAX_CHANGE_SLOTS}",
                crate::clip(text, 80)
            )
        };
        let mut parts = text.split('.');
        let (Some(session), Some(slot), Some(seq)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(invalid());
        };
        let retry = match parts.next() {
            None => false,
            Some("r") => true,
            Some(_) => return Err(invalid()),
        };
        if parts.next().is_some() || session.len() != 32 {
            return Err(invalid());
        }
        let tag = RequestTag {
            session: SessionId::from_str_radix(session, 16).map_err(|_| invalid())?,
            slot: slot.parse().map_err(|_| invalid())?,
            seq: seq.parse().map_err(|_| invalid())?,
            retry,
        };
        if tag.slot >= MAX_CHANGE_SLOTS {
            return Err(invalid());
        }
        Ok(tag)
    }
}

#[cfg(test)]
mod request_tag_tests {
    use super::*;

    #[test]
    fn a_tag_reads_back_from_its_header() {
        for retry in [false, true] {
            let tag = RequestTag {
                session: 0x0123_4567_89ab_cdef_0011_2233_4455_6677,
                slot: 7,
                seq: 99,
                retry,
            };
            assert_eq!(RequestTag::parse(&tag.to_header()).unwrap(), tag);
        }
    }

    #[test]
    fn malformed_tags_are_refused() {
        for text in [
            "",
            "1.2.3",
            "0123456789abcdef0011223344556677.1",
            "0123456789abcdef0011223344556677.1.2.x",
            "0123456789abcdef0011223344556677.1.2.r.r",
            "0123456789abcdef0011223344556677.65535.2",
            "0123456789abcdef001122334455667g.1.2",
        ] {
            assert!(RequestTag::parse(text).is_err(), "{text:?} was accepted");
        }
    }
}

/// The id of the gateway that staged a slice (the uuid on its device, see `format.rs`).
pub type GatewayId = [u8; 16];

/// The gateways a mount routes new slices to, and those it leaves out because calls to them
/// failed: what the mount reports with each session heartbeat, so `stagefs status` can say
/// which gateways each mount is using.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MountView {
    pub using: Vec<GatewayId>,
    pub avoiding: Vec<GatewayId>,
}

/// The extended attribute holding a directory's or file's write policy (`stagefs policy`):
/// `through` (blocks go to the object store before `close` returns) or `gateway` (staged).
/// What is made in a directory gets the directory's; a name in the `user.` namespace, so the
/// kernel passes it on like any other.
pub const WRITE_POLICY_XATTR: &[u8] = b"user.stagefs.write_policy";

/// Handles one `Release` call may give back: a bound on what one call makes the engine do in
/// one transaction. A mount gathers fewer (see the client's `releases` module).
pub const MAX_RELEASE_BATCH: usize = 1024;

/// Gateways one [`MountView`] may name in all: a bound on what a client makes the metadata hold.
pub const MAX_VIEW_GATEWAYS: usize = 256;
/// Nanoseconds since the Unix epoch. Signed, because `touch -d 1960-01-01` is legal.
pub type TimeNs = i64;

/// Longest name of one directory entry, in bytes (NAME_MAX on Linux).
pub const MAX_NAME_LEN: usize = 255;
/// Longest symlink target, in bytes (PATH_MAX less the terminating NUL).
pub const MAX_SYMLINK_LEN: usize = 4095;
/// Longest xattr name, in bytes (XATTR_NAME_MAX).
pub const MAX_XATTR_NAME_LEN: usize = 255;
/// Largest xattr value, in bytes (XATTR_SIZE_MAX).
pub const MAX_XATTR_VALUE_LEN: usize = 64 * 1024;
/// Largest file size (what `off_t` can address).
pub const MAX_FILE_SIZE: u64 = i64::MAX as u64;
/// Highest link count of one inode.
pub const MAX_LINKS: u32 = u32::MAX - 1;

/// What an inode is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    CharDevice,
    BlockDevice,
}

/// The attributes of one inode, as `stat` shows them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr {
    pub ino: Ino,
    pub kind: FileKind,
    /// Permission bits only (`mode & 0o7777`); the file type is [`Attr::kind`].
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Directories: 2 + number of subdirectories. Others: number of names; 0 while an unlinked
    /// file is kept alive by open handles.
    pub nlink: u32,
    /// Files: length in bytes. Symlinks: length of the target. Others: 0.
    pub size: u64,
    pub atime_ns: TimeNs,
    pub mtime_ns: TimeNs,
    pub ctime_ns: TimeNs,
    /// Device number of character and block devices.
    pub rdev: u32,
}

/// The inodes a `rename` changed besides the two directories: their ctime, and for `other`
/// replaced by the move, its link count. A mount forgets what it knew of these alone.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Renamed {
    /// The inode that had the old name; 0 when the engine does not say (a retried rename's
    /// answer, an older gateway, or nothing changed): the mount then forgets what it knew of
    /// every inode.
    pub moved: Ino,
    /// The inode that had the new name: replaced, or with `RENAME_EXCHANGE` moved the other way.
    pub other: Option<Ino>,
    /// `moved`'s attributes after the rename: its ctime is the two directories' new mtime and
    /// ctime (one clock reading).
    pub attr: Option<Attr>,
}

/// What `setattr` changes; `None` leaves a field alone. `ctime` always becomes now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// Truncate or extend a regular file. Bytes past the old end read as zeros.
    pub size: Option<u64>,
    pub atime_ns: Option<TimeNs>,
    pub mtime_ns: Option<TimeNs>,
}

/// What a slice's commit sets on its file besides the data: the mtime, and the mode, owner and
/// atime that a `chmod`, `chown` or `utimensat` set while the data was not committed yet (the
/// mount answers those itself and sends them with the data's durable commit, see SEMANTICS).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CommitAttrs {
    /// The writer's clock at the commit, or what a `utimensat` after the last write set.
    pub mtime_ns: TimeNs,
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub atime_ns: Option<TimeNs>,
}

impl CommitAttrs {
    /// A commit that sets the mtime only.
    pub fn at(mtime_ns: TimeNs) -> Self {
        Self {
            mtime_ns,
            ..Self::default()
        }
    }

    /// A commit at `mtime_ns` carrying the mode, owner and atime of `held` (its size and mtime
    /// are not taken).
    pub fn new(mtime_ns: TimeNs, held: &SetAttr) -> Self {
        Self {
            mtime_ns,
            mode: held.mode,
            uid: held.uid,
            gid: held.gid,
            atime_ns: held.atime_ns,
        }
    }

    /// The mode, owner and atime these carry, as a `setattr` would make them (no mtime).
    pub fn held(&self) -> SetAttr {
        SetAttr {
            mode: self.mode,
            uid: self.uid,
            gid: self.gid,
            size: None,
            atime_ns: self.atime_ns,
            mtime_ns: None,
        }
    }

    /// Everything these set, as a `setattr` would make them.
    pub fn changes(&self) -> SetAttr {
        SetAttr {
            mtime_ns: Some(self.mtime_ns),
            ..self.held()
        }
    }

    /// Whether `attr` shows the mode, owner and atime these carry (a commit's answer does,
    /// unless the gateway that took it predates them and dropped them).
    pub fn shown_by(&self, attr: &Attr) -> bool {
        let mut with = *attr;
        self.held().apply_to(&mut with);
        with == *attr
    }
}

impl SetAttr {
    /// Sets mode, owner and times on `attr` as `setattr` does; the size and the ctime are the
    /// caller's.
    pub fn apply_to(&self, attr: &mut Attr) {
        if let Some(mode) = self.mode {
            attr.mode = mode & 0o7777;
        }
        attr.uid = self.uid.unwrap_or(attr.uid);
        attr.gid = self.gid.unwrap_or(attr.gid);
        attr.atime_ns = self.atime_ns.unwrap_or(attr.atime_ns);
        attr.mtime_ns = self.mtime_ns.unwrap_or(attr.mtime_ns);
    }

    /// `later` on top of these changes: each field `later` sets wins.
    pub fn then(&self, later: &SetAttr) -> SetAttr {
        SetAttr {
            mode: later.mode.or(self.mode),
            uid: later.uid.or(self.uid),
            gid: later.gid.or(self.gid),
            size: later.size.or(self.size),
            atime_ns: later.atime_ns.or(self.atime_ns),
            mtime_ns: later.mtime_ns.or(self.mtime_ns),
        }
    }
}

/// Owner and permissions of a new inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NewNode {
    pub kind: FileKind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
}

/// One directory entry with the attributes of the inode it names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub name: Vec<u8>,
    /// Pass this as `after_cookie` to continue the listing after this entry. Cookies of one
    /// directory only grow, so a listing in pages never repeats or skips an entry that stayed put.
    pub cookie: u64,
    pub attr: Attr,
    /// Whether the inode has extended attributes (`None`: the engine does not know, for inodes
    /// last changed by an older release), so that `ls -l` need not ask for each entry's.
    pub has_xattrs: Option<bool>,
}

/// One contiguous write inside a chunk (DESIGN.md, "Data model").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Slice {
    /// 0 for a hole (reads as zeros, owns no blocks).
    pub slice_id: u64,
    pub offset_in_chunk: u32,
    pub len: u32,
    /// The gateway that staged the slice, whom a reader asks for the blocks.
    pub gateway_id: GatewayId,
}

impl Slice {
    /// The id of hole slices, which own no data.
    pub const HOLE_ID: u64 = 0;

    pub fn end_in_chunk(&self) -> u64 {
        u64::from(self.offset_in_chunk) + u64::from(self.len)
    }
}

impl Slice {
    /// The object keys of this slice's blocks (none for a hole).
    pub fn block_keys(&self) -> Vec<BlockKey> {
        if self.slice_id == Self::HOLE_ID {
            return Vec::new();
        }
        slice_block_keys(self.slice_id, self.len)
    }
}

/// The current time on this host, in nanoseconds since the epoch.
pub fn now_ns() -> TimeNs {
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(since_epoch.as_nanos()).unwrap_or(i64::MAX)
}

/// The blocks of slice `slice_id` of `len` bytes: cut into blocks of at most [`BLOCK_SIZE`].
pub fn slice_block_keys(slice_id: u64, len: u32) -> Vec<BlockKey> {
    let len = u64::from(len);
    (0..len.div_ceil(BLOCK_SIZE))
        .map(|index| BlockKey {
            slice_id,
            block_index: index as u32,
            block_len: (len - index * BLOCK_SIZE).min(BLOCK_SIZE) as u32,
        })
        .collect()
}

/// File-system usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatFs {
    /// Inodes in use, the root included.
    pub files: u64,
    /// Sum of the lengths of all regular files.
    pub used_bytes: u64,
    /// Configured limits, if any.
    pub capacity_bytes: Option<u64>,
    pub max_files: Option<u64>,
}

/// What a lock lets other owners do over its range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockKind {
    /// Shared: others may read-lock the range too.
    Read,
    /// Exclusive: no other owner may lock the range.
    Write,
}

/// One lock an owner holds: bytes `start..=end` (`end` = `u64::MAX`: to the end of the file,
/// however long it grows), and the process that took it (reported by `F_GETLK`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeldLock {
    pub start: u64,
    pub end: u64,
    pub kind: LockKind,
    pub pid: u32,
}

/// A change to one owner's locks on an inode: bytes `start..=end` become `kind` (`None`:
/// unlocked).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockRequest {
    pub owner: u64,
    pub start: u64,
    pub end: u64,
    pub kind: Option<LockKind>,
    pub pid: u32,
}

impl HeldLock {
    /// Whether this lock of another owner keeps `kind` from being taken over `start..=end`.
    pub fn conflicts(&self, start: u64, end: u64, kind: LockKind) -> bool {
        self.start <= end
            && start <= self.end
            && (self.kind == LockKind::Write || kind == LockKind::Write)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_are_cut_into_blocks_of_at_most_4_mib() {
        let keys = slice_block_keys(7, (BLOCK_SIZE * 2 + 5) as u32);
        let lens: Vec<u32> = keys.iter().map(|k| k.block_len).collect();
        assert_eq!(lens, [BLOCK_SIZE as u32, BLOCK_SIZE as u32, 5]);
        assert_eq!(keys[2].to_string(), "chunks/0/0/7_2_5");
        let hole = Slice {
            slice_id: Slice::HOLE_ID,
            offset_in_chunk: 0,
            len: 10,
            gateway_id: [0; 16],
        };
        assert!(hole.block_keys().is_empty());
    }
}
