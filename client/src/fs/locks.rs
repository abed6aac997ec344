//! This mount's file locks (`fcntl` byte ranges and `flock`), which live in the metadata engine
//! so that they hold across mounts and gateways.
//!
//! The mount remembers which (inode, lock owner) pairs may hold a lock, so that a `close` asks the
//! engine to drop locks only when there may be some, and it keeps track of lock requests that
//! wait: when their owner closes the file (the process exited, or was killed while it waited),
//! the wait is given up and whatever it may have been granted meanwhile is dropped. A signal the
//! waiting thread would take ends its wait with EINTR (see [`signal_waiting`]). Locks the mount
//! never got to drop (it died) go with its session, once that expires.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::error::{FsError, FsResult};
use super::meta_api::{HeldLock, Ino, LockRequest, MetaApi, SessionId};

/// How long one `SetLock` call may wait at the gateway; a longer wait asks again, after looking
/// whether a signal interrupts it. A call is never abandoned midway (its lock could be granted
/// with no one to hear it), so this bounds how long a signal waits to be answered.
const WAIT_PER_CALL: Duration = Duration::from_secs(1);

/// Waiting `SetLock` calls of one mount at once: each holds an HTTP/2 stream of the mount's one
/// connection (which heartbeats share), so more waiters queue here.
const MAX_WAITING_CALLS: usize = 32;

/// How often a waiting request looks whether its process was killed meanwhile. The kernel does
/// not take back a FUSE request it sent (and fuser does not pass interrupts on), so a process
/// killed while it waits for a lock would otherwise stay in the kernel until the lock is
/// granted, unkillable.
const LIVENESS_CHECK: Duration = Duration::from_millis(250);

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

    fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::SeqCst)
    }

    async fn cancelled(&self) {
        let notified = self.notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if !self.is_cancelled() {
            notified.await;
        }
    }
}

/// Whether process `pid` has a fatal signal (SIGKILL) pending: it is being killed.
fn being_killed(pid: u32) -> bool {
    if pid == 0 {
        return false;
    }
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        // Gone already.
        return true;
    };
    status.lines().any(|line| {
        let mask = line
            .strip_prefix("SigPnd:")
            .or_else(|| line.strip_prefix("ShdPnd:"));
        mask.and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
            .is_some_and(|m| m & (1 << (libc::SIGKILL - 1)) != 0)
    })
}

/// Whether thread `tid` has a signal pending that it would take: pending for it or its process,
/// neither blocked nor ignored. The kernel keeps a thread that waits in a FUSE request there
/// until the request is answered, with its signal pending (fuser answers the kernel's
/// `FUSE_INTERRUPT` with ENOSYS instead of passing it on), so the mount looks for itself.
fn signal_waiting(tid: u32) -> bool {
    if tid == 0 {
        return false;
    }
    let Ok(status) = std::fs::read_to_string(format!("/proc/{tid}/status")) else {
        return false;
    };
    let mask = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
            .unwrap_or(0)
    };
    let pending = mask("SigPnd:") | mask("ShdPnd:");
    pending & !mask("SigBlk:") & !mask("SigIgn:") != 0
}

const OWNER_CLOSED: &str = "the lock's owner closed the file while it waited";

fn interrupted(why: &str) -> FsError {
    FsError::Meta {
        op: "set_lock",
        errno: libc::EINTR,
        message: why.into(),
    }
}

/// The waiting lock requests of each (inode, lock owner).
type Waiting = HashMap<(Ino, u64), Vec<Arc<Cancel>>>;

pub(super) struct MountLocks {
    meta: Arc<dyn MetaApi>,
    session: SessionId,
    /// (inode, owner) pairs that took a lock since their last release here.
    held: Mutex<HashSet<(Ino, u64)>>,
    /// Lock requests waiting for another owner's lock to go, each with its own way out.
    waiting: Mutex<Waiting>,
    waiting_calls: Arc<tokio::sync::Semaphore>,
}

