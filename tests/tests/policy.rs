//! Per-path write policy: `stagefs policy set DIR through` makes every file made below DIR, at
//! any depth and on any mount, be in the object store when its `close` returns (uploads are
//! held here, so nothing else puts it there); files elsewhere stay staged. The policy lives in
//! the metadata, so a second mount that never saw the `set` follows it.

use std::fs;
use std::path::Path;
use std::process::Command;

use stagefs_tests::binaries::client_binary;
use stagefs_tests::*;

fn policy(args: &[&std::ffi::OsStr]) -> String {
    let output = Command::new(client_binary())
        .arg("policy")
        .args(args)
        .output()
        .expect("run stagefs policy");
    assert!(
        output.status.success(),
        "stagefs policy {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

fn get(path: &Path) -> String {
    policy(&["get".as_ref(), path.as_os_str()])
}

#[test]
fn a_through_policy_puts_files_in_the_store_before_close_returns_on_any_mount() {
    let stack = FuseStack::start("policy", |gateway| gateway.arg("--uploads-paused"));
    let a = stack.mount("a").start();
    fs::create_dir_all(a.join("ckpt/old")).unwrap();
    fs::create_dir_all(a.join("other")).unwrap();
    policy(&[
        "set".as_ref(),
        a.join("ckpt").as_os_str(),
        "through".as_ref(),
    ]);
    assert_eq!(get(&a.join("ckpt")), "through");
    assert_eq!(
        get(&a.join("ckpt/old")),
        "through",
        "set reaches existing directories"
    );
    assert!(get(&a.join("other")).starts_with("inherit"));

    // Another mount, which never saw the `set`.
    let b = stack.mount("b").start();
    let files = [
        ("ckpt/f1", 5 * 1024 * 1024 + 3, true),
        ("ckpt/old/small", 1000, true),
        ("other/f4", 3 * 1024 * 1024, false),
    ];
    let mut through = 0u64;
    for (i, (name, len, in_store)) in files.iter().enumerate() {
        fs::write(b.join(name), Pattern::new(i as u64).bytes(0, *len)).unwrap();
        if *in_store {
            through += *len as u64;
        }
        assert_eq!(
            stack.stored_bytes(),
            through,
            "after closing {name}, the store must hold exactly the files below ckpt"
        );
    }
    // A directory made after the `set` takes the policy, and so does a file in it.
    fs::create_dir(b.join("ckpt/new")).unwrap();
    assert_eq!(get(&b.join("ckpt/new")), "through");
    let deep = Pattern::new(7).bytes(0, 2 * 1024 * 1024);
    fs::write(b.join("ckpt/new/f3"), &deep).unwrap();
    through += deep.len() as u64;
    assert_eq!(stack.stored_bytes(), through);
    assert_eq!(get(&b.join("ckpt/new/f3")), "through");

    // Every file reads back on the first mount.
    for (i, (name, len, _)) in files.iter().enumerate() {
        assert_file_bytes(&a.join(name), &Pattern::new(i as u64).bytes(0, *len));
    }
    assert_file_bytes(&a.join("ckpt/new/f3"), &deep);

    // Back to staging: what is made from now on stays on the device.
    policy(&[
        "set".as_ref(),
        a.join("ckpt").as_os_str(),
        "gateway".as_ref(),
    ]);
    assert_eq!(get(&a.join("ckpt/new")), "gateway");
    fs::write(a.join("ckpt/staged"), Pattern::new(9).bytes(0, 1_000_000)).unwrap();
    assert_eq!(stack.stored_bytes(), through);
    policy(&[
        "set".as_ref(),
        a.join("ckpt").as_os_str(),
        "inherit".as_ref(),
    ]);
    assert!(get(&a.join("ckpt")).starts_with("inherit"));
}

#[test]
fn blocks_past_the_direct_threshold_go_straight_to_the_store() {
    let stack = FuseStack::start("direct-threshold", |gateway| {
        gateway.args(["--uploads-paused", "--direct-threshold", "8MiB"])
    });
    let m = stack.mount("m").start();
    let small = Pattern::new(1).bytes(0, 100_000);
    fs::write(m.join("small"), &small).unwrap();
    assert_eq!(
        stack.stored_bytes(),
        0,
        "a file below the threshold is staged"
    );
    let big = Pattern::new(2).bytes(0, 20 * 1024 * 1024 + 5);
    // Written by a child process, not from this one: a process the other test forks while this
    // file is open here inherits the descriptor, and closing it at exec makes the kernel send a
    // FLUSH, which commits what is written so far and starts a new slice mid-file (its blocks
    // then start off the 4 MiB grid, and the count below would shift by a block).
    let source = stack.dir.join("big.source");
    fs::write(&source, &big).unwrap();
    let copied = Command::new("cp")
        .arg(&source)
        .arg(m.join("big"))
        .status()
        .expect("run cp");
    assert!(copied.success(), "cp into the mount: {copied}");
    assert_eq!(
        stack.stored_bytes(),
        (big.len() - 8 * 1024 * 1024) as u64,
        "exactly the blocks past 8 MiB go to the store (uploads are held)"
    );
    let other = stack.mount("other").start();
    assert_file_bytes(&other.join("big"), &big);
    assert_file_bytes(&other.join("small"), &small);
}
