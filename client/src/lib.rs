//! The stagefs client: the `stagefs` command's building blocks.
//!
//! The async file-system core ([`fs`]), the thin FUSE adapter over it ([`fuse`]), the mount
//! ([`mount`]), the admin commands ([`admin`]: `status`, `sync`, `uploads`, `gc`, `fsck`) and
//! write policies ([`policy`]). The benchmarks
//! are a crate of their own (`client/bench`). `main.rs` is only the command-line shell.

pub mod admin;
pub mod cli;
pub mod fs;
pub mod fuse;
pub mod mount;
pub mod policy;
pub mod updatedb;
