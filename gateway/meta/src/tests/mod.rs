//! One test suite, every backend: the conformance tests ([`conformance`](redb::conformance)) and
//! the model-based proptest run on redb in a file, on redb in the metadata region of a device
//! file opened `O_DIRECT`, and on PostgreSQL (a throwaway server shared by the test binary, a
//! fresh database per test), from the same source files.

mod dump;
mod postgres;
mod redb;
mod region;

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
    /// A device file in the directory, with a metadata region at [`REGION_AT`].
    Region(tempfile::TempDir),
}

/// Where the region sits in a test device file: not at 0, so every offset is translated.
pub(crate) const REGION_AT: u64 = 1 << 20;
pub(crate) const REGION_BYTES: u64 = 48 << 20;

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

    /// A device file with a freshly formatted region of `bytes` at [`REGION_AT`].
    pub fn region_of(bytes: u64) -> Db {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("device");
        std::fs::File::create(&path)
            .and_then(|f| f.set_len(REGION_AT + bytes + (1 << 20)))
            .expect("a device file");
        let file = crate::redb_region::open_direct(&path).expect("open the device O_DIRECT");
        crate::redb_region::format(&file, "test device", REGION_AT, bytes)
            .expect("format the region");
        Db::Region(dir)
    }

    pub fn region() -> Db {
        Db::region_of(REGION_BYTES)
    }

    pub fn redb_path(&self) -> std::path::PathBuf {
        match self {
            Db::Redb(dir) => dir.path().join("meta.redb"),
            Db::Region(dir) => dir.path().join("device"),
            Db::Postgres(_) => panic!("not a redb database"),
        }
    }

    pub(crate) async fn store(&self) -> crate::Result<Arc<dyn KvStore>> {
        Ok(match self {
            Db::Redb(_) => Arc::new(RedbKv::open(self.redb_path())?),
            Db::Region(_) => Arc::new(RedbKv::open_backend(self.region_backend(), "test", None)?),
            Db::Postgres(url) => Arc::new(PostgresKv::connect(url).await?),
        })
    }

    /// The region of a [`Db::Region`], opened again.
    pub fn region_backend(&self) -> crate::redb_region::RegionBackend {
        let path = self.redb_path();
        let size = std::fs::metadata(&path).expect("the device file").len();
        let file = crate::redb_region::open_direct(&path).expect("open the device O_DIRECT");
        crate::redb_region::RegionBackend::open(
            file,
            "test device",
            REGION_AT,
            size - REGION_AT - (1 << 20),
        )
        .expect("open the region")
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

    /// The keys that start with `prefix`, read behind the engine's back (close it first: a
    /// redb file has one owner).
    pub fn keys_with_prefix(&self, prefix: &[u8]) -> Vec<Vec<u8>> {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async {
            let store = self.store().await.unwrap();
            let mut txn = store.begin(false).await.unwrap();
            let end = crate::keys::prefix_end(prefix);
            let pairs = txn.scan(prefix, &end, usize::MAX).await.unwrap();
            pairs.into_iter().map(|(key, _)| key).collect()
        })
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
