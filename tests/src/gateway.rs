//! The gateway process: `stagefs-gateway serve` on a file-backed device.
//!
//! [`Gateway::builder`] collects the command line; [`GatewayBuilder::start`] spawns it and waits for
//! the `listening on <addr>` line on stdout. Its stderr (the tracing log) is appended to
//! `gateway.log` in the scratch directory across restarts, with a `=== stagefs-tests: start #N`
//! marker line before each start, so tests can grep it ([`Gateway::log`],
//! [`Gateway::current_log`]). Its stdout is copied to `gateway.stdout`.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::Duration;

use harness::gateway::GatewayProcess;

use client::fs::{connect_gateway, meta_client, staging_client, GatewayAccess, GatewayChannel};
use proto::meta::meta_client::MetaClient;
use proto::staging::staging_client::StagingClient;
use serde::Deserialize;

use crate::binaries::gateway_binary;
use crate::s3::S3Server;

/// How long a gateway may take to print `listening on`.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a gateway may take to exit after SIGTERM.
pub const SIGTERM_TIMEOUT: Duration = Duration::from_secs(60);

/// The command line of a gateway; see [`Gateway::builder`].
#[derive(Debug, Clone)]
pub struct GatewayBuilder {
    dir: PathBuf,
    device: PathBuf,
    device_size: String,
    engine: String,
    store_args: Vec<String>,
    env: Vec<(String, String)>,
    extra: Vec<String>,
    access: GatewayAccess,
    /// `--meta-region-size` when formatting; `None`: the gateway's default (metadata inside the
    /// device). The harness passes 0 unless told otherwise, so its gateways keep the metadata in
    /// `<device>.meta.redb` as they always did.
    meta_region_size: Option<String>,
    /// `--device-fill` when formatting; `None`: the gateway's default (`zeros`). The harness
    /// passes `none` unless told otherwise: writing zeros through every 256 MiB device file
    /// took about half a second per gateway, for nothing a test looks at.
    device_fill: Option<String>,
    /// The process's working directory (default: the test's).
    working_dir: Option<PathBuf>,
}

impl GatewayBuilder {
    /// Formats a new device as the gateway does by default: with its default metadata region,
    /// serving the metadata from inside the device (no `--meta`, no `--meta-region-size 0`), and
    /// with zeros written through the device file first (no `--device-fill none`).
    pub fn meta_in_device(mut self) -> Self {
        self.meta_region_size = None;
        self.device_fill = None;
        self
    }

    /// `--meta-region-size SIZE` (applies when the device is formatted).
    pub fn meta_region_size(mut self, size: &str) -> Self {
        self.meta_region_size = Some(size.to_string());
        self
    }

