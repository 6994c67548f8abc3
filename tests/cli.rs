//! The command line as users and scripts see it (docs/CLI-CONTRACT.md): exit codes, error
//! messages, JSON output, the store option, and the ownership and lifetime of mounts.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Output};

use crate::util::{self, describe, is_mounted, Daemon};

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A CLI command with the user's environment cleared of VDBFS_STORE.
fn vdbfs() -> Command {
    let mut c = Command::new(util::bin());
    c.env_remove("VDBFS_STORE");
    c
}

fn run(c: &mut Command) -> Output {
    util::run_timeout(c, util::COMMAND_TIMEOUT)
}

fn assert_error(out: &Output, what: &str) {
    assert_eq!(
        out.status.code(),
        Some(1),
        "{what}: expected exit 1\n{}",
        describe(out)
    );
    assert!(
        stderr(out).starts_with("vdbfs: error: "),
        "{what}: stderr must start with 'vdbfs: error: '\n{}",
        describe(out)
    );
}

// `vdbfs init` creates a store (mkdir -p) with index.redb and packs/, and refuses to init a
// directory that already is a store.
#[test]
fn init_creates_store_and_refuses_twice() {
    let tmp = util::tempdir("vdbfs-cli-");
    let store = tmp.path().join("a/b/store");
    let out = run(vdbfs().arg("--store").arg(&store).arg("init"));
    assert!(out.status.success(), "init failed\n{}", describe(&out));
    assert!(
        store.join("index.redb").is_file(),
        "no index.redb after init"
    );
    assert!(store.join("packs").is_dir(), "no packs/ after init");

    let out = run(vdbfs().arg("--store").arg(&store).arg("init"));
    assert_error(&out, "second init on the same store");
    assert!(store.join("index.redb").is_file());
}

// The bug: `vdbfs init DIR` on a PostgreSQL data directory succeeded and chmodded it 0711, so
// postgres refused to start on it. Now a non-empty directory that is not a store is refused
// (exit 1, the reason and what to do), and nothing in it changes: not its files, not its mode.
// An existing empty directory becomes a store and keeps its mode (with a note when the postgres
// user could not traverse it); a file is refused.
#[test]
fn init_refuses_what_is_not_its_own_and_changes_no_mode() {
    let tmp = util::tempdir("vdbfs-cli-");
    let pgdata = tmp.path().join("pgdata");
    fs::create_dir(&pgdata).unwrap();
    fs::write(pgdata.join("PG_VERSION"), "15\n").unwrap();
    fs::create_dir(pgdata.join("base")).unwrap();
    fs::set_permissions(&pgdata, fs::Permissions::from_mode(0o700)).unwrap();
    let out = run(vdbfs().arg("--store").arg(&pgdata).arg("init"));
    assert_error(&out, "init on a data directory");
    let err = stderr(&out);
    assert!(
        err.contains("not empty") && err.contains("choose another --store"),
        "the refusal must say why and what to do\n{}",
        describe(&out)
    );
    let mode = fs::metadata(&pgdata).unwrap().permissions().mode() & 0o7777;
    assert_eq!(
        mode, 0o700,
        "init changed the mode of a directory it did not create"
    );
    let mut names: Vec<String> = fs::read_dir(&pgdata)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["PG_VERSION", "base"], "init left something behind");

    let file = tmp.path().join("a-file");
    fs::write(&file, "x").unwrap();
    assert_error(
        &run(vdbfs().arg("--store").arg(&file).arg("init")),
        "init on a file",
    );

    let empty = tmp.path().join("empty");
    fs::create_dir(&empty).unwrap();
    fs::set_permissions(&empty, fs::Permissions::from_mode(0o750)).unwrap();
    let out = run(vdbfs().arg("--store").arg(&empty).arg("init"));
    assert!(
        out.status.success(),
        "init of an empty directory\n{}",
        describe(&out)
    );
    assert!(empty.join("index.redb").is_file());
    assert_eq!(
        fs::metadata(&empty).unwrap().permissions().mode() & 0o7777,
        0o750,
        "init changed the mode of a directory it did not create"
    );
    assert!(
        stderr(&out).contains("o+x"),
        "a store the postgres user cannot traverse deserves a note\n{}",
        describe(&out)
    );
    // A directory init creates is 0711, as the contract says.
    let fresh = tmp.path().join("fresh");
    let out = run(vdbfs().arg("--store").arg(&fresh).arg("init"));
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(
        fs::metadata(&fresh).unwrap().permissions().mode() & 0o7777,
        0o711
    );
}

