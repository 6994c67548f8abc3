//! The HTTP API for a team (issue 15), over real HTTP on loopback: `vdbfs serve --http`, API
//! tokens (`vdbfs token create/list/revoke`), what each role may do, the CLI talking HTTP
//! (`VDBFS_URL`, `VDBFS_TOKEN`), `/metrics` and the web page's assets.
//!
//! Pinned here: no, a wrong, a revoked or an expired token is 401 (with `WWW-Authenticate`);
//! error kinds come back with their HTTP status (404, 409, 400); a developer gets 403 for
//! anything but listing and their own VDBs; a token is printed once and never stored or listed;
//! every request is logged with the token's name; the CLI with `VDBFS_URL` works with no store
//! and no socket, and its exit status and `--json` error follow the daemon's kind; a `/metrics`
//! scrape parses as Prometheus text and counts the operations; two developers create VDBs at the
//! same time and each manages only their own; production's logins fail on a VDB and its owner's
//! works; TTLs and idle TTLs delete VDBs unless protected, extended or in use; the web page works
//! in headless Chromium; `serve --socket-group` members are developers on the socket.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};

use crate::util::http::Http;
use crate::util::source::{source_snapshot, wait_replayed, wait_syncing};
use crate::util::vdb::*;
use crate::util::*;

/// Every sample line of a Prometheus text scrape as (name, labels, value); panics on a line
/// that is not a comment, blank, or `name{labels} value`.
fn parse_metrics(text: &str) -> Vec<(String, String, f64)> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with("# HELP ") || line.starts_with("# TYPE ") {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("metrics line without a value: {line:?}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("metrics value is not a number: {line:?}"));
        let (name, labels) = match series.split_once('{') {
            Some((n, rest)) => {
                let labels = rest
                    .strip_suffix('}')
                    .unwrap_or_else(|| panic!("unclosed labels: {line:?}"));
                for pair in labels.split("\",").filter(|p| !p.is_empty()) {
                    let (k, v) = pair
                        .split_once("=\"")
                        .unwrap_or_else(|| panic!("bad label {pair:?} in {line:?}"));
                    assert!(
                        k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') && !v.is_empty(),
                        "bad label {pair:?} in {line:?}"
                    );
                }
                (n, labels.to_string())
            }
            None => (series, String::new()),
        };
        assert!(
            name.starts_with("vdbfs_")
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "bad metric name in {line:?}"
        );
        out.push((name.to_string(), labels, value));
    }
    out
}

fn sample(m: &[(String, String, f64)], name: &str, labels: &str) -> Option<f64> {
    m.iter()
        .find(|(n, l, _)| n == name && l == labels)
        .map(|s| s.2)
}

