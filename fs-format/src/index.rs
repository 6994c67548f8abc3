//! Values stored in the redb index (`index.redb`). See FORMAT.md, "Index".

use crate::tree::{get_opt_id, put_opt_id, Timestamp};
use crate::wire::{Reader, Writer};
use crate::{BlockId, FormatError};

pub const INDEX_VERSION: u32 = 1;
pub const DATASET_RECORD_VERSION: u8 = 1;

/// Where a block's record lives: pack number, byte offset of the record, record length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockLoc {
    pub pack: u32,
    pub offset: u64,
    pub len: u32,
}

impl BlockLoc {
    pub fn encode(&self) -> [u8; 16] {
        let mut out = [0u8; 16];
        out[..4].copy_from_slice(&self.pack.to_le_bytes());
        out[4..12].copy_from_slice(&self.offset.to_le_bytes());
        out[12..].copy_from_slice(&self.len.to_le_bytes());
        out
    }
    pub fn decode(buf: &[u8]) -> Result<BlockLoc, FormatError> {
        let mut r = Reader::new(buf, "block location");
        let loc = BlockLoc {
            pack: r.u32()?,
            offset: r.u64()?,
            len: r.u32()?,
        };
        r.finish()?;
        Ok(loc)
    }
}

/// A position in the pack log: (pack number, byte offset). Ordered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct LogPos {
    pub pack: u32,
    pub offset: u64,
}

impl LogPos {
    /// `pack u32 | offset u64`, 12 bytes (the values of `meta.indexed_upto` and
    /// `meta.replay_start`).
    pub fn encode(&self) -> [u8; 12] {
        let mut out = [0u8; 12];
        out[..4].copy_from_slice(&self.pack.to_le_bytes());
        out[4..].copy_from_slice(&self.offset.to_le_bytes());
        out
    }
    pub fn decode(buf: &[u8]) -> Result<LogPos, FormatError> {
        let mut r = Reader::new(buf, "log position");
        let pos = LogPos {
            pack: r.u32()?,
            offset: r.u64()?,
        };
        r.finish()?;
        Ok(pos)
    }
}

/// The `meta` entries that hold a number: `format_version` (u32) and `next_dataset_id` (u64),
/// little-endian, exactly their width.
pub mod meta {
    use crate::wire::Reader;
    use crate::FormatError;

    pub const FORMAT_VERSION: &str = "format_version";
    pub const NEXT_DATASET_ID: &str = "next_dataset_id";
    pub const INDEXED_UPTO: &str = "indexed_upto";
    pub const REPLAY_START: &str = "replay_start";

    pub fn encode_u32(v: u32) -> [u8; 4] {
        v.to_le_bytes()
    }
    pub fn decode_u32(buf: &[u8], what: &'static str) -> Result<u32, FormatError> {
        let mut r = Reader::new(buf, what);
        let v = r.u32()?;
        r.finish()?;
        Ok(v)
    }
    pub fn encode_u64(v: u64) -> [u8; 8] {
        v.to_le_bytes()
    }
    pub fn decode_u64(buf: &[u8], what: &'static str) -> Result<u64, FormatError> {
        let mut r = Reader::new(buf, what);
        let v = r.u64()?;
        r.finish()?;
        Ok(v)
    }
}

/// A dataset as committed at the last checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DatasetRecord {
    pub id: u64,
    pub name: String,
    pub created: Timestamp,
    /// Root of the inode table (None only before the first checkpoint of an empty dataset).
    pub root: Option<BlockId>,
    pub next_ino: u64,
    /// Journal records of this dataset at or after this position are not yet in `root`:
    /// recovery replays them.
    pub replay_from: LogPos,
}

impl DatasetRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.u8(DATASET_RECORD_VERSION);
        w.u64(self.id);
        w.blob(self.name.as_bytes());
        w.i64(self.created.secs);
        w.u32(self.created.nsecs);
        put_opt_id(&mut w, &self.root);
        w.u64(self.next_ino);
        w.u32(self.replay_from.pack);
        w.u64(self.replay_from.offset);
        w.buf
    }
    pub fn decode(buf: &[u8]) -> Result<DatasetRecord, FormatError> {
        let mut r = Reader::new(buf, "dataset record");
        if r.u8()? != DATASET_RECORD_VERSION {
            return Err(FormatError::Invalid("dataset record version"));
        }
        let id = r.u64()?;
        let name = String::from_utf8(r.blob()?.to_vec())
            .map_err(|_| FormatError::Invalid("dataset name"))?;
        let created = Timestamp {
            secs: r.i64()?,
            nsecs: r.u32()?,
        };
        let root = get_opt_id(&mut r)?;
        let next_ino = r.u64()?;
        let replay_from = LogPos {
            pack: r.u32()?,
            offset: r.u64()?,
        };
        r.finish()?;
        Ok(DatasetRecord {
            id,
            name,
            created,
            root,
            next_ino,
            replay_from,
        })
    }
}

