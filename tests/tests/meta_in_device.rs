//! The embedded metadata moves with the device (issue 12, item 4): a single gateway without
//! `--meta` keeps its redb database inside the staging device, so the device file alone is the
//! whole state.
//!
//! A gateway formats a new device file with its default metadata region and serves a FUSE mount,
//! which writes files of many sizes (and directories, a rename, a symlink, a deleted file) and
//! closes them. The gateway is SIGKILLed. A new gateway process is started on the same device
//! file from another working directory, and listens on another address; a mount pointed at the
//! new address sees every file that was closed before the kill, byte for byte, and nothing that
//! was deleted. No metadata file exists beside the device (nor anywhere in the scratch
//! directories), and `inspect` shows the region. Uploads stay paused throughout, so every byte
//! read back comes from the device: the log for the data, the region for the metadata.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::Command;

use stagefs_tests::{binaries::gateway_binary, FuseStack, Gateway, Pattern};

const MIB: u64 = 1 << 20;
/// Sizes that cross no block, some blocks, and a chunk's worth of blocks, and odd ends.
const SIZES: [u64; 9] = [
    0,
    1,
    4095,
    4096,
    65_537,
    MIB + 3,
    4 * MIB,
    9 * MIB + 123,
    300_001,
];
/// Small files in one directory: many metadata records for few bytes.
const SMALL_FILES: u64 = 150;

/// A file that must read back: its path under the mount, its pattern seed and length.
struct Expected {
    path: PathBuf,
    seed: u64,
    len: u64,
}

fn write_file(path: &Path, seed: u64, len: u64) {
    let mut file = File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    Pattern::new(seed)
        .write_to(&mut file, len, 256 * 1024)
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    // close(2) with its result: the file counts only if it returned Ok.
    file.sync_all()
        .unwrap_or_else(|e| panic!("fsync {}: {e}", path.display()));
    drop(file);
}

/// Every `*.redb` file under `dir`.
fn redb_files(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let Ok(entries) = fs::read_dir(dir) else {
        return found;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        if kind.is_dir() {
            found.extend(redb_files(&path));
        } else if path.extension().is_some_and(|e| e == "redb") {
            found.push(path);
        }
    }
    found
}

/// `stagefs-gateway inspect --device DEVICE --json`, parsed.
fn inspect(device: &Path) -> serde_json::Value {
    stagefs_tests::json_output(
        Command::new(gateway_binary())
            .args(["inspect", "--device"])
            .arg(device)
            .arg("--json"),
        "stagefs-gateway inspect",
    )
}

