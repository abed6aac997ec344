//! Tests only: [`MetaApi`] over the embedded metadata engine (`gateway::meta`, on redb)
//! in-process, so the file-system core runs against the real engine without a gateway.
//!
//! Errors keep the errno the engine chose, as the gRPC service passes it on.

use std::ops::Range;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use gateway::meta::{self as engine, KvMeta, MetaEngine, MetaLocation};

use super::block_api::BlockApi;
use super::error::{FsError, FsResult};
use super::meta_api::{
    write_slice_unsupported, Attr, CommitAttrs, DirEntry, GatewayId, GatewayInfo, HeldLock, Ino,
    LockRequest, MetaApi, MountView, NewNode, Opened, Renamed, SessionGrant, SessionId, SetAttr,
    Slice, StatFs,
};

/// The gateway id the in-process engine hands out.
pub const LOCAL_GATEWAY_ID: GatewayId = [7; 16];

/// A held `getattr` answer: who to tell it was read, and what to wait for before returning it.
type GetattrPause = (
    tokio::sync::oneshot::Sender<()>,
    tokio::sync::oneshot::Receiver<()>,
);

/// The embedded engine, called directly.
#[derive(Clone)]
pub struct LocalMeta {
    engine: Arc<KvMeta>,
    /// Where `write_slice` stages blocks, as the gateway that serves the metadata does; without
    /// it `write_slice` answers ENOSYS, as a metadata service without a device would.
    staging: Option<Arc<dyn BlockApi>>,
    /// `write_slice` calls that committed.
    slices_written: Arc<AtomicU64>,
    /// The next `write_slice` commits and then fails, as if its answer were lost.
    lose_next_answer: Arc<AtomicBool>,
    /// The next `getattr` reads its answer, says so on the sender and waits for the receiver
    /// before returning it: a test runs something between an answer and its arrival.
    pause_getattr: Arc<std::sync::Mutex<Option<GetattrPause>>>,
    /// Calls of the operations tests count, by name.
    calls: Arc<std::sync::Mutex<std::collections::HashMap<&'static str, u64>>>,
    /// The session this face's additions of names are tagged with, as a mount's are
    /// ([`LocalMeta::for_session`]), and the count its slots and sequences come from.
    tag_session: Option<engine::SessionId>,
    tags: Arc<AtomicU64>,
}

impl LocalMeta {
    /// A fresh database in `dir`, without fsync per commit (tests need one process's view only).
    pub async fn open(dir: &Path) -> Self {
        let config = engine::MetaConfig {
            sync_commits: false,
            ..engine::MetaConfig::default()
        };
        let engine = engine::open(&MetaLocation::Redb(dir.join("meta.redb")), config)
            .await
            .unwrap_or_else(|e| panic!("test metadata engine in {}: {e}", dir.display()));
        LocalMeta {
            engine: Arc::new(engine),
            staging: None,
            slices_written: Arc::new(AtomicU64::new(0)),
            lose_next_answer: Arc::new(AtomicBool::new(false)),
            pause_getattr: Arc::default(),
            calls: Arc::default(),
            tag_session: None,
            tags: Arc::default(),
        }
    }

    /// A face whose additions of names carry a change tag of `session`, as a mount's calls do
    /// (so the engine tells the holder of a directory lease from everyone else).
    pub fn for_session(&self, session: engine::SessionId) -> LocalMeta {
        LocalMeta {
            tag_session: Some(session),
            tags: Arc::default(),
            ..self.clone()
        }
    }

    /// Runs `work` under the next change tag of this face's session, if it has one: a slot per
    /// change in flight (as many as the engine allows), a sequence that grows with each use.
    async fn tagged<T>(&self, work: impl std::future::Future<Output = T>) -> T {
        let tag = self.tag_session.map(|session| {
            let n = self.tags.fetch_add(1, Ordering::SeqCst);
            let slots = u64::from(engine::once::MAX_SLOTS);
            engine::once::RequestTag {
                session,
                slot: (n % slots) as u16,
                seq: n / slots + 1,
                retry: false,
            }
        });
        engine::once::scope(tag, work).await
    }

