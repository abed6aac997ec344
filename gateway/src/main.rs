//! `stagefs-gateway`: serve a staging device over gRPC, or inspect one offline.

use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::FileTypeExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use gateway::access::{Authenticate, Tokens};
use gateway::drain::{self, DrainConfig};
use gateway::high_water::{self, HighWater};
use gateway::io::EngineKind;
use gateway::limits::{default_max_inflight, Limits};
use gateway::meta::{self, MetaConfig, MetaEngine, MetaLocation};
use gateway::meta_service::MetaService;
use gateway::node::workers::{self as node_workers, WorkerConfig};
use gateway::node::{ClientSettings, Node};
use gateway::service::StagingService;
use gateway::staging::{StagingLog, UploadPolicy};
use gateway::store_check::{self, StoreCheckMode};
use gateway::tasks::Tasks;
use gateway::volume::{open_volume_with_meta, DeviceMetaRegion, VolumeOptions};
use proto::meta::meta_server::MetaServer;
use proto::staging::staging_server::StagingServer;
use shared::size::parse_size;
use shared::store::{open_store, S3Options};
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::TcpIncoming;

#[derive(Parser)]
#[command(
    name = "stagefs-gateway",
    version,
    about = "stagefs gateway: durable shared staging on a block device, drained to an object store"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Recover the staging log on DEVICE and serve it and the metadata over gRPC, draining blocks
    /// to the store.
    // Boxed: the serve flags dwarf the other variant.
    #[command(args_override_self = true)]
    Serve(Box<ServeArgs>),
    /// Print what a device holds (superblocks, segments, waiting and corrupt records), offline.
    Inspect {
        /// Staging device or file.
        #[arg(long)]
        device: PathBuf,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
        /// List every block record with its device offset and state.
        #[arg(long)]
        records: bool,
    },
    /// Move a file system's metadata between backends, or keep a logical backup of it.
    #[command(subcommand)]
    Meta(MetaCommand),
}

/// When a namespace change is durable (`serve --namespace-sync`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum NamespaceSync {
    /// At the next fsync, fsyncdir or close of the mount that made it, and within
    /// --namespace-sync-within.
    Fsync,
    /// Before it returns.
    Change,
}

#[derive(Subcommand)]
enum MetaCommand {
    /// Write every metadata record as JSON lines (a consistent snapshot, also while clients
    /// write) to FILE, or to stdout.
    Dump {
        /// The metadata: a redb file path, a postgres:// URL (as `serve --meta`), or
        /// `device:PATH` for the metadata region inside a staging device (not while a gateway
        /// serves it).
        #[arg(long, value_parser = parse_meta_location)]
        meta: MetaLocation,
        /// Where to write the dump (default: stdout).
        file: Option<PathBuf>,
    },
    /// Load a dump into an empty metadata database (a new redb file, or an empty PostgreSQL
    /// database), from FILE or stdin.
    Load {
        /// The metadata: a redb file path, a postgres:// URL (as `serve --meta`), or
        /// `device:PATH` for the metadata region inside a staging device (not while a gateway
        /// serves it).
        #[arg(long, value_parser = parse_meta_location)]
        meta: MetaLocation,
        /// The dump to read (default: stdin).
        file: Option<PathBuf>,
    },
}

