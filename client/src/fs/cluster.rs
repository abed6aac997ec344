//! A mount's view of the gateways that serve its file system (issue "Survive the loss of a
//! gateway"): where new slices are staged, where metadata calls go, and how both ride out a
//! gateway that dies, restarts or is taken over at another address.
//!
//! - **Members.** The gateways named on the command line only bootstrap: the first that opens a
//!   session serves the mount's metadata calls, and the registry it serves (every gateway of a
//!   shared database registers and heartbeats there) names the others, with their address and
//!   epoch. The registry is read again every [`REFRESH_EVERY`], and at once after a failure.
//! - **Where a slice goes.** Rendezvous hashing over the live gateways on (inode, chunk index):
//!   the chunk of one file stays on one gateway while it lives, a new gateway takes only its
//!   share of new chunks, and staged data never moves. A gateway that fails a call is left out
//!   of new choices for [`DOWN_FOR`] or until the registry shows it at a new address.
//! - **Metadata calls** go to one gateway at a time (each serves the whole database); a call that
//!   cannot reach it moves to another live one, or, with one gateway, waits for it to come back,
//!   for up to the takeover wait, as an NFS hard mount would. A change carries a tag
//!   ([`RequestTag`]) so that sending it again after a lost answer does not make it twice.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use shared::meta::{RequestTag, MAX_CHANGE_SLOTS};

use super::block_api::{uuid_text, BlockApi};
use super::block_grpc::GrpcBlocks;
use super::channel::{connect_gateway, lazy_gateway, GatewayAccess, GatewayChannel};
use super::error::{FsError, FsResult};
use super::gateways::{GatewayDirectory, Route};
use super::meta_api::{
    Attr, CommitAttrs, DirEntry, GatewayId, GatewayInfo, HeldLock, Ino, LockRequest, MetaApi,
    MountView, NewNode, Opened, Renamed, SessionGrant, SessionId, SetAttr, Slice, StatFs,
};
use super::meta_grpc::GrpcMeta;

/// How old the mount's copy of the registry may get before a choice reads it again.
pub const REFRESH_EVERY: Duration = Duration::from_secs(2);
/// How long a gateway that failed a call is left out of new choices (unless it is the only one).
pub const DOWN_FOR: Duration = Duration::from_secs(10);
/// Deadline of one registry read: a gateway that is slow to list is as good as down here.
const LIST_TIMEOUT: Duration = Duration::from_secs(3);
/// First pause before a metadata call is sent again; doubles up to [`MAX_RETRY_PAUSE`].
const FIRST_RETRY_PAUSE: Duration = Duration::from_millis(100);
const MAX_RETRY_PAUSE: Duration = Duration::from_secs(1);

/// A gateway as the registry last showed it.
#[derive(Debug, Clone)]
struct Member {
    address: String,
    epoch: u64,
    alive: bool,
    /// A mirror region's gateway: blocks are read from it, none staged on it from here.
    mirror: bool,
}

/// The services of one gateway address.
#[derive(Clone)]
struct Conn {
    meta: GrpcMeta,
    blocks: Arc<GrpcBlocks>,
}

#[derive(Default)]
struct State {
    members: HashMap<GatewayId, Member>,
    /// Connections by address (an address that changes gets a new one).
    conns: HashMap<String, Conn>,
    /// Addresses that failed a call, and until when they are left out of choices.
    down: HashMap<String, Instant>,
    /// Where metadata calls go now; empty: choose again.
    meta_at: String,
    /// Turns through the addresses when every one is down.
    rotation: usize,
    /// The session was opened at a mirror gateway: metadata calls stay with the addresses given
    /// (the registry's gateways are in the source region, behind the mirror).
    mirror: bool,
    /// The gateway the session was opened at, when it keeps a read cache: (id, address).
    read_cache: Option<(GatewayId, String)>,
    /// On a mirror: the mirror gateway itself (id, address), where new slices are staged, in
    /// this region.
    local: Option<(GatewayId, String)>,
    refreshed: Option<Instant>,
}

impl State {
    fn is_down(&self, address: &str, now: Instant) -> bool {
        self.down.get(address).is_some_and(|until| *until > now)
    }
}

