//! A throwaway PostgreSQL server for tests and benchmarks.
//!
//! [`PgCluster::start`] makes a fresh cluster with Debian's `postgresql` binaries (the highest
//! `/usr/lib/postgresql/<version>/bin`, or the directory named by `STAGEFS_PG_BIN`) in a temporary
//! directory and serves it on 127.0.0.1, on a free port, with trust authentication for the
//! superuser `stagefs`. Tests share one per process ([`PgCluster::shared`]) and take a fresh
//! database each ([`PgCluster::fresh_database`]), so they neither depend on nor disturb any other
//! server.
//!
//! The server must not outlive the process that started it, even one killed by SIGKILL, which runs
//! no destructor. So the server is started by a small shell *watchdog* that holds the read end of a
//! pipe whose write end only this process holds: when the pipe closes, because the process called
//! [`PgCluster::stop`] or exited however it did, the watchdog shuts the server down and removes its
//! directory. The watchdog runs initdb too, so even a process killed while the cluster is still
//! being made leaves nothing behind.
//!
//! [`PgCluster::standby`] makes a hot standby of a cluster the same way, from a base backup
//! (`pg_basebackup`), streaming its WAL over a replication slot: real streaming replication, for
//! the mirror of another region.

use std::ffi::OsStr;
use std::fs::{self, DirBuilder, File};
use std::io::{self, ErrorKind, Write as _};
use std::net::TcpListener;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The superuser initdb creates; trust authentication lets it in without a password.
const USER: &str = "stagefs";
/// How long initdb plus the server's start may take.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Starts tried when the free port found was taken by someone else before the server bound it.
const START_ATTEMPTS: u32 = 4;
/// Lines of a log quoted in an error.
const LOG_TAIL_LINES: usize = 25;

/// The watchdog: `sh -c WATCHDOG stagefs-pg-watchdog DIR BIN SOURCE SERVER-ARGUMENTS...`, with the
/// pipe on its standard input. It runs initdb (or, with SOURCE a primary's port, takes a base
/// backup of that primary to be its standby), starts the server in the background and waits for the
/// pipe to close; then it asks for a fast shutdown (again every 0.1 s, as a server that has not
/// installed its handlers yet ignores it; an immediate shutdown after 30 s, SIGKILL after 60 s),
/// waits for the server to exit and removes DIR. Files in DIR tell the starting process how things
/// went: `initdb.failed`, or `server.exit` (the server's exit status, written when it exits).
const WATCHDOG: &str = r#"
set -u
dir=$1 bin=$2 source=$3
shift 3
exec 3<&0 </dev/null
if [ -z "$source" ]; then
    make() {
        "$bin/initdb" -D "$dir/data" --auth=trust --username=stagefs -E UTF8 --locale=C --no-sync
    }
else
    make() {
        "$bin/pg_basebackup" -h 127.0.0.1 -p "$source" -U stagefs -D "$dir/data" \
            --write-recovery-conf --wal-method=stream --create-slot --slot="standby_$$" \
            --checkpoint=fast --no-sync
    }
fi
if make >"$dir/initdb.log" 2>&1 3<&-; then
    "$bin/postgres" -D "$dir/data" "$@" >"$dir/server.log" 2>&1 3<&- &
    server=$!
    {
        while read -r _; do :; done
        n=0
        while [ ! -e "$dir/server.exit" ]; do
            signal=INT
            [ "$n" -ge 300 ] && signal=QUIT
            [ "$n" -ge 600 ] && signal=KILL
            kill -s "$signal" "$server" 2>/dev/null
            n=$((n + 1))
            sleep 0.1
        done
    } <&3 &
    stopper=$!
    wait "$server"
    echo "$?" >"$dir/server.exit"
    kill "$stopper" 2>/dev/null
else
    : >"$dir/initdb.failed"
fi
while read -r _; do :; done <&3
rm -rf "$dir"
"#;

/// A PostgreSQL server of its own: a fresh cluster (initdb) in a temporary directory, listening on
/// 127.0.0.1 on a free port. It is stopped and its directory removed when the process that started
/// it exits, however it exits (SIGKILL included).
#[derive(Debug)]
pub struct PgCluster {
    port: u16,
    dir: PathBuf,
    psql: PathBuf,
    /// The watchdog, whose standard input is the pipe that keeps the server alive; `None` once
    /// stopped.
    watchdog: Mutex<Option<Child>>,
}

