//! The `IoEngine` trait: aligned reads, writes and data syncs against the staging device.
//!
//! Two backends: [`uring`] runs tokio-uring on a thread of its own (tokio-uring is `!Send` and
//! single-threaded, so requests reach it over a channel), and [`psync`] does pread/pwrite/
//! fdatasync on tokio's blocking pool for hosts where io_uring is blocked.

/// Fault injection: unit tests, and debug builds of the gateway (`STAGEFS_DEBUG_FAULTS`).
#[cfg(any(test, debug_assertions))]
pub mod faulty;
pub mod psync;
pub mod uring;

use std::fs::File;
use std::io;
use std::sync::Arc;

use futures::future::BoxFuture;

use crate::aligned::AlignedBuf;

pub trait IoEngine: Send + Sync + 'static {
    /// Writes all of `buf` at `offset` (both aligned); hands the buffer back.
    fn write_at(&self, buf: AlignedBuf, offset: u64) -> BoxFuture<'static, io::Result<AlignedBuf>>;
    /// Writes `bufs` back to back from `offset`, as one vectored write; hands them back.
    fn writev_at(
        &self,
        bufs: Vec<AlignedBuf>,
        offset: u64,
    ) -> BoxFuture<'static, io::Result<Vec<AlignedBuf>>>;
    /// Fills all of `buf` from `offset` (both aligned).
    fn read_at(&self, buf: AlignedBuf, offset: u64) -> BoxFuture<'static, io::Result<AlignedBuf>>;
    /// Makes every completed write durable (fdatasync).
    fn sync(&self) -> BoxFuture<'static, io::Result<()>>;
    /// The same `fdatasync`, issued on the calling thread, for a caller that may block; `None`
    /// when the engine cannot (the caller then uses [`IoEngine::sync`]).
    fn sync_here(&self) -> Option<io::Result<()>> {
        None
    }
    fn name(&self) -> &'static str;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EngineKind {
    /// io_uring through tokio-uring on a dedicated thread (reads and writes; fdatasync on a
    /// thread pool).
    Uring,
    /// pread/pwrite/fdatasync on a thread pool; works everywhere.
    Psync,
}

/// Opens the requested engine on `file`; when io_uring is unavailable the portable engine is used
/// and the fallback is logged.
pub fn open_engine(kind: EngineKind, file: File) -> io::Result<Arc<dyn IoEngine>> {
    match kind {
        EngineKind::Psync => Ok(Arc::new(psync::PsyncEngine::new(file))),
        EngineKind::Uring => match uring::UringEngine::new(file.try_clone()?) {
            Ok(engine) => Ok(Arc::new(engine)),
            Err(error) => {
                tracing::warn!(%error, "io_uring is unavailable on this host; falling back to the psync engine");
                Ok(Arc::new(psync::PsyncEngine::new(file)))
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aligned::ALIGN;
    use std::os::unix::fs::OpenOptionsExt;

    async fn round_trip(kind: EngineKind) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dev");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .custom_flags(libc::O_DIRECT)
            .open(&path)
            .unwrap();
        file.set_len(1 << 20).unwrap();
        let engine = open_engine(kind, file).unwrap();
        let mut buf = AlignedBuf::zeroed(2 * ALIGN);
        buf.iter_mut()
            .enumerate()
            .for_each(|(i, b)| *b = (i % 251) as u8);
        let expected = buf.to_vec();
        engine.write_at(buf, ALIGN as u64 * 3).await.unwrap();
        // A vectored write lands its buffers back to back.
        let parts: Vec<AlignedBuf> = (1..=3u8)
            .map(|i| {
                let mut b = AlignedBuf::zeroed(ALIGN * i as usize);
                b.fill(i);
                b
            })
            .collect();
        engine.writev_at(parts, ALIGN as u64 * 8).await.unwrap();
        let back = engine
            .read_at(AlignedBuf::zeroed(6 * ALIGN), ALIGN as u64 * 8)
            .await
            .unwrap();
        let expected_v: Vec<u8> = [1u8, 2, 2, 3, 3, 3]
            .iter()
            .flat_map(|&i| std::iter::repeat_n(i, ALIGN))
            .collect();
        assert_eq!(&back[..], &expected_v[..]);
        engine.sync().await.unwrap();
        let back = engine
            .read_at(AlignedBuf::zeroed(2 * ALIGN), ALIGN as u64 * 3)
            .await
            .unwrap();
        assert_eq!(&back[..], &expected[..]);
        // Reading past the end is an error, never a short buffer presented as whole.
        assert!(engine
            .read_at(AlignedBuf::zeroed(ALIGN), 1 << 20)
            .await
            .is_err());
    }

    #[tokio::test]
    async fn psync_round_trip() {
        round_trip(EngineKind::Psync).await
    }

    #[tokio::test]
    async fn uring_round_trip() {
        round_trip(EngineKind::Uring).await
    }
}
