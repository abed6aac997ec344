//! `stagefs status GATEWAY`, `stagefs sync PATH…` and `stagefs warmup PATH…`.
//!
//! `sync` waits until every block of the named files (directories: every file below them) is in
//! the object store: it finds the mount's gateway in `/proc/self/mountinfo` (the source of a
//! stagefs mount is `stagefs:ADDR`), lists each file's slices through the gateway's metadata
//! service, and asks the gateway to wait for their blocks (`WaitUploaded`; blocks the gateway no
//! longer holds are checked in the store). On a terminal it shows progress.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use proto::meta::meta_client::MetaClient;
use proto::meta::ReadChunkRequest;
use proto::staging::staging_client::StagingClient;
use proto::staging::{BlockState, StatBlocksRequest, StatusRequest, WaitUploadedRequest};
use shared::size::format_size;
use shared::{BlockKey, CHUNK_SIZE};

use crate::fs::{connect_gateway, meta_client, staging_client, GatewayAccess, GatewayChannel};

async fn staging(
    gateway: &str,
    access: &GatewayAccess,
) -> anyhow::Result<(GatewayChannel, StagingClient<GatewayChannel>)> {
    let channel = connect_gateway(gateway, access)
        .await
        .with_context(|| format!("is stagefs-gateway running at {gateway}?"))?;
    let client = staging_client(channel.clone());
    Ok((channel, client))
}

