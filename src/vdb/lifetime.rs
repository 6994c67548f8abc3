//! How long a VDB lives: `vdb create --ttl 8h` (deleted that long after its creation or its last
//! `vdb extend`), `--idle-ttl 2h` (deleted after no client was connected for that long; default
//! `serve --default-idle-ttl`), `vdb protect` (neither applies), `vdb extend NAME 8h` (due that
//! long from now, and the idle clock starts again).
//!
//! The daemon asks [`VdbService::due`] once a second and deletes what it returns, as a `vdb
//! delete` (logged, with its snapshots).
//!
//! Invariants: a protected VDB is never due; the idle clock lives in the daemon's memory (a
//! restart starts it again: a VDB is never deleted for idleness the daemon did not see); a VDB
//! with an operation in flight (`pending`) is never due.

use super::service::VdbService;
use super::VdbRecord;
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

/// When each VDB last had a client (unix seconds), as the daemon saw it.
#[derive(Default)]
pub struct IdleClock(parking_lot::Mutex<HashMap<String, i64>>);

impl IdleClock {
    /// The VDB had a client (or its clock starts) now.
    pub fn touch(&self, name: &str, now: i64) {
        self.0.lock().insert(name.to_string(), now);
    }

    fn since(&self, name: &str, now: i64) -> i64 {
        *self.0.lock().entry(name.to_string()).or_insert(now)
    }

    pub fn forget(&self, name: &str) {
        self.0.lock().remove(name);
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

    /// `vdb protect NAME` (or `--off`).
    pub fn protect(&self, name: &str, on: bool) -> anyhow::Result<String> {
        self.change_lifetime(name, |l| l.protected = on)?;
        self.idle.touch(name, crate::time::now_unix());
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
        self.idle.touch(name, now);
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