/// The gateways of one mount.
pub struct Cluster {
    access: GatewayAccess,
    /// The addresses given on the command line: where to start, and where to look when the
    /// registry cannot be read (a single gateway restarting at its address).
    seeds: Vec<String>,
    takeover_wait: Duration,
    state: Mutex<State>,
    /// One registry read at a time; the others use its result.
    refreshing: tokio::sync::Mutex<()>,
}

impl Cluster {
    /// Opens a session on the first of `seeds` that grants one, and reads the registry.
    pub async fn open(
        seeds: Vec<String>,
        access: GatewayAccess,
        takeover_wait: Duration,
        description: &str,
    ) -> FsResult<(Arc<Cluster>, SessionGrant)> {
        if seeds.is_empty() {
            return Err(FsError::Invalid("no gateway address given".into()));
        }
        let cluster = Arc::new(Cluster {
            access,
            seeds: seeds.clone(),
            takeover_wait,
            state: Mutex::new(State::default()),
            refreshing: tokio::sync::Mutex::new(()),
        });
        let mut failures = Vec::new();
        for address in &seeds {
            let channel = match connect_gateway(address, &cluster.access).await {
                Ok(channel) => channel,
                Err(e) => {
                    failures.push(e);
                    continue;
                }
            };
            let conn = Conn::new(channel);
            match conn.meta.open_session(description).await {
                Ok(grant) => {
                    let identity = conn.blocks.identity().await;
                    let read_cache = identity.filter(|(_, caches)| *caches).map(|(id, _)| id);
                    if let Some(id) = read_cache {
                        tracing::info!(gateway = %address, id = %uuid_text(&id), "uploaded blocks are read through this gateway's read cache");
                    }
                    // A mirror stages this region's blocks itself.
                    let local = identity.filter(|_| grant.mirror).map(|(id, _)| id);
                    if let Some(id) = local {
                        tracing::info!(gateway = %address, id = %uuid_text(&id), "a mirror: new blocks are staged on it, in this region");
                    }
                    {
                        let mut state = cluster.lock();
                        state.conns.insert(address.clone(), conn);
                        state.meta_at = address.clone();
                        state.mirror = grant.mirror;
                        state.read_cache = read_cache.map(|id| (id, address.clone()));
                        state.local = local.map(|id| (id, address.clone()));
                        // A mirror answers with the source's grant: its gateway is not here.
                        if !grant.mirror {
                            state.members.insert(
                                grant.gateway_id,
                                Member {
                                    address: address.clone(),
                                    epoch: 0,
                                    alive: true,
                                    mirror: false,
                                },
                            );
                        }
                    }
                    cluster.refresh_now().await;
                    return Ok((cluster, grant));
                }
                Err(e) => failures.push(e),
            }
        }
        // One gateway: its own error says most. Several: each one's.
        if failures.len() == 1 {
            return Err(failures.remove(0));
        }
        Err(FsError::MetaUnavailable {
            op: "open_session",
            message: seeds
                .iter()
                .zip(&failures)
                .map(|(address, e)| format!("{address}: {e}"))
                .collect::<Vec<_>>()
                .join("; "),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The services at `address`, connected on first use.
    fn conn(&self, state: &mut State, address: &str) -> FsResult<Conn> {
        if let Some(conn) = state.conns.get(address) {
            return Ok(conn.clone());
        }
        let conn = Conn::new(lazy_gateway(address, &self.access)?);
        state.conns.insert(address.to_string(), conn.clone());
        Ok(conn)
    }

    /// Every address worth asking, best first: the current metadata gateway, live members that
    /// did not fail lately, the seeds, then the rest.
    fn candidates(&self, state: &State, now: Instant) -> Vec<String> {
        let mut live: Vec<&Member> = state.members.values().filter(|m| m.alive).collect();
        live.sort_by(|a, b| a.address.cmp(&b.address));
        let mut ordered: Vec<String> = Vec::new();
        let mut push = |address: &str| {
            if !address.is_empty() && !ordered.iter().any(|a| a == address) {
                ordered.push(address.to_string());
            }
        };
        push(&state.meta_at);
        if !state.mirror {
            for member in &live {
                push(&member.address);
            }
        }
        for seed in &self.seeds {
            push(seed);
        }
        if !state.mirror {
            for member in state.members.values() {
                push(&member.address);
            }
        }
        let (up, down): (Vec<String>, Vec<String>) = ordered
            .into_iter()
            .partition(|address| !state.is_down(address, now));
        up.into_iter().chain(down).collect()
    }

    /// Reads the registry now, from the first gateway that answers.
    async fn refresh_now(&self) {
        let started = Instant::now();
        let _one = self.refreshing.lock().await;
        if self.lock().refreshed.is_some_and(|at| at >= started) {
            return; // Read while we waited for the lock.
        }
        let candidates = {
            let state = self.lock();
            self.candidates(&state, Instant::now())
        };
        for address in candidates {
            let meta = {
                let mut state = self.lock();
                match self.conn(&mut state, &address) {
                    Ok(conn) => conn.meta.with_timeout(LIST_TIMEOUT),
                    Err(_) => continue,
                }
            };
            match meta.list_gateways().await {
                Ok(gateways) => {
                    self.take_registry(gateways);
                    return;
                }
                Err(e) => {
                    tracing::debug!(%address, error = %e, "cannot read the gateway registry there");
                    self.mark_down(&address);
                }
            }
        }
        // Nobody answered: keep what we knew, and do not ask on every call.
        self.lock().refreshed = Some(Instant::now());
    }

    fn take_registry(&self, gateways: Vec<GatewayInfo>) {
        let mut state = self.lock();
        let now = Instant::now();
        for gateway in gateways {
            let member = Member {
                address: gateway.address.clone(),
                epoch: gateway.epoch,
                alive: gateway.alive,
                mirror: gateway.mirror,
            };
            match state.members.get(&gateway.id) {
                Some(known) if known.address != member.address && member.alive => {
                    tracing::info!(
                        gateway = %uuid_text(&gateway.id),
                        from = %known.address,
                        to = %member.address,
                        epoch = member.epoch,
                        "gateway moved (taken over)"
                    );
                    // A new address is a new process: nothing known against it.
                    state.down.remove(&member.address);
                }
                Some(known) if !known.alive && member.alive => {
                    tracing::info!(gateway = %uuid_text(&gateway.id), address = %member.address, "gateway is back");
                    state.down.remove(&member.address);
                }
                _ => {}
            }
            state.members.insert(gateway.id, member);
        }
        state.down.retain(|_, until| *until > now);
        state.refreshed = Some(now);
    }

    async fn refresh_if_stale(&self) {
        let stale = self
            .lock()
            .refreshed
            .is_none_or(|at| at.elapsed() >= REFRESH_EVERY);
        if stale {
            self.refresh_now().await;
        }
    }

    /// `address` failed a call: left out of choices for [`DOWN_FOR`], and the registry read
    /// again at the next choice.
    fn mark_down(&self, address: &str) {
        let mut state = self.lock();
        state
            .down
            .insert(address.to_string(), Instant::now() + DOWN_FOR);
        if state.meta_at == address {
            state.meta_at.clear();
        }
        state.refreshed = None;
    }

    /// The gateway metadata calls go to now.
    fn meta_target(&self) -> FsResult<(String, GrpcMeta)> {
        let mut state = self.lock();
        let now = Instant::now();
        if state.meta_at.is_empty() || state.is_down(&state.meta_at, now) {
            let candidates = self.candidates(&state, now);
            let up = candidates.iter().find(|a| !state.is_down(a, now)).cloned();
            let next = match up {
                Some(address) => address,
                // Every one failed lately: take turns, one of them may be back.
                None => {
                    state.rotation = state.rotation.wrapping_add(1);
                    candidates[state.rotation % candidates.len()].clone()
                }
            };
            if next != state.meta_at {
                tracing::info!(gateway = %next, "metadata calls go to another gateway");
            }
            state.meta_at = next;
        }
        let address = state.meta_at.clone();
        let conn = self.conn(&mut state, &address)?;
        Ok((address, conn.meta))
    }
}

impl Conn {
    fn new(channel: GatewayChannel) -> Conn {
        Conn {
            meta: GrpcMeta::new(channel.clone()),
            blocks: Arc::new(GrpcBlocks::new(channel)),
        }
    }
}

/// The rendezvous score of gateway `id` for chunk `chunk_index` of `ino`: the gateway with the
/// highest score stages it. Fixed arithmetic (not the std hasher, which may change between
/// releases), so every mount of any build agrees.
pub fn rendezvous_score(id: &GatewayId, ino: Ino, chunk_index: u64) -> u64 {
    let (high, low) = id.split_at(8);
    let high = u64::from_be_bytes(high.try_into().expect("8 bytes"));
    let low = u64::from_be_bytes(low.try_into().expect("8 bytes"));
    mix(mix(mix(mix(high) ^ low) ^ ino) ^ chunk_index)
}

/// splitmix64's finalizer: every input bit moves every output bit.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[async_trait]
impl GatewayDirectory for Cluster {
    async fn blocks_of(&self, id: &GatewayId) -> FsResult<Option<Arc<dyn BlockApi>>> {
        self.refresh_if_stale().await;
        let mut state = self.lock();
        let Some(member) = state.members.get(id).filter(|m| m.alive).cloned() else {
            // This region's mirror, before the registry shows it.
            if let Some((_, address)) = state.local.clone().filter(|(local, _)| local == id) {
                let conn = self.conn(&mut state, &address)?;
                return Ok(Some(conn.blocks as Arc<dyn BlockApi>));
            }
            return Ok(None);
        };
        let conn = self.conn(&mut state, &member.address)?;
        Ok(Some(conn.blocks as Arc<dyn BlockApi>))
    }

    fn forget(&self, id: &GatewayId) {
        let address = {
            let state = self.lock();
            let cache = state.read_cache.as_ref().filter(|(c, _)| c == id);
            state
                .members
                .get(id)
                .map(|m| m.address.clone())
                .or_else(|| cache.map(|(_, address)| address.clone()))
        };
        if let Some(address) = address {
            self.mark_down(&address);
        }
    }

    async fn route(&self, ino: Ino, chunk_index: u64) -> FsResult<Route> {
        self.refresh_if_stale().await;
        let mut state = self.lock();
        let now = Instant::now();
        if let Some((id, address)) = state.local.clone() {
            // A mirror's mount stages in its own region, on the mirror (its metadata service
            // records and commits through the source).
            let conn = self.conn(&mut state, &address)?;
            return Ok(Route {
                id,
                blocks: conn.blocks,
                meta: None,
            });
        }
        let pick = |usable: &dyn Fn(&Member) -> bool| {
            state
                .members
                .iter()
                // Another region's mirror holds that region's blocks; nothing goes there from here.
                .filter(|(_, m)| !m.mirror)
                .filter(|(_, m)| usable(m))
                .max_by_key(|(id, _)| rendezvous_score(id, ino, chunk_index))
                .map(|(id, m)| (*id, m.address.clone()))
        };
        // Live and not failing; else live; else anything known (a lone gateway restarting).
        let chosen = pick(&|m| m.alive && !state.is_down(&m.address, now))
            .or_else(|| pick(&|m| m.alive))
            .or_else(|| pick(&|_| true));
        let Some((id, address)) = chosen else {
            return Err(FsError::GatewayUnavailable {
                key: String::new(),
                message: "no gateway is known to stage on".into(),
            });
        };
        let conn = self.conn(&mut state, &address)?;
        Ok(Route {
            id,
            blocks: conn.blocks,
            meta: Some(Arc::new(conn.meta)),
        })
    }

    async fn refresh(&self) {
        self.refresh_now().await;
    }

    async fn read_cache(&self) -> Option<(GatewayId, Arc<dyn BlockApi>)> {
        let mut state = self.lock();
        let (id, address) = state.read_cache.clone()?;
        if state.is_down(&address, Instant::now()) {
            return None;
        }
        let conn = self.conn(&mut state, &address).ok()?;
        Some((id, conn.blocks as Arc<dyn BlockApi>))
    }

    fn takeover_wait(&self) -> Duration {
        self.takeover_wait
    }

    fn view(&self) -> MountView {
        let state = self.lock();
        let now = Instant::now();
        let mut view = MountView::default();
        for (id, member) in &state.members {
            if member.alive && !state.is_down(&member.address, now) {
                view.using.push(*id);
            } else {
                view.avoiding.push(*id);
            }
        }
        view.using.sort_unstable();
        view.avoiding.sort_unstable();
        view
    }
}

/// The slots of a session's changes in flight ([`RequestTag`]): a change takes one for as long
/// as it is being sent, and the slot's sequence grows with each change.
struct ChangeSlots {
    free: Mutex<Vec<(u16, u64)>>,
    available: tokio::sync::Semaphore,
}

impl ChangeSlots {
    fn new() -> ChangeSlots {
        ChangeSlots {
            free: Mutex::new((0..MAX_CHANGE_SLOTS).rev().map(|slot| (slot, 0)).collect()),
            available: tokio::sync::Semaphore::new(usize::from(MAX_CHANGE_SLOTS)),
        }
    }

    async fn take(&self) -> FsResult<SlotGuard<'_>> {
        self.available
            .acquire()
            .await
            .map_err(|_| FsError::Internal("change slots closed".into()))?
            .forget();
        let (slot, last) = self
            .free
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop()
            .ok_or_else(|| FsError::Internal("a permit without a free change slot".into()))?;
        Ok(SlotGuard {
            slots: self,
            slot,
            seq: last + 1,
        })
    }
}

struct SlotGuard<'a> {
    slots: &'a ChangeSlots,
    slot: u16,
    seq: u64,
}

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        self.slots
            .free
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((self.slot, self.seq));
        self.slots.available.add_permits(1);
    }
}

