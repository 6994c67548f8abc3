//! Provisioning configuration: what turns a cloned data directory into the VDB's own primary
//! (see [`configure`]), the cut of the WAL at a staging snapshot's LSN, the provisioning start's
//! signal and recovery settings, and `postgres -C`'s check of the result.
//!
//! Invariants: every setting vdbfs manages is written to `postgresql.auto.conf` on each
//! provision, refresh and rewind (the user's `--set` values last, so they win); the WAL is cut
//! only at a position no page of the snapshot is newer than.

use super::{VdbDir, VdbRecord};
use crate::pg::{self, conf, RunFiles};
use crate::refuse;
use anyhow::Context;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Creates `STORE/vdbs/NAME/` (owner postgres, 0700) with its socket dir, pg_hba and pg_ident.
pub fn prepare_dir(dir: &VdbDir) -> anyhow::Result<()> {
    dir.create(
        "# vdbfs VDB access. The socket directory is 0700 (owner postgres): only root and the\n\
         # postgres OS user reach it. Over loopback TCP the source's passwords apply.\n\
         local all all trust\n\
         host all all 127.0.0.1/32 scram-sha-256\n\
         host all all ::1/128 scram-sha-256\n",
    )
}

/// Recovery settings vdbfs may have written (removed once the VDB is a primary).
const RECOVERY_KEYS: [&str; 7] = [
    "recovery_target_lsn",
    "recovery_target_inclusive",
    "recovery_target_action",
    "recovery_target_timeline",
    "restore_command",
    "hot_standby",
    "recovery_init_sync_method",
];

