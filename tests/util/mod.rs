//! Test harness: a vdbfs store with a running daemon ([`Daemon`], `daemon`), its FUSE mounts
//! ([`Mount`], `mount`), a real PostgreSQL 15 cluster run as the `postgres` OS user
//! ([`Postgres`], `postgres`), processes with bounded waits (`proc`), linked sources (`source`)
//! and VDBs (`vdb`). Everything is re-exported here: tests `use crate::util::{...}`.
//!
//! Invariants the helpers keep:
//! - Every store, mount point, socket directory and log lives under a fresh temporary directory;
//!   no test touches a real store (`VDBFS_STORE` is removed from every child's environment).
//! - Every wait is bounded: a hung daemon or postgres fails the test with its log tail, it never
//!   hangs CI.
//! - Drop cleans up in the order that cannot wedge: postgres first, then mounts (vdbfs umount,
//!   falling back to a lazy unmount), then the daemon (SIGTERM, bounded wait, SIGKILL).

#![allow(dead_code)]

use std::ffi::CString;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

pub mod browser;
pub mod daemon;
pub mod garage;
pub mod http;
pub mod mount;
pub mod postgres;
pub mod proc;
pub mod source;
pub mod vdb;

pub use daemon::*;
pub use mount::*;
pub use postgres::*;
pub use proc::*;

/// Directory of the PostgreSQL 15 binaries.
pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// How long any single external command (CLI, psql, pg_ctl, ...) may take before the test fails.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

/// How long the daemon may take to answer `vdbfs status` after `serve` was spawned.
pub const READY_TIMEOUT: Duration = Duration::from_secs(15);

/// The vdbfs binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_vdbfs")
}

/// Panics loudly unless the machine can run the FUSE + postgres tests: root, /dev/fuse, and the
/// PostgreSQL 15 binaries. These tests never skip: CI installs the prerequisites.
pub fn require_root_fuse_postgres() {
    require_root_fuse();
    for b in [
        "initdb",
        "pg_ctl",
        "postgres",
        "psql",
        "pgbench",
        "pg_amcheck",
    ] {
        let p = Path::new(PG_BIN).join(b);
        assert!(
            p.exists(),
            "PREREQUISITE MISSING: {} not found; install postgresql-15 (apt-get install -y postgresql-15)",
            p.display()
        );
    }
    assert!(
        postgres_ids().is_some(),
        "PREREQUISITE MISSING: no 'postgres' OS user (install postgresql-15)"
    );
}

/// Panics loudly unless we are root and /dev/fuse exists.
pub fn require_root_fuse() {
    assert!(
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() } == 0,
        "PREREQUISITE MISSING: these tests must run as root (FUSE mounts with allow_other, runuser postgres)"
    );
    assert!(
        Path::new("/dev/fuse").exists(),
        "PREREQUISITE MISSING: /dev/fuse does not exist (load the fuse module / give the container the device)"
    );
}

/// uid and gid of the `postgres` OS user.
pub fn postgres_ids() -> Option<(u32, u32)> {
    let name = CString::new("postgres").unwrap();
    // SAFETY: getpwnam gets a NUL-terminated name; the result is read at once below.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    if pw.is_null() {
        None
    } else {
        // SAFETY: pw is non-null here, pointing to getpwnam's static struct.
        Some(unsafe { ((*pw).pw_uid, (*pw).pw_gid) })
    }
}

/// chown a path to the postgres user.
pub fn chown_postgres(path: &Path) {
    let (uid, gid) = postgres_ids().expect("no postgres OS user");
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .unwrap_or_else(|e| panic!("chown postgres {}: {e}", path.display()));
}

pub fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {mode:o} {}: {e}", path.display()));
}

/// A fresh temporary directory readable/traversable by the postgres user (mode 0755).
pub fn tempdir(prefix: &str) -> tempfile::TempDir {
    let d = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("create temp dir");
    chmod(d.path(), 0o755);
    d
}
