//! A dataset's live state: the inode/tree layer between FUSE operations and the block store.
//!
//! Invariants:
//! - `root` is the inode table as of the last checkpoint; everything changed since lives in
//!   memory (`inodes`, file overlays, directory maps) and is marked in `dirty`.
//! - Everything changed since the last journal record is marked in the `j*` sets; `fsync`
//!   turns exactly that into one journal record, so replaying all records after `replay_from`
//!   on top of `root` rebuilds every fsynced state.
//! - Bytes of a file's last block beyond its size are zero (truncate rewrites that block), so a
//!   read-modify-write never resurrects old data.
//! - An inode whose link count drops to 0 is journaled as removed at once; while handles are
//!   open it lives on in memory only (`removed` guards it from being journaled again). Once its
//!   last handle is closed its attributes stay as a tombstone until the kernel forgets the inode:
//!   with the writeback cache the kernel may still send its dirty pages and times, which are
//!   accepted and dropped (inode numbers are never reused, so a tombstone never hides a file).
//! - Lock order: an inode's `wlock` (serializes writes and truncates of one file) before `st`.
//! - A file's `stored` set, once computed (lazily, for `st_blocks`), says for every block index
//!   whether a block is stored there (not a hole), whatever the mix of base tree and overlay:
//!   every change of the overlay updates it, so its count stays exact without reading the map.
//!
//! Size: one type, `Dataset`, whose operations all share its locks and the overlay invariants
//! above; splitting its methods across files would spread those invariants without shortening
//! any path through them.

use crate::store::{Error, Result, Store};
use crate::tree::radix::{self, NodeCache};
use parking_lot::Mutex;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use vdbfs_format::index::{DatasetRecord, LogPos};
use vdbfs_format::journal::{split_group, JournalOp};
use vdbfs_format::tree::{DirEntry, DirObject, FileKind, InodeMeta, InodeRecord, Timestamp};
use vdbfs_format::{BlockId, BLOCK_SIZE};

pub const ROOT_INO: u64 = 1;
const BS: u64 = BLOCK_SIZE as u64;
/// Largest file size accepted (EFBIG beyond).
pub const MAX_FILE_SIZE: u64 = 1 << 50;
const NAME_MAX: usize = 255;

pub fn now() -> Timestamp {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    Timestamp {
        secs: d.as_secs() as i64,
        nsecs: d.subsec_nanos(),
    }
}

struct FileMap {
    base: Option<BlockId>,
    /// Blocks of `base` at or past this index are holes (truncated since the checkpoint).
    base_limit: u64,
    overlay: BTreeMap<u64, Option<BlockId>>,
    jchanged: BTreeSet<u64>,
    jtrunc: Option<u64>,
    /// Which block indexes hold a stored block; None until first asked for (`stored_blocks`).
    stored: Option<Stored>,
}

impl FileMap {
    fn new(base: Option<BlockId>) -> FileMap {
        FileMap {
            base,
            base_limit: u64::MAX,
            overlay: BTreeMap::new(),
            jchanged: BTreeSet::new(),
            jtrunc: None,
            stored: None,
        }
    }
}

/// A set of block indexes (the stored blocks of one file) with its size: bitmaps of 4096
/// indexes, allocated only where a file has blocks, so sparse files stay small.
#[derive(Default)]
struct Stored {
    chunks: HashMap<u64, Box<[u64; 64]>>,
    count: u64,
}

impl Stored {
    fn set(&mut self, idx: u64, stored: bool) {
        let (chunk, bit) = (idx >> 12, idx & 4095);
        let (word, mask) = ((bit / 64) as usize, 1u64 << (bit % 64));
        if stored {
            let c = self
                .chunks
                .entry(chunk)
                .or_insert_with(|| Box::new([0; 64]));
            if c[word] & mask == 0 {
                c[word] |= mask;
                self.count += 1;
            }
        } else if let Some(c) = self.chunks.get_mut(&chunk) {
            if c[word] & mask != 0 {
                c[word] &= !mask;
                self.count -= 1;
            }
        }
    }

    /// Drops every index at or past `n`.
    fn truncate(&mut self, n: u64) {
        let count = &mut self.count;
        self.chunks.retain(|&chunk, c| {
            let first = chunk << 12;
            if first >= n {
                *count -= c.iter().map(|w| w.count_ones() as u64).sum::<u64>();
                return false;
            }
            for idx in n.max(first)..first + 4096 {
                let bit = idx & 4095;
                let (word, mask) = ((bit / 64) as usize, 1u64 << (bit % 64));
                if c[word] & mask != 0 {
                    c[word] &= !mask;
                    *count -= 1;
                }
            }
            true
        });
    }
}

struct DirState {
    entries: BTreeMap<Vec<u8>, (u64, FileKind)>,
    changed: bool,
    jchanged: BTreeSet<Vec<u8>>,
}

enum Content {
    File(FileMap),
    Dir(DirState),
    Symlink(Vec<u8>),
    Special,
}

struct Inode {
    meta: InodeMeta,
    content: Content,
    open: u32,
    wlock: Arc<Mutex<()>>,
}

impl Inode {
    fn new(meta: InodeMeta, content: Content) -> Inode {
        Inode {
            meta,
            content,
            open: 0,
            wlock: Arc::new(Mutex::new(())),
        }
    }
    fn empty_content(kind: FileKind) -> Content {
        match kind {
            FileKind::Regular => Content::File(FileMap::new(None)),
            FileKind::Directory => Content::Dir(DirState {
                entries: BTreeMap::new(),
                changed: true,
                jchanged: BTreeSet::new(),
            }),
            FileKind::Symlink => Content::Symlink(Vec::new()),
            _ => Content::Special,
        }
    }
}

