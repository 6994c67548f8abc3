//! A VDB operation cut short by `kill -9` of the daemon leaves the VDB either as it was or not
//! created, never half-made (issue 5): the next daemon removes a create that did not finish and
//! puts a refresh that did not finish back on its undo snapshot, with its data, parent and
//! running state. The daemon is killed while the `configure-clone` hook of the operation runs
//! (after the clone, mount, configuration and start: the most that can be half-done).
//!
//! The VDBs here come from a snapshot of a plain dataset holding a cluster made by initdb, so no
//! source is needed.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use crate::util::source::{cleanup_names, dataset_names};
use crate::util::vdb::{status, try_psql};
use crate::util::{
    self, describe, kill_processes_under, pid_alive, wait_child, wait_until, Daemon, Postgres,
};

const WAIT: Duration = Duration::from_secs(90);

/// Deletes every VDB (stopping their postgres) and kills what is left under the test dir, also
/// when the test fails. Declared after the daemon, so it runs before the daemon's own cleanup.
struct VdbCleanup<'a>(&'a Daemon);

impl Drop for VdbCleanup<'_> {
    fn drop(&mut self) {
        for n in cleanup_names(self.0, &["vdb", "list", "--json"], |_| true) {
            let _ = self.0.vdbfs(&["vdb", "delete", &n]);
        }
        let killed = kill_processes_under(self.0.root());
        if !killed.is_empty() {
            eprintln!("cleanup killed leftovers: {killed:?}");
        }
    }
}

/// Dataset `base` holding a stopped cluster with `t` = 1..=rows, snapshotted as `base@NAME`.
fn base_snapshot(d: &Daemon, snap: &str, rows: i64) {
    if !dataset_names(d).iter().any(|n| n == "base") {
        d.create_dataset("base");
    }
    let mp = d.new_mountpoint("base");
    let m = d.mount("base", &mp);
    let mut pgc = if m.path.join("PG_VERSION").exists() {
        Postgres::on(&m.path)
    } else {
        Postgres::initdb(&m.path)
    };
    pgc.start();
    pgc.psql(&format!(
        "CREATE TABLE IF NOT EXISTS t (id int primary key); TRUNCATE t; \
         INSERT INTO t SELECT generate_series(1, {rows})"
    ));
    pgc.stop();
    drop(pgc);
    d.ok(&["snapshot", "create", "base", "--name", snap]);
    m.umount();
}

