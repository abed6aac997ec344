//! `stagefs bench gateway`: how close a gateway gets to the limits of its device and store.
//!
//! The benchmark owns everything it measures. It measures the raw device file first, then starts
//! `stagefs-gateway` on that same file (formatting it), drives it over gRPC, crashes and restarts
//! it to time recovery, and finally stops it with SIGTERM. Phases, in order:
//!
//! 1. raw: sequential `O_DIRECT` write MiB/s (best of 1 and 4 writers) and the `fdatasync` rate;
//! 2. start the gateway with uploads paused;
//! 3. ingest: 4 MiB blocks from 1, 4 and 16 writers (shared connection and connection per writer,
//!    the faster counts); the blocks are deleted after each case so the log can reclaim them;
//! 4. group commit: 64 writers of 4 KiB blocks for a few seconds: blocks/s and ack latency;
//! 5. drain: stage blocks, resume uploads, time `Drain`; then time the same PUTs made directly
//!    with object_store against the same store;
//! 6. recovery: stage blocks, SIGKILL, restart, time until `Status` answers;
//! 7. SIGTERM.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use object_store::path::Path as StorePath;
use object_store::{ObjectStore, PutOptions, PutPayload};
use shared::size::{format_size, parse_size};
use shared::store::{open_store, S3Options};
use tokio::task::JoinSet;

use super::load::{self, ChannelMode, SliceIds, Stop, Transport};
use super::process::{find_gateway_bin, log_tail, GatewayProcess, GatewaySpec};
use super::report::Report;
use super::rpc::{self, Client, Payload};
use super::{mib_per_s, progress, ratio, BenchError};
use client::fs::GatewayAccess;

const MIB: u64 = 1024 * 1024;
const GIB: u64 = 1024 * MIB;
/// Size of the blocks of the throughput phases: a full stagefs block.
const BLOCK_BYTES: u64 = shared::BLOCK_SIZE;
/// Size of the blocks of the group commit phase.
const SMALL_BLOCK_BYTES: usize = 4096;
const GROUP_COMMIT_WRITERS: usize = 64;
/// Writers used to stage data for the drain and recovery phases.
const STAGE_WRITERS: usize = 16;
const READY_TIMEOUT: Duration = Duration::from_secs(120);
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(900);
const DRAIN_TIMEOUT: Duration = Duration::from_secs(3600);
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// One-line help of `stagefs bench gateway`.
pub const ABOUT: &str =
    "Benchmark a gateway (started by the benchmark on a device file it owns) against the raw \
     device and object store limits";

/// Full help of `stagefs bench gateway`.
pub const LONG_ABOUT: &str = "\
Measures a stagefs gateway against the limits of the device and the object store under it.

The benchmark OWNS its gateway and its device. It writes --device PATH (a file: created if
missing, OVERWRITTEN, preallocated to --device-size; or a block device) directly first, to measure
the raw O_DIRECT sequential write MiB/s and fdatasync rate. Then it starts its own gateway on the
same file (formatting it):

  stagefs-gateway serve --device PATH --device-size SIZE --format --store URL --listen ADDR
      --upload-concurrency N --uploads-paused [--io-engine E] [--s3-endpoint ...]

(the binary next to `stagefs`, else on PATH, or --gateway-bin), reads the address from its
`listening on ADDR` line and drives it over gRPC:

  ingest        4 MiB blocks from 1, 4 and 16 writers (one shared connection, then one connection
                per writer; the faster counts). ingest_ratio_N = MiB/s / raw sequential MiB/s.
  group commit  64 writers of 4 KiB blocks: blocks/s, ack latency p50/p99.
                group_commit_ratio = blocks/s / raw fdatasync rate.
  drain         stage blocks with uploads paused, resume uploads, time Drain; then PUT the same
                amount directly to the same store with --upload-concurrency writers.
                drain_ratio = drain MiB/s / direct store PUT MiB/s.
  recovery      stage --recovery-bytes, SIGKILL the gateway, restart it (same arguments, without
                --format) and time from spawn until Status answers (recovery_s); also reports the
                gateway's own recovery_ms and recovered_blocks.

Finally the gateway is stopped with SIGTERM. The device file is left in place (delete it
yourself, or use scripts/bench-gateway.sh).

Targets: ingest_ratio_16 >= 0.6, group_commit_ratio >= 5, drain_ratio >= 0.8.

Output: progress on stderr; on stdout a table, or with --json exactly one JSON object. The
gateway's stderr goes to a log in a temporary directory; its tail is printed if the run fails.
S3 credentials come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (and the other AWS_*
variables), which the gateway inherits.";

/// Which I/O backend the gateway uses for its device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum IoEngine {
    /// io_uring (tokio-uring on a dedicated thread).
    Uring,
    /// pread/pwrite + fdatasync on a thread pool.
    Psync,
}

impl IoEngine {
    fn as_str(self) -> &'static str {
        match self {
            IoEngine::Uring => "uring",
            IoEngine::Psync => "psync",
        }
    }
}

