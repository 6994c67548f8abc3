//! Prepared and verified snapshots, made in the background, one at a time, at a lower CPU
//! priority (`nice -n 10` for the postgres and pg_amcheck it runs):
//!
//! - *Preparing* a validated-sync snapshot `NAME@SNAP`: the internal dataset `.prep.NAME` is
//!   pointed at the snapshot's tree, mounted at `STORE/prepare/NAME/data`, its WAL cut at the
//!   snapshot's LSN, started in standby mode, promoted, and shut down cleanly; then snapshot
//!   `.prep.NAME@SNAP` is taken: the prepared image. A VDB cloned from it starts as a cleanly
//!   shut down primary, with no redo.
//! - *Verifying* (sources linked with `--verify`): the prepared image is started again on the
//!   same dataset and checked with `pg_amcheck --all --heapallindexed`; the result is written
//!   into the source snapshot's properties.
//!
//! Invariants: the prepared image exists only complete (its snapshot is the last step); a
//! preparation cut short leaves nothing the next daemon does not undo at start (its postgres
//! stopped by PID, its mount released) and the snapshot is prepared again; the preparer holds
//! no source's `op` lock; `Preparer::job` is held for the whole of one job, so unlink and
//! shutdown wait for the job they stopped to finish its cleanup.

use super::service::SourceService;
use super::{SnapshotProps, SourceRecord, Verified};
use crate::pg::managed::{Managed, Slot};
use crate::pg::provision::{self, FirstStart, Recovery, Target};
use crate::pg::{self, conf, RunFiles};
use parking_lot::Mutex;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long preparing one snapshot may take (replaying up to `checkpoint_timeout` of WAL).
const PREPARE_TIMEOUT: Duration = Duration::from_secs(3600);
/// How long pg_amcheck may take on one image.
const VERIFY_TIMEOUT: Duration = Duration::from_secs(4 * 3600);
/// How many lines of pg_amcheck's report a snapshot keeps.
const MAX_FAILURE_LINES: usize = 20;
/// A job that failed is tried again after this long.
const RETRY_AFTER: Duration = Duration::from_secs(600);

/// The internal dataset holding a source's prepared images (as its snapshots).
pub fn prepared_dataset(source: &str) -> String {
    format!(".prep.{source}")
}

/// Properties of a prepared image (`.prep.NAME@SNAP`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PreparedProps {
    /// The source snapshot it was prepared from, `NAME@SNAP`.
    pub snapshot: String,
    /// The LSN it was recovered to, and the timeline it was promoted to.
    pub lsn: String,
    pub timeline: u32,
    pub prepared_at: String,
    pub seconds: f64,
}

/// The preparer's state.
#[derive(Default)]
pub(crate) struct Preparer {
    /// Held for the whole of one job.
    job: Mutex<()>,
    /// The daemon is stopping: the job in progress ends at its next step.
    stopping: AtomicBool,
    /// A source being unlinked: its job in progress ends.
    cancel: Mutex<Option<String>>,
    /// Jobs (`NAME@SNAP`) that failed, and when they may be tried again.
    retry: Mutex<std::collections::HashMap<String, Instant>>,
}

impl Preparer {
    fn due(&self, full: &str) -> bool {
        self.retry
            .lock()
            .get(full)
            .is_none_or(|t| Instant::now() >= *t)
    }

    fn failed(&self, full: &str) {
        self.retry
            .lock()
            .insert(full.to_string(), Instant::now() + RETRY_AFTER);
    }
}

/// Files of a source's preparation: `STORE/prepare/NAME/` with the mount point `data`, the
/// socket directory, log, access files and the postmaster PID.
struct PrepDir(PathBuf);

impl RunFiles for PrepDir {
    fn root(&self) -> &Path {
        &self.0
    }
}

const PREP_HBA: &str = "# vdbfs preparation: only the postgres OS user, over the private socket\n\
                        local all postgres trust\n";

impl SourceService {
    fn prep_dir(&self, name: &str) -> PrepDir {
        PrepDir(self.store_dir.join("prepare").join(name))
    }

    fn prep_mount(&self, name: &str) -> PathBuf {
        self.prep_dir(name).0.join("data")
    }

    fn prep_slot(&self, name: &str) -> Arc<Slot> {
        self.slots.state(&prepared_dataset(name))
    }

