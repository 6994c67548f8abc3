//! `--json` on every command (issue 14): each subcommand, run in a table against a daemon with
//! a linked source and a VDB, prints one JSON document on stdout when it succeeds (the object
//! it listed, made or changed), and when it fails prints `{"error": {"kind", "message",
//! "hint"}}` on stdout with the same exit status as without `--json` (and the usual
//! `vdbfs: error:` line on stderr). The table must name every subcommand clap knows, so a new
//! command without a row fails here. Text listings show what the JSON has.

use clap::CommandFactory;
use serde_json::Value;
use std::collections::BTreeSet;
use std::process::{Command, Output};

use crate::util::source::{snapshot_list, REPL_PW};
use crate::util::vdb::{self as v, setup};
use crate::util::{self, describe, Daemon};

/// Every leaf command of the CLI, as words: "status", "vdb refresh", ...
fn leaves() -> BTreeSet<String> {
    fn walk(c: &clap::Command, path: &str, out: &mut BTreeSet<String>) {
        let subs: Vec<_> = c
            .get_subcommands()
            .filter(|s| s.get_name() != "help")
            .collect();
        if subs.is_empty() {
            out.insert(path.trim().to_string());
        }
        for s in subs {
            walk(s, &format!("{path} {}", s.get_name()), out);
        }
    }
    let mut out = BTreeSet::new();
    walk(&vdbfs::cli::Cli::command(), "", &mut out);
    out
}

const KINDS: [&str; 9] = [
    "unauthenticated",
    "forbidden",
    "not_found",
    "conflict",
    "invalid",
    "busy",
    "unavailable",
    "internal",
    "cancelled",
];

/// One row: a command line that succeeds, and one that fails with `kind` (both get `--json`).
struct Row {
    ok: Option<Vec<String>>,
    err: Option<(Vec<String>, &'static str)>,
    /// What the successful JSON must show.
    check: fn(&Value) -> bool,
}

fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

fn any(_: &Value) -> bool {
    true
}

/// Runs `vdbfs --store STORE ARGS --json` (`ARGS` may start with `--store OTHER`).
fn run_json(d: &Daemon, a: &[String]) -> Output {
    let mut c = match a.first().map(String::as_str) {
        Some("--store") => {
            let mut c = Command::new(util::bin());
            util::clean_cli_env(&mut c);
            c
        }
        _ => d.command(),
    };
    c.args(a).arg("--json");
    util::run_timeout(&mut c, util::COMMAND_TIMEOUT)
}

#[track_caller]
fn assert_json_error(out: &Output, kind: &str, what: &str) -> Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "{what}: stdout is not one JSON document ({e})\n{}",
            describe(out)
        )
    });
    let err = &v["error"];
    assert!(
        KINDS.contains(&err["kind"].as_str().unwrap_or(""))
            && err["message"].as_str().is_some_and(|m| !m.is_empty())
            && (err["hint"].is_null() || err["hint"].is_string()),
        "{what}: not an error object: {v}"
    );
    assert_eq!(err["kind"], kind, "{what}: {v}");
    let want_code = match kind {
        "cancelled" => 130,
        _ => 1,
    };
    assert_eq!(
        out.status.code(),
        Some(want_code),
        "{what}\n{}",
        describe(out)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("vdbfs: error: "),
        "{what}: the text error line is still on stderr\n{}",
        describe(out)
    );
    v
}

