//! `stagefs bench meta`: the metadata engine's rate of creates, lookups, getattrs and small-file
//! commits at 1, 16 and 64 concurrent clients, on redb and on PostgreSQL in one run, against the
//! limit of the same PostgreSQL server: single-row `INSERT` + commit at the same concurrency.
//!
//! The engine runs in process (no gRPC, no gateway), so the figures are the engine's and its
//! backend's. PostgreSQL is a throwaway server of its own with fsync on (Debian's `postgresql`,
//! started on a free port in a scratch directory); redb is a file on the same disk. Every client
//! works in a directory of its own, as a client of a shared file system mostly does: creates in
//! one directory all change that directory's attributes and serialize on it, on any database.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use meta::{
    CommitAttrs, FileKind, Ino, MetaConfig, MetaEngine, MetaLocation, NewNode, SessionId, Slice,
    ROOT_INO,
};
use serde::Serialize;

use super::{percentile_ms, progress, ratio, start_postgres, BenchError, ScratchDir};

pub const ABOUT: &str =
    "Measure the metadata engine (redb and PostgreSQL) against PostgreSQL's own insert+commit rate";

#[derive(Debug, Clone, clap::Args)]
pub struct MetaBenchArgs {
    /// Seconds each operation runs at each concurrency.
    #[arg(long, default_value_t = 3.0)]
    pub seconds: f64,
    /// Concurrent clients to measure at.
    #[arg(long, value_delimiter = ',', default_values_t = vec![1, 16, 64])]
    pub clients: Vec<usize>,
    /// One second per case (a smoke run).
    #[arg(long)]
    pub quick: bool,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Where the redb file goes (not tmpfs: its fsyncs are part of the figure).
    #[arg(long, default_value = "/var/tmp")]
    pub scratch: PathBuf,
    /// Keep the scratch directory.
    #[arg(long)]
    pub keep: bool,
    /// Backends to measure.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = vec![Backend::Redb, Backend::Region, Backend::RegionLazy, Backend::Postgres])]
    pub backends: Vec<Backend>,
}

/// Where a measured engine keeps its records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// redb in a file.
    Redb,
    /// redb in a region of a device file, opened O_DIRECT, as a gateway keeps its embedded
    /// metadata, every change durable before it returns (`serve --namespace-sync change`).
    Region,
    /// The same with namespace changes durable at the next sync (the gateway's default).
    RegionLazy,
    /// A throwaway PostgreSQL server (fsync on); also what the limit is measured on.
    Postgres,
}

impl Backend {
    /// Its name in the report.
    fn name(self) -> &'static str {
        match self {
            Backend::Redb => "redb",
            Backend::Region => "region",
            Backend::RegionLazy => "region-lazy",
            Backend::Postgres => "postgres",
        }
    }
}

/// The size of the device file a `region` case formats (its region is the whole file).
const REGION_BYTES: u64 = 256 << 20;

/// Opens redb in a region of a device file made at `path`, as a gateway opens its embedded
/// metadata.
async fn open_region(path: PathBuf, config: MetaConfig) -> Result<meta::KvMeta, BenchError> {
    let backend = tokio::task::spawn_blocking(move || -> Result<_, String> {
        let label = path.display().to_string();
        std::fs::File::create(&path)
            .and_then(|f| f.set_len(REGION_BYTES))
            .map_err(|e| format!("{label}: {e}"))?;
        let file = meta::redb_region::open_direct(&path).map_err(|e| format!("{label}: {e}"))?;
        meta::redb_region::format(&file, &label, 0, REGION_BYTES).map_err(|e| e.to_string())?;
        meta::redb_region::RegionBackend::open(file, &label, 0, REGION_BYTES)
            .map_err(|e| e.to_string())
    })
    .await?
    .map_err(|e| BenchError::Args(format!("region: {e}")))?;
    meta::open_region(backend, config)
        .await
        .map_err(|e| BenchError::Args(format!("region: {e}")))
}

/// One measured case.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Rate {
    pub ops_per_sec: f64,
    /// Transactions run again after a conflict, per operation (engine cases only).
    pub retries_per_op: f64,
    /// Operations that failed (after the engine's retries), not counted in the rate.
    pub failed: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub ops: u64,
}

