//! How long a VDB lives: `vdb create --ttl 8h` (deleted that long after its creation or its last
//! `vdb extend`), `--idle-ttl 2h` (deleted after no client was connected for that long; default
//! `serve --default-idle-ttl`), `vdb protect` (neither applies), `vdb extend NAME 8h` (due that
//! long from now, and the idle clock starts again).
//!
//! The daemon asks [`VdbService::due`] once a second and deletes what it returns, as a `vdb
//! delete` (logged, with its snapshots).
//!
//! The idle clock (when a client was last seen) is kept in the store (`LastClients`, table
//! `vdb_last_client`) so a daemon restart does not start it again: a VDB left idle is deleted on
//! the schedule it had, the daemon's downtime counting as idle time. It is written rarely: when
//! it starts (create, `vdb extend`, `vdb protect`, the first time a daemon sees a VDB with no
//! stored time), when it moved by [`SAVE_AFTER`] or more, and at shutdown ([`VdbService::save_idle_clock`]).
//!
//! Invariants: a protected VDB is never due; a VDB with an operation in flight (`pending`) is
//! never due; the stored time is never later than the clock in memory, and after a clean
//! shutdown equal to it (after a crash it can be up to [`SAVE_AFTER`] behind: such a VDB may be
//! due that much early); a failed write is logged and leaves the clock in memory as it is.

use super::service::VdbService;
use super::VdbRecord;
use crate::store::records::LastClients;
use anyhow::Context;
use std::collections::HashMap;
use std::time::Duration;

/// A VDB's lifetime, as recorded.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Lifetime {
    /// Unix seconds when it is deleted (`--ttl`, `vdb extend`).
    pub expires: Option<i64>,
    /// Deleted after no client was connected for this long.
    pub idle_ttl_secs: Option<u64>,
    /// `vdb protect`: neither applies.
    pub protected: bool,
}

/// How far the idle clock in memory may run ahead of the stored one before it is written.
pub const SAVE_AFTER: i64 = 60;

/// When each VDB last had a client (unix seconds), as the daemon saw it, and what is stored.
#[derive(Default)]
pub struct IdleClock {
    seen: parking_lot::Mutex<HashMap<String, Seen>>,
    /// Where the clock is kept across restarts (None: in memory only).
    stored: Option<LastClients>,
}

#[derive(Clone, Copy)]
struct Seen {
    at: i64,
    /// What the store holds for this VDB.
    stored: Option<i64>,
}

impl IdleClock {
    /// The clock as the store kept it (a restart goes on from there).
    pub fn load(stored: LastClients) -> anyhow::Result<IdleClock> {
        let seen = stored
            .list()
            .context("cannot read the VDBs' idle clocks")?
            .into_iter()
            .map(|(name, at)| {
                (
                    name,
                    Seen {
                        at,
                        stored: Some(at),
                    },
                )
            })
            .collect();
        Ok(IdleClock {
            seen: parking_lot::Mutex::new(seen),
            stored: Some(stored),
        })
    }

    /// The VDB had a client now; stored when the stored time is [`SAVE_AFTER`] old.
    pub fn touch(&self, name: &str, now: i64) {
        self.set(name, now, false);
    }

    /// The VDB's clock starts again now (create, extend, protect); stored at once.
    pub fn restart(&self, name: &str, now: i64) {
        self.set(name, now, true);
    }

    fn set(&self, name: &str, now: i64, save: bool) {
        let save = {
            let mut seen = self.seen.lock();
            let e = seen.entry(name.to_string()).or_insert(Seen {
                at: now,
                stored: None,
            });
            e.at = now;
            save || e.stored.is_none_or(|s| now - s >= SAVE_AFTER)
        };
        if save {
            self.save(&[(name.to_string(), now)]);
        }
    }

    /// When the VDB last had a client; a VDB the clock does not know starts it now.
    fn since(&self, name: &str, now: i64) -> i64 {
        if let Some(s) = self.seen.lock().get(name) {
            return s.at;
        }
        self.set(name, now, true);
        now
    }

    pub fn forget(&self, name: &str) {
        self.seen.lock().remove(name);
        if let Some(t) = &self.stored {
            if let Err(e) = t.remove(name) {
                tracing::warn!(vdb = %name, "cannot remove the idle clock of VDB {name}: {e}");
            }
        }
    }

    /// Writes what moved since it was stored (at shutdown).
    pub fn save_all(&self) {
        let moved: Vec<(String, i64)> = self
            .seen
            .lock()
            .iter()
            .filter(|(_, s)| s.stored != Some(s.at))
            .map(|(n, s)| (n.clone(), s.at))
            .collect();
        if !moved.is_empty() {
            self.save(&moved);
        }
    }

