//! Stores on an S3-compatible object store (a real Garage node on loopback): two daemons with
//! separate local stores on one machine act as host A and host B. A publishes, B provisions
//! from what A published; blocks come by ranged GET and are verified like local ones.

use crate::util::garage::{Garage, BUCKET};
use crate::util::source::{link_small, SourceDb, Staged, WAIT};
use crate::util::vdb::{self as vdbu, Vdbd};
use crate::util::*;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use serde_json::Value;
use std::fs;
use std::process::Command;
use std::time::Duration;

fn remote_daemon(g: &Garage, prefix: &str) -> Daemon {
    Daemon::start_init(&g.init_args(prefix), &g.env())
}

/// Host B (a new store on `prefix` of the bucket) clones the published `data@s1` and reads its
/// file `f`: every byte is `data`.
fn host_b_reads_data_s1(g: &Garage, prefix: &str, data: &[u8]) {
    let b = remote_daemon(g, prefix);
    b.ok(&["clone", "data@s1", "copy"]);
    let mp = b.new_mountpoint("copy");
    let bm = b.mount("copy", &mp);
    assert!(
        fs::read(bm.join("f")).unwrap() == data,
        "B read other bytes than A wrote"
    );
}

fn json(d: &Daemon, args: &[&str]) -> Value {
    let s = d.ok(args);
    serde_json::from_str(&s).unwrap_or_else(|e| panic!("{args:?} printed no JSON ({e}): {s}"))
}

fn published_names(d: &Daemon) -> Vec<String> {
    json(d, &["remote", "list", "--json"])
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_string())
        .collect()
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// The pack objects under `prefix`, largest first.
fn pack_objects(g: &Garage, prefix: &str) -> Vec<(object_store::path::Path, u64)> {
    use futures::TryStreamExt;
    let c = g.client();
    let p = object_store::path::Path::from(format!("{prefix}/packs"));
    let mut v: Vec<(object_store::path::Path, u64)> = rt()
        .block_on(async { c.list(Some(&p)).try_collect::<Vec<_>>().await })
        .unwrap()
        .into_iter()
        .map(|m| (m.location, m.size))
        .collect();
    v.sort_by_key(|(_, s)| std::cmp::Reverse(*s));
    v
}

/// Host B provisions a VDB from the snapshot host A's source published: the VDB has A's rows
/// and passes pg_amcheck, though B's store never held a block of it before.
#[test]
fn host_b_provisions_a_vdb_from_host_a_s_published_source_snapshot() {
    let g = Garage::start();
    let src = SourceDb::start(false, &[]);
    src.insert_rows(1, 2000, "from host A source");
    let a = Vdbd {
        s: Staged {
            d: remote_daemon(&g, "team"),
        },
    };
    let st = link_small(&a, &src, "prod");
    let snap = st["last_snapshot"]["name"].as_str().unwrap().to_string();
    // Source snapshots are published by the daemon itself once their packs are up.
    assert!(
        wait_until(WAIT * 2, || published_names(&a).contains(&snap)),
        "host A did not publish {snap}; remote status: {}\nlog tail:\n{}",
        a.ok(&["remote", "status", "--json"]),
        a.log_tail(40)
    );
    let b = Vdbd {
        s: Staged {
            d: remote_daemon(&g, "team"),
        },
    };
    assert!(
        published_names(&b).contains(&snap),
        "host B's remote list lacks {snap}"
    );
    let human = b.ok(&["remote", "list"]);
    assert!(human.contains(&snap), "remote list: {human}");
    let dev = vdbu::create(&b, "dev1", &snap, &[]);
    assert_eq!(
        dev.sql("SELECT count(*), min(note) FROM marker"),
        "2000|from host A source"
    );
    dev.amcheck();
    let rs = json(&b, &["remote", "status", "--json"]);
    assert!(
        rs["fetched_blocks"].as_u64().unwrap() > 0,
        "B fetched nothing from the bucket: {rs}"
    );
    // No credential in any log or in the store's remote.json.
    let cfg = fs::read_to_string(b.store().join("remote.json")).unwrap();
    for (_, secret) in g.env() {
        assert!(!cfg.contains(&secret), "remote.json holds a credential");
        assert!(!a.log().contains(&secret), "A's log holds a credential");
        assert!(!b.log().contains(&secret), "B's log holds a credential");
    }
}

