//! Silent corruption of stored data is never returned to a reader: a block whose bytes changed in
//! its pack file reads as EIO, the daemon logs "corrupt block", and every other block still reads.

use std::fs;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};

use crate::util::Daemon;

const BLOCK: usize = 8192;
const BLOCKS: usize = 64;
const BAD_BLOCK: usize = 40;
/// 32 bytes that random data does not contain, at the start of the block to corrupt.
const MARKER: &[u8; 32] = b"<<vdbfs corruption test marker>>";

use vdbfs_format::pack::{decode_record_header, RecordFormat, RecordKind, RECORD_HEADER_LEN};

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in fs::read_dir(dir).unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display())) {
        let p = e.unwrap().path();
        if p.is_dir() {
            files_under(&p, out);
        } else {
            out.push(p);
        }
    }
}

fn find_all(hay: &[u8], needle: &[u8]) -> Vec<usize> {
    hay.windows(needle.len())
        .enumerate()
        .filter(|(_, w)| *w == needle)
        .map(|(i, _)| i)
        .collect()
}

// A byte flipped inside a stored block: reading that block fails with EIO (never wrong bytes),
// the other blocks of the file read correctly, and the daemon log says "corrupt block".
#[test]
fn flipped_byte_in_pack_reads_as_eio() {
    let mut d = Daemon::start();
    let m = d.create_and_mount("c");
    let mp = m.path.clone();

    // Incompressible content so the block is stored as is, with the marker findable in the pack.
    let mut rng = StdRng::seed_from_u64(0x5eed);
    let mut content = vec![0u8; BLOCK * BLOCKS];
    rng.fill_bytes(&mut content);
    let bad = BAD_BLOCK * BLOCK;
    content[bad..bad + MARKER.len()].copy_from_slice(MARKER);
    let mut f = fs::File::create(m.join("data.bin")).unwrap();
    f.write_all(&content).unwrap();
    f.sync_all().unwrap();
    drop(f);
    m.umount();
    d.terminate();

    // Flip one byte in the payload of the block record that holds the marker.
    let mut packs = Vec::new();
    files_under(&d.store().join("packs"), &mut packs);
    let mut flipped = 0;
    let mut other_hits = Vec::new();
    for p in &packs {
        let mut bytes = fs::read(p).unwrap();
        let hits = find_all(&bytes, MARKER);
        let mut changed = false;
        for pos in hits {
            // The block is stored as is (incompressible), so its payload starts with the marker
            // right after the record header.
            let is_block_record = pos >= RECORD_HEADER_LEN
                && decode_record_header(&bytes[pos - RECORD_HEADER_LEN..pos], RecordFormat::V2)
                    .is_ok_and(|h| h.kind == RecordKind::Block && h.raw_len as usize == BLOCK);
            if is_block_record {
                bytes[pos + 1000] ^= 0x40;
                flipped += 1;
                changed = true;
            } else {
                other_hits.push((p.clone(), pos));
            }
        }
        if changed {
            fs::write(p, &bytes).unwrap();
        }
    }
    assert!(
        flipped >= 1,
        "did not find the marker at the start of a block record's payload in {} pack files \
         (other occurrences: {other_hits:?}); did the pack format change? see fs-format/FORMAT.md",
        packs.len()
    );
    eprintln!("flipped one byte in {flipped} block record(s); other marker hits: {other_hits:?}");

    d.start_again();
    let m = d.mount("c", &mp);
    let f = fs::File::open(m.join("data.bin")).unwrap();
    assert_eq!(f.metadata().unwrap().len(), content.len() as u64);
    // One block per read request: no readahead pulls the corrupt block into a good block's read.
    // SAFETY: the fd belongs to f, which is open for the whole call.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) };
    assert_eq!(rc, 0, "posix_fadvise");

    let mut buf = vec![0u8; BLOCK];
    let err = f
        .read_exact_at(&mut buf, bad as u64)
        .expect_err("reading the corrupted block must fail, it returned data");
    assert_eq!(
        err.raw_os_error(),
        Some(libc::EIO),
        "reading the corrupted block must give EIO, got {err:?}"
    );
    // Asking again gives EIO again (not cached garbage, not a different error).
    let err = f.read_exact_at(&mut buf, bad as u64 + 4096).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err:?}");

    for b in (0..BLOCKS).filter(|b| *b != BAD_BLOCK) {
        f.read_exact_at(&mut buf, (b * BLOCK) as u64)
            .unwrap_or_else(|e| panic!("block {b} (not corrupted) failed to read: {e}"));
        assert!(
            buf == content[b * BLOCK..(b + 1) * BLOCK],
            "block {b} (not corrupted) read back different bytes"
        );
    }
    // Reading the whole file also fails rather than returning wrong bytes.
    let whole = fs::read(m.join("data.bin"));
    assert!(
        whole.as_ref().err().and_then(|e| e.raw_os_error()) == Some(libc::EIO),
        "reading the whole file must fail with EIO, got {:?}",
        whole.map(|v| v.len())
    );

    let log = d.log();
    assert!(
        log.contains("corrupt block"),
        "daemon log does not mention the corrupt block:\n{}",
        d.log_tail(40)
    );
    // The daemon is still serving.
    d.ok(&["status"]);
    drop(f);
}

