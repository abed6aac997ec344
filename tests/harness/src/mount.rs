//! A `stagefs mount --foreground` process: started, waited for until its directory is a FUSE
//! mount, unmounted, killed.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::{log_tail, reap_within, HarnessError, Result};

/// Whether `path` (an absolute, canonical path) is the mount point of a FUSE file system in this
/// process's mount namespace (`/proc/self/mountinfo`).
pub fn is_fuse_mounted(path: &Path) -> bool {
    fuse_mount_info(path).is_some()
}

/// The `/proc/self/mountinfo` line of the FUSE mount on `path`, if any (the last one: mounts
/// stack).
pub fn fuse_mount_info(path: &Path) -> Option<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let wanted = path.as_os_str().as_encoded_bytes();
    info.lines()
        .rev()
        .find(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let Some(sep) = fields.iter().position(|f| *f == "-") else {
                return false;
            };
            fields.len() > sep + 1
                && fields.len() > 4
                && unescape_mountinfo(fields[4]) == wanted
                && fields[sep + 1].starts_with("fuse")
        })
        .map(str::to_string)
}

/// Undoes the octal escapes (`\040` for a space, ...) of a `/proc/self/mountinfo` path.
fn unescape_mountinfo(field: &str) -> Vec<u8> {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            if let Ok(value) = u8::from_str_radix(&field[i + 1..i + 4], 8) {
                out.push(value);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    out
}

/// Runs `fusermount3 -u` on `path` (`-z` when `lazy`: detached now, gone once unused).
pub fn fusermount_u(path: &Path, lazy: bool) -> Result<()> {
    let mut command = Command::new("fusermount3");
    command.arg("-u");
    if lazy {
        command.arg("-z");
    }
    let output = command
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| HarnessError::io("cannot run fusermount3 for", path, e))?;
    if !output.status.success() {
        return Err(HarnessError::Process(format!(
            "fusermount3 -u {} failed ({}): {}",
            path.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    Ok(())
}

/// A running `stagefs mount … --foreground`: this process owns the client. Dropped while
/// mounted, it is unmounted lazily and the client is given 2 s to exit, then killed, so a failed
/// run leaves no mount behind.
pub struct MountProcess {
    child: Option<Child>,
    /// Canonical.
    mountpoint: PathBuf,
    log: PathBuf,
}

impl MountProcess {
    /// Spawns `command` (`stagefs mount GATEWAY MOUNTPOINT --foreground …`, built by the caller)
    /// with its output appended to `log`, and waits up to `timeout` until `mountpoint` (created
    /// if missing) is a FUSE mount. A client that exits first, or is too slow, is reaped and the
    /// error ends with the tail of `log`.
    pub fn start(
        mut command: Command,
        mountpoint: &Path,
        log: &Path,
        timeout: Duration,
    ) -> Result<MountProcess> {
        std::fs::create_dir_all(mountpoint)
            .map_err(|e| HarnessError::io("cannot create the mount point", mountpoint, e))?;
        let mountpoint = mountpoint
            .canonicalize()
            .map_err(|e| HarnessError::io("cannot resolve the mount point", mountpoint, e))?;
        if is_fuse_mounted(&mountpoint) {
            return Err(HarnessError::Process(format!(
                "{} is already a FUSE mount",
                mountpoint.display()
            )));
        }
        let mut out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| HarnessError::io("cannot open", log, e))?;
        let _ = writeln!(out, "=== {command:?}");
        let err = out
            .try_clone()
            .map_err(|e| HarnessError::io("cannot open", log, e))?;
        let mut child = command
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| HarnessError::io("cannot start", command.get_program(), e))?;
        let started = Instant::now();
        loop {
            if is_fuse_mounted(&mountpoint) {
                return Ok(MountProcess {
                    child: Some(child),
                    mountpoint,
                    log: log.to_path_buf(),
                });
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(HarnessError::Process(format!(
                    "`{command:?}` exited with {status} before mounting; its log ({}):\n{}",
                    log.display(),
                    log_tail(log, 40)
                )));
            }
            if started.elapsed() > timeout {
                let _ = child.kill();
                let _ = child.wait();
                return Err(HarnessError::Process(format!(
                    "`{command:?}` did not mount within {timeout:?}; its log ({}):\n{}",
                    log.display(),
                    log_tail(log, 40)
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The mount point (canonical).
    pub fn path(&self) -> &Path {
        &self.mountpoint
    }

    pub fn log(&self) -> &Path {
        &self.log
    }

    /// The client's pid, while this owns it.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the client process runs.
    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Waits up to `timeout` for the client to exit (after an unmount); a client that
    /// overstays is killed, and that is an error.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let Some(mut child) = self.child.take() else {
            return Err(HarnessError::Process(
                "the mount's client was already reaped".into(),
            ));
        };
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(HarnessError::Process(format!(
                    "the client of {} did not exit within {timeout:?} of being unmounted; its \
                     log:\n{}",
                    self.mountpoint.display(),
                    log_tail(&self.log, 30)
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Unmounts with `fusermount3 -u` (open files flushed) and waits up to `timeout` for the
    /// client to exit.
    pub fn unmount(mut self, timeout: Duration) -> Result<ExitStatus> {
        fusermount_u(&self.mountpoint, false)?;
        self.wait_exit(timeout)
    }
}

impl Drop for MountProcess {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if is_fuse_mounted(&self.mountpoint) {
            let _ = fusermount_u(&self.mountpoint, true);
        }
        reap_within(&mut child, Duration::from_secs(2));
    }
}