/// Arguments of `stagefs bench gateway`.
#[derive(Debug, Clone, clap::Args)]
pub struct GatewayBenchArgs {
    /// Device the benchmark owns: a file (created if missing, OVERWRITTEN and preallocated to
    /// --device-size) or a block device. Must support O_DIRECT (not tmpfs).
    #[arg(long, value_name = "PATH")]
    pub device: PathBuf,

    /// Address the benchmark's gateway listens on; port 0 picks a free port.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:0")]
    pub gateway: String,

    /// Object store the gateway drains to (file:///dir, s3://bucket[/prefix]) [default:
    /// file://<temporary directory>, removed afterwards].
    #[arg(long, value_name = "URL")]
    pub store: Option<String>,

    /// The stagefs-gateway binary [default: next to this executable, else on PATH].
    #[arg(long, value_name = "PATH")]
    pub gateway_bin: Option<PathBuf>,

    /// Size of the device (the file is preallocated to it and the gateway formats it).
    #[arg(long, value_name = "SIZE", default_value = "4GiB", value_parser = parse_size)]
    pub device_size: u64,

    /// Upload workers of the gateway; also the concurrency of the direct store PUT baseline.
    #[arg(long, value_name = "N", default_value_t = 8)]
    pub upload_concurrency: usize,

    /// Data staged before the crash of the recovery phase [default: 2GiB, 256MiB with --quick].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub recovery_bytes: Option<u64>,

    /// I/O backend of the gateway [default: the gateway's own default].
    #[arg(long, value_enum, value_name = "ENGINE")]
    pub io_engine: Option<IoEngine>,

    /// Print exactly one JSON object on stdout instead of the table.
    #[arg(long)]
    pub json: bool,

    /// Smaller amounts of data (256 MiB per case instead of 1 GiB) and shorter timed phases.
    #[arg(long)]
    pub quick: bool,

    /// For s3:// stores; the gateway is given the same.
    #[command(flatten)]
    pub s3: S3Options,
}

/// Amounts and durations of one run, derived from the arguments.
#[derive(Debug, Clone)]
struct Plan {
    raw_seq_bytes: u64,
    fsync_duration: Duration,
    ingest_bytes: u64,
    group_commit_duration: Duration,
    /// Cap on group commit blocks so they fit the log with uploads paused.
    group_commit_max_blocks: u64,
    drain_bytes: u64,
    recovery_bytes: u64,
    notes: Vec<String>,
}

fn round_blocks(bytes: u64) -> u64 {
    (bytes / BLOCK_BYTES * BLOCK_BYTES).max(BLOCK_BYTES)
}

impl Plan {
    fn new(args: &GatewayBenchArgs) -> Result<Self, BenchError> {
        let size = args.device_size;
        if size < 256 * MIB {
            return Err(BenchError::Args(format!(
                "--device-size {} is too small: the benchmark needs at least 256MiB",
                format_size(size)
            )));
        }
        if !size.is_multiple_of(super::raw::ALIGN as u64) {
            return Err(BenchError::Args(format!(
                "--device-size {size} is not a multiple of 4096"
            )));
        }
        if args.upload_concurrency == 0 {
            return Err(BenchError::Args(
                "--upload-concurrency must be at least 1".into(),
            ));
        }
        let mut notes = Vec::new();
        // Uploads stay paused while a case runs, so each case must fit in the log at once.
        let half = round_blocks(size / 2);
        let fit = |wanted: u64, what: &str, notes: &mut Vec<String>| {
            if wanted > half {
                notes.push(format!(
                    "{what} reduced from {} to {} to fit --device-size {}",
                    format_size(wanted),
                    format_size(half),
                    format_size(size)
                ));
                half
            } else {
                wanted
            }
        };
        let (case, drain, recovery_default) = if args.quick {
            (256 * MIB, 128 * MIB, 256 * MIB)
        } else {
            (GIB, 512 * MIB, 2 * GIB)
        };
        let raw_seq_bytes = round_blocks(case.min(size));
        let ingest_bytes = fit(case, "ingest data per case", &mut notes);
        let drain_bytes = fit(drain, "drain data", &mut notes);
        let max_recovery = round_blocks(size / 4 * 3);
        let recovery_bytes = match args.recovery_bytes {
            Some(bytes) if bytes > max_recovery => {
                return Err(BenchError::Args(format!(
                    "--recovery-bytes {} must be at most 3/4 of --device-size ({})",
                    format_size(bytes),
                    format_size(max_recovery)
                )));
            }
            Some(bytes) => round_blocks(bytes),
            None if recovery_default > max_recovery => {
                notes.push(format!(
                    "recovery data reduced from {} to {} to fit --device-size {}",
                    format_size(recovery_default),
                    format_size(max_recovery),
                    format_size(size)
                ));
                max_recovery
            }
            None => recovery_default,
        };
        Ok(Plan {
            raw_seq_bytes,
            fsync_duration: Duration::from_secs(if args.quick { 2 } else { 3 }),
            ingest_bytes,
            group_commit_duration: Duration::from_secs(if args.quick { 3 } else { 5 }),
            // A small block takes at most two alignment units in the log (header + data).
            group_commit_max_blocks: half / (2 * SMALL_BLOCK_BYTES as u64),
            drain_bytes,
            recovery_bytes,
            notes,
        })
    }
}

