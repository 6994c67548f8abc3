//! Preflight: everything a link needs is checked before anything is copied, and each problem
//! gets its own message saying what to do. The source is asked over one short replication
//! connection (what the standby will use), so pg_hba and the REPLICATION privilege are checked
//! exactly as they will matter.

use super::Mode;
use crate::api::{refusal, ErrorKind};
use crate::pg::conninfo::Conn;
use crate::pg::{self, Install};
use crate::refuse;
use anyhow::Context;
use std::path::Path;
use std::time::Duration;
use tokio_postgres::error::SqlState;

/// What the source said over a replication connection.
#[derive(Debug, Clone)]
pub struct SourceFacts {
    pub system_identifier: String,
    pub timeline: u32,
    pub xlogpos: String,
    pub version: String,
    pub major: u32,
    pub wal_level: String,
    pub max_wal_senders: u32,
    pub max_replication_slots: u32,
}

/// The newest local installation, for client programs (psql speaks to any server version).
pub fn client_install() -> anyhow::Result<Install> {
    pg::installations().into_iter().next().ok_or_else(|| {
        refusal(
            ErrorKind::Unavailable,
            format!(
                "no PostgreSQL installation found under {}; install postgresql-15 (apt-get install postgresql-15)",
                pg::DEBIAN_ROOT
            ),
        )
    })
}

/// What went wrong talking to the source, as far as vdbfs tells cases apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Problem {
    Password,
    NoPassword,
    NoReplicationPrivilege,
    NoHbaEntry,
    WalSenders,
    Refused,
    NoRole,
    /// Anything else (the server's or libpq's words are in the message).
    Other,
}

/// A failure talking to the source: the case, the server's error code when it sent one (psql
/// prints it), and the message saying what to change.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct SourceError {
    pub problem: Problem,
    pub sqlstate: Option<SqlState>,
    message: String,
}

impl SourceError {
    pub fn kind(&self) -> ErrorKind {
        match self.problem {
            Problem::Refused | Problem::WalSenders => ErrorKind::Unavailable,
            Problem::Other => ErrorKind::Unavailable,
            _ => ErrorKind::Invalid,
        }
    }
}

/// Whether an error's chain holds a [`SourceError`] with this SQLSTATE.
pub fn has_sqlstate(e: &anyhow::Error, code: &SqlState) -> bool {
    e.chain()
        .filter_map(|c| c.downcast_ref::<SourceError>())
        .any(|s| s.sqlstate.as_ref() == Some(code))
}

/// Whether an error's chain holds a [`SourceError`] of this case.
pub fn has_problem(e: &anyhow::Error, problem: Problem) -> bool {
    e.chain()
        .filter_map(|c| c.downcast_ref::<SourceError>())
        .any(|s| s.problem == problem)
}

/// Turns libpq's connection errors into what the user must change. libpq reports a failed
/// connection only as text (no error code reaches psql's caller), so this is the one place
/// that reads it.
pub fn explain_connect_error(err: &str, conn: &Conn) -> anyhow::Error {
    explain(err, conn, None).into()
}

fn explain(err: &str, conn: &Conn, sqlstate: Option<SqlState>) -> SourceError {
    let e = err.to_ascii_lowercase();
    let at = format!("{}:{}", conn.host, conn.port);
    let user = &conn.user;
    let (problem, message) = if e.contains("password authentication failed") {
        (
            Problem::Password,
            format!(
                "cannot connect to the source {at} as {user}: password authentication failed; \
                 check the password (in --conn, PGPASSWORD or the --passfile)"
            ),
        )
    } else if e.contains("no password supplied") || e.contains("fe_sendauth") {
        (
            Problem::NoPassword,
            format!(
                "the source {at} asks for a password for {user} and none was given; pass --passfile \
                 FILE (mode 0600, lines host:port:db:user:password) or set PGPASSWORD"
            ),
        )
    } else if e.contains("must be superuser or replication role")
        || e.contains("permission denied to start wal sender")
        || e.contains("replication privilege")
    {
        (
            Problem::NoReplicationPrivilege,
            format!(
                "role {user} lacks the replication privilege on the source {at}; run there: \
                 ALTER ROLE {user} REPLICATION;"
            ),
        )
    } else if e.contains("no pg_hba.conf entry") {
        (
            Problem::NoHbaEntry,
            format!(
                "the source {at} refuses replication connections from this host for {user} \
                 (no pg_hba.conf entry); add a line like \
                 'host replication {user} 127.0.0.1/32 scram-sha-256' to its pg_hba.conf and reload"
            ),
        )
    } else if e.contains("exceeds max_wal_senders") || e.contains("max_wal_senders") {
        (
            Problem::WalSenders,
            format!(
                "the source {at} accepts no replication connection: max_wal_senders is 0 or all WAL \
                 senders are busy; a standby needs wal_level = replica and max_wal_senders >= 2 on \
                 the source (then restart it)"
            ),
        )
    } else if e.contains("connection refused") || e.contains("no such file or directory") {
        (
            Problem::Refused,
            format!("cannot reach the source at {at}: connection refused; is it running and listening there?"),
        )
    } else if e.contains("does not exist") && e.contains("role") {
        (
            Problem::NoRole,
            format!("the source {at} has no role {user}; create it: CREATE ROLE {user} LOGIN REPLICATION PASSWORD '...'"),
        )
    } else {
        (
            Problem::Other,
            format!(
                "cannot connect to the source {at} as {user}: {}",
                pg::last_lines(err, 3)
            ),
        )
    };
    SourceError {
        problem,
        sqlstate,
        message,
    }
}

