//! Tree objects: the immutable, content-addressed metadata of a dataset. See FORMAT.md, "Trees".
//!
//! A dataset's state is one root: an inode table. The inode table and each file's block map are
//! radix trees of [`Node`]s (256-way, keyed by u64: inode number or block index). A directory's
//! entries are one [`DirObject`]. Every object is stored as a block, so trees share structure and
//! deduplicate like data.

use crate::wire::{Reader, Writer};
use crate::{BlockId, FormatError};

pub const NODE_TAG: u8 = b'N';
pub const DIR_TAG: u8 = b'D';
pub const OBJECT_VERSION: u8 = 1;
pub const INODE_VERSION: u8 = 1;
/// Radix fan-out: 8 bits of the key per level.
pub const FANOUT_BITS: u32 = 8;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum FileKind {
    Regular = 1,
    Directory = 2,
    Symlink = 3,
    Fifo = 4,
    Socket = 5,
    CharDevice = 6,
    BlockDevice = 7,
}

impl FileKind {
    pub fn from_u8(v: u8) -> Result<FileKind, FormatError> {
        Ok(match v {
            1 => FileKind::Regular,
            2 => FileKind::Directory,
            3 => FileKind::Symlink,
            4 => FileKind::Fifo,
            5 => FileKind::Socket,
            6 => FileKind::CharDevice,
            7 => FileKind::BlockDevice,
            _ => return Err(FormatError::Invalid("file kind")),
        })
    }
}

/// Seconds and nanoseconds since the Unix epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, PartialOrd, Ord)]
pub struct Timestamp {
    pub secs: i64,
    pub nsecs: u32,
}

/// Attributes of an inode, as journaled and as stored in the inode table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InodeMeta {
    pub kind: FileKind,
    /// Permission bits including setuid/setgid/sticky (mode & 0o7777).
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub rdev: u32,
    pub size: u64,
    pub atime: Timestamp,
    pub mtime: Timestamp,
    pub ctime: Timestamp,
}

/// One inode-table entry: attributes plus where the content lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InodeRecord {
    pub meta: InodeMeta,
    /// Regular file: root of its block map (None = all holes). Directory: its [`DirObject`].
    pub root: Option<BlockId>,
    /// Symlink target (empty for other kinds).
    pub target: Vec<u8>,
}

pub(crate) fn put_meta(w: &mut Writer, m: &InodeMeta) {
    w.u8(m.kind as u8);
    w.u32(m.perm);
    w.u32(m.uid);
    w.u32(m.gid);
    w.u32(m.nlink);
    w.u32(m.rdev);
    w.u64(m.size);
    for t in [m.atime, m.mtime, m.ctime] {
        w.i64(t.secs);
        w.u32(t.nsecs);
    }
}

pub(crate) fn get_meta(r: &mut Reader<'_>) -> Result<InodeMeta, FormatError> {
    let kind = FileKind::from_u8(r.u8()?)?;
    let perm = r.u32()?;
    if perm > 0o7777 {
        return Err(FormatError::Invalid("inode permission bits"));
    }
    let (uid, gid, nlink, rdev, size) = (r.u32()?, r.u32()?, r.u32()?, r.u32()?, r.u64()?);
    let mut ts = [Timestamp::default(); 3];
    for t in &mut ts {
        t.secs = r.i64()?;
        t.nsecs = r.u32()?;
        if t.nsecs >= 1_000_000_000 {
            return Err(FormatError::Invalid("timestamp nanoseconds"));
        }
    }
    Ok(InodeMeta {
        kind,
        perm,
        uid,
        gid,
        nlink,
        rdev,
        size,
        atime: ts[0],
        mtime: ts[1],
        ctime: ts[2],
    })
}

pub(crate) fn put_opt_id(w: &mut Writer, id: &Option<BlockId>) {
    match id {
        None => w.u8(0),
        Some(id) => {
            w.u8(1);
            w.bytes(&id.0);
        }
    }
}

pub(crate) fn get_opt_id(r: &mut Reader<'_>) -> Result<Option<BlockId>, FormatError> {
    match r.u8()? {
        0 => Ok(None),
        1 => Ok(Some(r.id()?)),
        _ => Err(FormatError::Invalid("optional id tag")),
    }
}

