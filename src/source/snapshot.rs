//! Validated-sync snapshots of a source (on demand, by policy, the first one of a link), the
//! catch-up wait before an on-demand one, and retention.
//!
//! Invariant: WAL replay on staging is paused only while a snapshot is taken, and resumed on
//! every path out (a guard).

use super::service::SourceService;
use super::{health, preflight, SnapshotProps, SourceRecord};
use crate::api::{self, Progress};
use crate::pg;
use crate::refuse;
use std::time::{Duration, Instant};

/// How long an on-demand snapshot waits for staging to replay the source's current position.
const CATCH_UP_WAIT: Duration = Duration::from_secs(60);

/// Resumes WAL replay on staging when dropped.
struct Resume<'a>(&'a pg::Cluster);

impl Drop for Resume<'_> {
    fn drop(&mut self) {
        if let Err(e) = self
            .0
            .query("SELECT pg_wal_replay_resume()", Duration::from_secs(30))
        {
            tracing::error!("cannot resume WAL replay on staging: {e:#}");
        }
    }
}

impl SourceService {
    /// An on-demand validated-sync snapshot, named `snapshot` (else by its time). A streaming
    /// source is asked for its WAL position first and the snapshot waits (bounded) until
    /// staging replayed that far: it holds what the source had committed when the command ran.
    pub fn snapshot(
        &self,
        name: &str,
        snapshot: Option<&str>,
        progress: Progress,
    ) -> anyhow::Result<api::SourceSnapshot> {
        let rec = self.record(name)?;
        if let Some(s) = snapshot {
            crate::tree::check_snapshot_name(s)?;
            if crate::catalog::has_snapshot(&self.datasets, name, s)? {
                refuse!(
                    Conflict,
                    "source {name} already has a snapshot {s}; pick another --name"
                );
            }
        }
        if rec.linking {
            refuse!(
                Busy,
                "source {name} is still linking; wait until 'vdbfs source link' finished"
            );
        }
        if !rec.enabled {
            refuse!(
                Conflict,
                "source {name} is disabled; 'vdbfs source enable {name}' first"
            );
        }
        let st = self.slots.state(name);
        let _g = st.op.lock();
        self.catch_up(&rec, progress);
        self.validated_snapshot(&rec, snapshot)
    }

