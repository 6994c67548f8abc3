//! `source link` and its undoing: preflight, slot, staging dataset and mount, the first copy,
//! the staging standby, the first validated-sync snapshot; any failure removes all of it.
//!
//! Invariant: nothing exists before preflight passed; from the record on (`linking = true`),
//! a failure, a cancel (Ctrl-C: checked between steps, and the first copy is killed) or a
//! daemon that dies leaves what [`SourceService::teardown`] removes.

use super::service::SourceService;
use super::{health, ingest, preflight, LinkSpec, Mode, SourceDir, SourceRecord};
use crate::api::{self, refusal, ErrorKind, Progress};
use crate::pg::{self, conninfo::Conn, managed::Slot};
use crate::refuse;
use std::path::Path;
use std::time::{Duration, Instant};
use tokio_postgres::error::SqlState;

impl SourceService {
    /// Links a source; returns the message and the first snapshot.
    pub fn link(
        &self,
        spec: LinkSpec,
        progress: Progress,
    ) -> anyhow::Result<(String, api::SourceSnapshot)> {
        let name = spec.name.clone();
        crate::tree::check_dataset_name(&name)?;
        if self.is_source(&name)? {
            refuse!(
                Conflict,
                "source {name} already exists; 'vdbfs source status {name}' shows it"
            );
        }
        if self.datasets.record(&name)?.is_some() {
            refuse!(
                Conflict,
                "a dataset named {name} already exists; link the source under another name"
            );
        }
        let mode = Mode::parse(spec.mode.as_deref().unwrap_or("backup-stream"))?;
        preflight::check_dirs(mode, spec.backup.as_deref(), spec.archive.as_deref())?;
        let every = spec
            .snapshot_every
            .as_deref()
            .map(|s| crate::time::parse_interval(s, "--snapshot-every"))
            .transpose()?;
        let keep_for = spec
            .keep_for
            .as_deref()
            .map(|s| crate::time::parse_interval(s, "--keep-for"))
            .transpose()?;
        if spec.keep.is_some() && keep_for.is_some() {
            refuse!(Invalid, "give --keep N or --keep-for DURATION, not both");
        }
        if spec.keep == Some(0) {
            refuse!(Invalid, "--keep must be at least 1");
        }
        let slot = match (mode.streams(), &spec.slot) {
            (true, Some(s)) => {
                super::check_slot_name(s)?;
                Some(s.clone())
            }
            (true, None) => Some(super::default_slot(&name)),
            (false, Some(_)) => {
                refuse!(
                    Invalid,
                    "--slot is for the streaming modes, not log-shipping"
                )
            }
            (false, None) => None,
        };
        let parsed = match (&spec.conn, mode.streams()) {
            (Some(c), _) => Some(Conn::parse(c)?),
            (None, true) => refuse!(
                Invalid,
                "--mode {} needs --conn: how to reach the source, e.g. \
                 'postgresql://replicator@127.0.0.1:5432/postgres' (or PGHOST, PGPORT, PGUSER \
                 in the environment, as for psql)",
                mode.as_str()
            ),
            (None, false) => None,
        };
        let password = parsed
            .as_ref()
            .and_then(|p| p.password.clone())
            .or(spec.password.clone());
        let passfile_text = match (&spec.passfile, &password, &parsed) {
            (Some(f), _, _) => Some(
                pg::conninfo::check_passfile(f)
                    .map_err(anyhow::Error::from)
                    .and_then(|()| {
                        std::fs::read_to_string(f).map_err(|e| {
                            refusal(
                                ErrorKind::Invalid,
                                format!("cannot read the passfile {}: {e}", f.display()),
                            )
                        })
                    })?,
            ),
            (None, Some(pw), Some(p)) => Some(pg::conninfo::passfile_line(&p.conn.user, pw)),
            _ => None,
        };
        let conn = parsed.map(|p| p.conn);
        let taken = self.staging_ports()?;

        // From here on files exist: any failure removes them.
        let dir = SourceDir::new(&self.store_dir, &name);
        if dir.0.exists() {
            std::fs::remove_dir_all(&dir.0)?;
        }
        let result = (|| {
            ingest::prepare_source_dir(&dir, passfile_text.as_deref())?;
            let passfile = passfile_text.as_ref().map(|_| dir.passfile());
            let client = preflight::client_install()?;
            let facts = match &conn {
                Some(c) => {
                    progress.say(format!("checking the source {}", c.redacted()));
                    Some(preflight::probe_source(&client, c, passfile.as_deref())?)
                }
                None => None,
            };
            progress.check()?;
            let (major, version) = match (&facts, &spec.backup) {
                (Some(f), _) => (f.major, f.version.clone()),
                (None, Some(b)) => {
                    let m = ingest::BackupFormat::detect(b)?.major(b)?;
                    (m, m.to_string())
                }
                (None, None) => refuse!(Invalid, "nothing tells the source's version"),
            };
            let install = preflight::staging_install(spec.pg_bin.as_deref(), major, &version)?;
            if let (Some(f), Some(b)) = (&facts, &spec.backup) {
                preflight::check_backup_identity(&install, b, &f.system_identifier)?;
            }
            let port = preflight::staging_port(spec.staging_port, &taken)?;
            anyhow::Ok((facts, install, port))
        })();
        let (facts, install, port) = match result {
            Ok(x) => x,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir.0);
                return Err(e);
            }
        };
        let rec = SourceRecord {
            v: 1,
            name: name.clone(),
            mode,
            conn,
            has_passfile: passfile_text.is_some(),
            slot,
            archive: spec.archive.clone(),
            staging_port: port,
            install,
            data_dir: crate::mounts::mount_root(&self.store_dir)?.join(&name),
            snapshot_every_secs: every.map(|d| d.as_secs()),
            keep: spec.keep,
            keep_for_secs: keep_for.map(|d| d.as_secs()),
            enabled: true,
            linking: true,
            system_identifier: facts.as_ref().map(|f| f.system_identifier.clone()),
            created: crate::time::rfc3339_now(),
            verify: spec.verify,
        };
        let st = self.slots.state(&name);
        let _g = st.op.lock();
        let mut slot_created = false;
        let r = self.link_steps(
            &rec,
            &st,
            spec.backup.as_deref(),
            &mut slot_created,
            progress,
        );
        match r {
            Ok(snap) => Ok((
                format!(
                    "linked source {name} ({}); staging postgres on port {port}; first snapshot {}",
                    mode.as_str(),
                    snap.name
                ),
                snap,
            )),
            Err(e) => {
                progress.say(format!("link failed; removing what it made: {e:#}"));
                self.drop_prepared(&name);
                self.teardown(&rec, &st, slot_created, true, true);
                self.slots.forget(&name);
                Err(e.context(format!("linking source {name} failed and was rolled back")))
            }
        }
    }

    fn create_slot(&self, rec: &SourceRecord, slot: &str, conn: &Conn) -> anyhow::Result<()> {
        let client = preflight::client_install()?;
        preflight::replication_psql(
            &client,
            conn,
            rec.passfile(&self.store_dir).as_deref(),
            &[&format!(
                "CREATE_REPLICATION_SLOT \"{slot}\" PHYSICAL RESERVE_WAL"
            )],
        )
        .map_err(|e| {
            if preflight::has_sqlstate(&e, &SqlState::DUPLICATE_OBJECT) {
                refusal(
                    ErrorKind::Conflict,
                    format!(
                        "a replication slot named {slot} already exists on the source; pick \
                         another with --slot, or drop it there if it is unused \
                         (SELECT pg_drop_replication_slot('{slot}'))"
                    ),
                )
            } else if preflight::has_sqlstate(&e, &SqlState::CONFIGURATION_LIMIT_EXCEEDED) {
                refusal(
                    ErrorKind::Unavailable,
                    "all replication slots of the source are in use; raise \
                     max_replication_slots there (restart needed) or drop an unused slot",
                )
            } else {
                e
            }
        })?;
        Ok(())
    }

    fn link_steps(
        &self,
        rec: &SourceRecord,
        st: &Slot,
        backup: Option<&Path>,
        slot_created: &mut bool,
        progress: Progress,
    ) -> anyhow::Result<api::SourceSnapshot> {
        let store = &self.store_dir;
        let passfile = rec.passfile(store);
        if let (Some(slot), Some(conn)) = (&rec.slot, &rec.conn) {
            progress.say(format!(
                "creating the physical replication slot {slot} on the source"
            ));
            self.create_slot(rec, slot, conn)?;
            *slot_created = true;
        }
        progress.check()?;
        self.records.put(rec)?;
        self.datasets.create(&rec.name)?;
        let msg = self.mounts.mount(&rec.name, &rec.data_dir)?;
        tracing::info!("{msg}");
        pg::chown_postgres(&rec.data_dir)?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&rec.data_dir, std::fs::Permissions::from_mode(0o700))?;
        }
        let t = Instant::now();
        match (rec.mode, backup, &rec.conn, &rec.slot) {
            (Mode::BackupStream, _, Some(conn), Some(slot)) => {
                progress.say(format!(
                    "pg_basebackup from {} into the staging dataset {}",
                    conn.redacted(),
                    rec.name
                ));
                let conninfo = conn.libpq(
                    passfile.as_deref(),
                    &[("application_name", "vdbfs_basebackup")],
                );
                let pid_file = copy_pid_file(rec, &self.store_dir);
                let kill = pid_file.clone();
                progress.interruptible(
                    move || ingest::stop_leftover_copy(&kill),
                    || {
                        ingest::basebackup(
                            &rec.install,
                            &conninfo,
                            slot,
                            &rec.data_dir,
                            &format!("vdbfs link {}", rec.name),
                            &pid_file,
                            progress,
                        )
                    },
                )?;
            }
            (Mode::BackupStream, ..) => {
                refuse!(
                    Internal,
                    "a backup-stream source needs a connection and a slot"
                )
            }
            (_, Some(b), ..) => ingest::import_backup(&rec.install, b, &rec.data_dir, progress)?,
            (_, None, ..) => refuse!(Invalid, "no backup to import"),
        }
        progress.check()?;
        progress.say(format!(
            "copied in {:.1} s; configuring the staging standby",
            t.elapsed().as_secs_f64()
        ));
        ingest::configure_staging(rec, store)?;
        progress.check()?;
        progress.say(format!(
            "starting the staging standby on port {} (waits until it is consistent)",
            rec.staging_port
        ));
        self.start_staging(rec, st)?;
        if rec.mode.streams() {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                progress.check()?;
                let r = health::query_replay(&rec.cluster(store))?;
                if r.receiver.as_deref() == Some("streaming") {
                    break;
                }
                if Instant::now() > deadline {
                    refuse!(
                        Unavailable,
                        "the staging standby does not stream from the source after 60 s; staging log:\n{}",
                        rec.staging(store).log_tail(15)
                    );
                }
                std::thread::sleep(Duration::from_millis(250));
            }
        }
        progress.check()?;
        progress.say("taking the first validated-sync snapshot");
        let snap = self.validated_snapshot(rec, None)?;
        progress.check()?;
        progress.past_return(format!("source {} is linked", rec.name));
        let mut done = rec.clone();
        done.linking = false;
        self.records.put(&done)?;
        Ok(snap)
    }

    /// Undoes a link (or performs unlink): staging stopped, slot dropped (when we made it),
    /// unmounted, record and files removed; the dataset deleted when `delete_data`.
    /// Best effort: logs what it cannot undo.
    pub(super) fn teardown(
        &self,
        rec: &SourceRecord,
        st: &Slot,
        drop_slot: bool,
        delete_data: bool,
        quiet: bool,
    ) {
        ingest::stop_leftover_copy(&copy_pid_file(rec, &self.store_dir));
        self.stop_staging(rec, st);
        if drop_slot {
            if let Err(e) = self.drop_slot(rec) {
                tracing::error!(source = %rec.name, "cannot drop the replication slot: {e:#}");
            }
        }
        if let Err(e) = self.mounts.release(&rec.name, &rec.data_dir) {
            tracing::error!(source = %rec.name, "cannot unmount staging: {e:#}");
        }
        let _ = std::fs::remove_dir(&rec.data_dir);
        if delete_data {
            if let Err(e) = crate::catalog::delete_dataset(&self.datasets, &rec.name) {
                tracing::error!(source = %rec.name, "cannot delete the staging dataset: {e:#}");
            }
        }
        if let Err(e) = self.records.remove(&rec.name) {
            tracing::error!(source = %rec.name, "cannot remove the source record: {e:#}");
        }
        if let Err(e) = self.archive.remove(&crate::archive::Key::source(&rec.name)) {
            tracing::error!(source = %rec.name, "cannot remove its WAL archive: {e:#}");
        }
        let _ = std::fs::remove_dir_all(&rec.dir(&self.store_dir).0);
        if !quiet {
            tracing::info!(source = %rec.name, "unlinked");
        }
    }

    /// Drops the replication slot on the source; a slot that is gone already is fine.
    pub(super) fn drop_slot(&self, rec: &SourceRecord) -> anyhow::Result<()> {
        let (Some(slot), Some(conn)) = (&rec.slot, &rec.conn) else {
            return Ok(());
        };
        let client = preflight::client_install()?;
        preflight::replication_psql(
            &client,
            conn,
            rec.passfile(&self.store_dir).as_deref(),
            &[&format!("DROP_REPLICATION_SLOT \"{slot}\" WAIT")],
        )
        .map(|_| ())
        .or_else(|e| {
            if preflight::has_sqlstate(&e, &SqlState::UNDEFINED_OBJECT) {
                Ok(())
            } else {
                Err(e)
            }
        })
    }
}

/// Where the PID of a running first copy (pg_basebackup) is kept.
fn copy_pid_file(rec: &SourceRecord, store_dir: &std::path::Path) -> std::path::PathBuf {
    rec.dir(store_dir).0.join("copy.pid")
}
