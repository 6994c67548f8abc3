//! `/metrics` of the HTTP API, in Prometheus' text format (version 0.0.4): sources (lag,
//! last snapshot age, its prepared and verified state), VDBs (state, unique bytes, age), the
//! store (physical and live bytes, free space), every control operation's count and duration by
//! outcome, and the runs and durations of gc and of the background checkpoints.
//!
//! Invariant: a scrape only reads (the same lists `source list`, `vdb list` and `df` show);
//! label values are escaped as the format requires.

use super::Daemon;
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::fmt::Write;

/// The oldest space accounting a scrape may report (see `Datasets::accounting_within`).
const ACCOUNTING_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(300);

/// (op, outcome: "ok" or the error kind).
type OpKey = (&'static str, &'static str);

/// Control operations answered: (op, outcome) -> (count, seconds); and the store's
/// maintenance runs (gc, checkpoint): (job, trigger, outcome) -> (count, seconds, last seconds).
#[derive(Default)]
pub(super) struct Ops(
    Mutex<BTreeMap<OpKey, (u64, f64)>>,
    Mutex<BTreeMap<JobKey, (u64, f64, f64)>>,
);

/// (job: "gc" or "checkpoint", trigger: "background" or "command", outcome: "ok" or "error").
type JobKey = (&'static str, &'static str, &'static str);

impl Ops {
    pub(super) fn count(&self, op: &'static str, outcome: &'static str, secs: f64) {
        let mut m = self.0.lock();
        let e = m.entry((op, outcome)).or_default();
        e.0 += 1;
        e.1 += secs;
    }

    /// Runs one gc or checkpoint (`job`) and counts it with its duration.
    pub(super) fn time<T, E>(
        &self,
        job: &'static str,
        trigger: &'static str,
        run: impl FnOnce() -> Result<T, E>,
    ) -> Result<T, E> {
        let t = std::time::Instant::now();
        let r = run();
        let secs = t.elapsed().as_secs_f64();
        let outcome = if r.is_ok() { "ok" } else { "error" };
        let mut m = self.1.lock();
        let e = m.entry((job, trigger, outcome)).or_default();
        e.0 += 1;
        e.1 += secs;
        e.2 = secs;
        r
    }
}

/// A label value as the text format wants it: backslash, double quote and newline escaped.
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn age_secs(rfc3339: &str, now: i64) -> Option<f64> {
    rfc3339
        .parse::<jiff::Timestamp>()
        .ok()
        .map(|t| (now - t.as_second()).max(0) as f64)
}

/// Writes one metric family: its help and type, then its samples.
fn family(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(String, f64)]) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, v) in samples {
        if labels.is_empty() {
            let _ = writeln!(out, "{name} {v}");
        } else {
            let _ = writeln!(out, "{name}{{{labels}}} {v}");
        }
    }
}

