//! Typed tables of control-path records in the index: sources, VDBs and API tokens (JSON values
//! under their name), the mounts to re-establish at start (mount point -> dataset) and each VDB's
//! idle clock (VDB -> when a client was last seen). The control path
//! reads and writes its records only through these handles, so redb stays inside `store`.
//!
//! Invariants: every write is its own redb transaction (a record is either as it was or as
//! written); a record that does not decode is reported as corrupt metadata naming the record,
//! never skipped.

use super::{Error, Result, Store, MOUNTS, SOURCES, TOKENS, VDBS, VDB_LAST_CLIENT};
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The record tables of the control path (see FORMAT.md, "Control-path tables").
#[derive(Debug, Clone, Copy)]
pub enum RecordTable {
    Sources,
    Vdbs,
    Tokens,
}

impl RecordTable {
    fn def(self) -> TableDefinition<'static, &'static str, &'static [u8]> {
        match self {
            RecordTable::Sources => SOURCES,
            RecordTable::Vdbs => VDBS,
            RecordTable::Tokens => TOKENS,
        }
    }
}

/// A record kept in one of the [`RecordTable`]s, keyed by its name.
pub trait Record: serde::Serialize + serde::de::DeserializeOwned {
    const TABLE: RecordTable;
    /// For messages: "source", "VDB".
    const WHAT: &'static str;
    fn key(&self) -> &str;
}

/// The table of records of type `T`.
pub struct Records<T> {
    store: Arc<Store>,
    _t: PhantomData<fn() -> T>,
}

impl<T> Clone for Records<T> {
    fn clone(&self) -> Self {
        Records {
            store: self.store.clone(),
            _t: PhantomData,
        }
    }
}

fn decode<T: serde::de::DeserializeOwned>(what: &str, key: &str, bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes)
        .map_err(|e| Error::CorruptMeta(format!("unreadable {what} record {key}: {e}")))
}

impl<T: Record> Records<T> {
    pub fn new(store: Arc<Store>) -> Records<T> {
        Records {
            store,
            _t: PhantomData,
        }
    }

    /// Every record, by name.
    pub fn list(&self) -> Result<Vec<T>> {
        let txn = self.store.db().begin_read()?;
        let t = txn.open_table(T::TABLE.def())?;
        let mut out = Vec::new();
        for row in t.iter()? {
            let (k, v) = row?;
            out.push(decode(T::WHAT, k.value(), v.value())?);
        }
        Ok(out)
    }

    pub fn get(&self, name: &str) -> Result<Option<T>> {
        let txn = self.store.db().begin_read()?;
        let t = txn.open_table(T::TABLE.def())?;
        let v = t.get(name)?;
        v.map(|v| decode(T::WHAT, name, v.value())).transpose()
    }

    pub fn contains(&self, name: &str) -> Result<bool> {
        let txn = self.store.db().begin_read()?;
        let t = txn.open_table(T::TABLE.def())?;
        Ok(t.get(name)?.is_some())
    }

    /// Inserts or replaces the record under its name.
    pub fn put(&self, rec: &T) -> Result<()> {
        let bytes = serde_json::to_vec(rec)
            .map_err(|e| Error::CorruptMeta(format!("cannot encode {} record: {e}", T::WHAT)))?;
        let txn = self.store.begin_write()?;
        txn.open_table(T::TABLE.def())?
            .insert(rec.key(), bytes.as_slice())?;
        txn.commit()?;
        Ok(())
    }

    pub fn remove(&self, name: &str) -> Result<()> {
        let txn = self.store.begin_write()?;
        txn.open_table(T::TABLE.def())?.remove(name)?;
        txn.commit()?;
        Ok(())
    }
}

/// The mounts to re-establish when a daemon starts: mount point -> dataset (or
/// `dataset@snapshot`).
#[derive(Clone)]
pub struct MountRecords {
    store: Arc<Store>,
}

impl MountRecords {
    pub fn new(store: Arc<Store>) -> MountRecords {
        MountRecords { store }
    }

    pub fn list(&self) -> Result<Vec<(PathBuf, String)>> {
        let txn = self.store.db().begin_read()?;
        let t = txn.open_table(MOUNTS)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            let (k, v) = row?;
            out.push((PathBuf::from(k.value()), v.value().to_string()));
        }
        Ok(out)
    }

    /// Records (`Some(dataset)`) or forgets (`None`) the mount at `mountpoint`.
    pub fn set(&self, mountpoint: &Path, dataset: Option<&str>) -> Result<()> {
        let txn = self.store.begin_write()?;
        {
            let mut t = txn.open_table(MOUNTS)?;
            let key = mountpoint.to_string_lossy();
            match dataset {
                Some(d) => {
                    t.insert(key.as_ref(), d)?;
                }
                None => {
                    t.remove(key.as_ref())?;
                }
            }
        }
        txn.commit()?;
        Ok(())
    }
}

/// When each VDB last had a client (unix seconds): the idle clock of `--idle-ttl`, kept so
/// that a daemon restart does not start it again (`vdb::lifetime` decides when to write).
#[derive(Clone)]
pub struct LastClients {
    store: Arc<Store>,
}

impl LastClients {
    pub fn new(store: Arc<Store>) -> LastClients {
        LastClients { store }
    }

    pub fn list(&self) -> Result<Vec<(String, i64)>> {
        let txn = self.store.db().begin_read()?;
        let t = txn.open_table(VDB_LAST_CLIENT)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            let (k, v) = row?;
            out.push((k.value().to_string(), v.value()));
        }
        Ok(out)
    }

    /// Records these times (one transaction).
    pub fn set(&self, seen: &[(String, i64)]) -> Result<()> {
        let txn = self.store.begin_write()?;
        {
            let mut t = txn.open_table(VDB_LAST_CLIENT)?;
            for (name, at) in seen {
                t.insert(name.as_str(), *at)?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    pub fn remove(&self, name: &str) -> Result<()> {
        let txn = self.store.begin_write()?;
        txn.open_table(VDB_LAST_CLIENT)?.remove(name)?;
        txn.commit()?;
        Ok(())
    }
}