struct State {
    root: Option<BlockId>,
    next_ino: u64,
    inodes: HashMap<u64, Inode>,
    removed: HashSet<u64>,
    dirty: BTreeSet<u64>,
    jdirty: BTreeSet<u64>,
    jremoved: BTreeSet<u64>,
    jnext_ino: bool,
    journal_end: LogPos,
    /// Removed inodes no longer open, until the kernel forgets them (see the module docs).
    tombstones: HashMap<u64, InodeMeta>,
}

/// Attributes changed by `setattr`.
#[derive(Default, Debug)]
pub struct SetAttr {
    pub perm: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<Timestamp>,
    pub mtime: Option<Timestamp>,
}

/// Pushes what the kernel still caches for a mounted dataset into it (see `fs`).
pub type CacheFlush = Arc<dyn Fn() -> std::io::Result<()> + Send + Sync>;

pub struct Dataset {
    pub id: u64,
    pub name: String,
    pub created: Timestamp,
    store: Arc<Store>,
    cache: Arc<NodeCache>,
    st: Mutex<State>,
    /// Set while the dataset is mounted: flushes the kernel's dirty pages of the mount.
    cache_flush: Mutex<Option<CacheFlush>>,
}

struct Ctx<'a> {
    store: &'a Store,
    cache: &'a NodeCache,
}

impl State {
    fn inode(&mut self, cx: &Ctx, ino: u64) -> Result<&mut Inode> {
        if !self.inodes.contains_key(&ino) {
            if self.removed.contains(&ino) {
                return Err(Error::NotFound);
            }
            let bytes = radix::get(cx.store, cx.cache, self.root, ino)?.ok_or(Error::NotFound)?;
            let rec = InodeRecord::decode(&bytes)?;
            let content = match rec.meta.kind {
                FileKind::Regular => Content::File(FileMap::new(rec.root)),
                FileKind::Directory => {
                    let dir = match rec.root {
                        Some(id) => DirObject::decode(&cx.store.get(&id)?)?,
                        None => DirObject::default(),
                    };
                    Content::Dir(DirState {
                        entries: dir
                            .entries
                            .into_iter()
                            .map(|e| (e.name, (e.ino, e.kind)))
                            .collect(),
                        changed: false,
                        jchanged: BTreeSet::new(),
                    })
                }
                FileKind::Symlink => Content::Symlink(rec.target),
                _ => Content::Special,
            };
            self.inodes.insert(ino, Inode::new(rec.meta, content));
        }
        self.inodes.get_mut(&ino).ok_or(Error::NotFound)
    }

    fn touch(&mut self, ino: u64) {
        if !self.removed.contains(&ino) {
            self.dirty.insert(ino);
            self.jdirty.insert(ino);
        }
    }

    fn dir(&mut self, cx: &Ctx, ino: u64) -> Result<&mut DirState> {
        match &mut self.inode(cx, ino)?.content {
            Content::Dir(d) => Ok(d),
            _ => Err(Error::NotDir),
        }
    }

    fn set_entry(
        &mut self,
        cx: &Ctx,
        dir: u64,
        name: &[u8],
        target: Option<(u64, FileKind)>,
    ) -> Result<()> {
        let t = now();
        let d = self.dir(cx, dir)?;
        match target {
            Some(t) => d.entries.insert(name.to_vec(), t),
            None => d.entries.remove(name),
        };
        d.changed = true;
        d.jchanged.insert(name.to_vec());
        let m = &mut self.inode(cx, dir)?.meta;
        m.mtime = t;
        m.ctime = t;
        self.touch(dir);
        Ok(())
    }

    fn add_nlink(&mut self, cx: &Ctx, ino: u64, delta: i32) -> Result<()> {
        let t = now();
        let m = &mut self.inode(cx, ino)?.meta;
        m.nlink = (m.nlink as i64 + delta as i64).max(0) as u32;
        m.ctime = t;
        let gone = m.nlink == 0 && m.kind != FileKind::Directory;
        self.touch(ino);
        if gone {
            self.remove_inode(ino);
        }
        Ok(())
    }

    fn remove_inode(&mut self, ino: u64) {
        self.removed.insert(ino);
        self.jremoved.insert(ino);
        self.jdirty.remove(&ino);
        self.dirty.insert(ino);
        if let Some(i) = self.inodes.get_mut(&ino) {
            i.meta.nlink = 0;
            if i.open == 0 {
                if let Some(i) = self.inodes.remove(&ino) {
                    self.tombstones.insert(ino, i.meta);
                }
            }
        }
    }

    /// A new inode named `name` in `parent` (which has no such entry).
    #[allow(clippy::too_many_arguments)]
    fn create(
        &mut self,
        cx: &Ctx,
        parent: u64,
        name: &[u8],
        kind: FileKind,
        perm: u32,
        (uid, gid): (u32, u32),
        rdev: u32,
        target: Option<&[u8]>,
    ) -> Result<(u64, InodeMeta)> {
        let pmeta = self.inode(cx, parent)?.meta.clone();
        let mut perm = perm & 0o7777;
        let mut gid = gid;
        if pmeta.perm & 0o2000 != 0 {
            // BSD group semantics of a setgid directory, as Linux filesystems do.
            gid = pmeta.gid;
            if kind == FileKind::Directory {
                perm |= 0o2000;
            }
        }
        let t = now();
        let ino = self.next_ino;
        self.next_ino += 1;
        self.jnext_ino = true;
        let meta = InodeMeta {
            kind,
            perm,
            uid,
            gid,
            nlink: if kind == FileKind::Directory { 2 } else { 1 },
            rdev,
            size: target.map_or(0, |t| t.len() as u64),
            atime: t,
            mtime: t,
            ctime: t,
        };
        let content = match target {
            Some(t) => Content::Symlink(t.to_vec()),
            None => Inode::empty_content(kind),
        };
        self.inodes.insert(ino, Inode::new(meta.clone(), content));
        self.touch(ino);
        self.set_entry(cx, parent, name, Some((ino, kind)))?;
        if kind == FileKind::Directory {
            self.add_nlink(cx, parent, 1)?;
        }
        Ok((ino, meta))
    }

