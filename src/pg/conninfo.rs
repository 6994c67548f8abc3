//! Connection strings to a source: parsed from a libpq URL or `key=value` string, kept and shown
//! without the password, which lives only in a passfile (mode 0600) that libpq reads.
//!
//! Invariant: [`Conn::libpq`] and [`Conn::redacted`] never contain a password.

use anyhow::{anyhow, bail};
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Conn {
    /// Host name, IP address, or a unix socket directory (starts with '/').
    pub host: String,
    pub port: u16,
    pub user: String,
    pub dbname: String,
    pub sslmode: Option<String>,
}

/// A parsed connection string and the password it carried, if any.
pub struct Parsed {
    pub conn: Conn,
    pub password: Option<String>,
}

/// A libpq `key=value` value, quoted when it must be.
pub(crate) fn quote_value(v: &str) -> String {
    if !v.is_empty()
        && v.chars()
            .all(|c| !c.is_whitespace() && c != '\'' && c != '\\')
    {
        v.to_string()
    } else {
        format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"))
    }
}

impl Conn {
    /// Parses a libpq URL (`postgresql://user:pw@host:port/db`) or `key=value` string.
    pub fn parse(s: &str) -> anyhow::Result<Parsed> {
        let cfg: tokio_postgres::Config = s.parse().map_err(|e| {
            anyhow!(
                "--conn is not a valid connection string ({e}); use \
                 'postgresql://USER@HOST:PORT/DBNAME' or 'host=HOST port=PORT user=USER'"
            )
        })?;
        let host = match cfg.get_hosts() {
            [] => bail!("--conn names no host; add host=HOST (e.g. host=127.0.0.1)"),
            [tokio_postgres::config::Host::Tcp(h)] => h.clone(),
            [tokio_postgres::config::Host::Unix(p)] => p.to_string_lossy().to_string(),
            _ => bail!("--conn names several hosts; give the one source to copy"),
        };
        let port = cfg.get_ports().first().copied().unwrap_or(5432);
        let user = cfg
            .get_user()
            .ok_or_else(|| {
                anyhow!("--conn names no user; add user=NAME (a role with REPLICATION)")
            })?
            .to_string();
        let dbname = cfg.get_dbname().unwrap_or("postgres").to_string();
        let sslmode = if s.contains("sslmode") {
            Some(
                match cfg.get_ssl_mode() {
                    tokio_postgres::config::SslMode::Disable => "disable",
                    tokio_postgres::config::SslMode::Require => "require",
                    _ => "prefer",
                }
                .to_string(),
            )
        } else {
            None
        };
        let password = cfg
            .get_password()
            .map(|p| String::from_utf8_lossy(p).to_string());
        Ok(Parsed {
            conn: Conn {
                host,
                port,
                user,
                dbname,
                sslmode,
            },
            password,
        })
    }

    /// A libpq `key=value` string (no password; `passfile` when given).
    pub fn libpq(&self, passfile: Option<&Path>, extra: &[(&str, &str)]) -> String {
        let mut parts = vec![
            format!("host={}", quote_value(&self.host)),
            format!("port={}", self.port),
            format!("user={}", quote_value(&self.user)),
        ];
        if let Some(m) = &self.sslmode {
            parts.push(format!("sslmode={m}"));
        }
        if let Some(p) = passfile {
            parts.push(format!("passfile={}", quote_value(&p.to_string_lossy())));
        }
        for (k, v) in extra {
            parts.push(format!("{k}={}", quote_value(v)));
        }
        parts.join(" ")
    }

    /// For display: `user@host:port/dbname`.
    pub fn redacted(&self) -> String {
        format!("{}@{}:{}/{}", self.user, self.host, self.port, self.dbname)
    }
}

/// libpq ignores a password file that is not a plain file, or that group or others may read
/// or write (`passwordFromFile` in fe-connect.c, with a warning); vdbfs refuses one, with
/// libpq's reason, so a password is never taken from a file others can read.
pub fn check_passfile(path: &Path) -> Result<(), crate::api::Refusal> {
    use crate::api::{ErrorKind, Refusal};
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::metadata(path).map_err(|e| {
        Refusal::new(
            ErrorKind::Invalid,
            format!("cannot read the passfile {}: {e}", path.display()),
        )
    })?;
    if !md.is_file() {
        return Err(Refusal::new(
            ErrorKind::Invalid,
            format!("password file \"{}\" is not a plain file", path.display()),
        ));
    }
    if md.mode() & 0o077 != 0 {
        return Err(Refusal::new(
            ErrorKind::Invalid,
            format!(
                "password file \"{}\" has group or world access; permissions should be u=rw \
                 (0600) or less",
                path.display()
            ),
        )
        .with_hint(format!(
            "libpq ignores such a file; chmod 0600 {}",
            path.display()
        )));
    }
    Ok(())
}

/// One passfile line matching any host, port and database for `user`.
pub fn passfile_line(user: &str, password: &str) -> String {
    let esc = |s: &str| s.replace('\\', "\\\\").replace(':', "\\:");
    format!("*:*:*:{}:{}\n", esc(user), esc(password))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_and_keyword_forms_parse_and_never_keep_the_password() {
        let p = Conn::parse("postgresql://rep:s3cr%3At@127.0.0.1:5544/app").unwrap();
        assert_eq!(p.password.as_deref(), Some("s3cr:t"));
        assert_eq!(p.conn.port, 5544);
        assert_eq!(p.conn.dbname, "app");
        let s = p
            .conn
            .libpq(Some(Path::new("/x/pg pass")), &[("application_name", "a")]);
        assert!(!s.contains("s3cr"), "{s}");
        assert!(s.contains("passfile='/x/pg pass'"), "{s}");
        assert!(!p.conn.redacted().contains("s3cr"));

        let k = Conn::parse("host=127.0.0.1 port=5433 user=rep password=pw").unwrap();
        assert_eq!(k.password.as_deref(), Some("pw"));
        assert_eq!(k.conn.dbname, "postgres");
        assert!(Conn::parse("host=127.0.0.1 port=5433").is_err());
        assert_eq!(passfile_line("u", "a:b\\c"), "*:*:*:u:a\\:b\\\\c\n");
    }
}
