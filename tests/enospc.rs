//! A full disk under the store: writers get ENOSPC (not EIO, not a hang, not a dead daemon), and
//! what was fsynced before stays intact through remounts and restarts.

use std::ffi::CString;
use std::fs;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};

use crate::util::{self, describe, Daemon};

/// A small tmpfs, unmounted on drop (declare it before the Daemon so it is dropped after it).
struct SmallTmpfs {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl SmallTmpfs {
    fn mount(size: &str) -> SmallTmpfs {
        let dir = util::tempdir("vdbfs-enospc-");
        let path = dir.path().join("fs");
        fs::create_dir(&path).unwrap();
        let out = util::run_timeout(
            Command::new("mount")
                .args([
                    "-t",
                    "tmpfs",
                    "-o",
                    &format!("size={size},mode=0755"),
                    "tmpfs",
                ])
                .arg(&path),
            util::COMMAND_TIMEOUT,
        );
        assert!(
            out.status.success(),
            "mount tmpfs failed\n{}",
            describe(&out)
        );
        SmallTmpfs { _dir: dir, path }
    }
}

impl Drop for SmallTmpfs {
    fn drop(&mut self) {
        let c = CString::new(self.path.as_os_str().as_bytes()).unwrap();
        // SAFETY: c is a NUL-terminated path that outlives the call.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}

fn random_bytes(rng: &mut StdRng, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rng.fill_bytes(&mut v);
    v
}

/// Writes incompressible data until an error; returns that error and how much was written.
fn fill_until_error(path: &Path, rng: &mut StdRng) -> (std::io::Error, usize) {
    let mut f = fs::File::create(path).unwrap();
    let mut written = 0usize;
    let mut unsynced = 0usize;
    let chunk = 1 << 20;
    loop {
        assert!(
            written < 512 << 20,
            "wrote 512 MiB into a store on a 64 MiB tmpfs without an error"
        );
        let buf = random_bytes(rng, chunk);
        if let Err(e) = f.write_all(&buf) {
            return (e, written);
        }
        written += chunk;
        unsynced += chunk;
        if unsynced >= 4 << 20 {
            unsynced = 0;
            if let Err(e) = f.sync_all() {
                return (e, written);
            }
        }
    }
}

// The store's disk fills up: the writer gets ENOSPC, the daemon keeps serving and reading, and
// files fsynced before are intact. While the disk is full, `umount` either works or says the
// disk is full; once the administrator frees space everything works again: umount, remount, a
// daemon restart, and new writes.
#[test]
fn full_store_disk_gives_enospc_and_keeps_synced_data() {
    let tmpfs = SmallTmpfs::mount("64m");
    // Space the "administrator" frees after the disk filled up.
    let ballast = tmpfs.path.join("ballast");
    fs::write(&ballast, vec![1u8; 8 << 20]).unwrap();
    let mut d = Daemon::start_at(&tmpfs.path.join("store"));
    let m = d.create_and_mount("full");
    let mp = m.path.clone();
    let mut rng = StdRng::seed_from_u64(7);

    let keep = random_bytes(&mut rng, 2 << 20);
    let mut f = fs::File::create(m.join("keep.bin")).unwrap();
    f.write_all(&keep).unwrap();
    f.sync_all().unwrap();
    drop(f);
    fs::write(m.join("small.txt"), b"small and synced").unwrap();
    fs::File::open(m.join("small.txt"))
        .unwrap()
        .sync_all()
        .unwrap();

    let (err, written) = fill_until_error(&m.join("big.bin"), &mut rng);
    eprintln!("writer stopped after {written} bytes: {err}");
    assert_eq!(
        err.raw_os_error(),
        Some(libc::ENOSPC),
        "a full store must give the writer ENOSPC, got {err:?}\ndaemon log:\n{}",
        d.log_tail(30)
    );
    d.ok(&["status"]);
    assert!(
        d.pid().is_some_and(|p| util::pid_alive(p as i32)),
        "the daemon died on a full disk"
    );

    fs::remove_file(m.join("big.bin")).unwrap();
    assert_eq!(fs::read(m.join("keep.bin")).unwrap(), keep);
    assert_eq!(fs::read(m.join("small.txt")).unwrap(), b"small and synced");

    let out = m.try_umount();
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
        assert!(
            err.contains("no space"),
            "umount on a full store failed without saying the disk is full\n{}",
            describe(&out)
        );
        assert!(util::is_mounted(&mp), "a failed umount left no mount");
        assert_eq!(fs::read(m.join("keep.bin")).unwrap(), keep);
        eprintln!(
            "umount on the full store refused, as it says: {}",
            err.trim()
        );
    }
    fs::remove_file(&ballast).unwrap();
    if util::is_mounted(&mp) {
        let out = m.try_umount();
        assert!(
            out.status.success(),
            "umount after space was freed failed\n{}\ndaemon log:\n{}",
            describe(&out),
            d.log_tail(30)
        );
    }
    drop(m);
    let m = d.mount("full", &mp);
    assert_eq!(fs::read(m.join("keep.bin")).unwrap(), keep);
    assert_eq!(fs::read(m.join("small.txt")).unwrap(), b"small and synced");
    assert!(!m.join("big.bin").exists(), "the removed file came back");

    d.restart();
    d.wait_mounted(&mp, Duration::from_secs(15));
    assert_eq!(fs::read(m.join("keep.bin")).unwrap(), keep);
    assert_eq!(fs::read(m.join("small.txt")).unwrap(), b"small and synced");

    // With space again, writes work again.
    let fresh = random_bytes(&mut rng, 1 << 20);
    let mut f = fs::File::create(m.join("fresh.bin")).unwrap();
    f.write_all(&fresh).unwrap();
    f.sync_all().unwrap();
    drop(f);
    assert_eq!(fs::read(m.join("fresh.bin")).unwrap(), fresh);
    drop(m);
    drop(d);
}
