//! [`SourceService`]: the dSource workflows and the staging standbys' supervision.
//!
//! Invariants: one operation at a time per source (its slot's `op` lock; the supervisor only
//! try-locks it); a source record with `linking = true` found at start is rolled back; the
//! staging postgres is stopped before its mount goes away; the background preparer never
//! takes a source's `op` lock (it works on its own internal dataset), so it never delays a
//! command or syncing.

use super::prepare::Preparer;
use super::SourceRecord;
use crate::api::{refusal, ErrorKind};
use crate::archive::WalArchive;
use crate::mounts::MountTable;
use crate::pg::managed::{Registry, Slot};
use crate::refuse;
use crate::store::records::Records;
use crate::tree::Datasets;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// How long a staging standby may take to start (replaying the WAL of a big backup).
pub(super) const START_TIMEOUT: Duration = Duration::from_secs(600);

pub struct SourceService {
    pub(super) store_dir: PathBuf,
    pub(super) datasets: Arc<Datasets>,
    pub(super) mounts: Arc<MountTable>,
    pub(super) records: Records<SourceRecord>,
    pub(super) slots: Registry,
    /// The store's WAL archive (shared with the VDB service).
    pub(super) archive: Arc<WalArchive>,
    pub(super) prep: Preparer,
}

impl SourceService {
    pub fn new(
        store_dir: PathBuf,
        datasets: Arc<Datasets>,
        mounts: Arc<MountTable>,
        records: Records<SourceRecord>,
        archive: Arc<WalArchive>,
    ) -> SourceService {
        SourceService {
            store_dir,
            datasets,
            mounts,
            records,
            slots: Registry::default(),
            archive,
            prep: Preparer::default(),
        }
    }

    pub fn archive(&self) -> &Arc<WalArchive> {
        &self.archive
    }

    // ---- records -------------------------------------------------------------------------

    /// Every linked source's record.
    pub fn records(&self) -> anyhow::Result<Vec<SourceRecord>> {
        Ok(self.records.list()?)
    }

    pub fn is_source(&self, name: &str) -> anyhow::Result<bool> {
        Ok(self.records.contains(name)?)
    }

    /// The ports the staging standbys hold.
    pub fn staging_ports(&self) -> anyhow::Result<Vec<u16>> {
        Ok(self.records()?.iter().map(|r| r.staging_port).collect())
    }

    /// A source that is linked, enabled and done linking (one a VDB refresh may snapshot).
    pub fn is_syncing_source(&self, name: &str) -> anyhow::Result<bool> {
        Ok(self
            .records
            .get(name)?
            .is_some_and(|r| r.enabled && !r.linking))
    }

    pub(super) fn record(&self, name: &str) -> anyhow::Result<SourceRecord> {
        self.records.get(name)?.ok_or_else(|| {
            refusal(
                ErrorKind::NotFound,
                format!("no source {name}; 'vdbfs source list' shows the linked sources"),
            )
        })
    }

    // ---- staging postgres ----------------------------------------------------------------

    /// Starts the staging standby (stopping a leftover of an earlier daemon first).
    pub(super) fn start_staging(&self, rec: &SourceRecord, st: &Slot) -> anyhow::Result<i32> {
        // Sources linked before the WAL archive existed get its settings at their next start.
        if rec.data_dir.join("PG_VERSION").exists() {
            crate::archive::make_ack_dir(&rec.dir(&self.store_dir).wal_acks())?;
            crate::pg::conf::edit_auto_conf(
                &rec.data_dir,
                &super::ingest::archive_settings(rec, &self.store_dir),
            )?;
        }
        let pid = rec.staging(&self.store_dir).start(
            st,
            START_TIMEOUT,
            || {
                refusal(
                    ErrorKind::Unavailable,
                    format!(
                        "the staging data directory {} is not mounted or empty",
                        rec.data_dir.display()
                    ),
                )
            },
            Ok,
        )?;
        tracing::info!(source = %rec.name, pid, port = rec.staging_port, "staging postgres running");
        Ok(pid)
    }

    pub(super) fn stop_staging(&self, rec: &SourceRecord, st: &Slot) {
        rec.staging(&self.store_dir).stop(st);
    }

    /// Stops every staging standby and the preparer (daemon shutdown); they start again with
    /// the next daemon.
    pub fn stop_all(&self) {
        self.stop_preparer();
        let recs = self.records().unwrap_or_default();
        crate::pg::managed::stop_all(&self.slots, recs.iter().map(|r| r.staging(&self.store_dir)));
    }

    // ---- disable / enable / unlink -------------------------------------------------------

