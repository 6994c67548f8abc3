//! libpq's conventions for `vdbfs source link`, applied in the CLI because they belong to the
//! user's environment, not the daemon's: the connection parameters `--conn` does not name come
//! from `PGHOST`, `PGPORT`, `PGUSER`, `PGDATABASE` and `PGSSLMODE` (then libpq's defaults), and
//! the password from the connection string, `PGPASSWORD`, `--passfile`, `PGPASSFILE` or the
//! invoking user's `~/.pgpass`, in that order. A password file that group or others may read is
//! refused with libpq's reason.
//!
//! Differences from libpq, on purpose: the database defaults to `postgres` (a replication role
//! rarely has a database of its own); from an implicit password file (`PGPASSFILE`,
//! `~/.pgpass`) only the password libpq would pick for this source travels to the daemon, never
//! the rest of the file. Other libpq variables (`PGSSLROOTCERT`, `PGCONNECT_TIMEOUT`, ...) do
//! not reach the staging standby, which the daemon runs.

use crate::api::{ErrorKind, Refusal};
use crate::pg::conninfo::quote_value as quote;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The variables that decide a source connection.
const VARS: [&str; 8] = [
    "PGHOST",
    "PGPORT",
    "PGUSER",
    "PGDATABASE",
    "PGSSLMODE",
    "PGPASSWORD",
    "PGPASSFILE",
    "HOME",
];

/// Where libpq looks for the server's socket when no host is given (Debian's build).
pub const DEFAULT_SOCKET_DIR: &str = "/var/run/postgresql";

/// The libpq-relevant part of an environment (the process's, or a test's).
#[derive(Debug, Default, Clone)]
pub struct Env {
    vars: BTreeMap<String, String>,
    /// The invoking OS user's name and home directory (libpq's defaults for user and HOME).
    pub os_user: Option<String>,
    pub os_home: Option<PathBuf>,
}

impl Env {
    pub fn from_process() -> Env {
        let (os_user, os_home) = current_user();
        Env {
            vars: VARS
                .iter()
                .filter_map(|k| Some((k.to_string(), std::env::var(k).ok()?)))
                .collect(),
            os_user,
            os_home,
        }
    }

    /// For tests: exactly these variables.
    #[cfg(test)]
    pub fn with(vars: &[(&str, &str)]) -> Env {
        Env {
            vars: vars
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            os_user: Some("osuser".into()),
            os_home: None,
        }
    }

    /// A variable that is set and not empty (libpq ignores empty ones).
    fn get(&self, k: &str) -> Option<&str> {
        self.vars
            .get(k)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    fn home(&self) -> Option<PathBuf> {
        self.get("HOME").map(PathBuf::from).or(self.os_home.clone())
    }
}

/// The name and home directory of the effective user.
fn current_user() -> (Option<String>, Option<PathBuf>) {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    match passwd_entry(uid) {
        Some((name, home)) => (Some(name), Some(home)),
        None => (None, None),
    }
}

/// The passwd entry of `uid`: (name, home directory).
pub(crate) fn passwd_entry(uid: u32) -> Option<(String, PathBuf)> {
    use std::ffi::CStr;
    use std::os::unix::ffi::OsStrExt;
    let mut buf = vec![0u8; 16 * 1024];
    // SAFETY: a zeroed passwd is a valid value for getpwuid_r to overwrite.
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut out: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call and buf outlives the reads below.
    let rc =
        unsafe { libc::getpwuid_r(uid, &mut pw, buf.as_mut_ptr().cast(), buf.len(), &mut out) };
    if rc != 0 || out.is_null() || pw.pw_name.is_null() || pw.pw_dir.is_null() {
        return None;
    }
    // SAFETY: getpwuid_r succeeded: both fields point to NUL-terminated strings inside buf.
    let (name, dir) = unsafe { (CStr::from_ptr(pw.pw_name), CStr::from_ptr(pw.pw_dir)) };
    Some((
        name.to_string_lossy().into_owned(),
        PathBuf::from(std::ffi::OsStr::from_bytes(dir.to_bytes())),
    ))
}

/// What `source link` sends: the connection string with the environment's parameters in it,
/// and the password or the password file to use.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Resolved {
    pub conn: Option<String>,
    /// From `PGPASSWORD`, or picked from `PGPASSFILE` / `~/.pgpass`.
    pub password: Option<String>,
    /// `--passfile`, checked: the daemon keeps a copy of it.
    pub passfile: Option<PathBuf>,
}

