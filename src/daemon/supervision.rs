//! What the daemon keeps in memory about each postgres it supervises (staging standbys and
//! VDBs): one operation at a time per name, the PID it started, and the pacing of restarts.
//!
//! Invariants: an operation on a cluster holds its `op` lock for its whole length; the
//! supervisor only try-locks it, so it never races a user's command. Nothing here is persisted:
//! a new daemon starts with no PID of its own (a postmaster it finds is a leftover).

use parking_lot::Mutex;
use std::collections::BTreeMap;
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
