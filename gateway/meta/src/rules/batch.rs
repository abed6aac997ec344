//! Creates that share one transaction, on a shared database.
//!
//! Why: on PostgreSQL a create is a read, a write and a commit, and with many clients the
//! server's CPU limits how many it makes (README, `stagefs bench meta`): every transaction pays
//! for its statements, its commit and its rows, the counter shards among them. Creates that
//! arrive while others are in flight wait and go together in one transaction, as the embedded
//! backend's group commit shares one fsync: one read of what they all need, one write, one
//! commit; a shard, or a parent they share, written once.
//!
//! How: a create queues itself, then waits for its answer or for the turn to lead a batch
//! ([`LEADERS`]), whichever comes first. A leader takes what is queued (at most [`MAX_BATCH`])
//! and runs it in one transaction, each create as it would run alone (its own change tag in
//! scope, or none, so that the holder of a directory lease passes its check and no one else
//! does), seeing the ones before it. One client alone always finds a turn free and runs by
//! itself, so nothing waits that would not have.
//!
//! What never changes: what a create does and answers. A create that fails inside the batch (a
//! name taken, a directory leased to another mount, anything) is undone within the transaction
//! and run again alone, where its error comes about as it always does; so does every create of
//! a batch whose transaction fails as a whole. Should the leader's call be cancelled (its client
//! went away) with the batch in flight, the others cannot know whether it committed: each runs
//! alone as a retry of its change (its tag answers what a commit recorded), and one without a
//! tag fails as a commit with a lost answer does. Creates a shared transaction relies on are
//! protected as their own transactions' would be: the rules' explicit dependencies (written
//! records, pinned sessions) are the union of theirs, in one transaction.

use std::sync::Mutex;

use tokio::sync::{oneshot, Semaphore};

use super::{KvMeta, Tx};
use crate::kv::KvError;
use crate::once::RequestTag;
use crate::{keys, Attr, Ino, MetaError, NewNode, Result, SessionId};

/// Batches in flight at once: while all are, arriving creates queue for the next one. One: two
/// measured no faster (`stagefs bench meta`, 16 and 64 clients), and two batches in one
/// directory would conflict over its inode.
pub(super) const LEADERS: usize = 1;

/// The most creates one transaction makes (its write is one statement, its read one too).
pub(super) const MAX_BATCH: usize = 128;

/// Tenants remembered by session ([`KvMeta::tenant_hint`]) before the memory is cleared.
const MAX_TENANT_HINTS: usize = 1 << 16;

/// The creates waiting for a batch, and the turns to lead one.
pub(super) struct Batches {
    queue: Mutex<Vec<Queued>>,
    leaders: Semaphore,
    /// Numbers the queued creates, so that a leader finds its own.
    tokens: std::sync::atomic::AtomicU64,
    /// Transactions that made more than one create, since the start (for tests).
    pub(super) shared: std::sync::atomic::AtomicU64,
}

impl Batches {
    pub(super) fn new() -> Batches {
        Batches {
            queue: Mutex::new(Vec::new()),
            leaders: Semaphore::new(LEADERS),
            tokens: std::sync::atomic::AtomicU64::new(0),
            shared: std::sync::atomic::AtomicU64::new(0),
        }
    }
}

/// How a queued create came out.
enum Batched {
    Made(Attr),
    /// Nothing of it was made: run it alone.
    Alone,
    /// The leader was cancelled (its caller went away) with the batch in flight, or the backend
    /// went away: whether the transaction committed is unknown.
    Unknown,
}

/// A create waiting in the queue.
struct Queued {
    /// The session a file is created and opened for; `None` for a node made without a handle
    /// (`mknod`, `mkdir`), counted for no tenant.
    session: Option<SessionId>,
    parent: Ino,
    name: Vec<u8>,
    node: NewNode,
    tag: Option<RequestTag>,
    /// Which create this is ([`Batches::tokens`]).
    token: u64,
    /// Where its answer goes; `None` for the leader's own, which the batch returns.
    answer: Option<oneshot::Sender<Batched>>,
}

