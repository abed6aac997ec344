//! The shared backend: PostgreSQL (and what speaks its wire protocol), so that many gateways
//! serve one file system.
//!
//! One table of keys and values (`stagefs_kv`) under the same rules as the embedded backend, and
//! one table of id sequences (`stagefs_sequences`). Write transactions run `SERIALIZABLE`: the
//! rules read-modify-write arbitrary records (a rename checks a chain of parents, `rmdir` checks
//! that a directory is empty), which only serializable isolation keeps correct across gateways.
//! Serialization failures and deadlocks come back as [`KvError::Conflict`] and the rules run the
//! transaction again. Reads run `REPEATABLE READ READ ONLY`: one snapshot, never a conflict.
//!
//! The hot changes (creates, slice commits) run `REPEATABLE READ` instead
//! ([`KvStore::begin_snapshot`]): serializable isolation locks whole btree pages for what a
//! transaction reads, and on a young database the records of unrelated directories share pages,
//! so creates in different directories conflicted and ran again (`stagefs bench meta`, README).
//! Under snapshot isolation a row two transactions change fails the later one, provided it is
//! changed with `UPDATE` or `DELETE`: an upsert of a row deleted meanwhile would write it again,
//! so a snapshot transaction sends what it read as an `UPDATE` ([`UPDATE`]). Pinned reads are
//! `SELECT … FOR KEY SHARE` (a heartbeat's `UPDATE` of a pinned session passes), taken keys
//! `SELECT … FOR UPDATE`.
//!
//! Writes are buffered by the rules and sent at commit in one statement, pipelined with `COMMIT`
//! (an upsert of every written pair, an update of those a snapshot transaction read, a delete of
//! every removed key), so a transaction costs its reads plus one round trip; the rules read what
//! they know they need up front in one statement ([`KvTxn::get_many`]). A snapshot transaction
//! may not need its read at all: what this gateway's snapshot transactions last read or wrote is
//! remembered ([`cache`]), a read answered from it is checked inside the transaction that used
//! it, and a transaction that read nothing is one statement, checks, writes and commit
//! ([`ONE_STATEMENT`]): one round trip for a create, as for the server's own insert. Statements are few
//! because the server spends its CPU mostly per statement, and at 16 clients its CPU is what
//! limits creates; for the same reason each connection plans a statement once ([`PLAN_ONCE`]).
//! Ids are taken in autocommit statements on a second connection, outside the
//! transaction, so the hot sequence rows are locked for one statement and never conflict: a
//! `SEQUENCE` would do the same but hands out fixed steps, and slice ids are taken in batches of
//! the client's choosing.
//!
//! The schema is created and migrated by the gateway: `stagefs_migrations` lists the versions
//! applied, and a gateway that finds a newer schema than it knows refuses to start.
//!
//! SQL kept to what CockroachDB and YugabyteDB also accept, except two optional settings:
//! `SET LOCAL synchronous_commit`, or `set_config('synchronous_commit', …, true)` in
//! [`ONE_STATEMENT`] (changes whose loss in a crash is harmless skip the WAL flush; a server
//! that refuses the setting makes them durable instead) and [`PLAN_ONCE`].

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{Hook, Manager, ManagerConfig, Object, Pool, RecyclingMethod};
use tokio_postgres::error::SqlState;
use tokio_postgres::NoTls;

use crate::kv::{Durability, KvError, KvResult, KvStore, KvTxn, Sequence, Write};

mod cache;
use cache::ReadCache;

/// Connections kept open to the server by one gateway for transactions.
const POOL_SIZE: usize = 64;
/// Connections for id sequences, apart: a transaction that takes ids while holding a
/// transaction connection must never wait for another transaction connection (64 of them
/// waiting on each other would deadlock until the pool's timeout).
const ID_POOL_SIZE: usize = 8;
/// How long a transaction waits for a free connection before the call fails (retryably).
const POOL_WAIT: Duration = Duration::from_secs(30);
/// Ids taken from a sequence at once for inode numbers and cookies (the rules keep the rest).
/// A refill is a commit of its own that the creates needing an id wait for: with 64 at once, a
/// batch of 64 had every round of creates wait for one. What a restart skips (the rest of a
/// batch) costs nothing: the numbers are 64-bit.
pub(crate) const ID_BATCH: u64 = 1024;

/// Each migration, in order; its index + 1 is its version.
const MIGRATIONS: &[(&str, &str)] = &[(
    "key-value table and id sequences",
    "CREATE TABLE stagefs_kv (k BYTEA PRIMARY KEY, v BYTEA NOT NULL);
     CREATE TABLE stagefs_sequences (name TEXT PRIMARY KEY, next BIGINT NOT NULL);",
)];

const GET: &str = "SELECT v FROM stagefs_kv WHERE k = $1";
const BEGIN_SNAPSHOT: &str = "BEGIN ISOLATION LEVEL REPEATABLE READ";
pub(crate) const GET_MANY: &str = "SELECT k, v FROM stagefs_kv WHERE k = ANY($1)";
/// A pinned read: a row lock that keeps out `DELETE` and `FOR UPDATE` (a taken key) until this
/// transaction ends but not an `UPDATE` of the value (under `REPEATABLE READ`, a row changed
/// since the snapshot fails it).
const GET_PINNED: &str = "SELECT k, v FROM stagefs_kv WHERE k = ANY($1) FOR KEY SHARE";
/// Pinned keys ($1) and plain ones ($2) in one statement: each statement is a round of the
/// protocol the server answers on its own, and at 16 clients the server's CPU, spent mostly per
/// statement, is what limits creates (`stagefs bench meta`).
const GET_PINNED_AND_MANY: &str =
    "WITH pinned AS (SELECT k, v FROM stagefs_kv WHERE k = ANY($1) FOR KEY SHARE) \
     SELECT k, v FROM pinned UNION ALL SELECT k, v FROM stagefs_kv WHERE k = ANY($2)";
