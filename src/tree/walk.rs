//! Walks over committed trees: marking every block a root references (for GC) and space
//! accounting (for `vdbfs df`). Both read each distinct tree object once, however many roots
//! share it, so walking many clones costs what they hold in common once, plus what each
//! changed. Neither goes through the data path's node cache.

use crate::store::{Error, Result, Store};
use std::collections::HashSet;
use vdbfs_format::tree::{FileKind, InodeRecord};
use vdbfs_format::BlockId;

/// What a collection's mark phase found live, in memory bounded by the number of tree
/// objects rather than of blocks: tree objects (inode-table and block-map nodes, directory
/// objects) are kept exactly, since the walk skips a subtree whose node it has seen; data blocks
/// go into a Bloom filter. A data block the filter wrongly calls live is only kept one more
/// collection (each collection seeds the filter differently); a live block is never called
/// garbage.
pub struct Marks {
    objects: HashSet<BlockId>,
    leaves: Bloom,
}

impl Marks {
    /// Marks sized for about `blocks` data blocks.
    pub fn new(blocks: u64, seed: u64) -> Marks {
        Marks {
            objects: HashSet::new(),
            leaves: Bloom::new(blocks, seed),
        }
    }

    /// Whether `id` may be live (certainly for every block a marked root references).
    pub fn contains(&self, id: &BlockId) -> bool {
        self.objects.contains(id) || self.leaves.contains(id)
    }

    pub fn add_block(&mut self, id: &BlockId) {
        self.leaves.insert(id);
    }

    /// Memory held, in bytes (for reports).
    pub fn bytes(&self) -> usize {
        self.objects.capacity() * 40 + self.leaves.bits.len() * 8
    }
}

/// Where a walk puts what it reaches (see [`Marks`] and [`Walk`]).
pub trait BlockSink {
    /// A file's block map: its nodes and data blocks.
    fn file_map(&mut self, store: &Store, map: Option<BlockId>) -> Result<()>;
    /// One data block.
    fn block(&mut self, id: &BlockId);
}

impl BlockSink for Marks {
    fn file_map(&mut self, store: &Store, map: Option<BlockId>) -> Result<()> {
        mark_file_map(store, map, self)
    }
    fn block(&mut self, id: &BlockId) {
        self.add_block(id);
    }
}

/// Every block some roots reach, exactly (for uses that need the set itself: scrub, damage
/// attribution; the collector uses the bounded [`Marks`]).
#[derive(Default)]
pub struct Walk {
    /// Every block reached: tree nodes, directory objects, data blocks.
    pub blocks: HashSet<BlockId>,
    /// Sum of the sizes of regular files (counted once per inode).
    pub logical_bytes: u64,
    pub files: u64,
}

impl BlockSink for Walk {
    fn file_map(&mut self, store: &Store, map: Option<BlockId>) -> Result<()> {
        walk_file_map(store, map, self)
    }
    fn block(&mut self, id: &BlockId) {
        self.blocks.insert(*id);
    }
}

/// Adds one file's block map (nodes and data blocks) to `w`.
pub fn walk_file_map(store: &Store, map: Option<BlockId>, w: &mut Walk) -> Result<()> {
    let Some(map) = map else { return Ok(()) };
    let mut stack = vec![map];
    while let Some(id) = stack.pop() {
        if !w.blocks.insert(id) {
            continue;
        }
        let node = load(store, &id)?;
        for (_, v) in &node.entries {
            if node.level == 0 {
                w.blocks.insert(id32(v)?);
            } else {
                stack.push(id32(v)?);
            }
        }
    }
    Ok(())
}

/// Adds everything one dataset or snapshot root references to `w`.
pub fn walk_root(store: &Store, root: Option<BlockId>, w: &mut Walk) -> Result<()> {
    let Some(root) = root else { return Ok(()) };
    let mut stack = vec![root];
    while let Some(id) = stack.pop() {
        if !w.blocks.insert(id) {
            continue;
        }
        let node = load(store, &id)?;
        for (_, v) in &node.entries {
            if node.level > 0 {
                stack.push(id32(v)?);
                continue;
            }
            let rec = InodeRecord::decode(v)?;
            match rec.meta.kind {
                FileKind::Regular => {
                    w.logical_bytes += rec.meta.size;
                    w.files += 1;
                    walk_file_map(store, rec.root, w)?;
                }
                FileKind::Directory => {
                    if let Some(d) = rec.root {
                        w.blocks.insert(d);
                    }
                }
                _ => {}
            }
        }
    }
    Ok(())
}

