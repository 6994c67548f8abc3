//! Virtual databases (VDBs). [`VdbService`] owns the workflows (create, start, stop, snapshot
//! and bookmark, refresh, rewind, delete, status, supervision) and works through narrow
//! handles: the dataset catalog, the mount table, its record table, and the source service (a
//! refresh snapshots a linked parent). Below it: the record ([`VdbRecord`]), the provisioning
//! configuration (`configure`), the hooks, the `--set` and port checks.
//!
//! Module map: `service` (the service, postgres lifecycle with hooks, start/stop/snapshot/
//! delete, recovery and supervision), `create`, `switch` (refresh, rewind, undo), `status`,
//! `configure`, `hooks`.
//!
//! A VDB named N is the dataset N (a clone of a snapshot of its parent: a source's staging
//! dataset or another VDB), mounted at its data directory, with a postgres the daemon runs as the
//! postgres OS user. Its snapshots and bookmarks are snapshots of dataset N; refresh and rewind
//! point dataset N at another tree and keep its id, name, snapshots, port, mount point, settings
//! and hooks, so users' connection strings keep working.
//!
//! Where a new tree comes from (`provision`): a source snapshot's prepared image (a clean start,
//! no redo), the snapshot itself (WAL replayed to its LSN), or a moment of a source (a snapshot
//! plus WAL from the store's archive, replayed to the moment). A VDB's own WAL goes into the
//! archive too (generation = its history's base), so `rewind --at` can replay its history.
//!
//! Invariants: every setting vdbfs manages is written to `postgresql.auto.conf` on each
//! provision, refresh and rewind (the user's `--set` values last, so they win); a VDB record with
//! `pending` set is an operation cut short, undone by the next daemon (create: removed; refresh
//! and rewind: back to the automatic snapshot taken before); a VDB's tree and the archive
//! generation its record names change together under `VdbService::archive_lock`, so the
//! archiver never files one history's WAL under another.

pub mod configure;
mod create;
mod history;
pub mod hooks;
pub mod lifetime;
pub mod logins;
mod provision;
mod service;
mod status;
mod switch;

pub use crate::pg::provision::{Target, PROVISION_SIGNAL};
pub use configure::configure;
pub use service::{VdbService, DEFAULT_UNDO_KEEP};

use crate::api::{refusal, ErrorKind, SnapshotKind};
use crate::pg::managed::Managed;
use crate::pg::{self, Cluster, Install, RunFiles};
use crate::refuse;
use crate::store::records::{Record, RecordTable};
use std::path::{Path, PathBuf};

/// Default port pool of VDBs when `--port` is not given.
pub const DEFAULT_PORTS: (u16, u16) = (6000, 6999);

/// An operation cut short leaves this in the record; the next daemon undoes it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Pending {
    pub op: VdbOp,
    /// The VDB's own snapshot to go back to (refresh, rewind).
    pub rollback: Option<String>,
    /// The parent before the operation.
    pub parent: String,
    pub was_running: bool,
    /// The history before the operation (its last timeline closed), restored by an undo.
    #[serde(default)]
    pub history: Option<History>,
}

/// A VDB's history since its last create or refresh (for `vdb rewind --at`): the tree it
/// started from, kept as its own snapshot (kind `base`), and the timelines it lived on. Its WAL
/// is in the archive under `vdbs/NAME/GENERATION`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct History {
    /// The VDB's snapshot holding the tree its history starts from; also the archive
    /// generation.
    pub base: String,
    /// Where replay from the base starts (its redo LSN), for progress.
    pub from_lsn: Option<u64>,
    /// The timelines, oldest first.
    pub epochs: Vec<Epoch>,
}

/// A timeline a VDB lived on, from a moment on, until it left it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Epoch {
    pub timeline: u32,
    /// Unix microseconds.
    pub from_us: i64,
    /// When the VDB left the timeline (a refresh, rewind or undo), Unix microseconds...
    #[serde(default)]
    pub until_us: Option<i64>,
    /// ...and, when its postgres had shut down cleanly then, where its WAL ends: the shutdown
    /// checkpoint (every change before it).
    pub until_lsn: Option<u64>,
}

crate::api::words! {
    /// An operation that changes a VDB's data (recorded while it runs, see [`Pending`]).
    pub enum VdbOp {
        Create = "create",
        Refresh = "refresh",
        Rewind = "rewind",
    }
}