/// psql's output with `VERBOSITY=verbose`: the SQLSTATE of an error (`ERROR:  42710: ...`),
/// and the text as psql prints it without verbosity (the code and the LOCATION lines dropped).
fn split_sqlstate(stderr: &str) -> (Option<SqlState>, String) {
    let mut code = None;
    let mut lines = Vec::new();
    for l in stderr.lines() {
        if l.trim_start().starts_with("LOCATION:") {
            continue;
        }
        let mut line = l.to_string();
        if let Some(i) = l.find("ERROR:  ") {
            let rest = &l[i + 8..];
            if let Some((c, msg)) = rest.split_once(": ") {
                if c.len() == 5 && c.bytes().all(|b| b.is_ascii_alphanumeric()) {
                    code.get_or_insert_with(|| SqlState::from_code(c));
                    line = format!("{}{msg}", &l[..i + 8]);
                }
            }
        }
        lines.push(line);
    }
    (code, lines.join("\n"))
}

/// psql on a replication connection to the source, running `commands`; returns stdout lines.
pub fn replication_psql(
    client: &Install,
    conn: &Conn,
    passfile: Option<&Path>,
    commands: &[&str],
) -> anyhow::Result<Vec<String>> {
    source_psql(client, conn, passfile, true, commands)
}

/// psql on a (replication or plain) connection to the source, running `commands`.
fn source_psql(
    client: &Install,
    conn: &Conn,
    passfile: Option<&Path>,
    replication: bool,
    commands: &[&str],
) -> anyhow::Result<Vec<String>> {
    let mut extra = vec![("application_name", "vdbfs"), ("connect_timeout", "10")];
    let dbname = conn.dbname.clone();
    if replication {
        extra.push(("replication", "true"));
    } else {
        extra.push(("dbname", &dbname));
    }
    let conninfo = conn.libpq(passfile, &extra);
    let mut cmd = pg::as_postgres(&client.bin("psql"));
    cmd.args(["-X", "-A", "-t", "-q", "-w", "-v", "ON_ERROR_STOP=1"])
        .args(["-v", "VERBOSITY=verbose", "-d"])
        .arg(&conninfo);
    for c in commands {
        cmd.arg("-c").arg(c);
    }
    let out = pg::run_unchecked(&mut cmd, Duration::from_secs(60), |_| {})?;
    if !out.status.success() {
        let (sqlstate, text) = split_sqlstate(&out.stderr_text());
        return Err(explain(&text, conn, sqlstate).into());
    }
    Ok(out.stdout_text().lines().map(str::to_string).collect())
}

