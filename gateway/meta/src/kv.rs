//! The storage contract under the file-system rules: an ordered, transactional key-value store.
//!
//! A backend only stores and transacts; every POSIX rule lives above it ([`crate::rules`]), the way
//! JuiceFS's `tkv` layer serves TiKV, etcd and FoundationDB with one set of rules. What a backend
//! guarantees:
//!
//! - **Serializable transactions.** A [`KvTxn`] reads one consistent snapshot; its writes (handed
//!   over whole at [`KvTxn::commit`]) are applied atomically, and the commit fails with
//!   [`KvError::Conflict`] if committing would break serializability with a concurrent
//!   transaction (another gateway on the same database). A conflicted transaction left no trace,
//!   so the rules simply run it again.
//! - **Snapshot transactions with explicit conflicts**, on request ([`KvStore::begin_snapshot`]):
//!   two transactions that write the same key never both commit, and a key read with
//!   [`KvTxn::get_pinned`] is not changed by anyone else before the transaction ends, but other
//!   reads are not protected. The rules use them only for the hot changes whose every dependency
//!   they made explicit (see `rules.rs`), because a shared database runs them without the
//!   page-wide read locks that make serializable transactions on different records conflict.
//! - **Durability on request.** A commit with [`Durability::Durable`] returns once the
//!   transaction survives a crash of the machine; [`Durability::Eventual`] may return earlier, and
//!   the next durable commit carries it.
//! - **Id sequences.** [`KvTxn::take_ids`] hands out consecutive ids that are never handed out
//!   again; a shared database does it outside the transaction, so allocating never conflicts.
//!
//! Keys sort bytewise; [`crate::keys`] lays out every record so that range scans follow the
//! file-system's order (a directory's entries, a file's chunks, the delete queue by due time).

use async_trait::async_trait;

/// How a backend failed. Only [`KvError::Conflict`] means "nothing happened, run it again".
#[derive(Debug, thiserror::Error)]
pub enum KvError {
    /// The transaction lost a race with a concurrent one and was rolled back entirely.
    #[error("transaction conflict: {0}")]
    Conflict(String),
    /// The backend cannot be reached or failed for a reason that may pass (connection lost,
    /// server restarting, I/O error). The transaction's outcome may be unknown if this came from
    /// a commit, so it is not retried blindly.
    #[error("metadata backend unavailable: {0}")]
    Unavailable(String),
    /// Anything else the backend refused: a broken schema, an unsupported server, a bug.
    #[error("metadata backend: {0}")]
    Failed(String),
    /// The backend's storage is full (the metadata region of a device): the transaction was not
    /// applied, and will not be until room is made.
    #[error("{0}")]
    Full(String),
    /// The backend takes no writes: a read-only replica (a PostgreSQL hot standby).
    #[error("read-only metadata: {0}")]
    ReadOnly(String),
}

impl KvError {
    /// Whether the caller may try the same call again and expect it to work: a conflict (nothing
    /// was applied) or a backend that may come back.
    pub fn is_retryable(&self) -> bool {
        matches!(self, KvError::Conflict(_) | KvError::Unavailable(_))
    }
}

pub type KvResult<T> = std::result::Result<T, KvError>;

/// When a commit may return.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Once the transaction survives a crash (the durability contract of every acknowledged
    /// metadata change).
    Durable,
    /// Once it is committed and visible; a later durable commit makes it durable. For changes
    /// whose loss in a crash is harmless.
    Eventual,
}

/// The id sequences of a file system.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Sequence {
    Inode,
    Slice,
    /// Directory-entry cookies: `readdir` pages by them.
    Cookie,
}

impl Sequence {
    pub const ALL: [Sequence; 3] = [Sequence::Inode, Sequence::Slice, Sequence::Cookie];

    /// The stable name a backend stores the sequence under.
    pub fn name(self) -> &'static str {
        match self {
            Sequence::Inode => "next_ino",
            Sequence::Slice => "next_slice_id",
            Sequence::Cookie => "next_cookie",
        }
    }

    /// The first id a fresh file system hands out (1 is the root inode, 0 the hole slice id,
    /// cookies 1 and 2 are `.` and `..`).
    pub fn first(self) -> u64 {
        match self {
            Sequence::Inode => 2,
            Sequence::Slice => 1,
            Sequence::Cookie => 3,
        }
    }
}

/// One key's new value in a write set: `None` deletes it.
pub type Write = (Vec<u8>, Option<Vec<u8>>);

