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
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::process::Command;
use std::thread;
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
/// succeeded names only objects in the bucket, and host B, which cloned each snapshot while it
/// was published, reads every byte of every one after A deleted them (unpublishing them),
/// collected their blocks locally and ran its remote gc (B's holds keep the objects).
#[test]
fn host_a_s_gc_racing_its_publishes_never_removes_what_host_b_reads() {
    let g = Garage::start();
    let a = remote_daemon(&g, "gc");
    let b = remote_daemon(&g, "gc");
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
        b.ok(&["clone", &format!("data@{snap}"), &format!("copy-{snap}")]);
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
    a.ok(&["remote", "gc", "--grace", "1s"]);
    assert_every_manifest_is_whole(&g, "gc");
    for (snap, data) in &published {
        let name = format!("copy-{snap}");
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
fn all_objects(g: &Garage, prefix: &str) -> std::collections::BTreeMap<String, u64> {
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
    let objects = all_objects(g, prefix);
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

/// Credentials, region and endpoint from an AWS profile: Garage's key in a credentials file
/// and its region and endpoint in a config file (`[profile NAME]`), the daemon started with
/// only `AWS_PROFILE`, `AWS_SHARED_CREDENTIALS_FILE` and `AWS_CONFIG_FILE` set (no key in its
/// environment, no `--endpoint` given to `init`), publishes and host B reads; a profile that
/// neither file has stops `vdbfs serve` with an error naming the profile and both files.
#[test]
fn a_daemon_with_only_an_aws_profile_publishes_and_a_missing_profile_is_named() {
    let g = Garage::start();
    let dir = tempdir("vdbfs-aws-");
    let creds = dir.path().join("credentials");
    let config = dir.path().join("config");
    fs::write(
        &creds,
        format!(
            "[default]\naws_access_key_id = GKnotthisone000000000000\naws_secret_access_key = no\n\n\
             [vdbtest]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
            crate::util::garage::KEY_ID,
            crate::util::garage::SECRET
        ),
    )
    .unwrap();
    fs::write(
        &config,
        format!(
            "[profile vdbtest]\nregion = {}\nendpoint_url = {}\n",
            crate::util::garage::REGION,
            g.endpoint()
        ),
    )
    .unwrap();
    let env = |profile: &str| -> Vec<(String, String)> {
        vec![
            ("AWS_PROFILE".into(), profile.into()),
            (
                "AWS_SHARED_CREDENTIALS_FILE".into(),
                creds.display().to_string(),
            ),
            ("AWS_CONFIG_FILE".into(), config.display().to_string()),
        ]
    };
    let init = vec!["--remote".to_string(), format!("s3://{BUCKET}/profile")];
    let a = Daemon::start_init(&init, &env("vdbtest"));
    let data = publish_random_file(&a, 21, 1 << 20);
    host_b_reads_data_s1(&g, "profile", &data);
    assert!(
        !a.log().contains(crate::util::garage::SECRET),
        "A's log holds the secret"
    );
    assert!(
        a.log().contains(&format!("{} [vdbtest]", creds.display())),
        "A's log does not say its keys came from the profile:\n{}",
        a.log_tail(30)
    );

    // A profile in neither file: serve refuses to start and says what it looked for.
    let store = dir.path().join("store2");
    let out = run_timeout(
        clean_cli_env(&mut std::process::Command::new(bin()))
            .args(["init", "--store"])
            .arg(&store)
            .args(&init),
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "init: {}", describe(&out));
    let mut serve = std::process::Command::new(bin());
    clean_cli_env(&mut serve)
        .arg("serve")
        .arg("--store")
        .arg(&store)
        .envs(env("nosuch"));
    let out = run_timeout(&mut serve, Duration::from_secs(60));
    let err = describe(&out);
    assert!(
        !out.status.success(),
        "serve started with a missing profile"
    );
    assert!(
        err.contains("'nosuch'")
            && err.contains(&creds.display().to_string())
            && err.contains(&config.display().to_string()),
        "the error does not name the profile and the files: {err}"
    );
}

// ---------------------------------------------------------------------------------------------
// Garbage collection across hosts (FORMAT.md, "Garbage collection across hosts")
// ---------------------------------------------------------------------------------------------

/// The objects under `PREFIX/SUB/` (keys relative to PREFIX) and their sizes.
fn bucket_objects(g: &Garage, prefix: &str, sub: &str) -> BTreeMap<String, u64> {
    use futures::TryStreamExt;
    let c = g.client();
    let p = object_store::path::Path::from(format!("{prefix}/{sub}"));
    rt().block_on(async { c.list(Some(&p)).try_collect::<Vec<_>>().await })
        .unwrap()
        .into_iter()
        .map(|m| {
            let k = m.location.as_ref()[prefix.len() + 1..].to_string();
            (k, m.size)
        })
        .collect()
}

fn get_object(g: &Garage, key: &str) -> Option<Vec<u8>> {
    let c = g.client();
    let p = object_store::path::Path::from(key);
    let r = rt();
    match r.block_on(async { c.get(&p).await }) {
        Ok(got) => Some(r.block_on(got.bytes()).unwrap().to_vec()),
        Err(object_store::Error::NotFound { .. }) => None,
        Err(e) => panic!("cannot read {key}: {e}"),
    }
}

/// Every object a manifest or a hold in the bucket names (holds decoded as JSON).
fn named_objects(g: &Garage, prefix: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for k in bucket_objects(g, prefix, "manifests").keys() {
        let b = get_object(g, &format!("{prefix}/{k}")).unwrap();
        let (h, _) = vdbfs_format::manifest::decode(&b).unwrap();
        out.extend(h.objects.into_iter().map(|(_, k)| k));
    }
    for k in bucket_objects(g, prefix, "holds").keys() {
        let b = get_object(g, &format!("{prefix}/{k}")).unwrap();
        let h: Value = serde_json::from_slice(&b).unwrap();
        for o in h["objects"].as_array().unwrap() {
            out.insert(o.as_str().unwrap().to_string());
        }
    }
    out
}

/// No manifest in the bucket names an object that is not there.
fn assert_every_manifest_is_whole(g: &Garage, prefix: &str) {
    let packs = bucket_objects(g, prefix, "packs");
    for k in bucket_objects(g, prefix, "manifests").keys() {
        let b = get_object(g, &format!("{prefix}/{k}")).unwrap();
        let (h, _) = vdbfs_format::manifest::decode(&b).unwrap();
        for (_, o) in h.objects {
            assert!(packs.contains_key(&o), "{k} names {o}, not in the bucket");
        }
    }
}

/// The local pack numbers of a store.
fn local_packs(d: &Daemon) -> BTreeSet<u32> {
    fs::read_dir(d.store().join("packs"))
        .unwrap()
        .filter_map(|e| {
            let n = e.unwrap().file_name().to_string_lossy().to_string();
            n.strip_suffix(".pack")?.parse().ok()
        })
        .collect()
}

/// What `remote gc` may delete on store `d` now: its pack objects whose local pack is gone
/// and that no manifest or hold names.
fn collectable(g: &Garage, prefix: &str, d: &Daemon) -> BTreeSet<String> {
    let own = format!("packs/{}/", store_id(d));
    let local = local_packs(d);
    let named = named_objects(g, prefix);
    bucket_objects(g, prefix, "packs")
        .into_keys()
        .filter(|k| {
            let Some(no) = k
                .strip_prefix(&own)
                .and_then(|f| f.strip_suffix(".pack"))
                .and_then(|n| n.parse::<u32>().ok())
            else {
                return false;
            };
            !local.contains(&no) && !named.contains(k)
        })
        .collect()
}

/// Writes `len` random bytes (seed) to `f` on mount `m`, snapshots `data@snap` and publishes it.
fn write_snapshot_publish(a: &Daemon, m: &Mount, seed: u64, snap: &str) -> Vec<u8> {
    let mut data = vec![0u8; 2 << 20];
    StdRng::seed_from_u64(seed).fill_bytes(&mut data);
    fs::write(m.join("f"), &data).unwrap();
    a.ok(&["snapshot", "create", "data", "--name", snap]);
    a.ok(&["snapshot", "publish", &format!("data@{snap}")]);
    data
}

fn remote_gc(d: &Daemon, args: &[&str]) -> Value {
    let mut a = vec!["remote", "gc", "--json"];
    a.extend_from_slice(args);
    json(d, &a)
}

fn deleted_objects(rep: &Value) -> BTreeSet<String> {
    rep["objects"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o.as_str().unwrap().to_string())
        .collect()
}

/// Host A publishes three snapshots and deletes two: their manifests leave the bucket, and
/// `remote gc` deletes exactly A's pack objects that A no longer has locally and that no
/// manifest or hold names (the dry run lists the same), nothing of the snapshot that is still
/// published: host B's clone of it reads every byte afterwards (every block fetched after the
/// gc), also after B restarted. `remote status` shows the collection.
#[test]
fn remote_gc_deletes_exactly_the_pack_objects_no_manifest_or_hold_names() {
    let g = Garage::start();
    let a = remote_daemon(&g, "rgc");
    let m = a.create_and_mount("data");
    let _d0 = write_snapshot_publish(&a, &m, 30, "s0");
    let _d1 = write_snapshot_publish(&a, &m, 31, "s1");
    let d2 = write_snapshot_publish(&a, &m, 32, "s2");
    let mut b = remote_daemon(&g, "rgc");
    b.ok(&["clone", "data@s2", "copy"]);
    assert!(
        bucket_objects(&g, "rgc", "holds").len() == 1,
        "B's clone took no hold"
    );

    a.ok(&["snapshot", "delete", "data@s0"]);
    a.ok(&["snapshot", "delete", "data@s1"]);
    let manifests: Vec<String> = bucket_objects(&g, "rgc", "manifests").into_keys().collect();
    assert_eq!(manifests, vec!["manifests/data/s2.manifest".to_string()]);
    // The old contents of f are garbage on A: its local gc removes their packs.
    a.ok(&["gc"]);
    a.ok(&["gc"]);
    let expect = collectable(&g, "rgc", &a);
    assert!(
        !expect.is_empty(),
        "nothing to collect: the test proves nothing (A's packs {:?}, bucket {:?})",
        local_packs(&a),
        bucket_objects(&g, "rgc", "packs")
    );
    let before = bucket_objects(&g, "rgc", "packs");
    let dry = remote_gc(&a, &["--dry-run"]);
    assert_eq!(deleted_objects(&dry), expect, "the dry run's candidates");
    assert_eq!(
        bucket_objects(&g, "rgc", "packs"),
        before,
        "a dry run deleted"
    );

    let rep = remote_gc(&a, &["--grace", "2s"]);
    assert_eq!(
        deleted_objects(&rep),
        expect,
        "remote gc deleted other objects"
    );
    let after = bucket_objects(&g, "rgc", "packs");
    let want: BTreeMap<String, u64> = before
        .iter()
        .filter(|(k, _)| !expect.contains(*k))
        .map(|(k, v)| (k.clone(), *v))
        .collect();
    assert_eq!(after, want, "the bucket after the gc");
    assert_eq!(
        rep["deleted_bytes"].as_u64().unwrap(),
        expect.iter().map(|k| before[k]).sum::<u64>()
    );
    assert!(
        bucket_objects(&g, "rgc", "gc").is_empty(),
        "the candidates list stayed"
    );
    assert_every_manifest_is_whole(&g, "rgc");
    let st = json(&a, &["remote", "status", "--json"]);
    assert_eq!(st["last_gc"]["deleted_objects"], rep["deleted_objects"]);
    assert!(a.ok(&["remote", "status"]).contains("last remote gc"));

    // B fetches every block of its clone only now, after the gc.
    let mp = b.new_mountpoint("copy");
    let bm = b.mount("copy", &mp);
    assert!(fs::read(bm.join("f")).unwrap() == d2, "B read other bytes");
    let fetched = json(&b, &["remote", "status", "--json"])["fetched_blocks"]
        .as_u64()
        .unwrap();
    assert!(fetched > 0, "B fetched nothing");
    bm.umount();
    b.restart();
    let bm = b.mount("copy", &mp);
    assert!(
        fs::read(bm.join("f")).unwrap() == d2,
        "B read other bytes after a restart"
    );
    drop(m);
}

/// The race of a publish against a gc between its mark and its recheck: host B's hold on
/// A's objects lapsed (a 1 s lease for the test), so A's gc marks them; B's publish of a
/// snapshot of its clone, which names them, runs while A waits out the grace period. The
/// publish sees A's candidates list after writing its manifest, deletes the manifest and
/// fails; after A's gc deleted the objects, a publish fails again (they are gone). No
/// manifest in the bucket ever names a deleted object.
#[test]
fn a_publish_racing_a_remote_gc_never_leaves_a_manifest_naming_a_deleted_object() {
    let g = Garage::start();
    let a = remote_daemon(&g, "race");
    let m = a.create_and_mount("data");
    write_snapshot_publish(&a, &m, 40, "s1");
    let mut env = g.env();
    env.push(("VDBFS_TEST_HOLD_TTL_SECS".into(), "1".into()));
    let b = Daemon::start_init(&g.init_args("race"), &env);
    b.ok(&["clone", "data@s1", "copy"]);
    b.ok(&["snapshot", "create", "copy", "--name", "c1"]);
    // A deletes s1 and its local copies; B's hold has expired by now.
    let mut data = vec![0u8; 2 << 20];
    StdRng::seed_from_u64(41).fill_bytes(&mut data);
    fs::write(m.join("f"), &data).unwrap();
    a.ok(&["snapshot", "delete", "data@s1"]);
    a.ok(&["gc"]);
    a.ok(&["gc"]);
    thread::sleep(Duration::from_secs(2));

    let mut gc = a
        .command()
        .args(["remote", "gc", "--json", "--grace", "15s"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    a.wait_log_since_start("candidates written", Duration::from_secs(60));
    let out = b.vdbfs(&["snapshot", "publish", "copy@c1"]);
    assert!(
        !out.status.success(),
        "a publish naming objects A's gc marked succeeded"
    );
    let err = describe(&out);
    assert!(err.contains("candidate of the gc"), "publish said: {err}");
    assert!(
        get_object(&g, "race/manifests/copy/c1.manifest").is_none(),
        "the refused publish left its manifest"
    );
    let done = wait_child(&mut gc, Duration::from_secs(120)).expect("remote gc did not finish");
    assert!(done.success(), "remote gc failed");
    let mut s = String::new();
    std::io::Read::read_to_string(gc.stdout.as_mut().unwrap(), &mut s).unwrap();
    let rep: Value = serde_json::from_str(&s).unwrap();
    assert!(
        rep["deleted_objects"].as_u64().unwrap() > 0,
        "A's gc deleted nothing: {rep}"
    );
    assert_every_manifest_is_whole(&g, "race");
    // After the gc: the objects are gone, and the publish says so.
    let out = b.vdbfs(&["snapshot", "publish", "copy@c1"]);
    assert!(
        !out.status.success(),
        "a publish naming deleted objects succeeded"
    );
    assert!(
        describe(&out).contains("no longer in the bucket"),
        "publish said: {}",
        describe(&out)
    );
    assert!(get_object(&g, "race/manifests/copy/c1.manifest").is_none());
    assert_every_manifest_is_whole(&g, "race");
    drop(m);
}

/// Host B clones a snapshot that host A then deletes: A unpublishes it, but B's hold keeps its
/// objects through A's remote gc, and B's clone reads every byte (fetched after the gc). Once
/// B deletes the clone, its hold goes, and A's next remote gc deletes the objects.
#[test]
fn a_hold_keeps_a_deleted_snapshot_s_objects_until_host_b_deletes_its_clone() {
    let g = Garage::start();
    let a = remote_daemon(&g, "hold");
    let m = a.create_and_mount("data");
    let d1 = write_snapshot_publish(&a, &m, 50, "s1");
    let b = remote_daemon(&g, "hold");
    b.ok(&["clone", "data@s1", "copy"]);
    let mut data = vec![0u8; 2 << 20];
    StdRng::seed_from_u64(51).fill_bytes(&mut data);
    fs::write(m.join("f"), &data).unwrap();
    a.ok(&["snapshot", "delete", "data@s1"]);
    assert!(
        bucket_objects(&g, "hold", "manifests").is_empty(),
        "data@s1 is still published"
    );
    a.ok(&["gc"]);
    a.ok(&["gc"]);
    let held: BTreeSet<String> = named_objects(&g, "hold");
    let own = format!("packs/{}/", store_id(&a));
    let gone_locally: BTreeSet<String> = held
        .iter()
        .filter(|k| {
            k.strip_prefix(&own)
                .and_then(|f| f.strip_suffix(".pack"))
                .and_then(|n| n.parse::<u32>().ok())
                .is_some_and(|n| !local_packs(&a).contains(&n))
        })
        .cloned()
        .collect();
    assert!(
        !gone_locally.is_empty(),
        "A still has every pack of data@s1: the hold is not what keeps them"
    );
    let rep = remote_gc(&a, &["--grace", "1s"]);
    let deleted = deleted_objects(&rep);
    assert!(
        deleted.is_disjoint(&held),
        "A's gc deleted held objects: {deleted:?}"
    );
    let mp = b.new_mountpoint("copy");
    let bm = b.mount("copy", &mp);
    assert!(
        fs::read(bm.join("f")).unwrap() == d1,
        "B read other bytes after A's gc"
    );
    bm.umount();

    b.ok(&["dataset", "delete", "copy"]);
    assert!(
        bucket_objects(&g, "hold", "holds").is_empty(),
        "B's hold stayed after its clone was deleted"
    );
    let rep = remote_gc(&a, &["--grace", "1s"]);
    let deleted = deleted_objects(&rep);
    assert!(
        gone_locally.is_subset(&deleted),
        "A's gc kept {:?} after the hold went",
        gone_locally.difference(&deleted).collect::<Vec<_>>()
    );
    let packs = bucket_objects(&g, "hold", "packs");
    assert!(gone_locally.iter().all(|k| !packs.contains_key(k)));
    drop(m);
}

/// A remote gc cut short by a crash while it waits out its grace period is resumed by the
/// restarted daemon (its candidates list is recorded in the store), not begun again: the
/// objects go once the grace is over, and `remote status` reports the collection.
#[test]
fn a_remote_gc_interrupted_by_kill_9_is_resumed_after_the_restart() {
    let g = Garage::start();
    let mut a = remote_daemon(&g, "resume");
    let m = a.create_and_mount("data");
    write_snapshot_publish(&a, &m, 60, "s1");
    let mut data = vec![0u8; 2 << 20];
    StdRng::seed_from_u64(61).fill_bytes(&mut data);
    fs::write(m.join("f"), &data).unwrap();
    a.ok(&["snapshot", "delete", "data@s1"]);
    a.ok(&["gc"]);
    a.ok(&["gc"]);
    let expect = collectable(&g, "resume", &a);
    assert!(!expect.is_empty(), "nothing to collect");
    let mut gc = a
        .command()
        .args(["remote", "gc", "--grace", "20s"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    a.wait_log_since_start("candidates written", Duration::from_secs(60));
    a.kill9();
    let _ = wait_child(&mut gc, Duration::from_secs(60));
    assert_eq!(
        bucket_objects(&g, "resume", "gc").len(),
        1,
        "no candidates list in the bucket"
    );
    a.start_again();
    assert!(
        wait_until(Duration::from_secs(120), || {
            json(&a, &["remote", "status", "--json"])["last_gc"]["deleted_objects"]
                .as_u64()
                .unwrap_or(0)
                > 0
        }),
        "the restarted daemon did not finish the collection: {}\n{}",
        a.ok(&["remote", "status"]),
        a.log_tail(30)
    );
    let packs = bucket_objects(&g, "resume", "packs");
    assert!(
        expect.iter().all(|k| !packs.contains_key(k)),
        "candidates left after the resumed gc: {expect:?} in {packs:?}"
    );
    assert!(bucket_objects(&g, "resume", "gc").is_empty());
    assert!(
        !a.log_since_start().contains("candidates written"),
        "the restarted daemon marked anew instead of resuming"
    );
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
