//! Scrub: every live block read back from the disk and verified, at a bounded rate, and every
//! bad one reported with the datasets, snapshots and files that reference it.
//!
//! 1. A checkpoint, so that everything written is in a root.
//! 2. Mark: the blocks every dataset and snapshot root reaches (tree nodes, directories, data),
//!    and the files unlinked while open. A tree node that cannot be read is noted and its subtree
//!    skipped (what it pointed to cannot be known).
//! 3. Check, in the order of the blocks' places in the packs (`store::scrub`), sleeping as needed
//!    to stay under the rate. A block found bad (or missing) is checked once more at the end: a
//!    collection may have moved it meanwhile.
//! 4. For the bad blocks only: walk the roots again to find who references them, and the paths of
//!    those files.
//!
//! Invariant: a scrub only reads; it never changes a tree, the index or a pack.

use super::dataset::ROOT_INO;
use super::walk::Walk;
use super::Datasets;
use crate::store::scrub::Checked;
use crate::store::{Error, Result};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};
use vdbfs_format::tree::{DirObject, FileKind, InodeRecord, Node};
use vdbfs_format::{BlockId, BLOCK_SIZE};

/// How far a scrub is.
#[derive(Clone, Debug, Default)]
pub struct Progress {
    pub blocks_total: u64,
    pub blocks_done: u64,
    pub bytes_done: u64,
    pub bad: u64,
}

/// Who references a bad block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reference {
    /// `dataset` or `dataset@snapshot` (every root with the same tree).
    pub roots: Vec<String>,
    /// What the block is to that root.
    pub what: RefKind,
    /// The file or directory (absolute in the dataset), when the block belongs to one.
    pub path: Option<String>,
    pub ino: Option<u64>,
    /// For data: the offset of the block in the file.
    pub file_offset: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefKind {
    /// File data.
    Data,
    /// A node of a file's block map: the file's blocks below it cannot be found.
    BlockMap,
    /// A directory's entries.
    Directory,
    /// A node of the inode table: the inodes below it cannot be found.
    InodeTable,
    /// Held only by a file unlinked while open.
    Unlinked,
}

impl RefKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RefKind::Data => "data",
            RefKind::BlockMap => "block map",
            RefKind::Directory => "directory",
            RefKind::InodeTable => "inode table",
            RefKind::Unlinked => "file unlinked while open",
        }
    }
}

#[derive(Clone, Debug)]
pub struct BadBlock {
    pub id: BlockId,
    /// Where its record is (None: nothing in the store holds it).
    pub pack: Option<u32>,
    pub offset: Option<u64>,
    pub why: String,
    pub refs: Vec<Reference>,
}

#[derive(Clone, Debug)]
pub struct ScrubResult {
    pub blocks: u64,
    pub bytes: u64,
    pub roots: usize,
    pub bad: Vec<BadBlock>,
    pub seconds: f64,
}

/// Walks a radix tree, tolerating nodes that cannot be read (they go to `bad_nodes`); `node`
/// gets every node visited, `leaf` each level-0 entry with its key. A cached copy of a node
/// whose bytes rotted still shows what is below it.
fn walk_tree(
    ds: &Datasets,
    root: BlockId,
    seen: &mut HashSet<BlockId>,
    bad_nodes: &mut HashMap<BlockId, String>,
    node: &mut dyn FnMut(BlockId),
    leaf: &mut dyn FnMut(u64, &[u8]),
) {
    let mut stack = vec![(root, 0u64)];
    while let Some((id, base)) = stack.pop() {
        if !seen.insert(id) {
            continue;
        }
        node(id);
        match ds.cache.peek(&ds.store, &id) {
            Ok(n) => visit_node(&n, base, &mut stack, leaf),
            Err(e) => {
                bad_nodes.insert(id, e.to_string());
            }
        }
    }
}

fn visit_node(
    node: &Node,
    base: u64,
    stack: &mut Vec<(BlockId, u64)>,
    leaf: &mut dyn FnMut(u64, &[u8]),
) {
    for (slot, v) in &node.entries {
        if node.level == 0 {
            leaf(base + *slot as u64, v);
        } else if let Ok(arr) = <[u8; 32]>::try_from(v.as_slice()) {
            let child = base as u128 + ((*slot as u128) << (8 * node.level as u32));
            stack.push((BlockId(arr), child.min(u64::MAX as u128) as u64));
        }
    }
}

