//! The first start of a clone of a snapshot as a primary of its own, shared by VDBs and the
//! preparation of snapshots: how it recovers ([`FirstStart`]), the cut of the WAL at a staging
//! snapshot's position ([`truncate_wal`]), the recovery settings, and the promotion with
//! progress while postgres replays ([`finish`]).
//!
//! Invariants: the WAL is cut only at a position no page of the snapshot is newer than (a
//! standby's replay position); a provisioning start is a standby-mode start with no upstream
//! followed by a promotion (an end-of-recovery record and a background checkpoint, where plain
//! crash recovery or a recovery target's own promotion would wait for a full checkpoint); a
//! promotion replays all the WAL pg_wal holds first, stopping at the recovery target; what the
//! progress reports need is kept in a plan file next to the cluster's log, written before the
//! start and removed once it is promoted.

use super::{conf, lsn, Cluster};
use crate::refuse;
use anyhow::Context;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Where a clone of a staging snapshot must end its recovery: the standby's replay position
/// when the snapshot was taken, on its timeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Target {
    pub lsn: u64,
    pub timeline: u32,
}

/// A moment to recover to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Moment {
    /// Every record that ends at or before this LSN (`recovery_target_lsn`, stopping before the
    /// first record that starts there or later).
    Lsn(u64),
    /// Every transaction committed at or before this time, in Unix microseconds
    /// (`recovery_target_time`, inclusive).
    Time(i64),
}

/// How a clone's first start recovers.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Recovery {
    /// Cut pg_wal here first, so recovery ends exactly there.
    pub cut: Option<Target>,
    /// Stop at this moment (paused there, then promoted).
    pub target: Option<Moment>,
    /// `recovery_target_timeline` (default: latest).
    pub timeline: Option<u32>,
    /// About where replay ends (the end of the WAL staged for it), for progress.
    pub stop_lsn: Option<u64>,
    /// Where replay starts (the redo point of the base), for progress and the replay rate.
    pub from_lsn: Option<u64>,
}

/// The first start of a clone.
#[derive(Debug, Clone)]
pub enum FirstStart {
    /// A cleanly shut down primary (a prepared image): a plain start, no redo.
    Clean,
    /// A standby-mode start with no upstream, then promotion.
    Recover(Recovery),
}

/// Recovery settings a provisioning start may write (removed once the clone is a primary).
pub const RECOVERY_KEYS: [&str; 9] = [
    "recovery_target_lsn",
    "recovery_target_time",
    "recovery_target_inclusive",
    "recovery_target_action",
    "recovery_target_timeline",
    "restore_command",
    "hot_standby",
    "recovery_init_sync_method",
    "recovery_target",
];

/// The signal file of a provisioning start; postgres removes it when it is promoted.
pub const PROVISION_SIGNAL: &str = "standby.signal";

/// What the end of a provisioning start reports on (see [`finish`]).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Wait {
    pub target: Option<Moment>,
    pub stop_lsn: Option<u64>,
    pub from_lsn: Option<u64>,
}

/// The plan file of a cluster whose log is `log`.
fn plan_path(log: &Path) -> PathBuf {
    log.with_file_name("provision.json")
}

pub fn write_signal(data: &Path) -> anyhow::Result<()> {
    conf::write_atomic(&data.join(PROVISION_SIGNAL), b"", 0o600)
}

