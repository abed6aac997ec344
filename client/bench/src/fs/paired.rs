//! The paired rounds of `bench fs --peer juicefs` (`--peer-rounds`): the short write workloads
//! (small files, appends, untar, venv) run on stagefs's gateway mode and on JuiceFS
//! `--writeback` back to back, round after round, so that the two meet the same state of the
//! machine. The sequences before them run minutes apart, and this VM's speed drifts by more
//! than the differences measured across those minutes (JuiceFS's own appends have moved from
//! 673 to 1,572/s between runs). Which side goes first alternates from round to round, and each
//! run starts once both have uploaded everything, so neither pays for the other's (or its own
//! earlier) uploads.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::juicefs::JuiceFs;
use super::report::Paired;
use super::stack::MountProcess;
use super::workloads::{self, Tarball};
use super::{blocking, wait_for_uploads, BenchError, FsBenchArgs, Plan};
use crate::progress;

/// How long JuiceFS may take to upload what it staged before the next run.
const JUICEFS_SETTLE_TIMEOUT: Duration = Duration::from_secs(600);

/// The workloads of a round, in order; venv is left out with `--no-venv`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Workload {
    SmallFiles,
    Appends,
    Untar,
    Venv,
}

impl Workload {
    const ALL: [Workload; 4] = [
        Workload::SmallFiles,
        Workload::Appends,
        Workload::Untar,
        Workload::Venv,
    ];

    /// Its key in the report ([`Paired`] by workload).
    fn name(self) -> &'static str {
        match self {
            Workload::SmallFiles => "small_files",
            Workload::Appends => "appends",
            Workload::Untar => "untar",
            Workload::Venv => "venv",
        }
    }

    /// One run in `dir`: files/s, appends/s, or venv's seconds (the one figure where lower is
    /// better).
    async fn run(
        self,
        dir: PathBuf,
        plan: &Plan,
        tarball: &Arc<Tarball>,
    ) -> Result<f64, BenchError> {
        let (small_files, appends, tarball) = (plan.small_files, plan.appends, tarball.clone());
        blocking(move || match self {
            Workload::SmallFiles => workloads::small_files(&dir, small_files, 4),
            Workload::Appends => workloads::appends(&dir, appends).map(|a| a.per_s),
            Workload::Untar => tarball.untar(&dir),
            Workload::Venv => workloads::venv(&dir),
        })
        .await
    }
}

/// One side of a pair: where it writes, and how to wait until it has uploaded everything.
enum Side {
    Stagefs {
        root: PathBuf,
        gateway: std::net::SocketAddr,
    },
    Juicefs {
        root: PathBuf,
        /// Its `--cache-dir`, where `--writeback` stages blocks until they are uploaded.
        cache: PathBuf,
    },
}

impl Side {
    fn name(&self) -> &'static str {
        match self {
            Side::Stagefs { .. } => "stagefs",
            Side::Juicefs { .. } => "juicefs-writeback",
        }
    }

    fn root(&self) -> &Path {
        match self {
            Side::Stagefs { root, .. } | Side::Juicefs { root, .. } => root,
        }
    }

    async fn settle(&self) -> Result<(), BenchError> {
        match self {
            Side::Stagefs { gateway, .. } => wait_for_uploads(*gateway).await.map(drop),
            Side::Juicefs { cache, .. } => {
                let cache = cache.clone();
                blocking(move || wait_for_juicefs_staging(&cache)).await
            }
        }
    }
}

/// Runs `plan.peer_rounds` rounds on a fresh mount of the gateway and a fresh `--writeback`
/// mount of the JuiceFS volume `meta`; the figures by workload.
#[allow(clippy::too_many_arguments)]
pub(super) async fn run(
    juicefs: &JuiceFs,
    meta: &str,
    gateway: std::net::SocketAddr,
    endpoint: &str,
    args: &FsBenchArgs,
    plan: &Plan,
    work: &Path,
    tarball: &Arc<Tarball>,
) -> Result<std::collections::BTreeMap<String, Paired>, BenchError> {
    let ours = MountProcess::start(
        gateway,
        &work.join("mnt-paired-stagefs"),
        endpoint,
        &[
            "--write-mode",
            "gateway",
            "--max-uploads",
            &args.uploads.to_string(),
        ],
        &work.join("mount-paired-stagefs.log"),
    )?;
    let cache = work.join("cache-paired-juicefs");
    let theirs = juicefs.mount(
        meta,
        &work.join("mnt-paired-juicefs"),
        true,
        &cache,
        &work.join("mount-paired-juicefs.log"),
    )?;
    let sides = [
        Side::Stagefs {
            root: ours.path.clone(),
            gateway,
        },
        Side::Juicefs {
            root: theirs.path().to_path_buf(),
            cache,
        },
    ];
    let outcome = rounds(&sides, args, plan, tarball).await;
    JuiceFs::unmount(theirs)?;
    ours.unmount()?;
    outcome
}

