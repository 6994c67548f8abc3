//! The FUSE adapter: top of the data path. Handlers stay thin: decode the request, call the
//! dataset, translate the result (errors through `errno::errno`, in one place), reply.
//!
//! Kernel cache policy: every change to a dataset goes through this mount (a dataset is mounted
//! at most once), so attributes, entries and file pages cached by the kernel can never be stale;
//! we let the kernel keep them (long TTLs, FOPEN_KEEP_CACHE).
//!
//! Writes go through the kernel's writeback cache (FUSE_WRITEBACK_CACHE) when the kernel offers
//! it: `write(2)` fills the page cache, and the kernel sends the dirty pages in large WRITE
//! requests later, and always before it sends the FSYNC that must make them durable. So:
//! - fsync keeps its meaning: the kernel flushes the file's dirty pages (and waits) before it
//!   sends FSYNC, and a WRITE that failed is reported by the next fsync of the file;
//! - the kernel owns a file's size and mtime while it has dirty pages (it sends them with
//!   SETATTR), and may read a page before a partial write or on a write-only handle;
//! - data written but not yet sent is not in the dataset: whoever freezes a mounted dataset
//!   (a snapshot) first pushes the mount's dirty pages with [`flush_kernel_cache`].
//!
//! `VDBFS_WRITEBACK_CACHE=0` in the daemon's environment turns the cache off (every write is a
//! round trip), for comparisons.
//!
//! **One round trip per commit (write-through, `VDBFS_FSYNC=write`).** With the writeback
//! cache, a commit's `fdatasync` costs the WRITE of its dirty pages and then an FSYNC (the
//! default). With write-through, every WRITE (and
//! every SETATTR that changes size, mode or owner, and every FALLOCATE) is made durable before it
//! is answered, and FSYNC is answered ENOSYS, after a sync of its own, so the kernel counts that
//! fsync as done and sends no FSYNC on this mount again (`fc->no_fsync`). The kernel's fsync still
//! writes back the file's dirty pages and waits for their answers (and reports a failed WRITE),
//! so when fsync returns every byte it covers is durable: the guarantee is the same, with one
//! round trip less. What an FSYNC would have added and a WRITE does not carry: timestamps alone
//! (the kernel's SETATTR of mtime before an fsync) are durable with the next durable change or
//! checkpoint, as `fdatasync` allows; directory changes stay durable at FSYNCDIR (or any later
//! durable change), as POSIX asks. It lowers a lone committer's fdatasync latency (~154 -> ~127
//! us here) but makes the kernel's background writeback of every page durable as it arrives
//! (device flushes native writeback does not pay), which cost concurrent tpcb-like throughput in
//! `scripts/bench-commit`: so it is not the default.
//!
//! **O_DSYNC handles: one round trip per write, on every mount.** A file opened for writing with
//! O_DSYNC or O_SYNC (PostgreSQL's WAL with `wal_sync_method = open_datasync`, or
//! `open_sync`) is answered FOPEN_DIRECT_IO: its writes bypass the page cache, each `write(2)`
//! is one WRITE request whose flags carry O_DSYNC, and the kernel sends no FSYNC after it
//! (the direct write path does not call `generic_write_sync`). So the daemon makes such a WRITE
//! durable before it answers it. Invariants:
//! - a WRITE whose flags carry O_DSYNC is answered only after [`Dataset::fsync`] succeeded
//!   (a failed sync answers EIO and poisons like any failed fsync);
//! - the open answers without FOPEN_KEEP_CACHE, so the kernel writes back and drops what it
//!   cached of the file first (a dirty page of another handle cannot land later over a direct
//!   write); after that the kernel invalidates the cached pages a direct write covers, so
//!   cached handles of the same file read what the O_DSYNC handle wrote
//!   (`posix::o_dsync_handles_and_cached_handles_see_one_file`);
//! - other handles keep the cache and the FSYNC round trip (`VDBFS_DSYNC_DIRECT=0` gives O_DSYNC
//!   handles the same treatment, for comparisons).
//!
//! Measured with the kernel's `fuse:fuse_request_send` tracepoint (`perf record`, a script
//! outside the repository): 2200 O_DSYNC 8 KiB pwrites sent 2389 WRITE and no FSYNC or SETATTR;
//! `scripts/bench` reports pg_test_fsync's open_datasync line next to its fdatasync line.

