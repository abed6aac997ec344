//! Many clients, locks: `flock` and `fcntl` locks hold across two real mounts of one gateway,
//! because they live in the metadata engine.
//!
//! * exclusive locks exclude each other across mounts, shared ones coexist, byte ranges that do
//!   not overlap coexist and overlapping ones exclude; `F_GETLK` on one mount sees the other's;
//! * a `F_SETLKW` blocked on B is granted once A unlocks;
//! * SIGKILL of a process holding a lock releases it (its files are closed), and one killed while
//!   it waits for a lock dies at once and gets nothing;
//! * a handled signal (an alarm) ends a wait for a `flock` or an `fcntl` lock with EINTR, and the
//!   interrupted waiter holds nothing;
//! * a counter file incremented under `flock` by writers on both mounts ends at exactly the number
//!   of increments;
//! * SIGKILL of a whole mount releases its locks once its session expires (`--heartbeat-interval
//!   1s`: 3 s);
//! * across two gateways on one PostgreSQL database: exclusion, a blocked `flock` granted, and
//!   the counter.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use stagefs_tests::*;

fn open_rw(path: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

/// A new empty file `name`, made through mount `a` and opened read-write on `a` and on `b`.
fn one_file_on_both(a: &Mount, b: &Mount, name: &str) -> (File, File) {
    std::fs::write(a.join(name), b"").unwrap();
    (open_rw(&a.join(name)), open_rw(&b.join(name)))
}

/// `flock(2)`; the errno on failure.
fn flock(file: &File, operation: i32) -> Result<(), i32> {
    // SAFETY: flock on a descriptor this File owns.
    let rc = unsafe { libc::flock(file.as_raw_fd(), operation) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    }
}

/// `fcntl(cmd)` with a lock of `kind` over `len` bytes from `start` (0: to the end of the file);
/// the lock `F_GETLK` answered, or the errno.
fn fcntl_lock(file: &File, cmd: i32, kind: i32, start: i64, len: i64) -> Result<libc::flock, i32> {
    // SAFETY: an all-zero flock is a valid value to fill in.
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = kind as libc::c_short;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    lock.l_start = start;
    lock.l_len = len;
    // SAFETY: fcntl on a descriptor this File owns, with a flock it may read and write.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), cmd, &mut lock) };
    if rc == 0 {
        Ok(lock)
    } else {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    }
}

/// Waits until `check` holds, for at most `limit`.
fn eventually(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A child process group that takes an exclusive `flock` on `path` and holds it until killed
/// ([`kill_group`]); returns once it holds the lock.
fn lock_holder(path: &Path) -> Child {
    use std::os::unix::process::CommandExt;
    let mut child = Command::new("flock")
        .args([
            "-x",
            path.to_str().unwrap(),
            "-c",
            "echo locked; exec sleep 600",
        ])
        .stdout(Stdio::piped())
        .process_group(0)
        .spawn()
        .expect("flock(1) from util-linux");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "locked", "the holder took its lock");
    child
}

/// SIGKILL to the holder's whole group (`flock` and the command that inherited its descriptor).
fn kill_group(child: &mut Child) {
    let group = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
    let _ = child.wait();
}

#[test]
fn locks_hold_across_mounts() {
    let stack = FuseStack::start("locks", |gateway| gateway);
    let a = stack.mount("a").start();
    let b = stack.mount("b").start();
    let (on_a, on_b) = one_file_on_both(&a, &b, "lockfile");

    // flock: exclusive excludes, shared coexist, an unlock lets the other in.
    flock(&on_a, libc::LOCK_EX).unwrap();
    assert_eq!(
        flock(&on_b, libc::LOCK_EX | libc::LOCK_NB),
        Err(libc::EWOULDBLOCK),
        "an exclusive flock on A keeps B out"
    );
    assert_eq!(
        flock(&on_b, libc::LOCK_SH | libc::LOCK_NB),
        Err(libc::EWOULDBLOCK)
    );
    flock(&on_a, libc::LOCK_SH).unwrap();
    flock(&on_b, libc::LOCK_SH | libc::LOCK_NB).expect("shared flocks coexist");
    assert_eq!(
        flock(&on_a, libc::LOCK_EX | libc::LOCK_NB),
        Err(libc::EWOULDBLOCK)
    );
    flock(&on_b, libc::LOCK_UN).unwrap();
    flock(&on_a, libc::LOCK_EX | libc::LOCK_NB).expect("B let go: A upgrades");
    flock(&on_a, libc::LOCK_UN).unwrap();

    // fcntl byte ranges: disjoint ranges coexist, overlapping ones exclude, F_GETLK tells.
    std::fs::write(a.join("ranges"), vec![0u8; 4096]).unwrap();
    let ranges_a = open_rw(&a.join("ranges"));
    let ranges_b = open_rw(&b.join("ranges"));
    fcntl_lock(&ranges_a, libc::F_SETLK, libc::F_WRLCK, 0, 100).unwrap();
    fcntl_lock(&ranges_b, libc::F_SETLK, libc::F_WRLCK, 100, 100).expect("a disjoint range on B");
    assert_eq!(
        fcntl_lock(&ranges_b, libc::F_SETLK, libc::F_RDLCK, 50, 10).err(),
        Some(libc::EAGAIN),
        "overlapping A's write lock"
    );
    let seen = fcntl_lock(&ranges_b, libc::F_GETLK, libc::F_WRLCK, 0, 0).unwrap();
    assert_eq!(
        (i32::from(seen.l_type), seen.l_start, seen.l_len),
        (libc::F_WRLCK, 0, 100),
        "F_GETLK on B reports A's lock"
    );
    fcntl_lock(&ranges_a, libc::F_SETLK, libc::F_RDLCK, 0, 100).unwrap();
    fcntl_lock(&ranges_b, libc::F_SETLK, libc::F_RDLCK, 0, 50).expect("read locks coexist");

    // A blocked F_SETLKW on B is granted when A unlocks.
    fcntl_lock(&ranges_b, libc::F_SETLK, libc::F_UNLCK, 0, 0).unwrap();
    fcntl_lock(&ranges_a, libc::F_SETLK, libc::F_WRLCK, 0, 0).unwrap();
    let waiter = std::thread::spawn(move || {
        let started = Instant::now();
        fcntl_lock(&ranges_b, libc::F_SETLKW, libc::F_WRLCK, 10, 10).map(|_| started.elapsed())
    });
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !waiter.is_finished(),
        "F_SETLKW waits while A holds the range"
    );
    fcntl_lock(&ranges_a, libc::F_SETLK, libc::F_UNLCK, 0, 0).unwrap();
    let waited = waiter.join().unwrap().expect("granted once A unlocked");
    assert!(waited >= Duration::from_millis(500), "{waited:?}");

    // A process killed while it waits for a lock dies (the mount gives its request up), and
    // gets nothing: the lock goes to the next one once its holder lets go.
    flock(&on_a, libc::LOCK_EX).unwrap();
    let mut waiting = Command::new("flock")
        .args(["-x", b.join("lockfile").to_str().unwrap(), "true"])
        .spawn()
        .expect("flock(1) from util-linux");
    std::thread::sleep(Duration::from_millis(500));
    assert!(waiting.try_wait().unwrap().is_none(), "flock(1) on B waits");
    waiting.kill().unwrap();
    eventually("the killed waiter exited", Duration::from_secs(10), || {
        waiting.try_wait().unwrap().is_some()
    });
    flock(&on_a, libc::LOCK_UN).unwrap();
    flock(&on_b, libc::LOCK_EX | libc::LOCK_NB).expect("the killed waiter holds nothing");
    flock(&on_b, libc::LOCK_UN).unwrap();

    // SIGKILL of the process holding a lock releases it.
    let mut holder = lock_holder(&a.join("lockfile"));
    assert_eq!(
        flock(&on_b, libc::LOCK_EX | libc::LOCK_NB),
        Err(libc::EWOULDBLOCK)
    );
    kill_group(&mut holder);
    eventually(
        "the killed holder's lock released",
        Duration::from_secs(10),
        || flock(&on_b, libc::LOCK_EX | libc::LOCK_NB).is_ok(),
    );
    flock(&on_b, libc::LOCK_UN).unwrap();
    drop((on_a, on_b));
}

