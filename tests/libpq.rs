//! `source link` with libpq's manners (issue 14). The bug: `--conn` was required even with
//! PGHOST/PGPORT/PGUSER set, PGPASSFILE and ~/.pgpass were ignored ("none was given"), and a
//! passfile readable by others was used. The fix: the CLI fills what `--conn` does not name
//! from the PG* environment and takes the password in libpq's order (--conn, PGPASSWORD,
//! --passfile, PGPASSFILE, ~/.pgpass), refusing a password file group or others may read with
//! libpq's reason. Only the matching password of an implicit password file reaches the store.

use std::fs;
use std::path::Path;

use crate::sources::assert_nothing_left;
use crate::util::source::{before, error_text, status, wait_syncing, SourceDb, Staged, REPL_PW};
use crate::util::{self, chmod, describe};

const OTHER_SECRET: &str = "Other-Server-Secret-77a1";

/// `~/.pgpass` of the CLI's user (the harness sets HOME to the test's directory) with a line for
/// another server first and the source's line after it.
fn write_pgpass(home: &Path, src: &SourceDb, mode: u32) -> std::path::PathBuf {
    let p = home.join(".pgpass");
    fs::write(
        &p,
        format!(
            "# vdbfs test\nother.example:5432:*:replicator:{OTHER_SECRET}\n\
             127.0.0.1:{}:*:replicator:{REPL_PW}\n",
            src.port()
        ),
    )
    .unwrap();
    chmod(&p, mode);
    p
}

// No --conn and no --passfile: PGHOST, PGPORT and PGUSER say where, ~/.pgpass gives the
// password, as for psql. The store keeps only that password, not the file's other lines.
#[test]
fn link_from_pg_environment_and_pgpass() {
    let src = SourceDb::start(false, &[]);
    let d = Staged::start();
    write_pgpass(d.root(), &src, 0o600);
    let port = util::free_port().to_string();
    let out = util::run_timeout(
        d.command()
            .args(["source", "link", "prod", "--staging-port", &port])
            .env("PGHOST", "127.0.0.1")
            .env("PGPORT", src.port().to_string())
            .env("PGUSER", "replicator"),
        util::COMMAND_TIMEOUT,
    );
    assert!(
        out.status.success(),
        "link from the PG* environment failed\n{}\n{}",
        describe(&out),
        d.log_tail(30)
    );
    let st = wait_syncing(&d, "prod");
    assert_eq!(
        st["conn"],
        format!("replicator@127.0.0.1:{}/postgres", src.port()),
        "{st}"
    );
    let kept = fs::read_to_string(d.store().join("sources/prod/pgpass")).unwrap();
    assert!(
        kept.contains(REPL_PW),
        "the store's pgpass lacks the password"
    );
    assert!(
        !kept.contains(OTHER_SECRET),
        "another server's password from ~/.pgpass was copied into the store"
    );
    assert_eq!(status(&d, "prod")["slot"], "vdbfs_prod");
}

// A password file group or others may read is refused with libpq's reason (whether it is
// ~/.pgpass, PGPASSFILE or --passfile), exit 1, and nothing is made. No --conn and no PG*
// variable: the error says how to name the source.
#[test]
fn password_files_others_can_read_are_refused() {
    let src = SourceDb::start(false, &[]);
    let d = Staged::start();
    let before = before(&d);
    let port = util::free_port().to_string();
    let pgpass = write_pgpass(d.root(), &src, 0o644);
    let conn = src.conn("replicator");
    let reason = "has group or world access; permissions should be u=rw (0600) or less";

    type Case<'a> = (&'a str, Vec<(&'a str, String)>, Vec<String>);
    let cases: Vec<Case> = vec![
        ("~/.pgpass 0644", vec![], vec![]),
        (
            "PGPASSFILE 0644",
            vec![("PGPASSFILE", pgpass.display().to_string())],
            vec![],
        ),
        (
            "--passfile 0644",
            vec![],
            vec!["--passfile".into(), pgpass.display().to_string()],
        ),
    ];
    let link = [
        "source",
        "link",
        "prod",
        "--conn",
        &conn,
        "--staging-port",
        &port,
    ];
    for (what, env, extra) in cases {
        let mut c = d.command();
        c.args(link).args(&extra);
        for (k, v) in &env {
            c.env(k, v);
        }
        let out = util::run_timeout(&mut c, util::COMMAND_TIMEOUT);
        assert_eq!(out.status.code(), Some(1), "{what}\n{}", describe(&out));
        let err = error_text(&out);
        assert!(
            err.contains(reason) && err.contains(&pgpass.display().to_string().to_lowercase()),
            "{what}: the error must give libpq's reason and the file\n{}",
            describe(&out)
        );
        assert!(
            err.contains("chmod 0600"),
            "{what}: no hint\n{}",
            describe(&out)
        );
        assert_nothing_left(&d, &src, "prod", &before, false, what);
    }

    let out = d.vdbfs(&["source", "link", "prod", "--staging-port", &port]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        error_text(&out).contains("needs --conn") && error_text(&out).contains("pghost"),
        "{}",
        describe(&out)
    );
    // Fixed permissions: the same link works.
    chmod(&pgpass, 0o600);
    let out = d.vdbfs(&link);
    assert!(
        out.status.success(),
        "{}\n{}",
        describe(&out),
        d.log_tail(30)
    );
    wait_syncing(&d, "prod");
}
