//! A failing staging device and a dying background task, met by a real gateway process (issue
//! 10: "a panic injected into the sync task answers every waiting writer UNAVAILABLE and the
//! process exits non-zero; restarted, it recovers everything acknowledged"; "EIO from the device
//! and a device that stops answering: writers get an error within --device-timeout, reads of
//! staged blocks still work, and a real mount sees EIO on close, not a hang").
//!
//! No loop device here can be made to fail or hang on demand (no device-mapper, no nbd), so the
//! debug build's fault-injecting engine sits under the log, driven by a control file
//! (`STAGEFS_DEBUG_FAULTS`): the process, its gRPC server, the mount and the kernel are real.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use stagefs_tests::*;
use tonic::Code;

const SEED: u64 = 0xfa11;

fn set_faults(control: &Path, lines: &str) {
    std::fs::write(control, lines).unwrap();
}

#[test]
fn a_panic_in_the_sync_task_answers_writers_and_exits_non_zero() {
    let runtime = harness_runtime();
    runtime.block_on(async {
        let dir = TestDir::new("panic-sync");
        let s3 = S3Server::start_in(dir.join("s3")).await;
        let control = dir.join("faults");
        let mut gateway = Gateway::builder(dir.path(), &s3, "uring")
            .env("STAGEFS_DEBUG_FAULTS", control.display().to_string())
            .arg("--uploads-paused")
            .start()
            .await;
        let mut client = gateway.client().await;
        let mut acked = Vec::new();
        for i in 0..12u64 {
            let key = block_key(1000 + i, 0, 100_000 + i as usize * 4099);
            write_block(&mut client, &key, &block_bytes(&key, SEED))
                .await
                .unwrap();
            acked.push(key);
        }

        set_faults(&control, "sync panic\n");
        let started = Instant::now();
        let writers: Vec<_> = (0..8u64)
            .map(|i| {
                let mut client = client.clone();
                tokio::spawn(async move {
                    let key = block_key(5000 + i, 0, 65_536);
                    let result = write_block(&mut client, &key, &block_bytes(&key, SEED)).await;
                    (result, started.elapsed())
                })
            })
            .collect();
        let mut slowest = Duration::ZERO;
        for writer in writers {
            let (result, took) = within(
                Duration::from_secs(60),
                "a writer's answer after the panic",
                writer,
            )
            .await
            .unwrap();
            let status = result.expect_err("a write whose sync never ran was acknowledged");
            assert_eq!(status.code(), Code::Unavailable, "{status:?}");
            slowest = slowest.max(took);
        }
        eprintln!("8 writers answered UNAVAILABLE within {slowest:?} of the injected panic");
        let exit = within(Duration::from_secs(60), "the gateway's exit", async {
            loop {
                if let Some(status) = gateway.exited() {
                    return status;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        assert!(
            !exit.success(),
            "a fatal error must exit non-zero, got {exit}"
        );
        let log = gateway.current_log();
        assert!(
            log.contains("staging.sync") && log.contains("injected panic"),
            "the log names the task and the panic:\n{}",
            tail(&log, 20)
        );

        set_faults(&control, "");
        gateway.restart().await;
        let mut client = gateway.client().await;
        for key in &acked {
            assert_block_intact(&mut client, &s3, key, &block_bytes(key, SEED)).await;
        }
        let status = status(&mut client).await;
        assert!(status.healthy, "{}", status.failure);
    });
}

/// Writes `len` bytes to `path` and closes it; the error of the first step that failed.
fn write_and_close(path: &Path, len: usize, seed: u64) -> std::io::Result<()> {
    let data = pattern_bytes(&path.display().to_string(), seed, len);
    let mut file = std::fs::File::create(path)?;
    file.write_all(&data)?;
    // close(2)'s own result, which `drop` would discard.
    let fd = std::os::fd::IntoRawFd::into_raw_fd(file);
    if unsafe { libc::close(fd) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn device_failure_through_a_mount(fault: &str) {
    let name = format!("device-{}", fault.replace(' ', "-"));
    let control_dir = TestDir::new(&format!("{name}-control"));
    let control = control_dir.join("faults");
    let stack = FuseStack::start(&name, |gateway| {
        gateway
            .env("STAGEFS_DEBUG_FAULTS", control.display().to_string())
            .args(["--uploads-paused", "--device-timeout", "2s"])
    });
    // Fail at once rather than wait for the gateway's restart (by default a mount waits up to
    // --takeover-wait for a supervisor to start it again, and no supervisor runs here): what is
    // tested is that a failed device answers, not that it hangs.
    let mnt = stack
        .mount("mnt")
        .no_cache()
        .args(["--takeover-wait", "0s"])
        .start();
    let sizes = [4096usize, 3 << 20];
    for (i, len) in sizes.iter().enumerate() {
        write_and_close(&mnt.join(format!("before-{i}")), *len, i as u64).unwrap();
    }

    set_faults(&control, &format!("{fault}\n"));
    for (i, len) in sizes.iter().enumerate() {
        let path = mnt.join(format!("after-{i}"));
        let started = Instant::now();
        let outcome = std::thread::scope(|scope| {
            let writer = scope.spawn(|| write_and_close(&path, *len, 100 + i as u64));
            // A guard against a hang (the failure this test is about), not a performance bound.
            let deadline = Instant::now() + Duration::from_secs(120);
            while !writer.is_finished() {
                assert!(
                    Instant::now() < deadline,
                    "{fault}: writing {} hangs\nmount log:\n{}",
                    path.display(),
                    mnt.log_tail(30)
                );
                std::thread::sleep(Duration::from_millis(50));
            }
            writer.join().unwrap()
        });
        let error = outcome.expect_err("a file written to a failed device closed without error");
        assert_eq!(
            error.raw_os_error(),
            Some(libc::EIO),
            "{fault}: {} gave {error}",
            path.display()
        );
        eprintln!(
            "{fault}: {len}-byte file failed with EIO after {:?}",
            started.elapsed()
        );
    }

    // The failed gateway still serves what it staged, and says why it takes no writes.
    let fresh = stack.mount("fresh").no_cache().start();
    for (i, len) in sizes.iter().enumerate() {
        let name = format!("before-{i}");
        let expected = pattern_bytes(&mnt.join(&name).display().to_string(), i as u64, *len);
        let got = std::fs::read(fresh.join(&name)).unwrap();
        assert_same_bytes(&name, &got, &expected);
    }
    let status = stack.block_on(async {
        let mut client = stack.gateway.client().await;
        status(&mut client).await
    });
    assert!(!status.healthy, "{fault}: Status must report the failure");
    let expected = if fault.ends_with("hang") {
        "--device-timeout"
    } else {
        "injected fault"
    };
    assert!(
        status.failure.contains(expected),
        "{fault}: {}",
        status.failure
    );
}

#[test]
fn a_device_that_stops_answering_gives_eio_on_close() {
    device_failure_through_a_mount("write hang");
}

#[test]
fn a_sync_error_gives_eio_on_close() {
    device_failure_through_a_mount("sync eio");
}

/// A small file's block is written while its commit is made (the commit's pages and flush wait
/// for it): a failed block write must fail the commit too, so its `close` gives EIO.
#[test]
fn a_write_error_gives_eio_on_close() {
    device_failure_through_a_mount("write eio");
}
