//! The gateway process the benchmark owns: the command line of `stagefs-gateway serve` for a
//! benchmark ([`GatewaySpec`]), started, killed (crash) and stopped (SIGTERM) the way the
//! integration tests do it (`stagefs-harness`). Its stderr and stdout go to a log file, whose
//! tail is shown when something fails.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

pub use harness::log_tail;
pub use harness::programs::find_program;
use shared::store::S3Options;

use super::BenchError;

/// Name of the gateway binary, looked up next to `stagefs` and then on `PATH`.
pub const GATEWAY_BIN: &str = "stagefs-gateway";

/// Finds `stagefs-gateway`: `explicit` if given, else as [`find_program`] does.
pub fn find_gateway_bin(explicit: Option<&Path>) -> Result<PathBuf, BenchError> {
    find_program(
        GATEWAY_BIN,
        explicit,
        "build it (cargo build --release --bins) or pass --gateway-bin",
    )
    .map_err(BenchError::GatewayBinary)
}

/// How to start the gateway; the same for the first start and the restart after the crash.
#[derive(Debug, Clone)]
pub struct GatewaySpec {
    pub bin: PathBuf,
    pub device: PathBuf,
    pub device_size: u64,
    pub store: String,
    pub listen: String,
    pub upload_concurrency: usize,
    pub io_engine: Option<String>,
    pub s3: S3Options,
    /// Start with uploads paused, so the benchmark decides when the drain runs.
    pub uploads_paused: bool,
    /// Environment of the process besides this one's (e.g. S3 credentials).
    pub env: Vec<(String, String)>,
    /// Further `serve` flags (TLS and tokens for the secure phase).
    pub extra: Vec<OsString>,
    pub log: PathBuf,
}

impl GatewaySpec {
    /// Arguments of `stagefs-gateway serve`.
    pub fn args(&self, format: bool) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec![
            "serve".into(),
            "--device".into(),
            self.device.clone().into(),
            "--device-size".into(),
            self.device_size.to_string().into(),
        ];
        if format {
            args.push("--format".into());
        }
        args.extend([
            "--store".into(),
            self.store.clone().into(),
            "--listen".into(),
            self.listen.clone().into(),
            "--upload-concurrency".into(),
            self.upload_concurrency.to_string().into(),
        ]);
        if self.uploads_paused {
            args.push("--uploads-paused".into());
        }
        if let Some(engine) = &self.io_engine {
            args.extend(["--io-engine".into(), engine.into()]);
        }
        args.extend(self.s3.flags().into_iter().map(OsString::from));
        args.extend(self.extra.iter().cloned());
        args
    }

    /// The command line, for progress output and error messages.
    pub fn display(&self, format: bool) -> String {
        let mut line = self.bin.display().to_string();
        for arg in self.args(format) {
            line.push(' ');
            line.push_str(&arg.to_string_lossy());
        }
        line
    }
}

/// A running gateway started by the benchmark (`harness::gateway`). Dropping it kills the
/// process.
pub struct GatewayProcess {
    inner: harness::gateway::GatewayProcess,
    /// Where clients connect (an unspecified listen address is replaced by loopback).
    pub addr: SocketAddr,
}

impl GatewayProcess {
    /// Starts the gateway and waits (at most `ready_timeout`) for its `listening on ADDR` line.
    /// Its stderr and stdout go to the spec's log.
    pub async fn start(
        spec: &GatewaySpec,
        format: bool,
        ready_timeout: Duration,
    ) -> Result<Self, BenchError> {
        let mut command = std::process::Command::new(&spec.bin);
        command
            .args(spec.args(format))
            .envs(spec.env.iter().map(|(k, v)| (k, v)));
        let inner =
            harness::gateway::GatewayProcess::start(command, &spec.log, &spec.log, ready_timeout)
                .await?;
        Ok(GatewayProcess {
            addr: inner.addr(),
            inner,
        })
    }

    pub fn pid(&self) -> u32 {
        self.inner.pid()
    }

    /// `Some(status)` if the process has exited.
    pub fn try_exited(&mut self) -> Option<ExitStatus> {
        self.inner.try_exited()
    }

    /// Simulates a crash: SIGKILL, then waits for the process to be gone.
    pub async fn kill(self) -> Result<(), BenchError> {
        self.inner.kill9();
        Ok(())
    }

    /// Graceful stop: SIGTERM, then waits up to `timeout`; kills the process if it overstays and
    /// reports that as an error.
    pub async fn terminate(self, timeout: Duration) -> Result<ExitStatus, BenchError> {
        Ok(self.inner.terminate(timeout).await?)
    }
}
