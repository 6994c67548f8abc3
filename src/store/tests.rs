use super::sim::SimIo;
use super::*;

fn new_store(io: Arc<dyn PackIo>) -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    Store::create(dir.path()).unwrap();
    let (s, _) = Store::open_with(dir.path(), io).unwrap();
    (dir, s)
}

fn block(seed: u8) -> Vec<u8> {
    (0..8192u32)
        .map(|i| (i as u8).wrapping_mul(seed) ^ seed)
        .collect()
}

#[test]
fn put_get_round_trip_and_dedup() {
    let io = SimIo::new();
    let (_d, s) = new_store(io.clone());
    let a = s.put(&block(3)).unwrap();
    let end = s.end();
    let a2 = s.put(&block(3)).unwrap();
    assert_eq!(a, a2);
    assert_eq!(s.end(), end, "a block that exists is not written again");
    assert_eq!(s.get(&a).unwrap(), block(3));
    let b = s.put(&block(5)).unwrap();
    assert_ne!(a, b);
    assert_eq!(s.get(&b).unwrap(), block(5));
}

#[test]
fn flipped_byte_in_a_pack_is_an_error_never_wrong_bytes() {
    let io = SimIo::new();
    let (d, s) = new_store(io.clone());
    let id = s.put(&block(7)).unwrap();
    // Closed, so reads come from the file, not from the log's memory.
    s.roll_if_larger(0).unwrap();
    let loc = s.lookup_many(&[id]).unwrap()[0].unwrap();
    let f = io.file(&pack_path(d.path(), loc.pack)).unwrap();
    f.corrupt((loc.offset + loc.len as u64 - 10) as usize);
    match s.get(&id) {
        Err(Error::Corrupt { id: bad, .. }) => assert_eq!(bad, id),
        other => panic!("expected a corruption error, got {other:?}"),
    }
}

#[test]
fn full_disk_fails_the_writer_and_loses_nothing_stored() {
    let io = SimIo::new();
    let (d, s) = new_store(io.clone());
    let kept = s.put(&block(1)).unwrap();
    s.commit_checkpoint(&[]).unwrap();
    io.faults
        .space_left
        .store(100, std::sync::atomic::Ordering::SeqCst);
    let noise = |n: u32| -> Vec<u8> {
        (0..8192u32)
            .map(|i| ((i ^ n).wrapping_mul(2654435761) >> 13) as u8)
            .collect()
    };
    let mut n = 0;
    let full = loop {
        match s.put(&noise(n)) {
            Ok(_) => n += 1,
            Err(e) => break e,
        }
        assert!(n < 10_000, "the disk never filled up");
    };
    assert!(matches!(full, Error::NoSpace), "got {full:?}");
    assert_eq!(s.get(&kept).unwrap(), block(1));
    let random = noise(n);
    // Space comes back: writes work again and the log stays parseable after a crash.
    io.faults
        .space_left
        .store(-1, std::sync::atomic::Ordering::SeqCst);
    let later = s.put(&random).unwrap();
    s.commit_checkpoint(&[]).unwrap();
    let crashed = io.crash(0);
    drop(s);
    let (s2, _) = Store::open_with(d.path(), crashed).unwrap();
    assert_eq!(s2.get(&kept).unwrap(), block(1));
    assert_eq!(s2.get(&later).unwrap(), random);
}

#[test]
fn failed_fdatasync_poisons_the_store() {
    let io = SimIo::new();
    let (_d, s) = new_store(io.clone());
    s.put(&block(9)).unwrap();
    io.faults
        .syncs_left
        .store(0, std::sync::atomic::Ordering::SeqCst);
    assert!(s.sync_all().is_err());
    io.faults
        .syncs_left
        .store(-1, std::sync::atomic::Ordering::SeqCst);
    // The disk works again, but what the failed sync covered may be lost: never say "durable".
    assert!(matches!(s.sync_all(), Err(Error::Poisoned)));
    assert!(matches!(s.put(&block(10)), Err(Error::Poisoned)));
}