    /// Runs the gateway in `dir` (its working directory), e.g. to show that nothing it needs
    /// lives in the directory it was first started from.
    pub fn working_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.working_dir = Some(dir.into());
        self
    }

    /// `--tls-cert CERT --tls-key KEY` (and `--tls-client-ca` when `client_ca` is given); the
    /// harness's own calls trust `ca` (PEM file) and present `identity` (certificate and key
    /// files) for mutual TLS.
    pub fn tls(
        mut self,
        (cert, key): (&Path, &Path),
        ca: &Path,
        client_ca: Option<&Path>,
        identity: Option<(&Path, &Path)>,
    ) -> Self {
        self.extra.extend([
            "--tls-cert".to_string(),
            cert.display().to_string(),
            "--tls-key".into(),
            key.display().to_string(),
        ]);
        if let Some(client_ca) = client_ca {
            self.extra.extend([
                "--tls-client-ca".to_string(),
                client_ca.display().to_string(),
            ]);
        }
        let read = |path: &Path| std::fs::read(path).expect("read a PEM file");
        let identity = identity.map(|(cert, key)| (read(cert), read(key)));
        self.access = self.access.with_tls(
            &read(ca),
            identity.as_ref().map(|(c, k)| (c.as_slice(), k.as_slice())),
        );
        self
    }

    /// `--tokens FILE`; the harness's own calls ([`Gateway::client`], readiness checks) present
    /// `secret`, which should be an admin token of the file.
    pub fn tokens(mut self, file: &Path, secret: &str) -> Self {
        self.extra
            .extend(["--tokens".to_string(), file.display().to_string()]);
        self.access = self.access.with_token(secret).expect("a valid token");
        self
    }

    /// The device file (default `<dir>/device.img`; created and formatted by the gateway).
    pub fn device(mut self, path: impl Into<PathBuf>) -> Self {
        self.device = path.into();
        self
    }

    /// `--device-size` (default `256MiB`).
    pub fn device_size(mut self, size: &str) -> Self {
        self.device_size = size.to_string();
        self
    }

    /// One extra argument, e.g. `--uploads-paused`.
    /// Reaches the S3 server at `endpoint` instead (a proxy in front of it).
    pub fn s3_endpoint(mut self, endpoint: impl Into<String>) -> Self {
        let at = self
            .store_args
            .iter()
            .position(|a| a == "--s3-endpoint")
            .expect("the store flags name an endpoint");
        self.store_args[at + 1] = endpoint.into();
        self
    }

    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.extra.push(arg.into());
        self
    }

    /// Extra arguments, e.g. `["--full-wait", "2s"]`.
    pub fn args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, args: I) -> Self {
        self.extra.extend(args.into_iter().map(Into::into));
        self
    }

    /// An environment variable of the process, e.g. `STAGEFS_DEBUG_FAULTS`.
    pub fn env(mut self, key: &str, value: impl Into<String>) -> Self {
        self.env.push((key.to_string(), value.into()));
        self
    }

    /// The full argument list, starting with `serve`.
    pub fn command_args(&self) -> Vec<String> {
        let mut args = vec![
            "serve".to_string(),
            "--device".into(),
            self.device.display().to_string(),
            "--device-size".into(),
            self.device_size.clone(),
        ];
        args.extend(self.store_args.iter().cloned());
        if let Some(size) = &self.meta_region_size {
            args.extend(["--meta-region-size".to_string(), size.clone()]);
        }
        if let Some(fill) = &self.device_fill {
            args.extend(["--device-fill".to_string(), fill.clone()]);
        }
        args.extend([
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--io-engine".into(),
            self.engine.clone(),
        ]);
        args.extend(self.extra.iter().cloned());
        args
    }

    /// Spawns the gateway and waits until it listens.
    pub async fn start(self) -> Gateway {
        let mut gateway = Gateway {
            args: self.command_args(),
            env: self.env,
            working_dir: self.working_dir,
            device: self.device,
            engine: self.engine,
            log_path: self.dir.join("gateway.log"),
            stdout_path: self.dir.join("gateway.stdout"),
            process: None,
            starts: 0,
            access: self.access,
        };
        gateway.spawn_and_wait().await;
        gateway
    }
}

/// A `stagefs-gateway serve` process (running or stopped), started and stopped by
/// `stagefs-harness`. Dropping it kills the process.
pub struct Gateway {
    args: Vec<String>,
    env: Vec<(String, String)>,
    working_dir: Option<PathBuf>,
    device: PathBuf,
    engine: String,
    log_path: PathBuf,
    stdout_path: PathBuf,
    /// The running process (`stagefs-harness` starts and stops it).
    process: Option<GatewayProcess>,
    starts: u32,
    /// What the harness's own connections present.
    access: GatewayAccess,
}

impl Gateway {
    /// A gateway in scratch directory `dir`, storing to `s3`, with I/O engine `engine`
    /// (`uring` or `psync`), a 256 MiB device at `<dir>/device.img` and no extra flags.
    pub fn builder(dir: &Path, s3: &S3Server, engine: &str) -> GatewayBuilder {
        GatewayBuilder {
            dir: dir.to_path_buf(),
            device: dir.join("device.img"),
            device_size: "256MiB".into(),
            engine: engine.into(),
            store_args: s3.gateway_args(),
            env: s3.gateway_env(),
            extra: Vec::new(),
            access: GatewayAccess::default(),
            meta_region_size: Some("0".into()),
            device_fill: Some("none".into()),
            working_dir: None,
        }
    }

