//! One FUSE mount in the kernel: mount(2) of a dataset with its session threads, unmount,
//! and the stale mounts a daemon that died leaves behind (they answer ENOTCONN).
//!
//! Invariant: a mount is of type `fuse.vdbfs`, so umount(8) and the mount helpers know it; a
//! session that ends without [`Mounted::unmount`] (someone ran umount(8)) calls its `on_end`.

use crate::api::{refusal, ErrorKind};
use crate::fs::VdbFs;
use crate::tree::dataset::Dataset;
use anyhow::{anyhow, Context};
use fuser::{Config, SessionACL};
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub struct Mounted {
    pub dataset: String,
    pub mountpoint: PathBuf,
    by_us: Arc<AtomicBool>,
    ended: crossbeam::channel::Receiver<()>,
}

/// Mount points currently in the kernel's mount table.
fn kernel_mounts() -> Vec<PathBuf> {
    let Ok(s) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    s.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_mountinfo(p)))
        .collect()
}

/// The device number (`major:minor`) of the filesystem mounted at `mountpoint`, from the
/// kernel's mount table (no access to the mount itself).
fn device_of(mountpoint: &Path) -> Option<String> {
    let s = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    s.lines().rev().find_map(|l| {
        let mut f = l.split(' ');
        let dev = f.nth(2)?;
        let mp = f.nth(1)?;
        (Path::new(&unescape_mountinfo(mp)) == mountpoint).then(|| dev.to_string())
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo` (octal).
pub fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            let oct = std::str::from_utf8(&b[i + 1..i + 4]).unwrap_or("x");
            if let Ok(v) = u8::from_str_radix(oct, 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The canonical form of a path whose last component may be a dead mount (canonicalize would
/// fail on it with ENOTCONN).
pub fn resolve(path: &Path) -> PathBuf {
    if let Ok(p) = path.canonicalize() {
        return p;
    }
    match (
        path.parent().and_then(|p| p.canonicalize().ok()),
        path.file_name(),
    ) {
        (Some(parent), Some(name)) => parent.join(name),
        _ => path.to_path_buf(),
    }
}

pub fn is_mounted(path: &Path) -> bool {
    kernel_mounts().iter().any(|m| m == path)
}

fn statfs(path: &Path) -> std::io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: statfs is plain old data: all-zero bytes are a valid value.
    let mut s: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is a valid NUL-terminated path and s a valid out pointer.
    if unsafe { libc::statfs(c.as_ptr(), &mut s) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn umount2(path: &Path, flags: i32) -> std::io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: c is a valid NUL-terminated path.
    if unsafe { libc::umount2(c.as_ptr(), flags) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A crashed daemon leaves its mounts behind, answering ENOTCONN: detach them.
pub fn clear_stale(path: &Path) -> anyhow::Result<()> {
    if !is_mounted(path) {
        return Ok(());
    }
    // statfs always reaches the filesystem; stat may be answered from the kernel's cache.
    match statfs(path) {
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) || e.raw_os_error() == Some(libc::ECONNABORTED) => {
            tracing::warn!(mountpoint = %path.display(), "clearing a stale mount left by a daemon that died");
            umount2(path, libc::MNT_DETACH)
                .with_context(|| format!("cannot detach the stale mount at {}", path.display()))
        }
        _ => Err(refusal(
            ErrorKind::Conflict,
            format!(
                "{} is already a mount point of something else; unmount it first or choose another directory",
                path.display()
            ),
        )),
    }
}

/// Mounts `ds` at `mountpoint` with filesystem type `fuse.vdbfs` (so umount(8) and mount(8)
/// helpers recognise it) and serves it on FUSE worker threads. `on_end` runs when the session
/// ends without `Mounted::unmount` having been called (someone ran umount(8)).
pub fn mount(
    ds: Arc<Dataset>,
    mountpoint: &Path,
    read_only: bool,
    on_end: Box<dyn FnOnce() + Send>,
) -> anyhow::Result<Mounted> {
    clear_stale(mountpoint)?;
    let name = ds.name.clone();
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .context("cannot open /dev/fuse (is the fuse module loaded? is this root?)")?;
    let meta = std::fs::metadata(mountpoint)
        .with_context(|| format!("cannot stat the mount point {}", mountpoint.display()))?;
    use std::os::fd::{AsRawFd, OwnedFd};
    use std::os::unix::fs::MetadataExt;
    let rootmode = meta.mode() & libc::S_IFMT;
    let data = format!(
        "fd={},rootmode={rootmode:o},user_id=0,group_id=0,allow_other,default_permissions",
        dev.as_raw_fd()
    );
    let mut flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOATIME;
    if read_only {
        flags |= libc::MS_RDONLY;
    }
    let source = CString::new(format!("vdbfs:{name}"))?;
    let target = CString::new(mountpoint.as_os_str().as_bytes())?;
    let fstype = CString::new("fuse.vdbfs")?;
    let cdata = CString::new(data)?;
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            cdata.as_ptr() as *const libc::c_void,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| {
            format!(
                "mount(2) of dataset {name} at {} failed",
                mountpoint.display()
            )
        });
    }
    let mut cfg = Config::default();
    cfg.n_threads = Some(4);
    cfg.clone_fd = true;
    if !read_only {
        let mp = mountpoint.to_path_buf();
        ds.set_cache_flush(Some(Arc::new(move || crate::fs::flush_kernel_cache(&mp))));
    }
    let session = fuser::Session::from_fd(
        VdbFs::new(ds.clone(), read_only),
        OwnedFd::from(dev),
        SessionACL::All,
        cfg,
    );
    let session = match session {
        Ok(s) => s,
        Err(e) => {
            let _ = umount2(mountpoint, libc::MNT_DETACH);
            return Err(anyhow!(e).context("FUSE handshake failed"));
        }
    };
    let bg = session
        .spawn()
        .context("cannot start the FUSE session threads")?;
    if let Some(dev) = device_of(mountpoint) {
        crate::fs::tune_kernel_cache(&dev, read_only);
    }
    let by_us = Arc::new(AtomicBool::new(false));
    let (tx, rx) = crossbeam::channel::bounded::<()>(1);
    {
        let by_us = by_us.clone();
        let mp = mountpoint.to_path_buf();
        std::thread::Builder::new()
            .name("mount-watch".into())
            .spawn(move || {
                if let Err(e) = bg.join() {
                    tracing::warn!(mountpoint = %mp.display(), "FUSE session ended with: {e}");
                }
                ds.set_cache_flush(None);
                if !by_us.load(Ordering::SeqCst) {
                    on_end();
                }
                let _ = tx.send(());
            })?;
    }
    Ok(Mounted {
        dataset: name,
        mountpoint: mountpoint.to_path_buf(),
        by_us,
        ended: rx,
    })
}

impl Mounted {
    /// Unmounts. `lazy` detaches even while files are open (daemon shutdown); otherwise a busy
    /// mount is refused and stays mounted.
    pub fn unmount(&mut self, lazy: bool) -> anyhow::Result<()> {
        let flags = if lazy { libc::MNT_DETACH } else { 0 };
        self.by_us.store(true, Ordering::SeqCst);
        match umount2(&self.mountpoint, flags) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                self.by_us.store(false, Ordering::SeqCst);
                return Err(refusal(
                    ErrorKind::Busy,
                    format!(
                        "{} is busy: files are open there (is postgres still running on it? stop it first)",
                        self.mountpoint.display()
                    ),
                ));
            }
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {} // already gone
            Err(e) => {
                self.by_us.store(false, Ordering::SeqCst);
                return Err(anyhow!(
                    "unmount of {} failed: {e}",
                    self.mountpoint.display()
                ));
            }
        }
        // The session threads end when the kernel closes the connection; a lazily detached
        // mount still in use keeps it open until the daemon exits. Bounded wait.
        let wait = Duration::from_secs(if lazy { 3 } else { 20 });
        if self.ended.recv_timeout(wait).is_err() {
            tracing::warn!(mountpoint = %self.mountpoint.display(), "FUSE session threads did not end in time; the connection closes when the daemon exits");
        }
        Ok(())
    }
}
