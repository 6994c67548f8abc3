//! The remote tables of the index as typed operations (FORMAT.md, "Remote: packs and manifests
//! in an object store", "Store side"): which of this store's packs are in the bucket, and where
//! the blocks of other hosts' published snapshots are. `crate::remote` keeps the protocol (what
//! is uploaded when, what a manifest may name); this module is where those redb tables are
//! opened, like `catalog` for the tree layer's.
//!
//! Invariants:
//! - A pack is recorded in `remote_uploaded` only by [`Store::mark_remote_uploaded`], which the
//!   uploader calls after the object's upload completed.
//! - An imported manifest's objects and block locations are written in one transaction: a block
//!   location never names an object number that is not in `remote_objects`; an object key
//!   keeps its number once given (`remote_keys`), so manifests of one object share it.
//! - A record that does not decode, or a location naming an unknown object, is corruption
//!   (`Error::CorruptMeta`), never a guess.

use super::{Error, Result, Store, REMOTE_BLOCKS, REMOTE_KEYS, REMOTE_OBJECTS, REMOTE_UPLOADED};
use redb::{ReadableDatabase, ReadableTable};
use std::collections::HashMap;
use vdbfs_format::BlockId;

/// Where a published copy of a block is: one whole record of a remote object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteBlock {
    /// The object's key, relative to the bucket's prefix.
    pub key: String,
    /// The record format of the object (1 or 2, as in `remote_objects`).
    pub format: u8,
    pub offset: u64,
    pub len: u32,
}

/// One block location of an imported manifest: `object` indexes the manifest's objects.
#[derive(Debug, Clone, Copy)]
pub struct ImportedBlock {
    pub id: BlockId,
    pub object: u32,
    pub offset: u64,
    pub len: u32,
}

impl Store {
    /// This store's packs that are in the bucket: pack number -> record format.
    pub fn remote_uploaded(&self) -> Result<HashMap<u32, u8>> {
        let txn = self.db().begin_read()?;
        let t = txn.open_table(REMOTE_UPLOADED)?;
        let mut out = HashMap::new();
        for row in t.iter()? {
            let (k, v) = row?;
            out.insert(k.value(), v.value());
        }
        Ok(out)
    }

    /// Records that pack `no` (of record format `format`) is in the bucket, whole.
    pub fn mark_remote_uploaded(&self, no: u32, format: u8) -> Result<()> {
        let txn = self.begin_write()?;
        txn.open_table(REMOTE_UPLOADED)?.insert(no, format)?;
        txn.commit()?;
        Ok(())
    }

    /// Forgets that pack `no` is in the bucket (its object was deleted by the remote gc).
    pub fn unmark_remote_uploaded(&self, no: u32) -> Result<()> {
        let txn = self.begin_write()?;
        txn.open_table(REMOTE_UPLOADED)?.remove(no)?;
        txn.commit()?;
        Ok(())
    }

    /// Where each of `ids` has a published copy (None: no manifest this store imported names
    /// it), from one read transaction.
    pub fn remote_blocks(&self, ids: &[BlockId]) -> Result<Vec<Option<RemoteBlock>>> {
        let txn = self.db().begin_read()?;
        let blocks = txn.open_table(REMOTE_BLOCKS)?;
        let objects = txn.open_table(REMOTE_OBJECTS)?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            let Some(v) = blocks.get(id.0.as_slice())? else {
                out.push(None);
                continue;
            };
            let (no, offset, len) = decode_location(v.value())?;
            let ov = objects
                .get(no)?
                .ok_or_else(|| Error::CorruptMeta(format!("remote object {no} is unknown")))?;
            let (format, key) = decode_object(ov.value())?;
            out.push(Some(RemoteBlock {
                key,
                format,
                offset,
                len,
            }));
        }
        Ok(out)
    }

    /// Records the objects (record format, key) and block locations of an imported manifest,
    /// in one transaction.
    pub fn import_remote_blocks(
        &self,
        objects: &[(u8, String)],
        blocks: impl IntoIterator<Item = ImportedBlock>,
    ) -> Result<()> {
        let txn = self.begin_write()?;
        {
            let mut keys = txn.open_table(REMOTE_KEYS)?;
            let mut objs = txn.open_table(REMOTE_OBJECTS)?;
            let mut locs = txn.open_table(REMOTE_BLOCKS)?;
            let mut next = objs.last()?.map(|(k, _)| k.value() + 1).unwrap_or(1);
            let mut local = Vec::with_capacity(objects.len());
            for (format, k) in objects {
                let existing = keys.get(k.as_str())?.map(|v| v.value());
                let no = match existing {
                    Some(n) => n,
                    None => {
                        let n = next;
                        next += 1;
                        keys.insert(k.as_str(), n)?;
                        let mut v = vec![*format];
                        v.extend_from_slice(k.as_bytes());
                        objs.insert(n, v.as_slice())?;
                        n
                    }
                };
                local.push(no);
            }
            for b in blocks {
                let no = *local.get(b.object as usize).ok_or_else(|| {
                    Error::CorruptMeta(format!(
                        "manifest entry names object {} of {}",
                        b.object,
                        local.len()
                    ))
                })?;
                let mut v = Vec::with_capacity(16);
                v.extend_from_slice(&no.to_le_bytes());
                v.extend_from_slice(&b.offset.to_le_bytes());
                v.extend_from_slice(&b.len.to_le_bytes());
                locs.insert(b.id.0.as_slice(), v.as_slice())?;
            }
        }
        txn.commit()?;
        Ok(())
    }
}

