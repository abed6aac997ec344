//! `stagefs policy set|get PATH`: the write policy of a directory tree, kept in the metadata as
//! the extended attribute `user.stagefs.write_policy` and taken by every file and directory made
//! below it (the engine copies it at creation). `through`: a file's blocks go to the object
//! store before its `close` returns, on any mount; `gateway`: staged (the default);
//! `inherit`: the attribute is removed, so what is made later takes nothing.
//!
//! `set` goes through the mount like `setfattr`, on PATH and on every directory below it, so
//! files made at any depth take the policy; files that exist keep theirs.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use anyhow::Context;
use shared::meta::WRITE_POLICY_XATTR;

/// What `policy set` can say.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Policy {
    /// Blocks go to the object store before `close` returns.
    Through,
    /// Blocks are staged on a gateway and uploaded in the background.
    Gateway,
    /// No policy of its own: what is made below takes none (staged).
    Inherit,
}

fn c_path(path: &Path) -> anyhow::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .with_context(|| format!("{} holds a NUL byte", path.display()))
}

fn c_name() -> CString {
    CString::new(WRITE_POLICY_XATTR).expect("the attribute name has no NUL")
}

/// Sets (or removes, for `inherit`) the policy of one path.
fn apply(path: &Path, policy: Policy) -> anyhow::Result<()> {
    let (path_c, name) = (c_path(path)?, c_name());
    // SAFETY: both strings are NUL-terminated and live across the call; the value is a byte
    // slice with its length.
    let result = unsafe {
        match policy {
            Policy::Inherit => libc::lremovexattr(path_c.as_ptr(), name.as_ptr()),
            Policy::Through | Policy::Gateway => {
                let value: &[u8] = if policy == Policy::Through {
                    b"through"
                } else {
                    b"gateway"
                };
                libc::lsetxattr(
                    path_c.as_ptr(),
                    name.as_ptr(),
                    value.as_ptr().cast(),
                    value.len(),
                    0,
                )
            }
        }
    };
    if result != 0 {
        let error = std::io::Error::last_os_error();
        if policy == Policy::Inherit && error.raw_os_error() == Some(libc::ENODATA) {
            return Ok(());
        }
        return Err(error).with_context(|| {
            format!(
                "cannot set the write policy of {} (is it inside a stagefs mount?)",
                path.display()
            )
        });
    }
    Ok(())
}

/// `stagefs policy set PATH POLICY`: on PATH and every directory below it.
pub fn set(path: &Path, policy: Policy) -> anyhow::Result<()> {
    let mut directories = 0u64;
    let mut pending = vec![path.to_path_buf()];
    while let Some(dir) = pending.pop() {
        apply(&dir, policy)?;
        directories += 1;
        let meta = std::fs::symlink_metadata(&dir)
            .with_context(|| format!("cannot stat {}", dir.display()))?;
        if !meta.is_dir() {
            continue;
        }
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("cannot list {}", dir.display()))?
        {
            let entry = entry?;
            if entry.file_type()?.is_dir() {
                pending.push(entry.path());
            }
        }
    }
    eprintln!(
        "{}: write policy {} on {directories} {}; files made below it from now on take it",
        path.display(),
        match policy {
            Policy::Through => "through",
            Policy::Gateway => "gateway",
            Policy::Inherit => "removed",
        },
        if directories == 1 {
            "path"
        } else {
            "directories"
        }
    );
    Ok(())
}

/// `stagefs policy get PATH`: prints `through`, `gateway`, or `inherit` (none of its own).
pub fn get(path: &Path) -> anyhow::Result<()> {
    let (path_c, name) = (c_path(path)?, c_name());
    let mut value = [0u8; 64];
    // SAFETY: the buffer outlives the call and its length is passed.
    let len = unsafe {
        libc::lgetxattr(
            path_c.as_ptr(),
            name.as_ptr(),
            value.as_mut_ptr().cast(),
            value.len(),
        )
    };
    if len < 0 {
        let error = std::io::Error::last_os_error();
        if error.raw_os_error() == Some(libc::ENODATA) {
            println!("inherit (none of its own: staged)");
            return Ok(());
        }
        return Err(error).with_context(|| {
            format!(
                "cannot read the write policy of {} (is it inside a stagefs mount?)",
                path.display()
            )
        });
    }
    println!("{}", String::from_utf8_lossy(&value[..len as usize]));
    Ok(())
}
