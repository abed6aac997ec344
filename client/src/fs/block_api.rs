//! The data path: whole blocks written durably to a gateway, block ranges read back from the
//! gateway or, once it no longer holds them, from the object store.
//!
//! [`BlockApi`] is one gateway's `Staging` service as the file-system core uses it;
//! [`super::block_grpc::GrpcBlocks`] is the real one and [`MemoryBlocks`] the in-memory double
//! of tests; [`StoreBlocks`] skips the gateway and writes through to the object store (the
//! `--write-mode through` baseline). [`BlockSource`] adds the read fallback of DESIGN.md ("Read path"): a gateway that
//! has uploaded and dropped a block answers "not here", and the block is read from the store.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use shared::meta::SessionId;
use shared::BlockKey;

use super::error::{FsError, FsResult};
use super::gateways::GatewayDirectory;
use super::meta_api::{GatewayId, Ino};

/// One gateway's block service.
#[async_trait]
pub trait BlockApi: Send + Sync + 'static {
    /// Stages a whole block of a slice `session` recorded as pending; returns once the gateway
    /// has made it durable on its device. Blocks are immutable, so writing the same key with
    /// the same bytes again is harmless.
    async fn write_block(&self, session: SessionId, key: BlockKey, data: Bytes) -> FsResult<()>;
    /// Bytes `range` (within the block) of a block the gateway holds; `Ok(None)` when it does
    /// not hold it (any more): the caller then reads the object store. With `from_store`, the
    /// gateway reads the store itself for a block it does not hold (`None`: neither has it).
    async fn read_block(
        &self,
        key: BlockKey,
        range: Range<u64>,
        home: &BlockHome,
        from_store: bool,
    ) -> FsResult<Option<Bytes>>;
}

/// Where a block belongs: the gateway that staged its slice (the first place to read it from),
/// and the chunk of the file that lists the slice (a gateway checks it for a tenant confined to
/// a directory).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockHome {
    pub gateway_id: GatewayId,
    pub ino: Ino,
    pub chunk_index: u64,
}

/// Where blocks are read from: the gateway that staged them first, the object store when that
/// gateway does not hold the block (any more), is not alive, or fails to serve it (uploaded
/// blocks stay readable while it is down). A client not given the store (a tenant confined to
/// a directory) has the gateways read it: the one that staged the block, or, while that one is
/// unreachable, the one that chunk's new slices go to.
pub struct BlockSource {
    gateways: Arc<dyn GatewayDirectory>,
    store: Option<Arc<dyn ObjectStore>>,
}

impl BlockSource {
    pub fn new(gateways: Arc<dyn GatewayDirectory>, store: Option<Arc<dyn ObjectStore>>) -> Self {
        BlockSource { gateways, store }
    }

