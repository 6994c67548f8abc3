//! Randomized model test of snapshots, clones, deletes and garbage collection at the tree
//! layer (no FUSE): random writes, truncates, renames, unlinks, snapshots, clones, deletes of
//! datasets and snapshots, `gc()`, checkpoints, fsyncs and reopens of the store (clean, after
//! fsync, or as a crash that drops what was not made durable) on several datasets, compared
//! with a model that keeps a full copy of every dataset and every snapshot. After every step
//! every dataset (clones included) and every snapshot (through `snapshot_view`) is re-read and
//! compared with the model.
//!
//! Fixed seed by default; `VDBFS_SNAP_SEED=N VDBFS_SNAP_STEPS=M` to explore further.

use super::dataset::{Dataset, SetAttr, ROOT_INO};
use super::{Datasets, NameError};
use crate::store::Store;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use vdbfs_format::tree::FileKind;

/// Path ("fN" or "sub/fN") -> content.
type Files = BTreeMap<String, Vec<u8>>;

const MAX_DATASETS: usize = 6;
const MAX_SNAPSHOTS: usize = 10;
const DATASET_NAMES: [&str; 8] = ["d0", "d1", "d2", "d3", "d4", "d5", "d6", "d7"];

#[derive(Clone, Default)]
struct DsModel {
    live: Files,
    /// What a crash (drop without sync) must leave: the state at the last fsync of this
    /// dataset or the last checkpoint/snapshot/gc commit.
    durable: Files,
}

#[derive(Default)]
struct Model {
    datasets: BTreeMap<String, DsModel>,
    /// (dataset, snapshot) -> content at snapshot time.
    snapshots: BTreeMap<(String, String), Files>,
}

impl Model {
    /// A checkpoint commit (checkpoint, gc, usage): every dataset becomes durable.
    fn all_durable(&mut self) {
        for d in self.datasets.values_mut() {
            d.durable = d.live.clone();
        }
    }
}

fn open(dir: &Path) -> Datasets {
    let (store, replay) = Store::open(dir).unwrap();
    Datasets::open(Arc::new(store), replay).unwrap()
}

fn split(path: &str) -> (bool, &str) {
    match path.strip_prefix("sub/") {
        Some(n) => (true, n),
        None => (false, path),
    }
}

fn parent_of(d: &Dataset, in_sub: bool) -> u64 {
    if in_sub {
        d.lookup(ROOT_INO, b"sub").expect("the sub directory").0
    } else {
        ROOT_INO
    }
}

fn ino_of(d: &Dataset, path: &str) -> Option<u64> {
    let (in_sub, name) = split(path);
    d.lookup(parent_of(d, in_sub), name.as_bytes())
        .ok()
        .map(|(i, _)| i)
}

fn read_dir_files(d: &Dataset, dir: u64, prefix: &str, out: &mut Files, what: &str) {
    for (name, ino, kind) in d.readdir(dir).unwrap() {
        let name = String::from_utf8(name).unwrap();
        match kind {
            FileKind::Regular => {
                let size = d.getattr(ino).unwrap().size;
                let data = d
                    .read(ino, 0, size as u32 + 1)
                    .unwrap_or_else(|e| panic!("{what}: read {prefix}{name}: {e}"));
                assert_eq!(data.len() as u64, size, "{what}: short read of {name}");
                out.insert(format!("{prefix}{name}"), data);
            }
            FileKind::Directory => {
                assert_eq!(name, "sub", "{what}: unexpected directory");
                read_dir_files(d, ino, "sub/", out, what);
            }
            k => panic!("{what}: unexpected {k:?} {name}"),
        }
    }
}

fn read_all(d: &Dataset, what: &str) -> Files {
    let mut out = Files::new();
    read_dir_files(d, ROOT_INO, "", &mut out, what);
    out
}

