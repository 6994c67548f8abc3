//! The supervisor thread: at start, the operations a daemon that died cut short are undone
//! (half-made links rolled back, VDB creates removed, refreshes and rewinds put back); then,
//! once a second, dead staging standbys and wanted VDBs are started again (with backoff) and
//! due policy snapshots are taken.
//!
//! Invariant: the supervisor only try-locks an operation slot, so it never races a command.

use super::Daemon;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

impl Daemon {
    pub(super) fn supervisor(self: Arc<Self>) {
        self.sources.recover();
        self.vdbs.recover();
        let mut first = true;
        while !self.stopping.load(Ordering::Relaxed) {
            self.sources.supervise();
            self.vdbs.supervise();
            if first {
                // Tests (and operators) wait for this line: what a restart brings back has
                // been started (or tried) by now.
                tracing::info!("supervisor: first round done");
                first = false;
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    }
}