/// Makes a cloned data directory the VDB's primary: no standby or recovery state from its parent,
/// no replication slots, the VDB's port, sockets, access files and name, then the user's
/// settings.
///
/// The first start after this is a *provisioning start*: `standby.signal` with no upstream, so
/// postgres replays the WAL the snapshot holds (up to `target_lsn` when given, where it pauses:
/// a staging snapshot holds WAL received past its replay position), and the daemon then
/// promotes it (`pg_ctl promote`). Promotion writes an end-of-recovery record and checkpoints in
/// the background; plain crash recovery would wait for a full checkpoint first.
pub fn configure(
    rec: &VdbRecord,
    store: &Path,
    target: Option<&Target>,
    fresh_clone: bool,
) -> anyhow::Result<()> {
    let data = &rec.data_dir;
    let dir = rec.dir(store);
    if !data.join("PG_VERSION").exists() {
        refuse!(
            Invalid,
            "{} is not a PostgreSQL data directory (no PG_VERSION): the snapshot {} does not hold a database",
            data.display(),
            rec.parent
        );
    }
    pg::remove_run_files(data);
    for f in ["standby.signal", "recovery.signal"] {
        let _ = std::fs::remove_file(data.join(f));
    }
    if fresh_clone {
        // Slots copied with the data directory belong to the parent's replicas, not the VDB's;
        // left in place they would hold WAL forever.
        if let Ok(rd) = std::fs::read_dir(data.join("pg_replslot")) {
            for e in rd.flatten() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    if !data.join("postgresql.conf").exists() {
        conf::write_atomic(
            &data.join("postgresql.conf"),
            b"# created by vdbfs: the source kept its configuration outside the data directory\n",
            0o600,
        )?;
    }
    let s = |v: &str| Some(v.to_string());
    let mut settings = dir.own_settings(rec.port, format!("vdbfs-{}", rec.name));
    settings.extend([
        ("primary_conninfo", None),
        ("primary_slot_name", None),
        ("hot_standby_feedback", None),
        // A VDB must not archive into the source's archive, nor wait for the source's
        // synchronous standbys.
        ("archive_mode", s("off")),
        ("archive_command", None),
        ("synchronous_standby_names", s("")),
        ("wal_receiver_status_interval", None),
    ]);
    for k in RECOVERY_KEYS {
        settings.push((k, None));
    }
    let target = match target {
        Some(t) => match truncate_wal(data, t) {
            Ok(true) => None,
            Ok(false) => Some(t),
            Err(e) => {
                tracing::warn!(vdb = %rec.name, "cannot cut the WAL at {}: {e:#}; recovering to it instead", pg::lsn::format(t.lsn));
                Some(t)
            }
        },
        None => None,
    };
    if let Some(t) = target {
        // Stop before the first record at or past the LSN: exactly the snapshot's state.
        settings.extend([
            ("recovery_target_lsn", Some(pg::lsn::format(t.lsn))),
            ("recovery_target_inclusive", s("off")),
            ("recovery_target_action", s("pause")),
        ]);
    }
    // postgres fsyncs every file of a data directory it finds not shut down cleanly (1000+
    // FUSE fsyncs, half of a provision). A clone's files all come from a committed snapshot:
    // nothing to make durable, so syncfs (cheap) for this start only.
    settings.push(("recovery_init_sync_method", s("syncfs")));
    write_provision_signal(data)?;
    let user: Vec<(String, Option<String>)> = rec
        .settings
        .iter()
        .map(|(k, v)| (k.clone(), Some(v.clone())))
        .collect();
    settings.extend(user.iter().map(|(k, v)| (k.as_str(), v.clone())));
    conf::edit_auto_conf(data, &settings)
}

/// Where a clone of a staging snapshot must end its recovery: the standby's replay position
/// when the snapshot was taken, on its timeline.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    pub lsn: u64,
    pub timeline: u32,
}

/// Cuts the WAL in a cloned data directory at `t.lsn`: zeroes the rest of the segment holding
/// it and removes the later segments, so recovery ends exactly there (and promotion needs no
/// wait at a recovery target). Safe because a standby never writes a page past what it
/// replayed: no page in the snapshot is newer than `t.lsn`. Returns false, changing nothing,
/// when the segment is not there.
pub fn truncate_wal(data: &Path, t: &Target) -> anyhow::Result<bool> {
    use std::io::{Seek, SeekFrom, Write};
    let wal = data.join("pg_wal");
    let files: Vec<(String, PathBuf)> = std::fs::read_dir(&wal)
        .with_context(|| format!("cannot list {}", wal.display()))?
        .flatten()
        .map(|e| (e.file_name().to_string_lossy().to_string(), e.path()))
        .filter(|(name, _)| pg::lsn::parse_segment(name).is_some())
        .collect();
    // The segment size of this cluster is the size of its segment files.
    let Some(seg_size) = files
        .iter()
        .find_map(|(_, p)| std::fs::metadata(p).ok().map(|m| m.len()))
        .filter(|s| s.is_power_of_two() && *s >= 1 << 20)
    else {
        return Ok(false);
    };
    let segs: Vec<(u32, u64, PathBuf)> = files
        .into_iter()
        .filter_map(|(name, p)| {
            let (tli, no) = pg::lsn::parse_segment_sized(&name, seg_size)?;
            Some((tli, no, p))
        })
        .collect();
    let target_seg = t.lsn / seg_size;
    let offset = t.lsn % seg_size;
    let remove_later = |segs: &[(u32, u64, PathBuf)]| -> anyhow::Result<()> {
        for (_, no, p) in segs {
            if *no > target_seg {
                std::fs::remove_file(p)
                    .with_context(|| format!("cannot remove {}", p.display()))?;
            }
        }
        Ok(())
    };
    let Some((_, _, path)) = segs
        .iter()
        .find(|(tli, no, _)| *tli == t.timeline && *no == target_seg)
    else {
        // At a segment boundary the WAL may end with the previous segment (e.g. after the
        // backup's XLOG_SWITCH): nothing to zero.
        let prev = segs
            .iter()
            .any(|(tli, no, _)| *tli == t.timeline && *no + 1 == target_seg);
        if offset == 0 && prev {
            remove_later(&segs)?;
            return Ok(true);
        }
        return Ok(false);
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    f.seek(SeekFrom::Start(offset))?;
    let zeros = vec![0u8; 1 << 20];
    let mut left = seg_size - offset;
    while left > 0 {
        let n = left.min(zeros.len() as u64) as usize;
        f.write_all(&zeros[..n])?;
        left -= n as u64;
    }
    f.sync_all()?;
    remove_later(&segs)?;
    Ok(true)
}

/// The signal file of a provisioning start (see [`configure`]); postgres removes it when it is
/// promoted.
pub const PROVISION_SIGNAL: &str = "standby.signal";

pub fn write_provision_signal(data: &Path) -> anyhow::Result<()> {
    conf::write_atomic(&data.join(PROVISION_SIGNAL), b"", 0o600)
}

/// The recovery target of a pending provisioning start, if any.
pub fn pending_target(rec: &VdbRecord) -> Option<u64> {
    conf::read_auto_conf(&rec.data_dir)
        .get("recovery_target_lsn")
        .and_then(|v| pg::lsn::parse(v.trim_matches('\'')))
}

/// After the provisioning start: the VDB is a primary; its recovery settings go.
pub fn clear_recovery(rec: &VdbRecord) -> anyhow::Result<()> {
    // A key the user set with --set keeps the user's value.
    let user = |k: &str| {
        rec.settings
            .iter()
            .rev()
            .find(|(uk, _)| uk == k)
            .map(|(_, v)| v.clone())
    };
    let settings: Vec<(&str, Option<String>)> =
        RECOVERY_KEYS.iter().map(|k| (*k, user(k))).collect();
    conf::edit_auto_conf(&rec.data_dir, &settings)
}

/// Lets postgres check the configuration (`postgres -C port`): a bad `--set` value or an unknown
/// parameter is refused here, with postgres's own words, before anything starts.
pub fn check_config(rec: &VdbRecord) -> anyhow::Result<()> {
    let out = pg::run_unchecked(
        pg::as_postgres(&rec.install.bin("postgres"))
            .arg("-D")
            .arg(&rec.data_dir)
            .args(["-C", "port"]),
        Duration::from_secs(60),
        |_| {},
    )?;
    if !out.status.success() {
        let text = out.stderr_text();
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                l.split_once("] ")
                    .map_or(l, |(_, rest)| rest)
                    .trim_start_matches("postgres: ")
            })
            .collect();
        refuse!(
            Invalid,
            "postgres refuses the VDB's configuration:\n{}",
            pg::last_lines(&lines.join("\n"), 8)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wal_is_cut_exactly_at_the_target() {
        let dir = tempfile::tempdir().unwrap();
        let wal = dir.path().join("pg_wal");
        std::fs::create_dir(&wal).unwrap();
        let seg = 1u64 << 20; // a cluster made with --wal-segsize=1
        for (name, fill) in [
            ("000000010000000000000001", 1u8),
            ("000000010000000000000002", 2),
            ("000000010000000000000003", 3),
            ("00000001.history", 9),
        ] {
            let len = if name.ends_with("history") { 10 } else { seg };
            std::fs::write(wal.join(name), vec![fill; len as usize]).unwrap();
        }
        let t = Target {
            lsn: 2 * seg + 0x1238,
            timeline: 1,
        };
        assert!(truncate_wal(dir.path(), &t).unwrap());
        let two = std::fs::read(wal.join("000000010000000000000002")).unwrap();
        assert_eq!(two.len() as u64, seg, "the segment keeps its size");
        assert!(
            two[..0x1238].iter().all(|b| *b == 2),
            "WAL before the target is kept"
        );
        assert!(
            two[0x1238..].iter().all(|b| *b == 0),
            "WAL from the target on is zero"
        );
        assert!(std::fs::read(wal.join("000000010000000000000001"))
            .unwrap()
            .iter()
            .all(|b| *b == 1));
        assert!(
            !wal.join("000000010000000000000003").exists(),
            "later segments go"
        );
        assert!(wal.join("00000001.history").exists());
        // At a segment boundary whose segment was never written: nothing to zero, still cut.
        let boundary = Target {
            lsn: 3 * seg,
            timeline: 1,
        };
        assert!(truncate_wal(dir.path(), &boundary).unwrap());
        assert!(wal.join("000000010000000000000002").exists());
        // Another timeline's segment is not touched: nothing to cut, nothing changed.
        let other = Target {
            lsn: 2 * seg,
            timeline: 2,
        };
        assert!(!truncate_wal(dir.path(), &other).unwrap());
        assert!(wal.join("000000010000000000000002").exists());
    }
}
