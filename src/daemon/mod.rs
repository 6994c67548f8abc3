//! `vdbfs serve`: the daemon that owns a store. Control path: CLI -> this API -> datasets and
//! mounts. It serves every FUSE mount of the store, checkpoints in the background, and on
//! SIGTERM/SIGINT flushes, unmounts and exits.
//!
//! Invariants: one daemon per store (redb refuses a second writer); errors become user-facing
//! messages in exactly one place (`respond`).

pub mod api;
pub mod mounts;
pub mod sources;
pub mod supervision;
pub mod vdbs;

use crate::store::{Store, MOUNTS};
use crate::tree::{Datasets, NameError};
use anyhow::{anyhow, bail, Context};
use api::{DatasetInfo, MountInfo, Request, Response, Status};
use mounts::Mounted;
use parking_lot::Mutex;
use redb::{ReadableDatabase, ReadableTable};
use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;

/// Checkpoint at least this often while there are changes...
const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(5);
/// ...and sooner when this many blocks wait to be indexed (bounds recovery work and memory).
const CHECKPOINT_BLOCKS: usize = 65_536;
/// Garbage collection runs by itself this often.
const GC_INTERVAL: Duration = Duration::from_secs(600);

/// The control-path tables of JSON records (`sources`, `vdbs`).
type JsonTable = redb::TableDefinition<'static, &'static str, &'static [u8]>;

fn snapshot_info(s: &crate::tree::SnapshotInfo) -> api::SnapshotInfo {
    let props = sources::snapshot_props(s);
    api::SnapshotInfo {
        lsn: props.as_ref().map(|p| p.lsn.clone()),
        timeline: props.as_ref().map(|p| p.timeline),
        replay_time: props.as_ref().and_then(|p| p.replay_time.clone()),
        mode: props.as_ref().map(|p| p.mode.as_str().to_string()),
        kind: vdbs::snapshot_kind(s),
        name: s.full_name(),
        dataset: s.dataset.clone(),
        snapshot: s.rec.name.clone(),
        created: api::rfc3339(s.rec.created.secs),
        created_unix_ms: s.rec.created.secs * 1000 + (s.rec.created.nsecs / 1_000_000) as i64,
    }
}

pub struct Daemon {
    store_dir: PathBuf,
    datasets: Datasets,
    mounts: Mutex<BTreeMap<PathBuf, Mounted>>,
    sources: supervision::Registry,
    vdbs: supervision::Registry,
    /// Serializes VDB name checks, port choice and record creation.
    vdb_create_lock: Mutex<()>,
    /// The pool new VDBs take a port from when none is given.
    vdb_ports: (u16, u16),
    stopping: AtomicBool,
}

