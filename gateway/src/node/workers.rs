//! Background workers of the gateway core: session expiry, deleted-data cleanup and the registry
//! heartbeat.
//!
//! They live in a [`Tasks`] group like every background task: [`start`] spawns them, they tick
//! on an interval, and they stop at the next tick boundary once the group is drained. A tick that is
//! under way finishes: cutting a staging-log append short could leave a hole in the log, and
//! nothing here is lost by waiting for it.
//!
//! * **Session expiry**: a session whose client has not heartbeat for [`MISSED_HEARTBEATS`]
//!   intervals is closed through the engine, which releases its open handles and queues the slices
//!   it staged but never committed for deletion. For the first timeout after the gateway starts
//!   nothing expires, because clients could not heartbeat while the gateway was down: a restart
//!   must not end every session.
//! * **Deleted-data cleanup**: due entries of the engine's deleted-data queue are taken, each
//!   slice's blocks are dropped from this gateway's staging log (so they are never uploaded) and
//!   its objects deleted from the store, and only then is the slice acknowledged. Any failure
//!   leaves the entry queued, so the next tick tries again; repeating a deletion is harmless.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use object_store::path::Path;
use object_store::ObjectStore;
use tokio_util::sync::CancellationToken;

use super::Node;
use crate::meta::{now_ns, DeletedSlice, GatewayId, GatewayLoad, MetaEngine, MetaError, SessionId};
use crate::staging::StagingLog;
use crate::tasks::{ticker, Tasks};

/// A session silent for this many heartbeat intervals expires (the proto promises 3).
pub const MISSED_HEARTBEATS: u32 = 3;

/// Slices cleaned at once; their object deletions run concurrently.
const SLICES_IN_FLIGHT: usize = 16;

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// How often clients heartbeat; the expiry worker checks at this pace too.
    pub heartbeat_interval: Duration,
    /// How often the deleted-data queue is checked for due entries.
    pub cleanup_interval: Duration,
    /// Most slices taken from the queue per round; a full round is followed by another at once.
    pub cleanup_batch: usize,
}

impl WorkerConfig {
    /// Silence after which a session expires.
    pub fn session_timeout(&self) -> Duration {
        self.heartbeat_interval * MISSED_HEARTBEATS
    }
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            heartbeat_interval: Duration::from_secs(5),
            cleanup_interval: Duration::from_secs(1),
            cleanup_batch: 256,
        }
    }
}

/// Starts the session-expiry and cleanup workers of `node` in `tasks`.
pub fn start(node: &Node, config: WorkerConfig, tasks: &Tasks) {
    let engine = node.meta.clone();
    start_cleanup(
        node,
        Arc::new(EngineRecords(engine.clone())),
        config.clone(),
        tasks,
    );
    tasks.spawn("node.session-expiry", |stop| async move {
        expire_sessions_worker(engine, config, stop).await;
        Ok(())
    });
}

/// Starts the deleted-data cleanup of `node` in `tasks`, taking its queue from `records` (a
/// mirror's, from the source region: sessions there expire at the source's gateways).
pub fn start_cleanup(
    node: &Node,
    records: Arc<dyn GatewayRecords>,
    config: WorkerConfig,
    tasks: &Tasks,
) {
    let cleaner = DataCleaner {
        records,
        staging: node.log.clone(),
        store: node.store.clone(),
        batch: config.cleanup_batch.max(1),
    };
    tasks.spawn("node.cleanup", |stop| async move {
        cleanup_worker(cleaner, config, stop).await;
        Ok(())
    });
}

async fn expire_sessions_worker(
    engine: Arc<dyn MetaEngine>,
    config: WorkerConfig,
    shutdown: CancellationToken,
) {
    let timeout = config.session_timeout();
    let started = Instant::now();
    let mut interval = ticker(config.heartbeat_interval);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = interval.tick() => {}
        }
        // Grace after a start: heartbeats sent while the gateway was down never arrived.
        if started.elapsed() < timeout {
            continue;
        }
        if let Err(error) = expire_silent_sessions(&engine, timeout).await {
            tracing::warn!(%error, "cannot look for expired sessions; trying again next tick");
        }
    }
}

/// Closes every session silent for longer than `timeout`; returns the ids closed. A session that
/// fails to close is logged and left for the next round.
pub async fn expire_silent_sessions(
    engine: &Arc<dyn MetaEngine>,
    timeout: Duration,
) -> Result<Vec<SessionId>, MetaError> {
    let timeout_ns = i64::try_from(timeout.as_nanos()).unwrap_or(i64::MAX);
    let expired = engine
        .expired_sessions(now_ns().saturating_sub(timeout_ns))
        .await?;
    let mut outcomes = Vec::with_capacity(expired.len());
    for session in expired {
        outcomes.push((session, engine.close_session(session).await));
    }
    let mut closed = Vec::new();
    for (session, outcome) in outcomes {
        match outcome {
            Ok(()) => {
                tracing::info!(
                    session = %format_args!("{session:032x}"),
                    silent_for_more_than = ?timeout,
                    "session expired: its handles are released and its uncommitted slices queued for deletion"
                );
                closed.push(session);
            }
            // Another gateway on the same database closed it first.
            Err(MetaError::SessionGone(_)) => {}
            Err(error) => {
                tracing::warn!(session = %format_args!("{session:032x}"), %error, "cannot close an expired session; trying again next tick")
            }
        }
    }
    Ok(closed)
}

