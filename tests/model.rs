//! Model-based test of the FUSE filesystem: one random sequence of file operations is applied to a
//! vdbfs mount and to a plain directory on the host filesystem (the model), and every result
//! (return value or errno, bytes read, sizes, link counts, modes, listings) must be the same.
//! After every step (or every `VDBFS_MODEL_TREE_EVERY` steps) the whole trees are compared, and at
//! the end of each sequence the dataset is unmounted and mounted again and compared once more.
//!
//! The sequences stress what PostgreSQL leans on: writes at random offsets, across 8 KiB block
//! boundaries and beyond EOF (holes), truncation up and down, unlink and rename over a file that is
//! still open and then read and written through the open handle, hard links, symlinks, fsync.
//! Reads sometimes drop the kernel's page cache first, so they reach the daemon. A few steps act
//! on the store instead of the files: a snapshot (a checkpoint while handles are open), `vdbfs gc`,
//! a clean daemon restart, and a crash (fsync, kill -9, serve again); after each, the trees must
//! still be equal.
//!
//! On a mismatch the sequence is shrunk (operations removed while it still fails, each attempt on
//! a fresh dataset and a fresh plain directory) and the test fails with the minimal sequence.
//!
//! Knobs (environment):
//! - `VDBFS_MODEL_SEED` (default fixed): seed of case 0; case `i` uses `seed + i`, so a failing
//!   case is rerun alone with `VDBFS_MODEL_SEED=<its seed> VDBFS_MODEL_CASES=1`.
//! - `VDBFS_MODEL_CASES` (default 40): number of sequences.
//! - `VDBFS_MODEL_STEPS` (default 120): operations per sequence.
//! - `VDBFS_MODEL_TREE_EVERY` (default 1): compare the whole trees every N steps.
//! - `VDBFS_MODEL_SHRINK_SECS` (default 240): time budget for shrinking a failure.
//! - `VDBFS_MODEL_SKIP` (default none): comma-separated store/daemon steps not to generate, of
//!   `snapshot` (a checkpoint with handles open), `gc`, `restart` (SIGTERM + serve), `crash`
//!   (fsync, kill -9 + serve), e.g. to look for other bugs while one is known.
//!
//! Long file (about 1,100 lines), on purpose: the model, the operation generator and the
//! comparison are one unit that only makes sense read together.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::util::{self, Daemon};

const BS: u64 = 8192;
const SLOTS: usize = 4;

/// The namespace: few names, so creates, renames and links collide with what exists, and the same
/// name is a file in one sequence and a directory in another.
const PATHS: &[&str] = &["a", "b", "c", "a/b", "a/c", "b/a", "a/b/c"];
/// Directories listed by `Readdir` ("" is the root).
const DIRS: &[&str] = &["", "a", "b", "a/b"];
/// Symlink targets: relative only (the two trees live at different absolute paths).
const TARGETS: &[&str] = &["a", "b", "../a", "c", "a/b", "nowhere", "../../c"];
const MODES: &[u32] = &[0o644, 0o600, 0o755, 0o400, 0o000, 0o2775, 0o4755, 0o1777];

#[derive(Clone, Debug)]
enum Op {
    Open {
        slot: usize,
        path: &'static str,
        create: bool,
        excl: bool,
        trunc: bool,
        append: bool,
    },
    Close {
        slot: usize,
    },
    /// pwrite (or write, on an O_APPEND handle) of `len` bytes made from `seed` (0 = zeros).
    Write {
        slot: usize,
        off: u64,
        len: usize,
        seed: u8,
    },
    /// pread until `len` bytes or EOF; with `uncached`, first drop the file's pages from the
    /// kernel's page cache (POSIX_FADV_DONTNEED), so the read reaches the daemon.
    Read {
        slot: usize,
        off: u64,
        len: usize,
        uncached: bool,
    },
    Fsync {
        slot: usize,
    },
    Ftruncate {
        slot: usize,
        size: u64,
    },
    Fstat {
        slot: usize,
    },
    Truncate {
        path: &'static str,
        size: u64,
    },
    Stat {
        path: &'static str,
    },
    ReadFile {
        path: &'static str,
    },
    Rename {
        from: &'static str,
        to: &'static str,
    },
    Unlink {
        path: &'static str,
    },
    Mkdir {
        path: &'static str,
    },
    Rmdir {
        path: &'static str,
    },
    Link {
        from: &'static str,
        to: &'static str,
    },
    Symlink {
        target: &'static str,
        path: &'static str,
    },
    Readlink {
        path: &'static str,
    },
    Chmod {
        path: &'static str,
        mode: u32,
    },
    Readdir {
        dir: &'static str,
    },
    /// Close every handle (in both worlds), SIGTERM the daemon (final checkpoint) and serve
    /// again: the rest of the sequence runs on state loaded back from the checkpointed trees.
    Restart,
    /// `vdbfs snapshot create` of the dataset: a checkpoint while handles stay open.
    Snapshot,
    /// `vdbfs gc`: a collection (checkpoint, mark, sweep, compaction) while handles stay open,
    /// including handles of unlinked files.
    Gc,
    /// Close every handle, fsync the mount's root directory (the whole dataset is durable), kill
    /// the daemon with SIGKILL and serve again: the state comes back from the journal.
    Crash,
}