fn raise_fd_limit() {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain libc calls on a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

impl Daemon {
    fn open(store_dir: &Path, vdb_ports: (u16, u16)) -> anyhow::Result<Daemon> {
        if !crate::store::index_path(store_dir).exists() {
            bail!(
                "{} is not a vdbfs store; create one with 'vdbfs init --store {}'",
                store_dir.display(),
                store_dir.display()
            );
        }
        let (store, replay) = match Store::open(store_dir) {
            Ok(x) => x,
            Err(crate::store::Error::Index(m)) if m.contains("already open") => bail!(
                "another vdbfs daemon already serves the store {}",
                store_dir.display()
            ),
            Err(e) => {
                return Err(
                    anyhow!(e).context(format!("cannot open the store {}", store_dir.display()))
                )
            }
        };
        let datasets = Datasets::open(Arc::new(store), replay).context("recovery failed")?;
        Ok(Daemon {
            store_dir: store_dir.to_path_buf(),
            datasets,
            mounts: Mutex::new(BTreeMap::new()),
            sources: Default::default(),
            vdbs: Default::default(),
            vdb_create_lock: Mutex::new(()),
            vdb_ports,
            stopping: AtomicBool::new(false),
        })
    }

    // ---- control-path records (JSON values in a `&str`-keyed table) ----------------------

    fn json_records<T: serde::de::DeserializeOwned>(
        &self,
        table: JsonTable,
        what: &str,
    ) -> anyhow::Result<Vec<T>> {
        let txn = self.datasets.store().db().begin_read()?;
        let t = txn.open_table(table)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            let (k, v) = row?;
            out.push(
                serde_json::from_slice(v.value())
                    .with_context(|| format!("unreadable {what} record {}", k.value()))?,
            );
        }
        Ok(out)
    }

    fn json_record<T: serde::de::DeserializeOwned>(
        &self,
        table: JsonTable,
        name: &str,
    ) -> anyhow::Result<Option<T>> {
        let txn = self.datasets.store().db().begin_read()?;
        let t = txn.open_table(table)?;
        let v = t.get(name)?;
        Ok(match v {
            Some(v) => Some(serde_json::from_slice(v.value())?),
            None => None,
        })
    }

    fn save_json<T: serde::Serialize>(
        &self,
        table: JsonTable,
        name: &str,
        rec: &T,
    ) -> anyhow::Result<()> {
        let bytes = serde_json::to_vec(rec)?;
        let txn = self.datasets.store().db().begin_write()?;
        txn.open_table(table)?.insert(name, bytes.as_slice())?;
        txn.commit()?;
        Ok(())
    }

    fn remove_json(&self, table: JsonTable, name: &str) -> anyhow::Result<()> {
        let txn = self.datasets.store().db().begin_write()?;
        txn.open_table(table)?.remove(name)?;
        txn.commit()?;
        Ok(())
    }

    fn persist_mount(&self, mountpoint: &Path, dataset: Option<&str>) -> anyhow::Result<()> {
        let db = self.datasets.store().db();
        let txn = db.begin_write()?;
        {
            let mut t = txn.open_table(MOUNTS)?;
            let key = mountpoint.to_string_lossy();
            match dataset {
                Some(d) => {
                    t.insert(key.as_ref(), d)?;
                }
                None => {
                    t.remove(key.as_ref())?;
                }
            }
        }
        txn.commit()?;
        Ok(())
    }

    fn recorded_mounts(&self) -> anyhow::Result<Vec<(PathBuf, String)>> {
        let txn = self.datasets.store().db().begin_read()?;
        let t = txn.open_table(MOUNTS)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            let (k, v) = row?;
            out.push((PathBuf::from(k.value()), v.value().to_string()));
        }
        Ok(out)
    }

    /// A mount removed behind our back (umount(8)): flush and forget it.
    fn forget_mount(&self, mp: &Path) {
        let removed = self.mounts.lock().remove(mp);
        if let Some(m) = removed {
            tracing::info!(mountpoint = %mp.display(), dataset = %m.dataset, "unmounted outside vdbfs; forgetting the mount");
            if let Err(e) = self.datasets.checkpoint() {
                tracing::error!("checkpoint after an external unmount failed: {e}");
            }
            if let Err(e) = self.persist_mount(mp, None) {
                tracing::error!("cannot forget the mount record of {}: {e:#}", mp.display());
            }
        }
    }

    fn mount(self: &Arc<Self>, dataset: &str, mountpoint: &Path) -> anyhow::Result<String> {
        // A mount point left by a daemon that died answers ENOTCONN to everything: clear it
        // first (unless this daemon serves it).
        let lexical = mounts::resolve(mountpoint);
        if !self.mounts.lock().contains_key(&lexical) {
            mounts::clear_stale(&lexical)?;
        }
        std::fs::create_dir_all(mountpoint)
            .with_context(|| format!("cannot create the mount point {}", mountpoint.display()))?;
        let mp = mountpoint
            .canonicalize()
            .with_context(|| format!("cannot resolve the mount point {}", mountpoint.display()))?;
        let mut mounts = self.mounts.lock();
        if let Some(m) = mounts.get(&mp) {
            if m.dataset == dataset {
                return Ok(format!(
                    "dataset {dataset} is already mounted at {}",
                    mp.display()
                ));
            }
            bail!(
                "{} already has dataset {} mounted; unmount it first ('vdbfs umount {}')",
                mp.display(),
                m.dataset,
                mp.display()
            );
        }
        if let Some(m) = mounts.values().find(|m| m.dataset == dataset) {
            bail!(
                "dataset {dataset} is already mounted at {}; a dataset is mounted at one place at a time",
                m.mountpoint.display()
            );
        }
        let (ds, read_only) = match dataset.split_once('@') {
            Some((d, s)) => (self.datasets.snapshot_view(d, s)?, true),
            None => (
                self.datasets
                    .get(dataset)?
                    .ok_or_else(|| NameError::NotFound(dataset.to_string()))?,
                false,
            ),
        };
        let weak = Arc::downgrade(self);
        let mp2 = mp.clone();
        let on_end = Box::new(move || {
            if let Some(d) = weak.upgrade() {
                if !d.stopping.load(Ordering::SeqCst) {
                    d.forget_mount(&mp2);
                }
            }
        });
        let m = mounts::mount(ds, &mp, read_only, on_end)?;
        mounts.insert(mp.clone(), m);
        self.persist_mount(&mp, Some(dataset))?;
        let what = if read_only {
            "snapshot (read-only)"
        } else {
            "dataset"
        };
        Ok(format!("mounted {what} {dataset} at {}", mp.display()))
    }

    /// The staging dataset of a linked source is managed through `vdbfs source`, a VDB's
    /// dataset through `vdbfs vdb`.
    fn refuse_if_source(&self, dataset: &str, what: &str) -> anyhow::Result<()> {
        if self.is_vdb(dataset) {
            bail!(
                "dataset {dataset} belongs to VDB {dataset}; cannot {what} it directly ('vdbfs vdb \
                 stop {dataset}' stops it, 'vdbfs vdb delete {dataset}' removes it)"
            );
        }
        if self.source_records()?.iter().any(|r| r.name == dataset) {
            bail!(
                "dataset {dataset} is the staging dataset of source {dataset}; cannot {what} it \
                 while linked ('vdbfs source disable {dataset}' stops syncing, 'vdbfs source \
                 unlink {dataset}' detaches it)"
            );
        }
        Ok(())
    }

    fn umount(&self, mountpoint: &Path) -> anyhow::Result<String> {
        let mp = mounts::resolve(mountpoint);
        let mut mounts = self.mounts.lock();
        let Some(m) = mounts.get_mut(&mp) else {
            bail!(
                "nothing is mounted by vdbfs at {}; 'vdbfs status' lists the mounts",
                mp.display()
            );
        };
        self.datasets
            .checkpoint()
            .context("flush before unmount failed")?;
        m.unmount(false)?;
        let m = mounts
            .remove(&mp)
            .ok_or_else(|| anyhow!("mount vanished"))?;
        self.persist_mount(&mp, None)?;
        Ok(format!(
            "unmounted dataset {} from {}",
            m.dataset,
            mp.display()
        ))
    }

    fn mounted_at(&self, name: &str) -> Option<PathBuf> {
        self.mounts
            .lock()
            .values()
            .find(|m| m.dataset == name)
            .map(|m| m.mountpoint.clone())
    }

    fn handle(
        self: &Arc<Self>,
        req: Request,
        progress: sources::Progress,
    ) -> anyhow::Result<(String, serde_json::Value)> {
        match req {
            Request::SourceLink(spec) => self.source_link(*spec, progress),
            Request::SourceList => Ok((String::new(), serde_json::to_value(self.source_list()?)?)),
            Request::SourceStatus { name } => Ok((
                String::new(),
                serde_json::to_value(self.source_status(&name)?)?,
            )),
            Request::SourceSnapshot { name } => {
                let s = self.source_snapshot(&name, progress)?;
                Ok((s.name.clone(), serde_json::to_value(&s)?))
            }
            Request::SourceEnable { name } => Ok((
                self.source_set_enabled(&name, true)?,
                serde_json::Value::Null,
            )),
            Request::SourceDisable { name } => Ok((
                self.source_set_enabled(&name, false)?,
                serde_json::Value::Null,
            )),
            Request::SourceUnlink {
                name,
                delete_snapshots,
                force,
            } => Ok((
                self.source_unlink(&name, delete_snapshots, force)?,
                serde_json::Value::Null,
            )),
            Request::VdbCreate(spec) => {
                let st = self.vdb_create(*spec, progress)?;
                Ok((
                    format!(
                        "{}\nVDB {} is running on port {} (from {})\n  over TCP: {} (the source's \
                         passwords)\n  data directory: {}",
                        st.conn,
                        st.name,
                        st.port,
                        st.parent,
                        st.tcp_conn,
                        st.data_dir.display()
                    ),
                    serde_json::to_value(&st)?,
                ))
            }
            Request::VdbList => Ok((String::new(), serde_json::to_value(self.vdb_list()?)?)),
            Request::VdbStatus { name } => Ok((
                String::new(),
                serde_json::to_value(self.vdb_status(&name)?)?,
            )),
            Request::VdbStart { name } => Ok((
                self.vdb_start(&name)
                    .context(format!("cannot start VDB {name}"))?,
                serde_json::Value::Null,
            )),
            Request::VdbStop { name } => Ok((
                self.vdb_stop(&name)
                    .context(format!("cannot stop VDB {name}"))?,
                serde_json::Value::Null,
            )),
            Request::VdbSnapshot {
                name,
                snapshot,
                bookmark,
            } => {
                let what = if bookmark { "bookmark" } else { "snapshot" };
                let s = self
                    .vdb_snapshot(&name, snapshot.as_deref(), bookmark)
                    .context(format!("cannot {what} VDB {name}"))?;
                Ok((s.name.clone(), serde_json::to_value(&s)?))
            }
            Request::VdbRewind { name, to } => Ok((
                self.vdb_rewind(&name, &to)
                    .context(format!("cannot rewind VDB {name}"))?,
                serde_json::Value::Null,
            )),
            Request::VdbRefresh { name, to } => Ok((
                self.vdb_refresh(&name, to.as_deref(), progress)
                    .context(format!("cannot refresh VDB {name}"))?,
                serde_json::Value::Null,
            )),
            Request::VdbDelete { name } => Ok((
                self.vdb_delete(&name)
                    .context(format!("cannot delete VDB {name}"))?,
                serde_json::Value::Null,
            )),
            Request::Timeflow { dataset } => Ok((
                String::new(),
                serde_json::to_value(self.timeflow(dataset.as_deref())?)?,
            )),
            Request::Status => {
                let mounts = self
                    .mounts
                    .lock()
                    .values()
                    .map(|m| MountInfo {
                        dataset: m.dataset.clone(),
                        mountpoint: m.mountpoint.clone(),
                    })
                    .collect();
                let s = Status {
                    pid: std::process::id(),
                    store: self.store_dir.clone(),
                    mounts,
                };
                Ok((String::new(), serde_json::to_value(s)?))
            }
            Request::DatasetCreate { name } => {
                self.datasets.create(&name)?;
                Ok((format!("created dataset {name}"), serde_json::Value::Null))
            }
            Request::DatasetList => {
                let mounts = self.mounts.lock();
                let list: Vec<DatasetInfo> = self
                    .datasets
                    .list()?
                    .into_iter()
                    .map(|r| DatasetInfo {
                        mountpoint: mounts
                            .values()
                            .find(|m| m.dataset == r.name)
                            .map(|m| m.mountpoint.clone()),
                        created: api::rfc3339(r.created.secs),
                        name: r.name,
                        id: r.id,
                    })
                    .collect();
                Ok((String::new(), serde_json::to_value(list)?))
            }
            Request::DatasetDelete {
                name,
                with_snapshots,
            } => {
                self.refuse_if_source(&name, "delete")?;
                if let Some(mp) = self.mounted_at(&name) {
                    bail!(
                        "dataset {name} is mounted at {}; unmount it first ('vdbfs umount {}')",
                        mp.display(),
                        mp.display()
                    );
                }
                let snaps = self.datasets.snapshots(Some(&name))?;
                if !snaps.is_empty() && !with_snapshots {
                    return Err(NameError::HasSnapshots(name, snaps.len()).into());
                }
                for s in &snaps {
                    if let Some(mp) = self.mounted_at(&s.full_name()) {
                        bail!(
                            "snapshot {} is mounted at {}; unmount it first",
                            s.full_name(),
                            mp.display()
                        );
                    }
                }
                for s in &snaps {
                    self.datasets.delete_snapshot(&name, &s.rec.name)?;
                }
                self.datasets.delete(&name)?;
                Ok((format!("deleted dataset {name}"), serde_json::Value::Null))
            }
            Request::SnapshotCreate { dataset, name } => {
                let t = std::time::Instant::now();
                let s = self.datasets.snapshot(&dataset, name.as_deref())?;
                let info = snapshot_info(&s);
                Ok((
                    format!(
                        "created snapshot {} in {:.1} ms",
                        s.full_name(),
                        t.elapsed().as_secs_f64() * 1e3
                    ),
                    serde_json::to_value(info)?,
                ))
            }
            Request::SnapshotList { dataset } => {
                let list: Vec<api::SnapshotInfo> = self
                    .datasets
                    .snapshots(dataset.as_deref())?
                    .iter()
                    .map(snapshot_info)
                    .collect();
                Ok((String::new(), serde_json::to_value(list)?))
            }
            Request::SnapshotDelete { name } => {
                let (d, s) = crate::tree::parse_snapshot_ref(&name)?;
                if let Some(mp) = self.mounted_at(&name) {
                    bail!(
                        "snapshot {name} is mounted at {}; unmount it first ('vdbfs umount {}')",
                        mp.display(),
                        mp.display()
                    );
                }
                self.datasets.delete_snapshot(d, s)?;
                Ok((
                    format!("deleted snapshot {name}; clones of it keep their data"),
                    serde_json::Value::Null,
                ))
            }
            Request::Clone { snapshot, name } => {
                let (d, s) = crate::tree::parse_snapshot_ref(&snapshot)?;
                let t = std::time::Instant::now();
                self.datasets.clone_snapshot(d, s, &name)?;
                Ok((
                    format!(
                        "created dataset {name} as a clone of {snapshot} in {:.1} ms",
                        t.elapsed().as_secs_f64() * 1e3
                    ),
                    serde_json::Value::Null,
                ))
            }
            Request::Df => {
                let u = self.datasets.usage()?;
                Ok((String::new(), serde_json::to_value(api::Df::from(u))?))
            }
            Request::Gc => {
                let r = self.datasets.gc()?;
                Ok((
                    format!(
                        "freed {} blocks ({} bytes), rewrote {} pack(s), {} bytes returned to the filesystem",
                        r.blocks_freed, r.bytes_freed, r.packs_rewritten, r.bytes_reclaimed
                    ),
                    serde_json::Value::Null,
                ))
            }
            Request::Mount {
                dataset,
                mountpoint,
            } => Ok((self.mount(&dataset, &mountpoint)?, serde_json::Value::Null)),
            Request::Umount { mountpoint } => {
                let mp = mounts::resolve(&mountpoint);
                let ds = self.mounts.lock().get(&mp).map(|m| m.dataset.clone());
                if let Some(ds) = ds {
                    self.refuse_if_source(&ds, "unmount")?;
                }
                Ok((self.umount(&mountpoint)?, serde_json::Value::Null))
            }
        }
    }

    fn respond(self: &Arc<Self>, line: &str, progress: sources::Progress) -> Response {
        let req: Request = match serde_json::from_str(line) {
            Ok(r) => r,
            Err(e) => {
                return Response {
                    ok: false,
                    message: format!("malformed request: {e}"),
                    data: serde_json::Value::Null,
                }
            }
        };
        match self.handle(req, progress) {
            Ok((message, data)) => Response {
                ok: true,
                message,
                data,
            },
            Err(e) => {
                tracing::info!("request failed: {e:#}");
                Response {
                    ok: false,
                    message: format!("{e:#}"),
                    data: serde_json::Value::Null,
                }
            }
        }
    }

    fn checkpointer(self: Arc<Self>) {
        let mut last = Instant::now();
        let mut last_gc = Instant::now();
        while !self.stopping.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(200));
            let due = self.datasets.store().recent_blocks() >= CHECKPOINT_BLOCKS
                || (last.elapsed() >= CHECKPOINT_INTERVAL && self.datasets.checkpoint_due());
            if due {
                if let Err(e) = self.datasets.checkpoint() {
                    tracing::error!(
                        "checkpoint failed (the journal still holds every fsynced change): {e}"
                    );
                }
                last = Instant::now();
            }
            if last_gc.elapsed() >= GC_INTERVAL {
                match self.datasets.gc() {
                    Ok(r) if r.blocks_freed > 0 || r.packs_rewritten > 0 => tracing::info!(
                        blocks = r.blocks_freed,
                        packs = r.packs_rewritten,
                        bytes_returned = r.bytes_reclaimed,
                        "background gc"
                    ),
                    Ok(_) => {}
                    Err(e) => tracing::error!("background gc failed: {e}"),
                }
                last_gc = Instant::now();
            }
        }
    }

    fn supervisor(self: Arc<Self>) {
        self.recover_sources();
        self.recover_vdbs();
        while !self.stopping.load(Ordering::Relaxed) {
            self.supervise();
            self.supervise_vdbs();
            std::thread::sleep(Duration::from_secs(1));
        }
    }

    fn shutdown(&self) {
        self.stopping.store(true, Ordering::Relaxed);
        self.stop_all_vdbs();
        self.stop_all_staging();
        if let Err(e) = self.datasets.checkpoint() {
            tracing::error!(
                "final checkpoint failed (the journal still holds every fsynced change): {e}"
            );
        }
        let mut mounts = self.mounts.lock();
        for (mp, m) in mounts.iter_mut() {
            if let Err(e) = m.unmount(true) {
                tracing::error!(mountpoint = %mp.display(), "unmount at shutdown failed: {e:#}");
            }
        }
        mounts.clear();
        if let Err(e) = self.datasets.checkpoint() {
            tracing::error!("checkpoint after unmount failed: {e}");
        }
    }
}

