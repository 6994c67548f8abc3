//! Pack files: an append-only log of records. See FORMAT.md, "Pack files".
//!
//! ```text
//! pack header (16 bytes): magic "vdbfsPAK" | version u32 | pack number u32
//! record: magic u32 "VDBR" | kind u8 | codec u8 | reserved u16 (0) | payload_len u32 | raw_len u32
//!         | id [32] | crc32 u32 (over the 48 header bytes before it and the payload) | payload
//! ```

use crate::wire::{check_header, Reader, Writer};
use crate::{BlockId, Codec, FormatError};

pub const PACK_MAGIC: &[u8; 8] = b"vdbfsPAK";
pub const PACK_VERSION: u32 = 1;
pub const PACK_HEADER_LEN: usize = 16;
pub const RECORD_MAGIC: u32 = u32::from_le_bytes(*b"VDBR");
pub const RECORD_HEADER_LEN: usize = 52;
/// Upper bound on one record's payload; larger lengths are corruption.
pub const MAX_PAYLOAD: u32 = 64 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum RecordKind {
    /// A content-addressed block: file data or a tree object. `id` is blake3 of the raw content.
    Block = 1,
    /// A journal record (see `journal`): metadata changes made durable by an fsync. `id` is zero.
    Journal = 2,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    pub kind: RecordKind,
    pub codec: Codec,
    pub payload_len: u32,
    pub raw_len: u32,
    pub id: BlockId,
}

impl RecordHeader {
    pub fn record_len(&self) -> u64 {
        RECORD_HEADER_LEN as u64 + self.payload_len as u64
    }
}

pub fn encode_pack_header(pack_no: u32) -> Vec<u8> {
    let mut w = Writer::new();
    w.bytes(PACK_MAGIC);
    w.u32(PACK_VERSION);
    w.u32(pack_no);
    w.buf
}

/// Returns the pack number stored in the header.
pub fn decode_pack_header(buf: &[u8]) -> Result<u32, FormatError> {
    let mut r = Reader::new(buf, "pack header");
    check_header(&mut r, PACK_MAGIC, PACK_VERSION, "pack header")?;
    r.u32()
}

/// Encodes one whole record (header + payload).
pub fn encode_record(
    kind: RecordKind,
    codec: Codec,
    raw_len: u32,
    id: &BlockId,
    payload: &[u8],
) -> Vec<u8> {
    let mut w = Writer::new();
    w.buf.reserve(RECORD_HEADER_LEN + payload.len());
    w.u32(RECORD_MAGIC);
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

/// Decodes the fixed-size header; checks everything but the crc (which needs the payload).
pub fn decode_record_header(buf: &[u8]) -> Result<RecordHeader, FormatError> {
    let mut r = Reader::new(buf, "record header");
    if r.u32()? != RECORD_MAGIC {
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
    Ok(RecordHeader {
        kind,
        codec,
        payload_len,
        raw_len,
        id,
    })
}

/// Decodes a whole record (header + payload), verifying the crc. Returns the header and payload.
pub fn decode_record(buf: &[u8]) -> Result<(RecordHeader, &[u8]), FormatError> {
    if buf.len() < RECORD_HEADER_LEN {
        return Err(FormatError::Truncated("record"));
    }
    let hdr = decode_record_header(&buf[..RECORD_HEADER_LEN])?;
    let total = RECORD_HEADER_LEN + hdr.payload_len as usize;
    if buf.len() < total {
        return Err(FormatError::Truncated("record payload"));
    }
    if buf.len() > total {
        return Err(FormatError::Invalid("record length"));
    }
    let stored = u32::from_le_bytes([buf[48], buf[49], buf[50], buf[51]]);
    let mut h = crc32fast::Hasher::new();
    h.update(&buf[..48]);
    h.update(&buf[RECORD_HEADER_LEN..]);
    if h.finalize() != stored {
        return Err(FormatError::BadChecksum("record"));
    }
    Ok((hdr, &buf[RECORD_HEADER_LEN..]))
}

/// Decodes a block record's payload back to its content and checks it against the record's id.
pub fn open_block(hdr: &RecordHeader, payload: &[u8]) -> Result<Vec<u8>, FormatError> {
    let raw = crate::codec::decompress(hdr.codec, payload, hdr.raw_len as usize)?;
    if BlockId::of(&raw) != hdr.id {
        return Err(FormatError::BadChecksum("block content hash"));
    }
    Ok(raw)
}