pub mod errno;

use crate::store::{Error, Result};
use crate::tree::dataset::{Dataset, SetAttr, ROOT_INO};
use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request,
    TimeOrNow, WriteFlags,
};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use vdbfs_format::tree::{FileKind, InodeMeta, Timestamp};
use vdbfs_format::BLOCK_SIZE;

const TTL: Duration = Duration::from_secs(60);

thread_local! {
    /// Each FUSE worker's buffer for READ replies (reused: no allocation or zeroing per read).
    static READ_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// One entry of a directory as listed at opendir: name, inode, kind.
type DirListing = (Vec<u8>, u64, FileKind);

pub struct VdbFs {
    ds: Arc<Dataset>,
    read_only: bool,
    dir_handles: Mutex<HashMap<u64, Vec<DirListing>>>,
    next_fh: AtomicU64,
    /// The write-through commit (module doc); only with the writeback cache.
    write_through: bool,
    /// O_DSYNC opens bypass the writeback cache (module doc); only with the writeback cache.
    dsync_direct: bool,
}

fn to_system(t: Timestamp) -> SystemTime {
    if t.secs >= 0 {
        UNIX_EPOCH + Duration::new(t.secs as u64, t.nsecs)
    } else {
        UNIX_EPOCH - Duration::new(t.secs.unsigned_abs(), 0) + Duration::new(0, t.nsecs)
    }
}

fn from_system(t: SystemTime) -> Timestamp {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => Timestamp {
            secs: d.as_secs() as i64,
            nsecs: d.subsec_nanos(),
        },
        Err(e) => {
            let d = e.duration();
            let mut secs = -(d.as_secs() as i64);
            let mut nsecs = d.subsec_nanos();
            if nsecs > 0 {
                secs -= 1;
                nsecs = 1_000_000_000 - nsecs;
            }
            Timestamp { secs, nsecs }
        }
    }
}

fn file_type(k: FileKind) -> FileType {
    match k {
        FileKind::Regular => FileType::RegularFile,
        FileKind::Directory => FileType::Directory,
        FileKind::Symlink => FileType::Symlink,
        FileKind::Fifo => FileType::NamedPipe,
        FileKind::Socket => FileType::Socket,
        FileKind::CharDevice => FileType::CharDevice,
        FileKind::BlockDevice => FileType::BlockDevice,
    }
}

fn kind_of_mode(mode: u32) -> Option<FileKind> {
    Some(match mode & libc::S_IFMT {
        libc::S_IFREG | 0 => FileKind::Regular,
        libc::S_IFDIR => FileKind::Directory,
        libc::S_IFLNK => FileKind::Symlink,
        libc::S_IFIFO => FileKind::Fifo,
        libc::S_IFSOCK => FileKind::Socket,
        libc::S_IFCHR => FileKind::CharDevice,
        libc::S_IFBLK => FileKind::BlockDevice,
        _ => return None,
    })
}

/// The attributes the kernel gets. `stored` is the number of stored (non-hole) 8 KiB blocks of
/// a regular file: `st_blocks` counts what the file really takes (holes are free); other kinds
/// (and a file whose count could not be had) report their size.
pub fn attr(ino: u64, m: &InodeMeta, stored: Option<u64>) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size: m.size,
        blocks: stored.map_or(m.size.div_ceil(512), |n| n * (BLOCK_SIZE as u64 / 512)),
        atime: to_system(m.atime),
        mtime: to_system(m.mtime),
        ctime: to_system(m.ctime),
        crtime: to_system(m.ctime),
        kind: file_type(m.kind),
        perm: m.perm as u16,
        nlink: m.nlink,
        uid: m.uid,
        gid: m.gid,
        rdev: m.rdev,
        blksize: 16 * BLOCK_SIZE as u32,
        flags: 0,
    }
}

