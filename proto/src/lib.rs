//! The gRPC contract between stagefs clients and gateways.
//!
//! Generated from `proto/*.proto` at build time; see `build.rs`.

/// The gateway's staging service (`stagefs.staging.v1`).
pub mod staging {
    tonic::include_proto!("stagefs.staging.v1");
}

/// The metadata service (`stagefs.meta.v1`), hosted by the gateway.
pub mod meta {
    tonic::include_proto!("stagefs.meta.v1");
}

/// Wire form of the shared file-system types, both ways.
pub mod meta_convert;

/// Response metadata key carrying the Linux errno of a failed `Meta` RPC.
pub const ERRNO_METADATA_KEY: &str = "stagefs-errno";

/// Largest gRPC message either side accepts: one 4 MiB block plus framing.
pub const MAX_MESSAGE_BYTES: usize = 8 * 1024 * 1024;

/// HTTP/2 flow-control windows for both sides: a whole block may be in flight per stream.
pub const STREAM_WINDOW_BYTES: u32 = 8 * 1024 * 1024;
pub const CONNECTION_WINDOW_BYTES: u32 = 64 * 1024 * 1024;

/// HTTP/2 DATA frame size both sides accept (the protocol default is 16 KiB).
pub const MAX_FRAME_BYTES: u32 = 1024 * 1024;

/// Request metadata key by which a client says it can write blocks through to the object store
/// itself (`WriteBlock`, `WriteBlocks`, `WriteSlice`); value `1`.
pub const WRITE_THROUGH_HEADER: &str = "stagefs-write-through";

/// Start of the message of a `FAILED_PRECONDITION` that tells such a client to write a block
/// through: the gateway's device is above its high-water mark. The client PUTs the block to the
/// store and commits its slice as usual.
pub const WRITE_THROUGH_PREFIX: &str = "write through: ";
