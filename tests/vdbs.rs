//! Virtual databases (issue 5), against the contract of `vdbfs vdb ...` and `vdbfs timeflow`
//! (/work/notes/vdb-contract.md): every test links a real PostgreSQL 15 source on loopback (a
//! staging standby on vdbfs) and provisions VDBs from its snapshots, real postgres servers on the
//! real FUSE mounts.
//!
//! Pinned here: two VDBs from one snapshot run at once on their own ports, each sees only its own
//! writes, the source and the snapshot stay as they were, both pass pg_amcheck, and `vdb list` /
//! `vdb status` tell state, port, parent, data dir and a connection string that works; a VDB
//! from the first snapshot of an idle source (its LSN at a WAL segment boundary) works; refresh
//! brings rows committed on the source since the last snapshot and keeps port, data dir and
//! `--set` values; rewind brings back a bookmark's state exactly; a child VDB from a VDB snapshot
//! has the parent's changes; hooks run in the contract's order with the VDB's environment, a
//! configure-clone hook (run once postgres is up) can mask data, a failing pre-start hook leaves
//! the VDB stopped, a failing configure-clone leaves a refreshed VDB as it was, on create either
//! undoes the create, and the error shows the hook's output; delete stops, unmounts and frees
//! everything, and children of a deleted VDB keep working; bad input (unknown snapshot, port in
//! use, name taken, bad `--set`, a dataset without snapshots) is a clear error naming the VDB,
//! the operation and the culprit, and leaves nothing behind; running VDBs come back after a
//! daemon restart and after a daemon crash (the old postmaster gone), answering once `running`;
//! `timeflow` draws source -> snapshot -> VDB -> snapshot/bookmark -> child.
//!
//! Every test cleans up through `util::vdb::Vdbd` (VDBs stopped, leftovers killed by PID), also
//! when it fails.
//!
//! Long file (about 1,350 lines), on purpose: the contract of `vdbfs vdb` and `vdbfs timeflow`
//! in one place, each test a scenario against real servers; the harness lives in `util::vdb`.

use std::fs;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::util::source::{
    before, dataset_names, error_text, fmt_lsn, json, mounts_under, new_processes_on_store,
    parse_lsn, source_snapshot, wait_replayed, wait_syncing, Before, REPL_PW, WAIT,
};
use crate::util::vdb::*;
use crate::util::{self, describe, pid_alive, Daemon, PG_BIN};

// ---------------------------------------------------------------------------------------------
// Two VDBs from one snapshot

// Two VDBs from the same snapshot run at once on different ports (one from the port pool, one
// with --port and --mount): `vdb create` prints the unix-socket connection string first (text) or
// the VdbStatus (--json), psql works at once; each VDB sees only its own writes; the source is
// untouched and the staging keeps replaying; the snapshot still has the old content (a third VDB
// from it shows it); both pass pg_amcheck --heapallindexed; `vdb list` and `vdb status` agree
// and tell state, port, parent, data dir, socket dir, connection strings and settings; the TCP
// listener takes the source's passwords (scram); plain `umount` and `dataset delete` of a VDB's
// dataset are refused.
#[test]
fn two_vdbs_from_one_snapshot_are_isolated_and_pass_amcheck() {
    let s = setup(300);
    let d = &s.d;
    let src_fp = s.src.psql(FINGERPRINT);

    // dev1: text output, port from the pool, a --set.
    let out = vdb(
        d,
        &[
            "create",
            "dev1",
            "--from",
            &s.snap,
            "--set",
            "shared_buffers=32MB",
        ],
    );
    let st1 = status(d, "dev1");
    let dev1 = Vdb::of(&st1);
    assert_eq!(
        out.lines().next().unwrap_or_default(),
        dev1.conn,
        "the first stdout line of `vdb create` should be the connection string\n{out}"
    );
    let (lo, hi) = d.vdb_ports();
    assert!(
        (lo..=hi).contains(&dev1.port),
        "without --port the port comes from the daemon's pool {lo}-{hi}: {st1}"
    );
    assert!(
        out.contains(&format!(
            "postgresql://postgres@127.0.0.1:{}/postgres",
            dev1.port
        )),
        "`vdb create` text output lacks the tcp form\n{out}"
    );
    assert_eq!(
        dev1.sql("SELECT count(*) FROM marker"),
        "300",
        "psql should work at once after `vdb create` and see the snapshot's rows"
    );
    assert_status(
        d,
        &st1,
        "dev1",
        dev1.port,
        &s.snap,
        &d.store().join("mnt").join("dev1"),
        serde_json::json!({"shared_buffers": "32MB"}),
    );

    // dev2: --port, --mount outside the store, --json.
    let port2 = util::free_port();
    let mnt2 = d.root().join("dev2-data");
    let dev2 = create(
        d,
        "dev2",
        &s.snap,
        &[
            "--port",
            &port2.to_string(),
            "--mount",
            mnt2.to_str().unwrap(),
            "--keep-source-logins",
        ],
    );
    assert_eq!(dev2.sql("SELECT count(*) FROM marker"), "300");
    let st2 = status(d, "dev2");
    assert_status(
        d,
        &st2,
        "dev2",
        port2,
        &s.snap,
        &mnt2,
        serde_json::json!({}),
    );
    assert!(
        st2["hooks"].is_null(),
        "no --hooks and no STORE/hooks: hooks should be null: {st2}"
    );

    for (v, p) in [(&dev1, dev1.port), (&dev2, port2)] {
        assert_eq!(
            v.sql("SELECT current_setting('port') || ' ' || pg_is_in_recovery()"),
            format!("{p} false"),
            "VDB {} should be a primary on port {p}",
            v.name
        );
        assert_eq!(
            v.fingerprint(),
            src_fp,
            "VDB {} differs from the source",
            v.name
        );
    }
    assert_eq!(dev1.sql("SHOW shared_buffers"), "32MB");

    // Each writes its own data.
    dev1.sql(
        "INSERT INTO marker VALUES (1001, 'dev1 only'); \
         CREATE TABLE dev1_table AS SELECT g FROM generate_series(1, 50) g",
    );
    dev2.sql(
        "UPDATE marker SET note = 'dev2 edit' WHERE id <= 100; DELETE FROM marker WHERE id > 250",
    );
    let probe = "SELECT count(*) || '|' || count(*) FILTER (WHERE note = 'dev2 edit') || '|' || \
                 count(*) FILTER (WHERE id = 1001) || '|' || \
                 (to_regclass('public.dev1_table') IS NOT NULL) FROM marker";
    assert_eq!(dev1.sql(probe), "301|0|1|true", "dev1 sees other data");
    assert_eq!(dev2.sql(probe), "250|100|0|false", "dev2 sees other data");

    // The source and the staging are untouched.
    assert_eq!(
        s.src.psql(probe),
        "300|0|0|false",
        "VDB writes reached the source"
    );
    assert_eq!(s.src.psql(FINGERPRINT), src_fp);
    wait_syncing(d, "prod");
    s.src.insert_rows(301, 310, "while VDBs run");
    wait_replayed(d, "prod", s.src.lsn());
    let dev3 = create(
        d,
        "dev3",
        &s.snap,
        &["--port", &util::free_port().to_string()],
    );
    assert_eq!(
        dev3.fingerprint(),
        src_fp,
        "the snapshot {} changed after VDBs were made from it and wrote",
        s.snap
    );

    dev1.amcheck();
    dev2.amcheck();

    // A VDB's dataset is the VDB's: plain umount and dataset delete are refused.
    for args in [
        vec!["umount", mnt2.to_str().unwrap()],
        vec!["dataset", "delete", "dev2"],
        vec!["dataset", "delete", "dev2", "--with-snapshots"],
    ] {
        let out = d.vdbfs(&args);
        assert!(
            !out.status.success() && error_text(&out).contains("dev2"),
            "`vdbfs {}` of a VDB's dataset should be refused naming dev2\n{}",
            args.join(" "),
            describe(&out)
        );
    }
    assert!(
        running(&status(d, "dev2")) && util::is_mounted(&mnt2),
        "a refused umount / dataset delete disturbed dev2"
    );

    // The TCP listener: loopback, scram with the source's passwords (--keep-source-logins;
    // without it they are removed, see http::production_logins_fail_on_a_vdb_and_the_owners_works).
    let url = |pw: &str| format!("postgresql://replicator:{pw}@127.0.0.1:{}/postgres", port2);
    let out = try_psql(&url(REPL_PW), "SELECT current_user");
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "replicator",
        "a TCP connection to dev2 with the source's replicator password failed\n{}",
        describe(&out)
    );
    let out = try_psql(&url("wrong-password"), "SELECT 1");
    assert!(
        !out.status.success(),
        "a TCP connection to dev2 with a wrong password worked: pg_hba should be scram"
    );

    // list agrees with status.
    let listed = list(d);
    let mut names: Vec<&str> = listed.iter().filter_map(|v| v["name"].as_str()).collect();
    names.sort();
    assert_eq!(
        names,
        ["dev1", "dev2", "dev3"],
        "vdb list --json: {listed:?}"
    );
    for e in &listed {
        let name = e["name"].as_str().unwrap();
        let st = status(d, name);
        for k in [
            "state",
            "port",
            "data_dir",
            "socket_dir",
            "pid",
            "parent",
            "parent_dataset",
            "conn",
            "tcp_conn",
            "settings",
            "hooks",
            "log",
        ] {
            assert_eq!(
                e[k], st[k],
                "vdb list and vdb status disagree on {k} of {name}:\nlist: {e}\nstatus: {st}"
            );
        }
    }
    let text = vdb(d, &["list"]);
    for n in ["dev1", "dev2", "dev3"] {
        assert!(text.contains(n), "`vdb list` does not show {n}:\n{text}");
    }
}

