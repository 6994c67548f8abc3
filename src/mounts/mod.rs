//! The mount table: every FUSE mount the daemon serves, by mount point, and the record of the
//! mounts to re-establish when a daemon starts. Services mount and unmount their datasets
//! (staging, VDBs) through it; `vdbfs mount`/`umount` reach it through the daemon.
//!
//! Invariants: a dataset is mounted at most once (so the kernel caches of one mount are the only
//! caches of it); a mount is recorded when it is made and forgotten only by an unmount through
//! this table or by umount(8) behind its back, never at daemon shutdown (the next daemon
//! mounts it again); an unmount is preceded by a checkpoint.

pub mod kernel;

use crate::api::{refusal, ErrorKind, MountInfo};
use crate::refuse;
use crate::store::records::MountRecords;
use crate::tree::{Datasets, NameError};
use anyhow::Context;
use kernel::Mounted;
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};

pub use kernel::{is_mounted, resolve};

pub struct MountTable {
    datasets: Arc<Datasets>,
    records: MountRecords,
    mounts: Mutex<BTreeMap<PathBuf, Mounted>>,
    /// Set at shutdown: sessions ending then are not "unmounted outside vdbfs".
    stopping: AtomicBool,
    me: Weak<MountTable>,
}

impl MountTable {
    pub fn new(datasets: Arc<Datasets>, records: MountRecords) -> Arc<MountTable> {
        Arc::new_cyclic(|me| MountTable {
            datasets,
            records,
            mounts: Mutex::new(BTreeMap::new()),
            stopping: AtomicBool::new(false),
            me: me.clone(),
        })
    }

    /// The mount point of a dataset (or `dataset@snapshot`), if mounted.
    pub fn mounted_at(&self, name: &str) -> Option<PathBuf> {
        self.mounts
            .lock()
            .values()
            .find(|m| m.dataset == name)
            .map(|m| m.mountpoint.clone())
    }

    /// The dataset mounted at a mount point, if any.
    pub fn dataset_at(&self, mountpoint: &Path) -> Option<String> {
        self.mounts
            .lock()
            .get(&resolve(mountpoint))
            .map(|m| m.dataset.clone())
    }

    pub fn list(&self) -> Vec<MountInfo> {
        self.mounts
            .lock()
            .values()
            .map(|m| MountInfo {
                dataset: m.dataset.clone(),
                mountpoint: m.mountpoint.clone(),
            })
            .collect()
    }

    /// The mounts recorded by earlier daemons.
    pub fn recorded(&self) -> anyhow::Result<Vec<(PathBuf, String)>> {
        Ok(self.records.list()?)
    }

    /// Mounts `dataset` (or `dataset@snapshot`, read-only) at `mountpoint` and records it.
    /// The same dataset at the same place again is a success.
    pub fn mount(&self, dataset: &str, mountpoint: &Path) -> anyhow::Result<String> {
        self.mount_with(dataset, mountpoint, true)
    }

    /// `vdbfs mount`: like [`MountTable::mount`], but a directory that is not empty is refused
    /// unless `nonempty` (mounting would hide what is there).
    pub fn mount_new(
        &self,
        dataset: &str,
        mountpoint: &Path,
        nonempty: bool,
    ) -> anyhow::Result<String> {
        self.mount_with(dataset, mountpoint, nonempty)
    }

    fn mount_with(
        &self,
        dataset: &str,
        mountpoint: &Path,
        allow_nonempty: bool,
    ) -> anyhow::Result<String> {
        // A mount point left by a daemon that died answers ENOTCONN to everything: clear it
        // first (unless this daemon serves it).
        let lexical = resolve(mountpoint);
        if !self.mounts.lock().contains_key(&lexical) {
            kernel::clear_stale(&lexical)?;
        }
        let created = create_dirs(mountpoint)
            .with_context(|| format!("cannot create the mount point {}", mountpoint.display()))?;
        let r = self.mount_at(dataset, mountpoint, allow_nonempty);
        if r.is_err() {
            // A failed mount leaves nothing it made behind.
            for d in created.iter().rev() {
                let _ = std::fs::remove_dir(d);
            }
        }
        r
    }

