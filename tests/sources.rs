//! Linking a source database (issue 4), against the CLI contract of `vdbfs source`: each of the
//! three ingestion modes (backup-stream, stream from the user's backup, log shipping from an
//! archive) links a real PostgreSQL 15 cluster on loopback, and rows committed on the source
//! afterwards are in the next validated-sync snapshot, read by starting a primary on a clone of
//! it; snapshots taken while pgbench runs all start and pass pg_amcheck; policy snapshots are
//! taken and pruned; preflight refuses bad sources, archives and backups with a clear error and
//! leaves nothing behind (also when the daemon dies mid-link); the daemon restarts a killed
//! staging postgres and resumes staging after its own restart (SIGTERM and kill -9); disable /
//! enable / unlink keep or delete what they promise; a broken stream and an archive gap show as
//! faults; the source sees one walsender and no transaction; a password (URL or PGPASSWORD)
//! never reaches status, logs, process listings or the staging configuration; and `vdbfs env
//! discover` finds the installation, the source and the staging cluster.
//!
//! Long file (about 1,500 lines), on purpose: it is the contract of `vdbfs source` in one
//! place, each test a scenario against real servers; the fixtures it shares live in `util`.

use std::fs;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::util::source::{
    all_snapshot_names, before, dataset_names, error_text, fmt_lsn, json, link, link_small,
    link_small_with, lsn_field, mounts_under, new_processes_on_store, parse_lsn, snapshot_list,
    source_list, source_snapshot, staging_pid, status, uid_of, wait_replayed, wait_status,
    wait_syncing, Before, SourceDb, Staged, PLAIN_PW, REPL_PW, WAIT,
};
use crate::util::{
    self, chmod, chown_postgres, describe, pid_alive, postgres_ids, run_timeout, signal, tempdir,
    Daemon, Mount, Postgres, PG_BIN, SUPERVISED,
};

// ---------------------------------------------------------------------------------------------
// Reading a staging snapshot

/// A primary started on a clone of a staging snapshot, as the contract tells a user to do it.
/// Field order: postgres stops before the clone is unmounted.
struct Readable {
    pg: Postgres,
    _mount: Mount,
}

/// `vdbfs clone SNAP CLONE`, mount it, turn the standby data dir into a primary (remove
/// standby.signal and postmaster.pid; in postgresql.auto.conf override hba_file, ident_file,
/// primary_conninfo, primary_slot_name, restore_command, archive_mode; port, socket directory and
/// listen_addresses are given on the command line by [`Postgres::start`], which wins), start it.
#[track_caller]
fn provision(d: &Daemon, snap: &str, clone: &str) -> Readable {
    d.ok(&["clone", snap, clone]);
    let m = d.mount(clone, &d.new_mountpoint(clone));
    let dir = m.path.clone();
    assert!(
        dir.join("PG_VERSION").exists(),
        "a clone of {snap} has no PG_VERSION at its root: the contract says the staging dataset \
         is the data dir"
    );
    assert!(
        dir.join("standby.signal").exists(),
        "a clone of {snap} has no standby.signal: the contract says it is a standby data dir"
    );
    fs::remove_file(dir.join("standby.signal")).unwrap();
    let _ = fs::remove_file(dir.join("postmaster.pid"));
    let hba = dir.join("vdbfs_test_hba.conf");
    let ident = dir.join("vdbfs_test_ident.conf");
    fs::write(
        &hba,
        "local all all trust\nhost all all 127.0.0.1/32 trust\n",
    )
    .unwrap();
    fs::write(&ident, "").unwrap();
    for f in [&hba, &ident] {
        chown_postgres(f);
        chmod(f, 0o600);
    }
    let auto = dir.join("postgresql.auto.conf");
    let mut conf = fs::read_to_string(&auto)
        .unwrap_or_else(|e| panic!("read {} of a clone of {snap}: {e}", auto.display()));
    conf.push_str(&format!(
        "\n# vdbfs test: run this clone as a primary\nhba_file = '{}'\nident_file = '{}'\n\
         primary_conninfo = ''\nprimary_slot_name = ''\nrestore_command = ''\narchive_mode = off\n",
        hba.display(),
        ident.display()
    ));
    fs::write(&auto, conf).unwrap();
    chown_postgres(&dir);
    chmod(&dir, 0o700);
    let mut pg = Postgres::on(&dir);
    pg.start();
    assert_eq!(
        pg.psql("SELECT pg_is_in_recovery()"),
        "f",
        "the clone of {snap} should run as a primary"
    );
    Readable { pg, _mount: m }
}

/// Asserts the secret appears in none of: source status / list JSON, the daemon log, the
/// staging postgres log and postgresql.auto.conf, and any process's command line.
#[track_caller]
fn assert_secret_hidden(d: &Daemon, name: &str, secret: &str) {
    let st = d.ok(&["source", "status", name, "--json"]);
    assert!(
        !st.contains(secret),
        "the password is in source status --json: {st}"
    );
    let list = d.ok(&["source", "list", "--json"]);
    assert!(
        !list.contains(secret),
        "the password is in source list --json: {list}"
    );
    let text = d.ok(&["source", "status", name]);
    assert!(
        !text.contains(secret),
        "the password is in source status: {text}"
    );
    assert!(
        !d.log().contains(secret),
        "the password is in the daemon log:\n{}",
        d.log()
    );
    let data_dir = PathBuf::from(json(&st, "status")["data_dir"].as_str().unwrap());
    let auto = fs::read_to_string(data_dir.join("postgresql.auto.conf")).unwrap();
    assert!(
        !auto.contains(secret),
        "the password is in the staging postgresql.auto.conf:\n{auto}"
    );
    let log = d.store().join("sources").join(name).join("postgres.log");
    assert!(
        !fs::read_to_string(&log)
            .unwrap_or_default()
            .contains(secret),
        "the password is in the staging postgres log {}",
        log.display()
    );
    for e in fs::read_dir("/proc").unwrap().flatten() {
        if e.file_name().to_string_lossy().parse::<i32>().is_err() {
            continue;
        }
        if let Ok(c) = fs::read(e.path().join("cmdline")) {
            let c = String::from_utf8_lossy(&c).replace('\0', " ");
            // A `vdbfs` client carries what its user typed (another test may be running `source
            // link --conn URL-with-password` right now); what vdbfs itself starts must not.
            let client = c.starts_with(util::bin()) && !c.contains(" serve ");
            assert!(
                client || !c.contains(secret),
                "the password is in a process listing: {c}"
            );
        }
    }
}

/// While a source syncs, vdbfs holds one replication connection on it and nothing else: sampled
/// for ~3 s (with status calls in between), the `replicator` role has exactly one session, a
/// walsender, and no open transaction.
#[track_caller]
fn assert_source_touched_lightly(d: &Daemon, src: &SourceDb, name: &str) {
    for _ in 0..10 {
        let sessions = src.psql(
            "SELECT backend_type || ':' || coalesce(state, '') || ':' || (xact_start IS NOT NULL) \
             FROM pg_stat_activity WHERE usename = 'replicator' ORDER BY 1",
        );
        assert_eq!(
            sessions, "walsender:active:false",
            "the source should see one walsender of vdbfs and no transaction of it"
        );
        d.ok(&["source", "status", name, "--json"]);
        thread::sleep(Duration::from_millis(300));
    }
}