/// [`MetaApi`] over whichever gateway of the [`Cluster`] can answer: a call that cannot reach one
/// is sent again to another (or to the same one once it is back) for up to the takeover wait.
pub struct FailoverMeta {
    cluster: Arc<Cluster>,
    /// The session whose change slots tag this mount's changes.
    session: SessionId,
    slots: ChangeSlots,
}

impl FailoverMeta {
    /// Metadata calls over `cluster`, for the session `session` it opened.
    pub fn new(cluster: Arc<Cluster>, session: SessionId) -> FailoverMeta {
        FailoverMeta {
            cluster,
            session,
            slots: ChangeSlots::new(),
        }
    }

    /// Runs `call` against the metadata gateway until it is answered, or nothing answered for
    /// the takeover wait. A `change` is tagged, so that sending it again cannot make it twice.
    async fn call<T, F, Fut>(&self, op: &'static str, change: bool, call: F) -> FsResult<T>
    where
        F: Fn(GrpcMeta) -> Fut,
        Fut: Future<Output = FsResult<T>>,
    {
        let slot = match change {
            true => Some(self.slots.take().await?),
            false => None,
        };
        let deadline = Instant::now() + self.cluster.takeover_wait;
        let mut pause = FIRST_RETRY_PAUSE;
        let mut sent = false;
        loop {
            let (address, meta) = self.cluster.meta_target()?;
            let meta = match &slot {
                Some(guard) => meta.tagged(RequestTag {
                    session: self.session,
                    slot: guard.slot,
                    seq: guard.seq,
                    retry: sent,
                }),
                None => meta,
            };
            match call(meta).await {
                Err(e) if e.is_transient() && Instant::now() < deadline => {
                    if !sent {
                        tracing::warn!(op, gateway = %address, error = %e, wait = ?self.cluster.takeover_wait, "metadata call failed; sending it again (another gateway, or this one once back)");
                    }
                    self.cluster.mark_down(&address);
                    sent = true;
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(MAX_RETRY_PAUSE);
                }
                outcome => return outcome,
            }
        }
    }
}

#[async_trait]
impl MetaApi for FailoverMeta {
    async fn open_session(&self, description: &str) -> FsResult<SessionGrant> {
        self.call("open_session", false, |m| async move {
            m.open_session(description).await
        })
        .await
    }

