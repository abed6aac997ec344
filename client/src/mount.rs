//! `stagefs mount` and `stagefs umount`.
//!
//! A mount opens a session with the gateway's metadata service, learns the object store's URL
//! from it (credentials come from this machine's `AWS_*` variables), and serves the kernel through
//! [`FuseFs`]. In the background (the default) the command returns once the mount is in place, or
//! with the reason it could not be made; SIGTERM/SIGINT or `stagefs umount` unmount it, after
//! which every open file is flushed and the session closed.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use fuser::{MountOption, SessionACL};
use shared::size::parse_size;
use shared::store::{open_store, S3Options};

use crate::fs::cluster::{Cluster, FailoverMeta};
use crate::fs::{tls_hint, Fs, FsConfig, FsError, StoreBlocks};
use crate::fuse::{CachePolicy, FuseFs};

#[derive(Debug, clap::Args)]
pub struct MountArgs {
    /// Gateway addresses (host:port), comma-separated. Any one of them bootstraps the mount,
    /// which then learns every gateway of the file system from the registry they share, stages
    /// new data across the live ones and moves its calls away from one that dies. Listing more
    /// than one only matters when the first may be down at mount time.
    pub gateway: String,
    /// Directory to mount on.
    pub mountpoint: PathBuf,
    /// Read flags from this TOML file, one `flag = value` per line (`attr_ttl = "5s"`,
    /// `token_file = "/etc/stagefs/token"`); flags on the command line override it. GATEWAY
    /// and MOUNTPOINT stay on the command line.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Stay in the foreground (logs to stderr) instead of returning once mounted.
    #[arg(long, short)]
    pub foreground: bool,
    /// How long the kernel may cache attributes; also how long the mount remembers that a file
    /// has no `security.capability` (the kernel asks before every write).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1s")]
    pub attr_ttl: Duration,
    /// How long the kernel may cache name lookups.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1s")]
    pub entry_ttl: Duration,
    /// Let the kernel gather small writes in its page cache (FUSE writeback cache).
    #[arg(long)]
    pub writeback_cache: bool,
    /// Threads reading kernel requests.
    #[arg(long, default_value_t = 4)]
    pub threads: usize,
    /// Threads of the async runtime that sends the mount's calls to the gateways and the store.
    /// One by default: with more, every call wakes a second, idle thread that finds nothing to
    /// do (six thread switches per call against two), and on a small VM those wake-ups cost more
    /// than the thread does (`python3 -m venv` 4-7% faster with one, other workloads unchanged).
    /// Raise it for many large writers on a machine with cores to spare.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub runtime_threads: u16,
    /// Do not take the leases of the directories this mount makes. With a lease, a lookup of a
    /// name the mount did not add to such a directory is answered "absent" without a round trip
    /// (three lookups in four of a package install); another mount's addition to it then waits
    /// for the lease to come back, about a quarter second once (README, SEMANTICS).
    #[arg(long)]
    pub no_dir_leases: bool,
    /// Mount read-only: every change fails with EROFS.
    #[arg(long)]
    pub read_only: bool,
    /// Largest write the kernel sends in one request.
    #[arg(long, value_parser = parse_size, default_value = "1MiB")]
    pub max_write: u64,
    /// Let other users access the mount (the kernel still checks modes: default_permissions).
    /// The default when run as root, as a shared file system is used by many users; run as
    /// another user it needs user_allow_other in /etc/fuse.conf.
    #[arg(long, overrides_with = "no_allow_other")]
    pub allow_other: bool,
    /// Leave updatedb's configuration alone. By default a mount run as root adds fuse.stagefs
    /// to PRUNEFS in --updatedb-conf, so nightly `updatedb` runs on every node do not walk the
    /// shared tree (and the metadata engine) each night.
    #[arg(long)]
    pub no_prune_updatedb: bool,
    /// The updatedb configuration a root mount adds fuse.stagefs to (nothing happens when it
    /// does not exist).
    #[arg(long, value_name = "PATH", default_value = crate::updatedb::DEFAULT_CONF)]
    pub updatedb_conf: std::path::PathBuf,
    /// Serve Prometheus metrics (text format) at http://ADDR/metrics: every FUSE operation's
    /// count, time and errors (by errno), bytes read and written, block cache hits and misses.
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Only the user who mounted may access the mount, even when run as root. The later of
    /// --allow-other and --no-allow-other wins (so the command line overrides a --config file).
    #[arg(long, overrides_with = "allow_other")]
    pub no_allow_other: bool,
    /// Where written blocks go. `gateway`: staged on the gateway's device, so close and fsync
    /// return once they are durable there and uploads happen in the background. `through`: the
    /// client PUTs every block to the object store itself, and close and fsync return only once
    /// the store has them (safe without a gateway device, and as slow as the store).
    #[arg(long, value_enum, default_value_t = WriteMode::Gateway)]
    pub write_mode: WriteMode,
    /// Blocks written at once across all files (to the gateway, or to the store in write-through).
    #[arg(long, default_value_t = 16)]
    pub max_uploads: usize,
    /// Uncommitted bytes one open file may hold in memory; the write that crosses it waits
    /// until everything written so far is durable and committed.
    #[arg(long, value_parser = parse_size, default_value = "64MiB")]
    pub max_dirty_per_file: u64,
    /// Blocks (4 MiB) fetched ahead of a sequential reader.
    #[arg(long, default_value_t = 4)]
    pub readahead_blocks: u64,
    /// Bytes of whole blocks kept in memory for readers (0: none).
    #[arg(long, value_parser = parse_size, default_value = "128MiB")]
    pub block_cache_size: u64,
    #[command(flatten)]
    pub s3: S3Options,
    /// How long a call waits for an unreachable gateway to come back (restarted, or its device
    /// taken over by another node) before it fails with EIO: a write moves to another live
    /// gateway at once, but a read of a block only that gateway holds, or any call when it is
    /// the only gateway, waits, as on an NFS hard mount. 0 fails at once.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "120s")]
    pub takeover_wait: Duration,
    #[command(flatten)]
    pub access: crate::cli::AccessArgs,
}