    /// Waits until staging replayed the source's current WAL position (streaming modes; at
    /// most [`CATCH_UP_WAIT`]). A source that cannot be asked is not an error: the snapshot
    /// then holds what staging has.
    fn catch_up(&self, rec: &SourceRecord, progress: Progress) {
        let (Some(conn), true) = (&rec.conn, rec.mode.streams()) else {
            return;
        };
        let target = preflight::client_install().and_then(|client| {
            preflight::replication_psql(
                &client,
                conn,
                rec.passfile(&self.store_dir).as_deref(),
                &["IDENTIFY_SYSTEM"],
            )
        });
        let target = match target {
            Ok(lines) => lines
                .first()
                .and_then(|l| l.split('|').nth(2))
                .and_then(pg::lsn::parse),
            Err(e) => {
                progress.say(format!(
                    "cannot ask source {} for its WAL position ({e:#}); the snapshot holds what staging has",
                    rec.name
                ));
                return;
            }
        };
        let Some(target) = target else { return };
        let cluster = rec.cluster(&self.store_dir);
        let start = Instant::now();
        let mut told = false;
        loop {
            let replay = health::query_replay(&cluster)
                .ok()
                .and_then(|r| r.replay_lsn)
                .unwrap_or(0);
            if replay >= target {
                return;
            }
            if start.elapsed() > CATCH_UP_WAIT {
                progress.say(format!(
                    "staging of {} is still {} bytes behind the source after {} s; the snapshot \
                     holds what it replayed",
                    rec.name,
                    target - replay,
                    CATCH_UP_WAIT.as_secs()
                ));
                return;
            }
            if !told && start.elapsed() > Duration::from_secs(1) {
                progress.say(format!(
                    "waiting for staging to replay up to the source's {}",
                    pg::lsn::format(target)
                ));
                told = true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Validated sync: replay paused, CHECKPOINT (a restartpoint), snapshot with the standby's
    /// position, replay resumed; then retention.
    pub(super) fn validated_snapshot(
        &self,
        rec: &SourceRecord,
        snapshot: Option<&str>,
    ) -> anyhow::Result<api::SourceSnapshot> {
        let cluster = rec.cluster(&self.store_dir);
        let q = |sql: &str, secs: u64| cluster.query(sql, Duration::from_secs(secs));
        if let Err(e) = q("SELECT pg_wal_replay_pause()", 30) {
            refuse!(
                Unavailable,
                "the staging standby of {} does not answer ({e:#}); 'vdbfs source status {}' says why",
                rec.name,
                rec.name
            );
        }
        let resume = Resume(&cluster);
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            let s = q("SELECT pg_get_wal_replay_pause_state()", 10)?;
            if s.first()
                .and_then(|r| r.first())
                .cloned()
                .flatten()
                .as_deref()
                == Some("paused")
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        q("CHECKPOINT", 3600)?;
        let rows = q(
            "SELECT pg_last_wal_replay_lsn(), pg_last_wal_receive_lsn(), \
             (SELECT timeline_id FROM pg_control_checkpoint()), \
             to_char(pg_last_xact_replay_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'), \
             (extract(epoch FROM pg_last_xact_replay_timestamp()) * 1000000)::bigint, \
             (SELECT redo_lsn FROM pg_control_checkpoint())",
            30,
        )?;
        let r = rows.into_iter().next().unwrap_or_default();
        let get = |i: usize| r.get(i).cloned().flatten();
        let props = SnapshotProps {
            source: rec.name.clone(),
            mode: rec.mode,
            lsn: get(0).unwrap_or_default(),
            receive_lsn: get(1),
            timeline: get(2).and_then(|t| t.parse().ok()).unwrap_or(1),
            replay_time: get(3),
            replay_time_us: get(4).and_then(|t| t.parse().ok()),
            redo_lsn: get(5),
            prepare_error: None,
            verified: None,
            named: snapshot.is_some(),
        };
        let s = self.datasets.snapshot_with_props(
            &rec.name,
            snapshot,
            Some(serde_json::to_vec(&props)?),
        )?;
        drop(resume);
        let out = api::SourceSnapshot {
            name: s.full_name(),
            lsn: props.lsn.clone(),
            timeline: props.timeline,
            replay_time: props.replay_time.clone(),
            mode: rec.mode,
            created: crate::time::rfc3339(s.rec.created.secs),
            marks: super::marks(&props, false, rec.verify),
        };
        tracing::info!(source = %rec.name, snapshot = %out.name, lsn = %out.lsn, "validated-sync snapshot");
        self.prune(rec);
        self.prune_archive(&rec.name);
        Ok(out)
    }

    /// Retention: delete the source's validated-sync snapshots beyond --keep / --keep-for
    /// (those named with `source snapshot --name` stay).
    fn prune(&self, rec: &SourceRecord) {
        if rec.keep.is_none() && rec.keep_for_secs.is_none() {
            return;
        }
        let Ok(snaps) = self.datasets.snapshots(Some(&rec.name)) else {
            return;
        };
        let list: Vec<(String, i64)> = snaps
            .iter()
            .filter(|s| super::snapshot_props(s).is_some_and(|p| !p.named))
            .map(|s| (s.rec.name.clone(), s.rec.created.secs))
            .collect();
        let keep_for = rec.keep_for_secs.map(Duration::from_secs);
        for name in super::to_prune(&list, rec.keep, keep_for, crate::time::now_unix()) {
            let full = format!("{}@{name}", rec.name);
            if self.mounts.mounted_at(&full).is_some() {
                continue;
            }
            match self.datasets.delete_snapshot(&rec.name, &name) {
                Ok(()) => tracing::info!(snapshot = %full, "retention: deleted"),
                Err(e) => tracing::error!(snapshot = %full, "retention: cannot delete: {e:#}"),
            }
            let image = super::prepared_dataset(&rec.name);
            if self.is_prepared(&rec.name, &name) {
                if let Err(e) = self.datasets.delete_snapshot(&image, &name) {
                    tracing::error!(snapshot = %full, "retention: cannot delete its prepared image: {e:#}");
                }
            }
        }
    }

    /// How many snapshots the source's dataset has, and its newest validated-sync one (with
    /// its creation time in Unix seconds).
    pub(super) fn last_snapshot(&self, name: &str) -> (usize, Option<(api::SourceSnapshot, i64)>) {
        let Ok(snaps) = self.datasets.snapshots(Some(name)) else {
            return (0, None);
        };
        let verify = self
            .records
            .get(name)
            .ok()
            .flatten()
            .is_some_and(|r| r.verify);
        let last = snaps.iter().rev().find_map(|s| {
            let p = super::snapshot_props(s)?;
            let marks = super::marks(&p, self.is_prepared(name, &s.rec.name), verify);
            Some((
                api::SourceSnapshot {
                    name: s.full_name(),
                    lsn: p.lsn,
                    timeline: p.timeline,
                    replay_time: p.replay_time,
                    mode: p.mode,
                    created: crate::time::rfc3339(s.rec.created.secs),
                    marks,
                },
                s.rec.created.secs,
            ))
        });
        (snaps.len(), last)
    }

    /// The snapshot of `name` a VDB `--verified` is made from: the newest whose verification
    /// passed.
    pub fn newest_verified(&self, name: &str) -> anyhow::Result<String> {
        let rec = self.record(name)?;
        let snaps = self.datasets.snapshots(Some(name))?;
        if let Some(s) = snaps
            .iter()
            .rev()
            .find(|s| super::snapshot_props(s).is_some_and(|p| p.verified.is_some_and(|v| v.ok)))
        {
            return Ok(s.rec.name.clone());
        }
        if rec.verify {
            refuse!(
                NotFound,
                "no snapshot of source {name} has passed verification yet ('vdbfs snapshot list \
                 {name}' shows each one's verification; it runs in the background after each \
                 snapshot)"
            );
        }
        refuse!(
            Conflict,
            "source {name} does not verify its snapshots; 'vdbfs source set {name} --verify on' \
             turns verification on"
        )
    }

    /// `vdbfs source set NAME --verify on|off`.
    pub fn set(&self, name: &str, verify: Option<bool>) -> anyhow::Result<String> {
        let st = self.slots.state(name);
        let _g = st.op.lock();
        let mut rec = self.record(name)?;
        let Some(v) = verify else {
            refuse!(Invalid, "nothing to change: give --verify on|off");
        };
        rec.verify = v;
        self.records.put(&rec)?;
        Ok(if v {
            format!(
                "source {name} verifies its snapshots now: each prepared image is checked with \
                 pg_amcheck --heapallindexed in the background (newest first)"
            )
        } else {
            format!("source {name} does not verify its snapshots any more")
        })
    }
}
