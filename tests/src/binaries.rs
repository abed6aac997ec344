//! Where the binaries under test are: the workspace's target directory and `s3s-fs`.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// The workspace root (the parent of this crate's directory).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives inside the workspace")
        .to_path_buf()
}

/// `$CARGO_TARGET_DIR` (relative paths are taken from the workspace root) or `<workspace>/target`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                workspace_root().join(dir)
            }
        }
        _ => workspace_root().join("target"),
    }
}

/// A binary of this workspace (`stagefs-gateway`, `stagefs`): `$STAGEFS_BIN_DIR/<name>` when that
/// variable is set (`scripts/test.sh` sets it to the profile it just built), else the newest of
/// `<target>/debug/<name>` and `<target>/release/<name>`.
///
/// Panics when it does not exist: `cargo test` does not build other crates' binaries.
pub fn binary(name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("STAGEFS_BIN_DIR").filter(|d| !d.is_empty()) {
        let path = PathBuf::from(dir).join(name);
        assert!(
            path.is_file(),
            "binary `{name}` not found at {} ($STAGEFS_BIN_DIR): run `cargo build --bins` first",
            path.display()
        );
        return path;
    }
    let target = target_dir();
    let newest = ["debug", "release"]
        .iter()
        .map(|profile| target.join(profile).join(name))
        .filter_map(|path| {
            let modified = std::fs::metadata(&path)
                .ok()?
                .modified()
                .unwrap_or(SystemTime::UNIX_EPOCH);
            Some((modified, path))
        })
        .max_by_key(|(modified, _)| *modified);
    match newest {
        Some((_, path)) => path,
        None => panic!(
            "binary `{name}` not found in {}/{{debug,release}}: run `cargo build --bins` first \
             (scripts/test.sh does)",
            target.display()
        ),
    }
}

/// The gateway binary, `stagefs-gateway`.
pub fn gateway_binary() -> PathBuf {
    binary("stagefs-gateway")
}

/// The client binary, `stagefs`.
pub fn client_binary() -> PathBuf {
    binary("stagefs")
}

/// The `s3s-fs` S3 server (`harness::programs::s3s_fs`).
pub fn s3s_fs_binary() -> PathBuf {
    harness::programs::s3s_fs(None).unwrap_or_else(|e| panic!("{e}"))
}
