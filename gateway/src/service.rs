//! The gRPC staging service: a thin adapter over the gateway core ([`Node`]) that assembles
//! incoming blocks and maps errors to status codes in one place.

use std::sync::Arc;
use std::time::{Duration, Instant};

use object_store::{ObjectStore, ObjectStoreExt};
use proto::staging::staging_server::Staging;
use proto::staging::{self as pb, write_block_request::Frame};
use shared::BlockKey;
use tonic::{Request, Response, Status, Streaming};

use crate::access::{must_be_admin, tenant_of, Tenant};
use crate::confine::Scope;
use crate::limits::{next_within, source_of};
use crate::node::{BlockInputError, IncomingBlock, Node};
use crate::staging::{BlockState, StagingError, StagingLog};
use crate::telemetry::count_bytes;

#[derive(Clone)]
pub struct StagingService {
    node: Arc<Node>,
}

impl StagingService {
    pub fn new(node: Arc<Node>) -> StagingService {
        StagingService { node }
    }

    fn log(&self) -> &Arc<StagingLog> {
        &self.node.log
    }

    fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.node.store
    }

    /// Bytes `range` of block `key` from the object store, for a client that reads through the
    /// gateway.
    async fn range_from_store(
        &self,
        key: &BlockKey,
        range: std::ops::Range<u64>,
        confined: bool,
    ) -> Result<bytes::Bytes, Status> {
        let want = range.end - range.start;
        if want == 0 {
            return Ok(bytes::Bytes::new());
        }
        match self.store().get_range(&key.object_path(), range).await {
            Ok(data) if data.len() as u64 == want => Ok(data),
            Ok(data) => Err(Status::data_loss(format!(
                "block {key}: the store gave {} bytes, not {want}",
                data.len()
            ))),
            Err(object_store::Error::NotFound { .. }) => Err(Status::not_found(format!(
                "block {key} is neither staged here nor in the store"
            ))),
            Err(e) => Err(Status::unavailable(bounded(&format!(
                "block {key} from the store: {}",
                withheld(confined, e.to_string())
            )))),
        }
    }
}

/// Blocks one `Warmup` call may name.
const MAX_WARM_BLOCKS: usize = 64;
/// Store reads one `Warmup` call runs at once.
const WARM_FETCHES: usize = 4;

/// What a warmup did with one block.
enum Warmed {
    Fetched(u64),
    Held,
    NotUploaded,
    NotKept,
}

impl StagingService {
    /// [`Self::range_from_store`], for a gateway with a read cache: the whole block is read and
    /// kept on the device (in the background: the reader does not wait for the device), so the
    /// next read of it is served from there.
    async fn read_through(
        &self,
        key: &BlockKey,
        range: std::ops::Range<u64>,
        confined: bool,
    ) -> Result<bytes::Bytes, Status> {
        if !self.log().keeps_read_cache() || range.is_empty() {
            return self.range_from_store(key, range, confined).await;
        }
        let whole = self.range_from_store(key, 0..key.len(), confined).await?;
        let (log, key_kept, data) = (self.log().clone(), *key, whole.clone());
        tokio::spawn(async move {
            if let Err(error) = log.fill(key_kept, &data).await {
                tracing::warn!(key = %key_kept, %error, "could not keep a block read from the store as read cache");
            }
        });
        Ok(whole.slice(range.start as usize..range.end as usize))
    }

    /// One block of a warmup: read from the store and kept, unless the device holds it.
    async fn warm(&self, key: BlockKey, source: &str, confined: bool) -> Result<Warmed, Status> {
        if self
            .log()
            .entry(&key)
            .is_some_and(|e| e.state != BlockState::Deleted)
        {
            return Ok(Warmed::Held);
        }
        let limits = &self.node.limits;
        let _room = limits
            .inflight
            .reserve(source, key.len(), limits.stream_idle_timeout)
            .await?;
        let data = match self.range_from_store(&key, 0..key.len(), confined).await {
            Ok(data) => data,
            Err(status) if status.code() == tonic::Code::NotFound => {
                return Ok(Warmed::NotUploaded)
            }
            Err(status) => return Err(status),
        };
        match self.log().fill(key, &data).await {
            Ok(true) => Ok(Warmed::Fetched(key.len())),
            // Raced with a read or a staged write of the same block: it is here now.
            Ok(false) if self.log().entry(&key).is_some() => Ok(Warmed::Held),
            Ok(false) => Ok(Warmed::NotKept),
            Err(e) => Err(e.into()),
        }
    }
}

