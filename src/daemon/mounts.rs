//! FUSE mounts served by the daemon: mount, unmount, stale-mount cleanup.
//!
//! Invariants: a dataset is mounted at most once (so the kernel caches of one mount are the only
//! caches of it); the `mounts` table of the index lists the mounts to re-establish at start, and
//! only `vdbfs umount` removes an entry from it.

use crate::fs::VdbFs;
use crate::tree::dataset::Dataset;
use anyhow::{anyhow, bail, Context};
use fuser::{Config, MountOption, SessionACL};
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub struct Mounted {
    pub dataset: String,
    pub mountpoint: PathBuf,
    session: Option<fuser::BackgroundSession>,
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

fn unescape_mountinfo(s: &str) -> String {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8) {
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
    match std::fs::metadata(path) {
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) || e.raw_os_error() == Some(libc::ECONNABORTED) => {
            tracing::warn!(mountpoint = %path.display(), "clearing a stale mount left by a daemon that died");
            umount2(path, libc::MNT_DETACH)
                .with_context(|| format!("cannot detach the stale mount at {}", path.display()))
        }
        _ => bail!(
            "{} is already a mount point of something else; unmount it first or choose another directory",
            path.display()
        ),
    }
}

pub fn mount(ds: Arc<Dataset>, mountpoint: &Path, read_only: bool) -> anyhow::Result<Mounted> {
    clear_stale(mountpoint)?;
    let mut cfg = Config::default();
    cfg.mount_options = vec![
        MountOption::FSName(format!("vdbfs:{}", ds.name)),
        MountOption::Subtype("vdbfs".into()),
        MountOption::DefaultPermissions,
        MountOption::NoDev,
        MountOption::NoSuid,
        MountOption::NoAtime,
        if read_only {
            MountOption::RO
        } else {
            MountOption::RW
        },
    ];
    cfg.acl = SessionACL::All;
    cfg.n_threads = Some(4);
    cfg.clone_fd = true;
    let name = ds.name.clone();
    let session =
        fuser::Session::new(VdbFs::new(ds, read_only), mountpoint, &cfg).with_context(|| {
            format!(
                "FUSE mount of dataset {name} at {} failed",
                mountpoint.display()
            )
        })?;
    let bg = session
        .spawn()
        .context("cannot start the FUSE session threads")?;
    Ok(Mounted {
        dataset: name,
        mountpoint: mountpoint.to_path_buf(),
        session: Some(bg),
    })
}

impl Mounted {
    /// Unmounts. `lazy` detaches even while files are open (daemon shutdown); otherwise a busy
    /// mount is refused and stays mounted.
    pub fn unmount(&mut self, lazy: bool) -> anyhow::Result<()> {
        let flags = if lazy { libc::MNT_DETACH } else { 0 };
        match umount2(&self.mountpoint, flags) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                return Err(anyhow!(
                "{} is busy: files are open there (is postgres still running on it? stop it first)",
                self.mountpoint.display()
            ))
            }
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {} // already gone
            Err(e) => {
                return Err(anyhow!(
                    "unmount of {} failed: {e}",
                    self.mountpoint.display()
                ))
            }
        }
        if let Some(bg) = self.session.take() {
            // The session threads end when the kernel closes the connection; bounded wait.
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let _ = tx.send(bg.join());
            });
            // A lazily detached mount still in use keeps its connection until the process ends.
            let wait = Duration::from_secs(if lazy { 3 } else { 20 });
            match rx.recv_timeout(wait) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(mountpoint = %self.mountpoint.display(), "FUSE session ended with: {e}")
                }
                Err(_) => {
                    tracing::warn!(mountpoint = %self.mountpoint.display(), "FUSE session threads did not end in time; the connection closes when the daemon exits")
                }
            }
        }
        Ok(())
    }
}
