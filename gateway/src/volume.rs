//! Opening a staging volume: device, superblocks, format, recovery scan, staging log.
//!
//! `serve` formats a device only when it holds no valid stagefs superblock, and then only if the
//! file was just created or `--format` was given: a device with a live log is never wiped by a
//! start-up. Each start bumps the superblock generation (written to the older copy first, so a
//! torn write leaves the newer one intact); records carry the generation they were written in.
//!
//! Formatting may reserve the end of the device for the embedded metadata (format version 2): the
//! gateway then keeps its redb database there ([`meta::redb_region`]), so the device alone is the
//! whole state of a single gateway and moves with it to another node.

use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::aligned::{AlignedBuf, ALIGN};
use crate::device::{fill_unwritten, open_device, open_device_filled, DeviceError, DeviceFill};
use crate::format::{
    record_len, MetaRegion, Superblock, SuperblockError, DATA_START, FORMAT_VERSION,
    FORMAT_VERSION_NO_REGION, MAX_KEY_BYTES,
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
    #[error("{path} holds a stagefs log of format version {found}; this gateway reads versions {FORMAT_VERSION_NO_REGION} to {FORMAT_VERSION} only, refusing to touch it")]
    FormatVersion { path: PathBuf, found: u32 },
    #[error("--meta-region-size {size} is invalid for a {device}-byte device: give 0 (no region) or a multiple of {ALIGN} of at least {min} bytes that leaves room for 3 segments of {segment} bytes")]
    MetaRegionSize {
        size: u64,
        device: u64,
        min: u64,
        segment: u64,
    },
    #[error("{path} has no metadata region (formatted without one, or by an older release): its metadata is where --meta says, or in the file beside it")]
    NoMetaRegion { path: PathBuf },
    #[error("cannot format the metadata region of {path}: {source}")]
    MetaRegion {
        path: PathBuf,
        source: meta::redb_region::RegionError,
    },
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
    /// Bytes of blocks fetched from the store kept as read cache (`--read-cache`; 0: none).
    pub read_cache_bytes: u64,
    /// What formatting a regular file writes first (`--device-fill`).
    pub device_fill: DeviceFill,
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

/// The smallest metadata region a device is formatted with.
pub const MIN_META_REGION_BYTES: u64 = meta::redb_region::MIN_REGION_BYTES;

/// The metadata region a device gets when `--meta-region-size` is not given: 1/16 of the device,
/// at least 64 MiB, at most 16 GiB, never more than a quarter of the device (the log needs the
/// rest), none below the smallest region. Why: a file costs redb roughly 0.3-1 KiB (inode, entry,
/// chunk slices, tree pages), and redb grows its database by doubling (up to 4 GiB at a time), so
/// a region holds safely about half its size below 4 GiB. 1/16 fits the metadata of a device full
/// of files averaging some tens of KiB; 64 MiB fits ~100 000 files on any device; past 16 GiB
/// (~16 million files) one node is the wrong home for the namespace (use PostgreSQL), and the
/// region's checksum table, held in memory (1/512 of the region), stays at most 32 MiB.
pub fn default_meta_region_size(device: u64) -> u64 {
    let size =
        (device / 16).clamp(64 << 20, 16 << 30).min(device / 4) / ALIGN as u64 * ALIGN as u64;
    if size < MIN_META_REGION_BYTES {
        0
    } else {
        size
    }
}

/// One superblock copy as read: the superblock and its metadata region, or why it is not valid.
pub type SuperblockCopy = Result<(Superblock, Option<MetaRegion>), SuperblockError>;

/// Reads both superblock copies; the valid one with the highest generation wins.
pub async fn read_superblocks(engine: &Arc<dyn IoEngine>) -> std::io::Result<[SuperblockCopy; 2]> {
    let buf = engine.read_at(AlignedBuf::zeroed(2 * ALIGN), 0).await?;
    Ok([
        Superblock::decode_with(&buf[..ALIGN]),
        Superblock::decode_with(&buf[ALIGN..]),
    ])
}

pub fn best_superblock(
    copies: &[SuperblockCopy; 2],
) -> Option<(usize, &Superblock, Option<MetaRegion>)> {
    copies
        .iter()
        .enumerate()
        .filter_map(|(i, c)| c.as_ref().ok().map(|(sb, region)| (i, sb, *region)))
        .max_by_key(|(_, sb, _)| sb.generation)
}

async fn write_superblock(
    engine: &Arc<dyn IoEngine>,
    sb: &Superblock,
    region: Option<MetaRegion>,
    copy: usize,
) -> std::io::Result<()> {
    let mut buf = AlignedBuf::zeroed(ALIGN);
    sb.encode_with(region, &mut buf);
    engine.write_at(buf, (copy * ALIGN) as u64).await?;
    Ok(())
}

/// The metadata region of an opened device: where it is, and a descriptor of the device (the
/// volume's own, duplicated: same `O_DIRECT` open file and same lock) to reach it through.
pub struct DeviceMetaRegion {
    pub file: File,
    pub path: PathBuf,
    pub region: MetaRegion,
    /// Formatted by this start (empty).
    pub formatted_now: bool,
}

impl DeviceMetaRegion {
    /// The region as a redb storage backend ([`meta::redb_region`]).
    pub fn backend(
        self,
    ) -> Result<meta::redb_region::RegionBackend, meta::redb_region::RegionError> {
        meta::redb_region::RegionBackend::open(
            self.file,
            &self.path.display().to_string(),
            self.region.offset,
            self.region.bytes,
        )
    }
}

/// An opened volume: the running log and, on a device formatted with one, its metadata region.
pub struct Volume {
    pub log: Arc<StagingLog>,
    pub meta_region: Option<DeviceMetaRegion>,
}

/// Whether the device at `path` holds a valid superblock (`None` if not) and, if so, its metadata
/// region; read without opening the device for writing or taking its lock (a look before `serve`
/// decides where the metadata is).
pub async fn peek_meta_region(
    path: &std::path::Path,
) -> Result<Option<Option<MetaRegion>>, VolumeError> {
    let device = open_device(path, 0, false)?;
    let io = |source| VolumeError::Io {
        path: path.to_path_buf(),
        source,
    };
    let engine: Arc<dyn IoEngine> = open_engine(EngineKind::Psync, device.file).map_err(io)?;
    let copies = read_superblocks(&engine).await.map_err(io)?;
    Ok(best_superblock(&copies).map(|(_, _, region)| region))
}

/// The metadata region of the device at `path`, without recovering its log (`meta dump` and
/// `meta load`). The device is opened and locked as `serve` opens it, so this fails while a
/// gateway serves it.
pub async fn open_meta_region_only(
    path: &std::path::Path,
) -> Result<DeviceMetaRegion, VolumeError> {
    if !path.exists() {
        return Err(VolumeError::NotFormatted { path: path.into() });
    }
    let device = open_device(path, 0, true)?;
    let io = |source| VolumeError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = device.file.try_clone().map_err(io)?;
    let engine: Arc<dyn IoEngine> = open_engine(EngineKind::Psync, device.file).map_err(io)?;
    let copies = read_superblocks(&engine).await.map_err(io)?;
    match best_superblock(&copies) {
        None => Err(VolumeError::NotFormatted { path: path.into() }),
        Some((_, _, None)) => Err(VolumeError::NoMetaRegion { path: path.into() }),
        Some((_, _, Some(region))) => Ok(DeviceMetaRegion {
            file,
            path: path.into(),
            region,
            formatted_now: false,
        }),
    }
}

/// Opens (and if allowed, formats) the volume, recovers it and returns the running staging log.
pub async fn open_volume(opts: &VolumeOptions) -> Result<Arc<StagingLog>, VolumeError> {
    open_volume_with(opts, Tasks::new(), |engine| engine).await
}

/// [`open_volume`] with the log's tasks in the group `tasks` and the I/O engine wrapped by `wrap`
/// (tests inject faults this way). A device it formats gets no metadata region.
pub async fn open_volume_with(
    opts: &VolumeOptions,
    tasks: Tasks,
    wrap: impl FnOnce(Arc<dyn IoEngine>) -> Arc<dyn IoEngine>,
) -> Result<Arc<StagingLog>, VolumeError> {
    Ok(open_volume_with_meta(opts, Some(0), tasks, wrap).await?.log)
}

/// [`open_volume_with`], and the device's metadata region if it has one. A device formatted now
/// gets a region of `meta_region_size` bytes (`None`: [`default_meta_region_size`]; 0: none).
pub async fn open_volume_with_meta(
    opts: &VolumeOptions,
    meta_region_size: Option<u64>,
    tasks: Tasks,
    wrap: impl FnOnce(Arc<dyn IoEngine>) -> Arc<dyn IoEngine>,
) -> Result<Volume, VolumeError> {
    let device = open_device_filled(&opts.path, opts.create_size, true, opts.device_fill)?;
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
    // The metadata region is reached through the volume's own open file: the same O_DIRECT
    // description and the same lock, never a second open of the device.
    let region_file = device.file.try_clone().map_err(io)?;
    let engine = wrap(open_engine(opts.engine, device.file).map_err(io)?);
    let copies = read_superblocks(&engine).await.map_err(io)?;
    let (sb, region, formatted_now) = match best_superblock(&copies) {
        Some((copy, sb, region)) => {
            let mut sb = sb.clone();
            sb.generation += 1;
            write_superblock(&engine, &sb, region, 1 - copy)
                .await
                .map_err(io)?;
            engine.sync().await.map_err(io)?;
            (sb, region, false)
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
            let (sb, region) = format(
                &engine,
                &region_file,
                &opts.path,
                device.size,
                opts.segment_size,
                meta_region_size,
                // A file created now was filled before it took its name: no second pass.
                if device.created {
                    DeviceFill::None
                } else {
                    opts.device_fill
                },
            )
            .await
            .map_err(|e| match e {
                FormatError::Geometry(g) => g,
                FormatError::Io(source) => io(source),
            })?;
            (sb, region, true)
        }
    };
    tracing::info!(
        device = %opts.path.display(),
        engine = engine.name(),
        generation = sb.generation,
        segments = sb.segment_count,
        segment_bytes = sb.segment_bytes,
        meta_region_offset = region.map(|r| r.offset),
        meta_region_bytes = region.map(|r| r.bytes),
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
            read_cache_bytes: opts.read_cache_bytes,
        },
        tasks,
    );
    tracing::info!(
        blocks_waiting = log.recovery.blocks,
        corrupt_records = log.recovery.corrupt.len(),
        took_ms = took.as_millis() as u64,
        "staging log recovered"
    );
    Ok(Volume {
        log,
        meta_region: region.map(|region| DeviceMetaRegion {
            file: region_file,
            path: opts.path.clone(),
            region,
            formatted_now,
        }),
    })
}

