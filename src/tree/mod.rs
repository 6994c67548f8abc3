//! The inode/tree layer: datasets as immutable trees in the block store plus their live,
//! in-memory changes; checkpoints that fold those changes into new trees.
//!
//! Invariants: one `Dataset` object per dataset id exists in a daemon (all mounts of it share
//! it); checkpoints are serialized by `checkpoint_lock`, and a checkpoint commits the records of
//! every loaded dataset in one redb transaction. A dataset recovery found damaged (`damage`) is
//! refused for mounting and snapshots until it is deleted, reset to a snapshot or its loss is
//! accepted.
//!
//! Size: `Datasets`, the catalog (create, delete, snapshot, clone, reset, checkpoint, the df
//! census) is one type over one redb schema and one checkpoint lock; the parts with their own
//! state are submodules (`dataset`, `radix`, `damage`, `scrub`).

#[cfg(test)]
mod control_tests;
pub mod damage;
pub mod dataset;
pub mod radix;
pub mod scrub;
#[cfg(test)]
mod snapshot_tests;
#[cfg(test)]
mod tests;
pub mod walk;

use crate::store::{Replay, Result, Store, StoredSnapshot};
use dataset::Dataset;
use parking_lot::Mutex;
use radix::NodeCache;
use std::collections::HashMap;
use std::collections::HashSet;
use std::sync::Arc;
use vdbfs_format::index::{CloneOrigin, DatasetRecord, LogPos, SnapshotRecord};
use vdbfs_format::BlockId;

/// Errors about names and existence that the control API reports to users.
#[derive(Debug, thiserror::Error)]
pub enum NameError {
    #[error("dataset name {0:?} is invalid: use 1-64 characters from A-Z a-z 0-9 . _ - (not starting with . or -)")]
    Invalid(String),
    #[error("dataset {0:?} already exists; pick another name or delete it first ('vdbfs dataset delete {0}')")]
    Exists(String),
    #[error("no dataset named {0:?}; 'vdbfs dataset list' shows the datasets")]
    NotFound(String),
    #[error("snapshot name {0:?} is invalid: use 1-64 characters from A-Z a-z 0-9 . _ - (not starting with . or -)")]
    InvalidSnapshot(String),
    #[error("{0:?} is not a snapshot name: write DATASET@SNAPSHOT")]
    NotSnapshotRef(String),
    #[error("no snapshot {0}; 'vdbfs snapshot list' shows the snapshots")]
    SnapshotNotFound(String),
    #[error("snapshot {0} already exists; pick another name")]
    SnapshotExists(String),
    #[error("dataset {0} has {1} snapshot(s); delete them first or pass --with-snapshots")]
    HasSnapshots(String, usize),
}

/// The indexes of the set bits of a bitset.
fn bits(mask: &[u64]) -> impl Iterator<Item = usize> + '_ {
    mask.iter().enumerate().flat_map(|(w, &word)| {
        (0..64)
            .filter(move |b| word & (1 << b) != 0)
            .map(move |b| w * 64 + b)
    })
}

/// Splits `dataset@snapshot`.
pub fn parse_snapshot_ref(s: &str) -> std::result::Result<(&str, &str), NameError> {
    match s.split_once('@') {
        Some((d, n)) if !d.is_empty() && !n.is_empty() => Ok((d, n)),
        _ => Err(NameError::NotSnapshotRef(s.to_string())),
    }
}

pub fn check_snapshot_name(name: &str) -> std::result::Result<(), NameError> {
    check_dataset_name(name).map_err(|_| NameError::InvalidSnapshot(name.to_string()))
}

/// A snapshot as listed: its record plus the name of its dataset.
pub struct SnapshotInfo {
    pub dataset: String,
    pub rec: SnapshotRecord,
    /// Properties recorded with the snapshot by the control path (JSON), if any.
    pub props: Option<Vec<u8>>,
}

impl SnapshotInfo {
    pub fn full_name(&self) -> String {
        format!("{}@{}", self.dataset, self.rec.name)
    }
}

/// Space used by one dataset or snapshot.
#[derive(Clone)]
pub struct Usage {
    pub name: String,
    pub is_snapshot: bool,
    pub logical_bytes: u64,
    /// Stored bytes referenced by this root and no other: what deleting it would free.
    pub unique_bytes: u64,
    /// Stored bytes referenced by this root and at least one other.
    pub shared_bytes: u64,
}

#[derive(Clone)]
pub struct StoreUsage {
    pub roots: Vec<Usage>,
    /// Bytes of all pack files.
    pub physical_bytes: u64,
    /// Stored bytes of live blocks.
    pub live_stored_bytes: u64,
    /// Uncompressed bytes of live blocks.
    pub live_raw_bytes: u64,
    /// Uncompressed bytes referenced, counting every reference by every root.
    pub referenced_raw_bytes: u64,
}