#[derive(Args)]
struct ServeArgs {
    /// Read flags from this TOML file, one `flag = value` per line (`upload_delay = "10s"`,
    /// `uploads_paused = true`); flags on the command line override it. Unknown keys are
    /// refused as unknown flags.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Staging device: a raw block device, or a regular file (created and preallocated if missing).
    #[arg(long)]
    device: PathBuf,
    /// Size of the file created when --device does not exist (e.g. 64GiB).
    #[arg(long, value_parser = parse_size, default_value = "1GiB")]
    device_size: u64,
    /// When formatting a regular file: `zeros` first writes zeros over every part of it that its
    /// file system has not written yet (holes, and the unwritten extents `fallocate` leaves),
    /// which then costs no extent conversion (an ext4 journal commit) at each `fdatasync` of the
    /// log's first pass over the device; it takes as long as writing the file once. `none` skips
    /// it. Nothing is written to a block device.
    #[arg(long, value_enum, default_value = "zeros")]
    device_fill: gateway::device::DeviceFill,
    /// Segment size used when formatting (default: device/64, between 8 MiB and 64 MiB).
    #[arg(long, value_parser = parse_size)]
    segment_size: Option<u64>,
    /// Format the device if it holds no valid stagefs superblock (destroys what it holds).
    /// A device with a valid stagefs log is never reformatted.
    #[arg(long)]
    format: bool,
    /// Object store: file:///dir, memory:// or s3://bucket[/prefix] (credentials from AWS_*).
    #[arg(long)]
    store: String,
    /// At start, write, read back and delete a small probe object in the store: `fail` refuses
    /// to start on a store that fails it, naming the problem (no such bucket, credentials refused
    /// or missing, access denied, unreachable); `warn` logs it and starts anyway (uploads retry
    /// until the store answers); `off` skips the probe.
    #[arg(long, value_enum, default_value = "fail")]
    store_check: StoreCheckMode,
    /// Address to serve gRPC on; port 0 picks a free port (printed as "listening on ADDR").
    #[arg(long, default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// I/O engine; uring falls back to psync (logged) where io_uring is unavailable.
    #[arg(long, value_enum, default_value = "uring")]
    io_engine: EngineKind,
    /// Concurrent uploads.
    #[arg(long, default_value_t = 8)]
    upload_concurrency: usize,
    /// Upload bandwidth limit in bytes per second (e.g. 100MiB); 0 for none.
    #[arg(long, value_parser = parse_size, default_value = "0")]
    upload_bandwidth: u64,
    /// Upload only between these hours of the day, local time (e.g. 22-6: from 22:00 to
    /// 06:00). Outside them blocks stay staged, except those `stagefs sync` waits for, and
    /// everything while writers wait for space or the device is 90 % full.
    #[arg(long, value_name = "START-END")]
    upload_hours: Option<gateway::staging::uploads::UploadWindow>,
    /// Wait this long after staging before uploading (blocks deleted meanwhile are never uploaded).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "0s")]
    upload_delay: Duration,
    /// Writers first: while clients are staging blocks, uploads wait for them to pause (100 ms
    /// without a new block), a block at most this long, so that the CPU and the device's
    /// bandwidth go to the writes; staged blocks are durable and readable from every mount all
    /// the same. Uploads run at once, whoever writes, for blocks `stagefs sync` waits for, while
    /// a writer waits for space, and once half the device is in use. 0s: uploads never wait.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    upload_defer_max: Duration,
    /// Failed attempts (permanent errors) after which a block is quarantined. Store outages
    /// (unreachable, timeouts, 5xx) are retried without limit and never quarantine.
    #[arg(long, default_value_t = 5)]
    upload_max_attempts: u32,
    /// First retry delay after a failed upload; doubles on each failure.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "200ms")]
    retry_initial: Duration,
    /// Longest retry delay.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    retry_max: Duration,
    /// Mounts write the blocks of a file beyond its first SIZE bytes straight to the object
    /// store instead of staging them, so one huge checkpoint does not crowd small files off the
    /// device when the store is fast; 0: stage everything.
    #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = "0")]
    direct_threshold: u64,
    /// Compact a chunk once it holds more than this many slices (every fsync of an append makes
    /// one): its bytes are staged again as one fresh slice, swapped in atomically, and the old
    /// slices deleted after --deleted-data-delay; 0: never.
    #[arg(long, value_name = "SLICES", default_value_t = 100)]
    compact_slices: usize,
    /// Share of the device in use (e.g. 90%) above which clients that can reach the object
    /// store (stagefs mounts) are told to write their blocks through to it themselves, so
    /// writes go on at store speed instead of waiting for space; `off` to always stage.
    #[arg(long, value_name = "SHARE", value_parser = high_water::parse_share, default_value = "90%")]
    staging_high_water: f64,
    /// Share of the device in use at which staging resumes after the high-water mark.
    #[arg(long, value_name = "SHARE", value_parser = high_water::parse_share, default_value = "80%")]
    staging_low_water: f64,
    /// Bytes of the device that blocks fetched from the object store may hold as read cache:
    /// blocks this gateway reads from the store for a client, and those `stagefs warmup` asks
    /// for, stay on the device and are served from there, least recently read first out. They
    /// never hold space staging needs (the log reuses it as for any uploaded block) and survive
    /// a restart. Mounts of a gateway with a read cache read uploaded blocks through it. 0: off.
    #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = "0")]
    read_cache: u64,
    /// How long a write waits for space on a full device before RESOURCE_EXHAUSTED.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    full_wait: Duration,
    /// Start with uploads held (resume with the SetUploadsPaused RPC).
    #[arg(long)]
    uploads_paused: bool,
    /// A device write, fdatasync or read that takes longer than this counts as a failed device:
    /// waiting writers get UNAVAILABLE, no more writes are accepted, reads and uploads of what is
    /// staged go on, and the gateway exits non-zero once everything it can read is uploaded.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    device_timeout: Duration,
    #[command(flatten)]
    s3: S3Options,
    /// Where the file-system metadata lives. Default: inside the staging device, in the metadata
    /// region reserved when it was formatted (see --meta-region-size), so the device alone holds
    /// everything and another node that attaches it gets the file system back. A device formatted
    /// without a region (by an older release, or with --meta-region-size 0) keeps its metadata
    /// in `<device>.meta.redb` beside a regular-file device, and needs --meta for a block device.
    /// Otherwise: a redb file path (embedded, created if missing), or
    /// `postgres://USER[:PASS]@HOST[:PORT]/DB`, a PostgreSQL database that several gateways
    /// share (the schema is created and migrated at start).
    #[arg(long, value_parser = parse_meta_location)]
    meta: Option<MetaLocation>,
    /// Size of the metadata region reserved at the end of the device when formatting (e.g.
    /// 2GiB; 0: none). Applies only when the device is formatted, like --segment-size. Default:
    /// 1/16 of the device, between 64 MiB and 16 GiB and at most a quarter of it. The embedded
    /// database fails writes with "no space" once its region is full.
    #[arg(long, value_parser = parse_size)]
    meta_region_size: Option<u64>,
    /// Memory the embedded metadata database (a redb --meta file) may use as its page cache:
    /// what the gateway holds of the metadata whatever its size (large directories included).
    #[arg(long, value_parser = parse_size, default_value = "1GiB")]
    meta_cache: u64,
    /// How long the data of deleted, overwritten or truncated ranges (and of slices left
    /// uncommitted by dead clients) is kept before it is dropped from staging and deleted from
    /// the store, so readers that resolved a slice just before can still fetch its blocks.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1h")]
    deleted_data_delay: Duration,
    /// When a namespace change (create, mkdir, symlink, link, unlink, rmdir, rename, chmod,
    /// chown, utimes, truncate, xattrs) is durable. `fsync`: at the next fsync, fsyncdir or
    /// close of the mount that made it (or any later slice commit), and within
    /// --namespace-sync-within anyway; it
    /// returns once committed and visible to every mount, as on a local file system, and a
    /// crash of the gateway loses a suffix of such changes, never one that came before a
    /// durable commit nor data a file names. `change`: every change is durable before it
    /// returns. Applies to the embedded metadata (redb); on PostgreSQL every change is durable
    /// when it returns. README, SEMANTICS.
    #[arg(long, value_enum, default_value_t = NamespaceSync::Fsync)]
    namespace_sync: NamespaceSync,
    /// With `--namespace-sync fsync`: how long a namespace change waits at most for a durable
    /// commit when no fsync or close asks for one (the most a crash can lose).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "50ms")]
    namespace_sync_within: Duration,
    /// Every this long, delete the block objects in the store that no file, pending slice or
    /// queued deletion names (leaks, such as the block of a WriteSlice cut off by a crash);
    /// 0s: never (`stagefs gc` does it on request). The store's prefix must belong to this
    /// file system alone.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "0s")]
    gc_interval: Duration,
    /// Objects younger than this are never judged by the periodic gc.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "24h")]
    gc_min_age: Duration,
    /// How often clients must heartbeat their sessions (told to them by OpenSession). A session
    /// silent for 3 intervals expires: its open handles are released and its uncommitted slices
    /// deleted.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
    heartbeat_interval: Duration,
    /// Address clients are told to reach this gateway at (host:port); default: the listen
    /// address, with the port actually bound.
    #[arg(long)]
    advertise: Option<String>,
    /// Who may connect: a TOML file of `[[token]]` entries (`name`, `secret`, `access` = "rw",
    /// "ro" or "admin", optional `root` = "/dir"). Clients present the secret (`stagefs
    /// --token-file`, `STAGEFS_TOKEN`); a missing or unknown one is refused, a read-only one may
    /// change nothing, one with a root sees that directory as the root and reaches nothing
    /// outside it, and only admins may pause uploads, retry quarantined blocks or delete
    /// blocks. Read again on SIGHUP.
    /// Without it, anyone who reaches the port may do anything (a warning says so at start).
    #[arg(long, value_name = "FILE")]
    tokens: Option<PathBuf>,
    /// Bytes of client data held at once across all requests (blocks being received or staged,
    /// read answers being built), at most a quarter of it for one tenant (or, without --tokens,
    /// one connection). A request that finds no room waits, reading nothing more from its
    /// client, and is refused with RESOURCE_EXHAUSTED after --stream-idle-timeout. Default: an
    /// eighth of this machine's memory, between 64 MiB and 4 GiB.
    #[arg(long, value_parser = parse_size)]
    max_inflight: Option<u64>,
    /// A write stream that sends nothing for this long is ended (DEADLINE_EXCEEDED) and what it
    /// held is freed.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    stream_idle_timeout: Duration,
    /// Metadata calls one client connection (a mount) may make per second, with a burst of one
    /// second's worth; past it calls wait, so a scan of the whole tree slows itself rather than
    /// everyone else. Session heartbeats are never held back. 0: no limit.
    #[arg(long, default_value_t = 0)]
    meta_ops_per_client: u32,
    /// With --tokens: metadata calls per second one tenant may make over all its connections to
    /// this gateway, with a burst of one second's worth; past it calls wait. 0: no limit.
    #[arg(long, default_value_t = 0)]
    meta_ops_per_tenant: u32,
    /// Requests one client connection may have open at once (HTTP/2 streams).
    #[arg(long, default_value_t = 256)]
    max_streams_per_connection: u32,
    /// Client connections open at once (a mount keeps a few); one past it is closed as soon
    /// as it is accepted, and counted in stagefs_gateway_connections_refused_total. The open
    /// file limit is raised to fit at start.
    #[arg(long, default_value_t = gateway::limits::DEFAULT_MAX_CONNECTIONS,
          value_parser = clap::value_parser!(u32).range(1..))]
    max_connections: u32,
    /// Serve TLS with this certificate (PEM, the chain up to the CA); needs --tls-key. Clients
    /// then connect with --tls-ca. Without it the gateway speaks plaintext HTTP/2.
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Serve Prometheus metrics (text format) at http://ADDR/metrics: staging, uploads,
    /// fdatasync times, every RPC's duration and errors, requests and bytes per tenant.
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
    /// Mutual TLS: only clients presenting a certificate signed by this CA (PEM) may connect.
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// Serve as a mirror in another region: --meta names a hot standby of the source region's
    /// PostgreSQL database, metadata reads are answered from it, and every metadata change is
    /// sent to these gateways of the source region (host:port or URL, comma-separated, tried in
    /// order) and answered once the standby has replayed it, so a client reads its own changes
    /// here at once. Both regions must serve the same --tokens file. A mirror stages the blocks
    /// of its own region's mounts on its --device and registers in the source region's registry
    /// (as a mirror: mounts there read from it, stage nothing on it); it does not run the
    /// metadata's background work (session expiry, deleted-data cleanup, compaction, gc): the
    /// source region's gateways do.
    #[arg(long, value_name = "GATEWAY,...", value_delimiter = ',')]
    source: Vec<String>,
    /// Trust the --source gateways' TLS certificates signed by this CA (PEM); a host:port in
    /// --source is then reached over TLS.
    #[arg(long, value_name = "PEM", requires = "source")]
    source_ca: Option<PathBuf>,
    /// The mirror's own admin token for the source region (a file holding the secret), with
    /// which it registers there and heartbeats: needed when the source serves --tokens.
    #[arg(long, value_name = "PATH", requires = "source")]
    source_token_file: Option<PathBuf>,
}

