//! A linked source for the tests: a real PostgreSQL 15 source cluster on loopback
//! ([`SourceDb`]), a daemon guard that stops staging before the daemon goes ([`Staged`]), and the
//! `vdbfs source ...` / `dataset` / `snapshot` CLI helpers the sources and VDB tests share.

use std::fs;
use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{
    self as util, as_postgres, chmod, chown_postgres, describe, pg, pid_alive,
    require_root_fuse_postgres, run_timeout, tempdir, Daemon, Postgres,
};

/// Every wait on the daemon or on replication is bounded by this.
pub const WAIT: Duration = Duration::from_secs(60);

/// Password of the `replicator` role (REPLICATION). Unique, so a leak is found by a plain search.
pub const REPL_PW: &str = "Repl-Secret-4f9d17c2";
/// Password of the `plain` role (LOGIN, no REPLICATION).
pub const PLAIN_PW: &str = "Plain-Secret-8b21e6";

// ---------------------------------------------------------------------------------------------
// LSNs

/// "X/Y" (hex) -> a number that compares like the LSN.
pub fn parse_lsn(s: &str) -> u64 {
    let (hi, lo) = s
        .trim()
        .split_once('/')
        .unwrap_or_else(|| panic!("not an LSN: {s:?}"));
    let hi = u64::from_str_radix(hi, 16).unwrap_or_else(|e| panic!("not an LSN {s:?}: {e}"));
    let lo = u64::from_str_radix(lo, 16).unwrap_or_else(|e| panic!("not an LSN {s:?}: {e}"));
    (hi << 32) | lo
}

pub fn fmt_lsn(l: u64) -> String {
    format!("{:X}/{:X}", l >> 32, l & 0xffff_ffff)
}

// ---------------------------------------------------------------------------------------------
// The source cluster

/// A PostgreSQL 15 source on a plain temp dir (not on vdbfs), listening on 127.0.0.1 where every
/// TCP connection, replication included, needs a scram password; the unix socket (used by the
/// test's psql) stays `trust`. Roles: `replicator` (REPLICATION) and `plain` (no REPLICATION).
/// A table `marker (id, note)` holds the rows the tests follow into snapshots.
pub struct SourceDb {
    // Declared first: postgres stops before its directory is removed.
    pub pg: Postgres,
    pub dir: tempfile::TempDir,
    pub archive: Option<PathBuf>,
}

impl Deref for SourceDb {
    type Target = Postgres;
    fn deref(&self) -> &Postgres {
        &self.pg
    }
}

impl DerefMut for SourceDb {
    fn deref_mut(&mut self) -> &mut Postgres {
        &mut self.pg
    }
}

impl SourceDb {
    /// initdb, settings, scram on loopback, start, roles and the marker table. With `archive`,
    /// WAL segments are archived (`archive_mode = on`, cp into DIR/archive).
    pub fn start(archive: bool, conf: &[&str]) -> SourceDb {
        require_root_fuse_postgres();
        let dir = tempdir("vdbfs-source-");
        let mut pg = Postgres::initdb(&dir.path().join("data"));
        let mut lines: Vec<String> = conf.iter().map(|s| s.to_string()).collect();
        let archive = archive.then(|| {
            let a = dir.path().join("archive");
            fs::create_dir(&a).unwrap();
            chown_postgres(&a);
            chmod(&a, 0o755);
            lines.push("archive_mode = on".into());
            lines.push(format!(
                "archive_command = 'test ! -f {0}/%f && cp %p {0}/%f'",
                a.display()
            ));
            a
        });
        let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
        pg.append_conf(&lines);
        pg.prepend_hba(&[
            "host all all 127.0.0.1/32 scram-sha-256",
            "host replication all 127.0.0.1/32 scram-sha-256",
        ]);
        pg.start();
        // From a file, not `-c`: the passwords must never be on a command line, where a test
        // running at the same time checks that no process listing shows them.
        let setup = dir.path().join("setup.sql");
        fs::write(
            &setup,
            format!(
                "CREATE ROLE replicator LOGIN REPLICATION PASSWORD '{REPL_PW}';\n\
                 CREATE ROLE plain LOGIN PASSWORD '{PLAIN_PW}';\n\
                 CREATE TABLE marker (id int PRIMARY KEY, note text NOT NULL);\n"
            ),
        )
        .unwrap();
        chown_postgres(&setup);
        chmod(&setup, 0o600);
        let out = util::run_timeout(
            pg.psql_command().arg("-f").arg(&setup),
            Duration::from_secs(60),
        );
        assert!(
            out.status.success(),
            "source setup failed\n{}",
            describe(&out)
        );
        SourceDb { pg, dir, archive }
    }

