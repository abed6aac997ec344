//! `stagefs status GATEWAY` and `stagefs sync PATH…`.
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
    let gateways = meta_client(channel.clone())
        .list_gateways(proto::meta::Empty {})
        .await
        .with_context(|| format!("ListGateways from {gateway}"))?
        .into_inner()
        .gateways;
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
                    "at_risk_bytes": if g.alive { 0 } else { g.staged_bytes }})
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
        let value = serde_json::json!({
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
            "last_store_error": s.last_store_error, "recovery_ms": s.recovery_ms,
            "recovered_blocks": s.recovered_blocks, "corrupt_records": s.corrupt_records,
            "writers_waiting_for_space": s.writers_waiting_for_space, "syncs_total": s.syncs_total,
            "healthy": s.healthy, "failure": s.failure,
            "gateways": registered, "mounts": mounts_json,
        });
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
            " (uploads PAUSED)"
        } else {
            ""
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
            "  {} at {} (epoch {}): {state}, {} blocks ({}) not yet uploaded, {} queued (oldest {:.1} s), as of its heartbeat {:.1} s ago",
            gateway_uuid(&g.id),
            g.address,
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

/// A block to wait for: its key and length, and the gateway that staged it.
type Block = (BlockKey, u64, Vec<u8>);

/// Every block of a file, from its chunks' slices (holes have none).
async fn file_blocks(
    meta: &mut MetaClient<GatewayChannel>,
    ino: u64,
    size: u64,
) -> anyhow::Result<Vec<Block>> {
    let mut keys = Vec::new();
    for chunk_index in 0..size.div_ceil(CHUNK_SIZE) {
        let slices = meta
            .read_chunk(ReadChunkRequest { ino, chunk_index })
            .await
            .with_context(|| format!("ReadChunk of inode {ino}, chunk {chunk_index}"))?
            .into_inner()
            .slices;
        for slice in slices.iter().filter(|s| s.slice_id != 0) {
            keys.extend(
                shared::meta::slice_block_keys(slice.slice_id, slice.len)
                    .into_iter()
                    .map(|key| (key, key.len(), slice.gateway_id.to_vec())),
            );
        }
    }
    Ok(keys)
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

/// `stagefs sync PATH…`: returns when every block of those files is in the object store.
pub async fn sync(
    paths: &[PathBuf],
    access: &GatewayAccess,
    timeout: Option<Duration>,
) -> anyhow::Result<()> {
    // Files grouped by the gateway of their mount.
    let mut by_gateway: BTreeMap<String, Vec<(PathBuf, u64, u64)>> = BTreeMap::new();
    for path in paths {
        let path = path
            .canonicalize()
            .with_context(|| format!("cannot resolve {}", path.display()))?;
        let (_, gateway) = gateway_of(&path)?;
        collect_files(&path, by_gateway.entry(gateway).or_default())?;
    }
    for (mount_gateway, files) in by_gateway {
        let (channel, _) = staging(&mount_gateway, access).await?;
        let mut meta = meta_client(channel);
        // Blocks grouped by the gateway that staged them: each waits on its own gateway.
        let mut by_stager: BTreeMap<Vec<u8>, Vec<(BlockKey, u64)>> = BTreeMap::new();
        for (path, ino, size) in &files {
            for (key, len, stager) in file_blocks(&mut meta, *ino, *size)
                .await
                .with_context(|| format!("listing the blocks of {}", path.display()))?
            {
                by_stager.entry(stager).or_default().push((key, len));
            }
        }
        let registry = meta
            .list_gateways(proto::meta::Empty {})
            .await
            .with_context(|| format!("ListGateways from {mount_gateway}"))?
            .into_inner()
            .gateways;
        for (stager, blocks) in by_stager {
            // A gateway the registry does not know (data from before the registry): the mount's
            // gateway checks the store for it.
            let address = match registry.iter().find(|g| g.id[..] == stager[..]) {
                Some(g) if !g.alive => anyhow::bail!(
                    "gateway {} at {} is not alive: {} blocks of these files were staged there \
                     and are not known to be uploaded; sync waits for it once it is back",
                    gateway_uuid(&stager),
                    g.address,
                    blocks.len()
                ),
                Some(g) => g.address.clone(),
                None => mount_gateway.clone(),
            };
            wait_uploaded(&address, access, files.len(), &blocks, timeout).await?;
        }
    }
    Ok(())
}

fn gateway_uuid(id: &[u8]) -> String {
    match <[u8; 16]>::try_from(id) {
        Ok(bytes) => uuid::Uuid::from_bytes(bytes).to_string(),
        Err(_) => format!("{id:02x?}"),
    }
}

/// Waits until the gateway at `gateway` says every one of `blocks` is in the object store,
/// showing progress on a terminal.
async fn wait_uploaded(
    gateway: &str,
    access: &GatewayAccess,
    files: usize,
    blocks: &[(BlockKey, u64)],
    timeout: Option<Duration>,
) -> anyhow::Result<()> {
    let progress = std::io::stderr().is_terminal();
    let (_, client) = staging(gateway, access).await?;
    let total_bytes: u64 = blocks.iter().map(|(_, len)| len).sum();
    let keys: Vec<String> = blocks.iter().map(|(k, _)| k.to_string()).collect();
    let started = std::time::Instant::now();
    let mut wait = client.clone();
    let wait_keys = keys.clone();
    let timeout_ms = timeout.map_or(0, |t| t.as_millis() as u64);
    let mut waiting = tokio::spawn(async move {
        wait.wait_uploaded(WaitUploadedRequest {
            keys: wait_keys,
            timeout_ms,
        })
        .await
    });
    let mut client = client;
    loop {
        tokio::select! {
            result = &mut waiting => {
                result.context("sync task failed")?.map_err(|status| match status.code() {
                    tonic::Code::DeadlineExceeded => anyhow::anyhow!("timed out: {}", status.message()),
                    _ => anyhow::anyhow!("gateway {gateway}: {}", status.message()),
                })?;
                break;
            }
            _ = tokio::time::sleep(Duration::from_millis(500)), if progress => {
                let stats = client.stat_blocks(StatBlocksRequest { keys: keys.clone() }).await;
                if let Ok(stats) = stats {
                    let done: u64 = stats.into_inner().blocks.iter()
                        .filter(|b| b.state == BlockState::Uploaded as i32 || b.state == BlockState::Unknown as i32)
                        .map(|b| b.len)
                        .sum();
                    eprint!("\rsync: {} of {} uploaded ({files} files, gateway {gateway})   ", format_size(done), format_size(total_bytes));
                    let _ = std::io::stderr().flush();
                }
            }
        }
    }
    if progress {
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
