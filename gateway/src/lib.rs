//! The stagefs gateway: owns a block device as a shared staging area for many clients.
//!
//! Layers, from the bottom: [`io`] (the `IoEngine` trait and its io_uring and psync backends over
//! an `O_DIRECT` [`device`]), [`format`] (on-device structures), [`recovery`] (the start-up scan),
//! [`staging`] (the log: group commit, index, reclaim, upload bookkeeping), [`drain`] (upload
//! workers), [`volume`] (open, format, recover), [`node`] (the gateway core: what spans the log
//! and the metadata, and the background workers) and the gRPC adapters over it, [`service`] and
//! [`meta_service`]. Every background task runs under [`tasks`].

pub mod access;
pub mod aligned;
pub mod change_tags;
pub mod confine;
pub mod device;
pub mod drain;
#[cfg(test)]
mod faulty_store;
pub mod format;
pub mod gc;
pub mod high_water;
pub mod inspect;
pub mod io;
pub mod limits;
pub mod log_positions;
/// The metadata engine, a crate of its own (`gateway/meta`).
pub use ::meta;
pub mod meta_rate;
pub mod meta_service;
pub mod mirror;
pub mod node;
pub mod recovery;
pub mod service;
pub mod staging;
pub mod store_check;
pub mod tasks;
pub mod telemetry;
pub mod volume;
