//! `stagefs bench cluster`: one mount writing through 1, 2 and 3 gateways that share a
//! PostgreSQL metadata database, the SIGKILL of one of them under writers, and its takeover.
//!
//! Each gateway count gets a fresh database and fresh device files (one per gateway, in the
//! scratch directory), and one mount given only the first gateway's address (it learns the
//! others from the registry). Uploads are held throughout, so every block a writer sent stays
//! on the device that received it: the share of blocks per gateway is what each one staged,
//! and the killed gateway's device holds real data for its takeover to recover.
//!
//! With the most gateways, writers go on writing files while one gateway is SIGKILLed; the run
//! records how long the unluckiest `close()` waited, when the first file opened after the kill
//! was closed, and when the registry called the gateway dead. Then a new process on the dead
//! gateway's device, at a new address, takes over; a fresh mount given only a surviving
//! gateway's address reads every file back and checks every byte.
//!
//! All processes share this machine's cores, so aggregate figures here say little about
//! separate nodes; the CPU seconds each gateway and the mount spend per GiB are what a
//! projection to separate nodes rests on, and the report makes that projection explicit.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use shared::size::{format_size, parse_size};
use shared::store::S3Options;

use super::fs::stack::MountProcess;
use super::fs::workloads::{self, verify_checkpoint_file, write_checkpoint_file};
use super::process::{find_gateway_bin, GatewayProcess, GatewaySpec};
use super::{
    percentile_ms, progress, ratio, raw, rpc, start_postgres, BenchError, ScratchDir, MIB,
};

pub const ABOUT: &str =
    "Benchmark several gateways on one namespace: ingest over 1..N gateways, SIGKILL and takeover";

pub const LONG_ABOUT: &str = "\
Benchmark several gateways serving one file system, through one real FUSE mount.

