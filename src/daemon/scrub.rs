//! Scrubs as the daemon runs them: `vdbfs scrub` (the request waits for the result, with
//! progress lines), the scheduled scrub (`serve --scrub-every`, default weekly, on its own
//! thread), one at a time; the running or last result for `vdbfs status`, the last one kept in
//! the index (`meta.last_scrub`) so the schedule survives restarts.

use super::Daemon;
use crate::api::{BadBlockReport, BlockReference, Progress, ScrubReport};
use crate::refuse;
use crate::tree::scrub::ScrubResult;
use std::sync::Arc;

/// Default bound of a scrub's reads, MiB/s: a background job, not a benchmark.
pub const DEFAULT_RATE_MIB: u64 = 64;
/// Key of the last scrub's report (JSON) in the index's `meta` table.
const LAST_SCRUB: &str = "last_scrub";

/// The scrub state of a daemon.
#[derive(Default)]
pub struct Scrubs {
    /// The running scrub, else the last one.
    pub report: parking_lot::Mutex<Option<ScrubReport>>,
    /// Held by the running scrub.
    pub running: parking_lot::Mutex<()>,
    /// Unix seconds when the schedule runs the next one (0: not scheduled).
    pub next: std::sync::atomic::AtomicI64,
}

fn report_of(r: &ScrubResult) -> Vec<BadBlockReport> {
    r.bad
        .iter()
        .map(|b| BadBlockReport {
            block: b.id.to_hex(),
            pack: b.pack,
            offset: b.offset,
            error: b.why.clone(),
            references: b
                .refs
                .iter()
                .map(|r| BlockReference {
                    roots: r.roots.clone(),
                    what: r.what.as_str().to_string(),
                    path: r.path.clone(),
                    inode: r.ino,
                    file_offset: r.file_offset,
                })
                .collect(),
        })
        .collect()
}

fn unix_of(rfc: &str) -> Option<i64> {
    rfc.parse::<jiff::Timestamp>().ok().map(|t| t.as_second())
}

impl Daemon {
    /// Reads the last scrub's report and plans the next scheduled one.
    pub(super) fn load_scrub_state(&self) {
        let last: Option<ScrubReport> = self
            .datasets
            .store()
            .meta_get(LAST_SCRUB)
            .ok()
            .flatten()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let now = crate::time::now_unix();
        if let Some(every) = self.scrub_every {
            let after = last
                .as_ref()
                .and_then(|l| l.finished.as_deref().and_then(unix_of))
                .unwrap_or(now);
            self.scrubs.next.store(
                after.saturating_add(every.as_secs() as i64),
                std::sync::atomic::Ordering::Relaxed,
            );
        }
        *self.scrubs.report.lock() = last;
    }

    /// When the next scheduled scrub runs, if scheduled.
    pub(super) fn next_scrub(&self) -> Option<String> {
        let n = self.scrubs.next.load(std::sync::atomic::Ordering::Relaxed);
        (self.scrub_every.is_some() && n > 0).then(|| crate::time::rfc3339(n))
    }

    /// Starts the scheduled scrub on its own thread when it is due.
    pub(super) fn scrub_if_due(self: &Arc<Self>) {
        let Some(every) = self.scrub_every else {
            return;
        };
        let next = self.scrubs.next.load(std::sync::atomic::Ordering::Relaxed);
        if crate::time::now_unix() < next {
            return;
        }
        self.scrubs.next.store(
            crate::time::now_unix().saturating_add(every.as_secs() as i64),
            std::sync::atomic::Ordering::Relaxed,
        );
        let d = self.clone();
        let spawned = std::thread::Builder::new()
            .name("scrub".into())
            .spawn(move || {
                let quiet = |_: crate::api::ProgressLine| {};
                let cancel = crate::api::Cancel::new("a scheduled scrub runs to its end");
                match d.scrub("schedule", DEFAULT_RATE_MIB, Progress::new(&quiet, &cancel)) {
                    Ok(r) if r.bad_blocks.is_empty() => tracing::info!(
                        blocks = r.blocks_checked,
                        bytes = r.bytes_checked,
                        "scheduled scrub: every live block verified"
                    ),
                    Ok(r) => tracing::error!(
                        bad = r.bad_blocks.len(),
                        "scheduled scrub found bad blocks; 'vdbfs status' lists them"
                    ),
                    Err(e) => tracing::warn!("scheduled scrub: {e:#}"),
                }
            });
        if let Err(e) = spawned {
            tracing::error!("cannot start the scheduled scrub: {e}");
        }
    }

    /// Runs a scrub now (refused while one runs) and returns its report.
    pub(super) fn scrub(
        &self,
        trigger: &str,
        rate_mib: u64,
        progress: Progress,
    ) -> anyhow::Result<ScrubReport> {
        let Some(_one) = self.scrubs.running.try_lock() else {
            let since = self
                .scrubs
                .report
                .lock()
                .as_ref()
                .map(|r| r.started.clone())
                .unwrap_or_default();
            refuse!(
                Busy,
                "a scrub is already running (since {since}); 'vdbfs status' shows how far it is \
                 and its result when it is done"
            );
        };
        let started = crate::time::rfc3339_now();
        let t0 = std::time::Instant::now();
        *self.scrubs.report.lock() = Some(ScrubReport {
            trigger: trigger.to_string(),
            started: started.clone(),
            finished: None,
            running: true,
            blocks_total: 0,
            blocks_checked: 0,
            bytes_checked: 0,
            seconds: 0.0,
            bad_blocks: Vec::new(),
            error: None,
        });
        progress.say(format!(
            "scrub: reading every live block back at most {rate_mib} MiB/s{}",
            if rate_mib == 0 { " (no bound)" } else { "" }
        ));
        let on_progress = |p: &crate::tree::scrub::Progress| {
            if let Some(r) = self.scrubs.report.lock().as_mut() {
                r.blocks_total = p.blocks_total;
                r.blocks_checked = p.blocks_done;
                r.bytes_checked = p.bytes_done;
                r.seconds = t0.elapsed().as_secs_f64();
            }
            progress.copied(
                format!(
                    "scrub: {} of {} blocks checked ({} bad so far)",
                    p.blocks_done, p.blocks_total, p.bad
                ),
                p.blocks_done,
                p.blocks_total.max(1),
            );
        };
        let result = self
            .datasets
            .scrub(rate_mib.saturating_mul(1 << 20), &on_progress);
        let report = match &result {
            Ok(r) => ScrubReport {
                trigger: trigger.to_string(),
                started,
                finished: Some(crate::time::rfc3339_now()),
                running: false,
                blocks_total: r.blocks,
                blocks_checked: r.blocks,
                bytes_checked: r.bytes,
                seconds: r.seconds,
                bad_blocks: report_of(r),
                error: None,
            },
            Err(e) => ScrubReport {
                trigger: trigger.to_string(),
                started,
                finished: Some(crate::time::rfc3339_now()),
                running: false,
                blocks_total: 0,
                blocks_checked: 0,
                bytes_checked: 0,
                seconds: t0.elapsed().as_secs_f64(),
                bad_blocks: Vec::new(),
                error: Some(e.to_string()),
            },
        };
        *self.scrubs.report.lock() = Some(report.clone());
        if let Ok(b) = serde_json::to_vec(&report) {
            if let Err(e) = self.datasets.store().meta_put(LAST_SCRUB, &b) {
                tracing::warn!("cannot record the scrub's result in the index: {e}");
            }
        }
        result?;
        Ok(report)
    }
}
