//! The WAL a source keeps in the store (`crate::archive`) and what it makes possible: the
//! archiver's round for the staging standbys, retention of the archive, the ranges a VDB can be
//! provisioned at, and the plan for one moment (the newest snapshot at or before it, the WAL
//! from there, the recovery target).
//!
//! Invariants: a range starts at a snapshot on the current timeline's history and ends at what
//! the staging standby replayed (a record boundary), so every moment in it has a base and all
//! the WAL up to it; a moment outside is refused with the range.

use super::service::SourceService;
use super::SourceRecord;
use crate::api::Range;
use crate::archive::{self, Key};
use crate::pg::lsn;
use crate::pg::provision::{Moment, Recovery, Target};
use crate::refuse;
use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

/// A validated-sync snapshot as a base to recover from.
#[derive(Debug, Clone)]
struct Base {
    snap: String,
    lsn: u64,
    /// Upper bound of its commit times (see `SnapshotProps::time_us`).
    time_us: i64,
    timeline: u32,
    /// Where a clone's recovery starts.
    redo: u64,
}

/// The end of what a source has: the staging standby's replay position, up to when the source
/// is known to have committed nothing else, on which timeline.
#[derive(Debug, Clone, Copy)]
struct End {
    lsn: u64,
    time_us: i64,
    timeline: u32,
    /// The commit time of the last transaction replayed (when staging answered).
    commit_us: Option<i64>,
}

/// Where a staged WAL file comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum From {
    Archive,
    Staging,
}

/// How to provision a source at one moment.
#[derive(Debug, Clone)]
pub struct MomentPlan {
    /// The snapshot to clone (`NAME`, `SNAP`).
    pub base: (String, String),
    pub recovery: Recovery,
    /// WAL files to put into the clone's pg_wal, and where from.
    files: Vec<(String, From)>,
    /// What it amounts to, for progress lines.
    pub describe: String,
}

impl MomentPlan {
    /// How many WAL files the plan stages.
    pub fn files(&self) -> usize {
        self.files.len()
    }
}

/// `TLI.history` -> (parent timeline -> the LSN where it was left).
fn parse_history(text: &str) -> BTreeMap<u32, u64> {
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            Some((f.next()?.parse().ok()?, lsn::parse(f.next()?)?))
        })
        .collect()
}

fn describe_moment(m: Moment) -> String {
    match m {
        Moment::Lsn(l) => format!("LSN {}", lsn::format(l)),
        Moment::Time(us) => crate::time::rfc3339_us(us),
    }
}

impl SourceService {
    /// The archiver's round for the staging standbys: every file they marked ready goes into
    /// the store's archive.
    pub fn archive_round(&self) {
        for rec in self
            .records()
            .unwrap_or_default()
            .into_iter()
            .filter(|r| r.enabled && !r.linking)
        {
            let Ok(Some(live)) = self.datasets.get(&rec.name) else {
                continue;
            };
            let acks = rec.dir(&self.store_dir).wal_acks();
            if let Err(e) = self.archive.ingest(&Key::source(&rec.name), &live, &acks) {
                tracing::error!(source = %rec.name, "cannot archive WAL into the store: {e:#}");
            }
        }
    }

    /// Retention of the archive: the segments before the oldest validated-sync snapshot's go
    /// (history files stay).
    pub(super) fn prune_archive(&self, name: &str) {
        let Some(oldest) = self.bases(name).iter().map(|b| b.lsn).min() else {
            return;
        };
        let keep_from = oldest / lsn::SEGMENT_SIZE;
        match self.archive.remove_where(&Key::source(name), &|n| {
            archive::segno(n).is_some_and(|(_, s)| s < keep_from)
        }) {
            Ok(0) => {}
            Ok(n) => {
                tracing::info!(source = %name, segments = n, "retention: WAL segments no snapshot needs deleted")
            }
            Err(e) => tracing::error!(source = %name, "retention of the WAL archive failed: {e:#}"),
        }
    }