// Every subcommand with --json: success prints JSON (checked against what it made), failure
// prints a JSON error with its kind and the same exit status; the daemon logs every operation
// that changes something with its duration.
#[test]
fn every_command_prints_json_and_its_errors_as_json() {
    let s = setup(3);
    let d = &s.d;
    let tmp = util::tempdir("vdbfs-json-");
    let fresh = tmp.path().join("fresh-store");
    let man = tmp.path().join("man");
    let mp = d.new_mountpoint("plain2");
    let not_mounted = d.new_mountpoint("never");
    let conn = s.src.conn("replicator");
    let pass = s.src.passfile("replicator", REPL_PW);
    let (first, snap) = (s.first.clone(), s.snap.clone());
    let mps = mp.to_str().unwrap().to_string();

    // Rows run in this order: later ones use what earlier ones made.
    let rows: Vec<(&str, Row)> = vec![
        (
            "init",
            Row {
                ok: Some(vec![
                    "--store".into(),
                    fresh.display().to_string(),
                    "init".into(),
                ]),
                err: Some((args(&["init"]), "conflict")),
                check: |v| v["store"].is_string(),
            },
        ),
        (
            "serve",
            Row {
                ok: None,
                err: Some((args(&["serve"]), "invalid")),
                check: any,
            },
        ),
        (
            "status",
            Row {
                ok: Some(args(&["status"])),
                err: None,
                check: |v| v["pid"].is_u64(),
            },
        ),
        (
            "dataset create",
            Row {
                ok: Some(args(&["dataset", "create", "plain"])),
                err: Some((args(&["dataset", "create", "plain"]), "conflict")),
                check: |v| v["name"] == "plain" && v["id"].is_u64() && v["origin"].is_null(),
            },
        ),
        (
            "dataset list",
            Row {
                ok: Some(args(&["dataset", "list"])),
                err: None,
                check: |v| v.as_array().is_some_and(|a| a.len() >= 2),
            },
        ),
        (
            "snapshot create",
            Row {
                ok: Some(args(&["snapshot", "create", "plain", "--name", "s1"])),
                err: Some((args(&["snapshot", "create", "nope"]), "not_found")),
                check: |v| v["name"] == "plain@s1",
            },
        ),
        (
            // This store has no remote: publish and the remote commands are refused as invalid
            // (tests/remote.rs runs them against a bucket).
            "snapshot publish",
            Row {
                ok: None,
                err: Some((args(&["snapshot", "publish", "plain@s1"]), "invalid")),
                check: any,
            },
        ),
        (
            "remote status",
            Row {
                ok: None,
                err: Some((args(&["remote", "status"]), "invalid")),
                check: any,
            },
        ),
        (
            "remote list",
            Row {
                ok: None,
                err: Some((args(&["remote", "list"]), "invalid")),
                check: any,
            },
        ),
        (
            "remote gc",
            Row {
                ok: None,
                err: Some((args(&["remote", "gc", "--dry-run"]), "invalid")),
                check: any,
            },
        ),
        (
            "snapshot list",
            Row {
                ok: Some(args(&["snapshot", "list", "prod"])),
                err: Some((args(&["snapshot", "list", "nope"]), "not_found")),
                check: |v| {
                    v.as_array()
                        .is_some_and(|a| a.iter().all(|e| e["lsn"].is_string()))
                },
            },
        ),
        (
            "clone",
            Row {
                ok: Some(args(&["clone", "plain@s1", "plain2"])),
                err: Some((args(&["clone", "plain@nope", "x"]), "not_found")),
                check: |v| v["name"] == "plain2" && v["origin"] == "plain@s1",
            },
        ),
        (
            "mount",
            Row {
                ok: Some(vec!["mount".into(), "plain2".into(), mps.clone()]),
                err: Some((
                    vec![
                        "mount".into(),
                        "nope".into(),
                        not_mounted.display().to_string(),
                    ],
                    "not_found",
                )),
                check: |v| v["dataset"] == "plain2" && v["mountpoint"].is_string(),
            },
        ),
        (
            "umount",
            Row {
                ok: Some(vec!["umount".into(), mps.clone()]),
                err: Some((
                    vec!["umount".into(), not_mounted.display().to_string()],
                    "not_found",
                )),
                check: |v| v["dataset"] == "plain2",
            },
        ),
        (
            "df",
            Row {
                ok: Some(args(&["df"])),
                err: None,
                check: |v| v["datasets"].is_array(),
            },
        ),
        (
            "gc",
            Row {
                ok: Some(args(&["gc"])),
                err: None,
                check: |v| v["blocks_freed"].is_u64() && v["bytes_reclaimed"].is_i64(),
            },
        ),
        (
            "scrub",
            Row {
                ok: Some(args(&["scrub", "--rate", "0"])),
                err: None,
                check: |v| v["bad_blocks"] == serde_json::json!([]) && v["blocks_checked"].is_u64(),
            },
        ),
        (
            "dataset accept-damage",
            Row {
                ok: None,
                err: Some((args(&["dataset", "accept-damage", "nope"]), "not_found")),
                check: any,
            },
        ),
        (
            "snapshot delete",
            Row {
                ok: Some(args(&["snapshot", "delete", "plain@s1"])),
                err: Some((args(&["snapshot", "delete", "plain@s1"]), "not_found")),
                check: |v| v["name"] == "plain@s1" && v["vdbs_from_it"] == serde_json::json!([]),
            },
        ),
        (
            "dataset delete",
            Row {
                ok: Some(args(&["dataset", "delete", "plain2"])),
                err: Some((args(&["dataset", "delete", "nope"]), "not_found")),
                check: |v| v["name"] == "plain2" && v["snapshots"].is_array(),
            },
        ),
        (
            "env discover",
            Row {
                ok: Some(args(&["env", "discover"])),
                err: None,
                check: |v| v["installations"].is_array(),
            },
        ),
        (
            "source list",
            Row {
                ok: Some(args(&["source", "list"])),
                err: None,
                check: |v| v.as_array().is_some_and(|a| a.len() == 1),
            },
        ),
        (
            "source status",
            Row {
                ok: Some(args(&["source", "status", "prod"])),
                err: Some((args(&["source", "status", "nope"]), "not_found")),
                check: |v| v["name"] == "prod" && v["state"].is_string(),
            },
        ),
        (
            "source snapshot",
            Row {
                ok: Some(args(&["source", "snapshot", "prod", "--name", "named1"])),
                err: Some((
                    args(&["source", "snapshot", "prod", "--name", "named1"]),
                    "conflict",
                )),
                check: |v| v["name"] == "prod@named1" && v["lsn"].is_string(),
            },
        ),
        (
            "source disable",
            Row {
                ok: Some(args(&["source", "disable", "prod"])),
                err: Some((args(&["source", "disable", "nope"]), "not_found")),
                check: |v| v["name"] == "prod" && v["state"] == "disabled",
            },
        ),
        (
            "source enable",
            Row {
                ok: Some(args(&["source", "enable", "prod"])),
                err: Some((args(&["source", "enable", "nope"]), "not_found")),
                check: |v| v["name"] == "prod" && v["state"] != "disabled",
            },
        ),
        (
            "source set",
            Row {
                ok: Some(args(&["source", "set", "prod", "--verify", "off"])),
                err: Some((
                    args(&["source", "set", "nope", "--verify", "on"]),
                    "not_found",
                )),
                check: |v| v["name"] == "prod" && v["verify"] == false,
            },
        ),
        (
            "source link",
            Row {
                ok: Some(vec![
                    "source".into(),
                    "link".into(),
                    "prod2".into(),
                    "--conn".into(),
                    conn.clone(),
                    "--passfile".into(),
                    pass.display().to_string(),
                    "--staging-port".into(),
                    util::free_port().to_string(),
                ]),
                err: Some((
                    vec![
                        "source".into(),
                        "link".into(),
                        "prod".into(),
                        "--conn".into(),
                        conn.clone(),
                    ],
                    "conflict",
                )),
                check: |v| v["name"] == "prod2" && v["last_snapshot"]["name"].is_string(),
            },
        ),
        (
            "vdb create",
            Row {
                ok: Some(vec![
                    "vdb".into(),
                    "create".into(),
                    "dev1".into(),
                    "--from".into(),
                    snap.clone(),
                    "--ttl".into(),
                    "7d".into(),
                ]),
                err: Some((
                    vec![
                        "vdb".into(),
                        "create".into(),
                        "dev1".into(),
                        "--from".into(),
                        snap.clone(),
                    ],
                    "conflict",
                )),
                check: |v| v["name"] == "dev1" && v["state"] == "running",
            },
        ),
        (
            "vdb list",
            Row {
                ok: Some(args(&["vdb", "list"])),
                err: None,
                check: |v| v.as_array().is_some_and(|a| a.len() == 1),
            },
        ),
        (
            "vdb status",
            Row {
                ok: Some(args(&["vdb", "status", "dev1"])),
                err: Some((args(&["vdb", "status", "nope"]), "not_found")),
                check: |v| v["undo_keep"] == 3 && v["undo_snapshots"] == serde_json::json!([]),
            },
        ),
        (
            "vdb stop",
            Row {
                ok: Some(args(&["vdb", "stop", "dev1"])),
                err: Some((args(&["vdb", "stop", "nope"]), "not_found")),
                check: |v| v["name"] == "dev1" && v["state"] == "stopped",
            },
        ),
        (
            "vdb start",
            Row {
                ok: Some(args(&["vdb", "start", "dev1"])),
                err: Some((args(&["vdb", "start", "nope"]), "not_found")),
                check: |v| v["name"] == "dev1" && v["state"] == "running",
            },
        ),
        (
            "vdb snapshot",
            Row {
                ok: Some(args(&["vdb", "snapshot", "dev1", "--name", "vs1"])),
                err: Some((
                    args(&["vdb", "snapshot", "dev1", "--name", "vs1"]),
                    "conflict",
                )),
                check: |v| v["name"] == "dev1@vs1" && v["kind"] == "snapshot",
            },
        ),
        (
            "vdb bookmark",
            Row {
                ok: Some(args(&["vdb", "bookmark", "dev1", "b1"])),
                err: Some((args(&["vdb", "bookmark", "dev1", "b1"]), "conflict")),
                check: |v| v["name"] == "dev1@b1" && v["kind"] == "bookmark",
            },
        ),
        (
            "vdb rewind",
            Row {
                ok: Some(args(&["vdb", "rewind", "dev1", "--to", "vs1"])),
                err: Some((
                    args(&["vdb", "rewind", "dev1", "--to", "nope"]),
                    "not_found",
                )),
                check: |v| {
                    v["name"] == "dev1"
                        && v["state"] == "running"
                        && v["undo_snapshots"].as_array().is_some_and(|a| a.len() == 1)
                },
            },
        ),
        (
            "vdb refresh",
            Row {
                // The link's first snapshot is older than the VDB's parent: allowed.
                ok: Some(vec![
                    "vdb".into(),
                    "refresh".into(),
                    "dev1".into(),
                    "--to".into(),
                    first.clone(),
                ]),
                err: Some((
                    args(&["vdb", "refresh", "dev1", "--to", "prod@nope"]),
                    "not_found",
                )),
                check: |v| v["name"] == "dev1" && v["state"] == "running",
            },
        ),
        (
            "timeflow",
            Row {
                ok: Some(args(&["timeflow", "prod"])),
                err: Some((args(&["timeflow", "nope"]), "not_found")),
                check: |v| v.as_array().is_some_and(|a| a.len() == 1),
            },
        ),
        (
            "vdb extend",
            Row {
                ok: Some(args(&["vdb", "extend", "dev1", "8d"])),
                err: Some((args(&["vdb", "extend", "dev1", "8x"]), "invalid")),
                check: |v| v["name"] == "dev1" && v["expires"].is_string(),
            },
        ),
        (
            "vdb protect",
            Row {
                ok: Some(args(&["vdb", "protect", "dev1"])),
                err: Some((args(&["vdb", "protect", "nope"]), "not_found")),
                check: |v| v["protected"] == true && v["expires"].is_null(),
            },
        ),
        (
            "token create",
            Row {
                ok: Some(args(&["token", "create", "ci", "--role", "developer"])),
                err: Some((
                    args(&["token", "create", "ci", "--role", "admin"]),
                    "conflict",
                )),
                check: |v| {
                    v["name"] == "ci"
                        && v["role"] == "developer"
                        && v["token"].as_str().is_some_and(|t| t.starts_with("vdbfs_"))
                },
            },
        ),
        (
            "token list",
            Row {
                ok: Some(args(&["token", "list"])),
                err: None,
                check: |v| {
                    v.as_array().is_some_and(|a| a.len() == 1)
                        && v[0]["name"] == "ci"
                        && v[0].get("token").is_none()
                        && v[0].get("hash").is_none()
                },
            },
        ),
        (
            "token revoke",
            Row {
                ok: Some(args(&["token", "revoke", "ci"])),
                err: Some((args(&["token", "revoke", "ci"]), "not_found")),
                check: |v| v["name"] == "ci",
            },
        ),
        (
            "vdb delete",
            Row {
                ok: Some(args(&["vdb", "delete", "dev1"])),
                err: Some((args(&["vdb", "delete", "dev1"]), "not_found")),
                check: |v| v["name"] == "dev1" && v["children"] == serde_json::json!([]),
            },
        ),
        (
            "source unlink",
            Row {
                ok: Some(args(&["source", "unlink", "prod2", "--delete-snapshots"])),
                err: Some((args(&["source", "unlink", "nope"]), "not_found")),
                check: |v| {
                    v["name"] == "prod2"
                        && v["dataset_kept"] == false
                        && v["slot_left"].is_null()
                        && v["snapshots"].as_array().is_some_and(|a| !a.is_empty())
                },
            },
        ),
        (
            "completions",
            Row {
                ok: None,
                err: Some((args(&["completions", "bash"]), "invalid")),
                check: any,
            },
        ),
        (
            "manpages",
            Row {
                ok: Some(vec!["manpages".into(), man.display().to_string()]),
                err: None,
                check: |v| v.as_array().is_some_and(|a| a.len() > 30),
            },
        ),
    ];

    let named: BTreeSet<String> = rows.iter().map(|(n, _)| n.to_string()).collect();
    assert_eq!(
        named,
        leaves(),
        "the table must have a row for every subcommand (left: table, right: clap)"
    );

    for (name, row) in &rows {
        if let Some(a) = &row.ok {
            let out = run_json(d, a);
            assert!(
                out.status.success(),
                "`vdbfs {} --json` failed\n{}\ndaemon log tail:\n{}",
                a.join(" "),
                describe(&out),
                d.log_tail(30)
            );
            let stdout = String::from_utf8_lossy(&out.stdout);
            let v: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
                panic!(
                    "{name}: stdout is not one JSON document ({e})\n{}",
                    describe(&out)
                )
            });
            assert!((row.check)(&v), "{name} --json printed {v}");
        }
        if let Some((a, kind)) = &row.err {
            let out = run_json(d, a);
            assert_json_error(&out, kind, &format!("vdbfs {} --json", a.join(" ")));
        }
    }

    // A usage error with --json is JSON too, exit 2.
    let out = run_json(d, &args(&["vdb", "create"]));
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("usage error not JSON ({e})\n{}", describe(&out)));
    assert_eq!(v["error"]["kind"], "invalid", "{v}");

    // Every operation that changed something is in the daemon log with its duration.
    let log = d.log();
    for op in [
        "vdb_refresh",
        "vdb_rewind",
        "vdb_delete",
        "source_unlink",
        "gc",
    ] {
        assert!(
            log.lines().any(|l| l.contains("request done")
                && l.contains(&format!("op=\"{op}\""))
                && l.contains("ms=")),
            "the daemon did not log `{op}` with its duration:\n{}",
            d.log_tail(60)
        );
    }
}

