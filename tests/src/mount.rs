//! Real FUSE mounts: `stagefs mount <gateway> <dir> --foreground` as a child process of the test.
//!
//! [`Mount::builder`] collects the command line; [`MountBuilder::start`] spawns the client in the
//! foreground (so the test owns the process) and waits until the directory shows up as a FUSE
//! mount in `/proc/self/mountinfo`. The client's stdout and stderr (its tracing log) are appended
//! to `<mountpoint>.log`, next to the mount point ([`Mount::log`]).
//!
//! * [`Mount::unmount`] unmounts the way a user does, with `stagefs umount` (retried briefly while
//!   the kernel answers EBUSY), and waits for the client to exit.
//! * Dropping a [`Mount`] that is still mounted runs `fusermount3 -u -z` and kills the client, so
//!   a failing test leaves no mount behind.
//! * A watchdog (default [`WATCHDOG`], [`MountBuilder::watchdog`]) lazily unmounts and kills the
//!   client if the mount outlives its limit: a file-system call hung in the kernel then returns an
//!   error and the test fails instead of hanging the whole test run.
//!
//! [`FuseStack`] bundles what a FUSE test needs (scratch directory, S3 server, gateway, a runtime
//! for the async harness parts) and hands out mounts of its gateway; [`TcpProxy`] gives a gateway
//! a stable address across restarts (the gateway picks a new port on every start).

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use harness::mount::MountProcess;

use crate::binaries::client_binary;
use crate::gateway::{Gateway, GatewayBuilder};
use crate::s3::{S3Server, S3_REGION};
use crate::TestDir;

/// How long `stagefs mount --foreground` may take until the directory is a FUSE mount.
pub const MOUNT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the client may take to exit after it was unmounted.
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long [`Mount::unmount`] retries while the mount is busy.
pub const UNMOUNT_BUSY_RETRY: Duration = Duration::from_secs(10);
/// Default limit on the life of one mount; see the module docs.
pub const WATCHDOG: Duration = Duration::from_secs(240);

pub use harness::mount::{fuse_mount_info, is_fuse_mounted};

/// The command `stagefs mount <gateway> <mountpoint>` (background mode unless `--foreground` is
/// added), with a clean AWS environment.
pub fn mount_command(gateway: &str, mountpoint: &Path) -> Command {
    let mut command = Command::new(client_binary());
    command
        .arg("mount")
        .arg(gateway)
        .arg(mountpoint)
        .env("RUST_BACKTRACE", "1")
        .env_remove("AWS_SESSION_TOKEN")
        .env_remove("AWS_PROFILE")
        .env_remove("AWS_ENDPOINT")
        .env_remove("AWS_ENDPOINT_URL")
        .stdin(Stdio::null());
    command
}

/// The command line of a mount; see [`Mount::builder`].
#[derive(Debug, Clone)]
pub struct MountBuilder {
    gateway: String,
    mountpoint: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    watchdog: Duration,
}