    async fn heartbeat(&self, session: SessionId, view: &MountView) -> FsResult<()> {
        self.call("heartbeat", false, |m| async move {
            m.heartbeat(session, view).await
        })
        .await
    }

    async fn close_session(&self, session: SessionId) -> FsResult<()> {
        self.call("close_session", false, |m| async move {
            m.close_session(session).await
        })
        .await
    }

    async fn lookup(&self, parent: Ino, name: &[u8]) -> FsResult<Attr> {
        self.call(
            "lookup",
            false,
            |m| async move { m.lookup(parent, name).await },
        )
        .await
    }

    async fn getattr(&self, ino: Ino) -> FsResult<Attr> {
        self.call("getattr", false, |m| async move { m.getattr(ino).await })
            .await
    }

    async fn setattr(&self, ino: Ino, changes: &SetAttr) -> FsResult<Attr> {
        // Setting the same attributes again leaves them as they are: no tag needed.
        self.call("setattr", false, |m| async move {
            m.setattr(ino, changes).await
        })
        .await
    }

    async fn create(
        &self,
        session: SessionId,
        parent: Ino,
        name: &[u8],
        node: &NewNode,
    ) -> FsResult<Attr> {
        self.call("create", true, |m| async move {
            m.create(session, parent, name, node).await
        })
        .await
    }