    /// Serves `write_slice`, staging its blocks on `blocks`.
    pub fn with_staging(mut self, blocks: Arc<dyn BlockApi>) -> Self {
        self.staging = Some(blocks);
        self
    }

    pub fn slices_written(&self) -> u64 {
        self.slices_written.load(Ordering::SeqCst)
    }

    /// Holds the next `getattr`'s answer: the first receiver fires once it is read, and it
    /// returns once the second sender fires.
    pub fn pause_next_getattr(
        &self,
    ) -> (
        tokio::sync::oneshot::Receiver<()>,
        tokio::sync::oneshot::Sender<()>,
    ) {
        let (answered, read) = tokio::sync::oneshot::channel();
        let (go, wait) = tokio::sync::oneshot::channel();
        *self.pause_getattr.lock().unwrap() = Some((answered, wait));
        (read, go)
    }

    /// How many `op` calls (`getattr`, `setattr`, `sync`, `release`, `read_chunk`) reached the
    /// engine.
    pub fn calls(&self, op: &str) -> u64 {
        let calls = self.calls.lock().unwrap();
        calls.get(op).copied().unwrap_or(0)
    }

    fn count(&self, op: &'static str) {
        *self.calls.lock().unwrap().entry(op).or_default() += 1;
    }

    pub fn lose_next_write_slice_answer(&self) {
        self.lose_next_answer.store(true, Ordering::SeqCst);
    }

    pub fn engine(&self) -> &KvMeta {
        &self.engine
    }
}

fn fail(op: &'static str) -> impl Fn(engine::MetaError) -> FsError {
    move |e| FsError::Meta {
        op,
        errno: e.errno(),
        message: e.to_string(),
    }
}

#[async_trait]
impl MetaApi for LocalMeta {
    async fn open_session(&self, description: &str) -> FsResult<SessionGrant> {
        let session_id = self
            .engine
            .open_session("", description)
            .await
            .map_err(fail("open_session"))?;
        Ok(SessionGrant {
            session_id,
            store_url: "memory://".into(),
            gateway_id: LOCAL_GATEWAY_ID,
            gateway_address: String::new(),
            heartbeat_interval: None,
            direct_threshold: 0,
            read_through_gateway: false,
            mirror: false,
        })
    }

    async fn heartbeat(&self, session: SessionId, view: &MountView) -> FsResult<()> {
        self.engine
            .heartbeat(session, view)
            .await
            .map_err(fail("heartbeat"))
    }

    async fn close_session(&self, session: SessionId) -> FsResult<()> {
        self.engine
            .close_session(session)
            .await
            .map_err(fail("close_session"))
    }

    async fn lookup(&self, parent: Ino, name: &[u8]) -> FsResult<Attr> {
        self.count("lookup");
        self.engine
            .lookup(parent, name)
            .await
            .map_err(fail("lookup"))
    }

    async fn getattr(&self, ino: Ino) -> FsResult<Attr> {
        self.count("getattr");
        let answer = self.engine.getattr(ino).await.map_err(fail("getattr"));
        let pause = self.pause_getattr.lock().unwrap().take();
        if let Some((answered, wait)) = pause {
            let _ = answered.send(());
            let _ = wait.await;
        }
        answer
    }

    async fn setattr(&self, ino: Ino, changes: &SetAttr) -> FsResult<Attr> {
        self.count("setattr");
        self.engine
            .setattr(ino, changes)
            .await
            .map_err(fail("setattr"))
    }

    async fn create(
        &self,
        session: SessionId,
        parent: Ino,
        name: &[u8],
        node: &NewNode,
    ) -> FsResult<Attr> {
        self.tagged(self.engine.create(session, parent, name, node))
            .await
            .map_err(fail("create"))
    }

    async fn mknod(&self, parent: Ino, name: &[u8], node: &NewNode) -> FsResult<Attr> {
        self.tagged(self.engine.mknod(parent, name, node))
            .await
            .map_err(fail("mknod"))
    }

    async fn mkdir(
        &self,
        parent: Ino,
        name: &[u8],
        mode: u32,
        uid: u32,
        gid: u32,
    ) -> FsResult<Attr> {
        self.tagged(self.engine.mkdir(parent, name, mode, uid, gid))
            .await
            .map_err(fail("mkdir"))
    }

