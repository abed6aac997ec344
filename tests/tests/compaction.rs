//! Slice compaction through real mounts: a log appended to with an `fsync` per line (each one a
//! slice of its own) keeps a bounded slice list, reads back identical from another mount while
//! the gateway compacts it, and once more from a fresh mount at the end; `status` and `fsck`
//! report it.
//!
//! `STAGEFS_COMPACTION_APPENDS` sets the number of appends (default 1,500; the README's benchmark
//! figure comes from `stagefs bench fs --appends 20000`).
//!
//! A second test SIGKILLs the gateway right after bursts of appends, while it compacts what they
//! made, and restarts it: every acknowledged line reads back identical each time.

use std::fs::OpenOptions;
use std::io::Write;
use std::process::Command;
use std::time::Duration;

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

#[test]
fn a_gateway_killed_while_it_compacts_loses_no_acknowledged_byte() {
    let proxy = TcpProxy::start();
    let mut stack = FuseStack::start("compaction-kill", |gateway| {
        gateway.args([
            "--compact-slices",
            "8",
            "--uploads-paused",
            "--advertise",
            &proxy.addr().to_string(),
        ])
    });
    proxy.set_target(Some(stack.gateway.addr()));
    // No open file of this process may span a restart: the harness's spawn of the new gateway
    // would inherit it, and FUSE flushes it on exec.
    let mount = stack.mount_at(proxy.addr(), "writer").no_cache().start();
    let path = mount.join("app.log");
    let mut written = Vec::new();
    let mut next = 0;
    for round in 0..4 {
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap();
        for _ in 0..60 {
            let bytes = line(next);
            next += 1;
            log.write_all(&bytes).unwrap();
            log.sync_data().unwrap();
            written.extend_from_slice(&bytes);
        }
        drop(log);
        // At once: the compactions those appends asked for are under way.
        stack.gateway.kill9();
        proxy.set_target(None);
        proxy.cut_connections();
        std::thread::sleep(Duration::from_millis(300));
        stack.runtime.block_on(stack.gateway.restart());
        proxy.set_target(Some(stack.gateway.addr()));
        assert_file_bytes(&path, &written);
        eprintln!("round {round}: {} lines read back after the restart", next);
    }
    // Compaction went on across the restarts: 240 appends did not leave 240 slices.
    let fsck = json_output(
        Command::new(client_binary()).args(["fsck", &proxy.addr().to_string(), "--json"]),
        "stagefs fsck",
    );
    assert_eq!(fsck["missing_blocks"], 0, "{fsck}");
    let most = fsck["most_slices_in_a_chunk"].as_u64().unwrap();
    eprintln!("{most} slices in the log's chunk after 4 kills");
    assert!(
        most <= 24,
        "{most} slices: compaction stopped after a restart"
    );
    let fresh = stack.mount_at(proxy.addr(), "fresh").start();
    assert_file_bytes(&fresh.join("app.log"), &written);
}