/// A Bloom filter over block ids. The ids are blake3 hashes, so their bytes are already
/// uniformly random: the probe positions come from two of their 64-bit words (double hashing),
/// mixed with a per-collection seed. 16 bits per block and 8 probes: about 0.05 % false
/// positives. (Small enough to write here rather than take a dependency for.)
struct Bloom {
    bits: Vec<u64>,
    seed: u64,
}

const BLOOM_PROBES: u64 = 8;

impl Bloom {
    fn new(blocks: u64, seed: u64) -> Bloom {
        let words = (blocks.max(1024) * 16).div_ceil(64);
        Bloom {
            bits: vec![0; words as usize],
            seed,
        }
    }
    fn probes(&self, id: &BlockId) -> impl Iterator<Item = usize> {
        let word = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&id.0[i * 8..i * 8 + 8]);
            u64::from_le_bytes(b)
        };
        let h1 = word(0) ^ self.seed;
        let h2 = word(1) | 1;
        let m = self.bits.len() as u64 * 64;
        (0..BLOOM_PROBES).map(move |i| (h1.wrapping_add(i.wrapping_mul(h2)) % m) as usize)
    }
    fn insert(&mut self, id: &BlockId) {
        let probes: Vec<usize> = self.probes(id).collect();
        for p in probes {
            self.bits[p / 64] |= 1 << (p % 64);
        }
    }
    fn contains(&self, id: &BlockId) -> bool {
        self.probes(id)
            .all(|p| self.bits[p / 64] & (1 << (p % 64)) != 0)
    }
}

fn id32(v: &[u8]) -> Result<BlockId> {
    let arr: [u8; 32] = v
        .try_into()
        .map_err(|_| Error::CorruptMeta("block id length".into()))?;
    Ok(BlockId(arr))
}

/// Visits every node of a radix tree not marked yet; `leaf` gets each level-0 value.
fn radix(
    store: &Store,
    root: BlockId,
    m: &mut Marks,
    leaf: &mut dyn FnMut(&[u8], &mut Marks) -> Result<()>,
) -> Result<()> {
    let mut stack = vec![root];
    while let Some(id) = stack.pop() {
        if !m.objects.insert(id) {
            continue;
        }
        let node = load(store, &id)?;
        for (_, v) in &node.entries {
            if node.level == 0 {
                leaf(v, m)?;
            } else {
                stack.push(id32(v)?);
            }
        }
    }
    Ok(())
}

/// Marks one file's block map: its nodes and data blocks.
pub fn mark_file_map(store: &Store, map: Option<BlockId>, m: &mut Marks) -> Result<()> {
    let Some(map) = map else { return Ok(()) };
    radix(store, map, m, &mut |b, m| {
        m.leaves.insert(&id32(b)?);
        Ok(())
    })
}

/// Marks everything one dataset or snapshot root references.
pub fn mark_root(store: &Store, root: Option<BlockId>, m: &mut Marks) -> Result<()> {
    let Some(root) = root else { return Ok(()) };
    radix(store, root, m, &mut |v, m| {
        let rec = InodeRecord::decode(v)?;
        match rec.meta.kind {
            FileKind::Regular => mark_file_map(store, rec.root, m)?,
            FileKind::Directory => {
                if let Some(d) = rec.root {
                    m.objects.insert(d);
                }
            }
            _ => {}
        }
        Ok(())
    })
}

