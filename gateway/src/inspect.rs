//! `stagefs-gateway inspect`: what a device holds, read offline without changing a byte.

use std::path::Path;
use std::sync::Arc;

use serde::Serialize;

use crate::device::open_device;
use crate::format::SuperblockError;
use crate::io::{open_engine, EngineKind};
use crate::recovery::{scan, CorruptRecord, ScannedSegment};
use crate::volume::{best_superblock, read_superblocks};

#[derive(Serialize)]
pub struct SuperblockCopy {
    pub copy: usize,
    pub valid: bool,
    pub generation: Option<u64>,
    pub error: Option<String>,
}

#[derive(Serialize)]
pub struct RecordInfo {
    pub key: String,
    pub segment: u64,
    pub device_offset: u64,
    pub data_offset: u64,
    pub len: u64,
    pub lsn: u64,
    pub state: &'static str,
}

/// The embedded metadata's region (format version 2).
#[derive(Serialize)]
pub struct MetaRegionInfo {
    pub offset: u64,
    pub bytes: u64,
    /// What the region's own headers say: the database's length and what it can hold, or why
    /// they could not be read.
    pub database_bytes: Option<u64>,
    pub capacity_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Serialize)]
pub struct Inspection {
    pub device: String,
    pub format_version: u32,
    pub device_uuid: String,
    pub gateway_id: String,
    pub generation: u64,
    pub device_bytes: u64,
    pub segment_bytes: u64,
    pub segment_count: u64,
    /// `None`: the metadata is not on this device (format version 1, or formatted without one).
    pub meta_region: Option<MetaRegionInfo>,
    pub superblocks: Vec<SuperblockCopy>,
    pub segments: Vec<ScannedSegment>,
    pub records_waiting: u64,
    pub bytes_waiting: u64,
    pub records_uploaded: u64,
    pub records_deleted: u64,
    pub corrupt_records: Vec<CorruptRecord>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub records: Option<Vec<RecordInfo>>,
}

pub async fn inspect(path: &Path, with_records: bool) -> anyhow::Result<Inspection> {
    let device = open_device(path, 0, false)?;
    let region_file = device.file.try_clone()?;
    let engine = open_engine(EngineKind::Psync, device.file)?;
    let engine: Arc<dyn crate::io::IoEngine> = engine;
    let copies = read_superblocks(&engine).await?;
    let superblocks = copies
        .iter()
        .enumerate()
        .map(|(copy, c)| SuperblockCopy {
            copy,
            valid: c.is_ok(),
            generation: c.as_ref().ok().map(|(sb, _)| sb.generation),
            error: c.as_ref().err().map(|e| match e {
                SuperblockError::NotFormatted => "no stagefs superblock".to_string(),
                SuperblockError::Checksum => "checksum mismatch".to_string(),
                SuperblockError::Version(v) => format!("format version {v} (unsupported)"),
                SuperblockError::BadRegion => {
                    "metadata region over the log or past the device".to_string()
                }
            }),
        })
        .collect::<Vec<_>>();
    let Some((_, sb, region)) = best_superblock(&copies) else {
        anyhow::bail!(
            "{} holds no valid stagefs superblock (copy 0: {}, copy 1: {})",
            path.display(),
            superblocks[0].error.as_deref().unwrap_or("?"),
            superblocks[1].error.as_deref().unwrap_or("?")
        );
    };
    let sb = sb.clone();
    let meta_region = region.map(|r| {
        // Read only: opening the region reads its headers and table, and writes nothing.
        let opened = meta::redb_region::RegionBackend::open(
            region_file,
            &path.display().to_string(),
            r.offset,
            r.bytes,
        );
        match opened {
            Ok(backend) => MetaRegionInfo {
                offset: r.offset,
                bytes: r.bytes,
                database_bytes: Some(backend.database_len()),
                capacity_bytes: Some(backend.capacity()),
                error: None,
            },
            Err(error) => MetaRegionInfo {
                offset: r.offset,
                bytes: r.bytes,
                database_bytes: None,
                capacity_bytes: None,
                error: Some(error.to_string()),
            },
        }
    });
    let report = scan(&engine, &sb).await?;
    let mut inspection = Inspection {
        device: path.display().to_string(),
        format_version: sb.format_version,
        device_uuid: uuid::Uuid::from_bytes(sb.device_uuid).to_string(),
        gateway_id: uuid::Uuid::from_bytes(sb.gateway_id).to_string(),
        generation: sb.generation,
        device_bytes: sb.device_bytes,
        segment_bytes: sb.segment_bytes,
        segment_count: sb.segment_count,
        meta_region,
        superblocks,
        segments: report.segments.clone(),
        records_waiting: 0,
        bytes_waiting: 0,
        records_uploaded: 0,
        records_deleted: 0,
        corrupt_records: report.corrupt.clone(),
        records: with_records.then(Vec::new),
    };
    for block in &report.blocks {
        let state = if report.deleted.contains(&block.lsn) {
            inspection.records_deleted += 1;
            "deleted"
        } else if report.uploaded.contains(&block.lsn) {
            inspection.records_uploaded += 1;
            "uploaded"
        } else {
            inspection.records_waiting += 1;
            inspection.bytes_waiting += block.header.data_len as u64;
            "waiting"
        };
        if let Some(records) = &mut inspection.records {
            records.push(RecordInfo {
                key: block.key.clone(),
                segment: block.segment as u64,
                device_offset: block.device_offset,
                data_offset: block.device_offset + block.header.data_offset() as u64,
                len: block.header.data_len as u64,
                lsn: block.lsn,
                state,
            });
        }
    }
    Ok(inspection)
}

