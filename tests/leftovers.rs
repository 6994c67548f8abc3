//! What destructive commands leave behind or break, and the undo snapshots that expire
//! (issue 14). The bugs: `source unlink --force` left a replication slot on the source without
//! a word; deleting a snapshot or a source's snapshots did not say which VDBs could no longer
//! refresh from it; every refresh and rewind left an undo snapshot forever. The fixes: the
//! messages (and `--json`) name the slot with the SQL that drops it and the VDBs concerned;
//! each VDB keeps its last 3 undo snapshots (`serve --keep-undo N`), and `vdb status` shows
//! their space.

use serde_json::Value;

use crate::util::describe;
use crate::util::source::{json, link_small, snapshot_list};
use crate::util::vdb::{self as v, setup};

fn undo_names(st: &Value) -> Vec<String> {
    v::strings(&st["undo_snapshots"])
}

// Undo snapshots expire after each rewind or refresh beyond the last 3 (oldest first), and
// `vdb status` says how many there are and what only they hold; `serve --keep-undo 1` keeps one.
#[test]
fn undo_snapshots_expire_and_status_shows_their_space() {
    let mut s = setup(3);
    let dev = v::create(&s.d, "dev1", &s.snap, &[]);
    v::vdb(&s.d, &["snapshot", "dev1", "--name", "base"]);
    let mut seen = Vec::new();
    for i in 0..5 {
        // Something only this state holds, so its undo snapshot has unique bytes.
        dev.sql(&format!(
            "CREATE TABLE t{i} AS SELECT g, md5(g::text) FROM generate_series(1, 20000) g"
        ));
        v::vdb(&s.d, &["rewind", "dev1", "--to", "base"]);
        let st = v::status(&s.d, "dev1");
        let undo = undo_names(&st);
        seen.extend(
            undo.iter()
                .filter(|u| !seen.contains(*u))
                .cloned()
                .collect::<Vec<_>>(),
        );
        assert!(undo.len() <= 3, "more than 3 undo snapshots kept: {undo:?}");
        assert_eq!(undo.len(), (i + 1).min(3), "{st}");
        assert_eq!(st["undo_keep"], 3, "{st}");
        assert!(
            st["undo_bytes"].as_u64().is_some_and(|b| b > 0),
            "the undo snapshots hold data only they have: {st}"
        );
        // The newest are kept.
        assert_eq!(undo, seen[seen.len() - undo.len()..], "{st}");
    }
    let text = v::vdb(&s.d, &["status", "dev1"]);
    assert!(
        text.contains("undo:     3 undo snapshot(s)") && text.contains("keeps the last 3"),
        "{text}"
    );
    assert!(
        s.d.log().contains("undo snapshot expired"),
        "the expiry is not logged"
    );
    // Every expired one is gone from the dataset, the others and the user's are there.
    let names: Vec<String> = snapshot_list(&s.d, "dev1")
        .iter()
        .map(|e| e["name"].as_str().unwrap_or_default().to_string())
        .collect();
    assert!(names.contains(&"dev1@base".to_string()), "{names:?}");
    assert_eq!(
        names.iter().filter(|n| n.contains("@auto-before-")).count(),
        3,
        "{names:?}"
    );

    s.d.restart_with(&["--keep-undo", "1"], &[]);
    v::wait_vdb(&s.d, "dev1", "running after the restart", v::running);
    v::vdb(&s.d, &["rewind", "dev1", "--to", "base"]);
    let st = v::status(&s.d, "dev1");
    assert_eq!(undo_names(&st).len(), 1, "{st}");
    assert_eq!(st["undo_keep"], 1, "{st}");
}

// `snapshot delete` of a VDB's parent snapshot names the VDB (it keeps running but cannot
// refresh from it); `source unlink --delete-snapshots` names the VDBs that can no longer
// refresh; `source unlink --force` on an unreachable source prints the slot it left and the
// SQL that drops it, which works there.
#[test]
fn destructive_commands_say_what_they_leave_and_break() {
    let mut s = setup(3);
    let d = &s.d;
    v::create(d, "dev1", &s.snap, &[]);
    let out = d.ok(&["snapshot", "delete", &s.snap]);
    assert!(
        out.contains("dev1") && out.contains("can no longer refresh"),
        "snapshot delete must name the VDB made from it: {out}"
    );
    let st = v::wait_vdb(d, "dev1", "still running", v::running);
    assert_eq!(st["parent"], s.snap.as_str());

    // A second source, unlinked with its snapshots while a VDB hangs off them.
    link_small(d, &s.src, "prod2");
    let snap2 = crate::util::source::source_snapshot(d, "prod2");
    v::create(d, "dev2", &snap2, &[]);
    let out = d.vdbfs(&["source", "unlink", "prod2", "--delete-snapshots", "--json"]);
    assert!(out.status.success(), "{}", describe(&out));
    let u = json(&String::from_utf8_lossy(&out.stdout), "unlink --json");
    assert_eq!(u["vdbs"], serde_json::json!(["dev2"]), "{u}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("dev2"),
        "unlink --json: {u}"
    );

    // --force with the source down: the slot stays there, and the output says how to drop it.
    s.src.stop();
    let out = d.vdbfs(&["source", "unlink", "prod", "--force"]);
    assert!(out.status.success(), "{}", describe(&out));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let sql = "SELECT pg_drop_replication_slot('vdbfs_prod');";
    assert!(
        text.contains("vdbfs_prod") && text.contains(sql) && text.contains("dev1"),
        "unlink --force must print the slot it left and the SQL that drops it: {text}"
    );
    s.src.start();
    assert_eq!(s.src.slots(), vec!["vdbfs_prod".to_string()]);
    s.src.psql(sql);
    assert!(
        s.src.slots().is_empty(),
        "the printed SQL did not drop the slot"
    );
}

// A validated snapshot named with `source snapshot --name` is never deleted by retention
// (`--keep 1` keeps one unnamed snapshot besides it).
#[test]
fn a_named_source_snapshot_outlives_retention() {
    let src = crate::util::source::SourceDb::start(false, &[]);
    let d = crate::util::source::Staged::start();
    crate::util::source::link_small_with(&d, &src, "prod", &["--keep", "1"]);
    let out = d.ok(&["source", "snapshot", "prod", "--name", "before-upgrade"]);
    assert_eq!(out.trim(), "prod@before-upgrade");
    for _ in 0..2 {
        crate::util::source::source_snapshot(&d, "prod");
    }
    let names: Vec<String> = snapshot_list(&d, "prod")
        .iter()
        .map(|e| e["name"].as_str().unwrap_or_default().to_string())
        .collect();
    assert!(
        names.contains(&"prod@before-upgrade".to_string()),
        "{names:?}"
    );
    assert_eq!(
        names.len(),
        2,
        "retention keeps 1 unnamed besides the named one: {names:?}"
    );
    let out = d.vdbfs(&["source", "snapshot", "prod", "--name", "before-upgrade"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
}
