//! A simulated disk for crash tests: every file remembers what was written and what was made
//! durable (by `sync_data`, or by a `write_log_at` with `dsync` for the bytes it wrote);
//! `crash()` gives the disk as a power cut would leave it (only durable bytes), and faults
//! (ENOSPC, failing syncs) can be injected by countdown. Log writes count as direct: reads of
//! the active pack go through `read_log_at`, as on a real filesystem with O_DIRECT.

use super::io::{PackFile, PackIo, ALIGN};
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

#[derive(Default)]
pub struct SimFile {
    data: Mutex<Vec<u8>>,
    durable: Mutex<Vec<u8>>,
    faults: Arc<Faults>,
}

#[derive(Default)]
pub struct Faults {
    /// Bytes that may still be written before writes fail with ENOSPC (< 0: unlimited).
    pub space_left: AtomicI64,
    /// Syncs that may still succeed before one fails with EIO (< 0: unlimited).
    pub syncs_left: AtomicI64,
}

impl Faults {
    pub fn none() -> Arc<Faults> {
        Arc::new(Faults {
            space_left: AtomicI64::new(-1),
            syncs_left: AtomicI64::new(-1),
        })
    }
}

fn countdown(c: &AtomicI64, n: i64) -> bool {
    let left = c.load(Ordering::SeqCst);
    if left < 0 {
        return true;
    }
    if left < n {
        return false;
    }
    c.fetch_sub(n, Ordering::SeqCst);
    true
}

impl PackFile for SimFile {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let d = self.data.lock();
        let end = offset as usize + buf.len();
        if end > d.len() {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
        }
        buf.copy_from_slice(&d[offset as usize..end]);
        Ok(())
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut d = self.data.lock();
        let end = offset as usize + buf.len();
        let grow = end.saturating_sub(d.len()) as i64;
        if !countdown(&self.faults.space_left, grow) {
            // A partial write reaches the file before the error, as on a real disk.
            let part =
                (self.faults.space_left.load(Ordering::SeqCst).max(0) as usize).min(buf.len());
            if d.len() < offset as usize + part {
                d.resize(offset as usize + part, 0);
            }
            d[offset as usize..offset as usize + part].copy_from_slice(&buf[..part]);
            self.faults.space_left.store(0, Ordering::SeqCst);
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        if d.len() < end {
            d.resize(end, 0);
        }
        d[offset as usize..end].copy_from_slice(buf);
        Ok(())
    }
    fn sync_data(&self) -> io::Result<()> {
        if !countdown(&self.faults.syncs_left, 1) {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        *self.durable.lock() = self.data.lock().clone();
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.data.lock().len() as u64)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.data.lock().resize(len as usize, 0);
        Ok(())
    }
    fn write_log_at(&self, buf: &[u8], offset: u64, dsync: bool) -> io::Result<()> {
        assert!(
            offset.is_multiple_of(ALIGN as u64) && buf.len().is_multiple_of(ALIGN),
            "unaligned log write at {offset} of {} bytes",
            buf.len()
        );
        self.write_all_at(buf, offset)?;
        if dsync {
            if !countdown(&self.faults.syncs_left, 1) {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            let end = offset as usize + buf.len();
            let mut durable = self.durable.lock();
            if durable.len() < end {
                durable.resize(end, 0);
            }
            durable[offset as usize..end].copy_from_slice(buf);
        }
        Ok(())
    }
    fn read_log_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        assert!(
            offset.is_multiple_of(ALIGN as u64) && buf.len().is_multiple_of(ALIGN),
            "unaligned log read at {offset} of {} bytes",
            buf.len()
        );
        self.read_exact_at(buf, offset)
    }
    fn direct(&self) -> bool {
        true
    }
}

pub struct SimIo {
    files: Mutex<BTreeMap<PathBuf, Arc<SimFile>>>,
    pub faults: Arc<Faults>,
}

impl SimIo {
    pub fn new() -> Arc<SimIo> {
        Arc::new(SimIo {
            files: Mutex::new(BTreeMap::new()),
            faults: Faults::none(),
        })
    }

    /// The disk after a power cut: each file holds only its durable bytes, possibly followed by
    /// a torn tail (`garbage` bytes of what was written after the last sync, then noise).
    pub fn crash(&self, garbage: usize) -> Arc<SimIo> {
        let files = self
            .files
            .lock()
            .iter()
            .map(|(p, f)| {
                let mut d = f.durable.lock().clone();
                let written = f.data.lock();
                if written.len() > d.len() && garbage > 0 {
                    let extra = (written.len() - d.len()).min(garbage);
                    let from = d.len();
                    d.extend_from_slice(&written[from..from + extra]);
                    if let Some(last) = d.last_mut() {
                        *last ^= 0x5a;
                    }
                }
                let nf = SimFile {
                    data: Mutex::new(d.clone()),
                    durable: Mutex::new(d),
                    faults: Faults::none(),
                };
                (p.clone(), Arc::new(nf))
            })
            .collect();
        Arc::new(SimIo {
            files: Mutex::new(files),
            faults: Faults::none(),
        })
    }

    pub fn file(&self, path: &Path) -> Option<Arc<SimFile>> {
        self.files.lock().get(path).cloned()
    }
}

impl SimFile {
    /// What the file holds now.
    pub fn bytes(&self) -> Vec<u8> {
        self.data.lock().clone()
    }
    pub fn corrupt(&self, offset: usize) {
        let mut d = self.data.lock();
        d[offset] ^= 0xff;
    }
    /// Flips a byte on the disk itself (what a reopened store reads), e.g. after `crash`.
    pub fn corrupt_durable(&self, offset: usize) {
        self.corrupt(offset);
        let mut d = self.durable.lock();
        d[offset] ^= 0xff;
    }
}

impl PackIo for SimIo {
    fn create(&self, path: &Path) -> io::Result<Arc<dyn PackFile>> {
        let mut files = self.files.lock();
        if files.contains_key(path) {
            return Err(io::Error::from(io::ErrorKind::AlreadyExists));
        }
        let f = Arc::new(SimFile {
            faults: self.faults.clone(),
            ..Default::default()
        });
        files.insert(path.to_path_buf(), f.clone());
        Ok(f)
    }
    fn open(&self, path: &Path) -> io::Result<Arc<dyn PackFile>> {
        match self.files.lock().get(path) {
            Some(f) => Ok(f.clone()),
            None => Err(io::Error::from(io::ErrorKind::NotFound)),
        }
    }
    fn sync_dir(&self, _dir: &Path) -> io::Result<()> {
        Ok(())
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        Ok(self
            .files
            .lock()
            .keys()
            .filter(|p| p.parent() == Some(dir))
            .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect())
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        match self.files.lock().remove(path) {
            Some(_) => Ok(()),
            None => Err(io::Error::from(io::ErrorKind::NotFound)),
        }
    }
}
