//! Stores on an S3-compatible object store (a real Garage node on loopback): two daemons with
//! separate local stores on one machine act as host A and host B. A publishes, B provisions
//! from what A published; blocks come by ranged GET and are verified like local ones.

use crate::util::garage::{Garage, BUCKET};
use crate::util::source::{link_small, source_snapshot, wait_replayed, SourceDb, Staged, WAIT};
use crate::util::vdb::{self as vdbu, Vdbd};
use crate::util::*;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use serde_json::Value;
use std::fs;
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

/// Host A keeps syncing and publishing while host B runs a VDB from A's first published
/// snapshot under a read load: A's later snapshots (with rows inserted on the source after S1)
/// show in B's `remote list`, a second VDB from the newest has the new rows, and the first VDB
/// still has exactly S1's rows (its reads never failed meanwhile); both pass pg_amcheck.
#[test]
fn host_a_keeps_publishing_while_host_b_runs_a_vdb_from_an_older_snapshot() {
    let g = Garage::start();
    let src = SourceDb::start(false, &[]);
    src.insert_rows(1, 2000, "s1");
    let a = Vdbd {
        s: Staged {
            d: remote_daemon(&g, "live"),
        },
    };
    let st = link_small(&a, &src, "prod");
    let s1 = st["last_snapshot"]["name"].as_str().unwrap().to_string();
    let wait_published = |d: &Daemon, snap: &str| {
        assert!(
            wait_until(WAIT * 2, || published_names(d).contains(&snap.to_string())),
            "{snap} is not in remote list; A's remote status: {}\nA's log tail:\n{}",
            a.ok(&["remote", "status", "--json"]),
            a.log_tail(40)
        );
    };
    wait_published(&a, &s1);
    let b = Vdbd {
        s: Staged {
            d: remote_daemon(&g, "live"),
        },
    };
    let dev1 = vdbu::create(&b, "dev1", &s1, &[]);
    let s1_rows = "2000|1|2000|s1";
    let rows_sql = "SELECT count(*), min(id), max(id), max(note) FROM marker";
    assert_eq!(dev1.sql(rows_sql), s1_rows);
    let s1_print = dev1.fingerprint();
    // A read load on dev1 for as long as A works.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        let conn = dev1.conn.clone();
        std::thread::spawn(move || {
            let mut reads = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let out = vdbu::try_psql(
                    &conn,
                    "SELECT count(*), min(id), max(id), max(note) FROM marker",
                );
                let got = String::from_utf8_lossy(&out.stdout).trim().to_string();
                if !out.status.success() || got != "2000|1|2000|s1" {
                    return Err(format!("read {reads} on dev1: {}", describe(&out)));
                }
                reads += 1;
            }
            Ok(reads)
        })
    };
    // Meanwhile: rows on A's source, then two more snapshots, published by A's daemon.
    let mut later = Vec::new();
    for (i, (from, to)) in [(2001, 3000), (3001, 4500)].into_iter().enumerate() {
        src.insert_rows(from, to, &format!("s{}", i + 2));
        wait_replayed(&a, "prod", src.lsn());
        let snap = source_snapshot(&a, "prod");
        wait_published(&b, &snap);
        later.push(snap);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let reads = load.join().unwrap().unwrap_or_else(|e| panic!("{e}"));
    assert!(reads > 0, "the read load on dev1 never ran");
    let names = published_names(&b);
    for s in [&s1, &later[0], &later[1]] {
        assert!(names.contains(s), "B's remote list lacks {s}: {names:?}");
    }
    let dev2 = vdbu::create(&b, "dev2", &later[1], &[]);
    assert_eq!(dev2.sql(rows_sql), "4500|1|4500|s3");
    assert_eq!(dev1.sql(rows_sql), s1_rows, "dev1 no longer has S1's rows");
    assert_eq!(dev1.fingerprint(), s1_print, "dev1's tables changed");
    dev1.amcheck();
    dev2.amcheck();
}

