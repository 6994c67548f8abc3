//! `vdb refresh` and `vdb rewind`: the VDB's dataset pointed at another tree (a snapshot of
//! its parent, one of its own snapshots, a moment of its source or of its own history), its
//! identity (name, port, mount point, settings, hooks) kept.
//!
//! Invariant: an undo snapshot is taken and recorded in `pending` before the dataset changes;
//! any failure, a cancel (Ctrl-C), or the next daemon after a crash, goes back to it
//! ([`VdbService::undo_switch`]). The timeline the VDB leaves is sealed (its last WAL archived)
//! before the dataset changes. After a switch, undo snapshots beyond the newest `undo_keep`
//! expire ([`VdbService::expire_undo`]).

use super::configure;
use super::hooks::{self, Hook};
use super::provision::Provision;
use super::service::{quiet, refuse_pending, VdbService};
use super::{Pending, VdbOp, VdbRecord};
use crate::api::{Progress, SnapshotKind};
use crate::pg::managed::Slot;
use crate::pg::provision::FirstStart;
use crate::refuse;
use std::collections::HashSet;

/// What a switch moves the VDB onto.
enum Onto {
    /// A tree known before the VDB stops.
    Tree(Box<Provision>),
    /// A moment (Unix microseconds) of its own history: planned once the VDB is stopped and
    /// its timeline sealed.
    OwnMoment(i64),
}

impl VdbService {
    pub fn rewind(
        &self,
        name: &str,
        to: Option<&str>,
        at: Option<&str>,
        progress: Progress,
    ) -> anyhow::Result<String> {
        let rec = self.record(name)?;
        let onto = match (to, at) {
            (Some(_), Some(_)) | (None, None) => refuse!(
                Invalid,
                "give --to SNAPSHOT (one of VDB {name}'s snapshots or bookmarks) or --at TIME (a \
                 moment of its history), one of them"
            ),
            (None, Some(t)) => Onto::OwnMoment(crate::time::parse_moment(t, "--at")?),
            (Some(to), None) => {
                let snap = match to.split_once('@') {
                    Some((d, s)) if d == name => s.to_string(),
                    Some(_) => refuse!(
                        Invalid,
                        "rewind goes back to one of VDB {name}'s own snapshots or bookmarks, not \
                         {to}; 'vdbfs vdb refresh {name} --to {to}' moves it onto a snapshot of \
                         its parent"
                    ),
                    None => to.to_string(),
                };
                if !crate::catalog::has_snapshot(&self.datasets, name, &snap)? {
                    refuse!(
                        NotFound,
                        "VDB {name} has no snapshot or bookmark {snap}; 'vdbfs vdb status {name}' lists them"
                    );
                }
                Onto::Tree(Box::new(Provision {
                    tree: (name.to_string(), snap.clone()),
                    parent: rec.parent.clone(),
                    start: FirstStart::Recover(Default::default()),
                    wal: super::provision::Wal::None,
                    describe: format!("{name}@{snap}"),
                    new_history: true,
                }))
            }
        };
        let st = self.slots.state(name);
        let _g = st.op.lock();
        refuse_pending(&rec)?;
        let what = match &onto {
            Onto::Tree(p) => p.describe.clone(),
            Onto::OwnMoment(t) => format!("{name} at {}", crate::time::rfc3339_us(*t)),
        };
        progress.say(format!("rewinding VDB {name} to {what}"));
        self.switch(rec, &st, VdbOp::Rewind, onto, progress)
            .map(|()| format!("rewound VDB {name} to {what}"))
    }

    pub fn refresh(
        &self,
        name: &str,
        to: Option<&str>,
        at: Option<&str>,
        at_lsn: Option<&str>,
        progress: Progress,
    ) -> anyhow::Result<String> {
        let rec = self.record(name)?;
        let parent_ds = rec.parent_dataset().to_string();
        let prov = if at.is_some() || at_lsn.is_some() {
            if to.is_some() {
                refuse!(Invalid, "give --to SNAPSHOT or --at/--at-lsn, not both");
            }
            self.resolve_from(&parent_ds, at, at_lsn, false)?
        } else {
            let (ds, snap) = match to {
                Some(t) => {
                    let (d, s) = crate::catalog::resolve_snapshot(&self.datasets, t)?;
                    if d != parent_ds {
                        refuse!(
                            Invalid,
                            "VDB {name} refreshes from its parent {parent_ds}; {t} is not a \
                             snapshot of it (to start from another dataset, create a new VDB)"
                        );
                    }
                    (d, s)
                }
                None => {
                    if self.sources.is_syncing_source(&parent_ds)? {
                        progress.say(format!(
                            "taking a validated-sync snapshot of source {parent_ds}"
                        ));
                        let s = self.sources.snapshot(&parent_ds, None, progress)?;
                        let (d, sn) = crate::tree::parse_snapshot_ref(&s.name)?;
                        (d.to_string(), sn.to_string())
                    } else {
                        crate::catalog::resolve_snapshot(&self.datasets, &parent_ds).map_err(
                            |e| e.context(format!("VDB {name} has nothing to refresh from")),
                        )?
                    }
                }
            };
            self.provision_snapshot(&ds, &snap)
        };
        let st = self.slots.state(name);
        let _g = st.op.lock();
        refuse_pending(&rec)?;
        let describe = prov.describe.clone();
        progress.say(format!("refreshing VDB {name} onto {describe}"));
        self.switch(
            rec,
            &st,
            VdbOp::Refresh,
            Onto::Tree(Box::new(prov)),
            progress,
        )
        .map(|()| format!("refreshed VDB {name} onto {describe}"))
    }