// Without a running daemon every daemon command fails with exit 1 and tells the user exactly
// which socket did not answer and how to start a daemon.
#[test]
fn commands_without_daemon_say_no_daemon_answers() {
    let tmp = util::tempdir("vdbfs-cli-");
    let store = tmp.path().join("store");
    let out = run(vdbfs().arg("--store").arg(&store).arg("init"));
    assert!(out.status.success(), "init failed\n{}", describe(&out));
    let s = store.display().to_string();
    let mp = tmp.path().join("mnt");
    let mp = mp.to_str().unwrap();
    for args in [
        vec!["status"],
        vec!["status", "--json"],
        vec!["dataset", "list"],
        vec!["dataset", "create", "x"],
        vec!["mount", "x", mp],
        vec!["umount", mp],
    ] {
        let out = run(vdbfs().arg("--store").arg(&store).args(&args));
        assert_error(&out, &format!("vdbfs {}", args.join(" ")));
        let err = stderr(&out);
        let want = format!(
            "vdbfs: error: no vdbfs daemon answers at {s}/vdbfs.sock; start one with 'vdbfs serve --store {s}'"
        );
        assert!(
            err.contains(&want),
            "vdbfs {}: expected the no-daemon message\n  want: {want}\n{}",
            args.join(" "),
            describe(&out)
        );
    }
}

// `status --json` reports the daemon's pid, its store and its mounts.
#[test]
fn status_json_reports_pid_store_and_mounts() {
    let d = Daemon::start();
    let v = d.status_json();
    assert_eq!(
        v["pid"].as_u64(),
        d.pid().map(u64::from),
        "status pid is not the daemon's: {v}"
    );
    let store = v["store"]
        .as_str()
        .unwrap_or_else(|| panic!("no store: {v}"));
    assert_eq!(
        fs::canonicalize(store).unwrap(),
        fs::canonicalize(d.store()).unwrap(),
        "status store: {v}"
    );
    assert_eq!(v["mounts"].as_array().map(|a| a.len()), Some(0), "{v}");

    let m = d.create_and_mount("db1");
    let v = d.status_json();
    let mounts = v["mounts"].as_array().unwrap_or_else(|| panic!("{v}"));
    assert_eq!(mounts.len(), 1, "{v}");
    assert_eq!(mounts[0]["dataset"], "db1", "{v}");
    assert_eq!(
        Path::new(mounts[0]["mountpoint"].as_str().unwrap()),
        m.path,
        "{v}"
    );
}

