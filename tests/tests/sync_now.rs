//! `stagefs sync` uploads now: on a gateway that holds uploads for an hour (`--upload-delay 1h`),
//! the synced file's blocks go to the store at once while the other files stay held; with
//! uploads paused, sync says that is what it waits for and returns once they resume;
//! `sync --all` drains everything, and `umount --sync` unmounts once every file is stored.

use std::fs;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use stagefs_tests::binaries::client_binary;
use stagefs_tests::*;

const MIB: usize = 1 << 20;

fn stagefs(args: &[&std::ffi::OsStr]) -> std::process::Output {
    let output = Command::new(client_binary())
        .args(args)
        .output()
        .expect("run stagefs");
    assert!(
        output.status.success(),
        "stagefs {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

#[test]
fn sync_uploads_now_and_says_what_holds_it() {
    let stack = FuseStack::start("sync-now", |gateway| {
        gateway.device_size("512MiB").args(["--upload-delay", "1h"])
    });
    let mount = stack.mount("m").start();
    let big = Pattern::new(1).bytes(0, 96 * MIB);
    fs::write(mount.join("big"), &big).unwrap();
    let others: Vec<_> = (0..3u64)
        .map(|i| {
            let data = Pattern::new(10 + i).bytes(0, 3 * MIB + 7);
            fs::write(mount.join(format!("other{i}")), &data).unwrap();
            data
        })
        .collect();

    // The synced file goes now; the others wait out their hour.
    let started = Instant::now();
    stagefs(&[
        "sync".as_ref(),
        "--timeout".as_ref(),
        "5m".as_ref(),
        mount.join("big").as_os_str(),
    ]);
    eprintln!(
        "[sync-now] 96 MiB synced in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(
        stack.stored_bytes(),
        big.len() as u64,
        "the store must hold the synced file and nothing else"
    );

    // Paused: sync says what it waits for, and returns once uploads resume.
    stack.block_on(async {
        let mut client = stack.gateway.client().await;
        set_uploads_paused(&mut client, true).await;
    });
    let mut sync = Command::new(client_binary())
        .arg("sync")
        .arg(mount.join("other0"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (lines, said) = mpsc::channel();
    let stderr = sync.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = lines.send(line.clone());
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    let paused_line = said
        .iter()
        .find(|line| line.contains("PAUSED"))
        .expect("sync ended without saying uploads are paused");
    assert!(
        paused_line.contains("stagefs uploads resume"),
        "{paused_line}"
    );
    assert!(
        sync.try_wait().unwrap().is_none(),
        "sync returned while paused"
    );
    stack.block_on(async {
        let mut client = stack.gateway.client().await;
        set_uploads_paused(&mut client, false).await;
    });
    let status = sync.wait().unwrap();
    let output = reader.join().unwrap();
    assert!(status.success(), "sync failed after the resume:\n{output}");
    assert_eq!(
        stack.stored_bytes(),
        (big.len() + others[0].len()) as u64,
        "the store must hold the two synced files only:\n{output}"
    );

    // `sync --all` drains everything the gateway holds.
    let gateway = stack.gateway.addr().to_string();
    stagefs(&["sync".as_ref(), "--all".as_ref(), gateway.as_ref()]);
    let all: u64 = (big.len() + others.iter().map(Vec::len).sum::<usize>()) as u64;
    assert_eq!(stack.stored_bytes(), all);

    // `umount --sync`: a file closed just before is in the store once the mount is gone.
    let last = Pattern::new(99).bytes(0, 5 * MIB + 1);
    fs::write(mount.join("last"), &last).unwrap();
    stagefs(&[
        "umount".as_ref(),
        "--sync".as_ref(),
        mount.path().as_os_str(),
    ]);
    assert_eq!(stack.stored_bytes(), all + last.len() as u64);
    let deadline = Instant::now() + Duration::from_secs(30);
    while is_fuse_mounted(mount.path()) {
        assert!(
            Instant::now() < deadline,
            "still mounted after umount --sync"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
