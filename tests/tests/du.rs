//! `stagefs du` through a real mount: bytes, files and directories below a path, as the
//! metadata's directory statistics keep them, right after writes, renames across directories,
//! hard links, truncation and deletes made on another mount.

use std::fs;
use std::process::Command;

use stagefs_tests::binaries::client_binary;
use stagefs_tests::*;

/// `stagefs du PATH --json`: (bytes, files, dirs).
fn du(path: &std::path::Path) -> (u64, u64, u64) {
    let value = json_output(
        Command::new(client_binary())
            .arg("du")
            .arg(path)
            .arg("--json"),
        "stagefs du",
    );
    let row = &value[0];
    (
        row["bytes"].as_u64().unwrap(),
        row["files"].as_u64().unwrap(),
        row["dirs"].as_u64().unwrap(),
    )
}

#[test]
fn du_follows_writes_renames_links_and_deletes() {
    let stack = FuseStack::start("du", |gateway| gateway);
    let writer = stack.mount("writer").start();
    let other = stack.mount("other").start();

    let data = writer.join("data");
    fs::create_dir_all(data.join("a/deep/er")).unwrap();
    fs::create_dir_all(data.join("b")).unwrap();
    fs::write(data.join("a/one"), vec![1u8; 1000]).unwrap();
    fs::write(data.join("a/deep/er/two"), vec![2u8; 5 << 20]).unwrap();
    fs::write(data.join("b/three"), b"333").unwrap();
    std::os::unix::fs::symlink("one", data.join("a/link")).unwrap();
    let total = 1000 + (5 << 20) + 3;
    // Seen from the other mount: the statistics live in the metadata, not in a mount.
    let seen = other.join("data");
    assert_eq!(du(&seen), (total, 4, 4));
    assert_eq!(du(&seen.join("a")), (1000 + (5 << 20), 3, 2));
    assert_eq!(
        du(&seen.join("a/deep/er/two")),
        (5 << 20, 1, 0),
        "a file: itself"
    );

    // A rename across directories moves what it counts for.
    fs::rename(data.join("a/deep/er/two"), data.join("b/two")).unwrap();
    assert_eq!(du(&seen.join("a")), (1000, 2, 2));
    assert_eq!(du(&seen.join("b")), ((5 << 20) + 3, 2, 0));
    // A directory moves with everything below it.
    fs::rename(data.join("a/deep"), data.join("b/deep")).unwrap();
    assert_eq!(du(&seen.join("b")), ((5 << 20) + 3, 2, 2));

    // A hard link counts once; truncation and appends count at once.
    fs::hard_link(data.join("b/three"), data.join("a/three")).unwrap();
    assert_eq!(du(&seen), (total, 4, 4));
    fs::OpenOptions::new()
        .write(true)
        .open(data.join("b/two"))
        .unwrap()
        .set_len(10)
        .unwrap();
    assert_eq!(du(&seen), (1000 + 10 + 3, 4, 4));

    // Deletes.
    fs::remove_file(data.join("a/link")).unwrap();
    fs::remove_dir(data.join("b/deep/er")).unwrap();
    assert_eq!(du(&seen), (1000 + 10 + 3, 3, 3));
    fs::remove_dir_all(data.join("b")).unwrap();
    assert_eq!(
        du(&seen),
        (1000 + 3, 2, 1),
        "a/three still names the linked file"
    );
    assert_eq!(du(other.path()), (1000 + 3, 2, 2));
}