impl MountBuilder {
    /// One extra argument, e.g. `--read-only`.
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Extra arguments, e.g. `["--attr-ttl", "0s"]`.
    pub fn args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, args: I) -> Self {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// `--attr-ttl 0s --entry-ttl 0s`: the kernel caches neither attributes nor names, so every
    /// change made through another mount is seen at once.
    pub fn no_cache(self) -> Self {
        self.args(["--attr-ttl", "0s", "--entry-ttl", "0s"])
    }

    /// `--read-only`.
    pub fn read_only(self) -> Self {
        self.arg("--read-only")
    }

    /// Reads uploaded blocks from `s3`: `--s3-endpoint`, `--s3-allow-http`, `--s3-region` and the
    /// credentials in the environment.
    pub fn s3(mut self, s3: &S3Server) -> Self {
        self.args.extend([
            "--s3-endpoint".to_string(),
            s3.endpoint(),
            "--s3-allow-http".into(),
            "--s3-region".into(),
            S3_REGION.into(),
        ]);
        self.env.extend(s3.gateway_env());
        self
    }

    /// An environment variable for the client.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Limit on the life of the mount (default [`WATCHDOG`]).
    pub fn watchdog(mut self, limit: Duration) -> Self {
        self.watchdog = limit;
        self
    }

    /// The full argument list, starting with `mount`.
    pub fn command_args(&self) -> Vec<String> {
        let mut args = vec![
            "mount".to_string(),
            self.gateway.clone(),
            self.mountpoint.display().to_string(),
            "--foreground".into(),
        ];
        args.extend(self.args.iter().cloned());
        args
    }

    /// Spawns `stagefs mount ... --foreground` and waits until the directory is a FUSE mount
    /// (`harness::mount::MountProcess`).
    pub fn start(self) -> Mount {
        std::fs::create_dir_all(&self.mountpoint).unwrap_or_else(|e| {
            panic!(
                "cannot create mount point {}: {e}",
                self.mountpoint.display()
            )
        });
        let mountpoint = self.mountpoint.canonicalize().unwrap_or_else(|e| {
            panic!(
                "cannot resolve mount point {}: {e}",
                self.mountpoint.display()
            )
        });
        let log_path = log_path_for(&mountpoint);
        let args = self.command_args();
        let mut command = mount_command(&self.gateway, &mountpoint);
        command
            .arg("--foreground")
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let process = MountProcess::start(command, &mountpoint, &log_path, MOUNT_TIMEOUT)
            .unwrap_or_else(|e| panic!("{e}"));
        let pid = process.pid().expect("a started mount has its client");
        let watchdog = Watchdog::start(self.watchdog, mountpoint.clone(), pid);
        Mount {
            mountpoint,
            log_path,
            args,
            process: Some(process),
            watchdog: Some(watchdog),
        }
    }
}

fn log_path_for(mountpoint: &Path) -> PathBuf {
    let mut name = mountpoint
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_else(|| "mount".into());
    name.push(".log");
    mountpoint.with_file_name(name)
}

/// Unmounts (lazily) and kills a mount that outlives its limit.
struct Watchdog {
    cancel: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watchdog {
    fn start(limit: Duration, mountpoint: PathBuf, pid: u32) -> Watchdog {
        let (cancel, cancelled) = mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            if let Err(mpsc::RecvTimeoutError::Timeout) = cancelled.recv_timeout(limit) {
                eprintln!(
                    "[stagefs-tests] watchdog: the mount on {} outlived its limit of {} s; \
                     unmounting it lazily and killing the client (pid {pid})",
                    mountpoint.display(),
                    limit.as_secs()
                );
                let _ = Command::new("fusermount3")
                    .arg("-u")
                    .arg("-z")
                    .arg(&mountpoint)
                    .status();
                // The owner has not reaped the child yet (it cancels this watchdog first), so
                // the pid is still ours.
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        });
        Watchdog {
            cancel: Some(cancel),
            thread: Some(thread),
        }
    }

    fn cancel(&mut self) {
        self.cancel.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A running `stagefs mount --foreground` client; see the module docs.
pub struct Mount {
    mountpoint: PathBuf,
    log_path: PathBuf,
    args: Vec<String>,
    process: Option<MountProcess>,
    watchdog: Option<Watchdog>,
}

impl Mount {
    /// A mount of the gateway at `gateway` (`host:port`) on `mountpoint` (created if missing),
    /// with the client's default options.
    pub fn builder(gateway: impl ToString, mountpoint: impl Into<PathBuf>) -> MountBuilder {
        MountBuilder {
            gateway: gateway.to_string(),
            mountpoint: mountpoint.into(),
            args: Vec::new(),
            env: Vec::new(),
            watchdog: WATCHDOG,
        }
    }

    /// The mount point (canonical).
    pub fn path(&self) -> &Path {
        &self.mountpoint
    }

    /// A path inside the mount.
    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.mountpoint.join(name)
    }

    /// The client's process id.
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().and_then(MountProcess::pid)
    }

    /// The client's log (stdout and stderr).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The last `lines` lines of the client's log, for assertion messages.
    pub fn log_tail(&self, lines: usize) -> String {
        crate::tail(&self.log(), lines)
    }

    /// Whether the directory is (still) a FUSE mount.
    pub fn is_mounted(&self) -> bool {
        is_fuse_mounted(&self.mountpoint)
    }

    /// Whether the client process is running.
    pub fn is_running(&mut self) -> bool {
        self.process.as_mut().is_some_and(MountProcess::is_running)
    }