/// `stagefs status GATEWAY`: the gateway's Status, readable (or JSON).
pub async fn status(gateway: &str, access: &GatewayAccess, json: bool) -> anyhow::Result<()> {
    let (channel, mut client) = staging(gateway, access).await?;
    let s = client
        .status(StatusRequest {})
        .await
        .with_context(|| format!("Status from {gateway}"))?
        .into_inner();
    let gateways = registry(&mut meta_client(channel.clone()), gateway).await?;
    // An older gateway has no ListMounts: status shows the rest.
    let mounts = match meta_client(channel.clone())
        .list_mounts(proto::meta::Empty {})
        .await
    {
        Ok(response) => Some(response.into_inner().mounts),
        Err(status) if status.code() == tonic::Code::Unimplemented => None,
        Err(status) => {
            return Err(anyhow::Error::new(status).context(format!("ListMounts from {gateway}")))
        }
    };
    let now = shared::meta::now_ns();
    let addresses: BTreeMap<Vec<u8>, String> = gateways
        .iter()
        .map(|g| (g.id.to_vec(), g.address.clone()))
        .collect();
    // A gateway by its address in the registry, else by its id.
    let name = |id: &[u8]| {
        addresses
            .get(id)
            .cloned()
            .unwrap_or_else(|| gateway_uuid(id))
    };
    if json {
        let registered: Vec<_> = gateways
            .iter()
            .map(|g| {
                serde_json::json!({"id": gateway_uuid(&g.id), "address": g.address, "epoch": g.epoch,
                    "alive": g.alive, "healthy": g.healthy, "staged_blocks": g.staged_blocks,
                    "staged_bytes": g.staged_bytes, "queue_len": g.queue_len,
                    "oldest_waiting_ms": g.oldest_waiting_ms,
                    "at_risk_bytes": if g.alive { 0 } else { g.staged_bytes },
                    "mirror": g.mirror})
            })
            .collect();
        let quarantined: Vec<_> = s
            .quarantined
            .iter()
            .map(|q| serde_json::json!({"key": q.key, "len": q.len, "failed_attempts": q.failed_attempts, "last_error": q.last_error}))
            .collect();
        let mounts_json: Option<Vec<_>> = mounts.as_ref().map(|mounts| {
            mounts
                .iter()
                .map(|m| {
                    serde_json::json!({"description": m.description, "tenant": m.tenant,
                        "heartbeat_age_ms": now.saturating_sub(m.last_heartbeat_ns) / 1_000_000,
                        "using": m.using_gateways.iter().map(|id| gateway_uuid(id)).collect::<Vec<_>>(),
                        "avoiding": m.avoiding_gateways.iter().map(|id| gateway_uuid(id)).collect::<Vec<_>>()})
                })
                .collect()
        });
        let compaction = serde_json::json!({
            "compact_slices": s.compact_slices, "chunks_total": s.compacted_chunks_total,
            "slices_total": s.compacted_slices_total, "bytes_total": s.compacted_bytes_total,
            "skipped_total": s.compactions_skipped_total,
        });
        let mut value = serde_json::json!({
            "gateway_id": s.gateway_id, "generation": s.generation, "device_path": s.device_path,
            "io_engine": s.io_engine, "store_url": s.store_url, "device_bytes": s.device_bytes,
            "device_used_bytes": s.device_used_bytes, "segments_total": s.segments_total,
            "segments_free": s.segments_free, "blocks_staged": s.blocks_staged,
            "bytes_staged": s.bytes_staged, "blocks_uploading": s.blocks_uploading,
            "queue_len": s.queue_len, "oldest_waiting_age_ms": s.oldest_waiting_age_ms,
            "upload_bytes_per_sec": s.upload_bytes_per_sec, "uploaded_blocks_total": s.uploaded_blocks_total,
            "uploaded_bytes_total": s.uploaded_bytes_total, "upload_retries_total": s.upload_retries_total,
            "upload_failures_total": s.upload_failures_total, "blocks_quarantined": s.blocks_quarantined,
            "quarantined": quarantined, "uploads_paused": s.uploads_paused,
            "upload_hours": s.upload_hours, "upload_window_closed": s.upload_window_closed,
            "staging_high_water": s.staging_high_water, "staging_low_water": s.staging_low_water,
            "writing_through": s.writing_through,
            "written_through_blocks_total": s.written_through_blocks_total,
            "written_through_bytes_total": s.written_through_bytes_total,
            "compaction": compaction,
            "last_store_error": s.last_store_error, "recovery_ms": s.recovery_ms,
            "recovered_blocks": s.recovered_blocks, "corrupt_records": s.corrupt_records,
            "writers_waiting_for_space": s.writers_waiting_for_space, "syncs_total": s.syncs_total,
            "healthy": s.healthy, "failure": s.failure,
            "gateways": registered, "mounts": mounts_json,
        });
        value["mirror"] = s.mirror.into();
        value["upload_defer_max_ms"] = s.upload_defer_max_ms.into();
        value["uploads_deferred"] = s.uploads_deferred.into();
        value["read_cache"] = serde_json::json!({
            "budget_bytes": s.read_cache_bytes, "blocks": s.read_cache_blocks,
            "used_bytes": s.read_cache_used_bytes, "fills_total": s.read_cache_fills_total,
            "hits_total": s.read_cache_hits_total, "hit_bytes_total": s.read_cache_hit_bytes_total,
        });
        // Known only on a mirror, once its replica applied a change.
        value["replica_lag_seconds"] = (s.mirror && s.replica_lag_seconds >= 0.0)
            .then_some(s.replica_lag_seconds)
            .into();
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    let pct = |used: u64, total: u64| {
        if total == 0 {
            0.0
        } else {
            100.0 * used as f64 / total as f64
        }
    };
    println!(
        "gateway      {gateway} (id {}, generation {})",
        s.gateway_id, s.generation
    );
    println!("device       {} ({} engine)", s.device_path, s.io_engine);
    if !s.healthy {
        println!(
            "health       FAILED, accepting no writes, exiting once what it can read is uploaded: {}",
            s.failure
        );
    }
    println!(
        "space        {} of {} used ({:.1}%), {} of {} segments free",
        format_size(s.device_used_bytes),
        format_size(s.device_bytes),
        pct(s.device_used_bytes, s.device_bytes),
        s.segments_free,
        s.segments_total
    );
    println!("store        {}", s.store_url);
    if s.mirror {
        let lag = if s.replica_lag_seconds >= 0.0 {
            format!("{:.1} s", s.replica_lag_seconds)
        } else {
            "not known yet".to_string()
        };
        println!(
            "mirror       metadata read from a replica of the source region's, changes sent \
             there; last change replayed was committed {lag} ago there"
        );
    }
    if s.staging_high_water > 0.0 {
        println!(
            "high water   {:.0}% (staging resumes at {:.0}%): {}; {} blocks ({}) sent back to be \
             written through since start",
            s.staging_high_water * 100.0,
            s.staging_low_water * 100.0,
            if s.writing_through {
                "WRITING THROUGH now: mounts PUT new blocks to the store themselves"
            } else {
                "staging"
            },
            s.written_through_blocks_total,
            format_size(s.written_through_bytes_total)
        );
    }
    if s.read_cache_bytes > 0 {
        println!(
            "read cache   {} blocks, {} of {} (--read-cache); {} fills, {} hits ({}) since start",
            s.read_cache_blocks,
            format_size(s.read_cache_used_bytes),
            format_size(s.read_cache_bytes),
            s.read_cache_fills_total,
            s.read_cache_hits_total,
            format_size(s.read_cache_hit_bytes_total)
        );
    }
    if s.compact_slices > 0 {
        println!(
            "compaction   chunks of more than {} slices: {} compacted ({} slices into one each, \
             {} staged again), {} skipped since start",
            s.compact_slices,
            s.compacted_chunks_total,
            s.compacted_slices_total,
            format_size(s.compacted_bytes_total),
            s.compactions_skipped_total
        );
    }
    println!(
        "staged       {} blocks, {} not yet uploaded ({} uploading)",
        s.blocks_staged,
        format_size(s.bytes_staged),
        s.blocks_uploading
    );
    println!(
        "queue        {} blocks, oldest waiting {:.1} s{}",
        s.queue_len,
        s.oldest_waiting_age_ms as f64 / 1000.0,
        if s.uploads_paused {
            " (uploads PAUSED)".to_string()
        } else if s.upload_window_closed {
            format!(
                " (uploads HELD outside --upload-hours {}; synced blocks still go)",
                s.upload_hours
            )
        } else if s.uploads_deferred {
            format!(
                " (uploads WAIT for writers to pause, each block at most --upload-defer-max {:.1} s)",
                s.upload_defer_max_ms as f64 / 1000.0
            )
        } else {
            String::new()
        }
    );
    println!(
        "uploaded     {} blocks, {} in total; now {}/s",
        s.uploaded_blocks_total,
        format_size(s.uploaded_bytes_total),
        format_size(s.upload_bytes_per_sec as u64)
    );
    println!(
        "retries      {}, failed blocks {}",
        s.upload_retries_total, s.upload_failures_total
    );
    if !s.last_store_error.is_empty() {
        println!("store error  {}", s.last_store_error);
    }
    println!("quarantined  {} blocks", s.blocks_quarantined);
    for q in &s.quarantined {
        println!(
            "  {} ({} bytes, {} attempts): {}",
            q.key, q.len, q.failed_attempts, q.last_error
        );
    }
    println!(
        "recovery     {} ms, {} blocks recovered, {} corrupt records",
        s.recovery_ms, s.recovered_blocks, s.corrupt_records
    );
    if s.writers_waiting_for_space > 0 {
        println!(
            "WAITING      {} writers wait for space on a full device",
            s.writers_waiting_for_space
        );
    }
    println!("gateways     {} registered in the metadata", gateways.len());
    for g in &gateways {
        let state = match (g.alive, g.healthy) {
            (true, true) => "alive",
            (true, false) => "alive, FAILED (exiting for a restart)",
            (false, _) => "NOT ALIVE",
        };
        println!(
            "  {} at {}{} (epoch {}): {state}, {} blocks ({}) not yet uploaded, {} queued (oldest {:.1} s), as of its heartbeat {:.1} s ago",
            gateway_uuid(&g.id),
            g.address,
            if g.mirror { " (a mirror region's)" } else { "" },
            g.epoch,
            g.staged_blocks,
            format_size(g.staged_bytes),
            g.queue_len,
            g.oldest_waiting_ms as f64 / 1e3,
            now.saturating_sub(g.last_heartbeat_ns) as f64 / 1e9
        );
        if !g.alive && g.staged_bytes > 0 {
            println!(
                "    AT RISK: {} staged there are on its device only: restart `stagefs-gateway \
                 serve` on that device (attach it to another node if this one is lost); reads of \
                 those blocks wait for it meanwhile",
                format_size(g.staged_bytes)
            );
        }
    }
    match &mounts {
        None => println!("mounts       (this gateway does not list them)"),
        Some(mounts) => {
            println!("mounts       {} open sessions", mounts.len());
            for m in mounts {
                let names = |ids: &[bytes::Bytes]| {
                    ids.iter().map(|id| name(id)).collect::<Vec<_>>().join(", ")
                };
                let tenant = if m.tenant.is_empty() {
                    String::new()
                } else {
                    format!(" (tenant {})", m.tenant)
                };
                let using = if m.using_gateways.is_empty() {
                    "gateways not reported".to_string()
                } else {
                    format!("using {}", names(&m.using_gateways))
                };
                let avoiding = if m.avoiding_gateways.is_empty() {
                    String::new()
                } else {
                    format!(
                        "; LEFT OUT (not alive, or calls failed) {}",
                        names(&m.avoiding_gateways)
                    )
                };
                println!(
                    "  {}{tenant}: {using}{avoiding}; heartbeat {:.1} s ago",
                    m.description,
                    now.saturating_sub(m.last_heartbeat_ns) as f64 / 1e9
                );
            }
        }
    }
    Ok(())
}

/// The gateway address of the stagefs mount holding `path`, from /proc/self/mountinfo.
fn gateway_of(path: &Path) -> anyhow::Result<(PathBuf, String)> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .context("cannot read /proc/self/mountinfo")?;
    let mut best: Option<(PathBuf, String)> = None;
    for line in mountinfo.lines() {
        // ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER_OPTIONS
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(dash) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        let (Some(mountpoint), Some(fstype), Some(source)) =
            (fields.get(4), fields.get(dash + 1), fields.get(dash + 2))
        else {
            continue;
        };
        let Some(gateway) = source.strip_prefix("stagefs:") else {
            continue;
        };
        if !fstype.starts_with("fuse") {
            continue;
        }
        let mountpoint = PathBuf::from(mountpoint.replace("\\040", " "));
        if path.starts_with(&mountpoint)
            && best
                .as_ref()
                .is_none_or(|(m, _)| mountpoint.as_os_str().len() > m.as_os_str().len())
        {
            best = Some((mountpoint, gateway.to_string()));
        }
    }
    best.with_context(|| format!("{} is not inside a stagefs mount", path.display()))
}