pub enum FormatError {
    Geometry(VolumeError),
    Io(std::io::Error),
}

/// Writes a fresh, empty device: the metadata region (if any: `meta_region_size` bytes, `None`
/// for the default, 0 for none) at the end, after the segments, then both superblocks, then a
/// sync. The superblocks come last, so a device whose formatting was cut short is still
/// unformatted, never a device that names a region it does not have.
pub async fn format(
    engine: &Arc<dyn IoEngine>,
    region_file: &File,
    path: &std::path::Path,
    device_bytes: u64,
    segment_size: Option<u64>,
    meta_region_size: Option<u64>,
    fill: DeviceFill,
) -> Result<(Superblock, Option<MetaRegion>), FormatError> {
    let region_bytes = meta_region_size.unwrap_or_else(|| default_meta_region_size(device_bytes));
    let log_bytes = device_bytes.saturating_sub(region_bytes);
    let segment = segment_size.unwrap_or_else(|| default_segment_size(log_bytes));
    let min = min_segment_size();
    let count = log_bytes.saturating_sub(DATA_START) / segment.max(1);
    if region_bytes != 0
        && (region_bytes < MIN_META_REGION_BYTES
            || !region_bytes.is_multiple_of(ALIGN as u64)
            || count < 3)
    {
        return Err(FormatError::Geometry(VolumeError::MetaRegionSize {
            size: region_bytes,
            device: device_bytes,
            min: MIN_META_REGION_BYTES,
            segment,
        }));
    }
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
    let mut sb = Superblock {
        format_version: FORMAT_VERSION_NO_REGION,
        device_uuid: *uuid::Uuid::new_v4().as_bytes(),
        gateway_id: *uuid::Uuid::new_v4().as_bytes(),
        generation: 1,
        device_bytes,
        segment_bytes: segment,
        segment_count: count,
    };
    if fill == DeviceFill::Zeros {
        fill_device(region_file, path, device_bytes).await?;
    }
    // The region takes what the segments leave, from the end of the last one.
    let region = (region_bytes > 0).then(|| {
        let offset = sb.segment_offset(count);
        MetaRegion {
            offset,
            bytes: device_bytes - offset,
        }
    });
    if let Some(region) = region {
        sb.format_version = FORMAT_VERSION;
        let (file, device) = (
            region_file.try_clone().map_err(FormatError::Io)?,
            path.to_path_buf(),
        );
        tokio::task::spawn_blocking(move || {
            meta::redb_region::format(
                &file,
                &device.display().to_string(),
                region.offset,
                region.bytes,
            )
            .map_err(|source| VolumeError::MetaRegion {
                path: device,
                source,
            })
        })
        .await
        .map_err(|e| FormatError::Io(std::io::Error::other(e)))?
        .map_err(FormatError::Geometry)?;
    }
    for copy in 0..2 {
        write_superblock(engine, &sb, region, copy)
            .await
            .map_err(FormatError::Io)?;
    }
    engine.sync().await.map_err(FormatError::Io)?;
    tracing::info!(
        device_bytes,
        segment_bytes = segment,
        segments = count,
        meta_region_offset = region.map(|r| r.offset),
        meta_region_bytes = region.map(|r| r.bytes),
        "formatted staging device"
    );
    Ok((sb, region))
}

