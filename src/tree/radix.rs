//! Persistent 256-way radix trees over u64 keys, stored as content-addressed [`Node`] objects.
//!
//! Invariants: nodes are immutable once stored; an update copies only the paths it changes, so
//! old roots stay valid (a snapshot is just a root) and unchanged subtrees are shared. A tree's
//! height is the root's level + 1; a lookup costs at most 8 node reads whatever the history of
//! the tree. Empty nodes are never stored: an empty tree is `None`.

use crate::store::{Error, Result, Store};
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use vdbfs_format::tree::Node;
use vdbfs_format::BlockId;

/// Decoded nodes by id. Nodes are immutable, so a cached node is never stale.
pub struct NodeCache {
    map: Mutex<HashMap<BlockId, Arc<Node>>>,
    capacity: usize,
}

impl NodeCache {
    pub fn new(capacity: usize) -> Self {
        NodeCache {
            map: Mutex::new(HashMap::new()),
            capacity,
        }
    }

    pub fn load(&self, store: &Store, id: &BlockId) -> Result<Arc<Node>> {
        if let Some(n) = self.map.lock().get(id) {
            return Ok(n.clone());
        }
        let bytes = store.get(id)?;
        let node = Arc::new(
            Node::decode(&bytes).map_err(|e| Error::CorruptMeta(format!("tree node {id}: {e}")))?,
        );
        let mut map = self.map.lock();
        if map.len() >= self.capacity {
            // Crude but bounded: drop everything; hot nodes come back on the next access.
            map.clear();
        }
        map.insert(*id, node.clone());
        Ok(node)
    }
}

impl NodeCache {
    /// A node from the cache if it is there, else read and decoded without caching it: for
    /// walks over many nodes (counting a file's blocks) that must not push the hot ones out.
    pub fn peek(&self, store: &Store, id: &BlockId) -> Result<Arc<Node>> {
        if let Some(n) = self.map.lock().get(id) {
            return Ok(n.clone());
        }
        let bytes = store.get(id)?;
        Ok(Arc::new(Node::decode(&bytes).map_err(|e| {
            Error::CorruptMeta(format!("tree node {id}: {e}"))
        })?))
    }
}

/// Calls `f(key, value)` for every entry with a key below `limit`, in key order; nodes are
/// read with [`NodeCache::peek`].
pub fn for_each(
    store: &Store,
    cache: &NodeCache,
    root: Option<BlockId>,
    limit: u64,
    f: &mut dyn FnMut(u64, &[u8]) -> Result<()>,
) -> Result<()> {
    let Some(root) = root else {
        return Ok(());
    };
    // (node, the first key it covers); children pushed in reverse to visit keys in order.
    let mut stack = vec![(root, 0u64)];
    while let Some((id, base)) = stack.pop() {
        let node = cache.peek(store, &id)?;
        if node.level == 0 {
            for (slot, v) in &node.entries {
                let key = base + *slot as u64;
                if key >= limit {
                    break;
                }
                f(key, v)?;
            }
            continue;
        }
        for (slot, v) in node.entries.iter().rev() {
            let child_base = base as u128 + ((*slot as u128) << shift(node.level));
            if child_base < limit as u128 {
                stack.push((child_id(v)?, child_base as u64));
            }
        }
    }
    Ok(())
}

fn child_id(v: &[u8]) -> Result<BlockId> {
    let arr: [u8; 32] = v
        .try_into()
        .map_err(|_| Error::CorruptMeta("tree node child id".into()))?;
    Ok(BlockId(arr))
}

fn shift(level: u8) -> u32 {
    8 * level as u32
}

/// Number of keys a node at `level` covers: 256^(level+1), saturating at u64::MAX + 1.
fn node_span(level: u8) -> u128 {
    1u128 << (8 * (level as u32 + 1))
}

pub fn get(
    store: &Store,
    cache: &NodeCache,
    root: Option<BlockId>,
    key: u64,
) -> Result<Option<Vec<u8>>> {
    let Some(mut id) = root else {
        return Ok(None);
    };
    let mut node = cache.load(store, &id)?;
    if (key as u128) >= node_span(node.level) {
        return Ok(None);
    }
    loop {
        let slot = ((key >> shift(node.level)) & 0xff) as u8;
        let Ok(i) = node.entries.binary_search_by_key(&slot, |e| e.0) else {
            return Ok(None);
        };
        if node.level == 0 {
            return Ok(Some(node.entries[i].1.clone()));
        }
        id = child_id(&node.entries[i].1)?;
        node = cache.load(store, &id)?;
    }
}

