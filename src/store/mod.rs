//! The block store: content-addressed blocks in append-only pack files, located through a redb
//! index. Bottom of the data path (FUSE op -> tree layer -> block store -> packs and index).
//!
//! Invariants (see fs-format/FORMAT.md, "Commit protocol"):
//! - Pack files are append-only and never rewritten in place; after open, appends always go to a
//!   new pack, so a torn tail left by a crash is never followed by live records in the same pack.
//! - A block enters the redb index only in a checkpoint commit, after the pack bytes holding it
//!   were fdatasynced. Blocks appended since the last checkpoint live in `recent` and are found
//!   again by the recovery scan.
//! - A journal record is appended after every block it references, and the fsync that made it
//!   durable synced the whole log up to its end.
//! - Every read verifies the record crc and the block's blake3; a mismatch is `Error::Corrupt`,
//!   never wrong bytes.
//! - After a failed fdatasync the store is poisoned: every later write or sync fails, so a lost
//!   write is never reported as durable by a later, successful fsync.
//! - Garbage collection: a collection starts (under the exclusive `dedup_guard`, which writers
//!   hold from their dedup decision until the reference is installed) by recording `gc_start`,
//!   the log end. Until it ends, `put` deduplicates only against blocks appended after
//!   `gc_start`, so every reference created during the collection points at such a block, and
//!   the sweep never removes those. Everything referenced before is in the trees the collector
//!   checkpoints and marks. The sweep runs under `gc_guard` (readers resolve ids under its read
//!   side), and a pack file is deleted only after every live record in it was copied and the
//!   copies committed.

pub mod error;
pub mod io;
pub mod records;
#[cfg(test)]
pub mod sim;

use parking_lot::{Mutex, RwLock};
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use vdbfs_format::index::{BlockLoc, DatasetRecord, LogPos, INDEX_VERSION};
use vdbfs_format::journal::JournalRecord;
use vdbfs_format::pack::{self, RecordKind, PACK_HEADER_LEN, RECORD_HEADER_LEN};
use vdbfs_format::{codec, BlockId};

pub use error::{Error, Result};
use io::{OsIo, PackFile, PackIo};

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
    Ok(())
}

