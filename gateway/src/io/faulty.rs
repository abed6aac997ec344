//! Tests only: an [`IoEngine`] wrapper that injects the faults a real disk can produce and a
//! SIGKILL cannot: EIO on a chosen operation, a write torn at a 512-byte boundary, a device that
//! is slow to answer, and power loss.
//!
//! Power loss: every write that no *completed* `sync` covers is undone when the test calls
//! [`FaultyEngine::cut_power`], in reverse order, from the bytes the wrapper saved before the
//! write. A sync covers the writes that had completed when it was issued, so a write that
//! completes while a sync runs is not covered by it (what `fdatasync` promises, and no more).
//! After a cut every operation fails with EIO, as a dead machine's would.
//!
//! Writes pass one at a time (a gate) so that the bytes saved for undo are exactly the bytes
//! each write replaced, even when two writes overlap, and so that `cut_power` waits for the
//! write in flight: no write of a dead process lands after the cut, where it would overwrite
//! what the cut restored or what the next life wrote.
//!
//! A control file ([`FaultyEngine::controlled_by`]) drives faults from outside the process: each
//! line `OP MODE` (OP: `write`, `read` or `sync`; MODE: `eio`, `hang` or `panic`) applies to every
//! such operation while the line is there. Debug builds of the gateway read it from
//! `STAGEFS_DEBUG_FAULTS`, for integration tests of a real process.

use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::FutureExt;

use super::IoEngine;
use crate::aligned::AlignedBuf;

/// The operations a fault can target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Write,
    Read,
    Sync,
}

#[derive(Default)]
struct State {
    /// Writes completed and not yet covered by a completed sync: (completion number, offset,
    /// the bytes they replaced).
    undo: Vec<(u64, u64, Vec<u8>)>,
    completed_writes: u64,
    /// Every write numbered at or below this one is durable.
    durable_upto: u64,
    /// Operations to fail with EIO: (op, how many of them to let through first).
    fail: Vec<(Op, u64)>,
    /// The next write is torn after this many 512-byte sectors, then power is cut.
    tear_next_write: Option<usize>,
    delay: Option<(Op, Duration)>,
    /// The next operation of this kind panics (a bug in the task that awaits it).
    panic_next: Option<Op>,
    powered_off: bool,
}

/// What a control-file line asks of an operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Eio,
    Hang,
    Panic,
}

/// Reads the control file: the mode its lines set for `op`, if any. A missing file sets none.
fn controlled_mode(control: &std::path::Path, op: Op) -> Option<Mode> {
    let text = std::fs::read_to_string(control).ok()?;
    text.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        let target = match words.next()? {
            "write" => Op::Write,
            "read" => Op::Read,
            "sync" => Op::Sync,
            _ => return None,
        };
        let mode = match words.next()? {
            "eio" => Mode::Eio,
            "hang" => Mode::Hang,
            "panic" => Mode::Panic,
            _ => return None,
        };
        (target == op).then_some(mode)
    })
}

/// How long a "hung" operation takes: longer than any test waits.
const HANG: Duration = Duration::from_secs(24 * 3600);

/// See the module documentation.
pub struct FaultyEngine {
    inner: Arc<dyn IoEngine>,
    state: Arc<Mutex<State>>,
    /// Held by each write from its power check to its undo record, and by `cut_power`.
    gate: Arc<tokio::sync::Mutex<()>>,
    control: Option<std::path::PathBuf>,
}

fn eio(what: &str) -> io::Error {
    io::Error::other(format!("injected fault: {what} (EIO)"))
}

impl FaultyEngine {
    pub fn new(inner: Arc<dyn IoEngine>) -> Self {
        FaultyEngine {
            inner,
            state: Arc::new(Mutex::new(State::default())),
            gate: Arc::new(tokio::sync::Mutex::new(())),
            control: None,
        }
    }

    /// Also applies the faults the lines of `control` name, read on every operation.
    pub fn controlled_by(mut self, control: std::path::PathBuf) -> Self {
        self.control = Some(control);
        self
    }

    /// The next operation `op` panics in the task that issues it.
    pub fn panic_next(&self, op: Op) {
        self.lock().panic_next = Some(op);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("fault state poisoned")
    }

    /// The `skip + 1`-th operation `op` from now fails with EIO (the device is left untouched).
    pub fn fail(&self, op: Op, skip: u64) {
        self.lock().fail.push((op, skip));
    }

    /// The next write reaches the device only up to `sectors` 512-byte sectors, and then the
    /// power is cut (the write never completes).
    pub fn tear_next_write(&self, sectors: usize) {
        self.lock().tear_next_write = Some(sectors);
    }

    /// Every operation `op` takes `delay` longer (a device that stops answering).
    pub fn delay(&self, op: Op, delay: Duration) {
        self.lock().delay = Some((op, delay));
    }

    /// Undoes every write no completed sync covers; from now on every operation fails.
    pub async fn cut_power(&self) -> io::Result<()> {
        let _gate = self.gate.lock().await;
        let undo = {
            let mut state = self.lock();
            state.powered_off = true;
            std::mem::take(&mut state.undo)
        };
        for (_, offset, old) in undo.into_iter().rev() {
            restore(&self.inner, offset, &old).await?;
        }
        self.inner.sync().await
    }

