//! The upload queue: which staged block goes to the store next, and what happens when it fails.
//!
//! Guarantees:
//! - Oldest first (by lsn), each block no sooner than `delay` after it was staged.
//! - A block is handed to one upload at a time (it is `Uploading` until that upload ends).
//! - Failures that name the block count against it; after `max_attempts` of them it is
//!   quarantined: kept on the device, never uploaded again until asked, shown in Status. Store
//!   outages never count: the drain retries them without limit, when it chooses.
//! - Completions are collected for the bookkeeping record that saves a re-upload after restart
//!   (they are not durable before it is written, and need not be: an upload is idempotent).
//!
//! The policy is fixed when the log is opened.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use shared::BlockKey;

/// How uploads are paced and retried (`serve`'s `--upload-*` and `--retry-*` flags).
#[derive(Debug, Clone)]
pub struct UploadPolicy {
    /// Blocks are uploaded no sooner than this after they were staged.
    pub delay: Duration,
    /// Failures naming a block after which it is quarantined.
    pub max_attempts: u32,
    /// First retry delay; doubles with each failure of the block (and of the store).
    pub retry_initial: Duration,
    /// Longest retry delay.
    pub retry_max: Duration,
}

impl Default for UploadPolicy {
    fn default() -> Self {
        UploadPolicy {
            delay: Duration::ZERO,
            max_attempts: 5,
            retry_initial: Duration::from_millis(200),
            retry_max: Duration::from_secs(30),
        }
    }
}

impl UploadPolicy {
    /// The wait before retrying a block that failed `attempts` times.
    pub fn backoff(&self, attempts: u32) -> Duration {
        (self.retry_initial * 2u32.saturating_pow(attempts.min(16))).min(self.retry_max)
    }
}

pub(super) struct UploadQueue {
    pub policy: UploadPolicy,
    /// Blocks waiting for upload, oldest first.
    queue: BTreeMap<u64, BlockKey>,
    /// Blocks waiting to be retried after a failed upload, by due time.
    retry: BTreeMap<(Instant, u64), BlockKey>,
    /// Blocks being uploaded (a count: waiters ask for it on every state change).
    uploading: u64,
    pub paused: bool,
    /// Upload completions not yet in a bookkeeping record.
    completed: Vec<u64>,
}

/// What the queue offers next.
pub(super) enum Next {
    Ready(u64, BlockKey),
    /// Nothing is due before this instant (upload delay or retry backoff).
    WaitUntil(Instant),
    Idle,
}

impl UploadQueue {
    pub fn new(policy: UploadPolicy, paused: bool) -> UploadQueue {
        UploadQueue {
            policy,
            queue: BTreeMap::new(),
            retry: BTreeMap::new(),
            uploading: 0,
            paused,
            completed: Vec::new(),
        }
    }

    /// Queues `key` under `lsn`. An lsn names one block; should another block already hold it,
    /// nothing is replaced and that block is returned (recovery reports the conflict).
    pub fn push(&mut self, lsn: u64, key: BlockKey) -> Result<(), BlockKey> {
        match self.queue.entry(lsn) {
            std::collections::btree_map::Entry::Vacant(slot) => {
                slot.insert(key);
                Ok(())
            }
            std::collections::btree_map::Entry::Occupied(held) if *held.get() == key => Ok(()),
            std::collections::btree_map::Entry::Occupied(held) => Err(*held.get()),
        }
    }

    /// The block is no longer to be uploaded (deleted).
    pub fn remove(&mut self, lsn: u64, key: &BlockKey) {
        self.queue.remove(&lsn);
        self.retry.retain(|_, k| k != key);
    }

    /// The oldest block due at `now`, given when each was staged (`staged_at`); the caller
    /// marks it uploading with [`UploadQueue::started`].
    pub fn next(&mut self, now: Instant, staged_at: impl Fn(&BlockKey) -> Option<Instant>) -> Next {
        if self.paused {
            return Next::Idle;
        }
        // Retries that are due go back into the ordered queue.
        while let Some((&(due, lsn), &key)) = self.retry.iter().next() {
            if due > now {
                break;
            }
            self.retry.remove(&(due, lsn));
            self.queue.insert(lsn, key);
        }
        let next_retry = self.retry.keys().next().map(|(due, _)| *due);
        loop {
            let Some((&lsn, &key)) = self.queue.iter().next() else {
                return next_retry.map_or(Next::Idle, Next::WaitUntil);
            };
            let Some(staged) = staged_at(&key) else {
                // Gone from the index (its segment reused): nothing to upload.
                self.queue.remove(&lsn);
                continue;
            };
            let due = staged + self.policy.delay;
            if due > now {
                return Next::WaitUntil(next_retry.map_or(due, |r| r.min(due)));
            }
            return Next::Ready(lsn, key);
        }
    }

    pub fn started(&mut self, lsn: u64) {
        self.queue.remove(&lsn);
        self.uploading += 1;
    }

    /// An upload ended (done, failed, or its block deleted meanwhile).
    pub fn ended(&mut self) {
        self.uploading -= 1;
    }

    pub fn completed(&mut self, lsn: u64) {
        self.completed.push(lsn);
    }

    /// Retries `key` after `backoff`.
    pub fn retry_after(&mut self, backoff: Duration, lsn: u64, key: BlockKey) {
        self.retry.insert((Instant::now() + backoff, lsn), key);
    }

    /// Up to `max` completions for a bookkeeping record.
    pub fn take_completed(&mut self, max: usize) -> Vec<u64> {
        let n = self.completed.len().min(max);
        self.completed.drain(..n).collect()
    }

    /// Completions whose record could not be written: tried again with the next one.
    pub fn restore_completed(&mut self, lsns: Vec<u64>) {
        self.completed.extend(lsns);
    }

    /// Blocks waiting for (or in) upload, quarantined ones excepted.
    pub fn backlog(&self) -> u64 {
        (self.queue.len() + self.retry.len()) as u64 + self.uploading
    }

    /// Blocks waiting, not yet being uploaded.
    pub fn waiting(&self) -> u64 {
        (self.queue.len() + self.retry.len()) as u64
    }

    /// The keys waiting, oldest first (tests).
    #[cfg(test)]
    pub fn queued_keys(&self) -> impl Iterator<Item = &BlockKey> {
        self.queue.values()
    }
}
