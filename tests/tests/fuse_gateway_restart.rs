//! The gateway is SIGKILLed and restarted while a FUSE mount is writing (issue 3: "the mount
//! reconnects by itself; every file closed before the kill reads back identical; writes in flight
//! either complete after the reconnect or return an error to the application, never silently lose
//! bytes").
//!
//! The gateway gets a new port on every start, so the mount reaches it through a [`TcpProxy`] on
//! a fixed port (what a restart on the same address, or a takeover at the registered address,
//! looks like to a client). Uploads are paused, so every byte read back after a restart comes
//! from the staging log the new gateway process recovered. A writer thread creates files
//! continuously, each written in 256 KiB pieces and closed with `close(2)` whose result is
//! recorded; the test SIGKILLs the gateway three times — early in a file, past its middle, and
//! during `close()` — restarts it after 1.5 s each time, lets the writer go on, and then checks:
//!
//! * every file closed before the kill reads back identical, through the same mount and through
//!   a fresh one;
//! * every file whose writes and `close()` all returned Ok (before, across or after the restart)
//!   holds exactly the bytes written;
//! * the mount works again after the restart without being remounted: files started after the
//!   restart are written and closed successfully.

use std::fs::{self, File};
use std::io::Write;
use std::os::fd::IntoRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use stagefs_tests::{is_fuse_mounted, FuseStack, Mount, Pattern, TcpProxy};

const MIB: u64 = 1 << 20;
/// Pieces the writer writes a file in.
const PIECE: usize = 256 * 1024;
/// How long the gateway stays dead.
const DOWNTIME: Duration = Duration::from_millis(1500);
/// Kill/restart rounds.
const ROUNDS: usize = 3;

/// One file of the writer: what was written and how each step ended.
#[derive(Debug, Clone)]
struct Written {
    name: String,
    seed: u64,
    len: u64,
    started: Instant,
    /// `None`: every write and the close returned Ok. `Some`: the first failure.
    error: Option<String>,
}

fn file_len(n: u64) -> u64 {
    // 0.5–6.5 MiB, never a whole number of blocks, so most files have a partial last block.
    MIB / 2 + (n * 1_234_567) % (6 * MIB) + 1
}

/// Where the writer is in its current file.
#[derive(Debug, Clone)]
struct Progress {
    name: String,
    len: u64,
    started: Instant,
    /// Bytes written (write(2) returned) so far.
    written: u64,
    /// Every byte is written; close(2) is running.
    closing: bool,
}

/// Creates `path` and writes `len` bytes of `pattern` in pieces, then closes it with close(2)
/// and reports the first error of any step. `progress` follows it.
fn write_file(
    path: &Path,
    pattern: Pattern,
    len: u64,
    progress: &Mutex<Option<Progress>>,
) -> Result<(), String> {
    let update = |f: &dyn Fn(&mut Progress)| {
        if let Some(p) = progress.lock().unwrap().as_mut() {
            f(p)
        }
    };
    let mut file = File::create(path).map_err(|e| format!("create: {e}"))?;
    let mut buf = vec![0u8; PIECE];
    let mut at = 0;
    while at < len {
        let n = PIECE.min((len - at) as usize);
        pattern.fill(&mut buf[..n], at);
        if let Err(e) = file.write_all(&buf[..n]) {
            // Close anyway; the write error is what the application saw first.
            let _ = nix::unistd::close(file.into_raw_fd());
            return Err(format!("write at {at}: {e}"));
        }
        at += n as u64;
        update(&|p| p.written = at);
    }
    update(&|p| p.closing = true);
    // std's File ignores the result of close(); the application-visible flush result is here.
    nix::unistd::close(file.into_raw_fd()).map_err(|e| format!("close: {e}"))
}

fn verify_file(path: &Path, pattern: Pattern, len: u64) -> Result<(), String> {
    let size = fs::metadata(path).map_err(|e| format!("stat: {e}"))?.len();
    if size != len {
        return Err(format!("size {size}, {len} were written"));
    }
    let mut file = File::open(path).map_err(|e| format!("open: {e}"))?;
    pattern.verify(&mut file, len)
}