/// A taken key ([`KvTxn::get_locked`]).
const GET_LOCKED: &str = "SELECT v FROM stagefs_kv WHERE k = $1 FOR UPDATE";
const SCAN: &str = "SELECT k, v FROM stagefs_kv WHERE k >= $1 AND k < $2 ORDER BY k LIMIT $3";
const UPSERT: &str =
    "INSERT INTO stagefs_kv (k, v) SELECT * FROM unnest($1::bytea[], $2::bytea[]) \
                      ON CONFLICT (k) DO UPDATE SET v = excluded.v";
/// In a snapshot transaction, the new values of records it read: an `UPDATE` of a row another
/// transaction changed or deleted since the snapshot fails (`REPEATABLE READ`), where an upsert
/// would write the row again as if it had never been deleted.
/// (Keys found through the primary key's index, not a join the planner may scan the table for.)
const UPDATE: &str = "UPDATE stagefs_kv SET v = ($2::bytea[])[array_position($1::bytea[], k)] \
                      WHERE k = ANY($1)";
const DELETE: &str = "DELETE FROM stagefs_kv WHERE k = ANY($1)";
/// [`UPSERT`] ($1, $2), [`UPDATE`] ($3, $4) and [`DELETE`] ($5) as one statement, for a commit
/// that needs more than one of them (a create inserts records and updates others). The keys of
/// the three are disjoint, so that the parts, which run on one snapshot and do not see each
/// other's rows, never touch the same row.
const WRITE_ALL: &str = "WITH deleted AS (DELETE FROM stagefs_kv WHERE k = ANY($5)), \
     updated AS (UPDATE stagefs_kv SET v = ($4::bytea[])[array_position($3::bytea[], k)] \
     WHERE k = ANY($3)) \
     INSERT INTO stagefs_kv (k, v) SELECT * FROM unnest($1::bytea[], $2::bytea[]) \
     ON CONFLICT (k) DO UPDATE SET v = excluded.v";
/// Every connection's session settings, in one implicit transaction (all or none): plan
/// each statement once per connection, and read the table only through its key's index.
/// Re-planning every execution of a statement of `k = ANY($1)` (PostgreSQL's choice for them,
/// since a generic plan does not look cheaper) was a sixth of the server's CPU in a profile of
/// creates at 16 clients, and more for the larger statements of a slice commit. A generic plan
/// made while the table was small would scan it whole until the next `ANALYZE`; without
/// sequential scans it takes the index, the right plan at every size for a table only ever read
/// by its key. A plain index scan, not a bitmap one: for the handful of keys of a transaction's
/// read, building the bitmap cost more than it saved (`stagefs bench meta`: creates at 16 and
/// 64 clients 7–12 % faster without it).
const PLAN_ONCE: &str = "SET enable_seqscan = off; SET enable_bitmapscan = off; \
                         SET plan_cache_mode = force_generic_plan";
/// The records a check compares ([`CHECK`], [`ONE_STATEMENT`]): the keys to pin ($1) and the
/// others ($2) read as [`GET_PINNED_AND_MANY`] reads them. (Macros, for `concat!`.)
macro_rules! seen_sql {
    () => {
        "pinned AS (SELECT k, v FROM stagefs_kv WHERE k = ANY($1) FOR KEY SHARE), \
         seen AS (SELECT k, v FROM pinned UNION ALL SELECT k, v FROM stagefs_kv WHERE k = ANY($2))"
    };
}
/// The keys whose record is not what was assumed of it ($3, $4, in that order; a `NULL` value
/// for no record), as rows to count.
macro_rules! differences_sql {
    () => {
        "FROM unnest($3::bytea[], $4::bytea[]) AS assumed (k, v) \
         LEFT JOIN seen ON seen.k = assumed.k WHERE seen.v IS DISTINCT FROM assumed.v"
    };
}
/// The check of the values a snapshot transaction took from [`ReadCache`] instead of reading
/// them, pipelined ahead of its writes. Any difference fails the statement, and with it the
/// transaction, before its writes: a division by zero (SQLSTATE 22012), raised from the data so
/// that the planner cannot fold it, and what every server of the protocol implements.
const CHECK: &str = concat!(
    "WITH ",
    seen_sql!(),
    " SELECT 1 / (CASE WHEN count(*) = 0 THEN 1 ELSE 0 END) ",
    differences_sql!()
);
/// A snapshot transaction that read nothing (every value guessed), whole, as one statement
/// outside any `BEGIN`: the statement is its transaction, and it commits when it returns. Its
/// [`CHECK`] ($1–$4) gates its [`WRITE_ALL`] ($5–$9): a one-time filter on the insert, which
/// the server evaluates before anything else runs, so a wrong guess fails the statement before
/// it changed anything. $10 is the commit's `synchronous_commit` (`NULL`: the server's own),
/// set for this transaction alone.
///
/// Why: each statement of a pipelined transaction is answered on its own, and at one client
/// the server's sends of `BEGIN`, the check, the writes and `COMMIT` were most of a create's
/// cost (`stagefs bench meta`). Safe only under snapshot isolation, which the connections of
/// the transactions' pool default to ([`SESSION`]); the statement checks that it has it, and
/// fails as a wrong guess without (the next run reads, and commits as any other transaction).
const ONE_STATEMENT: &str = concat!(
    "WITH ",
    seen_sql!(),
    ", checked AS (SELECT 1 / (CASE WHEN count(*) = 0 AND \
       current_setting('transaction_isolation') IN ('repeatable read', 'serializable') \
       THEN 1 ELSE 0 END) AS ok ",
    differences_sql!(),
    "), deleted AS (DELETE FROM stagefs_kv WHERE k = ANY($9)), \
     updated AS (UPDATE stagefs_kv SET v = ($8::bytea[])[array_position($7::bytea[], k)] \
       WHERE k = ANY($7)) \
     INSERT INTO stagefs_kv (k, v) SELECT * FROM unnest($5::bytea[], $6::bytea[]) \
     WHERE (SELECT ok FROM checked) = 1 AND set_config('synchronous_commit', \
       COALESCE($10, current_setting('synchronous_commit')), true) IS NOT NULL \
     ON CONFLICT (k) DO UPDATE SET v = excluded.v"
);
/// Every connection of the transactions' pool: a statement outside `BEGIN` runs under snapshot
/// isolation ([`ONE_STATEMENT`]; every other transaction names its isolation).
const SESSION: &str = "SET default_transaction_isolation TO 'repeatable read'";
const TAKE_IDS: &str =
    "UPDATE stagefs_sequences SET next = next + $2 WHERE name = $1 RETURNING next - $2";
