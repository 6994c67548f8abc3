//! The I/O seam of the block store: every byte the store writes to pack files goes through
//! [`PackIo`], so tests can inject faults (ENOSPC, EIO) and simulate a crash that loses whatever
//! was written after the last sync.
//!
//! The log (see `log.rs`) writes the active pack with [`PackFile::write_log_at`]: whole 4 KiB
//! blocks at 4 KiB-aligned offsets, from [`AlignedBuf`]s. On a filesystem that supports it the
//! real implementation uses `O_DIRECT` for these writes (no page cache, no writeback work at
//! fdatasync) and `RWF_DSYNC` for a write that must be durable on return; elsewhere (tmpfs, some
//! network filesystems) it falls back to buffered writes and `fdatasync`.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::Arc;

/// Alignment (and granularity) of log writes.
pub const ALIGN: usize = 4096;

/// One aligned block of an [`AlignedBuf`].
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C, align(4096))]
pub struct Page([u8; ALIGN]);

/// A growable byte buffer whose start is 4 KiB-aligned and whose bytes past `len` up to the
/// next 4 KiB boundary are zero, so any 4 KiB-aligned prefix of it can be handed to an
/// `O_DIRECT` write as is.
#[derive(Default)]
pub struct AlignedBuf {
    pages: Vec<Page>,
    len: usize,
}

impl AlignedBuf {
    pub fn with_capacity(bytes: usize) -> AlignedBuf {
        AlignedBuf {
            pages: Vec::with_capacity(bytes.div_ceil(ALIGN)),
            len: 0,
        }
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The bytes written so far.
    pub fn as_slice(&self) -> &[u8] {
        &bytemuck::cast_slice::<Page, u8>(&self.pages)[..self.len]
    }
    /// The bytes up to `len` rounded up to a whole block (the tail is zeros).
    pub fn padded(&self) -> &[u8] {
        bytemuck::cast_slice::<Page, u8>(&self.pages)
    }
    /// `len` zero bytes.
    pub fn zeroed(len: usize) -> AlignedBuf {
        AlignedBuf {
            pages: vec![Page([0; ALIGN]); len.div_ceil(ALIGN)],
            len,
        }
    }
    /// The bytes up to `len` rounded up to a whole block, to read into.
    pub fn padded_mut(&mut self) -> &mut [u8] {
        bytemuck::cast_slice_mut::<Page, u8>(&mut self.pages)
    }
    pub fn extend_from_slice(&mut self, data: &[u8]) {
        self.extend_from_slices(&[data]);
    }
    /// Appends the slices one after the other. New pages are not zeroed before they are
    /// written: the bytes go straight into them and only the rest of the last page is zeroed
    /// (a bulk write used to fill every page with zeros and then copy over them).
    pub fn extend_from_slices(&mut self, parts: &[&[u8]]) {
        let end = self.len + parts.iter().map(|p| p.len()).sum::<usize>();
        let pages = end.div_ceil(ALIGN);
        let have = self.pages.len();
        self.pages.reserve(pages.saturating_sub(have));
        // SAFETY: the capacity holds max(pages, have) pages. The copies write [self.len, end):
        // inside the initialized pages, or, past them, into the capacity reserved above. The
        // new pages (if any) are initialized before `set_len` makes them part of the vector:
        // up to `end` by the copies (self.len <= the old pages' end) and [end, pages * ALIGN)
        // by the zero fill. Bytes past `end` in the old pages are zero already (the invariant).
        // `Page` is plain bytes, so any bytes are a valid value.
        unsafe {
            let base = self.pages.as_mut_ptr() as *mut u8;
            let mut at = self.len;
            for p in parts {
                std::ptr::copy_nonoverlapping(p.as_ptr(), base.add(at), p.len());
                at += p.len();
            }
            if pages > have {
                std::ptr::write_bytes(base.add(end), 0, pages * ALIGN - end);
                self.pages.set_len(pages);
            }
        }
        self.len = end;
    }
    /// Drops everything; keeps the allocation.
    pub fn clear(&mut self) {
        self.pages.clear();
        self.len = 0;
    }
}

#[allow(clippy::len_without_is_empty)]
pub trait PackFile: Send + Sync {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    fn sync_data(&self) -> io::Result<()>;
    fn len(&self) -> io::Result<u64>;
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Writes whole aligned blocks of the log (`offset` and `buf.len()` multiples of
    /// [`ALIGN`]). With `dsync` the bytes are durable when it returns (and so is everything
    /// written to this file before, which the caller guarantees by only asking for `dsync`
    /// when nothing else is unsynced).
    fn write_log_at(&self, buf: &[u8], offset: u64, dsync: bool) -> io::Result<()>;
    /// Reads bytes that were written with `write_log_at`, bypassing the page cache when those
    /// writes did (`offset`/`buf.len()` multiples of [`ALIGN`], `buf` aligned).
    fn read_log_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Whether `write_log_at` bypasses the page cache (then reads of the active pack must use
    /// `read_log_at`).
    fn direct(&self) -> bool;
}

pub trait PackIo: Send + Sync {
    /// Creates a new, empty file (fails if it exists).
    fn create(&self, path: &Path) -> io::Result<Arc<dyn PackFile>>;
    fn open(&self, path: &Path) -> io::Result<Arc<dyn PackFile>>;
    /// Makes the creation of files in `dir` durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// Names of the files in `dir`.
    fn list(&self, dir: &Path) -> io::Result<Vec<String>>;
    /// Removes a file (a pack whose creation failed).
    fn remove(&self, path: &Path) -> io::Result<()>;
}

/// The real thing: std files, pread/pwrite, O_DIRECT where the filesystem has it, fdatasync.
pub struct OsIo;

struct OsFile {
    file: File,
    /// The same file opened with O_DIRECT, when the filesystem supports it.
    direct: Option<File>,
}

fn open_direct(path: &Path) -> Option<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .ok()
}

impl OsFile {
    fn new(file: File, path: &Path) -> OsFile {
        OsFile {
            file,
            direct: open_direct(path),
        }
    }
}

/// pwritev2 of the whole buffer, retrying short writes.
fn pwrite_all(f: &File, mut buf: &[u8], mut offset: u64, dsync: bool) -> io::Result<()> {
    let flags = if dsync { libc::RWF_DSYNC } else { 0 };
    while !buf.is_empty() {
        let iov = libc::iovec {
            iov_base: buf.as_ptr() as *mut libc::c_void,
            iov_len: buf.len(),
        };
        // SAFETY: the iovec points at `buf`, valid for reads of its length for the whole call;
        // the fd is open for writing.
        let n = unsafe { libc::pwritev2(f.as_raw_fd(), &iov, 1, offset as libc::off_t, flags) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::from(io::ErrorKind::WriteZero));
        }
        buf = &buf[n as usize..];
        offset += n as u64;
    }
    Ok(())
}

impl PackFile for OsFile {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        FileExt::read_exact_at(&self.file, buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        FileExt::write_all_at(&self.file, buf, offset)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }
    fn write_log_at(&self, buf: &[u8], offset: u64, dsync: bool) -> io::Result<()> {
        match &self.direct {
            Some(d) => pwrite_all(d, buf, offset, dsync),
            None => {
                FileExt::write_all_at(&self.file, buf, offset)?;
                if dsync {
                    self.file.sync_data()?;
                }
                Ok(())
            }
        }
    }
    fn read_log_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        match &self.direct {
            Some(d) => FileExt::read_exact_at(d, buf, offset),
            None => FileExt::read_exact_at(&self.file, buf, offset),
        }
    }
    fn direct(&self) -> bool {
        self.direct.is_some()
    }
}