fn invalid(message: String) -> anyhow::Error {
    Refusal::new(ErrorKind::Invalid, message).into()
}

/// Applies libpq's environment to `--conn` (and `--passfile`). `needs_conn` is false for a
/// mode that needs no connection (log-shipping): then the environment alone makes none.
pub fn resolve(
    conn: Option<&str>,
    passfile: Option<&Path>,
    needs_conn: bool,
    env: &Env,
) -> anyhow::Result<Resolved> {
    let from_env = ["PGHOST", "PGPORT", "PGUSER", "PGDATABASE"]
        .iter()
        .any(|k| env.get(k).is_some());
    let mut out = Resolved {
        password: env.get("PGPASSWORD").map(str::to_string),
        ..Resolved::default()
    };
    // Checked even when a password makes it unneeded: the user named it.
    if let Some(f) = passfile {
        crate::pg::conninfo::check_passfile(f)?;
    }
    let given = passfile.map(Path::to_path_buf);
    if conn.is_none() && !(needs_conn && from_env) {
        out.passfile = given.filter(|_| out.password.is_none());
        return Ok(out);
    }
    let text = conn.unwrap_or("");
    // A string libpq would not take is passed on as it is: the daemon says what is wrong.
    let Ok(cfg) = text.parse::<tokio_postgres::Config>() else {
        out.conn = conn.map(str::to_string);
        out.passfile = given;
        return Ok(out);
    };
    let host = match cfg.get_hosts() {
        [] => env.get("PGHOST").unwrap_or(DEFAULT_SOCKET_DIR).to_string(),
        [tokio_postgres::config::Host::Tcp(h)] => h.clone(),
        [tokio_postgres::config::Host::Unix(p)] => p.to_string_lossy().into_owned(),
        // Several hosts: the daemon refuses them with its own message.
        _ => {
            out.conn = conn.map(str::to_string);
            return Ok(out);
        }
    };
    let port = match cfg.get_ports().first() {
        Some(p) => *p,
        None => match env.get("PGPORT") {
            Some(p) => p.parse::<u16>().map_err(|_| {
                invalid(format!(
                    "PGPORT={p:?} is not a port number; set it to the source's port (e.g. 5432) \
                     or unset it"
                ))
            })?,
            None => 5432,
        },
    };
    let user = match cfg.get_user() {
        Some(u) => u.to_string(),
        None => env
            .get("PGUSER")
            .map(str::to_string)
            .or(env.os_user.clone())
            .ok_or_else(|| invalid("no user to connect as: name one in --conn or PGUSER".into()))?,
    };
    let dbname = cfg
        .get_dbname()
        .or(env.get("PGDATABASE"))
        .unwrap_or("postgres")
        .to_string();
    let sslmode = if text.contains("sslmode") {
        None // --conn names it: it stays in the string as given
    } else {
        match env.get("PGSSLMODE") {
            None => None,
            Some(m @ ("disable" | "prefer" | "require")) => Some(m.to_string()),
            Some(m) => {
                return Err(invalid(format!(
                    "PGSSLMODE={m}: vdbfs connects to a source with sslmode disable, prefer \
                     or require; set one of those or unset it"
                )))
            }
        }
    };
    let mut parts = vec![
        format!("host={}", quote(&host)),
        format!("port={port}"),
        format!("user={}", quote(&user)),
        format!("dbname={}", quote(&dbname)),
    ];
    match (sslmode, cfg.get_ssl_mode(), text.contains("sslmode")) {
        (Some(m), _, _) => parts.push(format!("sslmode={m}")),
        (None, mode, true) => parts.push(
            match mode {
                tokio_postgres::config::SslMode::Disable => "sslmode=disable",
                tokio_postgres::config::SslMode::Require => "sslmode=require",
                _ => "sslmode=prefer",
            }
            .to_string(),
        ),
        _ => {}
    }
    let conn_password = cfg
        .get_password()
        .map(|p| String::from_utf8_lossy(p).into_owned());
    if let Some(pw) = &conn_password {
        parts.push(format!("password={}", quote(pw)));
    }
    out.conn = Some(parts.join(" "));
    // As in libpq, a password in the connection string or PGPASSWORD means no file is read.
    if conn_password.is_none() && out.password.is_none() {
        match given {
            Some(f) => out.passfile = Some(f),
            None => out.password = implicit_passfile_password(env, &host, port, &dbname, &user)?,
        }
    }
    Ok(out)
}