    /// The source's validated-sync snapshots, by LSN.
    fn bases(&self, name: &str) -> Vec<Base> {
        let mut v: Vec<Base> = self
            .datasets
            .snapshots(Some(name))
            .unwrap_or_default()
            .iter()
            .filter_map(|s| {
                let p = super::snapshot_props(s)?;
                let lsn = lsn::parse(&p.lsn)?;
                let created_us =
                    s.rec.created.secs * 1_000_000 + (s.rec.created.nsecs / 1000) as i64;
                Some(Base {
                    snap: s.rec.name.clone(),
                    lsn,
                    time_us: p.time_us(created_us),
                    timeline: p.timeline,
                    redo: p.redo_lsn.as_deref().and_then(lsn::parse).unwrap_or(lsn),
                })
            })
            .collect();
        v.sort_by_key(|b| (b.lsn, b.time_us));
        v
    }

    /// What the staging standby has replayed, or (when it does not answer) the newest snapshot.
    fn end(&self, rec: &SourceRecord, bases: &[Base]) -> Option<End> {
        let newest = bases.last().map(|b| End {
            lsn: b.lsn,
            time_us: b.time_us,
            timeline: b.timeline,
            commit_us: None,
        });
        let rows = rec
            .cluster(&self.store_dir)
            .query(
                "SELECT pg_last_wal_replay_lsn(), \
                 (extract(epoch FROM pg_last_xact_replay_timestamp()) * 1000000)::bigint, \
                 (SELECT latest_end_lsn FROM pg_stat_wal_receiver), \
                 (extract(epoch FROM (SELECT latest_end_time FROM pg_stat_wal_receiver)) * 1000000)::bigint, \
                 (SELECT received_tli FROM pg_stat_wal_receiver), \
                 (SELECT timeline_id FROM pg_control_checkpoint())",
                Duration::from_secs(10),
            )
            .ok();
        let Some(r) = rows.and_then(|r| r.into_iter().next()) else {
            return newest;
        };
        let get = |i: usize| r.get(i).cloned().flatten();
        let Some(replay) = get(0).as_deref().and_then(lsn::parse) else {
            return newest;
        };
        let commit_us = get(1).and_then(|v| v.parse::<i64>().ok());
        let sender_end = get(2).as_deref().and_then(lsn::parse);
        let sender_us = get(3).and_then(|v| v.parse::<i64>().ok());
        // The sender said at sender_us that its WAL ended at sender_end: once that is replayed,
        // nothing else was committed up to then.
        let caught_up = match (sender_end, sender_us) {
            (Some(e), Some(t)) if e <= replay => Some(t),
            _ => None,
        };
        let time_us = [commit_us, caught_up, newest.map(|n| n.time_us)]
            .into_iter()
            .flatten()
            .max()?;
        let timeline = [
            get(4).and_then(|v| v.parse::<u32>().ok()),
            get(5).and_then(|v| v.parse::<u32>().ok()),
            newest.map(|n| n.timeline),
        ]
        .into_iter()
        .flatten()
        .max()
        .unwrap_or(1);
        Some(End {
            lsn: replay.max(newest.map_or(0, |n| n.lsn)),
            time_us,
            timeline,
            commit_us,
        })
    }

    /// A timeline history file from the archive or the staging pg_wal.
    fn history(&self, name: &str, timeline: u32) -> BTreeMap<u32, u64> {
        if timeline <= 1 {
            return BTreeMap::new();
        }
        let file = format!("{timeline:08X}.history");
        let text = self
            .archive
            .get(&Key::source(name), &file)
            .ok()
            .flatten()
            .or_else(|| {
                let live = self.datasets.get(name).ok()??;
                let wal = archive::dir_ino(&live, &["pg_wal"]).ok()??;
                archive::read_file(&live, wal, &file).ok()?
            })
            .unwrap_or_default();
        parse_history(&String::from_utf8_lossy(&text))
    }