/// Runs the whole benchmark and returns its figures.
pub async fn run(args: GatewayBenchArgs) -> Result<Report, BenchError> {
    let plan = Plan::new(&args)?;
    for note in &plan.notes {
        progress!("note: {note}");
    }
    let bin = find_gateway_bin(args.gateway_bin.as_deref())?;
    // A private temporary directory for the default store and the gateway log.
    let workdir = super::ScratchDir::create(&std::env::temp_dir(), "stagefs-bench", false)?;
    let store = match &args.store {
        Some(url) => url.clone(),
        None => format!("file://{}", workdir.path().join("store").display()),
    };
    // Catch a bad store URL before minutes of raw measurements (opening does no I/O for S3).
    open_store(&store, &args.s3)?;
    let spec = GatewaySpec {
        bin,
        device: args.device.clone(),
        device_size: args.device_size,
        store: store.clone(),
        listen: args.gateway.clone(),
        upload_concurrency: args.upload_concurrency,
        io_engine: args.io_engine.map(|e| e.as_str().to_string()),
        s3: args.s3.clone(),
        uploads_paused: true,
        env: Vec::new(),
        extra: Vec::new(),
        log: workdir.path().join("gateway.log"),
    };
    let mut report = Report {
        device: args.device.display().to_string(),
        device_size: args.device_size,
        store,
        io_engine: args
            .io_engine
            .map(|e| e.as_str().to_string())
            .unwrap_or_default(),
        quick: args.quick,
        upload_concurrency: args.upload_concurrency,
        group_commit_writers: GROUP_COMMIT_WRITERS,
        ..Default::default()
    };
    report.warnings.extend(plan.notes.iter().cloned());
    let bench = Bench {
        args: &args,
        plan: &plan,
        spec: &spec,
        ids: Arc::new(SliceIds::new()),
        access: GatewayAccess::default(),
        workdir: workdir.path(),
    };
    // On Ctrl-C, return normally so the gateway is killed and the temporary directory removed.
    let result = tokio::select! {
        result = bench.phases(&mut report) => result,
        _ = tokio::signal::ctrl_c() => Err(BenchError::Task("interrupted".into())),
    };
    if let Err(e) = &result {
        progress!("failed: {e}");
        if spec.log.exists() {
            progress!(
                "last lines of the gateway log {}:\n{}",
                spec.log.display(),
                log_tail(&spec.log, 40)
            );
        }
    }
    result.map(|()| report)
}

struct Bench<'a> {
    args: &'a GatewayBenchArgs,
    plan: &'a Plan,
    spec: &'a GatewaySpec,
    ids: Arc<SliceIds>,
    /// What the clients present: nothing, but for the secure phase.
    access: GatewayAccess,
    /// The benchmark's private directory (certificates and tokens of the secure phase).
    workdir: &'a std::path::Path,
}

