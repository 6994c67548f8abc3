//! The VDB harness: a daemon with a linked source that cleans up its VDBs ([`Vdbd`], [`setup`]),
//! `vdbfs vdb ...` helpers, a VDB's postgres as a test reaches it ([`Vdb`]), and the checks of
//! `vdb status` against the contract and the system.

use std::fs;
use std::net::TcpListener;
use std::ops::{Deref, DerefMut};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::thread;
use std::time::Duration;

use serde_json::Value;

use super::source::{
    cleanup_names, error_text, fmt_lsn, json, link_small, parse_lsn, snapshot_list,
    source_snapshot, uid_of, wait_json, wait_replayed, SourceDb, Staged, WAIT,
};
use super::{
    self as util, clean_pg_env, describe, pg, pid_alive, postgres_ids, run_amcheck, run_timeout,
    Daemon, COMMAND_TIMEOUT, PSQL_FLAGS,
};

// ---------------------------------------------------------------------------------------------
// The daemon with a source and VDBs

/// A [`Staged`] daemon that, when dropped, first stops every VDB (`vdb stop`, bounded), then
/// lets [`Staged`] disable the sources and kill by PID whatever still runs under the test's
/// directory (VDBs mounted outside the store included; a leak is reported), and the daemon
/// unmount and stop. On a failing test it prints every VDB's logs.
pub struct Vdbd {
    pub s: Staged,
}

impl Deref for Vdbd {
    type Target = Daemon;
    fn deref(&self) -> &Daemon {
        &self.s.d
    }
}

impl DerefMut for Vdbd {
    fn deref_mut(&mut self) -> &mut Daemon {
        &mut self.s.d
    }
}

impl Drop for Vdbd {
    fn drop(&mut self) {
        let d = &self.s.d;
        if thread::panicking() {
            if let Ok(rd) = fs::read_dir(d.store().join("vdbs")) {
                for e in rd.flatten() {
                    eprintln!(
                        "{}",
                        vdb_logs_at(&e.path(), &e.file_name().to_string_lossy())
                    );
                }
            }
        }
        for n in cleanup_names(d, &["vdb", "list", "--json"], |v| v["state"] != "stopped") {
            let _ = util::try_run_timeout(
                d.command().args(["vdb", "stop", &n]),
                Duration::from_secs(60),
            );
        }
    }
}

/// A daemon with source `prod` linked (backup-stream) from a source whose `marker` table holds
/// rows 1..=rows, and two snapshots of it with those rows. Field order: the daemon (VDBs,
/// staging) goes before the source.
pub struct Setup {
    pub d: Vdbd,
    pub src: SourceDb,
    /// `prod@...`: the first snapshot, taken by `source link`. The source was idle, so its LSN
    /// is at a WAL segment boundary (pg_basebackup ends with a segment switch).
    pub first: String,
    /// `prod@...`: the latest snapshot, taken after a little WAL more (no data change), so its
    /// LSN is inside a segment, as for a source in use.
    pub snap: String,
}

pub fn setup(rows: i64) -> Setup {
    let src = SourceDb::start(false, &[]);
    src.insert_rows(1, rows, "from the source");
    let d = Vdbd { s: Staged::start() };
    let st = link_small(&d, &src, "prod");
    let first = st["last_snapshot"]["name"]
        .as_str()
        .unwrap_or_else(|| panic!("source status has no last_snapshot.name after link: {st}"))
        .to_string();
    // Transactional: its commit is flushed, so pg_current_wal_lsn() is past it.
    src.psql("SELECT pg_logical_emit_message(true, 'vdbfs-test', 'some WAL')");
    wait_replayed(&d, "prod", src.lsn());
    let snap = source_snapshot(&d, "prod");
    let lsn = snapshot_lsn(&d, &snap);
    assert!(
        lsn & (WAL_SEGMENT - 1) != 0,
        "test premise: the snapshot {snap} taken after more WAL should not be at a segment \
         boundary, its LSN is {}",
        fmt_lsn(lsn)
    );
    Setup {
        d,
        src,
        first,
        snap,
    }
}

/// The LSN recorded with a snapshot (`snapshot list --json`).
#[track_caller]
pub fn snapshot_lsn(d: &Daemon, full: &str) -> u64 {
    let ds = full.split_once('@').map(|p| p.0).unwrap_or(full);
    let list = snapshot_list(d, ds);
    list.iter()
        .find(|e| e["name"] == full)
        .and_then(|e| e["lsn"].as_str())
        .map(parse_lsn)
        .unwrap_or_else(|| panic!("snapshot list {ds} --json has no lsn for {full}: {list:?}"))
}

