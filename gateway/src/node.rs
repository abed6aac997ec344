//! The gateway core: what one gateway does, whatever the wire. It owns the staging log, the
//! metadata engine and the object store of a gateway; the gRPC services ([`crate::service`],
//! [`crate::meta_service`]) are thin adapters over it that convert requests and map errors, and
//! never call each other.
//!
//! Here live the steps that span the log and the metadata: `WriteSlice` (record the pending
//! slice, stage its block, commit it), and in [`workers`] the background work that keeps the
//! two honest (session expiry, deleted-data cleanup, the registry heartbeat).

pub mod compaction;
pub mod incoming;
pub mod workers;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use object_store::ObjectStore;
use shared::BlockKey;

use crate::access::Tenant;
use crate::aligned::AlignedBuf;
use crate::high_water::HighWater;
use crate::limits::Limits;
use crate::meta::{
    Attr, CommitAttrs, GatewayId, Ino, LockRequest, MetaEngine, MetaError, SessionId, Slice,
};
use crate::staging::{StagingError, StagingLog, Wait};
pub use incoming::{record_with, BlockInputError, IncomingBlock};

/// What `OpenSession` tells every client: where the data goes and how to stay alive.
#[derive(Debug, Clone)]
pub struct ClientSettings {
    /// The object store the gateway drains to (clients read uploaded blocks from it directly).
    pub store_url: String,
    /// This gateway's id, from its device's superblock; recorded in the slices it stages.
    pub gateway_id: GatewayId,
    /// Where clients reach this gateway's `Staging` service (`--advertise`).
    pub gateway_address: String,
    /// Clients heartbeat at least this often; 3 missed intervals expire a session.
    pub heartbeat_interval: Duration,
    /// Clients write the blocks of a file beyond its first this many bytes straight to the
    /// store (`--direct-threshold`); 0: never.
    pub direct_threshold: u64,
}

/// One gateway: its staging log, the shared metadata, the store.
pub struct Node {
    pub log: Arc<StagingLog>,
    pub meta: Arc<dyn MetaEngine>,
    pub store: Arc<dyn ObjectStore>,
    pub settings: ClientSettings,
    /// What clients can make this gateway hold.
    pub limits: Limits,
    /// The tenant of each session seen lately. A session's tenant never changes, so a cached
    /// answer stays true; a closed session's entry only ages out (the engine refuses it anyway).
    session_tenants: moka::sync::Cache<SessionId, Arc<str>>,
    /// Woken when locks are changed or dropped here: waiting `SetLock`s try again.
    locks_changed: tokio::sync::Notify,
    /// When writes go through to the store instead of the device.
    pub high_water: HighWater,
    /// Merges the slices of chunks that many commits made long.
    pub compactor: compaction::Compactor,
    /// The metadata lives in this node's staging device, so a durable commit ends with an
    /// `fdatasync` of the device, which makes every block written before it durable as well
    /// ([`Node::with_metadata_in_device`]).
    commits_sync_device: bool,
}

/// How often a waiting lock request looks again without being woken: releases at other
/// gateways wake no one here.
const LOCK_RECHECK: Duration = Duration::from_secs(1);

