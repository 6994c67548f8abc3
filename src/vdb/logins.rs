//! Who can log in to a VDB over TCP: its owner's login role (`vdb create --user NAME
//! [--password-file F]`), and production's roles only with `--keep-source-logins`.
//!
//! A VDB made without `--keep-source-logins` carries production's roles, but their passwords
//! are removed (`ALTER ROLE .. PASSWORD NULL`) at every start, before TCP is opened: the VDB's
//! `pg_hba.conf` rejects every TCP connection while postgres starts, and only after the roles
//! are set does it allow `scram-sha-256` again (reloaded). A refresh brings production's
//! verifiers back with the data, and the next start removes them again.
//!
//! The owner's password never reaches postgres or a record: vdbfs computes its SCRAM-SHA-256
//! verifier (RFC 5802/7677, as PostgreSQL stores it) and keeps only that.
//!
//! Invariants: the unix socket (`local all all trust`, a 0700 directory) is untouched, so root,
//! the daemon and hooks always get in; a start whose roles cannot be set fails, leaving TCP
//! closed.

use super::VdbRecord;
use crate::pg::{conf, RunFiles};
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::Path;
use std::time::Duration;

/// A VDB's logins, as recorded.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Logins {
    /// The owner's login role, and its SCRAM verifier.
    pub user: Option<String>,
    pub verifier: Option<String>,
    /// Production's roles keep their passwords.
    pub keep_source_logins: bool,
}

/// PostgreSQL's iteration count for SCRAM verifiers (`scram_iterations`' default).
const ITERATIONS: u32 = 4096;

/// The SCRAM-SHA-256 verifier of `password` with `salt`, in PostgreSQL's `rolpassword` form:
/// `SCRAM-SHA-256$ITER:SALT$STOREDKEY:SERVERKEY` (base64).
pub fn scram_verifier(password: &str, salt: &[u8]) -> String {
    let mut salted = [0u8; 32];
    pbkdf2::pbkdf2_hmac::<Sha256>(password.as_bytes(), salt, ITERATIONS, &mut salted);
    let hmac = |key: &[u8], msg: &[u8]| -> Vec<u8> {
        // HMAC takes a key of any length: new_from_slice cannot fail for it.
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key)
            .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
        m.update(msg);
        m.finalize().into_bytes().to_vec()
    };
    let client_key = hmac(&salted, b"Client Key");
    let stored_key = Sha256::digest(&client_key);
    let server_key = hmac(&salted, b"Server Key");
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    format!(
        "SCRAM-SHA-256${ITERATIONS}:{}${}:{}",
        b64(salt),
        b64(&stored_key),
        b64(&server_key)
    )
}

fn random(n: usize) -> anyhow::Result<Vec<u8>> {
    let mut b = vec![0u8; n];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(b)
}

/// A new password: 24 characters from [A-Za-z0-9].
pub fn new_password() -> anyhow::Result<String> {
    const ALPHABET: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz23456789";
    Ok(random(24)?
        .into_iter()
        .map(|b| ALPHABET[b as usize % ALPHABET.len()] as char)
        .collect())
}

/// The verifier of `password` with a fresh salt.
pub fn verifier(password: &str) -> anyhow::Result<String> {
    Ok(scram_verifier(password, &random(16)?))
}

fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

