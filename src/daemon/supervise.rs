//! The supervisor thread: at start, the operations a daemon that died cut short are undone
//! (half-made links rolled back, VDB creates removed, refreshes and rewinds put back); then,
//! once a second, dead staging standbys and wanted VDBs are started again (with backoff) and
//! due policy snapshots are taken.
//!
//! The archiver and preparer threads run here too, each at `nice` 10 (their own thread
//! priority; the postgres and pg_amcheck the preparer runs are niced as well).
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
        self.recovered.store(true, Ordering::SeqCst);
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

    /// Deletes the VDBs whose TTL or idle TTL ran out (`vdb::lifetime`), once a second, each
    /// as a `vdb delete` by "ttl" (logged and counted like any request).
    pub(super) fn expirer(self: Arc<Self>) {
        let caller = crate::auth::Caller {
            name: "ttl".into(),
            role: crate::api::Role::Admin,
        };
        while !self.stopping.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_secs(1));
            if !self.recovered.load(Ordering::SeqCst) {
                continue;
            }
            for (name, why) in self.vdbs.due(crate::time::now_unix()) {
                if self.stopping.load(Ordering::Relaxed) {
                    break;
                }
                tracing::info!(vdb = %name, "VDB {name} expired: {why}; deleting it");
                let say = |_: crate::api::ProgressLine| {};
                let cancel = crate::api::Cancel::new("an expiry is not cancelled");
                let r = self.respond_to(
                    &caller,
                    crate::api::Request::VdbDelete { name: name.clone() },
                    crate::api::Progress::new(&say, &cancel),
                );
                if !r.ok {
                    tracing::warn!(vdb = %name, "cannot delete the expired VDB {name}: {}", r.message);
                }
            }
        }
    }

    /// Copies the WAL files staging standbys and VDBs marked ready into the store's archive,
    /// twice a second, until every postgres stopped.
    pub(super) fn archiver(self: Arc<Self>) {
        lower_priority();
        while !self.archiving_done.load(Ordering::Relaxed) {
            self.sources.archive_round();
            self.vdbs.archive_round();
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Prepares (and verifies) source snapshots, one job at a time.
    pub(super) fn preparer(self: Arc<Self>) {
        lower_priority();
        // What a preparation cut short left is undone by the recovery first.
        while !self.recovered.load(Ordering::SeqCst) && !self.stopping.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(100));
        }
        while !self.stopping.load(Ordering::Relaxed) {
            if !self.sources.prepare_round() {
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
}

/// `nice` 10 for the calling thread (Linux: a thread's priority is its own).
fn lower_priority() {
    // SAFETY: gettid and setpriority take plain integers and touch no memory of ours.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, 10);
    }
}