// What a user does first after linking: `vdb create dev1 --from prod` from the first snapshot of
// an idle source, whose LSN sits at a WAL segment boundary; and a refresh right after a WAL
// switch on the source (a snapshot at a segment boundary again). Each VDB starts, has exactly
// the snapshot's rows and passes pg_amcheck.
#[test]
fn vdbs_from_snapshots_at_a_wal_segment_boundary() {
    let s = setup(100);
    let d = &s.d;
    let lsn = snapshot_lsn(d, &s.first);
    assert!(
        lsn & (WAL_SEGMENT - 1) == 0,
        "test premise: the first snapshot {} of an idle source should be at a WAL segment \
         boundary, its LSN is {}",
        s.first,
        fmt_lsn(lsn)
    );
    let dev1 = create(
        d,
        "dev1",
        &s.first,
        &["--port", &util::free_port().to_string()],
    );
    assert_eq!(dev1.sql("SELECT count(*) FROM marker"), "100");
    dev1.amcheck();

    s.src.insert_rows(101, 110, "before a WAL switch");
    let end = s.src.switch_wal();
    wait_replayed(d, "prod", end);
    vdb(d, &["refresh", "dev1"]);
    let parent = status(d, "dev1")["parent"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let lsn = snapshot_lsn(d, &parent);
    eprintln!(
        "refresh onto {parent} at {} (segment boundary: {})",
        fmt_lsn(lsn),
        lsn & (WAL_SEGMENT - 1) == 0
    );
    assert_eq!(
        dev1.sql("SELECT count(*) FROM marker"),
        "110",
        "after a refresh onto {parent} dev1 lacks rows committed before the WAL switch"
    );
    dev1.amcheck();
}

// ---------------------------------------------------------------------------------------------
// Refresh, rewind, bookmarks, children

// Refresh brings rows committed on the source since the last snapshot (`vdb refresh` of a VDB of
// a linked source takes a new validated snapshot first) and drops the VDB's own changes, keeping
// name, port, data dir, connection string and `--set` values, after an automatic undo snapshot.
// Rewind to a bookmark (short and full name) brings back its state exactly. A child VDB from a
// VDB snapshot has the parent's changes and neither sees the other's later writes.
#[test]
fn refresh_rewind_and_child_vdbs_keep_identity_and_data() {
    let s = setup(200);
    let d = &s.d;
    let port = util::free_port();
    // Without @: the latest snapshot of the source.
    let dev1 = create(
        d,
        "dev1",
        "prod",
        &["--port", &port.to_string(), "--set", "work_mem=7MB"],
    );
    let st0 = status(d, "dev1");
    assert_eq!(
        st0["parent"], s.snap,
        "--from prod should take prod's latest snapshot: {st0}"
    );
    assert_eq!(dev1.sql("SHOW work_mem"), "7MB");
    dev1.sql("INSERT INTO marker VALUES (9001, 'dev1 local')");

    // Refresh.
    s.src.insert_rows(201, 260, "after the first snapshot");
    wait_replayed(d, "prod", s.src.lsn());
    vdb(d, &["refresh", "dev1"]);
    let st1 = status(d, "dev1");
    assert!(running(&st1), "dev1 should run after refresh: {st1}");
    for k in [
        "port",
        "data_dir",
        "socket_dir",
        "conn",
        "tcp_conn",
        "settings",
    ] {
        assert_eq!(
            st1[k], st0[k],
            "refresh changed {k}\nbefore: {st0}\nafter: {st1}"
        );
    }
    let parent = st1["parent"].as_str().unwrap_or_default();
    assert!(
        parent.starts_with("prod@") && parent != s.snap,
        "after refresh the parent should be a new snapshot of prod: {st1}"
    );
    assert!(
        snapshot_names(d, "prod").iter().any(|n| n == parent),
        "the refresh parent {parent} is not a snapshot of prod"
    );
    assert_eq!(
        dev1.sql("SELECT count(*) || '|' || max(id) FILTER (WHERE id < 9000) || '|' || count(*) FILTER (WHERE id = 9001) FROM marker"),
        "260|260|0",
        "after refresh dev1 should hold the source's rows 1..260 (and not its own row 9001)"
    );
    assert_eq!(
        dev1.sql("SHOW work_mem"),
        "7MB",
        "refresh lost --set work_mem"
    );
    let auto = |op: &str| {
        let prefix = format!("dev1@auto-before-{op}-");
        let names = snapshot_names(d, "dev1");
        assert!(
            names.iter().any(|n| n.starts_with(&prefix)),
            "no automatic undo snapshot {prefix}... of dev1: {names:?}"
        );
    };
    auto("refresh");

    // A migration, a bookmark and a snapshot of it.
    dev1.sql(
        "CREATE TABLE migration (v int PRIMARY KEY, what text); \
         INSERT INTO migration VALUES (1, 'add column'), (2, 'backfill'); \
         ALTER TABLE marker ADD COLUMN flag bool NOT NULL DEFAULT false; \
         UPDATE marker SET note = 'migrated', flag = true WHERE id % 2 = 0",
    );
    let bm = json(
        &vdb(d, &["bookmark", "dev1", "before-test", "--json"]),
        "vdb bookmark --json",
    );
    assert!(
        bm["name"] == "dev1@before-test" && bm["kind"] == "bookmark",
        "vdb bookmark --json: {bm}"
    );
    let sn = json(
        &vdb(
            d,
            &["snapshot", "dev1", "--name", "after-migration", "--json"],
        ),
        "vdb snapshot --json",
    );
    assert!(
        sn["name"] == "dev1@after-migration"
            && sn["kind"] == "snapshot"
            && sn["lsn"].as_str().is_some_and(|l| parse_lsn(l) > 0)
            && sn["timeline"].as_u64().is_some_and(|t| t >= 1),
        "vdb snapshot --json should have name, kind snapshot, lsn and timeline: {sn}"
    );
    let migrated = dev1.fingerprint();
    let st = status(d, "dev1");
    assert!(
        strings(&st["bookmarks"]).contains(&"dev1@before-test".to_string())
            && strings(&st["snapshots"]).contains(&"dev1@after-migration".to_string()),
        "vdb status should list the bookmark and the snapshot: {st}"
    );

    // Scribble, rewind to the bookmark (short name), then to the snapshot (full name).
    let scribble = "UPDATE marker SET note = 'scribbled'; DELETE FROM marker WHERE id > 100; \
                    DROP TABLE migration; CREATE TABLE junk AS SELECT 1 AS x";
    for to in ["before-test", "dev1@after-migration"] {
        dev1.sql(scribble);
        assert_ne!(dev1.fingerprint(), migrated);
        vdb(d, &["rewind", "dev1", "--to", to]);
        let st = status(d, "dev1");
        assert!(
            running(&st) && st["port"] == st0["port"] && st["conn"] == st0["conn"],
            "after rewind --to {to} dev1 should run on the same port: {st}"
        );
        assert_eq!(
            dev1.fingerprint(),
            migrated,
            "rewind --to {to} did not bring back its state exactly"
        );
        assert_eq!(
            dev1.sql("SHOW work_mem"),
            "7MB",
            "rewind lost --set work_mem"
        );
    }
    auto("rewind");

    // A child from the snapshot has the migration, not dev1's later writes; and vice versa.
    dev1.sql("INSERT INTO marker (id, note) VALUES (9100, 'after the snapshot')");
    let child = create(
        d,
        "child",
        "dev1@after-migration",
        &["--port", &util::free_port().to_string()],
    );
    let st = status(d, "child");
    assert!(
        st["parent"] == "dev1@after-migration" && st["parent_dataset"] == "dev1",
        "child's parent should be dev1@after-migration: {st}"
    );
    assert_eq!(
        child.fingerprint(),
        migrated,
        "the child VDB lacks the parent's changes at dev1@after-migration (or has later ones)"
    );
    child.sql("INSERT INTO marker (id, note) VALUES (9200, 'child only')");
    assert_eq!(
        dev1.sql("SELECT string_agg(id::text, ',' ORDER BY id) FROM marker WHERE id > 9000"),
        "9100"
    );
    assert_eq!(
        child.sql("SELECT string_agg(id::text, ',' ORDER BY id) FROM marker WHERE id > 9000"),
        "9200"
    );
}

// ---------------------------------------------------------------------------------------------
// Hooks

const HOOKS: [&str; 11] = [
    "configure-clone",
    "pre-start",
    "post-start",
    "pre-stop",
    "post-stop",
    "pre-snapshot",
    "post-snapshot",
    "pre-refresh",
    "post-refresh",
    "pre-rewind",
    "post-rewind",
];

/// A hooks directory whose every hook appends `HOOK VDB PORT DATA_DIR up|down` (whether the
/// VDB's postgres accepts connections, asked with pg_isready through PGHOST/PGPORT) to a log,
/// saves its environment and cwd, and prints a line to stdout (for the VDB log). A hook fails
/// instead (a line on stdout and one on stderr, exit 1, nothing logged) while
/// [`Hooks::block`] is in force for it and the VDB.
struct Hooks {
    root: PathBuf,
    dir: PathBuf,
    log: PathBuf,
    envs: PathBuf,
}

impl Hooks {
    fn new(root: &Path) -> Hooks {
        let dir = root.join("hooks");
        let log = root.join("hooks.log");
        let envs = root.join("hook-env");
        fs::create_dir_all(&dir).unwrap();
        fs::create_dir_all(&envs).unwrap();
        let script = format!(
            "#!/bin/sh\n\
             if [ -e '{root}/block-'\"$VDBFS_HOOK-$VDBFS_VDB\" ]; then\n\
             \techo \"refusing $VDBFS_HOOK of $VDBFS_VDB: maintenance window (stdout)\"\n\
             \techo \"$VDBFS_HOOK hook says no for $VDBFS_VDB (stderr)\" >&2\n\
             \texit 1\n\
             fi\n\
             if {PG_BIN}/pg_isready -q -t 3; then st=up; else st=down; fi\n\
             echo \"$VDBFS_HOOK $VDBFS_VDB $VDBFS_PORT $VDBFS_DATA_DIR $st\" >> '{log}'\n\
             {{ env | grep -E '^(VDBFS_|PG)' | sort; echo \"CWD=$(pwd)\"; }} > '{envs}/'\"$VDBFS_VDB.$VDBFS_HOOK\"\n\
             echo \"hook-output $VDBFS_HOOK of $VDBFS_VDB\"\n",
            root = root.display(),
            log = log.display(),
            envs = envs.display(),
        );
        for h in HOOKS {
            let p = dir.join(h);
            fs::write(&p, &script).unwrap();
            fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
        }
        Hooks {
            root: root.to_path_buf(),
            dir,
            log,
            envs,
        }
    }

    /// Makes hook `hook` of VDB `vdb` fail (`on`) or work again.
    fn block(&self, hook: &str, vdb: &str, on: bool) {
        let f = self.root.join(format!("block-{hook}-{vdb}"));
        if on {
            fs::write(&f, "").unwrap();
        } else {
            fs::remove_file(&f).unwrap();
        }
    }

    /// The phrases of the output of hook `hook` of `vdb` while blocked (stdout and stderr).
    fn refusal(hook: &str, vdb: &str) -> [String; 2] {
        [
            format!("refusing {hook} of {vdb}: maintenance window (stdout)"),
            format!("{hook} hook says no for {vdb} (stderr)"),
        ]
    }

    /// The hook lines logged since the last call (the log is emptied).
    fn take(&self) -> Vec<String> {
        let s = fs::read_to_string(&self.log).unwrap_or_default();
        let _ = fs::remove_file(&self.log);
        s.lines().map(str::to_string).collect()
    }

    /// The environment (`KEY=VALUE`, and `CWD=`) the last run of a hook of a VDB had.
    fn env(&self, vdb: &str, hook: &str) -> Vec<String> {
        let p = self.envs.join(format!("{vdb}.{hook}"));
        fs::read_to_string(&p)
            .unwrap_or_else(|e| panic!("hook {hook} of {vdb} saved no environment: {e}"))
            .lines()
            .map(str::to_string)
            .collect()
    }
}

/// Checks the hook lines an operation logged: `(hook, "up"|"down"|"")` each, in order ("" does
/// not check whether postgres was up), each with the VDB's name, port and data dir.
fn check_hooks(hooks: &Hooks, op: &str, v: &Vdb, expect: &[(&str, &str)]) -> Result<(), String> {
    let got = hooks.take();
    let log = got.join("\n");
    let hooks_of: Vec<&str> = got
        .iter()
        .map(|l| l.split(' ').next().unwrap_or(""))
        .collect();
    let want: Vec<&str> = expect.iter().map(|e| e.0).collect();
    let mut wrong = Vec::new();
    if hooks_of != want {
        wrong.push(format!(
            "the hooks ran in the order {hooks_of:?}; the contract's is {want:?}"
        ));
    }
    for line in &got {
        let mut f = line.split(' ');
        let (hook, name, port, dir, up) = (f.next(), f.next(), f.next(), f.next(), f.next());
        let hook = hook.unwrap_or_default();
        if name != Some(v.name.as_str())
            || port != Some(v.port.to_string().as_str())
            || dir != v.data_dir.to_str()
        {
            wrong.push(format!(
                "hook {hook} got VDBFS_VDB / VDBFS_PORT / VDBFS_DATA_DIR {line:?}, want {} {} {}",
                v.name,
                v.port,
                v.data_dir.display()
            ));
        }
        let state = expect.iter().find(|e| e.0 == hook).map(|e| e.1);
        if let Some(state) = state.filter(|s| !s.is_empty() && up != Some(s)) {
            wrong.push(format!(
                "postgres should be {state} when hook {hook} runs, it was {}",
                up.unwrap_or("?")
            ));
        }
    }
    if wrong.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "hooks of `{op}`: {}\nhook log (HOOK VDB PORT DATA_DIR postgres-up?):\n{log}",
            wrong.join("; ")
        ))
    }
}

