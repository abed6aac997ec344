//! Opening a staging volume: device, superblocks, format, recovery scan, staging log.
//!
//! `serve` formats a device only when it holds no valid stagefs superblock, and then only if the
//! file was just created or `--format` was given: a device with a live log is never wiped by a
//! start-up. Each start bumps the superblock generation (written to the older copy first, so a
//! torn write leaves the newer one intact); records carry the generation they were written in.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::aligned::{AlignedBuf, ALIGN};
use crate::device::{open_device, DeviceError};
use crate::format::{
    record_len, Superblock, SuperblockError, DATA_START, FORMAT_VERSION, MAX_KEY_BYTES,
};
use crate::io::{open_engine, EngineKind, IoEngine};
use crate::recovery::{scan, ScanReport};
use crate::staging::{LogConfig, StagingLog, UploadPolicy};
use crate::tasks::Tasks;

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error("{path} holds no valid stagefs superblock; pass --format to format it (this destroys its content)")]
    NotFormatted { path: PathBuf },
    #[error("{path} holds a stagefs log of format version {found}; this gateway reads version {FORMAT_VERSION} only, refusing to touch it")]
    FormatVersion { path: PathBuf, found: u32 },
    #[error("segment size {segment} is invalid for a {device}-byte device: it must be a multiple of {ALIGN}, between {min} and {MAX_SEGMENT_BYTES} bytes, and leave room for at least 3 segments")]
    Geometry { segment: u64, device: u64, min: u64 },
    #[error("{path} is {size} bytes; a staging device needs at least {min} bytes (3 segments of {segment})")]
    TooSmall {
        path: PathBuf,
        size: u64,
        min: u64,
        segment: u64,
    },
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

#[derive(Debug, Clone)]
pub struct VolumeOptions {
    pub path: PathBuf,
    /// Size of the file created when `path` does not exist.
    pub create_size: u64,
    /// Segment size when formatting; `None` picks one from the device size.
    pub segment_size: Option<u64>,
    pub format: bool,
    pub engine: EngineKind,
    pub full_wait: Duration,
    pub uploads_paused: bool,
    /// Bound on one device operation (`--device-timeout`).
    pub device_timeout: Duration,
    pub upload: UploadPolicy,
}

/// The default `--device-timeout`: far above any healthy fdatasync of a cloud volume (tens of
/// milliseconds, seconds in a bad minute), far below the minutes a failing disk hangs writers.
pub const DEFAULT_DEVICE_TIMEOUT: Duration = Duration::from_secs(30);

/// Recovery holds two segments in memory at once (one verified, the next being read).
pub const MAX_SEGMENT_BYTES: u64 = 256 << 20;

/// Bytes a full-size block record takes on the device.
fn full_block_record() -> u64 {
    record_len(MAX_KEY_BYTES, shared::BLOCK_SIZE as usize)
}

/// The smallest segment: its header plus one full-size block record.
pub fn min_segment_size() -> u64 {
    ALIGN as u64 + full_block_record()
}

/// About 1/64 of the device, as a whole number (2..=16) of full-size block records so that
/// segments of 4 MiB blocks waste no space at their end.
fn default_segment_size(device: u64) -> u64 {
    let blocks = (device / 64 / shared::BLOCK_SIZE).clamp(2, 16);
    ALIGN as u64 + blocks * full_block_record()
}

/// Reads both superblock copies; the valid one with the highest generation wins.
pub async fn read_superblocks(
    engine: &Arc<dyn IoEngine>,
) -> std::io::Result<[Result<Superblock, SuperblockError>; 2]> {
    let buf = engine.read_at(AlignedBuf::zeroed(2 * ALIGN), 0).await?;
    Ok([
        Superblock::decode(&buf[..ALIGN]),
        Superblock::decode(&buf[ALIGN..]),
    ])
}

pub fn best_superblock(
    copies: &[Result<Superblock, SuperblockError>; 2],
) -> Option<(usize, &Superblock)> {
    copies
        .iter()
        .enumerate()
        .filter_map(|(i, c)| c.as_ref().ok().map(|sb| (i, sb)))
        .max_by_key(|(_, sb)| sb.generation)
}

async fn write_superblock(
    engine: &Arc<dyn IoEngine>,
    sb: &Superblock,
    copy: usize,
) -> std::io::Result<()> {
    let mut buf = AlignedBuf::zeroed(ALIGN);
    sb.encode(&mut buf);
    engine.write_at(buf, (copy * ALIGN) as u64).await?;
    Ok(())
}