fn time_or_now(t: Option<TimeOrNow>) -> Option<Timestamp> {
    t.map(|t| match t {
        TimeOrNow::SpecificTime(s) => from_system(s),
        TimeOrNow::Now => crate::tree::dataset::now(),
    })
}

/// Whether mounts use the kernel's writeback cache (default yes; `VDBFS_WRITEBACK_CACHE=0`
/// turns it off).
fn writeback_cache_wanted() -> bool {
    !matches!(
        std::env::var("VDBFS_WRITEBACK_CACHE").as_deref(),
        Ok("0") | Ok("off") | Ok("no")
    )
}

/// Whether writes are made durable as they arrive instead of at FSYNC (`VDBFS_FSYNC=write`;
/// the default keeps them in memory until the FSYNC round trip).
fn write_through_wanted() -> bool {
    matches!(std::env::var("VDBFS_FSYNC").as_deref(), Ok("write"))
}

/// Whether O_DSYNC handles bypass the writeback cache (default yes; `VDBFS_DSYNC_DIRECT=0`
/// sends their writes through the page cache, and so an FSYNC after each).
fn dsync_direct_wanted() -> bool {
    !matches!(
        std::env::var("VDBFS_DSYNC_DIRECT").as_deref(),
        Ok("0") | Ok("off") | Ok("no")
    )
}

/// Readahead of a mount: large enough that a sequential read keeps several 1 MiB READ requests in
/// flight (the kernel's default for a FUSE mount is 128 KiB, one small request at a time).
const READ_AHEAD_KB: u32 = 4096;
/// Dirty page-cache bytes a mount may hold (the kernel allows a FUSE mount 1 % of its dirty
/// limit, strictly, which throttles bulk writers at a few tens of MiB): room for a checkpoint's
/// worth of relation pages to be rewritten in memory before they are sent.
const MAX_DIRTY_BYTES: u64 = 512 << 20;

/// Sets the kernel's readahead and dirty-memory limits of the FUSE mount whose device is
/// `dev` (`major:minor`), through `/sys/class/bdi`. Best effort: the defaults work, only slower.
pub fn tune_kernel_cache(dev: &str, read_only: bool) {
    let bdi = Path::new("/sys/class/bdi").join(dev);
    let mut settings = vec![("read_ahead_kb", READ_AHEAD_KB.to_string())];
    if !read_only && writeback_cache_wanted() {
        settings.push(("max_bytes", MAX_DIRTY_BYTES.to_string()));
    }
    for (knob, value) in settings {
        if let Err(e) = std::fs::write(bdi.join(knob), &value) {
            tracing::debug!(bdi = %bdi.display(), "cannot set {knob} = {value}: {e}");
        }
    }
}

/// Makes the kernel send every dirty page it caches for the filesystem mounted at `mountpoint`
/// (syncfs(2) on it), and waits until they are written to the daemon. Must not be called with
/// any lock the FUSE workers take.
pub fn flush_kernel_cache(mountpoint: &Path) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let with_path = |e: std::io::Error| {
        std::io::Error::new(
            e.kind(),
            format!(
                "flushing the kernel's cache of {}: {e}",
                mountpoint.display()
            ),
        )
    };
    let dir = std::fs::File::open(mountpoint).map_err(with_path)?;
    // SAFETY: syncfs takes a valid open file descriptor, which `dir` holds for the call.
    if unsafe { libc::syncfs(dir.as_raw_fd()) } == 0 {
        return Ok(());
    }
    // The error may be old: the kernel reports a writeback error that nobody saw yet to the
    // first syncfs after it, however long ago it happened (a full store refused some pages;
    // their writer was told at its fsync). A second syncfs on the same descriptor reports only
    // what failed during the first: when it succeeds, every dirty page reached the daemon.
    let first = std::io::Error::last_os_error();
    // SAFETY: as above.
    if unsafe { libc::syncfs(dir.as_raw_fd()) } == 0 {
        tracing::debug!(mountpoint = %mountpoint.display(), "syncfs reported an earlier writeback error: {first}");
        return Ok(());
    }
    Err(with_path(std::io::Error::last_os_error()))
}