Starts a throwaway PostgreSQL server (Debian's postgresql, fsync on) and, for 1, 2 … --gateways
gateways, that many gateways on device files of their own sharing one fresh database, plus a
mount given only the first gateway's address. Uploads are held, so blocks stay where they landed.
  ingest     WRITERS checkpoint files of --checkpoint-size in 1 MiB writes, then close (MiB/s),
             the share of blocks each gateway received, and CPU seconds per GiB of each
             gateway process and of the mount
  failover   with the most gateways: writers keep writing --failover-file-size files while the
             last gateway is SIGKILLed; how long close() stalled, when writes flowed again, when
             the registry called it dead; every close() must succeed
  takeover   a new process on the dead gateway's device at a new address: time to recover the
             log and listen, and to show up alive in the registry; then a fresh mount given only
             the first gateway's address reads every file back and checks every byte

The raw O_DIRECT write bandwidth of the first device file is the limit ingest is compared with.
Every process shares this machine's cores: the report projects per-node figures from the CPU
cost per GiB. Prints progress on stderr, then a table (or --json) on stdout. Needs fuse3 and
PostgreSQL (scripts/setup.sh installs them); --workdir must support O_DIRECT (not tmpfs).";

#[derive(Debug, Clone, clap::Args)]
pub struct ClusterBenchArgs {
    /// Scratch directory (device files, store, mount points) [default: a new directory under
    /// /var/tmp, removed afterwards].
    #[arg(long, value_name = "DIR")]
    pub workdir: Option<PathBuf>,

    /// Keep the scratch directory afterwards.
    #[arg(long)]
    pub keep_workdir: bool,

    /// Largest number of gateways measured (every count from 1 up to it is).
    #[arg(long, value_name = "N", default_value_t = 3)]
    pub gateways: usize,

    /// Size of each gateway's device file [default: 4GiB, 1GiB with --quick].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub device_size: Option<u64>,

    /// Concurrent writers, of the checkpoint and of the failover phase.
    #[arg(long, value_name = "N", default_value_t = 4)]
    pub writers: usize,

    /// Size of each checkpoint file [default: 256MiB, 16MiB with --quick].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub checkpoint_size: Option<u64>,

    /// Size of each file written in the failover phase.
    #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = "4MiB")]
    pub failover_file_size: u64,

    /// How long writers go on after the kill [default: 8s, 3s with --quick].
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub failover_time: Option<Duration>,

    /// Print exactly one JSON object on stdout instead of the table.
    #[arg(long)]
    pub json: bool,

    /// Small amounts for a smoke run.
    #[arg(long)]
    pub quick: bool,

    /// The stagefs-gateway binary [default: next to this executable, else on PATH].
    #[arg(long, value_name = "PATH")]
    pub gateway_bin: Option<PathBuf>,
}

/// Ingest through one mount over a number of gateways.
#[derive(Debug, Clone, Serialize)]
pub struct Ingest {
    pub gateways: usize,
    pub mib_s: f64,
    /// `mib_s` ÷ the raw device's O_DIRECT write bandwidth (all device files share one disk).
    pub ratio_to_raw_device: Option<f64>,
    /// `mib_s` ÷ the one-gateway figure.
    pub speedup_vs_one: Option<f64>,
    /// Share of the staged blocks each gateway received, in start order.
    pub block_share: Vec<f64>,
    /// CPU seconds per GiB received, each gateway in start order.
    pub gateway_cpu_s_per_gib: Vec<f64>,
    /// All gateways' CPU seconds over all GiB written.
    pub gateways_cpu_s_per_gib: f64,
    /// The mount process's CPU seconds per GiB written.
    pub mount_cpu_s_per_gib: f64,
}

/// The SIGKILL of a gateway under writers, and its takeover.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Failover {
    pub gateways: usize,
    /// Position (from 0, in start order) of the gateway killed.
    pub killed: usize,
    /// Not yet uploaded on the killed gateway's device when it was killed.
    pub staged_bytes_at_kill: u64,
    pub files_before_kill: usize,
    pub files_after_kill: usize,
    pub write_p50_ms_before_kill: f64,
    pub write_p50_ms_after_kill: f64,
    /// The longest a `close()` in flight at the kill or later waited.
    pub longest_write_after_kill_ms: f64,
    /// From the kill to the close of the first file opened after it.
    pub kill_to_first_write_ms: f64,
    /// From the kill until the registry (through a surviving gateway) showed it not alive.
    pub kill_to_registry_dead_ms: Option<f64>,
    /// From starting the new process on the dead device until it printed its address (log
    /// recovered, serving).
    pub takeover_listening_ms: f64,
    /// From starting it until the registry showed it alive at the new address.
    pub takeover_registered_ms: f64,
    /// What the new process reports of its recovery.
    pub recovery_ms: u64,
    pub recovered_blocks: u64,
    pub recovered_bytes: u64,
    /// Files read back and checked byte for byte on a fresh mount after the takeover.
    pub verified_files: usize,
    pub verified_bytes: u64,
}

/// What separate nodes would give, from the CPU cost measured here.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Projection {
    /// GiB/s one core of a gateway node ingests: 1 ÷ its CPU seconds per GiB (one gateway).
    pub gateway_gib_s_per_core: Option<f64>,
    /// GiB/s one core of a client node writes through a mount.
    pub mount_gib_s_per_core: Option<f64>,
    /// Raw device bandwidth, the other bound of one gateway (GiB/s).
    pub device_gib_s: Option<f64>,
}

/// Everything `bench cluster` measured; `--json` prints it.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterReport {
    pub quick: bool,
    pub cores: usize,
    pub writers: usize,
    pub checkpoint_bytes_per_file: u64,
    pub device_size: u64,
    pub raw_device_mib_s: f64,
    pub ingest: Vec<Ingest>,
    pub failover: Failover,
    pub projection: Projection,
    pub notes: Vec<String>,
}

/// One gateway count's world: a database, gateways on their devices, and one mount.
struct World {
    gateways: Vec<Option<GatewayProcess>>,
    specs: Vec<GatewaySpec>,
    mount: MountProcess,
}