thread_local! {
    /// Set while this thread checkpoints: its appends may use the space reserve.
    static RESERVE_OK: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The space reserve: 1/8 of the store's filesystem, at most 256 MiB.
fn reserve_for(total: u64) -> u64 {
    (total / 8).min(256 << 20)
}

/// A pack is closed and a new one started once it grows past this size.
const PACK_TARGET_SIZE: u64 = 256 << 20;
/// After an fdatasync the active pack is zero-filled this far ahead of the log end (when less
/// than half of it is left): an fdatasync that only overwrites allocated blocks needs no
/// filesystem metadata commit, about half the latency of an appending one on ext4. Only
/// fsync-heavy logs pay for it; bulk writes outrun the window and append plainly. Recovery
/// stops at the zeros.
const PREFILL_WINDOW: u64 = 2 << 20;

struct ActivePack {
    no: u32,
    file: Arc<dyn PackFile>,
    len: u64,
    /// Bytes of the file that exist (zero-filled beyond `len`).
    allocated: u64,
}

pub struct Store {
    dir: PathBuf,
    io: Arc<dyn PackIo>,
    db: redb::Database,
    active: Mutex<ActivePack>,
    /// Everything before this position is durable. Held while syncing (group commit).
    synced: Mutex<LogPos>,
    packs: RwLock<HashMap<u32, Arc<dyn PackFile>>>,
    recent: RwLock<HashMap<BlockId, BlockLoc>>,
    poisoned: AtomicBool,
    /// Bytes of the store's filesystem kept free for checkpoints (see `check_space`).
    reserve: u64,
    free_estimate: AtomicU64,
    appended_since_check: AtomicU64,
    gc_active: AtomicBool,
    gc_start: Mutex<LogPos>,
    dedup_guard: RwLock<()>,
    /// Held shared by everything that resolves block ids to locations and reads them; held
    /// exclusively by the GC while it removes index entries or pack files.
    gc_guard: RwLock<()>,
}

/// What recovery found in the log after the last checkpoint, for the tree layer to replay.
pub struct Replay {
    pub journal: Vec<(LogPos, JournalRecord)>,
}

pub fn index_path(dir: &Path) -> PathBuf {
    dir.join("index.redb")
}

fn pack_path(dir: &Path, no: u32) -> PathBuf {
    dir.join("packs").join(format!("{no:08}.pack"))
}

impl Store {
    /// Creates a new, empty store in `dir` (which may exist but must not hold a store).
    pub fn create(dir: &Path) -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(dir.join("packs"))?;
        // Block data is only for the daemon; the store directory itself stays traversable so
        // that the postgres user reaches the mount points and source files inside it.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711))?;
        std::fs::set_permissions(dir.join("packs"), std::fs::Permissions::from_mode(0o700))?;
        let db = index_builder().create(index_path(dir))?;
        std::fs::set_permissions(index_path(dir), std::fs::Permissions::from_mode(0o600))?;
        let txn = db.begin_write()?;
        {
            let mut meta = txn.open_table(META)?;
            meta.insert("format_version", INDEX_VERSION.to_le_bytes().as_slice())?;
            meta.insert("next_dataset_id", 1u64.to_le_bytes().as_slice())?;
        }
        create_tables(&txn)?;
        txn.commit()?;
        OsIo.sync_dir(dir)?;
        Ok(())
    }

    pub fn open(dir: &Path) -> Result<(Store, Replay)> {
        Self::open_with(dir, Arc::new(OsIo))
    }

    /// Opens the store, scans the log written since the last checkpoint and starts a new pack.
    pub fn open_with(dir: &Path, io: Arc<dyn PackIo>) -> Result<(Store, Replay)> {
        let db = index_builder().open(index_path(dir))?;
        {
            let txn = db.begin_write()?;
            create_tables(&txn)?;
            txn.commit()?;
        }
        let (indexed_upto, replay_from) = {
            let txn = db.begin_read()?;
            let meta = txn.open_table(META)?;
            let version = meta
                .get("format_version")?
                .map(|v| v.value().to_vec())
                .ok_or_else(|| Error::CorruptMeta("index has no format_version".into()))?;
            if version != INDEX_VERSION.to_le_bytes() {
                return Err(Error::CorruptMeta(format!(
                    "index format version {version:?} is not supported by this build ({INDEX_VERSION})"
                )));
            }
            let indexed_upto = match meta.get("indexed_upto")? {
                Some(v) => decode_pos(v.value())?,
                None => LogPos::default(),
            };
            // Only datasets loaded at a checkpoint can have journal records after it, and every
            // checkpoint records their oldest replay position here.
            let replay_from = match meta.get("replay_start")? {
                Some(v) => decode_pos(v.value())?.min(indexed_upto),
                None => LogPos::default(),
            };
            (indexed_upto, replay_from)
        };

        let mut numbers = Vec::new();
        for name in io.list(&dir.join("packs"))? {
            if let Some(no) = name
                .strip_suffix(".pack")
                .and_then(|n| n.parse::<u32>().ok())
            {
                numbers.push(no);
            }
        }
        numbers.sort_unstable();

        let mut packs = HashMap::new();
        let mut recent = HashMap::new();
        let mut journal = Vec::new();
        for &no in &numbers {
            let file = io.open(&pack_path(dir, no))?;
            if no >= replay_from.pack {
                let start = if no == replay_from.pack {
                    replay_from.offset.max(PACK_HEADER_LEN as u64)
                } else {
                    PACK_HEADER_LEN as u64
                };
                scan_pack(&*file, no, start, |pos, hdr, payload| {
                    match hdr.kind {
                        RecordKind::Block if pos >= indexed_upto => {
                            recent.insert(
                                hdr.id,
                                BlockLoc {
                                    pack: no,
                                    offset: pos.offset,
                                    len: hdr.record_len() as u32,
                                },
                            );
                        }
                        RecordKind::Block => {}
                        RecordKind::Journal => match JournalRecord::decode(payload) {
                            Ok(rec) => journal.push((pos, rec)),
                            Err(e) => {
                                tracing::error!(
                                    pack = no,
                                    offset = pos.offset,
                                    "undecodable journal record with a valid crc: {e}"
                                );
                                return Err(Error::CorruptMeta(format!(
                                    "journal record at pack {no} offset {}: {e}",
                                    pos.offset
                                )));
                            }
                        },
                    }
                    Ok(())
                })?;
            }
            packs.insert(no, file);
        }

        let reserve = reserve_for(statvfs_of(dir).map(|(_, total)| total).unwrap_or(0));
        let next_no = numbers.last().map_or(1, |n| n + 1);
        let file = new_pack(&*io, dir, next_no)?;
        packs.insert(next_no, file.clone());
        let start = LogPos {
            pack: next_no,
            offset: PACK_HEADER_LEN as u64,
        };
        if !recent.is_empty() || !journal.is_empty() {
            tracing::info!(
                blocks = recent.len(),
                journal_records = journal.len(),
                "recovery: replaying the log written after the last checkpoint"
            );
        }
        Ok((
            Store {
                dir: dir.to_path_buf(),
                io,
                db,
                active: Mutex::new(ActivePack {
                    no: next_no,
                    file,
                    len: PACK_HEADER_LEN as u64,
                    allocated: PACK_HEADER_LEN as u64,
                }),
                synced: Mutex::new(start),
                packs: RwLock::new(packs),
                recent: RwLock::new(recent),
                poisoned: AtomicBool::new(false),
                reserve,
                free_estimate: AtomicU64::new(0),
                appended_since_check: AtomicU64::new(u64::MAX / 2),
                gc_active: AtomicBool::new(false),
                gc_start: Mutex::new(LogPos::default()),
                dedup_guard: RwLock::new(()),
                gc_guard: RwLock::new(()),
            },
            Replay { journal },
        ))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn db(&self) -> &redb::Database {
        &self.db
    }

    /// Refuses ordinary appends that would eat into the space reserved for checkpoints (tree
    /// objects and the index commit): a full disk must fail the writer, never the index, which
    /// cannot commit again after a failed write until it is reopened.
    fn check_space(&self, len: u64) -> Result<()> {
        if RESERVE_OK.with(|r| r.get()) {
            return Ok(());
        }
        let since = self.appended_since_check.fetch_add(len, Ordering::Relaxed);
        let free = self.free_estimate.load(Ordering::Relaxed);
        if since + len < free.saturating_sub(self.reserve) / 2 {
            return Ok(());
        }
        let (free, _) = self.statvfs()?;
        self.free_estimate.store(free, Ordering::Relaxed);
        self.appended_since_check.store(0, Ordering::Relaxed);
        if free < self.reserve + len {
            return Err(Error::NoSpace);
        }
        Ok(())
    }

    /// Runs `f` with permission to use the space reserve (checkpoints, snapshots, GC copies).
    pub fn with_reserve<R>(&self, f: impl FnOnce() -> R) -> R {
        RESERVE_OK.with(|r| {
            let old = r.replace(true);
            let out = f();
            r.set(old);
            out
        })
    }

    fn check_poisoned(&self) -> Result<()> {
        if self.poisoned.load(Ordering::Relaxed) {
            Err(Error::Poisoned)
        } else {
            Ok(())
        }
    }

    /// The position the next append will take.
    pub fn end(&self) -> LogPos {
        let a = self.active.lock();
        LogPos {
            pack: a.no,
            offset: a.len,
        }
    }

    /// Appends one encoded record; returns its location. On failure nothing is appended.
    fn append(&self, rec: &[u8]) -> Result<BlockLoc> {
        self.check_poisoned()?;
        self.check_space(rec.len() as u64)?;
        let mut a = self.active.lock();
        if a.len >= PACK_TARGET_SIZE {
            self.roll(&mut a)?;
        }
        let offset = a.len;
        if let Err(e) = a.file.write_all_at(rec, offset) {
            // Cut off whatever part of the record reached the file, so the log stays parseable.
            if let Err(e2) = a.file.set_len(offset) {
                tracing::error!(
                    pack = a.no,
                    "cannot cut a failed append: {e2}; poisoning the store"
                );
                self.poisoned.store(true, Ordering::Relaxed);
            }
            return Err(e.into());
        }
        a.len += rec.len() as u64;
        a.allocated = a.allocated.max(a.len);
        Ok(BlockLoc {
            pack: a.no,
            offset,
            len: rec.len() as u32,
        })
    }

    /// Closes the active pack if it holds more than `min` bytes, so that a collection can
    /// rewrite it.
    pub fn roll_if_larger(&self, min: u64) -> Result<()> {
        let mut a = self.active.lock();
        if a.len > min {
            self.roll(&mut a)?;
        }
        Ok(())
    }

    /// Closes the active pack (durably) and starts the next one.
    fn roll(&self, a: &mut ActivePack) -> Result<()> {
        a.file.set_len(a.len)?;
        self.sync_file(&*a.file)?;
        let no = a.no + 1;
        let file = new_pack(&*self.io, &self.dir, no)?;
        self.packs.write().insert(no, file.clone());
        *a = ActivePack {
            no,
            file,
            len: PACK_HEADER_LEN as u64,
            allocated: PACK_HEADER_LEN as u64,
        };
        Ok(())
    }

    fn sync_file(&self, f: &dyn PackFile) -> Result<()> {
        if let Err(e) = f.sync_data() {
            tracing::error!(
                "fdatasync of a pack failed: {e}; the store is read-only until restart"
            );
            self.poisoned.store(true, Ordering::Relaxed);
            return Err(e.into());
        }
        Ok(())
    }

    /// Zero-fills the active pack ahead of the log end (see `PREFILL_WINDOW`). Best effort: a
    /// full disk only means the next fdatasync is slower.
    fn prefill(&self) {
        let mut a = self.active.lock();
        if a.allocated >= a.len + PREFILL_WINDOW / 2 {
            return;
        }
        let upto = a.len + PREFILL_WINDOW;
        let zeros = vec![0u8; (upto - a.allocated) as usize];
        match a.file.write_all_at(&zeros, a.allocated) {
            Ok(()) => a.allocated = upto,
            Err(_) => {
                let _ = a.file.set_len(a.allocated);
            }
        }
    }

    /// Makes everything appended before `upto` durable (group commit: one fdatasync covers
    /// every caller that appended before it started).
    pub fn sync_to(&self, upto: LogPos) -> Result<LogPos> {
        self.check_poisoned()?;
        let mut synced = self.synced.lock();
        if *synced >= upto {
            return Ok(*synced);
        }
        let (file, end) = {
            let a = self.active.lock();
            (
                a.file.clone(),
                LogPos {
                    pack: a.no,
                    offset: a.len,
                },
            )
        };
        // Packs before the active one were synced when they were closed.
        self.sync_file(&*file)?;
        *synced = end;
        self.prefill();
        Ok(end)
    }

    /// Syncs everything appended so far.
    pub fn sync_all(&self) -> Result<LogPos> {
        self.sync_to(self.end())
    }

    /// Resolves many ids with one index transaction.
    fn lookup_many(&self, ids: &[BlockId]) -> Result<Vec<Option<BlockLoc>>> {
        let mut out = vec![None; ids.len()];
        let mut missing = Vec::new();
        {
            let recent = self.recent.read();
            for (i, id) in ids.iter().enumerate() {
                match recent.get(id) {
                    Some(l) => out[i] = Some(*l),
                    None => missing.push(i),
                }
            }
        }
        if !missing.is_empty() {
            let txn = self.db.begin_read()?;
            let table = txn.open_table(BLOCKS)?;
            for i in missing {
                if let Some(v) = table.get(ids[i].0.as_slice())? {
                    out[i] = Some(BlockLoc::decode(v.value())?);
                }
            }
        }
        Ok(out)
    }

    /// Stores many blocks with one index transaction and one append; returns their ids in
    /// order. Hashing and compression of a large batch are spread over two threads.
    pub fn put_many(&self, blocks: &[&[u8]]) -> Result<Vec<BlockId>> {
        let ids: Vec<BlockId> = par_map(blocks, |b| BlockId::of(b));
        let exists: Vec<bool> = self
            .lookup_many(&ids)?
            .into_iter()
            .map(|l| self.reusable(l))
            .collect();
        let mut seen = std::collections::HashSet::new();
        let todo: Vec<usize> = (0..ids.len())
            .filter(|&i| !exists[i] && seen.insert(ids[i]))
            .collect();
        if todo.is_empty() {
            return Ok(ids);
        }
        let records: Vec<Vec<u8>> = par_map(&todo, |&i| {
            let (codec, payload) = codec::compress(blocks[i]);
            pack::encode_record(
                RecordKind::Block,
                codec,
                blocks[i].len() as u32,
                &ids[i],
                &payload,
            )
        });
        let buf = records.concat();
        let at = self.append(&buf)?;
        let mut recent = self.recent.write();
        let mut offset = at.offset;
        for (rec, &i) in records.iter().zip(&todo) {
            recent.insert(
                ids[i],
                BlockLoc {
                    pack: at.pack,
                    offset,
                    len: rec.len() as u32,
                },
            );
            offset += rec.len() as u64;
        }
        Ok(ids)
    }

    /// Reads and verifies many blocks: one index transaction, one pread per run of adjacent
    /// records, verification spread over two threads for large batches.
    pub fn get_many(&self, ids: &[BlockId]) -> Result<Vec<Vec<u8>>> {
        let locs = self.lookup_many(ids)?;
        let mut locs2 = Vec::with_capacity(ids.len());
        for (id, l) in ids.iter().zip(locs) {
            locs2.push(l.ok_or(Error::MissingBlock(*id))?);
        }
        // Runs of records that follow each other in one pack.
        let mut runs: Vec<(usize, usize)> = Vec::new();
        for i in 0..ids.len() {
            match runs.last_mut() {
                Some((_, end))
                    if locs2[*end - 1].pack == locs2[i].pack
                        && locs2[*end - 1].offset + locs2[*end - 1].len as u64
                            == locs2[i].offset =>
                {
                    *end = i + 1;
                }
                _ => runs.push((i, i + 1)),
            }
        }
        let mut raw: Vec<(usize, Vec<u8>)> = Vec::with_capacity(ids.len());
        for (start, end) in runs {
            let first = locs2[start];
            let len: u64 = locs2[start..end].iter().map(|l| l.len as u64).sum();
            let mut buf = vec![0u8; len as usize];
            self.pack_file(&ids[start], &first)?
                .read_exact_at(&mut buf, first.offset)
                .map_err(|e| corrupt(&ids[start], &first, format!("read failed: {e}")))?;
            let mut at = 0usize;
            for (i, loc) in locs2.iter().enumerate().take(end).skip(start) {
                let n = loc.len as usize;
                raw.push((i, buf[at..at + n].to_vec()));
                at += n;
            }
        }
        par_map(&raw, |(i, buf)| {
            open_block_record(&ids[*i], &locs2[*i], buf)
        })
        .into_iter()
        .collect()
    }

    fn pack_file(&self, id: &BlockId, loc: &BlockLoc) -> Result<Arc<dyn PackFile>> {
        self.packs
            .read()
            .get(&loc.pack)
            .cloned()
            .ok_or_else(|| corrupt(id, loc, "pack file is missing".into()))
    }

    /// Stores `content` (deduplicated by its blake3) and returns its id.
    pub fn put(&self, content: &[u8]) -> Result<BlockId> {
        Ok(self.put_many(&[content])?[0])
    }

    /// Reads and verifies a block.
    pub fn get(&self, id: &BlockId) -> Result<Vec<u8>> {
        self.get_many(std::slice::from_ref(id))?
            .pop()
            .ok_or(Error::MissingBlock(*id))
    }

    /// Shared guard for readers: block ids resolved under it stay readable until it is dropped.
    pub fn read_guard(&self) -> parking_lot::RwLockReadGuard<'_, ()> {
        self.gc_guard.read()
    }

    /// Held by a writer from `put`/`put_many` until the returned ids are installed in its
    /// file map (see the module invariants).
    pub fn dedup_guard(&self) -> parking_lot::RwLockReadGuard<'_, ()> {
        self.dedup_guard.read()
    }

    /// Starts or ends a collection (see the module invariants).
    pub fn set_gc_active(&self, on: bool) {
        let _w = self.dedup_guard.write();
        *self.gc_start.lock() = self.end();
        self.gc_active.store(on, Ordering::SeqCst);
    }

    /// Whether `put` may reuse a block: during a collection only blocks appended after it began.
    fn reusable(&self, loc: Option<BlockLoc>) -> bool {
        match loc {
            None => false,
            Some(l) if self.gc_active.load(Ordering::SeqCst) => {
                LogPos {
                    pack: l.pack,
                    offset: l.offset,
                } >= *self.gc_start.lock()
            }
            Some(_) => true,
        }
    }

    /// Every indexed block with its location.
    pub fn indexed_blocks(&self) -> Result<Vec<(BlockId, BlockLoc)>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(BLOCKS)?;
        let mut out = Vec::new();
        for row in table.iter()? {
            let (k, v) = row?;
            let arr: [u8; 32] = k
                .value()
                .try_into()
                .map_err(|_| Error::CorruptMeta("index key length".into()))?;
            out.push((BlockId(arr), BlockLoc::decode(v.value())?));
        }
        Ok(out)
    }

    /// Removes unreferenced blocks from the index (the collector's sweep). Blocks appended
    /// since the collection started are kept whatever the list says. Returns (blocks, bytes).
    pub fn sweep(&self, garbage: &[BlockId]) -> Result<(u64, u64)> {
        let (mut n, mut bytes) = (0u64, 0u64);
        let start = *self.gc_start.lock();
        // Small batches: readers wait for one batch at most, not for the whole sweep.
        for batch in garbage.chunks(1024) {
            let _g = self.gc_guard.write();
            let recent = self.recent.read();
            let mut txn = self.db.begin_write()?;
            txn.set_durability(redb::Durability::None)
                .map_err(|e| Error::Index(e.to_string()))?;
            {
                let mut blocks = txn.open_table(BLOCKS)?;
                for id in batch {
                    if recent.contains_key(id) {
                        continue;
                    }
                    let loc = match blocks.get(id.0.as_slice())? {
                        Some(v) => BlockLoc::decode(v.value())?,
                        None => continue,
                    };
                    let appended = LogPos {
                        pack: loc.pack,
                        offset: loc.offset,
                    };
                    if appended >= start {
                        continue; // a copy made during this collection
                    }
                    blocks.remove(id.0.as_slice())?;
                    n += 1;
                    bytes += loc.len as u64;
                }
            }
            txn.commit()?;
        }
        // Made durable by the next checkpoint's commit; losing it to a crash only leaves
        // garbage that the next collection finds again.
        Ok((n, bytes))
    }

    /// Pack numbers that may be rewritten: closed, and wholly before what recovery replays.
    pub fn closed_packs(&self) -> Result<Vec<u32>> {
        let start = {
            let txn = self.db.begin_read()?;
            let meta = txn.open_table(META)?;
            let rs = match meta.get("replay_start")? {
                Some(v) => decode_pos(v.value())?,
                None => LogPos::default(),
            };
            let iu = match meta.get("indexed_upto")? {
                Some(v) => decode_pos(v.value())?,
                None => LogPos::default(),
            };
            rs.min(iu)
        };
        let active = self.active.lock().no;
        let mut out: Vec<u32> = self
            .packs
            .read()
            .keys()
            .copied()
            .filter(|&p| p < start.pack && p != active)
            .collect();
        out.sort_unstable();
        Ok(out)
    }

    pub fn pack_len(&self, no: u32) -> Result<u64> {
        match self.packs.read().get(&no) {
            Some(f) => Ok(f.len()?),
            None => Ok(0),
        }
    }

    /// Copies a live record to the log end (compaction); the copy is indexed at the next
    /// checkpoint and read from its new place at once.
    pub fn relocate(&self, id: &BlockId, loc: &BlockLoc) -> Result<()> {
        if self.recent.read().contains_key(id) {
            return Ok(());
        }
        let mut buf = vec![0u8; loc.len as usize];
        self.pack_file(id, loc)?
            .read_exact_at(&mut buf, loc.offset)
            .map_err(|e| corrupt(id, loc, format!("read failed: {e}")))?;
        open_block_record(id, loc, &buf)?;
        let new = self.append(&buf)?;
        self.recent.write().insert(*id, new);
        Ok(())
    }

    /// Deletes pack files whose live records were all relocated and committed elsewhere.
    pub fn delete_packs(&self, nos: &[u32]) -> Result<()> {
        let _g = self.gc_guard.write();
        for no in nos {
            self.packs.write().remove(no);
            match std::fs::remove_file(pack_path(&self.dir, *no)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.io.sync_dir(&self.dir.join("packs"))?;
        Ok(())
    }

    /// Raw (uncompressed) length of a stored block, from its record header.
    pub fn raw_len(&self, loc: &BlockLoc) -> Result<u32> {
        let file = self.packs.read().get(&loc.pack).cloned();
        let Some(file) = file else { return Ok(0) };
        let mut h = [0u8; RECORD_HEADER_LEN];
        file.read_exact_at(&mut h, loc.offset)?;
        Ok(pack::decode_record_header(&h)?.raw_len)
    }

    /// Physical bytes of all pack files.
    pub fn physical_bytes(&self) -> Result<u64> {
        let files: Vec<Arc<dyn PackFile>> = self.packs.read().values().cloned().collect();
        let mut total = 0;
        for f in files {
            total += f.len()?;
        }
        Ok(total)
    }

    /// Appends a journal record; returns the log position just after it.
    pub fn append_journal(&self, rec: &JournalRecord) -> Result<LogPos> {
        let payload = rec.encode();
        let bytes = pack::encode_record(
            RecordKind::Journal,
            vdbfs_format::Codec::Raw,
            payload.len() as u32,
            &BlockId([0; 32]),
            &payload,
        );
        let loc = self.append(&bytes)?;
        Ok(LogPos {
            pack: loc.pack,
            offset: loc.offset + loc.len as u64,
        })
    }

    /// The second half of a checkpoint: once every tree object is appended, make the log durable
    /// and commit the new dataset records together with the index entries of every block appended
    /// before the sync point. `datasets` must hold every dataset loaded in this process: the
    /// next recovery starts at the oldest of their replay positions.
    pub fn commit_checkpoint(&self, datasets: &[DatasetRecord]) -> Result<()> {
        self.commit_checkpoint_with(datasets, |_| Ok(()))
    }

    /// `commit_checkpoint`, with more writes (a snapshot record, say) in the same transaction,
    /// so they are durable together or not at all.
    pub fn commit_checkpoint_with(
        &self,
        datasets: &[DatasetRecord],
        extra: impl FnOnce(&redb::WriteTransaction) -> Result<()>,
    ) -> Result<()> {
        let upto = self.sync_all()?;
        let batch: Vec<(BlockId, BlockLoc)> = self
            .recent
            .read()
            .iter()
            .filter(|(_, l)| {
                LogPos {
                    pack: l.pack,
                    offset: l.offset,
                } < upto
            })
            .map(|(k, v)| (*k, *v))
            .collect();
        let txn = self.db.begin_write()?;
        {
            let mut blocks = txn.open_table(BLOCKS)?;
            for (id, loc) in &batch {
                blocks.insert(id.0.as_slice(), loc.encode().as_slice())?;
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
            meta.insert("indexed_upto", encode_pos(upto).as_slice())?;
            meta.insert("replay_start", encode_pos(replay_start).as_slice())?;
        }
        extra(&txn)?;
        txn.commit()?;
        let mut recent = self.recent.write();
        for (id, loc) in batch {
            if recent.get(&id) == Some(&loc) {
                recent.remove(&id);
            }
        }
        Ok(())
    }

    /// Number of blocks appended since the last checkpoint (drives checkpoint frequency).
    pub fn recent_blocks(&self) -> usize {
        self.recent.read().len()
    }

    /// Free and total bytes of the filesystem under the store.
    pub fn statvfs(&self) -> Result<(u64, u64)> {
        statvfs_of(&self.dir)
    }
}

fn statvfs_of(dir: &Path) -> Result<(u64, u64)> {
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
        .map_err(|_| Error::Invalid("store path"))?;
    // SAFETY: statvfs is plain old data: all-zero bytes are a valid value.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is a valid NUL-terminated path and s a valid out pointer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok((
        s.f_bavail as u64 * s.f_frsize as u64,
        s.f_blocks as u64 * s.f_frsize as u64,
    ))
}

