//! Safe to share, limits: what clients that stall or never read can make the gateway hold.
//!
//! Against a real gateway (`--max-inflight 64MiB --stream-idle-timeout 3s`), on one connection:
//! 200 `WriteBlock` streams that send a header and stall, and 200 that send all but the last byte
//! of a 4 MiB block and stall (before the limits, these took the gateway from about 200 MB to
//! 2 GB). The gateway's resident memory, read from `/proc` throughout, stays within the budget,
//! what HTTP/2 holds for one connection and a fixed allowance above where it started; every
//! attacking stream is ended; and a well-behaved client on another connection writes and reads a
//! block meanwhile. Then a `WriteBlocks` client that never reads its answers: its blocks are staged and
//! memory stays bounded as well (before, each unread answer pinned its 4 MiB block).

use std::time::{Duration, Instant};

use bytes::Bytes;
use proto::staging::{BlockHeader, WriteBlocksRequest};
use stagefs_tests::*;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

const MIB: u64 = 1 << 20;
const MAX_INFLIGHT: u64 = 64 * MIB;
const IDLE: Duration = Duration::from_secs(3);
/// Beyond the budget and one connection window: allocator slack, thread stacks, caches.
const ALLOWANCE: u64 = 64 * MIB;
/// What HTTP/2 may hold for one connection: data received for streams the gateway is not
/// reading yet is bounded by the connection window, but the buffers it arrives in are shared by
/// frames of many streams, so one retained frame keeps a whole read buffer alive. Measured: 200
/// to 256 stalled 4 MiB streams on one connection hold about 4 windows (≈ 280 MiB).
const PER_CONNECTION: u64 = 4 * proto::CONNECTION_WINDOW_BYTES as u64;
const STALLED: u64 = 200;

/// How often the gateway's RSS is sampled while it is under attack.
const RSS_SAMPLES: Duration = Duration::from_millis(50);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stalled_streams_and_unread_answers_stay_within_the_budget() {
    let dir = TestDir::new("limits");
    let s3 = S3Server::start_in(dir.join("s3")).await;
    let gateway = Gateway::builder(dir.path(), &s3, "psync")
        .device_size("1GiB")
        .args([
            "--max-inflight",
            "64MiB",
            "--stream-idle-timeout",
            "3s",
            "--uploads-paused",
        ])
        .start()
        .await;
    // Warm up the paths a normal write takes, so the baseline includes their buffers.
    let mut good = gateway.client().await;
    for i in 0..8 {
        let key = block_key(1_000 + i, 0, (4 * MIB) as usize);
        write_block(&mut good, &key, &block_bytes(&key, 7))
            .await
            .unwrap();
    }
    let baseline = gateway.rss_bytes();

    // The attackers: one connection, 2 × 200 streams that stall.
    let attacker = gateway.client().await;
    let mut senders = Vec::new();
    let mut calls = Vec::new();
    for i in 0..2 * STALLED {
        let key = block_key(10_000 + i, 0, (4 * MIB) as usize);
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        tx.send(header_frame(&key, 4 * MIB, 0)).await.unwrap();
        if i >= STALLED {
            // All but the last byte.
            let data = Bytes::from(vec![0xa5; (MIB) as usize]);
            for _ in 0..3 {
                tx.send(data_frame(data.clone())).await.unwrap();
            }
            tx.send(data_frame(data.slice(1..))).await.unwrap();
        }
        senders.push(tx);
        let mut client = attacker.clone();
        calls.push(tokio::spawn(async move {
            let started = Instant::now();
            let outcome = client.write_block(ReceiverStream::new(rx)).await;
            (outcome.map(|_| ()), started.elapsed())
        }));
    }

    // Meanwhile a normal client on its own connection writes and reads a block.
    let well_behaved = async {
        let mut client = gateway.client().await;
        let key = block_key(20_000, 0, (4 * MIB) as usize);
        let data = block_bytes(&key, 9);
        write_block(&mut client, &key, &data)
            .await
            .expect("a normal client's write succeeds under attack");
        assert_eq!(read_block(&mut client, &key).await.unwrap(), data);
        let mut outcomes = Vec::new();
        for call in calls.drain(..) {
            outcomes.push(call.await.unwrap());
        }
        outcomes
    };
    let (peak, outcomes) = gateway
        .peak_rss_during(
            RSS_SAMPLES,
            within(Duration::from_secs(120), "the attack is over", well_behaved),
        )
        .await;
    let bound = baseline + MAX_INFLIGHT + PER_CONNECTION + ALLOWANCE;
    eprintln!(
        "stalled streams: RSS {} MiB before, {} MiB at most during (bound {} MiB)",
        baseline / MIB,
        peak / MIB,
        bound / MIB
    );
    assert!(
        peak <= bound,
        "RSS rose from {} MiB to {} MiB under {} stalled streams; the bound is {} MiB",
        baseline / MIB,
        peak / MIB,
        2 * STALLED,
        bound / MIB
    );
    for (i, (outcome, took)) in outcomes.iter().enumerate() {
        let status = outcome
            .as_ref()
            .expect_err("a stalled stream is ended, not answered OK");
        assert!(
            matches!(
                status.code(),
                Code::DeadlineExceeded | Code::ResourceExhausted
            ),
            "stream {i}: {status:?}"
        );
        assert!(
            // Ended by the idle timeout (or a wait for room as long), not served to the end.
            *took < IDLE * 20,
            "stream {i} was held for {took:?}"
        );
    }
    drop(senders);

    // A WriteBlocks client that never reads its answers.
    let mut lazy = gateway.client().await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let unread = tokio::spawn(async move { lazy.write_blocks(ReceiverStream::new(rx)).await });
    let before = gateway.rss_bytes();
    let feed = async {
        for i in 0..100u64 {
            let key = block_key(30_000 + i, 0, (4 * MIB) as usize);
            let data = block_bytes(&key, 3);
            tx.send(WriteBlocksRequest {
                request_id: i + 1,
                header: Some(BlockHeader {
                    key,
                    total_len: 4 * MIB,
                    crc32c: crc32c::crc32c(&data),
                    session_id: Default::default(),
                }),
                data,
            })
            .await
            .unwrap();
        }
        // Give the gateway time to stage what it took.
        tokio::time::sleep(Duration::from_secs(2)).await;
    };
    let (peak, ()) = gateway.peak_rss_during(RSS_SAMPLES, feed).await;
    let bound = before + MAX_INFLIGHT + PER_CONNECTION + ALLOWANCE;
    eprintln!(
        "unread answers: RSS {} MiB before, {} MiB at most during (bound {} MiB)",
        before / MIB,
        peak / MIB,
        bound / MIB
    );
    assert!(
        peak <= bound,
        "RSS rose from {} MiB to {} MiB with unread WriteBlocks answers; the bound is {} MiB",
        before / MIB,
        peak / MIB,
        bound / MIB
    );
    drop(tx);
    unread.abort();
}