#[test]
fn tokens_roles_and_status_codes_over_http() {
    let (d, http) = Daemon::start_http();
    // Nothing without a token.
    let none = http.get(None, "/api/v1/status");
    assert_eq!(none.status, 401, "{none:?}");
    assert_eq!(none.json()["kind"], "unauthenticated");
    assert!(
        none.www_authenticate
            .as_deref()
            .is_some_and(|h| h.starts_with("Bearer")),
        "a 401 says how to authenticate: {none:?}"
    );
    let admin = d.token("ops", "admin", None);
    let dev = d.token("alice", "developer", None);
    assert_eq!(http.get(Some("vdbfs_0000"), "/api/v1/status").status, 401);
    assert_eq!(
        http.get(Some(&format!("{admin}x")), "/api/v1/status")
            .status,
        401
    );

    // The token is shown once: not in the list, not in the store's records.
    let list = d.ok(&["token", "list", "--json"]);
    assert!(!list.contains(&admin) && !list.contains(&dev), "{list}");
    let list: Value = serde_json::from_str(&list).unwrap();
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["alice", "ops"]);
    assert_eq!(list[0]["role"], "developer");
    let index = std::fs::read(d.store().join("index.redb")).unwrap();
    assert!(
        !index.windows(admin.len()).any(|w| w == admin.as_bytes()),
        "the token itself must not be stored"
    );

    // An admin: every kind with its status.
    let ok = http.get(Some(&admin), "/api/v1/status");
    assert_eq!(ok.status, 200, "{ok:?}");
    assert_eq!(ok.json()["data"]["pid"], d.pid().unwrap());
    let made = http.post(Some(&admin), "dataset_create", json!({"name": "d1"}));
    assert_eq!(made.status, 200, "{made:?}");
    assert_eq!(made.json()["data"]["name"], "d1");
    let again = http.post(Some(&admin), "dataset_create", json!({"name": "d1"}));
    assert_eq!(
        (again.status, again.json()["kind"].clone()),
        (409, json!("conflict"))
    );
    let missing = http.post(Some(&admin), "vdb_stop", json!({"name": "nope"}));
    assert_eq!(
        (missing.status, missing.json()["kind"].clone()),
        (404, json!("not_found"))
    );
    let bad = http.post(Some(&admin), "dataset_create", json!({"name": "a/b"}));
    assert_eq!(
        (bad.status, bad.json()["kind"].clone()),
        (400, json!("invalid"))
    );
    assert_eq!(
        http.post_raw(Some(&admin), "dataset_create", "{").status,
        400
    );
    assert_eq!(http.post(Some(&admin), "no_such_op", json!({})).status, 400);
    assert_eq!(
        http.get(Some(&admin), "/api/v1/gc").status,
        400,
        "a request that changes something is not a GET"
    );
    let listed = http.get(Some(&admin), "/api/v1/snapshot_list?dataset=d1");
    assert_eq!(listed.status, 200, "{listed:?}");

    // A developer: lists, but nothing of the store or of the tokens.
    assert_eq!(http.get(Some(&dev), "/api/v1/source_list").status, 200);
    assert_eq!(http.get(Some(&dev), "/api/v1/vdb_list").status, 200);
    for (op, body) in [
        ("dataset_create", json!({"name": "d2"})),
        ("gc", json!({})),
        ("token_list", json!({})),
        ("token_create", json!({"name": "x", "role": "admin"})),
    ] {
        let r = http.post(Some(&dev), op, body);
        assert_eq!(
            (r.status, r.json()["kind"].clone()),
            (403, json!("forbidden")),
            "{op}: {r:?}"
        );
    }
    assert!(!d.ok(&["dataset", "list"]).contains("d2"));

    // Every request is logged with the token's name.
    let log = d.log_since_start();
    assert!(
        log.lines()
            .any(|l| l.contains("dataset_create") && l.contains("by=ops") && l.contains("done")),
        "the admin's request should be logged with by=ops:\n{log}"
    );
    assert!(
        log.lines()
            .any(|l| l.contains("gc") && l.contains("by=alice") && l.contains("refused")),
        "the developer's refused request should be logged with by=alice:\n{log}"
    );

    // The CLI over HTTP: no store, no socket.
    let out = d.vdbfs_http(&http, &admin, &["dataset", "list", "--json"]);
    assert!(out.status.success(), "{}", describe(&out));
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list[0]["name"], "d1");
    let out = d.vdbfs_http(&http, &dev, &["gc", "--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let err: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(err["error"]["kind"], "forbidden", "{err}");
    let out = d.vdbfs_http(&http, "vdbfs_wrong", &["status"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no valid API token"),
        "{}",
        describe(&out)
    );

    // Revoked and expired tokens stop working.
    d.ok(&["token", "revoke", "alice"]);
    assert_eq!(http.get(Some(&dev), "/api/v1/vdb_list").status, 401);
    let short = d.token("short", "admin", Some("2s"));
    assert_eq!(http.get(Some(&short), "/api/v1/vdb_list").status, 200);
    std::thread::sleep(Duration::from_millis(3100));
    assert_eq!(http.get(Some(&short), "/api/v1/vdb_list").status, 401);
    let listed = d.ok(&["token", "list"]);
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with("short") && l.contains("(expired)")),
        "{listed}"
    );
    let dup = d.vdbfs(&["token", "create", "ops", "--role", "admin"]);
    assert_eq!(dup.status.code(), Some(1), "a name is taken once");

    // The metrics scrape: needs a token, parses, counts what happened.
    assert_eq!(http.get(None, "/metrics").status, 401);
    let m = http.get(Some(&admin), "/metrics");
    assert_eq!(m.status, 200, "{m:?}");
    let m = parse_metrics(&m.body);
    assert_eq!(
        sample(
            &m,
            "vdbfs_operations_total",
            "op=\"dataset_create\",outcome=\"ok\""
        ),
        Some(1.0),
        "{m:?}"
    );
    assert_eq!(
        sample(
            &m,
            "vdbfs_operations_total",
            "op=\"dataset_create\",outcome=\"conflict\""
        ),
        Some(1.0)
    );
    assert!(sample(
        &m,
        "vdbfs_operations_total",
        "op=\"gc\",outcome=\"forbidden\""
    )
    .is_some());
    assert!(sample(&m, "vdbfs_store_free_bytes", "").is_some_and(|v| v > 0.0));
    assert!(sample(&m, "vdbfs_store_physical_bytes", "").is_some());

    // After a gc the scrape has its run and duration.
    let gc = http.post(Some(&admin), "gc", json!({}));
    assert_eq!(gc.status, 200, "{gc:?}");
    let ok = |trigger: &str| format!("trigger=\"{trigger}\",outcome=\"ok\"");
    let text = http.get(Some(&admin), "/metrics").body;
    let m = parse_metrics(&text);
    assert_eq!(
        sample(&m, "vdbfs_gc_runs_total", &ok("command")),
        Some(1.0),
        "{m:?}"
    );
    assert!(sample(&m, "vdbfs_gc_seconds_total", &ok("command")).is_some_and(|s| s > 0.0));
    assert!(sample(&m, "vdbfs_gc_last_seconds", &ok("command")).is_some_and(|s| s > 0.0));
    for family in [
        "vdbfs_checkpoint_runs_total counter",
        "vdbfs_checkpoint_seconds_total counter",
        "vdbfs_checkpoint_last_seconds gauge",
    ] {
        assert!(text.contains(&format!("# TYPE {family}\n")), "{text}");
    }
    // A background checkpoint, once the checkpointer has something to make durable (a write to
    // a mounted dataset): its runs and durations have samples.
    let mp = d.new_mountpoint("d1");
    let _m = d.mount("d1", &mp);
    let f = mp.join("for-the-checkpointer");
    let data: Vec<u8> = (0..256u32 << 10)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(&f, data).unwrap();
    std::fs::File::open(&f).unwrap().sync_all().unwrap();
    // A scrape makes the trees durable itself (for its space figures), which would leave the
    // checkpointer nothing to do: no scrape until it had its chance (it runs at most every 5 s,
    // within 200 ms of a change).
    std::thread::sleep(Duration::from_secs(6));
    let bg = ok("background");
    let mut text = String::new();
    assert!(
        wait_until(Duration::from_secs(30), || {
            text = http.get(Some(&admin), "/metrics").body;
            sample(&parse_metrics(&text), "vdbfs_checkpoint_runs_total", &bg)
                .is_some_and(|n| n >= 1.0)
        }),
        "no background checkpoint counted within 30 s of a write:\n{text}",
    );
    let m = parse_metrics(&text);
    assert!(
        sample(&m, "vdbfs_checkpoint_seconds_total", &bg).is_some_and(|s| s > 0.0),
        "{text}"
    );
    assert!(
        sample(&m, "vdbfs_checkpoint_last_seconds", &bg).is_some_and(|s| s > 0.0),
        "{text}"
    );

    // The web page is served from the binary, with nothing from elsewhere.
    let page = http.get(None, "/");
    assert_eq!(page.status, 200);
    assert!(page.body.contains("<title>vdbfs</title>"));
    for outside in ["src=\"http", "href=\"http", "@import", "url(http"] {
        assert!(
            !page.body.contains(outside),
            "the page must load nothing from elsewhere: {outside}"
        );
    }
}

