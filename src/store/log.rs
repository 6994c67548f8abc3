//! The log writer: records are appended to the active pack through an in-memory tail and
//! written in whole, aligned 4 KiB blocks; an fsync is one write of what is new (`RWF_DSYNC`,
//! or a write and an fdatasync), shared by every caller waiting at that moment (group commit).
//!
//! Invariants:
//! - An append only copies into `Tail::buf` (no system call). The bytes of the active pack
//!   from `Tail::base` (4 KiB-aligned) to its end live in `Tail::buf`; bytes before `base` are in
//!   the file and are never written again. The block holding `base` is rewritten by every flush
//!   until it is full, so it is always read from memory, never from the file.
//! - One flush at a time (`Tail::flushing`): the flusher swaps the buffer out under the lock,
//!   writes it without the lock, then advances `written` (and `synced`/`durable` for a sync).
//!   Bytes being written are read from the swapped-out buffer (`Tail::inflight`).
//! - `durable` only grows, and only after the bytes below it are on stable storage; a record's
//!   header carries a lower bound of it (FORMAT.md, "Record").
//! - A write error other than ENOSPC, or any sync error, poisons the log: nothing is reported
//!   durable again until the store is reopened. After ENOSPC the unwritten bytes stay buffered.
//! - The active pack is zero-filled ahead of its end (`allocated`) after syncs, so a synced
//!   write overwrites allocated blocks and needs no filesystem metadata commit. The zero-fill
//!   runs beside the writer on a range it announces (`Tail::prefilling`) that starts past the
//!   log end; a write that would reach into that range waits for it.
//! - Packs before the active one were synced in full when they were closed.

use super::io::{AlignedBuf, PackFile, PackIo, ALIGN};
use super::{pack_path, Error, Result};
use parking_lot::{Condvar, Mutex, MutexGuard};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use vdbfs_format::index::LogPos;
use vdbfs_format::pack::{self, PACK_HEADER_LEN};

/// An append that finds this much unwritten data in the tail writes it out (no sync).
const FLUSH_AT: usize = 4 << 20;
/// Appenders wait while this much is buffered and a flush is already under way.
const HARD_CAP: usize = 64 << 20;
/// After a sync the active pack is zero-filled this far ahead of the log end (when less than
/// half of it is left): a log that syncs at every commit grows by tens of MiB/s under load.
/// Bulk writes outrun it and simply extend the file.
const PREFILL_WINDOW: u64 = 16 << 20;
/// Prefill writes this much at a time.
const PREFILL_CHUNK: usize = 2 << 20;
/// Prefill starts at least this far past the log end, so the writer rarely meets it.
const PREFILL_GAP: u64 = 1 << 20;

fn align_down(x: u64) -> u64 {
    x & !(ALIGN as u64 - 1)
}

fn align_up(x: u64) -> u64 {
    x.div_ceil(ALIGN as u64) * ALIGN as u64
}

fn encode_pos(p: LogPos) -> u64 {
    ((p.pack as u64) << 32) | p.offset.min(u32::MAX as u64)
}

fn decode_pos(v: u64) -> LogPos {
    LogPos {
        pack: (v >> 32) as u32,
        offset: v & u32::MAX as u64,
    }
}

struct Tail {
    no: u32,
    file: Arc<dyn PackFile>,
    /// File offset of `buf[0]`; 4 KiB-aligned.
    base: u64,
    buf: AlignedBuf,
    /// Bytes before this offset are in the file (not necessarily durable).
    written: u64,
    /// Bytes before this offset are durable.
    synced: u64,
    /// The file exists (written or zero-filled) up to here.
    allocated: u64,
    flushing: bool,
    /// The pack is being closed: appends wait (they belong in the next pack).
    rolling: bool,
    /// The range the zero-fill is writing now (beside the writer; see the module docs).
    prefilling: Option<(u64, u64)>,
    /// While a flush runs: the file offset of the swapped-out buffer and the buffer.
    inflight: Option<(u64, Arc<AlignedBuf>)>,
    spare: AlignedBuf,
}

impl Tail {
    fn end(&self) -> u64 {
        self.base + self.buf.len() as u64
    }
}

