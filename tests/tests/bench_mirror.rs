//! `stagefs bench mirror` end to end at a tiny size: it starts its own PostgreSQL primary and a
//! hot standby streaming through the latency proxy, a gateway on each (the second a mirror),
//! and three mounts; every small file it writes must read back byte for byte and every listing
//! must show the whole directory, or the run fails. Figures at this size mean nothing, so none
//! is compared with a target here.

use std::process::Command;

use stagefs_tests::bench::json_report;
use stagefs_tests::binaries::binary;
use stagefs_tests::TestDir;

#[test]
fn bench_mirror_measures_the_three_mounts() {
    let dir = TestDir::new("bench-mirror");
    let report = json_report(
        Command::new(binary("stagefs"))
            .args(["bench", "mirror", "--quick", "--json"])
            .args([
                "--iterations",
                "3",
                "--listing-files",
                "50",
                "--rtt",
                "10ms",
            ])
            .arg("--workdir")
            .arg(dir.join("work"))
            .arg("--gateway-bin")
            .arg(binary("stagefs-gateway")),
        "bench mirror",
    );
    let names: Vec<&str> = report["operations"]
        .as_array()
        .expect("operations")
        .iter()
        .map(|op| op["name"].as_str().expect("a name"))
        .collect();
    assert_eq!(
        names,
        [
            "path_create",
            "stat_deep",
            "list",
            "small_write",
            "small_read"
        ],
        "{report}"
    );
    for op in report["operations"].as_array().unwrap() {
        for mount in ["local", "mirror", "direct"] {
            let p50 = op[format!("{mount}_ms_p50")].as_f64();
            assert!(p50.is_some_and(|v| v > 0.0), "{mount}: {op}");
        }
        assert!(op["mirror_vs_direct"].as_f64().is_some(), "{op}");
    }
    assert_eq!(report["iterations"], 3);
    assert!(report["path_create_aim_met"].is_boolean(), "{report}");
    assert!(
        report["replica_lag_seconds"].as_f64().is_some(),
        "the mirror's status names its lag: {report}"
    );
}
