//! Free space: the reserve that keeps checkpoints possible on a nearly full filesystem.
//!
//! Invariant: ordinary appends (FUSE writes) are refused with `NoSpace` before they would eat
//! into the reserve; checkpoints, snapshots and collections run with permission to use it
//! (`with_reserve`), so a full disk fails the writer, never the index commit.

use super::{Error, Result};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

thread_local! {
    /// Set while this thread checkpoints: its appends may use the space reserve.
    static RESERVE_OK: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The space reserve: 1/8 of the store's filesystem, at most 256 MiB.
fn reserve_for(total: u64) -> u64 {
    (total / 8).min(256 << 20)
}

pub struct Space {
    dir: PathBuf,
    /// Bytes of the store's filesystem kept free for checkpoints.
    reserve: u64,
    free_estimate: AtomicU64,
    appended_since_check: AtomicU64,
}

impl Space {
    pub fn new(dir: &Path) -> Space {
        Space {
            dir: dir.to_path_buf(),
            reserve: reserve_for(statvfs_of(dir).map(|(_, total)| total).unwrap_or(0)),
            free_estimate: AtomicU64::new(0),
            appended_since_check: AtomicU64::new(u64::MAX / 2),
        }
    }

    /// Refuses an ordinary append of `len` bytes that would eat into the reserve.
    pub fn check(&self, len: u64) -> Result<()> {
        if RESERVE_OK.with(|r| r.get()) {
            return Ok(());
        }
        let since = self.appended_since_check.fetch_add(len, Ordering::Relaxed);
        let free = self.free_estimate.load(Ordering::Relaxed);
        if since + len < free.saturating_sub(self.reserve) / 2 {
            return Ok(());
        }
        let (free, _) = self.statvfs()?;
        self.free_estimate.store(free, Ordering::Relaxed);
        self.appended_since_check.store(0, Ordering::Relaxed);
        if free < self.reserve + len {
            return Err(Error::NoSpace);
        }
        Ok(())
    }

    /// Runs `f` with permission to use the space reserve (checkpoints, snapshots, GC copies).
    pub fn with_reserve<R>(&self, f: impl FnOnce() -> R) -> R {
        RESERVE_OK.with(|r| {
            let old = r.replace(true);
            let out = f();
            r.set(old);
            out
        })
    }

    /// Free and total bytes of the filesystem under the store.
    pub fn statvfs(&self) -> Result<(u64, u64)> {
        statvfs_of(&self.dir)
    }
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