/// The password libpq would take from `PGPASSFILE` or `~/.pgpass` (when the file exists) for
/// this connection: the first matching line for the database, else for `replication` (the
/// physical replication connections vdbfs also makes).
fn implicit_passfile_password(
    env: &Env,
    host: &str,
    port: u16,
    dbname: &str,
    user: &str,
) -> anyhow::Result<Option<String>> {
    let path = match env.get("PGPASSFILE") {
        Some(p) => PathBuf::from(p),
        None => match env.home() {
            Some(h) => h.join(".pgpass"),
            None => return Ok(None),
        },
    };
    if !path.exists() {
        return Ok(None);
    }
    crate::pg::conninfo::check_passfile(&path)?;
    let text = std::fs::read_to_string(&path).map_err(|e| {
        invalid(format!(
            "cannot read the password file {}: {e}",
            path.display()
        ))
    })?;
    // libpq matches a socket connection against "localhost".
    let host = if host.starts_with('/') || host.starts_with('@') {
        "localhost"
    } else {
        host
    };
    let port = port.to_string();
    Ok(passfile_lookup(&text, host, &port, dbname, user)
        .or_else(|| passfile_lookup(&text, host, &port, "replication", user)))
}

/// libpq's passfile lookup: lines `host:port:database:user:password`, `*` matching anything,
/// `\:` and `\\` escapes, `#` comments; the first matching line wins.
pub fn passfile_lookup(
    text: &str,
    host: &str,
    port: &str,
    dbname: &str,
    user: &str,
) -> Option<String> {
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let fields = split_fields(line);
        if fields.len() < 5 {
            continue;
        }
        let ok = |f: &str, v: &str| f == "*" || f == v;
        if ok(&fields[0], host)
            && ok(&fields[1], port)
            && ok(&fields[2], dbname)
            && ok(&fields[3], user)
        {
            // The password is the rest of the line, colons included.
            return Some(fields[4..].join(":"));
        }
    }
    None
}