// ---------------------------------------------------------------------------------------------
// The three modes

enum Mode {
    BackupStream,
    Stream,
    LogShipping,
}

impl Mode {
    fn name(&self) -> &'static str {
        match self {
            Mode::BackupStream => "backup-stream",
            Mode::Stream => "stream",
            Mode::LogShipping => "log-shipping",
        }
    }
}

/// Links a pgbench source in `mode` as source `name`, checks what status reports, commits rows
/// on the source, waits for the standby to replay them, and reads them from a primary started on
/// a clone of the next `source snapshot`.
fn link_and_read_new_rows(mode: Mode, name: &str, expect_slot: &str) {
    let src = SourceDb::start(matches!(mode, Mode::LogShipping), &[]);
    src.pgbench(&["-i", "-s", "1", "-q"]);
    src.insert_rows(1, 100, "before link");
    let d = Staged::start();
    let port = util::free_port();
    let port_s = port.to_string();
    let conn = src.conn("replicator");
    let pass = src.passfile("replicator", REPL_PW);
    let url = src.url("replicator", REPL_PW);
    let backup;
    let mut args: Vec<&str> = vec!["--staging-port", &port_s];
    match mode {
        // The password only in the URL: it must not leak anywhere.
        Mode::BackupStream => args.extend(["--conn", &url]),
        Mode::Stream => {
            backup = src.basebackup("backup", false);
            args.extend(["--mode", "stream", "--backup", backup.to_str().unwrap()]);
            args.extend(["--conn", &conn, "--passfile", pass.to_str().unwrap()]);
        }
        Mode::LogShipping => {
            backup = src.basebackup("backup", true);
            src.wait_archived();
            args.extend([
                "--mode",
                "log-shipping",
                "--backup",
                backup.to_str().unwrap(),
            ]);
            args.extend(["--archive", src.archive.as_ref().unwrap().to_str().unwrap()]);
            args.extend(["--conn", &conn, "--passfile", pass.to_str().unwrap()]);
        }
    }
    let linked = link(&d, name, mode.name(), &args);
    assert_eq!(
        linked.port, port,
        "link reports another port than --staging-port"
    );

    let st = wait_syncing(&d, name);
    assert_eq!(st["name"], name, "status: {st}");
    assert_eq!(st["mode"], mode.name(), "status: {st}");
    let data_dir = d.store().join("mnt").join(name);
    assert_eq!(
        st["data_dir"].as_str(),
        Some(data_dir.to_str().unwrap()),
        "status data_dir: {st}"
    );
    assert!(
        util::is_mounted(&data_dir) && data_dir.join("PG_VERSION").exists(),
        "the staging dataset is not mounted as a data dir at {}",
        data_dir.display()
    );
    assert_eq!(
        st["staging_port"].as_u64(),
        Some(port as u64),
        "status: {st}"
    );
    let pid = staging_pid(&st).unwrap();
    assert_eq!(
        uid_of(pid),
        postgres_ids().map(|(u, _)| u),
        "the staging postmaster {pid} does not run as the postgres OS user"
    );
    assert!(
        st["restarts"].as_u64() == Some(0),
        "restarts should be 0 after a clean link: {st}"
    );
    assert!(
        st["snapshots"].as_u64().is_some_and(|n| n >= 1)
            && st["last_snapshot"]["name"] == linked.first_snapshot.as_str(),
        "status should count the first snapshot {} as the last one: {st}",
        linked.first_snapshot
    );
    let conn_shown = st["conn"].as_str().unwrap_or_default();
    assert!(
        !conn_shown.contains(REPL_PW),
        "status conn has the password: {st}"
    );
    match mode {
        Mode::LogShipping => {
            assert!(st["slot"].is_null(), "log shipping uses no slot: {st}");
            assert_eq!(
                st["archive"].as_str(),
                Some(src.archive.as_ref().unwrap().to_str().unwrap()),
                "status archive: {st}"
            );
            assert_eq!(
                src.slots(),
                Vec::<String>::new(),
                "log shipping created a replication slot on the source"
            );
        }
        _ => {
            assert_eq!(st["slot"].as_str(), Some(expect_slot), "status slot: {st}");
            assert_eq!(
                src.slots(),
                vec![expect_slot.to_string()],
                "the source should have exactly the staging's slot"
            );
        }
    }
    let listed = source_list(&d);
    assert!(
        listed.len() == 1 && listed[0]["name"] == name && listed[0]["mode"] == mode.name(),
        "source list --json: {listed:?}"
    );
    if !matches!(mode, Mode::LogShipping) {
        assert_source_touched_lightly(&d, &src, name);
    }

    // Rows committed on the source after linking reach the next snapshot.
    src.insert_rows(101, 250, "after link");
    let target = match mode {
        Mode::LogShipping => src.switch_wal(),
        _ => src.lsn(),
    };
    let st = wait_replayed(&d, name, target);
    eprintln!("{name}: replayed to the source's {}: {st}", fmt_lsn(target));
    let snap = source_snapshot(&d, name);
    let listed = snapshot_list(&d, name);
    let entry = listed
        .iter()
        .find(|e| e["name"] == snap.as_str())
        .unwrap_or_else(|| panic!("snapshot list {name} --json lacks {snap}: {listed:?}"));
    assert!(
        entry["mode"] == mode.name()
            && entry["timeline"].as_u64() == Some(1)
            && entry["lsn"].as_str().is_some_and(|l| parse_lsn(l) > 0),
        "snapshot list entry of {snap} should carry mode, timeline 1 and an LSN: {entry}"
    );
    let r = provision(&d, &snap, "c1");
    assert_eq!(
        r.pg.psql("SELECT count(*), count(*) FILTER (WHERE note = 'after link') FROM marker"),
        "250|150",
        "a clone of {snap} lacks rows committed on the source before the snapshot"
    );
    assert_eq!(r.pg.psql("SELECT count(*) FROM pgbench_accounts"), "100000");
    drop(r);

    if let Mode::BackupStream = mode {
        // The first snapshot is frozen: it has none of the rows committed after linking.
        let r = provision(&d, &linked.first_snapshot, "c0");
        assert_eq!(
            r.pg.psql("SELECT count(*) FROM marker"),
            "100",
            "the first snapshot {} changed after it was taken",
            linked.first_snapshot
        );
        drop(r);
        assert_secret_hidden(&d, name, REPL_PW);

        // `source snapshot --json` describes the snapshot it took; status counts it.
        let before = status(&d, name)["snapshots"].as_u64().unwrap();
        let j = json(
            &d.ok(&["source", "snapshot", name, "--json"]),
            "source snapshot --json",
        );
        assert!(
            j["name"].as_str().is_some_and(|n| n.starts_with("prod@"))
                && j["lsn"].as_str().is_some_and(|l| parse_lsn(l) > 0)
                && j["timeline"].as_u64() == Some(1)
                && j["mode"] == "backup-stream"
                && j["created"].is_string()
                && j.get("replay_time").is_some(),
            "source snapshot --json lacks name/lsn/timeline/replay_time/mode/created: {j}"
        );
        let st = status(&d, name);
        assert!(
            st["snapshots"].as_u64() == Some(before + 1)
                && st["last_snapshot"]["name"] == j["name"],
            "status does not count the snapshot {} as the last one: {st}",
            j["name"]
        );
    }
}