    fn save(&self, times: &[(String, i64)]) {
        let Some(t) = &self.stored else { return };
        match t.set(times) {
            Ok(()) => {
                let mut seen = self.seen.lock();
                for (name, at) in times {
                    if let Some(s) = seen.get_mut(name) {
                        s.stored = Some(s.stored.map_or(*at, |old| old.max(*at)));
                    }
                }
            }
            Err(e) => tracing::warn!(
                "cannot store the idle clock of {} VDB(s) (a restart may start it again): {e}",
                times.len()
            ),
        }
    }
}

/// Client connections to a running VDB (not counting the one asking).
fn clients(svc: &VdbService, rec: &VdbRecord) -> anyhow::Result<u64> {
    let rows = rec.cluster(&svc.store_dir).query(
        "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' \
         AND pid <> pg_backend_pid()",
        Duration::from_secs(10),
    )?;
    Ok(rows
        .first()
        .and_then(|r| r.first().cloned().flatten())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0))
}

impl VdbService {
    /// When the VDB will be deleted (unix seconds), if ever: the earlier of its TTL and its idle
    /// deadline.
    pub fn expires_at(&self, rec: &VdbRecord, now: i64) -> Option<i64> {
        if rec.lifetime.protected {
            return None;
        }
        let idle = rec
            .lifetime
            .idle_ttl_secs
            .map(|s| self.idle.since(&rec.name, now) + s as i64);
        match (rec.lifetime.expires, idle) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The VDBs due for deletion now, with why. Running VDBs with clients have their idle clock
    /// reset first.
    pub fn due(&self, now: i64) -> Vec<(String, String)> {
        let Ok(recs) = self.records() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for rec in recs {
            if rec.lifetime.protected || rec.pending.is_some() {
                continue;
            }
            if rec.lifetime.idle_ttl_secs.is_some() && rec.running {
                match clients(self, &rec) {
                    Ok(n) if n > 0 => self.idle.touch(&rec.name, now),
                    Ok(_) => {}
                    // Cannot tell: not idle as far as we know.
                    Err(_) => self.idle.touch(&rec.name, now),
                }
            }
            if let Some(e) = rec.lifetime.expires.filter(|e| *e <= now) {
                out.push((
                    rec.name.clone(),
                    format!("its TTL ran out at {}", crate::time::rfc3339(e)),
                ));
                continue;
            }
            if let Some(idle) = rec.lifetime.idle_ttl_secs {
                let since = self.idle.since(&rec.name, now);
                if now - since >= idle as i64 {
                    out.push((
                        rec.name.clone(),
                        format!(
                            "no client was connected for {} s (its idle TTL is {idle} s)",
                            now - since
                        ),
                    ));
                }
            }
        }
        out
    }

    /// Stores the idle clock as it is (at shutdown), so the next daemon goes on from here.
    pub fn save_idle_clock(&self) {
        self.idle.save_all();
    }

    /// `vdb protect NAME` (or `--off`).
    pub fn protect(&self, name: &str, on: bool) -> anyhow::Result<String> {
        self.change_lifetime(name, |l| l.protected = on)?;
        self.idle.restart(name, crate::time::now_unix());
        Ok(if on {
            format!("VDB {name} is protected: no TTL or idle TTL deletes it")
        } else {
            format!("VDB {name} is no longer protected")
        })
    }

    /// `vdb extend NAME BY`: due `by` from now; the idle clock starts again.
    pub fn extend(&self, name: &str, by: &str) -> anyhow::Result<String> {
        let d = crate::time::parse_interval(by, "vdb extend")?;
        let now = crate::time::now_unix();
        let until = now + d.as_secs() as i64;
        let rec = self.record(name)?;
        if rec.lifetime.expires.is_none() && rec.lifetime.idle_ttl_secs.is_none() {
            crate::refuse!(
                Conflict,
                "VDB {name} has no TTL or idle TTL to extend (it lives until deleted)"
            );
        }
        self.change_lifetime(name, |l| {
            if l.expires.is_some() {
                l.expires = Some(until);
            }
        })?;
        self.idle.restart(name, now);
        Ok(format!(
            "VDB {name} extended: {}",
            match self.expires_at(&self.record(name)?, now) {
                Some(e) => format!("due at {}", crate::time::rfc3339(e)),
                None => "not due".into(),
            }
        ))
    }

    fn change_lifetime(&self, name: &str, f: impl FnOnce(&mut Lifetime)) -> anyhow::Result<()> {
        let st = self.slots.state(name);
        let _g = st.op.lock();
        let mut rec = self.record(name)?;
        f(&mut rec.lifetime);
        rec.dir(&self.store_dir).log_line(&format!(
            "lifetime: expires {}, idle TTL {}, protected {}",
            rec.lifetime
                .expires
                .map_or("never".into(), crate::time::rfc3339),
            rec.lifetime
                .idle_ttl_secs
                .map_or("none".into(), |s| format!("{s} s")),
            rec.lifetime.protected
        ));
        self.records.put(&rec)?;
        Ok(())
    }
}