    /// The snapshots on the current timeline's history (a snapshot on a timeline left before
    /// its LSN is on another branch), and the end.
    fn usable(&self, rec: &SourceRecord) -> (Vec<Base>, Option<End>) {
        let bases = self.bases(&rec.name);
        let end = self.end(rec, &bases);
        let Some(e) = end else {
            return (Vec::new(), None);
        };
        let left = self.history(&rec.name, e.timeline);
        let usable = bases
            .into_iter()
            .filter(|b| {
                b.timeline == e.timeline
                    || left.get(&b.timeline).is_some_and(|switch| b.lsn <= *switch)
            })
            .collect();
        (usable, end)
    }

    /// The moments a VDB of the source can be provisioned at.
    pub fn ranges(&self, name: &str) -> anyhow::Result<Vec<Range>> {
        let rec = self.record(name)?;
        Ok(self.range_of(&rec).into_iter().collect())
    }

    fn range_of(&self, rec: &SourceRecord) -> Option<Range> {
        let (bases, end) = self.usable(rec);
        let (first, end) = (bases.first()?, end?);
        Some(Range {
            timeline: end.timeline,
            from_lsn: lsn::format(first.lsn),
            from_time: crate::time::rfc3339_us(first.time_us),
            to_lsn: lsn::format(end.lsn.max(first.lsn)),
            to_time: crate::time::rfc3339_us(end.time_us.max(first.time_us)),
            from_snapshot: Some(format!("{}@{}", rec.name, first.snap)),
        })
    }

    /// How to provision source `name` at moment `m`: the newest snapshot at or before it, the
    /// WAL from there to the next snapshot (or to what staging replayed), recovery to `m`.
    /// A moment outside the range is refused with the range.
    pub fn plan_moment(&self, name: &str, m: Moment) -> anyhow::Result<MomentPlan> {
        let rec = self.record(name)?;
        let (bases, end) = self.usable(&rec);
        let range = self.range_of(&rec);
        let (Some(first), Some(end), Some(range)) = (bases.first(), end, range) else {
            refuse!(
                NotFound,
                "source {name} has no snapshot to provision from yet; 'vdbfs source snapshot {name}' takes one"
            );
        };
        let what = describe_moment(m);
        let (before, after) = match m {
            Moment::Lsn(l) => (l < first.lsn, l > end.lsn.max(first.lsn)),
            Moment::Time(t) => (t < first.time_us, t > end.time_us.max(first.time_us)),
        };
        if before || after {
            refuse!(
                Invalid,
                "{what} is {} of source {name}; it can be provisioned at any moment {range} \
                 ('vdbfs timeflow {name}' shows the ranges)",
                if before {
                    "before the first snapshot"
                } else {
                    "after the last WAL received"
                }
            );
        }
        let idx = bases
            .iter()
            .rposition(|b| match m {
                Moment::Lsn(l) => b.lsn <= l,
                Moment::Time(t) => b.time_us <= t,
            })
            .unwrap_or(0);
        let base = &bases[idx];
        // Exactly a snapshot's position: its WAL cut there, nothing to stage.
        if m == Moment::Lsn(base.lsn) {
            return Ok(MomentPlan {
                base: (name.to_string(), base.snap.clone()),
                recovery: Recovery {
                    cut: Some(Target {
                        lsn: base.lsn,
                        timeline: base.timeline,
                    }),
                    from_lsn: Some(base.redo),
                    ..Default::default()
                },
                files: Vec::new(),
                describe: format!("{name}@{} (exactly its LSN)", base.snap),
            });
        }
        let next = bases.get(idx + 1);
        // A moment in the WAL after the last snapshot at or after the last commit there is the
        // end of that WAL; an LSN is a cut of the WAL (recovery ends exactly there, no target
        // to wait for); a time is a recovery target, which the next commit after it stops.
        let (cut, target, stop) = match m {
            Moment::Lsn(l) => (
                Some(Target {
                    lsn: l,
                    timeline: next.map_or(end.timeline, |n| n.timeline),
                }),
                None,
                l,
            ),
            Moment::Time(t) if next.is_none() && end.commit_us.is_none_or(|c| t >= c) => (
                Some(Target {
                    lsn: end.lsn,
                    timeline: end.timeline,
                }),
                None,
                end.lsn,
            ),
            Moment::Time(_) => (None, Some(m), next.map_or(end.lsn, |n| n.lsn)),
        };
        let stop = stop.max(base.lsn);
        let (first_seg, last_seg) = (base.lsn / lsn::SEGMENT_SIZE, stop / lsn::SEGMENT_SIZE);
        let wanted = |n: &str| {
            n.ends_with(".history")
                || archive::segno(n).is_some_and(|(_, s)| s >= first_seg && s <= last_seg)
        };
        let mut files: Vec<(String, From)> = self
            .archive
            .list(&Key::source(name))?
            .into_iter()
            .filter(|(n, _)| wanted(n) && !n.ends_with(".partial"))
            .map(|(n, _)| (n, From::Archive))
            .collect();
        let archived: HashSet<String> = files.iter().map(|(n, _)| n.clone()).collect();
        if let Some(live) = self.datasets.get(name)? {
            if let Some(wal) = archive::dir_ino(&live, &["pg_wal"])? {
                for (n, _) in archive::list_files(&live, wal)? {
                    if wanted(&n) && !archived.contains(&n) && archive::segno(&n).is_some() {
                        files.push((n, From::Staging));
                    }
                }
            }
        }
        files.sort();
        Ok(MomentPlan {
            base: (name.to_string(), base.snap.clone()),
            recovery: Recovery {
                cut,
                target,
                timeline: None,
                stop_lsn: Some(stop),
                from_lsn: Some(base.redo),
            },
            describe: format!(
                "{name}@{} and {:.1} MiB of WAL from the store up to {what}",
                base.snap,
                (stop.saturating_sub(base.redo)) as f64 / (1 << 20) as f64
            ),
            files,
        })
    }