/// The observable result of one operation.
#[derive(PartialEq)]
enum Out {
    Done,
    Errno(i32),
    /// The slot holds no open handle (in both worlds; nothing was called).
    NoHandle,
    Bytes(Vec<u8>),
    Stat(StatView),
    Names(Vec<(String, char)>),
    Target(Vec<u8>),
}

#[derive(PartialEq, Debug)]
struct StatView {
    kind: char,
    perm: u32,
    nlink: u64,
    /// Size of files and symlinks; directories' sizes are filesystem-specific (0 here).
    size: u64,
}

fn errno_name(e: i32) -> String {
    format!("{} ({})", io::Error::from_raw_os_error(e), e)
}

impl fmt::Debug for Out {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Out::Done => write!(f, "Ok"),
            Out::Errno(e) => write!(f, "Err({})", errno_name(*e)),
            Out::NoHandle => write!(f, "NoHandle"),
            Out::Bytes(b) => write!(f, "{}", describe_bytes(b)),
            Out::Stat(s) => write!(f, "{s:?}"),
            Out::Names(n) => write!(f, "{n:?}"),
            Out::Target(t) => write!(f, "Target({:?})", String::from_utf8_lossy(t)),
        }
    }
}

/// A short description of a byte string: length and a run-length summary of its first runs.
fn describe_bytes(b: &[u8]) -> String {
    let mut runs: Vec<String> = Vec::new();
    let mut i = 0;
    while i < b.len() && runs.len() < 6 {
        let j = (i..b.len()).find(|&j| b[j] != b[i]).unwrap_or(b.len());
        if j - i >= 4 {
            runs.push(format!("{:#04x} x{}", b[i], j - i));
            i = j;
        } else {
            let k = (i + 8).min(b.len());
            runs.push(format!("{:02x?}", &b[i..k]));
            i = k;
        }
    }
    if i < b.len() {
        runs.push("...".into());
    }
    format!("Bytes(len {}: {})", b.len(), runs.join(" "))
}

fn first_difference(a: &[u8], b: &[u8]) -> String {
    match a.iter().zip(b).position(|(x, y)| x != y) {
        Some(i) => format!(
            "first differing byte at offset {i} (block {}, +{}): {:#04x} vs {:#04x}",
            i as u64 / BS,
            i as u64 % BS,
            a[i],
            b[i]
        ),
        None => format!("lengths differ: {} vs {}", a.len(), b.len()),
    }
}