/// Where a mount writes its blocks (`--write-mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WriteMode {
    /// Stage blocks on the gateway; uploads happen in the background.
    Gateway,
    /// PUT blocks to the object store from the client; close/fsync wait for the store.
    Through,
}

/// Mounts and serves until unmounted. Runs its own runtime (and, in the background, its own
/// process), so it is called outside any tokio runtime.
pub fn mount(args: MountArgs) -> anyhow::Result<()> {
    let mountpoint = args
        .mountpoint
        .canonicalize()
        .with_context(|| format!("mount point {} does not exist", args.mountpoint.display()))?;
    if !mountpoint.is_dir() {
        bail!("mount point {} is not a directory", mountpoint.display());
    }
    if args.foreground {
        return serve(&args, &mountpoint, None);
    }
    // Fork before any thread exists; the parent reports the child's outcome and exits.
    let (read_end, write_end) = nix::unistd::pipe().context("cannot create a pipe")?;
    // SAFETY: no other threads exist yet in this process.
    match unsafe { nix::unistd::fork() }.context("cannot fork the mount process")? {
        nix::unistd::ForkResult::Parent { .. } => {
            drop(write_end);
            let mut answer = String::new();
            std::fs::File::from(read_end).read_to_string(&mut answer)?;
            match answer.strip_prefix("ok") {
                Some(_) => Ok(()),
                None if answer.is_empty() => bail!("the mount process exited before mounting"),
                None => bail!("{answer}"),
            }
        }
        nix::unistd::ForkResult::Child => {
            drop(read_end);
            let _ = nix::unistd::setsid();
            detach_stdio();
            let result = serve(&args, &mountpoint, Some(write_end));
            std::process::exit(if result.is_ok() { 0 } else { 1 });
        }
    }
}