/// `--device-fill zeros`: the file's unwritten parts written with zeros before anything else
/// ([`DeviceFill::Zeros`]). A file that cannot take them fails the format, saying how to skip it.
async fn fill_device(file: &File, path: &std::path::Path, bytes: u64) -> Result<(), FormatError> {
    let file = file.try_clone().map_err(FormatError::Io)?;
    let started = Instant::now();
    let filled = tokio::task::spawn_blocking(move || fill_unwritten(&file, bytes))
        .await
        .map_err(|e| FormatError::Io(std::io::Error::other(e)))?
        .map_err(|e| {
            FormatError::Io(std::io::Error::new(
                e.kind(),
                format!(
                    "cannot write zeros over the unwritten parts of the device file {} ({e}); \
                     --device-fill none formats without",
                    path.display()
                ),
            ))
        })?;
    if filled > 0 {
        tracing::info!(
            device = %path.display(),
            bytes = filled,
            took_ms = started.elapsed().as_millis() as u64,
            "wrote zeros over the parts of the device file its file system had not written yet \
             (--device-fill zeros), so that the log's first pass over them converts no extents"
        );
    }
    Ok(())
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
        device_fill: DeviceFill::None,
        format: false,
        engine: EngineKind::Psync,
        full_wait: Duration::from_secs(1),
        uploads_paused,
        device_timeout: DEFAULT_DEVICE_TIMEOUT,
        upload,
        read_cache_bytes: 0,
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
            device_fill: DeviceFill::None,
            engine: EngineKind::Psync,
            full_wait: Duration::from_secs(1),
            uploads_paused: true,
            device_timeout: DEFAULT_DEVICE_TIMEOUT,
            upload: UploadPolicy::default(),
            read_cache_bytes: 0,
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
        assert!(err.to_string().contains("format version 3"), "{err}");

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
    async fn a_region_is_reserved_at_format_and_found_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dev");
        let mut opts = options(path.clone(), false);
        opts.create_size = 256 << 20;
        let volume = open_volume_with_meta(&opts, None, Tasks::new(), |e| e)
            .await
            .unwrap();
        let sb = volume.log.sb.clone();
        let region = volume.meta_region.expect("a region by default");
        assert!(region.formatted_now);
        assert_eq!(sb.format_version, FORMAT_VERSION);
        assert_eq!(
            region.region.bytes,
            (256 << 20) - sb.segment_offset(sb.segment_count)
        );
        assert!(region.region.bytes >= default_meta_region_size(256 << 20));
        assert_eq!(region.region.offset, sb.segment_offset(sb.segment_count));
        assert!(sb.segment_count >= 3);
        let found = region.region;
        // The region is usable through the volume's own descriptor.
        let backend = region.backend().unwrap();
        assert_eq!(backend.database_len(), 0);
        drop(backend);
        volume.log.shutdown().await;
        drop(volume.log);

        // Found again, whatever size is asked for now (it applies only when formatting).
        let volume = open_volume_with_meta(&opts, Some(0), Tasks::new(), |e| e)
            .await
            .unwrap();
        let again = volume.meta_region.expect("the region is still there");
        assert!(!again.formatted_now);
        assert_eq!(again.region, found);
        assert_eq!(volume.log.sb.generation, sb.generation + 1);
        // A second gateway cannot open the device, nor the region through it.
        let busy = open_meta_region_only(&path).await.err().expect("locked");
        assert!(matches!(busy, VolumeError::Device(_)), "{busy}");
        volume.log.shutdown().await;
        drop((volume.log, again));
        let only = open_meta_region_only(&path).await.unwrap();
        assert_eq!(only.region, found);
    }

    #[tokio::test]
    async fn without_a_region_the_device_keeps_format_version_1() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dev");
        let volume =
            open_volume_with_meta(&options(path.clone(), false), Some(0), Tasks::new(), |e| e)
                .await
                .unwrap();
        assert!(volume.meta_region.is_none());
        assert_eq!(volume.log.sb.format_version, FORMAT_VERSION_NO_REGION);
        volume.log.shutdown().await;
        drop(volume.log);
        assert_eq!(peek_meta_region(&path).await.unwrap(), Some(None));
        let error = open_meta_region_only(&path).await.err().expect("no region");
        assert!(matches!(error, VolumeError::NoMetaRegion { .. }), "{error}");
    }

    #[tokio::test]
    async fn a_region_size_that_leaves_no_room_for_the_log_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        for size in [60 << 20, 1 << 20, (8 << 20) + 1] {
            let path = dir.path().join(format!("dev-{size}"));
            let err = open_volume_with_meta(
                &options(path.clone(), false),
                Some(size),
                Tasks::new(),
                |e| e,
            )
            .await
            .err()
            .expect("must refuse");
            assert!(matches!(err, VolumeError::MetaRegionSize { .. }), "{err}");
            assert!(err.to_string().contains("--meta-region-size"), "{err}");
        }
    }

    #[test]
    fn the_default_region_is_a_sixteenth_within_bounds() {
        assert_eq!(default_meta_region_size(64 << 20), 16 << 20);
        assert_eq!(default_meta_region_size(256 << 20), 64 << 20);
        assert_eq!(default_meta_region_size(1 << 30), 64 << 20);
        assert_eq!(default_meta_region_size(100 << 30), 6400 << 20);
        assert_eq!(default_meta_region_size(1 << 40), 16 << 30);
        assert_eq!(default_meta_region_size(12 << 20), 0);
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