/// SQL on a VDB through its connection string (root over its private socket).
fn vdb_sql(d: &Daemon, name: &str, sql: &str) -> String {
    let conn = status(d, name)["conn"].as_str().unwrap().to_string();
    let out = try_psql(&conn, sql);
    assert!(
        out.status.success(),
        "psql on VDB {name}: {sql}\n{}\n{}",
        describe(&out),
        d.log_tail(30)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A hooks dir whose configure-clone hook, while `slow` exists, says it started and sleeps.
fn slow_hooks(root: &Path) -> (PathBuf, PathBuf, PathBuf) {
    crate::util::vdb::slow_hook(root, "configure-clone")
}

/// Starts a vdbfs command in the background (it is cut short by the daemon's death).
fn spawn(d: &Daemon, args: &[&str]) -> Child {
    d.command()
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn pid_file(d: &Daemon, name: &str) -> PathBuf {
    d.store().join("vdbs").join(name).join("postmaster.pid")
}

fn recorded_pid(d: &Daemon, name: &str) -> Option<i32> {
    fs::read_to_string(pid_file(d, name))
        .ok()
        .and_then(|s| s.trim().parse().ok())
}

/// Waits for the hook to start, then kills the daemon; returns the VDB's postgres PID then.
fn kill_during_hook(d: &mut Daemon, started: &Path, child: &mut Child, name: &str) -> i32 {
    assert!(
        wait_until(WAIT, || started.exists()),
        "the configure-clone hook of {name} never started\n{}",
        d.log_tail(30)
    );
    let pid = recorded_pid(d, name).expect("postgres of the VDB runs while configure-clone runs");
    assert!(pid_alive(pid));
    d.kill9();
    assert!(
        wait_child(child, WAIT).is_some(),
        "the CLI did not end with its daemon"
    );
    pid
}

#[test]
fn kill9_during_create_leaves_no_half_made_vdb() {
    util::require_root_fuse_postgres();
    let mut d = Daemon::start();
    base_snapshot(&d, "s1", 100);
    let (hooks, slow, started) = slow_hooks(d.root());
    fs::write(&slow, "").unwrap();
    let hooks_s = hooks.to_str().unwrap().to_string();
    let mut child = spawn(
        &d,
        &[
            "vdb", "create", "v1", "--from", "base@s1", "--hooks", &hooks_s,
        ],
    );
    let old_pg = kill_during_hook(&mut d, &started, &mut child, "v1");
    d.start_again();
    let _cleanup = VdbCleanup(&d);

    // The next daemon undoes the create: no VDB, dataset, files, mount or postgres.
    let gone = wait_until(WAIT, || {
        cleanup_names(&d, &["vdb", "list", "--json"], |_| true).is_empty()
    });
    assert!(
        gone,
        "v1 is still listed after the restart\n{}",
        d.log_tail(30)
    );
    let datasets = d.ok(&["dataset", "list", "--json"]);
    assert!(
        !datasets.contains("\"v1\""),
        "dataset v1 is left: {datasets}"
    );
    assert!(!d.store().join("vdbs/v1").exists(), "STORE/vdbs/v1 is left");
    let mp = d.store().join("mnt/v1");
    assert!(!util::is_mounted(&mp), "{} is still mounted", mp.display());
    assert!(
        wait_until(Duration::from_secs(20), || !pid_alive(old_pg)),
        "postgres {old_pg} of the cut-short create still runs"
    );
    let log = d.log();
    assert!(
        log.contains("undoing an operation cut short"),
        "the daemon log does not say it undid the create:\n{}",
        d.log_tail(30)
    );

    // The name is free again and a create without the slow hook works.
    fs::remove_file(&slow).unwrap();
    d.ok(&[
        "vdb", "create", "v1", "--from", "base@s1", "--hooks", &hooks_s,
    ]);
    assert_eq!(vdb_sql(&d, "v1", "SELECT count(*) FROM t"), "100");
}

#[test]
fn kill9_during_refresh_puts_the_vdb_back_as_it_was() {
    util::require_root_fuse_postgres();
    let mut d = Daemon::start();
    base_snapshot(&d, "s1", 100);
    let (hooks, slow, started) = slow_hooks(d.root());
    let hooks_s = hooks.to_str().unwrap().to_string();
    d.ok(&[
        "vdb",
        "create",
        "v2",
        "--from",
        "base@s1",
        "--hooks",
        &hooks_s,
        "--set",
        "work_mem=7MB",
    ]);
    // The VDB's own change, which a refresh replaces and an undo must bring back.
    vdb_sql(&d, "v2", "INSERT INTO t VALUES (-1)");
    let port = status(&d, "v2")["port"].as_u64().unwrap();
    base_snapshot(&d, "s2", 1000);

    fs::write(&slow, "").unwrap();
    let mut child = spawn(&d, &["vdb", "refresh", "v2", "--to", "base@s2"]);
    let old_pg = kill_during_hook(&mut d, &started, &mut child, "v2");
    d.start_again();
    let _cleanup = VdbCleanup(&d);

    let back = wait_until(WAIT, || {
        let s = status(&d, "v2");
        s["state"] == "running" && s["pid"].as_i64().is_some_and(|p| p as i32 != old_pg)
    });
    assert!(
        back,
        "v2 is not running again after the restart: {}\n{}",
        status(&d, "v2"),
        d.log_tail(40)
    );
    let s = status(&d, "v2");
    assert_eq!(s["parent"], "base@s1", "the parent goes back: {s}");
    assert_eq!(s["port"].as_u64().unwrap(), port, "same port");
    assert!(
        s["snapshots"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n.as_str().unwrap().starts_with("v2@auto-before-refresh-")),
        "the undo snapshot is listed: {s}"
    );
    assert_eq!(
        vdb_sql(&d, "v2", "SELECT count(*), min(id) FROM t"),
        "101|-1",
        "v2 has its own data back, not base@s2's"
    );
    assert_eq!(vdb_sql(&d, "v2", "SHOW work_mem"), "7MB");
    assert!(!pid_alive(old_pg), "the old postgres {old_pg} still runs");

    // Without the slow hook the refresh goes through.
    fs::remove_file(&slow).unwrap();
    d.ok(&["vdb", "refresh", "v2", "--to", "base@s2"]);
    assert_eq!(vdb_sql(&d, "v2", "SELECT count(*) FROM t"), "1000");
    assert_eq!(status(&d, "v2")["parent"], "base@s2");
}
