//! POSIX behaviour through a real FUSE mount (`stagefs mount --foreground`), with plain `std::fs`,
//! `std::os::unix` and `libc` calls: the errno Linux file systems give, link counts, holes,
//! `O_APPEND`/`O_TRUNC`, xattrs, permissions (`default_permissions`), a 200 MiB file spanning
//! chunks, 10,000 files in one directory, read-only mounts and a mount of a dead gateway.
//!
//! Every test starts its own S3 server, gateway and mount(s) ([`FuseStack`]); the mounts are
//! unmounted when the test ends (also when it fails).

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, FileExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use stagefs_tests::{
    assert_errno, dir_names as names, is_fuse_mounted, mount_command, FuseStack, Pattern, TestDir,
};

const MIB: u64 = 1 << 20;

fn stack(name: &str) -> FuseStack {
    FuseStack::start(name, |gateway| gateway)
}

fn timed<T>(name: &str, body: impl FnOnce() -> T) -> T {
    let started = Instant::now();
    let value = body();
    eprintln!(
        "[stagefs-tests] {name}: passed in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    value
}

#[test]
fn files_and_directories() {
    timed("files_and_directories", || {
        let stack = stack("fuse-files");
        let mnt = stack.mount("mnt").start();

        // create / write / close, then read back on a new open.
        let path = mnt.join("hello.txt");
        let mut file = File::create(&path).unwrap();
        file.write_all(b"hello, stagefs\n").unwrap();
        drop(file);
        assert_eq!(fs::read(&path).unwrap(), b"hello, stagefs\n");
        let meta = fs::metadata(&path).unwrap();
        assert!(meta.is_file());
        assert_eq!(meta.len(), 15);
        assert_eq!(meta.nlink(), 1);

        // Read and write through one handle, positioned I/O.
        let rw = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        rw.write_all_at(b"HELLO", 0).unwrap();
        let mut buf = [0u8; 15];
        rw.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(&buf, b"HELLO, stagefs\n");
        drop(rw);
        assert_eq!(fs::read(&path).unwrap(), b"HELLO, stagefs\n");

        // An empty file.
        File::create(mnt.join("empty")).unwrap();
        assert_eq!(fs::metadata(mnt.join("empty")).unwrap().len(), 0);
        assert_eq!(fs::read(mnt.join("empty")).unwrap(), b"");

        // O_EXCL on an existing file.
        assert_errno(
            OpenOptions::new().write(true).create_new(true).open(&path),
            libc::EEXIST,
            "create_new over an existing file",
        );
        // Opening a missing file.
        assert_errno(
            File::open(mnt.join("missing")),
            libc::ENOENT,
            "open a missing file",
        );

        // mkdir, nested dirs, readdir.
        fs::create_dir(mnt.join("d")).unwrap();
        fs::create_dir_all(mnt.join("d/e/f")).unwrap();
        fs::write(mnt.join("d/one"), b"1").unwrap();
        fs::write(mnt.join("d/two"), b"22").unwrap();
        assert!(fs::metadata(mnt.join("d/e/f")).unwrap().is_dir());
        assert_eq!(names(&mnt.join("d")), ["e", "one", "two"]);
        assert_eq!(names(mnt.path()), ["d", "empty", "hello.txt"]);
        assert_errno(
            fs::create_dir(mnt.join("d")),
            libc::EEXIST,
            "mkdir over an existing dir",
        );
        // A directory's link count: 2 + one per subdirectory.
        assert_eq!(
            fs::metadata(mnt.join("d")).unwrap().nlink(),
            3,
            "nlink of d (has e)"
        );
        // readdir sees each entry's type.
        for entry in fs::read_dir(mnt.join("d")).unwrap() {
            let entry = entry.unwrap();
            let want_dir = entry.file_name() == "e";
            assert_eq!(
                entry.file_type().unwrap().is_dir(),
                want_dir,
                "{:?}",
                entry.file_name()
            );
        }

        // unlink, rmdir.
        fs::remove_file(mnt.join("d/one")).unwrap();
        assert_errno(
            fs::metadata(mnt.join("d/one")),
            libc::ENOENT,
            "stat after unlink",
        );
        assert_errno(
            fs::remove_file(mnt.join("d/one")),
            libc::ENOENT,
            "unlink twice",
        );
        assert_errno(
            fs::remove_file(mnt.join("d/e")),
            libc::EISDIR,
            "unlink of a directory",
        );
        assert_errno(
            fs::remove_dir(mnt.join("d/two")),
            libc::ENOTDIR,
            "rmdir of a file",
        );
        fs::remove_dir(mnt.join("d/e/f")).unwrap();
        fs::remove_dir(mnt.join("d/e")).unwrap();
        assert_eq!(names(&mnt.join("d")), ["two"]);
        assert_eq!(fs::metadata(mnt.join("d")).unwrap().nlink(), 2);

        // rmdir of a non-empty directory: ENOTEMPTY, and nothing is removed.
        assert_errno(
            fs::remove_dir(mnt.join("d")),
            libc::ENOTEMPTY,
            "rmdir of a non-empty dir",
        );
        assert_eq!(fs::read(mnt.join("d/two")).unwrap(), b"22");

        // chmod and utimes round-trip.
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o7777, 0o640);
        let when = std::time::UNIX_EPOCH + Duration::from_secs(1_600_000_000);
        File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(when)
            .unwrap();
        assert_eq!(fs::metadata(&path).unwrap().modified().unwrap(), when);

        // statfs answers.
        let c = CString::new(mnt.path().as_os_str().as_bytes()).unwrap();
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        assert_eq!(
            unsafe { libc::statvfs(c.as_ptr(), &mut st) },
            0,
            "statvfs: {}",
            std::io::Error::last_os_error()
        );
        assert!(
            st.f_bsize > 0 && st.f_blocks > 0,
            "statvfs: bsize {} blocks {}",
            st.f_bsize,
            st.f_blocks
        );

        mnt.unmount();
    });
}