async fn cleanup_worker(cleaner: DataCleaner, config: WorkerConfig, shutdown: CancellationToken) {
    let mut interval = ticker(config.cleanup_interval);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = interval.tick() => {}
        }
        // A full batch that was cleaned completely means more may be due: go on at once.
        while !shutdown.is_cancelled() {
            match cleaner.clean_due().await {
                Ok(round) if round.taken == cleaner.batch && round.cleaned > 0 => continue,
                Ok(_) => break,
                Err(error) => {
                    tracing::warn!(%error, "deleted-data cleanup failed; trying again next tick");
                    break;
                }
            }
        }
    }
}

/// What a gateway keeps about itself in the metadata, its registration and the queue of deleted
/// data it must drop: in the engine it serves, or, for a gateway of a mirror region, in the
/// source region's (reached through a source gateway: the mirror's own engine is a read-only
/// standby).
#[tonic::async_trait]
pub trait GatewayRecords: Send + Sync + 'static {
    /// Registers `id` at `address` with an epoch above every earlier start of it.
    async fn register(&self, id: GatewayId, address: &str) -> Result<u64, MetaError>;
    /// [`MetaError::Fenced`] once a later start of `id` registered.
    async fn heartbeat(
        &self,
        id: GatewayId,
        epoch: u64,
        load: GatewayLoad,
    ) -> Result<(), MetaError>;
    /// Whether this gateway serves a mirror region (said with every heartbeat).
    fn mirror(&self) -> bool {
        false
    }
    /// [`MetaEngine::take_due_deleted_slices`] of the slices gateway `id` staged.
    async fn take_deleted(
        &self,
        id: GatewayId,
        limit: usize,
    ) -> Result<Vec<DeletedSlice>, MetaError>;
    /// [`MetaEngine::ack_deleted_slices`].
    async fn ack_deleted(&self, slice_ids: &[u64]) -> Result<(), MetaError>;
}

/// The registry of the engine a gateway serves.
pub struct EngineRecords(pub Arc<dyn MetaEngine>);

#[tonic::async_trait]
impl GatewayRecords for EngineRecords {
    async fn register(&self, id: GatewayId, address: &str) -> Result<u64, MetaError> {
        self.0.register_gateway(id, address, false).await
    }

    async fn heartbeat(
        &self,
        id: GatewayId,
        epoch: u64,
        load: GatewayLoad,
    ) -> Result<(), MetaError> {
        self.0.gateway_heartbeat(id, epoch, load).await
    }

    async fn take_deleted(
        &self,
        id: GatewayId,
        limit: usize,
    ) -> Result<Vec<DeletedSlice>, MetaError> {
        self.0
            .take_due_deleted_slices(Some(id), now_ns(), limit)
            .await
    }

    async fn ack_deleted(&self, slice_ids: &[u64]) -> Result<(), MetaError> {
        self.0.ack_deleted_slices(slice_ids).await
    }
}

/// Starts the registry heartbeat of `node` in `tasks`: it keeps this gateway's registration
/// alive with its load every heartbeat interval, and cancels `fenced` when a later start of the
/// same gateway id took over: this process must stop serving. Registered at start with `epoch`;
/// `None` (a mirror, whose source region may not answer yet): it registers itself at `address`
/// first, trying again every tick. A heartbeat the registry cannot take is logged and tried
/// again next tick.
pub fn start_registry(
    node: &Node,
    registry: Arc<dyn GatewayRecords>,
    epoch: Option<u64>,
    fenced: CancellationToken,
    tasks: &Tasks,
) {
    let staging = node.log.clone();
    let interval = node.settings.heartbeat_interval;
    let address = node.settings.gateway_address.clone();
    tasks.spawn("node.registry", move |stop| async move {
        registry_worker(registry, staging, address, epoch, interval, stop, fenced).await;
        Ok(())
    });
}

async fn registry_worker(
    registry: Arc<dyn GatewayRecords>,
    staging: Arc<StagingLog>,
    address: String,
    mut epoch: Option<u64>,
    interval: Duration,
    shutdown: CancellationToken,
    fenced: CancellationToken,
) {
    let id = staging.sb.gateway_id;
    let mut interval = ticker(interval);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = interval.tick() => {}
        }
        let registered = match epoch {
            Some(epoch) => epoch,
            None => match registry.register(id, &address).await {
                Ok(registered) => {
                    tracing::info!(%address, epoch = registered, "registered in the source region");
                    *epoch.insert(registered)
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot register in the source region; trying again next tick");
                    continue;
                }
            },
        };
        let snapshot = staging.snapshot();
        let load = GatewayLoad {
            staged_blocks: snapshot.blocks_staged,
            staged_bytes: snapshot.bytes_staged,
            queue_len: snapshot.queue_len,
            oldest_waiting_ms: snapshot.oldest_waiting.as_millis() as u64,
            healthy: staging.failure().is_none(),
            mirror: registry.mirror(),
        };
        match registry.heartbeat(id, registered, load).await {
            Ok(()) => {}
            Err(error @ MetaError::Fenced { .. }) => {
                tracing::error!(%error, "fenced: stopping");
                fenced.cancel();
                return;
            }
            Err(error) => {
                tracing::warn!(%error, "gateway heartbeat failed; trying again next tick")
            }
        }
    }
}

