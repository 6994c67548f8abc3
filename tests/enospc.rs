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

// ---------------------------------------------------------------------------------------------
// A full filesystem never locks the store (issue 11, item 1)
// ---------------------------------------------------------------------------------------------

use crate::util::source::{
    self as src_util, link_small, source_snapshot, wait_json, SourceDb, Staged,
};
use crate::util::vdb::{self as vdb_util, Vdbd};
use serde_json::Value;

/// A loop-mounted ext4 filesystem of `mib` MiB with no blocks reserved for root (so 100 % full
/// means full for the daemon too), unmounted on drop (the loop device goes with it).
struct LoopExt4 {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl LoopExt4 {
    fn mount(mib: u64) -> LoopExt4 {
        let dir = util::tempdir("vdbfs-full-");
        let image = dir.path().join("fs.img");
        let path = dir.path().join("fs");
        fs::create_dir(&path).unwrap();
        fs::File::create(&image)
            .unwrap()
            .set_len(mib << 20)
            .unwrap();
        let out = util::run_timeout(
            Command::new("mkfs.ext4")
                .args(["-q", "-F", "-m", "0"])
                .arg(&image),
            util::COMMAND_TIMEOUT,
        );
        assert!(out.status.success(), "mkfs.ext4 failed\n{}", describe(&out));
        let out = util::run_timeout(
            Command::new("mount")
                .args(["-t", "ext4", "-o", "loop"])
                .arg(&image)
                .arg(&path),
            util::COMMAND_TIMEOUT,
        );
        assert!(
            out.status.success(),
            "mount -o loop failed (no loop devices?)\n{}",
            describe(&out)
        );
        util::chmod(&path, 0o755);
        LoopExt4 { _dir: dir, path }
    }

