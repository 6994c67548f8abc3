//! The WAL archive: every WAL segment and timeline history file a staging standby receives or
//! restores, and every one a VDB writes, kept in the store so that a VDB can be provisioned at
//! any moment of a source (and rewound to any moment of its own history). The files live in
//! the internal dataset `.wal`, written and read only through the tree layer (never mounted):
//! a segment's 8 KiB pages are the very blocks the staging `pg_wal` wrote, so the store keeps
//! them once.
//!
//! Layout of `.wal`: `sources/NAME/FILE` for a source; `vdbs/NAME/GENERATION/FILE` for a VDB,
//! one generation per history (a create, a refresh), since two histories may reuse a timeline
//! and segment name.
//!
//! How a file gets here: postgres runs with `archive_mode` (`always` on a standby) and an
//! `archive_command` that only waits for an acknowledgement file (see [`archive_command`]);
//! the daemon's archiver finds the `pg_wal/archive_status/*.ready` files in the cluster's
//! dataset, copies each file into the archive, makes it durable, then writes the
//! acknowledgement. postgres removes a segment from `pg_wal` only after its `archive_command`
//! succeeded, so no segment is lost between the two.
//!
//! Invariants: a file is in the archive under its final name only once it is durable (written
//! under a temporary name, fsynced, renamed, fsynced); an acknowledgement is written only after
//! that; every operation holds the archive's lock, so a removal never races a copy.

use crate::pg::lsn;
use crate::tree::dataset::{Dataset, SetAttr, ROOT_INO};
use crate::tree::Datasets;
use anyhow::Context;
use parking_lot::Mutex;
use std::path::Path;
use std::sync::Arc;
use vdbfs_format::tree::FileKind;

/// The internal dataset holding the archive.
pub const DATASET: &str = ".wal";

/// Bytes read or written through the tree layer at a time.
const CHUNK: usize = 1 << 20;

/// A directory of the archive: one source's files, or one generation of a VDB's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Key(Vec<String>);

impl Key {
    pub fn source(name: &str) -> Key {
        Key(vec!["sources".into(), name.into()])
    }
    pub fn vdb(name: &str, generation: &str) -> Key {
        Key(vec!["vdbs".into(), name.into(), generation.into()])
    }
    /// Every generation of a VDB.
    pub fn vdb_all(name: &str) -> Key {
        Key(vec!["vdbs".into(), name.into()])
    }
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{DATASET}/{}", self.0.join("/"))
    }
}

pub struct WalArchive {
    datasets: Arc<Datasets>,
    lock: Mutex<()>,
}

/// The `archive_command` of a cluster whose acknowledgements the daemon writes into `ack_dir`:
/// it waits (at most 30 s, then fails and postgres retries later) until the daemon copied the
/// file into the store, and consumes the acknowledgement.
pub fn archive_command(ack_dir: &Path) -> String {
    let dir = ack_dir.to_string_lossy().replace('\'', "'\\''");
    format!(
        "f='{dir}/%f'; n=0; while [ ! -e \"$f\" ]; do n=$((n+1)); \
         if [ $n -gt 300 ]; then exit 1; fi; sleep 0.1; done; rm -f \"$f\""
    )
}

/// Creates an acknowledgement directory (owner postgres, 0700: postgres removes what the
/// daemon writes there).
pub fn make_ack_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    crate::pg::chown_postgres(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    Ok(())
}

fn tree_err(e: crate::store::Error) -> anyhow::Error {
    anyhow::Error::from(e)
}

/// The inode of directory `path` under the root of `ds`, if it exists.
pub fn dir_ino(ds: &Dataset, path: &[&str]) -> anyhow::Result<Option<u64>> {
    let mut ino = ROOT_INO;
    for p in path {
        match ds.lookup(ino, p.as_bytes()) {
            Ok((i, m)) if m.kind == FileKind::Directory => ino = i,
            Ok(_) | Err(crate::store::Error::NotFound) => return Ok(None),
            Err(e) => return Err(tree_err(e)),
        }
    }
    Ok(Some(ino))
}

