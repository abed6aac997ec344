//! What one client can make the gateway hold, bounded whatever the client does.
//!
//! * [`InflightBudget`] (`--max-inflight`): bytes of client data held at once across all
//!   requests: a block being received (its record buffer is reserved when the header arrives,
//!   before it is allocated), a block being staged, a `WriteSlice`'s data, a `ReadBlock`'s
//!   answer being built. A request that finds no room waits, and while it waits the gateway reads
//!   nothing more from its stream, so HTTP/2 flow control holds the client back; one that waits
//!   longer than the stream idle timeout is refused with `RESOURCE_EXHAUSTED`. No one source (a
//!   tenant with `--tokens`, else a connection) may hold more than a quarter of it, so clients
//!   that stall on one connection cannot starve the others.
//! * [`Limits::stream_idle_timeout`] (`--stream-idle-timeout`): a write stream that sends nothing
//!   for this long is ended with `DEADLINE_EXCEEDED` and what it held is freed.
//! * `--max-streams-per-connection` and HTTP/2 keepalive are set on the server (`main.rs`).
//!
//! What is still held outside the budget: bytes HTTP/2 has received for a stream the gateway is
//! not reading yet (at most the connection window, [`proto::CONNECTION_WINDOW_BYTES`], per
//! connection), and answers already handed to HTTP/2 that the client does not read (at most one
//! `ReadBlock` answer per stream).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::Status;

/// The budget counts in units of this many bytes, so a large one fits the semaphore's u32.
const UNIT: u64 = 4096;

/// Default `--stream-idle-timeout`.
pub const DEFAULT_STREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// The limits every service applies to its clients.
#[derive(Clone)]
pub struct Limits {
    pub inflight: InflightBudget,
    pub stream_idle_timeout: Duration,
}

impl Limits {
    pub fn new(max_inflight: u64, stream_idle_timeout: Duration) -> Limits {
        Limits {
            inflight: InflightBudget::new(max_inflight),
            stream_idle_timeout,
        }
    }
}

impl Default for Limits {
    fn default() -> Limits {
        Limits::new(default_max_inflight(), DEFAULT_STREAM_IDLE_TIMEOUT)
    }
}

/// Default `--max-inflight`: an eighth of the machine's memory, at least 64 MiB and at most
/// 4 GiB (enough for hundreds of blocks in flight, which is what saturates a device).
pub fn default_max_inflight() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let pages = unsafe { libc::sysconf(libc::_SC_PHYS_PAGES) };
    // SAFETY: as above.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    let memory = if pages > 0 && page > 0 {
        pages as u64 * page as u64
    } else {
        8 << 30
    };
    (memory / 8).clamp(64 << 20, 4 << 30)
}

/// One source's share of the budget: a quarter.
const SHARE_DIVISOR: u64 = 4;

/// Bytes of client data the gateway holds at once.
#[derive(Clone)]
pub struct InflightBudget {
    units: Arc<Semaphore>,
    bytes: u64,
    /// Each source's share, alive while the source holds a reservation.
    shares: Arc<Mutex<HashMap<String, Weak<Semaphore>>>>,
}

/// Room for some bytes of the budget, given back when dropped.
pub struct Reservation {
    _share: OwnedSemaphorePermit,
    _global: OwnedSemaphorePermit,
}