const PEEK_ID: &str = "SELECT next FROM stagefs_sequences WHERE name = $1";

/// The PostgreSQL [`KvStore`].
pub struct PostgresKv {
    pool: Pool,
    ids: Pool,
    /// Whether the server accepted `SET LOCAL synchronous_commit`.
    lazy_commits: Arc<AtomicBool>,
    /// The server is a hot standby (in recovery): only reads.
    standby: bool,
    /// What snapshot transactions read, so that the next can do without ([`ReadCache`]).
    cache: Arc<ReadCache>,
}

/// Applies [`PLAN_ONCE`] to a new connection. A server that refuses it (PostgreSQL before 12,
/// or one that only speaks its protocol) plans as it chooses: said once, never asked again.
/// A connection that failed otherwise is not handed out.
async fn plan_once(
    client: &tokio_postgres::Client,
    planned_once: &AtomicBool,
) -> Result<(), tokio_postgres::Error> {
    if !planned_once.load(Ordering::Relaxed) {
        return Ok(());
    }
    match client.batch_execute(PLAN_ONCE).await {
        Err(error) if error.as_db_error().is_some() => {
            if planned_once.swap(false, Ordering::Relaxed) {
                tracing::warn!(
                    %error,
                    "the PostgreSQL server refused generic plans: statements are planned at \
                     each execution"
                );
            }
            Ok(())
        }
        outcome => outcome,
    }
}

/// Maps a driver error: conflicts are retried by the rules, lost connections may pass.
fn pg_error(error: tokio_postgres::Error) -> KvError {
    if let Some(code) = error.code() {
        if *code == SqlState::T_R_SERIALIZATION_FAILURE || *code == SqlState::T_R_DEADLOCK_DETECTED
        {
            return KvError::Conflict(error.to_string());
        }
        if *code == SqlState::READ_ONLY_SQL_TRANSACTION {
            return KvError::ReadOnly(error.to_string());
        }
        let class = &code.code()[..2];
        // 08: connection exception, 53: insufficient resources, 57: operator intervention.
        if matches!(class, "08" | "53" | "57") {
            return KvError::Unavailable(error.to_string());
        }
        let detail = error
            .as_db_error()
            .map(|db| db.message().to_string())
            .unwrap_or_else(|| error.to_string());
        return KvError::Failed(format!("{detail} (SQLSTATE {})", code.code()));
    }
    if error.is_closed() {
        return KvError::Unavailable(format!("connection closed: {error}"));
    }
    KvError::Unavailable(error.to_string())
}

fn pool_error(error: deadpool_postgres::PoolError) -> KvError {
    match error {
        deadpool_postgres::PoolError::Backend(e) => pg_error(e),
        other => KvError::Unavailable(format!("no database connection: {other}")),
    }
}

