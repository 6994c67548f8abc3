//! Mount lifecycle: mounts are recorded and come back after a daemon restart or a crash (a stale
//! ENOTCONN mount is cleared first), SIGTERM leaves no mount behind, and mount(8) works through
//! the `mount.fuse.vdbfs` helper.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::util::{self, describe, is_mounted, is_stale, Daemon, Mount};

fn write_synced(path: &Path, data: &[u8]) {
    let mut f = fs::File::create(path).unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
}

fn status_mountpoints(d: &Daemon) -> Vec<(String, PathBuf)> {
    let v = d.status_json();
    v["mounts"]
        .as_array()
        .unwrap_or_else(|| panic!("status --json has no mounts array: {v}"))
        .iter()
        .map(|e| {
            (
                e["dataset"].as_str().unwrap().to_string(),
                PathBuf::from(e["mountpoint"].as_str().unwrap()),
            )
        })
        .collect()
}

// SIGTERM flushes and unmounts everything (nothing left in mountinfo, the daemon exits 0), and
// the next `serve` mounts the recorded datasets again by itself, with their files.
#[test]
fn restart_unmounts_on_sigterm_and_reestablishes_mounts() {
    let mut d = Daemon::start();
    let a = d.create_and_mount("a");
    let b = d.create_and_mount("b");
    write_synced(&a.join("fa"), b"in a");
    fs::create_dir(b.join("dir")).unwrap();
    fs::write(b.join("dir/fb"), b"in b, not fsynced: SIGTERM flushes").unwrap();

    d.terminate();
    for m in [&a, &b] {
        assert!(
            !is_mounted(&m.path),
            "{} is still in /proc/self/mountinfo after SIGTERM of the daemon",
            m.path.display()
        );
    }

    d.start_again();
    d.wait_mounted(&a.path, Duration::from_secs(15));
    d.wait_mounted(&b.path, Duration::from_secs(15));
    assert_eq!(fs::read(a.join("fa")).unwrap(), b"in a");
    assert_eq!(
        fs::read(b.join("dir/fb")).unwrap(),
        b"in b, not fsynced: SIGTERM flushes"
    );
    let mut listed = status_mountpoints(&d);
    listed.sort();
    assert_eq!(
        listed,
        vec![
            ("a".to_string(), a.path.clone()),
            ("b".to_string(), b.path.clone())
        ]
    );

    // An explicit umount is remembered: that dataset is not mounted again at the next start.
    let bpath = b.path.clone();
    b.umount();
    d.restart();
    d.wait_mounted(&a.path, Duration::from_secs(15));
    assert!(
        !is_mounted(&bpath),
        "a dataset unmounted by `vdbfs umount` was mounted again by the next serve"
    );
    assert_eq!(
        status_mountpoints(&d),
        vec![("a".to_string(), a.path.clone())]
    );
}

// After kill -9 the kernel keeps a dead (ENOTCONN) mount; the next `serve` clears it and mounts
// the dataset again at the same place, with everything that was fsynced.
#[test]
fn stale_mount_after_kill9_is_cleared_and_remounted() {
    let mut d = Daemon::start();
    let m = d.create_and_mount("s");
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
    write_synced(&m.join("synced.bin"), &data);
    fs::create_dir(m.join("d")).unwrap();
    let dir = fs::File::open(m.join("d")).unwrap();
    write_synced(&m.join("d/inner"), b"inner");
    dir.sync_all().unwrap();
    drop(dir);
    // Users (postgres) stat the mount root all the time: its attributes are in the kernel's
    // cache, so after the crash a stat of it may still answer from there.
    assert!(fs::metadata(&m.path).unwrap().is_dir());

    d.kill9();
    assert!(
        is_mounted(&m.path) && is_stale(&m.path),
        "precondition: kill -9 of the daemon leaves a stale ENOTCONN mount; mounted: {}, {}",
        is_mounted(&m.path),
        util::stat_says(&m.path)
    );

    d.start_again();
    d.wait_mounted(&m.path, Duration::from_secs(15));
    let n = util::mountinfo()
        .iter()
        .filter(|e| e.mountpoint == m.path)
        .count();
    assert_eq!(n, 1, "the stale mount was not cleared (mounted over it?)");
    assert_eq!(fs::read(m.join("synced.bin")).unwrap(), data);
    assert_eq!(fs::read(m.join("d/inner")).unwrap(), b"inner");
    // And it is a working mount.
    write_synced(&m.join("after"), b"after");
    assert_eq!(fs::read(m.join("after")).unwrap(), b"after");
}