/// A `remote_blocks` value: object number u32, offset u64, length u32.
fn decode_location(v: &[u8]) -> Result<(u32, u64, u32)> {
    let bad = || Error::CorruptMeta(format!("remote block location of {} bytes", v.len()));
    if v.len() != 16 {
        return Err(bad());
    }
    let no = u32::from_le_bytes(v[0..4].try_into().map_err(|_| bad())?);
    let off = u64::from_le_bytes(v[4..12].try_into().map_err(|_| bad())?);
    let len = u32::from_le_bytes(v[12..16].try_into().map_err(|_| bad())?);
    Ok((no, off, len))
}

/// A `remote_objects` value: record format u8, then the key.
fn decode_object(v: &[u8]) -> Result<(u8, String)> {
    let (f, k) = v
        .split_first()
        .ok_or_else(|| Error::CorruptMeta("empty remote object record".into()))?;
    let key = String::from_utf8(k.to_vec())
        .map_err(|_| Error::CorruptMeta("remote object key is not UTF-8".into()))?;
    Ok((*f, key))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        Store::create(dir.path()).unwrap();
        let (s, _) = Store::open_with(dir.path(), crate::store::sim::SimIo::new()).unwrap();
        (dir, s)
    }

    #[test]
    fn imported_blocks_name_their_objects_and_keys_keep_their_numbers() {
        let (_d, s) = store();
        let id = |b: u8| BlockId([b; 32]);
        let objects = vec![
            (2u8, "packs/a/1.pack".to_string()),
            (1, "packs/a/2.pack".into()),
        ];
        let imported = |object, b: u8| ImportedBlock {
            id: id(b),
            object,
            offset: u64::from(b) * 100,
            len: 60 + u32::from(b),
        };
        s.import_remote_blocks(&objects, [imported(0, 1), imported(1, 2)])
            .unwrap();
        // A second manifest naming one known and one new object.
        let objects2 = vec![
            (1u8, "packs/a/2.pack".to_string()),
            (2, "packs/b/1.pack".into()),
        ];
        s.import_remote_blocks(&objects2, [imported(0, 3), imported(1, 4)])
            .unwrap();
        let got = s
            .remote_blocks(&[id(1), id(2), id(3), id(4), id(9)])
            .unwrap();
        let want = |key: &str, format, b: u8| {
            Some(RemoteBlock {
                key: key.into(),
                format,
                offset: u64::from(b) * 100,
                len: 60 + u32::from(b),
            })
        };
        assert_eq!(
            got,
            vec![
                want("packs/a/1.pack", 2, 1),
                want("packs/a/2.pack", 1, 2),
                want("packs/a/2.pack", 1, 3),
                want("packs/b/1.pack", 2, 4),
                None
            ]
        );
        // An entry naming an object the manifest does not have is refused, nothing written.
        let bad = s.import_remote_blocks(&objects, [imported(0, 5), imported(7, 6)]);
        assert!(matches!(bad, Err(Error::CorruptMeta(_))), "{bad:?}");
        assert_eq!(s.remote_blocks(&[id(5)]).unwrap(), vec![None]);
    }

    #[test]
    fn uploaded_packs_are_recorded_with_their_format() {
        let (_d, s) = store();
        assert!(s.remote_uploaded().unwrap().is_empty());
        s.mark_remote_uploaded(3, 2).unwrap();
        s.mark_remote_uploaded(1, 1).unwrap();
        let got = s.remote_uploaded().unwrap();
        assert_eq!(got, HashMap::from([(1, 1), (3, 2)]));
    }
}
