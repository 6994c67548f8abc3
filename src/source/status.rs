//! `source status` / `source list`: what a source's record, its staging postgres and the
//! standby's own report say, with a fault stated whenever something is wrong.

use super::health;
use super::service::SourceService;
use crate::api::{SourceState, SourceStatus};
use std::time::Duration;

/// A freshly started standby is not reported as broken for this long.
const STREAM_GRACE: Duration = Duration::from_secs(20);

impl SourceService {
    /// A source's status; faults of the store (its staging dataset damaged, the store full)
    /// come first: while they last, staging cannot work.
    pub fn status(&self, name: &str) -> anyhow::Result<SourceStatus> {
        let mut s = self.staging_status(name)?;
        if s.state == SourceState::Linking {
            return Ok(s);
        }
        let store_fault = self
            .datasets
            .damage_fault(name)
            .or_else(|| self.datasets.store().full_fault());
        if let Some(f) = store_fault {
            s.fault = Some(match s.fault.take() {
                Some(other) => format!("{f}; also: {other}"),
                None => f,
            });
            s.state = SourceState::Fault;
        }
        Ok(s)
    }

    fn staging_status(&self, name: &str) -> anyhow::Result<SourceStatus> {
        let rec = self.record(name)?;
        let st = self.slots.state(name);
        let (pid, started, restarts, last_error) = {
            let rt = st.rt.lock();
            (
                rt.pid.filter(|p| crate::pg::pid_alive(*p)),
                rt.started,
                rt.restarts,
                rt.last_error.clone(),
            )
        };
        let (count, last) = self.last_snapshot(name);
        let mut s = SourceStatus {
            name: rec.name.clone(),
            mode: rec.mode,
            state: SourceState::Starting,
            fault: None,
            data_dir: rec.data_dir.clone(),
            staging_port: rec.staging_port,
            staging_pid: pid,
            slot: rec.slot.clone(),
            conn: rec.conn.as_ref().map(|c| c.redacted()),
            archive: rec.archive.clone(),
            receive_lsn: None,
            replay_lsn: None,
            source_lsn: None,
            lag_bytes: None,
            lag_seconds: None,
            last_replay_time: None,
            restarts,
            snapshots: count,
            last_snapshot: last.map(|(s, _)| s),
            snapshot_every_secs: rec.snapshot_every_secs,
            keep: rec.keep,
            keep_for_secs: rec.keep_for_secs,
            verify: rec.verify,
            ranges: Vec::new(),
            wal_archive_files: 0,
            wal_archive_bytes: 0,
        };
        (s.wal_archive_files, s.wal_archive_bytes) = self.archive_size(name);
        if !rec.linking {
            s.ranges = self.ranges(name).unwrap_or_default();
        }
        if rec.linking {
            s.state = SourceState::Linking;
            return Ok(s);
        }

        if !rec.enabled {
            s.state = SourceState::Disabled;
            return Ok(s);
        }
        let young = started.is_some_and(|t| t.elapsed() < STREAM_GRACE);
        if pid.is_none() {
            s.state = if restarts == 0 && last_error.is_none() {
                SourceState::Starting
            } else {
                SourceState::Fault
            };
            s.fault = Some(format!(
                "the staging postgres is not running{}",
                last_error.map(|e| format!(": {e}")).unwrap_or_default()
            ));
            return Ok(s);
        }
        match health::query_replay(&rec.cluster(&self.store_dir)) {
            Ok(r) => {
                let sync = health::assess(&rec, &self.store_dir, &r, young);
                // After a restart postgres counts "received" from where the walreceiver began, which
                // can be below what was already replayed; what was replayed was received.
                s.receive_lsn =
                    health::fmt(r.receive_lsn.map(|x| x.max(r.replay_lsn.unwrap_or(0))));
                s.replay_lsn = health::fmt(r.replay_lsn);
                s.last_replay_time = r.replay_time;
                s.source_lsn = health::fmt(sync.source_lsn);
                s.lag_bytes = sync.lag_bytes;
                s.lag_seconds = sync.lag_seconds;
                s.state = match (&sync.fault, young) {
                    (Some(_), _) => SourceState::Fault,
                    (None, true) if r.receiver.is_none() && rec.mode.streams() => {
                        SourceState::Starting
                    }
                    _ => SourceState::Syncing,
                };
                s.fault = sync.fault;
            }
            Err(e) => {
                s.state = if young {
                    SourceState::Starting
                } else {
                    SourceState::Fault
                };
                s.fault = Some(format!("the staging postgres does not answer: {e:#}"));
            }
        }
        Ok(s)
    }

    pub fn list(&self) -> anyhow::Result<Vec<SourceStatus>> {
        self.records()?
            .iter()
            .map(|r| self.status(&r.name))
            .collect()
    }
}
