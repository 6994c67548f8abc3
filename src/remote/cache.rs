//! The bounded local cache of blocks fetched from the object store (`--cache-size`).
//!
//! Fetched blocks do not go into the store's log: they are appended, as verified v2 records, to
//! cache *segments* (`STORE/cache/NNNNNNNN.cache`, see FORMAT.md "Remote: the local cache"),
//! located through an in-memory map rebuilt at start by reading the segments' record headers.
//! When the cached bytes would exceed the limit, whole segments are evicted, least recently
//! read first (a read of a block marks its segment as used), and deleted.
//!
//! Invariants a reader must not break:
//! - Only blocks that have a published copy in the bucket are cached (everything here was
//!   fetched from it and verified), so anything here may be dropped at any time: an evicted or
//!   unreadable block is fetched again and verified. Nothing that exists only locally (a
//!   dataset's writes, the journal, the active pack) is ever here, and nothing here is in the
//!   index, uploaded as this store's pack, or counted by the local gc.
//! - Nothing durable points into a segment: the map lives in memory only. A crash (kill -9) at
//!   any point of an append or an eviction leaves files that the next start either reads
//!   (records whose headers decode) or deletes (a segment whose header does not), so no entry
//!   ever names deleted data. Segments are never fsynced: bytes lost to a power failure read as
//!   records that do not verify, which are dropped and fetched again.
//! - Every block read from a segment is verified (record crc, kind, id, blake3 of the content)
//!   before it is used; a cached copy that does not verify is never returned.
//! - Appends go only to the newest segment, which a restart never reopens (a new one starts),
//!   so a torn tail is never followed by records in the same file.
//! - The cached bytes (segment files, headers included) stay at or below the limit after every
//!   append: eviction runs before the append that would pass it.

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use vdbfs_format::cache::{decode_cache_header, encode_cache_header, CACHE_HEADER_LEN};
use vdbfs_format::pack::{self, RecordFormat, RecordKind};
use vdbfs_format::BlockId;

/// What `vdbfs remote status` and `vdbfs status` show of the cache.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CacheStatus {
    /// `--cache-size` in bytes; none: unbounded.
    pub limit: Option<u64>,
    /// Bytes of the cache's segment files now.
    pub bytes: u64,
    pub blocks: u64,
    pub segments: u64,
    /// Blocks read from the cache, and blocks that had to be fetched from the bucket, since the
    /// daemon started.
    pub hits: u64,
    pub misses: u64,
    /// Segments evicted since the daemon started, and their bytes.
    pub evictions: u64,
    pub evicted_bytes: u64,
}

#[derive(Clone, Copy)]
struct Slot {
    seg: u32,
    offset: u32,
    len: u32,
}

struct Segment {
    file: Arc<File>,
    len: u64,
    /// Tick of the last read or append.
    used: u64,
}

struct Inner {
    map: HashMap<BlockId, Slot>,
    segs: BTreeMap<u32, Segment>,
    /// The segment appends go to (the newest).
    active: Option<u32>,
    next_no: u32,
    tick: u64,
    bytes: u64,
    st: CacheStatus,
}

pub struct Cache {
    dir: PathBuf,
    limit: Option<u64>,
    /// A segment is closed once it holds this many bytes.
    seg_target: u64,
    inner: Mutex<Inner>,
}

/// The largest and smallest segment: a segment is 1/8 of the limit within these bounds, so
/// eviction frees the cache in steps of an eighth.
const SEG_MAX: u64 = 64 << 20;
const SEG_MIN: u64 = 256 << 10;
/// The smallest `--cache-size` (one segment of the smallest size and room to turn over).
pub const MIN_LIMIT: u64 = 1 << 20;

fn seg_path(dir: &Path, no: u32) -> PathBuf {
    dir.join(format!("{no:08}.cache"))
}

pub fn cache_dir(store_dir: &Path) -> PathBuf {
    store_dir.join("cache")
}