/// `text` (an object store's error, which names the store's address), or for a tenant confined
/// to a directory, which is not told where the store is, only that there is something.
fn withheld(confined: bool, text: String) -> String {
    if confined && !text.is_empty() {
        "(the store's error is withheld from a tenant confined to a directory)".into()
    } else {
        text
    }
}

impl From<BlockInputError> for Status {
    fn from(e: BlockInputError) -> Status {
        match e {
            BlockInputError::Invalid(m) => Status::invalid_argument(bounded(&m)),
            BlockInputError::Checksum(m) => Status::data_loss(bounded(&m)),
        }
    }
}

impl From<StagingError> for Status {
    fn from(e: StagingError) -> Status {
        let message = bounded(&e.to_string());
        match e {
            StagingError::Full { .. } => Status::resource_exhausted(message),
            StagingError::Failed(_) | StagingError::Io(_) | StagingError::ShuttingDown => {
                Status::unavailable(message)
            }
            StagingError::Conflict { .. } => Status::already_exists(message),
            StagingError::NotFound(_) => Status::not_found(message),
            StagingError::Corrupt { .. } => Status::data_loss(message),
        }
    }
}

fn parse_key(key: &str) -> Result<BlockKey, Status> {
    key.parse::<BlockKey>()
        .map_err(|e| Status::invalid_argument(bounded(&e.to_string())))
}

/// An error message that may quote what a client sent, cut to a bounded length.
fn bounded(message: &str) -> String {
    shared::clip(message, shared::MAX_ERROR_MESSAGE_BYTES).into_owned()
}

/// Refuses block writes from a read-only tenant.
fn may_write<T>(request: &Request<T>) -> Result<(), Status> {
    let tenant = tenant_of(request);
    if tenant.may_write() {
        return Ok(());
    }
    Err(Status::permission_denied(format!(
        "token {:?} is read-only: it may not stage blocks",
        tenant.name
    )))
}

fn proto_state(state: BlockState) -> pb::BlockState {
    match state {
        BlockState::Staged => pb::BlockState::Staged,
        BlockState::Uploading => pb::BlockState::Uploading,
        BlockState::Uploaded => pb::BlockState::Uploaded,
        BlockState::Quarantined => pb::BlockState::Quarantined,
        BlockState::Deleted => pb::BlockState::Deleted,
    }
}

fn timeout_of(ms: u64) -> Option<Duration> {
    (ms > 0).then(|| Duration::from_millis(ms))
}

#[tonic::async_trait]
impl Staging for StagingService {
    async fn write_block(
        &self,
        request: Request<Streaming<pb::WriteBlockRequest>>,
    ) -> Result<Response<pb::WriteBlockResponse>, Status> {
        may_write(&request)?;
        let limits = self.node.limits.clone();
        let idle = limits.stream_idle_timeout;
        let source = source_of(&request);
        let tenant = tenant_of(&request);
        let can_write_through = crate::high_water::can_write_through(&request);
        let mut stream = request.into_inner();
        let header = match next_within(&mut stream, idle, "WriteBlock").await {
            Some(Ok(pb::WriteBlockRequest {
                frame: Some(Frame::Header(h)),
            })) => h,
            Some(Ok(_)) => {
                return Err(Status::invalid_argument(
                    "the first WriteBlock frame must be a header (key, total_len, crc32c)",
                ))
            }
            Some(Err(status)) => return Err(status),
            None => {
                return Err(Status::invalid_argument(
                    "empty WriteBlock stream: no header",
                ))
            }
        };
        let key = parse_key(&header.key)?;
        self.may_stage(&tenant, &header.session_id, &key).await?;
        self.write_through(&key, can_write_through)?;
        // Room for the record before its buffer exists; a block is never longer than this.
        let _room = limits
            .inflight
            .reserve(&source, header.total_len.min(MAX_RECORD_BYTES), idle)
            .await?;
        let (key, mut record) = IncomingBlock::start(&header.key, header.total_len)?;
        while let Some(frame) = next_within(&mut stream, idle, "WriteBlock").await {
            match frame? {
                pb::WriteBlockRequest {
                    frame: Some(Frame::Data(data)),
                } => record.append(&data)?,
                _ => {
                    return Err(Status::invalid_argument(format!(
                        "block {key}: a second header frame or an empty frame after the header"
                    )))
                }
            }
        }
        let sequence = self.stage(key, record, header.crc32c).await?;
        count_bytes(&tenant.name, "written", key.len());
        Ok(Response::new(pb::WriteBlockResponse { sequence }))
    }

