//! Free space: a real reserve, so that a full filesystem never locks the store.
//!
//! The reserve is a ballast file, `STORE/reserve`, allocated ahead (`fallocate`, else written)
//! to 1/8 of the filesystem, at most 256 MiB. Nothing but the store's own work may have that
//! space: its checkpoints, recovery, collections and deletes, i.e. everything that writes the
//! index or appends with permission ([`Space::with_reserve`]). When such work finds the filesystem
//! with less than `headroom` free (someone else filled it: the staging postgres' logs, another
//! program, an administrator), it first gives up as much of the ballast as it needs
//! ([`Space::make_room`]), so the index never meets ENOSPC (redb refuses every later write
//! after a failed one) and a daemon always restarts. The ballast grows back ([`Space::refill`])
//! once collections or deletes made room again.
//!
//! Invariants:
//! - Ordinary appends (FUSE writes) are refused with `NoSpace` when the free space, counting the
//!   part of the ballast given up as used, is below `margin` plus the append: writers never eat
//!   into the reserve, and the margin stays free for checkpoints, which therefore seldom need
//!   the ballast.
//! - Growing the ballast back never changes what writers may use (it takes what they already
//!   count as used), so writers see a full store until the reserve could be whole again.
//! - Journal records (fsync) are not refused by the margin: they are small, and they make writes
//!   that were accepted durable.

use super::{Error, Result};
use parking_lot::Mutex;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

