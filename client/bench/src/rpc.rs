//! Thin helpers over the gateway's `Staging` gRPC service, as the benchmark uses it.
//!
//! Clients set the message size limits to [`proto::MAX_MESSAGE_BYTES`]. A block is sent as a
//! header frame and then ~1 MiB data frames that are `Bytes` slices of one shared buffer, so
//! writing a block copies nothing on the client side.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use client::fs::{GatewayAccess, GatewayChannel};
use proto::staging::staging_client::StagingClient;
use proto::staging::{
    write_block_request, BlockHeader, DeleteBlocksRequest, DrainRequest, SetUploadsPausedRequest,
    StatusRequest, StatusResponse, WriteBlockRequest, WriteBlocksRequest, WriteBlocksResponse,
};
use rand::RngCore;
use shared::BlockKey;

use super::BenchError;

/// A gRPC client of one gateway; cloning shares the underlying connection.
pub type Client = StagingClient<GatewayChannel>;

/// Size of the data frames a block is cut into.
pub const FRAME_BYTES: usize = 1024 * 1024;
/// Deadline of one `WriteBlock` (a full device makes writers wait; this bounds a hung gateway).
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(120);
/// Keys per `DeleteBlocks` request.
const DELETE_BATCH: usize = 4096;

/// Opens a new HTTP/2 connection to the gateway (built where every client connection is),
/// presenting `access`.
pub async fn connect(addr: SocketAddr, access: &GatewayAccess) -> Result<Client, BenchError> {
    let channel = client::fs::connect_gateway(&addr.to_string(), access)
        .await
        .map_err(|source| BenchError::Connect {
            addr: addr.to_string(),
            source,
        })?;
    Ok(client::fs::staging_client(channel))
}

/// The bytes of a benchmark block and their crc32c, shared by every block of a phase.
#[derive(Clone)]
pub struct Payload {
    pub data: Bytes,
    pub crc32c: u32,
}

