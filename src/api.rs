//! The control API shared by the CLI and the daemon: one JSON request line, then progress lines
//! and one JSON response line per connection, over the unix socket `STORE/vdbfs.sock` (mode
//! 0600). These types are the contract: their JSON is what `--json` prints, so states and kinds
//! are enums serialized as the lowercase words the CLI contract names.
//!
//! A failed request answers `{"ok": false, "kind": KIND, "message": ...}` where KIND is an
//! [`ErrorKind`]; the daemon decides the kind in one place (`daemon::dispatch`) and the CLI turns
//! it into an exit code ([`ErrorKind::exit_code`]); an HTTP server will use
//! [`ErrorKind::http_status`]. See `docs/error-handling.md`.
//!
//! Size: every request and reply type of the contract is here so that the wire format reads in
//! one place, with the tests that pin it at the end.

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
        /// `--name`: the snapshot's name (else its time); retention leaves a named one alone.
        #[serde(default)]
        snapshot: Option<String>,
    },
    SourceEnable {
        name: String,
    },
    /// `vdbfs source set NAME --verify on|off`
    SourceSet {
        name: String,
        #[serde(default)]
        verify: Option<bool>,
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
        /// One of its own snapshots or bookmarks...
        #[serde(default)]
        to: Option<String>,
        /// ...or a moment of its own history (a time).
        #[serde(default)]
        at: Option<String>,
    },
    VdbRefresh {
        name: String,
        to: Option<String>,
        /// A moment of the parent source: a time, or an LSN.
        #[serde(default)]
        at: Option<String>,
        #[serde(default)]
        at_lsn: Option<String>,
    },
    VdbDelete {
        name: String,
    },
    /// `vdbfs vdb protect NAME [--off]`: no TTL or idle TTL deletes it.
    VdbProtect {
        name: String,
        #[serde(default)]
        off: bool,
    },
    /// `vdbfs vdb extend NAME BY`: due BY from now (e.g. 8h); the idle clock starts again.
    VdbExtend {
        name: String,
        by: String,
    },
    Timeflow {
        dataset: Option<String>,
    },
    /// `vdbfs token create NAME --role ROLE [--expires 30d]`: an API token for the HTTP API,
    /// shown once (only its hash is kept).
    TokenCreate {
        name: String,
        role: Role,
        #[serde(default)]
        expires: Option<String>,
    },
    TokenList,
    TokenRevoke {
        name: String,
    },
    /// Upload `DATASET@SNAPSHOT`'s packs and manifest to the store's bucket.
    SnapshotPublish {
        name: String,
    },
    RemoteStatus,
    RemoteList,
    /// Delete this store's pack objects that no manifest or hold of any host needs (mark,
    /// wait `grace` (default 1h), recheck, delete); `dry_run`: only list the candidates.
    RemoteGc {
        #[serde(default)]
        grace: Option<String>,
        #[serde(default)]
        dry_run: bool,
    },
}