impl InflightBudget {
    pub fn new(bytes: u64) -> InflightBudget {
        let units = (bytes / UNIT).clamp(SHARE_DIVISOR, u64::from(u32::MAX >> 3)) as u32;
        InflightBudget {
            units: Arc::new(Semaphore::new(units as usize)),
            bytes: u64::from(units) * UNIT,
            shares: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// The whole budget, in bytes.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Bytes reserved now.
    pub fn in_use(&self) -> u64 {
        self.bytes - self.units.available_permits() as u64 * UNIT
    }

    /// The share of `source`, made when it has none alive.
    fn share(&self, source: &str) -> Arc<Semaphore> {
        let mut shares = self.shares.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(share) = shares.get(source).and_then(Weak::upgrade) {
            return share;
        }
        if shares.len() >= 1024 {
            shares.retain(|_, share| share.strong_count() > 0);
        }
        let share = Arc::new(Semaphore::new((self.bytes / UNIT / SHARE_DIVISOR) as usize));
        shares.insert(source.to_string(), Arc::downgrade(&share));
        share
    }

    /// Room for `bytes` of `source` (a tenant's name, or a connection's address), waiting at
    /// most `wait` for it. A request larger than a share takes the whole share (it could never
    /// fit otherwise).
    pub async fn reserve(
        &self,
        source: &str,
        bytes: u64,
        wait: Duration,
    ) -> Result<Reservation, Status> {
        let share_units = self.bytes / UNIT / SHARE_DIVISOR;
        let units = bytes.div_ceil(UNIT).min(share_units) as u32;
        let share = self.share(source);
        let global = self.units.clone();
        let both = async move {
            let share = share.acquire_many_owned(units).await?;
            let global = global.acquire_many_owned(units).await?;
            Ok::<_, tokio::sync::AcquireError>(Reservation {
                _share: share,
                _global: global,
            })
        };
        match tokio::time::timeout(wait, both).await {
            Ok(Ok(reservation)) => Ok(reservation),
            Ok(Err(_closed)) => Err(Status::unavailable("the gateway is shutting down")),
            Err(_elapsed) => Err(Status::resource_exhausted(format!(
                "gateway busy: data in flight stayed at the limit for {wait:?} ({} of {} bytes \
                 in use, --max-inflight, at most a quarter for one tenant or connection); try \
                 again",
                self.in_use(),
                self.bytes
            ))),
        }
    }
}

/// Whose share of the budget a request draws on: its tenant (with `--tokens`), else its
/// connection.
pub fn source_of<T>(request: &tonic::Request<T>) -> String {
    let tenant = crate::access::tenant_of(request);
    if !tenant.name.is_empty() {
        return format!("tenant {}", tenant.name);
    }
    match request.remote_addr() {
        Some(addr) => format!("connection {addr}"),
        None => "unknown".into(),
    }
}

/// The next message of a client stream, or `DEADLINE_EXCEEDED` once it has been silent for
/// `idle`.
pub async fn next_within<T>(
    stream: &mut tonic::Streaming<T>,
    idle: Duration,
    what: &str,
) -> Option<Result<T, Status>> {
    match tokio::time::timeout(idle, tokio_stream::StreamExt::next(stream)).await {
        Ok(next) => next,
        Err(_elapsed) => Some(Err(Status::deadline_exceeded(format!(
            "{what}: the stream sent nothing for {idle:?} (--stream-idle-timeout); ended"
        )))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reservations_wait_for_room_and_give_it_back() {
        let budget = InflightBudget::new(32 << 20);
        let first = budget.reserve("a", 5 << 20, Duration::ZERO).await.unwrap();
        assert_eq!(budget.in_use(), 5 << 20);
        let refused = budget
            .reserve("a", 4 << 20, Duration::from_millis(20))
            .await
            .err()
            .expect("no room left in a's share of 8 MiB");
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(refused.message().contains("--max-inflight"), "{refused:?}");
        let other = budget
            .reserve("b", 8 << 20, Duration::ZERO)
            .await
            .expect("another source has a share of its own");
        let waiting = tokio::spawn({
            let budget = budget.clone();
            async move { budget.reserve("a", 4 << 20, Duration::from_secs(10)).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(first);
        let second = waiting
            .await
            .unwrap()
            .expect("room once the first is given back");
        assert_eq!(budget.in_use(), 12 << 20);
        drop((second, other));
        assert_eq!(budget.in_use(), 0);
        let huge = budget.reserve("c", 1 << 40, Duration::ZERO).await.unwrap();
        assert_eq!(
            budget.in_use(),
            8 << 20,
            "larger than a share: takes the share"
        );
        drop(huge);
        // Sources that hold nothing are forgotten.
        assert!(budget
            .shares
            .lock()
            .unwrap()
            .values()
            .all(|share| share.strong_count() == 0));
    }

    #[tokio::test]
    async fn four_sources_fill_the_budget_and_a_fifth_waits() {
        let budget = InflightBudget::new(16 << 20);
        let mut held = Vec::new();
        for source in ["a", "b", "c", "d"] {
            held.push(
                budget
                    .reserve(source, 4 << 20, Duration::ZERO)
                    .await
                    .unwrap(),
            );
        }
        assert!(budget
            .reserve("e", 4096, Duration::from_millis(20))
            .await
            .is_err());
        held.pop();
        budget.reserve("e", 4096, Duration::ZERO).await.unwrap();
    }
}