    /// Rewind or refresh: points the VDB's dataset at another tree, keeping its identity. An
    /// undo snapshot is taken first; any failure goes back to it.
    fn switch(
        &self,
        mut rec: VdbRecord,
        st: &Slot,
        op: VdbOp,
        onto: Onto,
        progress: Progress,
    ) -> anyhow::Result<()> {
        let refresh = op == VdbOp::Refresh;
        let (pre, post) = match op {
            VdbOp::Refresh => (Hook::PreRefresh, Hook::PostRefresh),
            _ => (Hook::PreRewind, Hook::PostRewind),
        };
        let name = rec.name.clone();
        let store = self.store_dir.clone();
        let dir = rec.dir(&store);
        hooks::run(&rec, &store, pre)
            .map_err(|e| e.context(format!("{op} of VDB {name} refused by its hook")))?;
        progress.check()?;
        let was_running = self.pid(&rec, st).is_some();
        if was_running {
            self.stop_with_hooks(&rec, st)
                .map_err(|e| e.context(format!("{op} of VDB {name}: stopping it failed")))?;
        }
        let end = self.wal_end(&rec);
        // No undo point for a damaged dataset: it would carry the damage, and going back to
        // it would hide it. A failure before the switch leaves the dataset damaged (and
        // refused); after it, on the new tree.
        let damaged = !self.datasets.damage_of(&name)?.is_empty();
        let undo_name = format!(
            "auto-before-{op}-{}",
            crate::tree::snapshot_name_for(crate::tree::dataset::now())
        );
        let undo = if damaged {
            None
        } else {
            Some(self.take_snapshot(&rec, st, Some(&undo_name), SnapshotKind::Auto)?)
        };
        let undo_label = undo.as_ref().map_or_else(
            || "none: the dataset is damaged".to_string(),
            |u| u.name.clone(),
        );
        // The timeline it leaves now: its last WAL goes into the archive.
        if let Err(e) = self.seal(&mut rec, end) {
            tracing::error!(vdb = %name, "cannot archive the end of its timeline: {e:#}");
        }
        let old_parent = rec.parent.clone();
        let old_history = rec.history.clone();
        let pending = Pending {
            op,
            rollback: undo.as_ref().map(|_| undo_name.clone()),
            parent: old_parent.clone(),
            was_running,
            history: old_history.clone(),
        };
        rec.pending = Some(pending.clone());
        self.records.put(&rec)?;
        let r = (|| {
            progress.check()?;
            let p = match onto {
                Onto::Tree(p) => *p,
                Onto::OwnMoment(t) => self.provision_own_moment(&rec, t)?,
            };
            dir.log_line(&format!(
                "{op} onto {} (undo point {})",
                p.describe, undo_label
            ));
            self.checkpoint_and_unmount(&rec)?;
            let history = if p.new_history {
                self.start_history(&name, &p)?
            } else {
                old_history
                    .clone()
                    .ok_or_else(|| anyhow::anyhow!("VDB {name} keeps no history"))?
            };
            {
                let _g = self.archive_lock.lock();
                self.datasets
                    .reset_to_snapshot(&name, &p.tree.0, &p.tree.1, refresh)?;
                if refresh {
                    rec.parent = p.parent.clone();
                }
                rec.history = Some(history.clone());
                self.records.put(&rec)?;
            }
            self.stage(&name, &history.base, &p, progress)?;
            self.mount(&rec)?;
            configure::configure(&rec, &store, &p.start, refresh)?;
            configure::check_config(&rec)?;
            progress.check()?;
            if refresh || was_running {
                let configure_clone = || {
                    if refresh {
                        hooks::run(&rec, &store, Hook::ConfigureClone)
                    } else {
                        Ok(())
                    }
                };
                self.start_with_hooks(&rec, st, progress, &configure_clone)?;
                self.begin_epoch(&mut rec);
                progress.check()?;
                if !was_running {
                    // configure-clone needed it up; it goes back to stopped, as it was.
                    self.stop_with_hooks(&rec, st)?;
                }
            }
            anyhow::Ok(p.new_history)
        })();
        match r {
            Ok(new_history) => {
                if new_history {
                    if let Some(old) = &old_history {
                        self.drop_history(&rec, old);
                    }
                }
                progress.past_return(format!("the {op} of VDB {name} is done"));
                rec.settle(was_running, format!("{op} onto {}", rec.parent));
                self.records.put(&rec)?;
                dir.log_line(&format!("{op} done"));
                self.expire_undo(&rec);
                hooks::run(&rec, &store, post)
                    .map_err(|e| e.context(format!("VDB {name}: {op} done, but")))
            }
            Err(e) => {
                dir.log_line(&format!("{op} failed: {e:#}; going back to {undo_label}"));
                let failed_history = rec.history.clone();
                rec.parent = old_parent;
                match self.undo_switch(&mut rec, st, &pending) {
                    Ok(()) => {
                        if let Some(h) = failed_history
                            .filter(|h| old_history.as_ref().is_none_or(|o| o.base != h.base))
                        {
                            self.drop_history(&rec, &h);
                        }
                        Err(e.context(format!(
                            "{op} of VDB {name} failed; it is back as it was (from {undo_label})"
                        )))
                    }
                    Err(e2) => Err(e.context(format!(
                        "{op} of VDB {name} failed, and going back to {undo_label} failed too \
                         ({e2:#}); 'vdbfs vdb rewind {name} --to {undo_name}' retries"
                    ))),
                }
            }
        }
    }