/// Prepares a clone's data directory (mounted at `data`) for its first start: cuts the WAL,
/// writes the signal and the plan; returns the `postgresql.auto.conf` settings of that start
/// (every recovery key: set, or removed).
pub fn first_start(
    data: &Path,
    cluster: &Cluster,
    start: &FirstStart,
) -> anyhow::Result<Vec<(&'static str, Option<String>)>> {
    let mut settings: Vec<(&'static str, Option<String>)> =
        RECOVERY_KEYS.iter().map(|k| (*k, None)).collect();
    let _ = std::fs::remove_file(plan_path(&cluster.log));
    let FirstStart::Recover(r) = start else {
        return Ok(settings);
    };
    let mut wait = Wait {
        target: r.target,
        stop_lsn: r.stop_lsn,
        from_lsn: r.from_lsn,
    };
    if let Some(t) = &r.cut {
        match truncate_wal(data, t) {
            Ok(true) => {}
            Ok(false) => wait.target = wait.target.or(Some(Moment::Lsn(t.lsn))),
            Err(e) => {
                tracing::warn!(data = %data.display(), "cannot cut the WAL at {}: {e:#}; recovering to it instead", lsn::format(t.lsn));
                wait.target = wait.target.or(Some(Moment::Lsn(t.lsn)));
            }
        }
    }
    let s = |v: &str| Some(v.to_string());
    let set = |settings: &mut Vec<(&'static str, Option<String>)>, k: &str, v: Option<String>| {
        if let Some(e) = settings.iter_mut().find(|(key, _)| *key == k) {
            e.1 = v;
        }
    };
    match wait.target {
        Some(Moment::Lsn(l)) => {
            set(&mut settings, "recovery_target_lsn", s(&lsn::format(l)));
            set(&mut settings, "recovery_target_inclusive", s("off"));
        }
        Some(Moment::Time(us)) => {
            set(&mut settings, "recovery_target_time", s(&pg_time(us)));
            set(&mut settings, "recovery_target_inclusive", s("on"));
        }
        None => {}
    }
    if wait.target.is_some() {
        set(&mut settings, "recovery_target_action", s("pause"));
    }
    if let Some(t) = r.timeline {
        set(&mut settings, "recovery_target_timeline", s(&t.to_string()));
    }
    // postgres fsyncs every file of a data directory it finds not shut down cleanly (1000+
    // FUSE fsyncs). A clone's files all come from a committed snapshot: nothing to make
    // durable, so syncfs (cheap) for this start only.
    set(&mut settings, "recovery_init_sync_method", s("syncfs"));
    write_signal(data)?;
    conf::write_atomic(&plan_path(&cluster.log), &serde_json::to_vec(&wait)?, 0o600)?;
    Ok(settings)
}

/// A time in Unix microseconds as PostgreSQL reads it (UTC, microseconds).
pub fn pg_time(us: i64) -> String {
    match jiff::Timestamp::from_microsecond(us) {
        Ok(t) => t.strftime("%Y-%m-%d %H:%M:%S%.6f+00").to_string(),
        Err(_) => format!("@{us}"),
    }
}

/// Cuts the WAL in a cloned data directory at `t.lsn`: zeroes the rest of the segment holding
/// it and removes the later segments, so recovery ends exactly there (and promotion needs no
/// wait at a recovery target). Safe because a standby never writes a page past what it
/// replayed: no page in the snapshot is newer than `t.lsn`. Returns false, changing nothing,
/// when the segment is not there.
pub fn truncate_wal(data: &Path, t: &Target) -> anyhow::Result<bool> {
    use std::io::{Seek, SeekFrom, Write};
    let wal = data.join("pg_wal");
    let files: Vec<(String, PathBuf)> = std::fs::read_dir(&wal)
        .with_context(|| format!("cannot list {}", wal.display()))?
        .flatten()
        .map(|e| (e.file_name().to_string_lossy().to_string(), e.path()))
        .filter(|(name, _)| lsn::parse_segment(name).is_some())
        .collect();
    // The segment size of this cluster is the size of its segment files.
    let Some(seg_size) = files
        .iter()
        .find_map(|(_, p)| std::fs::metadata(p).ok().map(|m| m.len()))
        .filter(|s| s.is_power_of_two() && *s >= 1 << 20)
    else {
        return Ok(false);
    };
    let segs: Vec<(u32, u64, PathBuf)> = files
        .into_iter()
        .filter_map(|(name, p)| {
            let (tli, no) = lsn::parse_segment_sized(&name, seg_size)?;
            Some((tli, no, p))
        })
        .collect();
    let target_seg = t.lsn / seg_size;
    let offset = t.lsn % seg_size;
    let remove_later = |segs: &[(u32, u64, PathBuf)]| -> anyhow::Result<()> {
        for (_, no, p) in segs {
            if *no > target_seg {
                std::fs::remove_file(p)
                    .with_context(|| format!("cannot remove {}", p.display()))?;
            }
        }
        Ok(())
    };
    let Some((_, _, path)) = segs
        .iter()
        .find(|(tli, no, _)| *tli == t.timeline && *no == target_seg)
    else {
        // At a segment boundary the WAL may end with the previous segment (e.g. after the
        // backup's XLOG_SWITCH): nothing to zero.
        let prev = segs
            .iter()
            .any(|(tli, no, _)| *tli == t.timeline && *no + 1 == target_seg);
        if offset == 0 && prev {
            remove_later(&segs)?;
            return Ok(true);
        }
        return Ok(false);
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    f.seek(SeekFrom::Start(offset))?;
    let zeros = vec![0u8; 1 << 20];
    let mut left = seg_size - offset;
    while left > 0 {
        let n = left.min(zeros.len() as u64) as usize;
        f.write_all(&zeros[..n])?;
        left -= n as u64;
    }
    f.sync_all()?;
    remove_later(&segs)?;
    Ok(true)
}

/// Forgets the plan of a provisioning start (what it recovers to, for progress).
pub fn forget_plan(cluster: &Cluster) {
    let _ = std::fs::remove_file(plan_path(&cluster.log));
}

/// What a provisioning start replayed: bytes of WAL from the base's redo point and seconds
/// from the start until promotion was asked for.
#[derive(Debug, Clone, Copy, Default)]
pub struct Replayed {
    pub bytes: u64,
    pub secs: f64,
}

impl Replayed {
    pub fn describe(&self) -> String {
        let mb = self.bytes as f64 / (1 << 20) as f64;
        format!(
            "replayed {mb:.1} MiB of WAL in {:.2} s ({:.0} MiB/s)",
            self.secs,
            mb / self.secs.max(0.001)
        )
    }
}

/// The end of a provisioning start: `pg_ctl -w` returned once the standby was consistent; asks
/// for promotion at once (postgres first replays all the WAL its pg_wal holds, stopping at the
/// recovery target if there is one) and waits, bounded by `deadline`, until it left recovery,
/// reporting progress every second. `started` is when the start began, for the replay rate.
/// If postgres exits meanwhile (a recovery target the WAL does not reach ends recovery with a
/// FATAL), the error says so and carries its log tail.
pub fn finish(
    cluster: &Cluster,
    pid: i32,
    started: Instant,
    deadline: Instant,
    say: &dyn Fn(String),
    log_tail: &dyn Fn() -> String,
) -> anyhow::Result<Replayed> {
    let plan: Wait = std::fs::read(plan_path(&cluster.log))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let what = match plan.target {
        Some(Moment::Lsn(l)) => format!("LSN {}", lsn::format(l)),
        Some(Moment::Time(us)) => pg_time(us),
        None => "the end of its WAL".to_string(),
    };
    // An error naming the data directory, with the server log's tail.
    let fail = |what_happened: String| {
        crate::api::refusal(
            crate::api::ErrorKind::Internal,
            format!(
                "postgres on {} {what_happened}; postgres log ({}):\n{}",
                cluster.data_dir.display(),
                cluster.log.display(),
                log_tail()
            ),
        )
    };
    let died = || fail(format!("stopped while recovering to {what}"));
    let q = |sql: &str| -> Option<Vec<Option<String>>> {
        cluster
            .query(sql, Duration::from_secs(10))
            .ok()?
            .into_iter()
            .next()
    };
    let first = q("SELECT pg_last_wal_replay_lsn()")
        .and_then(|r| r.first().cloned().flatten())
        .and_then(|l| lsn::parse(&l));
    if let Err(e) = cluster.query("SELECT pg_promote(false)", Duration::from_secs(30)) {
        if !super::pid_alive(pid) {
            return Err(died());
        }
        return Err(fail(format!("could not be promoted: {e:#}")));
    }
    let from = plan.from_lsn.or(first).unwrap_or(0);
    let mut replayed = first.unwrap_or(from);
    let mut told = Instant::now();
    loop {
        if !super::pid_alive(pid) {
            return Err(died());
        }
        if let Some(r) = q("SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn(), \
             CASE WHEN pg_is_in_recovery() THEN pg_get_wal_replay_pause_state() END")
        {
            let get = |i: usize| r.get(i).cloned().flatten().unwrap_or_default();
            replayed = lsn::parse(&get(1)).unwrap_or(replayed);
            if get(0) == "f" {
                break;
            }
            // Paused at the recovery target: a pause only notices the promotion once a second,
            // a resume at once (recovery then ends there, promoted).
            if get(2) == "paused" {
                let _ = q("SELECT pg_wal_replay_resume()");
            }
        }
        if Instant::now() > deadline {
            refuse!(
                Unavailable,
                "postgres on {} did not finish recovering to {what} in time (replayed up to {}); \
                 postgres log ({}):\n{}",
                cluster.data_dir.display(),
                lsn::format(replayed),
                cluster.log.display(),
                log_tail()
            );
        }
        if told.elapsed() >= Duration::from_secs(1) {
            told = Instant::now();
            let mib = |b: u64| b as f64 / (1 << 20) as f64;
            let done = replayed.saturating_sub(from);
            say(format!(
                "replaying WAL towards {what}: {:.1}{} MiB ({:.0} MiB/s), at {}",
                mib(done),
                plan.stop_lsn
                    .filter(|s| *s > from)
                    .map(|s| format!(" of about {:.1}", mib(s - from)))
                    .unwrap_or_default(),
                mib(done) / started.elapsed().as_secs_f64().max(0.001),
                lsn::format(replayed)
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = std::fs::remove_file(plan_path(&cluster.log));
    Ok(Replayed {
        bytes: replayed.saturating_sub(from),
        secs: started.elapsed().as_secs_f64(),
    })
}

/// After the provisioning start: the clone is a primary; its recovery settings go, except the
/// values in `keep` (a user's own settings win).
pub fn clear_recovery(data: &Path, keep: &dyn Fn(&str) -> Option<String>) -> anyhow::Result<()> {
    let settings: Vec<(&str, Option<String>)> =
        RECOVERY_KEYS.iter().map(|k| (*k, keep(k))).collect();
    conf::edit_auto_conf(data, &settings)
}

/// Removes the recovery target of a provisioning start whose WAL ends before it (its timeline
/// and the rest stay): the end of that WAL is the moment asked for.
pub fn drop_target(data: &Path) -> anyhow::Result<()> {
    conf::edit_auto_conf(
        data,
        &[
            ("recovery_target_lsn", None),
            ("recovery_target_time", None),
            ("recovery_target_inclusive", None),
            ("recovery_target_action", None),
        ],
    )
}

/// The current timeline of a running cluster.
pub fn current_timeline(cluster: &Cluster) -> anyhow::Result<u32> {
    let rows = cluster.query(
        "SELECT substr(pg_walfile_name(CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() \
         ELSE pg_current_wal_insert_lsn() END), 1, 8)",
        Duration::from_secs(10),
    )?;
    rows.first()
        .and_then(|r| r.first().cloned().flatten())
        .and_then(|t| u32::from_str_radix(&t, 16).ok())
        .ok_or_else(|| {
            anyhow::anyhow!("cannot read the timeline of {}", cluster.data_dir.display())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wal_is_cut_exactly_at_the_target() {
        let dir = tempfile::tempdir().unwrap();
        let wal = dir.path().join("pg_wal");
        std::fs::create_dir(&wal).unwrap();
        let seg = 1u64 << 20; // a cluster made with --wal-segsize=1
        for (name, fill) in [
            ("000000010000000000000001", 1u8),
            ("000000010000000000000002", 2),
            ("000000010000000000000003", 3),
            ("00000001.history", 9),
        ] {
            let len = if name.ends_with("history") { 10 } else { seg };
            std::fs::write(wal.join(name), vec![fill; len as usize]).unwrap();
        }
        let t = Target {
            lsn: 2 * seg + 0x1238,
            timeline: 1,
        };
        assert!(truncate_wal(dir.path(), &t).unwrap());
        let two = std::fs::read(wal.join("000000010000000000000002")).unwrap();
        assert_eq!(two.len() as u64, seg, "the segment keeps its size");
        assert!(
            two[..0x1238].iter().all(|b| *b == 2),
            "WAL before the target is kept"
        );
        assert!(
            two[0x1238..].iter().all(|b| *b == 0),
            "WAL from the target on is zero"
        );
        assert!(std::fs::read(wal.join("000000010000000000000001"))
            .unwrap()
            .iter()
            .all(|b| *b == 1));
        assert!(
            !wal.join("000000010000000000000003").exists(),
            "later segments go"
        );
        assert!(wal.join("00000001.history").exists());
        // At a segment boundary whose segment was never written: nothing to zero, still cut.
        let boundary = Target {
            lsn: 3 * seg,
            timeline: 1,
        };
        assert!(truncate_wal(dir.path(), &boundary).unwrap());
        assert!(wal.join("000000010000000000000002").exists());
        // Another timeline's segment is not touched: nothing to cut, nothing changed.
        let other = Target {
            lsn: 2 * seg,
            timeline: 2,
        };
        assert!(!truncate_wal(dir.path(), &other).unwrap());
        assert!(wal.join("000000010000000000000002").exists());
    }

    #[test]
    fn times_are_written_for_postgres_in_utc_microseconds() {
        assert_eq!(
            pg_time(1_795_683_125_000_001),
            "2026-11-26 08:52:05.000001+00"
        );
        assert_eq!(pg_time(0), "1970-01-01 00:00:00.000000+00");
    }
}