/// The test-only hook that holds a multipart upload after its first part (see
/// `src/remote/upload.rs`), so an upload is certainly in flight when a test acts.
const PAUSE_ENV: &str = "VDBFS_TEST_UPLOAD_PAUSE_MS";
const PAUSED: &str = "test hook: upload paused";

/// A host with the upload pause hook set to `ms`.
fn paused_daemon(g: &Garage, prefix: &str, ms: u64) -> Daemon {
    let mut env = g.env();
    env.push((PAUSE_ENV.into(), ms.to_string()));
    Daemon::start_init(&g.init_args(prefix), &env)
}

fn store_id(d: &Daemon) -> String {
    let cfg: Value =
        serde_json::from_slice(&fs::read(d.store().join("remote.json")).unwrap()).unwrap();
    cfg["store_id"].as_str().unwrap().to_string()
}

/// Every object under `prefix`, with its size.
fn bucket_objects(g: &Garage, prefix: &str) -> std::collections::BTreeMap<String, u64> {
    use futures::TryStreamExt;
    let c = g.client();
    let p = object_store::path::Path::from(prefix);
    rt().block_on(async { c.list(Some(&p)).try_collect::<Vec<_>>().await })
        .unwrap()
        .into_iter()
        .map(|m| (m.location.to_string(), m.size))
        .collect()
}

/// What the bucket under `prefix` must always look like, whatever was cut short: every
/// manifest is whole and names only objects that are in the bucket and long enough for every
/// record it points into; every pack object of `d`'s store still on its disk has exactly the
/// local pack file's size (no partial object is ever visible). Returns the pack objects of `d`
/// (file name -> size) and the manifests' names.
fn assert_bucket_consistent(
    g: &Garage,
    prefix: &str,
    d: &Daemon,
) -> (std::collections::BTreeMap<String, u64>, Vec<String>) {
    let objects = bucket_objects(g, prefix);
    let c = g.client();
    let r = rt();
    let mut manifests = Vec::new();
    for key in objects.keys().filter(|k| k.ends_with(".manifest")) {
        let p = object_store::path::Path::from(key.as_str());
        let bytes = r
            .block_on(async { c.get(&p).await.unwrap().bytes().await })
            .unwrap();
        let (h, entries) = vdbfs_format::manifest::decode(&bytes)
            .unwrap_or_else(|e| panic!("manifest {key} does not decode: {e}"));
        for e in &entries {
            let (_, rel) = &h.objects[e.object as usize];
            let obj = format!("{prefix}/{rel}");
            let size = objects.get(&obj).unwrap_or_else(|| {
                panic!("manifest {key} names {obj}, which is not in the bucket")
            });
            assert!(
                e.offset + e.len as u64 <= *size,
                "manifest {key} names bytes {}..{} of {obj}, which has {size}",
                e.offset,
                e.offset + e.len as u64
            );
        }
        manifests.push(format!("{}@{}", h.dataset, h.snapshot));
    }
    let mine = format!("{prefix}/packs/{}/", store_id(d));
    let mut packs = std::collections::BTreeMap::new();
    for (key, size) in &objects {
        let Some(name) = key.strip_prefix(&mine) else {
            continue;
        };
        if let Ok(m) = fs::metadata(d.store().join("packs").join(name)) {
            assert_eq!(
                m.len(),
                *size,
                "pack object {key} has {size} bytes, the local pack {}",
                m.len()
            );
        }
        packs.insert(name.to_string(), *size);
    }
    (packs, manifests)
}

/// The closed local packs of `d` larger than `min` bytes (file name -> size).
fn local_packs_over(d: &Daemon, min: u64) -> std::collections::BTreeMap<String, u64> {
    fs::read_dir(d.store().join("packs"))
        .unwrap()
        .map(|e| e.unwrap())
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                e.metadata().unwrap().len(),
            )
        })
        .filter(|(_, l)| *l > min)
        .collect()
}

fn remote_status(d: &Daemon) -> Value {
    json(d, &["remote", "status", "--json"])
}

fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut data = vec![0u8; len];
    StdRng::seed_from_u64(seed).fill_bytes(&mut data);
    data
}

/// Garage stopped while a pack's multipart upload is certainly in flight (first part in, the
/// rest held by the test hook), then started again: the upload fails, `remote status` shows the
/// backlog and the last error while Garage is down, the upload is retried with backoff and
/// redone whole, the half-done upload never shows as an object, and host B reads every byte.
#[test]
fn garage_stopped_and_restarted_mid_upload_retries_and_publishes_everything() {
    let mut g = Garage::start();
    let a = paused_daemon(&g, "midput", 3000);
    let m = a.create_and_mount("data");
    let data = random_bytes(31, 64 << 20);
    fs::write(m.join("f"), &data).unwrap();
    a.ok(&["snapshot", "create", "data", "--name", "s1"]);
    // gc closes the active pack (it holds the file): the uploader takes it up.
    a.ok(&["gc"]);
    let big = local_packs_over(&a, 32 << 20);
    assert_eq!(big.len(), 1, "one closed pack holds the file: {big:?}");
    a.wait_log_since_start(PAUSED, Duration::from_secs(60));
    g.stop();
    let st = wait_json_until(
        &a,
        "backlog and last error while Garage is down",
        Duration::from_secs(60),
        |r| {
            r["backlog_packs"].as_u64().unwrap_or(0) >= 1
                && r["last_error"].as_str().is_some_and(|e| !e.is_empty())
                && r["failures"].as_u64().unwrap_or(0) >= 1
        },
    );
    let human = a.ok(&["remote", "status"]);
    assert!(human.contains("backlog"), "remote status: {human}");
    let status = a.status_json();
    assert!(
        status["remote"]["backlog_packs"].as_u64().unwrap_or(0) >= 1,
        "vdbfs status shows no backlog: {status}"
    );
    g.restart();
    // The retry starts the upload again from its first part; while it is held, the object is
    // not there (a multipart upload is no object until completed).
    let pauses = |d: &Daemon| d.log_since_start().matches(PAUSED).count();
    assert!(
        wait_until(Duration::from_secs(90), || pauses(&a) >= 2),
        "the upload was not retried after Garage came back ({st}); log tail:\n{}",
        a.log_tail(30)
    );
    let (packs, _) = assert_bucket_consistent(&g, "midput", &a);
    for name in big.keys() {
        assert!(
            !packs.contains_key(name),
            "pack {name} is visible in the bucket while its upload is held"
        );
    }
    wait_json_until(&a, "the backlog drained", Duration::from_secs(120), |r| {
        r["backlog_packs"].as_u64() == Some(0) && r["last_error"].is_null()
    });
    a.ok(&["snapshot", "publish", "data@s1"]);
    let (packs, manifests) = assert_bucket_consistent(&g, "midput", &a);
    for (name, len) in &big {
        assert_eq!(packs.get(name), Some(len), "pack {name} in the bucket");
    }
    assert_eq!(manifests, vec!["data@s1".to_string()]);
    assert!(
        a.log().contains("cannot upload pack"),
        "A's log does not say the upload failed:\n{}",
        a.log_tail(30)
    );
    host_b_reads_data_s1(&g, "midput", &data);
    drop(m);
}

/// Waits (bounded) until `remote status --json` satisfies `ok`; returns it.
#[track_caller]
fn wait_json_until(
    d: &Daemon,
    what: &str,
    timeout: Duration,
    ok: impl Fn(&Value) -> bool,
) -> Value {
    let mut last = Value::Null;
    let done = wait_until(timeout, || {
        last = remote_status(d);
        ok(&last)
    });
    assert!(
        done,
        "remote status never showed {what} within {timeout:?}: {last}\nlog tail:\n{}",
        d.log_tail(30)
    );
    last
}

