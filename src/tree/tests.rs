//! Crash consistency of the tree layer, through the simulated disk: random file operations,
//! fsyncs and checkpoints, a power cut at a random moment, recovery; every fsynced state is
//! back exactly.

use super::dataset::{Dataset, ROOT_INO};
use super::Datasets;
use crate::store::sim::SimIo;
use crate::store::Store;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::sync::Arc;
use vdbfs_format::tree::FileKind;
use vdbfs_format::{pack, BlockId};

type Model = BTreeMap<String, Vec<u8>>;

fn open(dir: &std::path::Path, io: Arc<SimIo>) -> (Datasets, Arc<Dataset>) {
    let (store, replay) = Store::open_with(dir, io).unwrap();
    let ds = Datasets::open(Arc::new(store), replay).unwrap();
    let d = ds.get("d").unwrap().unwrap();
    (ds, d)
}

fn read_all(d: &Dataset) -> Model {
    let mut out = Model::new();
    for (name, ino, kind) in d.readdir(ROOT_INO).unwrap() {
        assert_eq!(kind, FileKind::Regular);
        let size = d.getattr(ino).unwrap().size;
        let data = d.read(ino, 0, size as u32).unwrap();
        assert_eq!(data.len() as u64, size);
        out.insert(String::from_utf8(name).unwrap(), data);
    }
    out
}

fn ino_of(d: &Dataset, name: &str) -> Option<u64> {
    d.lookup(ROOT_INO, name.as_bytes()).ok().map(|(i, _)| i)
}

/// Blocks of `content` that hold anything but zeros: what a file of it stores.
fn stored_in(content: &[u8]) -> u64 {
    content
        .chunks(8192)
        .filter(|b| b.iter().any(|&x| x != 0))
        .count() as u64
}

/// `st_blocks` counts stored blocks: every file's count matches its content.
fn assert_stored_counts(d: &Dataset, model: &Model, when: &str) {
    for (name, content) in model {
        let ino = ino_of(d, name).unwrap();
        assert_eq!(
            d.stored_blocks(ino).unwrap(),
            Some(stored_in(content)),
            "{when}: stored blocks of {name}"
        );
    }
}