    /// Hands every WAL file of a plan to `each` (name, content), from the archive or the
    /// staging dataset; returns how many and their bytes.
    pub fn stage_wal(
        &self,
        name: &str,
        plan: &MomentPlan,
        each: &mut dyn FnMut(&str, Vec<u8>) -> anyhow::Result<()>,
    ) -> anyhow::Result<(usize, u64)> {
        let key = Key::source(name);
        let live = self.datasets.get(name)?;
        let from_live = |n: &str| -> anyhow::Result<Option<Vec<u8>>> {
            let Some(live) = &live else { return Ok(None) };
            let Some(wal) = archive::dir_ino(live, &["pg_wal"])? else {
                return Ok(None);
            };
            archive::read_file(live, wal, n)
        };
        let (mut n, mut bytes) = (0, 0u64);
        for (file, from) in &plan.files {
            let data = match from {
                From::Archive => match self.archive.get(&key, file)? {
                    Some(d) => Some(d),
                    None => from_live(file)?,
                },
                // Archived (and removed from staging) since the plan was made: from the archive.
                From::Staging => match from_live(file)? {
                    Some(d) => Some(d),
                    None => self.archive.get(&key, file)?,
                },
            };
            let Some(data) = data else {
                refuse!(
                    Unavailable,
                    "WAL file {file} of source {name} is neither in the store's archive nor in \
                     staging any more (retention removed it meanwhile?); try again"
                );
            };
            bytes += data.len() as u64;
            n += 1;
            each(file, data)?;
        }
        Ok((n, bytes))
    }

    /// The WAL the store keeps for a source: (files, bytes).
    pub(super) fn archive_size(&self, name: &str) -> (usize, u64) {
        self.archive.size(&Key::source(name)).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_files_parse_to_switch_points() {
        let h = parse_history(
            "1\t0/3000060\tno recovery target specified\n\n2\t0/5000000\tat restore point\n",
        );
        assert_eq!(h.get(&1), Some(&0x3000060));
        assert_eq!(h.get(&2), Some(&0x5000000));
        assert!(parse_history("").is_empty());
    }
}