thread_local! {
    /// Set while this thread does the store's own work: its appends may use the reserve.
    static RESERVE_OK: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

const MIB: u64 = 1 << 20;

/// The ballast: 1/8 of the filesystem, at most 256 MiB.
fn reserve_for(total: u64) -> u64 {
    (total / 8).min(256 * MIB)
}

/// Writers stop this far above the reserve: 1/32 of the filesystem, 1 to 64 MiB.
fn margin_for(total: u64) -> u64 {
    (total / 32).clamp(MIB, 64 * MIB)
}

/// The store's own work gives up ballast when less than this is free: a quarter of the reserve,
/// 4 to 64 MiB (a checkpoint's tree objects and index pages, a pack header).
fn headroom_for(reserve: u64) -> u64 {
    (reserve / 4).clamp(4 * MIB, 64 * MIB)
}

/// Packs are closed past this size: 1/32 of the filesystem, 16 to 256 MiB, so that a
/// collection on a small, full filesystem can rewrite one pack with the room it has.
pub fn pack_target_for(total: u64) -> u64 {
    (total / 32).clamp(16 * MIB, 256 * MIB)
}

/// The ballast file of a store.
pub fn ballast_path(dir: &Path) -> PathBuf {
    dir.join("reserve")
}

/// What `vdbfs status` and the faults report about space.
#[derive(Clone, Copy, Debug)]
pub struct SpaceReport {
    /// Bytes free on the store's filesystem (statvfs `f_bavail`).
    pub free: u64,
    pub total: u64,
    /// Bytes the ballast holds now, and what it should hold.
    pub reserve_held: u64,
    pub reserve_target: u64,
    /// Writers stop when `free` minus the reserve given up is below this.
    pub margin: u64,
    /// Writers are refused now (less than a largest write request is left for them).
    pub full: bool,
}

impl SpaceReport {
    /// What writers may still use.
    pub fn writable(&self) -> u64 {
        self.free
            .saturating_sub(self.reserve_target.saturating_sub(self.reserve_held))
            .saturating_sub(self.margin)
    }
}

pub struct Space {
    dir: PathBuf,
    total: u64,
    target: u64,
    margin: u64,
    headroom: u64,
    /// Bytes the ballast holds.
    held: AtomicU64,
    /// Serializes changes of the ballast.
    ballast: Mutex<()>,
    /// What writers could use at the last statvfs, and what was appended since.
    writable_estimate: AtomicU64,
    appended_since_check: AtomicU64,
    /// The last check refused a writer.
    refusing: AtomicBool,
    /// Ballast was given up since it was last whole.
    gave_up: AtomicBool,
}

impl Space {
    /// The space of the store in `dir` (the ballast is measured, not changed).
    pub fn open(dir: &Path) -> Space {
        let total = statvfs_of(dir).map(|(_, t)| t).unwrap_or(0);
        let target = reserve_for(total);
        let held = held_by(&ballast_path(dir));
        Space {
            dir: dir.to_path_buf(),
            total,
            target,
            margin: margin_for(total),
            headroom: headroom_for(target),
            held: AtomicU64::new(held),
            ballast: Mutex::new(()),
            writable_estimate: AtomicU64::new(0),
            appended_since_check: AtomicU64::new(u64::MAX / 2),
            refusing: AtomicBool::new(false),
            gave_up: AtomicBool::new(false),
        }
    }

    /// Size of the filesystem under the store when it was opened.
    pub fn total(&self) -> u64 {
        self.total
    }

    fn missing(&self) -> u64 {
        self.target
            .saturating_sub(self.held.load(Ordering::Relaxed))
    }

    /// Refuses an ordinary append of `len` bytes that would eat into the margin or the reserve.
    pub fn check(&self, len: u64) -> Result<()> {
        if RESERVE_OK.with(|r| r.get()) {
            return Ok(());
        }
        let since = self.appended_since_check.fetch_add(len, Ordering::Relaxed);
        let writable = self.writable_estimate.load(Ordering::Relaxed);
        if since + len < writable / 2 {
            return Ok(());
        }
        let (free, _) = self.statvfs()?;
        let writable = free
            .saturating_sub(self.missing())
            .saturating_sub(self.margin);
        self.writable_estimate.store(writable, Ordering::Relaxed);
        self.appended_since_check.store(0, Ordering::Relaxed);
        if writable < len {
            if !self.refusing.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    free,
                    reserve = self.held.load(Ordering::Relaxed),
                    "store full: writes to datasets get ENOSPC until space is freed"
                );
            }
            return Err(Error::NoSpace);
        }
        if self.refusing.swap(false, Ordering::Relaxed) {
            tracing::info!(free, "the store has room again: writes are accepted");
        }
        Ok(())
    }

    /// Runs `f` with permission to use the reserve (checkpoints, snapshots, collections),
    /// giving up ballast first when the filesystem is nearly full.
    pub fn with_reserve<R>(&self, f: impl FnOnce() -> R) -> R {
        if let Err(e) = self.make_room("the store's own writes") {
            tracing::error!("cannot measure the free space of the store: {e}");
        }
        RESERVE_OK.with(|r| {
            let old = r.replace(true);
            let out = f();
            r.set(old);
            out
        })
    }

    /// Before the store's own work writes: when less than `headroom` (or `need`, if larger) is
    /// free, shrinks the ballast by what is missing (all of it at most).
    pub fn make_room_for(&self, need: u64, what: &str) -> Result<()> {
        let need = need.max(self.headroom);
        if self.held.load(Ordering::Relaxed) == 0 {
            return Ok(());
        }
        let (free, _) = self.statvfs()?;
        if free >= need {
            return Ok(());
        }
        let _g = self.ballast.lock();
        let (free, _) = self.statvfs()?;
        let held = self.held.load(Ordering::Relaxed);
        if free >= need || held == 0 {
            return Ok(());
        }
        let give = (need - free).next_multiple_of(MIB).min(held);
        let path = ballast_path(&self.dir);
        let r = OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_len(held - give));
        let now = held_by(&path);
        self.held.store(now, Ordering::Relaxed);
        self.gave_up.store(true, Ordering::Relaxed);
        match r {
            Ok(()) => {
                tracing::warn!(
                    free,
                    given_up = held - now,
                    reserve_left = now,
                    "the store's filesystem is full: gave up part of the reserve ({}) for {what}",
                    path.display()
                );
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// [`Space::make_room_for`] the default headroom.
    pub fn make_room(&self, what: &str) -> Result<()> {
        self.make_room_for(0, what)
    }

    /// The room the store's own work can count on now: what is free plus the ballast, less
    /// the headroom.
    pub fn room(&self) -> Result<u64> {
        let (free, _) = self.statvfs()?;
        Ok((free + self.held.load(Ordering::Relaxed)).saturating_sub(self.headroom))
    }

    /// Grows the ballast back towards its size when there is room (it takes only space that
    /// writers already count as used). Returns the bytes it holds now.
    pub fn refill(&self) -> Result<u64> {
        let held = self.held.load(Ordering::Relaxed);
        if held >= self.target {
            return Ok(held);
        }
        let _g = self.ballast.lock();
        let (free, _) = self.statvfs()?;
        let held = self.held.load(Ordering::Relaxed);
        let grow = (self.target - held).min(free.saturating_sub(2 * self.headroom));
        if grow < MIB.min(self.target - held) {
            return Ok(held);
        }
        let path = ballast_path(&self.dir);
        let r = grow_file(&path, held + grow);
        let now = held_by(&path);
        self.held.store(now, Ordering::Relaxed);
        if now >= self.target && self.gave_up.swap(false, Ordering::Relaxed) {
            tracing::info!(bytes = now, "the store's reserve is whole again");
        }
        r.map(|()| now)
    }

    /// Creates the ballast of a new store (as much as fits).
    pub fn create_ballast(dir: &Path) -> Result<()> {
        let s = Space::open(dir);
        s.refill()?;
        Ok(())
    }

    /// Free and total bytes of the filesystem under the store.
    pub fn statvfs(&self) -> Result<(u64, u64)> {
        statvfs_of(&self.dir)
    }

    pub fn report(&self) -> Result<SpaceReport> {
        let (free, total) = self.statvfs()?;
        let held = self.held.load(Ordering::Relaxed);
        let mut r = SpaceReport {
            free,
            total,
            reserve_held: held,
            reserve_target: self.target,
            margin: self.margin,
            full: false,
        };
        // Less than one largest write request (1 MiB) and its record headers.
        r.full = r.writable() < 2 * MIB;
        Ok(r)
    }
}

/// Bytes a ballast file holds on disk (0 when it does not exist).
fn held_by(path: &Path) -> u64 {
    match std::fs::metadata(path) {
        Ok(m) => m.len().min(m.blocks() * 512),
        Err(_) => 0,
    }
}

/// Makes the ballast `len` bytes long, allocated: fallocate, or (where the filesystem has no
/// fallocate) written with bytes that do not compress, so that the space is really taken.
fn grow_file(path: &Path, len: u64) -> Result<()> {
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(path)?;
    // The whole range: allocating what is allocated already costs nothing, and a file a crash
    // left with holes is filled.
    // SAFETY: fallocate on a descriptor this function owns; no memory is involved.
    let rc = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, len as i64) };
    if rc == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
        return Err(e.into());
    }
    // Written files have no holes: only what is missing at the end.
    let from = f.metadata()?.len().min(len);
    write_noise(&f, from, len)
}