    fn block_at(&mut self, cx: &Ctx, ino: u64, idx: u64) -> Result<Option<BlockId>> {
        let Content::File(fm) = &self.inode(cx, ino)?.content else {
            return Err(Error::IsDir);
        };
        block_at(cx, fm, idx)
    }

    fn apply(&mut self, cx: &Ctx, op: JournalOp) -> Result<()> {
        match op {
            JournalOp::NextIno { next } => self.next_ino = self.next_ino.max(next),
            JournalOp::Inode { ino, meta } => {
                match self.inode(cx, ino) {
                    Ok(i) if i.meta.kind == meta.kind => i.meta = meta,
                    Ok(_) | Err(Error::NotFound) => {
                        self.removed.remove(&ino);
                        let content = Inode::empty_content(meta.kind);
                        self.inodes.insert(ino, Inode::new(meta, content));
                    }
                    Err(e) => return Err(e),
                }
                self.dirty.insert(ino);
            }
            JournalOp::Symlink { ino, target } => {
                self.inode(cx, ino)?.content = Content::Symlink(target);
                self.dirty.insert(ino);
            }
            JournalOp::FileBlocks {
                ino,
                base_limit,
                entries,
            } => {
                let Content::File(fm) = &mut self.inode(cx, ino)?.content else {
                    return Err(Error::CorruptMeta(format!(
                        "journal: inode {ino} is not a file"
                    )));
                };
                if base_limit != u64::MAX {
                    fm.base_limit = fm.base_limit.min(base_limit);
                    fm.overlay.retain(|k, _| *k < base_limit);
                }
                fm.overlay.extend(entries);
                fm.stored = None;
                self.dirty.insert(ino);
            }
            JournalOp::DirEntry { dir, name, target } => {
                let d = self.dir(cx, dir)?;
                match target {
                    Some(t) => d.entries.insert(name, t),
                    None => d.entries.remove(&name),
                };
                d.changed = true;
                self.dirty.insert(dir);
            }
            JournalOp::Continued => {}
            JournalOp::Remove { ino } => {
                self.inodes.remove(&ino);
                self.removed.insert(ino);
                self.dirty.insert(ino);
            }
        }
        Ok(())
    }

    fn build_journal(&mut self, cx: &Ctx) -> Result<Vec<JournalOp>> {
        let mut ops = Vec::new();
        if self.jnext_ino {
            ops.push(JournalOp::NextIno {
                next: self.next_ino,
            });
        }
        let mut dir_ops = Vec::new();
        for ino in std::mem::take(&mut self.jdirty) {
            let Some(inode) = self.inodes.get_mut(&ino) else {
                continue;
            };
            ops.push(JournalOp::Inode {
                ino,
                meta: inode.meta.clone(),
            });
            match &mut inode.content {
                Content::Symlink(t) => ops.push(JournalOp::Symlink {
                    ino,
                    target: t.clone(),
                }),
                Content::File(fm) => {
                    if !fm.jchanged.is_empty() || fm.jtrunc.is_some() {
                        let mut entries = Vec::with_capacity(fm.jchanged.len());
                        for idx in std::mem::take(&mut fm.jchanged) {
                            entries.push((idx, block_at(cx, fm, idx)?));
                        }
                        ops.push(JournalOp::FileBlocks {
                            ino,
                            base_limit: fm.jtrunc.take().unwrap_or(u64::MAX),
                            entries,
                        });
                    }
                }
                Content::Dir(d) => {
                    for name in std::mem::take(&mut d.jchanged) {
                        let target = d.entries.get(&name).copied();
                        dir_ops.push(JournalOp::DirEntry {
                            dir: ino,
                            name,
                            target,
                        });
                    }
                }
                Content::Special => {}
            }
        }
        ops.extend(dir_ops);
        for ino in std::mem::take(&mut self.jremoved) {
            ops.push(JournalOp::Remove { ino });
        }
        self.jnext_ino = false;
        Ok(ops)
    }
}

fn block_at(cx: &Ctx, fm: &FileMap, idx: u64) -> Result<Option<BlockId>> {
    if let Some(v) = fm.overlay.get(&idx) {
        return Ok(*v);
    }
    if idx >= fm.base_limit {
        return Ok(None);
    }
    match radix::get(cx.store, cx.cache, fm.base, idx)? {
        Some(v) => {
            let arr: [u8; 32] = v
                .as_slice()
                .try_into()
                .map_err(|_| Error::CorruptMeta("file map entry".into()))?;
            Ok(Some(BlockId(arr)))
        }
        None => Ok(None),
    }
}

fn check_name(name: &[u8]) -> Result<()> {
    if name.len() > NAME_MAX {
        return Err(Error::NameTooLong);
    }
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') {
        return Err(Error::Invalid("file name"));
    }
    Ok(())
}