    fn mount_at(
        &self,
        dataset: &str,
        mountpoint: &Path,
        allow_nonempty: bool,
    ) -> anyhow::Result<String> {
        let mp = mountpoint
            .canonicalize()
            .with_context(|| format!("cannot resolve the mount point {}", mountpoint.display()))?;
        let mut mounts = self.mounts.lock();
        if let Some(m) = mounts.get(&mp) {
            if m.dataset == dataset {
                return Ok(format!(
                    "dataset {dataset} is already mounted at {}",
                    mp.display()
                ));
            }
            refuse!(
                Conflict,
                "{} already has dataset {} mounted; unmount it first ('vdbfs umount {}')",
                mp.display(),
                m.dataset,
                mp.display()
            );
        }
        if let Some(m) = mounts.values().find(|m| m.dataset == dataset) {
            refuse!(
                Conflict,
                "dataset {dataset} is already mounted at {}; a dataset is mounted at one place at a time",
                m.mountpoint.display()
            );
        }
        if !allow_nonempty {
            let n = std::fs::read_dir(&mp)
                .with_context(|| format!("cannot read the mount point {}", mp.display()))?
                .count();
            if n > 0 {
                refuse!(
                    Conflict,
                    "{} is not empty ({}): mounting dataset {dataset} there would hide what it \
                     holds; choose an empty directory, or pass --nonempty to mount over it \
                     ('vdbfs mount --nonempty {dataset} {}')",
                    mp.display(),
                    entries_text(n),
                    mp.display()
                );
            }
        }
        let (ds, read_only) = match dataset.split_once('@') {
            Some((d, s)) => (self.datasets.snapshot_view(d, s)?, true),
            None => {
                self.datasets.refuse_if_damaged(dataset)?;
                (
                    self.datasets
                        .get(dataset)?
                        .ok_or_else(|| NameError::NotFound(dataset.to_string()))?,
                    false,
                )
            }
        };
        let me = self.me.clone();
        let mp2 = mp.clone();
        let on_end = Box::new(move || {
            if let Some(t) = me.upgrade() {
                if !t.stopping.load(Ordering::SeqCst) {
                    t.forget(&mp2);
                }
            }
        });
        let m = kernel::mount(ds, &mp, read_only, on_end)?;
        mounts.insert(mp.clone(), m);
        self.records.set(&mp, Some(dataset))?;
        let what = if read_only {
            "snapshot (read-only)"
        } else {
            "dataset"
        };
        Ok(format!("mounted {what} {dataset} at {}", mp.display()))
    }

    /// Mounts `dataset` at `mountpoint` unless it is mounted already (anywhere).
    pub fn ensure(&self, dataset: &str, mountpoint: &Path) -> anyhow::Result<()> {
        if self.mounted_at(dataset).is_none() {
            self.mount(dataset, mountpoint)?;
        }
        Ok(())
    }

    /// Checkpoints, unmounts (refused while files are open there) and forgets the mount.
    pub fn umount(&self, mountpoint: &Path) -> anyhow::Result<String> {
        let mp = resolve(mountpoint);
        let mut mounts = self.mounts.lock();
        let Some(m) = mounts.get_mut(&mp) else {
            refuse!(
                NotFound,
                "nothing is mounted by vdbfs at {}; 'vdbfs status' lists the mounts",
                mp.display()
            );
        };
        self.datasets
            .checkpoint()
            .context("flush before unmount failed")?;
        m.unmount(false)?;
        let m = mounts
            .remove(&mp)
            .ok_or_else(|| refusal(ErrorKind::Internal, "mount vanished"))?;
        self.records.set(&mp, None)?;
        Ok(format!(
            "unmounted dataset {} from {}",
            m.dataset,
            mp.display()
        ))
    }

    /// Unmounts `dataset` if it is mounted at `mountpoint`'s place.
    pub fn release(&self, dataset: &str, mountpoint: &Path) -> anyhow::Result<()> {
        if self.mounted_at(dataset).is_some() {
            self.umount(mountpoint)?;
        }
        Ok(())
    }

    /// A mount removed behind our back (umount(8)): flush and forget it.
    fn forget(&self, mp: &Path) {
        let removed = self.mounts.lock().remove(mp);
        if let Some(m) = removed {
            tracing::info!(mountpoint = %mp.display(), dataset = %m.dataset, "unmounted outside vdbfs; forgetting the mount");
            if let Err(e) = self.datasets.checkpoint() {
                tracing::error!("checkpoint after an external unmount failed: {e}");
            }
            if let Err(e) = self.records.set(mp, None) {
                tracing::error!("cannot forget the mount record of {}: {e:#}", mp.display());
            }
        }
    }

    /// Daemon shutdown: detaches every mount (lazily: files may be open), keeping the records.
    pub fn unmount_all(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        let mut mounts = self.mounts.lock();
        for (mp, m) in mounts.iter_mut() {
            if let Err(e) = m.unmount(true) {
                tracing::error!(mountpoint = %mp.display(), "unmount at shutdown failed: {e:#}");
            }
        }
        mounts.clear();
    }
}

/// "1 entry", "3 entries": how much a directory holds, for messages.
pub fn entries_text(n: usize) -> String {
    if n == 1 {
        "1 entry".to_string()
    } else {
        format!("{n} entries")
    }
}

/// `mkdir -p`: the directories it created, outermost first.
fn create_dirs(path: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut missing = Vec::new();
    let mut p = Some(path);
    while let Some(d) = p {
        if d.as_os_str().is_empty() || d.exists() {
            break;
        }
        missing.push(d.to_path_buf());
        p = d.parent();
    }
    missing.reverse();
    let mut created = Vec::new();
    for d in missing {
        match std::fs::create_dir(&d) {
            Ok(()) => created.push(d),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                for c in created.iter().rev() {
                    let _ = std::fs::remove_dir(c);
                }
                return Err(e);
            }
        }
    }
    Ok(created)
}

/// `STORE/mnt`, where staging datasets and VDBs are mounted by default (0755; the store
/// directory 0711, so the postgres user can pass through to its data directories).
pub fn mount_root(store_dir: &Path) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let root = store_dir.join("mnt");
    std::fs::create_dir_all(&root)?;
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755))?;
    std::fs::set_permissions(store_dir, std::fs::Permissions::from_mode(0o711))?;
    Ok(root)
}