/// The source region's gateways of a mirror (`--source`), checked against `--meta`: a mirror
/// serves a hot standby, and a standby can only be served as a mirror.
fn mirror_source(
    args: &ServeArgs,
    meta: &dyn gateway::meta::MetaEngine,
    location: &impl std::fmt::Display,
) -> anyhow::Result<Option<gateway::mirror::Source>> {
    if args.source.is_empty() {
        anyhow::ensure!(
            !meta.is_replica(),
            "--meta {location} is a read-only replica (a hot standby): serve it as a mirror of \
             the source region with --source GATEWAY"
        );
        return Ok(None);
    }
    anyhow::ensure!(
        meta.is_replica(),
        "--source makes this gateway a mirror, whose --meta must be a hot standby of the source \
         region's PostgreSQL database; {location} takes writes"
    );
    let ca = match &args.source_ca {
        Some(path) => Some(
            std::fs::read(path)
                .with_context(|| format!("cannot read --source-ca {}", path.display()))?,
        ),
        None => None,
    };
    let source = gateway::mirror::Source::new(&args.source, ca.as_deref())?;
    tracing::info!(source = ?source.addresses(), "a mirror: changes go to the source region");
    Ok(Some(source))
}

/// The server's TLS settings from `--tls-*`, or `None` for plaintext.
fn server_tls(args: &ServeArgs) -> anyhow::Result<Option<tonic::transport::ServerTlsConfig>> {
    use tonic::transport::{Certificate, Identity, ServerTlsConfig};
    let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) else {
        return Ok(None);
    };
    let read = |what: &str, path: &PathBuf| {
        std::fs::read(path).with_context(|| format!("cannot read {what} {}", path.display()))
    };
    let mut config = ServerTlsConfig::new().identity(Identity::from_pem(
        read("--tls-cert", cert)?,
        read("--tls-key", key)?,
    ));
    if let Some(ca) = &args.tls_client_ca {
        config = config.client_ca_root(Certificate::from_pem(read("--tls-client-ca", ca)?));
    }
    Ok(Some(config))
}

fn parse_meta_location(text: &str) -> Result<MetaLocation, String> {
    if text.is_empty() || text == "device:" {
        return Err("empty: give a redb file path, a postgres:// URL or device:PATH".into());
    }
    Ok(MetaLocation::parse(text))
}