impl PostgresKv {
    /// Connects to `url` (`postgres://USER[:PASS]@HOST[:PORT]/DB`), creating or migrating the
    /// schema.
    pub async fn connect(url: &str) -> KvResult<PostgresKv> {
        let config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| KvError::Failed(format!("bad PostgreSQL URL: {e}")))?;
        let planned_once = Arc::new(AtomicBool::new(true));
        let pool = |size: usize, session: Option<&'static str>| {
            let manager = Manager::from_config(
                config.clone(),
                NoTls,
                ManagerConfig {
                    recycling_method: RecyclingMethod::Fast,
                },
            );
            let planned_once = planned_once.clone();
            Pool::builder(manager)
                .post_create(Hook::async_fn(move |client, _| {
                    let planned_once = planned_once.clone();
                    Box::pin(async move {
                        plan_once(client, &planned_once)
                            .await
                            .map_err(deadpool_postgres::HookError::Backend)?;
                        if let Some(session) = session {
                            client
                                .batch_execute(session)
                                .await
                                .map_err(deadpool_postgres::HookError::Backend)?;
                        }
                        Ok(())
                    })
                }))
                .max_size(size)
                .wait_timeout(Some(POOL_WAIT))
                .create_timeout(Some(POOL_WAIT))
                .runtime(deadpool_postgres::Runtime::Tokio1)
                .build()
                .map_err(|e| KvError::Failed(format!("connection pool: {e}")))
        };
        let mut store = PostgresKv {
            pool: pool(POOL_SIZE, Some(SESSION))?,
            ids: pool(ID_POOL_SIZE, None)?,
            lazy_commits: Arc::new(AtomicBool::new(true)),
            standby: false,
            cache: Arc::default(),
        };
        let client = store.pool.get().await.map_err(pool_error)?;
        store.standby = client
            .query_one("SELECT pg_is_in_recovery()", &[])
            .await
            .map_err(pg_error)?
            .get(0);
        drop(client);
        if store.standby {
            store.check_schema().await?;
        } else {
            store.migrate().await?;
        }
        Ok(store)
    }

    /// A connection of the transactions' pool (`ids: false`) or of the sequences' one.
    #[cfg(test)]
    pub(crate) async fn connection(&self, ids: bool) -> KvResult<Object> {
        let pool = if ids { &self.ids } else { &self.pool };
        pool.get().await.map_err(pool_error)
    }

    /// On a standby, which cannot migrate: the schema must be this build's.
    async fn check_schema(&self) -> KvResult<()> {
        let client = self.pool.get().await.map_err(pool_error)?;
        let current: Option<i32> = client
            .query_one("SELECT max(version) FROM stagefs_migrations", &[])
            .await
            .map_err(|e| match e.code() {
                Some(code) if *code == SqlState::UNDEFINED_TABLE => KvError::ReadOnly(
                    "this standby's database has no stagefs schema yet: a gateway on its \
                     primary creates it"
                        .into(),
                ),
                _ => pg_error(e),
            })?
            .get(0);
        let known = MIGRATIONS.len() as i32;
        match current {
            Some(version) if version == known => Ok(()),
            other => Err(KvError::ReadOnly(format!(
                "this standby's stagefs schema is version {}, this build's is {known}: a \
                 gateway of this build on its primary migrates it",
                other.unwrap_or(0)
            ))),
        }
    }

    /// Brings the schema to the newest version this build knows, one migration at a time, each in
    /// its own transaction. Concurrent gateways queue on a row lock, so each migration runs once.
    async fn migrate(&self) -> KvResult<()> {
        let mut client = self.pool.get().await.map_err(pool_error)?;
        client
            .batch_execute(
                "CREATE TABLE IF NOT EXISTS stagefs_migrations (
                     version INT PRIMARY KEY,
                     description TEXT NOT NULL,
                     applied_at TIMESTAMPTZ NOT NULL DEFAULT now());
                 INSERT INTO stagefs_migrations (version, description)
                     VALUES (0, 'the row migrators lock') ON CONFLICT (version) DO NOTHING;",
            )
            .await
            .map_err(pg_error)?;
        let known = MIGRATIONS.len() as i32;
        loop {
            // Read committed: once the row lock is had, what the migrator before it committed
            // must be seen ([`SESSION`] would make it snapshot isolation).
            let txn = client
                .build_transaction()
                .isolation_level(tokio_postgres::IsolationLevel::ReadCommitted)
                .start()
                .await
                .map_err(pg_error)?;
            txn.query_one(
                "SELECT version FROM stagefs_migrations WHERE version = 0 FOR UPDATE",
                &[],
            )
            .await
            .map_err(pg_error)?;
            let current: i32 = txn
                .query_one("SELECT max(version) FROM stagefs_migrations", &[])
                .await
                .map_err(pg_error)?
                .get(0);
            if current > known {
                return Err(KvError::Failed(format!(
                    "the database's stagefs schema is version {current}, newer than this \
                     build's {known}: upgrade this gateway"
                )));
            }
            if current == known {
                txn.commit().await.map_err(pg_error)?;
                break;
            }
            let (description, sql) = MIGRATIONS[current as usize];
            let version = current + 1;
            txn.batch_execute(sql).await.map_err(pg_error)?;
            if version == 1 {
                for sequence in Sequence::ALL {
                    txn.execute(
                        "INSERT INTO stagefs_sequences (name, next) VALUES ($1, $2)",
                        &[&sequence.name(), &(sequence.first() as i64)],
                    )
                    .await
                    .map_err(pg_error)?;
                }
            }
            txn.execute(
                "INSERT INTO stagefs_migrations (version, description) VALUES ($1, $2)",
                &[&version, &description],
            )
            .await
            .map_err(pg_error)?;
            txn.commit().await.map_err(pg_error)?;
            tracing::info!(version, description, "migrated the PostgreSQL schema");
        }
        Ok(())
    }
}