fn detach_stdio() {
    if let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        for fd in 0..=2 {
            // SAFETY: dup2 onto the standard descriptors of this (single-threaded) process.
            unsafe { libc::dup2(null.as_raw_fd(), fd) };
        }
    }
}

/// Tells the waiting parent (if any) how the mount went.
fn report(ready: &mut Option<OwnedFd>, message: &str) {
    if let Some(fd) = ready.take() {
        let _ = std::fs::File::from(fd).write_all(message.as_bytes());
    }
}

fn serve(args: &MountArgs, mountpoint: &Path, mut ready: Option<OwnedFd>) -> anyhow::Result<()> {
    let result = serve_inner(args, mountpoint, &mut ready);
    if let Err(e) = &result {
        report(&mut ready, &format!("{e:#}"));
    }
    result
}

fn serve_inner(
    args: &MountArgs,
    mountpoint: &Path,
    ready: &mut Option<OwnedFd>,
) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.runtime_threads.into())
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    if let Some(listen) = args.metrics_listen {
        runtime
            .block_on(async { shared::telemetry::install(listen, METRICS_COUNTERS) })
            .map_err(anyhow::Error::msg)?;
        tracing::info!(%listen, "serving metrics at /metrics");
    }
    let fs = runtime.block_on(connect(args))?;
    let fs = Arc::new(fs);
    let cache = CachePolicy {
        attr_ttl: args.attr_ttl,
        entry_ttl: args.entry_ttl,
        writeback_cache: args.writeback_cache,
        max_write: u32::try_from(args.max_write).unwrap_or(u32::MAX),
    };
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        MountOption::FSName(format!("stagefs:{}", args.gateway)),
        MountOption::Subtype("stagefs".into()),
        MountOption::DefaultPermissions,
        if args.read_only {
            MountOption::RO
        } else {
            MountOption::RW
        },
    ];
    if allow_other(args) {
        config.acl = SessionACL::All;
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 && !args.no_prune_updatedb {
        // A mount is no worse off for a configuration it could not change: say so and go on.
        match crate::updatedb::prune(&args.updatedb_conf) {
            Ok(true) => tracing::info!(
                conf = %args.updatedb_conf.display(),
                "added {} to PRUNEFS, so updatedb leaves stagefs mounts out",
                crate::updatedb::FS_TYPE
            ),
            Ok(false) => {}
            Err(error) => tracing::warn!(
                conf = %args.updatedb_conf.display(),
                %error,
                "cannot add {} to PRUNEFS: nightly updatedb runs may walk this mount",
                crate::updatedb::FS_TYPE
            ),
        }
    }
    config.n_threads = Some(args.threads.max(1));
    let adapter = FuseFs::new(fs.clone(), runtime.handle().clone(), cache);
    let mut session = fuser::Session::new(adapter, mountpoint, &config).with_context(|| {
        format!(
            "cannot mount on {} (is fuse3 installed?)",
            mountpoint.display()
        )
    })?;
    let mut unmounter = session.unmount_callable();
    let mount_path = mountpoint.to_path_buf();
    runtime.spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!(mountpoint = %mount_path.display(), "signal: unmounting");
        if let Err(e) = unmounter.unmount() {
            tracing::warn!(error = %e, "unmount failed; trying fusermount3 -u -z");
            let _ = std::process::Command::new("fusermount3")
                .arg("-u")
                .arg("-z")
                .arg(&mount_path)
                .status();
        }
    });
    tracing::info!(mountpoint = %mountpoint.display(), gateway = %args.gateway, "mounted");
    report(ready, "ok");
    session.run().context("FUSE session failed")?;
    tracing::info!("unmounted");
    Ok(())
}