/// A block of a file: its key and length, the gateway that staged it, and the chunk of the file
/// that lists it.
struct Block {
    key: BlockKey,
    len: u64,
    stager: Vec<u8>,
    chunk_index: u64,
}

/// Every block of a file, from its chunks' slices (holes have none).
async fn file_blocks(
    meta: &mut MetaClient<GatewayChannel>,
    ino: u64,
    size: u64,
) -> anyhow::Result<Vec<Block>> {
    file_layout(meta, ino, size, &mut 0).await
}

/// [`file_blocks`], and the most slices one chunk of the file holds raised into `most_slices`.
async fn file_layout(
    meta: &mut MetaClient<GatewayChannel>,
    ino: u64,
    size: u64,
    most_slices: &mut usize,
) -> anyhow::Result<Vec<Block>> {
    let mut keys = Vec::new();
    for chunk_index in 0..size.div_ceil(CHUNK_SIZE) {
        let slices = meta
            .read_chunk(ReadChunkRequest { ino, chunk_index })
            .await
            .with_context(|| format!("ReadChunk of inode {ino}, chunk {chunk_index}"))?
            .into_inner()
            .slices;
        *most_slices = (*most_slices).max(slices.len());
        for slice in slices.iter().filter(|s| s.slice_id != 0) {
            keys.extend(
                shared::meta::slice_block_keys(slice.slice_id, slice.len)
                    .into_iter()
                    .map(|key| Block {
                        key,
                        len: key.len(),
                        stager: slice.gateway_id.to_vec(),
                        chunk_index,
                    }),
            );
        }
    }
    Ok(keys)
}