#[async_trait]
impl KvStore for PostgresKv {
    fn kind(&self) -> &'static str {
        "postgres"
    }

    async fn begin(&self, write: bool) -> KvResult<Box<dyn KvTxn>> {
        self.begin_as(if write {
            "BEGIN ISOLATION LEVEL SERIALIZABLE"
        } else {
            "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY"
        })
        .await
    }

    /// `REPEATABLE READ` is snapshot isolation in PostgreSQL: a row two transactions update (or
    /// one deletes and one pins) fails the later one, and nothing takes predicate locks.
    async fn begin_snapshot(&self) -> KvResult<Box<dyn KvTxn>> {
        self.begin_as(BEGIN_SNAPSHOT).await
    }

    fn id_batch(&self) -> u64 {
        ID_BATCH
    }

    fn read_only(&self) -> bool {
        self.standby
    }

    /// The WAL insert position on a primary (commits not flushed yet included), the replayed
    /// one on a standby.
    async fn log_position(&self) -> KvResult<Option<u64>> {
        let query = if self.standby {
            "SELECT pg_last_wal_replay_lsn()::text"
        } else {
            "SELECT pg_current_wal_insert_lsn()::text"
        };
        let client = self.ids.get().await.map_err(pool_error)?;
        let text: Option<String> = client.query_one(query, &[]).await.map_err(pg_error)?.get(0);
        let Some(text) = text else {
            return Ok(None);
        };
        crate::pg_cluster::parse_lsn(&text)
            .map(Some)
            .map_err(|e| KvError::Failed(e.to_string()))
    }

    async fn replica_lag(&self) -> KvResult<Option<std::time::Duration>> {
        if !self.standby {
            return Ok(None);
        }
        let client = self.ids.get().await.map_err(pool_error)?;
        let seconds: Option<f64> = client
            .query_one(
                "SELECT EXTRACT(EPOCH FROM (now() - pg_last_xact_replay_timestamp()))::float8",
                &[],
            )
            .await
            .map_err(pg_error)?
            .get(0);
        Ok(seconds.map(|s| std::time::Duration::from_secs_f64(s.max(0.0))))
    }
}

impl PostgresKv {
    async fn begin_as(&self, begin: &'static str) -> KvResult<Box<dyn KvTxn>> {
        if !begin.ends_with("READ ONLY") && self.standby {
            return Err(KvError::ReadOnly(
                "the database is a hot standby (a mirror): changes go to its primary".into(),
            ));
        }
        // BEGIN goes out with the transaction's first statement, in the same round trip. Should
        // a call be cancelled (a client gone) once it was sent, dropping the transaction rolls
        // it back before the connection is reused.
        Ok(Box::new(PgTxn {
            client: Some(self.pool.get().await.map_err(pool_error)?),
            ids: self.ids.clone(),
            lazy_commits: self.lazy_commits.clone(),
            snapshot: (begin == BEGIN_SNAPSHOT).then(Snapshot::default),
            begin,
            begun: AtomicBool::new(false),
            cache: self.cache.clone(),
        }))
    }
}

struct PgTxn {
    /// `None` once committed (or handed to the rollback task).
    client: Option<Object>,
    /// Where ids are taken ([`ID_POOL_SIZE`]).
    ids: Pool,
    lazy_commits: Arc<AtomicBool>,
    /// The BEGIN of this transaction, sent (pipelined) with its first statement.
    begin: &'static str,
    begun: AtomicBool,
    /// What a snapshot transaction ([`KvStore::begin_snapshot`]) keeps of its reads; `None` in
    /// the others.
    snapshot: Option<Snapshot>,
    cache: Arc<ReadCache>,
}

/// What a snapshot transaction keeps of its reads.
#[derive(Default)]
struct Snapshot {
    /// The keys its reads found (or guessed there): what it writes of them is sent as an
    /// `UPDATE` ([`UPDATE`]).
    found: HashSet<Vec<u8>>,
    /// What it took from [`ReadCache`] instead of reading, checked before it ends ([`CHECK`]):
    /// each key's assumed value, and whether it is read pinned.
    assumed: HashMap<Vec<u8>, (Option<Vec<u8>>, bool)>,
    /// Keys the rules expect to be absent ([`KvTxn::expect_absent`]).
    absent: HashSet<Vec<u8>>,
}

type PgResult<T> = Result<T, tokio_postgres::Error>;

/// The parameters of [`CHECK`].
struct CheckParams {
    pinned: Vec<Vec<u8>>,
    plain: Vec<Vec<u8>>,
    keys: Vec<Vec<u8>>,
    values: Vec<Option<Vec<u8>>>,
}

impl CheckParams {
    fn as_params(&self) -> [&(dyn tokio_postgres::types::ToSql + Sync); 4] {
        [&self.pinned, &self.plain, &self.keys, &self.values]
    }
}

/// A failed [`CHECK`]: a guessed value had changed (a conflict: nothing was applied, and the run
/// after reads it), or the statement failed as any would.
fn check_error(error: tokio_postgres::Error) -> KvError {
    if error.code() == Some(&SqlState::DIVISION_BY_ZERO) {
        metrics::counter!("stagefs_meta_pg_guesses_refuted_total").increment(1);
        return KvError::Conflict(
            "a record this gateway remembered had changed: read again".into(),
        );
    }
    pg_error(error)
}

impl PgTxn {
    fn client(&self) -> &Object {
        self.client.as_ref().expect("transaction already finished")
    }

    /// One key's value by `query` (a [`GET`] with or without a row lock).
    async fn get_one(&mut self, query: &str, key: &[u8]) -> KvResult<Option<Vec<u8>>> {
        if query == GET {
            if let Some(mut values) = self.guess(&[key.to_vec()], 0) {
                return Ok(values.pop().flatten());
            }
        }
        let client = self.client();
        // Prepared statements belong to the connection, not the transaction: preparing first
        // keeps BEGIN and the query back to back.
        let statement = client.prepare_cached(query).await.map_err(pg_error)?;
        let row = self.in_txn(client.query_opt(&statement, &[&key])).await?;
        let value: Option<Vec<u8>> = row.map(|row| row.get(0));
        if value.is_some() {
            self.note_found(std::iter::once(key));
        }
        if self.snapshot.is_some() {
            self.cache.learn(std::iter::once((key, value.as_deref())));
        }
        Ok(value)
    }