impl VdbFs {
    pub fn new(ds: Arc<Dataset>, read_only: bool) -> VdbFs {
        VdbFs {
            ds,
            read_only,
            dir_handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            write_through: false,
            dsync_direct: false,
        }
    }

    /// How a file opened with `flags` is cached: an O_DSYNC (or O_SYNC) handle for writing
    /// bypasses the page cache (FOPEN_DIRECT_IO, and no FOPEN_KEEP_CACHE, so the open writes
    /// back and drops what the kernel cached of the file); every other handle keeps the cache.
    fn fopen_flags(&self, flags: i32) -> FopenFlags {
        if self.dsync_direct
            && flags & libc::O_DSYNC != 0
            && flags & libc::O_ACCMODE != libc::O_RDONLY
        {
            FopenFlags::FOPEN_DIRECT_IO
        } else {
            FopenFlags::FOPEN_KEEP_CACHE
        }
    }

    /// Logs faults (not user errors) where they are handled, then gives the errno.
    fn fail(&self, op: &str, ino: u64, e: Error) -> Errno {
        if errno::is_fault(&e) {
            tracing::error!(dataset = %self.ds.name, ino, "{op} failed: {e}");
        }
        errno::errno(&e)
    }

    /// [`attr`] with the stored block count of a regular file.
    fn attr_of(&self, ino: u64, m: &InodeMeta) -> FileAttr {
        let stored = if m.kind == FileKind::Regular {
            match self.ds.stored_blocks(ino) {
                Ok(n) => n,
                Err(e) => {
                    // The size stands in; a read of the file reports the fault.
                    tracing::warn!(dataset = %self.ds.name, ino, "cannot count the stored blocks: {e}");
                    None
                }
            }
        } else {
            None
        };
        attr(ino, m, stored)
    }

    /// In write-through mode, makes what was just done durable before it is answered.
    fn durable<T>(&self, v: T) -> Result<T> {
        if self.write_through {
            self.ds.fsync()?;
        }
        Ok(v)
    }

    fn writable(&self) -> Result<()> {
        if self.read_only {
            Err(Error::ReadOnly)
        } else {
            Ok(())
        }
    }

    fn entry(&self, op: &str, parent: u64, r: Result<(u64, InodeMeta)>, reply: ReplyEntry) {
        match r {
            Ok((ino, m)) => reply.entry(&TTL, &self.attr_of(ino, &m), Generation(0)),
            Err(e) => reply.error(self.fail(op, parent, e)),
        }
    }

