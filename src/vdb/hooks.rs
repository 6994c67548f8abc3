//! VDB hooks, as Delphix has them: executables named after an event in the VDB's hooks
//! directory (or the store-wide `STORE/hooks/`), run by the daemon with the VDB's name, data
//! directory, port and connection string in the environment.
//!
//! Invariants: a hook runs with a deadline ([`HOOK_TIMEOUT`]) and its output always lands in the
//! VDB log; a missing hook is not an error; a failing hook is an error that carries its output.

use super::{VdbDir, VdbRecord};
use crate::pg;
use crate::pg::RunFiles;
use crate::refuse;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

pub const HOOK_TIMEOUT: Duration = Duration::from_secs(600);

crate::api::words! {
    /// A hook: the event it is named after (the executable's file name).
    pub enum Hook {
        ConfigureClone = "configure-clone",
        PreStart = "pre-start",
        PostStart = "post-start",
        PreStop = "pre-stop",
        PostStop = "post-stop",
        PreSnapshot = "pre-snapshot",
        PostSnapshot = "post-snapshot",
        PreRefresh = "pre-refresh",
        PostRefresh = "post-refresh",
        PreRewind = "pre-rewind",
        PostRewind = "post-rewind",
    }
}

/// Every hook vdbfs runs, in no particular order.
pub const HOOKS: [Hook; 11] = [
    Hook::ConfigureClone,
    Hook::PreStart,
    Hook::PostStart,
    Hook::PreStop,
    Hook::PostStop,
    Hook::PreSnapshot,
    Hook::PostSnapshot,
    Hook::PreRefresh,
    Hook::PostRefresh,
    Hook::PreRewind,
    Hook::PostRewind,
];

/// The hooks directory in effect for a VDB.
pub fn hooks_dir(rec: &VdbRecord, store: &Path) -> Option<PathBuf> {
    rec.hooks
        .clone()
        .or_else(|| Some(store.join("hooks")).filter(|d| d.is_dir()))
}

/// Checks a `--hooks DIR` given by the user.
pub fn check_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if !dir.is_dir() {
        refuse!(
            Invalid,
            "--hooks {}: no such directory; create it with executables named after hooks ({})",
            dir.display(),
            HOOKS.map(Hook::as_str).join(", ")
        );
    }
    for e in std::fs::read_dir(dir)?.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if HOOKS.iter().any(|h| h.as_str() == name) {
            let mode = e.metadata()?.permissions().mode();
            if mode & 0o111 == 0 {
                refuse!(
                    Invalid,
                    "hook {} is not executable; chmod +x it",
                    e.path().display()
                );
            }
        }
    }
    Ok(())
}

/// Runs hook `name` of the VDB if it exists. Ok(()) when it is absent or succeeded; an error
/// with its output when it failed or ran too long.
pub fn run(rec: &VdbRecord, store: &Path, hook: Hook) -> anyhow::Result<()> {
    let name = hook.as_str();
    let Some(dir) = hooks_dir(rec, store) else {
        return Ok(());
    };
    let path = dir.join(name);
    if !path.exists() {
        return Ok(());
    }
    let vdir: VdbDir = rec.dir(store);
    vdir.log_line(&format!("hook {name}: running {}", path.display()));
    let mut cmd = Command::new(&path);
    cmd.current_dir(&vdir.0)
        .env("VDBFS_HOOK", name)
        .env("VDBFS_VDB", &rec.name)
        .env("VDBFS_DATA_DIR", &rec.data_dir)
        .env("VDBFS_PORT", rec.port.to_string())
        .env("VDBFS_CONN", rec.conn(store))
        .env("VDBFS_PARENT", &rec.parent)
        .env("VDBFS_STORE", store)
        .env("PGHOST", vdir.socket_dir())
        .env("PGPORT", rec.port.to_string())
        .env("PGUSER", "postgres")
        .env("PGDATABASE", "postgres")
        .env_remove("PGPASSWORD")
        .env_remove("PGSERVICE");
    let r = pg::run_unchecked(&mut cmd, HOOK_TIMEOUT, |_| {});
    let out = match r {
        Ok(o) => o,
        Err(e) => {
            vdir.log_line(&format!("hook {name}: {e:#}"));
            refuse!(
                Conflict,
                "the {name} hook of VDB {} failed: {e:#}",
                rec.name
            );
        }
    };
    let text = format!("{}\n{}", out.stdout_text(), out.stderr_text());
    let text = text.trim();
    if !text.is_empty() {
        vdir.log_line(&format!("hook {name} output:\n{text}"));
    }
    if !out.status.success() {
        vdir.log_line(&format!("hook {name}: failed ({})", out.status));
        refuse!(
            Conflict,
            "the {name} hook of VDB {} failed ({}); its output:\n{}",
            rec.name,
            out.status,
            pg::last_lines(text, 20)
        );
    }
    vdir.log_line(&format!("hook {name}: done"));
    Ok(())
}