/// A VDB, as persisted in the index (`vdbs` table, JSON).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct VdbRecord {
    pub v: u32,
    pub name: String,
    /// The snapshot its current tree came from (`dataset@snapshot`).
    pub parent: String,
    pub port: u16,
    /// The mount point of dataset `name`.
    pub data_dir: PathBuf,
    /// `--set` overrides, in the order given.
    pub settings: Vec<(String, String)>,
    /// Its own hooks directory (else the store's `hooks/`).
    pub hooks: Option<PathBuf>,
    pub install: Install,
    /// Whether its postgres should run (the daemon starts it again after a restart).
    pub running: bool,
    pub pending: Option<Pending>,
    pub created: String,
    /// What happened to it: (time, event), oldest first.
    #[serde(default)]
    pub events: Vec<(String, String)>,
    /// Its history for `rewind --at` (none for a VDB made before vdbfs kept one).
    #[serde(default)]
    pub history: Option<History>,
    /// The API token's name that owns it (a developer token touches only its own VDBs).
    #[serde(default)]
    pub owner: Option<String>,
    /// Who logs in over TCP (None for VDBs made before vdbfs managed it: as they were).
    #[serde(default)]
    pub logins: Option<logins::Logins>,
    /// Its TTL, idle TTL and protection.
    #[serde(default)]
    pub lifetime: lifetime::Lifetime,
}

/// Properties recorded with a VDB's snapshot (`snapshot_props`, JSON).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct VdbSnapshotProps {
    pub vdb: String,
    pub kind: SnapshotKind,
    /// `pg_current_wal_lsn()` after a CHECKPOINT, when the VDB was running.
    pub lsn: Option<String>,
    pub timeline: Option<u32>,
}

/// Files of a VDB outside its data directory: `STORE/vdbs/NAME/`.
pub struct VdbDir(pub PathBuf);

impl VdbDir {
    pub fn new(store: &Path, name: &str) -> VdbDir {
        VdbDir(store.join("vdbs").join(name))
    }
    /// vdbfs's log of the VDB: operations and hook output.
    pub fn log(&self) -> PathBuf {
        self.0.join("vdb.log")
    }
    /// The postmaster PID, outside the data directory (readable when the mount is gone).
    pub fn pid_file(&self) -> PathBuf {
        self.0.join("postmaster.pid")
    }
    /// Where the daemon acknowledges the WAL files it archived (see `crate::archive`).
    pub fn wal_acks(&self) -> PathBuf {
        self.0.join("wal-acks")
    }

    /// Appends a line to the VDB log.
    pub fn log_line(&self, text: &str) {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log())
        {
            let now = crate::time::rfc3339_now();
            for l in text.lines() {
                let _ = writeln!(f, "{now} {l}");
            }
        }
    }
}

impl RunFiles for VdbDir {
    fn root(&self) -> &Path {
        &self.0
    }
}

impl VdbRecord {
    pub fn dir(&self, store: &Path) -> VdbDir {
        VdbDir::new(store, &self.name)
    }

    pub fn cluster(&self, store: &Path) -> Cluster {
        self.dir(store)
            .cluster(&self.install, &self.data_dir, self.port)
    }

    /// The VDB's postgres, as the daemon runs it.
    pub fn postgres(&self, store: &Path) -> Managed {
        Managed {
            cluster: self.cluster(store),
            pid_file: self.dir(store).pid_file(),
            name: self.name.clone(),
        }
    }

    /// libpq connection string over the unix socket (works as root or postgres at once).
    pub fn conn(&self, store: &Path) -> String {
        format!(
            "host={} port={} user=postgres dbname=postgres",
            self.dir(store).socket_dir().display(),
            self.port
        )
    }

    pub fn tcp_conn(&self) -> String {
        let host = self
            .settings
            .iter()
            .rev()
            .find(|(k, _)| k == "listen_addresses")
            .map(|(_, v)| v.split(',').next().unwrap_or("").trim().to_string())
            .filter(|h| !h.is_empty() && h != "*" && h != "0.0.0.0")
            .unwrap_or_else(|| "127.0.0.1".into());
        let user = self
            .logins
            .as_ref()
            .and_then(|l| l.user.as_deref())
            .unwrap_or("postgres");
        format!("postgresql://{user}@{host}:{}/postgres", self.port)
    }