    fn empty(&self, op: &str, ino: u64, r: Result<()>, reply: ReplyEmpty) {
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(self.fail(op, ino, e)),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn make(
        &self,
        req: &Request,
        parent: u64,
        name: &OsStr,
        kind: FileKind,
        perm: u32,
        rdev: u32,
        target: Option<&[u8]>,
    ) -> Result<(u64, InodeMeta)> {
        self.writable()?;
        self.ds.create(
            parent,
            name.as_bytes(),
            kind,
            perm,
            req.uid(),
            req.gid(),
            rdev,
            target,
        )
    }
}

impl Filesystem for VdbFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.add_capabilities(InitFlags::FUSE_PARALLEL_DIROPS);
        let _ = config.add_capabilities(InitFlags::FUSE_ASYNC_DIO);
        if !self.read_only && writeback_cache_wanted() {
            match config.add_capabilities(InitFlags::FUSE_WRITEBACK_CACHE) {
                Ok(()) => {
                    self.write_through = write_through_wanted();
                    self.dsync_direct = dsync_direct_wanted();
                }
                Err(missing) => tracing::info!(
                    dataset = %self.ds.name,
                    "the kernel does not offer {missing:?}: every write is a round trip"
                ),
            }
        }
        let _ = config.set_max_write(1 << 20);
        let _ = config.set_max_readahead(1 << 20);
        let _ = config.set_max_background(64);
        let _ = config.set_congestion_threshold(48);
        Ok(())
    }

    fn destroy(&mut self) {
        self.ds.forget_all();
    }

    fn forget(&self, _req: &Request, ino: INodeNo, _nlookup: u64) {
        self.ds.forget(ino.0);
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.entry(
            "lookup",
            parent.0,
            self.ds.lookup(parent.0, name.as_bytes()),
            reply,
        );
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.ds.getattr(ino.0) {
            Ok(m) => reply.attr(&TTL, &self.attr_of(ino.0, &m)),
            Err(e) => reply.error(self.fail("getattr", ino.0, e)),
        }
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
        let r = self.writable().and_then(|()| {
            self.ds.setattr(
                ino.0,
                SetAttr {
                    perm: mode,
                    uid,
                    gid,
                    size,
                    atime: time_or_now(atime),
                    mtime: time_or_now(mtime),
                },
            )
        });
        // Times alone are what the kernel sends before an fsync (it owns mtime under the
        // writeback cache): durable with the next write or checkpoint, as fdatasync allows.
        let r = if mode.is_some() || uid.is_some() || gid.is_some() || size.is_some() {
            r.and_then(|m| self.durable(m))
        } else {
            r
        };
        match r {
            Ok(m) => reply.attr(&TTL, &self.attr_of(ino.0, &m)),
            Err(e) => reply.error(self.fail("setattr", ino.0, e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.ds.readlink(ino.0) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(self.fail("readlink", ino.0, e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let r = match kind_of_mode(mode) {
            Some(FileKind::Directory) | Some(FileKind::Symlink) | None => {
                Err(Error::Invalid("mknod file type"))
            }
            Some(kind) => self.make(req, parent.0, name, kind, mode, rdev, None),
        };
        self.entry("mknod", parent.0, r, reply);
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let r = self.make(req, parent.0, name, FileKind::Directory, mode, 0, None);
        self.entry("mkdir", parent.0, r, reply);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = self
            .writable()
            .and_then(|()| self.ds.unlink(parent.0, name.as_bytes(), false));
        self.empty("unlink", parent.0, r, reply);
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = self
            .writable()
            .and_then(|()| self.ds.unlink(parent.0, name.as_bytes(), true));
        self.empty("rmdir", parent.0, r, reply);
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let t = target.as_os_str().as_bytes();
        let r = self.make(
            req,
            parent.0,
            link_name,
            FileKind::Symlink,
            0o777,
            0,
            Some(t),
        );
        self.entry("symlink", parent.0, r, reply);
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let r = self.writable().and_then(|()| {
            self.ds.rename(
                parent.0,
                name.as_bytes(),
                newparent.0,
                newname.as_bytes(),
                flags.bits(),
                (req.uid(), req.gid()),
            )
        });
        self.empty("rename", parent.0, r, reply);
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let r = self
            .writable()
            .and_then(|()| self.ds.link(ino.0, newparent.0, newname.as_bytes()))
            .map(|m| (ino.0, m));
        self.entry("link", ino.0, r, reply);
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let wants_write =
            flags.0 & libc::O_ACCMODE != libc::O_RDONLY || flags.0 & libc::O_TRUNC != 0;
        let r = if wants_write && self.read_only {
            Err(Error::ReadOnly)
        } else {
            self.ds.open(ino.0)
        };
        match r {
            Ok(_) => reply.opened(FileHandle(0), self.fopen_flags(flags.0)),
            Err(e) => reply.error(self.fail("open", ino.0, e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        READ_BUF.with(|b| {
            let mut b = b.borrow_mut();
            match self.ds.read_to(ino.0, offset, size, &mut b) {
                Ok(()) => reply.data(&b),
                Err(e) => reply.error(self.fail("read", ino.0, e)),
            }
        })
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        // `flags` carries O_DSYNC for a write that must be durable when it returns (an O_DSYNC
        // or O_SYNC handle, or pwritev2 with RWF_DSYNC): with FOPEN_DIRECT_IO the kernel sends
        // no FSYNC after it, so this answer is the sync.
        let dsync = flags.0 & libc::O_DSYNC != 0;
        match self
            .writable()
            .and_then(|()| self.ds.write(ino.0, offset, data))
            .and_then(|n| {
                if dsync {
                    self.ds.fsync().map(|()| n)
                } else {
                    self.durable(n)
                }
            }) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(self.fail("write", ino.0, e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.ds.release(ino.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.ds.fsync() {
            // Everything is durable already when answered: ENOSYS makes the kernel skip FSYNC
            // from now on (and report success for this one, which is durable).
            Ok(()) if self.write_through => reply.error(Errno::ENOSYS),
            r => self.empty("fsync", ino.0, r, reply),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.ds.readdir(ino.0) {
            Ok(entries) => {
                let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
                self.dir_handles.lock().insert(fh, entries);
                reply.opened(FileHandle(fh), FopenFlags::empty());
            }
            Err(e) => reply.error(self.fail("opendir", ino.0, e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let handles = self.dir_handles.lock();
        let Some(entries) = handles.get(&fh.0) else {
            reply.error(Errno::EBADF);
            return;
        };
        let dots = [
            (b".".as_slice(), ino.0, FileKind::Directory),
            (b"..".as_slice(), ROOT_INO, FileKind::Directory),
        ];
        let all = dots
            .into_iter()
            .chain(entries.iter().map(|(n, i, k)| (n.as_slice(), *i, *k)));
        for (i, (name, child, kind)) in all.enumerate().skip(offset as usize) {
            if reply.add(
                INodeNo(child),
                (i + 1) as u64,
                file_type(kind),
                OsStr::from_bytes(name),
            ) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.dir_handles.lock().remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.empty("fsyncdir", ino.0, self.ds.fsync(), reply);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.ds.store().statvfs() {
            Ok((free, total)) => {
                let bs = BLOCK_SIZE as u64;
                reply.statfs(
                    total / bs,
                    free / bs,
                    free / bs,
                    1 << 32,
                    1 << 31,
                    BLOCK_SIZE as u32,
                    255,
                    BLOCK_SIZE as u32,
                )
            }
            Err(e) => reply.error(self.fail("statfs", 0, e)),
        }
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // Permissions are checked by the kernel (default_permissions); existence here.
        self.empty("access", ino.0, self.ds.getattr(ino.0).map(|_| ()), reply);
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let r = self
            .make(req, parent.0, name, FileKind::Regular, mode, 0, None)
            .and_then(|(ino, _)| Ok((ino, self.ds.open(ino)?)));
        match r {
            Ok((ino, m)) => reply.created(
                &TTL,
                &self.attr_of(ino, &m),
                Generation(0),
                FileHandle(0),
                self.fopen_flags(flags),
            ),
            Err(e) => reply.error(self.fail("create", parent.0, e)),
        }
    }

    // Extended attributes are not supported: ENOSYS makes the kernel remember that and answer
    // EOPNOTSUPP itself from then on (no round trip per write for security.capability).
    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: fuser::ReplyXattr,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: fuser::ReplyXattr) {
        reply.error(Errno::ENOSYS);
    }

    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::ENOSYS);
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let r = self
            .writable()
            .and_then(|()| self.ds.fallocate(ino.0, offset, length, mode))
            .and_then(|()| self.durable(()));
        self.empty("fallocate", ino.0, r, reply);
    }
}
