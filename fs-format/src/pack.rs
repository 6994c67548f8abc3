//! Pack files: an append-only log of records. See FORMAT.md, "Pack files".
//!
//! ```text
//! pack header (16 bytes): magic "vdbfsPAK" | version u32 (1 or 2) | pack number u32
//! record v2 (pack version 2, written by this build; 60-byte header):
//!   magic u32 "VDB2" | kind u8 | codec u8 | reserved u16 (0) | payload_len u32 | raw_len u32
//!   | id [32] | durable_pack u32 | durable_offset u32
//!   | crc32 u32 (over the 56 header bytes before it and the payload) | payload
//! record v1 (pack version 1, read only; 52-byte header):
//!   magic u32 "VDBR" | kind u8 | codec u8 | reserved u16 (0) | payload_len u32 | raw_len u32
//!   | id [32] | crc32 u32 (over the 48 header bytes before it and the payload) | payload
//! ```
//!
//! The v2 `durable` mark is the log position up to which the log was known durable (an fsync
//! had been acknowledged) when the record was appended. Recovery uses it to tell a torn tail
//! (nothing after the bad bytes proves they were acknowledged) from damage before an
//! acknowledged point (a later valid record says the log was durable past them).

use crate::index::LogPos;
use crate::wire::{Reader, Writer};
use crate::{BlockId, Codec, FormatError};

pub const PACK_MAGIC: &[u8; 8] = b"vdbfsPAK";
/// The pack version this build writes.
pub const PACK_VERSION: u32 = 2;
/// The oldest pack version this build reads.
pub const PACK_VERSION_MIN: u32 = 1;
pub const PACK_HEADER_LEN: usize = 16;
/// Magic of a v2 record.
pub const RECORD_MAGIC: u32 = u32::from_le_bytes(*b"VDB2");
/// Magic of a v1 record (packs of version 1).
pub const RECORD_MAGIC_V1: u32 = u32::from_le_bytes(*b"VDBR");
/// Header length of a v2 record.
pub const RECORD_HEADER_LEN: usize = 60;
/// Header length of a v1 record.
pub const RECORD_HEADER_LEN_V1: usize = 52;
/// The longest record header of any version (a buffer this long holds any header).
pub const MAX_RECORD_HEADER_LEN: usize = RECORD_HEADER_LEN;
/// Upper bound on one record's payload; larger lengths are corruption.
pub const MAX_PAYLOAD: u32 = 64 << 20;
/// Packs stay below this size, so a v2 `durable_offset` fits in a u32.
pub const MAX_PACK_LEN: u64 = 1 << 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum RecordKind {
    /// A content-addressed block: file data or a tree object. `id` is blake3 of the raw content.
    Block = 1,
    /// A journal record (see `journal`): metadata changes made durable by an fsync. In v2 the
    /// id holds the dataset id (see [`journal_record_id`]); in v1 it is zero.
    Journal = 2,
}

/// The record format of a pack, from its header's version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordFormat {
    V1,
    V2,
}

