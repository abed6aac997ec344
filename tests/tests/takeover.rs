//! Survive the loss of a gateway (issue 12): one mount spreads its writes over every live gateway
//! of a shared database, a gateway SIGKILLed under a writer costs the application no error, a
//! new process on the dead gateway's device at a new address takes it over, and nothing
//! acknowledged is lost.
//!
//! Every gateway holds its uploads (`--uploads-paused`), so what is read back before the end
//! comes from the devices, through the takeover's recovery, not from the store.
//!
//! `STAGEFS_TAKEOVER_ROUNDS` sets the kill/takeover rounds (default 5).

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use stagefs_tests::binaries::client_binary;
use stagefs_tests::{assert_file_bytes, status_json, GatewayBuilder, GatewayCluster, Pattern};

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;

fn held(_: usize, gateway: GatewayBuilder) -> GatewayBuilder {
    gateway
        .device_size("512MiB")
        .args(["--uploads-paused", "--heartbeat-interval", "1s"])
}

/// A mixed size: mostly small files, some of a few blocks, a few large ones.
fn mixed_len(rng: &mut impl Rng) -> usize {
    match rng.random_range(0..100) {
        0..70 => rng.random_range(1..64 * KIB),
        70..97 => rng.random_range(MIB / 2..3 * MIB),
        _ => rng.random_range(5 * MIB..9 * MIB),
    }
}

/// Blocks each gateway holds now (its own `Status`), in gateway order.
fn staged_blocks(cluster: &GatewayCluster) -> Vec<u64> {
    cluster.block_on(async {
        let mut counts = Vec::new();
        for gateway in &cluster.gateways {
            let mut client = gateway.client().await;
            counts.push(
                stagefs_tests::blocks::status(&mut client)
                    .await
                    .blocks_staged,
            );
        }
        counts
    })
}

fn unpause_all(cluster: &GatewayCluster) {
    cluster.block_on(async {
        for gateway in &cluster.gateways {
            let mut client = gateway.client().await;
            stagefs_tests::blocks::set_uploads_paused(&mut client, false).await;
        }
    });
}

/// `stagefs sync PATH…`: returns once every block of the files is in the store.
fn sync(paths: &[PathBuf]) {
    let out = Command::new(client_binary())
        .arg("sync")
        .args(paths)
        .args(["--timeout", "5m"])
        .output()
        .expect("run stagefs sync");
    assert!(
        out.status.success(),
        "stagefs sync: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn three_gateways_share_the_writes_of_a_mount_given_one_address() {
    let cluster = GatewayCluster::start("three-gateways", 3, held);
    let writer = cluster.mount(0, "writer").no_cache().start();
    let mut rng = rand::rngs::StdRng::seed_from_u64(12);
    let mut files = Vec::new();
    for i in 0..200u64 {
        let len = mixed_len(&mut rng);
        let dir = writer.join(format!("d{}", i % 5));
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join(format!("f{i}")), Pattern::new(i).bytes(0, len)).unwrap();
        files.push((format!("d{}/f{i}", i % 5), i, len));
    }
    let counts = staged_blocks(&cluster);
    let total: u64 = counts.iter().sum();
    for (i, count) in counts.iter().enumerate() {
        assert!(
            *count * 100 >= total * 15,
            "gateway {i} staged {count} of {total} blocks ({counts:?}): less than 15 %"
        );
    }
    // A second mount, of another gateway, reads every file back from the three devices.
    let reader = cluster.mount(1, "reader").no_cache().start();
    for (name, seed, len) in &files {
        assert_file_bytes(&reader.join(name), &Pattern::new(*seed).bytes(0, *len));
    }
    assert!(
        cluster.block_on(cluster.s3.list()).is_empty(),
        "uploads are held: every byte came from a device"
    );
    eprintln!("[takeover] blocks staged per gateway: {counts:?}");
}

/// What the writer thread saw: each file whose writes and close all returned, and any error.
#[derive(Default)]
struct Written {
    closed: BTreeMap<String, (u64, usize)>,
    errors: Vec<String>,
}