impl Request {
    /// The request's name on the wire (`"op"`), for logs.
    pub fn op(&self) -> &'static str {
        use Request as R;
        match self {
            R::Status => "status",
            R::DatasetCreate { .. } => "dataset_create",
            R::DatasetList => "dataset_list",
            R::DatasetDelete { .. } => "dataset_delete",
            R::SnapshotCreate { .. } => "snapshot_create",
            R::SnapshotList { .. } => "snapshot_list",
            R::SnapshotDelete { .. } => "snapshot_delete",
            R::Clone { .. } => "clone",
            R::Df => "df",
            R::Gc => "gc",
            R::Mount { .. } => "mount",
            R::Umount { .. } => "umount",
            R::SourceLink(_) => "source_link",
            R::SourceList => "source_list",
            R::SourceStatus { .. } => "source_status",
            R::SourceSnapshot { .. } => "source_snapshot",
            R::SourceEnable { .. } => "source_enable",
            R::SourceSet { .. } => "source_set",
            R::SourceDisable { .. } => "source_disable",
            R::SourceUnlink { .. } => "source_unlink",
            R::VdbCreate(_) => "vdb_create",
            R::VdbList => "vdb_list",
            R::VdbStatus { .. } => "vdb_status",
            R::VdbStart { .. } => "vdb_start",
            R::VdbStop { .. } => "vdb_stop",
            R::VdbSnapshot { .. } => "vdb_snapshot",
            R::VdbRewind { .. } => "vdb_rewind",
            R::VdbRefresh { .. } => "vdb_refresh",
            R::VdbDelete { .. } => "vdb_delete",
            R::VdbProtect { .. } => "vdb_protect",
            R::VdbExtend { .. } => "vdb_extend",
            R::Timeflow { .. } => "timeflow",
            R::Scrub { .. } => "scrub",
            R::DatasetAcceptDamage { .. } => "dataset_accept_damage",
            R::TokenCreate { .. } => "token_create",
            R::TokenList => "token_list",
            R::TokenRevoke { .. } => "token_revoke",
            R::SnapshotPublish { .. } => "snapshot_publish",
            R::RemoteStatus => "remote_status",
            R::RemoteList => "remote_list",
            R::RemoteGc { .. } => "remote_gc",
        }
    }

    /// What the request is about (a dataset, snapshot, source, VDB or mount point), for logs.
    pub fn target(&self) -> String {
        use Request as R;
        match self {
            R::DatasetCreate { name }
            | R::DatasetDelete { name, .. }
            | R::SnapshotDelete { name }
            | R::SourceStatus { name }
            | R::SourceSnapshot { name, .. }
            | R::SourceEnable { name }
            | R::SourceSet { name, .. }
            | R::SourceDisable { name }
            | R::SourceUnlink { name, .. }
            | R::VdbStatus { name }
            | R::VdbStart { name }
            | R::VdbStop { name }
            | R::VdbSnapshot { name, .. }
            | R::VdbRewind { name, .. }
            | R::VdbRefresh { name, .. }
            | R::VdbDelete { name }
            | R::VdbProtect { name, .. }
            | R::VdbExtend { name, .. }
            | R::DatasetAcceptDamage { name }
            | R::TokenCreate { name, .. }
            | R::TokenRevoke { name }
            | R::SnapshotPublish { name } => name.clone(),
            R::SnapshotCreate { dataset, .. } | R::Mount { dataset, .. } => dataset.clone(),
            R::SnapshotList { dataset } | R::Timeflow { dataset } => {
                dataset.clone().unwrap_or_default()
            }
            R::Clone { name, .. } => name.clone(),
            R::Umount { mountpoint } => mountpoint.display().to_string(),
            R::SourceLink(s) => s.name.clone(),
            R::VdbCreate(s) => s.name.clone(),
            R::Status
            | R::DatasetList
            | R::Df
            | R::Gc
            | R::SourceList
            | R::VdbList
            | R::TokenList
            | R::RemoteStatus
            | R::RemoteList
            | R::RemoteGc { .. }
            | R::Scrub { .. } => String::new(),
        }
    }

    /// Whether the request only reads (it is logged at debug level, not info).
    pub fn reads_only(&self) -> bool {
        use Request as R;
        matches!(
            self,
            R::Status
                | R::DatasetList
                | R::SnapshotList { .. }
                | R::Df
                | R::SourceList
                | R::SourceStatus { .. }
                | R::VdbList
                | R::VdbStatus { .. }
                | R::Timeflow { .. }
                | R::TokenList
                | R::RemoteStatus
                | R::RemoteList
        )
    }

    /// Whether a cancel (Ctrl-C) rolls the operation back: the operations that undo
    /// themselves on failure and can take long.
    pub fn cancellable(&self) -> bool {
        matches!(
            self,
            Request::SourceLink(_)
                | Request::VdbCreate(_)
                | Request::VdbRefresh { .. }
                | Request::VdbRewind { .. }
        )
    }

    /// The command that shows how the operation goes on when the CLI stops waiting for it.
    pub fn follow(&self) -> String {
        use Request as R;
        match self {
            R::SourceLink(s) => format!("vdbfs source status {}", s.name),
            R::SourceSnapshot { name, .. }
            | R::SourceEnable { name }
            | R::SourceSet { name, .. }
            | R::SourceDisable { name }
            | R::SourceUnlink { name, .. } => format!("vdbfs source status {name}"),
            R::VdbCreate(s) => format!("vdbfs vdb status {}", s.name),
            R::VdbStart { name }
            | R::VdbStop { name }
            | R::VdbSnapshot { name, .. }
            | R::VdbRewind { name, .. }
            | R::VdbRefresh { name, .. }
            | R::VdbDelete { name }
            | R::VdbProtect { name, .. }
            | R::VdbExtend { name, .. } => format!("vdbfs vdb status {name}"),
            R::SnapshotCreate { dataset, .. } => format!("vdbfs snapshot list {dataset}"),
            R::Mount { .. } | R::Umount { .. } => "vdbfs status".into(),
            R::Gc => "vdbfs df".into(),
            R::TokenCreate { .. } | R::TokenRevoke { .. } => "vdbfs token list".into(),
            _ => "the daemon's log".into(),
        }
    }
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
    #[serde(default)]
    pub settings: Vec<String>,
    pub hooks: Option<PathBuf>,
    /// A moment of the source `from` names: a time (`--at`)...
    #[serde(default)]
    pub at: Option<String>,
    /// ...or an LSN (`--at-lsn`).
    #[serde(default)]
    pub at_lsn: Option<String>,
    /// The newest snapshot of `from` that passed verification (`--verified`).
    #[serde(default)]
    pub verified: bool,
    /// Who owns it (the API token's name that created it; a developer may only touch the VDBs
    /// they own). The HTTP API sets it from the token; over the socket `--owner`.
    #[serde(default)]
    pub owner: Option<String>,
    /// `--user`: a login role for the VDB's owner over TCP...
    #[serde(default)]
    pub user: Option<String>,
    /// ...with this password (`--password-file`; else one is generated and shown once).
    #[serde(default)]
    pub password: Option<String>,
    /// Production's roles keep their passwords in the VDB (`--keep-source-logins`).
    #[serde(default)]
    pub keep_source_logins: bool,
    /// Deleted this long after creation (`--ttl 8h`).
    #[serde(default)]
    pub ttl: Option<String>,
    /// Deleted after no client was connected for this long (`--idle-ttl 2h`).
    #[serde(default)]
    pub idle_ttl: Option<String>,
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
    /// The moments `vdb rewind NAME --at` can go back to (its history since its last create
    /// or refresh).
    #[serde(default)]
    pub history: Option<Range>,
    /// The undo snapshots taken before each refresh and rewind (`NAME@auto-before-*`), oldest
    /// first; the daemon keeps the last `undo_keep` (`vdbfs serve --keep-undo`).
    #[serde(default)]
    pub undo_snapshots: Vec<String>,
    /// Stored bytes that only the undo snapshots hold (each one's unique bytes, summed): what
    /// expiring them frees. 0 in `vdb list`.
    #[serde(default)]
    pub undo_bytes: u64,
    #[serde(default)]
    pub undo_keep: u32,
    /// The API token's name that owns it (None: made over the socket without `--owner`).
    #[serde(default)]
    pub owner: Option<String>,
    /// The owner's login role over TCP (`--user`), if it has one.
    #[serde(default)]
    pub user: Option<String>,
    /// Whether production's roles keep their passwords in it (`--keep-source-logins`).
    #[serde(default)]
    pub keep_source_logins: bool,
    /// The owner's password, in `vdb create`'s reply only when vdbfs generated it (shown once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// When it will be deleted (its TTL, or its idle TTL from the last client seen); None:
    /// never (no TTL, or protected).
    #[serde(default)]
    pub expires: Option<String>,
    #[serde(default)]
    pub idle_ttl_secs: Option<u64>,
    /// `vdb protect`: no TTL applies.
    #[serde(default)]
    pub protected: bool,
}