    /// Whether an injected fault or delay applies to this `op`; consumes a one-shot failure.
    fn before(&self, op: Op) -> (io::Result<()>, Option<Duration>) {
        let controlled = self
            .control
            .as_deref()
            .and_then(|control| controlled_mode(control, op));
        let mut state = self.lock();
        if state.powered_off {
            return (Err(eio("the power is off")), None);
        }
        if controlled == Some(Mode::Panic) || state.panic_next == Some(op) {
            state.panic_next = None;
            drop(state);
            panic!("injected panic before a device {op:?}");
        }
        if controlled == Some(Mode::Eio) {
            return (Err(eio(&format!("{op:?}, as the control file says"))), None);
        }
        let delay = match controlled {
            Some(Mode::Hang) => Some(HANG),
            _ => state.delay.filter(|(o, _)| *o == op).map(|(_, d)| d),
        };
        let mut failed = false;
        state.fail.retain_mut(|(o, skip)| {
            if *o != op || failed {
                return true;
            }
            if *skip == 0 {
                failed = true;
                return false;
            }
            *skip -= 1;
            true
        });
        let outcome = if failed {
            Err(eio(&format!("{op:?}")))
        } else {
            Ok(())
        };
        (outcome, delay)
    }
}

/// Records a sync that covered the writes completed up to number `covers`: they are durable, and
/// a power cut no longer undoes them.
fn synced(state: &Mutex<State>, covers: u64) -> io::Result<()> {
    let mut st = state.lock().expect("fault state poisoned");
    if st.powered_off {
        return Err(eio("the power was cut during this sync"));
    }
    st.durable_upto = st.durable_upto.max(covers);
    let durable = st.durable_upto;
    st.undo.retain(|(number, _, _)| *number > durable);
    Ok(())
}

/// Writes `old` back at `offset` through aligned buffers.
async fn restore(inner: &Arc<dyn IoEngine>, offset: u64, old: &[u8]) -> io::Result<()> {
    let mut buf = AlignedBuf::zeroed(old.len());
    buf.copy_from_slice(old);
    inner.write_at(buf, offset).await.map(drop)
}

