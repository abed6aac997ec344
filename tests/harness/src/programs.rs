//! Where the programs are: `stagefs-gateway`, `stagefs`, `s3s-fs`.

use std::path::{Path, PathBuf};

/// Finds a program: `explicit` if given (it must be a file), else in `$STAGEFS_BIN_DIR` (the
/// tests' build profile), next to the running executable, on `PATH`, in `$CARGO_HOME/bin` or
/// `~/.cargo/bin` (where `scripts/setup.sh` installs `s3s-fs`). The error names where it looked
/// and ends with `hint`.
pub fn find_program(name: &str, explicit: Option<&Path>, hint: &str) -> Result<PathBuf, String> {
    if let Some(path) = explicit {
        return if path.is_file() {
            Ok(path.to_path_buf())
        } else {
            Err(format!("{} is not a file", path.display()))
        };
    }
    let bin_dir = std::env::var_os("STAGEFS_BIN_DIR")
        .filter(|dir| !dir.is_empty())
        .map(PathBuf::from);
    let beside_exe = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf));
    let on_path: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).collect())
        .unwrap_or_default();
    let cargo_bin = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo")))
        .map(|home| home.join("bin"));
    bin_dir
        .into_iter()
        .chain(beside_exe)
        .chain(on_path)
        .chain(cargo_bin)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| {
            format!(
                "{name} is neither in $STAGEFS_BIN_DIR, nor next to this executable, nor on \
                 PATH, nor in ~/.cargo/bin; {hint}"
            )
        })
}

/// The `s3s-fs` S3 server.
pub fn s3s_fs(explicit: Option<&Path>) -> Result<PathBuf, String> {
    find_program("s3s-fs", explicit, "run scripts/setup.sh first")
}