/// Names and sizes of the regular files in a directory.
pub fn list_files(ds: &Dataset, dir: u64) -> anyhow::Result<Vec<(String, u64)>> {
    let mut out = Vec::new();
    for (name, ino, kind) in ds.readdir(dir).map_err(tree_err)? {
        if kind == FileKind::Regular {
            if let (Ok(name), Ok(m)) = (String::from_utf8(name), ds.getattr(ino)) {
                out.push((name, m.size));
            }
        }
    }
    Ok(out)
}

/// A whole file of a directory, or None when it is not there.
pub fn read_file(ds: &Dataset, dir: u64, name: &str) -> anyhow::Result<Option<Vec<u8>>> {
    let (ino, meta) = match ds.lookup(dir, name.as_bytes()) {
        Ok(x) => x,
        Err(crate::store::Error::NotFound) => return Ok(None),
        Err(e) => return Err(tree_err(e)),
    };
    let mut out = Vec::with_capacity(meta.size as usize);
    while (out.len() as u64) < meta.size {
        let n = (meta.size - out.len() as u64).min(CHUNK as u64) as u32;
        let part = ds.read(ino, out.len() as u64, n).map_err(tree_err)?;
        if part.is_empty() {
            break;
        }
        out.extend_from_slice(&part);
    }
    Ok(Some(out))
}

/// Writes a whole file into a directory, replacing one of that name (not yet durable: the
/// caller fsyncs the dataset).
pub fn write_file(
    ds: &Dataset,
    dir: u64,
    name: &str,
    data: &[u8],
    owner: (u32, u32),
    perm: u32,
) -> anyhow::Result<()> {
    let ino = match ds.lookup(dir, name.as_bytes()) {
        Ok((ino, _)) => {
            ds.setattr(
                ino,
                SetAttr {
                    size: Some(0),
                    ..Default::default()
                },
            )
            .map_err(tree_err)?;
            ino
        }
        Err(crate::store::Error::NotFound) => {
            ds.create(
                dir,
                name.as_bytes(),
                FileKind::Regular,
                perm,
                owner.0,
                owner.1,
                0,
                None,
            )
            .map_err(tree_err)?
            .0
        }
        Err(e) => return Err(tree_err(e)),
    };
    for (i, chunk) in data.chunks(CHUNK).enumerate() {
        ds.write(ino, (i * CHUNK) as u64, chunk).map_err(tree_err)?;
    }
    Ok(())
}

/// The directory `path` under the root of `ds`, made (0700, root) where missing.
fn make_dirs(ds: &Dataset, path: &[String]) -> anyhow::Result<u64> {
    let mut ino = ROOT_INO;
    for p in path {
        ino = match ds.lookup(ino, p.as_bytes()) {
            Ok((i, _)) => i,
            Err(crate::store::Error::NotFound) => {
                ds.create(ino, p.as_bytes(), FileKind::Directory, 0o700, 0, 0, 0, None)
                    .map_err(tree_err)?
                    .0
            }
            Err(e) => return Err(tree_err(e)),
        };
    }
    Ok(ino)
}

/// Removes a directory tree.
fn remove_tree(ds: &Dataset, parent: u64, name: &str) -> anyhow::Result<()> {
    let (ino, meta) = match ds.lookup(parent, name.as_bytes()) {
        Ok(x) => x,
        Err(crate::store::Error::NotFound) => return Ok(()),
        Err(e) => return Err(tree_err(e)),
    };
    if meta.kind == FileKind::Directory {
        for (child, _, _) in ds.readdir(ino).map_err(tree_err)? {
            remove_tree(ds, ino, &String::from_utf8_lossy(&child))?;
        }
        ds.unlink(parent, name.as_bytes(), true).map_err(tree_err)?;
    } else {
        ds.unlink(parent, name.as_bytes(), false)
            .map_err(tree_err)?;
    }
    Ok(())
}

/// Whether a file name is something postgres archives: a segment, a timeline history file, a
/// backup history file or a partial segment.
fn archivable(name: &str) -> bool {
    !name.contains('/')
        && !name.starts_with('.')
        && (lsn::parse_segment(name).is_some()
            || name.ends_with(".history")
            || name.ends_with(".partial")
            || name.ends_with(".backup"))
}