    type WriteBlocksStream =
        tokio_stream::wrappers::ReceiverStream<Result<pb::WriteBlocksResponse, Status>>;

    async fn write_blocks(
        &self,
        request: Request<Streaming<pb::WriteBlocksRequest>>,
    ) -> Result<Response<Self::WriteBlocksStream>, Status> {
        may_write(&request)?;
        let source = source_of(&request);
        let tenant = tenant_of(&request);
        let can_write_through = crate::high_water::can_write_through(&request);
        let mut stream = request.into_inner();
        let (responses, out) = tokio::sync::mpsc::channel(WRITE_BLOCKS_IN_FLIGHT);
        let service = self.clone();
        // Bounds the blocks of one stream held in memory while they are being staged.
        // Held until a block's answer is handed over, so a client that reads no answers stalls
        // its own stream after this many blocks.
        let in_flight = Arc::new(tokio::sync::Semaphore::new(WRITE_BLOCKS_IN_FLIGHT));
        let limits = self.node.limits.clone();
        tokio::spawn(async move {
            let idle = limits.stream_idle_timeout;
            while let Some(message) = next_within(&mut stream, idle, "WriteBlocks").await {
                let request = match message {
                    Ok(r) => r,
                    Err(status) => {
                        tracing::debug!(%status, "WriteBlocks stream ended");
                        let _ = responses.try_send(Err(status));
                        break;
                    }
                };
                let Ok(permit) = in_flight.clone().acquire_owned().await else {
                    break;
                };
                // The message is decoded already; while there is no room for staging it, no
                // more are read (flow control holds the client back).
                let room = match limits
                    .inflight
                    .reserve(&source, request.data.len() as u64, idle)
                    .await
                {
                    Ok(room) => room,
                    Err(status) => {
                        let _ = responses.send(Err(status)).await;
                        break;
                    }
                };
                let (service, responses) = (service.clone(), responses.clone());
                let tenant = tenant.clone();
                tokio::spawn(async move {
                    let request_id = request.request_id;
                    let result = service
                        .stage_whole(&tenant, &request, can_write_through)
                        .await;
                    if result.is_ok() {
                        count_bytes(&tenant.name, "written", request.data.len() as u64);
                    }
                    // The block's bytes are let go before the answer waits for its reader.
                    drop(request);
                    drop(room);
                    let response = match result {
                        Ok(sequence) => pb::WriteBlocksResponse {
                            request_id,
                            sequence,
                            ..Default::default()
                        },
                        Err(status) => pb::WriteBlocksResponse {
                            request_id,
                            code: status.code() as i32,
                            message: status.message().to_string(),
                            sequence: 0,
                        },
                    };
                    let _ = responses.send(Ok(response)).await;
                    drop(permit);
                });
            }
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            out,
        )))
    }

    async fn read_block(
        &self,
        request: Request<pb::ReadBlockRequest>,
    ) -> Result<Response<pb::ReadBlockResponse>, Status> {
        let source = source_of(&request);
        let tenant = tenant_of(&request);
        let req = request.into_inner();
        let key = parse_key(&req.key)?;
        let engine = self.node.meta.as_ref();
        async {
            let scope = Scope::of(tenant.clone(), engine).await?;
            scope
                .may_read_block(engine, &key, req.ino, req.chunk_index)
                .await
        }
        .await
        .map_err(|e| crate::meta_service::meta_status("ReadBlock", &e))?;
        // A block's length is in its key: the range is checked before anything is read.
        let len = key.len();
        if req.offset > len {
            return Err(Status::out_of_range(format!(
                "offset {} is past the end of block {key} ({len} bytes)",
                req.offset
            )));
        }
        let end = if req.length == 0 {
            len
        } else {
            req.offset.saturating_add(req.length).min(len)
        };
        let range = req.offset..end;
        let limits = &self.node.limits;
        let _room = limits
            .inflight
            .reserve(&source, key.len(), limits.stream_idle_timeout)
            .await?;
        let held = self.log().read_block(&key).await.inspect_err(|e| {
            if let StagingError::Corrupt { .. } = e {
                tracing::error!(%key, error = %e, "staged block fails verification; not served");
            }
        });
        let (data, state) = match held {
            Ok((data, state)) if data.len() as u64 == len => {
                self.log().keep_hot(key, data.clone());
                (data.slice(range.start as usize..range.end as usize), state)
            }
            Ok((data, _)) => {
                return Err(Status::data_loss(format!(
                    "staged block {key} holds {} bytes, not {len}",
                    data.len()
                )))
            }
            Err(StagingError::NotFound(_)) if req.from_store => (
                self.read_through(&key, range, tenant.root.is_some())
                    .await?,
                BlockState::Uploaded,
            ),
            Err(e) => return Err(e.into()),
        };
        let crc32c = crc32c::crc32c(&data);
        count_bytes(&tenant.name, "read", data.len() as u64);
        Ok(Response::new(pb::ReadBlockResponse {
            data,
            crc32c,
            state: proto_state(state) as i32,
        }))
    }

    async fn warmup(
        &self,
        request: Request<pb::WarmupRequest>,
    ) -> Result<Response<pb::WarmupResponse>, Status> {
        use futures::StreamExt;
        let source = source_of(&request);
        let tenant = tenant_of(&request);
        let req = request.into_inner();
        if !self.log().keeps_read_cache() {
            return Err(Status::failed_precondition(
                "this gateway keeps no read cache: start it with --read-cache SIZE to warm it up",
            ));
        }
        if req.blocks.len() > MAX_WARM_BLOCKS {
            return Err(Status::invalid_argument(format!(
                "{} blocks in one Warmup call; at most {MAX_WARM_BLOCKS}",
                req.blocks.len()
            )));
        }
        let engine = self.node.meta.as_ref();
        let mut keys = Vec::with_capacity(req.blocks.len());
        let scope = Scope::of(tenant.clone(), engine)
            .await
            .map_err(|e| crate::meta_service::meta_status("Warmup", &e))?;
        for block in &req.blocks {
            let key = parse_key(&block.key)?;
            scope
                .may_read_block(engine, &key, block.ino, block.chunk_index)
                .await
                .map_err(|e| crate::meta_service::meta_status("Warmup", &e))?;
            keys.push(key);
        }
        let confined = tenant.root.is_some();
        let results: Vec<Result<Warmed, Status>> = futures::stream::iter(keys)
            .map(|key| self.warm(key, &source, confined))
            .buffer_unordered(WARM_FETCHES)
            .collect()
            .await;
        let mut out = pb::WarmupResponse::default();
        for result in results {
            match result? {
                Warmed::Fetched(bytes) => {
                    out.fetched += 1;
                    out.fetched_bytes += bytes;
                }
                Warmed::Held => out.held += 1,
                Warmed::NotUploaded => out.not_uploaded += 1,
                Warmed::NotKept => out.not_kept += 1,
            }
        }
        count_bytes(&tenant.name, "warmup", out.fetched_bytes);
        Ok(Response::new(out))
    }

    async fn stat_blocks(
        &self,
        request: Request<pb::StatBlocksRequest>,
    ) -> Result<Response<pb::StatBlocksResponse>, Status> {
        if request.get_ref().check_store {
            must_be_admin(&request, "have blocks looked for in the store")?;
        }
        let confined = tenant_of(&request).root.is_some();
        let request = request.into_inner();
        let mut blocks = Vec::new();
        for key_text in request.keys {
            let key = parse_key(&key_text)?;
            blocks.push(match self.log().entry(&key) {
                Some(e) => pb::BlockStat {
                    key: key_text,
                    state: proto_state(e.state) as i32,
                    len: e.data_len as u64,
                    failed_attempts: e.failed_attempts,
                    last_error: withheld(confined, e.last_error.unwrap_or_default()),
                },
                None => pb::BlockStat {
                    key: key_text,
                    state: pb::BlockState::Unknown as i32,
                    len: key.len(),
                    ..Default::default()
                },
            });
        }
        if request.check_store {
            self.look_in_store(&mut blocks).await?;
        }
        Ok(Response::new(pb::StatBlocksResponse { blocks }))
    }

    async fn wait_uploaded(
        &self,
        request: Request<pb::WaitUploadedRequest>,
    ) -> Result<Response<pb::WaitUploadedResponse>, Status> {
        let confined = tenant_of(&request).root.is_some();
        let req = request.into_inner();
        let keys = req
            .keys
            .iter()
            .map(|k| parse_key(k))
            .collect::<Result<Vec<_>, _>>()?;
        let deadline = timeout_of(req.timeout_ms).map(|t| Instant::now() + t);
        let mut changes = self.log().subscribe_changes();
        if req.upload_now {
            let expedited = self.log().expedite(&keys);
            tracing::debug!(
                expedited,
                keys = keys.len(),
                "uploading blocks a client waits for next"
            );
        }
        // Keys the gateway does not know must already be in the store; checked once.
        for key in &keys {
            if self.log().entry(key).is_none() {
                match in_store(self.store().as_ref(), &key.object_path()).await {
                    Ok(true) => {}
                    Ok(false) => {
                        return Err(Status::not_found(format!(
                            "block {key} is neither staged here nor in the object store"
                        )))
                    }
                    Err(e) => {
                        return Err(Status::unavailable(format!(
                            "cannot check block {key} in the object store: {}",
                            withheld(confined, e.to_string())
                        )))
                    }
                }
            }
        }
        loop {
            changes.borrow_and_update();
            let mut waiting = 0;
            for key in &keys {
                match self.log().entry(key).map(|e| (e.state, e.last_error)) {
                    None | Some((BlockState::Uploaded, _)) => {}
                    Some((BlockState::Quarantined, error)) => {
                        return Err(Status::failed_precondition(format!(
                            "block {key} is quarantined after failed uploads: {}",
                            withheld(confined, error.unwrap_or_default())
                        )))
                    }
                    Some((BlockState::Deleted, _)) => {
                        return Err(Status::failed_precondition(format!(
                            "block {key} was deleted and will not be uploaded"
                        )))
                    }
                    Some(_) => waiting += 1,
                }
            }
            if waiting == 0 {
                return Ok(Response::new(pb::WaitUploadedResponse {}));
            }
            let changed = changes.changed();
            match deadline {
                Some(d) => {
                    if tokio::time::timeout_at(d.into(), changed).await.is_err() {
                        return Err(Status::deadline_exceeded(format!(
                            "{waiting} of {} blocks are not uploaded yet",
                            keys.len()
                        )));
                    }
                }
                None => {
                    let _ = changed.await;
                }
            }
        }
    }

    async fn delete_blocks(
        &self,
        request: Request<pb::DeleteBlocksRequest>,
    ) -> Result<Response<pb::DeleteBlocksResponse>, Status> {
        must_be_admin(&request, "delete blocks")?;
        let keys = request
            .into_inner()
            .keys
            .iter()
            .map(|k| parse_key(k))
            .collect::<Result<Vec<_>, _>>()?;
        let (dropped, not_pending) = self.log().delete_blocks(&keys).await?;
        Ok(Response::new(pb::DeleteBlocksResponse {
            dropped,
            not_pending,
        }))
    }

    async fn drain(
        &self,
        request: Request<pb::DrainRequest>,
    ) -> Result<Response<pb::DrainResponse>, Status> {
        let upload_now = request.get_ref().upload_now;
        if upload_now {
            must_be_admin(&request, "upload everything now")?;
        }
        let tenant = tenant_of(&request);
        let deadline = timeout_of(request.into_inner().timeout_ms).map(|t| Instant::now() + t);
        let mut changes = self.log().subscribe_changes();
        if upload_now {
            let expedited = self.log().expedite_all();
            tracing::info!(expedited, "uploading every waiting block now (sync --all)");
        }
        loop {
            changes.borrow_and_update();
            let (backlog, paused) = self.log().upload_backlog();
            if backlog == 0 {
                break;
            }
            if paused {
                return Err(Status::failed_precondition(format!(
                    "uploads are paused with {backlog} blocks waiting; resume them first"
                )));
            }
            let changed = changes.changed();
            match deadline {
                Some(d) => {
                    if tokio::time::timeout_at(d.into(), changed).await.is_err() {
                        return Err(Status::deadline_exceeded(format!(
                            "{backlog} blocks still wait for upload"
                        )));
                    }
                }
                None => {
                    let _ = changed.await;
                }
            }
        }
        Ok(Response::new(pb::DrainResponse {
            status: Some(self.status_for(&tenant)),
        }))
    }

    async fn status(
        &self,
        request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let mut status = self.status_for(&tenant_of(&request));
        let meta = &self.node.meta;
        if meta.is_replica() {
            status.mirror = true;
            status.replica_lag_seconds = match meta.replica_lag().await {
                Ok(Some(lag)) => lag.as_secs_f64(),
                Ok(None) => -1.0,
                Err(error) => {
                    tracing::warn!(%error, "the replica's lag could not be read");
                    -1.0
                }
            };
        }
        Ok(Response::new(status))
    }

    async fn retry_quarantined(
        &self,
        request: Request<pb::RetryQuarantinedRequest>,
    ) -> Result<Response<pb::RetryQuarantinedResponse>, Status> {
        must_be_admin(&request, "retry quarantined blocks")?;
        Ok(Response::new(pb::RetryQuarantinedResponse {
            requeued: self.log().retry_quarantined(),
        }))
    }

    async fn set_uploads_paused(
        &self,
        request: Request<pb::SetUploadsPausedRequest>,
    ) -> Result<Response<pb::SetUploadsPausedResponse>, Status> {
        must_be_admin(&request, "pause or resume uploads")?;
        let paused = request.into_inner().paused;
        tracing::info!(paused, "uploads paused state changed by request");
        self.log().set_uploads_paused(paused);
        Ok(Response::new(pb::SetUploadsPausedResponse {}))
    }

    async fn collect_garbage(
        &self,
        request: Request<pb::CollectGarbageRequest>,
    ) -> Result<Response<pb::CollectGarbageResponse>, Status> {
        must_be_admin(&request, "look for or delete unreferenced objects")?;
        let request = request.into_inner();
        let report = crate::gc::collect(
            self.store().as_ref(),
            self.node.meta.as_ref(),
            Duration::from_millis(request.min_age_ms),
            request.delete,
        )
        .await
        .map_err(|e| Status::unavailable(bounded(&e.to_string())))?;
        Ok(Response::new(pb::CollectGarbageResponse {
            objects_listed: report.objects_listed,
            other_objects: report.other_objects,
            too_young: report.too_young,
            unreferenced_objects: report.unreferenced_objects,
            unreferenced_bytes: report.unreferenced_bytes,
            unreferenced_keys: report.unreferenced_keys,
            deleted_objects: report.deleted_objects,
            delete_failures: report.delete_failures,
        }))
    }
}

