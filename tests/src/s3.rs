//! An S3 server for the gateway to upload to: `s3s-fs` on a scratch directory.
//!
//! `s3s-fs` stores object `<key>` of bucket `<bucket>` as the file `<root>/<bucket>/<key>` (written
//! to a temporary file and renamed into place). Tests read objects back over HTTP with
//! `object_store`'s S3 client, so they check what S3 actually serves.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::TryStreamExt;
use harness::s3::S3Process;
pub use harness::s3::{S3_ACCESS_KEY, S3_BUCKET, S3_REGION, S3_SECRET_KEY};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt};

use crate::binaries::s3s_fs_binary;

/// A running (or stopped) `s3s-fs` process with a fixed port and root directory
/// (`harness::s3::S3Process`), and a client of it.
pub struct S3Server {
    process: S3Process,
    store: Arc<dyn ObjectStore>,
}

/// The object that claims a store prefix for one file system (the gateway's
/// `store_check::OWNER_OBJECT`).
pub const OWNER_OBJECT: &str = "stagefs-file-system";

impl S3Server {
    /// Starts `s3s-fs` on a free port with data under `root` (created if needed) and creates the
    /// bucket [`S3_BUCKET`]. Its output goes to `<root>.log`.
    pub async fn start_in(root: impl Into<PathBuf>) -> S3Server {
        S3Server::start_logging_in(root, false).await
    }

    /// [`S3Server::start_in`]; with `log_requests`, [`S3Server::count_requests`] counts the
    /// requests the server routes.
    pub async fn start_logging_in(root: impl Into<PathBuf>, log_requests: bool) -> S3Server {
        let root = root.into();
        let process = S3Process::start_logging(&s3s_fs_binary(), &root, free_port(), log_requests)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let store = harness::s3::s3_store(&process.endpoint(), Duration::from_secs(60))
            .expect("configure the test's S3 client");
        S3Server { process, store }
    }

    /// Starts the server again on the same port and root, after [`S3Server::stop`].
    pub async fn start(&mut self) {
        self.process
            .restart()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// Kills the server (SIGKILL) and waits for it: an abrupt outage.
    pub fn stop(&mut self) {
        self.process.stop();
    }

    /// Requests for S3 operation `op` (`GetObject`, `PutObject`, …) on keys starting with
    /// `key_prefix` the server routed so far.
    pub fn count_requests(&self, op: &str, key_prefix: &str) -> usize {
        self.process
            .count_requests(op, key_prefix)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn is_running(&mut self) -> bool {
        self.process.is_running()
    }

    pub fn port(&self) -> u16 {
        self.process.port()
    }

    /// `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        self.process.endpoint()
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
        self.root().join(S3_BUCKET).join(key)
    }

    pub fn root(&self) -> &Path {
        self.process.root()
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

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    harness::free_port().unwrap_or_else(|e| panic!("{e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::PutPayload;

    /// A port picked free but taken by another process before `s3s-fs` binds it is swapped for
    /// a free one: the server is never taken to be the process that happens to answer there.
    #[tokio::test]
    async fn a_port_taken_before_the_server_binds_it_is_swapped_for_a_free_one() {
        let dir = crate::TestDir::new("harness-s3-port");
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let process = S3Process::start(&s3s_fs_binary(), &dir.join("s3"), port)
            .await
            .unwrap();
        assert_ne!(process.port(), port, "the taken port was kept");
        let store = harness::s3::s3_store(&process.endpoint(), Duration::from_secs(10)).unwrap();
        store
            .put(&ObjectPath::from("k"), PutPayload::from(vec![1u8; 10]))
            .await
            .expect("s3s-fs answers on the port it was given instead");
        drop(taken);
    }

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
