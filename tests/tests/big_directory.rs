//! Many clients, directories of millions: a listing streams in bounded pages end to end.
//!
//! `STAGEFS_BIG_DIR_ENTRIES` entries (default 50,000; README reports a larger run) are
//! made straight through the metadata engine, in the redb file a gateway then serves (through
//! FUSE that would take hours). Listed through the gateway's `ReadDir` in pages of 512, every
//! entry comes back exactly once, and the gateway's resident memory (read from `/proc`) grows by
//! less than its `--meta-cache 32MiB` plus a fixed allowance, whatever the number of entries.
//! Through a real mount, a directory of `STAGEFS_MOUNT_DIR_ENTRIES` entries (default 5,000)
//! lists completely, with the mount's peak memory under a fixed bound, and `ls -l` of it asks
//! for no lookup, getattr or extended attribute per
//! entry of the gateway (its RPC counts in `/metrics`): the attributes, and whether an entry has
//! extended attributes, come with the listing (readdirplus), and the mount answers `ls`'s
//! `security.selinux` and ACL probes itself.

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use futures::StreamExt;
use meta::{FileKind, MetaConfig, MetaEngine, MetaLocation, NewNode, ROOT_INO};
use proto::meta as pb;
use stagefs_tests::prometheus::{scrape, value};
use stagefs_tests::s3::free_port;
use stagefs_tests::*;

const MIB: u64 = 1 << 20;
const PAGE: u32 = 512;
/// Beyond the metadata cache: allocator slack, a page in flight, gRPC buffers.
const ALLOWANCE: u64 = 48 * MIB;
/// The mount's whole peak RSS while it lists (it caches no directory, only one page per handle).
const MOUNT_BOUND: u64 = 96 * MIB;

