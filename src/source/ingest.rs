//! The first copy of a source into its staging data directory (pg_basebackup, or the user's own
//! backup), and the configuration that makes that copy a hot standby run by vdbfs.

use super::{SourceDir, SourceRecord};
use crate::api::Progress;
use crate::pg::RunFiles;
use crate::pg::{self, conf, Install};
use anyhow::Context;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// How long the initial copy may take.
const COPY_TIMEOUT: Duration = Duration::from_secs(6 * 3600);

/// A user's base backup, as pg_basebackup writes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackupFormat {
    /// A data directory (`-F plain`).
    Plain,
    /// `base.tar[.gz]` and optionally `pg_wal.tar[.gz]` (`-F tar`).
    Tar { base: PathBuf, wal: Option<PathBuf> },
}

fn find_tar(dir: &Path, stem: &str) -> Option<PathBuf> {
    ["tar", "tar.gz"]
        .iter()
        .map(|ext| dir.join(format!("{stem}.{ext}")))
        .find(|p| p.is_file())
}

impl BackupFormat {
    pub fn detect(dir: &Path) -> anyhow::Result<BackupFormat> {
        if !dir.is_dir() {
            crate::refuse!(
                Invalid,
                "backup directory {} does not exist; pass the directory pg_basebackup wrote",
                dir.display()
            );
        }
        if dir.join("PG_VERSION").is_file() && dir.join("global/pg_control").is_file() {
            let tblspc = std::fs::read_dir(dir.join("pg_tblspc"))
                .map(|r| r.count())
                .unwrap_or(0);
            if tblspc > 0 {
                crate::refuse!(
                    Invalid,
                    "backup {} has tablespaces outside the data directory; vdbfs links sources \
                     without extra tablespaces only",
                    dir.display()
                );
            }
            return Ok(BackupFormat::Plain);
        }
        if let Some(base) = find_tar(dir, "base") {
            let others = std::fs::read_dir(dir)?
                .flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .filter(|n| {
                    n.chars().next().is_some_and(|c| c.is_ascii_digit()) && n.contains(".tar")
                })
                .count();
            if others > 0 {
                crate::refuse!(
                    Invalid,
                    "backup {} has tablespace archives; vdbfs links sources without extra \
                     tablespaces only",
                    dir.display()
                );
            }
            return Ok(BackupFormat::Tar {
                base,
                wal: find_tar(dir, "pg_wal"),
            });
        }
        crate::refuse!(
            Invalid,
            "{} is not a base backup: expected a data directory (PG_VERSION, global/pg_control) \
             or pg_basebackup's tar format (base.tar or base.tar.gz)",
            dir.display()
        )
    }

    /// The PostgreSQL major version the backup was taken from.
    pub fn major(&self, dir: &Path) -> anyhow::Result<u32> {
        let text = match self {
            BackupFormat::Plain => std::fs::read_to_string(dir.join("PG_VERSION"))?,
            BackupFormat::Tar { base, .. } => {
                let out = pg::run(
                    Command::new("tar").arg("-xOf").arg(base).arg("PG_VERSION"),
                    Duration::from_secs(600),
                )
                .with_context(|| format!("cannot read PG_VERSION from {}", base.display()))?;
                out.stdout_text()
            }
        };
        text.trim()
            .parse()
            .with_context(|| format!("backup {} has an unreadable PG_VERSION", dir.display()))
    }
}

