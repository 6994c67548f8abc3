//! The daemon's side of dSources: link, status, validated-sync snapshots, disable/enable,
//! unlink, and the supervisor that keeps every enabled staging standby running, takes policy
//! snapshots and prunes by retention.
//!
//! Invariants: one operation at a time per source (`Slot::op`; the supervisor only
//! try-locks it); a source record with `linking = true` found at start is rolled back; the
//! staging postgres is stopped before its mount goes away.

use super::api::{self, SourceStatus};
use super::supervision::Slot;
use super::Daemon;
use crate::pg::{self, conninfo::Conn};
use crate::source::{
    self, health, ingest, preflight, LinkSpec, Mode, SnapshotProps, SourceDir, SourceRecord,
};
use crate::store::SOURCES;
use anyhow::{anyhow, bail, Context};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a staging standby may take to start (replaying the WAL of a big backup).
const START_TIMEOUT: Duration = Duration::from_secs(600);
/// A freshly started standby is not reported as broken for this long.
const STREAM_GRACE: Duration = Duration::from_secs(20);
/// How long an on-demand snapshot waits for staging to replay the source's current position.
const CATCH_UP_WAIT: Duration = Duration::from_secs(60);

/// Progress lines for the CLI (stderr).
pub type Progress<'a> = &'a dyn Fn(String);

impl Daemon {
    // ---- records -------------------------------------------------------------------------

    pub(super) fn source_records(&self) -> anyhow::Result<Vec<SourceRecord>> {
        self.json_records(SOURCES, "source")
    }

    fn source_record(&self, name: &str) -> anyhow::Result<SourceRecord> {
        self.json_record(SOURCES, name)?.ok_or_else(|| {
            anyhow!("no source {name}; 'vdbfs source list' shows the linked sources")
        })
    }

    fn save_source(&self, rec: &SourceRecord) -> anyhow::Result<()> {
        self.save_json(SOURCES, &rec.name, rec)
    }

    fn remove_source(&self, name: &str) -> anyhow::Result<()> {
        self.remove_json(SOURCES, name)
    }

    fn pid_file(&self, rec: &SourceRecord) -> PathBuf {
        rec.dir(&self.store_dir).0.join("staging.pid")
    }

    // ---- staging postgres ----------------------------------------------------------------

    /// Starts the staging standby (stopping a leftover of an earlier daemon first).
    fn start_staging(&self, rec: &SourceRecord, st: &Slot) -> anyhow::Result<i32> {
        let cluster = rec.cluster(&self.store_dir);
        cluster.stop_any(None, pg::read_pid(&self.pid_file(rec)), &rec.name);
        if !rec.data_dir.join("PG_VERSION").exists() {
            bail!(
                "the staging data directory {} is not mounted or empty",
                rec.data_dir.display()
            );
        }
        let pid = cluster.start(START_TIMEOUT)?;
        std::fs::write(self.pid_file(rec), format!("{pid}\n"))?;
        st.rt.lock().running(pid);
        tracing::info!(source = %rec.name, pid, port = rec.staging_port, "staging postgres running");
        Ok(pid)
    }

    fn stop_staging(&self, rec: &SourceRecord, st: &Slot) {
        let ours = st.rt.lock().pid.take();
        rec.cluster(&self.store_dir)
            .stop_any(ours, pg::read_pid(&self.pid_file(rec)), &rec.name);
        let _ = std::fs::remove_file(self.pid_file(rec));
        st.rt.lock().started = None;
    }

    /// Stops every staging standby (daemon shutdown); they start again with the next daemon.
    pub(super) fn stop_all_staging(&self) {
        let Ok(recs) = self.source_records() else {
            return;
        };
        for rec in recs {
            let st = self.sources.state(&rec.name);
            let _g = st.op.lock();
            self.stop_staging(&rec, &st);
        }
    }

    // ---- link ----------------------------------------------------------------------------

