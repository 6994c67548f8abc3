//! The daemon's side of VDBs: create, start, stop, snapshot and bookmark, rewind, refresh,
//! delete, status, the TimeFlow view, and the supervisor that keeps wanted VDBs running.
//!
//! Invariants: one operation at a time per VDB (`Slot::op`; the supervisor only try-locks
//! it); port choice and record creation are serialized (`Daemon::vdb_create_lock`); a record with
//! `pending` is written before the first step that changes a VDB's data and cleared after the
//! last, so a daemon that dies in between leaves what the next daemon undoes (see `vdb`); a
//! VDB's postgres is stopped before its mount goes away.

use super::api::{self, TimeflowNode, VdbSnapshot, VdbSpec, VdbStatus};
use super::sources::Progress;
use super::supervision::Slot;
use super::Daemon;
use crate::pg;
use crate::pg::RunFiles;
use crate::store::VDBS;
use crate::tree::{dataset::ROOT_INO, NameError};
use crate::vdb::{self, hooks, Pending, VdbDir, VdbRecord, VdbSnapshotProps};
use anyhow::{anyhow, bail, Context};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a VDB's postgres may take to start (crash recovery of what its snapshot holds).
const START_TIMEOUT: Duration = Duration::from_secs(300);
/// What postgres logs when the WAL ends before a recovery target.
const TARGET_NOT_REACHED: &str = "recovery ended before configured recovery target was reached";

/// The VDB properties of a snapshot, if it is a VDB's.
pub fn vdb_props(s: &crate::tree::SnapshotInfo) -> Option<VdbSnapshotProps> {
    serde_json::from_slice(s.props.as_ref()?).ok()
}

impl Daemon {
    // ---- records -------------------------------------------------------------------------

    pub(super) fn vdb_records(&self) -> anyhow::Result<Vec<VdbRecord>> {
        self.json_records(VDBS, "VDB")
    }

    fn vdb_record(&self, name: &str) -> anyhow::Result<VdbRecord> {
        self.json_record(VDBS, name)?
            .ok_or_else(|| anyhow!("no VDB {name}; 'vdbfs vdb list' shows the VDBs"))
    }

    fn save_vdb(&self, rec: &VdbRecord) -> anyhow::Result<()> {
        self.save_json(VDBS, &rec.name, rec)
    }

    fn remove_vdb(&self, name: &str) -> anyhow::Result<()> {
        self.remove_json(VDBS, name)
    }

    pub(super) fn is_vdb(&self, name: &str) -> bool {
        self.vdb_records()
            .map(|v| v.iter().any(|r| r.name == name))
            .unwrap_or(false)
    }

    // ---- postgres of a VDB ---------------------------------------------------------------

    fn vdb_pid(&self, rec: &VdbRecord, st: &Slot) -> Option<i32> {
        st.rt
            .lock()
            .pid
            .filter(|p| pg::pid_alive(*p))
            .or_else(|| rec.cluster(&self.store_dir).postmaster_pid())
    }

    /// Starts postgres (stopping a leftover of an earlier daemon first). With a recovery target
    /// that the WAL does not reach (nothing was written past it), it starts again without.
    fn start_postgres(&self, rec: &VdbRecord, st: &Slot) -> anyhow::Result<i32> {
        let dir = rec.dir(&self.store_dir);
        let cluster = rec.cluster(&self.store_dir);
        if st.rt.lock().pid.is_none() {
            cluster.stop_any(None, pg::read_pid(&dir.pid_file()), &rec.name);
        }
        if !rec.data_dir.join("PG_VERSION").exists() {
            bail!(
                "the data directory {} of VDB {} is not mounted or empty",
                rec.data_dir.display(),
                rec.name
            );
        }
        let provisioning = rec.data_dir.join(vdb::PROVISION_SIGNAL).exists();
        let mut pid = cluster.start(START_TIMEOUT)?;
        if provisioning {
            if let Err(e) = self.promote(rec, pid) {
                let _ = cluster.stop("immediate", Duration::from_secs(30));
                if !format!("{e:#}").contains(TARGET_NOT_REACHED) {
                    return Err(e);
                }
                // The WAL ends exactly at the target, so no record ever reaches it: recovering
                // to the end of the WAL is the same state.
                tracing::info!(vdb = %rec.name, "the WAL ends at the recovery target; promoting without it");
                vdb::clear_recovery(rec)?;
                vdb::write_provision_signal(&rec.data_dir)?;
                pg::remove_run_files(&rec.data_dir);
                pid = cluster.start(START_TIMEOUT)?;
                if let Err(e) = self.promote(rec, pid) {
                    let _ = cluster.stop("immediate", Duration::from_secs(30));
                    return Err(e);
                }
            }
            vdb::clear_recovery(rec)?;
        }
        std::fs::write(dir.pid_file(), format!("{pid}\n"))?;
        st.rt.lock().running(pid);
        tracing::info!(vdb = %rec.name, pid, port = rec.port, "VDB postgres running");
        Ok(pid)
    }

