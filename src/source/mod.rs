//! dSources: a source PostgreSQL copied once into a *staging* dataset and kept in sync by a
//! staging standby (streaming replication or WAL log shipping), frozen by validated-sync
//! snapshots. [`SourceService`] owns the workflows (link, sync supervision, snapshot,
//! disable/enable, unlink) and works through narrow handles: the dataset catalog, the mount
//! table and its own record table. Below it: the record ([`SourceRecord`]), `preflight`, the
//! first copy (`ingest`), the staging configuration, the standby's `health`, and retention.
//!
//! Module map: `service` (the service, staging lifecycle, enable/disable/unlink, supervision),
//! `link` (link and its rollback), `snapshot` (validated sync, catch-up, retention), `status`,
//! `prepare` (each snapshot's prepared image and its verification, in the background), `flow`
//! (the WAL kept in the store: the archiver's work, the provisionable ranges, the WAL a
//! moment needs).
//!
//! Invariants:
//! - A source's staging dataset and its snapshots carry the source's name (`prod@SNAP`).
//! - Nothing of a source exists before its preflight passed; a failed link removes everything it
//!   made (dataset, slot, files) before answering.
//! - The password is only in `STORE/sources/NAME/pgpass` (mode 0600, owner postgres); records,
//!   logs, `postgresql.auto.conf` and command lines carry `passfile=` instead.
//! - The staging postgres is a hot standby that never sends feedback to the source and keeps its
//!   vdbfs settings in `postgresql.auto.conf`; it archives (`archive_mode=always`) only into the
//!   store's WAL archive (`crate::archive`), never into the source's archive.
//! - A snapshot's prepared image is snapshot `SNAP` of the internal dataset `.prep.NAME`, made
//!   only by the preparer; it exists exactly when it is complete (replayed to the snapshot's LSN,
//!   promoted, shut down cleanly). The WAL archive keeps what the oldest retained snapshot needs.

mod flow;
pub mod health;
pub mod ingest;
mod link;
pub mod preflight;
mod prepare;
mod service;
mod snapshot;
mod status;

pub use flow::MomentPlan;
pub use prepare::prepared_dataset;

pub use crate::api::{LinkSpec, Mode};
pub use service::SourceService;

use crate::pg::conninfo::Conn;
use crate::pg::managed::Managed;
use crate::pg::{Cluster, Install, RunFiles};
use crate::store::records::{Record, RecordTable};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A linked source, as persisted in the index (`sources` table, JSON).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SourceRecord {
    pub v: u32,
    pub name: String,
    pub mode: Mode,
    pub conn: Option<Conn>,
    /// Whether `pgpass` holds a password for `conn`.
    pub has_passfile: bool,
    pub slot: Option<String>,
    pub archive: Option<PathBuf>,
    pub staging_port: u16,
    pub install: Install,
    /// The staging data directory: the mount point of the staging dataset.
    pub data_dir: PathBuf,
    pub snapshot_every_secs: Option<u64>,
    pub keep: Option<u32>,
    pub keep_for_secs: Option<u64>,
    /// false after `source disable`.
    pub enabled: bool,
    /// true until the link finished; a record still linking at daemon start is rolled back.
    pub linking: bool,
    pub system_identifier: Option<String>,
    pub created: String,
    /// Check each prepared snapshot with pg_amcheck (`--verify`).
    #[serde(default)]
    pub verify: bool,
}

impl Record for SourceRecord {
    const TABLE: RecordTable = RecordTable::Sources;
    const WHAT: &'static str = "source";
    fn key(&self) -> &str {
        &self.name
    }
}

/// Properties recorded with each validated-sync snapshot (`snapshot_props`, JSON).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SnapshotProps {
    pub source: String,
    pub mode: Mode,
    /// Replay position of the standby, paused while the snapshot was taken.
    pub lsn: String,
    /// Last WAL position received (streaming) when the snapshot was taken.
    pub receive_lsn: Option<String>,
    pub timeline: u32,
    /// Commit time of the last transaction replayed.
    pub replay_time: Option<String>,
    /// The same in Unix microseconds (exact, for provisioning at a moment).
    #[serde(default)]
    pub replay_time_us: Option<i64>,
    /// Where a clone's recovery starts (the restartpoint's redo LSN).
    #[serde(default)]
    pub redo_lsn: Option<String>,
    /// Why preparing its image failed (set by the preparer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prepare_error: Option<String>,
    /// Its verification, once done (set by the preparer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified: Option<Verified>,
    /// Named by the user (`source snapshot --name`): retention leaves it alone.
    #[serde(default)]
    pub named: bool,
}

/// What pg_amcheck said of a snapshot's prepared image.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Verified {
    pub ok: bool,
    /// What it reported (at most 20 lines).
    pub failures: Vec<String>,
    pub at: String,
}

impl SnapshotProps {
    /// An upper bound of the commit times of what the snapshot holds, in Unix microseconds:
    /// the last replayed commit (rounded up when only milliseconds were kept), else the
    /// snapshot's creation (no commit was replayed since the standby started).
    pub fn time_us(&self, created_us: i64) -> i64 {
        self.replay_time_us
            .or_else(|| {
                let t: jiff::Timestamp = self.replay_time.as_deref()?.parse().ok()?;
                Some(t.as_microsecond() + 999)
            })
            .unwrap_or(created_us)
    }
}