/// Deletes the data of deleted slices: staged blocks at this gateway and objects in the store.
pub struct DataCleaner {
    /// Where the queue of this gateway's deleted slices is.
    pub records: Arc<dyn GatewayRecords>,
    pub staging: Arc<StagingLog>,
    pub store: Arc<dyn ObjectStore>,
    /// Most slices taken from the queue per round.
    pub batch: usize,
}

/// What one cleanup round did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CleanupRound {
    /// Due slices taken from the queue.
    pub taken: usize,
    /// Slices whose data is gone and which were acknowledged (removed from the queue).
    pub cleaned: usize,
    /// Slices left queued after a failure, for the next round.
    pub failed: usize,
    /// Staged blocks that were still waiting for upload and now never will be.
    pub blocks_dropped: u64,
}

impl DataCleaner {
    /// One round: take the due slices, delete their data, acknowledge those whose data is gone.
    pub async fn clean_due(&self) -> Result<CleanupRound, MetaError> {
        let batch = self.batch;
        // Only the slices this gateway staged: it alone can drop their blocks from its device,
        // and no two gateways then delete the same thing.
        let due = self
            .records
            .take_deleted(self.staging.sb.gateway_id, batch)
            .await?;
        let mut round = CleanupRound {
            taken: due.len(),
            ..CleanupRound::default()
        };
        if due.is_empty() {
            return Ok(round);
        }
        let outcomes: Vec<(u64, SliceCleanup)> = futures::stream::iter(due)
            .map(|slice| async move { (slice.slice_id, self.clean_slice(&slice).await) })
            .buffer_unordered(SLICES_IN_FLIGHT)
            .collect()
            .await;
        let mut cleaned = Vec::new();
        for (slice_id, outcome) in outcomes {
            round.blocks_dropped += outcome.blocks_dropped;
            match outcome.result {
                Ok(()) => cleaned.push(slice_id),
                Err(error) => {
                    round.failed += 1;
                    tracing::warn!(slice_id, %error, "cannot delete the data of a deleted slice; it stays queued");
                }
            }
        }
        round.cleaned = cleaned.len();
        if !cleaned.is_empty() {
            // Fails only if the database does; the slices then come back next round and their
            // (already gone) data is deleted again, which is harmless.
            self.records.ack_deleted(&cleaned).await?;
        }
        tracing::info!(
            cleaned = round.cleaned,
            failed = round.failed,
            staged_blocks_dropped = round.blocks_dropped,
            "deleted data cleaned up"
        );
        Ok(round)
    }

    /// Drops the slice's staged blocks here and deletes its objects. Blocks staged at another
    /// gateway are not held here (dropping them is a no-op); their objects are deleted from the
    /// shared store all the same.
    async fn clean_slice(&self, slice: &DeletedSlice) -> SliceCleanup {
        let keys = slice.block_keys();
        // First the staging log, so a block cannot be uploaded after its object was deleted. A
        // block in upload right now is marked too; the drain deletes its object when the PUT ends.
        let blocks_dropped = match self.staging.delete_blocks(&keys).await {
            Ok((dropped, _not_pending)) => dropped,
            Err(error) => {
                return SliceCleanup {
                    blocks_dropped: 0,
                    result: Err(format!("dropping its staged blocks: {error}")),
                }
            }
        };
        let paths: Vec<object_store::Result<Path>> =
            keys.iter().map(|key| Ok(key.object_path())).collect();
        let failures: Vec<String> = self
            .store
            .delete_stream(futures::stream::iter(paths).boxed())
            .filter_map(|outcome| async move {
                match outcome {
                    // Never uploaded, or deleted by an earlier attempt.
                    Ok(_) | Err(object_store::Error::NotFound { .. }) => None,
                    Err(error) => Some(error.to_string()),
                }
            })
            .collect()
            .await;
        let result = if failures.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "deleting {} of its {} objects: {}",
                failures.len(),
                keys.len(),
                failures.join("; ")
            ))
        };
        SliceCleanup {
            blocks_dropped,
            result,
        }
    }
}

/// What cleaning one slice did: blocks dropped from staging even when the store then failed.
struct SliceCleanup {
    /// Staged blocks that were still waiting for upload and now never will be.
    blocks_dropped: u64,
    /// `Ok` once every object is gone, so the slice may be acknowledged.
    result: Result<(), String>,
}