    /// Unmounts with `stagefs umount` (retried for up to [`UNMOUNT_BUSY_RETRY`] while the mount is
    /// busy) and waits for the client to exit; returns its exit status. Panics, with the client's
    /// log, if any of that fails.
    pub fn unmount(mut self) -> ExitStatus {
        if let Some(mut watchdog) = self.watchdog.take() {
            watchdog.cancel();
        }
        let started = Instant::now();
        loop {
            let output = Command::new(client_binary())
                .arg("umount")
                .arg(&self.mountpoint)
                .stdin(Stdio::null())
                .output()
                .expect("run stagefs umount");
            if output.status.success() {
                break;
            }
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
            let busy = text.to_lowercase().contains("busy");
            if !busy || started.elapsed() > UNMOUNT_BUSY_RETRY {
                panic!(
                    "`stagefs umount {}` failed ({}): {}\nmount log:\n{}",
                    self.mountpoint.display(),
                    output.status,
                    text.trim(),
                    self.log_tail(30)
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let mut process = self.process.take().expect("the mount process is running");
        let status = process
            .wait_exit(EXIT_TIMEOUT)
            .unwrap_or_else(|e| panic!("`stagefs {}`: {e}", self.args.join(" ")));
        assert!(
            !self.is_mounted(),
            "{} is still a FUSE mount after `stagefs umount`",
            self.mountpoint.display()
        );
        status
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Some(mut watchdog) = self.watchdog.take() {
            watchdog.cancel();
        }
        // The process unmounts lazily if still mounted, and reaps or kills the client.
        self.process.take();
    }
}

/// What a FUSE test runs against: a scratch directory, an S3 server, a gateway storing to it,
/// and a tokio runtime for the async parts of the harness. Fields drop in declaration order:
/// gateway, S3 server, runtime, then the scratch directory. Declare mounts *after* the stack
/// (`let stack = ...; let mount = stack.mount("a").start();`) so that they drop first.
pub struct FuseStack {
    pub gateway: Gateway,
    pub s3: S3Server,
    /// For the async harness; a field (not only [`FuseStack::block_on`]) so that
    /// `stack.runtime.block_on(stack.gateway.restart())` borrows disjoint fields.
    pub runtime: tokio::runtime::Runtime,
    pub dir: TestDir,
}

impl FuseStack {
    /// Starts an S3 server and a gateway (`--io-engine uring`, which falls back to psync where
    /// io_uring is unavailable) in a new scratch directory `name-XXXXXX`; `configure` adds gateway
    /// options to the builder.
    pub fn start(
        name: &str,
        configure: impl FnOnce(GatewayBuilder) -> GatewayBuilder,
    ) -> FuseStack {
        FuseStack::start_logging_store(name, false, configure)
    }

    /// [`FuseStack::start`]; with `log_requests`, the S3 server logs every request, for
    /// [`S3Server::count_requests`].
    pub fn start_logging_store(
        name: &str,
        log_requests: bool,
        configure: impl FnOnce(GatewayBuilder) -> GatewayBuilder,
    ) -> FuseStack {
        let dir = TestDir::new(name);
        let runtime = crate::harness_runtime();
        let s3 = runtime.block_on(S3Server::start_logging_in(dir.join("s3"), log_requests));
        let builder = configure(Gateway::builder(dir.path(), &s3, "uring"));
        let gateway = runtime.block_on(builder.start());
        FuseStack {
            gateway,
            s3,
            runtime,
            dir,
        }
    }

    /// A mount of this stack's gateway on `<scratch>/<name>`, reading uploaded blocks from its S3
    /// server.
    pub fn mount(&self, name: &str) -> MountBuilder {
        self.mount_at(self.gateway.addr().to_string(), name)
    }

    /// A mount of the gateway reached at `gateway` (e.g. a [`TcpProxy`]) on `<scratch>/<name>`.
    pub fn mount_at(&self, gateway: impl ToString, name: &str) -> MountBuilder {
        Mount::builder(gateway, self.dir.join(name)).s3(&self.s3)
    }

    /// Runs a future of the async harness (gateway restarts, gRPC clients) to completion.
    pub fn block_on<F: std::future::Future>(&self, future: F) -> F::Output {
        self.runtime.block_on(future)
    }

    /// Bytes of every object in the store.
    pub fn stored_bytes(&self) -> u64 {
        self.block_on(self.s3.list())
            .iter()
            .map(|(_, len)| len)
            .sum()
    }
}

/// A TCP forwarder on a fixed local port to a target that can change: the stable address of a
/// gateway that gets a new port on every restart. With no target, connections are accepted and
/// closed at once (a dead gateway). It runs on its own runtime thread, so it keeps forwarding
/// while the test thread is blocked in a file-system call.
pub struct TcpProxy {
    addr: SocketAddr,
    target: Arc<Mutex<Option<SocketAddr>>>,
    connections: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl TcpProxy {
    /// Listens on a free port of 127.0.0.1, without a target yet.
    pub fn start() -> TcpProxy {
        TcpProxy::start_with_delay(Duration::ZERO)
    }

    /// [`TcpProxy::start`], holding every byte `one_way` in each direction (a round trip of
    /// twice that between the two sides, as between two regions).
    pub fn start_with_delay(one_way: Duration) -> TcpProxy {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("tcp-proxy")
            .enable_all()
            .build()
            .expect("build the proxy runtime");
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind the proxy port");
        let addr = listener.local_addr().expect("proxy address");
        let target: Arc<Mutex<Option<SocketAddr>>> = Arc::new(Mutex::new(None));
        let connections: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let (t, c) = (target.clone(), connections.clone());
        runtime.spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                let _ = inbound.set_nodelay(true);
                let to = *t.lock().unwrap();
                let task = tokio::spawn(async move {
                    let Some(to) = to else { return };
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(to).await else {
                        return;
                    };
                    let _ = outbound.set_nodelay(true);
                    if one_way.is_zero() {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        return;
                    }
                    let (in_read, in_write) = inbound.into_split();
                    let (out_read, out_write) = outbound.into_split();
                    tokio::join!(
                        delayed_copy(in_read, out_write, one_way),
                        delayed_copy(out_read, in_write, one_way)
                    );
                });
                let mut list = c.lock().unwrap();
                list.retain(|handle| !handle.is_finished());
                list.push(task.abort_handle());
            }
        });
        TcpProxy {
            addr,
            target,
            connections,
            runtime: Some(runtime),
        }
    }

    /// The proxy's own address (what clients dial).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where new connections go; `None`: they are closed at once.
    pub fn set_target(&self, target: Option<SocketAddr>) {
        *self.target.lock().unwrap() = target;
    }

    /// Closes every forwarded connection.
    pub fn cut_connections(&self) {
        for handle in self.connections.lock().unwrap().drain(..) {
            handle.abort();
        }
    }
}

/// Copies `from` to `to`, each chunk written `delay` after it was read (reading goes on
/// meanwhile, so the delay adds latency, not a cap on throughput).
async fn delayed_copy(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (chunks, mut due) =
        tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let reader = async move {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n @ 1..) = from.read(&mut buf).await {
            if chunks
                .send((tokio::time::Instant::now() + delay, buf[..n].to_vec()))
                .is_err()
            {
                break;
            }
        }
    };
    let writer = async move {
        while let Some((at, chunk)) = due.recv().await {
            tokio::time::sleep_until(at).await;
            if to.write_all(&chunk).await.is_err() {
                break;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.cut_connections();
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Deterministic pseudo-random bytes (splitmix64) for file contents: `fill(buf, offset)` writes
/// the bytes at `offset` of the stream of `seed`, so any range can be regenerated to check what a
/// read returned without keeping the file in memory.
#[derive(Debug, Clone, Copy)]
pub struct Pattern {
    pub seed: u64,
}

impl Pattern {
    pub fn new(seed: u64) -> Pattern {
        Pattern { seed }
    }

    fn word(&self, index: u64) -> u64 {
        let mut z = self
            .seed
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(index.wrapping_mul(0xBF58_476D_1CE4_E5B9))
            .wrapping_add(0x94D0_49BB_1331_11EB);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Fills `buf` with the bytes at `offset..offset + buf.len()`.
    pub fn fill(&self, buf: &mut [u8], offset: u64) {
        let mut i = 0;
        // Unaligned head, byte by byte.
        while i < buf.len() && !(offset + i as u64).is_multiple_of(8) {
            let at = offset + i as u64;
            buf[i] = self.word(at / 8).to_le_bytes()[(at % 8) as usize];
            i += 1;
        }
        // Whole words.
        let mut index = (offset + i as u64) / 8;
        while i + 8 <= buf.len() {
            buf[i..i + 8].copy_from_slice(&self.word(index).to_le_bytes());
            index += 1;
            i += 8;
        }
        // Tail.
        while i < buf.len() {
            let at = offset + i as u64;
            buf[i] = self.word(at / 8).to_le_bytes()[(at % 8) as usize];
            i += 1;
        }
    }

    /// The bytes at `offset..offset + len`.
    pub fn bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        self.fill(&mut buf, offset);
        buf
    }

    /// Writes `len` bytes of the pattern from offset 0 to `writer` in pieces of `piece` bytes.
    pub fn write_to(&self, writer: &mut impl Write, len: u64, piece: usize) -> std::io::Result<()> {
        let mut buf = vec![0; piece];
        let mut at = 0;
        while at < len {
            let n = piece.min((len - at) as usize);
            self.fill(&mut buf[..n], at);
            writer.write_all(&buf[..n])?;
            at += n as u64;
        }
        Ok(())
    }

    /// Reads `reader` to its end and checks it holds exactly `len` bytes of the pattern; returns a
    /// description of the first difference.
    pub fn verify(&self, reader: &mut impl std::io::Read, len: u64) -> Result<(), String> {
        let mut got = vec![0; 1 << 20];
        let mut want = vec![0; 1 << 20];
        let mut at = 0u64;
        loop {
            let n = read_full(reader, &mut got).map_err(|e| format!("read at offset {at}: {e}"))?;
            if n == 0 {
                break;
            }
            if at + n as u64 > len {
                return Err(format!(
                    "more bytes than written: {} readable bytes or more, {len} written",
                    at + n as u64
                ));
            }
            self.fill(&mut want[..n], at);
            if got[..n] != want[..n] {
                let first = (0..n).find(|&i| got[i] != want[i]).unwrap();
                return Err(format!(
                    "bytes differ from offset {} on (got {:02x?}, want {:02x?})",
                    at + first as u64,
                    &got[first..(first + 16).min(n)],
                    &want[first..(first + 16).min(n)]
                ));
            }
            at += n as u64;
        }
        if at != len {
            return Err(format!("read {at} bytes, {len} were written"));
        }
        Ok(())
    }
}

/// Reads until `buf` is full or the end of the file; returns the bytes read.
pub fn read_full(reader: &mut impl std::io::Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// The errno of an I/O error (panics, with `what`, if it has none).
pub fn errno_of(error: &std::io::Error, what: &str) -> i32 {
    error
        .raw_os_error()
        .unwrap_or_else(|| panic!("{what}: error without an errno: {error}"))
}

/// Asserts that `result` failed with `errno`.
#[track_caller]
pub fn assert_errno<T: std::fmt::Debug>(result: std::io::Result<T>, errno: i32, what: &str) {
    match result {
        Ok(value) => panic!(
            "{what}: succeeded ({value:?}), expected {}",
            nix::errno::Errno::from_raw(errno)
        ),
        Err(e) => assert_eq!(
            e.raw_os_error(),
            Some(errno),
            "{what}: failed with {e}, expected {}",
            nix::errno::Errno::from_raw(errno)
        ),
    }
}

/// Runs `stagefs mount GATEWAY MOUNTPOINT ARGS` (without `STAGEFS_TOKEN`), which must fail
/// within 30 s and leave nothing mounted; returns its stderr (the reason it gives).
pub fn failing_mount(gateway: &str, mountpoint: &Path, args: &[&str]) -> String {
    let mut child = mount_command(gateway, mountpoint)
        .args(args)
        .env_remove("STAGEFS_TOKEN")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run stagefs mount");
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            let _ = child.wait();
            let _ = Command::new("fusermount3")
                .args(["-u", "-z"])
                .arg(mountpoint)
                .status();
            panic!("`stagefs mount {gateway}` did not return within 30 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    let mounted = is_fuse_mounted(mountpoint);
    if mounted {
        let _ = Command::new("fusermount3")
            .args(["-u", "-z"])
            .arg(mountpoint)
            .status();
    }
    assert!(
        !status.success() && !mounted,
        "`stagefs mount {gateway} {}` was to fail; it exited {status} (mounted: {mounted})\n{stderr}",
        mountpoint.display()
    );
    stderr
}
