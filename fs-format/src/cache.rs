//! Cache segment files (`STORE/cache/NNNNNNNN.cache`): the bounded local cache of blocks
//! fetched from the object store. See FORMAT.md, "Remote: the local cache".
//!
//! A segment is a 16-byte header followed by v2 block records (the pack record format, see
//! [`crate::pack`]), back to back. Segments are not part of the store's durable state: nothing
//! in the index points into them, and a reader verifies every record it takes from one.

use crate::wire::{Reader, Writer};
use crate::FormatError;

pub const CACHE_MAGIC: &[u8; 8] = b"vdbfsCAC";
pub const CACHE_VERSION: u32 = 1;
pub const CACHE_HEADER_LEN: usize = 16;

pub fn encode_cache_header(segment_no: u32) -> Vec<u8> {
    let mut w = Writer::new();
    w.bytes(CACHE_MAGIC);
    w.u32(CACHE_VERSION);
    w.u32(segment_no);
    w.buf
}

/// Returns the segment number stored in the header (reads the first 16 bytes only).
pub fn decode_cache_header(buf: &[u8]) -> Result<u32, FormatError> {
    let mut r = Reader::new(buf, "cache segment header");
    if r.take(CACHE_MAGIC.len())? != CACHE_MAGIC {
        return Err(FormatError::BadMagic("cache segment header"));
    }
    let v = r.u32()?;
    if v != CACHE_VERSION {
        return Err(FormatError::BadVersion {
            what: "cache segment header",
            found: v,
            supported: CACHE_VERSION,
        });
    }
    r.u32()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_header_round_trips_and_refuses_other_files() {
        let h = encode_cache_header(7);
        assert_eq!(h.len(), CACHE_HEADER_LEN);
        assert_eq!(&h[..8], b"vdbfsCAC");
        assert_eq!(decode_cache_header(&h).unwrap(), 7);
        assert!(matches!(
            decode_cache_header(&crate::pack::encode_pack_header(7)),
            Err(FormatError::BadMagic(_))
        ));
        let mut v2 = h.clone();
        v2[8] = 2;
        assert!(matches!(
            decode_cache_header(&v2),
            Err(FormatError::BadVersion { .. })
        ));
        assert!(matches!(
            decode_cache_header(&h[..10]),
            Err(FormatError::Truncated(_))
        ));
    }
}