/// The metadata database, given whether the device (opened, or about to be formatted) has a
/// metadata region: `--meta`; else the region; else a redb file next to a regular-file device. A
/// block device without a region has no file system to put the file next to, so there the flag
/// is required.
fn meta_location(args: &ServeArgs, device_has_region: bool) -> anyhow::Result<MetaLocation> {
    match &args.meta {
        Some(MetaLocation::Device(path)) if path != &args.device => anyhow::bail!(
            "--meta device:{} names another device than --device {}: a gateway keeps in-device \
             metadata only on its own device",
            path.display(),
            args.device.display()
        ),
        Some(MetaLocation::Device(_)) if !device_has_region => anyhow::bail!(
            "--meta device:{} but the device has no metadata region (formatted without one, or \
             by an older release): pass --meta PATH, or leave --meta out for <device>.meta.redb",
            args.device.display()
        ),
        Some(location) => return Ok(location.clone()),
        None if device_has_region => return Ok(MetaLocation::Device(args.device.clone())),
        None => {}
    }
    match std::fs::metadata(&args.device) {
        Ok(metadata) if metadata.file_type().is_block_device() => anyhow::bail!(
            "--device {} is a block device formatted without a metadata region: pass --meta PATH \
             for the metadata database (a file on a file system that moves with the device when \
             another node takes it over)",
            args.device.display()
        ),
        // A missing device becomes a regular file (created by `open_volume`).
        _ => {
            let mut path = args.device.clone().into_os_string();
            path.push(".meta.redb");
            Ok(MetaLocation::Redb(path.into()))
        }
    }
}

/// A block device started without --meta must have a metadata region: looked at before the
/// device is opened for writing, so a missing --meta fails without touching it. A device with no
/// valid superblock yet is formatted with a region unless --meta-region-size is 0.
async fn check_block_device_meta(args: &ServeArgs) -> anyhow::Result<()> {
    let is_block = std::fs::metadata(&args.device).is_ok_and(|m| m.file_type().is_block_device());
    if args.meta.is_some() || !is_block {
        return Ok(());
    }
    let has_region = match gateway::volume::peek_meta_region(&args.device).await? {
        Some(region) => region.is_some(),
        None => args.meta_region_size != Some(0),
    };
    meta_location(args, has_region).map(|_| ())
}

async fn open_meta(
    location: &MetaLocation,
    region: Option<DeviceMetaRegion>,
    log: &Arc<StagingLog>,
    config: MetaConfig,
) -> anyhow::Result<Arc<dyn MetaEngine>> {
    let engine = match (location, region) {
        (MetaLocation::Device(_), Some(region)) => {
            let formatted_now = region.formatted_now;
            let backend = region
                .backend()
                .context("cannot open the metadata region of the device")?;
            backend.set_shared_device(Arc::new(LogOwnsDevice {
                log: log.clone(),
                runtime: tokio::runtime::Handle::current(),
            }));
            let described = backend.describe();
            if !formatted_now && backend.database_len() == 0 {
                // Served before, but never with its metadata inside: it was kept elsewhere.
                tracing::warn!(
                    region = %described,
                    "the device's metadata region was never used: if this device was served \
                     with --meta before, its files are in that database (pass the same --meta, \
                     or move them in with `stagefs-gateway meta dump` and `meta load --meta \
                     device:PATH`); starting with an empty file system"
                );
            }
            meta::open_region(backend, config)
                .await
                .with_context(|| format!("cannot open the metadata database in {described}"))?
        }
        (location, region) => {
            if region.is_some() {
                tracing::info!(meta = %location, "the device's metadata region stays unused: --meta names the metadata database");
            }
            meta::open(location, config)
                .await
                .with_context(|| format!("cannot open the metadata database {location}"))?
        }
    };
    Ok(Arc::new(engine))
}

/// The staging log as the owner of the device the metadata region lives in. Its flush is the
/// region's: one kind of `fdatasync` of the device for blocks and metadata alike (a
/// `WriteSlice`'s block is made durable by its commit's), and one place that sees a flush fail
/// (a failed flush fails the log, and the commit with it). The region's pages wait for the
/// blocks queued for a commit ([`gateway::staging::Wait::Queued`]) before they are written.
/// After the log stopped (redb's own close comes later), and where blocking is not allowed (a
/// single-threaded runtime), the region flushes by itself.
struct LogOwnsDevice {
    log: Arc<StagingLog>,
    runtime: tokio::runtime::Handle,
}

impl LogOwnsDevice {
    fn single_threaded() -> bool {
        use tokio::runtime::{Handle, RuntimeFlavor};
        Handle::try_current().is_ok_and(|h| h.runtime_flavor() == RuntimeFlavor::CurrentThread)
    }
}

impl meta::redb_region::SharedDevice for LogOwnsDevice {
    fn before_writes(&self) -> std::io::Result<()> {
        if self.log.queued_written() {
            return Ok(());
        }
        // A single-threaded runtime cannot wait here (the gateway runs none): refused, the
        // commit fails rather than go to the device ahead of its block.
        if Self::single_threaded() {
            return Err(std::io::Error::other(
                "a block queued for the metadata's flush is not written yet, and this thread \
                 cannot wait for it",
            ));
        }
        // Should the region write on a worker, block_in_place hands the worker's other tasks
        // to another thread meanwhile.
        tokio::task::block_in_place(|| self.log.wait_queued_written_here())
            .map_err(|error| std::io::Error::other(error.to_string()))
    }

    fn sync(&self) -> Option<std::io::Result<()>> {
        use gateway::staging::StagingError;
        if Self::single_threaded() {
            return None;
        }
        // redb's durable commits run on blocking threads; should one run on a worker,
        // block_in_place hands its other tasks to another worker meanwhile. The flush is
        // issued on this thread where the engine can (two wake-ups fewer per commit).
        let flushed = tokio::task::block_in_place(|| match self.log.sync_device_here() {
            Some(flushed) => flushed,
            None => self.runtime.block_on(self.log.sync_device()),
        });
        match flushed {
            Ok(()) => Some(Ok(())),
            Err(StagingError::ShuttingDown) => None,
            Err(error) => Some(Err(std::io::Error::other(error.to_string()))),
        }
    }
}

