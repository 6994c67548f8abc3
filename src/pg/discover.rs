//! `vdbfs env discover`: the PostgreSQL installations of this host and its clusters, found
//! without connecting to anything: Debian's `/etc/postgresql/*/*` clusters, and every running
//! postmaster (its working directory is its data directory).

use super::{installations, pid_alive, Install};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct ClusterInfo {
    pub data_dir: PathBuf,
    pub version: Option<String>,
    pub port: Option<u16>,
    pub running: bool,
    pub pid: Option<i32>,
    /// "primary", or "standby" when standby.signal or recovery.signal is present.
    pub role: String,
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Environment {
    pub installations: Vec<Install>,
    pub clusters: Vec<ClusterInfo>,
}

/// Data directories of running postmasters: postgres processes whose parent is not postgres.
fn running_data_dirs() -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    let is_postgres = |pid: &str| {
        std::fs::read_link(format!("/proc/{pid}/exe"))
            .is_ok_and(|e| e.file_name().is_some_and(|n| n == "postgres"))
    };
    for e in rd.flatten() {
        let pid = e.file_name().to_string_lossy().to_string();
        if !pid.bytes().all(|b| b.is_ascii_digit()) || !is_postgres(&pid) {
            continue;
        }
        let ppid = pid
            .parse()
            .ok()
            .and_then(super::proc_stat)
            .and_then(|f| f.get(1).cloned());
        if ppid.as_deref().is_some_and(is_postgres) {
            continue;
        }
        if let Ok(cwd) = std::fs::read_link(format!("/proc/{pid}/cwd")) {
            if cwd.join("PG_VERSION").exists() {
                out.push(cwd);
            }
        }
    }
    out
}

/// Debian clusters: `/etc/postgresql/VERSION/NAME/postgresql.conf` names `data_directory`.
fn debian_data_dirs() -> Vec<PathBuf> {
    let mut out = Vec::new();
    for v in std::fs::read_dir("/etc/postgresql")
        .into_iter()
        .flatten()
        .flatten()
    {
        for c in std::fs::read_dir(v.path()).into_iter().flatten().flatten() {
            let conf =
                std::fs::read_to_string(c.path().join("postgresql.conf")).unwrap_or_default();
            if let Some(d) = super::conf::parse_settings(&conf).get("data_directory") {
                out.push(PathBuf::from(d));
            }
        }
    }
    out
}

/// What a data directory says about its cluster.
pub fn inspect(data_dir: &Path) -> ClusterInfo {
    let version = std::fs::read_to_string(data_dir.join("PG_VERSION"))
        .ok()
        .map(|s| s.trim().to_string());
    // postmaster.pid: pid, data dir, start time, port, socket dir, listen address, shm key, status
    let pidfile = std::fs::read_to_string(data_dir.join("postmaster.pid")).unwrap_or_default();
    let lines: Vec<&str> = pidfile.lines().collect();
    let pid = lines
        .first()
        .and_then(|l| l.trim().parse::<i32>().ok())
        .filter(|p| pid_alive(*p));
    let port = lines.get(3).and_then(|l| l.trim().parse().ok());
    let standby =
        data_dir.join("standby.signal").exists() || data_dir.join("recovery.signal").exists();
    ClusterInfo {
        data_dir: data_dir.to_path_buf(),
        version,
        port: if pid.is_some() { port } else { None },
        running: pid.is_some(),
        pid,
        role: if standby { "standby" } else { "primary" }.to_string(),
    }
}

pub fn discover() -> Environment {
    let mut dirs: BTreeSet<PathBuf> = BTreeSet::new();
    dirs.extend(running_data_dirs());
    dirs.extend(debian_data_dirs());
    Environment {
        installations: installations(),
        clusters: dirs.iter().map(|d| inspect(d)).collect(),
    }
}