    /// The postgres a preparation or verification runs (niced, no TCP).
    fn prep_postgres(&self, rec: &SourceRecord) -> Managed {
        let dir = self.prep_dir(&rec.name);
        let mut cluster = dir.cluster(&rec.install, &self.prep_mount(&rec.name), rec.staging_port);
        cluster.nice = true;
        Managed {
            cluster,
            pid_file: dir.0.join("prep.pid"),
            name: format!("{} (preparation)", rec.name),
        }
    }

    fn cancelled(&self, name: &str) -> bool {
        self.prep.stopping.load(Ordering::SeqCst)
            || self.prep.cancel.lock().as_deref() == Some(name)
    }

    fn check_cancel(&self, name: &str) -> anyhow::Result<()> {
        if self.cancelled(name) {
            anyhow::bail!("stopped (the daemon stops, or the source is being unlinked)");
        }
        Ok(())
    }

    /// The names of the source's prepared images.
    pub(super) fn prepared_names(&self, name: &str) -> HashSet<String> {
        self.datasets
            .snapshots(Some(&prepared_dataset(name)))
            .map(|v| v.into_iter().map(|s| s.rec.name).collect())
            .unwrap_or_default()
    }

    /// The names of the snapshots of `name` that have a prepared image.
    pub fn prepared_images(&self, name: &str) -> HashSet<String> {
        self.prepared_names(name)
    }

    /// Whether `NAME@SNAP` has a prepared image.
    pub fn is_prepared(&self, name: &str, snap: &str) -> bool {
        self.prepared_names(name).contains(snap)
    }

    /// The preparer's round: at most one job (the newest snapshot not prepared yet, else the
    /// newest prepared one not verified yet, of a source that verifies). Returns whether it
    /// did one.
    pub fn prepare_round(&self) -> bool {
        if self.prep.stopping.load(Ordering::SeqCst) {
            return false;
        }
        let Some(_job) = self.prep.job.try_lock() else {
            return false;
        };
        let Ok(recs) = self.records() else {
            return false;
        };
        self.cleanup_prepared(&recs);
        let mut verify = None;
        for rec in recs.iter().filter(|r| !r.linking) {
            let Ok(snaps) = self.datasets.snapshots(Some(&rec.name)) else {
                continue;
            };
            let prepared = self.prepared_names(&rec.name);
            for s in snaps.iter().rev() {
                let Some(p) = super::snapshot_props(s) else {
                    continue;
                };
                if !self.prep.due(&s.full_name()) {
                    continue;
                }
                if !prepared.contains(&s.rec.name) {
                    self.prepare(rec, &s.rec.name, &p);
                    return true;
                } else if rec.verify && p.verified.is_none() && verify.is_none() {
                    verify = Some((rec.clone(), s.rec.name.clone()));
                }
            }
        }
        if let Some((rec, snap)) = verify {
            self.verify(&rec, &snap);
            return true;
        }
        false
    }

    /// Prepared images whose snapshot is gone, and internal datasets and archives of sources
    /// that are gone, go.
    fn cleanup_prepared(&self, recs: &[SourceRecord]) {
        let names: HashSet<&str> = recs.iter().map(|r| r.name.as_str()).collect();
        for d in self.datasets.list().unwrap_or_default() {
            let Some(src) = d.name.strip_prefix(".prep.") else {
                continue;
            };
            if !names.contains(src) {
                let _ = self.mounts.release(&d.name, &self.prep_mount(src));
                if let Err(e) = crate::catalog::delete_dataset(&self.datasets, &d.name) {
                    tracing::error!(dataset = %d.name, "cannot delete prepared images: {e:#}");
                }
                continue;
            }
            let have: HashSet<String> = self
                .datasets
                .snapshots(Some(src))
                .map(|v| v.into_iter().map(|s| s.rec.name).collect())
                .unwrap_or_default();
            for s in self.prepared_names(src) {
                if !have.contains(&s) {
                    match self.datasets.delete_snapshot(&d.name, &s) {
                        Ok(()) => {
                            tracing::info!(image = %format!("{}@{s}", d.name), "prepared image of a deleted snapshot deleted")
                        }
                        Err(e) => tracing::error!(
                            "cannot delete the prepared image {}@{s}: {e:#}",
                            d.name
                        ),
                    }
                }
            }
        }
        for src in self.archive.sources().unwrap_or_default() {
            if !names.contains(src.as_str()) {
                if let Err(e) = self.archive.remove(&crate::archive::Key::source(&src)) {
                    tracing::error!(source = %src, "cannot remove the WAL archive of a source that is gone: {e:#}");
                }
            }
        }
    }