async fn open_meta_store(location: &MetaLocation) -> anyhow::Result<Arc<dyn meta::kv::KvStore>> {
    if let MetaLocation::Device(path) = location {
        let region = gateway::volume::open_meta_region_only(path).await?;
        let backend = region
            .backend()
            .context("cannot open the metadata region of the device")?;
        return meta::open_region_store(backend, None)
            .await
            .with_context(|| format!("cannot open the metadata database {location}"));
    }
    meta::open_store(location)
        .await
        .with_context(|| format!("cannot open the metadata database {location}"))
}

async fn meta_command(command: MetaCommand) -> anyhow::Result<()> {
    match command {
        MetaCommand::Dump {
            meta: location,
            file,
        } => {
            let store = open_meta_store(&location).await?;
            let summary = match &file {
                Some(path) => {
                    let out = std::fs::File::create(path)
                        .with_context(|| format!("cannot create {}", path.display()))?;
                    let mut out = std::io::BufWriter::new(out);
                    let summary = meta::dump::dump(store.as_ref(), &mut out).await?;
                    out.into_inner()?.sync_all()?;
                    summary
                }
                None => {
                    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
                    meta::dump::dump(store.as_ref(), &mut out).await?
                }
            };
            eprintln!("dumped {} records from {location}", summary.records);
        }
        MetaCommand::Load {
            meta: location,
            file,
        } => {
            let store = open_meta_store(&location).await?;
            let summary = match &file {
                Some(path) => {
                    let input = std::fs::File::open(path)
                        .with_context(|| format!("cannot open {}", path.display()))?;
                    meta::dump::load(store.as_ref(), std::io::BufReader::new(input)).await?
                }
                None => meta::dump::load(store.as_ref(), std::io::stdin().lock()).await?,
            };
            eprintln!("loaded {} records into {location}", summary.records);
        }
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let argv = match shared::config::expand(std::env::args_os().collect(), "serve") {
        Ok(argv) => argv,
        Err(error) => {
            eprintln!("error: {error}");
            return std::process::ExitCode::from(2);
        }
    };
    let cli = Cli::parse_from(argv);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => serve(*args).await,
            Command::Inspect {
                device,
                json,
                records,
            } => {
                let inspection = gateway::inspect::inspect(&device, records).await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&inspection)?);
                } else {
                    inspection.print_text();
                }
                Ok(())
            }
            Command::Meta(command) => meta_command(command).await,
        }
    });
    // A device that stopped answering leaves I/O threads blocked forever: do not wait for them.
    runtime.shutdown_timeout(Duration::from_secs(5));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("stagefs-gateway: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        !args.heartbeat_interval.is_zero(),
        "--heartbeat-interval must be longer than 0"
    );
    // Resolved before the device is opened, so a missing --meta fails without touching it.
    check_block_device_meta(&args).await?;
    let tls = server_tls(&args)?;
    if let Some(listen) = args.metrics_listen {
        shared::telemetry::install(listen, gateway::telemetry::COUNTERS)
            .map_err(anyhow::Error::msg)?;
        tracing::info!(%listen, "serving metrics at /metrics");
    }
    let tokens = Arc::new(match &args.tokens {
        Some(path) => Tokens::load(path)?,
        None => {
            tracing::warn!(
                "serving without --tokens: anyone who reaches the listen address can read, change \
                 and delete every file, and pause uploads"
            );
            Tokens::open_to_all()
        }
    });
    let store = open_store(&args.store, &args.s3)?;
    match args.store_check {
        StoreCheckMode::Off => {}
        mode => {
            match store_check::probe(store.as_ref(), &args.store).await {
                Ok(()) => tracing::info!(store = %args.store, "object store probe passed"),
                Err(error) if mode == StoreCheckMode::Warn => {
                    tracing::warn!(%error, "object store probe failed; starting anyway (--store-check warn)")
                }
                Err(error) => return Err(anyhow::Error::new(error).context(
                    "the object store failed its probe at start (--store-check warn starts anyway)",
                )),
            }
        }
    }
    anyhow::ensure!(
        !args.device_timeout.is_zero(),
        "--device-timeout must be longer than 0"
    );
    anyhow::ensure!(
        !args.stream_idle_timeout.is_zero(),
        "--stream-idle-timeout must be longer than 0"
    );
    anyhow::ensure!(
        args.max_streams_per_connection > 0,
        "--max-streams-per-connection must be at least 1"
    );
    // Every background task, in two groups: the workers stop before the log they append to.
    let tasks = Tasks::new();
    let volume = open_volume_with_meta(
        &VolumeOptions {
            path: args.device.clone(),
            create_size: args.device_size,
            segment_size: args.segment_size,
            format: args.format,
            device_fill: args.device_fill,
            engine: args.io_engine,
            full_wait: args.full_wait,
            uploads_paused: args.uploads_paused,
            device_timeout: args.device_timeout,
            read_cache_bytes: args.read_cache,
            upload: UploadPolicy {
                delay: args.upload_delay,
                max_attempts: args.upload_max_attempts.max(1),
                retry_initial: args.retry_initial,
                retry_max: args.retry_max,
                window: args.upload_hours,
                defer_max: args.upload_defer_max,
            },
        },
        args.meta_region_size,
        tasks.group(),
        debug_faults,
    )
    .await?;
    let log = volume.log;
    let meta_location = meta_location(&args, volume.meta_region.is_some())?;
    let workers = tasks.group();
    // After the device: its lock keeps a second gateway out before it reaches the database.
    let meta = open_meta(
        &meta_location,
        volume.meta_region,
        &log,
        MetaConfig {
            deleted_data_delay: args.deleted_data_delay,
            redb_cache_bytes: Some(args.meta_cache as usize),
            lazy_namespace: args.namespace_sync == NamespaceSync::Fsync
                && !matches!(meta_location, MetaLocation::Postgres(_)),
            eventual_flush: args.namespace_sync_within,
            ..MetaConfig::default()
        },
    )
    .await?;
    let source = mirror_source(&args, meta.as_ref(), &meta_location)?;
    if args.store_check != StoreCheckMode::Off {
        let id = meta
            .file_system_id()
            .await
            .context("cannot read the file system's id")?;
        match store_check::claim(store.as_ref(), &id, &args.store).await {
            Ok(()) => tracing::info!(store = %args.store, "the store's prefix belongs to this file system"),
            Err(error) if args.store_check == StoreCheckMode::Warn => {
                tracing::warn!(%error, "starting anyway (--store-check warn)")
            }
            Err(error) => return Err(anyhow::Error::new(error).context(
                "the object store's prefix is not this file system's (--store-check warn starts anyway)",
            )),
        }
    }
    drain::start(
        log.clone(),
        store.clone(),
        DrainConfig {
            concurrency: args.upload_concurrency,
            bandwidth: (args.upload_bandwidth > 0).then_some(args.upload_bandwidth),
        },
        &workers,
    );
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    let advertise = match &args.advertise {
        Some(advertise) => advertise.clone(),
        None => {
            if addr.ip().is_unspecified() {
                tracing::warn!(%addr, "listening on an unspecified address, which clients cannot dial; pass --advertise HOST:PORT");
            }
            addr.to_string()
        }
    };
    let heartbeat_interval = args.heartbeat_interval;
    let gateway_id = log.sb.gateway_id;
    // A mirror's database is read-only: it registers in the source region's, through a source
    // gateway, in the background (the source may not answer yet).
    let (registry, epoch): (Arc<dyn node_workers::GatewayRecords>, Option<u64>) = match &source {
        Some(source) => {
            let token = match &args.source_token_file {
                Some(path) => Some(
                    std::fs::read_to_string(path)
                        .with_context(|| {
                            format!("cannot read --source-token-file {}", path.display())
                        })?
                        .trim()
                        .to_string(),
                ),
                None => None,
            };
            (
                Arc::new(gateway::mirror::SourceRecords::new(source.clone(), token)),
                None,
            )
        }
        None => {
            let epoch = meta
                .register_gateway(gateway_id, &advertise, false)
                .await
                .context("cannot register this gateway in the metadata database")?;
            (
                Arc::new(node_workers::EngineRecords(meta.clone())),
                Some(epoch),
            )
        }
    };
    // Cancelled when another process registers this gateway id with a higher epoch (it took over
    // the device): this one must stop serving at once.
    let fenced = CancellationToken::new();
    let limits = Limits::new(
        args.max_inflight.unwrap_or_else(default_max_inflight),
        args.stream_idle_timeout,
        args.max_connections as usize,
    );
    raise_open_file_limit(args.max_connections as usize);
    let connections = limits.connections.clone();
    let max_inflight = limits.inflight.bytes();
    let node = Arc::new(
        Node::new(
            log.clone(),
            meta,
            store,
            ClientSettings {
                store_url: args.store.clone(),
                gateway_id,
                gateway_address: advertise.clone(),
                heartbeat_interval,
                direct_threshold: args.direct_threshold,
            },
            limits,
        )
        .with_high_water(HighWater::new(
            (args.staging_high_water > 0.0).then_some(args.staging_high_water),
            args.staging_low_water,
        ))
        .with_compaction(args.compact_slices)
        .with_metadata_in_device(matches!(meta_location, MetaLocation::Device(_))),
    );
    // A mirror too: mounts of the source region find the blocks staged here through it.
    node_workers::start_registry(&node, registry.clone(), epoch, fenced.clone(), &workers);
    if source.is_some() {
        // The deleted slices staged here are this gateway's to drop, whichever region deleted
        // them; the queue is the source's.
        node_workers::start_cleanup(
            &node,
            registry,
            WorkerConfig {
                heartbeat_interval,
                ..WorkerConfig::default()
            },
            &workers,
        );
    }
    if source.is_none() {
        // Each changes the metadata: in a mirror region the source's gateways do it.
        gateway::node::compaction::start(&node, heartbeat_interval, &workers);

        node_workers::start(
            &node,
            WorkerConfig {
                heartbeat_interval,
                ..WorkerConfig::default()
            },
            &workers,
        );
    }
    {
        // Installed before serving: SIGHUP's default action would end the process.
        use tokio::signal::unix::{signal, SignalKind};
        let hangups = signal(SignalKind::hangup()).context("cannot listen for SIGHUP")?;
        let tokens = tokens.clone();
        workers.spawn("token reload", move |stop| {
            reload_tokens_on_sighup(tokens, hangups, stop)
        });
    }
    if !args.gc_interval.is_zero() && source.is_none() {
        let (node, interval, min_age) = (node.clone(), args.gc_interval, args.gc_min_age);
        workers.spawn("gc", move |stop| async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(interval) => {}
                }
                // A failed round is logged and tried again next time: leaks wait, data is safe.
                if let Err(error) =
                    gateway::gc::collect(node.store.as_ref(), node.meta.as_ref(), min_age, true)
                        .await
                {
                    tracing::warn!(%error, "gc round failed");
                }
            }
        });
    }
    let meta_rate = gateway::meta_rate::MetaRateLayer::new(
        args.meta_ops_per_client,
        args.meta_ops_per_tenant,
        tokens.clone(),
    );
    let authenticate = Authenticate(tokens);
    if args.metrics_listen.is_some() {
        gateway::telemetry::start_gauges(&node, &workers);
        gateway::telemetry::start_usage_gauges(&node, &workers);
    }
    let service = StagingService::new(node.clone());
    let node_for_tags = node.clone();
    let mirror_node = node.clone();
    let shutdown_meta = node.meta.clone();
    let meta_service = MetaService::new(node);
    tracing::info!(
        %addr,
        %advertise,
        gateway_id = %uuid::Uuid::from_bytes(gateway_id),
        epoch,
        device = %args.device.display(),
        meta = %meta_location,
        store = %args.store,
        deleted_data_delay = ?args.deleted_data_delay,
        ?heartbeat_interval,
        max_inflight,
        max_connections = args.max_connections,
        stream_idle_timeout = ?args.stream_idle_timeout,
        tls = args.tls_cert.is_some(),
        mutual_tls = args.tls_client_ca.is_some(),
        tokens = authenticate.0.required(),
        "gateway serving Staging and Meta"
    );
    println!("listening on {addr}");
    std::io::stdout().flush()?;
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        server = server
            .tls_config(tls)
            .context("the TLS certificate or key (--tls-cert, --tls-key) is not usable")?;
    }
    let server = server
        // 4 MiB blocks need windows far above HTTP/2's 64 KiB default to stream at device speed.
        .initial_stream_window_size(Some(proto::STREAM_WINDOW_BYTES))
        .initial_connection_window_size(Some(proto::CONNECTION_WINDOW_BYTES))
        // Large DATA frames: 16 KiB ones cost a syscall each, 256 per 4 MiB block.
        .max_frame_size(Some(proto::MAX_FRAME_BYTES))
        .max_concurrent_streams(Some(args.max_streams_per_connection))
        // A client that vanished without closing its connection is found out and dropped.
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .layer(gateway::telemetry::RpcMetricsLayer)
        .layer(meta_rate)
        // Every request of both services is authenticated before any service code runs.
        .add_service(InterceptedService::new(
            StagingServer::new(service)
                .max_decoding_message_size(proto::MAX_MESSAGE_BYTES)
                .max_encoding_message_size(proto::MAX_MESSAGE_BYTES),
            authenticate.clone(),
        ))
        .add_service(InterceptedService::new(
            gateway::mirror::Forward::new(
                gateway::log_positions::LogPositions::new(
                    gateway::change_tags::ChangeTags::new(
                        MetaServer::new(meta_service)
                            .max_decoding_message_size(proto::MAX_MESSAGE_BYTES)
                            .max_encoding_message_size(proto::MAX_MESSAGE_BYTES),
                        node_for_tags.clone(),
                    ),
                    node_for_tags,
                ),
                source,
                mirror_node,
            ),
            authenticate,
        ))
        .serve_with_incoming_shutdown(
            // Without TCP_NODELAY small frames (acknowledgements) wait for the peer's delayed ACK:
            // ~40 ms per RPC. Server::tcp_nodelay does not apply to an incoming stream we pass in.
            connections.admit(TcpIncoming::from(listener).with_nodelay(Some(true))),
            {
                let (fenced, tasks) = (fenced.clone(), tasks.clone());
                async move {
                    tokio::select! {
                        _ = shutdown_signal() => {}
                        _ = fenced.cancelled() => {}
                        _ = tasks.wait_fatal() => {}
                    }
                }
            },
        );
    // After a fatal error the waiting writers were answered already; streams that clients keep
    // open must not keep a broken gateway alive.
    let fatal_bound = async {
        tasks.wait_fatal().await;
        tokio::time::sleep(Duration::from_secs(5)).await;
    };
    tokio::select! {
        served = server => served?,
        _ = fatal_bound => tracing::warn!("connections still open 5 s after a fatal error; closing them"),
    }
    tracing::info!("stopped accepting requests; in-flight acknowledgements finished");
    workers.drain(Duration::from_secs(10)).await;
    // Namespace changes acknowledged before their durable commit (--namespace-sync fsync) are
    // made durable now: a clean stop loses nothing. Not when fenced: the device is another
    // gateway's now, and this one must not write to it.
    if !fenced.is_cancelled() {
        if let Err(error) = shutdown_meta.sync().await {
            tracing::error!(%error, "could not make the last namespace changes durable at shutdown; a crash-like restart may lose them");
        }
    }
    log.shutdown().await;
    if let Some(fatal) = tasks.fatal() {
        anyhow::bail!(
            "gateway {} stopped: {fatal}; staged data that was acknowledged is on the device, and \
             a restart recovers it",
            uuid::Uuid::from_bytes(gateway_id)
        );
    }
    if fenced.is_cancelled() {
        anyhow::bail!(
            "gateway {} was taken over by a later start on its device; stopped serving, staged \
             data is intact",
            uuid::Uuid::from_bytes(gateway_id)
        );
    }
    tracing::info!("gateway stopped; staged data is intact on the device");
    Ok(())
}

