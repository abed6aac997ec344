//! Where each record lives in the key space of a [`crate::kv::KvStore`].
//!
//! Every key starts with one byte naming its record type, then big-endian integers (so keys sort
//! as the numbers do) and, last, any name (so one directory's entries or one inode's xattrs are a
//! contiguous range):
//!
//! | record            | key                                | value                              |
//! |-------------------|------------------------------------|------------------------------------|
//! | format version    | `F`                                | u64                                |
//! | file-system id    | `I`                                | 16 random bytes                    |
//! | inode             | `i` ino                            | inode record (`codec`)             |
//! | directory entry   | `d` parent name                    | ino, cookie                        |
//! | listing order     | `o` parent cookie                  | ino, name                          |
//! | symlink target    | `s` ino                            | target                             |
//! | xattr             | `x` ino name                       | value                              |
//! | chunk             | `c` ino chunk-index                | slices in commit order (`codec`)   |
//! | usage counter     | `u` counter shard                  | u64 (sharded: see `rules`)         |
//! | tenant usage      | `U` shard tenant                   | inodes, bytes the tenant owns (sharded) |
//! | directory stats   | `D` dir shard                      | files, dirs, bytes of its children (sharded) |
//! | subdirectory      | `C` parent child                   | empty (`du` walks directories only) |
//! | names of a node   | `P` ino parent                     | u64: its names in `parent`, while it has several |
//! | id sequence       | `n` name                           | u64, next id (backends that keep sequences in the key space) |
//! | session           | `S` session                        | last heartbeat, description        |
//! | a mount's gateways| `v` session                        | gateways used, then avoided (`rules`) |
//! | open handles      | `h` session ino                    | u64                                |
//! | slice-id lease    | `a` session end                    | u64, first (ids `first..end`)      |
//! | pending slice     | `p` session slice-id               | len, gateway (`codec`)             |
//! | delete queue      | `q` gateway due-time slice-id      | len, gateway (`codec`)             |
//! | queued slice      | `Q` slice-id                       | due time, gateway                  |
//! | gateway           | `g` gateway                        | epoch, heartbeat, load, address    |
//! | byte-range locks  | `l` ino session owner              | one owner's locks (`locks::encode`) |
//! | a session's locks | `L` session ino owner              | empty (to drop them with the session) |
//! | change slot       | `r` session slot                   | seq, ino of the result (`once`)    |
//! | directory lease   | `e` dir                            | holder session, recalled (`rules/dir_leases`) |
//! | a session's leases| `E` session dir                    | empty (to drop them with the session) |
//!
//! A session id is 128 bits, so it takes two numbers (high half first) in `S`, `v`, `h`, `a`, `p`,
//! `l`, `L`, `r` and `E`.
//!
//! `o` exists so that `readdir` pages by cookie: a cookie is fixed for the life of an entry, so
//! paging by cookie never repeats an entry and never skips one that existed throughout.

use crate::kv::Sequence;
use crate::{GatewayId, Ino, MetaError, Result, SessionId, TimeNs};

pub const FORMAT: &[u8] = b"F";

/// The file system's id: 16 random bytes, made once. The object store's prefix is claimed with
/// it, so two file systems never share one.
pub const FILE_SYSTEM_ID: &[u8] = b"I";

fn key(tag: u8, numbers: &[u64], tail: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(1 + 8 * numbers.len() + tail.len());
    key.push(tag);
    for n in numbers {
        key.extend_from_slice(&n.to_be_bytes());
    }
    key.extend_from_slice(tail);
    key
}

/// Signed times sort as unsigned once the sign bit is flipped.
fn ordered_time(t: TimeNs) -> u64 {
    (t as u64) ^ (1 << 63)
}

fn time_from_ordered(v: u64) -> TimeNs {
    (v ^ (1 << 63)) as i64
}

/// The first key past every key that starts with `prefix` (the end of a prefix scan).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return end;
        }
    }
    // Unreachable for our keys: every prefix starts with an ASCII tag, which has a successor.
    unreachable!("prefix {prefix:?} has no successor")
}

