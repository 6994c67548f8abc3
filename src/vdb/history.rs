//! A VDB's own history (`vdb rewind NAME --at TIME`): its WAL archived into the store, the
//! timelines it lived on, the range of moments it can go back to, and the plan for one moment
//! (its history's base, the WAL of the timeline it was on at that moment, replayed to it).
//!
//! Invariants: a timeline's WAL is complete in the archive once the VDB left it (the archiver
//! has every completed segment; [`VdbService::seal`] adds the last, partial one, with
//! postgres stopped); the current epoch of a history is the last one.

use super::provision::{Provision, Wal};
use super::service::VdbService;
use super::{Epoch, VdbRecord};
use crate::api::Range;
use crate::archive::{self, Key};
use crate::pg::provision::{FirstStart, Moment, Recovery, Target};
use crate::pg::{self, lsn};
use crate::refuse;
use std::time::Duration;

impl VdbService {
    /// The archiver's round for the VDBs: every WAL file a VDB marked ready goes into its
    /// history's generation of the archive.
    pub fn archive_round(&self) {
        for rec in self.records().unwrap_or_default() {
            let _g = self.archive_lock.lock();
            // Read again under the lock: the tree and the generation change together.
            let Ok(Some(rec)) = self.records.get(&rec.name) else {
                continue;
            };
            let Some(h) = &rec.history else { continue };
            let Ok(Some(live)) = self.datasets.get(&rec.name) else {
                continue;
            };
            let acks = rec.dir(&self.store_dir).wal_acks();
            if let Err(e) =
                self.sources
                    .archive()
                    .ingest(&Key::vdb(&rec.name, &h.base), &live, &acks)
            {
                tracing::error!(vdb = %rec.name, "cannot archive WAL into the store: {e:#}");
            }
        }
        // Archives of VDBs that are gone (a delete racing a round) go.
        let names: std::collections::HashSet<String> = self
            .records()
            .unwrap_or_default()
            .into_iter()
            .map(|r| r.name)
            .collect();
        for v in self.sources.archive().vdbs().unwrap_or_default() {
            if !names.contains(&v) {
                let _ = self.sources.archive().remove(&Key::vdb_all(&v));
            }
        }
    }

    /// Where the WAL of the stopped VDB ends, if its postgres shut down cleanly: its shutdown
    /// checkpoint (everything before it is what the VDB held).
    pub(super) fn wal_end(&self, rec: &VdbRecord) -> Option<u64> {
        let out = pg::run(
            pg::as_postgres(&rec.install.bin("pg_controldata")).arg(&rec.data_dir),
            Duration::from_secs(60),
        )
        .ok()?;
        let control = pg::conf::parse_controldata(&out.stdout_text());
        if control.get("Database cluster state").map(String::as_str) != Some("shut down") {
            return None;
        }
        control
            .get("Latest checkpoint location")
            .and_then(|v| lsn::parse(v))
    }

