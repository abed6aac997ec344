//! Two FUSE mounts of one gateway: close-to-open consistency (DESIGN.md "Read path and
//! consistency"). Once `close()` returned on mount A, an `open()` on mount B sees the new size and
//! bytes — here while the gateway's uploads are held back (`--uploads-paused` and
//! `--upload-delay 1h`), so every byte B reads comes from the gateway's staging device, never from
//! the object store (which the tests check stays empty). Both mounts run with
//! `--attr-ttl 0s --entry-ttl 0s`, so the kernel's attribute and name caches play no part.

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, FileExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Instant;

use stagefs_tests::{assert_errno, dir_names as names, FuseStack, Mount, Pattern};

const MIB: usize = 1 << 20;

fn held_back_stack(name: &str) -> FuseStack {
    FuseStack::start(name, |gateway| {
        gateway
            .device_size("512MiB")
            .args(["--uploads-paused", "--upload-delay", "1h"])
    })
}

fn libc_uid() -> u32 {
    // SAFETY: getuid has no preconditions.
    unsafe { libc::getuid() }
}

fn libc_gid() -> u32 {
    // SAFETY: getgid has no preconditions.
    unsafe { libc::getgid() }
}

/// Asserts that `path` (on another mount) holds exactly `want`: size from stat, size from the
/// open file, and the bytes.
#[track_caller]
fn assert_content(path: &Path, want: &[u8], what: &str) {
    let size = fs::metadata(path)
        .unwrap_or_else(|e| panic!("{what}: stat {}: {e}", path.display()))
        .len();
    assert_eq!(
        size,
        want.len() as u64,
        "{what}: size by stat of {}",
        path.display()
    );
    let file = File::open(path).unwrap_or_else(|e| panic!("{what}: open {}: {e}", path.display()));
    assert_eq!(
        file.metadata().unwrap().len(),
        want.len() as u64,
        "{what}: size by fstat"
    );
    let got = fs::read(path).unwrap_or_else(|e| panic!("{what}: read {}: {e}", path.display()));
    if got != want {
        let first = got.iter().zip(want).position(|(g, w)| g != w);
        panic!(
            "{what}: {} holds other bytes: {} read, {} written, first difference at {first:?}",
            path.display(),
            got.len(),
            want.len()
        );
    }
}

/// The object store must still be empty: nothing was uploaded, so whatever the other mount read
/// came from the gateway's staging device.
fn assert_nothing_uploaded(stack: &FuseStack) {
    let objects = stack.block_on(stack.s3.list());
    assert!(
        objects.is_empty(),
        "uploads were held back, yet the store holds {} objects: {:?}",
        objects.len(),
        &objects[..objects.len().min(5)]
    );
    let status = stack.block_on(async {
        let mut client = stack.gateway.client().await;
        stagefs_tests::status(&mut client).await
    });
    assert!(
        status.uploads_paused,
        "the gateway's uploads are not paused"
    );
    assert!(
        status.blocks_staged > 0,
        "nothing is staged on the gateway: {status:?}"
    );
    assert_eq!(status.uploaded_blocks_total, 0, "blocks were uploaded");
}