/// A gateway with uploads held back (everything read back after a restart comes from the
/// staging log the new gateway process recovered, not from the object store), reached through a
/// proxy on a fixed port, and mount "a" on it.
fn gateway_behind_proxy(name: &str) -> (TcpProxy, FuseStack, Mount) {
    let proxy = TcpProxy::start();
    let stack = FuseStack::start(name, |gateway| {
        gateway.device_size("1GiB").args([
            "--uploads-paused",
            "--advertise",
            &proxy.addr().to_string(),
        ])
    });
    proxy.set_target(Some(stack.gateway.addr()));
    // This mount fails calls at once while its gateway is down, as before takeover waits: the
    // writer here is a thread of this process, so every gateway the harness spawns inherits its
    // open file on the mount, and the exec that closes it would wait (FUSE flushes on every
    // close) for the very gateway being started. Riding out a restart is tested in
    // tests/tests/takeover.rs, with writers in processes of their own.
    let mnt = stack
        .mount_at(proxy.addr(), "a")
        .no_cache()
        .args(["--takeover-wait", "0s"])
        .start();
    (proxy, stack, mnt)
}

/// SIGKILLs the gateway, keeps it dead for [`DOWNTIME`] with every connection cut, restarts it
/// on the same device and points the proxy at it.
fn kill_and_restart(proxy: &TcpProxy, stack: &mut FuseStack) {
    stack.gateway.kill9();
    proxy.set_target(None);
    proxy.cut_connections();
    std::thread::sleep(DOWNTIME);
    stack.runtime.block_on(stack.gateway.restart());
    proxy.set_target(Some(stack.gateway.addr()));
}

/// When to kill the gateway, by the writer's progress in its current file.
type KillPoint = Box<dyn Fn(&Progress) -> bool>;

struct Writer {
    stop: Arc<AtomicBool>,
    done: Arc<Mutex<Vec<Written>>>,
    /// The file being written now (name, started).
    current: Arc<Mutex<Option<Progress>>>,
    thread: std::thread::JoinHandle<()>,
}

