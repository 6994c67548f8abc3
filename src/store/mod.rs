//! The block store: content-addressed blocks in append-only pack files, located through a redb
//! index. Bottom of the data path (FUSE op -> tree layer -> block store -> packs and index).
//!
//! Modules: `log` (the active pack, appends and group commit), `recovery` (reading the log
//! back), `index` (redb), `space` (the reserve: a ballast file only the store's own work may
//! use), `gc` (the store side of collection), `scrub` (reading every live block back), `io`
//! (the seam to the disk, `sim` its crash-test double).
//!
//! Size: what stays here is the `Store` type itself (open, put, read, the checkpoint and gc
//! hooks), whose methods share its private state and locks; each concern with a state of its own
//! is a submodule.
//!
//! Invariants (see fs-format/FORMAT.md, "Commit protocol"):
//! - Pack files are append-only and never rewritten in place (the log's last partial block is
//!   rewritten with the same leading bytes until it is full); after open, appends always go to a
//!   new pack, so a torn tail left by a crash is never followed by live records in the same
//!   pack.
//! - A block enters the redb index only in a checkpoint commit, after the pack bytes holding it
//!   were synced. Blocks appended since the last checkpoint live in `recent` and are found again
//!   by the recovery scan.
//! - A journal record is appended after every block it references, and the sync that made it
//!   durable synced the whole log up to its end.
//! - Every read verifies the record crc and the block's blake3; a mismatch is `Error::Corrupt`,
//!   never wrong bytes.
//! - After a failed sync the store is poisoned: every later write or sync fails, so a lost write
//!   is never reported as durable by a later, successful fsync.
//! - Every index write transaction starts through [`Store::begin_write`] (or a checkpoint), which
//!   first makes room on a full filesystem by giving up reserve: redb never meets ENOSPC (after a
//!   failed write it refuses every later one until reopened).

pub mod catalog;
pub mod error;
mod gc;
pub mod index;
pub mod io;
mod log;
pub mod records;
pub mod recovery;
pub mod remote_tables;
pub mod scrub;
mod seen;
#[cfg(test)]
pub mod sim;
mod space;

use parking_lot::{Mutex, RwLock};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use vdbfs_format::index::{BlockLoc, DamageMark, DatasetRecord, LogPos};
use vdbfs_format::journal::JournalRecord;
use vdbfs_format::pack::{self, RecordFormat, RecordKind, MAX_RECORD_HEADER_LEN};
use vdbfs_format::{codec, BlockId};

pub use catalog::{CatalogTxn, StoredSnapshot};
pub use error::{Error, Result};
pub use index::{
    index_path, BLOCKS, DAMAGED, DATASETS, META, MOUNTS, NAMES, ORIGINS, REMOTE_BLOCKS,
    REMOTE_KEYS, REMOTE_OBJECTS, REMOTE_UPLOADED, SNAPSHOTS, SNAPSHOT_PROPS, SOURCES, TOKENS, VDBS,
    VDB_LAST_CLIENT,
};

/// Where blocks that are neither in the index nor in the log come from: the object store
/// (`crate::remote`, through its bounded local cache). `fetch` answers, per id, the verified
/// content of a block it knows a published copy of, `None` for one it does not know or whose
/// copy does not verify (it logs which object), and an error when it cannot fetch at all; never
/// wrong bytes. What it serves never enters this store's log or index.
pub trait RemoteFetch: Send + Sync {
    fn fetch(&self, ids: &[BlockId]) -> Result<Vec<Option<Vec<u8>>>>;
}
pub use recovery::{Damage, Damaged};
pub use space::{ballast_path, SpaceReport};

use index::Index;
use io::{OsIo, PackFile, PackIo};
use log::Log;
use space::Space;

/// One pack file and the record format its header declares.
#[derive(Clone)]
struct Pack {
    file: Arc<dyn PackFile>,
    format: RecordFormat,
}

pub struct Store {
    dir: PathBuf,
    io: Arc<dyn PackIo>,
    index: Index,
    log: Log,
    packs: RwLock<HashMap<u32, Pack>>,
    recent: RwLock<HashMap<BlockId, BlockLoc>>,
    space: Space,
    gc_active: AtomicBool,
    gc_start: Mutex<LogPos>,
    dedup_guard: RwLock<()>,
    /// Held shared by everything that resolves block ids to locations and reads them; held
    /// exclusively by the GC while it removes index entries or pack files.
    gc_guard: RwLock<()>,
    /// Blocks missing locally are fetched from here (it keeps them in its own bounded cache,
    /// never in this store's log).
    remote: RwLock<Option<Arc<dyn RemoteFetch>>>,
    /// Ids the store may hold: writers skip the index lookup for blocks it knows are new.
    seen: seen::Seen,
}