/// Which roots reach each block, for space accounting (`vdbfs df`, a VDB's unique bytes).
///
/// Every tree object is read once, however many roots share it: roots set bits on the objects
/// they point at, and the bits flow down the trees level by level (a radix node's children are
/// exactly one level below it, so once every node of a level is done, the next level's masks are
/// complete). Tree objects get a map entry and a mask each; data blocks, a hundred times more
/// numerous, only a 36-byte entry per (block-map leaf, block) in a vector that is sorted once,
/// so that the index, which iterates in block-id order, is joined with it by a moving cursor
/// ([`CensusCursor`]): no hash table and no mask per data block.
pub struct Census {
    words: usize,
    /// Tree objects: their slot in `masks` and `raw`.
    slots: std::collections::HashMap<BlockId, u32>,
    /// `words` u64s per slot: the roots that reach the object.
    masks: Vec<u64>,
    /// Encoded size per slot (0: unknown yet, a directory object).
    raw: Vec<u32>,
    /// Data blocks: (block, slot of a block-map leaf holding it), sorted, without repeats. A
    /// block's roots are the union of the masks of the leaves holding it.
    data: Vec<(BlockId, u32)>,
    /// Per root: the sum of its regular files' sizes.
    pub logical: Vec<u64>,
}

impl Census {
    pub fn of(store: &Store, roots: &[Option<BlockId>]) -> Result<Census> {
        let words = roots.len().div_ceil(64).max(1);
        let mut c = Census {
            words,
            slots: std::collections::HashMap::new(),
            masks: Vec::new(),
            raw: Vec::new(),
            data: Vec::new(),
            logical: vec![0; roots.len()],
        };
        let mut inode_nodes: [Vec<BlockId>; 9] = Default::default();
        for (r, root) in roots.iter().enumerate() {
            let Some(root) = root else { continue };
            let (s, fresh) = c.slot(*root, 0);
            c.masks[s * words + r / 64] |= 1 << (r % 64);
            if fresh {
                let level = load(store, root)?.level;
                inode_nodes[level.min(8) as usize].push(*root);
            }
        }
        // The inode tables: regular files' block maps and directory objects get the masks of
        // the inode-table leaves that hold them.
        let mut map_nodes: [Vec<BlockId>; 9] = Default::default();
        c.flow(store, inode_nodes, &mut |c, _slot, mask, v| {
            let rec = InodeRecord::decode(v)?;
            match rec.meta.kind {
                FileKind::Regular => {
                    for (r, l) in c.logical.iter_mut().enumerate() {
                        if mask[r / 64] & (1 << (r % 64)) != 0 {
                            *l += rec.meta.size;
                        }
                    }
                    if let Some(m) = rec.root {
                        let (s, fresh) = c.slot(m, 0);
                        c.or_mask(s, mask);
                        if fresh {
                            let level = load(store, &m)?.level;
                            map_nodes[level.min(8) as usize].push(m);
                        }
                    }
                }
                FileKind::Directory => {
                    if let Some(d) = rec.root {
                        let (s, _) = c.slot(d, 0);
                        c.or_mask(s, mask);
                    }
                }
                _ => {}
            }
            Ok(())
        })?;
        // The block maps: each data block is listed with the leaf that holds it (whose mask is
        // complete when the leaf is reached).
        c.flow(store, map_nodes, &mut |c, slot, _mask, v| {
            c.data.push((id32(v)?, slot));
            Ok(())
        })?;
        c.data.sort_unstable();
        c.data.dedup();
        c.data.shrink_to_fit();
        Ok(c)
    }

