//! The upload queue: which staged block goes to the store next, and what happens when it fails.
//!
//! Guarantees:
//! - Oldest first (by lsn), each block no sooner than `delay` after it was staged; a block
//!   someone waits for (`stagefs sync`) goes before all of them, delay or not.
//! - Writers first: while clients are staging blocks, no upload starts until they pause, or the
//!   oldest waiting block has waited `defer_max` (the caller says when they count as paused,
//!   and stops saying so when the device fills). Uploads cost the CPU and the device bandwidth
//!   the writers need, and the device is durable: what waits loses nothing, as a page cache's
//!   dirty pages wait for a pause or their expiry.
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
    /// Hours of the day (local time) in which uploads run; outside them only blocks a client
    /// waits for go, or everything while the device is nearly full. `None`: always.
    pub window: Option<UploadWindow>,
    /// The longest a block's upload waits for writers to pause (`--upload-defer-max`); zero:
    /// uploads never wait for them.
    pub defer_max: Duration,
}

/// `--upload-hours START-END`: uploads run from START:00 to END:00 local time (END may be
/// smaller than START: the window spans midnight).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UploadWindow {
    pub start: u8,
    pub end: u8,
}

impl UploadWindow {
    /// Whether hour `hour` (0–23) is inside the window.
    pub fn contains(self, hour: u8) -> bool {
        if self.start < self.end {
            (self.start..self.end).contains(&hour)
        } else {
            hour >= self.start || hour < self.end
        }
    }
}

impl std::str::FromStr for UploadWindow {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let bad = || format!("{text:?} is not START-END in whole hours, e.g. 22-6");
        let (start, end) = text.split_once('-').ok_or_else(bad)?;
        let hour = |h: &str| h.trim().parse::<u8>().map_err(|_| bad());
        let (start, end) = (hour(start)?, hour(end)?);
        if start > 23 || end > 24 || start == end % 24 {
            return Err(format!(
                "{text:?}: hours are 0-23 (the end may be 24) and the window cannot be empty or \
                 the whole day (leave --upload-hours out for that)"
            ));
        }
        Ok(UploadWindow {
            start,
            end: end % 24,
        })
    }
}

impl std::fmt::Display for UploadWindow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.start, self.end)
    }
}

/// The hour of the day in local time (0–23).
pub fn local_hour() -> u8 {
    // SAFETY: time and localtime_r write only into the values passed; tm is plain data.
    unsafe {
        let now = libc::time(std::ptr::null_mut());
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::localtime_r(&now, &mut tm).is_null() {
            return 0;
        }
        tm.tm_hour.clamp(0, 23) as u8
    }
}

/// How long the queue waits before looking at the clock again while the window is closed.
const WINDOW_RECHECK: Duration = Duration::from_secs(60);