struct Shared {
    dir: PathBuf,
    io: Arc<dyn PackIo>,
    tail: Mutex<Tail>,
    /// Writers, syncers and appenders waiting for a flush, a roll or a zero-fill.
    cv: Condvar,
    /// The zero-fill thread waits here (apart, so that a flush wakes no one who is not waiting
    /// for it).
    prefill_cv: Condvar,
    durable: AtomicU64,
    poisoned: AtomicBool,
    stop: AtomicBool,
    prefill_wanted: AtomicBool,
    /// A pack is closed and a new one started once it grows past this size.
    pack_target: u64,
}

pub struct Log {
    sh: Arc<Shared>,
    prefiller: Option<std::thread::JoinHandle<()>>,
}

/// Where an appended record landed.
#[derive(Clone, Copy, Debug)]
pub struct Appended {
    pub pack: u32,
    pub offset: u64,
}

impl Log {
    /// Starts a new active pack `no` in `dir` (which must not exist yet); packs are closed past
    /// `pack_target` bytes.
    pub fn start(
        dir: &Path,
        io: Arc<dyn PackIo>,
        no: u32,
        pack_target: u64,
    ) -> Result<(Log, Arc<dyn PackFile>)> {
        let file = create_pack(&*io, dir, no)?;
        let mut buf = AlignedBuf::with_capacity(FLUSH_AT + ALIGN);
        buf.extend_from_slice(&pack::encode_pack_header(no));
        let tail = Tail {
            no,
            file: file.clone(),
            base: 0,
            buf,
            written: PACK_HEADER_LEN as u64,
            synced: PACK_HEADER_LEN as u64,
            allocated: ALIGN as u64,
            flushing: false,
            rolling: false,
            prefilling: None,
            inflight: None,
            spare: AlignedBuf::with_capacity(FLUSH_AT + ALIGN),
        };
        let sh = Arc::new(Shared {
            dir: dir.to_path_buf(),
            io,
            tail: Mutex::new(tail),
            cv: Condvar::new(),
            prefill_cv: Condvar::new(),
            durable: AtomicU64::new(encode_pos(LogPos {
                pack: no,
                offset: PACK_HEADER_LEN as u64,
            })),
            poisoned: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            prefill_wanted: AtomicBool::new(false),
            pack_target,
        });
        let sh2 = sh.clone();
        let prefiller = std::thread::Builder::new()
            .name("vdbfs-prefill".into())
            .spawn(move || prefill_loop(&sh2))?;
        Ok((
            Log {
                sh,
                prefiller: Some(prefiller),
            },
            file,
        ))
    }

    pub fn check_poisoned(&self) -> Result<()> {
        if self.sh.poisoned.load(Ordering::SeqCst) {
            Err(Error::Poisoned)
        } else {
            Ok(())
        }
    }

    /// The position the next append will take.
    pub fn end(&self) -> LogPos {
        let t = self.sh.tail.lock();
        LogPos {
            pack: t.no,
            offset: t.end(),
        }
    }

    /// Number of the active pack.
    pub fn active(&self) -> u32 {
        self.sh.tail.lock().no
    }

    /// A lower bound of the durable end of the log (for record headers).
    pub fn durable(&self) -> LogPos {
        decode_pos(self.sh.durable.load(Ordering::SeqCst))
    }

    /// Appends encoded records (one or more, back to back); returns where they start. Only
    /// copies, unless the buffer is large (then it is written out) or the pack is full (then
    /// it is closed and the next one started). `new_pack` is told about a started pack.
    pub fn append(
        &self,
        recs: &[&[u8]],
        new_pack: &mut dyn FnMut(u32, Arc<dyn PackFile>),
    ) -> Result<Appended> {
        self.check_poisoned()?;
        let mut t = self.sh.tail.lock();
        while t.rolling {
            self.sh.cv.wait(&mut t);
        }
        // Much unwritten data: write it out first (no sync). Its failure (ENOSPC) fails this
        // append, so what is buffered stays bounded; the buffered bytes are kept.
        while t.end() - t.written >= FLUSH_AT as u64 {
            if t.flushing {
                if t.buf.len() < HARD_CAP {
                    break;
                }
                self.sh.cv.wait(&mut t);
                continue;
            }
            t = self.flush_locked(t, false)?;
        }
        if t.end() >= self.sh.pack_target {
            t = self.roll_locked(t, new_pack)?;
        }
        let at = Appended {
            pack: t.no,
            offset: t.end(),
        };
        t.buf.extend_from_slices(recs);
        Ok(at)
    }

