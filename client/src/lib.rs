//! The stagefs client: the `stagefs` command's building blocks.
//!
//! Today this holds the benchmarks ([`bench`]); the FUSE mount, `status` and `sync` will live
//! next to it. `main.rs` is only the command-line shell over these modules.

pub mod admin;
pub mod bench;
pub mod fs;
pub mod fuse;
pub mod mount;
