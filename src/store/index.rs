//! The redb index (`index.redb`): where committed blocks live, the committed dataset records
//! and the store's meta values. See FORMAT.md, "Index".
//!
//! Invariants: a block enters `blocks` only in a checkpoint commit, after the log bytes holding
//! it were synced; `meta.indexed_upto` and `meta.replay_start` move in the same commit.

use super::{Error, Result};
use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use std::path::{Path, PathBuf};
use vdbfs_format::index::{
    meta as fmeta, BlockLoc, DamageMark, DatasetRecord, LogPos, INDEX_VERSION,
};
use vdbfs_format::BlockId;

pub const BLOCKS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("blocks");
pub const DATASETS: TableDefinition<u64, &[u8]> = TableDefinition::new("datasets");
pub const NAMES: TableDefinition<&str, u64> = TableDefinition::new("dataset_names");
pub const MOUNTS: TableDefinition<&str, &str> = TableDefinition::new("mounts");
pub const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
/// (dataset id, snapshot name) -> SnapshotRecord
pub const SNAPSHOTS: TableDefinition<(u64, &str), &[u8]> = TableDefinition::new("snapshots");
/// clone dataset id -> CloneOrigin
pub const ORIGINS: TableDefinition<u64, &[u8]> = TableDefinition::new("origins");
/// (dataset id, snapshot name) -> JSON properties recorded with a snapshot (e.g. a staging
/// snapshot's LSN and timeline); written in the snapshot's own commit, removed with it.
pub const SNAPSHOT_PROPS: TableDefinition<(u64, &str), &[u8]> =
    TableDefinition::new("snapshot_props");
/// source name -> JSON source record (control path; see FORMAT.md "Control-path tables").
pub const SOURCES: TableDefinition<&str, &[u8]> = TableDefinition::new("sources");
/// VDB name -> JSON VDB record (control path; see FORMAT.md "Control-path tables").
pub const VDBS: TableDefinition<&str, &[u8]> = TableDefinition::new("vdbs");
/// API token name -> JSON token record: role, expiry and the token's BLAKE3 hash, never the
/// token (control path; see FORMAT.md "Control-path tables").
pub const TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("tokens");
/// VDB name -> unix seconds when the daemon last saw a client connected to it (or its idle
/// clock last started): the idle clock of `--idle-ttl`, kept across restarts (control path; see
/// FORMAT.md "Control-path tables").
pub const VDB_LAST_CLIENT: TableDefinition<&str, i64> = TableDefinition::new("vdb_last_client");
/// (dataset id, pack, offset) -> DamageMark: datasets refused because recovery found
/// acknowledged log bytes that no longer verify (FORMAT.md, "Recovery"). Cleared when the
/// dataset is deleted, reset to a snapshot, or its loss accepted.
pub const DAMAGED: TableDefinition<(u64, u32, u64), &[u8]> = TableDefinition::new("damaged");

/// pack number -> record format (1 or 2): closed packs of this store uploaded whole to the
/// remote (FORMAT.md, "Remote"). Written after the upload succeeded.
pub const REMOTE_UPLOADED: TableDefinition<u32, u8> = TableDefinition::new("remote_uploaded");
/// remote object number -> record format byte + object key: pack objects other hosts
/// published, known from imported manifests.
pub const REMOTE_OBJECTS: TableDefinition<u32, &[u8]> = TableDefinition::new("remote_objects");
/// object key -> remote object number.
pub const REMOTE_KEYS: TableDefinition<&str, u32> = TableDefinition::new("remote_keys");
/// block id -> where a published copy is: object u32, offset u64, len u32 (16 bytes).
pub const REMOTE_BLOCKS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("remote_blocks");

/// Opens every table once, so that readers never meet a missing one (stores created by an
/// older build gain the tables added since).
fn create_tables(txn: &redb::WriteTransaction) -> std::result::Result<(), redb::TableError> {
    txn.open_table(BLOCKS)?;
    txn.open_table(DATASETS)?;
    txn.open_table(NAMES)?;
    txn.open_table(MOUNTS)?;
    txn.open_table(SNAPSHOTS)?;
    txn.open_table(ORIGINS)?;
    txn.open_table(SNAPSHOT_PROPS)?;
    txn.open_table(SOURCES)?;
    txn.open_table(VDBS)?;
    txn.open_table(TOKENS)?;
    txn.open_table(VDB_LAST_CLIENT)?;
    txn.open_table(DAMAGED)?;
    txn.open_table(REMOTE_UPLOADED)?;
    txn.open_table(REMOTE_OBJECTS)?;
    txn.open_table(REMOTE_KEYS)?;
    txn.open_table(REMOTE_BLOCKS)?;
    Ok(())
}