    /// Closes the active pack if it holds more than `min` bytes (so a collection can rewrite
    /// it).
    pub fn roll_if_larger(
        &self,
        min: u64,
        new_pack: &mut dyn FnMut(u32, Arc<dyn PackFile>),
    ) -> Result<()> {
        let t = self.sh.tail.lock();
        if t.end() > min {
            drop(self.roll_locked(t, new_pack)?);
        }
        Ok(())
    }

    /// Makes everything appended before `upto` durable; returns the durable end.
    pub fn sync_to(&self, upto: LogPos) -> Result<LogPos> {
        loop {
            self.check_poisoned()?;
            let d = self.durable();
            if d >= upto {
                return Ok(d);
            }
            let t = self.sh.tail.lock();
            if decode_pos(self.sh.durable.load(Ordering::SeqCst)) >= upto {
                continue;
            }
            if t.flushing {
                let mut t = t;
                self.sh.cv.wait(&mut t);
                continue;
            }
            drop(self.flush_locked(t, true)?);
        }
    }

    /// Syncs everything appended so far.
    pub fn sync_all(&self) -> Result<LogPos> {
        self.sync_to(self.end())
    }

    /// Reads `out.len()` bytes at `offset` of pack `no` into `out` if that pack is the active
    /// one; returns false (and reads nothing) for a closed pack. Bytes from the oldest one still
    /// in memory (the block being rewritten, or a write in flight) on come from memory; bytes
    /// before it are final in the file.
    pub fn read_active(&self, no: u32, offset: u64, out: &mut [u8]) -> Result<bool> {
        let t = self.sh.tail.lock();
        if no != t.no {
            return Ok(false);
        }
        let end = offset + out.len() as u64;
        if end > t.end() {
            return Err(Error::Io(std::io::Error::from(
                std::io::ErrorKind::UnexpectedEof,
            )));
        }
        let inflight = t.inflight.clone();
        let mem_lo = inflight
            .as_ref()
            .map_or(t.base, |(ib, _)| (*ib).min(t.base));
        // The part in memory, copied under the lock (the tail buffer changes without it).
        if end > mem_lo {
            let lo = offset.max(mem_lo);
            let mut pos = lo;
            while pos < end {
                let dst = &mut out[(pos - offset) as usize..];
                let n = if pos >= t.base {
                    let from = (pos - t.base) as usize;
                    let n = (end - pos) as usize;
                    dst[..n].copy_from_slice(&t.buf.as_slice()[from..from + n]);
                    n
                } else {
                    // Below the tail buffer: in the buffer being written.
                    let (ib, ibuf) = inflight.as_ref().ok_or_else(|| {
                        Error::Io(std::io::Error::other(
                            "log bytes neither written nor buffered",
                        ))
                    })?;
                    let from = (pos - ib) as usize;
                    let n = ((t.base - pos) as usize).min((end - pos) as usize);
                    dst[..n].copy_from_slice(&ibuf.as_slice()[from..from + n]);
                    n
                };
                pos += n as u64;
            }
        }
        let file = t.file.clone();
        drop(t);
        if offset >= mem_lo {
            return Ok(true);
        }
        // Final bytes in the file. Written directly: read directly, aligned (the page cache
        // never holds pages of the active pack, so no stale page can be read later).
        let disk_end = end.min(mem_lo);
        let part = &mut out[..(disk_end - offset) as usize];
        if !file.direct() {
            file.read_exact_at(part, offset)?;
            return Ok(true);
        }
        let from = align_down(offset);
        let mut pages = AlignedBuf::zeroed((align_up(disk_end) - from) as usize);
        file.read_log_at(pages.padded_mut(), from)?;
        let at = (offset - from) as usize;
        part.copy_from_slice(&pages.as_slice()[at..at + part.len()]);
        Ok(true)
    }