/// An API token as `vdbfs token list` shows it (never the token itself).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenInfo {
    pub name: String,
    pub role: Role,
    pub created: String,
    /// When it stops working (RFC 3339); None: never.
    pub expires: Option<String>,
    pub expired: bool,
}

/// `vdbfs token create --json`: the token, shown this once.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenCreated {
    pub name: String,
    pub role: Role,
    pub token: String,
    pub expires: Option<String>,
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
    /// For a source's snapshots: its prepared image and its verification.
    #[serde(flatten)]
    pub marks: Marks,
    /// For sources: the moments a VDB can be provisioned at; for VDBs: the moments of their own
    /// history `vdb rewind --at` can go back to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ranges: Vec<Range>,
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
    /// The answer to a cancel request: whether the operation is being cancelled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancelling: Option<bool>,
}

/// Where a long operation reports progress (to the CLI's stderr), and how it learns that the
/// client asked to cancel it ([`Cancel`]).
#[derive(Clone, Copy)]
pub struct Progress<'a> {
    report: &'a dyn Fn(ProgressLine),
    cancel: &'a Cancel,
}

impl<'a> Progress<'a> {
    pub fn new(report: &'a dyn Fn(ProgressLine), cancel: &'a Cancel) -> Progress<'a> {
        Progress { report, cancel }
    }

    /// A step, as one line.
    pub fn say(&self, text: impl Into<String>) {
        (self.report)(ProgressLine {
            progress: text.into(),
            done_kb: None,
            total_kb: None,
            cancelling: None,
        })
    }

    /// How far a copy is; `text` is the plain line for a log or a pipe.
    pub fn copied(&self, text: String, done_kb: u64, total_kb: u64) {
        (self.report)(ProgressLine {
            progress: text,
            done_kb: Some(done_kb),
            total_kb: Some(total_kb),
            cancelling: None,
        })
    }

    /// The request's cancellation state (dispatch arms it for the operations that undo
    /// themselves).
    pub fn cancel(&self) -> &'a Cancel {
        self.cancel
    }

    /// Whether the client asked to cancel.
    pub fn cancelled(&self) -> bool {
        self.cancel.requested()
    }

    /// A cancellation point between two steps that a failure undoes: a [`Refusal`] of kind
    /// [`ErrorKind::Cancelled`] once the client asked to cancel, so the operation rolls back
    /// like after any failure.
    pub fn check(&self) -> anyhow::Result<()> {
        if self.cancel.requested() {
            return Err(Refusal::new(ErrorKind::Cancelled, CANCELLED).into());
        }
        Ok(())
    }

    /// The operation is past the point where a cancel could undo it: a cancel request from
    /// here on is answered with `why` (and that the operation finishes by itself).
    pub fn past_return(&self, why: impl Into<String>) {
        self.cancel.disarm(why);
    }

    /// Runs a long step `f` that a cancel request may cut short with `interrupt` (e.g. killing
    /// the copy it waits for); a failure of `f` after such a request is the cancellation.
    pub fn interruptible<T>(
        &self,
        interrupt: impl Fn() + Send + Sync + 'static,
        f: impl FnOnce() -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        self.check()?;
        *lock(&self.cancel.interrupt) = Some(std::sync::Arc::new(interrupt));
        let r = f();
        *lock(&self.cancel.interrupt) = None;
        match r {
            Err(_) if self.cancel.requested() => {
                Err(Refusal::new(ErrorKind::Cancelled, CANCELLED).into())
            }
            r => r,
        }
    }
}