/// A file found below a path: (path, inode, size).
type FileEntry = (PathBuf, u64, u64);

/// The files named (directories: every file below), as (path, inode, size), grouped by the
/// gateways of the stagefs mount each is in.
fn files_by_mount(paths: &[PathBuf]) -> anyhow::Result<BTreeMap<String, Vec<FileEntry>>> {
    let mut by_mount: BTreeMap<String, Vec<FileEntry>> = BTreeMap::new();
    for path in paths {
        let path = path
            .canonicalize()
            .with_context(|| format!("cannot resolve {}", path.display()))?;
        let (_, gateways) = gateway_of(&path)?;
        collect_files(&path, by_mount.entry(gateways).or_default())?;
    }
    Ok(by_mount)
}

fn collect_files(path: &Path, out: &mut Vec<(PathBuf, u64, u64)>) -> anyhow::Result<()> {
    let meta = std::fs::symlink_metadata(path)
        .with_context(|| format!("cannot stat {}", path.display()))?;
    if meta.is_dir() {
        for entry in
            std::fs::read_dir(path).with_context(|| format!("cannot list {}", path.display()))?
        {
            collect_files(&entry?.path(), out)?;
        }
    } else if meta.is_file() {
        out.push((path.to_path_buf(), meta.ino(), meta.size()));
    }
    Ok(())
}