    /// Becomes the flusher and writes everything buffered; with `sync`, durably. Returns the
    /// lock again.
    fn flush_locked<'a>(
        &'a self,
        mut t: MutexGuard<'a, Tail>,
        sync: bool,
    ) -> Result<MutexGuard<'a, Tail>> {
        debug_assert!(!t.flushing);
        if t.written == t.end() && (!sync || t.synced == t.end()) {
            return Ok(t);
        }
        t.flushing = true;
        // A zero-fill running where this write goes finishes first.
        while t.prefilling.is_some_and(|(lo, _)| lo < align_up(t.end())) {
            self.sh.cv.wait(&mut t);
        }
        let end = t.end();
        let from = align_down(t.written);
        let new_base = align_down(end);
        let out_base = t.base;
        let mut fresh = std::mem::take(&mut t.spare);
        fresh.clear();
        fresh.extend_from_slice(&t.buf.as_slice()[(new_base - out_base) as usize..]);
        let out = Arc::new(std::mem::replace(&mut t.buf, fresh));
        t.base = new_base;
        t.inflight = Some((out_base, out.clone()));
        // Everything in the file before this write is durable: a synced write of its own covers
        // it. Otherwise write, then fdatasync (which flushes the device cache for all of it).
        let dsync = sync && t.synced == t.written;
        let file = t.file.clone();
        let no = t.no;
        drop(t);

        let lo = (from - out_base) as usize;
        let hi = (align_up(end) - out_base) as usize;
        // A failed write may be retried (ENOSPC); a failed sync never: the kernel may have
        // dropped the dirty pages it could not write.
        let mut sync_failed = false;
        let mut r = file.write_log_at(&out.padded()[lo..hi], from, dsync);
        if r.is_ok() && sync && !dsync {
            r = file.sync_data();
            sync_failed = r.is_err();
        }

        let mut t = self.sh.tail.lock();
        t.inflight = None;
        t.flushing = false;
        let result = match r {
            Ok(()) => {
                t.written = end;
                t.allocated = t.allocated.max(align_up(end));
                if sync {
                    t.synced = end;
                    self.sh.durable.store(
                        encode_pos(LogPos {
                            pack: no,
                            offset: end,
                        }),
                        Ordering::SeqCst,
                    );
                    if t.allocated < end + PREFILL_WINDOW / 2
                        && !self.sh.prefill_wanted.swap(true, Ordering::SeqCst)
                    {
                        self.sh.prefill_cv.notify_one();
                    }
                }
                Ok(())
            }
            Err(e) => {
                // Put the bytes back in front of what was appended meanwhile.
                let mut back = AlignedBuf::with_capacity(out.len() + t.buf.len());
                back.extend_from_slice(&out.as_slice()[..(new_base - out_base) as usize]);
                back.extend_from_slice(t.buf.as_slice());
                t.buf = back;
                t.base = out_base;
                let e = Error::from(e);
                if sync_failed || !matches!(e, Error::NoSpace) {
                    tracing::error!(
                        pack = no,
                        "writing the log failed: {e}; the store is read-only until restart"
                    );
                    self.sh.poisoned.store(true, Ordering::SeqCst);
                }
                Err(e)
            }
        };
        if let Ok(mut b) = Arc::try_unwrap(out) {
            b.clear();
            if t.spare.is_empty() {
                t.spare = b;
            }
        }
        self.sh.cv.notify_all();
        result.map(|()| t)
    }

    /// Syncs and closes the active pack (cut to its end) and starts the next one.
    fn roll_locked<'a>(
        &'a self,
        mut t: MutexGuard<'a, Tail>,
        new_pack: &mut dyn FnMut(u32, Arc<dyn PackFile>),
    ) -> Result<MutexGuard<'a, Tail>> {
        while t.rolling {
            self.sh.cv.wait(&mut t);
        }
        t.rolling = true;
        // Appends made while a flush runs wait now; write everything, durably.
        loop {
            while t.flushing {
                self.sh.cv.wait(&mut t);
            }
            let end = t.end();
            if t.synced == end {
                break;
            }
            t = match self.flush_locked(t, true) {
                Ok(t) => t,
                Err(e) => {
                    let mut t = self.sh.tail.lock();
                    t.rolling = false;
                    self.sh.cv.notify_all();
                    return Err(e);
                }
            };
        }
        while t.prefilling.is_some() {
            self.sh.cv.wait(&mut t);
        }
        let end = t.end();
        let created = match t.file.set_len(end) {
            Ok(()) => create_pack(&*self.sh.io, &self.sh.dir, t.no + 1),
            Err(e) => Err(e.into()),
        };
        t.rolling = false;
        self.sh.cv.notify_all();
        let file = created?;
        let no = t.no + 1;
        new_pack(no, file.clone());
        let mut buf = std::mem::take(&mut t.spare);
        buf.clear();
        buf.extend_from_slice(&pack::encode_pack_header(no));
        t.no = no;
        t.file = file;
        t.base = 0;
        t.buf = buf;
        t.written = PACK_HEADER_LEN as u64;
        t.synced = PACK_HEADER_LEN as u64;
        t.allocated = ALIGN as u64;
        self.sh.durable.store(
            encode_pos(LogPos {
                pack: no,
                offset: PACK_HEADER_LEN as u64,
            }),
            Ordering::SeqCst,
        );
        Ok(t)
    }
}

