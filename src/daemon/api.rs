//! The control API between the CLI and the daemon: one JSON request line, one JSON response line
//! per connection, over the unix socket `STORE/vdbfs.sock` (mode 0600).

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Status,
    DatasetCreate {
        name: String,
    },
    DatasetList,
    DatasetDelete {
        name: String,
        #[serde(default)]
        with_snapshots: bool,
    },
    SnapshotCreate {
        dataset: String,
        name: Option<String>,
    },
    SnapshotList {
        dataset: Option<String>,
    },
    SnapshotDelete {
        name: String,
    },
    Clone {
        snapshot: String,
        name: String,
    },
    Df,
    Gc,
    Mount {
        dataset: String,
        mountpoint: PathBuf,
    },
    Umount {
        mountpoint: PathBuf,
    },
    SourceLink(Box<crate::source::LinkSpec>),
    SourceList,
    SourceStatus {
        name: String,
    },
    SourceSnapshot {
        name: String,
    },
    SourceEnable {
        name: String,
    },
    SourceDisable {
        name: String,
    },
    SourceUnlink {
        name: String,
        #[serde(default)]
        delete_snapshots: bool,
        #[serde(default)]
        force: bool,
    },
    VdbCreate(Box<VdbSpec>),
    VdbList,
    VdbStatus {
        name: String,
    },
    VdbStart {
        name: String,
    },
    VdbStop {
        name: String,
    },
    VdbSnapshot {
        name: String,
        snapshot: Option<String>,
        #[serde(default)]
        bookmark: bool,
    },
    VdbRewind {
        name: String,
        to: String,
    },
    VdbRefresh {
        name: String,
        to: Option<String>,
    },
    VdbDelete {
        name: String,
    },
    Timeflow {
        dataset: Option<String>,
    },
}

/// What the user asked `vdbfs vdb create` for.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct VdbSpec {
    pub name: String,
    /// DATASET or DATASET@SNAPSHOT
    pub from: String,
    pub port: Option<u16>,
    pub mount: Option<PathBuf>,
    /// KEY=VALUE
    pub settings: Vec<String>,
    pub hooks: Option<PathBuf>,
}

/// A VDB as `vdb list/status` show it.
#[derive(Debug, Serialize, Deserialize)]
pub struct VdbStatus {
    pub name: String,
    /// creating | starting | running | stopped | fault
    pub state: String,
    pub port: u16,
    pub data_dir: PathBuf,
    pub socket_dir: PathBuf,
    pub pid: Option<i32>,
    pub parent: String,
    pub parent_dataset: String,
    pub conn: String,
    pub tcp_conn: String,
    pub settings: std::collections::BTreeMap<String, String>,
    pub hooks: Option<PathBuf>,
    pub log: PathBuf,
    pub postgres_log: PathBuf,
    pub logical_bytes: u64,
    pub unique_bytes: u64,
    pub snapshots: Vec<String>,
    pub bookmarks: Vec<String>,
    pub created: String,
    pub fault: Option<String>,
    pub events: Vec<(String, String)>,
}

/// A snapshot or bookmark of a VDB.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VdbSnapshot {
    /// `vdb@snapshot`
    pub name: String,
    pub kind: String,
    pub lsn: Option<String>,
    pub timeline: Option<u32>,
    pub created: String,
}

/// One node of `vdbfs timeflow`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TimeflowNode {
    /// source | dataset | vdb | snapshot | bookmark
    pub kind: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lsn: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeline: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    /// For sources and VDBs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// For snapshots: automatic, bookmark, validated-sync ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    #[serde(default)]
    pub children: Vec<TimeflowNode>,
}

/// A line the daemon may send before its [`Response`] during a long operation.
#[derive(Debug, Serialize, Deserialize)]
pub struct ProgressLine {
    pub progress: String,
}

/// A linked source as `source list/status` show it.
#[derive(Debug, Serialize, Deserialize)]
pub struct SourceStatus {
    pub name: String,
    pub mode: String,
    /// linking | starting | syncing | fault | disabled
    pub state: String,
    pub fault: Option<String>,
    pub data_dir: PathBuf,
    pub staging_port: u16,
    pub staging_pid: Option<i32>,
    pub slot: Option<String>,
    /// user@host:port/dbname (never a password)
    pub conn: Option<String>,
    pub archive: Option<PathBuf>,
    pub receive_lsn: Option<String>,
    pub replay_lsn: Option<String>,
    pub source_lsn: Option<String>,
    pub lag_bytes: Option<u64>,
    pub lag_seconds: Option<f64>,
    pub last_replay_time: Option<String>,
    pub restarts: u32,
    pub snapshots: usize,
    pub last_snapshot: Option<SourceSnapshot>,
    pub snapshot_every_secs: Option<u64>,
    pub keep: Option<u32>,
    pub keep_for_secs: Option<u64>,
}

/// A validated-sync snapshot of a source.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SourceSnapshot {
    /// `source@snapshot`
    pub name: String,
    pub lsn: String,
    pub timeline: u32,
    pub replay_time: Option<String>,
    pub mode: String,
    pub created: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub data: serde_json::Value,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct MountInfo {
    pub dataset: String,
    pub mountpoint: PathBuf,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Status {
    pub pid: u32,
    pub store: PathBuf,
    pub mounts: Vec<MountInfo>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct DatasetInfo {
    pub name: String,
    pub id: u64,
    pub created: String,
    pub mountpoint: Option<PathBuf>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct SnapshotInfo {
    /// `dataset@snapshot`, usable as is in every command.
    pub name: String,
    pub dataset: String,
    pub snapshot: String,
    pub created: String,
    pub created_unix_ms: i64,
    /// For a source's validated-sync snapshots: the standby's replay position, timeline, time
    /// of the last replayed transaction, and the ingestion mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lsn: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeline: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replay_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// For a VDB's snapshots: snapshot | bookmark | auto.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct RootUsage {
    pub name: String,
    pub kind: String,
    pub logical_bytes: u64,
    pub unique_bytes: u64,
    pub shared_bytes: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Df {
    pub datasets: Vec<RootUsage>,
    pub physical_bytes: u64,
    pub live_stored_bytes: u64,
    pub compression_ratio: f64,
    pub dedup_ratio: f64,
}

impl From<crate::tree::StoreUsage> for Df {
    fn from(u: crate::tree::StoreUsage) -> Df {
        let ratio = |a: u64, b: u64| if b == 0 { 1.0 } else { a as f64 / b as f64 };
        Df {
            datasets: u
                .roots
                .into_iter()
                .map(|r| RootUsage {
                    name: r.name,
                    kind: if r.is_snapshot { "snapshot" } else { "dataset" }.into(),
                    logical_bytes: r.logical_bytes,
                    unique_bytes: r.unique_bytes,
                    shared_bytes: r.shared_bytes,
                })
                .collect(),
            physical_bytes: u.physical_bytes,
            live_stored_bytes: u.live_stored_bytes,
            compression_ratio: ratio(u.live_raw_bytes, u.live_stored_bytes),
            dedup_ratio: ratio(u.referenced_raw_bytes, u.live_raw_bytes),
        }
    }
}

pub fn socket_path(store: &Path) -> PathBuf {
    store.join("vdbfs.sock")
}

/// Seconds since the Unix epoch, now.
pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// RFC 3339 UTC time from Unix seconds (no time-zone database needed).
pub fn rfc3339(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}