/// Two developers create VDBs at once over HTTP; each can stop, snapshot and delete only their
/// own, may not give a VDB `--set` values or hooks, and the metrics show the VDBs.
#[test]
fn developers_create_vdbs_at_once_and_manage_only_their_own() {
    let mut s = setup(50);
    let http = s.d.serve_http();
    let d = &s.d;
    wait_syncing(d, "prod");
    let alice = d.token("alice", "developer", None);
    let bob = d.token("bob", "developer", None);
    let admin = d.token("ops", "admin", None);

    let create = |token: String, name: &'static str| {
        let http = http.clone();
        std::thread::spawn(move || {
            http.post(
                Some(&token),
                "vdb_create",
                json!({"name": name, "from": "prod"}),
            )
        })
    };
    let (a, b) = (create(alice.clone(), "a1"), create(bob.clone(), "b1"));
    let (a, b) = (a.join().unwrap(), b.join().unwrap());
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(b.status, 200, "{b:?}");
    assert_eq!(a.json()["data"]["owner"], "alice");
    assert_eq!(b.json()["data"]["owner"], "bob");
    assert_ne!(a.json()["data"]["port"], b.json()["data"]["port"]);
    let rows = Vdb::of(&a.json()["data"]).sql("SELECT count(*) FROM marker");
    assert_eq!(rows.trim(), "50");

    let list = http.get(Some(&alice), "/api/v1/vdb_list").json();
    let owners: Vec<(String, String)> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["name"].as_str().unwrap().into(),
                v["owner"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(
        owners,
        [("a1".into(), "alice".into()), ("b1".into(), "bob".into())]
    );

    for (op, body) in [
        ("vdb_stop", json!({"name": "b1"})),
        ("vdb_delete", json!({"name": "b1"})),
        ("vdb_status", json!({"name": "b1"})),
        ("vdb_snapshot", json!({"name": "b1"})),
        ("vdb_create", json!({"name": "a2", "from": "b1"})),
        (
            "vdb_create",
            json!({"name": "a3", "from": "prod", "settings": ["work_mem=1MB"]}),
        ),
        (
            "vdb_create",
            json!({"name": "a4", "from": "prod", "hooks": "/tmp"}),
        ),
    ] {
        let r = http.post(Some(&alice), op, body.clone());
        assert_eq!(
            (r.status, r.json()["kind"].clone()),
            (403, json!("forbidden")),
            "{op} {body}: {r:?}"
        );
    }
    let stopped = http.post(Some(&alice), "vdb_stop", json!({"name": "a1"}));
    assert_eq!(stopped.status, 200, "{stopped:?}");
    assert_eq!(stopped.json()["data"]["state"], "stopped");
    let snap = http.post(
        Some(&alice),
        "vdb_snapshot",
        json!({"name": "a1", "snapshot": "s1"}),
    );
    assert_eq!(snap.status, 200, "{snap:?}");

    // The metrics know both VDBs and their states.
    let m = parse_metrics(&http.get(Some(&admin), "/metrics").body);
    assert_eq!(
        sample(&m, "vdbfs_vdb_state", "vdb=\"a1\",state=\"stopped\""),
        Some(1.0)
    );
    assert_eq!(
        sample(&m, "vdbfs_vdb_state", "vdb=\"b1\",state=\"running\""),
        Some(1.0)
    );
    assert!(
        sample(&m, "vdbfs_source_lag_bytes", "source=\"prod\"").is_some(),
        "{m:?}"
    );
    assert!(sample(
        &m,
        "vdbfs_source_last_snapshot_age_seconds",
        "source=\"prod\""
    )
    .is_some());
    assert!(sample(&m, "vdbfs_vdb_age_seconds", "vdb=\"b1\"").is_some());
    assert_eq!(
        sample(
            &m,
            "vdbfs_operations_total",
            "op=\"vdb_create\",outcome=\"ok\""
        ),
        Some(2.0)
    );

    // Bob deletes his own with the CLI over HTTP; alice's stays.
    let out = d.vdbfs_http(&http, &bob, &["vdb", "delete", "b1"]);
    assert!(out.status.success(), "{}", describe(&out));
    let out = d.vdbfs_http(&http, &bob, &["vdb", "delete", "a1", "--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let names: Vec<String> = serde_json::from_str::<Value>(&d.ok(&["vdb", "list", "--json"]))
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["a1"]);
}

/// Per-VDB credentials: production's roles cannot log in to a VDB (their passwords are removed
/// at every start, TCP closed until then), the owner's `--user` login can, with the password
/// from `--password-file` or the one generated and shown once; `--keep-source-logins` keeps
/// production's; a refresh (which brings production's roles back with the data) and a restart
/// keep it so.
#[test]
fn production_logins_fail_on_a_vdb_and_the_owners_works() {
    let s = setup(20);
    let d = &s.d;
    s.src
        .psql("CREATE ROLE produser LOGIN PASSWORD 'prod-pw'; GRANT pg_read_all_data TO produser");
    wait_replayed(d, "prod", s.src.lsn());
    let snap = source_snapshot(d, "prod");
    let pwfile = d.root().join("alice.pw");
    std::fs::write(&pwfile, "alice-pw-1\n").unwrap();
    let url = |user: &str, pw: &str, port: &Value| {
        format!("postgresql://{user}:{pw}@127.0.0.1:{port}/postgres")
    };
    let login = |user: &str, pw: &str, port: &Value| {
        try_psql(&url(user, pw, port), "SELECT count(*) FROM marker")
    };
    let works = |user: &str, pw: &str, port: &Value, what: &str| {
        let out = login(user, pw, port);
        assert!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "20",
            "{what}: {user} should log in and read the data\n{}",
            describe(&out)
        );
    };
    let fails = |user: &str, pw: &str, port: &Value, what: &str| {
        let out = login(user, pw, port);
        assert!(
            !out.status.success(),
            "{what}: {user} must not log in\n{}",
            describe(&out)
        );
    };
    // The source accepts production's login (the premise).
    let src_port = Value::from(s.src.pg.port());
    works("produser", "prod-pw", &src_port, "on the source");

    let v1: Value = serde_json::from_str(&vdb(
        d,
        &[
            "create",
            "v1",
            "--from",
            &snap,
            "--user",
            "alice",
            "--password-file",
            pwfile.to_str().unwrap(),
            "--json",
        ],
    ))
    .unwrap();
    let p1 = v1["port"].clone();
    assert_eq!(v1["user"], "alice");
    assert!(
        v1["password"].is_null(),
        "a given password is not echoed: {v1}"
    );
    assert_eq!(
        v1["tcp_conn"],
        format!("postgresql://alice@127.0.0.1:{p1}/postgres")
    );
    fails("produser", "prod-pw", &p1, "v1");
    fails("replicator", crate::util::source::REPL_PW, &p1, "v1");
    fails("alice", "wrong", &p1, "v1");
    works("alice", "alice-pw-1", &p1, "v1");
    let roles = Vdb::of(&status(d, "v1"))
        .sql("SELECT string_agg(rolname, ',' ORDER BY rolname) FROM pg_authid WHERE rolpassword IS NOT NULL");
    assert_eq!(roles, "alice", "only the owner keeps a password in v1");

    // A generated password, shown once.
    let v2: Value = serde_json::from_str(&vdb(
        d,
        &["create", "v2", "--from", &snap, "--user", "bob", "--json"],
    ))
    .unwrap();
    let pw = v2["password"]
        .as_str()
        .expect("a generated password")
        .to_string();
    assert!(pw.len() >= 20, "{pw}");
    works("bob", &pw, &v2["port"], "v2");
    assert!(
        status(d, "v2")["password"].is_null(),
        "the password is shown only by create"
    );
    assert!(
        !d.log().contains(&pw),
        "the generated password must not be in the daemon's log"
    );

    // --keep-source-logins: production's login works there.
    let v3: Value = serde_json::from_str(&vdb(
        d,
        &[
            "create",
            "v3",
            "--from",
            &snap,
            "--keep-source-logins",
            "--json",
        ],
    ))
    .unwrap();
    works(
        "produser",
        "prod-pw",
        &v3["port"],
        "v3 (--keep-source-logins)",
    );

    // A refresh brings production's roles back with the data; they stay locked out.
    vdb(d, &["refresh", "v1"]);
    fails("produser", "prod-pw", &p1, "v1 after refresh");
    works("alice", "alice-pw-1", &p1, "v1 after refresh");
    vdb(d, &["stop", "v1"]);
    vdb(d, &["start", "v1"]);
    fails("produser", "prod-pw", &p1, "v1 after a restart");
    works("alice", "alice-pw-1", &p1, "v1 after a restart");
}

