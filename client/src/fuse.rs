//! The FUSE adapter: a thin shell that turns kernel requests into calls on the async [`Fs`]
//! core and its errors into errnos (through [`FsError::errno`], the one mapping).
//!
//! fuser calls us on its own threads; each request is spawned onto the tokio runtime and answered
//! from there, so a slow operation (a `flush` waiting for the gateway's acknowledgement) never
//! holds up the others. Those the mount answers from what it holds, without waiting (attributes
//! of a file it writes, an absent `security.capability`), are answered on the kernel's thread.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyLock, ReplyOpen, ReplyStatfs,
    ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use crate::fs::{Attr, FileKind, Fs, FsError, LockKind, LockRequest, SetAttr, TimeNs};

/// How the kernel may cache what we tell it.
#[derive(Debug, Clone, Copy)]
pub struct CachePolicy {
    pub attr_ttl: Duration,
    pub entry_ttl: Duration,
    /// Let the kernel gather writes in its page cache (FUSE writeback cache).
    pub writeback_cache: bool,
    /// Largest write the kernel sends in one request.
    pub max_write: u32,
}

pub struct FuseFs {
    fs: Arc<Fs>,
    runtime: tokio::runtime::Handle,
    cache: CachePolicy,
}

impl FuseFs {
    pub fn new(fs: Arc<Fs>, runtime: tokio::runtime::Handle, cache: CachePolicy) -> Self {
        FuseFs { fs, runtime, cache }
    }

    /// Runs `work`, the operation `op`, on the runtime; it answers the kernel itself. Each
    /// operation is counted and timed (`stagefs_fuse_ops_total`, `stagefs_fuse_op_seconds`), and
    /// its failures counted and logged by [`errno`], which knows the operation from [`OP`].
    fn spawn<F>(&self, op: &'static str, work: impl FnOnce(Arc<Fs>) -> F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.runtime.spawn(instrumented(op, work(self.fs.clone())));
    }

    /// Answers the operation `op` with `here`, the mount's own answer, on this (the kernel's)
    /// thread when there is one; otherwise runs `work` on the runtime as [`FuseFs::spawn`]
    /// does and answers with its outcome.
    ///
    /// Why: handing a request to a runtime thread wakes that thread, and on a small VM a wake-up
    /// across CPUs costs tens of microseconds, more than a local answer. An untarred file gets
    /// about nine such calls (three `setattr`s, `getattr`s, the `security.capability` the
    /// kernel asks for before each write).
    fn answer_here_or_spawn<R, T, F>(
        &self,
        op: &'static str,
        reply: R,
        here: Option<crate::fs::FsResult<T>>,
        work: impl FnOnce(Arc<Fs>) -> F,
        answer: impl FnOnce(R, crate::fs::FsResult<T>) + Send + 'static,
    ) where
        R: Send + 'static,
        F: std::future::Future<Output = crate::fs::FsResult<T>> + Send + 'static,
    {
        match here {
            Some(outcome) => {
                let started = std::time::Instant::now();
                OP.sync_scope(op, || answer(reply, outcome));
                counted(op, started);
            }
            None => self.spawn(op, |fs| {
                let outcome = work(fs);
                async move { answer(reply, outcome.await) }
            }),
        }
    }
}

/// Counts and times an answered operation `op` begun at `started`.
fn counted(op: &'static str, started: std::time::Instant) {
    metrics::counter!("stagefs_fuse_ops_total", "op" => op).increment(1);
    metrics::histogram!("stagefs_fuse_op_seconds", "op" => op)
        .record(started.elapsed().as_secs_f64());
}

/// `work`, which answers the operation `op`: counted, timed, and its failures labelled with `op`
/// by [`errno`].
async fn instrumented<T>(op: &'static str, work: impl std::future::Future<Output = T>) -> T {
    OP.scope(op, async move {
        let started = std::time::Instant::now();
        let out = work.await;
        counted(op, started);
        out
    })
    .await
}

tokio::task_local! {
    /// The FUSE operation the current task answers.
    static OP: &'static str;
}