/// Maps `f` over `items`, on rayon's pool when the batch is large enough to pay for it (no
/// thread is created per request).
fn par_map<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync + Send) -> Vec<R> {
    use rayon::prelude::*;
    const MIN_PARALLEL: usize = 16;
    if items.len() < MIN_PARALLEL {
        return items.iter().map(&f).collect();
    }
    items
        .par_iter()
        .with_min_len(MIN_PARALLEL / 2)
        .map(&f)
        .collect()
}

fn corrupt(id: &BlockId, loc: &BlockLoc, why: String) -> Error {
    Error::Corrupt {
        id: *id,
        pack: loc.pack,
        offset: loc.offset,
        why,
    }
}

/// Verifies one block record read from `loc` (crc, kind, id, content hash) and returns the
/// block's content.
fn open_block_record(id: &BlockId, loc: &BlockLoc, buf: &[u8]) -> Result<Vec<u8>> {
    let (hdr, payload) = pack::decode_record(buf).map_err(|e| corrupt(id, loc, e.to_string()))?;
    if hdr.kind != RecordKind::Block || hdr.id != *id {
        return Err(corrupt(id, loc, "record holds another block".into()));
    }
    pack::open_block(&hdr, payload).map_err(|e| corrupt(id, loc, e.to_string()))
}