/// A backend: where transactions begin.
#[async_trait]
pub trait KvStore: Send + Sync + 'static {
    /// A short name for logs and `status` ("redb", "postgres").
    fn kind(&self) -> &'static str;

    /// Begins a transaction. `write: false` promises that it will commit no writes, which lets a
    /// backend run it without taking a writer's turn.
    async fn begin(&self, write: bool) -> KvResult<Box<dyn KvTxn>>;

    /// Begins a write transaction with explicit conflicts (see the module's documentation): a
    /// store without a cheaper isolation than serializable gives a serializable one.
    async fn begin_snapshot(&self) -> KvResult<Box<dyn KvTxn>> {
        self.begin(true).await
    }

    /// How many ids the rules should take from a sequence at once and keep in memory (1 keeps
    /// every id in its own transaction; a shared database wants fewer round trips on hot rows).
    fn id_batch(&self) -> u64 {
        1
    }

    /// Whether this store takes no writes (a replica): every write transaction is refused with
    /// [`KvError::ReadOnly`], and the engine over it only reads.
    fn read_only(&self) -> bool {
        false
    }

    /// Where the store's log stands, for replicas to be waited for: on a primary, a position at
    /// or after every commit made so far; on a replica, how far it has applied its primary's
    /// log. `None` for a store without replicas.
    async fn log_position(&self) -> KvResult<Option<u64>> {
        Ok(None)
    }

    /// How long an eventual commit may wait for the durable commit that carries it when nothing
    /// asks for one sooner. A store whose every commit is durable ignores it.
    fn set_eventual_flush(&self, _within: std::time::Duration) {}

    /// Returns once every commit made so far is durable (eventual ones included). At once on a
    /// store whose every commit is durable when it returns.
    async fn sync(&self) -> KvResult<()> {
        Ok(())
    }

    /// On a replica, how long ago the last change it applied was committed on its primary;
    /// `None` elsewhere (or before a replica applied anything).
    async fn replica_lag(&self) -> KvResult<Option<std::time::Duration>> {
        Ok(None)
    }
}

/// A transaction: reads see one snapshot; writes are handed over at commit. Dropping it without
/// committing rolls it back.
#[async_trait]
pub trait KvTxn: Send {
    async fn get(&mut self, key: &[u8]) -> KvResult<Option<Vec<u8>>>;

    /// Reads `key` and keeps it from being removed, or taken with [`KvTxn::get_locked`], by
    /// anyone else until this transaction ends (those wait for it); a change committed since
    /// this transaction's snapshot makes this read fail with [`KvError::Conflict`]. Other
    /// writers of the key do not wait (a session's heartbeat is not held up by the creates that
    /// pin the session). What a snapshot transaction relies on without writing it is read this
    /// way. A store whose transactions are all serializable (or run one writer at a time) reads
    /// it as any key.
    async fn get_pinned(&mut self, key: &[u8]) -> KvResult<Option<Vec<u8>>> {
        self.get(key).await
    }

    /// Reads `key` and takes it for this transaction: waits until every transaction that
    /// pinned or took it has ended, and keeps new ones waiting until this one ends.
    async fn get_locked(&mut self, key: &[u8]) -> KvResult<Option<Vec<u8>>> {
        self.get(key).await
    }

    /// The values of several keys, in the order asked, the first `pinned` of them read as
    /// [`KvTxn::get_pinned`] reads. A shared database answers them in one round trip, so the
    /// rules ask for what they know they will read up front.
    async fn get_many(
        &mut self,
        keys: &[Vec<u8>],
        pinned: usize,
    ) -> KvResult<Vec<Option<Vec<u8>>>> {
        let mut values = Vec::with_capacity(keys.len());
        for (i, key) in keys.iter().enumerate() {
            values.push(if i < pinned {
                self.get_pinned(key).await?
            } else {
                self.get(key).await?
            });
        }
        Ok(values)
    }

    /// Says that the rules expect `key` to be absent (the name a create makes). A store that
    /// may answer reads from what it remembers, and checks them before the transaction ends,
    /// may then answer a read of it with nothing without asking; should it be there after all,
    /// the transaction fails with [`KvError::Conflict`] and its next run reads it. Others
    /// ignore it.
    fn expect_absent(&mut self, _key: &[u8]) {}

    /// Confirms what this transaction read, for one about to end without a commit whose
    /// outcome (an error for the caller) depends on it: a store that answered reads from what
    /// it remembers checks them now, and fails with [`KvError::Conflict`] when one had changed.
    /// Reads that went to the store need nothing.
    async fn check_reads(&mut self) -> KvResult<()> {
        Ok(())
    }

    /// Up to `limit` pairs with `start <= key < end`, in key order.
    async fn scan(
        &mut self,
        start: &[u8],
        end: &[u8],
        limit: usize,
    ) -> KvResult<Vec<(Vec<u8>, Vec<u8>)>>;

    /// `count` consecutive ids of `sequence` (returns the first), never handed out again, whether
    /// this transaction commits or not, and even if its commit was eventual and lost in a crash.
    async fn take_ids(&mut self, sequence: Sequence, count: u64) -> KvResult<u64>;

    /// Applies `writes` (in order; a key appears at most once) and commits.
    async fn commit(self: Box<Self>, writes: Vec<Write>, durability: Durability) -> KvResult<()>;
}