/// Asks the source what a standby needs to know, and checks it can feed one.
pub fn probe_source(
    client: &Install,
    conn: &Conn,
    passfile: Option<&Path>,
) -> anyhow::Result<SourceFacts> {
    let lines = match replication_psql(
        client,
        conn,
        passfile,
        &[
            "IDENTIFY_SYSTEM",
            "SHOW server_version",
            "SHOW server_version_num",
            "SHOW wal_level",
            "SHOW max_wal_senders",
            "SHOW max_replication_slots",
        ],
    ) {
        Ok(l) => l,
        Err(e) => {
            // With wal_level = minimal, max_wal_senders must be 0, so the replication
            // connection fails first; a plain connection can tell the real cause.
            if has_problem(&e, Problem::WalSenders) {
                let plain = source_psql(client, conn, passfile, false, &["SHOW wal_level"]);
                if plain.is_ok_and(|l| l.first().is_some_and(|v| v.trim() == "minimal")) {
                    return Err(wal_level_minimal(conn));
                }
            }
            return Err(e);
        }
    };
    if lines.len() < 6 {
        refuse!(
            Internal,
            "unexpected answer from the source to IDENTIFY_SYSTEM/SHOW: {lines:?}"
        );
    }
    let ident: Vec<&str> = lines[0].split('|').collect();
    let num: u32 = lines[2].trim().parse().unwrap_or(0);
    let facts = SourceFacts {
        system_identifier: ident.first().unwrap_or(&"").to_string(),
        timeline: ident.get(1).and_then(|t| t.parse().ok()).unwrap_or(1),
        xlogpos: ident.get(2).unwrap_or(&"").to_string(),
        version: lines[1].split_whitespace().next().unwrap_or("").to_string(),
        major: num / 10_000,
        wal_level: lines[3].trim().to_string(),
        max_wal_senders: lines[4].trim().parse().unwrap_or(0),
        max_replication_slots: lines[5].trim().parse().unwrap_or(0),
    };
    if facts.wal_level == "minimal" {
        return Err(wal_level_minimal(conn));
    }
    Ok(facts)
}

fn wal_level_minimal(conn: &Conn) -> anyhow::Error {
    refusal(
        ErrorKind::Invalid,
        format!(
            "the source {}:{} runs with wal_level = minimal, which a standby cannot follow; set \
             wal_level = replica and max_wal_senders = 10 on the source and restart it",
            conn.host, conn.port
        ),
    )
}

/// The staging binaries must be the source's major version.
pub fn staging_install(
    pg_bin: Option<&Path>,
    major: u32,
    version: &str,
) -> anyhow::Result<Install> {
    let install = match pg_bin {
        Some(dir) => Install::probe(dir)?,
        None => Install::for_major(major).map_err(|e| {
            refusal(
                ErrorKind::Unavailable,
                format!("the source runs PostgreSQL {version} (version {major}): {e:#}"),
            )
        })?,
    };
    if install.major != major {
        refuse!(
            Invalid,
            "version mismatch: the source runs PostgreSQL {version} but the staging binaries in \
             {} are PostgreSQL {}; a standby needs the same major version: install \
             postgresql-{major} or pass --pg-bin with PostgreSQL {major} binaries",
            install.bin_dir.display(),
            install.version
        );
    }
    Ok(install)
}

/// A backup must come from the source it is linked with (a standby refuses WAL of another
/// system, but only after the copy; say it before). Reads the backup's pg_control (from
/// base.tar for the tar format).
pub fn check_backup_identity(
    install: &Install,
    backup: &Path,
    source_id: &str,
) -> anyhow::Result<()> {
    let scratch;
    let control_dir = match super::ingest::BackupFormat::detect(backup)? {
        super::ingest::BackupFormat::Plain => backup.to_path_buf(),
        super::ingest::BackupFormat::Tar { base, .. } => {
            scratch = tempfile::tempdir()?;
            pg::run(
                std::process::Command::new("tar")
                    .arg("-xf")
                    .arg(&base)
                    .arg("-C")
                    .arg(scratch.path())
                    .arg("global/pg_control"),
                Duration::from_secs(600),
            )
            .with_context(|| format!("{} holds no global/pg_control", base.display()))?;
            scratch.path().to_path_buf()
        }
    };
    let out = pg::run(
        std::process::Command::new(install.bin("pg_controldata")).arg(&control_dir),
        Duration::from_secs(60),
    )?;
    let control = pg::conf::parse_controldata(&out.stdout_text());
    match control.get("Database system identifier") {
        Some(id) if id != source_id => refuse!(
            Invalid,
            "the backup {} was not taken from this source: its system identifier is {id}, the \
             source's is {source_id}; take a new pg_basebackup of the source",
            backup.display()
        ),
        _ => Ok(()),
    }
}