/// The gateway addresses of `GATEWAY[,GATEWAY…]`.
fn gateway_addresses(list: &str) -> anyhow::Result<Vec<String>> {
    let addresses: Vec<String> = list
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(String::from)
        .collect();
    if addresses.is_empty() {
        bail!("no gateway address in {list:?}: give host:port[,host:port…]");
    }
    Ok(addresses)
}

async fn connect(args: &MountArgs) -> anyhow::Result<Fs> {
    let access = args.access.access()?;
    let seeds = gateway_addresses(&args.gateway)?;
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host = host.trim();
    let description = format!(
        "stagefs mount {} on {host} (pid {})",
        args.mountpoint.display(),
        std::process::id()
    );
    let (cluster, grant) = Cluster::open(seeds, access.clone(), args.takeover_wait, &description)
        .await
        .map_err(|error| match error {
            FsError::MetaUnavailable { .. } => {
                anyhow::anyhow!("{error}{}", tls_hint(&access))
            }
            other => other.into(),
        })
        .with_context(|| format!("is stagefs-gateway running at {}?", args.gateway))?;
    let meta = Arc::new(FailoverMeta::new(cluster.clone(), grant.session_id));
    // A tenant confined to a directory is not given the store: the gateways read it for it.
    let store = if grant.read_through_gateway {
        if args.write_mode == WriteMode::Through {
            bail!(
                "this token is confined to a directory and is not given the object store: \
                 --write-mode through cannot be used with it"
            );
        }
        None
    } else {
        Some(open_store(&grant.store_url, &args.s3).with_context(|| {
            format!("cannot open the gateway's object store {}", grant.store_url)
        })?)
    };
    let config = FsConfig {
        read_only: args.read_only,
        max_concurrent_uploads: args.max_uploads.max(1),
        readahead_blocks: args.readahead_blocks,
        block_cache_bytes: args.block_cache_size,
        max_dirty_bytes_per_file: args.max_dirty_per_file.max(1),
        write_slices: args.write_mode == WriteMode::Gateway,
        capability_absence_ttl: args.attr_ttl,
        attr_ttl: args.attr_ttl,
        gateway_access: access,
        dir_leases: !args.no_dir_leases && !args.read_only,
        ..FsConfig::default()
    };
    Ok(match args.write_mode {
        WriteMode::Gateway => Fs::with_gateways(meta, cluster, store, &grant, config),
        WriteMode::Through => {
            let store = store.expect("a through mount has a store");
            let blocks = Arc::new(StoreBlocks::new(store.clone()));
            Fs::new(meta, blocks, store, &grant, config)
        }
    })
}

/// Counters a mount's `/metrics` shows, at zero, before their first event.
const METRICS_COUNTERS: &[&str] = &[
    "stagefs_fuse_read_bytes_total",
    "stagefs_fuse_written_bytes_total",
    "stagefs_block_cache_hits_total",
    "stagefs_block_cache_misses_total",
    "stagefs_written_through_bytes_total",
    "stagefs_released_handles_total",
    "stagefs_release_calls_total",
    "stagefs_closed_file_attrs_answered_total",
    "stagefs_dir_lease_absent_answers_total",
    "stagefs_dir_leases_recalled_total",
];

/// Whether other users may access the mount: asked for, or by default when mounted by root
/// (`--no-allow-other` turns that off).
fn allow_other(args: &MountArgs) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    args.allow_other || (root && !args.no_allow_other)
}

/// `stagefs umount MOUNTPOINT`: unmounts through fusermount3. Applications flush their data on
/// close; the mount process then releases its handles and closes its session.
pub fn umount(mountpoint: &Path) -> anyhow::Result<()> {
    let status = std::process::Command::new("fusermount3")
        .arg("-u")
        .arg(mountpoint)
        .status()
        .context("cannot run fusermount3 (is fuse3 installed?)")?;
    if !status.success() {
        bail!(
            "fusermount3 -u {} failed ({status}); is a file still open there, or is it not a stagefs mount?",
            mountpoint.display()
        );
    }
    Ok(())
}
