//! Objects in the store that no file, no pending slice and no queued deletion names: leaks (a
//! block staged and uploaded by a `WriteSlice` cut off by a crash, a delete that was lost, a
//! stray object under the prefix). `stagefs gc` lists them; `--delete` removes them; with
//! `--gc-interval` the gateway removes them itself.
//!
//! Safety rests on order: the store is listed first, the metadata read after. Every block's
//! slice is recorded (pending) before the block is written anywhere, so an object that existed
//! when the listing began had its slice named in the metadata by then, and a later read still
//! sees it, committed, pending, or queued for deletion, unless it was deleted for good, in
//! which case deleting its object again is harmless. The age margin (`min_age`) covers clocks
//! and anything this reasoning misses. Objects whose names are not block keys are never touched.
//!
//! The store's prefix must belong to this file system alone: another file system's blocks
//! there are named by nothing here.

use std::time::Duration;

use futures::TryStreamExt;
use object_store::{ObjectStore, ObjectStoreExt};
use shared::BlockKey;

use crate::meta::{MetaEngine, MetaError};

/// Keys of unreferenced objects a report names at most (the totals count them all).
pub const MAX_NAMED: usize = 1000;

#[derive(Debug, Default, Clone)]
pub struct GcReport {
    pub objects_listed: u64,
    /// Objects whose names are not block keys: never touched.
    pub other_objects: u64,
    /// Block objects younger than the age margin: not judged.
    pub too_young: u64,
    pub unreferenced_objects: u64,
    pub unreferenced_bytes: u64,
    /// The first [`MAX_NAMED`] of them.
    pub unreferenced_keys: Vec<String>,
    pub deleted_objects: u64,
    pub delete_failures: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum GcError {
    #[error("cannot list the object store: {0}")]
    List(#[source] object_store::Error),
    #[error("cannot read which slices the metadata names: {0}")]
    Meta(#[source] MetaError),
    /// Deleting there could delete another file system's blocks.
    #[error(
        "the store's prefix is not claimed by this file system ({0}); nothing deleted (a \
         gateway claims it at start with --store-check fail or warn)"
    )]
    NotOurs(String),
}

/// Finds (and with `delete`, deletes) the block objects older than `min_age` that nothing in
/// `meta` names.
pub async fn collect(
    store: &dyn ObjectStore,
    meta: &dyn MetaEngine,
    min_age: Duration,
    delete: bool,
) -> Result<GcReport, GcError> {
    if delete {
        let id = meta.file_system_id().await.map_err(GcError::Meta)?;
        match crate::store_check::owned_by(store, &id).await {
            Ok(true) => {}
            Ok(false) => {
                return Err(GcError::NotOurs(format!(
                    "{} names another, or is missing",
                    crate::store_check::OWNER_OBJECT
                )))
            }
            Err(detail) => return Err(GcError::NotOurs(detail)),
        }
    }
    let mut report = GcReport::default();
    let cutoff = unix_seconds_before(min_age);
    // The listing first: see the module's comment.
    let mut candidates = Vec::new();
    let mut listing = store.list(None);
    while let Some(object) = listing.try_next().await.map_err(GcError::List)? {
        report.objects_listed += 1;
        let Ok(key) = object.location.as_ref().parse::<BlockKey>() else {
            report.other_objects += 1;
            continue;
        };
        if object.last_modified.timestamp() > cutoff {
            report.too_young += 1;
            continue;
        }
        candidates.push((key, object.location, object.size));
    }
    let referenced = meta.referenced_slice_ids().await.map_err(GcError::Meta)?;
    for (key, location, size) in candidates {
        if referenced.contains(&key.slice_id) {
            continue;
        }
        report.unreferenced_objects += 1;
        report.unreferenced_bytes += size;
        if report.unreferenced_keys.len() < MAX_NAMED {
            report.unreferenced_keys.push(key.to_string());
        }
        if delete {
            match store.delete(&location).await {
                Ok(()) => report.deleted_objects += 1,
                Err(error) => {
                    report.delete_failures += 1;
                    tracing::warn!(%key, %error, "gc: cannot delete an unreferenced object");
                }
            }
        }
    }
    if report.unreferenced_objects > 0 {
        tracing::info!(
            found = report.unreferenced_objects,
            bytes = report.unreferenced_bytes,
            deleted = report.deleted_objects,
            "gc: objects no file, pending slice or queued deletion names"
        );
    }
    Ok(report)
}

/// Seconds since the Unix epoch, `age` ago: objects modified later are too young to judge.
fn unix_seconds_before(age: Duration) -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(now.saturating_sub(age).as_secs()).unwrap_or(i64::MAX)
}
