//! A device that fills degrades writes instead of failing them: on a 256 MiB device with uploads
//! held, 1 GiB written through a mount all succeeds, because above the high-water mark the
//! gateway tells the mount to PUT blocks to the store itself. Every byte reads back identical on
//! another mount, the store holds exactly what was written through, and once uploads resume it
//! holds everything.

use std::fs;

use stagefs_tests::binaries::client_binary;
use stagefs_tests::*;

const MIB: usize = 1 << 20;
const BIG_FILES: u64 = 16;
const BIG: usize = 64 * MIB;
const SMALL_FILES: u64 = 40;
const SMALL: usize = 10_000;

#[test]
fn a_full_device_writes_through_instead_of_failing() {
    let stack = FuseStack::start("high-water", |gateway| {
        gateway.device_size("256MiB").arg("--uploads-paused")
    });
    let writer = stack.mount("writer").start();
    let mut total = 0u64;
    for i in 0..BIG_FILES {
        let data = Pattern::new(i).bytes(0, BIG);
        fs::write(writer.join(format!("big{i}")), &data)
            .unwrap_or_else(|e| panic!("writing big{i} failed: {e}"));
        total += data.len() as u64;
    }
    // Small files take the one-call path (`WriteSlice`), which is told the same.
    for i in 0..SMALL_FILES {
        let data = Pattern::new(1000 + i).bytes(0, SMALL);
        fs::write(writer.join(format!("small{i}")), &data)
            .unwrap_or_else(|e| panic!("writing small{i} failed: {e}"));
        total += data.len() as u64;
    }

    let status = status_json(&stack.gateway.addr().to_string());
    assert_eq!(status["writing_through"], true, "{status}");
    assert!(
        status["written_through_blocks_total"].as_u64() > Some(0),
        "{status}"
    );
    // Uploads are held: every byte is either staged on the device or was written through.
    let staged = status["bytes_staged"].as_u64().unwrap();
    let stored = stack.stored_bytes();
    assert!(stored > 0, "nothing was written through: {status}");
    assert_eq!(staged + stored, total, "{status}");
    assert!(
        staged <= 256 << 20,
        "more staged than the device holds: {status}"
    );
    eprintln!(
        "[high-water] {} MiB written, {} MiB through the store, {} MiB staged",
        total >> 20,
        stored >> 20,
        staged >> 20
    );

    // Another mount reads every byte, from the device or the store.
    let reader = stack.mount("reader").no_cache().start();
    for i in 0..BIG_FILES {
        assert_file_bytes(
            &reader.join(format!("big{i}")),
            &Pattern::new(i).bytes(0, BIG),
        );
    }
    for i in 0..SMALL_FILES {
        assert_file_bytes(
            &reader.join(format!("small{i}")),
            &Pattern::new(1000 + i).bytes(0, SMALL),
        );
    }

    // Uploads resume: the store holds everything.
    stack.block_on(async {
        let mut client = stack.gateway.client().await;
        set_uploads_paused(&mut client, false).await;
    });
    let drained = std::process::Command::new(client_binary())
        .args(["sync", "--all", &stack.gateway.addr().to_string()])
        .output()
        .unwrap();
    assert!(
        drained.status.success(),
        "{}",
        String::from_utf8_lossy(&drained.stderr)
    );
    let stored = stack.stored_bytes();
    assert_eq!(stored, total, "every byte written is in the store");
}