pub async fn run(args: ClusterBenchArgs) -> Result<ClusterReport, BenchError> {
    let device_size = args
        .device_size
        .unwrap_or(if args.quick { 1 << 30 } else { 4 << 30 });
    let checkpoint_size =
        args.checkpoint_size
            .unwrap_or(if args.quick { 16 << 20 } else { 256 << 20 });
    let failover_time = args.failover_time.unwrap_or(if args.quick {
        Duration::from_secs(3)
    } else {
        Duration::from_secs(8)
    });
    if args.gateways < 2 {
        return Err(BenchError::Args(
            "--gateways must be at least 2 (one is killed)".into(),
        ));
    }
    if args.writers == 0 || checkpoint_size == 0 || args.failover_file_size == 0 {
        return Err(BenchError::Args(
            "--writers, --checkpoint-size and --failover-file-size must not be 0".into(),
        ));
    }
    if !device_size.is_multiple_of(raw::ALIGN as u64) || device_size < 256 << 20 {
        return Err(BenchError::Args(format!(
            "--device-size {} must be at least 256MiB and a multiple of 4096",
            format_size(device_size)
        )));
    }
    // With one gateway it takes the whole checkpoint, and uploads are held.
    if args.writers as u64 * checkpoint_size > device_size / 2 {
        return Err(BenchError::Args(format!(
            "{} writers × {} does not fit half of --device-size {}: raise it",
            args.writers,
            format_size(checkpoint_size),
            format_size(device_size)
        )));
    }
    let gateway_bin = find_gateway_bin(args.gateway_bin.as_deref())?;
    let work = match &args.workdir {
        Some(dir) => ScratchDir::existing(dir)?,
        None => ScratchDir::create(
            Path::new("/var/tmp"),
            "stagefs-bench-cluster",
            args.keep_workdir,
        )?,
    };
    let work = WorkPaths(work);
    progress!("scratch directory {}", work.root().display());
    progress!("starting a PostgreSQL server (fsync on)");
    let pg = start_postgres().await?;

    let raw_device_mib_s = {
        let device = work.device(1, 0);
        let bytes = (args.writers as u64 * checkpoint_size).clamp(256 << 20, 1 << 30)
            / raw::SEQ_WRITE_SIZE as u64
            * raw::SEQ_WRITE_SIZE as u64;
        progress!(
            "raw device: O_DIRECT sequential writes of {}",
            format_size(bytes)
        );
        let best = tokio::task::spawn_blocking(move || {
            raw::prepare_device(&device, device_size)?;
            let one = raw::seq_write(&device, bytes, 1, false)?;
            let four = raw::seq_write(&device, bytes, 4, false)?;
            Ok::<_, BenchError>(one.max(four))
        })
        .await??;
        progress!("raw device: {best:.0} MiB/s");
        best
    };

    let mut report = ClusterReport {
        quick: args.quick,
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        writers: args.writers,
        checkpoint_bytes_per_file: checkpoint_size,
        device_size,
        raw_device_mib_s,
        ingest: Vec::new(),
        failover: Failover::default(),
        projection: Projection::default(),
        notes: Vec::new(),
    };
    for count in 1..=args.gateways {
        let database = pg
            .fresh_database(&format!("cluster_{count}"))
            .map_err(|e| BenchError::Args(format!("PostgreSQL: {e}")))?;
        let mut world = World::start(&work, &gateway_bin, count, device_size, &database).await?;
        let ingest = ingest(&world, count, args.writers, checkpoint_size).await?;
        let one = report.ingest.first().map(|i: &Ingest| i.mib_s);
        report.ingest.push(Ingest {
            ratio_to_raw_device: ratio(ingest.mib_s, raw_device_mib_s),
            speedup_vs_one: one.and_then(|one| ratio(ingest.mib_s, one)),
            ..ingest
        });
        if count == args.gateways {
            report.failover = failover(
                &mut world,
                &work,
                args.writers,
                args.failover_file_size,
                failover_time,
                checkpoint_size,
            )
            .await?;
        }
        world.stop(&work, count)?;
    }
    let one = &report.ingest[0];
    report.projection = Projection {
        gateway_gib_s_per_core: one
            .gateway_cpu_s_per_gib
            .first()
            .and_then(|&s| ratio(1.0, s)),
        mount_gib_s_per_core: ratio(1.0, one.mount_cpu_s_per_gib),
        device_gib_s: Some(raw_device_mib_s / 1024.0),
    };
    report.notes.push(format!(
        "every process shares this machine's {} cores and one disk: aggregate ingest cannot \
         grow here with more gateways; on separate nodes each gateway brings its own cores, \
         NIC and device, so one gateway ingests min(cores × gateway_gib_s_per_core, its \
         device), and one mount writes at most cores × mount_gib_s_per_core spread over all \
         gateways",
        report.cores
    ));
    if args.quick {
        report
            .notes
            .push("--quick: amounts too small for figures to mean much".into());
    }
    drop(pg);
    Ok(report)
}

