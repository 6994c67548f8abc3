//! `vdbfs serve`: the daemon that owns a store. It opens the store (one daemon per store),
//! wires the services to their handles, re-establishes the recorded mounts, and runs three
//! things until SIGTERM/SIGINT: the control server (`server`, requests dispatched by area in
//! `dispatch`), the checkpointer (checkpoints, background gc, the store's reserve grown back,
//! the scheduled scrub of `scrub`), and the supervisor
//! (`supervise`: recovery of cut-short operations at start, then staging standbys and VDBs kept
//! running), and two background workers at a lower CPU priority: the archiver (WAL files the
//! staging standbys and VDBs mark ready go into the store's archive) and the preparer (each
//! source snapshot's prepared image and its verification, one at a time). On the way out it
//! stops every postgres (the archiver keeps serving their archiving until then), checkpoints
//! and unmounts.
//!
//! Module map: `server` (socket), `dispatch` (one function per area; errors translated to an
//! error kind in exactly one place), `supervise`, `timeflow` (the TimeFlow view).
//!
//! Invariants: one daemon per store (an exclusive lock on the store directory, held for the
//! daemon's life); the daemon holds no redb table of its own (records go through
//! `store::records`); every postgres is stopped before the mount under it goes away.

mod dispatch;
mod http;
mod metrics;
mod scrub;
mod server;
mod supervise;
mod timeflow;

pub use scrub::DEFAULT_RATE_MIB as SCRUB_RATE_MIB;

use crate::mounts::MountTable;
use crate::source::SourceService;
use crate::store::records::{LastClients, MountRecords, Records};
use crate::store::Store;
use crate::tree::Datasets;
use crate::vdb::VdbService;
use anyhow::{anyhow, Context};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::api::socket_path;

/// Checkpoint at least this often while there are changes...
const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(5);
/// ...and sooner when this many blocks wait to be indexed (bounds recovery work and memory).
const CHECKPOINT_BLOCKS: usize = 65_536;
/// Garbage collection runs by itself this often.
const GC_INTERVAL: Duration = Duration::from_secs(600);
/// The store's reserve is grown back (when it was given up and there is room) this often.
const REFILL_INTERVAL: Duration = Duration::from_secs(10);

pub struct Daemon {
    store_dir: PathBuf,
    datasets: Arc<Datasets>,
    mounts: Arc<MountTable>,
    sources: Arc<SourceService>,
    vdbs: Arc<VdbService>,
    stopping: AtomicBool,
    /// Set once every postgres stopped: the archiver ends (it serves their last archiving).
    archiving_done: AtomicBool,
    /// Set once the supervisor undid what a dead daemon cut short (the preparer waits for it).
    recovered: AtomicBool,
    /// How often the scheduled scrub runs (None: never).
    scrub_every: Option<Duration>,
    scrubs: scrub::Scrubs,
    /// API tokens of the HTTP API (hashes only).
    tokens: Records<crate::auth::TokenRecord>,
    /// Operation counts and durations, for `/metrics`.
    metrics: metrics::Ops,
    /// The store's bucket, if it has one (`crate::remote`).
    remote: Option<Arc<crate::remote::Remote>>,
    remote_stop: Arc<AtomicBool>,
    /// The exclusive lock on the store directory (released when the process ends).
    _lock: std::fs::File,
}

fn raise_fd_limit() {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain libc calls on a valid, initialized struct that outlives them.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

/// Takes the store's daemon lock: an exclusive `flock` on the store directory, so a second
/// daemon is refused before it touches anything (the kernel drops the lock with the process).
fn lock_store(store_dir: &Path) -> anyhow::Result<std::fs::File> {
    let dir = std::fs::File::open(store_dir)
        .with_context(|| format!("cannot open the store {}", store_dir.display()))?;
    // SAFETY: flock on a file descriptor this function owns; no memory is involved.
    let rc = unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() == std::io::ErrorKind::WouldBlock {
            crate::refuse!(
                Conflict,
                "another vdbfs daemon already serves the store {}",
                store_dir.display()
            );
        }
        return Err(e).with_context(|| format!("cannot lock the store {}", store_dir.display()));
    }
    Ok(dir)
}