/// The message of a cancelled operation (what rolls it back follows as context).
pub const CANCELLED: &str = "cancelled (Ctrl-C)";

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A client's request to cancel the operation it is waiting for: the line `{"cancel":true}`
/// it sends after its request on the same connection (the CLI does on SIGINT/SIGTERM). A
/// client that just hangs up cancels nothing.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CancelLine {
    pub cancel: bool,
}

type Interrupt = std::sync::Arc<dyn Fn() + Send + Sync>;

/// The cancellation state of one request. An operation that can be undone (`source link`, `vdb
/// create`, `vdb refresh`, `vdb rewind`) is armed by dispatch and polls [`Progress::check`]
/// between its steps; any other request answers a cancel with why it goes on.
#[derive(Default)]
pub struct Cancel {
    requested: std::sync::atomic::AtomicBool,
    /// Why a cancel is not honoured (None once armed).
    refused: std::sync::Mutex<Option<String>>,
    interrupt: std::sync::Mutex<Option<Interrupt>>,
}

impl Cancel {
    /// A request that cannot be cancelled (until [`Cancel::arm`]): `why` says so.
    pub fn new(why: impl Into<String>) -> Cancel {
        Cancel {
            refused: std::sync::Mutex::new(Some(why.into())),
            ..Cancel::default()
        }
    }