/// Paths inside the scratch directory.
struct WorkPaths(ScratchDir);

impl WorkPaths {
    fn root(&self) -> &Path {
        self.0.path()
    }
    fn device(&self, count: usize, k: usize) -> PathBuf {
        self.root().join(format!("device-{count}-{k}.img"))
    }
    /// Each configuration is a file system of its own (a fresh database), so it needs a store
    /// of its own: a gateway refuses a store another file system claimed.
    fn store(&self, count: usize) -> PathBuf {
        self.root().join(format!("store-{count}"))
    }
}

impl World {
    async fn start(
        work: &WorkPaths,
        bin: &Path,
        count: usize,
        device_size: u64,
        database: &str,
    ) -> Result<Self, BenchError> {
        let store = work.store(count);
        std::fs::create_dir_all(&store).map_err(|e| BenchError::io("cannot create", &store, e))?;
        let mut gateways = Vec::new();
        let mut specs = Vec::new();
        for k in 0..count {
            let spec = GatewaySpec {
                bin: bin.to_path_buf(),
                device: work.device(count, k),
                device_size,
                store: format!("file://{}", store.display()),
                listen: "127.0.0.1:0".into(),
                upload_concurrency: 8,
                io_engine: None,
                s3: S3Options::default(),
                uploads_paused: true,
                env: Vec::new(),
                extra: vec![
                    "--meta".into(),
                    database.into(),
                    "--meta-region-size".into(),
                    "0".into(),
                ],
                log: work.root().join(format!("gateway-{count}-{k}.log")),
            };
            let gateway = GatewayProcess::start(&spec, true, Duration::from_secs(120)).await?;
            progress!(
                "[{count} gateways] gateway {k} on {} (log {})",
                gateway.addr,
                spec.log.display()
            );
            gateways.push(Some(gateway));
            specs.push(spec);
        }
        let first = gateways[0].as_ref().map(|g| g.addr.to_string());
        let mount = MountProcess::start_with(
            first.as_deref().unwrap_or_default(),
            &work.root().join(format!("mnt-{count}")),
            &[],
            &work.root().join(format!("mount-{count}.log")),
        )?;
        let world = World {
            gateways,
            specs,
            mount,
        };
        // The mount reads the registry at start; every gateway registered before it began.
        Ok(world)
    }

    fn gateway(&self, k: usize) -> Result<&GatewayProcess, BenchError> {
        self.gateways[k]
            .as_ref()
            .ok_or_else(|| BenchError::Gateway(format!("gateway {k} is not running")))
    }

    async fn status(&self, k: usize) -> Result<proto::staging::StatusResponse, BenchError> {
        let mut client =
            rpc::connect(self.gateway(k)?.addr, &client::fs::GatewayAccess::default()).await?;
        rpc::status(&mut client).await
    }

    /// Unmounts, stops the gateways and removes their device files (uploads were held, so
    /// their data is dropped with them, as it should be for a benchmark's scratch data).
    fn stop(self, work: &WorkPaths, count: usize) -> Result<(), BenchError> {
        self.mount.unmount()?;
        drop(self.gateways);
        for k in 0..count {
            let _ = std::fs::remove_file(work.device(count, k));
        }
        Ok(())
    }
}

/// CPU seconds (user + system) a process has used so far; 0 once it is gone.
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name, which is in parentheses and may hold spaces.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    // utime and stime are fields 14 and 15 of stat(5); `rest` starts at field 3.
    (ticks(11) + ticks(12)) as f64 / hz
}

/// The pid of the `stagefs mount` process serving `path` (the daemon the mount forked).
fn mount_pid(path: &Path) -> Option<u32> {
    let want = path.as_os_str().as_encoded_bytes();
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
            let is_mount = args.contains(&b"mount".as_slice()) && args.contains(&want);
            is_mount.then_some(pid)
        })
}

