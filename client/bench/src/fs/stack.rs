//! The processes `stagefs bench fs` runs against: the S3 test server (`s3s-fs`), the latency
//! proxy in front of it (in this process), a gateway whose store is reached through the proxy,
//! and `stagefs mount` processes in either write mode. Everything is stopped when dropped.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use object_store::aws::AmazonS3Builder;
use object_store::{ClientOptions, ObjectStore};

use super::super::latency_proxy::{self, ProxyArgs};
use super::super::BenchError;

/// Credentials, bucket and region the benchmark's S3 server accepts.
pub const S3_ACCESS_KEY: &str = "stagefs";
pub const S3_SECRET_KEY: &str = "stagefs-secret";
pub const S3_BUCKET: &str = "stagefs";
pub const S3_REGION: &str = "us-east-1";

/// The environment that gives a child process the S3 server's credentials.
pub fn s3_env() -> Vec<(String, String)> {
    vec![
        ("AWS_ACCESS_KEY_ID".into(), S3_ACCESS_KEY.into()),
        ("AWS_SECRET_ACCESS_KEY".into(), S3_SECRET_KEY.into()),
        ("AWS_REGION".into(), S3_REGION.into()),
    ]
}

/// A free TCP port on loopback (bound and released; good enough for a benchmark).
fn free_port() -> Result<u16, BenchError> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| BenchError::io("cannot bind a local port", "127.0.0.1:0", e))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| BenchError::io("cannot read a local port", "127.0.0.1:0", e))
}

/// `s3s-fs` serving a directory; killed on drop.
pub struct S3Server {
    child: Child,
    pub addr: SocketAddr,
}

impl S3Server {
    pub async fn start(bin: &Path, root: &Path) -> Result<Self, BenchError> {
        std::fs::create_dir_all(root.join(S3_BUCKET))
            .map_err(|e| BenchError::io("cannot create the bucket directory in", root, e))?;
        let port = free_port()?;
        let log = root.with_extension("log");
        let log_file =
            std::fs::File::create(&log).map_err(|e| BenchError::io("cannot create", &log, e))?;
        let stderr = log_file
            .try_clone()
            .map_err(|e| BenchError::io("cannot open", &log, e))?;
        let child = Command::new(bin)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", S3_ACCESS_KEY, "--secret-key", S3_SECRET_KEY])
            .arg(root)
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(stderr)
            .spawn()
            .map_err(|e| BenchError::io("cannot start", bin, e))?;
        let mut server = S3Server {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(server.addr).await.is_err() {
            if let Ok(Some(status)) = server.child.try_wait() {
                return Err(BenchError::Args(format!(
                    "s3s-fs exited ({status}) before listening; see {}",
                    log.display()
                )));
            }
            if Instant::now() > deadline {
                return Err(BenchError::Args(format!(
                    "s3s-fs did not listen on {} within 30 s; see {}",
                    server.addr,
                    log.display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(server)
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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
    let store = AmazonS3Builder::new()
        .with_client_options(ClientOptions::new().with_timeout(Duration::from_secs(120)))
        .with_bucket_name(S3_BUCKET)
        .with_endpoint(endpoint)
        .with_allow_http(true)
        .with_region(S3_REGION)
        .with_access_key_id(S3_ACCESS_KEY)
        .with_secret_access_key(S3_SECRET_KEY)
        .build()
        .map_err(|source| BenchError::Store {
            url: endpoint.to_string(),
            source,
        })?;
    Ok(Arc::new(store))
}

/// A `stagefs mount` in the background; unmounted on drop.
pub struct MountProcess {
    pub path: PathBuf,
    mounted: bool,
}

impl MountProcess {
    /// Runs `stagefs mount GATEWAY PATH --s3-endpoint S3_ENDPOINT ARGS…`, which returns once
    /// mounted.
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

    /// Runs `stagefs mount GATEWAYS PATH ARGS…` (`stagefs` is installed next to this program),
    /// which returns once mounted; `GATEWAYS` is one address or several, comma-separated.
    pub fn start_with(
        gateways: &str,
        path: &Path,
        args: &[&str],
        log: &Path,
    ) -> Result<Self, BenchError> {
        std::fs::create_dir_all(path)
            .map_err(|e| BenchError::io("cannot create mount point", path, e))?;
        let exe = crate::process::find_program(
            "stagefs",
            None,
            "build it (cargo build --release --bins)",
        )
        .map_err(BenchError::Args)?;
        let output = Command::new(&exe)
            .arg("mount")
            .arg(gateways)
            .arg(path)
            .args(args)
            .envs(s3_env())
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| BenchError::io("cannot run", &exe, e))?;
        if !output.status.success() {
            return Err(BenchError::Args(format!(
                "stagefs mount {} failed ({}): {}",
                path.display(),
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            )));
        }
        let _ = std::fs::write(log, &output.stderr);
        Ok(MountProcess {
            path: path.to_path_buf(),
            mounted: true,
        })
    }

    /// Unmounts (waiting for open files to be flushed and the mount to disappear).
    pub fn unmount(mut self) -> Result<(), BenchError> {
        self.mounted = false;
        unmount(&self.path, false)
    }
}

impl Drop for MountProcess {
    fn drop(&mut self) {
        if self.mounted {
            let _ = unmount(&self.path, true);
        }
    }
}

fn unmount(path: &Path, lazy: bool) -> Result<(), BenchError> {
    let mut command = Command::new("fusermount3");
    command.arg("-u");
    if lazy {
        command.arg("-z");
    }
    let status = command
        .arg(path)
        .stderr(Stdio::null())
        .status()
        .map_err(|e| BenchError::io("cannot run fusermount3 for", path, e))?;
    if !status.success() {
        return Err(BenchError::Args(format!(
            "fusermount3 -u {} failed ({status})",
            path.display()
        )));
    }
    Ok(())
}