    pub fn set_enabled(&self, name: &str, on: bool) -> anyhow::Result<String> {
        let mut rec = self.record(name)?;
        if rec.linking {
            refuse!(Busy, "source {name} is still linking");
        }
        let st = self.slots.state(name);
        let _g = st.op.lock();
        let staging = rec.staging(&self.store_dir);
        if on {
            if rec.enabled && staging.ours(&st).is_some() {
                return Ok(format!("source {name} is already enabled"));
            }
            self.mounts.ensure(name, &rec.data_dir)?;
            self.start_staging(&rec, &st)?;
            rec.enabled = true;
            self.records.put(&rec)?;
            Ok(format!(
                "enabled source {name}: the staging standby replays again"
            ))
        } else {
            rec.enabled = false;
            self.records.put(&rec)?;
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

    /// Unlinks a source; returns the message and the replication slot `force` left on an
    /// unreachable source (the caller tells the user how to drop it).
    pub fn unlink(
        &self,
        name: &str,
        delete_snapshots: bool,
        force: bool,
    ) -> anyhow::Result<(String, Option<String>)> {
        let mut rec = self.record(name)?;
        let st = self.slots.state(name);
        let _g = st.op.lock();
        if let Some(snap) = self
            .datasets
            .snapshots(Some(name))?
            .iter()
            .map(|s| s.full_name())
            .find(|s| self.mounts.mounted_at(s).is_some())
            .filter(|_| delete_snapshots)
        {
            refuse!(Conflict, "snapshot {snap} is mounted; unmount it first");
        }
        self.stop_staging(&rec, &st);
        let mut slot_left = None;
        if let Err(e) = self.drop_slot(&rec) {
            if !force {
                rec.enabled = false;
                self.records.put(&rec)?;
                refuse!(
                    Unavailable,
                    "cannot drop the replication slot {} on the source ({e:#}); the source {name} \
                     is now disabled. Fix the connection and run unlink again, or pass --force \
                     to unlink anyway and drop the slot on the source yourself",
                    rec.slot.clone().unwrap_or_default()
                );
            }
            tracing::warn!(source = %name, "unlink --force: slot left on the source: {e:#}");
            slot_left = rec.slot.clone();
        }
        self.drop_prepared(name);
        self.teardown(&rec, &st, false, delete_snapshots, false);
        self.slots.forget(name);
        let mut msg = if delete_snapshots {
            format!("unlinked source {name}; its dataset and snapshots are deleted")
        } else {
            format!(
                "unlinked source {name}; its snapshots stay in dataset {name} \
                 ('vdbfs dataset delete {name} --with-snapshots' removes them)"
            )
        };
        if let Some(slot) = &slot_left {
            let at = rec.conn.as_ref().map(|c| c.redacted()).unwrap_or_default();
            msg.push_str(&format!(
                "\nthe replication slot {slot} could not be dropped and stays on the source {at}, \
                 where it keeps WAL until dropped; run there: {}",
                crate::api::SlotLeft::new(slot).sql
            ));
        }
        Ok((msg, slot_left))
    }

    // ---- recovery and supervision --------------------------------------------------------

    /// Rolls back links a dead daemon left half-made, and stops what a preparation cut short
    /// left running.
    pub fn recover(&self) {
        let Ok(recs) = self.records() else {
            return;
        };
        for rec in &recs {
            self.recover_preparation(rec);
        }
        for rec in recs.into_iter().filter(|r| r.linking) {
            tracing::warn!(source = %rec.name, "rolling back a link interrupted by a daemon stop");
            let st = self.slots.state(&rec.name);
            let _g = st.op.lock();
            self.drop_prepared(&rec.name);
            self.teardown(&rec, &st, true, true, true);
            self.slots.forget(&rec.name);
        }
    }

    /// One supervisor round: restart dead staging standbys (with backoff), take due policy
    /// snapshots.
    pub fn supervise(&self) {
        let Ok(recs) = self.records() else {
            return;
        };
        for rec in recs.into_iter().filter(|r| r.enabled && !r.linking) {
            let st = self.slots.state(&rec.name);
            let Some(_g) = st.op.try_lock() else { continue };
            let (pid, due) = {
                let rt = st.rt.lock();
                (rt.pid, rt.due())
            };
            let alive = pid.is_some_and(crate::pg::pid_alive);
            if !alive {
                if !due {
                    continue;
                }
                if let Some(pid) = pid {
                    tracing::error!(source = %rec.name, pid, "the staging postgres died; restarting it");
                    st.rt.lock().restarts += 1;
                }
                st.rt.lock().pid = None;
                if let Err(e) = self.mounts.ensure(&rec.name, &rec.data_dir) {
                    tracing::error!(source = %rec.name, "cannot mount staging: {e:#}");
                }
                if let Err(e) = self.start_staging(&rec, &st) {
                    let wait = st.rt.lock().failed(format!("{e:#}"));
                    tracing::error!(source = %rec.name, "staging postgres did not start (next try in {wait:?}): {e:#}");
                }
                continue;
            }
            if let Some(every) = rec.snapshot_every_secs {
                let (_, last) = self.last_snapshot(&rec.name);
                if last.is_none_or(|(_, t)| crate::time::now_unix() - t >= every as i64) {
                    if let Err(e) = self.validated_snapshot(&rec, None) {
                        tracing::error!(source = %rec.name, "policy snapshot failed: {e:#}");
                    }
                }
            }
        }
    }

    /// The state the TimeFlow shows for a source record (no postgres is asked).
    pub fn flow_state(rec: &SourceRecord) -> crate::api::NodeState {
        use crate::api::NodeState;
        if rec.linking {
            NodeState::Linking
        } else if rec.enabled {
            NodeState::Enabled
        } else {
            NodeState::Disabled
        }
    }
}