/// Writes `len` random bytes to `DATASET/f`, snapshots it as `s1` and publishes it.
fn publish_random_file(a: &Daemon, seed: u64, len: usize) -> Vec<u8> {
    let m = a.create_and_mount("data");
    let mut data = vec![0u8; len];
    StdRng::seed_from_u64(seed).fill_bytes(&mut data);
    fs::write(m.join("f"), &data).unwrap();
    a.ok(&["snapshot", "create", "data", "--name", "s1"]);
    let out = a.ok(&["snapshot", "publish", "data@s1"]);
    assert!(out.contains("published data@s1"), "publish said: {out}");
    data
}

/// A block whose object in the bucket was damaged is EIO on host B, with a log line naming
/// the object, never wrong bytes; blocks that verify still read.
#[test]
fn a_corrupted_pack_object_reads_as_eio_naming_the_object() {
    let g = Garage::start();
    let a = remote_daemon(&g, "dmg");
    let data = publish_random_file(&a, 16, 4 << 20);
    // Damage the biggest pack object (the file's data) in its middle.
    let (key, size) = pack_objects(&g, "dmg").into_iter().next().unwrap();
    let c = g.client();
    let r = rt();
    let mut bytes = r
        .block_on(async { c.get(&key).await.unwrap().bytes().await })
        .unwrap()
        .to_vec();
    assert_eq!(bytes.len() as u64, size);
    for b in &mut bytes[size as usize / 2..size as usize / 2 + 64] {
        *b ^= 0x5a;
    }
    r.block_on(async { c.put(&key, PutPayload::from(bytes)).await })
        .unwrap();

    let b = remote_daemon(&g, "dmg");
    b.ok(&["clone", "data@s1", "copy"]);
    let mp = b.new_mountpoint("copy");
    let m = b.mount("copy", &mp);
    let f = fs::File::open(m.join("f")).unwrap();
    let mut got = vec![0u8; data.len()];
    let mut bad = 0;
    let mut good = 0;
    for (i, chunk) in got.chunks_mut(8192).enumerate() {
        use std::os::unix::fs::FileExt;
        match f.read_exact_at(chunk, (i * 8192) as u64) {
            Ok(()) => {
                assert_eq!(
                    chunk,
                    &data[i * 8192..][..chunk.len()],
                    "block {i}: wrong bytes"
                );
                good += 1;
            }
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::EIO), "block {i}: {e}");
                bad += 1;
            }
        }
    }
    assert!(bad > 0, "no block read as EIO after the object was damaged");
    assert!(good > 0, "every block failed, not only the damaged ones");
    let log = b.log();
    assert!(
        log.contains("does not verify") && log.contains(key.as_ref()),
        "B's log does not name the damaged object {key}:\n{}",
        b.log_tail(30)
    );
    let _ = BUCKET;
}

/// With the object store down, local work goes on, uploads wait with backoff and `status`
/// shows the backlog; once it is back, the backlog drains, and a restart of the daemon
/// (kill -9 in the middle) loses nothing: B reads every byte A published.
#[test]
fn uploads_wait_out_an_object_store_outage_and_a_kill_9() {
    let mut g = Garage::start();
    let mut a = remote_daemon(&g, "outage");
    let m = a.create_and_mount("data");
    g.stop();
    let mut data = vec![0u8; 3 << 20];
    StdRng::seed_from_u64(7).fill_bytes(&mut data);
    fs::write(m.join("f"), &data).unwrap();
    a.ok(&["snapshot", "create", "data", "--name", "s1"]);
    let out = a.vdbfs(&["snapshot", "publish", "data@s1"]);
    assert!(
        !out.status.success(),
        "publish succeeded with the bucket down"
    );
    // Local work goes on: writes, snapshots.
    fs::write(m.join("g"), b"still writable").unwrap();
    a.ok(&["snapshot", "create", "data", "--name", "s2"]);
    let st = a.status_json();
    assert!(
        wait_until(Duration::from_secs(60), || {
            let st = a.status_json();
            st["remote"]["backlog_packs"].as_u64().unwrap_or(0) > 0
                && st["remote"]["last_error"].is_string()
        }),
        "status shows no backlog or failure with the bucket down: {st}"
    );
    // A crash with the backlog pending, then the bucket comes back.
    a.kill9();
    g.restart();
    a.start_again();
    assert!(
        wait_until(Duration::from_secs(120), || {
            let r = &a.status_json()["remote"];
            r["backlog_packs"].as_u64() == Some(0) && r["uploaded_packs"].as_u64() >= Some(1)
        }),
        "the backlog did not drain: {}",
        a.ok(&["remote", "status"])
    );
    a.ok(&["snapshot", "publish", "data@s1"]);
    host_b_reads_data_s1(&g, "outage", &data);
    drop(m);
}