    /// This operation rolls back when cancelled.
    pub fn arm(&self) {
        *lock(&self.refused) = None;
    }

    /// From here on a cancel request is refused with `why` (e.g. the operation is past the
    /// point where it could be undone).
    pub fn disarm(&self, why: impl Into<String>) {
        *lock(&self.refused) = Some(why.into());
    }

    pub fn requested(&self) -> bool {
        self.requested.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The client asked to cancel; returns what to tell it (whether the operation is being
    /// cancelled, and a line for people). Runs the interrupt of a step in progress on a
    /// thread of its own (it may wait).
    pub fn request(&self) -> (bool, String) {
        if let Some(why) = lock(&self.refused).clone() {
            return (false, format!("cannot cancel: {why}"));
        }
        if self
            .requested
            .swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            return (
                true,
                "already cancelling: the operation is being rolled back".into(),
            );
        }
        if let Some(f) = lock(&self.interrupt).clone() {
            let _ = std::thread::Builder::new()
                .name("cancel".into())
                .spawn(move || f());
        }
        (
            true,
            "cancelling: the operation stops at its next step and rolls back".into(),
        )
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
    /// Whether each prepared snapshot is checked with pg_amcheck (`--verify`).
    #[serde(default)]
    pub verify: bool,
    /// The moments a VDB can be provisioned at (`vdb create --at`).
    #[serde(default)]
    pub ranges: Vec<Range>,
    /// The WAL kept in the store for this source: files and bytes (logical).
    #[serde(default)]
    pub wal_archive_files: usize,
    #[serde(default)]
    pub wal_archive_bytes: u64,
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
    #[serde(flatten)]
    pub marks: Marks,
}

/// A source snapshot's prepared image and verification (all absent for other snapshots).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Marks {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prepared: Option<PrepState>,
    /// Why preparing it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prepare_error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified: Option<VerifyState>,
    /// What pg_amcheck reported (or why the snapshot could not be verified).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub verify_failures: Vec<String>,
}

/// A stretch of WAL a VDB can be provisioned (or rewound) at any moment of: from a snapshot to
/// the last WAL received, on one timeline. Times are RFC 3339 with microseconds (UTC).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Range {
    pub timeline: u32,
    pub from_lsn: String,
    pub from_time: String,
    pub to_lsn: String,
    pub to_time: String,
    /// The snapshot the range starts at (for a VDB: its history's base).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_snapshot: Option<String>,
}

impl std::fmt::Display for Range {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "from {} (LSN {}{}) to {} (LSN {}), timeline {}",
            self.from_time,
            self.from_lsn,
            self.from_snapshot
                .as_ref()
                .map(|s| format!(", {s}"))
                .unwrap_or_default(),
            self.to_time,
            self.to_lsn,
            self.timeline
        )
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    /// What kind of failure (absent on success).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<ErrorKind>,
    #[serde(default)]
    pub message: String,
    /// What to do about a failure, when the message does not say it already.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
    #[serde(default)]
    pub data: serde_json::Value,
}

impl Response {
    pub fn ok(message: String, data: serde_json::Value) -> Response {
        Response {
            ok: true,
            kind: None,
            message,
            hint: None,
            data,
        }
    }

    pub fn failed(kind: ErrorKind, message: String) -> Response {
        Response {
            ok: false,
            kind: Some(kind),
            message,
            hint: None,
            data: serde_json::Value::Null,
        }
    }
}

/// What `--json` prints on stdout for a failed command: `{"error": {"kind", "message",
/// "hint"}}`; the exit status is the kind's ([`ErrorKind::exit_code`]), or 2 for a usage error
/// (kind `invalid`).
#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorReply {
    pub error: ErrorBody,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub kind: ErrorKind,
    pub message: String,
    pub hint: Option<String>,
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
    /// The object store, if the store has one: upload backlog and failures.
    #[serde(default)]
    pub remote: Option<crate::remote::RemoteStatus>,
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
    /// For a clone: the snapshot it was made from (`dataset@snapshot`).
    #[serde(default)]
    pub origin: Option<String>,
    /// Why the dataset is refused (damage found by recovery), if it is.
    #[serde(default)]
    pub fault: Option<String>,
}

