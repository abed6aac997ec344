//! Graceful shutdown: SIGTERM while writers are active makes the gateway exit with status 0, and
//! every block it acknowledged is intact after a restart on the same device. Three rounds, with
//! the signal at different moments; uploads run throughout.

use std::time::{Duration, Instant};

use stagefs_tests::*;

const SEED: u64 = 0x5167;
const WRITERS: usize = 4;
const SIZES: [usize; 6] = [65_536, 1_000_001, 4 << 20, 262_147, 4096, 1 << 20];
const DELAYS_MS: [u64; 3] = [300, 900, 1500];

async fn sigterm(engine: &str) {
    let dir = TestDir::new(&format!("sigterm-{engine}"));
    let s3 = S3Server::start_in(dir.join("s3")).await;
    let mut gateway = Gateway::builder(dir.path(), &s3, engine)
        .device_size("256MiB")
        .start()
        .await;
    let mut all_acked: Vec<String> = Vec::new();

    for (round, delay) in DELAYS_MS
        .iter()
        .map(|ms| Duration::from_millis(*ms))
        .enumerate()
    {
        let workload = Workload::start(
            &gateway,
            WRITERS,
            (round as u64 + 1) * 10_000_000,
            &SIZES,
            SEED,
            all_acked.clone(),
        )
        .await;
        // Writers are active: the first acknowledgement has come back, then `delay` more.
        within(
            Duration::from_secs(60),
            "the first acknowledged write",
            async {
                while workload.acked_so_far().is_empty() {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
        )
        .await;
        tokio::time::sleep(delay).await;
        let acked_before_signal = workload.acked_so_far().len();
        workload.mark_stopping();
        let signalled = Instant::now();
        let exit = gateway.sigterm().await;
        let shutdown = signalled.elapsed();
        let report = workload.finish().await;
        assert!(
            exit.success(),
            "round {round}: SIGTERM with {WRITERS} active writers must exit with status 0, got {exit}; log tail:\n{}",
            tail(&gateway.current_log(), 40)
        );

        gateway.restart().await;
        let mut client = gateway.client().await;
        for key in all_acked.iter().chain(&report.acked) {
            assert_block_intact(&mut client, &s3, key, &block_bytes(key, SEED)).await;
        }
        for key in &report.unacked {
            assert_served_bytes_valid(&mut client, key, &block_bytes(key, SEED)).await;
        }
        eprintln!(
            "[sigterm {engine}] round {round}: SIGTERM {delay:?} after the first ack ({acked_before_signal} acked by then), \
             exit in {:.2} s; {} acked, {} cut off",
            shutdown.as_secs_f64(),
            report.acked.len(),
            report.unacked.len()
        );
        all_acked.extend(report.acked);
    }

    let mut client = gateway.client().await;
    drain(&mut client, Duration::from_secs(300))
        .await
        .unwrap_or_else(|s| panic!("Drain: {s:?}"));
    wait_uploaded(&mut client, &all_acked, Duration::from_secs(300))
        .await
        .unwrap_or_else(|s| panic!("WaitUploaded: {s:?}"));
    assert_objects_identical(&s3, &all_acked, SEED).await;
    assert_every_object_valid(&s3, SEED).await;
    let exit = gateway.sigterm().await;
    assert!(
        exit.success(),
        "SIGTERM of an idle gateway: exit status {exit}"
    );
}

stagefs_tests::engine_tests!(sigterm, 600);
