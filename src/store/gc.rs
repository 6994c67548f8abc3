//! The store side of garbage collection (the mark phase is in `tree`).
//!
//! Invariants:
//! - A collection starts (under the exclusive `dedup_guard`, which writers hold from their dedup
//!   decision until the reference is installed) by recording `gc_start`, the log end. Until it
//!   ends, `put` deduplicates only against blocks appended after `gc_start`, so every reference
//!   created during the collection points at such a block, and the sweep never removes those.
//!   Everything referenced before is in the trees the collector checkpoints and marks.
//! - The sweep runs under `gc_guard` (readers resolve ids under its read side), and a pack file
//!   is deleted only after every live record in it was copied and the copies committed.

use super::{corrupt, open_block_record, pack_path, Pack, Result, Store};
use std::sync::atomic::Ordering;
use vdbfs_format::index::{BlockLoc, LogPos};
use vdbfs_format::pack::{self, RecordFormat};
use vdbfs_format::BlockId;

impl Store {
    /// Starts or ends a collection (see the module invariants).
    pub fn set_gc_active(&self, on: bool) {
        let _w = self.dedup_guard.write();
        *self.gc_start.lock() = self.end();
        self.gc_active.store(on, Ordering::SeqCst);
    }

    /// Whether `put` may reuse a block: during a collection only blocks appended after it began.
    pub(super) fn reusable(&self, loc: Option<BlockLoc>) -> bool {
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
        self.index.blocks()
    }

    /// Number of indexed blocks.
    pub fn indexed_count(&self) -> Result<u64> {
        self.index.block_count()
    }

    /// Calls `f` with every indexed block and its location (streaming; see `Index::each_block`).
    pub fn each_indexed_block(
        &self,
        f: impl FnMut(&BlockId, &BlockLoc) -> Result<()>,
    ) -> Result<()> {
        self.index.each_block(f)
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
            let (bn, bb) = self.index.remove_unless(batch, |id, loc| {
                // Waiting in `recent`, or a copy made during this collection.
                recent.contains_key(id)
                    || LogPos {
                        pack: loc.pack,
                        offset: loc.offset,
                    } >= start
            })?;
            n += bn;
            bytes += bb;
        }
        // Made durable by the next checkpoint's commit; losing it to a crash only leaves
        // garbage that the next collection finds again.
        Ok((n, bytes))
    }

    /// Pack numbers that may be rewritten: closed, and wholly before what recovery replays.
    pub fn closed_packs(&self) -> Result<Vec<u32>> {
        let start = self.index.replay_start()?;
        let active = self.log.active();
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
            Some(p) => Ok(p.file.len()?),
            None => Ok(0),
        }
    }

    /// Closes the active pack if it holds more than `min` bytes, so that a collection can
    /// rewrite it.
    pub fn roll_if_larger(&self, min: u64) -> Result<()> {
        self.log.roll_if_larger(min, &mut |no, file| {
            self.packs.write().insert(
                no,
                Pack {
                    file,
                    format: RecordFormat::V2,
                },
            );
        })
    }

    /// Copies a live record to the log end (compaction); the copy is indexed at the next
    /// checkpoint and read from its new place at once. Records of old formats are rewritten in
    /// the current one (same id, codec and payload).
    pub fn relocate(&self, id: &BlockId, loc: &BlockLoc) -> Result<()> {
        if self.recent.read().contains_key(id) {
            return Ok(());
        }
        let mut buf = vec![0u8; loc.len as usize];
        let format = self.read_at(id, loc, &mut buf)?;
        open_block_record(id, loc, format, &buf)?;
        let (hdr, payload) = pack::decode_record(&buf, format)?;
        let rec = pack::encode_record(
            pack::RecordKind::Block,
            hdr.codec,
            hdr.raw_len,
            id,
            payload,
            self.log.durable(),
        );
        let new = self.append(&[&rec])?;
        if new.len != rec.len() as u32 {
            return Err(corrupt(id, loc, "relocated record length".into()));
        }
        self.seen.add(id);
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
}