// Hooks (per VDB, --hooks DIR) run in the contract's order for create, stop, start, snapshot,
// bookmark, refresh (of a running VDB, and of a stopped one, which is started for configure-clone
// and stopped again) and rewind, with postgres down before start / after stop and up after start /
// before stop (configure-clone runs once postgres is up); they get VDBFS_* and PG* (PGHOST = socket
// dir) in the environment, run in STORE/vdbs/NAME, and their output lands in the VDB log. A
// failing pre-start hook leaves the VDB stopped (port free, no postmaster), a failing
// configure-clone leaves a refreshed VDB as it was (parent, data, running), and on create either
// undoes the create; each error shows the hook's output. A configure-clone hook can mask data
// through psql with the PG* environment.
#[test]
fn hooks_run_in_order_with_the_vdb_environment() {
    let s = setup(100);
    let d = &s.d;
    let mut p = Problems::default();
    let hooks = Hooks::new(d.root());
    let hooks_dir = hooks.dir.to_str().unwrap();
    let port = util::free_port();
    let dev1 = create(
        d,
        "dev1",
        &s.snap,
        &["--port", &port.to_string(), "--hooks", hooks_dir],
    );
    let started = [("pre-start", "down"), ("post-start", "up")];
    let stopped = [("pre-stop", "up"), ("post-stop", "down")];
    let cc_started = [
        ("pre-start", "down"),
        ("configure-clone", "up"),
        ("post-start", "up"),
    ];
    p.check(check_hooks(&hooks, "create", &dev1, &cc_started));
    let st = status(d, "dev1");
    assert_eq!(st["hooks"], hooks_dir, "status hooks: {st}");
    let env = hooks.env("dev1", "pre-start");
    let store = d.store().to_str().unwrap().to_string();
    for want in [
        "VDBFS_HOOK=pre-start".to_string(),
        "VDBFS_VDB=dev1".to_string(),
        format!("VDBFS_PORT={port}"),
        format!("VDBFS_DATA_DIR={}", dev1.data_dir.display()),
        format!("VDBFS_CONN={}", dev1.conn),
        format!("VDBFS_PARENT={}", s.snap),
        format!("VDBFS_STORE={store}"),
        format!("PGHOST={}", dev1.socket_dir.display()),
        format!("PGPORT={port}"),
        "PGUSER=postgres".to_string(),
        "PGDATABASE=postgres".to_string(),
        format!("CWD={store}/vdbs/dev1"),
    ] {
        if !env.contains(&want) {
            p.check::<()>(Err(format!(
                "the pre-start hook's environment lacks {want}: {env:?}"
            )));
        }
    }
    let vlog = fs::read_to_string(d.store().join("vdbs/dev1/vdb.log")).unwrap_or_default();
    if !vlog.contains("hook-output post-start of dev1") {
        p.check::<()>(Err(format!(
            "the hooks' output is not in STORE/vdbs/dev1/vdb.log:\n{vlog}"
        )));
    }

    vdb(d, &["stop", "dev1"]);
    p.check(check_hooks(&hooks, "stop", &dev1, &stopped));
    vdb(d, &["start", "dev1"]);
    p.check(check_hooks(&hooks, "start", &dev1, &started));
    let snapshotted = [("pre-snapshot", "up"), ("post-snapshot", "up")];
    vdb(d, &["snapshot", "dev1", "--name", "s1"]);
    p.check(check_hooks(&hooks, "snapshot", &dev1, &snapshotted));
    vdb(d, &["bookmark", "dev1", "b1"]);
    p.check(check_hooks(&hooks, "bookmark", &dev1, &snapshotted));
    vdb(d, &["refresh", "dev1"]);
    let refreshed: Vec<(&str, &str)> = [("pre-refresh", "up")]
        .into_iter()
        .chain(stopped)
        .chain(cc_started)
        .chain([("post-refresh", "up")])
        .collect();
    p.check(check_hooks(&hooks, "refresh (running)", &dev1, &refreshed));
    vdb(d, &["rewind", "dev1", "--to", "b1"]);
    let rewound: Vec<(&str, &str)> = [("pre-rewind", "up")]
        .into_iter()
        .chain(stopped)
        .chain(started)
        .chain([("post-rewind", "up")])
        .collect();
    p.check(check_hooks(&hooks, "rewind", &dev1, &rewound));
    vdb(d, &["stop", "dev1"]);
    hooks.take();
    vdb(d, &["refresh", "dev1"]);
    // Stopped: started for configure-clone, stopped again.
    let refreshed: Vec<(&str, &str)> = [("pre-refresh", "down")]
        .into_iter()
        .chain(cc_started)
        .chain(stopped)
        .chain([("post-refresh", "down")])
        .collect();
    p.check(check_hooks(&hooks, "refresh (stopped)", &dev1, &refreshed));
    let st = status(d, "dev1");
    if st["state"] != "stopped" || !st["pid"].is_null() {
        p.check::<()>(Err(format!(
            "a refreshed VDB keeps its running state (contract); after `vdb refresh dev1` of a \
             stopped dev1 it is {} with pid {}",
            st["state"], st["pid"]
        )));
        vdb(d, &["stop", "dev1"]);
        hooks.take();
    }

    // A failing pre-start hook: the VDB stays stopped, the error shows the hook's output.
    hooks.block("pre-start", "dev1", true);
    let [out1, out2] = Hooks::refusal("pre-start", "dev1");
    p.check(vdb_error(
        d,
        &["start", "dev1"],
        &["dev1", "pre-start", &out1, &out2],
    ));
    let st = status(d, "dev1");
    assert!(
        st["state"] == "stopped" && st["pid"].is_null(),
        "a failing pre-start hook should leave dev1 stopped: {st}"
    );
    assert!(
        util::processes_under(&dev1.data_dir).is_empty() && port_free(port),
        "a postgres runs on dev1 after its pre-start hook failed: {:?}",
        util::processes_under(&dev1.data_dir)
    );
    assert!(
        !dev1.try_sql("SELECT 1").status.success(),
        "dev1 answers after its pre-start hook failed"
    );
    hooks.block("pre-start", "dev1", false);
    vdb(d, &["start", "dev1"]);
    assert_eq!(dev1.sql("SELECT count(*) FROM marker"), "100");

    // A failing configure-clone on refresh: dev1 stays as it was.
    dev1.sql("INSERT INTO marker VALUES (7777, 'dev1 before a failed refresh')");
    s.src.insert_rows(101, 120, "for a refresh that fails");
    let (fp, parent) = (dev1.fingerprint(), status(d, "dev1")["parent"].clone());
    hooks.block("configure-clone", "dev1", true);
    let [out1, out2] = Hooks::refusal("configure-clone", "dev1");
    p.check(vdb_error(
        d,
        &["refresh", "dev1"],
        &["dev1", "refresh", "configure-clone", &out1, &out2],
    ));
    hooks.block("configure-clone", "dev1", false);
    let st = wait_vdb(d, "dev1", "running (as before the failed refresh)", |st| {
        running(st) && dev1.try_sql("SELECT 1").status.success()
    });
    assert_eq!(
        st["parent"], parent,
        "a refresh whose configure-clone failed changed dev1's parent: {st}"
    );
    assert_eq!(
        dev1.fingerprint(),
        fp,
        "a refresh whose configure-clone failed changed dev1's data"
    );

    // On create, a failing pre-start or configure-clone hook undoes the create.
    for (hook, name) in [("pre-start", "dev9"), ("configure-clone", "dev8")] {
        hooks.block(hook, name, true);
        let was = was(d);
        let [out1, out2] = Hooks::refusal(hook, name);
        p.check(vdb_error(
            d,
            &[
                "create",
                name,
                "--from",
                &s.snap,
                "--port",
                &util::free_port().to_string(),
                "--hooks",
                hooks_dir,
            ],
            &[name, hook, &out1, &out2],
        ));
        p.check(nothing_left(
            d,
            &was,
            name,
            &format!("create with a failing {hook} hook"),
        ));
    }

    // Masking in configure-clone, through psql and the PG* environment.
    let mask = d.root().join("mask-hooks");
    fs::create_dir(&mask).unwrap();
    let cc = mask.join("configure-clone");
    fs::write(
        &cc,
        format!(
            "#!/bin/sh\nset -e\necho \"masking $VDBFS_VDB via $PGHOST:$PGPORT\"\n\
             {PG_BIN}/psql -X -v ON_ERROR_STOP=1 -c \"UPDATE marker SET note = 'masked'\"\n"
        ),
    )
    .unwrap();
    fs::set_permissions(&cc, fs::Permissions::from_mode(0o755)).unwrap();
    let masked = create(
        d,
        "masked",
        &s.snap,
        &[
            "--port",
            &util::free_port().to_string(),
            "--hooks",
            mask.to_str().unwrap(),
        ],
    );
    assert_eq!(
        masked.sql("SELECT count(*) || '|' || count(*) FILTER (WHERE note = 'masked') FROM marker"),
        "100|100",
        "the configure-clone hook's UPDATE is not in the VDB"
    );
    assert_eq!(
        s.src
            .psql("SELECT count(*) FILTER (WHERE note = 'masked') FROM marker"),
        "0",
        "masking reached the source"
    );
    p.finish();
}

