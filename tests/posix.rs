//! The last POSIX gaps of issue 11: `renameat2(RENAME_WHITEOUT)` and `st_blocks`, through a
//! real mount.

use std::ffi::CString;
use std::fs;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use crate::util::Daemon;

fn renameat2(from: &Path, to: &Path, flags: u32) -> std::io::Result<()> {
    let a = CString::new(from.as_os_str().as_bytes()).unwrap();
    let b = CString::new(to.as_os_str().as_bytes()).unwrap();
    // SAFETY: both paths are NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            flags,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn write_synced(path: &Path, at: u64, data: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .unwrap();
    f.write_all_at(data, at).unwrap();
    f.sync_all().unwrap();
}

// The bug: renameat2(RENAME_WHITEOUT) returned success and created no whiteout (fsstress then
// lost track of a directory). Now the old name becomes a whiteout, a character device 0/0 as
// overlayfs makes them, and it stays after a remount; RENAME_WHITEOUT with RENAME_EXCHANGE is
// EINVAL and changes nothing.
#[test]
fn rename_whiteout_leaves_a_whiteout_or_fails() {
    let d = Daemon::start();
    let m = d.create_and_mount("wh");
    fs::write(m.join("a"), b"moved").unwrap();
    fs::write(m.join("c"), b"stays").unwrap();
    let err = renameat2(
        &m.join("a"),
        &m.join("c"),
        libc::RENAME_WHITEOUT | libc::RENAME_EXCHANGE,
    )
    .expect_err("RENAME_WHITEOUT | RENAME_EXCHANGE must fail");
    assert_eq!(err.raw_os_error(), Some(libc::EINVAL), "{err:?}");
    assert_eq!(fs::read(m.join("a")).unwrap(), b"moved");
    assert_eq!(fs::read(m.join("c")).unwrap(), b"stays");

    renameat2(&m.join("a"), &m.join("b"), libc::RENAME_WHITEOUT).unwrap();
    let check = |dir: &Path, when: &str| {
        assert_eq!(fs::read(dir.join("b")).unwrap(), b"moved", "{when}");
        let w = fs::symlink_metadata(dir.join("a")).unwrap();
        assert!(
            w.file_type().is_char_device() && w.rdev() == 0,
            "{when}: the old name must be a whiteout (char device 0/0), got {w:?}"
        );
    };
    let mp = m.path.clone();
    check(&mp, "after the rename");
    m.umount();
    let _m = d.mount("wh", &mp);
    check(&mp, "after a remount");
}

// The bug: st_blocks was size/512 even for sparse files (du said 148 GB for 7.5 GB of data after
// fsstress). Now it counts the 8 KiB blocks the file stores: holes are free, zeros written
// become holes, and the count is the same after a remount (read from the block map).
#[test]
fn st_blocks_count_stored_blocks_not_the_size() {
    let d = Daemon::start();
    let m = d.create_and_mount("du");
    let page = |seed: u8| -> Vec<u8> { (0..8192u32).map(|i| ((i as u8) ^ seed) | 1).collect() };
    let f = m.join("sparse");
    write_synced(&f, 0, &page(1));
    write_synced(&f, 1 << 30, &page(2));
    let meta = fs::metadata(&f).unwrap();
    assert_eq!(meta.len(), (1 << 30) + 8192);
    assert_eq!(meta.blocks(), 2 * 16, "two stored 8 KiB blocks, not 1 GiB");

    // Zeros over a stored block make it a hole.
    write_synced(&f, 1 << 30, &[0u8; 8192]);
    assert_eq!(fs::metadata(&f).unwrap().blocks(), 16);

    let dense = m.join("dense");
    let mut w = fs::File::create(&dense).unwrap();
    for i in 0..128u8 {
        w.write_all(&page(i)).unwrap();
    }
    w.sync_all().unwrap();
    drop(w);
    assert_eq!(fs::metadata(&dense).unwrap().blocks(), 128 * 16);

    let mp = m.path.clone();
    m.umount();
    let m = d.mount("du", &mp);
    assert_eq!(fs::metadata(m.join("sparse")).unwrap().blocks(), 16);
    assert_eq!(fs::metadata(m.join("dense")).unwrap().blocks(), 128 * 16);
}

// An O_DSYNC handle bypasses the kernel's page cache (one WRITE per write(2), durable when
// answered, no FSYNC): handles of the same file that use the cache must still see one file.
// A reader that cached a page sees what the O_DSYNC handle wrote over it; a page another handle
// dirtied in the cache before the O_DSYNC write does not come back over it later (written back
// first, then overwritten); sizes agree; and the result is the same after a remount.
#[test]
fn o_dsync_handles_and_cached_handles_see_one_file() {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let d = Daemon::start();
    let m = d.create_and_mount("dsync");
    let p = m.join("f");
    let page = |b: u8| vec![b; 8192];
    write_synced(&p, 0, &[page(b'a'), page(b'a')].concat());
    let reader = fs::File::open(&p).unwrap();
    let mut buf = vec![0u8; 8192];
    reader.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(buf, page(b'a'));
    // A cached handle dirties page 1 (not synced), then the O_DSYNC handle opens.
    let cached = fs::OpenOptions::new().write(true).open(&p).unwrap();
    cached.write_all_at(&page(b'x'), 8192).unwrap();
    let dsync = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DSYNC)
        .open(&p)
        .unwrap();
    for (round, b) in [b'b', b'c'].into_iter().enumerate() {
        dsync.write_all_at(&page(b), 0).unwrap();
        reader.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(
            buf,
            page(b),
            "round {round}: the cached reader must see the O_DSYNC write"
        );
    }
    reader.read_exact_at(&mut buf, 8192).unwrap();
    assert_eq!(
        buf,
        page(b'x'),
        "the cached handle's write before the O_DSYNC open"
    );
    // The cached handle writes page 1 again, then the O_DSYNC handle overwrites it: last wins.
    cached.write_all_at(&page(b'y'), 8192).unwrap();
    dsync.write_all_at(&page(b'z'), 8192).unwrap();
    // Extending through the O_DSYNC handle: every handle sees the new size.
    dsync.write_all_at(&page(b'e'), 3 * 8192).unwrap();
    assert_eq!(reader.metadata().unwrap().len(), 4 * 8192);
    cached.sync_all().unwrap();
    let want = [page(b'c'), page(b'z'), page(0), page(b'e')].concat();
    assert_eq!(fs::read(&p).unwrap(), want, "after every handle synced");
    drop((reader, cached, dsync));
    let mp = m.path.clone();
    m.umount();
    let m = d.mount("dsync", &mp);
    assert_eq!(fs::read(m.join("f")).unwrap(), want, "after a remount");
}
