//! `stagefs bench meta` end to end at a tiny size (one client, one second per case): it starts
//! its own PostgreSQL server, measures the insert limit and every operation on the device's
//! region and on PostgreSQL, and reports each in one JSON object. Figures at
//! this size mean nothing, so none is compared with a target here; an operation that failed
//! fails the test.

use std::process::Command;

use stagefs_tests::bench::json_report;
use stagefs_tests::binaries::binary;
use stagefs_tests::TestDir;

#[test]
fn bench_meta_measures_every_operation_on_every_backend() {
    let dir = TestDir::new("bench-meta");
    let report = json_report(
        Command::new(binary("stagefs"))
            .args(["bench", "meta", "--quick", "--json", "--clients", "1"])
            .args(["--backends", "region-lazy,postgres"])
            .arg("--scratch")
            .arg(dir.path()),
        "bench meta",
    );
    let measured = |rate: &serde_json::Value| {
        rate["ops"].as_u64().is_some_and(|ops| ops > 0)
            && rate["ops_per_sec"].as_f64().is_some_and(|r| r > 0.0)
            && rate["p50_ms"].as_f64().is_some()
    };
    assert!(measured(&report["limit"]["1"]), "the limit: {report}");
    for backend in ["region-lazy", "postgres"] {
        for op in ["create", "lookup", "getattr", "small_file_commit"] {
            let rate = &report["engines"][backend][op]["1"];
            assert!(measured(rate), "{backend} {op}: {rate}");
            assert_eq!(rate["failed"], 0, "{backend} {op}: {rate}");
        }
    }
    assert!(
        report["create_ratio_postgres"]["1"].as_f64().is_some(),
        "the aim's ratio: {report}"
    );
}
