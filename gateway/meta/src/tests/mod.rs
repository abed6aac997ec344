//! One test suite, every backend: the conformance tests ([`conformance`](redb::conformance)) and
//! the model-based proptest run once on redb and once on PostgreSQL (a throwaway server shared by
//! the test binary, a fresh database per test), from the same source files.

mod dump;
mod postgres;
mod redb;

use std::sync::Arc;

use crate::blocking::BlockingMeta;
use crate::kv::{Durability, KvStore};
use crate::pg_cluster::PgCluster;
use crate::postgres_kv::PostgresKv;
use crate::redb_kv::RedbKv;
use crate::{KvMeta, MetaConfig, MetaEngine};

/// The storage of one test's file system, which can be opened (and reopened) as an engine.
pub(crate) enum Db {
    Redb(tempfile::TempDir),
    Postgres(String),
}

impl Db {
    pub fn redb() -> Db {
        Db::Redb(tempfile::tempdir().expect("a temporary directory"))
    }

    pub fn postgres() -> Db {
        let url = PgCluster::shared()
            .fresh_database("meta")
            .expect("a fresh PostgreSQL database");
        Db::Postgres(url)
    }

    pub fn redb_path(&self) -> std::path::PathBuf {
        match self {
            Db::Redb(dir) => dir.path().join("meta.redb"),
            Db::Postgres(_) => panic!("not a redb database"),
        }
    }

    pub(crate) async fn store(&self) -> crate::Result<Arc<dyn KvStore>> {
        Ok(match self {
            Db::Redb(_) => Arc::new(RedbKv::open(self.redb_path())?),
            Db::Postgres(url) => Arc::new(PostgresKv::connect(url).await?),
        })
    }

    /// A new engine on this storage.
    pub fn open(&self, config: MetaConfig) -> BlockingMeta {
        BlockingMeta::start(|| async move {
            let engine: Arc<dyn MetaEngine> =
                Arc::new(KvMeta::open(self.store().await?, config).await?);
            Ok(engine)
        })
        .expect("open the metadata engine")
    }

    /// Writes `value` under `key` behind the engine's back (to plant corrupt records).
    pub fn put_raw(&self, key: Vec<u8>, value: Vec<u8>) {
        self.write_raw(vec![(key, Some(value))]);
    }

    /// Applies `writes` behind the engine's back (records of an older format, corrupt ones).
    pub fn write_raw(&self, writes: Vec<crate::kv::Write>) {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async {
            let store = self.store().await.unwrap();
            let txn = store.begin(true).await.unwrap();
            txn.commit(writes, Durability::Durable).await.unwrap();
        });
    }
}
