//! `stagefs bench mirror`: a mirror region against mounting the source region from afar.
//!
//! Region A: a PostgreSQL primary and a gateway on it. Region B: a hot standby of that primary
//! and a mirror gateway on it (`serve --source`). Everything between the regions goes through
//! the latency proxy (`--rtt`): the mirror's changes to A's gateway, the standby's WAL stream,
//! and a mount in B of A's gateway (the "direct" mount). A mount in A (the "local" one) is the
//! limit: what the operations cost with no distance at all.
//!
//! Every mount runs with `--attr-ttl 0 --entry-ttl 0`, so each operation starts from a cold
//! client cache: every path component is looked up again, as by a fresh client.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use meta::pg_cluster::PgDurability;
use serde::Serialize;
use shared::store::S3Options;

use super::fs::stack::{start_proxy, MountProcess};
use super::latency_proxy::{self, ProxyArgs};
use super::process::{find_gateway_bin, GatewayProcess, GatewaySpec};
use super::{percentile_ms, progress, ratio, rpc, start_postgres, BenchError, ScratchDir};

pub const ABOUT: &str =
    "Benchmark a mirror region: metadata read from a local standby, changes sent to the source";

pub const LONG_ABOUT: &str = "\
Benchmark a mirror in another region against mounting the source region's gateway from afar.

