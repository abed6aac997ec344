//! `stagefs bench cluster` end to end at a tiny size: it starts its own PostgreSQL server,
//! gateways on device files and mounts, writes through 1, 2 and 3 gateways, kills one under
//! writers (every close must succeed, or the run fails), takes it over at a new address and
//! reads every file back byte for byte. Figures at this size mean nothing, so none is compared
//! with a target here.

use std::process::Command;

use stagefs_tests::bench::json_report;
use stagefs_tests::binaries::binary;
use stagefs_tests::TestDir;

#[test]
fn bench_cluster_measures_ingest_failover_and_takeover() {
    let dir = TestDir::new("bench-cluster");
    let report = json_report(
        Command::new(binary("stagefs"))
            .args(["bench", "cluster", "--quick", "--json"])
            .args(["--device-size", "512MiB", "--checkpoint-size", "8MiB"])
            .args(["--failover-time", "2s", "--failover-file-size", "1MiB"])
            .arg("--workdir")
            .arg(dir.join("work"))
            .arg("--gateway-bin")
            .arg(binary("stagefs-gateway")),
        "bench cluster",
    );
    let ingest = report["ingest"].as_array().expect("ingest rows");
    assert_eq!(ingest.len(), 3, "{report}");
    for (n, row) in ingest.iter().enumerate() {
        assert_eq!(row["gateways"], n + 1);
        assert!(row["mib_s"].as_f64().is_some_and(|v| v > 0.0), "{row}");
        let shares: Vec<f64> = row["block_share"]
            .as_array()
            .expect("block_share")
            .iter()
            .map(|v| v.as_f64().expect("a share"))
            .collect();
        assert_eq!(shares.len(), n + 1, "{row}");
        let total: f64 = shares.iter().sum();
        assert!(
            (total - 1.0).abs() < 1e-9,
            "shares add up to {total}: {row}"
        );
        assert!(
            row["mount_cpu_s_per_gib"].as_f64().is_some_and(|v| v > 0.0),
            "{row}"
        );
    }
    let failover = &report["failover"];
    assert_eq!(failover["killed"], 2);
    assert!(
        failover["files_after_kill"].as_u64().is_some_and(|n| n > 0),
        "{failover}"
    );
    assert!(failover["takeover_listening_ms"]
        .as_f64()
        .is_some_and(|v| v > 0.0));
    assert!(
        failover["takeover_registered_ms"].as_f64() >= failover["takeover_listening_ms"].as_f64(),
        "{failover}"
    );
    // The killed gateway held staged blocks (uploads are held), and its takeover recovered them.
    let staged = failover["staged_bytes_at_kill"]
        .as_u64()
        .expect("staged bytes");
    assert!(staged > 0, "{failover}");
    assert!(
        failover["recovered_bytes"].as_u64() >= Some(staged),
        "{failover}"
    );
    // Every checkpoint file of the 3-gateway round and every failover file read back.
    let files = 4
        + failover["files_before_kill"].as_u64().unwrap()
        + failover["files_after_kill"].as_u64().unwrap();
    assert_eq!(
        failover["verified_files"].as_u64(),
        Some(files),
        "{failover}"
    );
    assert!(report["projection"]["mount_gib_s_per_core"]
        .as_f64()
        .is_some_and(|v| v > 0.0));
}