pub fn index_path(dir: &Path) -> PathBuf {
    dir.join("index.redb")
}

/// redb caches up to 1 GiB of index pages by default, which became most of the daemon's memory
/// on a 2 GB store; 128 MiB holds the hot part of the index of about a million blocks.
fn builder() -> redb::Builder {
    let mut b = redb::Builder::new();
    b.set_cache_size(128 << 20);
    b
}

pub struct Index {
    db: redb::Database,
}

/// Where recovery starts and what is indexed, as of the last checkpoint.
pub struct Positions {
    pub indexed_upto: LogPos,
    pub replay_start: LogPos,
}

impl Index {
    /// Creates `index.redb` with every table and the format version.
    pub fn create(dir: &Path) -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let db = builder().create(index_path(dir))?;
        std::fs::set_permissions(index_path(dir), std::fs::Permissions::from_mode(0o600))?;
        let txn = db.begin_write()?;
        {
            let mut meta = txn.open_table(META)?;
            meta.insert(
                fmeta::FORMAT_VERSION,
                fmeta::encode_u32(INDEX_VERSION).as_slice(),
            )?;
            meta.insert(fmeta::NEXT_DATASET_ID, fmeta::encode_u64(1).as_slice())?;
        }
        create_tables(&txn)?;
        txn.commit()?;
        Ok(())
    }

    /// Opens the index and checks its format version; compacts it first when most of the file
    /// is free ([`compact_if_mostly_free`]).
    pub fn open(dir: &Path) -> Result<(Index, Positions)> {
        let mut db = builder().open(index_path(dir))?;
        if let Some((before, after)) = compact_if_mostly_free(&mut db, &index_path(dir))? {
            tracing::info!(before, after, "index.redb was mostly free space: compacted");
        }
        {
            let txn = db.begin_write()?;
            create_tables(&txn)?;
            txn.commit()?;
        }
        let idx = Index { db };
        let pos = {
            let txn = idx.db.begin_read()?;
            let meta = txn.open_table(META)?;
            let version = meta
                .get(fmeta::FORMAT_VERSION)?
                .map(|v| fmeta::decode_u32(v.value(), "meta.format_version"))
                .transpose()?
                .ok_or_else(|| Error::CorruptMeta("index has no format_version".into()))?;
            if version != INDEX_VERSION {
                return Err(Error::CorruptMeta(format!(
                    "index format version {version} is not supported by this build ({INDEX_VERSION})"
                )));
            }
            let indexed_upto = match meta.get(fmeta::INDEXED_UPTO)? {
                Some(v) => LogPos::decode(v.value())?,
                None => LogPos::default(),
            };
            // Only datasets loaded at a checkpoint can have journal records after it, and every
            // checkpoint records their oldest replay position here.
            let replay_start = match meta.get(fmeta::REPLAY_START)? {
                Some(v) => LogPos::decode(v.value())?.min(indexed_upto),
                None => LogPos::default(),
            };
            Positions {
                indexed_upto,
                replay_start,
            }
        };
        Ok((idx, pos))
    }

    pub fn db(&self) -> &redb::Database {
        &self.db
    }

    /// The committed replay position (the oldest log position recovery would read).
    pub fn replay_start(&self) -> Result<LogPos> {
        let txn = self.db.begin_read()?;
        let meta = txn.open_table(META)?;
        let rs = match meta.get(fmeta::REPLAY_START)? {
            Some(v) => LogPos::decode(v.value())?,
            None => LogPos::default(),
        };
        let iu = match meta.get(fmeta::INDEXED_UPTO)? {
            Some(v) => LogPos::decode(v.value())?,
            None => LogPos::default(),
        };
        Ok(rs.min(iu))
    }

    /// Every damage mark, by dataset id.
    pub fn damage_marks(&self) -> Result<Vec<(u64, DamageMark)>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(DAMAGED)?;
        let mut out = Vec::new();
        for row in table.iter()? {
            let (k, v) = row?;
            let (ds, pack, offset) = k.value();
            out.push((
                ds,
                DamageMark::decode_value(LogPos { pack, offset }, v.value())?,
            ));
        }
        Ok(out)
    }

    /// Looks up the ids at `which` positions of `ids`, filling `out`.
    pub fn lookup(
        &self,
        ids: &[BlockId],
        which: &[usize],
        out: &mut [Option<BlockLoc>],
    ) -> Result<()> {
        if which.is_empty() {
            return Ok(());
        }
        let txn = self.db.begin_read()?;
        let table = txn.open_table(BLOCKS)?;
        for &i in which {
            if let Some(v) = table.get(ids[i].0.as_slice())? {
                out[i] = Some(BlockLoc::decode(v.value())?);
            }
        }
        Ok(())
    }

    /// Every indexed block with its location.
    pub fn blocks(&self) -> Result<Vec<(BlockId, BlockLoc)>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(BLOCKS)?;
        let mut out = Vec::new();
        for row in table.iter()? {
            let (k, v) = row?;
            out.push((
                BlockId::from_slice(k.value())?,
                BlockLoc::decode(v.value())?,
            ));
        }
        Ok(out)
    }

    /// Number of indexed blocks.
    pub fn block_count(&self) -> Result<u64> {
        let txn = self.db.begin_read()?;
        Ok(txn.open_table(BLOCKS)?.len()?)
    }

    /// Calls `f` with every indexed block and its location, in key order, without holding
    /// them all in memory.
    pub fn each_block(&self, mut f: impl FnMut(&BlockId, &BlockLoc) -> Result<()>) -> Result<()> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(BLOCKS)?;
        for row in table.iter()? {
            let (k, v) = row?;
            f(
                &BlockId::from_slice(k.value())?,
                &BlockLoc::decode(v.value())?,
            )?;
        }
        Ok(())
    }

    /// Removes the entries of `ids` for which `keep(id, loc)` is false; one transaction, not
    /// durable by itself (the next checkpoint's commit is). Returns (entries, record bytes).
    pub fn remove_unless(
        &self,
        ids: &[BlockId],
        keep: impl Fn(&BlockId, &BlockLoc) -> bool,
    ) -> Result<(u64, u64)> {
        let (mut n, mut bytes) = (0u64, 0u64);
        let mut txn = self.db.begin_write()?;
        txn.set_durability(redb::Durability::None)
            .map_err(|e| Error::Index(e.to_string()))?;
        {
            let mut blocks = txn.open_table(BLOCKS)?;
            for id in ids {
                let loc = match blocks.get(id.0.as_slice())? {
                    Some(v) => BlockLoc::decode(v.value())?,
                    None => continue,
                };
                if keep(id, &loc) {
                    continue;
                }
                blocks.remove(id.0.as_slice())?;
                n += 1;
                bytes += loc.len as u64;
            }
        }
        txn.commit()?;
        Ok((n, bytes))
    }

    /// The checkpoint commit (FORMAT.md, "Commit protocol", step 3): index entries, dataset
    /// records and positions, plus `extra` writes, in one durable transaction.
    pub fn commit_checkpoint(
        &self,
        blocks: &[(BlockId, BlockLoc)],
        datasets: &[DatasetRecord],
        upto: LogPos,
        extra: impl FnOnce(&super::CatalogTxn) -> Result<()>,
    ) -> Result<()> {
        let txn = self.db.begin_write()?;
        {
            let mut table = txn.open_table(BLOCKS)?;
            for (id, loc) in blocks {
                table.insert(id.0.as_slice(), loc.encode().as_slice())?;
            }
            let mut table = txn.open_table(DATASETS)?;
            for rec in datasets {
                table.insert(rec.id, rec.encode().as_slice())?;
            }
            let replay_start = datasets
                .iter()
                .map(|d| d.replay_from)
                .fold(upto, LogPos::min);
            let mut meta = txn.open_table(META)?;
            meta.insert(fmeta::INDEXED_UPTO, upto.encode().as_slice())?;
            meta.insert(fmeta::REPLAY_START, replay_start.encode().as_slice())?;
        }
        extra(&super::CatalogTxn::new(&txn))?;
        txn.commit()?;
        Ok(())
    }

    /// Dataset records and `extra` writes in one durable transaction; index entries and
    /// positions unchanged (see `Store::commit_roots_with`).
    pub fn commit_records(
        &self,
        datasets: &[DatasetRecord],
        extra: impl FnOnce(&super::CatalogTxn) -> Result<()>,
    ) -> Result<()> {
        let txn = self.db.begin_write()?;
        {
            let mut table = txn.open_table(DATASETS)?;
            for rec in datasets {
                table.insert(rec.id, rec.encode().as_slice())?;
            }
        }
        extra(&super::CatalogTxn::new(&txn))?;
        txn.commit()?;
        Ok(())
    }
}