    /// Pushes masks down the radix trees whose nodes are listed by level, highest first;
    /// `leaf` gets each level-0 value with its node's slot and mask.
    #[allow(clippy::type_complexity)]
    fn flow(
        &mut self,
        store: &Store,
        mut by_level: [Vec<BlockId>; 9],
        leaf: &mut dyn FnMut(&mut Census, u32, &[u64], &[u8]) -> Result<()>,
    ) -> Result<()> {
        for level in (0..9).rev() {
            for id in std::mem::take(&mut by_level[level]) {
                let node = load(store, &id)?;
                let s = self.slots[&id];
                let su = s as usize;
                let mask = self.masks[su * self.words..(su + 1) * self.words].to_vec();
                self.raw[su] = node_len(&node);
                for (_, v) in &node.entries {
                    if node.level == 0 {
                        leaf(self, s, &mask, v)?;
                    } else if level > 0 {
                        let (cs, fresh) = self.slot(id32(v)?, 0);
                        self.or_mask(cs, &mask);
                        if fresh {
                            by_level[level - 1].push(id32(v)?);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// The slot of tree object `id`, made on first sight (then `true`).
    fn slot(&mut self, id: BlockId, raw: u32) -> (usize, bool) {
        let next = self.raw.len() as u32;
        let s = *self.slots.entry(id).or_insert(next);
        if s == next {
            self.raw.push(raw);
            self.masks.extend(std::iter::repeat_n(0, self.words));
            (s as usize, true)
        } else {
            (s as usize, false)
        }
    }

    fn or_mask(&mut self, s: usize, mask: &[u64]) {
        for (m, b) in self.masks[s * self.words..(s + 1) * self.words]
            .iter_mut()
            .zip(mask)
        {
            *m |= b;
        }
    }

    /// A reader of the census for ids asked in ascending order (as the index lists them);
    /// other orders work too, only slower.
    pub fn cursor(&self) -> CensusCursor<'_> {
        CensusCursor {
            c: self,
            at: 0,
            mask: vec![0; self.words],
        }
    }
}

/// See [`Census::cursor`].
pub struct CensusCursor<'a> {
    c: &'a Census,
    /// The first data entry not below the last id asked.
    at: usize,
    mask: Vec<u64>,
}

impl CensusCursor<'_> {
    /// The roots reaching `id` (a bitset over root indexes) and its uncompressed size (0 if
    /// unknown: directory objects), if any root reaches it.
    pub fn get(&mut self, id: &BlockId) -> Option<(&[u64], u32)> {
        let c = self.c;
        let data = &c.data;
        if self.at > 0 && data[self.at - 1].0 >= *id {
            // Asked out of order: find the place again.
            self.at = data.partition_point(|(b, _)| b < id);
        }
        while self.at < data.len() && data[self.at].0 < *id {
            self.at += 1;
        }
        self.mask.iter_mut().for_each(|m| *m = 0);
        let mut raw = None;
        if let Some(&s) = c.slots.get(id) {
            let s = s as usize;
            self.mask
                .copy_from_slice(&c.masks[s * c.words..(s + 1) * c.words]);
            raw = Some(c.raw[s]);
        }
        let mut i = self.at;
        while i < data.len() && data[i].0 == *id {
            let s = data[i].1 as usize;
            for (m, b) in self
                .mask
                .iter_mut()
                .zip(&c.masks[s * c.words..(s + 1) * c.words])
            {
                *m |= b;
            }
            raw = Some(vdbfs_format::BLOCK_SIZE as u32);
            i += 1;
        }
        raw.map(|r| (self.mask.as_slice(), r))
    }
}

/// Hands the heap a whole-store pass freed back to the kernel when dropped. glibc keeps freed
/// memory in its arenas, so without this the daemon's RSS stays at the peak of its largest
/// census, mark set or scrub set long after the pass (887 MiB at rest after a `df` of a 50 GiB
/// store). Declare it first in a pass, so that it drops after the pass's own maps.
pub struct TrimOnDrop;

impl Drop for TrimOnDrop {
    fn drop(&mut self) {
        // SAFETY: malloc_trim only walks and releases glibc's own free lists.
        #[cfg(target_env = "gnu")]
        unsafe {
            libc::malloc_trim(0);
        }
    }
}

/// Reads a tree node without going through (and churning) the data path's node cache.
fn load(store: &Store, id: &BlockId) -> Result<vdbfs_format::tree::Node> {
    vdbfs_format::tree::Node::decode(&store.get(id)?)
        .map_err(|e| Error::CorruptMeta(format!("tree node {id}: {e}")))
}

/// The encoded length of a node (tag, version, level, count, entries).
fn node_len(n: &vdbfs_format::tree::Node) -> u32 {
    5 + n
        .entries
        .iter()
        .map(|(_, v)| 5 + v.len() as u32)
        .sum::<u32>()
}
