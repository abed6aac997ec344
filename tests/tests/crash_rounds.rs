//! Crash safety: writers stream blocks continuously while uploads run, the gateway is killed with
//! SIGKILL at a random moment, and restarted on the same device; repeated for
//! `STAGEFS_CRASH_ROUNDS` rounds (default 20).
//!
//! After every restart each block acknowledged in that round (and a sample of earlier ones) reads
//! back identical, or is NOT_FOUND and identical in the store; blocks whose write was cut off are
//! either absent or exactly right, never torn. At the end everything acknowledged is uploaded
//! identical and every object in the store holds exactly its key's bytes.
//!
//! `STAGEFS_CRASH_SEED` replays the random kill delays of an earlier run (the seed is printed).

use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use stagefs_tests::*;

const SEED: u64 = 0xC2A5;
const WRITERS: usize = 4;
/// Moderate sizes, odd ones included, so a round writes many blocks.
const SIZES: [usize; 7] = [65_536, 131_075, 262_144, 500_001, 1 << 20, 4096, 777_777];
/// Earlier rounds' acknowledged blocks re-checked after each restart.
const OLDER_SAMPLE: usize = 40;

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| {
        v.trim()
            .parse()
            .unwrap_or_else(|e| panic!("{name}={v:?}: {e}"))
    })
}

async fn crash_rounds(engine: &str) {
    let rounds = env_u64("STAGEFS_CRASH_ROUNDS").unwrap_or(20);
    let kill_seed = env_u64("STAGEFS_CRASH_SEED").unwrap_or_else(rand::random);
    eprintln!("[crash_rounds {engine}] {rounds} rounds, STAGEFS_CRASH_SEED={kill_seed}");
    let mut rng = StdRng::seed_from_u64(kill_seed);

    let dir = TestDir::new(&format!("crash-{engine}"));
    let s3 = S3Server::start_in(dir.join("s3")).await;
    let mut gateway = Gateway::builder(dir.path(), &s3, engine)
        .device_size("256MiB")
        .start()
        .await;

    let mut all_acked: Vec<String> = Vec::new();
    let mut total_unacked = 0;
    let mut served_unacked = 0;
    for round in 0..rounds {
        let started = Instant::now();
        let workload = Workload::start(
            &gateway,
            WRITERS,
            (round + 1) * 10_000_000,
            &SIZES,
            SEED,
            all_acked.clone(),
        )
        .await;
        let delay = Duration::from_millis(rng.random_range(50..=700));
        tokio::time::sleep(delay).await;
        if let Some(status) = gateway.exited() {
            panic!(
                "round {round}: the gateway exited on its own with {status}; log tail:\n{}",
                tail(&gateway.current_log(), 40)
            );
        }
        workload.mark_stopping();
        gateway.kill9();
        let report = workload.finish().await;

        gateway.restart().await;
        let mut client = gateway.client().await;
        let mut from_store = 0;
        for key in &report.acked {
            if assert_block_intact(&mut client, &s3, key, &block_bytes(key, SEED)).await
                == FoundIn::Store
            {
                from_store += 1;
            }
        }
        for key in &report.unacked {
            if assert_served_bytes_valid(&mut client, key, &block_bytes(key, SEED)).await {
                served_unacked += 1;
            }
        }
        // A sample of what earlier rounds acknowledged: later crashes must not lose it.
        for _ in 0..OLDER_SAMPLE.min(all_acked.len()) {
            let key = &all_acked[rng.random_range(0..all_acked.len())];
            assert_block_intact(&mut client, &s3, key, &block_bytes(key, SEED)).await;
        }
        eprintln!(
            "[crash_rounds {engine}] round {round}: killed after {delay:?}: {} acked ({from_store} already in the store), \
             {} cut off, {} RESOURCE_EXHAUSTED, {} concurrent reads; round took {:.1} s",
            report.acked.len(),
            report.unacked.len(),
            report.resource_exhausted,
            report.reads_ok,
            started.elapsed().as_secs_f64()
        );
        total_unacked += report.unacked.len();
        all_acked.extend(report.acked);
    }
    assert!(
        all_acked.len() as u64 >= rounds,
        "only {} writes were acknowledged in {rounds} rounds: the workload did not exercise the gateway",
        all_acked.len()
    );

    // Finally everything acknowledged drains to the store, byte-identical, and nothing else in the
    // store is wrong either (cut-off writes that were recovered must be whole).
    let mut client = gateway.client().await;
    drain(&mut client, Duration::from_secs(300))
        .await
        .unwrap_or_else(|status| panic!("Drain failed: {status:?}"));
    wait_uploaded(&mut client, &all_acked, Duration::from_secs(300))
        .await
        .unwrap_or_else(|status| {
            panic!(
                "WaitUploaded of {} acknowledged keys failed: {status:?}",
                all_acked.len()
            )
        });
    assert_objects_identical(&s3, &all_acked, SEED).await;
    let stored = assert_every_object_valid(&s3, SEED).await;
    eprintln!(
        "[crash_rounds {engine}] {} acknowledged blocks all uploaded identical; {total_unacked} cut-off writes \
         ({served_unacked} of them recovered whole); {} objects in the store",
        all_acked.len(),
        stored.len()
    );
}

stagefs_tests::engine_tests!(crash_rounds, 1200);
