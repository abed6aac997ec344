//! One lifecycle for every background task of a gateway: started, stopped and drained in one
//! place, and a task that dies is never a silent hang.
//!
//! Guarantees:
//! - Every task is spawned through a [`Tasks`] group with a name. It gets the group's stop token
//!   and returns when it is cancelled (a task in the middle of an append finishes it first).
//! - A task that panics or returns an error records a [`Fatal`], once per process (the first one
//!   wins, later ones are logged). Recording it runs every `on_fatal` hook at once, so the
//!   staging log answers its waiting writers `UNAVAILABLE` without waiting for anything else,
//!   and `serve` stops and exits non-zero so a supervisor restarts it (recovery then does its
//!   job).
//! - Short tasks a long one hands work to (one device write each) run under the same rules
//!   ([`Tasks::spawn_short`]), and [`Tasks::drain`] waits for them too, so nothing the group
//!   started still runs when it returns.
//! - [`Tasks::drain`] cancels the group and waits, with a bound, for its tasks; one still running
//!   after the bound is aborted and named in the log.
//!
//! Groups share the fatal record but stop separately: `serve` drains the upload and metadata
//! workers before the staging log's own tasks, which the workers still append through.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Why the gateway must stop: a background task panicked or failed beyond repair.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("background task {task} failed: {reason}")]
pub struct Fatal {
    pub task: String,
    pub reason: String,
}

type Hook = Box<dyn Fn(&Fatal) + Send + Sync>;
type Handles = Arc<Mutex<Vec<(&'static str, tokio::task::JoinHandle<()>)>>>;

struct Shared {
    fatal: watch::Sender<Option<Fatal>>,
    hooks: Mutex<Vec<Hook>>,
}

/// A group of supervised background tasks (see the module documentation).
#[derive(Clone)]
pub struct Tasks {
    shared: Arc<Shared>,
    stop: CancellationToken,
    handles: Handles,
    short: TaskTracker,
}

impl std::fmt::Debug for Tasks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tasks")
            .field("fatal", &*self.shared.fatal.borrow())
            .field("stopped", &self.stop.is_cancelled())
            .finish()
    }
}

impl Default for Tasks {
    fn default() -> Self {
        Tasks::new()
    }
}

/// Longest panic message kept (a panic may format client input).
const MAX_REASON_BYTES: usize = 1024;

impl Tasks {
    pub fn new() -> Tasks {
        Tasks {
            shared: Arc::new(Shared {
                fatal: watch::channel(None).0,
                hooks: Mutex::new(Vec::new()),
            }),
            stop: CancellationToken::new(),
            handles: Arc::default(),
            short: TaskTracker::new(),
        }
    }

    /// A new group that shares this one's fatal record but is stopped and drained on its own.
    pub fn group(&self) -> Tasks {
        Tasks {
            shared: self.shared.clone(),
            stop: CancellationToken::new(),
            handles: Arc::default(),
            short: TaskTracker::new(),
        }
    }

    /// Runs `task(stop)` until it returns; it must return soon after `stop` is cancelled. A panic
    /// or an `Err` becomes the process's [`Fatal`].
    pub fn spawn<F, Fut>(&self, name: &'static str, task: F)
    where
        F: FnOnce(CancellationToken) -> Fut,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        let handle = tokio::spawn(self.supervised(name, task(self.stop.clone())));
        self.handles.lock().unwrap().push((name, handle));
    }

    /// Runs `task` to its end (it is short: one device write, say); a panic or an `Err` becomes
    /// the process's [`Fatal`], and [`Tasks::drain`] waits for it.
    pub fn spawn_short(
        &self,
        name: &'static str,
        task: impl Future<Output = Result<(), String>> + Send + 'static,
    ) {
        self.short.spawn(self.supervised(name, task));
    }