/// How much the server cares about surviving a crash of the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PgDurability {
    /// `fsync` on, as in production (benchmarks).
    Durable,
    /// `fsync=off`, `synchronous_commit=off`, `full_page_writes=off`: tests that never crash the
    /// server.
    Fast,
}

impl PgCluster {
    /// Makes and starts a new cluster, and waits until it accepts connections.
    ///
    /// An error says what went wrong: [`ErrorKind::NotFound`] when PostgreSQL is not installed,
    /// otherwise the tail of initdb's or the server's log.
    pub fn start(durability: PgDurability) -> io::Result<PgCluster> {
        Self::start_from(None, durability)
    }

    /// Makes and starts a hot standby of this cluster: a base backup of it, then its WAL
    /// streamed and replayed as it comes (over a replication slot, so the primary keeps what the
    /// standby has not received). Read-only; waits until it accepts connections.
    pub fn standby(&self, durability: PgDurability) -> io::Result<PgCluster> {
        self.standby_via(self.port, durability)
    }

    /// Like [`PgCluster::standby`], reaching this cluster at `port` on 127.0.0.1 instead of its
    /// own: a proxy in front of it, which makes the primary as distant as the proxy says (the
    /// WAL stream of a mirror in another region).
    pub fn standby_via(&self, port: u16, durability: PgDurability) -> io::Result<PgCluster> {
        Self::start_from(Some(port), durability)
    }

    fn start_from(primary: Option<u16>, durability: PgDurability) -> io::Result<PgCluster> {
        // One base backup at a time in this process: each forces a checkpoint on the primary.
        static BACKUPS: Mutex<()> = Mutex::new(());
        let _one = primary.map(|_| BACKUPS.lock().unwrap_or_else(PoisonError::into_inner));
        let bin = bin_dir()?;
        let mut attempt = 1;
        loop {
            match Self::start_once(&bin, primary, durability) {
                Err(error) if error.kind() == ErrorKind::AddrInUse && attempt < START_ATTEMPTS => {
                    attempt += 1;
                }
                result => return result,
            }
        }
    }

