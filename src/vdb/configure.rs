//! Provisioning configuration: what turns a cloned data directory into the VDB's own primary
//! (see [`configure`]), its archiving into the store, and `postgres -C`'s check of the result.
//! How the first start recovers is `pg::provision`'s.
//!
//! Invariants: every setting vdbfs manages is written to `postgresql.auto.conf` on each
//! provision, refresh and rewind (the user's `--set` values last, so they win).

use super::{VdbDir, VdbRecord};
use crate::pg::provision::{self, FirstStart};
use crate::pg::{self, conf, RunFiles};
use crate::refuse;
use std::path::Path;
use std::time::Duration;

/// Creates `STORE/vdbs/NAME/` (owner postgres, 0700) with its socket dir, pg_hba and pg_ident,
/// and the directory where the daemon acknowledges its archived WAL.
pub fn prepare_dir(dir: &VdbDir) -> anyhow::Result<()> {
    dir.create(&super::logins::hba(true))?;
    crate::archive::make_ack_dir(&dir.wal_acks())
}

/// Makes a cloned data directory the VDB's primary: no standby or recovery state from its parent,
/// no replication slots, the VDB's port, sockets, access files and name, its WAL archived into
/// the store, the first start `start` (see `pg::provision`), then the user's settings.
pub fn configure(
    rec: &VdbRecord,
    store: &Path,
    start: &FirstStart,
    fresh_clone: bool,
) -> anyhow::Result<()> {
    let data = &rec.data_dir;
    let dir = rec.dir(store);
    if !data.join("PG_VERSION").exists() {
        refuse!(
            Invalid,
            "{} is not a PostgreSQL data directory (no PG_VERSION): the snapshot {} does not hold a database",
            data.display(),
            rec.parent
        );
    }
    pg::remove_run_files(data);
    for f in ["standby.signal", "recovery.signal"] {
        let _ = std::fs::remove_file(data.join(f));
    }
    if fresh_clone {
        // Slots copied with the data directory belong to the parent's replicas, not the VDB's;
        // left in place they would hold WAL forever.
        if let Ok(rd) = std::fs::read_dir(data.join("pg_replslot")) {
            for e in rd.flatten() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    if !data.join("postgresql.conf").exists() {
        conf::write_atomic(
            &data.join("postgresql.conf"),
            b"# created by vdbfs: the source kept its configuration outside the data directory\n",
            0o600,
        )?;
    }
    crate::archive::make_ack_dir(&dir.wal_acks())?;
    let s = |v: &str| Some(v.to_string());
    let mut settings = dir.own_settings(rec.port, format!("vdbfs-{}", rec.name));
    settings.extend([
        ("primary_conninfo", None),
        ("primary_slot_name", None),
        ("hot_standby_feedback", None),
        // A VDB archives into the store only (its own history, for `vdb rewind --at`): never
        // into the source's archive. Nor does it wait for the source's synchronous standbys.
        ("archive_mode", s("on")),
        (
            "archive_command",
            Some(crate::archive::archive_command(&dir.wal_acks())),
        ),
        ("archive_library", None),
        ("synchronous_standby_names", s("")),
        ("wal_receiver_status_interval", None),
    ]);
    settings.extend(provision::first_start(data, &rec.cluster(store), start)?);
    let user: Vec<(String, Option<String>)> = rec
        .settings
        .iter()
        .map(|(k, v)| (k.clone(), Some(v.clone())))
        .collect();
    settings.extend(user.iter().map(|(k, v)| (k.as_str(), v.clone())));
    conf::edit_auto_conf(data, &settings)
}

/// After the provisioning start: the VDB is a primary; its recovery settings go (a key the
/// user set with --set keeps the user's value).
pub fn clear_recovery(rec: &VdbRecord) -> anyhow::Result<()> {
    provision::clear_recovery(&rec.data_dir, &|k| {
        rec.settings
            .iter()
            .rev()
            .find(|(uk, _)| uk == k)
            .map(|(_, v)| v.clone())
    })
}

/// Lets postgres check the configuration (`postgres -C port`): a bad `--set` value or an unknown
/// parameter is refused here, with postgres's own words, before anything starts.
pub fn check_config(rec: &VdbRecord) -> anyhow::Result<()> {
    let out = pg::run_unchecked(
        pg::as_postgres(&rec.install.bin("postgres"))
            .arg("-D")
            .arg(&rec.data_dir)
            .args(["-C", "port"]),
        Duration::from_secs(60),
        |_| {},
    )?;
    if !out.status.success() {
        let text = out.stderr_text();
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                l.split_once("] ")
                    .map_or(l, |(_, rest)| rest)
                    .trim_start_matches("postgres: ")
            })
            .collect();
        refuse!(
            Invalid,
            "postgres refuses the VDB's configuration:\n{}",
            pg::last_lines(&lines.join("\n"), 8)
        );
    }
    Ok(())
}
