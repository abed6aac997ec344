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
//! * [`ConnectionLimit`] (`--max-connections`): connections open at once, TLS handshakes in
//!   progress included; one past the cap is closed as soon as it is accepted.
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
    pub connections: ConnectionLimit,
}

impl Limits {
    pub fn new(max_inflight: u64, stream_idle_timeout: Duration, max_connections: usize) -> Limits {
        Limits {
            inflight: InflightBudget::new(max_inflight),
            stream_idle_timeout,
            connections: ConnectionLimit::new(max_connections),
        }
    }
}

impl Default for Limits {
    fn default() -> Limits {
        Limits::new(
            default_max_inflight(),
            DEFAULT_STREAM_IDLE_TIMEOUT,
            DEFAULT_MAX_CONNECTIONS as usize,
        )
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

/// Default `--max-connections`.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 4096;

/// Connections the gateway keeps open at once.
#[derive(Clone)]
pub struct ConnectionLimit {
    open: Arc<Semaphore>,
    max: usize,
}

/// An admitted connection: its slot is given back when the connection is dropped.
pub struct Admitted<IO> {
    io: IO,
    _slot: OwnedSemaphorePermit,
}

impl ConnectionLimit {
    pub fn new(max: usize) -> ConnectionLimit {
        ConnectionLimit {
            open: Arc::new(Semaphore::new(max)),
            max,
        }
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.max - self.open.available_permits()
    }

    /// The accepted connections of `incoming` while fewer than the cap are open. One past the
    /// cap is closed at once (its client sees the connection reset and may retry), counted in
    /// `stagefs_gateway_connections_refused_total`, and logged at most once a second.
    pub fn admit<IO, E>(
        self,
        incoming: impl futures::Stream<Item = Result<IO, E>>,
    ) -> impl futures::Stream<Item = Result<Admitted<IO>, E>> {
        use futures::StreamExt;
        let last_log = Arc::new(Mutex::new(None::<std::time::Instant>));
        incoming.filter_map(move |accepted| {
            let (open, max, last_log) = (self.open.clone(), self.max, last_log.clone());
            async move {
                let io = match accepted {
                    Ok(io) => io,
                    Err(error) => return Some(Err(error)),
                };
                match open.try_acquire_owned() {
                    Ok(slot) => Some(Ok(Admitted { io, _slot: slot })),
                    Err(_) => {
                        metrics::counter!("stagefs_gateway_connections_refused_total").increment(1);
                        let mut last = last_log.lock().unwrap_or_else(|p| p.into_inner());
                        if last.is_none_or(|at| at.elapsed() >= Duration::from_secs(1)) {
                            *last = Some(std::time::Instant::now());
                            tracing::warn!(max, "connection refused: --max-connections are open");
                        }
                        None
                    }
                }
            }
        })
    }
}

impl<IO: tonic::transport::server::Connected> tonic::transport::server::Connected for Admitted<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

impl<IO: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Admitted<IO> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Admitted<IO> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connections_past_the_cap_are_closed_and_slots_come_back() {
        use futures::StreamExt;
        let limit = ConnectionLimit::new(2);
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Result<u32, ()>>();
        let admitted = limit
            .clone()
            .admit(tokio_stream::wrappers::UnboundedReceiverStream::new(rx));
        let mut admitted = std::pin::pin!(admitted);
        for conn in 0..3 {
            tx.send(Ok(conn)).unwrap();
        }
        tx.send(Err(())).unwrap();
        let first = admitted.next().await.unwrap().unwrap();
        let second = admitted.next().await.unwrap().unwrap();
        assert_eq!((first.io, second.io), (0, 1));
        assert_eq!(limit.open(), 2);
        // The third is dropped, and an accept error still reaches the server.
        assert!(admitted.next().await.unwrap().is_err());
        drop(first);
        assert_eq!(limit.open(), 1);
        tx.send(Ok(3)).unwrap();
        assert_eq!(admitted.next().await.unwrap().unwrap().io, 3);
    }

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