    /// The end of a provisioning start (see `vdb::configure`): `pg_ctl -w` returned once the
    /// standby was consistent; wait until replay reached the recovery target (paused there) if
    /// there is one, then promote. Promotion first replays whatever WAL is left in pg_wal.
    fn promote(&self, rec: &VdbRecord, pid: i32) -> anyhow::Result<()> {
        let cluster = rec.cluster(&self.store_dir);
        let deadline = Instant::now() + START_TIMEOUT;
        let target = vdb::pending_target(rec);
        let log_tail = || {
            format!(
                "postgres log ({}):\n{}",
                cluster.log.display(),
                pg::log_tail(&cluster.log, 15)
            )
        };
        if let Some(target) = target {
            loop {
                if !pg::pid_alive(pid) {
                    bail!(
                        "postgres of VDB {} stopped while recovering to {}; {}",
                        rec.name,
                        pg::lsn::format(target),
                        log_tail()
                    );
                }
                let rows = cluster.query(
                    "SELECT pg_is_in_recovery(), pg_get_wal_replay_pause_state(), pg_last_wal_replay_lsn()",
                    Duration::from_secs(10),
                );
                if let Some(r) = rows.ok().and_then(|r| r.into_iter().next()) {
                    let get = |i: usize| r.get(i).cloned().flatten().unwrap_or_default();
                    let replayed = pg::lsn::parse(&get(2)).unwrap_or(0);
                    // Paused at the target; or the WAL ends exactly there (nothing to pause on).
                    if get(0) == "f" || get(1) == "paused" || replayed >= target {
                        break;
                    }
                }
                if Instant::now() > deadline {
                    bail!(
                        "VDB {} did not reach {} within {} s; {}",
                        rec.name,
                        pg::lsn::format(target),
                        START_TIMEOUT.as_secs(),
                        log_tail()
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        cluster
            .promote(START_TIMEOUT)
            .map_err(|e| anyhow!("promoting VDB {} failed: {e:#}; {}", rec.name, log_tail()))
    }

    /// Stops the VDB's postgres (see [`pg::Cluster::stop_any`]).
    fn stop_postgres(&self, rec: &VdbRecord, st: &Slot) {
        let ours = st.rt.lock().pid.take();
        let recorded = pg::read_pid(&rec.dir(&self.store_dir).pid_file());
        rec.cluster(&self.store_dir)
            .stop_any(ours, recorded, &rec.name);
        let _ = std::fs::remove_file(rec.dir(&self.store_dir).pid_file());
    }

    /// pre-start hook, start, then (after `between`) the post-start hook.
    fn start_with_hooks(
        &self,
        rec: &VdbRecord,
        st: &Slot,
        between: &dyn Fn() -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        hooks::run(rec, &self.store_dir, "pre-start")?;
        self.start_postgres(rec, st)?;
        between()?;
        hooks::run(rec, &self.store_dir, "post-start")
    }

    fn stop_with_hooks(&self, rec: &VdbRecord, st: &Slot) -> anyhow::Result<()> {
        hooks::run(rec, &self.store_dir, "pre-stop")?;
        self.stop_postgres(rec, st);
        hooks::run(rec, &self.store_dir, "post-stop")
    }

    /// Stops every VDB postgres (daemon shutdown); the next daemon starts the wanted ones.
    pub(super) fn stop_all_vdbs(&self) {
        let Ok(recs) = self.vdb_records() else {
            return;
        };
        for rec in recs {
            let st = self.vdbs.state(&rec.name);
            let _g = st.op.lock();
            self.stop_postgres(&rec, &st);
        }
    }

    // ---- helpers -------------------------------------------------------------------------

    /// `DATASET@SNAPSHOT`, or `DATASET` = its latest snapshot.
    fn resolve_snapshot(&self, from: &str) -> anyhow::Result<(String, String)> {
        if let Some((d, s)) = from.split_once('@') {
            let (d, s) = crate::tree::parse_snapshot_ref(from).map(|_| (d, s))?;
            if !self
                .datasets
                .snapshots(Some(d))?
                .iter()
                .any(|x| x.rec.name == s)
            {
                return Err(NameError::SnapshotNotFound(format!("{d}@{s}")).into());
            }
            return Ok((d.to_string(), s.to_string()));
        }
        let snaps = self.datasets.snapshots(Some(from))?;
        let last = snaps.last().ok_or_else(|| {
            anyhow!(
                "dataset {from} has no snapshots to provision from; take one first ('vdbfs source \
                 snapshot {from}' for a source, 'vdbfs vdb snapshot {from}' for a VDB)"
            )
        })?;
        Ok((from.to_string(), last.rec.name.clone()))
    }

    /// The LSN a clone of this snapshot must recover to, when it holds WAL past it (a staging
    /// snapshot taken while WAL kept arriving).
    fn recovery_target(&self, dataset: &str, snap: &str) -> Option<vdb::Target> {
        let snaps = self.datasets.snapshots(Some(dataset)).ok()?;
        let s = snaps.iter().find(|s| s.rec.name == snap)?;
        let p = super::sources::snapshot_props(s)?;
        Some(vdb::Target {
            lsn: pg::lsn::parse(&p.lsn)?,
            timeline: p.timeline,
        })
    }

    /// PG_VERSION of a snapshot, read from its tree, for the installation to run it with.
    fn snapshot_install(&self, dataset: &str, snap: &str) -> anyhow::Result<pg::Install> {
        let view = self.datasets.snapshot_view(dataset, snap)?;
        let text = view
            .lookup(ROOT_INO, b"PG_VERSION")
            .and_then(|(ino, m)| view.read(ino, 0, m.size.min(64) as u32))
            .map_err(|_| {
                anyhow!(
                    "snapshot {dataset}@{snap} does not hold a PostgreSQL data directory \
                     (no PG_VERSION at its top)"
                )
            })?;
        let major: u32 = String::from_utf8_lossy(&text)
            .trim()
            .parse()
            .map_err(|_| anyhow!("PG_VERSION of {dataset}@{snap} is unreadable"))?;
        pg::Install::for_major(major)
    }

    fn vdb_mount_point(&self, spec: &VdbSpec) -> anyhow::Result<PathBuf> {
        let mp = match &spec.mount {
            Some(m) => {
                if !m.is_absolute() {
                    bail!("--mount {}: give an absolute path", m.display());
                }
                m.clone()
            }
            None => self.mount_root()?.join(&spec.name),
        };
        let lexical = super::mounts::resolve(&mp);
        if super::mounts::is_mounted(&lexical) {
            bail!(
                "--mount {}: something is already mounted there; pick another directory",
                mp.display()
            );
        }
        if let Ok(mut rd) = std::fs::read_dir(&mp) {
            if rd.next().is_some() {
                bail!(
                    "--mount {}: the directory is not empty; a VDB needs an empty or new directory",
                    mp.display()
                );
            }
        } else if mp.exists() {
            bail!("--mount {}: not a directory", mp.display());
        }
        Ok(mp)
    }

    fn checkpoint_and_unmount(&self, rec: &VdbRecord) -> anyhow::Result<()> {
        if self.mounted_at(&rec.name).is_some() {
            self.umount(&rec.data_dir)
                .with_context(|| format!("cannot unmount VDB {}", rec.name))?;
        }
        self.datasets.checkpoint()?;
        Ok(())
    }

    fn mount_vdb(self: &Arc<Self>, rec: &VdbRecord) -> anyhow::Result<()> {
        if self.mounted_at(&rec.name).is_none() {
            self.mount(&rec.name, &rec.data_dir)?;
        }
        Ok(())
    }

    // ---- create --------------------------------------------------------------------------

    pub(super) fn vdb_create(
        self: &Arc<Self>,
        spec: VdbSpec,
        progress: Progress,
    ) -> anyhow::Result<VdbStatus> {
        let name = spec.name.clone();
        self.vdb_create_inner(spec, progress)
            .map_err(|e| e.context(format!("cannot create VDB {name}")))
    }

    fn vdb_create_inner(
        self: &Arc<Self>,
        spec: VdbSpec,
        progress: Progress,
    ) -> anyhow::Result<VdbStatus> {
        let name = spec.name.clone();
        crate::tree::check_dataset_name(&name)?;
        // Name checks, port choice and the record happen under one lock: two creates never
        // take the same name or port.
        let create_guard = self.vdb_create_lock.lock();
        if self.is_vdb(&name) {
            bail!(
                "VDB {name} already exists; pick another name or 'vdbfs vdb delete {name}' first"
            );
        }
        if self.source_records()?.iter().any(|r| r.name == name) {
            bail!("{name} is the name of a linked source; pick another name for the VDB");
        }
        if self.datasets.record(&name)?.is_some() {
            bail!("a dataset named {name} already exists; pick another name for the VDB");
        }
        let (pds, psnap) = self.resolve_snapshot(&spec.from)?;
        let settings = spec
            .settings
            .iter()
            .map(|s| vdb::parse_setting(s))
            .collect::<anyhow::Result<Vec<_>>>()?;
        if let Some(h) = &spec.hooks {
            if !h.is_absolute() {
                bail!("--hooks {}: give an absolute path", h.display());
            }
            hooks::check_dir(h)?;
        }
        let data_dir = self.vdb_mount_point(&spec)?;
        let install = self.snapshot_install(&pds, &psnap)?;
        let target = self.recovery_target(&pds, &psnap);
        let parent = format!("{pds}@{psnap}");

        let mut taken: Vec<u16> = self.vdb_records()?.iter().map(|r| r.port).collect();
        taken.extend(self.source_records()?.iter().map(|r| r.staging_port));
        let port = vdb::pick_port(spec.port, self.vdb_ports, &taken)?;
        let mut rec = VdbRecord {
            v: 1,
            name: name.clone(),
            parent: parent.clone(),
            port,
            data_dir,
            settings,
            hooks: spec.hooks.clone(),
            install,
            running: false,
            pending: Some(Pending {
                op: "create".into(),
                rollback: None,
                parent: parent.clone(),
                was_running: false,
            }),
            created: api::rfc3339(api::now_unix()),
            events: Vec::new(),
        };
        let dir = rec.dir(&self.store_dir);
        if dir.0.exists() {
            std::fs::remove_dir_all(&dir.0)?;
        }
        self.save_vdb(&rec)?;
        drop(create_guard);
        let st = self.vdbs.state(&name);
        let _g = st.op.lock();
        let t = Instant::now();
        let r = (|| {
            vdb::prepare_dir(&dir)?;
            dir.log_line(&format!("creating VDB {name} from {parent} on port {port}"));
            progress(format!("cloning {parent} into VDB {name}"));
            self.datasets.clone_snapshot(&pds, &psnap, &name)?;
            self.mount_vdb(&rec)?;
            vdb::configure(&rec, &self.store_dir, target.as_ref(), true)?;
            vdb::check_config(&rec)?;
            progress(format!(
                "starting postgres on port {port}{}",
                target
                    .as_ref()
                    .map(|t| format!(" (recovering to {})", pg::lsn::format(t.lsn)))
                    .unwrap_or_default()
            ));
            let mut tries = 0;
            loop {
                let rec_now = rec.clone();
                let started = self.start_with_hooks(&rec_now, &st, &|| {
                    hooks::run(&rec_now, &self.store_dir, "configure-clone")
                });
                match started {
                    // A pool port another program bound between our check and postgres's
                    // bind: take the next free one (a port the user gave is an error).
                    Err(e)
                        if spec.port.is_none()
                            && tries < 3
                            && format!("{e:#}").contains("Address already in use") =>
                    {
                        tries += 1;
                        let _g = self.vdb_create_lock.lock();
                        let mut taken: Vec<u16> =
                            self.vdb_records()?.iter().map(|r| r.port).collect();
                        taken.extend(self.source_records()?.iter().map(|r| r.staging_port));
                        let port = vdb::pick_port(None, self.vdb_ports, &taken)?;
                        dir.log_line(&format!(
                            "port {} was taken meanwhile; trying {port}",
                            rec.port
                        ));
                        rec.port = port;
                        self.save_vdb(&rec)?;
                        pg::conf::edit_auto_conf(
                            &rec.data_dir,
                            &[("port", Some(port.to_string()))],
                        )?;
                        pg::remove_run_files(&rec.data_dir);
                    }
                    r => break r,
                }
            }?;
            anyhow::Ok(())
        })();
        match r {
            Ok(()) => {
                rec.pending = None;
                rec.running = true;
                rec.event(format!("created from {parent}"));
                self.save_vdb(&rec)?;
                dir.log_line(&format!(
                    "VDB {name} is running ({:.2} s)",
                    t.elapsed().as_secs_f64()
                ));
                tracing::info!(vdb = %name, parent = %parent, port = rec.port, ms = t.elapsed().as_millis() as u64, "VDB created");
                self.vdb_status_of(&rec, false)
            }
            Err(e) => {
                progress(format!("creating VDB {name} failed; removing what it made"));
                dir.log_line(&format!("create failed: {e:#}"));
                self.remove_vdb_everything(&rec, &st);
                self.vdbs.forget(&name);
                Err(e.context(format!(
                    "provisioning from {parent} failed and was undone (nothing is left behind)"
                )))
            }
        }
    }

    /// Stops, unmounts and deletes a VDB with its snapshots, files and record. Best effort:
    /// logs what it cannot undo.
    fn remove_vdb_everything(&self, rec: &VdbRecord, st: &Slot) {
        self.stop_postgres(rec, st);
        if self.mounted_at(&rec.name).is_some() {
            if let Err(e) = self.umount(&rec.data_dir) {
                tracing::error!(vdb = %rec.name, "cannot unmount: {e:#}");
            }
        }
        let _ = std::fs::remove_dir(&rec.data_dir);
        if self.datasets.record(&rec.name).ok().flatten().is_some() {
            let r = (|| {
                for s in self.datasets.snapshots(Some(&rec.name))? {
                    self.datasets.delete_snapshot(&rec.name, &s.rec.name)?;
                }
                self.datasets.delete(&rec.name)
            })();
            if let Err(e) = r {
                tracing::error!(vdb = %rec.name, "cannot delete the dataset: {e:#}");
            }
        }
        if let Err(e) = self.remove_vdb(&rec.name) {
            tracing::error!(vdb = %rec.name, "cannot remove the VDB record: {e:#}");
        }
        let _ = std::fs::remove_dir_all(&rec.dir(&self.store_dir).0);
    }

    // ---- start / stop / delete -----------------------------------------------------------

    pub(super) fn vdb_start(self: &Arc<Self>, name: &str) -> anyhow::Result<String> {
        let mut rec = self.vdb_record(name)?;
        let st = self.vdbs.state(name);
        let _g = st.op.lock();
        refuse_pending(&rec)?;
        if self.vdb_pid(&rec, &st).is_some() && st.rt.lock().pid.is_some() {
            return Ok(format!(
                "VDB {name} is already running on port {}",
                rec.port
            ));
        }
        self.mount_vdb(&rec)?;
        // A stale postmaster.pid is postgres's to judge: it refuses to start next to a live one.
        let r = self.start_with_hooks(&rec, &st, &|| Ok(()));
        if st.rt.lock().pid.is_some() {
            rec.running = true;
            self.save_vdb(&rec)?;
        }
        r.map_err(|e| {
            e.context(if rec.running {
                "postgres started (it runs), but"
            } else {
                "it stays stopped"
            })
        })?;
        Ok(format!("started VDB {name} on port {}", rec.port))
    }

    pub(super) fn vdb_stop(&self, name: &str) -> anyhow::Result<String> {
        let mut rec = self.vdb_record(name)?;
        let st = self.vdbs.state(name);
        let _g = st.op.lock();
        refuse_pending(&rec)?;
        hooks::run(&rec, &self.store_dir, "pre-stop")
            .map_err(|e| e.context("refused by its pre-stop hook"))?;
        self.stop_postgres(&rec, &st);
        rec.running = false;
        self.save_vdb(&rec)?;
        hooks::run(&rec, &self.store_dir, "post-stop").map_err(|e| e.context("it stopped, but"))?;
        Ok(format!("stopped VDB {name}"))
    }

    pub(super) fn vdb_delete(&self, name: &str) -> anyhow::Result<String> {
        let rec = self.vdb_record(name)?;
        let st = self.vdbs.state(name);
        let _g = st.op.lock();
        for s in self.datasets.snapshots(Some(name))? {
            if let Some(mp) = self.mounted_at(&s.full_name()) {
                bail!(
                    "snapshot {} of VDB {name} is mounted at {}; unmount it first ('vdbfs umount {}')",
                    s.full_name(),
                    mp.display(),
                    mp.display()
                );
            }
        }
        let children: Vec<String> = self
            .vdb_records()?
            .into_iter()
            .filter(|r| r.parent_dataset() == name)
            .map(|r| r.name)
            .collect();
        self.remove_vdb_everything(&rec, &st);
        if self.datasets.record(name)?.is_some() || self.is_vdb(name) {
            bail!("deleting VDB {name} did not finish; the daemon log says why");
        }
        self.vdbs.forget(name);
        Ok(if children.is_empty() {
            format!("deleted VDB {name}")
        } else {
            format!(
                "deleted VDB {name}; its children ({}) keep their data",
                children.join(", ")
            )
        })
    }

    // ---- snapshots and bookmarks ---------------------------------------------------------

    pub(super) fn vdb_snapshot(
        &self,
        name: &str,
        snapshot: Option<&str>,
        bookmark: bool,
    ) -> anyhow::Result<VdbSnapshot> {
        let rec = self.vdb_record(name)?;
        let st = self.vdbs.state(name);
        let _g = st.op.lock();
        refuse_pending(&rec)?;
        let kind = if bookmark { "bookmark" } else { "snapshot" };
        if let Some(s) = snapshot {
            crate::tree::check_snapshot_name(s)?;
        }
        hooks::run(&rec, &self.store_dir, "pre-snapshot")
            .map_err(|e| e.context("refused by its pre-snapshot hook"))?;
        let s = self.take_vdb_snapshot(&rec, &st, snapshot, kind)?;
        hooks::run(&rec, &self.store_dir, "post-snapshot")
            .map_err(|e| e.context(format!("{} was taken, but", s.name)))?;
        Ok(s)
    }

    fn take_vdb_snapshot(
        &self,
        rec: &VdbRecord,
        st: &Slot,
        snapshot: Option<&str>,
        kind: &str,
    ) -> anyhow::Result<VdbSnapshot> {
        let (mut lsn, mut timeline) = (None, None);
        if self.vdb_pid(rec, st).is_some() {
            // Not needed for consistency (the snapshot is atomic: a clone of it recovers like
            // after a crash), but it makes that recovery short.
            let cluster = rec.cluster(&self.store_dir);
            if let Ok(rows) = cluster
                .query("CHECKPOINT", Duration::from_secs(600))
                .and_then(|_| {
                    cluster.query(
                        "SELECT pg_current_wal_lsn(), (SELECT timeline_id FROM pg_control_checkpoint())",
                        Duration::from_secs(30),
                    )
                })
            {
                let r = rows.into_iter().next().unwrap_or_default();
                lsn = r.first().cloned().flatten();
                timeline = r.get(1).cloned().flatten().and_then(|t| t.parse().ok());
            }
        }
        let props = VdbSnapshotProps {
            vdb: rec.name.clone(),
            kind: kind.to_string(),
            lsn,
            timeline,
        };
        let s = self.datasets.snapshot_with_props(
            &rec.name,
            snapshot,
            Some(serde_json::to_vec(&props)?),
        )?;
        rec.dir(&self.store_dir)
            .log_line(&format!("{kind} {}", s.full_name()));
        Ok(VdbSnapshot {
            name: s.full_name(),
            kind: kind.to_string(),
            lsn: props.lsn,
            timeline: props.timeline,
            created: api::rfc3339(s.rec.created.secs),
        })
    }

    // ---- rewind and refresh --------------------------------------------------------------

    pub(super) fn vdb_rewind(self: &Arc<Self>, name: &str, to: &str) -> anyhow::Result<String> {
        let rec = self.vdb_record(name)?;
        let snap = match to.split_once('@') {
            Some((d, s)) if d == name => s.to_string(),
            Some(_) => bail!(
                "rewind goes back to one of VDB {name}'s own snapshots or bookmarks, not {to}; \
                 'vdbfs vdb refresh {name} --to {to}' moves it onto a snapshot of its parent"
            ),
            None => to.to_string(),
        };
        if !self
            .datasets
            .snapshots(Some(name))?
            .iter()
            .any(|s| s.rec.name == snap)
        {
            bail!(
                "VDB {name} has no snapshot or bookmark {snap}; 'vdbfs vdb status {name}' lists them"
            );
        }
        let st = self.vdbs.state(name);
        let _g = st.op.lock();
        refuse_pending(&rec)?;
        self.switch(rec, &st, "rewind", name, &snap, false)
            .map(|()| format!("rewound VDB {name} to {name}@{snap}"))
    }

    pub(super) fn vdb_refresh(
        self: &Arc<Self>,
        name: &str,
        to: Option<&str>,
        progress: Progress,
    ) -> anyhow::Result<String> {
        let rec = self.vdb_record(name)?;
        let parent_ds = rec.parent_dataset().to_string();
        let (ds, snap) = match to {
            Some(t) => {
                let (d, s) = self.resolve_snapshot(t)?;
                if d != parent_ds {
                    bail!(
                        "VDB {name} refreshes from its parent {parent_ds}; {t} is not a snapshot \
                         of it (to start from another dataset, create a new VDB)"
                    );
                }
                (d, s)
            }
            None => {
                let linked = self
                    .source_records()?
                    .into_iter()
                    .find(|r| r.name == parent_ds && r.enabled && !r.linking);
                if linked.is_some() {
                    progress(format!(
                        "taking a validated-sync snapshot of source {parent_ds}"
                    ));
                    let s = self.source_snapshot(&parent_ds, progress)?;
                    let (d, sn) = crate::tree::parse_snapshot_ref(&s.name)?;
                    (d.to_string(), sn.to_string())
                } else {
                    self.resolve_snapshot(&parent_ds)
                        .map_err(|e| e.context(format!("VDB {name} has nothing to refresh from")))?
                }
            }
        };
        let st = self.vdbs.state(name);
        let _g = st.op.lock();
        refuse_pending(&rec)?;
        progress(format!("refreshing VDB {name} onto {ds}@{snap}"));
        self.switch(rec, &st, "refresh", &ds, &snap, true)
            .map(|()| format!("refreshed VDB {name} onto {ds}@{snap}"))
    }

    /// Rewind or refresh: points the VDB's dataset at `ds@snap`, keeping its identity. An undo
    /// snapshot is taken first; any failure goes back to it.
    fn switch(
        self: &Arc<Self>,
        mut rec: VdbRecord,
        st: &Slot,
        op: &str,
        ds: &str,
        snap: &str,
        refresh: bool,
    ) -> anyhow::Result<()> {
        let name = rec.name.clone();
        let store = self.store_dir.clone();
        let dir = rec.dir(&store);
        hooks::run(&rec, &store, &format!("pre-{op}"))
            .map_err(|e| e.context(format!("{op} of VDB {name} refused by its hook")))?;
        let was_running = self.vdb_pid(&rec, st).is_some();
        if was_running {
            self.stop_with_hooks(&rec, st)
                .map_err(|e| e.context(format!("{op} of VDB {name}: stopping it failed")))?;
        }
        let undo_name = format!(
            "auto-before-{op}-{}",
            crate::tree::snapshot_name_for(crate::tree::dataset::now())
        );
        let undo = self.take_vdb_snapshot(&rec, st, Some(&undo_name), "auto")?;
        let old_parent = rec.parent.clone();
        rec.pending = Some(Pending {
            op: op.to_string(),
            rollback: Some(undo_name.clone()),
            parent: old_parent.clone(),
            was_running,
        });
        self.save_vdb(&rec)?;
        dir.log_line(&format!("{op} onto {ds}@{snap} (undo point {})", undo.name));
        let target = if refresh {
            self.recovery_target(ds, snap)
        } else {
            None
        };
        let r = (|| {
            self.checkpoint_and_unmount(&rec)?;
            self.datasets.reset_to_snapshot(&name, ds, snap, refresh)?;
            if refresh {
                rec.parent = format!("{ds}@{snap}");
            }
            self.mount_vdb(&rec)?;
            vdb::configure(&rec, &store, target.as_ref(), refresh)?;
            vdb::check_config(&rec)?;
            if refresh || was_running {
                let configure_clone = || {
                    if refresh {
                        hooks::run(&rec, &store, "configure-clone")
                    } else {
                        Ok(())
                    }
                };
                self.start_with_hooks(&rec, st, &configure_clone)?;
                if !was_running {
                    // configure-clone needed it up; it goes back to stopped, as it was.
                    self.stop_with_hooks(&rec, st)?;
                }
            }
            anyhow::Ok(())
        })();
        match r {
            Ok(()) => {
                rec.pending = None;
                rec.running = was_running;
                rec.event(format!("{op} onto {ds}@{snap}"));
                self.save_vdb(&rec)?;
                dir.log_line(&format!("{op} done"));
                hooks::run(&rec, &store, &format!("post-{op}"))
                    .map_err(|e| e.context(format!("VDB {name}: {op} done, but")))
            }
            Err(e) => {
                dir.log_line(&format!("{op} failed: {e:#}; going back to {}", undo.name));
                let p = rec.pending.clone().expect("set above");
                rec.parent = old_parent;
                match self.undo_switch(&mut rec, st, &p) {
                    Ok(()) => Err(e.context(format!(
                        "{op} of VDB {name} failed; it is back as it was (from {})",
                        undo.name
                    ))),
                    Err(e2) => Err(e.context(format!(
                        "{op} of VDB {name} failed, and going back to {} failed too ({e2:#}); \
                         'vdbfs vdb rewind {name} --to {}' retries",
                        undo.name, undo_name
                    ))),
                }
            }
        }
    }

    /// Puts a VDB back on its undo snapshot after a failed (or interrupted) refresh/rewind.
    fn undo_switch(
        self: &Arc<Self>,
        rec: &mut VdbRecord,
        st: &Slot,
        p: &Pending,
    ) -> anyhow::Result<()> {
        self.stop_postgres(rec, st);
        rec.parent = p.parent.clone();
        if let Some(undo) = &p.rollback {
            self.checkpoint_and_unmount(rec)?;
            self.datasets
                .reset_to_snapshot(&rec.name, &rec.name, undo, false)?;
        }
        self.mount_vdb(rec)?;
        vdb::configure(rec, &self.store_dir, None, false)?;
        if p.was_running {
            self.start_postgres(rec, st)?;
        }
        rec.pending = None;
        rec.running = p.was_running;
        rec.event(format!("{} undone", p.op));
        self.save_vdb(rec)
    }

    // ---- status --------------------------------------------------------------------------

    fn vdb_status_of(&self, rec: &VdbRecord, with_usage: bool) -> anyhow::Result<VdbStatus> {
        let st = self.vdbs.state(&rec.name);
        // Running means this daemon's start finished (postgres accepts connections); a
        // postmaster it has not finished starting (or one left by an earlier daemon) is starting.
        let ours = st.rt.lock().pid.filter(|p| pg::pid_alive(*p));
        let pid = self.vdb_pid(rec, &st);
        let last_error = st.rt.lock().last_error.clone();
        let (state, fault) = match (&rec.pending, pid, rec.running) {
            (Some(p), _, _) if p.op == "create" => ("creating", None),
            (Some(p), _, _) => (
                "fault",
                Some(format!("a {} was cut short; the daemon undoes it", p.op)),
            ),
            (None, Some(_), _) if ours.is_some() => ("running", None),
            (None, Some(_), _) => ("starting", None),
            (None, None, false) => ("stopped", None),
            (None, None, true) if last_error.is_none() => ("starting", None),
            (None, None, true) => (
                "fault",
                Some(format!(
                    "postgres of VDB {} is not running{}; postgres log: {}",
                    rec.name,
                    last_error.map(|e| format!(": {e}")).unwrap_or_default(),
                    rec.dir(&self.store_dir).postgres_log().display()
                )),
            ),
        };
        let (mut snapshots, mut bookmarks) = (Vec::new(), Vec::new());
        for s in self.datasets.snapshots(Some(&rec.name)).unwrap_or_default() {
            match vdb_props(&s).map(|p| p.kind) {
                Some(k) if k == "bookmark" => bookmarks.push(s.full_name()),
                _ => snapshots.push(s.full_name()),
            }
        }
        let (logical, unique) = if with_usage {
            self.datasets
                .dataset_usage()?
                .get(&rec.name)
                .copied()
                .unwrap_or_default()
        } else {
            (0, 0)
        };
        let dir: VdbDir = rec.dir(&self.store_dir);
        Ok(VdbStatus {
            name: rec.name.clone(),
            state: state.into(),
            port: rec.port,
            data_dir: rec.data_dir.clone(),
            socket_dir: dir.socket_dir(),
            pid,
            parent: rec.parent.clone(),
            parent_dataset: rec.parent_dataset().to_string(),
            conn: rec.conn(&self.store_dir),
            tcp_conn: rec.tcp_conn(),
            settings: rec.settings.iter().cloned().collect(),
            hooks: hooks::hooks_dir(rec, &self.store_dir),
            log: dir.log(),
            postgres_log: dir.postgres_log(),
            logical_bytes: logical,
            unique_bytes: unique,
            snapshots,
            bookmarks,
            created: rec.created.clone(),
            fault,
            events: rec.events.clone(),
        })
    }

    pub(super) fn vdb_status(&self, name: &str) -> anyhow::Result<VdbStatus> {
        let rec = self.vdb_record(name)?;
        self.vdb_status_of(&rec, true)
    }

    pub(super) fn vdb_list(&self) -> anyhow::Result<Vec<VdbStatus>> {
        let usage = self.datasets.dataset_usage()?;
        self.vdb_records()?
            .iter()
            .map(|r| {
                let mut s = self.vdb_status_of(r, false)?;
                let (l, u) = usage.get(&r.name).copied().unwrap_or_default();
                s.logical_bytes = l;
                s.unique_bytes = u;
                Ok(s)
            })
            .collect()
    }

    // ---- timeflow ------------------------------------------------------------------------

    pub(super) fn timeflow(&self, only: Option<&str>) -> anyhow::Result<Vec<TimeflowNode>> {
        let datasets = self.datasets.list()?;
        if let Some(d) = only {
            if !datasets.iter().any(|r| r.name == d) {
                return Err(NameError::NotFound(d.to_string()).into());
            }
        }
        let sources: HashMap<String, crate::source::SourceRecord> = self
            .source_records()?
            .into_iter()
            .map(|r| (r.name.clone(), r))
            .collect();
        let vdbs: HashMap<String, VdbRecord> = self
            .vdb_records()?
            .into_iter()
            .map(|r| (r.name.clone(), r))
            .collect();
        let mut snaps: HashMap<String, Vec<crate::tree::SnapshotInfo>> = HashMap::new();
        for s in self.datasets.snapshots(None)? {
            snaps.entry(s.dataset.clone()).or_default().push(s);
        }
        // Parent snapshot of each dataset: a VDB's current parent, else a clone's origin.
        let mut parent_of: HashMap<String, String> = HashMap::new();
        for r in &datasets {
            let p = match vdbs.get(&r.name) {
                Some(v) => Some(v.parent.clone()),
                None => self.datasets.origin(r.id)?,
            };
            if let Some(p) = p {
                parent_of.insert(r.name.clone(), p);
            }
        }
        let all_snaps: std::collections::HashSet<String> =
            snaps.values().flatten().map(|s| s.full_name()).collect();
        let mut children_of: HashMap<String, Vec<String>> = HashMap::new();
        let mut roots = Vec::new();
        for r in &datasets {
            match parent_of.get(&r.name).filter(|p| all_snaps.contains(*p)) {
                Some(p) => children_of
                    .entry(p.clone())
                    .or_default()
                    .push(r.name.clone()),
                None => roots.push(r.name.clone()),
            }
        }
        let ctx = FlowCtx {
            daemon: self,
            sources: &sources,
            vdbs: &vdbs,
            snaps: &snaps,
            children_of: &children_of,
            parent_of: &parent_of,
        };
        Ok(match only {
            Some(d) => vec![ctx.node(d, 0)],
            None => roots.iter().map(|d| ctx.node(d, 0)).collect(),
        })
    }

    // ---- recovery and supervision --------------------------------------------------------

    /// Undoes VDB operations a dead daemon cut short.
    pub(super) fn recover_vdbs(self: &Arc<Self>) {
        let Ok(recs) = self.vdb_records() else {
            return;
        };
        for mut rec in recs {
            let Some(p) = rec.pending.clone() else {
                continue;
            };
            let st = self.vdbs.state(&rec.name);
            let _g = st.op.lock();
            tracing::warn!(vdb = %rec.name, op = %p.op, "undoing an operation cut short by a daemon stop");
            if p.op == "create" {
                self.remove_vdb_everything(&rec, &st);
                self.vdbs.forget(&rec.name);
            } else if let Err(e) = self.undo_switch(&mut rec, &st, &p) {
                tracing::error!(vdb = %rec.name, "cannot undo the cut-short {}: {e:#}", p.op);
            }
        }
    }

    /// One supervisor round: start wanted VDBs whose postgres is not running (after a daemon
    /// restart, or when it died), with backoff.
    pub(super) fn supervise_vdbs(self: &Arc<Self>) {
        let Ok(recs) = self.vdb_records() else {
            return;
        };
        for rec in recs
            .into_iter()
            .filter(|r| r.running && r.pending.is_none())
        {
            let st = self.vdbs.state(&rec.name);
            let Some(_g) = st.op.try_lock() else { continue };
            let (ours, due) = {
                let rt = st.rt.lock();
                (rt.pid.filter(|p| pg::pid_alive(*p)), rt.due())
            };
            if ours.is_some() || !due {
                continue;
            }
            if st.rt.lock().pid.take().is_some() {
                tracing::error!(vdb = %rec.name, "the VDB's postgres died; starting it again");
            }
            let r = (|| {
                self.mount_vdb(&rec)?;
                self.start_with_hooks(&rec, &st, &|| Ok(()))
            })();
            if let Err(e) = r {
                let wait = st.rt.lock().failed(format!("{e:#}"));
                tracing::error!(vdb = %rec.name, "VDB did not start (next try in {wait:?}): {e:#}");
            }
        }
    }
}

fn refuse_pending(rec: &VdbRecord) -> anyhow::Result<()> {
    match &rec.pending {
        Some(p) => bail!(
            "VDB {} is in the middle of a {}; wait for it to finish",
            rec.name,
            p.op
        ),
        None => Ok(()),
    }
}

struct FlowCtx<'a> {
    daemon: &'a Daemon,
    sources: &'a HashMap<String, crate::source::SourceRecord>,
    vdbs: &'a HashMap<String, VdbRecord>,
    snaps: &'a HashMap<String, Vec<crate::tree::SnapshotInfo>>,
    children_of: &'a HashMap<String, Vec<String>>,
    parent_of: &'a HashMap<String, String>,
}

impl FlowCtx<'_> {
    fn node(&self, dataset: &str, depth: usize) -> TimeflowNode {
        let mut n = TimeflowNode {
            kind: "dataset".into(),
            name: dataset.to_string(),
            lsn: None,
            timeline: None,
            created: None,
            state: None,
            port: None,
            note: None,
            children: Vec::new(),
        };
        if let Some(s) = self.sources.get(dataset) {
            n.kind = "source".into();
            n.state = Some(
                if s.linking {
                    "linking"
                } else if s.enabled {
                    "enabled"
                } else {
                    "disabled"
                }
                .into(),
            );
            n.note = Some(s.mode.as_str().into());
            n.created = Some(s.created.clone());
        } else if let Some(v) = self.vdbs.get(dataset) {
            n.kind = "vdb".into();
            n.port = Some(v.port);
            n.created = Some(v.created.clone());
            n.state = self.daemon.vdb_status_of(v, false).ok().map(|s| s.state);
        } else if let Some(p) = self.parent_of.get(dataset) {
            n.note = Some(format!("clone of {p}"));
        }
        if depth > 64 {
            return n; // a cycle cannot happen (clones point at older snapshots); stay safe
        }
        for s in self.snaps.get(dataset).into_iter().flatten() {
            let full = s.full_name();
            let mut sn = TimeflowNode {
                kind: "snapshot".into(),
                name: full.clone(),
                lsn: None,
                timeline: None,
                created: Some(api::rfc3339(s.rec.created.secs)),
                state: None,
                port: None,
                note: None,
                children: Vec::new(),
            };
            if let Some(p) = super::sources::snapshot_props(s) {
                sn.lsn = Some(p.lsn);
                sn.timeline = Some(p.timeline);
                sn.note = Some("validated sync".into());
            } else if let Some(p) = vdb_props(s) {
                sn.lsn = p.lsn;
                sn.timeline = p.timeline;
                if p.kind == "bookmark" {
                    sn.kind = "bookmark".into();
                } else if p.kind == "auto" {
                    sn.note = Some("automatic undo point".into());
                }
            }
            for c in self.children_of.get(&full).into_iter().flatten() {
                sn.children.push(self.node(c, depth + 1));
            }
            n.children.push(sn);
        }
        n
    }
}

/// For `snapshot list`: the kind of a VDB snapshot.
pub fn snapshot_kind(s: &crate::tree::SnapshotInfo) -> Option<String> {
    vdb_props(s).map(|p| p.kind)
}
