//! Recovery: reading back the log written after the last checkpoint (FORMAT.md, "Recovery").
//!
//! Invariants:
//! - Bad bytes that nothing proves acknowledged are a torn tail: they and everything after them
//!   in that pack are dropped (they were never reported durable).
//! - Bad bytes are acknowledged when the pack was closed (closed packs were synced whole) or when
//!   a valid record after them carries a `durable` mark beyond them. Such damage is never
//!   dropped silently: it is returned as [`Damage`] (the caller refuses what it affects), and the
//!   valid records after it are kept, so only what the damaged bytes held is lost.

use super::io::PackFile;
use super::{Error, Result};
use std::collections::HashMap;
use vdbfs_format::index::{BlockLoc, LogPos};
use vdbfs_format::journal::JournalRecord;
use vdbfs_format::pack::{
    self, RecordFormat, RecordHeader, RecordKind, MAX_RECORD_HEADER_LEN, PACK_HEADER_LEN,
    RECORD_MAGIC, RECORD_MAGIC_V1,
};
use vdbfs_format::BlockId;

/// What damaged bytes held, as far as their header tells.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Damaged {
    /// A block record with an intact header: this block is lost.
    Block(BlockId),
    /// A journal record with an intact header; the dataset id when the header names it (v2).
    Journal(Option<u64>),
    /// Bytes whose header does not decode: any record may have been there.
    Unknown,
}

/// Acknowledged bytes of the log that no longer verify.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Damage {
    pub pack: u32,
    pub offset: u64,
    pub len: u64,
    pub what: Damaged,
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "pack {:08} offset {} ({} bytes): ",
            self.pack, self.offset, self.len
        )?;
        match &self.what {
            Damaged::Block(id) => write!(f, "block record {id}"),
            Damaged::Journal(Some(ds)) => write!(f, "journal record of dataset #{ds}"),
            Damaged::Journal(None) => write!(f, "journal record"),
            Damaged::Unknown => write!(f, "unreadable record header"),
        }
    }
}

/// What the scan of one pack found, in log order.
enum Item {
    Valid {
        pos: u64,
        hdr: RecordHeader,
        journal: Option<JournalRecord>,
    },
    Bad {
        pos: u64,
        next: u64,
        guess: Damaged,
    },
}

/// Everything recovery found after the scan start.
#[derive(Default)]
pub struct Recovered {
    pub recent: HashMap<BlockId, BlockLoc>,
    pub journal: Vec<(LogPos, JournalRecord)>,
    pub damage: Vec<Damage>,
}

/// Reads a pack's header: its record format. `Ok(None)` for a pack shorter than its header (a
/// creation torn by a crash).
pub fn pack_format(file: &dyn PackFile, no: u32) -> Result<Option<RecordFormat>> {
    let len = file.len()?;
    if len < PACK_HEADER_LEN as u64 {
        tracing::warn!(
            pack = no,
            "pack shorter than its header (torn creation); ignored"
        );
        return Ok(None);
    }
    let mut head = [0u8; PACK_HEADER_LEN];
    file.read_exact_at(&mut head, 0)?;
    let (format, found) = pack::decode_pack_header(&head)?;
    if found != no {
        return Err(Error::CorruptMeta(format!(
            "pack file {no} says it is pack {found}"
        )));
    }
    Ok(Some(format))
}

/// Tries to read one whole, verified record at `pos`.
fn record_at(
    file: &dyn PackFile,
    format: RecordFormat,
    pos: u64,
    len: u64,
) -> Result<Option<(RecordHeader, Vec<u8>)>> {
    let hlen = format.header_len() as u64;
    if pos + hlen > len {
        return Ok(None);
    }
    let mut h = [0u8; MAX_RECORD_HEADER_LEN];
    file.read_exact_at(&mut h[..hlen as usize], pos)?;
    let Ok(hdr) = pack::decode_record_header(&h[..hlen as usize], format) else {
        return Ok(None);
    };
    let total = hdr.record_len();
    if pos + total > len {
        return Ok(None);
    }
    let mut buf = vec![0u8; total as usize];
    file.read_exact_at(&mut buf, pos)?;
    match pack::decode_record(&buf, format) {
        Ok((hdr, _)) => Ok(Some((hdr, buf))),
        Err(_) => Ok(None),
    }
}

/// The header at `pos` if it decodes (its crc unchecked): what bad bytes probably held.
fn guess_at(file: &dyn PackFile, format: RecordFormat, pos: u64, next: u64) -> Result<Damaged> {
    let hlen = format.header_len() as u64;
    if pos + hlen > next {
        return Ok(Damaged::Unknown);
    }
    let mut h = [0u8; MAX_RECORD_HEADER_LEN];
    file.read_exact_at(&mut h[..hlen as usize], pos)?;
    Ok(
        match pack::decode_record_header(&h[..hlen as usize], format) {
            Ok(hdr) if pos + hdr.record_len() == next => match hdr.kind {
                RecordKind::Block => Damaged::Block(hdr.id),
                RecordKind::Journal => Damaged::Journal(match format {
                    RecordFormat::V2 => pack::journal_record_dataset(&hdr.id),
                    RecordFormat::V1 => None,
                }),
            },
            _ => Damaged::Unknown,
        },
    )
}