fn timed(name: &str, body: impl FnOnce()) {
    let started = Instant::now();
    body();
    eprintln!(
        "[stagefs-tests] {name}: passed in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn close_to_open_before_upload() {
    timed("close_to_open_before_upload", || {
        let stack = held_back_stack("fuse-two-c2o");
        let a = stack.mount("a").no_cache().start();
        let b = stack.mount("b").no_cache().start();

        // Files of many sizes: empty, within a page, one block (4 MiB), just over, several blocks.
        let sizes = [
            0,
            1,
            4095,
            4096,
            MIB + 3,
            4 * MIB,
            4 * MIB + 1,
            9 * MIB + 17,
        ];
        let mut contents = Vec::new();
        for (i, &size) in sizes.iter().enumerate() {
            let data = Pattern::new(100 + i as u64).bytes(0, size);
            let name = format!("f{i}");
            fs::write(a.join(&name), &data).unwrap();
            contents.push((name, data));
        }
        for (name, data) in &contents {
            assert_content(
                &b.join(name),
                data,
                &format!("B reads {name} written and closed on A"),
            );
        }

        // What `tar` does to each file it writes: mode, owner (as root) and times set before the
        // close travel with the data's commit. A answers them at once; B sees them once A's
        // close returned.
        let untarred = a.join("untarred");
        let file = File::create(&untarred).unwrap();
        file.write_all_at(b"a header", 0).unwrap();
        file.set_permissions(fs::Permissions::from_mode(0o751))
            .unwrap();
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        if root {
            std::os::unix::fs::fchown(&file, Some(4321), Some(8765)).unwrap();
        }
        let mtime = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000_000);
        file.set_times(fs::FileTimes::new().set_modified(mtime).set_accessed(mtime))
            .unwrap();
        let (owner, group) = if root {
            (4321, 8765)
        } else {
            (libc_uid(), libc_gid())
        };
        let view = |m: fs::Metadata| (m.mode() & 0o7777, m.uid(), m.gid(), m.mtime(), m.len());
        let want = (0o751, owner, group, 1_000_000_000, 8);
        assert_eq!(
            view(file.metadata().unwrap()),
            want,
            "A's own view before the close"
        );
        drop(file);
        assert_eq!(
            view(fs::metadata(b.join("untarred")).unwrap()),
            want,
            "B after A's close"
        );

        // In-place overwrites on A (the file keeps its size), after B has read the old bytes.
        for (name, data) in contents.iter_mut().filter(|(_, d)| d.len() >= 4096) {
            let patch = Pattern::new(999).bytes(0, 1000);
            let at = data.len() / 3;
            let file = OpenOptions::new().write(true).open(a.join(&*name)).unwrap();
            file.write_all_at(&patch, at as u64).unwrap();
            drop(file);
            data[at..at + patch.len()].copy_from_slice(&patch);
            assert_content(
                &b.join(&*name),
                data,
                &format!("B reads {name} after an in-place overwrite on A"),
            );
        }

        // Appends on A: B sees the new size and the appended bytes.
        {
            let (name, data) = &mut contents[5];
            let tail = Pattern::new(5005).bytes(0, 300_000);
            let mut file = OpenOptions::new()
                .append(true)
                .open(a.join(&*name))
                .unwrap();
            std::io::Write::write_all(&mut file, &tail).unwrap();
            drop(file);
            data.extend_from_slice(&tail);
            assert_content(&b.join(&*name), data, "B reads f5 after an append on A");
        }

        // Truncation on A: B sees the shorter file, and a regrown one reads zeros past the cut.
        {
            let (name, data) = &mut contents[7];
            let file = OpenOptions::new().write(true).open(a.join(&*name)).unwrap();
            file.set_len(5 * MIB as u64 + 5).unwrap();
            drop(file);
            data.truncate(5 * MIB + 5);
            assert_content(&b.join(&*name), data, "B reads f7 after a truncate on A");
            let file = OpenOptions::new().write(true).open(a.join(&*name)).unwrap();
            file.write_all_at(b"END", 6 * MIB as u64).unwrap();
            drop(file);
            data.resize(6 * MIB, 0);
            data.extend_from_slice(b"END");
            assert_content(
                &b.join(&*name),
                data,
                "B reads f7 after regrowing it past a hole on A",
            );
        }

        // O_TRUNC rewrite on A of a file B read before.
        {
            let (name, data) = &mut contents[6];
            let fresh = Pattern::new(6006).bytes(0, 12345);
            fs::write(a.join(&*name), &fresh).unwrap();
            *data = fresh;
            assert_content(
                &b.join(&*name),
                data,
                "B reads f6 after an O_TRUNC rewrite on A",
            );
        }

        // And the other way round: B writes, A reads.
        let back = Pattern::new(77).bytes(0, 2 * MIB + 5);
        fs::write(b.join("from-b"), &back).unwrap();
        assert_content(
            &a.join("from-b"),
            &back,
            "A reads a file written and closed on B",
        );

        // fsync (without close) publishes too: A's open handle, B's new open.
        let mut file = File::create(a.join("fsynced")).unwrap();
        let synced = Pattern::new(88).bytes(0, 700_000);
        std::io::Write::write_all(&mut file, &synced).unwrap();
        file.sync_all().unwrap();
        assert_content(
            &b.join("fsynced"),
            &synced,
            "B reads a file fsync'ed (not yet closed) on A",
        );
        drop(file);

        // Everything again, once more from B after all the changes.
        for (name, data) in &contents {
            assert_content(&b.join(name), data, &format!("B reads the final {name}"));
        }
        assert_nothing_uploaded(&stack);
        b.unmount();
        a.unmount();
    });
}

