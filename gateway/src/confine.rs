//! Confining a tenant to a directory (`root = "/team-a"` in the tokens file).
//!
//! A confined tenant sees its root directory as the root of the file system: inode 1 in its
//! requests means that directory, and that directory is inode 1 in the answers; `..` of it is
//! itself. Every other inode number it names must lie in that tree ([`MetaEngine::within`]),
//! else the request fails with ENOENT, as for an inode that does not exist, so numbers outside
//! tell nothing. Data follows the same rule: a confined tenant reads a block only by naming the
//! file and chunk that hold its slice (checked here), and is not told the object store's
//! address, so uploaded blocks reach it through the gateway.
//!
//! The check walks from the node up to the tenant's root, one read per directory; tenants
//! without a root pay nothing.

use std::sync::Arc;

use shared::BlockKey;

use crate::access::Tenant;
use crate::meta::{Attr, Ino, MetaEngine, MetaError, ROOT_INO};

/// Where one tenant's requests may reach.
#[derive(Clone)]
pub struct Scope {
    tenant: Arc<Tenant>,
    /// The inode the tenant's root is; [`ROOT_INO`] for a tenant without one.
    root: Ino,
}

impl Scope {
    /// The scope of `tenant`, its root found on first use.
    pub async fn of(tenant: Arc<Tenant>, engine: &dyn MetaEngine) -> Result<Scope, MetaError> {
        let root = match &tenant.root {
            None => ROOT_INO,
            Some(root) => *root
                .ino
                .get_or_try_init(|| async {
                    let mut ino = ROOT_INO;
                    for name in &root.names {
                        ino = engine.lookup(ino, name.as_bytes()).await?.ino;
                    }
                    engine.readdir(ino, 0, 1).await?;
                    tracing::info!(tenant = %tenant.name, root = %root.path, ino, "tenant confined to its root");
                    Ok::<Ino, MetaError>(ino)
                })
                .await
                .inspect_err(|error| {
                    tracing::warn!(tenant = %tenant.name, root = %root.path, %error, "a tenant's root cannot be found");
                })?,
        };
        Ok(Scope { tenant, root })
    }

    pub fn confined(&self) -> bool {
        self.root != ROOT_INO
    }

    /// The inode the tenant's number `ino` names, if it may reach it.
    pub async fn reach(&self, engine: &dyn MetaEngine, ino: Ino) -> Result<Ino, MetaError> {
        if !self.confined() {
            return Ok(ino);
        }
        let real = self.own(ino);
        if real == self.root || engine.within(self.root, real, &self.tenant.name).await? {
            Ok(real)
        } else {
            // As for a number that names nothing: what lies outside is not told.
            Err(MetaError::NoSuchInode(ino))
        }
    }

    /// The inode the tenant's number `ino` names, unchecked: for calls that act only on what
    /// the calling session itself holds (its handles, its locks), which it may give back even
    /// once the node left the tree.
    pub fn own(&self, ino: Ino) -> Ino {
        if ino == ROOT_INO {
            self.root
        } else {
            ino
        }
    }

    /// The number the tenant knows `ino` by.
    pub fn number(&self, ino: Ino) -> Ino {
        if ino == self.root {
            ROOT_INO
        } else {
            ino
        }
    }

    /// `attr` as the tenant sees it.
    pub fn attr(&self, mut attr: Attr) -> Attr {
        attr.ino = self.number(attr.ino);
        attr
    }

    /// Refuses a confined tenant's read of block `key` unless chunk `chunk_index` of file `ino`
    /// (the tenant's number, reachable) lists the block's slice.
    pub async fn may_read_block(
        &self,
        engine: &dyn MetaEngine,
        key: &BlockKey,
        ino: Ino,
        chunk_index: u64,
    ) -> Result<(), MetaError> {
        if !self.confined() {
            return Ok(());
        }
        if ino == 0 {
            return Err(MetaError::NotPermitted(format!(
                "block {key}: a tenant confined to a directory names the file and chunk of each \
                 block it reads"
            )));
        }
        let real = self.reach(engine, ino).await?;
        let slices = engine.read_chunk(real, chunk_index).await?;
        if slices.iter().any(|s| s.slice_id == key.slice_id) {
            Ok(())
        } else {
            Err(MetaError::NotPermitted(format!(
                "block {key} is not in chunk {chunk_index} of inode {ino} (now)"
            )))
        }
    }

    /// `lookup(parent, name)` within the scope: `..` of the tenant's root is the root itself.
    pub async fn lookup(
        &self,
        engine: &dyn MetaEngine,
        parent: Ino,
        name: &[u8],
    ) -> Result<Attr, MetaError> {
        let parent = self.reach(engine, parent).await?;
        let attr = if parent == self.root && name == b".." {
            engine.getattr(parent).await?
        } else {
            engine.lookup(parent, name).await?
        };
        Ok(self.attr(attr))
    }
}

/// `error` with every inode number it carries passed through `number` (free-text messages are
/// left as they are).
fn renumber(error: MetaError, number: impl Fn(Ino) -> Ino) -> MetaError {
    use MetaError::*;
    match error {
        NoSuchEntry { parent, name } => NoSuchEntry {
            parent: number(parent),
            name,
        },
        AlreadyExists { parent, name } => AlreadyExists {
            parent: number(parent),
            name,
        },
        NoSuchInode(ino) => NoSuchInode(number(ino)),
        NotADirectory(ino) => NotADirectory(number(ino)),
        IsADirectory(ino) => IsADirectory(number(ino)),
        DirectoryNotEmpty(ino) => DirectoryNotEmpty(number(ino)),
        MoveIntoOwnSubtree(ino) => MoveIntoOwnSubtree(number(ino)),
        TooManyLinks(ino) => TooManyLinks(number(ino)),
        NoSuchXattr { ino, name } => NoSuchXattr {
            ino: number(ino),
            name,
        },
        XattrExists { ino, name } => XattrExists {
            ino: number(ino),
            name,
        },
        NotOpen { session, ino } => NotOpen {
            session,
            ino: number(ino),
        },
        WouldBlock { ino, start, end } => WouldBlock {
            ino: number(ino),
            start,
            end,
        },
        TooManyLocks { ino, max } => TooManyLocks {
            ino: number(ino),
            max,
        },
        other => other,
    }
}

/// `error` for `tenant`: a confined tenant's root, once found, is named 1 in it.
pub fn error_for(tenant: &Tenant, error: MetaError) -> MetaError {
    match tenant
        .root
        .as_ref()
        .and_then(|root| root.ino.get().copied())
    {
        Some(root) => renumber(error, |ino| if ino == root { ROOT_INO } else { ino }),
        None => error,
    }
}