    /// The one cluster of this process (Fast), started on first use.
    ///
    /// Never dropped, which is fine: its watchdog stops it when the process exits.
    ///
    /// # Panics
    ///
    /// If the cluster cannot start, with a message saying why (e.g. that PostgreSQL is not
    /// installed and `scripts/setup.sh` installs it).
    pub fn shared() -> &'static PgCluster {
        static SHARED: OnceLock<PgCluster> = OnceLock::new();
        SHARED.get_or_init(|| {
            PgCluster::start(PgDurability::Fast)
                .unwrap_or_else(|error| panic!("cannot start the test PostgreSQL server: {error}"))
        })
    }

    /// The TCP port it listens on, on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `postgres://stagefs@127.0.0.1:PORT/DATABASE`.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://{USER}@127.0.0.1:{}/{database}", self.port)
    }

    /// Creates a new, empty database whose name starts with `prefix` (its first 32 characters,
    /// lowercased, anything but `[a-z0-9_]` replaced by `_`) and returns its URL. Safe to call from
    /// many threads at once.
    pub fn fresh_database(&self, prefix: &str) -> io::Result<String> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        // Names are at most 63 bytes; this leaves room for the pid and the counter.
        let prefix: String = prefix
            .chars()
            .take(32)
            .map(|c| match c.to_ascii_lowercase() {
                c @ ('a'..='z' | '0'..='9' | '_') => c,
                _ => '_',
            })
            .collect();
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("{prefix}_{}_{n}", std::process::id());
        // From template0, which nobody can connect to: copying template1 fails while any session is
        // connected to it. Quoted, as the prefix may start with a digit.
        self.psql(
            "postgres",
            &format!("CREATE DATABASE \"{name}\" TEMPLATE template0"),
        )?;
        Ok(self.url(&name))
    }

    /// Runs `sql` (a script: several statements, psql's meta-commands) through `psql` against
    /// `database` and returns what it printed: unaligned, tuples only (`-X -q -A -t`). It stops at
    /// the first error (`ON_ERROR_STOP=1`), which is then an error carrying psql's stderr.
    pub fn psql(&self, database: &str, sql: &str) -> io::Result<String> {
        let mut child = Command::new(&self.psql)
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .args(["-f", "-", "-d", &self.url(database)])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|error| with_context(error, &format!("cannot run {}", self.psql.display())))?;
        let stdin = child.stdin.take();
        // The script is written from another thread, as psql may fill its output pipes first.
        let (output, written) = thread::scope(|scope| {
            let writer = scope.spawn(|| match stdin {
                Some(mut stdin) => stdin.write_all(sql.as_bytes()),
                None => Ok(()),
            });
            let output = child.wait_with_output();
            let written = writer
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            (output, written)
        });
        let output = output?;
        if !output.status.success() {
            return Err(io::Error::other(format!(
                "psql on {database} failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim_end()
            )));
        }
        written?;
        String::from_utf8(output.stdout)
            .map_err(|error| io::Error::new(ErrorKind::InvalidData, error))
    }

    /// The primary's WAL position now (`pg_current_wal_insert_lsn`): what a standby must have
    /// replayed to see every commit made so far (also those not flushed yet, under
    /// `synchronous_commit=off`).
    pub fn current_wal_lsn(&self) -> io::Result<u64> {
        parse_lsn(
            self.psql("postgres", "SELECT pg_current_wal_insert_lsn()")?
                .trim(),
        )
    }

    /// A standby's WAL position replayed so far (`pg_last_wal_replay_lsn`).
    pub fn replay_lsn(&self) -> io::Result<u64> {
        parse_lsn(
            self.psql("postgres", "SELECT pg_last_wal_replay_lsn()")?
                .trim(),
        )
    }

    /// Holds (or resumes) a standby's replay: replication lag on demand.
    pub fn pause_replay(&self, paused: bool) -> io::Result<()> {
        let call = if paused {
            "pg_wal_replay_pause"
        } else {
            "pg_wal_replay_resume"
        };
        self.psql("postgres", &format!("SELECT {call}()")).map(drop)
    }

    /// Waits until this standby has replayed `lsn`, for at most `limit`.
    pub fn wait_replayed(&self, lsn: u64, limit: Duration) -> io::Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            let replayed = self.replay_lsn()?;
            if replayed >= lsn {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    ErrorKind::TimedOut,
                    format!(
                        "the standby replayed {} and not {} within {limit:?}",
                        format_lsn(replayed),
                        format_lsn(lsn)
                    ),
                ));
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops the server now (fast shutdown) and removes its directory. Idempotent.
    pub fn stop(&self) {
        let watchdog = self
            .watchdog
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        // Nothing to do about failures: this is cleanup, often from a destructor.
        if let Some(mut watchdog) = watchdog {
            drop(watchdog.stdin.take());
            let _ = watchdog.wait();
        }
        // Normally the watchdog removed it already; not if it never ran, or if the postgres user
        // may not remove entries of the temporary directory.
        let _ = fs::remove_dir_all(&self.dir);
    }

    /// One try at [`start`](Self::start): a new directory, port and watchdog. A port taken before
    /// the server could bind it is an [`ErrorKind::AddrInUse`] error.
    fn start_once(
        bin: &Path,
        primary: Option<u16>,
        durability: PgDurability,
    ) -> io::Result<PgCluster> {
        // The cluster owns the directory from here on (its drop removes it), even before the
        // watchdog runs.
        let mut cluster = PgCluster {
            port: free_port()?,
            psql: psql_path(bin),
            dir: make_dir()?,
            watchdog: Mutex::new(None),
        };
        let mut watchdog = Command::new("/bin/sh");
        watchdog
            .args(["-c", WATCHDOG, "stagefs-pg-watchdog"])
            .arg(&cluster.dir)
            .arg(bin)
            .arg(primary.map(|port| port.to_string()).unwrap_or_default())
            .args(["-p", &cluster.port.to_string(), "-k"])
            .arg(&cluster.dir);
        let mut settings = vec![
            "listen_addresses=127.0.0.1",
            "max_connections=300",
            "shared_buffers=128MB",
            // A standby's base backup streams the WAL from its start: a checkpoint (another
            // backup's, say) must not recycle those segments first ("requested WAL segment …
            // has already been removed", seen when two tests made standbys at once).
            "wal_keep_size=256MB",
        ];
        if durability == PgDurability::Fast {
            settings.extend([
                "fsync=off",
                "synchronous_commit=off",
                "full_page_writes=off",
            ]);
        }
        for setting in settings {
            watchdog.args(["-c", setting]);
        }
        watchdog
            .current_dir(&cluster.dir)
            // English messages, which `wait_ready` looks for.
            .env("LC_ALL", "C")
            .stdin(Stdio::piped())
            // Not the caller's: `cargo test` would wait for the server's end on its output pipes.
            .stdout(Stdio::null())
            .stderr(File::create(cluster.dir.join("watchdog.log"))?)
            // Out of the caller's process group, so a Ctrl-C meant for it does not kill the
            // watchdog before it cleans up (it sees the pipe close instead).
            .process_group(0);
        // initdb and postgres refuse to run as root, which we are if the directory we just made is
        // root's: then the watchdog runs as the postgres user.
        let mut user = "this user";
        if fs::metadata(&cluster.dir)?.uid() == 0 {
            let (uid, gid) = server_user()?;
            std::os::unix::fs::chown(&cluster.dir, Some(uid), Some(gid))?;
            watchdog.uid(uid).gid(gid);
            user = "the postgres user";
        }
        let watchdog = watchdog.spawn().map_err(|error| {
            let dir = cluster.dir.display();
            with_context(error, &format!("cannot start /bin/sh as {user} in {dir}"))
        })?;
        cluster.watchdog = Mutex::new(Some(watchdog));
        cluster.wait_ready()?;
        Ok(cluster)
    }

    /// Waits until the server accepts connections or failed to start.
    fn wait_ready(&mut self) -> io::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let exited = match self
                .watchdog
                .get_mut()
                .unwrap_or_else(PoisonError::into_inner)
            {
                Some(watchdog) => watchdog.try_wait()?,
                None => None,
            };
            if let Some(status) = exited {
                return Err(self.failure(
                    ErrorKind::Other,
                    &format!("the watchdog exited ({status})"),
                    "watchdog.log",
                ));
            }
            if self.dir.join("initdb.failed").exists() {
                let what = "initdb (or pg_basebackup, for a standby) failed";
                return Err(self.failure(ErrorKind::Other, what, "initdb.log"));
            }
            if self.dir.join("server.exit").exists() {
                let log = log_tail(&self.dir.join("server.log"));
                let kind = if log.contains("Address already in use") {
                    ErrorKind::AddrInUse
                } else {
                    ErrorKind::Other
                };
                return Err(io::Error::new(
                    kind,
                    format!("postgres exited while starting; server.log ends:\n{log}"),
                ));
            }
            if self.is_ready()? {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let what = format!(
                    "postgres did not start within {} s",
                    START_TIMEOUT.as_secs()
                );
                return Err(self.failure(ErrorKind::TimedOut, &what, "server.log"));
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Whether the server says it accepts connections: the status line of `postmaster.pid`, which
    /// is what `pg_ctl start --wait` watches.
    fn is_ready(&self) -> io::Result<bool> {
        match fs::read_to_string(self.dir.join("data/postmaster.pid")) {
            Ok(lock_file) => Ok(lock_file
                .lines()
                .nth(7)
                .is_some_and(|status| matches!(status.trim(), "ready" | "standby"))),
            Err(error) if error.kind() == ErrorKind::NotFound => Ok(false),
            Err(error) => Err(with_context(
                error,
                "cannot read the server's postmaster.pid",
            )),
        }
    }

    fn failure(&self, kind: ErrorKind, what: &str, log: &str) -> io::Error {
        io::Error::new(
            kind,
            format!("{what}; {log} ends:\n{}", log_tail(&self.dir.join(log))),
        )
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A WAL position as PostgreSQL writes it (`16/B374D848`: the high and low 32 bits in hex).
pub fn parse_lsn(text: &str) -> io::Result<u64> {
    let invalid = || io::Error::new(ErrorKind::InvalidData, format!("not an LSN: {text:?}"));
    let (high, low) = text.split_once('/').ok_or_else(invalid)?;
    let high = u64::from_str_radix(high, 16).map_err(|_| invalid())?;
    let low = u64::from_str_radix(low, 16).map_err(|_| invalid())?;
    if high > u32::MAX as u64 || low > u32::MAX as u64 {
        return Err(invalid());
    }
    Ok(high << 32 | low)
}

/// `lsn` as PostgreSQL writes it.
pub fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

/// The directory of the PostgreSQL binaries: `STAGEFS_PG_BIN`, or the highest version of Debian's.
fn bin_dir() -> io::Result<PathBuf> {
    if let Some(bin) = std::env::var_os("STAGEFS_PG_BIN") {
        let bin = PathBuf::from(bin);
        if bin.join("initdb").is_file() && bin.join("postgres").is_file() {
            return Ok(bin);
        }
        return Err(io::Error::new(
            ErrorKind::NotFound,
            format!(
                "STAGEFS_PG_BIN={} has no initdb and postgres",
                bin.display()
            ),
        ));
    }
    let versions = match fs::read_dir("/usr/lib/postgresql") {
        Ok(entries) => entries.collect::<io::Result<Vec<_>>>()?,
        Err(error) if error.kind() == ErrorKind::NotFound => Vec::new(),
        Err(error) => return Err(error),
    };
    versions
        .into_iter()
        .filter_map(|entry| {
            let version = parse_version(&entry.file_name())?;
            let bin = entry.path().join("bin");
            let complete = bin.join("initdb").is_file() && bin.join("postgres").is_file();
            complete.then_some((version, bin))
        })
        .max()
        .map(|(_, bin)| bin)
        .ok_or_else(|| {
            io::Error::new(
                ErrorKind::NotFound,
                "postgresql is not installed (no /usr/lib/postgresql/*/bin/initdb, and \
                 STAGEFS_PG_BIN is not set): run scripts/setup.sh",
            )
        })
}

/// `15` is [15], `9.6` (before PostgreSQL 10) is [9, 6]; anything else is not a version.
fn parse_version(name: &OsStr) -> Option<Vec<u32>> {
    name.to_str()?
        .split('.')
        .map(|part| part.parse().ok())
        .collect()
}

/// The bin directory's psql (Debian puts one there), else the one on the PATH.
fn psql_path(bin: &Path) -> PathBuf {
    let psql = bin.join("psql");
    if psql.is_file() {
        psql
    } else {
        PathBuf::from("psql")
    }
}

/// A new directory under the temporary directory, readable by its owner only.
fn make_dir() -> io::Result<PathBuf> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.subsec_nanos());
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("stagefs-pg-{}-{n}-{nanos}", std::process::id()));
    DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(|error| with_context(error, &format!("cannot create {}", dir.display())))?;
    Ok(dir)
}