    pub fn parent_dataset(&self) -> &str {
        self.parent.split_once('@').map_or("", |(d, _)| d)
    }

    /// The end of an operation: nothing pending, postgres wanted `running`, `what` recorded.
    pub fn settle(&mut self, running: bool, what: String) {
        self.pending = None;
        self.running = running;
        self.event(what);
    }

    pub fn event(&mut self, what: String) {
        self.events.push((crate::time::rfc3339_now(), what));
    }
}

impl Record for VdbRecord {
    const TABLE: RecordTable = RecordTable::Vdbs;
    const WHAT: &'static str = "VDB";
    fn key(&self) -> &str {
        &self.name
    }
}

/// The VDB properties of a snapshot, if it is a VDB's.
pub fn snapshot_props(s: &crate::tree::SnapshotInfo) -> Option<VdbSnapshotProps> {
    serde_json::from_slice(s.props.as_ref()?).ok()
}

/// "KEY=VALUE" from `--set`; the key must look like a PostgreSQL parameter name. Whether the
/// value is valid is for postgres to say (see [`check_config`]).
pub fn parse_setting(s: &str) -> anyhow::Result<(String, String)> {
    let (k, v) = s.split_once('=').ok_or_else(|| {
        refusal(
            ErrorKind::Invalid,
            format!("--set {s:?} is not KEY=VALUE, e.g. --set shared_buffers=64MB"),
        )
    })?;
    let k = k.trim().to_ascii_lowercase();
    if k.is_empty()
        || !k
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
    {
        refuse!(
            Invalid,
            "--set {s:?}: {k:?} is not a PostgreSQL parameter name"
        );
    }
    if v.contains('\n') || v.contains('\0') {
        refuse!(Invalid, "--set {k}: the value must be one line");
    }
    if k.starts_with("recovery_target") || k == "recovery_min_apply_delay" {
        refuse!(
            Invalid,
            "--set {k}: vdbfs runs a VDB's recovery itself; to provision it at a moment use \
             --at TIME or --at-lsn LSN ('vdbfs vdb create NAME --from SOURCE --at ...', 'vdbfs \
             vdb refresh NAME --at ...'), to go back in its own history 'vdbfs vdb rewind NAME \
             --at TIME'"
        );
    }
    if ARCHIVING.contains(&k.as_str()) {
        refuse!(
            Invalid,
            "--set {k}: vdbfs archives a VDB's WAL into the store itself (for 'vdbfs vdb \
             rewind NAME --at TIME')"
        );
    }
    if MANAGED.contains(&k.as_str()) {
        refuse!(
            Invalid,
            "--set {k}: vdbfs manages {k} for a VDB (use --port for the port; the socket \
             directory and recovery settings are fixed)"
        );
    }
    Ok((k, v.trim().to_string()))
}

/// Settings a user may not override: vdbfs needs them to reach and run the VDB.
const MANAGED: [&str; 6] = [
    "port",
    "unix_socket_directories",
    "primary_conninfo",
    "primary_slot_name",
    "restore_command",
    "data_directory",
];

/// Archiving settings vdbfs sets for a VDB's own WAL archive.
const ARCHIVING: [&str; 3] = ["archive_mode", "archive_command", "archive_library"];

/// "LO-HI" -> the port range.
pub fn parse_port_range(s: &str) -> anyhow::Result<(u16, u16)> {
    let bad = || {
        refusal(
            ErrorKind::Invalid,
            format!("port range {s:?} is not LO-HI, e.g. 6000-6999"),
        )
    };
    let (lo, hi) = s.split_once('-').ok_or_else(bad)?;
    let lo: u16 = lo.trim().parse().map_err(|_| bad())?;
    let hi: u16 = hi.trim().parse().map_err(|_| bad())?;
    if lo == 0 || lo > hi {
        return Err(bad());
    }
    Ok((lo, hi))
}