Starts a throwaway PostgreSQL primary (Debian's postgresql, fsync on) with a gateway on it
(region A), a hot standby of it streaming over the latency proxy with a mirror gateway on it
(region B, `serve --source`), and three mounts, each with a cold client cache (--attr-ttl 0
--entry-ttl 0): local (in A: the limit), mirror (in B, through the mirror) and direct (in B,
of A's gateway through the proxy). On each it measures, --iterations times:
  path_create   create and close a file in an existing four-level path (d1/d2/d3/d4/newf)
  stat_deep     stat of an existing file at that depth
  list          list a directory of --listing-files files
  small_write   write and close a 4 KiB file
  small_read    read it back on the same mount (bytes checked)
and reports the medians and p99s, mirror ÷ direct (the aim: path_create at most 0.25) and
mirror ÷ local (reads at local latency: about 1). Prints progress on stderr, then a table (or
--json) on stdout. Needs fuse3 and PostgreSQL (scripts/setup.sh installs them).";

#[derive(Debug, Clone, clap::Args)]
pub struct MirrorBenchArgs {
    /// Scratch directory (device files, store, mount points) [default: a new directory under
    /// /var/tmp, removed afterwards].
    #[arg(long, value_name = "DIR")]
    pub workdir: Option<PathBuf>,

    /// Keep the scratch directory afterwards.
    #[arg(long)]
    pub keep_workdir: bool,

    /// Round trip between the two regions.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30ms")]
    pub rtt: Duration,

    /// Times each operation is measured on each mount [default: 30, 5 with --quick].
    #[arg(long, value_name = "N")]
    pub iterations: Option<usize>,

    /// Files in the listed directory [default: 1000, 100 with --quick].
    #[arg(long, value_name = "N")]
    pub listing_files: Option<usize>,

    /// Small amounts, for a smoke test (figures mean little).
    #[arg(long)]
    pub quick: bool,

    /// Print the report as JSON instead of a table.
    #[arg(long)]
    pub json: bool,

    /// The `stagefs-gateway` binary [default: next to this program, then on PATH].
    #[arg(long, value_name = "PATH")]
    pub gateway_bin: Option<PathBuf>,
}

/// One operation on the three mounts: milliseconds, median and p99.
#[derive(Debug, Clone, Serialize)]
pub struct Operation {
    pub name: &'static str,
    pub local_ms_p50: f64,
    pub mirror_ms_p50: f64,
    pub direct_ms_p50: f64,
    pub local_ms_p99: f64,
    pub mirror_ms_p99: f64,
    pub direct_ms_p99: f64,
    /// Mirror ÷ direct, medians: below 1, the mirror is faster than mounting A from B.
    pub mirror_vs_direct: Option<f64>,
    /// Mirror ÷ local, medians: 1 is no cost for the distance at all.
    pub mirror_vs_local: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct MirrorReport {
    pub quick: bool,
    pub rtt_ms: f64,
    pub iterations: usize,
    pub listing_files: usize,
    pub operations: Vec<Operation>,
    /// The aim: path_create through the mirror at most this share of the direct mount's time.
    pub path_create_aim: f64,
    pub path_create_aim_met: bool,
    /// What the mirror's `status` said at the end.
    pub replica_lag_seconds: Option<f64>,
    pub notes: Vec<String>,
}

/// Timings of one mount, by operation, in the order of [`OPERATIONS`].
type Timings = Vec<Vec<Duration>>;

const OPERATIONS: [&str; 5] = [
    "path_create",
    "stat_deep",
    "list",
    "small_write",
    "small_read",
];
const PATH_CREATE_AIM: f64 = 0.25;
const SMALL_FILE: usize = 4096;

pub async fn run(args: MirrorBenchArgs) -> Result<MirrorReport, BenchError> {
    let iterations = args.iterations.unwrap_or(if args.quick { 5 } else { 30 });
    let listing_files = args
        .listing_files
        .unwrap_or(if args.quick { 100 } else { 1000 });
    if iterations == 0 || listing_files == 0 {
        return Err(BenchError::Args(
            "--iterations and --listing-files must not be 0".into(),
        ));
    }
    let gateway_bin = find_gateway_bin(args.gateway_bin.as_deref())?;
    let work = match &args.workdir {
        Some(dir) => ScratchDir::existing(dir)?,
        None => ScratchDir::create(
            Path::new("/var/tmp"),
            "stagefs-bench-mirror",
            args.keep_workdir,
        )?,
    };
    let root = work.path().to_path_buf();
    progress!("scratch directory {}", root.display());
    progress!("region A: a PostgreSQL primary (fsync on)");
    let primary = start_postgres().await?;
    let database = primary
        .fresh_database("mirror")
        .map_err(|e| BenchError::Args(format!("PostgreSQL: {e}")))?;
    let store = root.join("store");
    std::fs::create_dir_all(&store).map_err(|e| BenchError::io("cannot create", &store, e))?;

    // A's gateway is reached from B through the proxy, and advertised there: B's mounts stage
    // their blocks on it over the distance too.
    let mut wan = ProxyArgs {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        upstream: SocketAddr::from(([127, 0, 0, 1], 9)),
        delay: args.rtt,
        jitter: Duration::ZERO,
        bandwidth: 0,
    };
    let listener = latency_proxy::bind(&wan)
        .await
        .map_err(|e| BenchError::io("cannot bind the latency proxy on", "127.0.0.1:0", e))?;
    let a_from_b = listener
        .local_addr()
        .map_err(|e| BenchError::io("cannot read the address of", "the latency proxy", e))?;
    let spec = |name: &str, meta: &str, extra: &[&str]| {
        let mut all: Vec<std::ffi::OsString> = vec![
            "--meta".into(),
            meta.into(),
            "--meta-region-size".into(),
            "0".into(),
        ];
        all.extend(extra.iter().map(Into::into));
        GatewaySpec {
            bin: gateway_bin.clone(),
            device: root.join(format!("{name}.dev")),
            device_size: 1 << 30,
            store: format!("file://{}", store.display()),
            listen: "127.0.0.1:0".into(),
            upload_concurrency: 8,
            io_engine: None,
            s3: S3Options::default(),
            uploads_paused: false,
            env: Vec::new(),
            extra: all,
            log: root.join(format!("gateway-{name}.log")),
        }
    };
    let a = GatewayProcess::start(
        &spec("a", &database, &["--advertise", &a_from_b.to_string()]),
        true,
        Duration::from_secs(120),
    )
    .await?;
    wan.upstream = a.addr;
    tokio::spawn(latency_proxy::serve(listener, wan));
    progress!("region A: gateway on {} (from B: {a_from_b})", a.addr);

    progress!("region B: a hot standby, streaming through the proxy");
    let primary_from_b =
        start_proxy(SocketAddr::from(([127, 0, 0, 1], primary.port())), args.rtt).await?;
    let port = primary_from_b.port();
    let (primary, standby) = tokio::task::spawn_blocking(move || {
        let standby = primary.standby_via(port, PgDurability::Durable);
        (primary, standby)
    })
    .await?;
    let standby =
        standby.map_err(|e| BenchError::Args(format!("cannot start the standby: {e}")))?;
    let name = database.rsplit('/').next().unwrap_or_default();
    let b = GatewayProcess::start(
        &spec(
            "b",
            &standby.url(name),
            &["--source", &a_from_b.to_string()],
        ),
        true,
        Duration::from_secs(120),
    )
    .await?;
    progress!("region B: mirror gateway on {}", b.addr);

    let cold = ["--attr-ttl", "0s", "--entry-ttl", "0s"];
    let mount = |gateway: &str, name: &str| {
        MountProcess::start_with(
            gateway,
            &root.join(name),
            &cold,
            &root.join(format!("mount-{name}.log")),
        )
    };
    let local = mount(&a.addr.to_string(), "local")?;
    let mirror = mount(&b.addr.to_string(), "mirror")?;
    let direct = mount(&a_from_b.to_string(), "direct")?;

    progress!("the tree: d1/d2/d3/d4/existing and list/ with {listing_files} files (made in A)");
    let (local_path, mirror_path) = (local.path.clone(), mirror.path.clone());
    tokio::task::spawn_blocking(move || make_tree(&local_path, &mirror_path, listing_files))
        .await??;

    let mut timings = Vec::new();
    for (label, mount) in [("local", &local), ("mirror", &mirror), ("direct", &direct)] {
        progress!("{label}: {iterations} of each operation");
        let path = mount.path.clone();
        timings.push(
            tokio::task::spawn_blocking(move || measure(&path, label, iterations, listing_files))
                .await??,
        );
    }
    let replica_lag_seconds =
        match rpc::connect(b.addr, &client::fs::GatewayAccess::default()).await {
            Ok(mut client) => rpc::status(&mut client)
                .await
                .ok()
                .filter(|s| s.mirror && s.replica_lag_seconds >= 0.0)
                .map(|s| s.replica_lag_seconds),
            Err(_) => None,
        };
    for m in [local, mirror, direct] {
        m.unmount()?;
    }
    drop((a, b));
    drop((standby, primary));

    let operations: Vec<Operation> = OPERATIONS
        .iter()
        .enumerate()
        .map(|(k, &name)| {
            let stats = |t: &Timings| {
                let mut sorted = t[k].clone();
                sorted.sort();
                (percentile_ms(&sorted, 0.5), percentile_ms(&sorted, 0.99))
            };
            let ((lp50, lp99), (mp50, mp99), (dp50, dp99)) =
                (stats(&timings[0]), stats(&timings[1]), stats(&timings[2]));
            Operation {
                name,
                local_ms_p50: lp50,
                mirror_ms_p50: mp50,
                direct_ms_p50: dp50,
                local_ms_p99: lp99,
                mirror_ms_p99: mp99,
                direct_ms_p99: dp99,
                mirror_vs_direct: ratio(mp50, dp50),
                mirror_vs_local: ratio(mp50, lp50),
            }
        })
        .collect();
    let path_create_aim_met = operations[0]
        .mirror_vs_direct
        .is_some_and(|r| r <= PATH_CREATE_AIM);
    let mut notes = vec![
        "changes through the mirror pay one round trip to A and the standby's replay; reads \
         none. The direct mount pays a round trip per operation, path lookups included"
            .to_string(),
        "all regions share this machine's cores and disk; only the distance is simulated"
            .to_string(),
    ];
    if args.quick {
        notes.push("--quick: too few samples for the figures to mean much".into());
    }
    Ok(MirrorReport {
        quick: args.quick,
        rtt_ms: args.rtt.as_secs_f64() * 1000.0,
        iterations,
        listing_files,
        operations,
        path_create_aim: PATH_CREATE_AIM,
        path_create_aim_met,
        replica_lag_seconds,
        notes,
    })
}

/// A `map_err` for an I/O failure `what` on `path`.
fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> BenchError {
    let path = path.to_path_buf();
    move |e| BenchError::io(what, path, e)
}

/// Makes the tree on the local mount and waits until the mirror mount shows all of it.
fn make_tree(local: &Path, mirror: &Path, listing_files: usize) -> Result<(), BenchError> {
    let deep = local.join("d1/d2/d3/d4");
    std::fs::create_dir_all(&deep).map_err(io("cannot create", &deep))?;
    let existing = deep.join("existing");
    std::fs::write(&existing, b"x").map_err(io("cannot write", &existing))?;
    let list = local.join("list");
    std::fs::create_dir_all(&list).map_err(io("cannot create", &list))?;
    for i in 0..listing_files {
        let file = list.join(format!("f{i:06}"));
        std::fs::File::create(&file).map_err(io("cannot create", &file))?;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let seen = mirror.join("list");
    loop {
        let count = std::fs::read_dir(&seen).map(|d| d.count()).unwrap_or(0);
        if count == listing_files && mirror.join("d1/d2/d3/d4/existing").exists() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(BenchError::Task(format!(
                "the mirror shows {count} of {listing_files} files after 60 s: replication stalled"
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Each operation `iterations` times on the mount at `root`.
fn measure(
    root: &Path,
    label: &str,
    iterations: usize,
    listing_files: usize,
) -> Result<Timings, BenchError> {
    let mut timings: Timings = vec![Vec::new(); OPERATIONS.len()];
    let deep = root.join("d1/d2/d3/d4");
    let list = root.join("list");
    let content: Vec<u8> = (0..SMALL_FILE).map(|i| (i % 251) as u8).collect();
    for i in 0..iterations {
        let file = deep.join(format!("newf-{label}-{i}"));
        let started = Instant::now();
        drop(std::fs::File::create(&file).map_err(io("cannot create", &file))?);
        timings[0].push(started.elapsed());

        let existing = deep.join("existing");
        let started = Instant::now();
        std::fs::metadata(&existing).map_err(io("cannot stat", &existing))?;
        timings[1].push(started.elapsed());

        let started = Instant::now();
        let count = std::fs::read_dir(&list)
            .map_err(io("cannot list", &list))?
            .count();
        timings[2].push(started.elapsed());
        if count != listing_files {
            return Err(BenchError::Task(format!(
                "{label}: {} lists {count} entries, not {listing_files}",
                list.display()
            )));
        }

        let small = root.join(format!("small-{label}-{i}"));
        let started = Instant::now();
        std::fs::write(&small, &content).map_err(io("cannot write", &small))?;
        timings[3].push(started.elapsed());
        let started = Instant::now();
        let back = std::fs::read(&small).map_err(io("cannot read", &small))?;
        timings[4].push(started.elapsed());
        if back != content {
            return Err(BenchError::Task(format!(
                "{label}: {} read back other bytes",
                small.display()
            )));
        }
    }
    Ok(timings)
}

impl MirrorReport {
    pub fn table(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "stagefs bench mirror: {:.0} ms between the regions, {} samples each, cold client caches",
            self.rtt_ms, self.iterations
        );
        let _ = writeln!(
            out,
            "{:<12} {:>10} {:>10} {:>10} {:>12} {:>12} {:>10} {:>10}",
            "operation",
            "local ms",
            "mirror ms",
            "direct ms",
            "mirror p99",
            "direct p99",
            "mir/dir",
            "mir/local"
        );
        let show = |r: Option<f64>| r.map_or("-".to_string(), |r| format!("{r:.2}"));
        for op in &self.operations {
            let _ = writeln!(
                out,
                "{:<12} {:>10.1} {:>10.1} {:>10.1} {:>12.1} {:>12.1} {:>10} {:>10}",
                op.name,
                op.local_ms_p50,
                op.mirror_ms_p50,
                op.direct_ms_p50,
                op.mirror_ms_p99,
                op.direct_ms_p99,
                show(op.mirror_vs_direct),
                show(op.mirror_vs_local)
            );
        }
        let _ = writeln!(
            out,
            "aim: path_create through the mirror at most {:.2} × the direct mount's: {}",
            self.path_create_aim,
            if self.path_create_aim_met {
                "met"
            } else {
                "MISSED"
            }
        );
        if let Some(lag) = self.replica_lag_seconds {
            let _ = writeln!(
                out,
                "mirror's status at the end: the last change its replica replayed was committed \
                 {lag:.1} s before in A"
            );
        }
        for note in &self.notes {
            let _ = writeln!(out, "note: {note}");
        }
        out
    }
}