    async fn mknod(&self, parent: Ino, name: &[u8], node: &NewNode) -> FsResult<Attr> {
        self.call("mknod", true, |m| async move {
            m.mknod(parent, name, node).await
        })
        .await
    }

    async fn mkdir(
        &self,
        parent: Ino,
        name: &[u8],
        mode: u32,
        uid: u32,
        gid: u32,
    ) -> FsResult<Attr> {
        self.call("mkdir", true, |m| async move {
            m.mkdir(parent, name, mode, uid, gid).await
        })
        .await
    }

    async fn symlink(
        &self,
        parent: Ino,
        name: &[u8],
        target: &[u8],
        uid: u32,
        gid: u32,
    ) -> FsResult<Attr> {
        self.call("symlink", true, |m| async move {
            m.symlink(parent, name, target, uid, gid).await
        })
        .await
    }

    async fn readlink(&self, ino: Ino) -> FsResult<Vec<u8>> {
        self.call("readlink", false, |m| async move { m.readlink(ino).await })
            .await
    }

    async fn unlink(&self, parent: Ino, name: &[u8]) -> FsResult<()> {
        self.call(
            "unlink",
            true,
            |m| async move { m.unlink(parent, name).await },
        )
        .await
    }

    async fn rmdir(&self, parent: Ino, name: &[u8]) -> FsResult<()> {
        self.call(
            "rmdir",
            true,
            |m| async move { m.rmdir(parent, name).await },
        )
        .await
    }