#[test]
fn rename_semantics() {
    timed("rename_semantics", || {
        let stack = stack("fuse-rename");
        let mnt = stack.mount("mnt").start();

        // Plain rename.
        fs::write(mnt.join("a"), b"content of a").unwrap();
        fs::rename(mnt.join("a"), mnt.join("b")).unwrap();
        assert_errno(
            fs::metadata(mnt.join("a")),
            libc::ENOENT,
            "old name after rename",
        );
        assert_eq!(fs::read(mnt.join("b")).unwrap(), b"content of a");

        // Rename over an existing file replaces its content (and its inode).
        fs::write(mnt.join("target"), b"the old, longer content of target").unwrap();
        let old_ino = fs::metadata(mnt.join("target")).unwrap().ino();
        let new_ino = fs::metadata(mnt.join("b")).unwrap().ino();
        fs::rename(mnt.join("b"), mnt.join("target")).unwrap();
        assert_eq!(fs::read(mnt.join("target")).unwrap(), b"content of a");
        let meta = fs::metadata(mnt.join("target")).unwrap();
        assert_eq!(meta.len(), 12);
        assert_eq!(meta.ino(), new_ino);
        assert_ne!(meta.ino(), old_ino);
        assert_eq!(names(mnt.path()), ["target"]);

        // Rename across directories.
        fs::create_dir(mnt.join("x")).unwrap();
        fs::create_dir(mnt.join("y")).unwrap();
        fs::write(mnt.join("x/f"), b"moving").unwrap();
        fs::rename(mnt.join("x/f"), mnt.join("y/g")).unwrap();
        assert_eq!(names(&mnt.join("x")), Vec::<String>::new());
        assert_eq!(fs::read(mnt.join("y/g")).unwrap(), b"moving");

        // A directory into itself or its own subdirectory: EINVAL, nothing moves.
        fs::create_dir_all(mnt.join("x/sub")).unwrap();
        assert_errno(
            fs::rename(mnt.join("x"), mnt.join("x/inside")),
            libc::EINVAL,
            "rename x -> x/inside",
        );
        assert_errno(
            fs::rename(mnt.join("x"), mnt.join("x/sub/deeper")),
            libc::EINVAL,
            "rename x -> x/sub/deeper",
        );
        assert!(fs::metadata(mnt.join("x/sub")).unwrap().is_dir());

        // Directory over a non-empty directory: ENOTEMPTY; over an empty one: replaced.
        fs::create_dir(mnt.join("full")).unwrap();
        fs::write(mnt.join("full/keep"), b"k").unwrap();
        assert_errno(
            fs::rename(mnt.join("y"), mnt.join("full")),
            libc::ENOTEMPTY,
            "dir over non-empty dir",
        );
        fs::create_dir(mnt.join("empty")).unwrap();
        fs::rename(mnt.join("y"), mnt.join("empty")).unwrap();
        assert_eq!(fs::read(mnt.join("empty/g")).unwrap(), b"moving");
        assert_errno(fs::metadata(mnt.join("y")), libc::ENOENT, "old dir name");

        // File over a directory: EISDIR; directory over a file: ENOTDIR.
        assert_errno(
            fs::rename(mnt.join("target"), mnt.join("full")),
            libc::EISDIR,
            "file over dir",
        );
        assert_errno(
            fs::rename(mnt.join("empty"), mnt.join("target")),
            libc::ENOTDIR,
            "dir over file",
        );
        // Missing source.
        assert_errno(
            fs::rename(mnt.join("nope"), mnt.join("nope2")),
            libc::ENOENT,
            "missing source",
        );

        // Renaming a file onto itself (a hard link of itself) changes nothing.
        fs::rename(mnt.join("target"), mnt.join("target")).unwrap();
        assert_eq!(fs::read(mnt.join("target")).unwrap(), b"content of a");

        // RENAME_NOREPLACE and RENAME_EXCHANGE.
        fs::write(mnt.join("p"), b"P").unwrap();
        fs::write(mnt.join("q"), b"QQ").unwrap();
        let renameat2 = |from: &str, to: &str, flags: libc::c_uint| -> std::io::Result<()> {
            let from = CString::new(mnt.join(from).as_os_str().as_bytes()).unwrap();
            let to = CString::new(mnt.join(to).as_os_str().as_bytes()).unwrap();
            let rc = unsafe {
                libc::renameat2(
                    libc::AT_FDCWD,
                    from.as_ptr(),
                    libc::AT_FDCWD,
                    to.as_ptr(),
                    flags,
                )
            };
            if rc == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        };
        assert_errno(
            renameat2("p", "q", libc::RENAME_NOREPLACE),
            libc::EEXIST,
            "RENAME_NOREPLACE",
        );
        renameat2("p", "q", libc::RENAME_EXCHANGE).unwrap();
        assert_eq!(fs::read(mnt.join("p")).unwrap(), b"QQ");
        assert_eq!(fs::read(mnt.join("q")).unwrap(), b"P");

        mnt.unmount();
    });
}