/// The staging port: the one asked for if free, else the first free one from 5433 up.
pub fn staging_port(asked: Option<u16>, taken: &[u16]) -> anyhow::Result<u16> {
    pg::ports::pick(asked, 5433..=6432, taken).map_err(|e| match e {
        pg::ports::PortError::InUse(p) => refusal(
            ErrorKind::Busy,
            format!(
                "port {p} is in use (by another program or another vdbfs source); pick a free one \
                 with --staging-port or leave it out to get one"
            ),
        ),
        pg::ports::PortError::NoneFree(_) => refusal(
            ErrorKind::Unavailable,
            "no free port between 5433 and 6432; pass --staging-port",
        ),
    })
}

/// The mode's required directories exist and look right.
pub fn check_dirs(mode: Mode, backup: Option<&Path>, archive: Option<&Path>) -> anyhow::Result<()> {
    match (mode, backup) {
        (Mode::BackupStream, Some(_)) => refuse!(
            Invalid,
            "--backup is for --mode stream or --mode log-shipping; in backup-stream mode vdbfs \
             takes the backup itself"
        ),
        (Mode::Stream | Mode::LogShipping, None) => refuse!(
            Invalid,
            "--mode {} needs --backup DIR: a pg_basebackup of the source (plain or tar format)",
            mode.as_str()
        ),
        (_, Some(b)) => {
            super::ingest::BackupFormat::detect(b)?;
        }
        _ => {}
    }
    match (mode, archive) {
        (Mode::LogShipping, None) => refuse!(
            Invalid,
            "--mode log-shipping needs --archive DIR: the directory the source's archive_command \
             copies WAL files to"
        ),
        (Mode::LogShipping, Some(a)) => {
            if !a.is_dir() {
                refuse!(
                    Invalid,
                    "archive directory {} does not exist; point --archive at the directory the \
                     source's archive_command writes to",
                    a.display()
                );
            }
            let segments = std::fs::read_dir(a)?
                .flatten()
                .filter(|e| pg::lsn::parse_segment(&e.file_name().to_string_lossy()).is_some())
                .count();
            if segments == 0 {
                refuse!(
                    Invalid,
                    "archive directory {} holds no WAL segment files; check archive_mode = on and \
                     archive_command on the source, and that WAL was archived (SELECT \
                     pg_switch_wal() forces one)",
                    a.display()
                );
            }
            let readable = pg::run(
                pg::as_postgres(Path::new("/usr/bin/test"))
                    .arg("-r")
                    .arg(a)
                    .args(["-a", "-x"])
                    .arg(a),
                Duration::from_secs(10),
            )
            .is_ok();
            if !readable {
                refuse!(
                    Invalid,
                    "archive directory {} is not readable by the postgres OS user, which runs \
                     restore_command; give it read access (chmod/chgrp)",
                    a.display()
                );
            }
        }
        (_, Some(_)) => refuse!(Invalid, "--archive is only for --mode log-shipping"),
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn() -> Conn {
        Conn::parse("host=127.0.0.1 port=5432 user=rep")
            .unwrap()
            .conn
    }

    #[test]
    fn psql_verbose_errors_give_their_sqlstate_and_the_plain_text() {
        let (code, text) = split_sqlstate(
            "psql: ERROR:  42710: replication slot \"s\" already exists\nLOCATION:  ReplicationSlotCreate, slot.c:289",
        );
        assert_eq!(code, Some(SqlState::DUPLICATE_OBJECT));
        assert_eq!(text, "psql: ERROR:  replication slot \"s\" already exists");
        let (code, text) = split_sqlstate("psql: error: connection refused");
        assert_eq!(
            (code, text.as_str()),
            (None, "psql: error: connection refused")
        );
    }

    #[test]
    fn libpq_errors_become_what_to_do() {
        let cases = [
            ("connection to server at \"127.0.0.1\", port 55439 failed: Connection refused\n\tIs the server running on that host and accepting TCP/IP connections?", "connection refused"),
            ("connection to server at \"127.0.0.1\", port 5432 failed: FATAL:  role \"nobody\" does not exist", "no role"),
            ("FATAL:  password authentication failed for user \"rep\"", "password authentication failed"),
            ("FATAL:  must be superuser or replication role to start walsender", "replication privilege"),
            ("FATAL:  number of requested standby connections exceeds max_wal_senders (currently 0)", "wal_level"),
            ("FATAL:  no pg_hba.conf entry for replication connection from host \"127.0.0.1\", user \"rep\", no encryption", "pg_hba.conf"),
        ];
        for (err, want) in cases {
            let msg = format!("{:#}", explain_connect_error(err, &conn()));
            assert!(msg.contains(want), "{err:?} -> {msg:?}, wanted {want:?}");
        }
    }
}
