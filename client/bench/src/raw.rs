//! Raw limits of the device file, measured before the gateway owns it.
//!
//! Both measurements open the device with `O_DIRECT`, like the gateway does, so the page cache
//! is out of the picture:
//! - sequential write: 4 MiB aligned buffers written in order by 1 and by 4 concurrent writers
//!   (each writer takes every n-th block), one `fdatasync` at the end; the faster wins;
//! - `fdatasync` rate: one writer, one 4 KiB write + `fdatasync` at successive offsets.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::ptr::NonNull;
use std::time::{Duration, Instant};

use rand::RngCore;

use super::{mib_per_s, BenchError};

/// Alignment of every buffer, offset and length: covers 512 B and 4 KiB logical blocks.
pub const ALIGN: usize = 4096;
/// Size of one sequential write, the size of a stagefs block.
pub const SEQ_WRITE_SIZE: usize = 4 * 1024 * 1024;
/// Size of one write in the `fdatasync` rate measurement.
pub const SYNC_WRITE_SIZE: usize = 4096;

/// A heap buffer aligned for `O_DIRECT`, filled with random bytes.
struct AlignedBuf {
    ptr: NonNull<u8>,
    layout: Layout,
}

// SAFETY: the buffer is owned memory like a Vec<u8>; only `&self`/`&mut self` access it.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access is read-only (`as_slice`).
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    fn random(len: usize) -> Result<Self, BenchError> {
        let layout = Layout::from_size_align(len.max(ALIGN), ALIGN)
            .map_err(|e| BenchError::Args(format!("cannot lay out a {len} byte buffer: {e}")))?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(ptr).ok_or_else(|| {
            BenchError::Task(format!("cannot allocate a {len} byte aligned buffer"))
        })?;
        let mut buf = AlignedBuf { ptr, layout };
        rand::rng().fill_bytes(buf.as_mut_slice());
        Ok(buf)
    }

    fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr points to layout.size() initialized (zeroed) bytes owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.layout.size()) }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `random` with exactly this layout.
        unsafe { dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

/// Creates the device file if needed and preallocates it to `size` bytes (`fallocate`), so that
/// neither the raw measurements nor the gateway pay for growing it. A block device is left as is
/// but must hold at least `size` bytes.
pub fn prepare_device(path: &Path, size: u64) -> Result<(), BenchError> {
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.file_type().is_block_device() {
            let file =
                File::open(path).map_err(|e| BenchError::io("cannot open device", path, e))?;
            let mut f = &file;
            let len = std::io::Seek::seek(&mut f, std::io::SeekFrom::End(0))
                .map_err(|e| BenchError::io("cannot size device", path, e))?;
            if len < size {
                return Err(BenchError::Args(format!(
                    "block device {path:?} holds {len} bytes, less than --device-size {size}"
                )));
            }
            return Ok(());
        }
        if !meta.file_type().is_file() {
            return Err(BenchError::Args(format!(
                "{path:?} is neither a regular file nor a block device"
            )));
        }
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| BenchError::io("cannot create device file", path, e))?;
    file.set_len(size)
        .map_err(|e| BenchError::io("cannot size device file", path, e))?;
    let len = libc::off_t::try_from(size)
        .map_err(|_| BenchError::Args(format!("device size {size} is too large")))?;
    // SAFETY: plain syscall on an fd we own.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len) };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        // Some file systems cannot preallocate; a sparse file still works, just slower to fill.
        if err.raw_os_error() != Some(libc::EOPNOTSUPP) {
            return Err(BenchError::io(
                "cannot preallocate device file (fallocate)",
                path,
                err,
            ));
        }
        super::progress!("note: {path:?} cannot be preallocated ({err}); using a sparse file");
    }
    file.sync_all()
        .map_err(|e| BenchError::io("cannot sync device file", path, e))?;
    Ok(())
}

fn open_direct(path: &Path) -> Result<File, BenchError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::EINVAL) {
                BenchError::Args(format!(
                    "{path:?} cannot be opened with O_DIRECT (tmpfs and some overlay file systems \
                     refuse it); put --device on a disk-backed file system"
                ))
            } else {
                BenchError::io("cannot open device with O_DIRECT", path, e)
            }
        })
}

/// Writes `bytes` (a multiple of 4 MiB) sequentially from offset 0 with `writers` threads, then
/// `fdatasync`s once; with `sync_each`, every writer also `fdatasync`s after each of its writes,
/// as a store that acknowledges only durable writes must. Returns MiB/s including the syncs.
pub fn seq_write(
    path: &Path,
    bytes: u64,
    writers: usize,
    sync_each: bool,
) -> Result<f64, BenchError> {
    let file = open_direct(path)?;
    let blocks = bytes / SEQ_WRITE_SIZE as u64;
    let writers = writers.max(1);
    let buffers = (0..writers)
        .map(|_| AlignedBuf::random(SEQ_WRITE_SIZE))
        .collect::<Result<Vec<_>, _>>()?;
    let start = Instant::now();
    std::thread::scope(|scope| {
        let handles: Vec<_> = buffers
            .iter()
            .enumerate()
            .map(|(w, buf)| {
                let file = &file;
                scope.spawn(move || -> std::io::Result<()> {
                    let mut block = w as u64;
                    while block < blocks {
                        file.write_all_at(buf.as_slice(), block * SEQ_WRITE_SIZE as u64)?;
                        if sync_each {
                            file.sync_data()?;
                        }
                        block += writers as u64;
                    }
                    Ok(())
                })
            })
            .collect();
        for handle in handles {
            handle
                .join()
                .map_err(|_| BenchError::Task("raw writer thread panicked".into()))?
                .map_err(|e| BenchError::io("raw sequential write failed on", path, e))?;
        }
        Ok::<_, BenchError>(())
    })?;
    file.sync_data()
        .map_err(|e| BenchError::io("fdatasync failed on", path, e))?;
    Ok(mib_per_s(blocks * SEQ_WRITE_SIZE as u64, start.elapsed()))
}

/// One writer: a 4 KiB `O_DIRECT` write then `fdatasync`, at successive offsets (wrapping within
/// `device_size`), for `duration`. Returns synced writes per second.
pub fn fsync_rate(path: &Path, device_size: u64, duration: Duration) -> Result<f64, BenchError> {
    let file = open_direct(path)?;
    let buf = AlignedBuf::random(SYNC_WRITE_SIZE)?;
    let slots = (device_size / SYNC_WRITE_SIZE as u64).max(1);
    let start = Instant::now();
    let mut ops = 0u64;
    while start.elapsed() < duration {
        let offset = (ops % slots) * SYNC_WRITE_SIZE as u64;
        file.write_all_at(buf.as_slice(), offset)
            .map_err(|e| BenchError::io("raw 4 KiB write failed on", path, e))?;
        file.sync_data()
            .map_err(|e| BenchError::io("fdatasync failed on", path, e))?;
        ops += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    Ok(if secs > 0.0 { ops as f64 / secs } else { 0.0 })
}
