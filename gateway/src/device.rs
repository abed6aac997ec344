//! Opening the staging device: a raw block device (size from `BLKGETSIZE64`) or a regular file
//! (created and preallocated when missing), always `O_DIRECT`, and held exclusively so two
//! gateways on one node can never share a device.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use crate::aligned::ALIGN;

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("cannot open staging device {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("cannot create staging file {path} of {size} bytes: {source}")]
    Create {
        path: PathBuf,
        size: u64,
        source: io::Error,
    },
    #[error("staging device {path} is in use by another process (it is locked)")]
    Busy { path: PathBuf },
    #[error("cannot read the size of {path}: {source}")]
    Size { path: PathBuf, source: io::Error },
    #[error("staging device {path} has a logical block size of {lbs} bytes; at most {ALIGN} is supported")]
    BlockSize { path: PathBuf, lbs: u64 },
    #[error("{path} is neither a regular file nor a block device")]
    Kind { path: PathBuf },
}

pub struct Device {
    pub file: File,
    pub path: PathBuf,
    pub size: u64,
    /// True when the file did not exist and was created now (so it may be formatted freely).
    pub created: bool,
}

nix::ioctl_read!(blk_get_size64, 0x12, 114, u64);
nix::ioctl_read_bad!(blk_get_ssz, 0x1268, libc::c_int);

/// Opens `path` for staging; a missing file is created with `create_size` bytes (preallocated).
pub fn open_device(path: &Path, create_size: u64, writable: bool) -> Result<Device, DeviceError> {
    let created = writable && !path.exists();
    if created {
        create_file(path, create_size)?;
    }
    let meta = std::fs::metadata(path).map_err(|source| DeviceError::Open {
        path: path.into(),
        source,
    })?;
    let is_block = meta.file_type().is_block_device();
    if !is_block && !meta.is_file() {
        return Err(DeviceError::Kind { path: path.into() });
    }
    let mut flags = libc::O_DIRECT;
    if is_block && writable {
        // O_EXCL on a block device fails if anyone else has it open exclusively (a mount, another gateway).
        flags |= libc::O_EXCL;
    }
    let file = OpenOptions::new()
        .read(true)
        .write(writable)
        .custom_flags(flags)
        .open(path)
        .map_err(|source| match source.raw_os_error() {
            Some(libc::EBUSY) => DeviceError::Busy { path: path.into() },
            _ => DeviceError::Open {
                path: path.into(),
                source,
            },
        })?;
    if writable {
        // The lock belongs to this open file description and goes away when `file` is closed.
        // SAFETY: flock on a valid open descriptor.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(DeviceError::Busy { path: path.into() });
        }
    }
    let size = if is_block {
        let mut lbs: libc::c_int = 0;
        // SAFETY: ioctls on an open block device with correctly typed out-pointers.
        unsafe { blk_get_ssz(file.as_raw_fd(), &mut lbs) }.map_err(|e| DeviceError::Size {
            path: path.into(),
            source: e.into(),
        })?;
        if lbs as u64 > ALIGN as u64 {
            return Err(DeviceError::BlockSize {
                path: path.into(),
                lbs: lbs as u64,
            });
        }
        let mut bytes: u64 = 0;
        unsafe { blk_get_size64(file.as_raw_fd(), &mut bytes) }.map_err(|e| DeviceError::Size {
            path: path.into(),
            source: e.into(),
        })?;
        bytes
    } else {
        meta.len()
    };
    Ok(Device {
        file,
        path: path.into(),
        size: size / ALIGN as u64 * ALIGN as u64,
        created,
    })
}

fn create_file(path: &Path, size: u64) -> Result<(), DeviceError> {
    let err = |source| DeviceError::Create {
        path: path.into(),
        size,
        source,
    };
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(err)?;
    // Preallocate so the log never hits ENOSPC in the file system underneath it.
    match nix::fcntl::fallocate(&file, nix::fcntl::FallocateFlags::empty(), 0, size as i64) {
        Ok(()) => {}
        Err(nix::errno::Errno::EOPNOTSUPP) => file.set_len(size).map_err(err)?,
        Err(e) => {
            let _ = std::fs::remove_file(path);
            return Err(err(e.into()));
        }
    }
    file.sync_all().map_err(err)?;
    // Make the new directory entry durable too.
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        File::open(dir).and_then(|d| d.sync_all()).map_err(err)?;
    }
    Ok(())
}