fn data(seed: u8, len: usize) -> Vec<u8> {
    if seed == 0 {
        return vec![0; len];
    }
    (0..len)
        .map(|i| seed.wrapping_add((i as u8).wrapping_mul(7)) ^ ((i >> 8) as u8))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Generation
// ---------------------------------------------------------------------------------------------

fn pick<T: Copy>(rng: &mut StdRng, v: &[T]) -> T {
    v[rng.gen_range(0..v.len())]
}

/// Offsets and sizes: near block boundaries, inside the first blocks, anywhere up to 6 blocks, or
/// (rarely) around block 256, where a file's block map grows a second radix level.
fn gen_offset(rng: &mut StdRng) -> u64 {
    if rng.gen_bool(0.04) {
        return (256 * BS).saturating_add_signed(rng.gen_range(-2 * BS as i64..=2 * BS as i64));
    }
    match rng.gen_range(0..4) {
        0 => rng.gen_range(0..200),
        1 => (rng.gen_range(0..6u64) * BS).saturating_add_signed(rng.gen_range(-3..=3)),
        2 => rng.gen_range(0..6 * BS),
        _ => rng.gen_range(0..2) * BS + rng.gen_range(0..BS),
    }
}

fn gen_len(rng: &mut StdRng) -> usize {
    match rng.gen_range(0..5) {
        0 => rng.gen_range(1..40),
        1 => (BS as usize).saturating_add_signed(rng.gen_range(-2..=2)),
        2 => rng.gen_range(1..3 * BS as usize),
        3 => 0,
        _ => rng.gen_range(1..BS as usize),
    }
}

/// What the generator knows of the model tree: the kind of each name of `PATHS` ('f', 'd', 'l' or
/// absent) and which handle slots are open. Ops are drawn mostly among those that can succeed,
/// with a share of arbitrary ones so that error paths are compared too.
struct View {
    kinds: BTreeMap<&'static str, char>,
    open: Vec<usize>,
}

impl View {
    fn of(model: &World) -> View {
        let mut kinds = BTreeMap::new();
        for &p in PATHS {
            if let Ok(m) = fs::symlink_metadata(model.p(p)) {
                kinds.insert(p, kind_char(m.file_type()));
            }
        }
        let open = (0..SLOTS).filter(|&i| model.handles[i].is_some()).collect();
        View { kinds, open }
    }

    fn parent_is_dir(&self, p: &str) -> bool {
        match p.rsplit_once('/') {
            None => true,
            Some((parent, _)) => self.kinds.get(parent) == Some(&'d'),
        }
    }

    /// A path of one of `kinds` with probability 0.85 when there is one, else any path.
    fn existing(&self, rng: &mut StdRng, kinds: &str) -> &'static str {
        let v: Vec<&'static str> = PATHS
            .iter()
            .copied()
            .filter(|p| self.kinds.get(p).is_some_and(|k| kinds.contains(*k)))
            .collect();
        if !v.is_empty() && rng.gen_bool(0.85) {
            pick(rng, &v)
        } else {
            pick(rng, PATHS)
        }
    }

    /// A path that does not exist but whose parent is a directory, with probability 0.85.
    fn fresh(&self, rng: &mut StdRng) -> &'static str {
        let v: Vec<&'static str> = PATHS
            .iter()
            .copied()
            .filter(|p| !self.kinds.contains_key(p) && self.parent_is_dir(p))
            .collect();
        if !v.is_empty() && rng.gen_bool(0.85) {
            pick(rng, &v)
        } else {
            pick(rng, PATHS)
        }
    }

    /// An open slot with probability 0.9 when there is one, else any slot.
    fn slot(&self, rng: &mut StdRng) -> usize {
        if !self.open.is_empty() && rng.gen_bool(0.9) {
            pick(rng, &self.open)
        } else {
            rng.gen_range(0..SLOTS)
        }
    }
}

/// The operations on the store and daemon, by the names `VDBFS_MODEL_SKIP` uses.
const DAEMON_OPS: &[(&str, Op)] = &[
    ("snapshot", Op::Snapshot),
    ("gc", Op::Gc),
    ("restart", Op::Restart),
    ("crash", Op::Crash),
];

fn gen_op(rng: &mut StdRng, v: &View, daemon_ops: &[Op]) -> Op {
    if !daemon_ops.is_empty() && rng.gen_bool(0.03) {
        return pick_op(rng, daemon_ops);
    }
    // Few open handles: open one more often.
    let open_bias = if v.open.len() < 2 { 12 } else { 0 };
    let r = rng.gen_range(0..100 + open_bias);
    if r >= 100 {
        return gen_open(rng, v);
    }
    match r {
        0..=9 => gen_open(rng, v),
        10..=12 => Op::Close { slot: v.slot(rng) },
        13..=32 => Op::Write {
            slot: v.slot(rng),
            off: gen_offset(rng),
            len: gen_len(rng),
            seed: if rng.gen_bool(0.2) {
                0
            } else {
                rng.gen_range(1..=255)
            },
        },
        33..=44 => Op::Read {
            slot: v.slot(rng),
            off: gen_offset(rng),
            len: rng.gen_range(1..4 * BS as usize),
            uncached: rng.gen_bool(0.4),
        },
        45..=47 => Op::Fsync { slot: v.slot(rng) },
        48..=52 => Op::Ftruncate {
            slot: v.slot(rng),
            size: gen_offset(rng),
        },
        53..=55 => Op::Fstat { slot: v.slot(rng) },
        56..=58 => Op::Truncate {
            path: v.existing(rng, "fl"),
            size: gen_offset(rng),
        },
        59..=61 => Op::Stat {
            path: v.existing(rng, "fdl"),
        },
        62..=64 => Op::ReadFile {
            path: v.existing(rng, "fl"),
        },
        65..=70 => Op::Rename {
            from: v.existing(rng, "fdl"),
            to: if rng.gen_bool(0.5) {
                v.fresh(rng)
            } else {
                pick(rng, PATHS)
            },
        },
        71..=74 => Op::Unlink {
            path: v.existing(rng, "fl"),
        },
        75..=80 => Op::Mkdir { path: v.fresh(rng) },
        81..=83 => Op::Rmdir {
            path: v.existing(rng, "d"),
        },
        84..=87 => Op::Link {
            from: v.existing(rng, "fl"),
            to: v.fresh(rng),
        },
        88..=90 => Op::Symlink {
            target: pick(rng, TARGETS),
            path: v.fresh(rng),
        },
        91 => Op::Readlink {
            path: v.existing(rng, "l"),
        },
        92..=94 => Op::Chmod {
            path: v.existing(rng, "fdl"),
            mode: pick(rng, MODES),
        },
        _ => Op::Readdir {
            dir: pick(rng, DIRS),
        },
    }
}