// The default mode: `source link NAME --conn URL` (the password only in the URL) takes a base
// backup into the staging dataset and a hot standby streams from the source through the slot
// vdbfs_NAME; status tells mode, state, port, pid (run as postgres), slot; rows committed after
// linking are in the next `source snapshot` (`--json` describes it); the first snapshot stays as
// it was; the source sees one walsender and no open transaction; the password never shows in
// status, logs, process listings or the staging configuration.
#[test]
fn backup_stream_links_and_new_rows_reach_the_next_snapshot() {
    link_and_read_new_rows(Mode::BackupStream, "prod", "vdbfs_prod");
}

// `--mode stream --backup DIR` imports the user's own pg_basebackup (plain directory) and streams
// from the source through a slot named after the source (non [a-z0-9_] characters become `_`);
// rows committed after linking are in the next snapshot.
#[test]
fn stream_from_own_backup_links_and_new_rows_reach_the_next_snapshot() {
    link_and_read_new_rows(Mode::Stream, "app-db", "vdbfs_app_db");
}

// `--mode log-shipping --backup DIR --archive DIR` imports a tar-format backup and replays WAL
// segments the source's archive_command copies into the archive; no slot is made on the source;
// rows committed and archived (pg_switch_wal) after linking are in the next snapshot.
#[test]
fn log_shipping_links_and_archived_rows_reach_the_next_snapshot() {
    link_and_read_new_rows(Mode::LogShipping, "shipped", "");
}

// ---------------------------------------------------------------------------------------------
// Snapshots under load