pub fn inode(ino: Ino) -> Vec<u8> {
    key(b'i', &[ino], &[])
}

pub fn dentry(parent: Ino, name: &[u8]) -> Vec<u8> {
    key(b'd', &[parent], name)
}

pub fn listing(parent: Ino, cookie: u64) -> Vec<u8> {
    key(b'o', &[parent, cookie], &[])
}

/// Every listing key of directory `parent`.
pub fn listing_prefix(parent: Ino) -> Vec<u8> {
    key(b'o', &[parent], &[])
}

pub fn symlink(ino: Ino) -> Vec<u8> {
    key(b's', &[ino], &[])
}

pub fn xattr(ino: Ino, name: &[u8]) -> Vec<u8> {
    key(b'x', &[ino], name)
}

pub fn xattr_prefix(ino: Ino) -> Vec<u8> {
    key(b'x', &[ino], &[])
}

pub fn chunk(ino: Ino, chunk_index: u64) -> Vec<u8> {
    key(b'c', &[ino, chunk_index], &[])
}

pub fn chunk_prefix(ino: Ino) -> Vec<u8> {
    key(b'c', &[ino], &[])
}

pub fn usage(counter: u8, shard: u8) -> Vec<u8> {
    vec![b'u', counter, shard]
}

pub fn usage_prefix(counter: u8) -> Vec<u8> {
    vec![b'u', counter]
}

/// One shard of the usage totals of the nodes `tenant` owns.
pub fn tenant_usage(shard: u8, tenant: &str) -> Vec<u8> {
    let mut key = vec![b'U', shard];
    key.extend_from_slice(tenant.as_bytes());
    key
}

pub const TENANT_USAGE_PREFIX: &[u8] = b"U";

/// The tenant of a tenant-usage key.
pub fn tenant_of_usage(key: &[u8]) -> String {
    String::from_utf8_lossy(key.get(2..).unwrap_or_default()).into_owned()
}

/// One shard of the statistics of `dir`'s direct children (its `du` share).
pub fn dir_stats(dir: Ino, shard: u8) -> Vec<u8> {
    key(b'D', &[dir], &[shard])
}

pub fn dir_stats_prefix(dir: Ino) -> Vec<u8> {
    key(b'D', &[dir], &[])
}

/// How many names node `ino` has in directory `parent` (kept while it has more than one name,
/// so its statistics can move to another of its directories when the one counting it loses
/// the name).
pub fn names(ino: Ino, parent: Ino) -> Vec<u8> {
    key(b'P', &[ino, parent], &[])
}

pub fn names_prefix(ino: Ino) -> Vec<u8> {
    key(b'P', &[ino], &[])
}

/// Directory `child` is in directory `parent`.
pub fn subdir(parent: Ino, child: Ino) -> Vec<u8> {
    key(b'C', &[parent, child], &[])
}

pub fn subdir_prefix(parent: Ino) -> Vec<u8> {
    key(b'C', &[parent], &[])
}

pub fn sequence(sequence: Sequence) -> Vec<u8> {
    key(b'n', &[], sequence.name().as_bytes())
}

/// A session id as two key numbers, high half first (so keys sort as the ids do).
fn session_parts(session: SessionId) -> [u64; 2] {
    [(session >> 64) as u64, session as u64]
}

/// The session id of the two key numbers [`session_parts`] made.
pub fn session_from_parts(high: u64, low: u64) -> SessionId {
    (SessionId::from(high) << 64) | SessionId::from(low)
}

pub fn session(session: SessionId) -> Vec<u8> {
    key(b'S', &session_parts(session), &[])
}

pub const SESSION_PREFIX: &[u8] = b"S";

pub fn mount_view(session: SessionId) -> Vec<u8> {
    key(b'v', &session_parts(session), &[])
}

pub const MOUNT_VIEW_PREFIX: &[u8] = b"v";

pub fn handle(session: SessionId, ino: Ino) -> Vec<u8> {
    let [high, low] = session_parts(session);
    key(b'h', &[high, low, ino], &[])
}