/// The next position after `pos` where a valid record starts, if any (a byte-wise search for
/// the record magic; only runs over damaged or torn bytes).
fn resync(file: &dyn PackFile, format: RecordFormat, pos: u64, len: u64) -> Result<Option<u64>> {
    let magic = match format {
        RecordFormat::V1 => RECORD_MAGIC_V1,
        RecordFormat::V2 => RECORD_MAGIC,
    }
    .to_le_bytes();
    const CHUNK: u64 = 1 << 20;
    let mut at = pos + 1;
    while at + 4 <= len {
        let n = (len - at).min(CHUNK + 3);
        let mut buf = vec![0u8; n as usize];
        file.read_exact_at(&mut buf, at)?;
        let mut i = 0usize;
        while i + 4 <= buf.len() {
            if buf[i..i + 4] == magic && record_at(file, format, at + i as u64, len)?.is_some() {
                return Ok(Some(at + i as u64));
            }
            i += 1;
        }
        at += n.saturating_sub(3).max(1);
    }
    Ok(None)
}

/// Scans pack `no` from `start`. `closed`: a newer pack exists, so this one was synced whole.
pub fn scan_pack(
    file: &dyn PackFile,
    no: u32,
    format: RecordFormat,
    start: u64,
    indexed_upto: LogPos,
    closed: bool,
    out: &mut Recovered,
) -> Result<()> {
    let len = file.len()?;
    let mut items = Vec::new();
    let mut pos = start;
    while pos < len {
        if let Some((hdr, buf)) = record_at(file, format, pos, len)? {
            let journal = match hdr.kind {
                RecordKind::Journal => {
                    let payload = &buf[format.header_len()..];
                    Some(JournalRecord::decode(payload).map_err(|e| {
                        tracing::error!(
                            pack = no,
                            offset = pos,
                            "undecodable journal record with a valid crc: {e}"
                        );
                        Error::CorruptMeta(format!("journal record at pack {no} offset {pos}: {e}"))
                    })?)
                }
                RecordKind::Block => None,
            };
            items.push(Item::Valid { pos, hdr, journal });
            pos += hdr.record_len();
            continue;
        }
        match resync(file, format, pos, len)? {
            Some(next) => {
                let guess = guess_at(file, format, pos, next)?;
                items.push(Item::Bad { pos, next, guess });
                pos = next;
            }
            None => {
                items.push(Item::Bad {
                    pos,
                    next: len,
                    guess: Damaged::Unknown,
                });
                break;
            }
        }
    }

    // The highest durable mark at or after each item: bad bytes below it were acknowledged.
    let mut proof = vec![LogPos::default(); items.len() + 1];
    for i in (0..items.len()).rev() {
        proof[i] = match &items[i] {
            Item::Valid { hdr, .. } => proof[i + 1].max(hdr.durable),
            Item::Bad { .. } => proof[i + 1],
        };
    }
    for (i, item) in items.into_iter().enumerate() {
        match item {
            Item::Valid { pos, hdr, journal } => {
                let at = LogPos {
                    pack: no,
                    offset: pos,
                };
                match journal {
                    Some(rec) => out.journal.push((at, rec)),
                    None if at >= indexed_upto => {
                        out.recent.insert(
                            hdr.id,
                            BlockLoc {
                                pack: no,
                                offset: pos,
                                len: hdr.record_len() as u32,
                            },
                        );
                    }
                    None => {}
                }
            }
            Item::Bad { pos, next, guess } => {
                let here = LogPos {
                    pack: no,
                    offset: pos,
                };
                if closed || proof[i + 1] > here {
                    tracing::error!(
                        pack = no,
                        offset = pos,
                        bytes = next - pos,
                        "damaged log record before an acknowledged sync: {guess:?}"
                    );
                    out.damage.push(Damage {
                        pack: no,
                        offset: pos,
                        len: next - pos,
                        what: guess,
                    });
                    continue;
                }
                // A torn tail: never acknowledged; it and everything after it are dropped.
                if tail_has_data(file, pos, len)? {
                    tracing::warn!(
                        pack = no,
                        offset = pos,
                        bytes = len - pos,
                        "ignoring a torn tail after the last complete record"
                    );
                }
                break;
            }
        }
    }
    Ok(())
}

/// Whether the bytes from `pos` to the end are anything but zeros (the zero-filled space ahead
/// of the log end is not a torn tail worth a warning).
fn tail_has_data(file: &dyn PackFile, pos: u64, len: u64) -> Result<bool> {
    let mut probe = vec![0u8; (len - pos).min(64 << 10) as usize];
    file.read_exact_at(&mut probe, pos)?;
    Ok(probe.iter().any(|&b| b != 0))
}
