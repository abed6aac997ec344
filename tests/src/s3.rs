//! An S3 server for the gateway to upload to: `s3s-fs` on a scratch directory.
//!
//! `s3s-fs` stores object `<key>` of bucket `<bucket>` as the file `<root>/<bucket>/<key>` (written
//! to a temporary file and renamed into place). Tests read objects back over HTTP with
//! `object_store`'s S3 client, so they check what S3 actually serves.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjectPath;
use object_store::{ClientOptions, ObjectStore, ObjectStoreExt, RetryConfig};

use crate::binaries::s3s_fs_binary;

/// Access key the S3 server accepts (and the gateway gets as `AWS_ACCESS_KEY_ID`).
pub const S3_ACCESS_KEY: &str = "stagefs";
/// Secret key the S3 server accepts (and the gateway gets as `AWS_SECRET_ACCESS_KEY`).
pub const S3_SECRET_KEY: &str = "stagefs-secret";
/// The bucket the gateway uploads to.
pub const S3_BUCKET: &str = "stagefs";
/// Region used for request signing.
pub const S3_REGION: &str = "us-east-1";

/// A running (or stopped) `s3s-fs` process with a fixed port and root directory.
pub struct S3Server {
    root: PathBuf,
    port: u16,
    log_path: PathBuf,
    child: Option<Child>,
    store: Arc<dyn ObjectStore>,
}

/// The object that claims a store prefix for one file system (the gateway's
/// `store_check::OWNER_OBJECT`).
pub const OWNER_OBJECT: &str = "stagefs-file-system";

impl S3Server {
    /// Starts `s3s-fs` on a free port with data under `root` (created if needed) and creates the
    /// bucket [`S3_BUCKET`]. Its output goes to `<root>.log`.
    pub async fn start_in(root: impl Into<PathBuf>) -> S3Server {
        let root = root.into();
        std::fs::create_dir_all(root.join(S3_BUCKET)).unwrap_or_else(|e| {
            panic!(
                "cannot create the bucket directory under {}: {e}",
                root.display()
            )
        });
        let port = free_port();
        let log_path = root.with_extension("log");
        let endpoint = format!("http://127.0.0.1:{port}");
        let store: Arc<dyn ObjectStore> = Arc::new(
            AmazonS3Builder::new()
                // Client options first: they would reset `allow_http` set before them.
                .with_client_options(ClientOptions::new().with_timeout(Duration::from_secs(60)))
                .with_bucket_name(S3_BUCKET)
                .with_endpoint(&endpoint)
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
                .expect("configure the test's S3 client"),
        );
        let mut server = S3Server {
            root,
            port,
            log_path,
            child: None,
            store,
        };
        server.start().await;
        server
    }

