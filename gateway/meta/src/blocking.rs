//! A synchronous face of a [`MetaEngine`] with a runtime of its own, for tests and tools that are
//! not async: the conformance suite and the model test run against every backend through it.

use std::ops::Range;
use std::sync::Arc;

use crate::{
    Attr, CommitAttrs, DeletedSlice, DirEntry, DirUsage, GatewayId, GatewayLoad, GatewayRecord,
    HeldLock, Ino, LockRequest, MetaEngine, MountView, NewNode, RenameMode, Renamed, Result,
    SessionId, SessionInfo, SetAttr, Slice, StatFs, TenantUsage, TimeNs, XattrMode,
};

/// Every [`MetaEngine`] call, blocking until it returns. Callable from many threads at once.
pub struct BlockingMeta {
    engine: Arc<dyn MetaEngine>,
    runtime: tokio::runtime::Runtime,
}

macro_rules! blocking {
    ($($name:ident($($arg:ident: $ty:ty),*) -> $out:ty;)*) => {$(
        pub fn $name(&self, $($arg: $ty),*) -> Result<$out> {
            self.runtime.block_on(self.engine.$name($($arg),*))
        }
    )*};
}

impl BlockingMeta {
    /// Opens an engine with `open` on a fresh runtime (where its connections and tasks live).
    pub fn start<F, E>(open: F) -> Result<BlockingMeta>
    where
        F: FnOnce() -> E,
        E: std::future::Future<Output = Result<Arc<dyn MetaEngine>>>,
    {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let engine = runtime.block_on(open())?;
        Ok(BlockingMeta { engine, runtime })
    }

    pub fn engine(&self) -> &Arc<dyn MetaEngine> {
        &self.engine
    }

    /// Runs a future on this face's runtime.
    pub fn block_on<T>(&self, future: impl std::future::Future<Output = T>) -> T {
        self.runtime.block_on(future)
    }

    blocking! {
        lookup(parent: Ino, name: &[u8]) -> Attr;
        getattr(ino: Ino) -> Attr;
        setattr(ino: Ino, changes: &SetAttr) -> Attr;
        create(session: SessionId, parent: Ino, name: &[u8], node: &NewNode) -> Attr;
        mknod(parent: Ino, name: &[u8], node: &NewNode) -> Attr;
        mkdir(parent: Ino, name: &[u8], mode: u32, uid: u32, gid: u32) -> Attr;
        symlink(parent: Ino, name: &[u8], target: &[u8], uid: u32, gid: u32) -> Attr;
        readlink(ino: Ino) -> Vec<u8>;
        unlink(parent: Ino, name: &[u8]) -> ();
        rmdir(parent: Ino, name: &[u8]) -> ();
        rename(parent: Ino, name: &[u8], new_parent: Ino, new_name: &[u8], mode: RenameMode) -> Renamed;
        link(ino: Ino, new_parent: Ino, new_name: &[u8]) -> Attr;
        readdir(ino: Ino, after_cookie: u64, limit: usize) -> Vec<DirEntry>;
        getxattr(ino: Ino, name: &[u8]) -> Vec<u8>;
        setxattr(ino: Ino, name: &[u8], value: &[u8], mode: XattrMode) -> ();
        listxattr(ino: Ino) -> Vec<Vec<u8>>;
        removexattr(ino: Ino, name: &[u8]) -> ();
        statfs() -> StatFs;
        file_system_id() -> [u8; 16];
        dir_usage(ino: Ino) -> DirUsage;
        tenant_usage() -> Vec<TenantUsage>;
        within(root: Ino, ino: Ino, tenant: &str) -> bool;
        log_position() -> Option<u64>;
        wait_position(position: u64, limit: std::time::Duration) -> ();
        sync() -> ();
        read_chunk(ino: Ino, chunk_index: u64) -> Vec<Slice>;
        commit_slice(session: SessionId, ino: Ino, chunk_index: u64, slice: &Slice, new_size: u64, attrs: &CommitAttrs) -> Attr;
        commit_written_slice(session: SessionId, ino: Ino, chunk_index: u64, slice: &Slice, new_size: u64, attrs: &CommitAttrs) -> Attr;
        swap_compacted(session: SessionId, ino: Ino, chunk_index: u64, read: &[Slice], from: usize, merged: &Slice) -> bool;
        allocate_slice_ids(session: SessionId, count: u64) -> Range<u64>;
        record_pending_slice(session: SessionId, slice: &Slice) -> ();
        record_pending_slice_lazily(session: SessionId, ino: Ino, slice: &Slice) -> ();
        check_slice_write(session: SessionId, ino: Ino, slice: &Slice) -> ();
        pending_slice(session: SessionId, slice_id: u64) -> Option<(u32, GatewayId)>;
        slice_leased(session: SessionId, slice_id: u64) -> bool;
        set_lock(session: SessionId, ino: Ino, request: &LockRequest) -> ();
        get_lock(session: SessionId, ino: Ino, request: &LockRequest) -> Option<HeldLock>;
        release_locks(session: SessionId, ino: Ino, owner: Option<u64>) -> ();
        open_session(tenant: &str, description: &str) -> SessionId;
        session(session: SessionId) -> SessionInfo;
        heartbeat(session: SessionId, view: &MountView) -> ();
        close_session(session: SessionId) -> ();
        list_sessions() -> Vec<SessionInfo>;
        expired_sessions(heartbeat_before_ns: TimeNs) -> Vec<SessionId>;
        take_dir_lease(session: SessionId, dir: Ino) -> bool;
        keep_dir_leases(session: SessionId, keep: &[Ino], release: &[Ino]) -> Vec<bool>;
        open(session: SessionId, ino: Ino) -> Attr;
        release(session: SessionId, inos: &[Ino]) -> ();
        take_due_deleted_slices(gateway: Option<GatewayId>, now_ns: TimeNs, limit: usize) -> Vec<DeletedSlice>;
        referenced_slice_ids() -> std::collections::BTreeSet<u64>;
        ack_deleted_slices(slice_ids: &[u64]) -> ();
        register_gateway(id: GatewayId, address: &str, mirror: bool) -> u64;
        gateway_heartbeat(id: GatewayId, epoch: u64, load: GatewayLoad) -> ();
        list_gateways() -> Vec<GatewayRecord>;
    }
}