/// Errors an application meets in normal work (a missing name, an existing one, no such xattr):
/// counted, logged only at debug level.
const EXPECTED_ERRNOS: &[i32] = &[
    libc::ENOENT,
    // A lock another owner holds (F_SETLK, flock with LOCK_NB), or a wait its owner gave up.
    libc::EAGAIN,
    libc::EINTR,
    libc::EEXIST,
    libc::ENODATA,
    libc::ENOTEMPTY,
    libc::ENOTDIR,
    libc::EISDIR,
    libc::EACCES,
    libc::EPERM,
    libc::ERANGE,
    libc::ENOSYS,
];

/// At most this many failed operations are logged at warning level per second.
const WARNINGS_PER_SECOND: u64 = 10;

/// The errno of a failed operation, counted (`stagefs_fuse_errors_total`, labels `op`, `errno`)
/// and logged with its operation: the one place every failure of the adapter passes.
fn errno(e: &FsError) -> Errno {
    let code = e.errno();
    let op = OP.try_with(|op| *op).unwrap_or("unknown");
    metrics::counter!("stagefs_fuse_errors_total", "op" => op, "errno" => errno_name(code))
        .increment(1);
    if EXPECTED_ERRNOS.contains(&code) {
        tracing::debug!(op, errno = code, error = %e, "FUSE operation failed");
    } else if warning_allowed() {
        tracing::warn!(op, errno = code, error = %e, "FUSE operation failed");
    }
    Errno::from_i32(code)
}

/// Rate limit of warnings: [`WARNINGS_PER_SECOND`] in each wall-clock second.
fn warning_allowed() -> bool {
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
    static SECOND: AtomicU64 = AtomicU64::new(0);
    static COUNT: AtomicU64 = AtomicU64::new(0);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    if SECOND.swap(now, Relaxed) != now {
        COUNT.store(0, Relaxed);
    }
    COUNT.fetch_add(1, Relaxed) < WARNINGS_PER_SECOND
}

/// `EIO` for 5, and so on: the name an operator searches for.
fn errno_name(code: i32) -> String {
    match code {
        libc::ENOENT => "ENOENT".into(),
        libc::EIO => "EIO".into(),
        libc::EEXIST => "EEXIST".into(),
        libc::EACCES => "EACCES".into(),
        libc::EPERM => "EPERM".into(),
        libc::EROFS => "EROFS".into(),
        libc::ENOSPC => "ENOSPC".into(),
        libc::EINVAL => "EINVAL".into(),
        libc::ENODATA => "ENODATA".into(),
        libc::ENOTEMPTY => "ENOTEMPTY".into(),
        libc::ENOTDIR => "ENOTDIR".into(),
        libc::EISDIR => "EISDIR".into(),
        libc::EBADF => "EBADF".into(),
        libc::ERANGE => "ERANGE".into(),
        libc::ENOSYS => "ENOSYS".into(),
        libc::EAGAIN => "EAGAIN".into(),
        libc::EINTR => "EINTR".into(),
        libc::ENOLCK => "ENOLCK".into(),
        libc::EFBIG => "EFBIG".into(),
        libc::ENAMETOOLONG => "ENAMETOOLONG".into(),
        other => other.to_string(),
    }
}

fn system_time(ns: TimeNs) -> SystemTime {
    if ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(ns as u64)
    } else {
        UNIX_EPOCH - Duration::from_nanos(ns.unsigned_abs())
    }
}

fn time_ns(t: SystemTime) -> TimeNs {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_nanos().min(i64::MAX as u128) as i64,
        Err(e) => -(e.duration().as_nanos().min(i64::MAX as u128) as i64),
    }
}

fn time_or_now(t: TimeOrNow) -> TimeNs {
    match t {
        TimeOrNow::SpecificTime(t) => time_ns(t),
        TimeOrNow::Now => time_ns(SystemTime::now()),
    }
}

fn file_type(kind: FileKind) -> FileType {
    match kind {
        FileKind::File => FileType::RegularFile,
        FileKind::Dir => FileType::Directory,
        FileKind::Symlink => FileType::Symlink,
        FileKind::Fifo => FileType::NamedPipe,
        FileKind::Socket => FileType::Socket,
        FileKind::CharDevice => FileType::CharDevice,
        FileKind::BlockDevice => FileType::BlockDevice,
    }
}

