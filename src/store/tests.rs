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