impl Daemon {
    fn open(
        store_dir: &Path,
        vdb_ports: (u16, u16),
        keep_undo: u32,
        scrub_every: Option<Duration>,
        default_idle_ttl: Option<Duration>,
    ) -> anyhow::Result<Daemon> {
        if !crate::store::index_path(store_dir).exists() {
            crate::refuse!(
                NotFound,
                "{} is not a vdbfs store; create one with 'vdbfs init --store {}'",
                store_dir.display(),
                store_dir.display()
            );
        }
        let lock = lock_store(store_dir)?;
        let (store, replay) = Store::open(store_dir)
            .with_context(|| format!("cannot open the store {}", store_dir.display()))?;
        let store = Arc::new(store);
        {
            let store = store.clone();
            std::thread::Builder::new()
                .name("seen-fill".into())
                .spawn(move || {
                    if let Err(e) = store.fill_seen() {
                        tracing::warn!("cannot fill the filter of known blocks (writes look every block up): {e}");
                    }
                })
                .context("cannot start a thread")?;
        }
        let datasets = Arc::new(Datasets::open(store.clone(), replay).context("recovery failed")?);
        let remote = match crate::remote::RemoteConfig::load(store_dir)? {
            Some(cfg) => {
                let r = crate::remote::Remote::open(cfg, store.clone())?;
                store.set_remote(r.clone());
                Some(r)
            }
            None => None,
        };
        let mounts = MountTable::new(datasets.clone(), MountRecords::new(store.clone()));
        let archive = Arc::new(crate::archive::WalArchive::new(datasets.clone()));
        let sources = Arc::new(SourceService::new(
            store_dir.to_path_buf(),
            datasets.clone(),
            mounts.clone(),
            Records::new(store.clone()),
            archive,
        ));
        let vdbs = Arc::new(
            VdbService::new(
                store_dir.to_path_buf(),
                datasets.clone(),
                mounts.clone(),
                Records::new(store.clone()),
                sources.clone(),
                vdb_ports,
            )
            .keep_undo(keep_undo)
            .default_idle_ttl(default_idle_ttl)
            .idle_clock(crate::vdb::lifetime::IdleClock::load(LastClients::new(
                store.clone(),
            ))?),
        );
        let d = Daemon {
            store_dir: store_dir.to_path_buf(),
            datasets,
            mounts,
            sources,
            vdbs,
            stopping: AtomicBool::new(false),
            archiving_done: AtomicBool::new(false),
            recovered: AtomicBool::new(false),
            scrub_every,
            scrubs: scrub::Scrubs::default(),
            tokens: Records::new(store),
            metrics: metrics::Ops::default(),
            remote,
            remote_stop: Arc::new(AtomicBool::new(false)),
            _lock: lock,
        };
        d.load_scrub_state();
        Ok(d)
    }

    /// Re-establishes the mounts that were active when the last daemon stopped or died.
    fn remount(&self) -> anyhow::Result<()> {
        for (mp, dataset) in self.mounts.recorded()? {
            match self.mounts.mount(&dataset, &mp) {
                Ok(msg) => tracing::info!("{msg} (re-established)"),
                Err(e) => {
                    tracing::error!(mountpoint = %mp.display(), "cannot re-establish the mount of {dataset}: {e:#}")
                }
            }
        }
        Ok(())
    }

    fn checkpointer(self: Arc<Self>) {
        let mut last = Instant::now();
        let mut last_gc = Instant::now();
        let mut last_refill = Instant::now();
        while !self.stopping.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(200));
            let due = self.datasets.store().recent_blocks() >= CHECKPOINT_BLOCKS
                || (last.elapsed() >= CHECKPOINT_INTERVAL && self.datasets.checkpoint_due());
            if due {
                let r = self
                    .metrics
                    .time("checkpoint", "background", || self.datasets.checkpoint());
                match r {
                    Ok(()) => tracing::debug!("background checkpoint done"),
                    Err(e) => tracing::error!(
                        "checkpoint failed (the journal still holds every fsynced change): {e}"
                    ),
                }
                last = Instant::now();
            }
            if last_gc.elapsed() >= GC_INTERVAL {
                match self.metrics.time("gc", "background", || self.datasets.gc()) {
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
            if last_refill.elapsed() >= REFILL_INTERVAL {
                if let Err(e) = self.datasets.store().refill_reserve() {
                    tracing::warn!("cannot grow the store's reserve back: {e}");
                }
                self.scrub_if_due();
                last_refill = Instant::now();
            }
        }
    }