// ---------------------------------------------------------------------------------------------
// Delete

/// After `vdb delete NAME` (or a refused create): no VDB NAME (list, status), no dataset NAME, no
/// STORE/vdbs/NAME, its data dir not mounted, its postmaster gone, nothing running in its data dir.
#[track_caller]
fn assert_vdb_gone(d: &Daemon, name: &str, data_dir: &Path, pid: Option<i32>) {
    if let Some(pid) = pid {
        assert!(
            util::wait_until(Duration::from_secs(30), || !pid_alive(pid)),
            "the postmaster {pid} of VDB {name} still runs: {}",
            util::describe_pid(pid)
        );
    }
    assert!(
        !util::is_mounted(data_dir),
        "{} (VDB {name}) is still mounted",
        data_dir.display()
    );
    let left = util::processes_under(data_dir);
    assert!(
        left.is_empty(),
        "processes still run in {} (VDB {name}): {:?}",
        data_dir.display(),
        left.iter()
            .map(|p| util::describe_pid(*p))
            .collect::<Vec<_>>()
    );
    assert!(
        !dataset_names(d).iter().any(|n| n == name),
        "dataset {name} is still listed: {:?}",
        dataset_names(d)
    );
    assert!(
        !list_names(d).iter().any(|n| n == name),
        "vdb list still has {name}"
    );
    assert!(
        !try_vdb(d, &["status", name]).status.success(),
        "vdb status {name} still answers"
    );
    let vdir = d.store().join("vdbs").join(name);
    assert!(!vdir.exists(), "{} is still there", vdir.display());
}

