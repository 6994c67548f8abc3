//! The control API shared by the CLI and the daemon: one JSON request line, then progress lines
//! and one JSON response line per connection, over the unix socket `STORE/vdbfs.sock` (mode
//! 0600). These types are the contract: their JSON is what `--json` prints, so states and kinds
//! are enums serialized as the lowercase words the CLI contract names.
//!
//! A failed request answers `{"ok": false, "kind": KIND, "message": ...}` where KIND is an
//! [`ErrorKind`]; the daemon decides the kind in one place (`daemon::dispatch`) and the CLI turns
//! it into an exit code ([`ErrorKind::exit_code`]); an HTTP server will use
//! [`ErrorKind::http_status`]. See `docs/error-handling.md`.

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
    /// Use a dataset that recovery found damaged as it is (its last intact fsync).
    DatasetAcceptDamage {
        name: String,
    },
    /// Read back and verify every live block; `rate_mib` MiB/s at most (0: no bound).
    Scrub {
        #[serde(default)]
        rate_mib: Option<u64>,
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
        /// Mount over a directory that is not empty (its entries are hidden meanwhile).
        #[serde(default)]
        nonempty: bool,
    },
    Umount {
        mountpoint: PathBuf,
    },
    SourceLink(Box<LinkSpec>),
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
    pub state: VdbState,
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
    pub kind: SnapshotKind,
    pub lsn: Option<String>,
    pub timeline: Option<u32>,
    pub created: String,
}

/// One node of `vdbfs timeflow`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TimeflowNode {
    pub kind: NodeKind,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lsn: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeline: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    /// For sources and VDBs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<NodeState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// For snapshots: automatic, bookmark, validated-sync ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    #[serde(default)]
    pub children: Vec<TimeflowNode>,
}

/// A line the daemon may send before its [`Response`] during a long operation. A copy in
/// progress also says how far it is (`done_kb` of `total_kb`), for a progress bar.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProgressLine {
    pub progress: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub done_kb: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_kb: Option<u64>,
}

/// Where a long operation reports progress (to the CLI's stderr).
#[derive(Clone, Copy)]
pub struct Progress<'a>(pub &'a dyn Fn(ProgressLine));

impl Progress<'_> {
    /// A step, as one line.
    pub fn say(&self, text: impl Into<String>) {
        (self.0)(ProgressLine {
            progress: text.into(),
            done_kb: None,
            total_kb: None,
        })
    }

    /// How far a copy is; `text` is the plain line for a log or a pipe.
    pub fn copied(&self, text: String, done_kb: u64, total_kb: u64) {
        (self.0)(ProgressLine {
            progress: text,
            done_kb: Some(done_kb),
            total_kb: Some(total_kb),
        })
    }
}

/// A linked source as `source list/status` show it.
#[derive(Debug, Serialize, Deserialize)]
pub struct SourceStatus {
    pub name: String,
    pub mode: Mode,
    pub state: SourceState,
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
    pub mode: Mode,
    pub created: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    /// What kind of failure (absent on success).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<ErrorKind>,
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub data: serde_json::Value,
}

impl Response {
    pub fn ok(message: String, data: serde_json::Value) -> Response {
        Response {
            ok: true,
            kind: None,
            message,
            data,
        }
    }

    pub fn failed(kind: ErrorKind, message: String) -> Response {
        Response {
            ok: false,
            kind: Some(kind),
            message,
            data: serde_json::Value::Null,
        }
    }
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
    /// What is wrong with the store now: "store full: ...", damaged datasets, bad blocks the
    /// last scrub found. Empty when all is well.
    #[serde(default)]
    pub faults: Vec<String>,
    #[serde(default)]
    pub space: Option<SpaceStatus>,
    /// The scrub running now, else the last one (None: never scrubbed).
    #[serde(default)]
    pub scrub: Option<ScrubReport>,
    /// When the scheduled scrub runs next (RFC 3339), if scheduled.
    #[serde(default)]
    pub next_scrub: Option<String>,
}

/// The filesystem under the store, and the store's reserve on it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SpaceStatus {
    pub free_bytes: u64,
    pub total_bytes: u64,
    /// The ballast file the store gives up only to its own checkpoints, gc and deletes.
    pub reserve_bytes: u64,
    pub reserve_target_bytes: u64,
    /// Writes stop this far above the reserve.
    pub margin_bytes: u64,
    /// Writes to datasets are refused (ENOSPC) now.
    pub full: bool,
}