#[test]
fn a_new_gateway_elsewhere_on_the_same_device_serves_every_closed_file() {
    let stack = FuseStack::start("meta-in-device", |gateway| {
        gateway.meta_in_device().arg("--uploads-paused")
    });
    let device = stack.gateway.device().to_path_buf();
    let first_addr = stack.gateway.addr();
    assert!(
        stack.gateway.current_log().contains("meta=device:"),
        "the gateway does not say its metadata is in the device; log tail:\n{}",
        stagefs_tests::tail(&stack.gateway.current_log(), 20)
    );
    // By default the gateway wrote zeros through the new device file before formatting it
    // (`--device-fill zeros`): no part of it is left unwritten for the log to convert.
    use std::os::fd::AsRawFd;
    // The first hole `SEEK_HOLE` reports in `file` (its size when none).
    let first_hole = |file: &fs::File| {
        // SAFETY: lseek on a descriptor this test holds.
        unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_HOLE) as u64 }
    };
    // Only where the file system reports what `fallocate` leaves unwritten does the check say
    // anything (tmpfs, for one, reports none).
    let probe_path = device.with_file_name("hole-probe");
    let probe = fs::File::create(&probe_path).unwrap();
    // SAFETY: fallocate on a descriptor this test holds.
    assert_eq!(
        unsafe { libc::fallocate(probe.as_raw_fd(), 0, 0, 1 << 20) },
        0
    );
    if first_hole(&probe) < 1 << 20 {
        let file = fs::File::open(&device).unwrap();
        let size = file.metadata().unwrap().len();
        assert_eq!(
            first_hole(&file),
            size,
            "the new device file has an unwritten part"
        );
    } else {
        eprintln!("not checked: this file system reports no unwritten extents");
    }
    fs::remove_file(&probe_path).unwrap();
    let mut partial = device.file_name().unwrap().to_os_string();
    partial.push(".partial");
    assert!(
        !device.with_file_name(partial).exists(),
        "the partial file the device was made under is left"
    );

    let mount = stack.mount("first").start();
    let root = mount.path().to_path_buf();
    let mut expected = Vec::new();
    fs::create_dir_all(root.join("data/deep/er")).unwrap();
    for (i, len) in SIZES.iter().enumerate() {
        let path = PathBuf::from(format!("data/deep/er/file-{i}"));
        write_file(&root.join(&path), 1000 + i as u64, *len);
        expected.push(Expected {
            path,
            seed: 1000 + i as u64,
            len: *len,
        });
    }
    fs::create_dir(root.join("small")).unwrap();
    for i in 0..SMALL_FILES {
        let path = PathBuf::from(format!("small/s{i:04}"));
        write_file(&root.join(&path), 5000 + i, 100 + i * 37);
        expected.push(Expected {
            path,
            seed: 5000 + i,
            len: 100 + i * 37,
        });
    }
    // Metadata-only changes must survive too: a rename, a symlink, a deletion.
    write_file(&root.join("before-rename"), 42, 70_000);
    fs::rename(root.join("before-rename"), root.join("data/renamed")).unwrap();
    expected.push(Expected {
        path: "data/renamed".into(),
        seed: 42,
        len: 70_000,
    });
    std::os::unix::fs::symlink("deep/er/file-5", root.join("data/link")).unwrap();
    write_file(&root.join("deleted"), 43, 10_000);
    fs::remove_file(root.join("deleted")).unwrap();
    // Namespace changes are durable once a directory is fsynced (README, SEMANTICS): what an
    // application that needs them to survive a crash does, as on a local file system.
    File::open(root.join("data")).unwrap().sync_all().unwrap();

    // A crash of the node: nothing is flushed or shut down.
    let mut stack = stack;
    let status = stack.gateway.kill9().expect("the gateway was running");
    assert!(!status.success(), "SIGKILL must end the gateway: {status}");
    drop(mount);

    let report = inspect(&device);
    let region = &report["meta_region"];
    assert!(
        region["offset"].as_u64().is_some_and(|o| o > 0)
            && region["bytes"].as_u64().is_some_and(|b| b > 0)
            && region["database_bytes"].as_u64().is_some_and(|b| b > 0),
        "inspect shows no used metadata region: {report:#}"
    );
    assert_eq!(report["format_version"], 2, "{report:#}");

    // Another node: another working directory, another address, only the device in common.
    let elsewhere = stack.dir.join("elsewhere");
    fs::create_dir(&elsewhere).unwrap();
    let second = stack.block_on(
        Gateway::builder(&elsewhere, &stack.s3, "uring")
            .device(&device)
            .meta_in_device()
            .working_dir(&elsewhere)
            .arg("--uploads-paused")
            .start(),
    );
    assert_ne!(
        second.addr(),
        first_addr,
        "the new gateway must listen elsewhere"
    );
    assert!(
        second.current_log().contains("meta=device:"),
        "the new gateway does not read its metadata from the device; log tail:\n{}",
        stagefs_tests::tail(&second.current_log(), 20)
    );

    let mount = stack.mount_at(second.addr(), "second").start();
    let root = mount.path().to_path_buf();
    for file in &expected {
        let path = root.join(&file.path);
        let meta = fs::metadata(&path).unwrap_or_else(|e| {
            panic!(
                "{} was closed before the kill but is gone: {e}",
                file.path.display()
            )
        });
        assert_eq!(meta.len(), file.len, "{}", file.path.display());
        let mut reader = File::open(&path).unwrap();
        Pattern::new(file.seed)
            .verify(&mut reader, file.len)
            .unwrap_or_else(|e| panic!("{}: {e}", file.path.display()));
    }
    let mut small: Vec<String> = fs::read_dir(root.join("small"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    small.sort();
    assert_eq!(
        small,
        (0..SMALL_FILES)
            .map(|i| format!("s{i:04}"))
            .collect::<Vec<_>>()
    );
    assert_eq!(
        fs::read_link(root.join("data/link")).unwrap(),
        PathBuf::from("deep/er/file-5")
    );
    assert!(!root.join("before-rename").exists());
    assert!(!root.join("deleted").exists());

    // The device was the whole state: no metadata file beside it, nor anywhere else.
    let mut beside = device.clone().into_os_string();
    beside.push(".meta.redb");
    assert!(
        !Path::new(&beside).exists(),
        "{} exists",
        Path::new(&beside).display()
    );
    let stray = redb_files(stack.dir.path());
    assert!(
        stray.is_empty(),
        "metadata files outside the device: {stray:?}"
    );
    eprintln!(
        "[meta_in_device] {} files read back from a new gateway at {} (was {first_addr}); region \
         at offset {} of {} bytes, database {} bytes",
        expected.len(),
        second.addr(),
        region["offset"],
        region["bytes"],
        region["database_bytes"]
    );
    mount.unmount();
    drop(second);
}