// Delete of a running VDB stops its postgres (the PID is gone), unmounts it, removes its dataset
// and directory and frees its port. Delete of a VDB whose snapshot has a child VDB leaves the
// child running; it answers, writes, stops, starts and passes pg_amcheck afterwards.
#[test]
fn delete_stops_unmounts_frees_and_children_keep_working() {
    let s = setup(100);
    let d = &s.d;
    let p1 = util::free_port();
    let dev1 = create(d, "dev1", &s.snap, &["--port", &p1.to_string()]);
    let p2 = util::free_port();
    let dev2 = create(d, "dev2", &s.snap, &["--port", &p2.to_string()]);
    dev1.sql("INSERT INTO marker VALUES (500, 'dev1 row before s1')");
    vdb(d, &["snapshot", "dev1", "--name", "s1"]);
    let child = create(
        d,
        "child",
        "dev1@s1",
        &["--port", &util::free_port().to_string()],
    );

    // A plain running VDB.
    let pid2 = pid_of(&status(d, "dev2"));
    vdb(d, &["delete", "dev2"]);
    assert_vdb_gone(d, "dev2", &dev2.data_dir, pid2);
    assert!(port_free(p2), "port {p2} of the deleted dev2 is not free");

    // A VDB with a child.
    let pid1 = pid_of(&status(d, "dev1"));
    vdb(d, &["delete", "dev1"]);
    assert_vdb_gone(d, "dev1", &dev1.data_dir, pid1);
    assert!(port_free(p1), "port {p1} of the deleted dev1 is not free");

    let st = status(d, "child");
    assert!(
        running(&st),
        "the child of the deleted dev1 should still run: {st}"
    );
    assert_eq!(
        child.sql("SELECT note FROM marker WHERE id = 500"),
        "dev1 row before s1"
    );
    child.sql("INSERT INTO marker VALUES (600, 'child after the parent went')");
    vdb(d, &["stop", "child"]);
    vdb(d, &["start", "child"]);
    assert_eq!(
        child.sql("SELECT count(*) FROM marker"),
        "102",
        "the child lost data after its parent was deleted"
    );
    child.amcheck();
    vdb(d, &["snapshot", "child", "--name", "orphan-ok"]);
}