    fn shutdown(&self) {
        self.stopping.store(true, Ordering::Relaxed);
        self.remote_stop.store(true, Ordering::Relaxed);
        if let Some(r) = &self.remote {
            r.kick();
        }
        self.vdbs.save_idle_clock();
        self.vdbs.stop_all();
        self.sources.stop_all();
        self.archiving_done.store(true, Ordering::Relaxed);
        if let Err(e) = self.datasets.checkpoint() {
            tracing::error!(
                "final checkpoint failed (the journal still holds every fsynced change): {e}"
            );
        }
        self.mounts.unmount_all();
        if let Err(e) = self.datasets.checkpoint() {
            tracing::error!("checkpoint after unmount failed: {e}");
        }
        self.datasets.store().clear_remote();
    }
}

/// How `vdbfs serve` was asked to run.
pub struct ServeOptions {
    /// Ports new VDBs take (`LO-HI`).
    pub vdb_ports: String,
    /// Undo snapshots each VDB keeps.
    pub keep_undo: u32,
    /// How often a scrub runs ("off": never).
    pub scrub_every: String,
    /// Where the HTTP API listens (`--http ADDR:PORT`); None: no HTTP API.
    pub http: Option<std::net::SocketAddr>,
    /// Serve it over HTTPS with this certificate chain and key (PEM files).
    pub tls: Option<(std::path::PathBuf, std::path::PathBuf)>,
    /// The idle TTL of VDBs created without `--idle-ttl` ("off": none).
    pub default_idle_ttl: String,
    /// Members of this group use the control socket as developers (`--socket-group`).
    pub socket_group: Option<String>,
}

/// Runs the daemon of `store_dir` in the foreground until SIGTERM or SIGINT.
pub fn serve(store_dir: &Path, opts: ServeOptions) -> anyhow::Result<()> {
    let ServeOptions {
        vdb_ports,
        keep_undo,
        scrub_every,
        http,
        tls,
        default_idle_ttl,
        socket_group,
    } = opts;
    let default_idle_ttl = match default_idle_ttl.trim() {
        "off" | "never" | "" => None,
        s => Some(crate::time::parse_interval(s, "--default-idle-ttl")?),
    };
    let (vdb_ports, scrub_every) = (vdb_ports.as_str(), scrub_every.as_str());
    let vdb_ports = crate::vdb::parse_port_range(vdb_ports)?;
    let scrub_every = match scrub_every.trim() {
        "off" | "never" | "0" => None,
        s => Some(crate::time::parse_interval(s, "--scrub-every")?),
    };
    raise_fd_limit();
    let daemon = Arc::new(Daemon::open(
        store_dir,
        vdb_ports,
        keep_undo,
        scrub_every,
        default_idle_ttl,
    )?);
    let _ = std::fs::remove_file(socket_path(store_dir));
    daemon.remount()?;
    {
        let d = daemon.clone();
        std::thread::Builder::new()
            .name("checkpointer".into())
            .spawn(move || d.checkpointer())?;
        let d = daemon.clone();
        std::thread::Builder::new()
            .name("supervisor".into())
            .spawn(move || d.supervisor())?;
        let d = daemon.clone();
        std::thread::Builder::new()
            .name("archiver".into())
            .spawn(move || d.archiver())?;
        let d = daemon.clone();
        std::thread::Builder::new()
            .name("expirer".into())
            .spawn(move || d.expirer())?;
        let d = daemon.clone();
        std::thread::Builder::new()
            .name("preparer".into())
            .spawn(move || d.preparer())?;
        if let Some(r) = daemon.remote.clone() {
            let (ds, stop) = (daemon.datasets.clone(), daemon.remote_stop.clone());
            std::thread::Builder::new()
                .name("uploader".into())
                .spawn(move || r.uploader(ds, stop))?;
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let stop = tokio::sync::watch::channel(false);
        let web = match http {
            Some(addr) => {
                let tls = match &tls {
                    Some((cert, key)) => Some(http::tls_config(cert, key).await?),
                    None => None,
                };
                Some(tokio::spawn(http::run(
                    daemon.clone(),
                    http::bind(addr).await?,
                    tls,
                    stop.1,
                )))
            }
            None => None,
        };
        let r = server::run(daemon.clone(), socket_group).await;
        let _ = stop.0.send(true);
        if let Some(web) = web {
            // Requests still running go on in their threads; the listener does not wait long.
            let _ = tokio::time::timeout(Duration::from_secs(5), web).await;
        }
        r
    })?;
    let d = daemon.clone();
    std::thread::spawn(move || d.shutdown())
        .join()
        .map_err(|_| anyhow!("shutdown panicked"))?;
    rt.shutdown_timeout(Duration::from_secs(2));
    tracing::info!("vdbfs daemon stopped");
    Ok(())
}