    /// In a snapshot transaction, the values of `keys` (the first `pinned` of them to be read
    /// pinned) as [`ReadCache`] remembers them, when it knows every one: taken as read, and
    /// checked before the transaction ends ([`CHECK`]).
    fn guess(&mut self, keys: &[Vec<u8>], pinned: usize) -> Option<Vec<Option<Vec<u8>>>> {
        let snapshot = self.snapshot.as_mut()?;
        let mut values = self.cache.values(keys, &snapshot.absent)?;
        for (i, (key, value)) in keys.iter().zip(values.iter_mut()).enumerate() {
            // A key guessed twice keeps its first value: one transaction, one snapshot.
            let (assumed, pin) = snapshot
                .assumed
                .entry(key.clone())
                .or_insert_with(|| (value.clone(), false));
            *value = assumed.clone();
            *pin |= i < pinned;
            if value.is_some() {
                snapshot.found.insert(key.clone());
            }
        }
        metrics::counter!("stagefs_meta_pg_guessed_reads_total").increment(1);
        Some(values)
    }

    /// What [`CHECK`] is given: the keys to pin, the others, and every key with its assumed
    /// value (pinned first). `None` when nothing was guessed.
    fn check_params(&self) -> Option<CheckParams> {
        let assumed = &self.snapshot.as_ref()?.assumed;
        if assumed.is_empty() {
            return None;
        }
        let (mut pinned, mut plain) = (Vec::new(), Vec::new());
        let (mut pinned_values, mut plain_values) = (Vec::new(), Vec::new());
        for (key, (value, pin)) in assumed {
            if *pin {
                pinned.push(key.clone());
                pinned_values.push(value.clone());
            } else {
                plain.push(key.clone());
                plain_values.push(value.clone());
            }
        }
        let keys = pinned.iter().chain(&plain).cloned().collect();
        pinned_values.append(&mut plain_values);
        Some(CheckParams {
            pinned,
            plain,
            keys,
            values: pinned_values,
        })
    }

    /// After a failed commit or check: what was guessed, and what was to be written of
    /// remembered keys, is read again next time.
    fn refute_guesses(&self, written: &[Write]) {
        if let Some(snapshot) = &self.snapshot {
            self.cache
                .refute(snapshot.assumed.keys().map(Vec::as_slice));
        }
        self.cache
            .refute(written.iter().map(|(key, _)| key.as_slice()));
    }

    /// Keys a read found, kept in a snapshot transaction ([`Snapshot::found`]).
    fn note_found<'k>(&mut self, keys: impl Iterator<Item = &'k (impl AsRef<[u8]> + 'k + ?Sized)>) {
        if let Some(snapshot) = &mut self.snapshot {
            snapshot.found.extend(keys.map(|key| key.as_ref().to_vec()));
        }
    }

    /// The BEGIN to send ahead of the next statement, once.
    fn pending_begin(&self) -> Option<&'static str> {
        (!self.begun.swap(true, Ordering::Relaxed)).then_some(self.begin)
    }

    /// Runs `query` (a statement on this transaction's connection, created but not yet polled)
    /// inside the transaction: the first one goes out right behind BEGIN, without waiting for
    /// BEGIN's answer.
    async fn in_txn<T>(
        &self,
        query: impl std::future::Future<Output = PgResult<T>>,
    ) -> KvResult<T> {
        self.in_txn_as(query).await.map_err(pg_error)
    }

    /// [`PgTxn::in_txn`], its error as the driver gave it.
    async fn in_txn_as<T>(
        &self,
        query: impl std::future::Future<Output = PgResult<T>>,
    ) -> PgResult<T> {
        match self.pending_begin() {
            Some(begin) => {
                futures::try_join!(self.client().batch_execute(begin), query).map(|(_, out)| out)
            }
            None => query.await,
        }
    }
}

#[async_trait]
impl KvTxn for PgTxn {
    async fn get(&mut self, key: &[u8]) -> KvResult<Option<Vec<u8>>> {
        self.get_one(GET, key).await
    }

    async fn get_locked(&mut self, key: &[u8]) -> KvResult<Option<Vec<u8>>> {
        self.get_one(GET_LOCKED, key).await
    }

    async fn get_pinned(&mut self, key: &[u8]) -> KvResult<Option<Vec<u8>>> {
        let mut values = self.get_many(&[key.to_vec()], 1).await?;
        Ok(values.pop().flatten())
    }

    /// At most two statements (the pinned keys, the others), sent together in one round trip.
    async fn get_many(
        &mut self,
        keys: &[Vec<u8>],
        pinned: usize,
    ) -> KvResult<Vec<Option<Vec<u8>>>> {
        if keys.len() == 1 && pinned == 0 {
            return Ok(vec![self.get(&keys[0]).await?]);
        }
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let pinned = pinned.min(keys.len());
        if let Some(values) = self.guess(keys, pinned) {
            return Ok(values);
        }
        let (pin, plain) = keys.split_at(pinned);
        let client = self.client();
        let (query, params): (_, Vec<&(dyn tokio_postgres::types::ToSql + Sync)>) =
            match (pin.is_empty(), plain.is_empty()) {
                (_, true) => (GET_PINNED, vec![&pin]),
                (true, false) => (GET_MANY, vec![&plain]),
                (false, false) => (GET_PINNED_AND_MANY, vec![&pin, &plain]),
            };
        let statement = client.prepare_cached(query).await.map_err(pg_error)?;
        let rows = self.in_txn(client.query(&statement, &params)).await?;
        let values: HashMap<Vec<u8>, Vec<u8>> = rows
            .into_iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect();
        self.note_found(values.keys());
        if self.snapshot.is_some() {
            self.cache.learn(
                keys.iter()
                    .map(|key| (key.as_slice(), values.get(key).map(Vec::as_slice))),
            );
        }
        Ok(keys.iter().map(|key| values.get(key).cloned()).collect())
    }

