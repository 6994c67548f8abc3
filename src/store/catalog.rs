//! The catalog tables of the index as typed operations: dataset names and records, snapshots
//! and their properties, clone origins, damage marks (FORMAT.md, "Index"). The tree layer keeps
//! the catalog's rules (names, locks, what a snapshot or clone means); this module is the only
//! place above `index` that opens those redb tables, so the layers above never see redb.
//!
//! Invariants:
//! - A dataset's name entry and its record are written and removed together, in one
//!   transaction.
//! - `meta.next_dataset_id` only grows (ids are never reused); its absence or a malformed value
//!   is corruption, never a reason to start again at 1.
//! - Every write transaction makes room first (the reserve, see `space`), so catalog writes
//!   work on a full filesystem.

use super::{
    Error, Result, Store, DAMAGED, DATASETS, META, NAMES, ORIGINS, SNAPSHOTS, SNAPSHOT_PROPS,
};
use redb::{ReadableDatabase, ReadableTable};
use std::collections::HashMap;
use vdbfs_format::index::{meta as fmeta, CloneOrigin, DamageMark, DatasetRecord, SnapshotRecord};

/// A snapshot's record with the properties the control path recorded with it (JSON).
pub struct StoredSnapshot {
    pub rec: SnapshotRecord,
    pub props: Option<Vec<u8>>,
}

impl Store {
    /// Every dataset record, in id order.
    pub fn dataset_records(&self) -> Result<Vec<DatasetRecord>> {
        let txn = self.index.db().begin_read()?;
        let table = txn.open_table(DATASETS)?;
        let mut out = Vec::new();
        for row in table.iter()? {
            let (_, v) = row?;
            out.push(DatasetRecord::decode(v.value())?);
        }
        Ok(out)
    }

    /// The record of the dataset with this name.
    pub fn dataset_record(&self, name: &str) -> Result<Option<DatasetRecord>> {
        let txn = self.index.db().begin_read()?;
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

    /// The record of the dataset with this id (None once it is deleted).
    pub fn dataset_record_by_id(&self, id: u64) -> Result<Option<DatasetRecord>> {
        let txn = self.index.db().begin_read()?;
        let r = txn.open_table(DATASETS)?.get(id)?;
        Ok(match r {
            Some(v) => Some(DatasetRecord::decode(v.value())?),
            None => None,
        })
    }

    /// Snapshot `name` of dataset `dataset` (by id).
    pub fn snapshot_record(&self, dataset: u64, name: &str) -> Result<Option<SnapshotRecord>> {
        let txn = self.index.db().begin_read()?;
        let r = txn.open_table(SNAPSHOTS)?.get((dataset, name))?;
        Ok(match r {
            Some(v) => Some(SnapshotRecord::decode(v.value())?),
            None => None,
        })
    }

    /// Every snapshot record, in key order (dataset id, name), with its properties when
    /// `with_props`.
    pub fn snapshot_records(&self, with_props: bool) -> Result<Vec<StoredSnapshot>> {
        let txn = self.index.db().begin_read()?;
        let t = txn.open_table(SNAPSHOTS)?;
        let props = txn.open_table(SNAPSHOT_PROPS)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            let (_, v) = row?;
            let rec = SnapshotRecord::decode(v.value())?;
            let props = if with_props {
                props
                    .get((rec.dataset, rec.name.as_str()))?
                    .map(|v| v.value().to_vec())
            } else {
                None
            };
            out.push(StoredSnapshot { rec, props });
        }
        Ok(out)
    }

    /// The snapshot a clone was made from, if the dataset is a clone.
    pub fn clone_origin(&self, id: u64) -> Result<Option<CloneOrigin>> {
        let txn = self.index.db().begin_read()?;
        let r = txn.open_table(ORIGINS)?.get(id)?;
        Ok(match r {
            Some(v) => Some(CloneOrigin::decode(v.value())?),
            None => None,
        })
    }

    /// Runs `f` in one write transaction of the catalog and commits it when `f` succeeds
    /// (nothing of it is written when `f` fails). Room is made first.
    pub fn catalog_write<T, E: From<Error>>(
        &self,
        f: impl FnOnce(&CatalogTxn) -> std::result::Result<T, E>,
    ) -> std::result::Result<T, E> {
        let txn = self.begin_write()?;
        let out = f(&CatalogTxn { txn: &txn })?;
        txn.commit().map_err(Error::from)?;
        Ok(out)
    }
}