    /// Free bytes (statvfs f_bavail).
    fn free(&self) -> u64 {
        let st = util::statfs(&self.path).unwrap();
        st.f_bavail * st.f_bsize as u64
    }
}

impl Drop for LoopExt4 {
    fn drop(&mut self) {
        let c = CString::new(self.path.as_os_str().as_bytes()).unwrap();
        // SAFETY: c is a NUL-terminated path that outlives the call.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}

/// Appends to `path` until the filesystem refuses; returns the error and the bytes written.
fn fill_plain_file(path: &Path) -> (std::io::Error, u64) {
    let mut f = fs::File::create(path).unwrap();
    let chunk = vec![0x5au8; 1 << 20];
    let mut n = 0u64;
    loop {
        match f.write(&chunk) {
            Ok(0) => return (std::io::Error::from_raw_os_error(libc::ENOSPC), n),
            Ok(w) => n += w as u64,
            Err(e) => {
                let _ = f.sync_all();
                return (e, n);
            }
        }
    }
}

fn fault_of(v: &Value) -> String {
    v["fault"].as_str().unwrap_or("").to_string()
}

// The scenario of issue 11: a store on a small filesystem (here a 320 MiB loop-mounted ext4)
// with a linked source and a VDB; a dataset fills it until writers get ENOSPC (never EIO), then
// a plain file takes the last free bytes: the filesystem is 100 % full. `source status` and `vdb
// status` say "store full" with the numbers; `df` works; without adding space the daemon
// restarts, a VDB, a snapshot and the filler dataset are deleted, `gc` gives the space back (the
// store's reserve, a ballast file only its own checkpoints, recovery, gc and deletes may use,
// made that possible); then staging catches up with the source and the VDB answers with every
// row it acknowledged.
#[test]
fn a_full_filesystem_never_locks_the_store() {
    let fsys = LoopExt4::mount(320);
    let store = fsys.path.join("store");
    let src = SourceDb::start(false, &[]);
    src.insert_rows(1, 100, "before");
    let mut d = Vdbd {
        s: Staged::start_at(&store),
    };
    let reserve = fs::metadata(store.join("reserve"))
        .map(|m| m.len())
        .unwrap_or(0);
    assert!(
        reserve >= 30 << 20,
        "init made a reserve of {reserve} bytes"
    );
    link_small(&d, &src, "prod");
    let snap = source_snapshot(&d, "prod");
    let vdb = vdb_util::create(&d, "dev", &snap, &[]);
    vdb_util::create(&d, "scratch", &snap, &[]);
    vdb.sql("CREATE TABLE acked (id int PRIMARY KEY)");
    let mut acked: Vec<i64> = Vec::new();
    for i in 1..=50 {
        vdb.sql(&format!("INSERT INTO acked VALUES ({i})"));
        acked.push(i);
    }

    // A dataset fills the store until writers are refused.
    d.create_dataset("filler");
    let filler_mp = d.new_mountpoint("filler");
    let filler = d.mount("filler", &filler_mp);
    let mut rng = StdRng::seed_from_u64(11);
    let (err, written) = {
        let mut f = fs::File::create(filler.join("fill.bin")).unwrap();
        let mut written = 0usize;
        let mut unsynced = 0usize;
        loop {
            assert!(
                written < 1 << 30,
                "wrote 1 GiB into a store on 320 MiB without an error"
            );
            let buf = random_bytes(&mut rng, 1 << 20);
            if let Err(e) = f.write_all(&buf) {
                break (e, written);
            }
            written += 1 << 20;
            unsynced += 1 << 20;
            if unsynced >= 8 << 20 {
                unsynced = 0;
                if let Err(e) = f.sync_all() {
                    break (e, written);
                }
            }
        }
    };
    eprintln!("the filler stopped after {written} bytes: {err}");
    assert_eq!(
        err.raw_os_error(),
        Some(libc::ENOSPC),
        "writers must get ENOSPC, never EIO: {err:?}\n{}",
        d.log_tail(30)
    );
    // Rows the VDB acknowledges while the store is full (most are refused: postgres cannot
    // write its WAL); every acknowledged one must survive.
    for i in 51..=60 {
        if vdb
            .try_sql(&format!("INSERT INTO acked VALUES ({i})"))
            .status
            .success()
        {
            acked.push(i);
        }
    }
    // The last free bytes go to a plain file: 100 % full.
    let (e, n) = fill_plain_file(&fsys.path.join("junk"));
    eprintln!(
        "junk took {n} bytes more ({e}); {} bytes free now",
        fsys.free()
    );
    assert!(
        fsys.free() < 1 << 20,
        "not full: {} bytes free",
        fsys.free()
    );

    let full = |v: &Value| fault_of(v).contains("store full");
    let st = wait_json(
        &d,
        &["source", "status", "prod", "--json"],
        "a store full fault",
        Duration::from_secs(60),
        String::new,
        full,
    );
    eprintln!("source status while full: {}", fault_of(&st));
    assert!(
        fault_of(&st).contains("MiB free of") && fault_of(&st).contains("vdbfs gc"),
        "the fault gives the numbers and what to do: {st}"
    );
    assert!(full(&vdb_util::status(&d, "dev")), "vdb status");
    d.ok(&["df"]);
    let status = d.status_json();
    assert_eq!(status["space"]["full"], true, "{status}");

    // Without adding space: restart, delete a VDB, a snapshot and the filler, collect.
    drop(filler);
    d.restart();
    d.ok(&["df"]);
    d.ok(&["vdb", "delete", "scratch"]);
    d.ok(&["snapshot", "delete", &snap]);
    let _ = d.vdbfs(&["umount", filler_mp.to_str().unwrap()]);
    d.ok(&["dataset", "delete", "filler"]);
    let free_before = fsys.free();
    let gc = d.ok(&["gc"]);
    eprintln!("gc: {gc}");
    let free_after = fsys.free();
    assert!(
        free_after > free_before + (150 << 20),
        "gc gave back {} bytes only ({free_before} -> {free_after} free); {gc}",
        free_after.saturating_sub(free_before)
    );
    assert!(
        fsys.path.join("junk").exists(),
        "the space came from the store, not the junk"
    );

    // Staging catches up with the source.
    src.insert_rows(101, 200, "after");
    let target = src.lsn();
    wait_json(
        &d,
        &["source", "status", "prod", "--json"],
        "staging syncing and caught up",
        Duration::from_secs(240),
        || src_util::staging_log(&d, "prod"),
        |s| {
            s["state"] == "syncing"
                && src_util::lsn_field(s, "replay_lsn").is_some_and(|l| l >= target)
        },
    );
    let snap2 = source_snapshot(&d, "prod");
    eprintln!("a validated snapshot after the full disk: {snap2}");

    // The VDB answers with every row it acknowledged.
    vdb_util::wait_vdb(&d, "dev", "running again", vdb_util::running);
    let missing = crate::crash::missing_ids(&acked, &vdb.sql("SELECT id FROM acked"));
    assert!(missing.is_empty(), "acknowledged rows lost: {missing:?}");
    vdb.amcheck();
    // The reserve is whole again once there is room.
    assert!(
        util::wait_until(Duration::from_secs(30), || {
            fs::metadata(store.join("reserve"))
                .map(|m| m.len())
                .unwrap_or(0)
                >= reserve
        }),
        "the reserve did not grow back"
    );
    // No FUSE request was answered EIO (the daemon logs every EIO it answers), and the log
    // never gave up on a write.
    let log = d.log();
    let eio: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("ERROR") && l.contains("vdbfs::fs"))
        .collect();
    assert!(
        eio.is_empty(),
        "a full store answers ENOSPC, never EIO: {eio:?}"
    );
    assert!(
        !log.contains("read-only until restart"),
        "the store gave up writing:\n{}",
        d.log_tail(40)
    );
    drop(d);
    drop(fsys);
}
