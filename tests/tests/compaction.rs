//! Slice compaction through real mounts: a log appended to with an `fsync` per line (each one a
//! slice of its own) keeps a bounded slice list, reads back identical from another mount while
//! the gateway compacts it, and once more from a fresh mount at the end; `status` and `fsck`
//! report it.
//!
//! `STAGEFS_COMPACTION_APPENDS` sets the number of appends (default 1,500; the README's benchmark
//! figure comes from `stagefs bench fs --appends 20000`).

use std::fs::OpenOptions;
use std::io::Write;
use std::process::Command;

use stagefs_tests::binaries::client_binary;
use stagefs_tests::*;

const THRESHOLD: usize = 16;

/// The line appended as number `i`: 40 to 160 bytes that say which line they are.
fn line(i: usize) -> Vec<u8> {
    let mut text = format!("line {i:06} ").into_bytes();
    let len = 40 + (i * 37) % 120;
    text.resize(len - 1, b'a' + (i % 26) as u8);
    text.push(b'\n');
    text
}

#[test]
fn an_fsync_per_append_keeps_a_short_slice_list_and_the_same_bytes() {
    let appends: usize = std::env::var("STAGEFS_COMPACTION_APPENDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1500);
    let stack = FuseStack::start("compaction", |gateway| {
        gateway.args(["--compact-slices", &THRESHOLD.to_string()])
    });
    let gateway = stack.gateway.addr().to_string();
    let writer = stack.mount("writer").start();
    let reader = stack.mount("reader").start();

    let path = writer.join("app.log");
    let mut log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .unwrap();
    let mut written = Vec::new();
    for i in 0..appends {
        let bytes = line(i);
        log.write_all(&bytes).unwrap();
        log.sync_data().unwrap();
        written.extend_from_slice(&bytes);
        // Read from the other mount while compactions come and go: every line acknowledged
        // so far, byte for byte.
        if i % 250 == 249 {
            assert_file_bytes(&reader.join("app.log"), &written);
        }
    }
    drop(log);

    let status = status_json(&gateway);
    let compaction = &status["compaction"];
    assert_eq!(compaction["compact_slices"], THRESHOLD as u64);
    let compacted = compaction["slices_total"].as_u64().unwrap();
    assert!(
        compaction["chunks_total"].as_u64().unwrap() >= 1 && compacted >= (appends / 2) as u64,
        "{appends} appends, yet only {compacted} slices were compacted: {compaction}"
    );
    let fsck = json_output(
        Command::new(client_binary()).args(["fsck", &gateway, "--json"]),
        "stagefs fsck",
    );
    assert_eq!(fsck["missing_blocks"], 0, "{fsck}");
    let most = fsck["most_slices_in_a_chunk"].as_u64().unwrap();
    // Past the threshold by at most the compaction under way and the size tiers (each at least
    // twice the next, so at most log2 of the appends).
    eprintln!("{appends} appends: {compaction}; at most {most} slices in a chunk");
    let bound = THRESHOLD + 1 + (appends as f64).log2().ceil() as usize + THRESHOLD / 2;
    assert!(
        most <= bound as u64,
        "{most} slices in the log's chunk after {appends} appends (bound {bound})"
    );

    assert_file_bytes(&reader.join("app.log"), &written);
    writer.unmount();
    let fresh = stack.mount("fresh").start();
    assert_file_bytes(&fresh.join("app.log"), &written);
}