/// Returns the root of a tree equal to `root` with every key >= `limit` removed and then each
/// change applied (`None` removes the key).
pub fn update(
    store: &Store,
    cache: &NodeCache,
    root: Option<BlockId>,
    limit: u64,
    changes: &BTreeMap<u64, Option<Vec<u8>>>,
) -> Result<Option<BlockId>> {
    let mut root = root;
    let mut level = match root {
        Some(id) => cache.load(store, &id)?.level,
        None => 0,
    };
    if let Some(max) = changes
        .iter()
        .rev()
        .find(|(_, v)| v.is_some())
        .map(|(k, _)| *k)
    {
        while (max as u128) >= node_span(level) {
            if let Some(r) = root {
                let node = Node {
                    level: level + 1,
                    entries: vec![(0, r.0.to_vec())],
                };
                root = Some(store.put(&node.encode())?);
            }
            level += 1;
        }
    }
    // Removals of keys beyond the tree's span remove nothing.
    let changes: Vec<(u64, Option<&Vec<u8>>)> = changes
        .iter()
        .filter(|(k, _)| (**k as u128) < node_span(level))
        .map(|(k, v)| (*k, v.as_ref()))
        .collect();
    apply(store, cache, root, level, 0, limit, &changes)
}

fn apply(
    store: &Store,
    cache: &NodeCache,
    id: Option<BlockId>,
    level: u8,
    base: u64,
    limit: u64,
    changes: &[(u64, Option<&Vec<u8>>)],
) -> Result<Option<BlockId>> {
    let span = node_span(level);
    let truncates = (limit as u128) < base as u128 + span;
    if changes.is_empty() && !truncates {
        return Ok(id);
    }
    let mut entries: BTreeMap<u8, Vec<u8>> = match id {
        Some(id) if base < limit => cache.load(store, &id)?.entries.iter().cloned().collect(),
        _ => BTreeMap::new(),
    };
    if level == 0 {
        if truncates {
            entries.retain(|slot, _| base + (*slot as u64) < limit);
        }
        for (key, v) in changes {
            let slot = (key - base) as u8;
            match v {
                Some(v) => entries.insert(slot, (*v).clone()),
                None => entries.remove(&slot),
            };
        }
    } else {
        let child_span = 1u64 << shift(level);
        let mut i = 0;
        let mut slots: Vec<u8> = Vec::new();
        while i < changes.len() {
            let slot = ((changes[i].0 - base) >> shift(level)) as u8;
            slots.push(slot);
            while i < changes.len() && ((changes[i].0 - base) >> shift(level)) as u8 == slot {
                i += 1;
            }
        }
        if truncates {
            // Children wholly at or past the limit go; the one straddling it is visited.
            entries.retain(|slot, _| base + (*slot as u64) * child_span < limit);
            if limit > base {
                let s = ((limit - base) / child_span) as u8;
                if !slots.contains(&s) {
                    slots.push(s);
                    slots.sort_unstable();
                }
            }
        }
        let mut start = 0;
        for slot in slots {
            let child_base = base + slot as u64 * child_span;
            let end = changes[start..]
                .iter()
                .position(|(k, _)| ((k - base) >> shift(level)) as u8 != slot)
                .map_or(changes.len(), |p| start + p);
            let sub = if start < changes.len()
                && ((changes[start].0 - base) >> shift(level)) as u8 == slot
            {
                let s = &changes[start..end];
                start = end;
                s
            } else {
                &[][..]
            };
            let old = match entries.get(&slot) {
                Some(v) => Some(child_id(v)?),
                None => None,
            };
            match apply(store, cache, old, level - 1, child_base, limit, sub)? {
                Some(c) => entries.insert(slot, c.0.to_vec()),
                None => entries.remove(&slot),
            };
        }
    }
    if entries.is_empty() {
        return Ok(None);
    }
    let node = Node {
        level,
        entries: entries.into_iter().collect(),
    };
    Ok(Some(store.put(&node.encode())?))
}