/// Installs the mount(8) helpers into /sbin for the duration of a test, restoring what was there.
struct InstalledHelper {
    installed: Vec<(PathBuf, Option<Vec<u8>>)>,
    store: PathBuf,
}

impl InstalledHelper {
    fn install(store: &Path) -> InstalledHelper {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("mount-helpers");
        let mut installed = Vec::new();
        for name in ["mount.fuse.vdbfs", "umount.fuse.vdbfs"] {
            let from = src.join(name);
            let bytes = fs::read(&from)
                .unwrap_or_else(|e| panic!("mount helper {} is missing ({e})", from.display()));
            let to = Path::new("/sbin").join(name);
            let old = fs::read(&to).ok();
            fs::write(&to, bytes).unwrap_or_else(|e| panic!("install {}: {e}", to.display()));
            util::chmod(&to, 0o755);
            installed.push((to, old));
        }
        InstalledHelper {
            installed,
            store: store.to_path_buf(),
        }
    }
}

impl Drop for InstalledHelper {
    fn drop(&mut self) {
        for (p, old) in &self.installed {
            match old {
                Some(b) => {
                    let _ = fs::write(p, b);
                }
                None => {
                    let _ = fs::remove_file(p);
                }
            }
        }
        // The helper remembers which store serves a mount point in /run/vdbfs/mounts.
        if let Ok(rd) = fs::read_dir("/run/vdbfs/mounts") {
            for e in rd.flatten() {
                let s = fs::read_to_string(e.path()).unwrap_or_default();
                if Path::new(s.trim()) == self.store {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
    }
}

// `mount -t fuse.vdbfs DATASET DIR -o store=STORE` (and so an fstab line) mounts a dataset
// through the running daemon via /sbin/mount.fuse.vdbfs; `umount DIR` goes back through it.
#[test]
fn mount8_through_mount_fuse_vdbfs_helper() {
    let d = Daemon::start();
    d.create_dataset("viamount");
    let _helper = InstalledHelper::install(d.store());
    let mp = d.new_mountpoint("viamount");
    fs::create_dir_all(&mp).unwrap();
    let out = util::run_timeout(
        Command::new("mount")
            .env("VDBFS_BIN", util::bin())
            .env_remove("VDBFS_STORE")
            .args(["-t", "fuse.vdbfs", "viamount"])
            .arg(&mp)
            .arg("-o")
            .arg(format!("store={},noatime,_netdev", d.store().display())),
        util::COMMAND_TIMEOUT,
    );
    assert!(
        out.status.success(),
        "mount -t fuse.vdbfs failed\n{}\ndaemon log:\n{}",
        describe(&out),
        d.log_tail(30)
    );
    let m = Mount::adopt(&d, "viamount", &mp);
    assert!(is_mounted(&mp), "mount(8) exited 0 but nothing is mounted");
    write_synced(&m.join("hello"), b"via mount(8)");
    assert_eq!(fs::read(m.join("hello")).unwrap(), b"via mount(8)");
    assert_eq!(
        status_mountpoints(&d),
        vec![("viamount".to_string(), mp.clone())]
    );
    let entry = util::mount_entry(&mp).unwrap();
    assert_eq!(
        entry.fstype, "fuse.vdbfs",
        "the mount's type must be fuse.vdbfs so that umount(8) uses umount.fuse.vdbfs: {entry:?}"
    );

    let out = util::run_timeout(
        Command::new("umount")
            .env("VDBFS_BIN", util::bin())
            .env_remove("VDBFS_STORE")
            .arg(&mp),
        util::COMMAND_TIMEOUT,
    );
    assert!(out.status.success(), "umount(8) failed\n{}", describe(&out));
    assert!(!is_mounted(&mp));
    assert!(
        status_mountpoints(&d).is_empty(),
        "umount(8) did not go through the daemon: it still lists the mount"
    );
}

// `mount -o ro` through the helper mounts a snapshot (always read-only) and is refused for a
// dataset with a message saying to mount a snapshot (mount-helpers/README.md).
#[test]
fn mount8_ro_is_for_snapshots() {
    let d = Daemon::start();
    let m = d.create_and_mount("rods");
    write_synced(&m.join("f"), b"frozen");
    d.ok(&["snapshot", "create", "rods", "--name", "s1"]);
    let _helper = InstalledHelper::install(d.store());
    let mount8 = |src: &str, mp: &Path| {
        fs::create_dir_all(mp).unwrap();
        util::run_timeout(
            Command::new("mount")
                .env("VDBFS_BIN", util::bin())
                .env_remove("VDBFS_STORE")
                .args(["-t", "fuse.vdbfs", src])
                .arg(mp)
                .arg("-o")
                .arg(format!("store={},ro", d.store().display())),
            util::COMMAND_TIMEOUT,
        )
    };
    let mp = d.new_mountpoint("ro-dataset");
    let out = mount8("rods", &mp);
    assert!(
        !out.status.success(),
        "ro for a dataset must fail\n{}",
        describe(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("DATASET@SNAPSHOT"),
        "{}",
        describe(&out)
    );
    assert!(!is_mounted(&mp));
    let mp = d.new_mountpoint("ro-snapshot");
    let out = mount8("rods@s1", &mp);
    assert!(
        out.status.success(),
        "{}\n{}",
        describe(&out),
        d.log_tail(20)
    );
    let snap = Mount::adopt(&d, "rods@s1", &mp);
    assert_eq!(fs::read(snap.join("f")).unwrap(), b"frozen");
    assert!(
        fs::write(snap.join("g"), b"x").is_err(),
        "a snapshot mount is read-only"
    );
}

// `mount-helpers/install` (here into DESTDIR) puts the completions for bash, zsh and fish and
// a man page per command in place, and --uninstall removes them.
#[test]
fn install_puts_completions_and_man_pages_in_place() {
    let tmp = util::tempdir("vdbfs-install-");
    let dest = tmp.path().join("root");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("mount-helpers/install");
    let out = util::run_timeout(
        Command::new(&script)
            .env("DESTDIR", &dest)
            .env("VDBFS_BIN", util::bin()),
        util::COMMAND_TIMEOUT,
    );
    assert!(out.status.success(), "{}", describe(&out));
    for f in [
        "usr/share/bash-completion/completions/vdbfs",
        "usr/share/zsh/vendor-completions/_vdbfs",
        "usr/share/fish/vendor_completions.d/vdbfs.fish",
        "usr/local/share/man/man1/vdbfs.1",
        "usr/local/share/man/man1/vdbfs-vdb-refresh.1",
        "usr/local/share/man/man1/vdbfs-source-link.1",
        "sbin/mount.fuse.vdbfs",
    ] {
        let p = dest.join(f);
        assert!(
            fs::metadata(&p).is_ok_and(|m| m.len() > 0),
            "{} is missing or empty",
            p.display()
        );
    }
    let out = util::run_timeout(
        Command::new(&script)
            .arg("--uninstall")
            .env("DESTDIR", &dest),
        util::COMMAND_TIMEOUT,
    );
    assert!(out.status.success(), "{}", describe(&out));
    assert!(!dest.join("usr/local/share/man/man1/vdbfs.1").exists());
    assert!(!dest
        .join("usr/share/bash-completion/completions/vdbfs")
        .exists());
}

// The bug: `vdbfs mount DS DIR` on a directory with files hid them (while `vdb create --mount`
// refused). Now it is refused (exit 1, the files stay visible, nothing is mounted) unless
// `--nonempty`; and a failed mount removes the directories it created.
#[test]
fn mount_refuses_a_nonempty_directory_unless_asked_and_cleans_up_after_failing() {
    let d = Daemon::start();
    d.create_dataset("m");
    let busy = d.root().join("busy");
    fs::create_dir(&busy).unwrap();
    fs::write(busy.join("keep"), b"mine").unwrap();
    let out = d.vdbfs(&["mount", "m", busy.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not empty") && err.contains("--nonempty"),
        "the refusal must say why and what to do\n{}",
        describe(&out)
    );
    assert!(!is_mounted(&busy), "refused, yet mounted");
    assert_eq!(fs::read(busy.join("keep")).unwrap(), b"mine");

    d.ok(&["mount", "--nonempty", "m", busy.to_str().unwrap()]);
    assert!(is_mounted(&busy));
    assert!(
        !busy.join("keep").exists(),
        "the mount hides the directory's files"
    );
    let m = Mount::adopt(&d, "m", &busy);
    m.umount();
    assert_eq!(
        fs::read(busy.join("keep")).unwrap(),
        b"mine",
        "and gives them back"
    );

    // A mount that fails leaves no directory it made.
    let fresh = d.root().join("made/by/mount");
    let out = d.vdbfs(&["mount", "no-such-dataset", fresh.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        !d.root().join("made").exists(),
        "a failed mount left the directories it created"
    );
}
