//! Object store outage: with the S3 server down, writes are still acknowledged (the device has
//! room) and served, the gateway reports the backlog and the store error, claims nothing uploaded,
//! and once the server is back every block drains byte-identical.

use std::time::{Duration, Instant};

use proto::staging::BlockState;
use stagefs_tests::*;

const SEED: u64 = 0x07A6E;
const SIZES: [usize; 5] = [1 << 20, 1_000_001, 65_536, 4 << 20, 333_333];

async fn store_outage(engine: &str) {
    let dir = TestDir::new(&format!("outage-{engine}"));
    let mut s3 = S3Server::start_in(dir.join("s3")).await;
    let gateway = Gateway::builder(dir.path(), &s3, engine)
        .device_size("256MiB")
        // Retry quickly and never give up during the outage.
        .args([
            "--retry-initial",
            "100ms",
            "--retry-max",
            "1s",
            "--upload-max-attempts",
            "1000000",
        ])
        .start()
        .await;
    let mut client = gateway.client().await;

    // The store works at first.
    let early: Vec<String> = (0..2)
        .map(|i| block_key(100 + i, 0, SIZES[i as usize]))
        .collect();
    for key in &early {
        write_block(&mut client, key, &block_bytes(key, SEED))
            .await
            .unwrap_or_else(|s| panic!("WriteBlock({key}): {s:?}"));
    }
    wait_uploaded(&mut client, &early, Duration::from_secs(60))
        .await
        .unwrap_or_else(|s| panic!("WaitUploaded before the outage: {s:?}"));
    assert_objects_identical(&s3, &early, SEED).await;

    // Outage: writes are acknowledged and readable all the same.
    s3.stop();
    let outage_started = Instant::now();
    let keys: Vec<String> = (0..24)
        .map(|i| block_key(1_000 + i * 997, i as u32, SIZES[i as usize % SIZES.len()]))
        .collect();
    for key in &keys {
        within(
            Duration::from_secs(60),
            &format!("WriteBlock({key}) during the outage"),
            write_block(&mut client, key, &block_bytes(key, SEED)),
        )
        .await
        .unwrap_or_else(|s| {
            panic!("WriteBlock({key}) during the store outage must be acknowledged: {s:?}")
        });
    }
    for key in &keys {
        let data = read_block(&mut client, key)
            .await
            .unwrap_or_else(|s| panic!("ReadBlock({key}) during the outage: {s:?}"));
        assert_same_bytes(
            &format!("ReadBlock({key}) during the outage"),
            &data,
            &block_bytes(key, SEED),
        );
    }

    // Status shows the backlog and the store error (within a few retries).
    let deadline = Instant::now() + Duration::from_secs(60);
    let during = loop {
        let st = status(&mut client).await;
        if st.queue_len > 0 && !st.last_store_error.is_empty() {
            break st;
        }
        if Instant::now() > deadline {
            panic!("60 s into the outage Status must show queue_len > 0 and a last_store_error: {st:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!(
        "[store_outage {engine}] during the outage: queue_len {}, retries {}, last_store_error {:?}",
        during.queue_len, during.upload_retries_total, during.last_store_error
    );
    // Let the retries run a while longer; nothing may be claimed uploaded or be quarantined.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for stat in stat_blocks(&mut client, &keys).await {
        assert!(
            matches!(state_of(&stat), BlockState::Staged | BlockState::Uploading),
            "during the outage {} must be staged (or uploading), not {:?}: {stat:?}",
            stat.key,
            state_of(&stat)
        );
    }
    let st = status(&mut client).await;
    assert_eq!(
        st.blocks_quarantined, 0,
        "no block may be quarantined with --upload-max-attempts 1000000: {st:?}"
    );
    assert!(st.queue_len > 0, "the backlog is still there: {st:?}");

    // Recovery.
    s3.start().await;
    let outage = outage_started.elapsed();
    let recovering = Instant::now();
    wait_uploaded(&mut client, &keys, Duration::from_secs(120))
        .await
        .unwrap_or_else(|s| {
            panic!("WaitUploaded within 120 s of the store coming back failed: {s:?}")
        });
    eprintln!(
        "[store_outage {engine}] outage lasted {:.1} s; backlog uploaded {:.1} s after the store came back",
        outage.as_secs_f64(),
        recovering.elapsed().as_secs_f64()
    );
    assert_objects_identical(&s3, &keys, SEED).await;
    let stored = assert_every_object_valid(&s3, SEED).await;
    assert_eq!(
        stored.len(),
        keys.len() + early.len(),
        "the store holds exactly the written blocks: {stored:?}"
    );
    let st = drain(&mut client, Duration::from_secs(60))
        .await
        .unwrap_or_else(|s| panic!("Drain: {s:?}"));
    assert_eq!(st.queue_len, 0, "nothing waits after the drain: {st:?}");
}

stagefs_tests::engine_tests!(store_outage, 600);
