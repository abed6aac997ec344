//! The workloads of `stagefs bench fs`, run with plain `std::fs` calls on a directory, so the
//! same code measures a stagefs mount in either write mode and a local directory. Each writes
//! content it can verify and returns its figure; the caller decides what it is compared with.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use rand::RngCore;

use super::super::{mib_per_s, percentile_ms, BenchError};

/// Size of each write of `checkpoint` and each read of `cold_read`.
pub const IO_SIZE: usize = 1 << 20;
/// Size of each file of `small_files`.
pub const SMALL_FILE_SIZE: usize = 4096;
/// Size of each file of `read_after_write`.
pub const RAW_FILE_SIZE: usize = 64 * 1024;

/// Checkpoint content: a random 1 MiB pattern per file, with the write's offset stamped into its
/// first 8 bytes so that a misplaced or stale MiB is caught by [`verify_checkpoint_file`].
pub struct CheckpointPattern {
    base: Vec<u8>,
}

impl CheckpointPattern {
    pub fn new(seed: u64) -> Self {
        let mut base = vec![0u8; IO_SIZE];
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed);
        rng.fill_bytes(&mut base);
        CheckpointPattern { base }
    }

    fn fill(&self, buf: &mut [u8], offset: u64) {
        buf.copy_from_slice(&self.base);
        buf[..8].copy_from_slice(&offset.to_le_bytes());
    }
}

fn io_error(what: &'static str, path: &Path, e: std::io::Error) -> BenchError {
    BenchError::io(what, path, e)
}

/// Runs `f(i)` on `threads` threads for `i` in `0..threads`, returning the first error.
fn parallel<T: Send>(
    threads: usize,
    f: impl Fn(usize) -> Result<T, BenchError> + Sync,
) -> Result<Vec<T>, BenchError> {
    std::thread::scope(|scope| {
        let f = &f;
        let handles: Vec<_> = (0..threads).map(|i| scope.spawn(move || f(i))).collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| BenchError::Task("workload thread panicked".into()))?
            })
            .collect()
    })
}

/// The path of checkpoint file `i` in `dir`.
pub fn checkpoint_file(dir: &Path, i: usize) -> PathBuf {
    dir.join(format!("checkpoint-{i}.bin"))
}

/// `writers` files of `size` bytes each, written in 1 MiB writes and closed, all at once.
/// Returns MiB/s over all bytes, from the first open to the last close.
pub fn checkpoint(dir: &Path, writers: usize, size: u64) -> Result<f64, BenchError> {
    let start = Instant::now();
    parallel(writers, |i| write_checkpoint_file(dir, i, size))?;
    Ok(mib_per_s(writers as u64 * size, start.elapsed()))
}

/// Writes checkpoint file `i` of `size` bytes in 1 MiB writes and closes it, reporting the
/// error of any write or of `close` (where stagefs waits for durability).
pub fn write_checkpoint_file(dir: &Path, i: usize, size: u64) -> Result<(), BenchError> {
    let path = checkpoint_file(dir, i);
    let pattern = CheckpointPattern::new(i as u64);
    let mut buf = vec![0u8; IO_SIZE];
    let mut file = File::create(&path).map_err(|e| io_error("cannot create", &path, e))?;
    let mut offset = 0u64;
    while offset < size {
        let len = (size - offset).min(IO_SIZE as u64) as usize;
        pattern.fill(&mut buf, offset);
        file.write_all(&buf[..len])
            .map_err(|e| io_error("write failed on", &path, e))?;
        offset += len as u64;
    }
    close(file, &path)
}