/// `vdbfs dataset delete --json`.
#[derive(Debug, Serialize, Deserialize)]
pub struct DatasetDeleted {
    pub name: String,
    /// The snapshots deleted with it (`--with-snapshots`).
    pub snapshots: Vec<String>,
    /// VDBs made from its snapshots: they keep their data but can no longer refresh.
    pub vdbs_orphaned: Vec<String>,
}

/// `vdbfs snapshot delete --json`.
#[derive(Debug, Serialize, Deserialize)]
pub struct SnapshotDeleted {
    pub name: String,
    /// VDBs whose current data came from it: they keep their data, but cannot refresh (or be
    /// created again) from it.
    pub vdbs_from_it: Vec<String>,
}

/// `vdbfs vdb delete --json`.
#[derive(Debug, Serialize, Deserialize)]
pub struct VdbDeleted {
    pub name: String,
    /// VDBs made from its snapshots: they keep their data but can no longer refresh.
    pub children: Vec<String>,
}

/// `vdbfs source unlink --json`.
#[derive(Debug, Serialize, Deserialize)]
pub struct SourceUnlinked {
    pub name: String,
    /// Whether dataset NAME stays (without `--delete-snapshots`), as a plain dataset.
    pub dataset_kept: bool,
    /// Its snapshots: kept in the dataset, or deleted with it.
    pub snapshots: Vec<String>,
    /// The replication slot `--force` left on the source, and the SQL that drops it there.
    pub slot_left: Option<SlotLeft>,
    /// VDBs made from its snapshots that can no longer refresh (`--delete-snapshots`), or
    /// that refresh only onto the kept snapshots.
    pub vdbs: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct SlotLeft {
    pub slot: String,
    /// Run on the source to drop it.
    pub sql: String,
}

impl SlotLeft {
    pub fn new(slot: &str) -> SlotLeft {
        SlotLeft {
            slot: slot.to_string(),
            sql: format!("SELECT pg_drop_replication_slot('{slot}');"),
        }
    }
}

/// `vdbfs gc --json`.
#[derive(Debug, Serialize, Deserialize)]
pub struct GcDone {
    pub blocks_freed: u64,
    pub bytes_freed: u64,
    pub packs_rewritten: usize,
    /// Bytes returned to the filesystem (pack files rewritten or removed).
    pub bytes_reclaimed: i64,
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
    /// For a source's snapshots: its prepared image (a VDB of a ready one starts without
    /// redo) and its verification with pg_amcheck.
    #[serde(flatten)]
    pub marks: Marks,
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
    /// Check each prepared snapshot with pg_amcheck.
    #[serde(default)]
    pub verify: bool,
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
        /// The tree a VDB's history starts from (its create, refresh or rewind), kept for
        /// `vdb rewind --at`; not listed with its snapshots.
        Base = "base",
    }
}

words! {
    /// The prepared image of a source's snapshot.
    pub enum PrepState {
        /// Replayed to the snapshot's LSN, promoted and shut down cleanly: a VDB starts
        /// without redo.
        Ready = "ready",
        /// Not prepared yet (VDBs take the path with WAL replay meanwhile).
        Pending = "pending",
        Failed = "failed",
    }
}

