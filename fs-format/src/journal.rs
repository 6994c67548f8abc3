//! Journal records: the metadata changes of one dataset made durable by an fsync, appended to the
//! pack log after the data blocks they reference. See FORMAT.md, "Journal".
//!
//! Every op sets state (it never says "add" or "subtract"), so replaying a record whose effect is
//! already in the checkpointed tree is harmless.

use crate::tree::{get_meta, put_meta, FileKind, InodeMeta};
use crate::wire::{Reader, Writer};
use crate::{BlockId, FormatError};

pub const JOURNAL_VERSION: u8 = 1;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JournalOp {
    /// Create or update an inode's attributes.
    Inode { ino: u64, meta: InodeMeta },
    /// A symlink's target (set once, at creation).
    Symlink { ino: u64, target: Vec<u8> },
    /// Block map changes of a file: blocks of the checkpointed map at index >= `base_limit` are
    /// dropped (truncation), then each entry sets one block (None = hole).
    FileBlocks {
        ino: u64,
        base_limit: u64,
        entries: Vec<(u64, Option<BlockId>)>,
    },
    /// A directory entry now names `target`, or nothing.
    DirEntry {
        dir: u64,
        name: Vec<u8>,
        target: Option<(u64, FileKind)>,
    },
    /// The inode is gone (no links, and no longer durable).
    Remove { ino: u64 },
    /// The next inode number to hand out.
    NextIno { next: u64 },
    /// Last op of a record whose group continues in the next record of the same dataset: the
    /// ops of a group are applied all together or, when a later part is missing, not at all.
    Continued,
}

/// Journal records are cut so that none exceeds this many encoded bytes (well under the pack's
/// `MAX_PAYLOAD`).
pub const JOURNAL_RECORD_TARGET: usize = 4 << 20;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JournalRecord {
    pub dataset: u64,
    pub ops: Vec<JournalOp>,
}

/// Splits one group of ops into records of at most about `JOURNAL_RECORD_TARGET` bytes; every
/// record but the last ends with `Continued`. Large `FileBlocks` ops are cut too (the
/// truncation they carry stays with the first part).
pub fn split_group(dataset: u64, ops: Vec<JournalOp>) -> Vec<JournalRecord> {
    const ENTRY: usize = 8 + 33;
    let max_entries = JOURNAL_RECORD_TARGET / 2 / ENTRY;
    let mut pieces = Vec::with_capacity(ops.len());
    for op in ops {
        match op {
            JournalOp::FileBlocks {
                ino,
                base_limit,
                entries,
            } if entries.len() > max_entries => {
                for (i, chunk) in entries.chunks(max_entries).enumerate() {
                    pieces.push(JournalOp::FileBlocks {
                        ino,
                        base_limit: if i == 0 { base_limit } else { u64::MAX },
                        entries: chunk.to_vec(),
                    });
                }
            }
            op => pieces.push(op),
        }
    }
    let mut out = Vec::new();
    let mut cur = Vec::new();
    let mut size = 0usize;
    for op in pieces {
        let n = match &op {
            JournalOp::FileBlocks { entries, .. } => 32 + entries.len() * ENTRY,
            JournalOp::Symlink { target, .. } => 16 + target.len(),
            JournalOp::DirEntry { name, .. } => 24 + name.len(),
            _ => 96,
        };
        if size + n > JOURNAL_RECORD_TARGET && !cur.is_empty() {
            cur.push(JournalOp::Continued);
            out.push(JournalRecord {
                dataset,
                ops: std::mem::take(&mut cur),
            });
            size = 0;
        }
        size += n;
        cur.push(op);
    }
    out.push(JournalRecord { dataset, ops: cur });
    out
}

impl JournalRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.u8(JOURNAL_VERSION);
        w.u64(self.dataset);
        w.u32(self.ops.len() as u32);
        for op in &self.ops {
            match op {
                JournalOp::Inode { ino, meta } => {
                    w.u8(1);
                    w.u64(*ino);
                    put_meta(&mut w, meta);
                }
                JournalOp::Symlink { ino, target } => {
                    w.u8(2);
                    w.u64(*ino);
                    w.blob(target);
                }
                JournalOp::FileBlocks {
                    ino,
                    base_limit,
                    entries,
                } => {
                    w.u8(3);
                    w.u64(*ino);
                    w.u64(*base_limit);
                    w.u32(entries.len() as u32);
                    for (idx, id) in entries {
                        w.u64(*idx);
                        crate::tree::put_opt_id(&mut w, id);
                    }
                }
                JournalOp::DirEntry { dir, name, target } => {
                    w.u8(4);
                    w.u64(*dir);
                    w.blob(name);
                    match target {
                        None => w.u8(0),
                        Some((ino, kind)) => {
                            w.u8(*kind as u8);
                            w.u64(*ino);
                        }
                    }
                }
                JournalOp::Remove { ino } => {
                    w.u8(5);
                    w.u64(*ino);
                }
                JournalOp::NextIno { next } => {
                    w.u8(6);
                    w.u64(*next);
                }
                JournalOp::Continued => w.u8(7),
            }
        }
        w.buf
    }

    pub fn decode(buf: &[u8]) -> Result<JournalRecord, FormatError> {
        let mut r = Reader::new(buf, "journal record");
        if r.u8()? != JOURNAL_VERSION {
            return Err(FormatError::Invalid("journal record version"));
        }
        let dataset = r.u64()?;
        let n = r.u32()? as usize;
        let mut ops = Vec::with_capacity(n.min(4096));
        for _ in 0..n {
            let op = match r.u8()? {
                1 => JournalOp::Inode {
                    ino: r.u64()?,
                    meta: get_meta(&mut r)?,
                },
                2 => JournalOp::Symlink {
                    ino: r.u64()?,
                    target: r.blob()?.to_vec(),
                },
                3 => {
                    let ino = r.u64()?;
                    let base_limit = r.u64()?;
                    let m = r.u32()? as usize;
                    let mut entries = Vec::with_capacity(m.min(1 << 16));
                    for _ in 0..m {
                        entries.push((r.u64()?, crate::tree::get_opt_id(&mut r)?));
                    }
                    JournalOp::FileBlocks {
                        ino,
                        base_limit,
                        entries,
                    }
                }
                4 => {
                    let dir = r.u64()?;
                    let name = r.blob()?.to_vec();
                    let target = match r.u8()? {
                        0 => None,
                        k => Some((r.u64()?, FileKind::from_u8(k)?)),
                    };
                    JournalOp::DirEntry { dir, name, target }
                }
                5 => JournalOp::Remove { ino: r.u64()? },
                6 => JournalOp::NextIno { next: r.u64()? },
                7 => JournalOp::Continued,
                _ => return Err(FormatError::Invalid("journal op tag")),
            };
            ops.push(op);
        }
        r.finish()?;
        Ok(JournalRecord { dataset, ops })
    }
}