// `snapshot list` in text shows what its JSON has: the LSN, timeline and replay time of a
// source's validated-sync snapshots, the kind of a VDB's.
#[test]
fn text_listings_show_what_json_has() {
    let s = setup(2);
    let d = &s.d;
    let text = d.ok(&["snapshot", "list", "prod"]);
    let header = text.lines().next().unwrap_or("");
    for col in ["NAME", "CREATED", "KIND", "LSN", "TL", "REPLAY TIME"] {
        assert!(header.contains(col), "no {col} column: {text}");
    }
    for e in snapshot_list(d, "prod") {
        let line = text
            .lines()
            .find(|l| l.split_whitespace().next() == e["name"].as_str())
            .unwrap_or_else(|| panic!("{} is not listed: {text}", e["name"]));
        for k in ["lsn", "replay_time", "created"] {
            // A snapshot taken before any transaction was replayed has no replay time: "-".
            let want = e[k].as_str().unwrap_or("-");
            assert!(line.contains(want), "{k} {want} missing from {line:?}");
        }
        assert!(
            line.split_whitespace()
                .any(|w| e["timeline"] == w.parse::<u64>().unwrap_or(0)),
            "timeline missing from {line:?}"
        );
        assert!(line.contains("sync/backup-stream"), "{line:?}");
    }
    let dev = v::create(d, "dev1", &s.snap, &[]);
    v::vdb(d, &["bookmark", "dev1", "b1"]);
    let text = d.ok(&["snapshot", "list", "dev1"]);
    assert!(
        text.lines()
            .any(|l| l.starts_with("dev1@b1") && l.contains("bookmark")),
        "{text}"
    );
    // `vdb status` in text names what its JSON adds: the undo snapshots and their space.
    let text = v::vdb(d, &["status", &dev.name]);
    assert!(
        text.contains("undo:") && text.contains("keeps the last 3"),
        "{text}"
    );
    // Refresh onto an older snapshot of the parent is allowed, and says so.
    let text = v::vdb(d, &["refresh", "dev1", "--to", &s.first]);
    assert!(
        text.contains(&format!(
            "(an older snapshot than its previous parent {})",
            s.snap
        )),
        "{text}"
    );
    assert_eq!(v::status(d, "dev1")["parent"], s.first.as_str());
}
