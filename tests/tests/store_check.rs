//! The store is probed at start: a gateway pointed at a bucket that does not exist, or given
//! wrong credentials, exits non-zero with a message that says which, instead of listening and
//! filling its device; `--store-check warn` starts anyway. The prefix is claimed for the file
//! system: another file system's gateway pointed at it refuses to start.

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use stagefs_tests::binaries::gateway_binary;
use stagefs_tests::s3::{S3_ACCESS_KEY, S3_SECRET_KEY};
use stagefs_tests::*;

/// Runs `stagefs-gateway serve` against `s3` with `store_url` and `env`. Returns its exit code
/// if it exited, or `None` once it printed `listening on` (it is then stopped), and its stderr.
/// A hang guard of a minute stops a gateway that does neither.
fn serve(
    dir: &TestDir,
    s3: &S3Server,
    store_url: &str,
    env: &[(&str, &str)],
    extra: &[&str],
) -> (Option<i32>, String) {
    let mut args = s3.gateway_args();
    let store = args.iter().position(|a| a == "--store").unwrap() + 1;
    args[store] = store_url.to_string();
    let _ = std::fs::remove_file(dir.join("device.img"));
    let mut child = Command::new(gateway_binary())
        .args(["serve", "--format", "--device"])
        .arg(dir.join("device.img"))
        .args(["--device-size", "64MiB", "--listen", "127.0.0.1:0"])
        .args(["--meta-region-size", "0"])
        .args(&args)
        .args(extra)
        .env("RUST_LOG", "info")
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .envs(env.iter().copied())
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start stagefs-gateway");
    let stdout = child.stdout.take().unwrap();
    let (tx, listening) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.starts_with("listening on") {
                let _ = tx.send(());
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status.code().unwrap_or(-1));
        }
        if listening.try_recv().is_ok() {
            break None;
        }
        assert!(
            Instant::now() < deadline,
            "the gateway neither exited nor listened within a minute"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    if code.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    (code, stderr)
}

#[test]
fn a_gateway_refuses_to_start_on_a_store_it_cannot_use_and_says_why() {
    let dir = TestDir::new("store-check");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let s3 = runtime.block_on(S3Server::start_in(dir.join("s3")));
    let keys = [
        ("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY),
        ("AWS_SECRET_ACCESS_KEY", S3_SECRET_KEY),
    ];

    let (code, stderr) = serve(&dir, &s3, "s3://no-such-bucket", &keys, &[]);
    assert_eq!(
        code,
        Some(1),
        "a missing bucket must stop the start:\n{stderr}"
    );
    assert!(
        stderr.contains("names a bucket that does not exist"),
        "{stderr}"
    );

    let wrong = [
        ("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY),
        ("AWS_SECRET_ACCESS_KEY", "not-the-secret"),
    ];
    let (code, stderr) = serve(&dir, &s3, &s3.store_url(), &wrong, &[]);
    assert_eq!(
        code,
        Some(1),
        "wrong credentials must stop the start:\n{stderr}"
    );
    assert!(stderr.contains("refused the credentials"), "{stderr}");

    let unknown = [
        ("AWS_ACCESS_KEY_ID", "nobody"),
        ("AWS_SECRET_ACCESS_KEY", S3_SECRET_KEY),
    ];
    let (code, stderr) = serve(&dir, &s3, &s3.store_url(), &unknown, &[]);
    assert_eq!(
        code,
        Some(1),
        "an unknown key must stop the start:\n{stderr}"
    );
    assert!(stderr.contains("refused the credentials"), "{stderr}");

    // `warn` starts anyway, and says what is wrong.
    let (code, stderr) = serve(
        &dir,
        &s3,
        "s3://no-such-bucket",
        &keys,
        &["--store-check", "warn"],
    );
    assert_eq!(code, None, "--store-check warn must start:\n{stderr}");
    assert!(
        stderr.contains("names a bucket that does not exist") && stderr.contains("starting anyway"),
        "{stderr}"
    );

    // A store that works passes; the probe leaves nothing in it, and the prefix is claimed.
    let (code, stderr) = serve(&dir, &s3, &s3.store_url(), &keys, &[]);
    assert_eq!(code, None, "a working store must let it start:\n{stderr}");
    assert!(stderr.contains("object store probe passed"), "{stderr}");
    let objects: Vec<String> = runtime
        .block_on(s3.list_all())
        .into_iter()
        .map(|(key, _)| key)
        .collect();
    assert_eq!(objects, ["stagefs-file-system"], "the probe left objects");

    // The same file system starts again; another one (new metadata) on the same prefix does
    // not, as its blocks would overwrite the first one's.
    let (code, stderr) = serve(&dir, &s3, &s3.store_url(), &keys, &[]);
    assert_eq!(code, None, "its own prefix:\n{stderr}");
    std::fs::remove_file(dir.join("device.img.meta.redb")).unwrap();
    let (code, stderr) = serve(&dir, &s3, &s3.store_url(), &keys, &[]);
    assert_eq!(code, Some(1), "another file system's prefix:\n{stderr}");
    assert!(
        stderr.contains("belongs to another stagefs file system"),
        "{stderr}"
    );
    let (code, stderr) = serve(
        &dir,
        &s3,
        &s3.store_url(),
        &keys,
        &["--store-check", "warn"],
    );
    assert_eq!(code, None, "--store-check warn must start:\n{stderr}");
    assert!(stderr.contains("starting anyway"), "{stderr}");
}
