//! The gRPC contract between stagefs clients and gateways.
//!
//! Generated from `proto/*.proto` at build time; see `build.rs`.

/// The gateway's staging service (`stagefs.staging.v1`).
pub mod staging {
    tonic::include_proto!("stagefs.staging.v1");
}

/// Largest gRPC message either side accepts: one 4 MiB block plus framing.
pub const MAX_MESSAGE_BYTES: usize = 8 * 1024 * 1024;