    /// key=value conninfo over loopback TCP, no password in it.
    pub fn conn(&self, user: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user={user} dbname=postgres",
            self.port()
        )
    }

    /// A libpq URL with the password in it.
    pub fn url(&self, user: &str, password: &str) -> String {
        format!(
            "postgresql://{user}:{password}@127.0.0.1:{}/postgres",
            self.port()
        )
    }

    /// A libpq passfile (mode 0600) for this server, user and password.
    pub fn passfile(&self, user: &str, password: &str) -> PathBuf {
        let p = self
            .dir
            .path()
            .join(format!("pgpass-{user}-{}", password.len()));
        fs::write(
            &p,
            format!("127.0.0.1:{}:*:{user}:{password}\n", self.port()),
        )
        .unwrap();
        chmod(&p, 0o600);
        p
    }

    /// The source's current WAL write position.
    pub fn lsn(&self) -> u64 {
        parse_lsn(&self.psql("SELECT pg_current_wal_lsn()"))
    }

    /// `SELECT pg_switch_wal()`: the end of the segment just completed (archived next).
    pub fn switch_wal(&self) -> u64 {
        parse_lsn(&self.psql("SELECT pg_switch_wal()"))
    }

    pub fn slots(&self) -> Vec<String> {
        self.psql("SELECT slot_name FROM pg_replication_slots ORDER BY 1")
            .lines()
            .map(str::to_string)
            .collect()
    }

    pub fn insert_rows(&self, from: i64, to: i64, note: &str) {
        self.psql(&format!(
            "INSERT INTO marker SELECT g, '{note}' FROM generate_series({from}, {to}) g"
        ));
    }

    /// `pg_basebackup -X stream -c fast` (as the postgres user) into DIR/NAME: plain, or tar
    /// format with gzip.
    pub fn basebackup(&self, name: &str, tar: bool) -> PathBuf {
        let dest = self.dir.path().join(name);
        fs::create_dir(&dest).unwrap();
        chown_postgres(&dest);
        chmod(&dest, 0o700);
        let port = self.port().to_string();
        let mut c = as_postgres(&pg("pg_basebackup"));
        c.args([
            "-h",
            self.socket_dir().to_str().unwrap(),
            "-p",
            &port,
            "-U",
            "postgres",
            "-D",
            dest.to_str().unwrap(),
            "-X",
            "stream",
            "-c",
            "fast",
        ]);
        if tar {
            c.args(["-F", "t", "-z"]);
        }
        let out = run_timeout(&mut c, Duration::from_secs(300));
        assert!(
            out.status.success(),
            "pg_basebackup of the source failed\n{}",
            describe(&out)
        );
        dest
    }

    /// Waits (bounded) until the archive holds at least one WAL segment file.
    pub fn wait_archived(&self) {
        let a = self.archive.as_ref().expect("source has no archive");
        let ok = util::wait_until(WAIT, || {
            fs::read_dir(a).is_ok_and(|rd| {
                rd.flatten()
                    .any(|e| e.file_name().to_string_lossy().len() == 24)
            })
        });
        assert!(
            ok,
            "the source archived no WAL segment into {} within {WAIT:?}\nsource log:\n{}",
            a.display(),
            self.log_tail(30)
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The daemon with sources

/// A [`Daemon`] that, when dropped, first stops the staging postgres of every source (`source
/// disable`), then kills by PID whatever still runs under the test's directory (the store and
/// mount points outside it; a leak is reported), and only
/// then lets the daemon unmount and stop. On a failing test it prints the staging logs.
pub struct Staged {
    pub d: Daemon,
}

impl Deref for Staged {
    type Target = Daemon;
    fn deref(&self) -> &Daemon {
        &self.d
    }
}

impl DerefMut for Staged {
    fn deref_mut(&mut self) -> &mut Daemon {
        &mut self.d
    }
}

impl Staged {
    pub fn start() -> Staged {
        Staged { d: Daemon::start() }
    }

    /// With the store at `store` (e.g. on a small filesystem; see [`Daemon::start_at`]).
    pub fn start_at(store: &Path) -> Staged {
        Staged {
            d: Daemon::start_at(store),
        }
    }
}

/// For Drop impls (never panics): the `name`s of the entries of a JSON array `vdbfs ARGS`
/// prints that satisfy `keep`; none when the daemon is not running or does not answer.
pub fn cleanup_names(d: &Daemon, args: &[&str], keep: impl Fn(&Value) -> bool) -> Vec<String> {
    if d.pid().is_none() {
        return Vec::new();
    }
    util::try_run_timeout(d.command().args(args), Duration::from_secs(30))
        .ok()
        .and_then(|o| serde_json::from_slice::<Value>(&o.stdout).ok())
        .and_then(|v| {
            v.as_array().map(|a| {
                a.iter()
                    .filter(|e| keep(e))
                    .filter_map(|e| e["name"].as_str().map(str::to_string))
                    .collect()
            })
        })
        .unwrap_or_default()
}

/// The text of the `vdbfs: error:` on a command's stderr, from there on (progress lines before
/// it do not count), lowercased; empty when there is none.
pub fn error_text(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr);
    err.find("vdbfs: error:")
        .map(|i| err[i..].to_lowercase())
        .unwrap_or_default()
}

/// Processes on the store (see [`processes_on_store`]) that were not there at `before`, nor are
/// children of those (a postmaster that ran before may have started autovacuum workers or
/// backends since), described; waits up to 5 s for them to go first.
pub fn new_processes_on_store(d: &Daemon, before: &Before) -> Vec<String> {
    let mut left = Vec::new();
    util::wait_until(Duration::from_secs(5), || {
        let known: Vec<i32> = before
            .procs
            .iter()
            .flat_map(|p| util::children_of(*p).into_iter().chain([*p]))
            .collect();
        left = processes_on_store(d);
        left.retain(|p| !known.contains(p));
        left.is_empty()
    });
    left.into_iter().map(util::describe_pid).collect()
}

impl Drop for Staged {
    fn drop(&mut self) {
        let names = cleanup_names(&self.d, &["source", "list", "--json"], |_| true);
        if thread::panicking() {
            if let Ok(rd) = fs::read_dir(self.d.store().join("sources")) {
                for e in rd.flatten() {
                    let log = e.path().join("postgres.log");
                    eprintln!(
                        "--- staging postgres log tail ({}) ---\n{}",
                        log.display(),
                        util::tail(&log, 60)
                    );
                }
            }
        }
        for n in &names {
            let _ = util::try_run_timeout(
                self.d.command().args(["source", "disable", n]),
                Duration::from_secs(60),
            );
        }
        let left = util::kill_processes_under(self.d.root());
        if !left.is_empty() {
            eprintln!(
                "processes still running under the test dir at the end of the test, killed: \
                 {left:?}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// CLI helpers

pub fn staging_log(d: &Daemon, name: &str) -> String {
    util::tail(
        &d.store().join("sources").join(name).join("postgres.log"),
        80,
    )
}

pub fn json(s: &str, what: &str) -> Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("{what} is not JSON ({e}): {s}"))
}

pub fn status(d: &Daemon, name: &str) -> Value {
    json(
        &d.ok(&["source", "status", name, "--json"]),
        "source status --json",
    )
}

pub fn source_list(d: &Daemon) -> Vec<Value> {
    json(&d.ok(&["source", "list", "--json"]), "source list --json")
        .as_array()
        .unwrap_or_else(|| panic!("source list --json is not an array"))
        .clone()
}

pub fn dataset_names(d: &Daemon) -> Vec<String> {
    json(&d.ok(&["dataset", "list", "--json"]), "dataset list --json")
        .as_array()
        .expect("dataset list --json is not an array")
        .iter()
        .map(|e| e["name"].as_str().unwrap().to_string())
        .collect()
}

pub fn snapshot_list(d: &Daemon, dataset: &str) -> Vec<Value> {
    json(
        &d.ok(&["snapshot", "list", dataset, "--json"]),
        "snapshot list --json",
    )
    .as_array()
    .expect("snapshot list --json is not an array")
    .clone()
}

pub fn all_snapshot_names(d: &Daemon) -> Vec<String> {
    json(
        &d.ok(&["snapshot", "list", "--json"]),
        "snapshot list --json",
    )
    .as_array()
    .expect("snapshot list --json is not an array")
    .iter()
    .map(|e| e["name"].as_str().unwrap().to_string())
    .collect()
}

/// Polls `vdbfs ARGS` (a command printing JSON; 4 times a second, at most `timeout`) until `ok`
/// holds; panics with `what`, the last answer, the daemon log tail and `logs()` (more log tails).
#[track_caller]
pub fn wait_json(
    d: &Daemon,
    args: &[&str],
    what: &str,
    timeout: Duration,
    logs: impl Fn() -> String,
    mut ok: impl FnMut(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let out = d.vdbfs(args);
        let last = if out.status.success() {
            let s = String::from_utf8_lossy(&out.stdout).into_owned();
            match serde_json::from_str::<Value>(&s) {
                Ok(v) if ok(&v) => return v,
                Ok(v) => v.to_string(),
                Err(e) => format!("not JSON ({e}): {s}"),
            }
        } else {
            describe(&out)
        };
        if Instant::now() >= deadline {
            panic!(
                "`vdbfs {}`: {what}: not reached within {timeout:?}\nlast answer: {last}\n\
                 daemon log tail:\n{}\n{}",
                args.join(" "),
                d.log_tail(80),
                logs()
            );
        }
        thread::sleep(Duration::from_millis(250));
    }
}

/// Polls `source status NAME --json` (at most [`WAIT`]) until `ok` holds; panics with the last
/// status, the daemon log and the staging log.
#[track_caller]
pub fn wait_status(d: &Daemon, name: &str, what: &str, ok: impl FnMut(&Value) -> bool) -> Value {
    wait_json(
        d,
        &["source", "status", name, "--json"],
        &format!("source {name}: {what}"),
        WAIT,
        || format!("staging postgres log tail:\n{}", staging_log(d, name)),
        ok,
    )
}

pub fn staging_pid(st: &Value) -> Option<i32> {
    st["staging_pid"].as_i64().map(|p| p as i32)
}

pub fn lsn_field(st: &Value, field: &str) -> Option<u64> {
    st[field].as_str().map(parse_lsn)
}

/// Waits until the staging postgres runs (state syncing, a live staging_pid).
#[track_caller]
pub fn wait_syncing(d: &Daemon, name: &str) -> Value {
    wait_status(d, name, "state syncing with a live staging_pid", |s| {
        s["state"] == "syncing" && staging_pid(s).is_some_and(pid_alive)
    })
}

/// Waits until the staging standby replayed up to `target`.
#[track_caller]
pub fn wait_replayed(d: &Daemon, name: &str, target: u64) -> Value {
    wait_status(
        d,
        name,
        &format!("replay_lsn >= {} (the source's)", fmt_lsn(target)),
        |s| lsn_field(s, "replay_lsn").is_some_and(|l| l >= target),
    )
}

/// What `source link` printed last on success.
#[derive(Debug)]
pub struct Linked {
    pub port: u16,
    pub first_snapshot: String,
}

/// `vdbfs source link NAME ARGS...`; asserts success and the contract's last stdout line.
#[track_caller]
pub fn link(d: &Daemon, name: &str, mode: &str, args: &[&str]) -> Linked {
    let mut a = vec!["source", "link", name];
    a.extend_from_slice(args);
    let out = d.vdbfs(&a);
    assert!(
        out.status.success(),
        "`vdbfs source link {name} ...` failed\n{}\ndaemon log tail:\n{}\nstaging log tail:\n{}",
        describe(&out),
        d.log_tail(80),
        staging_log(d, name)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or("");
    // linked source NAME (MODE); staging postgres on port PORT; first snapshot NAME@SNAP
    let parsed = last
        .strip_prefix(&format!(
            "linked source {name} ({mode}); staging postgres on port "
        ))
        .and_then(|r| r.split_once("; first snapshot "))
        .and_then(|(port, snap)| Some((port.parse::<u16>().ok()?, snap.trim().to_string())));
    let Some((port, first_snapshot)) = parsed else {
        panic!(
            "last stdout line of `source link` is not `linked source {name} ({mode}); staging \
             postgres on port PORT; first snapshot {name}@SNAP`\n{}",
            describe(&out)
        );
    };
    assert!(
        first_snapshot.starts_with(&format!("{name}@")) && first_snapshot.len() > name.len() + 1,
        "first snapshot name {first_snapshot:?} is not {name}@SNAP"
    );
    Linked {
        port,
        first_snapshot,
    }
}

/// `vdbfs source snapshot NAME`: asserts stdout is exactly one line `NAME@SNAP`; returns it.
#[track_caller]
pub fn source_snapshot(d: &Daemon, name: &str) -> String {
    let out = d.ok(&["source", "snapshot", name]);
    let snap = out.trim().to_string();
    assert!(
        out.trim_end().lines().count() == 1
            && snap.starts_with(&format!("{name}@"))
            && !snap.contains(' '),
        "`source snapshot {name}` should print exactly `{name}@SNAP`, got {out:?}"
    );
    snap
}

pub fn uid_of(pid: i32) -> Option<u32> {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|u| u.parse().ok())
}

/// Whether a path is where the daemon prepares snapshots in the background
/// (`STORE/prepare/NAME/data`): its mounts and postgres come and go by themselves.
pub fn is_background(path: &Path) -> bool {
    path.components()
        .collect::<Vec<_>>()
        .windows(2)
        .any(|w| w[0].as_os_str() == "store" && w[1].as_os_str() == "prepare")
}

/// Mount points under the test's temp dir (the store's staging mounts included; the
/// preparer's, which come and go in the background, not).
pub fn mounts_under(root: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = util::mountinfo()
        .into_iter()
        .map(|m| m.mountpoint)
        .filter(|m| m.starts_with(root) && !is_background(m))
        .collect();
    v.sort();
    v
}

/// Processes (other than the daemon) whose cwd is on the store or whose command line names it
/// (the preparer's postgres, which comes and goes in the background, not).
pub fn processes_on_store(d: &Daemon) -> Vec<i32> {
    let store = d.store().to_string_lossy().into_owned();
    let daemon = d.pid().map(|p| p as i32);
    let me = std::process::id() as i32;
    let mut v: Vec<i32> = util::processes_under(d.store());
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if Some(p) == daemon || p == me || v.contains(&p) || !pid_alive(p) {
            continue;
        }
        if let Ok(c) = fs::read(format!("/proc/{p}/cmdline")) {
            if String::from_utf8_lossy(&c).contains(&store) {
                v.push(p);
            }
        }
    }
    v.retain(|p| Some(*p) != daemon);
    v.retain(|p| {
        let cwd = fs::read_link(format!("/proc/{p}/cwd")).unwrap_or_default();
        let cmd = fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
        !is_background(&cwd)
            && !String::from_utf8_lossy(&cmd).contains(&format!("{store}/prepare/"))
    });
    v
}

/// What a refused link must not change: the mounts under the test dir and the processes on the
/// store (taken before the attempts).
pub struct Before {
    pub mounts: Vec<PathBuf>,
    pub procs: Vec<i32>,
}

pub fn before(d: &Daemon) -> Before {
    Before {
        mounts: mounts_under(d.root()),
        procs: processes_on_store(d),
    }
}

/// Links `name` (backup-stream, passfile, a free staging port) and waits until it syncs.
pub fn link_small(d: &Daemon, src: &SourceDb, name: &str) -> Value {
    link_small_with(d, src, name, &[])
}

/// [`link_small`] with more link options.
pub fn link_small_with(d: &Daemon, src: &SourceDb, name: &str, extra: &[&str]) -> Value {
    let pass = src.passfile("replicator", REPL_PW);
    let port = util::free_port().to_string();
    let conn = src.conn("replicator");
    let mut args = vec![
        "--conn",
        conn.as_str(),
        "--passfile",
        pass.to_str().unwrap(),
        "--staging-port",
        port.as_str(),
    ];
    args.extend_from_slice(extra);
    link(d, name, "backup-stream", &args);
    wait_syncing(d, name)
}
