//! [`BlockApi`] over the gateway's `Staging` gRPC service.
//!
//! Writes go over one long-lived `WriteBlocks` stream: each block is one message with a request
//! id of our choosing, and the gateway acknowledges each once it is durable, in whatever order
//! its group commits finish. A reader task routes every acknowledgement to the writer waiting
//! for that id. When the stream breaks (gateway restart, connection loss), every waiting writer
//! is failed, the next write opens a new stream, and a write whose acknowledgement was lost is
//! sent again: blocks are immutable, so a repeat is harmless.
//!
//! Reads are unary `ReadBlock` calls; `NOT_FOUND` means the gateway no longer holds the block.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::channel::GatewayChannel;
use async_trait::async_trait;
use bytes::Bytes;
use proto::staging::staging_client::StagingClient;
use proto::staging::{BlockHeader, ReadBlockRequest, WriteBlocksRequest, WriteBlocksResponse};
use shared::meta::SessionId;
use shared::BlockKey;
use tokio::sync::{mpsc, oneshot};
use tonic::Code;

use super::block_api::{BlockApi, BlockHome};
use super::error::{FsError, FsResult};
use super::meta_api::GatewayId;

/// How long one block may wait for its acknowledgement. A full device makes the gateway hold
/// writers for its `--full-wait` (30 s by default) before answering, so this is well above it.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(120);
/// Deadline of one `ReadBlock`.
pub const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// Attempts of one block write when the stream breaks or the gateway is briefly unavailable.
const WRITE_ATTEMPTS: u32 = 5;
/// Pause before the first retry; doubles with each attempt.
const FIRST_RETRY_DELAY: Duration = Duration::from_millis(100);
/// Requests queued for the stream before writers wait (each holds at most one block).
const STREAM_QUEUE: usize = 16;

/// One gateway's `Staging` service.
pub struct GrpcBlocks {
    client: StagingClient<GatewayChannel>,
    /// The current `WriteBlocks` stream; replaced when it breaks.
    stream: tokio::sync::Mutex<Option<Arc<AckStream>>>,
    next_request_id: AtomicU64,
    write_timeout: Duration,
}

/// One open `WriteBlocks` stream and the writers waiting on it.
struct AckStream {
    requests: mpsc::Sender<WriteBlocksRequest>,
    waiting: Mutex<Waiting>,
}

#[derive(Default)]
struct Waiting {
    /// Set (with the reason) once the stream is over; nobody may wait on it after that.
    closed: Option<String>,
    acks: HashMap<u64, oneshot::Sender<FsResult<()>>>,
}

impl AckStream {
    fn lock(&self) -> std::sync::MutexGuard<'_, Waiting> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn is_closed(&self) -> bool {
        self.lock().closed.is_some()
    }

    /// Ends the stream for every writer still waiting on it.
    fn close(&self, reason: String) {
        let mut waiting = self.lock();
        for (_, ack) in waiting.acks.drain() {
            let _ = ack.send(Err(FsError::GatewayUnavailable {
                key: String::new(),
                message: reason.clone(),
            }));
        }
        waiting.closed.get_or_insert(reason);
    }
}

/// How one attempt at writing a block ended.
enum Attempt {
    Done,
    /// Worth another attempt (on a new stream if this one broke).
    Retry(FsError),
    Failed(FsError),
}

impl GrpcBlocks {
    /// The gateway's id, and whether it keeps a read cache (`--read-cache`), from its Status;
    /// `None` when it does not answer.
    pub async fn identity(&self) -> Option<(GatewayId, bool)> {
        let mut request = tonic::Request::new(proto::staging::StatusRequest {});
        request.set_timeout(READ_TIMEOUT);
        let status = match self.client.clone().status(request).await {
            Ok(answer) => answer.into_inner(),
            Err(status) => {
                tracing::debug!(%status, "cannot ask the gateway whether it keeps a read cache");
                return None;
            }
        };
        let id = uuid::Uuid::parse_str(&status.gateway_id).ok()?;
        Some((*id.as_bytes(), status.read_cache_bytes > 0))
    }