async fn rounds(
    sides: &[Side; 2],
    args: &FsBenchArgs,
    plan: &Plan,
    tarball: &Arc<Tarball>,
) -> Result<std::collections::BTreeMap<String, Paired>, BenchError> {
    let mut figures = std::collections::BTreeMap::<String, Paired>::new();
    for round in 0..plan.peer_rounds {
        // Alternating who goes first cancels a steady drift of the machine within a pair.
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for workload in Workload::ALL {
            if workload == Workload::Venv && args.no_venv {
                continue;
            }
            let mut values = [0.0; 2];
            for &i in &order {
                // Both: the side that just ran uploads what it staged (the gateway defers its
                // uploads while writers write, then starts), which would land on this run.
                for side in sides {
                    side.settle().await?;
                }
                let runner = &sides[i];
                let dir = runner.root().join(format!("paired-{}", round + 1));
                std::fs::create_dir_all(&dir)
                    .map_err(|e| BenchError::io("cannot create", &dir, e))?;
                values[i] = workload.run(dir, plan, tarball).await?;
                progress!(
                    "[paired round {}] {} on {}: {:.2}",
                    round + 1,
                    workload.name(),
                    runner.name(),
                    values[i]
                );
            }
            figures
                .entry(workload.name().to_string())
                .or_default()
                .push(values[0], values[1], workload == Workload::Venv);
        }
    }
    Ok(figures)
}

/// Waits until no block is left in a `rawstaging` directory under `cache` (where JuiceFS
/// `--writeback` keeps blocks until they are uploaded).
fn wait_for_juicefs_staging(cache: &Path) -> Result<(), BenchError> {
    let start = Instant::now();
    loop {
        let staged = staged_files(cache)?;
        if staged == 0 {
            return Ok(());
        }
        if start.elapsed() > JUICEFS_SETTLE_TIMEOUT {
            return Err(BenchError::Task(format!(
                "JuiceFS still had {staged} blocks staged in {} after {:?}",
                cache.display(),
                JUICEFS_SETTLE_TIMEOUT
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Files under directories named `rawstaging` below `dir`.
fn staged_files(dir: &Path) -> Result<usize, BenchError> {
    fn walk(dir: &Path, inside: bool) -> std::io::Result<usize> {
        let mut count = 0;
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            // A directory JuiceFS removed meanwhile holds nothing.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let kind = entry.file_type()?;
            if kind.is_dir() {
                count += walk(&entry.path(), inside || entry.file_name() == "rawstaging")?;
            } else if inside {
                count += 1;
            }
        }
        Ok(count)
    }
    walk(dir, false).map_err(|e| BenchError::io("cannot list", dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_files_under_rawstaging_count_as_staged() {
        let dir = tempfile::tempdir().unwrap();
        let staging = dir.path().join("uuid/rawstaging/chunks/0/0");
        std::fs::create_dir_all(&staging).unwrap();
        std::fs::create_dir_all(dir.path().join("uuid/raw/chunks")).unwrap();
        std::fs::write(dir.path().join("uuid/raw/chunks/cached"), b"x").unwrap();
        assert_eq!(staged_files(dir.path()).unwrap(), 0);
        std::fs::write(staging.join("1_0_4096"), b"x").unwrap();
        std::fs::write(staging.join("2_0_4096"), b"x").unwrap();
        assert_eq!(staged_files(dir.path()).unwrap(), 2);
        assert_eq!(staged_files(&dir.path().join("absent")).unwrap(), 0);
        std::fs::remove_file(staging.join("1_0_4096")).unwrap();
        std::fs::remove_file(staging.join("2_0_4096")).unwrap();
        wait_for_juicefs_staging(dir.path()).unwrap();
    }
}