fn split_fields(line: &str) -> Vec<String> {
    let mut fields = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let (Some(n), Some(f)) = (chars.next(), fields.last_mut()) {
                    f.push(n);
                }
            }
            ':' => fields.push(String::new()),
            c => {
                if let Some(f) = fields.last_mut() {
                    f.push(c);
                }
            }
        }
    }
    fields
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn conn(r: &Resolved) -> &str {
        r.conn.as_deref().unwrap_or("")
    }

    #[test]
    fn the_environment_fills_what_conn_does_not_name() {
        let env = Env::with(&[
            ("PGHOST", "db.example"),
            ("PGPORT", "5544"),
            ("PGUSER", "rep"),
            ("PGDATABASE", "app"),
            ("PGSSLMODE", "require"),
        ]);
        let r = resolve(None, None, true, &env).unwrap();
        assert_eq!(
            conn(&r),
            "host=db.example port=5544 user=rep dbname=app sslmode=require"
        );
        // --conn wins for what it names.
        let r = resolve(Some("host=10.0.0.1 user=other"), None, true, &env).unwrap();
        assert_eq!(
            conn(&r),
            "host=10.0.0.1 port=5544 user=other dbname=app sslmode=require"
        );
        let r = resolve(
            Some("postgresql://u:pw@h:1/d?sslmode=disable"),
            None,
            true,
            &env,
        )
        .unwrap();
        assert_eq!(
            conn(&r),
            "host=h port=1 user=u dbname=d sslmode=disable password=pw"
        );
    }

    #[test]
    fn libpq_defaults_apply_once_any_variable_is_set() {
        let r = resolve(None, None, true, &Env::with(&[("PGPORT", "5433")])).unwrap();
        assert_eq!(
            conn(&r),
            "host=/var/run/postgresql port=5433 user=osuser dbname=postgres"
        );
        // Nothing set and no --conn: no connection (the daemon asks for --conn).
        assert_eq!(
            resolve(None, None, true, &Env::with(&[])).unwrap().conn,
            None
        );
        // A mode that needs no connection does not make one from the environment.
        let r = resolve(None, None, false, &Env::with(&[("PGHOST", "h")])).unwrap();
        assert_eq!(r.conn, None);
    }

    #[test]
    fn bad_environment_values_are_refused_by_name() {
        let e = resolve(None, None, true, &Env::with(&[("PGPORT", "x")])).unwrap_err();
        assert!(e.to_string().contains("PGPORT=\"x\""), "{e}");
        let e = resolve(
            Some("host=h user=u"),
            None,
            true,
            &Env::with(&[("PGSSLMODE", "verify-full")]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("PGSSLMODE=verify-full"), "{e}");
    }

    #[test]
    fn passwords_come_in_libpq_order() {
        let dir = tempfile::tempdir().unwrap();
        let pgpass = dir.path().join(".pgpass");
        std::fs::write(
            &pgpass,
            "# comment\nother:*:*:rep:nope\n127.0.0.1:5432:replication:rep:repl\\:pw\n\
             localhost:*:*:rep:sock\n",
        )
        .unwrap();
        std::fs::set_permissions(&pgpass, std::fs::Permissions::from_mode(0o600)).unwrap();
        let home = dir.path().to_str().unwrap();
        let env = Env::with(&[("HOME", home), ("PGUSER", "rep"), ("PGHOST", "127.0.0.1")]);
        let r = resolve(None, None, true, &env).unwrap();
        assert_eq!(r.password.as_deref(), Some("repl:pw"), "~/.pgpass");
        // A socket connection matches "localhost".
        let r = resolve(Some("host=/tmp user=rep"), None, true, &env).unwrap();
        assert_eq!(r.password.as_deref(), Some("sock"));
        // PGPASSWORD comes before the file, the connection string before both.
        let env2 = Env::with(&[("HOME", home), ("PGUSER", "rep"), ("PGPASSWORD", "env")]);
        assert_eq!(
            resolve(None, None, true, &env2)
                .unwrap()
                .password
                .as_deref(),
            Some("env")
        );
        let r = resolve(Some("postgresql://rep:url@127.0.0.1/x"), None, true, &env).unwrap();
        assert_eq!(r.password, None);
        assert!(conn(&r).contains("password=url"));
        // --passfile comes after both, before PGPASSFILE and ~/.pgpass.
        let r = resolve(None, Some(&pgpass), true, &env2).unwrap();
        assert_eq!((r.password.as_deref(), r.passfile), (Some("env"), None));
        let r = resolve(None, Some(&pgpass), true, &env).unwrap();
        assert_eq!(
            (r.password, r.passfile.as_deref()),
            (None, Some(pgpass.as_path()))
        );
        // PGPASSFILE replaces ~/.pgpass; a missing file is no password, as in libpq.
        let env3 = Env::with(&[
            ("HOME", home),
            ("PGUSER", "rep"),
            ("PGPASSFILE", "/nonexistent/pgpass"),
        ]);
        assert_eq!(resolve(None, None, true, &env3).unwrap().password, None);
    }

    #[test]
    fn a_passfile_others_can_read_is_refused_with_libpqs_reason() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pgpass");
        std::fs::write(&f, "*:*:*:rep:pw\n").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        let env = Env::with(&[("PGUSER", "rep")]);
        let e = resolve(Some("host=h"), Some(&f), true, &env).unwrap_err();
        assert!(
            e.to_string()
                .contains("has group or world access; permissions should be u=rw (0600) or less"),
            "{e}"
        );
        let env = Env::with(&[("PGUSER", "rep"), ("PGPASSFILE", f.to_str().unwrap())]);
        assert!(resolve(Some("host=h"), None, true, &env).is_err());
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        let r = resolve(Some("host=h"), None, true, &env).unwrap();
        assert_eq!(r.password.as_deref(), Some("pw"));
        let e = crate::pg::conninfo::check_passfile(dir.path()).unwrap_err();
        assert!(e.to_string().contains("is not a plain file"), "{e}");
    }

    #[test]
    fn passfile_fields_unescape() {
        assert_eq!(
            passfile_lookup("h\\:x:*:*:u:a\\\\b:c\n", "h:x", "1", "d", "u").as_deref(),
            Some("a\\b:c")
        );
        assert_eq!(passfile_lookup("h:*:*:u\n", "h", "1", "d", "u"), None);
    }
}
