//! This mount's file locks (`fcntl` byte ranges and `flock`), which live in the metadata engine
//! so that they hold across mounts and gateways.
//!
//! The mount remembers which (inode, lock owner) pairs may hold a lock, so that a `close` asks the
//! engine to drop locks only when there may be some, and it keeps track of lock requests that
//! wait: when their owner closes the file (the process exited, or was killed while it waited),
//! the wait is given up and whatever it may have been granted meanwhile is dropped. Locks the
//! mount never got to drop (it died) go with its session, once that expires.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::error::{FsError, FsResult};
use super::meta_api::{HeldLock, Ino, LockRequest, MetaApi, SessionId};

/// How long one `SetLock` call may wait at the gateway; a longer wait asks again.
const WAIT_PER_CALL: Duration = Duration::from_secs(25);

/// A waiting lock request's way out.
#[derive(Default)]
struct Cancel {
    cancelled: AtomicBool,
    notify: tokio::sync::Notify,
}

impl Cancel {
    fn cancel(&self) {
        self.cancelled.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    async fn cancelled(&self) {
        let notified = self.notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if !self.cancelled.load(Ordering::SeqCst) {
            notified.await;
        }
    }
}

pub(super) struct MountLocks {
    meta: Arc<dyn MetaApi>,
    session: SessionId,
    /// (inode, owner) pairs that took a lock since their last release here.
    held: Mutex<HashSet<(Ino, u64)>>,
    /// Lock requests waiting for another owner's lock to go.
    waiting: Mutex<HashMap<(Ino, u64), Arc<Cancel>>>,
}

impl MountLocks {
    pub fn new(meta: Arc<dyn MetaApi>, session: SessionId) -> MountLocks {
        MountLocks {
            meta,
            session,
            held: Mutex::default(),
            waiting: Mutex::default(),
        }
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashSet<(Ino, u64)>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn waiting(&self) -> std::sync::MutexGuard<'_, HashMap<(Ino, u64), Arc<Cancel>>> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `fcntl(F_SETLK)` (`wait` false: EAGAIN at once on a conflict) or `F_SETLKW` (waits until
    /// granted, or until the owner closes the file: EINTR).
    pub async fn set(&self, ino: Ino, lock: &LockRequest, wait: bool) -> FsResult<()> {
        if lock.kind.is_some() {
            // Noted before asking: a lock granted after its owner closed the file must be found.
            self.held().insert((ino, lock.owner));
        }
        if !wait {
            return self
                .meta
                .set_lock(self.session, ino, lock, Duration::ZERO)
                .await;
        }
        let cancel = Arc::new(Cancel::default());
        self.waiting().insert((ino, lock.owner), cancel.clone());
        let result = loop {
            tokio::select! {
                result = self.meta.set_lock(self.session, ino, lock, WAIT_PER_CALL) => {
                    match result {
                        Err(e) if e.errno() == libc::EAGAIN => continue,
                        other => break other,
                    }
                }
                _ = cancel.cancelled() => {
                    break Err(FsError::Meta {
                        op: "set_lock",
                        errno: libc::EINTR,
                        message: "the lock's owner closed the file while it waited".into(),
                    })
                }
            }
        };
        self.waiting().remove(&(ino, lock.owner));
        if cancel.cancelled.load(Ordering::SeqCst) {
            // The gateway may have granted it as the wait was given up.
            self.release(ino, lock.owner).await;
        }
        result
    }

    /// `fcntl(F_GETLK)`: another owner's lock that keeps `lock` from being taken.
    pub async fn get(&self, ino: Ino, lock: &LockRequest) -> FsResult<Option<HeldLock>> {
        self.meta.get_lock(self.session, ino, lock).await
    }

    /// A file of `ino` was closed by lock owner `owner`: its POSIX locks on the file go (as
    /// `close` does on Linux), and a lock request of it still waiting gives up.
    pub async fn closed_by(&self, ino: Ino, owner: u64) {
        if let Some(cancel) = self.waiting().get(&(ino, owner)) {
            cancel.cancel();
        }
        if self.held().contains(&(ino, owner)) {
            self.release(ino, owner).await;
        }
    }

    /// The mount's last handle on `ino` closed: every lock any of its owners holds there goes.
    pub async fn last_close(&self, ino: Ino) {
        let had_any = {
            let mut held = self.held();
            let before = held.len();
            held.retain(|(locked, _)| *locked != ino);
            held.len() != before
        };
        if had_any {
            if let Err(error) = self.meta.release_locks(self.session, ino, None).await {
                tracing::warn!(ino, %error, "could not drop this mount's locks on a closed file; they go when its session ends");
            }
        }
    }

    async fn release(&self, ino: Ino, owner: u64) {
        self.held().remove(&(ino, owner));
        if let Err(error) = self
            .meta
            .release_locks(self.session, ino, Some(owner))
            .await
        {
            tracing::warn!(ino, owner, %error, "could not drop a lock owner's locks; they go when this mount's session ends");
        }
    }
}