const GIB: f64 = 1024.0 * MIB;

/// How long after the kill the run waits for the registry to call the gateway dead.
const REGISTRY_WAIT: Duration = Duration::from_secs(60);

async fn ingest(
    world: &World,
    count: usize,
    writers: usize,
    size: u64,
) -> Result<Ingest, BenchError> {
    let pids: Vec<u32> = (0..count)
        .map(|k| world.gateway(k).map(GatewayProcess::pid))
        .collect::<Result<_, _>>()?;
    let mount = mount_pid(&world.mount.path).ok_or_else(|| {
        BenchError::Task(format!(
            "no mount process found for {}",
            world.mount.path.display()
        ))
    })?;
    let before: Vec<f64> = pids.iter().map(|&p| cpu_seconds(p)).collect();
    let mount_before = cpu_seconds(mount);
    let dir = world.mount.path.join("checkpoint");
    std::fs::create_dir_all(&dir).map_err(|e| BenchError::io("cannot create", &dir, e))?;
    progress!(
        "[{count} gateways] ingest: {writers} × {}",
        format_size(size)
    );
    let mib_s =
        tokio::task::spawn_blocking(move || workloads::checkpoint(&dir, writers, size)).await??;
    let gateway_cpu: Vec<f64> = pids
        .iter()
        .zip(&before)
        .map(|(&p, b)| cpu_seconds(p) - b)
        .collect();
    let mount_cpu = cpu_seconds(mount) - mount_before;
    let mut staged = Vec::new();
    for k in 0..count {
        staged.push(world.status(k).await?);
    }
    let total_blocks: u64 = staged.iter().map(|s| s.blocks_staged).sum();
    let gib_written = (writers as u64 * size) as f64 / GIB;
    let block_share: Vec<f64> = staged
        .iter()
        .map(|s| ratio(s.blocks_staged as f64, total_blocks as f64).unwrap_or(0.0))
        .collect();
    let gateway_cpu_s_per_gib: Vec<f64> = staged
        .iter()
        .zip(&gateway_cpu)
        .map(|(s, cpu)| ratio(*cpu, s.bytes_staged as f64 / GIB).unwrap_or(0.0))
        .collect();
    progress!(
        "[{count} gateways] ingest: {mib_s:.0} MiB/s, block shares {}",
        shares(&block_share)
    );
    Ok(Ingest {
        gateways: count,
        mib_s,
        ratio_to_raw_device: None,
        speedup_vs_one: None,
        block_share,
        gateway_cpu_s_per_gib,
        gateways_cpu_s_per_gib: ratio(gateway_cpu.iter().sum(), gib_written).unwrap_or(0.0),
        mount_cpu_s_per_gib: ratio(mount_cpu, gib_written).unwrap_or(0.0),
    })
}

fn shares(share: &[f64]) -> String {
    share
        .iter()
        .map(|s| format!("{:.0}%", s * 100.0))
        .collect::<Vec<_>>()
        .join(" / ")
}

/// One file written in the failover phase: when it was opened and closed, from the phase's
/// start.
#[derive(Debug, Clone, Copy)]
struct Written {
    opened: Duration,
    closed: Duration,
}

/// Writers writing files of `size` into `dir` (file `n * writers + w` by writer `w`) until
/// `stop`, or until `budget` bytes are written in all; every `close()` must succeed.
fn failover_writers(
    dir: &Path,
    writers: usize,
    size: u64,
    start: Instant,
    stop: &AtomicBool,
    budget: u64,
) -> Result<Vec<(usize, Written)>, BenchError> {
    let written = AtomicU64::new(0);
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..writers)
            .map(|w| {
                let written = &written;
                scope.spawn(move || {
                    let mut files = Vec::new();
                    for n in 0.. {
                        if stop.load(Ordering::Relaxed)
                            || written.fetch_add(size, Ordering::Relaxed) >= budget
                        {
                            break;
                        }
                        let i = n * writers + w;
                        let opened = start.elapsed();
                        write_checkpoint_file(dir, i, size).map_err(|e| {
                            BenchError::Task(format!(
                                "a write failed {:.1} s into the failover phase (a gateway's \
                                 loss must not fail writes while others live): {e}",
                                start.elapsed().as_secs_f64()
                            ))
                        })?;
                        let closed = start.elapsed();
                        files.push((i, Written { opened, closed }));
                    }
                    Ok::<_, BenchError>(files)
                })
            })
            .collect();
        let mut all = Vec::new();
        for handle in handles {
            let files = handle
                .join()
                .map_err(|_| BenchError::Task("a failover writer panicked".into()))??;
            all.extend(files);
        }
        Ok(all)
    })
}

