//! Block payload codecs. The codec tag is stored with every record so codecs can be added later.

use crate::FormatError;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Codec {
    /// Stored as is (compression did not pay).
    Raw = 0,
    /// lz4 block format (lz4_flex), no size prefix; the raw length is in the record header.
    Lz4 = 1,
}

impl Codec {
    pub fn from_u8(v: u8) -> Result<Codec, FormatError> {
        match v {
            0 => Ok(Codec::Raw),
            1 => Ok(Codec::Lz4),
            _ => Err(FormatError::Invalid("codec tag")),
        }
    }
}

/// Compress `raw`; falls back to [`Codec::Raw`] when lz4 saves less than 1/16 of the size.
pub fn compress(raw: &[u8]) -> (Codec, Vec<u8>) {
    match compress_if_worth_it(raw) {
        Some(c) => (Codec::Lz4, c),
        None => (Codec::Raw, raw.to_vec()),
    }
}

/// The lz4 payload of `raw` when it saves at least 1/16 of the size, else `None` (store `raw`
/// itself as [`Codec::Raw`]; the caller keeps it and no copy is made).
pub fn compress_if_worth_it(raw: &[u8]) -> Option<Vec<u8>> {
    let c = lz4_flex::block::compress(raw);
    (c.len() + raw.len() / 16 < raw.len()).then_some(c)
}

/// Decompress a payload to exactly `raw_len` bytes.
pub fn decompress(codec: Codec, payload: &[u8], raw_len: usize) -> Result<Vec<u8>, FormatError> {
    match codec {
        Codec::Raw => {
            if payload.len() != raw_len {
                return Err(FormatError::Invalid("raw payload length"));
            }
            Ok(payload.to_vec())
        }
        Codec::Lz4 => {
            let mut out = vec![0u8; raw_len];
            let n = lz4_flex::block::decompress_into(payload, &mut out)
                .map_err(|_| FormatError::Invalid("lz4 payload"))?;
            if n != raw_len {
                return Err(FormatError::Invalid("lz4 payload length"));
            }
            Ok(out)
        }
    }
}

/// Decompress a payload into `out`, which must be exactly the content length (`raw_len`).
pub fn decompress_into(codec: Codec, payload: &[u8], out: &mut [u8]) -> Result<(), FormatError> {
    match codec {
        Codec::Raw => {
            if payload.len() != out.len() {
                return Err(FormatError::Invalid("raw payload length"));
            }
            out.copy_from_slice(payload);
            Ok(())
        }
        Codec::Lz4 => {
            let n = lz4_flex::block::decompress_into(payload, out)
                .map_err(|_| FormatError::Invalid("lz4 payload"))?;
            if n != out.len() {
                return Err(FormatError::Invalid("lz4 payload length"));
            }
            Ok(())
        }
    }
}
