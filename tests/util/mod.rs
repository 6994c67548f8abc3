//! Test harness: a vdbfs store with a running daemon ([`Daemon`]), its FUSE mounts ([`Mount`]),
//! and a real PostgreSQL 15 cluster run as the `postgres` OS user ([`Postgres`]).
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

pub mod source;

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

/// Runs a command with a bounded wait; on timeout kills it and panics with what it printed.
pub fn run_timeout(cmd: &mut Command, timeout: Duration) -> Output {
    try_run_timeout(cmd, timeout).unwrap_or_else(|e| panic!("{e}"))
}

/// Like [`run_timeout`], but a spawn failure or a timeout (the command is killed) is an `Err`
/// describing it and what it printed: never panics, so Drop impls can use it.
pub fn try_run_timeout(cmd: &mut Command, timeout: Duration) -> Result<Output, String> {
    let desc = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot spawn {desc}: {e}"))?;
    let mut out = child.stdout.take().expect("piped");
    let mut err = child.stderr.take().expect("piped");
    let t_out = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let t_err = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let status = match wait_child(&mut child, timeout) {
        Some(s) => s,
        None => {
            let _ = child.kill();
            let _ = child.wait();
            let stdout = t_out.join().unwrap_or_default();
            let stderr = t_err.join().unwrap_or_default();
            return Err(format!(
                "command timed out after {timeout:?}: {desc}\nstdout:\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&stdout),
                String::from_utf8_lossy(&stderr)
            ));
        }
    };
    Ok(Output {
        status,
        stdout: t_out.join().unwrap_or_default(),
        stderr: t_err.join().unwrap_or_default(),
    })
}

/// Polls a child until it exits or the timeout passes.
pub fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(s)) => return Some(s),
            Ok(None) => {}
            Err(e) => panic!("waiting for child {}: {e}", child.id()),
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Polls `f` until it returns true or the timeout passes; returns whether it became true.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

pub fn describe(out: &Output) -> String {
    format!(
        "exit status: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Last `n` lines of a text file (or a note that it cannot be read).
pub fn tail(path: &Path, n: usize) -> String {
    match fs::read(path) {
        Ok(b) => {
            let s = String::from_utf8_lossy(&b);
            let lines: Vec<&str> = s.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// One line of /proc/self/mountinfo: the mount point and the filesystem type.
#[derive(Debug, Clone)]
pub struct MountEntry {
    pub mountpoint: PathBuf,
    pub fstype: String,
    pub source: String,
}

use vdbfs::mounts::kernel::unescape_mountinfo;

pub fn mountinfo() -> Vec<MountEntry> {
    let s = fs::read_to_string("/proc/self/mountinfo").expect("read /proc/self/mountinfo");
    s.lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let mp = pre.split(' ').nth(4)?;
            let mut post = post.split(' ');
            let fstype = post.next()?.to_string();
            let source = unescape_mountinfo(post.next().unwrap_or(""));
            Some(MountEntry {
                mountpoint: PathBuf::from(unescape_mountinfo(mp)),
                fstype,
                source,
            })
        })
        .collect()
}

/// The mountinfo entry for exactly this mount point (the topmost one), if mounted.
pub fn mount_entry(path: &Path) -> Option<MountEntry> {
    mountinfo().into_iter().rev().find(|m| m.mountpoint == path)
}

pub fn is_mounted(path: &Path) -> bool {
    mount_entry(path).is_some()
}

/// True when the path is a FUSE mount whose daemon is gone (stat gives ENOTCONN, or
/// ECONNABORTED right after the connection was aborted).
///
/// Uses statfs, which always reaches the daemon: stat of a mount root can be answered from the
/// kernel's attribute cache even after the daemon died.
pub fn is_stale(path: &Path) -> bool {
    matches!(
        statfs(path).err().and_then(|e| e.raw_os_error()),
        Some(libc::ENOTCONN | libc::ECONNABORTED)
    )
}

/// statfs(2) of a path.
pub fn statfs(path: &Path) -> std::io::Result<libc::statfs> {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: statfs is plain old data: all-zero bytes are a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is a NUL-terminated path and st a valid out pointer.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0 {
        Ok(st)
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// What stat and statfs say about a path, for assertion messages.
pub fn stat_says(path: &Path) -> String {
    let stat = match fs::metadata(path) {
        Ok(m) => format!(
            "ok (dir: {}, mode {:o})",
            m.is_dir(),
            m.permissions().mode()
        ),
        Err(e) => format!("{e}"),
    };
    let sfs = match statfs(path) {
        Ok(st) => format!("ok (f_type {:#x})", st.f_type),
        Err(e) => format!("{e}"),
    };
    format!("stat: {stat}; statfs: {sfs}")
}

/// Lazy unmount (umount2 MNT_DETACH); returns whether the call succeeded.
pub fn lazy_umount(path: &Path) -> bool {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: c is a NUL-terminated path that outlives the call.
    unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) == 0 }
}

/// Sends a signal to a pid; returns whether the call succeeded.
pub fn signal(pid: i32, sig: i32) -> bool {
    // SAFETY: kill(2) takes plain integers; no memory is involved.
    unsafe { libc::kill(pid, sig) == 0 }
}

/// Whether a process exists and is not a zombie.
pub fn pid_alive(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => false,
        Ok(s) => {
            // state is the first field after the ")" that closes comm.
            let state = s
                .rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().next())
                .unwrap_or("X");
            state != "Z" && state != "X"
        }
    }
}

/// Whether /proc has an entry for the pid (zombies included).
pub fn pid_exists(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// "PID STATE wchan cmdline" of a process, for messages.
pub fn describe_pid(pid: i32) -> String {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, r)| r.split_whitespace().next().map(str::to_string))
        .unwrap_or_default();
    let wchan = fs::read_to_string(format!("/proc/{pid}/wchan")).unwrap_or_default();
    let cmd = fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default();
    format!("{pid} {state} {wchan} {}", cmd.trim())
}