/// The kind of node `mknod` asks for, from the `S_IFMT` bits of its mode.
fn node_kind(mode: u32) -> Option<FileKind> {
    match mode & libc::S_IFMT {
        libc::S_IFREG | 0 => Some(FileKind::File),
        libc::S_IFIFO => Some(FileKind::Fifo),
        libc::S_IFSOCK => Some(FileKind::Socket),
        libc::S_IFCHR => Some(FileKind::CharDevice),
        libc::S_IFBLK => Some(FileKind::BlockDevice),
        _ => None,
    }
}

fn file_attr(attr: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(attr.ino),
        size: attr.size,
        blocks: attr.size.div_ceil(512),
        atime: system_time(attr.atime_ns),
        mtime: system_time(attr.mtime_ns),
        ctime: system_time(attr.ctime_ns),
        crtime: system_time(attr.ctime_ns),
        kind: file_type(attr.kind),
        perm: (attr.mode & 0o7777) as u16,
        nlink: attr.nlink,
        uid: attr.uid,
        gid: attr.gid,
        rdev: attr.rdev,
        blksize: 4096,
        flags: 0,
    }
}

/// Directory offsets 1 and 2 are "." and ".."; the engine's cookies start above them.
const FIRST_ENGINE_COOKIE_OFFSET: u64 = 2;
/// Reported capacity when the metadata engine sets no limit.
const UNLIMITED_BYTES: u64 = 1 << 50;
const UNLIMITED_FILES: u64 = 1 << 32;

