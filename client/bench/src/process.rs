//! The gateway process the benchmark owns: find the binary, start it, wait until it listens,
//! kill it (crash) or stop it (SIGTERM).
//!
//! The gateway's stderr and any stdout besides the `listening on ADDR` line go to a log file,
//! whose tail is shown when something fails.

use std::ffi::OsString;
use std::fs::OpenOptions;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

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

/// Finds a program: `explicit` if given (it must be a file), else next to the running
/// executable, else on `PATH`, else in `~/.cargo/bin` (where `scripts/setup.sh` installs
/// `s3s-fs`). The error names where it looked and ends with `hint`.
pub fn find_program(name: &str, explicit: Option<&Path>, hint: &str) -> Result<PathBuf, String> {
    if let Some(path) = explicit {
        return if path.is_file() {
            Ok(path.to_path_buf())
        } else {
            Err(format!("{} is not a file", path.display()))
        };
    }
    let beside_exe = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf));
    let on_path: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).collect())
        .unwrap_or_default();
    let cargo_bin = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo")))
        .map(|home| home.join("bin"));
    beside_exe
        .into_iter()
        .chain(on_path)
        .chain(cargo_bin)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| {
            format!("{name} is neither next to this executable, nor on PATH, nor in ~/.cargo/bin; {hint}")
        })
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
    pub s3_endpoint: Option<String>,
    pub s3_region: Option<String>,
    pub s3_allow_http: bool,
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
        if let Some(endpoint) = &self.s3_endpoint {
            args.extend(["--s3-endpoint".into(), endpoint.into()]);
        }
        if let Some(region) = &self.s3_region {
            args.extend(["--s3-region".into(), region.into()]);
        }
        if self.s3_allow_http {
            args.push("--s3-allow-http".into());
        }
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

/// A running gateway started by the benchmark. Dropping it kills the process.
pub struct GatewayProcess {
    child: Child,
    pid: u32,
    /// Where clients connect (an unspecified listen address is replaced by loopback).
    pub addr: SocketAddr,
    log: PathBuf,
}

impl GatewayProcess {
    /// Starts the gateway and waits (at most `ready_timeout`) for its `listening on ADDR` line.
    pub async fn start(
        spec: &GatewaySpec,
        format: bool,
        ready_timeout: Duration,
    ) -> Result<Self, BenchError> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&spec.log)
            .map_err(|e| BenchError::io("cannot open gateway log", &spec.log, e))?;
        let stderr = log
            .try_clone()
            .map_err(|e| BenchError::io("cannot open gateway log", &spec.log, e))?;
        let mut child = Command::new(&spec.bin)
            .args(spec.args(format))
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr))
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| BenchError::io("cannot start gateway", &spec.bin, e))?;
        let pid = child.id().ok_or_else(|| {
            BenchError::Gateway("the gateway exited before it could be watched".into())
        })?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| BenchError::Gateway("no stdout pipe to the gateway".into()))?;
        let mut lines = BufReader::new(stdout).lines();
        let mut log_writer = log;

        let wait_listening = async {
            loop {
                match lines.next_line().await {
                    Ok(Some(line)) => {
                        let _ = writeln!(log_writer, "[stdout] {line}");
                        if let Some(addr) = line.trim().strip_prefix("listening on ") {
                            return Ok(Some(addr.trim().to_string()));
                        }
                    }
                    Ok(None) => return Ok(None),
                    Err(e) => {
                        return Err(BenchError::io(
                            "cannot read gateway stdout of",
                            &spec.bin,
                            e,
                        ))
                    }
                }
            }
        };
        let listening = match tokio::time::timeout(ready_timeout, wait_listening).await {
            Ok(result) => result?,
            Err(_) => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                return Err(BenchError::Gateway(format!(
                    "no `listening on ADDR` line on stdout within {ready_timeout:?}"
                )));
            }
        };
        let Some(listening) = listening else {
            let status = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
            let status = match status {
                Ok(Ok(status)) => status.to_string(),
                _ => "unknown status".into(),
            };
            return Err(BenchError::Gateway(format!(
                "exited ({status}) before printing `listening on ADDR`"
            )));
        };
        let addr = connect_addr(&listening)?;

        // Keep draining stdout into the log so the gateway never blocks on a full pipe.
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let _ = writeln!(log_writer, "[stdout] {line}");
            }
        });
        Ok(GatewayProcess {
            child,
            pid,
            addr,
            log: spec.log.clone(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// `Some(status)` if the process has exited.
    pub fn try_exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Simulates a crash: SIGKILL, then waits for the process to be gone.
    pub async fn kill(mut self) -> Result<(), BenchError> {
        self.child
            .start_kill()
            .map_err(|e| BenchError::io("cannot SIGKILL gateway", &self.log, e))?;
        self.child
            .wait()
            .await
            .map_err(|e| BenchError::io("cannot reap gateway", &self.log, e))?;
        Ok(())
    }

    /// Graceful stop: SIGTERM, then waits up to `timeout`; kills the process if it overstays and
    /// reports that as an error.
    pub async fn terminate(mut self, timeout: Duration) -> Result<ExitStatus, BenchError> {
        if let Some(status) = self.try_exited() {
            return Err(BenchError::Gateway(format!(
                "had already exited ({status}) before SIGTERM"
            )));
        }
        let pid = i32::try_from(self.pid)
            .map_err(|_| BenchError::Gateway(format!("pid {} out of range", self.pid)))?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        )
        .map_err(|e| BenchError::Gateway(format!("cannot send SIGTERM to pid {pid}: {e}")))?;
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(Ok(status)) => Ok(status),
            Ok(Err(e)) => Err(BenchError::io("cannot reap gateway", &self.log, e)),
            Err(_) => {
                let _ = self.child.start_kill();
                let _ = self.child.wait().await;
                Err(BenchError::Gateway(format!(
                    "did not exit within {timeout:?} of SIGTERM; killed it"
                )))
            }
        }
    }
}

/// Turns the gateway's listen address into one to connect to.
fn connect_addr(listening: &str) -> Result<SocketAddr, BenchError> {
    let text = listening
        .strip_prefix("http://")
        .unwrap_or(listening)
        .trim_end_matches('/');
    let mut addr: SocketAddr = text.parse().map_err(|e| {
        BenchError::Gateway(format!(
            "printed `listening on {listening}`, not a socket address: {e}"
        ))
    })?;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        });
    }
    Ok(addr)
}

/// The last `lines` lines of the gateway log, for error reports.
pub fn log_tail(log: &Path, lines: usize) -> String {
    match std::fs::read(log) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("(cannot read {log:?}: {e})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_addr_replaces_unspecified_hosts() {
        assert_eq!(
            connect_addr("127.0.0.1:5000").ok(),
            "127.0.0.1:5000".parse().ok()
        );
        assert_eq!(connect_addr("0.0.0.0:7").ok(), "127.0.0.1:7".parse().ok());
        assert_eq!(connect_addr("[::]:7").ok(), "[::1]:7".parse().ok());
        assert_eq!(
            connect_addr("http://127.0.0.1:9").ok(),
            "127.0.0.1:9".parse().ok()
        );
        assert!(connect_addr("somewhere").is_err());
    }
}