impl MountLocks {
    pub fn new(meta: Arc<dyn MetaApi>, session: SessionId) -> MountLocks {
        MountLocks {
            meta,
            session,
            held: Mutex::default(),
            waiting: Mutex::default(),
            waiting_calls: Arc::new(tokio::sync::Semaphore::new(MAX_WAITING_CALLS)),
        }
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashSet<(Ino, u64)>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn waiting(&self) -> std::sync::MutexGuard<'_, Waiting> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `fcntl(F_SETLK)` (`wait` false: EAGAIN at once on a conflict) or `F_SETLKW` (waits until
    /// granted; EINTR when the owner closes the file, its process is killed, or thread `waiter`
    /// (0: unknown) gets a signal meanwhile).
    pub async fn set(&self, ino: Ino, lock: &LockRequest, wait: bool, waiter: u32) -> FsResult<()> {
        if lock.kind.is_some() {
            // Noted before asking: a lock granted after its owner closed the file must be found.
            self.held().insert((ino, lock.owner));
        }
        let cancel = Arc::new(Cancel::default());
        let key = (ino, lock.owner);
        self.waiting().entry(key).or_default().push(cancel.clone());
        let result = if wait {
            self.wait_for(ino, lock, &cancel, waiter).await
        } else {
            self.meta
                .set_lock(self.session, ino, lock, Duration::ZERO)
                .await
        };
        {
            let mut waiting = self.waiting();
            if let Some(cancels) = waiting.get_mut(&key) {
                cancels.retain(|c| !Arc::ptr_eq(c, &cancel));
                if cancels.is_empty() {
                    waiting.remove(&key);
                }
            }
        }
        if cancel.is_cancelled() && lock.kind.is_some() {
            // Its owner closed the file meanwhile: whatever was granted goes too.
            self.release(ino, lock.owner).await;
        }
        result
    }

    async fn wait_for(
        &self,
        ino: Ino,
        lock: &LockRequest,
        cancel: &Cancel,
        waiter: u32,
    ) -> FsResult<()> {
        loop {
            let slot = tokio::select! {
                slot = self.waiting_calls.clone().acquire_owned() => {
                    slot.map_err(|_| interrupted("the mount is closing"))?
                }
                _ = cancel.cancelled() => {
                    return Err(interrupted(OWNER_CLOSED))
                }
            };
            let call = self.meta.set_lock(self.session, ino, lock, WAIT_PER_CALL);
            tokio::pin!(call);
            let mut check = tokio::time::interval(LIVENESS_CHECK);
            let outcome = loop {
                tokio::select! {
                    result = &mut call => break result,
                    _ = cancel.cancelled() => {
                        return Err(interrupted(OWNER_CLOSED))
                    }
                    _ = check.tick() => {
                        if being_killed(lock.pid) {
                            cancel.cancel();
                            return Err(interrupted("the waiting process is being killed"));
                        }
                    }
                }
            };
            drop(slot);
            match outcome {
                // Nothing was granted: a signal may end the wait here.
                Err(e) if e.errno() == libc::EAGAIN => {
                    if signal_waiting(waiter) {
                        return Err(interrupted("a signal arrived while it waited"));
                    }
                }
                other => return other,
            }
        }
    }

    /// `fcntl(F_GETLK)`: another owner's lock that keeps `lock` from being taken.
    pub async fn get(&self, ino: Ino, lock: &LockRequest) -> FsResult<Option<HeldLock>> {
        self.meta.get_lock(self.session, ino, lock).await
    }

    /// A file of `ino` was closed by lock owner `owner`: its POSIX locks on the file go (as
    /// `close` does on Linux), and lock requests of it still waiting give up.
    pub async fn closed_by(&self, ino: Ino, owner: u64) {
        if let Some(cancels) = self.waiting().get(&(ino, owner)) {
            for cancel in cancels {
                cancel.cancel();
            }
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
            self.drop_locks(ino, None).await;
        }
    }

    async fn release(&self, ino: Ino, owner: u64) {
        self.held().remove(&(ino, owner));
        self.drop_locks(ino, Some(owner)).await;
    }

    /// Asks the engine to drop locks; while the gateway cannot be reached, keeps asking in the
    /// background (a lock left behind would hold other mounts out for as long as this mount
    /// lives). An answer (the session is gone: so are its locks) ends it.
    async fn drop_locks(&self, ino: Ino, owner: Option<u64>) {
        let Err(error) = self.meta.release_locks(self.session, ino, owner).await else {
            return;
        };
        if !matches!(error, FsError::MetaUnavailable { .. }) {
            tracing::warn!(ino, ?owner, %error, "could not drop locks");
            return;
        }
        tracing::warn!(ino, ?owner, %error, "could not drop locks yet; trying again in the background");
        let (meta, session) = (self.meta.clone(), self.session);
        tokio::spawn(async move {
            let mut delay = Duration::from_millis(500);
            loop {
                tokio::time::sleep(delay).await;
                match meta.release_locks(session, ino, owner).await {
                    Err(FsError::MetaUnavailable { .. }) => {
                        delay = (delay * 2).min(Duration::from_secs(10))
                    }
                    Err(error) => {
                        tracing::warn!(ino, ?owner, %error, "could not drop locks");
                        return;
                    }
                    Ok(()) => return,
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_process_being_killed_is_told_from_one_that_is_not() {
        assert!(!super::being_killed(std::process::id()));
        assert!(!super::being_killed(0), "no process named");
        assert!(super::being_killed(u32::MAX - 1), "no such process");
    }
}