// ---------------------------------------------------------------------------------------------
// Damage to the log after the last checkpoint (issue 11, item 2)
// ---------------------------------------------------------------------------------------------

use std::collections::{HashMap, HashSet};
use std::process::Stdio;
use std::time::Duration;

use vdbfs_format::index::LogPos;
use vdbfs_format::journal::{JournalOp, JournalRecord};
use vdbfs_format::pack::{decode_record, RecordHeader};
use vdbfs_format::BlockId;

use crate::crash::{acked_ids, assert_balances_agree, missing_ids, postgres_for_acks, Inserter};
use crate::util::{self, describe, require_root_fuse_postgres, Postgres};

/// The newest pack of a store: its number and bytes.
fn newest_pack(store: &Path) -> (u32, PathBuf, Vec<u8>) {
    let mut packs = Vec::new();
    files_under(&store.join("packs"), &mut packs);
    packs.sort();
    let p = packs.pop().expect("no pack");
    let no = p.file_stem().unwrap().to_string_lossy().parse().unwrap();
    let bytes = fs::read(&p).unwrap();
    (no, p, bytes)
}

/// Every verified record of a v2 pack from its header on, until the first bytes that are not one
/// (the zero-filled space ahead of the log end): (offset, header, payload).
fn pack_records(bytes: &[u8]) -> Vec<(usize, RecordHeader, Vec<u8>)> {
    let mut out = Vec::new();
    let mut at = 16;
    while at + RECORD_HEADER_LEN <= bytes.len() {
        let Ok(h) = decode_record_header(&bytes[at..at + RECORD_HEADER_LEN], RecordFormat::V2)
        else {
            break;
        };
        let end = at + h.record_len() as usize;
        if end > bytes.len() {
            break;
        }
        let Ok((h, payload)) = decode_record(&bytes[at..end], RecordFormat::V2) else {
            break;
        };
        out.push((at, h, payload.to_vec()));
        at = end;
    }
    out
}

/// The committed log positions of a store whose daemon is not running.
fn indexed_upto(store: &Path) -> LogPos {
    let (_index, pos) = vdbfs::store::index::Index::open(store).unwrap();
    pos.indexed_upto
}

