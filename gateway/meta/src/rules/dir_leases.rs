//! Directory leases: a mount that made a directory may answer lookups of names it did not add
//! to it ("absent") without asking, for as long as nobody else can add one.
//!
//! Why: a package install or an untar looks up every name before it makes it, and Python looks
//! up many names that are not there; each was a round trip to the gateway (SEMANTICS in the
//! README, "Directory leases").
//!
//! The rules:
//! - A lease is granted on an empty directory only ([`Tx::take_dir_lease`]), so the holder knows
//!   every name in it: the ones it adds itself. It writes the directory's inode, as every
//!   addition does, so a grant and a concurrent addition never both commit.
//! - Every addition of a name (create, mknod, mkdir, symlink, link, rename, exchange) first
//!   checks the lease of its directory ([`Tx::check_dir_lease`]). The holder's own additions
//!   pass (the request's change tag names its session, [`crate::once`]). Anyone else's fails
//!   with [`MetaError::DirLeased`], and the transaction loop recalls the lease
//!   ([`KvMeta::recall_dir_lease`]) before it runs the addition again.
//! - A recall marks the lease recalled, then waits until its holder gives it back, or for
//!   [`DIR_LEASE_RECALL_WAIT`] after the mark, and then removes it itself.
//! - The holder counts a lease as good for [`crate::DIR_LEASE_TERM`] (at most one heartbeat
//!   interval) from when it sent the call that granted or kept it, if that call found it
//!   unrecalled. That call read the lease before the recall marked it, so the holder stops
//!   answering from it before the recall's wait ends. Only durations are compared, each on
//!   one machine's clock.
//! - Keeping leases refreshes the session's heartbeat, so a session expires only well after
//!   its holder stopped counting on its leases; a lease of a session that is gone is void.
//! - The lease goes with its directory and with its session.
//!
//! Names other mounts remove do not matter: the holder answers only absences from what it
//! knows, and asks about every name it added.

use std::time::Instant;

use super::{KvMeta, Tx};
use crate::kv::Durability;
use crate::{keys, Ino, MetaError, Result, SessionId, DIR_LEASE_RECALL_WAIT};

/// How often a recall looks whether the holder gave the lease back.
const RECALL_POLL: std::time::Duration = std::time::Duration::from_millis(5);

/// Recalls one addition makes (each a wait for a holder) before it fails with
/// [`MetaError::DirLeased`]: only a holder that takes the lease again at once makes more than
/// one.
pub const MAX_RECALLS: u32 = 4;

/// The lease record of a directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct DirLease {
    holder: SessionId,
    recalled: bool,
}

impl DirLease {
    fn encode(&self) -> Vec<u8> {
        let mut out = self.holder.to_be_bytes().to_vec();
        out.push(u8::from(self.recalled));
        out
    }

    fn decode(dir: Ino, bytes: &[u8]) -> Result<DirLease> {
        match bytes {
            [holder @ .., recalled @ (0 | 1)] if holder.len() == 16 => Ok(DirLease {
                holder: SessionId::from_be_bytes(holder.try_into().expect("16 bytes")),
                recalled: *recalled == 1,
            }),
            _ => Err(MetaError::Corrupt(format!(
                "lease of directory {dir}: {} bytes, expected 17",
                bytes.len()
            ))),
        }
    }
}

