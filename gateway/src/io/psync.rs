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

impl IoEngine for PsyncEngine {
    fn write_at(&self, buf: AlignedBuf, offset: u64) -> BoxFuture<'static, io::Result<AlignedBuf>> {
        let file = self.file.clone();
        Box::pin(blocking(move || {
            file.write_all_at(&buf, offset)?;
            Ok(buf)
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
        let file = self.file.clone();
        Box::pin(blocking(move || file.sync_data()))
    }

    fn name(&self) -> &'static str {
        "psync"
    }
}