#[test]
fn namespace_changes_are_seen_by_the_other_mount() {
    timed("namespace_changes_are_seen_by_the_other_mount", || {
        let stack = held_back_stack("fuse-two-names");
        let a = stack.mount("a").no_cache().start();
        let b = stack.mount("b").no_cache().start();

        fs::create_dir(a.join("dir")).unwrap();
        fs::write(a.join("dir/first"), b"first").unwrap();
        fs::write(a.join("dir/victim"), b"the victim's old bytes").unwrap();
        assert_eq!(names(&b.join("dir")), ["first", "victim"]);
        assert_content(
            &b.join("dir/victim"),
            b"the victim's old bytes",
            "B reads victim",
        );

        // Rename on A: B no longer finds the old name, finds the new one.
        fs::rename(a.join("dir/first"), a.join("dir/renamed")).unwrap();
        assert_errno(
            fs::metadata(b.join("dir/first")),
            libc::ENOENT,
            "B stats the old name",
        );
        assert_errno(
            File::open(b.join("dir/first")),
            libc::ENOENT,
            "B opens the old name",
        );
        assert_content(&b.join("dir/renamed"), b"first", "B reads the renamed file");
        assert_eq!(names(&b.join("dir")), ["renamed", "victim"]);

        // Rename over a file B has read: B reads the replacement.
        fs::write(a.join("replacement"), b"new").unwrap();
        fs::rename(a.join("replacement"), a.join("dir/victim")).unwrap();
        assert_content(
            &b.join("dir/victim"),
            b"new",
            "B reads a file replaced by a rename on A",
        );
        assert_errno(
            fs::metadata(b.join("replacement")),
            libc::ENOENT,
            "B stats the rename's source",
        );

        // Unlink on A: gone on B.
        fs::remove_file(a.join("dir/renamed")).unwrap();
        assert_errno(
            fs::metadata(b.join("dir/renamed")),
            libc::ENOENT,
            "B stats an unlinked file",
        );
        assert_eq!(names(&b.join("dir")), ["victim"]);

        // Directory rename and removal.
        fs::rename(a.join("dir"), a.join("dir2")).unwrap();
        assert_errno(
            fs::metadata(b.join("dir")),
            libc::ENOENT,
            "B stats a renamed dir's old name",
        );
        assert_content(
            &b.join("dir2/victim"),
            b"new",
            "B reads through a renamed dir",
        );
        fs::remove_file(a.join("dir2/victim")).unwrap();
        fs::remove_dir(a.join("dir2")).unwrap();
        assert_errno(
            fs::metadata(b.join("dir2")),
            libc::ENOENT,
            "B stats a removed dir",
        );

        // Links, symlinks, modes and xattrs set on A.
        fs::write(a.join("orig"), b"o").unwrap();
        fs::hard_link(a.join("orig"), a.join("link")).unwrap();
        symlink("orig", a.join("sym")).unwrap();
        fs::set_permissions(a.join("orig"), fs::Permissions::from_mode(0o600)).unwrap();
        let (name, value) = (CString::new("user.k").unwrap(), b"v1");
        let path = CString::new(a.join("orig").as_os_str().as_bytes()).unwrap();
        assert_eq!(
            unsafe { libc::setxattr(path.as_ptr(), name.as_ptr(), value.as_ptr().cast(), 2, 0) },
            0
        );
        let meta = fs::metadata(b.join("link")).unwrap();
        assert_eq!(meta.nlink(), 2, "B sees the link count");
        assert_eq!(meta.mode() & 0o777, 0o600, "B sees the mode");
        assert_eq!(fs::read_link(b.join("sym")).unwrap(), Path::new("orig"));
        let bpath = CString::new(b.join("orig").as_os_str().as_bytes()).unwrap();
        let mut buf = [0u8; 16];
        let n = unsafe {
            libc::getxattr(
                bpath.as_ptr(),
                name.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        assert_eq!(n, 2, "B getxattr: {}", std::io::Error::last_os_error());
        assert_eq!(&buf[..2], b"v1");
        fs::remove_file(a.join("orig")).unwrap();
        assert_eq!(
            fs::metadata(b.join("link")).unwrap().nlink(),
            1,
            "B sees the count drop"
        );
        assert_eq!(names(b.path()), ["link", "sym"]);
        b.unmount();
        a.unmount();
    });
}

/// A directory mount A made is leased to it: A answers lookups of names it did not add there
/// without asking (its metrics count them). Whatever mount B adds to it (a file, a directory,
/// a symlink, a hard link, a rename) recalls the lease first, so A finds each at once, and the
/// file's bytes after B's close.
#[test]
fn names_another_mount_adds_to_a_leased_directory_are_seen_at_once() {
    use stagefs_tests::prometheus::{scrape, value};
    timed(
        "names_another_mount_adds_to_a_leased_directory_are_seen_at_once",
        || {
            let stack = held_back_stack("fuse-two-leases");
            let metrics: std::net::SocketAddr =
                format!("127.0.0.1:{}", stagefs_tests::s3::free_port())
                    .parse()
                    .unwrap();
            let a = stack
                .mount("a")
                .no_cache()
                .args(["--metrics-listen", &metrics.to_string()])
                .start();
            let b = stack.mount("b").no_cache().start();
            let answered = || value(&scrape(metrics), "stagefs_dir_lease_absent_answers_total");

            fs::create_dir(a.join("d")).unwrap();
            fs::create_dir(a.join("e")).unwrap();
            fs::write(a.join("d/own"), b"a's own").unwrap();
            let before = answered();
            for name in ["x", "sub", "sym", "link", "moved"] {
                assert_errno(
                    fs::metadata(a.join("d").join(name)),
                    libc::ENOENT,
                    "A stats",
                );
            }
            assert_eq!(answered(), before + 5.0, "A answered from its lease");
            assert_content(&a.join("d/own"), b"a's own", "A reads its own file");

            fs::write(b.join("d/x"), b"written on B").unwrap();
            assert_content(&a.join("d/x"), b"written on B", "A reads B's file");
            fs::create_dir(b.join("e/sub")).unwrap();
            assert!(
                fs::metadata(a.join("e/sub")).unwrap().is_dir(),
                "A sees B's dir"
            );
            fs::write(b.join("other"), b"to be moved").unwrap();
            fs::rename(b.join("other"), b.join("d/moved")).unwrap();
            assert_content(&a.join("d/moved"), b"to be moved", "A reads B's rename");
            symlink("x", b.join("d/sym")).unwrap();
            assert_eq!(fs::read_link(a.join("d/sym")).unwrap(), Path::new("x"));
            fs::hard_link(b.join("d/x"), b.join("d/link")).unwrap();
            assert_eq!(fs::metadata(a.join("d/link")).unwrap().nlink(), 2);
            assert_errno(
                fs::metadata(a.join("d/absent")),
                libc::ENOENT,
                "A stats a name nobody made",
            );
            assert_eq!(
                names(&a.join("d")),
                ["link", "moved", "own", "sym", "x"],
                "A lists the directory"
            );
            b.unmount();
            a.unmount();
        },
    );
}

#[test]
fn unlink_on_one_mount_keeps_the_other_mounts_open_file_readable() {
    timed(
        "unlink_on_one_mount_keeps_the_other_mounts_open_file_readable",
        || {
            let stack = held_back_stack("fuse-two-unlink-open");
            let a = stack.mount("a").no_cache().start();
            let b: Mount = stack.mount("b").no_cache().start();
            let data = Pattern::new(4242).bytes(0, 5 * MIB + 99);
            fs::write(a.join("shared"), &data).unwrap();
            let reader = File::open(b.join("shared")).unwrap();
            fs::remove_file(a.join("shared")).unwrap();
            assert_errno(
                fs::metadata(b.join("shared")),
                libc::ENOENT,
                "B stats the unlinked name",
            );
            // B's handle, opened before the unlink, still reads every byte.
            let mut got = vec![0u8; data.len()];
            reader.read_exact_at(&mut got, 0).unwrap_or_else(|e| {
                panic!("B reads through a handle opened before A unlinked the file: {e}")
            });
            assert!(
                got == data,
                "B's open handle reads other bytes after the unlink on A"
            );
            drop(reader);
            b.unmount();
            a.unmount();
        },
    );
}
