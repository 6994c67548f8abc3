//! Scrub, the store side: reading blocks back from the disk and verifying them (record crc,
//! block hash), the way a read does, but past the page cache. The tree layer decides which
//! blocks are live and who references a bad one (`tree::scrub`).
//!
//! Invariants: blocks are located and read under the read side of `gc_guard`, so a collection
//! never removes a pack or an index entry under a check; closed packs are read with `O_DIRECT`
//! where the filesystem has it (what the disk holds, not what the page cache remembers), the
//! active pack as reads do (its tail is in memory, its written part is direct already).

use super::io::{AlignedBuf, ALIGN};
use super::{open_block_record, pack_path, Result, Store};
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use vdbfs_format::index::BlockLoc;
use vdbfs_format::BlockId;

/// What a check of one block found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Checked {
    /// Read back and verified; `stored` bytes of its record were read.
    Ok { stored: u32 },
    /// Its record does not verify (or cannot be read).
    Bad { loc: BlockLoc, why: String },
    /// Nothing in the store has this block.
    Missing,
}

/// Reads blocks back for a scrub, keeping a direct descriptor per closed pack.
pub struct Scrubber<'a> {
    store: &'a Store,
    direct: HashMap<u32, Option<File>>,
}

impl Store {
    pub fn scrubber(&self) -> Scrubber<'_> {
        Scrubber {
            store: self,
            direct: HashMap::new(),
        }
    }

    /// Where a block is now (index or log), if anywhere.
    pub fn locate(&self, ids: &[BlockId]) -> Result<Vec<Option<BlockLoc>>> {
        self.lookup_many(ids)
    }
}

fn align_down(x: u64) -> u64 {
    x & !(ALIGN as u64 - 1)
}

/// pread until `buf` is full or the file ends; returns the bytes read.
fn read_full(f: &File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

impl Scrubber<'_> {
    /// Reads and verifies `ids` (fastest in the order of their places in the packs).
    pub fn check(&mut self, ids: &[BlockId]) -> Result<Vec<Checked>> {
        let _g = self.store.read_guard();
        let locs = self.store.lookup_many(ids)?;
        let mut out = Vec::with_capacity(ids.len());
        let mut i = 0;
        while i < ids.len() {
            let Some(first) = locs[i] else {
                out.push(Checked::Missing);
                i += 1;
                continue;
            };
            // A run of records that follow each other in one pack: one read.
            let mut end = i + 1;
            let mut len = first.len as u64;
            while end < ids.len() && len < (4 << 20) {
                match locs[end] {
                    Some(l) if l.pack == first.pack && l.offset == first.offset + len => {
                        len += l.len as u64;
                        end += 1;
                    }
                    _ => break,
                }
            }
            match self.read(&ids[i], first.pack, first.offset, len) {
                Ok((format, buf)) => {
                    let mut at = 0usize;
                    for j in i..end {
                        let (id, loc) = (&ids[j], locs[j].unwrap_or(first));
                        let rec = &buf[at..at + loc.len as usize];
                        at += loc.len as usize;
                        out.push(match open_block_record(id, &loc, format, rec) {
                            Ok(_) => Checked::Ok { stored: loc.len },
                            Err(e) => Checked::Bad {
                                loc,
                                why: e.to_string(),
                            },
                        });
                    }
                }
                Err(e) => {
                    for loc in locs.iter().take(end).skip(i).flatten() {
                        out.push(Checked::Bad {
                            loc: *loc,
                            why: format!("read failed: {e}"),
                        });
                    }
                }
            }
            i = end;
        }
        Ok(out)
    }

    /// `len` bytes at `offset` of pack `no`, and the pack's record format.
    fn read(
        &mut self,
        id: &BlockId,
        no: u32,
        offset: u64,
        len: u64,
    ) -> Result<(vdbfs_format::pack::RecordFormat, Vec<u8>)> {
        let mut buf = vec![0u8; len as usize];
        let loc = BlockLoc {
            pack: no,
            offset,
            len: len as u32,
        };
        if no != self.store.log.active() {
            let dir = self.store.dir.clone();
            let direct = self.direct.entry(no).or_insert_with(|| {
                OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_DIRECT)
                    .open(pack_path(&dir, no))
                    .ok()
            });
            if let Some(f) = direct {
                let from = align_down(offset);
                let span = (offset + len - from).next_multiple_of(ALIGN as u64);
                let mut pages = AlignedBuf::zeroed(span as usize);
                let got = read_full(f, pages.padded_mut(), from)?;
                let at = (offset - from) as usize;
                let n = buf.len();
                if got >= at + n {
                    buf.copy_from_slice(&pages.as_slice()[at..at + n]);
                    let format = self
                        .store
                        .packs
                        .read()
                        .get(&no)
                        .map(|p| p.format)
                        .ok_or_else(|| super::corrupt(id, &loc, "pack file is missing".into()))?;
                    return Ok((format, buf));
                }
                return Err(super::corrupt(
                    id,
                    &loc,
                    "the pack file ends before the record".into(),
                ));
            }
        }
        let format = self.store.read_at(id, &loc, &mut buf)?;
        Ok((format, buf))
    }
}
