//! `/metrics` of a gateway (`serve --metrics-listen`) and of a mount (`mount --metrics-listen`):
//! after a workload through a real mount (a 5 MiB file and a small one written, read back, a
//! name that does not exist looked up, uploads drained), both parse as Prometheus text and carry
//! the names the operators' dashboards need, with the values the workload implies; and the
//! gateway's upload totals are the ones `Status` reports (one set of counters); the usage
//! gauges give the tenant that created the files their bytes; the small file's `WriteSlice`
//! steps and the metadata region's syncs are counted.

use std::fs;
use std::net::SocketAddr;
use std::time::Duration;

use stagefs_tests::prometheus::{scrape, value};
use stagefs_tests::s3::free_port;
use stagefs_tests::*;

const MIB: u64 = 1 << 20;
const OPS: &str = "ops-0123456789abcdef0123456789abcdef0123";
const TRAINING: &str = "training-0123456789abcdef0123456789abcdef";

#[test]
fn gateway_and_mount_metrics_carry_what_the_workload_did() {
    let dir = TestDir::new("metrics-config");
    let tokens = dir.join("tokens.toml");
    fs::write(
        &tokens,
        format!(
            "[[token]]\nname = \"ops\"\nsecret = \"{OPS}\"\naccess = \"admin\"\n\n\
             [[token]]\nname = \"training\"\nsecret = \"{TRAINING}\"\naccess = \"rw\"\n"
        ),
    )
    .unwrap();
    let gateway_metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mount_metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let stack = FuseStack::start("metrics", |gateway| {
        // Metadata in the device, as by default: its region's syncs are counted.
        gateway
            .meta_in_device()
            .tokens(&tokens, OPS)
            .args(["--metrics-listen", &gateway_metrics.to_string()])
    });
    let mount = stack
        .mount("m")
        .env("STAGEFS_TOKEN", TRAINING)
        .args(["--metrics-listen", &mount_metrics.to_string()])
        .start();

    let pattern = Pattern::new(5);
    let mut out = fs::File::create(mount.join("big")).unwrap();
    pattern.write_to(&mut out, 5 * MIB, MIB as usize).unwrap();
    out.sync_all().unwrap();
    drop(out);
    fs::write(mount.join("small"), vec![7u8; 3000]).unwrap();
    pattern
        .verify(&mut fs::File::open(mount.join("big")).unwrap(), 5 * MIB)
        .unwrap();
    assert_eq!(fs::read(mount.join("small")).unwrap().len(), 3000);
    assert_errno(
        fs::metadata(mount.join("missing")),
        libc::ENOENT,
        "stat of a missing name",
    );
    let status = stack.block_on(async {
        let mut admin = stack.gateway.client().await;
        drain(&mut admin, Duration::from_secs(120)).await.unwrap()
    });
    assert!(status.uploaded_bytes_total >= 5 * MIB + 3000, "{status:?}");

    // The gauges follow the snapshot every half second: wait until they show the drained queue.
    let gateway = stack.block_on(within(
        Duration::from_secs(30),
        "the gauges show the drained queue",
        async {
            loop {
                let samples = scrape(gateway_metrics);
                if samples.get("stagefs_gateway_upload_queue_blocks") == Some(&0.0)
                    && samples.get("stagefs_gateway_staged_bytes") == Some(&0.0)
                {
                    return samples;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        },
    ));
    assert_eq!(
        value(&gateway, "stagefs_gateway_uploaded_bytes_total"),
        status.uploaded_bytes_total as f64,
        "/metrics and Status count the same uploads"
    );
    assert_eq!(
        value(&gateway, "stagefs_gateway_uploaded_blocks_total"),
        status.uploaded_blocks_total as f64
    );
    assert_eq!(
        value(&gateway, "stagefs_gateway_upload_failures_total"),
        0.0
    );
    assert_eq!(value(&gateway, "stagefs_gateway_quarantined_blocks"), 0.0);
    assert_eq!(
        value(&gateway, "stagefs_gateway_oldest_staged_seconds"),
        0.0
    );
    assert!(value(&gateway, "stagefs_gateway_fdatasync_seconds_count") >= 2.0);
    assert!(gateway.contains_key("stagefs_gateway_fdatasync_seconds_bucket{le=\"+Inf\"}"));
    assert!(
        value(
            &gateway,
            "stagefs_rpc_seconds_count{method=\"OpenSession\"}"
        ) >= 1.0
    );
    assert!(value(&gateway, "stagefs_rpc_seconds_count{method=\"Lookup\"}") >= 1.0);
    assert!(
        value(
            &gateway,
            "stagefs_rpc_errors_total{method=\"Lookup\",code=\"NotFound\"}"
        ) >= 1.0
    );
    assert!(
        value(
            &gateway,
            "stagefs_tenant_requests_total{tenant=\"training\"}"
        ) >= 5.0
    );
    assert!(value(&gateway, "stagefs_tenant_requests_total{tenant=\"ops\"}") >= 1.0);
    // The small file went in one `WriteSlice`: its two steps timed, its commit durable by itself
    // or with others, through the metadata region in the device (every sync writes at least
    // redb's header page).
    for step in ["stage", "commit"] {
        assert!(
            value(
                &gateway,
                &format!("stagefs_gateway_write_slice_seconds_count{{step=\"{step}\"}}")
            ) >= 1.0
        );
    }
    let durable_commits: f64 = ["alone", "group"]
        .iter()
        .filter_map(|kind| {
            gateway
                .get(&format!(
                    "stagefs_meta_durable_commit_seconds_count{{kind=\"{kind}\"}}"
                ))
                .copied()
        })
        .sum();
    assert!(durable_commits >= 1.0, "no durable redb commit counted");
    let syncs = value(&gateway, "stagefs_meta_region_syncs_total");
    assert!(syncs >= durable_commits, "{syncs} region syncs");
    // A durable commit writes at least redb's header page.
    assert!(value(&gateway, "stagefs_meta_region_writes_total") >= durable_commits);
    assert!(value(&gateway, "stagefs_meta_region_written_bytes_total") >= durable_commits * 4096.0);
    assert!(
        value(
            &gateway,
            "stagefs_tenant_bytes_total{tenant=\"training\",direction=\"written\"}"
        ) >= (5 * MIB + 3000) as f64
    );

    // What each tenant owns, read from the metadata every few seconds: the two files the
    // training mount created, and the root, which no tenant made.
    let owned = stack.block_on(within(
        Duration::from_secs(30),
        "the usage gauges show the training tenant's files",
        async {
            loop {
                let samples = scrape(gateway_metrics);
                if samples.get("stagefs_tenant_files{tenant=\"training\"}") == Some(&2.0) {
                    return samples;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        },
    ));
    assert_eq!(
        value(&owned, "stagefs_tenant_used_bytes{tenant=\"training\"}"),
        (5 * MIB + 3000) as f64
    );
    assert_eq!(
        value(&owned, "stagefs_tenant_files{tenant=\"anonymous\"}"),
        1.0,
        "the root directory"
    );
    assert!(!owned.contains_key("stagefs_tenant_files{tenant=\"ops\"}"));

    let mount_samples = scrape(mount_metrics);
    assert!(value(&mount_samples, "stagefs_fuse_written_bytes_total") >= (5 * MIB + 3000) as f64);
    assert!(value(&mount_samples, "stagefs_fuse_read_bytes_total") >= (5 * MIB + 3000) as f64);
    assert!(value(&mount_samples, "stagefs_fuse_ops_total{op=\"write\"}") >= 5.0);
    assert!(value(&mount_samples, "stagefs_fuse_ops_total{op=\"lookup\"}") >= 1.0);
    assert!(
        value(
            &mount_samples,
            "stagefs_fuse_op_seconds_count{op=\"fsync\"}"
        ) >= 1.0
    );
    assert!(
        value(
            &mount_samples,
            "stagefs_fuse_errors_total{op=\"lookup\",errno=\"ENOENT\"}"
        ) >= 1.0
    );
    let cache = value(&mount_samples, "stagefs_block_cache_hits_total")
        + value(&mount_samples, "stagefs_block_cache_misses_total");
    assert!(cache >= 1.0, "the reads went through the block cache");
    // Two files written and read back: four handles, given back in windows of 50 ms long
    // before the gauges above settled.
    assert_eq!(value(&mount_samples, "stagefs_released_handles_total"), 4.0);
    let calls = value(&mount_samples, "stagefs_release_calls_total");
    assert!((1.0..=4.0).contains(&calls), "{calls} release calls");
    // Described from the start (whether a `stat` came within the TTL of a close depends on
    // this machine's pace).
    assert!(mount_samples.contains_key("stagefs_closed_file_attrs_answered_total"));
    drop(mount);
}