/// Raises the soft limit of open files to what `max_connections` needs (each is a socket) plus
/// room for the device, the metadata and the store, within the hard limit; says so when the hard
/// limit is too low for the cap.
fn raise_open_file_limit(max_connections: usize) {
    const OWN_FILES: u64 = 1024;
    let wanted = max_connections as u64 + OWN_FILES;
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return;
    }
    if limit.rlim_cur < wanted {
        let raised = libc::rlimit {
            rlim_cur: wanted.min(limit.rlim_max),
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit reads the struct we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit.rlim_cur = raised.rlim_cur;
        }
    }
    if limit.rlim_cur < wanted {
        tracing::warn!(
            open_files = limit.rlim_cur,
            max_connections,
            "the open file limit is below --max-connections plus {OWN_FILES}: connections past it \
             fail to be accepted; raise the hard limit (LimitNOFILE= in systemd) or lower \
             --max-connections"
        );
    }
}

/// Reads the tokens file again on every SIGHUP (rotation); a file that does not parse leaves the
/// tokens in force, and says why.
async fn reload_tokens_on_sighup(
    tokens: Arc<Tokens>,
    mut hangups: tokio::signal::unix::Signal,
    stop: CancellationToken,
) -> Result<(), String> {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = hangups.recv() => match tokens.reload() {
                Ok(_) if !tokens.required() => tracing::info!("SIGHUP: no --tokens file to reload"),
                Ok(count) => tracing::info!(tenants = count, "SIGHUP: tokens reloaded"),
                Err(error) => tracing::error!(%error, "SIGHUP: tokens not reloaded; the previous ones stay in force"),
            },
        }
    }
}