/// A scrub: every live block read back and verified.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScrubReport {
    /// "command" (`vdbfs scrub`) or "schedule" (`serve --scrub-every`).
    pub trigger: String,
    pub started: String,
    /// None while it runs.
    pub finished: Option<String>,
    pub running: bool,
    pub blocks_total: u64,
    pub blocks_checked: u64,
    pub bytes_checked: u64,
    pub seconds: f64,
    pub bad_blocks: Vec<BadBlockReport>,
    /// Why it stopped early, if it did.
    pub error: Option<String>,
}

/// A block a scrub found bad, and who references it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BadBlockReport {
    pub block: String,
    pub pack: Option<u32>,
    pub offset: Option<u64>,
    pub error: String,
    pub references: Vec<BlockReference>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BlockReference {
    /// Datasets (`name`) and snapshots (`name@snap`) whose tree holds the block.
    pub roots: Vec<String>,
    /// "data", "block map", "directory", "inode table", "file unlinked while open".
    pub what: String,
    pub path: Option<String>,
    pub inode: Option<u64>,
    pub file_offset: Option<u64>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct DatasetInfo {
    pub name: String,
    pub id: u64,
    pub created: String,
    pub mountpoint: Option<PathBuf>,
    /// Why the dataset is refused (damage found by recovery), if it is.
    #[serde(default)]
    pub fault: Option<String>,
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
    pub mode: Option<Mode>,
    /// For a VDB's snapshots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<SnapshotKind>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct RootUsage {
    pub name: String,
    pub kind: RootKind,
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

/// The control socket of a store.
pub fn socket_path(store: &Path) -> PathBuf {
    store.join("vdbfs.sock")
}

/// What the user asked `vdbfs source link` for (the request body).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LinkSpec {
    pub name: String,
    pub conn: Option<String>,
    /// From PGPASSWORD in the CLI's environment.
    pub password: Option<String>,
    pub passfile: Option<PathBuf>,
    pub mode: Option<String>,
    pub backup: Option<PathBuf>,
    pub archive: Option<PathBuf>,
    pub staging_port: Option<u16>,
    pub slot: Option<String>,
    pub snapshot_every: Option<String>,
    pub keep: Option<u32>,
    pub keep_for: Option<String>,
    pub pg_bin: Option<PathBuf>,
}

/// How a source is ingested and kept in sync.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// vdbfs runs pg_basebackup, then the standby streams from the source.
    BackupStream,
    /// The user's base backup, then streaming.
    Stream,
    /// The user's base backup, then WAL files from an archive directory.
    LogShipping,
}