impl Bench<'_> {
    /// `writers` writers (connected as `mode` says, presenting this bench's access) writing
    /// `payload` blocks under fresh keys until `stop`.
    async fn load(
        &self,
        addr: std::net::SocketAddr,
        (writers, mode): (usize, ChannelMode),
        payload: Payload,
        stop: Stop,
        transport: Transport,
    ) -> Result<load::LoadResult, BenchError> {
        let clients = load::clients(addr, &self.access, writers, mode).await?;
        load::run(clients, self.ids.clone(), payload, stop, transport).await
    }

    async fn phases(&self, report: &mut Report) -> Result<(), BenchError> {
        self.raw(report).await?;

        progress!("starting gateway: {}", self.spec.display(true));
        let gateway = GatewayProcess::start(self.spec, true, READY_TIMEOUT).await?;
        progress!(
            "gateway pid {} listening on {}",
            gateway.pid(),
            gateway.addr
        );
        let mut control = rpc::connect(gateway.addr, &self.access).await?;
        let status = rpc::status(&mut control).await?;
        report.io_engine = status.io_engine.clone();
        if !status.uploads_paused {
            report
                .warnings
                .push("gateway started with --uploads-paused reports uploads_paused=false".into());
            rpc::set_uploads_paused(&mut control, true).await?;
        }

        self.ingest(gateway.addr, &mut control, report).await?;
        self.group_commit(gateway.addr, &mut control, report)
            .await?;
        let drained_keys = self.drain(gateway.addr, &mut control, report).await?;
        self.store_put(report).await?;
        let gateway = self.recovery(gateway, report).await?;

        progress!("stopping gateway pid {} with SIGTERM", gateway.pid());
        let exit = gateway.terminate(STOP_TIMEOUT).await?;
        if !exit.success() {
            report
                .warnings
                .push(format!("gateway exited with {exit} after SIGTERM"));
        }
        if self.args.store.is_some() {
            self.remove_objects("drained blocks", drained_keys).await;
        }
        self.secure(report).await
    }

    /// Phase: the same 4-writer ingest against a gateway serving TLS with tokens, to show what
    /// they cost (the plain figure is `ingest_per_writer_mib_s_4` of this run).
    async fn secure(&self, report: &mut Report) -> Result<(), BenchError> {
        let (extra, access) = match secure_setup(self.workdir) {
            Ok(setup) => setup,
            Err(why) => {
                progress!("secure: skipped: {why}");
                report.warnings.push(format!("secure phase skipped: {why}"));
                return Ok(());
            }
        };
        let spec = GatewaySpec {
            extra,
            ..self.spec.clone()
        };
        progress!("secure: starting gateway: {}", spec.display(false));
        let gateway = GatewayProcess::start(&spec, false, READY_TIMEOUT).await?;
        let secure = Bench {
            access,
            ids: self.ids.clone(),
            ..*self
        };
        let mut control = rpc::connect(gateway.addr, &secure.access).await?;
        let payload = Payload::random(BLOCK_BYTES as usize);
        let blocks = self.plan.ingest_bytes / BLOCK_BYTES;
        let result = secure
            .load(
                gateway.addr,
                (4, ChannelMode::PerWriter),
                payload,
                Stop::blocks(blocks),
                Transport::Rpc,
            )
            .await?;
        let mib_s = result.mib_per_s();
        progress!(
            "secure: 4 writer(s), per-writer, TLS and tokens, {}: {mib_s:.1} MiB/s (plain {:.1} MiB/s)",
            format_size(result.bytes),
            report.ingest_per_writer_mib_s_4
        );
        report.ingest_secure_mib_s_4 = mib_s;
        report.ingest_secure_ratio_4 = ratio(mib_s, report.ingest_per_writer_mib_s_4);
        // Only its own blocks: the ones the recovery phase left staged are still there.
        rpc::delete_blocks(&mut control, &result.keys).await?;
        let exit = gateway.terminate(STOP_TIMEOUT).await?;
        if !exit.success() {
            report
                .warnings
                .push(format!("secure gateway exited with {exit} after SIGTERM"));
        }
        Ok(())
    }

    /// Phase 1: raw device limits, before the gateway owns the device.
    async fn raw(&self, report: &mut Report) -> Result<(), BenchError> {
        let path = self.args.device.clone();
        let size = self.args.device_size;
        progress!(
            "raw: preallocating {} ({})",
            path.display(),
            format_size(size)
        );
        let p = path.clone();
        tokio::task::spawn_blocking(move || super::raw::prepare_device(&p, size)).await??;

        let bytes = self.plan.raw_seq_bytes;
        report.raw_seq_write_bytes = bytes;
        for writers in [1usize, 4] {
            let p = path.clone();
            let mib_s = tokio::task::spawn_blocking(move || {
                super::raw::seq_write(&p, bytes, writers, false)
            })
            .await??;
            progress!(
                "raw: sequential O_DIRECT write, {writers} writer(s), {}: {mib_s:.1} MiB/s",
                format_size(bytes)
            );
            if writers == 1 {
                report.raw_seq_write_mib_s_1 = mib_s;
            } else {
                report.raw_seq_write_mib_s_4 = mib_s;
            }
            if mib_s > report.raw_seq_write_mib_s {
                report.raw_seq_write_mib_s = mib_s;
                report.raw_seq_write_writers = writers;
            }
        }

        let duration = self.plan.fsync_duration;
        let p = path.clone();
        let rate = tokio::task::spawn_blocking(move || super::raw::fsync_rate(&p, size, duration))
            .await??;
        progress!("raw: 4 KiB O_DIRECT write + fdatasync for {duration:?}: {rate:.0}/s");
        report.raw_fsync_per_s = rate;
        // Measured after the fsync rate: a flush right after a burst of writes pays for the
        // burst, which would understate the fsync rate.
        // What durable acknowledgements cost on this device with no gateway at all: 16 writers,
        // each write of 4 MiB followed by its own fdatasync.
        let p = path.clone();
        let mib_s = tokio::task::spawn_blocking(move || super::raw::seq_write(&p, bytes, 16, true))
            .await??;
        progress!(
            "raw: O_DIRECT 4 MiB write + fdatasync each, 16 writers, {}: {mib_s:.1} MiB/s",
            format_size(bytes)
        );
        report.raw_durable_write_mib_s_16 = mib_s;

        Ok(())
    }

    /// Phase 3: 4 MiB block throughput from 1, 4 and 16 writers.
    async fn ingest(
        &self,
        addr: std::net::SocketAddr,
        control: &mut Client,
        report: &mut Report,
    ) -> Result<(), BenchError> {
        let payload = Payload::random(BLOCK_BYTES as usize);
        let blocks = self.plan.ingest_bytes / BLOCK_BYTES;
        report.ingest_case_bytes = self.plan.ingest_bytes;
        for writers in [1usize, 4, 16] {
            let modes: &[ChannelMode] = if writers == 1 {
                &[ChannelMode::Shared]
            } else {
                &[ChannelMode::Shared, ChannelMode::PerWriter]
            };
            let mut best: Option<(f64, ChannelMode)> = None;
            for &mode in modes {
                let before = rpc::status(control).await?;
                let result = self
                    .load(
                        addr,
                        (writers, mode),
                        payload.clone(),
                        Stop::blocks(blocks),
                        Transport::Rpc,
                    )
                    .await?;
                let mib_s = result.mib_per_s();
                progress!(
                    "ingest: {writers} writer(s), {mode}, {}: {mib_s:.1} MiB/s (ack p50 {:.1} ms, p99 {:.1} ms)",
                    format_size(result.bytes),
                    result.latency_ms(0.5),
                    result.latency_ms(0.99)
                );
                let after = rpc::status(control).await?;
                progress!(
                    "ingest: {writers} writer(s), {mode}: {}",
                    describe_syncs(&before, &after)
                );
                match (writers, mode) {
                    (4, ChannelMode::Shared) => report.ingest_shared_mib_s_4 = mib_s,
                    (4, ChannelMode::PerWriter) => report.ingest_per_writer_mib_s_4 = mib_s,
                    (16, ChannelMode::Shared) => report.ingest_shared_mib_s_16 = mib_s,
                    (16, ChannelMode::PerWriter) => report.ingest_per_writer_mib_s_16 = mib_s,
                    _ => {}
                }
                if best.is_none_or(|(b, _)| mib_s > b) {
                    best = Some((mib_s, mode));
                }
                self.release(control, &result.keys, report).await?;
            }
            let (mib_s, mode) = best.unwrap_or((0.0, ChannelMode::Shared));
            let r = ratio(mib_s, report.raw_seq_write_mib_s);
            match writers {
                1 => {
                    (
                        report.ingest_mib_s_1,
                        report.ingest_mode_1,
                        report.ingest_ratio_1,
                    ) = (mib_s, Some(mode), r)
                }
                4 => {
                    (
                        report.ingest_mib_s_4,
                        report.ingest_mode_4,
                        report.ingest_ratio_4,
                    ) = (mib_s, Some(mode), r)
                }
                _ => {
                    (
                        report.ingest_mib_s_16,
                        report.ingest_mode_16,
                        report.ingest_ratio_16,
                    ) = (mib_s, Some(mode), r);
                    report.ingest_durable_ratio_16 =
                        ratio(mib_s, report.raw_durable_write_mib_s_16);
                }
            }
        }
        Ok(())
    }

    /// The connection mode that won the 16-writer ingest case.
    fn best_mode(report: &Report) -> ChannelMode {
        report.ingest_mode_16.unwrap_or(ChannelMode::Shared)
    }

    /// Deletes staged blocks and waits (briefly) until the gateway no longer counts them staged.
    async fn release(
        &self,
        control: &mut Client,
        keys: &[String],
        report: &mut Report,
    ) -> Result<(), BenchError> {
        let dropped = rpc::delete_blocks(control, keys).await?;
        if dropped != keys.len() as u64 {
            report.warnings.push(format!(
                "DeleteBlocks dropped {dropped} of {} staged (uploads paused) blocks",
                keys.len()
            ));
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let status = rpc::status(control).await?;
            if status.blocks_staged == 0 {
                return Ok(());
            }
            if Instant::now() >= deadline {
                report.warnings.push(format!(
                    "{} blocks still staged 10 s after deleting every staged block",
                    status.blocks_staged
                ));
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Phase 4: many writers of small blocks, which only group commit can keep fast.
    async fn group_commit(
        &self,
        addr: std::net::SocketAddr,
        control: &mut Client,
        report: &mut Report,
    ) -> Result<(), BenchError> {
        let mode = Self::best_mode(report);
        let duration = self.plan.group_commit_duration;
        progress!(
            "group commit: {GROUP_COMMIT_WRITERS} writers of 4 KiB blocks for {duration:?}, {mode}"
        );
        let payload = Payload::random(SMALL_BLOCK_BYTES);
        // Both ways a client can send small blocks; the faster one is the figure, both are kept.
        let mut best: Option<(Transport, load::LoadResult)> = None;
        for transport in [Transport::Rpc, Transport::Stream] {
            let before = rpc::status(control).await?;
            let result = self
                .load(
                    addr,
                    (GROUP_COMMIT_WRITERS, mode),
                    payload.clone(),
                    Stop::after(duration).or_blocks(self.plan.group_commit_max_blocks),
                    transport,
                )
                .await?;
            progress!(
                "group commit, {transport}: {} blocks, {:.0} blocks/s, ack p50 {:.2} ms, p99 {:.2} ms",
                result.blocks,
                result.blocks_per_s(),
                result.latency_ms(0.5),
                result.latency_ms(0.99)
            );
            let after = rpc::status(control).await?;
            progress!(
                "group commit, {transport}: {}",
                describe_syncs(&before, &after)
            );
            match transport {
                Transport::Rpc => report.group_commit_rpc_blocks_per_s = result.blocks_per_s(),
                Transport::Stream => {
                    report.group_commit_stream_blocks_per_s = result.blocks_per_s()
                }
            }
            if result.blocks >= self.plan.group_commit_max_blocks {
                report.warnings.push(format!(
                    "group commit ({transport}) stopped after {} blocks ({:.1} s) so that the log does not fill",
                    result.blocks,
                    result.elapsed.as_secs_f64()
                ));
            }
            self.release(control, &result.keys, report).await?;
            if best
                .as_ref()
                .is_none_or(|(_, b)| result.blocks_per_s() > b.blocks_per_s())
            {
                best = Some((transport, result));
            }
        }
        let (transport, result) = best.expect("two runs");
        report.group_commit_transport = Some(transport);
        report.group_commit_mode = Some(mode);
        report.group_commit_blocks = result.blocks;
        report.group_commit_blocks_per_s = result.blocks_per_s();
        report.group_commit_p50_ms = result.latency_ms(0.5);
        report.group_commit_p99_ms = result.latency_ms(0.99);
        report.group_commit_ratio = ratio(report.group_commit_blocks_per_s, report.raw_fsync_per_s);
        progress!(
            "group commit: {} blocks, {:.0} blocks/s, ack p50 {:.2} ms, p99 {:.2} ms",
            result.blocks,
            report.group_commit_blocks_per_s,
            report.group_commit_p50_ms,
            report.group_commit_p99_ms
        );
        Ok(())
    }

    /// Stages `bytes` of 4 MiB blocks with [`STAGE_WRITERS`] writers; returns their keys.
    async fn stage(
        &self,
        addr: std::net::SocketAddr,
        bytes: u64,
        mode: ChannelMode,
        what: &str,
    ) -> Result<Vec<String>, BenchError> {
        let payload = Payload::random(BLOCK_BYTES as usize);
        let result = self
            .load(
                addr,
                (STAGE_WRITERS, mode),
                payload,
                Stop::blocks(bytes / BLOCK_BYTES),
                Transport::Rpc,
            )
            .await?;
        progress!(
            "{what}: staged {} in {} blocks at {:.1} MiB/s",
            format_size(result.bytes),
            result.blocks,
            result.mib_per_s()
        );
        Ok(result.keys)
    }

    /// Phase 5a: the upload drain. Returns the keys it uploaded.
    async fn drain(
        &self,
        addr: std::net::SocketAddr,
        control: &mut Client,
        report: &mut Report,
    ) -> Result<Vec<String>, BenchError> {
        let mode = Self::best_mode(report);
        let keys = self
            .stage(addr, self.plan.drain_bytes, mode, "drain")
            .await?;
        let bytes = keys.len() as u64 * BLOCK_BYTES;
        report.drain_bytes = bytes;
        let before = rpc::status(control).await?;
        progress!(
            "drain: resuming uploads of {} blocks ({}) with {} workers",
            before.queue_len,
            format_size(before.bytes_staged),
            self.args.upload_concurrency
        );
        let start = Instant::now();
        rpc::set_uploads_paused(control, false).await?;
        let after = rpc::drain(control, DRAIN_TIMEOUT).await?;
        let elapsed = start.elapsed();
        rpc::set_uploads_paused(control, true).await?;
        report.drain_mib_s = mib_per_s(bytes, elapsed);
        let uploaded = after
            .uploaded_bytes_total
            .saturating_sub(before.uploaded_bytes_total);
        progress!(
            "drain: {} uploaded in {:.2} s: {:.1} MiB/s",
            format_size(uploaded),
            elapsed.as_secs_f64(),
            report.drain_mib_s
        );
        if uploaded < bytes {
            report.warnings.push(format!(
                "drain: gateway counts {uploaded} bytes uploaded, {bytes} were staged"
            ));
        }
        if after.blocks_quarantined > 0 || !after.last_store_error.is_empty() {
            report.warnings.push(format!(
                "drain: {} blocks quarantined, last store error: {:?}",
                after.blocks_quarantined, after.last_store_error
            ));
        }
        Ok(keys)
    }

    /// Phase 5b: the same PUTs made directly with object_store, the limit of the drain.
    async fn store_put(&self, report: &mut Report) -> Result<(), BenchError> {
        let url = self.spec.store.clone();
        let store = open_store(&url, &self.args.s3)?;
        let blocks = report.drain_bytes / BLOCK_BYTES;
        let concurrency = self.args.upload_concurrency;
        let prefix = format!("stagefs-bench/store-put/{:016x}", rand::random::<u64>());
        let payload = Payload::random(BLOCK_BYTES as usize).data;
        progress!(
            "store put: {blocks} PUTs of 4 MiB to {url} under {prefix}/, {concurrency} concurrent"
        );
        let claimed = Arc::new(AtomicU64::new(0));
        let start = Instant::now();
        let mut tasks = JoinSet::new();
        for _ in 0..concurrency {
            let store = store.clone();
            let claimed = claimed.clone();
            let payload: Bytes = payload.clone();
            let prefix = prefix.clone();
            let url = url.clone();
            tasks.spawn(async move {
                let mut paths = Vec::new();
                loop {
                    let i = claimed.fetch_add(1, Ordering::Relaxed);
                    if i >= blocks {
                        break;
                    }
                    let path = StorePath::from(format!("{prefix}/{i}"));
                    store
                        .put_opts(
                            &path,
                            PutPayload::from(payload.clone()),
                            PutOptions::default(),
                        )
                        .await
                        .map_err(|source| BenchError::Store {
                            url: url.clone(),
                            source,
                        })?;
                    paths.push(path);
                }
                Ok::<_, BenchError>(paths)
            });
        }
        let mut paths = Vec::new();
        let mut first_error = None;
        while let Some(joined) = tasks.join_next().await {
            match joined.map_err(BenchError::from).and_then(|r| r) {
                Ok(p) => paths.extend(p),
                Err(e) => {
                    if first_error.is_none() {
                        first_error = Some(e);
                        tasks.abort_all();
                    }
                }
            }
        }
        let elapsed = start.elapsed();
        if let Some(e) = first_error {
            return Err(e);
        }
        report.store_put_mib_s = mib_per_s(blocks * BLOCK_BYTES, elapsed);
        report.drain_ratio = ratio(report.drain_mib_s, report.store_put_mib_s);
        progress!(
            "store put: {} in {:.2} s: {:.1} MiB/s",
            format_size(blocks * BLOCK_BYTES),
            elapsed.as_secs_f64(),
            report.store_put_mib_s
        );
        delete_objects(&*store, paths).await;
        Ok(())
    }

    /// Best-effort removal of the benchmark's block objects from a store the user named.
    async fn remove_objects(&self, what: &str, keys: Vec<String>) {
        match open_store(&self.spec.store, &self.args.s3) {
            Ok(store) => {
                let paths: Vec<StorePath> = keys.into_iter().map(StorePath::from).collect();
                progress!(
                    "cleanup: deleting {} {what} from {}",
                    paths.len(),
                    self.spec.store
                );
                delete_objects(&*store, paths).await;
            }
            Err(e) => progress!("cleanup: cannot open {}: {e}", self.spec.store),
        }
    }

    /// Phase 6: crash with staged data, restart, time until the gateway answers.
    async fn recovery(
        &self,
        gateway: GatewayProcess,
        report: &mut Report,
    ) -> Result<GatewayProcess, BenchError> {
        let mode = Self::best_mode(report);
        let keys = self
            .stage(gateway.addr, self.plan.recovery_bytes, mode, "recovery")
            .await?;
        report.recovery_bytes = keys.len() as u64 * BLOCK_BYTES;
        report.recovery_staged_blocks = keys.len() as u64;

        progress!("recovery: SIGKILL gateway pid {}", gateway.pid());
        gateway.kill().await?;
        progress!("recovery: restarting: {}", self.spec.display(false));
        let start = Instant::now();
        let mut gateway = GatewayProcess::start(self.spec, false, RECOVERY_TIMEOUT).await?;
        let listening = start.elapsed();
        let (mut control, status) = loop {
            let attempt = async {
                let mut client = rpc::connect(gateway.addr, &self.access).await?;
                let status = rpc::status(&mut client).await?;
                Ok::<_, BenchError>((client, status))
            };
            match attempt.await {
                Ok(answer) => break answer,
                Err(e) => {
                    if let Some(exit) = gateway.try_exited() {
                        return Err(BenchError::Gateway(format!(
                            "exited ({exit}) while recovering"
                        )));
                    }
                    if start.elapsed() > RECOVERY_TIMEOUT {
                        return Err(e);
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        };
        let elapsed = start.elapsed();
        report.recovery_s = elapsed.as_secs_f64();
        report.recovery_gateway_ms = status.recovery_ms;
        report.recovered_blocks = status.recovered_blocks;
        report.recovery_corrupt_records = status.corrupt_records;
        progress!(
            "recovery: listening after {:.2} s, Status answered after {:.2} s; gateway: recovery_ms {}, \
             recovered_blocks {}, corrupt_records {}, blocks_staged {}",
            listening.as_secs_f64(),
            report.recovery_s,
            status.recovery_ms,
            status.recovered_blocks,
            status.corrupt_records,
            status.blocks_staged
        );
        if status.corrupt_records > 0 {
            report.warnings.push(format!(
                "recovery: {} corrupt records",
                status.corrupt_records
            ));
        }
        let stats = rpc::stat_blocks(&mut control, &keys).await?;
        let staged = stats
            .iter()
            .filter(|s| s.state() == proto::staging::BlockState::Staged)
            .count();
        if staged != keys.len() {
            report.warnings.push(format!(
                "recovery: {staged} of {} acknowledged blocks are staged after the restart",
                keys.len()
            ));
        }
        if status.recovered_blocks < keys.len() as u64 {
            report.warnings.push(format!(
                "recovery: gateway recovered {} blocks, {} were acknowledged before the crash",
                status.recovered_blocks,
                keys.len()
            ));
        }
        Ok(gateway)
    }
}

/// The gateway's group commit between two Status answers: how many fdatasyncs, how long each
/// took and how many records each made durable.
fn describe_syncs(
    before: &proto::staging::StatusResponse,
    after: &proto::staging::StatusResponse,
) -> String {
    let syncs = after.syncs_total.saturating_sub(before.syncs_total).max(1);
    format!(
        "{syncs} fdatasyncs, {:.3} ms each, {:.1} records per sync",
        (after.sync_seconds_total - before.sync_seconds_total) * 1000.0 / syncs as f64,
        after
            .synced_records_total
            .saturating_sub(before.synced_records_total) as f64
            / syncs as f64
    )
}

/// Deletes objects, reporting (not failing on) errors.
async fn delete_objects(store: &dyn ObjectStore, paths: Vec<StorePath>) {
    let count = paths.len();
    let locations = futures::stream::iter(paths.into_iter().map(Ok)).boxed();
    let mut results = store.delete_stream(locations);
    let mut failed = 0usize;
    let mut last = None;
    while let Some(result) = results.next().await {
        if let Err(e) = result {
            failed += 1;
            last = Some(e);
        }
    }
    if let Some(e) = last {
        progress!("cleanup: {failed} of {count} deletes failed, last: {e}");
    }
}

/// For the secure phase: a CA and a certificate for 127.0.0.1 made with `openssl` in `dir`, and a
/// tokens file with one admin token; returns the gateway's extra flags and the client's access.
fn secure_setup(dir: &std::path::Path) -> Result<(Vec<std::ffi::OsString>, GatewayAccess), String> {
    let run = |args: &[&str]| -> Result<(), String> {
        let output = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .map_err(|e| format!("cannot run openssl: {e}"))?;
        if output.status.success() {
            Ok(())
        } else {
            Err(format!(
                "openssl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&output.stderr)
            ))
        }
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    run(&[
        &["req", "-x509"][..],
        &ec,
        &[
            "-days",
            "1",
            "-subj",
            "/CN=stagefs bench CA",
            "-keyout",
            "bench-ca.key",
            "-out",
            "bench-ca.pem",
        ],
    ]
    .concat())?;
    run(&[
        &["req"][..],
        &ec,
        &[
            "-subj",
            "/CN=stagefs bench gateway",
            "-keyout",
            "bench-gw.key",
            "-out",
            "bench-gw.csr",
        ],
    ]
    .concat())?;
    std::fs::write(
        dir.join("bench-gw.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .map_err(|e| e.to_string())?;
    run(&[
        "x509",
        "-req",
        "-in",
        "bench-gw.csr",
        "-CA",
        "bench-ca.pem",
        "-CAkey",
        "bench-ca.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        "bench-gw.ext",
        "-out",
        "bench-gw.pem",
    ])?;
    let secret = format!("bench-{:032x}", rand::random::<u128>());
    std::fs::write(
        dir.join("bench-tokens.toml"),
        format!("[[token]]\nname = \"bench\"\nsecret = \"{secret}\"\naccess = \"admin\"\n"),
    )
    .map_err(|e| e.to_string())?;
    let ca = std::fs::read(dir.join("bench-ca.pem")).map_err(|e| e.to_string())?;
    let access = GatewayAccess::default()
        .with_token(&secret)
        .map_err(|e| e.to_string())?
        .with_tls(&ca, None);
    let path = |name: &str| dir.join(name).into_os_string();
    let extra = vec![
        "--tls-cert".into(),
        path("bench-gw.pem"),
        "--tls-key".into(),
        path("bench-gw.key"),
        "--tokens".into(),
        path("bench-tokens.toml"),
    ];
    Ok((extra, access))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: GatewayBenchArgs,
    }

    fn parse(argv: &[&str]) -> Result<GatewayBenchArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("bench").chain(argv.iter().copied())).map(|c| c.args)
    }

    #[test]
    fn plans_fit_the_device() {
        let args = parse(&["--device", "/x"]).expect("parses");
        let plan = Plan::new(&args).expect("plan");
        assert_eq!(plan.ingest_bytes, GIB);
        assert_eq!(plan.recovery_bytes, 2 * GIB);
        let args = parse(&["--device", "/x", "--quick"]).expect("parses");
        let plan = Plan::new(&args).expect("plan");
        assert_eq!(plan.ingest_bytes, 256 * MIB);
        assert_eq!(plan.recovery_bytes, 256 * MIB);
        let args = parse(&["--device", "/x", "--device-size", "1GiB"]).expect("parses");
        let plan = Plan::new(&args).expect("plan");
        assert_eq!(plan.ingest_bytes, 512 * MIB);
        assert_eq!(plan.recovery_bytes, 768 * MIB);
        let args = parse(&[
            "--device",
            "/x",
            "--device-size",
            "1GiB",
            "--recovery-bytes",
            "1GiB",
        ])
        .expect("parses");
        assert!(Plan::new(&args).is_err());
        let args = parse(&["--device", "/x", "--device-size", "1MiB"]).expect("parses");
        assert!(Plan::new(&args).is_err());
        assert!(parse(&["--device", "/x", "--device-size", "lots"]).is_err());
    }
}