/// Closes `file`, reporting the error `close(2)` returns (std's drop ignores it).
fn close(file: File, path: &Path) -> Result<(), BenchError> {
    use std::os::fd::IntoRawFd;
    let fd = file.into_raw_fd();
    // SAFETY: fd was just taken from an owned File and is closed exactly once.
    if unsafe { libc::close(fd) } != 0 {
        return Err(io_error(
            "close failed on",
            path,
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Reads checkpoint file `i` sequentially in 1 MiB reads and checks every byte.
pub fn verify_checkpoint_file(dir: &Path, i: usize, size: u64) -> Result<(), BenchError> {
    let path = checkpoint_file(dir, i);
    let pattern = CheckpointPattern::new(i as u64);
    let mut want = vec![0u8; IO_SIZE];
    let mut got = vec![0u8; IO_SIZE];
    let mut file = File::open(&path).map_err(|e| io_error("cannot open", &path, e))?;
    let mut offset = 0u64;
    while offset < size {
        let len = (size - offset).min(IO_SIZE as u64) as usize;
        file.read_exact(&mut got[..len])
            .map_err(|e| io_error("read failed on", &path, e))?;
        pattern.fill(&mut want, offset);
        if got[..len] != want[..len] {
            return Err(BenchError::Task(format!(
                "{} holds other bytes than were written in the MiB at offset {offset}",
                path.display()
            )));
        }
        offset += len as u64;
    }
    let mut extra = [0u8; 1];
    if file
        .read(&mut extra)
        .map_err(|e| io_error("read failed on", &path, e))?
        != 0
    {
        return Err(BenchError::Task(format!(
            "{} is longer than the {size} bytes written",
            path.display()
        )));
    }
    Ok(())
}

/// Sequential read of checkpoint files `0..readers` at once, verifying them; MiB/s.
pub fn cold_read(dir: &Path, readers: usize, size: u64) -> Result<f64, BenchError> {
    let start = Instant::now();
    parallel(readers, |i| verify_checkpoint_file(dir, i, size))?;
    Ok(mib_per_s(readers as u64 * size, start.elapsed()))
}

fn small_file_content(thread: usize, i: usize) -> Vec<u8> {
    let mut content = vec![(thread * 31 + i) as u8; SMALL_FILE_SIZE];
    content[..16].copy_from_slice(&((thread as u64) << 32 | i as u64).to_le_bytes().repeat(2));
    content
}

/// `count` files of 4 KiB created, written and closed by `threads` threads in `dir/small`;
/// files/s. Then reads every file back and checks it (not timed).
pub fn small_files(dir: &Path, count: usize, threads: usize) -> Result<f64, BenchError> {
    let dir = dir.join("small");
    fs::create_dir_all(&dir).map_err(|e| io_error("cannot create", &dir, e))?;
    let per_thread = count.div_ceil(threads);
    let start = Instant::now();
    parallel(threads, |t| {
        for i in 0..per_thread.min(count.saturating_sub(t * per_thread)) {
            let path = dir.join(format!("f{t}-{i}"));
            let mut file = File::create(&path).map_err(|e| io_error("cannot create", &path, e))?;
            file.write_all(&small_file_content(t, i))
                .map_err(|e| io_error("write failed on", &path, e))?;
            close(file, &path)?;
        }
        Ok(())
    })?;
    let elapsed = start.elapsed();
    // Verified in parallel: in write-through mode every read is a GET that pays the store's
    // latency.
    parallel(threads, |t| {
        for i in 0..per_thread.min(count.saturating_sub(t * per_thread)) {
            let path = dir.join(format!("f{t}-{i}"));
            let got = fs::read(&path).map_err(|e| io_error("cannot read", &path, e))?;
            if got != small_file_content(t, i) {
                return Err(BenchError::Task(format!(
                    "{} reads back other bytes",
                    path.display()
                )));
            }
        }
        Ok(())
    })?;
    Ok(count as f64 / elapsed.as_secs_f64().max(1e-9))
}

/// Figures of [`appends`].
pub struct Appends {
    pub per_s: f64,
    pub total: Duration,
    /// The rate of the last tenth of the appends over that of the first: whether a long slice
    /// list (or its compaction) slows a log down as it grows.
    pub end_ratio: f64,
    /// Appends per second in each tenth of the run.
    pub tenths_per_s: Vec<f64>,
}

/// `count` appends of about 100 bytes to one file, each followed by `fsync`; then checks the
/// file holds every row in order.
pub fn appends(dir: &Path, count: usize) -> Result<Appends, BenchError> {
    let path = dir.join("appends.log");
    let row = |i: usize| format!("{i:08} {}\n", "x".repeat(90));
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|e| io_error("cannot open", &path, e))?;
    // Appends per second in each tenth of the run (the last one takes the remainder).
    let tenth = (count / 10).max(1);
    let mut tenths = Vec::with_capacity(10);
    let start = Instant::now();
    let mut tenth_start = start;
    for i in 0..count {
        file.write_all(row(i).as_bytes())
            .map_err(|e| io_error("append failed on", &path, e))?;
        file.sync_all()
            .map_err(|e| io_error("fsync failed on", &path, e))?;
        let done = i + 1;
        if done == count || (done % tenth == 0 && tenths.len() < 9) {
            let in_tenth = done - tenths.len() * tenth;
            tenths.push(in_tenth as f64 / tenth_start.elapsed().as_secs_f64().max(1e-9));
            tenth_start = Instant::now();
        }
    }
    let total = start.elapsed();
    close(file, &path)?;
    let want: String = (0..count).map(row).collect();
    let got = fs::read_to_string(&path).map_err(|e| io_error("cannot read", &path, e))?;
    if got != want {
        return Err(BenchError::Task(format!(
            "{} holds {} bytes, not the {} appended",
            path.display(),
            got.len(),
            want.len()
        )));
    }
    Ok(Appends {
        per_s: count as f64 / total.as_secs_f64().max(1e-9),
        total,
        end_ratio: tenths.last().copied().unwrap_or(0.0)
            / tenths.first().copied().unwrap_or(0.0).max(1e-9),
        tenths_per_s: tenths,
    })
}

/// Latency percentiles in milliseconds.
pub struct Latency {
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Reads that failed before one succeeded ([`read_after_write`]).
    pub failed_reads: u64,
}

/// How long a reader tries again after a failed read in [`read_after_write`]: JuiceFS
/// `--writeback` answers EIO on another mount for a block its writer has not uploaded yet, once
/// its own retries are spent.
const RAW_RETRY_FOR: Duration = Duration::from_secs(120);

/// `count` times: a 64 KiB file written and closed on `writer`, then opened, read and verified
/// on `reader` (another mount of the same file system). The latency is the reader's open to
/// verified, the time another node waits to see a file that was just closed; a read that fails
/// is tried again (and counted) until it succeeds or [`RAW_RETRY_FOR`] has passed. Bytes that
/// differ are never tried again: they fail the workload.
pub fn read_after_write(writer: &Path, reader: &Path, count: usize) -> Result<Latency, BenchError> {
    let name = |i: usize| format!("raw-{i}");
    let mut rng = rand::rng();
    let mut content = vec![0u8; RAW_FILE_SIZE];
    let mut latencies = Vec::with_capacity(count);
    let mut failed_reads = 0;
    for i in 0..count {
        rng.fill_bytes(&mut content);
        let path = writer.join(name(i));
        let mut file = File::create(&path).map_err(|e| io_error("cannot create", &path, e))?;
        file.write_all(&content)
            .map_err(|e| io_error("write failed on", &path, e))?;
        close(file, &path)?;
        let other = reader.join(name(i));
        let start = Instant::now();
        let got = loop {
            match fs::read(&other) {
                Ok(got) => break got,
                Err(e) if start.elapsed() >= RAW_RETRY_FOR => {
                    return Err(io_error("cannot read", &other, e));
                }
                Err(_) => {
                    failed_reads += 1;
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        };
        latencies.push(start.elapsed());
        if got != content {
            return Err(BenchError::Task(format!(
                "{} shows {} bytes that differ from the {} just closed on the other mount",
                other.display(),
                got.len(),
                content.len()
            )));
        }
    }
    Ok(Latency {
        failed_reads,
        ..latency(latencies)
    })
}

fn latency(mut samples: Vec<Duration>) -> Latency {
    samples.sort();
    Latency {
        p50_ms: percentile_ms(&samples, 0.50),
        p99_ms: percentile_ms(&samples, 0.99),
        failed_reads: 0,
    }
}

/// A tarball of up to `max_files` regular files from `source`, made once per run.
pub struct Tarball {
    pub path: PathBuf,
    pub source: PathBuf,
    /// Regular files in it (paths relative to `source`).
    pub files: Vec<PathBuf>,
    pub bytes: u64,
}

impl Tarball {
    pub fn make(source: &Path, max_files: usize, out: &Path) -> Result<Self, BenchError> {
        let mut files = Vec::new();
        let mut bytes = 0u64;
        let mut stack = vec![PathBuf::new()];
        while let Some(rel) = stack.pop() {
            let dir = source.join(&rel);
            let mut entries: Vec<_> = fs::read_dir(&dir)
                .map_err(|e| io_error("cannot list", &dir, e))?
                .filter_map(Result::ok)
                .collect();
            entries.sort_by_key(|e| e.file_name());
            for entry in entries.into_iter().rev() {
                let Ok(kind) = entry.file_type() else {
                    continue;
                };
                let rel = rel.join(entry.file_name());
                if kind.is_dir() {
                    stack.push(rel);
                } else if kind.is_file() && files.len() < max_files {
                    // Unreadable files would make tar fail; leave them out.
                    if let Ok(meta) = fs::metadata(source.join(&rel)) {
                        if File::open(source.join(&rel)).is_ok() {
                            bytes += meta.len();
                            files.push(rel);
                        }
                    }
                }
            }
        }
        if files.is_empty() {
            return Err(BenchError::Args(format!(
                "--untar-source {} holds no readable files",
                source.display()
            )));
        }
        let list = out.with_extension("list");
        let names: String = files.iter().map(|f| format!("{}\n", f.display())).collect();
        fs::write(&list, names).map_err(|e| io_error("cannot write", &list, e))?;
        run_command(
            Command::new("tar")
                .arg("-cf")
                .arg(out)
                .arg("-C")
                .arg(source)
                .arg("--verbatim-files-from")
                .arg("-T")
                .arg(&list),
        )?;
        Ok(Tarball {
            path: out.to_path_buf(),
            source: source.to_path_buf(),
            files,
            bytes,
        })
    }

    /// Unpacks into `dir/untar` with `tar -xf`, then checks every file against the source;
    /// files/s of the unpacking.
    pub fn untar(&self, dir: &Path) -> Result<f64, BenchError> {
        let target = dir.join("untar");
        fs::create_dir_all(&target).map_err(|e| io_error("cannot create", &target, e))?;
        let start = Instant::now();
        run_command(
            Command::new("tar")
                .arg("-xf")
                .arg(&self.path)
                .arg("-C")
                .arg(&target)
                .arg("--no-same-owner"),
        )?;
        let elapsed = start.elapsed();
        const VERIFIERS: usize = 8;
        parallel(VERIFIERS, |v| {
            for rel in self.files.iter().skip(v).step_by(VERIFIERS) {
                let (want, got) = (self.source.join(rel), target.join(rel));
                let want = fs::read(&want).map_err(|e| io_error("cannot read", &want, e))?;
                let got_bytes = fs::read(&got).map_err(|e| io_error("cannot read", &got, e))?;
                if got_bytes != want {
                    return Err(BenchError::Task(format!(
                        "{} differs from its source after untar",
                        got.display()
                    )));
                }
            }
            Ok(())
        })?;
        Ok(self.files.len() as f64 / elapsed.as_secs_f64().max(1e-9))
    }
}

/// `python3 -m venv DIR/venv` (pip included: about 1,500 small files, the seeds' developer
/// environment case); the seconds it took. The tree is checked: its pip must import.
pub fn venv(dir: &Path) -> Result<f64, BenchError> {
    let target = dir.join("venv");
    let started = Instant::now();
    run_command(Command::new("python3").args(["-m", "venv"]).arg(&target))?;
    let elapsed = started.elapsed();
    run_command(Command::new(target.join("bin/python")).args(["-c", "import pip"]))?;
    Ok(elapsed.as_secs_f64())
}

/// Runs `command` to its end; its standard output, or an error quoting its standard error.
pub(crate) fn run_command(command: &mut Command) -> Result<String, BenchError> {
    let output = command
        .output()
        .map_err(|e| io_error("cannot run", Path::new(command.get_program()), e))?;
    if !output.status.success() {
        return Err(BenchError::Task(format!(
            "{command:?} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workloads_verify_what_they_wrote_on_a_local_directory() {
        let dir = tempfile::tempdir().unwrap();
        assert!(checkpoint(dir.path(), 2, 3 * IO_SIZE as u64 + 5).unwrap() > 0.0);
        assert!(cold_read(dir.path(), 2, 3 * IO_SIZE as u64 + 5).unwrap() > 0.0);
        assert!(small_files(dir.path(), 50, 4).unwrap() > 0.0);
        assert!(appends(dir.path(), 20).unwrap().per_s > 0.0);
        let raw = read_after_write(dir.path(), dir.path(), 10).unwrap();
        assert!(raw.p99_ms >= raw.p50_ms);
    }

    #[test]
    fn a_corrupted_checkpoint_is_caught() {
        let dir = tempfile::tempdir().unwrap();
        let size = 2 * IO_SIZE as u64;
        checkpoint(dir.path(), 1, size).unwrap();
        let path = checkpoint_file(dir.path(), 0);
        let mut bytes = fs::read(&path).unwrap();
        bytes[IO_SIZE + 100] ^= 1;
        fs::write(&path, bytes).unwrap();
        assert!(verify_checkpoint_file(dir.path(), 0, size).is_err());
    }

    #[test]
    fn untar_unpacks_and_verifies_a_tree() {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("src");
        fs::create_dir_all(source.join("a/b")).unwrap();
        fs::write(source.join("top.txt"), b"top").unwrap();
        fs::write(source.join("a/b/deep.rs"), b"fn main() {}").unwrap();
        let tarball = Tarball::make(&source, 100, &dir.path().join("t.tar")).unwrap();
        assert_eq!(tarball.files.len(), 2);
        let out = dir.path().join("out");
        assert!(tarball.untar(&out).unwrap() > 0.0);
        assert_eq!(
            fs::read(out.join("untar/a/b/deep.rs")).unwrap(),
            b"fn main() {}"
        );
        // A file changed after packing is reported.
        fs::write(source.join("top.txt"), b"changed").unwrap();
        assert!(tarball.untar(&dir.path().join("again")).is_err());
    }
}