impl Daemon {
    /// The whole scrape.
    pub(super) fn metrics_text(&self) -> anyhow::Result<String> {
        let now = crate::time::now_unix();
        let mut out = String::new();
        let sources = self.sources.list()?;
        let per_source = |f: &dyn Fn(&crate::api::SourceStatus) -> Option<f64>| {
            sources
                .iter()
                .filter_map(|s| f(s).map(|v| (format!("source=\"{}\"", esc(&s.name)), v)))
                .collect::<Vec<_>>()
        };
        family(
            &mut out,
            "vdbfs_source_lag_bytes",
            "gauge",
            "WAL the staging standby has not replayed yet",
            &per_source(&|s| s.lag_bytes.map(|b| b as f64)),
        );
        family(
            &mut out,
            "vdbfs_source_lag_seconds",
            "gauge",
            "How far the staging standby's replay is behind the source",
            &per_source(&|s| s.lag_seconds),
        );
        family(
            &mut out,
            "vdbfs_source_last_snapshot_age_seconds",
            "gauge",
            "Seconds since the source's last snapshot",
            &per_source(&|s| {
                s.last_snapshot
                    .as_ref()
                    .and_then(|l| age_secs(&l.created, now))
            }),
        );
        family(
            &mut out,
            "vdbfs_source_last_snapshot_prepared",
            "gauge",
            "1 when the source's last snapshot has a ready prepared image",
            &per_source(&|s| {
                s.last_snapshot.as_ref().map(|l| {
                    f64::from(u8::from(
                        l.marks.prepared == Some(crate::api::PrepState::Ready),
                    ))
                })
            }),
        );
        family(
            &mut out,
            "vdbfs_source_last_snapshot_verified",
            "gauge",
            "1 when the source's last snapshot passed pg_amcheck",
            &per_source(&|s| {
                s.last_snapshot.as_ref().map(|l| {
                    f64::from(u8::from(
                        l.marks.verified == Some(crate::api::VerifyState::Ok),
                    ))
                })
            }),
        );
        family(
            &mut out,
            "vdbfs_source_up",
            "gauge",
            "1 when the source is syncing",
            &per_source(&|s| {
                Some(f64::from(u8::from(
                    s.state == crate::api::SourceState::Syncing,
                )))
            }),
        );
        // Space figures come from an accounting up to 5 minutes old: on a large store one costs
        // seconds of CPU, which a scrape every 15 s must not pay each time.
        let vdbs = self.vdbs.list_within(ACCOUNTING_MAX_AGE)?;
        let states = [
            crate::api::VdbState::Creating,
            crate::api::VdbState::Starting,
            crate::api::VdbState::Running,
            crate::api::VdbState::Stopped,
            crate::api::VdbState::Fault,
        ];
        let mut state_samples = Vec::new();
        for v in &vdbs {
            for st in states {
                state_samples.push((
                    format!("vdb=\"{}\",state=\"{st}\"", esc(&v.name)),
                    f64::from(u8::from(v.state == st)),
                ));
            }
        }
        family(
            &mut out,
            "vdbfs_vdb_state",
            "gauge",
            "1 for the state each VDB is in",
            &state_samples,
        );
        let per_vdb = |f: &dyn Fn(&crate::api::VdbStatus) -> Option<f64>| {
            vdbs.iter()
                .filter_map(|v| f(v).map(|x| (format!("vdb=\"{}\"", esc(&v.name)), x)))
                .collect::<Vec<_>>()
        };
        family(
            &mut out,
            "vdbfs_vdb_unique_bytes",
            "gauge",
            "Bytes only this VDB holds",
            &per_vdb(&|v| Some(v.unique_bytes as f64)),
        );
        family(
            &mut out,
            "vdbfs_vdb_age_seconds",
            "gauge",
            "Seconds since the VDB was created",
            &per_vdb(&|v| age_secs(&v.created, now)),
        );
        let (u, age) = self.datasets.usage_within(ACCOUNTING_MAX_AGE)?;
        family(
            &mut out,
            "vdbfs_store_accounting_age_seconds",
            "gauge",
            "Age of the space accounting the usage figures come from (made again at most every 5 minutes for scrapes)",
            &[(String::new(), age.as_secs_f64())],
        );
        family(
            &mut out,
            "vdbfs_store_physical_bytes",
            "gauge",
            "Bytes the store's pack files take",
            &[(String::new(), u.physical_bytes as f64)],
        );
        family(
            &mut out,
            "vdbfs_store_live_stored_bytes",
            "gauge",
            "Stored (compressed) bytes of the blocks something references",
            &[(String::new(), u.live_stored_bytes as f64)],
        );
        family(
            &mut out,
            "vdbfs_store_logical_bytes",
            "gauge",
            "Bytes of the blocks something references, before compression and dedup",
            &[(String::new(), u.referenced_raw_bytes as f64)],
        );
        if let Ok(sp) = self.datasets.store().space_report() {
            family(
                &mut out,
                "vdbfs_store_free_bytes",
                "gauge",
                "Free bytes on the filesystem under the store",
                &[(String::new(), sp.free as f64)],
            );
            family(
                &mut out,
                "vdbfs_store_full",
                "gauge",
                "1 while writes to datasets are refused for lack of space",
                &[(String::new(), f64::from(u8::from(sp.full)))],
            );
        }
        let ops = self.metrics.0.lock().clone();
        let label = |op: &str, outcome: &str| format!("op=\"{op}\",outcome=\"{outcome}\"");
        family(
            &mut out,
            "vdbfs_operations_total",
            "counter",
            "Control operations answered, by operation and outcome (ok or the error kind)",
            &ops.iter()
                .map(|((op, o), (n, _))| (label(op, o), *n as f64))
                .collect::<Vec<_>>(),
        );
        family(
            &mut out,
            "vdbfs_operation_seconds_total",
            "counter",
            "Seconds spent on control operations, by operation and outcome",
            &ops.iter()
                .map(|((op, o), (_, s))| (label(op, o), *s))
                .collect::<Vec<_>>(),
        );
        let jobs = self.metrics.1.lock().clone();
        for (job, what) in [
            (
                "gc",
                "garbage collections (background every 10 min, or the gc command)",
            ),
            (
                "checkpoint",
                "background checkpoints of the store's indexes",
            ),
        ] {
            let label = |t: &str, o: &str| format!("trigger=\"{t}\",outcome=\"{o}\"");
            let mine = || jobs.iter().filter(|((j, _, _), _)| *j == job);
            family(
                &mut out,
                &format!("vdbfs_{job}_runs_total"),
                "counter",
                &format!("Runs of {what}, by trigger and outcome"),
                &mine()
                    .map(|((_, t, o), (n, _, _))| (label(t, o), *n as f64))
                    .collect::<Vec<_>>(),
            );
            family(
                &mut out,
                &format!("vdbfs_{job}_seconds_total"),
                "counter",
                &format!("Seconds spent in {what}, by trigger and outcome"),
                &mine()
                    .map(|((_, t, o), (_, s, _))| (label(t, o), *s))
                    .collect::<Vec<_>>(),
            );
            family(
                &mut out,
                &format!("vdbfs_{job}_last_seconds"),
                "gauge",
                &format!("Duration of the last of the {what}, by trigger and outcome"),
                &mine()
                    .map(|((_, t, o), (_, _, l))| (label(t, o), *l))
                    .collect::<Vec<_>>(),
            );
        }
        Ok(out)
    }
}