async fn failover(
    world: &mut World,
    work: &WorkPaths,
    writers: usize,
    file_size: u64,
    window: Duration,
    checkpoint_size: u64,
) -> Result<Failover, BenchError> {
    let count = world.gateways.len();
    let victim = count - 1;
    let survivor = world.gateway(0)?.addr;
    let victim_address = world.gateway(victim)?.addr.to_string();
    let mut registry = Registry::connect(survivor).await?;
    let victim_id = registry
        .read()
        .await?
        .into_iter()
        .find(|(_, (_, address))| *address == victim_address)
        .map(|(id, _)| id)
        .ok_or_else(|| BenchError::Gateway(format!("{victim_address} is not in the registry")))?;
    let dir = world.mount.path.join("failover");
    std::fs::create_dir_all(&dir).map_err(|e| BenchError::io("cannot create", &dir, e))?;
    progress!(
        "[failover] {writers} writers of {} files; SIGKILL of gateway {victim} after 1 s, \
         then {window:?} more",
        format_size(file_size)
    );
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    // A quarter of the devices that stay up: uploads are held, so writes must not fill them.
    let budget = (count as u64 - 1) * world.specs[0].device_size / 4;
    let writing = {
        let (dir, stop) = (dir.clone(), stop.clone());
        tokio::task::spawn_blocking(move || {
            failover_writers(&dir, writers, file_size, start, &stop, budget)
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let staged_bytes_at_kill = world.status(victim).await?.bytes_staged;
    let process = world.gateways[victim]
        .take()
        .ok_or_else(|| BenchError::Gateway("the victim is not running".into()))?;
    let killed_at = start.elapsed();
    process.kill().await?;
    progress!("[failover] gateway {victim} SIGKILLed");
    // Watch the registry through a survivor while the writers go on.
    let mut registry_dead = None;
    let watch_until = Instant::now() + window;
    while Instant::now() < watch_until {
        if registry_dead.is_none() && !registry.alive(&victim_id).await? {
            registry_dead = Some(start.elapsed() - killed_at);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let files = writing.await??;
    // The registry's verdict may take longer than the writers ran (it waits for 3 missed
    // heartbeats); the takeover below does not depend on it, an operator's alert does.
    while registry_dead.is_none() && start.elapsed() - killed_at < REGISTRY_WAIT {
        if !registry.alive(&victim_id).await? {
            registry_dead = Some(start.elapsed() - killed_at);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let mut before: Vec<Duration> = Vec::new();
    let mut after: Vec<Duration> = Vec::new();
    let mut first_after: Option<Duration> = None;
    for (_, w) in &files {
        let took = w.closed - w.opened;
        if w.closed <= killed_at {
            before.push(took);
        } else {
            after.push(took);
        }
        if w.opened >= killed_at {
            first_after = Some(first_after.map_or(w.closed, |f| f.min(w.closed)));
        }
    }
    before.sort();
    after.sort();
    let first_after = first_after.ok_or_else(|| {
        BenchError::Task("no file was opened after the kill: raise --failover-time".into())
    })?;
    let mut result = Failover {
        gateways: count,
        killed: victim,
        staged_bytes_at_kill,
        files_before_kill: before.len(),
        files_after_kill: after.len(),
        write_p50_ms_before_kill: percentile_ms(&before, 0.5),
        write_p50_ms_after_kill: percentile_ms(&after, 0.5),
        longest_write_after_kill_ms: after.last().map_or(0.0, |d| ms(*d)),
        kill_to_first_write_ms: ms(first_after - killed_at),
        kill_to_registry_dead_ms: registry_dead.map(ms),
        ..Failover::default()
    };
    progress!(
        "[failover] {} files after the kill, none failed; longest close {:.0} ms, first file \
         opened after the kill closed {:.0} ms after it",
        after.len(),
        result.longest_write_after_kill_ms,
        result.kill_to_first_write_ms
    );

    // Takeover: the same device, a new process, a new address.
    let mut spec = world.specs[victim].clone();
    spec.log = work.root().join("gateway-takeover.log");
    let spawned = Instant::now();
    let taken = GatewayProcess::start(&spec, false, Duration::from_secs(600)).await?;
    result.takeover_listening_ms = ms(spawned.elapsed());
    let new_address = taken.addr.to_string();
    loop {
        if registry.registered_at(&victim_id, &new_address).await? {
            break;
        }
        if spawned.elapsed() > Duration::from_secs(120) {
            return Err(BenchError::Gateway(format!(
                "the takeover at {new_address} did not show up alive in the registry within \
                 120 s"
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    result.takeover_registered_ms = ms(spawned.elapsed());
    world.gateways[victim] = Some(taken);
    let recovered = world.status(victim).await?;
    result.recovery_ms = recovered.recovery_ms;
    result.recovered_blocks = recovered.recovered_blocks;
    result.recovered_bytes = recovered.bytes_staged;
    progress!(
        "[takeover] listening after {:.0} ms, alive in the registry after {:.0} ms; {} blocks \
         ({}) recovered",
        result.takeover_listening_ms,
        result.takeover_registered_ms,
        result.recovered_blocks,
        format_size(result.recovered_bytes)
    );

    // Every acknowledged file, through a fresh mount that knows only a survivor.
    let fresh = MountProcess::start_with(
        &survivor.to_string(),
        &work.root().join("mnt-verify"),
        &[],
        &work.root().join("mount-verify.log"),
    )?;
    let checkpoint_files = world_checkpoint_files(&fresh.path.join("checkpoint"))?;
    let verify_dir = fresh.path.clone();
    let failover_files: Vec<usize> = files.iter().map(|(i, _)| *i).collect();
    let (verified_files, verified_bytes) = tokio::task::spawn_blocking(move || {
        let mut bytes = 0;
        for &i in &checkpoint_files {
            verify_checkpoint_file(&verify_dir.join("checkpoint"), i, checkpoint_size)?;
            bytes += checkpoint_size;
        }
        for &i in &failover_files {
            verify_checkpoint_file(&verify_dir.join("failover"), i, file_size)?;
            bytes += file_size;
        }
        Ok::<_, BenchError>((checkpoint_files.len() + failover_files.len(), bytes))
    })
    .await??;
    fresh.unmount()?;
    result.verified_files = verified_files;
    result.verified_bytes = verified_bytes;
    progress!(
        "[verify] {verified_files} files ({}) read back identical through {survivor}",
        format_size(verified_bytes)
    );
    Ok(result)
}

/// Indexes of the checkpoint files in `dir`.
fn world_checkpoint_files(dir: &Path) -> Result<Vec<usize>, BenchError> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| BenchError::io("cannot list", dir, e))? {
        let entry = entry.map_err(|e| BenchError::io("cannot list", dir, e))?;
        let name = entry.file_name();
        let index = name
            .to_str()
            .and_then(|n| n.strip_prefix("checkpoint-"))
            .and_then(|n| n.strip_suffix(".bin"))
            .and_then(|n| n.parse().ok());
        if let Some(i) = index {
            found.push(i);
        }
    }
    found.sort_unstable();
    Ok(found)
}

/// The registry as one gateway serves it, over one connection for the whole run.
struct Registry {
    meta: proto::meta::meta_client::MetaClient<client::fs::GatewayChannel>,
}

impl Registry {
    async fn connect(addr: std::net::SocketAddr) -> Result<Registry, BenchError> {
        let channel =
            client::fs::connect_gateway(&addr.to_string(), &client::fs::GatewayAccess::default())
                .await
                .map_err(|source| BenchError::Connect {
                    addr: addr.to_string(),
                    source,
                })?;
        Ok(Registry {
            meta: client::fs::meta_client(channel),
        })
    }

    /// id → (alive, address).
    async fn read(&mut self) -> Result<BTreeMap<Vec<u8>, (bool, String)>, BenchError> {
        let gateways = self
            .meta
            .list_gateways(proto::meta::Empty {})
            .await
            .map_err(|status| BenchError::rpc("ListGateways", status))?
            .into_inner()
            .gateways;
        Ok(gateways
            .into_iter()
            .map(|g| (g.id.to_vec(), (g.alive, g.address)))
            .collect())
    }

    async fn alive(&mut self, id: &[u8]) -> Result<bool, BenchError> {
        Ok(self.read().await?.get(id).is_some_and(|(alive, _)| *alive))
    }

    async fn registered_at(&mut self, id: &[u8], address: &str) -> Result<bool, BenchError> {
        Ok(self
            .read()
            .await?
            .get(id)
            .is_some_and(|(alive, at)| *alive && at == address))
    }
}

impl ClusterReport {
    /// The human-readable table.
    pub fn table(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "stagefs bench cluster: {} writers × {} per checkpoint, device files of {}, {} cores",
            self.writers,
            format_size(self.checkpoint_bytes_per_file),
            format_size(self.device_size),
            self.cores
        );
        let _ = writeln!(
            out,
            "raw device (limit)   {:>8.0} MiB/s O_DIRECT sequential writes",
            self.raw_device_mib_s
        );
        let _ = writeln!(
            out,
            "\n{:<9} {:>9} {:>8} {:>8} {:>20} {:>16} {:>14}",
            "gateways", "MiB/s", "÷ raw", "÷ one", "block share", "gw CPU s/GiB", "mount CPU s/GiB"
        );
        for i in &self.ingest {
            let opt = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.2}"));
            let _ = writeln!(
                out,
                "{:<9} {:>9.0} {:>8} {:>8} {:>20} {:>16} {:>14.2}",
                i.gateways,
                i.mib_s,
                opt(i.ratio_to_raw_device),
                opt(i.speedup_vs_one),
                shares(&i.block_share),
                i.gateway_cpu_s_per_gib
                    .iter()
                    .map(|c| format!("{c:.2}"))
                    .collect::<Vec<_>>()
                    .join("/"),
                i.mount_cpu_s_per_gib
            );
        }
        let f = &self.failover;
        let _ = writeln!(
            out,
            "\nfailover over {} gateways, gateway {} SIGKILLed with {} staged:",
            f.gateways,
            f.killed,
            format_size(f.staged_bytes_at_kill)
        );
        let _ = writeln!(
            out,
            "  writes        {} files before the kill (p50 {:.0} ms), {} after (p50 {:.0} ms), none failed",
            f.files_before_kill, f.write_p50_ms_before_kill, f.files_after_kill, f.write_p50_ms_after_kill
        );
        let _ = writeln!(
            out,
            "  stall         longest close() {:.0} ms; first file opened after the kill closed {:.0} ms after it",
            f.longest_write_after_kill_ms, f.kill_to_first_write_ms
        );
        let _ = writeln!(
            out,
            "  registry      dead after {}",
            f.kill_to_registry_dead_ms
                .map_or("(not within 60 s)".into(), |ms| format!("{ms:.0} ms"))
        );
        let _ = writeln!(
            out,
            "  takeover      listening after {:.0} ms (recovery {} ms: {} blocks, {}), alive in the registry after {:.0} ms",
            f.takeover_listening_ms,
            f.recovery_ms,
            f.recovered_blocks,
            format_size(f.recovered_bytes),
            f.takeover_registered_ms
        );
        let _ = writeln!(
            out,
            "  verified      {} files ({}) identical on a fresh mount given one survivor",
            f.verified_files,
            format_size(f.verified_bytes)
        );
        let p = &self.projection;
        let opt = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.2}"));
        let _ = writeln!(
            out,
            "\nprojection    a gateway ingests {} GiB/s per core (device {} GiB/s); a mount writes {} GiB/s per core",
            opt(p.gateway_gib_s_per_core),
            opt(p.device_gib_s),
            opt(p.mount_gib_s_per_core)
        );
        for note in &self.notes {
            let _ = writeln!(out, "note: {note}");
        }
        out
    }
}
