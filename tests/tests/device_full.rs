//! Backpressure on a full device: with uploads paused, 4 MiB writes fill a 64 MiB device until a
//! write waits `--full-wait` and fails with RESOURCE_EXHAUSTED; nothing acknowledged is lost or
//! overwritten; once uploads resume and the drain frees space, writes succeed again (more than the
//! device holds), and everything acknowledged ends up identical in the store.

use std::time::{Duration, Instant};

use stagefs_tests::*;
use tonic::Code;

const SEED: u64 = 0xF011;
const BLOCK: usize = 4 << 20;
const FULL_WAIT: Duration = Duration::from_secs(2);
/// Lower bound for the failing write: the configured wait, less timer slack.
const MIN_WAIT: Duration = Duration::from_millis(1900);

async fn device_full(engine: &str) {
    let dir = TestDir::new(&format!("full-{engine}"));
    let s3 = S3Server::start_in(dir.join("s3")).await;
    let gateway = Gateway::builder(dir.path(), &s3, engine)
        .device_size("64MiB")
        .args([
            "--segment-size",
            "8MiB",
            "--uploads-paused",
            "--full-wait",
            "2s",
        ])
        .start()
        .await;
    let mut client = gateway.client().await;

    // Fill the device.
    let mut acked: Vec<String> = Vec::new();
    let mut slice = 1_000;
    let full_error = loop {
        assert!(
            acked.len() < 32,
            "64 MiB device accepted {} blocks of 4 MiB with uploads paused",
            acked.len()
        );
        slice += 1;
        let key = block_key(slice, 0, BLOCK);
        let started = Instant::now();
        let result = within(
            Duration::from_secs(60),
            &format!("WriteBlock({key})"),
            write_block(&mut client, &key, &block_bytes(&key, SEED)),
        )
        .await;
        match result {
            Ok(_) => acked.push(key),
            Err(status) => break (key, status, started.elapsed()),
        }
    };
    let (full_key, full_status, waited) = full_error;
    eprintln!(
        "[device_full {engine}] {} blocks of 4 MiB acknowledged; then {full_key} failed after {:.2} s: {full_status:?}",
        acked.len(),
        waited.as_secs_f64()
    );
    assert_eq!(
        full_status.code(),
        Code::ResourceExhausted,
        "a write to a full device must fail with RESOURCE_EXHAUSTED: {full_status:?}"
    );
    assert!(waited >= MIN_WAIT, "the write must wait --full-wait {FULL_WAIT:?} for space before failing; it failed after {waited:?}");
    assert!(
        acked.len() >= 4,
        "a 64 MiB device must hold at least 4 blocks of 4 MiB before it is full, held {}",
        acked.len()
    );

    // While a writer waits for space, Status says so.
    let waiting_key = block_key(slice + 1, 0, BLOCK);
    let waiting_write = {
        let mut client = gateway.client().await;
        let key = waiting_key.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let result = write_block(&mut client, &key, &block_bytes(&key, SEED)).await;
            (result, started.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(800)).await;
    let st = status(&mut client).await;
    assert!(
        st.writers_waiting_for_space >= 1,
        "Status.writers_waiting_for_space while a writer waits: {st:?}"
    );
    let (result, waited) = waiting_write.await.expect("waiting writer task");
    match result {
        Err(status) if status.code() == Code::ResourceExhausted => {
            assert!(waited >= MIN_WAIT, "second full write failed after only {waited:?}")
        }
        other => panic!("a write to the still-full device (uploads paused) must fail with RESOURCE_EXHAUSTED: {other:?}"),
    }

    // Nothing acknowledged was lost or overwritten.
    for key in &acked {
        let data = read_block(&mut client, key)
            .await
            .unwrap_or_else(|s| panic!("ReadBlock({key}) on a full device: {s:?}"));
        assert_same_bytes(
            &format!("ReadBlock({key}) on a full device"),
            &data,
            &block_bytes(key, SEED),
        );
    }

    // Resume uploads: the drain frees space and writes succeed again, more than the device holds.
    set_uploads_paused(&mut client, false).await;
    let st = drain(&mut client, Duration::from_secs(120))
        .await
        .unwrap_or_else(|s| panic!("Drain: {s:?}"));
    assert_eq!(
        st.queue_len, 0,
        "Drain returned with blocks still waiting: {st:?}"
    );
    let first_round = acked.len();
    for i in 0..24 {
        let key = block_key(50_000 + i, 0, BLOCK);
        let started = Instant::now();
        within(
            Duration::from_secs(60),
            &format!("WriteBlock({key})"),
            write_block(&mut client, &key, &block_bytes(&key, SEED)),
        )
        .await
        .unwrap_or_else(|s| {
            panic!(
                "write #{i} after the drain, with uploads running, failed after {:?}: {s:?}",
                started.elapsed()
            )
        });
        acked.push(key);
    }
    wait_uploaded(&mut client, &acked, Duration::from_secs(180))
        .await
        .unwrap_or_else(|s| panic!("WaitUploaded of {} acknowledged blocks: {s:?}", acked.len()));
    assert_objects_identical(&s3, &acked, SEED).await;
    assert_every_object_valid(&s3, SEED).await;
    eprintln!(
        "[device_full {engine}] after the drain {} more 4 MiB blocks (96 MiB on a 64 MiB device) were acknowledged; \
         all {} uploaded identical",
        acked.len() - first_round,
        acked.len()
    );
}

stagefs_tests::engine_tests!(device_full, 600);
