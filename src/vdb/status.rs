//! `vdb status` / `vdb list`: a VDB's state as the user sees it, from its record, this
//! daemon's runtime and the postmaster that runs.

use super::hooks;
use super::service::VdbService;
use super::{VdbOp, VdbRecord};
use crate::api::{SnapshotKind, VdbState, VdbStatus};
use crate::pg::RunFiles;

impl VdbService {
    /// The state and fault of a VDB. Running means this daemon's start finished (postgres
    /// accepts connections); a postmaster it has not finished starting (or one left by an
    /// earlier daemon) is starting.
    pub fn state_of(&self, rec: &VdbRecord) -> (VdbState, Option<String>) {
        let st = self.slots.state(&rec.name);
        let postgres = rec.postgres(&self.store_dir);
        let ours = postgres.ours(&st);
        let pid = postgres.pid(&st);
        let last_error = st.rt.lock().last_error.clone();
        if rec.pending.is_none() {
            // Faults of the store: the VDB cannot work (or will not for long) while they last.
            if let Some(f) = self.datasets.damage_fault(&rec.name) {
                return (VdbState::Fault, Some(f));
            }
            if let Some(f) = self.datasets.store().full_fault() {
                return (VdbState::Fault, Some(f));
            }
        }
        match (&rec.pending, pid, rec.running) {
            (Some(p), _, _) if p.op == VdbOp::Create => (VdbState::Creating, None),
            (Some(p), _, _) => (
                VdbState::Fault,
                Some(format!("a {} was cut short; the daemon undoes it", p.op)),
            ),
            (None, Some(_), _) if ours.is_some() => (VdbState::Running, None),
            (None, Some(_), _) => (VdbState::Starting, None),
            (None, None, false) => (VdbState::Stopped, None),
            (None, None, true) if last_error.is_none() => (VdbState::Starting, None),
            (None, None, true) => (
                VdbState::Fault,
                Some(format!(
                    "postgres of VDB {} is not running{}; postgres log: {}",
                    rec.name,
                    last_error.map(|e| format!(": {e}")).unwrap_or_default(),
                    rec.dir(&self.store_dir).postgres_log().display()
                )),
            ),
        }
    }

    pub(super) fn status_of(&self, rec: &VdbRecord, with_usage: bool) -> anyhow::Result<VdbStatus> {
        let (state, fault) = self.state_of(rec);
        let pid = self.pid(rec, &self.slots.state(&rec.name));
        let (mut snapshots, mut bookmarks, mut undo) = (Vec::new(), Vec::new(), Vec::new());
        for s in self.datasets.snapshots(Some(&rec.name)).unwrap_or_default() {
            match super::snapshot_props(&s).map(|p| p.kind) {
                Some(SnapshotKind::Bookmark) => bookmarks.push(s.full_name()),
                Some(SnapshotKind::Base) => {}
                Some(SnapshotKind::Auto) => {
                    undo.push(s.full_name());
                    snapshots.push(s.full_name());
                }
                _ => snapshots.push(s.full_name()),
            }
        }
        let undo_bytes = if with_usage && !undo.is_empty() {
            self.datasets
                .usage()?
                .roots
                .iter()
                .filter(|r| undo.contains(&r.name))
                .map(|r| r.unique_bytes)
                .sum()
        } else {
            0
        };
        let (logical, unique) = if with_usage {
            self.datasets
                .dataset_usage()?
                .get(&rec.name)
                .copied()
                .unwrap_or_default()
        } else {
            (0, 0)
        };
        let dir = rec.dir(&self.store_dir);
        Ok(VdbStatus {
            name: rec.name.clone(),
            state,
            port: rec.port,
            data_dir: rec.data_dir.clone(),
            socket_dir: self.socket_dir(rec),
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
            history: self.history_range(rec),
            undo_snapshots: undo,
            undo_bytes,
            undo_keep: self.undo_keep,
            owner: rec.owner.clone(),
            user: rec.logins.as_ref().and_then(|l| l.user.clone()),
            keep_source_logins: rec.logins.as_ref().is_none_or(|l| l.keep_source_logins),
            password: None,
            expires: self
                .expires_at(rec, crate::time::now_unix())
                .map(crate::time::rfc3339),
            idle_ttl_secs: rec.lifetime.idle_ttl_secs,
            protected: rec.lifetime.protected,
        })
    }

    /// The moments `vdb rewind --at` can go back to (timeflow).
    pub fn history_of(&self, rec: &VdbRecord) -> Option<crate::api::Range> {
        self.history_range(rec)
    }

    /// The status without the space figures (they walk every tree of the store): what an
    /// operation answers with.
    pub fn brief_status(&self, name: &str) -> anyhow::Result<VdbStatus> {
        let rec = self.record(name)?;
        self.status_of(&rec, false)
    }

    pub fn status(&self, name: &str) -> anyhow::Result<VdbStatus> {
        let rec = self.record(name)?;
        self.status_of(&rec, true)
    }

    pub fn list(&self) -> anyhow::Result<Vec<VdbStatus>> {
        self.list_within(std::time::Duration::ZERO)
    }

    /// [`VdbService::list`] with space figures from an accounting at most `max_age` old (see
    /// `Datasets::accounting_within`): for pollers such as the metrics scrape.
    pub fn list_within(&self, max_age: std::time::Duration) -> anyhow::Result<Vec<VdbStatus>> {
        let usage = &self.datasets.accounting_within(max_age)?.per_dataset;
        self.records()?
            .iter()
            .map(|r| {
                let mut s = self.status_of(r, false)?;
                let (l, u) = usage.get(&r.name).copied().unwrap_or_default();
                s.logical_bytes = l;
                s.unique_bytes = u;
                Ok(s)
            })
            .collect()
    }
}