fn pick_op(rng: &mut StdRng, v: &[Op]) -> Op {
    v[rng.gen_range(0..v.len())].clone()
}

fn gen_open(rng: &mut StdRng, v: &View) -> Op {
    let create = rng.gen_bool(0.5);
    let path = if create {
        v.fresh(rng)
    } else {
        v.existing(rng, "fl")
    };
    // Prefer a free slot, so several handles stay open at once.
    let free: Vec<usize> = (0..SLOTS).filter(|i| !v.open.contains(i)).collect();
    let slot = if !free.is_empty() && rng.gen_bool(0.8) {
        pick(rng, &free)
    } else {
        rng.gen_range(0..SLOTS)
    };
    Op::Open {
        slot,
        path,
        create: create || rng.gen_bool(0.3),
        excl: create && rng.gen_bool(0.15),
        trunc: rng.gen_bool(0.1),
        append: rng.gen_bool(0.15),
    }
}

// ---------------------------------------------------------------------------------------------
// Execution
// ---------------------------------------------------------------------------------------------

struct Handle {
    file: File,
    append: bool,
}

/// One of the two filesystems under comparison, with its open handles.
struct World {
    root: PathBuf,
    handles: Vec<Option<Handle>>,
}

fn errno(e: &io::Error) -> Out {
    Out::Errno(e.raw_os_error().unwrap_or(-1))
}

fn result(r: io::Result<()>) -> Out {
    match r {
        Ok(()) => Out::Done,
        Err(e) => errno(&e),
    }
}

fn kind_char(ft: fs::FileType) -> char {
    if ft.is_dir() {
        'd'
    } else if ft.is_symlink() {
        'l'
    } else if ft.is_file() {
        'f'
    } else {
        '?'
    }
}

fn stat_view(m: &fs::Metadata) -> StatView {
    let kind = kind_char(m.file_type());
    StatView {
        kind,
        perm: m.mode() & 0o7777,
        nlink: m.nlink(),
        size: if kind == 'd' { 0 } else { m.size() },
    }
}

/// pread until `len` bytes or EOF (FUSE may return short reads; POSIX allows them, postgres
/// does not retry them, so a short read before EOF shows up as a mismatch of the bytes).
fn read_full(f: &File, off: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let mut got = 0;
    while got < len {
        let n = f.read_at(&mut buf[got..], off + got as u64)?;
        if n == 0 {
            break;
        }
        got += n;
    }
    buf.truncate(got);
    Ok(buf)
}

impl World {
    fn new(root: &Path) -> World {
        World {
            root: root.to_path_buf(),
            handles: (0..SLOTS).map(|_| None).collect(),
        }
    }

    fn p(&self, rel: &str) -> PathBuf {
        if rel.is_empty() {
            self.root.clone()
        } else {
            self.root.join(rel)
        }
    }

    fn close_all(&mut self) {
        for h in &mut self.handles {
            *h = None;
        }
    }