#[test]
fn unlink_of_an_open_file() {
    timed("unlink_of_an_open_file", || {
        let stack = stack("fuse-unlink-open");
        let mnt = stack.mount("mnt").start();
        let path = mnt.join("doomed");
        let data = Pattern::new(7).bytes(0, 3 * MIB as usize + 123);
        fs::write(&path, &data).unwrap();
        fs::write(mnt.join("other"), b"stays").unwrap();

        let mut reader = File::open(&path).unwrap();
        let writer = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        fs::remove_file(&path).unwrap();

        // Gone from the namespace...
        assert_errno(
            fs::metadata(&path),
            libc::ENOENT,
            "stat of the unlinked name",
        );
        assert_errno(File::open(&path), libc::ENOENT, "open of the unlinked name");
        assert_eq!(names(mnt.path()), ["other"]);
        // ...but still readable through the open handles.
        let mut back = Vec::new();
        reader.read_to_end(&mut back).unwrap();
        assert!(
            back == data,
            "read through the open handle after unlink differs ({} bytes, want {})",
            back.len(),
            data.len()
        );
        let meta = writer.metadata().unwrap();
        assert_eq!(meta.nlink(), 0, "fstat nlink of an unlinked file");
        assert_eq!(meta.len(), data.len() as u64);

        // ...and writable: the writes are visible through the other handle.
        writer.write_all_at(b"still alive", 100).unwrap();
        writer.sync_all().unwrap();
        let mut buf = [0u8; 11];
        reader.seek(SeekFrom::Start(100)).unwrap();
        reader.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"still alive");
        drop(writer);
        drop(reader);

        // A new file under the same name is a different, new file.
        fs::write(&path, b"new").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"new");
        mnt.unmount();
    });
}

#[test]
fn hard_links_and_symlinks() {
    timed("hard_links_and_symlinks", || {
        let stack = stack("fuse-links");
        let mnt = stack.mount("mnt").start();
        fs::create_dir(mnt.join("d")).unwrap();
        fs::write(mnt.join("orig"), b"shared bytes").unwrap();

        // Hard links share the inode and count.
        fs::hard_link(mnt.join("orig"), mnt.join("d/link")).unwrap();
        let a = fs::metadata(mnt.join("orig")).unwrap();
        let b = fs::metadata(mnt.join("d/link")).unwrap();
        assert_eq!(a.ino(), b.ino());
        assert_eq!(a.nlink(), 2);
        assert_eq!(b.nlink(), 2);
        fs::hard_link(mnt.join("orig"), mnt.join("link2")).unwrap();
        assert_eq!(fs::metadata(mnt.join("d/link")).unwrap().nlink(), 3);
        assert_errno(
            fs::hard_link(mnt.join("orig"), mnt.join("link2")),
            libc::EEXIST,
            "link over an existing name",
        );
        assert_errno(
            fs::hard_link(mnt.join("d"), mnt.join("dlink")),
            libc::EPERM,
            "hard link to a directory",
        );

        // A write through one name is read through the other.
        OpenOptions::new()
            .write(true)
            .open(mnt.join("d/link"))
            .unwrap()
            .write_all_at(b"SHARED", 0)
            .unwrap();
        assert_eq!(fs::read(mnt.join("orig")).unwrap(), b"SHARED bytes");

        // Unlinking names drops the count; the data lives while one name remains.
        fs::remove_file(mnt.join("orig")).unwrap();
        assert_eq!(fs::metadata(mnt.join("d/link")).unwrap().nlink(), 2);
        fs::remove_file(mnt.join("link2")).unwrap();
        let last = fs::metadata(mnt.join("d/link")).unwrap();
        assert_eq!(last.nlink(), 1);
        assert_eq!(last.ino(), a.ino());
        assert_eq!(fs::read(mnt.join("d/link")).unwrap(), b"SHARED bytes");

        // Symlinks: readlink gives the target as written, lstat sees the link, stat follows it.
        symlink("d/link", mnt.join("sym")).unwrap();
        assert_eq!(fs::read_link(mnt.join("sym")).unwrap(), Path::new("d/link"));
        let l = fs::symlink_metadata(mnt.join("sym")).unwrap();
        assert!(l.file_type().is_symlink());
        assert_eq!(
            l.len(),
            "d/link".len() as u64,
            "a symlink's size is its target's length"
        );
        assert_eq!(fs::metadata(mnt.join("sym")).unwrap().ino(), a.ino());
        assert_eq!(fs::read(mnt.join("sym")).unwrap(), b"SHARED bytes");
        // A symlink to a directory is followed in paths.
        symlink("d", mnt.join("dirsym")).unwrap();
        assert_eq!(fs::read(mnt.join("dirsym/link")).unwrap(), b"SHARED bytes");
        // An absolute, dangling symlink.
        symlink("/nonexistent/target", mnt.join("dangling")).unwrap();
        assert_eq!(
            fs::read_link(mnt.join("dangling")).unwrap(),
            Path::new("/nonexistent/target")
        );
        assert_errno(
            fs::metadata(mnt.join("dangling")),
            libc::ENOENT,
            "stat of a dangling symlink",
        );
        assert_errno(
            symlink("x", mnt.join("sym")),
            libc::EEXIST,
            "symlink over an existing name",
        );
        assert_errno(
            fs::read_link(mnt.join("d/link")),
            libc::EINVAL,
            "readlink of a regular file",
        );
        // Removing the symlink leaves the target.
        fs::remove_file(mnt.join("sym")).unwrap();
        assert_eq!(fs::read(mnt.join("d/link")).unwrap(), b"SHARED bytes");
        let mut listing = names(mnt.path());
        listing.sort();
        assert_eq!(listing, ["d", "dangling", "dirsym"]);

        mnt.unmount();
    });
}