fn ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// The SQL that sets a VDB's roles: production's passwords removed (unless kept), the owner's
/// role made or updated.
pub fn sql(l: &Logins) -> String {
    let mut sql = String::new();
    if !l.keep_source_logins {
        let keep = l
            .user
            .as_deref()
            .map(literal)
            .unwrap_or_else(|| "''".into());
        sql.push_str(&format!(
            "DO $vdbfs$ DECLARE r record; BEGIN \
             FOR r IN SELECT rolname FROM pg_authid WHERE rolpassword IS NOT NULL AND rolname <> {keep} LOOP \
             EXECUTE format('ALTER ROLE %I PASSWORD NULL', r.rolname); END LOOP; END $vdbfs$;"
        ));
    }
    if let (Some(user), Some(v)) = (&l.user, &l.verifier) {
        sql.push_str(&format!(
            "DO $vdbfs$ BEGIN \
             IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = {u} AND rolsuper) THEN \
             RAISE EXCEPTION 'role % is a superuser in the VDB; pick another --user', {u}; END IF; \
             IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = {u}) THEN \
             CREATE ROLE {i} LOGIN; END IF; END $vdbfs$; \
             ALTER ROLE {i} LOGIN CREATEDB PASSWORD {v}; \
             GRANT pg_read_all_data, pg_write_all_data TO {i};",
            u = literal(user),
            i = ident(user),
            v = literal(v),
        ));
    }
    sql
}

/// The VDB's `pg_hba.conf`: the unix socket trusted (its directory is 0700), loopback TCP with
/// `scram-sha-256` when `tcp_open`, else rejected.
pub fn hba(tcp_open: bool) -> String {
    let method = if tcp_open { "scram-sha-256" } else { "reject" };
    format!(
        "# vdbfs VDB access. The socket directory is 0700 (owner postgres): only root and the\n\
         # postgres OS user reach it. Over loopback TCP: the owner's login (vdb create --user),\n\
         # production's only with --keep-source-logins; closed while a start sets the roles.\n\
         local all all trust\n\
         host all all 127.0.0.1/32 {method}\n\
         host all all ::1/128 {method}\n"
    )
}

/// Whether vdbfs manages the VDB's logins (VDBs made before it did keep what they had).
pub fn managed(rec: &VdbRecord) -> bool {
    rec.logins.is_some()
}

/// Before a start: TCP closed.
pub fn close_tcp(rec: &VdbRecord, store: &Path) -> anyhow::Result<()> {
    if !managed(rec) {
        return Ok(());
    }
    conf::write_atomic(&rec.dir(store).hba(), hba(false).as_bytes(), 0o600)
}

/// After a start: the roles set, then TCP opened (pg_hba reloaded).
pub fn apply(rec: &VdbRecord, store: &Path) -> anyhow::Result<()> {
    let Some(l) = &rec.logins else {
        return Ok(());
    };
    let cluster = rec.cluster(store);
    let timeout = Duration::from_secs(30);
    let sql = sql(l);
    if !sql.is_empty() {
        cluster
            .query(&sql, timeout)
            .map_err(|e| e.context(format!("cannot set the logins of VDB {}", rec.name)))?;
    }
    conf::write_atomic(&rec.dir(store).hba(), hba(true).as_bytes(), 0o600)?;
    cluster
        .query("SELECT pg_reload_conf()", timeout)
        .map_err(|e| e.context(format!("cannot reload pg_hba.conf of VDB {}", rec.name)))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The verifier's form (a real server accepting it is tests/http.rs' credential test).
    #[test]
    fn the_verifier_has_postgres_form() {
        let v = scram_verifier("pencil", b"0123456789abcdef");
        let (head, keys) = v.split_once('$').unwrap().1.split_once('$').unwrap();
        assert_eq!(head, "4096:MDEyMzQ1Njc4OWFiY2RlZg==");
        let (stored, server) = keys.split_once(':').unwrap();
        assert_eq!(stored.len(), 44);
        assert_eq!(server.len(), 44);
        assert_ne!(v, scram_verifier("pencil", b"0123456789abcdeg"));
        let sql = sql(&Logins {
            user: Some("al'ice".into()),
            verifier: Some(v.clone()),
            keep_source_logins: false,
        });
        assert!(sql.contains("rolname <> 'al''ice'") && sql.contains("\"al'ice\""));
        assert!(!sql.contains("pencil"));
        assert!(hba(false).contains("127.0.0.1/32 reject"));
    }
}
