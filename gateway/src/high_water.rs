//! The staging device's high-water mark: above it, a client that can reach the object store is
//! told to write its blocks through (PUT them itself and commit them as usual), so a device
//! that fills because uploads lag or are held degrades writes to store speed instead of making
//! them wait and fail. Below the low-water mark staging resumes. Clients that cannot write
//! through (they do not say they can) keep the old behaviour: they wait for space, then get
//! `RESOURCE_EXHAUSTED`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::staging::StagingLog;

/// The request header by which a client says it can write blocks through to the store.
pub const CAN_WRITE_THROUGH: &str = proto::WRITE_THROUGH_HEADER;

/// Whether the client of `request` said it can write blocks through. A tenant confined to a
/// directory cannot: it is not given the store.
pub fn can_write_through<T>(request: &tonic::Request<T>) -> bool {
    crate::access::tenant_of(request).root.is_none()
        && request
            .metadata()
            .get(CAN_WRITE_THROUGH)
            .is_some_and(|value| value == "1")
}

/// `--staging-high-water` and `--staging-low-water`, and whether writes go through right now.
#[derive(Debug)]
pub struct HighWater {
    /// Share of the device's segments in use at which writes start going through; `None`: never.
    high: Option<f64>,
    /// Share at or below which staging resumes.
    low: f64,
    above: AtomicBool,
    blocks: AtomicU64,
    bytes: AtomicU64,
}

impl HighWater {
    /// Writes go through from `high` (0–1] of the device in use until it is back at `low`.
    pub fn new(high: Option<f64>, low: f64) -> HighWater {
        HighWater {
            high,
            low: high.map_or(low, |h| low.min(h)),
            above: AtomicBool::new(false),
            blocks: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
        }
    }

    /// No mark: every write is staged.
    pub fn off() -> HighWater {
        HighWater::new(None, 0.0)
    }

    /// Whether a write should go through now, given how full `log`'s device is.
    pub fn writes_go_through(&self, log: &StagingLog) -> bool {
        let Some(high) = self.high else {
            return false;
        };
        let (total, free) = log.segment_usage();
        let used = if total == 0 {
            0.0
        } else {
            (total - free) as f64 / total as f64
        };
        let was = self.above.load(Ordering::Relaxed);
        let now = if was { used > self.low } else { used >= high };
        if now != was {
            self.above.store(now, Ordering::Relaxed);
            if now {
                tracing::warn!(
                    used = format!("{:.0}%", used * 100.0),
                    "staging device above its high-water mark: clients write blocks through to \
                     the store until it is back at the low-water mark"
                );
            } else {
                tracing::info!(
                    used = format!("{:.0}%", used * 100.0),
                    "staging device back at its low-water mark: staging resumes"
                );
            }
        }
        now
    }

    /// Whether writes went through at the last look (for `Status`).
    pub fn is_above(&self) -> bool {
        self.above.load(Ordering::Relaxed)
    }

    /// A block of `len` bytes was sent back to be written through.
    pub fn sent_through(&self, len: u64) {
        self.blocks.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(len, Ordering::Relaxed);
        metrics::counter!("stagefs_gateway_written_through_blocks_total").increment(1);
        metrics::counter!("stagefs_gateway_written_through_bytes_total").increment(len);
    }

    /// Blocks and bytes sent back to be written through since start.
    pub fn totals(&self) -> (u64, u64) {
        (
            self.blocks.load(Ordering::Relaxed),
            self.bytes.load(Ordering::Relaxed),
        )
    }

    /// The marks, for `Status` (`high` of 0 when off).
    pub fn marks(&self) -> (f64, f64) {
        (self.high.unwrap_or(0.0), self.low)
    }
}

/// A share of the device: `90%`, `0.9`, or `off` (0).
pub fn parse_share(text: &str) -> Result<f64, String> {
    let text = text.trim();
    if text == "off" {
        return Ok(0.0);
    }
    let share = match text.strip_suffix('%') {
        Some(percent) => percent.trim().parse::<f64>().map(|p| p / 100.0),
        None => text.parse::<f64>(),
    }
    .map_err(|_| format!("{text:?} is not a share of the device like 90% or 0.9, or off"))?;
    if !(share > 0.0 && share <= 1.0) {
        return Err(format!(
            "{text:?}: a share must be above 0% and at most 100%"
        ));
    }
    Ok(share)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_parse() {
        assert_eq!(parse_share("90%"), Ok(0.9));
        assert_eq!(parse_share("0.75"), Ok(0.75));
        assert_eq!(parse_share("off"), Ok(0.0));
        for bad in ["0%", "101%", "-1", "x", ""] {
            assert!(parse_share(bad).is_err(), "{bad:?} was accepted");
        }
    }
}