    async fn scan(
        &mut self,
        start: &[u8],
        end: &[u8],
        limit: usize,
    ) -> KvResult<Vec<(Vec<u8>, Vec<u8>)>> {
        if start >= end || limit == 0 {
            return Ok(Vec::new());
        }
        let client = self.client();
        let statement = client.prepare_cached(SCAN).await.map_err(pg_error)?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = self
            .in_txn(client.query(&statement, &[&start, &end, &limit]))
            .await?;
        let pairs: Vec<(Vec<u8>, Vec<u8>)> = rows
            .into_iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect();
        self.note_found(pairs.iter().map(|(key, _)| key));
        Ok(pairs)
    }

    async fn take_ids(&mut self, sequence: Sequence, count: u64) -> KvResult<u64> {
        // Outside this transaction, on a connection of its own: the ids are gone whatever
        // becomes of this transaction, and the row is locked for one statement only.
        let client = self.ids.get().await.map_err(pool_error)?;
        let row = if count == 0 {
            let statement = client.prepare_cached(PEEK_ID).await.map_err(pg_error)?;
            client.query_opt(&statement, &[&sequence.name()]).await
        } else {
            let count = i64::try_from(count)
                .map_err(|_| KvError::Failed(format!("cannot take {count} ids at once")))?;
            let statement = client.prepare_cached(TAKE_IDS).await.map_err(pg_error)?;
            client
                .query_opt(&statement, &[&sequence.name(), &count])
                .await
        }
        .map_err(pg_error)?;
        let Some(row) = row else {
            return Err(KvError::Failed(format!(
                "sequence {} is missing from stagefs_sequences",
                sequence.name()
            )));
        };
        let first: i64 = row.get(0);
        Ok(first as u64)
    }

    async fn commit(
        mut self: Box<Self>,
        writes: Vec<Write>,
        durability: Durability,
    ) -> KvResult<()> {
        // The connection stays inside the transaction until COMMIT has answered: if this call
        // is cancelled, or a statement fails, dropping the transaction rolls it back before the
        // connection goes back to the pool (a connection returned mid-transaction would have
        // its half-written changes committed by the next transaction on it).
        let check = self.check_params();
        if writes.is_empty() && !self.begun.load(Ordering::Relaxed) && check.is_none() {
            // Nothing was read or written: there is no transaction on the server to end.
            self.begun.store(true, Ordering::Relaxed);
            drop(self.client.take());
            return Ok(());
        }
        // What is remembered of the keys written is updated once the commit took effect.
        let guessed = |key: &[u8]| {
            self.snapshot
                .as_ref()
                .is_some_and(|snapshot| snapshot.assumed.contains_key(key))
        };
        let remembered = self.cache.remembered(&writes, guessed);
        let committed = match check {
            Some(check) if !self.begun.swap(true, Ordering::Relaxed) => {
                let committed = self
                    .commit_in_one_statement(writes, check, durability)
                    .await;
                // Whatever came of it, the statement was its transaction: nothing to roll back.
                drop(self.client.take());
                committed
            }
            check => self.commit_on(writes, check, durability).await,
        };
        match committed {
            Ok(()) => self.cache.committed(&remembered),
            Err(error) => {
                self.refute_guesses(&remembered);
                return Err(error);
            }
        }
        // Committed: the connection goes back to the pool as it is.
        drop(self.client.take());
        Ok(())
    }

    fn expect_absent(&mut self, key: &[u8]) {
        if let Some(snapshot) = &mut self.snapshot {
            snapshot.absent.insert(key.to_vec());
        }
    }

    async fn check_reads(&mut self) -> KvResult<()> {
        let Some(check) = self.check_params() else {
            return Ok(());
        };
        let client = self.client();
        let statement = client.prepare_cached(CHECK).await.map_err(pg_error)?;
        let params = check.as_params();
        let checked = self.in_txn_as(client.execute(&statement, &params)).await;
        checked.map(drop).map_err(|error| {
            self.refute_guesses(&[]);
            check_error(error)
        })
    }
}

/// A transaction's writes as [`WRITE_ALL`] takes them.
#[derive(Default)]
struct SplitWrites {
    put_keys: Vec<Vec<u8>>,
    put_values: Vec<Vec<u8>>,
    update_keys: Vec<Vec<u8>>,
    update_values: Vec<Vec<u8>>,
    deletes: Vec<Vec<u8>>,
}

impl PgTxn {
    /// Upserts, updates (what a snapshot transaction found: see [`UPDATE`]) and deletes.
    fn split(&self, writes: Vec<Write>) -> SplitWrites {
        let mut split = SplitWrites::default();
        for (key, value) in writes {
            match value {
                Some(value)
                    if self
                        .snapshot
                        .as_ref()
                        .is_some_and(|snapshot| snapshot.found.contains(&key)) =>
                {
                    split.update_keys.push(key);
                    split.update_values.push(value);
                }
                Some(value) => {
                    split.put_keys.push(key);
                    split.put_values.push(value);
                }
                None => split.deletes.push(key),
            }
        }
        split
    }