    /// (Re)starts the server on the same port and root; waits until the port accepts TCP.
    pub async fn start(&mut self) {
        assert!(self.child.is_none(), "the S3 server is already running");
        let binary = s3s_fs_binary();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.log_path)
                .unwrap_or_else(|e| panic!("cannot open {}: {e}", self.log_path.display()));
            let mut child = Command::new(&binary)
                .args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
                .args(["--access-key", S3_ACCESS_KEY, "--secret-key", S3_SECRET_KEY])
                .arg(&self.root)
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("clone log file handle"))
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
            // Wait for the port; if the process exits first (the port may still be held by the
            // previous instance for a moment), try again until the deadline.
            loop {
                if let Some(status) = child.try_wait().expect("poll s3s-fs") {
                    if Instant::now() > deadline {
                        panic!(
                            "s3s-fs exited with {status} before accepting connections on port {}; log:\n{}",
                            self.port,
                            crate::tail(&std::fs::read_to_string(&self.log_path).unwrap_or_default(), 30)
                        );
                    }
                    break;
                }
                if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                    .await
                    .is_ok()
                {
                    self.child = Some(child);
                    return;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "s3s-fs did not accept connections on port {} within 30 s",
                        self.port
                    );
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Kills the server (SIGKILL) and waits for it: an abrupt outage.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(child) => child.try_wait().expect("poll s3s-fs").is_none(),
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

    /// The gateway's store URL, `s3://<bucket>`.
    pub fn store_url(&self) -> String {
        format!("s3://{S3_BUCKET}")
    }

    /// Gateway flags that point it at this server.
    pub fn gateway_args(&self) -> Vec<String> {
        vec![
            "--store".into(),
            self.store_url(),
            "--s3-endpoint".into(),
            self.endpoint(),
            "--s3-allow-http".into(),
            "--s3-region".into(),
            S3_REGION.into(),
        ]
    }

    /// Environment the gateway needs to sign requests to this server.
    pub fn gateway_env(&self) -> Vec<(String, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID".into(), S3_ACCESS_KEY.into()),
            ("AWS_SECRET_ACCESS_KEY".into(), S3_SECRET_KEY.into()),
        ]
    }

    /// The file `s3s-fs` keeps object `key` in.
    pub fn object_file(&self, key: &str) -> PathBuf {
        self.root.join(S3_BUCKET).join(key)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// An S3 client for the bucket (over HTTP, like the gateway's).
    pub fn store(&self) -> Arc<dyn ObjectStore> {
        self.store.clone()
    }

    /// The object's bytes as S3 serves them, `None` when it does not exist.
    pub async fn get(&self, key: &str) -> Option<Bytes> {
        match self.store.get(&ObjectPath::from(key)).await {
            Ok(result) => Some(
                result
                    .bytes()
                    .await
                    .unwrap_or_else(|e| panic!("S3 GET {key}: reading the body: {e}")),
            ),
            Err(object_store::Error::NotFound { .. }) => None,
            Err(e) => panic!("S3 GET {key}: {e}"),
        }
    }

    /// Whether the object exists (S3 HEAD).
    pub async fn exists(&self, key: &str) -> bool {
        match self.store.head(&ObjectPath::from(key)).await {
            Ok(_) => true,
            Err(object_store::Error::NotFound { .. }) => false,
            Err(e) => panic!("S3 HEAD {key}: {e}"),
        }
    }

    /// Every object in the bucket but the file system's claim of it (`stagefs-file-system`,
    /// which a gateway writes at start): (key, size), sorted by key.
    pub async fn list(&self) -> Vec<(String, u64)> {
        let mut objects = self.list_all().await;
        objects.retain(|(key, _)| key != OWNER_OBJECT);
        objects
    }

    /// Every object in the bucket, the claim included: (key, size), sorted by key.
    pub async fn list_all(&self) -> Vec<(String, u64)> {
        let mut objects: Vec<(String, u64)> = self
            .store
            .list(None)
            .map_ok(|meta| (meta.location.to_string(), meta.size))
            .try_collect()
            .await
            .unwrap_or_else(|e| panic!("S3 LIST: {e}"));
        objects.sort();
        objects
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local address").port()
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::PutPayload;

    /// The harness itself: objects put over HTTP land at `<root>/<bucket>/<key>`, and survive a
    /// stop/start of the server on the same port.
    #[tokio::test]
    async fn s3_server_stores_objects_and_restarts_on_the_same_port() {
        let dir = crate::TestDir::new("harness-s3");
        let mut s3 = S3Server::start_in(dir.join("s3")).await;
        let key = crate::block_key(1_234_567, 3, 1000);
        let data = crate::block_bytes(&key, 7);
        s3.store()
            .put(
                &ObjectPath::from(key.as_str()),
                PutPayload::from(data.clone()),
            )
            .await
            .unwrap();
        assert_eq!(std::fs::read(s3.object_file(&key)).unwrap(), data);
        assert_eq!(s3.list().await, vec![(key.clone(), 1000)]);

        let port = s3.port();
        s3.stop();
        assert!(!s3.is_running());
        assert!(tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err());
        s3.start().await;
        assert_eq!(s3.port(), port);
        assert_eq!(s3.get(&key).await.unwrap(), data);
        assert!(s3.exists(&key).await);
        assert!(!s3.exists("chunks/0/0/1_0_10").await);
        assert_eq!(s3.get("chunks/0/0/1_0_10").await, None);
    }
}