    /// Bytes `range` of block `key` from the object store: through the mount's read-cache
    /// gateway (which keeps it), directly, or through a live gateway.
    async fn read_store(
        &self,
        key: BlockKey,
        range: Range<u64>,
        home: &BlockHome,
        cache: Option<&Arc<dyn BlockApi>>,
    ) -> FsResult<Option<Bytes>> {
        if let Some(near) = cache {
            match near.read_block(key, range.clone(), home, true).await {
                Ok(found) => return Ok(found),
                Err(e) if self.store.is_some() => {
                    tracing::debug!(%key, error = %e, "read-cache gateway failed; reading the store directly");
                }
                Err(e) => return Err(e),
            }
        }
        let Some(store) = &self.store else {
            let route = self.gateways.route(home.ino, home.chunk_index).await?;
            return route.blocks.read_block(key, range, home, true).await;
        };
        match store.get_range(&key.object_path(), range).await {
            Ok(data) => Ok(Some(data)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(FsError::Store {
                key: key.to_string(),
                message: e.to_string(),
            }),
        }
    }

    /// Bytes `range` of block `key`, staged by gateway `home.gateway_id`: exactly
    /// `range.end - range.start` of them. A block that is not in the store while its gateway
    /// cannot be reached is waited for, up to the directory's takeover wait: it is on that
    /// gateway's device, and comes back with the gateway (restarted, or taken over elsewhere).
    pub async fn read(
        &self,
        key: BlockKey,
        range: Range<u64>,
        home: &BlockHome,
    ) -> FsResult<Bytes> {
        let want = range.end.saturating_sub(range.start);
        if range.end > key.len() || range.start > range.end {
            return Err(FsError::Internal(format!(
                "read of {range:?} outside block {key} of {} bytes",
                key.len()
            )));
        }
        // A gateway near this mount that keeps a read cache is asked first: a block warmed
        // there, or read through it before, comes from its device. Then the gateway that staged
        // the block; then the store, through the near gateway so that it keeps the block.
        let cache = self.gateways.read_cache().await;
        let home_caches = cache.as_ref().is_some_and(|(id, _)| *id == home.gateway_id);
        if let Some((id, near)) = cache.as_ref().filter(|_| !home_caches) {
            match near.read_block(key, range.clone(), home, false).await {
                Ok(Some(data)) => return check_len(&key, data, want),
                Ok(None) => {}
                Err(e) => {
                    tracing::debug!(%key, error = %e, "read-cache gateway failed; reading elsewhere");
                    self.gateways.forget(id);
                }
            }
        }
        let cache = cache.map(|(_, near)| near);
        let wait = self.gateways.takeover_wait();
        let deadline = std::time::Instant::now() + wait;
        let mut waited = false;
        loop {
            let unreachable = match self
                .read_from_gateway(key, range.clone(), home, home_caches)
                .await
            {
                FromGateway::Held(data) => return check_len(&key, data, want),
                // Without a store of its own, or as the read cache, the gateway looked there too.
                FromGateway::NotHeld if self.store.is_none() || home_caches => {
                    return Err(FsError::BlockMissing {
                        key: key.to_string(),
                    })
                }
                FromGateway::NotHeld => None,
                FromGateway::Unreachable(e) => Some(e),
            };
            // A read-cache gateway that staged the block already looked in the store.
            let near = cache.as_ref().filter(|_| !home_caches);
            let from_store = match self.read_store(key, range.clone(), home, near).await {
                // Another gateway failing is not the one that staged it coming back.
                Err(e) if unreachable.is_some() && e.is_transient() => None,
                other => other?,
            };
            if let Some(data) = from_store {
                return check_len(&key, data, want);
            }
            // A gateway that answered "not here" uploaded or dropped it: nothing to wait for.
            let Some(error) = unreachable else {
                return Err(FsError::BlockMissing {
                    key: key.to_string(),
                });
            };
            let gateway = uuid_text(&home.gateway_id);
            // A copy that failed verification does not get better by waiting.
            if !error.is_transient() || std::time::Instant::now() >= deadline {
                if waited {
                    tracing::error!(%key, %gateway, ?wait, %error, "block not uploaded and its gateway did not come back within the takeover wait");
                }
                return Err(error);
            }
            if !waited {
                tracing::warn!(%key, %gateway, ?wait, %error, "block not uploaded and its gateway is unreachable: waiting for it to come back");
                waited = true;
            }
            tokio::time::sleep(TAKEOVER_POLL).await;
            self.gateways.refresh().await;
        }
    }

    /// The block from the gateway that staged it (which reads the store for it when this
    /// client has none, or when it is the mount's read-cache gateway: `caches`). A gateway that
    /// fails is resolved afresh and tried once more: it may have restarted at another address.
    async fn read_from_gateway(
        &self,
        key: BlockKey,
        range: Range<u64>,
        home: &BlockHome,
        caches: bool,
    ) -> FromGateway {
        let gateway_id = &home.gateway_id;
        let mut last_error = None;
        for _ in 0..2 {
            let gateway = match self.gateways.blocks_of(gateway_id).await {
                Ok(Some(gateway)) => gateway,
                Ok(None) => {
                    return FromGateway::Unreachable(FsError::GatewayUnavailable {
                        key: key.to_string(),
                        message: format!(
                            "gateway {} that staged it is not alive in the registry",
                            uuid_text(gateway_id)
                        ),
                    })
                }
                Err(e) => return FromGateway::Unreachable(e),
            };
            match gateway
                .read_block(key, range.clone(), home, self.store.is_none() || caches)
                .await
            {
                Ok(Some(data)) => return FromGateway::Held(data),
                Ok(None) => return FromGateway::NotHeld,
                // Unreachable, or its copy fails verification: an uploaded copy may still be
                // good.
                Err(e) => {
                    self.gateways.forget(gateway_id);
                    last_error = Some(e);
                }
            }
        }
        FromGateway::Unreachable(last_error.expect("the loop ran"))
    }
}

/// How often a reader waiting for a gateway to come back looks again.
const TAKEOVER_POLL: std::time::Duration = std::time::Duration::from_secs(1);

/// What the gateway that staged a block said about it.
enum FromGateway {
    Held(Bytes),
    /// It answered that it does not hold the block (any more).
    NotHeld,
    /// It could not be asked, or its copy failed verification.
    Unreachable(FsError),
}

/// A gateway id as operators see it (the uuid on its device).
pub fn uuid_text(id: &GatewayId) -> String {
    uuid::Uuid::from_bytes(*id).to_string()
}

/// Write-through blocks: each block goes straight to the object store, and a write returns once
/// the store has acknowledged the PUT. No gateway holds them, so reads always go to the store.
pub struct StoreBlocks {
    store: Arc<dyn ObjectStore>,
}

impl StoreBlocks {
    pub fn new(store: Arc<dyn ObjectStore>) -> Self {
        StoreBlocks { store }
    }
}

#[async_trait]
impl BlockApi for StoreBlocks {
    async fn write_block(&self, _session: SessionId, key: BlockKey, data: Bytes) -> FsResult<()> {
        if data.len() as u64 != key.len() {
            return Err(FsError::Internal(format!(
                "{} bytes for block {key} of {}",
                data.len(),
                key.len()
            )));
        }
        self.store
            .put(&key.object_path(), PutPayload::from_bytes(data))
            .await
            .map(|_| ())
            .map_err(|e| FsError::Store {
                key: key.to_string(),
                message: e.to_string(),
            })
    }