    /// A transaction that read nothing, committed as [`ONE_STATEMENT`]: its check, its writes
    /// and its commit in one statement and one round trip.
    async fn commit_in_one_statement(
        &self,
        writes: Vec<Write>,
        check: CheckParams,
        durability: Durability,
    ) -> KvResult<()> {
        let client = self.client();
        let statement = client
            .prepare_cached(ONE_STATEMENT)
            .await
            .map_err(pg_error)?;
        let split = self.split(writes);
        let lazy = durability == Durability::Eventual && self.lazy_commits.load(Ordering::Relaxed);
        let synchronous_commit: Option<&str> = lazy.then_some("off");
        let [pinned, plain, keys, values] = check.as_params();
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 10] = [
            pinned,
            plain,
            keys,
            values,
            &split.put_keys,
            &split.put_values,
            &split.update_keys,
            &split.update_values,
            &split.deletes,
            &synchronous_commit,
        ];
        match client.execute(&statement, &params).await {
            Ok(_) => Ok(()),
            // A server that refuses the setting (an unknown parameter or value, or no
            // `set_config`).
            Err(error)
                if lazy
                    && [
                        SqlState::INVALID_PARAMETER_VALUE,
                        SqlState::UNDEFINED_OBJECT,
                        SqlState::UNDEFINED_FUNCTION,
                        SqlState::FEATURE_NOT_SUPPORTED,
                        SqlState::CANT_CHANGE_RUNTIME_PARAM,
                    ]
                    .iter()
                    .any(|code| error.code() == Some(code)) =>
            {
                Err(self.refuse_lazy_commits(error))
            }
            Err(error) => Err(check_error(error)),
        }
    }

    /// The server refused `synchronous_commit` (as `error` says): stop asking, and let the
    /// rules run the transaction again (durably, which is always allowed).
    fn refuse_lazy_commits(&self, error: tokio_postgres::Error) -> KvError {
        self.lazy_commits.store(false, Ordering::Relaxed);
        KvError::Conflict(format!("the server refused synchronous_commit: {error}"))
    }

    /// Sends the check of what was guessed ([`CHECK`]), the writes and COMMIT in one round trip
    /// (pipelined; should a statement fail, the server turns the COMMIT into a rollback and the
    /// statement's error is what comes back).
    async fn commit_on(
        &self,
        writes: Vec<Write>,
        check: Option<CheckParams>,
        durability: Durability,
    ) -> KvResult<()> {
        let client = self.client();
        let SplitWrites {
            put_keys,
            put_values,
            update_keys,
            update_values,
            deletes,
        } = self.split(writes);
        let kinds = [&put_keys, &update_keys, &deletes]
            .iter()
            .filter(|keys| !keys.is_empty())
            .count();
        // One statement for all the writes: the three apart when only one of them has keys
        // (their plans are simpler), else the three in one.
        let (query, params): (_, Vec<&(dyn tokio_postgres::types::ToSql + Sync)>) = if kinds > 1 {
            (
                WRITE_ALL,
                vec![
                    &put_keys,
                    &put_values,
                    &update_keys,
                    &update_values,
                    &deletes,
                ],
            )
        } else if !put_keys.is_empty() {
            (UPSERT, vec![&put_keys, &put_values])
        } else if !update_keys.is_empty() {
            (UPDATE, vec![&update_keys, &update_values])
        } else {
            (DELETE, vec![&deletes])
        };
        let write = client.prepare_cached(query).await.map_err(pg_error)?;
        let check = match check {
            Some(check) => Some((client.prepare_cached(CHECK).await.map_err(pg_error)?, check)),
            None => None,
        };
        // In the order they must reach the server: each is sent when first polled, and
        // try_join_all polls them in order.
        let mut steps: Vec<futures::future::BoxFuture<'_, PgResult<()>>> = Vec::new();
        if let Some(begin) = self.pending_begin() {
            steps.push(Box::pin(client.batch_execute(begin)));
        }
        let lazy = durability == Durability::Eventual && self.lazy_commits.load(Ordering::Relaxed);
        // Which step is the setting, to tell its failure from the others'.
        let set_local = lazy.then(|| {
            steps.push(Box::pin(
                client.batch_execute("SET LOCAL synchronous_commit TO OFF"),
            ));
            steps.len() - 1
        });
        let check_step = check.as_ref().map(|(statement, check)| {
            steps.push(Box::pin(async move {
                client
                    .execute(statement, &check.as_params())
                    .await
                    .map(drop)
            }));
            steps.len() - 1
        });
        if kinds > 0 {
            steps.push(Box::pin(async {
                client.execute(&write, &params).await.map(drop)
            }));
        }
        steps.push(Box::pin(client.batch_execute("COMMIT")));
        // Every step is answered; the first error is the one that counts (the later steps fail
        // only because the transaction was aborted by it).
        let outcomes = futures::future::join_all(steps).await;
        match outcomes.into_iter().enumerate().find(|(_, o)| o.is_err()) {
            None => Ok(()),
            // A server that does not know the setting aborts the transaction.
            Some((step, Err(error))) if Some(step) == set_local => {
                Err(self.refuse_lazy_commits(error))
            }
            Some((step, Err(error))) if Some(step) == check_step => Err(check_error(error)),
            Some((_, outcome)) => outcome.map_err(pg_error),
        }
    }
}

/// Ends a transaction that was not committed before its connection is reused; a connection that
/// cannot even roll back is closed instead of going back to the pool.
fn rollback_later(client: Object) {
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => {
            runtime.spawn(async move {
                if client.batch_execute("ROLLBACK").await.is_err() {
                    drop(Object::take(client));
                }
            });
        }
        Err(_) => drop(Object::take(client)),
    }
}

impl Drop for PgTxn {
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            rollback_later(client);
        }
    }
}