impl Cache {
    /// Opens (creating it when missing) `STORE/cache/` and reads the record headers of every
    /// segment into the map; deletes segments whose header does not decode. Evicts down to
    /// `limit` at once.
    pub fn open(store_dir: &Path, limit: Option<u64>) -> anyhow::Result<Cache> {
        use anyhow::Context;
        use std::os::unix::fs::PermissionsExt;
        let dir = cache_dir(store_dir);
        if !dir.exists() {
            std::fs::create_dir(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        }
        let mut nos = Vec::new();
        for e in
            std::fs::read_dir(&dir).with_context(|| format!("cannot list {}", dir.display()))?
        {
            let name = e?.file_name().to_string_lossy().into_owned();
            if let Some(no) = name
                .strip_suffix(".cache")
                .and_then(|n| n.parse::<u32>().ok())
            {
                nos.push(no);
            }
        }
        nos.sort_unstable();
        let mut inner = Inner {
            map: HashMap::new(),
            segs: BTreeMap::new(),
            active: None,
            next_no: nos.last().map_or(1, |n| n + 1),
            tick: 0,
            bytes: 0,
            st: CacheStatus {
                limit,
                ..Default::default()
            },
        };
        for no in nos {
            let path = seg_path(&dir, no);
            match scan_segment(&path, no) {
                Ok((file, len, slots)) => {
                    inner.tick += 1;
                    for (id, s) in slots {
                        inner.map.insert(id, s);
                    }
                    inner.bytes += len;
                    inner.segs.insert(
                        no,
                        Segment {
                            file: Arc::new(file),
                            len,
                            used: inner.tick,
                        },
                    );
                }
                Err(e) => {
                    tracing::warn!(segment = %path.display(), "cache segment unreadable, deleted: {e}");
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        let seg_target = limit.map_or(SEG_MAX, |l| (l / 8).clamp(SEG_MIN, SEG_MAX));
        let cache = Cache {
            dir,
            limit,
            seg_target,
            inner: Mutex::new(inner),
        };
        {
            let mut g = cache.inner.lock();
            cache.evict_for(&mut g, 0);
            tracing::info!(
                bytes = g.bytes,
                blocks = g.map.len(),
                limit = ?limit,
                "remote block cache opened"
            );
        }
        Ok(cache)
    }

    /// The verified contents of the cached blocks among `ids` (None: not cached, or its
    /// cached copy did not verify and was dropped). Counts hits and misses.
    pub fn get(&self, ids: &[BlockId]) -> Vec<Option<Vec<u8>>> {
        let mut found: Vec<(usize, Slot, Arc<File>)> = Vec::new();
        {
            let mut g = self.inner.lock();
            g.tick += 1;
            let tick = g.tick;
            for (i, id) in ids.iter().enumerate() {
                let Some(s) = g.map.get(id).copied() else {
                    continue;
                };
                if let Some(seg) = g.segs.get_mut(&s.seg) {
                    seg.used = tick;
                    found.push((i, s, seg.file.clone()));
                }
            }
        }
        let mut out: Vec<Option<Vec<u8>>> = vec![None; ids.len()];
        let mut bad: Vec<(BlockId, u32)> = Vec::new();
        // Records of one segment that follow each other are read with one pread. The file of
        // a segment evicted meanwhile is still open here: its bytes stay readable.
        found.sort_by_key(|(_, s, _)| (s.seg, s.offset));
        let mut g = 0;
        while g < found.len() {
            let mut h = g + 1;
            while h < found.len()
                && found[h].1.seg == found[g].1.seg
                && found[h - 1].1.offset + found[h - 1].1.len == found[h].1.offset
            {
                h += 1;
            }
            let start = found[g].1.offset;
            let end = found[h - 1].1.offset + found[h - 1].1.len;
            let mut buf = vec![0u8; (end - start) as usize];
            let read = found[g].2.read_exact_at(&mut buf, start as u64);
            for (i, s, _) in &found[g..h] {
                let rec = &buf[(s.offset - start) as usize..][..s.len as usize];
                let r = match &read {
                    Ok(()) => open_cached(&ids[*i], rec),
                    Err(e) => Err(format!("read failed: {e}")),
                };
                match r {
                    Ok(c) => out[*i] = Some(c),
                    Err(why) => {
                        tracing::warn!(
                            segment = %seg_path(&self.dir, s.seg).display(),
                            offset = s.offset,
                            "cached block {} does not verify ({why}); fetching it again",
                            ids[*i].to_hex()
                        );
                        bad.push((ids[*i], s.seg));
                    }
                }
            }
            g = h;
        }
        let mut g = self.inner.lock();
        for (id, seg) in bad {
            if g.map.get(&id).is_some_and(|s| s.seg == seg) {
                g.map.remove(&id);
            }
        }
        let hits = out.iter().filter(|o| o.is_some()).count() as u64;
        g.st.hits += hits;
        g.st.misses += ids.len() as u64 - hits;
        out
    }

    /// Keeps fetched, verified blocks: `recs` are whole v2 records. Best effort: a block that
    /// does not fit (a batch larger than the limit) or a write that fails is not cached (the
    /// failure is logged), and the reader has its bytes anyway.
    pub fn put(&self, recs: &[(BlockId, Vec<u8>)]) {
        let mut g = self.inner.lock();
        let mut todo: Vec<&(BlockId, Vec<u8>)> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for r in recs {
            if !g.map.contains_key(&r.0) && seen.insert(r.0) {
                todo.push(r);
            }
        }
        let mut i = 0;
        while i < todo.len() {
            // One append per run that fits in the active segment (or a new one).
            let (no, at) = match self.writable(&mut g, todo[i].1.len() as u64) {
                Ok(Some(x)) => x,
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!(dir = %self.dir.display(), "cannot write the block cache (blocks are served uncached): {e}");
                    return;
                }
            };
            let room = self
                .seg_target
                .saturating_sub(at)
                .max(todo[i].1.len() as u64);
            let mut buf = Vec::new();
            let mut slots = Vec::new();
            while i < todo.len() && (buf.len() + todo[i].1.len()) as u64 <= room {
                let (id, rec) = todo[i];
                slots.push((
                    *id,
                    Slot {
                        seg: no,
                        offset: (at + buf.len() as u64) as u32,
                        len: rec.len() as u32,
                    },
                ));
                buf.extend_from_slice(rec);
                i += 1;
            }
            let n = buf.len() as u64;
            if !self.evict_for(&mut g, n) {
                return; // larger than the whole cache
            }
            // The active segment may have been the one evicted (only with a limit too small
            // for more than one segment): the rest stays uncached.
            let Some(seg) = g.segs.get(&no) else {
                return;
            };
            if let Err(e) = seg.file.write_all_at(&buf, at) {
                tracing::warn!(segment = %seg_path(&self.dir, no).display(), "cannot write the block cache (blocks are served uncached): {e}");
                // What the failed write may have left is never named by the map; the segment
                // takes no more appends.
                g.active = None;
                return;
            }
            g.tick += 1;
            let tick = g.tick;
            if let Some(seg) = g.segs.get_mut(&no) {
                seg.len = at + n;
                seg.used = tick;
            }
            g.bytes += n;
            for (id, s) in slots {
                g.map.insert(id, s);
            }
        }
    }

    /// The segment to append `need` bytes to and the offset there: the active one if it is
    /// below its target size, else a new one (its header is written; counted in the bytes).
    fn writable(&self, g: &mut Inner, need: u64) -> std::io::Result<Option<(u32, u64)>> {
        if let Some(no) = g.active {
            if let Some(seg) = g.segs.get(&no) {
                if seg.len + need <= self.seg_target.max(CACHE_HEADER_LEN as u64 + need) {
                    return Ok(Some((no, seg.len)));
                }
            }
        }
        let hdr = CACHE_HEADER_LEN as u64;
        if !self.evict_for(g, hdr + need) {
            return Ok(None);
        }
        let no = g.next_no;
        g.next_no += 1;
        let path = seg_path(&self.dir, no);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        file.write_all_at(&encode_cache_header(no), 0)?;
        g.tick += 1;
        g.segs.insert(
            no,
            Segment {
                file: Arc::new(file),
                len: hdr,
                used: g.tick,
            },
        );
        g.bytes += hdr;
        g.active = Some(no);
        Ok(Some((no, hdr)))
    }

    /// Evicts least recently used segments until `need` more bytes fit under the limit.
    /// False if they cannot fit even in an empty cache.
    fn evict_for(&self, g: &mut Inner, need: u64) -> bool {
        let Some(limit) = self.limit else {
            return true;
        };
        if need > limit {
            return false;
        }
        while g.bytes + need > limit {
            // The active segment goes too if it is the oldest (appends start a new one).
            let Some((&no, _)) = g.segs.iter().min_by_key(|(_, s)| s.used) else {
                break;
            };
            let Some(seg) = g.segs.remove(&no) else {
                break;
            };
            // First the map forgets the segment, then the file goes: no entry ever names a
            // deleted file (readers holding its descriptor still read it).
            g.map.retain(|_, s| s.seg != no);
            if g.active == Some(no) {
                g.active = None;
            }
            let path = seg_path(&self.dir, no);
            if let Err(e) = std::fs::remove_file(&path) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(segment = %path.display(), "cannot delete an evicted cache segment: {e}");
                }
            }
            g.bytes = g.bytes.saturating_sub(seg.len);
            g.st.evictions += 1;
            g.st.evicted_bytes += seg.len;
            tracing::info!(segment = no, bytes = seg.len, "evicted a cache segment");
        }
        g.bytes + need <= limit
    }

    pub fn status(&self) -> CacheStatus {
        let g = self.inner.lock();
        CacheStatus {
            bytes: g.bytes,
            blocks: g.map.len() as u64,
            segments: g.segs.len() as u64,
            ..g.st.clone()
        }
    }
}

/// Verifies one cached record (crc, kind, id, blake3 of the content) and returns the content.
fn open_cached(id: &BlockId, rec: &[u8]) -> Result<Vec<u8>, String> {
    let (hdr, payload) = pack::decode_record(rec, RecordFormat::V2).map_err(|e| e.to_string())?;
    if hdr.kind != RecordKind::Block || hdr.id != *id || hdr.record_len() != rec.len() as u64 {
        return Err("record holds another block".into());
    }
    pack::open_block(&hdr, payload).map_err(|e| e.to_string())
}

/// The v2 record to cache for a verified record fetched from an object of `format`: the same
/// codec and payload (v1 records are re-encoded; the durable mark means nothing here).
pub fn cache_record(id: &BlockId, format: RecordFormat, rec: &[u8]) -> Option<Vec<u8>> {
    let (hdr, payload) = pack::decode_record(rec, format).ok()?;
    Some(pack::encode_record(
        RecordKind::Block,
        hdr.codec,
        hdr.raw_len,
        id,
        payload,
        Default::default(),
    ))
}

type Scanned = (File, u64, Vec<(BlockId, Slot)>);

/// Reads a segment's header and its record headers up to the first one that does not decode
/// or does not fit in the file (a tail torn by a crash: ignored, the segment is closed).
fn scan_segment(path: &Path, no: u32) -> anyhow::Result<Scanned> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)?;
    let len = file.metadata()?.len();
    let mut h = [0u8; CACHE_HEADER_LEN];
    file.read_exact_at(&mut h, 0)?;
    let got = decode_cache_header(&h)?;
    if got != no {
        anyhow::bail!("header names segment {got}");
    }
    let hlen = RecordFormat::V2.header_len();
    let mut at = CACHE_HEADER_LEN as u64;
    let mut slots = Vec::new();
    let mut rh = vec![0u8; hlen];
    while at + hlen as u64 <= len {
        if file.read_exact_at(&mut rh, at).is_err() {
            break;
        }
        let Ok(hdr) = pack::decode_record_header(&rh, RecordFormat::V2) else {
            break;
        };
        let rl = hdr.record_len();
        if hdr.kind != RecordKind::Block || at + rl > len || at + rl > u32::MAX as u64 {
            break;
        }
        slots.push((
            hdr.id,
            Slot {
                seg: no,
                offset: at as u32,
                len: rl as u32,
            },
        ));
        at += rl;
    }
    Ok((file, len, slots))
}