// ---------------------------------------------------------------------------------------------
// Bad input

/// What a refused `vdb create` must not change.
struct Was {
    datasets: Vec<String>,
    vdbs: Vec<String>,
    on_store: Before,
}

fn was(d: &Daemon) -> Was {
    Was {
        datasets: dataset_names(d),
        vdbs: list_names(d),
        on_store: before(d),
    }
}

/// After a refused `vdb create NAME`: the datasets are those of before, no VDB NAME, no
/// STORE/vdbs/NAME, the mounts under the test dir as before, no new process on the store (cwd
/// under it or its path on the command line). `Err` says what was left.
fn nothing_left(d: &Daemon, was: &Was, name: &str, what: &str) -> Result<(), String> {
    let mut left = Vec::new();
    let now = dataset_names(d);
    if now != was.datasets {
        left.push(format!("datasets {now:?} (before: {:?})", was.datasets));
    }
    let vdbs = list_names(d);
    if vdbs != was.vdbs {
        left.push(format!("VDBs {vdbs:?} (before: {:?})", was.vdbs));
    }
    let vdir = d.store().join("vdbs").join(name);
    if vdir.exists() && !was.vdbs.iter().any(|n| n == name) {
        left.push(format!("{}", vdir.display()));
    }
    let mounts = mounts_under(d.root());
    if mounts != was.on_store.mounts {
        left.push(format!(
            "mounts {mounts:?} (before: {:?})",
            was.on_store.mounts
        ));
    }
    let procs = new_processes_on_store(d, &was.on_store);
    if !procs.is_empty() {
        left.push(format!("processes on the store {procs:?}"));
    }
    if left.is_empty() {
        Ok(())
    } else {
        Err(format!("after {what}, left behind: {}", left.join("; ")))
    }
}