impl RecordFormat {
    pub fn of_pack_version(version: u32) -> Result<RecordFormat, FormatError> {
        match version {
            1 => Ok(RecordFormat::V1),
            2 => Ok(RecordFormat::V2),
            found => Err(FormatError::BadVersion {
                what: "pack header",
                found,
                supported: PACK_VERSION,
            }),
        }
    }
    pub fn header_len(self) -> usize {
        match self {
            RecordFormat::V1 => RECORD_HEADER_LEN_V1,
            RecordFormat::V2 => RECORD_HEADER_LEN,
        }
    }
    fn magic(self) -> u32 {
        match self {
            RecordFormat::V1 => RECORD_MAGIC_V1,
            RecordFormat::V2 => RECORD_MAGIC,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    pub format: RecordFormat,
    pub kind: RecordKind,
    pub codec: Codec,
    pub payload_len: u32,
    pub raw_len: u32,
    pub id: BlockId,
    /// v2: the log was durable up to here when the record was appended. v1: zero.
    pub durable: LogPos,
}

impl RecordHeader {
    pub fn record_len(&self) -> u64 {
        self.format.header_len() as u64 + self.payload_len as u64
    }
}

/// The id field of a v2 journal record: the dataset id (little-endian) in the first 8 bytes,
/// zeros after, so that damage to a journal payload can be attributed to its dataset.
pub fn journal_record_id(dataset: u64) -> BlockId {
    let mut id = [0u8; 32];
    id[..8].copy_from_slice(&dataset.to_le_bytes());
    BlockId(id)
}

/// The dataset a v2 journal record's id names (see [`journal_record_id`]).
pub fn journal_record_dataset(id: &BlockId) -> Option<u64> {
    if id.0[8..].iter().any(|&b| b != 0) {
        return None;
    }
    let mut b = [0u8; 8];
    b.copy_from_slice(&id.0[..8]);
    Some(u64::from_le_bytes(b))
}

pub fn encode_pack_header(pack_no: u32) -> Vec<u8> {
    let mut w = Writer::new();
    w.bytes(PACK_MAGIC);
    w.u32(PACK_VERSION);
    w.u32(pack_no);
    w.buf
}

/// Returns the record format and the pack number stored in the header.
pub fn decode_pack_header(buf: &[u8]) -> Result<(RecordFormat, u32), FormatError> {
    let mut r = Reader::new(buf, "pack header");
    if r.take(PACK_MAGIC.len())? != PACK_MAGIC {
        return Err(FormatError::BadMagic("pack header"));
    }
    let format = RecordFormat::of_pack_version(r.u32()?)?;
    Ok((format, r.u32()?))
}

/// Appends one whole v2 record (header + payload) to `out`. `payload_crc` is the crc32 state
/// of the payload alone (so the payload can be hashed outside any lock; see [`payload_crc`]).
#[allow(clippy::too_many_arguments)]
pub fn encode_record_into(
    out: &mut Vec<u8>,
    kind: RecordKind,
    codec: Codec,
    raw_len: u32,
    id: &BlockId,
    payload: &[u8],
    payload_crc: &crc32fast::Hasher,
    durable: LogPos,
) {
    out.reserve(RECORD_HEADER_LEN + payload.len());
    out.extend_from_slice(&encode_record_header(
        kind,
        codec,
        raw_len,
        id,
        payload.len() as u32,
        payload_crc,
        durable,
    ));
    out.extend_from_slice(payload);
}

/// The header of a v2 record whose payload is `payload_len` bytes with crc32 state
/// `payload_crc`: the record is this header followed by the payload (for writers that place
/// the payload themselves, without building the record in between).
pub fn encode_record_header(
    kind: RecordKind,
    codec: Codec,
    raw_len: u32,
    id: &BlockId,
    payload_len: u32,
    payload_crc: &crc32fast::Hasher,
    durable: LogPos,
) -> [u8; RECORD_HEADER_LEN] {
    let mut h = [0u8; RECORD_HEADER_LEN];
    h[0..4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
    h[4] = kind as u8;
    h[5] = codec as u8;
    // h[6..8]: reserved, zero
    h[8..12].copy_from_slice(&payload_len.to_le_bytes());
    h[12..16].copy_from_slice(&raw_len.to_le_bytes());
    h[16..48].copy_from_slice(&id.0);
    h[48..52].copy_from_slice(&durable.pack.to_le_bytes());
    h[52..56].copy_from_slice(&(durable.offset.min(u32::MAX as u64) as u32).to_le_bytes());
    let mut c = crc32fast::Hasher::new();
    c.update(&h[..56]);
    c.combine(payload_crc);
    h[56..60].copy_from_slice(&c.finalize().to_le_bytes());
    h
}

/// The crc32 state of a payload, for [`encode_record_into`].
pub fn payload_crc(payload: &[u8]) -> crc32fast::Hasher {
    let mut h = crc32fast::Hasher::new();
    h.update(payload);
    h
}

/// Encodes one whole v2 record (header + payload).
pub fn encode_record(
    kind: RecordKind,
    codec: Codec,
    raw_len: u32,
    id: &BlockId,
    payload: &[u8],
    durable: LogPos,
) -> Vec<u8> {
    let mut out = Vec::new();
    encode_record_into(
        &mut out,
        kind,
        codec,
        raw_len,
        id,
        payload,
        &payload_crc(payload),
        durable,
    );
    out
}

/// Encodes one whole v1 record. This build never writes v1 packs; the encoder is kept for
/// tests and tools that build stores of the old format.
pub fn encode_record_v1(
    kind: RecordKind,
    codec: Codec,
    raw_len: u32,
    id: &BlockId,
    payload: &[u8],
) -> Vec<u8> {
    let mut w = Writer::new();
    w.buf.reserve(RECORD_HEADER_LEN_V1 + payload.len());
    w.u32(RECORD_MAGIC_V1);
    w.u8(kind as u8);
    w.u8(codec as u8);
    w.u16(0);
    w.u32(payload.len() as u32);
    w.u32(raw_len);
    w.bytes(&id.0);
    let mut h = crc32fast::Hasher::new();
    h.update(&w.buf);
    h.update(payload);
    w.u32(h.finalize());
    w.bytes(payload);
    w.buf
}

/// The v1 pack header, for tests and tools (see [`encode_record_v1`]).
pub fn encode_pack_header_v1(pack_no: u32) -> Vec<u8> {
    let mut w = Writer::new();
    w.bytes(PACK_MAGIC);
    w.u32(1);
    w.u32(pack_no);
    w.buf
}

/// Decodes the fixed-size header of a record of `format`; checks everything but the crc
/// (which needs the payload). `buf` may be longer than the header.
pub fn decode_record_header(buf: &[u8], format: RecordFormat) -> Result<RecordHeader, FormatError> {
    let mut r = Reader::new(buf, "record header");
    if r.u32()? != format.magic() {
        return Err(FormatError::BadMagic("record header"));
    }
    let kind = match r.u8()? {
        1 => RecordKind::Block,
        2 => RecordKind::Journal,
        _ => return Err(FormatError::Invalid("record kind")),
    };
    let codec = Codec::from_u8(r.u8()?)?;
    if r.u16()? != 0 {
        return Err(FormatError::Invalid("record reserved field"));
    }
    let payload_len = r.u32()?;
    let raw_len = r.u32()?;
    let id = r.id()?;
    if payload_len > MAX_PAYLOAD || raw_len > MAX_PAYLOAD {
        return Err(FormatError::Invalid("record length"));
    }
    let durable = match format {
        RecordFormat::V1 => LogPos::default(),
        RecordFormat::V2 => LogPos {
            pack: r.u32()?,
            offset: r.u32()? as u64,
        },
    };
    // The crc field must be there too.
    r.u32()?;
    Ok(RecordHeader {
        format,
        kind,
        codec,
        payload_len,
        raw_len,
        id,
        durable,
    })
}

/// Decodes a whole record (header + payload) of `format`, verifying the crc. Returns the header
/// and payload.
pub fn decode_record(
    buf: &[u8],
    format: RecordFormat,
) -> Result<(RecordHeader, &[u8]), FormatError> {
    let hlen = format.header_len();
    if buf.len() < hlen {
        return Err(FormatError::Truncated("record"));
    }
    let hdr = decode_record_header(&buf[..hlen], format)?;
    let total = hlen + hdr.payload_len as usize;
    if buf.len() < total {
        return Err(FormatError::Truncated("record payload"));
    }
    if buf.len() > total {
        return Err(FormatError::Invalid("record length"));
    }
    let crc_at = hlen - 4;
    let stored = u32::from_le_bytes([
        buf[crc_at],
        buf[crc_at + 1],
        buf[crc_at + 2],
        buf[crc_at + 3],
    ]);
    let mut h = crc32fast::Hasher::new();
    h.update(&buf[..crc_at]);
    h.update(&buf[hlen..]);
    if h.finalize() != stored {
        return Err(FormatError::BadChecksum("record"));
    }
    Ok((hdr, &buf[hlen..]))
}

/// Decodes a block record's payload back to its content and checks it against the record's id.
pub fn open_block(hdr: &RecordHeader, payload: &[u8]) -> Result<Vec<u8>, FormatError> {
    let raw = crate::codec::decompress(hdr.codec, payload, hdr.raw_len as usize)?;
    if BlockId::of(&raw) != hdr.id {
        return Err(FormatError::BadChecksum("block content hash"));
    }
    Ok(raw)
}
