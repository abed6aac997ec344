//! A shared file system is multi-user: `stagefs mount` run as root mounts with `allow_other`
//! (with `default_permissions`, so the kernel still checks modes), and `--no-allow-other` keeps
//! the mount to its owner; a root mount adds `fuse.stagefs` to updatedb's `PRUNEFS` unless
//! `--no-prune-updatedb`. Another user is played by `setpriv` (util-linux) as uid/gid 65534.
//! Skipped, saying so, when the test does not run as root.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use stagefs_tests::mount::fuse_mount_info;
use stagefs_tests::*;

/// Runs `sh -c SCRIPT` as uid/gid 65534; returns whether it succeeded, and its stderr.
fn as_nobody(script: &str) -> (bool, String) {
    let output = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "sh",
            "-c",
            script,
        ])
        .output()
        .expect("run setpriv (util-linux)");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn root_mounts_are_shared_with_other_users_unless_told_not_to() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: mounting for other users is root's default only; this test runs as a normal user");
        return;
    }
    let stack = FuseStack::start("allow-other", |gateway| gateway);
    // Root's mounts keep updatedb off themselves, unless told not to.
    let updatedb = stack.dir.join("updatedb.conf");
    let untouched = stack.dir.join("untouched.conf");
    for conf in [&updatedb, &untouched] {
        fs::write(conf, "PRUNE_BIND_MOUNTS=\"yes\"\nPRUNEFS=\"NFS nfs4\"\n").unwrap();
    }
    let shared = stack
        .mount("shared")
        .args(["--updatedb-conf", updatedb.to_str().unwrap()])
        .start();
    let private = stack
        .mount("private")
        .args([
            "--no-allow-other",
            "--no-prune-updatedb",
            "--updatedb-conf",
            untouched.to_str().unwrap(),
        ])
        .start();
    assert_eq!(
        fs::read_to_string(&updatedb).unwrap(),
        "PRUNE_BIND_MOUNTS=\"yes\"\nPRUNEFS=\"NFS nfs4 fuse.stagefs\"\n"
    );
    assert!(!fs::read_to_string(&untouched).unwrap().contains("stagefs"));
    let options = |mount: &Mount| fuse_mount_info(mount.path()).expect("mounted");
    assert!(
        options(&shared).contains("allow_other"),
        "{}",
        options(&shared)
    );
    assert!(
        !options(&private).contains("allow_other"),
        "{}",
        options(&private)
    );
    assert!(options(&shared).contains("default_permissions"));

    // The mount point and files belong to root; others may read what the modes allow.
    fs::set_permissions(shared.path(), fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(shared.join("readable"), b"for everyone").unwrap();
    fs::set_permissions(shared.join("readable"), fs::Permissions::from_mode(0o644)).unwrap();
    fs::write(shared.join("secret"), b"root only").unwrap();
    fs::set_permissions(shared.join("secret"), fs::Permissions::from_mode(0o600)).unwrap();

    let path = |name: &str| shared.join(name).display().to_string();
    let (ok, stderr) = as_nobody(&format!("cat {} > /dev/null", path("readable")));
    assert!(ok, "another user reads a 0644 file: {stderr}");
    let (ok, _) = as_nobody(&format!("cat {} > /dev/null", path("secret")));
    assert!(!ok, "another user must not read a 0600 file");
    let (ok, _) = as_nobody(&format!("echo x >> {}", path("readable")));
    assert!(!ok, "another user must not write root's 0644 file");
    let (ok, _) = as_nobody(&format!("touch {}", path("new")));
    assert!(
        !ok,
        "another user must not create files in root's 0755 directory"
    );

    let private_file = private.join("readable").display().to_string();
    let (ok, _) = as_nobody(&format!("ls {} > /dev/null", private_file));
    assert!(
        !ok,
        "a --no-allow-other mount is closed to other users whatever the modes"
    );
    drop(private);
    drop(shared);
}
