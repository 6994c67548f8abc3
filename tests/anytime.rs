//! A VDB of any moment, in about a second (issue 13), against real PostgreSQL 15 sources on
//! loopback and real FUSE mounts.
//!
//! Pinned here: each validated-sync snapshot gets a prepared image in the background, and a VDB
//! of a prepared snapshot starts without redo (its log shows no "redo starts"); a daemon killed
//! during a preparation or during a create at a moment leaves nothing half-made (the snapshot
//! is prepared again, the create is gone and can be made again); rows committed on the source
//! with their commit times recorded are exactly what VDBs at moments between two snapshots and
//! after the last one hold, by time (inclusive) and by LSN; moments outside what can be
//! provisioned, `--at` with a snapshot, and `--set recovery_target_*` are clear errors that print
//! the range or point to `--at`; `timeflow` and `source status` show the ranges; `refresh --at`
//! moves a VDB to a moment; a VDB rewinds to moments of its own history, also to one before an
//! earlier rewind; a source linked with `--verify` marks its snapshots `verified: ok`, a heap
//! page corrupted on the source makes the next snapshot `failed` with pg_amcheck's report, and
//! `vdb create --verified` takes the last good one.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::thread;
use std::time::Duration;

use serde_json::Value;

use crate::util::source::{
    dataset_names, json, link_small, link_small_with, parse_lsn, snapshot_list, source_snapshot,
    status as source_status, wait_json, wait_replayed, SourceDb, Staged, WAIT,
};
use crate::util::vdb::{
    create, list_names, slow_hook, vdb, vdb_error, vdb_logs, Problems, Vdb, Vdbd,
};
use crate::util::{self, as_postgres, pg, pid_alive, wait_child, wait_until, Daemon};

/// A row committed on the source: its id, commit time (as PostgreSQL prints it) and the WAL
/// position right after its commit.
#[derive(Debug, Clone)]
struct Row {
    id: i64,
    at: String,
    lsn: String,
}

/// Commits rows `ids` on the source, one transaction each, `gap` apart; returns their commit
/// times (`track_commit_timestamp`) and the LSN after each commit.
fn commit_rows(src: &SourceDb, ids: std::ops::RangeInclusive<i64>, gap: Duration) -> Vec<Row> {
    ids.map(|id| {
        src.psql(&format!("INSERT INTO marker VALUES ({id}, 'moment')"));
        let r = src.psql(&format!(
            "SELECT pg_xact_commit_timestamp(xmin), pg_current_wal_lsn() FROM marker WHERE id = {id}"
        ));
        let (at, lsn) = r.split_once('|').unwrap();
        thread::sleep(gap);
        Row {
            id,
            at: at.to_string(),
            lsn: lsn.to_string(),
        }
    })
    .collect()
}

/// The moment halfway between two commits.
fn between(src: &SourceDb, a: &Row, b: &Row) -> String {
    src.psql(&format!(
        "SELECT ('{0}'::timestamptz + ('{1}'::timestamptz - '{0}'::timestamptz) / 2)::text",
        a.at, b.at
    ))
}

/// The ids of the moment rows a VDB holds, comma-separated.
fn moment_ids(v: &Vdb) -> String {
    v.sql("SELECT coalesce(string_agg(id::text, ',' ORDER BY id), '') FROM marker WHERE note = 'moment'")
}

