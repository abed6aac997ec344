//! The S3 test server: `s3s-fs` serving a directory on loopback, and clients of it.
//!
//! `s3s-fs` stores object `<key>` of bucket `<bucket>` as the file `<root>/<bucket>/<key>`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use object_store::aws::AmazonS3Builder;
use object_store::{ClientOptions, ObjectStore, RetryConfig};

use crate::{log_tail, HarnessError, Result};

/// Access key the server accepts.
pub const S3_ACCESS_KEY: &str = "stagefs";
/// Secret key the server accepts.
pub const S3_SECRET_KEY: &str = "stagefs-secret";
/// The bucket stagefs stores to.
pub const S3_BUCKET: &str = "stagefs";
/// Region used for request signing.
pub const S3_REGION: &str = "us-east-1";

/// How long the server may take to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The environment that gives a child process the server's credentials.
pub fn s3_env() -> Vec<(String, String)> {
    vec![
        ("AWS_ACCESS_KEY_ID".into(), S3_ACCESS_KEY.into()),
        ("AWS_SECRET_ACCESS_KEY".into(), S3_SECRET_KEY.into()),
        ("AWS_REGION".into(), S3_REGION.into()),
    ]
}

/// An S3 client of the bucket at `endpoint` (`http://host:port`: the server, or a latency proxy
/// in front of it), whose calls give up after `timeout`.
pub fn s3_store(endpoint: &str, timeout: Duration) -> Result<Arc<dyn ObjectStore>> {
    let store = AmazonS3Builder::new()
        // Client options first: they would reset `allow_http` set before them.
        .with_client_options(ClientOptions::new().with_timeout(timeout))
        .with_bucket_name(S3_BUCKET)
        .with_endpoint(endpoint)
        .with_allow_http(true)
        .with_region(S3_REGION)
        .with_access_key_id(S3_ACCESS_KEY)
        .with_secret_access_key(S3_SECRET_KEY)
        .with_retry(RetryConfig {
            max_retries: 3,
            retry_timeout: Duration::from_secs(20),
            ..Default::default()
        })
        .build()
        .map_err(|e| {
            HarnessError::Process(format!("cannot configure an S3 client of {endpoint}: {e}"))
        })?;
    Ok(Arc::new(store))
}

/// `s3s-fs` serving `root` on a fixed loopback port; killed when dropped. It can be stopped and
/// started again on the same port and data (an outage).
pub struct S3Process {
    bin: PathBuf,
    root: PathBuf,
    port: u16,
    log: PathBuf,
    /// Each request's S3 operation is logged (see [`S3Process::count_requests`]).
    log_requests: bool,
    child: Option<Child>,
    /// Whether it ever accepted connections: until then a port someone else took is swapped for
    /// a free one; afterwards the port is kept (gateways were pointed at it).
    started: bool,
}

/// Whether process `pid` holds the listening TCP socket of loopback port `port` (Linux: the
/// socket's inode in `/proc/net/tcp*` among the process's open files). A port picked free and
/// released can be taken by another process before the server binds it; a connection then
/// reaches that process, and the server itself exits unseen (a CI run failed so: the other
/// process was a test's gateway, which then stopped).
fn listens_on(pid: u32, port: u16) -> bool {
    let mut sockets = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // local_address is fields[1] (HEXIP:HEXPORT), st fields[3] (0A: LISTEN), inode fields[9].
            if fields.len() < 10 || fields[3] != "0A" {
                continue;
            }
            let local_port = fields[1]
                .rsplit_once(':')
                .and_then(|(_, hex)| u16::from_str_radix(hex, 16).ok());
            if local_port == Some(port) {
                sockets.push(format!("socket:[{}]", fields[9]));
            }
        }
    }
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        std::fs::read_link(fd.path())
            .is_ok_and(|target| sockets.iter().any(|s| target.as_os_str() == s.as_str()))
    })
}

impl S3Process {
    /// Starts `bin` (`s3s-fs`) on `port` with data under `root` (created, with the bucket); its
    /// output goes to `<root>.log`. Returns once the port accepts connections.
    pub async fn start(bin: &Path, root: &Path, port: u16) -> Result<S3Process> {
        S3Process::start_logging(bin, root, port, false).await
    }