#[test]
fn every_fsynced_state_survives_power_cuts_at_random_moments() {
    let seed: u64 = std::env::var("VDBFS_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed);
    let rounds: usize = std::env::var("VDBFS_CRASH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40);
    eprintln!("seed {seed}, {rounds} rounds");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    Store::create(dir.path()).unwrap();
    let mut io = SimIo::new();
    {
        let (store, replay) = Store::open_with(dir.path(), io.clone()).unwrap();
        let ds = Datasets::open(Arc::new(store), replay).unwrap();
        ds.create("d").unwrap();
    }
    let mut model = Model::new();
    let mut durable = model.clone();
    for round in 0..rounds {
        let (ds, d) = open(dir.path(), io.clone());
        assert_eq!(
            read_all(&d),
            durable,
            "round {round}: recovered state differs from the last fsynced state"
        );
        if round % 2 == 0 {
            // Counted from the block maps (the other rounds count as they go).
            assert_stored_counts(&d, &durable, &format!("round {round} after recovery"));
        }
        model = durable.clone();
        let steps = rng.gen_range(1..60);
        for _ in 0..steps {
            let name = format!("f{}", rng.gen_range(0..5));
            match rng.gen_range(0..100) {
                0..=49 => {
                    let ino = match ino_of(&d, &name) {
                        Some(i) => i,
                        None => {
                            d.create(
                                ROOT_INO,
                                name.as_bytes(),
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
                    let content = model.entry(name.clone()).or_default();
                    let off = rng.gen_range(0..40_000u64);
                    let len = rng.gen_range(1..20_000usize);
                    let byte: u8 = rng.gen();
                    let data: Vec<u8> = (0..len)
                        .map(|i| {
                            if byte.is_multiple_of(4) {
                                0
                            } else {
                                byte ^ (i as u8)
                            }
                        })
                        .collect();
                    d.write(ino, off, &data).unwrap();
                    let end = off as usize + len;
                    if content.len() < end {
                        content.resize(end, 0);
                    }
                    content[off as usize..end].copy_from_slice(&data);
                }
                50..=59 => {
                    if let Some(ino) = ino_of(&d, &name) {
                        let size = rng.gen_range(0..50_000u64);
                        d.setattr(
                            ino,
                            super::dataset::SetAttr {
                                size: Some(size),
                                ..Default::default()
                            },
                        )
                        .unwrap();
                        model.get_mut(&name).unwrap().resize(size as usize, 0);
                    }
                }
                60..=67 => {
                    if ino_of(&d, &name).is_some() {
                        d.unlink(ROOT_INO, name.as_bytes(), false).unwrap();
                        model.remove(&name);
                    }
                }
                68..=75 => {
                    let to = format!("f{}", rng.gen_range(0..5));
                    if ino_of(&d, &name).is_some() {
                        d.rename(
                            ROOT_INO,
                            name.as_bytes(),
                            ROOT_INO,
                            to.as_bytes(),
                            0,
                            (0, 0),
                        )
                        .unwrap();
                        let c = model.remove(&name).unwrap();
                        model.insert(to, c);
                    }
                }
                76..=89 => {
                    d.fsync().unwrap();
                    durable = model.clone();
                }
                _ => {
                    ds.checkpoint().unwrap();
                    durable = model.clone();
                }
            }
        }
        assert_eq!(
            read_all(&d),
            model,
            "round {round}: live state differs from the model"
        );
        assert_stored_counts(&d, &model, &format!("round {round}"));
        let garbage = rng.gen_range(0..30_000);
        drop(d);
        drop(ds);
        io = io.crash(garbage);
    }
}

#[test]
fn a_huge_fsync_is_journaled_in_bounded_records_and_recovered_whole() {
    // The bug: more than ~1.6M changed blocks between two fsyncs made one journal record larger
    // than a pack record may be, and recovery took it for a torn tail, losing fsynced data.
    // The fix splits a journal into records of at most 4 MiB, applied as one group.
    let dir = tempfile::tempdir().unwrap();
    Store::create(dir.path()).unwrap();
    let io = SimIo::new();
    let n_blocks: u64 = 120_000; // ~5 MiB of journal entries: at least two records
    let expect: Vec<u8>;
    {
        let (store, replay) = Store::open_with(dir.path(), io.clone()).unwrap();
        let ds = Datasets::open(Arc::new(store), replay).unwrap();
        ds.create("d").unwrap();
        let d = ds.get("d").unwrap().unwrap();
        let (ino, _) = d
            .create(ROOT_INO, b"big", FileKind::Regular, 0o644, 0, 0, 0, None)
            .unwrap();
        // Distinct blocks (first 8 bytes = index), written in 1 MiB requests.
        let mut all = Vec::with_capacity((n_blocks * 8192) as usize);
        for i in 0..n_blocks {
            let mut b = vec![0xabu8; 8192];
            b[..8].copy_from_slice(&i.to_le_bytes());
            all.extend_from_slice(&b);
        }
        for (k, chunk) in all.chunks(1 << 20).enumerate() {
            d.write(ino, (k as u64) << 20, chunk).unwrap();
        }
        d.fsync().unwrap();
        expect = all;
    }
    let (store, replay) = Store::open_with(dir.path(), io.crash(0)).unwrap();
    assert!(
        replay.journal.len() >= 2,
        "expected a split journal, got {} record(s)",
        replay.journal.len()
    );
    let ds = Datasets::open(Arc::new(store), replay).unwrap();
    let d = ds.get("d").unwrap().unwrap();
    let (ino, meta) = d.lookup(ROOT_INO, b"big").unwrap();
    assert_eq!(meta.size, n_blocks * 8192);
    for (k, chunk) in expect.chunks(1 << 20).enumerate() {
        let got = d.read(ino, (k as u64) << 20, 1 << 20).unwrap();
        assert!(got == chunk, "chunk {k} differs after recovery");
    }
}

#[test]
fn files_over_one_gib_and_sparse_ranges_read_back_exactly() {
    // Files past 1 GiB (a relation segment's limit) and far past it, with holes between writes:
    // the block map grows in height, holes read as zeros, sizes are exact, and all of it
    // survives a checkpoint and a reopen.
    let dir = tempfile::tempdir().unwrap();
    Store::create(dir.path()).unwrap();
    let io = SimIo::new();
    let offsets: [u64; 4] = [0, (1 << 30) - 3, 5 << 30, (300 << 30) + 12345];
    let piece = |k: usize| -> Vec<u8> {
        (0..20_000u32)
            .map(|i| (i as u8) ^ (k as u8 * 31 + 1))
            .collect()
    };
    {
        let (store, replay) = Store::open_with(dir.path(), io.clone()).unwrap();
        let ds = Datasets::open(Arc::new(store), replay).unwrap();
        ds.create("d").unwrap();
        let d = ds.get("d").unwrap().unwrap();
        let (ino, _) = d
            .create(ROOT_INO, b"big", FileKind::Regular, 0o600, 0, 0, 0, None)
            .unwrap();
        for (k, off) in offsets.iter().enumerate() {
            d.write(ino, *off, &piece(k)).unwrap();
        }
        d.fsync().unwrap();
        ds.checkpoint().unwrap();
    }
    let (store, replay) = Store::open_with(dir.path(), io.crash(0)).unwrap();
    let ds = Datasets::open(Arc::new(store), replay).unwrap();
    let d = ds.get("d").unwrap().unwrap();
    let (ino, meta) = d.lookup(ROOT_INO, b"big").unwrap();
    assert_eq!(meta.size, offsets[3] + 20_000);
    for (k, off) in offsets.iter().enumerate() {
        assert_eq!(d.read(ino, *off, 20_000).unwrap(), piece(k), "piece {k}");
        // The bytes just before each piece are a hole (or the previous piece's tail).
        if *off >= 8192 * 4 && k > 0 {
            assert_eq!(d.read(ino, off - 8192, 8192).unwrap(), vec![0u8; 8192]);
        }
    }
    // Reads at and past EOF are short, never padded.
    assert_eq!(d.read(ino, meta.size - 10, 100).unwrap().len(), 10);
    assert!(d.read(ino, meta.size, 100).unwrap().is_empty());
}

/// A new store in `dir` on the simulated disk `io`, opened, with the empty datasets `names`.
fn new_datasets(dir: &std::path::Path, io: &Arc<SimIo>, names: &[&str]) -> Datasets {
    Store::create(dir).unwrap();
    let (store, replay) = Store::open_with(dir, io.clone()).unwrap();
    let ds = Datasets::open(Arc::new(store), replay).unwrap();
    for n in names {
        ds.create(n).unwrap();
    }
    ds
}

/// A new regular file `name` in the root directory of `d`.
fn new_file(d: &Dataset, name: &str) -> u64 {
    d.create(
        ROOT_INO,
        name.as_bytes(),
        FileKind::Regular,
        0o600,
        0,
        0,
        0,
        None,
    )
    .unwrap()
    .0
}

fn page(seed: u32) -> Vec<u8> {
    (0..8192u32)
        .map(|i| ((i ^ seed.wrapping_mul(0x9E37_79B9)).wrapping_mul(2654435761) >> 13) as u8)
        .collect()
}

/// A store with datasets "d" (file "f", one distinct page per fsync, `pages` of them) and "e"
/// (one fsynced file), crashed after the last fsync; returns the disk and the pages.
fn fsynced_pages(dir: &std::path::Path, pages: u32) -> (Arc<SimIo>, Vec<Vec<u8>>) {
    let io = SimIo::new();
    let ds = new_datasets(dir, &io, &["d", "e"]);
    let e = ds.get("e").unwrap().unwrap();
    let eino = new_file(&e, "g");
    e.write(eino, 0, &page(999)).unwrap();
    e.fsync().unwrap();
    let d = ds.get("d").unwrap().unwrap();
    let ino = new_file(&d, "f");
    let mut out = Vec::new();
    for i in 0..pages {
        let p = page(i);
        d.write(ino, i as u64 * 8192, &p).unwrap();
        d.fsync().unwrap();
        out.push(p);
    }
    (io.crash(0), out)
}

/// Every record of pack 1 of the store in `dir` on the disk `io`: (offset, header).
fn records(dir: &std::path::Path, io: &SimIo) -> Vec<(u64, pack::RecordHeader)> {
    let bytes = io
        .file(&dir.join("packs").join("00000001.pack"))
        .unwrap()
        .bytes();
    let mut out = Vec::new();
    let mut at = pack::PACK_HEADER_LEN;
    while at + pack::RECORD_HEADER_LEN <= bytes.len() {
        let Ok(h) = pack::decode_record_header(
            &bytes[at..at + pack::RECORD_HEADER_LEN],
            pack::RecordFormat::V2,
        ) else {
            break;
        };
        out.push((at as u64, h));
        at += h.record_len() as usize;
    }
    out
}

/// Flips a byte in the payload of the record at `offset` of pack 1, on the disk itself.
fn rot(dir: &std::path::Path, io: &SimIo, offset: u64) {
    io.file(&dir.join("packs").join("00000001.pack"))
        .unwrap()
        .corrupt_durable(offset as usize + pack::RECORD_HEADER_LEN + 5);
}

/// Issue 11: a block record that an fsync acknowledged (later syncs prove it) no longer
/// verifies, and the dataset's fsynced state references that block. The dataset is refused
/// (mount and snapshot) with a message naming pack and offset, it holds its state of the fsync
/// before the block was written (never a mix), the refusal survives restarts, another dataset
/// is not affected, and accepting the loss lifts it.
#[test]
fn a_lost_fsynced_block_refuses_its_dataset_until_the_loss_is_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let (io, pages) = fsynced_pages(dir.path(), 12);
    let victim = BlockId::of(&pages[5]);
    let (at, _) = records(dir.path(), &io)
        .into_iter()
        .find(|(_, h)| h.kind == pack::RecordKind::Block && h.id == victim)
        .unwrap();
    rot(dir.path(), &io, at);

    let (store, replay) = Store::open_with(dir.path(), io.clone()).unwrap();
    assert_eq!(replay.damage.len(), 1, "{:?}", replay.damage);
    let ds = Datasets::open(Arc::new(store), replay).unwrap();
    let marks = ds.damage_of("d").unwrap();
    assert_eq!(marks.len(), 1, "{marks:?}");
    assert_eq!(marks[0].block, Some(victim));
    let err = format!("{:#}", ds.refuse_if_damaged("d").unwrap_err());
    assert!(
        err.contains("pack 00000001") && err.contains(&format!("offset {at}")),
        "the refusal must name pack and offset: {err}"
    );
    assert!(
        err.contains("accept-damage") && err.contains("delete"),
        "{err}"
    );
    assert!(ds.snapshot("d", Some("s")).is_err(), "a snapshot of it");
    assert!(ds.damage_of("e").unwrap().is_empty(), "e is not affected");
    ds.snapshot("e", Some("s")).unwrap();
    // Its state is that of the fsync before the lost block: pages 0..5.
    let d = ds.get("d").unwrap().unwrap();
    let (ino, meta) = d.lookup(ROOT_INO, b"f").unwrap();
    assert_eq!(meta.size, 5 * 8192);
    assert_eq!(d.read(ino, 0, 5 * 8192).unwrap(), pages[..5].concat());
    drop(d);
    drop(ds);

    // A restart: the damaged log is behind the replay start now; the mark remembers.
    let io = io.crash(0);
    let (store, replay) = Store::open_with(dir.path(), io.clone()).unwrap();
    assert!(replay.damage.is_empty(), "{:?}", replay.damage);
    let ds = Datasets::open(Arc::new(store), replay).unwrap();
    assert_eq!(ds.damage_of("d").unwrap(), marks);
    assert!(ds.refuse_if_damaged("d").is_err());
    assert_eq!(ds.accept_damage("d").unwrap(), marks);
    ds.refuse_if_damaged("d").unwrap();
    ds.snapshot("d", Some("after")).unwrap();
    drop(ds);
    let (store, replay) = Store::open_with(dir.path(), io.crash(0)).unwrap();
    let ds = Datasets::open(Arc::new(store), replay).unwrap();
    assert!(ds.damage_of("d").unwrap().is_empty(), "accepted for good");
}

/// A lost block that later fsynced writes replaced costs the dataset nothing: it is not
/// refused and holds every fsynced write.
#[test]
fn a_lost_block_that_later_writes_replaced_costs_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let io = SimIo::new();
    {
        let ds = new_datasets(dir.path(), &io, &["d"]);
        let d = ds.get("d").unwrap().unwrap();
        let ino = new_file(&d, "f");
        for i in 0..6u32 {
            d.write(ino, 0, &page(100 + i)).unwrap();
            d.fsync().unwrap();
        }
    }
    let io = io.crash(0);
    let victim = BlockId::of(&page(101));
    let (at, _) = records(dir.path(), &io)
        .into_iter()
        .find(|(_, h)| h.id == victim)
        .unwrap();
    rot(dir.path(), &io, at);
    let (store, replay) = Store::open_with(dir.path(), io).unwrap();
    assert_eq!(replay.damage.len(), 1);
    let ds = Datasets::open(Arc::new(store), replay).unwrap();
    assert!(ds.damage_of("d").unwrap().is_empty());
    let d = ds.get("d").unwrap().unwrap();
    let (ino, _) = d.lookup(ROOT_INO, b"f").unwrap();
    assert_eq!(d.read(ino, 0, 8192).unwrap(), page(105));
}

/// An unreadable journal record refuses the dataset it names, which keeps the state of its
/// fsync before that record; rewinding it to a snapshot (reset) or deleting it clears the
/// refusal.
#[test]
fn a_damaged_journal_record_refuses_its_dataset_and_a_reset_clears_it() {
    let dir = tempfile::tempdir().unwrap();
    let (io, pages) = fsynced_pages(dir.path(), 10);
    // d's journal records, in order (d is dataset 1): the 7th is the fsync of page 6.
    let journal: Vec<u64> = records(dir.path(), &io)
        .into_iter()
        .filter(|(_, h)| {
            h.kind == pack::RecordKind::Journal && pack::journal_record_dataset(&h.id) == Some(1)
        })
        .map(|(at, _)| at)
        .collect();
    assert_eq!(journal.len(), 10);
    rot(dir.path(), &io, journal[6]);
    let (store, replay) = Store::open_with(dir.path(), io.clone()).unwrap();
    let ds = Datasets::open(Arc::new(store), replay).unwrap();
    let marks = ds.damage_of("d").unwrap();
    assert_eq!(marks.len(), 1, "{marks:?}");
    assert_eq!(marks[0].kind, vdbfs_format::index::DamageKind::Journal);
    assert!(ds.damage_of("e").unwrap().is_empty());
    let d = ds.get("d").unwrap().unwrap();
    let (ino, meta) = d.lookup(ROOT_INO, b"f").unwrap();
    assert_eq!(
        meta.size,
        6 * 8192,
        "the state of the fsync before the damage"
    );
    assert_eq!(d.read(ino, 0, 6 * 8192).unwrap(), pages[..6].concat());
    drop(d);
    // A snapshot of another dataset, and d put onto it (what rewind and refresh do).
    ds.snapshot("e", Some("s")).unwrap();
    ds.reset_to_snapshot("d", "e", "s", false).unwrap();
    ds.refuse_if_damaged("d").unwrap();
    drop(ds);
    let (store, replay) = Store::open_with(dir.path(), io.crash(0)).unwrap();
    let ds = Datasets::open(Arc::new(store), replay).unwrap();
    assert!(ds.damage_of("d").unwrap().is_empty());
}

/// Damage among the tree objects the last checkpoint committed (here the inode table of "d",
/// with acknowledged writes after it) breaks that dataset's committed tree: the store still
/// opens (recovery neither replays nor checkpoints "d"), "d" is refused, "e" is not.
#[test]
fn damage_to_a_committed_tree_refuses_its_dataset_and_the_store_still_opens() {
    let dir = tempfile::tempdir().unwrap();
    let io = SimIo::new();
    let root = {
        let ds = new_datasets(dir.path(), &io, &["d", "e"]);
        let d = ds.get("d").unwrap().unwrap();
        let e = ds.get("e").unwrap().unwrap();
        let (f, g) = (new_file(&d, "f"), new_file(&e, "g"));
        d.write(f, 0, &page(1)).unwrap();
        e.write(g, 0, &page(2)).unwrap();
        ds.checkpoint().unwrap();
        for i in 0..4u32 {
            d.write(f, 8192 * (i as u64 + 1), &page(10 + i)).unwrap();
            d.fsync().unwrap();
            e.write(g, 8192 * (i as u64 + 1), &page(20 + i)).unwrap();
            e.fsync().unwrap();
        }
        ds.record("d").unwrap().unwrap().root.unwrap()
    };
    let io = io.crash(0);
    let (at, _) = records(dir.path(), &io)
        .into_iter()
        .find(|(_, h)| h.id == root)
        .unwrap();
    rot(dir.path(), &io, at);
    let (store, replay) = Store::open_with(dir.path(), io.clone()).unwrap();
    assert_eq!(replay.damage.len(), 1, "{:?}", replay.damage);
    let ds = Datasets::open(Arc::new(store), replay).unwrap();
    let marks = ds.damage_of("d").unwrap();
    assert_eq!(marks.len(), 1, "{marks:?}");
    assert_eq!(marks[0].block, Some(root));
    assert!(ds.refuse_if_damaged("d").is_err());
    ds.refuse_if_damaged("e").unwrap();
    let e = ds.get("e").unwrap().unwrap();
    let (g, meta) = e.lookup(ROOT_INO, b"g").unwrap();
    assert_eq!(meta.size, 5 * 8192, "e replayed whole");
    assert_eq!(e.read(g, 4 * 8192, 8192).unwrap(), page(23));
    drop(e);
    drop(ds);
    let (store, replay) = Store::open_with(dir.path(), io.crash(0)).unwrap();
    let ds = Datasets::open(Arc::new(store), replay).unwrap();
    assert_eq!(ds.damage_of("d").unwrap(), marks, "remembered");
}

/// st_blocks counts stored blocks: holes are free, zeros written become holes, truncation
/// drops blocks, and the count read from the block map after a restart is the same.
#[test]
fn stored_blocks_count_what_is_stored_not_the_size() {
    let dir = tempfile::tempdir().unwrap();
    let io = SimIo::new();
    {
        let ds = new_datasets(dir.path(), &io, &["d"]);
        let d = ds.get("d").unwrap().unwrap();
        let ino = new_file(&d, "sparse");
        assert_eq!(d.stored_blocks(ino).unwrap(), Some(0));
        d.write(ino, 0, &page(1)).unwrap();
        d.write(ino, 10 << 30, &page(2)).unwrap();
        d.write(ino, (10 << 30) + 8192, &page(3)).unwrap();
        assert_eq!(d.stored_blocks(ino).unwrap(), Some(3));
        d.write(ino, 10 << 30, &[0u8; 8192]).unwrap();
        assert_eq!(d.stored_blocks(ino).unwrap(), Some(2), "zeros are a hole");
        d.fsync().unwrap();
        ds.checkpoint().unwrap();
        d.write(ino, 8192, &page(4)).unwrap();
        assert_eq!(d.stored_blocks(ino).unwrap(), Some(3));
        d.setattr(
            ino,
            super::dataset::SetAttr {
                size: Some(8192 + 100),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(d.stored_blocks(ino).unwrap(), Some(2), "truncated");
        d.fsync().unwrap();
    }
    let (_ds, d) = open(dir.path(), io.crash(0));
    let (ino, meta) = d.lookup(ROOT_INO, b"sparse").unwrap();
    assert_eq!(meta.size, 8192 + 100);
    assert_eq!(d.stored_blocks(ino).unwrap(), Some(2));
}

/// renameat2(RENAME_WHITEOUT) moves the file and leaves a whiteout (a character device 0/0,
/// mode 0) in its place, durably; with RENAME_EXCHANGE it is EINVAL and changes nothing.
#[test]
fn rename_whiteout_leaves_a_whiteout() {
    let dir = tempfile::tempdir().unwrap();
    let io = SimIo::new();
    {
        let ds = new_datasets(dir.path(), &io, &["d"]);
        let d = ds.get("d").unwrap().unwrap();
        d.create(ROOT_INO, b"a", FileKind::Regular, 0o644, 7, 8, 0, None)
            .unwrap();
        d.create(ROOT_INO, b"c", FileKind::Regular, 0o644, 7, 8, 0, None)
            .unwrap();
        let bad = d.rename(
            ROOT_INO,
            b"a",
            ROOT_INO,
            b"c",
            libc::RENAME_WHITEOUT | libc::RENAME_EXCHANGE,
            (7, 8),
        );
        assert!(
            matches!(bad, Err(crate::store::Error::Invalid(_))),
            "{bad:?}"
        );
        d.rename(
            ROOT_INO,
            b"a",
            ROOT_INO,
            b"b",
            libc::RENAME_WHITEOUT,
            (7, 8),
        )
        .unwrap();
        d.fsync().unwrap();
    }
    let (_ds, d) = open(dir.path(), io.crash(0));
    let (_, b) = d.lookup(ROOT_INO, b"b").unwrap();
    assert_eq!(b.kind, FileKind::Regular);
    let (_, w) = d.lookup(ROOT_INO, b"a").unwrap();
    assert_eq!(
        (w.kind, w.rdev, w.perm, w.uid, w.gid),
        (FileKind::CharDevice, 0, 0, 7, 8),
        "a whiteout"
    );
}

// The space accounting is made again only when a root changed: the same immutable trees give
// the same figures, so idle datasets cost no census. A poller may take one up to a given age.
#[test]
fn space_accounting_is_reused_until_a_root_changes() {
    let dir = tempfile::tempdir().unwrap();
    let io = Arc::new(SimIo::new());
    let ds = new_datasets(dir.path(), &io, &["a", "b"]);
    let a = ds.get("a").unwrap().unwrap();
    let f = new_file(&a, "f");
    a.write(f, 0, &page(1)).unwrap();
    a.fsync().unwrap();
    let first = ds.accounting().unwrap();
    assert_eq!(first.per_dataset["a"].0, 8192);
    assert!(first.per_dataset["a"].1 > 0, "a's page is only a's");
    let again = ds.accounting().unwrap();
    assert!(
        Arc::ptr_eq(&first, &again),
        "nothing changed: the same accounting"
    );

    // A change makes a new one (after the checkpoint the accounting takes), with the new page.
    a.write(f, 8192, &page(2)).unwrap();
    let polled = ds
        .accounting_within(std::time::Duration::from_secs(3600))
        .unwrap();
    assert!(
        Arc::ptr_eq(&first, &polled),
        "a poller takes the recent one"
    );
    let fresh = ds.accounting().unwrap();
    assert!(!Arc::ptr_eq(&first, &fresh));
    assert_eq!(fresh.per_dataset["a"].0, 2 * 8192);
    assert!(fresh.per_dataset["a"].1 > first.per_dataset["a"].1);
    let u = ds.usage().unwrap();
    let ua = u.roots.iter().find(|r| r.name == "a").unwrap();
    assert_eq!(
        (ua.logical_bytes, ua.unique_bytes),
        (2 * 8192, fresh.per_dataset["a"].1)
    );

    // A snapshot is a new root: the page it shares with "a" moves from unique to shared.
    ds.snapshot("a", Some("s1")).unwrap();
    let snap = ds.accounting().unwrap();
    assert!(!Arc::ptr_eq(&fresh, &snap));
    let ua = snap.store.roots.iter().find(|r| r.name == "a").unwrap();
    let us = snap.store.roots.iter().find(|r| r.name == "a@s1").unwrap();
    assert_eq!(ua.unique_bytes, 0, "everything of a is in a@s1 too");
    assert_eq!(ua.shared_bytes, us.shared_bytes);
    assert_eq!(
        snap.per_dataset["a"].1, fresh.per_dataset["a"].1,
        "a with its snapshot still holds the same bytes alone"
    );
    assert_eq!(snap.per_dataset["b"], (0, 0));
}