pub struct GcReport {
    pub blocks_freed: u64,
    pub bytes_freed: u64,
    pub packs_rewritten: usize,
    pub bytes_reclaimed: i64,
}

pub fn check_dataset_name(name: &str) -> std::result::Result<(), NameError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(NameError::Invalid(name.to_string()))
    }
}

pub struct Datasets {
    store: Arc<Store>,
    cache: Arc<NodeCache>,
    loaded: Mutex<HashMap<u64, Arc<Dataset>>>,
    checkpoint_lock: Mutex<()>,
    gc_lock: Mutex<()>,
    /// The damage marks of refused datasets, by id (the `damaged` table; see `damage`).
    damaged: Mutex<HashMap<u64, Vec<vdbfs_format::index::DamageMark>>>,
    /// The last space accounting, with the roots it was made of (see [`Datasets::accounting`]).
    accounting: Mutex<Option<Arc<Accounting>>>,
}

/// One space accounting of the whole store: per root (`vdbfs df`) and per dataset with its
/// snapshots (a VDB's unique bytes), from a single census and index pass.
pub struct Accounting {
    pub store: StoreUsage,
    /// Per dataset: the logical size of its live tree, and the stored bytes only it and its own
    /// snapshots reference (what deleting it with its snapshots would free).
    pub per_dataset: HashMap<String, (u64, u64)>,
    /// The roots it counted, in order (datasets then snapshots): the same roots give the same
    /// figures, since trees are immutable.
    roots: Vec<(String, bool, Option<BlockId>)>,
    /// When it was made.
    pub at: std::time::Instant,
}

/// A sortable name for an unnamed snapshot, from its creation time (UTC, milliseconds).
pub fn snapshot_name_for(t: vdbfs_format::tree::Timestamp) -> String {
    let s = crate::time::rfc3339(t.secs); // 2026-11-26T08:52:05Z
    let compact: String = s.chars().filter(|c| c.is_ascii_alphanumeric()).collect();
    // 20261126T085205Z -> 20261126T085205.123Z
    format!(
        "{}.{:03}Z",
        &compact[..compact.len() - 1],
        t.nsecs / 1_000_000
    )
}

