//! The upload drain: workers take staged blocks oldest first and PUT them to the object store.
//!
//! Failures are split in two. A store that cannot be reached, times out or answers 5xx is an
//! outage: every worker backs off together (exponentially, capped) and retries without limit, so
//! an outage never quarantines data. A failure that names the block or the request (permission
//! denied, a block that fails its checksum on the device) counts against that block, which is
//! quarantined after `max_attempts`: kept on the device, shown in Status, retried on request or
//! on restart.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use tokio_util::sync::CancellationToken;

use crate::staging::{NextUpload, StagingError, StagingLog, UploadJob};
use crate::tasks::Tasks;

/// How many uploads run and how fast; when and how often a block is retried is the log's
/// [`UploadPolicy`](crate::staging::UploadPolicy), fixed when it was opened.
#[derive(Debug, Clone)]
pub struct DrainConfig {
    pub concurrency: usize,
    /// Bytes per second, across all workers; `None` for no limit.
    pub bandwidth: Option<u64>,
}

/// Shared state of the workers: the store outage backoff and the bandwidth budget.
struct Shared {
    staging: Arc<StagingLog>,
    store: Arc<dyn ObjectStore>,
    config: DrainConfig,
    policy: crate::staging::UploadPolicy,
    outage: Mutex<Outage>,
    bandwidth_next: tokio::sync::Mutex<Instant>,
}

struct Outage {
    until: Option<Instant>,
    backoff: Duration,
}

/// Starts the workers in `tasks`; they stop (after their current upload) when it is drained.
pub fn start(
    staging: Arc<StagingLog>,
    store: Arc<dyn ObjectStore>,
    config: DrainConfig,
    tasks: &Tasks,
) {
    let policy = staging.upload_policy();
    let shared = Arc::new(Shared {
        outage: Mutex::new(Outage {
            until: None,
            backoff: policy.retry_initial,
        }),
        policy,
        staging,
        store,
        bandwidth_next: tokio::sync::Mutex::new(Instant::now()),
        config,
    });
    for _ in 0..shared.config.concurrency.max(1) {
        let shared = shared.clone();
        tasks.spawn("drain.upload", |stop| async move {
            worker(shared, stop).await;
            Ok(())
        });
    }
}

