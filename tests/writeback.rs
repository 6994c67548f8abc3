//! The write path through the kernel's writeback cache and the log tail (issue 10): whatever an
//! fsync or fdatasync acknowledged survives `kill -9` of the daemon, while writes go on around it
//! (files finished and fsynced, a log appended and fdatasynced record by record, files renamed
//! into place with a directory fsync, a WAL-like file opened with O_DSYNC whose pages are rewritten
//! in place (PostgreSQL's `wal_sync_method = open_datasync`: each write is durable when it
//! returns, and vdbfs serves it with one round trip, no FSYNC), and files written and never
//! synced). Bytes that were never synced may or may not be there; the synced ones must be,
//! exactly.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

use crate::util::{self, require_root_fuse, Daemon};

/// What the writer knows to be durable: files with their whole content, the synced prefix
/// of the append-only log, and what the O_DSYNC writes of the WAL-like file had written when
/// the last of them returned.
#[derive(Default)]
struct Durable {
    files: Vec<(String, Vec<u8>)>,
    log: Vec<u8>,
    wal: Vec<u8>,
}

/// Random bytes, some of them long runs of zeros (holes) and some blocks repeated (dedup).
fn content(rng: &mut StdRng, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    let mut at = 0;
    while at < len {
        let n = rng.gen_range(1..40_000).min(len - at);
        match rng.gen_range(0..4) {
            0 => {} // zeros
            1 => v[at..at + n].fill(rng.gen()),
            _ => rng.fill_bytes(&mut v[at..at + n]),
        }
        at += n;
    }
    v
}

/// Writes until the mount goes away (the daemon is killed) or `stop` is set; every write error
/// ends it. Records in `durable` only what an acknowledged sync covers.
fn write_loop(
    dir: &Path,
    seed: u64,
    durable: &Mutex<Durable>,
    syncs: &AtomicUsize,
    stop: &AtomicBool,
) -> std::io::Result<()> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("log"))?;
    let mut logged = Vec::new();
    let wal = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .custom_flags(libc::O_DSYNC)
        .open(dir.join("wal"))?;
    let mut walled: Vec<u8> = Vec::new();
    let mut n = 0usize;
    while !stop.load(Ordering::SeqCst) {
        n += 1;
        match rng.gen_range(0..4) {
            // A file written in several unaligned pieces, then fsynced and never touched again.
            0 => {
                let name = format!("done-{n}");
                let len = rng.gen_range(1..3 << 20);
                let data = content(&mut rng, len);
                let f = File::create(dir.join(&name))?;
                let mut at = 0;
                while at < data.len() {
                    let k = rng.gen_range(1..300_000).min(data.len() - at);
                    f.write_all_at(&data[at..at + k], at as u64)?;
                    at += k;
                }
                f.sync_all()?;
                durable.lock().unwrap().files.push((name, data));
            }
            // A record appended to the log and fdatasynced (a WAL-like pattern).
            1 => {
                let len = rng.gen_range(1..20_000);
                let rec = content(&mut rng, len);
                log.write_all(&rec)?;
                log.sync_data()?;
                logged.extend_from_slice(&rec);
                durable.lock().unwrap().log = logged.clone();
            }
            // Written under a temporary name, fsynced, renamed into place, directory fsynced.
            2 => {
                let name = format!("renamed-{n}");
                let len = rng.gen_range(1..200_000);
                let data = content(&mut rng, len);
                let tmp = dir.join(format!("{name}.tmp"));
                let mut f = File::create(&tmp)?;
                f.write_all(&data)?;
                f.sync_all()?;
                fs::rename(&tmp, dir.join(&name))?;
                File::open(dir)?.sync_all()?;
                durable.lock().unwrap().files.push((name, data));
            }
            // A WAL-like record through the O_DSYNC handle: the 8 KiB pages it touches are
            // written whole, the last (partial) one again with each record, like PostgreSQL.
            3 if rng.gen_bool(0.5) => {
                let len = rng.gen_range(1..20_000);
                let rec = content(&mut rng, len);
                let from = walled.len() / 8192 * 8192;
                walled.extend_from_slice(&rec);
                let to = walled.len().div_ceil(8192) * 8192;
                let mut pages = walled[from..].to_vec();
                pages.resize(to - from, 0);
                wal.write_all_at(&pages, from as u64)?;
                durable.lock().unwrap().wal = walled.clone();
            }
            // Written and never synced: the kernel holds it until it writes it back.
            _ => {
                let len = rng.gen_range(1..1 << 20);
                let data = content(&mut rng, len);
                File::create(dir.join(format!("dirty-{n}")))?.write_all(&data)?;
                continue;
            }
        }
        syncs.fetch_add(1, Ordering::SeqCst);
    }
    Ok(())
}