/// A background pgbench run; Drop ends it (SIGTERM to runuser, which passes it on; then SIGKILL).
struct Background {
    child: Option<Child>,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Background {
    fn start(src: &Postgres, args: &[&str]) -> Background {
        let dir = tempdir("vdbfs-pgbench-");
        let log = dir.path().join("pgbench.log");
        let f = fs::File::create(&log).unwrap();
        let child = src
            .pgbench_command(args)
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .expect("spawn pgbench");
        Background {
            child: Some(child),
            log,
            _dir: dir,
        }
    }

    /// Waits (bounded) for the run to end; returns its status and output.
    fn finish(mut self, timeout: Duration) -> (ExitStatus, String) {
        let mut c = self.child.take().unwrap();
        let st = util::wait_child(&mut c, timeout);
        let out = fs::read_to_string(&self.log).unwrap_or_default();
        match st {
            Some(st) => (st, out),
            None => {
                self.child = Some(c);
                panic!("pgbench did not end within {timeout:?}; output:\n{out}");
            }
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            signal(c.id() as i32, libc::SIGTERM);
            if util::wait_child(&mut c, Duration::from_secs(10)).is_none() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// What must be equal between the source and a snapshot taken after replay caught up.
fn pgbench_fingerprint(pg: &Postgres) -> String {
    pg.psql(
        "SELECT (SELECT sum(abalance) FROM pgbench_accounts) || ' ' || \
                (SELECT sum(tbalance) FROM pgbench_tellers) || ' ' || \
                (SELECT count(*) FROM pgbench_history) || ' ' || \
                (SELECT coalesce(sum(delta), 0) FROM pgbench_history)",
    )
}

// Validated-sync snapshots of a source under write load are usable databases: three snapshots
// taken while pgbench (tpcb-like) runs on the source each give a clone that starts as a primary
// and passes pg_amcheck, each later one holding at least as much history as the earlier; once
// replay catches up after the run, a snapshot holds exactly the source's data.
#[test]
fn snapshots_taken_during_pgbench_start_and_pass_amcheck() {
    let src = SourceDb::start(false, &[]);
    src.pgbench(&["-i", "-s", "5", "-q"]);
    let d = Staged::start();
    let port = util::free_port().to_string();
    let pass = src.passfile("replicator", REPL_PW);
    link(
        &d,
        "busy",
        "backup-stream",
        &[
            "--conn",
            &src.conn("replicator"),
            "--passfile",
            pass.to_str().unwrap(),
            "--staging-port",
            &port,
        ],
    );
    wait_syncing(&d, "busy");

    let run = Background::start(&src, &["-c", "4", "-j", "2", "-T", "20", "-n"]);
    let mut snaps = Vec::new();
    // Each snapshot is taken once pgbench committed more since the last one (observed on the
    // source), so each holds more history than the one before.
    let history = || {
        src.psql("SELECT count(*) FROM pgbench_history")
            .parse::<u64>()
            .unwrap_or(0)
    };
    let mut seen = 0;
    for _ in 0..3 {
        let mut now = seen;
        assert!(
            util::wait_until(WAIT, || {
                now = history();
                now >= seen + 500
            }),
            "pgbench on the source did not commit 500 more transactions within {WAIT:?} \
             (history rows: {now})"
        );
        seen = now;
        snaps.push(source_snapshot(&d, "busy"));
    }
    let (st, out) = run.finish(Duration::from_secs(90));
    assert!(
        st.success() && out.contains("number of failed transactions: 0"),
        "pgbench on the source failed while snapshots were taken ({st}):\n{out}"
    );

    let mut history = Vec::new();
    for (i, snap) in snaps.iter().enumerate() {
        let r = provision(&d, snap, &format!("load{i}"));
        r.pg.amcheck();
        history.push(
            r.pg.psql("SELECT count(*) FROM pgbench_history")
                .parse::<u64>()
                .unwrap(),
        );
    }
    eprintln!("pgbench_history rows in the snapshots {snaps:?}: {history:?}");
    assert!(
        history.windows(2).all(|w| w[0] <= w[1]) && history[2] > history[0],
        "later snapshots should hold more pgbench history: {snaps:?} -> {history:?}"
    );

    let target = src.lsn();
    wait_replayed(&d, "busy", target);
    let last = source_snapshot(&d, "busy");
    let r = provision(&d, &last, "final");
    assert_eq!(
        pgbench_fingerprint(&r.pg),
        pgbench_fingerprint(&src),
        "a snapshot taken after replay caught up differs from the source"
    );
}

// ---------------------------------------------------------------------------------------------
// Preflight

/// Runs a link expected to fail: non-zero exit, a `vdbfs: error:` on stderr whose text (from
/// there on; progress lines before it do not count) contains `phrase` (case-insensitive), and
/// never the replicator's password. Returns stderr.
#[track_caller]
fn expect_link_error(d: &Daemon, name: &str, args: &[&str], phrase: &str) -> String {
    let mut a = vec!["source", "link", name];
    a.extend_from_slice(args);
    let out = d.vdbfs(&a);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success() && error_text(&out).contains(&phrase.to_lowercase()),
        "`vdbfs {}` should fail with an error containing {phrase:?}\n{}\ndaemon log tail:\n{}",
        a.join(" "),
        describe(&out),
        d.log_tail(40)
    );
    assert!(
        !err.contains(REPL_PW) && !String::from_utf8_lossy(&out.stdout).contains(REPL_PW),
        "a failed link printed the password\n{}",
        describe(&out)
    );
    eprintln!("expected failure ({phrase}): {}", err.trim());
    err
}

/// After a refused link: no dataset NAME (unless it existed before), no source record, no slot
/// on the source, no new mount, no process on the store.
#[track_caller]
pub(crate) fn assert_nothing_left(
    d: &Daemon,
    src: &Postgres,
    name: &str,
    before: &Before,
    dataset_existed: bool,
    what: &str,
) {
    let ds = dataset_names(d);
    assert_eq!(
        ds.iter().any(|n| n == name),
        dataset_existed,
        "after {what}: dataset list is {ds:?}"
    );
    let listed = source_list(d);
    assert!(
        listed.is_empty(),
        "after {what}: source list --json should be empty: {listed:?}"
    );
    assert_eq!(
        src.psql("SELECT count(*) FROM pg_replication_slots"),
        "0",
        "after {what}: a replication slot was left on the source"
    );
    assert_eq!(
        mounts_under(d.root()),
        before.mounts,
        "after {what}: the mounts under the test dir changed"
    );
    let left = new_processes_on_store(d, before);
    assert!(
        left.is_empty(),
        "after {what}: processes left on the store: {left:?}"
    );
}

/// A fake PostgreSQL install dir: `postgres --version` says 14.10, the rest are the real 15
/// binaries.
fn fake_pg14_bin() -> tempfile::TempDir {
    let dir = tempdir("vdbfs-fake-pg14-");
    for e in fs::read_dir(PG_BIN).unwrap().flatten() {
        if e.file_name() != "postgres" {
            std::os::unix::fs::symlink(e.path(), dir.path().join(e.file_name())).unwrap();
        }
    }
    let script = dir.path().join("postgres");
    fs::write(
        &script,
        format!(
            "#!/bin/sh\ncase \"$1\" in\n  --version|-V) echo 'postgres (PostgreSQL) 14.10'; exit 0;;\nesac\n\
             exec {PG_BIN}/postgres \"$@\"\n"
        ),
    )
    .unwrap();
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// One link preflight must refuse: the name and arguments, a phrase its error contains, the
/// source whose slots are checked afterwards, whether dataset NAME existed before, and what the
/// case is (for messages).
struct Refused<'a> {
    name: &'a str,
    args: Vec<&'a str>,
    error: String,
    src: &'a Postgres,
    dataset_existed: bool,
    what: &'a str,
}

impl<'a> Refused<'a> {
    fn new(src: &'a Postgres, what: &'a str, args: Vec<&'a str>, error: &str) -> Refused<'a> {
        Refused {
            name: "prod",
            args,
            error: error.to_string(),
            src,
            dataset_existed: false,
            what,
        }
    }
}

/// `--conn CONN --passfile FILE --staging-port PORT EXTRA...`
fn link_args<'a>(
    conn: &'a str,
    passfile: &'a str,
    port: &'a str,
    extra: &[&'a str],
) -> Vec<&'a str> {
    let mut v = vec![
        "--conn",
        conn,
        "--passfile",
        passfile,
        "--staging-port",
        port,
    ];
    v.extend_from_slice(extra);
    v
}

/// Runs each case: the link fails with an error containing its phrase and leaves nothing behind.
/// Returns each case's stderr, in order.
#[track_caller]
fn assert_refused(d: &Daemon, before: &Before, cases: &[Refused]) -> Vec<String> {
    cases
        .iter()
        .map(|c| {
            let err = expect_link_error(d, c.name, &c.args, &c.error);
            assert_nothing_left(d, c.src, c.name, before, c.dataset_existed, c.what);
            err
        })
        .collect()
}

// Preflight refuses a source it cannot use, before copying anything, with an error naming the
// problem: wrong password (passfile and URL; the URL's password is not echoed), a user without
// REPLICATION, wal_level=minimal, a server major other than the local binaries', a staging port
// in use, a name already taken. Each leaves nothing behind (no dataset, no source record, no slot
// on the source, no mount, no process), so the same name links fine once the problem is fixed.
#[test]
fn preflight_refuses_bad_sources_and_leaves_nothing_behind() {
    let src = SourceDb::start(false, &[]);
    let d = Staged::start();
    let before = before(&d);
    let port = util::free_port().to_string();
    let conn = src.conn("replicator");
    let good = src.passfile("replicator", REPL_PW);
    let good = good.to_str().unwrap();
    let wrong = src.passfile("replicator", "not-the-password");
    let wrong_url = src.url("replicator", "Wrong-Url-Pw-93c1");
    let plain = src.passfile("plain", PLAIN_PW);
    let plain_conn = src.conn("plain");
    let fake = fake_pg14_bin();
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_port = busy.local_addr().unwrap().port().to_string();
    let minimal = SourceDb::start(false, &["wal_level = minimal", "max_wal_senders = 0"]);
    let mpass = minimal.passfile("replicator", REPL_PW);
    let minimal_conn = minimal.conn("replicator");

    let wrong = wrong.to_str().unwrap();
    let plain = plain.to_str().unwrap();
    let fake = fake.path().to_str().unwrap();
    let mpass = mpass.to_str().unwrap();
    let mut taken = Refused::new(
        &src,
        "a name already taken",
        link_args(&conn, good, &port, &[]),
        "already exists",
    );
    taken.name = "taken";
    taken.dataset_existed = true;
    let cases = [
        Refused::new(
            &src,
            "a wrong password (passfile)",
            link_args(&conn, wrong, &port, &[]),
            "password authentication failed",
        ),
        Refused::new(
            &src,
            "a wrong password (URL)",
            vec!["--conn", &wrong_url, "--staging-port", &port],
            "password authentication failed",
        ),
        Refused::new(
            &src,
            "a user without REPLICATION",
            link_args(&plain_conn, plain, &port, &[]),
            "replication privilege",
        ),
        Refused::new(
            &src,
            "a version mismatch",
            link_args(&conn, good, &port, &["--pg-bin", fake]),
            "version",
        ),
        Refused::new(
            &src,
            "a busy staging port",
            link_args(&conn, good, &busy_port, &[]),
            &format!("port {busy_port} is in use"),
        ),
        taken,
        Refused::new(
            &minimal,
            "wal_level=minimal",
            link_args(&minimal_conn, mpass, &port, &[]),
            "wal_level = minimal",
        ),
    ];
    d.create_dataset("taken");
    let errors = assert_refused(&d, &before, &cases);
    assert!(
        !errors[1].contains("Wrong-Url-Pw-93c1"),
        "the error echoes the URL's password: {}",
        errors[1]
    );
    drop(cases);
    drop(busy);
    drop(minimal);

    // Nothing left behind blocks the name: a good link (default staging port) works.
    let linked = link(
        &d,
        "prod",
        "backup-stream",
        &["--conn", &conn, "--passfile", good],
    );
    assert!(
        linked.port >= 5433,
        "the default staging port is the first free one from 5433 up, got {}",
        linked.port
    );
    let st = wait_syncing(&d, "prod");
    assert_eq!(st["staging_port"].as_u64(), Some(linked.port as u64));
    assert_eq!(src.slots(), vec!["vdbfs_prod".to_string()]);
}

// Log shipping needs WAL to replay: a missing archive directory and an empty one are each
// refused with an error about the archive; `--mode stream` without `--backup` and with a backup
// of another cluster (a standby could never replay the source's WAL on it) are refused with an
// error about the backup; each leaves nothing behind.
#[test]
fn preflight_refuses_bad_archives_and_backups() {
    let src = SourceDb::start(true, &[]);
    let backup = src.basebackup("backup", false);
    src.wait_archived();
    let d = Staged::start();
    let before = before(&d);
    let port = util::free_port().to_string();
    let conn = src.conn("replicator");
    let pass = src.passfile("replicator", REPL_PW);
    let pass = pass.to_str().unwrap();
    let missing = d.root().join("no-such-archive");
    let empty = tempdir("vdbfs-empty-archive-");
    let other = SourceDb::start(false, &[]);
    let foreign = other.basebackup("backup", false);
    let (backup, foreign) = (backup.to_str().unwrap(), foreign.to_str().unwrap());
    let (missing, empty) = (missing.to_str().unwrap(), empty.path().to_str().unwrap());
    let ship = ["--mode", "log-shipping", "--backup", backup, "--archive"];
    let cases = [
        (
            "a missing archive dir",
            link_args(&conn, pass, &port, &[&ship[..], &[missing]].concat()),
            "archive",
        ),
        (
            "an empty archive dir",
            link_args(&conn, pass, &port, &[&ship[..], &[empty]].concat()),
            "archive",
        ),
        (
            "stream mode without --backup",
            link_args(&conn, pass, &port, &["--mode", "stream"]),
            "backup",
        ),
        (
            "a backup of another cluster",
            link_args(
                &conn,
                pass,
                &port,
                &["--mode", "stream", "--backup", foreign],
            ),
            "backup",
        ),
    ]
    .map(|(what, args, error)| Refused {
        name: "ship",
        ..Refused::new(&src, what, args, error)
    });
    assert_refused(&d, &before, &cases);
}

// Like a plain one, a tar-format backup (base.tar.gz) of another cluster is refused before
// anything is copied, with an error about the backup (its pg_control names another system), and
// leaves nothing behind.
#[test]
fn preflight_refuses_a_tar_backup_of_another_cluster() {
    let src = SourceDb::start(false, &[]);
    let other = SourceDb::start(false, &[]);
    let foreign_tar = other.basebackup("backup-tar", true);
    let d = Staged::start();
    let before = before(&d);
    let port = util::free_port().to_string();
    let pass = src.passfile("replicator", REPL_PW);
    let conn = src.conn("replicator");
    let mut case = Refused::new(
        &src,
        "a tar backup of another cluster",
        link_args(
            &conn,
            pass.to_str().unwrap(),
            &port,
            &[
                "--mode",
                "stream",
                "--backup",
                foreign_tar.to_str().unwrap(),
            ],
        ),
        "backup",
    );
    case.name = "foreign";
    let t0 = Instant::now();
    let err = expect_link_error(&d, case.name, &case.args, &case.error);
    assert!(
        !err.contains("extracting") && t0.elapsed() < Duration::from_secs(30),
        "a foreign tar backup should be refused before it is copied (took {:?})\n{err}",
        t0.elapsed()
    );
    assert_nothing_left(
        &d,
        case.src,
        case.name,
        &before,
        case.dataset_existed,
        case.what,
    );
}

// ---------------------------------------------------------------------------------------------
// Supervision

/// Rows 1..=n of marker are in a clone of a fresh `source snapshot`.
#[track_caller]
fn assert_snapshot_has_rows(d: &Daemon, name: &str, clone: &str, n: i64) -> String {
    let snap = source_snapshot(d, name);
    let r = provision(d, &snap, clone);
    assert_eq!(
        r.pg.psql("SELECT count(*), coalesce(max(id), 0) FROM marker"),
        format!("{n}|{n}"),
        "a clone of {snap} does not hold the source's rows 1..{n}"
    );
    snap
}

// The daemon supervises staging: after a SIGKILL of the staging postmaster it starts a new one
// within seconds (state syncing, restarts >= 1) that keeps replaying; after a daemon restart
// (SIGTERM + serve) and after a daemon crash (kill -9 + serve) staging is re-mounted and started
// by itself, resumes at or past where it was (the old postmaster is gone), and new source rows
// reach a new snapshot.
#[test]
fn staging_survives_postmaster_kill_and_daemon_restarts() {
    let src = SourceDb::start(false, &[]);
    src.pgbench(&["-i", "-s", "1", "-q"]);
    let mut d = Staged::start();
    let st = link_small(&d, &src, "sup");
    let pid1 = staging_pid(&st).unwrap();

    assert!(
        signal(pid1, libc::SIGKILL),
        "kill -9 staging postmaster {pid1}"
    );
    let st = wait_status(&d, "sup", "a new staging postmaster after kill -9", |s| {
        s["state"] == "syncing"
            && staging_pid(s).is_some_and(|p| p != pid1 && pid_alive(p))
            && s["restarts"].as_u64().is_some_and(|r| r >= 1)
    });
    assert!(
        !pid_alive(pid1),
        "the killed postmaster {pid1} is still alive"
    );
    let pid2 = staging_pid(&st).unwrap();
    src.insert_rows(1, 50, "after postmaster kill");
    let st = wait_replayed(&d, "sup", src.lsn());
    let replayed = lsn_field(&st, "replay_lsn").unwrap();

    d.restart();
    let mnt = d.store().join("mnt").join("sup");
    let st = wait_status(&d, "sup", "staging resumed after a daemon restart", |s| {
        s["state"] == "syncing"
            && staging_pid(s).is_some_and(pid_alive)
            && lsn_field(s, "replay_lsn").is_some_and(|l| l >= replayed)
    });
    assert!(
        util::is_mounted(&mnt),
        "staging is not mounted again after a daemon restart"
    );
    assert!(
        !pid_alive(pid2),
        "the staging postmaster {pid2} from before the daemon restart still runs"
    );
    let pid3 = staging_pid(&st).unwrap();
    src.insert_rows(51, 100, "after daemon restart");
    let st = wait_replayed(&d, "sup", src.lsn());
    let replayed = lsn_field(&st, "replay_lsn").unwrap();
    assert_snapshot_has_rows(&d, "sup", "after-restart", 100);

    d.kill9();
    d.start_again();
    let st = wait_status(&d, "sup", "staging resumed after a daemon kill -9", |s| {
        s["state"] == "syncing"
            && staging_pid(s).is_some_and(|p| p != pid3 && pid_alive(p))
            && lsn_field(s, "replay_lsn").is_some_and(|l| l >= replayed)
    });
    eprintln!("after kill -9 of the daemon: {st}");
    assert!(
        util::wait_until(WAIT, || !pid_alive(pid3)),
        "the staging postmaster {pid3} on the crashed daemon's mount still runs: {}",
        util::describe_pid(pid3)
    );
    d.wait_mounted(&mnt, WAIT);
    src.insert_rows(101, 150, "after daemon kill -9");
    wait_replayed(&d, "sup", src.lsn());
    assert_snapshot_has_rows(&d, "sup", "after-crash", 150);
}

// While linked, the staging dataset is protected: `umount` and `dataset delete` of it are
// refused and staging keeps syncing. disable stops the staging postgres but keeps dataset,
// snapshots and the slot (so nothing is missed), also across a daemon restart; enable resumes
// and catches up. unlink drops the slot on the source and unmounts; the dataset and its
// snapshots stay usable; with --delete-snapshots they are deleted. `--keep-for` shows in status.
#[test]
fn disable_enable_and_unlink_keep_or_delete_what_they_say() {
    let src = SourceDb::start(false, &[]);
    src.pgbench(&["-i", "-s", "1", "-q"]);
    let mut d = Staged::start();
    let st = link_small_with(&d, &src, "keep", &["--keep-for", "7d"]);
    assert!(
        st["keep_for_secs"].as_u64() == Some(7 * 86400) && st["keep"].is_null(),
        "status does not report --keep-for 7d: {st}"
    );
    let pid = staging_pid(&st).unwrap();
    let mnt = d.store().join("mnt").join("keep");
    for args in [
        vec!["umount", mnt.to_str().unwrap()],
        vec!["dataset", "delete", "keep"],
        vec!["dataset", "delete", "keep", "--with-snapshots"],
    ] {
        let out = d.vdbfs(&args);
        assert!(
            !out.status.success() && !out.stderr.is_empty(),
            "`vdbfs {}` of a linked source's staging dataset should be refused\n{}",
            args.join(" "),
            describe(&out)
        );
    }
    let st = wait_syncing(&d, "keep");
    assert!(
        staging_pid(&st) == Some(pid) && util::is_mounted(&mnt),
        "refused umount/delete disturbed staging: {st}"
    );
    src.insert_rows(1, 20, "before disable");
    wait_replayed(&d, "keep", src.lsn());
    let s1 = source_snapshot(&d, "keep");

    d.ok(&["source", "disable", "keep"]);
    let st = status(&d, "keep");
    assert!(
        st["state"] == "disabled" && st["staging_pid"].is_null(),
        "after disable: {st}"
    );
    assert!(
        util::wait_until(Duration::from_secs(30), || !pid_alive(pid)),
        "the staging postmaster {pid} still runs after disable"
    );
    let mut slots = String::new();
    assert!(
        util::wait_until(Duration::from_secs(30), || {
            slots = src.psql("SELECT slot_name, active FROM pg_replication_slots");
            slots == "vdbfs_keep|f"
        }),
        "disable should keep the slot vdbfs_keep on the source, inactive; slots: {slots:?}"
    );
    assert!(dataset_names(&d).contains(&"keep".to_string()));
    assert!(all_snapshot_names(&d).contains(&s1));

    // Disabled stays disabled across a daemon restart.
    d.restart();
    // The supervisor's first round after the restart is when it would start staging.
    d.wait_log_since_start(SUPERVISED, WAIT);
    let st = status(&d, "keep");
    assert!(
        st["state"] == "disabled" && st["staging_pid"].is_null(),
        "a disabled source should stay disabled after a daemon restart: {st}"
    );

    src.insert_rows(21, 60, "while disabled");
    d.ok(&["source", "enable", "keep"]);
    wait_syncing(&d, "keep");
    wait_replayed(&d, "keep", src.lsn());
    let s2 = source_snapshot(&d, "keep");
    let snaps_before = snapshot_list(&d, "keep");
    let st = status(&d, "keep");
    let pid = staging_pid(&st).unwrap();

    d.ok(&["source", "unlink", "keep"]);
    assert!(source_list(&d).is_empty(), "unlinked source still listed");
    assert_eq!(src.slots(), Vec::<String>::new(), "unlink left the slot");
    assert!(
        !util::is_mounted(&d.store().join("mnt").join("keep")),
        "unlink left the staging mount"
    );
    assert!(
        util::wait_until(Duration::from_secs(30), || !pid_alive(pid)),
        "the staging postmaster {pid} still runs after unlink"
    );
    assert!(
        dataset_names(&d).contains(&"keep".to_string()),
        "unlink without --delete-snapshots deleted the dataset"
    );
    let names = |v: &[Value]| -> Vec<String> {
        v.iter()
            .map(|e| e["name"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        names(&snapshot_list(&d, "keep")),
        names(&snaps_before),
        "unlink without --delete-snapshots changed the snapshots"
    );
    // A kept snapshot still gives a database with everything, including rows that arrived
    // while staging was disabled.
    let r = provision(&d, &s2, "kept");
    assert_eq!(r.pg.psql("SELECT count(*) FROM marker"), "60");
    drop(r);

    link_small(&d, &src, "gone");
    assert_eq!(src.slots(), vec!["vdbfs_gone".to_string()]);
    d.ok(&["source", "unlink", "gone", "--delete-snapshots"]);
    assert!(source_list(&d).is_empty());
    assert_eq!(src.slots(), Vec::<String>::new(), "unlink left the slot");
    assert!(
        !dataset_names(&d).contains(&"gone".to_string()),
        "unlink --delete-snapshots kept the dataset"
    );
    let left: Vec<String> = all_snapshot_names(&d)
        .into_iter()
        .filter(|s| s.starts_with("gone@"))
        .collect();
    assert!(left.is_empty(), "unlink --delete-snapshots kept {left:?}");
}

// A broken stream is shown, not hidden: when the source goes down, status turns to state
// "fault" with a reason; when it comes back, staging reconnects by itself (syncing, no fault)
// and replays new rows. With the source down again, unlink refuses (it cannot drop the slot)
// and leaves the source linked; `unlink --force` goes on and keeps the dataset.
#[test]
fn a_broken_stream_is_reported_as_a_fault_and_recovers() {
    let mut src = SourceDb::start(false, &[]);
    let d = Staged::start();
    link_small(&d, &src, "flaky");
    src.stop();
    let st = wait_status(&d, "flaky", "state fault while the source is down", |s| {
        s["state"] == "fault" && s["fault"].as_str().is_some_and(|f| !f.trim().is_empty())
    });
    eprintln!("fault while the source is down: {}", st["fault"]);
    src.start();
    wait_status(&d, "flaky", "back to syncing once the source is up", |s| {
        s["state"] == "syncing" && s["fault"].is_null()
    });
    src.insert_rows(1, 10, "after the outage");
    wait_replayed(&d, "flaky", src.lsn());

    // An unreachable source: unlink cannot drop the slot and says so; --force goes on.
    src.stop();
    let out = d.vdbfs(&["source", "unlink", "flaky"]);
    assert!(
        !out.status.success() && !out.stderr.is_empty(),
        "unlink without --force should fail while the source is unreachable\n{}",
        describe(&out)
    );
    assert_eq!(
        source_list(&d).len(),
        1,
        "a failed unlink should leave the source linked"
    );
    let st = status(&d, "flaky");
    let pid = staging_pid(&st);
    d.ok(&["source", "unlink", "flaky", "--force"]);
    assert!(
        source_list(&d).is_empty(),
        "unlink --force left the source listed"
    );
    assert!(
        !util::is_mounted(&d.store().join("mnt").join("flaky")),
        "unlink --force left the staging mount"
    );
    if let Some(pid) = pid {
        assert!(
            util::wait_until(Duration::from_secs(30), || !pid_alive(pid)),
            "the staging postmaster {pid} still runs after unlink --force"
        );
    }
    assert!(
        dataset_names(&d).contains(&"flaky".to_string()),
        "unlink --force without --delete-snapshots deleted the dataset"
    );
}

/// The WAL segment file name holding `lsn` on the source.
fn walfile(src: &SourceDb, lsn: &str) -> String {
    src.psql(&format!("SELECT pg_walfile_name('{lsn}')"))
}

// Log shipping states a gap in the archive: when a later WAL segment is archived but an earlier
// one is missing, status shows state "fault" naming the missing segment (replay cannot go on);
// once the missing file arrives, replay resumes by itself (syncing, no fault) and the rows of
// both segments reach the next snapshot.
#[test]
fn log_shipping_archive_gap_is_a_fault_until_filled() {
    let src = SourceDb::start(true, &[]);
    let backup = src.basebackup("backup", false);
    src.wait_archived();
    let archive = src.archive.clone().unwrap();
    let d = Staged::start();
    let pass = src.passfile("replicator", REPL_PW);
    let port = util::free_port().to_string();
    link(
        &d,
        "gap",
        "log-shipping",
        &[
            "--mode",
            "log-shipping",
            "--backup",
            backup.to_str().unwrap(),
            "--archive",
            archive.to_str().unwrap(),
            "--conn",
            &src.conn("replicator"),
            "--passfile",
            pass.to_str().unwrap(),
            "--staging-port",
            &port,
        ],
    );
    wait_syncing(&d, "gap");
    let target = src.switch_wal();
    wait_replayed(&d, "gap", target);

    // From now on the source archives into HOLD; the test decides what reaches the archive.
    let hold = src.dir.path().join("hold");
    fs::create_dir(&hold).unwrap();
    chown_postgres(&hold);
    src.psql(&format!(
        "ALTER SYSTEM SET archive_command = 'test ! -f {0}/%f && cp %p {0}/%f'",
        hold.display()
    ));
    src.psql("SELECT pg_reload_conf()");
    // A new session sees the setting once the postmaster reloaded and signalled its children;
    // the archiver reloads before it archives again.
    let hold_cmd = format!("test ! -f {0}/%f && cp %p {0}/%f", hold.display());
    assert!(
        util::wait_until(WAIT, || src.psql("SHOW archive_command") == hold_cmd),
        "the source did not reload archive_command within {WAIT:?}"
    );
    // Names taken after the inserts: on a segment boundary pg_walfile_name names the previous.
    src.insert_rows(1, 30, "segment a");
    let seg_a = walfile(&src, &src.psql("SELECT pg_current_wal_lsn()"));
    src.switch_wal();
    src.insert_rows(31, 60, "segment b");
    let seg_b = walfile(&src, &src.psql("SELECT pg_current_wal_lsn()"));
    assert_ne!(seg_a, seg_b);
    let target = src.switch_wal();
    // Archived means archive_command returned (the archiver goes in order): a file that merely
    // exists in HOLD may still be half copied.
    assert!(
        util::wait_until(WAIT, || src
            .psql("SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver")
            .as_str()
            >= seg_b.as_str()
            && hold.join(&seg_a).exists()
            && hold.join(&seg_b).exists()),
        "the source did not archive {seg_a} and {seg_b} into {} within {WAIT:?}\nsource log:\n{}",
        hold.display(),
        src.log_tail(30)
    );
    assert!(
        !archive.join(&seg_a).exists(),
        "{seg_a} went to the archive: the archive_command reload came too late (test setup)"
    );
    let copy = |seg: &str| {
        fs::copy(hold.join(seg), archive.join(seg)).unwrap();
        chown_postgres(&archive.join(seg));
    };
    copy(&seg_b);
    let st = wait_status(&d, "gap", &format!("state fault naming {seg_a}"), |s| {
        s["state"] == "fault" && s["fault"].as_str().is_some_and(|f| f.contains(&seg_a))
    });
    eprintln!("archive gap: {}", st["fault"]);
    copy(&seg_a);
    wait_status(&d, "gap", "syncing again once the gap is filled", |s| {
        s["state"] == "syncing"
            && s["fault"].is_null()
            && lsn_field(s, "replay_lsn").is_some_and(|l| l >= target)
    });
    assert_snapshot_has_rows(&d, "gap", "filled", 60);
}

// A daemon crash in the middle of `source link` (while the base backup is copied) leaves no
// half-linked source behind: once the daemon serves again the source is either fully linked or
// gone, and the same link command then works and the standby follows the source.
#[test]
fn daemon_crash_during_link_leaves_no_half_linked_source() {
    let src = SourceDb::start(false, &[]);
    src.pgbench(&["-i", "-s", "10", "-q"]);
    let mut d = Staged::start();
    let pass = src.passfile("replicator", REPL_PW);
    let port = util::free_port().to_string();
    let conn = src.conn("replicator");
    let args = [
        "source",
        "link",
        "half",
        "--conn",
        conn.as_str(),
        "--passfile",
        pass.to_str().unwrap(),
        "--staging-port",
        port.as_str(),
    ];
    let mut cli = d
        .command()
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn vdbfs source link");
    let base = d.store().join("mnt").join("half").join("base");
    let started = Instant::now();
    let copying = util::wait_until(WAIT, || {
        base.exists() || cli.try_wait().ok().flatten().is_some()
    });
    assert!(
        copying && cli.try_wait().ok().flatten().is_none(),
        "the link finished (or never started copying) within {:?}; no crash window\n{}",
        started.elapsed(),
        d.log_tail(40)
    );
    let killed_after = started.elapsed();
    d.kill9();
    let st = util::wait_child(&mut cli, Duration::from_secs(30));
    if st.is_none() {
        let _ = cli.kill();
        let _ = cli.wait();
    }
    eprintln!("link CLI after the daemon crash: {st:?}");
    d.start_again();

    let mut listed = Vec::new();
    let settled = util::wait_until(WAIT, || {
        listed = source_list(&d);
        listed.is_empty() || listed.iter().all(|s| s["state"] == "syncing")
    });
    assert!(
        settled,
        "after the crash the half-done link neither finished nor went away: {listed:?}\n\
         daemon log tail:\n{}",
        d.log_tail(80)
    );
    eprintln!(
        "after the crash during link (killed {killed_after:?} into it): listed {listed:?}, \
         datasets {:?}, slots {:?}",
        dataset_names(&d),
        src.slots()
    );
    if listed.is_empty() {
        let out = d.vdbfs(&args[..]);
        assert!(
            out.status.success(),
            "linking again after a daemon crash during link failed\n{}\ndaemon log tail:\n{}",
            describe(&out),
            d.log_tail(80)
        );
    }
    wait_syncing(&d, "half");
    assert_eq!(src.slots(), vec!["vdbfs_half".to_string()]);
    src.insert_rows(1, 10, "after the crash");
    wait_replayed(&d, "half", src.lsn());
}

// The password may come from PGPASSWORD (no passfile, no password in the conninfo): the standby
// authenticates with it, also after a daemon restart, and it shows nowhere.
#[test]
fn pgpassword_from_the_environment_works_across_restarts_and_stays_hidden() {
    let src = SourceDb::start(false, &[]);
    let mut d = Staged::start();
    let port = util::free_port().to_string();
    let out = run_timeout(
        d.command()
            .env("PGPASSWORD", REPL_PW)
            .args(["source", "link", "envpw", "--conn"])
            .arg(src.conn("replicator"))
            .args(["--staging-port", &port]),
        util::COMMAND_TIMEOUT,
    );
    assert!(
        out.status.success(),
        "link with PGPASSWORD failed\n{}\ndaemon log tail:\n{}",
        describe(&out),
        d.log_tail(40)
    );
    wait_syncing(&d, "envpw");
    src.insert_rows(1, 10, "before restart");
    wait_replayed(&d, "envpw", src.lsn());
    d.restart();
    wait_syncing(&d, "envpw");
    src.insert_rows(11, 20, "after restart");
    wait_replayed(&d, "envpw", src.lsn());
    assert_secret_hidden(&d, "envpw", REPL_PW);
}

// ---------------------------------------------------------------------------------------------
// Env

// `vdbfs env discover --json` (no daemon needed) lists the local PostgreSQL 15 installation and
// the running clusters: the test's source as a primary (its data dir, port, pid) and the staging
// cluster as a standby.
#[test]
fn env_discover_finds_installation_source_and_staging() {
    let src = SourceDb::start(false, &[]);
    let d = Staged::start();
    let st = link_small(&d, &src, "disc");
    let out = run_timeout(
        Command::new(util::bin())
            .env_remove("VDBFS_STORE")
            .args(["env", "discover", "--json"]),
        Duration::from_secs(60),
    );
    assert!(
        out.status.success(),
        "env discover failed\n{}",
        describe(&out)
    );
    let v = json(&String::from_utf8_lossy(&out.stdout), "env discover --json");

    let inst = v["installations"]
        .as_array()
        .unwrap_or_else(|| panic!("no installations array: {v}"));
    assert!(
        inst.iter().any(|i| i["bin_dir"] == PG_BIN
            && (i["major"] == 15 || i["major"] == "15")
            && i["version"].as_str().is_some_and(|s| s.starts_with("15"))),
        "env discover does not list {PG_BIN} as major 15: {v}"
    );

    let clusters = v["clusters"]
        .as_array()
        .unwrap_or_else(|| panic!("no clusters array: {v}"));
    let find = |dir: &Path| {
        let want = fs::canonicalize(dir).unwrap();
        clusters
            .iter()
            .find(|c| {
                c["data_dir"]
                    .as_str()
                    .and_then(|s| fs::canonicalize(s).ok())
                    .is_some_and(|p| p == want)
            })
            .unwrap_or_else(|| panic!("env discover does not list {}: {v}", dir.display()))
            .clone()
    };
    let c = find(&src.datadir);
    assert!(
        c["running"] == true
            && c["role"] == "primary"
            && c["port"].as_u64() == Some(src.port() as u64)
            && (c["pid"].is_null() || c["pid"].as_i64() == src.postmaster_pid().map(i64::from)),
        "the source cluster is not listed as a running primary on port {}: {c}",
        src.port()
    );
    let staging = find(Path::new(st["data_dir"].as_str().unwrap()));
    assert!(
        staging["running"] == true
            && staging["role"] == "standby"
            && staging["port"] == st["staging_port"],
        "the staging cluster is not listed as a running standby on its port: {staging}\n\
         status: {st}"
    );
}

// ---------------------------------------------------------------------------------------------
// Snapshot policy

// Snapshots by policy: with `--snapshot-every 2s --keep 2` the daemon takes validated-sync
// snapshots by itself (one taken after new rows replayed holds them) and prunes to the newest 2
// (the first snapshot goes); status reports the policy.
#[test]
fn snapshot_policy_takes_and_prunes_snapshots() {
    let src = SourceDb::start(false, &[]);
    let d = Staged::start();
    let pass = src.passfile("replicator", REPL_PW);
    let port = util::free_port().to_string();
    let linked = link(
        &d,
        "pol",
        "backup-stream",
        &[
            "--conn",
            &src.conn("replicator"),
            "--passfile",
            pass.to_str().unwrap(),
            "--staging-port",
            &port,
            "--snapshot-every",
            "2s",
            "--keep",
            "2",
        ],
    );
    let st = wait_syncing(&d, "pol");
    assert!(
        st["snapshot_every_secs"].as_u64() == Some(2)
            && st["keep"].as_u64() == Some(2)
            && st["keep_for_secs"].is_null(),
        "status does not report the policy --snapshot-every 2s --keep 2: {st}"
    );
    let names = |d: &Daemon| -> Vec<String> {
        snapshot_list(d, "pol")
            .iter()
            .map(|e| e["name"].as_str().unwrap().to_string())
            .collect()
    };
    let mut seen = Vec::new();
    let pruned = util::wait_until(WAIT, || {
        seen = names(&d);
        seen.len() == 2 && !seen.contains(&linked.first_snapshot)
    });
    assert!(
        pruned,
        "with --snapshot-every 2s --keep 2 the first snapshot {} should be pruned and 2 \
         snapshots kept; snapshots: {seen:?}\ndaemon log tail:\n{}",
        linked.first_snapshot,
        d.log_tail(80)
    );

    src.insert_rows(1, 40, "for the policy");
    wait_replayed(&d, "pol", src.lsn());
    // Two snapshots newer than every one listed now: the newer of them was started after
    // the older one completed, so after the rows replayed.
    let known = names(&d);
    let mut now = Vec::new();
    let took = util::wait_until(WAIT, || {
        now = names(&d);
        assert!(
            now.len() <= 3,
            "--keep 2 holds {} snapshots: {now:?}",
            now.len()
        );
        now.len() == 2 && now.iter().all(|n| !known.contains(n))
    });
    assert!(
        took,
        "no two new policy snapshots within {WAIT:?} after {known:?}; now {now:?}"
    );
    let fresh = now.last().unwrap().clone();
    let r = provision(&d, &fresh, "from-policy");
    assert_eq!(
        r.pg.psql("SELECT count(*) FROM marker"),
        "40",
        "the policy snapshot {fresh}, taken after the rows replayed, lacks them"
    );
}