/// Direct children of a pid (from /proc/*/stat).
pub fn children_of(pid: i32) -> Vec<i32> {
    let mut v = Vec::new();
    if let Ok(rd) = fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Ok(p) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            if let Ok(s) = fs::read_to_string(format!("/proc/{p}/stat")) {
                if let Some((_, r)) = s.rsplit_once(')') {
                    let ppid = r.split_whitespace().nth(1).and_then(|x| x.parse().ok());
                    if ppid == Some(pid) {
                        v.push(p);
                    }
                }
            }
        }
    }
    v
}

/// Processes whose working directory is `dir` or below it (e.g. a postgres started by the
/// daemon on a mount under a test's temp dir). Our own process is never listed.
pub fn processes_under(dir: &Path) -> Vec<i32> {
    processes_with_cwd(|cwd| cwd.starts_with(dir))
}

/// Processes (pid, command) with their working directory or an open file under `dir`.
pub fn holders_of(dir: &Path) -> Vec<(i32, String)> {
    let mut v = Vec::new();
    let Ok(rd) = fs::read_dir("/proc") else {
        return v;
    };
    for e in rd.flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let under = |l: std::io::Result<PathBuf>| l.is_ok_and(|t| t.starts_with(dir));
        let holds = under(fs::read_link(format!("/proc/{p}/cwd")))
            || fs::read_dir(format!("/proc/{p}/fd"))
                .map(|fds| fds.flatten().any(|f| under(fs::read_link(f.path()))))
                .unwrap_or(false);
        if holds {
            let cmd = fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
            v.push((p, String::from_utf8_lossy(&cmd).replace('\0', " ")));
        }
    }
    v
}

/// Live processes other than this one whose working directory satisfies `f`.
fn processes_with_cwd(f: impl Fn(&Path) -> bool) -> Vec<i32> {
    let me = std::process::id() as i32;
    let mut v = Vec::new();
    if let Ok(rd) = fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Ok(p) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            if p == me || !pid_alive(p) {
                continue;
            }
            if fs::read_link(format!("/proc/{p}/cwd")).is_ok_and(|cwd| f(&cwd)) {
                v.push(p);
            }
        }
    }
    v
}

/// SIGKILLs, by PID, every process [`processes_under`] `dir` finds, and waits (bounded) for
/// them to go. Returns what it had to kill, described, so a caller can report a leak.
pub fn kill_processes_under(dir: &Path) -> Vec<String> {
    let procs = processes_under(dir);
    let what: Vec<String> = procs.iter().map(|p| describe_pid(*p)).collect();
    for p in &procs {
        signal(*p, libc::SIGKILL);
    }
    if !wait_until(Duration::from_secs(20), || {
        procs.iter().all(|p| !pid_alive(*p))
    }) {
        eprintln!("processes under {} would not die: {what:?}", dir.display());
    }
    what
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", COUNTER.fetch_add(1, Ordering::SeqCst))
}