pub fn handle_prefix(session: SessionId) -> Vec<u8> {
    key(b'h', &session_parts(session), &[])
}

/// Session `session` holds node `ino` open (beside its [`handle`] count, kept for as long as
/// that is not zero): which sessions hold a node, without scanning them all.
pub fn holder(ino: Ino, session: SessionId) -> Vec<u8> {
    let [high, low] = session_parts(session);
    key(b'H', &[ino, high, low], &[])
}

pub fn holders_prefix(ino: Ino) -> Vec<u8> {
    key(b'H', &[ino], &[])
}

/// The slice ids `first..end` handed to `session` and not recorded as pending yet; keyed by
/// `end`, so the lease that may hold an id is the first at or after `id + 1`.
pub fn lease(session: SessionId, end: u64) -> Vec<u8> {
    let [high, low] = session_parts(session);
    key(b'a', &[high, low, end], &[])
}

pub fn lease_prefix(session: SessionId) -> Vec<u8> {
    key(b'a', &session_parts(session), &[])
}

pub fn pending(session: SessionId, slice_id: u64) -> Vec<u8> {
    let [high, low] = session_parts(session);
    key(b'p', &[high, low, slice_id], &[])
}

pub fn pending_prefix(session: SessionId) -> Vec<u8> {
    key(b'p', &session_parts(session), &[])
}

pub fn change_slot(session: SessionId, slot: u16) -> Vec<u8> {
    let [high, low] = session_parts(session);
    key(b'r', &[high, low, u64::from(slot)], &[])
}

pub fn change_slot_prefix(session: SessionId) -> Vec<u8> {
    key(b'r', &session_parts(session), &[])
}

pub fn lock(ino: Ino, session: SessionId, owner: u64) -> Vec<u8> {
    let [high, low] = session_parts(session);
    key(b'l', &[ino, high, low, owner], &[])
}

/// Every lock record of `ino`, of any session.
pub fn lock_prefix(ino: Ino) -> Vec<u8> {
    key(b'l', &[ino], &[])
}

pub fn session_lock(session: SessionId, ino: Ino, owner: u64) -> Vec<u8> {
    let [high, low] = session_parts(session);
    key(b'L', &[high, low, ino, owner], &[])
}

/// The lock index of `session`: on `ino` only, or on every inode.
pub fn session_lock_prefix(session: SessionId, ino: Option<Ino>) -> Vec<u8> {
    let [high, low] = session_parts(session);
    match ino {
        Some(ino) => key(b'L', &[high, low, ino], &[]),
        None => key(b'L', &[high, low], &[]),
    }
}

/// The lease on directory `dir` ([`crate::rules`], "Directory leases").
pub fn dir_lease(dir: Ino) -> Vec<u8> {
    key(b'e', &[dir], &[])
}

/// `session` holds the lease on `dir`: its leases, without scanning everyone's.
pub fn session_dir_lease(session: SessionId, dir: Ino) -> Vec<u8> {
    let [high, low] = session_parts(session);
    key(b'E', &[high, low, dir], &[])
}

pub fn session_dir_lease_prefix(session: SessionId) -> Vec<u8> {
    key(b'E', &session_parts(session), &[])
}

/// The delete queue is kept per gateway (the one that staged the slice and cleans it up), by due
/// time within each.
pub fn queue(gateway: &GatewayId, due: TimeNs, slice_id: u64) -> Vec<u8> {
    let mut key = queue_prefix(gateway);
    key.extend_from_slice(&ordered_time(due).to_be_bytes());
    key.extend_from_slice(&slice_id.to_be_bytes());
    key
}

pub const QUEUE_PREFIX: &[u8] = b"q";

pub fn queue_prefix(gateway: &GatewayId) -> Vec<u8> {
    let mut key = QUEUE_PREFIX.to_vec();
    key.extend_from_slice(gateway);
    key
}