    pub(super) fn mount_root(&self) -> anyhow::Result<PathBuf> {
        use std::os::unix::fs::PermissionsExt;
        let root = self.store_dir.join("mnt");
        std::fs::create_dir_all(&root)?;
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755))?;
        std::fs::set_permissions(&self.store_dir, std::fs::Permissions::from_mode(0o711))?;
        Ok(root)
    }

    pub(super) fn source_link(
        self: &Arc<Self>,
        spec: LinkSpec,
        progress: Progress,
    ) -> anyhow::Result<(String, serde_json::Value)> {
        let name = spec.name.clone();
        crate::tree::check_dataset_name(&name)?;
        if self.source_records()?.iter().any(|r| r.name == name) {
            bail!("source {name} already exists; 'vdbfs source status {name}' shows it");
        }
        if self.datasets.record(&name)?.is_some() {
            bail!("a dataset named {name} already exists; link the source under another name");
        }
        let mode = Mode::parse(spec.mode.as_deref().unwrap_or("backup-stream"))?;
        preflight::check_dirs(mode, spec.backup.as_deref(), spec.archive.as_deref())?;
        let every = spec
            .snapshot_every
            .as_deref()
            .map(|s| source::parse_duration(s, "--snapshot-every"))
            .transpose()?;
        let keep_for = spec
            .keep_for
            .as_deref()
            .map(|s| source::parse_duration(s, "--keep-for"))
            .transpose()?;
        if spec.keep.is_some() && keep_for.is_some() {
            bail!("give --keep N or --keep-for DURATION, not both");
        }
        if spec.keep == Some(0) {
            bail!("--keep must be at least 1");
        }
        let slot = match (mode.streams(), &spec.slot) {
            (true, Some(s)) => {
                source::check_slot_name(s)?;
                Some(s.clone())
            }
            (true, None) => Some(source::default_slot(&name)),
            (false, Some(_)) => bail!("--slot is for the streaming modes, not log-shipping"),
            (false, None) => None,
        };
        let parsed = match (&spec.conn, mode.streams()) {
            (Some(c), _) => Some(Conn::parse(c)?),
            (None, true) => bail!(
                "--mode {} needs --conn: how to reach the source, e.g. \
                 'postgresql://replicator@127.0.0.1:5432/postgres'",
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
                std::fs::read_to_string(f)
                    .with_context(|| format!("cannot read the passfile {}", f.display()))?,
            ),
            (None, Some(pw), Some(p)) => Some(pg::conninfo::passfile_line(&p.conn.user, pw)),
            _ => None,
        };
        let conn = parsed.map(|p| p.conn);
        let taken: Vec<u16> = self
            .source_records()?
            .iter()
            .map(|r| r.staging_port)
            .collect();

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
                    progress(format!("checking the source {}", c.redacted()));
                    Some(preflight::probe_source(&client, c, passfile.as_deref())?)
                }
                None => None,
            };
            let (major, version) = match (&facts, &spec.backup) {
                (Some(f), _) => (f.major, f.version.clone()),
                (None, Some(b)) => {
                    let m = ingest::BackupFormat::detect(b)?.major(b)?;
                    (m, m.to_string())
                }
                (None, None) => bail!("nothing tells the source's version"),
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
            data_dir: self.mount_root()?.join(&name),
            snapshot_every_secs: every.map(|d| d.as_secs()),
            keep: spec.keep,
            keep_for_secs: keep_for.map(|d| d.as_secs()),
            enabled: true,
            linking: true,
            system_identifier: facts.as_ref().map(|f| f.system_identifier.clone()),
            created: api::rfc3339(api::now_unix()),
        };
        let st = self.sources.state(&name);
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
                serde_json::to_value(&snap)?,
            )),
            Err(e) => {
                progress(format!("link failed; removing what it made: {e:#}"));
                self.unlink_inner(&rec, &st, slot_created, true, true);
                self.sources.forget(&name);
                Err(e.context(format!("linking source {name} failed and was rolled back")))
            }
        }
    }

    fn link_steps(
        self: &Arc<Self>,
        rec: &SourceRecord,
        st: &Slot,
        backup: Option<&Path>,
        slot_created: &mut bool,
        progress: Progress,
    ) -> anyhow::Result<api::SourceSnapshot> {
        let store = &self.store_dir;
        let passfile = rec.passfile(store);
        if let (Some(slot), Some(conn)) = (&rec.slot, &rec.conn) {
            progress(format!(
                "creating the physical replication slot {slot} on the source"
            ));
            let client = preflight::client_install()?;
            preflight::replication_psql(
                &client,
                conn,
                passfile.as_deref(),
                &[&format!(
                    "CREATE_REPLICATION_SLOT \"{slot}\" PHYSICAL RESERVE_WAL"
                )],
            )
            .map_err(|e| {
                let t = format!("{e:#}");
                if t.contains("already exists") {
                    anyhow!(
                        "a replication slot named {slot} already exists on the source; pick \
                         another with --slot, or drop it there if it is unused \
                         (SELECT pg_drop_replication_slot('{slot}'))"
                    )
                } else if t.contains("all replication slots are in use") {
                    anyhow!(
                        "all replication slots of the source are in use; raise \
                         max_replication_slots there (restart needed) or drop an unused slot"
                    )
                } else {
                    e
                }
            })?;
            *slot_created = true;
        }
        self.save_source(rec)?;
        self.datasets.create(&rec.name)?;
        let msg = self.mount(&rec.name, &rec.data_dir)?;
        tracing::info!("{msg}");
        pg::chown_postgres(&rec.data_dir)?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&rec.data_dir, std::fs::Permissions::from_mode(0o700))?;
        }
        let t = Instant::now();
        match (rec.mode, backup) {
            (Mode::BackupStream, _) => {
                let conn = rec.conn.as_ref().expect("streaming has a conn");
                progress(format!(
                    "pg_basebackup from {} into the staging dataset {}",
                    conn.redacted(),
                    rec.name
                ));
                let conninfo = conn.libpq(
                    passfile.as_deref(),
                    &[("application_name", "vdbfs_basebackup")],
                );
                ingest::basebackup(
                    &rec.install,
                    &conninfo,
                    rec.slot.as_deref().expect("streaming has a slot"),
                    &rec.data_dir,
                    &format!("vdbfs link {}", rec.name),
                    progress,
                )?;
            }
            (_, Some(b)) => ingest::import_backup(&rec.install, b, &rec.data_dir, progress)?,
            (_, None) => bail!("no backup to import"),
        }
        progress(format!(
            "copied in {:.1} s; configuring the staging standby",
            t.elapsed().as_secs_f64()
        ));
        ingest::configure_staging(rec, store)?;
        progress(format!(
            "starting the staging standby on port {} (waits until it is consistent)",
            rec.staging_port
        ));
        self.start_staging(rec, st)?;
        if rec.mode.streams() {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let r = health::query_replay(&rec.cluster(store))?;
                if r.receiver.as_deref() == Some("streaming") {
                    break;
                }
                if Instant::now() > deadline {
                    bail!(
                        "the staging standby does not stream from the source after 60 s; staging log:\n{}",
                        health::log_tail(rec, store)
                    );
                }
                std::thread::sleep(Duration::from_millis(250));
            }
        }
        progress("taking the first validated-sync snapshot".into());
        let snap = self.validated_snapshot(rec)?;
        let mut done = rec.clone();
        done.linking = false;
        self.save_source(&done)?;
        Ok(snap)
    }

    /// Undoes a link (or performs unlink): staging stopped, slot dropped (when we made it),
    /// unmounted, record and files removed; the dataset deleted when `delete_data`.
    /// Best effort: logs what it cannot undo.
    fn unlink_inner(
        &self,
        rec: &SourceRecord,
        st: &Slot,
        drop_slot: bool,
        delete_data: bool,
        quiet: bool,
    ) {
        self.stop_staging(rec, st);
        if drop_slot {
            if let Err(e) = self.drop_slot(rec) {
                tracing::error!(source = %rec.name, "cannot drop the replication slot: {e:#}");
            }
        }
        if self.mounted_at(&rec.name).is_some() {
            if let Err(e) = self.umount(&rec.data_dir) {
                tracing::error!(source = %rec.name, "cannot unmount staging: {e:#}");
            }
        }
        let _ = std::fs::remove_dir(&rec.data_dir);
        if delete_data && self.datasets.record(&rec.name).ok().flatten().is_some() {
            let r = (|| {
                for s in self.datasets.snapshots(Some(&rec.name))? {
                    self.datasets.delete_snapshot(&rec.name, &s.rec.name)?;
                }
                self.datasets.delete(&rec.name)
            })();
            if let Err(e) = r {
                tracing::error!(source = %rec.name, "cannot delete the staging dataset: {e:#}");
            }
        }
        if let Err(e) = self.remove_source(&rec.name) {
            tracing::error!(source = %rec.name, "cannot remove the source record: {e:#}");
        }
        let _ = std::fs::remove_dir_all(&rec.dir(&self.store_dir).0);
        if !quiet {
            tracing::info!(source = %rec.name, "unlinked");
        }
    }

    fn drop_slot(&self, rec: &SourceRecord) -> anyhow::Result<()> {
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
            if format!("{e:#}").contains("does not exist") {
                Ok(())
            } else {
                Err(e)
            }
        })
    }

    // ---- snapshots -----------------------------------------------------------------------

    /// Validated sync: replay paused, CHECKPOINT (a restartpoint), snapshot with the standby's
    /// position, replay resumed; then retention.
    fn validated_snapshot(&self, rec: &SourceRecord) -> anyhow::Result<api::SourceSnapshot> {
        let cluster = rec.cluster(&self.store_dir);
        let q = |sql: &str, secs: u64| cluster.query(sql, Duration::from_secs(secs));
        q("SELECT pg_wal_replay_pause()", 30).map_err(|e| {
            anyhow!(
                "the staging standby of {} does not answer ({e:#}); 'vdbfs source status {}' says why",
                rec.name,
                rec.name
            )
        })?;
        struct Resume<'a>(&'a crate::pg::Cluster);
        impl Drop for Resume<'_> {
            fn drop(&mut self) {
                if let Err(e) = self
                    .0
                    .query("SELECT pg_wal_replay_resume()", Duration::from_secs(30))
                {
                    tracing::error!("cannot resume WAL replay on staging: {e:#}");
                }
            }
        }
        let _resume = Resume(&cluster);
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            let s = q("SELECT pg_get_wal_replay_pause_state()", 10)?;
            if s.first().and_then(|r| r[0].as_deref()) == Some("paused") {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        q("CHECKPOINT", 3600)?;
        let rows = q(
            "SELECT pg_last_wal_replay_lsn(), pg_last_wal_receive_lsn(), \
             (SELECT timeline_id FROM pg_control_checkpoint()), \
             to_char(pg_last_xact_replay_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')",
            30,
        )?;
        let r = rows.into_iter().next().unwrap_or_default();
        let get = |i: usize| r.get(i).cloned().flatten();
        let props = SnapshotProps {
            source: rec.name.clone(),
            mode: rec.mode,
            lsn: get(0).unwrap_or_default(),
            receive_lsn: get(1),
            timeline: get(2).and_then(|t| t.parse().ok()).unwrap_or(1),
            replay_time: get(3),
        };
        let s = self.datasets.snapshot_with_props(
            &rec.name,
            None,
            Some(serde_json::to_vec(&props)?),
        )?;
        drop(_resume);
        let out = api::SourceSnapshot {
            name: s.full_name(),
            lsn: props.lsn.clone(),
            timeline: props.timeline,
            replay_time: props.replay_time.clone(),
            mode: rec.mode.as_str().to_string(),
            created: api::rfc3339(s.rec.created.secs),
        };
        tracing::info!(source = %rec.name, snapshot = %out.name, lsn = %out.lsn, "validated-sync snapshot");
        self.prune(rec);
        Ok(out)
    }

    /// Retention: delete the source's validated-sync snapshots beyond --keep / --keep-for.
    fn prune(&self, rec: &SourceRecord) {
        if rec.keep.is_none() && rec.keep_for_secs.is_none() {
            return;
        }
        let Ok(snaps) = self.datasets.snapshots(Some(&rec.name)) else {
            return;
        };
        let list: Vec<(String, i64)> = snaps
            .iter()
            .filter(|s| s.props.is_some())
            .map(|s| (s.rec.name.clone(), s.rec.created.secs))
            .collect();
        let keep_for = rec.keep_for_secs.map(Duration::from_secs);
        for name in crate::source::to_prune(&list, rec.keep, keep_for, api::now_unix()) {
            let full = format!("{}@{name}", rec.name);
            if self.mounted_at(&full).is_some() {
                continue;
            }
            match self.datasets.delete_snapshot(&rec.name, &name) {
                Ok(()) => tracing::info!(snapshot = %full, "retention: deleted"),
                Err(e) => tracing::error!(snapshot = %full, "retention: cannot delete: {e:#}"),
            }
        }
    }

    fn last_snapshot(&self, name: &str) -> (usize, Option<(api::SourceSnapshot, i64)>) {
        let Ok(snaps) = self.datasets.snapshots(Some(name)) else {
            return (0, None);
        };
        let last = snaps.iter().rev().find_map(|s| {
            let p: SnapshotProps = serde_json::from_slice(s.props.as_ref()?).ok()?;
            Some((
                api::SourceSnapshot {
                    name: s.full_name(),
                    lsn: p.lsn,
                    timeline: p.timeline,
                    replay_time: p.replay_time,
                    mode: p.mode.as_str().to_string(),
                    created: api::rfc3339(s.rec.created.secs),
                },
                s.rec.created.secs,
            ))
        });
        (snaps.len(), last)
    }

    // ---- API -----------------------------------------------------------------------------

    pub(super) fn source_status(&self, name: &str) -> anyhow::Result<SourceStatus> {
        let rec = self.source_record(name)?;
        let st = self.sources.state(name);
        let (pid, started, restarts, last_error) = {
            let rt = st.rt.lock();
            (
                rt.pid.filter(|p| pg::pid_alive(*p)),
                rt.started,
                rt.restarts,
                rt.last_error.clone(),
            )
        };
        let (count, last) = self.last_snapshot(name);
        let mut s = SourceStatus {
            name: rec.name.clone(),
            mode: rec.mode.as_str().to_string(),
            state: String::new(),
            fault: None,
            data_dir: rec.data_dir.clone(),
            staging_port: rec.staging_port,
            staging_pid: pid,
            slot: rec.slot.clone(),
            conn: rec.conn.as_ref().map(|c| c.redacted()),
            archive: rec.archive.clone(),
            receive_lsn: None,
            replay_lsn: None,
            source_lsn: None,
            lag_bytes: None,
            lag_seconds: None,
            last_replay_time: None,
            restarts,
            snapshots: count,
            last_snapshot: last.map(|(s, _)| s),
            snapshot_every_secs: rec.snapshot_every_secs,
            keep: rec.keep,
            keep_for_secs: rec.keep_for_secs,
        };
        if rec.linking {
            s.state = "linking".into();
            return Ok(s);
        }
        if !rec.enabled {
            s.state = "disabled".into();
            return Ok(s);
        }
        let young = started.is_some_and(|t| t.elapsed() < STREAM_GRACE);
        if pid.is_none() {
            s.state = if restarts == 0 && last_error.is_none() {
                "starting"
            } else {
                "fault"
            }
            .into();
            s.fault = Some(format!(
                "the staging postgres is not running{}",
                last_error.map(|e| format!(": {e}")).unwrap_or_default()
            ));
            return Ok(s);
        }
        match health::query_replay(&rec.cluster(&self.store_dir)) {
            Ok(r) => {
                let sync = health::assess(&rec, &self.store_dir, &r, young);
                // After a restart postgres counts "received" from where the walreceiver began, which
                // can be below what was already replayed; what was replayed was received.
                s.receive_lsn =
                    health::fmt(r.receive_lsn.map(|x| x.max(r.replay_lsn.unwrap_or(0))));
                s.replay_lsn = health::fmt(r.replay_lsn);
                s.last_replay_time = r.replay_time;
                s.source_lsn = health::fmt(sync.source_lsn);
                s.lag_bytes = sync.lag_bytes;
                s.lag_seconds = sync.lag_seconds;
                s.state = match (&sync.fault, young) {
                    (Some(_), _) => "fault",
                    (None, true) if r.receiver.is_none() && rec.mode.streams() => "starting",
                    _ => "syncing",
                }
                .into();
                s.fault = sync.fault;
            }
            Err(e) => {
                s.state = if young { "starting" } else { "fault" }.into();
                s.fault = Some(format!("the staging postgres does not answer: {e:#}"));
            }
        }
        Ok(s)
    }

    pub(super) fn source_list(&self) -> anyhow::Result<Vec<SourceStatus>> {
        self.source_records()?
            .iter()
            .map(|r| self.source_status(&r.name))
            .collect()
    }

    /// An on-demand validated-sync snapshot. A streaming source is asked for its WAL position
    /// first and the snapshot waits (bounded) until staging replayed that far: it holds what
    /// the source had committed when the command ran.
    pub(super) fn source_snapshot(
        &self,
        name: &str,
        progress: Progress,
    ) -> anyhow::Result<api::SourceSnapshot> {
        let rec = self.source_record(name)?;
        if rec.linking {
            bail!("source {name} is still linking; wait until 'vdbfs source link' finished");
        }
        if !rec.enabled {
            bail!("source {name} is disabled; 'vdbfs source enable {name}' first");
        }
        let st = self.sources.state(name);
        let _g = st.op.lock();
        self.catch_up(&rec, progress);
        self.validated_snapshot(&rec)
    }

    /// Waits until staging replayed the source's current WAL position (streaming modes; at
    /// most [`CATCH_UP_WAIT`]). A source that cannot be asked is not an error: the snapshot
    /// then holds what staging has.
    fn catch_up(&self, rec: &SourceRecord, progress: Progress) {
        let (Some(conn), true) = (&rec.conn, rec.mode.streams()) else {
            return;
        };
        let target = preflight::client_install().and_then(|client| {
            preflight::replication_psql(
                &client,
                conn,
                rec.passfile(&self.store_dir).as_deref(),
                &["IDENTIFY_SYSTEM"],
            )
        });
        let target = match target {
            Ok(lines) => lines
                .first()
                .and_then(|l| l.split('|').nth(2))
                .and_then(pg::lsn::parse),
            Err(e) => {
                progress(format!(
                    "cannot ask source {} for its WAL position ({e:#}); the snapshot holds what staging has",
                    rec.name
                ));
                return;
            }
        };
        let Some(target) = target else { return };
        let cluster = rec.cluster(&self.store_dir);
        let start = Instant::now();
        let mut told = false;
        loop {
            let replay = health::query_replay(&cluster)
                .ok()
                .and_then(|r| r.replay_lsn)
                .unwrap_or(0);
            if replay >= target {
                return;
            }
            if start.elapsed() > CATCH_UP_WAIT {
                progress(format!(
                    "staging of {} is still {} bytes behind the source after {} s; the snapshot \
                     holds what it replayed",
                    rec.name,
                    target - replay,
                    CATCH_UP_WAIT.as_secs()
                ));
                return;
            }
            if !told && start.elapsed() > Duration::from_secs(1) {
                progress(format!(
                    "waiting for staging to replay up to the source's {}",
                    pg::lsn::format(target)
                ));
                told = true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub(super) fn source_set_enabled(
        self: &Arc<Self>,
        name: &str,
        on: bool,
    ) -> anyhow::Result<String> {
        let mut rec = self.source_record(name)?;
        if rec.linking {
            bail!("source {name} is still linking");
        }
        let st = self.sources.state(name);
        let _g = st.op.lock();
        if on {
            if rec.enabled && st.rt.lock().pid.is_some_and(pg::pid_alive) {
                return Ok(format!("source {name} is already enabled"));
            }
            if self.mounted_at(name).is_none() {
                self.mount(name, &rec.data_dir)?;
            }
            self.start_staging(&rec, &st)?;
            rec.enabled = true;
            self.save_source(&rec)?;
            Ok(format!(
                "enabled source {name}: the staging standby replays again"
            ))
        } else {
            rec.enabled = false;
            self.save_source(&rec)?;
            self.stop_staging(&rec, &st);
            let slot = rec
                .slot
                .as_ref()
                .map(|s| {
                    format!("; the slot {s} keeps WAL on the source until you enable or unlink it")
                })
                .unwrap_or_default();
            Ok(format!(
                "disabled source {name}: staging stopped, snapshots kept{slot}"
            ))
        }
    }

    pub(super) fn source_unlink(
        &self,
        name: &str,
        delete_snapshots: bool,
        force: bool,
    ) -> anyhow::Result<String> {
        let mut rec = self.source_record(name)?;
        let st = self.sources.state(name);
        let _g = st.op.lock();
        if let Some(snap) = self
            .datasets
            .snapshots(Some(name))?
            .iter()
            .map(|s| s.full_name())
            .find(|s| self.mounted_at(s).is_some())
            .filter(|_| delete_snapshots)
        {
            bail!("snapshot {snap} is mounted; unmount it first");
        }
        self.stop_staging(&rec, &st);
        if let Err(e) = self.drop_slot(&rec) {
            if !force {
                rec.enabled = false;
                self.save_source(&rec)?;
                bail!(
                    "cannot drop the replication slot {} on the source ({e:#}); the source {name} \
                     is now disabled. Fix the connection and run unlink again, or pass --force \
                     to unlink anyway and drop the slot on the source yourself",
                    rec.slot.clone().unwrap_or_default()
                );
            }
            tracing::warn!(source = %name, "unlink --force: slot left on the source: {e:#}");
        }
        self.unlink_inner(&rec, &st, false, delete_snapshots, false);
        self.sources.forget(name);
        Ok(if delete_snapshots {
            format!("unlinked source {name}; its dataset and snapshots are deleted")
        } else {
            format!(
                "unlinked source {name}; its snapshots stay in dataset {name} \
                 ('vdbfs dataset delete {name} --with-snapshots' removes them)"
            )
        })
    }

    // ---- supervisor ----------------------------------------------------------------------

    /// Rolls back links a dead daemon left half-made.
    pub(super) fn recover_sources(&self) {
        let Ok(recs) = self.source_records() else {
            return;
        };
        for rec in recs.into_iter().filter(|r| r.linking) {
            tracing::warn!(source = %rec.name, "rolling back a link interrupted by a daemon stop");
            let st = self.sources.state(&rec.name);
            let _g = st.op.lock();
            self.unlink_inner(&rec, &st, true, true, true);
            self.sources.forget(&rec.name);
        }
    }

    /// One supervisor round: restart dead staging standbys (with backoff), take due policy
    /// snapshots.
    pub(super) fn supervise(self: &Arc<Self>) {
        let Ok(recs) = self.source_records() else {
            return;
        };
        for rec in recs.into_iter().filter(|r| r.enabled && !r.linking) {
            let st = self.sources.state(&rec.name);
            let Some(_g) = st.op.try_lock() else { continue };
            let (pid, due) = {
                let rt = st.rt.lock();
                (rt.pid, rt.due())
            };
            let alive = pid.is_some_and(pg::pid_alive);
            if !alive {
                if !due {
                    continue;
                }
                if pid.is_some() {
                    tracing::error!(source = %rec.name, pid = pid.unwrap_or(0), "the staging postgres died; restarting it");
                    st.rt.lock().restarts += 1;
                }
                st.rt.lock().pid = None;
                if self.mounted_at(&rec.name).is_none() {
                    if let Err(e) = self.mount(&rec.name, &rec.data_dir) {
                        tracing::error!(source = %rec.name, "cannot mount staging: {e:#}");
                    }
                }
                if let Err(e) = self.start_staging(&rec, &st) {
                    let wait = st.rt.lock().failed(format!("{e:#}"));
                    tracing::error!(source = %rec.name, "staging postgres did not start (next try in {wait:?}): {e:#}");
                }
                continue;
            }
            if let Some(every) = rec.snapshot_every_secs {
                let (_, last) = self.last_snapshot(&rec.name);
                if last.is_none_or(|(_, t)| api::now_unix() - t >= every as i64) {
                    if let Err(e) = self.validated_snapshot(&rec) {
                        tracing::error!(source = %rec.name, "policy snapshot failed: {e:#}");
                    }
                }
            }
        }
    }
}

/// For `snapshot list`: the LSN etc. of a source snapshot.
pub fn snapshot_props(s: &crate::tree::SnapshotInfo) -> Option<SnapshotProps> {
    serde_json::from_slice(s.props.as_ref()?).ok()
}