async fn worker(shared: Arc<Shared>, shutdown: CancellationToken) {
    loop {
        let wakeup = shared.staging.upload_wakeup.notified();
        tokio::pin!(wakeup);
        wakeup.as_mut().enable();
        if shutdown.is_cancelled() {
            return;
        }
        let outage_until = shared
            .outage
            .lock()
            .unwrap()
            .until
            .filter(|t| *t > Instant::now());
        let wait_until = match outage_until {
            Some(t) => Some(t),
            None => match shared.staging.next_upload() {
                NextUpload::Ready(job) => {
                    upload(&shared, job).await;
                    continue;
                }
                NextUpload::WaitUntil(t) => Some(t),
                NextUpload::Idle => None,
            },
        };
        let sleep = async {
            match wait_until {
                Some(t) => tokio::time::sleep_until(t.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = &mut wakeup => {}
            _ = sleep => {}
        }
    }
}

async fn upload(shared: &Shared, job: UploadJob) {
    let staging = &shared.staging;
    let data = match staging.read_for_upload(&job).await {
        Ok(data) => data,
        Err(StagingError::Corrupt { reason, .. }) => {
            staging.quarantine(
                &job,
                format!("block fails verification on the device: {reason}"),
            );
            return;
        }
        Err(e) => {
            // The device could not give the block back: that names the block.
            staging.fail_upload(&job, e.to_string(), None);
            return;
        }
    };
    if let Some(rate) = shared.config.bandwidth {
        let start = {
            let mut next = shared.bandwidth_next.lock().await;
            let start = (*next).max(Instant::now());
            *next = start + Duration::from_secs_f64(data.len() as f64 / rate as f64);
            start
        };
        tokio::time::sleep_until(start.into()).await;
    }
    let path = job.key.object_path();
    match shared.store.put(&path, PutPayload::from_bytes(data)).await {
        Ok(_) => {
            {
                let mut outage = shared.outage.lock().unwrap();
                outage.until = None;
                outage.backoff = shared.policy.retry_initial;
            }
            if staging.complete_upload(&job) {
                // Deleted while it was being uploaded: remove the object we just wrote.
                if let Err(e) = shared.store.delete(&path).await {
                    tracing::warn!(key = %job.key, error = %e, "could not delete the object of a block deleted during its upload");
                }
            }
        }
        Err(error) => {
            let permanent = is_permanent(&error);
            let outage_retry = (!permanent).then(|| {
                let mut outage = shared.outage.lock().unwrap();
                let backoff = outage.backoff.min(shared.policy.retry_max);
                outage.until = Some(Instant::now() + backoff);
                outage.backoff = (backoff * 2).min(shared.policy.retry_max);
                backoff
            });
            tracing::warn!(key = %job.key, %error, permanent, outage_retry_in = ?outage_retry, "upload failed");
            staging.fail_upload(&job, error.to_string(), outage_retry);
        }
    }
}

/// Errors that say something about this request or block rather than about the store's health.
fn is_permanent(error: &object_store::Error) -> bool {
    use object_store::Error::*;
    matches!(
        error,
        PermissionDenied { .. }
            | Unauthenticated { .. }
            | InvalidPath { .. }
            | NotImplemented { .. }
            | UnknownConfigurationKey { .. }
    )
}

#[cfg(test)]
mod tests {
    //! Drain behaviour against in-memory stores with injected faults a real server cannot be
    //! made to produce on demand.
    use super::*;
    use crate::faulty_store::FaultyStore;
    use crate::staging::UploadPolicy;
    use crate::volume::small_test_volume_with;
    use object_store::memory::InMemory;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test]
    async fn blocks_deleted_within_the_upload_delay_are_never_uploaded() {
        let dir = tempfile::tempdir().unwrap();
        let volume = small_test_volume_with(
            dir.path(),
            false,
            UploadPolicy {
                delay: Duration::from_millis(300),
                max_attempts: 3,
                retry_initial: Duration::from_millis(1),
                retry_max: Duration::from_millis(10),
                window: None,
                defer_max: Duration::ZERO,
            },
        )
        .await;
        let store = Arc::new(InMemory::new());
        let config = DrainConfig {
            concurrency: 2,
            bandwidth: None,
        };
        let tasks = Tasks::new();
        start(volume.clone(), store.clone(), config, &tasks);
        let keep = shared::BlockKey::new(1, 0, 4096).unwrap();
        let drop_ = shared::BlockKey::new(2, 0, 4096).unwrap();
        for key in [keep, drop_] {
            let data = vec![key.slice_id as u8; 4096];
            volume
                .write_block(
                    key,
                    crate::node::record_with(&key, &data),
                    crc32c::crc32c(&data),
                    crate::staging::Wait::Durable,
                )
                .await
                .unwrap();
        }
        // Within the delay: nothing uploaded yet, and the deleted block never will be.
        assert_eq!(volume.delete_blocks(&[drop_]).await.unwrap(), (1, 0));
        let mut changes = volume.subscribe_changes();
        while volume.entry(&keep).unwrap().state != crate::staging::BlockState::Uploaded {
            tokio::time::timeout(Duration::from_secs(10), changes.changed())
                .await
                .unwrap()
                .unwrap();
        }
        let exists = |key: shared::BlockKey| {
            let store = store.clone();
            async move { store.head(&key.object_path()).await.is_ok() }
        };
        assert!(exists(keep).await);
        assert!(
            !exists(drop_).await,
            "a block deleted within its upload delay was uploaded"
        );
        assert_eq!(
            volume.entry(&drop_).unwrap().state,
            crate::staging::BlockState::Deleted
        );
        tasks.drain(Duration::from_secs(10)).await;
        assert_eq!(tasks.fatal(), None);
        volume.shutdown().await;
    }

    #[tokio::test]
    async fn outage_retries_forever_and_permission_errors_quarantine() {
        let dir = tempfile::tempdir().unwrap();
        let volume = small_test_volume_with(
            dir.path(),
            false,
            UploadPolicy {
                delay: Duration::ZERO,
                max_attempts: 3,
                retry_initial: Duration::from_millis(1),
                retry_max: Duration::from_millis(10),
                window: None,
                defer_max: Duration::ZERO,
            },
        )
        .await;
        // The first 20 PUTs meet an unreachable store; the blocks of slice 13 are refused for
        // good.
        let outage = AtomicU32::new(20);
        let store = Arc::new(FaultyStore::failing_puts(move |location| {
            if location.as_ref().contains("/13_") {
                return Some(object_store::Error::PermissionDenied {
                    path: location.to_string(),
                    source: "injected".into(),
                });
            }
            let down = outage
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
            down.then(|| object_store::Error::Generic {
                store: "faulty",
                source: "connection refused (injected)".into(),
            })
        }));
        let config = DrainConfig {
            concurrency: 4,
            bandwidth: None,
        };
        let tasks = Tasks::new();
        start(volume.clone(), store.clone(), config, &tasks);
        let mut keys = Vec::new();
        for slice in 10..16u64 {
            let key = shared::BlockKey::new(slice, 0, 5000).unwrap();
            let data = vec![slice as u8; 5000];
            volume
                .write_block(
                    key,
                    crate::node::record_with(&key, &data),
                    crc32c::crc32c(&data),
                    crate::staging::Wait::Durable,
                )
                .await
                .unwrap();
            keys.push(key);
        }
        let bad = shared::BlockKey::new(13, 0, 5000).unwrap();
        let mut changes = volume.subscribe_changes();
        loop {
            let snap = volume.snapshot();
            if snap.queue_len == 0 && snap.blocks_uploading == 0 {
                break;
            }
            tokio::time::timeout(Duration::from_secs(10), changes.changed())
                .await
                .unwrap()
                .unwrap();
        }
        for key in &keys {
            let state = volume.entry(key).unwrap().state;
            if *key == bad {
                assert_eq!(state, crate::staging::BlockState::Quarantined);
                // Quarantined data stays readable on the device.
                assert_eq!(
                    &volume.read_block(key).await.unwrap().0[..],
                    &vec![13u8; 5000][..]
                );
            } else {
                assert_eq!(state, crate::staging::BlockState::Uploaded, "{key}");
                let got = store
                    .get(&key.object_path())
                    .await
                    .unwrap()
                    .bytes()
                    .await
                    .unwrap();
                assert_eq!(&got[..], &vec![key.slice_id as u8; 5000][..]);
            }
        }
        let snap = volume.snapshot();
        assert_eq!(snap.quarantined.len(), 1);
        assert_eq!(snap.quarantined[0].1.failed_attempts, 3);
        assert!(
            snap.counters.upload_retries >= 20,
            "outage retries counted: {}",
            snap.counters.upload_retries
        );
        assert_eq!(volume.retry_quarantined(), 1);
        tasks.drain(Duration::from_secs(10)).await;
        assert_eq!(tasks.fatal(), None);
    }
}