impl Writer {
    fn start(dir: PathBuf) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let done: Arc<Mutex<Vec<Written>>> = Arc::default();
        let current: Arc<Mutex<Option<Progress>>> = Arc::default();
        let (s, d, c) = (stop.clone(), done.clone(), current.clone());
        let thread = std::thread::spawn(move || {
            let mut n = 0u64;
            // Stops when told, or when the mount is gone (a failed test unmounts it on the way
            // out; the writer must not go on in the directory underneath).
            while !s.load(Ordering::Relaxed) && is_fuse_mounted(&dir) {
                let name = format!("w-{n:04}");
                let (seed, len) = (10_000 + n, file_len(n));
                let started = Instant::now();
                *c.lock().unwrap() = Some(Progress {
                    name: name.clone(),
                    len,
                    started,
                    written: 0,
                    closing: false,
                });
                let error = write_file(&dir.join(&name), Pattern::new(seed), len, &c).err();
                *c.lock().unwrap() = None;
                let failed = error.is_some();
                d.lock().unwrap().push(Written {
                    name,
                    seed,
                    len,
                    started,
                    error,
                });
                n += 1;
                if failed {
                    // Like an application retrying later; keeps the outage from making
                    // thousands of failed files.
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        });
        Writer {
            stop,
            done,
            current,
            thread,
        }
    }

    fn done(&self) -> Vec<Written> {
        self.done.lock().unwrap().clone()
    }

    /// Waits until `pred` holds for the files done so far, or panics after `limit`.
    fn wait_for(&self, limit: Duration, what: &str, pred: impl Fn(&[Written]) -> bool) {
        let deadline = Instant::now() + limit;
        loop {
            let done = self.done();
            if pred(&done) {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "the writer did not get there within {} s: {what}; current file {:?}; last files: {:?}",
                    limit.as_secs(),
                    self.current.lock().unwrap(),
                    &done[done.len().saturating_sub(5)..]
                );
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn stop(self, limit: Duration) -> Vec<Written> {
        self.stop.store(true, Ordering::Relaxed);
        let deadline = Instant::now() + limit;
        while !self.thread.is_finished() {
            if Instant::now() > deadline {
                panic!(
                    "the writer hung for {} s after being told to stop, in file {:?}",
                    limit.as_secs(),
                    self.current.lock().unwrap()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let done = self.done.clone();
        self.thread.join().expect("the writer thread panicked");
        let written = done.lock().unwrap().clone();
        written
    }
}

#[test]
fn gateway_sigkill_and_restart_while_writing() {
    let test_started = Instant::now();
    let (proxy, mut stack, mnt) = gateway_behind_proxy("fuse-restart");

    // Files closed before anything happens.
    let before: Vec<(String, Pattern, u64)> = (0..8u64)
        .map(|i| (format!("before-{i}"), Pattern::new(i), file_len(100 + i)))
        .collect();
    for (name, pattern, len) in &before {
        write_file(&mnt.join(name), *pattern, *len, &Mutex::new(None)).unwrap_or_else(|e| {
            panic!(
                "writing {name} with a healthy gateway: {e}\nmount log:\n{}",
                mnt.log_tail(30)
            )
        });
    }

    // A writer that keeps going through the kill and the restart.
    let writer = Writer::start(mnt.path().to_path_buf());
    writer.wait_for(
        Duration::from_secs(60),
        "3 files with a healthy gateway",
        |done| done.len() >= 3,
    );
    let healthy = writer.done();
    if let Some(w) = healthy.iter().find(|w| w.error.is_some()) {
        panic!(
            "{} failed while the gateway was healthy: {:?}\nmount log:\n{}",
            w.name,
            w.error,
            mnt.log_tail(30)
        );
    }
    // Kill it in the middle of a file, a few times, at different points of the file.
    let mut outages = Vec::new();
    for round in 0..ROUNDS {
        // Round 0: early in a file; 1: past its middle; 2: in close() (every byte written,
        // the flush of the last block and the commit running).
        let (what, at_point): (&str, KillPoint) = match round % 3 {
            0 => (
                "a file with its first piece written",
                Box::new(|p| p.written >= PIECE as u64 && !p.closing),
            ),
            1 => (
                "a file past its middle",
                Box::new(|p| p.written > p.len / 2 && !p.closing && p.len > 2 * PIECE as u64),
            ),
            _ => ("a file in close()", Box::new(|p| p.closing)),
        };
        writer.wait_for(Duration::from_secs(60), what, |_| {
            writer
                .current
                .lock()
                .unwrap()
                .as_ref()
                .is_some_and(&at_point)
        });
        let in_flight = writer.current.lock().unwrap().clone();
        let killed_at = Instant::now();
        kill_and_restart(&proxy, &mut stack);
        let restarted_at = Instant::now();
        let in_flight = in_flight.map_or("nothing".to_string(), |p| {
            format!(
                "{}, {:.0} ms in, {} of {} bytes written{}",
                p.name,
                (killed_at - p.started).as_secs_f64() * 1000.0,
                p.written,
                p.len,
                if p.closing { ", in close()" } else { "" }
            )
        });
        eprintln!(
            "[stagefs-tests] round {round}: killed the gateway while writing {in_flight}; restarted after {:.1} s",
            (restarted_at - killed_at).as_secs_f64()
        );
        outages.push((killed_at, restarted_at));
        // The same mount, not remounted, must work again: files started after the restart
        // succeed.
        writer.wait_for(
            Duration::from_secs(90),
            "2 files started after the restart, closed Ok",
            |done| {
                done.iter()
                    .filter(|w| w.started > restarted_at && w.error.is_none())
                    .count()
                    >= 2
            },
        );
    }
    let written = writer.stop(Duration::from_secs(60));

    let phase = |w: &Written| {
        for (round, (killed_at, restarted_at)) in outages.iter().enumerate() {
            if w.started < *killed_at {
                return if round == 0 {
                    "before the first outage".to_string()
                } else {
                    format!("after outage {}", round - 1)
                };
            }
            if w.started < *restarted_at {
                return format!("during outage {round}");
            }
        }
        format!("after outage {} (the last)", outages.len() - 1)
    };
    // One line per file, except runs of files failing the same way.
    let mut report = String::new();
    let mut i = 0;
    while i < written.len() {
        let w = &written[i];
        let mut j = i + 1;
        while w.error.is_some()
            && j < written.len()
            && written[j].error == w.error
            && phase(&written[j]) == phase(w)
        {
            j += 1;
        }
        let names = if j - i > 1 {
            format!("{}..{} ({} files)", w.name, written[j - 1].name, j - i)
        } else {
            w.name.clone()
        };
        report += &format!(
            "  {names}, started {}: {}\n",
            phase(w),
            w.error.as_deref().unwrap_or("ok")
        );
        i = j;
    }
    eprintln!("[stagefs-tests] writer files:\n{report}");
    let (_, last_restarted) = *outages.last().unwrap();
    let ok_after = written
        .iter()
        .filter(|w| w.started > last_restarted && w.error.is_none())
        .count();
    assert!(
        ok_after >= 2,
        "files written after the last restart failed:\n{report}"
    );
    assert!(
        written.iter().filter(|w| w.error.is_none()).count() >= 3 + 2 * ROUNDS,
        "too few files were written successfully:\n{report}"
    );

    // Same mount: everything closed Ok is exactly what was written.
    let check = |root: &Path, which: &str| {
        for (name, pattern, len) in &before {
            if let Err(e) = verify_file(&root.join(name), *pattern, *len) {
                panic!("{name}, closed before the kill, reads back wrong through {which}: {e}");
            }
        }
        for w in written.iter().filter(|w| w.error.is_none()) {
            if let Err(e) = verify_file(&root.join(&w.name), Pattern::new(w.seed), w.len) {
                panic!(
                    "{}, whose writes and close() returned Ok, reads back wrong through {which}: {e}\nwriter files:\n{report}",
                    w.name
                );
            }
        }
    };
    check(mnt.path(), "the same mount");
    // Metadata operations work again on the same mount too.
    fs::create_dir(mnt.join("after-restart")).unwrap();
    fs::rename(mnt.join("before-0"), mnt.join("after-restart/before-0")).unwrap();
    fs::rename(mnt.join("after-restart/before-0"), mnt.join("before-0")).unwrap();

    // A fresh mount, straight at the restarted gateway: nothing is cached there.
    let fresh = stack.mount("fresh").no_cache().start();
    check(fresh.path(), "a fresh mount");
    fresh.unmount();
    mnt.unmount();
    let objects = stack.block_on(stack.s3.list());
    assert!(
        objects.is_empty(),
        "uploads were paused, yet {} objects were uploaded",
        objects.len()
    );
    eprintln!(
        "[stagefs-tests] gateway_sigkill_and_restart_while_writing: passed in {:.1} s ({} writer files, {} failed)",
        test_started.elapsed().as_secs_f64(),
        written.len(),
        written.iter().filter(|w| w.error.is_some()).count()
    );
}

/// One row of the append log: its number, padded to about 100 bytes.
fn row(i: u64) -> String {
    format!("{i:08} {}\n", "r".repeat(90))
}

/// Appends with `fsync` after each row (each flush is one `WriteSlice`: pending record, block
/// and commit in one call) while the gateway is SIGKILLed and restarted. Every row whose fsync
/// returned Ok, and every row before it, must read back, in order, through a fresh mount; the
/// file holds nothing but rows, in order.
#[test]
fn acknowledged_appends_survive_gateway_sigkill() {
    let (proxy, mut stack, mnt) = gateway_behind_proxy("fuse-restart-appends");
    let path = mnt.join("append.log");

    let stop = Arc::new(AtomicBool::new(false));
    // Rows whose fsync (or a later one) returned Ok, and the fsync failures seen.
    let acked = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let failures: Arc<Mutex<Vec<String>>> = Arc::default();
    let writer = {
        let (stop, acked, failures, path) =
            (stop.clone(), acked.clone(), failures.clone(), path.clone());
        std::thread::spawn(move || {
            let mut file = fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .expect("open the append log");
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                if let Err(e) = file.write_all(row(i).as_bytes()) {
                    // A failed write took nothing (the mount holds too much it could not
                    // commit): the same row again, a little later.
                    failures.lock().unwrap().push(format!("write {i}: {e}"));
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
                i += 1;
                match file.sync_all() {
                    Ok(()) => acked.store(i, Ordering::SeqCst),
                    // The rows stay dirty in the mount; a later fsync commits them.
                    Err(e) => failures
                        .lock()
                        .unwrap()
                        .push(format!("fsync after {i}: {e}")),
                }
            }
            nix::unistd::close(file.into_raw_fd())
                .map_err(|e| format!("close: {e}"))
                .map(|()| i)
        })
    };
    let gateway_log = stack.gateway.log_path().to_path_buf();
    let wait_rows = |at_least: u64, what: &str| {
        let deadline = Instant::now() + Duration::from_secs(90);
        while acked.load(Ordering::SeqCst) < at_least {
            if Instant::now() >= deadline {
                let failures = failures.lock().unwrap();
                panic!(
                    "{what}: only {} rows acknowledged; {} failures, the last: {:?}\nmount \
                     log:\n{}\ngateway log:\n{}",
                    acked.load(Ordering::SeqCst),
                    failures.len(),
                    &failures[failures.len().saturating_sub(5)..],
                    mnt.log_tail(30),
                    stagefs_tests::tail(&fs::read_to_string(&gateway_log).unwrap_or_default(), 20)
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    };

    wait_rows(100, "with a healthy gateway");
    for round in 0..ROUNDS {
        // Killed while rows are being appended and fsync'd, at whatever point that falls.
        let before_kill = acked.load(Ordering::SeqCst);
        kill_and_restart(&proxy, &mut stack);
        eprintln!(
            "[stagefs-tests] appends round {round}: killed with {before_kill} rows acknowledged"
        );
        let after = acked.load(Ordering::SeqCst);
        wait_rows(after + 100, "after the restart");
    }
    stop.store(true, Ordering::Relaxed);
    let written = writer
        .join()
        .expect("writer thread")
        .unwrap_or_else(|e| panic!("the append log: {e}\nmount log:\n{}", mnt.log_tail(30)));
    let acked = acked.load(Ordering::SeqCst);
    let failures = failures.lock().unwrap().clone();
    let failed_writes = failures.iter().filter(|f| f.starts_with("write")).count();
    eprintln!(
        "[stagefs-tests] appends: {written} rows written, {acked} acknowledged through {} outages; {} fsyncs and {failed_writes} writes failed meanwhile (a failed write takes nothing and is repeated)",
        ROUNDS,
        failures.len() - failed_writes
    );

    let check = |root: &Path, which: &str| {
        let got = fs::read(root.join("append.log")).expect("read the append log");
        let rows = got.len() / row(0).len();
        assert!(
            rows as u64 >= acked,
            "through {which}: {rows} rows, but {acked} were acknowledged"
        );
        let want: String = (0..rows as u64).map(row).collect();
        if got != want.as_bytes() {
            let at = got
                .iter()
                .zip(want.as_bytes())
                .position(|(g, w)| g != w)
                .unwrap_or(got.len().min(want.len()));
            let show = |b: &[u8]| {
                String::from_utf8_lossy(&b[at.saturating_sub(20)..(at + 120).min(b.len())])
                    .into_owned()
            };
            panic!(
                "through {which}: the log ({} bytes) is not rows 0..{rows} in order: first difference at byte {at} (row {}):\n got: {:?}\nwant: {:?}",
                got.len(),
                at / row(0).len(),
                show(&got),
                show(want.as_bytes())
            );
        }
    };
    check(mnt.path(), "the same mount");
    let fresh = stack.mount("fresh").no_cache().start();
    check(fresh.path(), "a fresh mount");
    // Closed Ok after the last restart: every row written is there.
    let all = fs::read(fresh.join("append.log")).unwrap().len() / row(0).len();
    assert_eq!(
        all as u64, written,
        "close() returned Ok, so every row is committed"
    );
    fresh.unmount();
    mnt.unmount();
}