fn ids(rows: &[&Row]) -> String {
    rows.iter()
        .map(|r| r.id.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// The `snapshot list --json` entry of a snapshot.
fn snapshot_entry(d: &Daemon, full: &str) -> Value {
    let ds = full.split_once('@').unwrap().0;
    snapshot_list(d, ds)
        .into_iter()
        .find(|e| e["name"] == full)
        .unwrap_or_else(|| panic!("snapshot list {ds} --json has no {full}"))
}

/// Waits until a snapshot's `field` (prepared, verified) is `want`.
#[track_caller]
fn wait_mark(d: &Daemon, full: &str, field: &str, want: &str, timeout: Duration) -> Value {
    let ds = full.split_once('@').unwrap().0.to_string();
    let list = wait_json(
        d,
        &["snapshot", "list", &ds, "--json"],
        &format!("{full}: {field} {want}"),
        timeout,
        String::new,
        |v| {
            v.as_array()
                .and_then(|a| a.iter().find(|e| e["name"] == full))
                .is_some_and(|e| e[field] == want)
        },
    );
    list.as_array()
        .and_then(|a| a.iter().find(|e| e["name"] == full))
        .cloned()
        .unwrap_or_default()
}

/// Processes of the preparer (a postgres on `STORE/prepare/...`).
fn preparer_processes(d: &Daemon) -> Vec<i32> {
    let dir = d.store().join("prepare");
    let mut v = util::processes_under(&dir);
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmd = fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmd).contains(dir.to_str().unwrap()) && !v.contains(&p) {
            v.push(p);
        }
    }
    v.retain(|p| pid_alive(*p));
    v
}

