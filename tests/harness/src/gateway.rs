//! A `stagefs-gateway serve` process: started, waited for until it prints `listening on ADDR`,
//! signalled, killed.
//!
//! Its stderr (the tracing log) is appended to a log file; its stdout is copied, line by line,
//! to another (or the same) file by a thread, which also picks out the `listening on` line.

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use crate::{log_tail, reap_within, HarnessError, Result};

/// A running gateway; killed (SIGKILL) and reaped when dropped.
pub struct GatewayProcess {
    child: Child,
    /// Where clients connect (an unspecified listen address is replaced by loopback).
    addr: SocketAddr,
    log: PathBuf,
}

impl GatewayProcess {
    /// Spawns `command` (`stagefs-gateway serve …`, its arguments and environment set by the
    /// caller), appending its stderr to `log` and its stdout to `stdout_log`, and waits up to
    /// `ready_timeout` for its `listening on ADDR` line. A gateway that exits or stays silent
    /// is reaped, and the error gives its exit status and the tail of `log`.
    pub async fn start(
        mut command: Command,
        log: &Path,
        stdout_log: &Path,
        ready_timeout: Duration,
    ) -> Result<GatewayProcess> {
        let open = |path: &Path| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| HarnessError::io("cannot open", path, e))
        };
        let stderr = open(log)?;
        let mut stdout_copy = open(stdout_log)?;
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .map_err(|e| HarnessError::io("cannot start", command.get_program(), e))?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, rx) = tokio::sync::oneshot::channel::<std::result::Result<String, String>>();
        // A thread, not a task: it keeps draining stdout (so the gateway never blocks on a full
        // pipe) whatever runtime, if any, the caller has.
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = writeln!(stdout_copy, "{line}");
                if let Some(rest) = line.trim().strip_prefix("listening on ") {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(Ok(rest.trim().to_string()));
                    }
                }
            }
            if let Some(tx) = tx.take() {
                let _ = tx.send(Err("stdout closed before a `listening on ADDR` line".into()));
            }
        });
        let problem = match tokio::time::timeout(ready_timeout, rx).await {
            Ok(Ok(Ok(listening))) => match connect_addr(&listening) {
                Ok(addr) => {
                    return Ok(GatewayProcess {
                        child,
                        addr,
                        log: log.to_path_buf(),
                    })
                }
                Err(problem) => problem,
            },
            Ok(Ok(Err(problem))) => problem,
            Ok(Err(_)) => "the stdout reader went away".to_string(),
            Err(_) => format!("no `listening on ADDR` line within {ready_timeout:?}"),
        };
        // A crashing process gets a moment to finish its log.
        let status = reap_within(&mut child, Duration::from_secs(2));
        Err(HarnessError::Process(format!(
            "the gateway did not start: {problem}; exit status {status:?}\ncommand: {command:?}\n\
             log tail ({}):\n{}",
            log.display(),
            log_tail(log, 40)
        )))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `Some(status)` once the process has exited on its own.
    pub fn try_exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Sends `signal` (SIGHUP to reload tokens, say).
    pub fn signal(&self, signal: nix::sys::signal::Signal) -> Result<()> {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid() as i32), signal)
            .map_err(|e| HarnessError::Process(format!("cannot send {signal} to the gateway: {e}")))
    }

    /// A crash: SIGKILL, then reaps the process.
    pub fn kill9(mut self) -> Option<ExitStatus> {
        let _ = self.child.kill();
        self.child.wait().ok()
    }

    /// A graceful stop: SIGTERM, then waits up to `timeout`; a process that overstays is
    /// killed, and that is an error.
    pub async fn terminate(mut self, timeout: Duration) -> Result<ExitStatus> {
        if let Some(status) = self.try_exited() {
            return Err(HarnessError::Process(format!(
                "the gateway had already exited ({status}) before SIGTERM"
            )));
        }
        self.signal(nix::sys::signal::Signal::SIGTERM)?;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exited() {
                return Ok(status);
            }
            if tokio::time::Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return Err(HarnessError::Process(format!(
                    "the gateway did not exit within {timeout:?} of SIGTERM (killed); log \
                     tail:\n{}",
                    log_tail(&self.log, 40)
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Resident memory, from `/proc/PID/status` (VmRSS), in bytes.
    pub fn rss_bytes(&self) -> Result<u64> {
        let path = format!("/proc/{}/status", self.pid());
        let status = std::fs::read_to_string(&path)
            .map_err(|e| HarnessError::io("cannot read", &path, e))?;
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse::<u64>().ok())
            .map(|kib| kib * 1024)
            .ok_or_else(|| HarnessError::Process(format!("no VmRSS in {path}")))
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Turns the address the gateway says it listens on into one to connect to.
pub fn connect_addr(listening: &str) -> std::result::Result<SocketAddr, String> {
    let text = listening
        .strip_prefix("http://")
        .unwrap_or(listening)
        .trim_end_matches('/');
    let mut addr: SocketAddr = text
        .parse()
        .map_err(|e| format!("printed `listening on {listening}`, not a socket address: {e}"))?;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        });
    }
    Ok(addr)
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