    pub fn new(channel: GatewayChannel) -> Self {
        GrpcBlocks {
            client: super::channel::staging_client(channel),
            stream: tokio::sync::Mutex::new(None),
            next_request_id: AtomicU64::new(1),
            write_timeout: WRITE_TIMEOUT,
        }
    }

    /// Changes how long one block waits for its acknowledgement.
    pub fn with_write_timeout(mut self, timeout: Duration) -> Self {
        self.write_timeout = timeout;
        self
    }

    /// The open stream, or a new one if there is none or it broke.
    async fn stream(&self, key: &BlockKey) -> FsResult<Arc<AckStream>> {
        let mut current = self.stream.lock().await;
        if let Some(stream) = current.as_ref() {
            if !stream.is_closed() {
                return Ok(stream.clone());
            }
        }
        let (requests, queued) = mpsc::channel(STREAM_QUEUE);
        let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(queued));
        // This client can PUT a block to the store itself when the gateway's device is above
        // its high-water mark (the write path does so on the answer that says so).
        request.metadata_mut().insert(
            proto::WRITE_THROUGH_HEADER,
            tonic::metadata::MetadataValue::from_static("1"),
        );
        let responses = self
            .client
            .clone()
            .write_blocks(request)
            .await
            .map_err(|status| FsError::GatewayUnavailable {
                key: key.to_string(),
                message: format!("opening WriteBlocks: {status}"),
            })?
            .into_inner();
        let stream = Arc::new(AckStream {
            requests,
            waiting: Mutex::new(Waiting::default()),
        });
        tokio::spawn(route_acks(stream.clone(), responses));
        *current = Some(stream.clone());
        Ok(stream)
    }

    async fn attempt(
        &self,
        session: SessionId,
        key: &BlockKey,
        data: &Bytes,
        crc32c: u32,
    ) -> Attempt {
        let stream = match self.stream(key).await {
            Ok(stream) => stream,
            Err(e) => return Attempt::Retry(e),
        };
        let request_id = self.next_request_id.fetch_add(1, Ordering::Relaxed);
        let (ack, acked) = oneshot::channel();
        {
            let mut waiting = stream.lock();
            if waiting.closed.is_some() {
                return Attempt::Retry(FsError::GatewayUnavailable {
                    key: key.to_string(),
                    message: "stream closed".into(),
                });
            }
            waiting.acks.insert(request_id, ack);
        }
        let request = WriteBlocksRequest {
            request_id,
            header: Some(BlockHeader {
                key: key.to_string(),
                total_len: data.len() as u64,
                crc32c,
                session_id: shared::meta::session_to_wire(session).into(),
            }),
            data: data.clone(),
        };
        let unavailable = |message: String| FsError::GatewayUnavailable {
            key: key.to_string(),
            message,
        };
        if stream.requests.send(request).await.is_err() {
            stream.lock().acks.remove(&request_id);
            stream.close("request stream ended".into());
            return Attempt::Retry(unavailable("WriteBlocks stream ended".into()));
        }
        match tokio::time::timeout(self.write_timeout, acked).await {
            Ok(Ok(Ok(()))) => Attempt::Done,
            Ok(Ok(Err(FsError::GatewayUnavailable { message, .. }))) => {
                Attempt::Retry(unavailable(message))
            }
            Ok(Ok(Err(e))) => Attempt::Failed(e),
            Ok(Err(_)) => Attempt::Retry(unavailable("WriteBlocks stream ended".into())),
            Err(_) => {
                stream.lock().acks.remove(&request_id);
                Attempt::Failed(unavailable(format!(
                    "no acknowledgement within {:?}",
                    self.write_timeout
                )))
            }
        }
    }
}