impl WalArchive {
    pub fn new(datasets: Arc<Datasets>) -> WalArchive {
        WalArchive {
            datasets,
            lock: Mutex::new(()),
        }
    }

    /// The archive's dataset, if anything was ever archived.
    fn existing(&self) -> anyhow::Result<Option<Arc<Dataset>>> {
        Ok(self.datasets.get(DATASET)?)
    }

    /// The archive's dataset, made on the first write.
    fn dataset(&self) -> anyhow::Result<Arc<Dataset>> {
        if let Some(d) = self.datasets.get(DATASET)? {
            return Ok(d);
        }
        match self.datasets.create_internal(DATASET) {
            Ok(_) => {}
            Err(e)
                if e.downcast_ref::<crate::tree::NameError>()
                    .is_some_and(|n| matches!(n, crate::tree::NameError::Exists(_))) => {}
            Err(e) => return Err(e),
        }
        self.datasets
            .get(DATASET)?
            .ok_or_else(|| anyhow::anyhow!("the WAL archive dataset {DATASET} vanished"))
    }

    fn key_dir(&self, ds: &Dataset, key: &Key) -> anyhow::Result<Option<u64>> {
        let path: Vec<&str> = key.0.iter().map(String::as_str).collect();
        dir_ino(ds, &path)
    }

    /// Files (name, size) under a key, sorted by name.
    pub fn list(&self, key: &Key) -> anyhow::Result<Vec<(String, u64)>> {
        let _g = self.lock.lock();
        let Some(ds) = self.existing()? else {
            return Ok(Vec::new());
        };
        let Some(dir) = self.key_dir(&ds, key)? else {
            return Ok(Vec::new());
        };
        let mut v = list_files(&ds, dir)?;
        v.retain(|(n, _)| archivable(n));
        v.sort();
        Ok(v)
    }

    /// One file, whole.
    pub fn get(&self, key: &Key, name: &str) -> anyhow::Result<Option<Vec<u8>>> {
        let _g = self.lock.lock();
        let Some(ds) = self.existing()? else {
            return Ok(None);
        };
        let Some(dir) = self.key_dir(&ds, key)? else {
            return Ok(None);
        };
        read_file(&ds, dir, name)
    }

    /// Stores files durably under a key (each under a temporary name, then renamed; one fsync
    /// for the lot before the renames and one after).
    pub fn put(&self, key: &Key, files: &[(String, Vec<u8>)]) -> anyhow::Result<()> {
        if files.is_empty() {
            return Ok(());
        }
        let _g = self.lock.lock();
        let ds = self.dataset()?;
        let dir = make_dirs(&ds, &key.0)?;
        for (name, data) in files {
            write_file(&ds, dir, &format!(".{name}.tmp"), data, (0, 0), 0o600)?;
        }
        ds.fsync().map_err(tree_err)?;
        for (name, _) in files {
            ds.rename(
                dir,
                format!(".{name}.tmp").as_bytes(),
                dir,
                name.as_bytes(),
                0,
                (0, 0),
            )
            .map_err(tree_err)?;
        }
        ds.fsync().map_err(tree_err)?;
        Ok(())
    }

    /// Removes the files under a key for which `drop` says so; returns how many.
    pub fn remove_where(&self, key: &Key, drop: &dyn Fn(&str) -> bool) -> anyhow::Result<usize> {
        let _g = self.lock.lock();
        let Some(ds) = self.existing()? else {
            return Ok(0);
        };
        let Some(dir) = self.key_dir(&ds, key)? else {
            return Ok(0);
        };
        let mut n = 0;
        for (name, _) in list_files(&ds, dir)? {
            if drop(&name) {
                ds.unlink(dir, name.as_bytes(), false).map_err(tree_err)?;
                n += 1;
            }
        }
        if n > 0 {
            ds.fsync().map_err(tree_err)?;
        }
        Ok(n)
    }