/// Lifetimes with short durations: a VDB whose `--ttl` ran out and one that had no client for
/// its `--idle-ttl` are deleted by the daemon (logged, their snapshots with them); a protected
/// one, an extended one and one with a client connected stay; `vdb list` shows when each is due.
#[test]
fn vdbs_expire_by_ttl_and_idle_ttl_unless_protected_or_extended() {
    let s = setup(5);
    let d = &s.d;
    let snap = &s.snap;
    let t0 = std::time::Instant::now();
    create(d, "ttl1", snap, &["--ttl", "4s"]);
    vdb(d, &["snapshot", "ttl1", "--name", "s1"]);
    create(d, "idle1", snap, &["--idle-ttl", "4s"]);
    create(d, "prot1", snap, &["--ttl", "4s"]);
    vdb(d, &["protect", "prot1"]);
    create(d, "ext1", snap, &["--ttl", "4s"]);
    vdb(d, &["extend", "ext1", "1h"]);
    let busy = create(d, "busy1", snap, &["--idle-ttl", "4s"]);
    // A client that stays connected for a while keeps busy1 alive.
    let client = clean_pg_env(&pg("psql"))
        .args(PSQL_FLAGS)
        .args(["-d", &busy.conn, "-c", "SELECT pg_sleep(12)"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    struct Reap(std::process::Child);
    impl Drop for Reap {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _reap = Reap(client);

    let listed = d.ok(&["vdb", "list"]);
    let line = |n: &str| {
        listed
            .lines()
            .find(|l| l.starts_with(n))
            .unwrap_or_else(|| panic!("{n} not listed:\n{listed}"))
            .to_string()
    };
    assert!(line("prot1").contains("protected"), "{listed}");
    let st = status(d, "ttl1");
    assert!(st["expires"].is_string(), "{st}");
    assert!(status(d, "prot1")["expires"].is_null());

    let gone = |n: &str| !list_names(d).iter().any(|x| x == n);
    assert!(
        wait_until(Duration::from_secs(30), || gone("ttl1") && gone("idle1")),
        "ttl1 and idle1 should be deleted within 30 s; left: {:?}\n{}",
        list_names(d),
        d.log_tail(30)
    );
    assert!(
        t0.elapsed() >= Duration::from_secs(4),
        "deleted before their time"
    );
    let names = list_names(d);
    for n in ["prot1", "ext1", "busy1"] {
        assert!(names.iter().any(|x| x == n), "{n} must stay: {names:?}");
    }
    let snaps = d.ok(&["snapshot", "list", "--json"]);
    assert!(
        !snaps.contains("\"ttl1@"),
        "ttl1's snapshots go with it: {snaps}"
    );
    let log = d.log();
    assert!(
        log.contains("VDB ttl1 expired: its TTL ran out")
            && log.contains("VDB idle1 expired: no client was connected")
            && log
                .lines()
                .any(|l| l.contains("op=\"vdb_delete\"") && l.contains("by=ttl")),
        "expiry should be logged:\n{}",
        d.log_tail(40)
    );
    // Once its client is gone, busy1 goes too.
    assert!(
        wait_until(Duration::from_secs(40), || gone("busy1")),
        "busy1 should be deleted once idle: {:?}",
        list_names(d)
    );
    assert!(list_names(d).iter().any(|x| x == "prot1"));
}

/// The idle clock survives a daemon restart. It lived only in the daemon's memory, so every
/// restart gave each idle VDB its whole idle TTL again (a daemon restarted more often than the
/// TTL never deleted anything); now the time a client was last seen is kept in the store and a
/// restarted daemon goes on from it, its downtime counting as idle time.
#[test]
fn an_idle_vdb_is_deleted_on_its_schedule_across_a_daemon_restart() {
    let mut s = setup(3);
    let t0 = std::time::Instant::now();
    create(&s.d, "idle2", &s.snap, &["--idle-ttl", "30s"]);
    let due = status(&s.d, "idle2")["expires"].clone();
    assert!(due.is_string(), "idle2 should be due: {due}");

    // Down for 15 s: a clock started again at the restart would make it due 30 s after it.
    s.d.terminate();
    while t0.elapsed() < Duration::from_secs(15) {
        std::thread::sleep(Duration::from_millis(200));
    }
    s.d.start_again();
    let d = &s.d;
    assert_eq!(
        status(d, "idle2")["expires"],
        due,
        "after a restart idle2 should be due when it was before"
    );
    let gone = || !list_names(d).iter().any(|x| x == "idle2");
    assert!(
        wait_until(Duration::from_secs(40).saturating_sub(t0.elapsed()), gone),
        "idle2 should be deleted about 30 s after it was created (due {due}), not 30 s after \
         the restart; {:.0} s passed\n{}",
        t0.elapsed().as_secs_f64(),
        d.log_tail(30)
    );
    assert!(
        t0.elapsed() >= Duration::from_secs(29),
        "idle2 was deleted before its idle TTL ran out ({:?})",
        t0.elapsed()
    );
    assert!(
        d.log_since_start()
            .contains("VDB idle2 expired: no client was connected for"),
        "{}",
        d.log_tail(30)
    );
}

/// The web page in a real browser (headless Chromium): a wrong token is refused, a right one
/// signs in; the source's TimeFlow is drawn with its snapshots and provisionable range; a VDB
/// created from the page at a moment appears running with its owner, nested under the snapshot
/// it came from; refresh from the page moves it onto a new snapshot of the source (a row the
/// source committed after the first snapshot is there); rewind from the page takes it back to
/// its bookmark; the copy button puts its connection string on the clipboard, or selects it where
/// the page has no clipboard; deleting it from the page removes it. A failing run leaves a
/// screenshot under target/browser-screenshots/.
#[test]
fn web_page_signs_in_shows_the_timeflow_creates_and_deletes_a_vdb() {
    let mut s = setup(7);
    let http = s.d.serve_http();
    let d = &s.d;
    wait_syncing(d, "prod");
    let token = d.token("web", "admin", None);
    let st = crate::util::source::status(d, "prod");
    let at = st["ranges"][0]["to_time"]
        .as_str()
        .unwrap_or_else(|| panic!("source status has no range: {st}"))
        .to_string();

    let mut b = crate::util::browser::Browser::start("web_page");
    b.navigate(&format!("{}/", http.base));
    let set = |b: &mut crate::util::browser::Browser, id: &str, v: &str| {
        b.eval(&format!(
            "document.getElementById({}).value = {}",
            json!(id),
            json!(v)
        ));
    };
    let t = Duration::from_secs(30);
    set(&mut b, "token", "vdbfs_wrong");
    b.eval("document.getElementById('signin-btn').click()");
    assert!(
        b.wait(
            t,
            "document.getElementById('error').textContent.includes('no valid API token')"
        ),
        "a wrong token should be refused on the page"
    );
    assert!(b.eval("document.getElementById('app').hidden") == json!(true));

    set(&mut b, "token", &token);
    b.eval("document.getElementById('signin-btn').click()");
    assert!(
        b.wait(t, "!document.getElementById('app').hidden"),
        "signing in with a valid token failed: {}",
        b.eval("document.getElementById('error').textContent")
    );
    // The TimeFlow: prod's two snapshots and its provisionable range.
    assert!(
        b.wait(
            t,
            "document.querySelectorAll('svg.timeflow[data-source=\"prod\"] circle.snapshot').length >= 2 \
             && document.querySelector('svg.timeflow[data-source=\"prod\"] rect.range') !== null"
        ),
        "the TimeFlow of prod is not drawn: {}",
        b.eval("document.getElementById('sources').innerHTML")
    );
    let drawn = b.eval(
        "[...document.querySelectorAll('svg.timeflow[data-source=\"prod\"] circle.snapshot')]\
         .map(c => c.dataset.name)",
    );
    assert!(
        drawn
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n == s.snap.as_str()),
        "snapshot {} not drawn: {drawn}",
        s.snap
    );

    // Create a VDB at a moment from the page.
    set(&mut b, "c-name", "web1");
    set(&mut b, "c-from", "prod");
    set(&mut b, "c-at", &at);
    b.eval("document.getElementById('c-submit').click()");
    let row = "document.querySelector('.vdb[data-name=\"web1\"]')";
    assert!(
        b.wait(
            Duration::from_secs(120),
            &format!("{row} && {row}.querySelector('.state').textContent === 'running'")
        ),
        "web1 did not appear running on the page: {}",
        b.eval("document.getElementById('error').textContent")
    );
    assert!(b
        .eval(&format!("{row}.textContent"))
        .as_str()
        .unwrap()
        .contains("web"));
    let st = status(d, "web1");
    assert_eq!(st["owner"], "web");
    assert_eq!(Vdb::of(&st).sql("SELECT count(*) FROM marker"), "7");

    // It hangs under the snapshot it came from, with its owner, space and expiry.
    let parent0 = st["parent"].as_str().unwrap().to_string();
    assert!(parent0.starts_with("prod@"), "{st}");
    let under = |snap: &str| {
        format!(
            "{row} && {row}.parentElement.closest('.node').classList.contains('snapshot') \
             && {row}.parentElement.closest('.node').dataset.name === {} \
             && {row}.closest('.node.source').dataset.name === 'prod'",
            json!(snap)
        )
    };
    assert!(
        b.wait(t, &under(&parent0)),
        "web1 is not drawn under {parent0}: {}",
        b.eval("document.getElementById('vdbs').innerHTML")
    );
    let label = |b: &mut crate::util::browser::Browser, class: &str| {
        b.eval(&format!(
            "{row}.querySelector('.label .{class}').textContent"
        ))
        .as_str()
        .unwrap()
        .to_string()
    };
    assert_eq!(label(&mut b, "owner"), "web");
    assert!(
        label(&mut b, "space").ends_with('B'),
        "{}",
        label(&mut b, "space")
    );
    assert_eq!(label(&mut b, "expires"), "no expiry");
    assert_eq!(label(&mut b, "conn"), st["tcp_conn"].as_str().unwrap());
    let idle = |b: &mut crate::util::browser::Browser, timeout: Duration| {
        b.wait(
            timeout,
            "document.getElementById('busy').textContent === ''",
        )
    };

    // Refresh from the page: onto a new snapshot of prod, with what the source committed since.
    s.src.insert_rows(8, 8, "after the first snapshot");
    b.click(".vdb[data-name=\"web1\"] button.refresh");
    assert!(
        b.wait(
            t,
            "document.getElementById('busy').textContent.includes('refreshing web1')"
        ),
        "the page does not say that it refreshes web1"
    );
    assert!(
        idle(&mut b, Duration::from_secs(180)),
        "the refresh did not end"
    );
    let err = b.eval("document.getElementById('error').textContent");
    assert_eq!(err, json!(""), "refresh from the page failed");
    let st = status(d, "web1");
    let parent1 = st["parent"].as_str().unwrap().to_string();
    assert_ne!(
        parent1, parent0,
        "refresh should move web1 onto a new snapshot: {st}"
    );
    let newest = crate::util::source::status(d, "prod")["last_snapshot"]["name"].clone();
    assert_eq!(
        json!(parent1),
        newest,
        "refresh without a moment takes the newest snapshot"
    );
    assert_eq!(st["state"], "running");
    let web1 = Vdb::of(&st);
    assert_eq!(web1.sql("SELECT count(*) FROM marker"), "8");
    assert!(
        b.wait(t, &under(&parent1)),
        "after refresh web1 should be drawn under {parent1}: {}",
        b.eval("document.getElementById('vdbs').innerHTML")
    );

    b.screenshot("web_page-refreshed");

    // Rewind from the page: nothing chosen is refused on the page; a bookmark takes it back.
    b.click(".vdb[data-name=\"web1\"] button.rewind");
    assert!(
        b.wait(
            t,
            "document.getElementById('error').textContent.includes('rewind web1: choose one of its snapshots or bookmarks')"
        ),
        "rewind with nothing chosen should say what to choose: {}",
        b.eval("document.getElementById('error').textContent")
    );
    vdb(d, &["bookmark", "web1", "bm1"]);
    web1.sql("INSERT INTO marker VALUES (9, 'after the bookmark')");
    assert_eq!(web1.sql("SELECT count(*) FROM marker"), "9");
    b.eval("document.getElementById('reload').click()");
    let option =
        format!("{row} && {row}.querySelector('select.rewind-to option[value=\"web1@bm1\"]')");
    assert!(
        b.wait(t, &option),
        "the bookmark web1@bm1 is not offered for rewind: {}",
        b.eval(&format!(
            "{row} && {row}.querySelector('select.rewind-to').outerHTML"
        ))
    );
    b.eval(&format!(
        "{row}.querySelector('select.rewind-to').value = 'web1@bm1'"
    ));
    b.click(".vdb[data-name=\"web1\"] button.rewind");
    assert!(
        b.wait(
            t,
            "document.getElementById('busy').textContent.includes('rewinding web1')"
        ),
        "the page does not say that it rewinds web1"
    );
    assert!(
        idle(&mut b, Duration::from_secs(180)),
        "the rewind did not end"
    );
    let err = b.eval("document.getElementById('error').textContent");
    assert_eq!(err, json!(""), "rewind from the page failed");
    let st = status(d, "web1");
    assert_eq!(st["state"], "running");
    assert_eq!(
        st["parent"],
        json!(parent1),
        "rewind keeps the parent: {st}"
    );
    assert_eq!(
        web1.sql("SELECT count(*) FROM marker"),
        "8",
        "rewind to web1@bm1 should drop the row inserted after it"
    );

    // The copy button. A page with no clipboard selects the connection string for Ctrl+C.
    let conn = st["tcp_conn"].as_str().unwrap().to_string();
    assert!(b.wait(t, &under(&parent1)));
    b.eval("Object.defineProperty(navigator, 'clipboard', {value: undefined, configurable: true})");
    b.click(".vdb[data-name=\"web1\"] button.copy");
    assert!(
        b.wait(
            t,
            &format!("{row}.querySelector('.copied').textContent !== ''")
        ),
        "the copy button said nothing"
    );
    assert_eq!(
        b.eval("window.getSelection().toString()"),
        json!(conn),
        "without a clipboard the connection string should be selected"
    );
    // With the clipboard (127.0.0.1 is a secure context; the browser grants the permission).
    b.eval("delete navigator.clipboard; window.getSelection().removeAllRanges()");
    b.call(
        "Browser.grantPermissions",
        json!({"origin": http.base, "permissions": ["clipboardReadWrite", "clipboardSanitizedWrite"]}),
    );
    b.click(".vdb[data-name=\"web1\"] button.copy");
    assert!(
        b.wait(
            t,
            &format!("{row}.querySelector('.copied').textContent === 'copied'")
        ),
        "the copy button did not copy: {}",
        b.eval(&format!("{row}.querySelector('.copied').textContent"))
    );
    assert_eq!(
        b.eval("navigator.clipboard.readText()"),
        json!(conn),
        "the clipboard should hold the connection string"
    );

    // Delete it from the page.
    b.eval(&format!("{row}.querySelector('button.delete').click()"));
    assert!(
        b.wait(Duration::from_secs(60), &format!("{row} === null")),
        "web1 still shown after delete: {}",
        b.eval("document.getElementById('error').textContent")
    );
    assert!(!list_names(d).iter().any(|n| n == "web1"));
    b.screenshot("web_page-done");
}

/// Long operations over HTTP as over the socket. The CLI with `VDBFS_URL` showed no progress
/// and a CLI that went away left the operation running in the daemon; now the answer comes in
/// lines: `vdb create` shows the daemon's progress lines on stderr as they come, and a CLI
/// interrupted before the answer closes the connection, which the daemon takes as a cancel:
/// the create rolls back and nothing of the VDB is left.
#[test]
fn http_clients_see_progress_lines_and_hanging_up_cancels_a_create() {
    let mut s = setup(3);
    let http = s.d.serve_http();
    let d = &s.d;
    let admin = d.token("ops", "admin", None);
    let out = d.vdbfs_http(&http, &admin, &["vdb", "create", "p1", "--from", &s.snap]);
    assert!(out.status.success(), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.lines()
            .any(|l| l.starts_with("cloning ") && l.ends_with(" into VDB p1"))
            && err.contains("starting postgres on port"),
        "vdb create over HTTP should show its progress lines:\n{err}"
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("postgresql://"),
        "{}",
        describe(&out)
    );

    // A create whose pre-start hook takes a while; the CLI is interrupted meanwhile.
    let hooks = d.root().join("slow-hooks");
    std::fs::create_dir_all(&hooks).unwrap();
    std::fs::write(hooks.join("pre-start"), "#!/bin/sh\nsleep 5\n").unwrap();
    chmod(&hooks.join("pre-start"), 0o755);
    let mut c = Command::new(bin());
    clean_cli_env(&mut c);
    c.env("HOME", d.root())
        .env("VDBFS_URL", &http.base)
        .env("VDBFS_TOKEN", &admin)
        .arg("--store")
        .arg(d.root().join("no-store-here"))
        .args(["vdb", "create", "p2", "--from", &s.snap, "--hooks"])
        .arg(&hooks)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let mut child = c.spawn().unwrap();
    struct Reap(std::process::Child);
    impl Drop for Reap {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let stderr = child.stderr.take().unwrap();
    let mut child = Reap(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for l in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(l);
        }
    });
    let mut seen = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !seen
        .iter()
        .any(|l: &String| l.contains("starting postgres on port"))
    {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => seen.push(l),
            Err(_) => panic!(
                "no progress line 'starting postgres' from vdb create p2 over HTTP:\n{}",
                seen.join("\n")
            ),
        }
    }
    assert!(
        list_names(d).iter().any(|n| n == "p2"),
        "p2 is being created"
    );
    assert!(
        signal(child.0.id() as i32, libc::SIGINT),
        "cannot SIGINT the CLI"
    );
    let st =
        wait_child(&mut child.0, Duration::from_secs(10)).expect("the CLI should end on Ctrl-C");
    assert!(!st.success(), "{st}");
    assert!(
        wait_until(Duration::from_secs(60), || !list_names(d)
            .iter()
            .any(|n| n == "p2")),
        "the create of p2 should be rolled back once its client hung up:\n{}",
        d.log_tail(30)
    );
    assert!(
        !crate::util::source::dataset_names(d).contains(&"p2".to_string()),
        "p2's dataset is left"
    );
    let log = d.log_since_start();
    assert!(
        log.lines()
            .any(|l| l.contains("the HTTP client hung up") && l.contains("cancelling")),
        "the daemon should log the hang-up as a cancel:\n{}",
        d.log_tail(30)
    );
    assert!(
        log.lines().any(|l| l.contains("op=\"vdb_create\"")
            && l.contains("name=p2")
            && l.contains("kind=cancelled")),
        "the create should end as cancelled:\n{}",
        d.log_tail(30)
    );
    // p1 is untouched.
    assert_eq!(status(d, "p1")["state"], "running");
}

