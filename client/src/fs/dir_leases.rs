//! Directory leases in the mount: the directories this mount made and holds the lease on, with
//! every name it added to each, so that a lookup of any other name is answered "absent" here.
//!
//! A package install or an untar looks up each name before it makes it, and Python looks up
//! many names that are not there: three lookups in four of `python3 -m venv` find nothing, each
//! a round trip to the gateway. The engine's rules (`gateway/meta/src/rules/dir_leases.rs`)
//! keep everyone else from adding a name to a leased directory until the holder gave the
//! lease back; this side keeps the holder's half:
//! - a lease answers only until `until`: [`DirLeases::term`] after the send of the last call
//!   that found it held, so a recall that the mount has not heard of yet still finds it
//!   stopped answering before the recall's wait ends;
//! - a name is recorded before the call that adds it is sent, whatever that call's outcome
//!   (an addition whose answer was lost may have happened);
//! - the keeper sends [`MetaApi::keep_dir_leases`] every quarter term while any lease is held,
//!   and gives back at once a lease it finds recalled, so a recall costs another mount about a
//!   quarter term, not the recall's full wait.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::meta_api::{Ino, MetaApi, SessionId};

/// Leases one mount holds at most; a directory made past it gets none.
const MAX_LEASES: usize = 1024;
/// Names recorded per lease at most; the addition past it gives the lease back.
const MAX_NAMES: usize = 16 * 1024;
/// Names recorded over all leases at most (names are up to 255 bytes: about 32 MiB at worst);
/// the addition past it gives its directory's lease back.
const MAX_NAMES_IN_ALL: usize = 128 * 1024;
/// A lease that answered nothing for this long is given back (it costs the keeper a key).
const IDLE: Duration = Duration::from_secs(30);

struct Lease {
    /// Answers until then (`None`: asked for, not granted yet).
    until: Option<Instant>,
    /// Every name this mount added, or tried to, since it asked for the lease.
    names: HashSet<Vec<u8>>,
    last_used: Instant,
    /// Tells this lease from an earlier one of the same directory.
    generation: u64,
}

#[derive(Default)]
struct State {
    leases: HashMap<Ino, Lease>,
    /// Leases dropped here, to give back with the next keep.
    released: Vec<Ino>,
    generation: u64,
    /// Names recorded over all leases.
    names: usize,
}

impl State {
    /// Stops answering from the lease on `dir` (if held here) and queues it to be given back.
    fn drop_lease(&mut self, dir: Ino) {
        if let Some(lease) = self.leases.remove(&dir) {
            self.names -= lease.names.len();
            self.released.push(dir);
        }
    }
}

pub(super) struct DirLeases {
    term: Duration,
    state: Mutex<State>,
    /// Wakes the keeper early: a lease to give back.
    wake: tokio::sync::Notify,
}