    async fn rename(
        &self,
        parent: Ino,
        name: &[u8],
        new_parent: Ino,
        new_name: &[u8],
        flags: u32,
    ) -> FsResult<Renamed> {
        self.call("rename", true, |m| async move {
            m.rename(parent, name, new_parent, new_name, flags).await
        })
        .await
    }

    async fn link(&self, ino: Ino, new_parent: Ino, new_name: &[u8]) -> FsResult<Attr> {
        self.call("link", true, |m| async move {
            m.link(ino, new_parent, new_name).await
        })
        .await
    }

    async fn readdir(&self, ino: Ino, after_cookie: u64, limit: u32) -> FsResult<Vec<DirEntry>> {
        self.call("readdir", false, |m| async move {
            m.readdir(ino, after_cookie, limit).await
        })
        .await
    }

    async fn getxattr(&self, ino: Ino, name: &[u8]) -> FsResult<Vec<u8>> {
        self.call(
            "getxattr",
            false,
            |m| async move { m.getxattr(ino, name).await },
        )
        .await
    }

    async fn setxattr(&self, ino: Ino, name: &[u8], value: &[u8], flags: u32) -> FsResult<()> {
        self.call("setxattr", true, |m| async move {
            m.setxattr(ino, name, value, flags).await
        })
        .await
    }

    async fn listxattr(&self, ino: Ino) -> FsResult<Vec<Vec<u8>>> {
        self.call(
            "listxattr",
            false,
            |m| async move { m.listxattr(ino).await },
        )
        .await
    }

    async fn removexattr(&self, ino: Ino, name: &[u8]) -> FsResult<()> {
        self.call("removexattr", true, |m| async move {
            m.removexattr(ino, name).await
        })
        .await
    }

    async fn statfs(&self) -> FsResult<StatFs> {
        self.call("statfs", false, |m| async move { m.statfs().await })
            .await
    }

    async fn sync(&self) -> FsResult<()> {
        self.call("sync", false, |m| async move { m.sync().await })
            .await
    }

    async fn open(&self, session: SessionId, ino: Ino, first_chunk: bool) -> FsResult<Opened> {
        self.call("open", true, |m| async move {
            m.open(session, ino, first_chunk).await
        })
        .await
    }

    async fn release(&self, session: SessionId, inos: &[Ino]) -> FsResult<()> {
        self.call("release", true, |m| async move {
            m.release(session, inos).await
        })
        .await
    }

    async fn take_dir_lease(&self, session: SessionId, dir: Ino) -> FsResult<bool> {
        self.call("take_dir_lease", false, |m| async move {
            m.take_dir_lease(session, dir).await
        })
        .await
    }

    async fn keep_dir_leases(
        &self,
        session: SessionId,
        keep: &[Ino],
        release: &[Ino],
    ) -> FsResult<Vec<bool>> {
        self.call("keep_dir_leases", false, |m| async move {
            m.keep_dir_leases(session, keep, release).await
        })
        .await
    }