impl Drop for Log {
    fn drop(&mut self) {
        self.sh.stop.store(true, Ordering::SeqCst);
        self.sh.cv.notify_all();
        self.sh.prefill_cv.notify_all();
        if let Some(h) = self.prefiller.take() {
            let _ = h.join();
        }
    }
}

/// Creates pack `no`: its header written and synced, then the directory synced. A creation
/// that fails (a full disk) removes the file again, so the next attempt can create it.
fn create_pack(io: &dyn PackIo, dir: &Path, no: u32) -> Result<Arc<dyn PackFile>> {
    let path = pack_path(dir, no);
    let file = io.create(&path)?;
    let mut first = AlignedBuf::with_capacity(ALIGN);
    first.extend_from_slice(&pack::encode_pack_header(no));
    let r = file
        .write_log_at(first.padded(), 0, true)
        .and_then(|()| io.sync_dir(&dir.join("packs")));
    if let Err(e) = r {
        drop(file);
        let _ = io.remove(&path);
        return Err(e.into());
    }
    Ok(file)
}

/// Zero-fills the active pack ahead of its end when a sync asked for it (see the module docs),
/// beside the writer, a chunk at a time.
fn prefill_loop(sh: &Shared) {
    let zeros = AlignedBuf::zeroed(PREFILL_CHUNK);
    loop {
        {
            let mut t = sh.tail.lock();
            while !sh.stop.load(Ordering::SeqCst) && !sh.prefill_wanted.load(Ordering::SeqCst) {
                sh.prefill_cv.wait(&mut t);
            }
        }
        if sh.stop.load(Ordering::SeqCst) {
            return;
        }
        sh.prefill_wanted.store(false, Ordering::SeqCst);
        loop {
            let mut t = sh.tail.lock();
            if sh.poisoned.load(Ordering::SeqCst) || sh.stop.load(Ordering::SeqCst) {
                return;
            }
            let end = t.end();
            let from = t.allocated.max(align_up(end + PREFILL_GAP));
            let goal = (end + PREFILL_WINDOW).min(sh.pack_target);
            if from >= goal || t.rolling || end >= sh.pack_target {
                break;
            }
            let len = align_up(((goal - from) as usize).min(PREFILL_CHUNK) as u64) as usize;
            t.prefilling = Some((from, from + len as u64));
            let file = t.file.clone();
            drop(t);
            let r = file.write_log_at(&zeros.padded()[..len], from, false);
            let mut t = sh.tail.lock();
            t.prefilling = None;
            // Bytes the writer put past `from` meanwhile are not there: it waited for us.
            if r.is_ok() && Arc::ptr_eq(&t.file, &file) {
                t.allocated = t.allocated.max(from + len as u64);
            }
            sh.cv.notify_all();
            if r.is_err() {
                break; // a full disk only means slower syncs
            }
        }
    }
}