    /// [`S3Process::start`], and with `log_requests` the server logs the operation of every
    /// request it routes, which [`S3Process::count_requests`] counts: what a test asserts about
    /// the requests the store itself saw.
    pub async fn start_logging(
        bin: &Path,
        root: &Path,
        port: u16,
        log_requests: bool,
    ) -> Result<S3Process> {
        std::fs::create_dir_all(root.join(S3_BUCKET))
            .map_err(|e| HarnessError::io("cannot create the bucket directory under", root, e))?;
        let mut server = S3Process {
            bin: bin.to_path_buf(),
            root: root.to_path_buf(),
            port,
            log: root.with_extension("log"),
            log_requests,
            child: None,
            started: false,
        };
        server.restart().await?;
        Ok(server)
    }

    /// Starts the server again on the same port and data, after [`S3Process::stop`]. A port
    /// still held by the previous instance for a moment is tried again until the deadline.
    pub async fn restart(&mut self) -> Result<()> {
        if self.child.is_some() {
            return Err(HarnessError::Process("s3s-fs is already running".into()));
        }
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.log)
                .map_err(|e| HarnessError::io("cannot open", &self.log, e))?;
            let stderr = log
                .try_clone()
                .map_err(|e| HarnessError::io("cannot open", &self.log, e))?;
            let mut command = Command::new(&self.bin);
            if self.log_requests {
                // s3s logs "resolved route" with the operation's name for every request.
                command.env("RUST_LOG", "info,s3s::ops=debug");
            }
            let mut child = command
                .args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
                .args(["--access-key", S3_ACCESS_KEY, "--secret-key", S3_SECRET_KEY])
                .arg(&self.root)
                .stdin(Stdio::null())
                .stdout(log)
                .stderr(stderr)
                .spawn()
                .map_err(|e| HarnessError::io("cannot start", &self.bin, e))?;
            loop {
                if let Ok(Some(status)) = child.try_wait() {
                    if !self.started {
                        // Most likely its port was taken meanwhile: try another.
                        self.port = crate::free_port()?;
                    }
                    if Instant::now() > deadline {
                        return Err(HarnessError::Process(format!(
                            "s3s-fs exited ({status}) before accepting connections on port {}; \
                             its log ({}):\n{}",
                            self.port,
                            self.log.display(),
                            log_tail(&self.log, 30)
                        )));
                    }
                    break;
                }
                if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                    .await
                    .is_ok()
                {
                    if listens_on(child.id(), self.port) {
                        self.child = Some(child);
                        self.started = true;
                        return Ok(());
                    }
                    // Another process answers on the port: this server cannot bind it.
                    let _ = child.kill();
                    let _ = child.wait();
                    if Instant::now() > deadline {
                        return Err(HarnessError::Process(format!(
                            "another process holds port {}, which s3s-fs needs",
                            self.port
                        )));
                    }
                    if !self.started {
                        self.port = crate::free_port()?;
                    }
                    break;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(HarnessError::Process(format!(
                        "s3s-fs did not accept connections on port {} within {START_TIMEOUT:?}",
                        self.port
                    )));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Kills the server (SIGKILL) and reaps it: an abrupt outage.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Requests for S3 operation `op` (e.g. `GetObject`) on keys containing `key_part` the
    /// server has routed so far; only counted when started with `log_requests`.
    pub fn count_requests(&self, op: &str, key_part: &str) -> Result<usize> {
        if !self.log_requests {
            return Err(HarnessError::Process(
                "s3s-fs was not started to log its requests".into(),
            ));
        }
        let log = std::fs::read_to_string(&self.log)
            .map_err(|e| HarnessError::io("cannot read", &self.log, e))?;
        Ok(log
            .lines()
            .filter(|line| {
                line.contains("resolved route")
                    && line.contains(&format!("op: {op},"))
                    && line.contains(&format!("key: \"{key_part}"))
            })
            .count())
    }
}

impl Drop for S3Process {
    fn drop(&mut self) {
        self.stop();
    }
}