fn describe_diff(got: &Files, want: &Files) -> String {
    let mut s = String::new();
    for (k, v) in want {
        match got.get(k) {
            None => s += &format!("  missing {k} ({} bytes)\n", v.len()),
            Some(g) if g != v => {
                let first = g.iter().zip(v).position(|(a, b)| a != b);
                s += &format!(
                    "  {k}: got {} bytes, want {}; first differing byte at {first:?}\n",
                    g.len(),
                    v.len()
                )
            }
            _ => {}
        }
    }
    for k in got.keys() {
        if !want.contains_key(k) {
            s += &format!("  unexpected {k}\n");
        }
    }
    s
}

fn assert_same(got: &Files, want: &Files, what: &str, step: usize, seed: u64) {
    if got != want {
        panic!(
            "seed {seed} step {step}: {what} differs from the model:\n{}",
            describe_diff(got, want)
        );
    }
}

/// Data of a few kinds: zeros (holes), blocks shared between files (dedup), random bytes.
fn gen_data(rng: &mut StdRng, len: usize) -> Vec<u8> {
    match rng.gen_range(0..4) {
        0 => vec![0; len],
        1 => {
            // One of a few recurring patterns, aligned to 8 KiB so whole blocks repeat.
            let k: u8 = rng.gen_range(1..4);
            (0..len).map(|i| k.wrapping_mul((i % 251) as u8)).collect()
        }
        _ => (0..len).map(|_| rng.gen()).collect(),
    }
}

fn expect_err<T>(r: anyhow::Result<T>, what: &str) -> anyhow::Error {
    match r {
        Ok(_) => panic!("{what}: succeeded, expected an error"),
        Err(e) => e,
    }
}

fn verify_all(ds: &Datasets, m: &Model, step: usize, seed: u64) {
    let mut names: Vec<String> = ds.list().unwrap().into_iter().map(|r| r.name).collect();
    names.sort();
    let want: Vec<String> = m.datasets.keys().cloned().collect();
    assert_eq!(names, want, "seed {seed} step {step}: dataset list");
    for (name, dm) in &m.datasets {
        let d = ds.get(name).unwrap().unwrap();
        assert_same(
            &read_all(&d, name),
            &dm.live,
            &format!("dataset {name}"),
            step,
            seed,
        );
    }
    let listed: Vec<(String, String)> = ds
        .snapshots(None)
        .unwrap()
        .into_iter()
        .map(|s| (s.dataset, s.rec.name))
        .collect();
    let mut sorted = listed.clone();
    sorted.sort();
    let want: Vec<(String, String)> = m.snapshots.keys().cloned().collect();
    assert_eq!(sorted, want, "seed {seed} step {step}: snapshot list");
    for ((d, s), files) in &m.snapshots {
        let v = ds.snapshot_view(d, s).unwrap();
        let what = format!("snapshot {d}@{s}");
        assert_same(&read_all(&v, &what), files, &what, step, seed);
    }
}

