//! Counters of the staging log, kept out of its lock: bumped where things happen, read by
//! Status, and emitted to the Prometheus exporter (`crate::telemetry`) at the same moments, so
//! `/metrics` and Status count the same events.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The window of the upload rate Status shows.
const RATE_WINDOW: Duration = Duration::from_secs(10);

#[derive(Default)]
pub struct StagingMetrics {
    syncs: AtomicU64,
    sync_nanos: AtomicU64,
    synced_records: AtomicU64,
    uploaded_blocks: AtomicU64,
    uploaded_bytes: AtomicU64,
    upload_retries: AtomicU64,
    upload_failures: AtomicU64,
    cache_fills: AtomicU64,
    cache_filled_bytes: AtomicU64,
    cache_hits: AtomicU64,
    cache_hit_bytes: AtomicU64,
    recent: Mutex<Recent>,
}

/// Recent uploads (when, bytes) for the rate, and the last store error.
#[derive(Default)]
struct Recent {
    uploads: VecDeque<(Instant, u64)>,
    last_store_error: Option<String>,
}

/// A copy of the counters at one moment.
#[derive(Debug, Default, Clone)]
pub struct Counters {
    pub syncs: u64,
    pub sync_time: Duration,
    pub synced_records: u64,
    pub uploaded_blocks: u64,
    pub uploaded_bytes: u64,
    pub upload_retries: u64,
    pub upload_failures: u64,
    pub upload_bytes_per_sec: f64,
    pub last_store_error: Option<String>,
    /// Blocks (and bytes) written as read cache, and reads served from it.
    pub cache_fills: u64,
    pub cache_filled_bytes: u64,
    pub cache_hits: u64,
    pub cache_hit_bytes: u64,
}

impl StagingMetrics {
    /// One fdatasync that took `took` and made `records` records durable.
    pub fn synced(&self, took: Duration, records: u64) {
        self.syncs.fetch_add(1, Relaxed);
        self.sync_nanos.fetch_add(took.as_nanos() as u64, Relaxed);
        self.synced_records.fetch_add(records, Relaxed);
        metrics::histogram!("stagefs_gateway_fdatasync_seconds").record(took.as_secs_f64());
    }

    pub fn uploaded(&self, bytes: u64) {
        self.uploaded_blocks.fetch_add(1, Relaxed);
        self.uploaded_bytes.fetch_add(bytes, Relaxed);
        metrics::counter!("stagefs_gateway_uploaded_blocks_total").increment(1);
        metrics::counter!("stagefs_gateway_uploaded_bytes_total").increment(bytes);
        let now = Instant::now();
        let mut recent = self.recent.lock().unwrap();
        recent.uploads.push_back((now, bytes));
        while recent
            .uploads
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > RATE_WINDOW)
        {
            recent.uploads.pop_front();
        }
        recent.last_store_error = None;
    }

    pub fn upload_failed(&self, error: &str) {
        self.upload_retries.fetch_add(1, Relaxed);
        metrics::counter!("stagefs_gateway_upload_retries_total").increment(1);
        self.recent.lock().unwrap().last_store_error = Some(error.to_string());
    }

    pub fn quarantined(&self) {
        self.upload_failures.fetch_add(1, Relaxed);
        metrics::counter!("stagefs_gateway_upload_failures_total").increment(1);
    }

    /// A block fetched from the store kept as read cache.
    pub fn cache_filled(&self, bytes: u64) {
        self.cache_fills.fetch_add(1, Relaxed);
        self.cache_filled_bytes.fetch_add(bytes, Relaxed);
        metrics::counter!("stagefs_gateway_read_cache_fills_total").increment(1);
        metrics::counter!("stagefs_gateway_read_cache_filled_bytes_total").increment(bytes);
    }

    /// A read served from the read cache.
    pub fn cache_hit(&self, bytes: u64) {
        self.cache_hits.fetch_add(1, Relaxed);
        self.cache_hit_bytes.fetch_add(bytes, Relaxed);
        metrics::counter!("stagefs_gateway_read_cache_hits_total").increment(1);
        metrics::counter!("stagefs_gateway_read_cache_hit_bytes_total").increment(bytes);
    }

    pub fn snapshot(&self) -> Counters {
        let now = Instant::now();
        let (window, last_store_error) = {
            let recent = self.recent.lock().unwrap();
            let window: u64 = recent
                .uploads
                .iter()
                .filter(|(t, _)| now.duration_since(*t) <= RATE_WINDOW)
                .map(|(_, b)| b)
                .sum();
            (window, recent.last_store_error.clone())
        };
        Counters {
            syncs: self.syncs.load(Relaxed),
            sync_time: Duration::from_nanos(self.sync_nanos.load(Relaxed)),
            synced_records: self.synced_records.load(Relaxed),
            uploaded_blocks: self.uploaded_blocks.load(Relaxed),
            uploaded_bytes: self.uploaded_bytes.load(Relaxed),
            upload_retries: self.upload_retries.load(Relaxed),
            upload_failures: self.upload_failures.load(Relaxed),
            upload_bytes_per_sec: window as f64 / RATE_WINDOW.as_secs_f64(),
            last_store_error,
            cache_fills: self.cache_fills.load(Relaxed),
            cache_filled_bytes: self.cache_filled_bytes.load(Relaxed),
            cache_hits: self.cache_hits.load(Relaxed),
            cache_hit_bytes: self.cache_hit_bytes.load(Relaxed),
        }
    }
}