/// Two writers per mount, each a shell loop: take `counter.lock` with flock(1), read `counter`,
/// write the next number, let go. The counter must end at exactly the number of increments.
fn assert_counter_under_flock(mounts: [&Mount; 2]) {
    const INCREMENTS: usize = 25;
    std::fs::write(mounts[0].join("counter"), b"0\n").unwrap();
    std::fs::write(mounts[0].join("counter.lock"), b"").unwrap();
    let script = format!(
        "for i in $(seq {INCREMENTS}); do flock -x \"$1.lock\" sh -c 'n=$(cat \"$1\"); echo $((n + 1)) > \"$1\"' sh \"$1\" || exit 1; done"
    );
    let writers: Vec<Child> = mounts
        .iter()
        .flat_map(|m| [m.join("counter"), m.join("counter")])
        .map(|counter| {
            Command::new("sh")
                .args(["-c", &script, "writer", counter.to_str().unwrap()])
                .spawn()
                .unwrap()
        })
        .collect();
    for mut writer in writers {
        assert!(writer.wait().unwrap().success(), "a writer failed");
    }
    for mount in mounts {
        let counted: usize = std::fs::read_to_string(mount.join("counter"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_eq!(
            counted,
            4 * INCREMENTS,
            "every increment under the lock counted, seen from {}",
            mount.path().display()
        );
    }
}

#[test]
fn a_counter_incremented_under_flock_on_two_mounts_loses_no_increment() {
    let stack = FuseStack::start("locks-counter", |gateway| gateway);
    let (a, b) = (stack.mount("a").start(), stack.mount("b").start());
    assert_counter_under_flock([&a, &b]);
}

/// Two gateways on one PostgreSQL database: a lock taken through one holds against a mount of
/// the other, a blocked `flock` on B is granted once A lets go (B's gateway looks again every
/// second for releases elsewhere), and the flock counter loses nothing across gateways.
#[test]
fn locks_hold_across_gateways() {
    let cluster = GatewayCluster::start("locks-two-gateways", 2, |_, gateway| gateway);
    let a = cluster.mount(0, "a").start();
    let b = cluster.mount(1, "b").start();
    let (on_a, on_b) = one_file_on_both(&a, &b, "lockfile");
    flock(&on_a, libc::LOCK_EX).unwrap();
    assert_eq!(
        flock(&on_b, libc::LOCK_EX | libc::LOCK_NB),
        Err(libc::EWOULDBLOCK),
        "a lock taken through gateway A keeps a mount of gateway B out"
    );
    let waiter = std::thread::spawn(move || {
        let started = Instant::now();
        flock(&on_b, libc::LOCK_EX).map(|()| (started.elapsed(), on_b))
    });
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !waiter.is_finished(),
        "the flock on B waits while A holds it"
    );
    flock(&on_a, libc::LOCK_UN).unwrap();
    let (waited, on_b) = waiter.join().unwrap().expect("granted once A let go");
    eprintln!("a flock blocked on gateway B was granted {waited:?} after it was asked for");
    flock(&on_b, libc::LOCK_UN).unwrap();
    assert_counter_under_flock([&a, &b]);
}

#[test]
fn a_killed_mounts_locks_go_with_its_session() {
    let stack = FuseStack::start("locks-dead-mount", |gateway| {
        gateway.args(["--heartbeat-interval", "1s"])
    });
    let a = stack.mount("a").start();
    let b = stack.mount("b").start();
    std::fs::write(a.join("held"), b"").unwrap();
    let mut holder = lock_holder(&a.join("held"));
    let on_b = open_rw(&b.join("held"));
    assert_eq!(
        flock(&on_b, libc::LOCK_EX | libc::LOCK_NB),
        Err(libc::EWOULDBLOCK)
    );
    // The whole mount dies; its lock holder is left with a dead file system.
    let pid = a.pid().expect("the mount runs");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let killed = Instant::now();
    eventually(
        "the dead mount's lock released by session expiry",
        Duration::from_secs(30),
        || flock(&on_b, libc::LOCK_EX | libc::LOCK_NB).is_ok(),
    );
    eprintln!(
        "lock of a SIGKILLed mount released after {:?}",
        killed.elapsed()
    );
    kill_group(&mut holder);
}

/// Waits up to 60 s for `child` to exit (killing it after that) and returns its exit code.
fn exit_code_within(child: &mut Child, what: &str) -> Option<i32> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}: still waiting 60 s later: a signal does not interrupt a lock wait");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A thread waiting for a lock that another mount holds gives up with EINTR when it takes a
/// signal, and holds nothing afterwards: `flock -w 1` (a SIGALRM timer) for `flock`, and a
/// Python `lockf` whose alarm handler raises, for POSIX record locks.
#[test]
fn a_signal_interrupts_a_waiting_lock() {
    let stack = FuseStack::start("locks-signal", |gateway| gateway);
    let a = stack.mount("a").start();
    let b = stack.mount("b").start();
    let (on_a, on_b) = one_file_on_both(&a, &b, "signalled");
    let path = b.join("signalled");

    flock(&on_a, libc::LOCK_EX).unwrap();
    let mut waiter = Command::new("flock")
        .args(["-x", "-w", "1"])
        .arg(&path)
        .arg("true")
        .stderr(Stdio::null())
        .spawn()
        .expect("flock(1) from util-linux");
    assert_eq!(
        exit_code_within(&mut waiter, "flock -w 1"),
        Some(1),
        "flock(1) gives up when its timer fires"
    );
    flock(&on_a, libc::LOCK_UN).unwrap();
    flock(&on_b, libc::LOCK_EX | libc::LOCK_NB).expect("the interrupted waiter holds nothing");
    flock(&on_b, libc::LOCK_UN).unwrap();

    fcntl_lock(&on_a, libc::F_SETLK, libc::F_WRLCK, 0, 0).unwrap();
    let script = "import fcntl, signal, sys\n\
                  def expired(*_): raise TimeoutError\n\
                  signal.signal(signal.SIGALRM, expired)\n\
                  signal.alarm(1)\n\
                  f = open(sys.argv[1], 'r+')\n\
                  try:\n    fcntl.lockf(f, fcntl.LOCK_EX)\nexcept TimeoutError:\n    sys.exit(3)\n\
                  sys.exit(0)\n";
    let mut waiter = Command::new("python3")
        .args(["-c", script])
        .arg(&path)
        .spawn()
        .expect("python3");
    assert_eq!(
        exit_code_within(&mut waiter, "lockf with an alarm"),
        Some(3),
        "the alarm interrupts F_SETLKW"
    );
    fcntl_lock(&on_a, libc::F_SETLK, libc::F_UNLCK, 0, 0).unwrap();
    fcntl_lock(&on_b, libc::F_SETLK, libc::F_WRLCK, 0, 0)
        .expect("the interrupted waiter holds nothing");
    drop((on_a, on_b));
}