/// Everything `bench meta` measured; `--json` prints it.
#[derive(Debug, Clone, Serialize)]
pub struct MetaReport {
    pub seconds_per_case: f64,
    /// PostgreSQL's single-row insert+commit, by client count.
    pub limit: BTreeMap<usize, Rate>,
    /// backend -> operation -> client count -> rate.
    pub engines: BTreeMap<String, BTreeMap<String, BTreeMap<usize, Rate>>>,
    /// PostgreSQL creates ÷ the limit, by client count (aim: ≥ 0.5).
    pub create_ratio_postgres: BTreeMap<usize, f64>,
}

const OPS: [&str; 4] = ["create", "lookup", "getattr", "small_file_commit"];

pub async fn run(args: MetaBenchArgs) -> Result<MetaReport, BenchError> {
    let seconds = if args.quick { 1.0 } else { args.seconds };
    let case = Duration::from_secs_f64(seconds.max(0.1));
    if args.clients.is_empty() || args.clients.contains(&0) {
        return Err(BenchError::Args(
            "--clients must list counts above 0".into(),
        ));
    }
    let scratch = ScratchDir::create(&args.scratch, "stagefs-bench-meta", args.keep)?;
    let mut report = MetaReport {
        seconds_per_case: case.as_secs_f64(),
        limit: BTreeMap::new(),
        engines: BTreeMap::new(),
        create_ratio_postgres: BTreeMap::new(),
    };
    // The limit is PostgreSQL's, so a run without the postgres backend starts no server.
    let cluster = if args.backends.contains(&Backend::Postgres) {
        progress!("starting a PostgreSQL server (fsync on)");
        let cluster = start_postgres().await?;
        let limit_db = cluster
            .fresh_database("limit")
            .map_err(|e| BenchError::Args(format!("PostgreSQL: {e}")))?;
        for &clients in &args.clients {
            progress!("limit: single-row insert+commit, {clients} clients");
            report
                .limit
                .insert(clients, insert_limit(&limit_db, clients, case).await?);
        }
        Some(cluster)
    } else {
        None
    };
    for &backend in &args.backends {
        let name = backend.name();
        for &clients in &args.clients {
            // A fresh database per client count, so every case starts from the same size.
            let path = scratch.path().join(format!("{name}-{clients}"));
            let failed = |e: meta::MetaError| BenchError::Args(format!("{name}: {e}"));
            let kv = Arc::new(match backend {
                Backend::Redb => meta::open(&MetaLocation::Redb(path), MetaConfig::default())
                    .await
                    .map_err(failed)?,
                Backend::Region | Backend::RegionLazy => {
                    let config = MetaConfig {
                        lazy_namespace: backend == Backend::RegionLazy,
                        ..MetaConfig::default()
                    };
                    open_region(path, config).await?
                }
                Backend::Postgres => {
                    let url = cluster
                        .as_ref()
                        .ok_or_else(|| BenchError::Args("no PostgreSQL server".into()))?
                        .fresh_database(&format!("engine_{}_{clients}", name.replace('-', "_")))
                        .map_err(|e| BenchError::Args(format!("PostgreSQL: {e}")))?;
                    meta::open(&MetaLocation::Postgres(url), MetaConfig::default())
                        .await
                        .map_err(failed)?
                }
            });
            let engine: Arc<dyn MetaEngine> = kv.clone();
            let dirs = client_dirs(&engine, clients).await?;
            for op in OPS {
                progress!("{name}: {op}, {clients} clients");
                let conflicts = kv.conflicts();
                let mut rate = measure(&engine, op, &dirs, case).await?;
                rate.retries_per_op =
                    (kv.conflicts() - conflicts) as f64 / (rate.ops.max(1)) as f64;
                report
                    .engines
                    .entry(name.into())
                    .or_default()
                    .entry(op.into())
                    .or_default()
                    .insert(clients, rate);
            }
        }
    }
    for (&clients, limit) in &report.limit {
        if let Some(create) = report
            .engines
            .get("postgres")
            .and_then(|ops| ops.get("create"))
            .and_then(|by| by.get(&clients))
        {
            if let Some(r) = ratio(create.ops_per_sec, limit.ops_per_sec) {
                report.create_ratio_postgres.insert(clients, r);
            }
        }
    }
    if let Some(cluster) = cluster {
        cluster.stop();
    }
    Ok(report)
}

