//! Snapshots, clones, space accounting and garbage collection (issue 3), through the CLI and
//! real FUSE mounts: a snapshot is frozen and whole, a clone is writable and independent of its
//! origin, its siblings and its snapshot, deleting a snapshot never breaks its clones, `vdbfs gc`
//! frees only what nothing references (also while writers, snapshots and clones run, and across
//! a `kill -9`), `vdbfs df` accounts for it, and names are checked.
//!
//! Long file (about 1,150 lines), on purpose: the snapshot/clone/gc contract in one place, each
//! test a scenario on real mounts; the fixtures live in `util`.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, RwLock};
use std::thread;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::util::{self, describe, require_root_fuse_postgres, Daemon, Mount, Postgres};

const BS: usize = 8192;

/// Relative path -> content.
type Files = BTreeMap<String, Vec<u8>>;

// ---------------------------------------------------------------------------------------------
// helpers

/// Every regular file under `root` with its content (small trees only).
fn read_tree(root: &Path) -> Files {
    let mut out = Files::new();
    fn walk(root: &Path, dir: &Path, out: &mut Files) {
        let mut entries: Vec<_> = fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("readdir {}: {e}", dir.display()))
            .map(|e| e.unwrap())
            .collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let p = e.path();
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                walk(root, &p, out);
            } else if ft.is_file() {
                let data = fs::read(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
                let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
                out.insert(rel, data);
            }
        }
    }
    walk(root, root, &mut out);
    out
}

/// Every regular file under `root` with its length and blake3 (large trees, e.g. a data dir).
fn hash_tree(root: &Path) -> BTreeMap<String, (u64, String)> {
    let mut out = BTreeMap::new();
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, (u64, String)>) {
        for e in fs::read_dir(dir).unwrap_or_else(|e| panic!("readdir {}: {e}", dir.display())) {
            let e = e.unwrap();
            let p = e.path();
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                walk(root, &p, out);
            } else if ft.is_file() {
                let mut h = blake3::Hasher::new();
                let mut f =
                    fs::File::open(&p).unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
                let n = std::io::copy(&mut f, &mut h)
                    .unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
                let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
                out.insert(rel, (n, h.finalize().to_hex().to_string()));
            }
        }
    }
    walk(root, root, &mut out);
    out
}

fn diff_files(got: &Files, want: &Files) -> String {
    let mut s = String::new();
    for (k, v) in want {
        match got.get(k) {
            None => s += &format!("  missing {k} ({} bytes)\n", v.len()),
            Some(g) if g != v => {
                let first = g.iter().zip(v).position(|(a, b)| a != b);
                s += &format!(
                    "  {k}: got {} bytes, want {}; first differing byte at {first:?}\n",
                    g.len(),
                    v.len()
                );
            }
            _ => {}
        }
    }
    for k in got.keys() {
        if !want.contains_key(k) {
            s += &format!("  unexpected {k}\n");
        }
    }
    s
}

#[track_caller]
fn assert_tree(root: &Path, want: &Files, what: &str, d: &Daemon) {
    let got = read_tree(root);
    assert!(
        &got == want,
        "{what} ({}) differs from what was written:\n{}daemon log tail:\n{}",
        root.display(),
        diff_files(&got, want),
        d.log_tail(30)
    );
}

fn write_synced(path: &Path, data: &[u8]) {
    let mut f = fs::File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
}

/// Writes `data` at `off` into an existing file and fsyncs it.
fn pwrite_synced(path: &Path, off: u64, data: &[u8]) {
    let f = fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    f.write_all_at(data, off).unwrap();
    f.sync_all().unwrap();
}

fn apply_write(content: &mut Vec<u8>, off: usize, data: &[u8]) {
    if content.len() < off + data.len() {
        content.resize(off + data.len(), 0);
    }
    content[off..off + data.len()].copy_from_slice(data);
}

fn random_bytes(rng: &mut StdRng, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rng.fill(&mut v[..]);
    v
}

/// Block-aligned data: half the time one of a few recurring blocks (so writes deduplicate
/// against blocks already in the store, also while a collection runs), else random.
fn gen_blocks(rng: &mut StdRng, blocks: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(blocks * BS);
    for _ in 0..blocks {
        if rng.gen_bool(0.5) {
            let k: u8 = rng.gen_range(1..6);
            out.extend((0..BS).map(|i| k.wrapping_mul(i as u8) ^ k));
        } else {
            out.extend(random_bytes(rng, BS));
        }
    }
    out
}