#[test]
fn holes_append_and_truncate() {
    timed("holes_append_and_truncate", || {
        let stack = stack("fuse-holes");
        let mnt = stack.mount("mnt").start();

        // A hole inside one chunk and one across a chunk boundary (chunks are 64 MiB).
        let path = mnt.join("sparse");
        let file = File::create(&path).unwrap();
        file.write_all_at(b"start", 0).unwrap();
        file.write_all_at(b"middle", 10 * MIB).unwrap();
        let far = 150 * MIB + 7;
        file.write_all_at(b"end", far).unwrap();
        drop(file);
        assert_eq!(fs::metadata(&path).unwrap().len(), far + 3);
        let file = File::open(&path).unwrap();
        let read_at = |offset: u64, len: usize| {
            let mut buf = vec![0xAAu8; len];
            file.read_exact_at(&mut buf, offset).unwrap();
            buf
        };
        assert_eq!(read_at(0, 5), b"start");
        assert_eq!(read_at(10 * MIB, 6), b"middle");
        assert_eq!(read_at(far, 3), b"end");
        for (offset, len) in [
            (5, 4096),
            (MIB - 10, 20),
            (10 * MIB - 4096, 4096),
            (10 * MIB + 6, 65536),
            (64 * MIB - 100, 200),
            (100 * MIB, 1 << 20),
            (far - 4096, 4096),
        ] {
            let got = read_at(offset, len);
            assert!(
                got.iter().all(|&b| b == 0),
                "hole at {offset}..+{len} is not zeros"
            );
        }
        // Reading at and past the end.
        let mut buf = [0u8; 10];
        assert_eq!(file.read_at(&mut buf, far + 3).unwrap(), 0);
        assert_eq!(file.read_at(&mut buf, far + 1).unwrap(), 2);
        assert_eq!(&buf[..2], b"nd");
        drop(file);

        // O_APPEND: every write goes to the end, wherever the offset was.
        let log = mnt.join("log");
        fs::write(&log, b"abc").unwrap();
        let mut appender = OpenOptions::new().append(true).open(&log).unwrap();
        appender.write_all(b"def").unwrap();
        appender.seek(SeekFrom::Start(0)).unwrap();
        appender.write_all(b"ghi").unwrap();
        drop(appender);
        assert_eq!(fs::read(&log).unwrap(), b"abcdefghi");
        // Two appenders take turns; nothing is overwritten.
        let mut one = OpenOptions::new().append(true).open(&log).unwrap();
        let mut two = OpenOptions::new().append(true).open(&log).unwrap();
        for i in 0..5 {
            one.write_all(format!("<1:{i}>").as_bytes()).unwrap();
            two.write_all(format!("<2:{i}>").as_bytes()).unwrap();
        }
        drop(one);
        drop(two);
        let want: String = "abcdefghi".to_string()
            + &(0..5)
                .map(|i| format!("<1:{i}><2:{i}>"))
                .collect::<String>();
        assert_eq!(String::from_utf8(fs::read(&log).unwrap()).unwrap(), want);

        // O_TRUNC.
        let t = mnt.join("trunc");
        fs::write(&t, vec![b'x'; 100_000]).unwrap();
        let mut f = OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&t)
            .unwrap();
        assert_eq!(f.metadata().unwrap().len(), 0);
        f.write_all(b"xy").unwrap();
        drop(f);
        assert_eq!(fs::read(&t).unwrap(), b"xy");

        // set_len: shrinking drops bytes, growing again reads zeros (not the old bytes).
        let s = mnt.join("setlen");
        let data = Pattern::new(3).bytes(0, 2 * MIB as usize);
        fs::write(&s, &data).unwrap();
        let f = OpenOptions::new().read(true).write(true).open(&s).unwrap();
        f.set_len(5).unwrap();
        assert_eq!(f.metadata().unwrap().len(), 5);
        f.set_len(MIB + 20).unwrap();
        drop(f);
        let back = fs::read(&s).unwrap();
        assert_eq!(back.len() as u64, MIB + 20);
        assert_eq!(&back[..5], &data[..5]);
        assert!(
            back[5..].iter().all(|&b| b == 0),
            "bytes past a shrink came back after growing"
        );
        // truncate(2) by path (setattr without a handle), across a chunk.
        let c = CString::new(s.as_os_str().as_bytes()).unwrap();
        assert_eq!(
            unsafe { libc::truncate(c.as_ptr(), (70 * MIB) as libc::off_t) },
            0
        );
        assert_eq!(fs::metadata(&s).unwrap().len(), 70 * MIB);
        let f = File::open(&s).unwrap();
        let mut tail = vec![1u8; 4096];
        f.read_exact_at(&mut tail, 70 * MIB - 4096).unwrap();
        assert!(tail.iter().all(|&b| b == 0));
        drop(f);

        mnt.unmount();
    });
}