/// What is wrong in `dir` against what was durable there.
fn check(dir: &Path, d: &Durable) -> Vec<String> {
    let mut bad = Vec::new();
    let first_diff = |a: &[u8], b: &[u8]| a.iter().zip(b).position(|(x, y)| x != y);
    for (name, want) in &d.files {
        match fs::read(dir.join(name)) {
            Ok(got) if got == *want => {}
            Ok(got) => bad.push(format!(
                "{}: {} bytes, want {}; first difference at {:?}",
                dir.join(name).display(),
                got.len(),
                want.len(),
                first_diff(&got, want)
            )),
            Err(e) => bad.push(format!("{}: {e}", dir.join(name).display())),
        }
    }
    // Files that may hold more than was durable, but must start with it.
    for (name, what, want) in [
        ("wal", "(O_DSYNC writes) were written", &d.wal),
        ("log", "were synced", &d.log),
    ] {
        let got = fs::read(dir.join(name)).unwrap_or_default();
        if got.len() < want.len() || got[..want.len()] != want[..] {
            bad.push(format!(
                "{}/{name}: {} bytes, {} {what}; first difference at {:?}",
                dir.display(),
                got.len(),
                want.len(),
                first_diff(&got, want)
            ));
        }
    }
    bad
}

#[test]
fn fsynced_writes_survive_kill9_through_the_writeback_cache() {
    fsynced_writes_survive_kill9(&[]);
}

/// The same with the write-through commit (`VDBFS_FSYNC=write`: every WRITE durable when
/// answered, FSYNC answered ENOSYS so the kernel stops sending it).
#[test]
fn fsynced_writes_survive_kill9_with_write_through_commits() {
    fsynced_writes_survive_kill9(&[("VDBFS_FSYNC", "write")]);
}

fn fsynced_writes_survive_kill9(env: &[(&str, &str)]) {
    require_root_fuse();
    let mut d = Daemon::start();
    if !env.is_empty() {
        d.restart_with(&[], env);
    }
    let m = d.create_and_mount("wb");
    let mp: PathBuf = m.path.clone();
    for cycle in 0..3u64 {
        let syncs = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let writers: Vec<_> = (0..2u64)
            .map(|w| {
                let dir = mp.join(format!("c{cycle}w{w}"));
                fs::create_dir(&dir).unwrap();
                File::open(&mp).unwrap().sync_all().unwrap();
                let (syncs, stop) = (syncs.clone(), stop.clone());
                let seed = 0x5eed + cycle * 10 + w;
                thread::spawn(move || {
                    let durable = Mutex::new(Durable::default());
                    let r = write_loop(&dir, seed, &durable, &syncs, &stop);
                    (dir, durable.into_inner().unwrap(), r)
                })
            })
            .collect();
        // Crash in the middle of the writing, once enough syncs were acknowledged.
        let enough = util::wait_until(Duration::from_secs(120), || {
            syncs.load(Ordering::SeqCst) >= 40 + 20 * cycle as usize
        });
        assert!(enough, "the writers acknowledged too few syncs in 120 s");
        d.kill9();
        stop.store(true, Ordering::SeqCst);
        let done: Vec<(PathBuf, Durable, std::io::Result<()>)> = writers
            .into_iter()
            .map(|w| w.join().expect("writer panicked"))
            .collect();
        d.start_again();
        d.wait_mounted(&mp, Duration::from_secs(30));
        let mut bad = Vec::new();
        for (dir, durable, r) in &done {
            eprintln!(
                "cycle {cycle}: {}: {} synced files, {} synced log bytes, {} O_DSYNC wal bytes; writer ended with {r:?}",
                dir.display(),
                durable.files.len(),
                durable.log.len(),
                durable.wal.len()
            );
            bad.extend(check(dir, durable));
        }
        assert!(
            bad.is_empty(),
            "cycle {cycle}: fsynced data lost or wrong after kill -9:\n{}\ndaemon log tail:\n{}",
            bad.join("\n"),
            d.log_tail(30)
        );
    }
    m.umount();
}