/// Opens (and if allowed, formats) the volume, recovers it and returns the running staging log.
pub async fn open_volume(opts: &VolumeOptions) -> Result<Arc<StagingLog>, VolumeError> {
    open_volume_with(opts, Tasks::new(), |engine| engine).await
}

/// [`open_volume`] with the log's tasks in the group `tasks` and the I/O engine wrapped by `wrap`
/// (tests inject faults this way).
pub async fn open_volume_with(
    opts: &VolumeOptions,
    tasks: Tasks,
    wrap: impl FnOnce(Arc<dyn IoEngine>) -> Arc<dyn IoEngine>,
) -> Result<Arc<StagingLog>, VolumeError> {
    let device = open_device(&opts.path, opts.create_size, true)?;
    let io = |source| VolumeError::Io {
        path: opts.path.clone(),
        source,
    };
    let min = DATA_START + 3 * min_segment_size();
    if device.size < min {
        return Err(VolumeError::TooSmall {
            path: opts.path.clone(),
            size: device.size,
            min,
            segment: min_segment_size(),
        });
    }
    let engine = wrap(open_engine(opts.engine, device.file).map_err(io)?);
    let copies = read_superblocks(&engine).await.map_err(io)?;
    let sb = match best_superblock(&copies) {
        Some((copy, sb)) => {
            let mut sb = sb.clone();
            sb.generation += 1;
            write_superblock(&engine, &sb, 1 - copy).await.map_err(io)?;
            engine.sync().await.map_err(io)?;
            sb
        }
        None => {
            if let Some(found) = copies.iter().find_map(|c| match c {
                Err(SuperblockError::Version(v)) => Some(*v),
                _ => None,
            }) {
                return Err(VolumeError::FormatVersion {
                    path: opts.path.clone(),
                    found,
                });
            }
            if !(device.created || opts.format) {
                return Err(VolumeError::NotFormatted {
                    path: opts.path.clone(),
                });
            }
            format(&engine, device.size, opts.segment_size)
                .await
                .map_err(|e| match e {
                    FormatError::Geometry(g) => g,
                    FormatError::Io(source) => io(source),
                })?
        }
    };
    tracing::info!(
        device = %opts.path.display(),
        engine = engine.name(),
        generation = sb.generation,
        segments = sb.segment_count,
        segment_bytes = sb.segment_bytes,
        "recovering staging log"
    );
    let started = Instant::now();
    let report: ScanReport = scan(&engine, &sb).await.map_err(io)?;
    let took = started.elapsed();
    let log = StagingLog::open(
        engine,
        sb,
        opts.path.clone(),
        report,
        took,
        &LogConfig {
            full_wait: opts.full_wait,
            uploads_paused: opts.uploads_paused,
            device_timeout: opts.device_timeout,
            upload: opts.upload.clone(),
        },
        tasks,
    );
    tracing::info!(
        blocks_waiting = log.recovery.blocks,
        corrupt_records = log.recovery.corrupt.len(),
        took_ms = took.as_millis() as u64,
        "staging log recovered"
    );
    Ok(log)
}

pub enum FormatError {
    Geometry(VolumeError),
    Io(std::io::Error),
}

/// Writes a fresh, empty log: both superblocks, then a sync.
pub async fn format(
    engine: &Arc<dyn IoEngine>,
    device_bytes: u64,
    segment_size: Option<u64>,
) -> Result<Superblock, FormatError> {
    let segment = segment_size.unwrap_or_else(|| default_segment_size(device_bytes));
    let min = min_segment_size();
    let count = device_bytes.saturating_sub(DATA_START) / segment.max(1);
    if !segment.is_multiple_of(ALIGN as u64)
        || segment < min
        || segment > MAX_SEGMENT_BYTES
        || count < 3
    {
        return Err(FormatError::Geometry(VolumeError::Geometry {
            segment,
            device: device_bytes,
            min,
        }));
    }
    let sb = Superblock {
        format_version: FORMAT_VERSION,
        device_uuid: *uuid::Uuid::new_v4().as_bytes(),
        gateway_id: *uuid::Uuid::new_v4().as_bytes(),
        generation: 1,
        device_bytes,
        segment_bytes: segment,
        segment_count: count,
    };
    for copy in 0..2 {
        write_superblock(engine, &sb, copy)
            .await
            .map_err(FormatError::Io)?;
    }
    engine.sync().await.map_err(FormatError::Io)?;
    tracing::info!(
        device_bytes,
        segment_bytes = segment,
        segments = count,
        "formatted staging device"
    );
    Ok(sb)
}