/// redb caches up to 1 GiB of index pages by default, which became most of the daemon's memory
/// on a 2 GB store; 128 MiB holds the hot part of the index of about a million blocks.
fn index_builder() -> redb::Builder {
    let mut b = redb::Builder::new();
    b.set_cache_size(128 << 20);
    b
}

fn new_pack(io: &dyn PackIo, dir: &Path, no: u32) -> Result<Arc<dyn PackFile>> {
    let file = io.create(&pack_path(dir, no))?;
    file.write_all_at(&pack::encode_pack_header(no), 0)?;
    file.sync_data()?;
    io.sync_dir(&dir.join("packs"))?;
    Ok(file)
}

fn encode_pos(p: LogPos) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[..4].copy_from_slice(&p.pack.to_le_bytes());
    b[4..].copy_from_slice(&p.offset.to_le_bytes());
    b
}

fn decode_pos(b: &[u8]) -> Result<LogPos> {
    if b.len() != 12 {
        return Err(Error::CorruptMeta("log position".into()));
    }
    Ok(LogPos {
        pack: u32::from_le_bytes(b[..4].try_into().unwrap_or_default()),
        offset: u64::from_le_bytes(b[4..].try_into().unwrap_or_default()),
    })
}

/// Reads records of one pack from `start` until its end or the first record that does not verify
/// (a torn tail from a crash): everything after that point was never acknowledged as durable.
fn scan_pack(
    file: &dyn PackFile,
    no: u32,
    start: u64,
    mut f: impl FnMut(LogPos, &pack::RecordHeader, &[u8]) -> Result<()>,
) -> Result<()> {
    let len = file.len()?;
    let mut head = vec![0u8; PACK_HEADER_LEN];
    if len < PACK_HEADER_LEN as u64 {
        tracing::warn!(
            pack = no,
            "pack shorter than its header (torn creation); ignored"
        );
        return Ok(());
    }
    file.read_exact_at(&mut head, 0)?;
    let found = pack::decode_pack_header(&head)?;
    if found != no {
        return Err(Error::CorruptMeta(format!(
            "pack file {no} says it is pack {found}"
        )));
    }
    let mut pos = start;
    let mut hdr_buf = [0u8; RECORD_HEADER_LEN];
    while pos + RECORD_HEADER_LEN as u64 <= len {
        file.read_exact_at(&mut hdr_buf, pos)?;
        let Ok(hdr) = pack::decode_record_header(&hdr_buf) else {
            break;
        };
        let total = hdr.record_len();
        if pos + total > len {
            break;
        }
        let mut buf = vec![0u8; total as usize];
        file.read_exact_at(&mut buf, pos)?;
        let Ok((hdr, payload)) = pack::decode_record(&buf) else {
            break;
        };
        f(
            LogPos {
                pack: no,
                offset: pos,
            },
            &hdr,
            payload,
        )?;
        pos += total;
    }
    if pos < len {
        let mut probe = vec![0u8; (len - pos).min(64 << 10) as usize];
        file.read_exact_at(&mut probe, pos)?;
        if probe.iter().any(|&b| b != 0) {
            tracing::warn!(
                pack = no,
                offset = pos,
                bytes = len - pos,
                "ignoring a torn tail after the last complete record"
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
