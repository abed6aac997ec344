//! Handles given back to the engine a few at a time. Nobody waits for a release: the kernel
//! sends it after the last `close` of a handle returned, and a release promises nothing (what
//! `close` promises it did itself). So the releases of a short window go to the engine as one
//! `Release` call and one transaction instead of one call and one transaction each (on both
//! processes, a round trip and a few wake-ups per small file; in the engine, pages the next
//! durable commit writes).
//!
//! What the window delays is only the engine's count of this session's handles: an unlinked
//! file's data is dropped a window (and the call) later than its last `close`. A mount that dies
//! with releases gathered loses nothing: its handles go with its session. Unmount sends what is
//! gathered, then closes the session, which gives back any handle released after that.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shared::meta::MAX_RELEASE_BATCH;

use super::meta_api::MetaApi;
use super::{Ino, SessionId};

pub struct Releases {
    inner: Arc<Inner>,
}

struct Inner {
    meta: Arc<dyn MetaApi>,
    session: SessionId,
    window: Duration,
    /// The session is closing: what is given back now goes with it.
    closed: AtomicBool,
    /// One entry per handle given back and not yet sent.
    gathered: Mutex<Vec<Ino>>,
    /// Held while a call is in flight, so `flush` returns only once everything gathered before
    /// it was answered.
    sending: tokio::sync::Mutex<()>,
}

impl Releases {
    /// Releases of `session`, gathered for `window` (zero: each is sent as it comes).
    pub fn new(meta: Arc<dyn MetaApi>, session: SessionId, window: Duration) -> Releases {
        Releases {
            inner: Arc::new(Inner {
                meta,
                session,
                window,
                closed: AtomicBool::new(false),
                gathered: Mutex::new(Vec::new()),
                sending: tokio::sync::Mutex::new(()),
            }),
        }
    }

    /// Gives back one handle on `ino`: within the window, with the others given back in it.
    pub async fn give_back(&self, ino: Ino) {
        if self.inner.closed.load(Ordering::SeqCst) {
            tracing::debug!(
                ino,
                "handle released while the session closes: it goes with it"
            );
            return;
        }
        let opens_window = {
            let mut gathered = self.inner.gathered();
            gathered.push(ino);
            gathered.len() == 1
        };
        if self.inner.window.is_zero() {
            self.inner.send().await;
        } else if opens_window {
            let inner = self.inner.clone();
            tokio::spawn(async move {
                tokio::time::sleep(inner.window).await;
                inner.send().await;
            });
        }
    }

    /// Sends everything gathered so far, and returns once it was answered.
    pub async fn flush(&self) {
        self.inner.send().await;
    }

    /// Sends everything gathered, before the session closes; what is given back afterwards is
    /// not sent (closing the session gives it back).
    pub async fn close(&self) {
        self.inner.closed.store(true, Ordering::SeqCst);
        self.flush().await;
    }
}

impl Inner {
    fn gathered(&self) -> std::sync::MutexGuard<'_, Vec<Ino>> {
        // A panic elsewhere while holding it left a plain list: still usable.
        self.gathered.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends what is gathered now. What comes while it is in flight waits for its own window
    /// (which its first entry opened), so a slow call does not turn the window into a call per
    /// few handles.
    async fn send(&self) {
        let _one_at_a_time = self.sending.lock().await;
        let gathered = std::mem::take(&mut *self.gathered());
        // The gateway's bound on one call, which a window rarely reaches.
        for batch in gathered.chunks(MAX_RELEASE_BATCH) {
            metrics::counter!("stagefs_released_handles_total").increment(batch.len() as u64);
            metrics::counter!("stagefs_release_calls_total").increment(1);
            let Err(e) = self.meta.release(self.session, batch).await else {
                continue;
            };
            if batch.len() == 1 {
                tracing::warn!(session = self.session, ino = batch[0], error = %e, "giving back a handle failed; it goes with the session");
                continue;
            }
            // The call is all or nothing: one handle the engine does not count (an open that a
            // gateway crash lost) or one file it cannot update refuses every other. Those go
            // one by one, so one bad entry keeps no other file's data.
            tracing::debug!(session = self.session, handles = batch.len(), error = %e, "giving back handles together failed; one by one");
            let mut failed = 0;
            let mut first_error = None;
            for &ino in batch {
                if let Err(e) = self.meta.release(self.session, &[ino]).await {
                    failed += 1;
                    first_error.get_or_insert((ino, e));
                }
            }
            if let Some((ino, e)) = first_error {
                tracing::warn!(session = self.session, failed, first_ino = ino, error = %e, "giving back handles failed; they go with the session");
            }
        }
    }
}