    fn supervised(
        &self,
        name: &'static str,
        future: impl Future<Output = Result<(), String>> + Send + 'static,
    ) -> impl Future<Output = ()> + Send + 'static {
        let me = self.clone();
        async move {
            let outcome = AssertUnwindSafe(future).catch_unwind().await;
            let reason = match outcome {
                Ok(Ok(())) => return,
                Ok(Err(reason)) => reason,
                Err(panic) => {
                    let message = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "a panic without a message".into());
                    format!("panicked: {message}")
                }
            };
            me.record_fatal(name, reason);
        }
    }

    /// Records why the gateway must stop; only the first record counts.
    pub fn record_fatal(&self, task: &str, reason: String) {
        let mut reason = reason;
        if reason.len() > MAX_REASON_BYTES {
            let mut end = MAX_REASON_BYTES;
            while !reason.is_char_boundary(end) {
                end -= 1;
            }
            reason.truncate(end);
            reason.push('…');
        }
        let fatal = Fatal {
            task: task.to_string(),
            reason,
        };
        let first = self.shared.fatal.send_if_modified(|slot| {
            if slot.is_some() {
                return false;
            }
            *slot = Some(fatal.clone());
            true
        });
        if !first {
            tracing::error!(task, reason = %fatal.reason, "another background task failed after the first fatal error");
            return;
        }
        tracing::error!(task, reason = %fatal.reason, "fatal: a background task failed; the gateway stops serving and exits non-zero");
        for hook in self.shared.hooks.lock().unwrap().iter() {
            hook(&fatal);
        }
    }

    /// Runs `hook` when the fatal error is recorded (at once if it already was).
    pub fn on_fatal(&self, hook: impl Fn(&Fatal) + Send + Sync + 'static) {
        let mut hooks = self.shared.hooks.lock().unwrap();
        if let Some(fatal) = &*self.shared.fatal.borrow() {
            hook(fatal);
        }
        hooks.push(Box::new(hook));
    }

    /// The fatal error, if one was recorded.
    pub fn fatal(&self) -> Option<Fatal> {
        self.shared.fatal.borrow().clone()
    }

    /// Resolves with the fatal error once one is recorded.
    pub async fn wait_fatal(&self) -> Fatal {
        let mut fatal = self.shared.fatal.subscribe();
        let recorded = fatal.wait_for(Option::is_some).await.map(|f| f.clone());
        match recorded {
            Ok(Some(recorded)) => recorded,
            // The sender lives in `self.shared`, which this call borrows: it cannot close.
            _ => std::future::pending().await,
        }
    }

    /// Whether [`Tasks::drain`] has begun stopping the group.
    pub fn is_stopped(&self) -> bool {
        self.stop.is_cancelled()
    }

    /// Stops the group and waits up to `bound` for its tasks; the ones still running are aborted.
    pub async fn drain(&self, bound: Duration) {
        self.stop.cancel();
        let handles = std::mem::take(&mut *self.handles.lock().unwrap());
        let deadline = tokio::time::Instant::now() + bound;
        for (name, mut handle) in handles {
            if tokio::time::timeout_at(deadline, &mut handle)
                .await
                .is_err()
            {
                tracing::warn!(
                    task = name,
                    ?bound,
                    "background task did not stop in time; aborted"
                );
                handle.abort();
            }
        }
        self.short.close();
        if tokio::time::timeout_at(deadline, self.short.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                running = self.short.len(),
                ?bound,
                "short background tasks did not end in time"
            );
        }
    }
}

/// A ticker that skips missed ticks rather than bursting after a slow round.
pub fn ticker(period: Duration) -> tokio::time::Interval {
    let mut interval = tokio::time::interval(period.max(Duration::from_millis(10)));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    interval
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn a_panic_is_recorded_once_and_runs_the_hooks_at_once() {
        let tasks = Tasks::new();
        let workers = tasks.group();
        let hooked = Arc::new(AtomicUsize::new(0));
        let seen = hooked.clone();
        tasks.on_fatal(move |fatal| {
            assert_eq!(fatal.task, "boom");
            seen.fetch_add(1, Ordering::SeqCst);
        });
        workers.spawn("quiet", |stop| async move {
            stop.cancelled().await;
            Ok(())
        });
        workers.spawn("boom", |_| async { panic!("injected") });
        let fatal = tokio::time::timeout(Duration::from_secs(5), tasks.wait_fatal())
            .await
            .expect("the panic must be recorded");
        assert_eq!(fatal.task, "boom");
        assert!(fatal.reason.contains("panicked: injected"), "{fatal}");
        workers.spawn("second", |_| async { Err("later".into()) });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(tasks.fatal().unwrap().task, "boom", "the first one wins");
        assert_eq!(hooked.load(Ordering::SeqCst), 1);
        // A hook added afterwards still hears about it.
        let late = Arc::new(AtomicUsize::new(0));
        let seen = late.clone();
        tasks.on_fatal(move |_| {
            seen.fetch_add(1, Ordering::SeqCst);
        });
        assert_eq!(late.load(Ordering::SeqCst), 1);
        workers.drain(Duration::from_secs(5)).await;
    }

    #[tokio::test]
    async fn drain_stops_the_group_and_aborts_what_does_not_stop() {
        let tasks = Tasks::new();
        let finished = Arc::new(AtomicUsize::new(0));
        let done = finished.clone();
        tasks.spawn("polite", |stop| async move {
            stop.cancelled().await;
            done.fetch_add(1, Ordering::SeqCst);
            Ok(())
        });
        tasks.spawn("stubborn", |_| async {
            std::future::pending::<()>().await;
            Ok(())
        });
        let started = std::time::Instant::now();
        tasks.drain(Duration::from_millis(200)).await;
        assert_eq!(finished.load(Ordering::SeqCst), 1);
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(tasks.fatal().is_none(), "stopping is not a failure");
    }
}