/// The writers' filter of known ids never makes a block that exists look new: after a reopen
/// (ids in the index and ids recovered from the log) and once the filter is filled, putting
/// known content writes nothing, and new content is still written.
#[test]
fn dedup_holds_with_the_filter_of_known_blocks() {
    let io = SimIo::new();
    let (d, s) = new_store(io.clone());
    let a = s.put(&block(21)).unwrap();
    s.commit_checkpoint(&[]).unwrap();
    let b = s.put(&block(22)).unwrap(); // recovered from the log, not indexed
    s.sync_all().unwrap();
    drop(s);
    let (s2, _) = Store::open_with(d.path(), io.crash(100)).unwrap();
    // Before the fill (filter not ready) and after it: the same answers.
    for fill in [false, true] {
        if fill {
            s2.fill_seen().unwrap();
        }
        let end = s2.end();
        assert_eq!(s2.put_many(&[&block(21), &block(22)]).unwrap(), vec![a, b]);
        assert_eq!(
            s2.end(),
            end,
            "known blocks are not written again (fill {fill})"
        );
    }
    let end = s2.end();
    let c = s2.put(&block(23)).unwrap();
    assert!(s2.end() > end, "a new block is written");
    let end = s2.end();
    assert_eq!(s2.put(&block(23)).unwrap(), c);
    assert_eq!(s2.end(), end, "a block written after the fill is known");
    assert_eq!(s2.get(&c).unwrap(), block(23));
}

#[test]
fn recovery_finds_blocks_appended_after_the_last_checkpoint() {
    let io = SimIo::new();
    let (d, s) = new_store(io.clone());
    let a = s.put(&block(11)).unwrap();
    s.commit_checkpoint(&[]).unwrap();
    let b = s.put(&block(12)).unwrap();
    s.sync_all().unwrap();
    let c = s.put(&block(13)).unwrap(); // never synced
    let _ = c;
    drop(s);
    let (s2, _) = Store::open_with(d.path(), io.crash(100)).unwrap();
    assert_eq!(s2.get(&a).unwrap(), block(11));
    assert_eq!(s2.get(&b).unwrap(), block(12));
    // New appends go to a new pack, never after a torn tail.
    let e = s2.put(&block(14)).unwrap();
    assert_eq!(s2.lookup_many(&[e]).unwrap()[0].unwrap().pack, 2);
}

/// Blocks still in the log's memory, in flight or written are all readable, before and after
/// a sync and after the pack is closed.
#[test]
fn reads_see_every_append_wherever_its_bytes_are() {
    let io = SimIo::new();
    let (_d, s) = new_store(io.clone());
    let ids: Vec<BlockId> = (0..40u8).map(|i| s.put(&block(i + 1)).unwrap()).collect();
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(s.get(id).unwrap(), block(i as u8 + 1), "unsynced block {i}");
    }
    s.sync_all().unwrap();
    let more: Vec<BlockId> = (40..80u8).map(|i| s.put(&block(i + 1)).unwrap()).collect();
    for (i, id) in ids.iter().chain(&more).enumerate() {
        assert_eq!(
            s.get(id).unwrap(),
            block(i as u8 + 1),
            "block {i} after a sync"
        );
    }
    s.roll_if_larger(0).unwrap();
    for (i, id) in ids.iter().chain(&more).enumerate() {
        assert_eq!(
            s.get(id).unwrap(),
            block(i as u8 + 1),
            "block {i} in a closed pack"
        );
    }
}

/// More than the log buffers at once goes out in large writes while appends continue; all of
/// it survives a sync and a crash.
#[test]
fn bulk_appends_are_written_out_and_survive_a_crash() {
    let io = SimIo::new();
    let (d, s) = new_store(io.clone());
    let noise = |n: u32| -> Vec<u8> {
        (0..8192u32)
            .map(|i| ((i ^ (n << 13)).wrapping_mul(2654435761) >> 11) as u8)
            .collect()
    };
    let ids: Vec<BlockId> = (0..2000u32).map(|n| s.put(&noise(n)).unwrap()).collect();
    s.sync_all().unwrap();
    drop(s);
    let (s2, _) = Store::open_with(d.path(), io.crash(0)).unwrap();
    for (n, id) in ids.iter().enumerate() {
        assert_eq!(s2.get(id).unwrap(), noise(n as u32), "block {n}");
    }
}