#[test]
fn bad_names_and_paths() {
    timed("bad_names_and_paths", || {
        let stack = stack("fuse-bad-names");
        let mnt = stack.mount("mnt").start();

        // 255 bytes is the longest name; 256 is ENAMETOOLONG for every kind of entry.
        let ok = "n".repeat(255);
        fs::write(mnt.join(&ok), b"longest").unwrap();
        assert_eq!(fs::read(mnt.join(&ok)).unwrap(), b"longest");
        let long = "n".repeat(256);
        assert_errno(
            File::create(mnt.join(&long)),
            libc::ENAMETOOLONG,
            "create with a 256-byte name",
        );
        assert_errno(
            fs::create_dir(mnt.join(&long)),
            libc::ENAMETOOLONG,
            "mkdir with a 256-byte name",
        );
        assert_errno(
            symlink("x", mnt.join(&long)),
            libc::ENAMETOOLONG,
            "symlink with a 256-byte name",
        );
        assert_errno(
            fs::rename(mnt.join(&ok), mnt.join(&long)),
            libc::ENAMETOOLONG,
            "rename to a 256-byte name",
        );
        assert_errno(
            fs::hard_link(mnt.join(&ok), mnt.join(&long)),
            libc::ENAMETOOLONG,
            "link with a 256-byte name",
        );
        assert_errno(
            fs::metadata(mnt.join(&long)),
            libc::ENAMETOOLONG,
            "lookup of a 256-byte name",
        );
        // Multi-byte characters count as bytes: 128 × 2 bytes = 256.
        assert_errno(
            File::create(mnt.join("é".repeat(128))),
            libc::ENAMETOOLONG,
            "create with a 256-byte UTF-8 name",
        );
        assert_eq!(names(mnt.path()), std::slice::from_ref(&ok));

        // A path through a regular file: ENOTDIR.
        fs::write(mnt.join("file"), b"f").unwrap();
        assert_errno(
            File::create(mnt.join("file/child")),
            libc::ENOTDIR,
            "create under a file",
        );
        assert_errno(
            fs::metadata(mnt.join("file/child")),
            libc::ENOTDIR,
            "stat under a file",
        );
        assert_errno(
            fs::create_dir(mnt.join("file/dir")),
            libc::ENOTDIR,
            "mkdir under a file",
        );
        assert_errno(
            fs::read_dir(mnt.join("file")).map(|_| ()),
            libc::ENOTDIR,
            "opendir of a file",
        );
        // Missing directories in the path.
        assert_errno(
            File::create(mnt.join("nodir/child")),
            libc::ENOENT,
            "create under a missing dir",
        );

        mnt.unmount();
    });
}

fn cstr(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).unwrap()
}

