//! Concurrent block writers against a gateway: a fixed number of blocks (throughput) or a fixed
//! time (rate and acknowledgement latency).
//!
//! Writers either share one HTTP/2 connection ([`ChannelMode::Shared`]) or open one each
//! ([`ChannelMode::PerWriter`]). Every block gets its own slice id from [`SliceIds`], so keys
//! never repeat within a run.

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use shared::BlockKey;
use tokio::task::JoinSet;

use super::rpc::{self, Client, Payload};
use super::BenchError;

/// How writers reach the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ChannelMode {
    /// One connection, every writer multiplexed over it.
    Shared,
    /// One connection per writer.
    PerWriter,
}

impl fmt::Display for ChannelMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ChannelMode::Shared => "shared connection",
            ChannelMode::PerWriter => "connection per writer",
        })
    }
}

/// How each block travels to the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Transport {
    /// One `WriteBlock` RPC per block.
    Rpc,
    /// One long-lived `WriteBlocks` stream per writer, one message per block.
    Stream,
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Transport::Rpc => "WriteBlock RPC per block",
            Transport::Stream => "WriteBlocks stream",
        })
    }
}

/// Hands out distinct slice ids, starting from a random base so that runs against the same
/// object store do not reuse each other's keys.
pub struct SliceIds(AtomicU64);

impl SliceIds {
    pub fn new() -> Self {
        // Below 2^52 so ids stay readable and far from overflow.
        let base = (rand::random::<u64>() >> 12).max(1);
        SliceIds(AtomicU64::new(base))
    }

    pub fn next(&self) -> u64 {
        self.0.fetch_add(1, Ordering::Relaxed)
    }
}

impl Default for SliceIds {
    fn default() -> Self {
        Self::new()
    }
}

/// When writers stop: after a number of blocks, after some time, or whichever comes first.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stop {
    /// At most this many blocks in total.
    pub blocks: Option<u64>,
    /// No new block after this much time.
    pub after: Option<Duration>,
}

impl Stop {
    pub fn blocks(n: u64) -> Self {
        Stop {
            blocks: Some(n),
            after: None,
        }
    }

    pub fn after(d: Duration) -> Self {
        Stop {
            blocks: None,
            after: Some(d),
        }
    }

    /// Also stop after `n` blocks.
    pub fn or_blocks(self, n: u64) -> Self {
        Stop {
            blocks: Some(n),
            ..self
        }
    }
}

/// What a load run achieved.
#[derive(Debug, Default)]
pub struct LoadResult {
    pub blocks: u64,
    pub bytes: u64,
    pub elapsed: Duration,
    /// Acknowledgement latency of every block, sorted ascending.
    pub latencies: Vec<Duration>,
    /// Keys of every acknowledged block.
    pub keys: Vec<String>,
}

impl LoadResult {
    pub fn mib_per_s(&self) -> f64 {
        super::mib_per_s(self.bytes, self.elapsed)
    }

    pub fn blocks_per_s(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.blocks as f64 / secs
        } else {
            0.0
        }
    }

    /// Latency percentile `q` in 0..=1 (nearest rank), in milliseconds.
    pub fn latency_ms(&self, q: f64) -> f64 {
        super::percentile_ms(&self.latencies, q)
    }
}

/// Opens the connections for `writers` writers in `mode`.
pub async fn clients(
    addr: SocketAddr,
    access: &client::fs::GatewayAccess,
    writers: usize,
    mode: ChannelMode,
) -> Result<Vec<Client>, BenchError> {
    match mode {
        ChannelMode::Shared => {
            let client = rpc::connect(addr, access).await?;
            Ok(vec![client; writers])
        }
        ChannelMode::PerWriter => {
            let mut clients = Vec::with_capacity(writers);
            for _ in 0..writers {
                clients.push(rpc::connect(addr, access).await?);
            }
            Ok(clients)
        }
    }
}

/// Runs one writer per client until `stop`, each writing `payload`-sized blocks under fresh keys.
pub async fn run(
    clients: Vec<Client>,
    ids: Arc<SliceIds>,
    payload: Payload,
    stop: Stop,
    transport: Transport,
) -> Result<LoadResult, BenchError> {
    let block_len = u32::try_from(payload.len())
        .map_err(|_| BenchError::Args(format!("block of {} bytes is too large", payload.len())))?;
    let claimed = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = JoinSet::new();
    for mut client in clients {
        let ids = ids.clone();
        let payload = payload.clone();
        let claimed = claimed.clone();
        tasks.spawn(async move {
            let mut latencies = Vec::new();
            let mut keys = Vec::new();
            let mut stream = match transport {
                Transport::Stream => Some(rpc::BlockStream::open(&mut client).await?),
                Transport::Rpc => None,
            };
            loop {
                if stop.after.is_some_and(|d| start.elapsed() >= d) {
                    break;
                }
                if stop
                    .blocks
                    .is_some_and(|n| claimed.fetch_add(1, Ordering::Relaxed) >= n)
                {
                    break;
                }
                let key = BlockKey::new(ids.next(), 0, block_len)?;
                let sent = Instant::now();
                match &mut stream {
                    Some(stream) => stream.write(&key, &payload).await?,
                    None => rpc::write_block(&mut client, &key, &payload).await?,
                };
                latencies.push(sent.elapsed());
                keys.push(key.to_string());
            }
            Ok::<_, BenchError>((latencies, keys))
        });
    }
    let mut result = LoadResult::default();
    let mut first_error = None;
    while let Some(joined) = tasks.join_next().await {
        match joined.map_err(BenchError::from).and_then(|r| r) {
            Ok((latencies, keys)) => {
                result.latencies.extend(latencies);
                result.keys.extend(keys);
            }
            Err(e) => {
                if first_error.is_none() {
                    first_error = Some(e);
                    // One failed writer fails the run; stop the others instead of waiting.
                    tasks.abort_all();
                }
            }
        }
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    result.elapsed = start.elapsed();
    result.blocks = result.keys.len() as u64;
    result.bytes = result.blocks * u64::from(block_len);
    result.latencies.sort_unstable();
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let result = LoadResult {
            latencies: (1..=100).map(Duration::from_millis).collect(),
            ..Default::default()
        };
        assert_eq!(result.latency_ms(0.5).round(), 51.0);
        assert_eq!(result.latency_ms(0.99).round(), 99.0);
        assert_eq!(LoadResult::default().latency_ms(0.5), 0.0);
    }
}
