//! Running a `stagefs bench` command end to end, as the `bench_*` tests do.

use std::process::Command;

/// Runs `command` (a `stagefs bench … --json`), which must succeed, and returns the one JSON
/// object it printed; `what` names it in failures.
pub fn json_report(command: &mut Command, what: &str) -> serde_json::Value {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("run stagefs {what}: {e}"));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{what} failed ({}):\n{stderr}",
        output.status
    );
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not one JSON object ({e}):\n{}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}