/// `serve --socket-group`: members of the group use the control socket as developers named
/// after their user (SO_PEERCRED), so they list but may not run admin operations; a user outside
/// the group cannot open the socket; root stays admin.
#[test]
fn socket_group_members_use_the_socket_as_developers() {
    let mut d = Daemon::start();
    // Let other users reach the socket through the test's directories (search permission).
    chmod(d.root(), 0o711);
    chmod(d.store(), 0o711);
    d.restart_with(&["--socket-group", "postgres"], &[]);
    let sock = d.store().join("vdbfs.sock");
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660, "the socket should be group read-write");
    let as_user = |user: &str, args: &[&str]| {
        let mut c = Command::new("runuser");
        clean_cli_env(&mut c);
        c.args(["-u", user, "--", bin(), "--store"])
            .arg(d.store())
            .args(args);
        run_timeout(&mut c, COMMAND_TIMEOUT)
    };
    let out = as_user("postgres", &["vdb", "list", "--json"]);
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "[]");
    let out = as_user("postgres", &["gc", "--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let err: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(err["error"]["kind"], "forbidden", "{err}");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("postgres"),
        "the developer is named after the user: {err}"
    );
    let out = as_user("nobody", &["vdb", "list"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("permission denied"),
        "{}",
        describe(&out)
    );
    d.ok(&["gc"]);
    assert!(
        d.log_since_start()
            .lines()
            .any(|l| l.contains("op=\"gc\"") && l.contains("by=postgres") && l.contains("refused")),
        "{}",
        d.log_since_start()
    );
}

/// `serve --http --tls-cert --tls-key` serves HTTPS: a request over https with the test CA
/// trusted succeeds, plain http to that port gets no HTTP answer, and the CLI works over https
/// with `VDBFS_CA_FILE` (and refuses a certificate it cannot verify without it).
#[test]
fn https_with_tls_cert_and_key_serves_the_api_and_the_cli() {
    let mut d = Daemon::start();
    let admin = d.token("ops", "admin", None);
    let (https, ca_file) = d.serve_https();
    assert!(https.base.starts_with("https://"));

    let r = https.get(Some(&admin), "/api/v1/dataset_list");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["ok"], json!(true), "{r:?}");
    assert_eq!(https.get(None, "/api/v1/dataset_list").status, 401);
    assert_eq!(https.get(Some(&admin), "/metrics").status, 200);

    let plain = Http {
        base: https.base.replacen("https://", "http://", 1),
        ca_pem: None,
    };
    let got = plain.try_get(Some(&admin), "/api/v1/dataset_list");
    assert!(
        got.is_err(),
        "plain HTTP to the TLS port must not get an HTTP answer: {got:?}"
    );

    let ca = ("VDBFS_CA_FILE", ca_file.as_os_str());
    let out = d.vdbfs_http_env(&https, &admin, &[ca], &["dataset", "create", "over-tls"]);
    assert!(out.status.success(), "{out:?}");
    let out = d.vdbfs_http_env(&https, &admin, &[ca], &["--json", "dataset", "list"]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("over-tls"),
        "{out:?}"
    );

    // Without the CA the CLI does not trust the daemon's certificate: nothing is sent.
    let out = d.vdbfs_http(&https, &admin, &["dataset", "create", "untrusted"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("VDBFS_URL"), "{err}");
    assert!(!d.ok(&["dataset", "list"]).contains("untrusted"));
}
