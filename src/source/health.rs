//! The staging standby's health as a user sees it: replay position, lag behind the source, and
//! faults (a broken stream, a gap in the archive) stated, never hidden.

use super::{Mode, SourceRecord};
use crate::pg::RunFiles;
use crate::pg::{lsn, Cluster};
use std::path::Path;
use std::time::Duration;

/// What the standby reports about itself.
#[derive(Debug, Clone, Default)]
pub struct Replay {
    pub receive_lsn: Option<u64>,
    pub replay_lsn: Option<u64>,
    pub replay_time: Option<String>,
    pub secs_since_replay: Option<f64>,
    /// pg_stat_wal_receiver.status ("streaming", ...) or None when no walreceiver runs.
    pub receiver: Option<String>,
    /// The sender's WAL end as last reported to the walreceiver.
    pub sender_end_lsn: Option<u64>,
}

const UTC: &str = r#"'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'"#;

pub fn query_replay(cluster: &Cluster) -> anyhow::Result<Replay> {
    let sql = format!(
        "SELECT pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn(), \
         to_char(pg_last_xact_replay_timestamp() AT TIME ZONE 'UTC', {UTC}), \
         extract(epoch from now() - pg_last_xact_replay_timestamp()), \
         (SELECT status FROM pg_stat_wal_receiver), \
         (SELECT latest_end_lsn FROM pg_stat_wal_receiver)"
    );
    let rows = cluster.query(&sql, Duration::from_secs(10))?;
    let r = rows
        .into_iter()
        .next()
        .ok_or_else(|| anyhow::anyhow!("the staging standby returned no row"))?;
    let l = |i: usize| r.get(i).cloned().flatten().and_then(|s| lsn::parse(&s));
    Ok(Replay {
        receive_lsn: l(0),
        replay_lsn: l(1),
        replay_time: r.get(2).cloned().flatten(),
        secs_since_replay: r.get(3).cloned().flatten().and_then(|s| s.parse().ok()),
        receiver: r.get(4).cloned().flatten(),
        sender_end_lsn: l(5),
    })
}

/// Segments in a WAL archive: (timeline, segment number), sorted.
pub fn archive_segments(dir: &Path) -> Vec<(u32, u64)> {
    let mut v: Vec<(u32, u64)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| lsn::parse_segment(&e.file_name().to_string_lossy()))
        .collect();
    v.sort_unstable_by_key(|(t, s)| (*s, *t));
    v
}

/// The WAL segment a log-shipping standby that replayed up to `replay` asks the archive for
/// next. Archived segments are whole: replay inside a segment means it was restored and the next
/// one is needed; replay exactly at a boundary (where it stops after a WAL switch) means the
/// segment starting there is needed.
pub fn next_segment(replay: u64) -> u64 {
    replay.saturating_sub(1) / lsn::SEGMENT_SIZE + 1
}

/// Position and lag of a source, and what is wrong with it, if anything.
#[derive(Debug, Clone, Default)]
pub struct Sync {
    pub source_lsn: Option<u64>,
    pub lag_bytes: Option<u64>,
    pub lag_seconds: Option<f64>,
    pub fault: Option<String>,
}

/// The last line of the staging log that explains a replication problem.
pub fn last_problem(log: &Path) -> Option<String> {
    let text = std::fs::read_to_string(log).ok()?;
    text.lines()
        .rev()
        .take(400)
        .find(|l| {
            (l.contains("FATAL") || l.contains("ERROR") || l.contains("could not"))
                && !l.contains("terminating")
        })
        .map(|l| l.trim().to_string())
}

/// Lag and faults from the standby's report. `streaming_grace` is true while a freshly started
/// standby may not have its walreceiver connected yet.
pub fn assess(rec: &SourceRecord, store: &Path, r: &Replay, streaming_grace: bool) -> Sync {
    let mut s = Sync::default();
    let replay = r.replay_lsn.or(r.receive_lsn);
    match rec.mode {
        Mode::BackupStream | Mode::Stream => {
            s.source_lsn = match (r.sender_end_lsn, r.receive_lsn) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => a.or(b),
            };
            if r.receiver.as_deref() != Some("streaming") && !streaming_grace {
                let why = last_problem(&rec.dir(store).postgres_log())
                    .map(|l| format!("; staging log: {l}"))
                    .unwrap_or_default();
                s.fault = Some(format!(
                    "the WAL stream from the source {} is down (walreceiver: {}){why}",
                    rec.conn.as_ref().map(|c| c.redacted()).unwrap_or_default(),
                    r.receiver.as_deref().unwrap_or("not running")
                ));
            }
            s.lag_bytes = match (s.source_lsn, replay) {
                (Some(src), Some(rep)) => Some(src.saturating_sub(rep)),
                _ => None,
            };
        }
        Mode::LogShipping => {
            let archive = rec.archive.clone().unwrap_or_default();
            let segs = archive_segments(&archive);
            let newest = segs.last().map(|(_, s)| *s);
            s.source_lsn = newest.map(|n| (n + 1) * lsn::SEGMENT_SIZE);
            if let (Some(newest), Some(rep)) = (newest, replay) {
                let needed = next_segment(rep);
                s.lag_bytes = Some(if needed > newest {
                    0
                } else {
                    (newest + 1) * lsn::SEGMENT_SIZE - rep
                });
                if needed <= newest && !segs.iter().any(|(_, sg)| *sg == needed) {
                    let tli = segs.last().map(|(t, _)| *t).unwrap_or(1);
                    s.fault = Some(format!(
                        "archive gap: WAL segment {} is missing from {} while later segments \
                         exist; the staging standby cannot replay past {}; copy the missing \
                         segment into the archive",
                        lsn::segment_name(tli, needed),
                        archive.display(),
                        lsn::format(rep)
                    ));
                }
            }
        }
    }
    s.lag_seconds = match s.lag_bytes {
        Some(0) => Some(0.0),
        Some(_) => r.secs_since_replay.map(|x| x.max(0.0)),
        None => None,
    };
    s
}

/// Formats an optional LSN for the API.
pub fn fmt(l: Option<u64>) -> Option<String> {
    l.map(lsn::format)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_segment_needed_next_after_a_switch_is_the_one_at_the_boundary() {
        let seg = lsn::SEGMENT_SIZE;
        assert_eq!(
            next_segment(4 * seg),
            4,
            "stopped at the start of segment 4"
        );
        assert_eq!(next_segment(4 * seg + 0x100), 5, "inside segment 4");
        assert_eq!(next_segment(5 * seg - 1), 5);
    }
}