/// Debug builds only: `STAGEFS_DEBUG_FAULTS=FILE` puts the fault-injecting engine under the log,
/// driven by the lines of FILE (see `gateway::io::faulty`), so that integration tests can make
/// a real gateway process meet a failing disk, which a loop device cannot be made to be here.
#[cfg(debug_assertions)]
fn debug_faults(engine: Arc<dyn gateway::io::IoEngine>) -> Arc<dyn gateway::io::IoEngine> {
    match std::env::var_os("STAGEFS_DEBUG_FAULTS") {
        Some(control) => {
            tracing::warn!(control = ?control, "debug build: device faults are injected as the control file says");
            Arc::new(gateway::io::faulty::FaultyEngine::new(engine).controlled_by(control.into()))
        }
        None => engine,
    }
}

#[cfg(not(debug_assertions))]
fn debug_faults(engine: Arc<dyn gateway::io::IoEngine>) -> Arc<dyn gateway::io::IoEngine> {
    if std::env::var_os("STAGEFS_DEBUG_FAULTS").is_some() {
        tracing::warn!(
            "STAGEFS_DEBUG_FAULTS is ignored: fault injection exists in debug builds only"
        );
    }
    engine
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
}

#[cfg(test)]
mod meta_service_flags {
    //! The metadata flags of `serve`: defaults, and where the database goes.
    use super::*;
    use gateway::volume::DEFAULT_DEVICE_TIMEOUT;