impl Tx<'_> {
    async fn dir_lease(&mut self, dir: Ino) -> Result<Option<DirLease>> {
        match self.get(&keys::dir_lease(dir)).await? {
            Some(bytes) => Ok(Some(DirLease::decode(dir, &bytes)?)),
            None => Ok(None),
        }
    }

    fn drop_dir_lease(&mut self, dir: Ino, holder: SessionId) {
        self.delete(keys::dir_lease(dir));
        self.delete(keys::session_dir_lease(holder, dir));
    }

    /// The lease on `dir`, unless there is none or its holder's session is gone (a void lease
    /// is removed here).
    async fn live_dir_lease(&mut self, dir: Ino) -> Result<Option<DirLease>> {
        let Some(lease) = self.dir_lease(dir).await? else {
            return Ok(None);
        };
        if self.get(&keys::session(lease.holder)).await?.is_none() {
            self.drop_dir_lease(dir, lease.holder);
            return Ok(None);
        }
        Ok(Some(lease))
    }

    /// Before a name is added to `dir`: passes for the holder of its lease (or when there is
    /// none, or its holder's session is gone); [`MetaError::DirLeased`] for anyone else.
    pub(super) async fn check_dir_lease(&mut self, dir: Ino) -> Result<()> {
        match self.live_dir_lease(dir).await? {
            Some(lease) if crate::once::current().is_none_or(|tag| tag.session != lease.holder) => {
                Err(MetaError::DirLeased(dir))
            }
            _ => Ok(()),
        }
    }

    /// Directory `dir` is going away: so does its lease.
    pub(super) async fn forget_dir_lease(&mut self, dir: Ino) -> Result<()> {
        if let Some(lease) = self.dir_lease(dir).await? {
            self.drop_dir_lease(dir, lease.holder);
        }
        Ok(())
    }

    /// Every lease `session` holds goes (the session ends).
    pub(super) async fn drop_session_dir_leases(&mut self, session: SessionId) -> Result<()> {
        let mut dirs = Vec::new();
        for (key, _) in self
            .scan_prefix(&keys::session_dir_lease_prefix(session))
            .await?
        {
            let ([_, _, dir], _) = keys::parse::<3>(&key)?;
            dirs.push(dir);
        }
        // The lease records in one read, not one round trip each.
        self.prefetch(dirs.iter().map(|&dir| keys::dir_lease(dir)).collect())
            .await?;
        for dir in dirs {
            self.delete(keys::session_dir_lease(session, dir));
            if self
                .dir_lease(dir)
                .await?
                .is_some_and(|l| l.holder == session)
            {
                self.delete(keys::dir_lease(dir));
            }
        }
        Ok(())
    }

    /// [`crate::MetaEngine::take_dir_lease`].
    pub(super) async fn take_dir_lease(&mut self, session: SessionId, dir: Ino) -> Result<bool> {
        self.check_session(session).await?;
        let inode = self.dir(dir).await?;
        if inode.attr.nlink == 0 || !self.dir_is_empty(dir).await? {
            return Ok(false);
        }
        if let Some(lease) = self.live_dir_lease(dir).await? {
            return Ok(lease.holder == session && !lease.recalled);
        }
        // An addition to `dir` writes its inode too (the directory's times), also when it runs
        // as a snapshot transaction: of the two, one fails, so a lease is never granted beside
        // a name its holder did not see.
        self.put_inode(&inode);
        let lease = DirLease {
            holder: session,
            recalled: false,
        };
        self.put(keys::dir_lease(dir), lease.encode());
        self.put(keys::session_dir_lease(session, dir), Vec::new());
        Ok(true)
    }

    /// [`crate::MetaEngine::keep_dir_leases`].
    pub(super) async fn keep_dir_leases(
        &mut self,
        session: SessionId,
        keep: &[Ino],
        release: &[Ino],
    ) -> Result<Vec<bool>> {
        self.beat(session).await?;
        let wanted = keep.iter().chain(release).map(|&dir| keys::dir_lease(dir));
        self.prefetch(wanted.collect()).await?;
        for &dir in release {
            if self
                .dir_lease(dir)
                .await?
                .is_some_and(|l| l.holder == session)
            {
                self.drop_dir_lease(dir, session);
            }
        }
        let mut held = Vec::with_capacity(keep.len());
        for &dir in keep {
            let lease = self.dir_lease(dir).await?;
            held.push(lease.is_some_and(|l| l.holder == session && !l.recalled));
        }
        Ok(held)
    }
}

impl KvMeta {
    /// Recalls the lease on `dir` for an addition by another session, and returns once the
    /// addition may run again: the lease was given back, taken over by another holder (which
    /// the addition then recalls in turn), or removed here after [`DIR_LEASE_RECALL_WAIT`].
    pub(crate) async fn recall_dir_lease(&self, dir: Ino) -> Result<()> {
        let marked = crate::transact!(self, Durability::Eventual, |tx| {
            let Some(mut lease) = tx.dir_lease(dir).await? else {
                return Ok(None);
            };
            if !lease.recalled {
                lease.recalled = true;
                tx.put(keys::dir_lease(dir), lease.encode());
            }
            Ok(Some(lease.holder))
        })?;
        let Some(holder) = marked else {
            return Ok(());
        };
        // From after the mark committed: the holder's last keep that found the lease good was
        // sent before, and it counts on it for less than this wait from then.
        let marked_at = Instant::now();
        metrics::counter!("stagefs_meta_dir_lease_recalls_total").increment(1);
        loop {
            tokio::time::sleep(RECALL_POLL).await;
            let mut tx = self.read_tx().await?;
            let current = tx.dir_lease(dir).await?;
            drop(tx);
            if current.is_none_or(|lease| lease.holder != holder) {
                return Ok(());
            }
            if marked_at.elapsed() >= DIR_LEASE_RECALL_WAIT {
                tracing::warn!(
                    dir,
                    holder = format_args!("{holder:032x}"),
                    waited = ?DIR_LEASE_RECALL_WAIT,
                    "the holder of a recalled directory lease did not give it back: removing it"
                );
                metrics::counter!("stagefs_meta_dir_lease_recalls_timed_out_total").increment(1);
                return crate::transact!(self, Durability::Eventual, |tx| {
                    if tx.dir_lease(dir).await?.is_some_and(|l| l.holder == holder) {
                        tx.drop_dir_lease(dir, holder);
                    }
                    Ok(())
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_record_reads_back_and_a_bad_one_is_refused() {
        for recalled in [false, true] {
            let lease = DirLease {
                holder: 0x0123_4567_89ab_cdef_0011_2233_4455_6677,
                recalled,
            };
            assert_eq!(DirLease::decode(5, &lease.encode()).unwrap(), lease);
        }
        assert!(DirLease::decode(5, &[0; 16]).is_err());
        assert!(DirLease::decode(5, &[[0; 16].as_slice(), &[2]].concat()).is_err());
    }
}
