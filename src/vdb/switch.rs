//! `vdb refresh` and `vdb rewind`: the VDB's dataset pointed at another snapshot's tree, its
//! identity (name, port, mount point, settings, hooks) kept.
//!
//! Invariant: an undo snapshot is taken and recorded in `pending` before the dataset changes;
//! any failure, or the next daemon after a crash, goes back to it ([`VdbService::undo_switch`]).

use super::configure;
use super::hooks::{self, Hook};
use super::service::{refuse_pending, VdbService};
use super::{Pending, VdbOp, VdbRecord};
use crate::api::{Progress, SnapshotKind};
use crate::pg::managed::Slot;
use crate::refuse;

impl VdbService {
    pub fn rewind(&self, name: &str, to: &str) -> anyhow::Result<String> {
        let rec = self.record(name)?;
        let snap = match to.split_once('@') {
            Some((d, s)) if d == name => s.to_string(),
            Some(_) => refuse!(
                Invalid,
                "rewind goes back to one of VDB {name}'s own snapshots or bookmarks, not {to}; \
                 'vdbfs vdb refresh {name} --to {to}' moves it onto a snapshot of its parent"
            ),
            None => to.to_string(),
        };
        if !crate::catalog::has_snapshot(&self.datasets, name, &snap)? {
            refuse!(
                NotFound,
                "VDB {name} has no snapshot or bookmark {snap}; 'vdbfs vdb status {name}' lists them"
            );
        }
        let st = self.slots.state(name);
        let _g = st.op.lock();
        refuse_pending(&rec)?;
        self.switch(rec, &st, VdbOp::Rewind, name, &snap)
            .map(|()| format!("rewound VDB {name} to {name}@{snap}"))
    }

    pub fn refresh(
        &self,
        name: &str,
        to: Option<&str>,
        progress: Progress,
    ) -> anyhow::Result<String> {
        let rec = self.record(name)?;
        let parent_ds = rec.parent_dataset().to_string();
        let (ds, snap) = match to {
            Some(t) => {
                let (d, s) = crate::catalog::resolve_snapshot(&self.datasets, t)?;
                if d != parent_ds {
                    refuse!(
                        Invalid,
                        "VDB {name} refreshes from its parent {parent_ds}; {t} is not a snapshot \
                         of it (to start from another dataset, create a new VDB)"
                    );
                }
                (d, s)
            }
            None => {
                if self.sources.is_syncing_source(&parent_ds)? {
                    progress.say(format!(
                        "taking a validated-sync snapshot of source {parent_ds}"
                    ));
                    let s = self.sources.snapshot(&parent_ds, progress)?;
                    let (d, sn) = crate::tree::parse_snapshot_ref(&s.name)?;
                    (d.to_string(), sn.to_string())
                } else {
                    crate::catalog::resolve_snapshot(&self.datasets, &parent_ds)
                        .map_err(|e| e.context(format!("VDB {name} has nothing to refresh from")))?
                }
            }
        };
        let st = self.slots.state(name);
        let _g = st.op.lock();
        refuse_pending(&rec)?;
        progress.say(format!("refreshing VDB {name} onto {ds}@{snap}"));
        self.switch(rec, &st, VdbOp::Refresh, &ds, &snap)
            .map(|()| format!("refreshed VDB {name} onto {ds}@{snap}"))
    }

    /// Rewind or refresh: points the VDB's dataset at `ds@snap`, keeping its identity. An undo
    /// snapshot is taken first; any failure goes back to it.
    fn switch(
        &self,
        mut rec: VdbRecord,
        st: &Slot,
        op: VdbOp,
        ds: &str,
        snap: &str,
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
        let was_running = self.pid(&rec, st).is_some();
        if was_running {
            self.stop_with_hooks(&rec, st)
                .map_err(|e| e.context(format!("{op} of VDB {name}: stopping it failed")))?;
        }
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
        let old_parent = rec.parent.clone();
        let pending = Pending {
            op,
            rollback: undo.as_ref().map(|_| undo_name.clone()),
            parent: old_parent.clone(),
            was_running,
        };
        rec.pending = Some(pending.clone());
        self.records.put(&rec)?;
        dir.log_line(&format!("{op} onto {ds}@{snap} (undo point {undo_label})"));
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
            self.mount(&rec)?;
            configure::configure(&rec, &store, target.as_ref(), refresh)?;
            configure::check_config(&rec)?;
            if refresh || was_running {
                let configure_clone = || {
                    if refresh {
                        hooks::run(&rec, &store, Hook::ConfigureClone)
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
                rec.settle(was_running, format!("{op} onto {ds}@{snap}"));
                self.records.put(&rec)?;
                dir.log_line(&format!("{op} done"));
                hooks::run(&rec, &store, post)
                    .map_err(|e| e.context(format!("VDB {name}: {op} done, but")))
            }
            Err(e) => {
                dir.log_line(&format!("{op} failed: {e:#}; going back to {undo_label}"));
                rec.parent = old_parent;
                match self.undo_switch(&mut rec, st, &pending) {
                    Ok(()) => Err(e.context(format!(
                        "{op} of VDB {name} failed; it is back as it was (from {undo_label})"
                    ))),
                    Err(e2) => Err(e.context(format!(
                        "{op} of VDB {name} failed, and going back to {undo_label} failed too \
                         ({e2:#}); 'vdbfs vdb rewind {name} --to {undo_name}' retries"
                    ))),
                }
            }
        }
    }

    /// Puts a VDB back on its undo snapshot after a failed (or interrupted) refresh/rewind.
    pub(super) fn undo_switch(
        &self,
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
        self.mount(rec)?;
        configure::configure(rec, &self.store_dir, None, false)?;
        if p.was_running {
            self.start_postgres(rec, st)?;
        }
        rec.settle(p.was_running, format!("{} undone", p.op));
        Ok(self.records.put(rec)?)
    }
}