/// Catalog writes inside one redb write transaction (see [`Store::catalog_write`]; checkpoints
/// and snapshots hand one to their callers so that records and roots commit together).
pub struct CatalogTxn<'a> {
    txn: &'a redb::WriteTransaction,
}

impl<'a> CatalogTxn<'a> {
    pub(super) fn new(txn: &'a redb::WriteTransaction) -> CatalogTxn<'a> {
        CatalogTxn { txn }
    }

    pub fn name_taken(&self, name: &str) -> Result<bool> {
        Ok(self.txn.open_table(NAMES)?.get(name)?.is_some())
    }

    /// Takes the next dataset id (ids are never reused).
    pub fn allocate_dataset_id(&self) -> Result<u64> {
        let mut meta = self.txn.open_table(META)?;
        let id = match meta.get(fmeta::NEXT_DATASET_ID)? {
            Some(v) => fmeta::decode_u64(v.value(), "meta.next_dataset_id")?,
            None => return Err(Error::CorruptMeta("index has no next_dataset_id".into())),
        };
        meta.insert(fmeta::NEXT_DATASET_ID, fmeta::encode_u64(id + 1).as_slice())?;
        Ok(id)
    }

    /// A new dataset: its name entry and its record.
    pub fn insert_dataset(&self, rec: &DatasetRecord) -> Result<()> {
        self.txn
            .open_table(NAMES)?
            .insert(rec.name.as_str(), rec.id)?;
        self.put_dataset_record(rec)
    }

    /// Replaces the record of an existing dataset (its name entry stays).
    pub fn put_dataset_record(&self, rec: &DatasetRecord) -> Result<()> {
        self.txn
            .open_table(DATASETS)?
            .insert(rec.id, rec.encode().as_slice())?;
        Ok(())
    }

    /// Removes a dataset's name entry and record (its snapshots are the caller's).
    pub fn remove_dataset(&self, name: &str, id: u64) -> Result<()> {
        self.txn.open_table(NAMES)?.remove(name)?;
        self.txn.open_table(DATASETS)?.remove(id)?;
        Ok(())
    }

    pub fn put_origin(&self, id: u64, origin: &CloneOrigin) -> Result<()> {
        self.txn
            .open_table(ORIGINS)?
            .insert(id, origin.encode().as_slice())?;
        Ok(())
    }

    pub fn snapshot_exists(&self, dataset: u64, name: &str) -> Result<bool> {
        Ok(self
            .txn
            .open_table(SNAPSHOTS)?
            .get((dataset, name))?
            .is_some())
    }

    /// A snapshot record, with its properties when given.
    pub fn put_snapshot(&self, rec: &SnapshotRecord, props: Option<&[u8]>) -> Result<()> {
        self.txn
            .open_table(SNAPSHOTS)?
            .insert((rec.dataset, rec.name.as_str()), rec.encode().as_slice())?;
        if let Some(p) = props {
            self.put_snapshot_props(rec.dataset, &rec.name, p)?;
        }
        Ok(())
    }

    pub fn put_snapshot_props(&self, dataset: u64, name: &str, props: &[u8]) -> Result<()> {
        self.txn
            .open_table(SNAPSHOT_PROPS)?
            .insert((dataset, name), props)?;
        Ok(())
    }

    /// Removes a snapshot record and its properties.
    pub fn remove_snapshot(&self, dataset: u64, name: &str) -> Result<()> {
        self.txn.open_table(SNAPSHOTS)?.remove((dataset, name))?;
        self.txn
            .open_table(SNAPSHOT_PROPS)?
            .remove((dataset, name))?;
        Ok(())
    }

    /// Removes every damage mark of a dataset.
    pub fn clear_damage(&self, dataset: u64) -> Result<()> {
        self.txn
            .open_table(DAMAGED)?
            .retain(|(ds, _, _), _| ds != dataset)?;
        Ok(())
    }

    /// Records damage marks, by dataset id.
    pub fn put_damage(&self, marks: &HashMap<u64, Vec<DamageMark>>) -> Result<()> {
        let mut t = self.txn.open_table(DAMAGED)?;
        for (ds, ms) in marks {
            for m in ms {
                t.insert((*ds, m.at.pack, m.at.offset), m.encode_value().as_slice())?;
            }
        }
        Ok(())
    }
}
