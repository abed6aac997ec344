//! Portable backend: positioned reads and writes plus fdatasync on tokio's blocking pool.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use futures::future::BoxFuture;

use super::IoEngine;
use crate::aligned::AlignedBuf;

pub struct PsyncEngine {
    file: Arc<File>,
}

impl PsyncEngine {
    pub fn new(file: File) -> Self {
        PsyncEngine {
            file: Arc::new(file),
        }
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| io::Error::other(format!("I/O task failed: {e}")))?
}

/// `fdatasync` of `file` on tokio's blocking pool: how both engines flush.
pub(super) fn sync_on_pool(file: &Arc<File>) -> BoxFuture<'static, io::Result<()>> {
    let file = file.clone();
    Box::pin(blocking(move || file.sync_data()))
}

impl IoEngine for PsyncEngine {
    fn write_at(&self, buf: AlignedBuf, offset: u64) -> BoxFuture<'static, io::Result<AlignedBuf>> {
        let file = self.file.clone();
        Box::pin(blocking(move || {
            file.write_all_at(&buf, offset)?;
            Ok(buf)
        }))
    }

    fn writev_at(
        &self,
        bufs: Vec<AlignedBuf>,
        offset: u64,
    ) -> BoxFuture<'static, io::Result<Vec<AlignedBuf>>> {
        let file = self.file.clone();
        Box::pin(blocking(move || {
            let total: usize = bufs.iter().map(|b| b.len()).sum();
            let mut done = 0usize;
            while done < total {
                // Skip what was written; a short write can end inside a buffer.
                let mut skip = done;
                let slices: Vec<std::io::IoSlice<'_>> = bufs
                    .iter()
                    .filter_map(|b| {
                        if skip >= b.len() {
                            skip -= b.len();
                            None
                        } else {
                            let s = std::io::IoSlice::new(&b[skip..]);
                            skip = 0;
                            Some(s)
                        }
                    })
                    .collect();
                let n = nix::sys::uio::pwritev(&*file, &slices, (offset + done as u64) as i64)?;
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "device accepted no bytes",
                    ));
                }
                done += n;
            }
            Ok(bufs)
        }))
    }

    fn read_at(
        &self,
        mut buf: AlignedBuf,
        offset: u64,
    ) -> BoxFuture<'static, io::Result<AlignedBuf>> {
        let file = self.file.clone();
        Box::pin(blocking(move || {
            file.read_exact_at(&mut buf, offset)?;
            Ok(buf)
        }))
    }

    fn sync(&self) -> BoxFuture<'static, io::Result<()>> {
        sync_on_pool(&self.file)
    }

    fn sync_here(&self) -> Option<io::Result<()>> {
        Some(self.file.sync_data())
    }

    fn name(&self) -> &'static str {
        "psync"
    }
}