// Bad input is refused with an error naming the VDB and the culprit, and leaves nothing behind
// (no dataset, no VDB record or directory, no mount, no postgres): an unknown snapshot or
// dataset, a port in use (by anyone, or by another VDB), a name taken by a VDB or by a source, a
// bad name, a `--set` postgres rejects (bad value, unknown parameter), a dataset without
// snapshots. The names stay usable: a good create with one of them works afterwards.
#[test]
fn bad_input_is_a_clear_error_and_leaves_nothing_behind() {
    let s = setup(50);
    let d = &s.d;
    let mut p = Problems::default();
    let dev1 = create(
        d,
        "dev1",
        &s.snap,
        &["--port", &util::free_port().to_string()],
    );
    let pid1 = pid_of(&status(d, "dev1"));
    d.create_dataset("empty");
    let was = was(d);
    let port = util::free_port().to_string();
    let port = port.as_str();
    let snap = s.snap.as_str();
    let unknown = format!("{snap}x");
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_port = busy.local_addr().unwrap().port().to_string();
    let dev1_port = dev1.port.to_string();

    // (what, VDB name, the rest of `vdb create NAME`, what the error must name besides NAME)
    let cases: [(&str, &str, Vec<&str>, &str); 11] = [
        (
            "an unknown snapshot",
            "x1",
            vec!["--from", "prod@no-such-snapshot", "--port", port],
            "prod@no-such-snapshot",
        ),
        (
            "an unknown snapshot (an existing name plus a letter)",
            "x1",
            vec!["--from", &unknown, "--port", port],
            &unknown,
        ),
        (
            "an unknown dataset",
            "x2",
            vec!["--from", "no-such-dataset", "--port", port],
            "no-such-dataset",
        ),
        (
            "a dataset without snapshots",
            "x3",
            vec!["--from", "empty", "--port", port],
            "empty",
        ),
        (
            "--set shared_buffers=banana",
            "x4",
            vec![
                "--from",
                snap,
                "--port",
                port,
                "--set",
                "shared_buffers=banana",
            ],
            "shared_buffers",
        ),
        (
            "--set no_such_param=1",
            "x4",
            vec!["--from", snap, "--port", port, "--set", "no_such_param=1"],
            "no_such_param",
        ),
        (
            "a port in use (a listener of the test)",
            "x5",
            vec!["--from", snap, "--port", &busy_port],
            &busy_port,
        ),
        (
            "the port of another VDB",
            "x5",
            vec!["--from", snap, "--port", &dev1_port],
            &dev1_port,
        ),
        (
            "a name taken by a VDB",
            "dev1",
            vec!["--from", snap, "--port", port],
            "dev1",
        ),
        (
            "a name taken by a source",
            "prod",
            vec!["--from", snap, "--port", port],
            "prod",
        ),
        (
            "a name with a slash",
            "bad/name",
            vec!["--from", snap, "--port", port],
            "bad/name",
        ),
    ];
    for (what, name, rest, culprit) in &cases {
        let mut args = vec!["create", name];
        args.extend(rest);
        p.check(vdb_error(d, &args, &[name, "creat", culprit]).map_err(|e| format!("{what}: {e}")));
        p.check(nothing_left(d, &was, name, what));
    }
    drop(busy);

    // The refusals disturbed nothing.
    let st = status(d, "dev1");
    assert!(
        running(&st) && pid_of(&st) == pid1 && st["port"] == dev1.port,
        "a refused create of the name dev1 disturbed the VDB dev1: {st}"
    );
    assert_eq!(dev1.sql("SELECT count(*) FROM marker"), "50");
    wait_syncing(d, "prod");
    assert_eq!(list_names(d), ["dev1"], "vdb list after the refusals");

    // Nothing left blocks the names: x4 (which got as far as postgres) works now.
    let x4 = create(
        d,
        "x4",
        snap,
        &["--port", port, "--set", "shared_buffers=16MB"],
    );
    assert_eq!(x4.sql("SHOW shared_buffers"), "16MB");
    p.finish();
}

// ---------------------------------------------------------------------------------------------
// Daemon restart

/// A VDB whose status says running (`st`) accepts connections at once. If not, waits (bounded)
/// until it does, so the test can go on, and says how long that took.
fn answers_when_running(v: &Vdb, st: &Value, after: &str) -> Result<(), String> {
    let out = v.try_sql("SELECT 1");
    if out.status.success() {
        return Ok(());
    }
    let t = Instant::now();
    let ok = util::wait_until(WAIT, || v.try_sql("SELECT 1").status.success());
    assert!(
        ok,
        "VDB {} did not accept connections within {WAIT:?} after {after}\n{}",
        v.name,
        describe(&out)
    );
    Err(format!(
        "after {after}, `vdb status {}` said state running (pid {}) while postgres did not accept \
         connections yet (it did {:?} later); psql said: {}",
        v.name,
        st["pid"],
        t.elapsed(),
        String::from_utf8_lossy(&out.stderr).trim()
    ))
}

// After a daemon restart (SIGTERM, serve again) a VDB that was running is mounted and started
// again with its data (a new postmaster; the old one gone), a stopped one stays stopped; after a
// daemon crash (kill -9, serve again) the running VDB comes back too, the old postmaster (on the
// dead mount) is gone by PID, committed rows are there and it passes pg_amcheck.
#[test]
fn vdbs_come_back_after_daemon_restart_and_crash() {
    let mut s = setup(100);
    let mut p = Problems::default();
    let port = util::free_port();
    let dev1 = create(&s.d, "dev1", &s.snap, &["--port", &port.to_string()]);
    create(
        &s.d,
        "dev2",
        &s.snap,
        &["--port", &util::free_port().to_string()],
    );
    vdb(&s.d, &["stop", "dev2"]);
    dev1.sql("CREATE TABLE kept AS SELECT g AS id FROM generate_series(1, 1000) g");
    let pid1 = pid_of(&status(&s.d, "dev1")).unwrap();

    let t = Instant::now();
    s.d.restart();
    let st = wait_vdb(&s.d, "dev1", "running again after a daemon restart", |st| {
        running(st) && pid_of(st) != Some(pid1)
    });
    eprintln!(
        "dev1 running again {:?} after the restart began",
        t.elapsed()
    );
    assert!(
        !pid_alive(pid1),
        "the postmaster {pid1} from before the restart still runs"
    );
    assert!(
        st["port"] == port && util::is_mounted(&dev1.data_dir),
        "after a restart dev1 should be mounted and on port {port}: {st}"
    );
    p.check(answers_when_running(&dev1, &st, "a daemon restart"));
    assert_eq!(dev1.sql("SELECT count(*) FROM kept"), "1000");
    let st2 = status(&s.d, "dev2");
    assert!(
        st2["state"] == "stopped" && st2["pid"].is_null(),
        "a stopped VDB should stay stopped after a daemon restart: {st2}"
    );

    dev1.sql("INSERT INTO kept SELECT g FROM generate_series(1001, 1500) g");
    let pid2 = pid_of(&st).unwrap();
    let t = Instant::now();
    s.d.kill9();
    s.d.start_again();
    let st = wait_vdb(&s.d, "dev1", "running again after a daemon kill -9", |st| {
        running(st) && pid_of(st) != Some(pid2)
    });
    eprintln!(
        "dev1 running again {:?} after the daemon crash",
        t.elapsed()
    );
    assert!(
        util::wait_until(WAIT, || !pid_alive(pid2)),
        "the postmaster {pid2} on the crashed daemon's mount still runs: {}",
        util::describe_pid(pid2)
    );
    assert!(
        st["port"] == port && util::is_mounted(&dev1.data_dir),
        "after a crash dev1 should be mounted and on port {port}: {st}"
    );
    p.check(answers_when_running(&dev1, &st, "a daemon kill -9"));
    assert_eq!(
        dev1.sql("SELECT count(*) || '|' || max(id) FROM kept"),
        "1500|1500",
        "rows committed before the daemon crash are missing"
    );
    dev1.amcheck();
    let st2 = status(&s.d, "dev2");
    assert_eq!(st2["state"], "stopped", "dev2 after the crash: {st2}");
    vdb(&s.d, &["start", "dev2"]);
    p.finish();
}

