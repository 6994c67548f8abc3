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
