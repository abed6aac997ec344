//! README, SEMANTICS: what a SIGKILL of the gateway keeps, with the embedded metadata and the
//! default `--namespace-sync fsync`.
//!
//! A mount writes files and closes them (one with its mode and mtime set before the close, as
//! `tar` does), makes empty files and closes them, changes modes and fsyncs, renames and removes names and fsyncs the directory: every one of these must be there
//! after the crash, byte for byte. Then it makes directories and renames with no fsync or close
//! after them, and the gateway is SIGKILLed at once: those may be lost, but what is kept of them
//! is a prefix of the order they were made in, and `stagefs fsck` finds no file naming data that
//! is not there. Uploads are paused, so every byte read back comes from the recovered device.

use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use stagefs_tests::binaries::client_binary;
use stagefs_tests::{FuseStack, Pattern};

const FILES: u64 = 40;
const EMPTY: u64 = 20;
const LAZY: usize = 30;

fn write_and_close(path: &Path, seed: u64, len: u64) {
    let mut file = File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    Pattern::new(seed)
        .write_to(&mut file, len, 64 * 1024)
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    file.flush().unwrap();
    // close(2)'s result: FUSE flush, which is where durability is promised.
    let fd = std::os::fd::IntoRawFd::into_raw_fd(file);
    nix::unistd::close(fd).unwrap_or_else(|e| panic!("close {}: {e}", path.display()));
}

fn untarred_mtime() -> std::time::SystemTime {
    std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000_000)
}

fn verify(path: &Path, seed: u64, len: u64) {
    let size = fs::metadata(path)
        .unwrap_or_else(|e| panic!("{} is gone after the crash: {e}", path.display()))
        .len();
    assert_eq!(size, len, "{}", path.display());
    let mut file = File::open(path).unwrap();
    Pattern::new(seed)
        .verify(&mut file, len)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

#[test]
fn a_gateway_crash_keeps_what_fsync_and_close_covered_and_a_prefix_of_the_rest() {
    // No timed flush within the test: only fsync and close make namespace changes durable.
    let mut stack = FuseStack::start("semantics", |gateway| {
        gateway
            .meta_in_device()
            .args(["--uploads-paused", "--namespace-sync-within", "1h"])
    });
    let mount = stack.mount("before").start();
    let root = mount.path().to_path_buf();

    // Covered by close: files with data, and empty files (no data to commit: close asks the
    // gateway for a durable commit of its own).
    fs::create_dir(root.join("kept")).unwrap();
    for i in 0..FILES {
        write_and_close(&root.join(format!("kept/f{i:03}")), 100 + i, 1 + i * 7919);
    }
    // Covered by close: mode and times set on a file being written (as tar does), which the
    // mount sends with the data's commit.
    let untarred = File::create(root.join("kept/untarred")).unwrap();
    (&untarred).write_all(b"archived").unwrap();
    untarred
        .set_permissions(fs::Permissions::from_mode(0o640))
        .unwrap();
    untarred.set_modified(untarred_mtime()).unwrap();
    let fd = std::os::fd::IntoRawFd::into_raw_fd(untarred);
    nix::unistd::close(fd).unwrap();
    // Covered by fsync: a mode change on an open file.
    let moded = File::create(root.join("kept/moded")).unwrap();
    moded
        .set_permissions(fs::Permissions::from_mode(0o604))
        .unwrap();
    moded.sync_all().unwrap();
    drop(moded);
    // Covered by fsync of the directory: a rename and an unlink.
    fs::rename(root.join("kept/f000"), root.join("kept/renamed")).unwrap();
    fs::remove_file(root.join("kept/f001")).unwrap();
    File::open(root.join("kept")).unwrap().sync_all().unwrap();
    for i in 0..EMPTY {
        let file = File::create(root.join(format!("kept/empty{i:03}"))).unwrap();
        let fd = std::os::fd::IntoRawFd::into_raw_fd(file);
        nix::unistd::close(fd).unwrap();
    }

    // Not covered by anything: may be lost, but only as a suffix.
    for i in 0..LAZY {
        fs::create_dir(root.join(format!("lazy{i:03}"))).unwrap();
    }
    stack.gateway.kill9().expect("the gateway was running");
    drop(mount);
    stack.runtime.block_on(stack.gateway.restart());

    let mount = stack.mount("after").no_cache().start();
    let root = mount.path().to_path_buf();
    for i in 2..FILES {
        verify(&root.join(format!("kept/f{i:03}")), 100 + i, 1 + i * 7919);
    }
    verify(&root.join("kept/renamed"), 100, 1);
    assert!(
        !root.join("kept/f000").exists() && !root.join("kept/f001").exists(),
        "a rename or unlink fsynced before the crash was undone"
    );
    let untarred = fs::metadata(root.join("kept/untarred")).unwrap();
    assert_eq!(
        (
            untarred.permissions().mode() & 0o777,
            untarred.modified().unwrap(),
            untarred.len()
        ),
        (0o640, untarred_mtime(), 8),
        "mode and mtime set before a close that returned were lost"
    );
    let mode = fs::metadata(root.join("kept/moded"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(
        mode & 0o777,
        0o604,
        "a mode change fsynced before the crash was lost"
    );
    for i in 0..EMPTY {
        let path = root.join(format!("kept/empty{i:03}"));
        assert!(
            path.exists(),
            "{} was created and closed before the crash, and is gone",
            path.display()
        );
    }
    let kept: Vec<bool> = (0..LAZY)
        .map(|i| root.join(format!("lazy{i:03}")).is_dir())
        .collect();
    let prefix = kept.iter().take_while(|k| **k).count();
    assert!(
        kept[prefix..].iter().all(|k| !k),
        "the unsynced directories the crash kept are not a prefix of the order they were made \
         in: {kept:?}"
    );
    eprintln!("the crash kept {prefix} of {LAZY} unsynced directories");

    let output = Command::new(client_binary())
        .args(["fsck", &stack.gateway.addr().to_string(), "--json"])
        .output()
        .expect("run stagefs fsck");
    let fsck: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "stagefs fsck printed no JSON ({e}): {}",
            String::from_utf8_lossy(&output.stderr)
        )
    });
    assert_eq!(fsck["missing_blocks"], 0, "{fsck}");
}