impl KvMeta {
    /// Transactions that made more than one create, since the start.
    #[doc(hidden)]
    pub fn shared_create_batches(&self) -> u64 {
        self.batches
            .as_ref()
            .map_or(0, |b| b.shared.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// A create made in a transaction shared with others where the store gains from it, else
    /// by `alone` (the same create in a transaction of its own). With `session`, a regular file
    /// opened for it (a create); without, a node of any kind but a symlink (`mknod`, `mkdir`).
    pub(super) async fn make_shared(
        &self,
        session: Option<SessionId>,
        parent: Ino,
        name: &[u8],
        node: &NewNode,
        alone: impl std::future::Future<Output = Result<Attr>>,
    ) -> Result<Attr> {
        let tag = crate::once::current();
        let Some(batches) = &self.batches else {
            return alone.await;
        };
        let (answer, answered) = oneshot::channel();
        let queued = Queued {
            session,
            parent,
            name: name.to_vec(),
            node: *node,
            tag,
            token: batches
                .tokens
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            answer: Some(answer),
        };
        match self.create_batched(batches, queued, answered).await {
            Batched::Made(attr) => Ok(attr),
            Batched::Alone => alone.await,
            // Run again as a retry of the same change, which answers what the abandoned
            // transaction recorded if it did commit; without a tag there is no telling.
            Batched::Unknown => match tag {
                Some(tag) => {
                    let retry = RequestTag { retry: true, ..tag };
                    crate::once::scope(Some(retry), alone).await
                }
                None => Err(MetaError::Backend(KvError::Unavailable(
                    "the transaction this create shared ended without an answer (the call that \
                     led it was cancelled, or the database went away): whether it committed is \
                     unknown"
                        .into(),
                ))),
            },
        }
    }

    /// Queues `queued` and waits for its answer on `answered`, leading a batch if the turn
    /// comes first.
    async fn create_batched(
        &self,
        batches: &Batches,
        queued: Queued,
        mut answered: oneshot::Receiver<Batched>,
    ) -> Batched {
        let token = queued.token;
        lock(&batches.queue).push(queued);
        let turn = tokio::select! {
            biased;
            outcome = &mut answered => return answer_of(outcome),
            turn = batches.leaders.acquire() => turn,
        };
        // The semaphore is never closed.
        let Ok(turn) = turn else {
            return Batched::Unknown;
        };
        let mut taken = {
            let mut queue = lock(&batches.queue);
            let take = queue.len().min(MAX_BATCH);
            queue.drain(..take).collect::<Vec<_>>()
        };
        let Some(own) = taken.iter_mut().find(|q| q.token == token) else {
            // Another leader took this create: its answer is on its way.
            if !taken.is_empty() {
                self.run_batch(batches, taken).await;
            }
            drop(turn);
            return answer_of(answered.await);
        };
        // Its own create the leader answers by return, not through the channel it waited on:
        // a task woken while it runs (by its own send, or by the sender's drop) is scheduled
        // again as if it yielded, and that wakes the runtime's other thread to steal it.
        // Closed first, the channel wakes no one.
        drop(answered);
        own.answer = None;
        let answer = self.run_batch(batches, taken).await;
        drop(turn);
        answer.unwrap_or(Batched::Unknown)
    }

    /// Runs `queued` in one transaction and answers each (see the module comment); the
    /// answer of the leader's own create (the one without a channel) is returned.
    async fn run_batch(&self, batches: &Batches, mut queued: Vec<Queued>) -> Option<Batched> {
        // A caller gone meanwhile asks for nothing: its create is not made.
        queued.retain(|q| q.answer.as_ref().is_none_or(|answer| !answer.is_closed()));
        if queued.is_empty() {
            return None;
        }
        let mut made: Vec<Option<Attr>> = Vec::new();
        let mut runs = 0u32;
        let outcome: Result<()> = async {
            crate::transact!(@explicit, self, self.namespace_durability(), |tx| {
                runs += 1;
                made.clear();
                // What every create reads, in one round trip: the sessions pinned, as each create
                // pins its own.
                let mut pins: Vec<Vec<u8>> =
                    queued.iter().filter_map(|q| q.session.map(keys::session)).collect();
                pins.sort();
                pins.dedup();
                let mut reads = Vec::new();
                for q in &queued {
                    let owner = match q.session {
                        Some(session) => self.tenant_hint(session),
                        None => Some(String::new()),
                    };
                    // A create alone may skip its read (`KvTxn::expect_absent`); several read
                    // theirs: a batch that commits sooner leaves fewer to share the next one,
                    // and at 16 clients creates measured 10–25 % slower.
                    if queued.len() == 1 {
                        tx.expect_new_name(q.parent, &q.name);
                    }
                    reads.extend(tx.new_node_keys(q.parent, &q.name, owner.as_deref()));
                    if let Some(tag) = q.tag.filter(|t| t.retry || runs > 1) {
                        reads.push(keys::change_slot(tag.session, tag.slot));
                    }
                }
                tx.fetch_pinned(pins, reads).await?;
                for q in &queued {
                    tx.start_undo();
                    let one = crate::once::scope(q.tag, tx.create_once(q, runs)).await;
                    match one {
                        Ok(created) => made.push(Some(created)),
                        // The transaction itself failed: the whole batch runs alone.
                        Err(error @ MetaError::Backend(_)) => return Err(error),
                        Err(_) => {
                            tx.undo();
                            made.push(None);
                        }
                    }
                }
                tx.stop_undo();
                Ok(())
            })
        }
        .await;
        if outcome.is_ok() && made.iter().flatten().count() > 1 {
            batches
                .shared
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        metrics::histogram!("stagefs_meta_create_batch_size").record(queued.len() as f64);
        let mut own = None;
        for (i, q) in queued.into_iter().enumerate() {
            let answer = match &outcome {
                Ok(()) => made
                    .get(i)
                    .cloned()
                    .flatten()
                    .map_or(Batched::Alone, Batched::Made),
                // A backend gone mid-way may have taken the commit: as if cancelled.
                Err(MetaError::Backend(KvError::Unavailable(_))) => Batched::Unknown,
                Err(_) => Batched::Alone,
            };
            match q.answer {
                Some(channel) => {
                    let _ = channel.send(answer);
                }
                None => own = Some(answer),
            }
        }
        own
    }

    /// The tenant `session` created for last, if remembered: what a create reads of its
    /// tenant's totals can then go with its first read. Only a guess: the session's record,
    /// read in the same transaction, decides.
    pub(super) fn tenant_hint(&self, session: SessionId) -> Option<String> {
        lock(&self.tenants).get(&session).cloned()
    }

    /// Remembers that `session` creates for `owner` ([`KvMeta::tenant_hint`]).
    pub(super) fn note_tenant(&self, session: SessionId, owner: &str) {
        let mut tenants = lock(&self.tenants);
        if tenants.get(&session).is_some_and(|known| known == owner) {
            return;
        }
        if tenants.len() >= MAX_TENANT_HINTS {
            tenants.clear();
        }
        tenants.insert(session, owner.to_string());
    }
}

impl Tx<'_> {
    /// One queued create in a shared transaction, as `transact_once!` runs one alone: a retry
    /// whose change is done answers what it recorded.
    async fn create_once(&mut self, q: &Queued, runs: u32) -> Result<Attr> {
        if let Some(tag) = &q.tag {
            if let Some(attr) = self.replayed::<Attr>(tag, runs).await? {
                return Ok(attr);
            }
        }
        let attr = match q.session {
            Some(session) => {
                self.create_file(session, q.parent, &q.name, &q.node)
                    .await?
            }
            None => {
                self.create_node(q.parent, &q.name, &q.node, None, "")
                    .await?
            }
        };
        if let Some(tag) = &q.tag {
            self.record_change(tag, attr.ino);
        }
        Ok(attr)
    }
}

/// What a create's answer channel brought: dropped unanswered means its leader was cancelled.
fn answer_of(answer: std::result::Result<Batched, oneshot::error::RecvError>) -> Batched {
    answer.unwrap_or(Batched::Unknown)
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}