/// kill -9 of host A while it uploads the packs of a publish: no manifest or a whole one is in
/// the bucket (never one naming a missing object); after a restart the publish completes and
/// host B reads every byte.
#[test]
fn kill_9_during_a_publish_leaves_no_half_published_snapshot() {
    let g = Garage::start();
    let mut a = remote_daemon(&g, "kill");
    let m = a.create_and_mount("data");
    let mut data = vec![0u8; 96 << 20];
    StdRng::seed_from_u64(9).fill_bytes(&mut data);
    fs::write(m.join("f"), &data).unwrap();
    a.ok(&["snapshot", "create", "data", "--name", "s1"]);
    let mut publish = a
        .command()
        .args(["snapshot", "publish", "data@s1"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    a.wait_log_since_start("uploading pack", Duration::from_secs(60));
    a.kill9();
    let _ = publish.wait();
    let manifest = object_store::path::Path::from("kill/manifests/data/s1.manifest");
    let c = g.client();
    let r = rt();
    match r.block_on(async { c.get(&manifest).await }) {
        Err(object_store::Error::NotFound { .. }) => {}
        Ok(got) => {
            // Published before the kill landed: it must be whole and name existing objects.
            let bytes = r.block_on(got.bytes()).unwrap();
            let (h, _) = vdbfs_format::manifest::decode(&bytes).unwrap();
            for (_, key) in h.objects {
                let p = object_store::path::Path::from(format!("kill/{key}"));
                r.block_on(async { c.head(&p).await })
                    .unwrap_or_else(|e| panic!("manifest names {key}, not in the bucket: {e}"));
            }
        }
        Err(e) => panic!("cannot look for the manifest: {e}"),
    }
    a.start_again();
    a.ok(&["snapshot", "publish", "data@s1"]);
    host_b_reads_data_s1(&g, "kill", &data);
    drop(m);
}

/// Host A's gc races its publishes (gc in a loop while snapshots are written, published and
/// deleted, so packs are compacted and deleted under the publishes): every publish that
/// succeeded names only objects in the bucket, and host B reads every byte of every published
/// snapshot after A deleted them and collected their blocks locally.
#[test]
fn host_a_s_gc_racing_its_publishes_never_removes_what_host_b_reads() {
    let g = Garage::start();
    let a = remote_daemon(&g, "gc");
    let m = a.create_and_mount("data");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let gc = {
        let stop = stop.clone();
        let mut cmd = a.command();
        cmd.arg("gc");
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let out = run_timeout(&mut cmd, Duration::from_secs(120));
                assert!(out.status.success(), "gc failed: {}", describe(&out));
                n += 1;
            }
            n
        })
    };
    let mut published = Vec::new();
    for i in 0..6u64 {
        let mut data = vec![0u8; 2 << 20];
        StdRng::seed_from_u64(100 + i).fill_bytes(&mut data);
        fs::write(m.join("f"), &data).unwrap();
        let snap = format!("s{i}");
        a.ok(&["snapshot", "create", "data", "--name", &snap]);
        a.ok(&["snapshot", "publish", &format!("data@{snap}")]);
        published.push((snap, data));
        if i > 0 {
            a.ok(&["snapshot", "delete", &format!("data@s{}", i - 1)]);
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let rounds = gc.join().unwrap();
    assert!(rounds > 0, "gc never ran");
    // The old file contents are garbage on A now: collect them for good.
    a.ok(&["gc"]);
    a.ok(&["gc"]);
    let b = remote_daemon(&g, "gc");
    for (snap, data) in &published {
        let name = format!("copy-{snap}");
        b.ok(&["clone", &format!("data@{snap}"), &name]);
        let mp = b.new_mountpoint(&name);
        let bm = b.mount(&name, &mp);
        assert!(
            fs::read(bm.join("f")).unwrap() == *data,
            "B read other bytes than A published in data@{snap}"
        );
        bm.umount();
    }
    drop(m);
}

/// The source of the cache tests: `big` holds about 24 MiB of rows that lz4 cannot shrink
/// much (hex digests), frozen (so reading it on a VDB sets no hint bits and writes nothing).
/// Returns the checksum of its rows, computed on the source.
fn big_source(src: &SourceDb) -> String {
    src.psql(
        "CREATE TABLE big AS SELECT g AS id, md5(g::text) || md5((-g)::text) || \
         md5((g * 3)::text) || md5((g * 5)::text) AS pad FROM generate_series(1, 150000) g",
    );
    src.psql("VACUUM (FREEZE) big");
    src.psql("CHECKPOINT");
    src.psql(BIG_SUM)
}

const BIG_SUM: &str = "SELECT count(*) || ':' || md5(string_agg(pad, '' ORDER BY id)) FROM big";

/// Bytes of the files in `dir` (not recursive).
fn dir_bytes(dir: &std::path::Path) -> u64 {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum()
}

/// Host A with source `prod` linked from `src` and its first snapshot published; returns the
/// daemon and the snapshot's name.
fn host_a_publishing(g: &Garage, prefix: &str, src: &SourceDb) -> (Vdbd, String) {
    let a = Vdbd {
        s: Staged {
            d: remote_daemon(g, prefix),
        },
    };
    let st = link_small(&a, src, "prod");
    let snap = st["last_snapshot"]["name"].as_str().unwrap().to_string();
    assert!(
        wait_until(WAIT * 2, || published_names(&a).contains(&snap)),
        "host A did not publish {snap}; remote status: {}\nlog tail:\n{}",
        a.ok(&["remote", "status", "--json"]),
        a.log_tail(40)
    );
    (a, snap)
}

/// Host B on `prefix` with a `--cache-size` of `cache`.
fn host_b_with_cache(g: &Garage, prefix: &str, cache: &str) -> Vdbd {
    let mut args = g.init_args(prefix);
    args.extend(["--cache-size".to_string(), cache.to_string()]);
    Vdbd {
        s: Staged {
            d: Daemon::start_init(&args, &g.env()),
        },
    }
}

/// Host B, whose cache (4 MiB) is a fraction of the data it reads (a VDB of host A's
/// snapshot, about 24 MiB in one table plus the catalogs), reads all of it right (the table's
/// checksum equals the source's, pg_amcheck passes), twice, while its cache stays within the
/// bound: in `status`, and on disk (the cache directory holds at most the limit, no slack: a
/// segment counts whole from its creation). Fetched blocks are not B's: they do not go into
/// B's log (the live bytes B's index holds, `df`'s `live_stored_bytes`, grow by less than half
/// of what the scan fetched: slack for B's own writes; pack file sizes would not tell, the
/// active pack is zero-filled 16 MiB ahead), so B's uploader, which uploads B's packs only,
/// never uploads them again.
#[test]
fn host_b_reads_a_snapshot_larger_than_its_cache_within_the_bound() {
    const LIMIT: u64 = 4 << 20;
    let g = Garage::start();
    let src = SourceDb::start(false, &[]);
    src.insert_rows(1, 100, "cache");
    let want = big_source(&src);
    let (_a, snap) = host_a_publishing(&g, "cache", &src);
    let mut b = host_b_with_cache(&g, "cache", "4M");
    let dev = vdbu::create(&b, "dev1", &snap, &[]);
    // Provisioning wrote B's own blocks (WAL); from here on the scan only reads.
    let fetched0 = json(&b, &["remote", "status", "--json"])["fetched_bytes"]
        .as_u64()
        .unwrap();
    let stored = |b: &Daemon| {
        json(b, &["df", "--json"])["live_stored_bytes"]
            .as_u64()
            .unwrap()
    };
    let stored_before = stored(&b);
    assert_eq!(
        dev.sql(BIG_SUM),
        want,
        "B's VDB has other rows than the source"
    );
    dev.amcheck();
    let within = |b: &Daemon, what: &str| -> Value {
        let rs = json(b, &["remote", "status", "--json"]);
        let c = &rs["cache"];
        assert_eq!(c["limit"].as_u64(), Some(LIMIT), "{what}: {rs}");
        assert!(
            c["bytes"].as_u64().unwrap() <= LIMIT,
            "{what}: over the limit: {rs}"
        );
        let disk = dir_bytes(&b.store().join("cache"));
        assert!(
            disk <= LIMIT,
            "{what}: the cache directory holds {disk} bytes, more than {LIMIT}: {rs}"
        );
        rs
    };
    let rs = within(&b, "after the first full read");
    let fetched = rs["fetched_bytes"].as_u64().unwrap();
    assert!(
        fetched > 4 * LIMIT,
        "B fetched only {fetched} bytes: the test reads too little to turn the cache over: {rs}"
    );
    let own = stored(&b).saturating_sub(stored_before);
    let scanned = fetched - fetched0;
    assert!(
        own < scanned / 2,
        "B's indexed live blocks grew by {own} bytes while its scan fetched {scanned}: fetched \
         blocks went into its log"
    );
    let c = &rs["cache"];
    assert!(
        c["evictions"].as_u64().unwrap() > 0,
        "nothing evicted: {rs}"
    );
    assert!(c["misses"].as_u64().unwrap() > 0, "no misses: {rs}");
    // Again, with no copy in postgres's buffers or the kernel's page cache (B's daemon and
    // with it the VDB restarted; the cache is read back from its segments): what was evicted
    // is fetched again and verified.
    let old_pid = vdbu::status(&b, "dev1")["pid"].as_i64().unwrap();
    b.restart();
    assert!(
        wait_until(WAIT * 2, || {
            let s = vdbu::status(&b, "dev1");
            s["state"] == "running" && s["pid"].as_i64().is_some_and(|p| p != old_pid)
        }),
        "dev1 is not running again after B's restart: {}",
        vdbu::status(&b, "dev1")
    );
    assert_eq!(dev.sql(BIG_SUM), want, "B read other rows after eviction");
    let rs2 = within(&b, "after reading again");
    assert!(
        rs2["fetched_bytes"].as_u64().unwrap() > 2 * LIMIT,
        "the second read fetched little again: {rs2}"
    );
    // `status` shows the cache too, in JSON and for humans.
    let st = b.status_json();
    assert_eq!(st["remote"]["cache"]["limit"].as_u64(), Some(LIMIT), "{st}");
    let human = b.ok(&["remote", "status"]);
    assert!(
        human.contains("cache: ") && human.contains("of 4.0 MiB"),
        "{human}"
    );
    eprintln!("B fetched {fetched} B, its scan {scanned} B, its indexed live bytes grew by {own} B; {rs2}");
}

/// kill -9 of host B's daemon while a full scan turns its small cache over (right after an
/// eviction was logged): after a restart the VDB runs again and reads every row right; the
/// cache (read back from its segments) is within the bound.
#[test]
fn kill_9_of_host_b_during_evictions_loses_nothing() {
    let g = Garage::start();
    let src = SourceDb::start(false, &[]);
    let want = big_source(&src);
    let (_a, snap) = host_a_publishing(&g, "cachekill", &src);
    let mut b = host_b_with_cache(&g, "cachekill", "2M");
    let dev = vdbu::create(&b, "dev1", &snap, &[]);
    let old_pid = vdbu::status(&b, "dev1")["pid"].as_i64().unwrap();
    let evicted = |b: &Daemon| {
        b.log_since_start()
            .matches("evicted a cache segment")
            .count()
    };
    let before = evicted(&b);
    let conn = dev.conn.clone();
    let scan = std::thread::spawn(move || vdbu::try_psql(&conn, BIG_SUM));
    assert!(
        wait_until(WAIT, || evicted(&b) > before + 2),
        "no eviction during the scan:\n{}",
        b.log_tail(30)
    );
    b.kill9();
    let _ = scan.join();
    b.start_again();
    assert!(
        wait_until(WAIT * 2, || {
            let s = vdbu::status(&b, "dev1");
            s["state"] == "running" && s["pid"].as_i64().is_some_and(|p| p != old_pid)
        }),
        "dev1 is not running again after the restart: {}\n{}",
        vdbu::status(&b, "dev1"),
        b.log_tail(40)
    );
    assert_eq!(dev.sql(BIG_SUM), want, "B read other rows after kill -9");
    dev.amcheck();
    let c = &json(&b, &["remote", "status", "--json"])["cache"];
    assert!(c["bytes"].as_u64().unwrap() <= 2 << 20, "{c}");
    assert!(dir_bytes(&b.store().join("cache")) <= 2 << 20);
}

/// `--cache-size` takes sizes with units; anything else is refused with a message saying
/// what to give, before a store is made.
#[test]
fn init_refuses_a_bad_cache_size_and_says_why() {
    let root = tempdir("vdbfs-cachesize-");
    for (bad, why) in [
        ("12X", "not a size"),
        ("lots", "not a size"),
        ("100K", "too small"),
    ] {
        let store = root.path().join(format!("s-{bad}"));
        let out = run_timeout(
            Command::new(bin()).arg("--store").arg(&store).args([
                "init",
                "--remote",
                "s3://b/p",
                "--cache-size",
                bad,
            ]),
            Duration::from_secs(30),
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(2),
            "--cache-size {bad}: a usage error"
        );
        assert!(
            err.contains(why) && err.contains("--cache-size"),
            "--cache-size {bad}: {err}"
        );
        assert!(!store.exists(), "a store was made with --cache-size {bad}");
    }
    let store = root.path().join("ok");
    let out = run_timeout(
        Command::new(bin()).arg("--store").arg(&store).args([
            "--json",
            "init",
            "--remote",
            "s3://b/p",
            "--cache-size",
            "1.5G",
        ]),
        Duration::from_secs(30),
    );
    assert!(out.status.success(), "{}", describe(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["remote"]["cache_size"].as_u64(), Some(3 << 29), "{v}");
}