#[test]
fn snapshots_and_clones_match_a_full_copy_model() {
    let seed: u64 = std::env::var("VDBFS_SNAP_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5a9_5eed);
    let steps: usize = std::env::var("VDBFS_SNAP_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000);
    eprintln!(
        "snapshot model test: seed {seed}, {steps} steps (VDBFS_SNAP_SEED / VDBFS_SNAP_STEPS)"
    );
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    Store::create(dir.path()).unwrap();
    let mut ds = Some(open(dir.path()));
    let mut m = Model::default();
    let mut snap_no = 0usize;
    let mut counts: BTreeMap<&'static str, usize> = BTreeMap::new();

    let new_dataset = |ds: &Datasets, m: &mut Model, name: &str| {
        ds.create(name).unwrap();
        let d = ds.get(name).unwrap().unwrap();
        d.create(ROOT_INO, b"sub", FileKind::Directory, 0o755, 0, 0, 0, None)
            .unwrap();
        // Durable at once, so that a crash never loses the directory the model assumes.
        d.fsync().unwrap();
        m.datasets.insert(name.to_string(), DsModel::default());
    };
    new_dataset(ds.as_ref().unwrap(), &mut m, "d0");

    for step in 0..steps {
        let dsr = ds.as_ref().unwrap();
        let names: Vec<String> = m.datasets.keys().cloned().collect();
        let pick_ds = |rng: &mut StdRng| names[rng.gen_range(0..names.len())].clone();
        let path = |rng: &mut StdRng| {
            let n = rng.gen_range(0..5);
            if rng.gen_bool(0.3) {
                format!("sub/f{n}")
            } else {
                format!("f{n}")
            }
        };
        let roll = rng.gen_range(0..1000);
        let op: &'static str = match roll {
            _ if names.is_empty() => "create",
            0..=359 => "write",
            360..=379 => "reset",
            380..=439 => "truncate",
            440..=489 => "rename",
            490..=529 => "unlink",
            530..=619 => "snapshot",
            620..=679 => "clone",
            680..=719 => "delete_snapshot",
            720..=744 => "delete_dataset",
            745..=764 => "create",
            765..=809 => "gc",
            810..=839 => "fsync",
            840..=864 => "checkpoint",
            865..=889 => "usage",
            890..=919 => "reopen_clean",
            920..=949 => "reopen_fsynced",
            950..=979 => "reopen_crash",
            _ => "errors",
        };
        *counts.entry(op).or_default() += 1;
        match op {
            "write" => {
                let name = pick_ds(&mut rng);
                let p = path(&mut rng);
                let d = dsr.get(&name).unwrap().unwrap();
                let ino = match ino_of(&d, &p) {
                    Some(i) => i,
                    None => {
                        let (in_sub, n) = split(&p);
                        let parent = parent_of(&d, in_sub);
                        d.create(
                            parent,
                            n.as_bytes(),
                            FileKind::Regular,
                            0o644,
                            0,
                            0,
                            0,
                            None,
                        )
                        .unwrap()
                        .0
                    }
                };
                let off = if rng.gen_bool(0.5) {
                    rng.gen_range(0..12u64) * 8192
                } else {
                    rng.gen_range(0..100_000u64)
                };
                let len = rng.gen_range(1..30_000usize);
                let data = gen_data(&mut rng, len);
                d.write(ino, off, &data).unwrap();
                let c = m
                    .datasets
                    .get_mut(&name)
                    .unwrap()
                    .live
                    .entry(p)
                    .or_default();
                let end = off as usize + len;
                if c.len() < end {
                    c.resize(end, 0);
                }
                c[off as usize..end].copy_from_slice(&data);
            }
            "truncate" => {
                let name = pick_ds(&mut rng);
                let p = path(&mut rng);
                let d = dsr.get(&name).unwrap().unwrap();
                if let Some(ino) = ino_of(&d, &p) {
                    let size = rng.gen_range(0..120_000u64);
                    d.setattr(
                        ino,
                        SetAttr {
                            size: Some(size),
                            ..Default::default()
                        },
                    )
                    .unwrap();
                    m.datasets
                        .get_mut(&name)
                        .unwrap()
                        .live
                        .get_mut(&p)
                        .unwrap()
                        .resize(size as usize, 0);
                }
            }
            "rename" => {
                let name = pick_ds(&mut rng);
                let (from, to) = (path(&mut rng), path(&mut rng));
                let d = dsr.get(&name).unwrap().unwrap();
                if ino_of(&d, &from).is_some() {
                    let (fs, fname) = split(&from);
                    let (ts, tname) = split(&to);
                    d.rename(
                        parent_of(&d, fs),
                        fname.as_bytes(),
                        parent_of(&d, ts),
                        tname.as_bytes(),
                        0,
                        (0, 0),
                    )
                    .unwrap();
                    let live = &mut m.datasets.get_mut(&name).unwrap().live;
                    let c = live.remove(&from).unwrap();
                    live.insert(to, c);
                }
            }
            "unlink" => {
                let name = pick_ds(&mut rng);
                let p = path(&mut rng);
                let d = dsr.get(&name).unwrap().unwrap();
                if ino_of(&d, &p).is_some() {
                    let (in_sub, n) = split(&p);
                    d.unlink(parent_of(&d, in_sub), n.as_bytes(), false)
                        .unwrap();
                    m.datasets.get_mut(&name).unwrap().live.remove(&p);
                }
            }
            "snapshot" => {
                if m.snapshots.len() >= MAX_SNAPSHOTS {
                    continue;
                }
                let name = pick_ds(&mut rng);
                let snap = if rng.gen_bool(0.2) {
                    // Unnamed: a sortable name from the creation time (ms resolution).
                    std::thread::sleep(std::time::Duration::from_millis(2));
                    let s = dsr.snapshot(&name, None).unwrap();
                    let n = s.rec.name.clone();
                    assert!(
                        super::check_snapshot_name(&n).is_ok(),
                        "generated snapshot name {n:?} is not a valid name"
                    );
                    if let Some(((_, prev), _)) = m
                        .snapshots
                        .iter()
                        .filter(|((d, s), _)| *d == name && s.starts_with('2'))
                        .max_by_key(|((_, s), _)| s.clone())
                    {
                        assert!(
                            n > *prev,
                            "unnamed snapshot names do not sort by time: {prev} then {n}"
                        );
                    }
                    n
                } else {
                    snap_no += 1;
                    let n = format!("s{snap_no}");
                    let s = dsr.snapshot(&name, Some(&n)).unwrap();
                    assert_eq!(s.full_name(), format!("{name}@{n}"));
                    n
                };
                // A snapshot commits its own dataset's tree (only).
                let dm = m.datasets.get_mut(&name).unwrap();
                dm.durable = dm.live.clone();
                let files = dm.live.clone();
                m.snapshots.insert((name, snap), files);
            }
            "clone" => {
                if m.snapshots.is_empty() || m.datasets.len() >= MAX_DATASETS {
                    continue;
                }
                let keys: Vec<(String, String)> = m.snapshots.keys().cloned().collect();
                let (d, s) = keys[rng.gen_range(0..keys.len())].clone();
                let Some(new) = DATASET_NAMES.iter().find(|n| !m.datasets.contains_key(**n)) else {
                    continue;
                };
                dsr.clone_snapshot(&d, &s, new).unwrap();
                let files = m.snapshots[&(d.clone(), s.clone())].clone();
                assert_eq!(
                    dsr.origin(dsr.record(new).unwrap().unwrap().id).unwrap(),
                    Some(format!("{d}@{s}"))
                );
                m.datasets.insert(
                    new.to_string(),
                    DsModel {
                        live: files.clone(),
                        durable: files,
                    },
                );
            }
            "reset" => {
                // As `vdbfs vdb refresh/rewind`: the dataset (flushed, not in use) takes a
                // snapshot's tree and keeps its id and snapshots.
                if m.snapshots.is_empty() {
                    continue;
                }
                let name = pick_ds(&mut rng);
                let keys: Vec<(String, String)> = m.snapshots.keys().cloned().collect();
                let (d, s) = keys[rng.gen_range(0..keys.len())].clone();
                let id = dsr.record(&name).unwrap().unwrap().id;
                dsr.checkpoint().unwrap();
                m.all_durable();
                let set_origin = rng.gen_bool(0.5);
                dsr.reset_to_snapshot(&name, &d, &s, set_origin).unwrap();
                assert_eq!(
                    dsr.record(&name).unwrap().unwrap().id,
                    id,
                    "reset keeps the id"
                );
                if set_origin {
                    assert_eq!(dsr.origin(id).unwrap(), Some(format!("{d}@{s}")));
                }
                let files = m.snapshots[&(d, s)].clone();
                m.datasets.insert(
                    name,
                    DsModel {
                        live: files.clone(),
                        durable: files,
                    },
                );
            }
            "delete_snapshot" => {
                if m.snapshots.is_empty() {
                    continue;
                }
                let keys: Vec<(String, String)> = m.snapshots.keys().cloned().collect();
                let (d, s) = keys[rng.gen_range(0..keys.len())].clone();
                dsr.delete_snapshot(&d, &s).unwrap();
                m.snapshots.remove(&(d, s));
            }
            "delete_dataset" => {
                if m.datasets.len() <= 1 {
                    continue;
                }
                let name = pick_ds(&mut rng);
                // As `vdbfs dataset delete --with-snapshots`: its snapshots go first; clones
                // made from them live on.
                let snaps: Vec<String> = m
                    .snapshots
                    .keys()
                    .filter(|(d, _)| *d == name)
                    .map(|(_, s)| s.clone())
                    .collect();
                for s in &snaps {
                    dsr.delete_snapshot(&name, s).unwrap();
                    m.snapshots.remove(&(name.clone(), s.clone()));
                }
                dsr.delete(&name).unwrap();
                m.datasets.remove(&name);
            }
            "create" => {
                if m.datasets.len() >= MAX_DATASETS {
                    continue;
                }
                let Some(new) = DATASET_NAMES.iter().find(|n| !m.datasets.contains_key(**n)) else {
                    continue;
                };
                new_dataset(dsr, &mut m, new);
            }
            "gc" => {
                let r = dsr.gc().unwrap();
                eprintln!(
                    "step {step}: gc freed {} blocks, rewrote {} packs",
                    r.blocks_freed, r.packs_rewritten
                );
                m.all_durable();
            }
            "fsync" => {
                let name = pick_ds(&mut rng);
                dsr.get(&name).unwrap().unwrap().fsync().unwrap();
                let dm = m.datasets.get_mut(&name).unwrap();
                dm.durable = dm.live.clone();
            }
            "checkpoint" => {
                dsr.checkpoint().unwrap();
                m.all_durable();
            }
            "usage" => {
                let u = dsr.usage().unwrap();
                m.all_durable();
                for r in &u.roots {
                    let files = if r.is_snapshot {
                        let (d, s) = r.name.split_once('@').unwrap();
                        &m.snapshots[&(d.to_string(), s.to_string())]
                    } else {
                        &m.datasets[&r.name].live
                    };
                    let want: u64 = files.values().map(|v| v.len() as u64).sum();
                    assert_eq!(
                        r.logical_bytes, want,
                        "seed {seed} step {step}: df logical bytes of {}",
                        r.name
                    );
                }
                assert_eq!(u.roots.len(), m.datasets.len() + m.snapshots.len());
                let per = dsr.dataset_usage().unwrap();
                for (name, dm) in &m.datasets {
                    let want: u64 = dm.live.values().map(|v| v.len() as u64).sum();
                    assert_eq!(
                        per[name].0, want,
                        "seed {seed} step {step}: logical of {name}"
                    );
                    // Exclusive bytes never exceed what the dataset and its snapshots hold.
                    let held: u64 = u
                        .roots
                        .iter()
                        .filter(|r| r.name == *name || r.name.starts_with(&format!("{name}@")))
                        .map(|r| r.unique_bytes + r.shared_bytes)
                        .sum();
                    assert!(
                        per[name].1 <= held,
                        "seed {seed} step {step}: unique of {name}"
                    );
                }
                assert!(u.live_stored_bytes <= u.physical_bytes);
            }
            "reopen_clean" | "reopen_fsynced" | "reopen_crash" => {
                match op {
                    "reopen_clean" => {
                        dsr.checkpoint().unwrap();
                        m.all_durable();
                    }
                    "reopen_fsynced" => {
                        for (name, dm) in m.datasets.iter_mut() {
                            dsr.get(name).unwrap().unwrap().fsync().unwrap();
                            dm.durable = dm.live.clone();
                        }
                    }
                    _ => {
                        for dm in m.datasets.values_mut() {
                            dm.live = dm.durable.clone();
                        }
                    }
                }
                drop(ds.take());
                ds = Some(open(dir.path()));
            }
            "errors" => {
                let name = pick_ds(&mut rng);
                let e = expect_err(dsr.snapshot(&name, Some("bad/name")), "snapshot bad/name");
                assert!(matches!(
                    e.downcast_ref::<NameError>(),
                    Some(NameError::InvalidSnapshot(_))
                ));
                if let Some(((d, s), _)) = m.snapshots.iter().next() {
                    let e = expect_err(dsr.snapshot(d, Some(s)), "snapshot with an existing name");
                    assert!(matches!(
                        e.downcast_ref::<NameError>(),
                        Some(NameError::SnapshotExists(_))
                    ));
                    let e = expect_err(
                        dsr.clone_snapshot(d, s, &name),
                        "clone onto an existing dataset",
                    );
                    assert!(matches!(
                        e.downcast_ref::<NameError>(),
                        Some(NameError::Exists(_))
                    ));
                }
                let e = expect_err(
                    dsr.delete_snapshot(&name, "no-such-snapshot"),
                    "delete a missing snapshot",
                );
                assert!(matches!(
                    e.downcast_ref::<NameError>(),
                    Some(NameError::SnapshotNotFound(_))
                ));
            }
            other => unreachable!("{other}"),
        }
        verify_all(ds.as_ref().unwrap(), &m, step, seed);
    }
    // And once more from a fresh open after a final collection.
    let dsr = ds.take().unwrap();
    dsr.gc().unwrap();
    dsr.checkpoint().unwrap();
    m.all_durable();
    drop(dsr);
    let dsr = open(dir.path());
    verify_all(&dsr, &m, steps, seed);
    eprintln!("operations: {counts:?}");
}

/// GC racing with checkpoints, at the API level: one thread collects in a loop; another keeps
/// rewriting a file with blocks that recur (so they deduplicate against blocks the collector
/// may have found unreferenced), checkpoints, truncates and reads back. A block the live tree
/// references must never be swept: every read and truncate succeeds with the right bytes.
#[test]
fn gc_racing_checkpoints_never_frees_a_live_block() {
    let dir = tempfile::tempdir().unwrap();
    Store::create(dir.path()).unwrap();
    let ds = open(dir.path());
    ds.create("d").unwrap();
    let d = ds.get("d").unwrap().unwrap();
    let (ino, _) = d
        .create(ROOT_INO, b"f", FileKind::Regular, 0o644, 0, 0, 0, None)
        .unwrap();
    let millis: u64 = std::env::var("VDBFS_GC_RACE_MS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3000);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let block = |k: u8| -> Vec<u8> { (0..8192).map(|i| k.wrapping_mul(i as u8) ^ k).collect() };
    std::thread::scope(|s| {
        let gc = s.spawn(|| {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                ds.gc().unwrap();
                n += 1;
            }
            n
        });
        let mut rng = StdRng::seed_from_u64(1);
        let mut model: Vec<u8> = Vec::new();
        let t0 = std::time::Instant::now();
        let mut i = 0u64;
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            while t0.elapsed() < std::time::Duration::from_millis(millis) {
                i += 1;
                // A few recurring blocks, so a block goes from referenced to garbage and back.
                let k: u8 = rng.gen_range(1..5);
                let idx = rng.gen_range(0..8usize);
                let data = block(k);
                d.write(ino, (idx * 8192) as u64, &data).unwrap();
                if model.len() < (idx + 1) * 8192 {
                    model.resize((idx + 1) * 8192, 0);
                }
                model[idx * 8192..(idx + 1) * 8192].copy_from_slice(&data);
                if rng.gen_bool(0.3) {
                    ds.checkpoint().unwrap();
                }
                if rng.gen_bool(0.1) {
                    let size = rng.gen_range(0..8 * 8192u64);
                    d.setattr(
                        ino,
                        SetAttr {
                            size: Some(size),
                            ..Default::default()
                        },
                    )
                    .unwrap_or_else(|e| panic!("iteration {i}: truncate to {size}: {e}"));
                    model.resize(size as usize, 0);
                }
                let got = d
                    .read(ino, 0, model.len() as u32 + 1)
                    .unwrap_or_else(|e| panic!("iteration {i}: read back: {e}"));
                assert!(got == model, "iteration {i}: wrong bytes read back");
            }
        }));
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let runs = gc.join().unwrap();
        eprintln!("{i} iterations, {runs} collections");
        if let Err(p) = result {
            std::panic::resume_unwind(p);
        }
    });
}