/// Why a step of the core failed; each service maps it to its wire in one place.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error(transparent)]
    Staging(#[from] StagingError),
    #[error(transparent)]
    Block(#[from] BlockInputError),
    /// The task that ran the steps died (a bug): never an answer about the file system.
    #[error("the write task failed: {0}")]
    Task(String),
    /// The client is to write the block through to the store itself (the message starts with
    /// [`proto::WRITE_THROUGH_PREFIX`]); `FAILED_PRECONDITION` on the wire.
    #[error("{0}")]
    WriteThrough(String),
}

/// A `WriteSlice`: a slice shorter than a block, its bytes, and the commit that makes it visible.
#[derive(Debug, Clone)]
pub struct SliceWrite {
    pub session: SessionId,
    pub ino: Ino,
    pub chunk_index: u64,
    pub slice: Slice,
    pub new_size: u64,
    pub attrs: CommitAttrs,
    pub data: Bytes,
    pub crc32c: u32,
    /// The client can write the block through to the store itself (above the high-water mark
    /// it is told to, and nothing is recorded).
    pub can_write_through: bool,
}

impl Node {
    pub fn new(
        log: Arc<StagingLog>,
        meta: Arc<dyn MetaEngine>,
        store: Arc<dyn ObjectStore>,
        settings: ClientSettings,
        limits: Limits,
    ) -> Node {
        Node {
            log,
            meta,
            store,
            settings,
            limits,
            session_tenants: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_idle(Duration::from_secs(3600))
                .build(),
            locks_changed: tokio::sync::Notify::new(),
            high_water: HighWater::off(),
            compactor: compaction::Compactor::new(0),
            commits_sync_device: false,
        }
    }

    /// The metadata engine is redb in this node's staging device (`--meta` the device): its
    /// durable commits `fdatasync` the device, so a `WriteSlice` stages its block without
    /// waiting for the log's own flush and lets its commit's flush cover both. Only for a
    /// device whose durable commits really flush it: never for PostgreSQL or a redb file.
    pub fn with_metadata_in_device(mut self, yes: bool) -> Node {
        self.commits_sync_device = yes;
        self
    }

    /// With `--compact-slices`: chunks of more than `threshold` slices are compacted (once
    /// [`compaction::start`] runs the compactor); 0: never.
    pub fn with_compaction(mut self, threshold: usize) -> Node {
        self.compactor = compaction::Compactor::new(threshold);
        self
    }

    /// Commits a staged slice ([`MetaEngine::commit_slice`]) and counts it for compaction.
    pub async fn commit_slice(
        &self,
        session: SessionId,
        ino: Ino,
        chunk_index: u64,
        slice: &Slice,
        new_size: u64,
        attrs: &CommitAttrs,
    ) -> Result<Attr, MetaError> {
        let attr = self
            .meta
            .commit_slice(session, ino, chunk_index, slice, new_size, attrs)
            .await?;
        self.compactor.note_commit(ino, chunk_index);
        Ok(attr)
    }

    /// [`Node::commit_slice`] of a `WriteSlice`'s slice, whose block this gateway staged after
    /// [`MetaEngine::check_slice_write`]: the commit takes the id's lease.
    async fn commit_written_slice(&self, write: &SliceWrite) -> Result<Attr, MetaError> {
        let attr = self
            .meta
            .commit_written_slice(
                write.session,
                write.ino,
                write.chunk_index,
                &write.slice,
                write.new_size,
                &write.attrs,
            )
            .await?;
        self.compactor.note_commit(write.ino, write.chunk_index);
        Ok(attr)
    }

    /// With `--staging-high-water`: clients that can are told to write blocks through above it.
    pub fn with_high_water(mut self, high_water: HighWater) -> Node {
        self.high_water = high_water;
        self
    }

    /// [`NodeError::WriteThrough`] for block `key` when its client can write it through
    /// (`can_write_through`) and the device is above its high-water mark.
    pub fn stage_or_write_through(
        &self,
        key: &BlockKey,
        can_write_through: bool,
    ) -> Result<(), NodeError> {
        if can_write_through && self.high_water.writes_go_through(&self.log) {
            self.high_water.sent_through(key.len());
            return Err(NodeError::WriteThrough(format!(
                "{}block {key}: the staging device is above its high-water mark",
                proto::WRITE_THROUGH_PREFIX
            )));
        }
        Ok(())
    }

    /// Sets a byte-range lock ([`MetaEngine::set_lock`]); while another owner holds a
    /// conflicting one, waits up to `wait` for it to go (woken by changes at this gateway,
    /// looking again every second for the others'), then fails with EAGAIN.
    pub async fn set_lock(
        &self,
        session: SessionId,
        ino: Ino,
        request: &LockRequest,
        wait: Duration,
    ) -> Result<(), MetaError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // Registered before trying, so a release between the try and the wait is not missed.
            let changed = self.locks_changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            match self.meta.set_lock(session, ino, request).await {
                Ok(()) => {
                    self.locks_changed.notify_waiters();
                    return Ok(());
                }
                Err(MetaError::WouldBlock { .. }) if tokio::time::Instant::now() < deadline => {
                    let recheck = (tokio::time::Instant::now() + LOCK_RECHECK).min(deadline);
                    tokio::select! {
                        _ = changed => {}
                        _ = tokio::time::sleep_until(recheck) => {}
                    }
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// Drops locks ([`MetaEngine::release_locks`]) and wakes the requests waiting here.
    pub async fn release_locks(
        &self,
        session: SessionId,
        ino: Ino,
        owner: Option<u64>,
    ) -> Result<(), MetaError> {
        self.meta.release_locks(session, ino, owner).await?;
        self.locks_changed.notify_waiters();
        Ok(())
    }

    /// Closes a session ([`MetaEngine::close_session`]); its locks go with it.
    pub async fn close_session(&self, session: SessionId) -> Result<(), MetaError> {
        self.meta.close_session(session).await?;
        self.locks_changed.notify_waiters();
        Ok(())
    }

    /// Opens a session of `tenant`; only that tenant's calls may use it.
    pub async fn open_session(
        &self,
        tenant: &Tenant,
        description: &str,
    ) -> Result<SessionId, MetaError> {
        let session = self.meta.open_session(&tenant.name, description).await?;
        self.session_tenants
            .insert(session, Arc::from(tenant.name.as_str()));
        Ok(session)
    }

    /// The session a request names in `wire` (the 16 bytes `OpenSession` returned), if `tenant`
    /// opened it ([`Node::session_of`]).
    pub async fn session_named(
        &self,
        tenant: &Tenant,
        wire: &[u8],
    ) -> Result<SessionId, MetaError> {
        let session = shared::meta::session_from_wire(wire).ok_or_else(|| {
            MetaError::Invalid(format!(
                "session id of {} bytes: a session id is the 16 bytes OpenSession returned",
                wire.len()
            ))
        })?;
        self.session_of(tenant, session).await
    }

    /// `session`, if `tenant` opened it. Another tenant's session is answered as one that does
    /// not exist ([`MetaError::SessionGone`]), so its existence is not told either.
    pub async fn session_of(
        &self,
        tenant: &Tenant,
        session: SessionId,
    ) -> Result<SessionId, MetaError> {
        let owner = match self.session_tenants.get(&session) {
            Some(owner) => owner,
            None => {
                let owner: Arc<str> = Arc::from(self.meta.session(session).await?.tenant);
                self.session_tenants.insert(session, owner.clone());
                owner
            }
        };
        if *owner == *tenant.name {
            Ok(session)
        } else {
            Err(MetaError::SessionGone(session))
        }
    }

    /// Whether `tenant` may stage block `key` for `session` (the bytes a block header names):
    /// the session must be the tenant's and hold the block's slice as pending, recorded far
    /// enough to cover the block. Only that session may put bytes under a slice's keys, so no
    /// client can stage, and have uploaded over the store's object, a block of another's slice.
    /// Without a session only an admin may stage a block (on a gateway without `--tokens`
    /// everyone is one): tools and benchmarks that own the device's data.
    pub async fn may_stage(
        &self,
        tenant: &Tenant,
        session: &[u8],
        key: &BlockKey,
    ) -> Result<(), MetaError> {
        if session.is_empty() {
            if tenant.is_admin() {
                return Ok(());
            }
            return Err(MetaError::NotPermitted(format!(
                "block {key}: a block header must name the session that recorded its slice as \
                 pending (token {:?} is not an admin's)",
                tenant.name
            )));
        }
        let session = self.session_named(tenant, session).await?;
        let end = u64::from(key.block_index) * shared::BLOCK_SIZE + key.len();
        match self.meta.pending_slice(session, key.slice_id).await? {
            // Readers ask the gateway the slice names: staged anywhere else, its data would be
            // unreadable until uploaded.
            Some((_, gateway)) if gateway != self.settings.gateway_id => {
                Err(MetaError::NotPermitted(format!(
                    "block {key}: slice {} was recorded as staged on gateway {}, not on this one \
                     ({})",
                    key.slice_id,
                    uuid::Uuid::from_bytes(gateway),
                    uuid::Uuid::from_bytes(self.settings.gateway_id)
                )))
            }
            Some((len, _)) if end <= u64::from(len) => Ok(()),
            Some((len, _)) => Err(MetaError::NotPermitted(format!(
                "block {key} ends at byte {end} of its slice, but session {session:032x} \
                 recorded only {len} bytes of it as pending"
            ))),
            None => Err(MetaError::NotPermitted(format!(
                "block {key}: slice {} is not pending for session {session:032x} (only the \
                 session that recorded it as pending may stage its blocks, until its commit)",
                key.slice_id
            ))),
        }
    }

    /// Stages one block whose record was assembled from a client's bytes; answers once durable.
    pub async fn stage(
        &self,
        key: BlockKey,
        block: (AlignedBuf, u32),
    ) -> Result<u64, StagingError> {
        self.stage_then(key, block, Wait::Durable).await
    }

    /// [`Node::stage`], waiting for `wait`.
    async fn stage_then(
        &self,
        key: BlockKey,
        (record, crc): (AlignedBuf, u32),
        wait: Wait,
    ) -> Result<u64, StagingError> {
        self.log
            .write_block(key, record, crc, wait)
            .await
            .inspect_err(|e| tracing::warn!(%key, error = %e, "block write refused"))
    }

    /// On a mirror region's gateway, the block of a `WriteSlice` staged here before its pending
    /// record and commit go to the source region in one call ([`crate::mirror`]); only once
    /// this gateway's standby shows the slice id still leased to the caller's session, so that
    /// nobody stages under another's block key. Should the commit then fail, the block is an
    /// orphan (as after a crash between staging and committing): uploaded, named by nothing,
    /// and removed by gc.
    pub async fn stage_slice_here(
        &self,
        tenant: &Tenant,
        session: &[u8],
        slice: &Slice,
        data: &[u8],
        crc32c: u32,
    ) -> Result<(), NodeError> {
        let key = self.slice_block_here(slice, data.len())?;
        let session = self.session_named(tenant, session).await?;
        if !self.meta.slice_leased(session, slice.slice_id).await? {
            return Err(MetaError::NotPermitted(format!(
                "slice id {} was not handed to this session, or was staged already",
                slice.slice_id
            ))
            .into());
        }
        let mut block = IncomingBlock::for_key(key, key.to_string().len());
        block.append(data)?;
        self.stage(key, block.finish(crc32c)?).await?;
        Ok(())
    }

    /// The key of the one block of a `WriteSlice` for this gateway carrying `data_len` bytes:
    /// the slice must name this gateway (its readers ask the one it names) and carry its length.
    fn slice_block_here(&self, slice: &Slice, data_len: usize) -> Result<BlockKey, NodeError> {
        if slice.gateway_id != self.settings.gateway_id {
            return Err(MetaError::Invalid(format!(
                "slice {} names gateway {}, but this gateway is {}",
                slice.slice_id,
                uuid::Uuid::from_bytes(slice.gateway_id),
                uuid::Uuid::from_bytes(self.settings.gateway_id)
            ))
            .into());
        }
        if data_len as u64 != u64::from(slice.len) {
            return Err(MetaError::Invalid(format!(
                "slice {} is {} bytes long but carries {data_len} bytes",
                slice.slice_id, slice.len,
            ))
            .into());
        }
        Ok(BlockKey::new(slice.slice_id, 0, slice.len)
            .map_err(|e| MetaError::Invalid(e.to_string()))?)
    }

    /// Checks that the slice is the caller's to stage, stages its block on this gateway's
    /// device and commits it (the commit takes the slice id's lease): one round trip and one
    /// write transaction for a small file or an append. Runs to the end in a task of its own
    /// even if the caller goes away, so a staged block is never left unaccounted for: should
    /// the commit fail, the slice is recorded as pending, and goes with the session.
    pub async fn write_slice(self: &Arc<Self>, write: SliceWrite) -> Result<Attr, NodeError> {
        let slice = write.slice;
        let key = self.slice_block_here(&slice, write.data.len())?;
        self.stage_or_write_through(&key, write.can_write_through)?;
        let node = self.clone();
        let steps = async move {
            let started = std::time::Instant::now();
            let staged = match node
                .meta
                .check_slice_write(write.session, write.ino, &slice)
                .await
            {
                Ok(()) => {
                    // The key is parsed and matches the data's length (it was made from it).
                    let mut block = IncomingBlock::for_key(key, key.to_string().len());
                    block.append(&write.data)?;
                    // With the metadata in this device, the commit's own `fdatasync` covers
                    // the block too: one flush for both, where there were two in series. The
                    // block's write overlaps the commit's transaction; the region's page writes
                    // and flush wait for it.
                    let wait = if node.commits_sync_device {
                        Wait::Queued
                    } else {
                        Wait::Durable
                    };
                    node.stage_then(key, block.finish(write.crc32c)?, wait)
                        .await?;
                    true
                }
                // Not this session's to stage, or staged and committed already: a retry of a
                // write whose answer was lost finds its slice in the chunk and is answered as
                // before; anything else the commit refuses. Nothing is staged either way.
                Err(MetaError::NotPermitted(_)) => false,
                Err(error) => return Err(error.into()),
            };
            // The two steps of a small file's `close`, timed apart: what each costs shows
            // where its latency goes (a retry that staged nothing is no staging).
            if staged {
                metrics::histogram!("stagefs_gateway_write_slice_seconds", "step" => "stage")
                    .record(started.elapsed().as_secs_f64());
            }
            let committing = std::time::Instant::now();
            let committed = node.commit_written_slice(&write).await;
            metrics::histogram!("stagefs_gateway_write_slice_seconds", "step" => "commit")
                .record(committing.elapsed().as_secs_f64());
            if let (Err(error), true) = (&committed, staged) {
                // The block is staged and named by nothing. As a pending slice of the session
                // it is deleted when the session ends; if the lease is gone (the session ended,
                // or a retry of this write committed it), the record is refused, and the block
                // is either named by the file or left to `gc` as after a crash.
                let recorded = node.meta.record_pending_slice(write.session, &slice).await;
                tracing::warn!(
                    slice_id = slice.slice_id, ino = write.ino, %error,
                    recorded_pending = ?recorded.err().map(|e| e.to_string()),
                    "a WriteSlice's commit failed after its block was staged"
                );
            }
            Ok(committed?)
        };
        tokio::spawn(steps)
            .await
            .map_err(|e| NodeError::Task(e.to_string()))?
    }
}