impl Datasets {
    /// Opens the datasets of a store, replays the journal found by recovery, and checkpoints.
    /// Datasets that damaged log bytes may have cost fsynced changes are replayed up to the
    /// damage and marked (see `damage`), in the same commit as the checkpoint.
    pub fn open(store: Arc<Store>, replay: Replay) -> Result<Datasets> {
        let ds = Datasets {
            store,
            cache: Arc::new(NodeCache::new(4096)),
            loaded: Mutex::new(HashMap::new()),
            checkpoint_lock: Mutex::new(()),
            gc_lock: Mutex::new(()),
            accounting: Mutex::new(None),
            damaged: Mutex::new(HashMap::new()),
        };
        let records: HashMap<u64, DatasetRecord> =
            ds.list()?.into_iter().map(|r| (r.id, r)).collect();
        let with_records: HashSet<u64> = replay
            .journal
            .iter()
            .filter(|(pos, rec)| {
                records
                    .get(&rec.dataset)
                    .is_some_and(|r| *pos >= r.replay_from)
            })
            .map(|(_, rec)| rec.dataset)
            .collect();
        let (groups, torn) = damage::groups(replay.journal, &records);
        let assessed = damage::assess(&ds.store, &records, &groups, &with_records, &replay.damage)?;
        let mut assessed = assessed;
        let (mut replayed, mut held_back) = (0usize, 0usize);
        for g in groups {
            if assessed
                .get(&g.dataset)
                .is_some_and(|(cut, _)| g.last >= *cut)
            {
                held_back += 1;
                continue;
            }
            let Some(r) = records.get(&g.dataset) else {
                continue;
            };
            match ds.load(r).replay(g.ops) {
                Ok(()) => replayed += 1,
                // Replay reads the dataset's tree: damage the assessment could not attribute
                // (unreadable bytes among the last checkpoint's tree objects) breaks it. The
                // dataset is refused like the others, never the whole store.
                Err(e) if !replay.damage.is_empty() && damage::is_data_error(&e) => {
                    tracing::error!(
                        dataset = %r.name,
                        "recovery: replaying the journal failed on damaged data: {e}"
                    );
                    ds.loaded.lock().remove(&g.dataset);
                    let entry = assessed
                        .entry(g.dataset)
                        .or_insert((LogPos::default(), Vec::new()));
                    entry.0 = LogPos::default();
                    if entry.1.is_empty() {
                        entry.1 = damage::unattributed(&replay.damage);
                    }
                    held_back += 1;
                }
                Err(e) => return Err(e),
            }
        }
        if torn > 0 {
            tracing::warn!(
                groups = torn,
                "recovery: dropping journal groups whose last record never became durable"
            );
        }
        if replayed > 0 {
            tracing::info!(records = replayed, "recovery: journal replayed");
        }
        // A dataset cut before everything is one whose committed tree the damage broke: it
        // stays as it was committed (not loaded, so not checkpointed either).
        let broken: HashSet<u64> = assessed
            .iter()
            .filter(|(_, (cut, _))| *cut == LogPos::default())
            .map(|(id, _)| *id)
            .collect();
        let new: HashMap<u64, Vec<vdbfs_format::index::DamageMark>> = assessed
            .into_iter()
            .map(|(id, (_, marks))| (id, marks))
            .collect();
        let mut marks: HashMap<u64, Vec<vdbfs_format::index::DamageMark>> = HashMap::new();
        for (id, m) in ds.store.damage_marks()? {
            if records.contains_key(&id) {
                marks.entry(id).or_default().push(m);
            }
        }
        for (id, ms) in &new {
            let name = records.get(id).map_or("?", |r| r.name.as_str());
            tracing::error!(
                dataset = name,
                journal_groups_not_replayed = held_back,
                "recovery: {}",
                damage::refusal_text(name, ms)
            );
            marks.entry(*id).or_default().extend(ms.iter().cloned());
            // Loaded, so that the checkpoint below commits its state (replayed up to the damage).
            if let (Some(r), false) = (records.get(id), broken.contains(id)) {
                ds.load(r);
            }
        }
        // Always commit, even with nothing replayed: the replay start then moves past the old
        // log, so a torn group in it can never be joined by records of this run. The marks go
        // in the same commit: once the damaged log is behind the replay start, they are what
        // remembers the damage.
        ds.store.with_reserve(|| {
            let _g = ds.checkpoint_lock.lock();
            let loaded: Vec<Arc<Dataset>> = ds.loaded.lock().values().cloned().collect();
            let mut records = Vec::new();
            for d in loaded {
                records.push(d.flush_trees()?);
            }
            ds.store
                .commit_checkpoint_with(&records, |c| c.put_damage(&new))
        })?;
        *ds.damaged.lock() = marks;
        Ok(ds)
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    fn load(&self, rec: &DatasetRecord) -> Arc<Dataset> {
        self.loaded
            .lock()
            .entry(rec.id)
            .or_insert_with(|| Arc::new(Dataset::load(self.store.clone(), self.cache.clone(), rec)))
            .clone()
    }

    pub fn list(&self) -> Result<Vec<DatasetRecord>> {
        let mut out = self.store.dataset_records()?;
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    pub fn record(&self, name: &str) -> Result<Option<DatasetRecord>> {
        self.store.dataset_record(name)
    }

    pub fn get(&self, name: &str) -> Result<Option<Arc<Dataset>>> {
        Ok(self.record(name)?.map(|r| self.load(&r)))
    }

    pub fn create(&self, name: &str) -> anyhow::Result<DatasetRecord> {
        check_dataset_name(name)?;
        let _g = self.checkpoint_lock.lock();
        self.insert_dataset(name, None, dataset::ROOT_INO + 1, None)
    }

    /// Adds a dataset record (new id, name entry, optional clone origin) in one transaction.
    /// The caller holds `checkpoint_lock`.
    fn insert_dataset(
        &self,
        name: &str,
        root: Option<BlockId>,
        next_ino: u64,
        origin: Option<CloneOrigin>,
    ) -> anyhow::Result<DatasetRecord> {
        self.store.catalog_write(|c| {
            if c.name_taken(name)? {
                return Err(NameError::Exists(name.to_string()).into());
            }
            let rec = DatasetRecord {
                id: c.allocate_dataset_id()?,
                name: name.to_string(),
                created: dataset::now(),
                root,
                next_ino,
                replay_from: self.store.end(),
            };
            c.insert_dataset(&rec)?;
            if let Some(origin) = &origin {
                c.put_origin(rec.id, origin)?;
            }
            Ok(rec)
        })
    }

    /// Deletes a dataset that is not in use (the caller checks mounts). Its blocks become garbage.
    pub fn delete(&self, name: &str) -> anyhow::Result<()> {
        let _g = self.checkpoint_lock.lock();
        let rec = self
            .record(name)?
            .ok_or_else(|| NameError::NotFound(name.to_string()))?;
        self.store.catalog_write(|c| {
            c.remove_dataset(name, rec.id)?;
            c.clear_damage(rec.id)
        })?;
        self.loaded.lock().remove(&rec.id);
        self.damaged.lock().remove(&rec.id);
        Ok(())
    }

    /// Folds every loaded dataset's changes into new trees and commits them with the index.
    pub fn checkpoint(&self) -> Result<()> {
        self.checkpoint_inner(false)
    }

    fn force_checkpoint(&self) -> Result<()> {
        self.checkpoint_inner(true)
    }

    fn checkpoint_inner(&self, force: bool) -> Result<()> {
        self.store.with_reserve(|| self.checkpoint_reserved(force))
    }

    fn checkpoint_reserved(&self, force: bool) -> Result<()> {
        let _g = self.checkpoint_lock.lock();
        let loaded: Vec<Arc<Dataset>> = self.loaded.lock().values().cloned().collect();
        if !force && !loaded.iter().any(|d| d.is_dirty()) && self.store.recent_blocks() == 0 {
            return Ok(());
        }
        let mut records = Vec::new();
        for ds in loaded {
            // A clean dataset's record only moves its replay position forward.
            records.push(ds.flush_trees()?);
        }
        self.store.commit_checkpoint(&records)
    }

    fn find_snapshot(&self, dataset: &str, snap: &str) -> anyhow::Result<SnapshotRecord> {
        let rec = self
            .record(dataset)?
            .ok_or_else(|| NameError::NotFound(dataset.to_string()))?;
        Ok(self
            .store
            .snapshot_record(rec.id, snap)?
            .ok_or_else(|| NameError::SnapshotNotFound(format!("{dataset}@{snap}")))?)
    }

    /// Snapshots, of one dataset or of all, oldest first.
    pub fn snapshots(&self, dataset: Option<&str>) -> anyhow::Result<Vec<SnapshotInfo>> {
        let datasets = self.list()?;
        let want = match dataset {
            Some(d) => Some(
                datasets
                    .iter()
                    .find(|r| r.name == d)
                    .ok_or_else(|| NameError::NotFound(d.to_string()))?
                    .id,
            ),
            None => None,
        };
        let names: HashMap<u64, String> = datasets.into_iter().map(|r| (r.id, r.name)).collect();
        let mut out = Vec::new();
        for StoredSnapshot { rec, props } in self.store.snapshot_records(true)? {
            if want.is_some_and(|w| w != rec.dataset) {
                continue;
            }
            let dataset = names
                .get(&rec.dataset)
                .cloned()
                .unwrap_or_else(|| format!("#{}", rec.dataset));
            out.push(SnapshotInfo {
                dataset,
                rec,
                props,
            });
        }
        out.sort_by(|a, b| {
            (a.rec.created, &a.dataset, &a.rec.name).cmp(&(b.rec.created, &b.dataset, &b.rec.name))
        });
        Ok(out)
    }

    /// Freezes a dataset as it is now: one checkpoint, whose commit also records the snapshot.
    /// Costs what changed since the last checkpoint; writers wait only while its trees are built.
    pub fn snapshot(&self, dataset: &str, name: Option<&str>) -> anyhow::Result<SnapshotInfo> {
        self.snapshot_with_props(dataset, name, None)
    }

    /// [`Datasets::snapshot`], recording `props` (JSON) with the snapshot in the same commit.
    pub fn snapshot_with_props(
        &self,
        dataset: &str,
        name: Option<&str>,
        props: Option<Vec<u8>>,
    ) -> anyhow::Result<SnapshotInfo> {
        self.store
            .with_reserve(|| self.snapshot_reserved(dataset, name, props))
    }

    fn snapshot_reserved(
        &self,
        dataset: &str,
        name: Option<&str>,
        props: Option<Vec<u8>>,
    ) -> anyhow::Result<SnapshotInfo> {
        let created = dataset::now();
        let name = match name {
            Some(n) => n.to_string(),
            None => snapshot_name_for(created),
        };
        check_snapshot_name(&name)?;
        let rec = self
            .record(dataset)?
            .ok_or_else(|| NameError::NotFound(dataset.to_string()))?;
        // A snapshot would carry the damage into clones that know nothing of it.
        self.refuse_id_if_damaged(rec.id, dataset)?;
        // Writes the kernel still caches for the mount belong in the snapshot.
        let live = self.loaded.lock().get(&rec.id).cloned();
        if let Some(ds) = live {
            ds.flush_cache()?;
        }
        let _g = self.checkpoint_lock.lock();
        if self.store.snapshot_record(rec.id, &name)?.is_some() {
            return Err(NameError::SnapshotExists(format!("{dataset}@{name}")).into());
        }
        // Only this dataset's tree is folded and committed: other datasets keep their state and
        // replay positions, and the index entries of new blocks wait for the next checkpoint
        // (recovery finds unindexed blocks by scanning from `indexed_upto`), so a snapshot
        // costs what changed in this dataset, not a checkpoint of the store.
        let live = self.loaded.lock().get(&rec.id).cloned();
        let mut records = Vec::new();
        if let Some(ds) = &live {
            records.push(ds.flush_trees()?);
        }
        let (root, next_ino) = match records.first() {
            Some(r) => (r.root, r.next_ino),
            None => (rec.root, rec.next_ino),
        };
        let snap = SnapshotRecord {
            dataset: rec.id,
            name: name.clone(),
            created,
            root,
            next_ino,
        };
        self.store
            .commit_roots_with(&records, |c| c.put_snapshot(&snap, props.as_deref()))?;
        Ok(SnapshotInfo {
            dataset: dataset.to_string(),
            rec: snap,
            props,
        })
    }

    /// Records a snapshot published by another host (`crate::remote`): dataset `dataset` is
    /// made (empty) if missing, and `snap` (its `dataset` field is set here) becomes one of
    /// its snapshots, with `props`, in one commit. Its blocks need not be here: reads fetch them.
    pub fn import_snapshot(
        &self,
        dataset: &str,
        mut snap: SnapshotRecord,
        props: Option<Vec<u8>>,
    ) -> anyhow::Result<()> {
        check_dataset_name(dataset)?;
        check_snapshot_name(&snap.name)?;
        let _g = self.checkpoint_lock.lock();
        let rec = match self.record(dataset)? {
            Some(r) => r,
            None => self.insert_dataset(dataset, None, dataset::ROOT_INO + 1, None)?,
        };
        snap.dataset = rec.id;
        let name = snap.name.clone();
        self.store.commit_roots_with(&[], |c| {
            if c.snapshot_exists(rec.id, &name)? {
                return Ok(());
            }
            c.put_snapshot(&snap, props.as_deref())
        })?;
        Ok(())
    }

    /// Deletes a snapshot; clones made from it keep every block they use.
    pub fn delete_snapshot(&self, dataset: &str, snap: &str) -> anyhow::Result<()> {
        let rec = self.find_snapshot(dataset, snap)?;
        let _g = self.checkpoint_lock.lock();
        self.store
            .catalog_write(|c| c.remove_snapshot(rec.dataset, snap))?;
        Ok(())
    }

    /// A new writable dataset sharing every block of the snapshot: constant time.
    pub fn clone_snapshot(
        &self,
        dataset: &str,
        snap: &str,
        new_name: &str,
    ) -> anyhow::Result<DatasetRecord> {
        check_dataset_name(new_name)?;
        let s = self.find_snapshot(dataset, snap)?;
        let _g = self.checkpoint_lock.lock();
        let origin = CloneOrigin {
            dataset: s.dataset,
            snapshot: s.name.clone(),
        };
        self.insert_dataset(new_name, s.root, s.next_ino, Some(origin))
    }

    /// Points an existing dataset at a snapshot's tree (VDB refresh and rewind): the dataset
    /// keeps its id, name and snapshots; its current tree becomes garbage. With `set_origin` the
    /// snapshot also becomes its clone origin. One transaction: the dataset is either as it was
    /// or at the snapshot. The caller guarantees the dataset is not mounted and was checkpointed.
    pub fn reset_to_snapshot(
        &self,
        dataset: &str,
        from_dataset: &str,
        from_snap: &str,
        set_origin: bool,
    ) -> anyhow::Result<()> {
        let _g = self.checkpoint_lock.lock();
        let rec = self
            .record(dataset)?
            .ok_or_else(|| NameError::NotFound(dataset.to_string()))?;
        let s = self.find_snapshot(from_dataset, from_snap)?;
        if let Some(ds) = self.loaded.lock().get(&rec.id) {
            if ds.is_dirty() {
                anyhow::bail!("dataset {dataset} has unflushed changes; checkpoint it first");
            }
        }
        let new = DatasetRecord {
            id: rec.id,
            name: rec.name.clone(),
            created: rec.created,
            root: s.root,
            next_ino: s.next_ino,
            replay_from: self.store.end(),
        };
        self.store.catalog_write(|c| {
            c.put_dataset_record(&new)?;
            if set_origin {
                let origin = CloneOrigin {
                    dataset: s.dataset,
                    snapshot: s.name.clone(),
                };
                c.put_origin(rec.id, &origin)?;
            }
            // The snapshot's tree was committed whole: nothing of the damage is in it.
            c.clear_damage(rec.id)
        })?;
        // The next user loads the new tree.
        self.loaded.lock().remove(&rec.id);
        self.damaged.lock().remove(&rec.id);
        Ok(())
    }

    /// The snapshot a clone was made from, as `dataset@snapshot` (dataset by id if deleted).
    pub fn origin(&self, id: u64) -> Result<Option<String>> {
        let Some(o) = self.store.clone_origin(id)? else {
            return Ok(None);
        };
        let name = match self.store.dataset_record_by_id(o.dataset)? {
            Some(r) => r.name,
            None => format!("#{}", o.dataset),
        };
        Ok(Some(format!("{name}@{}", o.snapshot)))
    }

    /// A read-only view of a snapshot, for mounting. Never checkpointed.
    pub fn snapshot_view(&self, dataset: &str, snap: &str) -> anyhow::Result<Arc<Dataset>> {
        let s = self.find_snapshot(dataset, snap)?;
        let rec = DatasetRecord {
            id: u64::MAX,
            name: format!("{dataset}@{snap}"),
            created: s.created,
            root: s.root,
            next_ino: s.next_ino,
            replay_from: Default::default(),
        };
        Ok(Arc::new(Dataset::load(
            self.store.clone(),
            self.cache.clone(),
            &rec,
        )))
    }

    /// Every root that keeps blocks alive: datasets and snapshots, by display name.
    fn roots(&self) -> Result<Vec<(String, bool, Option<BlockId>)>> {
        let datasets = self.list()?;
        let names: HashMap<u64, String> = datasets.iter().map(|r| (r.id, r.name.clone())).collect();
        let mut out: Vec<_> = datasets
            .into_iter()
            .map(|r| (r.name, false, r.root))
            .collect();
        for StoredSnapshot { rec: s, .. } in self.store.snapshot_records(false)? {
            let ds = names
                .get(&s.dataset)
                .cloned()
                .unwrap_or_else(|| format!("#{}", s.dataset));
            out.push((format!("{ds}@{}", s.name), true, s.root));
        }
        Ok(out)
    }

    /// Mark and sweep: frees blocks no dataset or snapshot references, then rewrites packs that
    /// are mostly garbage. Concurrent writes are safe (see the store's invariants).
    pub fn gc(&self) -> Result<GcReport> {
        let _trim = walk::TrimOnDrop;
        let _gc = self.gc_lock.lock();
        self.store.set_gc_active(true);
        let result = self.store.with_reserve(|| self.gc_inner());
        self.store.set_gc_active(false);
        result
    }

    fn gc_inner(&self) -> Result<GcReport> {
        // The active pack can only be rewritten once closed: close it unless it is small.
        self.store.roll_if_larger(16 << 20)?;
        self.force_checkpoint()?;
        // Chosen before the index is listed: every block of these packs is in that listing.
        let closed = self.store.closed_packs()?;
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let mut marked = walk::Marks::new(self.store.indexed_count()?, seed);
        for (_, _, root) in self.roots()? {
            walk::mark_root(&self.store, root, &mut marked)?;
        }
        let loaded: Vec<Arc<Dataset>> = self.loaded.lock().values().cloned().collect();
        for ds in loaded {
            ds.orphan_blocks(&mut marked)?;
        }
        tracing::debug!(bytes = marked.bytes(), "gc: marks");
        // Sweep while streaming the index, in batches; count what stays live per pack.
        let (mut blocks_freed, mut bytes_freed) = (0u64, 0u64);
        let mut live: HashMap<u32, u64> = HashMap::new();
        let mut batch: Vec<BlockId> = Vec::with_capacity(1024);
        let mut sweep = |batch: &mut Vec<BlockId>| -> Result<()> {
            let _g = self.checkpoint_lock.lock();
            let (n, b) = self.store.sweep(batch)?;
            blocks_freed += n;
            bytes_freed += b;
            batch.clear();
            Ok(())
        };
        self.store.each_indexed_block(|id, loc| {
            if marked.contains(id) {
                *live.entry(loc.pack).or_default() += loc.len as u64;
            } else {
                batch.push(*id);
                if batch.len() == 1024 {
                    sweep(&mut batch)?;
                }
            }
            Ok(())
        })?;
        sweep(&mut batch)?;
        drop(marked);
        self.store.set_gc_active(false);
        // Compaction: packs where live records fill less than half the file. What is still
        // indexed in them after the sweep is live: it moves to the log end.
        let before = self.store.physical_bytes()? as i64;
        let mut rewrite = Vec::new();
        for p in closed {
            let len = self.store.pack_len(p)?;
            if (*live.get(&p).unwrap_or(&0) as f64) < 0.5 * len as f64 {
                rewrite.push(p);
            }
        }
        // Emptiest first: a pack of garbage costs no copy and gives back the most room. Packs go
        // in batches whose live records fit in the room there is (free space and the reserve):
        // on a full filesystem one small pack at a time, each deleted before the next is copied.
        rewrite.sort_by_key(|p| live.get(p).copied().unwrap_or(0));
        let mut records: HashMap<u32, Vec<(BlockId, vdbfs_format::index::BlockLoc)>> =
            HashMap::new();
        {
            let set: HashSet<u32> = rewrite.iter().copied().collect();
            // What the sweep left indexed in these packs is live.
            self.store.each_indexed_block(|id, loc| {
                if set.contains(&loc.pack) {
                    records.entry(loc.pack).or_default().push((*id, *loc));
                }
                Ok(())
            })?;
        }
        const MAX_BATCH: u64 = 1 << 30;
        let mut rewritten = 0usize;
        let mut todo = rewrite.into_iter().peekable();
        while todo.peek().is_some() {
            let room = self.store.room()?.min(MAX_BATCH);
            let (mut batch, mut need) = (Vec::new(), 0u64);
            while let Some(&p) = todo.peek() {
                let l = live.get(&p).copied().unwrap_or(0);
                if need + l > room {
                    if batch.is_empty() {
                        tracing::warn!(
                            pack = p,
                            live_bytes = l,
                            room,
                            "gc: not enough room to rewrite this pack now; a later collection retries"
                        );
                        todo.next();
                        continue;
                    }
                    break;
                }
                batch.push(p);
                need += l;
                todo.next();
            }
            if batch.is_empty() {
                break;
            }
            if need > 0 {
                self.store.make_room_for(need, "rewriting packs")?;
            }
            for p in &batch {
                for (id, loc) in records.remove(p).unwrap_or_default() {
                    self.store.relocate(&id, &loc)?;
                }
            }
            // The copies (and the sweep) are committed by this checkpoint before any old pack
            // goes away.
            self.force_checkpoint()?;
            self.store.delete_packs(&batch)?;
            rewritten += batch.len();
        }
        let after = self.store.physical_bytes()? as i64;
        Ok(GcReport {
            blocks_freed,
            bytes_freed,
            packs_rewritten: rewritten,
            bytes_reclaimed: before - after,
        })
    }

    /// Space accounting for `vdbfs df`, per root (see [`Datasets::accounting`]).
    pub fn usage(&self) -> Result<StoreUsage> {
        Ok(self.usage_within(std::time::Duration::ZERO)?.0)
    }

    /// [`Datasets::usage`] from an accounting at most `max_age` old (see
    /// [`Datasets::accounting_within`]), with that accounting's age. The pack files' size is
    /// always read now: gc and appends change it without any root changing.
    pub fn usage_within(
        &self,
        max_age: std::time::Duration,
    ) -> Result<(StoreUsage, std::time::Duration)> {
        let a = self.accounting_within(max_age)?;
        let mut u = a.store.clone();
        u.physical_bytes = self.store.physical_bytes()?;
        Ok((u, a.at.elapsed()))
    }

    /// Per dataset: the logical size of its live tree, and the stored bytes that only it and
    /// its own snapshots reference (what deleting it with its snapshots would free).
    pub fn dataset_usage(&self) -> Result<HashMap<String, (u64, u64)>> {
        Ok(self.accounting()?.per_dataset.clone())
    }

    /// The space accounting of the store as it is now (after a checkpoint). It is one census of
    /// every root (each tree object read once) and one pass over the index, so it costs time
    /// and memory in proportion to the blocks stored; it is made again only when some root
    /// changed since the last one (the same immutable trees give the same figures), so idle
    /// datasets cost one checkpoint and one read of the catalog.
    pub fn accounting(&self) -> Result<Arc<Accounting>> {
        self.checkpoint()?;
        let roots = self.roots()?;
        if let Some(a) = self.accounting.lock().as_ref() {
            if a.roots == roots {
                return Ok(a.clone());
            }
        }
        let a = Arc::new(self.account(roots)?);
        *self.accounting.lock() = Some(a.clone());
        Ok(a)
    }

    /// The last accounting if it is at most `max_age` old, even if roots changed since (for
    /// callers that poll: metrics scrapes, lists), else [`Datasets::accounting`].
    pub fn accounting_within(&self, max_age: std::time::Duration) -> Result<Arc<Accounting>> {
        if let Some(a) = self.accounting.lock().as_ref() {
            if a.at.elapsed() <= max_age {
                return Ok(a.clone());
            }
        }
        self.accounting()
    }

    fn account(&self, roots: Vec<(String, bool, Option<BlockId>)>) -> Result<Accounting> {
        let _trim = walk::TrimOnDrop;
        // `group` maps a root to the root of its dataset's live tree (a dataset's own root, or
        // a snapshot's dataset by name); snapshots of deleted datasets belong to no group.
        let pos: HashMap<&str, usize> = roots
            .iter()
            .enumerate()
            .filter(|(_, (_, is_snapshot, _))| !is_snapshot)
            .map(|(r, (name, _, _))| (name.as_str(), r))
            .collect();
        let group: Vec<Option<usize>> = roots
            .iter()
            .map(|(name, _, _)| pos.get(name.split('@').next().unwrap_or("")).copied())
            .collect();
        let census = walk::Census::of(&self.store, &roots.iter().map(|r| r.2).collect::<Vec<_>>())?;
        let n = roots.len();
        let (mut unique, mut shared) = (vec![0u64; n], vec![0u64; n]);
        let mut ds_unique = vec![0u64; n];
        let (mut live_stored, mut live_raw, mut referenced_raw) = (0u64, 0u64, 0u64);
        let mut census_at = census.cursor();
        self.store.each_indexed_block(|id, loc| {
            let Some((mask, raw)) = census_at.get(id) else {
                return Ok(());
            };
            let raw = match raw {
                0 => self.store.raw_len(loc)? as u64,
                r => r as u64,
            };
            let stored = loc.len as u64;
            let refs: u32 = mask.iter().map(|w| w.count_ones()).sum();
            live_stored += stored;
            live_raw += raw;
            referenced_raw += raw * refs as u64;
            let mut owner = None;
            let mut owned = true;
            for r in bits(mask) {
                if refs == 1 {
                    unique[r] += stored;
                } else {
                    shared[r] += stored;
                }
                match (owner, group[r]) {
                    (_, None) => owned = false,
                    (None, g) => owner = g,
                    (Some(o), Some(g)) if o != g => owned = false,
                    _ => {}
                }
            }
            if let (true, Some(o)) = (owned, owner) {
                ds_unique[o] += stored;
            }
            Ok(())
        })?;
        let per_dataset = pos
            .iter()
            .map(|(name, &r)| (name.to_string(), (census.logical[r], ds_unique[r])))
            .collect();
        let out = roots
            .iter()
            .enumerate()
            .map(|(r, (name, is_snapshot, _))| Usage {
                name: name.clone(),
                is_snapshot: *is_snapshot,
                logical_bytes: census.logical[r],
                unique_bytes: unique[r],
                shared_bytes: shared[r],
            })
            .collect();
        Ok(Accounting {
            store: StoreUsage {
                roots: out,
                physical_bytes: self.store.physical_bytes()?,
                live_stored_bytes: live_stored,
                live_raw_bytes: live_raw,
                referenced_raw_bytes: referenced_raw,
            },
            per_dataset,
            roots,
            at: std::time::Instant::now(),
        })
    }

    /// Whether enough has changed since the last checkpoint to take one now.
    pub fn checkpoint_due(&self) -> bool {
        self.store.recent_blocks() > 0 || self.loaded.lock().values().any(|d| d.is_dirty())
    }

    // ---- for the control path: internal datasets, snapshot properties, adopted trees ------

    /// Creates an internal dataset: its name is `.` followed by a valid dataset name, which no
    /// user command can create or name (the control path keeps its own data there).
    pub fn create_internal(&self, name: &str) -> anyhow::Result<DatasetRecord> {
        let rest = name.strip_prefix('.').unwrap_or("");
        check_dataset_name(rest).map_err(|_| NameError::Invalid(name.to_string()))?;
        let _g = self.checkpoint_lock.lock();
        self.insert_dataset(name, None, dataset::ROOT_INO + 1, None)
    }

    /// Replaces the properties recorded with a snapshot (one transaction).
    pub fn set_snapshot_props(
        &self,
        dataset: &str,
        snap: &str,
        props: &[u8],
    ) -> anyhow::Result<()> {
        let rec = self.find_snapshot(dataset, snap)?;
        let _g = self.checkpoint_lock.lock();
        self.store
            .catalog_write(|c| c.put_snapshot_props(rec.dataset, snap, props))?;
        Ok(())
    }

    /// Records snapshot `dataset@name` of the tree of snapshot `from_dataset@from_snap`: no
    /// checkpoint (that tree is immutable), one transaction. The new snapshot keeps the tree
    /// alive whatever happens to the one it came from.
    pub fn adopt_snapshot(
        &self,
        dataset: &str,
        name: &str,
        from_dataset: &str,
        from_snap: &str,
        props: Option<Vec<u8>>,
    ) -> anyhow::Result<SnapshotInfo> {
        check_snapshot_name(name)?;
        let rec = self
            .record(dataset)?
            .ok_or_else(|| NameError::NotFound(dataset.to_string()))?;
        let from = self.find_snapshot(from_dataset, from_snap)?;
        let _g = self.checkpoint_lock.lock();
        let snap = SnapshotRecord {
            dataset: rec.id,
            name: name.to_string(),
            created: dataset::now(),
            root: from.root,
            next_ino: from.next_ino,
        };
        self.store.catalog_write(|c| {
            if c.snapshot_exists(rec.id, name)? {
                return Err(anyhow::Error::from(NameError::SnapshotExists(format!(
                    "{dataset}@{name}"
                ))));
            }
            c.put_snapshot(&snap, props.as_deref())?;
            Ok(())
        })?;
        Ok(SnapshotInfo {
            dataset: dataset.to_string(),
            rec: snap,
            props,
        })
    }
}

/// Whether a dataset (or `dataset@snapshot`) name is internal to the control path (see
/// [`Datasets::create_internal`]).
pub fn is_internal(name: &str) -> bool {
    name.starts_with('.')
}