fn file() -> NewNode {
    NewNode {
        kind: FileKind::File,
        mode: 0o644,
        uid: 1000,
        gid: 1000,
        rdev: 0,
    }
}

/// A directory per client, and its session.
async fn client_dirs(
    engine: &Arc<dyn MetaEngine>,
    clients: usize,
) -> Result<Vec<(Ino, SessionId)>, BenchError> {
    let mut dirs = Vec::with_capacity(clients);
    for c in 0..clients {
        let dir = engine
            .mkdir(
                ROOT_INO,
                format!("client-{c}").as_bytes(),
                0o755,
                1000,
                1000,
            )
            .await
            .map_err(|e| BenchError::Task(format!("mkdir: {e}")))?;
        let session = engine
            .open_session("", &format!("bench client {c}"))
            .await
            .map_err(|e| BenchError::Task(format!("open_session: {e}")))?;
        dirs.push((dir.ino, session));
    }
    Ok(dirs)
}

/// Runs `op` from every client for `case`, and the rate and latencies of all of them.
async fn measure(
    engine: &Arc<dyn MetaEngine>,
    op: &'static str,
    dirs: &[(Ino, SessionId)],
    case: Duration,
) -> Result<Rate, BenchError> {
    let started = Instant::now();
    let tasks: Vec<_> = dirs
        .iter()
        .enumerate()
        .map(|(c, &(dir, session))| {
            let engine = engine.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut failed = 0u64;
                // Lookups and getattrs need files; small-file commits need one file.
                let prepared = engine
                    .mknod(dir, format!("{op}-target").as_bytes(), &file())
                    .await
                    .map_err(|e| format!("client {c}: prepare: {e}"))?;
                let mut n = 0u64;
                let mut ids = 0..0;
                while started.elapsed() < case {
                    n += 1;
                    let t = Instant::now();
                    let outcome = match op {
                        "create" => engine
                            .mknod(dir, format!("f{n}").as_bytes(), &file())
                            .await
                            .map(|_| ()),
                        "lookup" => engine
                            .lookup(dir, format!("{op}-target").as_bytes())
                            .await
                            .map(|_| ()),
                        "getattr" => engine.getattr(prepared.ino).await.map(|_| ()),
                        _ => small_file_commit(&engine, session, prepared.ino, n, &mut ids).await,
                    };
                    match outcome {
                        Ok(()) => latencies.push(t.elapsed()),
                        // Counted, and the first one told: a benchmark reports what happens.
                        Err(e) => {
                            if failed == 0 {
                                progress!("client {c}: {op} failed: {e}");
                            }
                            failed += 1;
                        }
                    }
                }
                Ok::<_, String>((latencies, failed))
            })
        })
        .collect();
    let (mut latencies, mut failed) = (Vec::new(), 0);
    for task in tasks {
        let (done, errors) = task.await?.map_err(BenchError::Task)?;
        latencies.extend(done);
        failed += errors;
    }
    let elapsed = started.elapsed();
    latencies.sort();
    Ok(Rate {
        ops_per_sec: latencies.len() as f64 / elapsed.as_secs_f64(),
        retries_per_op: 0.0,
        failed,
        p50_ms: percentile_ms(&latencies, 0.5),
        p99_ms: percentile_ms(&latencies, 0.99),
        ops: latencies.len() as u64,
    })
}

/// Slice ids a small-file commit's client takes at once, as a mount does (`slice_id_batch`).
const SLICE_ID_BATCH: u64 = 64;

/// What a small file costs the engine around its staged block, as a mount and `WriteSlice` make
/// the calls: a slice id (from the client's batch), the check that it is the session's to
/// stage, and the commit (which takes its lease).
async fn small_file_commit(
    engine: &Arc<dyn MetaEngine>,
    session: SessionId,
    ino: Ino,
    n: u64,
    ids: &mut std::ops::Range<u64>,
) -> meta::Result<()> {
    if ids.is_empty() {
        *ids = engine.allocate_slice_ids(session, SLICE_ID_BATCH).await?;
    }
    let id = ids.next().expect("a fresh batch of slice ids is not empty");
    let slice = Slice {
        slice_id: id,
        offset_in_chunk: 0,
        len: 4096,
        gateway_id: [1; 16],
    };
    // A chunk of its own, as a small file's one slice has: piled into one chunk, every commit
    // rewrote a list of up to thousands of slices, which no small file makes.
    engine.check_slice_write(session, ino, &slice).await?;
    engine
        .commit_written_slice(session, ino, n, &slice, 0, &CommitAttrs::at(0))
        .await?;
    Ok(())
}