    /// Puts a VDB back on its undo snapshot after a failed (or interrupted) refresh/rewind,
    /// with the history it had (its last timeline closed; the undo starts a new one).
    pub(super) fn undo_switch(
        &self,
        rec: &mut VdbRecord,
        st: &Slot,
        p: &Pending,
    ) -> anyhow::Result<()> {
        self.stop_postgres(rec, st);
        rec.parent = p.parent.clone();
        {
            if let Some(undo) = &p.rollback {
                self.checkpoint_and_unmount(rec)?;
                let _g = self.archive_lock.lock();
                self.datasets
                    .reset_to_snapshot(&rec.name, &rec.name, undo, false)?;
                rec.history = p.history.clone();
                self.records.put(rec)?;
            }
        }
        self.mount(rec)?;
        configure::configure(
            rec,
            &self.store_dir,
            &FirstStart::Recover(Default::default()),
            false,
        )?;
        if p.was_running {
            self.start_postgres(rec, st, quiet())?;
            self.begin_epoch(rec);
        }
        rec.settle(p.was_running, format!("{} undone", p.op));
        Ok(self.records.put(rec)?)
    }

    /// Deletes a VDB's undo snapshots beyond the newest `undo_keep`, oldest first; one that is
    /// mounted, or that a VDB's data came from, stays. Best effort: logs what it cannot do.
    pub(super) fn expire_undo(&self, rec: &VdbRecord) {
        let snaps = match self.datasets.snapshots(Some(&rec.name)) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(vdb = %rec.name, "cannot list undo snapshots to expire: {e:#}");
                return;
            }
        };
        let undo: Vec<_> = snaps
            .iter()
            .filter(|s| super::snapshot_props(s).is_some_and(|p| p.kind == SnapshotKind::Auto))
            .collect();
        let parents: HashSet<String> = self
            .records()
            .unwrap_or_default()
            .into_iter()
            .map(|r| r.parent)
            .collect();
        let excess = undo.len().saturating_sub(self.undo_keep as usize);
        for s in undo.into_iter().take(excess) {
            let full = s.full_name();
            if self.mounts.mounted_at(&full).is_some() || parents.contains(&full) {
                continue;
            }
            match self.datasets.delete_snapshot(&rec.name, &s.rec.name) {
                Ok(()) => {
                    tracing::info!(vdb = %rec.name, snapshot = %full, keep = self.undo_keep, "undo snapshot expired");
                    rec.dir(&self.store_dir)
                        .log_line(&format!("undo snapshot {full} expired"));
                }
                Err(e) => {
                    tracing::warn!(vdb = %rec.name, "cannot expire undo snapshot {full}: {e:#}")
                }
            }
        }
    }
}