/// Bytes in a WAL segment (the initdb default the tests' sources use).
pub const WAL_SEGMENT: u64 = 16 << 20;

// ---------------------------------------------------------------------------------------------
// VDB CLI helpers

/// Tails of a VDB's `vdb.log` and `postgres.log` (in its directory `STORE/vdbs/NAME`).
pub fn vdb_logs_at(dir: &Path, name: &str) -> String {
    format!(
        "--- VDB {name}: vdb.log tail ---\n{}\n--- VDB {name}: postgres.log tail ---\n{}",
        util::tail(&dir.join("vdb.log"), 40),
        util::tail(&dir.join("postgres.log"), 40)
    )
}

pub fn vdb_logs(d: &Daemon, name: &str) -> String {
    vdb_logs_at(&d.store().join("vdbs").join(name), name)
}

/// `vdbfs vdb ARGS...`: asserts exit 0 (panicking with its output, the daemon log and the logs
/// of the VDB named by ARGS[1]); returns stdout.
#[track_caller]
pub fn vdb(d: &Daemon, args: &[&str]) -> String {
    let out = try_vdb(d, args);
    assert!(
        out.status.success(),
        "`vdbfs vdb {}` failed\n{}\ndaemon log tail:\n{}\n{}",
        args.join(" "),
        describe(&out),
        d.log_tail(40),
        args.get(1).map(|n| vdb_logs(d, n)).unwrap_or_default()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn try_vdb(d: &Daemon, args: &[&str]) -> Output {
    let mut a = vec!["vdb"];
    a.extend_from_slice(args);
    d.vdbfs(&a)
}

/// `vdb status NAME --json`.
#[track_caller]
pub fn status(d: &Daemon, name: &str) -> Value {
    json(&vdb(d, &["status", name, "--json"]), "vdb status --json")
}

/// `vdb list --json`.
#[track_caller]
pub fn list(d: &Daemon) -> Vec<Value> {
    json(&vdb(d, &["list", "--json"]), "vdb list --json")
        .as_array()
        .unwrap_or_else(|| panic!("vdb list --json is not an array"))
        .clone()
}

pub fn list_names(d: &Daemon) -> Vec<String> {
    let mut v: Vec<String> = list(d)
        .iter()
        .map(|e| e["name"].as_str().unwrap_or_default().to_string())
        .collect();
    v.sort();
    v
}

/// `vdb create NAME --from FROM EXTRA... --json`: the VdbStatus it prints.
#[track_caller]
pub fn create(d: &Daemon, name: &str, from: &str, extra: &[&str]) -> Vdb {
    let mut a = vec!["create", name, "--from", from];
    a.extend_from_slice(extra);
    a.push("--json");
    let st = json(&vdb(d, &a), "vdb create --json");
    assert!(
        st["name"] == name && st["state"] == "running",
        "vdb create {name} --json should describe a running VDB {name}: {st}"
    );
    Vdb::of(&st)
}

/// Polls `vdb status NAME --json` (at most [`WAIT`]) until `ok` holds.
#[track_caller]
pub fn wait_vdb(d: &Daemon, name: &str, what: &str, ok: impl FnMut(&Value) -> bool) -> Value {
    wait_json(
        d,
        &["vdb", "status", name, "--json"],
        &format!("VDB {name}: {what}"),
        WAIT,
        || vdb_logs(d, name),
        ok,
    )
}

pub fn pid_of(st: &Value) -> Option<i32> {
    st["pid"].as_i64().map(|p| p as i32)
}

/// Running: state running with a live postmaster.
pub fn running(st: &Value) -> bool {
    st["state"] == "running" && pid_of(st).is_some_and(pid_alive)
}

/// What a test needs to reach a VDB's postgres.
#[derive(Debug, Clone)]
pub struct Vdb {
    pub name: String,
    pub conn: String,
    pub port: u16,
    pub data_dir: PathBuf,
    pub socket_dir: PathBuf,
}

impl Vdb {
    #[track_caller]
    pub fn of(st: &Value) -> Vdb {
        let s = |k: &str| {
            st[k]
                .as_str()
                .unwrap_or_else(|| panic!("VdbStatus has no string {k:?}: {st}"))
                .to_string()
        };
        Vdb {
            name: s("name"),
            conn: s("conn"),
            port: st["port"]
                .as_u64()
                .and_then(|p| u16::try_from(p).ok())
                .unwrap_or_else(|| panic!("VdbStatus has no port: {st}")),
            data_dir: PathBuf::from(s("data_dir")),
            socket_dir: PathBuf::from(s("socket_dir")),
        }
    }

    /// Runs SQL through the VDB's `conn` (as root, as the contract tells users to connect).
    pub fn try_sql(&self, sql: &str) -> Output {
        try_psql(&self.conn, sql)
    }

    /// Runs SQL; panics (with the VDB's postgres log tail) on error; returns trimmed stdout.
    #[track_caller]
    pub fn sql(&self, sql: &str) -> String {
        let out = self.try_sql(sql);
        assert!(
            out.status.success(),
            "VDB {}: psql {:?} -c {sql:?} failed\n{}\npostgres log tail:\n{}",
            self.name,
            self.conn,
            describe(&out),
            util::tail(&self.postgres_log(), 30)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// `STORE/vdbs/NAME/postgres.log` (next to the socket dir `STORE/vdbs/NAME/run`).
    pub fn postgres_log(&self) -> PathBuf {
        self.socket_dir
            .parent()
            .unwrap_or(Path::new("/"))
            .join("postgres.log")
    }

    /// The content of every table in schema public (names and an md5 of all rows each).
    pub fn fingerprint(&self) -> String {
        self.sql(FINGERPRINT)
    }

    #[track_caller]
    pub fn amcheck(&self) {
        if let Err(e) = run_amcheck(&self.socket_dir, self.port) {
            panic!("pg_amcheck reported problems on VDB {}\n{e}", self.name);
        }
    }
}

/// psql as root with a connection string, no psqlrc, unaligned tuples only, stop on error.
pub fn try_psql(conn: &str, sql: &str) -> Output {
    run_timeout(
        clean_pg_env(&pg("psql"))
            .args(PSQL_FLAGS)
            .args(["-d", conn, "-c"])
            .arg(sql),
        COMMAND_TIMEOUT,
    )
}

/// One line: `table=md5(rows) ...` for every table of schema public, by name.
pub const FINGERPRINT: &str = "SELECT coalesce(string_agg(table_name || '=' || \
     (xpath('/row/h/text()', query_to_xml(format( \
        'SELECT md5(coalesce(string_agg(t::text, %L ORDER BY t::text), %L)) AS h FROM public.%I t', \
        ',', '', table_name), false, true, '')))[1]::text, ' ' ORDER BY table_name), '') \
     FROM information_schema.tables WHERE table_schema = 'public' AND table_type = 'BASE TABLE'";

/// Contract violations a test collects, so that one run reports all of them rather than the
/// first: [`Problems::finish`] fails the test listing every one.
#[derive(Default)]
pub struct Problems(pub Vec<String>);

impl Problems {
    pub fn check<T>(&mut self, r: Result<T, String>) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(e) => {
                eprintln!("CONTRACT VIOLATION: {e}");
                self.0.push(e);
                None
            }
        }
    }

    #[track_caller]
    pub fn finish(self) {
        assert!(
            self.0.is_empty(),
            "{} contract violation(s):\n\n{}",
            self.0.len(),
            self.0.join("\n\n")
        );
    }
}

/// Runs a `vdb` command expected to fail: non-zero exit, a `vdbfs: error:` on stderr whose text
/// (from there on) contains every one of `phrases` (case-insensitive). Returns stderr, or what
/// is wrong.
pub fn vdb_error(d: &Daemon, args: &[&str], phrases: &[&str]) -> Result<String, String> {
    let out = try_vdb(d, args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let error = error_text(&out);
    let missing: Vec<&&str> = phrases
        .iter()
        .filter(|p| !error.contains(&p.to_lowercase()))
        .collect();
    if out.status.success() || !missing.is_empty() {
        return Err(format!(
            "`vdbfs vdb {}` should fail with a `vdbfs: error:` naming {phrases:?} (missing: \
             {missing:?})\n{}",
            args.join(" "),
            describe(&out)
        ));
    }
    eprintln!(
        "expected failure of `vdb {}`: {}",
        args.join(" "),
        err.trim()
    );
    Ok(err)
}

/// Whether a TCP port on 127.0.0.1 can be bound (nobody listens there).
pub fn port_free(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// Names of the snapshots of a dataset (full `ds@snap` names, oldest first).
pub fn snapshot_names(d: &Daemon, dataset: &str) -> Vec<String> {
    snapshot_list(d, dataset)
        .iter()
        .map(|e| e["name"].as_str().unwrap_or_default().to_string())
        .collect()
}

pub fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Checks what `vdb status` tells of a running VDB against the contract and the system: state,
/// a live postmaster run as the postgres user in the data dir, port, parent, data dir mounted,
/// socket dir, both connection strings, settings, logs, sizes.
#[track_caller]
pub fn assert_status(
    d: &Daemon,
    st: &Value,
    name: &str,
    port: u16,
    parent: &str,
    data_dir: &Path,
    settings: Value,
) {
    let store = d.store();
    let vdir = store.join("vdbs").join(name);
    let socket = vdir.join("run");
    let pid = pid_of(st).unwrap_or_else(|| panic!("VDB {name}: status has no pid: {st}"));
    assert!(
        st["name"] == name && st["state"] == "running" && pid_alive(pid),
        "VDB {name} should be running with a live postmaster: {st}"
    );
    assert_eq!(
        uid_of(pid),
        postgres_ids().map(|(u, _)| u),
        "VDB {name}: the postmaster {pid} does not run as the postgres OS user"
    );
    assert_eq!(
        fs::read_link(format!("/proc/{pid}/cwd")).ok().as_deref(),
        Some(data_dir),
        "VDB {name}: the postmaster {pid} does not run in its data dir"
    );
    let expect = |k: &str, v: Value| {
        assert_eq!(st[k], v, "VDB {name}: status field {k:?}: {st}");
    };
    expect("port", port.into());
    expect("parent", parent.into());
    expect(
        "parent_dataset",
        parent.split_once('@').map(|p| p.0).unwrap_or(parent).into(),
    );
    expect("data_dir", data_dir.to_str().unwrap().into());
    expect("socket_dir", socket.to_str().unwrap().into());
    expect(
        "conn",
        format!(
            "host={} port={port} user=postgres dbname=postgres",
            socket.display()
        )
        .into(),
    );
    expect(
        "tcp_conn",
        format!("postgresql://postgres@127.0.0.1:{port}/postgres").into(),
    );
    expect("settings", settings);
    expect("log", vdir.join("vdb.log").to_str().unwrap().into());
    expect(
        "postgres_log",
        vdir.join("postgres.log").to_str().unwrap().into(),
    );
    expect("fault", Value::Null);
    assert!(
        st["logical_bytes"].as_u64().is_some_and(|b| b > 0)
            && st["unique_bytes"].as_u64().is_some()
            && st["created"].as_str().is_some_and(|c| c.len() >= 20)
            && st["snapshots"].is_array()
            && st["bookmarks"].is_array(),
        "VDB {name}: status lacks logical_bytes, unique_bytes, created, snapshots or \
         bookmarks: {st}"
    );
    assert!(
        util::is_mounted(data_dir) && data_dir.join("PG_VERSION").exists(),
        "VDB {name}: its data dir {} is not a mounted data directory",
        data_dir.display()
    );
    let m = fs::metadata(&socket)
        .unwrap_or_else(|e| panic!("VDB {name}: socket dir {}: {e}", socket.display()));
    assert!(
        m.permissions().mode() & 0o077 == 0,
        "VDB {name}: the socket dir {} should be 0700 (mode {:o})",
        socket.display(),
        m.permissions().mode()
    );
}

/// A hooks directory under `root` whose hook `hook` (e.g. `configure-clone`), while the returned
/// `slow` file exists, touches the returned `started` file and sleeps 300 s: a VDB operation held
/// at that step, for a test to kill the daemon there. Returns (hooks dir, slow, started).
pub fn slow_hook(root: &Path, hook: &str) -> (PathBuf, PathBuf, PathBuf) {
    let dir = root.join("hooks");
    fs::create_dir_all(&dir).unwrap();
    let slow = root.join("slow");
    let started = root.join("hook-started");
    let path = dir.join(hook);
    fs::write(
        &path,
        format!(
            "#!/bin/sh\nif [ -e '{}' ]; then touch '{}'; sleep 300; fi\n",
            slow.display(),
            started.display()
        ),
    )
    .unwrap();
    util::chmod(&path, 0o755);
    (dir, slow, started)
}