/// Whether the store holds the object at `path`.
async fn in_store(
    store: &dyn ObjectStore,
    path: &object_store::path::Path,
) -> Result<bool, object_store::Error> {
    match store.head(path).await {
        Ok(_) => Ok(true),
        Err(object_store::Error::NotFound { .. }) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Store lookups one `StatBlocks` (`check_store`) runs at once.
const STORE_LOOKUPS: usize = 16;

/// Blocks of one WriteBlocks stream being staged, or answered and not yet read, at once.
const WRITE_BLOCKS_IN_FLIGHT: usize = 64;

/// The largest record a block can need (its data and header with the longest key).
const MAX_RECORD_BYTES: u64 = shared::BLOCK_SIZE + 4096;

impl StagingService {
    /// [`Node::may_stage`], answered as the metadata service answers its refusals.
    async fn may_stage(
        &self,
        tenant: &Tenant,
        session: &[u8],
        key: &BlockKey,
    ) -> Result<(), Status> {
        self.node
            .may_stage(tenant, session, key)
            .await
            .map_err(|error| crate::meta_service::meta_status("WriteBlock", &error))
    }

    async fn stage(&self, key: BlockKey, block: IncomingBlock, crc: u32) -> Result<u64, Status> {
        Ok(self.node.stage(key, block.finish(crc)?).await?)
    }

    /// Blocks not waiting here for upload are looked for in the store, the truth for them:
    /// `UPLOADED` if it has them, else `UNKNOWN` (also for one this gateway thought uploaded).
    async fn look_in_store(&self, blocks: &mut [pb::BlockStat]) -> Result<(), Status> {
        use futures::StreamExt;
        let absent = |b: &pb::BlockStat| {
            b.state == pb::BlockState::Unknown as i32
                || b.state == pb::BlockState::Deleted as i32
                || b.state == pb::BlockState::Uploaded as i32
        };
        let store = self.store().clone();
        let wanted: Vec<(usize, String)> = blocks
            .iter()
            .enumerate()
            .filter(|(_, b)| absent(b))
            .map(|(i, b)| (i, b.key.clone()))
            .collect();
        let found: Vec<(usize, Result<bool, String>)> = futures::stream::iter(wanted)
            .map(|(i, key)| {
                let store = store.clone();
                async move {
                    let path = object_store::path::Path::from(key);
                    let found = in_store(store.as_ref(), &path).await;
                    (i, found.map_err(|e| e.to_string()))
                }
            })
            .buffer_unordered(STORE_LOOKUPS)
            .collect()
            .await;
        for (i, found) in found {
            match found {
                Ok(true) => blocks[i].state = pb::BlockState::Uploaded as i32,
                Ok(false) => blocks[i].state = pb::BlockState::Unknown as i32,
                Err(e) => {
                    return Err(Status::unavailable(bounded(&format!(
                        "cannot look for block {} in the store: {e}",
                        blocks[i].key
                    ))))
                }
            }
        }
        Ok(())
    }

    /// `FAILED_PRECONDITION` telling the client to write `key` through, when it can and the
    /// device is above its high-water mark.
    fn write_through(&self, key: &BlockKey, can_write_through: bool) -> Result<(), Status> {
        self.node
            .stage_or_write_through(key, can_write_through)
            .map_err(|e| Status::failed_precondition(e.to_string()))
    }

    async fn stage_whole(
        &self,
        tenant: &Tenant,
        request: &pb::WriteBlocksRequest,
        can_write_through: bool,
    ) -> Result<u64, Status> {
        let header = request
            .header
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("WriteBlocks request without a header"))?;
        let key = parse_key(&header.key)?;
        self.may_stage(tenant, &header.session_id, &key).await?;
        self.write_through(&key, can_write_through)?;
        let (key, mut block) = IncomingBlock::start(&header.key, header.total_len)?;
        block.append(&request.data)?;
        self.stage(key, block, header.crc32c).await
    }

    /// The gateway's status as `tenant` may see it: a tenant confined to a directory is not
    /// told where the store or the device is, nor other tenants' block keys.
    fn status_for(&self, tenant: &Tenant) -> pb::StatusResponse {
        let mut status = self.status_now();
        if tenant.root.is_some() {
            // Where the store and the device are, and other tenants' block keys, are not its
            // business (the store's errors name its address).
            status.store_url.clear();
            status.device_path.clear();
            status.quarantined.clear();
            status.last_store_error = withheld(true, std::mem::take(&mut status.last_store_error));
        }
        status
    }

    fn status_now(&self) -> pb::StatusResponse {
        let log = self.log();
        let snap = log.snapshot();
        let sb = &log.sb;
        let compaction = &self.node.compactor.totals;
        use std::sync::atomic::Ordering::Relaxed;
        pb::StatusResponse {
            gateway_id: uuid::Uuid::from_bytes(sb.gateway_id).to_string(),
            generation: sb.generation,
            device_path: log.device_path.display().to_string(),
            io_engine: log.io_engine_name().to_string(),
            store_url: self.node.settings.store_url.clone(),
            device_bytes: sb.device_bytes,
            segment_bytes: sb.segment_bytes,
            segments_total: snap.segments_total,
            segments_free: snap.segments_free,
            device_used_bytes: (snap.segments_total - snap.segments_free) * sb.segment_bytes,
            blocks_staged: snap.blocks_staged,
            bytes_staged: snap.bytes_staged,
            blocks_uploading: snap.blocks_uploading,
            queue_len: snap.queue_len,
            oldest_waiting_age_ms: snap.oldest_waiting.as_millis() as u64,
            upload_bytes_per_sec: snap.counters.upload_bytes_per_sec,
            uploaded_blocks_total: snap.counters.uploaded_blocks,
            uploaded_bytes_total: snap.counters.uploaded_bytes,
            upload_retries_total: snap.counters.upload_retries,
            upload_failures_total: snap.counters.upload_failures,
            blocks_quarantined: snap.quarantined.len() as u64,
            quarantined: snap
                .quarantined
                .into_iter()
                .map(|(key, e)| pb::QuarantinedBlock {
                    key,
                    len: e.data_len as u64,
                    failed_attempts: e.failed_attempts,
                    last_error: e.last_error.unwrap_or_default(),
                })
                .collect(),
            uploads_paused: snap.uploads_paused,
            upload_hours: snap.upload_window.map_or(String::new(), |w| w.to_string()),
            upload_window_closed: snap.upload_window_closed,
            upload_defer_max_ms: snap.upload_defer_max.as_millis() as u64,
            uploads_deferred: snap.uploads_deferred,
            staging_high_water: self.node.high_water.marks().0,
            staging_low_water: self.node.high_water.marks().1,
            writing_through: self.node.high_water.is_above(),
            written_through_blocks_total: self.node.high_water.totals().0,
            written_through_bytes_total: self.node.high_water.totals().1,
            compact_slices: self.node.compactor.threshold() as u64,
            compacted_chunks_total: compaction.chunks.load(Relaxed),
            compacted_slices_total: compaction.slices.load(Relaxed),
            compacted_bytes_total: compaction.bytes.load(Relaxed),
            compactions_skipped_total: compaction.skipped.load(Relaxed),
            last_store_error: snap.counters.last_store_error.unwrap_or_default(),
            recovery_ms: log.recovery.duration.as_millis() as u64,
            recovered_blocks: log.recovery.blocks,
            corrupt_records: log.recovery.corrupt.len() as u64,
            writers_waiting_for_space: snap.writers_waiting_for_space,
            syncs_total: snap.counters.syncs,
            sync_seconds_total: snap.counters.sync_time.as_secs_f64(),
            synced_records_total: snap.counters.synced_records,
            healthy: snap.failure.is_none(),
            failure: snap.failure.unwrap_or_default(),
            // Filled in by `status`, which can wait for the database.
            mirror: false,
            replica_lag_seconds: -1.0,
            read_cache_bytes: snap.read_cache_budget,
            read_cache_blocks: snap.read_cache_held.0,
            read_cache_used_bytes: snap.read_cache_held.1,
            read_cache_fills_total: snap.counters.cache_fills,
            read_cache_hits_total: snap.counters.cache_hits,
            read_cache_hit_bytes_total: snap.counters.cache_hit_bytes,
        }
    }
}