/// Files smaller than this are never compacted: the space is not worth the rewrite.
const COMPACT_MIN_FILE: u64 = 8 << 20;

/// Compacts an index file of which more than half is free pages (redb keeps the pages a mass
/// delete freed, e.g. 181 MB after every dataset of a store was deleted, and reuses them but
/// never returns them). `compact` needs the only handle with no transaction open, so this runs
/// when the store is opened, before anything else uses `db`. Returns the file size before and
/// after when it compacted.
pub fn compact_if_mostly_free(db: &mut redb::Database, path: &Path) -> Result<Option<(u64, u64)>> {
    let before = std::fs::metadata(path)?.len();
    if before < COMPACT_MIN_FILE {
        return Ok(None);
    }
    let used = {
        let txn = db.begin_write()?;
        let stats = txn.stats()?;
        txn.abort()?;
        stats.allocated_pages() * stats.page_size() as u64
    };
    if used.saturating_mul(2) >= before {
        return Ok(None);
    }
    db.compact().map_err(|e| Error::Index(e.to_string()))?;
    Ok(Some((before, std::fs::metadata(path)?.len())))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// After a delete-everything the index file stayed at its largest size (181 MB in the
    /// report that pinned this): redb keeps freed pages. Opening the index compacts a file that
    /// is mostly free, and leaves one that is mostly used alone.
    #[test]
    fn a_mostly_free_index_is_compacted_when_opened() {
        let dir = tempfile::tempdir().unwrap();
        Index::create(dir.path()).unwrap();
        let ids: Vec<BlockId> = (0u32..150_000)
            .map(|i| BlockId(*blake3::hash(&i.to_le_bytes()).as_bytes()))
            .collect();
        let loc = BlockLoc {
            pack: 1,
            offset: 4096,
            len: 8192,
        };
        {
            let (idx, _) = Index::open(dir.path()).unwrap();
            let blocks: Vec<_> = ids.iter().map(|id| (*id, loc)).collect();
            idx.commit_checkpoint(&blocks, &[], LogPos::default(), |_| Ok(()))
                .unwrap();
        }
        let full = std::fs::metadata(index_path(dir.path())).unwrap().len();
        assert!(
            full > COMPACT_MIN_FILE,
            "the test index is too small: {full}"
        );
        {
            // Mostly used: opening leaves it as it is.
            let (idx, _) = Index::open(dir.path()).unwrap();
            assert_eq!(
                std::fs::metadata(index_path(dir.path())).unwrap().len(),
                full
            );
            let (n, _) = idx.remove_unless(&ids[1000..], |_, _| false).unwrap();
            assert_eq!(n, ids.len() as u64 - 1000);
            idx.commit_checkpoint(&[], &[], LogPos::default(), |_| Ok(()))
                .unwrap();
        }
        let (idx, _) = Index::open(dir.path()).unwrap();
        let after = std::fs::metadata(index_path(dir.path())).unwrap().len();
        assert!(
            after * 4 < full,
            "index.redb is {after} bytes after deleting nearly everything (was {full})"
        );
        let mut out = vec![None; 2];
        idx.lookup(&ids[..2], &[0, 1], &mut out).unwrap();
        assert!(out.iter().all(|l| l.is_some()), "compaction lost entries");
    }
}