/// postgres under load (autocommit inserts whose acknowledgements are kept outside the mount,
/// and pgbench) on dataset `pg`, then `kill -9` of the daemon and of postgres. Returns the
/// daemon (stopped), postgres (stopped), the mount point and the file of acknowledged ids.
fn load_then_kill9(secs: u64) -> (Daemon, Postgres, PathBuf, tempfile::TempDir) {
    require_root_fuse_postgres();
    let outside = util::tempdir("vdbfs-damage-acks-");
    let ack_file = outside.path().join("acked.txt");
    let mut d = Daemon::start();
    // Checkpoints are logged at debug: the kill is timed against them (below).
    d.restart_with(
        &[],
        &[("VDBFS_LOG", "info,fuser=error,vdbfs::daemon=debug")],
    );
    let (m, mut pg) = postgres_for_acks(&d, "pg");
    let mp = m.path.clone();
    let inserter = Inserter::start(&pg, 1, &ack_file);
    let mut bench = pg
        .pgbench_command(&["-c", "2", "-j", "1", "-T", "120", "-n"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn pgbench");
    std::thread::sleep(Duration::from_secs(secs));
    // The kill lands 1.5 s after a background checkpoint (they come every 5 s), so the log
    // always holds fsynced records written after the last checkpoint: a kill just after one
    // left nothing to damage.
    let done = "background checkpoint done";
    let seen = d.log().matches(done).count();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while d.log().matches(done).count() == seen {
        assert!(
            std::time::Instant::now() < deadline,
            "no background checkpoint within 30 s under load\n{}",
            d.log_tail(40)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(1500));
    d.kill9();
    pg.kill9();
    if util::wait_child(&mut bench, Duration::from_secs(60)).is_none() {
        let _ = bench.kill();
        let _ = bench.wait();
        panic!("pgbench did not exit within 60 s of the postmaster's death");
    }
    let last = inserter.join();
    eprintln!("{last} inserts acknowledged before the kill");
    std::mem::forget(m); // the stale mount is the daemon's to clear
    (d, pg, mp, outside)
}

/// Which file blocks a dataset's journal records (from `from` on, in this pack) leave pointing
/// at which block: the blocks its fsynced state references at the end of a replay.
fn final_references(records: &[(usize, RecordHeader, Vec<u8>)], from: usize) -> HashSet<BlockId> {
    let mut fin: HashMap<(u64, u64), BlockId> = HashMap::new();
    for (at, h, payload) in records {
        if *at < from || h.kind != RecordKind::Journal {
            continue;
        }
        let j = JournalRecord::decode(payload).unwrap();
        for op in j.ops {
            match op {
                JournalOp::FileBlocks {
                    ino,
                    base_limit,
                    entries,
                } => {
                    if base_limit != u64::MAX {
                        fin.retain(|(i, idx), _| !(*i == ino && *idx >= base_limit));
                    }
                    for (idx, id) in entries {
                        match id {
                            Some(id) => fin.insert((ino, idx), id),
                            None => fin.remove(&(ino, idx)),
                        };
                    }
                }
                JournalOp::Remove { ino } => fin.retain(|(i, _), _| *i != ino),
                _ => {}
            }
        }
    }
    fin.into_values().collect()
}

// The scenario of issue 11: postgres under load on a dataset, kill -9 of the daemon, then one
// byte flipped in a block record about 512 KiB before the end of the pack's records, written
// after the last checkpoint and fsynced (later records prove the sync acknowledged). It used to
// start with a warning about a torn tail and silently lose acknowledged commits. Now the daemon
// starts, but dataset `pg` is refused: its mount is not re-established, `vdbfs mount` and
// `snapshot create` fail naming the pack and offset and what to do, `dataset list` and `vdbfs
// status` show the fault, and the refusal survives a restart. Accepting the loss gives a
// dataset postgres recovers on (its state of the fsync before the lost block).
#[test]
fn damage_before_an_acknowledged_sync_refuses_the_dataset_never_a_silent_start() {
    let (mut d, mut pg, mp, _acks) = load_then_kill9(8);
    let upto = indexed_upto(d.store());
    let (no, path, mut bytes) = newest_pack(d.store());
    let recs = pack_records(&bytes);
    let (last_at, last, _) = recs.last().unwrap();
    let end = last_at + last.record_len() as usize;
    let from = if upto.pack == no {
        upto.offset as usize
    } else {
        16
    };
    // Acknowledged: a later record's durable mark is past it.
    let acked_to = recs
        .iter()
        .filter(|(_, h, _)| h.durable.pack == no)
        .map(|(_, h, _)| h.durable.offset as usize)
        .max()
        .unwrap_or(0);
    let referenced = final_references(&recs, from);
    let target = end.saturating_sub(512 << 10);
    let victim = recs
        .iter()
        .filter(|(at, h, _)| {
            h.kind == RecordKind::Block
                && *at >= from
                && at + h.record_len() as usize <= acked_to
                && referenced.contains(&h.id)
        })
        .min_by_key(|(at, _, _)| at.abs_diff(target))
        .map(|(at, h, _)| (*at, *h))
        .unwrap_or_else(|| {
            panic!(
                "no fsynced block record after the checkpoint (pack {no} from {from}, records \
                 end at {end}, acknowledged to {acked_to})"
            )
        });
    let (at, hdr) = victim;
    eprintln!(
        "flipping a byte of block record {} at pack {no} offset {at} ({} bytes before the end of \
         the records at {end}; checkpointed up to {upto:?})",
        hdr.id,
        end - at
    );
    bytes[at + RECORD_HEADER_LEN + 200] ^= 0x01;
    fs::write(&path, &bytes).unwrap();

    d.start_again();
    d.wait_log_since_start(crate::util::SUPERVISED, Duration::from_secs(60));
    let log = d.log();
    assert!(
        log.contains("damaged log record before an acknowledged sync"),
        "{}",
        d.log_tail(40)
    );
    assert!(
        !util::is_mounted(&mp) || util::is_stale(&mp),
        "the damaged dataset was mounted again"
    );
    let pack_name = format!("pack {no:08}");
    let offset = format!("offset {at}");
    let refused = |out: &std::process::Output, what: &str| {
        assert_eq!(out.status.code(), Some(1), "{what}\n{}", describe(out));
        let err = String::from_utf8_lossy(&out.stderr);
        eprintln!("{what} refused as expected: {err}");
        for want in [
            "dataset pg is damaged",
            pack_name.as_str(),
            offset.as_str(),
            "accept-damage",
            "vdbfs dataset delete pg",
        ] {
            assert!(
                err.contains(want),
                "{what}: no {want:?} in\n{}",
                describe(out)
            );
        }
    };
    refused(&d.vdbfs(&["mount", "pg", mp.to_str().unwrap()]), "mount");
    refused(&d.vdbfs(&["snapshot", "create", "pg"]), "snapshot create");
    let list: serde_json::Value =
        serde_json::from_str(&d.ok(&["dataset", "list", "--json"])).unwrap();
    assert!(
        list[0]["fault"]
            .as_str()
            .is_some_and(|f| f.contains(&offset)),
        "{list}"
    );
    let st = d.status_json();
    assert!(
        st["faults"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f.as_str().unwrap().contains("dataset pg is damaged")),
        "{st}"
    );
    // The refusal is remembered: the damaged log is behind the replay start now.
    d.restart();
    refused(
        &d.vdbfs(&["mount", "pg", mp.to_str().unwrap()]),
        "mount after a restart",
    );

    // The way out the user chose: accept the loss.
    let out = d.ok(&["dataset", "accept-damage", "pg"]);
    assert!(out.contains("accepted the loss"), "{out}");
    let _m = d.mount("pg", &mp);
    pg.start();
    pg.amcheck();
    assert_balances_agree(&pg, "after accepting the damage");
    pg.stop();
}

// A true torn tail: bytes after the last acknowledged sync that never formed a record (here a
// record header followed by noise where the zero-filled space was) are dropped silently: the
// daemon starts, mounts the dataset again by itself, reports no damage, and postgres recovers
// with every acknowledged commit.
#[test]
fn a_torn_tail_after_the_last_acknowledged_sync_recovers_silently() {
    let (mut d, mut pg, mp, acks) = load_then_kill9(4);
    let (_, path, mut bytes) = newest_pack(d.store());
    let recs = pack_records(&bytes);
    let (last_at, last, _) = recs.last().unwrap();
    let end = last_at + last.record_len() as usize;
    let (first_at, _, _) = recs.first().unwrap();
    // A torn write: the start of a record (a copy of a valid header, its length now past the
    // bytes that made it), then noise.
    let mut torn = bytes[*first_at..first_at + RECORD_HEADER_LEN].to_vec();
    let mut rng = StdRng::seed_from_u64(11);
    let mut noise = vec![0u8; 3000];
    rng.fill_bytes(&mut noise);
    torn.extend_from_slice(&noise);
    if bytes.len() < end + torn.len() {
        bytes.resize(end + torn.len(), 0);
    }
    bytes[end..end + torn.len()].copy_from_slice(&torn);
    fs::write(&path, &bytes).unwrap();

    d.start_again();
    d.wait_mounted(&mp, Duration::from_secs(30));
    d.wait_log_since_start(crate::util::SUPERVISED, Duration::from_secs(60));
    let log = d.log();
    let since = &log[log.rfind("=== test harness").unwrap_or(0)..];
    assert!(
        !since.contains("damaged") && !since.contains("ERROR"),
        "a torn tail is no damage:\n{since}"
    );
    assert!(
        d.status_json()["faults"].as_array().unwrap().is_empty(),
        "{}",
        d.status_json()
    );
    pg.start();
    pg.amcheck();
    let acked = acked_ids(&acks.path().join("acked.txt"));
    let missing = missing_ids(&acked, &pg.psql("SELECT id FROM acked"));
    assert!(missing.is_empty(), "acknowledged ids lost: {missing:?}");
    pg.stop();
}