impl Mode {
    pub fn parse(s: &str) -> Result<Mode, Refusal> {
        match s {
            "backup-stream" => Ok(Mode::BackupStream),
            "stream" => Ok(Mode::Stream),
            "log-shipping" => Ok(Mode::LogShipping),
            _ => Err(Refusal::new(
                ErrorKind::Invalid,
                format!(
                    "unknown --mode {s:?}; use backup-stream (default), stream or log-shipping"
                ),
            )),
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::BackupStream => "backup-stream",
            Mode::Stream => "stream",
            Mode::LogShipping => "log-shipping",
        }
    }
    pub fn streams(self) -> bool {
        self != Mode::LogShipping
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Implements `as_str`, `Display` and the serde names for a unit-variant enum from one table,
/// so the word a state prints as and the word in its JSON cannot drift apart.
macro_rules! words {
    ($(#[$m:meta])* pub enum $name:ident { $($(#[$vm:meta])* $variant:ident = $word:literal,)* }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
        pub enum $name {
            $($(#[$vm])* #[serde(rename = $word)] $variant,)*
        }
        impl $name {
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $word,)*
                }
            }
        }
        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

pub(crate) use words;

words! {
    /// The state of a linked source.
    pub enum SourceState {
        /// `source link` has not finished.
        Linking = "linking",
        /// The staging standby was just started and has not connected yet.
        Starting = "starting",
        Syncing = "syncing",
        Fault = "fault",
        Disabled = "disabled",
    }
}

words! {
    /// The state of a VDB.
    pub enum VdbState {
        Creating = "creating",
        /// A postmaster runs that this daemon has not finished starting.
        Starting = "starting",
        Running = "running",
        Stopped = "stopped",
        Fault = "fault",
    }
}

words! {
    /// What a VDB's snapshot was taken as.
    pub enum SnapshotKind {
        Snapshot = "snapshot",
        Bookmark = "bookmark",
        /// The undo point taken before a refresh or rewind.
        Auto = "auto",
    }
}

words! {
    /// What a node of `vdbfs timeflow` is.
    pub enum NodeKind {
        Source = "source",
        Dataset = "dataset",
        Vdb = "vdb",
        Snapshot = "snapshot",
        Bookmark = "bookmark",
    }
}

words! {
    /// The state a `vdbfs timeflow` node shows: a source's, or a VDB's.
    pub enum NodeState {
        Linking = "linking",
        Enabled = "enabled",
        Disabled = "disabled",
        Creating = "creating",
        Starting = "starting",
        Running = "running",
        Stopped = "stopped",
        Fault = "fault",
    }
}

impl From<VdbState> for NodeState {
    fn from(s: VdbState) -> NodeState {
        match s {
            VdbState::Creating => NodeState::Creating,
            VdbState::Starting => NodeState::Starting,
            VdbState::Running => NodeState::Running,
            VdbState::Stopped => NodeState::Stopped,
            VdbState::Fault => NodeState::Fault,
        }
    }
}

words! {
    /// What a row of `vdbfs df` is.
    pub enum RootKind {
        Dataset = "dataset",
        Snapshot = "snapshot",
    }
}

words! {
    /// What kind of failure a control request met. Every kind exits 1 from the CLI today (usage
    /// errors, found by clap before any request, exit 2); an HTTP API answers with
    /// [`ErrorKind::http_status`].
    pub enum ErrorKind {
        /// No such dataset, snapshot, source, VDB or mount.
        NotFound = "not_found",
        /// The name is taken, or the thing is in a state that forbids the operation (mounted,
        /// has snapshots, linked, already mounted elsewhere).
        Conflict = "conflict",
        /// The request itself is wrong: a bad name, option, setting or path.
        Invalid = "invalid",
        /// Something is in use right now (files open on a mount, another operation running,
        /// a port taken); the same request may succeed later.
        Busy = "busy",
        /// Something vdbfs needs is not there or does not answer: the daemon, the source,
        /// a PostgreSQL installation, disk space.
        Unavailable = "unavailable",
        /// Anything else: a bug, corruption, or a failure vdbfs did not classify.
        Internal = "internal",
    }
}

impl ErrorKind {
    /// The CLI's exit status for this kind (see `docs/CLI-CONTRACT.md`).
    pub fn exit_code(self) -> i32 {
        1
    }

    /// The status code an HTTP control API answers with.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorKind::NotFound => 404,
            ErrorKind::Conflict => 409,
            ErrorKind::Invalid => 400,
            ErrorKind::Busy => 423,
            ErrorKind::Unavailable => 503,
            ErrorKind::Internal => 500,
        }
    }
}

/// An error whose kind the code that raised it knows. Its text is exactly the message (so
/// adding a kind never changes what a user reads); contexts added on the way up keep it
/// findable (`anyhow::Error::chain`).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct Refusal {
    pub kind: ErrorKind,
    pub message: String,
}

impl Refusal {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Refusal {
        Refusal {
            kind,
            message: message.into(),
        }
    }
}

/// `return Err(Refusal)`, like `anyhow::bail!` with a kind: `refuse!(Conflict, "...", args)`.
#[macro_export]
macro_rules! refuse {
    ($kind:ident, $($arg:tt)*) => {
        return Err($crate::api::Refusal::new($crate::api::ErrorKind::$kind, format!($($arg)*)).into())
    };
}

/// A [`Refusal`] as an `anyhow::Error`, for `ok_or_else` and `map_err`.
pub fn refusal(kind: ErrorKind, message: impl Into<String>) -> anyhow::Error {
    Refusal::new(kind, message).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_and_kinds_serialize_as_the_contract_words() {
        let json = |v: &dyn erased::Ser| v.json();
        assert_eq!(json(&SourceState::Syncing), "\"syncing\"");
        assert_eq!(json(&VdbState::Creating), "\"creating\"");
        assert_eq!(json(&SnapshotKind::Auto), "\"auto\"");
        assert_eq!(json(&NodeKind::Vdb), "\"vdb\"");
        assert_eq!(json(&NodeState::Enabled), "\"enabled\"");
        assert_eq!(json(&RootKind::Snapshot), "\"snapshot\"");
        assert_eq!(json(&Mode::LogShipping), "\"log-shipping\"");
        assert_eq!(json(&ErrorKind::NotFound), "\"not_found\"");
        assert_eq!(VdbState::Stopped.to_string(), "stopped");
        let ok = Response::ok("m".into(), serde_json::Value::Null);
        assert_eq!(
            serde_json::to_string(&ok).ok().as_deref(),
            Some(r#"{"ok":true,"message":"m","data":null}"#),
            "a success carries no kind"
        );
    }

    mod erased {
        pub trait Ser {
            fn json(&self) -> String;
        }
        impl<T: serde::Serialize> Ser for T {
            fn json(&self) -> String {
                serde_json::to_string(self).unwrap_or_default()
            }
        }
    }
}
