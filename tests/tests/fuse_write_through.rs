//! `stagefs mount --write-mode through`: the client PUTs every block to the object store itself,
//! and `close()`/`fsync()` return only once the store holds them. The gateway's uploads are held
//! back (`--uploads-paused`), so an object in the store right after `close()` can only have come
//! from the client, and the gateway must have staged nothing.

use std::fs::{self, File, OpenOptions};
use std::io::Write;

use stagefs_tests::{assert_errno, FuseStack, Pattern};

const MIB: u64 = 1 << 20;

fn stack(name: &str) -> FuseStack {
    FuseStack::start(name, |gateway| {
        gateway
            .device_size("256MiB")
            .args(["--uploads-paused", "--upload-delay", "1h"])
    })
}

fn staged_blocks(stack: &FuseStack) -> u64 {
    stack.block_on(async {
        let mut client = stack.gateway.client().await;
        stagefs_tests::status(&mut client).await.blocks_staged
    })
}

#[test]
fn close_and_fsync_return_once_the_store_holds_the_blocks() {
    let stack = stack("write-through");
    let through = stack
        .mount("through")
        .no_cache()
        .args(["--write-mode", "through"])
        .start();
    let reader = stack.mount("reader").no_cache().start();

    // A 10 MiB file: two whole blocks and a partial one, all in the store at close.
    let pattern = Pattern::new(41);
    let size = 10 * MIB;
    let mut file = File::create(through.join("big")).unwrap();
    pattern.write_to(&mut file, size, MIB as usize).unwrap();
    drop(file);
    assert_eq!(
        stack.stored_bytes(),
        size,
        "close returned, so every byte must be in the store"
    );

    // fsync on an open file: the appended bytes are in the store before close.
    let mut log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(through.join("log"))
        .unwrap();
    for row in 0..5u64 {
        log.write_all(format!("row {row:03}\n").as_bytes()).unwrap();
        log.sync_all().unwrap();
        assert_eq!(
            stack.stored_bytes(),
            size + 8 * (row + 1),
            "fsync of row {row} returned before the store held it"
        );
    }
    drop(log);

    assert_eq!(
        staged_blocks(&stack),
        0,
        "write-through must not stage anything on the gateway"
    );
    // Another mount (gateway mode) reads both files, from the store.
    pattern
        .verify(&mut File::open(reader.join("big")).unwrap(), size)
        .unwrap_or_else(|e| panic!("big on the reader: {e}"));
    let rows: String = (0..5).map(|row| format!("row {row:03}\n")).collect();
    assert_eq!(fs::read_to_string(reader.join("log")).unwrap(), rows);
}

#[test]
fn an_unreachable_store_fails_close_with_eio_and_keeps_nothing_half_done() {
    let mut stack = stack("write-through-outage");
    let through = stack
        .mount("through")
        .no_cache()
        .args(["--write-mode", "through"])
        .start();
    fs::write(through.join("before"), b"in the store").unwrap();

    stack.s3.stop();
    let mut file = File::create(through.join("during")).unwrap();
    file.write_all(&[7u8; 4096]).unwrap();
    // The error surfaces at fsync (or at close, which std drops silently, so fsync is the check).
    assert_errno(file.sync_all(), libc::EIO, "fsync with the store down");
    drop(file);

    stack.runtime.block_on(stack.s3.start());
    // The file that failed was never committed with data the store lacks: it reads as what was
    // committed (empty) or, if a later flush got through, as the whole write; never garbage.
    let during = fs::read(through.join("during")).unwrap();
    assert!(
        during.is_empty() || during == vec![7u8; 4096],
        "a failed write-through left {} bytes that are neither nothing nor the write",
        during.len()
    );
    assert_eq!(fs::read(through.join("before")).unwrap(), b"in the store");
}