/// Parses a `--cache-size`: bytes, or a number with a binary unit (K, M, G, T; KiB, KB, ...
/// all mean powers of 1024), at least 1 MiB.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => {
            return Err(format!(
                "'{s}' is not a size: give bytes or a number with a unit, e.g. 512M, 50G, 1.5T \
                 (K, M, G, T are powers of 1024)"
            ))
        }
    };
    let v: f64 = num.parse().map_err(|_| {
        format!("'{s}' is not a size: give bytes or a number with a unit, e.g. 512M, 50G, 1.5T")
    })?;
    let bytes = v * mult as f64;
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(format!("'{s}' is too large"));
    }
    let bytes = bytes as u64;
    if bytes < MIN_LIMIT {
        return Err(format!(
            "'{s}' is too small for the block cache: at least 1M (1048576 bytes)"
        ));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(content: &[u8]) -> (BlockId, Vec<u8>) {
        let id = BlockId::of(content);
        let (c, p) = vdbfs_format::codec::compress(content);
        let rec = pack::encode_record(
            RecordKind::Block,
            c,
            content.len() as u32,
            &id,
            &p,
            Default::default(),
        );
        (id, rec)
    }

    fn block(i: u64) -> Vec<u8> {
        // Incompressible enough that records are about 8 KiB.
        let mut v = vec![0u8; 8192];
        let mut x = i.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        for b in v.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        v
    }

    fn disk_bytes(dir: &Path) -> u64 {
        std::fs::read_dir(cache_dir(dir))
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum()
    }

    #[test]
    fn the_cache_stays_within_its_limit_and_evicts_the_least_recently_read() {
        let d = tempfile::tempdir().unwrap();
        let limit = 1 << 20;
        let c = Cache::open(d.path(), Some(limit)).unwrap();
        let hot = block(0);
        c.put(&[record(&hot)]);
        for i in 1..400u64 {
            c.put(&[record(&block(i))]);
            // Block 0 is read all the time: its segment is never the least recently used.
            assert_eq!(c.get(&[BlockId::of(&hot)])[0].as_deref(), Some(&hot[..]));
            let st = c.status();
            assert!(st.bytes <= limit, "cache holds {} > {limit}", st.bytes);
            assert!(disk_bytes(d.path()) <= limit);
        }
        let st = c.status();
        assert!(st.evictions > 0, "nothing evicted: {st:?}");
        // Eviction is by segment: block 1 shares the hot block's first segment and stays with
        // it; block 100 was in a segment nobody read again, and is gone.
        assert!(
            c.get(&[BlockId::of(&block(1))])[0].is_some(),
            "block 1 was evicted with its segment read all the time"
        );
        assert!(
            c.get(&[BlockId::of(&block(100))])[0].is_none(),
            "block 100 not evicted"
        );
        let last = block(399);
        assert_eq!(c.get(&[BlockId::of(&last)])[0].as_deref(), Some(&last[..]));
        // Reopened (as after kill -9): the same blocks, verified.
        drop(c);
        let c = Cache::open(d.path(), Some(limit)).unwrap();
        assert_eq!(c.get(&[BlockId::of(&last)])[0].as_deref(), Some(&last[..]));
        assert_eq!(c.get(&[BlockId::of(&hot)])[0].as_deref(), Some(&hot[..]));
    }

    #[test]
    fn a_damaged_cached_block_is_a_miss_never_wrong_bytes() {
        let d = tempfile::tempdir().unwrap();
        let c = Cache::open(d.path(), Some(4 << 20)).unwrap();
        let b = block(5);
        c.put(&[record(&b)]);
        drop(c);
        let p = seg_path(&cache_dir(d.path()), 1);
        let mut bytes = std::fs::read(&p).unwrap();
        let n = bytes.len();
        bytes[n - 100] ^= 0xff;
        std::fs::write(&p, &bytes).unwrap();
        let c = Cache::open(d.path(), Some(4 << 20)).unwrap();
        assert_eq!(c.get(&[BlockId::of(&b)])[0], None);
        assert_eq!(c.status().blocks, 0, "the damaged entry stayed");
        // A torn tail (a crash in an append) is ignored, the records before it are kept.
        let c2 = block(6);
        c.put(&[record(&c2)]);
        drop(c);
        let p2 = seg_path(&cache_dir(d.path()), 2);
        let f = std::fs::OpenOptions::new().write(true).open(&p2).unwrap();
        let len = f.metadata().unwrap().len();
        f.write_all_at(&[0x56, 0x44], len).unwrap();
        let c = Cache::open(d.path(), Some(4 << 20)).unwrap();
        assert_eq!(c.get(&[BlockId::of(&c2)])[0].as_deref(), Some(&c2[..]));
    }

    #[test]
    fn cache_sizes_parse_with_units_and_bad_ones_say_why() {
        assert_eq!(parse_size("50G"), Ok(50 << 30));
        assert_eq!(parse_size("4MiB"), Ok(4 << 20));
        assert_eq!(parse_size("1.5g"), Ok(3 << 29));
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert!(parse_size("12X").unwrap_err().contains("not a size"));
        assert!(parse_size("").unwrap_err().contains("not a size"));
        assert!(parse_size("-1G").unwrap_err().contains("not a size"));
        assert!(parse_size("100K").unwrap_err().contains("too small"));
    }
}