/// Mount points under `under`.
fn mounts_of(under: &Path) -> Vec<PathBuf> {
    util::mountinfo()
        .into_iter()
        .map(|m| m.mountpoint)
        .filter(|m| m.starts_with(under))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Prepared snapshots

// A snapshot gets a prepared image in the background (`prepared: ready`); a VDB of it starts
// as a cleanly shut down primary: its log shows no "redo starts". A daemon killed with -9 while
// it prepares a snapshot leaves no postgres and no mount of the preparation behind once the next
// daemon is up, and the snapshot is prepared again; a daemon killed during a create at a moment
// (while its pre-start hook runs: clone, WAL staged, configured) leaves no VDB, dataset, mount or
// files, and the same create then works.
#[test]
fn prepared_snapshots_start_without_redo_and_crashes_leave_nothing_half_made() {
    let src = SourceDb::start(false, &[]);
    src.insert_rows(1, 1000, "from the source");
    let mut d = Vdbd { s: Staged::start() };
    link_small(&d, &src, "prod");
    let snap = source_snapshot(&d, "prod");
    let e = wait_mark(&d, &snap, "prepared", "ready", WAIT);
    assert_eq!(e["verified"], "off", "no --verify: {e}");

    let v = create(&d, "fast", &snap, &[]);
    let log = fs::read_to_string(v.postgres_log()).unwrap();
    assert!(
        !log.contains("redo starts") && log.contains("database system was shut down"),
        "a VDB of a prepared snapshot should start without redo:\n{log}"
    );
    assert!(
        fs::read_to_string(d.store().join("vdbs/fast/vdb.log"))
            .unwrap()
            .contains("prepared image"),
        "{}",
        vdb_logs(&d, "fast")
    );
    assert_eq!(v.sql("SELECT count(*) FROM marker"), "1000");
    v.amcheck();
    vdb(&d, &["delete", "fast"]);

    // kill -9 while a snapshot is prepared.
    src.psql("INSERT INTO marker SELECT g, repeat('x', 200) FROM generate_series(1001, 150000) g");
    wait_replayed(&d, "prod", src.lsn());
    let snap2 = source_snapshot(&d, "prod");
    let caught = wait_until(WAIT, || !preparer_processes(&d).is_empty());
    assert!(caught, "no preparation of {snap2} ran\n{}", d.log_tail(30));
    let old = preparer_processes(&d);
    d.kill9();
    d.start_again();
    let e = wait_mark(&d, &snap2, "prepared", "ready", WAIT);
    assert!(
        wait_until(WAIT, || old.iter().all(|p| !pid_alive(*p))),
        "the preparation's postgres {old:?} outlived the daemon that ran it: {e}"
    );
    let prep = d.store().join("prepare");
    assert!(
        wait_until(Duration::from_secs(10), || mounts_of(&prep).is_empty()),
        "the preparation's mount was left: {:?}",
        mounts_of(&prep)
    );
    assert!(
        !dataset_names(&d).iter().any(|n| n.starts_with('.')),
        "internal datasets are not listed: {:?}",
        dataset_names(&d)
    );
    let v2 = create(&d, "fast2", &snap2, &[]);
    assert_eq!(v2.sql("SELECT count(*) FROM marker"), "150000");
    assert!(!fs::read_to_string(v2.postgres_log())
        .unwrap()
        .contains("redo starts"));
    vdb(&d, &["delete", "fast2"]);

    // kill -9 during a create at a moment: its pre-start hook sleeps while a flag file exists.
    let (hooks, slow, started) = slow_hook(d.root(), "pre-start");
    fs::write(&slow, "").unwrap();
    let lsn = crate::util::source::fmt_lsn(src.lsn());
    let hooks_arg = hooks.to_str().unwrap().to_string();
    let args = [
        "vdb", "create", "pitr", "--from", "prod", "--at-lsn", &lsn, "--hooks", &hooks_arg,
    ];
    let mut child: Child = d
        .command()
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert!(
        wait_until(WAIT, || started.exists()),
        "the pre-start hook of the create never ran\n{}",
        d.log_tail(30)
    );
    d.kill9();
    assert!(wait_child(&mut child, WAIT).is_some());
    let _ = util::kill_processes_under(&d.store().join("vdbs"));
    d.start_again();
    d.wait_log_since_start(util::SUPERVISED, WAIT);
    let mut p = Problems::default();
    p.check(if list_names(&d).contains(&"pitr".to_string()) {
        Err(format!("VDB pitr is still listed: {:?}", list_names(&d)))
    } else {
        Ok(())
    });
    p.check(if dataset_names(&d).contains(&"pitr".to_string()) {
        Err("dataset pitr was left".to_string())
    } else {
        Ok(())
    });
    p.check(if d.store().join("vdbs/pitr").exists() {
        Err("STORE/vdbs/pitr was left".to_string())
    } else {
        Ok(())
    });
    p.check(if util::is_mounted(&d.store().join("mnt/pitr")) {
        Err("STORE/mnt/pitr is still mounted".to_string())
    } else {
        Ok(())
    });
    p.finish();
    fs::remove_file(&slow).unwrap();
    let v = create(
        &d,
        "pitr",
        "prod",
        &["--at-lsn", &lsn, "--hooks", &hooks_arg],
    );
    assert_eq!(v.sql("SELECT count(*) FROM marker"), "150000");
}

// ---------------------------------------------------------------------------------------------
// Any moment

// Rows committed one by one on the source, their commit times and LSNs recorded: VDBs at
// moments between two snapshots, at a commit's exact time (inclusive), and after the last
// snapshot, by time and by LSN, each hold exactly the rows committed up to that moment. Moments
// before the first snapshot or after the last WAL received, a malformed time, `--at` with a
// snapshot and `--set recovery_target_time` are refused with errors that print the range or
// point to `--at`, leaving nothing. `timeflow` and `source status` show the range, and `refresh
// --at` moves a VDB to a moment, keeping its port.
#[test]
fn vdbs_at_moments_hold_exactly_what_was_committed_then() {
    let src = SourceDb::start(false, &["track_commit_timestamp = on"]);
    src.insert_rows(1, 10, "from the source");
    let d = Vdbd { s: Staged::start() };
    link_small(&d, &src, "prod");
    let first = source_status(&d, "prod")["last_snapshot"]["name"]
        .as_str()
        .unwrap()
        .to_string();
    let gap = Duration::from_millis(120);
    let a = commit_rows(&src, 100..=103, gap);
    // A completed segment goes through the store's archive.
    src.switch_wal();
    let b = commit_rows(&src, 104..=105, gap);
    let s2 = source_snapshot(&d, "prod");
    let c = commit_rows(&src, 106..=108, gap);
    wait_replayed(&d, "prod", src.lsn());

    let all: Vec<&Row> = a.iter().chain(&b).chain(&c).collect();
    let upto = |id: i64| {
        ids(&all
            .iter()
            .copied()
            .filter(|r| r.id <= id)
            .collect::<Vec<_>>())
    };
    let moments: Vec<(&str, String, String)> = vec![
        ("--at", between(&src, &a[1], &a[2]), upto(101)),
        ("--at", a[3].at.clone(), upto(103)),
        ("--at", between(&src, &b[1], &c[0]), upto(105)),
        ("--at", between(&src, &c[1], &c[2]), upto(107)),
        ("--at", c[2].at.clone(), upto(108)),
        ("--at-lsn", a[2].lsn.clone(), upto(102)),
        ("--at-lsn", c[0].lsn.clone(), upto(106)),
    ];
    let mut p = Problems::default();
    for (i, (flag, at, want)) in moments.iter().enumerate() {
        let name = format!("m{i}");
        let v = create(&d, &name, "prod", &[flag, at]);
        let got = moment_ids(&v);
        p.check(if &got == want {
            Ok(())
        } else {
            Err(format!(
                "vdb create {name} --from prod {flag} {at}: holds rows {got}, committed by then \
                 were {want}\nrows: {all:?}\n{}",
                vdb_logs(&d, &name)
            ))
        });
        p.check(
            if v.sql("SELECT count(*) FROM marker WHERE note <> 'moment'") == "10" {
                Ok(())
            } else {
                Err(format!(
                    "{name}: the rows from before the link are not all there"
                ))
            },
        );
        vdb(&d, &["delete", &name]);
    }

    // Outside the range, or not a moment: refused, printing the range or pointing to --at.
    let err = |args: &[&str], phrases: &[&str]| {
        let mut a = vec!["create", "bad", "--from"];
        a.extend_from_slice(args);
        vdb_error(&d, &a, phrases)
    };
    p.check(err(
        &["prod", "--at", "2001-01-01 00:00:00+00"],
        &[
            "before the first snapshot",
            "can be provisioned at any moment from",
            &first,
        ],
    ));
    p.check(err(
        &["prod", "--at", "2999-01-01 00:00:00+00"],
        &[
            "after the last wal received",
            "can be provisioned",
            "timeflow prod",
        ],
    ));
    p.check(err(
        &["prod", "--at-lsn", "FF/0"],
        &["after the last wal received"],
    ));
    p.check(err(&["prod", "--at", "yesterday"], &["utc offset"]));
    p.check(err(&["prod", "--at-lsn", "zz"], &["not an lsn"]));
    p.check(err(&[&s2, "--at", &a[1].at], &["--from source"]));
    p.check(err(
        &[
            "prod",
            "--set",
            "recovery_target_time=2026-01-01 00:00:00+00",
        ],
        &["recovery_target_time", "--at"],
    ));
    p.check(
        if list_names(&d).is_empty() && !dataset_names(&d).contains(&"bad".to_string()) {
            Ok(())
        } else {
            Err(format!(
                "refused creates left something: {:?}",
                list_names(&d)
            ))
        },
    );

    // The range, in timeflow and source status.
    let tf = json(&d.ok(&["timeflow", "prod", "--json"]), "timeflow --json");
    let range = &tf[0]["ranges"][0];
    p.check(
        if range["from_snapshot"] == first.as_str()
            && range["to_lsn"].as_str().map(parse_lsn) >= Some(parse_lsn(&c[2].lsn))
        {
            Ok(())
        } else {
            Err(format!(
                "timeflow prod --json: the source's range is wrong: {tf}"
            ))
        },
    );
    let st = source_status(&d, "prod");
    p.check(
        if st["ranges"] == tf[0]["ranges"] || st["ranges"][0]["from_lsn"] == range["from_lsn"] {
            Ok(())
        } else {
            Err(format!(
                "source status --json: ranges {} differ from timeflow's",
                st["ranges"]
            ))
        },
    );
    p.check(if st["wal_archive_files"].as_u64() >= Some(1) {
        Ok(())
    } else {
        Err(format!(
            "source status: the switched segment is not in the store's archive: {st}"
        ))
    });
    let text = d.ok(&["timeflow", "prod"]);
    p.check(if text.contains("provisionable") {
        Ok(())
    } else {
        Err(format!(
            "timeflow prod (text) does not show the range:\n{text}"
        ))
    });

    // refresh --at: the same VDB (port kept) at another moment.
    let v = create(&d, "moving", &s2, &[]);
    vdb(
        &d,
        &["refresh", "moving", "--at", &between(&src, &a[0], &a[1])],
    );
    let after = json(&vdb(&d, &["status", "moving", "--json"]), "vdb status");
    p.check(if moment_ids(&v) == upto(100) && after["port"] == v.port {
        Ok(())
    } else {
        Err(format!(
            "refresh --at: holds {} (want {}), status {after}",
            moment_ids(&v),
            upto(100)
        ))
    });
    p.finish();
}

// ---------------------------------------------------------------------------------------------
// A VDB's own history

// Rows committed in a VDB (across a WAL segment switch, so the store's archive serves them):
// `vdb rewind NAME --at TIME` brings back exactly the rows committed by then, keeping its port;
// later rewinds go to moments that were only on timelines an earlier rewind left (the VDB's
// history goes on across rewinds). A moment before the VDB's history is refused with its
// range, and `--at` of a VDB is refused pointing to rewind.
#[test]
fn a_vdb_rewinds_to_moments_of_its_own_history() {
    let src = SourceDb::start(false, &[]);
    src.insert_rows(1, 5, "from the source");
    let d = Vdbd { s: Staged::start() };
    link_small(&d, &src, "prod");
    let v = create(&d, "dev", "prod", &[]);
    let pause = || thread::sleep(Duration::from_millis(150));
    let now = |v: &Vdb| v.sql("SELECT clock_timestamp()::text");
    v.sql("CREATE TABLE t (id int)");
    let mut at = Vec::new();
    for id in 1..=5 {
        pause();
        v.sql(&format!("INSERT INTO t VALUES ({id})"));
        at.push(now(&v));
        if id == 2 {
            v.sql("SELECT pg_switch_wal()");
        }
    }
    pause();
    let before_first_rewind = now(&v);
    let rows = |v: &Vdb| v.sql("SELECT coalesce(string_agg(id::text, ',' ORDER BY id), '') FROM t");
    let rewind = |when: &str, want: &str| {
        vdb(&d, &["rewind", "dev", "--at", when]);
        assert_eq!(
            rows(&v),
            want,
            "rewind --at {when}\n{}",
            vdb_logs(&d, "dev")
        );
    };
    // Between rows 4 and 5.
    rewind(&at[3], "1,2,3,4");
    let st = json(&vdb(&d, &["status", "dev", "--json"]), "vdb status");
    assert_eq!(st["port"], v.port);
    assert!(st["history"]["from_time"].is_string(), "{st}");
    pause();
    v.sql("INSERT INTO t VALUES (6)");
    pause();
    let after_row_6 = now(&v);
    // Row 5 existed only on the timeline the first rewind left; row 6 only on the second one.
    rewind(&before_first_rewind, "1,2,3,4,5");
    rewind(&after_row_6, "1,2,3,4,6");
    rewind(&at[1], "1,2");

    let mut p = Problems::default();
    p.check(vdb_error(
        &d,
        &["rewind", "dev", "--at", "2001-01-01 00:00:00+00"],
        &["before the history of vdb dev"],
    ));
    p.check(vdb_error(
        &d,
        &["create", "x", "--from", "dev", "--at", &at[1]],
        &["not one", "rewind"],
    ));
    p.finish();
}

// ---------------------------------------------------------------------------------------------
// Verified snapshots

/// Corrupts line pointer 1's tuple of the first heap page of `table` on the stopped source so
/// that its checksum stays valid: checksums off, the tuple's xmin set far in the future (hint
/// bits cleared), checksums on again.
fn corrupt_first_heap_page(src: &mut SourceDb, table: &str) {
    let rel = src.psql(&format!("SELECT pg_relation_filepath('{table}')"));
    src.psql("CHECKPOINT");
    src.stop();
    let data = src.datadir.clone();
    let checksums = |what: &str| {
        let out = util::run_timeout(
            as_postgres(&pg("pg_checksums")).args([what, "-D", data.to_str().unwrap()]),
            Duration::from_secs(120),
        );
        assert!(
            out.status.success(),
            "pg_checksums {what}\n{}",
            util::describe(&out)
        );
    };
    checksums("--disable");
    let path = data.join(rel);
    let mut page = fs::read(&path).unwrap();
    let lp = u32::from_le_bytes(page[24..28].try_into().unwrap());
    let off = (lp & 0x7fff) as usize;
    page[off..off + 4].copy_from_slice(&0xFFFF_FFF0u32.to_le_bytes());
    let mask = u16::from_le_bytes(page[off + 20..off + 22].try_into().unwrap()) & !0x0300;
    page[off + 20..off + 22].copy_from_slice(&mask.to_le_bytes());
    fs::write(&path, &page).unwrap();
    checksums("--enable");
    src.start();
}

// A source linked with --verify: its snapshots are checked with pg_amcheck in the background
// and marked `verified: ok` (snapshot list, timeflow, source status). A heap page corrupted on
// the source (a page-level write while it is stopped, checksums kept valid) reaches staging with
// the next change to that page; the next snapshot is marked `failed` with pg_amcheck's report,
// and `vdb create --verified` takes the last good snapshot, whose VDB passes amcheck. `source set
// --verify off` turns the marks off.
#[test]
fn verified_snapshots_mark_corruption_and_verified_takes_the_last_good_one() {
    let mut src = SourceDb::start(false, &[]);
    src.insert_rows(1, 50, "from the source");
    let d = Vdbd { s: Staged::start() };
    link_small_with(&d, &src, "prod", &["--verify"]);
    let good = source_snapshot(&d, "prod");
    let e = wait_mark(&d, &good, "verified", "ok", Duration::from_secs(120));
    assert_eq!(e["prepared"], "ready", "{e}");

    corrupt_first_heap_page(&mut src, "marker");
    // The next change to that page brings the whole (corrupt) page to staging.
    src.psql("UPDATE marker SET note = 'touched' WHERE id = 30");
    wait_replayed(&d, "prod", src.lsn());
    let bad = source_snapshot(&d, "prod");
    let e = wait_mark(&d, &bad, "verified", "failed", Duration::from_secs(120));
    let failures = e["verify_failures"].to_string();
    assert!(
        failures.contains("marker") && failures.contains("xmin"),
        "the failed snapshot should carry pg_amcheck's report on the heap page: {e}"
    );
    let st = source_status(&d, "prod");
    assert!(
        st["verify"] == true && st["last_snapshot"]["verified"] == "failed",
        "source status should show the verification: {st}"
    );
    let tf = json(&d.ok(&["timeflow", "prod", "--json"]), "timeflow --json");
    let node = tf[0]["children"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == bad.as_str())
        .cloned()
        .unwrap_or_default();
    assert!(node["verified"] == "failed", "timeflow: {node}");

    let v = create(&d, "safe", "prod", &["--verified"]);
    let st = json(&vdb(&d, &["status", "safe", "--json"]), "vdb status");
    assert_eq!(
        st["parent"],
        good.as_str(),
        "--verified takes the last good snapshot"
    );
    v.amcheck();
    assert_eq!(
        v.sql("SELECT count(*) FROM marker WHERE note = 'touched'"),
        "0"
    );

    d.ok(&["source", "set", "prod", "--verify", "off"]);
    let after = snapshot_entry(&d, &bad);
    assert_eq!(after["verified"], "failed", "a result stays: {after}");
    let err = vdb_error(
        &d,
        &["create", "x", "--from", &good, "--verified"],
        &["--from source"],
    );
    assert!(err.is_ok(), "{err:?}");
}