fn set_xattr(path: &Path, name: &str, value: &[u8], flags: i32) -> std::io::Result<()> {
    let name = CString::new(name).unwrap();
    let rc = unsafe {
        libc::setxattr(
            cstr(path).as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn get_xattr(path: &Path, name: &str) -> std::io::Result<Vec<u8>> {
    let name = CString::new(name).unwrap();
    let c = cstr(path);
    // Ask for the size first, as applications do.
    let size = unsafe { libc::getxattr(c.as_ptr(), name.as_ptr(), std::ptr::null_mut(), 0) };
    if size < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut buf = vec![0u8; size as usize];
    let got = unsafe {
        libc::getxattr(
            c.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if got < 0 {
        return Err(std::io::Error::last_os_error());
    }
    buf.truncate(got as usize);
    Ok(buf)
}

fn list_xattr(path: &Path) -> Vec<String> {
    let c = cstr(path);
    let size = unsafe { libc::listxattr(c.as_ptr(), std::ptr::null_mut(), 0) };
    assert!(
        size >= 0,
        "listxattr size: {}",
        std::io::Error::last_os_error()
    );
    let mut buf = vec![0u8; size as usize];
    let got = unsafe { libc::listxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert!(got >= 0, "listxattr: {}", std::io::Error::last_os_error());
    buf.truncate(got as usize);
    let mut names: Vec<String> = buf
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect();
    names.sort();
    names
}

fn remove_xattr(path: &Path, name: &str) -> std::io::Result<()> {
    let name = CString::new(name).unwrap();
    let rc = unsafe { libc::removexattr(cstr(path).as_ptr(), name.as_ptr()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[test]
fn extended_attributes() {
    timed("extended_attributes", || {
        let stack = stack("fuse-xattr");
        let mnt = stack.mount("mnt").start();
        let f = mnt.join("f");
        fs::write(&f, b"x").unwrap();
        fs::create_dir(mnt.join("d")).unwrap();

        assert_eq!(list_xattr(&f), Vec::<String>::new());
        assert_errno(
            get_xattr(&f, "user.missing"),
            libc::ENODATA,
            "getxattr of a missing name",
        );
        set_xattr(&f, "user.a", b"1", 0).unwrap();
        set_xattr(&f, "user.b", b"two\0with a nul", 0).unwrap();
        set_xattr(&f, "user.empty", b"", 0).unwrap();
        set_xattr(&mnt.join("d"), "user.on-dir", b"dir value", 0).unwrap();
        assert_eq!(get_xattr(&f, "user.a").unwrap(), b"1");
        assert_eq!(get_xattr(&f, "user.b").unwrap(), b"two\0with a nul");
        assert_eq!(get_xattr(&f, "user.empty").unwrap(), b"");
        assert_eq!(
            get_xattr(&mnt.join("d"), "user.on-dir").unwrap(),
            b"dir value"
        );
        assert_eq!(list_xattr(&f), ["user.a", "user.b", "user.empty"]);

        // Replace, create-only, replace-only.
        set_xattr(&f, "user.a", b"one", 0).unwrap();
        assert_eq!(get_xattr(&f, "user.a").unwrap(), b"one");
        assert_errno(
            set_xattr(&f, "user.a", b"x", libc::XATTR_CREATE),
            libc::EEXIST,
            "XATTR_CREATE on an existing name",
        );
        assert_errno(
            set_xattr(&f, "user.new", b"x", libc::XATTR_REPLACE),
            libc::ENODATA,
            "XATTR_REPLACE on a missing name",
        );
        set_xattr(&f, "user.a", b"uno", libc::XATTR_REPLACE).unwrap();
        assert_eq!(get_xattr(&f, "user.a").unwrap(), b"uno");

        // A buffer too small: ERANGE.
        let name = CString::new("user.b").unwrap();
        let mut small = [0u8; 2];
        let rc = unsafe {
            libc::getxattr(
                cstr(&f).as_ptr(),
                name.as_ptr(),
                small.as_mut_ptr().cast(),
                small.len(),
            )
        };
        assert_eq!(rc, -1);
        assert_eq!(
            std::io::Error::last_os_error().raw_os_error(),
            Some(libc::ERANGE)
        );

        // Remove.
        remove_xattr(&f, "user.a").unwrap();
        assert_errno(
            get_xattr(&f, "user.a"),
            libc::ENODATA,
            "getxattr after removexattr",
        );
        assert_errno(
            remove_xattr(&f, "user.a"),
            libc::ENODATA,
            "removexattr of a missing name",
        );
        assert_eq!(list_xattr(&f), ["user.b", "user.empty"]);

        // They survive a remount (stored in the metadata, not the client).
        mnt.unmount();
        let mnt = stack.mount("mnt").start();
        assert_eq!(
            get_xattr(&mnt.join("f"), "user.b").unwrap(),
            b"two\0with a nul"
        );
        assert_eq!(list_xattr(&mnt.join("f")), ["user.b", "user.empty"]);
        mnt.unmount();
    });
}

/// Runs `args` as uid/gid 65534 (nobody) with no supplementary groups; returns (success, stdout,
/// stderr).
fn as_nobody(args: &[&str]) -> (bool, String, String) {
    let output = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run setpriv");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Why the permission test cannot run here, if it cannot.
fn permission_test_blocker(dir: &Path) -> Option<String> {
    if unsafe { libc::geteuid() } != 0 {
        return Some("not running as root: cannot switch to another uid".into());
    }
    match Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(status) if status.success() => {}
        Ok(status) => return Some(format!("`setpriv --reuid=65534 ... true` failed: {status}")),
        Err(e) => return Some(format!("`setpriv` is unavailable: {e}")),
    }
    // uid 65534 must be able to reach the mount point.
    let mut at = Some(dir);
    while let Some(path) = at {
        let mode = fs::metadata(path).map(|m| m.mode()).unwrap_or(0);
        if mode & 0o001 == 0 {
            return Some(format!(
                "{} (mode {:o}) cannot be searched by other users, so uid 65534 cannot reach the mount",
                path.display(),
                mode & 0o7777
            ));
        }
        at = path.parent();
    }
    None
}

#[test]
fn permissions_are_enforced() {
    timed("permissions_are_enforced", || {
        let stack = stack("fuse-perms");
        // The scratch directory is private (0700); let uid 65534 through to the mount point.
        fs::set_permissions(stack.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        if let Some(reason) = permission_test_blocker(stack.dir.path()) {
            eprintln!("[stagefs-tests] SKIPPED permissions_are_enforced: {reason}");
            return;
        }
        // allow_other, so that the kernel lets other users in at all; default_permissions then
        // checks modes against their uid.
        let mnt = stack.mount("mnt").arg("--allow-other").start();
        fs::set_permissions(mnt.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let p = |name: &str| mnt.join(name).display().to_string();

        fs::write(mnt.join("public"), b"for everyone\n").unwrap();
        fs::set_permissions(mnt.join("public"), fs::Permissions::from_mode(0o644)).unwrap();
        fs::write(mnt.join("secret"), b"for nobody\n").unwrap();
        fs::set_permissions(mnt.join("secret"), fs::Permissions::from_mode(0o000)).unwrap();
        fs::write(mnt.join("private"), b"owner only\n").unwrap();
        fs::set_permissions(mnt.join("private"), fs::Permissions::from_mode(0o600)).unwrap();
        fs::create_dir(mnt.join("shared")).unwrap();
        fs::set_permissions(mnt.join("shared"), fs::Permissions::from_mode(0o777)).unwrap();
        fs::create_dir(mnt.join("closed")).unwrap();
        fs::write(mnt.join("closed/inner"), b"inner").unwrap();
        fs::set_permissions(mnt.join("closed"), fs::Permissions::from_mode(0o700)).unwrap();

        // Positive control: uid 65534 can read a 0644 file (the mount lets other users in).
        let (ok, out, err) = as_nobody(&["cat", &p("public")]);
        assert!(ok, "uid 65534 cannot read a 0644 file: {err}");
        assert_eq!(out, "for everyone\n");

        // Mode 000 and 0600 files of root: permission denied for uid 65534.
        for name in ["secret", "private"] {
            let (ok, out, err) = as_nobody(&["cat", &p(name)]);
            assert!(
                !ok,
                "uid 65534 read root's {name} ({:o}): {out:?}",
                fs::metadata(mnt.join(name)).unwrap().mode() & 0o777
            );
            assert!(
                err.contains("Permission denied"),
                "cat {name} as uid 65534: {err}"
            );
        }
        // Writing root's 0644 file: permission denied, the content is unchanged.
        let (ok, _, err) = as_nobody(&["sh", "-c", &format!("echo overwritten > {}", p("public"))]);
        assert!(
            !ok && err.contains("Permission denied"),
            "uid 65534 wrote root's 0644 file: {err}"
        );
        assert_eq!(fs::read(mnt.join("public")).unwrap(), b"for everyone\n");
        // chmod of a file it does not own: EPERM.
        let (ok, _, err) = as_nobody(&["chmod", "777", &p("public")]);
        assert!(
            !ok && err.contains("Operation not permitted"),
            "uid 65534 chmod'ed root's file: {err}"
        );
        // Creating in root's 0755 directory, deleting from it: permission denied.
        let (ok, _, err) = as_nobody(&["touch", &p("intruder")]);
        assert!(
            !ok && err.contains("Permission denied"),
            "uid 65534 created a file in a 0755 root dir: {err}"
        );
        assert_errno(
            fs::metadata(mnt.join("intruder")),
            libc::ENOENT,
            "the intruder file",
        );
        let (ok, _, err) = as_nobody(&["rm", "-f", &p("public")]);
        assert!(
            !ok && err.contains("Permission denied"),
            "uid 65534 removed a file from a 0755 root dir: {err}"
        );
        // A 0700 directory cannot be searched or listed.
        let (ok, _, err) = as_nobody(&["cat", &p("closed/inner")]);
        assert!(
            !ok && err.contains("Permission denied"),
            "uid 65534 went through a 0700 dir: {err}"
        );
        let (ok, _, err) = as_nobody(&["ls", &p("closed")]);
        assert!(
            !ok && err.contains("Permission denied"),
            "uid 65534 listed a 0700 dir: {err}"
        );

        // In a 0777 directory it may create; the new file belongs to it.
        let (ok, _, err) =
            as_nobody(&["sh", "-c", &format!("echo mine > {}", p("shared/nobodys"))]);
        assert!(ok, "uid 65534 cannot create in a 0777 dir: {err}");
        let meta = fs::metadata(mnt.join("shared/nobodys")).unwrap();
        assert_eq!(
            (meta.uid(), meta.gid()),
            (65534, 65534),
            "owner of a file created by uid 65534"
        );
        assert_eq!(fs::read(mnt.join("shared/nobodys")).unwrap(), b"mine\n");
        // ...and change the mode of its own file.
        let (ok, _, err) = as_nobody(&["chmod", "600", &p("shared/nobodys")]);
        assert!(ok, "uid 65534 cannot chmod its own file: {err}");
        assert_eq!(
            fs::metadata(mnt.join("shared/nobodys")).unwrap().mode() & 0o777,
            0o600
        );

        // root bypasses the mode bits (CAP_DAC_OVERRIDE), as on any Linux file system.
        assert_eq!(fs::read(mnt.join("secret")).unwrap(), b"for nobody\n");
        mnt.unmount();
    });
}

#[test]
fn file_of_200_mib_spanning_chunks() {
    timed("file_of_200_mib_spanning_chunks", || {
        let stack = FuseStack::start("fuse-200mib", |gateway| gateway.device_size("1GiB"));
        let mnt = stack.mount("a").start();
        let len = 200 * MIB;
        let pattern = Pattern::new(0x5EED_0200);
        let path = mnt.join("big");

        let started = Instant::now();
        let mut file = File::create(&path).unwrap();
        pattern.write_to(&mut file, len, MIB as usize).unwrap();
        file.sync_all().unwrap();
        drop(file);
        let wrote = started.elapsed();
        assert_eq!(fs::metadata(&path).unwrap().len(), len);

        // A fresh open on the same mount...
        let started = Instant::now();
        if let Err(e) = pattern.verify(&mut File::open(&path).unwrap(), len) {
            panic!("200 MiB file read back on mount a: {e}");
        }
        let read_a = started.elapsed();
        // ...and a second mount, which has nothing cached.
        let other = stack.mount("b").start();
        let started = Instant::now();
        if let Err(e) = pattern.verify(&mut File::open(other.join("big")).unwrap(), len) {
            panic!("200 MiB file read back on mount b: {e}");
        }
        let read_b = started.elapsed();
        // Random reads across the chunk boundary at 64 MiB.
        let file = File::open(other.join("big")).unwrap();
        for offset in [
            64 * MIB - 3,
            64 * MIB - 4096 * 3 + 17,
            128 * MIB - 1,
            len - 10,
        ] {
            let n = 10.min((len - offset) as usize);
            let mut buf = vec![0u8; n];
            file.read_exact_at(&mut buf, offset).unwrap();
            assert_eq!(buf, pattern.bytes(offset, n), "random read at {offset}");
        }
        drop(file);
        eprintln!(
            "[stagefs-tests] 200 MiB: write+fsync {:.1} s, read on a {:.1} s, read on b {:.1} s",
            wrote.as_secs_f64(),
            read_a.as_secs_f64(),
            read_b.as_secs_f64()
        );
        other.unmount();
        mnt.unmount();
    });
}

#[test]
fn ten_thousand_files_in_one_directory() {
    timed("ten_thousand_files_in_one_directory", || {
        const FILES: usize = 10_000;
        const THREADS: usize = 4;
        // Every 50th file holds its name; the others are empty.
        const WITH_DATA: usize = 50;
        let stack = stack("fuse-10k");
        // Metadata transactions are serialized in the gateway (~10 ms each with debug builds):
        // give this test's mounts more time than the default watchdog.
        let mnt = stack.mount("a").watchdog(Duration::from_secs(600)).start();
        let dir = mnt.join("many");
        fs::create_dir(&dir).unwrap();
        let started = Instant::now();
        std::thread::scope(|scope| {
            for t in 0..THREADS {
                let dir = &dir;
                scope.spawn(move || {
                    for i in (t..FILES).step_by(THREADS) {
                        let name = format!("file-{i:05}");
                        let path = dir.join(&name);
                        if i % WITH_DATA == 0 {
                            fs::write(&path, name.as_bytes())
                                .unwrap_or_else(|e| panic!("create {name}: {e}"));
                        } else {
                            // One metadata transaction per file (no open, flush, release):
                            // metadata operations are serialized in the gateway.
                            let c = cstr(&path);
                            let rc = unsafe { libc::mknod(c.as_ptr(), libc::S_IFREG | 0o644, 0) };
                            assert_eq!(rc, 0, "mknod {name}: {}", std::io::Error::last_os_error());
                        }
                    }
                });
            }
        });
        let created = started.elapsed();
        let started = Instant::now();
        let listed = names(&dir);
        let listing = started.elapsed();
        assert_eq!(
            listed.len(),
            FILES,
            "read_dir returned {} entries",
            listed.len()
        );
        let want: Vec<String> = (0..FILES).map(|i| format!("file-{i:05}")).collect();
        assert_eq!(listed, want, "the listing differs from the names created");
        // A second mount lists them too (from the metadata, not this client's memory), and a
        // sample reads back.
        let other = stack.mount("b").start();
        assert_eq!(
            names(&other.join("many")),
            want,
            "read_dir on a second mount"
        );
        for i in [0, 1, 50, 4999, 5000, 9950, 9999] {
            let name = format!("file-{i:05}");
            let want: &[u8] = if i % WITH_DATA == 0 {
                name.as_bytes()
            } else {
                b""
            };
            assert_eq!(
                fs::read(other.join("many").join(&name)).unwrap(),
                want,
                "{name}"
            );
        }
        eprintln!(
            "[stagefs-tests] 10,000 files: created in {:.1} s with {THREADS} threads, listed in {:.2} s",
            created.as_secs_f64(),
            listing.as_secs_f64()
        );
        other.unmount();
        mnt.unmount();
    });
}

#[test]
fn read_only_mount_refuses_changes() {
    timed("read_only_mount_refuses_changes", || {
        let stack = stack("fuse-ro");
        let rw = stack.mount("rw").start();
        fs::write(rw.join("existing"), b"read me").unwrap();
        fs::create_dir(rw.join("dir")).unwrap();
        rw.unmount();

        let ro = stack.mount("ro").read_only().start();
        let info = stagefs_tests::mount::fuse_mount_info(ro.path()).unwrap();
        assert!(
            info.split(' ')
                .nth(5)
                .unwrap()
                .split(',')
                .any(|o| o == "ro"),
            "mountinfo of a --read-only mount: {info}"
        );
        // Reads work.
        assert_eq!(fs::read(ro.join("existing")).unwrap(), b"read me");
        assert_eq!(names(ro.path()), ["dir", "existing"]);
        // Every change fails with EROFS and changes nothing.
        assert_errno(File::create(ro.join("new")), libc::EROFS, "create");
        assert_errno(
            OpenOptions::new().write(true).open(ro.join("existing")),
            libc::EROFS,
            "open for writing",
        );
        assert_errno(
            OpenOptions::new().append(true).open(ro.join("existing")),
            libc::EROFS,
            "open for appending",
        );
        assert_errno(fs::create_dir(ro.join("newdir")), libc::EROFS, "mkdir");
        assert_errno(fs::remove_file(ro.join("existing")), libc::EROFS, "unlink");
        assert_errno(fs::remove_dir(ro.join("dir")), libc::EROFS, "rmdir");
        assert_errno(
            fs::rename(ro.join("existing"), ro.join("moved")),
            libc::EROFS,
            "rename",
        );
        assert_errno(
            fs::hard_link(ro.join("existing"), ro.join("link")),
            libc::EROFS,
            "link",
        );
        assert_errno(symlink("existing", ro.join("sym")), libc::EROFS, "symlink");
        assert_errno(
            fs::set_permissions(ro.join("existing"), fs::Permissions::from_mode(0o600)),
            libc::EROFS,
            "chmod",
        );
        let c = cstr(&ro.join("existing"));
        assert_eq!(unsafe { libc::truncate(c.as_ptr(), 0) }, -1);
        assert_eq!(
            std::io::Error::last_os_error().raw_os_error(),
            Some(libc::EROFS),
            "truncate"
        );
        assert_errno(
            set_xattr(&ro.join("existing"), "user.x", b"1", 0),
            libc::EROFS,
            "setxattr",
        );
        assert_eq!(fs::read(ro.join("existing")).unwrap(), b"read me");
        assert_eq!(names(ro.path()), ["dir", "existing"]);
        ro.unmount();
    });
}

#[test]
fn mount_of_a_dead_gateway_fails_clearly() {
    timed("mount_of_a_dead_gateway_fails_clearly", || {
        let dir = TestDir::new("fuse-dead-gateway");
        let mountpoint = dir.join("mnt");
        fs::create_dir(&mountpoint).unwrap();
        let mountpoint = mountpoint.canonicalize().unwrap();
        // A port nothing listens on.
        let port = stagefs_tests::s3::free_port();
        let gateway = format!("127.0.0.1:{port}");
        let started = Instant::now();
        let stderr = stagefs_tests::failing_mount(&gateway, &mountpoint, &[]);
        assert!(
            stderr.contains("gateway") && stderr.contains(&gateway),
            "the message of a failed mount does not name the gateway {gateway}: {stderr:?}"
        );
        // The same, in the foreground.
        let output = mount_command(&gateway, &mountpoint)
            .arg("--foreground")
            .output()
            .expect("run stagefs mount --foreground");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            !output.status.success(),
            "foreground mount of a dead gateway: {}",
            output.status
        );
        assert!(
            stderr.contains(&gateway),
            "foreground mount of a dead gateway: {stderr:?}"
        );
        assert!(!is_fuse_mounted(&mountpoint));
        eprintln!("[stagefs-tests] dead gateway message: {}", stderr.trim());
        // It fails fast (the connect timeout), not after minutes.
        assert!(started.elapsed() < Duration::from_secs(30));
    });
}