fn write_one(path: &Path, data: &[u8]) -> Result<(), String> {
    let mut file = File::create(path).map_err(|e| format!("create {}: {e}", path.display()))?;
    for piece in data.chunks(256 * KIB) {
        file.write_all(piece)
            .map_err(|e| format!("write {}: {e}", path.display()))?;
    }
    // close(2)'s own result: the mount flushes there.
    let fd = std::os::fd::IntoRawFd::into_raw_fd(file);
    // SAFETY: fd was just taken from the File, which no longer owns it.
    if unsafe { libc::close(fd) } != 0 {
        return Err(format!(
            "close {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

fn rounds() -> usize {
    std::env::var("STAGEFS_TAKEOVER_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5)
}

#[test]
fn a_gateway_killed_under_a_writer_is_taken_over_at_a_new_address_and_nothing_is_lost() {
    let mut cluster = GatewayCluster::start("takeover", 3, held);
    let mount = cluster.mount(0, "writer").no_cache().start();
    let root = mount.path().to_path_buf();
    let written = Arc::new(Mutex::new(Written::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (written, stop) = (written.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut rng = rand::rngs::StdRng::seed_from_u64(7);
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let name = format!("w{n}");
                let len = mixed_len(&mut rng);
                let data = Pattern::new(1000 + n).bytes(0, len);
                let outcome = write_one(&root.join(&name), &data);
                let mut written = written.lock().unwrap();
                match outcome {
                    Ok(()) => {
                        written.closed.insert(name, (1000 + n, len));
                    }
                    Err(e) => written.errors.push(e),
                }
            }
        })
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(99);
    let mut survivor = 0;
    for round in 0..rounds() {
        std::thread::sleep(Duration::from_millis(rng.random_range(300..3000)));
        let victim = rng.random_range(0..cluster.gateways.len());
        let before = written.lock().unwrap().closed.len();
        let old_addr = cluster.gateways[victim].addr();
        cluster.gateways[victim].kill9();
        // The writer goes on with the other two while the victim is dead.
        let deadline = Instant::now() + Duration::from_secs(60);
        while written.lock().unwrap().closed.len() < before + 3 {
            assert!(
                Instant::now() < deadline,
                "round {round}: the writer made no progress with gateway {victim} dead"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        std::thread::sleep(Duration::from_millis(rng.random_range(0..2000)));
        // Takeover: a new process on the dead gateway's device, at a new address.
        let started = Instant::now();
        cluster.runtime.block_on(cluster.gateways[victim].restart());
        assert_ne!(cluster.gateways[victim].addr(), old_addr, "a new address");
        eprintln!(
            "[takeover] round {round}: gateway {victim} killed after {before} files, taken over in {:?}",
            started.elapsed()
        );
        survivor = (victim + 1) % cluster.gateways.len();
    }
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    let written = std::mem::take(&mut *written.lock().unwrap());
    assert!(
        written.errors.is_empty(),
        "the application saw errors: {:?}\nmount log tail:\n{}",
        written.errors,
        mount.log_tail(40)
    );
    assert!(written.closed.len() > rounds() * 3);
    drop(mount);

    // A fresh mount given only a surviving gateway's address reads every closed file back.
    let fresh = cluster.mount(survivor, "fresh").no_cache().start();
    for (name, (seed, len)) in &written.closed {
        assert_file_bytes(&fresh.join(name), &Pattern::new(*seed).bytes(0, *len));
    }
    // Once uploads resume, the store finally holds every block.
    unpause_all(&cluster);
    let paths: Vec<PathBuf> = written.closed.keys().map(|n| fresh.join(n)).collect();
    sync(&paths);
    let stored: u64 = cluster
        .block_on(cluster.s3.list())
        .iter()
        .map(|(_, len)| len)
        .sum();
    let want: u64 = written.closed.values().map(|(_, len)| *len as u64).sum();
    assert!(stored >= want, "the store holds {stored} of {want} bytes");
    eprintln!(
        "[takeover] {} files closed over {} rounds, all read back",
        written.closed.len(),
        rounds()
    );
}

#[test]
fn reads_of_a_dead_gateways_blocks_wait_for_its_takeover_and_uploaded_ones_do_not() {
    // Gateway 0 alone first, so it stages everything written now.
    let mut cluster = GatewayCluster::start("read-wait", 1, |_, g| {
        g.device_size("512MiB").args(["--heartbeat-interval", "1s"])
    });
    let writer = cluster.mount(0, "writer").no_cache().start();
    let uploaded = Pattern::new(1).bytes(0, 5 * MIB + 3);
    let staged = Pattern::new(2).bytes(0, 6 * MIB + 5);
    fs::write(writer.join("uploaded"), &uploaded).unwrap();
    sync(&[writer.join("uploaded")]);
    cluster.block_on(async {
        let mut client = cluster.gateways[0].client().await;
        stagefs_tests::blocks::set_uploads_paused(&mut client, true).await;
    });
    fs::write(writer.join("staged"), &staged).unwrap();
    drop(writer);
    // A second gateway, and a mount of it alone.
    let home = cluster.path().join("gw1");
    fs::create_dir_all(&home).unwrap();
    let second = cluster.block_on(
        stagefs_tests::Gateway::builder(&home, &cluster.s3, "uring")
            .args(["--meta", &cluster.meta_url])
            .args(["--heartbeat-interval", "1s"])
            .start(),
    );
    cluster.gateways.push(second);
    let reader = cluster
        .mount(1, "reader")
        .no_cache()
        .args(["--takeover-wait", "10m"])
        .start();
    // `status` shows which gateways the reader's mount uses: both, once it has heartbeated.
    let first = cluster.gateways[0].addr().to_string();
    let survivor = cluster.gateways[1].addr().to_string();
    let mut both = vec![first.clone(), survivor.clone()];
    both.sort();
    wait_for_view(&survivor, reader.path(), (both, Vec::new()));
    // The registry shows what a gateway holds as of its last heartbeat: wait for the one that
    // reports the staged file, so that `status` can tell what the kill puts at stake.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !status_json(&first)["gateways"]
        .as_array()
        .unwrap()
        .iter()
        .any(|g| g["address"] == first.as_str() && g["staged_blocks"].as_u64() >= Some(2))
    {
        assert!(
            Instant::now() < deadline,
            "gateway 0 never reported its load"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    cluster.gateways[0].kill9();

    // The uploaded file reads from the store while its gateway is dead.
    assert_file_bytes(&reader.join("uploaded"), &uploaded);
    // The staged one waits for its gateway.
    let path = reader.join("staged");
    let read = std::thread::spawn(move || fs::read(path));
    std::thread::sleep(Duration::from_secs(4));
    assert!(
        !read.is_finished(),
        "a read of a block only the dead gateway holds returned: {:?}",
        read.join()
    );
    // `status` of the survivor shows the dead gateway, and what is at stake there.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let seen = status_json(&survivor);
        let dead = seen["gateways"]
            .as_array()
            .unwrap()
            .iter()
            .find(|g| g["address"] != survivor.as_str())
            .expect("the dead gateway is registered")
            .clone();
        if dead["alive"] == false {
            let at_risk = dead["at_risk_bytes"].as_u64().unwrap();
            assert!(at_risk >= staged.len() as u64, "{dead}");
            assert!(dead["queue_len"].as_u64().unwrap() >= 2, "{dead}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the dead gateway still shows alive: {seen}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // ... and that the reader's mount has left it out.
    wait_for_view(
        &survivor,
        reader.path(),
        (vec![survivor.clone()], vec![first.clone()]),
    );
    cluster.runtime.block_on(cluster.gateways[0].restart());
    let got = read
        .join()
        .unwrap()
        .expect("the read succeeds after the takeover");
    assert!(got == staged, "the waiting read returned other bytes");
}

/// The gateways (by address, sorted) the mount at `mountpoint` reports using and leaving out,
/// as `stagefs status` shows them.
fn mount_view(status: &serde_json::Value, mountpoint: &Path) -> Option<(Vec<String>, Vec<String>)> {
    let address = |id: &serde_json::Value| {
        status["gateways"]
            .as_array()
            .unwrap()
            .iter()
            .find(|g| g["id"] == *id)
            .map_or_else(
                || format!("unknown {id}"),
                |g| g["address"].as_str().unwrap().into(),
            )
    };
    let mountpoint = mountpoint.display().to_string();
    let mount = status["mounts"].as_array()?.iter().find(|m| {
        m["description"]
            .as_str()
            .is_some_and(|d| d.contains(&mountpoint))
    })?;
    let ids = |key: &str| {
        let mut addresses: Vec<String> =
            mount[key].as_array().unwrap().iter().map(address).collect();
        addresses.sort();
        addresses
    };
    Some((ids("using"), ids("avoiding")))
}

/// Waits (30 s at most) until `status` of the gateway at `gateway` shows the mount at
/// `mountpoint` with `want` (using, leaving out).
#[track_caller]
fn wait_for_view(gateway: &str, mountpoint: &Path, want: (Vec<String>, Vec<String>)) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = status_json(gateway);
        let seen = mount_view(&status, mountpoint);
        if seen.as_ref() == Some(&want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the mount at {} shows {seen:?}, not {want:?}: {status}",
            mountpoint.display()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_short_takeover_wait_fails_with_eio_rather_than_stale_bytes() {
    let mut cluster = GatewayCluster::start("read-wait-bound", 2, held);
    let writer = cluster.mount(0, "writer").no_cache().start();
    // Written while only gateway 0 lives, so it holds every block.
    cluster.gateways[1].kill9();
    let data = Pattern::new(3).bytes(0, 3 * MIB);
    fs::write(writer.join("f"), &data).unwrap();
    cluster.runtime.block_on(cluster.gateways[1].restart());
    let reader = cluster
        .mount(1, "reader")
        .no_cache()
        .args(["--takeover-wait", "3s"])
        .start();
    cluster.gateways[0].kill9();
    let err = fs::read(reader.join("f")).expect_err("no gateway holds the blocks");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(
        reader
            .log()
            .contains("did not come back within the takeover wait"),
        "the mount's log names the wait: {}",
        reader.log_tail(20)
    );
}

#[test]
fn a_stale_gateway_is_fenced_when_its_device_is_taken_over() {
    let mut cluster = GatewayCluster::start("fenced", 1, held);
    let stale = &mut cluster.gateways[0];
    stale.signal(nix::sys::signal::Signal::SIGSTOP);
    // What a detach and attach elsewhere looks like here: the device's bytes under another
    // path, served by a new process (the stopped one still holds its lock on the first).
    let copy = cluster.dir.join("attached-elsewhere.img");
    fs::copy(stale.device(), &copy).unwrap();
    let home = cluster.dir.join("elsewhere");
    fs::create_dir_all(&home).unwrap();
    let taker = cluster.block_on(
        stagefs_tests::Gateway::builder(&home, &cluster.s3, "uring")
            .device(&copy)
            .args(["--meta", &cluster.meta_url, "--heartbeat-interval", "1s"])
            .start(),
    );
    let stale = &mut cluster.gateways[0];
    stale.signal(nix::sys::signal::Signal::SIGCONT);
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = stale.exited() {
            break status;
        }
        assert!(Instant::now() < deadline, "the stale gateway still serves");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!status.success(), "a fenced gateway exits non-zero");
    let log = stale.log();
    assert!(
        log.contains("taken over") && log.contains("epoch"),
        "the stale gateway says why it stopped: {}",
        stagefs_tests::tail(&log, 10)
    );
    drop(taker);
}

/// With a single gateway, a mount rides out its restart: calls in flight wait for it (as on an
/// NFS hard mount) instead of failing. The gateway comes back at its registered address (a
/// proxy stands for a floating address), and the writers are processes of their own, as
/// applications are.
#[test]
fn a_lone_gateways_restart_is_ridden_out_by_calls_in_flight() {
    let proxy = stagefs_tests::TcpProxy::start();
    let mut stack = stagefs_tests::FuseStack::start("ride-out", |gateway| {
        gateway.args(["--uploads-paused", "--advertise", &proxy.addr().to_string()])
    });
    proxy.set_target(Some(stack.gateway.addr()));
    let mount = stack.mount_at(proxy.addr(), "m").no_cache().start();
    let source = stack.dir.join("source");
    let data = Pattern::new(5).bytes(0, 9 * MIB + 77);
    fs::write(&source, &data).unwrap();
    fs::write(mount.join("before"), b"written before the kill").unwrap();

    stack.gateway.kill9();
    proxy.set_target(None);
    proxy.cut_connections();
    let mut copy = Command::new("cp")
        .arg(&source)
        .arg(mount.join("copied"))
        .spawn()
        .unwrap();
    let mut mkdir = Command::new("mkdir")
        .arg(mount.join("made"))
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        copy.try_wait().unwrap().is_none(),
        "cp ended while the gateway was down"
    );
    assert!(
        mkdir.try_wait().unwrap().is_none(),
        "mkdir ended while the gateway was down"
    );

    stack.runtime.block_on(stack.gateway.restart());
    proxy.set_target(Some(stack.gateway.addr()));
    assert!(
        copy.wait().unwrap().success(),
        "cp failed across the restart"
    );
    assert!(
        mkdir.wait().unwrap().success(),
        "mkdir failed across the restart"
    );
    assert_file_bytes(&mount.join("copied"), &data);
    assert!(mount.join("made").is_dir());
    assert_file_bytes(&mount.join("before"), b"written before the kill");
}