/// What recovery found in the log after the last checkpoint, for the tree layer to replay.
pub struct Replay {
    pub journal: Vec<(LogPos, JournalRecord)>,
    /// Acknowledged log bytes that no longer verify (see `recovery`).
    pub damage: Vec<Damage>,
}

fn pack_path(dir: &Path, no: u32) -> PathBuf {
    dir.join("packs").join(format!("{no:08}.pack"))
}

impl Store {
    /// Creates a new, empty store in `dir`: a new directory (mode 0711), or an existing empty
    /// one (its mode is left as it is). Anything else is refused before a byte changes.
    pub fn create(dir: &Path) -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let existed = match std::fs::metadata(dir) {
            Ok(m) if !m.is_dir() => return Err(Error::NotDir),
            Ok(_) => {
                if !foreign_entries(dir)?.is_empty() {
                    return Err(Error::NotEmpty);
                }
                true
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => return Err(e.into()),
        };
        std::fs::create_dir_all(dir)?;
        if !existed {
            // Block data is only for the daemon; the store directory itself stays traversable
            // so that the postgres user reaches the mount points and source files inside it.
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711))?;
        }
        std::fs::create_dir(dir.join("packs"))?;
        std::fs::set_permissions(dir.join("packs"), std::fs::Permissions::from_mode(0o700))?;
        Index::create(dir)?;
        if let Err(e) = Space::create_ballast(dir) {
            // The daemon grows it when there is room.
            tracing::warn!("cannot allocate the store's reserve yet: {e}");
        }
        OsIo.sync_dir(dir)?;
        Ok(())
    }

    pub fn open(dir: &Path) -> Result<(Store, Replay)> {
        Self::open_with(dir, Arc::new(OsIo))
    }

    /// Opens the store, scans the log written since the last checkpoint and starts a new pack.
    pub fn open_with(dir: &Path, io: Arc<dyn PackIo>) -> Result<(Store, Replay)> {
        // Opening the index writes to it, and recovery checkpoints: on a full filesystem the
        // reserve makes the room (see `space`).
        let space = Space::open(dir);
        space.make_room("recovery")?;
        let (index, pos) = Index::open(dir)?;
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
        let mut found = recovery::Recovered::default();
        let last = numbers.last().copied();
        for &no in &numbers {
            let file = io.open(&pack_path(dir, no))?;
            let Some(format) = recovery::pack_format(&*file, no)? else {
                continue;
            };
            if no >= pos.replay_start.pack {
                let start = if no == pos.replay_start.pack {
                    pos.replay_start.offset.max(pack::PACK_HEADER_LEN as u64)
                } else {
                    pack::PACK_HEADER_LEN as u64
                };
                let closed = Some(no) != last;
                recovery::scan_pack(
                    &*file,
                    no,
                    format,
                    start,
                    pos.indexed_upto,
                    closed,
                    &mut found,
                )?;
            }
            packs.insert(no, Pack { file, format });
        }

        let next_no = last.map_or(1, |n| n + 1);
        let (log, file) = Log::start(
            dir,
            io.clone(),
            next_no,
            space::pack_target_for(space.total()),
        )?;
        packs.insert(
            next_no,
            Pack {
                file,
                format: RecordFormat::V2,
            },
        );
        if !found.recent.is_empty() || !found.journal.is_empty() {
            tracing::info!(
                blocks = found.recent.len(),
                journal_records = found.journal.len(),
                "recovery: replaying the log written after the last checkpoint"
            );
        }
        let seen = seen::Seen::with_capacity(index.block_count()?);
        for id in found.recent.keys() {
            seen.add(id);
        }
        Ok((
            Store {
                dir: dir.to_path_buf(),
                io,
                index,
                log,
                packs: RwLock::new(packs),
                recent: RwLock::new(found.recent),
                space,
                gc_active: AtomicBool::new(false),
                gc_start: Mutex::new(LogPos::default()),
                dedup_guard: RwLock::new(()),
                gc_guard: RwLock::new(()),
                remote: RwLock::new(None),
                seen,
            },
            Replay {
                journal: found.journal,
                damage: found.damage,
            },
        ))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The redb database, for the store's own modules only: every table is opened here
    /// (`catalog`, `records`, `remote_tables`), never by another module.
    pub(in crate::store) fn db(&self) -> &redb::Database {
        self.index.db()
    }

    /// The position the next append will take.
    pub fn end(&self) -> LogPos {
        self.log.end()
    }

    /// Appends encoded records, given as slices laid one after the other (no copy in between),
    /// after checking the space they need; returns where they start.
    fn append(&self, parts: &[&[u8]]) -> Result<BlockLoc> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        self.space.check(len as u64)?;
        self.append_unchecked(parts)
    }

    /// Appends without the space check (journal records: see `space`).
    fn append_unchecked(&self, parts: &[&[u8]]) -> Result<BlockLoc> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        self.log.check_poisoned()?;
        let at = self.log.append(parts, &mut |no, file| {
            self.packs.write().insert(
                no,
                Pack {
                    file,
                    format: RecordFormat::V2,
                },
            );
        })?;
        Ok(BlockLoc {
            pack: at.pack,
            offset: at.offset,
            len: len as u32,
        })
    }

    /// Makes everything appended before `upto` durable (group commit: one sync covers every
    /// caller that appended before it started).
    pub fn sync_to(&self, upto: LogPos) -> Result<LogPos> {
        self.log.sync_to(upto)
    }

    /// Syncs everything appended so far.
    pub fn sync_all(&self) -> Result<LogPos> {
        self.log.sync_all()
    }

    /// Where blocks are in the local log, with one index transaction (None: not stored here).
    pub fn lookup_many(&self, ids: &[BlockId]) -> Result<Vec<Option<BlockLoc>>> {
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
        self.index.lookup(ids, &missing, &mut out)?;
        Ok(out)
    }

    /// The contents of the blocks among `ids` that `locs` (their local locations) does not
    /// place, from the remote (its cache or the bucket, verified there). A block found nowhere
    /// is `MissingBlock`. Fetched blocks are not stored here (see `crate::remote::cache`).
    fn fetch_missing(
        &self,
        ids: &[BlockId],
        locs: &[Option<BlockLoc>],
    ) -> Result<HashMap<BlockId, Vec<u8>>> {
        let mut seen = std::collections::HashSet::new();
        let missing: Vec<BlockId> = ids
            .iter()
            .zip(locs)
            .filter(|(id, l)| l.is_none() && seen.insert(**id))
            .map(|(id, _)| *id)
            .collect();
        let mut out = HashMap::with_capacity(missing.len());
        let Some(first) = missing.first() else {
            return Ok(out);
        };
        let Some(remote) = self.remote.read().clone() else {
            return Err(Error::MissingBlock(*first));
        };
        for (id, got) in missing.iter().zip(remote.fetch(&missing)?) {
            out.insert(*id, got.ok_or(Error::MissingBlock(*id))?);
        }
        Ok(out)
    }

    /// Sets where blocks missing locally are fetched from.
    pub fn set_remote(&self, remote: Arc<dyn RemoteFetch>) {
        *self.remote.write() = Some(remote);
    }

    /// Forgets the remote (at shutdown: the remote holds the store too).
    pub fn clear_remote(&self) {
        *self.remote.write() = None;
    }

    /// The pack the log appends to now.
    pub fn active_pack(&self) -> u32 {
        self.log.end().pack
    }

    /// The record format of pack `no` and its file's path, if the pack exists.
    pub fn pack_file(&self, no: u32) -> Option<(RecordFormat, PathBuf)> {
        self.packs
            .read()
            .get(&no)
            .map(|p| (p.format, pack_path(&self.dir, no)))
    }

    /// The numbers of every pack file, lowest first.
    pub fn pack_numbers(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self.packs.read().keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// Stores many blocks with one index transaction and one append; returns their ids in
    /// order. Hashing and compression of a large batch are spread over two threads.
    pub fn put_many(&self, blocks: &[&[u8]]) -> Result<Vec<BlockId>> {
        let ids: Vec<BlockId> = par_map(blocks, |b| BlockId::of(b));
        // Only blocks the filter does not know to be new are looked up.
        let maybe: Vec<usize> = (0..ids.len())
            .filter(|&i| !self.seen.certainly_new(&ids[i]))
            .collect();
        let mut exists = vec![false; ids.len()];
        if !maybe.is_empty() {
            let ask: Vec<BlockId> = maybe.iter().map(|&i| ids[i]).collect();
            for (&i, l) in maybe.iter().zip(self.lookup_many(&ask)?) {
                exists[i] = self.reusable(l);
            }
        }
        let mut seen = std::collections::HashSet::new();
        let todo: Vec<usize> = (0..ids.len())
            .filter(|&i| !exists[i] && seen.insert(ids[i]))
            .collect();
        if todo.is_empty() {
            return Ok(ids);
        }
        // An lz4 payload, or None for a block stored as is (its bytes are the caller's: no
        // copy is made of them before they reach the log's buffer).
        let payloads: Vec<(Option<Vec<u8>>, crc32fast::Hasher)> = par_map(&todo, |&i| {
            let c = codec::compress_if_worth_it(blocks[i]);
            let crc = pack::payload_crc(c.as_deref().unwrap_or(blocks[i]));
            (c, crc)
        });
        let durable = self.log.durable();
        let payload = |k: usize| payloads[k].0.as_deref().unwrap_or(blocks[todo[k]]);
        let headers: Vec<[u8; pack::RECORD_HEADER_LEN]> = (0..todo.len())
            .map(|k| {
                let codec = match payloads[k].0 {
                    Some(_) => codec::Codec::Lz4,
                    None => codec::Codec::Raw,
                };
                let i = todo[k];
                pack::encode_record_header(
                    RecordKind::Block,
                    codec,
                    blocks[i].len() as u32,
                    &ids[i],
                    payload(k).len() as u32,
                    &payloads[k].1,
                    durable,
                )
            })
            .collect();
        let parts: Vec<&[u8]> = (0..todo.len())
            .flat_map(|k| [&headers[k][..], payload(k)])
            .collect();
        let at = self.append(&parts)?;
        for &i in &todo {
            self.seen.add(&ids[i]);
        }
        let mut recent = self.recent.write();
        let mut offset = at.offset;
        for (k, &i) in todo.iter().enumerate() {
            let len = (pack::RECORD_HEADER_LEN + payload(k).len()) as u32;
            recent.insert(
                ids[i],
                BlockLoc {
                    pack: at.pack,
                    offset,
                    len,
                },
            );
            offset += len as u64;
        }
        Ok(ids)
    }

    /// The bytes of `len` at `offset` of pack `no`: from the log's memory for the active pack's
    /// unwritten part, from the file otherwise.
    fn read_at(&self, id: &BlockId, loc: &BlockLoc, buf: &mut [u8]) -> Result<RecordFormat> {
        let pack = self
            .packs
            .read()
            .get(&loc.pack)
            .cloned()
            .ok_or_else(|| corrupt(id, loc, "pack file is missing".into()))?;
        let r = match self.log.read_active(loc.pack, loc.offset, buf) {
            Ok(true) => Ok(()),
            Ok(false) => pack
                .file
                .read_exact_at(buf, loc.offset)
                .map_err(Error::from),
            Err(e) => Err(e),
        };
        r.map_err(|e| corrupt(id, loc, format!("read failed: {e}")))?;
        Ok(pack.format)
    }

    /// Reads and verifies many blocks: one index transaction, one read per run of adjacent
    /// records, verification spread over two threads for large batches.
    pub fn get_many(&self, ids: &[BlockId]) -> Result<Vec<Vec<u8>>> {
        let locs = self.lookup_many(ids)?;
        let fetched = self.fetch_missing(ids, &locs)?;
        // Blocks not stored here come from the remote; the local ones are read in runs.
        let local: Vec<usize> = (0..ids.len()).filter(|&i| locs[i].is_some()).collect();
        let locs2: Vec<BlockLoc> = local.iter().filter_map(|&i| locs[i]).collect();
        let ids2: Vec<BlockId> = local.iter().map(|&i| ids[i]).collect();
        let mut out: Vec<Vec<u8>> = Vec::with_capacity(ids.len());
        let mut read = self.read_located(&ids2, &locs2)?.into_iter();
        for (id, l) in ids.iter().zip(&locs) {
            match l {
                Some(_) => out.push(read.next().ok_or(Error::MissingBlock(*id))?),
                None => out.push(fetched.get(id).cloned().ok_or(Error::MissingBlock(*id))?),
            }
        }
        Ok(out)
    }

    /// Reads and verifies blocks at known local locations, in order.
    fn read_located(&self, ids: &[BlockId], locs2: &[BlockLoc]) -> Result<Vec<Vec<u8>>> {
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
        let mut raw: Vec<(usize, RecordFormat, Vec<u8>)> = Vec::with_capacity(ids.len());
        for (start, end) in runs {
            let first = locs2[start];
            let len: u64 = locs2[start..end].iter().map(|l| l.len as u64).sum();
            let mut buf = vec![0u8; len as usize];
            let format = self.read_at(
                &ids[start],
                &BlockLoc {
                    pack: first.pack,
                    offset: first.offset,
                    len: len as u32,
                },
                &mut buf,
            )?;
            let mut at = 0usize;
            for (i, loc) in locs2.iter().enumerate().take(end).skip(start) {
                let n = loc.len as usize;
                raw.push((i, format, buf[at..at + n].to_vec()));
                at += n;
            }
        }
        par_map(&raw, |(i, format, buf)| {
            open_block_record(&ids[*i], &locs2[*i], *format, buf)
        })
        .into_iter()
        .collect()
    }

    /// Reads and verifies blocks straight into `outs` (one per id, in order): each gets the
    /// block's first `out.len()` bytes, zeros past the block's end.
    ///
    /// A block is checked against the id it was asked for (the record header's kind and id, and
    /// the blake3 of its content), so the record crc adds nothing here and is left to scans.
    /// That also makes it safe to *guess* where a block is: blocks written one after another
    /// (a file written sequentially) lie one after another in the log, so after the first block
    /// of a run is located through the index, the next ids are looked for right behind it and
    /// the index is asked again only where the guess fails. A record found by guessing is the
    /// right content whether or not the index points at it (content addressing).
    pub fn read_into(&self, ids: &[BlockId], outs: &mut [&mut [u8]]) -> Result<()> {
        let mut scratch = SCRATCH.with(|s| std::mem::take(&mut *s.borrow_mut()));
        let r = self.read_into_with(ids, outs, &mut scratch);
        SCRATCH.with(|s| *s.borrow_mut() = scratch);
        r
    }

    fn read_into_with(
        &self,
        ids: &[BlockId],
        outs: &mut [&mut [u8]],
        scratch: &mut io::AlignedBuf,
    ) -> Result<()> {
        // The largest record of a data block (stored raw), for sizing windows.
        let max_rec = (pack::MAX_RECORD_HEADER_LEN + vdbfs_format::BLOCK_SIZE) as u64;
        let Some(first_id) = ids.first() else {
            return Ok(());
        };
        // Guess: the blocks follow the first one in the log. Windows grow while the guess holds.
        // A first block not stored here (a remote one) skips the guess.
        let mut i = 0;
        if let Some(first) = self.lookup_many(std::slice::from_ref(first_id))?[0] {
            i = self.read_guessed(ids, outs, first, scratch, max_rec)?;
        }
        if i == ids.len() {
            return Ok(());
        }
        // The rest: located through the index, read in runs of adjacent records; blocks not
        // stored here come from the remote.
        let rest = &ids[i..];
        let locs = self.lookup_many(rest)?;
        let outs = &mut outs[i..];
        let fetched = self.fetch_missing(rest, &locs)?;
        for (k, l) in locs.iter().enumerate() {
            if l.is_none() {
                let c = fetched.get(&rest[k]).ok_or(Error::MissingBlock(rest[k]))?;
                let n = c.len().min(outs[k].len());
                outs[k][..n].copy_from_slice(&c[..n]);
                outs[k][n..].fill(0);
            }
        }
        let mut order: Vec<(usize, BlockLoc)> = locs
            .iter()
            .enumerate()
            .filter_map(|(k, l)| l.map(|l| (k, l)))
            .collect();
        order.sort_by_key(|&(_, l)| (l.pack, l.offset));
        let mut g = 0;
        while g < order.len() {
            let mut h = g + 1;
            while h < order.len()
                && order[h].1.pack == order[g].1.pack
                && order[h - 1].1.offset + order[h - 1].1.len as u64 == order[h].1.offset
            {
                h += 1;
            }
            let start = order[g].1;
            let end = order[h - 1].1;
            let run = BlockLoc {
                pack: start.pack,
                offset: start.offset,
                len: (end.offset + end.len as u64 - start.offset) as u32,
            };
            let (format, buf) = self.read_window(&rest[order[g].0], &run, scratch)?;
            for &(k, l) in &order[g..h] {
                let rec = &buf[(l.offset - run.offset) as usize..][..l.len as usize];
                open_block_into(&rest[k], &l, format, rec, outs[k])?;
            }
            g = h;
        }
        Ok(())
    }

    /// The guessing part of [`Store::read_into`]: reads the blocks that follow `first` (where
    /// `ids[0]` is) in the log, as far as the guess holds; returns how many it read.
    fn read_guessed(
        &self,
        ids: &[BlockId],
        outs: &mut [&mut [u8]],
        first: BlockLoc,
        scratch: &mut io::AlignedBuf,
        max_rec: u64,
    ) -> Result<usize> {
        let limit = self.readable_end(first.pack)?;
        let mut at = first.offset;
        let mut window = SPECULATE_FIRST;
        let mut i = 0;
        while i < ids.len() {
            let want = ((ids.len() - i) as u64 * max_rec).min(window);
            let stop = (at + want).min(limit);
            if stop <= at {
                break;
            }
            let run = BlockLoc {
                pack: first.pack,
                offset: at,
                len: (stop - at) as u32,
            };
            let (format, buf) = self.read_window(&ids[i], &run, scratch)?;
            let (n, used) = open_following(&ids[i..], &mut outs[i..], &run, format, buf)?;
            i += n;
            at += used as u64;
            if n == 0 || (used as u64) + max_rec <= run.len as u64 {
                break; // the guess failed inside this window
            }
            window = (window * 4).min(SPECULATE_MAX);
        }
        Ok(i)
    }

    /// Reads `run` into `scratch` (4 KiB-aligned there, for direct I/O) and returns its bytes.
    fn read_window<'s>(
        &self,
        id: &BlockId,
        run: &BlockLoc,
        scratch: &'s mut io::AlignedBuf,
    ) -> Result<(RecordFormat, &'s [u8])> {
        let a = io::ALIGN as u64;
        let from = run.offset / a * a;
        let to = (run.offset + run.len as u64).div_ceil(a) * a;
        let need = (to - from) as usize;
        if scratch.len() < need {
            *scratch = io::AlignedBuf::zeroed(need);
        }
        let format = self.read_run(id, run, from, &mut scratch.padded_mut()[..need])?;
        let lo = (run.offset - from) as usize;
        Ok((format, &scratch.padded()[lo..lo + run.len as usize]))
    }

    /// How far pack `no` can be read: the log end for the active pack, the file's length else.
    fn readable_end(&self, no: u32) -> Result<u64> {
        let end = self.log.end();
        if end.pack == no {
            return Ok(end.offset);
        }
        match self.packs.read().get(&no) {
            Some(p) => Ok(p.file.len()?),
            None => Ok(0),
        }
    }

    /// Reads the bytes of `run` into `dest`, which holds the file's bytes from the aligned
    /// offset `from` on (the run starts at `run.offset - from` in it): the log's memory or file
    /// for the active pack; for closed packs direct I/O for large runs, a plain read else.
    fn read_run(
        &self,
        id: &BlockId,
        run: &BlockLoc,
        from: u64,
        dest: &mut [u8],
    ) -> Result<RecordFormat> {
        let pack = self
            .packs
            .read()
            .get(&run.pack)
            .cloned()
            .ok_or_else(|| corrupt(id, run, "pack file is missing".into()))?;
        let at = (run.offset - from) as usize;
        let records = at..at + run.len as usize;
        let r = match self
            .log
            .read_active(run.pack, run.offset, &mut dest[records.clone()])
        {
            Ok(true) => Ok(()),
            // Large runs straight into our buffer; small ones through the page cache, whose
            // readahead and caching serve scattered and repeated reads (other clones' mounts
            // read the same shared blocks).
            Ok(false) if pack.file.direct() && run.len as usize >= DIRECT_READ_MIN => {
                // The last block of a closed pack may be short: direct reads need whole blocks.
                let avail = pack.file.len().map(|l| l.saturating_sub(from) as usize);
                match avail {
                    Ok(n) if n >= dest.len() => pack.file.read_log_at(dest, from),
                    Ok(_) => pack
                        .file
                        .read_exact_at(&mut dest[records.clone()], run.offset),
                    Err(e) => Err(e),
                }
                .map_err(Error::from)
            }
            Ok(false) => pack
                .file
                .read_exact_at(&mut dest[records], run.offset)
                .map_err(Error::from),
            Err(e) => Err(e),
        };
        r.map_err(|e| corrupt(id, run, format!("read failed: {e}")))?;
        Ok(pack.format)
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
    /// file map (see the GC invariants in `gc`).
    pub fn dedup_guard(&self) -> parking_lot::RwLockReadGuard<'_, ()> {
        self.dedup_guard.read()
    }

    /// Raw (uncompressed) length of a stored block, from its record header.
    pub fn raw_len(&self, loc: &BlockLoc) -> Result<u32> {
        let Some(pack) = self.packs.read().get(&loc.pack).cloned() else {
            return Ok(0);
        };
        let hlen = pack.format.header_len();
        let mut h = [0u8; MAX_RECORD_HEADER_LEN];
        let id = BlockId([0; 32]);
        self.read_at(
            &id,
            &BlockLoc {
                pack: loc.pack,
                offset: loc.offset,
                len: hlen as u32,
            },
            &mut h[..hlen],
        )?;
        Ok(pack::decode_record_header(&h[..hlen], pack.format)?.raw_len)
    }

    /// Physical bytes of all pack files.
    pub fn physical_bytes(&self) -> Result<u64> {
        let files: Vec<Arc<dyn PackFile>> =
            self.packs.read().values().map(|p| p.file.clone()).collect();
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
            codec::Codec::Raw,
            payload.len() as u32,
            &pack::journal_record_id(rec.dataset),
            &payload,
            self.log.durable(),
        );
        let loc = self.append_unchecked(&[&bytes])?;
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
        extra: impl FnOnce(&CatalogTxn) -> Result<()>,
    ) -> Result<()> {
        self.space.make_room("a checkpoint")?;
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
        self.index
            .commit_checkpoint(&batch, datasets, upto, extra)?;
        let mut recent = self.recent.write();
        for (id, loc) in batch {
            if recent.get(&id) == Some(&loc) {
                recent.remove(&id);
            }
        }
        Ok(())
    }

    /// Commits dataset records (and `extra` writes) without indexing the blocks appended since
    /// the last checkpoint and without moving `indexed_upto`/`replay_start`: after syncing the
    /// log, the records' trees are durable, and recovery still scans from before every
    /// unindexed block and every older replay position. Cheap: for snapshots.
    pub fn commit_roots_with(
        &self,
        datasets: &[DatasetRecord],
        extra: impl FnOnce(&CatalogTxn) -> Result<()>,
    ) -> Result<()> {
        self.sync_all()?;
        self.index.commit_records(datasets, extra)
    }

    /// Number of blocks appended since the last checkpoint (drives checkpoint frequency).
    /// Fills the writers' filter of known ids from one pass over the index (run in the
    /// background after open; until it ends every write asks the index, as without it).
    pub fn fill_seen(&self) -> Result<()> {
        let t = std::time::Instant::now();
        let mut n = 0u64;
        self.index.each_block(|id, _| {
            self.seen.add(id);
            n += 1;
            Ok(())
        })?;
        self.seen.set_ready();
        tracing::debug!(
            blocks = n,
            ms = t.elapsed().as_millis() as u64,
            "the filter of known blocks is ready"
        );
        Ok(())
    }

    pub fn recent_blocks(&self) -> usize {
        self.recent.read().len()
    }

    /// Runs `f` with permission to use the space reserve (checkpoints, snapshots, GC copies);
    /// on a full filesystem, ballast is given up first.
    pub fn with_reserve<R>(&self, f: impl FnOnce() -> R) -> R {
        self.space.with_reserve(f)
    }

    /// Free and total bytes of the filesystem under the store.
    pub fn statvfs(&self) -> Result<(u64, u64)> {
        self.space.statvfs()
    }

    /// Free space, the reserve, and whether writers are refused.
    pub fn space_report(&self) -> Result<SpaceReport> {
        self.space.report()
    }

    /// The fault `source status`, `vdb status` and `vdbfs status` show while writers are
    /// refused, with the numbers, or None.
    pub fn full_fault(&self) -> Option<String> {
        let r = self.space.report().ok()?;
        if !r.full {
            return None;
        }
        let mib = |b: u64| format!("{:.1} MiB", b as f64 / (1 << 20) as f64);
        let packs = self.physical_bytes().map_or("?".to_string(), mib);
        Some(format!(
            "store full: {} free of {} on the filesystem of {} (its packs hold {packs}; {} held \
             back as the store's reserve for checkpoints, gc and deletes, writes stop {} before \
             it); writes to datasets fail with ENOSPC. Free space with 'vdbfs dataset delete', \
             'vdbfs snapshot delete' or 'vdbfs vdb delete', then 'vdbfs gc' ('vdbfs df' shows \
             what each holds), or grow the filesystem",
            mib(r.free),
            mib(r.total),
            self.dir.display(),
            mib(r.reserve_held),
            mib(r.margin),
        ))
    }

    /// Grows the reserve back when there is room (the daemon calls it periodically).
    pub fn refill_reserve(&self) -> Result<u64> {
        self.space.refill()
    }

    /// The room the store's own work may use now (free space plus the reserve).
    pub fn room(&self) -> Result<u64> {
        self.space.room()
    }

    /// Gives up reserve so that `need` bytes are free, if it can (before a compaction copy).
    pub fn make_room_for(&self, need: u64, what: &str) -> Result<()> {
        self.space.make_room_for(need, what)
    }

    /// Starts an index write transaction, after making room on a full filesystem.
    pub(in crate::store) fn begin_write(&self) -> Result<redb::WriteTransaction> {
        self.space.make_room("an index write")?;
        Ok(self.index.db().begin_write()?)
    }

    /// Whether a block can be read (indexed, or found in the log since the last checkpoint).
    pub fn contains_block(&self, id: &BlockId) -> Result<bool> {
        Ok(self.lookup_many(std::slice::from_ref(id))?[0].is_some())
    }

    /// A value of the `meta` table that is not one of the store's own positions (e.g.
    /// `last_scrub`).
    pub fn meta_get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        use redb::ReadableDatabase;
        let txn = self.index.db().begin_read()?;
        let v = txn.open_table(META)?.get(key)?.map(|v| v.value().to_vec());
        Ok(v)
    }

    /// Sets a value of the `meta` table (one durable transaction).
    pub fn meta_put(&self, key: &str, value: &[u8]) -> Result<()> {
        let txn = self.begin_write()?;
        txn.open_table(META)?.insert(key, value)?;
        txn.commit()?;
        Ok(())
    }

    /// The `meta` entries whose keys start with `prefix`, in key order.
    pub fn meta_scan(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>> {
        use redb::ReadableDatabase;
        let txn = self.index.db().begin_read()?;
        let t = txn.open_table(META)?;
        let mut out = Vec::new();
        for row in t.range(prefix..)? {
            let (k, v) = row?;
            let k = k.value();
            if !k.starts_with(prefix) {
                break;
            }
            out.push((k.to_string(), v.value().to_vec()));
        }
        Ok(out)
    }

    /// Removes `meta` entries (one durable transaction).
    pub fn meta_remove(&self, keys: &[&str]) -> Result<()> {
        let txn = self.begin_write()?;
        {
            let mut t = txn.open_table(META)?;
            for k in keys {
                t.remove(*k)?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// The damage marks of every dataset (table `damaged`).
    pub fn damage_marks(&self) -> Result<Vec<(u64, DamageMark)>> {
        self.index.damage_marks()
    }
}

/// Entries of a directory that would make it "not empty" for `vdbfs init` (a filesystem's own
/// `lost+found` does not count).
pub fn foreign_entries(dir: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let name = e?.file_name().to_string_lossy().into_owned();
        if name != "lost+found" {
            out.push(name);
        }
    }
    out.sort();
    Ok(out)
}

thread_local! {
    /// Each thread's aligned buffer for the records a read brings in (reused, never shrunk).
    static SCRATCH: std::cell::RefCell<io::AlignedBuf> =
        std::cell::RefCell::new(io::AlignedBuf::default());
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
fn open_block_record(
    id: &BlockId,
    loc: &BlockLoc,
    format: RecordFormat,
    buf: &[u8],
) -> Result<Vec<u8>> {
    let (hdr, payload) =
        pack::decode_record(buf, format).map_err(|e| corrupt(id, loc, e.to_string()))?;
    if hdr.kind != RecordKind::Block || hdr.id != *id {
        return Err(corrupt(id, loc, "record holds another block".into()));
    }
    pack::open_block(&hdr, payload).map_err(|e| corrupt(id, loc, e.to_string()))
}

/// Verifies one block record fetched from the object store (`object` names it in errors) and
/// returns the block's content: the same checks as a local read (crc, kind, id, blake3).
pub fn open_remote_record(
    id: &BlockId,
    object: &str,
    format: RecordFormat,
    buf: &[u8],
) -> Result<Vec<u8>> {
    let bad = |why: String| Error::Remote {
        id: *id,
        object: object.to_string(),
        why,
    };
    let (hdr, payload) = pack::decode_record(buf, format).map_err(|e| bad(e.to_string()))?;
    if hdr.kind != RecordKind::Block || hdr.id != *id {
        return Err(bad("record holds another block".into()));
    }
    pack::open_block(&hdr, payload).map_err(|e| bad(e.to_string()))
}

/// The first guess window of a read (bytes after its first block), and the largest: a window
/// grows fourfold each time every block in it was where the guess put it.
const SPECULATE_FIRST: u64 = 64 << 10;
/// Reads of closed packs at least this long use direct I/O.
const DIRECT_READ_MIN: usize = 256 << 10;
const SPECULATE_MAX: u64 = 4 << 20;

/// Decodes the records at the start of `buf` (read from `run`) that are the blocks `ids` asks
/// for, in order, into `outs`; stops at the first record that is not the next block asked for
/// (or does not fit). Returns (blocks decoded, bytes used).
fn open_following(
    ids: &[BlockId],
    outs: &mut [&mut [u8]],
    run: &BlockLoc,
    format: RecordFormat,
    buf: &[u8],
) -> Result<(usize, usize)> {
    let hlen = format.header_len();
    let mut at = 0usize;
    let mut n = 0usize;
    while n < ids.len() {
        let len = match buf
            .get(at..at + hlen)
            .and_then(|h| pack::decode_record_header(h, format).ok())
        {
            Some(h) if h.kind == RecordKind::Block && h.id == ids[n] => h.record_len() as usize,
            _ => break,
        };
        let Some(rec) = buf.get(at..at + len) else {
            break;
        };
        let here = BlockLoc {
            pack: run.pack,
            offset: run.offset + at as u64,
            len: len as u32,
        };
        open_block_into(&ids[n], &here, format, rec, outs[n])?;
        at += len;
        n += 1;
    }
    Ok((n, at))
}

/// Verifies one block record (header fields against `id`, content hash) and decodes its content
/// into `out` (its first `out.len()` bytes; zeros past the block's end).
fn open_block_into(
    id: &BlockId,
    loc: &BlockLoc,
    format: RecordFormat,
    rec: &[u8],
    out: &mut [u8],
) -> Result<()> {
    let hlen = format.header_len();
    let hdr = pack::decode_record_header(rec.get(..hlen).unwrap_or_default(), format)
        .map_err(|e| corrupt(id, loc, e.to_string()))?;
    if hdr.kind != RecordKind::Block || hdr.id != *id || hdr.record_len() != rec.len() as u64 {
        return Err(corrupt(id, loc, "record holds another block".into()));
    }
    let payload = &rec[hlen..];
    let raw_len = hdr.raw_len as usize;
    let bad = |e: vdbfs_format::FormatError| corrupt(id, loc, e.to_string());
    if raw_len == out.len() {
        codec::decompress_into(hdr.codec, payload, out).map_err(bad)?;
        if BlockId::of(out) != *id {
            out.fill(0);
            return Err(corrupt(id, loc, "block content hash mismatch".into()));
        }
    } else {
        let content = pack::open_block(&hdr, payload).map_err(bad)?;
        let n = content.len().min(out.len());
        out[..n].copy_from_slice(&content[..n]);
        out[n..].fill(0);
    }
    Ok(())
}

#[cfg(test)]
mod tests;