/// Routes each acknowledgement of `responses` to its waiting writer until the stream ends, then
/// fails whoever still waits.
async fn route_acks(stream: Arc<AckStream>, mut responses: tonic::Streaming<WriteBlocksResponse>) {
    let reason = loop {
        match responses.message().await {
            Ok(Some(response)) => {
                let ack = stream.lock().acks.remove(&response.request_id);
                match ack {
                    Some(ack) => {
                        let _ = ack.send(ack_result(&response));
                    }
                    None => tracing::debug!(
                        request_id = response.request_id,
                        "acknowledgement for a write nobody waits for (timed out)"
                    ),
                }
            }
            Ok(None) => break "gateway ended the WriteBlocks stream".to_string(),
            Err(status) => break format!("WriteBlocks stream failed: {status}"),
        }
    };
    tracing::debug!(%reason, "WriteBlocks stream closed");
    stream.close(reason);
}

/// The outcome the gateway reported for one block.
fn ack_result(response: &WriteBlocksResponse) -> FsResult<()> {
    let code = Code::from_i32(response.code);
    let key = String::new();
    let message = response.message.clone();
    if let Some(through) = super::error::write_through_of(code, &message, &key) {
        return Err(through);
    }
    match code {
        Code::Ok => Ok(()),
        Code::Unavailable | Code::Cancelled | Code::Aborted => {
            Err(FsError::GatewayUnavailable { key, message })
        }
        Code::ResourceExhausted => Err(FsError::BlockRejected {
            key,
            no_space: true,
            message,
        }),
        _ => Err(FsError::BlockRejected {
            key,
            no_space: false,
            message: format!("{code}: {message}"),
        }),
    }
}

/// Fills in the key of an error that was raised where only the request id was known.
fn with_key(error: FsError, block: &BlockKey) -> FsError {
    let block = block.to_string();
    match error {
        FsError::GatewayUnavailable { message, .. } => FsError::GatewayUnavailable {
            key: block,
            message,
        },
        FsError::BlockRejected {
            no_space, message, ..
        } => FsError::BlockRejected {
            key: block,
            no_space,
            message,
        },
        FsError::WriteThrough { message, .. } => FsError::WriteThrough {
            key: block,
            message,
        },
        other => other,
    }
}

#[async_trait]
impl BlockApi for GrpcBlocks {
    async fn write_block(&self, session: SessionId, key: BlockKey, data: Bytes) -> FsResult<()> {
        let crc32c = crc32c::crc32c(&data);
        let mut delay = FIRST_RETRY_DELAY;
        let mut attempt = 1;
        loop {
            match self.attempt(session, &key, &data, crc32c).await {
                Attempt::Done => return Ok(()),
                Attempt::Failed(e) => return Err(with_key(e, &key)),
                Attempt::Retry(e) if attempt >= WRITE_ATTEMPTS => return Err(with_key(e, &key)),
                Attempt::Retry(e) => {
                    tracing::debug!(%key, attempt, error = %e, "block write will be retried");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                    attempt += 1;
                }
            }
        }
    }

    async fn read_block(
        &self,
        key: BlockKey,
        range: Range<u64>,
        home: &BlockHome,
        from_store: bool,
    ) -> FsResult<Option<Bytes>> {
        let length = range.end.saturating_sub(range.start);
        if length == 0 {
            return Ok(Some(Bytes::new()));
        }
        let mut request = tonic::Request::new(ReadBlockRequest {
            key: key.to_string(),
            offset: range.start,
            length,
            ino: home.ino,
            chunk_index: home.chunk_index,
            from_store,
        });
        request.set_timeout(READ_TIMEOUT);
        let answer = match self.client.clone().read_block(request).await {
            Ok(answer) => answer.into_inner(),
            Err(status) if status.code() == Code::NotFound => return Ok(None),
            Err(status)
                if matches!(
                    status.code(),
                    Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown
                ) =>
            {
                return Err(FsError::GatewayUnavailable {
                    key: key.to_string(),
                    message: status.to_string(),
                })
            }
            Err(status) => {
                return Err(FsError::BlockCorrupt {
                    key: key.to_string(),
                    message: format!("ReadBlock: {status}"),
                })
            }
        };
        if crc32c::crc32c(&answer.data) != answer.crc32c {
            return Err(FsError::BlockCorrupt {
                key: key.to_string(),
                message: "crc32c of the bytes read does not match the gateway's".into(),
            });
        }
        Ok(Some(answer.data))
    }
}