impl InodeRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.u8(INODE_VERSION);
        put_meta(&mut w, &self.meta);
        put_opt_id(&mut w, &self.root);
        w.blob(&self.target);
        w.buf
    }
    pub fn decode(buf: &[u8]) -> Result<InodeRecord, FormatError> {
        let mut r = Reader::new(buf, "inode record");
        if r.u8()? != INODE_VERSION {
            return Err(FormatError::Invalid("inode record version"));
        }
        let meta = get_meta(&mut r)?;
        let root = get_opt_id(&mut r)?;
        let target = r.blob()?.to_vec();
        r.finish()?;
        Ok(InodeRecord { meta, root, target })
    }
}

/// A radix-tree node. Level 0 holds values (encoded inode records, or 32-byte block ids);
/// higher levels hold 32-byte ids of child nodes. Entries are sorted by slot, slots unique.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Node {
    pub level: u8,
    pub entries: Vec<(u8, Vec<u8>)>,
}

impl Node {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.u8(NODE_TAG);
        w.u8(OBJECT_VERSION);
        w.u8(self.level);
        w.u16(self.entries.len() as u16);
        for (slot, v) in &self.entries {
            w.u8(*slot);
            w.blob(v);
        }
        w.buf
    }
    pub fn decode(buf: &[u8]) -> Result<Node, FormatError> {
        let mut r = Reader::new(buf, "tree node");
        if r.u8()? != NODE_TAG {
            return Err(FormatError::BadMagic("tree node"));
        }
        if r.u8()? != OBJECT_VERSION {
            return Err(FormatError::Invalid("tree node version"));
        }
        let level = r.u8()?;
        if level > 8 {
            return Err(FormatError::Invalid("tree node level"));
        }
        let n = r.u16()? as usize;
        if n > 256 {
            return Err(FormatError::Invalid("tree node entry count"));
        }
        let mut entries = Vec::with_capacity(n);
        for _ in 0..n {
            let slot = r.u8()?;
            if let Some((prev, _)) = entries.last() {
                if *prev >= slot {
                    return Err(FormatError::Invalid("tree node slot order"));
                }
            }
            let v = r.blob()?.to_vec();
            if level > 0 && v.len() != 32 {
                return Err(FormatError::Invalid("tree node child id"));
            }
            entries.push((slot, v));
        }
        r.finish()?;
        Ok(Node { level, entries })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    pub name: Vec<u8>,
    pub ino: u64,
    pub kind: FileKind,
}

/// All entries of one directory, sorted by name, names unique, without "." and "..".
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct DirObject {
    pub entries: Vec<DirEntry>,
}

impl DirObject {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.u8(DIR_TAG);
        w.u8(OBJECT_VERSION);
        w.u32(self.entries.len() as u32);
        for e in &self.entries {
            w.u16(e.name.len() as u16);
            w.bytes(&e.name);
            w.u64(e.ino);
            w.u8(e.kind as u8);
        }
        w.buf
    }
    pub fn decode(buf: &[u8]) -> Result<DirObject, FormatError> {
        let mut r = Reader::new(buf, "directory object");
        if r.u8()? != DIR_TAG {
            return Err(FormatError::BadMagic("directory object"));
        }
        if r.u8()? != OBJECT_VERSION {
            return Err(FormatError::Invalid("directory object version"));
        }
        let n = r.u32()? as usize;
        let mut entries: Vec<DirEntry> = Vec::with_capacity(n.min(1 << 16));
        for _ in 0..n {
            let len = r.u16()? as usize;
            let name = r.take(len)?.to_vec();
            if name.is_empty() || name.contains(&b'/') || name.contains(&0) {
                return Err(FormatError::Invalid("directory entry name"));
            }
            if let Some(prev) = entries.last() {
                if prev.name >= name {
                    return Err(FormatError::Invalid("directory entry order"));
                }
            }
            let ino = r.u64()?;
            let kind = FileKind::from_u8(r.u8()?)?;
            entries.push(DirEntry { name, ino, kind });
        }
        r.finish()?;
        Ok(DirObject { entries })
    }
}