impl Filesystem for FuseFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        if let Err(nearest) = config.set_max_write(self.cache.max_write) {
            tracing::info!(
                asked = self.cache.max_write,
                nearest,
                "kernel limits max_write"
            );
            let _ = config.set_max_write(nearest);
        }
        // Locks go to us, and through us to the metadata engine, so that they hold across
        // mounts; without these the kernel keeps them per mount.
        for lock in [
            fuser::InitFlags::FUSE_POSIX_LOCKS,
            fuser::InitFlags::FUSE_FLOCK_LOCKS,
        ] {
            if let Err(e) = config.add_capabilities(lock) {
                tracing::warn!(unsupported = ?e, "the kernel keeps file locks to this mount");
            }
        }
        // Listings carry attributes: `ls -l` needs no lookup per entry.
        if let Err(e) = config.add_capabilities(fuser::InitFlags::FUSE_DO_READDIRPLUS) {
            tracing::info!(unsupported = ?e, "the kernel does not offer readdirplus");
        }
        if self.cache.writeback_cache {
            if let Err(e) = config.add_capabilities(fuser::InitFlags::FUSE_WRITEBACK_CACHE) {
                tracing::warn!(unsupported = ?e, "the kernel does not offer the writeback cache");
            }
        }
        Ok(())
    }

    fn destroy(&mut self) {
        let fs = self.fs.clone();
        // Runs on fuser's thread, outside the runtime: block on the final flush here.
        if let Err(e) = self.runtime.block_on(async move { fs.shutdown().await }) {
            tracing::error!(error = %e, "could not close the session cleanly at unmount");
        }
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let (name, ttl) = (name.as_bytes().to_vec(), self.cache.entry_ttl);
        self.spawn("lookup", |fs| async move {
            answer_entry(reply, ttl, fs.lookup(parent.0, &name).await)
        });
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let ttl = self.cache.attr_ttl;
        self.answer_here_or_spawn(
            "getattr",
            reply,
            self.fs.getattr_here(ino.0).map(Ok),
            move |fs| async move { fs.getattr(ino.0).await },
            move |reply, attr| answer_attr(reply, ttl, attr),
        );
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let changes = SetAttr {
            mode: mode.map(|m| m & 0o7777),
            uid,
            gid,
            size,
            atime_ns: atime.map(time_or_now),
            mtime_ns: mtime.map(time_or_now),
        };
        let ttl = self.cache.attr_ttl;
        self.answer_here_or_spawn(
            "setattr",
            reply,
            self.fs.setattr_here(ino.0, &changes),
            move |fs| async move { fs.setattr(ino.0, &changes).await },
            move |reply, attr| answer_attr(reply, ttl, attr),
        );
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        self.spawn("readlink", |fs| async move {
            match fs.readlink(ino.0).await {
                Ok(target) => reply.data(&target),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let Some(kind) = node_kind(mode) else {
            reply.error(Errno::from_i32(libc::EINVAL));
            return;
        };
        let (name, ttl) = (name.as_bytes().to_vec(), self.cache.entry_ttl);
        let (uid, gid, perm) = (req.uid(), req.gid(), mode & 0o7777 & !umask);
        self.spawn("mknod", |fs| async move {
            answer_entry(
                reply,
                ttl,
                fs.mknod(parent.0, &name, kind, perm, uid, gid, rdev).await,
            )
        });
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let (name, ttl) = (name.as_bytes().to_vec(), self.cache.entry_ttl);
        let (uid, gid, perm) = (req.uid(), req.gid(), mode & 0o7777 & !umask);
        self.spawn("mkdir", |fs| async move {
            answer_entry(reply, ttl, fs.mkdir(parent.0, &name, perm, uid, gid).await)
        });
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = name.as_bytes().to_vec();
        self.spawn("unlink", |fs| async move {
            answer_empty(reply, fs.unlink(parent.0, &name).await)
        });
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = name.as_bytes().to_vec();
        self.spawn("rmdir", |fs| async move {
            answer_empty(reply, fs.rmdir(parent.0, &name).await)
        });
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let (name, target) = (
            link_name.as_bytes().to_vec(),
            target.as_os_str().as_bytes().to_vec(),
        );
        let (uid, gid, ttl) = (req.uid(), req.gid(), self.cache.entry_ttl);
        self.spawn("symlink", |fs| async move {
            answer_entry(
                reply,
                ttl,
                fs.symlink(parent.0, &name, &target, uid, gid).await,
            )
        });
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let (name, newname) = (name.as_bytes().to_vec(), newname.as_bytes().to_vec());
        self.spawn("rename", |fs| async move {
            answer_empty(
                reply,
                fs.rename(parent.0, &name, newparent.0, &newname, flags.bits())
                    .await,
            )
        });
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let (newname, ttl) = (newname.as_bytes().to_vec(), self.cache.entry_ttl);
        self.spawn("link", |fs| async move {
            answer_entry(reply, ttl, fs.link(ino.0, newparent.0, &newname).await)
        });
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        self.spawn("open", |fs| async move {
            match fs.open(ino.0, flags.0).await {
                // No FOPEN_KEEP_CACHE: every open drops the kernel's cached pages of the file,
                // which is what makes close-to-open consistency across mounts hold.
                Ok((fh, _attr)) => reply.opened(FileHandle(fh), FopenFlags::empty()),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.spawn("read", |fs| async move {
            match fs.read(fh.0, offset, size).await {
                Ok(data) => {
                    metrics::counter!("stagefs_fuse_read_bytes_total").increment(data.len() as u64);
                    reply.data(&data)
                }
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        // Served on this FUSE thread rather than spawned: the data is appended straight from the
        // kernel's buffer instead of being copied first (a write rarely waits; one that crosses
        // the dirty limit holds this thread while it flushes, and the other threads go on).
        self.runtime.block_on(instrumented("write", async {
            match self.fs.write(fh.0, offset, data).await {
                Ok(written) => {
                    metrics::counter!("stagefs_fuse_written_bytes_total")
                        .increment(u64::from(written));
                    reply.written(written)
                }
                Err(e) => reply.error(errno(&e)),
            }
        }));
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        self.spawn("flush", |fs| async move {
            let flushed = fs.close(fh.0).await;
            fs.close_by(fh.0, lock_owner.0).await;
            answer_empty(reply, flushed)
        });
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.spawn("release", |fs| async move {
            answer_empty(reply, fs.release(fh.0, lock_owner.map(|o| o.0)).await)
        });
    }

    fn getlk(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
        reply: ReplyLock,
    ) {
        let Some(lock) = lock_request(lock_owner, start, end, typ, pid) else {
            return reply.error(Errno::EINVAL);
        };
        self.spawn("getlk", |fs| async move {
            match fs.getlk(fh.0, &lock).await {
                Ok(Some(held)) => {
                    let typ = match held.kind {
                        LockKind::Read => libc::F_RDLCK,
                        LockKind::Write => libc::F_WRLCK,
                    };
                    // The kernel refuses ranges past OFFSET_MAX (i64::MAX).
                    let end = held.end.min(i64::MAX as u64);
                    reply.locked(held.start.min(end), end, typ, held.pid)
                }
                // Nothing in the way: the kernel reports F_UNLCK.
                Ok(None) => reply.locked(start, end, libc::F_UNLCK, 0),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn setlk(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
        sleep: bool,
        reply: ReplyEmpty,
    ) {
        let Some(lock) = lock_request(lock_owner, start, end, typ, pid) else {
            return reply.error(Errno::EINVAL);
        };
        let waiter = req.pid();
        self.spawn("setlk", |fs| async move {
            answer_empty(reply, fs.setlk(fh.0, &lock, sleep, waiter).await)
        });
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.spawn("fsync", |fs| async move {
            answer_empty(reply, fs.fsync(fh.0, datasync).await)
        });
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.spawn("fsyncdir", |fs| async move {
            answer_empty(reply, fs.fsyncdir().await)
        });
    }

    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply.opened(FileHandle(self.fs.opendir()), FopenFlags::empty());
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.fs.releasedir(fh.0);
        reply.ok();
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        self.spawn("readdir", |fs| async move {
            // Offsets 1 and 2 are "." and ".."; above that an offset is the engine cookie of the
            // last entry the kernel already has.
            if offset < 1 && reply.add(ino, 1, FileType::Directory, ".") {
                return reply.ok();
            }
            if offset < 2 && reply.add(ino, 2, FileType::Directory, "..") {
                return reply.ok();
            }
            let result = list(&fs, fh, ino, offset, |entry| {
                reply.add(
                    INodeNo(entry.attr.ino),
                    entry.cookie,
                    file_type(entry.attr.kind),
                    OsStr::from_bytes(&entry.name),
                )
            })
            .await;
            match result {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    /// `readdir` with each entry's attributes (the engine returns them with the page anyway), so
    /// that `ls -l` of a large directory costs no lookup or getattr per entry.
    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let ttl = self.cache.entry_ttl.min(self.cache.attr_ttl);
        self.spawn("readdirplus", |fs| async move {
            if offset < 2 {
                // The kernel makes no entries of "." and "..": their attributes are not used.
                let dir = match fs.getattr(ino.0).await {
                    Ok(attr) => file_attr(&attr),
                    Err(e) => return reply.error(errno(&e)),
                };
                if offset < 1 && reply.add(ino, 1, ".", &ttl, &dir, Generation(0)) {
                    return reply.ok();
                }
                if reply.add(ino, 2, "..", &ttl, &dir, Generation(0)) {
                    return reply.ok();
                }
            }
            let result = list(&fs, fh, ino, offset, |entry| {
                reply.add(
                    INodeNo(entry.attr.ino),
                    entry.cookie,
                    OsStr::from_bytes(&entry.name),
                    &ttl,
                    &file_attr(&entry.attr),
                    Generation(0),
                )
            })
            .await;
            match result {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        self.spawn("statfs", |fs| async move {
            match fs.statfs().await {
                Ok(stat) => {
                    const BSIZE: u64 = 4096;
                    let capacity = stat.capacity_bytes.unwrap_or(UNLIMITED_BYTES);
                    let blocks = capacity / BSIZE;
                    let free = capacity.saturating_sub(stat.used_bytes) / BSIZE;
                    let max_files = stat.max_files.unwrap_or(UNLIMITED_FILES);
                    let ffree = max_files.saturating_sub(stat.files);
                    reply.statfs(
                        blocks,
                        free,
                        free,
                        max_files,
                        ffree,
                        BSIZE as u32,
                        255,
                        BSIZE as u32,
                    );
                }
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let (name, value) = (name.as_bytes().to_vec(), value.to_vec());
        self.spawn("setxattr", |fs| async move {
            answer_empty(reply, fs.setxattr(ino.0, &name, &value, flags as u32).await)
        });
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let name = name.as_bytes().to_vec();
        self.answer_here_or_spawn(
            "getxattr",
            reply,
            self.fs.getxattr_here(ino.0, &name),
            move |fs| async move { fs.getxattr(ino.0, &name).await },
            move |reply: ReplyXattr, value| match value {
                Ok(value) => reply_xattr(reply, size, &value),
                Err(e) => reply.error(errno(&e)),
            },
        );
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        self.answer_here_or_spawn(
            "listxattr",
            reply,
            self.fs.listxattr_here(ino.0).map(Ok),
            move |fs| async move { fs.listxattr(ino.0).await },
            move |reply: ReplyXattr, names| match names {
                Ok(names) => {
                    let mut list = Vec::new();
                    for name in names {
                        list.extend_from_slice(&name);
                        list.push(0);
                    }
                    reply_xattr(reply, size, &list)
                }
                Err(e) => reply.error(errno(&e)),
            },
        );
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = name.as_bytes().to_vec();
        self.spawn("removexattr", |fs| async move {
            answer_empty(reply, fs.removexattr(ino.0, &name).await)
        });
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // Mounted with default_permissions: the kernel checks modes itself.
        reply.ok();
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let (name, ttl) = (name.as_bytes().to_vec(), self.cache.entry_ttl);
        let (uid, gid, perm) = (req.uid(), req.gid(), mode & 0o7777 & !umask);
        self.spawn("create", |fs| async move {
            match fs.create(parent.0, &name, perm, uid, gid, flags).await {
                Ok((attr, fh)) => reply.created(
                    &ttl,
                    &file_attr(&attr),
                    Generation(0),
                    FileHandle(fh),
                    FopenFlags::empty(),
                ),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }
}

/// Feeds `add` the entries of directory `ino` after kernel offset `offset` (an engine cookie,
/// or "." / ".."), page by page through the handle's listing, until `add` says the kernel's
/// buffer is full or the directory ends.
async fn list(
    fs: &Fs,
    fh: FileHandle,
    ino: INodeNo,
    offset: u64,
    mut add: impl FnMut(&crate::fs::DirEntry) -> bool,
) -> crate::fs::FsResult<()> {
    let mut after = if offset <= FIRST_ENGINE_COOKIE_OFFSET {
        0
    } else {
        offset
    };
    loop {
        let (entries, end) = fs.readdir_at(fh.0, ino.0, after).await?;
        for entry in &entries {
            if add(entry) {
                return Ok(());
            }
            after = entry.cookie;
        }
        if end || entries.is_empty() {
            return Ok(());
        }
    }
}

/// A kernel lock request (`F_RDLCK`, `F_WRLCK` or `F_UNLCK` over `start..=end`) for the core;
/// `None` for a type the kernel does not send.
fn lock_request(owner: LockOwner, start: u64, end: u64, typ: i32, pid: u32) -> Option<LockRequest> {
    let kind = match typ {
        libc::F_RDLCK => Some(LockKind::Read),
        libc::F_WRLCK => Some(LockKind::Write),
        libc::F_UNLCK => None,
        _ => return None,
    };
    Some(LockRequest {
        owner: owner.0,
        start,
        end,
        kind,
        pid,
    })
}

fn answer_empty(reply: ReplyEmpty, result: crate::fs::FsResult<()>) {
    match result {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(errno(&e)),
    }
}

fn answer_entry(reply: ReplyEntry, ttl: Duration, result: crate::fs::FsResult<Attr>) {
    match result {
        Ok(attr) => reply.entry(&ttl, &file_attr(&attr), Generation(0)),
        Err(e) => reply.error(errno(&e)),
    }
}

fn answer_attr(reply: ReplyAttr, ttl: Duration, result: crate::fs::FsResult<Attr>) {
    match result {
        Ok(attr) => reply.attr(&ttl, &file_attr(&attr)),
        Err(e) => reply.error(errno(&e)),
    }
}

/// getxattr/listxattr protocol: size 0 asks for the length; too small a buffer is ERANGE.
fn reply_xattr(reply: ReplyXattr, size: u32, value: &[u8]) {
    if size == 0 {
        reply.size(value.len() as u32);
    } else if value.len() > size as usize {
        reply.error(Errno::from_i32(libc::ERANGE));
    } else {
        reply.data(value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_round_trip_through_system_time() {
        for ns in [0i64, 1, 1_700_000_000_123_456_789, -5_000_000_001] {
            assert_eq!(time_ns(system_time(ns)), ns);
        }
    }

    #[test]
    fn mknod_kinds_come_from_the_mode() {
        assert_eq!(node_kind(libc::S_IFIFO | 0o644), Some(FileKind::Fifo));
        assert_eq!(node_kind(libc::S_IFREG | 0o600), Some(FileKind::File));
        assert_eq!(node_kind(0o600), Some(FileKind::File));
        assert_eq!(node_kind(libc::S_IFDIR | 0o755), None);
    }
}