    fn apply(&mut self, op: &Op) -> Out {
        match *op {
            Op::Open {
                slot,
                path,
                create,
                excl,
                trunc,
                append,
            } => {
                self.handles[slot] = None;
                let mut o = OpenOptions::new();
                o.read(true);
                if append {
                    o.append(true);
                } else {
                    o.write(true);
                }
                if create && excl {
                    o.create_new(true);
                } else if create {
                    o.create(true);
                }
                if trunc {
                    o.truncate(true);
                }
                o.mode(0o644);
                match o.open(self.p(path)) {
                    Ok(file) => {
                        self.handles[slot] = Some(Handle { file, append });
                        Out::Done
                    }
                    Err(e) => errno(&e),
                }
            }
            Op::Close { slot } => match self.handles[slot].take() {
                Some(_) => Out::Done,
                None => Out::NoHandle,
            },
            Op::Write {
                slot,
                off,
                len,
                seed,
            } => {
                let Some(h) = &self.handles[slot] else {
                    return Out::NoHandle;
                };
                let buf = data(seed, len);
                if h.append {
                    result((&h.file).write_all(&buf))
                } else {
                    result(h.file.write_all_at(&buf, off))
                }
            }
            Op::Read {
                slot,
                off,
                len,
                uncached,
            } => {
                let Some(h) = &self.handles[slot] else {
                    return Out::NoHandle;
                };
                if uncached {
                    // SAFETY: a valid open fd; advice only, the result does not matter.
                    unsafe {
                        libc::posix_fadvise(h.file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
                    }
                }
                match read_full(&h.file, off, len) {
                    Ok(b) => Out::Bytes(b),
                    Err(e) => errno(&e),
                }
            }
            Op::Fsync { slot } => match &self.handles[slot] {
                Some(h) => result(h.file.sync_all()),
                None => Out::NoHandle,
            },
            Op::Ftruncate { slot, size } => match &self.handles[slot] {
                Some(h) => result(h.file.set_len(size)),
                None => Out::NoHandle,
            },
            Op::Fstat { slot } => match &self.handles[slot] {
                Some(h) => match h.file.metadata() {
                    Ok(m) => Out::Stat(stat_view(&m)),
                    Err(e) => errno(&e),
                },
                None => Out::NoHandle,
            },
            Op::Truncate { path, size } => {
                // truncate(2) on a path: open O_WRONLY without O_CREAT, then ftruncate.
                match OpenOptions::new().write(true).open(self.p(path)) {
                    Ok(f) => result(f.set_len(size)),
                    Err(e) => errno(&e),
                }
            }
            Op::Stat { path } => match fs::symlink_metadata(self.p(path)) {
                Ok(m) => Out::Stat(stat_view(&m)),
                Err(e) => errno(&e),
            },
            Op::ReadFile { path } => match fs::read(self.p(path)) {
                Ok(b) => Out::Bytes(b),
                Err(e) => errno(&e),
            },
            Op::Rename { from, to } => result(fs::rename(self.p(from), self.p(to))),
            Op::Unlink { path } => result(fs::remove_file(self.p(path))),
            Op::Mkdir { path } => result(fs::create_dir(self.p(path))),
            Op::Rmdir { path } => result(fs::remove_dir(self.p(path))),
            Op::Link { from, to } => result(fs::hard_link(self.p(from), self.p(to))),
            Op::Symlink { target, path } => {
                result(std::os::unix::fs::symlink(target, self.p(path)))
            }
            Op::Readlink { path } => match fs::read_link(self.p(path)) {
                Ok(t) => Out::Target(t.into_os_string().into_encoded_bytes()),
                Err(e) => errno(&e),
            },
            Op::Chmod { path, mode } => result(fs::set_permissions(
                self.p(path),
                fs::Permissions::from_mode(mode),
            )),
            Op::Restart | Op::Crash | Op::Snapshot | Op::Gc => {
                unreachable!("daemon operations are run by run_sequence")
            }
            Op::Readdir { dir } => match fs::read_dir(self.p(dir)) {
                Ok(rd) => {
                    let mut names = Vec::new();
                    for e in rd {
                        match e {
                            Ok(e) => {
                                let k = e.file_type().map(kind_char).unwrap_or('!');
                                names.push((e.file_name().to_string_lossy().into_owned(), k));
                            }
                            Err(e) => return errno(&e),
                        }
                    }
                    names.sort();
                    Out::Names(names)
                }
                Err(e) => errno(&e),
            },
        }
    }
}

/// Everything observable about a tree: per path, the kind, mode, link count, and the content
/// (file bytes, symlink target).
#[derive(PartialEq, Debug)]
struct Node {
    stat: StatView,
    content: Vec<u8>,
}

fn snapshot(root: &Path) -> Result<BTreeMap<String, Node>, String> {
    fn walk(root: &Path, rel: &str, out: &mut BTreeMap<String, Node>) -> Result<(), String> {
        let dir = if rel.is_empty() {
            root.to_path_buf()
        } else {
            root.join(rel)
        };
        let rd = fs::read_dir(&dir).map_err(|e| format!("readdir {rel:?}: {e}"))?;
        let mut names: Vec<String> = Vec::new();
        for e in rd {
            let e = e.map_err(|e| format!("readdir {rel:?}: {e}"))?;
            names.push(e.file_name().to_string_lossy().into_owned());
        }
        names.sort();
        for name in names {
            let r = if rel.is_empty() {
                name.clone()
            } else {
                format!("{rel}/{name}")
            };
            let p = root.join(&r);
            let m = fs::symlink_metadata(&p).map_err(|e| format!("lstat {r:?}: {e}"))?;
            let stat = stat_view(&m);
            let content = match stat.kind {
                'f' => fs::read(&p).map_err(|e| format!("read {r:?}: {e}"))?,
                'l' => fs::read_link(&p)
                    .map_err(|e| format!("readlink {r:?}: {e}"))?
                    .into_os_string()
                    .into_encoded_bytes(),
                _ => Vec::new(),
            };
            let is_dir = stat.kind == 'd';
            out.insert(r.clone(), Node { stat, content });
            if is_dir {
                walk(root, &r, out)?;
            }
        }
        Ok(())
    }
    let mut out = BTreeMap::new();
    let m = fs::metadata(root).map_err(|e| format!("stat root: {e}"))?;
    out.insert(
        "/".to_string(),
        Node {
            stat: stat_view(&m),
            content: Vec::new(),
        },
    );
    walk(root, "", &mut out)?;
    Ok(out)
}

/// Compares the vdbfs tree with the model tree; describes the first difference.
fn compare_trees(vdb: &Path, model: &Path) -> Result<(), String> {
    let a = snapshot(vdb).map_err(|e| format!("walking the vdbfs tree: {e}"))?;
    let b = snapshot(model).map_err(|e| format!("walking the model tree: {e}"))?;
    if a == b {
        return Ok(());
    }
    for (k, nb) in &b {
        match a.get(k) {
            None => return Err(format!("{k:?} is missing on vdbfs (model: {:?})", nb.stat)),
            Some(na) if na.stat != nb.stat => {
                return Err(format!("{k:?}: vdbfs {:?}, model {:?}", na.stat, nb.stat))
            }
            Some(na) if na.content != nb.content => {
                return Err(format!(
                    "{k:?}: contents differ: vdbfs {}, model {}; {}",
                    describe_bytes(&na.content),
                    describe_bytes(&nb.content),
                    first_difference(&na.content, &nb.content)
                ))
            }
            _ => {}
        }
    }
    let extra: Vec<&String> = a.keys().filter(|k| !b.contains_key(*k)).collect();
    Err(format!("vdbfs has entries the model does not: {extra:?}"))
}

// ---------------------------------------------------------------------------------------------
// Running and shrinking
// ---------------------------------------------------------------------------------------------

struct Failure {
    /// Index of the failing op; `ops.len()` when the final or the after-remount check failed.
    step: usize,
    what: String,
}

/// The model's root directory; removed when the sequence is over.
struct PlainDir(PathBuf);

impl PlainDir {
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for PlainDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

struct Settings {
    tree_every: usize,
}

static DATASETS: AtomicUsize = AtomicUsize::new(0);

/// Per operation kind: how many calls succeeded and how many failed (printed at the end, to see
/// that the sequences exercise success paths and not only errors).
static TALLY: Mutex<BTreeMap<String, (u64, u64)>> = Mutex::new(BTreeMap::new());

fn tally(op: &Op, out: &Out) {
    let name: String = format!("{op:?}")
        .chars()
        .take_while(|c| c.is_alphanumeric())
        .collect();
    let mut t = TALLY.lock().unwrap_or_else(|e| e.into_inner());
    let e = t.entry(name).or_default();
    match out {
        Out::Errno(_) | Out::NoHandle => e.1 += 1,
        _ => e.0 += 1,
    }
}

/// Where the operations of a run come from: drawn at random against the model's current state
/// (and recorded), or replayed from a recorded list (shrinking).
enum Source<'a> {
    Random {
        rng: Box<StdRng>,
        steps: usize,
        daemon_ops: Vec<Op>,
        recorded: Vec<Op>,
    },
    Replay(&'a [Op]),
}

impl Source<'_> {
    fn next(&mut self, i: usize, model: &World) -> Option<Op> {
        match self {
            Source::Random {
                rng,
                steps,
                daemon_ops,
                recorded,
            } => {
                if i >= *steps {
                    return None;
                }
                let op = gen_op(rng, &View::of(model), daemon_ops);
                recorded.push(op.clone());
                Some(op)
            }
            Source::Replay(ops) => ops.get(i).cloned(),
        }
    }
}

/// Runs a sequence on a fresh dataset and a fresh plain directory; then closes every handle,
/// compares the trees, remounts the dataset and compares again.
fn run_sequence(d: &mut Daemon, source: &mut Source<'_>, s: &Settings) -> Result<(), Failure> {
    let name = format!("model-{}", DATASETS.fetch_add(1, Ordering::SeqCst));
    // Both roots sit at the same depth under identical skeletons (`CASE/{vdbfs,model}/x/root`),
    // so a symlink target with ".." that leaves the root resolves to the same (empty) places.
    let case_dir = d.root().join(&name);
    let mountpoint = case_dir.join("vdbfs/x/root");
    let plain_root = case_dir.join("model/x/root");
    fs::create_dir_all(&mountpoint).unwrap();
    fs::create_dir_all(&plain_root).unwrap();
    d.create_dataset(&name);
    let mount = d.mount(&name, &mountpoint);
    // The roots must agree before we start (modes and link counts of the two root directories).
    util::chmod(&mount.path, 0o755);
    util::chmod(&plain_root, 0o755);
    let plain = PlainDir(plain_root);
    let r = run_ops(d, source, s, &name, &mount.path, plain.path());
    // Runs must not depend on each other (blocks are deduplicated across datasets, so a dataset
    // left behind would keep a collected block alive): unmount and delete this one.
    drop(mount);
    let out = d.vdbfs(&["dataset", "delete", &name, "--with-snapshots"]);
    if r.is_ok() {
        assert!(
            out.status.success(),
            "vdbfs dataset delete {name} --with-snapshots failed\n{}",
            util::describe(&out)
        );
    }
    r
}

/// The body of [`run_sequence`]: the ops, then the final comparisons and the remount.
fn run_ops(
    d: &mut Daemon,
    source: &mut Source<'_>,
    s: &Settings,
    name: &str,
    mountpoint: &Path,
    plain: &Path,
) -> Result<(), Failure> {
    let mut vdb = World::new(mountpoint);
    let mut model = World::new(plain);
    let fail = |step: usize, what: String| Err(Failure { step, what });

    let mut i = 0;
    while let Some(op) = source.next(i, &model) {
        let op = &op;
        if matches!(op, Op::Snapshot | Op::Gc | Op::Restart | Op::Crash) {
            tally(op, &Out::Done);
        }
        if matches!(op, Op::Snapshot | Op::Gc) {
            match op {
                Op::Snapshot => d.ok(&["snapshot", "create", name, "--name", &format!("s{i}")]),
                _ => d.ok(&["gc"]),
            };
            if let Err(e) = compare_trees(mountpoint, plain) {
                return fail(i, format!("after step {i} {op:?}: {e}"));
            }
            i += 1;
            continue;
        }
        if matches!(op, Op::Restart | Op::Crash) {
            vdb.close_all();
            model.close_all();
            if matches!(op, Op::Crash) {
                let r = File::open(mountpoint).and_then(|f| f.sync_all());
                if let Err(e) = r {
                    return fail(i, format!("step {i} {op:?}: fsync of the mount root: {e}"));
                }
                d.kill9();
                // Clearing the stale ENOTCONN mount is the daemon's job, pinned by
                // mounts::stale_mount_after_kill9_is_cleared_and_remounted; this test is about
                // what recovery brings back, so it detaches the dead mount itself.
                util::lazy_umount(mountpoint);
                d.start_again();
            } else {
                d.restart();
            }
            d.wait_mounted(mountpoint, Duration::from_secs(20));
            if let Err(e) = compare_trees(mountpoint, plain) {
                return fail(i, format!("after step {i} {op:?}: {e}"));
            }
            i += 1;
            continue;
        }
        let got = vdb.apply(op);
        let want = model.apply(op);
        tally(op, &want);
        if got != want {
            let extra = match (&got, &want) {
                (Out::Bytes(a), Out::Bytes(b)) => format!("; {}", first_difference(a, b)),
                _ => String::new(),
            };
            return fail(
                i,
                format!("step {i} {op:?}: vdbfs gave {got:?}, the model {want:?}{extra}"),
            );
        }
        if s.tree_every > 0 && (i + 1) % s.tree_every == 0 {
            if let Err(e) = compare_trees(mountpoint, plain) {
                return fail(i, format!("after step {i} {op:?}: {e}"));
            }
        }
        i += 1;
    }
    vdb.close_all();
    model.close_all();
    if let Err(e) = compare_trees(mountpoint, plain) {
        return fail(i, format!("at the end of the sequence: {e}"));
    }
    let mp = mountpoint.to_str().expect("utf-8 mount point").to_string();
    // Every handle of the sequence is closed, but a child that another test of this binary is
    // starting can hold a copy of one for a moment (between its fork and its exec, before
    // close-on-exec applies): a busy answer is retried for a bounded time, any other failure is
    // a failure at once.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let out = d.vdbfs(&["--json", "umount", &mp]);
        if out.status.success() {
            break;
        }
        let busy = serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .is_ok_and(|v| v["error"]["kind"] == "busy");
        if !busy || std::time::Instant::now() > deadline {
            d.ok(&["umount", &mp]);
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(
        !util::is_mounted(mountpoint),
        "`vdbfs umount {mp}` exited 0 but it is still mounted"
    );
    d.ok(&["mount", name, &mp]);
    if let Err(e) = compare_trees(mountpoint, plain) {
        return fail(i, format!("after umount + mount: {e}"));
    }
    Ok(())
}

/// Removes chunks of operations while the sequence still fails (any failure counts), within a
/// time budget. Returns the smallest failing sequence found and its failure.
fn shrink(d: &mut Daemon, ops: Vec<Op>, first: Failure, s: &Settings) -> (Vec<Op>, Failure) {
    let budget = Duration::from_secs(env_u64("VDBFS_MODEL_SHRINK_SECS", 240));
    let start = Instant::now();
    let mut cur: Vec<Op> = ops[..(first.step + 1).min(ops.len())].to_vec();
    let mut failure = first;
    let mut chunk = cur.len().div_ceil(2).max(1);
    let mut runs = 0;
    loop {
        let mut removed = false;
        let mut i = 0;
        while i < cur.len() {
            if start.elapsed() > budget {
                eprintln!("shrinking stopped after {runs} runs (time budget {budget:?})");
                return (cur, failure);
            }
            let end = (i + chunk).min(cur.len());
            let cand: Vec<Op> = cur[..i].iter().chain(&cur[end..]).cloned().collect();
            runs += 1;
            match run_sequence(d, &mut Source::Replay(&cand), s) {
                Err(f) => {
                    let keep = (f.step + 1).min(cand.len());
                    cur = cand[..keep].to_vec();
                    failure = f;
                    removed = true;
                }
                Ok(()) => i += chunk,
            }
        }
        if !removed {
            if chunk == 1 {
                break;
            }
            chunk = chunk.div_ceil(2);
        }
    }
    eprintln!("shrunk to {} ops in {runs} runs", cur.len());
    (cur, failure)
}

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
        Err(_) => default,
    }
}