/// kill -9 of host A while the uploader is certainly mid-upload (first part of a pack in, the
/// rest held by the test hook), and again while a publish waits on its pack's upload: neither
/// leaves a partial pack object or a manifest naming a missing object; after each restart the
/// pack is uploaded again whole; the publish then completes, and host B reads every byte of
/// both snapshots.
#[test]
fn kill_9_mid_upload_in_the_uploader_and_in_a_publish_loses_nothing() {
    let g = Garage::start();
    let mut a = paused_daemon(&g, "kill9", 5000);
    let m = a.create_and_mount("data");
    let f = random_bytes(41, 48 << 20);
    fs::write(m.join("f"), &f).unwrap();
    a.ok(&["snapshot", "create", "data", "--name", "s1"]);
    a.ok(&["gc"]);
    let first = local_packs_over(&a, 32 << 20);
    assert_eq!(first.len(), 1, "one closed pack holds f: {first:?}");
    // 1. In the uploader.
    a.wait_log_since_start(PAUSED, Duration::from_secs(60));
    a.kill9();
    let (packs, manifests) = assert_bucket_consistent(&g, "kill9", &a);
    assert!(
        manifests.is_empty(),
        "a manifest before any publish: {manifests:?}"
    );
    for name in first.keys() {
        assert!(
            !packs.contains_key(name),
            "pack {name} visible after the kill"
        );
    }
    a.start_again();
    wait_json_until(&a, "the backlog drained", Duration::from_secs(120), |r| {
        r["backlog_packs"].as_u64() == Some(0) && r["uploaded_packs"].as_u64() >= Some(1)
    });
    let (packs, _) = assert_bucket_consistent(&g, "kill9", &a);
    for (name, len) in &first {
        assert_eq!(packs.get(name), Some(len), "pack {name} after the restart");
    }
    // 2. In a publish: the new file's blocks are in the active pack; the publish closes it and
    // waits on its upload.
    a.wait_mounted(&m.path, Duration::from_secs(30));
    let g2 = random_bytes(42, 48 << 20);
    fs::write(m.join("g"), &g2).unwrap();
    a.ok(&["snapshot", "create", "data", "--name", "s2"]);
    let before = a.log_since_start().matches(PAUSED).count();
    let mut publish = a
        .command()
        .args(["snapshot", "publish", "data@s2"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let held = wait_until(Duration::from_secs(60), || {
        a.log_since_start().matches(PAUSED).count() > before
    });
    assert!(
        held,
        "the publish's upload never started:\n{}",
        a.log_tail(30)
    );
    a.kill9();
    let st = publish.wait().unwrap();
    assert!(
        !st.success(),
        "publish succeeded though the daemon was killed"
    );
    let (_, manifests) = assert_bucket_consistent(&g, "kill9", &a);
    assert!(
        !manifests.contains(&"data@s2".to_string()),
        "data@s2 was published though its pack upload was cut short"
    );
    a.start_again();
    a.ok(&["snapshot", "publish", "data@s1"]);
    a.ok(&["snapshot", "publish", "data@s2"]);
    let (packs, manifests) = assert_bucket_consistent(&g, "kill9", &a);
    assert!(
        manifests.contains(&"data@s1".to_string()) && manifests.contains(&"data@s2".to_string()),
        "{manifests:?}"
    );
    let local = local_packs_over(&a, 32 << 20);
    assert!(local.len() >= 2, "two big closed packs: {local:?}");
    for (name, len) in &local {
        assert_eq!(packs.get(name), Some(len), "pack {name} in the bucket");
    }
    let b = remote_daemon(&g, "kill9");
    for (snap, file, data) in [("s1", "f", &f), ("s2", "g", &g2)] {
        let name = format!("copy-{snap}");
        b.ok(&["clone", &format!("data@{snap}"), &name]);
        let mp = b.new_mountpoint(&name);
        let bm = b.mount(&name, &mp);
        assert!(
            fs::read(bm.join(file)).unwrap() == *data,
            "B read other bytes than A wrote in data@{snap}/{file}"
        );
        bm.umount();
    }
    drop(m);
}
