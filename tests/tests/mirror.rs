//! A mirror in another region: a gateway on PostgreSQL tells a caller that asks where the
//! metadata's log stood after its call (`stagefs-log-position`); an engine on a hot standby of
//! that database (real streaming replication, made by the project's own `PgCluster::standby`)
//! waits until it has applied the log that far, after which the change reads back there; and a
//! mirror gateway (`serve --source`) built on both serves a mount that reads its own writes,
//! and with a read cache (`--read-cache`) warmed by `stagefs warmup`, reads a data set from its
//! own device: no store GET, and no need of region A.

use std::time::Duration;

use meta::pg_cluster::{PgCluster, PgDurability};
use meta::{MetaConfig, MetaEngine, MetaLocation, ROOT_INO};
use stagefs_tests::rpc::{attr_of, mkdir_request};
use stagefs_tests::*;

/// A hot standby of the test server, and the URL of `cluster`'s database on it.
fn standby_of(cluster: &GatewayCluster) -> (PgCluster, String) {
    let primary = PgCluster::shared();
    let standby = primary
        .standby(PgDurability::Fast)
        .unwrap_or_else(|e| panic!("a hot standby of the test server: {e}"));
    let on_standby = cluster.meta_url.replace(
        &format!(":{}/", primary.port()),
        &format!(":{}/", standby.port()),
    );
    (standby, on_standby)
}

#[test]
fn a_change_reads_back_on_a_standby_once_its_log_position_is_applied() {
    let cluster = GatewayCluster::start("mirror-position", 1, |_, gateway| gateway);
    // Held to the end: dropping it stops the standby.
    let (_standby, on_standby) = standby_of(&cluster);
    cluster.block_on(async {
        let mut meta = cluster.gateways[0].meta_client().await;
        let plain = meta.mkdir(mkdir_request("plain")).await.unwrap();
        assert!(
            plain.metadata().get("stagefs-log-position").is_none(),
            "a caller that does not ask is not told"
        );
        let mut asked = tonic::Request::new(mkdir_request("asked"));
        asked
            .metadata_mut()
            .insert("stagefs-want-log-position", "1".parse().unwrap());
        let answer = meta.mkdir(asked).await.unwrap();
        let position: u64 = answer
            .metadata()
            .get("stagefs-log-position")
            .expect("the position, asked for")
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        let made = attr_of(answer);

        let mirror = meta::open(&MetaLocation::Postgres(on_standby), MetaConfig::default())
            .await
            .unwrap_or_else(|e| panic!("an engine on the standby: {e}"));
        mirror
            .wait_position(position, Duration::from_secs(30))
            .await
            .unwrap();
        assert_eq!(
            mirror.lookup(ROOT_INO, b"asked").await.unwrap().ino,
            made.ino,
            "once the standby applied the log to the change's position, the change reads back"
        );
        let refused = mirror
            .mkdir(ROOT_INO, b"on-the-mirror", 0o755, 0, 0)
            .await
            .unwrap_err();
        assert_eq!(refused.errno(), libc::EROFS, "{refused}");
    });
}