words! {
    /// The verification (pg_amcheck --heapallindexed) of a source's snapshot.
    pub enum VerifyState {
        Ok = "ok",
        Failed = "failed",
        Pending = "pending",
        /// The source does not verify its snapshots.
        Off = "off",
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
    /// What an API token may do: an admin everything, a developer list sources, snapshots and
    /// VDBs and create, start, stop, snapshot, refresh, rewind and delete the VDBs they own.
    pub enum Role {
        Admin = "admin",
        Developer = "developer",
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
    /// What kind of failure a control request met. Every kind but `cancelled` (130) exits 1
    /// from the CLI (usage errors, found by clap before any request, exit 2); an HTTP API
    /// answers with [`ErrorKind::http_status`].
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
        /// The client cancelled the operation (Ctrl-C) and it was rolled back.
        Cancelled = "cancelled",
        /// The HTTP API got no token, an unknown, revoked or expired one.
        Unauthenticated = "unauthenticated",
        /// The token's role may not do this, or the VDB belongs to another token.
        Forbidden = "forbidden",
    }
}

impl ErrorKind {
    /// The CLI's exit status for this kind (see `docs/CLI-CONTRACT.md`): 130 (128 + SIGINT,
    /// what a shell reports for a command stopped by Ctrl-C) for a cancelled operation, 1 for
    /// every other failure.
    pub fn exit_code(self) -> i32 {
        match self {
            ErrorKind::Cancelled => 130,
            _ => 1,
        }
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
            // nginx's "client closed request": nothing standard says "cancelled by the client".
            ErrorKind::Cancelled => 499,
            ErrorKind::Unauthenticated => 401,
            ErrorKind::Forbidden => 403,
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
    /// What to do, kept apart from the message (`--json` shows it as `hint`; text output
    /// prints `MESSAGE; HINT`).
    pub hint: Option<String>,
}

impl Refusal {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Refusal {
        Refusal {
            kind,
            message: message.into(),
            hint: None,
        }
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> Refusal {
        self.hint = Some(hint.into());
        self
    }
}

/// The hint of the first [`Refusal`] in an error's chain that has one.
pub fn hint_of(e: &anyhow::Error) -> Option<String> {
    e.chain()
        .filter_map(|c| c.downcast_ref::<Refusal>())
        .find_map(|r| r.hint.clone())
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

    #[test]
    fn op_names_are_the_wire_names() {
        let spec = || VdbSpec::default();
        let name = || "x".to_string();
        let all = [
            Request::Status,
            Request::DatasetCreate { name: name() },
            Request::DatasetList,
            Request::DatasetDelete {
                name: name(),
                with_snapshots: false,
            },
            Request::SnapshotCreate {
                dataset: name(),
                name: None,
            },
            Request::SnapshotList { dataset: None },
            Request::SnapshotDelete { name: name() },
            Request::Clone {
                snapshot: name(),
                name: name(),
            },
            Request::Df,
            Request::Gc,
            Request::Mount {
                dataset: name(),
                mountpoint: "/m".into(),
                nonempty: false,
            },
            Request::Scrub { rate_mib: None },
            Request::DatasetAcceptDamage { name: name() },
            Request::Umount {
                mountpoint: "/m".into(),
            },
            Request::SourceLink(Box::default()),
            Request::SourceList,
            Request::SourceStatus { name: name() },
            Request::SourceSnapshot {
                name: name(),
                snapshot: None,
            },
            Request::SourceEnable { name: name() },
            Request::SourceSet {
                name: name(),
                verify: Some(true),
            },
            Request::SourceDisable { name: name() },
            Request::SourceUnlink {
                name: name(),
                delete_snapshots: false,
                force: false,
            },
            Request::VdbCreate(Box::new(spec())),
            Request::VdbList,
            Request::VdbStatus { name: name() },
            Request::VdbStart { name: name() },
            Request::VdbStop { name: name() },
            Request::VdbSnapshot {
                name: name(),
                snapshot: None,
                bookmark: false,
            },
            Request::VdbRewind {
                name: name(),
                to: Some(name()),
                at: None,
            },
            Request::VdbRefresh {
                name: name(),
                to: None,
                at: None,
                at_lsn: None,
            },
            Request::VdbDelete { name: name() },
            Request::VdbProtect {
                name: name(),
                off: false,
            },
            Request::VdbExtend {
                name: name(),
                by: "1h".into(),
            },
            Request::Timeflow { dataset: None },
            Request::TokenCreate {
                name: name(),
                role: Role::Developer,
                expires: None,
            },
            Request::TokenList,
            Request::TokenRevoke { name: name() },
        ];
        for r in &all {
            let wire = serde_json::to_value(r).unwrap();
            assert_eq!(wire["op"], r.op(), "{r:?}");
        }
        let cancellable: Vec<&str> = all
            .iter()
            .filter(|r| r.cancellable())
            .map(Request::op)
            .collect();
        assert_eq!(
            cancellable,
            ["source_link", "vdb_create", "vdb_rewind", "vdb_refresh"]
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