    async fn spawn_and_wait(&mut self) {
        assert!(self.process.is_none(), "the gateway is already running");
        self.starts += 1;
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", self.log_path.display()));
        writeln!(
            log,
            "=== stagefs-tests: start #{}: stagefs-gateway {}",
            self.starts,
            self.args.join(" ")
        )
        .expect("write the gateway log");
        let mut command = Command::new(gateway_binary());
        command
            .args(&self.args)
            .env("RUST_BACKTRACE", "1")
            .env_remove("AWS_SESSION_TOKEN")
            .env_remove("AWS_PROFILE")
            .env_remove("AWS_ENDPOINT_URL")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        if let Some(dir) = &self.working_dir {
            command.current_dir(dir);
        }
        let process =
            GatewayProcess::start(command, &self.log_path, &self.stdout_path, START_TIMEOUT)
                .await
                .unwrap_or_else(|e| panic!("gateway start #{}: {e}", self.starts));
        self.process = Some(process);
        self.verify_engine().await;
    }

    /// Checks that the gateway runs the requested I/O engine (Status.io_engine). A `uring` gateway
    /// may fall back to psync only where this host refuses io_uring.
    async fn verify_engine(&self) {
        let mut client = self.client().await;
        let status = crate::blocks::status(&mut client).await;
        let running = status.io_engine.to_lowercase();
        let ok = match self.engine.as_str() {
            "uring" if running.contains("uring") => true,
            "uring" if !io_uring_available() => {
                eprintln!("[stagefs-tests] io_uring is unavailable on this host; the uring gateway runs {running:?}");
                true
            }
            "psync" => running.contains("psync"),
            _ => false,
        };
        assert!(
            ok,
            "started the gateway with --io-engine {} but Status.io_engine is {:?}; log tail:\n{}",
            self.engine,
            status.io_engine,
            crate::tail(&self.current_log(), 20)
        );
    }

    /// Starts the gateway again with the same arguments (same device). A still-running process is
    /// killed first (SIGKILL).
    pub async fn restart(&mut self) {
        if self.process.is_some() {
            self.kill9();
        }
        self.spawn_and_wait().await;
    }

    /// The running gateway's resident memory, from `/proc/PID/status` (VmRSS), in bytes.
    pub fn rss_bytes(&self) -> u64 {
        self.running()
            .rss_bytes()
            .unwrap_or_else(|e| panic!("the gateway's RSS: {e}"))
    }

    fn running(&self) -> &GatewayProcess {
        self.process.as_ref().expect("the gateway is not running")
    }

    /// Samples the gateway's RSS every `every` until `work` resolves; returns the largest
    /// sample and what `work` returned.
    pub async fn peak_rss_during<T>(
        &self,
        every: Duration,
        work: impl std::future::Future<Output = T>,
    ) -> (u64, T) {
        tokio::pin!(work);
        let mut peak = self.rss_bytes();
        loop {
            tokio::select! {
                out = &mut work => return (peak.max(self.rss_bytes()), out),
                _ = tokio::time::sleep(every) => peak = peak.max(self.rss_bytes()),
            }
        }
    }

    /// Sends `signal` to the running gateway (SIGHUP to reload its tokens, say).
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        self.running()
            .signal(signal)
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// Kills the gateway with SIGKILL and reaps it: a crash.
    pub fn kill9(&mut self) -> Option<ExitStatus> {
        self.process.take()?.kill9()
    }

    /// Sends SIGTERM and waits (up to [`SIGTERM_TIMEOUT`]) for the process to exit; returns its
    /// exit status. Panics (after SIGKILL) if it does not exit in time.
    pub async fn sigterm(&mut self) -> ExitStatus {
        let process = self
            .process
            .take()
            .expect("sigterm: the gateway is not running");
        process
            .terminate(SIGTERM_TIMEOUT)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Whether the process is running (it may have crashed on its own).
    pub fn is_running(&mut self) -> bool {
        self.process
            .as_mut()
            .is_some_and(|process| process.try_exited().is_none())
    }

    /// The exit status if the process has exited on its own.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.process.as_mut().and_then(GatewayProcess::try_exited)
    }

    /// The address it listens on (changes on every restart).
    pub fn addr(&self) -> SocketAddr {
        self.running().addr()
    }

    /// A gRPC endpoint URL, `http://<addr>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// The device file.
    pub fn device(&self) -> &Path {
        &self.device
    }

    /// The I/O engine (`uring` or `psync`).
    pub fn engine(&self) -> &str {
        &self.engine
    }

