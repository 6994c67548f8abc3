//! Mounts: what /proc/self/mountinfo says, stale FUSE mounts, and a [`Mount`] of a dataset.

use super::*;

/// One line of /proc/self/mountinfo: the mount point and the filesystem type.
#[derive(Debug, Clone)]
pub struct MountEntry {
    pub mountpoint: PathBuf,
    pub fstype: String,
    pub source: String,
}

use vdbfs::mounts::kernel::unescape_mountinfo;

pub fn mountinfo() -> Vec<MountEntry> {
    let s = fs::read_to_string("/proc/self/mountinfo").expect("read /proc/self/mountinfo");
    s.lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let mp = pre.split(' ').nth(4)?;
            let mut post = post.split(' ');
            let fstype = post.next()?.to_string();
            let source = unescape_mountinfo(post.next().unwrap_or(""));
            Some(MountEntry {
                mountpoint: PathBuf::from(unescape_mountinfo(mp)),
                fstype,
                source,
            })
        })
        .collect()
}

/// The mountinfo entry for exactly this mount point (the topmost one), if mounted.
pub fn mount_entry(path: &Path) -> Option<MountEntry> {
    mountinfo().into_iter().rev().find(|m| m.mountpoint == path)
}

pub fn is_mounted(path: &Path) -> bool {
    mount_entry(path).is_some()
}

/// True when the path is a FUSE mount whose daemon is gone (stat gives ENOTCONN, or
/// ECONNABORTED right after the connection was aborted).
///
/// Uses statfs, which always reaches the daemon: stat of a mount root can be answered from the
/// kernel's attribute cache even after the daemon died.
pub fn is_stale(path: &Path) -> bool {
    matches!(
        statfs(path).err().and_then(|e| e.raw_os_error()),
        Some(libc::ENOTCONN | libc::ECONNABORTED)
    )
}

/// statfs(2) of a path.
pub fn statfs(path: &Path) -> std::io::Result<libc::statfs> {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: statfs is plain old data: all-zero bytes are a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is a NUL-terminated path and st a valid out pointer.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0 {
        Ok(st)
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// What stat and statfs say about a path, for assertion messages.
pub fn stat_says(path: &Path) -> String {
    let stat = match fs::metadata(path) {
        Ok(m) => format!(
            "ok (dir: {}, mode {:o})",
            m.is_dir(),
            m.permissions().mode()
        ),
        Err(e) => format!("{e}"),
    };
    let sfs = match statfs(path) {
        Ok(st) => format!("ok (f_type {:#x})", st.f_type),
        Err(e) => format!("{e}"),
    };
    format!("stat: {stat}; statfs: {sfs}")
}

/// Lazy unmount (umount2 MNT_DETACH); returns whether the call succeeded.
pub fn lazy_umount(path: &Path) -> bool {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: c is a NUL-terminated path that outlives the call.
    unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) == 0 }
}

/// A FUSE mount of a dataset. Drop: `vdbfs umount`, falling back to a lazy unmount.
pub struct Mount {
    pub path: PathBuf,
    pub dataset: String,
    pub(super) store: PathBuf,
}

impl Mount {
    /// A mount made some other way (e.g. re-established by the daemon, or via mount(8)).
    pub fn adopt(daemon: &Daemon, dataset: &str, path: &Path) -> Mount {
        Mount {
            path: path.to_path_buf(),
            dataset: dataset.to_string(),
            store: daemon.store().to_path_buf(),
        }
    }

    pub fn join(&self, rel: &str) -> PathBuf {
        self.path.join(rel)
    }

    /// `vdbfs umount` this mount point; returns the command's output.
    pub fn try_umount(&self) -> Output {
        run_timeout(
            Command::new(bin())
                .env_remove("VDBFS_STORE")
                .arg("--store")
                .arg(&self.store)
                .arg("umount")
                .arg(&self.path),
            COMMAND_TIMEOUT,
        )
    }

    /// `vdbfs umount`, asserting success and that the mount point is gone from mountinfo. A
    /// busy mount is retried for a few seconds (on a loaded machine another test's short-lived
    /// child can hold a descriptor a moment); if it stays busy, the holders are reported.
    pub fn umount(self) {
        let mut out = self.try_umount();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !out.status.success()
            && String::from_utf8_lossy(&out.stderr).contains("is busy")
            && Instant::now() < deadline
        {
            eprintln!(
                "umount {}: busy; holders: {:?}; retrying",
                self.path.display(),
                holders_of(&self.path)
            );
            thread::sleep(Duration::from_millis(200));
            out = self.try_umount();
        }
        assert!(
            out.status.success(),
            "vdbfs umount {} failed\n{}",
            self.path.display(),
            describe(&out)
        );
        assert!(
            !is_mounted(&self.path),
            "vdbfs umount {} exited 0 but it is still in /proc/self/mountinfo",
            self.path.display()
        );
        // Drop finds nothing left to do.
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if !is_mounted(&self.path) {
            return;
        }
        if !is_stale(&self.path) {
            let c = Command::new(bin())
                .env_remove("VDBFS_STORE")
                .arg("--store")
                .arg(&self.store)
                .arg("umount")
                .arg(&self.path)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn();
            if let Ok(mut c) = c {
                if wait_child(&mut c, Duration::from_secs(30)).is_none() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
            }
        }
        for _ in 0..4 {
            if !is_mounted(&self.path) {
                break;
            }
            lazy_umount(&self.path);
        }
    }
}