/// The end of `gateway`'s queue entries due at or before `now` (the first key due after it).
pub fn queue_due_end(gateway: &GatewayId, now: TimeNs) -> Vec<u8> {
    match now.checked_add(1) {
        Some(next) => {
            let mut key = queue_prefix(gateway);
            key.extend_from_slice(&ordered_time(next).to_be_bytes());
            key
        }
        None => prefix_end(&queue_prefix(gateway)),
    }
}

pub fn gateway(id: &GatewayId) -> Vec<u8> {
    key(b'g', &[], id)
}

pub const GATEWAY_PREFIX: &[u8] = b"g";

pub fn queued(slice_id: u64) -> Vec<u8> {
    key(b'Q', &[slice_id], &[])
}

/// Reads the big-endian numbers after the tag of `key`, and the tail after them.
pub fn parse<const N: usize>(key: &[u8]) -> Result<([u64; N], &[u8])> {
    let body = key.get(1..).unwrap_or_default();
    if body.len() < 8 * N {
        return Err(MetaError::Corrupt(format!(
            "key {key:?} is shorter than {N} numbers"
        )));
    }
    let mut numbers = [0; N];
    for (i, n) in numbers.iter_mut().enumerate() {
        let bytes: [u8; 8] = body[8 * i..8 * i + 8].try_into().expect("8 bytes");
        *n = u64::from_be_bytes(bytes);
    }
    Ok((numbers, &body[8 * N..]))
}

/// The due time and slice id of a delete-queue key.
pub fn parse_queue(key: &[u8]) -> Result<(TimeNs, u64)> {
    let numbers = key.get(17..).unwrap_or_default();
    let ([due, slice_id], _) = parse::<2>(&[&[0][..], numbers].concat())?;
    Ok((time_from_ordered(due), slice_id))
}

/// A little-endian u64 value.
pub fn encode_u64(value: u64) -> Vec<u8> {
    value.to_le_bytes().to_vec()
}

pub fn decode_u64(what: &str, bytes: &[u8]) -> Result<u64> {
    bytes
        .try_into()
        .map(u64::from_le_bytes)
        .map_err(|_| MetaError::Corrupt(format!("{what}: {} bytes, expected 8", bytes.len())))
}

/// Two little-endian u64s followed by free bytes (entries, listings, sessions).
pub fn encode_pair(a: u64, b: u64, tail: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + tail.len());
    out.extend_from_slice(&a.to_le_bytes());
    out.extend_from_slice(&b.to_le_bytes());
    out.extend_from_slice(tail);
    out
}

pub fn decode_pair<'a>(what: &str, bytes: &'a [u8]) -> Result<(u64, u64, &'a [u8])> {
    if bytes.len() < 16 {
        return Err(MetaError::Corrupt(format!(
            "{what}: {} bytes, expected at least 16",
            bytes.len()
        )));
    }
    let a = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
    let b = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"));
    Ok((a, b, &bytes[16..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_sort_like_their_numbers_and_times() {
        assert!(listing(1, 255) < listing(1, 256));
        assert!(listing(1, u64::MAX) < listing(2, 0));
        let gw = [9; 16];
        assert!(queue(&gw, -5, 9) < queue(&gw, 0, 1));
        assert!(queue(&gw, i64::MAX, 1) < prefix_end(&queue_prefix(&gw)));
        assert_eq!(parse_queue(&queue(&gw, -7, 3)).unwrap(), (-7, 3));
        assert!(queue(&gw, 10, u64::MAX) < queue_due_end(&gw, 10));
        assert!(queue(&gw, 11, 0) >= queue_due_end(&gw, 10));
        assert!(queue(&[8; 16], i64::MAX, 0) < queue(&gw, i64::MIN, 0));
    }

    #[test]
    fn a_prefix_range_holds_exactly_its_keys() {
        let (start, end) = (xattr_prefix(7), prefix_end(&xattr_prefix(7)));
        assert!(start <= xattr(7, b"") && xattr(7, &[0xff; 300]) < end);
        assert!(xattr(8, b"") >= end);
        assert_eq!(prefix_end(&[1, 0xff]), vec![2]);
    }
}