    async fn read_block(
        &self,
        _key: BlockKey,
        _range: Range<u64>,
        _home: &BlockHome,
        _from_store: bool,
    ) -> FsResult<Option<Bytes>> {
        Ok(None)
    }
}

fn check_len(key: &BlockKey, data: Bytes, want: u64) -> FsResult<Bytes> {
    if data.len() as u64 != want {
        return Err(FsError::BlockCorrupt {
            key: key.to_string(),
            message: format!("{} bytes where {want} were asked for", data.len()),
        });
    }
    Ok(data)
}

/// An in-memory gateway for tests: blocks live in a map until [`MemoryBlocks::drain_to`] moves
/// them to an object store, after which reads answer "not here" like an uploading gateway.
#[derive(Default)]
pub struct MemoryBlocks {
    blocks: Mutex<HashMap<BlockKey, Bytes>>,
    writes: AtomicU64,
    reads: AtomicU64,
    fail_writes: AtomicBool,
}

impl MemoryBlocks {
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of blocks held.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of successful block writes so far (rewrites of a held block count too).
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    /// Number of block reads asked of it so far.
    pub fn reads(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
    }

    /// Makes every write fail as if the gateway were unreachable (or work again).
    pub fn set_fail_writes(&self, fail: bool) {
        self.fail_writes.store(fail, Ordering::Relaxed);
    }

    /// The keys held, sorted.
    pub fn keys(&self) -> Vec<BlockKey> {
        let mut keys: Vec<BlockKey> = self.lock().keys().copied().collect();
        keys.sort();
        keys
    }

    /// "Uploads" every held block to `store` and forgets it; returns how many moved.
    pub async fn drain_to(&self, store: &dyn ObjectStore) -> FsResult<usize> {
        let blocks: Vec<(BlockKey, Bytes)> = self.lock().drain().collect();
        for (key, data) in &blocks {
            store
                .put(&key.object_path(), PutPayload::from_bytes(data.clone()))
                .await
                .map_err(|e| FsError::Store {
                    key: key.to_string(),
                    message: e.to_string(),
                })?;
        }
        Ok(blocks.len())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<BlockKey, Bytes>> {
        // A panic elsewhere while holding the lock leaves the map itself consistent.
        self.blocks.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl BlockApi for MemoryBlocks {
    async fn write_block(&self, _session: SessionId, key: BlockKey, data: Bytes) -> FsResult<()> {
        if self.fail_writes.load(Ordering::Relaxed) {
            return Err(FsError::GatewayUnavailable {
                key: key.to_string(),
                message: "test gateway is failing writes".into(),
            });
        }
        if data.len() as u64 != key.len() {
            return Err(FsError::BlockRejected {
                key: key.to_string(),
                no_space: false,
                message: format!("{} bytes for a key of {}", data.len(), key.len()),
            });
        }
        let mut blocks = self.lock();
        // Same key, other bytes: what the real gateway refuses with ALREADY_EXISTS. It would
        // mean a client reused a slice id, so tests must see it.
        if let Some(held) = blocks.get(&key) {
            if *held != data {
                return Err(FsError::BlockRejected {
                    key: key.to_string(),
                    no_space: false,
                    message: "already staged with other bytes".into(),
                });
            }
        }
        blocks.insert(key, data);
        self.writes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    async fn read_block(
        &self,
        key: BlockKey,
        range: Range<u64>,
        _home: &BlockHome,
        _from_store: bool,
    ) -> FsResult<Option<Bytes>> {
        self.reads.fetch_add(1, Ordering::Relaxed);
        let blocks = self.lock();
        let Some(data) = blocks.get(&key) else {
            return Ok(None);
        };
        let end = (range.end as usize).min(data.len());
        let start = (range.start as usize).min(end);
        Ok(Some(data.slice(start..end)))
    }
}