/// Whether the gateway kept this connection open: one it refused is closed at once (EOF or a
/// reset); one it admitted stays open, silent or sending its HTTP/2 settings.
async fn kept_open(conn: &mut tokio::net::TcpStream) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 64];
    match tokio::time::timeout(Duration::from_millis(300), conn.read(&mut buf)).await {
        Err(_silent) => true,
        Ok(Ok(n)) => n > 0,
        Ok(Err(_reset)) => false,
    }
}

/// `--max-connections 2`: two idle TCP connections hold both slots; a client past the cap is
/// closed at once (its call fails, it does not hang) and the refusal is logged; once a slot is
/// given back, clients connect again. The gateway reads its limits from `--config`, and the
/// command line's `--max-connections` overrides the file's.
#[tokio::test]
async fn connections_past_the_cap_are_closed_until_a_slot_is_free() {
    let dir = TestDir::new("max-connections");
    let s3 = S3Server::start_in(dir.join("s3")).await;
    let config = dir.join("gateway.toml");
    std::fs::write(&config, "max_connections = 9\nmax_inflight = \"96MiB\"\n").unwrap();
    let gateway = Gateway::builder(dir.path(), &s3, "psync")
        .args([
            "--config",
            config.to_str().unwrap(),
            "--max-connections",
            "2",
        ])
        .start()
        .await;
    let started = gateway.current_log();
    assert!(
        started.contains("max_inflight=100663296") && started.contains("max_connections=2"),
        "the file's --max-inflight and the command line's --max-connections: {started}"
    );
    let status = |gateway: &Gateway| {
        let addr = gateway.addr().to_string();
        async move {
            let mut client = proto::staging::staging_client::StagingClient::new(
                client::fs::connect_gateway(&addr, &client::fs::GatewayAccess::default())
                    .await
                    .map_err(|e| e.to_string())?,
            );
            client
                .status(proto::staging::StatusRequest {})
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        }
    };
    // Two idle connections take both slots (a slot of the start-up check may take a moment to
    // come back: a connection closed at once is opened again).
    let mut idle = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while idle.len() < 2 {
        assert!(
            Instant::now() < deadline,
            "no two connections were kept open"
        );
        let mut conn = tokio::net::TcpStream::connect(gateway.addr())
            .await
            .unwrap();
        if kept_open(&mut conn).await {
            idle.push(conn);
        }
    }
    let refused = tokio::time::timeout(Duration::from_secs(20), status(&gateway))
        .await
        .expect("a client past the cap must be answered, not left hanging");
    assert!(refused.is_err(), "a third connection was served");
    let mut third = tokio::net::TcpStream::connect(gateway.addr())
        .await
        .unwrap();
    assert!(
        !kept_open(&mut third).await,
        "a third connection was kept open"
    );
    assert!(
        gateway
            .current_log()
            .contains("connection refused: --max-connections are open"),
        "{}",
        gateway.current_log()
    );
    // A slot given back is taken by the next client.
    idle.pop();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match status(&gateway).await {
            Ok(()) => break,
            Err(e) => assert!(
                Instant::now() < deadline,
                "no client served after a slot was freed: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
