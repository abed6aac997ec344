//! The gateway's read cache (`serve --read-cache`) and `stagefs warmup`, with the store's own
//! count of GET requests: files that went straight to the store are warmed into the gateway's
//! device and then read by a fresh mount with no store GET at all; files not warmed are read
//! through the gateway, which keeps them, so the next mount reads them from the device too; the
//! cache survives a SIGKILL of the gateway; and a gateway without a read cache refuses a warmup
//! with an error that says how to get one.

use std::fs;
use std::process::Command;
use std::time::{Duration, Instant};

use stagefs_tests::binaries::client_binary;
use stagefs_tests::*;

const MIB: usize = 1 << 20;

fn stagefs(args: &[&std::ffi::OsStr]) -> std::process::Output {
    Command::new(client_binary())
        .args(args)
        .output()
        .expect("run stagefs")
}

/// (name, seed, length): blocks are 4 MiB, so 1 + 1 + 3 blocks warm and 1 + 2 cold.
const WARM: [(&str, u64, usize); 3] = [
    ("warm/a", 1, 4096 + 1),
    ("warm/b", 2, MIB),
    ("warm/c", 3, 9 * MIB),
];
const COLD: [(&str, u64, usize); 2] = [("cold/d", 4, 2 * MIB + 3), ("cold/e", 5, 5 * MIB)];
const WARM_BLOCKS: u64 = 5;
const COLD_BLOCKS: u64 = 3;

fn read_all(mount: &Mount, files: &[(&str, u64, usize)]) {
    for (name, seed, len) in files {
        let data = fs::read(mount.join(name)).unwrap();
        assert_same_bytes(name, &data, &Pattern::new(*seed).bytes(0, *len));
    }
}

/// GETs of block objects the store has served.
fn block_gets(stack: &FuseStack) -> usize {
    stack.s3.count_requests("GetObject", "chunks/")
}

fn cache_blocks(stack: &FuseStack) -> (u64, u64) {
    let status = stack.block_on(async {
        let mut client = stack.gateway.client().await;
        status(&mut client).await
    });
    (status.read_cache_blocks, status.read_cache_hits_total)
}

#[test]
fn warmed_files_are_read_from_the_gateways_device_not_the_store() {
    let mut stack = FuseStack::start_logging_store("warmup", true, |gateway| {
        gateway
            .device_size("512MiB")
            .args(["--read-cache", "256MiB"])
    });
    // Written straight to the store: the gateway's device holds none of these blocks.
    let writer = stack
        .mount("writer")
        .args(["--write-mode", "through"])
        .start();
    fs::create_dir(writer.join("warm")).unwrap();
    fs::create_dir(writer.join("cold")).unwrap();
    for (name, seed, len) in WARM.iter().chain(&COLD) {
        fs::write(writer.join(name), Pattern::new(*seed).bytes(0, *len)).unwrap();
    }
    assert!(writer.unmount().success());
    assert_eq!(cache_blocks(&stack).0, 0, "nothing in the cache yet");

    // Warm one directory, then read it on a fresh mount: every byte from the device.
    let reader = stack.mount("reader").start();
    let out = stagefs(&["warmup".as_ref(), reader.join("warm").as_os_str()]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "warmup failed: {said}");
    assert!(
        said.contains(&format!("3 files, {WARM_BLOCKS} blocks"))
            && said.contains(&format!("{WARM_BLOCKS} read from the store")),
        "warmup says what it did: {said}"
    );
    assert_eq!(cache_blocks(&stack).0, WARM_BLOCKS);
    let gets = block_gets(&stack);
    read_all(&reader, &WARM);
    assert_eq!(
        block_gets(&stack),
        gets,
        "warmed files must be read without a store GET"
    );
    assert!(
        cache_blocks(&stack).1 >= WARM_BLOCKS,
        "served from the cache"
    );

    // Files not warmed come from the store, through the gateway, which keeps them.
    read_all(&reader, &COLD);
    let after_cold = block_gets(&stack);
    assert!(
        after_cold >= gets + COLD_BLOCKS as usize,
        "cold files are read from the store: {gets} GETs before, {after_cold} after"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while cache_blocks(&stack).0 < WARM_BLOCKS + COLD_BLOCKS {
        assert!(
            Instant::now() < deadline,
            "blocks read through the gateway were not kept"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(reader.unmount().success());
    let again = stack.mount("again").start();
    read_all(&again, &COLD);
    assert_eq!(
        block_gets(&stack),
        after_cold,
        "blocks read through the gateway once are read from its device next time"
    );
    assert!(again.unmount().success());

    // The cache is on the device: it outlives the gateway process.
    stack.runtime.block_on(stack.gateway.restart());
    let restarted = stack.mount("restarted").start();
    read_all(&restarted, &WARM);
    read_all(&restarted, &COLD);
    assert_eq!(
        block_gets(&stack),
        after_cold,
        "the read cache survives a SIGKILL of the gateway"
    );
    let out = stagefs(&[
        "warmup".as_ref(),
        "--json".as_ref(),
        restarted.path().as_os_str(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let totals = &report[0]["totals"];
    assert_eq!(totals["files"], 5, "{report}");
    assert_eq!(totals["held"], WARM_BLOCKS + COLD_BLOCKS, "{report}");
    assert_eq!(totals["fetched"], 0, "{report}");
}

#[test]
fn warmup_says_how_to_give_a_gateway_a_read_cache() {
    let stack = FuseStack::start("warmup-off", |gateway| gateway.device_size("256MiB"));
    let mount = stack.mount("m").start();
    fs::write(mount.join("f"), b"some bytes").unwrap();
    let out = stagefs(&["warmup".as_ref(), mount.join("f").as_os_str()]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "warmup must fail: {said}");
    assert!(
        said.contains("keeps no read cache") && said.contains("--read-cache"),
        "{said}"
    );
}
