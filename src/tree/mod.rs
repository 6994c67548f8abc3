//! The inode/tree layer: datasets as immutable trees in the block store plus their live,
//! in-memory changes; checkpoints that fold those changes into new trees.
//!
//! Invariants: one `Dataset` object per dataset id exists in a daemon (all mounts of it share
//! it); checkpoints are serialized by `checkpoint_lock`, and a checkpoint commits the records of
//! every loaded dataset in one redb transaction.

pub mod dataset;
pub mod radix;
#[cfg(test)]
mod tests;

use crate::store::{Error, Replay, Result, Store, DATASETS, META, NAMES};
use dataset::Dataset;
use parking_lot::Mutex;
use radix::NodeCache;
use redb::{ReadableDatabase, ReadableTable};
use std::collections::HashMap;
use std::sync::Arc;
use vdbfs_format::index::DatasetRecord;

/// Errors about names and existence that the control API reports to users.
#[derive(Debug, thiserror::Error)]
pub enum NameError {
    #[error("dataset name {0:?} is invalid: use 1-64 characters from A-Z a-z 0-9 . _ - (not starting with . or -)")]
    Invalid(String),
    #[error("dataset {0:?} already exists; pick another name or delete it first ('vdbfs dataset delete {0}')")]
    Exists(String),
    #[error("no dataset named {0:?}; 'vdbfs dataset list' shows the datasets")]
    NotFound(String),
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
}

impl Datasets {
    /// Opens the datasets of a store, replays the journal found by recovery, and checkpoints.
    pub fn open(store: Arc<Store>, replay: Replay) -> Result<Datasets> {
        let ds = Datasets {
            store,
            cache: Arc::new(NodeCache::new(8192)),
            loaded: Mutex::new(HashMap::new()),
            checkpoint_lock: Mutex::new(()),
        };
        let records: HashMap<u64, DatasetRecord> =
            ds.list()?.into_iter().map(|r| (r.id, r)).collect();
        let mut replayed = 0usize;
        for (pos, rec) in replay.journal {
            let Some(r) = records.get(&rec.dataset) else {
                continue; // a deleted dataset
            };
            if pos < r.replay_from {
                continue;
            }
            ds.load(r).replay(rec.ops)?;
            replayed += 1;
        }
        if replayed > 0 {
            tracing::info!(records = replayed, "recovery: journal replayed");
        }
        ds.checkpoint()?;
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
        let txn = self.store.db().begin_read()?;
        let table = txn.open_table(DATASETS)?;
        let mut out = Vec::new();
        for row in table.iter()? {
            let (_, v) = row?;
            out.push(DatasetRecord::decode(v.value())?);
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    pub fn record(&self, name: &str) -> Result<Option<DatasetRecord>> {
        let txn = self.store.db().begin_read()?;
        let Some(id) = txn.open_table(NAMES)?.get(name)?.map(|v| v.value()) else {
            return Ok(None);
        };
        match txn.open_table(DATASETS)?.get(id)? {
            Some(v) => Ok(Some(DatasetRecord::decode(v.value())?)),
            None => Err(Error::CorruptMeta(format!(
                "dataset name {name} points to missing id {id}"
            ))),
        }
    }

    pub fn get(&self, name: &str) -> Result<Option<Arc<Dataset>>> {
        Ok(self.record(name)?.map(|r| self.load(&r)))
    }

    pub fn create(&self, name: &str) -> anyhow::Result<DatasetRecord> {
        check_dataset_name(name)?;
        let _g = self.checkpoint_lock.lock();
        let txn = self.store.db().begin_write().map_err(Error::from)?;
        let rec = {
            let mut names = txn.open_table(NAMES).map_err(Error::from)?;
            if names.get(name).map_err(Error::from)?.is_some() {
                return Err(NameError::Exists(name.to_string()).into());
            }
            let mut meta = txn.open_table(META).map_err(Error::from)?;
            let id = meta
                .get("next_dataset_id")
                .map_err(Error::from)?
                .and_then(|v| v.value().try_into().ok().map(u64::from_le_bytes))
                .unwrap_or(1);
            meta.insert("next_dataset_id", (id + 1).to_le_bytes().as_slice())
                .map_err(Error::from)?;
            let rec = DatasetRecord {
                id,
                name: name.to_string(),
                created: dataset::now(),
                root: None,
                next_ino: dataset::ROOT_INO + 1,
                replay_from: self.store.end(),
            };
            names.insert(name, id).map_err(Error::from)?;
            txn.open_table(DATASETS)
                .map_err(Error::from)?
                .insert(id, rec.encode().as_slice())
                .map_err(Error::from)?;
            rec
        };
        txn.commit().map_err(Error::from)?;
        Ok(rec)
    }

    /// Deletes a dataset that is not in use (the caller checks mounts). Its blocks become garbage.
    pub fn delete(&self, name: &str) -> anyhow::Result<()> {
        let _g = self.checkpoint_lock.lock();
        let rec = self
            .record(name)?
            .ok_or_else(|| NameError::NotFound(name.to_string()))?;
        let txn = self.store.db().begin_write().map_err(Error::from)?;
        txn.open_table(NAMES)
            .map_err(Error::from)?
            .remove(name)
            .map_err(Error::from)?;
        txn.open_table(DATASETS)
            .map_err(Error::from)?
            .remove(rec.id)
            .map_err(Error::from)?;
        txn.commit().map_err(Error::from)?;
        self.loaded.lock().remove(&rec.id);
        Ok(())
    }

    /// Folds every loaded dataset's changes into new trees and commits them with the index.
    pub fn checkpoint(&self) -> Result<()> {
        let _g = self.checkpoint_lock.lock();
        let loaded: Vec<Arc<Dataset>> = self.loaded.lock().values().cloned().collect();
        if !loaded.iter().any(|d| d.is_dirty()) && self.store.recent_blocks() == 0 {
            return Ok(());
        }
        let mut records = Vec::new();
        for ds in loaded {
            // A clean dataset's record only moves its replay position forward.
            records.push(ds.flush_trees()?);
        }
        self.store.commit_checkpoint(&records)
    }

    /// Whether enough has changed since the last checkpoint to take one now.
    pub fn checkpoint_due(&self) -> bool {
        self.store.recent_blocks() > 0 || self.loaded.lock().values().any(|d| d.is_dirty())
    }
}