impl PackIo for OsIo {
    fn create(&self, path: &Path) -> io::Result<Arc<dyn PackFile>> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)?;
        Ok(Arc::new(OsFile::new(f, path)))
    }
    fn open(&self, path: &Path) -> io::Result<Arc<dyn PackFile>> {
        let f = OpenOptions::new().read(true).write(true).open(path)?;
        Ok(Arc::new(OsFile::new(f, path)))
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir)? {
            out.push(e?.file_name().to_string_lossy().into_owned());
        }
        Ok(out)
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }
}

#[cfg(test)]
mod tests {
    use super::{AlignedBuf, ALIGN};
    use proptest::prelude::*;

    proptest! {
        /// Whatever sequence of appends (of any sizes, across page boundaries, after a clear),
        /// the buffer holds exactly the bytes appended, and the rest of its last page is zeros:
        /// what an `O_DIRECT` write of `padded()` puts on disk past the log's end.
        #[test]
        fn appends_hold_their_bytes_and_zeros_after_them(
            ops in proptest::collection::vec(
                (proptest::collection::vec(proptest::collection::vec(1u8..=255, 0..5000), 0..4), any::<bool>()),
                1..24,
            )
        ) {
            let mut buf = AlignedBuf::with_capacity(ALIGN);
            let mut model: Vec<u8> = Vec::new();
            for (parts, clear) in ops {
                if clear {
                    buf.clear();
                    model.clear();
                }
                let slices: Vec<&[u8]> = parts.iter().map(|p| p.as_slice()).collect();
                if slices.len() == 1 {
                    buf.extend_from_slice(slices[0]);
                } else {
                    buf.extend_from_slices(&slices);
                }
                for p in &parts {
                    model.extend_from_slice(p);
                }
                prop_assert_eq!(buf.len(), model.len());
                prop_assert_eq!(buf.as_slice(), model.as_slice());
                let padded = buf.padded();
                prop_assert_eq!(padded.len(), model.len().div_ceil(ALIGN) * ALIGN);
                prop_assert!(padded[model.len()..].iter().all(|&b| b == 0));
                prop_assert_eq!(padded.as_ptr() as usize % ALIGN, 0);
            }
        }
    }
}