impl IoEngine for FaultyEngine {
    fn write_at(&self, buf: AlignedBuf, offset: u64) -> BoxFuture<'static, io::Result<AlignedBuf>> {
        let (inner, state, gate) = (self.inner.clone(), self.state.clone(), self.gate.clone());
        let (allowed, delay) = self.before(Op::Write);
        let tear = self.lock().tear_next_write.take();
        async move {
            if let Some(delay) = delay {
                tokio::time::sleep(delay).await;
            }
            allowed?;
            let _gate = gate.lock().await;
            if state.lock().expect("fault state poisoned").powered_off {
                return Err(eio("the power is off"));
            }
            let old = inner
                .read_at(AlignedBuf::zeroed(buf.len()), offset)
                .await?
                .to_vec();
            if let Some(sectors) = tear {
                // Part of the write reaches the media, then the machine dies: the torn prefix
                // stays, since no sync came after it (the undo of earlier writes runs in the
                // test's cut_power, which also restores this one's undone writes before it).
                let torn = (sectors * 512).min(buf.len());
                let mut prefix = old.clone();
                prefix[..torn].copy_from_slice(&buf[..torn]);
                restore(&inner, offset, &prefix).await?;
                let mut st = state.lock().expect("fault state poisoned");
                st.powered_off = true;
                return Err(eio("the power was cut during this write"));
            }
            let buf = inner.write_at(buf, offset).await?;
            let mut st = state.lock().expect("fault state poisoned");
            st.completed_writes += 1;
            let number = st.completed_writes;
            st.undo.push((number, offset, old));
            Ok(buf)
        }
        .boxed()
    }

    fn writev_at(
        &self,
        bufs: Vec<AlignedBuf>,
        offset: u64,
    ) -> BoxFuture<'static, io::Result<Vec<AlignedBuf>>> {
        // One write per buffer, back to back: each is undone on its own, as a device may persist
        // any subset of an unsynced vectored write.
        let mut at = offset;
        let writes: Vec<_> = bufs
            .into_iter()
            .map(|buf| {
                let len = buf.len() as u64;
                let write = self.write_at(buf, at);
                at += len;
                write
            })
            .collect();
        async move {
            let mut out = Vec::with_capacity(writes.len());
            for write in writes {
                out.push(write.await?);
            }
            Ok(out)
        }
        .boxed()
    }

    fn read_at(&self, buf: AlignedBuf, offset: u64) -> BoxFuture<'static, io::Result<AlignedBuf>> {
        let inner = self.inner.clone();
        let (allowed, delay) = self.before(Op::Read);
        async move {
            if let Some(delay) = delay {
                tokio::time::sleep(delay).await;
            }
            allowed?;
            inner.read_at(buf, offset).await
        }
        .boxed()
    }

    fn sync(&self) -> BoxFuture<'static, io::Result<()>> {
        let (inner, state) = (self.inner.clone(), self.state.clone());
        let (allowed, delay) = self.before(Op::Sync);
        // Covers what had completed when it was issued.
        let covers = self.lock().completed_writes;
        async move {
            if let Some(delay) = delay {
                tokio::time::sleep(delay).await;
            }
            allowed?;
            inner.sync().await?;
            synced(&state, covers)
        }
        .boxed()
    }

    /// As [`FaultyEngine::sync`], blocking: a delay or a hang holds the calling thread.
    fn sync_here(&self) -> Option<io::Result<()>> {
        let (allowed, delay) = self.before(Op::Sync);
        let covers = self.lock().completed_writes;
        if let Some(delay) = delay {
            std::thread::sleep(delay);
        }
        let flushed = allowed.and_then(|()| {
            self.inner.sync_here().unwrap_or_else(|| {
                Err(io::Error::other(
                    "the engine under the faults cannot flush on this thread",
                ))
            })
        });
        Some(flushed.and_then(|()| synced(&self.state, covers)))
    }

    fn name(&self) -> &'static str {
        // The engine underneath does the I/O; the faults are announced in the log.
        self.inner.name()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aligned::ALIGN;
    use crate::io::{open_engine, EngineKind};
    use std::os::unix::fs::OpenOptionsExt;

    fn engine(dir: &tempfile::TempDir) -> (FaultyEngine, Arc<dyn IoEngine>) {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .custom_flags(libc::O_DIRECT)
            .open(dir.path().join("dev"))
            .unwrap();
        file.set_len(1 << 20).unwrap();
        let inner = open_engine(EngineKind::Psync, file).unwrap();
        (FaultyEngine::new(inner.clone()), inner)
    }

    fn filled(byte: u8, len: usize) -> AlignedBuf {
        let mut buf = AlignedBuf::zeroed(len);
        buf.fill(byte);
        buf
    }

    async fn read(inner: &Arc<dyn IoEngine>, offset: u64, len: usize) -> Vec<u8> {
        inner
            .read_at(AlignedBuf::zeroed(len), offset)
            .await
            .unwrap()
            .to_vec()
    }

    #[tokio::test]
    async fn a_power_cut_keeps_exactly_what_a_completed_sync_covered() {
        let dir = tempfile::tempdir().unwrap();
        let (faulty, inner) = engine(&dir);
        faulty.write_at(filled(1, ALIGN), 0).await.unwrap();
        faulty.sync().await.unwrap();
        faulty.write_at(filled(2, ALIGN), 0).await.unwrap();
        faulty
            .writev_at(vec![filled(3, ALIGN), filled(4, ALIGN)], ALIGN as u64)
            .await
            .unwrap();
        faulty.cut_power().await.unwrap();
        assert_eq!(
            read(&inner, 0, ALIGN).await,
            vec![1; ALIGN],
            "synced, then overwritten"
        );
        assert_eq!(
            read(&inner, ALIGN as u64, 2 * ALIGN).await,
            vec![0; 2 * ALIGN]
        );
        assert!(faulty.read_at(AlignedBuf::zeroed(ALIGN), 0).await.is_err());
    }

    #[tokio::test]
    async fn a_torn_write_leaves_a_sector_prefix_and_nothing_unsynced() {
        let dir = tempfile::tempdir().unwrap();
        let (faulty, inner) = engine(&dir);
        faulty.write_at(filled(5, ALIGN), 0).await.unwrap();
        faulty.tear_next_write(3);
        assert!(faulty
            .write_at(filled(6, ALIGN), ALIGN as u64)
            .await
            .is_err());
        faulty.cut_power().await.unwrap();
        assert_eq!(read(&inner, 0, ALIGN).await, vec![0; ALIGN], "never synced");
        let torn = read(&inner, ALIGN as u64, ALIGN).await;
        assert_eq!(&torn[..1536], &[6; 1536][..]);
        assert_eq!(&torn[1536..], &vec![0; ALIGN - 1536][..]);
    }

    #[tokio::test]
    async fn eio_hits_the_chosen_operation_and_leaves_the_device_alone() {
        let dir = tempfile::tempdir().unwrap();
        let (faulty, inner) = engine(&dir);
        faulty.fail(Op::Write, 1);
        faulty.write_at(filled(7, ALIGN), 0).await.unwrap();
        let Err(error) = faulty.write_at(filled(8, ALIGN), 0).await else {
            panic!("the second write must fail");
        };
        assert_eq!(error.raw_os_error(), None, "{error}");
        assert!(error.to_string().contains("injected fault"), "{error}");
        assert_eq!(read(&inner, 0, ALIGN).await, vec![7; ALIGN]);
        faulty.fail(Op::Sync, 0);
        assert!(faulty.sync().await.is_err());
        faulty.sync().await.unwrap();
        faulty.delay(Op::Read, Duration::from_millis(50));
        let started = std::time::Instant::now();
        faulty.read_at(AlignedBuf::zeroed(ALIGN), 0).await.unwrap();
        assert!(started.elapsed() >= Duration::from_millis(50));
    }
}
