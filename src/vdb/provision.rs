//! Where a VDB's new tree comes from and how its first start recovers ([`Provision`]): a
//! snapshot's prepared image, the snapshot itself, a moment of a source, or a moment of the
//! VDB's own history; and putting that tree in place (clone or reset, the WAL staged into it
//! while it is not mounted, the base of the new history kept).
//!
//! Invariant: WAL is written into a VDB's dataset through the tree layer only while the
//! dataset is not mounted (no kernel cache of it exists then).

use super::service::VdbService;
use super::{History, VdbRecord, VdbSnapshotProps};
use crate::api::{refusal, ErrorKind, Progress, SnapshotKind};
use crate::archive::{self, Key};
use crate::pg::provision::{FirstStart, Moment, Recovery};
use crate::refuse;
use crate::source::MomentPlan;

/// The WAL a new tree needs besides its own pg_wal.
#[derive(Debug, Clone)]
pub(super) enum Wal {
    None,
    /// From a source's archive and staging (a moment of the source).
    Source(String, Box<MomentPlan>),
    /// From the VDB's own archive, generation `generation`, up to segment `upto_seg`.
    Own {
        generation: String,
        upto_seg: u64,
    },
}

/// How a VDB gets a new tree.
#[derive(Debug, Clone)]
pub(super) struct Provision {
    /// The snapshot whose tree the VDB gets (`dataset`, `snapshot`).
    pub tree: (String, String),
    /// What the VDB's parent is from now on (`SOURCE@SNAP`), for create and refresh.
    pub parent: String,
    pub start: FirstStart,
    pub wal: Wal,
    /// For the VDB log and progress lines.
    pub describe: String,
    /// Whether a new history starts (not for a rewind to a moment of the current one).
    pub new_history: bool,
}

impl VdbService {
    /// A snapshot, as it is: its prepared image when it has one (a clean start), else the
    /// snapshot with its WAL cut at its LSN (a staging snapshot) or as it was taken.
    pub(super) fn provision_snapshot(&self, ds: &str, snap: &str) -> Provision {
        let parent = format!("{ds}@{snap}");
        if self.sources.is_prepared(ds, snap) {
            return Provision {
                tree: (crate::source::prepared_dataset(ds), snap.to_string()),
                describe: format!("the prepared image of {parent} (no WAL to replay)"),
                parent,
                start: FirstStart::Clean,
                wal: Wal::None,
                new_history: true,
            };
        }
        let (cut, from_lsn) = match self.recovery_target(ds, snap) {
            Some((t, redo)) => (Some(t), redo),
            None => (None, None),
        };
        Provision {
            tree: (ds.to_string(), snap.to_string()),
            describe: match &cut {
                Some(t) => format!(
                    "{parent}, replaying its WAL up to {} (its prepared image is not ready)",
                    crate::pg::lsn::format(t.lsn)
                ),
                None => parent.clone(),
            },
            parent,
            start: FirstStart::Recover(Recovery {
                cut,
                from_lsn,
                stop_lsn: cut.map(|t| t.lsn),
                ..Default::default()
            }),
            wal: Wal::None,
            new_history: true,
        }
    }

    /// A moment of a linked source.
    pub(super) fn provision_moment(&self, source: &str, m: Moment) -> anyhow::Result<Provision> {
        if !self.sources.is_source(source)? {
            refuse!(
                Invalid,
                "--at and --at-lsn provision a moment of a linked source, and {source} is not one \
                 ('vdbfs source list' shows them); for a moment of a VDB's own history use \
                 'vdbfs vdb rewind NAME --at TIME'"
            );
        }
        let plan = self.sources.plan_moment(source, m)?;
        let (ds, snap) = plan.base.clone();
        Ok(Provision {
            parent: format!("{ds}@{snap}"),
            tree: (ds, snap),
            start: FirstStart::Recover(plan.recovery.clone()),
            describe: plan.describe.clone(),
            wal: Wal::Source(source.to_string(), Box::new(plan)),
            new_history: true,
        })
    }

    /// Puts the provision's WAL into the VDB's dataset `name` (not mounted) and, for a moment
    /// of a source, into the VDB's archive generation `generation` (its history replays
    /// through it).
    pub(super) fn stage(
        &self,
        name: &str,
        generation: &str,
        p: &Provision,
        progress: Progress,
    ) -> anyhow::Result<()> {
        let ds = self
            .datasets
            .get(name)?
            .ok_or_else(|| refusal(ErrorKind::Internal, format!("dataset {name} vanished")))?;
        let t = std::time::Instant::now();
        let (n, bytes) = match &p.wal {
            Wal::None => return Ok(()),
            Wal::Source(source, plan) => {
                progress.say(format!(
                    "staging {} WAL file(s) of source {source} from the store",
                    plan.files()
                ));
                let key = Key::vdb(name, generation);
                self.sources.stage_wal(source, plan, &mut |f, data| {
                    let files = [(f.to_string(), data)];
                    archive::stage_into(&ds, &files)?;
                    self.sources.archive().put(&key, &files)
                })?
            }
            Wal::Own {
                generation,
                upto_seg,
            } => {
                let key = Key::vdb(name, generation);
                let a = self.sources.archive();
                let files: Vec<String> = a
                    .list(&key)?
                    .into_iter()
                    .map(|(f, _)| f)
                    .filter(|f| {
                        f.ends_with(".history")
                            || (!f.ends_with(".partial")
                                && archive::segno(f).is_some_and(|(_, s)| s <= *upto_seg))
                    })
                    .collect();
                progress.say(format!(
                    "staging {} WAL file(s) of VDB {name}'s history from the store",
                    files.len()
                ));
                let (mut n, mut bytes) = (0, 0u64);
                for f in files {
                    let Some(data) = a.get(&key, &f)? else {
                        continue;
                    };
                    bytes += data.len() as u64;
                    n += 1;
                    archive::stage_into(&ds, &[(f, data)])?;
                }
                (n, bytes)
            }
        };
        super::VdbDir::new(&self.store_dir, name).log_line(&format!(
            "staged {n} WAL file(s), {:.1} MiB, in {:.2} s",
            bytes as f64 / (1 << 20) as f64,
            t.elapsed().as_secs_f64()
        ));
        Ok(())
    }

    /// Keeps the tree the new history starts from as the VDB's own snapshot (kind `base`; it
    /// outlives the snapshot it came from) and returns the history, with no timeline yet.
    pub(super) fn start_history(&self, name: &str, p: &Provision) -> anyhow::Result<History> {
        let base = format!(
            "base-{}",
            crate::tree::snapshot_name_for(crate::tree::dataset::now())
        );
        let props = VdbSnapshotProps {
            vdb: name.to_string(),
            kind: SnapshotKind::Base,
            lsn: None,
            timeline: None,
        };
        self.datasets.adopt_snapshot(
            name,
            &base,
            &p.tree.0,
            &p.tree.1,
            Some(serde_json::to_vec(&props)?),
        )?;
        let from_lsn = match &p.start {
            FirstStart::Recover(r) => r.from_lsn,
            FirstStart::Clean => None,
        };
        Ok(History {
            base,
            from_lsn,
            epochs: Vec::new(),
        })
    }

    /// Removes what a history kept: its base snapshot and its archive generation.
    pub(super) fn drop_history(&self, rec: &VdbRecord, h: &History) {
        let _ = self.datasets.delete_snapshot(&rec.name, &h.base);
        if let Err(e) = self.sources.archive().remove(&Key::vdb(&rec.name, &h.base)) {
            tracing::error!(vdb = %rec.name, "cannot remove an old history's WAL: {e:#}");
        }
    }
}
