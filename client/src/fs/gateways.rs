//! Which gateway stages a new slice, and which one to read a block from. A slice records the id
//! of the gateway that staged it; the metadata's registry maps ids to addresses (every gateway
//! registers at start and heartbeats), so a file written through gateway A reads back through a
//! mount of gateway B before it is uploaded (DESIGN.md, "Scale-out and takeover").
//!
//! [`RegistryDirectory`] stages everything on the mount's one gateway (the in-process tests);
//! [`super::cluster::Cluster`] spreads slices over every live gateway and follows takeovers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;

use super::block_api::BlockApi;
use super::block_grpc::GrpcBlocks;
use super::channel::{connect_gateway, GatewayAccess};
use super::error::FsResult;
use super::meta_api::{GatewayId, Ino, MetaApi, MountView};

/// Where one new slice is staged.
#[derive(Clone)]
pub struct Route {
    pub id: GatewayId,
    pub blocks: Arc<dyn BlockApi>,
    /// That gateway's own metadata service, for `write_slice` (which stages on the gateway that
    /// serves the call); `None`: the mount's metadata service is that gateway's.
    pub meta: Option<Arc<dyn MetaApi>>,
}

/// Resolves gateway ids to their block services, and chooses where new slices go.
#[async_trait]
pub trait GatewayDirectory: Send + Sync + 'static {
    /// The block service of gateway `id`; `None` when no live gateway has that id (its blocks
    /// can then only come from the object store).
    async fn blocks_of(&self, id: &GatewayId) -> FsResult<Option<Arc<dyn BlockApi>>>;
    /// A call to gateway `id` failed: resolve it afresh next time (it may have moved), and leave
    /// it out of new choices for a while.
    fn forget(&self, id: &GatewayId);
    /// The gateway a new slice of chunk `chunk_index` of `ino` is staged on.
    async fn route(&self, ino: Ino, chunk_index: u64) -> FsResult<Route>;
    /// Looks at the registry again now (a gateway may have come back, or moved).
    async fn refresh(&self) {}
    /// The gateway whose read cache (`--read-cache`) this mount reads uploaded blocks through,
    /// with its id: the one it opened its session at, when that one keeps a read cache and has
    /// not failed lately. `None`: uploaded blocks come from the store as they are.
    async fn read_cache(&self) -> Option<(GatewayId, Arc<dyn BlockApi>)> {
        None
    }
    /// How long a call waits for an unreachable gateway to come back (restart or takeover)
    /// before it fails.
    fn takeover_wait(&self) -> Duration {
        Duration::ZERO
    }
    /// The gateways new slices go to, and those left out because they failed (reported with
    /// the session's heartbeats, for `stagefs status`).
    fn view(&self) -> MountView;
}

/// Connects to the block service of the gateway at an address.
pub type Connector = Arc<
    dyn Fn(String) -> futures::future::BoxFuture<'static, FsResult<Arc<dyn BlockApi>>>
        + Send
        + Sync,
>;

/// The real connector: a `Staging` client over a new channel (built where every client
/// connection is built, [`connect_gateway`]).
pub fn grpc_connector(access: GatewayAccess) -> Connector {
    Arc::new(move |address: String| {
        let access = access.clone();
        Box::pin(async move {
            let channel = connect_gateway(&address, &access).await?;
            Ok(Arc::new(GrpcBlocks::new(channel)) as Arc<dyn BlockApi>)
        })
    })
}

/// Gateways connected so far, by id, with the address each was reached at.
type Connected = HashMap<GatewayId, (String, Arc<dyn BlockApi>)>;

/// The mount's own gateway for its id, the registry for every other.
pub struct RegistryDirectory {
    home_id: GatewayId,
    home: Arc<dyn BlockApi>,
    meta: Arc<dyn MetaApi>,
    connect: Connector,
    known: Mutex<Connected>,
}

impl RegistryDirectory {
    pub fn new(
        home_id: GatewayId,
        home: Arc<dyn BlockApi>,
        meta: Arc<dyn MetaApi>,
        connect: Connector,
    ) -> Self {
        RegistryDirectory {
            home_id,
            home,
            meta,
            connect,
            known: Mutex::new(HashMap::new()),
        }
    }

    fn known(&self) -> std::sync::MutexGuard<'_, Connected> {
        self.known.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl GatewayDirectory for RegistryDirectory {
    async fn blocks_of(&self, id: &GatewayId) -> FsResult<Option<Arc<dyn BlockApi>>> {
        if *id == self.home_id {
            return Ok(Some(self.home.clone()));
        }
        if let Some((_, blocks)) = self.known().get(id) {
            return Ok(Some(blocks.clone()));
        }
        let gateways = self.meta.list_gateways().await?;
        let Some(gateway) = gateways.into_iter().find(|g| g.id == *id && g.alive) else {
            return Ok(None);
        };
        let blocks = (self.connect)(gateway.address.clone()).await?;
        tracing::debug!(address = %gateway.address, epoch = gateway.epoch, "connected to another gateway for its blocks");
        self.known().insert(*id, (gateway.address, blocks.clone()));
        Ok(Some(blocks))
    }

    fn forget(&self, id: &GatewayId) {
        self.known().remove(id);
    }

    async fn route(&self, _ino: Ino, _chunk_index: u64) -> FsResult<Route> {
        Ok(Route {
            id: self.home_id,
            blocks: self.home.clone(),
            meta: None,
        })
    }

    fn view(&self) -> MountView {
        MountView {
            using: vec![self.home_id],
            avoiding: Vec::new(),
        }
    }
}
