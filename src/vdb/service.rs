//! [`VdbService`]: the VDB workflows that are one step (start, stop, snapshot and bookmark,
//! delete), a VDB's postgres lifecycle with its hooks and the provisioning start, and recovery
//! and supervision. Create, refresh/rewind and status have their own modules.
//!
//! Invariants: one operation at a time per VDB (its slot's `op` lock; the supervisor only
//! try-locks it); port choice and record creation are serialized (`create_lock`); a record with
//! `pending` is written before the first step that changes a VDB's data and cleared after the
//! last, so a daemon that dies in between leaves what the next daemon undoes; a VDB's postgres
//! is stopped before its mount goes away.

use super::configure;
use super::hooks::{self, Hook};
use super::{VdbOp, VdbRecord, VdbSnapshotProps};
use crate::api::{refusal, ErrorKind, Progress, SnapshotKind, VdbSnapshot};
use crate::mounts::MountTable;
use crate::pg::managed::{Registry, Slot};
use crate::pg::provision::PROVISION_SIGNAL;
use crate::pg::{self, RunFiles};
use crate::refuse;
use crate::source::SourceService;
use crate::store::records::Records;
use crate::tree::Datasets;
use parking_lot::Mutex;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a VDB's postgres may take to start (crash recovery of what its snapshot holds).
pub(super) const START_TIMEOUT: Duration = Duration::from_secs(300);
/// What postgres logs when the WAL ends before a recovery target (a FATAL with no error code
/// of its own: its log is the only place that says it).
const TARGET_NOT_REACHED: &str = "recovery ended before configured recovery target was reached";

pub struct VdbService {
    pub(super) store_dir: PathBuf,
    pub(super) datasets: Arc<Datasets>,
    pub(super) mounts: Arc<MountTable>,
    pub(super) records: Records<VdbRecord>,
    pub(super) sources: Arc<SourceService>,
    pub(super) slots: Registry,
    /// Serializes VDB name checks, port choice and record creation.
    pub(super) create_lock: Mutex<()>,
    /// The pool new VDBs take a port from when none is given.
    pub(super) ports: (u16, u16),
    /// Held while a VDB's tree and its record's archive generation change together, and by
    /// the archiver for each VDB it serves (see the module invariants).
    pub(super) archive_lock: Mutex<()>,
    /// How many undo snapshots (`NAME@auto-before-*`) each VDB keeps.
    pub(super) undo_keep: u32,
    /// The idle TTL of VDBs created without `--idle-ttl` (`serve --default-idle-ttl`).
    pub(super) default_idle_ttl: Option<Duration>,
    /// When each VDB last had a client.
    pub(super) idle: super::lifetime::IdleClock,
}

/// How many undo snapshots each VDB keeps unless `vdbfs serve --keep-undo` says otherwise.
pub const DEFAULT_UNDO_KEEP: u32 = 3;

impl VdbService {
    pub fn new(
        store_dir: PathBuf,
        datasets: Arc<Datasets>,
        mounts: Arc<MountTable>,
        records: Records<VdbRecord>,
        sources: Arc<SourceService>,
        ports: (u16, u16),
    ) -> VdbService {
        VdbService {
            store_dir,
            datasets,
            mounts,
            records,
            sources,
            slots: Registry::default(),
            create_lock: Mutex::new(()),
            ports,
            archive_lock: Mutex::new(()),
            undo_keep: DEFAULT_UNDO_KEEP,
            default_idle_ttl: None,
            idle: Default::default(),
        }
    }

    /// VDBs created without `--idle-ttl` get this one.
    pub fn default_idle_ttl(mut self, d: Option<Duration>) -> VdbService {
        self.default_idle_ttl = d;
        self
    }

    /// The idle clock goes on from what the store kept ([`super::lifetime::IdleClock::load`]).
    pub fn idle_clock(mut self, clock: super::lifetime::IdleClock) -> VdbService {
        self.idle = clock;
        self
    }

    /// Each VDB keeps its last `n` undo snapshots (taken before refresh and rewind).
    pub fn keep_undo(mut self, n: u32) -> VdbService {
        self.undo_keep = n;
        self
    }

    // ---- records -------------------------------------------------------------------------

    /// Every VDB's record.
    pub fn records(&self) -> anyhow::Result<Vec<VdbRecord>> {
        Ok(self.records.list()?)
    }

