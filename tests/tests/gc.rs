//! Leaks are found, and only leaks: `stagefs gc` finds an object planted in the store and a
//! block staged and uploaded with no metadata (what a `WriteSlice` cut off by a crash leaves),
//! deletes them with `--delete`, and, run while writers are busy, touches no object a file
//! needs: `stagefs fsck` then finds every block of every file. `fsck` names a file whose block
//! was removed from the store behind the file system's back.

use std::collections::BTreeSet;
use std::fs;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use object_store::{ObjectStoreExt, PutPayload};
use stagefs_tests::binaries::client_binary;
use stagefs_tests::*;

fn stagefs_json(args: &[&str]) -> (bool, serde_json::Value, String) {
    let output = Command::new(client_binary())
        .args(args)
        .output()
        .expect("run stagefs");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let value = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "stagefs {args:?} printed no JSON ({e}): {}\n{stderr}",
            String::from_utf8_lossy(&output.stdout)
        )
    });
    (output.status.success(), value, stderr)
}

fn keys_of(report: &serde_json::Value) -> BTreeSet<String> {
    report["unreferenced_keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn gc_removes_leaks_only_and_fsck_finds_every_block() {
    let stack = FuseStack::start("gc", |gateway| gateway.device_size("512MiB"));
    let gateway = stack.gateway.addr().to_string();
    let mount = stack.mount("writer").start();

    // Leaks: an object planted in the store, and a block staged with no metadata at all.
    let planted = block_key(999_999_999, 0, 10);
    let other = "notes/readme.txt";
    let orphan = block_key(999_999_998, 0, 70_000);
    stack.block_on(async {
        let store = stack.s3.store();
        store
            .put(&planted.as_str().into(), PutPayload::from(vec![1u8; 10]))
            .await
            .unwrap();
        store
            .put(&other.into(), PutPayload::from(b"not a block".to_vec()))
            .await
            .unwrap();
        let mut client = stack.gateway.client().await;
        write_block(&mut client, &orphan, &block_bytes(&orphan, 7))
            .await
            .unwrap();
        wait_uploaded(
            &mut client,
            std::slice::from_ref(&orphan),
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    });

    // Writers busy the whole time gc runs: new files, overwrites and deletes.
    let busy = Arc::new(AtomicBool::new(true));
    let dir = mount.join("busy");
    fs::create_dir_all(&dir).unwrap();
    let writer = {
        let (busy, dir) = (busy.clone(), dir.clone());
        std::thread::spawn(move || {
            let mut round = 0u64;
            while busy.load(Ordering::Relaxed) || round < 20 {
                let name = dir.join(format!("f{}", round % 25));
                fs::write(
                    &name,
                    Pattern::new(round).bytes(0, 300_000 + (round as usize % 7) * 1_000_000),
                )
                .unwrap();
                if round % 5 == 4 {
                    fs::remove_file(dir.join(format!("f{}", (round + 3) % 25))).ok();
                }
                round += 1;
            }
            round
        })
    };

    // Several rounds while the writers go on: each names exactly the leaks.
    let mut found = serde_json::Value::Null;
    for _ in 0..8 {
        let (ok, report, stderr) = stagefs_json(&["gc", &gateway, "--min-age", "0s", "--json"]);
        assert!(ok, "{stderr}");
        assert_eq!(
            keys_of(&report),
            BTreeSet::from([planted.clone(), orphan.clone()]),
            "gc must name exactly the leaks: {report}"
        );
        found = report;
        std::thread::sleep(Duration::from_millis(150));
    }
    assert!(found["other_objects"].as_u64() >= Some(1), "{found}");
    assert_eq!(found["deleted_objects"], 0, "no --delete, nothing deleted");
    assert!(stack.block_on(stack.s3.exists(&planted)));

    let (ok, deleted, stderr) =
        stagefs_json(&["gc", &gateway, "--min-age", "0s", "--delete", "--json"]);
    assert!(ok, "{stderr}");
    assert_eq!(
        keys_of(&deleted),
        BTreeSet::from([planted.clone(), orphan.clone()])
    );
    assert_eq!(deleted["deleted_objects"], 2, "{deleted}");
    busy.store(false, Ordering::Relaxed);
    let rounds = writer.join().unwrap();
    assert!(!stack.block_on(stack.s3.exists(&planted)));
    assert!(!stack.block_on(stack.s3.exists(&orphan)));
    assert!(
        stack.block_on(stack.s3.exists(other)),
        "a non-block object was touched"
    );

    // Nothing a file needs went: every block is staged or in the store, and reads back.
    let (ok, check, stderr) = stagefs_json(&["fsck", &gateway, "--json"]);
    assert!(ok, "fsck after gc: {check}\n{stderr}");
    assert_eq!(check["missing_blocks"], 0, "{check}");
    assert!(check["files"].as_u64() > Some(0), "{check}");
    let synced = Command::new(client_binary())
        .args(["sync", "--all", &gateway])
        .output()
        .unwrap();
    assert!(
        synced.status.success(),
        "{}",
        String::from_utf8_lossy(&synced.stderr)
    );
    let (ok, check, stderr) = stagefs_json(&["fsck", &gateway, "--json"]);
    assert!(
        ok && check["missing_blocks"] == 0,
        "fsck after the drain: {check}\n{stderr}"
    );
    eprintln!("[gc] {rounds} writes while gc ran; fsck: {check}");

    // A block removed behind the file system's back: fsck names its file and fails.
    let victim = mount.join("victim");
    fs::write(&victim, Pattern::new(4242).bytes(0, 5_000_000)).unwrap();
    let synced = Command::new(client_binary())
        .arg("sync")
        .arg(&victim)
        .output()
        .unwrap();
    assert!(synced.status.success());
    let stored: Vec<String> = stack
        .block_on(stack.s3.list())
        .into_iter()
        .map(|(key, _)| key)
        .collect();
    let (ok, before, _) = stagefs_json(&["fsck", &gateway, "--json"]);
    assert!(ok, "{before}");
    // The victim's blocks are the store's newest slice ids: its first block is the one to go.
    let newest = stored
        .iter()
        .filter_map(|key| key.parse::<shared::BlockKey>().ok())
        .max_by_key(|key| (key.slice_id, std::cmp::Reverse(key.block_index)))
        .unwrap();
    stack.block_on(async {
        stack
            .s3
            .store()
            .delete(&newest.object_path())
            .await
            .unwrap();
    });
    let (ok, broken, _) = stagefs_json(&["fsck", &gateway, "--json"]);
    assert!(!ok, "fsck must fail with a block missing: {broken}");
    assert_eq!(broken["missing_blocks"], 1, "{broken}");
    let troubled = broken["troubled_files"].as_array().unwrap();
    assert_eq!(troubled.len(), 1, "{broken}");
    assert_eq!(troubled[0]["path"], "/victim", "{broken}");
}

#[test]
fn a_gateway_with_a_gc_interval_removes_leaks_itself() {
    let stack = FuseStack::start("gc-interval", |gateway| {
        gateway.args(["--gc-interval", "1s", "--gc-min-age", "0s"])
    });
    let mount = stack.mount("m").start();
    let kept = Pattern::new(5).bytes(0, 3_000_000);
    fs::write(mount.join("kept"), &kept).unwrap();
    let planted = block_key(999_999_997, 0, 10);
    stack.block_on(async {
        stack
            .s3
            .store()
            .put(&planted.as_str().into(), PutPayload::from(vec![1u8; 10]))
            .await
            .unwrap();
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while stack.block_on(stack.s3.exists(&planted)) {
        assert!(
            std::time::Instant::now() < deadline,
            "the gateway's gc never removed the planted object"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (ok, check, stderr) = stagefs_json(&["fsck", &stack.gateway.addr().to_string(), "--json"]);
    assert!(ok && check["missing_blocks"] == 0, "{check}\n{stderr}");
    assert_file_bytes(&mount.join("kept"), &kept);
}