    async fn set_lock(
        &self,
        session: SessionId,
        ino: Ino,
        lock: &LockRequest,
        wait: Duration,
    ) -> FsResult<()> {
        // Taking a lock one already holds is a no-op.
        self.call("set_lock", false, |m| async move {
            m.set_lock(session, ino, lock, wait).await
        })
        .await
    }

    async fn get_lock(
        &self,
        session: SessionId,
        ino: Ino,
        lock: &LockRequest,
    ) -> FsResult<Option<HeldLock>> {
        self.call("get_lock", false, |m| async move {
            m.get_lock(session, ino, lock).await
        })
        .await
    }

    async fn release_locks(
        &self,
        session: SessionId,
        ino: Ino,
        owner: Option<u64>,
    ) -> FsResult<()> {
        self.call("release_locks", false, |m| async move {
            m.release_locks(session, ino, owner).await
        })
        .await
    }

    async fn read_chunk(&self, ino: Ino, chunk_index: u64) -> FsResult<Vec<Slice>> {
        self.call("read_chunk", false, |m| async move {
            m.read_chunk(ino, chunk_index).await
        })
        .await
    }

    async fn allocate_slice_ids(
        &self,
        session: SessionId,
        count: u32,
    ) -> FsResult<std::ops::Range<u64>> {
        // A lost answer leaves a batch of ids unused, which costs nothing.
        self.call("allocate_slice_ids", false, |m| async move {
            m.allocate_slice_ids(session, count).await
        })
        .await
    }

    async fn record_pending_slice(&self, session: SessionId, slice: &Slice) -> FsResult<()> {
        self.call("record_pending_slice", false, |m| async move {
            m.record_pending_slice(session, slice).await
        })
        .await
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
        // Committing a slice again is a no-op for the engine.
        self.call("commit_slice", false, |m| async move {
            m.commit_slice(session, ino, chunk_index, slice, new_size, attrs)
                .await
        })
        .await
    }

    async fn list_gateways(&self) -> FsResult<Vec<GatewayInfo>> {
        self.call("list_gateways", false, |m| async move {
            m.list_gateways().await
        })
        .await
    }

    /// Not sent again here: the write path stages a slice whose answer was lost anew, under a
    /// fresh id (it may be committed already).
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
        let (_, meta) = self.cluster.meta_target()?;
        meta.write_slice(session, ino, chunk_index, slice, new_size, attrs, data)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> GatewayId {
        let mut id = [0u8; 16];
        id[0] = n;
        id[15] = n.wrapping_mul(37);
        id
    }

    fn owner(gateways: &[GatewayId], ino: Ino, chunk: u64) -> GatewayId {
        *gateways
            .iter()
            .max_by_key(|g| rendezvous_score(g, ino, chunk))
            .unwrap()
    }

    #[test]
    fn chunks_spread_evenly_and_a_new_gateway_moves_only_its_share() {
        let three = [id(1), id(2), id(3)];
        let mut counts = HashMap::new();
        for ino in 0..3000u64 {
            *counts.entry(owner(&three, ino, ino % 7)).or_insert(0u32) += 1;
        }
        for g in &three {
            let share = counts[g];
            assert!(
                (800..1200).contains(&share),
                "{share} of 3000 on one gateway"
            );
        }
        // A fourth gateway takes chunks only from the others, about a quarter of them.
        let four = [id(1), id(2), id(3), id(4)];
        let mut moved = 0;
        for ino in 0..3000u64 {
            let before = owner(&three, ino, 0);
            let after = owner(&four, ino, 0);
            if before != after {
                assert_eq!(after, id(4), "a chunk moved between old gateways");
                moved += 1;
            }
        }
        assert!((550..950).contains(&moved), "{moved} of 3000 moved");
    }

    #[test]
    fn one_file_chunk_stays_on_one_gateway() {
        let three = [id(1), id(2), id(3)];
        for ino in 0..100 {
            assert_eq!(owner(&three, ino, 5), owner(&three, ino, 5));
        }
        // Chunks of one file do spread.
        let owners: std::collections::HashSet<_> =
            (0..32).map(|chunk| owner(&three, 42, chunk)).collect();
        assert_eq!(owners.len(), 3);
    }
}
