//! The processes stagefs is tried against, started one way for the integration tests
//! (`tests/src`) and the benchmarks (`client/bench`): the S3 test server ([`s3`]), the gateway
//! ([`gateway`]) and FUSE mounts ([`mount`]), each a child process whose output goes to a log
//! file, killed when dropped. Everything here returns errors that say what failed and end with
//! the tail of the process's log; the tests turn them into panics, the benchmarks into their
//! own errors.

pub mod gateway;
pub mod mount;
pub mod programs;
pub mod s3;

use std::path::{Path, PathBuf};

/// What went wrong starting or stopping a process.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// A process did not do what it was started for; the message ends with its log's tail.
    #[error("{0}")]
    Process(String),
}

impl HarnessError {
    pub fn io(what: &'static str, path: impl AsRef<Path>, source: std::io::Error) -> Self {
        HarnessError::Io {
            what,
            path: path.as_ref().to_path_buf(),
            source,
        }
    }
}

pub type Result<T, E = HarnessError> = std::result::Result<T, E>;

/// The last `lines` lines of the file at `log`, for error reports.
pub fn log_tail(log: &Path, lines: usize) -> String {
    match std::fs::read(log) {
        Ok(bytes) => tail(&String::from_utf8_lossy(&bytes), lines),
        Err(e) => format!("(cannot read {}: {e})", log.display()),
    }
}

/// The last `lines` lines of `text`.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A free TCP port on loopback: bound and released, so another process may take it before the
/// caller does (good enough for tests and benchmarks on one machine).
pub fn free_port() -> Result<u16> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .map_err(|e| HarnessError::io("cannot bind a local port on", "127.0.0.1:0", e))
}

/// Polls `child` for up to `grace`; kills it if it still runs. Its exit status, if known.
fn reap_within(
    child: &mut std::process::Child,
    grace: std::time::Duration,
) -> Option<std::process::ExitStatus> {
    let deadline = std::time::Instant::now() + grace;
    while std::time::Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _ = child.kill();
    child.wait().ok()
}