/// `stagefs du PATH…`: bytes, files and directories below each path, from the directory
/// statistics the metadata keeps (a read per directory below, none per file).
pub async fn du(paths: &[PathBuf], access: &GatewayAccess, json: bool) -> anyhow::Result<()> {
    let mut rows = Vec::new();
    // One connection per mount, whatever the number of paths in it.
    let mut connected: BTreeMap<String, (String, MetaClient<GatewayChannel>)> = BTreeMap::new();
    for path in paths {
        let path = path
            .canonicalize()
            .with_context(|| format!("cannot resolve {}", path.display()))?;
        let ino = std::fs::symlink_metadata(&path)
            .with_context(|| format!("cannot stat {}", path.display()))?
            .ino();
        let (_, gateways) = gateway_of(&path)?;
        if !connected.contains_key(&gateways) {
            let (gateway, channel) = connect_any(&gateways, access).await?;
            connected.insert(gateways.clone(), (gateway, meta_client(channel)));
        }
        let (gateway, meta) = connected.get_mut(&gateways).expect("connected above");
        let usage = meta
            .dir_usage(proto::meta::InodeRequest { ino })
            .await
            .map_err(|status| anyhow::anyhow!("DirUsage on {gateway}: {}", status.message()))?
            .into_inner();
        rows.push((path, usage));
    }
    if json {
        let value: Vec<_> = rows
            .iter()
            .map(|(path, u)| {
                serde_json::json!({"path": path, "bytes": u.bytes, "files": u.files,
                    "dirs": u.dirs})
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        for (path, u) in &rows {
            println!(
                "{:>10}  {:>9} files  {:>7} dirs  {}",
                format_size(u.bytes),
                u.files,
                u.dirs,
                path.display()
            );
        }
    }
    Ok(())
}

/// `stagefs sync PATH…`: returns when every block of those files is in the object store. The
/// blocks go to the store next on their gateways (`upload_now`), whatever the upload delay, and
/// sync says what holds them: paused uploads, a failing store, a dead gateway.
pub async fn sync(
    paths: &[PathBuf],
    access: &GatewayAccess,
    timeout: Option<Duration>,
) -> anyhow::Result<()> {
    let deadline = timeout.map(|t| std::time::Instant::now() + t);
    let by_mount = files_by_mount(paths)?;
    for (mount_gateways, files) in by_mount {
        let (mount_gateway, channel) = connect_any(&mount_gateways, access).await?;
        let mut meta = meta_client(channel);
        // Blocks grouped by the gateway that staged them: each waits on its own gateway.
        let mut by_stager: BTreeMap<Vec<u8>, Vec<(BlockKey, u64)>> = BTreeMap::new();
        for (path, ino, size) in &files {
            for block in file_blocks(&mut meta, *ino, *size)
                .await
                .with_context(|| format!("listing the blocks of {}", path.display()))?
            {
                by_stager
                    .entry(block.stager)
                    .or_default()
                    .push((block.key, block.len));
            }
        }
        let mut gateways = registry(&mut meta, &mount_gateway).await?;
        for (stager, blocks) in by_stager {
            let address = wait_alive(
                &mut meta,
                &mut gateways,
                &mount_gateway,
                &stager,
                blocks.len(),
                deadline,
            )
            .await?;
            wait_uploaded(&address, access, files.len(), &blocks, deadline).await?;
        }
    }
    Ok(())
}

/// Blocks named in one `Warmup` call (the gateway's bound).
const WARM_BATCH: usize = 64;

/// What a warmup did, summed over its calls.
#[derive(Default, serde::Serialize)]
struct WarmupTotals {
    files: u64,
    blocks: u64,
    bytes: u64,
    fetched: u64,
    fetched_bytes: u64,
    held: u64,
    not_uploaded: u64,
    not_kept: u64,
    seconds: f64,
}

/// `stagefs warmup PATH…`: every uploaded block of these files (directories: all files below)
/// is read from the object store into the read cache of the mount's gateway (`--read-cache`),
/// so that reads of them come from its device. Shows progress; blocks not uploaded yet are
/// left where they are staged (reads get them from that gateway).
pub async fn warmup(paths: &[PathBuf], access: &GatewayAccess, json: bool) -> anyhow::Result<()> {
    let by_mount = files_by_mount(paths)?;
    let terminal = std::io::stderr().is_terminal() && !json;
    let mut reports = Vec::new();
    for (mount_gateways, files) in by_mount {
        let started = std::time::Instant::now();
        let (gateway, channel) = connect_any(&mount_gateways, access).await?;
        let mut meta = meta_client(channel.clone());
        let mut client = staging_client(channel);
        let mut wanted = Vec::new();
        for (path, ino, size) in &files {
            for block in file_blocks(&mut meta, *ino, *size)
                .await
                .with_context(|| format!("listing the blocks of {}", path.display()))?
            {
                let warm = proto::staging::WarmBlock {
                    key: block.key.to_string(),
                    ino: *ino,
                    chunk_index: block.chunk_index,
                };
                wanted.push((warm, block.len));
            }
        }
        let mut totals = WarmupTotals {
            files: files.len() as u64,
            blocks: wanted.len() as u64,
            bytes: wanted.iter().map(|(_, len)| len).sum(),
            ..WarmupTotals::default()
        };
        let mut last_said = std::time::Instant::now();
        let mut done_bytes = 0u64;
        for batch in wanted.chunks(WARM_BATCH) {
            let answer = client
                .warmup(proto::staging::WarmupRequest {
                    blocks: batch.iter().map(|(warm, _)| warm.clone()).collect(),
                })
                .await
                .map_err(|status| anyhow::anyhow!("Warmup on {gateway}: {}", status.message()))?
                .into_inner();
            totals.fetched += answer.fetched;
            totals.fetched_bytes += answer.fetched_bytes;
            totals.held += answer.held;
            totals.not_uploaded += answer.not_uploaded;
            totals.not_kept += answer.not_kept;
            done_bytes += batch.iter().map(|(_, len)| len).sum::<u64>();
            let every = if terminal {
                Duration::from_millis(500)
            } else {
                Duration::from_secs(10)
            };
            if !json && last_said.elapsed() >= every {
                let rate = done_bytes as f64 / started.elapsed().as_secs_f64().max(1e-3);
                let line = format!(
                    "warmup: {} of {} left ({} files on {gateway}), {}/s",
                    format_size(totals.bytes.saturating_sub(done_bytes)),
                    format_size(totals.bytes),
                    files.len(),
                    format_size(rate as u64)
                );
                if terminal {
                    eprint!("\r{line}   ");
                    let _ = std::io::stderr().flush();
                } else {
                    eprintln!("{line}");
                }
                last_said = std::time::Instant::now();
            }
        }
        totals.seconds = started.elapsed().as_secs_f64();
        if terminal {
            eprintln!();
        }
        if !json {
            eprintln!(
                "warmup: {} files, {} blocks ({}) on {gateway} after {:.1} s: {} read from the \
                 store ({}), {} already there, {} not uploaded yet (read from the gateway that \
                 staged them), {} not kept (no free space on the device)",
                totals.files,
                totals.blocks,
                format_size(totals.bytes),
                totals.seconds,
                totals.fetched,
                format_size(totals.fetched_bytes),
                totals.held,
                totals.not_uploaded,
                totals.not_kept
            );
        }
        reports.push(serde_json::json!({"gateway": gateway, "totals": totals}));
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
    }
    Ok(())
}

/// The first of `gateways` (comma-separated, as a mount's source names them) that answers.
async fn connect_any(
    gateways: &str,
    access: &GatewayAccess,
) -> anyhow::Result<(String, GatewayChannel)> {
    let mut last = None;
    for gateway in gateways.split(',').filter(|g| !g.is_empty()) {
        match staging(gateway, access).await {
            Ok((channel, _)) => return Ok((gateway.to_string(), channel)),
            Err(error) => last = Some(error),
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("no gateway address in {gateways:?}")))
}

/// Every gateway registered in the metadata, as the gateway at `gateway` reads it.
async fn registry(
    meta: &mut MetaClient<GatewayChannel>,
    gateway: &str,
) -> anyhow::Result<Vec<proto::meta::GatewayInfo>> {
    Ok(meta
        .list_gateways(proto::meta::Empty {})
        .await
        .with_context(|| format!("ListGateways from {gateway}"))?
        .into_inner()
        .gateways)
}

/// The address of the gateway `stager` once the registry (`known`, read again while waiting)
/// shows it alive, saying meanwhile that sync waits for it. A gateway the registry does not
/// know (data from before the registry) is asked about through the mount's gateway, which
/// checks the store.
async fn wait_alive(
    meta: &mut MetaClient<GatewayChannel>,
    known: &mut Vec<proto::meta::GatewayInfo>,
    mount_gateway: &str,
    stager: &[u8],
    blocks: usize,
    deadline: Option<std::time::Instant>,
) -> anyhow::Result<String> {
    let mut said = false;
    loop {
        match known.iter().find(|g| g.id[..] == stager[..]) {
            None => return Ok(mount_gateway.to_string()),
            Some(g) if g.alive => return Ok(g.address.clone()),
            Some(g) => {
                if !said {
                    eprintln!(
                        "sync: waiting for gateway {} (last at {}), which is not alive: {blocks} \
                         blocks of these files are staged there only; serve its device again \
                         (`stagefs-gateway serve`, on another node if this one is lost)",
                        gateway_uuid(stager),
                        g.address
                    );
                    said = true;
                }
            }
        }
        if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
            anyhow::bail!(
                "timed out: gateway {} is still not alive, holding {blocks} blocks of these files",
                gateway_uuid(stager)
            );
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        *known = registry(meta, mount_gateway).await?;
    }
}

fn gateway_uuid(id: &[u8]) -> String {
    match <[u8; 16]>::try_from(id) {
        Ok(bytes) => uuid::Uuid::from_bytes(bytes).to_string(),
        Err(_) => format!("{id:02x?}"),
    }
}

/// What keeps blocks from the store right now, as the gateway's status tells it; `None` when
/// they are simply on their way.
fn holder(gateway: &str, status: &proto::staging::StatusResponse) -> Option<String> {
    if status.uploads_paused {
        return Some(format!(
            "uploads are PAUSED on {gateway} (`stagefs uploads resume {gateway}`)"
        ));
    }
    if status.upload_window_closed {
        // Blocks a sync waits for go anyway; said so it is clear why nothing else moves.
        return Some(format!(
            "{gateway} holds other uploads outside --upload-hours {}; these go now",
            status.upload_hours
        ));
    }
    if !status.last_store_error.is_empty() && status.upload_bytes_per_sec < 1.0 {
        return Some(format!(
            "{gateway} cannot upload: {} (it retries until the store answers)",
            status.last_store_error
        ));
    }
    None
}

/// Waits until the gateway at `gateway` says every one of `blocks` is in the object store,
/// having asked it to upload them next. Shows progress (bytes left, rate, and what holds the
/// blocks): on a terminal as one line kept up to date, otherwise as a line whenever what holds
/// them changes and every 10 s.
async fn wait_uploaded(
    gateway: &str,
    access: &GatewayAccess,
    files: usize,
    blocks: &[(BlockKey, u64)],
    deadline: Option<std::time::Instant>,
) -> anyhow::Result<()> {
    let terminal = std::io::stderr().is_terminal();
    let (_, client) = staging(gateway, access).await?;
    let total_bytes: u64 = blocks.iter().map(|(_, len)| len).sum();
    let keys: Vec<String> = blocks.iter().map(|(k, _)| k.to_string()).collect();
    let started = std::time::Instant::now();
    let mut wait = client.clone();
    let wait_keys = keys.clone();
    let timeout_ms = deadline.map_or(0, |d| {
        d.saturating_duration_since(std::time::Instant::now())
            .as_millis()
            .max(1) as u64
    });
    let mut waiting = tokio::spawn(async move {
        wait.wait_uploaded(WaitUploadedRequest {
            keys: wait_keys,
            timeout_ms,
            upload_now: true,
        })
        .await
    });
    let mut client = client;
    let mut last_said: Option<(String, std::time::Instant)> = None;
    let mut last_done: Option<(u64, std::time::Instant)> = None;
    let every = if terminal {
        Duration::from_millis(500)
    } else {
        Duration::from_secs(1)
    };
    loop {
        tokio::select! {
            result = &mut waiting => {
                result.context("sync task failed")?.map_err(|status| match status.code() {
                    tonic::Code::DeadlineExceeded => anyhow::anyhow!("timed out: {}", status.message()),
                    _ => anyhow::anyhow!("gateway {gateway}: {}", status.message()),
                })?;
                break;
            }
            _ = tokio::time::sleep(every) => {
                let Ok(stats) = client.stat_blocks(StatBlocksRequest { keys: keys.clone(), check_store: false }).await else {
                    continue;
                };
                let done: u64 = stats.into_inner().blocks.iter()
                    .filter(|b| b.state == BlockState::Uploaded as i32 || b.state == BlockState::Unknown as i32)
                    .map(|b| b.len)
                    .sum();
                let now = std::time::Instant::now();
                let rate = match last_done {
                    Some((before, at)) if now > at => (done.saturating_sub(before)) as f64 / (now - at).as_secs_f64(),
                    _ => 0.0,
                };
                last_done = Some((done, now));
                let held = match client.status(StatusRequest {}).await {
                    Ok(status) => holder(gateway, &status.into_inner()),
                    Err(_) => None,
                };
                let line = format!(
                    "sync: {} of {} left ({files} files on {gateway}), {}/s{}",
                    format_size(total_bytes.saturating_sub(done)),
                    format_size(total_bytes),
                    format_size(rate as u64),
                    held.as_ref().map_or(String::new(), |h| format!("; waiting: {h}"))
                );
                if terminal {
                    eprint!("\r{line}   ");
                    let _ = std::io::stderr().flush();
                } else {
                    let changed = last_said.as_ref().is_none_or(|(said, at)| {
                        held.as_deref().unwrap_or("") != said || at.elapsed() >= Duration::from_secs(10)
                    });
                    if changed {
                        eprintln!("{line}");
                        last_said = Some((held.unwrap_or_default(), now));
                    }
                }
            }
        }
    }
    if terminal {
        eprintln!();
    }
    eprintln!(
        "sync: {files} files, {} blocks ({}) staged on {gateway} in the object store after {:.1} s",
        keys.len(),
        format_size(total_bytes),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `stagefs sync --all GATEWAY`: uploads everything the gateway holds now, whatever the upload
/// delay, and returns once nothing waits (an admin's call).
pub async fn sync_all(
    gateway: &str,
    access: &GatewayAccess,
    timeout: Option<Duration>,
) -> anyhow::Result<()> {
    let (_, mut client) = staging(gateway, access).await?;
    let started = std::time::Instant::now();
    let status = client
        .drain(proto::staging::DrainRequest {
            timeout_ms: timeout.map_or(0, |t| t.as_millis().max(1) as u64),
            upload_now: true,
        })
        .await
        .map_err(|status| anyhow::anyhow!("gateway {gateway}: {}", status.message()))?
        .into_inner()
        .status
        .unwrap_or_default();
    eprintln!(
        "sync: everything staged on {gateway} is in the object store after {:.1} s ({} uploaded \
         in its life)",
        started.elapsed().as_secs_f64(),
        format_size(status.uploaded_bytes_total)
    );
    Ok(())
}

/// `stagefs uploads pause|resume GATEWAY`: holds or resumes the gateway's upload drain (staging
/// goes on either way).
pub async fn set_uploads_paused(
    gateway: &str,
    access: &GatewayAccess,
    paused: bool,
) -> anyhow::Result<()> {
    let (_, mut client) = staging(gateway, access).await?;
    client
        .set_uploads_paused(proto::staging::SetUploadsPausedRequest { paused })
        .await
        .with_context(|| format!("SetUploadsPaused on {gateway}"))?;
    eprintln!(
        "uploads {} on {gateway}",
        if paused { "paused" } else { "resumed" }
    );
    Ok(())
}

/// `stagefs gc GATEWAY`: the block objects in the store that nothing names (leaks), deleted
/// with `delete`.
pub async fn gc(
    gateway: &str,
    access: &GatewayAccess,
    delete: bool,
    min_age: Duration,
    json: bool,
) -> anyhow::Result<()> {
    let (_, mut client) = staging(gateway, access).await?;
    let report = client
        .collect_garbage(proto::staging::CollectGarbageRequest {
            delete,
            min_age_ms: min_age.as_millis().try_into().unwrap_or(u64::MAX),
        })
        .await
        .map_err(|status| anyhow::anyhow!("gateway {gateway}: {}", status.message()))?
        .into_inner();
    if json {
        let value = serde_json::json!({
            "objects_listed": report.objects_listed, "other_objects": report.other_objects,
            "too_young": report.too_young, "unreferenced_objects": report.unreferenced_objects,
            "unreferenced_bytes": report.unreferenced_bytes,
            "unreferenced_keys": report.unreferenced_keys,
            "deleted_objects": report.deleted_objects, "delete_failures": report.delete_failures,
        });
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        println!(
            "gc: {} objects listed; {} block objects ({}) that no file, pending slice or queued \
             deletion names{}",
            report.objects_listed,
            report.unreferenced_objects,
            format_size(report.unreferenced_bytes),
            if delete {
                format!(
                    "; {} deleted, {} could not be",
                    report.deleted_objects, report.delete_failures
                )
            } else {
                " (kept: --delete removes them)".to_string()
            }
        );
        println!(
            "    {} other objects are not blocks (never touched); {} blocks are younger than \
             --min-age {} (not judged)",
            report.other_objects,
            report.too_young,
            humantime::format_duration(min_age)
        );
        for key in report.unreferenced_keys.iter().take(20) {
            println!("  {key}");
        }
        if report.unreferenced_keys.len() > 20 {
            println!("  … (--json lists up to 1000)");
        }
    }
    if report.delete_failures > 0 {
        anyhow::bail!(
            "{} unreferenced objects could not be deleted (the gateway's log says why)",
            report.delete_failures
        );
    }
    Ok(())
}

/// Where one file's blocks are, by `stagefs fsck`'s count.
#[derive(Default)]
struct FileCheck {
    blocks: u64,
    missing: Vec<String>,
    quarantined: u64,
    on_dead_gateway: u64,
}

/// Keys per `StatBlocks` of fsck.
const FSCK_BATCH: usize = 1000;

/// `stagefs fsck GATEWAY`: every block of every committed slice of every file is staged on a
/// gateway or in the object store; names each file that is not. Fails when any is missing.
pub async fn fsck(gateway: &str, access: &GatewayAccess, json: bool) -> anyhow::Result<()> {
    let (channel, home) = staging(gateway, access).await?;
    let mut meta = meta_client(channel);
    let files = walk_files(&mut meta).await?;
    let registry = registry(&mut meta, gateway).await?;
    // Blocks by the gateway that staged them, each with the file it belongs to.
    let mut by_stager: BTreeMap<Vec<u8>, Vec<(String, usize)>> = BTreeMap::new();
    let mut checks: Vec<FileCheck> = Vec::new();
    // The longest slice list of any chunk: what slice compaction keeps short.
    let mut most_slices = 0;
    for (index, (path, ino, size)) in files.iter().enumerate() {
        checks.push(FileCheck::default());
        for Block { key, stager, .. } in file_layout(&mut meta, *ino, *size, &mut most_slices)
            .await
            .with_context(|| format!("listing the blocks of {path}"))?
        {
            checks[index].blocks += 1;
            by_stager
                .entry(stager)
                .or_default()
                .push((key.to_string(), index));
        }
    }
    for (stager, blocks) in by_stager {
        let alive = registry
            .iter()
            .find(|g| g.id[..] == stager[..] && g.alive)
            .map(|g| g.address.clone());
        // A dead gateway's blocks: the store may have them; the rest wait on its device.
        let mut client = match &alive {
            Some(address) => staging(address, access).await?.1,
            None => home.clone(),
        };
        for batch in blocks.chunks(FSCK_BATCH) {
            let stats = client
                .stat_blocks(StatBlocksRequest {
                    keys: batch.iter().map(|(k, _)| k.clone()).collect(),
                    check_store: true,
                })
                .await
                .map_err(|status| anyhow::anyhow!("StatBlocks: {}", status.message()))?
                .into_inner()
                .blocks;
            for (stat, (key, file)) in stats.iter().zip(batch) {
                let check = &mut checks[*file];
                match BlockState::try_from(stat.state).unwrap_or(BlockState::Unknown) {
                    BlockState::Staged | BlockState::Uploading | BlockState::Uploaded => {}
                    BlockState::Quarantined => check.quarantined += 1,
                    _ if alive.is_none() => check.on_dead_gateway += 1,
                    _ => check.missing.push(key.clone()),
                }
            }
        }
    }
    let blocks: u64 = checks.iter().map(|c| c.blocks).sum();
    let missing: usize = checks.iter().map(|c| c.missing.len()).sum();
    let quarantined: u64 = checks.iter().map(|c| c.quarantined).sum();
    let on_dead: u64 = checks.iter().map(|c| c.on_dead_gateway).sum();
    let troubled: Vec<_> = files
        .iter()
        .zip(&checks)
        .filter(|(_, c)| !c.missing.is_empty() || c.quarantined > 0 || c.on_dead_gateway > 0)
        .collect();
    if json {
        let value = serde_json::json!({
            "files": files.len(), "blocks": blocks, "missing_blocks": missing,
            "quarantined_blocks": quarantined, "blocks_on_dead_gateways": on_dead,
            "most_slices_in_a_chunk": most_slices,
            "troubled_files": troubled.iter().map(|((path, ino, _), c)| serde_json::json!({
                "path": path, "ino": ino, "blocks": c.blocks, "missing": c.missing,
                "quarantined": c.quarantined, "on_dead_gateway": c.on_dead_gateway,
            })).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        println!(
            "fsck: {} files, {blocks} blocks: {missing} MISSING, {quarantined} quarantined, \
             {on_dead} only on gateways that are not alive; at most {most_slices} slices in a \
             chunk",
            files.len()
        );
        for ((path, ino, _), c) in &troubled {
            if let Some(first) = c.missing.first() {
                println!(
                    "  MISSING      {path} (inode {ino}): {} of {} blocks in no gateway and not \
                     in the store, e.g. {first}",
                    c.missing.len(),
                    c.blocks
                );
            }
            if c.quarantined > 0 {
                println!(
                    "  QUARANTINED  {path}: {} blocks kept on their gateway after failed uploads \
                     (stagefs status)",
                    c.quarantined
                );
            }
            if c.on_dead_gateway > 0 {
                println!(
                    "  WAITING      {path}: {} blocks only on a gateway that is not alive (serve \
                     its device again)",
                    c.on_dead_gateway
                );
            }
        }
    }
    if missing > 0 {
        anyhow::bail!("{missing} blocks of {} files are missing", troubled.len());
    }
    Ok(())
}

/// Every regular file of the file system: path, inode, size (a walk through the metadata).
async fn walk_files(
    meta: &mut MetaClient<GatewayChannel>,
) -> anyhow::Result<Vec<(String, u64, u64)>> {
    const PAGE: u32 = 1000;
    let mut files = Vec::new();
    let mut dirs = vec![(shared::meta::ROOT_INO, String::new())];
    while let Some((dir, path)) = dirs.pop() {
        let mut after_cookie = 0;
        loop {
            let entries = meta
                .read_dir(proto::meta::ReadDirRequest {
                    ino: dir,
                    after_cookie,
                    limit: PAGE,
                })
                .await
                .with_context(|| format!("listing {}/", path))?
                .into_inner()
                .entries;
            for entry in &entries {
                let Some(attr) = &entry.attr else { continue };
                let child = format!("{path}/{}", String::from_utf8_lossy(&entry.name));
                match proto::meta::FileKind::try_from(attr.kind) {
                    Ok(proto::meta::FileKind::Dir) => dirs.push((attr.ino, child)),
                    Ok(proto::meta::FileKind::File) => files.push((child, attr.ino, attr.size)),
                    _ => {}
                }
            }
            match entries.last() {
                Some(last) if entries.len() == PAGE as usize => after_cookie = last.cookie,
                _ => break,
            }
        }
    }
    Ok(files)
}