/// Every block a root reaches, tolerating unreadable tree objects.
fn mark_root(
    ds: &Datasets,
    root: Option<BlockId>,
    live: &mut HashSet<BlockId>,
    bad_nodes: &mut HashMap<BlockId, String>,
) {
    let Some(root) = root else { return };
    let mut inodes: Vec<InodeRecord> = Vec::new();
    let mut seen = std::mem::take(live);
    walk_tree(ds, root, &mut seen, bad_nodes, &mut |_| {}, &mut |_, v| {
        if let Ok(r) = InodeRecord::decode(v) {
            inodes.push(r);
        }
    });
    for rec in inodes {
        match rec.meta.kind {
            FileKind::Regular => {
                if let Some(map) = rec.root {
                    let mut data = Vec::new();
                    walk_tree(ds, map, &mut seen, bad_nodes, &mut |_| {}, &mut |_, v| {
                        if let Ok(arr) = <[u8; 32]>::try_from(v) {
                            data.push(BlockId(arr));
                        }
                    });
                    seen.extend(data);
                }
            }
            FileKind::Directory => {
                if let Some(d) = rec.root {
                    seen.insert(d);
                }
            }
            _ => {}
        }
    }
    *live = seen;
}

impl Datasets {
    /// Reads back and verifies every live block, at most `rate` bytes per second (0: no bound),
    /// telling `progress` how far it is now and then.
    pub fn scrub(&self, rate: u64, progress: &dyn Fn(&Progress)) -> Result<ScrubResult> {
        let _trim = super::walk::TrimOnDrop;
        let started = Instant::now();
        self.checkpoint()?;
        let roots = self.roots()?;
        let mut live = HashSet::new();
        let mut bad_nodes: HashMap<BlockId, String> = HashMap::new();
        for (_, _, root) in &roots {
            mark_root(self, *root, &mut live, &mut bad_nodes);
        }
        let mut orphans = Walk::default();
        let loaded: Vec<_> = self.loaded.lock().values().cloned().collect();
        for ds in loaded {
            if let Err(e) = ds.orphan_blocks(&mut orphans) {
                tracing::warn!(dataset = %ds.name, "scrub: cannot list the blocks of files unlinked while open: {e}");
            }
        }
        live.extend(orphans.blocks.iter().copied());

        // In the order of their places in the packs: the disk reads sequentially.
        let ids: Vec<BlockId> = live.into_iter().collect();
        let locs = self.store.locate(&ids)?;
        let mut order: Vec<(Option<(u32, u64)>, BlockId)> = ids
            .iter()
            .zip(&locs)
            .map(|(id, l)| (l.map(|l| (l.pack, l.offset)), *id))
            .collect();
        order.sort_unstable_by_key(|(l, _)| l.unwrap_or((u32::MAX, u64::MAX)));
        let ids: Vec<BlockId> = order.into_iter().map(|(_, id)| id).collect();

        let mut p = Progress {
            blocks_total: ids.len() as u64,
            ..Progress::default()
        };
        let mut suspects: Vec<BlockId> = Vec::new();
        let mut scrubber = self.store.scrubber();
        let mut last_report = Instant::now();
        let t0 = Instant::now();
        for chunk in ids.chunks(256) {
            for (id, c) in chunk.iter().zip(scrubber.check(chunk)?) {
                match c {
                    Checked::Ok { stored } => p.bytes_done += stored as u64,
                    Checked::Bad { .. } | Checked::Missing => {
                        suspects.push(*id);
                        p.bad += 1;
                    }
                }
            }
            p.blocks_done += chunk.len() as u64;
            if rate > 0 {
                let due = Duration::from_secs_f64(p.bytes_done as f64 / rate as f64);
                let spent = t0.elapsed();
                if due > spent {
                    std::thread::sleep(due - spent);
                }
            }
            if last_report.elapsed() >= Duration::from_secs(2) {
                progress(&p);
                last_report = Instant::now();
            }
        }
        // Once more, with the nodes the marking could not read: a checkpoint and a collection
        // may have replaced, moved or removed a block since it was located.
        suspects.extend(bad_nodes.keys().copied());
        suspects.sort_unstable();
        suspects.dedup();
        let mut bad: BTreeMap<BlockId, (Option<(u32, u64)>, String)> = BTreeMap::new();
        if !suspects.is_empty() {
            let live_now = {
                let mut l = HashSet::new();
                let mut ignore = HashMap::new();
                for (_, _, root) in self.roots()? {
                    mark_root(self, root, &mut l, &mut ignore);
                }
                let mut orphans = Walk::default();
                for ds in self.loaded.lock().values() {
                    let _ = ds.orphan_blocks(&mut orphans);
                }
                l.extend(orphans.blocks);
                l
            };
            let mut scrubber = self.store.scrubber();
            for chunk in suspects.chunks(256) {
                for (id, c) in chunk.iter().zip(scrubber.check(chunk)?) {
                    if !live_now.contains(id) {
                        continue;
                    }
                    match c {
                        // Its record verifies now; the marking could not read it as a tree
                        // node: a real fault only if it still is not one.
                        Checked::Ok { .. } => {
                            if bad_nodes.contains_key(id) {
                                if let Err(e) = self.store.get(id).and_then(|b| {
                                    Node::decode(&b).map_err(|e| Error::CorruptMeta(e.to_string()))
                                }) {
                                    bad.insert(*id, (None, e.to_string()));
                                }
                            }
                        }
                        Checked::Bad { loc, why } => {
                            bad.insert(*id, (Some((loc.pack, loc.offset)), why));
                        }
                        Checked::Missing => {
                            bad.insert(*id, (None, "referenced, but not in the store".into()));
                        }
                    }
                }
            }
        }
        let refs = if bad.is_empty() {
            HashMap::new()
        } else {
            self.references(&bad.keys().copied().collect())?
        };
        let bad: Vec<BadBlock> = bad
            .into_iter()
            .map(|(id, (at, why))| BadBlock {
                id,
                pack: at.map(|a| a.0),
                offset: at.map(|a| a.1),
                why,
                refs: refs.get(&id).cloned().unwrap_or_default(),
            })
            .collect();
        for b in &bad {
            let who: Vec<String> = b.refs.iter().map(describe_ref).collect();
            tracing::error!(
                block = %b.id,
                pack = ?b.pack,
                offset = ?b.offset,
                "scrub: bad block: {}; referenced by: {}",
                b.why,
                if who.is_empty() { "nothing any more".to_string() } else { who.join("; ") }
            );
        }
        Ok(ScrubResult {
            blocks: p.blocks_done,
            bytes: p.bytes_done,
            roots: roots.len(),
            bad,
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// Who references each of `bad`: every root (roots sharing one tree together), the inode and
    /// path of files and directories.
    fn references(&self, bad: &HashSet<BlockId>) -> Result<HashMap<BlockId, Vec<Reference>>> {
        let mut by_root: BTreeMap<BlockId, Vec<String>> = BTreeMap::new();
        for (name, _, root) in self.roots()? {
            if let Some(r) = root {
                by_root.entry(r).or_default().push(name);
            }
        }
        let mut out: HashMap<BlockId, Vec<Reference>> = HashMap::new();
        for (root, names) in by_root {
            // (bad block, what, ino, file offset)
            let mut hits: Vec<(BlockId, RefKind, Option<u64>, Option<u64>)> = Vec::new();
            let mut inodes: Vec<(u64, InodeRecord)> = Vec::new();
            let mut ignore = HashMap::new();
            let mut seen = HashSet::new();
            walk_tree(
                self,
                root,
                &mut seen,
                &mut ignore,
                &mut |id| {
                    if bad.contains(&id) {
                        hits.push((id, RefKind::InodeTable, None, None));
                    }
                },
                &mut |ino, v| {
                    if let Ok(r) = InodeRecord::decode(v) {
                        inodes.push((ino, r));
                    }
                },
            );
            for (ino, rec) in &inodes {
                match (rec.meta.kind, rec.root) {
                    (FileKind::Regular, Some(map)) => {
                        let mut seen = HashSet::new();
                        let mut data = Vec::new();
                        walk_tree(
                            self,
                            map,
                            &mut seen,
                            &mut ignore,
                            &mut |id| {
                                if bad.contains(&id) {
                                    hits.push((id, RefKind::BlockMap, Some(*ino), None));
                                }
                            },
                            &mut |idx, v| {
                                if let Ok(arr) = <[u8; 32]>::try_from(v) {
                                    if bad.contains(&BlockId(arr)) {
                                        data.push((BlockId(arr), idx));
                                    }
                                }
                            },
                        );
                        for (id, idx) in data {
                            hits.push((
                                id,
                                RefKind::Data,
                                Some(*ino),
                                Some(idx * BLOCK_SIZE as u64),
                            ));
                        }
                    }
                    (FileKind::Directory, Some(d)) if bad.contains(&d) => {
                        hits.push((d, RefKind::Directory, Some(*ino), None));
                    }
                    _ => {}
                }
            }
            if hits.is_empty() {
                continue;
            }
            let wanted: HashSet<u64> = hits.iter().filter_map(|h| h.2).collect();
            let paths = self.paths_of(&inodes, &wanted);
            for (id, what, ino, off) in hits {
                out.entry(id).or_default().push(Reference {
                    roots: names.clone(),
                    what,
                    path: ino.and_then(|i| paths.get(&i).cloned()),
                    ino,
                    file_offset: off,
                });
            }
        }
        // Blocks of files unlinked while open.
        let loaded: Vec<_> = self.loaded.lock().values().cloned().collect();
        for ds in loaded {
            let mut w = Walk::default();
            if ds.orphan_blocks(&mut w).is_ok() {
                for id in w.blocks.iter().filter(|b| bad.contains(b)) {
                    out.entry(*id).or_default().push(Reference {
                        roots: vec![ds.name.clone()],
                        what: RefKind::Unlinked,
                        path: None,
                        ino: None,
                        file_offset: None,
                    });
                }
            }
        }
        Ok(out)
    }

    /// Paths of the inodes in `wanted`, from the directories of one root.
    fn paths_of(
        &self,
        inodes: &[(u64, InodeRecord)],
        wanted: &HashSet<u64>,
    ) -> HashMap<u64, String> {
        let dirs: HashMap<u64, Option<BlockId>> = inodes
            .iter()
            .filter(|(_, r)| r.meta.kind == FileKind::Directory)
            .map(|(i, r)| (*i, r.root))
            .collect();
        let mut out = HashMap::new();
        out.insert(ROOT_INO, "/".to_string());
        let mut queue = vec![(ROOT_INO, String::new())];
        let mut left = wanted.len();
        while let Some((dir, path)) = queue.pop() {
            if left == 0 {
                break;
            }
            let Some(Some(obj)) = dirs.get(&dir) else {
                continue;
            };
            let Ok(d) = self
                .store
                .get(obj)
                .and_then(|b| DirObject::decode(&b).map_err(|e| Error::CorruptMeta(e.to_string())))
            else {
                continue;
            };
            for e in d.entries {
                let p = format!("{path}/{}", String::from_utf8_lossy(&e.name));
                if wanted.contains(&e.ino) && !out.contains_key(&e.ino) {
                    left -= 1;
                }
                if e.kind == FileKind::Directory {
                    queue.push((e.ino, p.clone()));
                }
                out.entry(e.ino).or_insert(p);
            }
        }
        out
    }
}

/// One reference, for people and logs.
pub fn describe_ref(r: &Reference) -> String {
    describe(
        &r.roots,
        r.what.as_str(),
        r.path.as_deref(),
        r.ino,
        r.file_offset,
    )
}

/// "ROOTS: WHAT of PATH at offset N", the words of a reference wherever it is shown.
pub fn describe(
    roots: &[String],
    what: &str,
    path: Option<&str>,
    ino: Option<u64>,
    file_offset: Option<u64>,
) -> String {
    let mut s = format!("{}: {what}", roots.join(", "));
    match (path, ino) {
        (Some(p), _) => s.push_str(&format!(" of {p}")),
        (None, Some(i)) => s.push_str(&format!(" of inode {i}")),
        _ => {}
    }
    if let Some(o) = file_offset {
        s.push_str(&format!(" at offset {o}"));
    }
    s
}