// ---------------------------------------------------------------------------------------------
// The daemon
// ---------------------------------------------------------------------------------------------

/// A vdbfs store in a fresh temporary directory and a running `vdbfs serve` on it.
pub struct Daemon {
    root: tempfile::TempDir,
    store: PathBuf,
    log_path: PathBuf,
    child: Option<Child>,
    /// Mount points made through this daemon (by [`Daemon::create_and_mount`] or [`Daemon::mount`]).
    mounts: Mutex<Vec<PathBuf>>,
    /// This daemon's VDB port pool (`LO-HI`), apart from other tests' daemons running at once.
    vdb_ports: String,
}

/// A 20-port window below the ephemeral range, different for each daemon of this run: two tests'
/// daemons picking from one pool could both choose a port before either postgres binds it.
fn vdb_port_window() -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let lo = 12_000 + (std::process::id() as usize * 140 + n * 20) % 18_000;
    format!("{lo}-{}", lo + 19)
}

impl Daemon {
    /// Inits a new store in a temporary directory and starts `vdbfs serve` on it.
    pub fn start() -> Daemon {
        require_root_fuse();
        let root = tempdir("vdbfs-test-");
        let store = root.path().join("store");
        Daemon::start_with(root, store)
    }

    /// Like [`Daemon::start`], with the store at a given path (e.g. on a small tmpfs). The path
    /// must not be a store yet; `vdbfs init` creates it.
    pub fn start_at(store: &Path) -> Daemon {
        require_root_fuse();
        let root = tempdir("vdbfs-test-");
        Daemon::start_with(root, store.to_path_buf())
    }

    fn start_with(root: tempfile::TempDir, store: PathBuf) -> Daemon {
        let log_path = root.path().join("daemon.log");
        fs::create_dir_all(root.path().join("mnt")).unwrap();
        chmod(&root.path().join("mnt"), 0o755);
        let mut d = Daemon {
            root,
            store,
            log_path,
            child: None,
            mounts: Mutex::new(Vec::new()),
            vdb_ports: vdb_port_window(),
        };
        d.ok(&["init"]);
        d.spawn_serve();
        d
    }

    /// The VDB port pool this daemon was started with (`vdbfs serve --vdb-ports`).
    pub fn vdb_ports(&self) -> (u16, u16) {
        let (lo, hi) = self.vdb_ports.split_once('-').expect("LO-HI");
        (lo.parse().unwrap(), hi.parse().unwrap())
    }

    /// The temporary directory holding the store, mount points and logs.
    pub fn root(&self) -> &Path {
        self.root.path()
    }