/// Polls `check` every 50 ms until it holds, for at most `limit`.
fn eventually(limit: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + limit;
    while !check() {
        assert!(
            std::time::Instant::now() < deadline,
            "not within {limit:?}: {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `stagefs ARGS…`, which must succeed.
fn stagefs(args: &[&std::ffi::OsStr]) {
    let out = std::process::Command::new(stagefs_tests::binaries::client_binary())
        .args(args)
        .output()
        .expect("run stagefs");
    assert!(
        out.status.success(),
        "stagefs {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A gateway in region "A" on the primary, a mirror gateway in "B" on a real hot standby, which
/// reaches A through a link with a 30 ms round trip that can be cut. A mount of each.
#[test]
fn a_mirror_mount_reads_its_own_writes_and_keeps_reading_without_the_source() {
    let cluster = GatewayCluster::start_logging_store("mirror-gateway", 1, true, |_, gateway| {
        gateway.args(["--deleted-data-delay", "1s"])
    });
    let (standby, on_standby) = standby_of(&cluster);
    // The regions are 30 ms apart.
    let link = TcpProxy::start_with_delay(Duration::from_millis(15));
    link.set_target(Some(cluster.gateways[0].addr()));
    let home = cluster.dir.join("mirror");
    std::fs::create_dir_all(&home).unwrap();
    let mirror = cluster.block_on(
        Gateway::builder(&home, &cluster.s3, "uring")
            .args(["--meta", &on_standby, "--source", &link.addr().to_string()])
            .args(["--read-cache", "64MiB"])
            // What B's mounts stage stays on the mirror's device: reads of it on A must come
            // from there.
            .arg("--uploads-paused")
            .start(),
    );
    let a = cluster.mount(0, "a").start();
    let b = Mount::builder(mirror.addr().to_string(), cluster.dir.join("b"))
        .s3(&cluster.s3)
        .start();

    // Written on B (every change through the source), read back at once on B and on A.
    std::fs::create_dir_all(b.join("d1/d2/d3/d4")).unwrap();
    let data = Pattern::new(16).bytes(0, 300_000);
    std::fs::write(b.join("d1/d2/d3/d4/newf"), &data).unwrap();
    assert_file_bytes(&b.join("d1/d2/d3/d4/newf"), &data);
    assert_file_bytes(&a.join("d1/d2/d3/d4/newf"), &data);
    // Staged in B, on the mirror (whose uploads are held), not on A's gateway; A's mount read
    // it from the mirror, which the source region's registry lists as a mirror.
    let mirror_status = status_json(&mirror.addr().to_string());
    assert!(
        mirror_status["blocks_staged"].as_u64() >= Some(1),
        "{mirror_status}"
    );
    let a_status = status_json(&cluster.gateways[0].addr().to_string());
    assert_eq!(a_status["blocks_staged"], 0, "{a_status}");
    let listed = a_status["gateways"].as_array().unwrap();
    assert!(
        listed.iter().any(|g| g["mirror"] == true
            && g["id"] == mirror_status["gateway_id"]
            && g["alive"] == true),
        "the source region's registry lists the mirror: {a_status}"
    );
    assert_eq!(
        cluster.s3.count_requests("PutObject", "chunks/"),
        0,
        "nothing uploaded yet"
    );
    // A file staged in B and deleted: once its delay is over, the mirror takes it from the
    // source's queue and drops its block, which is then never uploaded.
    let staged_before = mirror_status["blocks_staged"].as_u64().unwrap();
    std::fs::write(b.join("gone"), Pattern::new(19).bytes(0, 70_000)).unwrap();
    let staged = |what: &str| {
        status_json(&mirror.addr().to_string())["blocks_staged"]
            .as_u64()
            .unwrap_or_else(|| panic!("{what}: no blocks_staged"))
    };
    assert_eq!(staged("after the write"), staged_before + 1);
    std::fs::remove_file(b.join("gone")).unwrap();
    eventually(
        Duration::from_secs(30),
        "the mirror drops the block of a deleted file it staged",
        || staged("after the delete") == staged_before,
    );
    // A WriteSlice under a slice id its session was not handed stages nothing on the mirror.
    // The gateway id as status prints it: a uuid, 32 hex digits and four dashes.
    let hex: String = mirror_status["gateway_id"]
        .as_str()
        .unwrap()
        .chars()
        .filter(|c| *c != '-')
        .collect();
    let mirror_id: Vec<u8> = (0..16)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    cluster.block_on(async {
        use proto::meta as pb;
        let mut meta = mirror.meta_client().await;
        let session = stagefs_tests::rpc::open_session(&mut meta, "outsider")
            .await
            .session_id;
        let own = stagefs_tests::rpc::create(&mut meta, &session, ROOT_INO, "outsider").await;
        let data = vec![7u8; 4096];
        let slice = pb::Slice {
            slice_id: 1 << 40,
            offset_in_chunk: 0,
            len: data.len() as u32,
            gateway_id: mirror_id.clone().into(),
        };
        stagefs_tests::rpc::expect_errno(
            "WriteSlice through the mirror of a slice id not handed to the session",
            meta.write_slice(pb::WriteSliceRequest {
                commit: Some(pb::CommitSliceRequest {
                    session_id: session.clone(),
                    ino: own.ino,
                    chunk_index: 0,
                    slice: Some(slice),
                    new_size: data.len() as u64,
                    mtime_ns: 1,
                    ..Default::default()
                }),
                crc32c: crc32c::crc32c(&data),
                data: data.into(),
            })
            .await,
            libc::EPERM,
            tonic::Code::PermissionDenied,
        );
    });
    assert_eq!(staged("after a refused WriteSlice"), staged_before);
    std::fs::rename(b.join("d1/d2/d3/d4/newf"), b.join("d1/moved")).unwrap();
    assert!(
        !b.join("d1/d2/d3/d4/newf").exists(),
        "a rename reads back on B at once"
    );
    assert_file_bytes(&b.join("d1/moved"), &data);

    // Made on A: seen on B within the replication lag.
    let from_a = Pattern::new(17).bytes(0, 5_000);
    std::fs::write(a.join("from-a"), &from_a).unwrap();
    eventually(
        Duration::from_secs(30),
        "A's file appears whole on B",
        || std::fs::metadata(b.join("from-a")).is_ok_and(|m| m.len() == from_a.len() as u64),
    );
    assert_file_bytes(&b.join("from-a"), &from_a);
    assert_eq!(
        staged("after A's write"),
        staged_before,
        "a mount of A stages nothing on B's mirror"
    );

    // The mirror says so, with its lag.
    let status = status_json(&mirror.addr().to_string());
    assert_eq!(status["mirror"], true, "{status}");
    assert!(status["replica_lag_seconds"].as_f64().is_some(), "{status}");

    // A data set written in A straight to the store (no gateway holds it), warmed into the
    // mirror's device from B.
    let through = cluster
        .mount(0, "a-through")
        .args(["--write-mode", "through"])
        .start();
    std::fs::create_dir(through.join("data")).unwrap();
    let set: Vec<Vec<u8>> = (0..3)
        .map(|i| Pattern::new(30 + i).bytes(0, (5 << 20) + i as usize))
        .collect();
    for (i, bytes) in set.iter().enumerate() {
        std::fs::write(through.join(format!("data/f{i}")), bytes).unwrap();
    }
    assert!(through.unmount().success());
    eventually(Duration::from_secs(30), "A's data set appears on B", || {
        std::fs::metadata(b.join("data/f2")).is_ok_and(|m| m.len() == set[2].len() as u64)
    });
    stagefs(&["warmup".as_ref(), b.join("data").as_os_str()]);

    // With the standby's replay held, a change made on B does not return until it can be read
    // back there.
    standby.pause_replay(true).unwrap();
    let held = Pattern::new(18).bytes(0, 1_000);
    let writer = {
        let (path, held) = (b.join("while-held"), held.clone());
        std::thread::spawn(move || std::fs::write(path, held))
    };
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        !writer.is_finished(),
        "a change returned before the mirror's replica replayed it"
    );
    assert!(
        a.join("while-held").exists(),
        "the change was made in A meanwhile"
    );
    standby.pause_replay(false).unwrap();
    writer.join().unwrap().unwrap();
    assert_file_bytes(&b.join("while-held"), &held);

    // A cut off: B goes on reading (listing, stat, open and read) and fails changes at once,
    // saying why.
    link.set_target(None);
    link.cut_connections();
    let names: Vec<_> = std::fs::read_dir(b.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(names.iter().any(|n| n == "from-a"), "{names:?}");
    assert_eq!(
        std::fs::metadata(b.join("d1/moved")).unwrap().len(),
        data.len() as u64
    );
    assert_file_bytes(&b.join("from-a"), &from_a);
    // The warmed data set comes from the mirror's device: not from the store, nor from A.
    let gets = cluster.s3.count_requests("GetObject", "chunks/");
    for (i, bytes) in set.iter().enumerate() {
        assert_file_bytes(&b.join(format!("data/f{i}")), bytes);
    }
    assert_eq!(
        cluster.s3.count_requests("GetObject", "chunks/"),
        gets,
        "a warmed data set is read on B with no store GET"
    );
    let started = std::time::Instant::now();
    assert_errno(
        std::fs::create_dir(b.join("while-cut")),
        libc::EROFS,
        "a change with the source unreachable",
    );
    assert!(
        started.elapsed() < Duration::from_secs(40),
        "a change with the source unreachable fails rather than hangs (took {:?})",
        started.elapsed()
    );
    assert!(
        mirror
            .current_log()
            .contains("no gateway of the source region took the change"),
        "the mirror's log names the cause"
    );
    assert!(!a.join("while-cut").exists(), "nothing was made in A");
    link.set_target(Some(cluster.gateways[0].addr()));
    std::fs::create_dir(b.join("after-cut")).unwrap();
    assert!(a.join("after-cut").is_dir());
    assert!(
        !b.log().contains("metadata calls go to another gateway"),
        "the mirror's mount keeps its metadata calls at the mirror"
    );
    assert!(
        !b.log().contains("small slices take three calls"),
        "the mirror takes WriteSlice (staging the block in B, committing in A)"
    );
}