    /// With postgres stopped: the WAL files of the VDB's pg_wal the archive does not have yet
    /// (the last, partial segment of the timeline it is about to leave) go into its history's
    /// generation, and the current epoch ends at `end`.
    pub(super) fn seal(&self, rec: &mut VdbRecord, end: Option<u64>) -> anyhow::Result<()> {
        let Some(h) = &mut rec.history else {
            return Ok(());
        };
        let key = Key::vdb(&rec.name, &h.base);
        let a = self.sources.archive();
        let have: std::collections::HashMap<String, u64> = a.list(&key)?.into_iter().collect();
        let wal = rec.data_dir.join("pg_wal");
        let mut files = Vec::new();
        for e in std::fs::read_dir(&wal)?.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            let wanted = (archive::segno(&name).is_some() && !name.ends_with(".partial"))
                || name.ends_with(".history");
            // What the archive has is complete (a left timeline never continues).
            if wanted && !have.contains_key(&name) {
                files.push((name, std::fs::read(e.path())?));
            }
        }
        a.put(&key, &files)?;
        if let Some(last) = h.epochs.last_mut() {
            if last.until_us.is_none() {
                last.until_us = Some(crate::time::now_us());
                last.until_lsn = end;
            }
        }
        Ok(())
    }

    /// Starts the next epoch of the VDB's history: the timeline its postgres is on now.
    pub(super) fn begin_epoch(&self, rec: &mut VdbRecord) {
        let timeline = pg::provision::current_timeline(&rec.cluster(&self.store_dir));
        let Some(h) = &mut rec.history else { return };
        match timeline {
            Ok(timeline) => {
                if h.epochs
                    .last()
                    .is_some_and(|e| e.timeline == timeline && e.until_lsn.is_none())
                {
                    return;
                }
                h.epochs.push(Epoch {
                    timeline,
                    from_us: crate::time::now_us(),
                    until_us: None,
                    until_lsn: None,
                })
            }
            Err(e) => {
                tracing::error!(vdb = %rec.name, "cannot read its timeline; its history ends here: {e:#}")
            }
        }
    }

    /// The moments `vdb rewind --at` can go back to.
    pub(super) fn history_range(&self, rec: &VdbRecord) -> Option<Range> {
        let h = rec.history.as_ref()?;
        let first = h.epochs.first()?;
        let last = h.epochs.last()?;
        Some(Range {
            timeline: last.timeline,
            from_lsn: h.from_lsn.map(lsn::format).unwrap_or_default(),
            from_time: crate::time::rfc3339_us(first.from_us),
            to_lsn: String::new(),
            to_time: crate::time::rfc3339_us(crate::time::now_us()),
            from_snapshot: Some(format!("{}@{}", rec.name, h.base)),
        })
    }

    /// How to rewind the VDB to moment `t` (Unix microseconds) of its history. Called with the
    /// VDB stopped and sealed: every timeline it lived on has an end.
    pub(super) fn provision_own_moment(
        &self,
        rec: &VdbRecord,
        t: i64,
    ) -> anyhow::Result<Provision> {
        let Some(h) = &rec.history else {
            refuse!(
                Conflict,
                "VDB {} keeps no history to rewind in (it was made before vdbfs kept one); \
                 'vdbfs vdb rewind {} --to SNAPSHOT' goes back to one of its snapshots",
                rec.name,
                rec.name
            );
        };
        let range = self.history_range(rec);
        let Some(epoch) = h.epochs.iter().rev().find(|e| e.from_us <= t) else {
            refuse!(
                Invalid,
                "{} is before the history of VDB {} (it goes back {}); 'vdbfs vdb status {}' \
                 shows the range",
                crate::time::rfc3339_us(t),
                rec.name,
                range.map(|r| r.to_string()).unwrap_or_default(),
                rec.name
            );
        };
        if t > crate::time::now_us() {
            refuse!(
                Invalid,
                "{} is in the future; VDB {} can go back to any moment {}",
                crate::time::rfc3339_us(t),
                rec.name,
                range.map(|r| r.to_string()).unwrap_or_default()
            );
        }
        // A moment after the VDB left that timeline cleanly is its end: the WAL is cut there
        // (a time target would find no commit after it and end recovery short of it).
        let (cut, target) = match (epoch.until_us, epoch.until_lsn) {
            (Some(u), Some(l)) if t >= u => (
                Some(Target {
                    lsn: l,
                    timeline: epoch.timeline,
                }),
                None,
            ),
            _ => (None, Some(Moment::Time(t))),
        };
        let stop = epoch.until_lsn;
        let upto_seg = stop.map_or(u64::MAX, |s| s / lsn::SEGMENT_SIZE);
        Ok(Provision {
            tree: (rec.name.clone(), h.base.clone()),
            parent: rec.parent.clone(),
            start: FirstStart::Recover(Recovery {
                cut,
                target,
                timeline: Some(epoch.timeline),
                stop_lsn: stop,
                from_lsn: h.from_lsn,
            }),
            wal: Wal::Own {
                generation: h.base.clone(),
                upto_seg,
            },
            describe: format!(
                "its history at {} (timeline {})",
                crate::time::rfc3339_us(t),
                epoch.timeline
            ),
            new_history: false,
        })
    }
}
