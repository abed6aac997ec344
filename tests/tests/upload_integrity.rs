//! Uploads arrive intact or not at all: a proxy between the gateway and a real S3 server (s3s-fs)
//! flips one bit in the body of the first block it forwards. The store must refuse that PUT, the
//! gateway must upload the block again, and the object must end up identical to what was
//! staged, with either way of proving integrity to the store (`--s3-integrity`): a checksum the
//! store verifies (the default), or the body's hash in the signature.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use stagefs_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const SEED: u64 = 0x1A7E_6B17;
const SIZES: [usize; 3] = [1 << 20, 333_333, 4096];

/// What the proxy saw and did.
#[derive(Default)]
struct Tally {
    block_puts: AtomicUsize,
    corrupted: AtomicUsize,
}

/// Forwards TCP connections to `upstream`, flipping one bit in the middle of the body of the
/// first PUT of a block object (`chunks/…`); everything else passes unchanged.
async fn corrupting_proxy(upstream: u16) -> (u16, Arc<Tally>) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the proxy");
    let port = listener.local_addr().unwrap().port();
    let tally = Arc::new(Tally::default());
    let seen = tally.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
                continue;
            };
            let (client_read, mut client_write) = client.into_split();
            let (mut server_read, server_write) = server.into_split();
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
            });
            tokio::spawn(forward_requests(client_read, server_write, seen.clone()));
        }
    });
    (port, tally)
}

/// Copies HTTP/1.1 requests (with `Content-Length` bodies, as the S3 client sends them) one at a
/// time, so that a block PUT's body can be told from its headers.
async fn forward_requests(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    tally: Arc<Tally>,
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 << 10];
    loop {
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let n = from.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        let body_len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .map_or(0, |v| v.trim().parse().expect("a numeric Content-Length"));
        while buf.len() < head_end + body_len {
            let n = from.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let mut request: Vec<u8> = buf.drain(..head_end + body_len).collect();
        if head.starts_with("put ") && head.contains("/chunks/") && body_len > 0 {
            tally.block_puts.fetch_add(1, Ordering::SeqCst);
            let first = tally
                .corrupted
                .compare_exchange(0, 1, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok();
            if first {
                request[head_end + body_len / 2] ^= 0x10;
            }
        }
        to.write_all(&request).await?;
    }
}

async fn corrupted_in_transit(integrity: &str) {
    let dir = TestDir::new(&format!("upload-integrity-{integrity}"));
    let s3 = S3Server::start_in(dir.join("s3")).await;
    let (proxy, tally) = corrupting_proxy(s3.port()).await;
    let gateway = Gateway::builder(dir.path(), &s3, "psync")
        .s3_endpoint(format!("http://127.0.0.1:{proxy}"))
        .args(["--s3-integrity", integrity])
        // Retry at once, and never quarantine: the refusal is the store's, not the block's.
        .args(["--retry-initial", "50ms", "--retry-max", "200ms"])
        .args(["--upload-max-attempts", "100"])
        .start()
        .await;
    let mut client = gateway.client().await;
    let keys: Vec<String> = SIZES
        .iter()
        .enumerate()
        .map(|(i, &len)| block_key(500 + i as u64, 0, len))
        .collect();
    for key in &keys {
        write_block(&mut client, key, &block_bytes(key, SEED))
            .await
            .unwrap_or_else(|s| panic!("WriteBlock({key}): {s:?}"));
    }
    wait_uploaded(&mut client, &keys, Duration::from_secs(60))
        .await
        .unwrap_or_else(|s| {
            panic!(
                "the blocks must be uploaded once the store refused the corrupted PUT: {s:?}\n{}",
                gateway.log()
            )
        });
    assert_eq!(
        tally.corrupted.load(Ordering::SeqCst),
        1,
        "the proxy must have corrupted one block PUT"
    );
    assert!(
        tally.block_puts.load(Ordering::SeqCst) > keys.len(),
        "the corrupted PUT must have been refused and sent again: {} block PUTs for {} blocks",
        tally.block_puts.load(Ordering::SeqCst),
        keys.len()
    );
    assert_objects_identical(&s3, &keys, SEED).await;
}

#[test]
fn a_checksum_the_store_verifies_refuses_a_corrupted_upload() {
    harness_runtime().block_on(run_scenario(
        "upload_integrity crc64nvme",
        Duration::from_secs(120),
        corrupted_in_transit("crc64nvme"),
    ));
}

#[test]
fn a_signed_payload_refuses_a_corrupted_upload() {
    harness_runtime().block_on(run_scenario(
        "upload_integrity signed",
        Duration::from_secs(120),
        corrupted_in_transit("signed"),
    ));
}