impl Payload {
    /// `len` random bytes (random so nothing on the way can compress or deduplicate them).
    pub fn random(len: usize) -> Self {
        let mut data = vec![0u8; len];
        rand::rng().fill_bytes(&mut data);
        let crc32c = crc32c::crc32c(&data);
        Payload {
            data: Bytes::from(data),
            crc32c,
        }
    }

    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

/// Streams one block to the gateway; returns once the gateway acknowledged it as durable.
pub async fn write_block(
    client: &mut Client,
    key: &BlockKey,
    payload: &Payload,
) -> Result<u64, BenchError> {
    let mut frames = Vec::with_capacity(1 + payload.len().div_ceil(FRAME_BYTES));
    frames.push(WriteBlockRequest {
        frame: Some(write_block_request::Frame::Header(BlockHeader {
            key: key.to_string(),
            total_len: payload.len() as u64,
            crc32c: payload.crc32c,
            // No session: the benchmark's token is an admin's (or the gateway is open).
            session_id: Default::default(),
        })),
    });
    let mut offset = 0;
    while offset < payload.len() {
        let end = (offset + FRAME_BYTES).min(payload.len());
        frames.push(WriteBlockRequest {
            frame: Some(write_block_request::Frame::Data(
                payload.data.slice(offset..end),
            )),
        });
        offset = end;
    }
    let mut request = tonic::Request::new(tokio_stream::iter(frames));
    request.set_timeout(WRITE_TIMEOUT);
    let response = client
        .write_block(request)
        .await
        .map_err(|status| BenchError::rpc("WriteBlock", status))?;
    Ok(response.into_inner().sequence)
}

/// A `WriteBlocks` stream: many blocks over one RPC, one acknowledgement each.
pub struct BlockStream {
    requests: tokio::sync::mpsc::Sender<WriteBlocksRequest>,
    responses: tonic::Streaming<WriteBlocksResponse>,
    next_id: u64,
}

impl BlockStream {
    pub async fn open(client: &mut Client) -> Result<Self, BenchError> {
        let (requests, rx) = tokio::sync::mpsc::channel(16);
        let responses = client
            .write_blocks(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .map_err(|status| BenchError::rpc("WriteBlocks", status))?
            .into_inner();
        Ok(BlockStream {
            requests,
            responses,
            next_id: 0,
        })
    }

    /// Sends one whole block and waits for its acknowledgement (durable on the device).
    pub async fn write(&mut self, key: &BlockKey, payload: &Payload) -> Result<u64, BenchError> {
        self.next_id += 1;
        let request = WriteBlocksRequest {
            request_id: self.next_id,
            header: Some(BlockHeader {
                key: key.to_string(),
                total_len: payload.len() as u64,
                crc32c: payload.crc32c,
                session_id: Default::default(),
            }),
            data: payload.data.clone(),
        };
        let closed = || {
            BenchError::rpc(
                "WriteBlocks",
                tonic::Status::unavailable("stream closed by the gateway"),
            )
        };
        self.requests.send(request).await.map_err(|_| closed())?;
        let response = self
            .responses
            .message()
            .await
            .map_err(|status| BenchError::rpc("WriteBlocks", status))?
            .ok_or_else(closed)?;
        if response.request_id != self.next_id {
            return Err(BenchError::rpc(
                "WriteBlocks",
                tonic::Status::internal(format!(
                    "acknowledgement for request {} while waiting for {}",
                    response.request_id, self.next_id
                )),
            ));
        }
        if response.code != 0 {
            return Err(BenchError::rpc(
                "WriteBlocks",
                tonic::Status::new(response.code.into(), response.message),
            ));
        }
        Ok(response.sequence)
    }
}

/// Drops staged blocks so the staging log can reclaim their space. Returns how many were dropped.
pub async fn delete_blocks(client: &mut Client, keys: &[String]) -> Result<u64, BenchError> {
    let mut dropped = 0;
    for batch in keys.chunks(DELETE_BATCH) {
        let response = client
            .delete_blocks(DeleteBlocksRequest {
                keys: batch.to_vec(),
            })
            .await
            .map_err(|status| BenchError::rpc("DeleteBlocks", status))?;
        dropped += response.into_inner().dropped;
    }
    Ok(dropped)
}

pub async fn status(client: &mut Client) -> Result<StatusResponse, BenchError> {
    let mut request = tonic::Request::new(StatusRequest {});
    request.set_timeout(Duration::from_secs(30));
    Ok(client
        .status(request)
        .await
        .map_err(|status| BenchError::rpc("Status", status))?
        .into_inner())
}

pub async fn set_uploads_paused(client: &mut Client, paused: bool) -> Result<(), BenchError> {
    client
        .set_uploads_paused(SetUploadsPausedRequest { paused })
        .await
        .map_err(|status| BenchError::rpc("SetUploadsPaused", status))?;
    Ok(())
}

/// Waits until nothing waits for upload; `timeout` bounds both the gateway's wait and the RPC.
pub async fn drain(client: &mut Client, timeout: Duration) -> Result<StatusResponse, BenchError> {
    let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
    let mut request = tonic::Request::new(DrainRequest {
        timeout_ms,
        ..Default::default()
    });
    request.set_timeout(timeout + Duration::from_secs(10));
    let response = client
        .drain(request)
        .await
        .map_err(|status| BenchError::rpc("Drain", status))?
        .into_inner();
    response
        .status
        .ok_or_else(|| BenchError::Gateway("Drain answered without a status".into()))
}

/// States of `keys` as the gateway reports them.
pub async fn stat_blocks(
    client: &mut Client,
    keys: &[String],
) -> Result<Vec<proto::staging::BlockStat>, BenchError> {
    let mut stats = Vec::with_capacity(keys.len());
    for batch in keys.chunks(DELETE_BATCH) {
        let response = client
            .stat_blocks(proto::staging::StatBlocksRequest {
                keys: batch.to_vec(),
                ..Default::default()
            })
            .await
            .map_err(|status| BenchError::rpc("StatBlocks", status))?;
        stats.extend(response.into_inner().blocks);
    }
    Ok(stats)
}