impl Dataset {
    /// Loads a dataset from its committed record (an empty record gets a fresh root directory).
    pub fn load(store: Arc<Store>, cache: Arc<NodeCache>, rec: &DatasetRecord) -> Dataset {
        let mut st = State {
            root: rec.root,
            next_ino: rec.next_ino.max(ROOT_INO + 1),
            inodes: HashMap::new(),
            removed: HashSet::new(),
            dirty: BTreeSet::new(),
            jdirty: BTreeSet::new(),
            jremoved: BTreeSet::new(),
            jnext_ino: false,
            journal_end: LogPos::default(),
            tombstones: HashMap::new(),
        };
        if rec.root.is_none() {
            let t = now();
            let meta = InodeMeta {
                kind: FileKind::Directory,
                perm: 0o755,
                uid: 0,
                gid: 0,
                nlink: 2,
                rdev: 0,
                size: 0,
                atime: t,
                mtime: t,
                ctime: t,
            };
            st.inodes.insert(
                ROOT_INO,
                Inode::new(meta, Inode::empty_content(FileKind::Directory)),
            );
            st.touch(ROOT_INO);
            st.jnext_ino = true;
        }
        Dataset {
            id: rec.id,
            name: rec.name.clone(),
            created: rec.created,
            store,
            cache,
            st: Mutex::new(st),
            cache_flush: Mutex::new(None),
        }
    }

    /// Installs (mount) or removes (unmount) the flush of the kernel's cache of this dataset.
    pub fn set_cache_flush(&self, f: Option<CacheFlush>) {
        *self.cache_flush.lock() = f;
    }

    /// Makes everything written to this dataset through its mount visible here (data the
    /// kernel's writeback cache still holds); a no-op when it is not mounted.
    pub fn flush_cache(&self) -> Result<()> {
        let f = self.cache_flush.lock().clone();
        match f {
            Some(f) => f().map_err(Error::from),
            None => Ok(()),
        }
    }