    async fn symlink(
        &self,
        parent: Ino,
        name: &[u8],
        target: &[u8],
        uid: u32,
        gid: u32,
    ) -> FsResult<Attr> {
        self.tagged(self.engine.symlink(parent, name, target, uid, gid))
            .await
            .map_err(fail("symlink"))
    }

    async fn readlink(&self, ino: Ino) -> FsResult<Vec<u8>> {
        self.engine.readlink(ino).await.map_err(fail("readlink"))
    }

    async fn unlink(&self, parent: Ino, name: &[u8]) -> FsResult<()> {
        self.engine
            .unlink(parent, name)
            .await
            .map_err(fail("unlink"))
    }

    async fn rmdir(&self, parent: Ino, name: &[u8]) -> FsResult<()> {
        self.engine.rmdir(parent, name).await.map_err(fail("rmdir"))
    }

    async fn rename(
        &self,
        parent: Ino,
        name: &[u8],
        new_parent: Ino,
        new_name: &[u8],
        flags: u32,
    ) -> FsResult<Renamed> {
        let mode = engine::RenameMode::from_flags(flags).map_err(fail("rename"))?;
        self.tagged(self.engine.rename(parent, name, new_parent, new_name, mode))
            .await
            .map_err(fail("rename"))
    }

    async fn link(&self, ino: Ino, new_parent: Ino, new_name: &[u8]) -> FsResult<Attr> {
        self.tagged(self.engine.link(ino, new_parent, new_name))
            .await
            .map_err(fail("link"))
    }

    async fn readdir(&self, ino: Ino, after_cookie: u64, limit: u32) -> FsResult<Vec<DirEntry>> {
        self.engine
            .readdir(ino, after_cookie, limit as usize)
            .await
            .map_err(fail("readdir"))
    }

    async fn getxattr(&self, ino: Ino, name: &[u8]) -> FsResult<Vec<u8>> {
        self.engine
            .getxattr(ino, name)
            .await
            .map_err(fail("getxattr"))
    }

    async fn setxattr(&self, ino: Ino, name: &[u8], value: &[u8], flags: u32) -> FsResult<()> {
        let mode = engine::XattrMode::from_flags(flags).map_err(fail("setxattr"))?;
        self.engine
            .setxattr(ino, name, value, mode)
            .await
            .map_err(fail("setxattr"))
    }

    async fn listxattr(&self, ino: Ino) -> FsResult<Vec<Vec<u8>>> {
        self.engine.listxattr(ino).await.map_err(fail("listxattr"))
    }

    async fn removexattr(&self, ino: Ino, name: &[u8]) -> FsResult<()> {
        self.engine
            .removexattr(ino, name)
            .await
            .map_err(fail("removexattr"))
    }

    async fn list_gateways(&self) -> FsResult<Vec<GatewayInfo>> {
        let records = self
            .engine
            .list_gateways()
            .await
            .map_err(fail("list_gateways"))?;
        Ok(records
            .into_iter()
            .map(|g| GatewayInfo {
                id: g.id,
                address: g.address,
                epoch: g.epoch,
                alive: true,
                staged_blocks: g.staged_blocks,
                staged_bytes: g.staged_bytes,
                mirror: g.mirror,
            })
            .collect())
    }

    async fn statfs(&self) -> FsResult<StatFs> {
        self.engine.statfs().await.map_err(fail("statfs"))
    }

    async fn sync(&self) -> FsResult<()> {
        self.count("sync");
        self.engine.sync().await.map_err(fail("sync"))
    }

    async fn open(&self, session: SessionId, ino: Ino, first_chunk: bool) -> FsResult<Opened> {
        let attr = self.engine.open(session, ino).await.map_err(fail("open"))?;
        let first_chunk = if first_chunk {
            engine::first_chunk(self.engine.as_ref(), &attr)
                .await
                .map_err(fail("open"))?
        } else {
            None
        };
        Ok(Opened { attr, first_chunk })
    }

    async fn release(&self, session: SessionId, inos: &[Ino]) -> FsResult<()> {
        self.count("release");
        self.engine
            .release(session, inos)
            .await
            .map_err(fail("release"))
    }