// The same random file operations on a vdbfs mount and on a plain directory give the same results,
// the same trees after every step, and the same tree after an unmount and a mount.
#[test]
fn random_file_operations_match_a_plain_directory() {
    util::require_root_fuse();
    let seed = env_u64("VDBFS_MODEL_SEED", 0x7664_6266_7301);
    let cases = env_u64("VDBFS_MODEL_CASES", 40);
    let steps = env_u64("VDBFS_MODEL_STEPS", 120) as usize;
    let skip = std::env::var("VDBFS_MODEL_SKIP").unwrap_or_default();
    let skip: Vec<&str> = skip.split(',').map(str::trim).collect();
    let daemon_ops: Vec<Op> = DAEMON_OPS
        .iter()
        .filter(|(n, _)| !skip.contains(n))
        .map(|(_, op)| op.clone())
        .collect();
    let s = Settings {
        tree_every: env_u64("VDBFS_MODEL_TREE_EVERY", 1) as usize,
    };
    let mut d = Daemon::start();
    for case in 0..cases {
        let case_seed = seed.wrapping_add(case);
        eprintln!("model case {case}: VDBFS_MODEL_SEED={case_seed}, {steps} ops");
        let mut source = Source::Random {
            rng: Box::new(StdRng::seed_from_u64(case_seed)),
            steps,
            daemon_ops: daemon_ops.clone(),
            recorded: Vec::new(),
        };
        let r = run_sequence(&mut d, &mut source, &s);
        let Source::Random { recorded: ops, .. } = source else {
            unreachable!()
        };
        if let Err(f) = r {
            eprintln!("model case {case} (seed {case_seed}) failed: {}", f.what);
            let (min, mf) = shrink(&mut d, ops, f, &s);
            let listing: Vec<String> = min
                .iter()
                .enumerate()
                .map(|(i, op)| format!("  {i:3}: {op:?}"))
                .collect();
            panic!(
                "vdbfs differs from a plain directory (case {case}, VDBFS_MODEL_SEED={case_seed} \
                 VDBFS_MODEL_CASES=1 VDBFS_MODEL_STEPS={steps}).\nMinimal sequence ({} ops; the \
                 last check is a tree comparison, then umount + mount + comparison):\n{}\n\
                 Failure of the minimal sequence: {}",
                min.len(),
                listing.join("\n"),
                mf.what
            );
        }
    }
    let t = TALLY.lock().unwrap_or_else(|e| e.into_inner());
    let summary: Vec<String> = t
        .iter()
        .map(|(k, (ok, err))| format!("{k} {ok} ok/{err} err"))
        .collect();
    eprintln!("model: operations run: {}", summary.join(", "));
}
