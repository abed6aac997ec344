//! Several gateways on one PostgreSQL database serve one file system (issue 9): the namespace is
//! shared, a file closed on a mount of gateway A reads back identical on a mount of gateway B
//! while the gateways still hold its blocks (uploads held, the store empty), `stagefs sync` on B
//! waits for the uploads, and a gateway killed while both serve costs nothing acknowledged.
//!
//! `STAGEFS_STRESS_SECS` sets how long the 16 writers of the namespace stress run (default 60).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use stagefs_tests::binaries::client_binary;
use stagefs_tests::{assert_file_bytes, dir_names as names, status_json, GatewayCluster, Pattern};

const MIB: usize = 1 << 20;

fn held_back(_: usize, gateway: stagefs_tests::GatewayBuilder) -> stagefs_tests::GatewayBuilder {
    gateway
        .device_size("512MiB")
        .args(["--uploads-paused", "--heartbeat-interval", "1s"])
}

#[test]
fn two_gateways_serve_one_namespace_and_each_others_staged_blocks() {
    let cluster = GatewayCluster::start("two-gateways", 2, held_back);
    let a = cluster.mount(0, "a").no_cache().start();
    let b = cluster.mount(1, "b").no_cache().start();

    fs::create_dir(a.join("d")).unwrap();
    let big = Pattern::new(1).bytes(0, 9 * MIB + 123);
    fs::write(a.join("d/big"), &big).unwrap();
    fs::write(a.join("d/small"), b"hello").unwrap();
    assert_eq!(names(&b.join("d")), ["big", "small"]);
    assert_file_bytes(&b.join("d/big"), &big);
    assert_file_bytes(&b.join("d/small"), b"hello");
    assert!(
        cluster.block_on(cluster.s3.list()).is_empty(),
        "nothing is uploaded: mount B read the gateways' devices"
    );

    fs::rename(b.join("d/small"), b.join("d/renamed")).unwrap();
    assert_eq!(names(&a.join("d")), ["big", "renamed"]);
    let from_b = Pattern::new(2).bytes(0, 5 * MIB + 7);
    fs::write(b.join("d/from-b"), &from_b).unwrap();
    assert_file_bytes(&a.join("d/from-b"), &from_b);
    fs::remove_file(a.join("d/renamed")).unwrap();
    assert_eq!(names(&b.join("d")), ["big", "from-b"]);

    // Both gateways are registered and alive; A reports the blocks it holds.
    let a_addr = cluster.gateways[0].addr().to_string();
    let b_addr = cluster.gateways[1].addr().to_string();
    let a_id = status_json(&a_addr)["gateway_id"]
        .as_str()
        .unwrap()
        .to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let seen = status_json(&b_addr);
        let gateways = seen["gateways"].as_array().unwrap().clone();
        assert_eq!(gateways.len(), 2, "{seen}");
        assert!(gateways.iter().all(|g| g["alive"] == true), "{seen}");
        let a_entry = gateways.iter().find(|g| g["id"] == a_id.as_str()).unwrap();
        assert_eq!(a_entry["address"], a_addr.as_str());
        assert_eq!(a_entry["epoch"], 1);
        // At least big's 3 blocks and small's, wherever the mount staged them (it spreads
        // chunks over both), from the heartbeats (every second).
        let staged: u64 = gateways
            .iter()
            .map(|g| g["staged_blocks"].as_u64().unwrap())
            .sum();
        if staged >= 4 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the gateways never reported their staged blocks: {seen}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // `stagefs sync` on B waits for the gateway that staged the file to upload it.
    let mut sync = Command::new(client_binary())
        .arg("sync")
        .arg(b.join("d/big"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        sync.try_wait().unwrap().is_none(),
        "sync returned while the uploads are held"
    );
    cluster.block_on(async {
        for gateway in &cluster.gateways {
            gateway
                .client()
                .await
                .set_uploads_paused(proto::staging::SetUploadsPausedRequest { paused: false })
                .await
                .unwrap();
        }
    });
    let synced = sync.wait_with_output().unwrap();
    assert!(
        synced.status.success(),
        "sync: {}",
        String::from_utf8_lossy(&synced.stderr)
    );
    let uploaded: u64 = cluster
        .block_on(cluster.s3.list())
        .iter()
        .map(|(_, len)| len)
        .sum();
    assert!(
        uploaded >= big.len() as u64,
        "sync returned with {uploaded} bytes in the store"
    );
}

#[test]
fn a_gateway_killed_while_both_serve_loses_nothing_acknowledged() {
    let mut cluster = GatewayCluster::start("gateway-killed", 2, held_back);
    let a = cluster.mount(0, "a").no_cache().start();
    let b = cluster.mount(1, "b").no_cache().start();
    let content = |i: usize| Pattern::new(100 + i as u64).bytes(0, i * 700 * 1024 + 11);
    for i in 0..12 {
        fs::write(a.join(format!("a{i}")), content(i)).unwrap();
    }
    cluster.gateways[0].kill9();

    // Gateway B and its database go on: names, data and renames through B all work.
    for i in 0..12 {
        fs::write(b.join(format!("b{i}")), content(20 + i)).unwrap();
    }
    fs::create_dir(b.join("dir")).unwrap();
    fs::rename(b.join("b0"), b.join("dir/b0")).unwrap();
    let listed = names(b.path());
    for i in 0..12 {
        assert!(listed.contains(&format!("a{i}")), "{listed:?}");
    }

    // Gateway A starts again on its device (at another port): everything it acknowledged reads
    // back on B, which finds A's new address through the registry.
    let runtime = &cluster.runtime;
    runtime.block_on(cluster.gateways[0].restart());
    for i in 0..12 {
        assert_file_bytes(&b.join(format!("a{i}")), &content(i));
    }
    assert_file_bytes(&b.join("dir/b0"), &content(20));
    for i in 1..12 {
        assert_file_bytes(&b.join(format!("b{i}")), &content(20 + i));
    }
    drop(a);
    let fresh = cluster.mount(0, "fresh").no_cache().start();
    for i in 0..12 {
        assert_file_bytes(&fresh.join(format!("a{i}")), &content(i));
        assert_file_bytes(
            &fresh.join(format!("b{}", i.max(1))),
            &content(20 + i.max(1)),
        );
    }
    assert!(
        cluster.block_on(cluster.s3.list()).is_empty(),
        "uploads are held"
    );
}

/// What one writer did that was acknowledged: its names, each with the content seed and length
/// of its inode, and which names share an inode (hard links).
#[derive(Default)]
struct Writer {
    /// name -> inode tag
    names: BTreeMap<String, u64>,
    /// inode tag -> (seed, len)
    inodes: BTreeMap<u64, (u64, usize)>,
}

fn stress_secs() -> u64 {
    std::env::var("STAGEFS_STRESS_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60)
}

/// 16 writers, 8 on each gateway's mount, create, rename, link and delete files in one directory.
/// Each writer keeps a model of what was acknowledged; afterwards the tree equals the union of the
/// models (names, sizes, bytes, link counts) on both mounts, and once the delete delay has passed
/// and uploads are done, the store holds exactly the blocks of the files that remain.
#[test]
fn sixteen_writers_over_two_gateways_leave_the_tree_their_acknowledged_operations_predict() {
    let cluster = GatewayCluster::start("sixteen-writers", 2, |_, gateway| {
        gateway.device_size("512MiB").args([
            "--heartbeat-interval",
            "1s",
            "--deleted-data-delay",
            "1s",
        ])
    });
    // The writers run for the stress time, and the check reads back every file they left on
    // both mounts (a few hundred per minute of stress, at ~0.1 s each on this machine's fsync):
    // the mounts' watchdog grows with the stress time.
    let watchdog = Duration::from_secs(240 + 4 * stress_secs());
    let mounts = [
        cluster.mount(0, "a").no_cache().watchdog(watchdog).start(),
        cluster.mount(1, "b").no_cache().watchdog(watchdog).start(),
    ];
    fs::create_dir(mounts[0].join("shared")).unwrap();
    let seed = rand::random::<u64>();
    eprintln!("stress seed {seed}, {} s", stress_secs());
    let until = Instant::now() + Duration::from_secs(stress_secs());
    let writers: Vec<Writer> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..16)
            .map(|w| {
                let dir = mounts[w % 2].join("shared");
                scope.spawn(move || run_writer(w, &dir, seed, until))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });

    let mut want: BTreeMap<String, (u64, usize, u64)> = BTreeMap::new();
    for writer in &writers {
        let mut links: BTreeMap<u64, u64> = BTreeMap::new();
        for tag in writer.names.values() {
            *links.entry(*tag).or_default() += 1;
        }
        for (name, tag) in &writer.names {
            let (seed, len) = writer.inodes[tag];
            want.insert(name.clone(), (seed, len, links[tag]));
        }
    }
    for mount in &mounts {
        let dir = mount.join("shared");
        assert_eq!(
            names(&dir),
            want.keys().cloned().collect::<Vec<_>>(),
            "the tree on {}",
            mount.path().display()
        );
        // Eight readers at once: each file costs a few metadata round trips and block reads.
        let files: Vec<_> = want.iter().collect();
        std::thread::scope(|scope| {
            for part in files.chunks(files.len().div_ceil(8).max(1)) {
                let dir = &dir;
                scope.spawn(move || {
                    for (name, (seed, len, nlink)) in part {
                        let path = dir.join(name);
                        let meta = fs::metadata(&path).unwrap();
                        assert_eq!(meta.nlink(), *nlink, "links of {name}");
                        assert_file_bytes(&path, &Pattern::new(*seed).bytes(0, *len));
                    }
                });
            }
        });
    }

    // Uploads done and the delete delay passed: the store holds exactly the live blocks.
    let synced = Command::new(client_binary())
        .arg("sync")
        .arg(mounts[0].join("shared"))
        .output()
        .unwrap();
    assert!(
        synced.status.success(),
        "{}",
        String::from_utf8_lossy(&synced.stderr)
    );
    let live = cluster.block_on(live_block_keys(&cluster, &mounts[0].join("shared")));
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let stored: BTreeSet<String> = cluster
            .block_on(cluster.s3.list())
            .into_iter()
            .map(|(key, _)| key)
            .collect();
        if stored == live {
            break;
        }
        let leaked: Vec<_> = stored.difference(&live).take(5).collect();
        let missing: Vec<_> = live.difference(&stored).take(5).collect();
        assert!(
            missing.is_empty(),
            "live blocks missing from the store: {missing:?}"
        );
        assert!(
            Instant::now() < deadline,
            "deleted data still in the store after the delete delay: {leaked:?} ({} in all)",
            stored.len() - live.len()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The object keys of every block of every file in `dir`, from the metadata.
async fn live_block_keys(cluster: &GatewayCluster, dir: &Path) -> BTreeSet<String> {
    let mut meta = cluster.gateways[0].meta_client().await;
    let mut keys = BTreeSet::new();
    for entry in fs::read_dir(dir).unwrap() {
        let metadata = entry.unwrap().metadata().unwrap();
        for chunk_index in 0..metadata.len().div_ceil(shared::CHUNK_SIZE) {
            let slices = meta
                .read_chunk(proto::meta::ReadChunkRequest {
                    ino: metadata.ino(),
                    chunk_index,
                })
                .await
                .unwrap()
                .into_inner()
                .slices;
            for slice in slices.iter().filter(|s| s.slice_id != 0) {
                for key in shared::meta::slice_block_keys(slice.slice_id, slice.len) {
                    keys.insert(key.to_string());
                }
            }
        }
    }
    keys
}

fn run_writer(w: usize, dir: &Path, seed: u64, until: Instant) -> Writer {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ (w as u64) << 32);
    let mut model = Writer::default();
    let mut next = 0u64;
    while Instant::now() < until {
        next += 1;
        let own: Vec<String> = model.names.keys().cloned().collect();
        let pick = |rng: &mut rand::rngs::StdRng| own[rng.random_range(0..own.len())].clone();
        match rng.random_range(0..10) {
            0..=4 => {
                let name = format!("w{w}-{next}");
                let (content_seed, len) = (
                    seed ^ next ^ ((w as u64) << 48),
                    rng.random_range(0..300_000),
                );
                fs::write(dir.join(&name), Pattern::new(content_seed).bytes(0, len))
                    .unwrap_or_else(|e| panic!("writer {w}: create {name}: {e}"));
                model.names.insert(name, next);
                model.inodes.insert(next, (content_seed, len));
            }
            5 | 6 if !own.is_empty() => {
                let from = pick(&mut rng);
                let to = format!("w{w}-{next}");
                fs::rename(dir.join(&from), dir.join(&to))
                    .unwrap_or_else(|e| panic!("writer {w}: rename {from} to {to}: {e}"));
                let tag = model.names.remove(&from).unwrap();
                model.names.insert(to, tag);
            }
            7 if !own.is_empty() => {
                let from = pick(&mut rng);
                let to = format!("w{w}-{next}");
                fs::hard_link(dir.join(&from), dir.join(&to))
                    .unwrap_or_else(|e| panic!("writer {w}: link {from} to {to}: {e}"));
                let tag = model.names[&from];
                model.names.insert(to, tag);
            }
            8 | 9 if !own.is_empty() => {
                let name = pick(&mut rng);
                fs::remove_file(dir.join(&name))
                    .unwrap_or_else(|e| panic!("writer {w}: unlink {name}: {e}"));
                model.names.remove(&name);
            }
            _ => {}
        }
    }
    // Inodes with no name left are gone.
    let used: BTreeSet<u64> = model.names.values().copied().collect();
    model.inodes.retain(|tag, _| used.contains(tag));
    model
}

/// `meta dump` of a gateway's embedded metadata, `meta load` into PostgreSQL, and a gateway on
/// the same device over that database serves the same tree and bytes.
#[test]
fn a_file_system_moves_from_redb_to_postgres_with_dump_and_load() {
    use stagefs_tests::binaries::gateway_binary;
    let mut stack = stagefs_tests::FuseStack::start("dump-load", |gateway| {
        gateway.device_size("256MiB").arg("--uploads-paused")
    });
    let content = |i: usize| Pattern::new(300 + i as u64).bytes(0, i * 400 * 1024 + 3);
    let mount = stack.mount("before").no_cache().start();
    fs::create_dir_all(mount.join("d/e")).unwrap();
    for i in 0..8 {
        fs::write(mount.join(format!("d/e/f{i}")), content(i)).unwrap();
    }
    std::os::unix::fs::symlink("e/f1", mount.join("d/link")).unwrap();
    fs::hard_link(mount.join("d/e/f2"), mount.join("d/hard")).unwrap();
    let tree_before = tree(mount.path());
    mount.unmount();
    let status = stack.runtime.block_on(stack.gateway.sigterm());
    assert!(status.success(), "gateway stopped cleanly: {status:?}");

    let redb = format!("{}.meta.redb", stack.gateway.device().display());
    let dump_file = stack.dir.join("meta.dump");
    let dumped = Command::new(gateway_binary())
        .args(["meta", "dump", "--meta", &redb])
        .arg(&dump_file)
        .output()
        .unwrap();
    assert!(
        dumped.status.success(),
        "{}",
        String::from_utf8_lossy(&dumped.stderr)
    );
    let url = meta::pg_cluster::PgCluster::shared()
        .fresh_database("dump_load")
        .unwrap();
    let loaded = Command::new(gateway_binary())
        .args(["meta", "load", "--meta", &url])
        .arg(&dump_file)
        .output()
        .unwrap();
    assert!(
        loaded.status.success(),
        "{}",
        String::from_utf8_lossy(&loaded.stderr)
    );
    let again = Command::new(gateway_binary())
        .args(["meta", "load", "--meta", &url])
        .arg(&dump_file)
        .output()
        .unwrap();
    assert!(
        !again.status.success(),
        "a second load into a non-empty database is refused"
    );

    let builder = stagefs_tests::Gateway::builder(stack.dir.path(), &stack.s3, "uring")
        .device(stack.gateway.device())
        .args(["--uploads-paused", "--meta", &url]);
    stack.gateway = stack.block_on(builder.start());
    let mount = stack.mount("after").no_cache().start();
    assert_eq!(tree(mount.path()), tree_before);
    for i in 0..8 {
        assert_file_bytes(&mount.join(format!("d/e/f{i}")), &content(i));
    }
    assert_file_bytes(&mount.join("d/hard"), &content(2));
    assert_eq!(
        fs::read_link(mount.join("d/link")).unwrap(),
        Path::new("e/f1")
    );
    assert!(
        stack.block_on(stack.s3.list()).is_empty(),
        "every byte came from the device"
    );
}

/// Names, kinds, sizes, modes and link counts below `root`.
fn tree(root: &Path) -> BTreeMap<String, (u32, u64, u64)> {
    let mut out = BTreeMap::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let meta = fs::symlink_metadata(&path).unwrap();
            if meta.is_dir() {
                dirs.push(path.clone());
            }
            let name = path.strip_prefix(root).unwrap().display().to_string();
            out.insert(name, (meta.mode(), meta.len(), meta.nlink()));
        }
    }
    out
}