fn write_noise(f: &File, from: u64, to: u64) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15 ^ from;
    let chunk: Vec<u8> = (0..MIB)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();
    let mut at = from;
    while at < to {
        let n = (to - at).min(MIB) as usize;
        f.write_all_at(&chunk[..n], at)?;
        at += n as u64;
    }
    f.sync_data()?;
    Ok(())
}

fn statvfs_of(dir: &Path) -> Result<(u64, u64)> {
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
        .map_err(|_| Error::Invalid("store path"))?;
    // SAFETY: statvfs is plain old data; all-zero bytes are a valid value.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is a valid NUL-terminated path and s a valid out pointer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok((
        s.f_bavail as u64 * s.f_frsize as u64,
        s.f_blocks as u64 * s.f_frsize as u64,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_scale_with_the_filesystem() {
        let small = 320 * MIB;
        assert_eq!(reserve_for(small), 40 * MIB);
        assert_eq!(margin_for(small), 10 * MIB);
        assert_eq!(headroom_for(reserve_for(small)), 10 * MIB);
        assert_eq!(pack_target_for(small), 16 * MIB);
        let big = 4 << 40;
        assert_eq!(reserve_for(big), 256 * MIB);
        assert_eq!(margin_for(big), 64 * MIB);
        assert_eq!(pack_target_for(big), 256 * MIB);
    }

    /// The ballast gives up what the store's own work needs and grows back; writers never
    /// count the part given up as free.
    #[test]
    fn the_ballast_is_given_up_only_on_demand_and_grows_back() {
        let dir = tempfile::tempdir().unwrap();
        Space::create_ballast(dir.path()).unwrap();
        let s = Space::open(dir.path());
        let r = s.report().unwrap();
        if r.free < 4 * r.reserve_target {
            eprintln!("skipped: {} free on the test filesystem", r.free);
            return;
        }
        assert_eq!(r.reserve_held, r.reserve_target, "{r:?}");
        // Plenty free: nothing is given up.
        s.make_room("a test").unwrap();
        assert_eq!(s.report().unwrap().reserve_held, r.reserve_target);
        // Asking for more than is free gives up ballast (here: all of it).
        s.make_room_for(r.free + r.reserve_target * 2, "a test")
            .unwrap();
        let after = s.report().unwrap();
        assert_eq!(after.reserve_held, 0, "{after:?}");
        assert!(
            after.writable() <= r.writable() + MIB,
            "writers must not gain what the reserve gave up: {r:?} -> {after:?}"
        );
        assert_eq!(s.refill().unwrap(), r.reserve_target);
    }
}
