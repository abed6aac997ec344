//! Test harness for the stagefs integration tests (`tests/tests/*.rs`).
//!
//! The integration tests start real processes and talk to them the way production does:
//!
//! * an S3 server ([`S3Server`], `s3s-fs` on a temporary directory, installed by
//!   `scripts/setup.sh`) that the gateway uploads to and that tests read objects back from over
//!   HTTP;
//! * the gateway ([`Gateway`], the `stagefs-gateway` binary of this workspace) on a file-backed
//!   device in a per-test scratch directory ([`TestDir`]), driven over gRPC with the generated
//!   [`proto::staging::staging_client::StagingClient`];
//! * FUSE mounts ([`Mount`], `stagefs mount --foreground` as a child process; [`FuseStack`]
//!   bundles an S3 server and a gateway to mount), used with plain `std::fs` calls.
//!
//! The binaries are not built by `cargo test`: run `cargo build --bins` first (`scripts/test.sh`
//! does). [`binaries::binary`] finds the newest build in the target directory.
//!
//! Block helpers ([`blocks`]) make deterministic block contents from a block key and a seed, so any
//! bytes that come back (from `ReadBlock` or from the object store) can be checked against what the
//! key must hold, and stream blocks to the gateway the way the client does: a header frame, then
//! data frames of [`blocks::FRAME_BYTES`].
//!
//! Every scenario runs on both I/O engines: it is written once as `async fn scenario(engine: &str)`
//! and wrapped by two `#[tokio::test]`s, `<scenario>_uring` and `<scenario>_psync` (see
//! [`ENGINES`] and [`run_scenario`]).
//!
//! Environment knobs:
//! * `STAGEFS_KEEP_TMP=1` keeps every scratch directory (they are always kept when a test panics;
//!   the path is printed);
//! * `STAGEFS_TEST_TMPDIR=DIR` puts scratch directories under `DIR` instead of
//!   `<target>/stagefs-tests` (it must support `O_DIRECT`);
//! * `STAGEFS_BIN_DIR=DIR` takes the binaries from `DIR` instead of the newest build;
//! * `STAGEFS_CRASH_ROUNDS=N` sets the number of kill/restart rounds of `crash_rounds`.

pub mod bench;
pub mod binaries;
pub mod blocks;
pub mod certs;
pub mod cluster;
pub mod gateway;
pub mod mount;
pub mod prometheus;
pub mod rpc;
pub mod s3;
pub mod workload;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use blocks::*;
pub use cluster::GatewayCluster;
pub use gateway::{inspect, Gateway, GatewayBuilder, InspectReport};
pub use mount::{
    assert_errno, failing_mount, is_fuse_mounted, mount_command, FuseStack, Mount, MountBuilder,
    Pattern, TcpProxy,
};
pub use s3::S3Server;
pub use workload::{Workload, WorkloadReport};

/// The gateway's two I/O engines (`--io-engine`); every scenario runs on each.
pub const ENGINES: [&str; 2] = ["uring", "psync"];

/// The names in directory `dir`, sorted.
pub fn dir_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()))
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// The runtime of a test's async harness (gateway restarts, gRPC clients).
pub fn harness_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("build a tokio runtime")
}

/// Runs a whole scenario with an overall time limit, so that a hung gateway fails the test
/// instead of stalling the test run.
pub async fn run_scenario<F: Future<Output = ()>>(name: &str, limit: Duration, scenario: F) {
    let started = std::time::Instant::now();
    match tokio::time::timeout(limit, scenario).await {
        Ok(()) => eprintln!(
            "[stagefs-tests] {name}: passed in {:.1} s",
            started.elapsed().as_secs_f64()
        ),
        Err(_) => panic!("{name}: did not finish within {} s", limit.as_secs()),
    }
}

/// Declares one test per I/O engine for `async fn $scenario(engine: &str)`, named
/// `$scenario::uring` and `$scenario::psync`, each under an overall limit of `$limit_secs` s.
#[macro_export]
macro_rules! engine_tests {
    ($scenario:ident, $limit_secs:expr) => {
        mod $scenario {
            $crate::engine_tests!(@one $scenario, uring, $limit_secs);
            $crate::engine_tests!(@one $scenario, psync, $limit_secs);
        }
    };
    (@one $scenario:ident, $engine:ident, $limit_secs:expr) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn $engine() {
            $crate::run_scenario(
                concat!(stringify!($scenario), "_", stringify!($engine)),
                std::time::Duration::from_secs($limit_secs),
                super::$scenario(stringify!($engine)),
            )
            .await;
        }
    };
}

/// Awaits `fut`, panicking with `what` if it takes longer than `limit`.
pub async fn within<T, F: Future<Output = T>>(limit: Duration, what: &str, fut: F) -> T {
    match tokio::time::timeout(limit, fut).await {
        Ok(value) => value,
        Err(_) => panic!("timed out after {:.1} s: {what}", limit.as_secs_f64()),
    }
}

/// A scratch directory for one test (device image, S3 root, logs).
///
/// Removed on drop, except when the test is panicking or `STAGEFS_KEEP_TMP` is set: then it is
/// kept and its path printed, so the gateway log and the device image can be examined.
pub struct TestDir {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
}

impl TestDir {
    /// Creates `<base>/<name>-XXXXXX`, where base is `$STAGEFS_TEST_TMPDIR` or
    /// `<target>/stagefs-tests` (a real file system, unlike a tmpfs `/tmp`, so `O_DIRECT` works).
    pub fn new(name: &str) -> TestDir {
        let base = match std::env::var_os("STAGEFS_TEST_TMPDIR") {
            Some(dir) if !dir.is_empty() => PathBuf::from(dir),
            _ => binaries::target_dir().join("stagefs-tests"),
        };
        std::fs::create_dir_all(&base)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", base.display()));
        let dir = tempfile::Builder::new()
            .prefix(&format!("{name}-"))
            .tempdir_in(&base)
            .unwrap_or_else(|e| {
                panic!(
                    "cannot create a scratch directory in {}: {e}",
                    base.display()
                )
            });
        let path = dir.path().to_path_buf();
        TestDir {
            dir: Some(dir),
            path,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let keep = std::thread::panicking()
            || std::env::var_os("STAGEFS_KEEP_TMP").is_some_and(|v| !v.is_empty());
        if let Some(dir) = self.dir.take() {
            if keep {
                let path = dir.keep();
                eprintln!("[stagefs-tests] kept scratch directory {}", path.display());
            }
        }
    }
}

pub use harness::tail;

/// Runs `command`, which must succeed and print one JSON value (`status --json`,
/// `inspect --json`); `what` names it in the failure.
#[track_caller]
pub fn json_output(command: &mut std::process::Command, what: &str) -> serde_json::Value {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    assert!(
        output.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("{what} printed no JSON ({e})"))
}

/// `stagefs status ADDR --json`.
#[track_caller]
pub fn status_json(addr: &str) -> serde_json::Value {
    json_output(
        std::process::Command::new(binaries::client_binary()).args(["status", addr, "--json"]),
        &format!("stagefs status {addr}"),
    )
}

/// Asserts that the file at `path` holds exactly `want`, naming the first difference.
#[track_caller]
pub fn assert_file_bytes(path: &Path, want: &[u8]) {
    let got = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    assert_eq!(got.len(), want.len(), "size of {}", path.display());
    if got != want {
        let first = got.iter().zip(want).position(|(g, w)| g != w);
        panic!(
            "{} holds other bytes, first difference at {first:?}",
            path.display()
        );
    }
}