    pub(super) fn record(&self, name: &str) -> anyhow::Result<VdbRecord> {
        self.records.get(name)?.ok_or_else(|| {
            refusal(
                ErrorKind::NotFound,
                format!("no VDB {name}; 'vdbfs vdb list' shows the VDBs"),
            )
        })
    }

    pub fn is_vdb(&self, name: &str) -> bool {
        self.records.contains(name).unwrap_or(false)
    }

    // ---- postgres of a VDB ---------------------------------------------------------------

    pub(super) fn pid(&self, rec: &VdbRecord, st: &Slot) -> Option<i32> {
        rec.postgres(&self.store_dir).pid(st)
    }

    /// Starts postgres (stopping a leftover of an earlier daemon first). A provisioning start
    /// recovers as its plan says, with progress, and is promoted (see `pg::provision`); when
    /// postgres ends recovery before a recovery target the WAL does not reach (nothing was
    /// written past it), it starts again without.
    pub(super) fn start_postgres(
        &self,
        rec: &VdbRecord,
        st: &Slot,
        progress: Progress,
    ) -> anyhow::Result<i32> {
        let postgres = rec.postgres(&self.store_dir);
        let cluster = &postgres.cluster;
        let provisioning = rec.data_dir.join(PROVISION_SIGNAL).exists();
        let log_from = cluster.log_len();
        let missing = || {
            refusal(
                ErrorKind::Unavailable,
                format!(
                    "the data directory {} of VDB {} is not mounted or empty",
                    rec.data_dir.display(),
                    rec.name
                ),
            )
        };
        let started = Instant::now();
        let log_tail = || postgres.log_tail(15);
        let say = |m: String| progress.say(m);
        super::logins::close_tcp(rec, &self.store_dir)?;
        let pid = postgres.start(st, START_TIMEOUT, missing, |mut pid| {
            if !provisioning {
                return Ok(pid);
            }
            let deadline = started + START_TIMEOUT;
            let replayed = match pg::provision::finish(cluster, pid, started, deadline, &say, &log_tail) {
                Ok(r) => r,
                Err(e) => {
                    let _ = cluster.stop("immediate", Duration::from_secs(30));
                    if !cluster.log_says(log_from, TARGET_NOT_REACHED) {
                        return Err(e);
                    }
                    // The WAL ends exactly at the target, so no record ever reaches it:
                    // recovering to the end of the WAL is the same state.
                    tracing::info!(vdb = %rec.name, "the WAL ends at the recovery target; promoting without it");
                    pg::provision::drop_target(&rec.data_dir)?;
                    pg::provision::write_signal(&rec.data_dir)?;
                    pg::provision::forget_plan(cluster);
                    pg::remove_run_files(&rec.data_dir);
                    pid = cluster.start(START_TIMEOUT)?;
                    pg::provision::finish(cluster, pid, started, deadline, &say, &log_tail)
                        .inspect_err(|_| {
                            let _ = cluster.stop("immediate", Duration::from_secs(30));
                        })?
                }
            };
            if replayed.bytes > 0 {
                let line = format!("{} until promoted", replayed.describe());
                rec.dir(&self.store_dir).log_line(&line);
                progress.say(line);
            }
            configure::clear_recovery(rec)?;
            Ok(pid)
        })?;
        if let Err(e) = super::logins::apply(rec, &self.store_dir) {
            // TCP stays closed: stop it rather than leave a VDB nobody can log in to.
            self.stop_postgres(rec, st);
            return Err(e);
        }
        tracing::info!(vdb = %rec.name, pid, port = rec.port, "VDB postgres running");
        Ok(pid)
    }

    /// Stops the VDB's postgres (see [`pg::Cluster::stop_any`]).
    pub(super) fn stop_postgres(&self, rec: &VdbRecord, st: &Slot) {
        rec.postgres(&self.store_dir).stop(st);
    }

    /// pre-start hook, start, then (after `between`) the post-start hook.
    pub(super) fn start_with_hooks(
        &self,
        rec: &VdbRecord,
        st: &Slot,
        progress: Progress,
        between: &dyn Fn() -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        hooks::run(rec, &self.store_dir, Hook::PreStart)?;
        self.start_postgres(rec, st, progress)?;
        between()?;
        hooks::run(rec, &self.store_dir, Hook::PostStart)
    }

    pub(super) fn stop_with_hooks(&self, rec: &VdbRecord, st: &Slot) -> anyhow::Result<()> {
        hooks::run(rec, &self.store_dir, Hook::PreStop)?;
        self.stop_postgres(rec, st);
        hooks::run(rec, &self.store_dir, Hook::PostStop)
    }

