//! The processes `stagefs bench fs` runs against: the S3 test server (`s3s-fs`), the latency
//! proxy in front of it (in this process), a gateway whose store is reached through the proxy,
//! and `stagefs mount` processes in either write mode. Everything is stopped when dropped.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub use harness::s3::{s3_env, S3_BUCKET, S3_REGION};
use object_store::ObjectStore;

use super::super::latency_proxy::{self, ProxyArgs};
use super::super::BenchError;

/// `s3s-fs` serving a directory (`harness::s3`); killed on drop.
pub struct S3Server {
    _process: harness::s3::S3Process,
    pub addr: SocketAddr,
}

impl S3Server {
    pub async fn start(bin: &Path, root: &Path) -> Result<Self, BenchError> {
        let process = harness::s3::S3Process::start(bin, root, harness::free_port()?).await?;
        Ok(S3Server {
            addr: SocketAddr::from(([127, 0, 0, 1], process.port())),
            _process: process,
        })
    }
}

/// Starts the latency proxy in front of `upstream` on a free loopback port; it runs until the
/// runtime ends. Returns its address.
pub async fn start_proxy(upstream: SocketAddr, delay: Duration) -> Result<SocketAddr, BenchError> {
    let args = ProxyArgs {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        upstream,
        delay,
        jitter: Duration::ZERO,
        bandwidth: 0,
    };
    let listener = latency_proxy::bind(&args)
        .await
        .map_err(|e| BenchError::io("cannot bind the latency proxy on", "127.0.0.1:0", e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| BenchError::io("cannot read the proxy address", "127.0.0.1:0", e))?;
    tokio::spawn(async move {
        if let Err(e) = latency_proxy::serve(listener, args).await {
            tracing::error!(error = %e, "latency proxy stopped");
        }
    });
    Ok(addr)
}

/// An S3 client of the benchmark's bucket at `endpoint` (the proxy, for cloud latency).
pub fn s3_store(endpoint: &str) -> Result<Arc<dyn ObjectStore>, BenchError> {
    Ok(harness::s3::s3_store(endpoint, Duration::from_secs(120))?)
}

/// How long a mount may take to appear, and its client to exit once unmounted.
const MOUNT_TIMEOUT: Duration = Duration::from_secs(60);

/// A `stagefs mount --foreground` this benchmark owns (`harness::mount`); unmounted on drop.
pub struct MountProcess {
    inner: harness::mount::MountProcess,
    pub path: PathBuf,
}

impl MountProcess {
    /// Runs `stagefs mount GATEWAY PATH --s3-endpoint S3_ENDPOINT ARGS…` until mounted.
    pub fn start(
        gateway: SocketAddr,
        path: &Path,
        s3_endpoint: &str,
        args: &[&str],
        log: &Path,
    ) -> Result<Self, BenchError> {
        let mut all = vec!["--s3-endpoint", s3_endpoint, "--s3-allow-http"];
        all.extend_from_slice(args);
        Self::start_with(&gateway.to_string(), path, &all, log)
    }

    /// Runs `stagefs mount GATEWAYS PATH ARGS…` (`stagefs` is installed next to this program)
    /// until mounted; `GATEWAYS` is one address or several, comma-separated.
    pub fn start_with(
        gateways: &str,
        path: &Path,
        args: &[&str],
        log: &Path,
    ) -> Result<Self, BenchError> {
        let exe = harness::programs::find_program(
            "stagefs",
            None,
            "build it (cargo build --release --bins)",
        )
        .map_err(BenchError::Args)?;
        let mut command = std::process::Command::new(&exe);
        command
            .arg("mount")
            .arg(gateways)
            .arg(path)
            .arg("--foreground")
            .args(args)
            .envs(s3_env())
            .env("RUST_LOG", "warn");
        let inner = harness::mount::MountProcess::start(command, path, log, MOUNT_TIMEOUT)?;
        // As given (not canonical): what the client's command line names.
        Ok(MountProcess {
            path: path.to_path_buf(),
            inner,
        })
    }

    /// Unmounts (open files flushed) and waits for the client to exit.
    pub fn unmount(self) -> Result<(), BenchError> {
        self.inner.unmount(MOUNT_TIMEOUT)?;
        Ok(())
    }
}
