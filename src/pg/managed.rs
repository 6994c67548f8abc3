//! One lifecycle for every postgres the daemon runs (staging standbys and VDBs): start with a
//! bounded wait, stop, the PID file kept outside the data directory, leftovers of a daemon that
//! died, restart pacing, and the server log tail for error messages.
//!
//! Invariants: an operation on a cluster holds its slot's `op` lock for its whole length; the
//! supervisor only try-locks it, so it never races a user's command. The runtime state is not
//! persisted: a new daemon starts with no PID of its own, so a postmaster it finds (by the PID
//! file or `postmaster.pid`) is a leftover and is stopped by its verified PID before a start.

use super::{read_pid, Cluster};
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// The runtime state of one supervised postgres.
#[derive(Default)]
pub struct Runtime {
    /// The postmaster this daemon started (None: stopped, or not started by this daemon).
    pub pid: Option<i32>,
    pub started: Option<Instant>,
    /// Restarts after the postmaster died.
    pub restarts: u32,
    pub last_error: Option<String>,
    next_try: Option<Instant>,
    backoff: Duration,
}

impl Runtime {
    /// Postgres `pid` started: errors and backoff are cleared.
    pub fn running(&mut self, pid: i32) {
        self.pid = Some(pid);
        self.started = Some(Instant::now());
        self.last_error = None;
        self.backoff = Duration::ZERO;
        self.next_try = None;
    }

    /// A start failed: the next try waits twice as long (1 s to 30 s). Returns that wait.
    pub fn failed(&mut self, error: String) -> Duration {
        self.backoff = (self.backoff * 2).clamp(Duration::from_secs(1), MAX_BACKOFF);
        self.next_try = Some(Instant::now() + self.backoff);
        self.last_error = Some(error);
        self.backoff
    }

    /// Whether a restart may be tried now.
    pub fn due(&self) -> bool {
        self.next_try.is_none_or(|t| Instant::now() >= t)
    }
}

/// One supervised cluster: its operation lock and runtime.
#[derive(Default)]
pub struct Slot {
    pub op: Mutex<()>,
    pub rt: Mutex<Runtime>,
}

/// The slots by name.
#[derive(Default)]
pub struct Registry {
    map: Mutex<BTreeMap<String, Arc<Slot>>>,
}

impl Registry {
    pub fn state(&self, name: &str) -> Arc<Slot> {
        self.map.lock().entry(name.to_string()).or_default().clone()
    }

    pub fn forget(&self, name: &str) {
        self.map.lock().remove(name);
    }
}

/// A postgres this daemon runs: its cluster, and the PID file that survives its mount.
pub struct Managed {
    pub cluster: Cluster,
    /// Holds the postmaster PID this daemon started; outside the data directory, so it is
    /// readable when the mount it ran on died with an earlier daemon.
    pub pid_file: PathBuf,
    /// For log lines: the source's or VDB's name.
    pub name: String,
}

impl Managed {
    /// The postmaster: the one this daemon started if it runs, else one `postmaster.pid` names.
    pub fn pid(&self, slot: &Slot) -> Option<i32> {
        slot.rt
            .lock()
            .pid
            .filter(|p| super::pid_alive(*p))
            .or_else(|| self.cluster.postmaster_pid())
    }

    /// The postmaster this daemon started, if it still runs.
    pub fn ours(&self, slot: &Slot) -> Option<i32> {
        slot.rt.lock().pid.filter(|p| super::pid_alive(*p))
    }

    /// Starts postgres: a leftover of an earlier daemon is stopped first (unless this daemon's
    /// own postmaster runs), `missing` is the error when the data directory has no
    /// `PG_VERSION` (not mounted, or empty), `then` runs once `pg_ctl start -w` returned and
    /// gives the final PID (a provisioning start promotes there). The PID file and the runtime
    /// are updated only when all of it succeeded.
    pub fn start(
        &self,
        slot: &Slot,
        timeout: Duration,
        missing: impl FnOnce() -> anyhow::Error,
        then: impl FnOnce(i32) -> anyhow::Result<i32>,
    ) -> anyhow::Result<i32> {
        if self.ours(slot).is_none() {
            self.cluster
                .stop_any(None, read_pid(&self.pid_file), &self.name);
        }
        if !self.cluster.data_dir.join("PG_VERSION").exists() {
            return Err(missing());
        }
        let pid = self.cluster.start(timeout)?;
        let pid = then(pid)?;
        std::fs::write(&self.pid_file, format!("{pid}\n"))?;
        slot.rt.lock().running(pid);
        Ok(pid)
    }

    /// Stops postgres (see [`Cluster::stop_any`]) and removes the PID file.
    pub fn stop(&self, slot: &Slot) {
        let ours = slot.rt.lock().pid.take();
        self.cluster
            .stop_any(ours, read_pid(&self.pid_file), &self.name);
        let _ = std::fs::remove_file(&self.pid_file);
        slot.rt.lock().started = None;
    }

    /// The last `n` lines of the server log, for error messages.
    pub fn log_tail(&self, n: usize) -> String {
        super::log_tail(&self.cluster.log, n)
    }
}

/// Stops every one of these postgres servers, each under its slot's operation lock (daemon
/// shutdown: the next daemon starts the wanted ones again).
pub fn stop_all(slots: &Registry, servers: impl IntoIterator<Item = Managed>) {
    for m in servers {
        let st = slots.state(&m.name);
        let _g = st.op.lock();
        m.stop(&st);
    }
}