    /// Removes everything under a key.
    pub fn remove(&self, key: &Key) -> anyhow::Result<()> {
        let _g = self.lock.lock();
        let Some(ds) = self.existing()? else {
            return Ok(());
        };
        let (last, parent) = match key.0.split_last() {
            Some(x) => x,
            None => return Ok(()),
        };
        let parent: Vec<&str> = parent.iter().map(String::as_str).collect();
        let Some(p) = dir_ino(&ds, &parent)? else {
            return Ok(());
        };
        remove_tree(&ds, p, last)?;
        ds.fsync().map_err(tree_err)?;
        Ok(())
    }

    /// The directories under `path` of the archive.
    fn subdirs(&self, path: &[&str]) -> anyhow::Result<Vec<String>> {
        let _g = self.lock.lock();
        let Some(ds) = self.existing()? else {
            return Ok(Vec::new());
        };
        let Some(dir) = dir_ino(&ds, path)? else {
            return Ok(Vec::new());
        };
        Ok(ds
            .readdir(dir)
            .map_err(tree_err)?
            .into_iter()
            .filter(|(_, _, k)| *k == FileKind::Directory)
            .map(|(n, _, _)| String::from_utf8_lossy(&n).to_string())
            .collect())
    }

    /// The generations kept for a VDB.
    pub fn generations(&self, vdb: &str) -> anyhow::Result<Vec<String>> {
        self.subdirs(&["vdbs", vdb])
    }

    /// The sources that have an archive.
    pub fn sources(&self) -> anyhow::Result<Vec<String>> {
        self.subdirs(&["sources"])
    }

    /// The VDBs that have an archive.
    pub fn vdbs(&self) -> anyhow::Result<Vec<String>> {
        self.subdirs(&["vdbs"])
    }

    /// The archiver's work for one cluster: every file its `pg_wal/archive_status` marks ready
    /// in dataset `live` is copied under `key` (unless there already) and acknowledged in
    /// `ack_dir`. Returns how many files it acknowledged.
    pub fn ingest(&self, key: &Key, live: &Dataset, ack_dir: &Path) -> anyhow::Result<usize> {
        let Some(wal) = dir_ino(live, &["pg_wal"])? else {
            return Ok(0);
        };
        let Some(status) = dir_ino(live, &["pg_wal", "archive_status"])? else {
            return Ok(0);
        };
        let mut ready: Vec<String> = list_files(live, status)?
            .into_iter()
            .filter_map(|(n, _)| n.strip_suffix(".ready").map(str::to_string))
            .filter(|n| archivable(n) && !ack_dir.join(n).exists())
            .collect();
        if ready.is_empty() {
            return Ok(0);
        }
        ready.sort();
        let have: std::collections::HashMap<String, u64> = self.list(key)?.into_iter().collect();
        let mut new = Vec::new();
        let mut acked = Vec::new();
        for name in ready {
            let Some(data) = read_file(live, wal, &name)? else {
                continue; // gone meanwhile: postgres archived and removed it
            };
            if have.get(&name) != Some(&(data.len() as u64)) {
                new.push((name.clone(), data));
            }
            acked.push(name);
            // Bounded memory: at most 4 segments (64 MiB) per round.
            if new.len() >= 4 {
                break;
            }
        }
        self.put(key, &new)?;
        for name in &acked {
            std::fs::write(ack_dir.join(name), b"")
                .with_context(|| format!("cannot acknowledge {name} in {}", ack_dir.display()))?;
        }
        if !new.is_empty() {
            tracing::debug!(archive = %key, files = new.len(), "archived WAL");
        }
        Ok(acked.len())
    }

    /// Stored and logical size of the archive: (files, logical bytes).
    pub fn size(&self, key: &Key) -> anyhow::Result<(usize, u64)> {
        let v = self.list(key)?;
        Ok((v.len(), v.iter().map(|(_, s)| s).sum()))
    }
}

/// The segment number of an archive file name (segments and partial segments), if it is one.
pub fn segno(name: &str) -> Option<(u32, u64)> {
    lsn::parse_segment(name.strip_suffix(".partial").unwrap_or(name))
}

