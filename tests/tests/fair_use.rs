//! Many clients, fair use: `--meta-ops-per-client` holds a client that scans the tree at full
//! speed to its rate, by making its calls wait (none fails), while another client's calls are
//! not held back and session heartbeats always pass; `--meta-ops-per-tenant` holds a tenant's
//! connections together to one rate.
//!
//! Against a real gateway with tokens: a "scanner" tenant calls `GetAttr` as fast as it can on
//! one connection while a "writer" tenant creates files on another. With a limit of 200 calls a
//! second, 600 scanner calls take at least 2 s (the burst of 200, then 200 a second), every call
//! succeeds, and `/metrics` shows the scanner's waits and none of the writer's (that heartbeats
//! are never held back is a unit test of `meta_rate`). The test prints the writer's create latency with the scanner
//! unlimited and limited (README's figure).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use proto::meta as pb;
use stagefs_tests::prometheus::scrape;
use stagefs_tests::rpc::{create, open_session, with_token, Meta};
use stagefs_tests::s3::free_port;
use stagefs_tests::*;

const SCANNER: &str = "scanner-0123456789abcdef0123456789abcdef";
const WRITER: &str = "writer-0123456789abcdef0123456789abcdef01";
const RATE: u64 = 200;

async fn session(meta: &mut Meta) -> Bytes {
    open_session(meta, "fair use").await.session_id
}

/// `calls` GetAttr of the root, one after another; how long they took.
async fn scan(meta: &mut Meta, calls: u64) -> Duration {
    let started = Instant::now();
    for _ in 0..calls {
        meta.get_attr(pb::InodeRequest { ino: 1 })
            .await
            .expect("a throttled call waits, it does not fail");
    }
    started.elapsed()
}

/// Creates `count` files; the 50th and 99th percentile of their latencies.
async fn creates(
    meta: &mut Meta,
    session: &Bytes,
    prefix: &str,
    count: usize,
) -> (Duration, Duration) {
    let mut took = Vec::with_capacity(count);
    for i in 0..count {
        let started = Instant::now();
        create(meta, session, 1, &format!("{prefix}-{i}")).await;
        took.push(started.elapsed());
    }
    took.sort();
    (took[count / 2], took[count * 99 / 100])
}

/// The writer's create latencies while a scanner calls GetAttr without pause on `scanners`
/// connections.
async fn writer_under_scan(
    gateway: &Gateway,
    prefix: &str,
    scanners: usize,
) -> (Duration, Duration) {
    let mut writer = gateway.meta_client_as(&with_token(WRITER)).await;
    let writer_session = session(&mut writer).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut scans = Vec::new();
    for _ in 0..scanners {
        let mut scanner = gateway.meta_client_as(&with_token(SCANNER)).await;
        let stop = stop.clone();
        scans.push(tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = scanner.get_attr(pb::InodeRequest { ino: 1 }).await;
            }
        }));
    }
    let latencies = creates(&mut writer, &writer_session, prefix, 200).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for scan in scans {
        scan.await.unwrap();
    }
    latencies
}

fn tokens_file(dir: &TestDir) -> std::path::PathBuf {
    let path = dir.join("tokens.toml");
    std::fs::write(
        &path,
        format!(
            "[[token]]\nname = \"scanner\"\nsecret = \"{SCANNER}\"\naccess = \"rw\"\n\n\
             [[token]]\nname = \"writer\"\nsecret = \"{WRITER}\"\naccess = \"rw\"\n"
        ),
    )
    .unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_scanner_past_its_rate_waits_and_others_do_not() {
    let dir = TestDir::new("fair-use");
    let s3 = S3Server::start_in(dir.join("s3")).await;
    for gateway in ["unlimited", "limited", "per-tenant"] {
        std::fs::create_dir_all(dir.join(gateway)).unwrap();
    }
    let tokens = tokens_file(&dir);
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();

    // Unlimited first: the figure to compare with.
    let unlimited = Gateway::builder(&dir.join("unlimited"), &s3, "psync")
        .tokens(&tokens, WRITER)
        .start()
        .await;
    let alone = writer_under_scan(&unlimited, "alone", 0).await;
    let flooded = writer_under_scan(&unlimited, "flooded", 4).await;
    drop(unlimited);

    // Three file systems take turns on one scratch bucket and upload nothing: the later ones
    // skip the store check, whose claim of the prefix would (rightly) refuse them.
    let gateway = Gateway::builder(&dir.join("limited"), &s3, "psync")
        .tokens(&tokens, WRITER)
        .args([
            "--store-check",
            "off",
            "--meta-ops-per-client",
            &RATE.to_string(),
            "--metrics-listen",
            &metrics.to_string(),
        ])
        .start()
        .await;
    let mut scanner = gateway.meta_client_as(&with_token(SCANNER)).await;
    let mut writer = gateway.meta_client_as(&with_token(WRITER)).await;
    let writer_session = session(&mut writer).await;
    let calls = 3 * RATE;
    let scanning = tokio::spawn(async move {
        let took = scan(&mut scanner, calls).await;
        (took, scanner)
    });
    // Meanwhile the writer works on its own connection.
    let (writer_p50, writer_p99) = creates(&mut writer, &writer_session, "limited", 100).await;
    let (took, _scanner) = scanning.await.unwrap();
    // The burst, then the rate: no faster than (calls - burst) / rate.
    let floor = Duration::from_secs_f64((calls - RATE) as f64 / RATE as f64);
    assert!(
        took >= floor - Duration::from_millis(50),
        "{calls} calls at {RATE}/s took only {took:?}"
    );
    let samples = scrape(metrics);
    let waits = |tenant: &str| {
        samples
            .get(&format!(
                "stagefs_meta_throttled_seconds_count{{tenant=\"{tenant}\"}}"
            ))
            .copied()
            .unwrap_or(0.0)
    };
    assert!(waits("scanner") > 0.0, "the scanner's waits are recorded");
    assert_eq!(waits("writer"), 0.0, "the writer was never held back");
    drop(gateway);

    // Per tenant: two connections of one tenant share one allowance.
    let per_tenant = Gateway::builder(&dir.join("per-tenant"), &s3, "psync")
        .tokens(&tokens, WRITER)
        .args([
            "--store-check",
            "off",
            "--meta-ops-per-tenant",
            &RATE.to_string(),
        ])
        .start()
        .await;
    let mut first = per_tenant.meta_client_as(&with_token(SCANNER)).await;
    let mut second = per_tenant.meta_client_as(&with_token(SCANNER)).await;
    let started = Instant::now();
    tokio::join!(scan(&mut first, calls / 2), scan(&mut second, calls / 2));
    let shared = started.elapsed();
    assert!(
        shared >= floor - Duration::from_millis(50),
        "{calls} calls of one tenant on two connections at {RATE}/s took only {shared:?}"
    );
    eprintln!(
        "fair use: {calls} scanner calls at --meta-ops-per-client {RATE} took {took:?}; writer \
         create p50/p99: alone {:?}/{:?}, beside 4 unlimited scanners {:?}/{:?}, beside a \
         limited scanner {writer_p50:?}/{writer_p99:?}",
        alone.0, alone.1, flooded.0, flooded.1
    );
}
