//! Walks over committed trees: marking every block a root references (for GC) and space
//! accounting (for `vdbfs df`). Shared subtrees are visited once per walk (`seen`), so a walk
//! over many clones costs what they hold in common once, plus what each changed.

use crate::store::{Error, Result, Store};
use crate::tree::radix::NodeCache;
use std::collections::HashSet;
use vdbfs_format::tree::{FileKind, InodeRecord};
use vdbfs_format::BlockId;

#[derive(Default)]
pub struct Walk {
    /// Every block reached: tree nodes, directory objects, data blocks.
    pub blocks: HashSet<BlockId>,
    /// Sum of the sizes of regular files (counted once per inode).
    pub logical_bytes: u64,
    pub files: u64,
}

fn id32(v: &[u8]) -> Result<BlockId> {
    let arr: [u8; 32] = v
        .try_into()
        .map_err(|_| Error::CorruptMeta("block id length".into()))?;
    Ok(BlockId(arr))
}

/// Visits every node of a radix tree; `leaf` gets each level-0 value. Subtrees already in
/// `w.blocks` are skipped.
fn radix(
    store: &Store,
    cache: &NodeCache,
    root: BlockId,
    w: &mut Walk,
    leaf: &mut dyn FnMut(&[u8], &mut Walk) -> Result<()>,
) -> Result<()> {
    let mut stack = vec![root];
    while let Some(id) = stack.pop() {
        if !w.blocks.insert(id) {
            continue;
        }
        let node = cache.load(store, &id)?;
        for (_, v) in &node.entries {
            if node.level == 0 {
                leaf(v, w)?;
            } else {
                stack.push(id32(v)?);
            }
        }
    }
    Ok(())
}

/// Walks one file's block map, adding its nodes and data blocks to `w`.
pub fn walk_file_map(
    store: &Store,
    cache: &NodeCache,
    map: Option<BlockId>,
    w: &mut Walk,
) -> Result<()> {
    let Some(map) = map else { return Ok(()) };
    radix(store, cache, map, w, &mut |b, w| {
        w.blocks.insert(id32(b)?);
        Ok(())
    })
}

/// Walks one dataset or snapshot root, adding to `w`.
pub fn walk_root(
    store: &Store,
    cache: &NodeCache,
    root: Option<BlockId>,
    w: &mut Walk,
) -> Result<()> {
    let Some(root) = root else { return Ok(()) };
    radix(store, cache, root, w, &mut |v, w| {
        let rec = InodeRecord::decode(v)?;
        match rec.meta.kind {
            FileKind::Regular => {
                w.logical_bytes += rec.meta.size;
                w.files += 1;
                walk_file_map(store, cache, rec.root, w)?;
            }
            FileKind::Directory => {
                if let Some(d) = rec.root {
                    w.blocks.insert(d);
                }
            }
            _ => {}
        }
        Ok(())
    })
}
