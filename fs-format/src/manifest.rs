//! Published-snapshot manifests: the immutable object a host writes to the object store once
//! every block a snapshot references is uploaded (FORMAT.md, "Remote: manifests").
//!
//! Invariants: the encoding ends with the blake3 of every byte before it, and the decoder
//! checks it before trusting any field; the header is length-prefixed so that a reader can
//! decode it from a prefix of the object (`decode_header`), without the block list.

use crate::tree::{get_opt_id, put_opt_id, Timestamp};
use crate::wire::{Reader, Writer};
use crate::{BlockId, FormatError};

pub const MANIFEST_MAGIC: [u8; 8] = *b"vdbfsMAN";
pub const MANIFEST_VERSION: u32 = 1;
/// Bytes of one block entry: id 32, object u32, offset u64, length u32.
pub const MANIFEST_ENTRY_LEN: usize = 48;

/// What a manifest says about the snapshot (everything but the block list).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestHeader {
    /// The publishing store's id (its remote prefix for packs).
    pub publisher: String,
    pub dataset: String,
    pub snapshot: String,
    pub created: Timestamp,
    /// When it was published.
    pub published: Timestamp,
    pub root: Option<BlockId>,
    pub next_ino: u64,
    /// The snapshot's JSON properties (LSN, timeline, ...) as recorded by the publisher; empty if none.
    pub props: Vec<u8>,
    /// Pack objects the blocks live in: (record format of the pack, key under the remote prefix).
    pub objects: Vec<(u8, String)>,
    pub blocks: u64,
}

/// Where one block is: `objects[object]`, bytes `offset..offset+len` (one whole record).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ManifestEntry {
    pub id: BlockId,
    pub object: u32,
    pub offset: u64,
    pub len: u32,
}

fn encode_header(h: &ManifestHeader) -> Vec<u8> {
    let mut w = Writer::new();
    w.blob(h.publisher.as_bytes());
    w.blob(h.dataset.as_bytes());
    w.blob(h.snapshot.as_bytes());
    w.i64(h.created.secs);
    w.u32(h.created.nsecs);
    w.i64(h.published.secs);
    w.u32(h.published.nsecs);
    put_opt_id(&mut w, &h.root);
    w.u64(h.next_ino);
    w.blob(&h.props);
    w.u32(h.objects.len() as u32);
    for (format, key) in &h.objects {
        w.u8(*format);
        w.blob(key.as_bytes());
    }
    w.u64(h.blocks);
    w.buf
}

/// Encodes a manifest; `header.blocks` is set from `entries`.
pub fn encode(header: &ManifestHeader, entries: &[ManifestEntry]) -> Vec<u8> {
    let mut h = header.clone();
    h.blocks = entries.len() as u64;
    let head = encode_header(&h);
    let mut w = Writer::new();
    w.bytes(&MANIFEST_MAGIC);
    w.u32(MANIFEST_VERSION);
    w.blob(&head);
    for e in entries {
        w.bytes(&e.id.0);
        w.u32(e.object);
        w.u64(e.offset);
        w.u32(e.len);
    }
    let sum = blake3::hash(&w.buf);
    w.bytes(sum.as_bytes());
    w.buf
}

fn string(b: &[u8], what: &'static str) -> Result<String, FormatError> {
    String::from_utf8(b.to_vec()).map_err(|_| FormatError::Invalid(what))
}

fn decode_header_bytes(buf: &[u8]) -> Result<ManifestHeader, FormatError> {
    let mut r = Reader::new(buf, "manifest header");
    let publisher = string(r.blob()?, "manifest publisher")?;
    let dataset = string(r.blob()?, "manifest dataset")?;
    let snapshot = string(r.blob()?, "manifest snapshot")?;
    let created = Timestamp {
        secs: r.i64()?,
        nsecs: r.u32()?,
    };
    let published = Timestamp {
        secs: r.i64()?,
        nsecs: r.u32()?,
    };
    let root = get_opt_id(&mut r)?;
    let next_ino = r.u64()?;
    let props = r.blob()?.to_vec();
    let n = r.u32()?;
    let mut objects = Vec::new();
    for _ in 0..n {
        let format = r.u8()?;
        if format != 1 && format != 2 {
            return Err(FormatError::Invalid("manifest object record format"));
        }
        objects.push((format, string(r.blob()?, "manifest object key")?));
    }
    let blocks = r.u64()?;
    r.finish()?;
    Ok(ManifestHeader {
        publisher,
        dataset,
        snapshot,
        created,
        published,
        root,
        next_ino,
        props,
        objects,
        blocks,
    })
}