    async fn take_dir_lease(&self, session: SessionId, dir: Ino) -> FsResult<bool> {
        self.count("take_dir_lease");
        self.engine
            .take_dir_lease(session, dir)
            .await
            .map_err(fail("take_dir_lease"))
    }

    async fn keep_dir_leases(
        &self,
        session: SessionId,
        keep: &[Ino],
        release: &[Ino],
    ) -> FsResult<Vec<bool>> {
        self.count("keep_dir_leases");
        self.engine
            .keep_dir_leases(session, keep, release)
            .await
            .map_err(fail("keep_dir_leases"))
    }

    async fn set_lock(
        &self,
        session: SessionId,
        ino: Ino,
        lock: &LockRequest,
        wait: std::time::Duration,
    ) -> FsResult<()> {
        // No gateway to wake waiters here: look again every 10 ms until `wait` has passed.
        let deadline = std::time::Instant::now() + wait;
        loop {
            match self.engine.set_lock(session, ino, lock).await {
                Err(engine::MetaError::WouldBlock { .. })
                    if std::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await
                }
                other => return other.map_err(fail("set_lock")),
            }
        }
    }

    async fn get_lock(
        &self,
        session: SessionId,
        ino: Ino,
        lock: &LockRequest,
    ) -> FsResult<Option<HeldLock>> {
        self.engine
            .get_lock(session, ino, lock)
            .await
            .map_err(fail("get_lock"))
    }

    async fn release_locks(
        &self,
        session: SessionId,
        ino: Ino,
        owner: Option<u64>,
    ) -> FsResult<()> {
        self.engine
            .release_locks(session, ino, owner)
            .await
            .map_err(fail("release_locks"))
    }

    async fn read_chunk(&self, ino: Ino, chunk_index: u64) -> FsResult<Vec<Slice>> {
        self.count("read_chunk");
        self.engine
            .read_chunk(ino, chunk_index)
            .await
            .map_err(fail("read_chunk"))
    }

    async fn allocate_slice_ids(&self, session: SessionId, count: u32) -> FsResult<Range<u64>> {
        self.engine
            .allocate_slice_ids(session, u64::from(count))
            .await
            .map_err(fail("allocate_slice_ids"))
    }

    async fn record_pending_slice(&self, session: SessionId, slice: &Slice) -> FsResult<()> {
        self.engine
            .record_pending_slice(session, slice)
            .await
            .map_err(fail("record_pending_slice"))
    }

    async fn commit_slice(
        &self,
        session: SessionId,
        ino: Ino,
        chunk_index: u64,
        slice: &Slice,
        new_size: u64,
        attrs: &CommitAttrs,
    ) -> FsResult<Attr> {
        self.engine
            .commit_slice(session, ino, chunk_index, slice, new_size, attrs)
            .await
            .map_err(fail("commit_slice"))
    }

    async fn write_slice(
        &self,
        session: SessionId,
        ino: Ino,
        chunk_index: u64,
        slice: &Slice,
        new_size: u64,
        attrs: &CommitAttrs,
        data: Bytes,
    ) -> FsResult<Attr> {
        let Some(staging) = &self.staging else {
            return Err(write_slice_unsupported("no staging in this test"));
        };
        // As the gateway does it (`Node::write_slice`): checked, staged, and the commit takes the
        // slice id's lease.
        self.engine
            .check_slice_write(session, ino, slice)
            .await
            .map_err(fail("write_slice"))?;
        let key = shared::BlockKey::new(slice.slice_id, 0, slice.len)
            .map_err(|e| FsError::Internal(e.to_string()))?;
        staging.write_block(session, key, data).await?;
        let attr = self
            .engine
            .commit_written_slice(session, ino, chunk_index, slice, new_size, attrs)
            .await
            .map_err(fail("write_slice"))?;
        self.slices_written.fetch_add(1, Ordering::SeqCst);
        if self.lose_next_answer.swap(false, Ordering::SeqCst) {
            return Err(FsError::MetaUnavailable {
                op: "write_slice",
                message: "the answer was lost".into(),
            });
        }
        Ok(attr)
    }
}