pub fn serve(store_dir: &Path, vdb_ports: (u16, u16)) -> anyhow::Result<()> {
    raise_fd_limit();
    let daemon = Arc::new(Daemon::open(store_dir, vdb_ports)?);
    let sock = api::socket_path(store_dir);
    let _ = std::fs::remove_file(&sock);

    // Re-establish the mounts that were active when the last daemon stopped or died.
    for (mp, dataset) in daemon.recorded_mounts()? {
        match daemon.mount(&dataset, &mp) {
            Ok(msg) => tracing::info!("{msg} (re-established)"),
            Err(e) => {
                tracing::error!(mountpoint = %mp.display(), "cannot re-establish the mount of {dataset}: {e:#}")
            }
        }
    }
    {
        let d = daemon.clone();
        std::thread::Builder::new()
            .name("checkpointer".into())
            .spawn(move || d.checkpointer())?;
        let d = daemon.clone();
        std::thread::Builder::new()
            .name("supervisor".into())
            .spawn(move || d.supervisor())?;
    }

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let d = daemon.clone();
    rt.block_on(async move {
        let listener = UnixListener::bind(&sock)
            .with_context(|| format!("cannot listen on {}", sock.display()))?;
        std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600))?;
        tracing::info!(store = %d.store_dir.display(), pid = std::process::id(), "vdbfs daemon ready");
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = tokio::signal::ctrl_c() => break,
                conn = listener.accept() => {
                    let (stream, _) = match conn {
                        Ok(c) => c,
                        Err(e) => { tracing::warn!("accept failed: {e}"); continue; }
                    };
                    let d = d.clone();
                    tokio::spawn(async move {
                        let (r, mut w) = stream.into_split();
                        let mut line = String::new();
                        if BufReader::new(r).read_line(&mut line).await.is_err() {
                            return;
                        }
                        // Long operations send progress lines before their answer.
                        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
                        let task = tokio::task::spawn_blocking(move || {
                            d.respond(&line, &move |p| {
                                let _ = tx.send(p);
                            })
                        });
                        while let Some(p) = rx.recv().await {
                            if let Ok(mut s) = serde_json::to_string(&api::ProgressLine { progress: p }) {
                                s.push('\n');
                                let _ = w.write_all(s.as_bytes()).await;
                            }
                        }
                        let resp = task.await;
                        let resp = resp.unwrap_or_else(|e| Response { ok: false, message: format!("internal error: {e}"), data: serde_json::Value::Null });
                        if let Ok(mut s) = serde_json::to_string(&resp) {
                            s.push('\n');
                            let _ = w.write_all(s.as_bytes()).await;
                        }
                    });
                }
            }
        }
        tracing::info!("stopping: flushing and unmounting");
        let _ = std::fs::remove_file(&sock);
        anyhow::Ok(())
    })?;
    let d = daemon.clone();
    std::thread::spawn(move || d.shutdown())
        .join()
        .map_err(|_| anyhow!("shutdown panicked"))?;
    rt.shutdown_timeout(Duration::from_secs(2));
    tracing::info!("vdbfs daemon stopped");
    Ok(())
}