/// `pg_basebackup` from the source into `data_dir`, WAL streamed over `slot`. While it runs its
/// PID is kept in `pid_file` (see [`stop_leftover_copy`]).
pub fn basebackup(
    install: &Install,
    conninfo: &str,
    slot: &str,
    data_dir: &Path,
    label: &str,
    pid_file: &Path,
    progress: Progress,
) -> anyhow::Result<()> {
    let mut last: Option<std::time::Instant> = None;
    pg::run_recorded(
        pg::as_postgres(&install.bin("pg_basebackup"))
            .arg("-D")
            .arg(data_dir)
            .args([
                "-X", "stream", "-S", slot, "-c", "fast", "-P", "-w", "-l", label, "-d",
            ])
            .arg(conninfo),
        COPY_TIMEOUT,
        pid_file,
        |line| {
            // At most one progress line a second.
            if let Some((done, total)) = copy_progress(line) {
                if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                    last = Some(std::time::Instant::now());
                    progress.copied(format!("pg_basebackup: {}", line.trim()), done, total);
                }
            }
        },
    )
    .map(|_| ())
    .map_err(|e| anyhow::anyhow!("pg_basebackup from the source failed: {e:#}"))
}

/// Stops a `pg_basebackup` that a daemon which died left running (it would hold the replication
/// slot, and keep writing into a mount that is gone, until it ends by itself).
pub fn stop_leftover_copy(pid_file: &Path) {
    pg::stop_recorded(pid_file, "pg_basebackup");
}

/// pg_basebackup's `-P` line "123456/234567 kB (52%), 0/1 tablespace" -> (done, total) kB.
fn copy_progress(line: &str) -> Option<(u64, u64)> {
    let (counts, _) = line.trim().split_once(" kB (")?;
    let (done, total) = counts.split_once('/')?;
    Some((done.trim().parse().ok()?, total.trim().parse().ok()?))
}

/// Copies a user's backup into `data_dir` (owned by postgres afterwards).
pub fn import_backup(
    install: &Install,
    backup: &Path,
    data_dir: &Path,
    progress: Progress,
) -> anyhow::Result<()> {
    let format = BackupFormat::detect(backup)?;
    match &format {
        BackupFormat::Plain => {
            if backup.join("backup_manifest").is_file() {
                progress.say(format!(
                    "verifying {} against its backup_manifest",
                    backup.display()
                ));
                pg::run(
                    Command::new(install.bin("pg_verifybackup"))
                        .args(["-n", "-q"])
                        .arg(backup),
                    COPY_TIMEOUT,
                )
                .with_context(|| {
                    format!(
                        "the backup {} does not match its manifest",
                        backup.display()
                    )
                })?;
            }
            progress.say(format!("copying the backup {}", backup.display()));
            let mut src = backup.as_os_str().to_owned();
            src.push("/.");
            pg::run(
                Command::new("cp").arg("-a").arg(&src).arg(data_dir),
                COPY_TIMEOUT,
            )?;
        }
        BackupFormat::Tar { base, wal } => {
            progress.say(format!("extracting {}", base.display()));
            pg::run(
                Command::new("tar")
                    .arg("-xf")
                    .arg(base)
                    .arg("-C")
                    .arg(data_dir),
                COPY_TIMEOUT,
            )?;
            if let Some(wal) = wal {
                let dst = data_dir.join("pg_wal");
                std::fs::create_dir_all(&dst)?;
                pg::run(
                    Command::new("tar").arg("-xf").arg(wal).arg("-C").arg(&dst),
                    COPY_TIMEOUT,
                )?;
            }
        }
    }
    let (uid, gid) = pg::postgres_ids()?;
    pg::run(
        Command::new("chown")
            .arg("-R")
            .arg(format!("{uid}:{gid}"))
            .arg(data_dir),
        COPY_TIMEOUT,
    )?;
    // cp -a gave the data directory the backup directory's mode; postgres wants 0700.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(data_dir, std::fs::Permissions::from_mode(0o700))?;
    Ok(())
}

fn write_postgres_file(path: &Path, text: &str, mode: u32) -> anyhow::Result<()> {
    conf::write_atomic(path, text.as_bytes(), mode)
}

/// Creates `STORE/sources/NAME/` (owner postgres, 0700) with the passfile, socket dir and the
/// staging cluster's pg_hba/pg_ident (local connections of the postgres user only).
pub fn prepare_source_dir(dir: &SourceDir, password_file: Option<&str>) -> anyhow::Result<()> {
    dir.create(
        "# vdbfs staging: only the postgres OS user, over the private socket directory\n\
         local all postgres trust\n",
    )?;
    if let Some(text) = password_file {
        write_postgres_file(&dir.passfile(), text, 0o600)?;
    }
    crate::archive::make_ack_dir(&dir.wal_acks())
}

