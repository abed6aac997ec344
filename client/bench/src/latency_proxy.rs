//! A TCP proxy that makes a local server behave like a distant one: every byte is delivered
//! `delay / 2` (plus up to `jitter`) after it was sent, in each direction, so a request/response
//! exchange pays `delay` more, and an optional bandwidth cap limits each direction of each
//! connection. Put in front of the S3 test server, it gives benchmarks the ~25 ms per request
//! of a cloud object store (`stagefs bench proxy`).
//!
//! Bytes keep their order: a chunk is never delivered before the one read before it.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use rand::Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

#[derive(Debug, Clone, clap::Args)]
pub struct ProxyArgs {
    /// Address to accept connections on; port 0 picks a free one (printed as "listening on ADDR").
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// The server to forward to (e.g. the S3 test server).
    #[arg(long)]
    pub upstream: SocketAddr,
    /// Added to every round trip: half on the way there, half on the way back.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "25ms")]
    pub delay: Duration,
    /// Up to this much more, at random, per chunk and direction (order is kept).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "0ms")]
    pub jitter: Duration,
    /// Bytes per second per direction of each connection (e.g. 100MiB); 0 for no cap.
    #[arg(long, value_parser = shared::size::parse_size, default_value = "0")]
    pub bandwidth: u64,
}

/// Binds the listener; `serve` then runs the proxy on it.
pub async fn bind(args: &ProxyArgs) -> std::io::Result<TcpListener> {
    TcpListener::bind(args.listen).await
}

/// Accepts connections forever, proxying each one.
pub async fn serve(listener: TcpListener, args: ProxyArgs) -> std::io::Result<()> {
    loop {
        let (inbound, peer) = listener.accept().await?;
        let args = args.clone();
        tokio::spawn(async move {
            if let Err(e) = proxy_connection(inbound, &args).await {
                tracing::debug!(%peer, error = %e, "proxied connection ended with an error");
            }
        });
    }
}

async fn proxy_connection(inbound: TcpStream, args: &ProxyArgs) -> std::io::Result<()> {
    let outbound = TcpStream::connect(args.upstream).await?;
    inbound.set_nodelay(true)?;
    outbound.set_nodelay(true)?;
    let (in_read, in_write) = inbound.into_split();
    let (out_read, out_write) = outbound.into_split();
    let one_way = args.delay / 2;
    let there = pump(in_read, out_write, one_way, args.jitter, args.bandwidth);
    let back = pump(out_read, in_write, one_way, args.jitter, args.bandwidth);
    let (a, b) = tokio::join!(there, back);
    a.and(b)
}

/// Moves bytes from `reader` to `writer`, each chunk delivered `one_way` (+ jitter) after it was
/// read, at most `bandwidth` bytes per second; closes the write side at end of stream.
async fn pump(
    mut reader: tokio::net::tcp::OwnedReadHalf,
    mut writer: tokio::net::tcp::OwnedWriteHalf,
    one_way: Duration,
    jitter: Duration,
    bandwidth: u64,
) -> std::io::Result<()> {
    let (chunks, mut inbox) = mpsc::unbounded_channel::<(Instant, Bytes)>();
    let reading = async move {
        let mut last_due = Instant::now();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = reader.read(&mut buf).await?;
            if n == 0 {
                return Ok::<_, std::io::Error>(());
            }
            let extra = if jitter.is_zero() {
                Duration::ZERO
            } else {
                rand::rng().random_range(Duration::ZERO..=jitter)
            };
            // Never before the previous chunk: jitter must not reorder a byte stream.
            let due = (Instant::now() + one_way + extra).max(last_due);
            last_due = due;
            if chunks
                .send((due, Bytes::copy_from_slice(&buf[..n])))
                .is_err()
            {
                return Ok(());
            }
        }
    };
    let writing = async move {
        let mut next_free = Instant::now();
        while let Some((due, chunk)) = inbox.recv().await {
            tokio::time::sleep_until(due).await;
            if bandwidth > 0 {
                let start = next_free.max(Instant::now());
                next_free = start + Duration::from_secs_f64(chunk.len() as f64 / bandwidth as f64);
                tokio::time::sleep_until(next_free).await;
            }
            writer.write_all(&chunk).await?;
        }
        writer.shutdown().await
    };
    let (read_result, write_result) = tokio::join!(reading, writing);
    read_result.and(write_result)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server on a free port.
    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut socket, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let (mut r, mut w) = socket.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    async fn proxy(args: ProxyArgs) -> SocketAddr {
        let listener = bind(&args).await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, args));
        addr
    }

    #[tokio::test]
    async fn round_trips_pay_the_delay_and_bytes_arrive_intact_and_in_order() {
        let upstream = echo_server().await;
        let delay = Duration::from_millis(60);
        let addr = proxy(ProxyArgs {
            listen: "127.0.0.1:0".parse().unwrap(),
            upstream,
            delay,
            jitter: Duration::from_millis(20),
            bandwidth: 0,
        })
        .await;
        let mut conn = TcpStream::connect(addr).await.unwrap();
        for round in 0..3u8 {
            let message: Vec<u8> = (0..200_000u32)
                .map(|i| (i as u8).wrapping_mul(round + 1))
                .collect();
            let started = Instant::now();
            let (mut r, mut w) = conn.split();
            let send = async { w.write_all(&message).await.unwrap() };
            let mut echoed = vec![0u8; message.len()];
            let receive = async { r.read_exact(&mut echoed).await.unwrap() };
            tokio::join!(send, receive);
            // A sleep never ends early, so the injected delay is a hard lower bound.
            assert!(
                started.elapsed() >= delay,
                "round {round} took {:?}",
                started.elapsed()
            );
            assert!(
                echoed == message,
                "round {round}: bytes changed or reordered through the proxy"
            );
        }
    }

    #[tokio::test]
    async fn bandwidth_cap_spaces_out_a_transfer() {
        let upstream = echo_server().await;
        let addr = proxy(ProxyArgs {
            listen: "127.0.0.1:0".parse().unwrap(),
            upstream,
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            bandwidth: 1 << 20,
        })
        .await;
        let mut conn = TcpStream::connect(addr).await.unwrap();
        let message = vec![7u8; 512 * 1024];
        let started = Instant::now();
        let (mut r, mut w) = conn.split();
        let mut echoed = vec![0u8; message.len()];
        tokio::join!(async { w.write_all(&message).await.unwrap() }, async {
            r.read_exact(&mut echoed).await.unwrap()
        });
        // 512 KiB at 1 MiB/s each way: at least ~0.5 s (the first chunk goes out at once).
        assert!(
            started.elapsed() >= Duration::from_millis(400),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(echoed, message);
    }
}
