//! Benchmarks that measure stagefs components against the limits of the hardware under them: a
//! crate of their own (the `stagefs-bench` binary, which `stagefs bench …` runs), so the FUSE
//! client's library carries none of them.
//!
//! `stagefs bench gateway` ([`gateway`]) measures a gateway it starts itself on a device file:
//! first the raw limits of that device ([`raw`]), then what the gateway makes of them over gRPC
//! ([`load`], [`rpc`]), the upload drain against direct object store PUTs, and crash recovery
//! ([`process`] owns the gateway process). [`report`] turns the figures into a table or JSON.
//!
//! Every fallible step returns [`BenchError`]; nothing here panics on bad input.

pub mod chart;
pub mod cluster;
pub mod fs;
pub mod gateway;
pub mod latency_proxy;
pub mod load;
pub mod meta;
pub mod mirror;
pub mod process;
pub mod raw;
pub mod report;
pub mod rpc;

use std::path::PathBuf;

/// Everything that can stop a benchmark run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("invalid arguments: {0}")]
    Args(String),
    #[error("{what} {path:?}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot find the gateway binary: {0}")]
    GatewayBinary(String),
    #[error("gateway: {0}")]
    Gateway(String),
    #[error("cannot connect to the gateway at {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: client::fs::FsError,
    },
    #[error("gateway RPC {rpc} failed: {code:?}: {message}")]
    Rpc {
        rpc: &'static str,
        code: tonic::Code,
        message: String,
    },
    #[error("object store {url}: {source}")]
    Store {
        url: String,
        #[source]
        source: object_store::Error,
    },
    #[error(transparent)]
    StoreUrl(#[from] shared::store::StoreUrlError),
    #[error(transparent)]
    Key(#[from] shared::KeyError),
    #[error("benchmark task failed: {0}")]
    Task(String),
    /// Starting or stopping a process (`stagefs-harness`).
    #[error(transparent)]
    Process(#[from] harness::HarnessError),
}

impl BenchError {
    pub(crate) fn io(what: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        BenchError::Io {
            what,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn rpc(rpc: &'static str, status: tonic::Status) -> Self {
        BenchError::Rpc {
            rpc,
            code: status.code(),
            message: status.message().to_string(),
        }
    }
}

impl From<tokio::task::JoinError> for BenchError {
    fn from(e: tokio::task::JoinError) -> Self {
        BenchError::Task(e.to_string())
    }
}

/// Progress lines go to stderr so that stdout carries only the result (table or JSON).
macro_rules! progress {
    ($($arg:tt)*) => {
        eprintln!("[bench] {}", format_args!($($arg)*))
    };
}
pub(crate) use progress;

/// A throwaway PostgreSQL server of the benchmark's own (fsync on), stopped when dropped.
pub(crate) async fn start_postgres() -> Result<::meta::pg_cluster::PgCluster, BenchError> {
    tokio::task::spawn_blocking(|| {
        ::meta::pg_cluster::PgCluster::start(::meta::pg_cluster::PgDurability::Durable)
    })
    .await?
    .map_err(|e| BenchError::Args(format!("cannot start PostgreSQL: {e}")))
}

/// Bytes per MiB, for throughput figures.
pub(crate) const MIB: f64 = 1024.0 * 1024.0;

/// Throughput in MiB/s; 0 when no time passed.
pub(crate) fn mib_per_s(bytes: u64, elapsed: std::time::Duration) -> f64 {
    let secs = elapsed.as_secs_f64();
    if secs > 0.0 {
        bytes as f64 / MIB / secs
    } else {
        0.0
    }
}

/// `a / b`, or `None` when `b` is not a positive number (the limit could not be measured).
pub(crate) fn ratio(a: f64, b: f64) -> Option<f64> {
    (b > 0.0 && a.is_finite() && b.is_finite()).then(|| a / b)
}

/// Latency percentile `q` in 0..=1 of `sorted` (ascending), nearest rank, in milliseconds; 0 when
/// there are no samples.
pub(crate) fn percentile_ms(sorted: &[std::time::Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((sorted.len() - 1) as f64 * q.clamp(0.0, 1.0)).round() as usize;
    sorted[rank.min(sorted.len() - 1)].as_secs_f64() * 1000.0
}

/// A benchmark's scratch directory: removed with its contents when dropped, unless kept.
pub(crate) struct ScratchDir {
    path: PathBuf,
    keep: bool,
}

impl ScratchDir {
    /// A new directory `<parent>/<prefix>-<random>`, removed on drop unless `keep`.
    pub(crate) fn create(
        parent: &std::path::Path,
        prefix: &str,
        keep: bool,
    ) -> Result<Self, BenchError> {
        for _ in 0..16 {
            let path = parent.join(format!("{prefix}-{:016x}", rand::random::<u64>()));
            match std::fs::create_dir(&path) {
                Ok(()) => return Ok(ScratchDir { path, keep }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(BenchError::io("cannot create temporary directory", path, e)),
            }
        }
        Err(BenchError::Task(format!(
            "cannot create a temporary directory in {parent:?}"
        )))
    }

    /// A directory the user chose: created if missing, never removed.
    pub(crate) fn existing(path: &std::path::Path) -> Result<Self, BenchError> {
        std::fs::create_dir_all(path).map_err(|e| BenchError::io("cannot create", path, e))?;
        let path = path
            .canonicalize()
            .map_err(|e| BenchError::io("cannot resolve", path, e))?;
        Ok(ScratchDir { path, keep: true })
    }

    pub(crate) fn path(&self) -> &std::path::Path {
        &self.path
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}