/// Tests only: a small volume in `dir` (64 MiB, 8 MiB segments, the portable engine).
#[cfg(test)]
pub async fn small_test_volume(dir: &std::path::Path, uploads_paused: bool) -> Arc<StagingLog> {
    small_test_volume_with(dir, uploads_paused, UploadPolicy::default()).await
}

/// [`small_test_volume`] with an upload policy of the test's own.
#[cfg(test)]
pub async fn small_test_volume_with(
    dir: &std::path::Path,
    uploads_paused: bool,
    upload: UploadPolicy,
) -> Arc<StagingLog> {
    open_volume(&VolumeOptions {
        path: dir.join("device"),
        create_size: 64 << 20,
        segment_size: Some(8 << 20),
        format: false,
        engine: EngineKind::Psync,
        full_wait: Duration::from_secs(1),
        uploads_paused,
        device_timeout: DEFAULT_DEVICE_TIMEOUT,
        upload,
    })
    .await
    .expect("a test volume")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn options(path: PathBuf, format: bool) -> VolumeOptions {
        VolumeOptions {
            path,
            create_size: 64 << 20,
            segment_size: None,
            format,
            engine: EngineKind::Psync,
            full_wait: Duration::from_secs(1),
            uploads_paused: true,
            device_timeout: DEFAULT_DEVICE_TIMEOUT,
            upload: UploadPolicy::default(),
        }
    }

    #[tokio::test]
    async fn formats_only_missing_or_explicitly_allowed_devices() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dev");
        // A missing file is created and formatted.
        let log = open_volume(&options(path.clone(), false)).await.unwrap();
        let first = log.sb.clone();
        log.shutdown().await;
        drop(log);
        // A valid log is reopened, never reformatted, even with --format; the generation moves on.
        let log = open_volume(&options(path.clone(), true)).await.unwrap();
        assert_eq!(log.sb.device_uuid, first.device_uuid);
        assert_eq!(log.sb.generation, first.generation + 1);
        log.shutdown().await;
        drop(log);

        // An existing file without a superblock is refused without --format.
        let blank = dir.path().join("blank");
        std::fs::File::create(&blank)
            .unwrap()
            .set_len(64 << 20)
            .unwrap();
        let err = open_volume(&options(blank.clone(), false))
            .await
            .err()
            .expect("must refuse");
        assert!(matches!(err, VolumeError::NotFormatted { .. }), "{err}");
        assert!(err.to_string().contains("--format"), "{err}");
        let log = open_volume(&options(blank, true)).await.unwrap();
        log.shutdown().await;
    }

    #[tokio::test]
    async fn refuses_another_format_version_and_too_small_devices() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dev");
        let log = open_volume(&options(path.clone(), false)).await.unwrap();
        let mut sb = log.sb.clone();
        log.shutdown().await;
        drop(log);
        sb.format_version = FORMAT_VERSION + 1;
        let mut buf = vec![0u8; ALIGN];
        sb.encode(&mut buf);
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(&buf, 0).unwrap();
        file.write_all_at(&buf, ALIGN as u64).unwrap();
        drop(file);
        let err = open_volume(&options(path, true))
            .await
            .err()
            .expect("must refuse");
        assert!(
            matches!(err, VolumeError::FormatVersion { found, .. } if found == FORMAT_VERSION + 1),
            "{err}"
        );
        assert!(err.to_string().contains("format version 2"), "{err}");

        let small = dir.path().join("small");
        std::fs::File::create(&small)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let err = open_volume(&options(small, true))
            .await
            .err()
            .expect("must refuse");
        assert!(matches!(err, VolumeError::TooSmall { .. }), "{err}");
    }

    #[tokio::test]
    async fn survives_a_torn_superblock_copy() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dev");
        let log = open_volume(&options(path.clone(), false)).await.unwrap();
        let generation = log.sb.generation;
        log.shutdown().await;
        drop(log);
        // Damage one copy: the other one carries the device.
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(&[0xff; 64], 16).unwrap();
        drop(file);
        let log = open_volume(&options(path, false)).await.unwrap();
        assert!(log.sb.generation >= generation);
        log.shutdown().await;
    }
}