    pub fn store(&self) -> &Path {
        &self.store
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// A fresh, not yet existing mount point path under the test's temporary directory.
    pub fn new_mountpoint(&self, name: &str) -> PathBuf {
        self.root.path().join("mnt").join(unique(name))
    }

    fn spawn_serve(&mut self) {
        assert!(
            self.child.is_none(),
            "spawn_serve with a daemon still running"
        );
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("open daemon log");
        let mut header = log.try_clone().unwrap();
        let _ = writeln!(header, "=== test harness: vdbfs serve starting ===");
        let mut cmd = Command::new(bin());
        cmd.arg("serve")
            .arg("--store")
            .arg(&self.store)
            .env_remove("VDBFS_STORE")
            .env("VDBFS_VDB_PORTS", &self.vdb_ports)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let child = cmd.spawn().expect("spawn vdbfs serve");
        self.child = Some(child);
        self.wait_ready();
    }

    /// Waits (bounded) until `vdbfs status` answers; panics with the daemon log otherwise.
    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    self.child = None;
                    panic!(
                        "vdbfs serve exited ({st}) before answering; daemon log:\n{}",
                        self.log()
                    );
                }
            }
            let out = self.vdbfs(&["status"]);
            if out.status.success() {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "vdbfs serve did not answer `vdbfs status` within {READY_TIMEOUT:?}\nlast status: {}\ndaemon log:\n{}",
                    describe(&out),
                    self.log()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, wait (bounded) for a clean exit 0, then serve again on the same store.
    pub fn restart(&mut self) {
        self.terminate();
        self.spawn_serve();
    }

    /// SIGTERM the daemon and wait (bounded) for it to exit; asserts the exit status is 0.
    pub fn terminate(&mut self) {
        let mut c = self.child.take().expect("terminate: no daemon running");
        signal(c.id() as i32, libc::SIGTERM);
        match wait_child(&mut c, Duration::from_secs(60)) {
            Some(st) => assert!(
                st.success(),
                "vdbfs serve exited with {st} after SIGTERM (expected 0); daemon log:\n{}",
                self.log()
            ),
            None => {
                let _ = c.kill();
                let _ = c.wait();
                panic!(
                    "vdbfs serve did not exit within 60 s of SIGTERM; daemon log:\n{}",
                    self.log()
                );
            }
        }
    }

    /// SIGKILL the daemon (a simulated crash) and reap it. Its mounts are left stale (ENOTCONN).
    pub fn kill9(&mut self) {
        let mut c = self.child.take().expect("kill9: no daemon running");
        signal(c.id() as i32, libc::SIGKILL);
        let _ = c.wait();
    }

    /// Serve again on the same store (after [`Daemon::kill9`] or [`Daemon::terminate`]).
    pub fn start_again(&mut self) {
        self.spawn_serve();
    }

    /// A CLI command for this store, environment cleaned (no VDBFS_STORE).
    pub fn command(&self) -> Command {
        let mut c = Command::new(bin());
        c.env_remove("VDBFS_STORE").arg("--store").arg(&self.store);
        c
    }

    /// Runs `vdbfs --store STORE ARGS...` with a bounded wait.
    pub fn vdbfs(&self, args: &[&str]) -> Output {
        run_timeout(self.command().args(args), COMMAND_TIMEOUT)
    }

    /// Runs the CLI, asserts exit 0 (panicking with stderr and the daemon log), returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.vdbfs(args);
        assert!(
            out.status.success(),
            "`vdbfs --store {} {}` failed\n{}\ndaemon log tail:\n{}",
            self.store.display(),
            args.join(" "),
            describe(&out),
            tail(&self.log_path, 40)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The daemon's stderr so far (all runs on this store).
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn log_tail(&self, n: usize) -> String {
        tail(&self.log_path, n)
    }

    /// `vdbfs status --json`, parsed.
    pub fn status_json(&self) -> serde_json::Value {
        let s = self.ok(&["status", "--json"]);
        serde_json::from_str(&s).unwrap_or_else(|e| panic!("status --json is not JSON ({e}): {s}"))
    }

    /// `vdbfs dataset create NAME`.
    pub fn create_dataset(&self, dataset: &str) {
        self.ok(&["dataset", "create", dataset]);
    }

    /// `vdbfs mount DATASET MOUNTPOINT`, recorded for cleanup.
    pub fn mount(&self, dataset: &str, mountpoint: &Path) -> Mount {
        self.ok(&["mount", dataset, mountpoint.to_str().unwrap()]);
        assert!(
            is_mounted(mountpoint),
            "`vdbfs mount {dataset} {}` exited 0 but the mount point is not in /proc/self/mountinfo",
            mountpoint.display()
        );
        self.mounts.lock().unwrap().push(mountpoint.to_path_buf());
        Mount {
            path: mountpoint.to_path_buf(),
            dataset: dataset.to_string(),
            store: self.store.clone(),
        }
    }

    /// `dataset create` + `mount` at a fresh directory under the test's temp dir.
    pub fn create_and_mount(&self, dataset: &str) -> Mount {
        self.create_dataset(dataset);
        let mp = self.new_mountpoint(dataset);
        self.mount(dataset, &mp)
    }

    /// Waits (bounded) until the mount point is a live mount again (e.g. after a restart, when
    /// the daemon re-establishes recorded mounts itself).
    pub fn wait_mounted(&self, mountpoint: &Path, timeout: Duration) {
        let ok = wait_until(timeout, || {
            is_mounted(mountpoint) && statfs(mountpoint).is_ok() && fs::metadata(mountpoint).is_ok()
        });
        assert!(
            ok,
            "{} was not a live mount within {timeout:?} (mounted: {}, {})\ndaemon log tail:\n{}",
            mountpoint.display(),
            is_mounted(mountpoint),
            stat_says(mountpoint),
            tail(&self.log_path, 40)
        );
    }

    fn cleanup_mounts(&self) {
        let mut mps: Vec<PathBuf> = self.mounts.lock().unwrap().clone();
        // Anything mounted under our temp dir (e.g. re-established by the daemon, or made by a
        // mount helper) goes too, deepest first.
        for m in mountinfo() {
            if m.mountpoint.starts_with(self.root.path()) && !mps.contains(&m.mountpoint) {
                mps.push(m.mountpoint);
            }
        }
        mps.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
        let alive = self.child.is_some();
        for mp in mps {
            // A path can be stacked several times (a stale mount under a live one).
            for _ in 0..4 {
                if !is_mounted(&mp) {
                    break;
                }
                if alive && !is_stale(&mp) {
                    let out = run_timeout(
                        self.command().arg("umount").arg(&mp),
                        Duration::from_secs(30),
                    );
                    if out.status.success() && !is_mounted(&mp) {
                        continue;
                    }
                }
                lazy_umount(&mp);
            }
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.cleanup_mounts();
        if let Some(mut c) = self.child.take() {
            signal(c.id() as i32, libc::SIGTERM);
            if wait_child(&mut c, Duration::from_secs(30)).is_none() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        // A killed daemon leaves stale mounts; never let TempDir's removal walk into a mount.
        for m in mountinfo() {
            if m.mountpoint.starts_with(self.root.path()) {
                lazy_umount(&m.mountpoint);
            }
        }
        if std::thread::panicking() {
            eprintln!(
                "--- vdbfs daemon log tail ({}) ---\n{}",
                self.log_path.display(),
                tail(&self.log_path, 60)
            );
        }
    }
}

/// A FUSE mount of a dataset. Drop: `vdbfs umount`, falling back to a lazy unmount.
pub struct Mount {
    pub path: PathBuf,
    pub dataset: String,
    store: PathBuf,
}

impl Mount {
    /// A mount made some other way (e.g. re-established by the daemon, or via mount(8)).
    pub fn adopt(daemon: &Daemon, dataset: &str, path: &Path) -> Mount {
        Mount {
            path: path.to_path_buf(),
            dataset: dataset.to_string(),
            store: daemon.store().to_path_buf(),
        }
    }

    pub fn join(&self, rel: &str) -> PathBuf {
        self.path.join(rel)
    }

    /// `vdbfs umount` this mount point; returns the command's output.
    pub fn try_umount(&self) -> Output {
        run_timeout(
            Command::new(bin())
                .env_remove("VDBFS_STORE")
                .arg("--store")
                .arg(&self.store)
                .arg("umount")
                .arg(&self.path),
            COMMAND_TIMEOUT,
        )
    }

    /// `vdbfs umount`, asserting success and that the mount point is gone from mountinfo. A
    /// busy mount is retried for a few seconds (on a loaded machine another test's short-lived
    /// child can hold a descriptor a moment); if it stays busy, the holders are reported.
    pub fn umount(self) {
        let mut out = self.try_umount();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !out.status.success()
            && String::from_utf8_lossy(&out.stderr).contains("is busy")
            && Instant::now() < deadline
        {
            eprintln!(
                "umount {}: busy; holders: {:?}; retrying",
                self.path.display(),
                holders_of(&self.path)
            );
            thread::sleep(Duration::from_millis(200));
            out = self.try_umount();
        }
        assert!(
            out.status.success(),
            "vdbfs umount {} failed\n{}",
            self.path.display(),
            describe(&out)
        );
        assert!(
            !is_mounted(&self.path),
            "vdbfs umount {} exited 0 but it is still in /proc/self/mountinfo",
            self.path.display()
        );
        // Drop finds nothing left to do.
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if !is_mounted(&self.path) {
            return;
        }
        if !is_stale(&self.path) {
            let c = Command::new(bin())
                .env_remove("VDBFS_STORE")
                .arg("--store")
                .arg(&self.store)
                .arg("umount")
                .arg(&self.path)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn();
            if let Ok(mut c) = c {
                if wait_child(&mut c, Duration::from_secs(30)).is_none() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
            }
        }
        for _ in 0..4 {
            if !is_mounted(&self.path) {
                break;
            }
            lazy_umount(&self.path);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL
// ---------------------------------------------------------------------------------------------

/// A PostgreSQL 15 cluster run as the `postgres` OS user on a given data directory (typically on
/// a vdbfs mount). Its unix socket, server log and saved postmaster PID live in a temp dir
/// outside the mount, so they survive a dead mount.
pub struct Postgres {
    pub datadir: PathBuf,
    rundir: tempfile::TempDir,
    port: u16,
    pid: Option<i32>,
}

/// Path of a PostgreSQL 15 program.
pub fn pg(bin: &str) -> String {
    format!("{PG_BIN}/{bin}")
}

/// Processes of the cluster: the postmaster's children, and anything running in its data
/// directory (backends orphaned by a postmaster that already died have their cwd there).
fn cluster_processes(postmaster: i32, datadir: &Path) -> Vec<i32> {
    let mut v = children_of(postmaster);
    for p in processes_with_cwd(|cwd| cwd == datadir) {
        if p != postmaster && !v.contains(&p) {
            v.push(p);
        }
    }
    v
}

/// SIGKILL a postmaster, then make sure every process of its cluster is gone (bounded): grace
/// period, SIGQUIT, SIGKILL. Waits until the postmaster is reaped: postgres refuses to start
/// while the PID in postmaster.pid answers kill(pid, 0), which a zombie does.
fn kill_cluster(postmaster: i32, datadir: &Path) -> Result<(), String> {
    let procs = cluster_processes(postmaster, datadir);
    // Only if that PID still is this cluster's postmaster (PIDs get reused).
    let ours = fs::read_link(format!("/proc/{postmaster}/cwd")).is_ok_and(|c| c == datadir);
    if ours {
        signal(postmaster, libc::SIGKILL);
    }
    let all_gone =
        |procs: &[i32]| (!ours || !pid_alive(postmaster)) && procs.iter().all(|c| !pid_alive(*c));
    let mut ok = wait_until(Duration::from_secs(10), || all_gone(&procs));
    for (sig, name) in [(libc::SIGQUIT, "SIGQUIT"), (libc::SIGKILL, "SIGKILL")] {
        if ok {
            break;
        }
        let left: Vec<i32> = procs.iter().copied().filter(|c| pid_alive(*c)).collect();
        let what: Vec<String> = left.iter().map(|p| describe_pid(*p)).collect();
        eprintln!(
            "postgres processes still running after the postmaster was killed, {name}: {what:?}"
        );
        for c in &left {
            signal(*c, sig);
        }
        ok = wait_until(Duration::from_secs(10), || all_gone(&procs));
    }
    if !ok {
        let left: Vec<String> = procs
            .iter()
            .filter(|p| pid_alive(**p))
            .map(|p| describe_pid(*p))
            .collect();
        return Err(format!("postgres processes would not die: {left:?}"));
    }
    if ours && !wait_until(Duration::from_secs(30), || !pid_exists(postmaster)) {
        eprintln!("killed postmaster {postmaster} is still an unreaped zombie after 30 s");
    }
    Ok(())
}

/// A loopback TCP port nobody listens on right now.
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().unwrap().port()
}

/// psql flags the tests use: no psqlrc, quiet, unaligned tuples only, stop at the first error.
pub const PSQL_FLAGS: [&str; 6] = ["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"];

/// A command with a clean environment for libpq (no PGHOST, PGPORT, PGDATA, PGUSER, PGDATABASE;
/// `LC_ALL=C`), run in `/`.
pub fn clean_pg_env(program: &str) -> Command {
    let mut c = Command::new(program);
    c.env_remove("PGHOST")
        .env_remove("PGPORT")
        .env_remove("PGDATA")
        .env_remove("PGUSER")
        .env_remove("PGDATABASE")
        .env("LC_ALL", "C")
        .current_dir("/");
    c
}

/// `runuser -u postgres -- PROGRAM ARGS...`: a command run as the postgres OS user with a clean
/// PG* environment.
pub fn as_postgres(program: &str) -> Command {
    let mut c = clean_pg_env("runuser");
    c.args(["-u", "postgres", "--", program]);
    c
}

/// `pg_amcheck --all --install-missing --heapallindexed` (heap + btree) as the postgres user
/// against the server with unix socket directory `host` and `port`. `Err` with its output when
/// it reports anything.
pub fn run_amcheck(host: &Path, port: u16) -> Result<(), String> {
    let out = run_timeout(
        as_postgres(&pg("pg_amcheck")).args([
            "--all",
            "--install-missing",
            "--heapallindexed",
            "-h",
            host.to_str().unwrap(),
            "-p",
            &port.to_string(),
            "-U",
            "postgres",
        ]),
        Duration::from_secs(600),
    );
    if out.status.success() && out.stdout.is_empty() {
        Ok(())
    } else {
        Err(describe(&out))
    }
}

impl Postgres {
    /// `initdb -k` (data checksums) into `datadir` as the postgres user. The directory is created
    /// if needed and given to postgres with mode 0700.
    pub fn initdb(datadir: &Path) -> Postgres {
        require_root_fuse_postgres();
        if !datadir.exists() {
            fs::create_dir(datadir).unwrap_or_else(|e| panic!("mkdir {}: {e}", datadir.display()));
        }
        chown_postgres(datadir);
        chmod(datadir, 0o700);
        let out = run_timeout(
            as_postgres(&pg("initdb")).args([
                "-k",
                "--no-instructions",
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--locale=C",
                "-D",
                datadir.to_str().unwrap(),
            ]),
            Duration::from_secs(300),
        );
        assert!(
            out.status.success(),
            "initdb -k -D {} failed\n{}",
            datadir.display(),
            describe(&out)
        );
        Postgres::on(datadir)
    }

    /// A handle on an existing data directory (not started).
    pub fn on(datadir: &Path) -> Postgres {
        require_root_fuse_postgres();
        let rundir = tempdir("vdbfs-pg-");
        chown_postgres(rundir.path());
        Postgres {
            datadir: datadir.to_path_buf(),
            rundir,
            port: free_port(),
            pid: None,
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The unix socket directory (outside the mount).
    pub fn socket_dir(&self) -> &Path {
        self.rundir.path()
    }

    pub fn log_path(&self) -> PathBuf {
        self.rundir.path().join("postgres.log")
    }

    pub fn log_tail(&self, n: usize) -> String {
        tail(&self.log_path(), n)
    }

    /// The server log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn postmaster_pid(&self) -> Option<i32> {
        self.pid
    }

    fn server_options(&self) -> String {
        format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c wal_init_zero=off -c wal_recycle=off \
             -c max_connections=30 -c shared_buffers=64MB -c fsync=on -c full_page_writes=on \
             -c log_min_messages=warning",
            self.port,
            self.rundir.path().display()
        )
    }

    /// Appends settings to the cluster's postgresql.conf (call before [`Postgres::start`]), e.g.
    /// `wal_level = minimal` or archive settings. Values given on the command line by
    /// `server_options` (port, sockets, listen_addresses, ...) still win.
    pub fn append_conf(&self, lines: &[&str]) {
        let p = self.datadir.join("postgresql.conf");
        let mut f = fs::OpenOptions::new()
            .append(true)
            .open(&p)
            .unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
        for l in lines {
            writeln!(f, "{l}").unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
        }
    }

    /// Puts lines at the top of pg_hba.conf, so they win over initdb's `trust` lines (e.g.
    /// `host all all 127.0.0.1/32 scram-sha-256`). Takes effect at the next start or reload.
    pub fn prepend_hba(&self, lines: &[&str]) {
        let p = self.datadir.join("pg_hba.conf");
        let old = fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
        let mut new = lines.join("\n");
        new.push('\n');
        new.push_str(&old);
        fs::write(&p, new).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
    }

    /// `pg_ctl start -w -t 60`; panics with the server log tail on failure. Saves the
    /// postmaster PID outside the mount.
    pub fn start(&mut self) {
        let out = run_timeout(
            as_postgres(&pg("pg_ctl")).args([
                "-D",
                self.datadir.to_str().unwrap(),
                "-l",
                self.log_path().to_str().unwrap(),
                "-w",
                "-t",
                "60",
                "-o",
                &self.server_options(),
                "start",
            ]),
            Duration::from_secs(90),
        );
        assert!(
            out.status.success(),
            "pg_ctl start -D {} failed\n{}\npostgres log tail:\n{}",
            self.datadir.display(),
            describe(&out),
            self.log_tail(60)
        );
        let pidfile = self.datadir.join("postmaster.pid");
        let s = fs::read_to_string(&pidfile)
            .unwrap_or_else(|e| panic!("read {}: {e}", pidfile.display()));
        let pid: i32 = s
            .lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
            .unwrap_or_else(|| panic!("bad {}: {s:?}", pidfile.display()));
        fs::write(
            self.rundir.path().join("postmaster.pid.saved"),
            format!("{pid}\n"),
        )
        .unwrap();
        self.pid = Some(pid);
    }

    /// `pg_ctl stop -m fast -w -t 60`; panics with the log tail on failure.
    pub fn stop(&mut self) {
        let out = run_timeout(
            as_postgres(&pg("pg_ctl")).args([
                "-D",
                self.datadir.to_str().unwrap(),
                "-m",
                "fast",
                "-w",
                "-t",
                "60",
                "stop",
            ]),
            Duration::from_secs(90),
        );
        assert!(
            out.status.success(),
            "pg_ctl stop -D {} failed\n{}\npostgres log tail:\n{}",
            self.datadir.display(),
            describe(&out),
            self.log_tail(60)
        );
        if let Some(pid) = self.pid.take() {
            assert!(
                wait_until(Duration::from_secs(30), || !pid_alive(pid)),
                "postmaster {pid} still alive after pg_ctl stop"
            );
        }
    }

    /// SIGKILL the postmaster by its saved PID (works on a dead mount), then wait (bounded) for
    /// the cluster's other processes to go. Most exit when they notice the postmaster died; a
    /// backend waiting for a lock held by a backend that PANICked never does, so after a grace
    /// period they get what the postmaster would have sent them (SIGQUIT), then SIGKILL.
    pub fn kill9(&mut self) {
        let pid = self.pid.take().expect("kill9: postgres not started");
        kill_cluster(pid, &self.datadir).unwrap_or_else(|e| panic!("{e}"));
    }

    /// Whether the saved postmaster is running.
    pub fn running(&self) -> bool {
        self.pid.map(pid_alive).unwrap_or(false)
    }

    /// A psql command line for this server (database `postgres`, no psqlrc, unaligned tuples).
    pub fn psql_command(&self) -> Command {
        let mut c = as_postgres(&pg("psql"));
        c.args(PSQL_FLAGS).args([
            "-h",
            self.rundir.path().to_str().unwrap(),
            "-p",
            &self.port.to_string(),
            "-d",
            "postgres",
        ]);
        c
    }

    /// Runs SQL; panics (with the server log tail) on error; returns trimmed stdout.
    pub fn psql(&self, sql: &str) -> String {
        let out = self.try_psql(sql);
        assert!(
            out.status.success(),
            "psql -c {sql:?} failed\n{}\npostgres log tail:\n{}",
            describe(&out),
            self.log_tail(40)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    pub fn try_psql(&self, sql: &str) -> Output {
        run_timeout(self.psql_command().arg("-c").arg(sql), COMMAND_TIMEOUT)
    }

    /// A pgbench command line for this server; append args, then `postgres` is the database.
    pub fn pgbench_command(&self, args: &[&str]) -> Command {
        let mut c = as_postgres(&pg("pgbench"));
        c.args([
            "-h",
            self.rundir.path().to_str().unwrap(),
            "-p",
            &self.port.to_string(),
        ])
        .args(args)
        .arg("postgres");
        c
    }

    /// Runs pgbench; panics on failure; returns stdout + stderr.
    pub fn pgbench(&self, args: &[&str]) -> String {
        let out = run_timeout(&mut self.pgbench_command(args), Duration::from_secs(600));
        assert!(
            out.status.success(),
            "pgbench {args:?} failed\n{}\npostgres log tail:\n{}",
            describe(&out),
            self.log_tail(40)
        );
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// `pg_amcheck --all` (heap + btree, with heapallindexed); panics on any finding.
    pub fn amcheck(&self) {
        if let Err(e) = run_amcheck(self.rundir.path(), self.port) {
            panic!(
                "pg_amcheck --all reported problems on {}\n{e}\npostgres log tail:\n{}",
                self.datadir.display(),
                self.log_tail(40)
            );
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let Some(pid) = self.pid.take() else {
            return;
        };
        if pid_alive(pid) {
            let c = as_postgres(&pg("pg_ctl"))
                .args([
                    "-D",
                    self.datadir.to_str().unwrap(),
                    "-m",
                    "immediate",
                    "-w",
                    "-t",
                    "30",
                    "stop",
                ])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn();
            if let Ok(mut c) = c {
                if wait_child(&mut c, Duration::from_secs(40)).is_none() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
            }
        }
        // The mount may be dead (pg_ctl cannot read postmaster.pid) or the stop hung; and leave
        // no orphaned backend behind either.
        if let Err(e) = kill_cluster(pid, &self.datadir) {
            eprintln!("{e}");
        }
        if std::thread::panicking() {
            eprintln!(
                "--- postgres log tail ({}) ---\n{}",
                self.log_path().display(),
                self.log_tail(60)
            );
        }
    }
}