impl Inspection {
    pub fn print_text(&self) {
        use shared::size::format_size;
        println!("device         {}", self.device);
        println!(
            "format         version {}, device uuid {}",
            self.format_version, self.device_uuid
        );
        println!(
            "gateway id     {} (generation {})",
            self.gateway_id, self.generation
        );
        println!(
            "geometry       {} in {} segments of {}",
            format_size(self.device_bytes),
            self.segment_count,
            format_size(self.segment_bytes)
        );
        match &self.meta_region {
            None => println!("metadata       not on this device (--meta, or a file beside it)"),
            Some(r) => {
                println!(
                    "metadata       region at offset {}, {} ({} bytes)",
                    r.offset,
                    format_size(r.bytes),
                    r.bytes
                );
                match (&r.error, r.database_bytes, r.capacity_bytes) {
                    (Some(e), _, _) => println!("  UNREADABLE: {e}"),
                    (None, Some(used), Some(capacity)) => println!(
                        "  database {} of {} it can hold",
                        format_size(used),
                        format_size(capacity)
                    ),
                    _ => {}
                }
            }
        }
        for sb in &self.superblocks {
            match (sb.valid, sb.generation, &sb.error) {
                (true, Some(g), _) => println!("superblock {}   valid, generation {g}", sb.copy),
                (_, _, Some(e)) => println!("superblock {}   INVALID: {e}", sb.copy),
                _ => {}
            }
        }
        println!("live segments  {}", self.segments.len());
        for s in &self.segments {
            println!(
                "  segment {:>5}  sequence {:>8}  {:>7} records  {}",
                s.index,
                s.sequence,
                s.records,
                format_size(s.bytes)
            );
        }
        println!(
            "waiting        {} blocks, {}",
            self.records_waiting,
            format_size(self.bytes_waiting)
        );
        println!(
            "uploaded       {} blocks (still on the device)",
            self.records_uploaded
        );
        println!("deleted        {} blocks", self.records_deleted);
        println!("corrupt        {} records", self.corrupt_records.len());
        for c in &self.corrupt_records {
            println!(
                "  segment {} at device offset {}: {}{}",
                c.segment,
                c.device_offset,
                c.reason,
                c.key
                    .as_ref()
                    .map(|k| format!(" (key {k})"))
                    .unwrap_or_default()
            );
        }
        if let Some(records) = &self.records {
            for r in records {
                println!(
                    "  {:<9} {} ({} bytes) at device offset {}",
                    r.state, r.key, r.len, r.device_offset
                );
            }
        }
    }
}