    fn cx(&self) -> Ctx<'_> {
        Ctx {
            store: &self.store,
            cache: &self.cache,
        }
    }

    /// Re-applies journal ops found by recovery.
    pub fn replay(&self, ops: Vec<JournalOp>) -> Result<()> {
        let cx = self.cx();
        let mut st = self.st.lock();
        for op in ops {
            st.apply(&cx, op)?;
        }
        Ok(())
    }

    pub fn getattr(&self, ino: u64) -> Result<InodeMeta> {
        let cx = self.cx();
        let mut st = self.st.lock();
        match st.inode(&cx, ino) {
            Ok(i) => Ok(i.meta.clone()),
            Err(Error::NotFound) => st.tombstones.get(&ino).cloned().ok_or(Error::NotFound),
            Err(e) => Err(e),
        }
    }

    /// The kernel forgot inode `ino`: no request names it any more.
    pub fn forget(&self, ino: u64) {
        self.st.lock().tombstones.remove(&ino);
    }

    /// The mount ended: the kernel holds no inode of it any more.
    pub fn forget_all(&self) {
        self.st.lock().tombstones.clear();
    }

    /// Applies `f` to the tombstone of a removed inode, if it has one.
    fn tombstone(&self, ino: u64, f: impl FnOnce(&mut InodeMeta)) -> Option<InodeMeta> {
        let mut st = self.st.lock();
        let m = st.tombstones.get_mut(&ino)?;
        f(m);
        Some(m.clone())
    }

    pub fn lookup(&self, parent: u64, name: &[u8]) -> Result<(u64, InodeMeta)> {
        let cx = self.cx();
        let mut st = self.st.lock();
        if name.len() > NAME_MAX {
            return Err(Error::NameTooLong);
        }
        let (ino, _) = *st
            .dir(&cx, parent)?
            .entries
            .get(name)
            .ok_or(Error::NotFound)?;
        Ok((ino, st.inode(&cx, ino)?.meta.clone()))
    }

    /// Creates a file, directory, symlink or special file owned by `uid`/`gid`.
    #[allow(clippy::too_many_arguments)]
    pub fn create(
        &self,
        parent: u64,
        name: &[u8],
        kind: FileKind,
        perm: u32,
        uid: u32,
        gid: u32,
        rdev: u32,
        target: Option<&[u8]>,
    ) -> Result<(u64, InodeMeta)> {
        check_name(name)?;
        let cx = self.cx();
        let mut st = self.st.lock();
        if st.dir(&cx, parent)?.entries.contains_key(name) {
            return Err(Error::Exists);
        }
        st.create(&cx, parent, name, kind, perm, (uid, gid), rdev, target)
    }

    /// Stored (non-hole) blocks of a regular file, for `st_blocks`; None for other kinds and
    /// removed inodes. The first call reads the file's block map (outside the dataset lock);
    /// writes and truncations keep the count from then on.
    pub fn stored_blocks(&self, ino: u64) -> Result<Option<u64>> {
        let cx = self.cx();
        // A checkpoint that folds the overlay into a new base meanwhile means counting again.
        for _ in 0..3 {
            let (base, limit) = {
                let mut st = self.st.lock();
                let inode = match st.inode(&cx, ino) {
                    Ok(i) => i,
                    Err(Error::NotFound) => return Ok(None),
                    Err(e) => return Err(e),
                };
                let Content::File(fm) = &inode.content else {
                    return Ok(None);
                };
                if let Some(s) = &fm.stored {
                    return Ok(Some(s.count));
                }
                (fm.base, fm.base_limit)
            };
            let mut stored = Stored::default();
            {
                // A collection may sweep the nodes of a base a checkpoint just replaced.
                let _gc = self.store.read_guard();
                radix::for_each(&self.store, &self.cache, base, limit, &mut |idx, _| {
                    stored.set(idx, true);
                    Ok(())
                })?;
            }
            let mut st = self.st.lock();
            let Ok(inode) = st.inode(&cx, ino) else {
                return Ok(None);
            };
            let Content::File(fm) = &mut inode.content else {
                return Ok(None);
            };
            if let Some(s) = &fm.stored {
                return Ok(Some(s.count));
            }
            if fm.base != base {
                continue;
            }
            if fm.base_limit < limit {
                stored.truncate(fm.base_limit);
            }
            for (idx, id) in &fm.overlay {
                stored.set(*idx, id.is_some());
            }
            let n = stored.count;
            fm.stored = Some(stored);
            return Ok(Some(n));
        }
        Ok(None)
    }

    pub fn link(&self, ino: u64, newparent: u64, newname: &[u8]) -> Result<InodeMeta> {
        check_name(newname)?;
        let cx = self.cx();
        let mut st = self.st.lock();
        let kind = st.inode(&cx, ino)?.meta.kind;
        if kind == FileKind::Directory {
            return Err(Error::Invalid("hard link to a directory"));
        }
        if st.dir(&cx, newparent)?.entries.contains_key(newname) {
            return Err(Error::Exists);
        }
        st.set_entry(&cx, newparent, newname, Some((ino, kind)))?;
        st.add_nlink(&cx, ino, 1)?;
        Ok(st.inode(&cx, ino)?.meta.clone())
    }

    pub fn unlink(&self, parent: u64, name: &[u8], want_dir: bool) -> Result<()> {
        let cx = self.cx();
        let mut st = self.st.lock();
        let (ino, kind) = *st
            .dir(&cx, parent)?
            .entries
            .get(name)
            .ok_or(Error::NotFound)?;
        if want_dir {
            if kind != FileKind::Directory {
                return Err(Error::NotDir);
            }
            if !st.dir(&cx, ino)?.entries.is_empty() {
                return Err(Error::NotEmpty);
            }
        } else if kind == FileKind::Directory {
            return Err(Error::IsDir);
        }
        st.set_entry(&cx, parent, name, None)?;
        if want_dir {
            st.add_nlink(&cx, parent, -1)?;
            st.remove_inode(ino);
        } else {
            st.add_nlink(&cx, ino, -1)?;
        }
        Ok(())
    }

    /// rename(2) with RENAME_NOREPLACE, RENAME_EXCHANGE and RENAME_WHITEOUT (the old name then
    /// becomes a whiteout: a character device 0/0 owned by `owner`, as overlayfs expects).
    #[allow(clippy::too_many_arguments)]
    pub fn rename(
        &self,
        parent: u64,
        name: &[u8],
        newparent: u64,
        newname: &[u8],
        flags: u32,
        owner: (u32, u32),
    ) -> Result<()> {
        check_name(newname)?;
        let whiteout = flags & libc::RENAME_WHITEOUT != 0;
        if flags & !(libc::RENAME_NOREPLACE | libc::RENAME_EXCHANGE | libc::RENAME_WHITEOUT) != 0
            || (whiteout && flags & libc::RENAME_EXCHANGE != 0)
        {
            return Err(Error::Invalid("rename flags"));
        }
        let cx = self.cx();
        let mut st = self.st.lock();
        let (ino, kind) = *st
            .dir(&cx, parent)?
            .entries
            .get(name)
            .ok_or(Error::NotFound)?;
        let dst = st.dir(&cx, newparent)?.entries.get(newname).copied();
        let is_dir = |k: FileKind| k == FileKind::Directory;
        if flags & libc::RENAME_EXCHANGE != 0 {
            let (dino, dkind) = dst.ok_or(Error::NotFound)?;
            st.set_entry(&cx, parent, name, Some((dino, dkind)))?;
            st.set_entry(&cx, newparent, newname, Some((ino, kind)))?;
            if parent != newparent && is_dir(kind) != is_dir(dkind) {
                let (to_new, to_old) = if is_dir(kind) { (1, -1) } else { (-1, 1) };
                st.add_nlink(&cx, newparent, to_new)?;
                st.add_nlink(&cx, parent, to_old)?;
            }
            for i in [ino, dino] {
                st.inode(&cx, i)?.meta.ctime = now();
                st.touch(i);
            }
            return Ok(());
        }
        if let Some((dino, dkind)) = dst {
            if dino == ino {
                return Ok(());
            }
            if flags & libc::RENAME_NOREPLACE != 0 {
                return Err(Error::Exists);
            }
            match (is_dir(kind), is_dir(dkind)) {
                (true, false) => return Err(Error::NotDir),
                (false, true) => return Err(Error::IsDir),
                (true, true) if !st.dir(&cx, dino)?.entries.is_empty() => {
                    return Err(Error::NotEmpty)
                }
                _ => {}
            }
            if is_dir(dkind) {
                st.add_nlink(&cx, newparent, -1)?;
                st.remove_inode(dino);
            } else {
                st.add_nlink(&cx, dino, -1)?;
            }
        }
        st.set_entry(&cx, parent, name, None)?;
        st.set_entry(&cx, newparent, newname, Some((ino, kind)))?;
        if is_dir(kind) && parent != newparent {
            st.add_nlink(&cx, parent, -1)?;
            st.add_nlink(&cx, newparent, 1)?;
        }
        st.inode(&cx, ino)?.meta.ctime = now();
        st.touch(ino);
        if whiteout {
            // In the same change as the rename: a journal record holds both or neither.
            st.create(&cx, parent, name, FileKind::CharDevice, 0, owner, 0, None)?;
        }
        Ok(())
    }

    pub fn readlink(&self, ino: u64) -> Result<Vec<u8>> {
        let cx = self.cx();
        match &self.st.lock().inode(&cx, ino)?.content {
            Content::Symlink(t) => Ok(t.clone()),
            _ => Err(Error::Invalid("not a symlink")),
        }
    }

    pub fn readdir(&self, ino: u64) -> Result<Vec<(Vec<u8>, u64, FileKind)>> {
        let cx = self.cx();
        let mut st = self.st.lock();
        Ok(st
            .dir(&cx, ino)?
            .entries
            .iter()
            .map(|(n, (i, k))| (n.clone(), *i, *k))
            .collect())
    }

    pub fn open(&self, ino: u64) -> Result<InodeMeta> {
        let cx = self.cx();
        let mut st = self.st.lock();
        let i = st.inode(&cx, ino)?;
        i.open += 1;
        Ok(i.meta.clone())
    }

    pub fn release(&self, ino: u64) {
        let mut st = self.st.lock();
        let drop_it = match st.inodes.get_mut(&ino) {
            Some(i) => {
                i.open = i.open.saturating_sub(1);
                i.open == 0 && st.removed.contains(&ino)
            }
            None => false,
        };
        if drop_it {
            if let Some(i) = st.inodes.remove(&ino) {
                st.tombstones.insert(ino, i.meta);
            }
        }
    }

    pub fn setattr(&self, ino: u64, a: SetAttr) -> Result<InodeMeta> {
        match self.setattr_live(ino, &a) {
            Err(Error::NotFound) => self
                .tombstone(ino, |m| {
                    if let Some(size) = a.size {
                        m.size = size;
                    }
                    if let Some(t) = a.mtime {
                        m.mtime = t;
                    }
                    if let Some(t) = a.atime {
                        m.atime = t;
                    }
                })
                .ok_or(Error::NotFound),
            r => r,
        }
    }

    fn setattr_live(&self, ino: u64, a: &SetAttr) -> Result<InodeMeta> {
        if let Some(size) = a.size {
            self.truncate(ino, size)?;
        }
        let cx = self.cx();
        let mut st = self.st.lock();
        let t = now();
        let m = &mut st.inode(&cx, ino)?.meta;
        if let Some(p) = a.perm {
            m.perm = p & 0o7777;
        }
        if let Some(u) = a.uid {
            m.uid = u;
        }
        if let Some(g) = a.gid {
            m.gid = g;
        }
        if let Some(at) = a.atime {
            m.atime = at;
        }
        if let Some(mt) = a.mtime {
            m.mtime = mt;
        }
        m.ctime = t;
        let meta = m.clone();
        st.touch(ino);
        Ok(meta)
    }

    fn wlock(&self, ino: u64) -> Result<Arc<Mutex<()>>> {
        let cx = self.cx();
        let mut st = self.st.lock();
        let i = st.inode(&cx, ino)?;
        match i.meta.kind {
            FileKind::Regular => Ok(i.wlock.clone()),
            FileKind::Directory => Err(Error::IsDir),
            _ => Err(Error::Invalid("not a regular file")),
        }
    }

    fn truncate(&self, ino: u64, size: u64) -> Result<()> {
        if size > MAX_FILE_SIZE {
            return Err(Error::TooBig);
        }
        let wlock = self.wlock(ino)?;
        let _w = wlock.lock();
        let cx = self.cx();
        let (old_size, tail) = {
            let mut st = self.st.lock();
            let old = st.inode(&cx, ino)?.meta.size;
            let tail = if size < old && !size.is_multiple_of(BS) {
                st.block_at(&cx, ino, size / BS)?
            } else {
                None
            };
            (old, tail)
        };
        // The block that now holds EOF keeps its head and loses its tail (outside the lock).
        let _dedup = self.store.dedup_guard();
        let new_tail = match tail {
            Some(id) => {
                let mut data = self.store.get(&id)?;
                let keep = (size % BS) as usize;
                data.truncate(keep);
                data.resize(BLOCK_SIZE, 0);
                self.put_block(&data)?
            }
            None => None,
        };
        let mut st = self.st.lock();
        let t = now();
        let inode = st.inode(&cx, ino)?;
        if let Content::File(fm) = &mut inode.content {
            if size < old_size {
                let n = size.div_ceil(BS);
                fm.base_limit = fm.base_limit.min(n);
                fm.overlay.retain(|k, _| *k < n);
                fm.jchanged.retain(|k| *k < n);
                fm.jtrunc = Some(fm.jtrunc.map_or(n, |j| j.min(n)));
                if let Some(stored) = &mut fm.stored {
                    stored.truncate(n);
                }
                if tail.is_some() {
                    fm.overlay.insert(size / BS, new_tail);
                    fm.jchanged.insert(size / BS);
                    if let Some(stored) = &mut fm.stored {
                        stored.set(size / BS, new_tail.is_some());
                    }
                }
            }
        }
        inode.meta.size = size;
        inode.meta.mtime = t;
        inode.meta.ctime = t;
        st.touch(ino);
        Ok(())
    }

    /// A block's id, or None for a block of zeros (stored as a hole).
    fn put_block(&self, data: &[u8]) -> Result<Option<BlockId>> {
        if data.iter().all(|&b| b == 0) {
            Ok(None)
        } else {
            Ok(Some(self.store.put(data)?))
        }
    }

    pub fn read(&self, ino: u64, offset: u64, size: u32) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        self.read_to(ino, offset, size, &mut out)?;
        Ok(out)
    }

    /// [`Dataset::read`] into `out`, replacing its contents; a buffer reused across calls saves
    /// zeroing it (holes are zeroed explicitly).
    pub fn read_to(&self, ino: u64, offset: u64, size: u32, out: &mut Vec<u8>) -> Result<()> {
        let cx = self.cx();
        // Ids resolved below may be overwritten concurrently; the guard keeps them readable.
        let _gc = self.store.read_guard();
        let (ids, end) = {
            let mut st = self.st.lock();
            let i = st.inode(&cx, ino)?;
            if i.meta.kind == FileKind::Directory {
                return Err(Error::IsDir);
            }
            let end = (offset + size as u64).min(i.meta.size);
            if offset >= end {
                out.clear();
                return Ok(());
            }
            let mut ids = Vec::new();
            for idx in offset / BS..=(end - 1) / BS {
                ids.push((idx, st.block_at(&cx, ino, idx)?));
            }
            (ids, end)
        };
        // Whole blocks are decoded straight into `out`; a partly covered block (at most one at
        // each end) goes through a block-sized buffer. Holes stay zero.
        let n = (end - offset) as usize;
        if out.len() < n {
            out.resize(n, 0);
        } else {
            out.truncate(n);
        }
        let mut stored: Vec<BlockId> = Vec::with_capacity(ids.len());
        let mut partial: Vec<(usize, usize, usize, Vec<u8>)> = Vec::new(); // (at, from, to, buf)
        {
            let mut dests: Vec<&mut [u8]> = Vec::with_capacity(ids.len());
            let mut rest: &mut [u8] = &mut out[..];
            let mut at = 0usize;
            let mut partial_of: Vec<usize> = Vec::new(); // positions in `dests` that are partial
            for (idx, id) in &ids {
                let bstart = idx * BS;
                let from = (offset.max(bstart) - bstart) as usize;
                let to = (end.min(bstart + BS) - bstart) as usize;
                let (mine, tail) = std::mem::take(&mut rest).split_at_mut(to - from);
                rest = tail;
                if id.is_none() {
                    mine.fill(0);
                }
                if let Some(id) = id {
                    stored.push(*id);
                    if from == 0 && to == BLOCK_SIZE {
                        dests.push(mine);
                    } else {
                        partial_of.push(dests.len());
                        partial.push((at, from, to, vec![0u8; BLOCK_SIZE]));
                        dests.push(&mut []);
                    }
                }
                at += to - from;
            }
            for (k, p) in partial_of.iter().zip(partial.iter_mut()) {
                dests[*k] = &mut p.3;
            }
            self.store.read_into(&stored, &mut dests).inspect_err(|e| {
                let at = match e {
                    Error::Corrupt { id, .. } | Error::MissingBlock(id) => ids
                        .iter()
                        .find(|(_, b)| b.as_ref() == Some(id))
                        .map(|(idx, _)| idx * BS),
                    _ => None,
                };
                tracing::error!(
                    dataset = %self.name,
                    ino,
                    file_offset = ?at,
                    "corrupt block: read failed: {e}"
                );
            })?;
        }
        for (at, from, to, buf) in partial {
            out[at..at + (to - from)].copy_from_slice(&buf[from..to]);
        }
        Ok(())
    }

    pub fn write(&self, ino: u64, offset: u64, data: &[u8]) -> Result<u32> {
        match self.write_range(ino, offset, data.len() as u64, Some(data), true) {
            // Dirty pages of a removed file, sent after its last close: nothing to keep.
            Err(Error::NotFound) if self.tombstone(ino, |_| {}).is_some() => {}
            r => r?,
        }
        Ok(data.len() as u32)
    }

    /// Writes `data` (or zeros when None) at `offset`; `extend` lets the write grow the file.
    fn write_range(
        &self,
        ino: u64,
        offset: u64,
        len: u64,
        data: Option<&[u8]>,
        extend: bool,
    ) -> Result<()> {
        let end = offset.checked_add(len).ok_or(Error::TooBig)?;
        if end > MAX_FILE_SIZE {
            return Err(Error::TooBig);
        }
        if len == 0 {
            return Ok(());
        }
        let wlock = self.wlock(ino)?;
        let _w = wlock.lock();
        let cx = self.cx();
        let first = offset / BS;
        let last = (end - 1) / BS;
        // Blocks only partly covered need their old content.
        let (head_old, tail_old) = {
            let mut st = self.st.lock();
            let head = if !offset.is_multiple_of(BS) || (first == last && !end.is_multiple_of(BS)) {
                st.block_at(&cx, ino, first)?
            } else {
                None
            };
            let tail = if last != first && !end.is_multiple_of(BS) {
                st.block_at(&cx, ino, last)?
            } else {
                None
            };
            (head, tail)
        };
        // (block index, whether it holds data); all-zero blocks become holes.
        let mut blocks: Vec<(u64, bool)> = Vec::with_capacity((last - first + 1) as usize);
        let zeros = [0u8; BLOCK_SIZE];
        // Contents of the non-zero blocks, stored together below; zero blocks become holes.
        let mut contents: Vec<std::borrow::Cow<[u8]>> = Vec::new();
        for idx in first..=last {
            let bstart = idx * BS;
            let from = offset.max(bstart) - bstart;
            let to = end.min(bstart + BS) - bstart;
            let piece: &[u8] = match data {
                Some(d) => &d[(bstart + from - offset) as usize..(bstart + to - offset) as usize],
                None => &zeros[..(to - from) as usize],
            };
            let content: std::borrow::Cow<[u8]> = if from == 0 && to == BS {
                piece.into()
            } else {
                let old = if idx == first { head_old } else { tail_old };
                let mut block = match old {
                    Some(id) => self.store.get(&id)?,
                    None => vec![0u8; BLOCK_SIZE],
                };
                block.resize(BLOCK_SIZE, 0);
                block[from as usize..to as usize].copy_from_slice(piece);
                block.into()
            };
            let data = content.iter().any(|&b| b != 0);
            blocks.push((idx, data));
            if data {
                contents.push(content);
            }
        }
        let refs: Vec<&[u8]> = contents.iter().map(|c| c.as_ref()).collect();
        let _dedup = self.store.dedup_guard();
        let mut ids = self.store.put_many(&refs)?.into_iter();
        let new: Vec<(u64, Option<BlockId>)> = blocks
            .into_iter()
            .map(|(idx, data)| (idx, if data { ids.next() } else { None }))
            .collect();
        let mut st = self.st.lock();
        let t = now();
        let inode = st.inode(&cx, ino)?;
        if let Content::File(fm) = &mut inode.content {
            for (idx, id) in new {
                fm.overlay.insert(idx, id);
                fm.jchanged.insert(idx);
                if let Some(stored) = &mut fm.stored {
                    stored.set(idx, id.is_some());
                }
            }
        }
        if extend && end > inode.meta.size {
            inode.meta.size = end;
        }
        inode.meta.mtime = t;
        inode.meta.ctime = t;
        st.touch(ino);
        Ok(())
    }

    /// fallocate(2): plain allocation extends the size (space is not reserved: blocks are
    /// allocated on write); PUNCH_HOLE and ZERO_RANGE zero the range.
    pub fn fallocate(&self, ino: u64, offset: u64, len: u64, mode: i32) -> Result<()> {
        let keep = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        let size = self.getattr(ino)?.size;
        let end = offset.checked_add(len).ok_or(Error::TooBig)?;
        match mode & !libc::FALLOC_FL_KEEP_SIZE {
            0 => {
                if !keep && end > size {
                    self.truncate(ino, end)?;
                }
                Ok(())
            }
            libc::FALLOC_FL_PUNCH_HOLE if keep => {
                let end = end.min(size);
                if end > offset {
                    self.write_range(ino, offset, end - offset, None, false)?;
                }
                Ok(())
            }
            libc::FALLOC_FL_ZERO_RANGE => {
                let zend = if keep { end.min(size) } else { end };
                if zend > offset {
                    self.write_range(ino, offset, zend - offset, None, !keep)?;
                }
                Ok(())
            }
            _ => Err(Error::NotSupported),
        }
    }

    /// Makes every change to this dataset durable: one journal record, one fdatasync.
    pub fn fsync(&self) -> Result<()> {
        let cx = self.cx();
        let end = {
            let mut st = self.st.lock();
            let ops = st.build_journal(&cx)?;
            if !ops.is_empty() {
                for rec in split_group(self.id, ops) {
                    st.journal_end = self.store.append_journal(&rec)?;
                }
            }
            st.journal_end
        };
        self.store.sync_to(end)?;
        Ok(())
    }

    /// Blocks referenced only from memory: files unlinked while still open. The collector
    /// marks them, since no tree holds them.
    pub fn orphan_blocks(&self, out: &mut dyn crate::tree::walk::BlockSink) -> Result<()> {
        let cx = self.cx();
        let st = self.st.lock();
        for ino in &st.removed {
            let Some(Inode {
                content: Content::File(fm),
                ..
            }) = st.inodes.get(ino)
            else {
                continue;
            };
            out.file_map(cx.store, fm.base)?;
            for id in fm.overlay.values().flatten() {
                out.block(id);
            }
        }
        Ok(())
    }

    pub fn is_dirty(&self) -> bool {
        !self.st.lock().dirty.is_empty()
    }

    /// First half of a checkpoint: writes the changed trees into the store (not yet synced or
    /// committed) and returns the record to commit.
    pub fn flush_trees(&self) -> Result<DatasetRecord> {
        let cx = self.cx();
        let mut st = self.st.lock();
        let replay_from = self.store.end();
        let mut changes: BTreeMap<u64, Option<Vec<u8>>> = BTreeMap::new();
        for ino in st.dirty.clone() {
            if st.removed.contains(&ino) {
                changes.insert(ino, None);
                continue;
            }
            let Some(inode) = st.inodes.get_mut(&ino) else {
                continue;
            };
            let (root, target) = match &mut inode.content {
                Content::File(fm) => {
                    if !fm.overlay.is_empty() || fm.base_limit != u64::MAX {
                        let ch = fm
                            .overlay
                            .iter()
                            .map(|(k, v)| (*k, v.map(|id| id.0.to_vec())))
                            .collect();
                        fm.base = radix::update(cx.store, cx.cache, fm.base, fm.base_limit, &ch)?;
                        fm.base_limit = u64::MAX;
                        fm.overlay.clear();
                    }
                    (fm.base, Vec::new())
                }
                Content::Dir(d) => {
                    let obj = DirObject {
                        entries: d
                            .entries
                            .iter()
                            .map(|(n, (i, k))| DirEntry {
                                name: n.clone(),
                                ino: *i,
                                kind: *k,
                            })
                            .collect(),
                    };
                    d.changed = false;
                    (Some(cx.store.put(&obj.encode())?), Vec::new())
                }
                Content::Symlink(t) => (None, t.clone()),
                Content::Special => (None, Vec::new()),
            };
            let rec = InodeRecord {
                meta: inode.meta.clone(),
                root,
                target,
            };
            changes.insert(ino, Some(rec.encode()));
        }
        st.root = radix::update(cx.store, cx.cache, st.root, u64::MAX, &changes)?;
        st.dirty.clear();
        let State {
            removed, inodes, ..
        } = &mut *st;
        removed.retain(|ino| inodes.contains_key(ino));
        Ok(DatasetRecord {
            id: self.id,
            name: self.name.clone(),
            created: self.created,
            root: st.root,
            next_ino: st.next_ino,
            replay_from,
        })
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }
}