// ---------------------------------------------------------------------------------------------
// TimeFlow

/// Whether a timeflow node is of `kind` and named `full` (or, for a snapshot, its short name).
fn is_node(n: &Value, kind: &str, full: &str) -> bool {
    let short = full.split_once('@').map(|p| p.1).unwrap_or(full);
    n["kind"] == kind && (n["name"] == full || n["name"] == short)
}

/// The child of `n` that is of `kind` named `full`.
#[track_caller]
fn child<'a>(n: &'a Value, kind: &str, full: &str) -> &'a Value {
    n["children"]
        .as_array()
        .and_then(|c| c.iter().find(|c| is_node(c, kind, full)))
        .unwrap_or_else(|| {
            panic!(
                "timeflow: node {} has no {kind} child {full}: {n}",
                n["name"]
            )
        })
}

/// Index of a child of `n` of `kind` named `full`.
fn child_index(n: &Value, kind: &str, full: &str) -> Option<usize> {
    n["children"]
        .as_array()
        .and_then(|c| c.iter().position(|c| is_node(c, kind, full)))
}

// `timeflow --json` is the tree source -> its snapshots (oldest first, with LSN and timeline) ->
// the VDB made from one -> its snapshot and bookmark (oldest first) -> the child VDB made from
// the snapshot; VDB nodes carry state and port; `timeflow prod` is that tree; the text form
// shows every name, one line each, deeper nodes further indented.
#[test]
fn timeflow_shows_source_snapshots_vdbs_bookmarks_and_children() {
    let s = setup(50);
    let d = &s.d;
    let port = util::free_port();
    create(d, "tf-dev", &s.snap, &["--port", &port.to_string()]);
    vdb(d, &["snapshot", "tf-dev", "--name", "tf-snap"]);
    vdb(d, &["bookmark", "tf-dev", "tf-mark"]);
    let kid_port = util::free_port();
    create(
        d,
        "tf-kid",
        "tf-dev@tf-snap",
        &["--port", &kid_port.to_string()],
    );
    let snap2 = source_snapshot(d, "prod");

    for args in [
        vec!["timeflow", "--json"],
        vec!["timeflow", "prod", "--json"],
    ] {
        let tf = json(&d.ok(&args), "timeflow --json");
        let roots = tf
            .as_array()
            .unwrap_or_else(|| panic!("`vdbfs {}` is not an array: {tf}", args.join(" ")));
        let prod = roots
            .iter()
            .find(|r| is_node(r, "source", "prod"))
            .unwrap_or_else(|| panic!("`vdbfs {}` has no source root prod: {tf}", args.join(" ")));
        let first = child(prod, "snapshot", &s.snap);
        assert!(
            first["lsn"].as_str().is_some_and(|l| parse_lsn(l) > 0)
                && first["timeline"].as_u64() == Some(1),
            "timeflow: a source snapshot node should carry lsn and timeline: {first}"
        );
        let (i1, i2) = (
            child_index(prod, "snapshot", &s.snap),
            child_index(prod, "snapshot", &snap2),
        );
        assert!(
            i1.is_some() && i2.is_some() && i1 < i2,
            "timeflow: prod's snapshots should be oldest first ({} before {snap2}): {prod}",
            s.snap
        );
        let dev = child(first, "vdb", "tf-dev");
        assert!(
            dev["state"] == "running" && dev["port"] == port,
            "timeflow: the VDB node should carry state running and port {port}: {dev}"
        );
        let (is, ib) = (
            child_index(dev, "snapshot", "tf-dev@tf-snap"),
            child_index(dev, "bookmark", "tf-dev@tf-mark"),
        );
        assert!(
            is.is_some() && ib.is_some() && is < ib,
            "timeflow: tf-dev should have snapshot tf-snap then bookmark tf-mark: {dev}"
        );
        let snap = child(dev, "snapshot", "tf-dev@tf-snap");
        let kid = child(snap, "vdb", "tf-kid");
        assert!(
            kid["state"] == "running" && kid["port"] == kid_port,
            "timeflow: the child VDB node: {kid}"
        );
        assert!(
            child_index(child(prod, "snapshot", &snap2), "vdb", "tf-dev").is_none(),
            "timeflow: tf-dev hangs off a snapshot it was not made from: {prod}"
        );
    }

    let text = d.ok(&["timeflow"]);
    let short = |full: &str| full.split_once('@').unwrap().1.to_string();
    let line_of = |what: &str, not: &[&str]| -> (usize, usize) {
        text.lines()
            .enumerate()
            .find(|(_, l)| l.contains(what) && !not.iter().any(|n| l.contains(n)))
            .map(|(i, l)| (i, l.chars().take_while(|c| !c.is_alphanumeric()).count()))
            .unwrap_or_else(|| panic!("`vdbfs timeflow` has no line with {what}:\n{text}"))
    };
    let src = line_of("prod", &[&short(&s.snap), &short(&snap2)]);
    let snap = line_of(&short(&s.snap), &[]);
    let dev = line_of("tf-dev", &["tf-snap", "tf-mark", "tf-kid"]);
    let tsnap = line_of("tf-snap", &["tf-kid"]);
    line_of("tf-mark", &[]);
    line_of(&short(&snap2), &[]);
    let kid = line_of("tf-kid", &[]);
    let chain = [src, snap, dev, tsnap, kid];
    assert!(
        chain.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 < w[1].1),
        "`vdbfs timeflow` should go prod -> {} -> tf-dev -> tf-snap -> tf-kid, each line below \
         and further indented than its parent ((line, indent): {chain:?}):\n{text}",
        s.snap
    );
}