    /// Stops every VDB postgres (daemon shutdown); the next daemon starts the wanted ones.
    pub fn stop_all(&self) {
        let recs = self.records().unwrap_or_default();
        pg::managed::stop_all(
            &self.slots,
            recs.iter().map(|r| r.postgres(&self.store_dir)),
        );
    }

    /// Checkpoints and unmounts the VDB's dataset (before its tree is switched).
    pub(super) fn checkpoint_and_unmount(&self, rec: &VdbRecord) -> anyhow::Result<()> {
        self.mounts
            .release(&rec.name, &rec.data_dir)
            .map_err(|e| e.context(format!("cannot unmount VDB {}", rec.name)))?;
        self.datasets.checkpoint()?;
        Ok(())
    }

    pub(super) fn mount(&self, rec: &VdbRecord) -> anyhow::Result<()> {
        self.mounts.ensure(&rec.name, &rec.data_dir)
    }

    /// Stops, unmounts and deletes a VDB with its snapshots, files and record. Best effort:
    /// logs what it cannot undo.
    pub(super) fn teardown(&self, rec: &VdbRecord, st: &Slot) {
        self.stop_postgres(rec, st);
        if let Err(e) = self.mounts.release(&rec.name, &rec.data_dir) {
            tracing::error!(vdb = %rec.name, "cannot unmount: {e:#}");
        }
        let _ = std::fs::remove_dir(&rec.data_dir);
        if let Err(e) = crate::catalog::delete_dataset(&self.datasets, &rec.name) {
            tracing::error!(vdb = %rec.name, "cannot delete the dataset: {e:#}");
        }
        if let Err(e) = self.records.remove(&rec.name) {
            tracing::error!(vdb = %rec.name, "cannot remove the VDB record: {e:#}");
        }
        if let Err(e) = self
            .sources
            .archive()
            .remove(&crate::archive::Key::vdb_all(&rec.name))
        {
            tracing::error!(vdb = %rec.name, "cannot remove its WAL archive: {e:#}");
        }
        let _ = std::fs::remove_dir_all(&rec.dir(&self.store_dir).0);
    }

    // ---- start / stop / delete -----------------------------------------------------------