/// Issue 11: bytes torn by a crash after the last acknowledged sync are dropped silently, as
/// they were never acknowledged; the synced blocks before them are there.
#[test]
fn a_torn_tail_after_the_last_sync_recovers_silently() {
    let io = SimIo::new();
    let (d, s) = new_store(io.clone());
    let a = s.put(&block(21)).unwrap();
    s.sync_all().unwrap();
    let _b = s.put(&block(22)).unwrap();
    s.sync_to(s.end()).unwrap();
    let c = s.put(&block(23)).unwrap(); // never synced
    s.roll_if_larger(u64::MAX).unwrap();
    let _ = c;
    // The unsynced record reaches the disk in part only (sim: a garbage tail).
    drop(s);
    let (s2, replay) = Store::open_with(d.path(), io.crash(300)).unwrap();
    assert!(
        replay.damage.is_empty(),
        "a torn tail is not damage: {:?}",
        replay.damage
    );
    assert_eq!(s2.get(&a).unwrap(), block(21));
}

/// Issue 11: a flipped byte in a record that an fsync acknowledged, with acknowledged records
/// after it, is reported as damage (pack, offset, what it held), never dropped as a torn tail;
/// the valid records after it are kept, so only the damaged block is lost.
#[test]
fn damage_before_an_acknowledged_sync_is_reported_and_later_records_kept() {
    let io = SimIo::new();
    let (d, s) = new_store(io.clone());
    let mut ids = Vec::new();
    for i in 0..30u8 {
        ids.push(s.put(&block(100 + i)).unwrap());
        s.sync_all().unwrap(); // one acknowledged sync per block, as postgres commits
    }
    let victim = 10;
    let loc = s.lookup_many(&[ids[victim]]).unwrap()[0].unwrap();
    drop(s);
    let crashed = io.crash(0);
    crashed
        .file(&pack_path(d.path(), loc.pack))
        .unwrap()
        .corrupt_durable((loc.offset + loc.len as u64 - 100) as usize);
    let (s2, replay) = Store::open_with(d.path(), crashed).unwrap();
    assert_eq!(replay.damage.len(), 1, "{:?}", replay.damage);
    let dmg = &replay.damage[0];
    assert_eq!((dmg.pack, dmg.offset), (loc.pack, loc.offset));
    assert_eq!(dmg.what, Damaged::Block(ids[victim]));
    assert!(matches!(s2.get(&ids[victim]), Err(Error::MissingBlock(_))));
    for (i, id) in ids.iter().enumerate().filter(|(i, _)| *i != victim) {
        assert_eq!(s2.get(id).unwrap(), block(100 + i as u8), "block {i}");
    }
}

/// Packs written by the version-1 format (52-byte record headers) stay readable; new records go
/// to a new pack of the current version.
#[test]
fn version_1_packs_stay_readable() {
    let dir = tempfile::tempdir().unwrap();
    Store::create(dir.path()).unwrap();
    let content = block(77);
    let id = BlockId::of(&content);
    let (c, payload) = codec::compress(&content);
    let mut bytes = pack::encode_pack_header_v1(1);
    bytes.extend(pack::encode_record_v1(
        RecordKind::Block,
        c,
        content.len() as u32,
        &id,
        &payload,
    ));
    std::fs::write(pack_path(dir.path(), 1), &bytes).unwrap();
    let (s, _) = Store::open(dir.path()).unwrap();
    assert_eq!(s.get(&id).unwrap(), content);
    let other = s.put(&block(78)).unwrap();
    assert_eq!(s.lookup_many(&[other]).unwrap()[0].unwrap().pack, 2);
    s.commit_checkpoint(&[]).unwrap();
    drop(s);
    let (s, _) = Store::open(dir.path()).unwrap();
    assert_eq!(s.get(&id).unwrap(), content);
    assert_eq!(s.get(&other).unwrap(), block(78));
}

#[test]
fn dataset_ids_grow_and_a_lost_or_malformed_counter_is_corruption_never_id_1_again() {
    let (_d, s) = new_store(SimIo::new());
    let take = |s: &Store| s.catalog_write(|c| c.allocate_dataset_id());
    assert_eq!(take(&s).unwrap(), 1);
    assert_eq!(take(&s).unwrap(), 2);
    s.meta_put(vdbfs_format::index::meta::NEXT_DATASET_ID, &[1, 2, 3])
        .unwrap();
    let e = take(&s).unwrap_err();
    assert!(matches!(e, Error::CorruptMeta(_)), "{e}");
    {
        let txn = s.db().begin_write().unwrap();
        txn.open_table(index::META)
            .unwrap()
            .remove(vdbfs_format::index::meta::NEXT_DATASET_ID)
            .unwrap();
        txn.commit().unwrap();
    }
    let e = take(&s).unwrap_err();
    assert!(
        matches!(&e, Error::CorruptMeta(m) if m.contains("next_dataset_id")),
        "{e}"
    );
}