    /// A new HTTP/2 connection to the gateway, for its `service`, presenting `access`; built
    /// where every client connection is (`client::fs::connect_gateway`). Panics if it cannot
    /// connect.
    async fn channel(&self, service: &str, access: &GatewayAccess) -> GatewayChannel {
        let addr = self.addr().to_string();
        connect_gateway(&addr, access).await.unwrap_or_else(|e| {
            panic!("cannot connect to the gateway's {service} service at {addr}: {e}")
        })
    }

    /// A new connection to the staging service, with the builder's token (none by default).
    pub async fn client(&self) -> StagingClient<GatewayChannel> {
        self.client_as(&self.access).await
    }

    /// A new connection to the staging service, presenting `access`.
    pub async fn client_as(&self, access: &GatewayAccess) -> StagingClient<GatewayChannel> {
        staging_client(self.channel("Staging", access).await)
    }

    /// A new connection to the metadata service (`Meta`, served on the same address), with the
    /// builder's token (none by default).
    pub async fn meta_client(&self) -> MetaClient<GatewayChannel> {
        self.meta_client_as(&self.access).await
    }

    /// A new connection to the metadata service, presenting `access`.
    pub async fn meta_client_as(&self, access: &GatewayAccess) -> MetaClient<GatewayChannel> {
        meta_client(self.channel("Meta", access).await)
    }

    /// The whole stderr log of every run.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The stderr log of the latest run only.
    pub fn current_log(&self) -> String {
        let log = self.log();
        match log.rfind("=== stagefs-tests: start #") {
            Some(at) => log[at..].to_string(),
            None => log,
        }
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Runs `stagefs-gateway inspect --device <device> --json --records` and parses its report.
    pub async fn inspect(&self) -> InspectReport {
        inspect(&self.device).await
    }
}

/// Whether this process may create an io_uring instance (containers often forbid it).
pub fn io_uring_available() -> bool {
    // struct io_uring_params is 120 bytes; zeroed is a valid request for a 1-entry ring.
    let mut params = [0u32; 30];
    // SAFETY: io_uring_setup only writes into `params`, which is large enough.
    let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, 1u32, params.as_mut_ptr()) };
    if fd < 0 {
        return false;
    }
    // SAFETY: `fd` is a descriptor this function just opened.
    unsafe { libc::close(fd as i32) };
    true
}

/// Runs `stagefs-gateway inspect --device <device> --json --records`; panics if it fails or its
/// output does not follow the JSON contract.
pub async fn inspect(device: &Path) -> InspectReport {
    let binary = gateway_binary();
    let output = tokio::process::Command::new(&binary)
        .args(["inspect", "--device"])
        .arg(device)
        .args(["--json", "--records"])
        .output()
        .await
        .unwrap_or_else(|e| panic!("cannot run {} inspect: {e}", binary.display()));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "`stagefs-gateway inspect --device {} --json --records` failed with {}\nstdout:\n{}\nstderr:\n{}",
        device.display(),
        output.status,
        crate::tail(&stdout, 20),
        crate::tail(&String::from_utf8_lossy(&output.stderr), 20)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!("`stagefs-gateway inspect --json` printed something that is not the documented JSON report: {e}\n{stdout}")
    })
}

/// `stagefs-gateway inspect --json [--records]`: the state of a device.
#[derive(Debug, Clone, Deserialize)]
pub struct InspectReport {
    pub format_version: u32,
    pub device_uuid: String,
    pub gateway_id: String,
    pub generation: u64,
    pub device_bytes: u64,
    pub segment_bytes: u64,
    pub superblocks: Vec<InspectSuperblock>,
    pub segments: Vec<InspectSegment>,
    pub records_waiting: u64,
    pub bytes_waiting: u64,
    pub corrupt_records: Vec<InspectCorruptRecord>,
    /// Only with `--records`.
    #[serde(default)]
    pub records: Vec<InspectRecord>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct InspectSuperblock {
    pub copy: u32,
    pub valid: bool,
    pub generation: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct InspectSegment {
    pub index: u64,
    pub sequence: u64,
    pub records: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct InspectCorruptRecord {
    pub segment: u64,
    pub device_offset: u64,
    pub reason: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct InspectRecord {
    pub key: String,
    pub segment: u64,
    /// Device offset of the record header.
    pub device_offset: u64,
    /// Device offset of the block's first data byte.
    pub data_offset: u64,
    pub len: u64,
    /// `waiting`, `uploaded` or `deleted`.
    pub state: String,
}