// `dataset create` makes empty datasets; `dataset list --json` lists them with id, RFC 3339
// creation time, and the mount point (null while unmounted). Duplicates are refused.
#[test]
fn dataset_create_and_list_json() {
    let d = Daemon::start();
    let v: serde_json::Value = serde_json::from_str(&d.ok(&["dataset", "list", "--json"])).unwrap();
    assert_eq!(v, serde_json::json!([]), "new store must have no datasets");

    d.create_dataset("alpha");
    d.create_dataset("beta_2.x-y");
    let out = d.vdbfs(&["dataset", "create", "alpha"]);
    assert_error(&out, "dataset create of an existing name");

    let m = d.mount("alpha", &d.new_mountpoint("alpha"));
    let s = d.ok(&["dataset", "list", "--json"]);
    let v: serde_json::Value =
        serde_json::from_str(&s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"));
    let arr = v.as_array().unwrap_or_else(|| panic!("not an array: {s}"));
    assert_eq!(arr.len(), 2, "{s}");
    let mut ids = Vec::new();
    for e in arr {
        let name = e["name"].as_str().unwrap_or_else(|| panic!("no name: {s}"));
        ids.push(
            e["id"]
                .as_u64()
                .unwrap_or_else(|| panic!("no numeric id: {s}")),
        );
        let created = e["created"]
            .as_str()
            .unwrap_or_else(|| panic!("no created: {s}"));
        let b = created.as_bytes();
        assert!(
            b.len() >= 20
                && b[4] == b'-'
                && b[7] == b'-'
                && b[10] == b'T'
                && b[13] == b':'
                && b[16] == b':'
                && (created.ends_with('Z') || created[19..].contains(['+', '-'])),
            "created is not RFC 3339: {created}"
        );
        match name {
            "alpha" => assert_eq!(
                e["mountpoint"].as_str().map(Path::new),
                Some(m.path.as_path()),
                "{s}"
            ),
            "beta_2.x-y" => assert!(e["mountpoint"].is_null(), "{s}"),
            other => panic!("unexpected dataset {other}: {s}"),
        }
    }
    assert_ne!(ids[0], ids[1], "dataset ids must differ: {s}");

    // The mounted dataset is empty, a directory owned by root with mode 0755.
    let md = fs::metadata(&m.path).unwrap();
    assert!(md.is_dir());
    assert_eq!((md.uid(), md.gid()), (0, 0));
    assert_eq!(md.permissions().mode() & 0o7777, 0o755);
    assert_eq!(fs::read_dir(&m.path).unwrap().count(), 0);
}

// Names that cannot be a dataset name are refused and create nothing.
#[test]
fn bad_dataset_names_rejected() {
    let d = Daemon::start();
    let long = "x".repeat(300);
    for bad in [
        "",
        ".",
        "..",
        "a/b",
        "../up",
        "tab\tname",
        "new\nline",
        &long,
    ] {
        let out = d.vdbfs(&["dataset", "create", bad]);
        assert!(
            !out.status.success() && !out.stderr.is_empty(),
            "dataset create {bad:?} must fail with a message\n{}",
            describe(&out)
        );
    }
    let v: serde_json::Value = serde_json::from_str(&d.ok(&["dataset", "list", "--json"])).unwrap();
    assert_eq!(v, serde_json::json!([]), "a bad name created a dataset");
}

// Mounting a dataset where it already is mounted succeeds and says "already mounted"; mounting it
// at a second place is an error; deleting it while mounted is refused.
#[test]
fn mount_twice_same_place_ok_elsewhere_error() {
    let d = Daemon::start();
    let m = d.create_and_mount("db");
    let out = d.vdbfs(&["mount", "db", m.path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", describe(&out));
    let all = format!("{}{}", stdout(&out), stderr(&out));
    assert!(all.contains("already mounted"), "{}", describe(&out));
    let same_count = util::mountinfo()
        .iter()
        .filter(|e| e.mountpoint == m.path)
        .count();
    assert_eq!(same_count, 1, "the second mount stacked a new mount");

    let other = d.new_mountpoint("other");
    let out = d.vdbfs(&["mount", "db", other.to_str().unwrap()]);
    assert_error(&out, "mounting a mounted dataset elsewhere");
    assert!(!is_mounted(&other), "the dataset got mounted twice");

    let out = d.vdbfs(&["dataset", "delete", "db"]);
    assert_error(&out, "dataset delete while mounted");
    assert!(is_mounted(&m.path));
}

// `umount` is refused (EBUSY message) while a file is open under the mount, and works once it
// is closed.
#[test]
fn umount_refused_while_file_open() {
    let d = Daemon::start();
    let m = d.create_and_mount("db");
    let mut f = fs::File::create(m.join("open.txt")).unwrap();
    f.write_all(b"held open").unwrap();
    let out = m.try_umount();
    assert_error(&out, "umount with an open file");
    assert!(
        stderr(&out).to_lowercase().contains("busy"),
        "umount refusal must say the mount is busy\n{}",
        describe(&out)
    );
    assert!(is_mounted(&m.path), "umount with an open file unmounted");
    assert_eq!(fs::read(m.join("open.txt")).unwrap(), b"held open");
    drop(f);
    m.umount();
}

// Data outlives a mount: umount flushes, and mounting the dataset again shows the same tree.
#[test]
fn umount_then_mount_again_keeps_files() {
    let d = Daemon::start();
    let m = d.create_and_mount("db");
    let path = m.path.clone();
    fs::create_dir_all(m.join("dir/sub")).unwrap();
    let big: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    fs::write(m.join("dir/sub/big.bin"), &big).unwrap();
    fs::write(m.join("small.txt"), b"hello").unwrap();
    m.umount();
    assert!(!is_mounted(&path));

    let m = d.mount("db", &path);
    assert_eq!(fs::read(m.join("small.txt")).unwrap(), b"hello");
    assert_eq!(fs::read(m.join("dir/sub/big.bin")).unwrap(), big);
    // And at a different place too.
    m.umount();
    let m = d.mount("db", &d.new_mountpoint("elsewhere"));
    assert_eq!(fs::read(m.join("small.txt")).unwrap(), b"hello");
}

// Files are owned by the user who creates them, not by the daemon's user (postgres refuses a
// data directory it does not own).
#[test]
fn files_created_by_non_root_are_owned_by_that_user() {
    let (uid, gid) = util::postgres_ids()
        .expect("PREREQUISITE MISSING: no 'postgres' OS user (install postgresql-15)");
    let d = Daemon::start();
    let m = d.create_and_mount("db");
    let dir = m.join("pgowned");
    fs::create_dir(&dir).unwrap();
    util::chown_postgres(&dir);
    util::chmod(&dir, 0o700);
    let script = format!(
        "set -e; cd {0}; echo hi > f; mkdir d; echo x > d/g; ln -s f l",
        dir.display()
    );
    let out = util::run_timeout(
        Command::new("runuser").args(["-u", "postgres", "--", "sh", "-c", &script]),
        util::COMMAND_TIMEOUT,
    );
    assert!(out.status.success(), "{}", describe(&out));
    for p in ["f", "d", "d/g"] {
        let md = fs::metadata(dir.join(p)).unwrap();
        assert_eq!(
            (md.uid(), md.gid()),
            (uid, gid),
            "{p} created by postgres is owned by {}:{}",
            md.uid(),
            md.gid()
        );
    }
    let md = fs::symlink_metadata(dir.join("l")).unwrap();
    assert_eq!((md.uid(), md.gid()), (uid, gid), "symlink owner");
    // default_permissions: the kernel checks modes for other users.
    let out = util::run_timeout(
        Command::new("runuser")
            .args(["-u", "nobody", "--", "cat"])
            .arg(dir.join("f")),
        util::COMMAND_TIMEOUT,
    );
    assert!(
        !out.status.success(),
        "nobody could read a file inside a 0700 directory of postgres"
    );
    // Root-created files stay root's.
    fs::write(m.join("rootfile"), b"r").unwrap();
    let md = fs::metadata(m.join("rootfile")).unwrap();
    assert_eq!((md.uid(), md.gid()), (0, 0));
}

// The control socket is a unix socket only its owner can use (mode 0600).
#[test]
fn control_socket_is_mode_0600() {
    let d = Daemon::start();
    let sock = d.store().join("vdbfs.sock");
    let md = fs::metadata(&sock).unwrap_or_else(|e| panic!("{}: {e}", sock.display()));
    assert!(
        md.file_type().is_socket(),
        "{} is not a socket",
        sock.display()
    );
    assert_eq!(
        md.permissions().mode() & 0o7777,
        0o600,
        "control socket mode is {:o}",
        md.permissions().mode() & 0o7777
    );
}

// `--store` works anywhere on the line, and VDBFS_STORE is the default when it is absent.
#[test]
fn store_option_position_and_env() {
    let d = Daemon::start();
    let store = d.store().to_str().unwrap();
    let cases: Vec<Vec<&str>> = vec![
        vec!["--store", store, "status"],
        vec!["status", "--store", store],
        vec!["dataset", "--store", store, "list"],
        vec!["dataset", "list", "--store", store, "--json"],
        vec!["dataset", "list", "--json", "--store", store],
    ];
    for args in cases {
        let out = run(vdbfs().args(&args));
        assert!(
            out.status.success(),
            "vdbfs {}\n{}",
            args.join(" "),
            describe(&out)
        );
    }
    let out = run(vdbfs().env("VDBFS_STORE", store).args(["status", "--json"]));
    assert!(out.status.success(), "VDBFS_STORE\n{}", describe(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["pid"].as_u64(), d.pid().map(u64::from));

    // --store wins over the environment.
    let tmp = util::tempdir("vdbfs-cli-");
    let out = run(vdbfs()
        .env("VDBFS_STORE", tmp.path().join("nowhere"))
        .args(["--store", store, "status"]));
    assert!(
        out.status.success(),
        "--store over VDBFS_STORE\n{}",
        describe(&out)
    );

    // A usage error exits 2.
    let out = run(vdbfs().args(["--store", store, "no-such-command"]));
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
}

/// Sends one raw request line to the control socket; returns the reply (the last line).
fn raw_request(d: &Daemon, line: &str) -> serde_json::Value {
    use std::io::{BufRead, BufReader};
    let mut s = std::os::unix::net::UnixStream::connect(d.store().join("vdbfs.sock")).unwrap();
    s.set_read_timeout(Some(util::COMMAND_TIMEOUT)).unwrap();
    s.write_all(format!("{line}\n").as_bytes()).unwrap();
    let last = BufReader::new(s)
        .lines()
        .map_while(Result::ok)
        .last()
        .unwrap_or_default();
    serde_json::from_str(&last).unwrap_or_else(|e| panic!("reply {last:?}: {e}"))
}

// Every failed control reply says what kind of failure it is (not_found, conflict, invalid, ...),
// for the CLI's exit code now and HTTP status codes later; a success carries no kind. The CLI
// still exits 1 for each.
#[test]
fn failed_replies_carry_an_error_kind() {
    let d = Daemon::start();
    d.create_dataset("one");
    let cases = [
        (r#"{"op":"vdb_status","name":"nope"}"#, "not_found"),
        (r#"{"op":"dataset_create","name":"one"}"#, "conflict"),
        (r#"{"op":"dataset_create","name":"-bad"}"#, "invalid"),
        (r#"{"op":"no_such_op"}"#, "invalid"),
        (
            r#"{"op":"snapshot_delete","name":"one@never"}"#,
            "not_found",
        ),
    ];
    for (req, kind) in cases {
        let r = raw_request(&d, req);
        assert!(
            r["ok"] == false
                && r["kind"] == kind
                && r["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{req} should fail with kind {kind}: {r}"
        );
    }
    let r = raw_request(&d, r#"{"op":"dataset_list"}"#);
    assert!(r["ok"] == true && r.get("kind").is_none(), "{r}");
    let out = d.vdbfs(&["vdb", "status", "nope"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
}

// One daemon per store: a second `vdbfs serve` on a served store exits 1 at once, saying so,
// and the first keeps serving.
#[test]
fn a_second_daemon_on_a_store_is_refused() {
    let d = Daemon::start();
    let out = util::run_timeout(
        Command::new(util::bin())
            .args(["serve", "--store"])
            .arg(d.store())
            .env_remove("VDBFS_STORE"),
        util::COMMAND_TIMEOUT,
    );
    assert_error(&out, "a second daemon");
    assert!(
        stderr(&out).contains("another vdbfs daemon already serves the store"),
        "{}",
        describe(&out)
    );
    d.ok(&["status"]);
}

// A user who may not use the control socket is told "permission denied" and who may use it,
// not that no daemon answers (issue 14); with --json the same as a JSON error.
#[test]
fn a_user_without_access_to_the_socket_is_told_permission_denied() {
    let d = Daemon::start();
    let out = run(Command::new("runuser")
        .args(["-u", "nobody", "--"])
        .arg(util::bin())
        .arg("--store")
        .arg(d.store())
        .args(["status", "--json"])
        .env_remove("VDBFS_STORE"));
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let err = stderr(&out);
    assert!(
        err.contains("permission denied")
            && err.contains("owner root")
            && err.contains("run the command as root")
            && !err.contains("no vdbfs daemon answers"),
        "{}",
        describe(&out)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("permission denied")),
        "{v}"
    );
}

// `--store X status` where X is not a store (missing, a file, a directory without
// index.redb) says so and how to make one, instead of "no daemon answers" (issue 14).
#[test]
fn a_store_option_that_is_not_a_store_says_so() {
    let tmp = util::tempdir("vdbfs-cli-");
    let file = tmp.path().join("file");
    fs::write(&file, "x").unwrap();
    for (dir, says) in [
        (tmp.path().join("missing"), "does not exist"),
        (file.clone(), "is not a directory"),
        (
            tmp.path().to_path_buf(),
            "is not a vdbfs store (it has no index.redb)",
        ),
    ] {
        let out = run(vdbfs().arg("--store").arg(&dir).arg("status"));
        assert_error(&out, &format!("status on {}", dir.display()));
        let err = stderr(&out);
        assert!(
            err.contains(says) && err.contains(&format!("'vdbfs init --store {}'", dir.display())),
            "{}",
            describe(&out)
        );
        let out = run(vdbfs().arg("--store").arg(&dir).args(["status", "--json"]));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["error"]["kind"], "not_found", "{v}");
        assert!(
            v["error"]["hint"]
                .as_str()
                .is_some_and(|h| h.contains("vdbfs init")),
            "{v}"
        );
    }
}

// Completion scripts for bash, zsh and fish, and a man page per command, come from the same
// definitions as --help; every command's --help works (issue 14).
#[test]
fn completions_man_pages_and_help_for_every_command() {
    for (shell, marker) in [
        ("bash", "_vdbfs()"),
        ("zsh", "#compdef vdbfs"),
        ("fish", "complete -c vdbfs"),
    ] {
        let out = run(vdbfs().args(["completions", shell]));
        assert!(out.status.success(), "{}", describe(&out));
        let text = stdout(&out);
        assert!(
            text.contains(marker) && text.contains("refresh") && text.contains("keep-undo"),
            "{shell} completions:\n{}",
            &text[..text.len().min(400)]
        );
    }
    let tmp = util::tempdir("vdbfs-man-");
    let out = run(vdbfs().arg("manpages").arg(tmp.path()));
    assert!(out.status.success(), "{}", describe(&out));
    for page in [
        "vdbfs.1",
        "vdbfs-source-link.1",
        "vdbfs-vdb-refresh.1",
        "vdbfs-completions.1",
    ] {
        let p = tmp.path().join(page);
        let text = fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert!(
            text.starts_with(".ie") || text.contains(".TH"),
            "{page} is not a man page"
        );
    }
    let link = fs::read_to_string(tmp.path().join("vdbfs-source-link.1")).unwrap();
    assert!(
        link.contains("pg\\-bin"),
        "--pg-bin is documented in the man page"
    );
    let listed = stdout(&out);
    for cmd in [
        vec!["dataset", "create"],
        vec!["dataset", "list"],
        vec!["dataset", "delete"],
        vec!["snapshot", "create"],
        vec!["vdb", "rewind"],
        vec!["source", "link"],
    ] {
        let page = format!("vdbfs-{}.1", cmd.join("-"));
        assert!(
            listed.contains(&page),
            "manpages did not list {page}: {listed}"
        );
        let mut a = cmd.clone();
        a.push("--help");
        let out = run(vdbfs().args(&a));
        assert!(out.status.success(), "{}", describe(&out));
        let help = stdout(&out);
        assert!(
            help.contains("--json") && help.contains("Print the result as JSON"),
            "{help}"
        );
    }
    let help = stdout(&run(vdbfs().args(["vdb", "refresh", "--help"])));
    assert!(help.contains("newer or older"), "{help}");
}

// VDBFS_LOG (else RUST_LOG) sets the daemon's log level: debug shows each request, the default
// does not; `serve --log-format json` writes one JSON object per line; every operation that
// changes something is logged at info with its duration (issue 14).
#[test]
fn log_level_from_the_environment_and_json_log_lines() {
    let mut d = Daemon::start();
    d.restart_with(&[], &[("VDBFS_LOG", "info"), ("RUST_LOG", "debug")]);
    d.create_dataset("quiet");
    d.ok(&["dataset", "list"]);
    let log = d.log_since_start();
    assert!(
        log.contains("request done")
            && log.contains("op=\"dataset_create\"")
            && log.contains("ms="),
        "{log}"
    );
    assert!(
        !log.contains("DEBUG"),
        "VDBFS_LOG=info wins over RUST_LOG: {log}"
    );

    d.restart_with(&[], &[("RUST_LOG", "vdbfs=debug")]);
    d.ok(&["dataset", "list"]);
    let log = d.log_since_start();
    assert!(
        log.lines()
            .any(|l| l.contains("DEBUG") && l.contains("op=\"dataset_list\"")),
        "RUST_LOG=vdbfs=debug shows read requests: {log}"
    );

    d.restart_with(&["--log-format", "json"], &[("VDBFS_LOG", "debug")]);
    d.ok(&["snapshot", "create", "quiet", "--name", "s"]);
    d.ok(&["snapshot", "delete", "quiet@s"]);
    let log = d.log_since_start();
    let mut ops = Vec::new();
    for l in log.lines().skip(1).filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {l}"));
        assert!(v["timestamp"].is_string() && v["level"].is_string(), "{v}");
        if v["message"] == "request done" {
            assert!(v["ms"].is_number(), "{v}");
            ops.push(v["op"].as_str().unwrap_or_default().to_string());
        }
    }
    assert!(
        ops.contains(&"snapshot_create".to_string())
            && ops.contains(&"snapshot_delete".to_string()),
        "{ops:?}\n{log}"
    );
}