/// A port nobody listens on now. Someone may take it before the server binds it: `start` retries.
fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The uid and gid of the `postgres` system user, which Debian's package creates.
fn server_user() -> io::Result<(u32, u32)> {
    let missing = || {
        io::Error::new(
            ErrorKind::NotFound,
            "running as root, and there is no postgres user to run initdb and postgres as (they \
             refuse root): run scripts/setup.sh",
        )
    };
    let passwd = fs::read_to_string("/etc/passwd")?;
    let line = passwd.lines().find(|line| line.starts_with("postgres:"));
    // name:password:uid:gid:...
    let mut ids = line.ok_or_else(missing)?.split(':').skip(2).map(str::parse);
    match (ids.next(), ids.next()) {
        (Some(Ok(uid)), Some(Ok(gid))) => Ok((uid, gid)),
        _ => Err(missing()),
    }
}

/// The last lines of a log, for an error message.
fn log_tail(path: &Path) -> String {
    match fs::read(path) {
        Ok(log) => {
            let log = String::from_utf8_lossy(&log);
            let lines: Vec<&str> = log.lines().collect();
            lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
        }
        Err(error) => format!("(cannot read {}: {error})", path.display()),
    }
}

fn with_context(error: io::Error, context: &str) -> io::Error {
    io::Error::new(error.kind(), format!("{context}: {error}"))
}