impl Default for UploadPolicy {
    fn default() -> Self {
        UploadPolicy {
            delay: Duration::ZERO,
            max_attempts: 5,
            retry_initial: Duration::from_millis(200),
            retry_max: Duration::from_secs(30),
            window: None,
            defer_max: Duration::ZERO,
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
    /// Blocks a client waits for: next, whatever their delay.
    urgent: BTreeMap<u64, BlockKey>,
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
            urgent: BTreeMap::new(),
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
        self.urgent.remove(&lsn);
        self.retry.retain(|_, k| k != key);
    }

    /// Block `lsn` goes next, before older ones and whatever its delay or retry backoff (a
    /// client waits for it). Returns whether it was waiting (not uploading, done or unknown).
    pub fn expedite(&mut self, lsn: u64) -> bool {
        if let Some(key) = self.queue.remove(&lsn) {
            self.urgent.insert(lsn, key);
            return true;
        }
        let retrying = self.retry.keys().find(|(_, l)| *l == lsn).copied();
        if let Some(at) = retrying {
            let key = self.retry.remove(&at).expect("found just now");
            self.urgent.insert(lsn, key);
            return true;
        }
        self.urgent.contains_key(&lsn)
    }

    /// Every waiting block goes next, whatever its delay or backoff (`stagefs sync --all`).
    pub fn expedite_all(&mut self) -> u64 {
        self.urgent.append(&mut self.queue);
        for ((_, lsn), key) in std::mem::take(&mut self.retry) {
            self.urgent.insert(lsn, key);
        }
        self.urgent.len() as u64
    }

    /// The oldest block due at `now`, given when each was staged (`staged_at`); the caller
    /// marks it uploading with [`UploadQueue::started`]. Outside the upload window
    /// (`window_open` false) only blocks a client waits for are offered. `writers_pause`: when
    /// clients writing now will count as paused, `None` when they do not hold uploads back
    /// (none are writing, or the device is filling).
    pub fn next(
        &mut self,
        now: Instant,
        window_open: bool,
        writers_pause: Option<Instant>,
        staged_at: impl Fn(&BlockKey) -> Option<Instant>,
    ) -> Next {
        if self.paused {
            return Next::Idle;
        }
        while let Some((&lsn, &key)) = self.urgent.iter().next() {
            if staged_at(&key).is_some() {
                return Next::Ready(lsn, key);
            }
            self.urgent.remove(&lsn);
        }
        if !window_open {
            return Next::WaitUntil(now + WINDOW_RECHECK);
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
            let mut due = staged + self.policy.delay;
            if let Some(pause) = writers_pause {
                due = due.max(pause.min(staged + self.policy.defer_max));
            }
            if due > now {
                return Next::WaitUntil(next_retry.map_or(due, |r| r.min(due)));
            }
            return Next::Ready(lsn, key);
        }
    }

    pub fn started(&mut self, lsn: u64) {
        self.queue.remove(&lsn);
        self.urgent.remove(&lsn);
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
        self.waiting() + self.uploading
    }

    /// Blocks waiting, not yet being uploaded.
    pub fn waiting(&self) -> u64 {
        (self.queue.len() + self.urgent.len() + self.retry.len()) as u64
    }

    /// The keys waiting, oldest first (tests).
    #[cfg(test)]
    pub fn queued_keys(&self) -> impl Iterator<Item = &BlockKey> {
        self.queue.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u64) -> BlockKey {
        BlockKey::new(n, 0, 4096).expect("a valid key")
    }

    fn delayed(delay: Duration) -> UploadQueue {
        UploadQueue::new(
            UploadPolicy {
                delay,
                ..UploadPolicy::default()
            },
            false,
        )
    }

    fn ready(next: Next) -> Option<u64> {
        match next {
            Next::Ready(lsn, _) => Some(lsn),
            _ => None,
        }
    }

    #[test]
    fn an_expedited_block_goes_first_whatever_its_delay() {
        let mut queue = delayed(Duration::from_secs(3600));
        let now = Instant::now();
        for lsn in 1..=3 {
            queue.push(lsn, key(lsn)).unwrap();
        }
        let staged = |_: &BlockKey| Some(now);
        assert!(matches!(
            queue.next(now, true, None, staged),
            Next::WaitUntil(_)
        ));
        assert!(queue.expedite(3));
        assert_eq!(ready(queue.next(now, true, None, staged)), Some(3));
        queue.started(3);
        assert!(matches!(
            queue.next(now, true, None, staged),
            Next::WaitUntil(_)
        ));
        assert_eq!(queue.waiting(), 2);
        // A block in retry backoff goes at once too; an unknown one is not waiting.
        queue.retry_after(Duration::from_secs(3600), 9, key(9));
        assert!(queue.expedite(9));
        assert!(!queue.expedite(42));
        assert_eq!(ready(queue.next(now, true, None, staged)), Some(9));
        queue.started(9);
        assert_eq!(queue.expedite_all(), 2);
        assert_eq!(ready(queue.next(now, true, None, staged)), Some(1));
    }

    #[test]
    fn outside_the_window_only_expedited_blocks_go() {
        let mut queue = delayed(Duration::ZERO);
        let now = Instant::now();
        queue.push(1, key(1)).unwrap();
        queue.push(2, key(2)).unwrap();
        let staged = |_: &BlockKey| Some(now);
        assert!(matches!(
            queue.next(now, false, None, staged),
            Next::WaitUntil(_)
        ));
        queue.expedite(2);
        assert_eq!(ready(queue.next(now, false, None, staged)), Some(2));
        queue.started(2);
        assert!(matches!(
            queue.next(now, false, None, staged),
            Next::WaitUntil(_)
        ));
        assert_eq!(ready(queue.next(now, true, None, staged)), Some(1));
        // Paused holds expedited blocks too.
        queue.paused = true;
        queue.expedite(1);
        assert!(matches!(queue.next(now, true, None, staged), Next::Idle));
    }

    #[test]
    fn uploads_wait_for_writers_to_pause_at_most_defer_max() {
        let mut queue = UploadQueue::new(
            UploadPolicy {
                defer_max: Duration::from_secs(10),
                ..UploadPolicy::default()
            },
            false,
        );
        let t0 = Instant::now();
        queue.push(1, key(1)).unwrap();
        queue.push(2, key(2)).unwrap();
        let secs = Duration::from_secs;
        let staged = |k: &BlockKey| Some(if *k == key(1) { t0 } else { t0 + secs(5) });
        // Writers busy: nothing goes before they pause.
        let pause = t0 + Duration::from_millis(100);
        match queue.next(t0, true, Some(pause), staged) {
            Next::WaitUntil(t) => assert_eq!(t, pause),
            _ => panic!("an upload started while writers were busy"),
        }
        // Paused (no writer): the oldest goes.
        assert_eq!(ready(queue.next(t0, true, None, staged)), Some(1));
        queue.started(1);
        // Still busy much later: a block goes once it has waited defer_max, not before.
        let busy_until = t0 + secs(60);
        match queue.next(t0 + secs(6), true, Some(busy_until), staged) {
            Next::WaitUntil(t) => assert_eq!(t, t0 + secs(15)),
            _ => panic!("block 2 went before defer_max while writers were busy"),
        }
        assert_eq!(
            ready(queue.next(t0 + secs(15), true, Some(busy_until), staged)),
            Some(2)
        );
        queue.started(2);
        // A block a client waits for goes at once, busy or not.
        queue.push(3, key(3)).unwrap();
        assert!(queue.expedite(3));
        assert_eq!(
            ready(queue.next(t0, true, Some(busy_until), staged)),
            Some(3)
        );
        // Zero turns deferring off.
        let mut eager = delayed(Duration::ZERO);
        eager.push(4, key(4)).unwrap();
        assert_eq!(
            ready(eager.next(t0 + secs(5), true, Some(busy_until), staged)),
            Some(4)
        );
    }

    #[test]
    fn windows_parse_and_span_midnight() {
        let night: UploadWindow = "22-6".parse().unwrap();
        assert!(night.contains(23) && night.contains(0) && night.contains(5));
        assert!(!night.contains(6) && !night.contains(12) && !night.contains(21));
        let day: UploadWindow = "9-17".parse().unwrap();
        assert!(day.contains(9) && day.contains(16) && !day.contains(17) && !day.contains(3));
        let to_midnight: UploadWindow = "20-24".parse().unwrap();
        assert!(to_midnight.contains(23) && !to_midnight.contains(0));
        assert_eq!(night.to_string(), "22-6");
        for bad in ["", "22", "6-6", "0-24", "25-3", "a-b", "3-30"] {
            assert!(bad.parse::<UploadWindow>().is_err(), "{bad:?} was accepted");
        }
    }
}