    fn serve_args(extra: &[&str]) -> ServeArgs {
        let mut argv = vec![
            "stagefs-gateway",
            "serve",
            "--device",
            "/var/tmp/dev.img",
            "--store",
            "memory://",
        ];
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Serve(args) => *args,
            _ => unreachable!(),
        }
    }

    #[test]
    fn defaults_follow_the_engine_and_the_proto() {
        let args = serve_args(&[]);
        assert_eq!(
            args.deleted_data_delay,
            MetaConfig::default().deleted_data_delay
        );
        assert_eq!(args.heartbeat_interval, Duration::from_secs(5));
        assert_eq!(args.device_timeout, DEFAULT_DEVICE_TIMEOUT);
        assert_eq!(args.advertise, None);
        assert_eq!(
            args.meta_region_size, None,
            "the default size is the device's to pick"
        );
        // In the device when it has a region; beside a device file formatted without one.
        assert_eq!(
            meta_location(&args, true).unwrap(),
            MetaLocation::Device("/var/tmp/dev.img".into())
        );
        assert_eq!(
            meta_location(&args, false).unwrap(),
            MetaLocation::Redb("/var/tmp/dev.img.meta.redb".into())
        );
        let args = serve_args(&["--meta-region-size", "2GiB"]);
        assert_eq!(args.meta_region_size, Some(2 << 30));
        let args = serve_args(&["--meta", "device:/var/tmp/dev.img"]);
        assert_eq!(
            meta_location(&args, true).unwrap(),
            MetaLocation::Device("/var/tmp/dev.img".into())
        );
        let error = meta_location(&args, false).unwrap_err().to_string();
        assert!(error.contains("no metadata region"), "{error}");
        let args = serve_args(&["--meta", "device:/elsewhere"]);
        let error = meta_location(&args, true).unwrap_err().to_string();
        assert!(error.contains("another device"), "{error}");
        let args = serve_args(&[
            "--meta",
            "/srv/meta.redb",
            "--deleted-data-delay",
            "90s",
            "--heartbeat-interval",
            "250ms",
            "--advertise",
            "gw:7070",
        ]);
        assert_eq!(
            meta_location(&args, true).unwrap(),
            MetaLocation::Redb("/srv/meta.redb".into()),
            "--meta wins over the device's region"
        );
        let args = serve_args(&["--meta", "postgres://gw:secret@db:5432/fs"]);
        let location = meta_location(&args, true).unwrap();
        assert_eq!(
            location,
            MetaLocation::Postgres("postgres://gw:secret@db:5432/fs".into())
        );
        assert_eq!(
            location.to_string(),
            "postgres://gw@db:5432/fs",
            "no password in logs"
        );
        let args = serve_args(&[
            "--meta",
            "/srv/meta.redb",
            "--deleted-data-delay",
            "90s",
            "--heartbeat-interval",
            "250ms",
            "--advertise",
            "gw:7070",
        ]);
        assert_eq!(args.deleted_data_delay, Duration::from_secs(90));
        assert_eq!(args.heartbeat_interval, Duration::from_millis(250));
        assert_eq!(args.advertise.as_deref(), Some("gw:7070"));
    }

    #[test]
    fn a_block_device_without_a_region_needs_an_explicit_meta_path() {
        // Any block device will do; the path is only stat'ed, never opened.
        let Some(device) = std::fs::read_dir("/dev").ok().and_then(|entries| {
            entries
                .flatten()
                .map(|e| e.path())
                .find(|path| std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device()))
        }) else {
            eprintln!("no block device under /dev; skipped");
            return;
        };
        let mut args = serve_args(&[]);
        args.device = device.clone();
        // Formatted without a region: the flag is needed.
        let error = meta_location(&args, false).unwrap_err().to_string();
        assert!(error.contains("--meta PATH"), "{error}");
        // With one, the metadata is in it.
        assert_eq!(
            meta_location(&args, true).unwrap(),
            MetaLocation::Device(device.clone())
        );
        args.meta = Some(MetaLocation::Redb("/srv/meta.redb".into()));
        assert_eq!(
            meta_location(&args, false).unwrap(),
            MetaLocation::Redb("/srv/meta.redb".into())
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> ServeArgs {
        let argv = args.iter().map(std::ffi::OsString::from).collect();
        let argv = shared::config::expand(argv, "serve").unwrap();
        match Cli::try_parse_from(argv)
            .unwrap_or_else(|e| panic!("{e}"))
            .command
        {
            Command::Serve(args) => *args,
            _ => unreachable!(),
        }
    }

    #[test]
    fn the_example_config_is_a_valid_serve_command_and_flags_override_it() {
        let example = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../scripts/deploy/gateway.example.toml"
        );
        let args = parse(&["stagefs-gateway", "serve", "--config", example]);
        assert_eq!(
            args.device,
            PathBuf::from("/dev/disk/by-id/stagefs-staging")
        );
        assert_eq!(args.max_inflight, Some(1 << 30));
        assert_eq!(args.max_connections, 4096);
        assert!(args.tls_cert.is_some() && args.tokens.is_some());
        let args = parse(&[
            "stagefs-gateway",
            "serve",
            "--config",
            example,
            "--max-connections",
            "2",
            "--device",
            "/tmp/dev",
        ]);
        assert_eq!(args.max_connections, 2);
        assert_eq!(args.device, PathBuf::from("/tmp/dev"));
    }

    #[test]
    fn an_unknown_key_is_an_unknown_flag() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.toml");
        std::fs::write(
            &path,
            "device = \"/d\"\nstore = \"memory://\"\nno_such_flag = 1\n",
        )
        .unwrap();
        let argv = [
            "stagefs-gateway",
            "serve",
            "--config",
            path.to_str().unwrap(),
        ]
        .iter()
        .map(std::ffi::OsString::from)
        .collect();
        let argv = shared::config::expand(argv, "serve").unwrap();
        let error = Cli::try_parse_from(argv)
            .err()
            .expect("refused")
            .to_string();
        assert!(error.contains("--no-such-flag"), "{error}");
    }
}