    /// Changes a source snapshot's properties (the preparer's results).
    fn mark(&self, name: &str, snap: &str, f: impl FnOnce(&mut SnapshotProps)) {
        let Ok(snaps) = self.datasets.snapshots(Some(name)) else {
            return;
        };
        let Some(mut p) = snaps
            .iter()
            .find(|s| s.rec.name == snap)
            .and_then(super::snapshot_props)
        else {
            return;
        };
        f(&mut p);
        let r = serde_json::to_vec(&p)
            .map_err(anyhow::Error::from)
            .and_then(|b| self.datasets.set_snapshot_props(name, snap, &b));
        if let Err(e) = r {
            tracing::error!(snapshot = %format!("{name}@{snap}"), "cannot record the preparer's result: {e:#}");
        }
    }

    /// Points `.prep.NAME` at `from_ds@from_snap` and mounts it.
    fn reset_prep(&self, rec: &SourceRecord, from_ds: &str, from_snap: &str) -> anyhow::Result<()> {
        let ds = prepared_dataset(&rec.name);
        if self.datasets.record(&ds)?.is_none() {
            self.datasets.create_internal(&ds)?;
        }
        let mp = self.prep_mount(&rec.name);
        self.mounts.release(&ds, &mp)?;
        self.datasets.checkpoint()?;
        self.datasets
            .reset_to_snapshot(&ds, from_ds, from_snap, false)?;
        self.prep_dir(&rec.name).create(PREP_HBA)?;
        self.mounts.mount(&ds, &mp)?;
        Ok(())
    }