/// The server's own rate of single-row insert+commit (autocommit) from `clients` connections.
async fn insert_limit(url: &str, clients: usize, case: Duration) -> Result<Rate, BenchError> {
    let connect = || async {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .map_err(|e| BenchError::Task(format!("PostgreSQL: {e}")))?;
        tokio::spawn(connection);
        Ok::<_, BenchError>(client)
    };
    connect()
        .await?
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS insert_limit (id BIGSERIAL PRIMARY KEY, v BYTEA NOT NULL)",
        )
        .await
        .map_err(|e| BenchError::Task(format!("PostgreSQL: {e}")))?;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let client = connect().await?;
        tasks.push(tokio::spawn(async move {
            let statement = client
                .prepare("INSERT INTO insert_limit (v) VALUES ($1)")
                .await
                .map_err(|e| e.to_string())?;
            let value = vec![7u8; 100];
            let mut latencies = Vec::new();
            while started.elapsed() < case {
                let t = Instant::now();
                client
                    .execute(&statement, &[&value])
                    .await
                    .map_err(|e| e.to_string())?;
                latencies.push(t.elapsed());
            }
            Ok::<_, String>(latencies)
        }));
    }
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await?.map_err(BenchError::Task)?);
    }
    let elapsed = started.elapsed();
    latencies.sort();
    Ok(Rate {
        ops_per_sec: latencies.len() as f64 / elapsed.as_secs_f64(),
        retries_per_op: 0.0,
        failed: 0,
        p50_ms: percentile_ms(&latencies, 0.5),
        p99_ms: percentile_ms(&latencies, 0.99),
        ops: latencies.len() as u64,
    })
}

impl MetaReport {
    /// The report as a table: one row per backend, operation and client count.
    pub fn table(&self) -> String {
        let mut out = format!(
            "stagefs metadata benchmark: {:.1} s per case, engine in process, PostgreSQL with fsync on\n\n",
            self.seconds_per_case
        );
        out += &format!(
            "{:<13} {:<18} {:>7} {:>12} {:>9} {:>9} {:>9} {:>7} {:>16}\n",
            "backend",
            "operation",
            "clients",
            "ops/s",
            "p50 ms",
            "p99 ms",
            "retries",
            "failed",
            "vs limit"
        );
        for (&clients, rate) in &self.limit {
            out += &format!(
                "{:<13} {:<18} {:>7} {:>12.0} {:>9.2} {:>9.2} {:>14}\n",
                "postgres",
                "insert (limit)",
                clients,
                rate.ops_per_sec,
                rate.p50_ms,
                rate.p99_ms,
                "1.00"
            );
        }
        for (backend, ops) in &self.engines {
            for op in OPS {
                let Some(by_clients) = ops.get(op) else {
                    continue;
                };
                for (&clients, rate) in by_clients {
                    let versus = self
                        .limit
                        .get(&clients)
                        .and_then(|limit| ratio(rate.ops_per_sec, limit.ops_per_sec))
                        .map_or("-".to_string(), |r| format!("{r:.2}"));
                    let target = if backend == "postgres" && op == "create" {
                        let met = self
                            .create_ratio_postgres
                            .get(&clients)
                            .is_some_and(|r| *r >= 0.5);
                        if met {
                            " (>=0.5 ok)"
                        } else {
                            " (>=0.5 BELOW)"
                        }
                    } else {
                        ""
                    };
                    out += &format!(
                        "{:<13} {:<18} {:>7} {:>12.0} {:>9.2} {:>9.2} {:>9.2} {:>7} {:>16}\n",
                        backend,
                        op,
                        clients,
                        rate.ops_per_sec,
                        rate.p50_ms,
                        rate.p99_ms,
                        rate.retries_per_op,
                        rate.failed,
                        format!("{versus}{target}")
                    );
                }
            }
        }
        out
    }
}