impl DirLeases {
    /// `heartbeat`: the session's heartbeat interval, which bounds the term (a keep counts as a
    /// heartbeat, so the session outlives every lease the mount counts on).
    pub fn new(heartbeat: Option<Duration>) -> DirLeases {
        let term = match heartbeat {
            Some(interval) => shared::meta::DIR_LEASE_TERM.min(interval),
            None => shared::meta::DIR_LEASE_TERM,
        };
        DirLeases {
            term,
            state: Mutex::default(),
            wake: tokio::sync::Notify::new(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `name` is known not to be in `parent`.
    pub fn absent(&self, parent: Ino, name: &[u8]) -> bool {
        // The kernel resolves these itself; the engine answers them if asked.
        if name == b"." || name == b".." || name.len() > shared::meta::MAX_NAME_LEN {
            return false;
        }
        let now = Instant::now();
        let mut state = self.state();
        let Some(lease) = state.leases.get_mut(&parent) else {
            return false;
        };
        if lease.until.is_none_or(|until| now >= until) || lease.names.contains(name) {
            return false;
        }
        lease.last_used = now;
        true
    }

    /// Before this mount sends a call that adds `name` to `parent`.
    pub fn adding(&self, parent: Ino, name: &[u8]) {
        let mut state = self.state();
        let in_all = state.names;
        let Some(lease) = state.leases.get_mut(&parent) else {
            return;
        };
        if lease.names.contains(name) {
            return;
        }
        if lease.names.len() < MAX_NAMES && in_all < MAX_NAMES_IN_ALL {
            lease.names.insert(name.to_vec());
            state.names += 1;
            return;
        }
        state.drop_lease(parent);
        self.wake.notify_one();
    }

    /// Before this mount asks for the lease on `dir`, which it just made: names it adds from
    /// now on are recorded. `None` when it holds as many leases as it may.
    pub fn asking(&self, dir: Ino) -> Option<u64> {
        let mut state = self.state();
        if state.leases.len() >= MAX_LEASES {
            return None;
        }
        state.generation += 1;
        let generation = state.generation;
        let asked = Lease {
            until: None,
            names: HashSet::new(),
            last_used: Instant::now(),
            generation,
        };
        if let Some(earlier) = state.leases.insert(dir, asked) {
            state.names -= earlier.names.len();
        }
        Some(generation)
    }

    /// The answer to the ask [`DirLeases::asking`] made, sent at `sent`.
    pub fn answered(&self, dir: Ino, generation: u64, sent: Instant, granted: bool) {
        let mut state = self.state();
        match state.leases.get_mut(&dir) {
            Some(lease) if lease.generation == generation => {
                if granted {
                    lease.until = Some(sent + self.term);
                } else {
                    let lease = state.leases.remove(&dir).expect("matched above");
                    state.names -= lease.names.len();
                }
            }
            _ => {}
        }
    }

    /// Runs the keeper until the mount goes (the task is aborted).
    pub async fn keep(self: Arc<Self>, meta: Arc<dyn MetaApi>, session: SessionId) {
        let period = self.term / 4;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(period) => {}
                _ = self.wake.notified() => {}
            }
            self.keep_once(meta.as_ref(), session).await;
        }
    }

    /// One round of the keeper: keeps what is held, gives back what was dropped, drops what was
    /// recalled (and gives it back at once).
    pub async fn keep_once(&self, meta: &dyn MetaApi, session: SessionId) {
        let (keep, release) = {
            let now = Instant::now();
            let mut state = self.state();
            let idle: Vec<Ino> = state
                .leases
                .iter()
                .filter(|(_, l)| l.until.is_some() && now - l.last_used >= IDLE)
                .map(|(&dir, _)| dir)
                .collect();
            for dir in idle {
                state.drop_lease(dir);
            }
            let keep: Vec<(Ino, u64)> = state
                .leases
                .iter()
                .filter(|(_, l)| l.until.is_some())
                .map(|(&dir, l)| (dir, l.generation))
                .take(shared::meta::MAX_DIR_LEASES_PER_CALL / 2)
                .collect();
            let cap = shared::meta::MAX_DIR_LEASES_PER_CALL - keep.len();
            let cut = state.released.len().saturating_sub(cap);
            let release = state.released.split_off(cut);
            (keep, release)
        };
        if keep.is_empty() && release.is_empty() {
            return;
        }
        let dirs: Vec<Ino> = keep.iter().map(|&(dir, _)| dir).collect();
        let sent = Instant::now();
        let held = match meta.keep_dir_leases(session, &dirs, &release).await {
            Ok(held) if held.len() == dirs.len() => held,
            outcome => {
                // Leases lapse here by themselves; what was to go back goes with the next try.
                tracing::debug!(session, ?outcome, "keeping directory leases failed");
                self.state().released.extend(release);
                return;
            }
        };
        let mut state = self.state();
        let mut recalled = false;
        for ((dir, generation), held) in keep.into_iter().zip(held) {
            let Some(lease) = state.leases.get_mut(&dir) else {
                continue;
            };
            if lease.generation != generation {
                continue;
            }
            if held {
                lease.until = lease.until.max(Some(sent + self.term));
            } else {
                // Recalled (or gone with its directory): stop answering, then give it back.
                state.drop_lease(dir);
                recalled = true;
            }
        }
        if recalled {
            metrics::counter!("stagefs_dir_leases_recalled_total").increment(1);
            self.wake.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_answers_absent_names_only_while_granted_and_good() {
        let leases = DirLeases::new(Some(Duration::from_secs(5)));
        assert_eq!(
            leases.term,
            shared::meta::DIR_LEASE_TERM,
            "at most the term"
        );
        let short = DirLeases::new(Some(Duration::from_millis(250)));
        assert_eq!(
            short.term,
            Duration::from_millis(250),
            "at most one heartbeat"
        );

        assert!(!leases.absent(7, b"x"), "no lease");
        let generation = leases.asking(7).unwrap();
        leases.adding(7, b"made-while-asking");
        assert!(!leases.absent(7, b"x"), "asked, not granted yet");
        let sent = Instant::now();
        leases.answered(7, generation, sent, true);
        assert!(leases.absent(7, b"x"));
        assert!(
            !leases.absent(7, b"made-while-asking"),
            "its own names are asked about"
        );
        for name in [&b"."[..], b"..", &[b'n'; 300]] {
            assert!(!leases.absent(7, name), "{name:?} goes to the engine");
        }
        leases.adding(7, b"y");
        assert!(!leases.absent(7, b"y"));

        // Past its term it answers nothing until a keep finds it held again.
        leases.state().leases.get_mut(&7).unwrap().until = Some(Instant::now());
        assert!(!leases.absent(7, b"x"), "expired");

        // A refusal drops it; an answer to an earlier ask changes nothing.
        let second = leases.asking(8).unwrap();
        leases.answered(8, second, Instant::now(), false);
        assert!(!leases.absent(8, b"x"));
        let third = leases.asking(9).unwrap();
        let fourth = leases.asking(9).unwrap();
        leases.answered(9, third, Instant::now(), true);
        assert!(!leases.absent(9, b"x"), "the answer to a replaced ask");
        leases.answered(9, fourth, Instant::now(), true);
        assert!(leases.absent(9, b"x"));
        assert_eq!(leases.state().names, 2, "names counted over all leases");
    }

    #[test]
    fn a_lease_past_its_names_is_given_back() {
        let leases = DirLeases::new(None);
        let generation = leases.asking(3).unwrap();
        leases.answered(3, generation, Instant::now(), true);
        for n in 0..MAX_NAMES {
            leases.adding(3, format!("n{n}").as_bytes());
        }
        assert!(leases.absent(3, b"other"));
        leases.adding(3, b"one-too-many");
        assert!(!leases.absent(3, b"other"), "dropped");
        let state = leases.state();
        assert_eq!(state.released, [3], "to be given back");
        assert_eq!(state.names, 0);
    }
}