    /// Makes the mounted image a private cluster of the preparer (no TCP, no replication, no
    /// archiving) set up for `start`.
    fn configure_prep(
        &self,
        rec: &SourceRecord,
        cluster: &pg::Cluster,
        start: &FirstStart,
    ) -> anyhow::Result<()> {
        let data = &cluster.data_dir;
        pg::remove_run_files(data);
        for f in ["standby.signal", "recovery.signal"] {
            let _ = std::fs::remove_file(data.join(f));
        }
        if let Ok(rd) = std::fs::read_dir(data.join("pg_replslot")) {
            for e in rd.flatten() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        let s = |v: &str| Some(v.to_string());
        let mut settings: Vec<(&str, Option<String>)> = self
            .prep_dir(&rec.name)
            .own_settings(rec.staging_port, format!("vdbfs-prepare-{}", rec.name))
            .into_iter()
            .filter(|(k, _)| *k != "listen_addresses")
            .collect();
        settings.extend([
            ("listen_addresses", s("")),
            ("primary_conninfo", None),
            ("primary_slot_name", None),
            ("hot_standby_feedback", None),
            ("archive_mode", s("off")),
            ("archive_command", None),
            ("archive_library", None),
            ("synchronous_standby_names", s("")),
            ("wal_receiver_status_interval", None),
        ]);
        settings.extend(provision::first_start(data, cluster, start)?);
        conf::edit_auto_conf(data, &settings)
    }

    /// Stops the preparation's postgres and unmounts its dataset.
    fn end_prep(&self, rec: &SourceRecord) {
        self.prep_postgres(rec).stop(&self.prep_slot(&rec.name));
        let ds = prepared_dataset(&rec.name);
        if let Err(e) = self.mounts.release(&ds, &self.prep_mount(&rec.name)) {
            tracing::error!(dataset = %ds, "cannot unmount the preparation: {e:#}");
        }
    }

    fn prepare(&self, rec: &SourceRecord, snap: &str, props: &SnapshotProps) {
        let full = format!("{}@{snap}", rec.name);
        let t = Instant::now();
        tracing::info!(snapshot = %full, "preparing the snapshot's image");
        let r = self.prepare_steps(rec, snap, props, t);
        self.end_prep(rec);
        match r {
            Ok(()) => {
                tracing::info!(snapshot = %full, seconds = t.elapsed().as_secs_f64(), "prepared: VDBs of it start without redo");
                if props.prepare_error.is_some() {
                    self.mark(&rec.name, snap, |p| p.prepare_error = None);
                }
            }
            Err(e) if self.cancelled(&rec.name) => {
                tracing::info!(snapshot = %full, "preparation stopped: {e:#}")
            }
            Err(e) => {
                tracing::error!(snapshot = %full, "preparation failed (VDBs of it replay WAL instead; tried again in {} s): {e:#}", RETRY_AFTER.as_secs());
                self.prep.failed(&full);
                self.mark(&rec.name, snap, |p| {
                    p.prepare_error = Some(format!("{e:#}"))
                });
            }
        }
    }

    fn prepare_steps(
        &self,
        rec: &SourceRecord,
        snap: &str,
        props: &SnapshotProps,
        t: Instant,
    ) -> anyhow::Result<()> {
        let lsn = pg::lsn::parse(&props.lsn)
            .ok_or_else(|| anyhow::anyhow!("the snapshot's LSN {:?} is unreadable", props.lsn))?;
        self.reset_prep(rec, &rec.name, snap)?;
        self.check_cancel(&rec.name)?;
        let m = self.prep_postgres(rec);
        let start = FirstStart::Recover(Recovery {
            cut: Some(Target {
                lsn,
                timeline: props.timeline,
            }),
            ..Default::default()
        });
        self.configure_prep(rec, &m.cluster, &start)?;
        let slot = self.prep_slot(&rec.name);
        let started = Instant::now();
        let deadline = started + PREPARE_TIMEOUT;
        let missing = || anyhow::anyhow!("the preparation's data directory is not mounted");
        m.start(&slot, PREPARE_TIMEOUT, missing, |pid| {
            provision::finish(&m.cluster, pid, started, deadline, &|_| {}, &|| {
                m.log_tail(15)
            })?;
            Ok(pid)
        })?;
        self.check_cancel(&rec.name)?;
        let timeline = provision::current_timeline(&m.cluster)?;
        // A clean shutdown: its checkpoint is what lets a VDB start without redo.
        m.cluster.stop("fast", PREPARE_TIMEOUT)?;
        slot.rt.lock().pid = None;
        let _ = std::fs::remove_file(&m.pid_file);
        let out = pg::run(
            pg::as_postgres(&rec.install.bin("pg_controldata")).arg(&m.cluster.data_dir),
            Duration::from_secs(60),
        )?;
        let state = conf::parse_controldata(&out.stdout_text())
            .get("Database cluster state")
            .cloned()
            .unwrap_or_default();
        if state != "shut down" {
            anyhow::bail!("the prepared image was not shut down cleanly (cluster state {state:?})");
        }
        provision::clear_recovery(&m.cluster.data_dir, &|_| None)?;
        pg::remove_run_files(&m.cluster.data_dir);
        self.check_cancel(&rec.name)?;
        let ds = prepared_dataset(&rec.name);
        self.mounts.release(&ds, &self.prep_mount(&rec.name))?;
        let pp = PreparedProps {
            snapshot: format!("{}@{snap}", rec.name),
            lsn: props.lsn.clone(),
            timeline,
            prepared_at: crate::time::rfc3339_now(),
            seconds: t.elapsed().as_secs_f64(),
        };
        self.datasets
            .snapshot_with_props(&ds, Some(snap), Some(serde_json::to_vec(&pp)?))?;
        Ok(())
    }

    fn verify(&self, rec: &SourceRecord, snap: &str) {
        let full = format!("{}@{snap}", rec.name);
        tracing::info!(snapshot = %full, "verifying the prepared image with pg_amcheck");
        let r = self.verify_steps(rec, snap);
        self.end_prep(rec);
        let v = match r {
            Ok(v) => v,
            Err(e) if self.cancelled(&rec.name) => {
                tracing::info!(snapshot = %full, "verification stopped: {e:#}");
                return;
            }
            // Not a finding of pg_amcheck: nothing is recorded, it runs again later.
            Err(e) => {
                tracing::error!(snapshot = %full, "the verification could not run (tried again in {} s): {e:#}", RETRY_AFTER.as_secs());
                self.prep.failed(&full);
                return;
            }
        };
        if v.ok {
            tracing::info!(snapshot = %full, "verified: pg_amcheck found nothing");
        } else {
            tracing::error!(snapshot = %full, failures = %v.failures.join(" | "), "verification failed");
        }
        self.mark(&rec.name, snap, |p| p.verified = Some(v));
    }

    fn verify_steps(&self, rec: &SourceRecord, snap: &str) -> anyhow::Result<Verified> {
        self.reset_prep(rec, &prepared_dataset(&rec.name), snap)?;
        self.check_cancel(&rec.name)?;
        let m = self.prep_postgres(rec);
        self.configure_prep(rec, &m.cluster, &FirstStart::Clean)?;
        let slot = self.prep_slot(&rec.name);
        let missing = || anyhow::anyhow!("the preparation's data directory is not mounted");
        m.start(&slot, Duration::from_secs(600), missing, Ok)?;
        self.check_cancel(&rec.name)?;
        let out = pg::run_unchecked(
            pg::as_postgres_niced(&rec.install.bin("pg_amcheck"), true)
                .args(["--all", "--install-missing", "--heapallindexed", "-h"])
                .arg(&m.cluster.socket_dir)
                .args(["-p", &m.cluster.port.to_string(), "-U", "postgres"]),
            VERIFY_TIMEOUT,
            |_| {},
        )?;
        self.check_cancel(&rec.name)?;
        // A server that went away meanwhile is no finding about the data.
        if m.cluster.postmaster_pid().is_none() {
            anyhow::bail!(
                "the image's postgres stopped while pg_amcheck ran: {}",
                pg::last_lines(&out.stderr_text(), 3)
            );
        }
        let stdout = out.stdout_text();
        let ok = out.status.success() && stdout.is_empty();
        let failures: Vec<String> = stdout
            .lines()
            .chain(out.stderr_text().lines())
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .take(MAX_FAILURE_LINES)
            .map(str::to_string)
            .collect();
        let failures = if ok || !failures.is_empty() {
            failures
        } else {
            vec![format!("pg_amcheck exited with {}", out.status)]
        };
        Ok(Verified {
            ok,
            failures: if ok { Vec::new() } else { failures },
            at: crate::time::rfc3339_now(),
        })
    }

    /// Stops the preparer (daemon shutdown): the job in progress ends at its next step, its
    /// postgres stopped.
    pub(super) fn stop_preparer(&self) {
        self.prep.stopping.store(true, Ordering::SeqCst);
        let recs = self.records().unwrap_or_default();
        for rec in &recs {
            self.prep_postgres(rec).stop(&self.prep_slot(&rec.name));
        }
        let _g = self.prep.job.lock();
        for rec in &recs {
            self.end_prep(rec);
        }
    }

    /// Ends a preparation of `name` in progress and deletes its prepared images (unlink, a
    /// link rolled back).
    pub(super) fn drop_prepared(&self, name: &str) {
        *self.prep.cancel.lock() = Some(name.to_string());
        if let Ok(Some(rec)) = self.records.get(name) {
            self.prep_postgres(&rec).stop(&self.prep_slot(name));
        }
        {
            let _g = self.prep.job.lock();
            let ds = prepared_dataset(name);
            if let Err(e) = self.mounts.release(&ds, &self.prep_mount(name)) {
                tracing::error!(dataset = %ds, "cannot unmount the preparation: {e:#}");
            }
            if let Err(e) = crate::catalog::delete_dataset(&self.datasets, &ds) {
                tracing::error!(dataset = %ds, "cannot delete the prepared images: {e:#}");
            }
            let _ = std::fs::remove_dir_all(&self.prep_dir(name).0);
        }
        *self.prep.cancel.lock() = None;
        self.slots.forget(&prepared_dataset(name));
    }

    /// At daemon start: what a preparation cut short left (its postgres, stopped by PID; its
    /// mount, which the daemon re-established) goes; the snapshot is prepared again.
    pub(super) fn recover_preparation(&self, rec: &SourceRecord) {
        let m = self.prep_postgres(rec);
        if pg::read_pid(&m.pid_file).is_some() || m.cluster.postmaster_pid().is_some() {
            tracing::warn!(source = %rec.name, "stopping a preparation cut short by a daemon stop");
        }
        self.end_prep(rec);
    }
}