    pub fn start(&self, name: &str) -> anyhow::Result<String> {
        let mut rec = self.record(name)?;
        let st = self.slots.state(name);
        let _g = st.op.lock();
        refuse_pending(&rec)?;
        if self.pid(&rec, &st).is_some() && st.rt.lock().pid.is_some() {
            return Ok(format!(
                "VDB {name} is already running on port {}",
                rec.port
            ));
        }
        self.mount(&rec)?;
        // A first start a rewind of the stopped VDB left to do begins a timeline of its history.
        let provisioning = rec.data_dir.join(PROVISION_SIGNAL).exists();
        // A stale postmaster.pid is postgres's to judge: it refuses to start next to a live one.
        let r = self.start_with_hooks(&rec, &st, quiet(), &|| Ok(()));
        if st.rt.lock().pid.is_some() {
            if provisioning {
                self.begin_epoch(&mut rec);
            }
            rec.running = true;
            self.records.put(&rec)?;
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

    pub fn stop(&self, name: &str) -> anyhow::Result<String> {
        let mut rec = self.record(name)?;
        let st = self.slots.state(name);
        let _g = st.op.lock();
        refuse_pending(&rec)?;
        hooks::run(&rec, &self.store_dir, Hook::PreStop)
            .map_err(|e| e.context("refused by its pre-stop hook"))?;
        self.stop_postgres(&rec, &st);
        rec.running = false;
        self.records.put(&rec)?;
        hooks::run(&rec, &self.store_dir, Hook::PostStop)
            .map_err(|e| e.context("it stopped, but"))?;
        Ok(format!("stopped VDB {name}"))
    }

    pub fn delete(&self, name: &str) -> anyhow::Result<String> {
        let rec = self.record(name)?;
        let st = self.slots.state(name);
        let _g = st.op.lock();
        for s in self.datasets.snapshots(Some(name))? {
            if let Some(mp) = self.mounts.mounted_at(&s.full_name()) {
                refuse!(
                    Conflict,
                    "snapshot {} of VDB {name} is mounted at {}; unmount it first ('vdbfs umount {}')",
                    s.full_name(),
                    mp.display(),
                    mp.display()
                );
            }
        }
        let children: Vec<String> = self
            .records()?
            .into_iter()
            .filter(|r| r.parent_dataset() == name)
            .map(|r| r.name)
            .collect();
        self.teardown(&rec, &st);
        self.idle.forget(name);
        if self.datasets.record(name)?.is_some() || self.is_vdb(name) {
            refuse!(
                Internal,
                "deleting VDB {name} did not finish; the daemon log says why"
            );
        }
        self.slots.forget(name);
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

    pub fn snapshot(
        &self,
        name: &str,
        snapshot: Option<&str>,
        bookmark: bool,
    ) -> anyhow::Result<VdbSnapshot> {
        let rec = self.record(name)?;
        let st = self.slots.state(name);
        let _g = st.op.lock();
        refuse_pending(&rec)?;
        let kind = if bookmark {
            SnapshotKind::Bookmark
        } else {
            SnapshotKind::Snapshot
        };
        if let Some(s) = snapshot {
            crate::tree::check_snapshot_name(s)?;
        }
        hooks::run(&rec, &self.store_dir, Hook::PreSnapshot)
            .map_err(|e| e.context("refused by its pre-snapshot hook"))?;
        let s = self.take_snapshot(&rec, &st, snapshot, kind)?;
        hooks::run(&rec, &self.store_dir, Hook::PostSnapshot)
            .map_err(|e| e.context(format!("{} was taken, but", s.name)))?;
        Ok(s)
    }

    pub(super) fn take_snapshot(
        &self,
        rec: &VdbRecord,
        st: &Slot,
        snapshot: Option<&str>,
        kind: SnapshotKind,
    ) -> anyhow::Result<VdbSnapshot> {
        let (mut lsn, mut timeline) = (None, None);
        if self.pid(rec, st).is_some() {
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
            kind,
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
            kind,
            lsn: props.lsn,
            timeline: props.timeline,
            created: crate::time::rfc3339(s.rec.created.secs),
        })
    }

    // ---- recovery and supervision --------------------------------------------------------

    /// Undoes VDB operations a dead daemon cut short.
    pub fn recover(&self) {
        let Ok(recs) = self.records() else {
            return;
        };
        for mut rec in recs {
            let Some(p) = rec.pending.clone() else {
                continue;
            };
            let st = self.slots.state(&rec.name);
            let _g = st.op.lock();
            tracing::warn!(vdb = %rec.name, op = %p.op, "undoing an operation cut short by a daemon stop");
            if p.op == VdbOp::Create {
                self.teardown(&rec, &st);
                self.slots.forget(&rec.name);
            } else if let Err(e) = self.undo_switch(&mut rec, &st, &p) {
                tracing::error!(vdb = %rec.name, "cannot undo the cut-short {}: {e:#}", p.op);
            }
        }
    }

    /// One supervisor round: start wanted VDBs whose postgres is not running (after a daemon
    /// restart, or when it died), with backoff.
    pub fn supervise(&self) {
        let Ok(recs) = self.records() else {
            return;
        };
        for rec in recs
            .into_iter()
            .filter(|r| r.running && r.pending.is_none())
        {
            let st = self.slots.state(&rec.name);
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
            let r = self
                .mount(&rec)
                .and_then(|()| self.start_with_hooks(&rec, &st, quiet(), &|| Ok(())));
            if let Err(e) = r {
                let wait = st.rt.lock().failed(format!("{e:#}"));
                tracing::error!(vdb = %rec.name, "VDB did not start (next try in {wait:?}): {e:#}");
            }
        }
    }

    /// The socket directory of a VDB's files, for status.
    pub(super) fn socket_dir(&self, rec: &VdbRecord) -> PathBuf {
        rec.dir(&self.store_dir).socket_dir()
    }
}

/// Progress nobody reads (operations started by the daemon itself).
pub(super) fn quiet() -> Progress<'static> {
    fn nobody(_: crate::api::ProgressLine) {}
    static NEVER: std::sync::OnceLock<crate::api::Cancel> = std::sync::OnceLock::new();
    let never = NEVER.get_or_init(|| crate::api::Cancel::new("the daemon's own operation"));
    Progress::new(&nobody, never)
}

/// A VDB in the middle of an operation takes no other.
pub(super) fn refuse_pending(rec: &VdbRecord) -> anyhow::Result<()> {
    match &rec.pending {
        Some(p) => refuse!(
            Busy,
            "VDB {} is in the middle of a {}; wait for it to finish",
            rec.name,
            p.op
        ),
        None => Ok(()),
    }
}