fn knob(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A `/proc/PID/status` field in bytes (`VmRSS`, `VmHWM`: the peak so far).
fn proc_bytes(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"));
    kib * 1024
}

/// Makes directory `name` in the root with `count` empty files `f0`, `f1`, … in it.
async fn populate(meta: &dyn MetaEngine, name: &str, count: u64) -> u64 {
    let dir = meta
        .mkdir(ROOT_INO, name.as_bytes(), 0o755, 0, 0)
        .await
        .unwrap();
    let node = NewNode {
        kind: FileKind::File,
        mode: 0o644,
        uid: 0,
        gid: 0,
        rdev: 0,
    };
    futures::stream::iter(0..count)
        .map(|i| async move {
            meta.mknod(dir.ino, format!("f{i}").as_bytes(), &node)
                .await
                .unwrap_or_else(|e| panic!("mknod f{i}: {e}"))
        })
        .buffer_unordered(32)
        .count()
        .await;
    dir.ino
}

#[test]
fn listings_stream_in_bounded_pages() {
    let entries = knob("STAGEFS_BIG_DIR_ENTRIES", 50_000);
    let mounted_entries = knob("STAGEFS_MOUNT_DIR_ENTRIES", 5_000);
    let dir = TestDir::new("big-directory");
    let meta_file = dir.join("meta.redb");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (big, mounted) = runtime.block_on(async {
        let engine = meta::open(
            &MetaLocation::Redb(meta_file.clone()),
            MetaConfig {
                sync_commits: false,
                ..MetaConfig::default()
            },
        )
        .await
        .unwrap();
        let started = Instant::now();
        let big = populate(&engine, "big", entries).await;
        let mounted = populate(&engine, "mounted", mounted_entries).await;
        eprintln!(
            "made {} entries through the engine in {:?}",
            entries + mounted_entries,
            started.elapsed()
        );
        (big, mounted)
    });
    drop(runtime);

    let gateway_metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let stack = FuseStack::start("big-directory-stack", |gateway| {
        gateway.args([
            "--meta",
            meta_file.to_str().unwrap(),
            "--meta-cache",
            "32MiB",
            "--metrics-listen",
            &gateway_metrics.to_string(),
        ])
    });
    let (before, (peak, listed)) = stack.block_on(async {
        let mut client = stack.gateway.meta_client().await;
        let before = stack.gateway.rss_bytes();
        let listing = async {
            let mut seen = vec![false; entries as usize];
            let (mut after, mut count, mut pages) = (0, 0u64, 0u64);
            loop {
                let page = client
                    .read_dir(pb::ReadDirRequest {
                        ino: big,
                        after_cookie: after,
                        limit: PAGE,
                    })
                    .await
                    .unwrap()
                    .into_inner()
                    .entries;
                pages += 1;
                for entry in &page {
                    let name = std::str::from_utf8(&entry.name).unwrap();
                    let i: usize = name[1..].parse().unwrap();
                    assert!(!seen[i], "{name} listed twice");
                    seen[i] = true;
                    count += 1;
                    after = entry.cookie;
                }
                if page.len() < PAGE as usize {
                    return (count, pages);
                }
            }
        };
        (
            before,
            stack
                .gateway
                .peak_rss_during(Duration::from_millis(20), listing)
                .await,
        )
    });
    let (count, pages) = listed;
    assert_eq!(count, entries, "every entry listed once");
    let grown = peak.saturating_sub(before);
    eprintln!(
        "listed {count} entries in {pages} pages; gateway RSS {} MiB before, {} MiB at most \
         during the listing (+{} MiB)",
        before / MIB,
        peak / MIB,
        grown / MIB
    );
    assert!(
        grown < 32 * MIB + ALLOWANCE,
        "the gateway grew by {} MiB listing {entries} entries",
        grown / MIB
    );

    // Through a mount: complete, and `ls -l` takes the attributes from the listing.
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mount = stack
        .mount("m")
        .args([
            "--attr-ttl",
            "60s",
            "--entry-ttl",
            "60s",
            "--metrics-listen",
            &metrics.to_string(),
        ])
        .start();
    let path = mount.join("mounted");
    // What reaches the gateway, per entry or not: its RPC counts.
    let per_entry_calls = |samples: &std::collections::BTreeMap<String, f64>| {
        let calls = |method: &str| {
            samples
                .get(&format!("stagefs_rpc_seconds_count{{method=\"{method}\"}}"))
                .copied()
                .unwrap_or(0.0)
        };
        calls("Lookup") + calls("GetAttr") + calls("GetXattr") + calls("ListXattr")
    };
    let calls_before = per_entry_calls(&scrape(gateway_metrics));
    let started = Instant::now();
    let ls = Command::new("ls")
        .arg("-l")
        .arg(&path)
        .output()
        .expect("ls");
    assert!(
        ls.status.success(),
        "{}",
        String::from_utf8_lossy(&ls.stderr)
    );
    let took = started.elapsed();
    let lines = String::from_utf8_lossy(&ls.stdout).lines().count() as u64;
    assert_eq!(
        lines,
        mounted_entries + 1,
        "every entry, and the total line"
    );
    let samples = scrape(metrics);
    let per_entry = per_entry_calls(&scrape(gateway_metrics)) - calls_before;
    let plus_calls = value(&samples, "stagefs_fuse_ops_total{op=\"readdirplus\"}");
    let ops: Vec<String> = samples
        .iter()
        .filter(|(series, _)| series.starts_with("stagefs_fuse_ops_total"))
        .map(|(series, n)| format!("{}={n}", &series["stagefs_fuse_ops_total".len()..]))
        .collect();
    eprintln!("the mount's FUSE operations so far: {}", ops.join(" "));
    eprintln!(
        "ls -l of {mounted_entries} entries through the mount: {took:?}, {plus_calls} \
         readdirplus calls; the gateway answered {per_entry} lookups, getattrs and xattr reads"
    );
    assert!(
        per_entry < (mounted_entries / 100) as f64,
        "{per_entry} lookups, getattrs and xattr reads for {mounted_entries} entries"
    );
    let names = std::fs::read_dir(&path).unwrap().count() as u64;
    assert_eq!(names, mounted_entries);
    // The mount holds one page per open directory handle, not the directory.
    let pid = mount.pid().expect("the mount's pid");
    let (now, peak) = (proc_bytes(pid, "VmRSS"), proc_bytes(pid, "VmHWM"));
    eprintln!(
        "mount RSS {} MiB after listing {mounted_entries} entries twice, {} MiB at most",
        now / MIB,
        peak / MIB
    );
    assert!(
        peak < MOUNT_BOUND,
        "the mount peaked at {} MiB listing {mounted_entries} entries",
        peak / MIB
    );
    let _ = mounted;
}