/// The staging standby's archiving: every file it receives or restores goes into the store's
/// WAL archive (`archive_mode=always`, an `archive_command` that waits for the daemon's
/// acknowledgement), never anywhere else.
pub fn archive_settings(rec: &SourceRecord, store: &Path) -> Vec<(&'static str, Option<String>)> {
    vec![
        ("archive_mode", Some("always".into())),
        (
            "archive_command",
            Some(crate::archive::archive_command(&rec.dir(store).wal_acks())),
        ),
        ("archive_library", None),
    ]
}

/// Makes a copied data directory a hot standby of the source run by vdbfs.
/// (It archives into the store only: see [`archive_settings`].)
pub fn configure_staging(rec: &SourceRecord, store: &Path) -> anyhow::Result<()> {
    let data = &rec.data_dir;
    let dir = rec.dir(store);
    pg::remove_run_files(data);
    let _ = std::fs::remove_file(data.join("recovery.signal"));
    // Slots copied with a data directory are the source's, not ours.
    if let Ok(rd) = std::fs::read_dir(data.join("pg_replslot")) {
        for e in rd.flatten() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
    write_postgres_file(&data.join("standby.signal"), "", 0o600)?;
    if !data.join("postgresql.conf").exists() {
        // Debian keeps the configuration in /etc: the copy has none. postgres needs the file.
        write_postgres_file(
            &data.join("postgresql.conf"),
            "# created by vdbfs: the source kept its configuration outside the data directory\n",
            0o600,
        )?;
    }
    // A hot standby needs these at least as high as the primary had them.
    let out = pg::run(
        pg::as_postgres(&rec.install.bin("pg_controldata")).arg(data),
        Duration::from_secs(60),
    )?;
    let control = conf::parse_controldata(&out.stdout_text());
    let mut settings: Vec<(&str, Option<String>)> = conf::STANDBY_MINIMUMS
        .iter()
        .filter_map(|(k, label)| control.get(*label).map(|v| (*k, Some(v.clone()))))
        .collect();
    let primary_conninfo = rec.conn.as_ref().filter(|_| rec.mode.streams()).map(|c| {
        c.libpq(
            rec.passfile(store).as_deref(),
            &[("application_name", &format!("vdbfs_{}", rec.name))],
        )
    });
    let restore_command = rec.archive.as_ref().map(|a| {
        let a = a.to_string_lossy().replace('\'', "'\\''");
        format!("cp '{a}/%f' '%p'")
    });
    let s = |v: &str| Some(v.to_string());
    settings.extend(dir.own_settings(rec.staging_port, format!("vdbfs-staging-{}", rec.name)));
    settings.extend([
        ("hot_standby", s("on")),
        ("hot_standby_feedback", s("off")),
        ("shared_buffers", s("128MB")),
        ("recovery_target_timeline", s("latest")),
        ("primary_conninfo", primary_conninfo),
        (
            "primary_slot_name",
            rec.slot.clone().filter(|_| rec.mode.streams()),
        ),
        ("restore_command", restore_command),
        ("wal_receiver_status_interval", s("1s")),
    ]);
    settings.extend(archive_settings(rec, store));
    conf::edit_auto_conf(data, &settings)
}

#[cfg(test)]
mod tests {
    #[test]
    fn basebackup_progress_lines_give_kilobytes() {
        assert_eq!(
            super::copy_progress("123456/234567 kB (52%), 0/1 tablespace"),
            Some((123_456, 234_567))
        );
        assert_eq!(
            super::copy_progress("  5/10 kB (50%), 1/1 tablespace (/x/base)"),
            Some((5, 10))
        );
        assert_eq!(super::copy_progress("waiting for checkpoint"), None);
    }
}