pub const SNAPSHOT_RECORD_VERSION: u8 = 1;

/// An immutable snapshot of a dataset: the root of its inode table at one instant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotRecord {
    /// Id of the dataset it was taken of.
    pub dataset: u64,
    pub name: String,
    pub created: Timestamp,
    pub root: Option<BlockId>,
    pub next_ino: u64,
}

impl SnapshotRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.u8(SNAPSHOT_RECORD_VERSION);
        w.u64(self.dataset);
        w.blob(self.name.as_bytes());
        w.i64(self.created.secs);
        w.u32(self.created.nsecs);
        put_opt_id(&mut w, &self.root);
        w.u64(self.next_ino);
        w.buf
    }
    pub fn decode(buf: &[u8]) -> Result<SnapshotRecord, FormatError> {
        let mut r = Reader::new(buf, "snapshot record");
        if r.u8()? != SNAPSHOT_RECORD_VERSION {
            return Err(FormatError::Invalid("snapshot record version"));
        }
        let dataset = r.u64()?;
        let name = String::from_utf8(r.blob()?.to_vec())
            .map_err(|_| FormatError::Invalid("snapshot name"))?;
        let created = Timestamp {
            secs: r.i64()?,
            nsecs: r.u32()?,
        };
        let root = get_opt_id(&mut r)?;
        let next_ino = r.u64()?;
        r.finish()?;
        Ok(SnapshotRecord {
            dataset,
            name,
            created,
            root,
            next_ino,
        })
    }
}

/// Where a clone came from: the dataset id and snapshot name it was cloned from. Kept for
/// display only; a clone shares blocks, not records, with its origin, so deleting the origin
/// snapshot never breaks it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CloneOrigin {
    pub dataset: u64,
    pub snapshot: String,
}

impl CloneOrigin {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.u8(1);
        w.u64(self.dataset);
        w.blob(self.snapshot.as_bytes());
        w.buf
    }
    pub fn decode(buf: &[u8]) -> Result<CloneOrigin, FormatError> {
        let mut r = Reader::new(buf, "clone origin");
        if r.u8()? != 1 {
            return Err(FormatError::Invalid("clone origin version"));
        }
        let dataset = r.u64()?;
        let snapshot = String::from_utf8(r.blob()?.to_vec())
            .map_err(|_| FormatError::Invalid("clone origin snapshot name"))?;
        r.finish()?;
        Ok(CloneOrigin { dataset, snapshot })
    }
}

pub const DAMAGE_MARK_VERSION: u8 = 1;

/// What damaged log bytes cost a dataset (the value of the index table `damaged`, keyed by
/// dataset id and the position of the damage). See FORMAT.md, "Recovery".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum DamageKind {
    /// A block record is lost and the dataset's replayed journal references the block.
    Block = 1,
    /// A journal record of this dataset is unreadable.
    Journal = 2,
    /// Unreadable bytes whose header does not say what they held: they may have held a journal
    /// record of this dataset.
    Unknown = 3,
}

/// A dataset refused because recovery found acknowledged log bytes that no longer verify.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DamageMark {
    /// Where the damaged bytes start (the key's second part).
    pub at: LogPos,
    /// How many bytes are damaged.
    pub len: u64,
    pub kind: DamageKind,
    /// The lost block (kind `Block`).
    pub block: Option<BlockId>,
    /// When recovery found it.
    pub found: Timestamp,
}

impl DamageMark {
    /// The value stored under the key `(dataset, at.pack, at.offset)`.
    pub fn encode_value(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.u8(DAMAGE_MARK_VERSION);
        w.u64(self.len);
        w.u8(self.kind as u8);
        put_opt_id(&mut w, &self.block);
        w.i64(self.found.secs);
        w.u32(self.found.nsecs);
        w.buf
    }
    /// Decodes a value stored under the key whose position is `at`.
    pub fn decode_value(at: LogPos, buf: &[u8]) -> Result<DamageMark, FormatError> {
        let mut r = Reader::new(buf, "damage mark");
        if r.u8()? != DAMAGE_MARK_VERSION {
            return Err(FormatError::Invalid("damage mark version"));
        }
        let len = r.u64()?;
        let kind = match r.u8()? {
            1 => DamageKind::Block,
            2 => DamageKind::Journal,
            3 => DamageKind::Unknown,
            _ => return Err(FormatError::Invalid("damage kind")),
        };
        let block = get_opt_id(&mut r)?;
        let found = Timestamp {
            secs: r.i64()?,
            nsecs: r.u32()?,
        };
        if found.nsecs >= 1_000_000_000 {
            return Err(FormatError::Invalid("timestamp nanoseconds"));
        }
        r.finish()?;
        Ok(DamageMark {
            at,
            len,
            kind,
            block,
            found,
        })
    }
}