/// The marks `snapshot list`, `timeflow` and `source status` show for a source's snapshot:
/// whether it has a prepared image, and its verification (with pg_amcheck's report, or why it
/// could not be prepared when the source verifies).
pub fn marks(props: &SnapshotProps, prepared: bool, verify_on: bool) -> crate::api::Marks {
    use crate::api::{PrepState, VerifyState};
    let prep = if prepared {
        PrepState::Ready
    } else if props.prepare_error.is_some() {
        PrepState::Failed
    } else {
        PrepState::Pending
    };
    let (verified, verify_failures) = match (&props.verified, verify_on) {
        (Some(v), _) if v.ok => (VerifyState::Ok, Vec::new()),
        (Some(v), _) => (VerifyState::Failed, v.failures.clone()),
        (None, true) if prep == PrepState::Failed => (
            VerifyState::Failed,
            vec![format!(
                "preparation failed: {}",
                props.prepare_error.clone().unwrap_or_default()
            )],
        ),
        (None, true) => (VerifyState::Pending, Vec::new()),
        (None, false) => (VerifyState::Off, Vec::new()),
    };
    crate::api::Marks {
        prepared: Some(prep),
        prepare_error: props.prepare_error.clone().filter(|_| !prepared),
        verified: Some(verified),
        verify_failures,
    }
}

/// Files of a source outside its data directory: `STORE/sources/NAME/`.
pub struct SourceDir(pub PathBuf);

impl SourceDir {
    pub fn new(store: &Path, name: &str) -> SourceDir {
        SourceDir(store.join("sources").join(name))
    }
    pub fn passfile(&self) -> PathBuf {
        self.0.join("pgpass")
    }
    /// Where the daemon acknowledges the WAL files it archived (see `crate::archive`).
    pub fn wal_acks(&self) -> PathBuf {
        self.0.join("wal-acks")
    }
}

impl RunFiles for SourceDir {
    fn root(&self) -> &Path {
        &self.0
    }
}

impl SourceRecord {
    pub fn dir(&self, store: &Path) -> SourceDir {
        SourceDir::new(store, &self.name)
    }

    pub fn cluster(&self, store: &Path) -> Cluster {
        self.dir(store)
            .cluster(&self.install, &self.data_dir, self.staging_port)
    }

    /// The staging postgres, as the daemon runs it.
    pub fn staging(&self, store: &Path) -> Managed {
        Managed {
            cluster: self.cluster(store),
            pid_file: self.dir(store).0.join("staging.pid"),
            name: self.name.clone(),
        }
    }

    /// The passfile to hand libpq, when there is a password.
    pub fn passfile(&self, store: &Path) -> Option<PathBuf> {
        self.has_passfile.then(|| self.dir(store).passfile())
    }
}

/// The validated-sync snapshot properties of a snapshot, if it is a source's.
pub fn snapshot_props(s: &crate::tree::SnapshotInfo) -> Option<SnapshotProps> {
    serde_json::from_slice(s.props.as_ref()?).ok()
}

/// A physical replication slot name from a source name: `vdbfs_` + [a-z0-9_].
pub fn default_slot(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_alphanumeric() {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("vdbfs_{s}").chars().take(63).collect()
}

pub fn check_slot_name(s: &str) -> anyhow::Result<()> {
    if s.is_empty()
        || s.len() > 63
        || !s
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        crate::refuse!(
            Invalid,
            "--slot {s:?} is not a valid replication slot name: use 1 to 63 of a-z, 0-9 and _"
        );
    }
    Ok(())
}

/// Which snapshots retention removes: `snaps` are (name, created unix secs) of the source's
/// validated-sync snapshots, oldest first. The newest is always kept.
pub fn to_prune(
    snaps: &[(String, i64)],
    keep: Option<u32>,
    keep_for: Option<Duration>,
    now: i64,
) -> Vec<String> {
    let n = snaps.len();
    snaps
        .iter()
        .enumerate()
        .filter(|(i, (_, created))| {
            let newest = *i + 1 == n;
            let over_count = keep.is_some_and(|k| n - i > k.max(1) as usize);
            let too_old = keep_for.is_some_and(|d| now - created > d.as_secs() as i64);
            !newest && (over_count || too_old)
        })
        .map(|(_, (name, _))| name.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_slots_and_retention() {
        use crate::time::parse_interval as parse_duration;
        assert_eq!(parse_duration("15m", "x").unwrap().as_secs(), 900);
        assert_eq!(parse_duration("7d", "x").unwrap().as_secs(), 604_800);
        assert!(parse_duration("15x", "x").is_err());
        assert!(parse_duration("0s", "x").is_err());
        assert_eq!(default_slot("Prod-1.eu"), "vdbfs_prod_1_eu");
        assert!(check_slot_name("vdbfs_prod").is_ok());
        assert!(check_slot_name("Bad-Slot").is_err());

        let snaps: Vec<(String, i64)> = (0..5).map(|i| (format!("s{i}"), i * 100)).collect();
        assert_eq!(to_prune(&snaps, Some(2), None, 500), vec!["s0", "s1", "s2"]);
        assert_eq!(
            to_prune(&snaps, None, Some(Duration::from_secs(250)), 500),
            vec!["s0", "s1", "s2"]
        );
        assert!(to_prune(&snaps, None, None, 500).is_empty());
        // The newest survives even when everything is too old.
        assert_eq!(
            to_prune(&snaps, None, Some(Duration::from_secs(1)), 10_000).len(),
            4
        );
    }
}
