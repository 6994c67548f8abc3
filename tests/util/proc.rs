//! Processes: commands run with a bounded wait, polling, signals, and what runs where.

use super::*;

/// The variables a CLI run must not inherit from the user running the tests: the store, libpq's
/// connection and password settings, the log filter, the HTTP API the CLI would talk to.
pub const CLI_ENV: [&str; 15] = [
    "VDBFS_STORE",
    "VDBFS_LOG",
    "RUST_LOG",
    "PGHOST",
    "PGHOSTADDR",
    "PGPORT",
    "PGUSER",
    "PGDATABASE",
    "PGPASSWORD",
    "PGPASSFILE",
    "PGSSLMODE",
    "PGSERVICE",
    "VDBFS_URL",
    "VDBFS_TOKEN",
    "VDBFS_CA_FILE",
];

/// Removes [`CLI_ENV`] from a command's environment.
pub fn clean_cli_env(c: &mut Command) -> &mut Command {
    for v in CLI_ENV {
        c.env_remove(v);
    }
    c
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

/// When the process started (clock ticks since boot, field 22 of /proc/PID/stat), zombies
/// included: with the PID it names one process, whatever PIDs get reused.
pub fn start_time(pid: i32) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the ")" that closes comm: state is field 3, starttime field 22.
    s.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()
}

/// A process named by PID and start time (see [`start_time`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcId {
    pub pid: i32,
    pub started: u64,
}

impl ProcId {
    /// The process now running (or a zombie) as `pid`, if any.
    pub fn of(pid: i32) -> Option<ProcId> {
        start_time(pid).map(|started| ProcId { pid, started })
    }

    /// Whether this very process still has an entry in /proc (running, or a zombie not yet
    /// reaped: postgres refuses to start while the PID in postmaster.pid answers kill(pid, 0),
    /// which a zombie does).
    pub fn exists(&self) -> bool {
        start_time(self.pid) == Some(self.started)
    }

    /// Whether this very process runs (exists and is not a zombie).
    pub fn alive(&self) -> bool {
        self.exists() && pid_alive(self.pid)
    }
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
pub(super) fn processes_with_cwd(f: impl Fn(&Path) -> bool) -> Vec<i32> {
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