/// The "in X ms" a snapshot/clone command printed.
fn reported_ms(out: &str) -> f64 {
    out.rsplit_once(" in ")
        .and_then(|(_, r)| r.trim().strip_suffix("ms"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no 'in X ms' in {out:?}"))
}

fn df(d: &Daemon) -> serde_json::Value {
    let s = d.ok(&["df", "--json"]);
    serde_json::from_str(&s).unwrap_or_else(|e| panic!("df --json is not JSON ({e}): {s}"))
}

fn df_root<'a>(df: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    df["datasets"]
        .as_array()
        .unwrap_or_else(|| panic!("df --json has no datasets array: {df}"))
        .iter()
        .find(|e| e["name"] == name)
        .unwrap_or_else(|| panic!("df --json does not list {name}: {df}"))
}

fn u(v: &serde_json::Value, field: &str) -> u64 {
    v[field]
        .as_u64()
        .unwrap_or_else(|| panic!("no numeric {field} in {v}"))
}

fn snapshot_names(d: &Daemon, dataset: Option<&str>) -> Vec<String> {
    let mut args = vec!["snapshot", "list", "--json"];
    if let Some(ds) = dataset {
        args.insert(2, ds);
    }
    let s = d.ok(&args);
    let v: serde_json::Value =
        serde_json::from_str(&s).unwrap_or_else(|e| panic!("snapshot list --json ({e}): {s}"));
    v.as_array()
        .unwrap_or_else(|| panic!("snapshot list --json is not an array: {s}"))
        .iter()
        .map(|e| e["name"].as_str().unwrap().to_string())
        .collect()
}

/// Mounts a snapshot read-only, runs `f` on it, unmounts.
fn with_snapshot_mounted<T>(d: &Daemon, snap: &str, f: impl FnOnce(&Path) -> T) -> T {
    let mp = d.new_mountpoint("ro");
    let m = d.mount(snap, &mp);
    let r = f(&m.path);
    m.umount();
    r
}

/// Expects exit 1 and a `vdbfs: error:` line; returns stderr.
#[track_caller]
fn expect_error(d: &Daemon, args: &[&str]) -> String {
    let out = d.vdbfs(args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.code() == Some(1) && err.starts_with("vdbfs: error: "),
        "`vdbfs {}` should fail with exit 1 and a 'vdbfs: error:' line\n{}",
        args.join(" "),
        describe(&out)
    );
    err
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL

fn pg_md5(pg: &Postgres, sql: &str) -> String {
    pg.psql(sql)
}

const MARKER_MD5: &str =
    "SELECT md5(string_agg(id || ':' || v || ':' || n, ',' ORDER BY id)) FROM marker";

// A snapshot of a running postgres (after CHECKPOINT) gives two writable clones that each start
// (recovering from the crash-consistent image), run their own pgbench workload, and pass
// pg_amcheck; neither sees the other's changes, the original's rows are untouched, and the
// snapshot mounted read-only still holds, byte for byte, the files it was taken with.
#[test]
fn postgres_snapshot_gives_independent_clones() {
    require_root_fuse_postgres();
    let d = Daemon::start();
    let m = d.create_and_mount("pg");
    let mut pg = Postgres::initdb(&m.join("pgdata"));
    pg.start();
    pg.pgbench(&["-i", "-s", "10", "-q"]);
    pg.psql("CREATE EXTENSION IF NOT EXISTS amcheck");
    pg.psql(
        "CREATE TABLE marker (id int PRIMARY KEY, v text NOT NULL, n int NOT NULL DEFAULT 0); \
         INSERT INTO marker (id, v) SELECT g, 'original' FROM generate_series(1, 100) g",
    );
    let marker_before = pg_md5(&pg, MARKER_MD5);
    let accounts_before = pg.psql("SELECT sum(abalance) FROM pgbench_accounts");
    pg.psql("CHECKPOINT");

    let out = d.ok(&["snapshot", "create", "pg", "--name", "base"]);
    assert!(
        out.starts_with("created snapshot pg@base in "),
        "unexpected snapshot output: {out:?}"
    );
    eprintln!("snapshot of a running postgres, scale 10: {out}");

    // The frozen image, before anything runs on a clone.
    let snap_mp = d.new_mountpoint("pg-base");
    let snap = d.mount("pg@base", &snap_mp);
    let frozen = hash_tree(&snap.join("pgdata"));
    assert!(frozen.contains_key("PG_VERSION") && frozen.len() > 500);
    let e = fs::write(snap.join("pgdata/should-not-exist"), b"x").unwrap_err();
    assert_eq!(
        e.raw_os_error(),
        Some(libc::EROFS),
        "writing into a snapshot mount: {e}"
    );

    let mut clones = Vec::new();
    for name in ["pgc1", "pgc2"] {
        let out = d.ok(&["clone", "pg@base", name]);
        eprintln!("{}", out.trim());
        let ms = reported_ms(&out);
        assert!(ms < 5000.0, "clone took {ms} ms");
        let cm = d.mount(name, &d.new_mountpoint(name));
        assert_eq!(
            hash_tree(&cm.join("pgdata")),
            frozen,
            "clone {name} does not start as an exact copy of the snapshot"
        );
        // The image is of a running server: its postmaster.pid names the original's postmaster,
        // which is alive. A control plane removes it before starting a clone.
        fs::remove_file(cm.join("pgdata/postmaster.pid")).unwrap();
        let mut cpg = Postgres::on(&cm.join("pgdata"));
        cpg.start();
        clones.push((cm, cpg));
    }

    let script_dir = util::tempdir("vdbfs-pgbench-script-");
    let script = script_dir.path().join("marker.sql");
    fs::write(
        &script,
        "\\set id random(1, 100)\nUPDATE marker SET v = 'clone2', n = n + 1 WHERE id = :id;\n",
    )
    .unwrap();
    util::chmod(&script, 0o644);
    let (pg1, pg2) = (&clones[0].1, &clones[1].1);
    thread::scope(|s| {
        let a = s.spawn(|| pg1.pgbench(&["-c", "2", "-j", "1", "-T", "15", "-n"]));
        let b = s.spawn(|| {
            pg2.pgbench(&[
                "-c",
                "2",
                "-j",
                "1",
                "-T",
                "15",
                "-n",
                "-f",
                script.to_str().unwrap(),
            ])
        });
        let (a, b) = (a.join().unwrap(), b.join().unwrap());
        for out in [&a, &b] {
            assert!(
                out.contains("number of failed transactions: 0"),
                "pgbench on a clone had failures:\n{out}"
            );
        }
    });

    // Each clone has its own changes and only those.
    assert_ne!(pg1.psql("SELECT count(*) FROM pgbench_history"), "0");
    assert_eq!(
        pg_md5(pg1, MARKER_MD5),
        marker_before,
        "clone 1 sees clone 2's updates"
    );
    assert_eq!(
        pg2.psql("SELECT count(*) FROM pgbench_history"),
        "0",
        "clone 2 sees clone 1's transactions"
    );
    assert_ne!(
        pg2.psql("SELECT count(*) FROM marker WHERE v = 'clone2'"),
        "0"
    );
    assert_eq!(
        pg2.psql("SELECT sum(abalance) FROM pgbench_accounts"),
        accounts_before
    );
    pg1.amcheck();
    pg2.amcheck();

    // The original is unaffected.
    assert_eq!(
        pg_md5(&pg, MARKER_MD5),
        marker_before,
        "the original's marker rows changed"
    );
    assert_eq!(pg.psql("SELECT count(*) FROM pgbench_history"), "0");
    assert_eq!(
        pg.psql("SELECT sum(abalance) FROM pgbench_accounts"),
        accounts_before
    );

    // The snapshot still holds the old files, exactly.
    assert_eq!(
        hash_tree(&snap.join("pgdata")),
        frozen,
        "the snapshot's files changed after its clones ran"
    );
    for (cm, mut cpg) in clones.drain(..).rev() {
        cpg.stop();
        drop(cm);
    }
    pg.stop();
    snap.umount();
}

// ---------------------------------------------------------------------------------------------
// delete a snapshot with live clones, gc, df

// A snapshot can be deleted while clones of it exist: after `vdbfs gc` the clones still read
// every byte, and `vdbfs df --json` shows the space of data that only deleted things referenced
// as returned: the snapshot holding it lists it as unique bytes before, live bytes drop by it
// after gc, and (once its pack is no longer the one being appended to) the pack files shrink.
#[test]
fn deleting_a_snapshot_keeps_clones_and_gc_returns_space() {
    const MIB: usize = 1 << 20;
    let mut d = Daemon::start();
    let mut rng = StdRng::seed_from_u64(3);
    let m = d.create_and_mount("src");
    let mp = m.path.clone();
    let mut src = Files::new();
    for (name, size) in [("a", 8 * MIB), ("b", 8 * MIB)] {
        let data = random_bytes(&mut rng, size);
        write_synced(&m.join(name), &data);
        src.insert(name.to_string(), data);
    }
    d.ok(&["snapshot", "create", "src", "--name", "s1"]);
    d.ok(&["clone", "src@s1", "c1"]);
    let c1m = d.mount("c1", &d.new_mountpoint("c1"));
    let mut c1 = src.clone();
    let patch = random_bytes(&mut rng, 3 * BS);
    pwrite_synced(&c1m.join("a"), 5 * BS as u64, &patch);
    apply_write(c1.get_mut("a").unwrap(), 5 * BS, &patch);
    drop(c1m);

    // New data in src that only a second snapshot will keep.
    let big = random_bytes(&mut rng, 32 * MIB);
    write_synced(&m.join("c"), &big);
    d.ok(&["snapshot", "create", "src", "--name", "s2"]);
    fs::remove_file(m.join("c")).unwrap();
    fs::remove_file(m.join("a")).unwrap();
    src.remove("a");
    let df0 = df(&d);
    eprintln!("df before: {df0}");
    let s2 = df_root(&df0, "src@s2");
    assert_eq!(s2["kind"], "snapshot");
    assert_eq!(df_root(&df0, "c1")["kind"], "dataset");
    assert!(
        u(s2, "unique_bytes") >= 32 * MIB as u64,
        "src@s2 alone holds the 32 MiB file c, but df says its unique bytes are {}",
        u(s2, "unique_bytes")
    );
    assert!(u(s2, "logical_bytes") >= 48 * MIB as u64);

    let out = d.ok(&["snapshot", "delete", "src@s2"]);
    eprintln!("{}", out.trim());
    d.ok(&["snapshot", "delete", "src@s1"]);
    assert!(snapshot_names(&d, None).is_empty());
    let out = d.ok(&["gc"]);
    eprintln!("gc: {}", out.trim());
    assert!(out.starts_with("freed "), "unexpected gc output: {out:?}");
    let df1 = df(&d);
    eprintln!("df after delete + gc: {df1}");
    assert!(
        u(&df1, "live_stored_bytes") + 32 * MIB as u64 <= u(&df0, "live_stored_bytes"),
        "live bytes did not drop by the 32 MiB only the deleted snapshot held: {} -> {}",
        u(&df0, "live_stored_bytes"),
        u(&df1, "live_stored_bytes")
    );
    // c1 now alone holds file a (src deleted it, s1 is gone).
    assert!(
        u(df_root(&df1, "c1"), "unique_bytes") >= 8 * MIB as u64,
        "c1 is the only holder of file a now: {df1}"
    );
    let c1m = d.mount("c1", &d.new_mountpoint("c1"));
    assert_tree(
        &c1m.path,
        &c1,
        "clone c1 after its snapshot was deleted and gc",
        &d,
    );
    assert_tree(&mp, &src, "dataset src after gc", &d);
    drop(c1m);

    // The pack the garbage was appended to is closed by a restart; gc then rewrites it.
    d.restart();
    d.wait_mounted(&mp, Duration::from_secs(15));
    let out = d.ok(&["gc"]);
    eprintln!("gc after restart: {}", out.trim());
    let df2 = df(&d);
    eprintln!("df after restart + gc: {df2}");
    assert!(
        u(&df2, "physical_bytes") + 24 * MIB as u64 <= u(&df0, "physical_bytes"),
        "pack files did not shrink after deleting 32 MiB that nothing references and gc: {} -> {} \
         (gc said: {})",
        u(&df0, "physical_bytes"),
        u(&df2, "physical_bytes"),
        out.trim()
    );
    let c1m = d.mount("c1", &d.new_mountpoint("c1"));
    assert_tree(&c1m.path, &c1, "clone c1 after pack rewrite", &d);
    assert_tree(&mp, &src, "dataset src after pack rewrite", &d);
    drop(c1m);
    drop(m);
}

// ---------------------------------------------------------------------------------------------
// GC under concurrency

/// Files written by one writer thread: name -> content, updated after each fsync.
struct Writers {
    files: Mutex<Files>,
    /// Writers hold it shared for each write+fsync; a snapshot takes it exclusively.
    gate: RwLock<()>,
    stop: AtomicBool,
    ops: AtomicUsize,
}

struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

fn writer_loop(w: &Writers, dir: &Path, id: usize, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let names: Vec<String> = (0..4).map(|k| format!("w{id}-{k}")).collect();
    while !w.stop.load(Ordering::SeqCst) {
        let name = &names[rng.gen_range(0..names.len())];
        let path = dir.join(name);
        let _g = w
            .gate
            .read()
            .unwrap_or_else(|_| panic!("another thread failed; see its panic above"));
        let f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        if rng.gen_bool(0.1) {
            let len = rng.gen_range(0..48) * BS as u64 + rng.gen_range(0..BS as u64);
            f.set_len(len)
                .and_then(|_| f.sync_all())
                .unwrap_or_else(|e| {
                    panic!("writer {id}: truncate {name} to {len} while gc runs: {e}")
                });
            w.files
                .lock()
                .unwrap()
                .entry(name.clone())
                .or_default()
                .resize(len as usize, 0);
        } else {
            let off = rng.gen_range(0..48) * BS;
            let nblocks = rng.gen_range(1..9);
            let data = gen_blocks(&mut rng, nblocks);
            f.write_all_at(&data, off as u64)
                .and_then(|_| f.sync_all())
                .unwrap_or_else(|e| {
                    panic!("writer {id}: write {name} at {off} while gc runs: {e}")
                });
            apply_write(
                w.files.lock().unwrap().entry(name.clone()).or_default(),
                off,
                &data,
            );
        }
        w.ops.fetch_add(1, Ordering::Relaxed);
    }
}

// GC never frees what a concurrent write, snapshot or clone needs: writers keep writing and
// overwriting files (half of the blocks repeat, so writes deduplicate against stored blocks)
// while snapshots and clones are taken and deleted and `vdbfs gc` runs in a loop; afterwards
// the dataset, every snapshot (mounted read-only) and every clone read back exactly what was
// written, before and after a daemon restart, with no EIO anywhere.
#[test]
fn gc_under_concurrent_writes_snapshots_and_clones_frees_nothing_live() {
    let mut d = Daemon::start();
    let m = d.create_and_mount("w");
    let mp = m.path.clone();
    let w = Writers {
        files: Mutex::new(Files::new()),
        gate: RwLock::new(()),
        stop: AtomicBool::new(false),
        ops: AtomicUsize::new(0),
    };
    let mut snaps: BTreeMap<String, Files> = BTreeMap::new();
    let mut clones: BTreeMap<String, (Mount, Files)> = BTreeMap::new();
    let gc_runs = AtomicUsize::new(0);
    let duration = Duration::from_secs(20);
    let mut rng = StdRng::seed_from_u64(7);
    thread::scope(|s| {
        // Whatever fails, the other threads stop, so the scope ends.
        let _stop = StopOnDrop(&w.stop);
        let writers: Vec<_> = (0..2)
            .map(|i| {
                let (w, mp) = (&w, &mp);
                s.spawn(move || writer_loop(w, mp, i, 100 + i as u64))
            })
            .collect();
        let gc = s.spawn(|| {
            while !w.stop.load(Ordering::SeqCst) {
                d.ok(&["gc"]);
                gc_runs.fetch_add(1, Ordering::Relaxed);
            }
        });
        let t0 = Instant::now();
        let mut n = 0;
        while t0.elapsed() < duration {
            thread::sleep(Duration::from_millis(rng.gen_range(100..500)));
            n += 1;
            let name = format!("s{n:03}");
            let expected = {
                let _g = w
                    .gate
                    .write()
                    .unwrap_or_else(|_| panic!("a writer failed; see its panic above"));
                d.ok(&["snapshot", "create", "w", "--name", &name]);
                w.files.lock().unwrap().clone()
            };
            snaps.insert(format!("w@{name}"), expected);
            if n % 3 == 0 {
                // A clone of an older snapshot, written to at once.
                let keys: Vec<String> = snaps.keys().cloned().collect();
                let from = keys[rng.gen_range(0..keys.len())].clone();
                let cname = format!("c{n:03}");
                d.ok(&["clone", &from, &cname]);
                let cm = d.mount(&cname, &d.new_mountpoint(&cname));
                let mut files = snaps[&from].clone();
                let data = gen_blocks(&mut rng, 4);
                write_synced(&cm.join("clone-only"), &data);
                files.insert("clone-only".into(), data);
                if let Some((fname, content)) = files.iter_mut().find(|(k, _)| k.starts_with('w')) {
                    let patch = gen_blocks(&mut rng, 2);
                    pwrite_synced(&cm.join(fname), 0, &patch);
                    apply_write(content, 0, &patch);
                }
                clones.insert(cname, (cm, files));
            }
            if n % 4 == 0 && snaps.len() > 3 {
                let keys: Vec<String> = snaps.keys().cloned().collect();
                let victim = keys[rng.gen_range(0..keys.len() - 1)].clone();
                d.ok(&["snapshot", "delete", &victim]);
                snaps.remove(&victim);
            }
        }
        w.stop.store(true, Ordering::SeqCst);
        for t in writers {
            t.join().unwrap();
        }
        gc.join().unwrap();
    });
    eprintln!(
        "{} writes, {} gc runs, {} snapshots kept, {} clones",
        w.ops.load(Ordering::Relaxed),
        gc_runs.load(Ordering::Relaxed),
        snaps.len(),
        clones.len()
    );
    assert!(
        gc_runs.load(Ordering::Relaxed) >= 3,
        "gc ran too rarely to test anything"
    );
    let files = w.files.into_inner().unwrap();

    let verify = |d: &Daemon, when: &str| {
        assert_tree(&mp, &files, &format!("dataset w {when}"), d);
        for (name, want) in &snaps {
            with_snapshot_mounted(d, name, |p| {
                assert_tree(p, want, &format!("snapshot {name} {when}"), d)
            });
        }
        for (name, (cm, want)) in &clones {
            assert_tree(&cm.path, want, &format!("clone {name} {when}"), d);
        }
    };
    verify(&d, "after concurrent gc");
    d.ok(&["gc"]);
    d.restart();
    d.wait_mounted(&mp, Duration::from_secs(15));
    for (cm, _) in clones.values() {
        d.wait_mounted(&cm.path, Duration::from_secs(15));
    }
    d.ok(&["gc"]);
    verify(&d, "after a restart and another gc");
    assert!(
        !d.log().contains("corrupt block"),
        "the daemon logged a corrupt block:\n{}",
        d.log_tail(40)
    );
    drop(clones);
    drop(m);
}

// ---------------------------------------------------------------------------------------------
// crash during snapshot creation and during gc

/// A fixed-size file per writer slot, rewritten block by block, fsync after each write.
/// `acked` is the state after the last fsync that returned; `pending` the write in flight.
struct CrashWriter {
    acked: Mutex<Files>,
    pending: Mutex<Option<(String, usize, Vec<u8>)>>,
    gate: RwLock<()>,
    stop: AtomicBool,
}

const CRASH_FILE_BLOCKS: usize = 64;

fn crash_writer_loop(w: &CrashWriter, dir: &Path, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let names: Vec<String> = w.acked.lock().unwrap().keys().cloned().collect();
    while !w.stop.load(Ordering::SeqCst) {
        let name = names[rng.gen_range(0..names.len())].clone();
        let off = rng.gen_range(0..CRASH_FILE_BLOCKS - 8) * BS;
        let nblocks = rng.gen_range(1..8);
        let data = gen_blocks(&mut rng, nblocks);
        let _g = w.gate.read().unwrap();
        *w.pending.lock().unwrap() = Some((name.clone(), off, data.clone()));
        let r = fs::OpenOptions::new()
            .write(true)
            .open(dir.join(&name))
            .and_then(|f| {
                f.write_all_at(&data, off as u64)?;
                f.sync_all()
            });
        if r.is_err() {
            return; // the daemon died: the write stays pending
        }
        apply_write(w.acked.lock().unwrap().get_mut(&name).unwrap(), off, &data);
        *w.pending.lock().unwrap() = None;
    }
}

/// After a crash, each block of each file holds either its acknowledged content or what the
/// write in flight put there.
fn assert_after_crash(d: &Daemon, dir: &Path, w: &CrashWriter, when: &str) -> Files {
    let got = read_tree(dir);
    let acked = w.acked.lock().unwrap().clone();
    let pending = w.pending.lock().unwrap().clone();
    let mut now = acked.clone();
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        acked.keys().collect::<Vec<_>>(),
        "{when}: the dataset's files changed"
    );
    for (name, content) in &acked {
        let g = &got[name];
        assert_eq!(g.len(), content.len(), "{when}: size of {name}");
        for b in 0..content.len() / BS {
            let r = b * BS..(b + 1) * BS;
            if g[r.clone()] == content[r.clone()] {
                continue;
            }
            let from_pending = pending.as_ref().is_some_and(|(pn, off, data)| {
                pn == name
                    && r.start >= *off
                    && r.end <= off + data.len()
                    && g[r.clone()] == data[r.start - off..r.end - off]
            });
            assert!(
                from_pending,
                "{when}: block {b} of {name} is neither the acknowledged content nor the write in \
                 flight\ndaemon log tail:\n{}",
                d.log_tail(40)
            );
            now.get_mut(name).unwrap()[r.clone()].copy_from_slice(&g[r]);
        }
    }
    now
}

// `kill -9` of the daemon while snapshots are being created (in a loop, with a writer running)
// and while `vdbfs gc` runs (after deleting snapshots and overwriting data, so that it frees
// blocks and rewrites packs): after each restart, every snapshot that was acknowledged is listed,
// every listed snapshot is whole (it reads exactly what was written before it), and nothing that
// a dataset, snapshot or clone references was freed (everything reads back, also after another
// gc).
#[test]
fn kill9_during_snapshot_creation_and_gc_loses_nothing_referenced() {
    let seed: u64 = std::env::var("VDBFS_SNAP_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(11);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut d = Daemon::start();
    let m = d.create_and_mount("c");
    let mp = m.path.clone();
    let w = CrashWriter {
        acked: Mutex::new(Files::new()),
        pending: Mutex::new(None),
        gate: RwLock::new(()),
        stop: AtomicBool::new(false),
    };
    for k in 0..4 {
        let data = gen_blocks(&mut rng, CRASH_FILE_BLOCKS);
        write_synced(&m.join(&format!("f{k}")), &data);
        w.acked.lock().unwrap().insert(format!("f{k}"), data);
    }
    // Every snapshot attempted: name -> (expected content, acknowledged).
    let mut snaps: BTreeMap<String, (Files, bool)> = BTreeMap::new();
    let mut clones: BTreeMap<String, (PathBuf, Files)> = BTreeMap::new();
    let mut n = 0usize;

    // Part 1: kill -9 while snapshots are created in a loop.
    for round in 0..3 {
        let pid = d.pid().unwrap() as i32;
        let kill_after = Duration::from_millis(rng.gen_range(300..2500));
        let attempted: Mutex<Vec<(String, Files, bool)>> = Mutex::new(Vec::new());
        let start_n = n;
        thread::scope(|s| {
            let writer = s.spawn(|| crash_writer_loop(&w, &mp, seed * 100 + round));
            let snapper = s.spawn(|| {
                let mut k = start_n;
                loop {
                    k += 1;
                    let name = format!("s{k:03}");
                    let _g = w.gate.write().unwrap();
                    let expected = w.acked.lock().unwrap().clone();
                    attempted
                        .lock()
                        .unwrap()
                        .push((name.clone(), expected, false));
                    let out = d.vdbfs(&["snapshot", "create", "c", "--name", &name]);
                    if !out.status.success() {
                        break;
                    }
                    attempted.lock().unwrap().last_mut().unwrap().2 = true;
                    drop(_g);
                    thread::sleep(Duration::from_millis(20));
                }
            });
            thread::sleep(kill_after);
            util::signal(pid, libc::SIGKILL);
            w.stop.store(true, Ordering::SeqCst);
            writer.join().unwrap();
            snapper.join().unwrap();
        });
        w.stop.store(false, Ordering::SeqCst);
        d.kill9();
        let attempted = attempted.into_inner().unwrap();
        n += attempted.len();
        eprintln!(
            "round {round}: killed after {kill_after:?}, {} snapshots attempted, {} acknowledged",
            attempted.len(),
            attempted.iter().filter(|a| a.2).count()
        );
        for (name, files, acked) in attempted {
            snaps.insert(format!("c@{name}"), (files, acked));
        }
        d.start_again();
        d.wait_mounted(&mp, Duration::from_secs(15));
        for (p, _) in clones.values() {
            d.wait_mounted(p, Duration::from_secs(15));
        }
        let now = assert_after_crash(&d, &mp, &w, &format!("snapshot round {round}"));
        *w.acked.lock().unwrap() = now;
        *w.pending.lock().unwrap() = None;
        // Unacknowledged snapshots that did not make it are gone for good.
        let listed = snapshot_names(&d, Some("c"));
        snaps.retain(|k, (_, acked)| *acked || listed.contains(k));
        verify_crash(
            &d,
            &snaps,
            &clones,
            &format!("after kill -9 in snapshot round {round}"),
        );
        // A clone of a random surviving snapshot, with its own write.
        let keys: Vec<String> = snaps.keys().cloned().collect();
        if !keys.is_empty() {
            let from = &keys[rng.gen_range(0..keys.len())];
            let cname = format!("k{round}");
            d.ok(&["clone", from, &cname]);
            let cp = d.new_mountpoint(&cname);
            let cm = d.mount(&cname, &cp);
            let mut files = snaps[from].0.clone();
            let patch = gen_blocks(&mut rng, 2);
            pwrite_synced(&cm.join("f0"), 0, &patch);
            apply_write(files.get_mut("f0").unwrap(), 0, &patch);
            std::mem::forget(cm); // the daemon re-establishes it; Daemon's drop unmounts it
            clones.insert(cname, (cp, files));
        }
    }
    // Part 2: kill -9 while gc runs.
    for round in 0..3 {
        // Garbage: delete most snapshots, overwrite every file of the dataset.
        let keys: Vec<String> = snaps.keys().cloned().collect();
        for k in keys.iter().take(keys.len().saturating_sub(2)) {
            if rng.gen_bool(0.7) {
                d.ok(&["snapshot", "delete", k]);
                snaps.remove(k);
            }
        }
        for (name, content) in w.acked.lock().unwrap().iter_mut() {
            let data = gen_blocks(&mut rng, CRASH_FILE_BLOCKS);
            pwrite_synced(&mp.join(name), 0, &data);
            *content = data;
        }
        let name = format!("g{round}");
        d.ok(&["snapshot", "create", "c", "--name", &name]);
        snaps.insert(format!("c@{name}"), (w.acked.lock().unwrap().clone(), true));
        // Close the current pack so gc has packs to rewrite.
        d.restart();
        d.wait_mounted(&mp, Duration::from_secs(15));
        for (name, content) in w.acked.lock().unwrap().iter_mut() {
            let data = gen_blocks(&mut rng, CRASH_FILE_BLOCKS / 2);
            pwrite_synced(&mp.join(name), 0, &data);
            apply_write(content, 0, &data);
        }
        let pid = d.pid().unwrap() as i32;
        let kill_after = Duration::from_millis(rng.gen_range(5..200));
        let gc_out = thread::scope(|s| {
            let gc = s.spawn(|| d.vdbfs(&["gc"]));
            thread::sleep(kill_after);
            util::signal(pid, libc::SIGKILL);
            gc.join().unwrap()
        });
        d.kill9();
        eprintln!(
            "gc round {round}: killed after {kill_after:?}; gc {}",
            if gc_out.status.success() {
                format!(
                    "had finished: {}",
                    String::from_utf8_lossy(&gc_out.stdout).trim()
                )
            } else {
                "was interrupted".to_string()
            }
        );
        d.start_again();
        d.wait_mounted(&mp, Duration::from_secs(15));
        for (p, _) in clones.values() {
            d.wait_mounted(p, Duration::from_secs(15));
        }
        let when = format!("after kill -9 during gc round {round}");
        assert_tree(
            &mp,
            &w.acked.lock().unwrap(),
            &format!("{when}: dataset c"),
            &d,
        );
        verify_crash(&d, &snaps, &clones, &when);
        let out = d.ok(&["gc"]);
        eprintln!("gc after restart: {}", out.trim());
        let when = format!("{when}, then a full gc");
        assert_tree(
            &mp,
            &w.acked.lock().unwrap(),
            &format!("{when}: dataset c"),
            &d,
        );
        verify_crash(&d, &snaps, &clones, &when);
    }
    drop(m);

    /// The snapshot list is exactly `snaps`; every snapshot and clone reads what it should.
    fn verify_crash(
        d: &Daemon,
        snaps: &BTreeMap<String, (Files, bool)>,
        clones: &BTreeMap<String, (PathBuf, Files)>,
        when: &str,
    ) {
        let listed = snapshot_names(d, Some("c"));
        let mut want: Vec<&String> = snaps.keys().collect();
        want.sort();
        let mut got: Vec<&String> = listed.iter().collect();
        got.sort();
        assert_eq!(got, want, "{when}: snapshot list");
        for (name, (files, _)) in snaps {
            with_snapshot_mounted(d, name, |p| {
                assert_tree(p, files, &format!("{when}: snapshot {name}"), d)
            });
        }
        for (name, (p, files)) in clones {
            assert_tree(p, files, &format!("{when}: clone {name}"), d);
        }
    }
    snaps.clear();
}

// ---------------------------------------------------------------------------------------------
// names

// Dataset and snapshot names are checked with a clear error (exit 1): no '/', no '@' in a
// dataset name, no '..', at most 64 characters, not empty. The full name `dataset@snapshot`
// that `snapshot list --json` prints works as-is in `clone`, `mount` and `snapshot delete`;
// unnamed snapshots get names that sort in creation order.
#[test]
fn names_are_checked_and_full_snapshot_names_work_everywhere() {
    let d = Daemon::start();
    let long = "x".repeat(65);
    for bad in ["a/b", "a@b", "..", long.as_str(), ""] {
        let err = expect_error(&d, &["dataset", "create", bad]);
        assert!(
            err.contains("invalid") || err.contains("name"),
            "dataset create {bad:?}: the error does not say the name is the problem: {err}"
        );
    }
    assert!(
        !d.ok(&["dataset", "list", "--json"]).contains("a/b"),
        "an invalid dataset was created"
    );
    // 64 characters is fine.
    let ok64 = "y".repeat(64);
    d.ok(&["dataset", "create", &ok64]);
    let m = d.create_and_mount("n");
    write_synced(&m.join("file"), b"version 1");
    for bad in ["a/b", "a@b", "..", long.as_str(), ""] {
        let err = expect_error(&d, &["snapshot", "create", "n", "--name", bad]);
        assert!(
            err.contains("invalid") || err.contains("name"),
            "snapshot create --name {bad:?}: unclear error: {err}"
        );
    }
    expect_error(&d, &["snapshot", "create", "no-such-dataset"]);
    d.ok(&["snapshot", "create", "n", "--name", "v1"]);
    let err = expect_error(&d, &["snapshot", "create", "n", "--name", "v1"]);
    assert!(err.contains("n@v1"), "duplicate snapshot error: {err}");

    // Unnamed snapshots: sortable names, list oldest first.
    let mut unnamed = Vec::new();
    for i in 0..3 {
        write_synced(&m.join("file"), format!("unnamed {i}").as_bytes());
        let out = d.ok(&["snapshot", "create", "n"]);
        let full = out
            .strip_prefix("created snapshot ")
            .and_then(|r| r.split_whitespace().next())
            .unwrap_or_else(|| panic!("unexpected output {out:?}"))
            .to_string();
        assert!(full.starts_with("n@"), "{full}");
        unnamed.push(full);
        thread::sleep(Duration::from_millis(15));
    }
    let mut sorted = unnamed.clone();
    sorted.sort();
    assert_eq!(
        sorted, unnamed,
        "unnamed snapshot names do not sort in creation order"
    );
    let s = d.ok(&["snapshot", "list", "n", "--json"]);
    let list: serde_json::Value = serde_json::from_str(&s).unwrap();
    let list = list.as_array().unwrap();
    let names: Vec<&str> = list.iter().map(|e| e["name"].as_str().unwrap()).collect();
    let mut want = vec!["n@v1"];
    want.extend(unnamed.iter().map(String::as_str));
    assert_eq!(
        names, want,
        "snapshot list is not oldest first with full names"
    );
    for e in list {
        assert_eq!(e["dataset"], "n");
        assert_eq!(
            format!("n@{}", e["snapshot"].as_str().unwrap()),
            e["name"].as_str().unwrap()
        );
        assert!(e["created"].as_str().is_some() && e["created_unix_ms"].as_i64().is_some());
    }
    let ms: Vec<i64> = list
        .iter()
        .map(|e| e["created_unix_ms"].as_i64().unwrap())
        .collect();
    assert!(ms.windows(2).all(|w| w[0] <= w[1]), "{ms:?}");

    // Full names from the listing work as-is.
    let second = names[2].to_string();
    d.ok(&["clone", &second, "from-list"]);
    let cm = d.mount("from-list", &d.new_mountpoint("from-list"));
    assert_eq!(fs::read(cm.join("file")).unwrap(), b"unnamed 1");
    with_snapshot_mounted(&d, names[0], |p| {
        assert_eq!(fs::read(p.join("file")).unwrap(), b"version 1")
    });
    d.ok(&["snapshot", "delete", names[1]]);
    assert!(!snapshot_names(&d, Some("n")).contains(&names[1].to_string()));

    // Clearly refused.
    for bad in ["n", "n@", "@v1"] {
        expect_error(&d, &["snapshot", "delete", bad]);
        expect_error(&d, &["clone", bad, "zz"]);
    }
    expect_error(&d, &["snapshot", "delete", "n@no-such"]);
    for bad in ["a/b", "a@b", "..", long.as_str(), ""] {
        expect_error(&d, &["clone", "n@v1", bad]);
    }
    let err = expect_error(&d, &["clone", "n@v1", "from-list"]);
    assert!(err.contains("already exists"), "{err}");
    // A mounted dataset cannot be deleted; one with snapshots needs --with-snapshots.
    let err = expect_error(&d, &["dataset", "delete", "n"]);
    assert!(err.contains("mounted"), "{err}");
    m.umount();
    let err = expect_error(&d, &["dataset", "delete", "n"]);
    assert!(err.contains("--with-snapshots"), "{err}");
    d.ok(&["dataset", "delete", "n", "--with-snapshots"]);
    assert!(snapshot_names(&d, None).is_empty());
    // The clone outlives its origin.
    assert_eq!(fs::read(cm.join("file")).unwrap(), b"unnamed 1");
    d.ok(&["gc"]);
    cm.umount();
    let cm = d.mount("from-list", &d.new_mountpoint("from-list"));
    assert_eq!(fs::read(cm.join("file")).unwrap(), b"unnamed 1");
}

// ---------------------------------------------------------------------------------------------
// clone depth

// Clones of clones work at any depth: a chain dataset -> clone -> clone -> clone -> clone, each
// level changing something (overwrite, new file, delete, truncate), reads correctly at every
// level, and keeps reading correctly after the intermediate snapshots and datasets are deleted
// and gc runs.
#[test]
fn clone_of_clone_of_clone_reads_correctly() {
    let d = Daemon::start();
    let mut rng = StdRng::seed_from_u64(5);
    let m0 = d.create_and_mount("l0");
    let mut want = Files::new();
    for k in 0..3 {
        let data = gen_blocks(&mut rng, 40);
        write_synced(&m0.join(&format!("f{k}")), &data);
        want.insert(format!("f{k}"), data);
    }
    let mut levels: Vec<(String, Mount, Files)> = vec![("l0".into(), m0, want)];
    for depth in 1..=4 {
        let (parent, pm, pwant) = levels.last().unwrap();
        let snap = format!("{parent}@s");
        d.ok(&["snapshot", "create", parent, "--name", "s"]);
        let name = format!("l{depth}");
        d.ok(&["clone", &snap, &name]);
        let cm = d.mount(&name, &d.new_mountpoint(&name));
        let mut w = pwant.clone();
        assert_tree(&cm.path, &w, &format!("{name} right after cloning"), &d);
        // The parent keeps changing after the snapshot: the clone must not see it.
        let p = gen_blocks(&mut rng, 1);
        pwrite_synced(&pm.join("f0"), 0, &p);
        let parent_f0 = p;
        match depth {
            1 => {
                let patch = gen_blocks(&mut rng, 3);
                pwrite_synced(&cm.join("f1"), 7 * BS as u64, &patch);
                apply_write(w.get_mut("f1").unwrap(), 7 * BS, &patch);
            }
            2 => {
                let data = gen_blocks(&mut rng, 5);
                write_synced(&cm.join("new"), &data);
                w.insert("new".into(), data);
            }
            3 => {
                fs::remove_file(cm.join("f2")).unwrap();
                w.remove("f2");
            }
            _ => {
                let f = fs::OpenOptions::new()
                    .write(true)
                    .open(cm.join("f1"))
                    .unwrap();
                f.set_len(10 * BS as u64 + 17).unwrap();
                f.sync_all().unwrap();
                w.get_mut("f1").unwrap().truncate(10 * BS + 17);
            }
        }
        let (_, _, pw) = levels.last_mut().unwrap();
        apply_write(pw.get_mut("f0").unwrap(), 0, &parent_f0);
        levels.push((name, cm, w));
    }
    for (name, mp, w) in &levels {
        assert_tree(&mp.path, w, &format!("level {name}"), &d);
    }
    // Drop the middle of the chain: snapshots first, then the datasets l1..l3.
    let deepest_want = levels.last().unwrap().2.clone();
    for (name, ..) in &levels[..4] {
        d.ok(&["snapshot", "delete", &format!("{name}@s")]);
    }
    let mut levels = levels;
    let deepest = levels.pop().unwrap();
    let l0 = levels.remove(0);
    for (name, mp, _) in levels {
        mp.umount();
        d.ok(&["dataset", "delete", &name]);
    }
    d.ok(&["gc"]);
    deepest.1.umount();
    let cm = d.mount("l4", &d.new_mountpoint("l4"));
    assert_tree(
        &cm.path,
        &deepest_want,
        "l4 after its ancestors were deleted and gc",
        &d,
    );
    assert_tree(&l0.1.path, &l0.2, "l0 after gc", &d);
}