/// Decodes the header from the first bytes of a manifest (any prefix that holds it). The
/// header is not covered by a check until the whole object is read ([`decode`]): use it for
/// listings only.
pub fn decode_header(prefix: &[u8]) -> Result<ManifestHeader, FormatError> {
    let mut r = Reader::new(prefix, "manifest");
    if r.take(8)? != MANIFEST_MAGIC {
        return Err(FormatError::BadMagic("manifest"));
    }
    let v = r.u32()?;
    if v != MANIFEST_VERSION {
        return Err(FormatError::BadVersion {
            what: "manifest",
            found: v,
            supported: MANIFEST_VERSION,
        });
    }
    decode_header_bytes(r.blob()?)
}

/// Decodes and checks a whole manifest.
pub fn decode(buf: &[u8]) -> Result<(ManifestHeader, Vec<ManifestEntry>), FormatError> {
    if buf.len() < 32 {
        return Err(FormatError::Truncated("manifest"));
    }
    let (body, sum) = buf.split_at(buf.len() - 32);
    if blake3::hash(body).as_bytes() != sum {
        return Err(FormatError::BadChecksum("manifest"));
    }
    let h = decode_header(body)?;
    let mut r = Reader::new(body, "manifest");
    r.take(12)?;
    r.blob()?;
    let n = usize::try_from(h.blocks).map_err(|_| FormatError::Invalid("manifest block count"))?;
    let mut entries = Vec::with_capacity(n.min(1 << 20));
    for _ in 0..n {
        let id = r.id()?;
        let object = r.u32()?;
        if object as usize >= h.objects.len() {
            return Err(FormatError::Invalid("manifest entry object"));
        }
        let offset = r.u64()?;
        let len = r.u32()?;
        entries.push(ManifestEntry {
            id,
            object,
            offset,
            len,
        });
    }
    r.finish()?;
    Ok((h, entries))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> (ManifestHeader, Vec<ManifestEntry>) {
        let h = ManifestHeader {
            publisher: "store-a".into(),
            dataset: "prod".into(),
            snapshot: "s1".into(),
            created: Timestamp { secs: 5, nsecs: 6 },
            published: Timestamp { secs: 7, nsecs: 8 },
            root: Some(BlockId([3; 32])),
            next_ino: 42,
            props: b"{}".to_vec(),
            objects: vec![(2, "packs/a/00000001.pack".into())],
            blocks: 0,
        };
        let e = vec![ManifestEntry {
            id: BlockId([9; 32]),
            object: 0,
            offset: 16,
            len: 100,
        }];
        (h, e)
    }

    #[test]
    fn manifest_round_trips_and_the_header_decodes_from_a_prefix() {
        let (h, e) = sample();
        let bytes = encode(&h, &e);
        let (h2, e2) = decode(&bytes).unwrap();
        assert_eq!(h2.blocks, 1);
        assert_eq!(h2.dataset, "prod");
        assert_eq!(e2, e);
        let head = decode_header(&bytes[..bytes.len() - 32 - MANIFEST_ENTRY_LEN]).unwrap();
        assert_eq!(head, h2);
    }

    #[test]
    fn manifest_with_any_flipped_byte_is_refused() {
        let (h, e) = sample();
        let bytes = encode(&h, &e);
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x40;
            assert!(decode(&b).is_err(), "flipped byte {i} was accepted");
        }
        assert!(decode(&bytes[..bytes.len() - 1]).is_err());
    }
}