/// Writes files into directory `pg_wal` of a dataset that is not mounted (a clone about to be
/// started), owned by postgres, and makes them durable.
pub fn stage_into(ds: &Dataset, files: &[(String, Vec<u8>)]) -> anyhow::Result<()> {
    if files.is_empty() {
        return Ok(());
    }
    let wal = dir_ino(ds, &["pg_wal"])?
        .ok_or_else(|| anyhow::anyhow!("the clone has no pg_wal directory"))?;
    let owner = crate::pg::postgres_ids()?;
    for (name, data) in files {
        write_file(ds, wal, name, data, owner, 0o600)?;
    }
    ds.fsync().map_err(tree_err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    fn open() -> (tempfile::TempDir, Arc<Datasets>) {
        let dir = tempfile::tempdir().unwrap();
        Store::create(dir.path()).unwrap();
        let (store, replay) = Store::open(dir.path()).unwrap();
        (
            dir,
            Arc::new(Datasets::open(Arc::new(store), replay).unwrap()),
        )
    }

    #[test]
    fn ready_files_are_copied_once_then_acknowledged() {
        let (dir, datasets) = open();
        let acks = dir.path().join("acks");
        std::fs::create_dir(&acks).unwrap();
        datasets.create("live").unwrap();
        let live = datasets.get("live").unwrap().unwrap();
        let wal = make_dirs(&live, &["pg_wal".into(), "archive_status".into()]).unwrap();
        let pg_wal = dir_ino(&live, &["pg_wal"]).unwrap().unwrap();
        let seg = "000000010000000000000003";
        let data: Vec<u8> = (0..3 * CHUNK + 77).map(|i| (i % 251) as u8).collect();
        write_file(&live, pg_wal, seg, &data, (0, 0), 0o600).unwrap();
        write_file(
            &live,
            pg_wal,
            "00000002.history",
            b"1\t0/3000000\tno reason\n",
            (0, 0),
            0o600,
        )
        .unwrap();
        write_file(&live, wal, &format!("{seg}.ready"), b"", (0, 0), 0o600).unwrap();
        write_file(&live, wal, "00000002.history.ready", b"", (0, 0), 0o600).unwrap();
        write_file(
            &live,
            wal,
            "000000010000000000000002.done",
            b"",
            (0, 0),
            0o600,
        )
        .unwrap();

        let a = WalArchive::new(datasets.clone());
        let key = Key::source("prod");
        assert_eq!(a.ingest(&key, &live, &acks).unwrap(), 2);
        assert!(acks.join(seg).exists() && acks.join("00000002.history").exists());
        assert_eq!(a.get(&key, seg).unwrap().unwrap(), data);
        assert_eq!(
            a.list(&key).unwrap(),
            vec![
                ("000000010000000000000003".to_string(), data.len() as u64),
                ("00000002.history".to_string(), 22)
            ]
        );
        // Acknowledged and still ready (postgres has not run its command yet): not again.
        assert_eq!(a.ingest(&key, &live, &acks).unwrap(), 0);
        // postgres consumed the acknowledgement but crashed before marking it done: acknowledged
        // again, nothing copied twice.
        std::fs::remove_file(acks.join(seg)).unwrap();
        assert_eq!(a.ingest(&key, &live, &acks).unwrap(), 1);

        assert_eq!(a.remove_where(&key, &|n| segno(n).is_some()).unwrap(), 1);
        assert_eq!(a.list(&key).unwrap().len(), 1);
        a.put(
            &Key::vdb("dev1", "g1"),
            &[("x.history".into(), b"h".to_vec())],
        )
        .unwrap();
        assert_eq!(a.generations("dev1").unwrap(), vec!["g1"]);
        a.remove(&Key::vdb_all("dev1")).unwrap();
        assert!(a.generations("dev1").unwrap().is_empty());

        // What was made durable survives a reopen of the store.
        drop(a);
        drop(live);
        drop(datasets);
        let (store, replay) = Store::open(dir.path()).unwrap();
        let datasets = Arc::new(Datasets::open(Arc::new(store), replay).unwrap());
        let a = WalArchive::new(datasets);
        assert_eq!(a.list(&key).unwrap().len(), 1);
    }
}