/// The port of a new VDB: the one asked for if free, else the first free one of the pool.
pub fn pick_port(asked: Option<u16>, pool: (u16, u16), taken: &[u16]) -> anyhow::Result<u16> {
    pg::ports::pick(asked, pool.0..=pool.1, taken).map_err(|e| match e {
        pg::ports::PortError::InUse(p) => refusal(
            ErrorKind::Busy,
            format!(
                "port {p} is in use (by another program, VDB or staging postgres); pick a free one \
                 with --port or leave it out to get one from the pool {}-{}",
                pool.0, pool.1
            ),
        ),
        pg::ports::PortError::NoneFree(_) => refusal(
            ErrorKind::Unavailable,
            format!(
                "no free port in the VDB pool {}-{}; pass --port or widen the pool \
                 ('vdbfs serve --vdb-ports LO-HI')",
                pool.0, pool.1
            ),
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_checked_for_shape_and_managed_keys() {
        assert_eq!(
            parse_setting("shared_buffers=64MB").unwrap(),
            ("shared_buffers".into(), "64MB".into())
        );
        assert_eq!(
            parse_setting("Log_Statement = all").unwrap(),
            ("log_statement".into(), "all".into())
        );
        assert_eq!(
            parse_setting("search_path=a,b").unwrap().1,
            "a,b",
            "values may contain commas and ="
        );
        for (bad, phrase) in [
            ("shared_buffers", "KEY=VALUE"),
            ("=1", "parameter name"),
            ("a b=1", "parameter name"),
            ("port=5432", "manages port"),
            ("restore_command=cp", "manages restore_command"),
            ("work_mem=1\n2", "one line"),
            ("recovery_target_time=2026-01-01", "--at"),
            ("Recovery_Target_LSN=0/1", "--at-lsn"),
            ("recovery_target_xid=5", "--at"),
            ("archive_command=cp %p /x", "archives a VDB's WAL"),
        ] {
            let e = parse_setting(bad).unwrap_err().to_string();
            assert!(e.contains(phrase), "{bad:?}: {e}");
        }
    }

    #[test]
    fn port_ranges_parse_and_pick_skips_taken_ports() {
        assert_eq!(parse_port_range("6000-6999").unwrap(), (6000, 6999));
        for bad in ["6000", "7000-6000", "0-10", "a-b", "1-70000"] {
            assert!(parse_port_range(bad).is_err(), "{bad}");
        }
        // A port bound here is not free; a taken one is skipped.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let busy = l.local_addr().unwrap().port();
        let e = pick_port(Some(busy), (busy, busy), &[]).unwrap_err();
        assert!(e.to_string().contains(&format!("port {busy} is in use")));
        assert!(
            pick_port(None, (busy, busy), &[]).is_err(),
            "pool exhausted"
        );
        let p = pick_port(None, (busy, busy.saturating_add(5)), &[busy + 1]).unwrap();
        assert!(p != busy && p != busy + 1);
    }

    #[test]
    fn records_written_before_the_enums_still_read() {
        let p: Pending = serde_json::from_str(
            r#"{"op":"refresh","rollback":"auto-before-refresh-x","parent":"prod@s1","was_running":true}"#,
        )
        .unwrap();
        assert_eq!(p.op, VdbOp::Refresh);
        assert!(serde_json::to_string(&p)
            .unwrap()
            .contains(r#""op":"refresh""#));
        let props: VdbSnapshotProps =
            serde_json::from_str(r#"{"vdb":"dev1","kind":"bookmark","lsn":null,"timeline":null}"#)
                .unwrap();
        assert_eq!(props.kind, SnapshotKind::Bookmark);
        assert_eq!(hooks::Hook::ConfigureClone.to_string(), "configure-clone");
    }

    #[test]
    fn tcp_conn_follows_listen_addresses() {
        let mut rec = VdbRecord {
            v: 1,
            name: "dev1".into(),
            parent: "prod@s1".into(),
            port: 6001,
            data_dir: "/s/mnt/dev1".into(),
            settings: vec![],
            hooks: None,
            install: Install {
                bin_dir: "/usr/lib/postgresql/15/bin".into(),
                version: "15.0".into(),
                major: 15,
            },
            running: true,
            pending: None,
            created: String::new(),
            events: vec![],
            history: None,
            owner: None,
            logins: None,
            lifetime: Default::default(),
        };
        assert_eq!(
            rec.tcp_conn(),
            "postgresql://postgres@127.0.0.1:6001/postgres"
        );
        assert_eq!(
            rec.conn(Path::new("/s")),
            "host=/s/vdbs/dev1/run port=6001 user=postgres dbname=postgres"
        );
        assert_eq!(rec.parent_dataset(), "prod");
        rec.settings = vec![("listen_addresses".into(), "10.0.0.5,127.0.0.1".into())];
        assert_eq!(
            rec.tcp_conn(),
            "postgresql://postgres@10.0.0.5:6001/postgres"
        );
    }
}
